"""Zero-shot classification end to end: JPEG files on disk -> scores against 100 Chinese labels.

Both sides start from the file paths and a loaded model (loading is not timed) and end with a cosine score
matrix ``[n_images, 100]``; the class (text) embeddings are computed once per run and are part of the time.

* ours: ``ZeroShotClassifier(model, labels, templates=...)`` for the class embeddings, then
  ``cnclip_vision.data.images.iter_image_batches(paths, image_transform(224), batch_size, num_workers)`` (decode and
  resize in DataLoader workers) + ``classifier.image_features`` + ``scores_from_features``; fp32 and int8;
* transformers, the documented usage: ``ChineseCLIPProcessor`` + ``ChineseCLIPModel``, the text features
  computed once (``processor(text=..., padding=True)``), then per image ``Image.open`` ->
  ``processor(images=image)`` -> ``get_image_features`` -> cosine with the text features. Target >= 3x.

The images are generated: ``--n-images`` (256) smooth random 640x480 JPEGs in a temporary folder. The
templates are ``--templates single`` ("一张{}的照片。", one prompt per label) by default, on both sides;
``--templates default`` uses the 25 of ``DEFAULT_TEMPLATES`` (class embedding = mean over templates, both
sides). Each pipeline is warmed up on 4 images, then timed ``--repeats`` (1) times, alternating. The cosine
compares our image embeddings with transformers' fp32 ones, image by image; "top-1 agree" is the share of
images whose best label is the same. Figures, never asserts.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import common
import numpy as np
import torch
import torch.nn.functional as F

SCRIPT = "bench_zeroshot"


def make_jpegs(directory: Path, n: int, seed: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """``n`` smooth random colour images (bicubic-upscaled noise plus grain) as JPEG, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        image = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
        path = directory / f"img_{i:04d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def templates_for(name: str) -> tuple[str, ...]:
    from cnclip_vision.zeroshot import resolve_templates

    return resolve_templates(name)


def ours_pipeline(model, labels: Sequence[str], templates, paths: Sequence[Path], batch_size: int, workers: int | None):
    from cnclip_vision import ZeroShotClassifier, image_transform
    from cnclip_vision.data.images import iter_image_batches

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        classifier = ZeroShotClassifier(model, labels, templates=templates)
        feats, scores = [], []
        transform = image_transform(model.image_size)
        for batch in iter_image_batches(paths, transform, batch_size=batch_size, num_workers=workers, progress=False):
            features = classifier.image_features(batch.pixel_values, batch_size=batch_size)
            feats.append(features)
            scores.append(classifier.scores_from_features(features))
        return torch.cat(feats), torch.cat(scores)

    return run


def ref_pipeline(model, processor, labels: Sequence[str], templates, paths: Sequence[Path]):
    from PIL import Image

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            prompts = [t.format(label) for label in labels for t in templates]
            text = processor(text=prompts, padding=True, return_tensors="pt")
            features = common.hf_features(
                model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            )
            features = F.normalize(features, dim=-1).view(len(labels), len(templates), -1).mean(1)
            text_features = F.normalize(features, dim=-1)
            feats, scores = [], []
            for path in paths:
                image = Image.open(path)
                inputs = processor(images=image, return_tensors="pt")
                image_features = common.hf_features(model.get_image_features(pixel_values=inputs["pixel_values"]))
                feats.append(image_features)
                scores.append(F.normalize(image_features, dim=-1) @ text_features.t())
        return torch.cat(feats), torch.cat(scores)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--n-images", type=int, default=None, help="JPEG files classified (default 256; quick 8)")
    parser.add_argument("--n-labels", type=int, default=None, help="labels (default 100; quick 10)")
    parser.add_argument("--templates", default="single", help="single, default (25 templates) or none")
    parser.add_argument("--batch-size", type=int, default=64, help="ours: images per batch")
    parser.add_argument("--workers", type=int, default=None, help="ours: DataLoader workers (library default)")
    parser.add_argument("--modes", default="fp32,int8")
    args = parser.parse_args(argv)
    common.setup(args)
    from bench_text import Flops, token_lengths
    from transformers import ChineseCLIPProcessor

    import cnclip_vision

    config = common.bench_config(args.arch, args.quick)
    n_images = args.n_images or (8 if args.quick else 256)
    labels = list(common.LABELS[: args.n_labels or (10 if args.quick else 100)])
    templates = templates_for(args.templates)
    repeats = args.repeats or 1
    modes = [m for m in args.modes.split(",") if m]
    roofline = common.get_roofline("cpu", args.quick)
    report = common.Report(SCRIPT, common.machine_info(), roofline)
    with (
        tempfile.TemporaryDirectory(prefix="cnclip-bench-jpegs-") as tmp,
        common.weights_dir(config, args.seed) as directory,
    ):
        paths = make_jpegs(Path(tmp), n_images, args.seed)
        models = {m: cnclip_vision.load(directory, precision=m) for m in modes}
        ref = common.load_hf(directory)
        processor = ChineseCLIPProcessor.from_pretrained(directory)
        warm = paths[:4]
        cases, warmups = {}, {}
        for m, model in models.items():
            cases[f"ours {m}"] = ours_pipeline(model, labels, templates, paths, args.batch_size, args.workers)
            warmups[f"ours {m}"] = ours_pipeline(model, labels, templates, warm, args.batch_size, args.workers)
        cases["transformers"] = ref_pipeline(ref, processor, labels, templates, paths)
        warmups["transformers"] = ref_pipeline(ref, processor, labels, templates, warm)
        times, outputs = common.alternate(cases, repeats, warmup_cases=warmups, log=common.log)

        size = ref.config.vision_config.image_size
        image_gflop = common.count_gflop(
            lambda x: ref.get_image_features(pixel_values=x), torch.zeros(1, 3, size, size)
        )
        flops = Flops(next(iter(models.values())) if "fp32" not in models else models["fp32"])
        prompts = [t.format(label) for label in labels for t in templates]
        lengths = token_lengths(prompts)
        ours_gflop = image_gflop + flops.per_item(lengths, 256, sort=True) * len(prompts) / n_images
        ref_gflop = image_gflop + flops.per_item(lengths, len(prompts), sort=False) * len(prompts) / n_images

    ref_feats, ref_scores = outputs["transformers"]
    ref_per_s = n_images / common.median(times["transformers"])
    workers = args.workers
    if workers is None:  # the library's default, as iter_image_batches picks it
        workers = f"default = {min(4, os.cpu_count() or 1) if n_images > args.batch_size else 0}"
    measure = (
        f"zero-shot end to end ({common.arch_name(config)}, {n_images} JPEG 640x480, {len(labels)} labels, "
        f"{len(templates)} template{'s' if len(templates) > 1 else ''})"
    )
    rows = []
    for m in models:
        feats, scores = outputs[f"ours {m}"]
        agree = float((scores.argmax(-1) == ref_scores.argmax(-1)).float().mean())
        rows.append(
            report.row(
                measure,
                f"ours {m} (ZeroShotClassifier + iter_image_batches)",
                "transformers fp32, processor + model per image",
                unit="img/s",
                ours_value=n_images / common.median(times[f"ours {m}"]),
                ref_value=ref_per_s,
                target=3.0,
                cosine=common.cosine_min(feats, ref_feats),
                ours_roofline=roofline.items_per_s("int8" if m == "int8" else "fp32", ours_gflop),
                ref_roofline=roofline.items_per_s("fp32", ref_gflop),
                ours_gflop=ours_gflop,
                ref_gflop=ref_gflop,
                notes=f"top-1 agree {agree:.1%}; batch {args.batch_size}, workers {workers}; text embeddings included",
                mode=m,
                n_images=n_images,
                repeats=repeats,
                top1_agreement=agree,
            )
        )
    common.mark_headline(rows)
    for r in rows:
        report.emit(r)
    report.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
