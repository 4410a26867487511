"""``cnclip toy-data``, ``cnclip toy-eval`` and ``cnclip toy-export``: the synthetic toy world and its tiny model."""

from __future__ import annotations

import argparse
import logging

from cnclip_vision.cli.common import TOY_PROTOCOLS, add_output_options, number, out_folder, seed, write_records
from cnclip_vision.errors import CNClipError

logger = logging.getLogger("cnclip_vision.cli")


def _toy_data(args: argparse.Namespace) -> int:
    from cnclip_vision.toy import world as toyworld

    if args.kind == "imagefolder":
        toyworld.write_imagefolder(args.out, n_per_class=args.n, seed=args.seed, image_size=args.image_size)
    elif args.kind == "pairs":
        toyworld.write_pairs_jsonl(args.out, args.n, args.seed, image_size=args.image_size)
    else:
        base, novel = toyworld.protocol_split(args.protocol)
        toyworld.write_detection_set(
            args.out,
            args.n,
            args.seed,
            image_size=args.image_size,
            annotate=base if args.base_only else None,
            novel=novel,
        )
    record = {"kind": args.kind, "out": args.out, "n": args.n, "seed": args.seed}
    if args.kind == "detection":
        record.update(protocol=args.protocol, base_only=args.base_only)
    write_records(args, [record])
    return 0


def _toy_eval(args: argparse.Namespace) -> int:
    from cnclip_vision.models.factory import load
    from cnclip_vision.toy.model import QUALITY_BARS, evaluate_toy_model

    model = load(args.model)
    report = evaluate_toy_model(model, seed=args.seed, n_per_class=args.n_per_class, n_retrieval=args.n_retrieval)
    report = {"model": args.model, "bars": QUALITY_BARS, **report}
    write_records(args, [report], document=report)
    logger.info(
        "zero-shot top-1 %.4f (held-out combos %.4f), text->image R@1 %.4f",
        report["zeroshot_top1"],
        report["zeroshot_top1_held_out_combos"],
        report["t2i_R@1"],
    )
    if args.check and not report["passes"]:
        raise CNClipError(
            f"the toy model misses the quality bars {QUALITY_BARS}: zero-shot top-1 "
            f"{report['zeroshot_top1']:.4f}, text->image R@1 {report['t2i_R@1']:.4f}"
        )
    return 0


def _toy_export(args: argparse.Namespace) -> int:
    from cnclip_vision.toy.model import TOY_MODEL_DIR, export_toy_model

    destination = export_toy_model(args.src, args.dst or TOY_MODEL_DIR)
    write_records(args, [{"source": args.src, "exported": str(destination)}])
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "toy-data",
        help="write a toy-world dataset (images + labels/captions/COCO boxes)",
        description="Write a deterministic toy-world dataset: an ImageFolder with label_cn.txt "
        "(--n images per class), image-caption pairs as JSONL (--n pairs), or a COCO detection set "
        "(--n images).",
    )
    p.add_argument("kind", choices=("imagefolder", "pairs", "detection"), help="what to write")
    p.add_argument("out", type=out_folder, help="output folder")
    p.add_argument(
        "--n",
        type=number(int, 1, 1_000_000),
        default=10,
        help="images per class / pairs / detection images (default: %(default)s)",
    )
    p.add_argument("--seed", type=seed, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--image-size", type=number(int, 16, 2048), default=64, help="image side in pixels (default: %(default)s)"
    )
    p.add_argument(
        "--base-only",
        action="store_true",
        help="detection: annotate only the protocol's 48 base categories (novel objects stay unlabelled, as OV-COCO)",
    )
    p.add_argument(
        "--protocol",
        choices=TOY_PROTOCOLS,
        default="compositional",
        help="detection: which 16 categories are novel: compositional (colour x shape pairs whose colour and shape "
        "base categories also carry), held-out-shapes (every colour of 五角星 and 心形), held-out-colours (every "
        "shape in 青色 and 紫色); sets each category's split (default: %(default)s)",
    )
    add_output_options(p)
    p.set_defaults(func=_toy_data)

    p = sub.add_parser(
        "toy-eval",
        help="measure a toy-world model on freshly generated held-out data",
        description="Zero-shot top-1 over the 64 colour x shape classes (and on the combinations "
        "held out of pretraining) and strict text->image R@1 on caption/image pairs whose captions "
        "identify their image, on newly generated data.",
    )
    p.add_argument("--model", default="toy-tiny", help="model name or path (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=12345, help="seed of the held-out data (default: %(default)s)")
    p.add_argument(
        "--n-per-class",
        type=number(int, 1, 100_000),
        default=20,
        help="classification images per class (default: %(default)s)",
    )
    p.add_argument(
        "--n-retrieval", type=number(int, 1, 100_000), default=1000, help="retrieval pairs (default: %(default)s)"
    )
    p.add_argument("--check", action="store_true", help="exit with status 2 when a quality bar is missed")
    add_output_options(p)
    p.set_defaults(func=_toy_eval)

    p = sub.add_parser(
        "toy-export",
        help="store a trained toy model in the package (fp16)",
        description="Copy a trained toy model into the package (half precision) so that "
        "cnclip_vision.load('toy-tiny') finds it.",
    )
    p.add_argument("src", help="trained model directory (OUTPUT_DIR/model of cnclip train)")
    p.add_argument("--dst", type=out_folder, default=None, help="destination (default: the package's assets/toy-tiny)")
    add_output_options(p)
    p.set_defaults(func=_toy_export)
