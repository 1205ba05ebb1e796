"""The Prometheus metrics of the processes outside Serve: the Kafka consumers (stream worker,
archiver) and the retraining scheduler, and the endpoint that serves them.

One definition per metric, here; deploy/monitoring (rules, dashboards) and ``recsys top`` read
these names. The Serve app's metrics are Ray's (serving/app.py), exported by Ray with a ``ray_``
prefix.
"""
from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.utils import floatToGoString

# ---- any group consumer (recsys.kafka_io.GroupMember) -------------------------------------

ASSIGNED_PARTITIONS = Gauge("recsys_consumer_assigned_partitions", "partitions this consumer holds", ["group"])
UNASSIGNED_SECONDS = Gauge("recsys_consumer_unassigned_seconds",
                           "seconds since this consumer last held a partition (0 while it holds some)", ["group"])
RECREATED = Counter("recsys_consumer_recreated_total", "consumers recreated after waiting too long for partitions",
                    ["group"])
LAG = Gauge("recsys_consumer_lag", "records of a held partition not yet done (high watermark - next offset to do)",
            ["group", "topic", "partition"])
CONSUMED = Counter("recsys_events_consumed_total", "records consumed and done with (applied, archived or "
                   "dead-lettered), offsets committed after", ["group"])
DEAD_LETTERS = Counter("recsys_dead_letters_total", "records sent to the dead-letter topic, by why",
                       ["group", "reason"])

# ---- the stream worker -------------------------------------------------------------------

APPLIED = Counter("recsys_stream_events_applied_total", "events applied to the online features")
DUPLICATES = Counter("recsys_stream_events_duplicate_total",
                     "events already applied (a replay, or a client's retry of one event id)")
FRESHNESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class BulkHistogram(Collector):
    """A histogram fed a batch at a time (numpy), for the stream worker's per-event freshness:
    prometheus_client's ``observe`` takes a lock per value, a few microseconds per event."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry=REGISTRY):
        self.name, self.documentation = name, documentation
        self.edges = np.array(buckets, dtype=float)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above every edge
        self.total = 0.0
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        if len(values):
            # side=left: a value equal to an edge counts in that edge's bucket (le: less or equal).
            self.counts += np.bincount(np.searchsorted(self.edges, values, side="left"), minlength=len(self.counts))
            self.total += float(values.sum())

    def collect(self):
        cumulative = np.cumsum(self.counts)
        buckets = [(floatToGoString(edge), int(n)) for edge, n in zip(self.edges, cumulative)]
        buckets.append(("+Inf", int(cumulative[-1])))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.total)


FRESHNESS = BulkHistogram("recsys_stream_freshness_seconds",
                          "seconds from an event's Kafka timestamp (set by its producer) to its effects in Redis",
                          FRESHNESS_BUCKETS)

# ---- the archiver ------------------------------------------------------------------------

ARCHIVED = Counter("recsys_archive_events_archived_total", "events written to the Parquet archive")
LEDGER_OFFSET = Gauge("recsys_archive_ledger_offset", "last Kafka offset of a partition whose file is in place",
                      ["partition"])


_serving: set[int] = set()


def serve(port: int, host: str = "127.0.0.1") -> None:
    """This process's metrics on http://host:port/metrics (nothing when port is 0); once per
    port and process. Raises OSError when another process holds the port."""
    if port and port not in _serving:
        start_http_server(port, addr=host)
        _serving.add(port)
