"""``recsys bench compression``: what int8 and fp16 towers and indexes, and a distilled student,
cost in quality, and what they save in bytes and serving time.

For each source (MovieLens-100K, protocol A; the synthetic stream, protocol B) it trains a teacher
(dim 128), the default model (dim 64), a student (dim 32) and the same student distilled from the
teacher, all on the same prepared data, then serves each at fp32, fp16 and int8 (the user tower's
tables and matrices, and the item codes of the index) exactly as a replica would. Every figure is
measured on the test targets (EVALUATION.md) with the served model: the user tower as stored, the
items scored from the index's codes. Stage times are one user and one query at a time on one
thread, as a request runs them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from recsys import user_input
from recsys.ann import exact_search, precision_of, recall_vs_exact
from recsys.model import ModelConfig, NumpyUserTower, compress_tower
from recsys.settings import Settings
from recsys.user_input import USER

MODELS = {"teacher": {"dim": 128}, "default": {}, "student": {"dim": 32}, "distilled": {"dim": 32}}
PRECISIONS = ("fp32", "fp16", "int8")
CANDIDATES = 40  # what a request asks of the index: candidates_per_k (4) * k (10), before the seen-filter


def _stage_us(fn: Callable[[int], object], n: int) -> dict:
    fn(0)  # warm
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter_ns()
        fn(i)
        out[i] = time.perf_counter_ns() - t
    return {"p50_us": round(float(np.percentile(out, 50)) / 1e3, 1),
            "p99_us": round(float(np.percentile(out, 99)) / 1e3, 1)}


def top10_overlap(served: np.ndarray, fp32_users: np.ndarray, fp32_items: np.ndarray) -> float:
    """Mean share of the fp32 model's exact top 10 that the served lists (``served``: ids) hold."""
    return recall_vs_exact(served[:, :10], exact_search(fp32_users, fp32_items, 10)[0])


def measure_served(prep, weights: dict, cfg: ModelConfig, item_emb: np.ndarray, fp32: dict, settings: Settings,
                   precision: str, timed_users: int = 300) -> dict:
    """One trained model served at ``precision`` (tower and items): quality, bytes, stage times."""
    import faiss

    from training.job import served_artifact
    ts = settings.training.model_copy(update={"tower_precision": precision, "item_precision": precision})
    metrics, index, compression = served_artifact(prep, weights, cfg, item_emb, fp32, ts)
    tower_weights = compress_tower(weights, precision)
    tower = NumpyUserTower(tower_weights, prep.vocab, user_input.schema(cfg.history))
    t = prep.targets
    n = min(timed_users, len(t[USER]))
    queries = tower.embed_encoded({k: v[:n] for k, v in t.items()})
    fp32_users = NumpyUserTower(weights, prep.vocab, tower.schema).embed_encoded({k: v[:n] for k, v in t.items()})
    overlap = top10_overlap(index.search(queries, 10)[0], fp32_users, item_emb)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        tower_us = _stage_us(lambda i: tower.embed_encoded({k: v[i:i + 1] for k, v in t.items()}), n)
        ann_us = _stage_us(lambda i: index.search(queries[i:i + 1], CANDIDATES), n)
    finally:
        faiss.omp_set_num_threads(threads)
    return {"precision": precision, "index": index.kind, "items_codes": precision_of(index.kind),
            "hr@10": metrics["hr@10"], "ndcg@10": metrics["ndcg@10"],
            "hr@10_relative_change_vs_own_fp32": compression["hr@10_relative_change"],
            "ann_recall@10": index.meta["recall@10"], "top10_overlap_vs_fp32": round(overlap, 4),
            "tower_bytes": int(sum(a.nbytes for a in tower_weights.values())), "index_bytes": index.nbytes,
            "user_tower_stage": tower_us, "ann_stage": ann_us}


def bench_source(source: str, settings: Settings, workers: int = 2, epochs: int | None = None,
                 progress: Callable[[str], None] = lambda line: None) -> dict:
    """Every model of ``MODELS`` trained on ``source`` and served at every precision."""
    from training.data import Prepared, load_table
    from training.job import default_config, evaluate_weights, load_serving_weights, train
    table, item_features, _ = load_table(source, settings)
    base_cfg = ModelConfig.from_dict(default_config())
    prepared = Prepared(table, item_features, base_cfg, settings.features.recent_items)
    rows, teacher_dir = {}, None
    with tempfile.TemporaryDirectory(prefix="recsys-compression-") as tmp:
        s = settings.updated(registry_dir=Path(tmp) / "models", home=Path(tmp))
        for name, overrides in MODELS.items():
            progress(f"{source}: training {name} {overrides or '(the default config)'}")
            t0 = time.perf_counter()
            card = train(source, settings=s, workers=workers, epochs=epochs, model_config=overrides, prepared=prepared,
                         publish=False, baselines={}, teacher=teacher_dir if name == "distilled" else None)
            ckpt = Path(card["training"]["checkpoint_dir"])
            weights = load_serving_weights(ckpt)
            cfg = ModelConfig.from_dict(card["config"])
            prep = prepared.at("test").with_history(cfg.history)
            fp32, _, item_emb = evaluate_weights(prep, weights, cfg)
            if name == "teacher":  # the distilled student's teacher: published, as distillation reads it
                teacher_dir = _publish(s, prepared, weights, cfg, card)
            rows[name] = {"dim": cfg.dim, "training_s": round(time.perf_counter() - t0, 1),
                          **({"distillation": card["distillation"]} if "distillation" in card else {}),
                          "served": {p: measure_served(prep, weights, cfg, item_emb, fp32, s, p) for p in PRECISIONS}}
            for p, r in rows[name]["served"].items():
                progress(f"{source}: {name:<9} {p}: HR@10 {r['hr@10']:.4f} NDCG@10 {r['ndcg@10']:.4f} "
                         f"top-10 overlap {r['top10_overlap_vs_fp32']:.3f} tower {r['tower_bytes'] / 1e6:.2f} MB index {r['index_bytes'] / 1e6:.2f} MB "
                         f"tower {r['user_tower_stage']['p50_us']} us ann {r['ann_stage']['p50_us']} us")
            shutil.rmtree(ckpt, ignore_errors=True)
    ref = rows["default"]["served"]["fp32"]["hr@10"]
    for row in rows.values():
        for r in row["served"].values():
            r["hr@10_relative_change_vs_default_fp32"] = round(r["hr@10"] / ref - 1, 4) if ref else None
    return {"source": source, "protocol": prepared.split.protocol, "models": rows}


def _publish(settings: Settings, prepared, weights: dict, cfg: ModelConfig, card: dict) -> Path:
    """The teacher as a registry version (fp32, exact index), the form distillation reads."""
    import json

    from recsys.ann import new_index
    from recsys.model import export
    from recsys.registry import CARD, Registry, file_sums

    def write(folder: Path, version: str) -> None:
        export(folder, weights, prepared.vocab, cfg)
        new_index("flat", np.load(folder / "item_embeddings.npy")).save(folder / "ann")
        (folder / CARD).write_text(json.dumps({"version": version, "config": card["config"],
                                               "files": file_sums(folder)}))
    registry = Registry(settings.registry_dir)
    return registry.path(registry.publish(write, promote=False))


def bench(sources: list[str], settings: Settings, workers: int = 2, epochs: int | None = None,
          max_int8_loss: float = 0.01, progress: Callable[[str], None] = lambda line: None) -> dict:
    """The table for every source, and the issue's target: int8 (tower and items) loses at most
    ``max_int8_loss`` of the default model's fp32 HR@10, relatively, on every source."""
    t0, load = time.perf_counter(), os.getloadavg()[0]
    results = [bench_source(src, settings, workers, epochs, progress) for src in sources]
    losses = {r["source"]: -r["models"]["default"]["served"]["int8"]["hr@10_relative_change_vs_own_fp32"]
              for r in results}
    return {"sources": results, "int8_relative_hr@10_loss": losses, "max_int8_loss": max_int8_loss,
            "passed": all(v <= max_int8_loss for v in losses.values()),
            "cpus": os.cpu_count(), "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
            "seconds": round(time.perf_counter() - t0, 1)}


def format_table(result: dict) -> str:
    lines = ["| source | model | dim | served at | HR@10 | NDCG@10 | HR@10 vs default fp32 | top-10 overlap vs own fp32 "
             "| tower MB | index MB | user tower p50 / p99 us | ANN p50 / p99 us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for src in result["sources"]:
        for name, row in src["models"].items():
            for p, r in row["served"].items():
                lines.append(f"| {src['source'].split(':')[0]} ({src['protocol']}) | {name} | {row['dim']} | {p} "
                             f"({r['index']}) | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | "
                             f"{r['hr@10_relative_change_vs_default_fp32']:+.1%} | {r['top10_overlap_vs_fp32']:.3f} | "
                             f"{r['tower_bytes'] / 1e6:.2f} | "
                             f"{r['index_bytes'] / 1e6:.2f} | {r['user_tower_stage']['p50_us']:.0f} / "
                             f"{r['user_tower_stage']['p99_us']:.0f} | {r['ann_stage']['p50_us']:.0f} / "
                             f"{r['ann_stage']['p99_us']:.0f} |")
    return "\n".join(lines)
