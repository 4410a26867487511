"""The torch device a model runs on, checked before anything is loaded or written."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["auto_precision", "bf16_is_fast", "check_device", "int8_saturates"]

_EXPECTED = "expected cpu, cuda, cuda:N or mps"


def check_device(device: str | torch.device | None) -> torch.device:
    """The device named by ``device`` (None: ``cuda`` when a GPU is visible, else ``cpu``), checked: a name
    torch does not know, or a GPU that is not there, is a ValueError that names it — instead of torch's
    traceback from deep inside the first tensor moved there."""
    import torch

    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(device)!r} is not a torch device ({_EXPECTED})") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r}: no CUDA GPU is visible (torch.cuda.is_available() is False); use cpu"
            )
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use cpu")
    return chosen


def bf16_is_fast(device: str | torch.device | None = None) -> tuple[bool, str]:
    """Whether bf16 matrix products run faster than fp32 on ``device``, and why (from torch's own capability
    queries, never a CPU name): CUDA GPUs that support bf16 (Ampere and newer); CPUs whose oneDNN has native
    bf16 kernels — AMX tiles or AVX512-BF16. On AVX2-only CPUs bf16 is emulated and several times slower."""
    import torch

    chosen = torch.device(device or "cpu")
    if chosen.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA GPU with bf16" if ok else "CUDA GPU without bf16"
    if chosen.type != "cpu":
        return False, f"{chosen.type}: bf16 speed unknown"
    cpu = getattr(torch, "cpu", None)
    query = lambda name: bool(getattr(cpu, name, lambda: False)())  # noqa: E731  private, present since torch 2.3
    if query("_is_amx_tile_supported"):
        return True, "CPU with AMX"
    if query("_is_avx512_bf16_supported"):
        return True, "CPU with AVX512-BF16"
    return False, f"CPU without bf16 units ({torch.backends.cpu.get_cpu_capability()})"


_LOGGED: set[tuple[str, str]] = set()


def auto_precision(device: str | torch.device | None = None) -> str:
    """``precision="auto"``: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with bf16 units
    (:func:`bf16_is_fast`), fp32 elsewhere. The choice is logged once per device and reason."""
    import logging

    import torch

    chosen = torch.device(device or "cpu")
    fast, why = bf16_is_fast(chosen)
    precision = "bf16" if fast else "fp16" if chosen.type == "cuda" else "fp32"
    if (str(chosen), why) not in _LOGGED:
        _LOGGED.add((str(chosen), why))
        logging.getLogger("cnclip_vision").info("precision auto on %s: %s (%s)", chosen, precision, why)
    return precision


@functools.cache
def int8_saturates(kernels: str = "torchao") -> bool:
    """Whether int8 matrix products lose precision on this CPU, for ``kernels`` ``"torchao"`` (oneDNN, through
    torchao, which must be installed) or ``"fbgemm"`` (torch's dynamically quantised Linear, 8-bit activations).
    Measured once per process, not looked up — torch has no VNNI query, and oneDNN's and FBGEMM's instruction
    sets are capped apart (``ONEDNN_MAX_CPU_ISA``, ``FBGEMM_ENABLE_INSTRUCTIONS``): a 64 -> 16 Linear with
    weights and inputs near their maximum, so that neighbouring u8 x s8 products sum past 32767, against fp32
    (about 10 ms). Without VNNI (AVX2-only CPUs) both sum such pairs in int16 (``vpmaddubsw``), which
    saturates: FBGEMM held to AVX2 is 42% off there, 0.1% with VNNI."""
    import logging

    import torch

    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(16, 64, generator=generator) * 0.1 + 0.9)
        x = torch.rand(8, 64, generator=generator) * 0.2 + 0.8
        exact = layer(x)
        if kernels == "torchao":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            quantize_(layer, Int8DynamicActivationInt8WeightConfig())
            quantised: torch.nn.Module = layer
        elif kernels == "fbgemm":
            from cnclip_vision.models.layers import Int8Linear

            quantised = Int8Linear.from_linear(layer)
        else:
            raise ValueError(f"kernels={kernels!r}: expected 'torchao' or 'fbgemm'")
        error = ((quantised(x) - exact).abs().max() / exact.abs().max()).item()
    saturates = error > 0.01
    if saturates:
        logging.getLogger("cnclip_vision").info(
            "int8 (%s): this CPU's int8 products saturate (%.0f%% off on a probe; no VNNI?): activations are "
            "quantised to 7 bits%s",
            kernels,
            100 * error,
            " (asymmetric), and torch.compile runs without freezing" if kernels == "torchao" else "",
        )
    return saturates
