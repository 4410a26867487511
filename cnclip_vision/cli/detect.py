"""``cnclip detect``, ``cnclip heatmap``, ``cnclip train-detector`` and the toy detector commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from cnclip_vision.cli.common import (
    TOY_PROTOCOLS,
    add_label_options,
    add_model_options,
    add_output_options,
    number,
    out_folder,
    positive_int,
    read_labels,
    resolve_device,
    seed,
    unit_interval,
    write_records,
)
from cnclip_vision.errors import CNClipError

logger = logging.getLogger("cnclip_vision.cli")

_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _parse_query(text: str) -> Any:
    """``NAME=PATH`` or ``NAME=PATH@x1,y1,x2,y2`` -> ImageQuery."""
    from cnclip_vision.detection import ImageQuery

    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest:
        raise ValueError(f"--query {text!r}: expected NAME=IMAGE or NAME=IMAGE@x1,y1,x2,y2")
    path, box = rest, None
    head, at, tail = rest.rpartition("@")
    if at and not Path(rest).is_file():  # a file name may contain "@" (logo@2x.png)
        try:
            box = tuple(float(v) for v in tail.split(","))
        except ValueError as e:
            raise ValueError(f"--query {text!r}: the box after '@' must be four numbers x1,y1,x2,y2") from e
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise ValueError(f"--query {text!r}: the box after '@' must be four numbers x1,y1,x2,y2")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"--query {text!r}: the box {list(box)} has zero size (expected x1 < x2 and y1 < y2)")
        path = head
    if not Path(path).is_file():
        raise FileNotFoundError(f"--query {name}: image {path} does not exist")
    return ImageQuery(path, name.strip(), box)


def _check_not_a_picture(args: argparse.Namespace) -> None:
    """``-o`` is the results file; a picture name there is the old meaning of ``-o``: say where pictures go."""
    if args.output and Path(args.output).suffix.lower() in _PICTURE_SUFFIXES:
        raise ValueError(
            f"--output {args.output} is the results file (json, jsonl or csv); draw pictures with --draw {args.output}"
        )


def _picture_file(draw: str) -> Path:
    """``--draw`` of a command that makes one picture: a picture file name in an existing folder."""
    out = Path(draw)
    if out.is_dir() or draw.endswith(("/", os.sep)):
        raise ValueError(f"--draw {draw} is a folder; give a picture file name ({', '.join(_PICTURE_SUFFIXES)})")
    if out.suffix.lower() not in _PICTURE_SUFFIXES:
        raise ValueError(f"--draw {draw}: expected a picture file name ending in {', '.join(_PICTURE_SUFFIXES)}")
    if not out.parent.is_dir():
        raise ValueError(f"--draw {draw}: the folder {out.parent} does not exist")
    return out


def _input_images(images: list[str]) -> list[str]:
    """Image files as given, folders expanded (recursively, sorted), as `classify` and `embed` do."""
    from cnclip_vision.data.images import list_images

    return [str(p) for item in images for p in (list_images(item) if Path(item).is_dir() else [item])]


def _picture_paths(images: list[str], output: str | None) -> list[Path | None]:
    from cnclip_vision.data.images import IMAGE_EXTENSIONS

    if output is None:
        return [None] * len(images)
    out = Path(output)
    if len(images) == 1 and out.suffix.lower() in _PICTURE_SUFFIXES:
        return [_picture_file(output)]
    if out.suffix.lower() in _PICTURE_SUFFIXES:
        raise ValueError(f"--draw {out} is a picture file but {len(images)} images were given; pass a folder")
    if not out.is_dir() and out.suffix.lower() in IMAGE_EXTENSIONS:  # x.gif: not a folder the user meant
        raise ValueError(
            f"--draw {out}: pictures are written as {', '.join(_PICTURE_SUFFIXES)}; for a folder of pictures give "
            "a name without an image extension"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--draw {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    stems = [Path(p).stem for p in images]
    unique = len(set(stems)) == len(stems)  # else number them: a/img.png and b/img.png must not collide
    return [out / (f"{s}.png" if unique else f"{i:05d}_{s}.png") for i, s in enumerate(stems)]


def _save_picture(picture: Any, path: Path) -> None:
    from cnclip_vision.io import atomic_write

    with atomic_write(path) as tmp:
        picture.save(tmp, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix[1:].upper())


def _detect(args: argparse.Namespace) -> int:
    from cnclip_vision.data.transforms import load_image
    from cnclip_vision.detection import DetectionPredictor, OpenVocabDetector
    from cnclip_vision.detection.inference import EVAL_SCORE_THRESHOLD, CocoTargets, coco_results
    from cnclip_vision.detection.visualize import draw_detections
    from cnclip_vision.errors import ImageLoadError

    _check_not_a_picture(args)
    images = _input_images(args.images)
    given = read_labels(args.labels, args.labels_file) if (args.labels or args.labels_file) else None
    labels: list[Any] = list(given or [])
    queries = [_parse_query(q) for q in args.query or []]
    targets = None
    if args.format == "coco":
        if args.annotations is None:
            raise ValueError(
                "--format coco needs --annotations GROUND_TRUTH.json: COCO results carry that file's image and "
                "category ids"
            )
        if queries:
            raise ValueError("--format coco cannot hold --query classes: they have no category id")
        targets = CocoTargets.from_file(args.annotations, images, given, name_map=args.name_map)
        labels = list(targets.labels)
    elif args.annotations is not None or args.name_map is not None:
        raise ValueError("--annotations / --name-map apply to --format coco only")
    labels += queries
    if not labels:
        raise ValueError("give the class names with --labels 猫,狗 (or --labels-file, or --query NAME=IMAGE)")
    score_threshold = args.score_threshold
    if score_threshold is None:  # COCO AP wants the long tail of low scores; pictures and lists do not
        score_threshold = EVAL_SCORE_THRESHOLD if targets is not None else 0.3
    pictures = _picture_paths(images, args.draw)
    overrides = {k: v for k, v in (("vlm_mode", args.vlm_mode), ("dense_mode", args.dense_mode)) if v}
    detector = OpenVocabDetector.from_pretrained(args.detector, device=resolve_device(args.device), **overrides)
    predictor = DetectionPredictor(
        detector,
        score_threshold=score_threshold,
        nms_threshold=args.nms_threshold,
        max_detections=args.max_detections,
        agnostic_nms=args.agnostic_nms,
        precision=args.precision,
    )
    predictor.set_vocabulary(labels)
    records: list[dict[str, Any]] = []
    coco: list[dict[str, Any]] = []
    failed = 0
    for start in range(0, len(images), args.batch_size):
        chunk = []
        for index in range(start, min(start + args.batch_size, len(images))):
            try:
                chunk.append((index, load_image(images[index])))
            except (ImageLoadError, OSError) as e:
                logger.warning("skipped %s: %s", images[index], e)
                failed += 1
        if not chunk:
            continue
        for (index, image), result in zip(chunk, predictor.predict([im for _, im in chunk])):
            path, picture_path = images[index], pictures[index]
            if targets is not None:
                coco += coco_results(result, targets.image_ids[index], targets.category_ids)
            records.append({"image": path, "width": image.width, "height": image.height,
                            "detections": _detection_records(result)})  # fmt: skip
            if picture_path is not None:
                _save_picture(draw_detections(image, result), picture_path)
                logger.info("%s: %d detections, picture %s", path, len(result["scores"]), picture_path)
    if failed == len(images):
        raise CNClipError(f"none of the {failed} images could be read")
    if failed:
        logger.warning("%d of %d images could not be read and were skipped", failed, len(images))
    if targets is not None:
        write_records(argparse.Namespace(output=args.output, format="json"), coco)
        return 0
    rows = [  # csv / jsonl: one row per detection
        {"image": r["image"], "width": r["width"], "height": r["height"], "label": d["label"], "score": d["score"],
         "x1": d["box"][0], "y1": d["box"][1], "x2": d["box"][2], "y2": d["box"][3]}
        for r in records
        for d in r["detections"]
    ]  # fmt: skip
    write_records(args, rows, document=records)
    return 0


def _detection_records(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"label": n, "label_index": int(i), "score": round(float(s), 4), "box": [round(float(v), 2) for v in b]}
        for n, i, s, b in zip(result["label_names"], result["labels"], result["scores"], result["boxes"])
    ]


def _heatmap(args: argparse.Namespace) -> int:
    from cnclip_vision.cli.common import load_model
    from cnclip_vision.data.transforms import load_image
    from cnclip_vision.detection.heatmap import similarity_map
    from cnclip_vision.detection.visualize import heatmap_overlay

    _check_not_a_picture(args)
    out = _picture_file(args.draw)
    labels = read_labels(args.labels, args.labels_file)
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"image {args.image} does not exist or is not a file")
    image = load_image(args.image)
    model = load_model(args)
    maps = similarity_map(model, image, labels, size=args.size, templates=args.templates, dense_mode=args.dense_mode)
    note = _alignment_note(args)
    paths = (
        [out]
        if len(labels) == 1
        else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(len(labels))]
    )
    records = []
    for label, heat, path in zip(labels, maps, paths):
        caption = f"{label} ({note})" if note else label
        _save_picture(heatmap_overlay(image, heat, caption=caption, colorbar=True), path)
        peak = int(heat.flatten().argmax())
        records.append(
            {
                "label": label,
                "picture": str(path),
                "grid": list(heat.shape),
                "max_cosine": round(float(heat.max()), 4),
                "peak_cell": [peak // heat.shape[1], peak % heat.shape[1]],
            }
        )
    write_records(args, records)
    return 0


def _alignment_note(args: argparse.Namespace) -> str | None:
    """Logged once when the model's dense tokens in ``--dense-mode`` are known to be poorly aligned; returns the
    short line the pictures carry (None: nothing to say)."""
    from cnclip_vision.toy.dense import alignment_note

    note = alignment_note(str(args.model), args.dense_mode)
    if note is None:
        return None
    logger.warning("%s", note[0])
    return note[1]


def _segment(args: argparse.Namespace) -> int:
    from cnclip_vision.cli.common import load_model
    from cnclip_vision.data.transforms import load_image
    from cnclip_vision.detection.visualize import segmentation_overlay
    from cnclip_vision.errors import ImageLoadError
    from cnclip_vision.segmentation import segment

    _check_not_a_picture(args)
    images = _input_images(args.images)
    labels = read_labels(args.labels, args.labels_file)
    pictures = _picture_paths(images, args.draw)
    model = load_model(args)
    note = _alignment_note(args)
    records, failed = [], 0
    for path, picture_path in zip(images, pictures):
        try:
            image = load_image(path)
        except (ImageLoadError, OSError) as e:
            logger.warning("skipped %s: %s", path, e)
            failed += 1
            continue
        (result,) = segment(
            model, [image], labels, templates=args.templates, dense_mode=args.dense_mode,
            long_side=args.long_side, background_threshold=args.background_threshold,
        )  # fmt: skip
        areas = result.areas()
        record = {"image": path, "width": image.width, "height": image.height}
        record["background"] = round(1 - sum(areas.values()), 6)
        records.append(record | {f"area_{k}": v for k, v in areas.items()})  # flat columns (CSV)
        if picture_path is not None:
            overlay = segmentation_overlay(image, result.label_map, labels, note=note)
            _save_picture(overlay, picture_path)
            logger.info("%s: picture %s", path, picture_path)
    if failed == len(images):
        raise CNClipError(f"none of the {failed} images could be read")
    if failed:
        logger.warning("%d of %d images could not be read and were skipped", failed, len(images))
    write_records(args, records)
    return 0


_TRAIN_OVERRIDES = {
    "output_dir": (out_folder, "folder for checkpoint.pt, metrics.jsonl and the final detector/ directory"),
    "train_data": (str, "COCO annotation file (Chinese category names, or give --name-map)"),
    "image_root": (str, "image folder of the training file (default: beside it, images/ if present)"),
    "name_map": (str, "English -> Chinese category names (JSON object or two-column TSV)"),
    "clip": (str, "the frozen CLIP the detector sits on: a name or a path"),
    "epochs": (number(int, 1), "number of epochs"),
    "max_steps": (number(int, 1), "stop after this many optimizer steps (overrides epochs)"),
    "batch_size": (number(int, 1), "global batch (images), summed over ranks and accumulation steps"),
    "accum_steps": (number(int, 1), "gradient accumulation steps"),
    "lr": (number(float, 0.0), "peak learning rate of AdamW"),
    "weight_decay": (number(float, 0.0), "AdamW weight decay"),
    "precision": (("fp32", "bf16", "fp16"), "fp32, bf16 (autocast) or fp16 (GPU only)"),
    "seed": (seed, "random seed"),
    "num_workers": (number(int, 0), "DataLoader worker processes"),
    "save_every": (number(int, 1), "write checkpoint.pt every N steps (and at the end)"),
    "log_every": (number(int, 1), "append to metrics.jsonl every N steps"),
    "eval_data": (str, "COCO file evaluated periodically (all its categories scored together)"),
    "eval_every": (number(int, 1), "evaluate every N steps (default: each epoch)"),
    "device": (str, "torch device"),
}


def _train_detector(args: argparse.Namespace) -> int:
    from cnclip_vision.detection.train import DetectorTrainConfig, train_detector

    overrides = {name: getattr(args, name) for name in _TRAIN_OVERRIDES}
    if args.categories:
        overrides["categories"] = "base" if args.categories == "base" else read_labels(args.categories, None)
    overrides["progress"] = not args.quiet
    if args.config:
        config = DetectorTrainConfig.from_file(args.config, **overrides)
    else:
        missing = [f"--{n.replace('_', '-')}" for n in ("output_dir", "train_data") if overrides[n] is None]
        if missing:
            raise ValueError(f"give --config RECIPE.json or at least {' and '.join(missing)}")
        config = DetectorTrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    summary = train_detector(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        json.dump(
            {"config": dataclasses.asdict(config), **summary}, sys.stdout, ensure_ascii=False, indent=2, default=list
        )
        sys.stdout.write("\n")
    return 0


def _toy_detector_eval(args: argparse.Namespace) -> int:
    from cnclip_vision.detection import OpenVocabDetector
    from cnclip_vision.models.configs import TOY_DETECTORS
    from cnclip_vision.toy.detector import (
        DETECTOR_QUALITY_BARS,
        evaluate_toy_detector,
        novel_split,
        protocol_of,
        write_toy_detection_data,
    )

    annotations = args.annotations
    if annotations is None:
        protocol = args.protocol or "compositional"
        annotations = write_toy_detection_data(
            args.data_dir, n_train=0, n_val=args.n, val_seed=args.seed, protocol=protocol
        )["val"]
    else:
        protocol = protocol_of(novel_split(annotations))
        if args.protocol and protocol != args.protocol:
            raise ValueError(f"--protocol {args.protocol}: {annotations} marks the novel categories of {protocol!r}")
    name = args.detector or TOY_DETECTORS.get(protocol, "toy-detector")  # the shipped detector of the protocol
    detector = OpenVocabDetector.from_pretrained(name, device=resolve_device(args.device))
    report = evaluate_toy_detector(
        detector, annotations, progress=not args.quiet, dense_modes=args.dense_modes, dense_seed=args.seed
    )
    report = {"detector": name, "annotations": str(annotations), **report}
    write_records(args, [report], document=report)
    if args.check and not report.get("passes", False):
        raise CNClipError(f"the toy detector misses the quality bars {DETECTOR_QUALITY_BARS}: {report['modes']}")
    return 0


def _toy_detector_export(args: argparse.Namespace) -> int:
    from cnclip_vision.toy.detector import export_toy_detector

    exported = export_toy_detector(args.src, args.dst, vlm_mode=args.vlm_mode)
    write_records(args, [{"source": args.src, "exported": str(exported)}])
    return 0


def _add_detector_options(
    parser: argparse.ArgumentParser,
    *,
    batch_size: bool = True,
    precision: bool = True,
    default: str | None = "toy-detector",
    default_help: str = "%(default)s, the toy world's",
) -> None:
    """The model options of the detector commands: ``--model`` is the detector (its CLIP comes with it)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        "--detector",
        dest="detector",
        default=default,
        help=f"detector directory; it names the CLIP it sits on (default: {default_help})",
    )
    group.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda (default: cuda if available)")
    if batch_size:
        group.add_argument(
            "--batch-size", type=positive_int, default=4, help="images per forward pass (default: %(default)s)"
        )
    if precision:
        add_detector_precision(group, "auto")


def _dense_modes(text: str) -> tuple[str, ...]:
    allowed = ("raw", "maskclip", "sclip", "clearclip", "naclip")
    modes = allowed if text == "all" else tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in allowed]
    if bad or not modes:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(allowed)} (or all), got {text!r}"
        )
    return modes


def _add_dense_mode(parser: argparse.ArgumentParser, text: str, default: str | None = None) -> None:
    """``--dense-mode`` (cnclip_vision.backbones.dense.DENSE_MODES; listed here so --help imports nothing)."""
    parser.add_argument(
        "--dense-mode",
        choices=("raw", "maskclip", "sclip", "clearclip", "naclip"),
        default=default,
        help=f"{text}: raw (the last block as trained), or the training-free maskclip, sclip, clearclip, naclip "
        "(default: %(default)s)"
        if default
        else f"{text} (default: the detector's)",
    )


def add_detector_precision(group: Any, default: str, *, prefix: str = "") -> None:
    """``--precision auto|fp32|bf16`` of the detector commands (:class:`DetectionPredictor`'s ``precision``)."""
    group.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=default,
        help=f"{prefix}auto (the backbone in bf16 where the device has bf16 units, else fp32), fp32 or bf16 "
        "(backbone and crops under bf16 autocast; RPN, heads and boxes stay fp32) (default: %(default)s)",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="open-vocabulary detection with Chinese labels; pictures with boxes",
        description="Detect the given labels (also categories never seen in training) in images. Detections "
        "are printed on stdout (JSON: one record per image; --format csv/jsonl: one row per detection) or written "
        "to -o FILE; --draw draws boxes with Chinese labels. Unreadable images are reported, skipped and counted.",
    )
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    _add_detector_options(p)
    p.add_argument("--labels", help="comma-separated labels, e.g. 猫,狗,电动车")
    p.add_argument("--labels-file", help="a file with one label per line")
    p.add_argument(
        "--query",
        action="append",
        metavar="NAME=IMAGE[@x1,y1,x2,y2]",
        help="an image-conditioned query: the (cropped) image's embedding is the class (repeatable)",
    )
    p.add_argument(
        "--draw",
        default=None,
        metavar="PICTURE_OR_FOLDER",
        help="draw the boxes and labels: a .png/.jpg file for one image, else a folder (one picture per image)",
    )
    p.add_argument(
        "--score-threshold",
        type=unit_interval,
        default=None,
        help="minimum score (default: 0.3; 0.001 with --format coco, as COCO AP needs)",
    )
    p.add_argument(
        "--nms-threshold", type=unit_interval, default=0.5, help="IoU of class-aware NMS (default: %(default)s)"
    )
    p.add_argument(
        "--max-detections", type=number(int, 1, 100_000), default=100, help="per image (default: %(default)s)"
    )
    p.add_argument(
        "--agnostic-nms",
        type=unit_interval,
        default=None,
        metavar="IOU",
        help="also suppress overlapping boxes of different labels (one box per place; for labels that overlap, "
        "e.g. 猫,小猫): class-agnostic NMS at this IoU after the per-label one",
    )
    p.add_argument(
        "--vlm-mode", choices=("crops", "dense", "off"), default=None, help="override the detector's VLM branch"
    )
    _add_dense_mode(p, "with --vlm-mode dense: the last block's variant whose tokens the VLM branch pools")
    p.add_argument(
        "--annotations",
        default=None,
        metavar="GROUND_TRUTH.json",
        help="with --format coco: the COCO file whose image ids (matched by file_name) and category ids the results "
        "carry; its categories are the labels unless --labels is given",
    )
    p.add_argument("--name-map", default=None, help="with --format coco: English -> Chinese category names")
    add_output_options(p, formats=("json", "jsonl", "csv", "coco"))
    p.set_defaults(func=_detect)

    p = sub.add_parser(
        "heatmap",
        help="similarity heat map of labels over an image (dense CLIP features)",
        description="Cosine similarity of each patch's dense embedding to each label, drawn over "
        "the image (--draw PICTURE; with several labels, PICTURE gets a _0, _1, ... suffix per label). A JSON "
        "summary (peak cell and cosine per label) goes to stdout or -o.",
    )
    p.add_argument("image", help="image file")
    add_label_options(p)
    p.add_argument("--draw", required=True, metavar="PICTURE", help="the heat map picture (.png, .jpg, .webp)")
    p.add_argument(
        "--size", type=number(int, 32, 4096), default=None, help="input side in pixels (default: the model's)"
    )
    _add_dense_mode(p, "the last block's variant whose patch tokens are compared", default="raw")
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=_heatmap)

    p = sub.add_parser(
        "segment",
        help="open-vocabulary segmentation with Chinese labels (dense CLIP features, training-free)",
        description="Label every pixel with the best of --labels by cosine of its patch's dense embedding (the "
        "last block as --dense-mode says) to each label's text embedding, upsampled to the image. --draw writes "
        "coloured masks with a Chinese legend (a picture for one image, else a folder); the areas per label go "
        "to stdout or -o (json, jsonl or csv).",
    )
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    add_label_options(p)
    p.add_argument("--draw", default=None, metavar="PICTURE_OR_FOLDER", help="coloured masks with a legend")
    _add_dense_mode(p, "the last block's variant whose patch tokens are labelled", default="naclip")
    p.add_argument(
        "--long-side",
        type=number(int, 16, 4096),
        default=None,
        help="network input's long side (default: the image's, at most 672)",
    )
    p.add_argument(
        "--background-threshold",
        type=unit_interval,
        default=0.0,
        help="pixels whose best label probability is below this are background (default: %(default)s, none)",
    )
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=_segment)

    p = sub.add_parser(
        "train-detector",
        help="train the open-vocabulary detector on COCO-format data",
        description="Train the pyramid, RPN and region head of the detector on a frozen CLIP. Options come from "
        "a JSON recipe (--config, e.g. recipes/toy-detector.json or recipes/ovcoco-vit-b-16.json) and/or flags "
        "(flags win). Run under torchrun for data parallel training. Metrics go to OUTPUT_DIR/metrics.jsonl, "
        "the detector to OUTPUT_DIR/detector; a JSON summary is printed at the end.",
    )
    p.add_argument("--config", help="JSON recipe")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt if it exists")
    p.add_argument("--categories", help="train only on these categories (comma-separated names) or 'base'")
    for name, (kind, text) in _TRAIN_OVERRIDES.items():  # kind: a type, or a tuple of choices
        parse = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        p.add_argument("--" + name.replace("_", "-"), **parse, default=None, help=text)
    p.set_defaults(func=_train_detector)

    p = sub.add_parser(
        "toy-detector-eval",
        help="AP50 base/novel of a toy-world detector per VLM mode",
        description="Evaluate a toy detector on freshly generated scenes with all 64 categories "
        "scored together: AP50 base / novel / all for each VLM mode and with random text "
        "embeddings for the novel categories.",
    )
    _add_detector_options(
        p,
        batch_size=False,
        precision=False,
        default=None,
        default_help="the shipped detector of the protocol: toy-detector, toy-detector-held-out-shapes or "
        "toy-detector-held-out-colours",
    )
    p.add_argument("--annotations", default=None, help="an existing toy COCO file (default: generate one)")
    p.add_argument("--data-dir", type=out_folder, default="build/toy-detector-eval", help="where generated scenes go")
    p.add_argument("--n", type=number(int, 1, 100_000), default=500, help="generated scenes (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=777, help="seed of the generated scenes (default: %(default)s)")
    p.add_argument(
        "--protocol",
        choices=TOY_PROTOCOLS,
        default=None,
        help="which categories the generated scenes mark novel (see toy-data detection --protocol; default: "
        "compositional, the shipped detector's); with --annotations, a check of the file's split. The detector "
        "must have been trained for it: one trained on boxes of a novel category is refused",
    )
    p.add_argument("--check", action="store_true", help="exit with status 2 when a quality bar is missed")
    p.add_argument(
        "--dense-modes",
        type=_dense_modes,
        default=(),
        metavar="MODES",
        help="also evaluate the dense branch with each of these last-block variants (comma-separated: raw, "
        "maskclip, sclip, clearclip, naclip, or all), with the patch-level accuracy of the CLIP's dense tokens "
        "on fresh scenes (argmax over the 64 classes of the patches inside each object's mask)",
    )
    add_output_options(p, csv_ok=False)
    p.set_defaults(func=_toy_detector_eval, format="json")

    p = sub.add_parser(
        "toy-detector-export",
        help="store a trained toy detector in the package (fp16)",
        description="Copy a trained toy detector (head weights in half precision; it references "
        "toy-tiny) into the package so that OpenVocabDetector.from_pretrained('toy-detector') and "
        "`cnclip detect` find it.",
    )
    p.add_argument("src", help="trained detector directory (OUTPUT_DIR/detector of train-detector)")
    p.add_argument(
        "--dst", type=out_folder, default=None, help="destination (default: the package's asset of its protocol)"
    )
    p.add_argument(
        "--vlm-mode", choices=("crops", "dense", "off"), default=None,
        help="the exported detector's default VLM branch (an inference setting; default: as trained)",
    )  # fmt: skip
    add_output_options(p)
    p.set_defaults(func=_toy_detector_export)
