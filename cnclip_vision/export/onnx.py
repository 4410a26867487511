"""ONNX export of the two encoders, checked against PyTorch with onnxruntime.

:func:`export_onnx` writes, into one directory:

- ``image_encoder.onnx``: ``pixel_values`` float ``[batch, 3, S, S]`` → ``image_embeds`` ``[batch, D]``,
  the unnormalised projected features of :meth:`ChineseCLIP.encode_image`;
- ``text_encoder.onnx``: ``input_ids`` and ``attention_mask`` int64 ``[batch, seq]`` → ``text_embeds``
  ``[batch, D]``, as :meth:`ChineseCLIP.encode_text` (``attention_mask`` is ``input_ids != 0``);
- ``onnx_config.json``: everything needed to run them without this package (image size, mean/std,
  tokenizer settings, context length, embedding size, opset, dtype, the model config);
- ``vocab.txt``, ``tokenizer_config.json``, ``preprocessor_config.json``: the tokenizer vocabulary and
  the preprocessing in the Hugging Face format (transformers' ``ChineseCLIPProcessor`` reads them);
- ``export_report.json``: what was exported and how closely onnxruntime matches PyTorch.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript) with
``dynamic_shapes``: the batch axis (and the text length, up to the position-embedding limit) stay
symbolic. The TorchScript exporter also works on these models today, but it is deprecated and traces
data-dependent branches of transformers' mask code as constants. The check runs onnxruntime (CPU) at
batch sizes and sequence lengths other than the export example, so a dimension fixed by mistake fails it.

With ``fp16=True`` a half-precision copy of the model is exported: inputs ``pixel_values`` and outputs
are float16 (ids and mask stay int64), and the check compares with the float32 PyTorch model by cosine
similarity (:data:`FP16_MIN_COSINE`) instead of :data:`FP32_MAX_ABS_DIFF`.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from cnclip_vision.errors import CNClipError, WorkError
from cnclip_vision.io import _umask, atomic_write

if TYPE_CHECKING:
    from cnclip_vision.models.clip import ChineseCLIP

__all__ = [
    "FP16_MIN_COSINE",
    "FP32_MAX_ABS_DIFF",
    "IMAGE_ENCODER_NAME",
    "ONNX_CONFIG_NAME",
    "REPORT_NAME",
    "TEXT_ENCODER_NAME",
    "OnnxCheckError",
    "OnnxDependencyError",
    "export_onnx",
]

logger = logging.getLogger(__name__)

IMAGE_ENCODER_NAME = "image_encoder.onnx"
TEXT_ENCODER_NAME = "text_encoder.onnx"
ONNX_CONFIG_NAME = "onnx_config.json"
REPORT_NAME = "export_report.json"
CHECK_FAILED_SUFFIX = ".check-failed"  # beside the output folder: an export whose check failed, for inspection

FP32_MAX_ABS_DIFF = 1e-4  # onnxruntime vs PyTorch, float32 export, every embedding element
FP16_MIN_COSINE = 0.999  # float16 export vs the float32 PyTorch model, every embedding
MIN_OPSET = 17  # LayerNormalization
_EXTERNAL_DATA_BYTES = 1536 << 20  # above this the weights go to "<file>.data" (protobuf's limit is 2 GiB)
_FILE_MODE = 0o644  # staged files (and the mkdtemp folder, 0700) get the usual permissions when moved into place
_PIP_HINT = "pip install 'cnclip-vision[onnx]'  (or: pip install onnx onnxscript onnxruntime)"


class OnnxDependencyError(CNClipError, ImportError):
    """onnx, onnxscript or onnxruntime is missing (names the pip extra)."""


class OnnxCheckError(WorkError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance (the report says how much)."""


def _require(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OnnxDependencyError(f"{purpose} needs the package {module!r}, which is not installed: {_PIP_HINT}") from e


# ------------------------------------------------------------------------------------------ modules
class _ImageEncoder(nn.Module):
    """``pixel_values`` → ``image_embeds``: exactly :meth:`ChineseCLIP.encode_image`."""

    def __init__(self, model: ChineseCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class _TextEncoder(nn.Module):
    """``input_ids``, ``attention_mask`` → ``text_embeds``: exactly :meth:`ChineseCLIP.encode_text`."""

    def __init__(self, model: ChineseCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


@contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter's INFO/WARNING chatter (initializer de-duplication, the opset-18-then-convert notice)
    only with ``-v``: the report states the opset actually written, and a mismatch is logged below."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the export; every module's own training flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@runtime_checkable
class _DynamicImageSize(Protocol):
    """A timm ViT built with ``dynamic_img_size`` (interpolates its position embedding to any input size)."""

    dynamic_img_size: bool


@contextmanager
def _native_image_size(visual: nn.Module) -> Iterator[None]:
    """The ViT tower at its fixed native size while it is exported (the graph's H and W are fixed anyway).
    Our towers are built with timm's ``dynamic_img_size``, whose size early-out is skipped while exporting, so
    every exported graph would otherwise carry a position-embedding interpolation and an extra fp32 copy."""
    patch_embed = getattr(visual, "patch_embed", None)
    if not isinstance(visual, _DynamicImageSize) or not visual.dynamic_img_size or patch_embed is None:
        yield
        return
    from timm.layers import Format

    saved = (visual.dynamic_img_size, patch_embed.flatten, patch_embed.output_fmt, patch_embed.strict_img_size)
    visual.dynamic_img_size = False
    patch_embed.flatten, patch_embed.output_fmt, patch_embed.strict_img_size = True, Format.NCHW, True
    try:
        yield
    finally:
        visual.dynamic_img_size = saved[0]
        patch_embed.flatten, patch_embed.output_fmt, patch_embed.strict_img_size = saved[1:]


# ------------------------------------------------------------------------------------------ inputs
def _example_texts(
    batch: int, length: int, vocab_size: int, generator: torch.Generator, *, cls_id: int = 101, sep_id: int = 102
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] word pieces [SEP]`` rows padded with 0; the last row of a batch > 1 is about half padding."""
    ids = torch.randint(672, vocab_size, (batch, length), generator=generator)  # past the special tokens
    lengths = [length] * batch
    if batch > 1 and length > 2:
        lengths[-1] = max(2, length // 2)
    for row, n in enumerate(lengths):
        ids[row, 0] = cls_id
        ids[row, n - 1] = sep_id
        ids[row, n:] = 0
    return ids, (ids != 0).long()


def _example_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=generator)


# ------------------------------------------------------------------------------------------ export
def _param_bytes(module: nn.Module, itemsize: int) -> int:
    return sum(p.numel() for p in module.parameters()) * itemsize


def _export_one(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    destination: Path,
    *,
    input_names: Sequence[str],
    output_name: str,
    dynamic_shapes: dict[str, dict[int, Any]],
    opset: int,
    weight_bytes: int,
) -> dict[str, Any]:
    """Export ``module`` to ``destination`` (in the export's staging folder) and describe the files."""
    start = time.perf_counter()
    with warnings.catch_warnings(), _quiet_exporter_logs():
        # both inputs of the text encoder share the batch / seq Dims on purpose
        warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape constraints")
        try:
            program = torch.onnx.export(
                module,
                args,
                None,
                dynamo=True,
                opset_version=opset,
                input_names=list(input_names),
                output_names=[output_name],
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        except Exception as e:  # torch.export / onnxscript raise many types; say which encoder failed
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkError(f"ONNX export of {destination.name} failed ({type(e).__name__}): {reason}") from e
    if program is None:  # only the legacy (dynamo=False) exporter returns None
        raise CNClipError(f"ONNX export of {destination.name} returned no program")
    export_seconds = time.perf_counter() - start
    before = set(destination.parent.iterdir())
    program.save(destination, external_data=weight_bytes > _EXTERNAL_DATA_BYTES)
    files = sorted(set(destination.parent.iterdir()) - before)
    opsets = dict(program.model.opset_imports)
    return {
        "file": destination.name,
        "external_data": [p.name for p in files if p.name != destination.name],
        "bytes": sum((destination.parent / p.name).stat().st_size for p in files),
        "opset": int(opsets.get("", 0)),
        "export_seconds": round(export_seconds, 2),
    }


def _check_torch_exporter() -> None:
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise CNClipError(
            f"ONNX export needs torch.onnx.export(dynamo=True), which torch {torch.__version__} lacks; upgrade torch"
        )


def _io_spec(name: str, shape: list[Any], dtype: str) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype}


def export_onnx(
    model: ChineseCLIP,
    output_dir: str | os.PathLike[str],
    *,
    opset: int = 17,
    fp16: bool = False,
    check: bool = True,
    image_batch_sizes: Sequence[int] = (1, 3),
    text_shapes: Sequence[tuple[int, int]] = ((1, 5), (4, 13)),
    source: str | None = None,
) -> dict[str, Any]:
    """Export the image and text encoders of a float32 ``model`` to ONNX in ``output_dir``; return the report.

    ``opset`` is the requested ONNX opset (>= 17); torch 2.14's exporter writes opset 18 and converts down,
    and keeps 18 where that conversion fails, as for the RN50 image tower (the report and
    ``onnx_config.json`` give the opset actually written). ``fp16`` exports a half-precision copy
    (float16 ``pixel_values`` and embeddings). With ``check``, onnxruntime runs each encoder at
    ``image_batch_sizes`` and at each ``(batch, seq_len)`` of ``text_shapes`` — shapes different from
    the export example (batch 2, length 7), so the axes are proven dynamic — and compares with the
    PyTorch model: every element within
    :data:`FP32_MAX_ABS_DIFF` (float32) or every embedding's cosine >= :data:`FP16_MIN_COSINE` (float16).
    ``source`` (e.g. the model name) is recorded in the config.

    Everything is written into a hidden staging folder beside ``output_dir`` (``.NAME.export-*``) and moved
    into place only when the export (and the check) succeeded: renamed when ``output_dir`` does not exist or
    is empty, else moved in file by file (other files in it stay). On any failure the staging folder (and
    parents this call created) is removed and an existing ``output_dir`` is left as it was. When the check
    fails, the export and its ``export_report.json`` (with ``check.passed: false``) go to the sibling
    ``NAME.check-failed`` instead (replacing an earlier one), for inspection, so that a failed export never
    replaces a good one; then :class:`OnnxCheckError` is raised, naming that report.
    """
    from cnclip_vision.models.clip import ChineseCLIP

    if not isinstance(model, ChineseCLIP):
        raise TypeError(f"export_onnx needs a cnclip_vision ChineseCLIP model, got {type(model).__name__}")
    if model.dtype != torch.float32:
        raise ValueError(
            f"export_onnx needs a float32 model, got {model.dtype}; load it in float32 (the default) and pass "
            "fp16=True for a half-precision export"
        )
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    image_batch_sizes = tuple(image_batch_sizes)
    text_shapes = tuple((int(b), int(n)) for b, n in text_shapes)
    max_len = model.config.text.max_position_embeddings
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in image_batch_sizes):
        raise ValueError(f"image_batch_sizes must be positive ints, got {image_batch_sizes}")
    if any(b < 1 or not 2 <= n <= max_len for b, n in text_shapes):
        raise ValueError(f"text_shapes must be (batch >= 1, 2 <= seq_len <= {max_len}) pairs, got {text_shapes}")
    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export (torch.onnx's exporter)")
    if check:
        _require("onnxruntime", "checking the ONNX export")
    _check_torch_exporter()
    return staged_export(
        output_dir,
        lambda stage, final: _export_into(
            model,
            stage,
            final,
            opset=opset,
            fp16=fp16,
            check=check,
            image_batch_sizes=image_batch_sizes,
            text_shapes=text_shapes,
            source=source,
        ),
        failure=_check_failure,
    )


def _check_failure(check: dict[str, Any]) -> str:
    return (
        f"onnxruntime and PyTorch disagree beyond the tolerance {check['tolerance']}: max abs difference "
        f"{check['max_abs_diff']:.3g}, min cosine {check['min_cosine']:.6f}"
    )


def staged_export(
    output_dir: str | os.PathLike[str],
    build: Callable[[Path, Path], dict[str, Any]],
    *,
    failure: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Run ``build(stage, final)`` (it writes every file of an export into the staging folder ``stage`` and
    returns the report, whose ``check`` is None or has ``passed``), then move the export into place: into
    ``output_dir`` when the check passed, else into ``NAME.check-failed`` and raise :class:`OnnxCheckError`
    with ``failure(check)``. On any error nothing of it stays and an existing ``output_dir`` is untouched.
    Shared by the encoder and the detector exports."""
    final, created = _prepare_dir(output_dir)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.export-", dir=final.parent))
    failed = final.with_name(f"{final.name}{CHECK_FAILED_SUFFIX}")
    try:
        report = build(stage, final)
        passed = report["check"] is None or report["check"]["passed"]
        if not passed:
            shutil.rmtree(failed, ignore_errors=True)
        _publish(stage, final if passed else failed)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    if not passed:
        raise OnnxCheckError(
            f"{failure(report['check'])}; {final} was left as it was (the export and its report are in {failed})"
        )
    return report


def _export_into(
    model: ChineseCLIP,
    directory: Path,
    final: Path,
    *,
    opset: int,
    fp16: bool,
    check: bool,
    image_batch_sizes: Sequence[int],
    text_shapes: Sequence[tuple[int, int]],
    source: str | None,
) -> dict[str, Any]:
    """Every file of the export written into the staging ``directory``; the report names ``final``."""
    from cnclip_vision.data.tokenizer import DEFAULT_CONTEXT_LENGTH, get_tokenizer

    max_len = model.config.text.max_position_embeddings
    config = model.config
    size, dtype = config.vision.image_size, torch.float16 if fp16 else torch.float32
    dtype_name = "float16" if fp16 else "float32"
    tokenizer = get_tokenizer()
    processor = model.get_processor()
    generator = torch.Generator().manual_seed(0)
    example_images = _example_images(2, size, generator)  # 2 and 7: neither 0/1-specialised nor a check shape
    example_ids, example_mask = _example_texts(2, 7, config.text.vocab_size, generator)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=max_len)
    itemsize = 2 if fp16 else 4
    image_bytes = _param_bytes(model.visual, itemsize)
    text_bytes = _param_bytes(model.text, itemsize) + _param_bytes(model.text_projection, itemsize)

    with _eval_mode(model):
        target = copy.deepcopy(model).half() if fp16 else model
        logger.info("exporting the image encoder (%s, opset %d) to %s", dtype_name, opset, final)
        with _native_image_size(target.visual):
            image_info = _export_one(
                _ImageEncoder(target).eval(),
                (example_images.to(target.device, dtype),),
                directory / IMAGE_ENCODER_NAME,
                input_names=["pixel_values"],
                output_name="image_embeds",
                dynamic_shapes={"pixel_values": {0: batch}},
                opset=opset,
                weight_bytes=image_bytes,
            )
        logger.info("exporting the text encoder")
        text_info = _export_one(
            _TextEncoder(target).eval(),
            (example_ids.to(target.device), example_mask.to(target.device)),
            directory / TEXT_ENCODER_NAME,
            input_names=["input_ids", "attention_mask"],
            output_name="text_embeds",
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            opset=opset,
            weight_bytes=text_bytes,
        )
        del target

    written_opset = max(image_info["opset"], text_info["opset"])
    if written_opset != opset:
        logger.warning(
            "requested opset %d; the exporter wrote opset %d (image encoder %d, text encoder %d)",
            opset,
            written_opset,
            image_info["opset"],
            text_info["opset"],
        )
    image_info.update(
        inputs=[_io_spec("pixel_values", ["batch", 3, size, size], dtype_name)],
        outputs=[_io_spec("image_embeds", ["batch", config.embed_dim], dtype_name)],
    )
    text_info.update(
        inputs=[
            _io_spec("input_ids", ["batch", "seq"], "int64"),
            _io_spec("attention_mask", ["batch", "seq"], "int64"),
        ],
        outputs=[_io_spec("text_embeds", ["batch", config.embed_dim], dtype_name)],
    )
    _write_preprocessing(processor, directory)
    onnx_config = {
        "format": "cnclip-vision-onnx",
        "format_version": 1,
        "source": source,
        "image_encoder": image_info,
        "text_encoder": text_info,
        "dtype": dtype_name,
        "opset": written_opset,
        "embed_dim": config.embed_dim,
        "image_size": size,
        "image_mean": list(processor.image_transform.mean),
        "image_std": list(processor.image_transform.std),
        "image_preprocessing": "RGB; resize straight to image_size x image_size with PIL bicubic (no crop); "
        "scale to [0, 1]; (x - mean) / std per channel; layout [batch, 3, height, width]",
        "context_length": DEFAULT_CONTEXT_LENGTH,
        "max_seq_len": max_len,
        "tokenizer": {
            "vocab_file": "vocab.txt",
            "type": "BERT WordPiece, lower case, Chinese characters split",
            "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "format": "[CLS] word pieces[:context_length - 2] [SEP], padded with pad_token_id; "
            "attention_mask = 1 on tokens, 0 on padding",
        },
        "embeddings": "unnormalised; divide by the L2 norm before taking cosine similarities",
        "logit_scale": float(model.logit_scale.detach().exp().cpu()),
        "model_config": config.to_dict(),
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
    }
    _write_json(directory / ONNX_CONFIG_NAME, onnx_config)

    report: dict[str, Any] = {
        "output_dir": str(final),
        "source": source,
        "dtype": dtype_name,
        "opset_requested": opset,
        "opset": written_opset,
        "files": sorted(
            [
                IMAGE_ENCODER_NAME,
                TEXT_ENCODER_NAME,
                *image_info["external_data"],
                *text_info["external_data"],
                ONNX_CONFIG_NAME,
                REPORT_NAME,
                "vocab.txt",
                "tokenizer_config.json",
                "preprocessor_config.json",
            ]
        ),
        "image_encoder": {k: image_info[k] for k in ("file", "bytes", "export_seconds", "opset")},
        "text_encoder": {k: text_info[k] for k in ("file", "bytes", "export_seconds", "opset")},
        "versions": _versions(),
        "check": None,
    }
    if check:
        report["check"] = _check(
            model, directory, fp16=fp16, image_batch_sizes=image_batch_sizes, text_shapes=text_shapes
        )
    _write_json(directory / REPORT_NAME, report)
    return report


def _prepare_dir(output_dir: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """The absolute output folder (not created) and the first of its parents this call created (None: its
    parent existed), which a failed export removes again."""
    directory = Path(output_dir).absolute()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a directory")
    created = next((p for p in reversed(directory.parents) if not p.exists()), None)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output directory {output_dir}: {e.strerror or e}") from e
    if not os.access(directory.parent, os.W_OK) or (directory.is_dir() and not os.access(directory, os.W_OK)):
        raise ValueError(f"output directory {output_dir} is not writable")
    return directory.resolve(), created


def _publish(stage: Path, final: Path) -> None:
    """Move the finished export from ``stage`` to ``final``: a rename when ``final`` does not exist or is
    empty, else file by file (weights before the graphs, the report last) into the existing folder, whose
    other files stay; the weights of an earlier, larger export (``*.onnx.data`` no longer written) go."""
    mode = 0o777 & ~_umask()
    for path in stage.iterdir():
        os.chmod(path, _FILE_MODE)
    os.chmod(stage, mode)
    try:
        os.rename(stage, final)  # POSIX replaces an empty folder
        return
    except OSError:
        if not final.is_dir():
            raise
    order = {".data": 0, ".onnx": 1, ".json": 3}
    files = sorted(stage.iterdir(), key=lambda p: (p.name == REPORT_NAME, order.get(p.suffix, 2), p.name))
    names = {p.name for p in files}
    for path in files:
        os.replace(path, final / path.name)
    for name in names:
        if name.endswith(".onnx") and f"{name}.data" not in names:  # a graph that now holds its own weights
            (final / f"{name}.data").unlink(missing_ok=True)
    shutil.rmtree(stage, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _write_preprocessing(processor: Any, directory: Path) -> None:
    """vocab.txt, tokenizer_config.json, preprocessor_config.json (the Hugging Face format)."""
    processor.save_pretrained(directory)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    return versions


# ------------------------------------------------------------------------------------------ check
def _compare(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    cosine = (a * e).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(e, axis=-1), 1e-30)
    return {"max_abs_diff": float(np.abs(a - e).max()), "min_cosine": float(cosine.min())}


@torch.inference_mode()
def _check(
    model: ChineseCLIP,
    directory: Path,
    *,
    fp16: bool,
    image_batch_sizes: Sequence[int],
    text_shapes: Sequence[tuple[int, int]],
) -> dict[str, Any]:
    """Run the exported encoders with onnxruntime (CPU) and compare with the float32 PyTorch model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    providers = ["CPUExecutionProvider"]
    start = time.perf_counter()
    image_session = ort.InferenceSession(str(directory / IMAGE_ENCODER_NAME), options, providers=providers)
    text_session = ort.InferenceSession(str(directory / TEXT_ENCODER_NAME), options, providers=providers)
    session_seconds = time.perf_counter() - start
    float_type = np.float16 if fp16 else np.float32
    generator = torch.Generator().manual_seed(1)
    size = model.config.vision.image_size
    cases: list[dict[str, Any]] = []
    ort_seconds = torch_seconds = 0.0
    with _eval_mode(model):
        for n in image_batch_sizes:
            pixels = _example_images(n, size, generator)
            t0 = time.perf_counter()
            expected = model.encode_image(pixels.to(model.device)).float().cpu().numpy()
            t1 = time.perf_counter()
            (actual,) = image_session.run(["image_embeds"], {"pixel_values": pixels.numpy().astype(float_type)})
            t2 = time.perf_counter()
            torch_seconds, ort_seconds = torch_seconds + t1 - t0, ort_seconds + t2 - t1
            cases.append(
                {
                    "encoder": "image",
                    "shape": [n, 3, size, size],
                    "output_dtype": str(actual.dtype),
                    "output_shape": list(actual.shape),
                    **_compare(actual, expected),
                }
            )
        for n, length in text_shapes:
            ids, mask = _example_texts(n, length, model.config.text.vocab_size, generator)
            t0 = time.perf_counter()
            expected = model.encode_text(ids.to(model.device), mask.to(model.device)).float().cpu().numpy()
            t1 = time.perf_counter()
            (actual,) = text_session.run(["text_embeds"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            t2 = time.perf_counter()
            torch_seconds, ort_seconds = torch_seconds + t1 - t0, ort_seconds + t2 - t1
            cases.append(
                {
                    "encoder": "text",
                    "shape": [n, length],
                    "padded_rows": int((mask == 0).any(-1).sum()),
                    "output_dtype": str(actual.dtype),
                    "output_shape": list(actual.shape),
                    **_compare(actual, expected),
                }
            )
    for case in cases:
        expected_rows = case["shape"][0]
        shape_ok = case["output_shape"] == [expected_rows, model.config.embed_dim]
        close = case["min_cosine"] >= FP16_MIN_COSINE if fp16 else case["max_abs_diff"] <= FP32_MAX_ABS_DIFF
        case["passed"] = bool(shape_ok and close)
    tolerance = {"min_cosine": FP16_MIN_COSINE} if fp16 else {"max_abs_diff": FP32_MAX_ABS_DIFF}
    return {
        "passed": all(c["passed"] for c in cases),
        "reference": "float32 PyTorch model (encode_image / encode_text), inputs not seen at export",
        "runtime": f"onnxruntime {ort.__version__} {providers[0]}",
        "tolerance": tolerance,
        "max_abs_diff": max(c["max_abs_diff"] for c in cases),
        "min_cosine": min(c["min_cosine"] for c in cases),
        "cases": cases,
        "session_seconds": round(session_seconds, 3),
        "onnxruntime_seconds": round(ort_seconds, 3),
        "torch_seconds": round(torch_seconds, 3),
    }
