"""The Chinese-CLIP image towers as backbones: timm models (registered on import) and torchvision
detection backbones."""

from . import timm_models
from .timm_models import TIMM_NAMES

__all__ = ["TIMM_NAMES", "timm_models"]
