"""The docs build with `mkdocs build --strict` (a broken link, a missing anchor or a page left
out of the navigation fails it), and README.md stays short with every relative link resolving.
No services."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
# the files that docs pages include (pymdownx.snippets), beside their code
INCLUDED = ["deploy/local/README.md", "deploy/k8s/README.md", "loadtest/README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def broken_links(markdown: Path) -> list[str]:
    """The relative links of a Markdown file whose target file does not exist."""
    broken = []
    for target in LINK.findall(markdown.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor of the same page
        if not (markdown.parent / target.split("#")[0]).exists():
            broken.append(target)
    return broken


def test_the_docs_build_strictly(tmp_path):
    done = mkdocs_build(REPO, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "benchmarks" / "results" / "index.html").exists()


def test_a_broken_link_fails_the_build(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    for name in INCLUDED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\nSee [nowhere](no-such-page.md).\n")
    done = mkdocs_build(tmp_path, tmp_path / "site")
    assert done.returncode != 0 and "no-such-page.md" in done.stdout + done.stderr


def test_the_readme_is_short_and_its_links_resolve(tmp_path):
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    assert LINK.findall(readme.read_text()), "the README links into docs/"
    assert broken_links(readme) == []
    bad = tmp_path / "README.md"
    bad.write_text("[ok](README.md) [url](https://example.com) [gone](docs/gone.md#x)\n")
    assert broken_links(bad) == ["docs/gone.md#x"]
