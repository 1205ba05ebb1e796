"""The event archive: an append-only Parquet log, partitioned by event day, for training.

Exactly once without transactions: each file's name carries the Kafka partition and
the offset range it holds, and a small ledger per partition records the last offset
whose file is in place. On start the archiver deletes files past the ledger (left by
a crash between rename and ledger write) and seeks each partition to ledger + 1, so
the Kafka consumer group's committed offsets are only a progress report.

Layout: ``archive/day=YYYY-MM-DD/p{partition}-{first:012d}-{last:012d}.parquet`` and
``archive/_ledger/p{partition}``. A forgotten user (``recsys users forget``) has a tombstone,
``archive/_tombstones/{user}`` holding a time (ms: when it was made plus the event times' clock
skew, ``recsys.erasure``): readers leave out the user's events up to that time, and the
archiver does not write them (events of the user still in Kafka when the purge ran).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
import zlib
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from kafka import ConsumerRebalanceListener
from kafka.errors import KafkaError

from recsys import kafka_io, metrics
from recsys.events import BadEvent, Event, EventTimeBounds, parse_event
from recsys.settings import Settings

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
                    ("type", pa.string()), ("value", pa.float64()), ("ts", pa.int64())])
# On disk each row also keeps its Kafka offset (files written before it have none): the order in
# which a feature rebuild applies a partition's events, exactly as the stream worker did.
FILE_SCHEMA = SCHEMA.append(pa.field("offset", pa.int64()))
_FILE = re.compile(r"p(\d+)-(\d+)-(\d+)\.parquet$")


def events_table(events: list[Event]) -> pa.Table:
    return pa.table({"event_id": [e.event_id for e in events], "user_id": [e.user_id for e in events],
                     "item_id": [e.item_id for e in events], "type": [e.type.value for e in events],
                     "value": [e.value for e in events], "ts": [e.ts for e in events]}, schema=SCHEMA)


def day_of(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


def _atomic_write(path: Path, write, tmp_suffix: str = ".tmp") -> None:
    tmp = path.with_name(f".{path.name}{tmp_suffix}")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Archive:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.ledger_dir = self.root / "_ledger"
        self.ledger_dir.mkdir(parents=True, exist_ok=True)

    def last_offset(self, partition: int) -> int:
        """The last offset archived for a partition, -1 for none."""
        path = self.ledger_dir / f"p{partition}"
        return int(path.read_text()) if path.exists() else -1

    def recover(self, partition: int) -> int:
        """Delete this partition's files past the ledger and its unfinished files (a crashed
        batch); return the offset to resume at. Other partitions' unfinished files (another
        member's batch) and a purge's (``purge_user``, in flight) are not this one's to delete."""
        last = self.last_offset(partition)
        for f in self.root.glob(f"day=*/p{partition}-*.parquet"):
            m = _FILE.search(f.name)
            if m and int(m.group(3)) > last:
                f.unlink()
        for f in self.root.glob(f"day=*/.p{partition}-*.parquet.tmp"):
            f.unlink()
        return last + 1

    def write_batch(self, partition: int, records: list[tuple[int, Event]], dead: dict[str, int] | None = None
                    ) -> list[Path]:
        """Write one partition's batch (offset, event), one file per day, then move the ledger;
        the events of ``dead`` (tombstones) are left out. Returns the files written."""
        by_day = defaultdict(list)
        for offset, event in records:
            if not (dead and event.ts <= dead.get(event.user_id, -1)):
                by_day[day_of(event.ts)].append((offset, event))
        written = []
        for day, rows in by_day.items():
            folder = self.root / f"day={day}"
            folder.mkdir(exist_ok=True)
            name = f"p{partition}-{rows[0][0]:012d}-{rows[-1][0]:012d}.parquet"
            table = events_table([e for _, e in rows]).append_column("offset", pa.array([o for o, _ in rows], pa.int64()))
            _atomic_write(folder / name, lambda p: pq.write_table(table, p))
            written.append(folder / name)
        last = max(offset for offset, _ in records)
        _atomic_write(self.ledger_dir / f"p{partition}", lambda p: p.write_text(str(last)))
        return written


def write_events(root: Path, events: Iterable[Event], partitions: int = 4, batch: int = 20_000) -> int:
    """Append events straight to the archive, as the archiver would have from a topic of
    ``partitions`` partitions keyed by user (synthetic logs, benches, tests); returns the count."""
    archive = Archive(root)
    offsets = {p: archive.last_offset(p) + 1 for p in range(partitions)}
    pending: dict[int, list[tuple[int, Event]]] = defaultdict(list)
    n = 0
    for event in events:
        p = zlib.crc32(event.user_id.encode()) % partitions
        pending[p].append((offsets[p], event))
        offsets[p] += 1
        n += 1
        if len(pending[p]) >= batch:
            archive.write_batch(p, pending.pop(p))
    for p, records in pending.items():
        archive.write_batch(p, records)
    return n


def tombstones(root: Path) -> dict[str, int]:
    """Forgotten users and when they were forgotten (ms)."""
    folder = Path(root) / "_tombstones"
    return {f.name: int(f.read_text()) for f in folder.iterdir() if not f.name.startswith(".")} if folder.is_dir() else {}


def write_tombstone(root: Path, user_id: str, at_ms: int) -> None:
    folder = Path(root) / "_tombstones"
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / user_id, lambda p: p.write_text(str(at_ms)))


def forgotten_rows(table: pa.Table, dead: dict[str, int]) -> np.ndarray:
    """True for the rows of forgotten users up to their tombstone's time."""
    if not dead or table.num_rows == 0:
        return np.zeros(table.num_rows, dtype=bool)
    users = pa.array(list(dead), pa.string())
    index = pc.index_in(table["user_id"], value_set=users).to_numpy(zero_copy_only=False)
    known = ~pd.isna(index)
    until = np.array(list(dead.values()), dtype=np.int64)
    out = np.zeros(table.num_rows, dtype=bool)
    out[known] = table["ts"].to_numpy()[known] <= until[index[known].astype(np.int64)]
    return out


def _without_forgotten(table: pa.Table, root: Path) -> pa.Table:
    gone = forgotten_rows(table, tombstones(root))
    return table.filter(pa.array(~gone)) if gone.any() else table


_PURGING = ".purge.tmp"  # a purge's unfinished file: its own name, which ``Archive.recover`` leaves alone


@contextlib.contextmanager
def _purge_lock(root: Path):
    """One purge at a time: two that rewrite one file at once would each put back the other's rows."""
    folder = Path(root) / "_tombstones"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".purge.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def purge_files(root: Path, files: Iterable[Path], dead: dict[str, int]) -> tuple[int, int]:
    """Rewrite (atomically, same name) each of ``files`` that holds events of ``dead``
    (tombstones) without them. Returns (files rewritten, rows removed)."""
    rewritten = rows = 0
    with _purge_lock(root):
        for f in Path(root).glob(f"day=*/.*{_PURGING}"):  # a crashed purge's: no other runs now
            f.unlink()
        for f in files:
            try:
                table = pq.read_table(f)
            except FileNotFoundError:  # a crashed batch's, deleted by ``Archive.recover`` meanwhile
                continue
            gone = forgotten_rows(table, dead)
            if gone.any():
                kept = table.filter(pa.array(~gone))
                _atomic_write(f, lambda p: pq.write_table(kept, p), _PURGING)
                rewritten, rows = rewritten + 1, rows + int(gone.sum())
    return rewritten, rows


def purge_user(root: Path, user_id: str, until_ms: int) -> tuple[int, int]:
    """``purge_files`` of every file within its partition's ledger for one tombstone. A file
    past the ledger is a batch being written, whose archiver leaves the user out itself (it
    reads the tombstones again once its ledger moved: ``run_archiver``), or a crashed batch
    that ``Archive.recover`` deletes, which a rewrite must not bring back."""
    archive, ledger = Archive(root), {}
    within = []
    for f in event_files(root):
        m = _FILE.search(f.name)
        partition = int(m.group(1))
        if partition not in ledger:
            ledger[partition] = archive.last_offset(partition)
        if int(m.group(3)) <= ledger[partition]:
            within.append(f)
    return purge_files(root, within, {user_id: until_ms})


def event_files(root: Path) -> list[Path]:
    """The archive's files in read order: equal times keep this order (then each file's row order)."""
    return sorted(Path(root).glob("day=*/p*.parquet"))


def stored_events(root: Path) -> int:
    """The rows of the archive's files (duplicates and forgotten users included), from their footers."""
    return sum(pq.read_metadata(f).num_rows for f in event_files(root))


def read_file(path: Path, index: int, dead: dict[str, int]) -> pa.Table:
    """One file's events as ``read_events`` keeps them before its sort, plus ``seq``: the row's
    place in the archive's read order (file ``index`` of ``event_files``, then row), so a
    reader that sees one file at a time (``training.ray_data``) orders ties exactly as it does."""
    table = pq.read_table(path, columns=SCHEMA.names).cast(SCHEMA)
    table = table.append_column("seq", pa.array((index << 32) + np.arange(table.num_rows, dtype=np.int64)))
    gone = forgotten_rows(table, dead)
    return table.filter(pa.array(~gone)) if gone.any() else table


def newest_ts(root: Path) -> int | None:
    """The newest archived event's time (ms; forgotten users' events aside), one file at a time."""
    newest = [int(ts.max()) for ts in _stored_times(root) if len(ts)]
    return max(newest) if newest else None


def stored_after(root: Path, after_ts: int) -> int:
    """Archived events newer than ``after_ts`` (a duplicate delivery counts twice), one file at a time."""
    return sum(int((ts > after_ts).sum()) for ts in _stored_times(root))


def _stored_times(root: Path):
    """Each file's event times (ms), forgotten users' events left out: two columns read, not the log."""
    dead = tombstones(root)
    for f in event_files(root):
        table = pq.read_table(f, columns=["user_id", "ts"])
        yield table["ts"].to_numpy()[~forgotten_rows(table, dead)]


def read_events(settings: Settings, start_ts: int | None = None, end_ts: int | None = None) -> pa.Table:
    """The archived events (optionally ``start_ts <= ts < end_ts``), sorted by time, once per event id."""
    root = settings.archive_dir
    files = event_files(root)
    if not files:
        return SCHEMA.empty_table()
    table = ds.dataset([str(f) for f in files], schema=SCHEMA, format="parquet").to_table()
    if start_ts is not None:
        table = table.filter(pc.greater_equal(table["ts"], start_ts))
    if end_ts is not None:
        table = table.filter(pc.less(table["ts"], end_ts))
    table = _without_forgotten(table, root)
    # Stable by time: equal times keep file order, i.e. Kafka offset order within a partition,
    # which is each user's order on the wire (and in Redis).
    table = table.take(pa.array(np.argsort(table["ts"].to_numpy(), kind="stable")))
    # A producer may send an event twice (a retried POST): the log keeps its first copy.
    first = ~pd.Series(table["event_id"].to_numpy(zero_copy_only=False)).duplicated().to_numpy()
    return table if first.all() else table.filter(pa.array(first))


def read_partition_log(settings: Settings, partition: int, through: int | None = None) -> pa.Table:
    """One partition's archived events with their offsets, in offset order (rows of files
    written before offsets were kept: in file order, after the others of lower offsets).
    ``through``: only the files of offsets up to it (a ledger's value read before: the files of
    a batch the archiver writes meanwhile are left out whole, never in part)."""
    files = sorted((f for f in Path(settings.archive_dir).glob(f"day=*/p{partition}-*.parquet")
                    if through is None or int(_FILE.search(f.name).group(3)) <= through),
                   key=lambda f: int(_FILE.search(f.name).group(2)))
    if not files:
        return FILE_SCHEMA.empty_table()
    tables = [pq.read_table(f).cast(FILE_SCHEMA) if "offset" in pq.read_schema(f).names else
              pq.read_table(f).append_column("offset", pa.array([None] * pq.read_metadata(f).num_rows, pa.int64()))
              for f in files]
    table = _without_forgotten(pa.concat_tables(tables), settings.archive_dir)
    offsets = table["offset"].to_numpy(zero_copy_only=False)
    known = ~pd.isna(offsets)
    if known.all():
        return table.take(pa.array(np.argsort(offsets.astype(np.int64), kind="stable")))
    return table  # file order: exact within a file, and files follow their first offsets


def archived_partitions(settings: Settings) -> list[int]:
    return sorted({int(m.group(1)) for f in Path(settings.archive_dir).glob("day=*/p*.parquet")
                   if (m := _FILE.search(f.name))})


class _SeekToLedger(ConsumerRebalanceListener):
    """Partitions assigned resume at their ledger + 1; those revoked first ``drop`` what was
    polled of them and not written (it comes again, to their next owner or to this one)."""

    def __init__(self, archive: Archive, drop: Callable[[set[int]], None]):
        self.archive, self.drop = archive, drop
        self.consumer = None  # set once the consumer exists

    def on_partitions_revoked(self, revoked):
        self.drop({tp.partition for tp in revoked})

    def on_partitions_assigned(self, assigned):
        for tp in assigned:
            resume_at = self.archive.recover(tp.partition)
            metrics.LEDGER_OFFSET.labels(str(tp.partition)).set(resume_at - 1)
            self.consumer.seek(tp, resume_at)


def run_archiver(settings: Settings, until_idle: float | None = None, flush_records: int = 20_000,
                 flush_seconds: float = 2.0, stopping: threading.Event | None = None) -> dict:
    """Append events to the archive until SIGTERM (or ``stopping`` is set), or ``until_idle``
    seconds without records.

    Records are buffered up to ``flush_records`` or ``flush_seconds`` so files are not tiny.
    Forgotten users' events are not written (the tombstones, read at each flush).
    A record that is not a valid event (bounds included) goes to the dead-letter topic with the
    reason, like the stream worker's (header ``consumer``: this group): no record can stop the
    archive. The dead letters are acknowledged before the files of their batch are written (the
    ledger then passes them), and stopped before that, nothing of the batch is written: it comes
    again. Offsets are committed after, as a progress report only (the ledger is the truth).
    """
    archive = Archive(settings.archive_dir)
    bounds = EventTimeBounds.of(settings.features)
    dlq = kafka_io.dead_letter_producer(settings)
    stopping = stopping or threading.Event()
    bad: list[tuple[object, BadEvent]] = []

    def drop(partitions: set[int]) -> None:
        for p in partitions:
            buffer.pop(p, None)
        bad[:] = [(r, why) for r, why in bad if r.partition not in partitions]
        for tp in [tp for tp in polled_to if tp.partition in partitions]:
            del polled_to[tp]
    listener = _SeekToLedger(archive, drop)

    def make_consumer():
        listener.consumer = kafka_io.consumer(settings, settings.kafka.archive_group, listener=listener,
                                              max_poll_records=5000)
        return listener.consumer
    member = kafka_io.GroupMember(settings, settings.kafka.archive_group, make_consumer)
    buffer: dict[int, list[tuple[int, Event]]] = defaultdict(list)
    stats = {"consumed": 0, "archived": 0, "dlq": 0}
    polled_to: dict = {}  # TopicPartition -> the offset after the last record polled (buffered or done)
    last_flush = time.monotonic()

    def flush():
        if bad:
            sent = kafka_io.until_done(lambda: kafka_io.dead_letter(dlq, settings, settings.kafka.archive_group, bad),
                                       "the dead-letter topic", (KafkaError,), stopping)
            if sent is None:  # stopped: the batch is not written, and comes again from the ledger
                return
            stats["dlq"] += sent
        dead, written = tombstones(archive.root), []
        for partition, rows in buffer.items():
            if rows:
                written += archive.write_batch(partition, rows, dead)
                stats["archived"] += len(rows)
                metrics.ARCHIVED.inc(len(rows))
                metrics.LEDGER_OFFSET.labels(str(partition)).set(rows[-1][0])
        # A user forgotten meanwhile: its purge skipped these files (past the ledger then).
        late = {user: until for user, until in tombstones(archive.root).items() if dead.get(user) != until}
        if late and written:
            purge_files(archive.root, written, late)
        records_done = sum(map(len, buffer.values())) + len(bad)
        buffer.clear()
        bad.clear()
        try:
            member.consumer.commit(timeout_ms=int(settings.kafka.request_timeout_s * 1000))
        except KafkaError as exc:  # a progress report: the next one catches up
            log.warning("archiver: offsets not committed (%r)", exc)
        member.mark_done(polled_to)
        metrics.CONSUMED.labels(settings.kafka.archive_group).inc(records_done)

    def on_poll(polled):
        nonlocal last_flush
        for tp, records in polled.items():
            if records:
                polled_to[tp] = records[-1].offset + 1
            for r in records:
                stats["consumed"] += 1
                try:
                    buffer[tp.partition].append((r.offset, parse_event(r.value, bounds)))
                except BadEvent as exc:
                    bad.append((r, exc))
        pending = sum(map(len, buffer.values())) + len(bad)
        now = time.monotonic()
        if pending >= flush_records or (pending and now - last_flush >= flush_seconds):
            flush()
            last_flush = now

    try:
        kafka_io.consume(member, on_poll, stopping, until_idle, busy=lambda: any(buffer.values()) or bool(bad))
        flush()
    finally:
        member.consumer.close(autocommit=False, timeout_ms=int(settings.kafka.request_timeout_s * 1000))
        dlq.close(timeout=settings.kafka.request_timeout_s)
    return stats
