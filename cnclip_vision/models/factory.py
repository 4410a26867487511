"""``create_model`` and ``load``: the one entry point for every weight source."""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cnclip_vision.device import check_device, int8_saturates
from cnclip_vision.errors import CheckpointError, UnknownModelError
from cnclip_vision.models.clip import ChineseCLIP
from cnclip_vision.models.configs import CLIPConfig, get_config, get_model_info, list_models, suggest_model
from cnclip_vision.models.layers import CLIPMlp, Int8Linear, PackedLinear, can_pack
from cnclip_vision.models.weights import (
    CONFIG_METADATA_KEY,
    CONFIG_NAME,
    PYTORCH_NAME,
    SAFETENSORS_NAME,
    check_fit,
    config_from_json,
    describe,
    infer_config,
    load_native_state_dict,
    read_native,
    safetensors_metadata,
    stream_native,
)

logger = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "create_model", "load", "resolve_dtype", "resolve_precision"]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``torch.float32`` for None; accepts torch dtypes and the names fp32/bf16/fp16."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}") from None


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_PRECISION_OF_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # else fp32


def resolve_precision(
    dtype: torch.dtype | str | None, precision: str | None, device: torch.device | str | None
) -> tuple[str, torch.dtype]:
    """``(precision, parameter dtype)``: ``precision`` (``"auto"`` resolved for ``device`` by
    :func:`~cnclip_vision.device.auto_precision`), or the precision ``dtype`` names (default fp32)."""
    if precision is None:
        target = resolve_dtype(dtype)
        return _PRECISION_OF_DTYPE.get(target, "fp32"), target
    if dtype is not None:
        raise ValueError("give either dtype= or precision=, not both")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed values: {', '.join(PRECISIONS)}")
    if precision == "auto":
        from cnclip_vision.device import auto_precision

        precision = auto_precision(device)
    return precision, torch.float32 if precision == "int8" else resolve_dtype(precision)


def _finish(
    model: ChineseCLIP,
    device: torch.device | str | None,
    dtype: torch.dtype,
    precision: str | None = None,
    compile: bool = False,
    quantised: bool = False,
) -> ChineseCLIP:
    """Move / cast (``quantised``: int8 already, on the CPU), then the optional speed levers: dynamic int8 Linear
    layers (CPU), packed bf16 Linear layers (CPU, eager: :func:`_pack_bf16`) and ``torch.compile``.

    bf16: every weight in bf16; PyTorch's LayerNorm and SDPA softmax accumulate in fp32 for bf16 inputs, so
    both stay numerically safe. int8: :func:`_quantize_int8` (CPU only). Records ``model.precision``.
    """
    device = torch.device(device or "cpu")
    precision = precision or _PRECISION_OF_DTYPE.get(dtype, "fp32")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision='fp16' needs a GPU (device='cuda'); on the CPU use fp32, int8 or bf16")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("precision='int8' (dynamic quantisation) runs on the CPU only")
    if quantised:
        model.eval().int8_backend = _int8_backend(compile)
    else:
        model = model.to(device=device, dtype=dtype).eval()
        if precision == "int8":
            _quantize_int8(model, compile)
        elif dtype == torch.bfloat16 and device.type == "cpu" and not compile and can_pack():
            _pack_bf16(model)
    if precision == "int8":
        logger.info("int8: %s kernels", model.int8_backend)
    if compile:
        model.visual.compile(dynamic=True)
        model.text.compile(dynamic=True)
        # frozen int8 kernels gave cosine ~0 with oneDNN held to AVX2 (unfrozen ones stay exact)
        saturating = model.int8_backend == "torchao" and int8_saturates("torchao")
        model.freeze_compiled = device.type == "cpu" and not saturating
    model.precision = precision
    return model


#: Linear layers left plain nn.Linear: the image projection (0.03% of ViT-B-16's FLOPs, one row per image; the
#: text projection is outside the towers). int8 keeps it in fp32 (ViT-B-16, 32 images, min cosine to fp32 0.99921
#: against 0.99909 with it in int8); bf16 does not pack it (microseconds per batch; ``identity.model_info``
#: fingerprints its weight as the image tower's last plain parameter).
_PLAIN_LINEARS = frozenset({"visual.head"})


def _int8_backend(compile: bool) -> str:
    """Whose int8 kernels ``precision="int8"`` uses: ``"torchao"`` under ``compile=True`` when torchao is installed
    (the ``[int8]`` extra: per-token activation scales, whose quantisation the compiler fuses: the most exact and
    the fastest int8 then), else torch's dynamically quantised Linear (:class:`~cnclip_vision.models.layers.
    Int8Linear`: FBGEMM on x86, named by torch's quantised engine), whose kernel quantises in the same pass —
    eager torchao runs its quantisation op by op. ViT-B-16, batch 32, a 2-core AVX512-VNNI EPYC, eager: torch's
    FBGEMM Linear 14.2 img/s, torchao 5.2, fp32 5.3 (README, "int8: whose kernels")."""
    if compile:
        try:
            import torchao.quantization  # noqa: F401
        except ImportError:
            pass
        else:
            return "torchao"
    engine = torch.backends.quantized.engine
    return "fbgemm" if engine in ("x86", "fbgemm", "none") else engine


def _tower_linears(model: ChineseCLIP) -> list[str]:
    """The Linear layers of both towers that int8 quantises and bf16 packs (all but :data:`_PLAIN_LINEARS`)."""
    names = [
        f"{tower}.{name}"
        for tower in ("visual", "text")
        for name, module in getattr(model, tower).named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    return [name for name in names if name not in _PLAIN_LINEARS]


def _quantize_linear(model: ChineseCLIP, name: str, backend: str) -> None:
    """The Linear ``name`` of ``model`` to int8 weights (one scale per output channel) and dynamically quantised
    int8 activations, in place: torchao's ``Int8DynamicActivationInt8WeightConfig`` (:func:`_torchao_int8_config`)
    or :class:`~cnclip_vision.models.layers.Int8Linear` (7-bit activations where 8-bit products saturate; in the
    image tower's MLPs with QuickGELU's factor folded in, :meth:`~cnclip_vision.models.layers.CLIPMlp.int8_scales`)."""
    parent, leaf, module = _linear(model, name, "quantise")
    if backend == "torchao":
        from torchao.quantization import quantize_

        quantize_(module, _torchao_int8_config())
        return
    input_scale, output_scale = parent.int8_scales(leaf) if isinstance(parent, CLIPMlp) else (1.0, 1.0)
    layer = Int8Linear.from_linear(module, int8_saturates("fbgemm"), input_scale, output_scale)
    setattr(parent, leaf, layer)


def _pack_bf16(model: ChineseCLIP) -> None:
    """Every Linear of both towers but the image projection (:func:`_tower_linears`) to a
    :class:`~cnclip_vision.models.layers.PackedLinear` (oneDNN's inner-product layout, packed once), in place.
    Same results as the plain Linear layers, bit for bit, but the MLPs' QuickGELU scaling (one rounding more).
    ViT-B-16, batch 32, 2-core AVX512-BF16 EPYC: README, "bf16: packed Linear layers"."""
    for name in _tower_linears(model):
        parent, leaf, linear = _linear(model, name, "pack")
        setattr(parent, leaf, PackedLinear.from_linear(linear))
    logger.info("bf16: Linear layers packed for oneDNN")


def _linear(model: ChineseCLIP, name: str, purpose: str) -> tuple[torch.nn.Module, str, torch.nn.Linear]:
    """The module holding the Linear ``name``, its attribute name there, and the Linear (TypeError otherwise)."""
    module = model.get_submodule(name)
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"{name}: expected an nn.Linear to {purpose}, got {type(module).__name__}")
    parent_name, _, leaf = name.rpartition(".")
    return model.get_submodule(parent_name), leaf, module


def _quantize_int8(model: ChineseCLIP, compile: bool = False) -> None:
    """Every Linear of both towers but the image projection (:func:`_tower_linears`) to int8, with the kernels of
    :func:`_int8_backend`, recorded as ``model.int8_backend``."""
    backend = _int8_backend(compile)
    for name in _tower_linears(model):
        _quantize_linear(model, name, backend)
    model.int8_backend = backend


@functools.cache
def _torchao_int8_config() -> Any:
    """torchao's dynamic int8 config (symmetric per-token activations, per-channel weights). Where this CPU's int8
    products saturate (:func:`~cnclip_vision.device.int8_saturates`): 7-bit asymmetric activations, which the
    int16 sums hold. With oneDNN held to AVX2 (ViT-B-16 image tower, random weights, 8 images), min cosine to
    fp32: 0.990 plain, 0.99897 with 7-bit symmetric, 0.99929 with 7-bit asymmetric activations."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.quantization.quant_primitives import MappingType

    if int8_saturates("torchao"):
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, reduce_range=True)
    return Int8DynamicActivationInt8WeightConfig()


def create_model(
    arch: str | CLIPConfig = "ViT-B-16",
    pretrained: bool = False,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    precision: str | None = None,
    compile: bool = False,
) -> ChineseCLIP:
    """A model of a registered size (or a custom :class:`CLIPConfig`), randomly initialised unless
    ``pretrained`` (then the released weights through :func:`load`). ``precision`` and ``compile`` as in
    :func:`load`."""
    if pretrained:
        if isinstance(arch, CLIPConfig):
            raise ValueError("pretrained=True needs a registered model name, not a CLIPConfig")
        return load(arch, device=device, dtype=dtype, precision=precision, compile=compile)
    precision, target = resolve_precision(dtype, precision, device)
    return _finish(ChineseCLIP(get_config(arch)), device, target, precision, compile)


def _weights_in_dir(directory: Path) -> Path:
    for name in (SAFETENSORS_NAME, PYTORCH_NAME):
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".bin"))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "no weight files"
    raise CheckpointError(
        f"{directory} holds {found}; expected {SAFETENSORS_NAME} or {PYTORCH_NAME} (with {CONFIG_NAME}), "
        "or exactly one .safetensors / .pt file"
    )


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[Path, CLIPConfig | None]:
    """Weights file and, where the source states it, its config."""
    path = Path(name_or_path)
    if not path.exists():
        name = str(name_or_path)
        if name in list_models():
            from cnclip_vision.models.hub import download_weights

            path = download_weights(get_model_info(name))
        elif os.sep in name or path.suffix:
            raise CheckpointError(f"no such file or directory: {path}")
        else:
            raise UnknownModelError(
                f"{name!r} is neither a known model name nor an existing path; {suggest_model(name)}"
            )
    if path.is_dir():
        config = config_from_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else None
        return _weights_in_dir(path), config
    return path, None


def load(
    name_or_path: str | os.PathLike[str],
    *,
    arch: str | CLIPConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    precision: str | None = None,
    compile: bool = False,
) -> ChineseCLIP:
    """Load a Chinese-CLIP model in eval mode.

    ``name_or_path`` is a name from :func:`list_models` (weights from the Hub repo, through the
    huggingface_hub cache), a Hugging Face directory (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``), an original ``clip_cn_*.pt`` file, or a file / directory written by
    :meth:`ChineseCLIP.save_pretrained`. ``arch`` overrides the architecture, which is otherwise read
    from the config or inferred from tensor shapes. Loading is strict and never unpickles code.

    Speed: ``precision`` is ``"fp32"`` (default), ``"bf16"`` (weights and compute in bf16; fast only on
    CPUs/GPUs with bf16 units), ``"fp16"`` (GPU only), ``"int8"`` (int8 weights and dynamically quantised
    activations in every Linear of both towers but the image projection, CPU; see :func:`_int8_backend`) or
    ``"auto"`` (bf16 where the device has bf16 units, else fp32; fp16 on GPUs without bf16; see
    :func:`~cnclip_vision.device.auto_precision`). ``"auto"`` is the CLI's default but not this function's:
    bf16 does not meet the fp32 parity bars against the reference implementations. ``dtype`` is the older
    spelling of the first three. The weights are cast tensor by tensor as they are read (no full copy in
    the file's precision; int8 from a safetensors file is quantised Linear by Linear as it is read).
    ``compile=True`` applies ``torch.compile`` to both towers (the first call of
    each new shape is slow). The measured accuracy cost of each is in the README's "Performance" section.
    """
    if device is not None:
        device = check_device(device)  # before reading gigabytes of weights
    weights, config = _resolve(name_or_path)
    precision, target = resolve_precision(dtype, precision, device)
    if precision == "int8" and (device is None or torch.device(device).type == "cpu"):
        quantised = _read_quantised(weights, get_config(arch) if arch is not None else config, compile)
        if quantised is not None:
            quantised = _finish(quantised, device, target, precision, compile, quantised=True)
            quantised.source = str(name_or_path)
            return quantised
    state, metadata = read_native(weights, dtype=target)  # cast tensor by tensor as it is read
    if arch is not None:
        config = get_config(arch)
    elif config is None and CONFIG_METADATA_KEY in metadata:
        config = CLIPConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    elif config is None:
        config = infer_config(state)
        logger.info("architecture inferred from %s: %s", weights, describe(config))
    for key in state:
        state[key] = state[key].contiguous()
    with torch.device("meta"):
        model = ChineseCLIP(config)
    load_native_state_dict(model, state, source=str(weights), assign=True)
    del state  # the model holds the tensors now; packing bf16 frees each plain weight as it goes
    _materialize_buffers(model)
    model = _finish(model, device, target, precision, compile)
    model.source = str(name_or_path)
    return model


def _read_quantised(weights: Path, config: CLIPConfig | None, compile: bool) -> ChineseCLIP | None:
    """``precision="int8"`` quantised as the file is read: every Linear that int8 quantises
    (:func:`_quantize_int8`) becomes int8 as soon as its weight (and bias) are in, so the checkpoint never sits
    in memory in fp32 (peak ≈ the int8 model + one fp32 matrix and its quantisation temporaries). ``None``
    where this does not apply — not a safetensors file, the original layout, no config without reading every
    tensor: the whole file is then read, then quantised."""
    try:  # the matrices to quantise are read after every other tensor, in groups of their own
        stream = stream_native(weights, dtype=torch.float32, order=lambda key, shape: int(_is_matrix(key, shape)))
        if config is None:
            config = _config_in_metadata(weights)
    except CheckpointError:  # the whole-file path reads it, or reports it
        return None
    if config is None:
        return None
    with torch.device("meta"):
        model = ChineseCLIP(config)
    expected = model.state_dict()
    linears, backend = set(_tower_linears(model)), _int8_backend(compile)
    shapes: dict[str, torch.Tensor] = {}  # what the file held, as meta tensors: for the fit report
    for key, value in stream:
        shapes[key] = torch.empty(value.shape, dtype=value.dtype, device="meta")
        if key not in expected or expected[key].shape != value.shape:
            continue  # named by check_fit below
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        # a tensor read as it is stored is a view of its read group's mapped pages: a matrix left unquantised
        # would keep its group resident, so it is copied out (the other tensors have groups of their own)
        quantised = owner in linears and leaf == "weight"
        kept = value.clone() if _is_matrix(key, list(value.shape)) and not quantised else value.contiguous()
        module.load_state_dict({leaf: kept}, strict=False, assign=True)
        del value, kept
        if owner in linears and not any(p.is_meta for p in module.parameters(recurse=False)):
            _quantize_linear(model, owner, backend)
            _release_freed_memory()
    check_fit(model, shapes, source=str(weights), expected=expected)
    _materialize_buffers(model)
    return model


def _is_matrix(key: str, shape: list[int]) -> bool:
    """A Linear layer's weight, in any layout (embedding tables are 2-D too, and are not quantised)."""
    return len(shape) == 2 and key.endswith(".weight") and "embeddings" not in key


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    except OSError:
        return None


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; nothing elsewhere). After a large block is
    freed glibc raises its mmap threshold, so the next blocks of that size come from the heap and stay in the
    RSS once freed: quantising 40 Linear layers of 768x3072 grew the RSS by 675 MB without it, 103 MB (their
    int8 bytes) with it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _config_in_metadata(weights: Path) -> CLIPConfig | None:
    raw = safetensors_metadata(weights).get(CONFIG_METADATA_KEY)
    return CLIPConfig.from_dict(json.loads(raw)) if raw else None


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Recreate the non-persistent buffers (BERT's position / token type ids) left on the meta device."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "position_ids":
                value = torch.arange(buf.shape[-1]).expand(buf.shape)
            elif name == "token_type_ids":
                value = torch.zeros(buf.shape, dtype=buf.dtype)
            else:
                raise RuntimeError(f"buffer {name} of {type(module).__name__} was not materialised")
            setattr(module, name, value)
