"""The path of one recommendation, without I/O: user tower, ANN, filter seen, top k, fallback."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from recsys.features import FilterTypes, UserFeatures


class ServableModel(Protocol):
    """What ``recsys.model.load_model`` returns."""

    version: str
    item_ids: list[str]
    filter_types: FilterTypes  # the seen policy: requests read ``user.seen`` of these types' events

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


class TowerBatcher:
    """One user-tower call for the requests that reach the tower together, on the event loop.

    The first request of a batch schedules the call ``wait_s`` later (0: once the loop has run
    the callbacks already due, i.e. every request whose features arrived in the same turn);
    ``max_size`` requests run it at once. Replaces ``@serve.batch``, whose per-call signature
    inspection, batch metrics and task cost more than the tower itself (issue 33's profile),
    and which works in a Serve replica only."""

    def __init__(self, max_size: int = 16, wait_s: float = 0.0):
        self.max_size, self.wait_s = max(1, max_size), wait_s
        self._pending: list[tuple[ServableModel, UserFeatures, asyncio.Future]] = []

    async def embed(self, model: ServableModel, user: UserFeatures) -> np.ndarray:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((model, user, done))
        if len(self._pending) >= self.max_size:
            self._run()
        elif len(self._pending) == 1:
            if self.wait_s > 0:
                loop.call_later(self.wait_s, self._run)
            else:
                loop.call_soon(self._run)
        return await done

    def _run(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:  # a full batch already ran before its timer
            return
        try:
            out = embed_together([(model, user) for model, user, _ in batch])
        except Exception as exc:  # each waiting request gets the error, as a call of its own would
            for *_, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (*_, done), emb in zip(batch, out):
            if not done.done():  # a request cancelled meanwhile (client gone)
                done.set_result(emb)


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
