"""cnclip-vision: Chinese-CLIP as a vision toolkit.

>>> import cnclip_vision
>>> model = cnclip_vision.load("ViT-B-16")           # or a directory / clip_cn_*.pt file
>>> processor = model.get_processor()

Importing the package does no work: the public names below are imported on first use, and the timm models
(``chinese_clip_*``) are registered as soon as timm is imported. The rooms: ``models`` (the dual encoder and
its weights), ``data`` (tokenizer, transforms, readers), ``backbones`` (timm / torchvision), ``zeroshot``,
``retrieval``, ``training``, ``toy`` (the toy world), ``export``, ``cli`` and ``detection``.
"""

from ._imports import install_import_hooks, lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "CLIPConfig": "cnclip_vision.models.configs",
    "TextConfig": "cnclip_vision.models.configs",
    "VisionConfig": "cnclip_vision.models.configs",
    "list_models": "cnclip_vision.models.configs",
    "CheckpointError": "cnclip_vision.errors",
    "CNClipError": "cnclip_vision.errors",
    "ImageLoadError": "cnclip_vision.errors",
    "UnknownModelError": "cnclip_vision.errors",
    "WeightsNotFoundError": "cnclip_vision.errors",
    "create_model": "cnclip_vision.models.factory",
    "load": "cnclip_vision.models.factory",
    "ChineseCLIP": "cnclip_vision.models.clip",
    "CLIPOutput": "cnclip_vision.models.clip",
    "Processor": "cnclip_vision.data.processor",
    "EmbeddingIndex": "cnclip_vision.retrieval",
    "evaluate_retrieval": "cnclip_vision.retrieval",
    "extract_image_embeddings": "cnclip_vision.retrieval",
    "extract_text_embeddings": "cnclip_vision.retrieval",
    "Tokenizer": "cnclip_vision.data.tokenizer",
    "get_tokenizer": "cnclip_vision.data.tokenizer",
    "tokenize": "cnclip_vision.data.tokenizer",
    "image_transform": "cnclip_vision.data.transforms",
    "load_image": "cnclip_vision.data.transforms",
    "DEFAULT_TEMPLATES": "cnclip_vision.zeroshot",
    "ZeroShotClassifier": "cnclip_vision.zeroshot",
    "class_embeddings": "cnclip_vision.zeroshot",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

install_import_hooks()
