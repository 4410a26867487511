"""Image loading and the Chinese-CLIP image transform.

Preprocessing (DESIGN.md §4): RGB with EXIF orientation applied, **resize straight to a square** with
PIL bicubic (no aspect-preserving resize, no centre crop), scale to [0, 1], normalise with the OpenAI
CLIP mean/std. Every input kind (path, bytes, file object, PIL image, array, tensor) is first turned
into an 8-bit RGB PIL image by :func:`load_image`, so all of them give the same tensor as the original
``cn_clip`` transform on that image.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cnclip_vision.errors import ImageLoadError

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageSource",
    "ImageTransform",
    "clip_normalize",
    "image_transform",
    "load_image",
    "square_boxes",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP's normalisation of float pixels in [0, 1], ``[..., 3, H, W]`` (batched tensors that never were
    PIL images, e.g. pre-rendered training arrays)."""
    return F.normalize(pixels, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD))


ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | np.ndarray | torch.Tensor

_ALPHA_MODES = ("LA", "La", "PA", "RGBa", "RGBA")


def square_boxes(boxes: torch.Tensor, margin: float) -> torch.Tensor:
    """Square xyxy crop boxes ``[K, 4]`` centred on ``boxes``, side = the box's long side * (1 + 2 * margin):
    the context a CLIP sees when a region is cropped and re-encoded (the detector's ``crops``, CLIPSelf's
    teacher)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(-1, keepdim=True) * (0.5 + margin)
    return torch.cat([centre - half, centre + half], 1)


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes (length {len(source)})"
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "")
        return f"image {name!r}" if name else f"PIL image ({source.mode}, {source.size[0]}x{source.size[1]})"
    name = getattr(source, "name", None)
    return f"image file object {name!r}" if isinstance(name, str) else f"image file object ({type(source).__name__})"


def _bomb_error(what: str, exc: Exception) -> ImageLoadError:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = match.group(1) if match else "too many"
    return ImageLoadError(
        f"{what}: {pixels} pixels is over Pillow's decompression-bomb limit "
        f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; if you trust the file, raise it "
        "(e.g. `PIL.Image.MAX_IMAGE_PIXELS = 300_000_000`, or None to switch the check off)"
    )


def _decode(source: Any, what: str) -> Image.Image:
    """Open (path, bytes, file object) or take (PIL image), force a full decode, apply EXIF orientation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                source.load()
                return ImageOps.exif_transpose(source)
            if isinstance(source, (bytes, bytearray, memoryview)):
                source = io.BytesIO(bytes(source))
            with Image.open(source) as image:
                image.load()  # decode now: a truncated or corrupt file fails here, not later
                return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(what, exc) from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{what} does not exist") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(f"{what} is not an image Pillow can read") from exc
    except OSError as exc:
        if exc.errno is not None:  # permission denied, I/O error, ...
            raise ImageLoadError(f"{what} cannot be read: {exc.strerror or exc}") from exc
        raise ImageLoadError(f"{what} is corrupt or truncated: {exc}") from exc
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{what} is corrupt or truncated: {exc}") from exc


def _array_to_pil(array: np.ndarray, what: str) -> Image.Image:
    """HxW / HxWx{1,3,4} array (uint8, uint16, bool, or float in [0, 1]) to a PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise ImageLoadError(f"{what}: expected shape HxW, HxWx1, HxWx3 or HxWx4, got {tuple(array.shape)}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)  # the 16-bit range onto 8 bit
    elif np.issubdtype(array.dtype, np.floating):
        low, high = float(np.min(array)), float(np.max(array))
        if not (0.0 <= low and high <= 1.0):  # also catches NaN
            raise ImageLoadError(f"{what}: float images must hold values in [0, 1], got [{low:g}, {high:g}]")
        array = np.round(array * 255.0).astype(np.uint8)
    else:
        raise ImageLoadError(f"{what}: dtype {array.dtype} is not supported (use uint8, uint16 or float in [0, 1])")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image, what: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. Alpha is dropped as ``Image.convert("RGB")`` does (no compositing)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":  # 16-bit range scaled to 8 bit (PIL's convert would clip)
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.round(array / 257.0).astype(np.uint8)).convert("RGB")
    if mode == "F":  # [0, 1] if it fits, else clipped to [0, 255]
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        array = array * 255.0 if array.min() >= 0 and array.max() <= 1 else np.clip(array, 0, 255)
        return Image.fromarray(np.round(array).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in image.info or mode in _ALPHA_MODES:
        image = image.convert("RGBA")  # P + transparency via RGBA avoids Pillow's palette warning
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"{what}: cannot convert PIL mode {mode!r} to RGB") from exc


def as_image_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """One image source or a sequence of them, as a list (a str, bytes or path is one image, not a sequence)."""
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)):
        return list(images)
    return [cast("ImageSource", images)]


def load_image(source: ImageSource) -> Image.Image:
    """Read an image into an 8-bit RGB PIL image, EXIF orientation applied.

    ``source``: a PIL image; a path (str or ``os.PathLike``); encoded bytes / bytearray / memoryview; a
    binary file object; a numpy array HxW, HxWx1, HxWx3 or HxWx4 (uint8, uint16, bool, or float in
    [0, 1]); a torch tensor CxHxW (C = 1, 3, 4) or HxW with the same dtypes. Any PIL mode is accepted:
    16-bit images (I;16, I) are scaled to 8 bit, F is taken as [0, 1] when it fits, else clipped to
    [0, 255]; alpha is dropped without compositing, exactly like ``Image.convert("RGB")`` (the reference
    implementations do the same). Float inputs are quantised to 8 bit, like an image file.

    Raises :class:`ImageLoadError` (naming the file or argument) for a missing, unreadable, truncated
    or over-large file and for arrays of the wrong shape or dtype; ``TypeError`` for other types.
    """
    if source is None or isinstance(source, bool):
        raise TypeError(f"image must be a PIL image, path, bytes, file object, array or tensor, got {source!r}")
    if isinstance(source, torch.Tensor):
        what = f"image tensor of shape {tuple(source.shape)}"
        if source.ndim == 3:
            if source.shape[0] not in (1, 3, 4):
                raise ImageLoadError(f"{what}: expected CxHxW with C in (1, 3, 4), or HxW")
            source = source.permute(1, 2, 0)
        elif source.ndim != 2:
            raise ImageLoadError(f"{what}: expected CxHxW with C in (1, 3, 4), or HxW")
        source = source.detach().cpu()
        if source.is_floating_point():
            source = source.float()  # numpy has no bfloat16
        return _to_rgb(_array_to_pil(source.numpy(), what), what)
    if isinstance(source, np.ndarray):
        what = f"image array of shape {source.shape}"
        return _to_rgb(_array_to_pil(source, what), what)
    if not isinstance(source, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)) and not hasattr(
        source, "read"
    ):
        raise TypeError(
            f"image must be a PIL image, path, bytes, file object, array or tensor, got {type(source).__name__}"
        )
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        raise ImageLoadError(f"{_describe(source)} is a directory, not an image file")
    what = _describe(source)
    return _to_rgb(_decode(source, what), what)


class ImageTransform:
    """Chinese-CLIP image preprocessing: ``load_image`` → bicubic resize to ``image_size`` squared →
    [0, 1] → normalise. ``transform(image)`` gives a float32 ``[3, S, S]`` tensor; ``transform.batch``
    stacks a list into ``[N, 3, S, S]``.

    Built on ``torchvision.transforms.v2`` functionals applied to the PIL image: the resize is PIL's
    bicubic filter, exactly like the original ``cn_clip`` transform (``Resize((S, S), BICUBIC)`` on PIL
    input). Holds no lambdas, so it pickles into ``DataLoader`` workers.
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: ImageSource) -> torch.Tensor:
        size = [self.image_size, self.image_size]
        resized = F.resize(load_image(image), size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        pixels = F.pil_to_tensor(resized).float().div_(255)  # bit-exact with ToTensor; ToDtype multiplies by 1/255
        return F.normalize(pixels, list(self.mean), list(self.std))

    def batch(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Transform and stack ``images`` into ``[N, 3, S, S]``."""
        if isinstance(images, (str, bytes, Image.Image, np.ndarray, torch.Tensor)) or not isinstance(images, Sequence):
            raise TypeError(f"images must be a list or tuple of images, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("images is empty: pass at least one image")
        return torch.stack([self(image) for image in images])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, interpolation='bicubic', "
            f"mean={self.mean}, std={self.std})"
        )


def image_transform(
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> ImageTransform:
    """The Chinese-CLIP preprocessing for ``image_size`` (224, or 336 for ViT-L-14-336)."""
    return ImageTransform(image_size, mean, std)
