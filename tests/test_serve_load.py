"""A small, bounded run of the load benchmark (benchmarks/bench_serve.py) against a real server on 127.0.0.1:
4 clients x 25 mixed requests (text and image search, classification, detection), all answered without an
error. The full benchmark (8 x 200 per scenario) is `make bench-serve`; its figures are reported, never
asserted, and neither are this run's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cnclip_vision.serve import BackgroundServer, ServeConfig, Service, create_app
from cnclip_vision.serve.demo import build_demo

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("serve-load"), per_class=1, scenes=4, seed=9)


def test_bounded_mixed_load_without_errors(world):
    bench = _bench_module()
    service = Service.load(ServeConfig(index=str(world.index), model="toy-tiny", detector="toy-detector"))
    with BackgroundServer(create_app(service)) as server:
        result = bench.run_load(
            server.url, bench.toy_payloads(world), scenario="mixed", clients=4, requests=25, max_seconds=300
        )
    summary = result.summary()
    assert summary["errors"] == 0, summary["error_samples"]
    assert summary["done"] == summary["planned"] == 100 and not summary["stopped_by_deadline"]
    assert sum(k["n"] for k in summary["per_kind"].values()) == 100
    assert set(summary["per_kind"]) <= {"search", "image", "classify", "detect"} and "search" in summary["per_kind"]
    for key in ("p50_ms", "p90_ms", "p99_ms", "throughput_rps"):
        assert summary[key] > 0
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert summary["batching"]["search_text"]["requests"] == summary["per_kind"]["search"]["n"]


def test_only_loopback_targets():
    bench = _bench_module()
    for url in ("http://10.0.0.1:8000", "http://example.org", "http://0.0.0.0:8000"):
        with pytest.raises(SystemExit, match="loopback"):
            bench.check_loopback(url)
    bench.check_loopback("http://127.0.0.1:8000")
    bench.check_loopback("http://[::1]:8000")
