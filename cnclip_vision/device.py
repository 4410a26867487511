"""The torch device a model runs on, checked before anything is loaded or written."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["auto_precision", "bf16_is_fast", "check_device"]

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
