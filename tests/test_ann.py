"""recsys.ann (the FAISS index a version ships) and the compressed user tower: pure and fast, no
services. Every index kind builds, is saved with a model version, loads from its card and answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from recsys.ann import (KINDS, build_index, default_kind, exact_search, load_index, new_index, precision_of,
                        recall_vs_exact)
from lab.bench.ann import clustered_vectors
from recsys.model import (DENSE, TABLES, ModelConfig, NumpyUserTower, Vocab, compress_tower, export, load_model,
                          tower_precision)
from recsys.registry import CARD, file_sums
from recsys.user_input import COUNTS, HIST, USER, schema


def test_an_ivf_index_reaches_its_recall_on_held_out_queries_and_is_exact_with_every_list():
    items, queries = clustered_vectors(20_000, 700, dim=32)
    index = build_index(items, queries[:300], queries[300:], "ivf_flat", target_recall=0.95)
    nlist = index.index.nlist
    assert index.meta["recall@10"] >= 0.95 and index.meta["reached"] and index.meta["held_out_queries"] == 400
    assert index.params["nprobe"] < nlist  # approximate: it scans a part of the catalogue
    assert recall_vs_exact(index.search(queries[300:], 10)[0], exact_search(queries[300:], items, 10)[0]) == \
        pytest.approx(index.meta["recall@10"], abs=1e-4)
    index.set_param(nlist)
    ids, scores = index.search(queries[:5], 10)
    eids, escores = exact_search(queries[:5], items, 10)
    assert np.array_equal(ids, eids) and np.allclose(scores, escores, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_int8", "ivf_pq_refine"])
def test_a_large_k_probes_more_lists_rather_than_answering_padding(kind):
    items, queries = clustered_vectors(4000, 3, dim=32)
    index = new_index(kind, items)
    index.set_param(1)  # one list of about 4000 / 102 items
    ids, scores = index.search(queries, 2000)
    assert ids.shape == (3, 2000) and (ids >= 0).all() and all(len(set(row)) == 2000 for row in ids)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert index.params == {"nprobe": 1}  # the widening is per call


def test_the_default_kind_is_exact_on_small_catalogues_and_ivf_on_large_ones():
    assert default_kind(1682) == "flat" and default_kind(1682, "int8") == "flat_int8"
    assert default_kind(1_000_000, "fp32") == "ivf_flat" and default_kind(1_000_000, "int8") == "ivf_int8"
    assert default_kind(60_000, "fp16", exact_below=100_000) == "flat_fp16"
    with pytest.raises(ValueError, match="precision"):
        default_kind(10, "int4")
    assert [precision_of(k) for k in ("flat", "ivf_int8", "flat_fp16", "ivf_pq")] == ["fp32", "int8", "fp16", "pq"]
    assert set(KINDS) >= {"flat", "ivf_flat", "ivf_int8", "ivf_pq", "hnsw"}


def _tower_weights(rng, n_users: int, n_items: int, cfg: ModelConfig) -> dict:
    w = {"user_table": rng.normal(size=(n_users + 1, cfg.user_dim), scale=0.05),
         "hist_table": rng.normal(size=(n_items + 1, cfg.dim), scale=0.05),
         "pos_logits": -np.log1p(np.arange(cfg.history)) * 0.5,
         "hidden_w": rng.normal(size=(cfg.user_dim + cfg.dim + 5, cfg.hidden), scale=0.2),
         "hidden_b": rng.normal(size=cfg.hidden, scale=0.05),
         "user_out_w": rng.normal(size=(cfg.hidden, cfg.dim), scale=0.2), "user_out_b": np.zeros(cfg.dim),
         "item_out_w": rng.normal(size=(cfg.dim, cfg.dim), scale=0.2), "item_out_b": np.zeros(cfg.dim)}
    w["item_table"] = w["hist_table"]
    if cfg.newest:  # the newest items' kernel (recsys.model.OPTIONAL_WEIGHTS)
        w["newest_w"] = rng.normal(size=(cfg.newest * cfg.dim, cfg.hidden), scale=0.2)
    return {k: np.asarray(v, dtype=np.float32) for k, v in w.items()}


def test_compressed_towers_embed_users_as_the_fp32_tower_does_in_less_memory():
    cfg = ModelConfig(dim=32, user_dim=16, hidden=64, history=10)
    rng = np.random.default_rng(0)
    w = _tower_weights(rng, 200, 500, cfg)
    vocab = Vocab([f"u{i}" for i in range(200)], [f"i{i}" for i in range(500)])
    user, hist = rng.integers(0, 201, 64), rng.integers(0, 501, (64, 10))
    hist[0] = 0
    counts = rng.random((64, 5)).astype(np.float32)
    inputs = {USER: user, HIST: hist, COUNTS: counts}
    ref = NumpyUserTower(w, vocab, schema(10)).embed_encoded(inputs)
    nbytes = {}
    for precision, min_cos in (("fp32", 1 - 1e-6), ("fp16", 0.9999), ("int8", 0.999)):
        cw = compress_tower(w, precision)
        assert tower_precision(cw) == precision
        got = NumpyUserTower(cw, vocab, schema(10)).embed_encoded(inputs)
        assert got.dtype == np.float32 and (np.sum(got * ref, 1) >= min_cos).all(), precision
        nbytes[precision] = sum(a.nbytes for k, a in cw.items() if k.split(".")[0] in TABLES)
        assert all(cw[k].dtype == np.float32 for k in DENSE) or precision == "fp16"  # int8: matrices stay fp32
    # The tables are the bytes that grow with users and items: int8 codes and a scale per row.
    assert nbytes["fp16"] == nbytes["fp32"] / 2 and nbytes["int8"] < 0.3 * nbytes["fp32"]
    with pytest.raises(ValueError, match="precision"):
        compress_tower(w, "int4")


def test_many_users_are_embedded_in_chunks_as_one_batch(monkeypatch):
    import recsys.model
    cfg = ModelConfig(dim=32, user_dim=16, hidden=64, history=10)
    rng = np.random.default_rng(1)
    tower = NumpyUserTower(compress_tower(_tower_weights(rng, 200, 500, cfg), "int8"),
                           Vocab([f"u{i}" for i in range(200)], [f"i{i}" for i in range(500)]), schema(10))
    inputs = {USER: rng.integers(0, 201, 70), HIST: rng.integers(0, 501, (70, 10)),
              COUNTS: rng.random((70, 5)).astype(np.float32)}
    whole = tower.embed_encoded(inputs)
    monkeypatch.setattr(recsys.model, "EMBED_CHUNK", 16)  # 5 chunks, the last one short
    assert np.allclose(tower.embed_encoded(inputs), whole, atol=1e-6) and whole.shape == (70, 32)


def _publish_like_training(folder, kind: str, tower: str, rng) -> tuple[np.ndarray, Vocab]:
    """A version folder as training.job writes it, from random weights: export, the index, the card."""
    cfg = ModelConfig(dim=32, user_dim=16, hidden=64, history=10)
    vocab = Vocab([f"u{i}" for i in range(300)], [f"i{i}" for i in range(3000)])
    w = _tower_weights(rng, 300, 3000, cfg)
    export(folder, w, vocab, cfg, tower=tower)
    items = np.load(folder / "item_embeddings.npy")
    queries = NumpyUserTower(w, vocab, schema(10)).embed_encoded(
        {USER: rng.integers(1, 301, 400), HIST: rng.integers(1, 3001, (400, 10)), COUNTS: np.zeros((400, 5), np.float32)})
    index = build_index(items, queries[:200], queries[200:], kind, target_recall=0.9)
    index.save(folder / "ann")
    card = {"version": folder.name, "compression": {"tower": tower, "items": precision_of(kind), "index": kind},
            "ann": index.meta | {"kind": kind, "params": index.params}}
    card["files"] = file_sums(folder)
    (folder / CARD).write_text(json.dumps(card))
    return queries, vocab


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_index_kind_loads_from_a_model_card_and_answers(tmp_path, kind):
    rng = np.random.default_rng(3)
    folder = tmp_path / "v0001"
    queries, vocab = _publish_like_training(folder, kind, "int8" if "int8" in kind else "fp32", rng)
    model = load_model(folder)
    assert model.index.kind == kind and model.index.params == json.loads((folder / CARD).read_text())["ann"]["params"]
    ids, scores = model.index.search(queries[:3], 10)
    assert ids.shape == (3, 10) and ((ids >= 0) & (ids < 3000)).all()
    exact = exact_search(queries[:3], np.asarray(model.item_embeddings), 10)[0]
    assert recall_vs_exact(ids, exact) >= 0.5, kind  # near neighbours, not any ids
    assert model.scored_item_vectors().shape == (3000, 32)
    assert model.tower.precision == ("int8" if "int8" in kind else "fp32")


def test_a_card_that_disagrees_with_the_stored_tower_is_refused(tmp_path):
    folder = tmp_path / "v0001"
    _publish_like_training(folder, "flat", "fp16", np.random.default_rng(4))
    card = json.loads((folder / CARD).read_text())
    card["compression"]["tower"] = "int8"
    (folder / CARD).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="int8 user tower, the file holds fp16"):
        load_model(folder)


def test_a_version_published_before_the_faiss_index_is_served_by_exact_search(tmp_path):
    folder = tmp_path / "v0001"
    queries, _ = _publish_like_training(folder, "ivf_flat", "fp32", np.random.default_rng(5))
    for f in (folder / "ann").iterdir():
        f.unlink()
    (folder / "ann").rmdir()
    (folder / CARD).write_text(json.dumps({"version": "v0001"}))
    model = load_model(folder)
    assert model.index.kind == "flat"
    assert np.array_equal(model.index.search(queries[:4], 10)[0],
                          exact_search(queries[:4], np.asarray(model.item_embeddings), 10)[0])


def test_a_saved_index_loads_with_its_search_parameter(tmp_path):
    items, queries = clustered_vectors(5000, 5, dim=32)
    index = new_index("hnsw", items)
    index.set_param(24)
    index.save(tmp_path / "ann")
    loaded = load_index(tmp_path / "ann")
    assert loaded.params == {"efSearch": 24} and loaded.index.hnsw.efSearch == 24
    assert np.array_equal(loaded.search(queries, 10)[0], index.search(queries, 10)[0])
