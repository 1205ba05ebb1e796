"""The path of one recommendation, without I/O: user tower, ANN, filter seen, top k, fallback."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from recsys.features import UserFeatures


class ServableModel(Protocol):
    """What ``recsys.model.load_model`` returns."""

    version: str
    item_ids: list[str]

    def user_embedding(self, features: list[UserFeatures]) -> np.ndarray: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k (rows of ``item_ids``, scores) per query row; -1 pads."""


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    fallback: bool
    model_version: str | None
    stages_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self, user_id: str) -> dict:
        return {"user_id": user_id, "items": [{"item_id": i, "score": round(s, 6)} for i, s in zip(self.items, self.scores)],
                "model_version": self.model_version, "fallback": self.fallback}


def trending_answer(trending: list[tuple[str, float]], seen: set[str], k: int, version: str | None,
                    stages: dict[str, float]) -> Recommendation:
    """Cold start: the real-time trending items, seen ones left out."""
    picked = [(item, score) for item, score in trending if item not in seen][:k]
    return Recommendation([i for i, _ in picked], [s for _, s in picked], True, version, stages)


def needs_model(model: ServableModel | None, user: UserFeatures) -> bool:
    """Whether ``recommend`` will ask the model (else it answers with trending items)."""
    return model is not None and not user.is_new


def embed_together(requests: list[tuple[ServableModel, UserFeatures]]) -> list[np.ndarray]:
    """Each request's (1, dim) user embedding, one tower call per model: a batch taken while
    the model is swapped holds two versions, and a request must get its own version's."""
    out: list[np.ndarray | None] = [None] * len(requests)
    by_model: dict[int, list[int]] = {}
    for i, (model, _) in enumerate(requests):
        by_model.setdefault(id(model), []).append(i)
    for rows in by_model.values():
        model = requests[rows[0]][0]
        for i, emb in zip(rows, model.user_embedding([requests[i][1] for i in rows])):
            out[i] = emb[None, :]
    return out


def recommend(model: ServableModel | None, user: UserFeatures, k: int, trending: list[tuple[str, float]],
              candidates_per_k: int = 4, query: np.ndarray | None = None) -> Recommendation:
    """Top-k unseen items for one user; trending items when the user has no history or no model.
    ``query``: the user's embedding by ``model``, when the caller computed it (in a batch)."""
    stages: dict[str, float] = {}
    if not needs_model(model, user):
        return trending_answer(trending, user.seen, k, model.version if model else None, stages)
    t0 = time.perf_counter()
    if query is None:
        query = model.user_embedding([user])
    t1 = time.perf_counter()
    # Ask for enough candidates that k survive the seen filter.
    n = min(len(model.item_ids), candidates_per_k * k + len(user.seen))
    idx, scores = model.search(query, n)
    t2 = time.perf_counter()
    items, out_scores = [], []
    for score, i in zip(scores[0], idx[0]):
        if i < 0:
            continue
        item = model.item_ids[i]
        if item not in user.seen:
            items.append(str(item))
            out_scores.append(float(score))
            if len(items) == k:
                break
    t3 = time.perf_counter()
    stages.update(user_tower=(t1 - t0) * 1e3, ann=(t2 - t1) * 1e3, filter=(t3 - t2) * 1e3)
    if len(items) < k:  # the user has seen nearly everything: top up with trending
        rest = trending_answer(trending, user.seen | set(items), k - len(items), model.version, stages)
        items += rest.items
        out_scores += rest.scores
    return Recommendation(items, out_scores, False, model.version, stages)
