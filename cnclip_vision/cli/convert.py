"""``cnclip convert`` and ``cnclip models``."""

from __future__ import annotations

import argparse

from cnclip_vision.cli.common import arch_name, out_folder, write_records


def _convert(args: argparse.Namespace) -> int:
    from cnclip_vision.models.factory import load
    from cnclip_vision.models.weights import describe

    model = load(args.src, arch=args.arch)
    model.save_pretrained(args.dst)
    summary = {"source": str(args.src), "output": str(args.dst), "architecture": describe(model.config)}
    write_records(args, [summary], document=summary)
    return 0


def _models(args: argparse.Namespace) -> int:
    from cnclip_vision.models.configs import get_model_info, list_models

    infos = [get_model_info(n) for n in list_models()]
    write_records(args, [{"name": i.name, "hub_id": i.hub_id, "description": i.description} for i in infos])
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (original clip_cn_*.pt, HF directory, ...) to a Hugging Face directory",
        description="Convert any checkpoint that cnclip_vision.load reads (an original clip_cn_*.pt file, a "
        "Hugging Face directory, a saved safetensors file) into a directory with model.safetensors, config.json, "
        "vocab.txt and preprocessor_config.json. For ViT sizes, transformers' ChineseCLIPModel.from_pretrained "
        "reads the result too. Prints a JSON summary.",
    )
    p.add_argument("src", help="checkpoint file or directory, or a registered model name")
    p.add_argument("dst", type=out_folder, help="output directory (created)")
    p.add_argument(
        "--arch", type=arch_name, default=None, help="architecture name when it cannot be inferred (e.g. ViT-B-16)"
    )
    p.set_defaults(func=_convert, output=None, format="json")

    p = sub.add_parser(
        "models", help="list the registered model names", description="List registered models (JSON or CSV)."
    )
    p.add_argument(
        "--format", choices=("json", "jsonl", "csv"), default="json", help="output format (default: %(default)s)"
    )
    p.set_defaults(func=_models, output=None)
