"""Running the detector over a COCO-format dataset: COCO results and the OV-COCO evaluation."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.ops import box_convert

from cnclip_vision.detection.model import OpenVocabDetector
from cnclip_vision.detection.predictor import DetectionPredictor
from cnclip_vision.detection.vocabulary import VLMMode, Vocabulary

logger = logging.getLogger(__name__)

__all__ = ["detect_coco", "evaluate_detector"]

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
    vocabulary_transform: Callable[[Vocabulary], Vocabulary] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], Any]:
    """Detect every category of ``annotation_file`` (all scored together, the generalized OV protocol) in its
    images. Returns the COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``) and the
    dataset. Images that fail to load are reported and skipped. ``vocabulary_transform`` may replace the
    encoded vocabulary (ablations, e.g. random embeddings for some classes)."""
    from tqdm.auto import tqdm

    from cnclip_vision.detection.coco import CocoDetection

    dataset = CocoDetection(annotation_file, image_root, name_map=name_map, skip_crowd=False)
    predictor = DetectionPredictor(
        detector, score_threshold=score_threshold, max_detections=max_detections, vlm_mode=vlm_mode
    )
    vocabulary = predictor.set_vocabulary(list(dataset.category_names))
    if vocabulary_transform is not None:
        predictor.use_vocabulary(vocabulary_transform(vocabulary))
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    results: list[dict[str, Any]] = []
    device = detector.device
    for images, image_ids in tqdm(loader, desc="detect", unit="batch", disable=not progress):
        if not images:
            continue
        xs = [im.as_subclass(torch.Tensor).to(device).float().div_(255) for im in images]
        for image_id, r in zip(image_ids, predictor.detect(xs)):
            boxes = box_convert(r["boxes"].cpu(), "xyxy", "xywh")
            for box, score, label in zip(boxes.tolist(), r["scores"].tolist(), r["labels"].tolist()):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": dataset.category_ids[label],
                        "bbox": [round(v, 3) for v in box],
                        "score": round(score, 5),
                    }
                )
    return results, dataset


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
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`detect_coco` then :func:`~cnclip_vision.detection.evaluation.evaluate_coco` on the dataset's
    cleaned ground truth: AP, AP50, AP75, APs/m/l, per-category AP and AP50 on base / novel / all (from the
    categories' ``split`` field). ``output`` receives the COCO results JSON."""
    from cnclip_vision.detection.evaluation import evaluate_coco

    results, dataset = detect_coco(detector, annotation_file, image_root, **kwargs)
    return evaluate_coco(dataset.coco, results, output=output)
