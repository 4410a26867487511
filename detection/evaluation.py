"""COCO box evaluation with pycocotools, guarded against its pitfalls, plus the OV-COCO base/novel AP50.

All figures are fractions in [0, 1], computed from ``COCOeval.eval["precision"]`` exactly as
``COCOeval.summarize`` does (so they equal ``COCOeval.stats`` at the default maxDets 100). A figure with
nothing to measure (no ground-truth box in that class / split / area range) is ``-1.0``, pycocotools'
own convention; an empty result list gives 0.0 wherever there is ground truth.

Pitfalls handled (DESIGN.md §6): ``loadRes([])`` raises (we evaluate an empty detection set instead); a
ground truth without ``"info"`` raises in ``loadRes`` (added); ground-truth annotations without ``area``
/ ``iscrowd`` crash ``evaluate`` (filled in: box area, 0); ``summarize`` hard-codes maxDets 100 (we read
the precision array at the configured ``max_dets``); pycocotools prints to stdout (captured and logged at
debug level, so ``cnclip eval-coco`` prints only JSON); ``loadRes`` mutates its input (we pass copies).
Results whose image id or category id is not in the ground truth are an error naming the ids: silently
dropping them would hide an evaluation on the wrong split or a label/id mix-up.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

from cnclip_vision.detection.coco import (
    CocoFormatError,
    category_lookup,
    check_coco_structure,
    read_coco,
    resolve_categories,
)
from cnclip_vision.io import atomic_write

__all__ = ["COCOEvaluator", "evaluate_coco", "read_results"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
UNDEFINED = -1.0  # pycocotools' value for "no ground truth to measure against"


def read_results(results: Sequence[Mapping[str, Any]] | PathLike) -> tuple[list[dict[str, Any]], str]:
    """Check COCO detection results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``
    (a list or a JSON file) and return clean copies plus a name for messages."""
    if isinstance(results, (str, os.PathLike)):
        source = str(results)
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CocoFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(data, list):
            raise CocoFormatError(f"{path}: expected a JSON list of detections, got {type(data).__name__}")
    else:
        source, data = "results", results
        if isinstance(data, Mapping) or not isinstance(data, Sequence):
            raise TypeError(f"results must be a list of detection dicts or a JSON file, got {type(data).__name__}")
    clean = []
    for i, r in enumerate(data):
        if not isinstance(r, Mapping):
            raise CocoFormatError(f"{source}: results[{i}] must be an object, got {type(r).__name__}")
        if "detections" in r and "image" in r:
            raise CocoFormatError(
                f"{source} holds `cnclip detect` records (one per image), not COCO results; write COCO results "
                "with `cnclip detect IMAGES --format coco --annotations GROUND_TRUTH.json -o RESULTS.json`"
            )
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in r:
                raise CocoFormatError(f"{source}: results[{i}] has no {key!r}")
        for key in ("image_id", "category_id"):
            if not isinstance(r[key], numbers.Integral) or isinstance(r[key], bool):
                raise CocoFormatError(f"{source}: results[{i}][{key!r}] must be an integer, got {r[key]!r}")
        box = r["bbox"]
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(map(_finite, box)):
            raise CocoFormatError(
                f"{source}: results[{i}]['bbox'] must be [x, y, width, height] (4 finite numbers), got {box!r}"
            )
        if box[2] < 0 or box[3] < 0:
            raise CocoFormatError(
                f"{source}: results[{i}]['bbox'] {list(box)} has a negative width or height; COCO "
                "boxes are [x, y, width, height], not [x1, y1, x2, y2]"
            )
        if not _finite(r["score"]):
            raise CocoFormatError(f"{source}: results[{i}]['score'] must be a finite number, got {r['score']!r}")
        clean.append(
            {
                "image_id": int(r["image_id"]),
                "category_id": int(r["category_id"]),
                "bbox": [float(v) for v in box],
                "score": float(r["score"]),
            }
        )
    return clean, source


def _finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _load_ground_truth(ground_truth: Mapping[str, Any] | PathLike) -> tuple[dict[str, Any], str]:
    """A checked copy of the ground truth with ``info``, ``area`` and ``iscrowd`` filled in."""
    if isinstance(ground_truth, (str, os.PathLike)):
        source, data = str(ground_truth), read_coco(ground_truth)
    elif isinstance(ground_truth, Mapping):
        source, data = "ground truth", dict(ground_truth)
    else:
        raise TypeError(f"ground_truth must be a COCO dict or a JSON file, got {type(ground_truth).__name__}")
    check_coco_structure(data, source=source)
    gt = dict(data)
    gt["info"] = data.get("info") or {"description": "added by cnclip_vision (pycocotools needs it)"}
    gt["annotations"] = [
        {**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]), "iscrowd": int(a.get("iscrowd", 0))}
        for a in data["annotations"]
    ]
    gt["images"], gt["categories"] = list(data["images"]), list(data["categories"])
    return gt, source


def _resolve_split(
    keys: Iterable[int | str], categories: Sequence[Mapping[str, Any]], what: str, source: str
) -> list[int]:
    ids, unknown = resolve_categories(keys, category_lookup(categories), what)
    if unknown:
        raise CocoFormatError(f"{source}: {what} categories {unknown} are not in the ground truth")
    return sorted(set(ids))


def _mean(s: np.ndarray) -> float:
    s = s[s > -1]
    return float(np.mean(s)) if s.size else UNDEFINED


def evaluate_coco(
    ground_truth: Mapping[str, Any] | PathLike,
    results: Sequence[Mapping[str, Any]] | PathLike,
    *,
    output: PathLike | None = None,
    novel: Iterable[int | str] | None = None,
    base: Iterable[int | str] | None = None,
    iou_type: str = "bbox",
    image_ids: Iterable[int] | None = None,
    max_dets: int = 100,
) -> dict[str, Any]:
    """COCO box AP of ``results`` against ``ground_truth`` (dicts or JSON files), with pycocotools.

    Returns ``AP`` (IoU .50:.95), ``AP50``, ``AP75``, ``APs``/``APm``/``APl``, ``AR`` (at ``max_dets``),
    ``per_category`` / ``AP50_per_category`` (``{name: AP}``, names from the ground truth),
    ``AP50_base`` / ``AP50_novel`` / ``AP50_all`` (mean over the split's classes of
    ``precision[IoU .5, :, k, all areas, max_dets]`` ignoring classes without ground truth; "all" is
    base + novel, or every class when no split is known), ``AP_base`` / ``AP_novel``, and
    ``num_images``, ``num_detections``, ``num_categories``, ``num_base``, ``num_novel``, ``max_dets``.
    ``-1.0`` marks a figure with no ground truth behind it (see the module docstring).

    ``novel`` / ``base``: category ids or names; by default from each category's ``"split"`` field.
    ``max_dets``: detections kept per image and class (pycocotools truncates per image *and* category).
    ``image_ids``: evaluate only these images (default: every ground-truth image; images without
    detections count as misses). ``output``: also write the checked results (COCO JSON) there,
    atomically. Only ``iou_type="bbox"`` is supported.
    """
    if iou_type != "bbox":
        raise ValueError(f"iou_type {iou_type!r} is not supported; only 'bbox' is")
    if not isinstance(max_dets, int) or max_dets < 1:
        raise ValueError(f"max_dets must be a positive integer, got {max_dets!r}")
    gt, gt_source = _load_ground_truth(ground_truth)
    dets, source = read_results(results)
    gt_images = {img["id"] for img in gt["images"]}
    gt_categories = {c["id"] for c in gt["categories"]}
    for key, known, what in (("image_id", gt_images, "image"), ("category_id", gt_categories, "category")):
        unknown = sorted({d[key] for d in dets} - known)
        if unknown:
            n = sum(d[key] in unknown for d in dets)
            raise CocoFormatError(
                f"{source}: {n} detections have {what} ids that are not in {gt_source}: "
                f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
            )
    _check_box_format(dets, gt, source)
    if image_ids is not None:
        image_ids = sorted(set(image_ids))
        if not image_ids:
            raise ValueError("image_ids is empty: nothing to evaluate")
        missing = sorted(set(image_ids) - gt_images)
        if missing:
            raise CocoFormatError(f"image_ids {missing[:10]} are not in {gt_source}")
        selected = set(image_ids)
        outside = sum(d["image_id"] not in selected for d in dets)
        if outside:
            logger.warning("%d detections are on images outside image_ids and are not evaluated", outside)
    scored = set(image_ids) if image_ids is not None else gt_images
    bare = len(scored - {d["image_id"] for d in dets})
    if bare and dets:
        logger.warning(
            "%d of %d evaluated images have no detection in %s: their objects count as misses (if those images "
            "were not run, evaluate only the ones that were)",
            bare,
            len(scored),
            source,
        )
    if output is not None:
        with atomic_write(output) as tmp:
            tmp.write_text(json.dumps(dets, ensure_ascii=False), encoding="utf-8")
        logger.info("wrote %d detections to %s", len(dets), output)

    splits = {
        name: _resolve_split(keys, gt["categories"], name, gt_source)
        if keys is not None
        else sorted(c["id"] for c in gt["categories"] if c.get("split") == name)
        for name, keys in (("base", base), ("novel", novel))
    }
    overlap = set(splits["base"]) & set(splits["novel"])
    if overlap:
        raise ValueError(f"categories {sorted(overlap)} are both base and novel")

    coco_eval = _run_cocoeval(gt, dets, image_ids, max_dets)
    return _metrics(coco_eval, gt, splits, len(dets), max_dets)


def _check_box_format(dets: list[dict[str, Any]], gt: dict[str, Any], source: str) -> None:
    """Refuse results whose boxes look like ``[x1, y1, x2, y2]``: many of them (over a quarter) run past their
    image when read as ``[x, y, width, height]``; a correct detector's boxes lie inside it, up to rounding."""
    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in gt["images"]}
    checked = past = 0
    for d in dets:
        width, height = sizes.get(d["image_id"], (None, None))
        if not width or not height:
            continue
        x, y, w, h = d["bbox"]
        checked += 1
        past += x + w > width * 1.02 + 1 or y + h > height * 1.02 + 1
    if checked >= 4 and past > 0.25 * checked:
        raise CocoFormatError(
            f"{source}: {past} of {checked} boxes run past their image when read as [x, y, width, height]: they "
            "look like [x1, y1, x2, y2]; COCO results are [x, y, width, height] (convert with "
            "torchvision.ops.box_convert(boxes, 'xyxy', 'xywh'))"
        )


def _run_cocoeval(gt: dict[str, Any], dets: list[dict[str, Any]], image_ids: list[int] | None, max_dets: int) -> Any:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes([dict(d) for d in dets])
        else:  # loadRes([]) raises: an empty detection set over the same images and categories
            coco_dt = COCO()
            coco_dt.dataset = {
                "info": gt["info"],
                "images": gt["images"],
                "categories": gt["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.maxDets = sorted({1, 10, max_dets})
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    logger.debug("pycocotools: %s", captured.getvalue().strip())
    return coco_eval


def _metrics(
    coco_eval: Any, gt: dict[str, Any], splits: dict[str, list[int]], n_dets: int, max_dets: int
) -> dict[str, Any]:
    p = coco_eval.params
    precision = coco_eval.eval["precision"]  # [T IoUs, R recall points, K classes, A areas, M maxDets]
    recall = coco_eval.eval["recall"]  # [T, K, A, M]
    m = [p.maxDets.index(max_dets)]
    t50, t75 = (np.where(p.iouThrs == v)[0] for v in (0.5, 0.75))
    area = {label: [i] for i, label in enumerate(p.areaRngLbl)}

    def ap(t: np.ndarray | None = None, a: str = "all", k: Sequence[int] | None = None) -> float:
        s = precision if t is None else precision[t]
        if k is not None:
            s = s[:, :, k]
        return _mean(s[:, :, :, area[a], m])  # the slicing of COCOeval.summarize

    k_of = {cid: i for i, cid in enumerate(p.catIds)}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    label = {cid: (n if counts[n] == 1 else f"{n} ({cid})") for cid, n in names.items()}
    all_ids = sorted(set(splits["base"]) | set(splits["novel"])) or list(p.catIds)
    out: dict[str, Any] = {
        "AP": ap(),
        "AP50": ap(t50),
        "AP75": ap(t75),
        "APs": ap(a="small"),
        "APm": ap(a="medium"),
        "APl": ap(a="large"),
        "AR": _mean(recall[:, :, area["all"], m]),
        "AP50_base": ap(t50, k=[k_of[c] for c in splits["base"]]) if splits["base"] else UNDEFINED,
        "AP50_novel": ap(t50, k=[k_of[c] for c in splits["novel"]]) if splits["novel"] else UNDEFINED,
        "AP50_all": ap(t50, k=[k_of[c] for c in all_ids]),
        "AP_base": ap(k=[k_of[c] for c in splits["base"]]) if splits["base"] else UNDEFINED,
        "AP_novel": ap(k=[k_of[c] for c in splits["novel"]]) if splits["novel"] else UNDEFINED,
        "per_category": {label[c]: ap(k=[k_of[c]]) for c in p.catIds},
        "AP50_per_category": {label[c]: ap(t50, k=[k_of[c]]) for c in p.catIds},
        "num_images": len(p.imgIds),
        "num_detections": n_dets,
        "num_categories": len(p.catIds),
        "num_base": len(splits["base"]),
        "num_novel": len(splits["novel"]),
        "max_dets": max_dets,
    }
    logger.info(
        "AP %.4f  AP50 %.4f  AP50 base %.4f  novel %.4f  (%d images, %d detections)",
        out["AP"],
        out["AP50"],
        out["AP50_base"],
        out["AP50_novel"],
        out["num_images"],
        n_dets,
    )
    return out


class COCOEvaluator:
    """detectron2-style evaluator: ``reset()``, ``process(image_ids, predictions)`` per batch, then
    ``evaluate()``.

    ``predictions[i]`` is the detector's output for image ``image_ids[i]``: ``{"boxes": [N, 4] xyxy in
    pixels of the original image, "scores": [N], "labels": [N] label indices into category_ids}``.
    ``category_ids`` default to the ground truth's ids sorted (the label order of :class:`CocoDetection`).
    Evaluation covers the images passed to ``process`` (as detectron2 does), so a partial run is scored on
    what was run; ``novel`` / ``base`` / ``max_dets`` are passed to :func:`evaluate_coco`.
    """

    def __init__(
        self,
        ground_truth: Mapping[str, Any] | PathLike,
        category_ids: Sequence[int] | None = None,
        *,
        novel: Iterable[int | str] | None = None,
        base: Iterable[int | str] | None = None,
        max_dets: int = 100,
    ) -> None:
        self.ground_truth, self._source = _load_ground_truth(ground_truth)
        known = {c["id"] for c in self.ground_truth["categories"]}
        self.category_ids = list(category_ids) if category_ids is not None else sorted(known)
        unknown = [c for c in self.category_ids if c not in known]
        if unknown:
            raise CocoFormatError(f"category_ids {unknown} are not in {self._source}")
        self._image_ids = {img["id"] for img in self.ground_truth["images"]}
        self.novel = None if novel is None else list(novel)
        self.base = None if base is None else list(base)
        self.max_dets = max_dets
        self.reset()

    def reset(self) -> None:
        self._results: dict[int, list[dict[str, Any]]] = {}

    def process(self, image_ids: Sequence[int], predictions: Sequence[Mapping[str, torch.Tensor]]) -> None:
        if len(image_ids) != len(predictions):
            raise ValueError(f"got {len(image_ids)} image ids but {len(predictions)} predictions")
        for image_id, pred in zip(image_ids, predictions):
            image_id = int(image_id)
            if image_id not in self._image_ids:
                raise CocoFormatError(f"image id {image_id} is not in {self._source}")
            missing = [k for k in ("boxes", "scores", "labels") if k not in pred]
            if missing:
                raise ValueError(f"prediction for image {image_id} has no {missing} (expected boxes, scores, labels)")
            boxes = torch.as_tensor(pred["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
            scores = torch.as_tensor(pred["scores"]).detach().to("cpu", torch.float64).reshape(-1)
            labels = torch.as_tensor(pred["labels"]).detach().to("cpu", torch.int64).reshape(-1)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(
                    f"prediction for image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.category_ids)):
                raise ValueError(
                    f"prediction for image {image_id}: labels must be in [0, {len(self.category_ids)}), "
                    f"got {labels.min().item()}..{labels.max().item()}"
                )
            xywh = box_convert(boxes, "xyxy", "xywh")
            xywh[:, 2:] = xywh[:, 2:].clamp(min=0)  # inverted boxes: zero width / height
            if image_id in self._results:
                logger.debug("image %d processed again; the new predictions replace the old", image_id)
            self._results[image_id] = [
                {"image_id": image_id, "category_id": self.category_ids[c], "bbox": b, "score": s}
                for b, s, c in zip(xywh.tolist(), scores.tolist(), labels.tolist())
            ]

    def results(self) -> list[dict[str, Any]]:
        """The detections collected so far, in COCO result format."""
        return [r for rows in self._results.values() for r in rows]

    def evaluate(self, output: PathLike | None = None) -> dict[str, Any]:
        """Metrics of :func:`evaluate_coco` over the processed images; ``output``: also save the results."""
        if not self._results:
            raise ValueError("nothing to evaluate: process() was not called since reset()")
        return evaluate_coco(
            self.ground_truth,
            self.results(),
            output=output,
            novel=self.novel,
            base=self.base,
            image_ids=list(self._results),
            max_dets=self.max_dets,
        )
