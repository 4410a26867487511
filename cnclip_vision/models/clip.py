"""The Chinese-CLIP dual encoder: a timm image tower, a transformers BERT text tower, two projections.

Image tower: OpenAI-CLIP ViT (timm ``VisionTransformer`` with QuickGELU, pre-norm, bias-free patch
embedding, LayerNorm eps 1e-5) whose classifier head is the bias-free visual projection; or the CLIP
ModifiedResNet-50 (timm ``resnet50_clip``, attention-pool head). Text tower: ``transformers.BertModel``
without pooler; the text feature is the projected ``[CLS]`` hidden state (no final LayerNorm).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cnclip_vision.models.configs import CLIPConfig
from cnclip_vision.models.towers import build_image_tower, build_text_tower

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cnclip_vision.data.processor import Processor
    from cnclip_vision.data.transforms import ImageSource

__all__ = ["ChineseCLIP", "CLIPOutput"]


@dataclass
class CLIPOutput:
    """Result of :meth:`ChineseCLIP.forward`: scaled cosine logits and the normalised embeddings."""

    logits_per_image: torch.Tensor  # [num_images, num_texts]
    logits_per_text: torch.Tensor  # [num_texts, num_images]
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


class ChineseCLIP(nn.Module):
    """Chinese-CLIP dual encoder. Build with :func:`cnclip_vision.create_model` or :func:`cnclip_vision.load`."""

    #: What :func:`cnclip_vision.load` loaded it from (a name, folder or file), recorded in embedding manifests.
    source: str | None = None
    #: The precision it was built for (fp32, bf16, fp16 or int8; ``"auto"`` resolved), recorded with its fingerprint.
    precision: str = "fp32"
    #: With precision int8, whose kernels: "torchao" (``compile=True``) or "fbgemm" (torch's quantised engine).
    #: With "fbgemm", ``encode_image`` runs the image tower one image at a time: each image's activations are
    #: quantised on their own (its embedding does not depend on its batch), and every tensor stays small enough
    #: for the allocator to reuse (ViT-B-16, batch 32, 2-core EPYC: +3% with VNNI, +18% with the libraries held
    #: to AVX2; README, "int8: whose kernels").
    int8_backend: str | None = None
    #: Set by ``compile=True`` on the CPU: the towers compile under inductor freezing when gradients are off (the
    #: weights become constants of the compiled graph, prepacked for oneDNN) — load again after changing weights.
    freeze_compiled: bool = False

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = build_image_tower(config.vision, config.embed_dim)
        self.text = build_text_tower(config)
        self.text_projection = nn.Linear(config.text.hidden_size, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.text_projection.weight, std=config.text.hidden_size**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        # logit_scale is a plain parameter in every variant (also after dynamic quantisation of the Linears)
        return self.logit_scale.dtype

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Projected image features ``[N, embed_dim]`` of preprocessed images ``[N, 3, S, S]`` (in the model's
        dtype; ``normalize=True``: unit length in float32, so that a cosine never exceeds 1 by rounding)."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"pixel_values must be a float tensor [N, 3, {self.image_size}, {self.image_size}], got {shape}; "
                "preprocess images with cnclip_vision.image_transform"
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch")
        if self.config.vision.kind == "vit" and tuple(pixel_values.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"this model takes {self.image_size}x{self.image_size} images, got "
                f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]}; "
                f"use cnclip_vision.image_transform({self.image_size})"
            )
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)
        with _compile_options(self):
            if self.int8_backend == "fbgemm" and len(pixels) > 1:  # one image at a time: see int8_backend
                features = torch.cat([self.visual(image[None]) for image in pixels])
            else:
                features = self.visual(pixels)
        return _unit(features) if normalize else features

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """Projected text features ``[N, embed_dim]`` from token ids ``[N, L]``.

        Without ``attention_mask`` the mask is ``input_ids != 0`` (``[PAD]``), as in the original model.
        Token type ids are zeros.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
            raise ValueError(f"input_ids must be an integer tensor [N, L], got {shape}; use cnclip_vision.tokenize")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids is an empty batch")
        if input_ids.shape[1] > self.config.text.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; the text tower takes at most "
                f"{self.config.text.max_position_embeddings}"
            )
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = input_ids != 0
        with _compile_options(self):
            hidden = self.text(input_ids=input_ids, attention_mask=attention_mask.to(self.device)).last_hidden_state
        features = self.text_projection(hidden[:, 0])
        return _unit(features) if normalize else features

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> CLIPOutput:
        """``exp(logit_scale) * cosine`` between every image and every text."""
        image_embeds = self.encode_image(pixel_values, normalize=True)
        text_embeds = self.encode_text(input_ids, attention_mask, normalize=True)
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()
        return CLIPOutput(logits_per_text.t(), logits_per_text, image_embeds, text_embeds)

    def similarity(self, images: Sequence[ImageSource] | torch.Tensor, texts: str | Sequence[str]) -> torch.Tensor:
        """Cosine similarity ``[num_images, num_texts]`` between raw images and texts, in [-1, 1].

        Softmax over ``exp(logit_scale) * cosine`` ranks candidate texts *relative to each other*; to ask
        whether one image and one text are related at all, compare the cosine with a threshold chosen on
        labelled pairs of your data (see the README's "Similarity calibration").
        """
        from cnclip_vision.models.encode import encode_images, encode_texts

        texts = [texts] if isinstance(texts, str) else texts
        return encode_images(self, images) @ encode_texts(self, texts).t()

    def get_processor(self) -> Processor:
        """The preprocessing that matches this model (tokenizer + image transform)."""
        from cnclip_vision.data.processor import Processor

        return Processor(image_size=self.image_size)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``model.safetensors``, ``config.json`` (readable by transformers for ViT sizes), the vocab
        and the preprocessor config. Files are written to a temporary name and renamed."""
        from cnclip_vision.models.weights import save_pretrained

        save_pretrained(self, directory)


def _compile_options(model: ChineseCLIP) -> contextlib.AbstractContextManager[object]:
    """Inductor freezing while a compiled tower runs for inference on the CPU. Freezing is read when a graph
    compiles (the first call of a shape), not by ``torch.compile(options=...)``; measured on ViT-B-16 bf16 b32,
    AVX512-BF16 EPYC: 17.0 → 19.0 img/s (README, "Performance")."""
    if not model.freeze_compiled or torch.is_grad_enabled():
        return contextlib.nullcontext()
    from torch._inductor import config

    return config.patch(freezing=True)


def _unit(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised in float32 (a bf16 unit vector is up to ~0.4% off unit length)."""
    return F.normalize(features.float(), dim=-1)
