"""The model side of ``cnclip serve``: everything but HTTP.

:class:`Service` holds the model, the embedding index and (optionally) the detector, loaded once. Its
``async`` methods validate a request, queue it on a :class:`~.batching.MicroBatcher` and return plain
Python results; all model work runs on one worker thread, so concurrent text searches become one text
encoder call and one index search, concurrent image searches and classifications one image encoder call,
concurrent detections with the same labels one detector call. Upload decoding and thumbnails are plain
synchronous methods that the web layer runs in its thread pool.

Bad input raises :class:`ServeError` with an HTTP status and a message meant for the client.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageOps

import cnclip_vision
import cnclip_vision.errors
from cnclip_vision.serve.batching import MicroBatcher, QueueFullError

logger = logging.getLogger(__name__)

__all__ = ["ServeConfig", "ServeError", "Service", "parse_labels"]

_LABEL_SPLIT = re.compile(r"[,，、;；\n\r]+")
_THUMBNAIL_SIZES = (64, 128, 256, 512)


class ServeError(cnclip_vision.errors.CNClipError):
    """A request the service refuses; ``status`` is the HTTP status code, the message is for the client."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServeConfig:
    """Settings of :class:`Service` (and of ``cnclip serve``)."""

    index: str
    model: str = "ViT-B-16"
    detector: str | None = None
    images: str | None = None  # folder the index ids are relative to (default: the manifest's source)
    device: str | None = None
    api_key: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_labels: int = 256
    max_label_chars: int = 64
    max_query_chars: int = 256
    max_k: int = 100
    max_batch: int = 32
    max_detect_batch: int = 8
    batch_wait_ms: float = 2.0
    max_queue: int = 512
    templates: str = "default"
    thumbnail_cache: int = 1024
    classifier_cache: int = 16

    def __post_init__(self) -> None:
        for name in (
            "max_upload_bytes",
            "max_image_pixels",
            "max_labels",
            "max_label_chars",
            "max_query_chars",
            "max_k",
            "max_batch",
            "max_detect_batch",
            "max_queue",
            "thumbnail_cache",
            "classifier_cache",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("the API key must be at least 8 characters long")

    def public(self) -> dict[str, Any]:
        """The settings without the API key."""
        return {k: v for k, v in asdict(self).items() if k != "api_key"}


def parse_labels(text: str | Sequence[str], *, max_labels: int, max_chars: int) -> list[str]:
    """``"猫，狗, 兔子"`` (also ``、``, ``;`` and new lines; or a list) → distinct stripped labels, in order."""
    items = _LABEL_SPLIT.split(text) if isinstance(text, str) else list(text)
    labels = list(dict.fromkeys(s.strip() for s in items if isinstance(s, str) and s.strip()))
    if not labels:
        raise ServeError("labels is empty: give one or more labels separated by ，or , (e.g. 猫，狗)")
    if len(labels) > max_labels:
        raise ServeError(f"too many labels: {len(labels)} (this server accepts at most {max_labels})")
    long = [s for s in labels if len(s) > max_chars]
    if long:
        raise ServeError(f"labels longer than {max_chars} characters: {long[0][:max_chars]}...")
    return labels


def _image_root(config: ServeConfig, manifest: dict[str, Any]) -> Path | None:
    """The folder that the index ids are relative to: ``config.images``, else the embedded folder (or the
    folder of the list file) recorded in the manifest, when it still exists."""
    if config.images is not None:
        root = Path(config.images)
        if not root.is_dir():
            raise cnclip_vision.errors.CNClipError(f"--images {root} is not a folder")
        return root.resolve()
    source = manifest.get("source")
    if isinstance(source, str) and source:
        path = Path(source)
        if path.is_dir():
            return path.resolve()
        if path.is_file():
            return path.parent.resolve()
    return None


class _LRU:
    """A small thread-safe LRU cache."""

    def __init__(self, size: int) -> None:
        self.size, self._data, self._lock = size, OrderedDict[Any, Any](), threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str
    etag: str


class Service:
    """Model, index and detector behind the HTTP API (see the module docstring).

    >>> service = Service.load(ServeConfig(index="photo_emb", model="toy-tiny", detector="toy-detector"))
    >>> await service.start()                      # inside the event loop
    >>> await service.search_text("红色的圆形", k=5)
    """

    def __init__(self, config: ServeConfig, model: Any, index: Any, detector: Any = None) -> None:
        self.config = config
        self.model, self.index, self.detector = model, index, detector
        self._predictor = None
        if detector is not None:
            from cnclip_vision.detection import DetectionPredictor

            self._predictor = DetectionPredictor(detector)  # caches each label list's text embeddings
        if model.config.embed_dim != index.dim:
            raise cnclip_vision.errors.CNClipError(
                f"the index {config.index} holds {index.dim}-d embeddings but the model {config.model} makes "
                f"{model.config.embed_dim}-d ones: pass the --model the index was built with"
            )
        built_with = (index.manifest or {}).get("model", {})
        if built_with.get("config") not in (None, model.config.to_dict()):
            raise cnclip_vision.errors.CNClipError(
                f"the index {config.index} was built with another architecture ({built_with.get('description')}) "
                f"than --model {config.model}: pass the --model the index was built with"
            )
        self.modality = (index.manifest or {}).get("modality", "image")
        self.image_root = _image_root(config, index.manifest or {})
        if self.modality == "image" and self.image_root is None:
            logger.warning("the folder of the indexed images is unknown or gone: thumbnails are off (pass --images)")
        self._row = {id_: n for n, id_ in enumerate(index.ids)}
        self._thumbnails = _LRU(config.thumbnail_cache)
        self._classifiers = _LRU(config.classifier_cache)
        self._executor: ThreadPoolExecutor | None = None
        self._batchers: dict[str, MicroBatcher[Any, Any]] = {}
        self.started_at = time.time()

    @classmethod
    def load(cls, config: ServeConfig) -> Service:
        """Load the model, the index and the detector named by ``config``."""
        device = config.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        index_dir = Path(config.index)
        if not (index_dir / "manifest.json").is_file():
            raise cnclip_vision.errors.CNClipError(
                f"{index_dir} is not an embedding directory (no manifest.json): make one with "
                f"`cnclip embed IMAGES --out {index_dir} --model {config.model}`"
            )
        logger.info("loading model %s on %s", config.model, device)
        model = cnclip_vision.load(config.model, device=device)
        index = cnclip_vision.EmbeddingIndex.from_dir(index_dir)
        logger.info(
            "index %s: %d %s embeddings, %s search",
            index_dir,
            len(index),
            (index.manifest or {}).get("modality"),
            index.backend,
        )
        detector = None
        if config.detector:
            from cnclip_vision.detection import OpenVocabDetector

            logger.info("loading detector %s", config.detector)
            detector = OpenVocabDetector.from_pretrained(config.detector, device=device)
        return cls(config, model, index, detector)

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the model worker thread and the batchers (inside the running event loop)."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnclip-model")
        wait = self.config.batch_wait_ms / 1000
        common: dict[str, Any] = dict(executor=self._executor, max_wait_s=wait, max_queue=self.config.max_queue)
        size = self.config.max_batch
        self._batchers = {
            "search_text": MicroBatcher(self._search_text_batch, max_batch=size, name="search_text", **common),
            "search_image": MicroBatcher(self._search_image_batch, max_batch=size, name="search_image", **common),
            "classify": MicroBatcher(self._classify_batch, max_batch=size, name="classify", **common),
            "detect": MicroBatcher(
                self._detect_batch,
                max_batch=self.config.max_detect_batch,
                key=lambda item: item[1],
                name="detect",
                **common,
            ),
        }
        for batcher in self._batchers.values():
            batcher.start()

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()
        self._batchers = {}
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    async def _submit(self, kind: str, item: Any) -> Any:
        batcher = self._batchers.get(kind)
        if batcher is None:
            raise RuntimeError("the service is not started")
        try:
            return await batcher.submit(item)
        except QueueFullError as e:
            raise ServeError(str(e), status=503) from None

    # ------------------------------------------------------------------------------------- requests
    def check_query(self, text: str) -> str:
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            raise ServeError("the query is empty: type a few words, e.g. 红色的圆形")
        if len(text) > self.config.max_query_chars:
            raise ServeError(
                f"the query has {len(text)} characters; at most {self.config.max_query_chars} are accepted"
            )
        return text

    def check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.config.max_k:
            raise ServeError(f"k must be an integer from 1 to {self.config.max_k}, got {k!r}")
        return k

    def labels(self, text: str | Sequence[str]) -> list[str]:
        return parse_labels(text, max_labels=self.config.max_labels, max_chars=self.config.max_label_chars)

    async def search_text(self, text: str, k: int = 10) -> list[dict[str, Any]]:
        """Best ``k`` index entries for a text query: ``[{rank, id, score, thumbnail}]``."""
        return await self._submit("search_text", (self.check_query(text), self.check_k(k)))

    async def search_image(self, image: Image.Image, k: int = 10) -> list[dict[str, Any]]:
        """Best ``k`` index entries for an image query (a decoded upload)."""
        return await self._submit("search_image", (image, self.check_k(k)))

    async def classify(
        self, image: Image.Image, labels: str | Sequence[str], top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """Zero-shot probabilities of ``labels`` for ``image``, best first: ``[{label, prob, score}]``."""
        names = tuple(self.labels(labels))
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ServeError(f"top_k must be a positive integer, got {top_k!r}")
        return await self._submit("classify", (image, names, top_k))

    async def detect(
        self, image: Image.Image, labels: str | Sequence[str], threshold: float = 0.3
    ) -> list[dict[str, Any]]:
        """Boxes of ``labels`` in ``image`` with score >= ``threshold``: ``[{box, label, score}]``, best first,
        boxes as ``[x1, y1, x2, y2]`` in pixels of the original image."""
        if self.detector is None:
            raise ServeError("this server runs without a detector: start it with --detector (e.g. toy-detector)", 503)
        names = tuple(self.labels(labels))
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ServeError(f"threshold must be a number from 0 to 1, got {threshold!r}")
        return await self._submit("detect", (image, names, float(threshold)))

    # --------------------------------------------------------------------- batched model work (worker)
    def thumbnail_url(self, id_: str) -> str | None:
        if self.modality != "image" or (self.image_root is None and not Path(id_).is_absolute()):
            return None
        return f"/api/thumbnail?id={quote(id_, safe='')}"

    def _hits(self, hits: Sequence[Any], k: int) -> list[dict[str, Any]]:
        return [
            {"rank": h.rank + 1, "id": h.id, "score": round(float(h.score), 6), "thumbnail": self.thumbnail_url(h.id)}
            for h in hits[:k]
        ]

    def _search_text_batch(self, items: list[tuple[str, int]]) -> list[list[dict[str, Any]]]:
        k = max(k for _, k in items)
        hits = self.index.search_text(self.model, [text for text, _ in items], k=k)
        return [self._hits(h, k_) for h, (_, k_) in zip(hits, items)]

    def _search_image_batch(self, items: list[tuple[Image.Image, int]]) -> list[list[dict[str, Any]]]:
        k = max(k for _, k in items)
        hits = self.index.search_image(self.model, [image for image, _ in items], k=k)
        return [self._hits(h, k_) for h, (_, k_) in zip(hits, items)]

    def _classifier(self, labels: tuple[str, ...]) -> Any:
        clf = self._classifiers.get(labels)
        if clf is None:
            clf = cnclip_vision.ZeroShotClassifier(self.model, list(labels), templates=self.config.templates)
            self._classifiers.put(labels, clf)
        return clf

    def _classify_batch(
        self, items: list[tuple[Image.Image, tuple[str, ...], int | None]]
    ) -> list[list[dict[str, Any]]]:
        first = self._classifier(items[0][1])
        features = first.image_features([image for image, _, _ in items])  # one image-encoder call
        out = []
        for row, (_, labels, top_k) in zip(features, items):
            clf = self._classifier(labels)
            cosine = clf.scores_from_features(row[None])
            probs = clf.probabilities(cosine)[0].tolist()
            order = sorted(range(len(labels)), key=lambda j: -probs[j])[: top_k or len(labels)]
            out.append(
                [
                    {"label": labels[j], "prob": round(probs[j], 6), "score": round(float(cosine[0, j]), 6)}
                    for j in order
                ]
            )
        return out

    def _detect_batch(self, items: list[tuple[Image.Image, tuple[str, ...], float]]) -> list[list[dict[str, Any]]]:
        if self._predictor is None:  # detect() already refuses requests when there is no detector
            raise ServeError("this server runs without a detector: start it with --detector (e.g. toy-detector)", 503)
        labels = list(items[0][1])  # the batcher groups detections by their labels
        floor = min(t for _, _, t in items)
        results = self._predictor.predict(
            [image for image, _, _ in items], labels, score_threshold=floor, batch_size=len(items)
        )
        out = []
        for result, (_, _, threshold) in zip(results, items):
            dets = [
                {"box": [round(float(v), 2) for v in box], "label": name, "score": round(float(score), 6)}
                for box, name, score in zip(result["boxes"].tolist(), result["label_names"], result["scores"].tolist())
                if score >= threshold
            ]
            out.append(sorted(dets, key=lambda d: -d["score"]))
        return out

    # ------------------------------------------------------------------------- uploads and thumbnails
    def decode_upload(self, data: bytes, what: str = "the upload") -> Image.Image:
        """Decode an uploaded image (any format Pillow reads) to RGB, refusing non-images, empty or over-large
        uploads and decompression bombs (more than ``max_image_pixels``) before decoding the pixels."""
        if not data:
            raise ServeError(f"{what} is empty: send an image file (PNG, JPEG, WebP, ...)", 422)
        if len(data) > self.config.max_upload_bytes:
            raise ServeError(f"{what} is {len(data)} bytes, over the limit of {self.config.max_upload_bytes}", 413)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except Image.DecompressionBombError:
            limit = self.config.max_image_pixels
            raise ServeError(f"{what} has more pixels than this server decodes ({limit})", 413) from None
        except Exception:  # noqa: BLE001 - Pillow raises many types for garbage; the client only needs to know
            raise ServeError(f"{what} is not an image (PNG, JPEG, WebP, GIF, BMP or TIFF expected)", 415) from None
        if width * height > self.config.max_image_pixels:
            raise ServeError(
                f"{what} is {width}x{height} = {width * height} pixels, over the limit of "
                f"{self.config.max_image_pixels} (a decompression bomb?)",
                413,
            )
        try:
            return cnclip_vision.load_image(data)
        except cnclip_vision.errors.ImageLoadError as e:
            message = str(e).replace(f"image bytes (length {len(data)})", what)
            raise ServeError(message, 422) from None

    def thumbnail(self, id_: str, size: int = 256) -> Thumbnail:
        """A JPEG of the indexed image ``id_`` fitted into ``size`` pixels (cached). Only ids of the index are
        served, and only files inside the image folder: anything else is a 404."""
        if self.modality != "image":
            raise ServeError("this index holds texts, not images: there are no thumbnails", 404)
        if id_ not in self._row:
            raise ServeError("no such image in the index", 404)
        size = next((s for s in _THUMBNAIL_SIZES if s >= size), _THUMBNAIL_SIZES[-1])
        cached = self._thumbnails.get((id_, size))
        if cached is not None:
            return cached
        path = self._indexed_path(id_)
        try:
            image = cnclip_vision.load_image(path)
        except cnclip_vision.errors.ImageLoadError:
            logger.warning("thumbnail of %r: %s cannot be read any more", id_, path)
            raise ServeError("the image file of this index entry cannot be read", 404) from None
        image = ImageOps.contain(image, (size, size), Image.Resampling.LANCZOS) if max(image.size) > size else image
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        thumb = Thumbnail(data, "image/jpeg", '"' + hashlib.sha1(data).hexdigest()[:20] + '"')
        self._thumbnails.put((id_, size), thumb)
        return thumb

    def _indexed_path(self, id_: str) -> Path:
        if self.image_root is None:
            path = Path(id_)
            if not path.is_absolute():
                raise ServeError("thumbnails are off: the server does not know the image folder (--images)", 404)
            return path
        path = (self.image_root / id_).resolve()
        if not path.is_relative_to(self.image_root) or not path.is_file():
            raise ServeError("no such image in the index", 404)
        return path

    # ------------------------------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        """What the page needs to know about this server."""
        det = self.detector
        seen = list(getattr(getattr(det, "config", None), "seen_categories", ()) or ())
        return {
            "model": self.config.model,
            "embed_dim": self.index.dim,
            "index": {
                "size": len(self.index),
                "modality": self.modality,
                "thumbnails": self.image_root is not None,
                "search": self.index.backend,
            },
            "detector": self.config.detector if det is not None else None,
            "example_labels": seen[:6],
            "limits": {
                k: getattr(self.config, k)
                for k in (
                    "max_upload_bytes",
                    "max_image_pixels",
                    "max_labels",
                    "max_label_chars",
                    "max_query_chars",
                    "max_k",
                )
            },
        }

    def stats(self) -> dict[str, Any]:
        return {name: b.stats.as_dict() | {"queued": b.pending} for name, b in self._batchers.items()}


def picture_data_url(image: Image.Image, detections: Sequence[dict[str, Any]]) -> str:
    """The image with its boxes and Chinese labels drawn, as a ``data:image/png;base64,...`` URL."""
    import torch

    from cnclip_vision.detection import draw_detections

    drawn = draw_detections(
        image,
        {
            "boxes": torch.tensor([d["box"] for d in detections], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([d["score"] for d in detections], dtype=torch.float32),
            "label_names": [d["label"] for d in detections],
        },
    )
    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
