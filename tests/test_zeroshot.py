"""Zero-shot classification: the math, template averaging, top-k, caching, evaluation, CLI, bad input."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cnclip_vision
from cnclip_vision.errors import CNClipError
from cnclip_vision.zeroshot import DEFAULT_TEMPLATES, ZeroShotClassifier, calibrate_threshold, evaluate_folder

from .conftest import small_config

LABELS = ["猫", "狗", "兔子", "电动车"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cnclip_vision.create_model(small_config("ViT-B-16"))


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return path


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (60 + 7 * i, 80, 3), dtype=np.uint8)) for i in range(n)]


def test_templates_are_ours_and_many():
    assert len(DEFAULT_TEMPLATES) >= 20 and len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    assert all("{}" in t for t in DEFAULT_TEMPLATES)


def test_class_embeddings_are_template_averages(model):
    templates = ["一张{}的照片。", "{}", "图中是{}。"]
    clf = ZeroShotClassifier(model, LABELS, templates=templates)
    with torch.no_grad():
        for i, label in enumerate(LABELS):
            ids = cnclip_vision.tokenize([t.format(label) for t in templates])
            per_template = model.encode_text(ids, normalize=True)
            expected = torch.nn.functional.normalize(per_template.mean(0), dim=-1)
            torch.testing.assert_close(clf.class_embeddings[i], expected, atol=1e-5, rtol=0)
    assert torch.allclose(clf.class_embeddings.norm(dim=-1), torch.ones(len(LABELS)))


def test_scores_and_predict_equal_direct_computation(model):
    clf = ZeroShotClassifier(model, LABELS, templates="none")
    images = _images(3)
    cosine = clf.scores(images)
    with torch.no_grad():
        text = model.encode_text(cnclip_vision.tokenize(LABELS), normalize=True)
        pixels = cnclip_vision.image_transform(224).batch(images)
        direct = model.encode_image(pixels, normalize=True) @ text.t()
    torch.testing.assert_close(cosine, direct, atol=1e-5, rtol=0)
    probs = (model.logit_scale.exp() * direct).softmax(-1)
    preds = clf.predict(images, top_k=3)
    for pred, row in zip(preds, probs):
        order = row.argsort(descending=True)[:3].tolist()
        assert pred["indices"] == order
        assert pred["labels"] == [LABELS[j] for j in order]
        torch.testing.assert_close(torch.tensor(pred["probs"]), row[order], atol=1e-5, rtol=0)
        assert pred["probs"] == sorted(pred["probs"], reverse=True)
    # a preprocessed batch gives the same as raw images
    torch.testing.assert_close(clf.scores(pixels), cosine, atol=1e-6, rtol=0)
    assert len(clf.predict(images, top_k=99)[0]["labels"]) == len(LABELS)


def test_save_and_load_skip_reencoding(model, tmp_path, monkeypatch):
    clf = ZeroShotClassifier(model, LABELS)
    clf.save(tmp_path / "classes.safetensors")
    import cnclip_vision.zeroshot as zs

    monkeypatch.setattr(zs, "encode_texts", lambda *a, **k: pytest.fail("text was re-encoded"))
    again = ZeroShotClassifier.load(tmp_path / "classes.safetensors", model)
    assert again.labels == LABELS and again.templates == clf.templates
    assert torch.equal(again.class_embeddings, clf.class_embeddings)
    with pytest.raises(CNClipError, match="not a saved ZeroShotClassifier"):
        (tmp_path / "junk.safetensors").write_bytes(b"junk")
        ZeroShotClassifier.load(tmp_path / "junk.safetensors", model)


def test_similarity(model):
    images = _images(2)
    sim = model.similarity(images, ["猫", "一辆红色的电动车"])
    assert sim.shape == (2, 2) and sim.abs().max() <= 1.0
    with torch.no_grad():
        text = model.encode_text(cnclip_vision.tokenize(["猫", "一辆红色的电动车"]), normalize=True)
        img = model.encode_image(cnclip_vision.image_transform(224).batch(images), normalize=True)
    torch.testing.assert_close(sim, img @ text.t(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        ([], ValueError, "empty"),
        (["猫", "狗", "猫"], ValueError, "duplicate.*猫"),
        (["猫", ""], ValueError, r"labels\[1\]"),
        ("猫", TypeError, "list of strings"),
    ],
)
def test_bad_labels(model, labels, error, match):
    with pytest.raises(error, match=match):
        ZeroShotClassifier(model, labels)


def test_bad_templates(model):
    with pytest.raises(ValueError, match="placeholder"):
        ZeroShotClassifier(model, LABELS, templates=["no placeholder"])


def test_overlong_label_warns_with_text(model, caplog):
    long_label = "一只非常" * 30 + "可爱的猫"
    with caplog.at_level("WARNING"):
        ZeroShotClassifier(model, [long_label, "狗"], templates="none")
    assert any("truncated" in r.getMessage() and "一只非常" in r.getMessage() for r in caplog.records)


def _imagefolder(root, per_class=(3, 2, 2, 1), corrupt=True):
    (root / "label_cn.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    images = iter(_images(sum(per_class), seed=1))
    for c, n in enumerate(per_class):
        folder = root / "test" / f"{c:03d}"
        folder.mkdir(parents=True)
        for j in range(n):
            next(images).save(folder / f"{j}.jpg")
    if corrupt:
        (root / "test" / "001" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        (root / "test" / "002" / "notes.png").write_text("text")
    return root


def test_evaluate_folder_counts(model, tmp_path):
    root = _imagefolder(tmp_path)
    clf = ZeroShotClassifier(model, LABELS, templates="none")
    report = evaluate_folder(clf, root, batch_size=3, num_workers=0, progress=False)
    assert report["n_images"] == 8 and report["n_skipped"] == 2 and report["n_classes"] == 4
    assert {s["path"].rsplit("/", 1)[-1] for s in report["skipped"]} == {"broken.jpg", "notes.png"}
    # recompute from the direct predictions
    paths = sorted((root / "test").rglob("*.jpg"))
    paths = [p for p in paths if p.name != "broken.jpg"]
    preds = clf.predict(paths, top_k=4)
    targets = [int(p.parent.name) for p in paths]
    top1 = np.mean([pr["indices"][0] == t for pr, t in zip(preds, targets)])
    assert report["top1"] == pytest.approx(top1)
    assert report["top5"] == 1.0  # 4 classes: the target is always in the top 5
    assert sum(v["n"] for v in report["per_class"].values()) == 8
    assert sum(c["count"] for c in report["confusions"]) == round((1 - top1) * 8)
    assert report == clf.evaluate(root, batch_size=8, num_workers=0, progress=False)


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "cnclip_vision.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_classify_json_and_csv(model, model_dir, tmp_path):
    root = _imagefolder(tmp_path)
    out = _cli(
        "classify",
        str(root / "test"),
        "--model",
        str(model_dir),
        "--labels",
        "猫，狗,兔子,电动车",
        "-k",
        "2",
        "--templates",
        "none",
        "--classifier-cache",
        str(tmp_path / "cache.safetensors"),
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["n_images"] == 8 and doc["n_skipped"] == 2
    assert "broken.jpg" in out.stderr and "notes.png" in out.stderr
    first = doc["results"][0]
    clf = ZeroShotClassifier(model, LABELS, templates="none")
    expected = clf.predict([first["image"]], top_k=2)[0]
    assert first["labels"] == expected["labels"] and first["label"] == expected["labels"][0]
    assert (tmp_path / "cache.safetensors").is_file()
    # CSV, to a file, reusing the cache
    out = _cli(
        "-q",
        "classify",
        str(root / "test" / "000"),
        "--model",
        str(model_dir),
        "--labels",
        ",".join(LABELS),
        "--templates",
        "none",
        "--classifier-cache",
        str(tmp_path / "cache.safetensors"),
        "--format",
        "csv",
        "--output",
        str(tmp_path / "out.csv"),
    )
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text(encoding="utf-8"))))
    assert len(rows) == 3 and set(rows[0]) >= {"image", "label", "prob", "labels", "probs"}
    assert out.stdout == ""


def test_cli_eval_zeroshot(model, model_dir, tmp_path):
    root = _imagefolder(tmp_path)
    out = _cli("eval-zeroshot", str(root), "--model", str(model_dir), "--templates", "none", "--batch-size", "4")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    clf = ZeroShotClassifier(model, LABELS, templates="none")
    expected = evaluate_folder(clf, root, progress=False, num_workers=0)
    assert report["top1"] == pytest.approx(expected["top1"]) and report["n_skipped"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify", "{imgs}", "--labels", ",,"], "label list is empty"),
        (["classify", "{imgs}", "--labels", "猫,狗,猫"], "duplicate labels"),
        (["classify", "{empty}", "--labels", "猫,狗"], "no images found"),
        (["classify", "{imgs}/nope.jpg", "--labels", "猫"], "no such image"),
        (["classify", "{imgs}"], "--labels"),
        (["classify", "{imgs}", "--labels", "猫", "--model", "ViT-Q-1"], "known models"),
        (["eval-zeroshot", "{empty}"], "label file"),
    ],
)
def test_cli_errors_are_one_line(model_dir, tmp_path, capsys, args, message):
    """In process for speed (the subprocess path is covered by test_cli_error_through_subprocess)."""
    from cnclip_vision.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _images(1)[0].save(imgs / "a.png")
    (tmp_path / "empty").mkdir()
    args = [a.format(imgs=imgs, empty=tmp_path / "empty") for a in args]
    if "--model" not in args:
        args += ["--model", str(model_dir)]
    assert main(["-q", *args]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], captured.err
    assert captured.out == ""


def test_cli_error_through_subprocess(tmp_path):
    out = _cli("classify", str(tmp_path), "--labels", "猫,狗")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("cnclip classify: error: no images found")
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_cli_help_is_complete():
    from cnclip_vision.cli import build_parser

    out = _cli("--help")
    assert out.returncode == 0
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for command, sub in subparsers.items():
        assert command in out.stdout and sub.description, command
        assert sub.format_help().startswith("usage: cnclip " + command)
        undocumented = [a.dest for a in sub._actions if not a.help]
        assert not undocumented, f"cnclip {command}: options without help: {undocumented}"


def test_calibrate_threshold_on_a_known_case():
    cosine = [0.40, 0.35, 0.31, 0.30, 0.22, 0.21, 0.18, 0.10]
    related = [1, 1, 0, 1, 0, 0, 1, 0]
    best = calibrate_threshold(cosine, related)
    # thresholds 0.40: P1 R.25 | 0.35: P1 R.5 | 0.31: P.67 R.5 | 0.30: P.75 R.75 F1 .75 | 0.18: P.57 R1 F1 .727
    assert best["threshold"] == pytest.approx(0.30) and best["f1"] == pytest.approx(0.75)
    strict = calibrate_threshold(cosine, related, min_precision=1.0)
    assert strict["threshold"] == pytest.approx(0.35) and strict["recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both related and unrelated"):
        calibrate_threshold([0.1, 0.2], [1, 1])
