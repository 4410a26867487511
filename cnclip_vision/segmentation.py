"""Open-vocabulary semantic segmentation with Chinese labels, training-free, on dense CLIP features.

>>> result = segment(model, ["street.jpg"], ["道路", "汽车", "树"], dense_mode="naclip")[0]
>>> result.label_map        # [H, W] int64 at the input's resolution: index into result.labels, -1 background
>>> result.scores           # [C, H, W] float32: per-label probabilities (softmax over the labels)

Every patch's dense embedding (the tower's last block as ``dense_mode`` says,
:mod:`cnclip_vision.backbones.dense`) is compared with each label's template-averaged text embedding; the
cosine similarities, scaled by the CLIP's logit scale, are upsampled bilinearly to the input size and turned
into probabilities over the labels. Background: a pixel whose best probability is below
``background_threshold`` gets -1 (0, the default, labels every pixel); labels such as "背景" can also be
passed and treated as background by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cnclip_vision.backbones.dense import DenseMode, check_dense_mode
from cnclip_vision.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSource, load_image
from cnclip_vision.models.clip import ChineseCLIP

__all__ = ["DEFAULT_LONG_SIDE", "Segmentation", "segment"]

logger = logging.getLogger(__name__)

DEFAULT_LONG_SIDE = 672  # the network input's long side by default (42 patches of 16), never above the image's


@dataclass
class Segmentation:
    """One image's segmentation: ``label_map`` ``[H, W]`` (index into ``labels``, -1 background) and ``scores``
    ``[C, H, W]`` (probabilities over the labels), both at the input image's resolution."""

    labels: list[str]
    label_map: torch.Tensor
    scores: torch.Tensor = field(repr=False)
    background_threshold: float = 0.0

    def areas(self) -> dict[str, float]:
        """The share of the image each label covers (background not listed)."""
        total = self.label_map.numel()
        counts = torch.bincount(self.label_map[self.label_map >= 0].flatten(), minlength=len(self.labels))
        return {name: round(float(c) / total, 6) for name, c in zip(self.labels, counts.tolist())}


def _network_input(image: ImageSource, long_side: int | None, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """CLIP-normalised ``[1, 3, h, w]`` pixels (sides multiples of ``patch``, long side ``long_side`` or the
    image's, capped at :data:`DEFAULT_LONG_SIDE`) and the original ``(H, W)``."""
    from PIL import Image

    picture = load_image(image)
    width, height = picture.size
    target = long_side if long_side is not None else min(max(width, height), DEFAULT_LONG_SIDE)
    scale = target / max(width, height)
    w = max(patch, round(width * scale / patch) * patch)
    h = max(patch, round(height * scale / patch) * patch)
    resized = picture.resize((w, h), Image.Resampling.BICUBIC) if (w, h) != (width, height) else picture
    pixels = torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1) / 255
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std)[None], (height, width)


@torch.no_grad()
def segment(
    model: ChineseCLIP,
    images: ImageSource | Sequence[ImageSource],
    labels: Sequence[str],
    *,
    templates: Sequence[str] | str = "default",
    dense_mode: DenseMode = "naclip",
    long_side: int | None = None,
    background_threshold: float = 0.0,
) -> list[Segmentation]:
    """Segment each image into ``labels`` (Chinese names; module docstring). ``long_side``: the network
    input's long side in pixels (default: the image's, at most :data:`DEFAULT_LONG_SIDE`); ``dense_mode``:
    the last block's variant (``naclip`` localises best of the training-free ones on the toy world)."""
    from cnclip_vision.backbones.pyramid import dense_image_embeddings
    from cnclip_vision.zeroshot import class_embeddings

    names = list(labels) if not isinstance(labels, str) else [labels]
    if not names:
        raise ValueError("labels is empty: pass at least one label")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate labels in {names}")
    check_dense_mode(dense_mode)
    if isinstance(background_threshold, bool) or not 0.0 <= float(background_threshold) <= 1.0:
        raise ValueError(f"background_threshold={background_threshold!r}; expected a probability in [0, 1]")
    patch = int(model.config.vision.patch_size)
    if long_side is not None and (isinstance(long_side, bool) or not isinstance(long_side, int) or long_side < patch):
        raise ValueError(f"long_side={long_side!r}; expected an int >= the patch size {patch}")
    from cnclip_vision.data.transforms import as_image_list

    sources = as_image_list(images)
    text = class_embeddings(model, names, templates).to(model.device).float()
    scale = float(model.logit_scale.detach().exp().clamp(max=100.0))
    out = []
    for source in sources:
        pixels, (height, width) = _network_input(source, long_side, patch)
        dense = dense_image_embeddings(model, pixels, normalize=True, dense_mode=dense_mode)[0].float()
        logits = scale * torch.einsum("dhw,cd->chw", dense, text)
        logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        scores = logits.softmax(0).cpu()
        best, label_map = scores.max(0)
        label_map[best < background_threshold] = -1
        out.append(Segmentation(names, label_map, scores, float(background_threshold)))
    return out
