"""Speed levers of `load` / `create_model`: precision (fp32 / bf16 / fp16 / int8) and torch.compile, each
against the fp32 model on the same weights."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import cnclip_vision
from cnclip_vision.cli import main

from .conftest import random_inputs, small_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    cnclip_vision.create_model(small_config("ViT-B-16")).save_pretrained(path)
    return path


def _features(model, config):
    pixels, ids, mask = random_inputs(config, n_images=4)
    with torch.inference_mode():
        return model.encode_image(pixels).float(), model.encode_text(ids, mask).float()


@pytest.mark.parametrize("precision, min_cosine", [("int8", 0.99), ("bf16", 0.99)])
def test_precision_keeps_the_embeddings(saved, precision, min_cosine):
    config = small_config("ViT-B-16")
    ref_image, ref_text = _features(cnclip_vision.load(saved), config)
    model = cnclip_vision.load(saved, precision=precision)
    image, text = _features(model, config)
    assert F.cosine_similarity(image, ref_image).min() >= min_cosine
    assert F.cosine_similarity(text, ref_text).min() >= min_cosine
    assert not torch.equal(image, ref_image)  # the lever really changed the computation
    if precision == "int8":
        linears = [m for m in model.modules() if type(m).__name__ == "Linear" and m.__module__.startswith("torch.ao")]
        assert linears, "no dynamically quantised Linear layer"
    else:
        assert model.dtype == torch.bfloat16


def test_create_model_takes_precision_too():
    model = cnclip_vision.create_model(small_config("ViT-B-16"), precision="int8")
    assert any("quantized" in type(m).__module__ for m in model.visual.modules())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(precision="fp16"), "needs a GPU"),
        (dict(precision="int4"), "allowed values"),
        (dict(precision="bf16", dtype="bf16"), "either dtype= or precision="),
    ],
)
def test_bad_precision(saved, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cnclip_vision.load(saved, **kwargs)


def test_cli_precision_int8(saved, capsys, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    assert (
        main(["-q", "classify", str(image), "--labels", "红色,蓝色", "--model", str(saved), "--precision", "int8"]) == 0
    )
    assert "红色" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile's CPU backend needs a C++ compiler",
)
def test_compile_gives_the_same_embeddings(saved):
    config = small_config("ViT-B-16")
    ref_image, ref_text = _features(cnclip_vision.load(saved), config)
    image, text = _features(cnclip_vision.load(saved, compile=True), config)
    torch.testing.assert_close(image, ref_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text, ref_text, atol=1e-4, rtol=1e-4)
