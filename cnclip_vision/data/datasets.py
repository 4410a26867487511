"""Image-caption datasets for contrastive training.

Formats:

- ``jsonl``: one ``{"image": path, "caption": text}`` object per line (``"text"`` is accepted for
  ``"caption"``); relative paths are resolved against the file's folder;
- ``tsv``: ``image path <TAB> caption`` per line;
- ``original``: the Chinese-CLIP preprocessed layout, ``{split}_imgs.tsv`` (``image_id <TAB> base64``)
  plus ``{split}_texts.jsonl`` (``{"text_id", "text", "image_ids"}``), as published for MUGE,
  Flickr30K-CN and COCO-CN; one training pair per (text, image id).

Malformed lines raise :class:`~cnclip_vision.errors.CNClipError` with ``file:line``; missing image files
are reported, skipped and counted; unreadable images are skipped when loaded.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from cnclip_vision.data.jsonl import iter_jsonl
from cnclip_vision.errors import CNClipError, ImageLoadError

logger = logging.getLogger(__name__)

__all__ = ["CaptionDataset", "OriginalLayoutDataset", "PairSample", "check_dataset_path", "open_dataset", "read_pairs"]


@dataclass
class PairSample:
    """One training pair; ``pixel_values`` is None when the image could not be read."""

    index: int
    pixel_values: torch.Tensor | None
    caption: str
    error: str | None = None


def _read_lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise CNClipError(f"dataset file {path} does not exist")
    lines = [(i + 1, ln) for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines()) if ln.strip()]
    if not lines:
        raise CNClipError(f"dataset file {path} is empty")
    return lines


def read_pairs(path: str | os.PathLike[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """``(image path, caption)`` pairs of a JSONL or TSV file and the list of problems (missing files)."""
    path = Path(path)
    pairs: list[tuple[Path, str]] = []
    if path.suffix == ".jsonl":
        rows: list[tuple[int, Any]] = list(iter_jsonl(path))
        if not rows:
            raise CNClipError(f"dataset file {path} is empty")
    else:
        rows = _read_lines(path)
        if rows[0][1].strip().lower() in ("image\tcaption", "image\ttext"):
            rows = rows[1:]  # an optional header row
    for number, row in rows:
        where = f"{path}:{number}"
        if path.suffix == ".jsonl":
            if not isinstance(row, dict) or "image" not in row or not ({"caption", "text"} & set(row)):
                raise CNClipError(f"{where}: expected an object with 'image' and 'caption' keys")
            image, caption = row["image"], row.get("caption", row.get("text"))
        else:
            fields = row.split("\t")
            if len(fields) != 2:
                raise CNClipError(
                    f"{where}: expected 'image path<TAB>caption', found {len(fields)} tab-separated fields"
                )
            image, caption = fields
        if not isinstance(caption, str) or not caption.strip() or not isinstance(image, str) or not image:
            raise CNClipError(f"{where}: empty image path or caption")
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        pairs.append((image_path, caption.strip()))
    missing = [f"{p}: missing image file" for p, _ in pairs if not p.is_file()]
    for problem in missing[:20]:
        logger.warning("skipped %s", problem)
    if missing:
        logger.warning("%s: %d of %d image files are missing and skipped", path, len(missing), len(pairs))
        pairs = [(p, c) for p, c in pairs if p.is_file()]
    if not pairs:
        raise CNClipError(f"{path}: no usable pairs ({len(missing)} image files missing)")
    return pairs, missing


class CaptionDataset(Dataset):
    """Pairs from a JSONL / TSV file, images decoded and transformed on access."""

    def __init__(self, path: str | os.PathLike[str], transform: Callable[[Path], torch.Tensor]) -> None:
        self.path = Path(path)
        self.pairs, self.skipped = read_pairs(path)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def caption(self, index: int) -> str:
        return self.pairs[index][1]

    def __getitem__(self, index: int) -> PairSample:
        image, caption = self.pairs[index]
        try:
            return PairSample(index, self.transform(image), caption)
        except (ImageLoadError, OSError) as e:
            return PairSample(index, None, caption, str(e))


class OriginalLayoutDataset(Dataset):
    """The Chinese-CLIP ``{split}_imgs.tsv`` + ``{split}_texts.jsonl`` layout; images are read by byte
    offset, so the TSV is never held in memory."""

    def __init__(self, root: str | os.PathLike[str], split: str, transform: Callable[[bytes], torch.Tensor]) -> None:
        self.root = Path(root)
        self.images_path = self.root / f"{split}_imgs.tsv"
        texts_path = self.root / f"{split}_texts.jsonl"
        if not self.images_path.is_file():
            raise CNClipError(f"{self.images_path} does not exist (expected the original {split}_imgs.tsv)")
        self.offsets = self._index_images()
        self.transform = transform
        from cnclip_vision.data.jsonl import read_text_jsonl  # the same reader as the retrieval evaluation

        self.pairs: list[tuple[str, str]] = []
        missing = 0
        for record in read_text_jsonl(texts_path, require_image_ids=True):
            for image_id in record.image_ids:
                if image_id in self.offsets:
                    self.pairs.append((image_id, record.text))
                else:
                    missing += 1
        if missing:
            logger.warning("%s: %d image ids not in %s, skipped", texts_path, missing, self.images_path.name)
        self.skipped = missing
        if not self.pairs:
            raise CNClipError(f"{texts_path}: no usable pairs")

    def _index_images(self) -> dict[str, int]:
        offsets: dict[str, int] = {}
        with self.images_path.open("rb") as f:
            position = 0
            for number, line in enumerate(f, start=1):
                image_id, sep, _ = line.partition(b"\t")
                if line.strip():
                    if not sep:
                        raise CNClipError(f"{self.images_path}:{number}: expected 'image_id<TAB>base64 image'")
                    offsets[image_id.decode()] = position
                position += len(line)
        if not offsets:
            raise CNClipError(f"{self.images_path} is empty")
        return offsets

    def __len__(self) -> int:
        return len(self.pairs)

    def caption(self, index: int) -> str:
        return self.pairs[index][1]

    def __getitem__(self, index: int) -> PairSample:
        image_id, caption = self.pairs[index]
        with self.images_path.open("rb") as f:
            f.seek(self.offsets[image_id])
            encoded = f.readline().partition(b"\t")[2].strip()
        try:
            return PairSample(index, self.transform(base64.urlsafe_b64decode(encoded)), caption)
        except (ImageLoadError, OSError, ValueError) as e:
            return PairSample(index, None, caption, f"image {image_id}: {e}")


def open_dataset(
    spec: str | os.PathLike[str], transform: Callable[[Path | bytes], torch.Tensor], *, split: str = "train"
) -> CaptionDataset | OriginalLayoutDataset:
    """A dataset from a ``.jsonl`` / ``.tsv`` file or a folder in the original layout."""
    check_dataset_path(spec, split=split)
    path = Path(spec)
    if path.is_dir():
        return OriginalLayoutDataset(path, split, transform)
    return CaptionDataset(path, transform)


def check_dataset_path(spec: str | os.PathLike[str], *, split: str = "train") -> None:
    """``spec`` is what :func:`open_dataset` reads: an existing ``.jsonl`` / ``.tsv`` file or a folder holding
    ``{split}_imgs.tsv`` and ``{split}_texts.jsonl`` (a cheap check, before any model is loaded)."""
    path = Path(spec)
    expected = f"expected a .jsonl or .tsv file, or a folder with {split}_imgs.tsv and {split}_texts.jsonl"
    if path.is_dir():
        missing = [n for n in (f"{split}_imgs.tsv", f"{split}_texts.jsonl") if not (path / n).is_file()]
        if missing:
            raise CNClipError(f"{path} is a folder without {' and '.join(missing)}; {expected}")
    elif not path.exists():
        raise CNClipError(f"no such file or folder: {path} ({expected})")
    elif path.suffix not in (".jsonl", ".tsv") or not path.is_file():
        raise CNClipError(f"{path}: {expected}")
