"""Data: the tokenizer (:mod:`.tokenizer`), image loading and transforms (:mod:`.transforms`), the processor
(:mod:`.processor`), image folders and batched decoding (:mod:`.images`), training-pair datasets
(:mod:`.datasets`) and the one JSONL reader (:mod:`.jsonl`)."""

from cnclip_vision._imports import lazy_exports

_EXPORTS = {
    "IMAGE_EXTENSIONS": "cnclip_vision.data.images",
    "ImageBatch": "cnclip_vision.data.images",
    "ImageFileDataset": "cnclip_vision.data.images",
    "iter_image_batches": "cnclip_vision.data.images",
    "list_images": "cnclip_vision.data.images",
    "Tokenizer": "cnclip_vision.data.tokenizer",
    "get_tokenizer": "cnclip_vision.data.tokenizer",
    "tokenize": "cnclip_vision.data.tokenizer",
    "image_transform": "cnclip_vision.data.transforms",
    "load_image": "cnclip_vision.data.transforms",
    "Processor": "cnclip_vision.data.processor",
    "TextRecord": "cnclip_vision.data.jsonl",
    "iter_jsonl": "cnclip_vision.data.jsonl",
    "read_text_jsonl": "cnclip_vision.data.jsonl",
    "open_dataset": "cnclip_vision.data.datasets",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
