"""The embeddings directory on disk: shard layout, shard files, manifest, readers. Torch-free (numpy +
safetensors), so building a FAISS index never pays for importing torch.

Layout (format version 2)::

    OUT/shard-00003-of-00016.safetensors  # "embeddings" [n, D] (float32 or float16, L2-normalised) + metadata
    OUT/ids.txt                           # ids of the embedded items, one per line, in row order
    OUT/manifest.json                     # model, dim, dtype, counts, shard list, failed inputs with reasons

An item belongs to shard ``h(id) >> (64 - log2(S))``: the top bits of a 64-bit BLAKE2b hash of its id, with
``S`` a power of two (:func:`num_shards_for`). Inserting or removing items therefore changes only the shards
that hold them. Inside a shard, rows follow the input order; the rows of the directory are the shards'
rows in shard order. Each shard's metadata holds the ids it covers (its digest), the ids it holds, the
failures with reasons, the model fingerprint and a SHA-256 of the embedding bytes, so a damaged file is
detected when a run resumes.

Version 1 directories (``shard-00000.safetensors``, shard ``i`` = input positions ``[i*n, (i+1)*n)``) are
still read for search and serve as sources when a version-2 extraction resumes in them (their embeddings
are copied, not encoded again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from cnclip_vision.errors import CNClipError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("cnclip_vision.retrieval")

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "IDS_FILE",
    "MANIFEST",
    "LazyIds",
    "ShardError",
    "embeddings_digest",
    "item_hash",
    "iter_shards",
    "load_embeddings",
    "num_shards_for",
    "read_manifest",
    "save_embeddings",
    "shard_name",
    "shard_of",
]

FORMAT = "cnclip-embeddings"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
IDS_FILE = "ids.txt"
LAYOUT = "blake2b64-prefix"
META_KEY = "cnclip_embeddings"
DTYPES = {"float32": np.float32, "float16": np.float16}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16}
_V2_RE = re.compile(r"^shard-(\d{5,})-of-(\d{5,})\.safetensors$")
_V1_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")


class ShardError(CNClipError):
    """A shard file is unreadable, truncated, not ours, or its bytes do not match its checksum."""


# ----------------------------------------------------------------------------------------- layout
def item_hash(item_id: str) -> int:
    """The stable 64-bit hash that places an item in its shard (BLAKE2b of the UTF-8 id, big-endian)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest(), "big")


def item_hashes(ids: Sequence[str]) -> np.ndarray:
    return np.fromiter((item_hash(i) for i in ids), dtype=np.uint64, count=len(ids))


@overload
def shard_of(hashes: np.ndarray, num_shards: int) -> np.ndarray: ...
@overload
def shard_of(hashes: int, num_shards: int) -> int: ...
def shard_of(hashes: np.ndarray | int, num_shards: int) -> np.ndarray | int:
    """Shard index of item hash(es) among ``num_shards`` (a power of two): the hash's top bits."""
    bits = num_shards.bit_length() - 1
    if num_shards < 1 or 1 << bits != num_shards:
        raise ValueError(f"num_shards must be a power of two, got {num_shards}")
    if isinstance(hashes, np.ndarray):
        return (hashes >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(hashes), np.int64)
    return int(hashes) >> (64 - bits) if bits else 0


def num_shards_for(num_items: int, shard_size: int, previous: int | None = None) -> int:
    """The shard count: the smallest power of two that puts at most ``shard_size`` items in a shard on
    average. ``previous`` (the count of the directory being resumed) is kept while the average stays
    within ``[shard_size / 4, 2 * shard_size]``, so a collection that grows or shrinks a little keeps its
    shards."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if previous is not None and previous >= 1 and shard_size / 4 <= num_items / previous <= 2 * shard_size:
        return previous
    count = 1
    while count * shard_size < num_items:
        count *= 2
    return count


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.safetensors"


def parse_shard_name(name: str) -> tuple[int, int | None] | None:
    """``(shard, num_shards)`` of a version-2 name, ``(index, None)`` of a version-1 name, else None."""
    if m := _V2_RE.match(name):
        return int(m.group(1)), int(m.group(2))
    if m := _V1_RE.match(name):
        return int(m.group(1)), None
    return None


def ids_digest(ids: Sequence[str]) -> str:
    h = hashlib.sha1()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def checksum(array: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


# ------------------------------------------------------------------------------------ shard files
def write_shard(path: Path, embeddings: np.ndarray, meta: dict[str, Any]) -> None:
    """Write a shard atomically (temporary name, then rename): a shard file is complete or absent."""
    from safetensors.numpy import save_file

    from cnclip_vision.io import atomic_write

    embeddings = np.ascontiguousarray(embeddings)
    meta = {**meta, "count": int(embeddings.shape[0]), "checksum": checksum(embeddings)}
    with atomic_write(path) as tmp:
        save_file({"embeddings": embeddings}, str(tmp), metadata={META_KEY: json.dumps(meta, ensure_ascii=False)})
    logger.debug("wrote %s (%d rows)", path, embeddings.shape[0])


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``path`` and the byte offset of its data, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ShardError(f"{path} is truncated ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 1 << 31:
            raise ShardError(f"{path} is truncated or not a safetensors file (header of {length} bytes, file {size})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardError(f"{path} has a damaged header: {e}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ShardError(f"{path} is truncated or padded: {size} bytes, the header describes {8 + length + end}")
    return header, 8 + length


def read_shard_meta(path: Path) -> dict[str, Any]:
    """The metadata of a shard file (:class:`ShardError` if it is damaged or not ours). Checks the header
    and the file size, not the embedding bytes (:func:`read_shard` with ``verify`` does)."""
    header, _ = _header(path)
    try:
        meta = json.loads(header["__metadata__"][META_KEY])
        info = header["embeddings"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} is not a cnclip embeddings shard ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("ids"), list):
        raise ShardError(f"{path} is not a cnclip embeddings shard")
    shape = info.get("shape", [])
    if len(shape) != 2 or shape[0] != len(meta["ids"]) or info.get("dtype") not in _ST_DTYPES:
        raise ShardError(f"{path}: tensor {info.get('dtype')} {shape} does not match its {len(meta['ids'])} ids")
    return meta


class ShardReader:
    """Random access to the rows of a shard file through a read-only memory map (nothing is read until a
    row is used). ``verify()`` hashes the bytes against the checksum in the metadata."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.meta = read_shard_meta(self.path)
        header, offset = _header(self.path)
        info = header["embeddings"]
        begin, end = info["data_offsets"]
        self.shape = tuple(info["shape"])
        dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
        if end - begin != self.shape[0] * self.shape[1] * dtype.itemsize:
            raise ShardError(f"{self.path}: data size does not match its shape {self.shape}")
        self._row: dict[str, int] | None = None
        if self.shape[0] == 0:
            self.array = np.empty(self.shape, dtype)
        else:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.array = np.frombuffer(
                self._mmap, dtype=dtype, count=self.shape[0] * self.shape[1], offset=offset + begin
            )
            self.array = self.array.reshape(self.shape)

    def row_of(self) -> dict[str, int]:
        if self._row is None:
            self._row = {i: n for n, i in enumerate(self.meta["ids"])}
        return self._row

    def verify(self) -> bool:
        expected = self.meta.get("checksum")
        return expected is None or checksum(self.array) == expected

    def read(self, verify: bool = False) -> np.ndarray:
        """All rows, copied into memory."""
        if verify and not self.verify():
            raise ShardError(f"{self.path}: the embedding bytes do not match the checksum (the file is damaged)")
        return np.array(self.array)


def read_shard(path: str | os.PathLike[str], *, verify: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """``(metadata, embeddings)`` of one shard file; ``verify`` checks the bytes against the checksum."""
    reader = ShardReader(path)
    return reader.meta, reader.read(verify=verify)


# ---------------------------------------------------------------------------------------- reading
def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``manifest.json`` of an embeddings directory (CNClipError if absent: unfinished or not ours)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CNClipError(f"no such embeddings directory: {directory}")
    path = directory / MANIFEST
    if not path.is_file():
        raise CNClipError(
            f"{directory} has no {MANIFEST}: not an embeddings directory, or an extraction that did "
            "not finish (rerun `cnclip embed` with the same arguments to resume it)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CNClipError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CNClipError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise CNClipError(
            f"{path} has format version {manifest['version']}; this cnclip-vision reads up to "
            f"{FORMAT_VERSION} (upgrade cnclip-vision)"
        )
    return manifest


def iter_shards(
    directory: str | os.PathLike[str], *, verify: bool = False, dtype: Any = None
) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(ids, embeddings [n, D])`` of each shard of a finished directory, in row order; one shard in
    memory at a time. ``dtype`` converts (e.g. ``np.float32`` for FAISS); ``verify`` checks checksums."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    dim, seen = manifest["dim"], 0
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        try:
            meta, emb = read_shard(path, verify=verify)
        except (OSError, ShardError) as e:
            raise CNClipError(f"cannot read shard {path}: {e}") from None
        n = len(meta["ids"])
        if n != shard["count"] or emb.shape != (n, dim) or seen + n > manifest["num_embedded"]:
            raise CNClipError(f"shard {path} does not match {directory / MANIFEST} (was the directory modified?)")
        seen += n
        yield meta["ids"], emb if dtype is None else emb.astype(dtype, copy=False)
    if seen != manifest["num_embedded"]:
        raise CNClipError(
            f"{directory}: the shards hold {seen} embeddings, the manifest says {manifest['num_embedded']}"
        )


def load_embeddings(directory: str | os.PathLike[str], *, verify: bool = False) -> tuple[list[str], torch.Tensor]:
    """``(ids, embeddings [N, D])`` of an embeddings directory, rows in id order, in the stored dtype.
    The embeddings are read into memory: ``N * D * 4`` bytes (half that for float16)."""
    import torch

    manifest = read_manifest(directory)
    out = np.empty((manifest["num_embedded"], manifest["dim"]), dtype=DTYPES[manifest["dtype"]])
    ids: list[str] = []
    for shard_ids, emb in iter_shards(directory, verify=verify):
        out[len(ids) : len(ids) + len(shard_ids)] = emb
        ids.extend(shard_ids)
    return ids, torch.from_numpy(out)


def embeddings_digest(manifest: dict[str, Any]) -> str:
    """A digest of what a manifest describes (shards, counts, checksums, model): an index built on one
    extraction is recognised as stale after another."""
    parts = [manifest.get("model", {}).get("fingerprint"), manifest["dim"], manifest["dtype"], manifest["num_embedded"]]
    parts += [[s["file"], s["count"], s.get("checksum"), s.get("digest")] for s in manifest["shards"]]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()


class LazyIds(Sequence[str]):
    """The ids of ``ids.txt`` without a Python string per row: the file is memory-mapped and one int64 line
    offset per row is kept (8 bytes per id instead of ~60). Indexing decodes one line."""

    def __init__(self, path: str | os.PathLike[str], expected: int | None = None) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        self._buf: bytes | mmap.mmap
        if size == 0:
            self._buf, ends = b"", np.empty(0, np.int64)
        else:
            with open(self.path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            ends = np.flatnonzero(np.frombuffer(self._buf, dtype=np.uint8) == 10).astype(np.int64)
        self._starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else ends
        self._ends = ends
        if expected is not None and len(ends) != expected:
            raise CNClipError(f"{self.path} has {len(ends)} ids, the manifest says {expected}")

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start, end = self._starts[index], self._ends[index]
        return bytes(self._buf[start:end]).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]


# ---------------------------------------------------------------------------------------- writing
def finalize_directory(
    out: Path, num_shards: int, *, source_info: dict[str, Any], key: dict[str, Any], paths: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write ``ids.txt`` and ``manifest.json`` from the shards of the current layout (their metadata), then
    delete the shard files of other layouts. Returns the manifest."""
    from cnclip_vision.io import atomic_write, write_json

    shards, failures, total = [], [], 0
    with atomic_write(out / IDS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as ids_file:
        for s in range(num_shards):
            name = shard_name(s, num_shards)
            meta = read_shard_meta(out / name)
            ids_file.write("".join(i + "\n" for i in meta["ids"]))
            total += len(meta["ids"])
            shards.append(
                {
                    "file": name,
                    "shard": s,
                    "count": len(meta["ids"]),
                    "num_items": meta["num_items"],
                    "digest": meta["digest"],
                    "checksum": meta["checksum"],
                }
            )
            for item_id, reason in meta["failures"]:
                where = {"path": paths[item_id]} if paths and item_id in paths else {}
                failures.append({"id": item_id, **where, "reason": reason})
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "modality": key["modality"],
        **source_info,
        "dim": key["dim"],
        "dtype": key["dtype"],
        "normalized": True,
        "shard_size": key["shard_size"],
        "layout": {"scheme": LAYOUT, "num_shards": num_shards},
        "num_inputs": sum(s["num_items"] for s in shards),
        "num_embedded": total,
        "num_failed": len(failures),
        "ids_file": IDS_FILE,
        "shards": shards,
        "failures": failures,
    }
    write_json(out / MANIFEST, manifest)
    keep = {shard_name(s, num_shards) for s in range(num_shards)}
    for path in out.glob("shard-*.safetensors"):
        if path.name not in keep and parse_shard_name(path.name) is not None:
            path.unlink(missing_ok=True)  # an earlier layout or format, no longer needed
    return manifest


def check_ids(ids: Sequence[str], what: str) -> None:
    """Ids are the rows' keys in the shard files: unique, one line each."""
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise CNClipError(f"duplicate {what} id {i!r}: ids must be unique")
        if "\n" in i or "\r" in i:
            raise CNClipError(f"{what} id {i!r} contains a line break")
        seen.add(i)


def save_embeddings(
    out_dir: str | os.PathLike[str],
    ids: Sequence[str],
    embeddings: Any,
    *,
    modality: str = "image",
    shard_size: int = 10_000,
    dtype: str = "float32",
    model: dict[str, Any] | None = None,
    source: str = "memory",
) -> dict[str, Any]:
    """Write embeddings computed elsewhere (``[N, D]`` array or tensor, one row per id) as an embeddings
    directory that search, ``cnclip index build`` and evaluation read like an extracted one. Rows are
    L2-normalised. ``model`` describes their model (``{"description", "fingerprint"}``). Returns the manifest."""

    array = np.asarray(embeddings.detach().cpu().float().numpy() if hasattr(embeddings, "detach") else embeddings)
    if array.ndim != 2 or len(array) != len(ids) or len(ids) == 0:
        raise ValueError(
            f"embeddings must be [len(ids), D] with at least one row, got {array.shape} for {len(ids)} ids"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ids = [str(i) for i in ids]
    check_ids(ids, modality)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    model = model or {"description": "external", "fingerprint": "external"}
    key = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "modality": modality,
        "model_fingerprint": model["fingerprint"],
        "dtype": dtype,
        "dim": int(array.shape[1]),
        "normalized": True,
        "shard_size": shard_size,
    }
    num_shards = num_shards_for(len(ids), shard_size)
    where = shard_of(item_hashes(ids), num_shards)
    order = np.argsort(where, kind="stable")
    bounds = np.searchsorted(where[order], np.arange(num_shards + 1))
    for s in range(num_shards):
        rows = order[bounds[s] : bounds[s + 1]]
        emb = array[rows].astype(np.float64)
        emb = (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)).astype(DTYPES[dtype])
        shard_ids = [ids[r] for r in rows]
        meta = {
            **key,
            "layout": LAYOUT,
            "shard": s,
            "num_shards": num_shards,
            "digest": ids_digest(shard_ids),
            "num_items": len(shard_ids),
            "ids": shard_ids,
            "failures": [],
        }
        write_shard(out / shard_name(s, num_shards), emb, meta)
    return finalize_directory(out, num_shards, source_info={"source": source, "model": model}, key=key)
