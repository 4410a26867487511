"""Training of the open-vocabulary detector (the Python API under ``cnclip train-detector``).

Only the pyramid, the RPN and the region head learn (and the last ``trainable_layers`` tower blocks if
asked); the CLIP model stays frozen. Images get large-scale jitter (torchvision v2: flip, scale jitter,
crop/pad to ``image_size``), drawn from a seed per (epoch, image) so that a resumed run sees the same images.

The rest is :mod:`cnclip_vision.training.loop`'s: AdamW with warmup + cosine, gradient accumulation,
bf16/fp16 autocast, data parallel under ``torchrun``, atomic checkpoints every ``save_every`` steps, exact
resume, a NaN guard, a progress bar, ``metrics.jsonl`` and periodic evaluation; this module adds the
detector, the COCO data and the step (:class:`DetectorTask`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnclip_vision.detection.model import DetectorConfig, OpenVocabDetector
from cnclip_vision.errors import CheckpointError
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

if TYPE_CHECKING:
    from cnclip_vision.detection.coco import CocoDetection

logger = logging.getLogger(__name__)

__all__ = ["DetectorTask", "DetectorTrainConfig", "build_dataset", "train_detector"]


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
    eps: float = 1e-8
    warmup: float = 0.05  # a fraction of the steps (< 1) or a number of steps
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    scale_range: tuple[float, float] = (0.1, 2.0)  # large-scale jitter
    flip: bool = True
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 needs a GPU)
    seed: int = 0
    num_workers: int = 2
    save_every: int = 500
    keep_checkpoints: bool = False  # also keep step_N.pt files besides checkpoint.pt
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
        check_settings(self, world_size)
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


def build_dataset(config: DetectorTrainConfig, image_size: int) -> CocoDetection:
    """The training :class:`~cnclip_vision.detection.coco.CocoDetection` with large-scale jitter."""
    from cnclip_vision.detection.coco import CocoDetection, lsj_transforms

    probe = json.loads(Path(config.train_data).read_text(encoding="utf-8")) if config.categories == "base" else None
    categories = _categories(probe["categories"] if probe else [], config.categories)
    return CocoDetection(
        config.train_data,
        config.image_root,
        categories=categories,
        name_map=config.name_map,
        transforms=lsj_transforms(image_size, config.scale_range, flip=config.flip),
    )


def _to_inputs(images: list[Any], targets: list[dict[str, Any]], device: torch.device) -> tuple[list, list]:
    xs = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    ts = [
        {"boxes": t["boxes"].as_subclass(torch.Tensor).to(device).float(), "labels": t["labels"].to(device)}
        for t in targets
    ]
    return xs, ts


class DetectorTask(TrainingTask):
    """Training of an :class:`~cnclip_vision.detection.model.OpenVocabDetector` on a frozen CLIP as a task of the
    loop: the training file's categories are the vocabulary (and the detector's seen categories)."""

    label = "train-detector"
    random_items = True  # large-scale jitter
    dataset: CocoDetection

    def __init__(self, config: DetectorTrainConfig, env: Distributed) -> None:
        from cnclip_vision.detection.coco import collate_detection
        from cnclip_vision.models.factory import load

        self.config, self.device = config, env.device
        probe_config = DetectorConfig(clip=config.clip, **config.detector)
        self.dataset = build_dataset(config, probe_config.image_size)  # bad training data fails before the load
        if config.eval_data:  # not only at the end of the run, after the training time is spent
            from cnclip_vision.detection.coco import read_coco

            read_coco(config.eval_data)
        clip = load(config.clip, device=env.device)
        names = list(self.dataset.category_names)
        detector_config = dataclasses.replace(probe_config, seen_categories=tuple(names))
        self.model: OpenVocabDetector = OpenVocabDetector(clip, detector_config).to(env.device)
        self.vocabulary = self.model.encode_vocabulary(names)
        self.model.train()
        self.eval_every = config.eval_every
        self.collate_fn = collate_detection

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self.model.trainable_named_parameters()

    def train_step(self, micro_batches: list[Any], ctx: StepContext) -> StepOutput | None:
        """The summed detection losses of the micro-batches (each scaled by 1 / accum_steps); None when no image
        of the step could be read (each was reported by the dataset)."""
        parts: dict[str, float] = {}
        samples = 0
        for a, (images, targets) in enumerate(micro_batches):
            if not images:  # every image of the micro-batch failed to load
                continue
            xs, ts = _to_inputs(images, targets, self.device)
            with ctx.micro_batch(a):
                with ctx.autocast():
                    losses = ctx.model(xs, self.vocabulary, ts)
                ctx.backward(sum(losses.values()) / ctx.accum_steps)
            for k, v in losses.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / ctx.accum_steps
            samples += len(images) * ctx.env.world_size
        if not parts:
            return None
        return StepOutput(sum(parts.values()), samples=samples, values=parts)

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.model.head_state_dict()}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        try:
            self.model.load_head_state_dict(state["detector"], source=str(path))
        except CheckpointError as e:
            raise TrainingError(f"cannot resume: {e} (was the detector config changed since the run started?)") from e

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """COCO AP on ``config.eval_data`` (all of its categories scored together)."""
        if not self.config.eval_data:
            return None
        from cnclip_vision.detection.inference import evaluate_detector

        was_training = self.model.training
        metrics = evaluate_detector(
            self.model,
            self.config.eval_data,
            self.config.eval_image_root,
            name_map=self.config.name_map,
            progress=False,
        )
        self.model.train(was_training)
        keys = ("AP", "AP50", "AP50_base", "AP50_novel", "AP50_all")
        record = {"step": step, **{k: metrics[k] for k in keys if k in metrics}}
        logger.info("step %d: %s", step, record)
        return record

    def save(self, output_dir: Path) -> None:
        self.model.save_pretrained(output_dir / "detector")
        logger.info("final detector written to %s", output_dir / "detector")


def train_detector(config: DetectorTrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a detector training run; returns a summary with the final detector directory."""
    result = run_training(config, lambda env: DetectorTask(config, env), resume=resume)
    task = result.task
    if not isinstance(task, DetectorTask):  # run_training returns the task that the factory above built
        raise TypeError(f"expected a DetectorTask back from the training loop, got {type(task).__name__}")
    out = Path(config.output_dir)
    summary: dict[str, Any] = {
        "steps": result.steps,
        "detector_dir": str(out / "detector"),
        "checkpoint": str(result.checkpoint),
        "skipped": dict(task.dataset.report),
    }
    if result.last_eval is not None:
        summary["eval"] = result.last_eval
    return summary
