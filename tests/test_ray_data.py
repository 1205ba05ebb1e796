"""The archive engine on Ray Data (``training.ray_data``) against the in-memory path
(``training.data.Prepared`` over ``read_events``): the same examples and held-out targets, row
for row, on MovieLens-100K and on a synthetic log with duplicated event ids, ties in time and a
forgotten user; and a model trained through it as good as one trained in memory.

Budget: about a minute for the parity on 2 cores (a private Ray, started once for the module).
"""
from __future__ import annotations

import numpy as np
import pytest

from recsys import archive
from recsys.events import Event

SYN = "synthetic:events=12000,users=300,items=400,clusters=8,seed=3"


@pytest.fixture
def settings(scratch):
    """A private archive, registry and Redis prefix (the catalogue the engines read)."""
    return scratch.settings


def _put_catalogue(settings, entries: dict[str, list[str]]) -> None:
    from recsys.catalogue import CatalogueEntry, CatalogueKeys, queue_put
    from recsys.feature_store import connect
    with connect(settings).pipeline(transaction=True) as pipe:
        for item, genres in entries.items():
            queue_put(pipe, CatalogueKeys.of(settings), item, CatalogueEntry(genres=genres), 1000)
        pipe.execute()


def _with_duplicates_and_ties(events: list[Event]) -> list[Event]:
    """Times cut to the second (many ties), every 40th event sent again 25 events later (a retried
    POST), every 97th again with a later time, one id reused by another user."""
    out = [e.model_copy(update={"ts": e.ts // 1000 * 1000}) for e in events]
    for k in range(0, len(out) - 30, 40):
        out.insert(k + 25, out[k])
    for k in range(5, len(out) - 30, 97):
        out.insert(k + 20, out[k].model_copy(update={"ts": out[k].ts + 5000}))
    out.append(out[10].model_copy(update={"user_id": out[11].user_id if out[11].user_id != out[10].user_id else "u-x"}))
    return out


def _in_time_order(rows, flag: str) -> dict:
    """The example rows of one stage, as the in-memory path lists them (time, then archive order)."""
    batches = [b for b in rows.iter_batches(batch_size=None, batch_format="numpy")]
    cols = {k: np.concatenate([b[k][b[flag]] for b in batches]) for k in ("user", "hist", "counts", "item", "ts", "seq")}
    order = np.lexsort((cols["seq"], cols["ts"]))
    return {k: v[order] for k, v in cols.items()}


def _assert_same(settings) -> tuple[object, object]:
    from recsys.model import ModelConfig
    from training.data import Prepared, load_table
    from training.ray_data import ArchiveData
    table, item_features, _ = load_table("archive", settings)
    mem = Prepared(table, item_features, ModelConfig(history=20), recent_items=20)
    ray = ArchiveData(settings, history=20, recent_items=20, block_rows=15_000)
    assert ray.vocab.user_ids == mem.vocab.user_ids and ray.vocab.item_ids == mem.vocab.item_ids
    assert ray.vocab.genres == mem.vocab.genres and np.array_equal(ray.vocab.item_genres, mem.vocab.item_genres)
    assert np.array_equal(ray.split_item_rows, mem.split_item_rows)
    assert ray.split.window() == mem.split.window()
    for stage, tag in (("test", "test"), ("validation", "val")):
        a, b = mem.at(stage), ray.at(stage)
        assert a.n_train == b.n_train > 0 and np.array_equal(a.log_q, b.log_q)
        rows = _in_time_order(ray.rows, f"ex_{tag}")
        for k in ("user", "hist", "counts", "item"):  # the examples, row for row
            assert np.array_equal(a.train[k], rows[k]), (stage, k)
        for k in ("user", "hist", "counts"):  # the targets' point-in-time inputs
            assert np.array_equal(a.targets[k], b.targets[k]), (stage, k)
        for got, want in zip(b.split.targets(stage)[:2], a.split.targets(stage)[:2]):
            assert np.array_equal(got, want), stage
        assert np.array_equal(b.split.popularity(stage), a.split.popularity(stage))
        (ip_a, seen_a), (ip_b, seen_b) = a.split.input_items(stage), b.split.input_items(stage)
        for u in a.split.targets(stage)[0]:  # the items evaluation removes from each target's candidates
            assert np.array_equal(seen_a[ip_a[u]:ip_a[u + 1]], seen_b[ip_b[u]:ip_b[u + 1]]), (stage, u)
    return mem, ray


def test_movielens_examples_and_targets_equal_the_in_memory_path(ray_session, settings, ml100k):
    from recsys.sources import MovieLensSource
    archive.write_events(settings.archive_dir, MovieLensSource(ml100k).events_iter(), partitions=3, batch=9000)
    mem, _ = _assert_same(settings)
    assert mem.split.protocol == "A" and mem.split.window()["events"] == 100_000


def test_synthetic_log_with_duplicates_ties_a_forgotten_user_and_a_catalogue_equals_the_in_memory_path(
        ray_session, settings):
    """The catalogue names known items and items no event has touched (in the vocabulary, not ranked)."""
    from recsys.sources import open_source
    events = _with_duplicates_and_ties(list(open_source(SYN).events_iter()))
    archive.write_events(settings.archive_dir, events, partitions=3, batch=2500)
    known = sorted({e.item_id for e in events})
    _put_catalogue(settings, {**{t: [f"g{k % 5}"] for k, t in enumerate(known[::3])},
                              **{f"new-{k}": ["g1", "g9"] for k in range(7)}, "0-first": ["g2"]})
    forgotten = events[50]
    archive.write_tombstone(settings.archive_dir, forgotten.user_id, forgotten.ts)
    mem, _ = _assert_same(settings)
    assert mem.split.protocol == "B" and mem.vocab.n_items == mem.split.n_items + 8
    assert mem.split.window()["events"] < len({e.event_id for e in events}) < len(events)


def test_training_through_ray_data_matches_the_in_memory_model_and_the_gate_ranks_alike(ray_session, settings):
    """Same data, same config: the two engines' models differ only by the order of the examples.
    The retraining gate's per-user ranks from the engine's held-out targets equal those from the
    event table, for both models, on an archive that grew users and items they never saw."""
    from recsys.registry import Registry
    from recsys.sources import open_source
    from training.data import load_table
    from recsys import evaluation
    from training.job import evaluate_version, held_out_ranks, train, version_ranks
    from training.ray_data import ArchiveData
    fast = {"dim": 32, "user_dim": 16, "hidden": 64, "batch_size": 128, "temperature": 0.1, "learning_rate": 0.005}
    archive.write_events(settings.archive_dir, open_source("synthetic:events=40000,users=1500,items=600,clusters=12,"
                                                           "seed=5,taste=0.9").events_iter(), partitions=2)
    cards = {}
    for engine in ("memory", "ray_data"):
        s = settings.updated(training={"data_engine": engine})
        cards[engine] = train("archive", settings=s, workers=2, epochs=4, model_config=fast, promote=False)
    assert cards["ray_data"]["training"]["data_engine"] == "ray_data"
    mem, ray = (cards[e]["metrics"] for e in ("memory", "ray_data"))
    assert cards["memory"]["examples"] == cards["ray_data"]["examples"]
    assert ray["popularity"] == mem["popularity"]  # the gate's floor, on the same targets
    assert "skipped" in ray["ease"] and "hr@10" in mem["ease"]
    h_mem, h_ray = mem["two_tower"]["hr@10"], ray["two_tower"]["hr@10"]
    print(f"HR@10 in memory {h_mem:.4f}, Ray Data {h_ray:.4f}, most-popular {mem['popularity']['hr@10']:.4f}")
    # Six runs of each on this data: in memory 0.41-0.45, on Ray Data 0.38-0.45 (means 0.432 and 0.414);
    # the bound of test_training's 1 vs 2 workers, about 0.095 here.
    assert h_ray >= 2 * ray["popularity"]["hr@10"], ray
    assert abs(h_mem - h_ray) <= 0.05 + 0.1 * max(h_mem, h_ray), (h_mem, h_ray)

    # The archive grows by users and items neither model knows: each re-codes the inputs into its vocabulary.
    archive.write_events(settings.archive_dir, open_source("synthetic:events=8000,users=2000,items=800,clusters=12,"
                                                           "seed=6,taste=0.9").events_iter(), partitions=2)
    paths = [Registry(settings.registry_dir).path(cards[e]["version"]) for e in ("memory", "ray_data")]
    split, want = version_ranks(paths, load_table("archive", settings)[0], settings)
    held_out, got = held_out_ranks(paths, ArchiveData(settings, 50, settings.features.recent_items, 15_000))
    assert held_out.window() == split.window() and split.n_users > 1500 and split.n_items > 600
    for engine in ("memory", "ray_data"):
        version = cards[engine]["version"]
        assert np.array_equal(got[version], want[version]), engine
    # recsys evaluate --source archive on the engine: the same figures
    version = cards["ray_data"]["version"]
    evaluated = evaluate_version(paths[1], "archive", settings.updated(training={"data_engine": "ray_data"}))
    assert evaluated["metrics"]["two_tower"] == evaluation.metrics_from_ranks(want[version]) | {"users": len(want[version])}
