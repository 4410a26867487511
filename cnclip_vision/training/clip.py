"""Contrastive training and fine-tuning of Chinese-CLIP (the Python API under ``cnclip train``).

Symmetric InfoNCE with the learnable logit scale (clamped at ln 100); optional locked-image tuning;
gradient accumulation that keeps the *global* batch as the set of negatives (features of the other
micro-batches are cached, as in open_clip); gradient checkpointing; bf16 autocast on CPU, bf16/fp16 on GPU;
data-parallel training under ``torchrun`` with features gathered across ranks so the loss sees the global
batch. Duplicate captions (or, for the toy world, identical sets of classes) inside a batch are masked out of
each other's negatives.

The rest is :mod:`cnclip_vision.training.loop`'s: AdamW with warmup + cosine, checkpoints every
``save_every`` steps and exact ``resume=True``, the NaN guard (the run stops and keeps the last good
checkpoint), ``metrics.jsonl``, the progress bar; this module adds the model, the data and the step
(:class:`ClipTask`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

from cnclip_vision.models.clip import ChineseCLIP
from cnclip_vision.models.configs import CLIPConfig
from cnclip_vision.training.loop import (
    CHECKPOINT_NAME,
    Distributed,
    StepContext,
    StepOutput,
    TrainingError,
    TrainingTask,
    check_settings,
    read_recipe,
    run_training,
)

if TYPE_CHECKING:
    from cnclip_vision.data.datasets import CaptionDataset, OriginalLayoutDataset

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_NAME", "ClipTask", "TrainConfig", "TrainingError", "clip_loss", "train"]

MAX_LOGIT_SCALE = math.log(100.0)


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
        check_settings(self, world_size)


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
        from cnclip_vision.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

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

            x = TF.resize(
                x, [self.image_size, self.image_size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True
            )
        return (x - self.mean) / self.std, self.captions[index]


class _FileImagePairs(Dataset):
    """A file-backed dataset whose unreadable images are replaced by the next readable pair (and logged),
    so every rank sees batches of the same size."""

    def __init__(self, dataset: CaptionDataset | OriginalLayoutDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, index: int) -> int:
        return _text_key(self.dataset.caption(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        for step in range(len(self)):
            sample = self.dataset[(index + step) % len(self)]
            if sample.pixel_values is not None:
                return sample.pixel_values, sample.caption
            logger.warning("skipped training pair %d: %s", sample.index, sample.error)
        raise TrainingError("no readable image in the dataset")


def _text_key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _build_dataset(config: TrainConfig, image_size: int) -> _ArrayPairs | _FileImagePairs:
    spec = config.train_data
    if isinstance(spec, dict):
        if set(spec) != {"toyworld"}:
            raise TrainingError(f"train_data must be a path or {{'toyworld': {{...}}}}, got keys {sorted(spec)}")
        from cnclip_vision.toy import world as toyworld

        pairs = toyworld.generate_pairs(**spec["toyworld"])
        return _ArrayPairs(pairs.images, pairs.captions, toyworld.class_set_keys(pairs.class_sets).tolist(), image_size)
    from cnclip_vision.data.datasets import open_dataset
    from cnclip_vision.data.transforms import image_transform

    return _FileImagePairs(open_dataset(spec, image_transform(image_size), split=config.split))


# --------------------------------------------------------------------------------------- distributed
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
@runtime_checkable
class _FusedAttention(Protocol):
    """A timm attention layer: ``fused_attn`` switches it to ``F.scaled_dot_product_attention``."""

    fused_attn: bool


def _build_model(config: TrainConfig, device: torch.device) -> ChineseCLIP:
    from cnclip_vision.models.factory import create_model, load

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
        if isinstance(module, _FusedAttention):  # has a fused_attn attribute
            module.fused_attn = fused
    if config.lock_image:
        model.visual.requires_grad_(False)
        model.visual.eval()
    if config.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
        model.text.gradient_checkpointing_enable()
    return model


# ------------------------------------------------------------------------------------------ the task
def _collate(tokenizer: Any) -> Any:
    def collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.stack([x for x, _ in items])
        enc = tokenizer([c for _, c in items], warn_truncation=False)
        return pixels, enc["input_ids"], enc["attention_mask"]

    return collate


class ClipTask(TrainingTask):
    """Contrastive training of a :class:`~cnclip_vision.models.clip.ChineseCLIP` as a task of the loop."""

    def __init__(self, config: TrainConfig, env: Distributed) -> None:
        from cnclip_vision.data.tokenizer import get_tokenizer

        self.config = config
        if not isinstance(config.train_data, dict):  # a missing file or folder fails before the model loads
            from cnclip_vision.data.datasets import check_dataset_path

            check_dataset_path(config.train_data, split=config.split)
        self.model: ChineseCLIP = _build_model(config, env.device)
        dataset = _build_dataset(config, self.model.image_size)
        self.dataset = dataset
        keys = [dataset.key(i) for i in range(len(dataset))]
        self.keys = torch.tensor(keys, dtype=torch.int64)
        self.collate_fn = _collate(get_tokenizer())

    def train_step(self, micro_batches: list[Any], ctx: StepContext) -> StepOutput:
        """One step over ``accum_steps`` micro-batches whose features all act as negatives."""
        keys = self.keys[ctx.indices] if self.config.mask_duplicates else None
        world = ctx.env.world_size

        def forward(pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            device = ctx.env.device
            with ctx.autocast():
                o = ctx.model(pixels.to(device, non_blocking=True), ids.to(device), mask.to(device))
            return o.image_embeds.float(), o.text_embeds.float()

        if len(micro_batches) == 1:
            image, text = forward(*micro_batches[0])
            image, text = _gather(image, world, True), _gather(text, world, True)
            loss = clip_loss(image, text, self.model.logit_scale.exp(), keys)
            ctx.backward(loss)
        else:
            with torch.no_grad():
                cached = [tuple(_gather(t, world, False) for t in forward(*mb)) for mb in micro_batches]
            for a, mb in enumerate(micro_batches):
                with ctx.micro_batch(a):
                    image, text = forward(*mb)
                    image, text = _gather(image, world, True), _gather(text, world, True)
                    images = torch.cat([image if j == a else c[0] for j, c in enumerate(cached)])
                    texts = torch.cat([text if j == a else c[1] for j, c in enumerate(cached)])
                    scale = self.model.logit_scale.exp() if a == 0 else self.model.logit_scale.exp().detach()
                    loss = clip_loss(images, texts, scale, keys)
                    ctx.backward(loss)
        return StepOutput(float(loss.detach()), samples=self.config.batch_size)

    def after_optimizer_step(self, output: StepOutput) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        output.values["logit_scale"] = round(float(self.model.logit_scale.detach().exp()), 4)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "model_config": json.dumps(self.model.config.to_dict())}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        self.model.load_state_dict(state["model"])

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """Zero-shot top-1/top-5 on ``config.eval_zeroshot`` (at the end of each epoch)."""
        if not self.config.eval_zeroshot:
            return None
        from cnclip_vision.zeroshot import ZeroShotClassifier, evaluate_folder, read_label_file

        root = Path(self.config.eval_zeroshot)
        self.model.eval()
        labels = read_label_file(root / "label_cn.txt")
        report = evaluate_folder(
            ZeroShotClassifier(self.model, labels, templates=self.config.eval_templates),
            root,
            progress=False,
            num_workers=0,
        )
        self.model.train()
        if self.config.lock_image:
            self.model.visual.eval()
        logger.info("step %d: zero-shot top-1 %.4f, top-5 %.4f", step, report["top1"], report["top5"])
        return {"step": step, "zeroshot_top1": report["top1"], "zeroshot_top5": report["top5"]}

    def save(self, output_dir: Path) -> None:
        self.model.save_pretrained(output_dir / "model")
        logger.info("final model written to %s", output_dir / "model")


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary with the final model directory."""
    result = run_training(config, lambda env: ClipTask(config, env), resume=resume)
    out = Path(config.output_dir)
    summary: dict[str, Any] = {
        "steps": result.steps,
        "model_dir": str(out / "model"),
        "checkpoint": str(result.checkpoint),
    }
    if result.last_eval is not None:
        summary["zeroshot"] = result.last_eval
    return summary
