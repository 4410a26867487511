"""ONNX export: onnxruntime against PyTorch at shapes other than the export example, the files a user
needs without this package, fp16, the ``cnclip export-onnx`` command and its errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import cnclip_vision
from cnclip_vision.cli import main
from cnclip_vision.errors import CNClipError
from cnclip_vision.export.onnx import FP16_MIN_COSINE, FP32_MAX_ABS_DIFF, OnnxDependencyError, _check, export_onnx
from cnclip_vision.models.configs import CLIPConfig, TextConfig, VisionConfig

SMALL_VIT = CLIPConfig(
    embed_dim=48,
    vision=VisionConfig(image_size=224, width=128, layers=2, heads=2, patch_size=16),
    text=TextConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256),
)
EXPORTED = {
    "image_encoder.onnx",
    "text_encoder.onnx",
    "onnx_config.json",
    "export_report.json",
    "vocab.txt",
    "tokenizer_config.json",
    "preprocessor_config.json",
}


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _texts(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] ... [SEP] rows of different lengths, zero-padded to ``length``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(672, 21128, (batch, length), generator=g)
    for row in range(batch):
        n = max(2, length - row * max(1, length // batch))
        ids[row, 0], ids[row, n - 1] = 101, 102
        ids[row, n:] = 0
    return ids, (ids != 0).long()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def toy_model():
    return cnclip_vision.load("toy-tiny")


@pytest.fixture(scope="module")
def toy_export(toy_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy-onnx")
    return directory, export_onnx(toy_model, directory, source="toy-tiny")


@pytest.fixture(scope="module")
def small_vit():
    torch.manual_seed(0)
    return cnclip_vision.create_model(SMALL_VIT)


def test_files_report_and_config(toy_export, toy_model):
    directory, report = toy_export
    assert EXPORTED <= {p.name for p in directory.iterdir()}
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert json.loads((directory / "export_report.json").read_text(encoding="utf-8")) == report
    assert report["dtype"] == "float32" and report["opset"] >= 17 and report["source"] == "toy-tiny"
    check = report["check"]
    assert check["passed"] and check["tolerance"] == {"max_abs_diff": FP32_MAX_ABS_DIFF}
    assert check["max_abs_diff"] <= 1e-4
    shapes = {(c["encoder"], tuple(c["shape"][:2])) for c in check["cases"]}
    assert shapes == {("image", (1, 3)), ("image", (3, 3)), ("text", (1, 5)), ("text", (4, 13))}
    assert all(c["padded_rows"] > 0 for c in check["cases"] if c["encoder"] == "text" and c["shape"][0] > 1)

    config = json.loads((directory / "onnx_config.json").read_text(encoding="utf-8"))
    assert config["image_size"] == 48 and config["embed_dim"] == 128 and config["context_length"] == 52
    assert config["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert config["image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert config["dtype"] == "float32" and config["opset"] == report["opset"]
    assert config["model_config"] == toy_model.config.to_dict()
    assert config["tokenizer"]["cls_token_id"] == 101 and config["tokenizer"]["pad_token_id"] == 0
    assert config["logit_scale"] == pytest.approx(float(toy_model.logit_scale.detach().exp()), rel=1e-6)
    assert config["image_encoder"]["inputs"] == [
        {"name": "pixel_values", "shape": ["batch", 3, 48, 48], "dtype": "float32"}
    ]
    assert (directory / "vocab.txt").read_bytes() == cnclip_vision.get_tokenizer().vocab_path.read_bytes()
    processor = cnclip_vision.Processor.from_pretrained(directory)
    assert processor.image_size == 48


def test_axes_are_dynamic_in_the_graph(toy_export):
    directory, _ = toy_export
    for name, dynamic in (
        ("image_encoder.onnx", {"pixel_values": [0]}),
        ("text_encoder.onnx", {"input_ids": [0, 1], "attention_mask": [0, 1]}),
    ):
        graph = onnx.load(str(directory / name), load_external_data=False).graph
        assert (
            min(
                op.version
                for op in onnx.load(str(directory / name), load_external_data=False).opset_import
                if op.domain in ("", "ai.onnx")
            )
            >= 17
        )
        for tensor in graph.input:
            dims = tensor.type.tensor_type.shape.dim
            for axis in dynamic[tensor.name]:
                assert dims[axis].dim_param and not dims[axis].HasField("dim_value"), (name, tensor.name, axis)
        (output,) = graph.output
        assert output.type.tensor_type.shape.dim[0].dim_param


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_image_encoder_matches_pytorch(toy_export, toy_model, batch):
    directory, _ = toy_export
    pixels = torch.randn(batch, 3, 48, 48, generator=torch.Generator().manual_seed(batch))
    (actual,) = _session(directory / "image_encoder.onnx").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = toy_model.encode_image(pixels).numpy()
    assert actual.shape == (batch, 128) and actual.dtype == np.float32
    assert np.abs(actual - expected).max() <= 1e-4


@pytest.mark.parametrize(("batch", "length"), [(1, 2), (2, 9), (6, 30), (3, 52), (2, 100)])
def test_text_encoder_matches_pytorch(toy_export, toy_model, batch, length):
    directory, _ = toy_export
    ids, mask = _texts(batch, length, seed=length)
    (actual,) = _session(directory / "text_encoder.onnx").run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    with torch.no_grad():
        expected = toy_model.encode_text(ids, mask).numpy()
    assert actual.shape == (batch, 128)
    assert np.abs(actual - expected).max() <= 1e-4


def test_real_tokenizer_and_padding_length(toy_export, toy_model):
    """Tokenizer output padded to the longest text or to 52 gives the same ONNX embeddings as PyTorch."""
    directory, _ = toy_export
    session = _session(directory / "text_encoder.onnx")
    texts = ["红色的圆形", "一个蓝色的正方形在绿色三角形的左边", "猫"]
    tokenizer = cnclip_vision.get_tokenizer()
    outputs = []
    for padding in ("longest", "max_length"):
        enc = tokenizer(texts, padding=padding, return_tensors="np")
        outputs.append(session.run(None, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})[0])
    with torch.no_grad():
        expected = toy_model.encode_text(cnclip_vision.tokenize(texts)).numpy()
    assert np.abs(outputs[0] - outputs[1]).max() <= 1e-4
    assert np.abs(outputs[1] - expected).max() <= 1e-4


def test_small_vit_224(small_vit, tmp_path):
    small_vit.train()  # export and check run in eval mode; the caller's mode is restored
    report = export_onnx(small_vit, tmp_path, image_batch_sizes=(1, 4), text_shapes=((3, 20),))
    assert small_vit.training and all(m.training for m in small_vit.modules())
    small_vit.eval()
    assert report["check"]["passed"] and report["check"]["max_abs_diff"] <= 1e-4
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    ids, mask = _texts(5, 17, seed=5)
    (image,) = _session(tmp_path / "image_encoder.onnx").run(None, {"pixel_values": pixels.numpy()})
    (text,) = _session(tmp_path / "text_encoder.onnx").run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    with torch.no_grad():
        assert np.abs(image - small_vit.encode_image(pixels).numpy()).max() <= 1e-4
        assert np.abs(text - small_vit.encode_text(ids, mask).numpy()).max() <= 1e-4
    assert image.shape == (3, 48) and text.shape == (5, 48)


def test_fp16_export(toy_model, tmp_path):
    report = export_onnx(toy_model, tmp_path, fp16=True)
    check = report["check"]
    assert report["dtype"] == "float16" and check["passed"]
    assert check["tolerance"] == {"min_cosine": FP16_MIN_COSINE} and check["min_cosine"] >= 0.999
    assert report["image_encoder"]["bytes"] < 0.6 * 4 * sum(p.numel() for p in toy_model.visual.parameters())
    image_session = _session(tmp_path / "image_encoder.onnx")
    assert image_session.get_inputs()[0].type == "tensor(float16)"
    pixels = torch.randn(5, 3, 48, 48, generator=torch.Generator().manual_seed(7))
    (image,) = image_session.run(None, {"pixel_values": pixels.numpy().astype(np.float16)})
    ids, mask = _texts(3, 11, seed=11)
    (text,) = _session(tmp_path / "text_encoder.onnx").run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    assert image.dtype == np.float16 and text.dtype == np.float16
    with torch.no_grad():
        assert _cosine(image, toy_model.encode_image(pixels).numpy()).min() >= FP16_MIN_COSINE
        assert _cosine(text, toy_model.encode_text(ids, mask).numpy()).min() >= FP16_MIN_COSINE
    assert toy_model.dtype == torch.float32  # the half copy is not the caller's model


def test_check_detects_a_mismatch(toy_export, toy_model):
    directory, _ = toy_export
    import copy

    other = copy.deepcopy(toy_model)
    with torch.no_grad():
        other.text_projection.weight.mul_(1.01)
    result = _check(other, directory, fp16=False, image_batch_sizes=(2,), text_shapes=((2, 6),))
    image, text = result["cases"]
    assert not result["passed"] and image["passed"] and not text["passed"]


def test_cli(tmp_path, capsys):
    assert main(["export-onnx", "--model", "toy-tiny", "--output", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["check"]["passed"] and report["check"]["max_abs_diff"] <= 1e-4
    assert report["output_dir"] == str(tmp_path.resolve()) and report["source"] == "toy-tiny"
    assert json.loads((tmp_path / "export_report.json").read_text(encoding="utf-8")) == report
    assert EXPORTED <= {p.name for p in tmp_path.iterdir()}


def test_cli_user_errors(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for output in (blocker, blocker / "sub"):
        assert main(["export-onnx", "--model", "toy-tiny", "--output", str(output)]) == 2
        assert "output" in capsys.readouterr().err
    assert main(["export-onnx", "--model", "no-such-model", "--output", str(tmp_path / "o")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["export-onnx", "--model", "toy-tiny", "--output", str(tmp_path / "o"), "--opset", "13"]) == 2
    assert "opset" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_onnxruntime(toy_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(OnnxDependencyError, match=r"cnclip-vision\[onnx\]") as info:
        export_onnx(toy_model, tmp_path / "x")
    assert isinstance(info.value, ImportError) and isinstance(info.value, CNClipError)
    assert main(["export-onnx", "--model", "toy-tiny", "--output", str(tmp_path / "x")]) == 2
    assert "pip install" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_arguments(toy_model, tmp_path):
    with pytest.raises(ValueError, match="float32"):
        export_onnx(cnclip_vision.load("toy-tiny", dtype="bf16"), tmp_path)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(toy_model, tmp_path, opset=16)
    with pytest.raises(ValueError, match="text_shapes"):
        export_onnx(toy_model, tmp_path, text_shapes=((2, 600),))
    with pytest.raises(TypeError):
        export_onnx(toy_model.visual, tmp_path)


def test_rn50_image_encoder(tmp_path):
    """The ModifiedResNet-50 (timm ByobNet, attention pool) image tower exports with a dynamic batch.

    Only the image tower: the RBT3 text tower is the BERT code path tested above. The exporter cannot
    convert this graph down to opset 17 and keeps 18, which the info reports."""
    from cnclip_vision.export.onnx import _export_one, _ImageEncoder

    torch.manual_seed(0)
    model = cnclip_vision.create_model("RN50")
    example = torch.randn(2, 3, 224, 224)
    dynamic = {"pixel_values": {0: torch.export.Dim("batch")}}
    info = _export_one(
        _ImageEncoder(model).eval(),
        (example,),
        tmp_path / "image_encoder.onnx",
        input_names=["pixel_values"],
        output_name="image_embeds",
        dynamic_shapes=dynamic,
        opset=17,
        weight_bytes=0,
    )
    assert info["opset"] >= 17 and info["file"] == "image_encoder.onnx"
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    (actual,) = _session(tmp_path / "image_encoder.onnx").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = model.encode_image(pixels).numpy()
    assert actual.shape == (3, 1024)
    assert np.abs(actual - expected).max() <= 1e-4 and _cosine(actual, expected).min() > 0.99999
