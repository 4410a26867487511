"""``cnclip classify`` and ``cnclip eval-zeroshot``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cnclip_vision.cli.common import (
    add_label_options,
    add_model_options,
    add_output_options,
    load_model,
    out_file,
    positive_int,
    read_labels,
    read_lines,
    write_records,
)
from cnclip_vision.errors import CNClipError

logger = logging.getLogger("cnclip_vision.cli")


def _classifier(args: argparse.Namespace, model, labels: list[str]):
    from cnclip_vision.zeroshot import ZeroShotClassifier

    cache = Path(args.classifier_cache) if args.classifier_cache else None
    if cache is not None and cache.is_file():
        clf = ZeroShotClassifier.load(cache, model)
        if clf.labels != labels or list(clf.templates) != list(_templates(args)):
            raise CNClipError(
                f"--classifier-cache {cache} holds other labels or templates; delete it or pass another path"
            )
        logger.info("class embeddings read from %s", cache)
        return clf
    clf = ZeroShotClassifier(model, labels, templates=_templates(args), batch_size=max(args.batch_size, 64))
    if cache is not None:
        clf.save(cache)
        logger.info("class embeddings saved to %s", cache)
    return clf


def _templates(args: argparse.Namespace) -> tuple[str, ...]:
    from cnclip_vision.zeroshot import resolve_templates

    if args.template_file:
        return resolve_templates(read_lines(args.template_file, "--template-file"))
    return resolve_templates(args.templates)


def _classify(args: argparse.Namespace) -> int:
    from cnclip_vision.data.images import iter_image_batches, list_images
    from cnclip_vision.data.transforms import image_transform
    from cnclip_vision.models.encode import encode_images

    labels = read_labels(args.labels, args.labels_file)
    paths = list_images(args.images)
    model = load_model(args)
    clf = _classifier(args, model, labels)
    records, failures = [], []
    for batch in iter_image_batches(
        paths,
        image_transform(model.image_size),
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=model.device,
        progress=not args.quiet,
        desc="classify",
        on_failure=lambda p, r: failures.append((p, r)),
    ):
        cosine = clf.scores_from_features(encode_images(model, batch.pixel_values))
        for i, pred in zip(batch.indices, clf.top_k(cosine, args.top_k)):
            records.append(
                {
                    "image": str(paths[i]),
                    "label": pred["labels"][0],
                    "prob": round(pred["probs"][0], 6),
                    "labels": pred["labels"],
                    "probs": [round(p, 6) for p in pred["probs"]],
                }
            )
    if not records:
        raise CNClipError(f"none of the {len(paths)} images could be read")
    logger.info("classified %d images, skipped %d unreadable", len(records), len(failures))
    summary = {
        "n_images": len(records),
        "n_skipped": len(failures),
        "skipped": [{"path": str(p), "reason": r} for p, r in failures],
    }
    write_records(args, records, document={"results": records, **summary})
    return 0


def _split_name(text: str) -> str:
    """argparse type of ``--split``: the name of a folder in the dataset (not empty, no path)."""
    if not text.strip() or text in (".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"expected the name of a folder in the dataset (e.g. test), got {text!r}")
    return text


def _eval_zeroshot(args: argparse.Namespace) -> int:
    from cnclip_vision.zeroshot import read_label_file

    root = Path(args.dataset)
    if root.exists() and not root.is_dir():
        raise CNClipError(f"dataset {root} is a file; expected the dataset folder (label_cn.txt and {args.split}/)")
    if not root.is_dir():
        raise CNClipError(f"dataset folder {root} does not exist")
    label_file = (
        Path(args.labels_file)
        if args.labels_file
        else next(
            (p for p in (root / "label_cn.txt", root.parent / "label_cn.txt") if p.is_file()), root / "label_cn.txt"
        )
    )
    labels = read_label_file(label_file)
    if not (root / args.split).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ValueError(f"--split {args.split}: {root / args.split} is not a folder (the dataset has: {found})")
    model = load_model(args)
    clf = _classifier(args, model, labels)
    report = clf.evaluate(
        root, split=args.split, batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet
    )
    report = {"dataset": str(root), "model": args.model, **report}
    logger.info(
        "top-1 %.4f top-5 %.4f on %d images (%d skipped)",
        report["top1"],
        report["top5"],
        report["n_images"],
        report["n_skipped"],
    )
    rows = [{"class": name, **stats} for name, stats in report["per_class"].items()]
    write_records(args, rows, document=report)
    return 0


def _add_label_options(parser: argparse.ArgumentParser, *, file_only: bool = False) -> None:
    group = add_label_options(parser, file_only=file_only)
    group.add_argument("--template-file", help="your own templates, one per line, each with a {} placeholder")
    group.add_argument(
        "--classifier-cache",
        type=out_file,
        metavar="FILE",
        help="safetensors file caching the class embeddings (written on the first run, read afterwards)",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="zero-shot classification of images with Chinese labels",
        description="Classify images zero-shot against Chinese class names (prompt-ensembled text embeddings). "
        "IMAGES are files, folders (searched recursively) or list files (.txt, one path per line). Unreadable "
        "files are reported on stderr and skipped. Prints, per image, the top-k labels and probabilities "
        "(softmax of 100 x cosine over the labels).",
    )
    p.add_argument("images", nargs="+", help="image files, folders or .txt list files")
    _add_label_options(p)
    p.add_argument("-k", "--top-k", type=positive_int, default=5, help="labels per image (default: %(default)s)")
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=_classify)

    p = sub.add_parser(
        "eval-zeroshot",
        help="zero-shot accuracy on an ImageFolder-style dataset with label_cn.txt",
        description="Evaluate zero-shot classification on DATASET/SPLIT/000/..., DATASET/SPLIT/001/... with "
        "DATASET/label_cn.txt (line i names folder i), the ELEVATER layout of Chinese-CLIP. Reports top-1 and "
        "top-5 accuracy, per-class accuracy and the most frequent confusions as JSON (or per-class rows as CSV).",
    )
    p.add_argument("dataset", help="dataset folder holding label_cn.txt and the split folder")
    p.add_argument("--split", type=_split_name, default="test", help="split folder name (default: %(default)s)")
    _add_label_options(p, file_only=True)
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=_eval_zeroshot)
