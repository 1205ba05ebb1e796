"""``recsys users forget ID``: a user's data out of every store the project keeps.

In order: a tombstone in the archive (from then on every archive reader, the feature
rebuild and the next training leave the user's events out, and the archiver writes none of
them), the same tombstone in Redis with the user's online keys deleted (from then on the
stream worker's and the online consumer's scripts write nothing of the user's events), the
archive files rewritten without the user's rows. The user leaves the model's vocabulary at
the next retrain; until then the versions that still hold the pseudonym are listed. Kafka
keeps the pseudonymous events and impressions until the topics' retention deletes them.

Which events are the user's "up to the forget"? Events come late (still in Kafka, a lagging
consumer, a replay after a lost commit), so arrival is no rule; and the archive keeps no
arrival time. The rule is the event's own time: the tombstone holds the forget time plus
``features.max_clock_skew_s``, and every event of the user with a time up to that is left
out. The API refuses times past its now plus that skew, so every event accepted before the
forget is covered, however late it is delivered. The price: events of a user who comes
back within the skew (5 minutes by default) are left out too.
"""
from __future__ import annotations

import time

import numpy as np

from recsys.archive import purge_user, write_tombstone
from recsys.attribution import OnlineKeys
from recsys.feature_store import FeatureStore
from recsys.features import USER_PARTS
from recsys.privacy import Pseudonyms
from recsys.registry import Registry
from recsys.settings import Settings


def versions_holding(settings: Settings, user: str) -> list[str]:
    registry = Registry(settings.registry_dir)
    return [v for v in registry.list() if user in set(np.load(registry.path(v) / "user_ids.npy").tolist())]


def forget_online(settings: Settings, user: str, until_ms: int) -> int:
    """Set the user's tombstone (``until_ms``), then delete every other Redis key of the user's
    hash-tag group ``{u:<user>}``: the features, the applied offsets, refused positions, the
    events' dedup markers (named by the user) and the online metrics' impressions and verdicts.
    Returns how many keys went. The markers are found by SCAN over the prefix (on every node of
    a cluster): a pass over the keyspace per erasure."""
    store, online = FeatureStore(settings), OnlineKeys(settings.redis.prefix)
    store.mark_forgotten({user: until_ms})  # first: no script writes the user's keys again
    # "seen": the unbounded SET that ``seen_at`` replaced (issue 35), on a store not rebuilt since.
    keys = [store.keys.user(user, part) for part in (*USER_PARTS, "seen")]
    keys += [store.keys.user_refused(user), online.shown(user), online.attributed(user)]
    keys += list(store.redis.scan_iter(match=store.keys.dedup(user, "*"), count=1000))  # braces: literal in a glob
    # One hash tag: one slot, so one DEL per thousand keys even on a cluster.
    return sum(store.redis.delete(*keys[i:i + 1000]) for i in range(0, len(keys), 1000))


def forget_user(settings: Settings, raw_user_id: str) -> dict:
    user = Pseudonyms.of(settings).user_id(raw_user_id)
    at_ms = int(time.time() * 1000)
    until_ms = at_ms + int(settings.features.max_clock_skew_s * 1000)
    write_tombstone(settings.archive_dir, user, until_ms)
    deleted = forget_online(settings, user, until_ms)
    files, rows = purge_user(settings.archive_dir, user, until_ms)
    return {"pseudonym": user, "forgotten_at_ms": at_ms, "events_until_ms": until_ms, "redis_keys_deleted": deleted,
            "archive_files_rewritten": files, "archive_rows_removed": rows,
            "model_versions_holding_user": versions_holding(settings, user)}
