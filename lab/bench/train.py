"""``recsys bench train`` and ``recsys bench gate`` (mounted by cli.main): the two-tower model on
MovieLens-100K beside the baselines, and the retraining gate per seed."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.cli import fail, known_errors, progress


def bench_train(args) -> int:
    """On MovieLens-100K: quality beside the baselines (every setting chosen on validation, test
    scored once), 1 vs 2 worker throughput, ANN vs exact."""
    import os
    import shutil
    import tempfile

    import numpy as np

    from recsys import evaluation
    from recsys.model import ModelConfig
    from recsys.settings import get_settings
    from training.data import Prepared, load_table
    from training.job import TUNING_GRID, default_config, train
    settings = get_settings()
    source = getattr(args, "source", None) or f"movielens:{default_ml100k()}"
    epochs = getattr(args, "epochs", None) or 5
    speed_epochs = getattr(args, "speed_epochs", None) or 3
    try:
        table, item_features, _ = load_table(source, settings)
        cfg = ModelConfig.from_dict(default_config() | {"history": max(TUNING_GRID["history"])})
        prep = Prepared(table, item_features, cfg, settings.features.recent_items)
        base = evaluation.baselines(prep.split)
        with tempfile.TemporaryDirectory() as tmp:
            s = settings.updated(registry_dir=Path(tmp) / "models", home=Path(tmp))
            t = time.perf_counter()
            card2 = train(source, workers=2, epochs=epochs, settings=s, prepared=prep, baselines=base,
                          tune_grid=TUNING_GRID, progress=progress)
            quality_s = time.perf_counter() - t
            # Throughput: short runs back to back (1, 2, 1 workers), same data, same per-worker batch;
            # the machine is shared, so the load average is reported beside the rates.
            load_before = os.getloadavg()[0]
            speed = {}
            fixed = s.updated(training={"seen_policy": "all"})  # no validation-stage training between the runs
            for w in (1, 2, 1):
                c = train(source, workers=w, epochs=speed_epochs, settings=fixed, prepared=prep, baselines=base,
                          publish=False)
                shutil.rmtree(c["training"]["checkpoint_dir"], ignore_errors=True)
                speed.setdefault(w, []).append(c["training"]["examples_per_s"])
            load_after = os.getloadavg()[0]
    except known_errors() as exc:
        return fail("bench train", exc)
    r1, r2 = float(np.median(speed[1])), float(np.median(speed[2]))
    out = {
        "source": source,
        "protocol": card2["data_window"]["protocol"],
        "validation_and_test_hr@10": {name: ({"validation": m["validation"]["hr@10"], "test": m["hr@10"]}
                                             if "skipped" not in m else m) for name, m in card2["metrics"].items()},
        "two_tower": card2["metrics"]["two_tower"],
        "two_tower_tuning": card2["tuning"],
        "seen_policy": card2["seen_policy"],  # chosen on protocol R's validation targets
        "baselines": {k: card2["metrics"][k] for k in ("popularity", "itemknn", "ease", "recency_ease", "session_knn")},
        **{f"two_tower_vs_{name}_hr@10": round(card2["metrics"]["two_tower"]["hr@10"] / base[name]["hr@10"], 3)
           if "hr@10" in base[name] else None for name in ("ease", "recency_ease", "session_knn")},
        "epochs": epochs, "workers": 2,
        "training_seconds_2_workers": round(quality_s, 1),
        "examples_per_s_1_worker": round(r1, 1), "examples_per_s_2_workers": round(r2, 1),
        "examples_per_s_runs": {str(k): v for k, v in speed.items()},
        "scaling_efficiency": round(r2 / (2 * r1), 3) if r1 else None,
        "cpus": os.cpu_count(), "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "ann": card2["ann"],  # its search parameter chosen on half of the test users' queries, recall on the other half's
        "compression": card2["compression"],  # catalogue-scale indexes: `recsys bench ann`
        "items": card2["ann"].get("items"),  # the catalogue behind the rates (they fall as it grows)
    }
    from lab.bench import store as bench_store
    print(f"saved {bench_store.save(settings, 'train', out)}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps(out, default=str))
    else:
        print(json.dumps(out, indent=1, default=str))
    return 0


def bench_gate(args) -> int:
    """The retraining gate at its default settings, per seed (data and model): a candidate trained
    on the same data as the current model must be published, one trained on shuffled item ids
    rejected. Prints the intervals and one ``passed`` flag."""
    import dataclasses
    import tempfile

    from recsys.registry import Registry
    from recsys.settings import get_settings
    from recsys.sources import SyntheticSource, open_source
    from recsys.training_data import events_table, with_shuffled_items
    from training.job import ensure_ray, train
    from training.scheduler import judge
    settings = get_settings()
    rows, t0 = [], time.perf_counter()
    try:
        src = open_source(args.source)
        if not isinstance(src, SyntheticSource):
            raise ValueError("bench gate: --source must be synthetic[:...] (each seed draws its own data)")
        started = ensure_ray(1, False, settings.ray.worker_niceness, settings.home / "logs" / "ray-workers.log")
        try:
            for seed in range(args.seeds):
                table = events_table(dataclasses.replace(src, seed=seed).events_iter())
                shuffled = with_shuffled_items(table, seed)
                with tempfile.TemporaryDirectory() as tmp:
                    s = settings.updated(registry_dir=Path(tmp) / "models", home=Path(tmp))
                    registry = Registry(s.registry_dir)

                    def fit(data, model_seed, promote=False):
                        return train(data, settings=s, workers=1, epochs=args.epochs, promote=promote,
                                     model_config={"seed": model_seed}, baselines={})["version"]
                    current = fit(table, seed, promote=True)
                    same, bad = fit(table, seed + 1000), fit(shuffled, seed + 2000)
                    row = {"seed": seed}
                    for name, version in (("same_data", same), ("shuffled_items", bad)):
                        v = judge(s, registry, version, current, table)
                        row[name] = {"decision": "published" if v["passed"] else "rejected",
                                     "candidate_hr@10": v["candidate"]["hr@10"], "current_hr@10": v["current"]["hr@10"],
                                     "interval": [v["interval"].get("low"), v["interval"].get("high")],
                                     "reason": v["reason"]}
                    row["popularity_hr@10"] = v["popularity_hr10"]
                rows.append(row)
                progress(json.dumps(row))
        finally:
            if started:
                import ray
                ray.shutdown()
    except known_errors() as exc:
        return fail("bench gate", exc)
    passed = all(r["same_data"]["decision"] == "published" and r["shuffled_items"]["decision"] == "rejected"
                 for r in rows)
    print(json.dumps({"source": args.source, "seeds": args.seeds, "epochs": args.epochs,
                      "gate_margin": settings.retraining.gate_margin, "gate_resamples": settings.retraining.gate_resamples,
                      "runs": rows, "seconds": round(time.perf_counter() - t0, 1), "passed": passed}))
    return 0 if passed else 1


def add_bench_gate_options(b: argparse.ArgumentParser) -> None:
    b.add_argument("--source", default="synthetic", help="synthetic[:events=...,users=...] (the seed varies)")
    b.add_argument("--seeds", type=int, default=5)
    b.add_argument("--epochs", type=int, default=None, help="default: the model config's")
    b.set_defaults(func=bench_gate)


def default_ml100k() -> str:
    import os
    env = os.environ.get("RECSYS_ML100K")
    if env:
        return env
    here = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"
    return str(here)


def add_bench_train_options(b: argparse.ArgumentParser) -> None:
    b.add_argument("--source", default=None, help="default: movielens:<shared ml-100k>")
    b.add_argument("--epochs", type=int, default=5, help="epochs of the 2-worker quality run")
    b.add_argument("--speed-epochs", type=int, default=3, help="epochs of the 1-worker throughput run")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=bench_train)
