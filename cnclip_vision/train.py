"""Contrastive training and fine-tuning of Chinese-CLIP (the Python API under ``cnclip train``).

Symmetric InfoNCE with the learnable logit scale (clamped at ln 100); optional locked-image tuning;
AdamW with linear warmup + cosine decay; gradient accumulation that keeps the *global* batch as the set
of negatives (features of the other micro-batches are cached, as in open_clip); gradient checkpointing;
bf16 autocast on CPU, bf16/fp16 on GPU; data-parallel training under ``torchrun`` (gloo on CPU, nccl on
GPU) with features gathered across ranks so the loss sees the global batch.

Checkpoints (model, optimizer, scheduler, RNG, data position) are written atomically every
``save_every`` steps and at the end; ``resume=True`` continues exactly. A NaN/inf loss stops the run
with a clear message and keeps the last good checkpoint. Duplicate captions (or, for the toy world,
identical sets of classes) inside a batch are masked out of each other's negatives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .configs import CLIPConfig
from .errors import CNClipError
from .model import ChineseCLIP
from .weights import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainingError", "clip_loss", "train"]

MAX_LOGIT_SCALE = math.log(100.0)
CHECKPOINT_NAME = "checkpoint.pt"


class TrainingError(CNClipError):
    """Training stopped (non-finite loss, bad configuration)."""


@dataclass
class TrainConfig:
    """Everything a run needs; ``TrainConfig.from_file(json)`` reads a recipe."""

    output_dir: str
    train_data: str | dict[str, Any]  # .jsonl / .tsv / original-layout folder, or {"toyworld": {...}}
    model: str | dict[str, Any] = "ViT-B-16"  # name or path to fine-tune, or {"config": {...}} for random init
    split: str = "train"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128  # global: summed over ranks and accumulation steps
    accum_steps: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: float = 0.05  # fraction of the steps (< 1) or a number of steps
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = None
    lock_image: bool = False
    grad_checkpointing: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 needs a GPU)
    fused_attention: bool | None = None  # None: off on CPU (the CPU backward of fused SDPA is slow)
    mask_duplicates: bool = True
    seed: int = 0
    num_workers: int = 2
    save_every: int = 500
    keep_checkpoints: bool = False  # also keep step_N.pt files besides checkpoint.pt
    log_every: int = 10
    eval_zeroshot: str | None = None  # ImageFolder tree with label_cn.txt, evaluated after each epoch
    eval_templates: str = "default"
    device: str | None = None
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        return read_recipe(cls, path, overrides, tuples=("betas",))

    def validate(self, world_size: int) -> None:
        validate_common(self, world_size)


def read_recipe(
    cls: type, path: str | os.PathLike[str], overrides: dict[str, Any], *, tuples: Sequence[str] = (), kind: str = "training"
) -> Any:
    """``cls(**recipe)`` from a JSON file, ``overrides`` (not None) winning; unknown keys name the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CNClipError(f"cannot read training config {path}: {e}") from e
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CNClipError(f"{path}: unknown {kind} options {unknown}; known: {sorted(known)}")
    for key in tuples:
        if key in data:
            data[key] = tuple(data[key])
    return cls(**data)


def validate_common(config: Any, world_size: int) -> None:
    """Checks every training config shares: batch split, precision, length."""
    if config.batch_size % (world_size * config.accum_steps):
        raise TrainingError(
            f"batch_size {config.batch_size} must be divisible by world size x accum_steps "
            f"= {world_size} x {config.accum_steps}"
        )
    if config.precision not in ("fp32", "bf16", "fp16"):
        raise TrainingError(f"precision must be fp32, bf16 or fp16, got {config.precision!r}")
    if config.epochs < 1 and not config.max_steps:
        raise TrainingError("give epochs >= 1 or max_steps")


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over normalised features; pairs with equal ``keys`` are not each other's negatives."""
    logits = logit_scale * image_features @ text_features.t()
    if keys is not None:
        same = keys[:, None] == keys[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


# ------------------------------------------------------------------------------------------------ data
class _ArrayPairs(Dataset):
    """In-memory uint8 images ``[N, H, W, 3]`` with captions (the toy world)."""

    def __init__(self, images: np.ndarray, captions: Sequence[str], keys: Sequence[int], image_size: int) -> None:
        self.images, self.captions, self.keys, self.image_size = images, list(captions), list(keys), image_size
        from .transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        self.mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.captions)

    def key(self, index: int) -> int:
        return self.keys[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        x = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(255)
        if x.shape[-1] != self.image_size:
            from torchvision.transforms.v2 import functional as TF

            x = TF.resize(x, [self.image_size, self.image_size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return (x - self.mean) / self.std, self.captions[index]


class _FileImagePairs(Dataset):
    """A file-backed dataset whose unreadable images are replaced by the next readable pair (and logged),
    so every rank sees batches of the same size."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def key(self, index: int) -> int:
        return _text_key(self.dataset.caption(index))  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        for step in range(len(self)):
            sample = self.dataset[(index + step) % len(self)]
            if sample.pixel_values is not None:
                return sample.pixel_values, sample.caption
            logger.warning("skipped training pair %d: %s", sample.index, sample.error)
        raise TrainingError("no readable image in the dataset")


def _text_key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _build_dataset(config: TrainConfig, image_size: int) -> Dataset:
    spec = config.train_data
    if isinstance(spec, dict):
        if set(spec) != {"toyworld"}:
            raise TrainingError(f"train_data must be a path or {{'toyworld': {{...}}}}, got keys {sorted(spec)}")
        from . import toyworld

        pairs = toyworld.generate_pairs(**spec["toyworld"])
        return _ArrayPairs(pairs.images, pairs.captions, toyworld.class_set_keys(pairs.class_sets).tolist(), image_size)
    from .datasets import open_dataset
    from .transforms import image_transform

    return _FileImagePairs(open_dataset(spec, image_transform(image_size), split=config.split))


class _StepBatches(torch.utils.data.Sampler[list[int]]):
    """This rank's micro-batches for every step of one epoch, from a seeded permutation, from a given step on."""

    def __init__(self, n: int, config: TrainConfig, rank: int, world: int, epoch: int, start_step: int) -> None:
        self.config, self.rank, self.world, self.start_step = config, rank, world, start_step
        self.steps = n // config.batch_size
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        self.order = torch.randperm(n, generator=generator)

    def global_batch(self, step_in_epoch: int) -> torch.Tensor:
        """Indices of the whole batch of a step, in the order the gathered features take."""
        return self.order[step_in_epoch * self.config.batch_size : (step_in_epoch + 1) * self.config.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.config.batch_size // (self.world * self.config.accum_steps)
        for step in range(self.start_step, self.steps):
            batch = self.global_batch(step).tolist()
            for a in range(self.config.accum_steps):  # micro-batch a of every rank, then the next one
                start = (a * self.world + self.rank) * micro
                yield batch[start : start + micro]

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.config.accum_steps


# --------------------------------------------------------------------------------------- distributed
def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if config.device:
        device = torch.device(config.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        logger.info("rank %d of %d (%s)", rank, world, backend)
    return rank, world, device


def _gather(x: torch.Tensor, world: int, grad: bool) -> torch.Tensor:
    if world == 1:
        return x
    if grad:
        import torch.distributed.nn.functional as dist_nn

        return torch.cat(dist_nn.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------ the model
def _build_model(config: TrainConfig, device: torch.device) -> ChineseCLIP:
    from .factory import create_model, load

    spec = config.model
    if isinstance(spec, dict):
        if "config" in spec:
            torch.manual_seed(config.seed)
            model = create_model(CLIPConfig.from_dict(spec["config"]))
        elif "arch" in spec:
            torch.manual_seed(config.seed)
            model = create_model(spec["arch"])
        else:
            raise TrainingError(f"model must be a name/path or {{'config': ...}} / {{'arch': ...}}, got {sorted(spec)}")
    else:
        model = load(spec)
    model = model.to(device).train()
    if config.fused_attention is None:
        fused = device.type != "cpu"
    else:
        fused = config.fused_attention
    for module in model.visual.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    if config.lock_image:
        model.visual.requires_grad_(False)
        model.visual.eval()
    if config.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
        model.text.gradient_checkpointing_enable()
    return model


def _optimizer(model: ChineseCLIP, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # no weight decay on gains, biases, embeddings of position/class and the logit scale (as CLIP)
        (no_decay if p.ndim < 2 or "embed" in name or "token" in name or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(config.warmup * total) if config.warmup < 1 else int(config.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, model: ChineseCLIP, optimizer, scheduler, scaler, step: int, epoch: int,
                     config: TrainConfig) -> None:  # fmt: skip
    state = {
        "model": model.state_dict(),
        "model_config": json.dumps(model.config.to_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": step,
        "epoch": epoch,
        "rng": torch.get_rng_state(),
        "train_config": json.dumps(dataclasses.asdict(config), default=list),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint is written atomically, so this is not a half-written file
        raise TrainingError(f"cannot read the training checkpoint {path}: {e}") from e


def restore_loop_state(state: dict[str, Any], optimizer, scheduler, scaler, path: Path) -> int:
    """Optimizer, scheduler, scaler and RNG from a checkpoint written by a training loop; returns its step."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    step = int(state["step"])
    logger.info("resumed from %s at step %d", path, step)
    return step


# ----------------------------------------------------------------------------------------- the loop
def _collate(tokenizer):
    def collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.stack([x for x, _ in items])
        enc = tokenizer([c for _, c in items], warn_truncation=False)
        return pixels, enc["input_ids"], enc["attention_mask"]

    return collate


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary with the final model directory."""
    from tqdm.auto import tqdm

    from .tokenizer import get_tokenizer

    rank, world, device = _init_distributed(config)
    config.validate(world)
    out = Path(config.output_dir)
    checkpoint_path = out / CHECKPOINT_NAME
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = _build_model(config, device)
    dataset = _build_dataset(config, model.image_size)
    steps_per_epoch = len(dataset) // config.batch_size  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise TrainingError(f"the dataset has {len(dataset)} pairs, fewer than one batch of {config.batch_size}")  # type: ignore[arg-type]
    total = config.max_steps or config.epochs * steps_per_epoch
    optimizer = _optimizer(model, config)
    scheduler = _schedule(optimizer, config, total)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    if config.precision == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 training needs a GPU; use precision bf16 on the CPU")
    step = 0
    if resume and checkpoint_path.is_file():
        state = _load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        step = restore_loop_state(state, optimizer, scheduler, scaler, checkpoint_path)
    elif resume:
        logger.info("no checkpoint in %s: starting from scratch", out)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    keys = torch.tensor([dataset.key(i) for i in range(len(dataset))], dtype=torch.int64)  # type: ignore[attr-defined,arg-type]
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    metrics_path = out / "metrics.jsonl"
    collate = _collate(get_tokenizer())

    def forward(pixels, ids, mask):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            o = ddp(pixels.to(device, non_blocking=True), ids.to(device), mask.to(device))
        return o.image_embeds.float(), o.text_embeds.float()

    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not config.progress or rank != 0)
    last_log, images_seen, summary = time.perf_counter(), 0, {}
    while step < total:
        epoch = step // steps_per_epoch
        sampler = _StepBatches(len(dataset), config, rank, world, epoch, step % steps_per_epoch)  # type: ignore[arg-type]
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers, collate_fn=collate,
                            pin_memory=device.type == "cuda", persistent_workers=False)  # fmt: skip
        batches = iter(loader)
        for _ in range(sampler.steps - sampler.start_step):
            if step >= total:
                break
            micro_batches = [next(batches) for _ in range(config.accum_steps)]
            batch_keys = keys[sampler.global_batch(step % steps_per_epoch)] if config.mask_duplicates else None
            loss = _train_step(ddp, model, forward, micro_batches, batch_keys, world, config, optimizer, scaler)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss} at step {step + 1}; stopping. The last good checkpoint is "
                    f"{checkpoint_path if checkpoint_path.exists() else 'none (no checkpoint written yet)'}; lower the "
                    "learning rate or use fp32/bf16"
                )
            scheduler.step()
            step += 1
            images_seen += config.batch_size
            bar.update(1)
            if rank == 0 and (step % config.log_every == 0 or step == total):
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0],
                          "logit_scale": round(float(model.logit_scale.detach().exp()), 4),
                          "images_per_s": round(images_seen / max(now - last_log, 1e-9), 1)}  # fmt: skip
                last_log, images_seen = now, 0
                bar.set_postfix(loss=f"{loss:.4f}", ips=record["images_per_s"])
                with metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            if rank == 0 and (step % config.save_every == 0 or step == total):
                _save_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, step, epoch, config)
                if config.keep_checkpoints:
                    _save_checkpoint(out / f"step_{step}.pt", model, optimizer, scheduler, scaler, step, epoch, config)
        if config.eval_zeroshot and rank == 0 and (step % steps_per_epoch == 0 or step == total):
            summary["zeroshot"] = _evaluate(model, config, metrics_path, step)
    bar.close()
    if world > 1:
        dist.barrier()
    model.eval()
    if rank == 0:
        model.save_pretrained(out / "model")
        logger.info("final model written to %s", out / "model")
    return {"steps": step, "model_dir": str(out / "model"), "checkpoint": str(checkpoint_path), **summary}


def _train_step(ddp, model, forward, micro_batches, keys, world, config, optimizer, scaler) -> float:
    """One optimizer step over ``accum_steps`` micro-batches whose features all act as negatives."""
    optimizer.zero_grad(set_to_none=True)
    if config.accum_steps == 1:
        image, text = forward(*micro_batches[0])
        image, text = _gather(image, world, True), _gather(text, world, True)
        loss = clip_loss(image, text, model.logit_scale.exp(), keys)
        _backward(loss, scaler)
    else:
        with torch.no_grad():
            cached = [tuple(_gather(t, world, False) for t in forward(*mb)) for mb in micro_batches]
        for a, mb in enumerate(micro_batches):
            sync = a == len(micro_batches) - 1
            context = ddp.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with context:
                image, text = forward(*mb)
                image, text = _gather(image, world, True), _gather(text, world, True)
                images = torch.cat([image if j == a else c[0] for j, c in enumerate(cached)])
                texts = torch.cat([text if j == a else c[1] for j, c in enumerate(cached)])
                scale = model.logit_scale.exp() if a == 0 else model.logit_scale.exp().detach()
                loss = clip_loss(images, texts, scale, keys)
                _backward(loss, scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return float(loss.detach())


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _evaluate(model: ChineseCLIP, config: TrainConfig, metrics_path: Path, step: int) -> dict[str, Any]:
    from .zeroshot import ZeroShotClassifier, evaluate_folder, read_label_file

    root = Path(config.eval_zeroshot)  # type: ignore[arg-type]
    model.eval()
    labels = read_label_file(root / "label_cn.txt")
    report = evaluate_folder(ZeroShotClassifier(model, labels, templates=config.eval_templates), root,
                             progress=False, num_workers=0)  # fmt: skip
    model.train()
    if config.lock_image:
        model.visual.eval()
    result = {"step": step, "zeroshot_top1": report["top1"], "zeroshot_top5": report["top5"]}
    logger.info("step %d: zero-shot top-1 %.4f, top-5 %.4f", step, report["top1"], report["top5"])
    with metrics_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return result
