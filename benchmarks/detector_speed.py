"""Images per second of ``OpenVocabDetector.predict``, next to transformers' OWL-ViT B/16, in one process.

Measures (median of ``--repeats`` timed runs after one warm-up, batch 1, 3 labels):
* the shipped toy detector (``toy-detector``) on 128x128 toy scenes (network input 256), each VLM mode;
* our detector on full-size ViT-B-16 with random weights at 640x640, each VLM mode, in fp32 and in every
  faster precision the machine has (``bf16`` where it has bf16 matrix units; ``--precisions`` to choose);
* the same detectors exported with ``export-onnx --detector`` (vocabulary as an input) and run by
  onnxruntime's CPU provider through ``OnnxDetector.detect``, for the VLM modes of ``--onnx-modes``
  (export time not counted; the max abs difference of the scores to PyTorch fp32 on the timed image);
* transformers ``OwlViTForObjectDetection`` B/16 with random weights at its own 768x768 resolution
  (forward + ``post_process_object_detection``).

Random weights give the cost of the real models (the work does not depend on the values), not their
quality. Figures, never asserts: ``python benchmarks/detector_speed.py`` prints a table and JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import common
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


def _ours(detector, images, labels, mode: str, repeats: int, precision: str = "fp32") -> float:
    from cnclip_vision.detection import DetectionPredictor

    predictor = DetectionPredictor(detector, score_threshold=0.05, vlm_mode=mode, batch_size=1, precision=precision)
    predictor.set_vocabulary(labels)  # encoded once, outside the timing
    return _time(lambda: predictor.predict(images), repeats)


def _onnx(detector, image, labels, mode: str, repeats: int, directory: str) -> tuple[float, float]:
    """Seconds per image of the exported detector in onnxruntime, and its max abs score difference to PyTorch."""
    import onnxruntime as ort

    from cnclip_vision.detection import DetectionPredictor
    from cnclip_vision.detection.export import OnnxDetector, export_detector_onnx

    export_detector_onnx(detector, directory, vlm_mode=mode, check=False, text_encoder=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no spinning threads vs torch
    runner = OnnxDetector(directory, session_options=options)
    predictor = DetectionPredictor(detector, score_threshold=0.05, vlm_mode=mode)
    vocabulary = predictor.set_vocabulary(labels)
    runner.set_vocabulary(labels, embeddings=vocabulary.embeddings.numpy(), seen=vocabulary.seen.tolist())
    expected, actual = predictor.predict([image])[0], runner.detect(image, score_threshold=0.05)
    same = actual["scores"].shape == tuple(expected["scores"].shape)
    diff = float(np.abs(actual["scores"] - expected["scores"].numpy()).max(initial=0.0)) if same else float("inf")
    return _time(lambda: runner.detect(image, score_threshold=0.05), repeats), diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-full", action="store_true", help="only the toy detector")
    parser.add_argument("--modes", default="off,dense,crops")
    parser.add_argument(
        "--precisions", default=None, help="comma-separated, e.g. fp32,bf16 (default: fp32, and bf16 where fast)"
    )
    parser.add_argument("--onnx-modes", default="off,dense", help="VLM modes run through onnxruntime ('' = none)")
    args = parser.parse_args()
    precisions = args.precisions.split(",") if args.precisions else ["fp32"] + (["bf16"] if common.bf16_fast() else [])
    onnx_modes = [m for m in args.onnx_modes.split(",") if m]
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
    import tempfile

    work = tempfile.TemporaryDirectory(prefix="detector-speed-")
    for mode in modes:
        for precision in precisions:
            t = _ours(toy, [scene], toy_labels, mode, args.repeats, precision)
            rows.append(
                {
                    "model": f"ours toy-detector {precision}",
                    "input": "128x128 (net 256)",
                    "vlm_mode": mode,
                    "labels": 64,
                    "seconds_per_image": round(t, 4),
                    "images_per_s": round(1 / t, 2),
                }
            )
    toy_image = np.asarray(scene)
    for mode in onnx_modes:
        t, diff = _onnx(toy, toy_image, toy_labels, mode, args.repeats, f"{work.name}/toy-{mode}")
        rows.append(
            {
                "model": "toy-detector onnxruntime fp32",
                "input": "128x128 (net 256)",
                "vlm_mode": mode,
                "labels": 64,
                "score_max_abs_diff": diff,
                "seconds_per_image": round(t, 4),
                "images_per_s": round(1 / t, 2),
            }
        )

    if not args.skip_full:
        clip = create_model("ViT-B-16").eval()
        detector = OpenVocabDetector(clip, DetectorConfig(clip="ViT-B-16")).eval()
        image = np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)
        for mode in modes:
            for precision in precisions:
                t = _ours(detector, [image], labels, mode, args.repeats, precision)
                rows.append(
                    {
                        "model": f"ours ViT-B-16 (random) {precision}",
                        "input": "640x640",
                        "vlm_mode": mode,
                        "labels": 3,
                        "crop_top_k": detector.config.crop_top_k if mode == "crops" else None,
                        "seconds_per_image": round(t, 4),
                        "images_per_s": round(1 / t, 3),
                    }
                )
        for mode in onnx_modes:
            t, diff = _onnx(detector, image, labels, mode, args.repeats, f"{work.name}/vit-b-16-{mode}")
            rows.append(
                {
                    "model": "ViT-B-16 (random) onnxruntime fp32",
                    "input": "640x640",
                    "vlm_mode": mode,
                    "labels": 3,
                    "score_max_abs_diff": diff,
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

    work.cleanup()
    machine = common.machine_line(common.machine_info())
    print(f"# detector speed ({machine})")
    print(f"{'model':42} {'input':18} {'vlm':6} {'s/img':>8} {'img/s':>8}")
    for r in rows:
        print(
            f"{r['model']:42} {r['input']:18} {r['vlm_mode']:6} {r['seconds_per_image']:8.3f} {r['images_per_s']:8.2f}"
        )
    for r in rows:
        print(json.dumps({**r, "machine": machine}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
