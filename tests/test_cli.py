"""The command line's shared habits, in process and without services: --version, -v before
or after the command, --json where a command prints JSON, and the exit codes."""
from __future__ import annotations

import socket

import httpx
import kafka.errors
import pytest
import redis.exceptions
from pydantic import ValidationError

from cli import main as cli_main
from recsys.errors import Busy, InvalidInput, RecsysError, Unavailable, exit_code
from recsys.settings import Settings
from tests.test_settings import folder  # noqa: F401 (the fixture: a working folder, no RECSYS_* variables)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once the socket is: nothing listens there


def test_version_comes_from_the_package_metadata(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as done:
        cli_main.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"recsys {version('recsys')}"


@pytest.mark.parametrize("argv, verbose", [(["stream"], False), (["-v", "stream"], True), (["stream", "-v"], True),
                                           (["bench", "gate", "--verbose"], True), (["-v", "bench", "gate"], True),
                                           (["models", "list"], False), (["models", "list", "-v"], True)])
def test_verbose_before_or_after_the_command(argv, verbose):
    assert cli_main.build_parser().parse_args(argv).verbose is verbose


@pytest.mark.parametrize("argv", [["replay"], ["stream"], ["archive"], ["online", "run"], ["online", "report"],
                                  ["bench", "gate"], ["bench", "train"], ["stack", "status"], ["top"],
                                  ["train", "--source", "synthetic"], ["evaluate", "--source", "synthetic"],
                                  ["models", "list"], ["retrain-now"], ["config", "show"], ["loadtest"]])
def test_json_is_accepted_by_every_command_that_prints_json(argv):
    assert cli_main.build_parser().parse_args([*argv, "--json"]).json is True


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli_main.main(["--help"])
    out = capsys.readouterr().out
    for code in ("0", "1", "2", "69", "70"):
        assert f"\n  {code} " in out, out


@pytest.mark.parametrize("exc, code", [
    (RecsysError("a check did not pass"), 1), (Busy("locked"), 1), (InvalidInput("bad"), 2),
    (Unavailable("no Redis"), 69), (redis.exceptions.ConnectionError("refused"), 69),
    (redis.exceptions.TimeoutError("slow"), 69), (kafka.errors.KafkaTimeoutError("no brokers"), 69),
    (httpx.ConnectError("refused"), 69), (ConnectionRefusedError("ray"), 69), (RuntimeError("bug"), 70),
    (KeyboardInterrupt(), 130)])
def test_each_error_has_its_exit_code(exc, code):
    assert exit_code(exc) == code


def test_settings_that_do_not_parse_are_bad_input():
    with pytest.raises(ValidationError) as bad:
        Settings(redis={"port": "not a port"})
    assert exit_code(bad.value) == 2


def test_a_bad_argument_exits_2(folder, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main.main(["-v", "stack", "sideways"])
    assert done.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_missing_input_exits_2_with_one_line(folder, capsys):
    assert cli_main.main(["keys", "revoke", "-v"]) == 2
    assert capsys.readouterr().err.strip() == "recsys keys: revoke: give the key's id (recsys keys list)"


def test_redis_that_does_not_answer_exits_69(folder, monkeypatch, capsys):
    monkeypatch.setenv("RECSYS_REDIS_PORT", str(_closed_port()))
    monkeypatch.setenv("RECSYS_SECRET_REDIS_PASSWORD", "x")
    assert cli_main.main(["keys", "list", "-v"]) == 69
    err = capsys.readouterr().err
    assert err.startswith("recsys keys: a service does not answer (ConnectionError") and "stack status" in err


def test_an_unexpected_error_exits_70_with_its_traceback(folder, monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli_main, "cmd_users", broken)
    assert cli_main.main(["users", "forget", "u1", "-v"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err


def test_users_forget_reads_ids_from_stdin_and_warns_of_one_on_the_command_line(folder, monkeypatch, capsys):
    """An id on the command line shows in the process list and the shell's history: ``--stdin``
    keeps it out of both; the old form still works, with a warning."""
    import io

    import recsys.erasure
    forgotten = []
    monkeypatch.setattr(recsys.erasure, "forget_user", lambda settings, raw: forgotten.append(raw) or {"pseudonym": "p"})
    monkeypatch.setattr("sys.stdin", io.StringIO("alice\n bob \n\ncarol"))
    assert cli_main.main(["users", "forget", "--stdin", "--json", "-v"]) == 0
    out, err = capsys.readouterr()
    assert forgotten == ["alice", " bob ", "carol"] and out.splitlines() == ['{"pseudonym": "p"}'] * 3 and err == ""
    assert cli_main.main(["users", "forget", "dave", "--json", "-v"]) == 0
    assert forgotten[-1] == "dave" and "--stdin" in capsys.readouterr().err
    assert cli_main.main(["users", "forget", "erin", "--stdin", "-v"]) == 2 and forgotten[-1] == "dave"
