"""``Processor``: the tokenizer and the image transform of one model, read from / written to a model
directory in the Hugging Face format (``preprocessor_config.json``, ``vocab.txt``, ``tokenizer_config.json``)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from cnclip_vision.data.tokenizer import (
    DEFAULT_CONTEXT_LENGTH,
    VOCAB_PATH,
    Tokenizer,
    _check_context_length,
    get_tokenizer,
)
from cnclip_vision.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSource, ImageTransform
from cnclip_vision.io import atomic_write, write_json

if TYPE_CHECKING:
    from transformers import BatchEncoding

__all__ = ["PREPROCESSOR_CONFIG_NAME", "Processor"]

logger = logging.getLogger(__name__)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
_TOKENIZER_CONFIG = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as the Hub configs say


def _edge(value: Any, key: str, path: Path) -> int:
    """A square side from an HF ``size`` / ``crop_size`` entry (int, {height, width} or {shortest_edge})."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise ValueError(f"{path}: {key} {value} is not square; Chinese-CLIP models take square inputs")
            return int(value["height"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    raise ValueError(f"{path}: cannot read {key}={value!r} (expected an int, {{height, width}} or {{shortest_edge}})")


def _image_settings(config: dict[str, Any], path: Path) -> tuple[int, list[float], list[float]]:
    """``(image_size, mean, std)`` from a preprocessor config; warns about settings this library does not do."""
    size = _edge(config.get("size", 224), "size", path)
    unsupported = []
    if isinstance(config.get("size"), dict) and "shortest_edge" in config["size"]:
        unsupported.append(f"size={config['size']} (aspect-preserving resize)")
    if config.get("do_center_crop") and "crop_size" in config:
        crop = _edge(config["crop_size"], "crop_size", path)
        if crop != size:  # the model sees the crop size
            unsupported.append(f"a {crop}x{crop} centre crop of a {size} resize")
            size = crop
    if config.get("resample", _BICUBIC) != _BICUBIC:
        unsupported.append(f"resample={config['resample']}")
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if config.get(key) is False:
            unsupported.append(f"{key}=false")
    if not math.isclose(config.get("rescale_factor", 1 / 255), 1 / 255):
        unsupported.append(f"rescale_factor={config['rescale_factor']}")
    if unsupported:
        logger.warning(
            "%s asks for %s; this library always converts to RGB, resizes straight to %dx%d (bicubic), "
            "scales to [0, 1] and normalises, as the original Chinese-CLIP does",
            path,
            ", ".join(unsupported),
            size,
            size,
        )
    return size, config.get("image_mean", list(OPENAI_CLIP_MEAN)), config.get("image_std", list(OPENAI_CLIP_STD))


class Processor:
    """Tokenizer + image transform: ``processor(images=..., text=...)`` gives model inputs.

    Returns a ``BatchEncoding`` (dict-like, has ``.to(device)``) with ``pixel_values`` float32
    ``[N, 3, S, S]`` and/or ``input_ids`` / ``attention_mask`` int64 ``[M, L]``.
    """

    def __init__(
        self,
        image_size: int = 224,
        vocab_path: str | os.PathLike[str] | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        *,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        _check_context_length(context_length)
        self.tokenizer: Tokenizer = get_tokenizer(vocab_path)
        self.image_transform = ImageTransform(image_size, image_mean, image_std)
        self.context_length = context_length

    @property
    def image_size(self) -> int:
        return self.image_transform.image_size

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], *, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> Processor:
        """Read ``preprocessor_config.json`` and ``vocab.txt`` of a model directory (Hub format)."""
        directory = Path(directory)
        config_path = directory / PREPROCESSOR_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: {directory} is not a Chinese-CLIP model directory")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object")
        size, mean, std = _image_settings(config, config_path)
        vocab_file = directory / "vocab.txt"
        vocab_path = vocab_file if vocab_file.is_file() else None
        if vocab_path is None:
            logger.info("%s has no vocab.txt; using the packaged Chinese-CLIP vocabulary", directory)
        return cls(size, vocab_path, context_length, image_mean=mean, image_std=std)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``preprocessor_config.json``, ``vocab.txt`` and ``tokenizer_config.json`` in the Hub's
        format (transformers' ``ChineseCLIPProcessor.from_pretrained`` reads them), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        size = self.image_size
        config = {
            "crop_size": size,
            "do_center_crop": False,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "ChineseCLIPFeatureExtractor",
            "image_mean": list(self.image_transform.mean),
            "image_std": list(self.image_transform.std),
            "resample": _BICUBIC,
            "size": {"height": size, "width": size},
        }
        write_json(directory / PREPROCESSOR_CONFIG_NAME, config)
        vocab_target = directory / "vocab.txt"
        if not (vocab_target.exists() and vocab_target.samefile(self.tokenizer.vocab_path)):
            with atomic_write(vocab_target) as tmp:
                shutil.copyfile(self.tokenizer.vocab_path, tmp)
        write_json(directory / "tokenizer_config.json", _TOKENIZER_CONFIG)
        return directory

    def __call__(
        self,
        images: ImageSource | Sequence[ImageSource] | None = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: Literal["longest", "max_length"] = "longest",
    ) -> BatchEncoding:
        """Model inputs for ``images`` (one or a list) and/or ``text`` (one or a list)."""
        from transformers import BatchEncoding

        if images is None and text is None:
            raise ValueError("pass images, text or both")
        data: dict[str, torch.Tensor] = {}
        if text is not None:
            data.update(self.tokenizer(text, context_length=self.context_length, padding=padding))
        if images is not None:
            if isinstance(images, (list, tuple)):
                batch: Sequence[ImageSource] = images
            else:  # anything but a list or tuple is one image (a str path is a Sequence too)
                batch = [cast("ImageSource", images)]
            data["pixel_values"] = self.image_transform.batch(batch)
        return BatchEncoding(data)

    def __repr__(self) -> str:
        vocab = "packaged" if self.tokenizer.vocab_path == VOCAB_PATH else str(self.tokenizer.vocab_path)
        return (
            f"{type(self).__name__}(image_size={self.image_size}, context_length={self.context_length}, "
            f"vocab={vocab!r})"
        )
