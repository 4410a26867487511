"""Original ``clip_cn_*.pt`` checkpoints load to the outputs of the original model code (``cn_clip``)."""

from __future__ import annotations

import pytest
import torch

import cnclip_vision
from cnclip_vision.models.configs import get_config

from .conftest import VIT_ARCHS, random_inputs, reference_clip, small_config


def _save_original(
    model: torch.nn.Module,
    path,
    *,
    prefix: str = "module.",
    pooler: bool = False,
    wqkv: bool = False,
    half: bool = False,
) -> None:
    """Write ``model`` the way the Chinese-CLIP training code does: ``{"epoch", "step", "name", "state_dict"}``."""
    state = {prefix + k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    if pooler:  # some released files carry the unused BERT pooler
        hidden = model.bert_config.hidden_size
        state[prefix + "bert.pooler.dense.weight"] = torch.randn(hidden, hidden)
        state[prefix + "bert.pooler.dense.bias"] = torch.randn(hidden)
    if wqkv:
        from cn_clip.clip.model import convert_state_dict  # the original flash-attention renaming

        state = convert_state_dict(state)
        assert any("attn.Wqkv" in k for k in state) and any("self.Wqkv" in k for k in state)
    torch.save({"epoch": 3, "step": 1000, "name": "test", "state_dict": state}, path)


def _assert_matches_reference(ours, ref, config, atol=1e-5) -> None:
    pixels, ids, _ = random_inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), ref.encode_image(pixels).float(), atol=atol, rtol=0)
        torch.testing.assert_close(ours.encode_text(ids), ref.encode_text(ids).float(), atol=atol, rtol=0)
        out = ours(pixels, ids)
        img, txt, scale = ref(pixels, ids)
        torch.testing.assert_close(out.logits_per_image, scale * img @ txt.t(), atol=atol * 100, rtol=0)


@pytest.mark.parametrize("arch", VIT_ARCHS)
@pytest.mark.parametrize("variant", [{}, {"pooler": True}, {"wqkv": True}, {"prefix": ""}])
def test_vit_original_checkpoint(arch, variant, tmp_path):
    config = small_config(arch)
    torch.manual_seed(0)
    ref = reference_clip(config)
    _save_original(ref, tmp_path / "clip_cn_test.pt", **variant)
    ours = cnclip_vision.load(tmp_path / "clip_cn_test.pt")  # architecture inferred from shapes
    assert ours.config == config
    _assert_matches_reference(ours, ref, config)


@pytest.mark.parametrize("variant", [{}, {"pooler": True}])
def test_rn50_original_checkpoint_full_size(variant, tmp_path):
    """RN50 through timm's resnet50_clip equals the original ModifiedResNet, BN running stats included."""
    config = get_config("RN50")
    torch.manual_seed(0)
    ref = reference_clip(config)
    path = tmp_path / "clip_cn_rn50.pt"
    _save_original(ref, path, **variant)
    assert len(torch.load(path, weights_only=True)["state_dict"]) == 394 + 2 * bool(variant)  # DESIGN.md §3
    ours = cnclip_vision.load(path)
    assert ours.config == config
    _assert_matches_reference(ours, ref, config)
    # round trip through our own format
    ours.save_pretrained(tmp_path / "saved")
    again = cnclip_vision.load(tmp_path / "saved")
    _assert_matches_reference(again, ref, config)


def test_fp16_original_checkpoint_loads_as_fp32(tmp_path):
    """Released .pt files are stored in fp16; load upcasts to fp32 unless dtype says otherwise."""
    config = small_config("ViT-B-16")
    ref = reference_clip(config)
    _save_original(ref, tmp_path / "half.pt", half=True)
    ours = cnclip_vision.load(tmp_path / "half.pt")
    assert ours.dtype == torch.float32
    ref.half().float()  # the reference with the same rounded weights
    _assert_matches_reference(ours, ref, config)
    assert cnclip_vision.load(tmp_path / "half.pt", dtype="bf16").dtype == torch.bfloat16
