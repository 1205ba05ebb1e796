"""The two-tower model's configuration, vocabularies and servable artifact (numpy only).

``export`` writes a trained model's weights as .npz beside its vocabularies, and
``load_model`` returns a ``ServingModel`` whose ``user_embedding`` is plain numpy: serving
never imports TensorFlow. The tf_keras model that is trained lives in ``training.model``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from recsys import user_input
from recsys.features import FilterTypes, UserFeatures, policy_types
from recsys.user_input import COUNTS, HIST, USER


@dataclass
class ModelConfig:
    dim: int = 64               # output embedding size
    user_dim: int = 32          # user id embedding size
    hidden: int = 256           # user tower hidden layer
    history: int = 50           # recent items the user tower reads (<= settings.features.recent_items)
    newest: int = 1             # the newest items whose own embeddings enter the hidden layer beside the pooled one
    share_item_table: bool = True
    temperature: float = 0.05
    logq: bool = True
    random_negatives: int = 0   # uniform negatives mixed with the in-batch ones
    user_dropout: float = 0.1   # share of training examples whose user id is replaced by OOV
    batch_size: int = 256       # per worker
    learning_rate: float = 2e-3
    lr_decay: str = "cosine"    # "cosine" (to 0 over the run: the last epoch's model is stable) | "none"
    epochs: int = 5
    min_steps: int = 300        # unless epochs are given, more epochs until each worker takes this many steps
    seed: int = 0
    distill_weight: float = 0.0       # share of the loss from a teacher model (training.job.train(teacher=)); 0 = none
    distill_temperature: float = 1.0  # softening of the teacher's and the student's distributions in that share

    def __post_init__(self):
        if self.lr_decay not in ("cosine", "none"):
            raise ValueError(f"lr_decay {self.lr_decay!r}: cosine or none")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight {self.distill_weight!r}: between 0 and 1")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature {self.distill_temperature!r}: above 0")

    def epochs_for(self, examples: int, workers: int) -> int:
        """The config's epochs, raised on small data so that each worker takes ``min_steps`` steps
        (6,000 examples on 2 workers are 11 steps an epoch: 5 epochs barely move the towers)."""
        steps = max(1, examples // workers // self.batch_size)
        return max(self.epochs, -(-self.min_steps // steps))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---- vocabularies and encoding ---------------------------------------------------------------

@dataclass
class Vocab:
    """Id <-> index maps; index 0 is padding / out-of-vocabulary for both."""

    user_ids: list[str]
    item_ids: list[str]
    genres: list[str] = field(default_factory=list)
    item_genres: Optional[np.ndarray] = None  # (n_items + 1, n_genres) float32 multi-hot

    def __post_init__(self):
        self.user_index = {u: i + 1 for i, u in enumerate(self.user_ids)}
        self.item_index = {t: i + 1 for i, t in enumerate(self.item_ids)}
        if self.item_genres is None:
            self.item_genres = np.zeros((len(self.item_ids) + 1, len(self.genres)), dtype=np.float32)

    @classmethod
    def build(cls, user_ids, item_ids, item_features: Optional[dict[str, list[str]]] = None) -> "Vocab":
        """Users and items of the events; with ``item_features``, every item of the catalogue too."""
        user_ids = sorted(set(map(str, user_ids)))
        item_ids = sorted(set(map(str, item_ids)) | set(item_features or ()))
        genres: list[str] = []
        mh = None
        if item_features:
            genres = sorted({g for gs in item_features.values() for g in gs})
            gi = {g: i for i, g in enumerate(genres)}
            mh = np.zeros((len(item_ids) + 1, len(genres)), dtype=np.float32)
            for k, t in enumerate(item_ids):
                for g in item_features.get(t, []):
                    mh[k + 1, gi[g]] = 1.0
        return cls(user_ids, item_ids, genres, mh)

    def user_codes(self, ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.user_index.get(u, 0) for u in ids), dtype=np.int32, count=len(ids))

    def item_codes(self, ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.item_index.get(t, 0) for t in ids), dtype=np.int32, count=len(ids))

    def recoding(self, other: "Vocab") -> tuple[np.ndarray, np.ndarray]:
        """(users, items): this vocabulary's code of each code of ``other`` (0 -> 0, and ids this
        one does not know -> 0), for ``user_input.Schema.fit``."""
        return (np.concatenate([[0], self.user_codes(other.user_ids)]).astype(np.int32),
                np.concatenate([[0], self.item_codes(other.item_ids)]).astype(np.int32))

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def save(self, folder: Path) -> None:
        np.save(folder / "item_ids.npy", np.array(self.item_ids, dtype=str))
        np.save(folder / "user_ids.npy", np.array(self.user_ids, dtype=str))
        np.save(folder / "item_genres.npy", self.item_genres)
        (folder / "genres.json").write_text(json.dumps(self.genres))

    @classmethod
    def load(cls, folder: Path) -> "Vocab":
        return cls([str(x) for x in np.load(folder / "user_ids.npy")], [str(x) for x in np.load(folder / "item_ids.npy")],
                   json.loads((folder / "genres.json").read_text()), np.load(folder / "item_genres.npy"))


# ---- numpy towers (serving) -------------------------------------------------------------------

def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


TOWER_WEIGHTS = ("user_table", "hist_table", "pos_logits", "hidden_w", "hidden_b", "user_out_w", "user_out_b")
OPTIONAL_WEIGHTS = ("newest_w",)  # the newest items' kernel: absent without them (newest 0, or older versions)
TABLES = ("user_table", "hist_table")  # rows gathered per request: they stay compressed in memory
DENSE = ("hidden_w", "user_out_w", "newest_w")  # (in, out) matrices: fp16 ones decoded once at load, used in fp32
SCALE = ".scale"                      # int8: the float32 scale of each table row


def compress_tower(weights: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """The user tower's weights as a server stores them. fp16 casts the tables and matrices. int8
    stores each table row as int8 codes times a float32 scale (symmetric: an outlier costs only its
    own row's resolution); the matrices stay fp32: they are small (hidden x dim, not one row per user
    or item), and int8 there cost 1-2% HR@10 on MovieLens-100K (README "Compression"). Biases and
    position weights stay fp32."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"unknown precision {precision!r}: fp32, fp16 or int8")
    out = {}
    for name in TOWER_WEIGHTS + tuple(n for n in OPTIONAL_WEIGHTS if n in weights):
        w = np.asarray(weights[name], dtype=np.float32)
        if precision == "fp16" and name in TABLES + DENSE:
            out[name] = w.astype(np.float16)
        elif precision == "int8" and name in TABLES:
            scale = np.max(np.abs(w), axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            out[name] = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            out[name + SCALE] = scale.astype(np.float32).ravel()
        else:
            out[name] = w
    return out


def tower_precision(weights: dict[str, np.ndarray]) -> str:
    return {np.dtype(np.int8): "int8", np.dtype(np.float16): "fp16"}.get(weights["hist_table"].dtype, "fp32")


EMBED_CHUNK = 4096  # users embedded at once (NumpyUserTower.embed_encoded)


class NumpyUserTower:
    """The user tower's forward pass in numpy: microseconds per user, no TensorFlow. Its weights
    may be compressed (``compress_tower``): table rows are decoded as they are gathered."""

    def __init__(self, weights: dict[str, np.ndarray], vocab: Vocab, schema: user_input.Schema):
        self.w = {k: v for k, v in weights.items() if not k.endswith(SCALE)}
        self.scales = {k[:-len(SCALE)]: v for k, v in weights.items() if k.endswith(SCALE)}
        for name in DENSE:  # small: decoded once
            if name in self.w:
                self.w[name] = self._decode(name, self.w[name], slice(None))
        self.newest = 0 if "newest_w" not in self.w else self.w["newest_w"].shape[0] // self.w["hist_table"].shape[1]
        self.vocab = vocab
        self.schema = schema
        self.precision = tower_precision(weights)
        self.pos_w = np.exp(weights["pos_logits"]).astype(np.float32)

    def _decode(self, name: str, codes: np.ndarray, rows) -> np.ndarray:
        if name in self.scales:
            return codes.astype(np.float32) * self.scales[name][rows][..., None]
        return codes if codes.dtype == np.float32 else codes.astype(np.float32)

    def embed_encoded(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """(n, dim) embeddings of encoded users (``recsys.user_input``), ``EMBED_CHUNK`` at a time:
        a user's history rows take history x dim floats while pooled (12.8 kB at 50 x 64), so a
        retraining's 160,000 test users at once took 5 GB."""
        n = len(inputs[USER])
        if n > EMBED_CHUNK:
            return np.concatenate([self.embed_encoded({k: inputs[k][i:i + EMBED_CHUNK] for k in self.schema.names})
                                   for i in range(0, n, EMBED_CHUNK)])
        w = self.w
        user, hist, counts = inputs[USER], inputs[HIST], inputs[COUNTS]
        u = self._decode("user_table", w["user_table"][user], user)
        h = self._decode("hist_table", w["hist_table"][hist], hist)
        pw = self.pos_w[None, :] * (hist > 0)
        pooled = np.einsum("bl,bld->bd", pw, h) / np.maximum(pw.sum(1, keepdims=True), 1e-6)
        x = np.concatenate([u, pooled, counts], axis=1)
        pre = x @ w["hidden_w"] + w["hidden_b"]
        if self.newest:
            pre += h[:, :self.newest].reshape(len(h), -1) @ w["newest_w"]
        z = np.maximum(pre, 0.0)
        return _l2n(z @ w["user_out_w"] + w["user_out_b"]).astype(np.float32)

    def __call__(self, features: Sequence[UserFeatures]) -> np.ndarray:
        return self.embed_encoded(user_input.encode(features, self.schema, self.vocab))


def item_embeddings_np(weights: dict[str, np.ndarray], item_genres: np.ndarray) -> np.ndarray:
    """Embeddings of items 1..N (row k is vocab item k), from the numpy weights."""
    x = np.concatenate([weights["item_table"][1:], item_genres[1:]], axis=1)
    return _l2n(x @ weights["item_out_w"] + weights["item_out_b"]).astype(np.float32)


class ContentTower:
    """The content head of the item tower (``training.model``): an item's genres alone, projected
    and L2-normalized. It embeds an item the model never saw from its catalogue entry."""

    FILE = "content_tower.npz"

    def __init__(self, weights: dict[str, np.ndarray], genres: list[str]):
        self.w, self.b = weights["content_w"], weights["content_b"]
        self.genre_index = {g: i for i, g in enumerate(genres)}

    @staticmethod
    def weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The head's weights, none for a model trained without genres."""
        return {k: weights[k] for k in ("content_w", "content_b") if k in weights}

    def known(self, genres: Sequence[str]) -> list[str]:
        return [g for g in genres if g in self.genre_index]

    def embed(self, genres_per_item: Sequence[Sequence[str]]) -> np.ndarray:
        """(n, dim) float32, L2-normalized; genres the model does not know are left out."""
        mh = np.zeros((len(genres_per_item), len(self.genre_index)), dtype=np.float32)
        for r, genres in enumerate(genres_per_item):
            for g in self.known(genres):
                mh[r, self.genre_index[g]] = 1.0
        return _l2n(mh @ self.w + self.b).astype(np.float32)


class FreshItems:
    """Items added to a served model since its index was built, searched exactly beside the index.

    Written by one thread (the replica's catalogue follower), read by requests: ``add`` appends
    the ids first and then swaps in a new vector array, so a search never sees a row without
    its id."""

    def __init__(self, ids: list[str], dim: int):
        self.ids = ids  # the model's item ids: fresh ones are appended
        self.first = len(ids)
        self.row: dict[str, int] = {}
        self.vectors = np.zeros((0, dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.row)

    def add(self, items: Sequence[str], vectors: np.ndarray) -> None:
        """Add new items, or give an added item its new vector (a catalogue update)."""
        grown = np.concatenate([self.vectors, np.zeros((sum(i not in self.row for i in set(items)), vectors.shape[1]),
                                                      dtype=np.float32)])
        for item, vec in zip(items, vectors):
            if item not in self.row:
                self.row[item] = len(self.ids) - self.first
                self.ids.append(item)
            grown[self.row[item]] = vec
        self.vectors = grown

    def merge(self, queries: np.ndarray, idx: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's top-k merged with the fresh items' exact scores, best first."""
        fresh = self.vectors
        if not len(fresh):
            return idx, scores
        all_idx = np.concatenate([idx, np.broadcast_to(self.first + np.arange(len(fresh)), (len(queries), len(fresh)))], 1)
        all_scores = np.concatenate([scores, queries @ fresh.T], 1)
        all_scores = np.where(all_idx < 0, -np.inf, all_scores)
        top = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(all_idx, top, 1), np.take_along_axis(all_scores, top, 1)


# ---- export and load --------------------------------------------------------------------------

def export(folder: Path, weights: dict[str, np.ndarray], vocab: Vocab, cfg: ModelConfig,
           tower: str = "fp32") -> None:
    """Write the serving artifact files (no ANN, no card): the user tower at ``tower`` precision
    (``compress_tower``), the vocabularies, the config and the fp32 item embeddings (what the ANN
    index is built from, and what evaluation and distillation read)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "user_tower.npz", **compress_tower(weights, tower))
    vocab.save(folder)
    (folder / "model_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    user_input.write(folder, user_input.schema(cfg.history))  # checked when a replica loads it
    np.save(folder / "item_embeddings.npy", item_embeddings_np(weights, vocab.item_genres))
    if ContentTower.weights(weights):
        np.savez(folder / ContentTower.FILE, **ContentTower.weights(weights))


class ServingModel:
    """What a model server holds: the numpy user tower, item ids, the ANN index, the card.

    The tower's precision is its stored dtype; the index's kind, codes and search parameter are in
    ``ann/meta.json``. The fp32 item embeddings are memory-mapped: a request scores the index's own
    codes, so they are read only by offline evaluation. A version published before the FAISS
    index (no ``ann/index.faiss``) is served by exact search over its embeddings."""

    def __init__(self, folder: Path):
        from recsys.ann import AnnIndex, load_index, new_index
        from recsys.registry import CARD, verify_files
        self.folder = Path(folder)
        card = self.folder / CARD
        self.card: dict = json.loads(card.read_text()) if card.exists() else {}
        if "files" in self.card:  # a truncated or swapped file fails here, not in a request
            verify_files(self.folder, self.card["files"])
        self.config = ModelConfig.from_dict(json.loads((self.folder / "model_config.json").read_text()))
        self.vocab = Vocab.load(self.folder)
        with np.load(self.folder / "user_tower.npz") as z:
            self.weights = {k: z[k] for k in z.files}
        self.version: str = self.card.get("version", self.folder.name)
        # The event types whose items requests filter out, chosen on validation (an older card: every type).
        self.filter_types: FilterTypes = policy_types(self.card.get("seen_policy", {}).get("filter_types"))
        self.tower = NumpyUserTower(self.weights, self.vocab,  # the schema it recorded, else refused
                                    user_input.recorded_schema(self.folder, self.config.history, self.version))
        self.item_ids: list[str] = list(self.vocab.item_ids)
        self.item_embeddings: np.ndarray = np.load(self.folder / "item_embeddings.npy", mmap_mode="r")
        if (self.folder / "ann" / "index.faiss").exists():
            self.index: AnnIndex = load_index(self.folder / "ann")
        else:
            self.index = new_index("flat", np.asarray(self.item_embeddings))
        self.content: Optional[ContentTower] = None  # none without genres, or exported before it
        if (self.folder / ContentTower.FILE).exists():
            with np.load(self.folder / ContentTower.FILE) as z:
                self.content = ContentTower({k: z[k] for k in z.files}, self.vocab.genres)
        self.fresh = FreshItems(self.item_ids, int(self.item_embeddings.shape[1]))
        declared = self.card.get("compression", {}).get("tower", self.tower.precision)
        if declared != self.tower.precision:
            raise ValueError(f"{self.folder}: the card says a {declared} user tower, the file holds {self.tower.precision}")

    def user_embedding(self, features: Sequence[UserFeatures]) -> np.ndarray:
        """(len(features), dim) float32, L2-normalized; unknown users/items fall into the OOV slot."""
        return self.tower(features)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (rows of ``item_ids``, scores) per query: the ANN index and the fresh items."""
        idx, scores = self.index.search(queries, k)
        return self.fresh.merge(queries, idx, scores, k)

    def add_items(self, catalogue: dict[str, list[str]]) -> list[str]:
        """Embed the catalogue's items this version does not know from their genres and add them
        to the live index; the items added (none without a content tower or a known genre)."""
        if self.content is None:
            return []
        new = [(item, genres) for item, genres in catalogue.items()
               if item not in self.vocab.item_index and self.content.known(genres)]
        if new:
            self.fresh.add([i for i, _ in new], self.content.embed([g for _, g in new]))
        return [i for i, _ in new]

    def scored_item_vectors(self) -> np.ndarray:
        """The item vectors as requests score them (the index's codes decoded, then the fresh
        items'), rows = item_ids."""
        return np.concatenate([self.index.stored_vectors(), self.fresh.vectors])


def load_model(version_dir) -> ServingModel:
    """Load one model version folder for serving (numpy only)."""
    return ServingModel(Path(version_dir))
