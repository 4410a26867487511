"""Peak memory of loading ViT-H-14: ``cnclip_vision.load(dir)`` in a fresh process against the parameter bytes.

``create_model("ViT-H-14").save_pretrained(tmp)`` once (about 4 GB on disk, in ``--tmp-dir`` or the system
temporary folder, removed at the end); then each load runs in a fresh subprocess that imports
``torch, transformers, cnclip_vision`` (and the modules of the model classes), reads its RSS, loads, and reports
``VmHWM`` (the process's peak RSS, after every weight has been read once: memory-mapped weights count only
once paged in) minus that RSS. Not ``ru_maxrss``: Linux keeps it across ``fork`` + ``exec``, so a child of
this script (which has just built the model) would report the parent's peak. Target: ours <= 1.2x the bytes
of the loaded parameters and buffers (int8: the int8 weights and scales torchao's tensors hold). transformers'
``ChineseCLIPModel.from_pretrained`` on the same directory is measured the same way, for reference.
Figures, never asserts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

SCRIPT = "bench_memory"

CHILD = r"""
import json, sys, time
def rss_kb(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
import torch, transformers, cnclip_vision
from transformers import ChineseCLIPModel
import cnclip_vision.models.clip, transformers.models.bert.modeling_bert, timm  # code, not weights: in the baseline
try:
    import torchao.quantization  # int8's code
except ImportError:
    pass
from cnclip_vision.models.layers import Int8Linear
Int8Linear.from_linear(torch.nn.Linear(8, 8))(torch.zeros(1, 8))  # int8's kernels paged in: code, in the baseline
which, directory, precision = sys.argv[1:4]
before = rss_kb()
start = time.perf_counter()
if which == "ours":
    model = cnclip_vision.load(directory, precision=precision)
else:
    try:
        model = ChineseCLIPModel.from_pretrained(directory, dtype=torch.float32).eval()
    except TypeError:  # transformers 4.x
        model = ChineseCLIPModel.from_pretrained(directory, torch_dtype=torch.float32).eval()
seconds = time.perf_counter() - start
from cnclip_vision.models.weights import parameter_bytes, stored_tensors
with torch.no_grad():  # read every weight once: memory-mapped weights count only once they are paged in
    for t in stored_tensors(model):  # max, not sum: an int8 sum makes an int64 copy of the tensor
        t.max() if t.numel() else None
peak = rss_kb("VmHWM")  # not ru_maxrss: Linux carries it over from the parent through fork + exec
nbytes = parameter_bytes(model)
print("RESULT " + json.dumps({"rss_after_imports_kb": before, "peak_kb": peak, "after_load_kb": rss_kb(),
      "param_bytes": nbytes, "seconds": seconds}))
"""


def measure(which: str, directory: Path, precision: str) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(directory), precision],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{which} {precision} load failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--arch", default="ViT-H-14")
    parser.add_argument(
        "--precisions", default=None, help="our load precisions measured (default fp32,bf16,int8; quick fp32)"
    )
    parser.add_argument("--skip-transformers", action="store_true", help="(quick skips it too)")
    parser.add_argument("--tmp-dir", default=None, help="where the ~4 GB of weights go (default: system temp)")
    args = parser.parse_args(argv)
    common.setup(args)
    import torch

    import cnclip_vision

    config = common.bench_config(args.arch, args.quick)
    report = common.Report(SCRIPT, common.machine_info(), None)
    gb = 1024**3
    with tempfile.TemporaryDirectory(prefix="cnclip-bench-mem-", dir=args.tmp_dir) as tmp:
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        model = cnclip_vision.create_model(config)
        model.save_pretrained(tmp)
        del model
        disk = sum(p.stat().st_size for p in Path(tmp).iterdir())
        common.log(
            f"created and saved {common.arch_name(config)} ({disk / gb:.2f} GB) in {time.perf_counter() - start:.0f} s"
        )
        precisions = args.precisions or ("fp32" if args.quick else "fp32,bf16,int8")
        results = {p: measure("ours", Path(tmp), p) for p in precisions.split(",") if p}
        hf = None if args.skip_transformers or args.quick else measure("transformers", Path(tmp), "fp32")

    measure_name = f"peak RSS of loading {common.arch_name(config)}"
    for precision, r in results.items():
        peak = (r["peak_kb"] - r["rss_after_imports_kb"]) * 1024
        report.add(
            f"{measure_name} ({precision})",
            f"ours load(precision={precision!r})",
            f"{precision} parameter bytes",
            unit="GB",
            ours_value=peak / gb,
            ref_value=r["param_bytes"] / gb,
            target=1.2,
            target_kind="max",
            notes=f"load {r['seconds']:.1f} s; RSS after imports {r['rss_after_imports_kb'] / 1024**2:.2f} GB; "
            f"file {disk / gb:.2f} GB (fp32)",
            peak_bytes=peak,
            param_bytes=r["param_bytes"],
            load_seconds=r["seconds"],
        )
    if hf is not None and "fp32" in results:
        ours = results["fp32"]
        ours_peak = (ours["peak_kb"] - ours["rss_after_imports_kb"]) * 1024
        hf_peak = (hf["peak_kb"] - hf["rss_after_imports_kb"]) * 1024
        report.add(
            f"{measure_name} (fp32)",
            "ours load(precision='fp32')",
            "transformers ChineseCLIPModel.from_pretrained fp32",
            unit="GB",
            ours_value=ours_peak / gb,
            ref_value=hf_peak / gb,
            notes=f"transformers: {hf_peak / hf['param_bytes']:.2f}x its parameter bytes, load {hf['seconds']:.1f} s; "
            f"ours load {ours['seconds']:.1f} s",
            peak_bytes=ours_peak,
            ref_peak_bytes=hf_peak,
            load_seconds=ours["seconds"],
            ref_load_seconds=hf["seconds"],
        )
    report.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
