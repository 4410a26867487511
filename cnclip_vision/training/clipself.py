"""CLIPSelf self-distillation (Wu et al., ICLR 2024) as a task of the training loop: dense features that
localise, trained from images alone.

The student is a copy of the CLIP; its image tower's dense embeddings (the last block's projected patch
tokens, :func:`~cnclip_vision.backbones.pyramid.dense_image_embeddings`) are RoI-aligned over the cells of a
random ``m x n`` grid (``m, n`` drawn from 1..``max_split`` per image, the paper's patch-level variant) and
pulled, by cosine, to the frozen teacher's pooled embeddings of the same cells cropped and re-encoded at the
teacher's input size. With ``proposals`` (the paper's region-level variant) given boxes are distilled
beside the cells: the student's features over each box are pulled to the teacher's embedding of a square
crop around it with ``proposal_margin`` of context. No labels; the text tower is untouched (the student's
text weights are the teacher's), so the distilled model keeps the text side exactly. Everything else —
data order, DDP, AdamW, warmup + cosine, accumulation, autocast, checkpoints and exact resume — is the
shared loop's (:mod:`cnclip_vision.training.loop`).

>>> summary = train_clipself(CLIPSelfConfig.from_file("recipes/toy-clipself.json"))
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cnclip_vision.data.transforms import square_boxes
from cnclip_vision.models.clip import ChineseCLIP
from cnclip_vision.training.loop import (
    Distributed,
    StepContext,
    StepOutput,
    TrainingError,
    TrainingTask,
    check_settings,
    read_recipe,
    run_training,
)

__all__ = ["CLIPSelfConfig", "CLIPSelfTask", "grid_boxes", "train_clipself"]

logger = logging.getLogger(__name__)


@dataclass
class CLIPSelfConfig:
    """A CLIPSelf run; ``CLIPSelfConfig.from_file(json)`` reads a recipe (recipes/toy-clipself.json,
    recipes/clipself-vit-b-16-coco.json)."""

    output_dir: str
    train_data: str | dict[str, Any]  # a folder of images (searched recursively), or {"toyworld": {...}}
    model: str = "ViT-B-16"  # the teacher, and the student's starting point
    image_size: int = 1024  # the student's input side (square); the teacher sees crops at its own size
    max_split: int = 6  # grid of m x n cells, m and n uniform in 1..max_split per image
    trainable_layers: int | None = None  # train the last N blocks of the tower (None: the whole tower)
    # keep the pooled (class-token) path: the student's pooled embeddings of the whole image and of
    # ``pooled_crops`` of the cells per image pulled to the teacher's with this weight (0: dense loss only;
    # without it the toy model's zero-shot top-1 fell from 0.98 to 0.53)
    pooled_weight: float = 1.0
    pooled_crops: int = 4
    # region-level CLIPSelf: boxes distilled beside the grid cells, class-agnostic (no labels are read).
    # "toyworld": every toy object's box, what a class-agnostic proposal generator gives; or a COCO json
    # whose images' file_name are relative to train_data and whose annotations' bbox are the proposals;
    # None or "none": grid cells only
    proposals: str | None = None
    max_proposals: int = 8  # proposals distilled per image and step (a random subset of the image's)
    proposal_margin: float = 0.4  # the teacher's square crop: the box's long side * (1 + 2 * margin)
    # each region's student features RoI-aligned to region_bins x region_bins bins, every bin pulled to the
    # region's target (1: the region's mean, the paper; more asks each part of a region for its embedding)
    region_bins: int = 1
    epochs: int = 6
    max_steps: int | None = None
    batch_size: int = 16  # global
    accum_steps: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: float = 0.05
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = None
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = 2
    save_every: int = 500
    keep_checkpoints: bool = False
    log_every: int = 10
    device: str | None = None
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> CLIPSelfConfig:
        return read_recipe(cls, path, overrides, tuples=("betas",), kind="CLIPSelf")

    def validate(self, world_size: int) -> None:
        check_settings(self, world_size)
        numbers: list[tuple[str, tuple[type, ...], int, str]] = [
            *((name, (int,), 1, "a positive int") for name in ("image_size", "max_split", "region_bins")),
            *((name, (int,), 0, "an int >= 0") for name in ("pooled_crops", "max_proposals")),
            *((name, (int, float), 0, "a number >= 0") for name in ("pooled_weight", "proposal_margin")),
        ]
        for name, types, minimum, expected in numbers:
            value = getattr(self, name)
            is_number = isinstance(value, types) and not isinstance(value, bool)
            if not is_number or value < minimum:
                raise TrainingError(f"{name}={value!r}; expected {expected}")
        if self.proposals is not None and not isinstance(self.proposals, str):
            raise TrainingError(f"proposals={self.proposals!r}; expected null, 'none', 'toyworld' or a COCO json path")
        if self.proposals == "none":
            self.proposals = None
        if self.proposals == "toyworld" and not isinstance(self.train_data, dict):
            raise TrainingError(
                f"proposals='toyworld' needs train_data={{'toyworld': {{...}}}}, not the folder {self.train_data}: "
                "give proposals (--proposals) a COCO json of boxes for its images, or 'none' for grid cells only"
            )
        if self.proposals not in (None, "toyworld") and isinstance(self.train_data, dict):
            raise TrainingError(
                f"proposals={self.proposals!r} is a COCO json for a folder of images, but train_data is the toy "
                "world: use proposals 'toyworld' (its objects' boxes) or 'none'"
            )
        if self.trainable_layers is not None and (
            isinstance(self.trainable_layers, bool) or not isinstance(self.trainable_layers, int)
        ):
            raise TrainingError(f"trainable_layers={self.trainable_layers!r}; expected an int or null")


def grid_boxes(height: int, width: int, rows: int, cols: int) -> torch.Tensor:
    """``[rows * cols, 4]`` xyxy boxes of the cells of a ``rows x cols`` grid over a ``height x width`` image."""
    ys = torch.linspace(0, height, rows + 1)
    xs = torch.linspace(0, width, cols + 1)
    return torch.tensor(
        [[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(rows) for c in range(cols)], dtype=torch.float32
    )


class _Images(Dataset):
    """Square float images in 0..1 at ``size`` (``[3, size, size]``) from a folder or the toy world, each with
    its proposals (``[K, 4]`` xyxy at ``size``; ``K = 0`` without ``proposals``)."""

    def __init__(self, spec: str | dict[str, Any], size: int, proposals: str | None = None) -> None:
        self.size = size
        self.boxes: list[np.ndarray] | None = None  # per image, xyxy in the original image's pixels
        if isinstance(spec, dict):
            if set(spec) != {"toyworld"}:
                raise TrainingError(f"train_data must be a folder or {{'toyworld': {{...}}}}, got keys {sorted(spec)}")
            from cnclip_vision.toy import world

            options = {"n_images": 1000, "seed": 0, "image_size": size, **spec["toyworld"]}
            scenes = world.detection_scenes(options.pop("n_images"), options.pop("seed"), **options)
            self.arrays: list[np.ndarray] | None = [world.render_array(s) for s in scenes]
            self.paths: list[str] = []
            if proposals == "toyworld":
                self.boxes = [np.array([o.box for o in s.objects], np.float32).reshape(-1, 4) for s in scenes]
        else:
            from cnclip_vision.data.images import list_images

            root = Path(spec)
            if not root.is_dir():
                raise TrainingError(f"train_data {spec} is not a folder of images")
            self.paths = [str(p) for p in list_images(root)]  # none: CNClipError naming the folder
            self.arrays = None
            if proposals is not None:
                self.boxes = _coco_proposals(proposals, root, self.paths)

    def __len__(self) -> int:
        return len(self.arrays) if self.arrays is not None else len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The image and its proposals, or None (logged) when it cannot be read: the step trains on the
        others."""
        from PIL import Image

        from cnclip_vision.data.transforms import load_image
        from cnclip_vision.errors import ImageLoadError

        if self.arrays is not None:
            picture = Image.fromarray(self.arrays[index])
        else:
            try:
                picture = load_image(self.paths[index])
            except (ImageLoadError, OSError) as e:
                logger.warning("skipped unreadable image %s: %s", self.paths[index], e)
                return None
        width, height = picture.size
        if picture.size != (self.size, self.size):
            picture = picture.resize((self.size, self.size), Image.Resampling.BICUBIC)
        boxes = torch.zeros(0, 4)
        if self.boxes is not None:
            scale = torch.tensor([self.size / width, self.size / height] * 2)
            boxes = torch.from_numpy(self.boxes[index]) * scale
        return torch.from_numpy(np.array(picture, dtype=np.float32)).permute(2, 0, 1) / 255, boxes


def _coco_proposals(path: str, root: Path, images: list[str]) -> list[np.ndarray]:
    """Each image's boxes (xyxy pixels) from a COCO json's ``annotations[].bbox`` (xywh), matched on
    ``images[].file_name`` relative to ``root``; categories are not read."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        names = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        by_name: dict[str, list[list[float]]] = {name: [] for name in names.values()}
        for a in data["annotations"]:
            x, y, w, h = (float(v) for v in a["bbox"])
            if w > 0 and h > 0:
                by_name[names[int(a["image_id"])]].append([x, y, x + w, y + h])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainingError(
            f"proposals {path}: expected a COCO json (images[].id/file_name, annotations[].image_id/bbox): {e!r}"
        ) from e
    relative = [Path(p).relative_to(root).as_posix() for p in images]
    found = sum(name in by_name for name in relative)
    if not found:
        raise TrainingError(f"proposals {path}: none of its file_name values is an image under {root}")
    logger.info("proposals %s: boxes for %d of %d images", path, found, len(images))
    return [np.array(by_name.get(name, []), np.float32).reshape(-1, 4) for name in relative]


class _DenseStudent(nn.Module):
    """``pixels`` (CLIP-normalised) → the student's dense embeddings ``[N, D, h, w]`` and its normalised pooled
    embeddings of ``crops`` (at the CLIP's input size; None: not computed): the one module DDP wraps."""

    def __init__(self, clip: ChineseCLIP) -> None:
        super().__init__()
        self.clip = clip

    def forward(
        self, pixels: torch.Tensor, crops: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from cnclip_vision.backbones.pyramid import dense_image_embeddings

        dense = dense_image_embeddings(self.clip, pixels, normalize=False)
        pooled = self.clip.encode_image(crops, normalize=True) if crops is not None else None
        return dense, pooled


def _normalise(images: torch.Tensor) -> torch.Tensor:
    from cnclip_vision.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean = torch.tensor(OPENAI_CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class CLIPSelfTask(TrainingTask):
    """CLIPSelf distillation of a :class:`ChineseCLIP`'s image tower as a task of the loop."""

    label = "clipself"

    def __init__(self, config: CLIPSelfConfig, env: Distributed) -> None:
        from cnclip_vision.models.factory import load

        self.config = config
        # bad data fails before the model loads
        self.dataset = _Images(config.train_data, config.image_size, config.proposals)
        self.collate_fn = _stack_readable
        teacher = load(config.model, device=env.device).eval()
        if teacher.config.vision.kind != "vit":
            raise TrainingError("CLIPSelf needs a ViT image tower; RN50 has no patch tokens")
        patch = teacher.config.vision.patch_size
        if config.image_size % patch:
            raise TrainingError(f"image_size={config.image_size} must be a multiple of the patch size {patch}")
        teacher.requires_grad_(False)
        self.teacher = teacher
        student = copy.deepcopy(teacher)
        layers = teacher.config.vision.layers
        depth = layers if isinstance(layers, int) else len(layers)
        n = depth if config.trainable_layers is None else min(config.trainable_layers, depth)
        for name, p in student.named_parameters():
            p.requires_grad = name.startswith("visual.") and (
                config.trainable_layers is None or _in_last_blocks(name, depth, n)
            )
        self.student = student.train()
        self.skipped = 0  # unreadable images so far (this process)
        self.model = _DenseStudent(student)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def _crops(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Every box of every image cropped and resized to the teacher's input size."""
        from torchvision.ops import roi_align

        rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
        size = self.teacher.image_size
        return roi_align(images, rois.to(images), output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)

    @torch.no_grad()
    def _teacher(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.teacher.encode_image(c, normalize=True).float() for c in crops.split(256)])

    def _pooled_rows(self, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Rows of the crops whose pooled path is kept: each image's whole-image box and up to
        ``pooled_crops`` random cells (the loop's RNG)."""
        rows, start = [], 0
        for b in boxes:
            rows.append(torch.tensor([start]))  # the whole image (appended first, below)
            cells = torch.randperm(len(b) - 1)[: self.config.pooled_crops] + start + 1
            rows.append(cells)
            start += len(b)
        return torch.cat(rows)

    def train_step(self, micro_batches: list[Any], ctx: StepContext) -> StepOutput | None:
        from torchvision.ops import roi_align

        self.skipped += sum(skipped for *_, skipped in micro_batches)
        if all(images is None for images, *_ in micro_batches):
            return None  # nothing readable in the step (counted as skipped by the loop)
        total = 0.0
        for a, (images, proposals, _) in enumerate(micro_batches):
            if images is None:
                continue
            images = _normalise(images.to(ctx.env.device, non_blocking=True))
            size = images.shape[-1]
            splits = torch.randint(1, self.config.max_split + 1, (len(images), 2))  # the loop's RNG: resumable
            whole = torch.tensor([[0.0, 0.0, size, size]])
            grids = [grid_boxes(size, size, int(r), int(c)) for r, c in splits]
            k = self.config.max_proposals
            drawn = [p[torch.randperm(len(p))[:k]] if len(p) else p for p in proposals]
            cells = [torch.cat([g, p]) for g, p in zip(grids, drawn)]  # the student's regions
            # the teacher's crops: row 0 of each image the whole image, then the cells, then the proposals
            # with context
            margin = self.config.proposal_margin
            boxes = [torch.cat([whole, g, square_boxes(p, margin)]) for g, p in zip(grids, drawn)]
            crops = self._crops(images, boxes)
            targets = self._teacher(crops)
            keep = self._pooled_rows(boxes) if self.config.pooled_weight > 0 else None
            dense_rows = torch.cat([torch.arange(1, len(b)) + sum(map(len, boxes[:i])) for i, b in enumerate(boxes)])
            with ctx.micro_batch(a), ctx.autocast():
                dense, pooled = ctx.model(images, crops[keep] if keep is not None else None)
                stride = size / dense.shape[-1]
                bins = roi_align(
                    dense.float(), [b.to(images) for b in cells], output_size=self.config.region_bins,
                    spatial_scale=1 / stride, sampling_ratio=-1, aligned=True,
                )  # fmt: skip
                regions = bins.flatten(2).transpose(1, 2)  # [regions, bins * bins, D]
                loss = (1 - F.cosine_similarity(regions, targets[dense_rows][:, None], dim=-1)).mean()
                if pooled is not None and keep is not None:
                    kept = (1 - F.cosine_similarity(pooled.float(), targets[keep], dim=-1)).mean()
                    loss = loss + self.config.pooled_weight * kept
                loss = loss / len(micro_batches)
                ctx.backward(loss)
            total += float(loss.detach())
        output = StepOutput(total, samples=self.config.batch_size)
        output.values["skipped_images"] = self.skipped
        return output

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.student.state_dict(), "model_config": json.dumps(self.student.config.to_dict())}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        self.student.load_state_dict(state["model"])

    def save(self, output_dir: Path) -> None:
        self.student.save_pretrained(output_dir / "model")
        logger.info("distilled model written to %s", output_dir / "model")


def _stack_readable(
    items: list[tuple[torch.Tensor, torch.Tensor] | None],
) -> tuple[torch.Tensor | None, list[torch.Tensor], int]:
    """The readable images of a micro-batch stacked (None when there is none), their proposals and how many
    images were not readable."""
    readable = [x for x in items if x is not None]
    images = torch.stack([image for image, _ in readable]) if readable else None
    return images, [boxes for _, boxes in readable], len(items) - len(readable)


def _in_last_blocks(name: str, depth: int, n: int) -> bool:
    """Whether parameter ``name`` of the student belongs to the last ``n`` tower blocks or what follows them."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "blocks":
        return int(parts[2]) >= depth - n
    return parts[1] in ("norm", "head")


def train_clipself(config: CLIPSelfConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a CLIPSelf run; returns a summary with the distilled model's directory."""
    result = run_training(config, lambda env: CLIPSelfTask(config, env), resume=resume)
    out = Path(config.output_dir)
    return {"steps": result.steps, "model_dir": str(out / "model"), "checkpoint": str(result.checkpoint)}
