"""The ``cnclip`` command line (console script). Results go to stdout (JSON or CSV) or ``--output``;
logs and progress bars to stderr; user errors exit with status 2 and a one-line message."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cnclip_vision.cli import coco, convert, detect, onnx, retrieval, serve, toy, train, zeroshot
from cnclip_vision.errors import CNClipError

__all__ = ["build_parser", "main"]

_COMMAND_MODULES = (convert, zeroshot, retrieval, train, toy, coco, detect, onnx, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnclip",
        description="Chinese-CLIP vision toolkit: zero-shot classification, retrieval, conversion. Results are "
        "printed on stdout (JSON unless --format csv) or written to --output; logs go to stderr.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (CNClipError, FileNotFoundError, ValueError, TypeError) as e:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"cnclip {args.command}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cnclip ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"cnclip {args.command}: interrupted", file=sys.stderr)
        return 130
