"""The detection commands of ``cnclip`` (``cnclip_vision.cli.main``): ``train-detector`` (recipe + flags),
``detect`` (pictures, JSON, several images, image queries, unreadable images), ``heatmap``,
``toy-detector-eval`` and ``toy-detector-export`` (into a temporary folder, never the package assets), and
the one-line errors with exit status 2."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cnclip_vision
from cnclip_vision.cli import main
from cnclip_vision.detection import ImageQuery, OpenVocabDetector
from cnclip_vision.detection.heatmap import similarity_map
from cnclip_vision.detection.visualize import draw_detections
from cnclip_vision.toy import world as toyworld
from cnclip_vision.toy.detector import TOY_DETECTOR_DIR

DETECTOR = dict(
    image_size=128,
    out_channels=32,
    levels="p3-p7",
    representation_size=64,
    rpn_pre_nms_top_n=(200, 100),
    rpn_post_nms_top_n=(100, 50),
    box_batch_size_per_image=32,
    crop_top_k=10,
    templates=["{}"],
)
BASE_NAMES = [c.name for c in sorted(toyworld.BASE_CATEGORIES, key=lambda c: c.id)]
LABELS = [toyworld.CATEGORIES[0].name, toyworld.CATEGORIES[9].name]  # 红色圆形, 橙色正方形
THRESHOLD = "0.001"  # a detector trained for two steps scores low; the contract holds at any threshold


def _assets_state() -> list[tuple[str, float]]:
    if not TOY_DETECTOR_DIR.exists():
        return []
    return sorted((p.name, p.stat().st_mtime) for p in TOY_DETECTOR_DIR.iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A detector trained for two steps by ``cnclip train-detector`` (recipe file + flags that win)."""
    root = tmp_path_factory.mktemp("cli-detector")
    annotations = toyworld.write_detection_set(root / "train", 8, seed=0, annotate=toyworld.BASE_CATEGORIES)
    recipe = root / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "clip": "toy-tiny",
                "detector": DETECTOR,
                "batch_size": 8,
                "max_steps": 100,
                "lr": 1e-3,
                "num_workers": 0,
                "log_every": 1,
            }
        ),
        encoding="utf-8",
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            [
                "-q",
                "train-detector",
                "--config",
                str(recipe),
                "--train-data",
                str(annotations),
                "--output-dir",
                str(root / "run"),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--categories",
                "base",
                "--device",
                "cpu",
            ]
        )
    assert code == 0
    return {
        "dir": root / "run" / "detector",
        "run": root / "run",
        "summary": json.loads(stdout.getvalue()),
        "images": sorted((root / "train" / "images").glob("*.png")),
        "coco": json.loads(annotations.read_text(encoding="utf-8")),
        "annotations": annotations,
    }


@pytest.fixture(scope="module")
def api_detector(trained) -> OpenVocabDetector:
    return OpenVocabDetector.from_pretrained(trained["dir"])


def run(capsys, *argv) -> tuple[int, str, str]:
    argv = tuple(str(a) for a in argv)
    if argv[0] in ("detect", "heatmap") and "--precision" not in argv:  # compared with the fp32 API (auto: bf16)
        argv += ("--precision", "fp32")
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith(f"cnclip {command}: error: ")
    return lines[0]


def check_records(records: list[dict], labels: list[str], threshold: float) -> None:
    for record in records:
        assert {"image", "width", "height", "detections"} <= set(record)
        scores = [d["score"] for d in record["detections"]]
        assert scores == sorted(scores, reverse=True)
        for d in record["detections"]:
            assert d["label"] in labels and labels[d["label_index"]] == d["label"]
            assert d["score"] >= threshold
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]


# ------------------------------------------------------------------------------------ train-detector
def test_train_detector_command(trained):
    summary = trained["summary"]
    assert summary["steps"] == 2  # --max-steps 2 wins over the recipe's 100
    assert summary["config"]["batch_size"] == 4 and summary["config"]["lr"] == 1e-3  # flag / recipe
    assert summary["config"]["categories"] == "base" and summary["config"]["progress"] is False
    assert summary["detector_dir"] == str(trained["dir"])
    assert (trained["run"] / "checkpoint.pt").is_file()
    metrics = [json.loads(ln) for ln in (trained["run"] / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    detector = OpenVocabDetector.from_pretrained(trained["dir"])
    assert detector.config.seen_categories == tuple(BASE_NAMES)
    assert detector.config.out_channels == DETECTOR["out_channels"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--output-dir", "OUT"], "--train-data"),
        ([], "--output-dir and --train-data"),
        (["--config", "MISSING"], "missing.json"),
        (["--config", "UNKNOWN"], "learning_rate"),
    ],
)
def test_train_detector_errors(capsys, tmp_path, argv, match):
    recipe = tmp_path / "unknown.json"
    recipe.write_text(json.dumps({"output_dir": str(tmp_path), "train_data": "x.json", "learning_rate": 1}))
    replace = {"OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing.json"), "UNKNOWN": str(recipe)}
    code, _, err = run(capsys, "train-detector", *[replace.get(a, a) for a in argv])
    assert code == 2
    assert match in error_line(err, "train-detector")


# -------------------------------------------------------------------------------------------- detect
def test_detect_picture_and_json(capsys, trained, api_detector, tmp_path):
    image = trained["images"][0]
    picture, out = tmp_path / "out.png", tmp_path / "det.json"
    code, stdout, _ = run(
        capsys,
        "detect",
        image,
        "--detector",
        trained["dir"],
        "--labels",
        ",".join(LABELS),
        "--draw",
        picture,
        "-o",
        out,
        "--score-threshold",
        THRESHOLD,
    )
    assert code == 0 and stdout == ""  # the JSON went to --json
    records = json.loads(out.read_text(encoding="utf-8"))
    assert len(records) == 1 and records[0]["image"] == str(image)
    assert (records[0]["width"], records[0]["height"]) == Image.open(image).size
    check_records(records, LABELS, float(THRESHOLD))
    detections = records[0]["detections"]
    assert detections, "no detections: the checks above were vacuous"

    expected = api_detector.predict(image, LABELS, score_threshold=float(THRESHOLD))[0]  # the library's answer
    assert [d["label"] for d in detections] == expected["label_names"]
    np.testing.assert_allclose([d["score"] for d in detections], expected["scores"].numpy(), atol=1e-4)
    np.testing.assert_allclose([d["box"] for d in detections], expected["boxes"].numpy(), atol=1e-2)

    with Image.open(picture) as drawn:
        assert drawn.format == "PNG"
        reference = draw_detections(Image.open(image).convert("RGB"), expected)
        assert drawn.size == reference.size
        assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(reference))
    assert not np.array_equal(
        np.asarray(reference),
        np.asarray(draw_detections(Image.open(image).convert("RGB"), {"boxes": torch.zeros(0, 4), "label_names": []})),
    )  # boxes were drawn


def test_detect_json_on_stdout_and_vlm_mode(capsys, trained):
    image = trained["images"][1]
    for mode in ("dense", "off"):  # "crops", the default, is run by the other tests
        code, stdout, _ = run(
            capsys,
            "detect",
            image,
            "--detector",
            trained["dir"],
            "--labels",
            ",".join(LABELS),
            "--vlm-mode",
            mode,
            "--score-threshold",
            THRESHOLD,
            "--max-detections",
            "3",
        )
        assert code == 0
        records = json.loads(stdout)
        check_records(records, LABELS, float(THRESHOLD))
        assert 0 < len(records[0]["detections"]) <= 3


def test_detect_several_images_into_a_folder(capsys, trained, tmp_path):
    images = trained["images"][:2]
    folder, out = tmp_path / "pictures", tmp_path / "det.json"
    code, _, _ = run(
        capsys,
        "detect",
        *images,
        "--detector",
        trained["dir"],
        "--labels",
        "，".join(LABELS),  # full-width comma
        "--draw",
        folder,
        "-o",
        out,
        "--score-threshold",
        THRESHOLD,
    )
    assert code == 0
    records = json.loads(out.read_text(encoding="utf-8"))
    assert [r["image"] for r in records] == [str(p) for p in images]
    check_records(records, LABELS, float(THRESHOLD))
    assert sorted(p.name for p in folder.iterdir()) == [p.stem + ".png" for p in images]
    for p in folder.iterdir():
        with Image.open(p) as picture:
            assert picture.format == "PNG"


def test_detect_class_agnostic_nms(capsys, trained):
    from torchvision.ops import box_iou

    argv = ["detect", trained["images"][0], "--detector", trained["dir"], "--labels", ",".join(BASE_NAMES[:8])]
    argv += ["--score-threshold", THRESHOLD]

    def boxes(*extra) -> torch.Tensor:
        code, stdout, _ = run(capsys, *argv, *extra)
        assert code == 0
        return torch.tensor([d["box"] for d in json.loads(stdout)[0]["detections"]]).reshape(-1, 4)

    def worst_overlap(b: torch.Tensor) -> float:
        iou = box_iou(b, b).fill_diagonal_(0)
        return float(iou.max()) if len(b) > 1 else 0.0

    plain, agnostic = boxes(), boxes("--agnostic-nms", "0.3")
    assert worst_overlap(plain) > 0.3, "no overlapping boxes of different labels: the check below would be vacuous"
    assert worst_overlap(agnostic) <= 0.3 + 1e-6 and 0 < len(agnostic) < len(plain)
    for option in ("--agnostic-nms", "--score-threshold", "--nms-threshold"):
        code, _, err = run(capsys, *argv, option, "1.5")  # a usage error, before the detector loads
        assert code == 2
        assert f"argument {option}: expected a number in [0, 1], got 1.5" in error_line(err, "detect")


def test_detect_one_picture_for_several_images(capsys, trained, tmp_path):
    code, _, err = run(
        capsys,
        "detect",
        *trained["images"][:2],
        "--detector",
        trained["dir"],
        "--labels",
        LABELS[0],
        "--draw",
        tmp_path / "one.png",
    )
    assert code == 2
    assert "pass a folder" in error_line(err, "detect")


def test_detect_query(capsys, trained, api_detector, tmp_path):
    image = trained["images"][0]
    ann = next(a for a in trained["coco"]["annotations"] if a["image_id"] == 1)
    x, y, w, h = ann["bbox"]
    box = (x, y, x + w, y + h)
    out = tmp_path / "q.json"
    query = f"样例={image}@{','.join(str(v) for v in box)}"
    code, _, _ = run(
        capsys,
        "detect",
        image,
        "--detector",
        trained["dir"],
        "--labels",
        LABELS[0],
        "--query",
        query,
        "-o",
        out,
        "--score-threshold",
        THRESHOLD,
    )
    assert code == 0
    records = json.loads(out.read_text(encoding="utf-8"))
    check_records(records, [LABELS[0], "样例"], float(THRESHOLD))
    expected = api_detector.predict(
        image, [LABELS[0], ImageQuery(str(image), "样例", box)], score_threshold=float(THRESHOLD)
    )[0]
    assert [d["label"] for d in records[0]["detections"]] == expected["label_names"]
    np.testing.assert_allclose([d["score"] for d in records[0]["detections"]], expected["scores"].numpy(), atol=1e-4)

    code, stdout, _ = run(
        capsys,
        "detect",
        image,
        "--detector",
        trained["dir"],
        "--query",
        f"整图={image}",
        "--score-threshold",
        THRESHOLD,
    )  # a query alone, without a box
    assert code == 0
    check_records(json.loads(stdout), ["整图"], float(THRESHOLD))


def test_detect_query_path_with_at_sign(capsys, trained, tmp_path):
    """ "logo@2x.png" is a common file name: without a box after it, the "@" belongs to the path."""
    image = tmp_path / "logo@2x.png"
    image.write_bytes(trained["images"][0].read_bytes())
    code, stdout, err = run(
        capsys,
        "detect",
        trained["images"][0],
        "--detector",
        trained["dir"],
        "--query",
        f"标志={image}",
        "--score-threshold",
        THRESHOLD,
    )
    assert code == 0, err
    check_records(json.loads(stdout), ["标志"], float(THRESHOLD))


@pytest.mark.parametrize(
    "query, match",
    [
        ("样例", "NAME=IMAGE"),
        ("=IMG", "NAME=IMAGE"),
        ("样例=MISSING", "does not exist"),
        ("样例=IMG@1,2,3", "four numbers"),
        ("样例=IMG@a,b,c,d", "four numbers"),
        ("样例=IMG@5,5,5,30", "zero size"),
    ],
)
def test_detect_bad_query(capsys, trained, tmp_path, query, match):
    query = query.replace("IMG", str(trained["images"][0])).replace("MISSING", str(tmp_path / "missing.png"))
    code, _, err = run(capsys, "detect", trained["images"][0], "--detector", trained["dir"], "--query", query)
    assert code == 2
    assert match in error_line(err, "detect")


def test_detect_skips_unreadable_images(capsys, caplog, trained, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    good = trained["images"][0]
    out = tmp_path / "det.json"
    with caplog.at_level(logging.WARNING):
        code, _, _ = run(capsys, "detect", bad, good, "--detector", trained["dir"], "--labels", LABELS[0], "-o", out)
    assert code == 0
    assert [r["image"] for r in json.loads(out.read_text(encoding="utf-8"))] == [str(good)]
    assert any("bad.png" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_detect_all_images_unreadable(capsys, trained, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "det.json"
    code, _, err = run(
        capsys,
        "detect",
        bad,
        tmp_path / "missing.jpg",
        "--detector",
        trained["dir"],
        "--labels",
        LABELS[0],
        "-o",
        out,
    )
    assert code == 2
    assert "none of the 2 images could be read" in error_line(err, "detect")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--labels", ","], "empty"),
        (["--labels", " ，, "], "empty"),
        ([], "--labels"),
        (["--labels", "猫,猫"], "duplicate"),
        (["--labels", "猫", "--detector", "NO_DETECTOR"], "detector_config.json"),
    ],
)
def test_detect_errors(capsys, trained, tmp_path, argv, match):
    argv = [str(tmp_path / "nothing-here") if a == "NO_DETECTOR" else a for a in argv]
    if "--detector" not in argv:
        argv += ["--detector", str(trained["dir"])]
    code, _, err = run(capsys, "detect", trained["images"][0], *argv)
    assert code == 2
    assert match in error_line(err, "detect")


# ------------------------------------------------------------------------------------------- heatmap
@pytest.fixture(scope="module")
def clip():
    return cnclip_vision.load("toy-tiny")


def test_heatmap(capsys, clip, trained, tmp_path):
    image = trained["images"][0]
    picture, out = tmp_path / "heat.png", tmp_path / "heat.json"
    code, _, _ = run(
        capsys, "heatmap", image, "--model", "toy-tiny", "--labels", LABELS[0], "--draw", picture, "-o", out
    )
    assert code == 0
    grid = clip.image_size // clip.config.vision.patch_size
    records = json.loads(out.read_text(encoding="utf-8"))
    assert len(records) == 1
    record = records[0]
    assert record["label"] == LABELS[0] and record["picture"] == str(picture)
    assert record["grid"] == [grid, grid]
    assert all(0 <= c < grid for c in record["peak_cell"])
    heat = similarity_map(clip, image, [LABELS[0]])[0]  # what the command should report
    assert record["max_cosine"] == pytest.approx(float(heat.max()), abs=1e-3)
    assert heat[tuple(record["peak_cell"])] == pytest.approx(float(heat.max()), abs=1e-6)
    with Image.open(picture) as p:
        assert p.format == "PNG"


def test_heatmap_several_labels_and_size(capsys, clip, trained, tmp_path):
    picture = tmp_path / "heat.png"
    code, stdout, _ = run(
        capsys,
        "heatmap",
        trained["images"][0],
        "--model",
        "toy-tiny",
        "--labels",
        ",".join(LABELS),
        "--draw",
        picture,
        "--size",
        "96",
    )
    assert code == 0
    records = json.loads(stdout)
    grid = 96 // clip.config.vision.patch_size
    assert [r["label"] for r in records] == LABELS
    assert [r["grid"] for r in records] == [[grid, grid]] * 2
    assert [Path(r["picture"]).name for r in records] == ["heat_0.png", "heat_1.png"]
    assert all(Path(r["picture"]).is_file() for r in records)


@pytest.mark.parametrize(
    "argv, match", [(["--labels", ","], "empty"), (["--labels", "猫", "--size", "50"], "multiple")]
)
def test_heatmap_errors(capsys, trained, tmp_path, argv, match):
    code, _, err = run(
        capsys, "heatmap", trained["images"][0], "--model", "toy-tiny", "--draw", tmp_path / "h.png", *argv
    )
    assert code == 2
    assert match in error_line(err, "heatmap")


def test_heatmap_picture_option_errors_before_loading(capsys, trained, tmp_path):
    """--draw must be a picture file in an existing folder: a .txt, a folder or a missing folder is one line,
    before any model loads (the old KeyError 'TXT' and the leaked '.tmp' suffix)."""
    (tmp_path / "somedir").mkdir()
    cases = [
        (tmp_path / "out.txt", "expected a picture file name"),
        (f"{tmp_path / 'somedir'}/", "is a folder"),
        (tmp_path / "nowhere" / "h.png", "does not exist"),
    ]
    for draw, match in cases:
        code, _, err = run(
            capsys, "heatmap", trained["images"][0], "--model", "NOT_LOADED", "--labels", "猫", "--draw", draw
        )
        assert code == 2
        line = error_line(err, "heatmap")
        assert match in line and ".tmp" not in line, line
    code, _, err = run(
        capsys,
        "heatmap",
        trained["images"][0],
        "--labels",
        "猫",
        "--draw",
        tmp_path / "h.png",
        "-o",
        tmp_path / "h.png",
    )
    assert code == 2 and "--draw" in error_line(err, "heatmap")


def test_detect_folder_input_and_csv_rows(capsys, trained, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in trained["images"][:2]:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    argv = [
        "detect",
        folder,
        "--detector",
        trained["dir"],
        "--labels",
        ",".join(LABELS),
        "--score-threshold",
        THRESHOLD,
    ]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0
    records = json.loads(stdout)
    assert [Path(r["image"]).name for r in records] == sorted(Path(p).name for p in trained["images"][:2])
    code, stdout, _ = run(capsys, *argv, "--format", "csv")
    assert code == 0
    lines = stdout.strip().splitlines()
    assert lines[0] == "image,width,height,label,score,x1,y1,x2,y2"
    assert len(lines) - 1 == sum(len(r["detections"]) for r in records) > 0
    code, _, err = run(capsys, *argv, "-o", tmp_path / "boxes.png")  # the old meaning of -o
    assert code == 2 and "draw pictures with --draw" in error_line(err, "detect")


def test_detect_writes_coco_results(capsys, trained, api_detector, tmp_path):
    """``detect --format coco`` = the COCO results ``eval-coco --detector`` scores: same AP on the same images."""
    from cnclip_vision.detection.inference import detect_coco

    annotations = trained["annotations"]
    out = tmp_path / "results.json"
    argv = ["detect", annotations.parent / "images", "--model", trained["dir"], "--batch-size", "3"]
    code, _, _ = run(capsys, *argv, "--format", "coco", "--annotations", annotations, "-o", out)
    assert code == 0
    ours = json.loads(out.read_text(encoding="utf-8"))
    reference, _ = detect_coco(api_detector, annotations, progress=False)
    ours_sorted, ref_sorted = (
        sorted(r, key=lambda d: (d["image_id"], d["category_id"], d["score"])) for r in (ours, reference)
    )
    assert [(d["image_id"], d["category_id"]) for d in ours_sorted] == [
        (d["image_id"], d["category_id"]) for d in ref_sorted
    ]
    assert [d["score"] for d in ours_sorted] == pytest.approx([d["score"] for d in ref_sorted], abs=1e-4)
    file_of = {img["id"]: img["file_name"] for img in trained["coco"]["images"]}
    assert {file_of[r["image_id"]] for r in ours} <= {p.name for p in trained["images"]}
    metrics = []
    for results in (out, tmp_path / "reference.json"):
        results.write_text(json.dumps(reference), encoding="utf-8") if results != out else None
        code, stdout, _ = run(capsys, "eval-coco", "--ground-truth", annotations, "--results", results)
        assert code == 0
        metrics.append(json.loads(stdout))
    assert metrics[0]["AP50"] == pytest.approx(metrics[1]["AP50"], abs=1e-3)
    # labels given: a subset of the file's categories, ids from the file
    code, stdout, _ = run(capsys, *argv[:2], "--detector", trained["dir"], "--format", "coco",
                          "--annotations", annotations, "--labels", LABELS[0])  # fmt: skip
    assert code == 0
    wanted = next(c["id"] for c in trained["coco"]["categories"] if c["name"] == LABELS[0])
    assert {r["category_id"] for r in json.loads(stdout)} <= {wanted}


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--format", "coco"], "--annotations"),
        (["--format", "coco", "--annotations", "ANN", "--labels", "猫"], "not categories of the file"),
        (["--format", "coco", "--annotations", "ANN", "--query", "q=IMG"], "no category id"),
        (["--annotations", "ANN"], "--format coco only"),
        (["--format", "coco", "--annotations", "OTHER"], "no image record has the file name"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_detect_coco_errors(capsys, trained, tmp_path, extra, match):
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps({**trained["coco"], "images": [{**trained["coco"]["images"][0], "file_name": "x.png"}]})
    )
    swap = {"ANN": trained["annotations"], "OTHER": other, "q=IMG": f"q={trained['images'][0]}"}
    argv = ["detect", trained["images"][0], "--model", trained["dir"], *[swap.get(a, a) for a in extra]]
    code, _, err = run(capsys, *argv)
    assert code == 2 and match in error_line(err, "detect")


def test_eval_coco_names_the_option_for_detect_output(capsys, trained, tmp_path):
    records = tmp_path / "detect.json"
    code, _, _ = run(capsys, "detect", trained["images"][0], "--model", trained["dir"], "--labels", LABELS[0],
                     "-o", records)  # fmt: skip
    assert code == 0
    code, _, err = run(capsys, "eval-coco", "--ground-truth", trained["annotations"], "--results", records)
    assert code == 2 and "--format coco --annotations" in error_line(err, "eval-coco")


# ------------------------------------------------------------------------------------ toy detector
def test_toy_detector_export(capsys, trained, api_detector, tmp_path):
    before = _assets_state()
    dst = tmp_path / "exported"
    code, _, _ = run(capsys, "toy-detector-export", trained["dir"], "--dst", dst, "-o", tmp_path / "export.json")
    assert code == 0
    assert _assets_state() == before, "the package assets were touched"
    assert json.loads((tmp_path / "export.json").read_text(encoding="utf-8"))[0]["exported"] == str(dst)
    stored = load_file(dst / "detector.safetensors")
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    exported = OpenVocabDetector.from_pretrained(dst)
    assert exported.config.clip == "toy-tiny" and exported.config.seen_categories == tuple(BASE_NAMES)
    for k, v in api_detector.head_state_dict().items():
        torch.testing.assert_close(exported.head_state_dict()[k], v, atol=2e-3, rtol=2e-3)
    assert exported.config.vlm_mode == api_detector.config.vlm_mode  # as trained
    other_mode = next(m for m in ("crops", "off") if m != api_detector.config.vlm_mode)
    code, _, _ = run(capsys, "toy-detector-export", trained["dir"], "--dst", dst, "--vlm-mode", other_mode)
    assert code == 0 and OpenVocabDetector.from_pretrained(dst).config.vlm_mode == other_mode

    other = tmp_path / "on-a-copied-clip"
    api_detector.save_pretrained(other, include_clip=True)  # sits on "clip", not on toy-tiny
    code, _, err = run(capsys, "toy-detector-export", other, "--dst", tmp_path / "nope")
    assert code == 2
    assert "toy-tiny" in error_line(err, "toy-detector-export")
    assert _assets_state() == before


def test_toy_detector_eval(capsys, trained, tmp_path):
    report_path = tmp_path / "report.json"
    code, _, err = run(
        capsys,
        "-q",
        "toy-detector-eval",
        "--detector",
        trained["dir"],
        "--n",
        "2",
        "--data-dir",
        tmp_path / "data",
        "--seed",
        "3",
        "-o",
        report_path,
        "--check",
    )
    assert code == 2  # two training steps cannot reach the quality bars
    assert "quality bars" in error_line(err, "toy-detector-eval")
    report = json.loads(report_path.read_text(encoding="utf-8"))  # written before the check
    assert report["passes"] is False
    assert report["annotations"] == str(tmp_path / "data" / "val" / "annotations.json")
    assert set(report["modes"]) == {"crops", "dense", "off"}
    for metrics in [*report["modes"].values(), report["random_novel_embeddings"]]:
        assert all(-1 <= metrics[k] <= 1 for k in ("AP50", "AP50_base", "AP50_novel"))


def test_toy_detector_eval_refuses_a_protocol_the_detector_saw_boxes_of(capsys, tmp_path):
    """The shipped detector was trained on boxes of compositional-base categories, among them every colour of the
    held-out shapes: evaluating it as if they were novel would report transfer that never happened."""
    args = ("toy-detector-eval", "--n", "2", "--data-dir", tmp_path / "d", "--protocol", "held-out-shapes")
    code, _, err = run(capsys, "-q", *args, "--detector", "toy-detector")
    assert code == 2
    assert "marks novel" in error_line(err, "toy-detector-eval")
    code, out, _ = run(
        capsys, "-q", "toy-data", "detection", tmp_path / "c", "--n", "2", "--protocol", "held-out-colours"
    )
    assert code == 0 and json.loads(out)[0]["protocol"] == "held-out-colours"
    annotations = tmp_path / "c" / "annotations.json"
    code, _, err = run(capsys, "-q", "toy-detector-eval", "--annotations", annotations, "--protocol", "compositional")
    assert code == 2
    assert "'held-out-colours'" in error_line(err, "toy-detector-eval")


def test_protocol_choices_are_the_worlds():
    """The CLI lists the protocols without importing the toy world (fast --help); the lists must agree."""
    parser = cnclip_vision.cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("toy-data", "toy-detector-eval"):
        action = next(a for a in sub[command]._actions if a.dest == "protocol")
        assert tuple(action.choices) == tuple(toyworld.PROTOCOLS), command
