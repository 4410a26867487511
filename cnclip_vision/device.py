"""The torch device a model runs on, checked before anything is loaded or written."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["check_device"]

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
