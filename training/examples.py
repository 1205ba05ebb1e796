"""Training examples and held-out targets of one block of users: pure, a table in, arrays out.

The Ray Data engine (``training.ray_data``) hash-partitions the deduplicated event log by user,
so a block holds every event of its users. A user's point-in-time features, first interactions,
targets and inputs depend on that user's events only, so the functions that make them for a
whole table (``recsys.training_data.iter_point_in_time``, ``recsys.evaluation.split_arrays``)
give, on a block, the rows they give on the whole log for its users. Rows are ordered by
(ts, seq), the archive's read order (``recsys.archive.read_file``), as ``read_events`` orders them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recsys import evaluation, user_input
from recsys.training_data import iter_point_in_time
from recsys.user_input import ITEM

ORDER = [("ts", "ascending"), ("seq", "ascending")]
# Per stage (test, validation), per output row: a training example (the stage's input and a
# positive), the first input row of its (user, item) pair (popularity), the stage's target.
FLAGS = ("ex_test", "ex_val", "pop_test", "pop_val", "tgt_test", "tgt_val")
STAGE = {"test": "test", "validation": "val"}


def in_time_order(block: pa.Table) -> pa.Table:
    return block.take(pc.sort_indices(block, ORDER))


def first_copies(block: pa.Table) -> pa.Table:
    """The block's rows in time order, each event id's first copy only, as ``read_events`` keeps
    (the block must hold every copy of its event ids)."""
    block = in_time_order(block)
    first = ~pd.Series(block["event_id"].to_numpy(zero_copy_only=False)).duplicated().to_numpy()
    return block if first.all() else block.filter(pa.array(first))


def _codes(values, ids: pa.Array) -> np.ndarray:
    """1-based positions of ``values`` in the sorted ``ids`` (0: not there), like ``Vocab``'s indexes."""
    return pc.fill_null(pc.add(pc.index_in(values, value_set=ids), 1), 0).to_numpy().astype(np.int32)


class SortedIds:
    """``recsys.user_input.Codes`` from the whole log's distinct ids, sorted: the codes ``Vocab``
    gives them, without a dict of every id in each block's task."""

    def __init__(self, user_ids: pa.Array, item_ids: pa.Array):
        self.user_ids, self.item_ids = user_ids, item_ids

    def user_codes(self, ids) -> np.ndarray:
        return _codes(pa.array(ids, pa.string()), self.user_ids)

    def item_codes(self, ids) -> np.ndarray:
        return _codes(pa.array(ids, pa.string()), self.item_ids)


def block_examples(block: pa.Table, user_ids: pa.Array, item_ids: pa.Array, protocol: str, history: int,
                   recent_items: int) -> dict[str, np.ndarray]:
    """The block's training examples and targets, one output row per event that is either.

    ``user_ids``/``item_ids``: the whole log's distinct ids, sorted (the vocabulary, index 0 for
    none). Columns: the user's inputs (``recsys.user_input.schema(history)``), item (vocabulary
    code), ts, seq, the ``FLAGS`` and ``seen``: on a target row, the user's distinct input items at
    that stage as 0-based item codes (the candidates evaluation removes), elsewhere empty.
    """
    block = in_time_order(block)
    if block.num_rows == 0:
        return empty(history)
    codes = SortedIds(user_ids, item_ids)
    split = evaluation.split_arrays(block["user_id"].to_numpy(zero_copy_only=False),
                                    block["item_id"].to_numpy(zero_copy_only=False), block["ts"].to_numpy(),
                                    protocol=protocol)
    flags, seen = _stage_rows(split, _codes(pa.array(split.item_ids), item_ids) - 1)
    keep = flags["ex_test"] | flags["tgt_test"] | flags["tgt_val"]
    features = (feats for r, (_, feats) in enumerate(iter_point_in_time(block, recent_items)) if keep[r])
    inputs = user_input.encode_all(features, int(keep.sum()), user_input.schema(history), codes)
    kept_seen = np.empty(int(keep.sum()), dtype=object)
    for k, items in enumerate(seen[keep]):
        kept_seen[k] = np.zeros(0, np.int32) if items is None else items.astype(np.int32)
    return {**inputs, ITEM: _codes(block["item_id"], item_ids)[keep], "ts": block["ts"].to_numpy()[keep],
            "seq": block["seq"].to_numpy()[keep], **{name: flag[keep] for name, flag in flags.items()}, "seen": kept_seen}


def _stage_rows(split: evaluation.Split, item_codes: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per row of the block's split, the ``FLAGS``; and on each target row, the user's input items
    at its stage (``item_codes``: the block's item codes -> the log's)."""
    n = len(split.users)
    flags, seen = {}, np.empty(n, dtype=object)
    for stage, tag in STAGE.items():
        rows = split.input_rows(stage)
        flags[f"ex_{tag}"] = rows & split.is_positive
        at = np.flatnonzero(rows)
        flags[f"pop_{tag}"] = np.zeros(n, dtype=bool)
        flags[f"pop_{tag}"][at[np.unique(split.users[at] * split.n_items + split.items[at], return_index=True)[1]]] = True
        users, _, target = split.targets(stage)
        flags[f"tgt_{tag}"] = np.zeros(n, dtype=bool)
        flags[f"tgt_{tag}"][target] = True
        indptr, items = split.input_items(stage)
        for u, r in zip(users, target):
            seen[r] = item_codes[items[indptr[u]:indptr[u + 1]]]
    return flags, seen


def empty(history: int) -> dict[str, np.ndarray]:
    """``block_examples``'s columns with no rows."""
    return {**user_input.schema(history).empty(), ITEM: np.zeros(0, np.int32), "ts": np.zeros(0, np.int64),
            "seq": np.zeros(0, np.int64), **{name: np.zeros(0, bool) for name in FLAGS},
            "seen": np.zeros(0, dtype=object)}
