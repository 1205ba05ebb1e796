"""``recsys bench new-items``: how well the content head serves items the model never saw,
against the same items after a full retrain.

A share of the catalogue's items (seeded) is held back: model *before* is trained on the events
without them, as if they were added after it; model *full* is retrained on every event. Both are
scored by protocol B on the same test targets of the whole log. The targets that are held-back
items are the figure of interest: *before* reaches them only through their catalogue entries
(``recsys.model.ContentTower``, as a replica serves a ``PUT /v1/items``), *full* knows them by id.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.errors import InvalidInput
from recsys.evaluation import metrics_from_ranks
from recsys.model import ModelConfig
from recsys.registry import Registry
from recsys.settings import Settings
from training.data import Prepared, load_table
from training.job import default_config, ensure_ray, train, version_ranks

DEFAULT_SOURCE = "synthetic:events=60000,users=1500,items=1000,clusters=10,categories=1"
PASS_RATIO = 0.5


def bench(settings: Settings, source: str = DEFAULT_SOURCE, new_share: float = 0.1, seed: int = 0,
          epochs: int | None = None, progress=print) -> dict:
    if not 0 < new_share < 1:
        raise InvalidInput(f"--new-share {new_share}: between 0 and 1")
    table, features, name = load_table(source, settings)
    if not features or not any(features.values()):
        raise InvalidInput(f"{source}: its items have no genres (synthetic needs categories=1; or movielens:DIR)")
    items = sorted(set(table.column("item_id").to_pylist()))
    new = set(np.random.default_rng(seed).choice(items, int(round(new_share * len(items))), replace=False).tolist())
    before = table.filter(pc.invert(pc.is_in(table.column("item_id"), pa.array(sorted(new)))))
    cfg = ModelConfig.from_dict(default_config())
    t0 = time.perf_counter()
    started = ensure_ray(1, False, settings.ray.worker_niceness, settings.home / "logs" / "ray-workers.log")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s = settings.updated(registry_dir=Path(tmp) / "models", home=Path(tmp))
            registry = Registry(s.registry_dir)

            def fit(data: pa.Table, item_features: dict) -> Path:
                prepared = Prepared(data, item_features, cfg, s.features.recent_items)
                card = train(data, settings=s, workers=1, epochs=epochs, promote=False, baselines={}, prepared=prepared)
                return registry.path(card["version"])
            progress(f"[new-items] training without {len(new)} of {len(items)} items ({before.num_rows} of {table.num_rows} events)")
            t = time.perf_counter()
            before_dir = fit(before, {i: g for i, g in features.items() if i not in new})
            before_s = time.perf_counter() - t
            progress("[new-items] retraining on every event")
            t = time.perf_counter()
            full_dir = fit(table, features)
            full_s = time.perf_counter() - t
            split, ranks = version_ranks([full_dir], table, s)
            (full_ranks,) = ranks.values()
            (content_ranks,) = version_ranks([before_dir], table, s, catalogue={i: features[i] for i in new})[1].values()
            (unknown_ranks,) = version_ranks([before_dir], table, s)[1].values()
    finally:
        if started:
            import ray
            ray.shutdown()
    is_new = np.isin(split.item_ids[split.test_items], sorted(new))
    figures = {
        "content_head": {"new_items": metrics_from_ranks(content_ranks[is_new]), "all": metrics_from_ranks(content_ranks)},
        "full_retrain": {"new_items": metrics_from_ranks(full_ranks[is_new]), "all": metrics_from_ranks(full_ranks)},
        "without_catalogue": {"new_items": metrics_from_ranks(unknown_ranks[is_new]), "all": metrics_from_ranks(unknown_ranks)},
    }
    full_hr50 = figures["full_retrain"]["new_items"]["hr@50"]
    ratio = figures["content_head"]["new_items"]["hr@50"] / full_hr50 if full_hr50 else None
    return {"bench": "new-items", "source": name, "items": len(items), "new_items": len(new),
            "test_targets": int(len(is_new)), "new_item_targets": int(is_new.sum()), "figures": figures,
            "content_vs_full_hr@50": round(ratio, 3) if ratio is not None else None,
            "train_s": {"before": round(before_s, 1), "full": round(full_s, 1)},
            "seconds": round(time.perf_counter() - t0, 1),
            "target": f"content head HR@50 on new items >= {PASS_RATIO} x the full retrain's",
            "passed": bool(is_new.sum() > 0 and ratio is not None and ratio >= PASS_RATIO)}
