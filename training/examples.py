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

from recsys import evaluation
from recsys.features import COUNT_TYPES, counts_vector
from recsys.training_data import iter_point_in_time

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


def block_examples(block: pa.Table, user_ids: pa.Array, item_ids: pa.Array, protocol: str, history: int,
                   recent_items: int) -> dict[str, np.ndarray]:
    """The block's training examples and targets, one output row per event that is either.

    ``user_ids``/``item_ids``: the whole log's distinct ids, sorted (the vocabulary, index 0 for
    none). Columns: user, item (vocabulary codes), hist (rows x history), counts, ts, seq, the
    ``FLAGS`` and ``seen``: on a target row, the user's distinct input items at that stage as
    0-based item codes (the candidates evaluation removes), elsewhere empty.
    """
    block = in_time_order(block)
    if block.num_rows == 0:
        return empty(history)
    split = evaluation.split_arrays(block["user_id"].to_numpy(zero_copy_only=False),
                                    block["item_id"].to_numpy(zero_copy_only=False), block["ts"].to_numpy(),
                                    protocol=protocol)
    flags, seen = _stage_rows(split, _codes(pa.array(split.item_ids), item_ids) - 1)
    keep = flags["ex_test"] | flags["tgt_test"] | flags["tgt_val"]
    hist, counts = _features(block, keep, item_ids, history, recent_items)
    kept_seen = np.empty(len(hist), dtype=object)
    for k, items in enumerate(seen[keep]):
        kept_seen[k] = np.zeros(0, np.int32) if items is None else items.astype(np.int32)
    return {"user": _codes(block["user_id"], user_ids)[keep], "item": _codes(block["item_id"], item_ids)[keep],
            "hist": hist, "counts": counts, "ts": block["ts"].to_numpy()[keep], "seq": block["seq"].to_numpy()[keep],
            **{name: flag[keep] for name, flag in flags.items()}, "seen": kept_seen}


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


def _features(block: pa.Table, keep: np.ndarray, item_ids: pa.Array, history: int, recent_items: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """The kept rows' point-in-time features, encoded as ``recsys.model.encode_users`` encodes
    them: (recent item codes, rows x history; log counts, rows x types)."""
    counts = np.zeros((int(keep.sum()), len(COUNT_TYPES)), dtype=np.float32)
    recent = []
    for r, (_, feats) in enumerate(iter_point_in_time(block, recent_items)):
        if keep[r]:
            counts[len(recent)] = counts_vector(feats.counts)
            recent.append(feats.recent[:history])
    lens = np.array([len(x) for x in recent], dtype=np.int64)
    hist = np.zeros((len(recent), history), dtype=np.int32)
    cols = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    hist[np.repeat(np.arange(len(recent)), lens), cols] = _codes(pa.array([t for x in recent for t in x], pa.string()),
                                                                item_ids)
    return hist, counts


def empty(history: int) -> dict[str, np.ndarray]:
    """``block_examples``'s columns with no rows."""
    return {"user": np.zeros(0, np.int32), "item": np.zeros(0, np.int32), "hist": np.zeros((0, history), np.int32),
            "counts": np.zeros((0, len(COUNT_TYPES)), np.float32), "ts": np.zeros(0, np.int64),
            "seq": np.zeros(0, np.int64), **{name: np.zeros(0, bool) for name in FLAGS},
            "seen": np.zeros(0, dtype=object)}
