"""Smoke test of the benchmark suite: ``benchmarks/run_all.py --quick`` (tiny models) runs every script in a
subprocess and every measure row comes back, in the printed table and in results.{json,md}. The figures
of a quick run mean nothing; only that the scripts work is checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = [
    "common.py",
    "bench_image.py",
    "bench_text.py",
    "bench_zeroshot.py",
    "bench_memory.py",
    "bench_onnx.py",
    "bench_scaling.py",
    "run_all.py",
]

# (script, start of the measure, start of "ours") of every row a quick run must produce
EXPECTED = [
    ("bench_image", "image embedding", "ours fp32"),
    ("bench_image", "image embedding", "ours int8"),
    ("bench_text", "text embedding", "ours fp32"),
    ("bench_text", "text embedding", "ours int8"),
    ("bench_zeroshot", "zero-shot end to end", "ours fp32"),
    ("bench_zeroshot", "zero-shot end to end", "ours int8"),
    ("bench_memory", "peak RSS of loading", "ours load"),
    ("bench_scaling", "scaling: image embedding vs batch size", "ours fp32, batch 1"),
    ("bench_scaling", "scaling: image embedding vs batch size", "ours int8, batch 2"),
    ("bench_scaling", "scaling: ViTDet backbone forward vs resolution", "ours fp32, 64x64"),
    ("bench_scaling", "scaling: ViTDet backbone forward vs resolution", "ours fp32, 128x128"),
    ("bench_scaling", "detector images/s", "OpenVocabDetector fp32, vlm_mode='dense'"),
    ("bench_scaling", "detector images/s", "OpenVocabDetector fp32, vlm_mode='off'"),
]


def test_scripts_compile_and_gpu_script_parses():
    for name in SCRIPTS:
        path = BENCH / name
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
    bash = shutil.which("bash")
    if bash:
        subprocess.run([bash, "-n", str(BENCH / "gpu.sh")], check=True)


@pytest.mark.slow
def test_run_all_quick_produces_every_row(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    rows = results["rows"]
    assert [s["status"] for s in results["scripts"]] == ["ok"] * 5
    assert results["machine"]["cores"] and results["roofline"]["fp32"] > 0
    for script, measure, ours in EXPECTED:
        found = [
            r for r in rows if r["script"] == script and r["measure"].startswith(measure) and r["ours"].startswith(ours)
        ]
        assert found, f"no row {script} / {measure} / {ours}"
        assert all(r["ours_value"] and r["ours_value"] > 0 for r in found)
        assert found[0]["measure"] in md and found[0]["measure"] in proc.stdout
    # the reference rows: transformers fp32 and under bf16 autocast (image, text), and the end-to-end one
    for script in ("bench_image", "bench_text"):
        refs = {r["reference"].split(",")[0].split(" (")[0] for r in rows if r["script"] == script}
        assert any("autocast" in r["reference"] for r in rows if r["script"] == script)
        assert any(ref.startswith("transformers fp32") for ref in refs)
    for r in rows:
        if r["script"] in ("bench_image", "bench_text", "bench_zeroshot"):
            assert r["ref_value"] > 0 and r["ratio"] > 0 and r["target"] and 0.99 < r["cosine_min"] <= 1.0001
            assert r["ours_roofline"] > 0 and r["ref_roofline"] > 0
    assert sum(r.get("headline", False) for r in rows if r["script"] == "bench_image") >= 1
    onnx = [r for r in rows if r["script"] == "bench_image" and r["ours"].startswith("onnxruntime")]
    assert len(onnx) == 1 and onnx[0]["cosine_min"] > 0.9999 and not onnx[0].get("headline")  # same process


def test_bench_onnx_alone():
    """bench_onnx.py (ONNX Runtime next to our PyTorch fp32 only) still runs on its own."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_onnx.py"), "--quick"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore"),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "onnxruntime" in proc.stdout and "skipped" not in proc.stdout
