"""Extraction on Ray Data, for clusters without a shared launcher (``pip install "cnclip-vision[ray]"``).

The driver plans the run exactly as rank 0 of a ``torchrun`` run does (:func:`.extract.plan_run`); the
shards still to write become the rows of a Ray dataset, and ``map_batches`` hands them to a pool of actors
(a callable class): each actor loads the model once (on its GPU with ``num_gpus_per_actor``), then writes
whole shards with the same code and the same files as the torchrun path, copying embeddings already on disk.
The driver writes the manifest after every shard is done. The output directory must be reachable by the
driver and every actor under the same path (a shared file system).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnclip_vision.errors import CNClipError
from cnclip_vision.retrieval import extract, store
from cnclip_vision.retrieval.dist import Group

logger = logging.getLogger("cnclip_vision.retrieval")

__all__ = ["extract_image_embeddings_ray", "extract_text_embeddings_ray"]


class ShardWorker:
    """A Ray actor: the model, loaded once, and the shard writer. Called with batches of shard jobs."""

    def __init__(
        self,
        *,
        model: str,
        model_options: dict[str, Any],
        modality: str,
        key: dict[str, Any],
        out: str,
        sources: list[str],
        verify: bool,
        batch_size: int,
        num_workers: int,
        fingerprint: str,
    ) -> None:
        import cnclip_vision

        self.model = cnclip_vision.load(model, **model_options)
        info = extract.model_info(self.model)
        if info["fingerprint"] != fingerprint:
            raise CNClipError(
                f"the model loaded by a Ray actor ({info['description']}, {info['fingerprint']}) is not "
                f"the driver's ({fingerprint}): give a path every node can read"
            )
        if modality == "image":
            self.encoder = extract.image_encoder(self.model, batch_size=batch_size, num_workers=num_workers)
        else:
            self.encoder = extract.text_encoder(self.model, batch_size=batch_size)
        self.out, self.key = Path(out), key
        self.sources = extract.Sources(self.out, sources, verify=verify)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list[int]] = {"shard": [], "encoded": [], "copied": [], "failed": []}
        for s, count, ids, inputs in zip(batch["shard"], batch["num_shards"], batch["ids"], batch["inputs"]):
            job = extract.ShardJob(int(s), int(count), [str(i) for i in ids], [str(x) for x in inputs])
            stats = extract.write_jobs([job], self.encoder, self.sources, self.out, self.key)
            for name, value in (
                ("shard", job.shard),
                ("encoded", stats.encoded),
                ("copied", stats.copied),
                ("failed", stats.failed),
            ):
                rows[name].append(value)
        return {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}


def _run(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    modality: str,
    source: str,
    ids: Sequence[str],
    inputs: Sequence[str],
    paths: Sequence[str] | None,
    model_options: dict[str, Any] | None,
    batch_size: int,
    num_workers: int,
    shard_size: int,
    dtype: str,
    resume: bool,
    verify: bool,
    num_actors: int,
    num_gpus_per_actor: float,
    num_cpus_per_actor: float,
    ray_address: str | None,
    init_kwargs: dict[str, Any] | None,
) -> dict[str, Any]:
    try:
        import ray
        import ray.data
    except ImportError:
        raise CNClipError('the Ray engine needs Ray Data: pip install "ray[data]" (or cnclip-vision[ray])') from None
    import cnclip_vision

    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    started = time.perf_counter()
    options = dict(model_options or {})
    options.setdefault("device", "cuda" if num_gpus_per_actor > 0 else "cpu")
    driver_model = cnclip_vision.load(os.fspath(model), **{**options, "device": "cpu"})  # for the fingerprint only
    info, dim = extract.model_info(driver_model), driver_model.config.embed_dim
    del driver_model
    key = extract.make_key(modality, info, dim, dtype, shard_size)
    out = Path(out_dir)
    plan, layout = extract.plan_run(Group(), out, key, ids, store.item_hashes(ids), resume=resume, verify=verify)
    jobs = [layout.job(s, ids, inputs) for s in plan.todo]
    stats = extract.RunStats()
    if jobs:
        started_ray = False
        if not ray.is_initialized():
            ray.init(address=ray_address, **(init_kwargs or {}))
            started_ray = True
        try:
            dataset = ray.data.from_items(
                [{"shard": j.shard, "num_shards": j.num_shards, "ids": j.ids, "inputs": j.inputs} for j in jobs]
            )
            worker_kwargs = dict(
                model=os.fspath(model),
                model_options=options,
                modality=modality,
                key=key,
                out=str(out.resolve()),
                sources=plan.sources if resume else [],
                verify=verify,
                batch_size=batch_size,
                num_workers=num_workers,
                fingerprint=info["fingerprint"],
            )
            results = dataset.map_batches(
                ShardWorker,
                fn_constructor_kwargs=worker_kwargs,
                batch_size=1,
                concurrency=min(num_actors, len(jobs)),
                num_gpus=num_gpus_per_actor,
                num_cpus=num_cpus_per_actor,
                batch_format="numpy",
            ).take_all()
        finally:
            if started_ray:
                ray.shutdown()
        written = sorted(int(r["shard"]) for r in results)
        if written != plan.todo:
            raise CNClipError(f"the Ray actors wrote shards {written}, expected {plan.todo}")
        stats = extract.RunStats(
            len(written),
            sum(int(r["encoded"]) for r in results),
            sum(int(r["copied"]) for r in results),
            sum(int(r["failed"]) for r in results),
        )
    manifest = extract.finish_run(out, plan, key, info, source, ids, paths)
    summary = extract.summarize(manifest, out, plan, [stats], 1, started, modality, len(ids))
    summary.update(engine="ray", ray_actors=min(num_actors, len(jobs)) if jobs else 0)
    return summary


def extract_image_embeddings_ray(
    model: str | os.PathLike[str],
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    model_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    shard_size: int = 10_000,
    dtype: str = "float32",
    resume: bool = True,
    verify: bool = True,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
    ray_address: str | None = None,
    init_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`~cnclip_vision.retrieval.extract_image_embeddings` on a pool of ``num_actors`` Ray actors.

    ``model`` is a name or path that :func:`cnclip_vision.load` understands on every node; ``model_options``
    go to it (``precision``, ``arch``; ``device`` defaults to ``"cuda"`` with ``num_gpus_per_actor``, else
    ``"cpu"``). Ray is started with ``ray.init(address=ray_address, **init_kwargs)`` unless it already runs
    (and then shut down again). ``num_workers``: DataLoader decoding processes per actor. Returns the same
    summary as the torchrun path, plus ``engine`` and ``ray_actors``."""
    paths, ids = extract.image_ids(images)
    store.check_ids(ids, "image")
    source = os.fspath(images) if isinstance(images, (str, os.PathLike)) else f"{len(images)} paths"
    return _run(
        model,
        out_dir,
        modality="image",
        source=source,
        ids=ids,
        inputs=paths,
        paths=paths,
        model_options=model_options,
        batch_size=batch_size,
        num_workers=num_workers,
        shard_size=shard_size,
        dtype=dtype,
        resume=resume,
        verify=verify,
        num_actors=num_actors,
        num_gpus_per_actor=num_gpus_per_actor,
        num_cpus_per_actor=num_cpus_per_actor,
        ray_address=ray_address,
        init_kwargs=init_kwargs,
    )


def extract_text_embeddings_ray(
    model: str | os.PathLike[str],
    jsonl_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_options: dict[str, Any] | None = None,
    batch_size: int = 256,
    shard_size: int = 10_000,
    dtype: str = "float32",
    resume: bool = True,
    verify: bool = True,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
    ray_address: str | None = None,
    init_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`~cnclip_vision.retrieval.extract_text_embeddings` on Ray actors (options as
    :func:`extract_image_embeddings_ray`)."""
    from cnclip_vision.data.jsonl import read_text_jsonl

    records = read_text_jsonl(jsonl_path)
    ids = [r.text_id for r in records]
    store.check_ids(ids, "text")
    return _run(
        model,
        out_dir,
        modality="text",
        source=os.fspath(jsonl_path),
        ids=ids,
        inputs=[r.text for r in records],
        paths=None,
        model_options=model_options,
        batch_size=batch_size,
        num_workers=0,
        shard_size=shard_size,
        dtype=dtype,
        resume=resume,
        verify=verify,
        num_actors=num_actors,
        num_gpus_per_actor=num_gpus_per_actor,
        num_cpus_per_actor=num_cpus_per_actor,
        ray_address=ray_address,
        init_kwargs=init_kwargs,
    )
