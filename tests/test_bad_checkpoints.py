"""Bad checkpoint input: each gets a clear CheckpointError / UnknownModelError, never code execution."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

import cnclip_vision
from cnclip_vision.errors import CheckpointError, UnknownModelError, WeightsNotFoundError

from .conftest import small_config


@pytest.fixture
def saved(tmp_path):
    model = cnclip_vision.create_model(small_config("ViT-B-16"))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is a text file, not weights\n" * 10)
    with pytest.raises(CheckpointError, match="notes.pt"):
        cnclip_vision.load(path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        cnclip_vision.load(tmp_path / "empty.pt")


@pytest.mark.parametrize("name", ["model.safetensors", "clip_cn.pt"])
def test_truncated(saved, tmp_path, name):
    if name.endswith(".pt"):
        from safetensors.torch import load_file

        torch.save({"state_dict": load_file(saved / "model.safetensors")}, tmp_path / name)
        data = (tmp_path / name).read_bytes()
    else:
        data = (saved / name).read_bytes()
    (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cut_{name}.*(truncated|corrupt)"):
        cnclip_vision.load(tmp_path / f"cut_{name}")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_with_code_is_refused_not_run(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing.*NOT executed"):
        cnclip_vision.load(path)
    assert not (tmp_path / "pwned").exists()
    # a raw (non-zip) pickle too
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(CheckpointError):
        cnclip_vision.load(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_of_another_architecture(saved):
    with pytest.raises(CheckpointError) as info:
        cnclip_vision.load(saved, arch=small_config("ViT-L-14"))
    message = str(info.value)
    assert "shape mismatches" in message and "visual.patch_embed.proj.weight" in message
    assert "(128, 3, 16, 16)" in message and "(128, 3, 14, 14)" in message
    assert "looks like" in message


def test_missing_and_unexpected_keys(tmp_path):
    model = cnclip_vision.create_model(small_config("ViT-B-16"))
    state = dict(model.state_dict())
    del state["visual.norm.weight"]
    state["visual.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        CheckpointError, match=r"missing keys: visual\.norm\.weight(.|\n)*unexpected keys: visual\.extra"
    ):
        cnclip_vision.load(tmp_path / "bad.pt", arch=model.config)


def test_foreign_state_dict(tmp_path):
    torch.save({"conv.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="not a Chinese-CLIP checkpoint"):
        cnclip_vision.load(tmp_path / "resnet.pt")


def test_unknown_model_name_lists_known():
    with pytest.raises(UnknownModelError, match="ViT-B-16.*ViT-H-14"):
        cnclip_vision.load("ViT-X-99")
    with pytest.raises(UnknownModelError, match="known models"):
        cnclip_vision.create_model("resnet9000")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        cnclip_vision.load(tmp_path / "nope.pt")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        cnclip_vision.load(tmp_path)


def test_missing_hub_cache_while_offline(hf_offline_env):
    code = "import cnclip_vision; cnclip_vision.load('ViT-B-16')"
    out = subprocess.run([sys.executable, "-c", code], env=hf_offline_env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "WeightsNotFoundError" in out.stderr
    assert "huggingface-cli download OFA-Sys/chinese-clip-vit-base-patch16" in out.stderr
    assert "HF_HUB_OFFLINE" in out.stderr


def test_missing_hub_cache_error_type(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="RN50"):
        cnclip_vision.load("RN50")


def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "x.pt").write_text("nope")
    out = subprocess.run(
        [sys.executable, "-m", "cnclip_vision.cli", "convert", str(tmp_path / "x.pt"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stdout == ""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "x.pt" in lines[0] and "Traceback" not in out.stderr


def test_bad_tensor_inputs():
    model = cnclip_vision.create_model(small_config("ViT-B-16"))
    with pytest.raises(ValueError, match=r"\[N, 3, 224, 224\]"):
        model.encode_image(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="224x224"):
        model.encode_image(torch.zeros(1, 3, 100, 100))
    with pytest.raises(ValueError, match="empty"):
        model.encode_image(torch.zeros(0, 3, 224, 224))
    with pytest.raises(ValueError, match="integer tensor"):
        model.encode_text(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="empty"):
        model.encode_text(torch.zeros(0, 5, dtype=torch.long))
