"""`make demo`: zero-shot classification of a few generated images with Chinese labels, offline.

Until the project ships a trained model, this runs a RANDOMLY INITIALISED ViT-B-16: the pipeline
(image loading, preprocessing, tokenizer with the real vocabulary, both towers, cosine logits) is real,
the predictions are not. With released weights, pass ``--model ViT-B-16`` (Hub cache) or a local path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import cnclip_vision

LABELS = ["红色的圆形", "蓝色的正方形", "绿色的三角形", "一只猫", "一辆电动车"]


def draw_scenes(directory: Path) -> list[Path]:
    """Three simple pictures written as real PNG files."""
    directory.mkdir(parents=True, exist_ok=True)
    scenes = {
        "red_circle.png": lambda d: d.ellipse((60, 60, 260, 260), fill=(220, 30, 30)),
        "blue_square.png": lambda d: d.rectangle((70, 70, 250, 250), fill=(30, 60, 220)),
        "green_triangle.png": lambda d: d.polygon([(160, 40), (280, 270), (40, 270)], fill=(30, 170, 60)),
    }
    paths = []
    for name, paint in scenes.items():
        image = Image.new("RGB", (320, 320), (235, 235, 225))
        paint(ImageDraw.Draw(image))
        image.save(directory / name)
        paths.append(directory / name)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: random ViT-B-16)")
    parser.add_argument("--output", default="demo_output", help="folder for images and results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    if args.model is None:
        print("NOTE: the weights are RANDOM (no download possible here); the scores below are meaningless.\n")
        model = cnclip_vision.create_model("ViT-B-16")
    else:
        model = cnclip_vision.load(args.model)
    processor = model.get_processor()
    out = Path(args.output)
    paths = draw_scenes(out / "images")

    batch = processor(images=paths, text=LABELS)
    with torch.no_grad():
        logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).logits_per_image
    probs = logits.softmax(dim=-1)

    results = []
    for path, row in zip(paths, probs):
        ranked = sorted(zip(LABELS, row.tolist()), key=lambda x: -x[1])
        results.append({"image": str(path), "top": [{"label": k, "prob": round(p, 4)} for k, p in ranked[:3]]})
        print(f"{path.name:20s} " + "  ".join(f"{k} {p:.2f}" for k, p in ranked[:3]))
    (out / "results.json").write_text(
        json.dumps({"random_weights": args.model is None, "labels": LABELS, "results": results}, ensure_ascii=False, indent=2),
        encoding="utf-8",
    )
    print(f"\nwrote {out / 'results.json'} and the images in {out / 'images'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
