"""The ``cnclip`` command line (console script). Results go to stdout (JSON or CSV) or ``--output``;
logs and progress bars to stderr; user errors exit with status 2 and a one-line message."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from cnclip_vision.cli import coco, convert, detect, onnx, retrieval, serve, toy, train, zeroshot
from cnclip_vision.cli.common import check_output_file
from cnclip_vision.errors import CNClipError, WorkError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("cnclip_vision.cli")

_THIRD_PARTY_LOGGERS = ("PIL", "matplotlib", "urllib3", "httpx", "httpcore", "filelock", "fsspec", "asyncio")
_QUIET_LOGGERS = ("faiss", "torch.utils._pytree")  # their INFO/WARNING lines on every start are not for users
_COMMAND_MODULES = (convert, zeroshot, retrieval, train, toy, coco, detect, onnx, serve)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one line ``cnclip COMMAND: error: ...`` (exit 2), no usage
    block (``--help`` has it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cnclip",
        description="Chinese-CLIP vision toolkit: zero-shot classification, retrieval, conversion. Results are "
        "printed on stdout (JSON unless --format csv) or written to --output; logs go to stderr.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_global_options(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.add_parsers(sub)
    for command in _all_subparsers(sub):  # -v / -q also after the subcommand
        _add_global_options(command, argparse.SUPPRESS)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v`` / ``-q`` on the main parser (default False) and on every subcommand (default SUPPRESS, so
    that a flag given before the subcommand is not reset by the subcommand's parser)."""
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging on stderr")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="warnings and errors only, no progress bars"
    )


def _all_subparsers(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones (``cnclip index build``) included."""
    found = []
    for parser in dict.fromkeys(sub.choices.values()):
        found.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += _all_subparsers(action)
    return found


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cnclip-vision")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2, one line already printed), --help / --version (0)
        return e.code if isinstance(e.code, int) else 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in _THIRD_PARTY_LOGGERS:  # -v is about this library; their debug chatter stays out
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    # faiss logs which of its libraries it tried on every import; torchao (imported by transformers when
    # installed) registers enums torch >= 2.12 handles natively, and torch warns about each: not for users
    for noisy in _QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        if getattr(args, "output_is_file", False) and args.output not in (None, "-"):
            check_output_file(args.output)
        return int(args.func(args) or 0)
    except WorkError as e:  # valid input, and the work did not succeed (an export's check, ...)
        logger.debug("traceback", exc_info=True)
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"cnclip {args.command}: failed: {message}", file=sys.stderr)
        return 1
    except (CNClipError, ValueError, TypeError, OSError) as e:  # bad input: files, arguments, permissions
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            message = f"{e.filename}: {e.strerror}"
        else:
            message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        logger.debug("traceback", exc_info=True)
        print(f"cnclip {args.command}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cnclip ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"cnclip {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure of the work itself: one line, the traceback with -v
        logger.debug("traceback", exc_info=True)
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        hint = "" if args.verbose else " (rerun with -v for the traceback)"
        print(f"cnclip {args.command}: failed: {type(e).__name__}: {message}{hint}", file=sys.stderr)
        return 1
