"""Cross-modal retrieval: embeddings of large collections on disk, exact top-k search, recall metrics.

**Embedding directories.** :func:`extract_image_embeddings` and :func:`extract_text_embeddings` write::

    OUT/shard-00000.safetensors   # "embeddings" [n, D] (L2-normalised float32 or float16) + metadata
    OUT/shard-00001.safetensors   # ...one per `shard_size` consecutive inputs
    OUT/ids.txt                   # the ids of the embedded items, one per line, in row order
    OUT/manifest.json             # model, dim, dtype, counts, shard list, failed inputs with reasons

Shard ``i`` covers inputs ``[i * shard_size, (i + 1) * shard_size)`` of the input list. Its metadata
records the range, a digest of the range's input ids, the model fingerprint and dtype, the ids it holds
(row order) and the inputs of the range that failed (with reasons). Shards are written to a temporary
name and renamed, so a shard file is either complete or absent. A rerun with ``resume=True`` keeps every
shard whose metadata matches the current inputs and model and encodes only the others: an interruption
loses at most the shards in progress, never a finished one, and no item is encoded twice across runs
that finish. ``manifest.json`` is written last; without it a directory is an unfinished extraction.

**Search.** :class:`EmbeddingIndex` does exact cosine top-k by matrix products over chunks of queries
and chunks of the database with a running top-k, so memory stays ``O(query_chunk * db_chunk)``; ties
are broken towards the lower index (as the original evaluation's stable sort). FAISS
(``faiss.IndexFlatIP``) is used only if asked for.

**Metrics.** :func:`recall_at_k` and :func:`evaluate_retrieval` follow the original Chinese-CLIP
evaluation (``cn_clip/eval``): candidates ranked by inner product of normalised features, ties by input
order (``make_topk_predictions.py``: ``sorted(..., reverse=True)``); R@k of a query is 1 when *any* of
its ground-truth items is in the top k (``evaluation.py``, ``compute_score``), averaged over the queries
of the annotation, in percent. Text→image queries are the annotated texts against all images;
image→text queries are the images of the annotation, each with the texts that list it
(``transform_ir_annotation_to_tr.py``), against all texts (``evaluation_tr.py``). Mean recall is the mean
of the six values (t2i and i2t R@1/5/10), the "MR" of the Chinese-CLIP tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cnclip_vision.data.jsonl import TextRecord, read_text_jsonl
from cnclip_vision.errors import CNClipError

if TYPE_CHECKING:
    from cnclip_vision.models.clip import ChineseCLIP
    from cnclip_vision.data.transforms import ImageSource

logger = logging.getLogger(__name__)

__all__ = [
    "EmbeddingIndex",
    "Hit",
    "TextRecord",
    "evaluate_retrieval",
    "extract_image_embeddings",
    "extract_text_embeddings",
    "load_embeddings",
    "read_manifest",
    "read_text_jsonl",
    "recall_at_k",
]

FORMAT = "cnclip-embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "ids.txt"
_META_KEY = "cnclip_embeddings"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ------------------------------------------------------------------------------------ shard machinery
def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _digest(ids: Sequence[str]) -> str:
    h = hashlib.sha1()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def _model_info(model: ChineseCLIP) -> dict[str, Any]:
    """Config, dtype and a fingerprint of the weights (projections and logit scale, cheap to hash) so a
    resumed extraction never mixes the embeddings of two models or precisions."""
    from cnclip_vision.models.weights import describe

    h = hashlib.sha1(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    h.update(str(model.dtype).encode())
    last_visual = list(model.visual.parameters())[-1]
    for tensor in (model.text_projection.weight, last_visual, model.logit_scale):
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "description": describe(model.config),
        "config": model.config.to_dict(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "fingerprint": h.hexdigest()[:16],
    }


def _read_shard_meta(path: Path) -> dict[str, Any] | None:
    """The metadata of a shard file, or None if it is unreadable or not ours."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
        return json.loads(meta) if meta else None
    except Exception as e:  # noqa: BLE001 - a damaged shard is simply redone
        logger.warning("ignoring unreadable shard %s: %s", path, e)
        return None


@dataclass
class _Pending:
    rows: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    left: int = 0


class _ShardWriter:
    """Collects encoded rows and failures (in any order) and writes each shard once all of its inputs
    are accounted for. One writer serves both modalities."""

    def __init__(
        self,
        out_dir: Path,
        ids: Sequence[str],
        shard_size: int,
        key: dict[str, Any],
        dtype: torch.dtype,
        todo: Sequence[int],
        on_write: Callable[[int, dict[str, Any]], None],
    ) -> None:
        self.out_dir, self.ids, self.shard_size, self.key, self.dtype = out_dir, ids, shard_size, key, dtype
        self.on_write = on_write
        self.pending = {s: _Pending(left=min(len(ids), (s + 1) * shard_size) - s * shard_size) for s in todo}

    def add(self, positions: Sequence[int], embeddings: torch.Tensor) -> None:
        touched = set()
        for pos, row in zip(positions, embeddings.to(self.dtype)):
            s = pos // self.shard_size
            self.pending[s].rows.append((pos, row))
            self.pending[s].left -= 1
            touched.add(s)
        for s in sorted(touched):
            self._flush_if_done(s)

    def fail(self, position: int, reason: str) -> None:
        s = position // self.shard_size
        self.pending[s].failures.append((position, reason))
        self.pending[s].left -= 1
        self._flush_if_done(s)

    def _flush_if_done(self, s: int) -> None:
        if self.pending[s].left > 0:
            return
        p = self.pending.pop(s)
        p.rows.sort(key=lambda r: r[0])
        p.failures.sort()
        start, stop = s * self.shard_size, min(len(self.ids), (s + 1) * self.shard_size)
        dim = self.key["dim"]
        emb = torch.stack([r for _, r in p.rows]) if p.rows else torch.empty(0, dim, dtype=self.dtype)
        meta = {**self.key, "start": start, "stop": stop, "range_digest": _digest(self.ids[start:stop]),
                "ids": [self.ids[i] for i, _ in p.rows],
                "failures": [[self.ids[i], reason] for i, reason in p.failures]}  # fmt: skip
        _write_shard(self.out_dir / _shard_name(s), emb, meta)
        self.on_write(s, meta)

    def check_finished(self) -> None:
        if self.pending:
            raise RuntimeError(f"shards {sorted(self.pending)} were not completed")  # an encoder skipped inputs


def _write_shard(path: Path, embeddings: torch.Tensor, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from cnclip_vision.io import atomic_write

    with atomic_write(path) as tmp:
        metadata = {_META_KEY: json.dumps(meta, ensure_ascii=False)}
        save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata=metadata)
    logger.debug("wrote %s (%d rows)", path, embeddings.shape[0])


# An encoder takes the input positions still to do (ascending; whole shards) and a failure callback, and
# yields (positions, [len(positions), D] normalised float32 embeddings) in any grouping.
_Encoder = Callable[[Sequence[int], Callable[[int, str], None]], Iterator[tuple[Sequence[int], torch.Tensor]]]


def _extract(
    model: ChineseCLIP,
    out_dir: str | os.PathLike[str],
    *,
    modality: str,
    source: str,
    ids: Sequence[str],
    paths: Sequence[str] | None,
    encode: _Encoder,
    shard_size: int,
    dtype: str,
    resume: bool,
) -> dict[str, Any]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CNClipError(f"the output directory {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is unfinished until the manifest is rewritten
    for pattern in (".shard-*.tmp", f".{MANIFEST}.*.tmp", f".{IDS_FILE}.*.tmp"):  # left by a killed run
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)

    info = _model_info(model)
    key = {"format": FORMAT, "version": FORMAT_VERSION, "modality": modality, "model_fingerprint": info["fingerprint"],
           "dtype": dtype, "dim": model.config.embed_dim, "normalized": True}  # fmt: skip
    num_shards = (len(ids) + shard_size - 1) // shard_size
    metas: dict[int, dict[str, Any]] = {}
    for s in range(num_shards) if resume else ():
        path = out / _shard_name(s)
        meta = _read_shard_meta(path) if path.is_file() else None
        if meta is None:
            continue
        start, stop = s * shard_size, min(len(ids), (s + 1) * shard_size)
        expected = {**key, "start": start, "stop": stop, "range_digest": _digest(ids[start:stop])}
        if all(meta.get(k) == v for k, v in expected.items()):
            metas[s] = meta
        else:
            logger.info("shard %s holds other inputs, model or settings; redoing it", path.name)
    for path in out.glob("shard-*.safetensors"):  # shards of an earlier, longer input list
        m = _SHARD_RE.match(path.name)
        if m and int(m.group(1)) >= num_shards:
            path.unlink()
    reused = len(metas)
    todo = [s for s in range(num_shards) if s not in metas]
    if reused:
        logger.info("resuming in %s: %d of %d shards already done", out, reused, num_shards)
    writer = _ShardWriter(out, ids, shard_size, key, _DTYPES[dtype], todo, metas.__setitem__)
    positions = [i for s in todo for i in range(s * shard_size, min(len(ids), (s + 1) * shard_size))]
    if positions:
        for done, embeddings in encode(positions, writer.fail):
            writer.add(done, embeddings)
    writer.check_finished()

    shards, all_ids, failures = [], [], []
    path_of = dict(zip(ids, paths)) if paths is not None else {}
    for s in range(num_shards):
        meta = metas[s]
        shards.append({"file": _shard_name(s), "start": meta["start"], "stop": meta["stop"], "count": len(meta["ids"])})
        all_ids.extend(meta["ids"])
        for item_id, reason in meta["failures"]:
            where = {"path": path_of[item_id]} if item_id in path_of else {}
            failures.append({"id": item_id, **where, "reason": reason})
    from cnclip_vision.io import atomic_write, write_json

    with atomic_write(out / IDS_FILE) as tmp:
        tmp.write_text("".join(i + "\n" for i in all_ids), encoding="utf-8")
    manifest = {**{k: key[k] for k in ("format", "version", "modality")}, "source": source, "model": info,
                "dim": key["dim"], "dtype": dtype, "normalized": True, "shard_size": shard_size,
                "num_inputs": len(ids), "num_embedded": len(all_ids), "num_failed": len(failures),
                "ids_file": IDS_FILE, "shards": shards, "failures": failures}  # fmt: skip
    write_json(out / MANIFEST, manifest)
    logger.info("%d %s embeddings in %s (%d failed, %d of %d shards reused)",
                len(all_ids), modality, out, len(failures), reused, num_shards)  # fmt: skip
    if not all_ids:
        raise CNClipError(f"none of the {len(ids)} {modality}s could be encoded (see the warnings above)")
    return {"out_dir": str(out), **{k: v for k, v in manifest.items() if k != "shards"},
            "num_shards": num_shards, "reused_shards": reused}  # fmt: skip


def _check_ids(ids: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise CNClipError(f"duplicate {what} id {i!r}: ids must be unique")
        if "\n" in i or "\r" in i:
            raise CNClipError(f"{what} id {i!r} contains a line break")
        seen.add(i)


def _image_ids(images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """Paths and ids: paths relative to the folder, or as written in the list file (relative to its folder),
    or as given in a Python list."""
    from cnclip_vision.data.images import list_images

    paths = list_images(images)
    if isinstance(images, (list, tuple)):
        return paths, [Path(p).as_posix() for p in paths]
    src = Path(images)
    root = src if src.is_dir() else src.parent
    ids = [p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix() for p in paths]
    return paths, ids


def extract_image_embeddings(
    model: ChineseCLIP,
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    shard_size: int = 10_000,
    dtype: str = "float32",
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every image of a folder (recursive), a list file or a list of paths into ``out_dir``.

    Images are decoded in ``DataLoader`` workers and streamed; at most the shards in progress are held
    in memory. Unreadable files are logged, skipped and listed in the summary (id, path, reason).
    With ``resume``, finished shards of an earlier run with the same inputs and model are kept. Returns
    the manifest without its shard list, plus ``out_dir``, ``num_shards`` and ``reused_shards``.
    """
    from cnclip_vision.data.images import iter_image_batches
    from cnclip_vision.models.encode import encode_images
    from cnclip_vision.data.transforms import image_transform

    paths, ids = _image_ids(images)
    _check_ids(ids, "image")
    transform = image_transform(model.image_size)

    def encode(positions: Sequence[int], fail: Callable[[int, str], None]) -> Iterator[tuple[Sequence[int], torch.Tensor]]:
        todo = [paths[i] for i in positions]
        position_of = dict(zip(todo, positions))  # paths are unique (their ids are)
        for batch in iter_image_batches(todo, transform, batch_size=batch_size, num_workers=num_workers,
                                        device=model.device, progress=progress, desc="embed images",
                                        on_failure=lambda p, reason: fail(position_of[p], reason)):  # fmt: skip
            yield [positions[i] for i in batch.indices], encode_images(model, batch.pixel_values, batch_size=batch_size)

    source = os.fspath(images) if not isinstance(images, (list, tuple)) else f"{len(images)} paths"
    return _extract(model, out_dir, modality="image", source=source, ids=ids, paths=[str(p) for p in paths],
                    encode=encode, shard_size=shard_size, dtype=dtype, resume=resume)  # fmt: skip


def extract_text_embeddings(
    model: ChineseCLIP,
    jsonl_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    shard_size: int = 10_000,
    dtype: str = "float32",
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode the texts of a ``{"text_id", "text", "image_ids"}`` JSONL into ``out_dir`` (ids = text ids);
    same layout, resume and summary as :func:`extract_image_embeddings`. The whole file is validated
    first (errors name ``file:line``)."""
    from tqdm.auto import tqdm

    from cnclip_vision.models.encode import encode_texts

    records = read_text_jsonl(jsonl_path)
    ids = [r.text_id for r in records]
    _check_ids(ids, "text")

    def encode(positions: Sequence[int], fail: Callable[[int, str], None]) -> Iterator[tuple[Sequence[int], torch.Tensor]]:
        # `positions` is whole shards in order, so slicing by shard_size keeps each slice within one shard
        # (and length bucketing happens within a shard).
        with tqdm(total=len(positions), desc="embed texts", unit="text", disable=not progress, leave=False) as bar:
            for start in range(0, len(positions), shard_size):
                chunk = positions[start : start + shard_size]
                yield chunk, encode_texts(model, [records[i].text for i in chunk], batch_size=batch_size)
                bar.update(len(chunk))

    return _extract(model, out_dir, modality="text", source=os.fspath(jsonl_path), ids=ids, paths=None,
                    encode=encode, shard_size=shard_size, dtype=dtype, resume=resume)  # fmt: skip


# -------------------------------------------------------------------------------------------- reading
def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``manifest.json`` of an embeddings directory (CNClipError if absent: unfinished or not ours)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CNClipError(f"no such embeddings directory: {directory}")
    path = directory / MANIFEST
    if not path.is_file():
        raise CNClipError(f"{directory} has no {MANIFEST}: not an embeddings directory, or an extraction that did "
                          "not finish (rerun `cnclip embed` with the same arguments to resume it)")  # fmt: skip
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CNClipError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CNClipError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise CNClipError(f"{path} has format version {manifest['version']}; this cnclip-vision reads up to "
                          f"{FORMAT_VERSION} (upgrade cnclip-vision)")  # fmt: skip
    return manifest


def load_embeddings(directory: str | os.PathLike[str]) -> tuple[list[str], torch.Tensor]:
    """``(ids, embeddings [N, D])`` of an embeddings directory, rows in id order, in the stored dtype.
    The embeddings are read into memory: ``N * D * 4`` bytes (half that for float16)."""
    from safetensors import safe_open

    directory = Path(directory)
    manifest = read_manifest(directory)
    total, dim = manifest["num_embedded"], manifest["dim"]
    out = torch.empty(total, dim, dtype=_DTYPES[manifest["dtype"]])
    ids: list[str] = []
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()[_META_KEY])
                emb = f.get_tensor("embeddings")
        except Exception as e:  # noqa: BLE001 - any damage is reported the same way
            raise CNClipError(f"cannot read shard {path}: {e}") from None
        n = len(meta["ids"])
        if n != shard["count"] or tuple(emb.shape) != (n, dim) or len(ids) + n > total:
            raise CNClipError(f"shard {path} does not match {directory / MANIFEST} (was the directory modified?)")
        out[len(ids) : len(ids) + n] = emb
        ids.extend(meta["ids"])
    if len(ids) != total:
        raise CNClipError(f"{directory}: the shards hold {len(ids)} embeddings, the manifest says {total}")
    return ids, out


# --------------------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class Hit:
    """One search result: rank (0 = best), database row, id and cosine score."""

    rank: int
    index: int
    id: str
    score: float


def _stable_topk(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row, ordered by score descending then index ascending."""
    by_index = indices.argsort(dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row of a score block, ties at the cut resolved towards the lower index."""
    values, idx = scores.topk(k, dim=1)
    tied = ((scores >= values[:, -1:]).sum(dim=1) > k).nonzero().flatten()
    for row in tied.tolist():  # rare: more candidates tie with the k-th score than fit
        order = scores[row].argsort(descending=True, stable=True)[:k]
        values[row], idx[row] = scores[row, order], order
    return values, idx


class EmbeddingIndex:
    """Exact top-k cosine search over ``embeddings [N, D]`` (rows L2-normalised, as written by the
    extract functions; rows that are not are normalised on construction when ``normalize``).

    Queries are normalised and scored against the database in ``query_chunk_size x db_chunk_size``
    blocks with a running top-k, so neither a ``[Q, N]`` matrix nor a float32 copy of a float16
    database is ever made. ``device`` moves the database there once (e.g. ``"cuda"``); results come
    back on the CPU. ``use_faiss=True`` searches a ``faiss.IndexFlatIP`` instead (exact too;
    needs ``faiss-cpu``/``faiss-gpu``; order among equal scores is then FAISS's).
    """

    def __init__(
        self,
        embeddings: torch.Tensor | np.ndarray,
        ids: Sequence[str] | None = None,
        *,
        normalize: bool = True,
        use_faiss: bool = False,
        device: torch.device | str | None = None,
        query_chunk_size: int = 1024,
        db_chunk_size: int = 16384,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        emb = torch.from_numpy(np.asarray(embeddings)) if isinstance(embeddings, np.ndarray) else embeddings
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.dtype.is_floating_point or len(emb) == 0:
            desc = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a non-empty float [N, D] tensor or array, got {desc}")
        if ids is not None and len(ids) != len(emb):
            raise ValueError(f"{len(ids)} ids for {len(emb)} embeddings")
        if query_chunk_size < 1 or db_chunk_size < 1:
            raise ValueError("chunk sizes must be >= 1")
        if normalize:
            norms = torch.cat([c.double().norm(dim=1) for c in emb.split(db_chunk_size)])
            if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
                logger.info("normalising %d embeddings", len(emb))
                emb = (emb.double() / norms.clamp_min(1e-12)[:, None]).to(emb.dtype)
        self.embeddings = emb.to(device) if device is not None else emb
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(emb))]
        self.device = self.embeddings.device
        self.query_chunk_size, self.db_chunk_size = query_chunk_size, db_chunk_size
        self.manifest = dict(manifest) if manifest is not None else None
        self._faiss = self._build_faiss() if use_faiss else None

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], **kwargs: Any) -> EmbeddingIndex:
        """Index the embeddings written by :func:`extract_image_embeddings` / :func:`extract_text_embeddings`."""
        ids, emb = load_embeddings(directory)
        return cls(emb, ids, manifest=read_manifest(directory), **kwargs)

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def _build_faiss(self) -> Any:
        try:
            import faiss
        except ImportError:
            raise CNClipError("use_faiss=True needs FAISS: pip install faiss-cpu (or faiss-gpu)") from None
        index = faiss.IndexFlatIP(self.dim)
        for chunk in self.embeddings.split(self.db_chunk_size):
            index.add(np.ascontiguousarray(chunk.float().cpu().numpy()))
        return index

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [Q, k'], indices [Q, k'])`` with ``k' = min(k, N)``: cosine of the best rows, best first."""
        q = torch.from_numpy(np.asarray(queries)) if isinstance(queries, np.ndarray) else queries
        if not isinstance(q, torch.Tensor) or q.ndim != 2 or q.shape[1] != self.dim:
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(queries).__name__
            raise ValueError(f"queries must be a [Q, {self.dim}] tensor (the index dimension), got {shape}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = min(k, len(self))
        compute = torch.float64 if torch.float64 in (q.dtype, self.embeddings.dtype) else torch.float32
        q = torch.nn.functional.normalize(q.to(compute), dim=1)
        if self._faiss is not None:
            scores, indices = self._faiss.search(np.ascontiguousarray(q.float().cpu().numpy()), k)
            return torch.from_numpy(scores), torch.from_numpy(indices).long()
        all_scores, all_indices = [], []
        for q_chunk in q.split(self.query_chunk_size):
            q_chunk = q_chunk.to(self.device)
            best_s = torch.empty(len(q_chunk), 0, dtype=compute, device=self.device)
            best_i = torch.empty(len(q_chunk), 0, dtype=torch.long, device=self.device)
            for start in range(0, len(self), self.db_chunk_size):
                block = self.embeddings[start : start + self.db_chunk_size].to(self.device, compute)
                s, i = _chunk_topk(q_chunk @ block.T, min(k, len(block)))
                best_s, best_i = _stable_topk(torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1), k)
            all_scores.append(best_s.cpu())
            all_indices.append(best_i.cpu())
        return torch.cat(all_scores), torch.cat(all_indices)

    def search_hits(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> list[list[Hit]]:
        """:meth:`search` with ids: one list of hits per query."""
        scores, indices = self.search(queries, k)
        return [
            [Hit(rank, idx, self.ids[idx], score) for rank, (idx, score) in enumerate(zip(row_i, row_s))]
            for row_i, row_s in zip(indices.tolist(), scores.tolist())
        ]

    def _check_model(self, model: ChineseCLIP) -> None:
        if model.config.embed_dim != self.dim:
            raise ValueError(f"the index holds {self.dim}-d embeddings but the model makes "
                             f"{model.config.embed_dim}-d ones; use the model the index was built with")  # fmt: skip
        built_with = (self.manifest or {}).get("model", {})
        if built_with.get("config") not in (None, model.config.to_dict()):
            logger.warning("the index was built with another architecture (%s)", built_with.get("description"))

    def search_text(self, model: ChineseCLIP, texts: str | Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Text queries: text→image on an image index, text→text on a text index. One hit list per text."""
        from cnclip_vision.models.encode import encode_texts

        self._check_model(model)
        return self.search_hits(encode_texts(model, [texts] if isinstance(texts, str) else list(texts)), k)

    def search_image(self, model: ChineseCLIP, images: Sequence[ImageSource] | torch.Tensor, k: int = 10) -> list[list[Hit]]:
        """Image queries (paths, PIL images, arrays or a preprocessed batch): image→image on an image index,
        image→text on a text index. One hit list per image."""
        from cnclip_vision.models.encode import encode_images

        self._check_model(model)
        return self.search_hits(encode_images(model, images), k)


# -------------------------------------------------------------------------------------------- metrics
def _recall_from_ranking(
    ranking: torch.Tensor, ground_truth: Sequence[Iterable[int]], ks: Sequence[int]
) -> dict[int, float]:
    if len(ranking) != len(ground_truth):
        raise ValueError(f"{len(ground_truth)} ground-truth sets for {len(ranking)} queries")
    if len(ranking) == 0:
        raise ValueError("no queries to evaluate")
    hits = dict.fromkeys(ks, 0)
    for row, gt in zip(ranking.tolist(), ground_truth):
        gt = set(gt)
        first = next((rank for rank, idx in enumerate(row) if idx in gt), None)
        if first is not None:
            for k in ks:
                hits[k] += first < k
    return {k: 100.0 * hits[k] / len(ranking) for k in ks}


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


def recall_at_k(
    similarity: torch.Tensor | np.ndarray, ground_truth: Sequence[Iterable[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Recall@k in percent of a ``[Q, N]`` similarity matrix: the share of queries with at least one of
    their ground-truth columns among the k best (ties by column order, as the original's stable sort).
    A query with no ground truth counts as a miss, as in the original ``compute_score``."""
    ks = _check_ks(ks)
    sim = torch.as_tensor(similarity)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a [Q, N] matrix, got shape {tuple(sim.shape)}")
    ranking = sim.argsort(dim=1, descending=True, stable=True)[:, : max(ks)]
    return _recall_from_ranking(ranking, ground_truth, ks)


def _image_lookup(image_ids: Sequence[str]) -> Callable[[str], int | None]:
    """Ground-truth image id → row: the id itself, else the id without its file extension ("123" finds
    "123.jpg"; MUGE annotations use bare integers)."""
    exact = {i: n for n, i in enumerate(image_ids)}
    stems: dict[str, int | None] = {}
    for n, i in enumerate(image_ids):
        stem = i.rsplit(".", 1)[0] if "." in i.rsplit("/", 1)[-1] else i
        stems[stem] = None if stem in stems and stems[stem] != n else n

    def find(gt: str) -> int | None:
        if gt in exact:
            return exact[gt]
        if gt in stems and stems[gt] is None:
            raise CNClipError(f"ground-truth image id {gt!r} matches several images (e.g. {gt}.jpg and {gt}.png)")
        return stems.get(gt)
    return find


def evaluate_retrieval(
    text_embeddings: torch.Tensor | np.ndarray,
    text_ids: Sequence[str],
    image_embeddings: torch.Tensor | np.ndarray,
    image_ids: Sequence[str],
    ground_truth: Mapping[str, Iterable[str | int]],
    *,
    ks: Sequence[int] = (1, 5, 10),
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Text→image and image→text recall@k (percent) and mean recall, as the original Chinese-CLIP
    evaluation (see the module docstring).

    ``ground_truth`` maps each annotated text id to its image ids (a MUGE JSONL's ``image_ids``); image
    ids match ``image_ids`` exactly or without a file extension. Texts are the t2i queries; the images
    listed in the annotation are the i2t queries. Ground-truth images missing from ``image_ids`` (e.g.
    unreadable files) cannot be retrieved and are not i2t queries; their number is ``missing_images``.
    """
    ks = _check_ks(ks)
    text_index = {str(t): n for n, t in enumerate(text_ids)}
    unknown = [t for t in ground_truth if str(t) not in text_index]
    if unknown:
        raise ValueError(f"{len(unknown)} annotated texts have no embedding, e.g. {unknown[:3]}")
    find_image = _image_lookup([str(i) for i in image_ids])
    queries, t2i_gt, i2t_gt, missing = [], [], {}, set()
    for text_id, gt_images in ground_truth.items():
        rows = set()
        for image_id in map(str, gt_images):
            row = find_image(image_id)
            if row is None:
                missing.add(image_id)
                continue
            rows.add(row)
            i2t_gt.setdefault(row, set()).add(text_index[str(text_id)])
        queries.append(text_index[str(text_id)])
        t2i_gt.append(rows)
    if missing:
        logger.warning("%d ground-truth images have no embedding (unreadable or not in the image set), e.g. %s",
                       len(missing), sorted(missing)[:3])  # fmt: skip
    if not i2t_gt:
        raise CNClipError("no annotated image is in the image set: check that the image ids match the annotation")
    text_index_ = EmbeddingIndex(torch.as_tensor(text_embeddings), list(map(str, text_ids)), device=device)
    image_index = EmbeddingIndex(torch.as_tensor(image_embeddings), list(map(str, image_ids)), device=device)
    t2i = _recall_from_ranking(image_index.search(text_index_.embeddings[queries], max(ks))[1], t2i_gt, ks)
    i2t_rows = list(i2t_gt)
    i2t = _recall_from_ranking(text_index_.search(image_index.embeddings[i2t_rows], max(ks))[1],
                               [i2t_gt[r] for r in i2t_rows], ks)  # fmt: skip
    result: dict[str, Any] = {f"t2i_R@{k}": v for k, v in t2i.items()}
    result.update({f"i2t_R@{k}": v for k, v in i2t.items()})
    result["t2i_mean_recall"] = sum(t2i.values()) / len(ks)
    result["i2t_mean_recall"] = sum(i2t.values()) / len(ks)
    result["mean_recall"] = (sum(t2i.values()) + sum(i2t.values())) / (2 * len(ks))
    result.update(num_texts=len(text_ids), num_images=len(image_ids), num_t2i_queries=len(queries),
                  num_i2t_queries=len(i2t_rows), missing_images=len(missing))  # fmt: skip
    return result
