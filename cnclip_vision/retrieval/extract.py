"""Embedding extraction of large collections into an embeddings directory (:mod:`.store`), resumable, on one
process or many (``torchrun`` / ``srun``, see :mod:`.dist`; Ray Data in :mod:`.ray_engine`).

How a run goes, on any number of ranks:

1. Every rank lists the inputs; the ranks check that they see the same list and the same model.
2. Rank 0 scans the directory: a shard of the current layout is *finished* when its metadata matches the
   model, the settings and the ids its shard should hold. With ``verify`` the ranks split the finished
   shards and check their bytes against their checksums; a damaged one is redone.
3. The other shards are shared out by size and written by their rank. A shard whose items were embedded
   before (an earlier layout, a version-1 directory, the same shard before some items were added or
   removed) copies those rows from the old file and encodes only the items it does not find: removing
   items encodes nothing, adding items encodes just them.
4. After every rank has finished, rank 0 writes ``ids.txt`` and ``manifest.json`` and deletes the shard
   files of other layouts. Failures (unreadable images) are recorded in each shard, so they are counted
   across ranks.

A killed run leaves only complete shard files (each is written to a temporary name and renamed); a rerun
keeps them and does the rest.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnclip_vision.errors import CNClipError
from cnclip_vision.models.identity import model_info
from cnclip_vision.retrieval import store
from cnclip_vision.retrieval.dist import DEFAULT_TIMEOUT_S, Group

if TYPE_CHECKING:
    from cnclip_vision.models.clip import ChineseCLIP

logger = logging.getLogger("cnclip_vision.retrieval")

__all__ = ["ShardJob", "extract_image_embeddings", "extract_text_embeddings"]

_KEY_FIELDS = ("format", "modality", "model_fingerprint", "dtype", "dim", "normalized")


# ------------------------------------------------------------------------------------------ model key
def make_key(modality: str, info: dict[str, Any], dim: int, dtype: str, shard_size: int) -> dict[str, Any]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if dtype not in store.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(store.DTYPES)}, got {dtype!r}")
    return {
        "format": store.FORMAT,
        "version": store.FORMAT_VERSION,
        "modality": modality,
        "model_fingerprint": info["fingerprint"],
        "dtype": dtype,
        "dim": dim,
        "normalized": True,
        "shard_size": shard_size,
    }


def _same_key(meta: dict[str, Any], key: dict[str, Any]) -> bool:
    return all(meta.get(k) == key[k] for k in _KEY_FIELDS)


# ------------------------------------------------------------------------------------------- planning
@dataclass
class ShardJob:
    """One shard to write: its index, the layout's shard count, its items (ids in row order) and their
    inputs (image paths or texts, aligned with ``ids``)."""

    shard: int
    num_shards: int
    ids: list[str]
    inputs: list[str]

    @property
    def name(self) -> str:
        return store.shard_name(self.shard, self.num_shards)


@dataclass
class Layout:
    """Where every input goes: ``rows[s]`` are the input positions of shard ``s``, in input order."""

    num_shards: int
    rows: list[np.ndarray]

    @classmethod
    def of(cls, hashes: np.ndarray, num_shards: int) -> Layout:
        where = store.shard_of(hashes, num_shards)
        order = np.argsort(where, kind="stable")
        bounds = np.searchsorted(where[order], np.arange(num_shards + 1))
        return cls(num_shards, [order[bounds[s] : bounds[s + 1]] for s in range(num_shards)])

    def job(self, shard: int, ids: Sequence[str], inputs: Sequence[str]) -> ShardJob:
        rows = self.rows[shard].tolist()
        return ShardJob(shard, self.num_shards, [ids[r] for r in rows], [inputs[r] for r in rows])


@dataclass
class Plan:
    """What a run does: the layout, the finished shards it keeps, the shards each rank writes and the
    files it may copy embeddings from."""

    num_shards: int
    reused: list[int]
    assignment: list[list[int]]
    sources: list[str]
    candidates: list[int] = field(default_factory=list)

    @property
    def todo(self) -> list[int]:
        return sorted(s for part in self.assignment for s in part)


def _prepare_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CNClipError(f"the output directory {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / store.MANIFEST).unlink(missing_ok=True)  # the directory is unfinished until the manifest is rewritten
    for pattern in (".shard-*.tmp", f".{store.MANIFEST}.*.tmp", f".{store.IDS_FILE}.*.tmp"):  # left by a killed run
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)


def _scan(
    out: Path, key: dict[str, Any], num_items: int, hashes: np.ndarray, ids: Sequence[str], resume: bool
) -> tuple[int, list[int], list[str]]:
    """Rank 0: ``(num_shards, finished-shard candidates, copy sources)`` from the files in ``out``."""
    metas: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("shard-*.safetensors")) if resume else ():
        if store.parse_shard_name(path.name) is None:
            continue
        try:
            meta = store.read_shard_meta(path)
        except (OSError, store.ShardError) as e:
            logger.warning("shard %s is damaged and will be redone: %s", path.name, e)
            continue
        if _same_key(meta, key):
            metas[path.name] = meta
        else:
            logger.info("shard %s holds another model's or setting's embeddings; it will be replaced", path.name)
    layouts = collections.Counter(
        (m["num_shards"], m.get("shard_size")) for m in metas.values() if m.get("version") == store.FORMAT_VERSION
    )
    previous = next((count for (count, size), _ in layouts.most_common() if size == key["shard_size"]), None)
    num_shards = store.num_shards_for(num_items, key["shard_size"], previous)
    layout = Layout.of(hashes, num_shards)
    candidates = []
    for s in range(num_shards):
        found = metas.get(store.shard_name(s, num_shards))
        if found is None or found.get("shard") != s or found.get("num_shards") != num_shards:
            continue
        rows = layout.rows[s]
        if found.get("num_items") == len(rows) and found.get("digest") == store.ids_digest([ids[r] for r in rows]):
            candidates.append(s)
    return num_shards, candidates, sorted(metas)


def _share_out(todo: Sequence[int], sizes: Sequence[int], world: int) -> list[list[int]]:
    """Shards to ranks, largest first to the least loaded rank; each rank's shards in ascending order."""
    load, parts = [0] * world, [[] for _ in range(world)]  # type: list[int], list[list[int]]
    for s in sorted(todo, key=lambda s: (-sizes[s], s)):
        r = min(range(world), key=lambda r: (load[r], r))
        parts[r].append(s)
        load[r] += sizes[s] + 1
    return [sorted(p) for p in parts]


def plan_run(
    group: Group, out: Path, key: dict[str, Any], ids: Sequence[str], hashes: np.ndarray, *, resume: bool, verify: bool
) -> tuple[Plan, Layout]:
    """The run's :class:`Plan`, the same on every rank (rank 0 scans; all ranks verify a share)."""

    def scan() -> tuple[int, list[int], list[str]]:
        _prepare_dir(out)
        return _scan(out, key, len(ids), hashes, ids, resume)

    num_shards, candidates, sources = group.run_on_main(scan)
    layout = Layout.of(hashes, num_shards)
    bad = []
    if verify:
        for s in candidates[group.rank :: group.world_size]:
            try:
                ok = store.ShardReader(out / store.shard_name(s, num_shards)).verify()
            except (OSError, store.ShardError):
                ok = False
            if not ok:
                logger.warning(
                    "shard %s is damaged (checksum mismatch) and will be redone", store.shard_name(s, num_shards)
                )
                bad.append(s)
    bad_all = {s for part in group.all_gather(bad) for s in part}
    reused = [s for s in candidates if s not in bad_all]
    done = set(reused)
    todo = [s for s in range(num_shards) if s not in done]
    sizes = [len(r) for r in layout.rows]
    bad_names = {store.shard_name(s, num_shards) for s in bad_all}
    plan = Plan(
        num_shards,
        reused,
        _share_out(todo, sizes, group.world_size),
        [n for n in sources if n not in bad_names],
        candidates,
    )
    return plan, layout


# ------------------------------------------------------------------------------------ copy sources
class Sources:
    """Embeddings already on disk that a shard may copy instead of encoding: files with the same model and
    settings (any layout, version-1 files too). Version-2 files are found from the item's hash; version-1
    files through an id map built on first need. Files are opened lazily (memory-mapped, at most
    ``max_open`` at a time); with ``verify`` each is checked against its checksum before its first use."""

    def __init__(self, out: Path, names: Sequence[str], *, verify: bool, max_open: int = 32) -> None:
        self.out, self.verify, self.max_open = out, verify, max_open
        self.names = set(names)
        self.layouts = sorted({p[1] for n in names if (p := store.parse_shard_name(n)) and p[1] is not None})
        self.v1 = sorted(n for n in names if (p := store.parse_shard_name(n)) and p[1] is None)
        self._open: collections.OrderedDict[str, store.ShardReader] = collections.OrderedDict()
        self._checked: dict[str, bool] = {}
        self._v1_map: dict[str, tuple[str, int]] | None = None

    def reader(self, name: str) -> store.ShardReader | None:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        if name not in self.names or self._checked.get(name) is False:
            return None
        try:
            reader = store.ShardReader(self.out / name)
            if self.verify and name not in self._checked and not reader.verify():
                raise store.ShardError("checksum mismatch")
        except (OSError, store.ShardError) as e:
            logger.warning("not copying from damaged shard %s: %s", name, e)
            self._checked[name] = False
            return None
        self._checked[name] = True
        self._open[name] = reader
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return reader

    def locate(self, job: ShardJob) -> dict[str, tuple[list[int], list[int]]]:
        """``{file: (rows of the job, rows of the file)}`` for the job's items found on disk."""
        found: dict[str, tuple[list[int], list[int]]] = {}
        left = list(range(len(job.ids)))
        hashes = store.item_hashes(job.ids) if self.layouts else np.empty(0, np.uint64)  # no layouts: unused
        order = sorted(self.layouts, key=lambda c: c != job.num_shards)  # the job's own layout first
        for count in order:
            if not left:
                break
            where = store.shard_of(hashes[left], count)
            rest = []
            for row, s in zip(left, where.tolist()):
                name = store.shard_name(s, count)
                reader = self.reader(name)
                src = reader.row_of().get(job.ids[row]) if reader is not None else None
                if src is None:
                    rest.append(row)
                else:
                    part = found.setdefault(name, ([], []))
                    part[0].append(row)
                    part[1].append(src)
            left = rest
        if left and self.v1:
            if self._v1_map is None:
                self._v1_map = {}
                for name in self.v1:
                    reader = self.reader(name)
                    for n, item_id in enumerate(reader.meta["ids"] if reader is not None else ()):
                        self._v1_map[item_id] = (name, n)
            for row in left:
                if (hit := self._v1_map.get(job.ids[row])) is not None:
                    part = found.setdefault(hit[0], ([], []))
                    part[0].append(row)
                    part[1].append(hit[1])
        return found

    def rows(self, name: str, rows: Sequence[int]) -> np.ndarray | None:
        reader = self.reader(name)
        return None if reader is None else np.asarray(reader.array[np.asarray(rows, dtype=np.int64)])


# ------------------------------------------------------------------------------------------- writing
# An encoder takes the jobs and, per job, the rows still to encode (ascending), and yields
# (job index, rows encoded, [len(rows), D] float32 embeddings, [(row, reason)] failures) in job order,
# accounting for every row exactly once.
Encoder = Callable[
    [Sequence[ShardJob], Sequence[Sequence[int]]],
    Iterator[tuple[int, Sequence[int], np.ndarray, Sequence[tuple[int, str]]]],
]


@dataclass
class RunStats:
    written: int = 0
    encoded: int = 0
    copied: int = 0
    failed: int = 0


def write_jobs(
    jobs: Sequence[ShardJob],
    encode: Encoder | None,
    sources: Sources,
    out: Path,
    key: dict[str, Any],
    *,
    progress: bool = False,
    desc: str = "embed",
) -> RunStats:
    """Write every job's shard: rows found in ``sources`` are copied, the others encoded (``encode`` may be
    None only when there is nothing to encode, e.g. no jobs)."""
    from tqdm.auto import tqdm

    stats = RunStats()
    copies = [sources.locate(job) for job in jobs]
    todo = []
    for job, found in zip(jobs, copies):
        copied = {r for rows, _ in found.values() for r in rows}
        todo.append([r for r in range(len(job.ids)) if r not in copied])
    dim, dtype = key["dim"], store.DTYPES[key["dtype"]]
    if not any(todo):
        stream: Iterator[tuple[int, Sequence[int], np.ndarray, Sequence[tuple[int, str]]]] = iter(())
    elif encode is None:
        raise ValueError("write_jobs: items are left to encode but no encoder was given")
    else:
        stream = iter(encode(jobs, todo))
    nxt = next(stream, None)
    with tqdm(
        total=sum(len(j.ids) for j in jobs), desc=desc, unit="item", disable=None if progress else True, leave=False
    ) as bar:
        for j, job in enumerate(jobs):
            emb = np.zeros((len(job.ids), dim), dtype=dtype)
            have = np.zeros(len(job.ids), dtype=bool)
            reasons: dict[int, str] = {}
            need = set(todo[j])
            for name, (rows, src_rows) in copies[j].items():
                got = sources.rows(name, src_rows)
                if got is None:  # damaged since located: encode them after all (cannot happen within a run)
                    raise CNClipError(f"shard {name} became unreadable during the run")
                emb[rows], have[rows] = got, True
                stats.copied += len(rows)
            bar.update(len(job.ids) - len(need))
            while need:
                if nxt is None or nxt[0] != j:
                    raise RuntimeError(f"the encoder skipped {len(need)} items of shard {job.name}")
                _, encoded_rows, encoded, failures = nxt
                if len(encoded_rows):
                    emb[list(encoded_rows)] = encoded
                    have[list(encoded_rows)] = True
                for row, reason in failures:
                    reasons[row] = reason
                need.difference_update(encoded_rows)
                need.difference_update(r for r, _ in failures)
                stats.encoded += len(encoded_rows) + len(failures)
                stats.failed += len(failures)
                bar.update(len(encoded_rows) + len(failures))
                nxt = next(stream, None)
            keep = np.flatnonzero(have)
            meta = {
                **key,
                "layout": store.LAYOUT,
                "shard": job.shard,
                "num_shards": job.num_shards,
                "digest": store.ids_digest(job.ids),
                "num_items": len(job.ids),
                "ids": [job.ids[r] for r in keep.tolist()],
                "failures": [[job.ids[r], reasons[r]] for r in sorted(reasons)],
            }
            store.write_shard(out / job.name, emb[keep], meta)
            stats.written += 1
    if nxt is not None:
        raise RuntimeError("the encoder returned more items than it was given")
    return stats


# --------------------------------------------------------------------------------------------- encoders
def _identity(items: list[Any]) -> list[Any]:
    return items


def image_encoder(model: ChineseCLIP, *, batch_size: int, num_workers: int | None) -> Encoder:
    """Images decoded in ``DataLoader`` workers, in batches that never cross a shard (so a shard's result
    does not depend on which rank or run encoded it); unreadable files are failures, logged and skipped."""
    import torch
    from torch.utils.data import DataLoader

    from cnclip_vision.data.images import ImageFileDataset
    from cnclip_vision.data.transforms import image_transform
    from cnclip_vision.models.encode import encode_images

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    transform = image_transform(model.image_size)

    def encode(
        jobs: Sequence[ShardJob], todo: Sequence[Sequence[int]]
    ) -> Iterator[tuple[int, Sequence[int], np.ndarray, Sequence[tuple[int, str]]]]:
        flat = [(j, r) for j, rows in enumerate(todo) for r in rows]
        batches, start = [], 0
        for rows in todo:
            batches += [
                list(range(start + i, start + min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)
            ]
            start += len(rows)
        workers = (
            num_workers if num_workers is not None else (min(4, os.cpu_count() or 1) if len(flat) > batch_size else 0)
        )
        dataset = ImageFileDataset([jobs[j].inputs[r] for j, r in flat], transform)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_identity)
        for items in loader:
            j = flat[items[0][0]][0]
            good = [(flat[i][1], x) for i, x, _ in items if x is not None]
            failures = [(flat[i][1], err or "unreadable") for i, x, err in items if x is None]
            for row, reason in failures:
                logger.warning("skipped %s: %s", jobs[j].inputs[row], reason)
            emb = np.empty((0, model.config.embed_dim), np.float32)
            if good:
                pixels = torch.stack([x for _, x in good]).to(model.device)
                emb = encode_images(model, pixels, batch_size=len(good)).numpy()
            yield j, [r for r, _ in good], emb, failures

    return encode


def text_encoder(model: ChineseCLIP, *, batch_size: int) -> Encoder:
    """Texts encoded shard by shard (length-bucketed within a shard)."""
    from cnclip_vision.models.encode import encode_texts

    def encode(
        jobs: Sequence[ShardJob], todo: Sequence[Sequence[int]]
    ) -> Iterator[tuple[int, Sequence[int], np.ndarray, Sequence[tuple[int, str]]]]:
        for j, rows in enumerate(todo):
            if rows:
                texts = [jobs[j].inputs[r] for r in rows]
                yield j, rows, encode_texts(model, texts, batch_size=batch_size).numpy(), []

    return encode


# ------------------------------------------------------------------------------------------------ a run
def run_extraction(
    out_dir: str | os.PathLike[str],
    *,
    modality: str,
    source: str,
    ids: Sequence[str],
    inputs: Sequence[str],
    info: dict[str, Any],
    dim: int,
    make_encoder: Callable[[], Encoder],
    shard_size: int,
    dtype: str,
    resume: bool,
    verify: bool,
    progress: bool,
    group: Group | None = None,
    paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Plan, write this rank's shards, then (rank 0, once every rank is done) the manifest."""
    started = time.perf_counter()
    group = group or Group()
    key = make_key(modality, info, dim, dtype, shard_size)
    out = Path(out_dir)
    check = (store.ids_digest(ids), info["fingerprint"], json.dumps(key, sort_keys=True))
    views = group.all_gather(check)
    if any(v != views[0] for v in views):
        what = "input lists" if any(v[0] != views[0][0] for v in views) else "models or settings"
        raise CNClipError(
            f"the {group.world_size} extraction processes see different {what}: every rank must be "
            "given the same inputs, model and options"
        )
    hashes = store.item_hashes(ids)
    plan, layout = plan_run(group, out, key, ids, hashes, resume=resume, verify=verify)
    mine = [layout.job(s, ids, inputs) for s in plan.assignment[group.rank]]
    if plan.reused and group.is_main:
        logger.info("resuming in %s: %d of %d shards already done", out, len(plan.reused), plan.num_shards)
    sources = Sources(out, plan.sources if resume else [], verify=verify)
    encoder = make_encoder() if mine else None
    stats = write_jobs(
        mine,
        encoder,
        sources,
        out,
        key,
        progress=progress and group.is_main,
        desc=f"embed {modality}s",
    )
    if group.world_size > 1:
        logger.info(
            "rank %d: %d shards written, %d %ss encoded, %d copied",
            group.rank,
            stats.written,
            stats.encoded,
            modality,
            stats.copied,
        )
    all_stats = group.all_gather(stats)  # also the barrier: every rank has written its shards
    manifest = group.run_on_main(lambda: finish_run(out, plan, key, info, source, ids, paths))
    return summarize(manifest, out, plan, all_stats, group.world_size, started, modality, len(ids), log=group.is_main)


def finish_run(
    out: Path,
    plan: Plan,
    key: dict[str, Any],
    info: dict[str, Any],
    source: str,
    ids: Sequence[str],
    paths: Sequence[str] | None,
) -> dict[str, Any]:
    """Rank 0, after every shard is written: ``ids.txt``, ``manifest.json``, old layouts deleted."""
    path_of = dict(zip(ids, paths)) if paths is not None else None
    return store.finalize_directory(
        out, plan.num_shards, source_info={"source": source, "model": info}, key=key, paths=path_of
    )


def summarize(
    manifest: dict[str, Any],
    out: Path,
    plan: Plan,
    all_stats: Sequence[RunStats],
    world_size: int,
    started: float,
    modality: str,
    num_inputs: int,
    *,
    log: bool = True,
) -> dict[str, Any]:
    encoded = sum(s.encoded for s in all_stats)
    copied = sum(s.copied for s in all_stats)
    summary = {
        "out_dir": str(out),
        **{k: v for k, v in manifest.items() if k != "shards"},
        "num_shards": plan.num_shards,
        "reused_shards": len(plan.reused),
        "rewritten_shards": len(plan.todo),
        "num_encoded": encoded,
        "num_copied": copied,
        "world_size": world_size,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    if log:
        logger.info(
            "%d %s embeddings in %s (%d failed; %d of %d shards reused, %d encoded, %d copied)",
            manifest["num_embedded"],
            modality,
            out,
            manifest["num_failed"],
            len(plan.reused),
            plan.num_shards,
            encoded,
            copied,
        )
    if not manifest["num_embedded"]:
        raise CNClipError(f"none of the {num_inputs} {modality}s could be encoded (see the warnings above)")
    return summary


def image_ids(images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[str]]:
    """Paths and ids: paths relative to the folder, or as written in the list file (relative to its folder),
    or as given in a Python list."""
    from cnclip_vision.data.images import list_images

    paths = list_images(images)
    if not isinstance(images, (str, os.PathLike)):  # a list or tuple: list_images rejects other values
        return [str(p) for p in paths], [Path(p).as_posix() for p in paths]
    src = Path(images)
    root = src if src.is_dir() else src.parent
    ids = [p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix() for p in paths]
    return [str(p) for p in paths], ids


def _group(distributed: bool | None, timeout_s: float) -> Group:
    if distributed is False:
        return Group()
    group = Group.from_env(timeout_s)
    if distributed and group.world_size == 1:
        logger.warning("distributed=True but this process was not started by torchrun or srun: running alone")
    return group


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
    verify: bool = True,
    progress: bool = True,
    distributed: bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Encode every image of a folder (recursive), a list file or a list of paths into ``out_dir``.

    Images are decoded in ``DataLoader`` workers and streamed; at most one shard is held in memory.
    Unreadable files are logged, skipped and listed in the summary (id, path, reason). With ``resume``,
    finished shards of an earlier run with the same model and settings are kept (``verify``: after checking
    their bytes), and embeddings of items that moved or stayed are copied rather than encoded again.

    Under ``torchrun`` or ``srun`` (``distributed=None`` detects them) every process calls this with the
    same arguments and a model on its own device (:func:`~cnclip_vision.retrieval.local_device`); the
    shards are shared out and the manifest is written once, after every rank has finished. ``timeout_s``
    is how long a rank waits for the others.

    Returns the manifest without its shard list, plus ``out_dir``, ``num_shards``, ``reused_shards``,
    ``rewritten_shards``, ``num_encoded`` (items encoded in this run, failures included), ``num_copied``,
    ``world_size`` and ``elapsed_s``; the same on every rank.
    """
    paths, ids = image_ids(images)
    store.check_ids(ids, "image")
    source = os.fspath(images) if isinstance(images, (str, os.PathLike)) else f"{len(images)} paths"
    return run_extraction(
        out_dir,
        modality="image",
        source=source,
        ids=ids,
        inputs=paths,
        info=model_info(model),
        dim=model.config.embed_dim,
        shard_size=shard_size,
        dtype=dtype,
        resume=resume,
        verify=verify,
        make_encoder=lambda: image_encoder(model, batch_size=batch_size, num_workers=num_workers),
        progress=progress,
        group=_group(distributed, timeout_s),
        paths=paths,
    )


def extract_text_embeddings(
    model: ChineseCLIP,
    jsonl_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    shard_size: int = 10_000,
    dtype: str = "float32",
    resume: bool = True,
    verify: bool = True,
    progress: bool = True,
    distributed: bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Encode the texts of a ``{"text_id", "text", "image_ids"}`` JSONL into ``out_dir`` (ids = text ids);
    same layout, resume, distribution and summary as :func:`extract_image_embeddings`. The whole file is
    validated first (errors name ``file:line``)."""
    from cnclip_vision.data.jsonl import read_text_jsonl

    records = read_text_jsonl(jsonl_path)
    ids = [r.text_id for r in records]
    store.check_ids(ids, "text")
    return run_extraction(
        out_dir,
        modality="text",
        source=os.fspath(jsonl_path),
        ids=ids,
        inputs=[r.text for r in records],
        info=model_info(model),
        dim=model.config.embed_dim,
        shard_size=shard_size,
        dtype=dtype,
        resume=resume,
        verify=verify,
        progress=progress,
        make_encoder=lambda: text_encoder(model, batch_size=batch_size),
        group=_group(distributed, timeout_s),
    )
