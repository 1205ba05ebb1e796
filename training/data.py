"""The training data, prepared once on the driver: point-in-time examples, the split, shards."""
from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa

from recsys import evaluation, user_input
from recsys.model import ModelConfig, Vocab
from recsys.settings import Settings
from recsys.training_data import DataError, events_table, iter_point_in_time, sort_table
from recsys.user_input import HIST, ITEM


class Prepared:
    """Everything the workers and the evaluation need, computed once on the driver.

    Every row's point-in-time user features are encoded once; ``stage`` ("test" or
    "validation", see ``recsys.evaluation``) picks the training examples (the stage's input
    rows) and the targets (``self.targets``). ``at(stage)`` gives the same data at another stage.
    """

    def __init__(self, table: pa.Table, item_features, cfg: ModelConfig, recent_items: int):
        table = sort_table(table)
        if table.num_rows == 0:
            raise DataError("no events: the source is empty")
        self.table = table
        self.split = evaluation.split_table(table)  # the protocol follows the event types
        if self.split.n_users < 2:
            raise DataError(f"only {self.split.n_users} user: need at least 2 users to train and evaluate")
        evaluation.check_evaluable(self.split)
        self.vocab = Vocab.build(self.split.user_ids, self.split.item_ids, item_features)
        # The split ranks the items of the events; the vocabulary may hold a larger catalogue.
        self.split_item_rows = np.array([self.vocab.item_index[str(t)] - 1 for t in self.split.item_ids])
        # Each row's user as the store held it just before the row's event; the store keeps only
        # recent_items of the recent items.
        self.schema = user_input.schema(min(cfg.history, recent_items))
        features = (feats for _, feats in iter_point_in_time(table, recent_items))
        self.rows = {**user_input.encode_all(features, table.num_rows, self.schema, self.vocab),
                     ITEM: self.vocab.item_codes([str(t) for t in table["item_id"].to_pylist()])}
        self._select("test")

    def _select(self, stage: str) -> None:
        self.stage = stage
        # Examples: the stage's input rows that are positives (B: a user's first touch of an item,
        # the event the model must predict; a repeat of a touched item is never a candidate).
        rows = self.split.input_rows(stage) & self.split.is_positive
        self.train = {k: v[rows] for k, v in self.rows.items()}
        target = self.split.targets(stage)[2]
        self.targets = {k: self.rows[k][target] for k in self.schema.names}
        self.log_q = log_q(np.bincount(self.train[ITEM], minlength=self.vocab.n_items + 1))
        self.n_train = int(rows.sum())

    def at(self, stage: str) -> "Prepared":
        """The same encoded rows with another stage's training examples and targets."""
        other = copy.copy(self)
        other._select(stage)
        return other

    def with_history(self, history: int) -> "Prepared":
        """The same data with only the ``history`` newest recent items (at most the encoded ones)."""
        other = copy.copy(self)
        other.schema = user_input.schema(min(history, self.history))
        other.rows = {**self.rows, **other.schema.fit(self.rows)}
        other._select(self.stage)
        return other

    def with_columns(self, **columns: np.ndarray) -> "Prepared":
        """The same data with extra per-row columns (one row per event, e.g. a teacher's user
        embeddings, ``training.distill``): carried into the training examples and the shards."""
        other = copy.copy(self)
        for name, col in columns.items():
            if len(col) != len(self.rows[ITEM]):
                raise ValueError(f"column {name!r}: {len(col)} rows for {len(self.rows[ITEM])} events")
        other.rows = {**self.rows, **columns}
        other._select(self.stage)
        return other

    @property
    def history(self) -> int:
        return self.rows[HIST].shape[1]

    def shards(self, workers: int, seed: int) -> list[dict]:
        """Equal-sized shards, one per worker (equal sizes keep the collectives in step)."""
        perm = np.random.default_rng(seed).permutation(self.n_train)
        per = self.n_train // workers
        return [{k: v[perm[w * per:(w + 1) * per]] for k, v in self.train.items()} for w in range(workers)]

    def worker_inputs(self, workers: int, seed: int) -> tuple[dict, dict]:
        """(the workers' config entries, Ray Train's datasets): one shard per worker in the object store."""
        import ray
        return {"shards": [ray.put(s) for s in self.shards(workers, seed)]}, {}


def log_q(item_counts: np.ndarray) -> np.ndarray:
    """The log of each item's share of the training examples (index 0 and unseen items: a floor),
    the sampled softmax's correction."""
    freq = item_counts.astype(np.float64) + 1e-3
    freq[0] = 1e-3
    return np.log(freq / freq.sum()).astype(np.float32)


def load_table(source: str | pa.Table, settings: Settings, user_col="user_id", item_col="item_id",
               ts_col="timestamp"):
    """(events table, item features or None, source name) from a table, ``archive`` or a source spec."""
    if isinstance(source, pa.Table):
        return sort_table(source), None, "table"
    if source == "archive":  # the items' features: the catalogue's (recsys/catalogue.py), if it has any
        from recsys.archive import read_events
        from recsys.catalogue import snapshot
        from recsys.feature_store import connect
        return sort_table(read_events(settings)), snapshot(connect(settings), settings) or None, "archive"
    from recsys.privacy import Pseudonyms
    from recsys.sources import open_source
    src = open_source(source, user_col, item_col, ts_col)
    # A source is an edge: its user ids enter the model's vocabulary only as pseudonyms.
    return events_table(Pseudonyms.of(settings).events(src.events_iter())), src.item_features(), source
