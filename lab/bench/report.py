"""``recsys bench report``: the benches' saved results as the docs' results page and its plots.

The page and the plots are made from ``<home>/bench/*.json`` (``lab.bench.store``), never
copied by hand: ``render`` builds the Markdown from the saved runs (pure), the ``plot_*``
functions draw a PNG each, and ``write`` puts both in ``docs/benchmarks/``.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from lab.bench import store as bench_store
from recsys.settings import Settings

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
PAGE = "results.md"
PLOTS = {"serve": "serve-cpu-ms.png", "ann": "ann-p99.png"}  # bench -> its plot's file
ENDPOINTS = {"noop": "no-op", "recsys": "recommendations"}
INGRESSES = {"proxy": "Serve's Python proxy", "haproxy": "HAProxy", "uvicorn": "plain uvicorn"}


# ---- Markdown (pure) -------------------------------------------------------------------------

def fmt(value) -> str:
    """A figure as a table shows it: thousands separated, at most 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "**fail**"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(c) for c in row) + " |" for row in rows), ""]


def stamp(run: dict) -> str:
    try:
        when = datetime.fromisoformat(run["measured_at"]).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (KeyError, TypeError, ValueError):
        when = "unknown date"
    return f"{when}, commit `{run.get('commit') or 'unknown'}`"


def variant_label(key: str, variant: dict) -> str:
    endpoint = ENDPOINTS.get(variant.get("endpoint"), variant.get("endpoint"))
    return f"({key}) {endpoint}, {INGRESSES.get(variant.get('ingress'), variant.get('ingress'))}"


def serve_section(latest: dict) -> list[str]:
    variants = latest.get("variants", {})
    rows = [[variant_label(k, v), v.get("rps"), f"{fmt(v.get('p50_ms'))} / {fmt(v.get('p99_ms'))}", v.get("errors"),
             v.get("personal_share"), v.get("cpu_ms_per_request")] for k, v in sorted(variants.items())]
    out = table(["variant", "req/s", "p50 / p99 ms", "errors", "share from the model", "CPU-ms / request"], rows)
    ratios, targets, passed = latest.get("ratios", {}), latest.get("targets", {}), latest.get("passed", {})
    out += table(["ratio of (c)", "value", "target", "result"],
                 [[name, value, targets.get(name), passed.get(name)] for name, value in ratios.items()])
    out.append(f"Replicas {fmt(latest.get('replicas'))}, {fmt(latest.get('concurrency'))} closed-loop clients, "
               f"{fmt(latest.get('users'))} known users. All targets: {fmt(latest.get('pass'))}.")
    return out + [""]


def stream_section(latest: dict) -> list[str]:
    fresh = latest.get("freshness", {})
    rows = [["stream worker, Kafka to Redis (events/s)", latest.get("worker_events_per_s")],
            ["raw kafka-python consume (events/s)", latest.get("raw_kafka_consume_per_s")],
            ["raw pipelined Redis writes (events/s)", latest.get("raw_redis_apply_per_s")],
            ["worker / slower raw rate", latest.get("worker_vs_slower_raw")],
            [f"freshness p50 / p99 ms at {fmt(latest.get('freshness_at_rate'))} events/s",
             f"{fmt(fresh.get('p50_ms'))} / {fmt(fresh.get('p99_ms'))}"]]
    targets = ", ".join(f"{k} {v}" for k, v in latest.get("targets", {}).items())
    return table(["figure", "value"], rows) + [f"Targets: {targets or '-'}: {fmt(latest.get('passed'))}.", ""]


def ann_section(latest: dict) -> list[str]:
    rows = []
    for n, size in sorted(latest.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
        for kind, r in size.get("indexes", {}).items():
            param = " ".join(f"{k} {v}" for k, v in r.get("param", {}).items()) or "-"
            rows.append([int(n), kind, param, r.get("recall@10"), f"{fmt(r.get('p50_ms'))} / {fmt(r.get('p99_ms'))}",
                         r.get("p99_speedup_vs_exact"), r.get("build_s"), r.get("bytes_per_item")])
    out = table(["items", "index", "parameter", "recall@10", "p50 / p99 ms", "p99 speed-up vs exact", "build s",
                 "bytes/item"], rows)
    targets = {k: t for k, t in latest.get("targets", {}).items() if isinstance(t, dict)}
    items = latest.get("targets", {}).get("items")
    out += table([f"target at {fmt(items)} items", "result"], [[k, t.get("met")] for k, t in targets.items()])
    return out + [f"FAISS {latest.get('faiss', '-')}; all targets: {fmt(latest.get('passed'))}.", ""]


def train_section(latest: dict) -> list[str]:
    metrics = {"two_tower": latest.get("two_tower", {}), **latest.get("baselines", {})}
    rows = []
    for name, hr in latest.get("validation_and_test_hr@10", {}).items():
        m = metrics.get(name, {})
        rows.append([name, hr.get("validation"), hr.get("test", "skipped" if "skipped" in hr else None),
                     m.get("ndcg@10"), m.get("hr@50")])
    out = table(["model", "validation HR@10", "test HR@10", "test NDCG@10", "test HR@50"], rows)
    out += table(["figure", "value"], [
        ["two-tower / EASE, test HR@10", latest.get("two_tower_vs_ease_hr@10")],
        ["two-tower / recency-weighted EASE, test HR@10", latest.get("two_tower_vs_recency_ease_hr@10")],
        ["examples/s, 1 worker", latest.get("examples_per_s_1_worker")],
        ["examples/s, 2 workers", latest.get("examples_per_s_2_workers")],
        ["scaling efficiency rate(2) / (2 rate(1))", latest.get("scaling_efficiency")],
        ["training seconds, 2 workers", latest.get("training_seconds_2_workers")]])
    return out + [f"Source `{latest.get('source', '-')}`, protocol {latest.get('protocol', '-')}; no pass flag: "
                  "read the two-tower beside its baselines.", ""]


def redis_memory_section(latest: dict) -> list[str]:
    by_script = latest.get("redis_cpu_us_per_event_by_script") or {}
    by_part = latest.get("redis_cpu_us_per_request_by_part") or {}
    rows = [["bytes per user (mean)", latest.get("bytes_per_user")],
            ["bytes per item (mean)", latest.get("bytes_per_item")],
            ["bytes per event in the dedup window", latest.get("bytes_per_event_in_dedup_window")],
            ["Redis CPU µs per applied event", latest.get("redis_cpu_us_per_event")],
            *([f"  of which the {k} script", v] for k, v in by_script.items()),
            ["Redis CPU µs per recommendation's reads", latest.get("redis_cpu_us_per_request")],
            *([f"  of which {k.replace('_', ' ')}", v] for k, v in by_part.items()),
            ["Kafka record bytes (mean)", (latest.get("kafka_record_bytes") or {}).get("mean")]]
    return table(["figure", "value"], rows) + [
        f"{fmt(latest.get('events'))} events, {fmt(latest.get('users'))} users, {fmt(latest.get('items'))} items, "
        f"Redis {latest.get('redis_version', '-')}; no pass flag: these are per-unit figures for `recsys capacity`.", ""]


def reaction_section(latest: dict) -> list[str]:
    ms, load = latest.get("reaction_ms") or {}, latest.get("background") or {}
    rows = [[f"reaction {q}, ms", ms.get(q)] for q in ("p50", "p90", "p99", "max")]
    rows += [["users whose list changed", f"{fmt(latest.get('changed'))} of {fmt(latest.get('users'))}"],
             ["p99 budget, ms", latest.get("p99_budget_ms")], ["passed", latest.get("passed")]]
    return table(["figure", "value"], rows) + [
        f"Beside {fmt(load.get('shoppers'))} background shoppers at {fmt(load.get('rps'))} req/s (lists and clicks).", ""]


def generic_section(latest: dict) -> list[str]:
    """A bench this page has no layout for: its top-level figures."""
    rows = [[k, v] for k, v in latest.items()
            if k not in ("measured_at", "commit") and (v is None or isinstance(v, (bool, int, float, str)))]
    return table(["figure", "value"], rows)


def ordered(names) -> list[str]:
    """The known benches in their usual order, then any others by name."""
    return [n for n in bench_store.BENCHES if n in names] + sorted(set(names) - set(bench_store.BENCHES))


SECTIONS = {"serve": serve_section, "stream": stream_section, "ann": ann_section, "train": train_section,
            "redis-memory": redis_memory_section, "reaction": reaction_section}


def render(histories: dict[str, list[dict]]) -> str:
    """The results page for each bench's saved runs (oldest first); benches without runs left out."""
    lines = ["# Benchmark results", "",
             "Generated by `recsys bench report` from the saved results (`.recsys/bench/*.json`, under "
             "`RECSYS_HOME`); do not edit by hand. What each bench measures and why: "
             "[Benchmarks](index.md).", ""]
    found = {name: histories[name] for name in ordered(histories) if histories[name]}
    if not found:
        commands = "\n".join(f"- `{cmd}`" for cmd in bench_store.BENCHES.values())
        return "\n".join(lines + ["No saved bench results yet. Run the benches, then `recsys bench report`:", "",
                                  commands, ""])
    for name, runs in found.items():
        latest = runs[-1]
        command = bench_store.BENCHES.get(name, f"recsys bench {name}")
        lines += [f"## {name}", "", f"Latest run: {stamp(latest)} (`{command}`; {len(runs)} saved "
                                    f"run{'s' if len(runs) != 1 else ''}).", ""]
        lines += SECTIONS.get(name, generic_section)(latest)
        if name in PLOTS:
            lines += [f"![{name}]({PLOTS[name]})", ""]
    return "\n".join(lines)


# ---- plots (matplotlib) ----------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_serve(runs: list[dict], path: Path) -> None:
    """CPU-ms per request and req/s of each variant, one point per saved run, by commit."""
    plt = _pyplot()
    fig, (cpu, rps) = plt.subplots(1, 2, figsize=(11, 4.2))
    ticks = [f"{r.get('commit') or '?'}\n{str(r.get('measured_at') or '')[:10]}" for r in runs]
    labels = {}
    for r in runs:
        labels.update({k: variant_label(k, v) for k, v in r.get("variants", {}).items()})
    for key in sorted(labels):
        vs = [r.get("variants", {}).get(key, {}) for r in runs]
        for ax, field in ((cpu, "cpu_ms_per_request"), (rps, "rps")):
            ax.plot(range(len(runs)), [v.get(field, float("nan")) or float("nan") for v in vs], marker="o",
                    label=labels[key])
    cpu.set(title="CPU-ms per request (lower is better)", ylabel="CPU-ms of the serving path")
    rps.set(title="Throughput (higher is better)", ylabel="req/s")
    for ax in (cpu, rps):
        ax.set_xticks(range(len(runs)), ticks, fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    cpu.legend(fontsize=8)
    fig.suptitle("recsys bench serve, by run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ann(latest: dict, path: Path) -> None:
    """Single-query p99 by catalogue size for each index kind (log-log), from the latest run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted(latest.get("sizes", {}), key=int)
    kinds = dict.fromkeys(k for n in sizes for k in latest["sizes"][n].get("indexes", {}))
    for kind in kinds:
        points = [(int(n), latest["sizes"][n]["indexes"][kind]["p99_ms"]) for n in sizes
                  if "p99_ms" in latest["sizes"][n]["indexes"].get(kind, {})]
        if points:
            ax.plot(*zip(*points), marker="o", label=kind)
    ax.set(xscale="log", yscale="log", xlabel="items in the index", ylabel="p99 ms, one query on one thread",
           title=f"recsys bench ann: single-query p99 ({stamp(latest).replace('`', '')})")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- I/O -------------------------------------------------------------------------------------

def write(settings: Settings, out: Path = DEFAULT_OUT) -> dict:
    """Write ``results.md`` and the plots into ``out``; a plot whose bench has no runs is removed."""
    histories = {name: bench_store.history(settings, name) for name in bench_store.saved_names(settings)}
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, file in PLOTS.items():
        target, runs = out / file, histories.get(name)
        if not runs:
            target.unlink(missing_ok=True)
            continue
        if name == "serve":
            plot_serve(runs, target)
        else:
            plot_ann(runs[-1], target)
        plots.append(str(target))
    page = out / PAGE
    page.write_text(render(histories))
    return {"page": str(page), "plots": plots, "benches": [n for n in ordered(histories) if histories[n]]}
