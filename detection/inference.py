"""Running the detector over a COCO-format dataset: COCO results and the OV-COCO evaluation."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.ops import box_convert

from cnclip_vision.backbones.dense import DenseMode
from cnclip_vision.detection.model import OpenVocabDetector
from cnclip_vision.detection.predictor import DetectionPredictor
from cnclip_vision.detection.vocabulary import VLMMode, Vocabulary
from cnclip_vision.errors import CNClipError

logger = logging.getLogger(__name__)

__all__ = ["CocoTargets", "coco_results", "detect_coco", "evaluate_detector"]

EVAL_SCORE_THRESHOLD = 0.001  # COCO evaluation keeps the 100 best detections per image above this


@torch.no_grad()
def detect_coco(
    detector: OpenVocabDetector,
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    name_map: Any = None,
    batch_size: int = 4,
    num_workers: int = 0,
    score_threshold: float = EVAL_SCORE_THRESHOLD,
    max_detections: int = 100,
    vlm_mode: VLMMode | None = None,
    dense_mode: DenseMode | None = None,
    vocabulary_transform: Callable[[Vocabulary], Vocabulary] | None = None,
    progress: bool = True,
    precision: str = "fp32",
) -> tuple[list[dict[str, Any]], Any]:
    """Detect every category of ``annotation_file`` (all scored together, the generalized OV protocol) in its
    images. Returns the COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``) and the
    dataset. Images that fail to load are reported and skipped, and listed in the dataset's ``skipped_images``
    (``{"missing": [ids], "unreadable": [ids]}``; counted in ``dataset.report`` too) so that no AP is computed
    over them unnoticed (:func:`evaluation_image_ids`). ``vocabulary_transform`` may replace the encoded
    vocabulary (ablations, e.g. random embeddings for some classes); ``vlm_mode`` / ``dense_mode`` override the
    detector's. ``precision``: as
    :class:`~cnclip_vision.detection.predictor.DetectionPredictor`'s."""
    from tqdm.auto import tqdm

    from cnclip_vision.detection.coco import CocoDetection

    dataset = CocoDetection(annotation_file, image_root, name_map=name_map, skip_crowd=False)
    predictor = DetectionPredictor(
        detector, score_threshold=score_threshold, max_detections=max_detections, vlm_mode=vlm_mode, precision=precision
    )
    vocabulary = predictor.set_vocabulary(list(dataset.category_names))
    if vocabulary_transform is not None:
        predictor.use_vocabulary(vocabulary_transform(vocabulary))
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    results: list[dict[str, Any]] = []
    evaluated: set[int] = set()
    device = detector.device
    for images, image_ids in tqdm(loader, desc="detect", unit="batch", disable=None if progress else True):
        if not images:
            continue
        evaluated.update(image_ids)
        xs = [im.as_subclass(torch.Tensor).to(device).float().div_(255) for im in images]
        for image_id, r in zip(image_ids, predictor.detect(xs, dense_mode=dense_mode)):
            results += coco_results(r, image_id, dataset.category_ids)
    skipped: dict[str, list[int]] = {"missing": [], "unreadable": []}
    for index, image_id in enumerate(dataset.image_ids):
        if int(image_id) not in evaluated:
            skipped["missing" if not dataset.image_path(index).is_file() else "unreadable"].append(int(image_id))
    dataset.skipped_images = skipped
    for kind, ids in skipped.items():
        if ids:
            dataset.report[f"images_{kind}"] = len(ids)
    return results, dataset


def coco_results(detections: dict[str, Any], image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One image's detections (``boxes`` xyxy, ``scores``, ``labels`` as label indices) as COCO results
    (``bbox`` ``[x, y, width, height]``, ``category_id = category_ids[label]``)."""
    boxes = box_convert(detections["boxes"].cpu(), "xyxy", "xywh")
    return [
        {"image_id": int(image_id), "category_id": int(category_ids[label]), "bbox": [round(v, 3) for v in box],
         "score": round(score, 5)}
        for box, score, label in zip(boxes.tolist(), detections["scores"].tolist(), detections["labels"].tolist())
    ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CocoTargets:
    """The ids COCO results for ``images`` need, taken from a ground-truth file: ``image_ids[i]`` of
    ``images[i]`` and ``category_ids[j]`` of ``labels[j]`` (the file's categories, Chinese names after
    ``name_map``, when no labels are given)."""

    image_ids: list[int]
    labels: list[str]
    category_ids: list[int]

    @classmethod
    def from_file(
        cls,
        annotation_file: str | os.PathLike[str],
        images: Sequence[str | os.PathLike[str]],
        labels: Sequence[str] | None = None,
        *,
        name_map: Any = None,
    ) -> CocoTargets:
        """Match each image to the ``images`` record whose ``file_name`` is the longest tail of its path
        (``val2017/1.jpg`` matches ``/data/coco/val2017/1.jpg``) and each label to a category by name,
        English name, synonym or id. Errors name the file and the image or label that has no match."""
        from cnclip_vision.detection.coco import (
            CocoFormatError,
            category_lookup,
            map_names,
            read_coco,
            resolve_categories,
            validate_coco,
        )

        source = str(annotation_file)
        coco, _ = validate_coco(read_coco(annotation_file), source=source)
        by_tail: dict[tuple[str, ...], int] = {}
        for record in coco["images"]:
            by_tail.setdefault(Path(record["file_name"]).parts, int(record["id"]))
        image_ids, unmatched = [], []
        for image in images:
            parts = Path(image).parts
            hit = next((by_tail[parts[k:]] for k in range(len(parts)) if parts[k:] in by_tail), None)
            (unmatched.append(str(image)) if hit is None else image_ids.append(hit))
        if unmatched:
            raise CocoFormatError(
                f"{source}: no image record has the file name of {len(unmatched)} of the {len(images)} images, "
                f"e.g. {unmatched[0]} (its file_name must be the end of the image's path)"
            )
        records = sorted(coco["categories"], key=lambda c: c["id"])
        names = map_names([c["name"] for c in records], name_map)
        if labels is None:
            return cls(image_ids, names, [int(c["id"]) for c in records])
        found, unknown = resolve_categories(list(labels), category_lookup(records, names), "labels")
        if unknown:
            known = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise CocoFormatError(f"{source}: labels {unknown} are not categories of the file (it has: {known})")
        return cls(image_ids, list(labels), found)


def evaluation_image_ids(dataset: Any, *, allow_missing: bool = False) -> tuple[list[int] | None, dict[str, Any]]:
    """Which images :func:`~cnclip_vision.detection.evaluation.evaluate_coco` may score after
    :func:`detect_coco`, and the counts to report beside the AP: every ground-truth image (``None``) when all
    were evaluated; otherwise an error naming what is missing, unless ``allow_missing``, which evaluates on
    the evaluated images only and says so."""
    skipped = getattr(dataset, "skipped_images", {"missing": [], "unreadable": []})
    missing, unreadable = skipped["missing"], skipped["unreadable"]
    total = len(dataset.image_ids)
    counts: dict[str, Any] = {
        "images_evaluated": total - len(missing) - len(unreadable),
        "images_missing": len(missing),
        "images_unreadable": len(unreadable),
    }
    if not missing and not unreadable:
        return None, counts
    skipped_ids = set(missing) | set(unreadable)
    first = next(i for i, image_id in enumerate(dataset.image_ids) if int(image_id) in skipped_ids)
    what = f"{len(missing)} missing, {len(unreadable)} unreadable, e.g. {dataset.image_path(first)}"
    if counts["images_evaluated"] == 0:
        raise CNClipError(f"none of the {total} ground-truth images could be read ({what}); check --image-root")
    if not allow_missing:
        raise CNClipError(
            f"{total - counts['images_evaluated']} of {total} ground-truth images were not evaluated ({what}): their "
            "objects would count as misses and lower AP; fix the images or --image-root, or pass --allow-missing "
            "to evaluate on the evaluated images only"
        )
    evaluated = sorted(set(map(int, dataset.image_ids)) - skipped_ids)
    counts["evaluated_on"] = f"the {len(evaluated)} evaluated images only (--allow-missing)"
    logger.warning("AP over %d of %d images: %s were not evaluated", len(evaluated), total, what)
    return evaluated, counts


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        item = self.dataset[i]
        return None if item is None else (item[0], int(item[1]["image_id"]))


def _collate(batch: list[Any]) -> tuple[list[Any], list[int]]:
    items = [b for b in batch if b is not None]
    return [b[0] for b in items], [b[1] for b in items]


def evaluate_detector(
    detector: OpenVocabDetector,
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    allow_missing: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`detect_coco` then :func:`~cnclip_vision.detection.evaluation.evaluate_coco` on the dataset's
    cleaned ground truth: AP, AP50, AP75, APs/m/l, per-category AP and AP50 on base / novel / all (from the
    categories' ``split`` field), and how many images were evaluated, missing and unreadable (an error when
    any was not evaluated, unless ``allow_missing``: see :func:`evaluation_image_ids`). ``output`` receives the
    COCO results JSON."""
    from cnclip_vision.detection.evaluation import evaluate_coco

    results, dataset = detect_coco(detector, annotation_file, image_root, **kwargs)
    image_ids, counts = evaluation_image_ids(dataset, allow_missing=allow_missing)
    return {**evaluate_coco(dataset.coco, results, output=output, image_ids=image_ids), **counts}
