"""Nearest items by inner product, on FAISS: the index a model version ships and a replica serves.

An index kind is a FAISS ``index_factory`` description (``KINDS``): exact (``flat``, over fp32,
fp16 or int8 codes), IVF lists over the same codes or product-quantized ones, or HNSW.
``recsys bench ann`` compares them one query at a time on one thread, as the request path
runs them (README "ANN index"); ``default_kind`` follows that table: exact below
``exact_below`` items (a few thousand items are scanned faster than lists are picked), IVF above.

``build_index`` picks the smallest search parameter (nprobe, efSearch) whose recall@10 against
exact search on tuning queries reaches the target, then measures recall@10 on held-out queries
(other users'), never on the ones that chose it, and the time per query against exact search.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

K = 10
# kind -> (factory description, its tuned search parameter or None). {nlist}, {m}: see ``factory``.
KINDS: dict[str, tuple[str, str | None]] = {
    "flat": ("Flat", None),
    "flat_fp16": ("SQfp16", None),
    "flat_int8": ("SQ8", None),
    "ivf_flat": ("IVF{nlist},Flat", "nprobe"),
    "ivf_fp16": ("IVF{nlist},SQfp16", "nprobe"),
    "ivf_int8": ("IVF{nlist},SQ8", "nprobe"),
    "ivf_pq": ("IVF{nlist},PQ{m}np", "nprobe"),  # np: no polysemous training (slow, for Hamming filtering)
    "ivf_pq_refine": ("IVF{nlist},PQ{m}np,RFlat", "nprobe"),  # the top k * REFINE_K_FACTOR re-scored on fp32
    "hnsw": ("HNSW32,Flat", "efSearch"),
}
PRECISIONS = ("fp32", "fp16", "int8")
REFINE_K_FACTOR = 4
HNSW_EF_CONSTRUCTION = 80  # FAISS's default 40 left a 1M graph that needed efSearch 189 for recall 0.95
_widening = threading.Lock()
IVF_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
EF_GRID = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def nlist_for(n: int) -> int:
    """About 4 sqrt(n) lists, and at least 39 items per list (FAISS's k-means asks for that many)."""
    return max(1, min(int(round(4 * np.sqrt(n))), n // 39))


def factory(kind: str, n: int, dim: int, pq_m: int = 32) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}: one of {', '.join(KINDS)}")
    return KINDS[kind][0].format(nlist=nlist_for(n), m=pq_m if dim % pq_m == 0 else dim // 2)


def default_kind(n_items: int, precision: str = "fp32", exact_below: int = 50_000) -> str:
    """Exact search over the items' codes below ``exact_below`` items, IVF lists above."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if n_items < exact_below:
        return "flat" if precision == "fp32" else f"flat_{precision}"
    return f"ivf_{'flat' if precision == 'fp32' else precision}"


def precision_of(kind: str) -> str:
    """What a kind stores per item: fp32, fp16 or int8 codes, or pq (product-quantized)."""
    return next((p for p in ("fp16", "int8", "pq") if p in kind), "fp32")


def exact_search(queries: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product in numpy: (ids, scores), best first. The reference of the tests."""
    scores = queries @ items.T
    k = min(k, items.shape[0])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(scores, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(ps, order, 1)


def recall_vs_exact(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top k found, over all queries."""
    return float(sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth)) / truth.size)


@dataclass
class AnnIndex:
    """A FAISS index and its search parameter; ``search`` is what a request calls."""
    kind: str
    index: faiss.Index
    params: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def param_name(self) -> str | None:
        return KINDS[self.kind][1]

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_param(self, value: int) -> None:
        self.params = {self.param_name: int(value)}
        faiss.ParameterSpace().set_index_parameter(self.index, self.param_name, int(value))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of shape (n, min(k, items)), best first; ids are rows of the indexed items.
        An IVF search whose probed lists hold fewer than k items (a large k: a seen-filter's
        headroom) probes twice as many lists until they do, rather than answer padding (-1)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, self.ntotal)
        scores, ids = self.index.search(queries, k)
        if self.param_name == "nprobe" and (ids < 0).any():
            ivf = faiss.extract_index_ivf(self.index)
            nprobe = self.params.get("nprobe", ivf.nprobe)
            while (ids < 0).any() and nprobe < ivf.nlist:
                nprobe = min(ivf.nlist, 2 * nprobe)
                if isinstance(self.index, faiss.IndexRefine):  # FAISS has no per-call parameters for it
                    with _widening:
                        ivf.nprobe = nprobe
                        try:
                            scores, ids = self.index.search(queries, k)
                        finally:
                            ivf.nprobe = self.params.get("nprobe", 1)
                else:
                    scores, ids = self.index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        return ids, scores

    def stored_vectors(self) -> np.ndarray:
        """The item vectors as the index scores them (int8 and fp16 codes decoded): what an exact
        evaluation of the served model must rank with."""
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
        return self.index.reconstruct_n(0, self.ntotal)

    @property
    def nbytes(self) -> int:
        return int(faiss.serialize_index(self.index).nbytes)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        (folder / "meta.json").write_text(json.dumps({**self.meta, "kind": self.kind, "params": self.params}, indent=1))


def load_index(folder: Path) -> AnnIndex:
    """The index a model version ships, with the search parameter its card chose."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    ann = AnnIndex(meta["kind"], faiss.read_index(str(folder / "index.faiss")), meta=meta)
    for name, value in meta.get("params", {}).items():
        ann.set_param(value)
        assert name == ann.param_name, (name, ann.param_name)
    return ann


def new_index(kind: str, items: np.ndarray, seed: int = 0) -> AnnIndex:
    """The untuned index of ``kind`` over ``items`` (rows = ids); trained on at most 100k of them."""
    items = np.ascontiguousarray(items, dtype=np.float32)
    n, dim = items.shape
    if n == 0:
        raise ValueError("no items to index")
    index = faiss.index_factory(dim, factory(kind, n, dim), faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf_pq_refine":
        index.k_factor = REFINE_K_FACTOR  # saved with the index (index_factory returns the IndexRefineFlat)
    if kind == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    if not index.is_trained:
        sample = items if n <= 100_000 else items[np.random.default_rng(seed).choice(n, 100_000, replace=False)]
        index.train(sample)
    index.add(items)
    return AnnIndex(kind, index)


def grid(ann: AnnIndex) -> tuple[int, ...]:
    if ann.param_name == "nprobe":
        nlist = faiss.extract_index_ivf(ann.index).nlist
        return tuple(g for g in IVF_GRID if g < nlist) + (nlist,)
    return EF_GRID if ann.param_name == "efSearch" else ()


def choose_param(ann: AnnIndex, search: Callable[[np.ndarray, int], np.ndarray], tuning: np.ndarray,
                 truth: np.ndarray, target: float) -> tuple[int | None, float]:
    """The smallest search parameter whose recall@k on the tuning queries reaches ``target`` (the
    grid, then bisection between the grid values around it); else the grid's best. It is left set."""
    k = truth.shape[1]
    if ann.param_name is None:
        return None, recall_vs_exact(search(tuning, k), truth)

    def rec(p: int) -> float:
        ann.set_param(p)
        return recall_vs_exact(search(tuning, k), truth)
    values = grid(ann)
    best, prev = (None, -1.0), values[0] - 1  # efSearch starts at k: FAISS searches max(efSearch, k)
    for g in values:
        r = rec(g)
        if r >= target:
            lo, hi, best = prev + 1, g, (g, r)
            while lo < hi:
                mid = (lo + hi) // 2
                rm = rec(mid)
                if rm >= target:
                    hi, best = mid, (mid, rm)
                else:
                    lo = mid + 1
            break
        if r > best[1]:
            best = (g, r)
        prev = g
    ann.set_param(best[0])
    return best


def _ms_per_query(search: Callable[[np.ndarray, int], object], queries: np.ndarray, k: int) -> float:
    """Median over 3 passes of one query at a time on one thread, as a request runs it."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        passes = []
        for _ in range(3):
            t = time.perf_counter()
            for q in queries:
                search(q[None, :], k)
            passes.append((time.perf_counter() - t) / len(queries))
        return float(np.median(passes)) * 1e3
    finally:
        faiss.omp_set_num_threads(before)


def build_index(items: np.ndarray, tuning: np.ndarray, held_out: np.ndarray, kind: str,
                target_recall: float = 0.95, k: int = K, margin: float = 0.005, seed: int = 0) -> AnnIndex:
    """An index of ``kind`` over ``items`` with the smallest search parameter whose recall@k on
    ``tuning`` queries reaches ``target_recall + margin``; recall is then measured on ``held_out``
    queries. Recall counts against exact search over the fp32 vectors: an int8 index's own
    loss is in it. ``meta`` holds the figures the model card shows."""
    items = np.ascontiguousarray(items, dtype=np.float32)
    tuning = np.ascontiguousarray(tuning, dtype=np.float32)
    held_out = np.ascontiguousarray(held_out, dtype=np.float32)
    t0 = time.perf_counter()
    ann = new_index(kind, items, seed)
    build_s = time.perf_counter() - t0
    exact = faiss.IndexFlatIP(items.shape[1])
    exact.add(items)
    k = min(k, len(items))
    truth_tuning, truth_held = exact.search(tuning, k)[1], exact.search(held_out, k)[1]
    param, tuned = choose_param(ann, lambda q, kk: ann.search(q, kk)[0], tuning, truth_tuning,
                                min(1.0, target_recall + margin))
    held = recall_vs_exact(ann.search(held_out, k)[0], truth_held)
    sample = held_out[:200]
    ms, exact_ms = _ms_per_query(ann.search, sample, k), _ms_per_query(exact.search, sample, k)
    ann.meta = {"factory": factory(kind, len(items), items.shape[1]), "items": int(len(items)),
                "recall@10": round(held, 4), "recall@10_on_tuning_queries": round(tuned, 4),
                "target_recall": target_recall, "reached": held >= target_recall,
                "tuning_queries": int(len(tuning)), "held_out_queries": int(len(held_out)),
                "query_ms": round(ms, 4), "exact_query_ms": round(exact_ms, 4),
                "speedup_vs_exact": round(exact_ms / ms, 2) if ms else None,
                "build_s": round(build_s, 2), "bytes": ann.nbytes, "bytes_per_item": round(ann.nbytes / len(items), 1)}
    return ann
