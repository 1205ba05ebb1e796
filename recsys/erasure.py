"""``recsys users forget ID``: a user's data out of every store the project keeps.

In order: a tombstone in the archive (from then on every archive reader, the feature
rebuild and the next training leave the user's events out, even ones archived later from
Kafka), the archive files rewritten without the user's rows, the user's online features
deleted. The user leaves the model's vocabulary at the next retrain; until then the
versions that still hold the pseudonym are listed. Kafka keeps the pseudonymous events
until the topic's retention deletes them.
"""
from __future__ import annotations

import time

import numpy as np

from recsys.archive import purge_user, write_tombstone
from recsys.feature_store import FeatureStore
from recsys.features import USER_PARTS
from recsys.privacy import Pseudonyms
from recsys.registry import Registry
from recsys.settings import Settings


def versions_holding(settings: Settings, user: str) -> list[str]:
    registry = Registry(settings.registry_dir)
    return [v for v in registry.list() if user in set(np.load(registry.path(v) / "user_ids.npy").tolist())]


def forget_user(settings: Settings, raw_user_id: str) -> dict:
    user = Pseudonyms.of(settings).user_id(raw_user_id)
    at_ms = int(time.time() * 1000)
    write_tombstone(settings.archive_dir, user, at_ms)
    files, rows = purge_user(settings.archive_dir, user, at_ms)
    store = FeatureStore(settings)
    deleted = store.redis.delete(*(store.keys.user(user, part) for part in USER_PARTS))
    return {"pseudonym": user, "forgotten_at_ms": at_ms, "redis_keys_deleted": deleted,
            "archive_files_rewritten": files, "archive_rows_removed": rows,
            "model_versions_holding_user": versions_holding(settings, user)}
