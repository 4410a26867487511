"""Recall metrics as the original Chinese-CLIP evaluation (``cn_clip/eval``): candidates ranked by inner
product of normalised features, ties by input order (``make_topk_predictions.py``: ``sorted(...,
reverse=True)``); R@k of a query is 1 when *any* of its ground-truth items is in the top k
(``evaluation.py``, ``compute_score``), averaged over the queries of the annotation, in percent. Text→image
queries are the annotated texts against all images; image→text queries are the images of the annotation,
each with the texts that list it (``transform_ir_annotation_to_tr.py``), against all texts
(``evaluation_tr.py``). Mean recall is the mean of the six values (t2i and i2t R@1/5/10), the "MR" of the
Chinese-CLIP tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cnclip_vision.errors import CNClipError
from cnclip_vision.retrieval.search import EmbeddingIndex

logger = logging.getLogger("cnclip_vision.retrieval")

__all__ = ["evaluate_retrieval", "recall_at_k"]


def _recall_from_ranking(
    ranking: torch.Tensor, ground_truth: Sequence[Iterable[int]], ks: Sequence[int]
) -> dict[int, float]:
    if len(ranking) != len(ground_truth):
        raise ValueError(f"{len(ground_truth)} ground-truth sets for {len(ranking)} queries")
    if len(ranking) == 0:
        raise ValueError("no queries to evaluate")
    hits = dict.fromkeys(ks, 0)
    for row, gt in zip(ranking.tolist(), ground_truth):
        gt = set(gt)
        first = next((rank for rank, idx in enumerate(row) if idx in gt), None)
        if first is not None:
            for k in ks:
                hits[k] += first < k
    return {k: 100.0 * hits[k] / len(ranking) for k in ks}


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


def recall_at_k(
    similarity: torch.Tensor | np.ndarray, ground_truth: Sequence[Iterable[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Recall@k in percent of a ``[Q, N]`` similarity matrix: the share of queries with at least one of
    their ground-truth columns among the k best (ties by column order, as the original's stable sort).
    A query with no ground truth counts as a miss, as in the original ``compute_score``."""
    ks = _check_ks(ks)
    sim = torch.as_tensor(similarity)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a [Q, N] matrix, got shape {tuple(sim.shape)}")
    ranking = sim.argsort(dim=1, descending=True, stable=True)[:, : max(ks)]
    return _recall_from_ranking(ranking, ground_truth, ks)


def _image_lookup(image_ids: Sequence[str]) -> Callable[[str], int | None]:
    """Ground-truth image id → row: the id itself, else the id without its file extension ("123" finds
    "123.jpg"; MUGE annotations use bare integers)."""
    exact = {i: n for n, i in enumerate(image_ids)}
    stems: dict[str, int | None] = {}
    for n, i in enumerate(image_ids):
        stem = i.rsplit(".", 1)[0] if "." in i.rsplit("/", 1)[-1] else i
        stems[stem] = None if stem in stems and stems[stem] != n else n

    def find(gt: str) -> int | None:
        if gt in exact:
            return exact[gt]
        if gt in stems and stems[gt] is None:
            raise CNClipError(f"ground-truth image id {gt!r} matches several images (e.g. {gt}.jpg and {gt}.png)")
        return stems.get(gt)

    return find


def evaluate_retrieval(
    text_embeddings: torch.Tensor | np.ndarray,
    text_ids: Sequence[str],
    image_embeddings: torch.Tensor | np.ndarray,
    image_ids: Sequence[str],
    ground_truth: Mapping[str, Iterable[str | int]],
    *,
    ks: Sequence[int] = (1, 5, 10),
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Text→image and image→text recall@k (percent) and mean recall, as the original Chinese-CLIP
    evaluation (see the module docstring).

    ``ground_truth`` maps each annotated text id to its image ids (a MUGE JSONL's ``image_ids``); image
    ids match ``image_ids`` exactly or without a file extension. Texts are the t2i queries; the images
    listed in the annotation are the i2t queries. Ground-truth images missing from ``image_ids`` (e.g.
    unreadable files) cannot be retrieved and are not i2t queries; their number is ``missing_images``.
    """
    ks = _check_ks(ks)
    text_index = {str(t): n for n, t in enumerate(text_ids)}
    unknown = [t for t in ground_truth if str(t) not in text_index]
    if unknown:
        raise ValueError(f"{len(unknown)} annotated texts have no embedding, e.g. {unknown[:3]}")
    find_image = _image_lookup([str(i) for i in image_ids])
    queries: list[int] = []
    t2i_gt: list[set[int]] = []
    i2t_gt: dict[int, set[int]] = {}
    missing: set[str] = set()
    for text_id, gt_images in ground_truth.items():
        rows: set[int] = set()
        for image_id in map(str, gt_images):
            row = find_image(image_id)
            if row is None:
                missing.add(image_id)
                continue
            rows.add(row)
            i2t_gt.setdefault(row, set()).add(text_index[str(text_id)])
        queries.append(text_index[str(text_id)])
        t2i_gt.append(rows)
    if missing:
        logger.warning(
            "%d ground-truth images have no embedding (unreadable or not in the image set), e.g. %s",
            len(missing),
            sorted(missing)[:3],
        )
    if not i2t_gt:
        raise CNClipError("no annotated image is in the image set: check that the image ids match the annotation")
    text_index_ = EmbeddingIndex(torch.as_tensor(text_embeddings), list(map(str, text_ids)), device=device)
    image_index = EmbeddingIndex(torch.as_tensor(image_embeddings), list(map(str, image_ids)), device=device)
    text_rows, image_rows = text_index_.embeddings, image_index.embeddings
    if text_rows is None or image_rows is None:  # built from tensors: exact indexes always hold their rows
        raise RuntimeError("retrieval_metrics needs in-memory embeddings")
    t2i = _recall_from_ranking(image_index.search(text_rows[queries], max(ks))[1], t2i_gt, ks)
    i2t_rows = list(i2t_gt)
    i2t = _recall_from_ranking(text_index_.search(image_rows[i2t_rows], max(ks))[1], [i2t_gt[r] for r in i2t_rows], ks)
    result: dict[str, Any] = {f"t2i_R@{k}": v for k, v in t2i.items()}
    result.update({f"i2t_R@{k}": v for k, v in i2t.items()})
    result["t2i_mean_recall"] = sum(t2i.values()) / len(ks)
    result["i2t_mean_recall"] = sum(i2t.values()) / len(ks)
    result["mean_recall"] = (sum(t2i.values()) + sum(i2t.values())) / (2 * len(ks))
    result.update(
        num_texts=len(text_ids),
        num_images=len(image_ids),
        num_t2i_queries=len(queries),
        num_i2t_queries=len(i2t_rows),
        missing_images=len(missing),
    )
    return result
