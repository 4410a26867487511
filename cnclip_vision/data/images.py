"""Batched image pipelines over files: decoding and resizing in ``DataLoader`` workers, bad files
reported and skipped (never abort a long run), progress on stderr."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cnclip_vision.errors import CNClipError, ImageLoadError, UnreadableFolderError

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "ImageBatch", "ImageFileDataset", "iter_image_batches", "list_images", "walk_files"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".jfif", ".ppm", ".pgm")


def walk_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Every file under the folder ``root``, recursively (symlinked folders not followed). A ``root`` that
    cannot be listed raises :class:`UnreadableFolderError` (``Path.rglob`` would silently find nothing);
    an unreadable sub-folder is skipped with a warning naming it."""
    root = Path(root)

    def unreadable(error: OSError) -> None:
        where = Path(error.filename) if error.filename else root
        reason = error.strerror or str(error)
        if where == root:
            raise UnreadableFolderError(f"cannot read the folder {root}: {reason}")
        logger.warning("skipped the folder %s: cannot read it (%s)", where, reason)

    for folder, _, files in os.walk(root, onerror=unreadable):
        for name in files:
            path = Path(folder) / name
            if path.is_file():
                yield path


def list_images(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image paths from a directory (recursive, by extension, sorted), a list file (one path per line,
    relative paths resolved against the file's folder; blank lines and ``#`` comments ignored), a single
    image file, or a sequence of any of these."""
    if isinstance(source, (list, tuple)):
        return [p for item in source for p in list_images(item)]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or a list of paths, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in walk_files(path) if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise CNClipError(f"no images found in {path} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return found
    if path.suffix.lower() in (".txt", ".lst", ".list") and path.is_file():
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
        except UnicodeDecodeError as e:
            raise CNClipError(f"the image list {path} is not UTF-8 text (byte {e.start}); one path per line") from None
        paths = [
            Path(ln) if Path(ln).is_absolute() else path.parent / ln for ln in lines if ln and not ln.startswith("#")
        ]
        if not paths:
            raise CNClipError(f"the image list {path} is empty")
        return paths
    if not path.exists():
        raise CNClipError(f"no such image, folder or list file: {path}")
    return [path]  # a single file; unreadable ones are reported when decoded


class ImageFileDataset(Dataset):
    """``(index, pixels or None, error or None)`` for each path; decoding errors are returned, not raised."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], transform: Callable[[Path], torch.Tensor]) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(self.paths[index]), None
        except (ImageLoadError, OSError) as e:
            return index, None, str(e)


@dataclass
class ImageBatch:
    """A batch of decodable images: their positions in the input list and their pixels."""

    indices: list[int]
    pixel_values: torch.Tensor
    failures: list[tuple[int, str]] = field(default_factory=list)


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch | None:
    good = [(i, x) for i, x, _ in items if x is not None]
    failures = [(i, err or "unreadable") for i, x, err in items if x is None]
    pixels = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return ImageBatch([i for i, _ in good], pixels, failures)


def iter_image_batches(
    paths: Sequence[str | os.PathLike[str]],
    transform: Callable[[Path], torch.Tensor],
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "images",
    on_failure: Callable[[Path, str], None] | None = None,
) -> Iterator[ImageBatch]:
    """Decode and preprocess ``paths`` in worker processes, yielding batches in input order.

    Unreadable files are logged (path and reason), passed to ``on_failure`` and skipped; a batch may
    therefore hold fewer images than ``batch_size`` (batches with none are not yielded). With a CUDA
    ``device``, batches come in pinned memory and are moved asynchronously.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if len(paths) > batch_size else 0
    device = torch.device(device) if device is not None else None
    pin = device is not None and device.type == "cuda"
    loader = DataLoader(
        ImageFileDataset(paths, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin,
        persistent_workers=False,
    )
    with tqdm(total=len(paths), desc=desc, unit="img", disable=None if progress else True, leave=False) as bar:
        for batch in loader:
            for index, reason in batch.failures:
                logger.warning("skipped %s: %s", paths[index], reason)
                if on_failure is not None:
                    on_failure(Path(paths[index]), reason)
            bar.update(len(batch.indices) + len(batch.failures))
            if batch.indices:
                if device is not None:
                    batch.pixel_values = batch.pixel_values.to(device, non_blocking=pin)
                yield batch
