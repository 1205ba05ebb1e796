"""Issue 18 (point 1): every served list goes to the impressions topic, and sending never blocks
or fails a request. The sender's queueing is tested with fakes; the path itself on the real
broker and the real app (serving.plain under uvicorn, the replica's own code)."""
from __future__ import annotations

import threading
import time

import pytest
from kafka import KafkaConsumer
from kafka.partitioner.default import DefaultPartitioner

from recsys.impressions import Impression, ImpressionSender, by_partition, decode_record, encode_batch, partition_of
from recsys.kafka_io import connection
from recsys.privacy import Pseudonyms
from tests.conftest import plain_api

API_PORT = 28094


class FakeFuture:
    def __init__(self, ok: bool):
        self.ok = ok

    def add_callback(self, fn):
        if self.ok:
            fn(None)

    def add_errback(self, fn):
        if not self.ok:
            fn(RuntimeError("refused"))


def test_an_impression_survives_its_bytes():
    imp = Impression.served("p1", "v0003", "current", ["i9", "i2", "i5"])
    again = Impression.from_bytes(imp.to_bytes())
    assert again == imp and len(imp.request_id) == 32
    assert b'"items":[{"item_id":"i9","rank":1}' in imp.to_bytes()


def test_offer_never_waits_and_every_loss_is_counted_by_reason():
    """One impression per batch (flush_s 0): each send may hang, fail or be refused."""
    release, dropped, sent = threading.Event(), [], []

    def send(batch):
        release.wait(10)  # Kafka hangs: the thread is stuck on this one
        (impression,) = batch
        if impression.user_id == "boom":
            raise RuntimeError("no producer")
        return [(FakeFuture(ok=impression.user_id != "refused"), 1)]

    users = ["a", "b", "boom", "refused", "c", "d"]
    sender = ImpressionSender(send, on_drop=lambda reason, n: dropped.append(reason), on_sent=sent.append, capacity=3,
                              flush_s=0)
    started = time.perf_counter()
    offered = [sender.offer(Impression.served(u, None, "current", ["i1"])) for u in users]
    assert time.perf_counter() - started < 1.0  # would be 10 s if offer waited for the send
    # Three wait in the queue, a fourth once the thread holds "a" (on a busy machine it may take
    # "a" only after later offers found the queue full); the rest find it full.
    assert offered[:3] == [True] * 3 and offered.count(True) in (3, 4)
    release.set()
    sender.close()
    queued = [u for u, ok in zip(users, offered) if ok]
    failed = sum(u in ("boom", "refused") for u in queued)
    assert dropped.count("queue_full") == offered.count(False) and dropped.count("kafka") == failed
    assert len(sent) == len(queued) - failed and len(dropped) == offered.count(False) + failed


class Recorder:
    """A send that records each batch and when it came, and acknowledges each as one record."""

    def __init__(self, ok: bool = True):
        self.batches, self.at, self.ok, self.came = [], [], ok, threading.Event()

    def __call__(self, batch):
        self.batches.append([i.user_id for i in batch])
        self.at.append(time.monotonic())
        self.came.set()
        return [(FakeFuture(self.ok), len(batch))]


def _served(*users):
    return [Impression.served(u, "v1", "current", ["i1", "i2"]) for u in users]


def test_a_batch_goes_when_it_is_full():
    send, sent = Recorder(), []
    sender = ImpressionSender(send, on_drop=lambda *_: None, on_sent=sent.append, flush_s=60, batch_max=3)
    for imp in _served(*"abcdefg"):
        assert sender.offer(imp)
    deadline = time.monotonic() + 5
    while len(send.batches) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert send.batches == [["a", "b", "c"], ["d", "e", "f"]]  # long before the 60 s are up
    sender.close()
    assert send.batches[-1] == ["g"] and sent == [3, 3, 1]  # close sends what was gathered


def test_a_batch_goes_when_its_time_is_up():
    send = Recorder()
    sender = ImpressionSender(send, on_drop=lambda *_: None, flush_s=0.2, batch_max=500)
    first = time.monotonic()
    for imp in _served("a", "b"):
        sender.offer(imp)
    assert send.came.wait(5)
    waited = send.at[0] - first
    assert send.batches == [["a", "b"]] and 0.19 <= waited < 2.0, waited
    sender.offer(_served("c")[0])  # a new batch, its own time
    deadline = time.monotonic() + 5
    while len(send.batches) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert send.batches == [["a", "b"], ["c"]] and send.at[1] - send.at[0] >= 0.19
    sender.close()


def test_a_lost_batch_counts_each_of_its_impressions():
    dropped = []
    refused = ImpressionSender(Recorder(ok=False), on_drop=lambda reason, n: dropped.append((reason, n)), flush_s=60)
    for imp in _served("a", "b", "c"):
        refused.offer(imp)
    refused.close()

    def broken(batch):
        raise RuntimeError("no producer")
    failing = ImpressionSender(broken, on_drop=lambda reason, n: dropped.append((reason, n)), flush_s=60)
    for imp in _served("d", "e"):
        failing.offer(imp)
    failing.close()
    assert dropped == [("kafka", 3), ("kafka", 2)]


def test_sampling_sends_the_drawn_share_and_counts_no_loss():
    draws = iter([0.1, 0.7, 0.29, 0.3, 0.95, 0.0])
    send, dropped = Recorder(), []
    sender = ImpressionSender(send, on_drop=lambda *a: dropped.append(a), flush_s=60, sample=0.3,
                              draw=lambda: next(draws))
    assert all(sender.offer(imp) for imp in _served(*"abcdef"))
    sender.close()
    assert send.batches == [["a", "c", "f"]] and dropped == []


def test_a_batch_record_and_a_single_record_decode_alike():
    imps = [Impression.served(f"p{n}", "v0003" if n else None, "candidate", [f"i{n}", "i2"]) for n in range(3)]
    got, batch = decode_record(encode_batch(imps))
    assert got == imps and batch
    (single,), batch = decode_record(imps[0].to_bytes())
    assert single == imps[0] and not batch
    assert len(encode_batch(imps)) < sum(len(i.to_bytes()) for i in imps)


@pytest.mark.parametrize("bad", [b"[]", b"[1]", b'[["r", "u", "v", "a", "i1", 5]]', b'[["r", "u", "v", "a", [1], 5]]',
                                 b'[["r", "u", "v", "a", ["i1"]]]', b'"text"'])
def test_a_bad_batch_record_is_refused(bad):
    with pytest.raises((KeyError, ValueError, TypeError)):
        decode_record(bad)


class _Cluster:
    """What kafka-python's DefaultPartitioner asks of the producer's metadata."""

    def __init__(self, partitions: int):
        self.partitions = set(range(partitions))

    def topics(self):
        return {"impressions"}

    def partitions_for_topic(self, topic):
        return self.partitions

    def available_partitions_for_topic(self, topic):
        return self.partitions


def test_a_batch_goes_to_the_partition_of_its_users_events():
    """The partition Kafka's default partitioner gives the user's key (the events' key)."""
    partitioner, users = DefaultPartitioner(), [f"user-{n}" for n in range(300)]
    for partitions in (1, 6, 7):
        want = {u: partitioner.partition("impressions", u, u.encode(), None, None, _Cluster(partitions)) for u in users}
        assert {u: partition_of(u, partitions) for u in users} == want
    grouped = by_partition(_served(*users), 6)
    assert sorted(i.user_id for g in grouped.values() for i in g) == sorted(users) and len(grouped) == 6
    assert all(partition_of(i.user_id, 6) == p for p, g in grouped.items() for i in g)


def test_each_served_list_is_on_the_impressions_topic(scratch):
    """Batched (the default): each impression once, in a record on its user's events' partition."""
    s = scratch.settings
    with plain_api(s, API_PORT, scratch.api_key()) as api:
        answers = [api.get(f"/v1/recommendations/shopper{n % 3}?k=5").json() for n in range(6)]
    consumer = KafkaConsumer(s.kafka.impressions_topic, **connection(s), group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    records = list(consumer)
    partitions = len(consumer.partitions_for_topic(s.kafka.impressions_topic))
    consumer.close()
    pairs = [(r, imp) for r in records for imp in decode_record(r.value)[0]]
    got = {imp.request_id: (r, imp) for r, imp in pairs}
    assert len(pairs) == 6 and set(got) == {a["request_id"] for a in answers}
    pseudonym = Pseudonyms.of(s).user_id
    for n, answer in enumerate(answers):
        record, imp = got[answer["request_id"]]
        assert imp.user_id == pseudonym(f"shopper{n % 3}") and record.partition == partition_of(imp.user_id, partitions)
        assert list(imp.items) == [x["item_id"] for x in answer["items"]]
        assert imp.model_version == answer["model_version"] and imp.arm == "current"
        assert abs(imp.ts - record.timestamp) < 60_000


def test_unbatched_impressions_are_one_record_each_keyed_by_user(scratch):
    s = scratch.settings.updated(serving={"impressions_flush_ms": 0})
    with plain_api(s, API_PORT, scratch.api_key()) as api:
        answers = [api.get(f"/v1/recommendations/shopper{n % 3}?k=5").json() for n in range(4)]
    consumer = KafkaConsumer(s.kafka.impressions_topic, **connection(s), group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    records = list(consumer)
    consumer.close()
    got = {imp.request_id: (r, imp) for r in records for imp in [Impression.from_bytes(r.value)]}
    assert len(records) == 4 and set(got) == {a["request_id"] for a in answers}
    assert all(r.key.decode() == imp.user_id for r, imp in got.values())


def test_requests_are_answered_while_kafka_is_away(scratch):
    """Impressions to brokers that do not answer: every request still gets its 200."""
    s = scratch.settings.updated(kafka={"bootstrap": "127.0.0.1:1"}, serving={"kafka_timeout_s": 1.0})
    with plain_api(s, API_PORT, scratch.api_key()) as api:
        statuses = [api.get(f"/v1/recommendations/shopper{n}?k=5").status_code for n in range(20)]
    assert statuses == [200] * 20


@pytest.mark.parametrize("bad", [b"{}", b"not json", b'{"request_id": "x"}'])
def test_a_bad_impression_record_is_refused(bad):
    with pytest.raises((KeyError, ValueError)):
        Impression.from_bytes(bad)
