"""Top-k cosine search of an embeddings collection: exact (chunked matrix products, optionally FAISS's flat
index) in memory, or approximate through the FAISS index that ``cnclip index build`` wrote beside the
embeddings (:mod:`.ann`), memory-mapped where FAISS allows, without loading the embeddings."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cnclip_vision.errors import CNClipError
from cnclip_vision.retrieval import store

if TYPE_CHECKING:
    from cnclip_vision.data.transforms import ImageSource
    from cnclip_vision.models.clip import ChineseCLIP
    from cnclip_vision.retrieval.ann import AnnIndex

logger = logging.getLogger("cnclip_vision.retrieval")

__all__ = ["EmbeddingIndex", "Hit"]


@dataclass(frozen=True)
class Hit:
    """One search result: rank (0 = best), database row, id and cosine score."""

    rank: int
    index: int
    id: str
    score: float


def _stable_topk(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row, ordered by score descending then index ascending."""
    by_index = indices.argsort(dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row of a score block, ties at the cut resolved towards the lower index."""
    values, idx = scores.topk(k, dim=1)
    tied = ((scores >= values[:, -1:]).sum(dim=1) > k).nonzero().flatten()
    for row in tied.tolist():  # rare: more candidates tie with the k-th score than fit
        order = scores[row].argsort(descending=True, stable=True)[:k]
        values[row], idx[row] = scores[row, order], order
    return values, idx


class EmbeddingIndex:
    """Top-k cosine search over ``embeddings [N, D]`` (rows L2-normalised, as written by the extract
    functions; rows that are not are normalised on construction when ``normalize``).

    Exact search (the constructor): queries are normalised and scored against the database in
    ``query_chunk_size x db_chunk_size`` blocks with a running top-k, so neither a ``[Q, N]`` matrix nor a
    float32 copy of a float16 database is ever made; ties go to the lower row. ``device`` moves the
    database there once (e.g. ``"cuda"``); results come back on the CPU. ``use_faiss=True`` searches a
    ``faiss.IndexFlatIP`` instead (exact too; order among equal scores is then FAISS's).

    :meth:`from_dir` uses the directory's FAISS index (``cnclip index build``) when there is a current one:
    then :attr:`embeddings` is None, ids are read lazily from ``ids.txt`` and scores are FAISS's (approximate
    for PQ indexes); :attr:`backend` says which search answers.
    """

    def __init__(
        self,
        embeddings: torch.Tensor | np.ndarray,
        ids: Sequence[str] | None = None,
        *,
        normalize: bool = True,
        use_faiss: bool = False,
        device: torch.device | str | None = None,
        query_chunk_size: int = 1024,
        db_chunk_size: int = 16384,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        emb = torch.from_numpy(np.asarray(embeddings)) if isinstance(embeddings, np.ndarray) else embeddings
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.dtype.is_floating_point or len(emb) == 0:
            desc = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a non-empty float [N, D] tensor or array, got {desc}")
        if ids is not None and len(ids) != len(emb):
            raise ValueError(f"{len(ids)} ids for {len(emb)} embeddings")
        if query_chunk_size < 1 or db_chunk_size < 1:
            raise ValueError("chunk sizes must be >= 1")
        if normalize:
            norms = torch.cat([c.double().norm(dim=1) for c in emb.split(db_chunk_size)])
            if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
                logger.info("normalising %d embeddings", len(emb))
                emb = (emb.double() / norms.clamp_min(1e-12)[:, None]).to(emb.dtype)
        self.embeddings: torch.Tensor | None = emb.to(device) if device is not None else emb
        self.ids: Sequence[str] = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(emb))]
        self.device = self.embeddings.device
        self.query_chunk_size, self.db_chunk_size = query_chunk_size, db_chunk_size
        self.manifest = dict(manifest) if manifest is not None else None
        self._size, self._dim = emb.shape
        self._ann: AnnIndex | None = None
        self._faiss = self._build_faiss() if use_faiss else None

    @classmethod
    def from_dir(
        cls,
        directory: str | os.PathLike[str],
        *,
        ann: bool | None = None,
        ann_params: str | None = None,
        mmap: bool = True,
        **kwargs: Any,
    ) -> EmbeddingIndex:
        """Index the embeddings written by :func:`extract_image_embeddings` / :func:`extract_text_embeddings`.

        ``ann=None`` uses the directory's FAISS index when it exists and matches the embeddings (a stale one
        is ignored with a warning), else exact search over the embeddings loaded into memory; ``ann=True``
        requires the index, ``ann=False`` always searches exactly. ``ann_params`` overrides the tuned
        search parameters (e.g. ``"efSearch=256"``, ``"nprobe=64"``; ValueError when no FAISS index is used or
        they do not apply to it, see :func:`~cnclip_vision.retrieval.ann.parse_search_params`); ``mmap``
        memory-maps the index where FAISS can. ``kwargs`` go to the exact constructor."""
        from cnclip_vision.retrieval.ann import load_ann_index

        directory = Path(directory)
        manifest = store.read_manifest(directory)
        if ann is not False:
            approx = load_ann_index(directory, manifest=manifest, mmap=mmap, params=ann_params, required=bool(ann))
            if approx is not None:
                return cls._approximate(approx, directory, manifest)
        if ann_params:  # never silently ignored
            raise ValueError(
                f"ann_params {ann_params!r} apply to a FAISS index, and {directory} is searched exactly "
                f"({'ann=False' if ann is False else 'it has no current FAISS index'})"
            )
        ids, emb = store.load_embeddings(directory)
        return cls(emb, ids, manifest=manifest, **kwargs)

    @classmethod
    def _approximate(cls, approx: AnnIndex, directory: Path, manifest: dict[str, Any]) -> EmbeddingIndex:
        self = cls.__new__(cls)
        self.embeddings = None
        self.ids = store.LazyIds(
            directory / manifest.get("ids_file", store.IDS_FILE), expected=manifest["num_embedded"]
        )
        self.device = torch.device("cpu")
        self.query_chunk_size, self.db_chunk_size = 1024, 16384
        self.manifest = dict(manifest)
        self._size, self._dim = manifest["num_embedded"], manifest["dim"]
        self._ann, self._faiss = approx, None
        logger.info(
            "searching %s with FAISS %s (%s)", directory, approx.index_key, approx.params or "default parameters"
        )
        return self

    def __len__(self) -> int:
        return self._size

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def backend(self) -> str:
        """``"exact"``, ``"faiss-flat"`` (exact, FAISS) or ``"faiss:<index factory key>"`` (approximate)."""
        if self._ann is not None:
            return f"faiss:{self._ann.index_key}"
        return "faiss-flat" if self._faiss is not None else "exact"

    @property
    def ann_info(self) -> dict[str, Any] | None:
        """The FAISS index's description (key, parameters, measured recall and speed), None for exact search."""
        return self._ann.info if self._ann is not None else None

    def _rows(self) -> torch.Tensor:
        """The in-memory embeddings; only an index over a directory's FAISS index has none."""
        if self.embeddings is None:
            raise CNClipError("this index searches a FAISS index and holds no embeddings for exact search")
        return self.embeddings

    def _build_faiss(self) -> Any:
        try:
            import faiss
        except ImportError:
            raise CNClipError("use_faiss=True needs FAISS: pip install faiss-cpu (or faiss-gpu)") from None
        index = faiss.IndexFlatIP(self.dim)
        for chunk in self._rows().split(self.db_chunk_size):
            index.add(np.ascontiguousarray(chunk.float().cpu().numpy()))
        return index

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [Q, k'], indices [Q, k'])`` with ``k' = min(k, N)``: cosine of the best rows, best first.
        An approximate index may find fewer than ``k'`` rows for a query: those slots hold index -1 and
        score -inf."""
        q = torch.from_numpy(np.asarray(queries)) if isinstance(queries, np.ndarray) else queries
        if not isinstance(q, torch.Tensor) or q.ndim != 2 or q.shape[1] != self.dim:
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(queries).__name__
            raise ValueError(f"queries must be a [Q, {self.dim}] tensor (the index dimension), got {shape}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = min(k, len(self))
        if self._ann is not None or self._faiss is not None:
            qn = torch.nn.functional.normalize(q.detach().float().cpu(), dim=1).numpy()
            if self._ann is not None:
                scores, indices = self._ann.search(qn, k)
            elif self._faiss is not None:  # always true here: one of the two indexes is set
                scores, indices = self._faiss.search(np.ascontiguousarray(qn), k)
            scores = np.where(indices < 0, -np.inf, scores).astype(np.float32)
            return torch.from_numpy(scores), torch.from_numpy(indices.astype(np.int64))
        embeddings = self._rows()
        compute = torch.float64 if torch.float64 in (q.dtype, embeddings.dtype) else torch.float32
        q = torch.nn.functional.normalize(q.to(compute), dim=1)
        all_scores, all_indices = [], []
        for q_chunk in q.split(self.query_chunk_size):
            q_chunk = q_chunk.to(self.device)
            best_s = torch.empty(len(q_chunk), 0, dtype=compute, device=self.device)
            best_i = torch.empty(len(q_chunk), 0, dtype=torch.long, device=self.device)
            for start in range(0, len(self), self.db_chunk_size):
                block = embeddings[start : start + self.db_chunk_size].to(self.device, compute)
                s, i = _chunk_topk(q_chunk @ block.T, min(k, len(block)))
                best_s, best_i = _stable_topk(torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1), k)
            all_scores.append(best_s.cpu())
            all_indices.append(best_i.cpu())
        return torch.cat(all_scores), torch.cat(all_indices)

    def search_hits(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> list[list[Hit]]:
        """:meth:`search` with ids: one list of hits per query (rows an approximate index did not fill are left out)."""
        scores, indices = self.search(queries, k)
        return [
            [Hit(rank, idx, self.ids[idx], score) for rank, (idx, score) in enumerate(zip(row_i, row_s)) if idx >= 0]
            for row_i, row_s in zip(indices.tolist(), scores.tolist())
        ]

    def _check_model(self, model: ChineseCLIP) -> None:
        if model.config.embed_dim != self.dim:
            raise ValueError(
                f"the index holds {self.dim}-d embeddings but the model makes "
                f"{model.config.embed_dim}-d ones; use the model the index was built with"
            )
        built_with = (self.manifest or {}).get("model", {})
        if built_with.get("config") not in (None, model.config.to_dict()):
            logger.warning("the index was built with another architecture (%s)", built_with.get("description"))

    def search_text(self, model: ChineseCLIP, texts: str | Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Text queries: text→image on an image index, text→text on a text index. One hit list per text."""
        from cnclip_vision.models.encode import encode_texts

        self._check_model(model)
        return self.search_hits(encode_texts(model, [texts] if isinstance(texts, str) else list(texts)), k)

    def search_image(
        self, model: ChineseCLIP, images: Sequence[ImageSource] | torch.Tensor, k: int = 10
    ) -> list[list[Hit]]:
        """Image queries (paths, PIL images, arrays or a preprocessed batch): image→image on an image index,
        image→text on a text index. One hit list per image."""
        from cnclip_vision.models.encode import encode_images

        self._check_model(model)
        return self.search_hits(encode_images(model, images), k)
