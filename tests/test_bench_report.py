"""recsys bench report and the benches' saved history: the results page and plots made from
JSON files in a tmp folder (no services)."""
from __future__ import annotations

import json
import struct
import subprocess

from lab.bench import report
from lab.bench import store as bench_store
from recsys.settings import Settings


def serve_run(commit: str, day: int, cpu_c: float) -> dict:
    variants = {k: {"endpoint": e, "ingress": i, "rps": rps, "p50_ms": 10.0, "p99_ms": 25.0, "errors": 0,
                    "personal_share": share, "cpu_ms_per_request": cpu}
                for k, e, i, rps, share, cpu in (("a", "noop", "proxy", 308.0, 0.0, 5.59),
                                                 ("b", "noop", "haproxy", 1436.0, 0.0, 1.08),
                                                 ("c", "recsys", "haproxy", 1236.0, 1.0, cpu_c),
                                                 ("d", "recsys", "uvicorn", 2119.0, 1.0, 0.66))}
    return {"replicas": 2, "concurrency": 16, "users": 500, "variants": variants,
            "ratios": {"c/a throughput": 4.01, "c/b throughput": 0.861},
            "targets": {"c/a throughput": ">= 3", "c/b throughput": ">= 0.8"},
            "passed": {"c/a throughput": True, "c/b throughput": True}, "pass": True,
            "measured_at": f"2026-12-0{day}T10:00:00+00:00", "commit": commit}


STREAM = {"events": 50_000, "worker_events_per_s": 17_111.0, "raw_kafka_consume_per_s": 49_399.0,
          "raw_redis_apply_per_s": 26_623.0, "worker_vs_slower_raw": 0.643, "freshness_at_rate": 1000,
          "freshness": {"p50_ms": 7.1, "p99_ms": 20.3},
          "targets": {"worker_vs_slower_raw": ">= 0.75", "freshness_p99_ms": "<= 50"}, "passed": False,
          "measured_at": "2026-11-29T09:00:00+00:00", "commit": "2653cd7"}
ANN = {"faiss": "1.15.0", "passed": False, "sizes": {
    str(n): {"indexes": {kind: {"param": {"nprobe": 4}, "recall@10": 0.97, "p50_ms": p99 / 2, "p99_ms": p99,
                                "p99_speedup_vs_exact": 2.0, "build_s": 1.0, "bytes_per_item": 73.0}
                         for kind, p99 in (("flat", 0.09 * n / 10_000), ("ivf_int8", 0.016 * (n / 10_000) ** 0.3))}}
    for n in (10_000, 100_000, 1_000_000)},
       "targets": {"items": 1_000_000, "p99_le_2ms_at_recall_095": {"met": True, "indexes": ["ivf_int8"]}}}
TRAIN = {"source": "movielens:x", "protocol": "A",
         "validation_and_test_hr@10": {"two_tower": {"validation": 0.2354, "test": 0.2004},
                                       "ease": {"validation": 0.1686, "test": 0.1421}},
         "two_tower": {"hr@10": 0.2004, "ndcg@10": 0.1066, "hr@50": 0.508},
         "baselines": {"ease": {"hr@10": 0.1421, "ndcg@10": 0.0695, "hr@50": 0.3796}},
         "two_tower_vs_recency_ease_hr@10": 1.105, "examples_per_s_1_worker": 33_300.0}


def write_saved(home, name: str, content) -> None:
    (home / "bench").mkdir(parents=True, exist_ok=True)
    (home / "bench" / f"{name}.json").write_text(json.dumps(content))


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_save_appends_to_a_bounded_history_and_reads_a_single_result_file(tmp_path, monkeypatch):
    s = Settings().updated(home=tmp_path)
    assert bench_store.history(s, "serve") == [] and bench_store.load(s, "serve") is None
    write_saved(tmp_path, "serve", serve_run("old1234", 1, 1.9))  # the format before the history
    assert [r["commit"] for r in bench_store.history(s, "serve")] == ["old1234"]
    monkeypatch.setattr(bench_store, "HISTORY_LIMIT", 3)
    for cpu in (1.5, 1.4, 1.3):
        bench_store.save(s, "serve", {"variants": {"c": {"cpu_ms_per_request": cpu}}})
    runs = bench_store.history(s, "serve")
    assert [r["variants"]["c"]["cpu_ms_per_request"] for r in runs] == [1.5, 1.4, 1.3]  # oldest dropped
    assert bench_store.load(s, "serve") == runs[-1] and runs[-1]["measured_at"].endswith("+00:00")
    assert bench_store.saved_names(s) == ["serve"]


def test_the_page_names_every_bench_found_with_its_latest_run_and_plots(tmp_path):
    home, out = tmp_path / "home", tmp_path / "docs"
    write_saved(home, "serve", {"history": [serve_run("aaa1111", 1, 1.91), serve_run("bbb2222", 2, 1.26)]})
    write_saved(home, "stream", STREAM)  # one bare result
    write_saved(home, "ann", ANN)
    write_saved(home, "train", TRAIN)
    write_saved(home, "future-bench", {"widgets_per_s": 12.5, "passed": True})  # no layout for it: generic table
    result = report.write(Settings().updated(home=home), out)
    page = (out / "results.md").read_text()
    assert result["benches"] == ["serve", "stream", "ann", "train", "future-bench"]
    for name in result["benches"]:
        assert f"## {name}" in page
    assert "No saved bench results" not in page
    # the latest serve run, its date and commit; the history is in the plot
    assert "commit `bbb2222`" in page and "2026-12-02 10:00 UTC" in page and "2 saved runs" in page
    assert "| (c) recommendations, HAProxy | 1,236 |" in page and "1.26" in page and "| 1.91 |" not in page
    assert "| worker / slower raw rate | 0.643 |" in page and "**fail**" in page  # stream's pass flag
    assert "| widgets_per_s | 12.5 |" in page
    assert sorted(result["plots"]) == sorted(str(out / f) for f in report.PLOTS.values())
    for file in report.PLOTS.values():
        assert f"]({file})" in page
        width, height = png_size(out / file)
        assert width >= 600 and height >= 300


def test_an_empty_folder_gives_a_page_that_says_which_benches_to_run(tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / report.PLOTS["serve"]).write_bytes(b"stale")
    result = report.write(Settings().updated(home=tmp_path / "home"), out)
    page = (out / "results.md").read_text()
    assert result == {"page": str(out / "results.md"), "plots": [], "benches": []}
    assert "No saved bench results yet" in page
    for command in bench_store.BENCHES.values():
        assert f"`{command}`" in page
    assert not list(out.glob("*.png"))  # a plot of runs that are gone is removed


def test_a_run_on_changed_tracked_files_is_marked_dirty(tmp_path):
    from lab.bench.store import git_commit
    assert git_commit(tmp_path) is None  # not a checkout
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=tmp_path,  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "one")
    clean = git_commit(tmp_path)
    (tmp_path / "new.py").write_text("untracked\n")  # untracked files are not the measured code
    assert clean and "+" not in clean and git_commit(tmp_path) == clean
    (tmp_path / "f.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == clean + "+dirty"
