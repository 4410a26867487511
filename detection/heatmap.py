"""Where in an image a label is: cosine similarity of every patch's dense CLIP embedding to the label."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cnclip_vision.backbones.dense import DenseMode
from cnclip_vision.backbones.pyramid import dense_image_embeddings
from cnclip_vision.data.transforms import ImageSource, image_transform
from cnclip_vision.models.clip import ChineseCLIP
from cnclip_vision.zeroshot import class_embeddings

__all__ = ["similarity_map"]


@torch.no_grad()
def similarity_map(
    model: ChineseCLIP,
    image: ImageSource,
    labels: str | Sequence[str],
    *,
    size: int | None = None,
    templates: Sequence[str] | str = "default",
    dense_mode: DenseMode = "raw",
) -> torch.Tensor:
    """``[len(labels), size/p, size/p]`` cosine similarities between each patch's projected token (the image
    resized to ``size``, default the model's input size; patch p; the last block as ``dense_mode`` says) and
    each label's template-averaged text embedding. Raw dense CLIP features are coarsely aligned at best
    (DESIGN.md §7); the training-free variants (:mod:`cnclip_vision.backbones.dense`) localise better."""
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels:
        raise ValueError("labels is empty: pass at least one label")
    size = size or model.image_size
    patch = model.config.vision.patch_size
    if size % patch:
        raise ValueError(f"size={size} must be a multiple of the patch size {patch}")
    pixels = image_transform(size)(image)[None]
    dense = dense_image_embeddings(model, pixels, normalize=True, dense_mode=dense_mode)[0].float().cpu()
    text = class_embeddings(model, labels, templates)
    return torch.einsum("cd,dhw->chw", text, dense)
