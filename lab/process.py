"""The lab's one way to run a child process: start it with its log (and pid file), wait until
something holds or a deadline passes, probe a port, stop it with SIGTERM and then SIGKILL; and a
Python function in a process of its own whose answer (or traceback) comes back."""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

import psutil


class NotInTime(TimeoutError):
    """What was waited for did not happen: its deadline passed, or the wait gave up early."""


class ChildFailed(RuntimeError):
    """A child's function raised (its traceback is the message), or the child died without an answer."""


def spawn(cmd: list[str], log: Path | None, pidfile: Path | None = None, *, env: dict | None = None,
          cwd: Path | None = None, append: bool = True, banner: str | None = None,
          new_session: bool = False) -> subprocess.Popen:
    """Start ``cmd`` with no stdin and its stdout and stderr in ``log`` (appended, after
    ``banner`` if given, or written anew; None: discarded); its pid goes to ``pidfile``.
    ``new_session``: the child outlives this process's terminal (a service that ``stop`` ends
    later by its pid)."""
    with open(log, "a" if append else "w") if log else open(os.devnull, "w") as out:
        if banner:
            out.write(banner)
            out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=new_session, env=env, cwd=cwd)
    if pidfile is not None:
        pidfile.write_text(f"{proc.pid}\n")
    return proc


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, *, every_s: float = 0.5,
               gave_up: Callable[[], str | None] | None = None) -> None:
    """Poll ``predicate`` every ``every_s`` until it holds. Raises NotInTime naming ``what``
    (phrased as what should happen, e.g. "redis answers") once ``timeout_s`` passes, or at once
    when ``gave_up`` returns a reason (e.g. "it exited")."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        reason = gave_up() if gave_up else None
        if reason:
            raise NotInTime(f"gave up waiting until {what}: {reason}")
        if time.monotonic() > deadline:
            raise NotInTime(f"timed out after {timeout_s:.0f}s waiting until {what}")
        time.sleep(every_s)


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _running(target: int | subprocess.Popen) -> bool:
    if isinstance(target, subprocess.Popen):
        return target.poll() is None
    try:
        return psutil.Process(target).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(targets: int | subprocess.Popen | Iterable[int | subprocess.Popen], grace_s: float = 30.0,
         running: Callable[[int | subprocess.Popen], bool] = _running, every_s: float = 0.2) -> bool:
    """SIGTERM every target (a pid or a child) at once, SIGKILL those still ``running`` after
    ``grace_s``; children are reaped. True when all ended on SIGTERM, False when one was killed."""
    targets = [targets] if isinstance(targets, (int, subprocess.Popen)) else list(targets)
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := [t for t in targets if running(t)]) and time.monotonic() < deadline:
        time.sleep(every_s)
    _signal(left, signal.SIGKILL)
    for t in targets:
        if isinstance(t, subprocess.Popen):
            t.wait()
    return not left


def _signal(targets: list[int | subprocess.Popen], sig: int) -> None:
    for t in targets:
        with contextlib.suppress(ProcessLookupError):
            if isinstance(t, subprocess.Popen):
                if t.poll() is None:
                    t.send_signal(sig)
            else:
                os.kill(t, sig)


def _answer(fn: Callable, args: tuple, answers) -> None:
    try:
        answers.put((True, fn(*args)))
    except BaseException:
        answers.put((False, traceback.format_exc()))
        raise


class Child:
    """``fn(*args)`` in a spawned Python process (fn importable by name: a module's function),
    e.g. a load generator with an event loop of its own. ``result`` waits for its return value;
    its exception comes back as ChildFailed with the child's traceback, and a child that dies
    without an answer (killed, out of memory) is noticed within a second, not at the deadline."""

    def __init__(self, fn: Callable, *args) -> None:
        ctx = mp.get_context("spawn")
        self._answers = ctx.Queue()
        self.proc = ctx.Process(target=_answer, args=(fn, args, self._answers), daemon=True)
        self.proc.start()

    def result(self, timeout_s: float, what: str = "the child answers"):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ok, value = self._answers.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    try:  # it may have answered just before it ended
                        ok, value = self._answers.get(timeout=1.0)
                        break
                    except queue.Empty:
                        raise ChildFailed(f"{what}: the child ended with exit code {self.proc.exitcode} "
                                          f"and no answer") from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise NotInTime(f"timed out after {timeout_s:.0f}s waiting until {what}") from None
        self.proc.join(timeout=30)
        if not ok:
            raise ChildFailed(f"{what}: the child raised\n{value}")
        return value

    def kill(self) -> None:
        """End it now, if it still runs (a scenario's clean-up)."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
