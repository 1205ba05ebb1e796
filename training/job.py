"""The training driver: prepared data -> two-tower on Ray Train -> evaluation -> registry.

``train(...)`` prepares the examples once (``training.data``), puts one shard per worker
in the object store and runs ``ray.train.tensorflow.TensorflowTrainer`` with N workers
(``training.worker``: MultiWorkerMirroredStrategy, RING collectives on CPU, NCCL with
GPUs, a checkpoint each epoch, see ``training.checkpoint``). A killed worker makes Ray
restart the group (``FailureConfig(max_failures)``) and the loop resumes from the last
reported checkpoint; ``resume_from`` resumes a new run from a checkpoint folder.

Then the driver evaluates the model against the baselines on the same split
(EVALUATION.md), builds the ANN index, and publishes a version to the registry.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from recsys import evaluation, user_input
from recsys.ann import AnnIndex, build_index, default_kind, precision_of
from recsys.errors import TrainingError
from recsys.features import SEEN_POLICIES
from recsys.model import ModelConfig, NumpyUserTower, compress_tower, export, item_embeddings_np
from recsys.registry import CARD, Registry, file_sums
from recsys.settings import Settings, TrainingSettings
from recsys.training_data import DataError, iter_point_in_time
from training.checkpoint import validate_checkpoint
from training.data import Prepared, load_table
from training.faults import KillWorkerAtEpoch
from training.model import tf_env
from training.worker import train_loop_per_worker

log = logging.getLogger(__name__)


def _stderr_to(path: str) -> None:
    """A Ray worker's setup hook: append its stderr (TensorFlow's absl lines, Ray Train's INFO
    lines) to ``path`` instead of forwarding it to the driver; its stdout still reaches it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def ensure_ray(workers: int, use_gpu: bool, worker_niceness: int = 0, worker_stderr: Optional[Path] = None) -> bool:
    """Start a private local Ray sized for this box, or join ``RAY_ADDRESS`` when it is set;
    True if this call connected (the caller then disconnects when done).

    ``address="local"``: training does not compete with the Serve replicas of the stack's
    cluster (``ray start``); a process already connected to a cluster trains there.
    ``worker_stderr``: a file for the workers' stderr (quiet); None forwards it to the driver.
    """
    import ray
    if ray.is_initialized():
        return False
    os.environ["RAY_worker_niceness"] = str(worker_niceness)  # read by the raylet this call may start
    env = {"env_vars": tf_env()}
    if worker_stderr is not None:
        worker_stderr.parent.mkdir(parents=True, exist_ok=True)
        path = str(worker_stderr)

        def quiet_worker() -> None:  # Ray wants a named function here, not a partial
            _stderr_to(path)
        env["worker_process_setup_hook"] = quiet_worker
    common = dict(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="ERROR",
                  logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"), runtime_env=env)
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, **{k: v for k, v in common.items() if k != "include_dashboard"})
    else:
        ray.init(address="local", num_cpus=max(2, workers), **common)  # GPUs: detected
    return True


def worker_stderr(settings: Settings) -> Optional[Path]:
    """Where the Ray workers' stderr goes: a log file, unless the command line asked for INFO (-v)."""
    return None if log.isEnabledFor(logging.INFO) else settings.home / "logs" / "ray-workers.log"


@contextmanager
def ray_connected(settings: Settings, workers: int):
    """``ensure_ray`` for a block of work (CPU workers): it disconnects at the end if it connected."""
    import ray
    started = ensure_ray(workers, False, settings.ray.worker_niceness, worker_stderr(settings))
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_ray_training(prep: Prepared, cfg: ModelConfig, workers: int = 2, use_gpu: bool = False,
                     mixed_precision: bool = False, max_failures: int = 2, resume_from: Optional[Path] = None,
                     fail: Optional[dict] = None, storage: Optional[Path] = None, worker_niceness: int = 0,
                     worker_stderr: Optional[Path] = None, teacher: Optional[dict] = None,
                     placement_strategy: str = "PACK") -> dict:
    """Train on Ray; returns {"checkpoint_dir": local copy of the last checkpoint, "meta": ..., "seconds": ...}.

    ``teacher``: the workers' distillation config (``training.distill.teacher_targets``).
    ``placement_strategy``: Ray's placement of the workers (settings.training.placement_strategy)."""
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
    started = ensure_ray(workers, use_gpu, worker_niceness, worker_stderr)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if use_gpu and gpus < workers:
            raise TrainingError(f"--use-gpu: one GPU per worker, but the Ray cluster has {gpus:g} GPU(s) for {workers} workers")
        cpus = ray.cluster_resources().get("CPU", 2)
        per_worker_cpu = 1.0 if cpus >= workers else cpus / workers
        inputs, datasets = prep.worker_inputs(workers, cfg.seed)
        storage = Path(storage or Path(tempfile.gettempdir()) / "recsys-ray-train").resolve()
        storage.mkdir(parents=True, exist_ok=True)
        name = f"train-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        config = {"model": asdict(cfg), **inputs, "log_q": prep.log_q, "n_items": prep.vocab.n_items,
                  "n_users": prep.vocab.n_users, "item_genres": prep.vocab.item_genres, "use_gpu": use_gpu,
                  "mixed_precision": mixed_precision, "threads": max(1, int(per_worker_cpu)),
                  "resume_from": str(resume_from) if resume_from else None, "teacher": teacher,
                  "epoch_hooks": [KillWorkerAtEpoch(**fail)] if fail else []}
        trainer = TensorflowTrainer(
            train_loop_per_worker, train_loop_config=config, datasets=datasets or None,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, placement_strategy=placement_strategy,
                                         resources_per_worker={"CPU": per_worker_cpu, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        t0 = time.perf_counter()
        # The run's checkpoints hold user rows (the embedding tables): gone with the run, failed or not.
        local = Path(tempfile.mkdtemp(prefix="recsys-ckpt-", dir=storage))
        try:
            try:
                result = trainer.fit()
            except Exception as exc:
                raise TrainingError(f"training failed: {exc}".splitlines()[0][:500]) from exc
            seconds = time.perf_counter() - t0
            if result.error is not None:
                raise TrainingError(f"training failed: {result.error}".splitlines()[0][:500])
            if result.checkpoint is None:
                raise TrainingError("training reported no checkpoint")
            result.checkpoint.to_directory(str(local))
            meta = validate_checkpoint(local)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(storage / name, ignore_errors=True)
        return {"checkpoint_dir": local, "meta": meta, "seconds": seconds, "workers": workers}
    finally:
        if started:  # a private cluster: gone with the run, so this process can join another
            ray.shutdown()


def evaluate_weights(prep: Prepared, weights: dict, cfg: ModelConfig) -> tuple[dict, np.ndarray, np.ndarray]:
    """Two-tower metrics on the prepared stage's targets; also (their user embeddings, item embeddings)."""
    from recsys.model import item_embeddings_np
    users = NumpyUserTower(weights, prep.vocab, user_input.schema(cfg.history)).embed_encoded(prep.targets)
    items = item_embeddings_np(weights, prep.vocab.item_genres)
    return evaluate_embeddings(prep, users, items), users, items


def evaluate_embeddings(prep: Prepared, users: np.ndarray, items: np.ndarray) -> dict:
    """Exact scoring of the split's items for the stage's targets: ``users`` (one row per target),
    ``items`` (one row per vocabulary item)."""
    ranked = np.ascontiguousarray(items[prep.split_item_rows])
    return evaluation.evaluate_scorer(prep.split, lambda pos: users[pos] @ ranked.T, stage=prep.stage)


def seen_policy(prep: Prepared, cfg: ModelConfig, weights: dict, validation_weights: dict) -> dict:
    """The card's seen policy, chosen on protocol R's validation targets by the model trained on the
    validation stage's examples (``validation_weights``; protocol R's validation target is never one
    of them), the test targets scored by the published model's ``weights``."""
    split = evaluation.split_table(prep.table, protocol="R")
    schema = user_input.schema(cfg.history)

    def scorer(stage: str):
        w = validation_weights if stage == "validation" else weights
        rows = split.targets(stage)[2]
        users = NumpyUserTower(w, prep.vocab, schema).embed_encoded({k: prep.rows[k][rows] for k in schema.names})
        items = np.ascontiguousarray(item_embeddings_np(w, prep.vocab.item_genres)[prep.split_item_rows])
        return lambda pos: users[pos] @ items.T
    return evaluation.choose_seen_policy(split, scorer)


def fixed_seen_policy(name: str, why: str) -> dict:
    """The card's seen policy when none is chosen on validation."""
    return {"chosen": name, "filter_types": sorted(t.value for t in SEEN_POLICIES[name]), "why": why}


def policies_differ(table: pa.Table) -> bool:
    """Whether the seen policies filter different items: some event is of a type one of them keeps."""
    always = frozenset.intersection(*SEEN_POLICIES.values())
    types = set(table.column("type").unique().to_pylist()) if "type" in table.column_names else {"rating"}
    return not types <= {t.value for t in always}


def served_artifact(prep: Prepared, weights: dict, cfg: ModelConfig, item_emb: np.ndarray, fp32: dict,
                    ts: TrainingSettings) -> tuple[dict, AnnIndex, dict]:
    """What a replica will serve, measured as it serves it: the user tower at ``ts.tower_precision``
    and the ANN index of ``ts.ann_kind`` (default: ``recsys.ann.default_kind`` at
    ``ts.item_precision``). Returns (the served model's metrics, exact scoring over the index's
    codes; the index; the card's compression entry against the fp32 model's ``fp32`` metrics)."""
    tower = NumpyUserTower(compress_tower(weights, ts.tower_precision), prep.vocab, user_input.schema(cfg.history))
    users = tower.embed_encoded(prep.targets)
    kind = ts.ann_kind or default_kind(len(item_emb), ts.item_precision, ts.ann_exact_below)
    # The search parameter chosen on half of the test users' queries, recall measured on the other half's.
    order = np.random.default_rng(0).permutation(len(users))
    half = len(order) // 2
    index = build_index(item_emb, users[order[:half][:500]], users[order[half:][:500]], kind, ts.ann_target_recall)
    metrics = evaluate_embeddings(prep, users, index.stored_vectors())
    compression = {"tower": ts.tower_precision, "items": precision_of(kind), "index": kind,
                   "fp32": {k: fp32[k] for k in ("hr@10", "ndcg@10")},
                   "hr@10_relative_change": round(metrics["hr@10"] / fp32["hr@10"] - 1, 4) if fp32["hr@10"] else None}
    return metrics, index, compression


def load_serving_weights(folder: Path) -> dict:
    with np.load(Path(folder) / "serving_weights.npz") as z:
        return {k: z[k] for k in z.files}


# The two-tower settings ``train(tune=True)`` tries on the validation targets (EVALUATION.md:
# every hyperparameter is chosen there; the test targets are scored once, with the choice).
# The item table shared with the history's (or not) is data-dependent (issue 34, validation HR@10:
# sessions generator 0.441 own vs 0.418 shared, MovieLens-100K 0.204 vs 0.235); dim 32 never won
# on either (sessions 0.434 vs 0.468), so it left the grid to keep it at 8 settings.
TUNING_GRID = {"share_item_table": (True, False), "temperature": (0.05, 0.1), "history": (20, 50)}


def tune(prep: Prepared, cfg: ModelConfig, grid: dict, train_fn, progress=None) -> dict:
    """Train every setting of ``grid`` on the validation stage's inputs and score it on the
    validation targets; returns the table and the best setting (HR@10, then NDCG@10)."""
    val = prep.at("validation")
    names = list(grid)
    settings = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    table = {}
    for k, setting in enumerate(settings, 1):
        c = replace(cfg, **setting)
        c.history = min(c.history, prep.history)
        p = val.with_history(c.history)
        run = train_fn(p, c)
        try:
            metrics, _, _ = evaluate_weights(p, load_serving_weights(run["checkpoint_dir"]), c)
        finally:
            shutil.rmtree(run["checkpoint_dir"], ignore_errors=True)
        name = ",".join(f"{n}={setting[n]:g}" for n in names)
        table[name] = {"setting": setting, "validation": metrics, "seconds": round(run["seconds"], 1)}
        if progress:
            progress(f"tuning {k}/{len(settings)} {name}: validation HR@10 {metrics['hr@10']:.4f} "
                     f"NDCG@10 {metrics['ndcg@10']:.4f} ({run['seconds']:.0f} s)")
    best = max(table, key=lambda n: (table[n]["validation"]["hr@10"], table[n]["validation"]["ndcg@10"]))
    return {"stage": "validation", "grid": {n: list(v) for n, v in grid.items()}, "chosen": table[best]["setting"],
            "validation": table[best]["validation"],
            "validation_hr@10_by_setting": {n: r["validation"]["hr@10"] for n, r in table.items()}}


def train(source: str | pa.Table, *, settings: Settings, workers: int = 2, epochs: Optional[int] = None,
          use_gpu: bool = False, mixed_precision: bool = False, model_config: Optional[dict] = None,
          max_failures: int = 2, resume_from: Optional[Path] = None, fail: Optional[dict] = None,
          publish: bool = True, promote: bool = True, baselines: Optional[dict] = None,
          user_col="user_id", item_col="item_id", ts_col="timestamp",
          prepared: Optional[Prepared] = None, tune_grid: Optional[dict] = None, progress=None,
          teacher: Optional[Path] = None) -> dict:
    """Train, evaluate beside the baselines, publish; returns the model card.

    ``source``: a pyarrow event table, ``"archive"`` (the Parquet event log) or a source spec.
    ``tune_grid`` (e.g. ``TUNING_GRID``): first choose those model settings on the validation
    targets, then train the chosen one on everything before the test targets.
    ``teacher``: a published model version folder to distill from (``training.distill``), with
    the config's ``distill_weight`` (``training.distill.DEFAULT_WEIGHT`` when it is 0) and
    ``distill_temperature``.
    """
    from training import distill
    overrides = dict(model_config or {})
    if teacher is not None and not overrides.get("distill_weight"):
        overrides["distill_weight"] = distill.DEFAULT_WEIGHT
    cfg = ModelConfig.from_dict({**default_config(), **overrides})
    if teacher is None and cfg.distill_weight > 0:
        raise TrainingError(f"distill_weight {cfg.distill_weight:g} without a teacher: give one (--distill-from)")
    if teacher is not None and tune_grid is not None:
        raise TrainingError("distillation and tuning together are not supported: tune without --distill-from, "
                            "then distill with the chosen config")
    if resume_from is not None:
        validate_checkpoint(resume_from)  # before any work: a bad checkpoint fails fast
    teacher_model = distill.load_teacher(teacher) if teacher is not None else None  # fails fast too
    from training.ray_data import ArchiveData, streams_archive
    streamed = prepared is None and isinstance(source, str) and source == "archive" and streams_archive(settings)
    if streamed and teacher_model is not None:
        raise TrainingError("distillation reads the examples in memory: set training.data_engine to memory "
                            "(RECSYS_TRAINING_DATA_ENGINE=memory) to distill from the archive")
    ray_options = dict(workers=workers, use_gpu=use_gpu, mixed_precision=mixed_precision, max_failures=max_failures,
                       placement_strategy=settings.training.placement_strategy,
                       storage=Path(settings.home).resolve() / "ray_results", worker_niceness=settings.ray.worker_niceness,
                       worker_stderr=worker_stderr(settings))
    tuning = None
    # One Ray for the whole grid, and for the Ray Data engine from the archive to the last epoch.
    started = (tune_grid is not None or streamed) and ensure_ray(workers, use_gpu, settings.ray.worker_niceness,
                                                                 ray_options["worker_stderr"])
    try:
        t_start = time.perf_counter()
        longest = max([cfg.history, *(tune_grid or {}).get("history", ()),  # encoded once, sliced per setting
                       *([teacher_model.config.history] if teacher_model else [])])
        if streamed:
            prepared, source_name = ArchiveData(settings, longest, settings.features.recent_items,
                                                settings.training.data_block_rows), "archive"
        elif prepared is None:
            table, item_features, source_name = load_table(source, settings, user_col, item_col, ts_col)
            prepared = Prepared(table, item_features, replace(cfg, history=longest), settings.features.recent_items)
        else:
            source_name = source if isinstance(source, str) else "table"
        prep = prepared.at("test")
        teacher_config, distillation = None, None
        if teacher_model is not None:
            prep, teacher_config, distillation = distill.teacher_targets(teacher_model, prep)
            distillation |= {"weight": cfg.distill_weight, "temperature": cfg.distill_temperature}
        cfg.epochs = int(epochs) if epochs is not None else cfg.epochs_for(prep.n_train, workers)
        t_prep = time.perf_counter() - t_start
        if tune_grid is not None:
            tuning = tune(prep, cfg, tune_grid, lambda p, c: run_ray_training(p, c, **ray_options), progress)
            cfg = replace(cfg, **tuning["chosen"])
        cfg.history = min(cfg.history, prep.history)
        prep = prep.with_history(cfg.history)
        policy, policy_weights = settings.training.seen_policy, None
        if isinstance(prepared, ArchiveData):
            policy = fixed_seen_policy("all", "the Ray Data engine holds no rows to score protocol R's targets on")
        elif policy != "choose":
            policy = fixed_seen_policy(policy, "training.seen_policy")
        elif not policies_differ(prep.table):
            policy = fixed_seen_policy("all", "every event is of a type each policy filters: the policies are one")
        else:  # the validation stage's model, for protocol R's validation targets; its checkpoint goes at once
            policy_run = run_ray_training(prep.at("validation"), replace(cfg, distill_weight=0.0), **ray_options)
            try:
                policy_weights = load_serving_weights(policy_run["checkpoint_dir"])
            finally:
                shutil.rmtree(policy_run["checkpoint_dir"], ignore_errors=True)
        run = run_ray_training(prep, cfg, resume_from=resume_from, fail=fail, teacher=teacher_config, **ray_options)
    finally:
        if started:
            import ray
            ray.shutdown()
    kept = False  # the checkpoint (user rows) goes unless the caller asked for it (publish=False)
    try:
        weights = load_serving_weights(run["checkpoint_dir"])
        if policy_weights is not None:
            policy = seen_policy(prep, cfg, weights, policy_weights)
        fp32, _, item_emb = evaluate_weights(prep, weights, cfg)
        two_tower, index, compression = served_artifact(prep, weights, cfg, item_emb, fp32, settings.training)
        if tuning:
            two_tower["validation"] = tuning["validation"]
        base = baselines if baselines is not None else evaluation.baselines(prep.split)
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
            "protocol": f"{prep.split.protocol}: {evaluation.PROTOCOLS[prep.split.protocol]}; baselines' settings chosen "
                        "on the validation targets, test scored once (EVALUATION.md)",
            "tuning": tuning or "none: the model config as given, not chosen on this data's validation targets",
            "seen_policy": policy,
            "training": {"seconds": round(run["seconds"], 1), "prepare_seconds": round(t_prep, 1),
                         "data_engine": "ray_data" if isinstance(prepared, ArchiveData) else "memory",
                         "workers": workers, "use_gpu": use_gpu, "mixed_precision": mixed_precision,
                         "epochs": cfg.epochs, "examples_per_s": round(float(np.median(steady)), 1) if steady else None,
                         "history": history, "resumed_from_epoch": run["meta"].get("start_epoch", 0),
                         "embedding_mb": _embedding_mb(weights, cfg)},
            "config": asdict(cfg),
            "compression": compression,
            "ann": index.meta | {"kind": index.kind, "params": index.params},
        }
        if distillation:
            card["distillation"] = distillation
        if not publish:
            card["training"]["checkpoint_dir"] = str(run["checkpoint_dir"])
            kept = True
            return card

        def write(folder: Path, version: str) -> None:
            export(folder, weights, prep.vocab, cfg, tower=card["compression"]["tower"])
            index.save(folder / "ann")
            card["version"] = version
            card["files"] = file_sums(folder)  # checked when a server loads the version
            (folder / CARD).write_text(json.dumps(card, indent=1))

        card["version"] = Registry(settings.registry_dir).publish(write, promote=promote)
        return card
    finally:
        if not kept:
            shutil.rmtree(run["checkpoint_dir"], ignore_errors=True)


def _embedding_mb(weights: dict, cfg: ModelConfig) -> dict:
    """The embedding tables' fp32 size: each worker holds them and Adam's two slots of each."""
    names = ("user_table", "hist_table") + (() if cfg.share_item_table else ("item_table",))
    tables = {k: round(weights[k].nbytes / 1e6, 1) for k in names}
    return tables | {"per_worker_with_adam": round(3 * sum(tables.values()), 1)}


def default_config() -> dict:
    return asdict(ModelConfig())


def version_ranks(version_dirs: list[Path], table: pa.Table, settings: Settings,
                  catalogue: Optional[dict[str, list[str]]] = None) -> tuple[evaluation.Split, dict[str, np.ndarray]]:
    """The table's split and, per published model, the rank of each test target (items a
    model never saw score -inf, unless ``catalogue`` gives their genres: then they score by the
    model's content head, as a replica serves them): the paired per-user outcomes the gate compares."""
    if table.num_rows == 0:
        raise DataError("no events: the source is empty")
    split = evaluation.split_table(table)
    evaluation.check_evaluable(split)
    test_rows = set(split.test_index.tolist())
    feats = {r: f for r, (_, f) in enumerate(iter_point_in_time(table, settings.features.recent_items))
             if r in test_rows}
    return split, _ranks(version_dirs, split, lambda model: model.user_embedding([feats[r] for r in split.test_index]),
                         catalogue)


def feature_ranks(version_dir: Path, split: evaluation.Split, features: list) -> np.ndarray:
    """The rank of each test target of ``split`` by a published model, its user embedded from
    ``features`` (one ``UserFeatures`` per test target, in the split's order): ``recsys bench
    freshness`` gives it the same targets' users as of different instants."""
    (ranks,) = _ranks([version_dir], split, lambda model: model.user_embedding(features), None).values()
    return ranks


def held_out_ranks(version_dirs: list[Path], data) -> tuple[evaluation.HeldOut, dict[str, np.ndarray]]:
    """``version_ranks`` on the Ray Data engine's held-out targets (``training.ray_data.ArchiveData``):
    its encoded test inputs re-coded into each model's vocabulary (unknown ids: the OOV slot, as
    the encoder codes them) and fitted to its schema."""
    test = data.at("test").stage_inputs["test"]

    def embed(model):
        return model.tower.embed_encoded(model.tower.schema.fit(test, *model.vocab.recoding(data.vocab)))
    return data.split, _ranks(version_dirs, data.split, embed, None)


def _ranks(version_dirs: list[Path], split, embed, catalogue) -> dict[str, np.ndarray]:
    """Per published model, each test target's rank; ``embed(model)``: the test targets' users."""
    from recsys.model import load_model
    out = {}
    for folder in version_dirs:
        model = load_model(folder)
        model.add_items(catalogue or {})
        users = embed(model)
        pos = {t: i for i, t in enumerate(model.item_ids)}
        cols = np.array([pos.get(t, -1) for t in split.item_ids])
        vectors = model.scored_item_vectors()  # as requests score them (int8 codes decoded, say)
        emb = np.where(cols[:, None] >= 0, vectors[np.maximum(cols, 0)], 0.0).astype(np.float32)

        def score(p, users=users, emb=emb, cols=cols):
            s = users[p] @ emb.T
            s[:, cols < 0] = -np.inf
            return s
        out[model.version] = evaluation.target_ranks(split, score)
    return out


def evaluate_version(version_dir: Path, source: str | pa.Table, settings: Settings, user_col="user_id", item_col="item_id", ts_col="timestamp") -> dict:
    """Metrics of a published model on a source's split, beside the baselines (a large archive:
    on the Ray Data engine's held-out targets, see ``training.ray_data.streams_archive``)."""
    from training.ray_data import ArchiveData, streams_archive
    if isinstance(source, str) and source == "archive" and streams_archive(settings):
        name = "archive"
        with ray_connected(settings, settings.training.workers):
            history = json.loads((Path(version_dir) / "model_config.json").read_text())["history"]
            split, ranks = held_out_ranks([version_dir], ArchiveData(settings, history, settings.features.recent_items,
                                                                     settings.training.data_block_rows))
    else:
        table, _, name = load_table(source, settings, user_col, item_col, ts_col)
        split, ranks = version_ranks([version_dir], table, settings)
    (version, r), = ranks.items()
    return {"version": version, "source": name, "data_window": split.window(),
            "metrics": {"two_tower": evaluation.metrics_from_ranks(r) | {"users": int(len(r))},
                        **evaluation.baselines(split)}}
