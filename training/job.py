"""The training job: point-in-time examples -> two-tower on Ray Train -> evaluation -> registry.

``train(...)`` runs ``ray.train.tensorflow.TensorflowTrainer`` with N workers; each
worker builds a ``MultiWorkerMirroredStrategy`` (RING collectives on CPU, NCCL with
GPUs), reads only its own shard of the examples (one object in the Ray object store
per worker), runs a custom loop (``strategy.run``: in-batch softmax needs its own step),
prints progress each epoch and reports a checkpoint each epoch. A killed worker makes
Ray restart the group (``FailureConfig(max_failures)``) and the loop resumes from the
last reported checkpoint (``ray.train.get_checkpoint``); ``resume_from`` resumes a new
run from a checkpoint folder (Ray Train v2 takes it through the loop config).

Then the driver evaluates the model against the three baselines on the same split
(EVALUATION.md), builds the ANN index, and publishes a version to the registry.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from recsys import evaluation
from recsys.errors import RecsysError
from recsys.ann import build_index
from recsys.features import COUNT_TYPES
from recsys.model import ModelConfig, NumpyUserTower, Vocab, encode_users, export
from training.model import tf_env
from recsys.training_data import DataError, events_table, iter_point_in_time, sort_table

CHECKPOINT_FILES = ("state.npz", "serving_weights.npz", "meta.json")


class TrainingError(RecsysError):
    """Training could not produce a model; the message says why."""


# ---- data --------------------------------------------------------------------------------------

class Prepared:
    """Everything the workers and the evaluation need, computed once on the driver."""

    def __init__(self, table: pa.Table, item_features, cfg: ModelConfig, recent_items: int):
        table = sort_table(table)
        if table.num_rows == 0:
            raise DataError("no events: the source is empty")
        self.table = table
        self.split = evaluation.split_table(table)
        if self.split.n_users < 2:
            raise DataError(f"only {self.split.n_users} user: need at least 2 users to train and evaluate")
        evaluation.check_evaluable(self.split)
        self.vocab = Vocab.build(self.split.user_ids, self.split.item_ids, item_features)
        hist_len = min(cfg.history, recent_items)
        cfg.history = hist_len
        n = table.num_rows
        users = np.zeros(n, dtype=np.int32)
        items = np.zeros(n, dtype=np.int32)
        hist = np.zeros((n, hist_len), dtype=np.int32)
        counts = np.zeros((n, len(COUNT_TYPES)), dtype=np.float32)
        ii = self.vocab.item_index
        self.test_features = {}
        test_rows = set(self.split.test_index.tolist())
        for r, (event, feats) in enumerate(iter_point_in_time(table, recent_items)):
            enc = encode_users([feats], self.vocab, hist_len)
            users[r], hist[r], counts[r] = enc["user"][0], enc["hist"][0], enc["counts"][0]
            items[r] = ii[event.item_id]
            if r in test_rows:
                self.test_features[r] = feats
        train = ~self.split.is_test
        self.train = {"user": users[train], "hist": hist[train], "counts": counts[train], "item": items[train]}
        self.test = {"user": users[self.split.test_index], "hist": hist[self.split.test_index],
                     "counts": counts[self.split.test_index]}
        freq = np.bincount(items[train], minlength=self.vocab.n_items + 1).astype(np.float64) + 1e-3
        freq[0] = 1e-3
        self.log_q = np.log(freq / freq.sum()).astype(np.float32)
        self.n_train = int(train.sum())

    def shards(self, workers: int, seed: int) -> list[dict]:
        """Equal-sized shards, one per worker (equal sizes keep the collectives in step)."""
        perm = np.random.default_rng(seed).permutation(self.n_train)
        per = self.n_train // workers
        return [{k: v[perm[w * per:(w + 1) * per]] for k, v in self.train.items()} for w in range(workers)]


def load_table(source: str | pa.Table, settings=None, user_col="user_id", item_col="item_id", ts_col="timestamp"):
    """(events table, item features or None, source name) from a table, ``archive`` or a source spec."""
    if isinstance(source, pa.Table):
        return sort_table(source), None, "table"
    if source == "archive":
        from recsys.archive import read_events
        from recsys.settings import get_settings
        return sort_table(read_events(settings or get_settings())), None, "archive"
    from recsys.sources import open_source
    src = open_source(source, user_col, item_col, ts_col)
    return events_table(src.events_iter()), src.item_features(), source


# ---- checkpoints ------------------------------------------------------------------------------

def validate_checkpoint(folder: Path) -> dict:
    """The checkpoint's meta, or TrainingError saying what is wrong with it."""
    folder = Path(folder)
    try:
        for f in CHECKPOINT_FILES:
            if not (folder / f).is_file():
                raise TrainingError(f"checkpoint {folder}: {f} missing")
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "state.npz") as z:
            n = len(z.files)
            for k in z.files:
                z[k]  # reads and CRC-checks every array
        with np.load(folder / "serving_weights.npz") as z:
            for k in z.files:
                z[k]
        if n != meta["n_model"] + meta["n_opt"]:
            raise TrainingError(f"checkpoint {folder}: state.npz holds {n} arrays, meta says "
                                f"{meta['n_model'] + meta['n_opt']}")
        return meta
    except TrainingError:
        raise
    except Exception as exc:  # zip, json, key errors: all mean a damaged checkpoint
        raise TrainingError(f"checkpoint {folder} is corrupted: {type(exc).__name__}: {exc}") from None


def _opt_vars(opt):
    v = opt.variables
    return list(v() if callable(v) else v)


def _save_checkpoint(folder: Path, model, opt, epoch: int, history: list, start_epoch: int) -> None:
    from training.model import model_weights
    mw = model.get_weights()
    ov = [v.numpy() for v in _opt_vars(opt)]
    np.savez(folder / "state.npz", **{f"m{i}": w for i, w in enumerate(mw)}, **{f"o{i}": w for i, w in enumerate(ov)})
    np.savez(folder / "serving_weights.npz", **model_weights(model))
    (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "n_model": len(mw), "n_opt": len(ov),
                                                  "history": history, "start_epoch": start_epoch}))


def _restore_checkpoint(folder: Path, model, opt) -> dict:
    meta = validate_checkpoint(folder)
    with np.load(Path(folder) / "state.npz") as z:
        mw = [z[f"m{i}"] for i in range(meta["n_model"])]
        ov = [z[f"o{i}"] for i in range(meta["n_opt"])]
    model.set_weights(mw)
    ovars = _opt_vars(opt)
    if len(ovars) != len(ov):
        raise TrainingError(f"checkpoint {folder}: optimizer state has {len(ov)} variables, model needs {len(ovars)}")
    for var, val in zip(ovars, ov):
        var.assign(val)
    return meta


# ---- the worker loop --------------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    os.environ.update(tf_env())
    import ray
    import ray.train
    import tensorflow as tf
    import tf_keras

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = int(config.get("threads", 1))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    impl = (tf.distribute.experimental.CommunicationImplementation.NCCL if config["use_gpu"]
            else tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            bytes_per_pack=32 * 1024 * 1024, implementation=impl))
    if config["use_gpu"] and config["mixed_precision"]:
        tf_keras.mixed_precision.set_global_policy("mixed_float16")

    from training.model import build_model, sampled_softmax_loss
    cfg = ModelConfig.from_dict(config["model"])
    shard = ray.get(config["shards"][rank])  # this worker's shard only
    log_q = tf.constant(config["log_q"])
    n_items = int(config["n_items"])
    bsz = cfg.batch_size
    steps = len(shard["item"]) // bsz
    if steps == 0:
        raise TrainingError(f"worker {rank}: {len(shard['item'])} examples, fewer than one batch of {bsz}")

    with strategy.scope():
        model = build_model(cfg, int(config["n_users"]), n_items, np.asarray(config["item_genres"]))
        opt = tf_keras.optimizers.Adam(learning_rate=cfg.learning_rate)
        if config["use_gpu"] and config["mixed_precision"]:
            opt = tf_keras.mixed_precision.LossScaleOptimizer(opt)
        opt.build(model.trainable_variables)

    start_epoch, history = 0, []
    ckpt = ray.train.get_checkpoint()
    source_ckpt = "ray"
    if ckpt is None and config.get("resume_from"):
        ckpt, source_ckpt = ray.train.Checkpoint.from_directory(config["resume_from"]), "resume_from"
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = _restore_checkpoint(Path(d), model, opt)
        start_epoch, history = meta["epoch"] + 1, meta.get("history", [])
        if rank == 0:
            print(f"[train] resumed from the checkpoint of epoch {meta['epoch'] + 1} ({source_ckpt})", flush=True)

    def dataset_fn(input_context):
        ds = tf.data.Dataset.from_tensor_slices(shard)
        ds = ds.shuffle(len(shard["item"]), seed=cfg.seed + rank, reshuffle_each_iteration=True).repeat()
        return ds.batch(bsz, drop_remainder=True).prefetch(4)

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))

    table_floats = (int(config["n_items"]) + 1) * cfg.dim * 2 + (int(config["n_users"]) + 1) * cfg.user_dim
    dense_grads = table_floats <= int(config.get("dense_grad_limit", 8_000_000))

    def step_fn(batch):
        with tf.GradientTape() as tape:
            loss = sampled_softmax_loss(model, batch, log_q, n_items, cfg, training=True)
            scaled = loss / strategy.num_replicas_in_sync
            if isinstance(opt, tf_keras.mixed_precision.LossScaleOptimizer):
                scaled = opt.get_scaled_loss(scaled)
        grads = tape.gradient(scaled, model.trainable_variables)
        if isinstance(opt, tf_keras.mixed_precision.LossScaleOptimizer):
            grads = opt.get_unscaled_gradients(grads)
        if dense_grads:  # one packed all-reduce beats all-gathering B*L embedding rows per step
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss / strategy.num_replicas_in_sync

    @tf.function
    def run_epoch(it):
        total = tf.constant(0.0)
        for _ in tf.range(steps):
            total += strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step_fn, args=(next(it),)), axis=None)
        return total / steps

    fail = config.get("fail")
    for epoch in range(start_epoch, cfg.epochs):
        if fail and epoch + 1 == fail["epoch"] and rank == fail.get("rank", world - 1) \
                and not os.path.exists(fail["marker"]):
            # The other workers are already blocked in epoch's first all-reduce; wait past the
            # controller's poll (2 s) so the last epoch's checkpoint is registered, then die hard.
            time.sleep(float(fail.get("delay_s", 5.0)))
            Path(fail["marker"]).write_text(f"worker {rank} killed in epoch {epoch + 1}\n")
            print(f"[train] fault injection: worker {rank} exits in epoch {epoch + 1}", flush=True)
            os._exit(1)
        t0 = time.perf_counter()
        loss = float(run_epoch(iterator))
        secs = time.perf_counter() - t0
        rate = steps * bsz * world / secs
        history.append({"epoch": epoch + 1, "loss": round(loss, 4), "examples_per_s": round(rate, 1),
                        "seconds": round(secs, 2)})
        metrics = {"epoch": epoch + 1, "loss": loss, "examples_per_s": rate, "start_epoch": start_epoch,
                   "history": json.dumps(history)}
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f} examples/s {rate:,.0f} "
                  f"({secs:.1f}s, {world} worker{'s' * (world > 1)})", flush=True)
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(Path(d), model, opt, epoch, history, start_epoch)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


# ---- the driver -------------------------------------------------------------------------------

def ensure_ray(workers: int, use_gpu: bool, worker_niceness: int = 0) -> bool:
    """Start a private local Ray sized for this box, or join ``RAY_ADDRESS`` when it is set;
    True if this call connected (the caller then disconnects when done).

    ``address="local"``: training does not compete with the Serve replicas of the stack's
    cluster (``ray start``); a process already connected to a cluster trains there.
    """
    import ray
    if ray.is_initialized():
        return False
    os.environ["RAY_worker_niceness"] = str(worker_niceness)  # read by the raylet this call may start
    env = {"env_vars": tf_env()}
    common = dict(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="ERROR",
                  logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"), runtime_env=env)
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, **{k: v for k, v in common.items() if k != "include_dashboard"})
    else:
        ray.init(address="local", num_cpus=max(2, workers), **common)  # GPUs: detected
    return True


def run_ray_training(prep: Prepared, cfg: ModelConfig, workers: int = 2, use_gpu: bool = False,
                     mixed_precision: bool = False, max_failures: int = 2, resume_from: Optional[Path] = None,
                     fail: Optional[dict] = None, storage: Optional[Path] = None, worker_niceness: int = 0) -> dict:
    """Train on Ray; returns {"checkpoint_dir": local copy of the last checkpoint, "meta": ..., "seconds": ...}."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    os.environ.update(tf_env())  # ray.train.tensorflow imports TensorFlow in this process
    from ray.train.tensorflow import TensorflowTrainer

    if workers < 1:
        raise TrainingError("workers must be >= 1")
    if mixed_precision and not use_gpu:
        raise TrainingError("mixed precision (mixed_float16) is for GPUs only: add --use-gpu")
    if resume_from is not None:
        validate_checkpoint(resume_from)
    started = ensure_ray(workers, use_gpu, worker_niceness)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if use_gpu and gpus < workers:
            raise TrainingError(f"--use-gpu: one GPU per worker, but the Ray cluster has {gpus:g} GPU(s) for {workers} workers")
        cpus = ray.cluster_resources().get("CPU", 2)
        per_worker_cpu = 1.0 if cpus >= workers else cpus / workers
        shards = [ray.put(s) for s in prep.shards(workers, cfg.seed)]
        storage = Path(storage or Path(tempfile.gettempdir()) / "recsys-ray-train").resolve()
        storage.mkdir(parents=True, exist_ok=True)
        name = f"train-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        config = {"model": asdict(cfg), "shards": shards, "log_q": prep.log_q, "n_items": prep.vocab.n_items,
                  "n_users": prep.vocab.n_users, "item_genres": prep.vocab.item_genres, "use_gpu": use_gpu,
                  "mixed_precision": mixed_precision, "threads": max(1, int(per_worker_cpu)),
                  "resume_from": str(resume_from) if resume_from else None, "fail": fail}
        trainer = TensorflowTrainer(
            train_loop_per_worker, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": per_worker_cpu, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as exc:
            raise TrainingError(f"training failed: {exc}".splitlines()[0][:500]) from exc
        seconds = time.perf_counter() - t0
        if result.error is not None:
            raise TrainingError(f"training failed: {result.error}".splitlines()[0][:500])
        if result.checkpoint is None:
            raise TrainingError("training reported no checkpoint")
        local = Path(tempfile.mkdtemp(prefix="recsys-ckpt-"))
        result.checkpoint.to_directory(str(local))
        meta = validate_checkpoint(local)
        shutil.rmtree(storage / name, ignore_errors=True)
        return {"checkpoint_dir": local, "meta": meta, "seconds": seconds, "workers": workers}
    finally:
        if started:  # a private cluster: gone with the run, so this process can join another
            ray.shutdown()


def evaluate_weights(prep: Prepared, weights: dict, cfg: ModelConfig) -> tuple[dict, np.ndarray, np.ndarray]:
    """Two-tower metrics on the split; also (test user embeddings, item embeddings)."""
    from recsys.model import item_embeddings_np
    tower = NumpyUserTower(weights, prep.vocab, cfg.history)
    users = tower.embed_encoded(prep.test["user"], prep.test["hist"], prep.test["counts"])
    items = item_embeddings_np(weights, prep.vocab.item_genres)
    metrics = evaluation.evaluate_scorer(prep.split, lambda pos: users[pos] @ items.T)
    return metrics, users, items


def _load_serving_weights(folder: Path) -> dict:
    with np.load(Path(folder) / "serving_weights.npz") as z:
        return {k: z[k] for k in z.files}


def train(source: str | pa.Table = "synthetic", workers: int = 2, epochs: Optional[int] = None,
          use_gpu: bool = False, mixed_precision: bool = False, settings=None, model_config: Optional[dict] = None,
          max_failures: int = 2, resume_from: Optional[Path] = None, fail: Optional[dict] = None,
          publish: bool = True, promote: bool = True, baselines: Optional[dict] = None,
          ease_lambda="test", user_col="user_id", item_col="item_id", ts_col="timestamp",
          prepared: Optional[Prepared] = None) -> dict:
    """Train, evaluate beside the baselines, publish; returns the model card.

    ``source``: a pyarrow event table, ``"archive"`` (the Parquet event log) or a source spec.
    """
    from recsys.registry import Registry
    from recsys.settings import get_settings
    settings = settings or get_settings()
    cfg = ModelConfig.from_dict({**default_config(), **(model_config or {})})
    if epochs is not None:
        cfg.epochs = int(epochs)
    if resume_from is not None:
        validate_checkpoint(resume_from)  # before any work: a bad checkpoint fails fast
    t_start = time.perf_counter()
    if prepared is None:
        table, item_features, source_name = load_table(source, settings, user_col, item_col, ts_col)
        prepared = Prepared(table, item_features, cfg, settings.recent_items)
    else:
        source_name = source if isinstance(source, str) else "table"
        cfg.history = prepared.test["hist"].shape[1]
    prep = prepared
    t_prep = time.perf_counter() - t_start
    run = run_ray_training(prep, cfg, workers, use_gpu, mixed_precision, max_failures, resume_from, fail,
                           storage=Path(settings.home).resolve() / "ray_results", worker_niceness=settings.ray_worker_niceness)
    weights = _load_serving_weights(run["checkpoint_dir"])
    two_tower, user_emb, item_emb = evaluate_weights(prep, weights, cfg)
    base = baselines if baselines is not None else evaluation.baselines(prep.split, ease_lambda)
    history = run["meta"].get("history", [])
    rates = [h["examples_per_s"] for h in history]
    steady = rates[1:] if len(rates) > 1 else rates
    card = {
        "version": None,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source_name,
        "data_window": prep.split.window(),
        "examples": prep.n_train,
        "metrics": {"two_tower": two_tower, **base},
        "protocol": "temporal leave-last-one-out, full ranking, training items removed (EVALUATION.md)",
        "training": {"seconds": round(run["seconds"], 1), "prepare_seconds": round(t_prep, 1),
                     "workers": workers, "use_gpu": use_gpu, "mixed_precision": mixed_precision,
                     "epochs": cfg.epochs, "examples_per_s": round(float(np.median(steady)), 1) if steady else None,
                     "history": history, "resumed_from_epoch": run["meta"].get("start_epoch", 0)},
        "config": asdict(cfg),
    }
    try:
        if not publish:
            card["training"]["checkpoint_dir"] = str(run["checkpoint_dir"])
            return card
        rng = np.random.default_rng(0)
        queries = user_emb[rng.permutation(len(user_emb))[:500]]
        index = build_index(item_emb, queries)
        card["ann"] = index.meta | {"nprobe": index.nprobe, "nlist": index.nlist}

        def write(folder: Path, version: str) -> None:
            export(folder, weights, prep.vocab, cfg)
            index.save(folder / "ann")
            card["version"] = version
            (folder / "model_card.json").write_text(json.dumps(card, indent=1))

        card["version"] = Registry(settings.registry_dir).publish(write, promote=promote)
        return card
    finally:
        if publish:
            shutil.rmtree(run["checkpoint_dir"], ignore_errors=True)


def default_config() -> dict:
    return asdict(ModelConfig())


def evaluate_version(version_dir: Path, source: str | pa.Table, settings=None, ease_lambda="test",
                     user_col="user_id", item_col="item_id", ts_col="timestamp") -> dict:
    """Metrics of a published model on a source's split, beside the baselines."""
    from recsys.model import load_model
    from recsys.settings import get_settings
    settings = settings or get_settings()
    model = load_model(version_dir)
    table, item_features, name = load_table(source, settings, user_col, item_col, ts_col)
    if table.num_rows == 0:
        raise DataError("no events: the source is empty")
    split = evaluation.split_table(table)
    evaluation.check_evaluable(split)
    test_rows = set(split.test_index.tolist())
    feats = {}
    for r, (_, f) in enumerate(iter_point_in_time(table, settings.recent_items)):
        if r in test_rows:
            feats[r] = f
    users = model.user_embedding([feats[r] for r in split.test_index])
    # Score the split's catalogue with the model's item embeddings (items it never saw score -inf).
    pos = {t: i for i, t in enumerate(model.item_ids)}
    cols = np.array([pos.get(t, -1) for t in split.item_ids])
    emb = np.where(cols[:, None] >= 0, model.item_embeddings[np.maximum(cols, 0)], 0.0).astype(np.float32)

    def score(p):
        s = users[p] @ emb.T
        s[:, cols < 0] = -np.inf
        return s

    return {"version": model.version, "source": name, "data_window": split.window(),
            "metrics": {"two_tower": evaluation.evaluate_scorer(split, score),
                        **evaluation.baselines(split, ease_lambda)}}
