"""The environment is the lock file: every locked package installed at its locked version
(deploy/local/setup.sh installs with --require-hashes), and the lock covers pyproject.toml."""
from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _locked() -> dict[str, str]:
    text = (ROOT / "requirements.lock").read_text()
    return {_name(name): version for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", text, re.M)}


def test_every_locked_package_is_installed_at_its_locked_version():
    wrong = {}
    for name, version in _locked().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"locked vs installed (run deploy/local/setup.sh): {wrong}"


def test_the_lock_covers_every_dependency_of_the_project():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = [d for d in deps if _name(d) not in _locked()]
    assert not missing, f"not in requirements.lock (re-lock, see deploy/local/setup.sh): {missing}"
