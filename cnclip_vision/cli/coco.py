"""``cnclip make-ovcoco`` and ``cnclip eval-coco``: OV-COCO files with Chinese names and COCO box AP."""

from __future__ import annotations

import argparse
from typing import Any

from cnclip_vision.cli.common import add_output_options, number, out_file, out_folder, positive_int, write_records
from cnclip_vision.cli.detect import add_detector_precision


def _split_list(text: str | None) -> list[int | str] | None:
    """``5,6,猫`` (also full-width commas) -> ``[5, 6, "猫"]``."""
    if text is None:
        return None
    items = [s.strip() for s in text.replace("，", ",").split(",") if s.strip()]
    return [int(s) if s.isdigit() else s for s in items]


def _make_ovcoco(args: argparse.Namespace) -> int:
    from cnclip_vision.detection.coco import convert_ovcoco

    path, counts = convert_ovcoco(
        args.instances, args.output, split=args.split, keep_empty_images=args.keep_empty_images
    )
    summary = {"output": str(path), **counts}
    write_records(argparse.Namespace(output=None, format="json"), [summary], document=summary)
    return 0


def _eval_coco(args: argparse.Namespace) -> int:
    from cnclip_vision.detection.evaluation import evaluate_coco

    if (args.results is None) == (args.detector is None):
        raise ValueError(
            "give either --results RESULTS.json (evaluate detections) or --detector DIR (detect, then evaluate)"
        )
    results: Any = args.results
    ground_truth: Any = args.ground_truth
    if args.detector is not None:
        from cnclip_vision.cli.common import resolve_device
        from cnclip_vision.detection import OpenVocabDetector
        from cnclip_vision.detection.inference import detect_coco, evaluation_image_ids

        detector = OpenVocabDetector.from_pretrained(args.detector, device=resolve_device(args.device))
        results, dataset = detect_coco(
            detector,
            args.ground_truth,
            args.image_root,
            name_map=args.name_map,
            batch_size=args.batch_size,
            vlm_mode=args.vlm_mode,
            progress=not args.quiet,
            precision=args.precision,
        )
        ground_truth = dataset.coco
        image_ids, counts = evaluation_image_ids(dataset, allow_missing=args.allow_missing)
    elif args.allow_missing:
        raise ValueError("--allow-missing applies to --detector runs (which know the images they could not read)")
    else:
        image_ids, counts = None, {}
    metrics = evaluate_coco(
        ground_truth,
        results,
        novel=_split_list(args.novel),
        base=_split_list(args.base),
        max_dets=args.max_dets,
        output=args.results_output,
        image_ids=image_ids,
    )
    metrics = {**metrics, **counts}
    write_records(args, [metrics], document=metrics)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-ovcoco",
        help="convert an official COCO 2017 instances file into an OV-COCO file with Chinese names",
        description="Write OUTPUT/ovcoco_{train,val}2017.json from instances_{train,val}2017.json: train keeps the "
        "48 base categories, val the 48 base + 17 novel ones; images left without annotations are removed (as in "
        "the OV-COCO files everyone uses). Categories get Chinese names, synonyms and their split. Prints a JSON "
        "summary.",
    )
    p.add_argument("--instances", required=True, help="official instances_train2017.json or instances_val2017.json")
    p.add_argument("--split", required=True, choices=("train", "val"), help="which OV-COCO file to make")
    p.add_argument("--output", type=out_folder, required=True, help="output folder (created)")
    p.add_argument("--keep-empty-images", action="store_true", help="keep images that have no annotation left")
    p.set_defaults(func=_make_ovcoco)

    p = sub.add_parser(
        "eval-coco",
        help="COCO box AP (pycocotools) with OV-COCO base/novel AP50",
        description="Evaluate COCO-format detections ([{image_id, category_id, bbox: [x, y, w, h], score}]) against "
        "a COCO ground-truth file. Prints AP, AP50, AP75, APs/m/l, per-category AP and AP50 on the base, novel and "
        'all classes (split from each category\'s "split" field unless --base/--novel are given) as JSON; '
        "figures are fractions, -1 where there is no ground truth.",
    )
    p.add_argument("--ground-truth", required=True, help="COCO annotation file")
    p.add_argument("--results", default=None, help="detections JSON (COCO results format) to evaluate")
    p.add_argument(
        "--detector",
        "--model",
        dest="detector",
        default=None,
        help="or: a detector directory (or toy-detector) run on the ground truth's images",
    )
    p.add_argument("--image-root", default=None, help="with --detector: the image folder (default: beside the file)")
    p.add_argument("--name-map", default=None, help="with --detector: English -> Chinese category names (JSON or TSV)")
    p.add_argument("--vlm-mode", choices=("crops", "dense", "off"), default=None, help="with --detector: VLM branch")
    p.add_argument(
        "--batch-size", type=positive_int, default=4, help="with --detector: images per batch (default: %(default)s)"
    )
    p.add_argument("--device", default=None, help="with --detector: torch device")
    add_detector_precision(p, "fp32", prefix="with --detector (fp32 by default: published figures are fp32): ")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="with --detector: when ground-truth images cannot be read, evaluate on the readable ones only (and "
        "say so in the output) instead of refusing to report AP",
    )
    p.add_argument(
        "--results-output",
        type=out_file,
        default=None,
        metavar="FILE",
        help="write the (checked) detections as COCO results JSON here",
    )
    p.add_argument("--novel", default=None, help="novel categories, comma-separated ids or names")
    p.add_argument("--base", default=None, help="base categories, comma-separated ids or names")
    p.add_argument(
        "--max-dets",
        type=number(int, 1, 100_000),
        default=100,
        help="detections kept per image and class, as pycocotools counts them (default: %(default)s)",
    )
    add_output_options(p, csv_ok=False)
    p.set_defaults(func=_eval_coco, format="json")
