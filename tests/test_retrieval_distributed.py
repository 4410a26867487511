"""Extraction on several processes: ``torchrun --nproc_per_node 2`` (gloo on the CPU) and the same under SLURM's
``srun`` environment, with the shipped ``toy-tiny`` model on generated images; Ray Data actors on a local
``ray.init(num_cpus=2)``.

Bars: two ranks give the ids and embeddings of one process (within 1e-6) with failures counted across ranks
and one summary; a run killed on one rank and resumed re-encodes no finished shard, and a damaged or truncated
shard is detected and redone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import cnclip_vision
from cnclip_vision.retrieval import extract_image_embeddings, load_embeddings, read_manifest
from cnclip_vision.retrieval.dist import _first_host

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# fp32: compared with the fp32 API reference (the CLI default, auto, is bf16 on CPUs with bf16 units)
EMBED = [
    "--model",
    "toy-tiny",
    "--device",
    "cpu",
    "--shard-size",
    "4",
    "--workers",
    "0",
    "--batch-size",
    "4",
    "--precision",
    "fp32",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """36 generated scenes in two folders and two unreadable files."""
    root = tmp_path_factory.mktemp("dist_images")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(36):
        image = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
        x, y = (int(v) for v in rng.integers(4, 40, 2))
        ImageDraw.Draw(image).ellipse([x, y, x + 20, y + 20], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(root / ("sub" if i % 4 == 0 else "") / f"{i:03d}.png")
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    (root / "sub" / "bad.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def model():
    return cnclip_vision.load("toy-tiny", device="cpu")


@pytest.fixture(scope="module")
def reference(model, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "one"
    summary = extract_image_embeddings(model, images, out, shard_size=4, batch_size=4, num_workers=0, progress=False)
    return summary, *load_embeddings(out)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]), **extra)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)


def _same(out: Path, reference) -> None:
    _, ref_ids, ref_emb = reference
    ids, emb = load_embeddings(out)
    assert ids == ref_ids  # the same shards in the same order, whichever rank wrote them
    assert (emb - ref_emb).abs().max() <= 1e-6


def test_two_torchrun_ranks_equal_one_process(images, reference, tmp_path):
    result = _run([*TORCHRUN, "-m", "cnclip_vision.cli", "embed", str(images), "--out", "two", *EMBED], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # one JSON document: only rank 0 prints
    assert summary["world_size"] == 2 and summary["num_shards"] == reference[0]["num_shards"] == 16
    assert (summary["num_inputs"], summary["num_embedded"], summary["num_failed"]) == (38, 36, 2)
    assert {f["id"] for f in summary["failures"]} == {"bad.jpg", "sub/bad.png"}  # counted across both ranks
    assert "rank 0:" in result.stderr and "rank 1:" in result.stderr  # both ranks wrote shards
    _same(tmp_path / "two", reference)
    manifest = read_manifest(tmp_path / "two")
    assert manifest["shards"] == read_manifest(reference[0]["out_dir"])["shards"]  # byte-identical shard contents


# A rank that dies after writing its second shard, as a crashed node would.
CRASH = """
import sys
import cnclip_vision
from cnclip_vision.retrieval import extract_image_embeddings, local_device, store
from cnclip_vision.retrieval.dist import world_from_env

rank = world_from_env()[0]
real, written = store.write_shard, []

def write_then_crash(path, embeddings, meta):
    real(path, embeddings, meta)
    written.append(path)
    if rank == 1 and len(written) == 2:
        raise SystemExit("rank 1 crashed")

store.write_shard = write_then_crash
model = cnclip_vision.load("toy-tiny", device=local_device("cpu"))
extract_image_embeddings(model, sys.argv[1], sys.argv[2], shard_size=4, batch_size=4, num_workers=0, progress=False)
"""


def test_killed_multi_rank_run_resumes_without_redoing_finished_shards(images, reference, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH), encoding="utf-8")
    crashed = _run([*TORCHRUN, str(script), str(images), "emb"], tmp_path)
    assert crashed.returncode != 0 and "rank 1 crashed" in crashed.stderr
    out = tmp_path / "emb"
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))  # unfinished, nothing half-written
    finished = sorted(out.glob("shard-*-of-*.safetensors"))
    assert 2 <= len(finished) < 16
    # damage two finished shards: one byte of the embeddings flipped, one file cut short
    flipped, cut = finished[0], finished[1]
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-100])
    intact = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished[2:]}
    redo_items = 38 - sum(json.loads(_meta(p))["num_items"] for p in finished[2:])

    result = _run([*TORCHRUN, "-m", "cnclip_vision.cli", "embed", str(images), "--out", "emb", *EMBED], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["reused_shards"] == len(intact) and summary["rewritten_shards"] == 16 - len(intact)
    assert summary["num_encoded"] == redo_items and summary["num_copied"] == 0  # damaged files are no source
    assert summary["num_failed"] == 2
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*") if p.name in intact} == intact
    assert "damaged" in result.stderr
    _same(out, reference)


def _meta(path: Path) -> str:
    from cnclip_vision.retrieval.store import read_shard_meta

    return json.dumps(read_shard_meta(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_srun_environment_runs_two_ranks(images, reference, tmp_path):
    """Two tasks started as ``srun --ntasks 2`` starts them: SLURM variables only, no torchrun."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cnclip_vision.cli", "-q", "embed", str(images), "--out", "emb", *EMBED],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                SLURM_PROCID=str(r),
                SLURM_LOCALID=str(r),
                SLURM_STEP_NUM_TASKS="2",
                SLURM_NTASKS="2",
                SLURM_STEP_NODELIST="localhost",
                SLURM_JOB_ID="4242",
                MASTER_PORT=port,
            ),
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert json.loads(outputs[0][0])["world_size"] == 2 and outputs[1][0] == ""  # rank 0 reports
    _same(tmp_path / "emb", reference)


def test_slurm_node_list_first_host(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("scontrol")))
    assert _first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert _first_host("node7") == "node7"
    assert _first_host("a-b[10-12]") == "a-b10"


def test_ray_data_actors_write_the_same_shards(images, reference, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray engine is an optional extra (pip install 'ray[data]')")
    from cnclip_vision.retrieval import extract_image_embeddings_ray

    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        summary = extract_image_embeddings_ray(
            "toy-tiny",
            images,
            tmp_path / "emb",
            model_options={"device": "cpu"},
            shard_size=4,
            batch_size=4,
            num_actors=2,
        )
    finally:
        ray.shutdown()
    assert (summary["engine"], summary["ray_actors"], summary["num_failed"], summary["num_encoded"]) == (
        "ray",
        2,
        2,
        38,
    )
    _same(tmp_path / "emb", reference)
    again = extract_image_embeddings_ray(
        "toy-tiny", images, tmp_path / "emb", model_options={"device": "cpu"}, shard_size=4, batch_size=4, num_actors=2
    )
    assert (again["reused_shards"], again["num_encoded"], again["ray_actors"]) == (16, 0, 0)  # Ray not even started
    assert not ray.is_initialized()
