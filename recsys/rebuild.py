"""``recsys features rebuild``: the online features again, exactly, from the Parquet archive.

For when Redis lost its data (AOF everysec can lose a second; a disk can lose everything).
Each partition's archived events are applied in offset order, at their Kafka positions, with
the stream worker's own operations, and the stream worker's group is moved to the offset after
the archive's last: the worker then continues with no gap (the events it had applied beyond the
archive come again) and no double count (the archived ones are not read again, and the applied
offsets they left would skip them anyway).
"""
from __future__ import annotations

from kafka import KafkaAdminClient, OffsetAndMetadata, TopicPartition
from kafka.errors import NoError

from recsys.archive import Archive, read_partition_log, tombstones
from recsys.errors import Busy, Unavailable
from recsys.feature_store import FeatureStore
from recsys.kafka_io import connection
from recsys.settings import Settings
from recsys.training_data import iter_events


def rebuild_features(settings: Settings, batch: int = 5000, progress=print) -> dict:
    """Clear this prefix's online features and rebuild them from the archive (see above)."""
    topic, group = settings.kafka.events_topic, settings.kafka.stream_group
    admin = KafkaAdminClient(**connection(settings))
    try:
        if admin.describe_groups([group]).get(group, {}).get("members"):
            raise Busy(f"stream workers of group {group!r} are running: stop them (recsys stream) before a rebuild")
        described = [t for t in admin.describe_topics([topic]) if t.get("name") == topic and not t.get("error_code")]
        partitions = sorted(p["partition_index"] for p in described[0]["partitions"]) if described else []
        if not partitions:
            raise Unavailable(f"Kafka topic {topic!r} not found")
        archive, store = Archive(settings.archive_dir), FeatureStore(settings)
        cleared = store.clear()
        store.mark_forgotten(tombstones(settings.archive_dir))  # events still in Kafka stay out
        ends, events, applied = {}, 0, 0
        for p in partitions:
            log = read_partition_log(settings, p)
            offsets = log.column("offset").to_pylist()
            for start in range(0, log.num_rows, batch):
                chunk = log.slice(start, batch)
                positions = [(topic, p, o) if o is not None else None for o in offsets[start:start + batch]]
                applied += sum(store.apply_events(list(iter_events(chunk)), positions))
                events += chunk.num_rows
            last = archive.last_offset(p)
            ends[p] = last + 1
            progress(f"rebuild: partition {p} done ({events:,} events so far); the stream resumes at offset {ends[p]:,}")
        errors = admin.alter_group_offsets(group, {TopicPartition(topic, p): OffsetAndMetadata(end, "", -1)
                                                   for p, end in ends.items()})
        failed = {tp.partition: e.__name__ for tp, e in errors.items() if e is not NoError}
        if failed:
            raise Busy(f"could not move group {group!r} to the archive's end ({failed}): did a stream worker start?")
    finally:
        admin.close()
    return {"events": events, "applied": applied, "duplicates": events - applied, "cleared_keys": cleared,
            "resume_offsets": {str(p): end for p, end in ends.items()}}
