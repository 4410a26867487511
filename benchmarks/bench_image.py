"""Image embedding throughput: ours next to transformers' ``ChineseCLIPModel`` on the same random weights.

CPU suite (default): ViT-B-16 at 224, batch 32, ``encode_image`` in each of our CPU modes (``--modes``:
fp32, int8 = dynamic int8 Linear layers, compile = fp32 + ``torch.compile``; optionally bf16) and ONNX Runtime
(our fp32 model exported; ``--skip-onnx``) against ``get_image_features`` of transformers in fp32 (SDPA) —
target >= 3.5x — and of transformers under ``torch.autocast("cpu", dtype=torch.bfloat16)`` — target >= 1.3x.
The headline is our fastest PyTorch mode whose embeddings keep a cosine >= 0.999 to the fp32 reference on
every image. On CPUs without bf16 matrix units the autocast reference is several times slower than fp32: it
is timed once on ``--autocast-batch`` images (8, after a one-image warm-up) and reported per image.

Same-precision path (``--precision bf16|fp16|fp32``, e.g. ``--device cuda --batch-size 256 --precision
bf16`` from gpu.sh): ours loaded in that precision against transformers with the same dtype and batch.

Every case is warmed up, then the cases run alternately ``--repeats`` times (median). Figures, never asserts.
"""

from __future__ import annotations

import sys
import tempfile
import time

import common
import torch

SCRIPT = "bench_image"


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (quick: 4)")
    parser.add_argument(
        "--modes",
        default=None,
        help="CPU suite: our modes, PRECISION[+compile] from fp32, bf16, int8 (compile = fp32+compile) (default: "
        "every precision this machine runs fast, each also compiled; quick: fp32,int8)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="same-precision comparison (ours and transformers both in this dtype)",
    )
    parser.add_argument("--compile", action="store_true", help="same-precision path: also time ours with compile=True")
    parser.add_argument("--autocast-batch", type=int, default=8, help="images the autocast reference is timed on")
    parser.add_argument("--skip-autocast", action="store_true")
    parser.add_argument("--skip-onnx", action="store_true", help="CPU suite: do not time ONNX Runtime")
    args = parser.parse_args(argv)
    return common.run_suites(parser, args, SCRIPT, cpu_suite, same_precision)


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _onnx_case(model, pixels: torch.Tensor, cases: dict, notes: dict[str, str]) -> str | None:
    """Add the case "onnxruntime fp32": ``model`` (our fp32 model, or the folder to load it from) exported to
    ONNX (not timed) and run by onnxruntime on ``pixels``. Returns onnxruntime's version, or None (logged)
    where the exporter or onnxruntime is missing."""
    import cnclip_vision

    if not isinstance(model, torch.nn.Module):
        model = cnclip_vision.load(model, precision="fp32")
    out = tempfile.TemporaryDirectory(prefix="cnclip-bench-onnx-")  # removed with the case, or at exit
    try:
        session, input_name, output_name, seconds, version = common.onnx_image_session(model, out.name)
    except RuntimeError as e:
        common.log(f"onnxruntime not timed: {e}")
        return None
    feed = {input_name: pixels.numpy()}

    def run() -> torch.Tensor:
        return torch.from_numpy(session.run([output_name], feed)[0]).float()

    run.keep = out  # type: ignore[attr-defined]
    cases["onnxruntime fp32"] = run
    notes["onnx"] = f"our fp32 model exported (both encoders, {seconds:.0f} s, not timed), CPU provider"
    return version


def cpu_suite(args, config, directory, roofline: common.Roofline, report: common.Report) -> None:
    import cnclip_vision

    batch = args.batch_size or (4 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    modes = common.cpu_modes(args.modes, args.quick)
    bf16_fast = common.bf16_fast()
    models, notes = {}, {}
    for mode in modes:
        start = time.perf_counter()
        precision, compiled = common.parse_mode(mode)
        models[mode] = cnclip_vision.load(directory, precision=precision, compile=compiled)
        common.log(f"loaded ours {mode} in {time.perf_counter() - start:.1f} s")
    ref = common.load_hf(directory)
    size = ref.config.vision_config.image_size
    pixels = _images(batch, size, args.seed)

    ref_gflop = common.count_gflop(lambda x: ref.get_image_features(pixel_values=x), pixels[:1])
    gflop = common.count_gflop(lambda x: models["fp32"].encode_image(x), pixels[:1]) if "fp32" in models else ref_gflop

    for mode in [m for m in models if common.parse_mode(m)[1]]:  # the first call of a shape compiles: not timed
        start = time.perf_counter()
        with torch.inference_mode():
            models[mode].encode_image(pixels)
        notes[mode] = f"first call (compilation) {time.perf_counter() - start:.0f} s, not timed"
        common.log(f"compiled {mode}: {time.perf_counter() - start:.1f} s")

    def ours_fn(model):
        def run():
            with torch.inference_mode():
                return model.encode_image(pixels).float()

        return run

    def ref_run():
        with torch.inference_mode():
            return common.hf_features(ref.get_image_features(pixel_values=pixels)).float()

    def autocast_run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return common.hf_features(ref.get_image_features(pixel_values=pixels)).float()

    # bf16 on a CPU without bf16 units is several times slower than fp32: timed once on a few images
    slow = set() if bf16_fast else {m for m in models if common.parse_mode(m)[0] == "bf16"}
    cases = {f"ours {m}": ours_fn(model) for m, model in models.items() if m not in slow}
    cases["transformers fp32"] = ref_run
    if bf16_fast and not args.skip_autocast:  # same batch and repeats as ours
        cases["transformers bf16 autocast"] = autocast_run
    onnx = None if args.skip_onnx else _onnx_case(models.get("fp32") or directory, pixels, cases, notes)
    times, outputs = common.alternate(cases, repeats, log=common.log)
    ref_out = outputs["transformers fp32"]
    ref_per_s = batch / common.median(times["transformers fp32"])
    measure = f"image embedding ({common.arch_name(config)}, {size}px, batch {batch})"
    reference = "transformers fp32 (SDPA)"
    rows = []
    for m, model in models.items():
        kind = common.parse_mode(m)[0]
        if m in slow:
            small = pixels[: args.autocast_batch]
            with torch.inference_mode():
                start = time.perf_counter()
                out = model.encode_image(small).float()
                per_s = len(small) / (time.perf_counter() - start)
            cos = common.cosine_min(out, ref_out[: len(small)])
            note = f"timed once on {len(small)} images, per image"
        else:
            per_s = batch / common.median(times[f"ours {m}"])
            cos = common.cosine_min(outputs[f"ours {m}"], ref_out)
            note = notes.get(m, "")
        if model.int8_backend:
            note = "; ".join(filter(None, [note, f"int8 kernels: {model.int8_backend}"]))
        label = "ours " + m.replace("+compile", " + torch.compile")
        rows.append(
            report.row(
                measure,
                label,
                reference,
                unit="img/s",
                ours_value=per_s,
                ref_value=ref_per_s,
                target=3.5,
                cosine=cos,
                ours_roofline=roofline.items_per_s(kind, gflop),
                ref_roofline=roofline.items_per_s("fp32", ref_gflop),
                ours_gflop=gflop,
                ref_gflop=ref_gflop,
                notes=note,
                mode=m,
                batch=batch,
                repeats=repeats,
            )
        )
    if onnx is not None:  # an fp32 path of its own: in the table, never the headline
        rows.append(
            report.row(
                measure,
                f"onnxruntime {onnx} fp32 (image_encoder.onnx)",
                reference,
                unit="img/s",
                ours_value=batch / common.median(times["onnxruntime fp32"]),
                ref_value=ref_per_s,
                target=3.5,
                cosine=common.cosine_min(outputs["onnxruntime fp32"], ref_out),
                ours_roofline=roofline.items_per_s("fp32", gflop),
                ref_roofline=roofline.items_per_s("fp32", ref_gflop),
                ours_gflop=gflop,
                ref_gflop=ref_gflop,
                notes=notes["onnx"],
                mode="onnxruntime",
                batch=batch,
                repeats=repeats,
            )
        )
    best = common.mark_headline([r for r in rows if r.get("mode") != "onnxruntime"])
    for r in rows:
        report.emit(r)

    if args.skip_autocast or best is None:
        return
    if "transformers bf16 autocast" in times:
        seconds = common.median(times["transformers bf16 autocast"])
        auto_per_s = batch / seconds
        auto_cos = common.cosine_min(outputs["transformers bf16 autocast"], ref_out)
        timed = f"reference timed as ours (batch {batch}, {repeats} alternating repeats, median)"
    else:
        small = pixels[: args.autocast_batch]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref.get_image_features(pixel_values=small[:1])  # warm-up on one image
            start = time.perf_counter()
            out = common.hf_features(ref.get_image_features(pixel_values=small)).float()
            seconds = time.perf_counter() - start
        auto_per_s = len(small) / seconds
        auto_cos = common.cosine_min(out, ref_out[: len(small)])
        timed = f"no bf16 units: reference timed once on batch {len(small)} ({seconds:.0f} s, after a 1-image warm-up)"
    report.emit(
        report.row(
            measure,
            best["ours"],
            "transformers fp32 weights, bf16 autocast (SDPA)",
            unit="img/s",
            ours_value=best["ours_value"],
            ref_value=auto_per_s,
            target=1.3,
            cosine=best["cosine_min"],
            ours_roofline=best["ours_roofline"],
            ref_roofline=roofline.items_per_s("bf16", ref_gflop),
            ours_gflop=gflop,
            ref_gflop=ref_gflop,
            headline=True,
            mode=best.get("mode"),
            batch=batch,
            notes=f"{timed}; its cosine to fp32 {auto_cos:.5f}; ours as in the headline row",
        )
    )


def same_precision(args, config, directory, roofline: common.Roofline, report: common.Report) -> None:
    import cnclip_vision

    device, precision = args.device, args.precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    on_gpu = device.startswith("cuda")
    batch = args.batch_size or (4 if args.quick else (256 if on_gpu else 32))
    repeats = args.repeats or (2 if args.quick else (10 if on_gpu else 3))
    sync = common.make_sync(device)
    ours = {"eager": cnclip_vision.load(directory, precision=precision, device=device)}
    if args.compile:
        ours["compile"] = cnclip_vision.load(directory, precision=precision, device=device, compile=True)
    ref = common.load_hf(directory, dtype, device)
    ref32 = ref if precision == "fp32" else common.load_hf(directory, torch.float32, device)
    size = ref.config.vision_config.image_size
    pixels = _images(batch, size, args.seed).to(device)
    gflop = common.count_gflop(lambda x: ours["eager"].encode_image(x), pixels[:1])

    with torch.inference_mode():
        fp32_out = torch.cat(
            [common.hf_features(ref32.get_image_features(pixel_values=c)).float() for c in pixels.split(64)]
        )
    if ref32 is not ref:
        del ref32
        if on_gpu:
            torch.cuda.empty_cache()
    if "compile" in ours:
        start = time.perf_counter()
        with torch.inference_mode():
            ours["compile"].encode_image(pixels)
        sync()
        common.log(f"compiled: {time.perf_counter() - start:.1f} s")

    def ours_fn(model):
        def run():
            with torch.inference_mode():
                return model.encode_image(pixels)

        return run

    def ref_run():
        with torch.inference_mode():
            return common.hf_features(ref.get_image_features(pixel_values=pixels.to(dtype)))

    cases = {f"ours {k}": ours_fn(m) for k, m in ours.items()}
    cases["reference"] = ref_run
    times, outputs = common.alternate(cases, repeats, warmup=2 if on_gpu else 1, sync=sync, log=common.log)
    ref_per_s = batch / common.median(times["reference"])
    measure = f"image embedding ({common.arch_name(config)}, {size}px, batch {batch}, {device} {precision})"
    for k in ours:
        per_s = batch / common.median(times[f"ours {k}"])
        report.add(
            measure,
            f"ours {precision}" + (" + torch.compile" if k == "compile" else ""),
            f"transformers {precision} (SDPA)",
            unit="img/s",
            ours_value=per_s,
            ref_value=ref_per_s,
            cosine=common.cosine_min(outputs[f"ours {k}"], fp32_out),
            ours_roofline=roofline.items_per_s(precision, gflop),
            ref_roofline=roofline.items_per_s(precision, gflop),
            ours_gflop=gflop,
            ref_gflop=gflop,
            notes=f"reference cosine to fp32 {common.cosine_min(outputs['reference'], fp32_out):.5f}",
            batch=batch,
            device=device,
            precision=precision,
        )


if __name__ == "__main__":
    sys.exit(main())
