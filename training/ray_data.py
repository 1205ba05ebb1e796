"""The archive's training data on Ray Data: from the Parquet log to the workers in bounded memory.

No process holds the log. The stages (each a Ray Data operator; materialized datasets live in
Ray's object store, which spills to disk when they outgrow it):

1. read: one task per file (``recsys.archive.read_file``): each row keeps ``seq``, its place in
   the archive's read order, so ties in time are broken exactly as ``read_events`` breaks them;
   a retraining's window keeps the events after ``after_ts``;
2. hash-partition by event id and keep each id's first copy (``training.examples.first_copies``);
   materialized: the deduplicated log;
3. the distinct types (the protocol), users and items (the vocabulary, with the catalogue's
   items and genres as the in-memory path reads them: O(users + items) on the driver), the
   count and time range;
4. hash-partition by user: a block holds all the events of its users, and
   ``training.examples.block_examples`` makes their point-in-time examples and held-out targets
   with the same code as the in-memory path; materialized: the example rows;
5. per block, item counts of examples (log Q) and of input users (popularity), summed on the
   driver (O(items)); the targets with their input items collected (O(target users));
6. the stage's examples, shuffled once, stream to the Ray Train workers (``get_dataset_shard``).

Both hash partitions rely on what ``GroupedData.map_groups`` relies on: after
``repartition(keys=...)`` with a hash shuffle, a block read whole (``batch_size=None``) holds every
row of its keys. ``ArchiveData`` offers ``training.data.Prepared``'s interface, with a
``recsys.evaluation.HeldOut`` as its split.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys import archive, evaluation, user_input
from recsys.errors import TrainingError
from recsys.model import Vocab
from recsys.settings import Settings
from recsys.training_data import DataError
from recsys.user_input import ITEM, NAMES, USER
from training import examples
from training.data import log_q

log = logging.getLogger(__name__)
MODEL_COLUMNS = (*NAMES, ITEM)
COUNTED = ("ex_test", "ex_val", "pop_test", "pop_val")
EXAMPLE_BLOCK_ROWS = 2048  # the shuffled examples' blocks: what a worker's epoch reorders
# An archived event's bytes in Arrow (ids, type, times, seq): about 100. A hash shuffle's map task
# partitions this many blocks' bytes at once: Ray's default (1 GiB) made it hold the whole log
# of a 1M-event archive, and 1.2 GB of heap at 10M.
SHUFFLE_INPUT_BYTES_PER_ROW = 100


def _hash_shuffled(ds, n: int, key: str):
    from ray.data.context import DataContext, ShuffleStrategy
    strategy = DataContext.get_current().shuffle_strategy
    if strategy not in (ShuffleStrategy.HASH_SHUFFLE, ShuffleStrategy.SHUFFLE_V2):
        raise TrainingError(f"Ray Data's shuffle strategy is {strategy.value}: the archive engine needs a hash shuffle "
                            "(unset RAY_DATA_DEFAULT_SHUFFLE_STRATEGY)")
    return ds.repartition(n, keys=[key])


def _read(batch: dict, dead: dict, after_ts: int | None) -> pa.Table:
    table = pa.concat_tables([archive.read_file(p, int(i), dead) for p, i in zip(batch["path"], batch["index"])])
    return table if after_ts is None else table.filter(pc.greater(table["ts"], after_ts))


def _user_examples(block: pa.Table, vocab_refs, protocol: str, history: int, recent_items: int) -> dict:
    import ray
    users, items = ray.get(vocab_refs)
    return examples.block_examples(block, users, items, protocol, history, recent_items)


def _distinct(block: pa.Table) -> dict:
    """One row per block: its size, time range and distinct users, items and types."""
    ts = block["ts"].to_numpy()
    return {"n": [len(ts)], "min_ts": [ts.min() if len(ts) else np.iinfo(np.int64).max],
            "max_ts": [ts.max() if len(ts) else np.iinfo(np.int64).min],
            **{col: [pc.unique(block[col]).to_pylist()] for col in ("user_id", "item_id", "type")}}


def _summary(events) -> tuple[int, int, int, np.ndarray, np.ndarray, np.ndarray]:
    """(events, min ts, max ts, sorted distinct users, items, types) in one pass; the driver holds
    O(users + items) and one block's distinct values at a time."""
    n, lo, hi, seen = 0, np.iinfo(np.int64).max, np.iinfo(np.int64).min, {"user_id": [], "item_id": [], "type": []}
    for row in events.map_batches(_distinct, batch_size=None, batch_format="pyarrow").iter_rows():
        n, lo, hi = n + int(row["n"]), min(lo, int(row["min_ts"])), max(hi, int(row["max_ts"]))
        for col, values in seen.items():
            seen[col] = np.union1d(values, np.asarray(row[col], dtype=str))
    return n, lo, hi, *(np.asarray(seen[col], dtype=str) for col in ("user_id", "item_id", "type"))


def _item_counts(batch: dict) -> dict:
    """Per item of the block: its examples and its input users at each stage."""
    items = np.unique(batch[ITEM])
    return {ITEM: items, **{flag: np.bincount(np.searchsorted(items, batch[ITEM][batch[flag]]),
                                                minlength=len(items)) for flag in COUNTED}}


def _targets(batch: dict) -> dict:
    keep = batch["tgt_test"] | batch["tgt_val"]
    return {k: v[keep] for k, v in batch.items() if k in (*MODEL_COLUMNS, "seen", "tgt_test")}


def _examples(batch: dict, flag: str) -> dict:
    return {k: batch[k][batch[flag]] for k in MODEL_COLUMNS}


def _stage_targets(batches: list[dict], test: bool, n_users: int, popularity: np.ndarray, to_split: np.ndarray
                   ) -> tuple[dict, evaluation.StageTargets]:
    """The stage's targets in user order, as the model's inputs and as ``HeldOut`` wants them
    (``to_split``: each vocabulary item's code among the events' items, which the split ranks)."""
    rows = {k: np.concatenate([b[k][b["tgt_test"] == test] for b in batches]) for k in (*MODEL_COLUMNS, "seen")}
    order = np.argsort(rows[USER], kind="stable")
    rows = {k: v[order] for k, v in rows.items()}
    users = rows[USER].astype(np.int64) - 1
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    lens = np.zeros(n_users, dtype=np.int64)
    lens[users] = [len(s) for s in rows["seen"]]
    np.cumsum(lens, out=indptr[1:])
    seen = np.concatenate([np.sort(to_split[s]) for s in rows["seen"]] + [np.zeros(0, np.int64)]).astype(np.int64)
    stage = evaluation.StageTargets(users, to_split[rows[ITEM].astype(np.int64) - 1], indptr, seen, popularity)
    return {k: rows[k] for k in NAMES}, stage


def streams_archive(settings: Settings) -> bool:
    """Whether ``settings.training.data_engine`` puts the archive on Ray Data."""
    engine = settings.training.data_engine
    return engine == "ray_data" or (engine == "auto" and
                                    archive.stored_events(settings.archive_dir) > settings.training.memory_max_events)


class ArchiveData:
    """The archive's examples and held-out targets, computed on Ray Data (see the module's doc).

    The same interface as ``training.data.Prepared`` where ``training.job`` uses it; the
    examples stay in the object store and reach the workers as a dataset shard. ``stage`` picks
    the examples and targets ("test" or "validation"), ``history`` the recent items read."""

    def __init__(self, settings: Settings, history: int, recent_items: int, block_rows: int,
                 after_ts: int | None = None):
        """``after_ts``: only the events after it (a retraining's window), as ``read_events`` then
        a filter on ts would keep them."""
        import ray
        from recsys.catalogue import snapshot
        from recsys.feature_store import connect
        from ray.data.context import DataContext
        verbose = log.isEnabledFor(logging.INFO)  # Ray Data's progress bars and plans only with -v
        context = DataContext.get_current()
        context.enable_progress_bars = verbose
        context.shuffle_input_batch_bytes = SHUFFLE_INPUT_BYTES_PER_ROW * block_rows
        logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
        files = archive.event_files(settings.archive_dir)
        if not files:
            raise DataError("no events: the archive is empty")
        blocks = max(1, -(-archive.stored_events(settings.archive_dir) // block_rows))
        paths = ray.data.from_items([{"path": str(f), "index": i} for i, f in enumerate(files)],
                                    override_num_blocks=min(len(files), 4 * blocks))
        read = paths.map_batches(_read, batch_size=1, fn_kwargs={"dead": archive.tombstones(settings.archive_dir),
                                                                 "after_ts": after_ts})
        events = _hash_shuffled(read, blocks, "event_id").map_batches(
            examples.first_copies, batch_size=None, batch_format="pyarrow").materialize()
        n_events, min_ts, max_ts, users, items, types = _summary(events)
        if n_events == 0:
            raise DataError("no events: every archived event is of a forgotten user")
        protocol = evaluation.protocol_for(types)
        if len(users) < 2:
            raise DataError(f"only {len(users)} user: need at least 2 users to train and evaluate")
        # The items' features: the catalogue's (recsys/catalogue.py), as the in-memory path reads them.
        self.vocab = Vocab.build(users, items, snapshot(connect(settings), settings) or None)
        vocab_items = np.asarray(self.vocab.item_ids, dtype=str)
        # The split ranks the events' items; the vocabulary may hold a larger catalogue.
        self.split_item_rows = np.searchsorted(vocab_items, items)
        to_split = np.full(len(vocab_items), -1, dtype=np.int64)
        to_split[self.split_item_rows] = np.arange(len(items))
        self.history_len = min(history, recent_items)
        refs = ray.put((pa.array(users), pa.array(vocab_items)))
        self.rows = _hash_shuffled(events, blocks, "user_id").map_batches(
            _user_examples, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"vocab_refs": refs, "protocol": protocol, "history": self.history_len,
                       "recent_items": recent_items}).materialize()
        counts = {flag: np.zeros(len(vocab_items) + 1, dtype=np.int64) for flag in COUNTED}
        for batch in self.rows.map_batches(_item_counts, batch_size=None).iter_batches(batch_size=None):
            for flag in COUNTED:
                counts[flag][batch[ITEM]] += batch[flag]
        self.item_counts = counts
        batches = list(self.rows.map_batches(_targets, batch_size=None).iter_batches(batch_size=None))
        self.stage_inputs, stages = {}, {}
        for stage, tag in examples.STAGE.items():
            self.stage_inputs[stage], stages[stage] = _stage_targets(
                batches, stage == "test", len(users), counts[f"pop_{tag}"][1:][self.split_item_rows].astype(np.float32),
                to_split)
        self.split = evaluation.HeldOut(users, items, protocol, stages, n_events, min_ts, max_ts)
        evaluation.check_evaluable(self.split)
        self._shuffled: dict = {}
        self._select("test")

    def _select(self, stage: str) -> None:
        self.stage = stage
        tag = examples.STAGE[stage]
        self.n_train = int(self.item_counts[f"ex_{tag}"].sum())
        self.log_q = log_q(self.item_counts[f"ex_{tag}"])
        self.targets = user_input.schema(self.history).fit(self.stage_inputs[stage])

    @property
    def history(self) -> int:
        return self.history_len

    def at(self, stage: str) -> "ArchiveData":
        other = copy.copy(self)
        other._select(stage)
        return other

    def with_history(self, history: int) -> "ArchiveData":
        other = copy.copy(self)
        other.history_len = min(history, self.history_len)
        other._select(self.stage)
        return other

    def examples(self, seed: int):
        """The stage's training examples (all history columns), shuffled once with ``seed`` into
        small blocks; materialized in the object store, one copy per (stage, seed)."""
        key = (self.stage, seed)
        if key not in self._shuffled:
            blocks = int(np.clip(self.n_train // EXAMPLE_BLOCK_ROWS, 1, 4096))
            self._shuffled[key] = self.rows.map_batches(
                _examples, batch_size=None, fn_kwargs={"flag": f"ex_{examples.STAGE[self.stage]}"}
            ).random_shuffle(seed=seed).repartition(blocks).materialize()
        return self._shuffled[key]

    def worker_inputs(self, workers: int, seed: int) -> tuple[dict, dict]:
        """(the workers' config entries, Ray Train's datasets): the examples as the "train" dataset,
        split equally among the workers, its blocks in a new order each epoch (each worker's
        local shuffle then mixes rows of different blocks, near a full reshuffle per epoch)."""
        return ({"examples_per_worker": self.n_train // workers},
                {"train": self.examples(seed).randomize_block_order()})
