"""Images per second of ``OpenVocabDetector.predict``, next to transformers' OWL-ViT B/16, in one process.

Measures (median of ``--repeats`` timed runs after one warm-up, batch 1, fp32, 3 labels):
* the shipped toy detector (``toy-detector``) on 128x128 toy scenes (network input 256), each VLM mode;
* our detector on full-size ViT-B-16 with random weights at 640x640, each VLM mode;
* transformers ``OwlViTForObjectDetection`` B/16 with random weights at its own 768x768 resolution
  (forward + ``post_process_object_detection``).

Random weights give the cost of the real models (the work does not depend on the values), not their
quality. Figures, never asserts: ``python benchmarks/detector_speed.py`` prints a table and JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _ours(detector, images, labels, mode: str, repeats: int) -> float:
    from cnclip_vision.detection import DetectionPredictor

    predictor = DetectionPredictor(detector, score_threshold=0.05, vlm_mode=mode, batch_size=1)
    predictor.set_vocabulary(labels)  # encoded once, outside the timing
    return _time(lambda: predictor.predict(images), repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-full", action="store_true", help="only the toy detector")
    parser.add_argument("--modes", default="off,dense,crops")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    from cnclip_vision import create_model
    from cnclip_vision.detection import DetectorConfig, OpenVocabDetector
    from cnclip_vision.toy import world as toyworld

    modes = args.modes.split(",")
    labels = ["猫", "狗", "电动车"]
    toy = OpenVocabDetector.from_pretrained("toy-detector")
    scene = toyworld.render(toyworld.detection_scenes(1, 5)[0])
    toy_labels = [c.name for c in toyworld.CATEGORIES]
    for mode in modes:
        t = _ours(toy, [scene], toy_labels, mode, args.repeats)
        rows.append(
            {
                "model": "ours toy-detector",
                "input": "128x128 (net 256)",
                "vlm_mode": mode,
                "labels": 64,
                "seconds_per_image": round(t, 4),
                "images_per_s": round(1 / t, 2),
            }
        )

    if not args.skip_full:
        clip = create_model("ViT-B-16").eval()
        detector = OpenVocabDetector(clip, DetectorConfig(clip="ViT-B-16")).eval()
        image = np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)
        for mode in modes:
            t = _ours(detector, [image], labels, mode, args.repeats)
            rows.append(
                {
                    "model": "ours ViT-B-16 (random)",
                    "input": "640x640",
                    "vlm_mode": mode,
                    "labels": 3,
                    "crop_top_k": detector.config.crop_top_k if mode == "crops" else None,
                    "seconds_per_image": round(t, 4),
                    "images_per_s": round(1 / t, 3),
                }
            )
        del detector, clip

        from transformers import OwlViTConfig, OwlViTForObjectDetection

        config = OwlViTConfig(vision_config={"patch_size": 16, "image_size": 768})
        owl = OwlViTForObjectDetection(config).eval()
        pixels = torch.randn(1, 3, 768, 768)
        ids = torch.randint(1, 1000, (3, 16))
        mask = torch.ones_like(ids)

        from transformers import OwlViTImageProcessor

        post = OwlViTImageProcessor()

        def owl_full() -> object:
            with torch.inference_mode():
                out = owl(input_ids=ids, pixel_values=pixels, attention_mask=mask)
            return post.post_process_object_detection(out, threshold=0.05, target_sizes=[(768, 768)])

        t = _time(owl_full, args.repeats)
        rows.append(
            {
                "model": "transformers OWL-ViT B/16 (random)",
                "input": "768x768",
                "vlm_mode": "-",
                "labels": 3,
                "seconds_per_image": round(t, 4),
                "images_per_s": round(1 / t, 3),
            }
        )

    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"# detector speed ({machine})")
    print(f"{'model':38} {'input':18} {'vlm':6} {'s/img':>8} {'img/s':>8}")
    for r in rows:
        print(
            f"{r['model']:38} {r['input']:18} {r['vlm_mode']:6} {r['seconds_per_image']:8.3f} {r['images_per_s']:8.2f}"
        )
    for r in rows:
        print(json.dumps({**r, "machine": machine}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
