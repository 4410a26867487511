"""The timm side of the backbones: registration, pretrained configs, weight loading and timm's model
contract (mirrors the checks of timm's own tests/test_models.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config

import cnclip_vision
from cnclip_vision.backbones import TIMM_NAMES
from cnclip_vision.errors import CheckpointError
from cnclip_vision.models.configs import get_config

from .conftest import reference_clip, small_config

VIT_NAMES = [n for n, arch in TIMM_NAMES.items() if arch != "RN50"]


def _small_kwargs(name: str) -> dict:
    """timm overrides matching tests.conftest.small_config for a ViT name."""
    v = small_config(TIMM_NAMES[name]).vision
    return dict(embed_dim=v.width, depth=v.layers, num_heads=v.heads)


def _small_model_and_file(name, tmp_path, **timm_kwargs):
    """A random dual encoder (small config of this size) saved to disk, and the timm model loaded from it."""
    arch = TIMM_NAMES[name]
    config = get_config(arch) if arch == "RN50" else small_config(arch)
    dual = cnclip_vision.create_model(config)
    dual.save_pretrained(tmp_path)
    kwargs = {} if arch == "RN50" else _small_kwargs(name)
    overlay = dict(file=str(tmp_path / "model.safetensors"), num_classes=config.embed_dim)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs, **timm_kwargs)
    return dual, model.eval(), overlay, kwargs


def test_registered_names():
    assert set(timm.list_models("chinese_clip*")) == set(TIMM_NAMES)
    assert set(timm.list_pretrained("chinese_clip*")) == {f"{n}.ofa_sys" for n in TIMM_NAMES}


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_pretrained_cfg_reproduces_preprocessing(name):
    """resolve_data_config + create_transform = DESIGN.md §4: squash resize, bicubic, CLIP mean/std."""
    from PIL import Image

    model = timm.create_model(name, pretrained=False, **({} if name.endswith("resnet50_224") else _small_kwargs(name)))
    cfg = model.pretrained_cfg
    size = get_config(TIMM_NAMES[name]).vision.image_size
    assert cfg["hf_hub_id"] == cnclip_vision.models.configs.get_model_info(TIMM_NAMES[name]).hub_id
    data_cfg = resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, size, size)
    assert data_cfg["interpolation"] == "bicubic" and data_cfg["crop_pct"] == 1.0 and data_cfg["crop_mode"] == "squash"
    image = Image.new("RGB", (640, 480))
    image.paste((200, 30, 40), (100, 100, 400, 300))
    timm_x = create_transform(**data_cfg)(image)
    ours = cnclip_vision.image_transform(size)(image)
    assert timm_x.shape == ours.shape == (3, size, size)
    torch.testing.assert_close(timm_x, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_head_equals_encode_image_and_pooled_features(name, tmp_path):
    dual, model, overlay, kwargs = _small_model_and_file(name, tmp_path)
    size = dual.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dual.encode_image(x), atol=1e-5, rtol=0)
        # forward_features / forward_head split
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x), atol=1e-6, rtol=0)
        pooled = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
        ).eval()
        pre = dual.visual.forward_head(dual.visual.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled(x), pre, atol=1e-5, rtol=0)
        assert pooled(x).shape[-1] == pooled.num_features


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_features_only_and_forward_intermediates(name, tmp_path):
    _, model, overlay, kwargs = _small_model_and_file(name, tmp_path)
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, size, size)
    n_levels = len(model.feature_info)
    for out_indices in ((0,), (n_levels - 1,), tuple(range(n_levels))[-3:], (-1,)):
        fe = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True, out_indices=out_indices, **kwargs
        ).eval()
        with torch.no_grad():
            feats = fe(x)
        assert [f.shape[1] for f in feats] == fe.feature_info.channels()
        assert [size // f.shape[-1] for f in feats] == fe.feature_info.reduction()
        with torch.no_grad():
            final, inter = model.forward_intermediates(x, indices=list(out_indices))
        for a, b in zip(inter, feats):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():
        inter = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(inter) == 2
        if "vit" in name:
            nhwc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True, norm=True)
            assert nhwc[0].shape[1] == (size // model.patch_embed.patch_size[0]) ** 2  # prefix tokens dropped
            _, inter_prefix = model.forward_intermediates(x, indices=1, return_prefix_tokens=True)
            assert inter_prefix[0][1].shape[1] == 1  # the class token
            # stop_early: the final output is from the last requested block
            pruned = model.prune_intermediate_layers(indices=1, prune_head=True)
            assert pruned == [len(model.blocks) - 1]


@pytest.mark.parametrize("name", VIT_NAMES)
def test_dynamic_img_size_non_square(name, tmp_path):
    _, _, overlay, kwargs = _small_model_and_file(name, tmp_path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, dynamic_img_size=True, **kwargs)
    patch = model.patch_embed.patch_size[0]
    h, w = 480 // patch * patch, 640 // patch * patch
    with torch.no_grad():
        tokens = model.eval().forward_features(torch.randn(1, 3, h, w))
    assert tokens.shape[1] == 1 + (h // patch) * (w // patch)


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_grad_checkpointing_and_reset_classifier(name):
    kwargs = {} if name.endswith("resnet50_224") else _small_kwargs(name)
    model = timm.create_model(name, **kwargs).train()
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size)
    torch.manual_seed(0)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.reset_classifier(7)
    assert model.eval()(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_original_checkpoint_through_timm(tmp_path):
    """pretrained_cfg_overlay=dict(file=clip_cn_*.pt) with the original layout (and `module.` prefix)."""
    config = small_config("ViT-L-14")
    ref = reference_clip(config)
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "clip_cn.pt")
    model = timm.create_model(
        "chinese_clip_vit_large_patch14_224",
        pretrained=True,
        **_small_kwargs("chinese_clip_vit_large_patch14_224"),
        pretrained_cfg_overlay=dict(file=str(tmp_path / "clip_cn.pt"), num_classes=48),
    )
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.encode_image(x), atol=1e-5, rtol=0)


def test_rn50_original_checkpoint_through_timm(tmp_path):
    ref = reference_clip(get_config("RN50"))
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "clip_cn_rn50.pt")
    model = timm.create_model(
        "chinese_clip_resnet50_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "clip_cn_rn50.pt")),
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.encode_image(x), atol=1e-5, rtol=0)


def test_other_image_size_resamples_position_embedding(tmp_path):
    _, _, overlay, kwargs = _small_model_and_file("chinese_clip_vit_base_patch16_224", tmp_path)
    model = timm.create_model(
        "chinese_clip_vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, img_size=320, **kwargs
    )
    assert model.pos_embed.shape[1] == 1 + 20 * 20
    assert model.eval()(torch.randn(1, 3, 320, 320)).shape == (1, 48)


def test_pretrained_from_offline_hub_cache(tmp_path):
    """`pretrained=True` alone reads the Hub repo, here from a cache laid out on disk with HF_HUB_OFFLINE=1."""
    repo = tmp_path / "hf_home" / "hub" / "models--OFA-Sys--chinese-clip-vit-base-patch16"
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    dual = cnclip_vision.create_model(small_config("ViT-B-16"))
    dual.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    x = torch.randn(1, 3, 224, 224)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import torch, timm, json, cnclip_vision\n"
        "m = timm.create_model('chinese_clip_vit_base_patch16_224', pretrained=True, embed_dim=128, depth=2,"
        " num_heads=2, pretrained_cfg_overlay=dict(num_classes=48)).eval()\n"
        f"y = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        "print(json.dumps(y[0].tolist()))\n"
    )
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        expected = dual.encode_image(x)[0]
    torch.testing.assert_close(torch.tensor(json.loads(out.stdout.splitlines()[-1])), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_full_size_vit_b16_against_transformers(tmp_path):
    from transformers import ChineseCLIPModel

    dual = cnclip_vision.create_model("ViT-B-16")
    dual.save_pretrained(tmp_path)
    hf = ChineseCLIPModel.from_pretrained(tmp_path).eval()
    model = timm.create_model(
        "chinese_clip_vit_base_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=x)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
        fe = timm.create_model("chinese_clip_vit_base_patch16_224", features_only=True, out_indices=(3, 7, 11))
        assert fe.feature_info.channels() == [768] * 3 and fe.feature_info.reduction() == [16] * 3


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_out_indices():
    with pytest.raises(ValueError, match=r"out_indices.*\[12\].*allowed 0\.\.11"):
        timm.create_model("chinese_clip_vit_base_patch16_224", features_only=True, out_indices=(3, 12))
    with pytest.raises(ValueError, match=r"out_indices.*allowed 0\.\.4"):
        timm.create_model("chinese_clip_resnet50_224", features_only=True, out_indices=(5,))
    model = timm.create_model("chinese_clip_vit_base_patch16_224", **_small_kwargs("chinese_clip_vit_base_patch16_224"))
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(torch.randn(1, 3, 224, 224), indices=[0, 5])


def test_wrong_size_checkpoint_for_name(tmp_path):
    cnclip_vision.create_model(small_config("ViT-L-14")).save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"chinese_clip_vit_base_patch16_224(.|\n)*shape mismatches(.|\n)*looks like"
    ):
        timm.create_model(
            "chinese_clip_vit_base_patch16_224",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
        )


def test_bad_inputs_name_the_problem():
    model = timm.create_model(
        "chinese_clip_vit_base_patch16_224", dynamic_img_size=True, **_small_kwargs("chinese_clip_vit_base_patch16_224")
    )
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\].*\(1, 1, 224, 224\)"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match="at least 16x16"):
        model(torch.randn(1, 3, 8, 8))
    rn = timm.create_model("chinese_clip_resnet50_224")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        rn(torch.randn(1, 4, 224, 224))


def test_example_runs_offline(tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "timm_features.py"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "features_only" in out.stdout and "(2, 512)" in out.stdout
