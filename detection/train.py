"""Training of the open-vocabulary detector (the Python API under ``cnclip train-detector``).

Only the pyramid, the RPN and the region head learn (and the last ``trainable_layers`` tower blocks if
asked); the CLIP model stays frozen. The machinery is that of :mod:`cnclip_vision.train`: AdamW with
warmup + cosine, gradient accumulation, bf16/fp16 autocast, data parallel under ``torchrun``, atomic
checkpoints every ``save_every`` steps, exact resume, a NaN guard, a progress bar and ``metrics.jsonl``.
Images get large-scale jitter (torchvision v2: flip, scale jitter, crop/pad to ``image_size``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..errors import CheckpointError
from ..train import TrainingError, _init_distributed, _load_checkpoint, _schedule, read_recipe, restore_loop_state, validate_common
from ..weights import atomic_write
from .model import DetectorConfig, OpenVocabDetector

logger = logging.getLogger(__name__)

__all__ = ["DetectorTrainConfig", "train_detector"]

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class DetectorTrainConfig:
    """Everything a detector training run needs; ``DetectorTrainConfig.from_file(json)`` reads a recipe."""

    output_dir: str
    train_data: str  # COCO annotation file (category names in Chinese, or give name_map)
    image_root: str | None = None  # default: beside the annotation file (its images/ folder if present)
    categories: list[str | int] | str | None = None  # train on these (names or ids); "base": split == base
    name_map: str | None = None  # English -> Chinese names (JSON or TSV)
    clip: str = "ViT-B-16"  # the frozen CLIP: a name or a path
    detector: dict[str, Any] = field(default_factory=dict)  # DetectorConfig options
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16  # global: summed over ranks and accumulation steps
    accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.05  # a fraction of the steps (< 1) or a number of steps
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    scale_range: tuple[float, float] = (0.1, 2.0)  # large-scale jitter
    flip: bool = True
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 needs a GPU)
    seed: int = 0
    num_workers: int = 2
    save_every: int = 500
    log_every: int = 20
    eval_data: str | None = None  # COCO file evaluated every eval_every steps and at the end
    eval_image_root: str | None = None
    eval_every: int | None = None  # default: at the end of each epoch
    device: str | None = None
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> DetectorTrainConfig:
        return read_recipe(cls, path, overrides, tuples=("betas", "scale_range"), kind="detector training")

    def validate(self, world_size: int) -> None:
        validate_common(self, world_size)
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise TrainingError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")


def _categories(dataset_categories: list[dict[str, Any]], spec: list[str | int] | str | None) -> list[str | int] | None:
    if spec == "base":
        base = [c["id"] for c in dataset_categories if c.get("split") == "base"]
        if not base:
            raise TrainingError('categories="base" needs category records with "split": "base" in the training file')
        return base
    if isinstance(spec, str):
        raise TrainingError(f'categories must be a list of names/ids or "base", got {spec!r}')
    return spec


def build_dataset(config: DetectorTrainConfig, image_size: int) -> Any:
    """The training :class:`~cnclip_vision.detection.coco.CocoDetection` with large-scale jitter."""
    from .coco import CocoDetection, lsj_transforms

    probe = json.loads(Path(config.train_data).read_text(encoding="utf-8")) if config.categories == "base" else None
    categories = _categories(probe["categories"] if probe else [], config.categories)
    return CocoDetection(config.train_data, config.image_root, categories=categories, name_map=config.name_map,
                         transforms=lsj_transforms(image_size, config.scale_range, flip=config.flip))  # fmt: skip


class _Seeded(torch.utils.data.Dataset):
    """Items whose augmentation draws are a function of (seed, epoch, index) only: the same images whatever
    the number of workers, and again after a resume."""

    def __init__(self, dataset: Any, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % (2**63))
            return self.dataset[index]


class _Batches(torch.utils.data.Sampler[list[int]]):
    """This rank's batches of one epoch (a seeded permutation), from ``start`` on, for exact resume."""

    def __init__(self, n: int, micro: int, rank: int, world: int, seed: int, epoch: int, start: int) -> None:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        self.order = torch.randperm(n, generator=g)
        self.micro, self.rank, self.world, self.start = micro, rank, world, start
        self.steps = n // (micro * world)

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start, self.steps):
            block = self.order[s * self.micro * self.world : (s + 1) * self.micro * self.world]
            yield block[self.rank * self.micro : (self.rank + 1) * self.micro].tolist()

    def __len__(self) -> int:
        return self.steps - self.start


def _optimizer(detector: OpenVocabDetector, config: DetectorTrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in detector.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in ("background", "log_inv_temperature") else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _to_inputs(images: list[Any], targets: list[dict[str, Any]], device: torch.device) -> tuple[list, list]:
    xs = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    ts = [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device).float(), "labels": t["labels"].to(device)} for t in targets]
    return xs, ts


def train_detector(config: DetectorTrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a detector training run; returns a summary with the final detector directory."""
    from tqdm.auto import tqdm

    from ..factory import load
    from .coco import collate_detection

    rank, world, device = _init_distributed(config)  # type: ignore[arg-type]
    config.validate(world)
    out = Path(config.output_dir)
    checkpoint_path = out / CHECKPOINT_NAME
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    clip = load(config.clip, device=device)
    probe_config = DetectorConfig(clip=config.clip, **config.detector)
    dataset = build_dataset(config, probe_config.image_size)
    names = list(dataset.category_names)
    detector_config = dataclasses.replace(probe_config, seen_categories=tuple(names))
    detector = OpenVocabDetector(clip, detector_config).to(device)
    detector.set_vocabulary(names)
    micro = config.batch_size // (world * config.accum_steps)
    steps_per_epoch = len(dataset) // config.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"{config.train_data} has {len(dataset)} images, fewer than one batch of {config.batch_size}")
    total = config.max_steps or config.epochs * steps_per_epoch
    optimizer = _optimizer(detector, config)
    scheduler = _schedule(optimizer, config, total)  # type: ignore[arg-type]
    if config.precision == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 training needs a GPU; use precision bf16 on the CPU")
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    step = 0
    if resume and checkpoint_path.is_file():
        state = _load_checkpoint(checkpoint_path)
        try:
            detector.load_head_state_dict(state["detector"], source=str(checkpoint_path))
        except CheckpointError as e:
            raise TrainingError(f"cannot resume: {e} (was the detector config changed since the run started?)") from e
        step = restore_loop_state(state, optimizer, scheduler, scaler, checkpoint_path)
    elif resume:
        logger.info("no checkpoint in %s: starting from scratch", out)
    detector.train()
    ddp = torch.nn.parallel.DistributedDataParallel(detector) if world > 1 else detector
    metrics_path = out / "metrics.jsonl"
    eval_every = config.eval_every or steps_per_epoch
    summary: dict[str, Any] = {"skipped": dict(dataset.report)}
    bar = tqdm(total=total, initial=step, desc="train-detector", unit="step", disable=not config.progress or rank != 0)
    last_log, images_seen = time.perf_counter(), 0
    while step < total:
        epoch = step // steps_per_epoch
        sampler = _Batches(len(dataset), micro, rank, world, config.seed, epoch, step % steps_per_epoch)
        loader = DataLoader(_Seeded(dataset, config.seed, epoch), batch_sampler=sampler, num_workers=config.num_workers,
                            collate_fn=collate_detection, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(config.seed + epoch))  # fmt: skip
        batches = iter(loader)
        for _ in range(len(sampler) // config.accum_steps):
            if step >= total:
                break
            optimizer.zero_grad(set_to_none=True)
            parts: dict[str, float] = {}
            for _a in range(config.accum_steps):
                images, targets = next(batches)
                if not images:  # every image of the micro-batch failed to load (reported by the dataset)
                    continue
                xs, ts = _to_inputs(images, targets, device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    losses = ddp(xs, ts)
                loss = sum(losses.values()) / config.accum_steps
                (scaler.scale(loss) if scaler is not None else loss).backward()
                for k, v in losses.items():
                    parts[k] = parts.get(k, 0.0) + float(v.detach()) / config.accum_steps
                images_seen += len(images) * world
            value = sum(parts.values())
            if not parts:  # no image of this step could be read (each was reported by the dataset)
                logger.warning("step %d: no readable image in the batch; the step is skipped", step + 1)
                scheduler.step()
                step += 1
                bar.update(1)
                continue
            if not math.isfinite(value):
                raise TrainingError(
                    f"the loss became {value} at step {step + 1} ({parts}); stopping. The last good checkpoint is "
                    f"{checkpoint_path if checkpoint_path.exists() else 'none (no checkpoint written yet)'}; lower the "
                    "learning rate or use fp32"
                )
            if scaler is not None:
                scaler.unscale_(optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in detector.parameters() if p.requires_grad], config.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if rank == 0 and (step % config.log_every == 0 or step == total):
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "loss": round(value, 5), **{k: round(v, 5) for k, v in parts.items()},
                          "lr": scheduler.get_last_lr()[0], "images_per_s": round(images_seen / max(now - last_log, 1e-9), 2)}  # fmt: skip
                last_log, images_seen = now, 0
                bar.set_postfix(loss=f"{value:.3f}", ips=record["images_per_s"])
                _append(metrics_path, record)
            if rank == 0 and (step % config.save_every == 0 or step == total):
                _save_checkpoint(checkpoint_path, detector, optimizer, scheduler, scaler, step, config)
            if config.eval_data and rank == 0 and (step % eval_every == 0 or step == total):
                summary["eval"] = _evaluate(detector, config, metrics_path, step)
    bar.close()
    if world > 1:
        dist.barrier()
    detector.eval()
    if rank == 0:
        detector.save_pretrained(out / "detector")
    return {"steps": step, "detector_dir": str(out / "detector"), "checkpoint": str(checkpoint_path), **summary}


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _save_checkpoint(path: Path, detector: OpenVocabDetector, optimizer, scheduler, scaler, step: int,
                     config: DetectorTrainConfig) -> None:  # fmt: skip
    state = {
        "detector": detector.head_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": step,
        "rng": torch.get_rng_state(),
        "train_config": json.dumps(dataclasses.asdict(config), default=list),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _evaluate(detector: OpenVocabDetector, config: DetectorTrainConfig, metrics_path: Path, step: int) -> dict[str, Any]:
    from .inference import evaluate_detector

    was_training = detector.training
    metrics = evaluate_detector(detector, config.eval_data, config.eval_image_root, name_map=config.name_map,  # type: ignore[arg-type]
                                progress=False)  # fmt: skip
    detector.train(was_training)
    record = {"step": step, **{k: metrics[k] for k in ("AP", "AP50", "AP50_base", "AP50_novel", "AP50_all") if k in metrics}}
    logger.info("step %d: %s", step, record)
    _append(metrics_path, record)
    return record
