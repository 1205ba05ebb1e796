"""``recsys features rebuild``: the online features again, exactly, from the Parquet archive.

For when Redis lost its data (AOF everysec can lose a second; a disk can lose everything).
The stream workers must be stopped (the command refuses while their group has members); the
archiver, the API, the online consumer and the scheduler may run on. For each partition the
archive's ledger is read first, then the archived events up to it are applied in offset order,
at their Kafka positions, with the stream worker's own operations, and the stream worker's
group is moved to the offset after exactly those: the worker then continues with no gap (what
the archiver wrote meanwhile, and what the worker had applied beyond the archive, comes again
from Kafka) and no double count (what was applied is not read again, and the applied offsets
it left would skip it anyway). Only the features' keys are cleared (``FeatureStore.clear_features``).
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
        cleared = store.clear_features()
        store.mark_forgotten(tombstones(settings.archive_dir))  # events still in Kafka stay out
        ends, events, applied = {}, 0, 0
        for p in partitions:
            last = archive.last_offset(p)  # before the log: the archiver may write on meanwhile
            log = read_partition_log(settings, p, through=last)
            offsets = log.column("offset").to_pylist()
            for start in range(0, log.num_rows, batch):
                chunk = log.slice(start, batch)
                positions = [(topic, p, o) if o is not None else None for o in offsets[start:start + batch]]
                applied += sum(store.apply_events(list(iter_events(chunk)), positions))
                events += chunk.num_rows
            ends[p] = last + 1
            progress(f"rebuild: partition {p} done ({events:,} events so far); the stream resumes at offset {ends[p]:,}")
        errors = admin.alter_group_offsets(group, {TopicPartition(topic, p): OffsetAndMetadata(end, "", -1)
                                                   for p, end in ends.items()})
        failed = {tp.partition: e.__name__ for tp, e in errors.items() if e is not NoError}
        if failed:
            raise Busy(f"could not move group {group!r} to the rebuilt offsets ({failed}): a stream worker started "
                       f"during the rebuild; stop it and rebuild again")
    finally:
        admin.close()
    return {"events": events, "applied": applied, "duplicates": events - applied, "cleared_keys": cleared,
            "resume_offsets": {str(p): end for p, end in ends.items()}}
