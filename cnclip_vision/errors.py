"""Exceptions raised for bad user input.

Every error names what was wrong (file, key, argument) and what was expected. All derive from
:class:`CNClipError`, so the CLI can turn them into a one-line message.
"""

from __future__ import annotations

__all__ = [
    "CNClipError",
    "CheckpointError",
    "ImageLoadError",
    "UnknownModelError",
    "UnreadableFolderError",
    "WeightsNotFoundError",
    "WorkError",
]


class CNClipError(Exception):
    """Base class of the errors this library raises for bad input."""


class WorkError(CNClipError):
    """The work ran on valid input and did not succeed (the CLI exits 1, not 2): e.g. an export whose
    numeric check failed, or an exporter that cannot translate an operator."""


class CheckpointError(CNClipError, ValueError):
    """A checkpoint file is unreadable, unsafe, or does not fit the model."""


class ImageLoadError(CNClipError, ValueError):
    """An image could not be read or decoded (names the file)."""


class UnreadableFolderError(CNClipError, OSError):
    """A folder exists but cannot be listed (names it and why, e.g. permission denied)."""

    def __str__(self) -> str:  # the message as given, not OSError's "[Errno ...]" form
        return str(self.args[0]) if self.args else ""


class UnknownModelError(CNClipError, KeyError):
    """A model name that is not registered (lists the known ones)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class WeightsNotFoundError(CNClipError, FileNotFoundError):
    """Weights are not on disk and cannot be downloaded (says how to get them)."""
