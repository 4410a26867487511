"""The Chinese-CLIP image towers as backbones: timm models (registered on import) and torchvision
detection backbones (ViTDet simple feature pyramid)."""

from . import timm_models
from .pyramid import ViTDetBackbone, anchor_generator, dense_image_embeddings, detector_kwargs, vit_fpn_backbone
from .timm_models import TIMM_NAMES

__all__ = [
    "TIMM_NAMES",
    "ViTDetBackbone",
    "anchor_generator",
    "dense_image_embeddings",
    "detector_kwargs",
    "timm_models",
    "vit_fpn_backbone",
]
