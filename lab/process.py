"""The lab's one way to run a child process: start it with its log (and pid file), wait until
something holds or a deadline passes, probe a port, stop it with SIGTERM and then SIGKILL."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import psutil


class NotInTime(TimeoutError):
    """What was waited for did not happen: its deadline passed, or the wait gave up early."""


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
