"""The Chinese-CLIP image towers as backbones: timm models (:mod:`.timm_models`, registered as soon as timm is
imported) and torchvision detection backbones (:mod:`.pyramid`, the ViTDet simple feature pyramid)."""

from cnclip_vision._imports import lazy_exports

_EXPORTS = {
    "TIMM_NAMES": "cnclip_vision.backbones.timm_models",
    "ViTDetBackbone": "cnclip_vision.backbones.pyramid",
    "anchor_generator": "cnclip_vision.backbones.pyramid",
    "dense_image_embeddings": "cnclip_vision.backbones.pyramid",
    "detector_kwargs": "cnclip_vision.backbones.pyramid",
    "vit_fpn_backbone": "cnclip_vision.backbones.pyramid",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
