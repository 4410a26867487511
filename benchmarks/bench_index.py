"""Retrieval at scale: exact search against the FAISS indexes that ``cnclip index build`` chooses at given
memory budgets, on synthetic clustered unit vectors, and extraction throughput on 1 and 2 processes.

For each index: build time, bytes per vector, recall@1 / recall@10 against exact search on fresh queries
(drawn from the same distribution, never in the collection), queries/s at batch 1 and 64, peak RSS of the
build (a separate process, per phase: training, adding, tuning) against "1.5 x the index's size + one
shard". Exact search: ``EmbeddingIndex`` (torch, chunked) and FAISS's flat index, all embeddings in memory.
Extraction: ``torchrun --nproc_per_node 1|2 -m cnclip_vision.cli embed`` with toy-tiny on the CPU (gloo),
images/s from the run's own timing (model loading excluded). Figures, never asserts.

    python benchmarks/bench_index.py                                 # 1M x 512, budgets 1GB and 4GB, 3,000 images
    python benchmarks/bench_index.py --n 200000 --budgets 256MB 1GB --json build/bench/index.json
    python benchmarks/bench_index.py --quick                         # seconds: a smoke test of the script

Data: ``n / 100`` cluster centres, each a unit vector near one of ``n / 2000`` super-centres; points are a
centre plus Gaussian noise of norm ~1 (cosine to their centre ~0.7), normalised; stored as float32 shards
of 10,000 rows. Cached in ``--work`` between runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

logger = logging.getLogger("bench_index")


# ------------------------------------------------------------------------------------------------ data
def _centres(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    supers = rng.standard_normal((max(1, n // 2000), d))
    supers /= np.linalg.norm(supers, axis=1, keepdims=True)
    centres = supers[rng.integers(0, len(supers), max(1, n // 100))] + rng.standard_normal((max(1, n // 100), d)) * (
        0.8 / np.sqrt(d)
    )
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def clustered(count: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    d = centres.shape[1]
    x = centres[rng.integers(0, len(centres), count)] + rng.standard_normal((count, d)) * (1.0 / np.sqrt(d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_collection(out: Path, n: int, d: int, shard: int, seed: int) -> np.ndarray:
    """The collection in ``out`` (written shard by shard, cached) and 1,000 fresh queries."""
    from cnclip_vision.retrieval import store
    from cnclip_vision.retrieval.extract import make_key

    centres = _centres(n, d, seed)
    queries = clustered(1000, centres, np.random.default_rng(seed + 1))
    params = {"n": n, "d": d, "shard": shard, "seed": seed, "version": 1}
    stamp = out / "bench_params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params and (out / store.MANIFEST).is_file():
        return queries
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed + 2)
    model = {"description": "synthetic clustered unit vectors", "fingerprint": f"synthetic-{seed}"}
    key = make_key("image", model, d, "float32", shard)
    num_shards = store.num_shards_for(n, shard)
    # rows are written in id order, shard s holding the ids whose hash falls in it: generate per id block
    ids = [f"v{i:09d}" for i in range(n)]
    where = store.shard_of(store.item_hashes(ids), num_shards)
    vectors = np.lib.format.open_memmap(out / "vectors.tmp.npy", mode="w+", dtype=np.float32, shape=(n, d))
    for start in range(0, n, 100_000):
        vectors[start : start + 100_000] = clustered(min(100_000, n - start), centres, rng)
    for s in range(num_shards):
        rows = np.flatnonzero(where == s)
        shard_ids = [ids[r] for r in rows]
        meta = {
            **key,
            "layout": store.LAYOUT,
            "shard": s,
            "num_shards": num_shards,
            "digest": store.ids_digest(shard_ids),
            "num_items": len(rows),
            "ids": shard_ids,
            "failures": [],
        }
        store.write_shard(out / store.shard_name(s, num_shards), np.ascontiguousarray(vectors[rows]), meta)
    del vectors
    (out / "vectors.tmp.npy").unlink()
    store.finalize_directory(out, num_shards, source_info={"source": "synthetic", "model": model}, key=key)
    stamp.write_text(json.dumps(params))
    return queries


def _linked_copy(src: Path, dst: Path) -> None:
    """An embeddings directory sharing ``src``'s shards (symlinks), for an index of its own."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name.startswith("shard-"):
            (dst / p.name).symlink_to(p.resolve())
        elif p.name in ("manifest.json", "ids.txt"):
            shutil.copy(p, dst / p.name)


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmHWM``: its peak; unlike ``ru_maxrss`` it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------- build (a child process)
def child_build(directory: str, memory: str, target: float, num_queries: int) -> None:
    """Build in this process, sampling RSS per phase; one JSON line on stdout."""
    from cnclip_vision.retrieval.ann import build_ann_index

    phases: list[tuple[float, str]] = [(time.perf_counter(), "start")]

    class Phase(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            for marker, name in (("training on", "train"), ("adding", "add"), ("tuning on", "tune")):
                if text.startswith(marker):
                    phases.append((time.perf_counter(), name))

    log = logging.getLogger("cnclip_vision.retrieval")
    log.setLevel(logging.INFO)
    log.addHandler(Phase())
    peaks: dict[str, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            name = phases[-1][1]
            peaks[name] = max(peaks.get(name, 0.0), _rss_mb())
            time.sleep(0.02)

    start_rss = _rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    info = build_ann_index(directory, memory=memory, target_recall=target, num_queries=num_queries, progress=False)
    stop.set()
    sampler.join()
    peak = _rss_mb("VmHWM")
    print(json.dumps({"info": info, "rss_start_mb": start_rss, "peak_rss_mb": peak, "phase_peak_rss_mb": peaks}))


def build(directory: Path, memory: str, target: float, num_queries: int) -> dict[str, Any]:
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.argv = ['x']; import bench_index; "
        f"bench_index.child_build({str(directory)!r}, {memory!r}, {target!r}, {num_queries!r})"
    )
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent)),
    )
    if proc.returncode:
        raise RuntimeError(f"index build failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t, 1)
    return result


# ------------------------------------------------------------------------------------------- searching
def _qps(search, queries: np.ndarray, batch: int, limit_s: float, max_queries: int) -> float:
    done, t0 = 0, time.perf_counter()
    while done < min(max_queries, len(queries)) and (time.perf_counter() - t0 < limit_s or done == 0):
        search(queries[done : done + batch])
        done += len(queries[done : done + batch])
    return done / (time.perf_counter() - t0)


def measure_search(index: Any, queries: np.ndarray, truth: np.ndarray, limit_s: float) -> dict[str, Any]:
    import torch

    from cnclip_vision.retrieval.ann import recall_at

    q = torch.from_numpy(queries)
    found = index.search(q, 10)[1].numpy()
    index.search(q[:64], 10)  # warm-up
    return {
        "recall@1": round(float(np.mean(found[:, 0] == truth[:, 0])), 4),
        "recall@10": round(recall_at(found, truth, 10), 4),
        "qps_batch1": round(_qps(lambda b: index.search(torch.from_numpy(b), 10), queries, 1, limit_s, 1000), 1),
        "qps_batch64": round(_qps(lambda b: index.search(torch.from_numpy(b), 10), queries, 64, limit_s, 1000), 1),
    }


# ------------------------------------------------------------------------------------------- extraction
def make_images(root: Path, count: int) -> None:
    from PIL import Image, ImageDraw

    if root.is_dir() and len(list(root.glob("*.png"))) == count:
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
        x, y = (int(v) for v in rng.integers(4, 40, 2))
        ImageDraw.Draw(image).ellipse([x, y, x + 20, y + 20], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(root / f"{i:06d}.png")


def extraction(images: Path, work: Path, procs: int, repeats: int) -> dict[str, Any]:
    best = None
    for _ in range(repeats):
        out = work / f"extract-{procs}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(procs),
            "-m",
            "cnclip_vision.cli",
            "-q",
            "embed",
            str(images),
            "--out",
            str(out),
            "--model",
            "toy-tiny",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--batch-size",
            "64",
            "--shard-size",
            "500",
            "--no-resume",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if proc.returncode:
            raise RuntimeError(f"extraction with {procs} processes failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout)
        rate = summary["num_encoded"] / summary["elapsed_s"]
        best = max(best or 0.0, rate)
    return {"processes": procs, "images": summary["num_encoded"], "images_per_s": round(best, 1), "repeats": repeats}


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="collection size (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=512, help="dimension (default: %(default)s)")
    parser.add_argument("--budgets", nargs="+", default=["1GB", "4GB"], help="memory budgets (default: 1GB 4GB)")
    parser.add_argument("--recall", type=float, default=0.95, help="target recall@10 (default: %(default)s)")
    parser.add_argument("--images", type=int, default=3000, help="images for the extraction runs (0: skip)")
    parser.add_argument("--work", default=str(REPO / "build" / "bench" / "index"), help="cache and scratch folder")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="20,000 x 64, budgets 6MB (IVF-Flat) / 64MB (HNSW), 128 images: a smoke test",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.budgets, args.images = 20_000, 64, ["6MB", "64MB"], 128
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    work = Path(args.work) / ("quick" if args.quick else f"{args.n}x{args.dim}")
    import faiss
    import torch

    from cnclip_vision.retrieval import EmbeddingIndex, exact_topk, read_manifest

    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "threads": torch.get_num_threads(),
        },
        "data": {"n": args.n, "dim": args.dim, "shard_rows": 10_000, "dtype": "float32"},
    }
    with open("/proc/cpuinfo") as f:
        results["machine"]["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        results["machine"]["amx"] = "amx_tile" in Path("/proc/cpuinfo").read_text()
    t = time.perf_counter()
    emb = work / "emb"
    queries = make_collection(emb, args.n, args.dim, 10_000, seed=0)
    results["data"]["generate_s"] = round(time.perf_counter() - t, 1)
    _, truth = exact_topk(emb, queries, 10)
    shard_bytes = 10_000 * args.dim * 4
    limit = 2.0 if args.quick else 20.0

    exact = EmbeddingIndex.from_dir(emb, ann=False)
    rows = {"exact (EmbeddingIndex, torch)": measure_search(exact, queries, truth, limit)}
    del exact
    flat = EmbeddingIndex.from_dir(emb, ann=False, use_faiss=True)
    rows["exact (faiss IndexFlatIP)"] = measure_search(flat, queries, truth, limit)
    del flat
    for row in rows.values():
        row.update(index="exact", bytes_per_vector=args.dim * 4)
    for budget in args.budgets:
        directory = work / f"index-{budget}"
        _linked_copy(emb, directory)
        built = build(directory, budget, args.recall, 200 if args.quick else 1000)
        info = built["info"]
        index = EmbeddingIndex.from_dir(directory)
        row = measure_search(index, queries, truth, limit)
        bound = 1.5 * info["index_bytes"] / 2**20 + shard_bytes / 2**20
        row.update(
            index=info["index_key"],
            params=info["params"],
            bytes_per_vector=info["bytes_per_vector"],
            index_mb=round(info["index_bytes"] / 2**20, 1),
            build_s=info["build_seconds"],
            train_size=info["train_size"],
            tuned_recall10=info["tuned"]["recall@10"],
            heldout_recall10=info["measured"]["recall@10"],
            peak_rss_mb=round(built["peak_rss_mb"], 1),
            rss_start_mb=round(built["rss_start_mb"], 1),
            phase_peak_rss_mb={k: round(v, 1) for k, v in built["phase_peak_rss_mb"].items()},
            rss_bound_mb=round(bound, 1),
            rss_bound_met=built["peak_rss_mb"] <= bound,
            add_phase_bound_met=built["phase_peak_rss_mb"].get("add", 0) <= bound,
            mmapped=index._ann.mmapped,
        )
        rows[f"budget {budget}"] = row
        del index
    base = rows["exact (EmbeddingIndex, torch)"]
    for row in rows.values():
        row["speedup_batch1"] = round(row["qps_batch1"] / base["qps_batch1"], 1)
        row["speedup_batch64"] = round(row["qps_batch64"] / base["qps_batch64"], 1)
    results["search"] = rows
    results["manifest_shards"] = len(read_manifest(emb)["shards"])

    if args.images:
        images = work / "images"
        make_images(images, args.images)
        ext = [extraction(images, work, p, 1 if args.quick else 2) for p in (1, 2)]
        ext[1]["speedup"] = round(ext[1]["images_per_s"] / ext[0]["images_per_s"], 2)
        results["extraction"] = ext

    lines = [
        "| search | index | params | bytes/vec | recall@1 | recall@10 | q/s b1 | q/s b64 | x exact b1 | x exact b64 "
        "| build s | peak RSS MB (bound) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        rss = f"{r['peak_rss_mb']} ({r['rss_bound_mb']})" if "peak_rss_mb" in r else "-"
        lines.append(
            f"| {name} | {r['index']} | {r.get('params') or '-'} | {r['bytes_per_vector']} | {r['recall@1']} | "
            f"{r['recall@10']} | {r['qps_batch1']} | {r['qps_batch64']} | {r['speedup_batch1']} | "
            f"{r['speedup_batch64']} | {r.get('build_s', '-')} | {rss} |"
        )
    for e in results.get("extraction", []):
        lines.append(
            f"extraction, {e['processes']} process(es): {e['images_per_s']} img/s"
            + (f" ({e['speedup']}x)" if "speedup" in e else "")
        )
    results["table"] = "\n".join(lines)
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    logger.info("\n%s", results["table"])
    if args.json:
        from cnclip_vision.io import write_json

        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
