"""Retrieval: embedding shards (round trip, resume, bad files), chunked exact search, recall metrics."""

from __future__ import annotations

import io
import json
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cnclip_vision
from cnclip_vision import retrieval
from cnclip_vision.data.jsonl import read_text_jsonl
from cnclip_vision.errors import CNClipError
from cnclip_vision.models.encode import encode_images, encode_texts
from cnclip_vision.retrieval import (
    EmbeddingIndex,
    evaluate_retrieval,
    extract_image_embeddings,
    extract_text_embeddings,
    load_embeddings,
    read_manifest,
    recall_at_k,
    store,
)
from tests.conftest import small_config

TEXTS = ["一只猫", "两只狗在草地上奔跑", "红色的汽车", "海边的日落", "一碗热腾腾的面条", "雪山", "城市夜景"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cnclip_vision.create_model(small_config("ViT-B-16")).eval()


def _png(seed: int, size=(24, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8) // (seed % 3 + 1)  # varied content
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """11 good images in nested folders and 3 bad ones (corrupt, truncated, not an image)."""
    root = tmp_path_factory.mktemp("images")
    for i in range(11):
        folder = root / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(_png(i))
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage " * 10)
    (root / "truncated.png").write_bytes(_png(99)[:300])
    (root / "a" / "notes.png").write_bytes("这不是图片".encode())
    (root / "readme.txt").write_text("ignored: not an image extension")
    return root


GOOD = sorted(
    [
        "a/00.png",
        "a/03.png",
        "a/06.png",
        "a/09.png",
        "b/c/01.png",
        "b/c/04.png",
        "b/c/07.png",
        "b/c/10.png",
        "02.png",
        "05.png",
        "08.png",
    ]
)
BAD = {"b/corrupt.jpg", "truncated.png", "a/notes.png"}


def _extract(model, src, out, **kw):
    return extract_image_embeddings(model, src, out, batch_size=4, num_workers=0, progress=False, **kw)


# ------------------------------------------------------------------------------------- shards on disk
def test_image_shards_round_trip_and_bad_files(model, image_dir, tmp_path):
    summary = _extract(model, image_dir, tmp_path / "emb", shard_size=5)
    assert (summary["num_inputs"], summary["num_embedded"], summary["num_failed"]) == (14, 11, 3)
    assert summary["num_shards"] == 4 and summary["reused_shards"] == 0  # 14 inputs / 5 -> the next power of two
    assert {f["id"] for f in summary["failures"]} == BAD
    for failure in summary["failures"]:
        assert failure["path"].endswith(failure["id"]) and failure["reason"]
    assert "truncated" in next(f["reason"] for f in summary["failures"] if f["id"] == "truncated.png")

    ids, emb = load_embeddings(tmp_path / "emb")
    assert sorted(ids) == GOOD and len(ids) == len(set(ids))
    assert emb.dtype == torch.float32 and emb.shape == (11, model.config.embed_dim)
    expected = encode_images(model, [image_dir / i for i in ids])
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "emb" / "ids.txt").read_text(encoding="utf-8").splitlines() == ids
    manifest = read_manifest(tmp_path / "emb")
    assert manifest["version"] == 2 and manifest["layout"] == {"scheme": "blake2b64-prefix", "num_shards": 4}
    assert sum(s["num_items"] for s in manifest["shards"]) == 14 and sum(s["count"] for s in manifest["shards"]) == 11
    row = 0
    for shard in manifest["shards"]:  # each shard holds exactly the ids whose hash falls in it, in input order
        held = ids[row : row + shard["count"]]
        assert all(retrieval.shard_of(retrieval.item_hash(i), 4) == shard["shard"] for i in held)
        assert held == sorted(held)
        row += shard["count"]
    assert manifest["model"]["config"] == model.config.to_dict() and manifest["dim"] == model.config.embed_dim

    # float16 storage; a list file gives the ids as written in it
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{image_dir / 'a/03.png'}\n\nb/c/04.png\n", encoding="utf-8")
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "04.png").write_bytes((image_dir / "b/c/04.png").read_bytes())
    _extract(model, listing, tmp_path / "half", dtype="float16")
    half_ids, half = load_embeddings(tmp_path / "half")
    assert half_ids == [str(image_dir / "a/03.png"), "b/c/04.png"] and half.dtype == torch.float16
    torch.testing.assert_close(half.float(), emb[[ids.index("a/03.png"), ids.index("b/c/04.png")]], atol=2e-3, rtol=0)


def test_interrupted_extraction_resumes_without_redoing_or_losing(model, image_dir, tmp_path, monkeypatch):
    _extract(model, image_dir, tmp_path / "ref", shard_size=3)
    reference_ids, reference = load_embeddings(tmp_path / "ref")

    encoded: list[int] = []
    original_encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x, **kw: (encoded.append(len(x)), original_encode(x, **kw))[1])
    real_write, written = store.write_shard, []

    def write_then_die(path, embeddings, meta):
        real_write(path, embeddings, meta)
        written.append(meta)
        if len(written) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C right after the second shard

    monkeypatch.setattr(store, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _extract(model, image_dir, tmp_path / "emb", shard_size=3)
    with pytest.raises(CNClipError, match="did not finish"):
        load_embeddings(tmp_path / "emb")
    done_ids = {i for m in written for i in m["ids"]}
    assert len(written) == 2 and not list((tmp_path / "emb").glob(".*.tmp"))

    monkeypatch.setattr(store, "write_shard", real_write)
    encoded.clear()
    summary = _extract(model, image_dir, tmp_path / "emb", shard_size=3)
    assert summary["reused_shards"] == 2 and summary["num_failed"] == 3
    assert sum(encoded) == 11 - len(done_ids)  # the finished shards' images were not encoded again
    assert summary["num_encoded"] == 14 - sum(m["num_items"] for m in written)
    ids, emb = load_embeddings(tmp_path / "emb")
    assert ids == reference_ids and len(set(ids)) == len(ids) == 11
    torch.testing.assert_close(emb, reference, atol=1e-5, rtol=1e-5)

    encoded.clear()  # a finished directory: nothing to do
    assert _extract(model, image_dir, tmp_path / "emb", shard_size=3)["reused_shards"] == 8 and sum(encoded) == 0
    encoded.clear()  # another shard size: a new layout, whose shards copy the embeddings instead of encoding them
    summary = _extract(model, image_dir, tmp_path / "emb", shard_size=4)
    assert (summary["reused_shards"], summary["num_shards"], summary["num_copied"], sum(encoded)) == (0, 4, 11, 0)
    assert sorted(p.name for p in (tmp_path / "emb").glob("shard-*")) == [
        f"shard-0000{i}-of-00004.safetensors" for i in range(4)
    ]
    ids, emb = load_embeddings(tmp_path / "emb")
    order = [reference_ids.index(i) for i in ids]
    assert sorted(ids) == sorted(reference_ids) and torch.equal(emb, reference[order])
    encoded.clear()
    assert _extract(model, image_dir, tmp_path / "emb", shard_size=4, resume=False)["reused_shards"] == 0
    assert sum(encoded) == 11


def test_text_embeddings_round_trip_and_model_change(model, tmp_path):
    path = tmp_path / "texts.jsonl"
    lines = [
        json.dumps({"text_id": 100 + i, "text": t, "image_ids": [i]}, ensure_ascii=False) for i, t in enumerate(TEXTS)
    ]
    path.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n", encoding="utf-8")
    summary = extract_text_embeddings(model, path, tmp_path / "emb", shard_size=3, progress=False)
    assert (summary["modality"], summary["num_embedded"], summary["num_shards"]) == ("text", 7, 4)
    ids, emb = load_embeddings(tmp_path / "emb")
    assert sorted(ids) == [str(100 + i) for i in range(7)]
    expected = encode_texts(model, TEXTS)[[int(i) - 100 for i in ids]]
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)

    assert extract_text_embeddings(model, path, tmp_path / "emb", shard_size=3, progress=False)["reused_shards"] == 4
    torch.manual_seed(1)
    other = cnclip_vision.create_model(small_config("ViT-B-16")).eval()
    summary = extract_text_embeddings(other, path, tmp_path / "emb", shard_size=3, progress=False)
    assert (summary["reused_shards"], summary["num_copied"], summary["num_encoded"]) == (0, 0, 7)  # nothing mixed


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text_id": 1, "text": "猫"}\n\n{"text_id": 2, "text": "狗"\n', r"texts\.jsonl:3: not valid JSON"),
        ('{"text_id": 1, "text": "猫"}\n[1, 2]\n', r":2: expected a JSON object"),
        ('{"text_id": 1}\n', r":1: missing key text"),
        (
            '{"text_id": 1, "text": "猫"}\n{"text_id": 1, "text": "狗"}\n',
            r":2: duplicate text_id 1 \(first on line 1\)",
        ),
        ('{"text_id": 1.5, "text": "猫"}\n', r":1: text_id must be an integer or a string"),
        ('{"text_id": 1, "text": "  "}\n', r":1: text must be a non-empty string"),
        ('{"text_id": 1, "text": "猫", "image_ids": 3}\n', r":1: image_ids must be a list"),
        ("\n\n", r"holds no texts"),
    ],
)
def test_text_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "texts.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CNClipError, match=message):
        read_text_jsonl(path)


def test_text_jsonl_parsing(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text_id": 7, "text": "\xe7\x8c\xab", "image_ids": [1, "x.jpg"]}\n\n'
        b'{"text_id": "a", "text": "b"}\n'
    )
    records = read_text_jsonl(path)
    assert [(r.text_id, r.text, r.image_ids, r.line) for r in records] == [
        ("7", "猫", ("1", "x.jpg"), 1),
        ("a", "b", (), 3),
    ]
    with pytest.raises(CNClipError, match=":3: missing key image_ids"):
        read_text_jsonl(path, require_image_ids=True)
    path.write_bytes(b'{"text_id": 1, "text": "a"}\n{"text_id": 2, "text": "\xff"}\n')
    with pytest.raises(CNClipError, match=":2: not UTF-8"):
        read_text_jsonl(path)
    with pytest.raises(CNClipError, match="no such text file"):
        read_text_jsonl(tmp_path / "missing.jsonl")


def test_extraction_input_errors(model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CNClipError, match="no images found"):
        _extract(model, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(CNClipError, match="no such image"):
        _extract(model, tmp_path / "missing", tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(CNClipError, match="none of the 1 images"):
        _extract(model, tmp_path / "bad", tmp_path / "out")
    with pytest.raises(ValueError, match="shard_size"):
        _extract(model, tmp_path / "bad", tmp_path / "out", shard_size=0)
    with pytest.raises(CNClipError, match="not an embeddings directory"):
        load_embeddings(tmp_path / "empty")


# --------------------------------------------------------------------------------------------- search
def _brute_force(db: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.nn.functional.normalize(queries, dim=1) @ db.T
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]  # ties: lower index first
    return scores.gather(1, order), order


@pytest.mark.parametrize("query_chunk, db_chunk", [(3, 1), (7, 10), (16, 33), (1000, 1000)])
@pytest.mark.parametrize("k", [1, 5, 200])
def test_chunked_search_equals_brute_force(query_chunk, db_chunk, k):
    g = torch.Generator().manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(103, 16, generator=g, dtype=torch.float64), dim=1)
    queries = torch.randn(37, 16, generator=g, dtype=torch.float64)
    index = EmbeddingIndex(db, query_chunk_size=query_chunk, db_chunk_size=db_chunk)
    scores, indices = index.search(queries, k)
    expected_scores, expected_indices = _brute_force(db, queries, min(k, 103))
    assert scores.shape == (37, min(k, 103))
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-12)
    assert torch.equal(indices, expected_indices)

    # many exact ties (integer vectors, one-hot queries): resolved towards the lower index, as a stable sort
    db = torch.randint(0, 3, (103, 8), generator=g).double()
    queries = torch.eye(8, dtype=torch.float64)
    index = EmbeddingIndex(db, normalize=False, query_chunk_size=query_chunk, db_chunk_size=db_chunk)
    scores, indices = index.search(queries, k)
    expected_scores, expected_indices = _brute_force(db, queries, min(k, 103))
    assert torch.equal(scores, expected_scores) and torch.equal(indices, expected_indices)


def test_index_float16_ids_and_errors():
    g = torch.Generator().manual_seed(1)
    db = torch.nn.functional.normalize(torch.randn(50, 12, generator=g), dim=1)
    index = EmbeddingIndex(db.half(), [f"img{i}" for i in range(50)], db_chunk_size=8)
    hits = index.search_hits(db[[3, 7]] * 5, k=2)  # queries need not be normalised
    assert [h.id for h in (hits[0][0], hits[1][0])] == ["img3", "img7"] and hits[0][0].rank == 0
    assert abs(hits[0][0].score - 1) < 1e-3
    unnormalised = EmbeddingIndex(db.numpy() * 3)  # rows are normalised on construction
    torch.testing.assert_close(unnormalised.embeddings.norm(dim=1), torch.ones(50))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(db[:1], 0)
    with pytest.raises(ValueError, match=r"\[Q, 12\]"):
        index.search(torch.randn(2, 5), 3)
    with pytest.raises(ValueError, match="3 ids for 50 embeddings"):
        EmbeddingIndex(db, ["a", "b", "c"])
    with pytest.raises(ValueError, match="non-empty"):
        EmbeddingIndex(torch.empty(0, 12))


def test_faiss_matches_exact_search():
    pytest.importorskip("faiss", reason="faiss is optional; the FAISS path is tested only where it is installed")
    g = torch.Generator().manual_seed(2)
    db = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    queries = torch.randn(20, 32, generator=g)
    exact = EmbeddingIndex(db).search(queries, 7)
    approx = EmbeddingIndex(db, use_faiss=True).search(queries, 7)
    assert torch.equal(exact[1], approx[1])
    torch.testing.assert_close(exact[0], approx[0], atol=1e-5, rtol=0)


def test_search_through_the_model(model, image_dir, tmp_path):
    _extract(model, image_dir, tmp_path / "emb", shard_size=4)
    index = EmbeddingIndex.from_dir(tmp_path / "emb", db_chunk_size=3)
    assert index.manifest is not None and index.manifest["modality"] == "image"
    query = image_dir / "b/c/04.png"
    [hits] = index.search_image(model, [query], k=3)
    assert hits[0].id == "b/c/04.png" and hits[0].score == pytest.approx(1, abs=1e-5)
    text_hits = index.search_text(model, "一只猫", k=20)
    assert len(text_hits) == 1 and len(text_hits[0]) == 11  # k is capped at the index size
    scores = [h.score for h in text_hits[0]]
    assert scores == sorted(scores, reverse=True)
    expected = (encode_texts(model, ["一只猫"]) @ index.embeddings.T)[0]
    assert [h.score for h in text_hits[0]] == pytest.approx(expected.sort(descending=True).values.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="use the model the index was built with"):
        EmbeddingIndex(torch.randn(5, model.config.embed_dim + 1)).search_text(model, "猫")


# -------------------------------------------------------------------------------------------- metrics
def test_recall_at_k_on_known_ranks():
    similarity = torch.zeros(4, 12)
    similarity[0] = torch.linspace(1, 0, 12)  # ground truth {0}: rank 0
    similarity[1] = torch.linspace(1, 0, 12)  # ground truth {3}: rank 3
    similarity[2, [5, 9]] = torch.tensor([0.5, 0.1])  # {9, 11}: 9 is 2nd, then ties in column order: 11 is last
    similarity[2] = torch.where(similarity[2] == 0, torch.tensor(0.05), similarity[2])
    ground_truth = [{0}, {3}, {11}, set()]  # query 2 → column 11 at rank 11: a miss; query 3 has no answer
    assert recall_at_k(similarity, ground_truth) == {1: 25.0, 5: 50.0, 10: 50.0}
    ground_truth[2] = {9, 11}
    assert recall_at_k(similarity, ground_truth) == {1: 25.0, 5: 75.0, 10: 75.0}
    ties = torch.zeros(2, 12)  # all equal: the original's stable sort keeps column order
    assert recall_at_k(ties, [{0}, {10}], ks=(1, 10, 11)) == {1: 50.0, 10: 50.0, 11: 100.0}
    with pytest.raises(ValueError, match="ks must be positive"):
        recall_at_k(ties, [{0}, {1}], ks=(0,))


def test_evaluate_retrieval_on_a_constructed_case():
    images = torch.eye(12)  # image j = e_j, ids "0.jpg" ... "11.jpg"
    image_ids = [f"{j}.jpg" for j in range(12)]
    texts = torch.zeros(4, 12)
    texts[0, 0] = 1  # T0 → I0 at rank 0
    texts[1, [1, 2, 3]] = torch.tensor([3.0, 2.0, 1.0])  # T1 → I3 at rank 2
    texts[2, 4] = 1  # T2 → {I5, I4}: I4 at rank 0
    texts[3, 11] = 1  # T3 → I10: I11, then ties in order I0..I10 → rank 11, a miss at 10
    ground_truth = {"t0": [0, 99], "t1": [3], "t2": ["5", "4.jpg"], "t3": [10]}  # "99" is not in the image set
    result = evaluate_retrieval(texts, ["t0", "t1", "t2", "t3"], images, image_ids, ground_truth)
    # t2i: hits at ranks 0, 2, 0, 11 → R@1 2/4, R@5 3/4, R@10 3/4
    assert (result["t2i_R@1"], result["t2i_R@5"], result["t2i_R@10"]) == (50.0, 75.0, 75.0)
    # i2t queries I0{T0} I3{T1} I5{T2} I4{T2} I10{T3}: ranks 0, 0, 2 (all-zero ties), 0, 3 → R@1 3/5
    assert (result["i2t_R@1"], result["i2t_R@5"], result["i2t_R@10"]) == (60.0, 100.0, 100.0)
    assert result["mean_recall"] == pytest.approx((50 + 75 + 75 + 60 + 100 + 100) / 6)
    assert result["t2i_mean_recall"] == pytest.approx(200 / 3) and result["i2t_mean_recall"] == pytest.approx(260 / 3)
    assert (result["num_t2i_queries"], result["num_i2t_queries"], result["missing_images"]) == (4, 5, 1)
    with pytest.raises(ValueError, match="no embedding"):
        evaluate_retrieval(texts, ["t0", "t1", "t2", "x"], images, image_ids, ground_truth)
    with pytest.raises(CNClipError, match="several images"):
        evaluate_retrieval(texts, ["t0", "t1", "t2", "t3"], images, ["0.jpg", "0.png", *image_ids[2:]], ground_truth)


def test_recall_matches_the_original_chinese_clip_evaluation(tmp_path, monkeypatch):
    """Same random features through the original pipeline: top-10 lists as make_topk_predictions(_tr).py,
    annotation transformed by transform_ir_annotation_to_tr.py, scores by evaluation(_tr).compute_score."""
    evaluation = pytest.importorskip("cn_clip.eval.evaluation")
    evaluation_tr = pytest.importorskip("cn_clip.eval.evaluation_tr")
    rng = np.random.default_rng(0)
    n_texts, n_images = 40, 30
    text_feats = rng.standard_normal((n_texts, 16)).astype(np.float32)
    image_feats = rng.standard_normal((n_images, 16)).astype(np.float32)
    text_feats /= np.linalg.norm(text_feats, axis=1, keepdims=True)
    image_feats /= np.linalg.norm(image_feats, axis=1, keepdims=True)
    text_ids, image_ids = list(range(1000, 1000 + n_texts)), list(range(500, 500 + n_images))
    gt = {t: [int(i) for i in rng.choice(image_ids, rng.integers(1, 4), replace=False)] for t in text_ids}
    golden = tmp_path / "valid_texts.jsonl"
    golden.write_text("".join(json.dumps({"text_id": t, "image_ids": gt[t]}) + "\n" for t in text_ids))

    def top10(queries, candidates, candidate_ids):  # the original's ranking: sorted by score, reverse=True
        scores = (torch.from_numpy(queries) @ torch.from_numpy(candidates).T).tolist()
        return [
            [cid for cid, _ in sorted(zip(candidate_ids, row), key=lambda x: x[1], reverse=True)[:10]] for row in scores
        ]

    t2i_pred, i2t_pred = tmp_path / "t2i.jsonl", tmp_path / "i2t.jsonl"
    t2i_pred.write_text(
        "".join(
            json.dumps({"text_id": t, "image_ids": p}) + "\n"
            for t, p in zip(text_ids, top10(text_feats, image_feats, image_ids))
        )
    )
    i2t_pred.write_text(
        "".join(
            json.dumps({"image_id": i, "text_ids": p}) + "\n"
            for i, p in zip(image_ids, top10(image_feats, text_feats, text_ids))
        )
    )
    monkeypatch.setattr(sys, "argv", ["transform_ir_annotation_to_tr.py", "--input", str(golden)])
    runpy.run_module("cn_clip.eval.transform_ir_annotation_to_tr", run_name="__main__")
    t2i_mean, t2i_r1, t2i_r5, t2i_r10 = evaluation.compute_score(str(golden), str(t2i_pred))
    i2t_mean, i2t_r1, i2t_r5, i2t_r10 = evaluation_tr.compute_score(
        str(tmp_path / "valid_texts.tr.jsonl"), str(i2t_pred)
    )

    ours = evaluate_retrieval(
        text_feats,
        [str(t) for t in text_ids],
        image_feats,
        [f"{i}.jpg" for i in image_ids],
        {str(t): v for t, v in gt.items()},
    )
    expected = {
        "t2i_R@1": t2i_r1,
        "t2i_R@5": t2i_r5,
        "t2i_R@10": t2i_r10,
        "i2t_R@1": i2t_r1,
        "i2t_R@5": i2t_r5,
        "i2t_R@10": i2t_r10,
        "t2i_mean_recall": t2i_mean,
        "i2t_mean_recall": i2t_mean,
        "mean_recall": (t2i_mean + i2t_mean) / 2,
    }
    assert 0 < t2i_r1 < t2i_r10 < 100  # a case that tells the values apart
    assert {k: ours[k] for k in expected} == pytest.approx(expected, abs=1e-9)
