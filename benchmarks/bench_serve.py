"""Load test of ``cnclip serve`` on loopback: C concurrent clients x R requests each, bounded in count and
time, against the toy world (toy-tiny, toy-detector, a toy index). Reports p50 / p90 / p99 latency,
throughput, errors (0 expected) and the batch sizes the server formed, per scenario:

- ``baseline``: one client, text search only (no concurrency, so no batching)
- ``search``: C clients, text search only
- ``mixed``: C clients; 60% text search, 20% image search, 10% classification, 10% detection

The server runs in its own process (``python -m cnclip_vision.cli serve --port 0``), so the clients do not
share its interpreter. Only loopback addresses are ever contacted; every client stops after R requests or
at the deadline, whichever comes first. Figures, never asserts.

    python benchmarks/bench_serve.py                       # 8 clients x 200 requests per scenario
    python benchmarks/bench_serve.py --clients 4 --requests 50 --scenarios search --json out.json
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --api-key ...   # a server already running
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIXES = {
    "baseline": {"search": 1.0},
    "search": {"search": 1.0},
    "mixed": {"search": 0.6, "image": 0.2, "classify": 0.1, "detect": 0.1},
}
QUERIES = [
    "红色圆形",
    "一个蓝色的三角形",
    "绿色正方形",
    "图中是一个黄色的五角星",
    "紫色的心形",
    "橙色菱形",
    "青色半圆形",
    "粉色十字形",
    "左上角有一个红色的圆形",
    "两个蓝色的三角形",
]


@dataclass
class Payloads:
    """What the clients send: texts, image uploads, label lists."""

    texts: list[str]
    images: list[bytes]
    scenes: list[bytes]
    labels: list[str]


@dataclass
class Result:
    scenario: str
    clients: int
    requests_per_client: int
    planned: int
    done: int = 0
    errors: int = 0
    wall_s: float = 0.0
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    batching: dict[str, Any] = field(default_factory=dict)
    stopped_by_deadline: bool = False

    def summary(self) -> dict[str, Any]:
        every = [x for xs in self.latencies_ms.values() for x in xs]
        out = {
            "scenario": self.scenario,
            "clients": self.clients,
            "requests_per_client": self.requests_per_client,
            "planned": self.planned,
            "done": self.done,
            "errors": self.errors,
            "wall_s": round(self.wall_s, 3),
            "throughput_rps": round(self.done / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "stopped_by_deadline": self.stopped_by_deadline,
            **_percentiles(every),
            "per_kind": {k: {"n": len(v), **_percentiles(v)} for k, v in sorted(self.latencies_ms.items())},
            "batching": self.batching,
            "error_samples": self.error_samples[:5],
        }
        return out


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0, "max_ms": 0.0}
    ordered = sorted(values)

    def pct(p: float) -> float:  # nearest-rank percentile
        return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))]

    return {
        "p50_ms": round(pct(50), 2),
        "p90_ms": round(pct(90), 2),
        "p99_ms": round(pct(99), 2),
        "mean_ms": round(statistics.fmean(ordered), 2),
        "max_ms": round(ordered[-1], 2),
    }


def check_loopback(url: str) -> None:
    """Refuse any target but this machine's loopback."""
    from cnclip_vision.serve.server import is_loopback

    host = urlparse(url).hostname or ""
    if not is_loopback(host):
        raise SystemExit(f"bench_serve only sends traffic to loopback addresses; {url} is not one")


def toy_payloads(world: Any) -> Payloads:
    """Queries, uploads and label lists drawn from the demo collection."""
    images = [p.read_bytes() for p in sorted((world.images / "test").glob("*/*.png"))[:16]]
    scenes = [world.scene_path(im).read_bytes() for im in world.scenes["images"][:8]]
    return Payloads(texts=QUERIES + list(world.labels), images=images, scenes=scenes, labels=list(world.labels))


def _request(client: Any, kind: str, rng: random.Random, payloads: Payloads) -> Any:
    if kind == "search":
        return client.post("/api/search", json={"text": rng.choice(payloads.texts), "k": 10})
    if kind == "image":
        return client.post(
            "/api/search/image", files={"image": ("q.png", rng.choice(payloads.images), "image/png")}, data={"k": "10"}
        )
    if kind == "classify":  # a few fixed label sets, as an application with its own taxonomy would send
        labels = payloads.labels[rng.randrange(4) :: 8]
        return client.post(
            "/api/classify",
            files={"image": ("q.png", rng.choice(payloads.images), "image/png")},
            data={"labels": "，".join(labels)},
        )
    if kind == "detect":  # a few fixed vocabularies, so that equal ones can share a detector call
        labels = payloads.labels[:: 16 + rng.randrange(2)]
        return client.post(
            "/api/detect",
            files={"image": ("s.png", rng.choice(payloads.scenes), "image/png")},
            data={"labels": "，".join(labels), "threshold": "0.3"},
        )
    raise ValueError(f"unknown request kind {kind!r}")


def _batching(url: str, headers: dict[str, str]) -> dict[str, Any]:
    import httpx

    return httpx.get(url + "/api/health", headers=headers, timeout=30).json().get("batching", {})


def run_load(
    url: str,
    payloads: Payloads,
    *,
    scenario: str = "search",
    clients: int = 8,
    requests: int = 200,
    mix: dict[str, float] | None = None,
    max_seconds: float = 300.0,
    api_key: str | None = None,
    timeout: float = 60.0,
    seed: int = 0,
) -> Result:
    """``clients`` threads, each with its own keep-alive connection, send ``requests`` requests (kinds drawn
    from ``mix``) one after another, stopping early at ``max_seconds``. Non-2xx answers and transport errors
    count as errors."""
    import httpx

    check_loopback(url)
    mix = mix or MIXES.get(scenario, MIXES["search"])
    kinds, weights = zip(*mix.items())
    headers = {"X-API-Key": api_key} if api_key else {}
    result = Result(scenario, clients, requests, clients * requests)
    lock = threading.Lock()
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:  # warm-up, not measured
        warm = random.Random(seed)
        for kind in kinds:
            for _ in range(3):
                _request(client, kind, warm, payloads)
    before = _batching(url, headers)
    start_line = threading.Barrier(clients)
    deadline = [0.0]

    def client_loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            start_line.wait(60)
            for _ in range(requests):
                if time.monotonic() > deadline[0]:
                    with lock:
                        result.stopped_by_deadline = True
                    return
                kind = rng.choices(kinds, weights)[0]
                t0 = time.perf_counter()
                try:
                    response = _request(client, kind, rng, payloads)
                    ok, error = response.status_code < 400, f"{kind}: HTTP {response.status_code} {response.text[:200]}"
                except httpx.HTTPError as e:
                    ok, error = False, f"{kind}: {type(e).__name__}: {e}"
                elapsed = (time.perf_counter() - t0) * 1000
                with lock:
                    result.done += 1
                    result.latencies_ms.setdefault(kind, []).append(elapsed)
                    if not ok:
                        result.errors += 1
                        result.error_samples.append(error)

    threads = [threading.Thread(target=client_loop, args=(i,), name=f"client-{i}") for i in range(clients)]
    t0 = time.perf_counter()
    deadline[0] = time.monotonic() + max_seconds
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + timeout + 60)
    result.wall_s = time.perf_counter() - t0
    after = _batching(url, headers)
    for name, stats in after.items():
        n = stats.get("requests", 0) - before.get(name, {}).get("requests", 0)
        b = stats.get("batches", 0) - before.get(name, {}).get("batches", 0)
        if n:
            result.batching[name] = {"requests": n, "batches": b, "mean_batch": round(n / b, 2) if b else 0.0}
    return result


class ServerProcess:
    """``cnclip serve`` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(
        self, index: Path, *, model: str = "toy-tiny", detector: str | None = "toy-detector", extra: Sequence[str] = ()
    ) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "cnclip_vision.cli",
            "serve",
            "--index",
            str(index),
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-access-log",
            *(["--detector", detector] if detector else []),
            *extra,
        ]
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("CNCLIP_API_KEY", None)
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stderr], daemon=True).start()  # type: ignore[union-attr]
        log, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            log.append(line)
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                self.url = match.group(1)
                return self
        self.__exit__()
        raise RuntimeError("the server did not start:\n" + "".join(log))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _table(results: Sequence[Result]) -> str:
    head = (
        "| scenario | clients x requests | done | errors | req/s | p50 ms | p90 ms | p99 ms | max ms | mean batch |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in results:
        s = r.summary()
        batch = ", ".join(f"{k} {v['mean_batch']}" for k, v in s["batching"].items()) or "-"
        rows.append(
            f"| {r.scenario} | {r.clients} x {r.requests_per_client} | {s['done']} | {s['errors']} | "
            f"{s['throughput_rps']} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} | {s['max_ms']} | {batch} |"
        )
        if len(s["per_kind"]) > 1:
            for kind, p in s["per_kind"].items():
                rows.append(
                    f"| &nbsp;&nbsp;{kind} | | {p['n']} | | | {p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} | "
                    f"{p['max_ms']} | |"
                )
    return "\n".join([head, *rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200, help="requests per client (default: %(default)s)")
    parser.add_argument("--scenarios", default="baseline,search,mixed", help="comma-separated (default: %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="deadline per scenario (default: %(default)s)")
    parser.add_argument("--url", default=None, help="a loopback server already running (default: start one)")
    parser.add_argument("--api-key", default=None, help="X-API-Key for --url")
    parser.add_argument("--world", default=None, help="folder for the toy collection (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in MIXES]
    if unknown or args.clients < 1 or args.requests < 1:
        parser.error(f"unknown scenarios {unknown}" if unknown else "--clients and --requests must be >= 1")

    from cnclip_vision.serve.demo import build_demo

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        world = build_demo(Path(args.world or tmp), per_class=2, scenes=16, seed=0)
        payloads = toy_payloads(world)
        server = ServerProcess(world.index) if args.url is None else None
        url = args.url
        if server is not None:
            server.__enter__()
            url = server.url
        check_loopback(url)
        try:
            results: list[Result] = []
            for scenario in scenarios:
                clients = 1 if scenario == "baseline" else args.clients
                print(
                    f"# {scenario}: {clients} client(s) x {args.requests} requests on {url}",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(
                    run_load(
                        url,
                        payloads,
                        scenario=scenario,
                        clients=clients,
                        requests=args.requests,
                        max_seconds=args.max_seconds,
                        api_key=args.api_key,
                    )
                )
        finally:
            if server is not None:
                server.__exit__()
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}"
    )
    print(f"cnclip serve load test on loopback, toy-tiny + toy-detector ({machine})\n")
    print(_table(results))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine, "results": [r.summary() for r in results]}, ensure_ascii=False, indent=2),
            encoding="utf-8",
        )
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
