"""ONNX Runtime image embedding next to our PyTorch fp32, on the same random weights (reported, no target).

``cnclip_vision.export.onnx.export_onnx(model, dir)`` writes ``image_encoder.onnx`` (input ``pixel_values``,
output ``image_embeds``); onnxruntime (CPU provider, as many intra-op threads as torch) runs it at batch
``--batch-size`` (32) against ``model.encode_image`` in fp32, warmed up, alternating, median of
``--repeats`` (onnxruntime's thread spinning is off: in one process its idle threads would otherwise
take the cores from torch's next run). The export (both encoders; not timed in the throughput) and its
duration are reported with the max abs difference and the cosine of the embeddings. Prints "skipped: ..."
when the exporter or onnxruntime is not installed. Figures, never asserts.
"""

from __future__ import annotations

import sys
import tempfile

import common
import torch

SCRIPT = "bench_onnx"


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (quick: 4)")
    args = parser.parse_args(argv)
    common.setup(args)
    config = common.bench_config(args.arch, args.quick)
    batch = args.batch_size or (4 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    measure = f"image embedding, ONNX Runtime ({common.arch_name(config)}, batch {batch})"
    roofline = common.get_roofline("cpu", args.quick)
    report = common.Report(SCRIPT, common.machine_info(), roofline)
    import cnclip_vision

    with (
        common.weights_dir(config, args.seed) as directory,
        tempfile.TemporaryDirectory(prefix="cnclip-bench-onnx-") as out,
    ):
        model = cnclip_vision.load(directory, precision="fp32")
        try:
            session, input_name, output_name, export_seconds, version = common.onnx_image_session(model, out)
        except RuntimeError as e:
            report.skipped(measure, str(e))
            report.done()
            return 0
        size = model.image_size
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
        feed = {input_name: pixels.numpy()}

        def torch_run():
            with torch.inference_mode():
                return model.encode_image(pixels)

        cases = {"onnxruntime": lambda: torch.from_numpy(session.run([output_name], feed)[0]), "pytorch": torch_run}
        times, outputs = common.alternate(cases, repeats, log=common.log)
        gflop = common.count_gflop(lambda x: model.encode_image(x), pixels[:1])

    report.add(
        measure,
        f"onnxruntime {version} fp32 (image_encoder.onnx, {input_name} -> {output_name})",
        "ours PyTorch fp32 (encode_image)",
        unit="img/s",
        ours_value=batch / common.median(times["onnxruntime"]),
        ref_value=batch / common.median(times["pytorch"]),
        cosine=common.cosine_min(outputs["onnxruntime"], outputs["pytorch"]),
        ours_roofline=roofline.items_per_s("fp32", gflop),
        ref_roofline=roofline.items_per_s("fp32", gflop),
        ours_gflop=gflop,
        ref_gflop=gflop,
        batch=batch,
        repeats=repeats,
        export_seconds=export_seconds,
        max_abs_diff=common.max_abs_diff(outputs["onnxruntime"], outputs["pytorch"]),
        notes=f"max abs diff {common.max_abs_diff(outputs['onnxruntime'], outputs['pytorch']):.2e}; "
        f"export (both encoders) {export_seconds:.0f} s, not timed",
    )
    report.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
