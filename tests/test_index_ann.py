"""FAISS indexes: the choice by size and memory (autofaiss's rules), builds that stream the shards, recall tuned
on some queries and met on queries the tuning never saw, search through ``EmbeddingIndex.from_dir``, stale and
missing indexes, memory mapping."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cnclip_vision.errors import CNClipError
from cnclip_vision.retrieval import (
    EmbeddingIndex,
    ann,
    build_ann_index,
    choose_index_key,
    exact_topk,
    parse_memory,
    save_embeddings,
    store,
)

faiss = pytest.importorskip("faiss", reason="FAISS indexes need faiss-cpu (in the dev extra)")


def clustered(n: int, d: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Unit vectors around random unit centres (cosine to the centre about 0.64)."""
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, d)) * (1.2 / np.sqrt(d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    d = 48
    centres = rng.standard_normal((2_000, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return rng, d, centres


@pytest.fixture(scope="module")
def collection(world, tmp_path_factory):
    rng, d, centres = world
    x = clustered(20_000, d, rng, centres)
    out = tmp_path_factory.mktemp("ann") / "emb"
    save_embeddings(out, [f"v{i}" for i in range(len(x))], x, shard_size=2_000)
    ids, rows = store.load_embeddings(out)  # the directory's row order (shard by shard)
    return out, rows.numpy(), ids


def _fresh_recall(directory, x, queries, k=10):
    """recall@k of the directory's index against exact search on queries (never seen by the build)."""
    approx = EmbeddingIndex.from_dir(directory)
    assert approx.backend.startswith("faiss:") and approx.embeddings is None
    exact = EmbeddingIndex(torch.from_numpy(x))
    found, truth = approx.search(queries, k)[1].numpy(), exact.search(queries, k)[1].numpy()
    assert list(approx.ids) == store.load_embeddings(directory)[0]  # lazy ids, in the directory's row order
    return ann.recall_at(found, truth, k), approx


@pytest.mark.parametrize(
    "n, d, memory, key",
    [
        (500, 512, "4GB", "Flat"),
        (5_000, 512, "1GB", "HNSW15"),
        (1_000_000, 512, "4GB", "HNSW32"),
        (500_000, 512, "1GB", "HNSW12"),  # 4 * (512 + 2 * 12) bytes per vector fit, 4 * (512 + 2 * 13) do not
        (800_000, 512, 1_660_000_000, "IVF4096_HNSW32,Flat"),  # no HNSW with M >= 8, IVF-Flat still fits
        (1_000_000, 512, "1GB", "OPQ256_768,IVF4096_HNSW32,PQ256x8"),
        (50_000_000, 768, "16GB", "OPQ256_1024,IVF65536_HNSW32,PQ256x8"),
        (50_000_000, 768, "2GB", "OPQ32_224,IVF65536_HNSW32,PQ32x8"),  # 40 bytes per vector: 2.0e9 + quantizer
        (20_000, 64, "1MB", "OPQ24_72,IVF512,PQ24x8"),  # 4 sqrt(n) = 566 -> 512 lists, no HNSW quantizer below 1000
    ],
)
def test_choice_follows_autofaiss(n, d, memory, key):
    assert choose_index_key(n, d, memory) == key
    assert ann.estimate_index_bytes(key, n, d) <= parse_memory(memory) or n < 10_000


def test_choice_errors_and_memory_sizes():
    with pytest.raises(CNClipError, match="raise --memory"):
        choose_index_key(10_000_000, 512, "10MB")
    assert [parse_memory(v) for v in ("4GB", "512MB", "1.5G", "2GiB", "100", 10)] == [
        4 << 30,
        512 << 20,
        3 << 29,
        2 << 30,
        100,
        10,
    ]
    with pytest.raises(ValueError, match="4GB"):
        parse_memory("lots")


def test_exact_reference_skips_held_out_rows(collection):
    out, x, _ = collection
    held = np.array([5, 17, 19_999])
    q = x[held]
    scores, rows = exact_topk(out, q, 4, skip=held, block=1_000)
    brute = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :6]
    assert rows.tolist() == [[j for j in b if j not in held][:4] for b in brute.tolist()]
    assert np.allclose(scores[:, 0], np.sort(q @ x.T, axis=1)[:, -2], atol=1e-6)
    tail = np.array([2, 5])  # FAISS ids of an index whose rows 2 and 5 were added last
    assert ann.faiss_ids_to_rows(np.array([[0, 1, 2, 3, 4, 5, 6, -1]]), tail, 7).tolist() == [[0, 1, 3, 4, 6, 2, 5, -1]]


@pytest.mark.parametrize("key", ["HNSW32", "IVF256,Flat"])
def test_recall_target_met_on_queries_it_was_not_tuned_on(collection, world, key, monkeypatch):
    out, x, ids = collection
    monkeypatch.setattr(store, "load_embeddings", lambda *a, **k: pytest.fail("the build loaded every embedding"))
    info = build_ann_index(out, index_key=key, target_recall=0.95, num_queries=300, progress=False)
    monkeypatch.undo()
    assert info["index_key"] == key and info["params"]
    assert info["tuned"]["recall@10"] >= 0.96 and info["measured"]["recall@10"] >= 0.95  # tuned with a margin
    assert info["measured"]["num_queries"] == 300 and info["tuned"]["num_queries"] == 300
    assert len(list(out.glob("ann-*.faiss"))) == 1 and info["bytes_per_vector"] > 4 * 48
    rng, d, centres = world
    fresh = clustered(500, d, np.random.default_rng(99), centres)  # new points, not in the collection
    recall, index = _fresh_recall(out, x, fresh)
    assert recall >= 0.95, (key, info["params"], recall)
    assert index.ann_info["params"] == info["params"]
    # the tuned parameter matters: the smallest setting is worse than the tuned one
    low = EmbeddingIndex.from_dir(out, ann_params="efSearch=8" if key.startswith("HNSW") else "nprobe=1")
    exact = EmbeddingIndex(torch.from_numpy(x)).search(fresh, 10)[1].numpy()
    assert ann.recall_at(low.search(fresh, 10)[1].numpy(), exact, 10) < recall


def test_compressed_index_reports_an_unreachable_target(collection, caplog):
    out, x, ids = collection
    with caplog.at_level(logging.WARNING, logger="cnclip_vision.retrieval"):
        info = build_ann_index(
            out, memory="1MB", index_key="IVF64,PQ8x8", target_recall=0.99, num_queries=200, progress=False
        )
    assert "out of reach" in caplog.text and info["measured"]["recall@10"] < 0.99
    assert info["bytes_per_vector"] < 20 and info["tuned"]["curve"]  # 8 code bytes + 8 id bytes per vector
    index = EmbeddingIndex.from_dir(out)
    assert index.backend == "faiss:IVF64,PQ8x8" and ann.load_ann_index(out).mmapped  # IVF lists memory-mapped
    hits = index.search_hits(torch.from_numpy(x[:3]), 5)
    assert sum(h[0].id == ids[i] for i, h in enumerate(hits)) >= 2  # PQ codes: the query's own row mostly first


def test_stale_missing_and_queries_from_another_directory(collection, world, tmp_path, caplog):
    rng, d, centres = world
    x = clustered(3_000, d, np.random.default_rng(5), centres)
    out = tmp_path / "emb"
    save_embeddings(out, [f"v{i}" for i in range(len(x))], x, shard_size=1_000)
    with pytest.raises(CNClipError, match="has no FAISS index"):
        EmbeddingIndex.from_dir(out, ann=True)
    assert EmbeddingIndex.from_dir(out).backend == "exact"
    texts = clustered(400, d, np.random.default_rng(6), centres)
    save_embeddings(tmp_path / "queries", [f"t{i}" for i in range(400)], texts, modality="text")
    info = build_ann_index(out, queries=tmp_path / "queries", num_queries=150, progress=False)
    assert info["index_key"] == "HNSW15" and info["queries"].startswith("embeddings of")
    assert info["measured"]["recall@10"] >= 0.95 and info["measured"]["num_queries"] == 150
    assert EmbeddingIndex.from_dir(out).backend == "faiss:HNSW15"
    save_embeddings(out, [f"v{i}" for i in range(len(x) - 1)], x[:-1], shard_size=1_000)  # extracted again
    with caplog.at_level(logging.WARNING, logger="cnclip_vision.retrieval"):
        assert EmbeddingIndex.from_dir(out).backend == "exact"
    assert "built on other embeddings" in caplog.text
    with pytest.raises(CNClipError, match="built on other embeddings"):
        EmbeddingIndex.from_dir(out, ann=True)
    with pytest.raises(ValueError, match="target_recall"):
        build_ann_index(out, target_recall=1.5)
    with pytest.raises(ValueError, match="cannot build index"):
        build_ann_index(out, index_key="NotAnIndex")
