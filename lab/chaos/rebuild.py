"""``recsys chaos rebuild-under-traffic --json``: ``recsys features rebuild`` while events flow
and the archiver writes (issue 35).

On the running local stack (Kafka and Redis), in scratch topics, groups and Redis prefix and a
private archive: ``recsys replay`` produces a synthetic source's events at ``RATE`` per second
for ``SECONDS``; a stream worker and the archiver follow live. ``REBUILD_AT_S`` into the load,
the stream worker is stopped (the rebuild's one precondition) and the features are rebuilt
from the archive in this process while the producer and the archiver go on; then a stream
worker starts again from where the rebuild left its group. Once the producer is done, the
consumers drain, and:

- every user's features (recent list, seen items, counts), every item's counts and every
  trending score equal one replay of every event produced (``recsys.features.MemoryFeatures``);
- the archive holds each event once.

``lost``: events missing from their item's counts or from the archive; ``duplicated``: counted
beyond one, or archived twice. ``archived_during_rebuild``: the events the archiver wrote past
the ledger that the rebuild read, while it ran (the window where a rebuild used to skip events).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter

from lab import REPO, process, stack
from lab.bench.stream import recsys_child, scratch_settings, settings_env
from lab.chaos import end_scratch_run
from lab.chaos.scenarios import expected_features, features_of, compare_features
from recsys.archive import Archive, read_partition_log, run_archiver
from recsys.feature_store import FeatureStore
from recsys.privacy import Pseudonyms
from recsys.rebuild import rebuild_features
from recsys.settings import Settings
from recsys.sources import open_source
from recsys.stream import run_stream

RATE = 1000.0  # events/s
SECONDS = 60.0
REBUILD_AT_S = 25.0


def figures(want: tuple, got: tuple, sent_ids: list[str], archived: Counter) -> dict:
    """The features against one replay of every event (``compare_features``), and the archive's
    records (event id -> copies) against the events sent."""
    exact = compare_features(want, got)
    lost_archive = sum(1 for e in sent_ids if e not in archived)
    copies = sum(archived.values()) - len(archived)
    return {"lost": exact["lost"] + lost_archive, "duplicated": exact["duplicated"] + copies,
            "lost_in_features": exact["lost"], "lost_in_archive": lost_archive,
            "duplicated_in_features": exact["duplicated"], "archived_twice": copies,
            "users_exact": exact["users_exact"], "trending_exact": exact["trending_exact"],
            "passed": exact["exact"] and not lost_archive and not copies}


def _archived(s: Settings) -> Counter:
    records = Counter()
    for p in range(s.kafka.events_partitions):
        records.update(read_partition_log(s, p)["event_id"].to_pylist())
    return records


def rebuild_under_traffic(settings: Settings, progress=print) -> dict:
    home = settings.home / "chaos-rebuild"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    s = scratch_settings(settings, "rebuild").updated(archive_dir=home / "archive")
    stack.start_kafka(settings, progress)
    stack.start_redis(settings, progress)
    stack.ensure_topics(s)
    spec = f"synthetic:events={int(RATE * SECONDS)},seed=35"
    sent = list(Pseudonyms.of(s).events(open_source(spec).events_iter()))
    procs = []
    t0 = time.monotonic()
    try:
        stream = recsys_child(s, home / "stream.log", "stream")
        procs = [stream, recsys_child(s, home / "archive.log", "archive")]
        producer = process.spawn([sys.executable, "-m", "cli", "replay", "--source", spec, "--rate", str(RATE),
                                  "--quiet"], home / "replay.log", env=settings_env(s), cwd=REPO)
        procs.append(producer)
        progress(f"chaos: {RATE:g} events/s for {SECONDS:g} s, a stream worker and the archiver live; "
                 f"rebuild at {REBUILD_AT_S:g} s (logs in {home})")
        time.sleep(REBUILD_AT_S)
        process.stop(stream, grace_s=30)
        started = time.monotonic()
        rebuilt = rebuild_features(s, progress=lambda *_: None)
        rebuild_s = time.monotonic() - started
        archive = Archive(s.archive_dir)
        during = sum(archive.last_offset(int(p)) + 1 - end for p, end in rebuilt["resume_offsets"].items())
        progress(f"chaos: rebuilt {rebuilt['applied']:,} events in {rebuild_s:.1f} s; {during:,} more archived "
                 f"meanwhile; a stream worker again")
        procs.append(recsys_child(s, home / "stream-after.log", "stream"))
        if producer.wait(timeout=SECONDS + 300) != 0:
            raise RuntimeError(f"chaos: the producer failed (exit {producer.returncode}); see {home / 'replay.log'}")
        produced = json.loads((home / "replay.log").read_text().splitlines()[-1])
        process.stop(procs, grace_s=30)  # they committed what they did; the rest comes again
        drained = {"stream": run_stream(s, until_idle=3)["applied"], "archive": run_archiver(s, until_idle=3)["archived"]}
        result = figures(expected_features(sent, s), features_of(FeatureStore(s), sent),
                         [e.event_id for e in sent], _archived(s))
        return {"scenario": "rebuild-under-traffic", "events_sent": len(sent), "acknowledged": produced["produced"],
                "events_per_s": produced["events_per_s"],
                "rebuild_at_s": REBUILD_AT_S, "rebuild_s": round(rebuild_s, 1), "rebuilt_events": rebuilt["events"],
                "archived_during_rebuild": during, "drained": drained, **result,
                "total_s": round(time.monotonic() - t0, 1)}
    finally:
        end_scratch_run(s, procs, folders=[home])
