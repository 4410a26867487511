"""COCO-format detection data: validation, a dataset with Chinese category names, LSJ augmentation and the
conversion of the official COCO 2017 files into OV-COCO files (DESIGN.md §6).

Label indices: a dataset maps the (possibly non-contiguous) COCO category ids to contiguous label indices
``0..K-1`` in increasing id order; ``dataset.category_ids[i]`` is the id of label ``i`` and
``dataset.category_names[i]`` its (Chinese) name.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeGuard

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnclip_vision.data.transforms import load_image
from cnclip_vision.detection.coco_names import OVCOCO_BASE_IDS, OVCOCO_NOVEL_IDS, get_coco_category, read_name_map
from cnclip_vision.errors import CNClipError
from cnclip_vision.io import atomic_write

__all__ = [
    "CocoDetection",
    "CocoFormatError",
    "check_coco_structure",
    "collate_detection",
    "convert_ovcoco",
    "eval_transforms",
    "lsj_transforms",
    "read_coco",
    "validate_coco",
]

logger = logging.getLogger(__name__)

Target = dict[str, Any]
PathLike = str | os.PathLike[str]


class CocoFormatError(CNClipError, ValueError):
    """A COCO file is malformed; the message names the file, the key and the record index."""


# ---------------------------------------------------------------------------------------- validation
def read_coco(path: PathLike) -> dict[str, Any]:
    """Parse a COCO JSON file (errors name the file and, for bad JSON, the line)."""
    path = Path(path)
    if path.is_dir():
        raise CocoFormatError(f"COCO file {path} is a folder; expected a COCO annotation .json file")
    if not path.is_file():
        raise FileNotFoundError(f"COCO file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{path}: expected a JSON object with images/annotations/categories, got {type(data).__name__}"
        )
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_REQUIRED: dict[str, tuple[tuple[str, Callable[[object], bool], str], ...]] = {
    "images": (
        ("id", _is_int, "an integer"),
        ("file_name", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        ("width", lambda v: _is_number(v) and v > 0, "a positive number"),
        ("height", lambda v: _is_number(v) and v > 0, "a positive number"),
    ),
    "annotations": (
        ("id", _is_int, "an integer"),
        ("image_id", _is_int, "an integer"),
        ("category_id", _is_int, "an integer"),
        (
            "bbox",
            lambda v: isinstance(v, (list, tuple)) and len(v) == 4 and all(map(_is_number, v)),
            "a list of 4 finite numbers [x, y, width, height]",
        ),
    ),
    "categories": (
        ("id", _is_int, "an integer"),
        ("name", lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    ),
}


def check_coco_structure(data: object, *, source: str) -> None:
    """Raise :class:`CocoFormatError` for a missing/mistyped key or a duplicate id (nothing is changed)."""
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{source}: expected a JSON object with images/annotations/categories, got {type(data).__name__}"
        )
    for section, fields in _REQUIRED.items():
        if section not in data:
            raise CocoFormatError(
                f"{source}: missing top-level key {section!r} (a COCO file has images, annotations, categories)"
            )
        records = data[section]
        if not isinstance(records, list):
            raise CocoFormatError(f"{source}: {section!r} must be a list, got {type(records).__name__}")
        seen: dict[int, int] = {}
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise CocoFormatError(f"{source}: {section}[{index}] must be an object, got {type(record).__name__}")
            for key, ok, expected in fields:
                if key not in record:
                    raise CocoFormatError(f"{source}: {section}[{index}] has no {key!r}")
                if not ok(record[key]):
                    raise CocoFormatError(
                        f"{source}: {section}[{index}][{key!r}] must be {expected}, got {record[key]!r}"
                    )
            crowd = record.get("iscrowd", 0)
            if section == "annotations" and crowd not in (0, 1):  # True/False compare equal to 1/0
                raise CocoFormatError(f"{source}: {section}[{index}]['iscrowd'] must be 0 or 1, got {crowd!r}")
            first = seen.setdefault(record["id"], index)
            if first != index:
                raise CocoFormatError(
                    f"{source}: duplicate {section} id {record['id']} ({section}[{first}] and {section}[{index}])"
                )


def validate_coco(data: dict[str, Any], *, source: str) -> tuple[dict[str, Any], collections.Counter[str]]:
    """Check a COCO detection dict and return a cleaned copy plus a report of what was changed.

    Errors (:class:`CocoFormatError`, naming ``source``, the key and the record index): a missing or
    mistyped key (images need ``id``/``file_name``/``width``/``height``, annotations ``id``/``image_id``/
    ``category_id``/``bbox``, categories ``id``/``name``), a duplicate image, annotation or category id.

    Cleaning (counted in the report, one ``logging.warning`` summary): annotations whose image or category
    does not exist are dropped (``annotations_unknown_image``, ``annotations_unknown_category``), boxes of
    zero or negative width/height are dropped (``boxes_degenerate``), boxes reaching outside the image are
    clipped to it (``boxes_clipped``) or dropped when nothing is left (``boxes_outside_image``); ``area``
    is filled in as the box area where missing. Images without annotations are kept
    (``images_without_annotations``). Category ids need not be contiguous: datasets map them to label
    indices in increasing id order. The input is not modified.
    """
    check_coco_structure(data, source=source)
    images = {img["id"]: img for img in data["images"]}
    category_ids = {c["id"] for c in data["categories"]}
    report: collections.Counter[str] = collections.Counter()
    annotations: list[dict[str, Any]] = []
    for ann in data["annotations"]:
        image = images.get(ann["image_id"])
        if image is None:
            report["annotations_unknown_image"] += 1
            continue
        if ann["category_id"] not in category_ids:
            report["annotations_unknown_category"] += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            report["boxes_degenerate"] += 1
            continue
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(image["width"])), min(y + h, float(image["height"]))
        if x2 <= x1 or y2 <= y1:
            report["boxes_outside_image"] += 1
            continue
        ann = dict(ann)
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            report["boxes_clipped"] += 1
            ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        ann.setdefault("area", (x2 - x1) * (y2 - y1))
        ann.setdefault("iscrowd", 0)
        annotations.append(ann)
    annotated = {ann["image_id"] for ann in annotations}
    empty = sum(1 for image_id in images if image_id not in annotated)
    problems = dict(report)
    if empty:
        report["images_without_annotations"] = empty
    if problems:
        logger.warning("%s: %s", source, ", ".join(f"{k} {v}" for k, v in sorted(problems.items())))
    if empty:
        logger.info("%s: %d of %d images have no annotations (kept)", source, empty, len(images))
    cleaned = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    cleaned.update(images=list(data["images"]), annotations=annotations, categories=list(data["categories"]))
    return cleaned, report


# ------------------------------------------------------------------------------------------- dataset
class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset with Chinese category names.

    ``dataset[i]`` is ``(image, target)``: ``image`` a ``tv_tensors.Image`` uint8 ``[3, H, W]`` (RGB, EXIF
    orientation applied), ``target`` ``{"boxes": BoundingBoxes (XYXY float32 pixels, canvas (H, W)),
    "labels": int64 label indices, "iscrowd": int64 0/1, "image_id": int}``, after ``transforms(image,
    target)`` when given. An image that is missing or cannot be decoded is logged (naming the file) and
    gives ``None``; :func:`collate_detection` drops those.

    ``image_root``: folder of the ``file_name`` paths (default: ``images/`` beside the annotation file if it
    exists, else the annotation file's folder). ``categories``: keep only these (Chinese name, original
    name, synonym or id), e.g. the base classes for open-vocabulary training; the other classes'
    annotations are dropped. ``name_map``: English -> Chinese names (a mapping or a file for
    :func:`read_name_map`) applied to the file's category names. ``skip_crowd``: drop ``iscrowd``
    annotations (else they are kept as ordinary boxes, flagged in ``target["iscrowd"]``).

    Attributes: ``category_ids``/``category_names`` (label ``i`` <-> id ``category_ids[i]``, sorted by id),
    ``image_ids`` (file order), ``report`` (Counter of what was dropped/clipped, see
    :func:`validate_coco`, plus ``crowd``, ``annotations_other_categories``; ``images_without_annotations``
    counts after that filtering), ``coco`` (the cleaned dict, all categories).
    """

    def __init__(
        self,
        annotation_file: PathLike,
        image_root: PathLike | None = None,
        *,
        categories: Sequence[str | int] | None = None,
        name_map: Mapping[str, str] | PathLike | None = None,
        transforms: Callable[[Any, Target], tuple[Any, Target]] | None = None,
        skip_crowd: bool = True,
    ) -> None:
        path = Path(annotation_file)
        self.annotation_file = path
        self.coco, self.report = validate_coco(read_coco(path), source=str(path))
        #: images :func:`~cnclip_vision.detection.inference.detect_coco` could not evaluate, by reason
        self.skipped_images: dict[str, list[int]] = {"missing": [], "unreadable": []}
        if image_root is None:
            image_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        self.image_root = Path(image_root)
        self.transforms = transforms

        records = sorted(self.coco["categories"], key=lambda c: c["id"])
        names = map_names([c["name"] for c in records], name_map)
        if categories is not None:
            wanted = _select_categories(categories, records, names, source=str(path))
            kept = [(c, n) for c, n in zip(records, names) if c["id"] in wanted]
            records, names = [c for c, _ in kept], [n for _, n in kept]
        self.category_ids: list[int] = [c["id"] for c in records]
        self.category_names: list[str] = list(names)
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}

        per_image: dict[int, list[tuple[float, float, float, float, int, int]]] = collections.defaultdict(list)
        for ann in self.coco["annotations"]:
            label = label_of.get(ann["category_id"])
            if label is None:
                self.report["annotations_other_categories"] += 1
                continue
            crowd = int(ann.get("iscrowd", 0))
            if crowd and skip_crowd:
                self.report["crowd"] += 1
                continue
            x, y, w, h = ann["bbox"]
            per_image[ann["image_id"]].append((x, y, x + w, y + h, label, crowd))
        self._images = list(self.coco["images"])
        self.image_ids: list[int] = [img["id"] for img in self._images]
        self._boxes = {k: np.asarray(v, dtype=np.float64).reshape(-1, 6) for k, v in per_image.items()}
        empty = sum(1 for i in self.image_ids if i not in self._boxes)
        self.report.pop("images_without_annotations", None)
        if empty:
            self.report["images_without_annotations"] = empty
        logger.info(
            "%s: %d images, %d categories, %d boxes",
            path,
            len(self),
            len(self.category_ids),
            sum(len(b) for b in self._boxes.values()),
        )

    def __len__(self) -> int:
        return len(self._images)

    def image_path(self, index: int) -> Path:
        return self.image_root / self._images[index]["file_name"]

    def __getitem__(self, index: int) -> tuple[Any, Target] | None:
        record = self._images[index]
        file = self.image_path(index)
        try:
            pil = load_image(file)
        except (CNClipError, OSError) as e:
            logger.warning("skipping image %d (%s): %s", record["id"], file, e)
            return None
        image = tv_tensors.Image(torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous())
        height, width = image.shape[-2:]
        if (height, width) != (record["height"], record["width"]):
            logger.warning(
                "%s is %dx%d but the annotations say %dx%d; boxes clipped to the image",
                file,
                width,
                height,
                record["width"],
                record["height"],
            )
        rows = self._boxes.get(record["id"], np.zeros((0, 6)))
        boxes = torch.as_tensor(rows[:, :4], dtype=torch.float32)
        target: Target = {
            "boxes": v2.functional.clamp_bounding_boxes(
                tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
            ),
            "labels": torch.as_tensor(rows[:, 4], dtype=torch.int64),
            "iscrowd": torch.as_tensor(rows[:, 5], dtype=torch.int64),
            "image_id": int(record["id"]),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def map_names(names: list[str], name_map: Mapping[str, str] | PathLike | None) -> list[str]:
    """Category names through an English -> Chinese ``name_map`` (a mapping or a file; unmapped names kept)."""
    if name_map is None:
        return names
    mapping = read_name_map(name_map) if isinstance(name_map, (str, os.PathLike)) else dict(name_map)
    missing = [n for n in names if n not in mapping]
    if missing:
        logger.warning(
            "name map has no entry for %d categories (names kept): %s", len(missing), ", ".join(missing[:10])
        )
    return [mapping.get(n, n) for n in names]


def category_lookup(records: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> dict[str | int, int]:
    """Category id by id, name, mapped name (``names[i]`` for ``records[i]``), English name or synonym. A name
    always wins over another category's English name, and that over a synonym (then the first category wins),
    so a synonym can never hide a category's own name."""
    lookup: dict[str | int, int] = {r["id"]: r["id"] for r in records}
    mapped = names if names is not None else [r["name"] for r in records]
    tiers = (
        lambda r, n: (r["name"], n),
        lambda r, n: (r.get("english_name"),),
        lambda r, n: tuple(r.get("synonyms") or ()),
    )
    for aliases in tiers:
        for record, name in zip(records, mapped):
            for alias in aliases(record, name):
                if isinstance(alias, str):
                    lookup.setdefault(alias, record["id"])
    return lookup


def resolve_categories(
    keys: Iterable[str | int], lookup: Mapping[str | int, int], what: str
) -> tuple[list[int], list[Any]]:
    """``(ids found, keys not found)`` of category names or ids (names stripped of surrounding spaces)."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of category names or ids, not a single string")
    found, unknown = [], []
    for key in keys:
        hit = lookup.get(key.strip() if isinstance(key, str) else key)
        (unknown.append(key) if hit is None else found.append(hit))
    return found, unknown


def _select_categories(
    keys: Sequence[str | int], records: Sequence[dict[str, Any]], names: Sequence[str], *, source: str
) -> set[int]:
    found, unknown = resolve_categories(keys, category_lookup(records, names), "categories")
    chosen = set(found)
    if unknown:
        known = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise CocoFormatError(f"{source}: unknown categories {unknown} (the file has: {known})")
    return chosen


def collate_detection(batch: Iterable[tuple[Any, Target] | None]) -> tuple[list[Any], list[Target]]:
    """DataLoader ``collate_fn``: drop ``None`` (unreadable images), return ``(images, targets)`` lists."""
    kept = [item for item in batch if item is not None]
    return [image for image, _ in kept], [target for _, target in kept]


# -------------------------------------------------------------------------------------------- transforms
def _target_tensors(inputs: Any) -> tuple[torch.Tensor, ...]:
    """labels_getter for SanitizeBoundingBoxes: the per-box tensors of our target dict."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else inputs
    if not isinstance(target, Mapping):
        raise TypeError(f"expected (image, target) with a target dict, got {type(target).__name__}")
    return tuple(target[k] for k in ("labels", "iscrowd") if k in target)


def lsj_transforms(size: int, scale_range: tuple[float, float] = (0.1, 2.0), *, flip: bool = True) -> v2.Compose:
    """Large-scale jitter (Ghiasi et al. 2021) on ``(image, target)``: horizontal flip, resize so the image
    fits ``size x size`` times a random scale in ``scale_range``, crop/pad to ``size x size`` (padding 0 at
    the right/bottom), then drop boxes cut below 1 px together with their labels."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    steps: list[Callable[..., Any]] = [v2.RandomHorizontalFlip(0.5)] if flip else []
    steps += [
        v2.ScaleJitter((size, size), scale_range=(lo, hi), antialias=True),
        v2.RandomCrop(size, pad_if_needed=True, fill=0),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(labels_getter=_target_tensors),
    ]
    return v2.Compose(steps)


def eval_transforms() -> v2.Compose:
    """Evaluation: the image unchanged (the detector resizes), boxes clamped to it."""
    return v2.Compose([v2.ClampBoundingBoxes()])


# ------------------------------------------------------------------------------------------- OV-COCO
def convert_ovcoco(
    instances_json: PathLike,
    output_dir: PathLike,
    *,
    split: Literal["train", "val"],
    keep_empty_images: bool = False,
) -> tuple[Path, dict[str, int | str]]:
    """Turn an official COCO 2017 ``instances_{train,val}2017.json`` into an OV-COCO file with Chinese names.

    ``train``: only the 48 base categories (novel objects stay unannotated in the images); ``val``: the 65
    base + novel categories, scored together (generalized setting). The 15 other classes are dropped. As in
    the OV-COCO files of OVR-CNN (and everyone since), images left without any annotation are removed
    (``keep_empty_images=True`` keeps them). Annotations are copied unchanged (no clipping; datasets clean
    at load time). Each category record gets ``name`` (our Chinese name), ``english_name``, ``synonyms``
    and ``split`` (``base``/``novel``). Writes ``output_dir/ovcoco_{split}2017.json`` atomically; returns
    its path and counts.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    source = str(instances_json)
    data = read_coco(instances_json)
    check_coco_structure(data, source=source)
    keep_ids = set(OVCOCO_BASE_IDS) | (set(OVCOCO_NOVEL_IDS) if split == "val" else set())
    in_file = {c["id"]: c for c in data["categories"]}
    missing = sorted(keep_ids - in_file.keys())
    if missing:
        raise CocoFormatError(f"{source}: categories {missing} are missing; expected the official COCO 2017 categories")
    categories = []
    for cid in sorted(keep_ids):
        ours = get_coco_category(cid)
        if in_file[cid]["name"].strip().lower() != ours.english_name:
            raise CocoFormatError(
                f"{source}: category id {cid} is named {in_file[cid]['name']!r}, expected "
                f"{ours.english_name!r}; is this an official COCO 2017 instances file?"
            )
        categories.append(
            {
                "id": cid,
                "name": ours.name,
                "english_name": ours.english_name,
                "synonyms": list(ours.synonyms),
                "supercategory": in_file[cid].get("supercategory", ours.supercategory),
                "split": "base" if cid in OVCOCO_BASE_IDS else "novel",
            }
        )
    image_ids = {img["id"] for img in data["images"]}
    annotations = [a for a in data["annotations"] if a["category_id"] in keep_ids and a["image_id"] in image_ids]
    annotated = {a["image_id"] for a in annotations}
    images = data["images"] if keep_empty_images else [img for img in data["images"] if img["id"] in annotated]
    info = dict(data.get("info") or {})
    info["description"] = (
        f"OV-COCO {split} ({'48 base' if split == 'train' else '48 base + 17 novel'} categories, "
        f"Chinese names) from {Path(source).name}: " + str(info.get("description", "COCO 2017"))
    )
    out = {
        "info": info,
        "licenses": data.get("licenses", []),
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path = Path(output_dir) / f"ovcoco_{split}2017.json"
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    counts: dict[str, int | str] = {
        "split": split,
        "images": len(images),
        "annotations": len(annotations),
        "categories": len(categories),
        "base_categories": sum(c["split"] == "base" for c in categories),
        "novel_categories": sum(c["split"] == "novel" for c in categories),
        "images_removed": len(data["images"]) - len(images),
        "annotations_removed": len(data["annotations"]) - len(annotations),
    }
    logger.info("wrote %s: %s", path, counts)
    return path, counts
