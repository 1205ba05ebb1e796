"""The user tower's input (``recsys.user_input``): the online and both offline encodings of the
same events are the same bytes, and a replica serves a model only by the schema it recorded.

Pure: no Kafka, Redis or Ray. The online path is the feature operations of ``recsys.features``
applied to ``MemoryStore`` event by event, read just before each event, then the serving
encoder (a ``NumpyUserTower``'s); the offline paths are ``training.data.Prepared`` (in memory)
and ``training.examples.block_examples`` (one Ray Data block, called directly).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from recsys import user_input
from recsys.events import Event, EventType
from recsys.features import MemoryStore
from recsys.model import ModelConfig, NumpyUserTower, Vocab, export, load_model
from recsys.training_data import events_table
from recsys.user_input import COUNTS, HIST, USER, UnsupportedUserInput, schema
from training import examples
from training.data import Prepared

HISTORY, RECENT = 4, 6  # the store keeps 6 recent items, the model reads 4
USERS = {"u0": 17, "u1": 9, "u2": 7, "u3": 6, "u4": 2}  # events per user; u0 has many more than HISTORY
TYPES = list(EventType)


def _events() -> list[Event]:
    """Events in arrival order: three at each instant (ties in time, within a user too), items
    drawn from a small catalogue so that users repeat items, every event type."""
    rng = np.random.default_rng(11)
    owners = np.array([u for u, n in USERS.items() for _ in range(n)])
    rng.shuffle(owners)
    out = []
    for k, user in enumerate(owners):
        kind = TYPES[int(rng.integers(len(TYPES)))]
        out.append(Event(event_id=f"e{k}", user_id=str(user), item_id=f"i{int(rng.integers(14))}", type=kind,
                         value=float(rng.integers(1, 6)) if kind is EventType.rating else None,
                         ts=1_700_000_000_000 + (k // 3) * 1000))
    return out


def _online(events: list[Event]) -> list:
    """Each event's user as the online store held it just before the event arrived."""
    store, seen = MemoryStore("online", RECENT), []
    for event in events:
        seen.append(store.user(event.user_id))
        store.apply_events([event])
    return seen


def _table(events: list[Event]) -> pa.Table:
    table = events_table(events)  # the archive's layout, in time order (ties: arrival order)
    return table.append_column("seq", pa.array(np.arange(table.num_rows), pa.int64()))


def _weights(vocab: Vocab, history: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights of a small two-tower (dim 8) in the exported layout."""
    rng = np.random.default_rng(seed)
    dim, user_dim, hidden = 8, 4, 16
    w = {"user_table": rng.normal(size=(vocab.n_users + 1, user_dim)), "hist_table": rng.normal(size=(vocab.n_items + 1, dim)),
         "pos_logits": rng.normal(size=history),
         "hidden_w": rng.normal(size=(user_dim + dim + len(user_input.EVENT_TYPES), hidden)),
         "hidden_b": rng.normal(size=hidden), "user_out_w": rng.normal(size=(hidden, dim)), "user_out_b": rng.normal(size=dim),
         "item_table": rng.normal(size=(vocab.n_items + 1, dim)), "item_out_w": rng.normal(size=(dim, dim)),
         "item_out_b": rng.normal(size=dim)}
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def _assert_same_bytes(got: dict, want: dict, spec: user_input.Schema) -> None:
    assert set(got) >= set(spec.names)
    for i in spec.inputs:
        assert got[i.name].dtype == np.dtype(i.dtype) and got[i.name].shape == i.shape(len(want[i.name])), i.name
        assert got[i.name].tobytes() == want[i.name].tobytes(), i.name


def test_the_events_cover_ties_repeats_unknown_ids_and_a_long_history():
    events = _events()
    ts = [e.ts for e in events]
    assert ts == sorted(ts) and len(set(ts)) < len(ts)  # ties in time
    assert any(a.user_id == b.user_id and a.ts == b.ts for a, b in zip(events, events[1:]))  # a user's own tie
    pairs = [(e.user_id, e.item_id) for e in events]
    assert len(set(pairs)) < len(pairs)  # repeats
    assert {e.type for e in events} == set(EventType)
    assert max(len(f.recent) for f in _online(events)) == RECENT > HISTORY  # more than the model reads


def test_online_and_in_memory_training_encodings_are_the_same_bytes():
    events = _events()
    prep = Prepared(_table(events), None, ModelConfig(history=HISTORY), RECENT)
    spec = schema(HISTORY)
    assert prep.schema == spec
    tower = NumpyUserTower(_weights(prep.vocab, HISTORY), prep.vocab, spec)
    online = _online(events)
    served = user_input.encode(online, tower.schema, tower.vocab)  # what the replica's tower encodes
    _assert_same_bytes(prep.rows, served, spec)
    assert (served[HIST] > 0).all(axis=1).any() and (served[HIST] == 0).all(axis=1).any()  # full and empty histories
    # The replica's embeddings of the online features are those of the training rows.
    assert tower(online).tobytes() == tower.embed_encoded({k: prep.rows[k] for k in spec.names}).tobytes()
    # A shorter history is the encoded one cut: what the online encoder gives at that width.
    short = prep.with_history(2)
    _assert_same_bytes(short.rows, user_input.encode(online, schema(2), prep.vocab), schema(2))
    _assert_same_bytes(short.targets, {k: short.rows[k][short.split.targets("test")[2]] for k in spec.names}, schema(2))


def test_online_and_ray_data_block_encodings_are_the_same_bytes_with_unknown_users_and_items():
    events = _events()
    table = _table(events)
    block = table.take(pa.array(np.random.default_rng(3).permutation(table.num_rows)))  # a block in any order
    # The log's vocabulary without u2, i3 and i7: they are encoded as unknown (0).
    users = sorted({e.user_id for e in events} - {"u2"})
    items = sorted({e.item_id for e in events} - {"i3", "i7"})
    out = examples.block_examples(block, pa.array(users), pa.array(items), "B", HISTORY, RECENT)
    rows = out["seq"]
    assert len(rows) > 10 and len(set(rows.tolist())) == len(rows)
    online = _online(events)
    served = user_input.encode([online[r] for r in rows], schema(HISTORY), Vocab(users, items))
    _assert_same_bytes(out, served, schema(HISTORY))
    unknown = [r for r, k in enumerate(rows) if events[k].user_id == "u2"]
    assert unknown and (out[USER][unknown] == 0).all()
    stale = [k for k, r in enumerate(rows) if {"i3", "i7"} & set(online[r].recent[:HISTORY])]
    assert stale and (out[HIST][stale] == 0).any()
    assert out[COUNTS].any() and not out[COUNTS][rows == 0].any()  # the first event: no counts yet
    # An empty block has every input, with its dtype and width.
    _assert_same_bytes(examples.empty(HISTORY), schema(HISTORY).empty(), schema(HISTORY))


def test_fit_recodes_into_another_vocabulary_and_cuts_or_pads_the_history():
    spec = schema(3)
    cols = {USER: np.array([1, 2], np.int32), HIST: np.array([[1, 2], [2, 0]], np.int32),
            COUNTS: np.ones((2, len(user_input.EVENT_TYPES)), np.float32), "item": np.array([5, 6])}
    users, items = np.array([0, 2, 0], np.int32), np.array([0, 3, 1], np.int32)
    got = spec.fit(cols, users, items)
    assert set(got) == set(spec.names)  # other columns are left out
    assert got[USER].tolist() == [2, 0] and got[HIST].tolist() == [[3, 1, 0], [1, 0, 0]]
    assert schema(1).fit(cols)[HIST].tolist() == [[1], [2]]
    with pytest.raises(ValueError, match="counts"):
        spec.fit({**cols, COUNTS: np.ones((2, 3), np.float32)})


def test_schema_1_is_pinned():
    """Artifacts exported before the schema was recorded are read as schema 1: if this fails, the
    encoding changed: raise ``SCHEMA_VERSION`` and keep ``recorded_schema`` reading old ones right."""
    assert schema(50).to_json() == {
        "version": 1,
        "inputs": [{"name": "user", "dtype": "int32", "width": None, "vocabulary": "user"},
                   {"name": "hist", "dtype": "int32", "width": 50, "vocabulary": "item"},
                   {"name": "counts", "dtype": "float32", "width": 5, "vocabulary": None}],
        "event_types": ["view", "click", "add_to_cart", "purchase", "rating"]}


def test_a_replica_serves_a_version_by_its_recorded_schema_and_refuses_another(tmp_path):
    folder = tmp_path / "v0001"
    vocab = Vocab([f"u{i}" for i in range(5)], [f"i{i}" for i in range(14)])
    export(folder, _weights(vocab, HISTORY), vocab, ModelConfig(history=HISTORY))  # a tiny model version
    recorded = json.loads((folder / user_input.FILE).read_text())
    assert recorded == schema(HISTORY).to_json()  # export records it
    model = load_model(folder)
    assert model.tower.schema == schema(HISTORY)
    features = _online(_events())[-3:]
    assert model.user_embedding(features).shape == (3, 8)

    ages = {"name": "ages", "dtype": "float32", "width": HISTORY, "vocabulary": None}
    for changed, named in (({**recorded, "version": 2}, "schema 2 (user int32, hist int32[4], counts float32[5]; "),
                           ({**recorded, "event_types": recorded["event_types"][::-1]}, "; counts of rating, purchase, "),
                           ({**recorded, "inputs": recorded["inputs"] + [ages]}, "counts float32[5], ages float32[4]; "),
                           ({"version": 2, "features": ["x"]}, '{"version":2,"features":["x"]}')):
        (folder / user_input.FILE).write_text(json.dumps(changed))
        with pytest.raises(UnsupportedUserInput) as caught:
            load_model(folder)
        recorded_part, code_part = str(caught.value).split("; this code encodes ")
        assert recorded_part.startswith("model v0001 was trained on user input ") and named in recorded_part + ";"
        assert code_part.startswith(f"{schema(HISTORY)}: serve v0001 with the code that trained it")
        assert code_part.startswith("schema 1 (user int32, hist int32[4], counts float32[5]; counts of view, click, ")

    # A version exported before models recorded their schema: schema 1, served as before.
    (folder / user_input.FILE).unlink()
    assert load_model(folder).tower.schema == schema(HISTORY)


def test_a_replica_filters_by_the_seen_policy_its_card_states(tmp_path):
    """Issue 34: training writes the seen policy to the card; the replica reads it back as its
    filter. A card without one (before the policy) filters every type, as before."""
    from recsys.features import ALL_TYPES, SEEN_POLICIES
    from recsys.registry import CARD
    from training.job import fixed_seen_policy, policies_differ
    folder = tmp_path / "v0001"
    vocab = Vocab([f"u{i}" for i in range(5)], [f"i{i}" for i in range(14)])
    export(folder, _weights(vocab, HISTORY), vocab, ModelConfig(history=HISTORY))
    assert load_model(folder).filter_types == ALL_TYPES
    card = {"version": "v0001", "seen_policy": fixed_seen_policy("purchase+rating", "training.seen_policy")}
    (folder / CARD).write_text(json.dumps(card))
    assert load_model(folder).filter_types == SEEN_POLICIES["purchase+rating"]
    ratings = events_table(_events()).set_column(3, "type", pa.array(["rating"] * len(_events())))
    assert policies_differ(events_table(_events())) and not policies_differ(ratings)
