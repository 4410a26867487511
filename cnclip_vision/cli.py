"""The ``cnclip`` command line. Results go to stdout (JSON), logs to stderr; user errors exit with 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .errors import CNClipError

logger = logging.getLogger("cnclip_vision.cli")


def _cmd_convert(args: argparse.Namespace) -> dict[str, object]:
    from .factory import load
    from .weights import describe

    model = load(args.src, arch=args.arch)
    model.save_pretrained(args.dst)
    return {"source": str(args.src), "output": str(args.dst), "architecture": describe(model.config)}


def _cmd_models(args: argparse.Namespace) -> list[dict[str, object]]:
    from .configs import get_model_info, list_models

    return [
        {"name": n, "hub_id": get_model_info(n).hub_id, "description": get_model_info(n).description}
        for n in list_models()
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnclip",
        description="Chinese-CLIP vision toolkit. Results are printed as JSON on stdout, logs on stderr.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (original clip_cn_*.pt, HF directory, ...) to a Hugging Face directory",
        description="Convert any checkpoint that cnclip_vision.load reads (an original clip_cn_*.pt file, a "
        "Hugging Face directory, a saved safetensors file) into a directory with model.safetensors, config.json, "
        "vocab.txt and preprocessor_config.json. For ViT sizes, transformers' ChineseCLIPModel.from_pretrained "
        "reads the result too.",
    )
    p.add_argument("src", help="checkpoint file or directory, or a registered model name")
    p.add_argument("dst", help="output directory (created)")
    p.add_argument("--arch", default=None, help="architecture name when it cannot be inferred (e.g. ViT-B-16)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("models", help="list the registered model names", description="List registered models.")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        result = args.func(args)
    except CNClipError as e:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"cnclip {args.command}: error: {message}", file=sys.stderr)
        return 2
    try:
        json.dump(result, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `cnclip ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
