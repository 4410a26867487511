"""Run every side-by-side benchmark, each in its own subprocess (clean peak memory and threads), and collect
their rows into one table: printed as markdown at the end, written to ``build/bench/results.json`` and
``build/bench/results.md`` (atomically).

    .venv/bin/python benchmarks/run_all.py            # the full CPU suite (make bench), ~21 min on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick    # tiny models, a smoke test (build/bench/quick/)
    .venv/bin/python benchmarks/run_all.py --gpu      # bf16/fp16 image and text at batch 256 on CUDA (gpu.sh)

The machine's roofline (matrix-product GFLOP/s) is measured once here and handed to every script.
Figures, never asserts: the exit status is non-zero only when a script crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import common

HERE = Path(__file__).resolve().parent

# name, script, arguments; the CPU suite in order (the rough minutes are those of a 2-core AVX2 machine)
CPU_SUITE = [
    ("image", "bench_image.py", []),
    ("text", "bench_text.py", []),
    ("zeroshot", "bench_zeroshot.py", []),
    ("memory", "bench_memory.py", []),
    ("scaling", "bench_scaling.py", []),
]
GPU_SUITE = [
    (f"{kind}-{p}", f"bench_{kind}.py", ["--device", "cuda", "--batch-size", "256", "--precision", p])
    for p in ("bf16", "fp16")
    for kind in ("image", "text")
]


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_script(name: str, script: str, argv: list[str], env: dict[str, str], timeout: float | None) -> dict[str, Any]:
    """Run one benchmark; echo its human-readable lines, collect its JSON rows."""
    cmd = [sys.executable, "-u", str(HERE / script), *argv]
    print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=common.REPO, bufsize=1)
    timed_out = False
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            stripped = line.strip()
            if stripped.startswith("{"):
                try:
                    data = json.loads(stripped)
                except ValueError:
                    data = None
                if isinstance(data, dict):
                    if "row" in data:
                        rows.append(data["row"])
                    continue
            print(line, end="", flush=True)
            if timeout is not None and time.perf_counter() - start > timeout:
                timed_out = True
                proc.kill()
                break
        proc.wait(timeout=None if timeout is None else max(1.0, timeout - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    seconds = time.perf_counter() - start
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
    print(f"=== {name}: {status}, {seconds / 60:.1f} min, {len(rows)} rows", flush=True)
    if status != "ok" and not rows:
        rows.append(
            common.row(
                script.removesuffix(".py"),
                name,
                "failed",
                "-",
                unit="-",
                ours_value=None,
                ref_value=None,
                notes=f"{status} (see the log above)",
                failed=True,
            )
        )
    return {"name": name, "script": script, "args": argv, "status": status, "seconds": seconds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every script with --quick (tiny models; seconds)")
    parser.add_argument("--gpu", action="store_true", help="the CUDA suite (gpu.sh): bf16/fp16, batch 256")
    parser.add_argument("--only", default=None, help="comma-separated names to run (image,text,zeroshot,...)")
    parser.add_argument("--skip", default="", help="comma-separated names to leave out")
    parser.add_argument("--repeats", type=int, default=None, help="passed to every script")
    parser.add_argument("--n-images", type=int, default=None, help="passed to bench_zeroshot.py")
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help='extra arguments for one script, e.g. --args "zeroshot=--templates default"',
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per script (default: none)")
    parser.add_argument(
        "--output-dir", default=None, help="default build/bench (quick: build/bench/quick, gpu: build/bench/gpu)"
    )
    args = parser.parse_args(argv)
    common.quiet()

    suite = GPU_SUITE if args.gpu else CPU_SUITE
    names = [n for n, _, _ in suite]
    only = set(filter(None, (args.only or "").split(","))) or set(names)
    skip = set(filter(None, args.skip.split(",")))
    unknown = (only | skip) - set(names)
    if unknown:
        parser.error(f"unknown benchmark names {sorted(unknown)}; known: {', '.join(names)}")
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, rest = item.partition("=")
        if name not in names:
            parser.error(f"--args {item!r}: unknown name {name!r}; known: {', '.join(names)}")
        extra.setdefault(name, []).extend(shlex.split(rest))
    default_dir = "build/bench" + ("/gpu" if args.gpu else "/quick" if args.quick else "")
    out_dir = Path(args.output_dir or common.REPO / default_dir)

    device = "cuda" if args.gpu else "cpu"
    import torch

    if args.quick:  # as the scripts do in quick mode
        torch.set_num_threads(1)

    if args.gpu and not torch.cuda.is_available():
        print("run_all --gpu: torch sees no CUDA GPU; nothing run", flush=True)
        return 2
    info = common.machine_info(device)
    roofline = common.measure_roofline(device, args.quick)
    env = dict(os.environ, **{common.ROOFLINE_ENV: json.dumps(asdict(roofline))})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO), env.get("PYTHONPATH")]))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"# cnclip-vision benchmarks ({'quick' if args.quick else 'gpu' if args.gpu else 'full'}), {started}")
    print(f"# machine: {common.machine_line(info)}")
    print(f"# {roofline.line()}", flush=True)

    results = []
    total_start = time.perf_counter()
    for name, script, script_args in suite:
        if name not in only or name in skip:
            continue
        argv_ = list(script_args)
        if args.quick:
            argv_.append("--quick")
        if args.repeats is not None:
            argv_ += ["--repeats", str(args.repeats)]
        if name == "zeroshot" and args.n_images is not None:
            argv_ += ["--n-images", str(args.n_images)]
        argv_ += extra.get(name, [])
        results.append(run_script(name, script, argv_, env, args.timeout))
    total = time.perf_counter() - total_start

    rows = [r for res in results for r in res["rows"]]
    table = common.markdown_table(rows)
    times = ", ".join(f"{res['name']} {res['seconds'] / 60:.1f} min ({res['status']})" for res in results)
    md = "\n".join(
        [
            "# cnclip-vision benchmarks "
            f"({'quick: tiny models, not figures' if args.quick else 'gpu' if args.gpu else 'full'})",
            "",
            f"Run {started}, {total / 60:.1f} min: {times}.",
            "",
            f"Machine: {common.machine_line(info)}.",
            "",
            (
                f"{roofline.line()}. Roofline columns: items/s = GFLOP/s / model GFLOP per item (counted with "
                "torch.utils.flop_counter, attention included); int8 rows use the int8 rate, bf16 references "
                "the bf16 one."
            ),
            "",
            (
                "ours/ref: ours divided by the reference (memory rows: peak over parameter bytes). cos min: the lowest "
                "cosine similarity, over the items, of our embeddings to transformers' fp32 ones (ONNX: to our PyTorch "
                "fp32). Figures, never asserts."
            ),
            "",
            table,
            "",
        ]
    )
    payload = {
        "started": started,
        "mode": "quick" if args.quick else "gpu" if args.gpu else "full",
        "seconds": total,
        "machine": info,
        "roofline": asdict(roofline),
        "scripts": [{k: v for k, v in res.items() if k != "rows"} for res in results],
        "rows": rows,
    }
    atomic_write_text(out_dir / "results.json", json.dumps(payload, ensure_ascii=False, indent=1) + "\n")
    atomic_write_text(out_dir / "results.md", md)
    print("\n" + md, flush=True)
    print(f"written: {out_dir / 'results.json'}, {out_dir / 'results.md'}", flush=True)
    return 0 if all(res["status"] == "ok" for res in results) else 1


if __name__ == "__main__":
    sys.exit(main())
