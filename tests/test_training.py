"""The training job on a real local Ray cluster with real TensorFlow workers, the artifacts
it publishes, the registry, and bad inputs. No fakes.

Budget: a few minutes on 2 cores (small epochs and dims; Ray started once per session).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recsys.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parents[1]
SYN = "synthetic:events=40000,users=1500,items=600,clusters=12,seed=5,taste=0.9"
FAST = {"dim": 32, "user_dim": 16, "hidden": 64, "batch_size": 128, "temperature": 0.1, "learning_rate": 0.005}


@pytest.fixture
def settings(tmp_path):
    from recsys.settings import get_settings
    return get_settings().updated(home=tmp_path / "home", registry_dir=tmp_path / "models")


@pytest.fixture(scope="module")
def synthetic_models(ray_session, tmp_path_factory):
    """SYN trained once by 1 and once by 2 workers (``FAST``, 4 epochs) into one registry, for every
    test of this module that needs such a published model (quality, a distillation teacher):
    the same content is trained once, not once per test."""
    from recsys.model import ModelConfig
    from recsys.settings import get_settings
    from recsys.sources import open_source
    from recsys.training_data import events_table
    from training.data import Prepared
    from training.job import train
    folder = tmp_path_factory.mktemp("synthetic-models")
    s = get_settings().updated(home=folder / "home", registry_dir=folder / "models")
    prep = Prepared(events_table(open_source(SYN).events_iter()), None, ModelConfig.from_dict(FAST),
                    s.features.recent_items)
    cards = {w: train(SYN, workers=w, epochs=4, settings=s, model_config=FAST, prepared=prep) for w in (1, 2)}
    return {"settings": s, "prepared": prep, "cards": cards}


def _env(settings) -> dict:
    env = dict(os.environ)
    env["RECSYS_HOME"] = str(settings.home)
    env["RECSYS_REGISTRY_DIR"] = str(settings.registry_dir)
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("RECSYS_SECRET_USER_ID_KEY", "test-pseudonym-key")  # no `recsys stack up` in the fast tier
    return env


def _cli(settings, *args, timeout=600, private_ray=False) -> subprocess.CompletedProcess:
    env = _env(settings)
    if private_ray:  # the command line's default: a Ray of its own for the run, not the stack's (RAY_ADDRESS)
        env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- the required end-to-end check: MovieLens-100K, 2 workers, beats item-kNN ------------------------

@pytest.mark.services  # `recsys train` starts Ray
def test_movielens_two_workers_beat_recency_weighted_ease_and_publish_a_servable_model(ml100k, settings):
    """Protocol A, the default config (`recsys bench train` shows what the validation targets
    choose). Issue 14's target is 1.15x recency-weighted EASE; 2-worker runs measured 1.08-1.18x
    (README "Training and evaluation"), so this guards 1.05x against regressions."""
    r = _cli(settings, "train", "--source", f"movielens:{ml100k}", "--workers", "2", "--json", private_ray=True)
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads(r.stdout.strip().splitlines()[-1])
    epochs = card["config"]["epochs"]
    assert f"[train] epoch {epochs}/{epochs}" in r.stdout + r.stderr  # progress printed while it ran
    m = card["metrics"]
    assert card["data_window"]["protocol"] == "A" and card["protocol"].startswith("A: ")
    assert m["itemknn"]["hr@10"] == pytest.approx(0.109, abs=0.003)  # baselines beside it, same split
    ratio = m["two_tower"]["hr@10"] / m["recency_ease"]["hr@10"]
    print(f"two-tower HR@10 {m['two_tower']['hr@10']:.4f}, recency-weighted EASE {m['recency_ease']['hr@10']:.4f} "
          f"(chosen on validation: {m['recency_ease']['chosen']}), ratio {ratio:.3f}")
    assert ratio >= 1.05, m
    assert m["two_tower"]["users"] == 943
    assert card["training"]["workers"] == 2 and card["training"]["examples_per_s"] > 0
    assert card["data_window"]["events"] == 100_000 and card["data_window"]["min_ts"] < card["data_window"]["max_ts"]
    # 1682 items: exact search over the items' codes (recsys.ann.default_kind); its recall@10 counts
    # against the fp32 vectors, on test users that did not tune the index. The card says what is served.
    from recsys.ann import default_kind
    comp = card["compression"]
    assert card["ann"]["kind"] == comp["index"] == default_kind(1682, comp["items"]), (card["ann"], comp)
    assert card["ann"]["recall@10"] >= 0.95 and card["ann"]["held_out_queries"] >= 400, card["ann"]
    assert comp["tower"] == settings.training.tower_precision and comp["fp32"]["hr@10"] > 0
    # Issue 16's target is a 1% relative loss at most (`recsys bench compression`); one user of 943
    # is 0.5% of HR@10 here, so the guard against a regression allows 5 users.
    assert comp["hr@10_relative_change"] >= -0.025, comp

    reg = Registry(settings.registry_dir)
    assert reg.current() == card["version"] == "v0001"
    from recsys.model import load_model
    from recsys.training_data import user_features_at
    model = load_model(reg.path("current"))
    assert model.item_embeddings.shape == (1682, card["config"]["dim"]) and len(model.item_ids) == 1682
    assert model.card["version"] == "v0001"
    # A user's embedding from (user id, recent items, counts), and the ANN answers it.
    from recsys.sources import MovieLensSource
    from recsys.training_data import events_table
    table = events_table(MovieLensSource(ml100k).events_iter())
    feats = [user_features_at(table, "1", 10**15), user_features_at(table, "unknown-user", 10**15)]
    emb = model.user_embedding(feats)
    assert emb.shape == (2, card["config"]["dim"]) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    from serving.recommend import recommend
    rec = recommend(model, feats[0], 10, trending=[])
    assert len(rec.items) == 10 and not rec.fallback and not set(rec.items) & feats[0].seen
    # Serving the published model never imports TensorFlow (a fresh process, as a Serve replica).
    serve_only = ("import sys; from recsys.settings import Settings; from serving.models import load_servable; "
                  f"m = load_servable(Settings(registry_dir={str(settings.registry_dir)!r}), 'v0001'); "
                  "print(sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')))")
    loaded = subprocess.run([sys.executable, "-c", serve_only], capture_output=True, text=True)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", (loaded.stdout[-500:], loaded.stderr[-2000:])

    # `evaluate` on the published version reproduces the card's figure.
    r = _cli(settings, "evaluate", "--model", "current", "--source", f"movielens:{ml100k}", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["metrics"]["two_tower"]["hr@10"] == pytest.approx(m["two_tower"]["hr@10"], abs=1e-4)


# ---- synthetic: quality against popularity, 1 vs 2 workers ---------------------------------------------

def test_synthetic_beats_popularity_widely_and_one_or_two_workers_agree(synthetic_models):
    settings, cards = synthetic_models["settings"], synthetic_models["cards"]
    for w, card in cards.items():
        tt, pop = card["metrics"]["two_tower"], card["metrics"]["popularity"]
        assert card["data_window"]["protocol"] == "B"  # events: the next new item
        # "Wide" = at least 2x popularity and 10 points above it.
        assert tt["hr@10"] >= 2 * pop["hr@10"] and tt["hr@10"] - pop["hr@10"] >= 0.10, (w, tt, pop)
    h1, h2 = cards[1]["metrics"]["two_tower"]["hr@10"], cards[2]["metrics"]["two_tower"]["hr@10"]
    print(f"HR@10 1 worker {h1:.4f}, 2 workers {h2:.4f}, most-popular {cards[1]['metrics']['popularity']['hr@10']:.4f}")
    # Measured |h1 - h2| over 5 runs: 0.001-0.018 (sd of the difference 0.007); the bound is about 0.06.
    assert abs(h1 - h2) <= 0.05 + 0.1 * max(h1, h2), (h1, h2)
    assert [c["version"] for c in cards.values()] == ["v0001", "v0002"]
    reg = Registry(settings.registry_dir)
    assert (reg.current(), reg.previous()) == ("v0002", "v0001")


# ---- fault tolerance -------------------------------------------------------------------------------

def test_killed_worker_resumes_from_the_last_checkpoint_and_checkpoints_resume_or_fail_cleanly(
        ray_session, settings, tmp_path):
    from recsys.errors import TrainingError
    from training.job import train
    marker = tmp_path / "killed-once"
    card = train(SYN, workers=2, epochs=3, settings=settings, model_config=FAST, max_failures=1, publish=False,
                 fail={"epoch": 2, "rank": 1, "marker": str(marker)})
    assert marker.exists()  # worker 1 really died in epoch 2 on the first attempt
    assert card["training"]["resumed_from_epoch"] == 1  # the restart began after epoch 1, not from scratch
    assert [h["epoch"] for h in card["training"]["history"]] == [1, 2, 3]
    assert card["metrics"]["two_tower"]["hr@10"] > card["metrics"]["popularity"]["hr@10"]

    # A new run resumes from that run's last checkpoint folder.
    ckpt = Path(card["training"]["checkpoint_dir"])
    resumed = train(SYN, workers=1, epochs=4, settings=settings, model_config=FAST, resume_from=ckpt)
    assert resumed["training"]["resumed_from_epoch"] == 3
    assert [h["epoch"] for h in resumed["training"]["history"]] == [1, 2, 3, 4]

    # A corrupted checkpoint: a clear error, in the API and on the command line, registry untouched.
    (ckpt / "state.npz").write_bytes(b"PK\x03\x04 not really a zip")
    before = sorted(p.name for p in settings.registry_dir.iterdir())
    with pytest.raises(TrainingError, match="corrupted"):
        train(SYN, workers=1, epochs=5, settings=settings, model_config=FAST, resume_from=ckpt)
    r = _cli(settings, "train", "--source", SYN, "--workers", "1", "--resume-from", str(ckpt))
    assert r.returncode != 0 and "corrupted" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in settings.registry_dir.iterdir()) == before


def test_a_failed_run_leaves_no_checkpoint_behind(ray_session, settings, tmp_path):
    """A run's checkpoints hold user rows (the embedding tables): a run that fails removes them."""
    import tempfile

    from recsys.errors import TrainingError
    from training.job import train
    local_copies = set(Path(tempfile.gettempdir()).glob("recsys-ckpt-*"))
    with pytest.raises(TrainingError, match="training failed"):
        train(SYN, workers=1, epochs=2, settings=settings, model_config=FAST, max_failures=0,
              fail={"epoch": 2, "rank": 0, "marker": str(tmp_path / "killed"), "delay_s": 3.0})
    assert (tmp_path / "killed").exists()  # it failed after epoch 1's checkpoint was reported
    left = [p for p in (settings.home / "ray_results").rglob("*") if p.is_file()]
    assert left == [] and set(Path(tempfile.gettempdir()).glob("recsys-ckpt-*")) == local_copies


# ---- the towers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("newest", [0, 1, 3])
def test_numpy_user_tower_matches_the_tensorflow_tower(newest):
    """The numpy tower is the TensorFlow tower's arithmetic, with or without the newest items'
    own embeddings (``newest_w``), an empty or a one-item history among the users."""
    from recsys.model import ModelConfig, NumpyUserTower, Vocab, item_embeddings_np
    from recsys.user_input import COUNTS, HIST, USER, schema
    from training.model import build_model, model_weights
    cfg = ModelConfig(dim=16, user_dim=8, hidden=32, history=7, share_item_table=False, newest=newest)
    genres = np.random.default_rng(0).integers(0, 2, (21, 4)).astype(np.float32)
    model = build_model(cfg, n_users=10, n_items=20, item_genres=genres)
    rng = np.random.default_rng(1)
    model.pos_logits.assign(rng.normal(0, 1.0, cfg.history).astype(np.float32))
    user = rng.integers(0, 11, 6).astype(np.int32)
    hist = rng.integers(0, 21, (6, 7)).astype(np.int32)
    hist[0] = 0  # a user without history
    hist[1, 1:] = 0  # one item
    counts = rng.random((6, 5)).astype(np.float32)
    inputs = {USER: user, HIST: hist, COUNTS: counts}
    expected = model.user_tower(inputs).numpy()
    w = model_weights(model)
    assert ("newest_w" in w) == bool(newest)
    vocab = Vocab([f"u{i}" for i in range(10)], [f"i{i}" for i in range(20)], [f"g{i}" for i in range(4)], genres)
    got = NumpyUserTower(w, vocab, schema(cfg.history)).embed_encoded(inputs)
    assert np.allclose(got, expected, atol=1e-5)
    items = model.item_tower(np.arange(1, 21, dtype=np.int32)).numpy()
    assert np.allclose(item_embeddings_np(w, genres), items, atol=1e-5)


# ---- compression -----------------------------------------------------------------------------------

def test_compressed_models_agree_with_the_fp32_model_on_the_top_10_of_test_users(ray_session, settings):
    """fp16 and int8 serving (the user tower's tables and matrices, and the index's item codes),
    against the fp32 model's exact top 10 for the first 300 test users: the served lists, through
    the index, as a replica answers. Bounds: fp16 >= 0.97, int8 >= 0.85 (`recsys bench compression`
    shows the figures on MovieLens-100K and the synthetic stream)."""
    from recsys.model import ModelConfig
    from lab.bench.compression import measure_served
    from training.data import Prepared, load_table
    from training.job import evaluate_weights, load_serving_weights, train
    table, features, _ = load_table(SYN, settings)
    prepared = Prepared(table, features, ModelConfig.from_dict(FAST), settings.features.recent_items)
    card = train(SYN, workers=1, epochs=4, settings=settings, model_config=FAST, prepared=prepared, publish=False,
                 baselines={})  # the fp32 weights (a published version keeps only the served, compressed tower)
    weights = load_serving_weights(card["training"]["checkpoint_dir"])
    cfg = ModelConfig.from_dict(card["config"])
    prep = prepared.at("test").with_history(cfg.history)
    fp32, _, items = evaluate_weights(prep, weights, cfg)
    served = {p: measure_served(prep, weights, cfg, items, fp32, settings, p) for p in ("fp32", "fp16", "int8")}
    overlap = {p: r["top10_overlap_vs_fp32"] for p, r in served.items()}
    print("top-10 overlap with the fp32 model:", overlap, {p: r["hr@10"] for p, r in served.items()})
    assert overlap["fp32"] >= 0.99 and overlap["fp16"] >= 0.97 and overlap["int8"] >= 0.85, overlap
    assert served["fp32"]["hr@10"] == pytest.approx(fp32["hr@10"], abs=1e-3)
    assert served["int8"]["tower_bytes"] < served["fp16"]["tower_bytes"] < served["fp32"]["tower_bytes"]
    assert served["int8"]["index_bytes"] <= 0.26 * served["fp32"]["index_bytes"]
    assert [served[p]["index"] for p in served] == ["flat", "flat_fp16", "flat_int8"]  # 600 items: exact search


# ---- distillation from a published teacher ------------------------------------------------------------

def test_distill_kl_zero_for_the_teachers_logits_positive_otherwise_with_a_gradient():
    import tensorflow as tf

    from recsys.model import ModelConfig
    from training.model import build_model, distillation_kl, sampled_softmax_loss
    rng = np.random.default_rng(0)
    t = tf.constant(rng.normal(size=(6, 9)) * 3, tf.float32)
    valid = tf.constant(rng.random((6, 9)) > 0.2)
    for temp in (1.0, 3.0):
        assert float(distillation_kl(t, t, valid, temp)) == pytest.approx(0.0, abs=1e-5)
        # Logits only on masked candidates differ: still 0 (they are out of the KL).
        assert float(distillation_kl(tf.where(valid, t, 50.0), t, valid, temp)) == pytest.approx(0.0, abs=1e-5)
    s = tf.Variable(rng.normal(size=(6, 9)), dtype=tf.float32)
    with tf.GradientTape() as tape:
        kl = distillation_kl(s, t, valid, 2.0)
    grad = tape.gradient(kl, s).numpy()
    assert float(kl) > 0 and np.isfinite(grad).all() and np.abs(grad).sum() > 0
    assert np.all(grad[~valid.numpy()] == 0)  # nothing flows to a masked candidate
    assert float(distillation_kl(s, t, tf.zeros_like(valid), 2.0)) == 0.0  # a row without candidates adds 0

    # A teacher that is the student itself: the loss is (1 - w) * the plain loss (KL 0), and with
    # weight 0 the plain loss exactly.
    cfg = ModelConfig(dim=8, user_dim=4, hidden=16, history=5, distill_weight=0.3, distill_temperature=2.0)
    model = build_model(cfg, n_users=12, n_items=20, item_genres=np.zeros((21, 0), np.float32))
    batch = {"user": tf.constant(rng.integers(0, 13, 16), tf.int32), "hist": tf.constant(rng.integers(0, 21, (16, 5)), tf.int32),
             "counts": tf.constant(rng.random((16, 5)), tf.float32), "item": tf.constant(rng.integers(1, 9, 16), tf.int32)}
    log_q = tf.constant(np.log(rng.dirichlet(np.ones(21))).astype(np.float32))
    u, _ = model(batch, training=False)
    teacher = {"item": model.item_tower(tf.range(21)), "known": tf.constant(np.arange(21) % 4 != 1),
               "temperature": cfg.temperature}
    plain = float(sampled_softmax_loss(model, batch, log_q, 20, cfg, training=False))
    no_weight = replace(cfg, distill_weight=0.0)
    assert float(sampled_softmax_loss(model, {**batch, "teacher_user": u}, log_q, 20, no_weight, training=False,
                                      teacher=teacher)) == plain
    got = float(sampled_softmax_loss(model, {**batch, "teacher_user": u}, log_q, 20, cfg, training=False, teacher=teacher))
    assert got == pytest.approx(0.7 * plain, rel=1e-5)
    other = {**teacher, "item": tf.reverse(teacher["item"], [0])}  # a teacher that disagrees: above that
    assert float(sampled_softmax_loss(model, {**batch, "teacher_user": u}, log_q, 20, cfg, training=False,
                                      teacher=other)) > 0.7 * plain + 1e-3
    with pytest.raises(ValueError, match="distill_weight"):
        ModelConfig(distill_weight=1.5)
    with pytest.raises(ValueError, match="distill_temperature"):
        ModelConfig(distill_temperature=0)


def test_distill_a_small_student_from_a_published_teacher_and_refuse_bad_teachers(synthetic_models, settings, tmp_path):
    from recsys.errors import TrainingError
    from training.job import TUNING_GRID, train
    prep = synthetic_models["prepared"]
    teacher = synthetic_models["cards"][1]  # published, dim 32
    folder = Registry(synthetic_models["settings"].registry_dir).path(teacher["version"])
    assert "distillation" not in teacher and teacher["config"]["distill_weight"] == 0
    student = train(SYN, workers=2, epochs=2, settings=settings, model_config={**FAST, "dim": 16, "distill_weight": 0.5},
                    prepared=prep, baselines={}, teacher=folder, promote=False)
    d = student["distillation"]
    assert d["teacher"] == teacher["version"] and d["teacher_dim"] == 32 and d["items_known"] == 1.0
    assert (d["weight"], d["temperature"], d["teacher_temperature"]) == (0.5, 1.0, FAST["temperature"])
    assert student["config"]["dim"] == 16 and np.isfinite(student["metrics"]["two_tower"]["hr@10"])
    assert student["metrics"]["two_tower"]["users"] > 0 and np.isfinite(student["training"]["history"][-1]["loss"])
    print(f"teacher dim 32 HR@10 {teacher['metrics']['two_tower']['hr@10']:.4f}, "
          f"student dim 16 distilled HR@10 {student['metrics']['two_tower']['hr@10']:.4f}")

    # Refused before any data is read: not a version folder, tuning with a teacher, a weight without one.
    with pytest.raises(TrainingError, match="not a published model version folder"):
        train(SYN, settings=settings, teacher=tmp_path)
    with pytest.raises(TrainingError, match="tuning"):
        train(SYN, settings=settings, teacher=folder, tune_grid=TUNING_GRID)
    with pytest.raises(TrainingError, match="without a teacher"):
        train(SYN, settings=settings, model_config={"distill_weight": 0.5})
    before = Registry(settings.registry_dir).list()
    r = _cli(settings, "train", "--source", SYN, "--workers", "1", "--distill-from", "v0099")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "v0099" in lines[0], r.stderr[-2000:]
    assert Registry(settings.registry_dir).list() == before


# ---- registry ----------------------------------------------------------------------------------------

def _publish(reg: Registry, tag: str, delay: float = 0.0) -> str:
    def write(folder: Path, version: str):
        (folder / "item_embeddings.npy").write_bytes(b"x" * 1000)
        time.sleep(delay)
        (folder / "model_card.json").write_text(json.dumps({"version": version, "tag": tag}))
    return reg.publish(write)


def test_registry_promote_rollback_and_atomic_pointers(tmp_path):
    reg = Registry(tmp_path / "models")
    with pytest.raises(RegistryError, match="no previous"):
        reg.rollback()
    v1, v2 = _publish(reg, "a"), _publish(reg, "b")
    assert (v1, v2) == ("v0001", "v0002") and reg.list() == [v1, v2]
    assert (reg.current(), reg.previous()) == (v2, v1)
    assert reg.rollback() == {"current": v1, "previous": v2, "experiment": None}
    assert reg.promote("2") == {"current": v2, "previous": v1, "experiment": None}
    # An experiment: a candidate for a share of users; promoting (or a rollback) ends it.
    with pytest.raises(RegistryError, match="is the current model"):
        reg.start_experiment("2", 0.5)
    with pytest.raises(RegistryError, match="share"):
        reg.start_experiment("1", 0.0)
    assert reg.start_experiment("1", 0.25, shadow=True)["experiment"]["candidate"] == v1
    assert (reg.current(), reg.experiment()["share"], reg.experiment()["shadow"]) == (v2, 0.25, True)
    assert reg.end_experiment()["experiment"] is None
    with pytest.raises(RegistryError, match="no experiment"):
        reg.end_experiment()
    reg.start_experiment("1", 0.5)
    assert reg.promote("2") == {"current": v2, "previous": v1, "experiment": None}
    assert reg.show("current")["tag"] == "b" and reg.show("v0001")["is_previous"]
    with pytest.raises(RegistryError, match="no version"):
        reg.promote("v0009")

    # Readers hammering the pointers while a writer flips them never see a torn or mixed state.
    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            p = reg.pointers()
            if (p["current"], p["previous"]) not in {(v1, v2), (v2, v1), ("v0003", v1), ("v0003", v2)}:
                bad.append(p)
            for v in reg.list():  # a listed version is always complete
                if not (reg.root / v / "model_card.json").exists():
                    bad.append(v)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(300):
        reg.rollback()
    v3 = _publish(reg, "c", delay=0.3)  # slow writer: readers must not list v0003 before it is complete
    stop.set()
    for t in threads:
        t.join()
    assert not bad[:1], bad[:3]
    assert reg.current() == v3


def test_ending_an_experiment_cannot_undo_a_promote_made_meanwhile(tmp_path, monkeypatch):
    """Issue 35: the guardrail's end_experiment read the pointers, an operator's promote wrote
    new ones, and end_experiment then wrote the old current back. Under the pointers' lock the
    promote waits for it, and both take effect."""
    reg = Registry(tmp_path / "models")
    v1, v2, v3 = (_publish(reg, tag) for tag in "abc")
    reg.promote(v1)
    reg.start_experiment(v2, 0.5)
    running = reg.experiment()
    operator = Registry(reg.root)
    promoting = threading.Thread(target=operator.promote, args=(v3,))
    read = Registry.pointers

    def pointers_then_a_promote(self):
        p = read(self)
        if self is reg and promoting.ident is None:
            promoting.start()
            promoting.join(timeout=1.0)  # done at once without the lock; with it, it waits for ours
        return p

    monkeypatch.setattr(Registry, "pointers", pointers_then_a_promote)
    reg.end_experiment(expected=running)
    promoting.join()
    assert operator.pointers() == {"current": v3, "previous": v1, "experiment": None}


def test_file_sums_name_every_changed_or_missing_file_and_servers_try_the_last_good_version(tmp_path):
    from recsys.registry import CorruptVersion, file_sums, verify_files
    from serving.models import load_order
    folder = tmp_path / "v0001"
    (folder / "ann").mkdir(parents=True)
    (folder / "a.npy").write_bytes(b"1234")
    (folder / "ann" / "b.npy").write_bytes(b"5678")
    (folder / "model_card.json").write_text("{}")
    sums = file_sums(folder)
    assert sorted(sums) == ["a.npy", "ann/b.npy"]  # the card is not its own sum
    verify_files(folder, sums)
    (folder / "a.npy").write_bytes(b"12")
    (folder / "ann" / "b.npy").unlink()
    with pytest.raises(CorruptVersion, match=r"a\.npy, ann/b\.npy"):
        verify_files(folder, sums)

    reg = Registry(tmp_path / "models")
    settings = type("S", (), {"registry_dir": reg.root})()
    assert load_order(settings) == []
    for tag in "abcd":
        _publish(reg, tag)
    reg.promote("v0002")  # current v0002, previous v0004
    assert load_order(settings) == ["v0002", "v0004", "v0003", "v0001"]


def test_failed_publish_leaves_the_registry_untouched(tmp_path):
    reg = Registry(tmp_path / "models")
    _publish(reg, "a")
    before = (reg.list(), reg.pointers(), sorted(p.name for p in reg.root.iterdir()))

    def broken(folder: Path, version: str):
        (folder / "half.npy").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        reg.publish(broken)
    assert (reg.list(), reg.pointers(), sorted(p.name for p in reg.root.iterdir())) == before


def test_models_cli(settings):
    reg = Registry(settings.registry_dir)
    _publish(reg, "a"), _publish(reg, "b")
    r = _cli(settings, "models", "rollback", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"current": "v0001", "previous": "v0002", "experiment": None}
    r = _cli(settings, "models", "list", "--json")
    assert [v["version"] for v in json.loads(r.stdout)["versions"]] == ["v0001", "v0002"]
    r = _cli(settings, "models", "promote", "v0002", "--json")
    assert json.loads(r.stdout)["current"] == "v0002"
    r = _cli(settings, "models", "candidate", "v0001", "--share", "0.3", "--shadow", "--json")
    experiment = json.loads(r.stdout)["experiment"]
    assert r.returncode == 0 and (experiment["candidate"], experiment["share"], experiment["shadow"]) == ("v0001", 0.3, True)
    assert json.loads(_cli(settings, "models", "stop", "--json").stdout)["experiment"] is None
    r = _cli(settings, "models", "stop")
    assert r.returncode != 0 and "no experiment" in r.stderr
    r = _cli(settings, "models", "show", "v0009")
    assert r.returncode != 0 and "no version" in r.stderr


# ---- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, message", [
    ("synthetic:events=0", "empty"),
    ("synthetic:events=500,users=1,items=50,clusters=5", "only 1 user"),
    ("csv:{csv}", "has no column"),
    ("movielens:/nonexistent", "not found"),
])
def test_bad_inputs_exit_nonzero_with_a_clear_message_and_leave_the_registry_alone(settings, tmp_path, source, message):
    csv = tmp_path / "events.csv"
    csv.write_text("who,what,when\n1,2,3\n")
    reg = Registry(settings.registry_dir)
    _publish(reg, "existing")
    before = (reg.list(), reg.pointers())
    r = _cli(settings, "train", "--source", source.format(csv=csv), "--workers", "1", "--epochs", "1")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert (reg.list(), reg.pointers()) == before
