"""Which model computed an embedding: recorded in embedding manifests and classifier caches, checked by
every reader so that embeddings of two models or precisions are never mixed or compared."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cnclip_vision.models.clip import ChineseCLIP

__all__ = ["model_info", "precision_of", "recorded_precision"]

_PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def precision_of(model: ChineseCLIP) -> str:
    """fp32 / bf16 / fp16 from the parameters' dtype, ``int8`` for a quantised model."""
    if getattr(model, "precision", None) == "int8":
        return "int8"
    return _PRECISION_OF_DTYPE.get(str(model.dtype).removeprefix("torch."), "fp32")


def recorded_precision(record: dict[str, Any]) -> str | None:
    """The precision a :func:`model_info` record states (older records: from their dtype; None if neither)."""
    return record.get("precision") or _PRECISION_OF_DTYPE.get(record.get("dtype") or "")


def model_info(model: ChineseCLIP) -> dict[str, Any]:
    """Config, dtype, precision and a fingerprint of the weights (projections and logit scale, cheap to hash)
    that differs between models and between precisions (int8 included, and its two kernel families)."""
    from cnclip_vision.models.weights import describe

    precision = precision_of(model)
    h = hashlib.sha1(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    h.update(str(model.dtype).encode())
    if precision == "int8":  # same dtype as fp32 (the quantised Linears hide theirs): say it, and whose kernels
        h.update(f"int8 {model.int8_backend}".encode())
    plain = [p for p in model.visual.parameters() if type(p.data) is torch.Tensor]  # not torchao's int8 tensors
    last_visual = plain[-1]
    for tensor in (model.text_projection.weight, last_visual, model.logit_scale):
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "description": describe(model.config),
        "config": model.config.to_dict(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "precision": precision,
        "fingerprint": h.hexdigest()[:16],
        "source": model.source,  # for readers (`cnclip search` loads it when no --model is given)
    }
