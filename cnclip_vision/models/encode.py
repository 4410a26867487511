"""Batched encoding of raw texts and images with a :class:`~cnclip_vision.models.clip.ChineseCLIP` model.

Texts are sorted by length and padded per batch to their longest member (length-bucketed batching):
Chinese labels are a few tokens, and padding every text to 52 wastes most of the work. The padding
length does not change the features (the attention mask hides it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cnclip_vision.data.tokenizer import DEFAULT_CONTEXT_LENGTH, get_tokenizer
from cnclip_vision.data.transforms import ImageSource, image_transform

if TYPE_CHECKING:
    from cnclip_vision.models.clip import ChineseCLIP

logger = logging.getLogger(__name__)

__all__ = ["encode_images", "encode_texts"]


@torch.inference_mode()
def encode_texts(
    model: ChineseCLIP,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    normalize: bool = True,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    progress: bool = False,
) -> torch.Tensor:
    """``[len(texts), embed_dim]`` float32 text features on the CPU, in input order."""
    from tqdm.auto import tqdm

    tokenizer = get_tokenizer()
    pieces = tokenizer.wordpiece_ids(texts)  # validates the texts (type, emptiness)
    order = sorted(range(len(texts)), key=lambda i: len(pieces[i]))
    out = torch.empty(len(texts), model.config.embed_dim)
    for start in tqdm(range(0, len(order), batch_size), desc="texts", disable=None if progress else True, leave=False):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], context_length=context_length, warn_truncation=False)
        features = model.encode_text(enc["input_ids"], enc["attention_mask"], normalize=normalize)
        out[idx] = features.float().cpu()
    return out


@torch.inference_mode()
def encode_images(
    model: ChineseCLIP,
    images: Sequence[ImageSource] | torch.Tensor,
    *,
    batch_size: int = 64,
    normalize: bool = True,
) -> torch.Tensor:
    """``[N, embed_dim]`` float32 image features on the CPU of in-memory images (PIL, paths, arrays,
    tensors) or of an already preprocessed ``[N, 3, S, S]`` batch. For large folders use
    :func:`cnclip_vision.data.iter_image_batches`, which decodes in workers and skips bad files."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        chunks = images.split(batch_size)
    else:
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise TypeError(f"images must be a list of images or a [N, 3, S, S] tensor, got {type(images).__name__}")
        transform = image_transform(model.image_size)
        chunks = (transform.batch(images[i : i + batch_size]) for i in range(0, len(images), batch_size))
        if len(images) == 0:
            raise ValueError("images is empty: pass at least one image")
    return torch.cat([model.encode_image(c, normalize=normalize).float().cpu() for c in chunks])
