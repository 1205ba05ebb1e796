"""Knowledge distillation: a student two-tower trained partly on a published teacher's softmax.

The driver loads the teacher (a model version folder, numpy only: ``recsys.model.load_model``)
once and computes, in the student's vocabulary (ids mapped through the teacher's own; index 0
and ids the teacher never saw are its out-of-vocabulary slot):

* the teacher's user embedding of every training example, a column ``teacher_user`` of the
  prepared rows that travels in the workers' shards;
* the teacher's item embeddings, row k = the student's item k, zeros (and ``known`` False) for
  row 0 and the items the teacher does not know: ``training.model.sampled_softmax_loss`` leaves
  those candidates out of the KL.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from recsys.errors import RecsysError, TrainingError
from recsys.user_input import ITEM
from training.data import Prepared

DEFAULT_WEIGHT = 0.5  # the loss share of the teacher when a teacher is given and the config leaves it at 0
_VERSION_FILES = ("model_card.json", "model_config.json", "user_tower.npz", "item_embeddings.npy",
                  "item_ids.npy", "user_ids.npy")


def load_teacher(folder: Path):
    """The published model in ``folder`` (a ``recsys.model.ServingModel``), or TrainingError."""
    from recsys.model import load_model
    folder = Path(folder)
    missing = [f for f in _VERSION_FILES if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        why = "no such folder" if not folder.is_dir() else f"no {', '.join(missing)}"
        raise TrainingError(f"teacher {folder}: not a published model version folder ({why})")
    try:
        return load_model(folder)
    except (RecsysError, OSError, ValueError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"teacher {folder}: cannot be loaded: {msg}") from exc


def teacher_targets(teacher, prep: Prepared, chunk: int = 8192) -> tuple[Prepared, dict, dict]:
    """(``prep`` with the ``teacher_user`` column, the workers' ``teacher`` config, the card's
    ``distillation`` facts but the weight and temperature).

    ``teacher_user``: the teacher's user embedding of each training example of ``prep.stage``
    (other rows: zeros), from the same point-in-time features, its history at most the encoded one.
    """
    t0 = time.perf_counter()
    dim = int(teacher.item_embeddings.shape[1])
    users, items = teacher.vocab.recoding(prep.vocab)
    rows = np.flatnonzero(prep.split.input_rows(prep.stage) & prep.split.is_positive)
    col = np.zeros((len(prep.rows[ITEM]), dim), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        r = rows[start:start + chunk]
        # in the teacher's vocabulary, its history cut or padded (encoded with fewer recent items)
        inputs = teacher.tower.schema.fit({k: prep.rows[k][r] for k in prep.schema.names}, users, items)
        col[r] = teacher.tower.embed_encoded(inputs)
    known = items > 0
    item = np.zeros((len(items), dim), dtype=np.float32)
    item[known] = teacher.item_embeddings[items[known] - 1]
    config = {"item": item, "known": known, "temperature": float(teacher.config.temperature)}
    facts = {"teacher": teacher.version, "teacher_dim": dim, "teacher_temperature": float(teacher.config.temperature),
             "items_known": round(float(known[1:].mean()), 4) if len(known) > 1 else 0.0,
             "seconds": round(time.perf_counter() - t0, 1)}
    return prep.with_columns(teacher_user=col), config, facts
