"""`cnclip embed`, `cnclip search`, `cnclip eval-retrieval` through subprocesses, including the error paths.

Starting the CLI costs seconds (torch, timm), so the fixture starts the independent commands together
and each test checks one of the results."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cnclip_vision
from tests.conftest import small_config

TEXTS = [
    {"text_id": 1, "text": "一只橘猫", "image_ids": ["img0"]},  # matched without the extension
    {"text_id": 2, "text": "红色的汽车", "image_ids": ["sub/img3.png", "img1"]},
    {"text_id": 3, "text": "海边的日落", "image_ids": [5]},  # integer id, as in MUGE: matches "5.png"
    {"text_id": 4, "text": "一碗面条", "image_ids": ["bad"]},  # the unreadable image
]


def _cli(*args: str, env: dict[str, str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cnclip_vision.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=cwd,
    )


def _wait(procs: dict[str, subprocess.Popen]) -> dict[str, subprocess.CompletedProcess]:
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_retrieval")
    torch.manual_seed(0)
    model_dir = tmp / "model"
    cnclip_vision.create_model(small_config("ViT-B-16")).save_pretrained(model_dir)
    images = tmp / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("img0.png", "img1.png", "img2.png", "sub/img3.png", "sub/img4.png", "5.png"):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(images / name)
    (images / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp / "empty").mkdir()
    texts = tmp / "texts.jsonl"
    texts.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text('{"text_id": 1, "text": "猫"}\n{"text_id": 2, "text": 猫}\n', encoding="utf-8")

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"))
    env.pop("HF_HUB_CACHE", None)
    # fp32: the random tiny model's embeddings nearly coincide, and their order must not depend on the CPU's bf16
    model = ["--model", str(model_dir), "--device", "cpu", "--batch-size", "4", "--workers", "0", "--precision", "fp32"]
    first = _wait(
        {
            "embed_images": _cli(
                "embed", str(images), "--out", "img_emb", "--shard-size", "3", *model, env=env, cwd=tmp
            ),
            "embed_texts": _cli("-q", "embed", "--texts", str(texts), "--out", "txt_emb", *model, env=env, cwd=tmp),
            "eval_images": _cli(
                "-q",
                "eval-retrieval",
                "--texts",
                str(texts),
                "--images",
                str(images),
                "-o",
                "report.json",
                *model,
                env=env,
                cwd=tmp,
            ),
            "missing_folder": _cli("-q", "embed", str(tmp / "nowhere"), "--out", "x", *model, env=env, cwd=tmp),
            "empty_folder": _cli("-q", "embed", str(tmp / "empty"), "--out", "y", *model, env=env, cwd=tmp),
            "bad_jsonl": _cli("-q", "embed", "--texts", str(bad_jsonl), "--out", "z", *model, env=env, cwd=tmp),
        }
    )
    second = _wait(
        {
            "search": _cli(
                "-q",
                "search",
                "一只橘猫",
                "红色的汽车",
                "--image",
                str(images / "img1.png"),
                "--index",
                "img_emb",
                "-k",
                "3",
                "--format",
                "csv",
                *model,
                env=env,
                cwd=tmp,
            ),
            "eval_embeddings": _cli(
                "-q",
                "eval-retrieval",
                "--texts",
                str(texts),
                "--image-embeddings",
                "img_emb",
                "--text-embeddings",
                "txt_emb",
                env=env,
                cwd=tmp,
            ),
            "index_build": _cli("-q", "index", "build", "txt_emb", "--memory", "1GB", env=env, cwd=tmp),
        }
    )
    third = _wait(
        {
            "search_ann": _cli("-v", "search", "一只橘猫", "--index", "txt_emb", "-k", "2", *model, env=env, cwd=tmp),
            "search_exact": _cli(
                "-v", "search", "一只橘猫", "--index", "txt_emb", "-k", "2", "--exact", *model, env=env, cwd=tmp
            ),
            "index_info": _cli("-q", "index", "info", "txt_emb", env=env, cwd=tmp),
            "index_missing": _cli("-q", "index", "info", "img_emb", env=env, cwd=tmp),
        }
    )
    return {**first, **second, **third, "tmp": tmp}


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def test_embed_images_reports_bad_files(runs):
    result = _ok(runs["embed_images"])
    summary = json.loads(result.stdout)
    assert (summary["num_inputs"], summary["num_embedded"], summary["num_failed"], summary["num_shards"]) == (
        7,
        6,
        1,
        4,
    )
    [failure] = summary["failures"]
    assert failure["id"] == "bad.jpg" and failure["path"].endswith("bad.jpg") and failure["reason"]
    assert "bad.jpg" in result.stderr  # logged as it happens
    ids = (runs["tmp"] / "img_emb" / "ids.txt").read_text(encoding="utf-8").split()
    assert sorted(ids) == ["5.png", "img0.png", "img1.png", "img2.png", "sub/img3.png", "sub/img4.png"]


def test_embed_texts(runs):
    summary = json.loads(_ok(runs["embed_texts"]).stdout)
    assert summary["modality"] == "text" and summary["num_embedded"] == 4 and summary["failures"] == []
    assert runs["embed_texts"].stderr == ""  # -q: no logs, no progress bars


def test_search_csv(runs):
    rows = list(csv.DictReader(io.StringIO(_ok(runs["search"]).stdout)))
    assert list(rows[0]) == ["query", "query_type", "rank", "id", "score"]
    assert [(r["query"], r["rank"]) for r in rows[:3]] == [("一只橘猫", "1"), ("一只橘猫", "2"), ("一只橘猫", "3")]
    assert len(rows) == 9 and {r["query_type"] for r in rows} == {"text", "image"}
    image_rows = [r for r in rows if r["query_type"] == "image"]
    assert image_rows[0]["id"] == "img1.png" and float(image_rows[0]["score"]) == pytest.approx(1, abs=1e-4)


def test_eval_retrieval_from_images_and_from_embeddings(runs):
    from_embeddings = json.loads(_ok(runs["eval_embeddings"]).stdout)
    assert _ok(runs["eval_images"]).stdout == ""  # written to -o
    from_images = json.loads((runs["tmp"] / "report.json").read_text(encoding="utf-8"))
    metrics = [f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)] + ["mean_recall"]
    for report in (from_embeddings, from_images):
        assert all(0 <= report[m] <= 100 for m in metrics)
        assert (report["num_texts"], report["num_images"], report["num_t2i_queries"]) == (4, 6, 4)
        assert (report["num_i2t_queries"], report["missing_images"]) == (
            4,
            1,
        )  # img0, sub/img3, img1, 5; bad.jpg missing
        assert report["t2i_R@10"] == 75.0  # only the text whose image is unreadable is missed (6 candidates)
        assert report["i2t_R@5"] == 100.0  # 4 candidate texts
    assert {m: from_images[m] for m in metrics} == pytest.approx({m: from_embeddings[m] for m in metrics}, abs=1e-3)


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing_folder", "no such image folder or list file"),
        ("empty_folder", "no images found in"),
        ("bad_jsonl", "bad.jsonl:2: not valid JSON"),
    ],
)
def test_errors_exit_2_with_one_line(runs, name, message):
    result = runs[name]
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cnclip embed: error: ")
    assert message in result.stderr


def test_index_build_and_search_through_it(runs):
    info = json.loads(_ok(runs["index_build"]).stdout)
    assert info["index_key"] == "Flat" and info["num_vectors"] == 4  # under 1,000 vectors: exact, as autofaiss
    assert info["measured"]["recall@1"] == 1.0 and (runs["tmp"] / "txt_emb" / info["index_file"]).is_file()
    assert json.loads(_ok(runs["index_info"]).stdout)["current"] is True
    assert runs["index_missing"].returncode == 2 and "has no FAISS index" in runs["index_missing"].stderr
    ann, exact = _ok(runs["search_ann"]), _ok(runs["search_exact"])
    assert "faiss:Flat search" in ann.stderr and "exact search" in exact.stderr
    hits = [
        [(h["id"], h["score"]) for h in d[0]["results"]] for d in (json.loads(ann.stdout), json.loads(exact.stdout))
    ]
    assert len(hits[0]) == 2 and [i for i, _ in hits[0]] == [i for i, _ in hits[1]]
    assert [s for _, s in hits[0]] == pytest.approx([s for _, s in hits[1]], abs=1e-5)


def test_help_is_complete():
    from cnclip_vision.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    commands["index build"] = next(a for a in commands["index"]._actions if a.dest == "index_command").choices["build"]
    for name in ("embed", "search", "eval-retrieval", "index", "index build"):
        sub = commands[name]
        assert sub.description and len(sub.description) > 100
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
