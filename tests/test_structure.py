"""The dependency rule, read from the source: entry points -> applications -> domain.

- entry points: ``cli`` (the ``recsys`` command, the demo);
- applications: ``serving``, ``training``, ``loadtest``, ``deploy`` (the local stack);
- domain: ``recsys``.

Nothing imports a layer above its own, and the Serve request path (``serving.app`` and
everything it imports, directly or not) reaches neither the local stack nor training code.
Every import counts, also one inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"cli": 0, "serving": 1, "training": 1, "loadtest": 1, "deploy": 1, "lab": 1, "recsys": 2}
NOT_ON_THE_REQUEST_PATH = ("training", "deploy", "lab", "recsys.training_data", "cli")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for top in LAYERS if (root / top).is_dir()
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
