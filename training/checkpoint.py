"""What a training run saves each epoch and resumes from: optimizer and model state, the
serving weights, and a meta file. A checkpoint that is incomplete or corrupted is refused
with a TrainingError that says what is wrong."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recsys.errors import TrainingError

CHECKPOINT_FILES = ("state.npz", "serving_weights.npz", "meta.json")


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


def save_checkpoint(folder: Path, model, opt, epoch: int, history: list, start_epoch: int) -> None:
    from training.model import model_weights
    mw = model.get_weights()
    ov = [v.numpy() for v in _opt_vars(opt)]
    np.savez(folder / "state.npz", **{f"m{i}": w for i, w in enumerate(mw)}, **{f"o{i}": w for i, w in enumerate(ov)})
    np.savez(folder / "serving_weights.npz", **model_weights(model))
    (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "n_model": len(mw), "n_opt": len(ov),
                                                  "history": history, "start_epoch": start_epoch}))


def restore_checkpoint(folder: Path, model, opt) -> dict:
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
