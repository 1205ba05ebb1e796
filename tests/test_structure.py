"""The dependency rule, read from the source: entry points -> applications -> domain.

- entry points: ``cli`` (the ``recsys`` command, the demo);
- applications: ``serving``, ``training``, ``loadtest``, ``deploy``, ``lab`` (the local stack,
  benches, fault scenarios: what starts, measures or breaks the system on one machine);
- domain: ``recsys``.

Nothing imports a layer above its own, and the Serve request path (``serving.app`` and
everything it imports, directly or not) reaches neither the lab nor training code. Every
import counts, also one inside a function. Three more rules keep the product apart from the
lab: only the lab (and ``loadtest``, and the tests) start processes; no module uses another
package's ``_private`` name; the product packages (``recsys``, ``serving``, ``training``)
import nothing from the lab.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("recsys", "serving", "training")
MAY_START_PROCESSES = ("lab", "loadtest", "tests")
# Calls that start a process (``os.spawn*``, ``os.exec*`` and ``os.posix_spawn*`` by prefix).
STARTS_A_PROCESS = {"subprocess.Popen", "subprocess.run", "subprocess.call", "subprocess.check_call",
                    "subprocess.check_output", "subprocess.getoutput", "subprocess.getstatusoutput",
                    "os.fork", "os.forkpty", "os.system", "os.popen", "multiprocessing.Process",
                    "multiprocessing.Pool", "multiprocessing.get_context", "concurrent.futures.ProcessPoolExecutor",
                    "asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell"}
STARTS_A_PROCESS_PREFIXES = ("os.spawn", "os.exec", "os.posix_spawn")
LAYERS = {"cli": 0, "serving": 1, "training": 1, "loadtest": 1, "deploy": 1, "lab": 1, "recsys": 2}
NOT_ON_THE_REQUEST_PATH = ("training", "deploy", "lab", "recsys.training_data", "cli")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, tops=LAYERS) -> dict[str, Path]:
    return {module_name(p, root): p for top in tops if (root / top).is_dir()
            for p in (root / top).rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules a file imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in LAYERS}
    return found


def layer_violations(root: Path) -> list[str]:
    known = modules(root)
    out = []
    for name, path in sorted(known.items()):
        for target in sorted(imports_of(path, known)):
            if LAYERS[target.split(".")[0]] < LAYERS[name.split(".")[0]]:
                out.append(f"{name} imports {target}")
    return out


def reachable(root: Path, start: str) -> set[str]:
    known = modules(root)
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in known:
            continue
        seen.add(name)
        todo.extend(imports_of(known[name], known))
    return seen


def request_path_violations(root: Path) -> list[str]:
    return sorted(m for m in reachable(root, "serving.app")
                  if any(m == bad or m.startswith(bad + ".") for bad in NOT_ON_THE_REQUEST_PATH))


def test_no_module_imports_a_layer_above_its_own():
    assert layer_violations(ROOT) == []


def test_the_serve_request_path_reaches_neither_the_local_stack_nor_training_code():
    path = reachable(ROOT, "serving.app")
    assert {"serving.app", "recsys.feature_store", "recsys.model"} <= path  # the walk follows imports
    assert request_path_violations(ROOT) == []


def test_the_rule_fails_when_broken(tmp_path):
    """A copy of the rule's shape with each kind of violation planted in it."""
    for folder, text in {"recsys": "def f():\n    from training.job import train\n",
                         "serving": "from recsys.features import Keys\n",
                         "training": "import cli.main\n", "cli": "", "deploy": ""}.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
        (tmp_path / folder / "mod.py").write_text(text)
    (tmp_path / "recsys" / "features.py").write_text("import deploy.mod\n")
    (tmp_path / "serving" / "app.py").write_text("from serving import mod\n")
    (tmp_path / "training" / "job.py").write_text("")
    assert layer_violations(tmp_path) == ["recsys.features imports deploy.mod", "recsys.mod imports training.job",
                                          "training.mod imports cli.main"]
    assert request_path_violations(tmp_path) == ["deploy.mod"]  # serving.app -> serving.mod -> recsys.features -> deploy.mod


def bound_names(tree: ast.AST) -> dict[str, str]:
    """What each name a file imports stands for: ``import a.b as m`` -> {"m": "a.b"},
    ``import a.b`` -> {"a": "a"}, ``from a import b`` -> {"b": "a.b"}."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    return names


def dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """``m.x.y`` as the full dotted name it stands for, through the file's imports; None for other
    expressions (a call's result, a local variable)."""
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, names)
        return f"{base}.{node.attr}" if base else None
    return names.get(node.id) if isinstance(node, ast.Name) else None


def process_starts(root: Path) -> list[str]:
    """Calls that start a process, outside the lab, loadtest and the tests."""
    out = []
    for name, path in sorted(modules(root).items()):
        if name.split(".")[0] in MAY_START_PROCESSES:
            continue
        tree = ast.parse(path.read_text(), str(path))
        names = bound_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (target := dotted(node.func, names)) and (
                    target in STARTS_A_PROCESS or target.startswith(STARTS_A_PROCESS_PREFIXES)):
                out.append(f"{name}:{node.lineno} {target}")
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(root: Path) -> list[str]:
    """Another package's ``_private`` names used by a module (tests included): ``from x import _y``
    and ``x._y`` where ``x`` is a project module of another top-level package."""
    known = modules(root)
    out = []
    for name, path in sorted(modules(root, (*LAYERS, "tests")).items()):
        tree = ast.parse(path.read_text(), str(path))
        names = bound_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                used = [(node.module, a.name) for a in node.names if is_private(a.name)]
            elif isinstance(node, ast.Attribute) and is_private(node.attr):
                used = [(dotted(node.value, names), node.attr)]
            else:
                continue
            out += [f"{name}:{node.lineno} {owner}.{attr}" for owner, attr in used
                    if owner in known and owner.split(".")[0] != name.split(".")[0]]
    return out


def product_imports_of_the_lab(root: Path) -> list[str]:
    known = modules(root)
    return [f"{name} imports {target}" for name, path in sorted(known.items()) if name.split(".")[0] in PRODUCT
            for target in sorted(imports_of(path, known)) if target.split(".")[0] == "lab"]


def test_only_the_lab_loadtest_and_tests_start_processes():
    assert process_starts(ROOT) == []


def test_no_module_uses_another_packages_private_names():
    assert private_uses(ROOT) == []


def test_the_product_imports_nothing_from_the_lab():
    assert product_imports_of_the_lab(ROOT) == []


def test_the_lab_rules_fail_when_broken(tmp_path):
    """Each of the three rules above, with a violation planted in a copy of the layout."""
    files = {
        "lab/__init__.py": "", "lab/stack.py": "import subprocess\ndef _pid(): ...\nsubprocess.run(['true'])\n",
        "recsys/__init__.py": "", "recsys/features.py": "def _key(): ...\n",
        "serving/__init__.py": "",
        "serving/launch.py": "import multiprocessing as mp\nfrom subprocess import Popen\nfrom lab import stack\n"
                            "def f():\n    Popen(['true'])\n    mp.get_context('spawn')\n    stack._pid()\n",
        "training/__init__.py": "", "training/job.py": "import os\nfrom recsys.features import _key\nos.execv('x', [])\n",
        "cli/__init__.py": "", "cli/main.py": "import lab.stack\nlab.stack._pid()\nimport psutil\npsutil.Process(1)\n",
        "tests/test_x.py": "import recsys.features as f\nf._key()\nimport subprocess\nsubprocess.run(['true'])\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert process_starts(tmp_path) == ["serving.launch:5 subprocess.Popen", "serving.launch:6 multiprocessing.get_context",
                                        "training.job:3 os.execv"]
    assert private_uses(tmp_path) == ["cli.main:2 lab.stack._pid", "serving.launch:7 lab.stack._pid",
                                      "tests.test_x:2 recsys.features._key", "training.job:2 recsys.features._key"]
    assert product_imports_of_the_lab(tmp_path) == ["serving.launch imports lab.stack"]
