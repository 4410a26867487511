"""Approximate nearest-neighbour indexes with FAISS, chosen by size as autofaiss does, built shard by shard,
tuned to a target recall and written beside the embeddings. Torch-free.

**Choice** (:func:`choose_index_key`, autofaiss's ``get_optimal_index_keys_v2`` rules, DESIGN.md §9): fewer
than 1,000 vectors ``Flat``; fewer than 10,000 ``HNSW15``; else ``HNSW{M}`` when ``4 * (d + 2M)`` bytes per
vector fit the memory budget with ``M >= 8`` (at most 32); else ``IVF{k},Flat`` when fewer than 1M vectors
fit; else ``OPQ{m}_{y},IVF{k}[_HNSW32],PQ{m}x8`` with the largest ``m`` in 256, 128, ..., 4 whose
``m + 8`` bytes per vector (plus the coarse quantizer) fit. Clusters ``k``: ``2^round(log2(4 sqrt(n)))`` up to
1M vectors, 16,384 below 10M, 65,536 below 300M, 131,072 beyond (autofaiss switches to 16,384 at 1M
exactly; here 1M still uses the 4 sqrt(n) rule, which trains in minutes rather than an hour on a CPU).
autofaiss itself is not used: its release pins numpy < 2 and calls ``faiss.OPQMatrix(d, M=..., d2=...)``
with keywords that FAISS 1.15's bindings reject (``TypeError: OPQMatrix.__init__() got an unexpected
keyword argument 'M'``); the index factory is called directly instead.

**Build** (:func:`build_ann_index`): train on a uniform sample of rows (64 per IVF cluster, OPQ on at most
65,536), add the shards one by one (one shard in memory besides the index), then tune the search
parameter (``efSearch`` for HNSW, ``nprobe`` — and the HNSW quantizer's ``efSearch`` = 2 nprobe — for IVF)
to the smallest value whose recall@k against exact search reaches the target (plus a margin of 0.01) on
held-out queries, and measure recall@1, recall@k, latency and queries/s on a *second*, disjoint set of
queries. Queries are rows of the collection kept out of the index (and of the exact answers) until the
parameters are tuned and measured, then added last — so they are true unseen queries, not vectors the
index already holds — or the embeddings of another directory (``queries``, e.g. text embeddings for
text→image search). The held-out rows are listed in ``ann.json`` to map FAISS ids back to rows.

**Files**: ``ann-<token>.faiss`` and ``ann.json`` (key, parameters, measured figures, a digest of the
embeddings it was built on), each written to a temporary name and renamed; ``ann.json`` is written last
and names its index file, so readers see the old index or the new one, never a mix. An index whose
digest no longer matches the manifest (the embeddings were re-extracted) is ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cnclip_vision.errors import CNClipError
from cnclip_vision.retrieval import store

logger = logging.getLogger("cnclip_vision.retrieval")

__all__ = [
    "ANN_JSON",
    "AnnIndex",
    "build_ann_index",
    "choose_index_key",
    "estimate_index_bytes",
    "exact_topk",
    "load_ann_index",
    "parse_memory",
    "parse_search_params",
    "read_ann_info",
    "recall_at",
]

ANN_JSON = "ann.json"
SEARCH_PARAMS = ("efSearch", "nprobe", "quantizer_efSearch")  # what set_params accepts (integers >= 1)
_PQ_BYTES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
_EF_GRID = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
_NPROBE_GRID = (
    1,
    2,
    3,
    4,
    6,
    8,
    12,
    16,
    24,
    32,
    48,
    64,
    96,
    128,
    192,
    256,
    384,
    512,
    768,
    1024,
    1536,
    2048,
    3072,
    4096,
)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise CNClipError(
            "FAISS indexes need FAISS: pip install faiss-cpu (or faiss-gpu-cu12 on a GPU machine)"
        ) from None
    return faiss


def _params_of(index_key: str) -> tuple[str, ...]:
    """The search parameters of an index of this factory key."""
    if "IVF" in index_key:
        return ("nprobe", "quantizer_efSearch") if "_HNSW" in index_key else ("nprobe",)
    return ("efSearch",) if re.search(r"(^|,)HNSW", index_key) else ()


def parse_search_params(params: str, index_key: str | None = None) -> dict[str, int]:
    """``"nprobe=64,quantizer_efSearch=128"`` as ``{name: value}``: comma-separated ``NAME=INTEGER`` pairs with
    names in :data:`SEARCH_PARAMS` (those of ``index_key`` when given) and values >= 1. ValueError otherwise
    (FAISS itself accepts ``nprobe=-3`` as 2**64 - 3 and ``nprobe=2.5`` as 2)."""
    accepted = SEARCH_PARAMS if index_key is None else _params_of(index_key)
    parsed: dict[str, int] = {}
    for item in params.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ValueError(f"search parameters {params!r}: {item.strip()!r} is not NAME=VALUE (e.g. nprobe=64)")
        if name not in accepted:
            if index_key is not None and name in SEARCH_PARAMS:
                takes = f"it takes {', '.join(accepted)}" if accepted else "it has no search parameters"
                raise ValueError(f"search parameter {name} does not apply to a {index_key} index; {takes}")
            raise ValueError(f"unknown search parameter {name!r}; expected {', '.join(accepted)}")
        try:
            parsed[name] = int(value)
        except ValueError:
            raise ValueError(f"search parameter {name} must be an integer >= 1, got {value!r}") from None
        if parsed[name] < 1:
            raise ValueError(f"search parameter {name} must be an integer >= 1, got {parsed[name]}")
    return parsed


def parse_memory(value: str | int | float) -> int:
    """Bytes of a memory size: ``4GB``, ``512MB``, ``1.5G``, ``2GiB``, ``1000000`` (binary units, as autofaiss)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:[iI]?[bB])?\s*", str(value))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"memory must be a size such as 4GB, 512MB or 1.5G, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def num_clusters(num_vectors: int) -> int:
    """Inverted lists of an IVF index of ``num_vectors`` vectors (see the module docstring)."""
    if num_vectors <= 1_000_000:
        return max(1, 2 ** round(math.log2(4 * math.sqrt(num_vectors))))
    if num_vectors < 10_000_000:
        return 16_384
    return 65_536 if num_vectors < 300_000_000 else 131_072


def estimate_index_bytes(key: str, num_vectors: int, dim: int) -> int:
    """Approximate memory of a FAISS index of this factory key (codes, ids, coarse quantizer, links)."""
    n, d = num_vectors, dim
    if key == "Flat":
        return 4 * n * d
    if m := re.fullmatch(r"HNSW(\d+)", key):
        return 4 * n * (d + 2 * int(m.group(1)))
    if m := re.fullmatch(r"IVF(\d+)(_HNSW32)?,Flat", key):
        k = int(m.group(1))
        return n * (4 * d + 8) + 4 * k * d + (k * 4 * 64 if m.group(2) else 0)
    if m := re.fullmatch(r"OPQ(\d+)_(\d+),IVF(\d+)(_HNSW32)?,PQ(\d+)x8", key):
        y, k, pq = int(m.group(2)), int(m.group(3)), int(m.group(5))
        return n * (pq + 8) + 4 * k * y + (k * 4 * 64 if m.group(4) else 0) + 4 * y * d + 4 * 256 * y
    raise ValueError(f"cannot estimate the size of index {key!r}")


def choose_index_key(num_vectors: int, dim: int, memory: str | int) -> str:
    """The FAISS index factory key for ``num_vectors`` ``dim``-d vectors within ``memory`` bytes (see the
    module docstring). CNClipError when not even the smallest product quantizer fits."""
    n, budget = num_vectors, parse_memory(memory)
    if n < 1:
        raise ValueError(f"num_vectors must be >= 1, got {n}")
    if n < 1_000:
        return "Flat"
    if n < 10_000:
        return "HNSW15"
    m_hnsw = int(math.floor((budget / (4 * n) - dim) / 2))
    if m_hnsw >= 8:
        return f"HNSW{min(m_hnsw, 32)}"
    k = num_clusters(n)
    coarse = f"IVF{k}" if k < 1000 else f"IVF{k}_HNSW32"
    if n < 1_000_000 and estimate_index_bytes(f"{coarse},Flat", n, dim) <= budget:
        return f"{coarse},Flat"
    for pq in _PQ_BYTES:
        if pq >= dim:
            continue
        y = (min(dim // pq, 6) + 1) * pq  # autofaiss: a multiple of pq slightly above d
        key = f"OPQ{pq}_{y},{coarse},PQ{pq}x8"
        if estimate_index_bytes(key, n, dim) <= budget:
            return key
    raise CNClipError(
        f"no FAISS index of {n:,} {dim}-d vectors fits in {budget:,} bytes (PQ4 needs about "
        f"{estimate_index_bytes(f'OPQ4_28,{coarse},PQ4x8', n, dim):,}); raise --memory"
    )


# ---------------------------------------------------------------------------------- exact reference
def _top_merge(
    best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    cat_s, cat_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
    order = np.lexsort((cat_i, -cat_s), axis=1)[:, :k]  # score descending, then row ascending
    return np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)


def exact_topk(
    directory: str | os.PathLike[str],
    queries: np.ndarray,
    k: int,
    *,
    skip: np.ndarray | None = None,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(scores [Q, k], rows [Q, k])`` of normalised ``queries`` against a directory, streamed shard by
    shard. ``skip``: sorted rows left out of every answer (held-out queries)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    block = block or max(256, 2**23 // max(1, len(q)))  # score blocks of at most 32 MB
    best_s = np.empty((len(q), 0), np.float32)
    best_i = np.empty((len(q), 0), np.int64)
    offset = 0
    for _, emb in store.iter_shards(directory, dtype=np.float32):
        for start in range(0, len(emb), block):
            chunk = emb[start : start + block]
            s = q @ chunk.T
            base = offset + start
            if skip is not None and len(skip):
                lo, hi = np.searchsorted(skip, [base, base + len(chunk)])
                s[:, skip[lo:hi] - base] = -np.inf
            kk = min(k, len(chunk))
            part = np.argpartition(s, len(chunk) - kk, axis=1)[:, len(chunk) - kk :]
            best_s, best_i = _top_merge(best_s, best_i, np.take_along_axis(s, part, 1), part + base, k)
        offset += len(emb)
    return best_s, best_i


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the exact top ``k`` found in the approximate top ``k`` (``k``-recall@``k``)."""
    k = min(k, truth.shape[1])
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def _rows(directory: Path, wanted: np.ndarray) -> np.ndarray:
    """Rows ``wanted`` (any order) of a directory as float32, one shard at a time."""
    order = np.argsort(wanted, kind="stable")
    sorted_rows = wanted[order]
    out = np.empty((len(wanted), store.read_manifest(directory)["dim"]), np.float32)
    offset = 0
    for _, emb in store.iter_shards(directory):
        lo, hi = np.searchsorted(sorted_rows, [offset, offset + len(emb)])
        if hi > lo:
            out[order[lo:hi]] = emb[sorted_rows[lo:hi] - offset]
        offset += len(emb)
    return out


# ------------------------------------------------------------------------------------------ the index
class AnnIndex:
    """A FAISS index read from an embeddings directory, with its tuned search parameters applied."""

    def __init__(self, index: Any, info: dict[str, Any], path: Path, mmapped: bool) -> None:
        self.index, self.info, self.path, self.mmapped = index, info, path, mmapped
        self.index_key: str = info["index_key"]
        self.params: str | None = info.get("params") or None
        self._tail = np.asarray(info.get("tail_rows") or [], dtype=np.int64)
        self._n = int(info["num_vectors"])

    def set_params(self, params: str | None) -> None:
        """Search parameters as FAISS's ``ParameterSpace`` string (``"efSearch=64"``, ``"nprobe=16"``)."""
        if params:
            parse_search_params(params, self.index_key)
            try:
                _faiss().ParameterSpace().set_index_parameters(self.index, params)
            except RuntimeError as e:
                raise ValueError(f"search parameters {params!r} do not apply to {self.index_key}: {e}") from None
        self.params = params

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``: FAISS's answer with its ids turned into rows of the directory (-1: none)."""
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, faiss_ids_to_rows(ids, self._tail, self._n)


def faiss_ids_to_rows(ids: np.ndarray, tail: np.ndarray, n: int) -> np.ndarray:
    """FAISS ids -> directory rows when the ``tail`` rows (sorted) were added last: id ``f < n - len(tail)`` is
    the ``f``-th row not in ``tail``, id ``n - len(tail) + j`` is ``tail[j]``; -1 stays -1."""
    if not len(tail):
        return ids
    head = n - len(tail)
    out = ids + np.searchsorted(tail - np.arange(len(tail)), ids, side="right")
    in_tail = ids >= head
    out[in_tail] = tail[np.clip(ids[in_tail] - head, 0, len(tail) - 1)]
    out[ids < 0] = -1
    return out


def _read_info(directory: Path) -> dict[str, Any] | None:
    path = directory / ANN_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CNClipError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or "index_file" not in info or "index_key" not in info:
        raise CNClipError(f"{path} is not a cnclip FAISS index description")
    return info


def read_ann_info(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What ``ann.json`` says about a directory's index (None when it has none)."""
    return _read_info(Path(directory))


def load_ann_index(
    directory: str | os.PathLike[str],
    *,
    manifest: dict[str, Any] | None = None,
    mmap: bool = True,
    params: str | None = None,
    required: bool = False,
) -> AnnIndex | None:
    """The directory's FAISS index, or None when there is none or it is stale (built on other embeddings:
    a warning). ``required`` turns both into CNClipError. ``mmap`` memory-maps the index where FAISS can
    (IVF inverted lists, flat codes); HNSW graphs are read into memory."""
    directory = Path(directory)
    manifest = manifest or store.read_manifest(directory)
    info = _read_info(directory)
    if info is None:
        if required:
            raise CNClipError(
                f"{directory} has no FAISS index ({ANN_JSON}); build one with `cnclip index build {directory}`"
            )
        return None
    if info.get("embeddings_digest") != store.embeddings_digest(manifest):
        message = (
            f"the FAISS index in {directory} was built on other embeddings (they were extracted again since); "
            f"rebuild it with `cnclip index build {directory}`"
        )
        if required:
            raise CNClipError(message)
        logger.warning("%s; searching exactly", message)
        return None
    path = directory / info["index_file"]
    if not path.is_file() or path.stat().st_size != info.get("index_bytes"):
        raise CNClipError(f"{path} is missing or has another size than {directory / ANN_JSON} says; rebuild the index")
    faiss = _faiss()
    index, mmapped = None, False
    if mmap:
        is_ivf = "IVF" in info["index_key"]
        flags = (faiss.IO_FLAG_MMAP if is_ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY
        try:
            index, mmapped = faiss.read_index(str(path), flags), True
        except RuntimeError as e:
            logger.debug("cannot memory-map %s (%s); reading it", path, str(e).splitlines()[0])
    if index is None:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise CNClipError(f"cannot read the FAISS index {path}: {str(e).splitlines()[0]}") from None
    if index.ntotal != manifest["num_embedded"] or index.d != manifest["dim"]:
        raise CNClipError(
            f"{path} holds {index.ntotal} {index.d}-d vectors, the embeddings {manifest['num_embedded']} "
            f"{manifest['dim']}-d ones; rebuild the index"
        )
    ann = AnnIndex(index, info, path, mmapped)
    ann.set_params(params if params is not None else info.get("params"))
    return ann


# ------------------------------------------------------------------------------------------- tuning
def _parameter(index: Any, k: int) -> tuple[str | None, list[int], Callable[[int], str]]:
    """The parameter to tune, its grid and its ParameterSpace string."""
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        grid = sorted({p for p in _NPROBE_GRID if p <= ivf.nlist} | {ivf.nlist})
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            return "nprobe", grid, lambda p: f"nprobe={p},quantizer_efSearch={max(2 * p, 16)}"
        return "nprobe", grid, lambda p: f"nprobe={p}"
    base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
    if isinstance(base, faiss.IndexHNSW):
        return "efSearch", [e for e in _EF_GRID if e >= k] or [max(k, 16)], lambda e: f"efSearch={e}"
    return None, [], lambda _: ""


def _search_rows(index: Any, queries: np.ndarray, k: int, tail: np.ndarray, n: int) -> np.ndarray:
    return faiss_ids_to_rows(index.search(queries, k)[1], tail, n)


def _tune(
    index: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    target: float,
    rows: Callable[[np.ndarray], np.ndarray],
) -> tuple[str | None, float, list[dict[str, Any]]]:
    """Smallest grid value whose recall@k reaches ``target``: doubling until reached (or no more gain), then
    bisecting. When the target is out of reach, the smallest value within 0.005 of the best recall."""
    faiss = _faiss()
    name, grid, fmt = _parameter(index, k)
    if name is None:
        return None, recall_at(rows(index.search(queries, k)[1]), truth, k), []
    space = faiss.ParameterSpace()
    tried: dict[int, float] = {}

    def recall(i: int) -> float:
        if i not in tried:
            space.set_index_parameters(index, fmt(grid[i]))
            tried[i] = recall_at(rows(index.search(queries, k)[1]), truth, k)
            logger.debug("%s -> recall@%d %.4f", fmt(grid[i]), k, tried[i])
        return tried[i]

    i, prev = 0, -1.0
    while recall(i) < target and i < len(grid) - 1:
        if len(tried) >= 3 and recall(i) - prev < 0.001:  # the curve is flat: the target is out of reach
            break
        prev, i = recall(i), min(len(grid) - 1, 2 * i + 1)
    if recall(i) >= target:
        lo, hi = 0, i  # the smallest index reaching the target lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if recall(mid) >= target else (mid + 1, hi)
        chosen = hi
    else:
        best = max(tried.values())
        chosen = min(j for j, r in tried.items() if r >= best - 0.005)
        logger.warning(
            "recall@%d %.3f is out of reach for this index: the best found is %.3f (%s); a larger memory "
            "budget allows a more accurate index",
            k,
            target,
            best,
            fmt(grid[max(tried)]),
        )
    space.set_index_parameters(index, fmt(grid[chosen]))
    curve = [{"params": fmt(grid[j]), f"recall@{k}": round(r, 5)} for j, r in sorted(tried.items())]
    return fmt(grid[chosen]), tried[chosen], curve


def _measure(
    index: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    rows: Callable[[np.ndarray], np.ndarray],
) -> dict[str, Any]:
    found = rows(index.search(queries, k)[1])
    one = queries[: min(200, len(queries))]
    times = []
    for n in range(len(one)):
        t = time.perf_counter()
        index.search(one[n : n + 1], k)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for start in range(0, len(queries), 64):
        index.search(queries[start : start + 64], k)
    batch_s = time.perf_counter() - t
    return {
        "recall@1": round(float(np.mean(found[:, 0] == truth[:, 0])), 5),
        f"recall@{k}": round(recall_at(found, truth, k), 5),
        "latency_ms_batch1_median": round(1000 * float(np.median(times)), 4),
        "latency_ms_batch1_p99": round(1000 * float(np.percentile(times, 99)), 4),
        "qps_batch1": round(len(times) / sum(times), 1),
        "qps_batch64": round(len(queries) / batch_s, 1),
        "num_queries": len(queries),
    }


# -------------------------------------------------------------------------------------------- build
def _train(index: Any, directory: Path, n: int, rng: np.random.Generator, train_size: int | None, use_gpu: bool) -> int:
    """Train on a uniform sample of rows; a pre-transform (OPQ) first, then the IVF on the transformed rows
    (transformed in blocks, so the sample and its transform are not both in memory)."""
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    size = train_size or (max(64 * ivf.nlist, 2**14) if ivf is not None else 2**16)
    size = min(size, n)
    rows = np.sort(rng.choice(n, size=size, replace=False))
    logger.info("training on %d sampled vectors", size)
    x = _rows(directory, rows)
    if use_gpu and ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    if isinstance(index, faiss.IndexPreTransform):
        for t in range(index.chain.size()):
            transform = index.chain.at(t)
            if not transform.is_trained:
                transform.train(x[: 2**16])
            blocks = []
            while len(x):
                blocks.append(transform.apply(x[: 2**15]))
                x = x[2**15 :].copy() if len(x) > 2**15 else x[:0]  # release what is done
            x = np.concatenate(blocks)
            del blocks
        index.index.train(x)
        index.is_trained = True
    else:
        index.train(x)
    del x
    return size


def _training_points_needed(index: Any) -> tuple[int, str, str]:
    """The fewest training vectors FAISS accepts for ``index`` (k-means needs a point per centroid), why, and
    which part needs them (``"ivf"``, ``"pq"``)."""
    faiss = _faiss()
    need, what, part_kind = 1, "none", ""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        need, what, part_kind = ivf.nlist, f"one per IVF cluster: {ivf.nlist:,} clusters", "ivf"
    parts = [index, ivf, index.index if isinstance(index, faiss.IndexPreTransform) else None]
    for part in parts:
        pq = getattr(faiss.downcast_index(part), "pq", None) if part is not None else None
        if pq is not None and pq.ksub > need:
            need, what, part_kind = pq.ksub, f"one per product-quantizer centroid: {pq.ksub:,} centroids", "pq"
    if isinstance(index, faiss.IndexPreTransform) and need < 256:
        for t in range(index.chain.size()):
            if isinstance(faiss.downcast_VectorTransform(index.chain.at(t)), faiss.OPQMatrix):
                need, what, part_kind = 256, "OPQ trains a product quantizer of 256 centroids", "pq"
    return need, what, part_kind


def _smaller_key_hint(key: str, n: int, part_kind: str = "ivf") -> str:
    """What to do when ``key`` needs more training vectors than the ``n`` there are."""
    flat = "leave out --index-key (the automatic choice is Flat below 1,000 vectors, HNSW below 10,000)"
    if part_kind == "pq":
        return f"use a key without PQ/OPQ (e.g. HNSW32 or Flat) or {flat}"
    if m := re.search(r"IVF(\d+)", key):
        fitting = 2 ** max(0, int(math.log2(max(1, n // 39))))  # FAISS warns below 39 points per cluster
        return f"give fewer clusters (e.g. --index-key {key.replace(m[0], f'IVF{fitting}', 1)}) or {flat}"
    return flat


def build_ann_index(
    directory: str | os.PathLike[str],
    *,
    memory: str | int = "4GB",
    target_recall: float = 0.95,
    k: int = 10,
    index_key: str | None = None,
    queries: str | os.PathLike[str] | None = None,
    num_queries: int = 1000,
    train_size: int | None = None,
    seed: int = 0,
    use_gpu: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build, tune and write the FAISS index of an embeddings directory (see the module docstring).

    ``memory``: the index's memory budget (``"4GB"``); ``target_recall``: recall@``k`` against exact search
    to tune for; ``index_key``: a FAISS factory key instead of the automatic choice; ``queries``: an
    embeddings directory whose vectors are the tuning/test queries (default: rows of the collection);
    ``num_queries``: queries per set (tuning, test); ``use_gpu``: train on the GPUs of a GPU build of FAISS
    (default: when it sees any). Returns what ``ann.json`` holds."""
    from tqdm.auto import tqdm

    from cnclip_vision.io import atomic_write, write_json

    faiss = _faiss()
    started = time.perf_counter()
    directory = Path(directory)
    manifest = store.read_manifest(directory)
    n, d = manifest["num_embedded"], manifest["dim"]
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if k < 1 or num_queries < 1:
        raise ValueError(f"k and num_queries must be >= 1, got {k} and {num_queries}")
    budget = parse_memory(memory)
    key = index_key or choose_index_key(n, d, budget)
    try:
        index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"FAISS cannot build index {key!r} for {d}-d vectors: {str(e).splitlines()[0]}") from None
    if use_gpu is None:
        use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    rng = np.random.default_rng(seed)
    logger.info("%s: %d x %d %s -> %s (budget %s bytes)", directory, n, d, manifest["dtype"], key, f"{budget:,}")

    # held-out queries, a tuning set and a disjoint test set: rows of the collection kept out of the index until
    # the parameters are tuned and measured (then added last), or the vectors of another directory
    if queries is None:
        nq = max(1, min(num_queries, n // 4))
        held = np.sort(rng.choice(n, size=min(n - 1, 2 * nq), replace=False).astype(np.int64))
        q_all = _rows(directory, held)
        source = "rows of the collection, held out of the index while tuning and measuring"
    else:
        _, q_emb = store.load_embeddings(queries)
        q_all = q_emb.float().numpy()
        if len(q_all) < 2:
            raise CNClipError(f"--queries {queries} holds {len(q_all)} embeddings; at least 2 are needed")
        if q_all.shape[1] != d:
            raise CNClipError(f"--queries {queries} holds {q_all.shape[1]}-d embeddings, the collection {d}-d ones")
        q_all = q_all[rng.permutation(len(q_all))[: 2 * num_queries]]
        held, source = np.empty(0, np.int64), f"embeddings of {queries}"
    held_vectors = q_all
    q_all = np.ascontiguousarray(q_all / np.maximum(np.linalg.norm(q_all, axis=1, keepdims=True), 1e-12), np.float32)
    kk = min(k, n - len(held))
    if kk < 1 or len(q_all) < 2:
        raise CNClipError(f"{directory} holds {n} embedding(s): too few to tune and test an index")

    trained = 0
    if not index.is_trained:
        need, what, part_kind = _training_points_needed(index)
        available = min(train_size, n) if train_size else n
        if available < need:
            source = (
                f"--train-size {train_size}" if train_size and train_size < n else f"{directory} holds {n:,} vectors"
            )
            raise ValueError(
                f"index {key!r} needs at least {need:,} training vectors ({what}); {source}: "
                + ("raise --train-size" if train_size and train_size < n else _smaller_key_hint(key, n, part_kind))
            )
        try:
            trained = _train(index, directory, n, rng, train_size, use_gpu)
        except RuntimeError as e:  # a requirement _training_points_needed does not know: FAISS's words, one line
            if m := re.search(r"Number of training points \((\d+)\).*number of clusters \((\d+)\)", str(e)):
                raise ValueError(
                    f"index {key!r} needs at least {int(m[2]):,} training vectors, got {int(m[1]):,}: "
                    + _smaller_key_hint(key, n)
                ) from None
            raise
    logger.info("adding %d vectors shard by shard", n - len(held))
    with tqdm(total=n, desc=f"index {key}", unit="vec", disable=None if progress else True, leave=False) as bar:
        offset = 0
        for _, emb in store.iter_shards(directory, dtype=np.float32):
            lo, hi = np.searchsorted(held, [offset, offset + len(emb)])
            keep = np.ones(len(emb), bool)
            keep[held[lo:hi] - offset] = False
            index.add(np.ascontiguousarray(emb[keep]) if hi > lo else emb)
            bar.update(len(emb))
            offset += len(emb)
    logger.info("tuning on %d held-out queries against exact search", len(q_all) // 2)
    _, truth = exact_topk(directory, q_all, kk, skip=held)
    head = n - len(held)

    def to_rows(ids: np.ndarray) -> np.ndarray:  # while the held-out rows are not in the index
        return faiss_ids_to_rows(ids, held, n) if len(held) else ids

    order = rng.permutation(len(q_all))
    tune_i, test_i = np.sort(order[: len(q_all) // 2]), np.sort(order[len(q_all) // 2 :])
    margin_target = min(target_recall + 0.01, (1 + target_recall) / 2)
    params, tune_recall, curve = _tune(index, q_all[tune_i], truth[tune_i], kk, margin_target, to_rows)
    measured = _measure(index, q_all[test_i], truth[test_i], kk, to_rows)
    if measured[f"recall@{kk}"] < target_recall:
        logger.warning(
            "recall@%d on the test queries is %.4f, below the target %.2f", kk, measured[f"recall@{kk}"], target_recall
        )
    if len(held):
        index.add(np.ascontiguousarray(held_vectors, dtype=np.float32))  # ids head.. head+len(held)-1
    if index.ntotal != n or head + len(held) != n:
        raise RuntimeError(f"the index holds {index.ntotal} vectors, expected {n}")

    index_file = f"ann-{secrets.token_hex(6)}.faiss"
    with atomic_write(directory / index_file) as tmp:
        faiss.write_index(index, str(tmp))
    size = (directory / index_file).stat().st_size
    info = {
        "format": "cnclip-ann",
        "version": 1,
        "index_file": index_file,
        "index_key": key,
        "params": params,
        "metric": "inner_product",
        "num_vectors": n,
        "dim": d,
        "embeddings_digest": store.embeddings_digest(manifest),
        "memory_budget": budget,
        "index_bytes": size,
        "bytes_per_vector": round(size / n, 2),
        "target_recall": target_recall,
        "k": kk,
        "tuned": {
            "target_with_margin": round(margin_target, 4),
            f"recall@{kk}": round(tune_recall, 5),
            "num_queries": len(tune_i),
            "curve": curve,
        },
        "measured": measured,
        "queries": source,
        "train_size": trained,
        "seed": seed,
        "gpu_training": bool(use_gpu),
        "build_seconds": round(time.perf_counter() - started, 2),
        "faiss_version": faiss.__version__,
        "tail_rows": held.tolist(),
    }
    write_json(directory / ANN_JSON, info)
    for old in directory.glob("ann-*.faiss"):
        if old.name != index_file:
            old.unlink(missing_ok=True)
    logger.info(
        "%s: %s %s, recall@1 %.3f recall@%d %.3f on %d test queries, %.1f bytes/vector, %.0f q/s",
        directory,
        key,
        params or "",
        measured["recall@1"],
        kk,
        measured[f"recall@{kk}"],
        len(test_i),
        size / n,
        measured["qps_batch1"],
    )
    return info
