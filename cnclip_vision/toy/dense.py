"""How well a model's dense patch tokens are aligned with text, measured on the toy world's exact masks.

:func:`evaluate_dense_alignment` renders fresh detection scenes, takes the dense patch embeddings of each
:data:`~cnclip_vision.backbones.dense.DENSE_MODES` variant and scores every patch against the class
embeddings of all 64 categories: a patch counts when at least half of its pixels belong to one visible
object (:func:`~cnclip_vision.toy.world.object_map`), and it is right when its argmax class is that
object's. This is the figure behind the detector's ``dense`` branch: a region's pooled dense embedding can
only name the object if the tokens inside it do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from cnclip_vision.backbones.dense import DENSE_MODES, DenseMode, check_dense_mode
from cnclip_vision.models.clip import ChineseCLIP
from cnclip_vision.toy import world

__all__ = ["evaluate_dense_alignment", "evaluate_segmentation", "patch_targets", "scene_pixels"]

logger = logging.getLogger(__name__)


def scene_pixels(scenes: Sequence[world.Scene], model: ChineseCLIP) -> torch.Tensor:
    """CLIP-normalised ``[N, 3, S, S]`` float pixels of rendered scenes at their own size (no resize)."""
    from cnclip_vision.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    images = torch.from_numpy(np.stack([world.render_array(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return ((images - mean) / std).to(model.device)


def patch_targets(scene: world.Scene, patch: int) -> np.ndarray:
    """``[S/p, S/p]`` category id of the object covering at least half of each patch, -1 elsewhere."""
    objects = world.object_map(scene)
    cells = scene.size // patch
    grid = objects[: cells * patch, : cells * patch].reshape(cells, patch, cells, patch).transpose(0, 2, 1, 3)
    grid = grid.reshape(cells, cells, patch * patch)
    centre = grid[:, :, (patch // 2) * patch + patch // 2]
    share = (grid == centre[:, :, None]).mean(-1)
    ids = np.array([o.category_id for o in scene.objects] + [-1], dtype=np.int64)  # index -1 -> background
    return np.where((centre >= 0) & (share >= 0.5), ids[centre], -1)


@torch.no_grad()
def evaluate_dense_alignment(
    model: ChineseCLIP,
    *,
    modes: Iterable[DenseMode] = DENSE_MODES,
    n_images: int = 100,
    seed: int = 4242,
    image_size: int = 128,
    categories: Iterable[world.CategoryLike] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Patch-level accuracy per dense mode over ``n_images`` fresh scenes (``seed``) of ``image_size`` pixels
    with objects of ``categories`` (default: all), every patch scored against all 64 categories. Returns
    ``{"modes": {mode: {"patch_accuracy", "patches", "per_category_min"}}, ...}``."""
    from cnclip_vision.backbones.pyramid import dense_image_embeddings
    from cnclip_vision.zeroshot import class_embeddings

    modes = [check_dense_mode(m) for m in modes]
    patch = int(model.config.vision.patch_size)
    if image_size % patch:
        raise ValueError(f"image_size={image_size} must be a multiple of the patch size {patch}")
    was_training = model.training
    model.eval()
    try:
        names = [c.name for c in world.CATEGORIES]
        ids = torch.tensor([c.id for c in world.CATEGORIES])
        classes = class_embeddings(model, names, world.ZERO_SHOT_TEMPLATES).to(model.device)
        scenes = world.detection_scenes(n_images, seed, image_size=image_size, categories=categories)
        targets = torch.from_numpy(np.stack([patch_targets(s, patch) for s in scenes]))
        correct = {m: torch.zeros(len(names), dtype=torch.long) for m in modes}
        counts = torch.zeros(len(names), dtype=torch.long)
        index_of = {int(c): i for i, c in enumerate(ids)}
        for start in range(0, len(scenes), batch_size):
            pixels = scene_pixels(scenes[start : start + batch_size], model)
            target = targets[start : start + batch_size]
            valid = target >= 0
            rows = torch.tensor([index_of[int(t)] for t in target[valid]], dtype=torch.long)
            counts += torch.bincount(rows, minlength=len(names))
            for mode in modes:
                dense = dense_image_embeddings(model, pixels, normalize=True, dense_mode=mode).float()
                predicted = torch.einsum("ndhw,cd->nchw", dense, classes.float()).argmax(1).cpu()
                hit = predicted[valid] == rows
                correct[mode] += torch.bincount(rows[hit], minlength=len(names))
    finally:
        model.train(was_training)
    seen = counts > 0
    result: dict[str, Any] = {"n_images": n_images, "seed": seed, "image_size": image_size, "patch": patch}
    result["modes"] = {
        mode: {
            "patch_accuracy": round(float(correct[mode].sum()) / max(int(counts.sum()), 1), 4),
            "mean_class_accuracy": round(float((correct[mode][seen] / counts[seen]).mean()), 4),
            "patches": int(counts.sum()),
        }
        for mode in modes
    }
    for mode, r in result["modes"].items():
        logger.info("dense mode %-9s patch accuracy %.3f (%d patches)", mode, r["patch_accuracy"], r["patches"])
    return result


def evaluate_segmentation(
    model: ChineseCLIP,
    *,
    modes: Iterable[DenseMode] = DENSE_MODES,
    n_images: int = 50,
    seed: int = 4243,
    image_size: int = 128,
    background_threshold: float = 0.0,
    categories: Iterable[world.CategoryLike] | None = None,
) -> dict[str, Any]:
    """mIoU of :func:`cnclip_vision.segmentation.segment` with all 64 category names on fresh scenes, per dense
    mode, against the exact class maps (:func:`~cnclip_vision.toy.world.object_map`): IoU per category present
    in the ground truth, averaged; background pixels labelled as a class count against it. Also the pixel
    accuracy on object pixels."""
    from cnclip_vision.segmentation import segment

    names = [c.name for c in world.CATEGORIES]
    scenes = world.detection_scenes(n_images, seed, image_size=image_size, categories=categories)
    truths = []
    for scene in scenes:
        objects = world.object_map(scene)
        index = np.array([names.index(o.category.name) for o in scene.objects] + [-1])
        truths.append(np.where(objects >= 0, index[objects], -1))
    images = [world.render(s) for s in scenes]
    result: dict[str, Any] = {"n_images": n_images, "seed": seed, "image_size": image_size, "modes": {}}
    result["background_threshold"] = background_threshold
    for mode in modes:
        inter, union = np.zeros(len(names)), np.zeros(len(names))
        present = np.zeros(len(names), dtype=bool)
        hits = objects_total = 0
        for image, truth in zip(images, truths):
            (predicted,) = segment(
                model, [image], names, templates=world.ZERO_SHOT_TEMPLATES, dense_mode=mode,
                background_threshold=background_threshold,
            )  # fmt: skip
            pred = predicted.label_map.numpy()
            for c in np.unique(np.concatenate([truth[truth >= 0], pred[pred >= 0]])):
                t, p = truth == c, pred == c
                inter[c] += (t & p).sum()
                union[c] += (t | p).sum()
                present[c] |= bool(t.any())
            hits += int(((pred == truth) & (truth >= 0)).sum())
            objects_total += int((truth >= 0).sum())
        iou = inter[present] / np.maximum(union[present], 1)
        result["modes"][mode] = {
            "mIoU": round(float(iou.mean()), 4),
            "object_pixel_accuracy": round(hits / max(objects_total, 1), 4),
            "categories": int(present.sum()),
        }
        logger.info("segmentation, dense mode %-9s mIoU %.3f", mode, result["modes"][mode]["mIoU"])
    return result


# Patch accuracy of shipped models' dense tokens per dense mode (evaluate_dense_alignment, 100 scenes of
# 128 px, seed 4242; README): commands that draw dense maps say so when it is low.
MEASURED_PATCH_ACCURACY: dict[str, dict[str, float]] = {
    "toy-tiny": {"raw": 0.037, "maskclip": 0.095, "sclip": 0.051, "clearclip": 0.030, "naclip": 0.115},
    "toy-tiny-dense": {"raw": 0.474, "maskclip": 0.153, "sclip": 0.354, "clearclip": 0.131, "naclip": 0.225},
}


def alignment_note(model_name: str, dense_mode: str) -> tuple[str, str] | None:
    """``(log line, short Chinese line for pictures)`` when ``model_name``'s dense tokens in ``dense_mode`` are
    known to be poorly aligned with text (measured below 50% patch accuracy), or when raw tokens of another
    model are asked for; None otherwise."""
    measured = MEASURED_PATCH_ACCURACY.get(str(model_name), {}).get(dense_mode)
    if measured is not None and measured < 0.5:
        verdict = "this map is mostly noise" if measured < 0.2 else "many of its pixels are wrong"
        return (
            f"{model_name}'s dense tokens ({dense_mode}) name the right class for {measured:.0%} of patches on the "
            f"toy world (chance 1.6%): {verdict}",
            "稠密特征未对齐, 仅供参考",
        )
    if measured is None and dense_mode == "raw":
        return (
            "raw last-block tokens of CLIP ViTs are poorly aligned with text; --dense-mode naclip localises better",
            "raw 特征, 建议 --dense-mode naclip",
        )
    return None
