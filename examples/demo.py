"""`make demo`: zero-shot classification, retrieval and open-vocabulary detection with Chinese text, offline, on
the toy world.

Uses the tiny model shipped with the package (`toy-tiny`), trained by `make toy-model` on the project's
synthetic world of coloured shapes: it knows that world only, not real photos. It generates a few
held-out toy images, classifies them against all 64 Chinese colour+shape names, runs a small
text-to-image search, then detects all 64 categories in generated scenes with the shipped toy detector
(trained with boxes of the 48 base categories only), draws pictures with Chinese labels and runs a COCO
evaluation (AP50 on base and novel categories); results and pictures go to the output folder.
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
from cnclip_vision.models.encode import encode_images, encode_texts
from cnclip_vision.toy import world as toyworld


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-tiny", help="model name or path (default: %(default)s)")
    parser.add_argument("--output", default="demo_output", help="folder for images and results.json")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the generated images")
    parser.add_argument(
        "--detector", default="toy-detector", help="detector for step 3 ('' skips it; default: %(default)s)"
    )
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
    for i, array in enumerate(test.images):
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
        retrieval.append(
            {
                "query": query,
                "answer": gallery[qi].name,
                "top3": hits,
                "scores": [round(s, 4) for s in top.values.tolist()],
            }
        )

    detection = _detection(args, out) if args.detector else None
    (out / "results.json").write_text(
        json.dumps(
            {"model": args.model, "classification": classification, "retrieval": retrieval, "detection": detection},
            ensure_ascii=False,
            indent=2,
        ),
        encoding="utf-8",
    )
    print(f"\nwrote {out / 'results.json'} and the images in {out / 'images'}")
    return 0


def _detection(args: argparse.Namespace, out: Path) -> dict:
    """3. open-vocabulary detection with Chinese labels; novel categories were never annotated in training."""
    from cnclip_vision.detection import OpenVocabDetector, detect_coco, draw_detections, evaluate_coco

    detector = OpenVocabDetector.from_pretrained(args.detector)
    annotations = toyworld.write_detection_set(out / "detection", 100, args.seed + 2, image_size=128)
    novel = {c.name for c in toyworld.NOVEL_CATEGORIES}
    labels = [c.name for c in toyworld.CATEGORIES]
    print(f"\nopen-vocabulary detection over {len(labels)} Chinese labels (* = novel: no box of it in training)")
    pictures = []
    for i in range(3):
        image = out / "detection" / "images" / f"{i + 1:06d}.png"
        result = detector.predict([image], labels, score_threshold=0.5)[0]
        found = "  ".join(
            f"{n}{'*' if n in novel else ''} {s:.2f}" for n, s in zip(result["label_names"], result["scores"].tolist())
        )
        pictures.append(out / f"detection_{i}.png")
        draw_detections(image, result).save(pictures[-1])
        print(f"  {image.name}: {found or 'nothing above 0.5'}  -> {pictures[-1].name}")
    results, dataset = detect_coco(detector, annotations, progress=False)
    metrics = evaluate_coco(dataset.coco, results, output=out / "detection" / "results_coco.json")
    summary = {k: round(metrics[k], 4) for k in ("AP", "AP50", "AP50_base", "AP50_novel")}
    (out / "detection" / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"  COCO evaluation on 100 generated scenes (all 64 categories scored together): {summary}")
    return {"pictures": [str(p) for p in pictures], "metrics": summary}


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
