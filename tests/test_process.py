"""lab.process with real short-lived children: python -c sleepers and a socket server."""
from __future__ import annotations

import operator
import signal
import socket
import sys
import time

import pytest

from lab import process

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
# Ignores SIGTERM: only SIGKILL ends it.
STUBBORN = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                  "print('up', flush=True); time.sleep(60)"]


def _printed(log, text: str) -> bool:
    return log.exists() and text in log.read_text()


def test_spawn_writes_the_log_and_the_pid_file(tmp_path):
    log, pidfile = tmp_path / "child.log", tmp_path / "child.pid"
    log.write_text("earlier run\n")
    proc = process.spawn([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"],
                         log, pidfile, banner="==== starting\n")
    assert proc.wait(timeout=30) == 0
    assert log.read_text().splitlines() == ["earlier run", "==== starting", "out", "err"]
    assert int(pidfile.read_text()) == proc.pid


def test_spawn_can_write_the_log_anew_and_run_in_a_session_and_folder_of_its_own(tmp_path):
    log = tmp_path / "child.log"
    log.write_text("earlier run\n")
    proc = process.spawn([sys.executable, "-c", "import os; print(os.getsid(0) == os.getpid(), os.getcwd())"],
                         log, append=False, new_session=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert proc.wait(timeout=30) == 0
    assert log.read_text() == f"True {tmp_path}\n"


def test_wait_until_returns_once_the_predicate_holds():
    calls = []
    process.wait_until(lambda: calls.append(1) or len(calls) >= 3, 5, "three calls", every_s=0.01)
    assert len(calls) == 3


def test_wait_until_names_what_did_not_happen_when_the_deadline_passes():
    t0 = time.monotonic()
    with pytest.raises(process.NotInTime, match="timed out after 0s waiting until the moon is blue"):
        process.wait_until(lambda: False, 0.2, "the moon is blue", every_s=0.05)
    assert 0.2 <= time.monotonic() - t0 < 2
    assert issubclass(process.NotInTime, TimeoutError)  # callers that catch TimeoutError still do


def test_wait_until_gives_up_at_once_when_told_why(tmp_path):
    proc = process.spawn([sys.executable, "-c", "pass"], tmp_path / "child.log")
    t0 = time.monotonic()
    with pytest.raises(process.NotInTime, match="gave up waiting until child answers: it exited"):
        process.wait_until(lambda: False, 30, "child answers", every_s=0.05,
                           gave_up=lambda: "it exited" if proc.poll() is not None else None)
    assert time.monotonic() - t0 < 10


def test_port_open_sees_a_listening_socket_and_not_a_closed_one():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        assert process.port_open("127.0.0.1", port)
    finally:
        server.close()
    assert not process.port_open("127.0.0.1", port)


def test_stop_ends_a_child_with_sigterm(tmp_path):
    log = tmp_path / "child.log"
    proc = process.spawn(SLEEPER, log)
    process.wait_until(lambda: _printed(log, "up"), 30, "the child is up", every_s=0.05)
    assert process.stop(proc, grace_s=10) is True
    assert proc.returncode == -signal.SIGTERM


def test_stop_kills_what_outlives_the_grace_period_by_pid_or_child(tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [process.spawn(STUBBORN, log) for log in logs]
    process.wait_until(lambda: all(_printed(log, "up") for log in logs), 30, "both children are up", every_s=0.05)
    t0 = time.monotonic()
    assert process.stop([procs[0], procs[1].pid], grace_s=0.5) is False
    assert 0.5 <= time.monotonic() - t0 < 10
    assert procs[0].returncode == -signal.SIGKILL
    assert procs[1].wait(timeout=10) == -signal.SIGKILL  # killed by pid; reaped here, its parent


def test_stop_of_something_already_gone_is_quiet(tmp_path):
    proc = process.spawn([sys.executable, "-c", "pass"], None)
    proc.wait(timeout=30)
    assert process.stop(proc, grace_s=1) is True
    assert process.stop([], grace_s=1) is True


def test_a_childs_answer_comes_back():
    assert process.Child(operator.add, 2, 3).result(60) == 5


def test_a_childs_exception_comes_back_with_its_traceback():
    child = process.Child(operator.truediv, 1, 0)
    with pytest.raises(process.ChildFailed, match=r"(?s)the sum: the child raised.*ZeroDivisionError"):
        child.result(60, "the sum")
    assert child.proc.exitcode == 1


def test_a_child_that_dies_without_an_answer_is_noticed_before_the_deadline():
    child = process.Child(signal.raise_signal, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(process.ChildFailed, match=f"exit code {-signal.SIGKILL} and no answer"):
        child.result(300)
    assert time.monotonic() - t0 < 30


def test_a_child_past_its_deadline_is_killed():
    child = process.Child(time.sleep, 60)
    with pytest.raises(process.NotInTime, match="waiting until the nap ends"):
        child.result(1, "the nap ends")
    assert child.proc.exitcode == -signal.SIGKILL
