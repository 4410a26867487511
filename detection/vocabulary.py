"""What goes into the detector besides images: the vocabulary (names, class embeddings, which were seen in
training), image-conditioned queries, and the checks of the inference options shared by the model and its
predictor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from cnclip_vision.data.transforms import ImageSource

__all__ = [
    "ImageQuery",
    "Label",
    "VLM_MODES",
    "VLMMode",
    "Vocabulary",
    "check_labels",
    "check_thresholds",
    "check_vlm_mode",
]

VLMMode = Literal["crops", "dense", "off"]
VLM_MODES: tuple[VLMMode, ...] = get_args(VLMMode)


@dataclass(frozen=True)
class ImageQuery:
    """An image-conditioned (one-shot) query: the class embedding is the image embedding of ``image``
    (cropped to ``box`` = xyxy pixels, if given), named ``name`` in the predictions."""

    image: ImageSource
    name: str
    box: tuple[float, float, float, float] | None = None


@dataclass
class Vocabulary:
    """Class embeddings ``[C, embed_dim]`` (normalised) with their names and which were seen in training."""

    names: list[str]
    embeddings: torch.Tensor
    seen: torch.Tensor = field(repr=False)  # bool [C]

    def __len__(self) -> int:
        return len(self.names)


Label = str | ImageQuery


def check_vlm_mode(mode: str) -> None:
    if mode not in VLM_MODES:
        raise ValueError(f"vlm_mode={mode!r}; allowed values: {', '.join(map(repr, VLM_MODES))}")


def check_thresholds(score_threshold: float, nms_threshold: float, max_detections: int) -> None:
    if not 0 <= score_threshold <= 1:
        raise ValueError(f"score_threshold={score_threshold!r}; expected a value in [0, 1]")
    if not 0 < nms_threshold <= 1:
        raise ValueError(f"nms_threshold={nms_threshold!r}; expected a value in (0, 1]")
    if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
        raise ValueError(f"max_detections={max_detections!r}; expected a positive int")


def check_labels(labels: Sequence[Label]) -> list[str]:
    if isinstance(labels, (str, ImageQuery)) or not isinstance(labels, Sequence):
        raise TypeError(f"labels must be a list of label names or ImageQuery objects, got {type(labels).__name__}")
    if len(labels) == 0:
        raise ValueError("the label list is empty: pass at least one label")
    names = []
    for i, x in enumerate(labels):
        name = x.name if isinstance(x, ImageQuery) else x
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"labels[{i}]={x!r}: expected a non-empty string or an ImageQuery with a name")
        names.append(name)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate labels {dupes}: each label must be unique (merge synonyms into one name)")
    return names
