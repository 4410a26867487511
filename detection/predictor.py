"""The detector's predictor: the state that is expensive to compute lives here, beside the stateless model
(as segment-anything's ``SamPredictor`` beside ``Sam``).

>>> predictor = DetectionPredictor(OpenVocabDetector.from_pretrained("toy-detector"), score_threshold=0.5)
>>> predictor.set_vocabulary(["红色的圆形", "蓝色的三角形"])      # encoded once, cached
>>> predictor.predict(["scene.png"])                             # the current vocabulary
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from cnclip_vision.backbones.dense import DenseMode, check_dense_mode
from cnclip_vision.data.transforms import ImageSource, as_image_list, load_image
from cnclip_vision.detection.vocabulary import ImageQuery, Label, VLMMode, Vocabulary, check_thresholds, check_vlm_mode
from cnclip_vision.errors import CNClipError

if TYPE_CHECKING:
    from cnclip_vision.detection.model import OpenVocabDetector

logger = logging.getLogger(__name__)

__all__ = ["DetectionPredictor"]


class DetectionPredictor:
    """A detector with a vocabulary, its cache and the inference thresholds.

    Text vocabularies are encoded once per label list (``cache_size`` lists kept, least recently used dropped);
    vocabularies with :class:`ImageQuery` labels are encoded on every :meth:`set_vocabulary` (an image has no
    cheap identity). The detector itself is never changed beyond being put in eval mode while it detects.
    ``precision``: ``"fp32"`` (default), ``"bf16"`` (bf16 autocast around the detector; boxes, RoIAlign and
    NMS stay fp32, results are float32) or ``"auto"`` (bf16 where the device has bf16 units).
    """

    def __init__(
        self,
        detector: OpenVocabDetector,
        *,
        score_threshold: float = 0.3,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        vlm_mode: VLMMode | None = None,
        dense_mode: DenseMode | None = None,
        agnostic_nms: float | None = None,
        batch_size: int = 4,
        cache_size: int = 16,
        precision: str = "fp32",
    ) -> None:
        if not callable(getattr(detector, "encode_vocabulary", None)):
            raise TypeError(f"detector must be an OpenVocabDetector, got {type(detector).__name__}")
        _check_options(  # as a per-call override is
            dict(score_threshold=score_threshold, nms_threshold=nms_threshold, max_detections=max_detections,
                 vlm_mode=vlm_mode, dense_mode=dense_mode, agnostic_nms=agnostic_nms)
        )  # fmt: skip
        for name, value in (("batch_size", batch_size), ("cache_size", cache_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected a positive int")
        if precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision={precision!r}; expected fp32, bf16 or auto")
        if precision == "auto":
            from cnclip_vision.device import auto_precision

            precision = "bf16" if auto_precision(detector.device) in ("bf16", "fp16") else "fp32"
        self.detector = detector
        #: ``bf16``: the backbone, pyramid, heads and crops run under bf16 autocast (box decoding, RoIAlign and
        #: NMS stay fp32); ``fp32``: no autocast.
        self.precision = precision
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.vlm_mode = vlm_mode
        self.dense_mode = dense_mode
        self.agnostic_nms = agnostic_nms
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._vocabulary: Vocabulary | None = None
        self._cache: OrderedDict[tuple[Any, ...], Vocabulary] = OrderedDict()

    # ------------------------------------------------------------------------------------- vocabulary
    @property
    def vocabulary(self) -> Vocabulary | None:
        return self._vocabulary

    def set_vocabulary(self, labels: Sequence[Label], *, seen: Sequence[bool] | None = None) -> Vocabulary:
        """Encode ``labels`` (or take them from the cache) and make them the current vocabulary."""
        cacheable = not isinstance(labels, (str, ImageQuery)) and all(isinstance(x, str) for x in labels)
        key = (tuple(labels), None if seen is None else tuple(bool(s) for s in seen)) if cacheable else None
        vocab = self._cache.get(key) if key is not None else None
        if vocab is None:
            vocab = self.detector.encode_vocabulary(labels, seen=seen)
            if key is not None:
                self._cache[key] = vocab
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        elif key is not None:
            self._cache.move_to_end(key)
        self._vocabulary = vocab
        return vocab

    def use_vocabulary(self, vocabulary: Vocabulary) -> Vocabulary:
        """Use already encoded class embeddings (computed elsewhere, or modified for an ablation)."""
        self._vocabulary = self.detector.check_vocabulary(vocabulary)
        return vocabulary

    def _require_vocabulary(self) -> Vocabulary:
        if self._vocabulary is None:
            raise CNClipError("no vocabulary: pass labels to predict() or call set_vocabulary(labels) first")
        return self._vocabulary

    # ------------------------------------------------------------------------------------- detection
    @torch.no_grad()
    def detect(self, images: list[torch.Tensor], **overrides: Any) -> list[dict[str, torch.Tensor]]:
        """Detections of float ``[3, H, W]`` images in 0..1 (on the detector's device) with the current
        vocabulary: per image ``boxes`` (xyxy pixels), ``scores``, ``labels``, ``embeddings``. ``overrides``:
        ``score_threshold``, ``nms_threshold``, ``max_detections``, ``vlm_mode``, ``dense_mode`` (the last block's
        variant ``dense`` pools), ``agnostic_nms`` (an IoU: a
        class-agnostic NMS after the per-class one, for vocabularies whose labels overlap) for this call."""
        options = self._options(overrides)
        agnostic = options.pop("agnostic_nms")
        detector = self.detector
        was_training = detector.training
        detector.eval()
        bf16 = self.precision == "bf16"
        try:
            with torch.autocast(detector.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = detector(images, self._require_vocabulary(), **options)
        finally:
            detector.train(was_training)
        if bf16:  # results in float32 whatever ran inside
            out = [{k: v.float() if v.is_floating_point() else v for k, v in r.items()} for r in out]
        if agnostic is None:
            return out
        from torchvision.ops import nms

        # after the class-aware NMS: one box per place whatever its label (labels that overlap, e.g. 猫 / 小猫)
        return [{k: v[nms(r["boxes"], r["scores"], agnostic)] for k, v in r.items()} for r in out]

    def predict(
        self,
        images: ImageSource | Sequence[ImageSource],
        labels: Sequence[Label] | None = None,
        **overrides: Any,
    ) -> list[dict[str, Any]]:
        """Detect ``labels`` (default: the current vocabulary) in images of any size and mode (paths, PIL, arrays,
        tensors). One dict per image: ``boxes`` float ``[K, 4]`` (xyxy, pixels of the original image),
        ``scores`` ``[K]``, ``labels`` ``[K]`` (indices into the labels), ``label_names`` (``K`` strings),
        ``embeddings`` ``[K, embed_dim]`` (region embeddings), sorted by score. ``overrides`` as :meth:`detect`
        plus ``batch_size``."""
        batch_size = overrides.pop("batch_size", self.batch_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
        self._options(overrides)  # validate before any work
        vocab = self.set_vocabulary(labels) if labels is not None else self._require_vocabulary()
        batch = as_image_list(images)
        out: list[dict[str, Any]] = []
        device = self.detector.device
        for start in range(0, len(batch), batch_size):
            tensors = [to_tensor(x).to(device) for x in batch[start : start + batch_size]]
            for detections in self.detect(tensors, **overrides):
                r: dict[str, Any] = {k: v.cpu() for k, v in detections.items()}
                r["label_names"] = [vocab.names[j] for j in r["labels"].tolist()]
                out.append(r)
        return out

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        known = {"score_threshold", "nms_threshold", "max_detections", "vlm_mode", "dense_mode", "agnostic_nms"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown detection options {unknown}; known: {sorted(known | {'batch_size'})}")
        options = {
            "score_threshold": self.score_threshold,
            "nms_threshold": self.nms_threshold,
            "max_detections": self.max_detections,
            "vlm_mode": self.vlm_mode,
            "dense_mode": self.dense_mode,  # None: the detector's config.dense_mode
            "agnostic_nms": self.agnostic_nms,
            **overrides,
        }
        return _check_options(options)


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` (every detection option) if each value is valid, else ValueError naming it."""
    _check_agnostic_nms(options["agnostic_nms"])
    check_thresholds(options["score_threshold"], options["nms_threshold"], options["max_detections"])
    if options["vlm_mode"] is not None:
        check_vlm_mode(options["vlm_mode"])
    if options["dense_mode"] is not None:
        check_dense_mode(options["dense_mode"])
    return options


def _check_agnostic_nms(value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
        raise ValueError(f"agnostic_nms={value!r}; expected None or an IoU in (0, 1]")


def to_tensor(image: ImageSource) -> torch.Tensor:
    """Any image source -> float ``[3, H, W]`` in 0..1 (RGB; every mode, EXIF orientation applied)."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(load_image(image)).float().div_(255)
