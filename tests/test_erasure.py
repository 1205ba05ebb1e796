"""Issue 35, finding 3: a forgotten user stays forgotten. Events of the user that come after the
forget (still in Kafka, replayed after a lost commit, behind a lagging archiver or online
consumer, timed after the forget within the clock skew the API accepts) bring nothing of the
user back: not in Redis, the archive's files, its readers' output or the online state. And a
purge in flight survives an archiver's recovery."""
from __future__ import annotations

import threading
import time
import zlib

import pyarrow.parquet as pq
from kafka import KafkaProducer

from recsys import archive
from recsys.archive import Archive, read_events, run_archiver, write_events
from recsys.attribution import OnlineConsumer, OnlineKeys
from recsys.erasure import forget_user
from recsys.events import Event
from recsys.feature_store import FeatureStore
from recsys.impressions import Impression
from recsys.kafka_io import connection
from recsys.privacy import Pseudonyms
from recsys.rebuild import rebuild_features
from recsys.stream import run_stream


def _events(user: str, n: int, start_ms: int, tag: str, type_: str = "view") -> list[Event]:
    return [Event(event_id=f"{tag}-{user}-{k}", user_id=user, item_id=f"i{k % 7}", type=type_, ts=start_ms + k)
            for k in range(n)]


def _produce(settings, events: list[Event], impressions: tuple[Impression, ...] = ()) -> None:
    prod = KafkaProducer(**connection(settings), acks="all")
    for e in events:
        prod.send(settings.kafka.events_topic, key=e.user_id.encode(), value=e.to_bytes())
    for i in impressions:
        prod.send(settings.kafka.impressions_topic, key=i.user_id.encode(), value=i.to_bytes(), timestamp_ms=i.ts)
    prod.flush()
    prod.close()


def _keys_of(settings, user: str) -> list[str]:
    """Every Redis key of this scratch space that names the user, its tombstone aside."""
    tombstone = f"{settings.redis.prefix}:forgotten:"
    return sorted(k for k in FeatureStore(settings).redis.scan_iter(match=f"{settings.redis.prefix}:*", count=1000)
                  if user in k and not k.startswith(tombstone))


def _archived_users(settings) -> list[str]:
    """The user of every row in the archive's files, as stored (no reader's filter)."""
    return [u for f in archive.event_files(settings.archive_dir) for u in pq.read_table(f)["user_id"].to_pylist()]


def test_events_still_in_kafka_or_replayed_after_a_forget_bring_nothing_back(scratch):
    s = scratch.settings
    gone, kept = (Pseudonyms.of(s).user_id(raw) for raw in ("gone", "kept"))
    now = int(time.time() * 1000)
    bought = _events(gone, 1, now - 50_000, "p", "purchase")  # its own seen set too (issue 34)
    _produce(s, _events(gone, 5, now - 60_000, "a") + bought + _events(kept, 5, now - 60_000, "a"))
    run_stream(s, until_idle=2)
    assert FeatureStore(s).user(gone).counts == {"view": 5, "purchase": 1}
    assert FeatureStore(s).keys.user(gone, "seen_at:purchase") in _keys_of(s, gone)
    forget_user(s, "gone")
    assert _keys_of(s, gone) == []
    # Still in Kafka (sent before the forget, consumed after), one timed 200 s ahead (the API
    # accepts 300 s of skew): none of them is the user's way back.
    after = _events(gone, 5, now - 30_000, "b") + _events(gone, 1, now + 200_000, "c") + _events(kept, 5, now - 30_000, "b")
    _produce(s, after)
    stats = run_stream(s, until_idle=2)
    assert stats["applied"] == 5 and _keys_of(s, gone) == []
    # A commit lost: the whole topic again, in a new group.
    again = s.updated(kafka={"stream_group": s.kafka.stream_group + "-again"})
    assert run_stream(again, until_idle=2)["applied"] == 0 and _keys_of(s, gone) == []
    # A rebuild clears the prefix, and the stream goes on after the (here empty) archive: the
    # tombstones come back from the archive's.
    rebuild_features(s, progress=lambda *_: None)
    assert run_stream(s, until_idle=2)["applied"] == 10 and _keys_of(s, gone) == []
    store = FeatureStore(s)
    assert store.user(kept).counts == {"view": 10} and len(store.user(kept).recent) == 10


def test_the_archiver_writes_no_lagging_event_of_a_forgotten_user(scratch):
    s = scratch.settings
    gone, kept = (Pseudonyms.of(s).user_id(raw) for raw in ("gone", "kept"))
    now = int(time.time() * 1000)
    _produce(s, _events(gone, 6, now - 60_000, "a") + _events(gone, 1, now + 200_000, "c") + _events(kept, 6, now, "a"))
    forget_user(s, "gone")  # the archiver lags: the events are all still in Kafka
    assert run_archiver(s, until_idle=2)["consumed"] == 13
    assert sorted(set(_archived_users(s))) == [kept] and len(_archived_users(s)) == 6


def test_a_user_forgotten_while_the_archiver_writes_is_purged_from_what_it_wrote(scratch, monkeypatch):
    """The forget comes between the flush's read of the tombstones and its files: its purge
    skipped them (past the ledger then), so the archiver purges them itself."""
    s = scratch.settings
    gone, kept = (Pseudonyms.of(s).user_id(raw) for raw in ("gone", "kept"))
    now = int(time.time() * 1000)
    _produce(s, _events(gone, 6, now - 60_000, "a") + _events(kept, 6, now, "a"))
    forget_user(s, "gone")
    real, calls = archive.tombstones, []

    def late(root):  # the flush's first read: from before the forget
        calls.append(root)
        return {} if len(calls) == 1 else real(root)
    monkeypatch.setattr(archive, "tombstones", late)
    run_archiver(s, until_idle=2)
    assert len(calls) >= 2 and sorted(set(_archived_users(s))) == [kept]


def test_events_timed_within_the_skew_after_the_forget_leave_the_archive_and_its_readers(scratch):
    s = scratch.settings
    gone, kept = (Pseudonyms.of(s).user_id(raw) for raw in ("gone", "kept"))
    now = int(time.time() * 1000)
    # Archived before the forget: accepted by the API with a client clock up to 300 s ahead.
    write_events(s.archive_dir, _events(gone, 4, now - 60_000, "a") + _events(gone, 2, now + 250_000, "c")
                 + _events(kept, 4, now + 250_000, "a"))
    out = forget_user(s, "gone")
    assert out["archive_rows_removed"] == 6
    assert sorted(set(_archived_users(s))) == [kept]
    assert sorted(set(read_events(s)["user_id"].to_pylist())) == [kept]


def test_the_online_consumer_keeps_nothing_of_a_forgotten_user(scratch):
    s = scratch.settings
    gone, kept = (Pseudonyms.of(s).user_id(raw) for raw in ("gone", "kept"))
    forget_user(s, "gone")
    now = int(time.time() * 1000)
    shown = (Impression("r-gone", gone, "v1", "current", ("i1", "i2"), now - 1000),
             Impression("r-kept", kept, "v1", "current", ("i1", "i2"), now - 1000))
    _produce(s, _events(gone, 1, now, "x", "click") + _events(kept, 1, now, "x", "click"), shown)
    OnlineConsumer(s).run(until_idle=2)
    online = OnlineKeys(s.redis.prefix)
    redis_ = FeatureStore(s).redis
    assert redis_.exists(online.shown(gone), online.attributed(gone)) == 0 and _keys_of(s, gone) == []
    assert redis_.exists(online.shown(kept), online.attributed(kept)) == 2
    assert redis_.hget(online.arm("v1|current"), "impressions") == "1"


def test_recovery_leaves_a_purge_in_flight_and_other_members_files_alone(tmp_path, monkeypatch):
    """An archiver that takes partitions over deletes its own crashed batches only: not the
    file a purge is writing, nor a batch another member is writing."""
    root = tmp_path / "archive"
    write_events(root, _events("gone", 5, 1_700_000_000_000, "a") + _events("kept", 5, 1_700_000_000_000, "a"),
                 partitions=2)
    other = 1 - zlib.crc32(b"gone") % 2
    day = next(root.glob("day=*"))
    in_flight = day / f".p{other}-000000000099-000000000100.parquet.tmp"  # another member's batch
    in_flight.write_bytes(b"being written")
    stop_at, go_on, result = threading.Event(), threading.Event(), []
    real = pq.write_table

    def held(table, where, *args, **kw):  # the purge's file written, not yet renamed
        real(table, where, *args, **kw)
        if threading.current_thread().name == "purge":
            stop_at.set()
            go_on.wait(30)
    monkeypatch.setattr(pq, "write_table", held)

    def purge():
        try:
            result.append(archive.purge_user(root, "gone", 1_800_000_000_000))
        except Exception as exc:  # noqa: BLE001 (the test reports it)
            result.append(exc)
    worker = threading.Thread(target=purge, name="purge")
    worker.start()
    try:
        assert stop_at.wait(30)
        Archive(root).recover(1 - other)  # the partition whose file the purge rewrites
        assert in_flight.exists()
    finally:
        go_on.set()
        worker.join(30)
    assert result == [(1, 5)]
    Archive(root).recover(other)
    assert not in_flight.exists()  # its own crashed batch goes
    users = {u for f in archive.event_files(root) for u in pq.read_table(f)["user_id"].to_pylist()}
    assert users == {"kept"}
