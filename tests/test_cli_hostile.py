"""Hostile command lines (from a sweep of every subcommand): each must exit 2 with one line on stderr that
names the problem, no traceback, and leave nothing behind. All are refused before any model is loaded
(``toy-tiny`` is the model where one is needed, so a slip would load quickly and show as a wrong exit)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cnclip_vision.cli import main


@pytest.fixture
def world(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img" / "a.png")
    (tmp_path / "gbk.txt").write_bytes("猫\n狗\n".encode("gbk"))
    (tmp_path / "list.json").write_text("[1, 2, 3]", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "file.txt").write_text("x", encoding="utf-8")
    (tmp_path / "zs" / "test").mkdir(parents=True)
    (tmp_path / "zs" / "label_cn.txt").write_text("猫\n狗\n", encoding="utf-8")
    os.mkfifo(tmp_path / "pipe")  # not a regular file, like /dev/full (which a rename must never replace)
    return tmp_path


M = ["--model", "toy-tiny", "--device", "cpu"]
CASES = {
    "argparse error is one line": (["classify", "img", "--labels", "a,b", "-k", "0", *M], "--top-k"),
    "-o a pipe or device": (["classify", "img", "--labels", "a,b", "-o", "pipe", *M], "not a regular file"),
    "-o empty": (["classify", "img", "--labels", "a,b", "-o", "", *M], "--output is empty"),
    "labels file GBK": (["classify", "img", "--labels-file", "gbk.txt", *M], "gbk.txt is not UTF-8"),
    "labels file a folder": (["classify", "img", "--labels-file", "img", *M], "is a folder"),
    "template file empty": (["classify", "img", "--labels", "a", "--template-file", "empty.txt", *M], "empty"),
    "workers negative": (["classify", "img", "--labels", "a", "--workers", "-1", *M], "--workers"),
    "embed --out empty": (["embed", "img", "--out", "", *M], "output folder is empty"),
    "embed --out a file": (["embed", "img", "--out", "file.txt", *M], "not a folder"),
    "embed --shard-size 0": (["embed", "img", "--out", "e", "--shard-size", "0", *M], "--shard-size"),
    "embed --dist-timeout nan": (["embed", "img", "--out", "e", "--dist-timeout", "nan", *M], "--dist-timeout"),
    "heatmap huge size": (
        ["heatmap", "img/a.png", "--labels", "a", "--draw", "x.png", "--size", "100000", *M],
        "--size",
    ),
    "heatmap size 0": (["heatmap", "img/a.png", "--labels", "a", "--draw", "x.png", "--size", "0", *M], "--size"),
    "train NaN weight decay": (
        ["train", "--train-data", "x.jsonl", "--weight-decay", "nan", "--output-dir", "t"],
        "--weight-decay",
    ),
    "train batch 0": (["train", "--train-data", "x.jsonl", "--batch-size", "0", "--output-dir", "t"], "--batch-size"),
    "train output a file": (["train", "--train-data", "x.jsonl", "--output-dir", "file.txt"], "not a folder"),
    "train recipe a list": (["train", "--config", "list.json", "--output-dir", "t"], "JSON object"),
    "train-detector lr nan": (["train-detector", "--train-data", "x.json", "--lr", "nan", "--output-dir", "t"], "--lr"),
    "serve port out of range": (["serve", "--index", "emptydir", "--port", "99999"], "--port"),
    "search empty text": (["search", "", "--index", "emptydir"], "empty"),
    "search missing image": (["search", "--image", "nope.png", "--index", "emptydir"], "nope.png"),
    "toy-data empty folder": (["toy-data", "pairs", "", "--n", "1"], "output folder is empty"),
    "toy-data negative size": (["toy-data", "pairs", "out", "--image-size", "-5"], "--image-size"),
    "toy-detector-eval n 0": (["toy-detector-eval", "--n", "0"], "--n"),
    "convert into a file": (["convert", "toy-tiny", "file.txt"], "not a folder"),
    "detect score nan": (["detect", "img", "--labels", "a", "--score-threshold", "nan"], "--score-threshold"),
    "detect query box nan": (["detect", "img", "--query", "q=img/a.png@nan,0,10,10"], "--query"),
    "detect query box empty": (["detect", "img", "--query", "q=img/a.png@0,0,0,0"], "--query"),
    "heatmap missing image": (["heatmap", "nope.png", "--labels", "a", "--draw", "x.png", *M], "nope.png"),
    "export-onnx opset": (["export-onnx", *M, "-o", "ox", "--opset", "99999"], "--opset"),
    "embed an empty folder": (["embed", "emptydir", "--out", "e", *M], "no images found"),
    "embed texts not JSONL records": (["embed", "--texts", "list.json", "--out", "e", *M], "list.json:1"),
    "eval-zeroshot missing split": (["eval-zeroshot", "zs", "--split", "nope", *M], "--split nope"),
    "serve detector not a folder": (
        ["serve", "--index", "emptydir", "--detector", "nowhere", "--port", "0"],
        "--detector",
    ),
    "unknown precision": (["classify", "img", "--labels", "a", "--precision", "fp8", *M], "--precision"),
    "classifier cache a folder": (
        ["classify", "img", "--labels", "a,b", "--classifier-cache", "emptydir", *M],
        "--classifier-cache: the file emptydir is a folder; expected a file name",
    ),
    "classifier cache empty": (
        ["eval-zeroshot", "zs", "--classifier-cache", "", *M],
        "--classifier-cache: the file name is empty",
    ),
    "toy-eval n-retrieval 0": (["toy-eval", "--n-retrieval", "0"], "--n-retrieval: expected an integer >= 1"),
    "toy-eval n-per-class text": (["toy-eval", "--n-per-class", "x"], "--n-per-class: expected an integer >= 1"),
    "toy-detector-eval n negative": (["toy-detector-eval", "--n", "-1"], "--n: expected an integer >= 1"),
    "toy-data seed negative": (["toy-data", "pairs", "out", "--seed", "-1"], "--seed: expected an integer >= 0"),
    "train seed huge": (["train", "--train-data", "x.jsonl", "--seed", "1e9"], "--seed: expected an integer"),
    "index build recall nan": (["index", "build", "emptydir", "--recall", "nan"], "--recall: expected a number"),
    "index build num-queries 0": (["index", "build", "emptydir", "--num-queries", "0"], "--num-queries"),
    "detect max-detections 0": (["detect", "img", "--labels", "a", "--max-detections", "0"], "--max-detections"),
    "eval-coco max-dets 0": (["eval-coco", "list.json", "--max-dets", "0"], "--max-dets"),
    "serve batch wait inf": (["serve", "--index", "emptydir", "--batch-wait-ms", "inf"], "--batch-wait-ms"),
    "image list not UTF-8": (["classify", "gbk.txt", "--labels", "a", *M], "the image list gbk.txt is not UTF-8"),
    "embed texts a folder": (["embed", "--texts", "emptydir", "--out", "e", *M], "text file emptydir is a folder"),
    "eval-zeroshot dataset a file": (["eval-zeroshot", "file.txt", *M], "dataset file.txt is a file"),
    "index info missing folder": (["index", "info", "nope"], "no such embeddings directory: nope"),
    "index build memory": (["index", "build", "emptydir", "--memory", "lots"], "--memory: memory must be a size"),
    "make-ovcoco output a file": (
        ["make-ovcoco", "--instances", "list.json", "--split", "train", "--output", "file.txt"],
        "--output: file.txt exists and is not a folder",
    ),
    "toy-detector-eval data-dir a file": (["toy-detector-eval", "--data-dir", "file.txt"], "--data-dir"),
    "eval-retrieval save-embeddings a file": (
        ["eval-retrieval", "--texts", "x.jsonl", "--images", "img", "--save-embeddings", "file.txt", *M],
        "--save-embeddings: file.txt exists and is not a folder",
    ),
    "export-onnx output under a file": (["export-onnx", *M, "-o", "file.txt/sub"], "file.txt is a file, not a folder"),
    "detect draw a .gif folder": (["detect", "img", "--labels", "a", "--draw", "x.gif"], "pictures are written as"),
    "heatmap unknown templates": (
        ["heatmap", "img/a.png", "--labels", "a", "--draw", "x.png", "--templates", "bad", *M],
        "--templates: invalid choice",
    ),
    "serve api key file a folder": (
        ["serve", "--index", "emptydir", "--api-key-file", "emptydir", "--port", "0"],
        "--api-key-file emptydir is a folder",
    ),
    "serve host empty": (["serve", "--index", "emptydir", "--host", "", "--port", "0"], "--host is empty"),
    "eval-zeroshot split empty": (["eval-zeroshot", "zs", "--split", "", *M], "--split: expected the name of a folder"),
    "eval-zeroshot split a path": (["eval-zeroshot", "zs", "--split", "../..", *M], "--split: expected the name"),
    "train precision": (["train", "--train-data", "x.jsonl", "--precision", "fp8"], "--precision: invalid choice"),
    "train-detector precision": (
        ["train-detector", "--train-data", "x.json", "--precision", "fp8"],
        "--precision: invalid choice",
    ),
    "unknown arch": (["classify", "img", "--labels", "a", "--arch", "ViT-Z-99", *M], "--arch: unknown model name"),
    "eval-coco results into a folder": (
        ["eval-coco", "list.json", "--results-output", "emptydir"],
        "--results-output: the file emptydir is a folder",
    ),
}


@pytest.mark.parametrize("argv, match", list(CASES.values()), ids=list(CASES))
def test_hostile_command_line(world, capsys, argv, match):
    before = sorted(str(p.relative_to(world)) for p in world.rglob("*"))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("INFO ", "WARNING "))]
    assert code == 2, err
    assert len(lines) == 1 and ": error: " in lines[0], lines
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    assert sorted(str(p.relative_to(world)) for p in world.rglob("*")) == before  # nothing left behind
    assert (world / "pipe").is_fifo()


def test_eval_retrieval_refuses_stores_of_another_kind_or_model(world, capsys):
    """A text store as image embeddings, and a store written by another model, are refused."""
    texts = world / "texts.jsonl"
    texts.write_text(json.dumps({"text_id": 1, "text": "红色", "image_ids": ["a"]}, ensure_ascii=False) + "\n")
    assert main(["-q", "embed", "--texts", str(texts), "--out", "txt", *M, "--precision", "fp32"]) == 0
    assert main(["-q", "embed", "img", "--out", "imgs", *M, "--precision", "fp32"]) == 0
    capsys.readouterr()
    code = main(["eval-retrieval", "--texts", str(texts), "--image-embeddings", "txt", *M])
    assert code == 2 and "holds text embeddings; expected image" in capsys.readouterr().err
    code = main(["eval-retrieval", "--texts", str(texts), "--image-embeddings", "imgs", *M, "--precision", "int8"])
    assert code == 2 and "is not the model --image-embeddings was written with" in capsys.readouterr().err
    code = main(["-q", "eval-retrieval", "--texts", str(texts), "--image-embeddings", "imgs", *M])
    assert code == 0, capsys.readouterr().err  # auto: the store's precision (fp32)


def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path):
    from cnclip_vision.io import atomic_write

    os.mkfifo(tmp_path / "pipe")
    for target, match in ((tmp_path / "pipe", "not a regular file"), (tmp_path, "not a regular file"), ("", "empty")):
        with pytest.raises(ValueError, match=match), atomic_write(target) as tmp:
            tmp.write_text("x")
    assert (tmp_path / "pipe").is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


class _FakeProgram:
    """What ``torch.onnx.export(dynamo=True)`` returns, as far as the export uses it."""

    model = type("Model", (), {"opset_imports": {"": 17}})()

    def save(self, path, external_data=False):
        path.write_bytes(b"graph")


def _fake_exporter(monkeypatch, fail_on: str | None = None):
    import torch

    def export(module, args, f=None, *, dynamo=True, **kwargs):
        if type(module).__name__ == fail_on:
            raise RuntimeError("unsupported operator aten::frobnicate")
        return _FakeProgram()

    monkeypatch.setattr(torch.onnx, "export", export)


def test_export_onnx_failure_leaves_no_partial_folder(world, capsys, monkeypatch):
    """The text encoder fails after the image encoder was written: nothing of it stays, an earlier export stays."""
    _fake_exporter(monkeypatch, fail_on="_TextEncoder")
    (world / "ox").mkdir()
    (world / "ox" / "image_encoder.onnx").write_bytes(b"earlier export")
    before = _tree(world)
    assert main(["export-onnx", *M, "-o", "ox"]) == 1  # the work failed (valid input): exit 1
    assert main(["export-onnx", *M, "-o", "new/sub"]) == 1  # parents it created go too
    err = capsys.readouterr().err
    assert "ONNX export of text_encoder.onnx failed (RuntimeError): unsupported operator" in err
    assert _tree(world) == before


def test_export_onnx_check_failure_keeps_the_earlier_export(world, capsys, monkeypatch):
    from cnclip_vision.export import onnx

    _fake_exporter(monkeypatch)
    monkeypatch.setattr(
        onnx,
        "_check",
        lambda *a, **k: {"passed": False, "tolerance": {"max_abs_diff": 1e-4}, "max_abs_diff": 0.5, "min_cosine": 0.9},
    )
    (world / "ox").mkdir()
    (world / "ox" / "image_encoder.onnx").write_bytes(b"earlier export")
    before = _tree(world / "ox")
    assert main(["export-onnx", *M, "-o", "ox"]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ": failed: " in ln]
    assert len(lines) == 1 and "ox was left as it was" in lines[0] and "ox.check-failed" in lines[0], lines
    assert _tree(world / "ox") == before
    report = json.loads((world / "ox.check-failed" / "export_report.json").read_text(encoding="utf-8"))
    assert report["check"]["passed"] is False and (world / "ox.check-failed" / "text_encoder.onnx").is_file()
    assert not [p for p in world.iterdir() if p.name.startswith(".")]  # no staging folder left

    monkeypatch.setattr(
        onnx,
        "_check",
        lambda *a, **k: {"passed": True, "tolerance": {"max_abs_diff": 1e-4}, "max_abs_diff": 0.0, "min_cosine": 1.0},
    )
    (world / "ox" / "notes.txt").write_text("mine")
    assert main(["-q", "export-onnx", *M, "-o", "ox"]) == 0  # into the existing folder, file by file
    assert (world / "ox" / "image_encoder.onnx").read_bytes() == b"graph"
    assert (world / "ox" / "notes.txt").read_text() == "mine" and (world / "ox" / "export_report.json").is_file()
    assert not [p for p in world.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train-detector", "--train-data", "nope.json"], "COCO file nope.json does not exist"),
        (["train-detector", "--train-data", "emptydir"], "is a folder; expected a COCO annotation .json file"),
        (["train-detector", "--train-data", "list.json"], "expected a JSON object with images/annotations"),
        (["train-detector", "--train-data", "gbk.txt"], "gbk.txt"),
        (["train", "--train-data", "nope.jsonl"], "no such file or folder: nope.jsonl"),
        (["train", "--train-data", "emptydir"], "emptydir is a folder without train_imgs.tsv"),
        (["train", "--train-data", "list.json"], "list.json: expected a .jsonl or .tsv file"),
    ],
)
def test_training_data_is_checked_before_the_model_loads(world, capsys, monkeypatch, argv, match):
    from cnclip_vision.models import factory

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the training data was checked")

    monkeypatch.setattr(factory, "load", no_load)
    monkeypatch.setattr(factory, "create_model", no_load)
    clip = "--clip" if argv[0] == "train-detector" else "--model"
    before = sorted(str(p.relative_to(world)) for p in world.rglob("*"))
    assert main([*argv, "--output-dir", "t", clip, "toy-tiny", "--device", "cpu"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("INFO ")]
    assert len(lines) == 1 and match in lines[0], lines
    assert sorted(str(p.relative_to(world)) for p in world.rglob("*")) == before  # no output folder made


@pytest.fixture
def vectors(world):
    """200 random 32-d embeddings in ``vec`` (``vec-hnsw``: the same with an HNSW8 index)."""
    import numpy as np

    pytest.importorskip("faiss", reason="FAISS indexes need faiss-cpu (in the dev extra)")
    from cnclip_vision.retrieval import build_ann_index, save_embeddings

    x = np.random.default_rng(0).standard_normal((200, 32)).astype(np.float32)
    for name in ("vec", "vec-hnsw"):
        save_embeddings(world / name, [f"v{i}" for i in range(len(x))], x, shard_size=100)
    build_ann_index(world / "vec-hnsw", index_key="HNSW8", num_queries=20, progress=False)
    return world


ANN_CASES = {
    "unknown name": (["--ann-params", "foo=bar"], "unknown search parameter 'foo'; expected efSearch, nprobe"),
    "not NAME=VALUE": (["--ann-params", "efSearch"], "'efSearch' is not NAME=VALUE"),
    "not a number": (["--ann-params", "efSearch=abc"], "efSearch must be an integer >= 1, got 'abc'"),
    "negative": (["--ann-params", "nprobe=-3"], "nprobe must be an integer >= 1, got -3"),
    "fraction": (["--ann-params", "nprobe=2.5"], "nprobe must be an integer >= 1, got '2.5'"),
    "not of this index": (["--ann-params", "nprobe=8"], "nprobe does not apply to a HNSW8 index; it takes efSearch"),
    "with --exact": (["--ann-params", "efSearch=64", "--exact"], "--exact does not use the index"),
    "no index": (["--ann-params", "efSearch=64", "--index", "vec"], "--index vec has no FAISS index"),
}


@pytest.mark.parametrize("extra, match", list(ANN_CASES.values()), ids=list(ANN_CASES))
def test_search_ann_params_are_never_ignored(vectors, capsys, extra, match):
    argv = ["search", "红色", "--index", "vec-hnsw", *extra, *M]
    if "--index" in extra:
        argv = argv[:2] + argv[4:]
    before = sorted(str(p.relative_to(vectors)) for p in vectors.rglob("*"))
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("INFO ")]
    assert len(lines) == 1 and ": error: " in lines[0] and match in lines[0], lines
    assert sorted(str(p.relative_to(vectors)) for p in vectors.rglob("*")) == before


def test_search_ann_params_library(vectors):
    from cnclip_vision.retrieval import EmbeddingIndex
    from cnclip_vision.retrieval.ann import parse_search_params

    assert parse_search_params("nprobe=16, quantizer_efSearch=32", "IVF64_HNSW32,Flat") == {
        "nprobe": 16,
        "quantizer_efSearch": 32,
    }
    with pytest.raises(ValueError, match="Flat index; it has no search parameters"):
        parse_search_params("efSearch=8", "Flat")
    with pytest.raises(ValueError, match="searched exactly"):
        EmbeddingIndex.from_dir(vectors / "vec", ann_params="efSearch=8")
    assert EmbeddingIndex.from_dir(vectors / "vec-hnsw", ann_params="efSearch=8").backend == "faiss:HNSW8"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--index-key", "IVF1024,Flat"], "needs at least 1,024 training vectors (one per IVF cluster"),
        (["--index-key", "IVF16,PQ8"], "needs at least 256 training vectors (one per product-quantizer centroid"),
        (["--index-key", "OPQ4_16,IVF16,PQ4x8"], "needs at least 256 training vectors"),
        (["--index-key", "IVF64,Flat", "--train-size", "50"], "--train-size 50: raise --train-size"),
    ],
)
def test_index_build_too_few_vectors_for_the_index(vectors, capsys, extra, match):
    before = sorted(str(p.relative_to(vectors)) for p in vectors.rglob("*"))
    assert main(["index", "build", "vec", *extra]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and match in lines[0], lines
    assert "vec holds 200 vectors" in lines[0] or "--train-size" in lines[0]
    assert sorted(str(p.relative_to(vectors)) for p in vectors.rglob("*")) == before


UNREADABLE = {
    "classify": ["classify", "img", "--labels", "a,b", *M],
    "embed": ["embed", "img", "--out", "e", *M],
    "detect": ["detect", "img", "--labels", "a", "--device", "cpu"],
}


def _deny_listing(monkeypatch, folder):
    """``os.scandir(folder)`` and ``os.listdir(folder)`` (``Path.iterdir``) raise PermissionError, as for a
    folder of mode 000 when not root."""

    def denied(real):
        def listing(path="."):
            if os.path.abspath(os.fspath(path)) == os.path.abspath(folder):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path)

        return listing

    monkeypatch.setattr(os, "scandir", denied(os.scandir))
    monkeypatch.setattr(os, "listdir", denied(os.listdir))


@pytest.mark.parametrize("argv", list(UNREADABLE.values()), ids=list(UNREADABLE))
def test_a_folder_that_cannot_be_listed_is_not_empty(world, capsys, monkeypatch, argv):
    _deny_listing(monkeypatch, world / "img")
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "cannot read the folder img: Permission denied" in lines[0], lines
    assert not (world / "e").exists()


def test_an_unreadable_sub_folder_is_skipped_with_a_warning(world, monkeypatch, caplog):
    from cnclip_vision.data.images import list_images

    (world / "img" / "sub").mkdir()
    _deny_listing(monkeypatch, world / "img" / "sub")
    assert list_images(world / "img") == [world / "img" / "a.png"]
    assert "skipped the folder" in caplog.text and "Permission denied" in caplog.text


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root lists a folder of mode 000 anyway")
def test_a_folder_of_mode_000(world, capsys):
    (world / "img").chmod(0)
    try:
        assert main(["classify", "img", "--labels", "a,b", *M]) == 2
    finally:
        (world / "img").chmod(0o755)
    assert "cannot read the folder img: Permission denied" in capsys.readouterr().err


def test_eval_zeroshot_split_that_cannot_be_listed(world, capsys, monkeypatch):
    (world / "zs" / "test" / "000").mkdir()
    _deny_listing(monkeypatch, world / "zs" / "test")
    assert main(["eval-zeroshot", "zs", *M]) == 2
    assert "cannot read the folder zs/test: Permission denied" in capsys.readouterr().err


@pytest.fixture
def hub_unreachable(tmp_path, monkeypatch):
    """huggingface_hub online, its cache empty (``tmp_path/hub``), and the Hub a closed local port."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_name_not_cached_and_hub_unreachable_fails_fast(world, hub_unreachable, capsys):
    """One request, not huggingface_hub's five retries with backoff (about 25 s)."""
    import time

    start = time.perf_counter()
    assert main(["classify", "img", "--labels", "a,b", "--model", "ViT-B-16", "--device", "cpu"]) == 2
    assert time.perf_counter() - start < 15
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, lines
    assert "are not in the Hugging Face cache at" in lines[0] and "not downloaded (http://127.0.0.1:9: " in lines[0]


def test_hub_name_from_the_cache_when_the_hub_is_unreachable(hub_unreachable):
    import cnclip_vision

    from .conftest import small_config

    model = cnclip_vision.create_model(small_config("ViT-B-16"))
    repo = hub_unreachable / "models--OFA-Sys--chinese-clip-vit-base-patch16"
    commit = "0123456789abcdef0123456789abcdef01234567"
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert cnclip_vision.load("ViT-B-16").config.vision.width == model.config.vision.width


def test_train_detector_checks_eval_data_before_training(tmp_path, capsys):
    """A missing --eval-data used to fail only after the last step, losing the run's final detector."""
    from cnclip_vision.toy.detector import write_toy_detection_data

    train = write_toy_detection_data(tmp_path / "d", n_train=8, n_val=0)["train"]
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "toy-detector.json")
    code = main(["train-detector", "--config", recipe, "--train-data", str(train),
                 "--output-dir", str(tmp_path / "run"), "--eval-data", str(tmp_path / "missing.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "missing.json does not exist" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
