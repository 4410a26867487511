"""How our throughput scales, each point next to its roofline (machine GFLOP/s / model GFLOP per item).

* batch size 1, 2, 4, 8, 16, 32, 64: ViT-B-16 ``encode_image`` at 224 in fp32 and int8 (alternating per
  point); the "reference" of each point is the same mode at batch 1, so the ratio is the batching speed-up;
  the int8 cosine is against fp32 on the same batch;
* input resolution 224, 448, 640, 1024: the ViTDet backbone (``cnclip_vision.backbones.pyramid.
  vit_fpn_backbone("ViT-B-16", weights=model)``: the tower with its position embedding interpolated, plus
  the simple feature pyramid) forward on one image, fp32;
* the open-vocabulary detector at 640x640: ``OpenVocabDetector(model, DetectorConfig(clip="ViT-B-16"))``
  ``.predict`` of one image, 3 labels, ``vlm_mode="dense"`` and ``"off"``; its roofline counts every
  FLOP of one call (backbone, RPN, region head).

Every point is warmed up (batch >= 16: the model is already warm, no separate warm-up), then timed as often
as fits ``--point-budget`` seconds (1 to ``--repeats``, median). Figures, never asserts.
"""

from __future__ import annotations

import sys
import time

import common
import numpy as np
import torch

SCRIPT = "bench_scaling"


def _seconds(fn, sync=lambda: None) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def point(cases: dict, budget: float, max_repeats: int, warmup: bool):
    """Warm up (or not), then alternate as many rounds as fit ``budget`` seconds."""
    if warmup:
        estimate = max(_seconds(fn) for fn in cases.values())
        repeats = max(1, min(max_repeats, int(budget / max(estimate, 1e-6))))
    else:
        repeats = 1
    times, outputs = common.alternate(cases, repeats, warmup=0)
    return {k: common.median(v) for k, v in times.items()}, outputs, repeats


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--batch-sizes", default=None, help="default 1,2,4,8,16,32,64 (quick 1,2)")
    parser.add_argument("--resolutions", default=None, help="default 224,448,640,1024 (quick 64,128)")
    parser.add_argument(
        "--detector-size", type=int, default=None, help="default 640 (quick: 64, with a small pyramid and region head)"
    )
    parser.add_argument("--point-budget", type=float, default=6.0, help="seconds of timed runs per point")
    parser.add_argument("--skip-detector", action="store_true")
    args = parser.parse_args(argv)
    common.setup(args)
    import cnclip_vision
    from cnclip_vision.backbones.pyramid import vit_fpn_backbone

    config = common.bench_config(args.arch, args.quick)
    max_repeats = args.repeats or (2 if args.quick else 5)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.quick else "1,2,4,8,16,32,64")).split(",")]
    resolutions = [int(r) for r in (args.resolutions or ("64,128" if args.quick else "224,448,640,1024")).split(",")]
    det_size = args.detector_size or (64 if args.quick else 640)
    small = {"out_channels": 32, "representation_size": 64, "rpn_post_nms_top_n": (100, 100)} if args.quick else {}
    roofline = common.get_roofline("cpu", args.quick)
    report = common.Report(SCRIPT, common.machine_info(), roofline)
    name = common.arch_name(config)

    with common.weights_dir(config, args.seed) as directory:
        models = {m: cnclip_vision.load(directory, precision=m) for m in ("fp32", "int8")}
    size = models["fp32"].image_size
    gen = torch.Generator().manual_seed(args.seed)
    gflop = common.count_gflop(lambda x: models["fp32"].encode_image(x), torch.zeros(1, 3, size, size))

    # --- batch size ---------------------------------------------------------------------------------
    base: dict[str, float] = {}
    for bs in batch_sizes:
        pixels = torch.randn(bs, 3, size, size, generator=gen)

        def run(model, pixels=pixels):
            with torch.inference_mode():
                return model.encode_image(pixels)

        cases = {m: (lambda model=model: run(model)) for m, model in models.items()}
        secs, outs, repeats = point(cases, args.point_budget, max_repeats, warmup=bs < 16)
        common.log(f"batch {bs}: " + ", ".join(f"{m} {bs / s:.2f} img/s" for m, s in secs.items()))
        for m in models:
            per_s = bs / secs[m]
            base.setdefault(m, per_s)
            report.add(
                f"scaling: image embedding vs batch size ({name}, {size}px)",
                f"ours {m}, batch {bs}",
                f"ours {m}, batch {batch_sizes[0]}",
                unit="img/s",
                ours_value=per_s,
                ref_value=base[m],
                cosine=common.cosine_min(outs[m], outs["fp32"]) if m != "fp32" else None,
                ours_roofline=roofline.items_per_s("int8" if m == "int8" else "fp32", gflop),
                ref_roofline=roofline.items_per_s("int8" if m == "int8" else "fp32", gflop),
                ours_gflop=gflop,
                ref_gflop=gflop,
                notes=f"{repeats} timed run{'s' if repeats > 1 else ''}",
                batch=bs,
                mode=m,
            )

    # --- resolution ---------------------------------------------------------------------------------
    backbone = vit_fpn_backbone(config, weights=models["fp32"], out_channels=small.get("out_channels", 256)).eval()
    for res in resolutions:
        x = torch.randn(1, 3, res, res, generator=gen)

        def forward(x=x):
            with torch.inference_mode():
                return backbone(x)

        secs, _, repeats = point({"backbone": forward}, args.point_budget, max_repeats, warmup=True)
        g = common.count_gflop(lambda t: backbone(t), x)
        common.log(f"backbone {res}px: {1 / secs['backbone']:.3f} img/s")
        report.add(
            f"scaling: ViTDet backbone forward vs resolution ({name}, batch 1)",
            f"ours fp32, {res}x{res}",
            "-",
            unit="img/s",
            ours_value=1 / secs["backbone"],
            ref_value=None,
            ours_roofline=roofline.items_per_s("fp32", g),
            ours_gflop=g,
            notes=f"{(res // 16) ** 2} tokens; {g:.0f} GFLOP; {repeats} timed run{'s' if repeats > 1 else ''}",
            resolution=res,
        )

    # --- detector -----------------------------------------------------------------------------------
    if not args.skip_detector:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        from cnclip_vision.detection import DetectionPredictor, DetectorConfig, OpenVocabDetector

        det_config = DetectorConfig(clip=name if isinstance(config, str) else "ViT-B-16", image_size=det_size, **small)
        detector = OpenVocabDetector(models["fp32"], det_config).eval()
        predictor = DetectionPredictor(detector, score_threshold=0.05, batch_size=1)
        predictor.set_vocabulary(["猫", "狗", "电动车"])
        image = np.random.default_rng(args.seed).integers(0, 256, (det_size, det_size, 3), dtype=np.uint8)
        for mode in ("dense", "off"):

            def predict(mode=mode):
                return predictor.predict([image], vlm_mode=mode)

            with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                start = time.perf_counter()
                predict()  # the warm-up, counted
                estimate = time.perf_counter() - start
            g = counter.get_total_flops() / 1e9
            repeats = max(1, min(max_repeats, int(args.point_budget / max(estimate, 1e-6))))
            times, _ = common.alternate({mode: predict}, repeats, warmup=0)
            per_s = 1 / common.median(times[mode])
            common.log(f"detector {mode}: {per_s:.3f} img/s")
            report.add(
                f"detector images/s ({name}, {det_size}x{det_size}, 3 labels)",
                f"OpenVocabDetector fp32, vlm_mode={mode!r}",
                "-",
                unit="img/s",
                ours_value=per_s,
                ref_value=None,
                ours_roofline=roofline.items_per_s("fp32", g),
                ours_gflop=g,
                notes=f"{g:.0f} GFLOP per image (whole predict); {repeats} timed run{'s' if repeats > 1 else ''}",
                vlm_mode=mode,
            )
    report.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
