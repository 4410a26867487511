"""The one JSONL reader (``file:line`` errors) and the Chinese-CLIP / MUGE text records built on it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnclip_vision.errors import CNClipError

__all__ = ["TextRecord", "iter_jsonl", "read_text_jsonl"]


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file (UTF-8, optional BOM); a line
    that is not UTF-8, not JSON or not a JSON object raises :class:`CNClipError` naming ``file:line``."""
    path = Path(path)
    if path.is_dir():
        raise CNClipError(f"{path} is a folder; expected a JSONL file (one JSON object per line)")
    if not path.is_file():
        raise CNClipError(f"no such file: {path}")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise CNClipError(f"{where}: not UTF-8 text ({e.reason})") from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CNClipError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise CNClipError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield number, record


@dataclass(frozen=True)
class TextRecord:
    """One line of a Chinese-CLIP / MUGE text file: ``{"text_id": 8428, "text": "...", "image_ids": [1076345]}``.
    Ids are kept as strings (integer ids become their decimal form)."""

    text_id: str
    text: str
    image_ids: tuple[str, ...] = ()
    line: int = 0


def _as_id(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return str(value)


def read_text_jsonl(path: str | os.PathLike[str], *, require_image_ids: bool = False) -> list[TextRecord]:
    """Parse a JSONL of ``{"text_id", "text", "image_ids"}`` objects; blank lines are ignored.

    Raises :class:`CNClipError` naming ``file:line`` for a line that is not JSON, not an object, lacks
    ``text_id`` / ``text`` (or ``image_ids`` when ``require_image_ids``), has ids that are not integers or
    strings, an empty text, or a ``text_id`` seen before.
    """
    path = Path(path)
    if not path.is_file():
        problem = f"the text file {path} is a folder" if path.is_dir() else f"no such text file: {path}"
        raise CNClipError(
            f'{problem} (expected JSONL lines like {{"text_id": 1, "text": "一只猫", "image_ids": [10]}})'
        )
    records: list[TextRecord] = []
    first_line: dict[str, int] = {}
    for n, obj in iter_jsonl(path):
        where = f"{path}:{n}"
        keys = ("text_id", "text", "image_ids") if require_image_ids else ("text_id", "text")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise CNClipError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        text_id = _as_id(obj["text_id"])
        if text_id is None:
            raise CNClipError(f"{where}: text_id must be an integer or a string, got {obj['text_id']!r}")
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise CNClipError(f"{where}: text must be a non-empty string, got {text!r}")
        image_ids = obj.get("image_ids", [])
        if not isinstance(image_ids, list) or any(_as_id(i) is None for i in image_ids):
            raise CNClipError(f"{where}: image_ids must be a list of integers or strings, got {image_ids!r}")
        if text_id in first_line:
            raise CNClipError(f"{where}: duplicate text_id {text_id} (first on line {first_line[text_id]})")
        first_line[text_id] = n
        records.append(TextRecord(text_id, text, tuple(str(i) for i in image_ids), n))
    if not records:
        raise CNClipError(f"{path} holds no texts")
    return records
