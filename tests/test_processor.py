"""Processor: Hub-format directories in and out, transformers' ChineseCLIPProcessor reads what we write."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cnclip_vision.data.processor import Processor
from cnclip_vision.data.tokenizer import VOCAB_PATH, tokenize
from cnclip_vision.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_transform

HUB_CONFIG = {
    "crop_size": 224,
    "do_center_crop": False,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ChineseCLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": {"height": 224, "width": 224},
}
TEXTS = ["一只猫", "在沙发上睡觉的狗", "A photo of an e-bike 电动车", "ＡＢＣ１２３，。！", "🐱 café"]


def _image(width: int = 320, height: int = 240) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    array = np.stack([x, y, 1 - x], -1) * 255 + rng.normal(0, 15, (height, width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _model_dir(tmp_path, config: dict, vocab: bool = True):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    if vocab:
        (tmp_path / "vocab.txt").write_bytes(VOCAB_PATH.read_bytes())
    return tmp_path


def test_save_pretrained_writes_the_hub_format(tmp_path):
    Processor().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()) == HUB_CONFIG
    assert (tmp_path / "vocab.txt").read_bytes() == VOCAB_PATH.read_bytes()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": 512,
    }


def test_round_trip(tmp_path):
    processor = Processor(image_size=336)
    processor.save_pretrained(tmp_path / "a")
    loaded = Processor.from_pretrained(tmp_path / "a")
    assert loaded.image_size == 336 and loaded.tokenizer.vocab_path == tmp_path / "a" / "vocab.txt"
    assert loaded.image_transform.mean == OPENAI_CLIP_MEAN and loaded.image_transform.std == OPENAI_CLIP_STD
    a, b = processor(images=[_image()], text=TEXTS), loaded(images=[_image()], text=TEXTS)
    assert a.keys() == b.keys() == {"pixel_values", "input_ids", "attention_mask"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded.save_pretrained(tmp_path / "a")  # saving over its own directory keeps the vocab
    assert (tmp_path / "a" / "vocab.txt").read_bytes() == VOCAB_PATH.read_bytes()


def test_transformers_reads_the_saved_directory(tmp_path):
    from transformers import ChineseCLIPProcessor

    Processor().save_pretrained(tmp_path)
    theirs = ChineseCLIPProcessor.from_pretrained(tmp_path)
    ours = Processor.from_pretrained(tmp_path)
    hf = theirs(text=TEXTS, images=[_image()], padding=True, return_tensors="pt")
    out = ours(text=TEXTS, images=[_image()])
    assert torch.equal(hf["input_ids"], out["input_ids"])
    assert torch.equal(hf["attention_mask"], out["attention_mask"])
    assert (hf["pixel_values"] - out["pixel_values"]).abs().max() < 0.05  # torchvision vs PIL resize
    fixed = theirs(text=TEXTS, padding="max_length", max_length=52, truncation=True, return_tensors="pt")
    assert torch.equal(fixed["input_ids"], tokenize(TEXTS))


@pytest.mark.parametrize("size", [{"height": 336, "width": 336}, 336, {"shortest_edge": 336}])
def test_336_config(tmp_path, size, caplog):
    config = {**HUB_CONFIG, "crop_size": 336, "size": size}
    with caplog.at_level(logging.WARNING, logger="cnclip_vision.data.processor"):
        processor = Processor.from_pretrained(_model_dir(tmp_path, config))
    assert processor(images=_image())["pixel_values"].shape == (1, 3, 336, 336)
    assert ("aspect-preserving" in caplog.text) == (isinstance(size, dict) and "shortest_edge" in size)


def test_config_this_library_does_not_follow_warns(tmp_path, caplog):
    config = {**HUB_CONFIG, "size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": 224, "resample": 2}
    with caplog.at_level(logging.WARNING, logger="cnclip_vision.data.processor"):
        processor = Processor.from_pretrained(_model_dir(tmp_path, config))
    assert processor.image_size == 224  # the model sees the crop size
    assert "centre crop" in caplog.text and "resample=2" in caplog.text and "preprocessor_config.json" in caplog.text
    caplog.clear()
    config = {**HUB_CONFIG, "do_center_crop": True}  # crop of the same size: a no-op, no warning
    with caplog.at_level(logging.WARNING, logger="cnclip_vision.data.processor"):
        Processor.from_pretrained(_model_dir(tmp_path, config))
    assert not caplog.records


def test_from_pretrained_without_vocab_uses_the_packaged_one(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cnclip_vision.data.processor"):
        processor = Processor.from_pretrained(_model_dir(tmp_path, HUB_CONFIG, vocab=False))
    assert processor.tokenizer.vocab_path == VOCAB_PATH and "vocab.txt" in caplog.text


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Processor.from_pretrained(tmp_path)
    config = {**HUB_CONFIG, "size": {"height": 224, "width": 300}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not square"):
        Processor.from_pretrained(tmp_path)


def test_call():
    processor = Processor()
    out = processor(images=_image(), text="猫")
    assert out["pixel_values"].shape == (1, 3, 224, 224) and out["input_ids"].tolist() == [[101, 4344, 102]]
    assert torch.equal(out["pixel_values"][0], image_transform(224)(_image()))
    assert set(processor(text=TEXTS, padding="max_length")) == {"input_ids", "attention_mask"}
    assert processor(text=TEXTS, padding="max_length")["input_ids"].shape == (5, 52)
    assert set(processor(images=[_image(), _image(64, 64)])) == {"pixel_values"}
    assert "image_size=224" in repr(processor)
    with pytest.raises(ValueError, match="images, text or both"):
        processor()
    with pytest.raises(ValueError, match="images is empty"):
        processor(images=[])
    with pytest.raises(ValueError, match="texts is empty"):
        processor(text=[])
    with pytest.raises(TypeError, match="NoneType"):
        processor(text=["猫", None])


def test_save_pretrained_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    """Every file of save_pretrained goes through a temporary name: a copy that dies halfway leaves nothing."""
    import shutil
    from pathlib import Path

    def dies_halfway(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise OSError("No space left on device")

    monkeypatch.setattr(shutil, "copyfile", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        Processor(image_size=224).save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / "vocab.txt").exists()
    assert not [p.name for p in (tmp_path / "p").iterdir() if p.name.endswith(".tmp")]
