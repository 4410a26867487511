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
def int8_saturates() -> bool:
    """Whether torchao's int8 matrix products lose precision on this CPU (needs torchao). Measured once per
    process, not looked up: a 64x64 Linear quantised by torchao against fp32 on 16 tokens (about 10 ms). Without
    VNNI (AVX2-only CPUs) oneDNN sums pairs of u8 x s8 products in int16 (``vpmaddubsw``), which saturates:
    cosine 0.987 with oneDNN held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) on a CPU that gives 0.99994 with VNNI."""
    import logging

    import torch
    import torch.nn.functional as F
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 64, generator=generator))
        x = torch.randn(16, 64, generator=generator)
        exact = layer(x)
        quantize_(layer, Int8DynamicActivationInt8WeightConfig())
        cosine = F.cosine_similarity(layer(x), exact).min().item()
    saturates = cosine < 0.999
    if saturates:
        logging.getLogger("cnclip_vision").info(
            "int8: this CPU's int8 products saturate (cosine %.4f on a probe; no VNNI?): activations are "
            "quantised to 7 bits, asymmetric (torchao reduce_range), and torch.compile runs without freezing",
            cosine,
        )
    return saturates
