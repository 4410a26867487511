"""`make demo`: zero-shot classification and retrieval with Chinese text, offline, on the toy world.

Uses the tiny model shipped with the package (`toy-tiny`), trained by `make toy-model` on the project's
synthetic world of coloured shapes: it knows that world only, not real photos. It generates a few
held-out toy images, classifies them against all 64 Chinese colour+shape names, runs a small
text-to-image search, prints the results and writes them (with the images) to the output folder.
Pass `--model ViT-B-16` (Hub cache) or a path to run the same steps with a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from PIL import Image

import cnclip_vision
from cnclip_vision import toyworld
from cnclip_vision.inference import encode_images, encode_texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-tiny", help="model name or path (default: %(default)s)")
    parser.add_argument("--output", default="demo_output", help="folder for images and results.json")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the generated images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output)
    (out / "images").mkdir(parents=True, exist_ok=True)

    model = cnclip_vision.load(args.model)
    size = model.image_size
    print(f"model: {args.model} ({'synthetic toy world only' if args.model == 'toy-tiny' else 'checkpoint'})\n")

    # 1. zero-shot classification with Chinese labels, including colour x shape pairs never seen in training
    labels = [c.name for c in toyworld.CATEGORIES]
    shown = [toyworld.CATEGORIES[i] for i in (0, 10, 19, 29, 36, 47, 54, 63)] + list(toyworld.HELD_OUT_COMBOS[:2])
    test = toyworld.classification_set(1, args.seed, categories=shown, image_size=size)
    paths = []
    for i, (array, label) in enumerate(zip(test.images, test.labels)):
        paths.append(out / "images" / f"classify_{i:02d}.png")
        Image.fromarray(array).resize((size * 3, size * 3), Image.NEAREST).save(paths[-1])
    classifier = cnclip_vision.ZeroShotClassifier(model, labels, templates=toyworld.ZERO_SHOT_TEMPLATES)
    predictions = classifier.predict(paths, top_k=3)
    held_out = {c.name for c in toyworld.HELD_OUT_COMBOS}
    print("zero-shot classification over 64 Chinese labels (* = combination never seen in pretraining)")
    correct = 0
    classification = []
    for path, truth, pred in zip(paths, test.labels, predictions):
        correct += pred["labels"][0] == truth
        mark = "*" if truth in held_out else " "
        top = "  ".join(f"{name} {p:.2f}" for name, p in zip(pred["labels"], pred["probs"]))
        print(f"  {path.name}  truth {truth}{mark}  ->  {top}")
        classification.append({"image": str(path), "truth": truth, **pred})
    print(f"  {correct}/{len(paths)} right\n")

    # 2. text -> image retrieval over 50 generated scenes
    scenes = toyworld.retrieval_set(50, args.seed + 1, image_size=size)
    gallery = []
    for i, array in enumerate(scenes.images):
        gallery.append(out / "images" / f"gallery_{i:02d}.png")
        Image.fromarray(array).resize((size * 3, size * 3), Image.NEAREST).save(gallery[-1])
    image_features = encode_images(model, [Image.fromarray(a) for a in scenes.images])
    queries = scenes.captions[:4]
    scores = encode_texts(model, queries) @ image_features.t()
    print("text -> image search over 50 generated scenes (the right answer is the query's own scene)")
    retrieval = []
    for qi, (query, row) in enumerate(zip(queries, scores)):
        top = row.topk(3)
        hits = [gallery[j].name for j in top.indices.tolist()]
        print(f"  「{query}」 -> {', '.join(hits)}  {'right' if top.indices[0] == qi else 'wrong'}")
        retrieval.append({"query": query, "answer": gallery[qi].name, "top3": hits, "scores": [round(s, 4) for s in top.values.tolist()]})

    (out / "results.json").write_text(
        json.dumps({"model": args.model, "classification": classification, "retrieval": retrieval},
                   ensure_ascii=False, indent=2),  # fmt: skip
        encoding="utf-8",
    )
    print(f"\nwrote {out / 'results.json'} and the images in {out / 'images'}")
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
