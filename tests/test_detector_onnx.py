"""ONNX export of the detector: the vocabulary is an input (labels change without a new export), onnxruntime
matches PyTorch at image and vocabulary sizes other than the export example in every VLM mode, the text
encoder in the export encodes new labels, the check catches a mismatch, and bad arguments fail before work."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from cnclip_vision.cli import main
from cnclip_vision.cli import onnx as cli_onnx
from cnclip_vision.detection.export import (
    DETECTOR_CONFIG_NAME,
    DETECTOR_NAME,
    MIN_DETECTOR_OPSET,
    TOLERANCE,
    OnnxDetector,
    _check,
    _example_image,
    export_detector_onnx,
)
from cnclip_vision.detection.model import OpenVocabDetector
from cnclip_vision.detection.predictor import DetectionPredictor
from cnclip_vision.export.onnx import MIN_OPSET
from cnclip_vision.toy.world import CATEGORIES


@pytest.fixture(scope="module")
def detector():
    return OpenVocabDetector.from_pretrained("toy-detector")


@pytest.fixture(scope="module")
def crops_export(tmp_path_factory):
    """``cnclip export-onnx --detector toy-detector --vlm-mode crops`` (the mode with a second tower pass)."""
    out = tmp_path_factory.mktemp("detector-onnx")
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    try:
        code = main(["export-onnx", "--detector", "toy-detector", "--vlm-mode", "crops", "-o", str(out)])
    finally:
        capture.undo()
    assert code == 0
    return out, json.loads(buffer.getvalue())


def test_cli_export_files_report_and_config(crops_export):
    out, report = crops_export
    assert report["check"]["passed"] and report["check"]["detections_compared"] > 0
    assert json.loads((out / "export_report.json").read_text(encoding="utf-8")) == report
    assert set(report["files"]) == {p.name for p in out.iterdir()}  # nothing staged left behind
    assert {DETECTOR_NAME, DETECTOR_CONFIG_NAME, "text_encoder.onnx", "vocab.txt"} <= set(report["files"])
    config = json.loads((out / DETECTOR_CONFIG_NAME).read_text(encoding="utf-8"))
    assert config["vlm_mode"] == "crops" and config["score_threshold"] == 0.05
    assert config["templates"] and config["seen_categories"]
    sizes = {tuple(c["image"]) for c in report["check"]["cases"] if c["what"] == "detections"}
    classes = {c["classes"] for c in report["check"]["cases"]}
    assert len(sizes) == 3 and classes == {1, 7}  # none is the export example's 3 classes


def test_graph_inputs_are_dynamic(crops_export, detector):
    out, _ = crops_export
    graph = onnx.load(str(out / DETECTOR_NAME)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["image"] == [3, "height", "width"]
    assert dims["class_embeddings"] == ["classes", detector.embed_dim]
    assert dims["class_seen"] == ["classes"] and dims["score_threshold"] == []
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert outputs["boxes"][1] == 4 and isinstance(outputs["boxes"][0], str)


def _compare(actual: dict, expected: dict) -> None:
    assert actual["label_names"] == expected["label_names"]
    assert np.array_equal(actual["labels"], expected["labels"].numpy())
    for key in ("boxes", "scores", "embeddings"):
        np.testing.assert_allclose(actual[key], expected[key].numpy(), rtol=0, atol=TOLERANCE[key])


def test_new_vocabulary_without_a_new_export(crops_export, detector):
    """All 64 toy categories (the export saw 3) encoded by the exported text encoder, on new scenes and sizes."""
    out, _ = crops_export
    labels = [c.name for c in CATEGORIES]
    runner = OnnxDetector(out)
    runner.set_vocabulary(labels)
    predictor = DetectionPredictor(detector, score_threshold=0.3, vlm_mode="crops")
    vocabulary = predictor.set_vocabulary(labels)
    np.testing.assert_allclose(runner.class_embeddings, vocabulary.embeddings.numpy(), rtol=0, atol=1e-4)
    assert runner.class_seen.tolist() == vocabulary.seen.tolist() and 0 < runner.class_seen.sum() < len(labels)
    found = 0
    for seed, (height, width) in [(9001, (240, 256)), (9002, (256, 208)), (9003, (288, 352))]:
        image = _example_image(height, width, seed)
        (expected,) = predictor.predict([image])
        actual = runner.detect(image, score_threshold=0.3)
        _compare(actual, expected)
        found += len(actual["scores"])
    assert found >= 3  # the toy detector finds the toy objects: the comparison is not over empty lists


@pytest.mark.parametrize("mode", ["off", "dense"])
def test_other_vlm_modes(detector, tmp_path, mode):
    report = export_detector_onnx(detector, tmp_path, vlm_mode=mode, text_encoder=False, check_vocabulary_sizes=(5,))
    assert report["check"]["passed"] and "text_encoder.onnx" not in report["files"]
    inputs = {i.name for i in onnx.load(str(tmp_path / DETECTOR_NAME)).graph.input}
    # "off" never reads which classes were seen (no ensemble), so the graph has no such input
    assert ("class_seen" in inputs) == (mode != "off")
    runner = OnnxDetector(tmp_path)
    with pytest.raises(Exception, match="text encoder"):
        runner.set_vocabulary(["红色圆形"])
    predictor = DetectionPredictor(detector, score_threshold=0.05, vlm_mode=mode)
    vocabulary = predictor.set_vocabulary([c.name for c in CATEGORIES[:20]])
    runner.set_vocabulary(vocabulary.names, embeddings=vocabulary.embeddings.numpy())
    image = _example_image(230, 300, seed=4242)
    _compare(runner.detect(image), predictor.predict([image])[0])


def test_check_detects_a_mismatch(crops_export, detector):
    out, _ = crops_export
    other = copy.deepcopy(detector)
    with torch.no_grad():
        other.region_head.embed.weight.add_(0.01 * torch.randn_like(other.region_head.embed.weight))
    result = _check(other, out, [(200, 256)], [3], text_encoder=True)
    embeddings, detections = result["cases"]
    assert embeddings["passed"] and not detections["passed"] and not result["passed"]


def test_bad_arguments(detector, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_detector_onnx(detector, tmp_path / "a", opset=MIN_DETECTOR_OPSET - 1)
    with pytest.raises(ValueError, match="vlm_mode"):
        export_detector_onnx(detector, tmp_path / "a", vlm_mode="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="check_image_sizes"):
        export_detector_onnx(detector, tmp_path / "a", check_image_sizes=[(8, 300)])
    with pytest.raises(TypeError, match="OpenVocabDetector"):
        export_detector_onnx(detector.clip, tmp_path / "a")  # type: ignore[arg-type]
    half = copy.deepcopy(detector).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        export_detector_onnx(half, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "toy-tiny"], "--model"),
        (["--fp16"], "--fp16"),
        (["--opset", "17"], "opset"),
        (["--vlm-mode", "both"], "--vlm-mode"),
        (["--score-threshold", "2"], "--score-threshold"),
    ],
)
def test_cli_errors_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert main(["export-onnx", "--detector", "toy-detector", "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_detector_options_need_detector(tmp_path, capsys):
    assert main(["export-onnx", "--model", "toy-tiny", "--vlm-mode", "dense", "-o", str(tmp_path / "o")]) == 2
    assert "--detector" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_constants_match_the_library():
    """The CLI keeps its own copies so that --help imports nothing heavy."""
    assert (cli_onnx.MIN_OPSET, cli_onnx.MIN_DETECTOR_OPSET) == (MIN_OPSET, MIN_DETECTOR_OPSET)


def test_runner_refuses_other_directories(tmp_path):
    with pytest.raises(Exception, match=DETECTOR_CONFIG_NAME):
        OnnxDetector(tmp_path)
    (tmp_path / DETECTOR_CONFIG_NAME).write_text(json.dumps({"format": "something-else"}), encoding="utf-8")
    with pytest.raises(Exception, match="format"):
        OnnxDetector(tmp_path)


def test_traced_resize_sizes_match_eager(tmp_path):
    """The graph resizes every image to exactly the size eager PyTorch does, exact ratios included (800 -> 640 at
    image_size 640: torchvision's float32 tracing path gives 639 in onnxruntime, a padded last column)."""
    import onnxruntime as ort

    from cnclip_vision.detection.model import _Transform

    transform = _Transform(640, 640, [0.5] * 3, [0.25] * 3, size_divisible=32).eval()

    class Resize(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return transform.resize(image)[0]

    path = tmp_path / "resize.onnx"
    with torch.no_grad():
        torch.onnx.export(
            Resize(), (torch.rand(3, 427, 633),), str(path), dynamo=False, opset_version=18,
            input_names=["image"], dynamic_axes={"image": {1: "h", 2: "w"}},
        )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for height, width in [(800, 720), (720, 800), (800, 800), (1000, 720), (701, 900), (320, 288), (640, 639)]:
        image = _example_image(height, width, seed=height + width)
        (actual,) = session.run(None, {"image": image.numpy()})
        expected = Resize()(image).numpy()
        assert actual.shape == expected.shape, (height, width)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_full_size_vit_b16_dense(tmp_path):
    """ViT-B-16 at 640 px with random weights (real shapes: patch 16, no input resize, 1000 RPN proposals)."""
    from cnclip_vision.detection.model import DetectorConfig
    from cnclip_vision.models.factory import create_model

    torch.manual_seed(0)
    detector = OpenVocabDetector(create_model("ViT-B-16"), DetectorConfig(vlm_mode="dense"))
    report = export_detector_onnx(detector, tmp_path, score_threshold=0.0, check_vocabulary_sizes=(5,))
    check = report["check"]
    assert check["passed"] and check["detections_compared"] == 300  # 3 images x max_detections
    assert {tuple(c["image"]) for c in check["cases"] if "image" in c} == {(485, 640), (640, 403), (800, 720)}


def test_naclip_dense_export_is_refused(tmp_path):
    detector = OpenVocabDetector.from_pretrained("toy-detector", dense_mode="naclip")
    with pytest.raises(ValueError, match="naclip"):
        export_detector_onnx(detector, tmp_path / "n", vlm_mode="dense")
    assert not (tmp_path / "n").exists()
