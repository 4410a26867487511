"""Cross-modal retrieval at scale: embeddings of large collections on disk, extraction on one process or many
(torchrun / srun, Ray Data), exact and FAISS search, recall metrics.

- :mod:`.store` — the embeddings directory: shards assigned by a stable hash of the item id (an insertion
  or removal touches only the shards that hold the changed items), checksums, manifest, readers.
- :mod:`.extract` — :func:`extract_image_embeddings` / :func:`extract_text_embeddings`: resumable, and
  shared out over the ranks of ``torchrun`` or ``srun`` with the manifest written once at the end.
- :mod:`.ray_engine` — the same on a pool of Ray Data actors (optional extra ``ray``).
- :mod:`.ann` — FAISS indexes chosen by size and memory budget (autofaiss's rules), tuned to a target
  recall, written beside the embeddings (``cnclip index build``).
- :mod:`.search` — :class:`EmbeddingIndex`: exact top-k, or the directory's FAISS index when present.
- :mod:`.metrics` — recall@k and the original Chinese-CLIP retrieval evaluation.

Names are imported on first use, so the FAISS side never imports torch.
"""

from cnclip_vision._imports import lazy_exports

_EXPORTS = {
    "EmbeddingIndex": "cnclip_vision.retrieval.search",
    "Hit": "cnclip_vision.retrieval.search",
    "evaluate_retrieval": "cnclip_vision.retrieval.metrics",
    "recall_at_k": "cnclip_vision.retrieval.metrics",
    "ShardJob": "cnclip_vision.retrieval.extract",
    "extract_image_embeddings": "cnclip_vision.retrieval.extract",
    "extract_text_embeddings": "cnclip_vision.retrieval.extract",
    "extract_image_embeddings_ray": "cnclip_vision.retrieval.ray_engine",
    "extract_text_embeddings_ray": "cnclip_vision.retrieval.ray_engine",
    "local_device": "cnclip_vision.retrieval.dist",
    "FORMAT_VERSION": "cnclip_vision.retrieval.store",
    "LazyIds": "cnclip_vision.retrieval.store",
    "ShardError": "cnclip_vision.retrieval.store",
    "item_hash": "cnclip_vision.retrieval.store",
    "iter_shards": "cnclip_vision.retrieval.store",
    "load_embeddings": "cnclip_vision.retrieval.store",
    "num_shards_for": "cnclip_vision.retrieval.store",
    "read_manifest": "cnclip_vision.retrieval.store",
    "save_embeddings": "cnclip_vision.retrieval.store",
    "shard_of": "cnclip_vision.retrieval.store",
    "AnnIndex": "cnclip_vision.retrieval.ann",
    "build_ann_index": "cnclip_vision.retrieval.ann",
    "choose_index_key": "cnclip_vision.retrieval.ann",
    "exact_topk": "cnclip_vision.retrieval.ann",
    "load_ann_index": "cnclip_vision.retrieval.ann",
    "parse_memory": "cnclip_vision.retrieval.ann",
    "read_ann_info": "cnclip_vision.retrieval.ann",
    "TextRecord": "cnclip_vision.data.jsonl",
    "read_text_jsonl": "cnclip_vision.data.jsonl",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
