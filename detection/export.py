"""ONNX export of the open-vocabulary detector, with the vocabulary as an input, checked against PyTorch.

:func:`export_detector_onnx` writes, into one directory:

- ``detector.onnx``: ``image`` float32 ``[3, H, W]`` (RGB in 0..1, any size: the graph resizes, normalises
  and pads as :class:`~cnclip_vision.detection.model.OpenVocabDetector` does), ``class_embeddings`` float32
  ``[C, D]`` (L2-normalised, any ``C``), ``class_seen`` bool ``[C]`` (whether each class was seen in training;
  absent from the graph with ``vlm_mode="off"``, which does not use it) and ``score_threshold`` float32 ``[]``
  → ``boxes`` ``[K, 4]`` (xyxy pixels of the input), ``scores`` ``[K]``, ``labels`` int64 ``[K]`` (rows of
  ``class_embeddings``), ``embeddings`` ``[K, D]`` (region embeddings), sorted by score. The labels are not
  baked in: a new vocabulary is a new ``class_embeddings`` input, never a new export;
- ``text_encoder.onnx`` with ``vocab.txt`` and ``tokenizer_config.json`` (as :func:`cnclip_vision.export.onnx
  .export_onnx` writes them), so class embeddings of new Chinese labels are computed without PyTorch: every
  label in every template of ``detector_onnx_config.json``, encoded, normalised, averaged, normalised again
  (:func:`cnclip_vision.zeroshot.class_embeddings`);
- ``detector_onnx_config.json``: the inputs and outputs, the templates, the categories seen in training, the
  thresholds and the VLM mode baked into the graph; ``export_report.json``: the check.

:class:`OnnxDetector` runs such a directory with onnxruntime alone (labels in, detections out).

The exporter is the TorchScript one (``torch.onnx.export(dynamo=False)``): torchvision's detection parts
(``GeneralizedRCNNTransform``, the RPN, ``MultiScaleRoIAlign``, NMS) carry their ONNX tracing paths and
symbolics for it, and torchvision tests its Faster R-CNN exports with it; ``torch.export`` does not yet take
their data-dependent shapes. The ViT's position-embedding resize (bicubic, antialiased, done for every input
size) becomes an ONNX ``Resize`` with ``antialias=1`` (opset >= 18), numerically the same as PyTorch's. One
image per call (the graph's first axis is the image's channels); ``crops`` runs its ``crop_top_k`` crops
through the tower in one batch.

The check runs onnxruntime (CPU) on images of other sizes and vocabularies of other sizes than the export
example and compares every output with :class:`~cnclip_vision.detection.predictor.DetectionPredictor`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cnclip_vision.data.transforms import ImageSource
from cnclip_vision.detection.vocabulary import VLMMode, Vocabulary, check_thresholds, check_vlm_mode
from cnclip_vision.errors import CNClipError, WorkError

if TYPE_CHECKING:
    from cnclip_vision.detection.model import OpenVocabDetector

__all__ = [
    "DETECTOR_CONFIG_NAME",
    "DETECTOR_NAME",
    "MIN_DETECTOR_OPSET",
    "OnnxDetector",
    "export_detector_onnx",
]

logger = logging.getLogger(__name__)

DETECTOR_NAME = "detector.onnx"
DETECTOR_CONFIG_NAME = "detector_onnx_config.json"
MIN_DETECTOR_OPSET = 18  # Resize with antialias (the ViT's position-embedding resize)
FORMAT = "cnclip-vision-detector-onnx"
# onnxruntime vs PyTorch, float32: box corners in pixels; scores, class and region embeddings elementwise
TOLERANCE = {"boxes": 1e-2, "scores": 1e-4, "embeddings": 1e-4, "class_embeddings": 1e-4}
_OUTPUTS = ("boxes", "scores", "labels", "embeddings")
_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "preprocessor_config.json")


class _DetectorGraph(nn.Module):
    """One image, the class embeddings and the score threshold → detections: exactly the detector's forward."""

    def __init__(self, detector: OpenVocabDetector, vlm_mode: VLMMode, nms_threshold: float, max_detections: int):
        super().__init__()
        self.detector = detector
        self.vlm_mode: VLMMode = vlm_mode
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections

    def forward(
        self, image: torch.Tensor, class_embeddings: torch.Tensor, class_seen: torch.Tensor, score_threshold: Any
    ) -> tuple[torch.Tensor, ...]:
        names = [""] * class_embeddings.shape[0]  # not in the graph: only their count is checked while tracing
        vocabulary = Vocabulary(names, class_embeddings, class_seen)
        (out,) = self.detector(
            [image],
            vocabulary,
            vlm_mode=self.vlm_mode,
            score_threshold=score_threshold,
            nms_threshold=self.nms_threshold,
            max_detections=self.max_detections,
        )
        return tuple(out[k] for k in _OUTPUTS)


def _antialiased_bicubic(g: Any, x: Any, output_size: Any, align_corners: Any, scale_factors: Any) -> Any:
    """``aten::_upsample_bicubic2d_aa`` (align_corners=False) as ONNX ``Resize`` with ``antialias=1``: PIL's
    cubic filter (a = -0.5) with renormalised edge weights, as PyTorch computes it."""
    from torch.onnx import symbolic_helper as helper

    def const(values: list[int]) -> Any:
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    if helper._is_packed_list(output_size):
        parts = [
            g.op("Unsqueeze", s, const([0])) if helper._is_value(s) else const([int(s)])
            for s in helper._unpack_list(output_size)
        ]
        spatial = g.op("Concat", *parts, axis_i=0)
    else:
        spatial = output_size
    leading = g.op("Slice", g.op("Shape", x), const([0]), const([2]))
    sizes = g.op("Concat", leading, g.op("Cast", spatial, to_i=7), axis_i=0)  # 7: int64
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op(
        "Resize",
        x,
        empty,
        empty,
        sizes,
        mode_s="cubic",
        coordinate_transformation_mode_s="half_pixel",
        cubic_coeff_a_f=-0.5,
        antialias_i=1,
        exclude_outside_i=1,
    )


@contextlib.contextmanager
def _symbolics(opset: int) -> Iterator[None]:
    """The antialiased bicubic symbolic registered for the export only."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    name = "aten::_upsample_bicubic2d_aa"
    register_custom_op_symbolic(name, _antialiased_bicubic, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic(name, opset)


def _example_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A toy-world scene (coloured shapes on a textured background; DESIGN.md §7) cropped to ``height`` x
    ``width``, float ``[3, H, W]`` in 0..1: objects with clear edges, so the detections compared are not
    near-ties of flat noise, whose NMS order is decided by rounding."""
    from cnclip_vision.detection.predictor import to_tensor
    from cnclip_vision.toy.world import render, sample_scene

    scene = sample_scene(np.random.default_rng(seed), image_size=max(height, width), n_objects=4)
    return to_tensor(render(scene))[:, :height, :width].contiguous()


def _check_sizes(sizes: Sequence[tuple[int, int]], name: str) -> tuple[tuple[int, int], ...]:
    out = tuple((int(h), int(w)) for h, w in sizes)
    if not out or any(h < 32 or w < 32 for h, w in out):
        raise ValueError(f"{name} must be (height, width) pairs of at least 32 pixels, got {sizes!r}")
    return out


def export_detector_onnx(
    detector: OpenVocabDetector,
    output_dir: str | os.PathLike[str],
    *,
    vlm_mode: VLMMode | None = None,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.5,
    max_detections: int = 100,
    opset: int = MIN_DETECTOR_OPSET,
    text_encoder: bool = True,
    check: bool = True,
    check_image_sizes: Sequence[tuple[int, int]] | None = None,
    check_vocabulary_sizes: Sequence[int] = (1, 7),
    source: str | None = None,
) -> dict[str, Any]:
    """Export a float32 ``detector`` to ``output_dir`` (module docstring); return the report.

    ``vlm_mode`` (default: the detector's), ``nms_threshold`` and ``max_detections`` are baked into the graph;
    ``score_threshold`` is an input (the value here is the config's recommendation and the check's).
    With ``check``, onnxruntime runs the export on images of ``check_image_sizes`` (default: three sizes and
    aspect ratios around the detector's input size, none the export example's) with vocabularies of
    ``check_vocabulary_sizes`` Chinese COCO names, and every output is compared with the PyTorch predictor
    (:data:`TOLERANCE`; equal counts and labels); the class embeddings of the ONNX text encoder are compared
    with :meth:`OpenVocabDetector.encode_vocabulary`. The report is written either way; a failed check
    raises :class:`~cnclip_vision.export.onnx.OnnxCheckError`.
    """
    from cnclip_vision.detection.model import OpenVocabDetector
    from cnclip_vision.export import onnx as clip_onnx

    if not isinstance(detector, OpenVocabDetector):
        raise TypeError(f"export_detector_onnx needs an OpenVocabDetector, got {type(detector).__name__}")
    dtypes = {p.dtype for p in detector.parameters()} | {p.dtype for p in detector.clip.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"export_detector_onnx needs a float32 detector and CLIP, got {sorted(map(str, dtypes))}")
    mode: VLMMode = detector.config.vlm_mode if vlm_mode is None else vlm_mode
    check_vlm_mode(mode)
    if mode == "dense" and detector.config.dense_mode == "naclip":
        raise ValueError(
            "dense_mode 'naclip' cannot be exported yet: its neighbourhood bias depends on the patch grid, which "
            "a traced graph would fix at the example's size; export with another dense_mode (e.g. maskclip)"
        )
    check_thresholds(score_threshold, nms_threshold, max_detections)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_DETECTOR_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_DETECTOR_OPSET} (antialiased Resize), got {opset!r}")
    size = detector.config.image_size
    image_sizes = _check_sizes(
        check_image_sizes or ((size * 3 // 4 + 5, size), (size, size * 5 // 8 + 3), (size * 5 // 4, size * 9 // 8)),
        "check_image_sizes",
    )
    vocabulary_sizes = tuple(int(n) for n in check_vocabulary_sizes)
    if not vocabulary_sizes or min(vocabulary_sizes) < 1:
        raise ValueError(f"check_vocabulary_sizes must be positive ints, got {check_vocabulary_sizes!r}")
    clip_onnx._require("onnx", "ONNX export")
    if text_encoder:
        clip_onnx._require("onnxscript", "ONNX export of the text encoder (torch.onnx's exporter)")
    if check:
        clip_onnx._require("onnxruntime", "checking the ONNX export")
    graph = _DetectorGraph(detector, mode, nms_threshold, max_detections)

    def build(stage: Path, final: Path) -> dict[str, Any]:
        return _export_into(
            graph, stage, final, score_threshold, opset, text_encoder, check, image_sizes, vocabulary_sizes, source
        )

    return clip_onnx.staged_export(output_dir, build, failure=_check_failure)


def _check_failure(check: dict[str, Any]) -> str:
    failed = [c for c in check["cases"] if not c["passed"]]
    if not failed:
        return "the check compared no detections (every case had none above the score threshold)"
    return (
        f"onnxruntime and PyTorch disagree on {len(failed)} of {len(check['cases'])} cases, first: "
        f"{json.dumps(failed[0], ensure_ascii=False)}"
    )


def _export_into(
    graph: _DetectorGraph,
    directory: Path,
    final: Path,
    score_threshold: float,
    opset: int,
    text_encoder: bool,
    check: bool,
    image_sizes: Sequence[tuple[int, int]],
    vocabulary_sizes: Sequence[int],
    source: str | None,
) -> dict[str, Any]:
    """Every file of the export written into the staging ``directory``; the report names ``final``."""
    from cnclip_vision.data.tokenizer import DEFAULT_CONTEXT_LENGTH
    from cnclip_vision.export import onnx as clip_onnx
    from cnclip_vision.zeroshot import resolve_templates

    detector, mode, size = graph.detector, graph.vlm_mode, graph.detector.config.image_size
    example_labels = _check_labels(3, detector.config.seen_categories)
    with clip_onnx._eval_mode(detector), clip_onnx._eval_mode(detector.clip):
        vocabulary = detector.encode_vocabulary(example_labels)
        example = (
            _example_image(size * 2 // 3 + 1, size - 7, seed=0).to(detector.device),
            vocabulary.embeddings,
            vocabulary.seen,
            torch.tensor(score_threshold, dtype=torch.float32),
        )
        logger.info("exporting the detector (vlm_mode=%s, opset %d) to %s", mode, opset, final)
        detector_info = _export_detector(graph, example, directory, opset)
        files = [DETECTOR_NAME, *detector_info["external_data"]]
        text_info = None
        if text_encoder:
            text_info = _export_text_encoder(detector, directory, opset)
            files += [clip_onnx.TEXT_ENCODER_NAME, *text_info["external_data"], *_TOKENIZER_FILES]
    config = {
        "format": FORMAT,
        "format_version": 1,
        "source": source,
        "detector": detector_info,
        "text_encoder": text_info,
        "vlm_mode": mode,
        "score_threshold": score_threshold,
        "nms_threshold": graph.nms_threshold,
        "max_detections": graph.max_detections,
        "embed_dim": detector.embed_dim,
        "image_size": size,
        "image_preprocessing": "RGB, float32 in [0, 1], layout [3, height, width], any size (the graph resizes "
        "the long side to image_size, normalises with the CLIP mean/std and pads to a multiple of 32)",
        "class_embeddings": "per label: normalise(mean over templates of normalise(text_encoder(template "
        "with the label)))",
        "templates": list(resolve_templates(detector.config.templates)),
        "seen_categories": list(detector.config.seen_categories),
        "context_length": DEFAULT_CONTEXT_LENGTH,
        "detector_config": detector.config.to_dict(),
        "exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}",
    }
    clip_onnx._write_json(directory / DETECTOR_CONFIG_NAME, config)
    report: dict[str, Any] = {
        "output_dir": str(final),
        "source": source,
        "vlm_mode": mode,
        "opset": opset,
        "files": sorted([*files, DETECTOR_CONFIG_NAME, clip_onnx.REPORT_NAME]),
        "detector": {k: detector_info[k] for k in ("file", "bytes", "export_seconds")},
        "versions": clip_onnx._versions(),
        "check": _check(detector, directory, image_sizes, vocabulary_sizes, text_encoder) if check else None,
    }
    clip_onnx._write_json(directory / clip_onnx.REPORT_NAME, report)
    return report


def _export_detector(graph: _DetectorGraph, example: tuple[Any, ...], directory: Path, opset: int) -> dict[str, Any]:
    """Trace ``graph`` to ``directory / detector.onnx`` (``directory``: the export's staging folder)."""
    from cnclip_vision.export import onnx as clip_onnx

    inputs = ["image", "class_embeddings", "class_seen", "score_threshold"]
    dynamic = {"image": {1: "height", 2: "width"}, "class_embeddings": {0: "classes"}, "class_seen": {0: "classes"}}
    dynamic.update({name: {0: "detections"} for name in _OUTPUTS})
    start = time.perf_counter()
    with (
        torch.no_grad(),
        warnings.catch_warnings(),
        clip_onnx._quiet_exporter_logs(),
        _symbolics(opset),
    ):
        warnings.simplefilter("ignore")  # tracer warnings: python values fixed in the graph, reviewed here
        try:
            torch.onnx.export(
                graph,
                example,
                str(directory / DETECTOR_NAME),
                dynamo=False,
                opset_version=opset,
                input_names=inputs,
                output_names=list(_OUTPUTS),
                dynamic_axes=dynamic,
            )
        except Exception as e:  # the exporter raises many types; one line that says what failed
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkError(f"ONNX export of the detector failed ({type(e).__name__}): {reason}") from e
    seconds = time.perf_counter() - start
    written = [p for p in directory.iterdir() if p.name.startswith(DETECTOR_NAME)]
    import onnx

    model = onnx.load(str(directory / DETECTOR_NAME), load_external_data=False)
    present = {i.name for i in model.graph.input}
    embed_dim = graph.detector.embed_dim
    specs: list[dict[str, Any]] = [
        {"name": "image", "shape": [3, "height", "width"], "dtype": "float32"},
        {"name": "class_embeddings", "shape": ["classes", embed_dim], "dtype": "float32"},
        {"name": "class_seen", "shape": ["classes"], "dtype": "bool"},
        {"name": "score_threshold", "shape": [], "dtype": "float32"},
    ]
    return {
        "file": DETECTOR_NAME,
        "external_data": [p.name for p in written if p.name != DETECTOR_NAME],
        "bytes": sum((directory / p.name).stat().st_size for p in written),
        "export_seconds": round(seconds, 2),
        "inputs": [spec for spec in specs if spec["name"] in present],  # "off" never reads class_seen
        "outputs": [
            {"name": "boxes", "shape": ["detections", 4], "dtype": "float32"},
            {"name": "scores", "shape": ["detections"], "dtype": "float32"},
            {"name": "labels", "shape": ["detections"], "dtype": "int64"},
            {"name": "embeddings", "shape": ["detections", graph.detector.embed_dim], "dtype": "float32"},
        ],
    }


def _export_text_encoder(detector: OpenVocabDetector, directory: Path, opset: int) -> dict[str, Any]:
    """``text_encoder.onnx`` and the tokenizer files, as the CLIP export writes them."""
    from cnclip_vision.export import onnx as clip_onnx

    clip = detector.clip
    generator = torch.Generator().manual_seed(0)
    ids, mask = clip_onnx._example_texts(2, 7, clip.config.text.vocab_size, generator)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=clip.config.text.max_position_embeddings)
    logger.info("exporting the text encoder")
    info = clip_onnx._export_one(
        clip_onnx._TextEncoder(clip).eval(),
        (ids.to(clip.device), mask.to(clip.device)),
        directory / clip_onnx.TEXT_ENCODER_NAME,
        input_names=["input_ids", "attention_mask"],
        output_name="text_embeds",
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        opset=min(opset, 23),
        weight_bytes=clip_onnx._param_bytes(clip.text, 4) + clip_onnx._param_bytes(clip.text_projection, 4),
    )
    clip_onnx._write_preprocessing(clip.get_processor(), directory)  # vocab.txt, tokenizer_config.json
    info.update(
        inputs=[
            {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64"},
            {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64"},
        ],
        outputs=[{"name": "text_embeds", "shape": ["batch", clip.config.embed_dim], "dtype": "float32"}],
    )
    return info


# ------------------------------------------------------------------------------------------ runtime
class OnnxDetector:
    """An exported detector directory run with onnxruntime: Chinese labels in, detections out, no PyTorch model.

    >>> det = OnnxDetector("exported/")
    >>> det.set_vocabulary(["猫", "狗"])            # through text_encoder.onnx, once
    >>> det.detect("street.jpg")                   # {'boxes', 'scores', 'labels', 'embeddings', 'label_names'}
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        session_options: Any = None,
    ) -> None:
        """``providers`` and ``session_options`` (an ``onnxruntime.SessionOptions``) go to both sessions."""
        import onnxruntime as ort

        self.directory = Path(directory)
        config_path = self.directory / DETECTOR_CONFIG_NAME
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CNClipError(f"{config_path} not found: not a directory written by export_detector_onnx") from e
        except (OSError, ValueError) as e:
            raise CNClipError(f"cannot read {config_path}: {e}") from e
        if self.config.get("format") != FORMAT:
            raise CNClipError(f"{config_path}: format {self.config.get('format')!r}, expected {FORMAT!r}")
        options = session_options or ort.SessionOptions()
        if session_options is None:
            options.log_severity_level = 3  # errors only
        self._detector = ort.InferenceSession(str(self.directory / DETECTOR_NAME), options, providers=list(providers))
        self._inputs = {i.name for i in self._detector.get_inputs()}
        text_path = self.directory / self.config["text_encoder"]["file"] if self.config.get("text_encoder") else None
        self._text = ort.InferenceSession(str(text_path), options, providers=list(providers)) if text_path else None
        self.names: list[str] = []
        self.class_embeddings: np.ndarray | None = None
        self.class_seen: np.ndarray | None = None

    def encode_vocabulary(self, labels: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """``[C, D]`` normalised class embeddings of Chinese ``labels`` through ``text_encoder.onnx``."""
        if self._text is None:
            raise CNClipError(f"{self.directory} has no text encoder (exported with text_encoder=False)")
        from cnclip_vision.data.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(self.directory / "vocab.txt")
        templates = self.config["templates"]
        prompts = [t.format(label) for label in labels for t in templates]
        rows = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(
                prompts[start : start + batch_size], context_length=self.config["context_length"], return_tensors="np"
            )
            (out,) = self._text.run(
                ["text_embeds"], {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
            )
            rows.append(out)
        features = _normalise(np.concatenate(rows).astype(np.float32))
        return _normalise(features.reshape(len(labels), len(templates), -1).mean(1))

    def set_vocabulary(
        self, labels: Sequence[str], *, embeddings: np.ndarray | None = None, seen: Sequence[bool] | None = None
    ) -> None:
        """Make ``labels`` the vocabulary (their ``embeddings`` if given, else encoded); ``seen`` defaults to
        the categories seen in training."""
        from cnclip_vision.detection.vocabulary import check_labels

        names = check_labels(list(labels))
        vectors = self.encode_vocabulary(names) if embeddings is None else np.asarray(embeddings, np.float32)
        if vectors.shape != (len(names), self.config["embed_dim"]):
            raise ValueError(
                f"embeddings have shape {vectors.shape}; expected ({len(names)}, {self.config['embed_dim']})"
            )
        seen_set = set(self.config["seen_categories"])
        flags = [n in seen_set for n in names] if seen is None else [bool(s) for s in seen]
        if len(flags) != len(names):
            raise ValueError(f"seen has {len(flags)} entries for {len(names)} labels")
        self.names, self.class_embeddings, self.class_seen = names, vectors, np.array(flags, dtype=bool)

    def detect(self, image: ImageSource, *, score_threshold: float | None = None) -> dict[str, Any]:
        """Detections of one image (a path, PIL image, array or ``[3, H, W]`` tensor in 0..1) with the current
        vocabulary: numpy ``boxes``, ``scores``, ``labels``, ``embeddings`` and ``label_names``."""
        if self.class_embeddings is None or self.class_seen is None:
            raise CNClipError("no vocabulary: call set_vocabulary(labels) first")
        threshold = self.config["score_threshold"] if score_threshold is None else score_threshold
        check_thresholds(threshold, self.config["nms_threshold"], self.config["max_detections"])
        from cnclip_vision.detection.predictor import to_tensor

        pixels = image.float() if isinstance(image, torch.Tensor) else to_tensor(image)
        feed = {
            "image": pixels.numpy().astype(np.float32),
            "class_embeddings": self.class_embeddings,
            "class_seen": self.class_seen,
            "score_threshold": np.array(threshold, dtype=np.float32),
        }
        outputs = self._detector.run(list(_OUTPUTS), {k: v for k, v in feed.items() if k in self._inputs})
        result: dict[str, Any] = dict(zip(_OUTPUTS, outputs))
        result["label_names"] = [self.names[j] for j in result["labels"].tolist()]
        return result


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------ check
def _check_labels(n: int, seen: Sequence[str]) -> list[str]:
    """``n`` distinct labels for a check: about half of them categories seen in training (those the detector
    knows), the rest Chinese COCO names (unseen: the other exponent of the score ensemble), then numbered."""
    from cnclip_vision.detection.coco_names import COCO_CATEGORIES

    known = list(dict.fromkeys(seen))[: n - n // 2]
    others = [c.names[0] for c in COCO_CATEGORIES if c.names[0] not in known]
    labels = known + others[: n - len(known)]
    return labels + [f"物体{i}" for i in range(n - len(labels))]


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


@torch.inference_mode()
def _check(
    detector: OpenVocabDetector,
    directory: Path,
    image_sizes: Sequence[tuple[int, int]],
    vocabulary_sizes: Sequence[int],
    text_encoder: bool,
) -> dict[str, Any]:
    """onnxruntime vs the PyTorch predictor at new image and vocabulary sizes (every output, every detection)."""
    import onnxruntime as ort

    from cnclip_vision.detection.predictor import DetectionPredictor

    runner = OnnxDetector(directory)
    config = runner.config
    predictor = DetectionPredictor(
        detector,
        score_threshold=config["score_threshold"],
        nms_threshold=config["nms_threshold"],
        max_detections=config["max_detections"],
        vlm_mode=config["vlm_mode"],
    )
    cases: list[dict[str, Any]] = []
    for n in vocabulary_sizes:
        labels = _check_labels(n, detector.config.seen_categories)
        vocabulary = predictor.set_vocabulary(labels)
        if text_encoder:
            onnx_embeddings = runner.encode_vocabulary(labels)
            diff = _max_abs(onnx_embeddings, vocabulary.embeddings.cpu().numpy())
            cases.append(
                {
                    "what": "class_embeddings",
                    "classes": n,
                    "max_abs_diff": diff,
                    "passed": diff <= TOLERANCE["class_embeddings"],
                }
            )
        # the same class embeddings into both: the detection comparison is the detector graph's alone
        runner.set_vocabulary(labels, embeddings=vocabulary.embeddings.cpu().numpy(), seen=vocabulary.seen.tolist())
        for seed, (height, width) in enumerate(image_sizes, start=1):
            image = _example_image(height, width, seed=seed + 100 * n)
            (expected,) = predictor.predict([image])
            actual = runner.detect(image)
            case: dict[str, Any] = {
                "what": "detections",
                "classes": n,
                "image": [height, width],
                "detections": int(len(expected["scores"])),
                "onnx_detections": int(len(actual["scores"])),
            }
            same = case["detections"] == case["onnx_detections"]
            same = same and bool(np.array_equal(actual["labels"], expected["labels"].numpy()))
            diffs = {
                k: _max_abs(actual[k], expected[k].numpy()) if same else math.inf
                for k in ("boxes", "scores", "embeddings")
            }
            case.update({f"{k}_max_abs_diff": v for k, v in diffs.items()})
            case["passed"] = same and all(diffs[k] <= TOLERANCE[k] for k in diffs)
            cases.append(case)
    compared = sum(c.get("detections", 0) for c in cases)
    if not compared:
        logger.warning("the ONNX check compared no detections (every case had none above the score threshold)")
    return {
        "passed": all(c["passed"] for c in cases) and compared > 0,
        "reference": "PyTorch DetectionPredictor (float32) on images and vocabularies of sizes not seen at export",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "tolerance": TOLERANCE,
        "detections_compared": compared,
        "cases": cases,
    }
