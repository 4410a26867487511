"""``cnclip export-onnx``: the image and text encoders as ONNX files, checked with onnxruntime."""

from __future__ import annotations

import argparse
import logging

from cnclip_vision.cli.common import arch_name, number, out_folder, resolve_device, write_records

logger = logging.getLogger("cnclip_vision.cli")


def _export_onnx(args: argparse.Namespace) -> int:
    from cnclip_vision.export.onnx import export_onnx
    from cnclip_vision.models.factory import load

    device = resolve_device(args.device)
    logger.info("loading %s on %s", args.model, device)
    model = load(args.model, arch=args.arch, device=device)
    report = export_onnx(
        model, args.output_dir, opset=args.opset, fp16=args.fp16, check=not args.no_check, source=str(args.model)
    )
    check = report["check"]
    if check is not None:
        tolerance = ", ".join(f"{k} {v}" for k, v in check["tolerance"].items())
        logger.info(
            "onnxruntime vs PyTorch: max abs difference %.3g, min cosine %.8f (tolerance: %s)",
            check["max_abs_diff"],
            check["min_cosine"],
            tolerance,
        )
    write_records(args, [report], document=report)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export the image and text encoders to ONNX and check them with onnxruntime",
        description="Write image_encoder.onnx (pixel_values [batch, 3, S, S] -> image_embeds [batch, D]) and "
        "text_encoder.onnx (input_ids, attention_mask int64 [batch, seq] -> text_embeds [batch, D]), the "
        "unnormalised features of encode_image / encode_text, with a dynamic batch axis and text length, plus "
        "onnx_config.json (preprocessing, tokenizer, sizes), vocab.txt and export_report.json into --output. "
        "Unless --no-check, onnxruntime runs both at new batch sizes and lengths and is compared with PyTorch "
        "(max abs difference <= 1e-4 in fp32, cosine >= 0.999 with --fp16); a failed check exits with status 2 and "
        "leaves --output as it was, the export and its report going to OUTPUT.check-failed for inspection. "
        "Prints the report as JSON. Needs: pip install 'cnclip-vision[onnx]'.",
    )
    group = p.add_argument_group("model")
    group.add_argument(
        "--model",
        default="ViT-B-16",
        help="registered name (see `cnclip models`), Hugging Face directory, or clip_cn_*.pt file "
        "(default: %(default)s, from the Hugging Face cache)",
    )
    group.add_argument(
        "--arch", type=arch_name, default=None, help="architecture when it cannot be inferred from the checkpoint"
    )
    group.add_argument(
        "--device", default="cpu", help="torch device for tracing and the PyTorch reference (default: %(default)s)"
    )
    group = p.add_argument_group("export")
    group.add_argument(
        "-o",
        "--output",
        dest="output_dir",
        type=out_folder,
        required=True,
        help="output directory (created; written only when the export and its check succeed)",
    )
    group.add_argument("--opset", type=number(int, 17, 23), default=17, help="ONNX opset, 17-23 (default: %(default)s)")
    group.add_argument(
        "--fp16", action="store_true", help="half-precision weights and compute (float16 pixel_values and embeddings)"
    )
    group.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch")
    p.set_defaults(func=_export_onnx, output=None, format="json")
