"""Parity with transformers' ChineseCLIPModel on the same random weights (DESIGN.md §8: the port's key test)."""

from __future__ import annotations

import pytest
import torch
from transformers import ChineseCLIPConfig, ChineseCLIPModel

import cnclip_vision
from cnclip_vision.models.configs import get_config

from .conftest import VIT_ARCHS, random_inputs, small_config

TOL = 1e-5


def _features(out: object) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def _random_hf(config, seed: int = 0) -> ChineseCLIPModel:
    torch.manual_seed(seed)
    hf_dict = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    model = ChineseCLIPModel(ChineseCLIPConfig(**hf_dict)).eval()
    with torch.no_grad():
        for module in model.modules():  # HF initialises LayerNorms to (1, 0): make them informative
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        model.logit_scale.fill_(4.6052)
    return model


def assert_same_outputs(ours: cnclip_vision.ChineseCLIP, hf: ChineseCLIPModel, config) -> None:
    pixels, ids, mask = random_inputs(config)
    with torch.no_grad():
        img, ref_img = ours.encode_image(pixels), _features(hf.get_image_features(pixel_values=pixels))
        txt, ref_txt = ours.encode_text(ids, mask), _features(hf.get_text_features(input_ids=ids, attention_mask=mask))
        out = ours(pixels, ids, mask)
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    assert img.shape == ref_img.shape == (2, config.embed_dim)
    torch.testing.assert_close(img, ref_img, atol=TOL, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=TOL, rtol=0)
    torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, atol=TOL * 100, rtol=0)  # 100 x cosine
    torch.testing.assert_close(out.logits_per_text, ref.logits_per_text, atol=TOL * 100, rtol=0)
    # the mask defaults to ids != [PAD], as the original model computes it
    torch.testing.assert_close(ours.encode_text(ids), txt, atol=0, rtol=0)


@pytest.mark.parametrize("arch", VIT_ARCHS)
@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_hf_checkpoint_loads_with_same_outputs(arch, weights_name, tmp_path):
    config = small_config(arch)
    hf = _random_hf(config)
    hf.save_pretrained(tmp_path, safe_serialization=weights_name.endswith("safetensors"))
    if not (tmp_path / weights_name).exists():  # transformers 5 always writes safetensors
        torch.save(hf.state_dict(), tmp_path / weights_name)
        (tmp_path / "model.safetensors").unlink(missing_ok=True)
    ours = cnclip_vision.load(tmp_path)
    assert ours.config == config
    assert not ours.training
    assert_same_outputs(ours, hf, config)


@pytest.mark.parametrize("arch", VIT_ARCHS)
def test_save_pretrained_is_read_by_transformers(arch, tmp_path):
    config = small_config(arch)
    ours = cnclip_vision.create_model(config)
    ours.save_pretrained(tmp_path)
    hf = ChineseCLIPModel.from_pretrained(tmp_path).eval()
    assert_same_outputs(ours, hf, config)
    reloaded = cnclip_vision.load(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_full_size_vit_b16(tmp_path):
    config = get_config("ViT-B-16")
    hf = _random_hf(config)
    hf.save_pretrained(tmp_path)
    ours = cnclip_vision.load(tmp_path)
    assert ours.config == config
    assert_same_outputs(ours, hf, config)
    del hf
    # and back: our save_pretrained → transformers
    ours.save_pretrained(tmp_path / "ours")
    hf2 = ChineseCLIPModel.from_pretrained(tmp_path / "ours").eval()
    assert_same_outputs(ours, hf2, config)
