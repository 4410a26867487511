"""AP50 (novel / base) and seconds per image of the toy detector in each VLM mode (and precision) and, for
``crops``, each ``crop_top_k``: the measurement behind ``DetectorConfig.crop_top_k``'s default. Fresh toy scenes (all 64
categories scored together), one JSON line per setting. Figures, never asserts.

    .venv/bin/python benchmarks/bench_crop_top_k.py --n 150 --seed 31337
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="toy-detector")
    parser.add_argument("--n", type=int, default=150, help="fresh scenes")
    parser.add_argument("--seed", type=int, default=31337, help="seed of the scenes (never a training seed)")
    parser.add_argument("--top-k", default="10,25,50,100", help="crop_top_k values for crops mode")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precisions", default="fp32", help="DetectionPredictor precisions, e.g. fp32,bf16")
    args = parser.parse_args(argv)

    from cnclip_vision.detection import OpenVocabDetector
    from cnclip_vision.detection.inference import evaluate_detector
    from cnclip_vision.toy.detector import write_toy_detection_data

    settings = [("off", None), ("dense", None)] + [("crops", int(k)) for k in args.top_k.split(",")]
    with tempfile.TemporaryDirectory(prefix="cnclip-topk-") as tmp:
        annotations = write_toy_detection_data(tmp, n_train=0, n_val=args.n, val_seed=args.seed)["val"]
        for (mode, k), precision in [(s, p) for s in settings for p in args.precisions.split(",")]:
            overrides = {"vlm_mode": mode, **({"crop_top_k": k} if k else {})}
            detector = OpenVocabDetector.from_pretrained(args.detector, **overrides)
            start = time.perf_counter()
            metrics = evaluate_detector(
                detector, annotations, progress=False, batch_size=args.batch_size, precision=precision
            )
            seconds = time.perf_counter() - start
            row = {
                "mode": mode,
                "precision": precision,
                "crop_top_k": k,
                "AP50_novel": round(metrics["AP50_novel"], 4),
                "AP50_base": round(metrics["AP50_base"], 4),
                "s_per_image": round(seconds / args.n, 4),
                "threads": torch.get_num_threads(),
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
