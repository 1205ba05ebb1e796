"""Approximate nearest neighbours by inner product: an IVF index in numpy.

Items are clustered by spherical k-means into ``nlist`` lists; a query scores the
centroids, scans the ``nprobe`` best lists exactly and returns the top k. ``build_index``
picks the smallest ``nprobe`` whose recall@10 against exact search on tuning queries
reaches the target (0.98 by default), measures recall@10 on held-out queries and the
speed-up over exact search, and stores them in ``meta.json``. Small, in-process, no native dependency: servable in any replica.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def exact_search(queries: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (ids, scores), best first."""
    scores = queries @ items.T
    k = min(k, items.shape[0])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(scores, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(ps, order, 1)


def _kmeans(x: np.ndarray, n: int, iters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cent = x[rng.choice(len(x), n, replace=False)].copy()
    for _ in range(iters):
        assign = np.argmax(x @ cent.T, axis=1)
        for c in range(n):
            members = x[assign == c]
            if len(members):
                v = members.sum(0)
                cent[c] = v / max(np.linalg.norm(v), 1e-12)
            else:
                cent[c] = x[rng.integers(len(x))]
    return cent.astype(np.float32), np.argmax(x @ cent.T, axis=1)


class IVFIndex:
    def __init__(self, items: np.ndarray, centroids: np.ndarray, assign: np.ndarray, nprobe: int, meta: dict | None = None):
        self.items = np.ascontiguousarray(items, dtype=np.float32)
        self.centroids = centroids.astype(np.float32)
        self.assign = assign.astype(np.int64)
        self.order = np.argsort(self.assign, kind="stable")
        self.offsets = np.searchsorted(self.assign[self.order], np.arange(len(centroids) + 1))
        self.sorted_items = self.items[self.order]
        self.nprobe = int(nprobe)
        self.meta = meta or {}

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of shape (n, k), best first; ids are rows of ``items`` (-1 only if k > items)."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        nprobe = min(nprobe or self.nprobe, self.nlist)
        cs = queries @ self.centroids.T
        ranked = np.argsort(-cs, axis=1)  # lists best first; nlist is small
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        off = self.offsets
        for r, q in enumerate(queries):
            # Lists are contiguous slices of the reordered item matrix: no gather, one matmul each.
            # The nprobe best lists, and more while they hold fewer than k items (a large k, e.g.
            # a seen-filter's headroom, must not be starved by a small nprobe).
            lists, count = [], 0
            for j, c in enumerate(ranked[r]):
                if j >= nprobe and count >= k:
                    break
                if off[c + 1] > off[c]:
                    lists.append(c)
                    count += off[c + 1] - off[c]
            if not lists:
                continue
            s = np.concatenate([self.sorted_items[off[c]:off[c + 1]] @ q for c in lists])
            pos = np.concatenate([np.arange(off[c], off[c + 1]) for c in lists]) if len(lists) > 1 else \
                np.arange(off[lists[0]], off[lists[0] + 1])
            kk = min(k, len(s))
            top = np.argpartition(-s, kk - 1)[:kk] if kk < len(s) else np.arange(len(s))
            top = top[np.argsort(-s[top], kind="stable")]
            ids[r, :kk] = self.order[pos[top]]
            scores[r, :kk] = s[top]
        return ids, scores

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "centroids.npy", self.centroids)
        np.save(folder / "assign.npy", self.assign)
        (folder / "meta.json").write_text(json.dumps({**self.meta, "kind": "ivf-numpy", "nprobe": self.nprobe,
                                                      "nlist": self.nlist}, indent=1))


def recall_at_k(index: IVFIndex, queries: np.ndarray, k: int = 10, nprobe: int | None = None) -> float:
    exact, _ = exact_search(queries, index.items, k)
    approx, _ = index.search(queries, k, nprobe)
    hits = [len(set(a[a >= 0]) & set(e)) for a, e in zip(approx, exact)]
    return float(np.sum(hits) / (len(queries) * min(k, index.items.shape[0])))


def _time_per_query(fn, queries: np.ndarray, repeat: int = 3) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        for q in queries:
            fn(q[None, :])
        best = min(best, (time.perf_counter() - t) / len(queries))
    return best


def cluster(items: np.ndarray, nlist: int | None = None, seed: int = 0) -> IVFIndex:
    """The untuned index: k-means lists over ``items`` (default 1.5 sqrt(n) of them), every list probed."""
    items = np.asarray(items, dtype=np.float32)
    n = len(items)
    if n == 0:
        raise ValueError("no items to index")
    nlist = nlist or max(1, min(int(round(np.sqrt(n) * 1.5)), n // 8 or 1))
    cent, assign = _kmeans(items, nlist, seed=seed) if nlist > 1 else (
        items.mean(0, keepdims=True), np.zeros(n, dtype=np.int64))
    return IVFIndex(items, cent, assign, nlist)


def build_index(items: np.ndarray, queries: np.ndarray, held_out: np.ndarray, target_recall: float = 0.98,
                k: int = 10, nlist: int | None = None, seed: int = 0, margin: float = 0.005) -> IVFIndex:
    """An IVF index over ``items`` with the smallest nprobe whose recall@k on ``queries`` reaches
    ``target_recall + margin``; its recall is then measured on ``held_out`` queries (other users'),
    never on the queries that chose it. ``meta["full_scan"]`` says that no nprobe below every
    list reached the target: the index is then an exact search with no speed-up.
    """
    items = np.asarray(items, dtype=np.float32)
    n = len(items)
    index = cluster(items, nlist, seed)
    nlist = index.nlist
    queries, held_out = np.asarray(queries, dtype=np.float32), np.asarray(held_out, dtype=np.float32)
    chosen, tuned = nlist, 1.0
    for p in range(1, nlist):
        r = recall_at_k(index, queries, k, p)
        if r >= min(1.0, target_recall + margin):
            chosen, tuned = p, r
            break
    index.nprobe = chosen
    held = recall_at_k(index, held_out, k)
    sample = held_out[:200]
    t_ann = _time_per_query(lambda q: index.search(q, k), sample)
    t_exact = _time_per_query(lambda q: exact_search(q, items, k), sample)
    index.meta = {"recall@10": round(held, 4), "recall@10_on_tuning_queries": round(tuned, 4),
                  "target_recall": target_recall, "reached": held >= target_recall, "full_scan": chosen == nlist,
                  "tuning_queries": int(len(queries)), "held_out_queries": int(len(held_out)),
                  "items": n, "query_ms": round(t_ann * 1e3, 4), "exact_query_ms": round(t_exact * 1e3, 4),
                  "speedup_vs_exact": round(t_exact / t_ann, 2) if t_ann else None,
                  "candidates_scanned": round(float(np.mean(np.diff(index.offsets))) * chosen, 1)}
    return index


def load_index(folder: Path, items: np.ndarray) -> IVFIndex:
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    return IVFIndex(items, np.load(folder / "centroids.npy"), np.load(folder / "assign.npy"), meta["nprobe"], meta)
