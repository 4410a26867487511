"""The dual encoder: architectures as data (:mod:`.configs`), the two towers (:mod:`.towers`), the model
(:mod:`.clip`), checkpoint layouts and conversion (:mod:`.weights`), the Hub (:mod:`.hub`), loading
(:mod:`.factory`) and batched encoding of raw texts and images (:mod:`.encode`)."""

from cnclip_vision._imports import lazy_exports

_EXPORTS = {
    "CLIPConfig": "cnclip_vision.models.configs",
    "TextConfig": "cnclip_vision.models.configs",
    "VisionConfig": "cnclip_vision.models.configs",
    "get_config": "cnclip_vision.models.configs",
    "list_models": "cnclip_vision.models.configs",
    "ChineseCLIP": "cnclip_vision.models.clip",
    "CLIPOutput": "cnclip_vision.models.clip",
    "build_image_tower": "cnclip_vision.models.towers",
    "build_text_tower": "cnclip_vision.models.towers",
    "create_model": "cnclip_vision.models.factory",
    "load": "cnclip_vision.models.factory",
    "encode_images": "cnclip_vision.models.encode",
    "encode_texts": "cnclip_vision.models.encode",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
