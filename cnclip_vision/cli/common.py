"""Options and output shared by the ``cnclip`` subcommands."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnclip_vision.io import atomic_write

logger = logging.getLogger("cnclip_vision.cli")


def add_model_options(
    parser: argparse.ArgumentParser, *, batch_size: int = 64, model_default: str | None = "ViT-B-16"
) -> None:
    """``--model``, ``--device``, ``--batch-size``, ``--precision``, ``--workers``."""
    group = parser.add_argument_group("model")
    default_help = (
        f"default: {model_default}, from the Hugging Face cache"
        if model_default
        else "default: the model the embeddings were written with, as their manifest records it"
    )
    group.add_argument(
        "--model",
        default=model_default,
        help=f"registered name (see `cnclip models`), Hugging Face directory, or clip_cn_*.pt file ({default_help})",
    )
    group.add_argument(
        "--arch", type=arch_name, default=None, help="architecture when it cannot be inferred from the checkpoint"
    )
    group.add_argument(
        "--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help="images or texts per batch (default: %(default)s)"
    )
    group.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16", "int8"),
        default="auto",
        help="auto (bf16 on GPUs and on CPUs with bf16 units — AMX or AVX512-BF16 —, else fp32; logged), fp32, "
        "bf16, fp16 (GPU only) or int8 (dynamic quantisation of the Linear layers, CPU) (default: %(default)s)",
    )
    group.add_argument("--compile", action="store_true", help="torch.compile both towers (slow first batch)")
    group.add_argument(
        "--workers", type=number(int, 0), default=None, help="DataLoader worker processes for decoding images"
    )


# cnclip_vision.toy.world.PROTOCOLS, listed here so that --help imports nothing (a test keeps them equal)
TOY_PROTOCOLS = ("compositional", "held-out-shapes", "held-out-colours")

_FORMAT_HELP = {
    "json": "json (one document)",
    "jsonl": "jsonl (one record per line)",
    "csv": "csv (flat columns)",
    "coco": "coco (COCO results: image_id, category_id, bbox [x, y, w, h], score)",
}


def add_label_options(parser: argparse.ArgumentParser, *, file_only: bool = False) -> Any:
    """``--labels``, ``--labels-file`` and ``--templates`` in a "labels and prompts" group (returned, for more)."""
    group = parser.add_argument_group("labels and prompts")
    if not file_only:
        group.add_argument("--labels", help="comma-separated Chinese class names, e.g. 猫,狗,兔子")
    group.add_argument(
        "--labels-file",
        help="file with one class name per line" + (" (default: DATASET/label_cn.txt)" if file_only else ""),
    )
    group.add_argument(
        "--templates",
        choices=("default", "single", "none"),
        default="default",
        help="prompt templates: our 25 Chinese templates, one ('一张{}的照片。'), or the bare name "
        "(default: %(default)s)",
    )
    return group


def add_output_options(
    parser: argparse.ArgumentParser, *, csv_ok: bool = True, formats: Sequence[str] = ("json", "jsonl", "csv")
) -> None:
    """``-o/--output`` (the main result; ``-`` = stdout) and, for tabular results, ``--format``."""
    parser.set_defaults(output_is_file=True)  # main() checks -o before the command starts
    group = parser.add_argument_group("output")
    group.add_argument(
        "-o", "--output", default=None, help="write the result to this file (written whole, then renamed; - = stdout)"
    )
    if csv_ok:
        group.add_argument(
            "--format",
            choices=tuple(formats),
            default="json",
            help=", ".join(_FORMAT_HELP[f] for f in formats) + " (default: %(default)s)",
        )


def check_output_file(path: str | Path, option: str = "--output") -> None:
    """A result file can be written there: not a folder, its folder exists (checked before the work starts)."""
    if not str(path):
        raise ValueError(f"{option} is empty; give a file name (- for stdout)")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; expected a file name (e.g. {path / 'NAME'})")
    if path.exists() and not path.is_file():
        raise ValueError(f"{option} {path} is not a regular file (a device or pipe); give a file name or - for stdout")
    if not path.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {path.parent} does not exist")


def out_file(text: str) -> str:
    """argparse type: a file the command writes (or reads when it exists): as :func:`check_output_file`."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the file name is empty")
    try:
        check_output_file(text, "the file")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def arch_name(text: str) -> str:
    """argparse type of ``--arch``: a registered architecture name (see ``cnclip models``)."""
    from cnclip_vision.errors import UnknownModelError
    from cnclip_vision.models.configs import get_config

    try:
        get_config(text)
    except UnknownModelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1] (scores, IoU thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def number(kind: type, low: float | None = None, high: float | None = None) -> Any:
    """argparse type: an int or a finite float in ``[low, high]`` (NaN and infinities refused)."""
    import math

    span = f"{'' if low is None else f'>= {low}'}{' and ' if low is not None and high is not None else ''}"
    span += "" if high is None else f"<= {high}"
    expected = f"{'an integer' if kind is int else 'a number'}{' ' + span if span else ''}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def seed(text: str) -> int:
    """argparse type of the ``--seed`` options: an integer in [0, 2**32 - 1] (what every RNG here accepts)."""
    return number(int, 0, 2**32 - 1)(text)


def out_folder(text: str) -> str:
    """argparse type: an output folder (created by the command): not empty, not an existing file, and the
    nearest existing folder above it is a folder (not a file)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the output folder is empty; give a folder name")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    above = next((p for p in path.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise argparse.ArgumentTypeError(f"{text} cannot be created: {above} is a file, not a folder")
    return text


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def resolve_device(device: str | None) -> str:
    """``--device`` checked before any model is loaded (None: cuda when a GPU is visible, else cpu)."""
    from cnclip_vision.device import check_device

    try:
        return str(check_device(device))
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def load_model(args: argparse.Namespace) -> Any:
    """The model named by ``--model`` with ``--device`` / ``--precision``."""
    from cnclip_vision.device import auto_precision
    from cnclip_vision.models.factory import load

    device = resolve_device(args.device)
    if args.precision == "fp16" and not device.startswith("cuda"):
        raise ValueError("--precision fp16 needs a GPU (--device cuda); use fp32 or int8 on the CPU")
    if args.precision == "auto":
        args.precision = auto_precision(device)
    logger.info("loading %s on %s (%s)", args.model, device, args.precision)
    return load(
        args.model, arch=args.arch, device=device, precision=args.precision, compile=getattr(args, "compile", False)
    )


def write_records(args: argparse.Namespace, records: Sequence[dict[str, Any]], document: Any = None) -> None:
    """Write ``records`` as CSV / JSONL rows, or ``document`` (default: the records) as JSON."""
    fmt = getattr(args, "format", "json")
    buffer = io.StringIO()
    if fmt == "csv":
        rows = [flat_record(r) for r in records]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif fmt == "jsonl":
        for record in records:
            buffer.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        buffer.write(json.dumps(records if document is None else document, ensure_ascii=False, indent=2) + "\n")
    text = buffer.getvalue()
    if args.output and args.output != "-":
        check_output_file(args.output)
        with atomic_write(args.output) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        logger.info("wrote %s", args.output)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def flat_record(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """One CSV row: nested dicts become ``key.sub`` columns, lists of scalars one cell joined by ``;``
    (lists of records stay JSON, the one shape a flat row cannot hold)."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            row.update(flat_record(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and all(not isinstance(v, (list, tuple, dict)) for v in value):
            row[name] = ";".join("" if v is None else str(v) for v in value)
        elif isinstance(value, (list, tuple)):
            row[name] = json.dumps(value, ensure_ascii=False)
        else:
            row[name] = value
    return row


def read_lines(path: str | Path, option: str) -> list[str]:
    """The non-empty, stripped lines of a UTF-8 text file given as ``option``; errors name the option and the
    file (missing, a folder, not UTF-8, empty)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; expected a text file (one item per line)")
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{option} {path} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -f gbk -t utf-8"
        ) from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{option} {path} is empty")
    return lines


def read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """``--labels 猫,狗`` (also full-width commas) or ``--labels-file`` (one label per line)."""
    if labels_file and labels is not None:
        raise ValueError("give the class names with --labels or with --labels-file, not both")
    if labels_file:
        items = read_lines(labels_file, "--labels-file")
    elif labels is not None:
        items = [s.strip() for s in labels.replace("，", ",").split(",")]
    else:
        raise ValueError("give the class names with --labels 猫,狗,兔子 or --labels-file FILE")
    items = [s for s in items if s]
    if not items:
        raise ValueError("the label list is empty")
    return items
