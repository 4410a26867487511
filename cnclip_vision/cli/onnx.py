"""``cnclip export-onnx``: the image and text encoders as ONNX files, checked with onnxruntime."""

from __future__ import annotations

import argparse
import logging

from cnclip_vision.cli.common import arch_name, number, out_folder, resolve_device, unit_interval, write_records

MIN_OPSET = 17  # cnclip_vision.export.onnx.MIN_OPSET (not imported: --help stays fast)
MIN_DETECTOR_OPSET = 18  # cnclip_vision.detection.export.MIN_DETECTOR_OPSET
DEFAULT_MODEL = "ViT-B-16"

logger = logging.getLogger("cnclip_vision.cli")


def _export_onnx(args: argparse.Namespace) -> int:
    if args.detector is not None:
        return _export_detector(args)
    if args.vlm_mode is not None or args.score_threshold is not None:
        raise ValueError("--vlm-mode and --score-threshold apply to --detector exports only")
    from cnclip_vision.export.onnx import export_onnx
    from cnclip_vision.models.factory import load

    name = args.model or DEFAULT_MODEL
    device = resolve_device(args.device)
    logger.info("loading %s on %s", name, device)
    model = load(name, arch=args.arch, device=device)
    report = export_onnx(
        model,
        args.output_dir,
        opset=args.opset or MIN_OPSET,
        fp16=args.fp16,
        check=not args.no_check,
        source=str(name),
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


def _export_detector(args: argparse.Namespace) -> int:
    """``--detector``: the detector graph (the vocabulary an input) and the text encoder."""
    if args.model is not None or args.arch is not None:
        raise ValueError("--detector exports the detector with the CLIP it names; drop --model / --arch")
    if args.fp16:
        raise ValueError("--fp16 applies to the CLIP encoders; the detector is exported in float32")
    if args.opset is not None and args.opset < MIN_DETECTOR_OPSET:
        raise ValueError(f"--opset {args.opset}: the detector needs opset >= {MIN_DETECTOR_OPSET} (antialiased Resize)")
    from cnclip_vision.detection.export import export_detector_onnx
    from cnclip_vision.detection.model import OpenVocabDetector

    device = resolve_device(args.device)
    logger.info("loading the detector %s on %s", args.detector, device)
    detector = OpenVocabDetector.from_pretrained(args.detector, device=device)
    report = export_detector_onnx(
        detector,
        args.output_dir,
        vlm_mode=args.vlm_mode,
        score_threshold=0.05 if args.score_threshold is None else args.score_threshold,
        opset=args.opset or MIN_DETECTOR_OPSET,
        check=not args.no_check,
        source=str(args.detector),
    )
    check = report["check"]
    if check is not None:
        logger.info(
            "onnxruntime vs PyTorch: %d detections compared over %d cases, all within %s",
            check["detections_compared"],
            len(check["cases"]),
            check["tolerance"],
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
        "(max abs difference <= 1e-4 in fp32, cosine >= 0.999 with --fp16); a failed check exits with status 1 and "
        "leaves --output as it was, the export and its report going to OUTPUT.check-failed for inspection. "
        "Prints the report as JSON. With --detector, the open-vocabulary detector instead: detector.onnx with "
        "the class embeddings as an input (new labels need no new export), text_encoder.onnx to encode them, "
        "detector_onnx_config.json; checked at new image and vocabulary sizes against PyTorch. "
        "Needs: pip install 'cnclip-vision[onnx]'.",
    )
    group = p.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help="registered name (see `cnclip models`), Hugging Face directory, or clip_cn_*.pt file "
        f"(default: {DEFAULT_MODEL}, from the Hugging Face cache)",
    )
    group.add_argument(
        "--arch", type=arch_name, default=None, help="architecture when it cannot be inferred from the checkpoint"
    )
    group.add_argument(
        "--detector",
        default=None,
        metavar="DETECTOR",
        help="export this detector instead (a directory from train-detector, or toy-detector): detector.onnx "
        "(image [3, H, W] in 0..1 of any size, class_embeddings [C, D], class_seen [C], score_threshold -> "
        "boxes, scores, labels, embeddings; the labels are an input, not baked in) and text_encoder.onnx",
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
    group.add_argument(
        "--opset",
        type=number(int, MIN_OPSET, 23),
        default=None,
        help=f"ONNX opset, {MIN_OPSET}-23 (default: {MIN_OPSET}; {MIN_DETECTOR_OPSET} with --detector)",
    )
    group.add_argument(
        "--vlm-mode",
        choices=("crops", "dense", "off"),
        default=None,
        help="with --detector: the VLM branch baked into the graph (default: the detector's)",
    )
    group.add_argument(
        "--score-threshold",
        type=unit_interval,
        default=None,
        help="with --detector: the threshold the check uses and the config recommends (an input of the graph; "
        "default: 0.05)",
    )
    group.add_argument(
        "--fp16", action="store_true", help="half-precision weights and compute (float16 pixel_values and embeddings)"
    )
    group.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch")
    p.set_defaults(func=_export_onnx, output=None, format="json")
