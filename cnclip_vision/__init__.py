"""cnclip-vision: Chinese-CLIP as a vision toolkit.

>>> import cnclip_vision
>>> model = cnclip_vision.load("ViT-B-16")           # or a directory / clip_cn_*.pt file
>>> processor = model.get_processor()
"""

from . import backbones, toymodel  # noqa: F401  (registers the timm models and the shipped toy model)
from .configs import CLIPConfig, TextConfig, VisionConfig, list_models
from .errors import CheckpointError, CNClipError, ImageLoadError, UnknownModelError, WeightsNotFoundError
from .factory import create_model, load
from .model import ChineseCLIP, CLIPOutput
from .processor import Processor
from .retrieval import EmbeddingIndex, evaluate_retrieval, extract_image_embeddings, extract_text_embeddings
from .tokenizer import Tokenizer, get_tokenizer, tokenize
from .transforms import image_transform, load_image
from .zeroshot import DEFAULT_TEMPLATES, ZeroShotClassifier

__version__ = "0.1.0"

__all__ = [
    "ChineseCLIP",
    "CLIPConfig",
    "CLIPOutput",
    "DEFAULT_TEMPLATES",
    "CNClipError",
    "EmbeddingIndex",
    "CheckpointError",
    "ImageLoadError",
    "Processor",
    "TextConfig",
    "Tokenizer",
    "UnknownModelError",
    "VisionConfig",
    "WeightsNotFoundError",
    "ZeroShotClassifier",
    "create_model",
    "evaluate_retrieval",
    "extract_image_embeddings",
    "extract_text_embeddings",
    "get_tokenizer",
    "image_transform",
    "list_models",
    "load",
    "load_image",
    "tokenize",
]
