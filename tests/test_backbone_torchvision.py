"""The Chinese-CLIP ViT as a torchvision detection backbone (ViTDet simple feature pyramid)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet

import cnclip_vision
from cnclip_vision.backbones.pyramid import (
    ViTDetBackbone,
    anchor_generator,
    dense_image_embeddings,
    detector_kwargs,
    vit_fpn_backbone,
)
from cnclip_vision.models.configs import get_config

from .conftest import small_config

ROOT = Path(__file__).resolve().parents[1]
SMALL_B16 = small_config("ViT-B-16")  # width 128, 2 blocks, embed_dim 48
SMALL_L14 = small_config("ViT-L-14")


def _small(config=SMALL_B16, **kwargs) -> ViTDetBackbone:
    kwargs.setdefault("out_channels", 32)
    return vit_fpn_backbone(config, **kwargs)


def _pyramid_params(bb: ViTDetBackbone) -> set[str]:
    return {n for n, _ in bb.named_parameters() if not n.startswith("tower.")}


def _trainable(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


# --- levels and strides ----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [SMALL_B16, SMALL_L14], ids=["patch16", "patch14"])
@pytest.mark.parametrize("mode", ["resize", "resample"])
@pytest.mark.parametrize("size", [(480, 640), (320, 448)])
def test_five_levels_exact_strides(config, mode, size):
    torch.manual_seed(0)
    bb = _small(config, patch14_mode=mode, out_channels=24)
    h, w = size
    with torch.no_grad():
        out = bb(torch.randn(1, 3, h, w))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert bb.strides == (4, 8, 16, 32, 64) and bb.out_channels == 24
    for (name, fmap), s in zip(out.items(), bb.strides):
        expect = (-(-h // s), -(-w // s))  # the top (max-pooled) level rounds up, like torchvision's FPN
        assert fmap.shape == (1, 24, *expect), name
        assert torch.isfinite(fmap).all()
    if config.vision.patch_size == 14:
        assert bb.patch_size == (14 if mode == "resize" else 16)


def test_p3_p7_levels():
    bb = _small(levels="p3-p7")
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 320, 448))
    assert list(out) == ["0", "1", "2", "p6", "p7"] and bb.strides == (8, 16, 32, 64, 128)
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4)]


@pytest.mark.parametrize("norm", ["gn", "none"])
def test_other_norms(norm):
    bb = _small(norm=norm)
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 64, 96))["0"].shape == (1, 32, 16, 24)


# --- freezing --------------------------------------------------------------------------------------------
def test_frozen_by_default():
    bb = _small()
    assert _trainable(bb) == _pyramid_params(bb)
    assert _trainable(bb.tower) == set()
    bb.train()
    assert bb.training and not bb.tower.training and all(not m.training for m in bb.tower.modules())
    assert bb.stages[0].training


@pytest.mark.parametrize("n", [1, 2])
def test_trainable_layers(n):
    bb = _small(trainable_layers=n)
    depth = len(bb.tower.blocks)
    expect = {f"blocks.{i}.{k}" for i in range(depth - n, depth) for k, _ in bb.tower.blocks[i].named_parameters()}
    expect |= {"norm.weight", "norm.bias"}
    assert _trainable(bb.tower) == expect
    assert _trainable(bb) == _pyramid_params(bb) | {f"tower.{k}" for k in expect}
    bb.train()
    assert bb.tower.blocks[-1].training and bb.tower.norm.training and not bb.tower.patch_embed.training
    assert bb.tower.blocks[0].training == (n == 2)
    bb.eval()
    assert not bb.tower.blocks[-1].training


def test_grad_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    plain = _small(trainable_layers=2)
    ckpt = _small(trainable_layers=2, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.tower.grad_checkpointing and not plain.tower.grad_checkpointing
    x = torch.randn(1, 3, 96, 128)
    outs = []
    for bb in (plain, ckpt):
        bb.train()
        out = bb(x)
        sum(v.square().mean() for v in out.values()).backward()
        outs.append((out, {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}))
    (o1, g1), (o2, g2) = outs
    for k in o1:
        torch.testing.assert_close(o1[k], o2[k])
    assert g1.keys() == g2.keys() and "tower.blocks.0.attn.qkv.weight" in g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)


# --- weights ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_small(tmp_path_factory):
    torch.manual_seed(0)
    model = cnclip_vision.create_model(SMALL_B16)
    directory = tmp_path_factory.mktemp("small_b16")
    model.save_pretrained(directory)
    return model, directory


def _assert_tower_equals(tower: torch.nn.Module, visual: torch.nn.Module) -> None:
    ours, ref = tower.state_dict(), visual.state_dict()
    assert set(ours) == set(ref) | {"head.bias"}
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
    assert not ours["head.bias"].any()


@pytest.mark.parametrize("which", ["dir", "file"])
def test_weights_from_saved_model(saved_small, which):
    model, directory = saved_small
    source = directory if which == "dir" else directory / "model.safetensors"
    bb = vit_fpn_backbone(SMALL_B16, weights=source, out_channels=32)
    _assert_tower_equals(bb.tower, model.visual)


def test_weights_patch14_resample(tmp_path):
    torch.manual_seed(0)
    model = cnclip_vision.create_model(SMALL_L14)
    model.save_pretrained(tmp_path)
    resized = vit_fpn_backbone(SMALL_L14, weights=tmp_path, patch14_mode="resize")
    _assert_tower_equals(resized.tower, model.visual)
    resampled = vit_fpn_backbone(SMALL_L14, weights=tmp_path, patch14_mode="resample")
    assert resampled.tower.patch_embed.proj.weight.shape[-2:] == (16, 16)
    assert resampled.tower.pos_embed.shape == model.visual.pos_embed.shape  # same 16x16 grid, not resampled
    torch.testing.assert_close(resampled.tower.blocks[1].mlp.fc2.weight, model.visual.blocks[1].mlp.fc2.weight)


def test_weights_wrong_size_or_missing(saved_small, tmp_path):
    _, directory = saved_small
    wider = dataclasses.replace(SMALL_B16, vision=dataclasses.replace(SMALL_B16.vision, width=192, heads=3))
    with pytest.raises(ValueError, match="does not fit"):
        vit_fpn_backbone(wider, weights=directory)
    with pytest.raises(ValueError, match="no such file"):
        vit_fpn_backbone(SMALL_B16, weights=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="weights="):
        vit_fpn_backbone(SMALL_B16, weights=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered size"):
        vit_fpn_backbone(SMALL_B16, weights=True)


# --- dense embeddings ------------------------------------------------------------------------------------
def test_dense_embeddings_match_encode_image_and_tokens(saved_small):
    model, directory = saved_small
    bb = vit_fpn_backbone(SMALL_B16, weights=directory, out_channels=32)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = bb.tower.forward_features(x)  # [N, 1 + 196, width], after ln_post
        # the class token through the same norm + projection is encode_image
        torch.testing.assert_close(bb.tower.head(tokens[:, 0]), model.encode_image(x), rtol=1e-4, atol=1e-5)
        dense = bb.dense_embeddings(x)
        assert dense.shape == (2, 48, 14, 14)
        i, j = 3, 9
        patch = model.visual.head(tokens[:, 1 + i * 14 + j])
        torch.testing.assert_close(dense[:, :, i, j], patch, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dense_image_embeddings(model, x), dense, rtol=1e-4, atol=1e-5)
        unit = dense_image_embeddings(model, x, normalize=True)
        torch.testing.assert_close(unit.norm(dim=1), torch.ones(2, 14, 14))
        # other sizes: the dual encoder path interpolates the position embedding as timm's dynamic_img_size
        y = torch.randn(1, 3, 320, 448)
        torch.testing.assert_close(dense_image_embeddings(model, y), bb.dense_embeddings(y), rtol=1e-4, atol=1e-5)
        assert bb.dense_embeddings(torch.randn(1, 3, 48, 80)).shape == (1, 48, 3, 5)  # multiples of 16 suffice


def test_dense_embeddings_patch14():
    torch.manual_seed(0)
    model = cnclip_vision.create_model(SMALL_L14)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        dense = dense_image_embeddings(model, x)
        tokens = model.visual.forward_features(x)
        assert dense.shape == (1, 48, 16, 16)
        patch = model.visual.head(tokens[:, 1 + 5 * 16 + 7])
        torch.testing.assert_close(dense[:, :, 5, 7], patch, rtol=1e-4, atol=1e-5)
        assert dense_image_embeddings(model, torch.randn(1, 3, 280, 336)).shape == (1, 48, 20, 24)
        bb = _small(SMALL_L14)
        assert bb.dense_embeddings(torch.randn(1, 3, 320, 448)).shape == (1, 48, 20, 28)
    with pytest.raises(ValueError, match="multiple of 14"):
        dense_image_embeddings(model, torch.randn(1, 3, 224, 230))


def test_dense_image_embeddings_rejects_resnet():
    fake = types.SimpleNamespace(visual=torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="ViT"):
        dense_image_embeddings(fake, torch.randn(1, 3, 224, 224))  # type: ignore[arg-type]


# --- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, match",
    [("RN50", "RN50 has no stride-16"), ("ViT-B-32", "unknown name"), (get_config("RN50"), "ResNet")],
)
def test_bad_arch(arch, match):
    with pytest.raises(ValueError, match=match) as info:
        vit_fpn_backbone(arch)
    if isinstance(arch, str):
        assert "ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14" in str(info.value)


@pytest.mark.parametrize("n", [-1, 3, True, 1.5])
def test_bad_trainable_layers(n):
    with pytest.raises(ValueError, match=r"trainable_layers=.*0 \(frozen tower\) to 2 \(every block\)"):
        _small(trainable_layers=n)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch14_mode="crop"), "patch14_mode='crop'; allowed values: 'resize', 'resample'"),
        (dict(norm="bn"), "norm='bn'; allowed values: 'ln', 'gn', 'none'"),
        (dict(levels="p2-p5"), "levels='p2-p5'; allowed values: 'p2-p6', 'p3-p7'"),
        (dict(out_channels=0), "out_channels=0"),
        (dict(norm="gn", out_channels=48), r"divisible by 32; got \[48\]"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _small(**kwargs)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(3, 64, 64), r"\[N, 3, H, W\]; got \(3, 64, 64\)"),
        (torch.randn(1, 1, 64, 64), r"\[N, 3, H, W\]; got \(1, 1, 64, 64\)"),
        (torch.randn(1, 4, 64, 64), r"\[N, 3, H, W\]"),
        (torch.randn(1, 3, 8, 8), "smaller than one patch"),
        (torch.randn(1, 3, 100, 128), "not a multiple of 32"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float images"),
        ([1, 2, 3], r"\[N, 3, H, W\]"),
    ],
)
def test_bad_inputs(x, match):
    bb = _small()
    with pytest.raises(ValueError, match=match):
        bb(x)


def test_bad_dense_inputs():
    bb = _small()
    with pytest.raises(ValueError, match="not a multiple of 16"):
        bb.dense_embeddings(torch.randn(1, 3, 100, 128))
    with pytest.raises(ValueError, match="kind='ssd'; allowed values"):
        anchor_generator("ssd")  # type: ignore[arg-type]


# --- inside torchvision detectors ------------------------------------------------------------------------
def _batch(masks: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 240, 320, generator=g), torch.rand(3, 300, 224, generator=g)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 150.0, 200.0], [160.0, 30.0, 300.0, 120.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[30.0, 40.0, 100.0, 280.0]]), "labels": torch.tensor([2])},
    ]
    if masks:
        for image, t in zip(images, targets):
            m = torch.zeros(len(t["boxes"]), *image.shape[-2:], dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(t["boxes"].int().tolist()):
                m[k, y0:y1, x0:x1] = 1
            t["masks"] = m
    return images, targets


DETECTORS = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN, "retinanet": RetinaNet, "fcos": FCOS}
_FEW_RCNN = dict(
    rpn_pre_nms_top_n_train=300,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=64,
    box_detections_per_img=5,
)
FAST = {  # fewer proposals / detections than the defaults, to keep CPU tests quick
    "faster_rcnn": _FEW_RCNN,
    "mask_rcnn": _FEW_RCNN,
    "retinanet": dict(topk_candidates=100, detections_per_img=5),
    "fcos": dict(topk_candidates=100, detections_per_img=5),
}
LOSSES = {
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "mask_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"},
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
}


@pytest.mark.parametrize("explicit", [False, True], ids=["torchvision_defaults", "detector_kwargs"])
@pytest.mark.parametrize("kind", list(DETECTORS))
def test_detector_train_and_eval_step(kind, explicit):
    torch.manual_seed(0)
    bb = _small(trainable_layers=1 if explicit else 0)
    extra = detector_kwargs(kind, bb) if explicit else {}
    det = DETECTORS[kind](bb, num_classes=3, min_size=256, max_size=320, **extra, **FAST[kind])
    images, targets = _batch(masks=kind == "mask_rcnn")
    det.train()
    losses = det(images, targets)
    assert set(losses) == LOSSES[kind] and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with_grad = {n for n, p in bb.named_parameters() if p.grad is not None}
    trainable = _trainable(bb)
    assert with_grad <= trainable
    assert _pyramid_params(bb) <= with_grad | {n for n in _pyramid_params(bb) if n.startswith("top_block")}
    if explicit:
        assert "tower.blocks.1.attn.qkv.weight" in with_grad and "tower.blocks.0.attn.qkv.weight" not in with_grad
    else:
        assert not any(n.startswith("tower.") for n in with_grad)
    det.eval()
    with torch.no_grad():
        results = det(images)
    assert isinstance(results, list) and len(results) == 2
    for r in results:
        assert {"boxes", "labels", "scores"} <= set(r) and r["boxes"].shape[-1] == 4
        if kind == "mask_rcnn":
            assert "masks" in r


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_p3_p7_in_one_stage_detectors(kind):
    bb = _small(levels="p3-p7")
    kwargs = detector_kwargs(kind, bb)
    det = DETECTORS[kind](bb, num_classes=3, min_size=256, max_size=320, **kwargs, **FAST[kind])
    images, targets = _batch()
    det.train()
    sum(det(images, targets).values()).backward()
    det.eval()
    with torch.no_grad():
        assert "boxes" in det(images)[0]


def test_detector_kwargs_content():
    bb = _small()
    fcos = detector_kwargs("fcos", bb)["anchor_generator"]
    assert fcos.sizes == ((4,), (8,), (16,), (32,), (64,)) and fcos.num_anchors_per_location() == [1] * 5
    retina = detector_kwargs("retinanet", bb)["anchor_generator"]
    assert retina.sizes[0] == (32, 40, 50) and retina.num_anchors_per_location() == [9] * 5
    frcnn = detector_kwargs("mask_rcnn", bb)
    assert frcnn["rpn_anchor_generator"].sizes == ((32,), (64,), (128,), (256,), (512,))
    assert frcnn["box_roi_pool"].featmap_names == ["0", "1", "2", "3"]
    assert frcnn["mask_roi_pool"].output_size == (14, 14)
    p3 = _small(levels="p3-p7")
    assert detector_kwargs("faster_rcnn", p3)["box_roi_pool"].featmap_names == ["0", "1", "2", "p6"]
    assert detector_kwargs("fcos", p3)["anchor_generator"].sizes == ((8,), (16,), (32,), (64,), (128,))


# --- full size -------------------------------------------------------------------------------------------
def test_full_size_vit_b16_in_faster_rcnn():
    torch.manual_seed(0)
    bb = vit_fpn_backbone("ViT-B-16")
    assert len(bb.tower.blocks) == 12 and bb.tower.embed_dim == 768 and bb.embed_dim == 512
    assert _trainable(bb) == _pyramid_params(bb)
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 224, 288))
    assert [tuple(v.shape) for v in out.values()] == [
        (1, 256, 56, 72),
        (1, 256, 28, 36),
        (1, 256, 14, 18),
        (1, 256, 7, 9),
        (1, 256, 4, 5),
    ]
    det = FasterRCNN(bb, num_classes=3, min_size=224, max_size=288, **FAST["faster_rcnn"])
    images, targets = _batch()
    det.train()
    sum(det(images, targets).values()).backward()
    assert all(p.grad is None for p in bb.tower.parameters())
    assert all(p.grad is not None for p in bb.stages.parameters())


@pytest.mark.slow
def test_full_size_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = cnclip_vision.create_model("ViT-B-16")
    model.save_pretrained(tmp_path)
    bb = vit_fpn_backbone("ViT-B-16", weights=tmp_path, trainable_layers=4)
    _assert_tower_equals(bb.tower, model.visual)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            bb.tower.head(bb.tower.forward_features(x)[:, 0]), model.encode_image(x), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(dense_image_embeddings(model, x), bb.dense_embeddings(x), rtol=1e-4, atol=1e-4)


# --- example ---------------------------------------------------------------------------------------------
def test_example_faster_rcnn_backbone(tmp_path, hf_offline_env):
    start = time.monotonic()
    out = tmp_path / "detections.json"
    env = dict(hf_offline_env, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), hf_offline_env.get("PYTHONPATH")])))
    script = ROOT / "examples" / "faster_rcnn_backbone.py"
    result = subprocess.run(
        [sys.executable, str(script), "--steps", "3", "--images", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss" in result.stdout
    detections = json.loads(out.read_text())
    assert isinstance(detections, list)
    for d in detections:
        assert {"image_id", "category_id", "bbox", "score"} <= set(d) and len(d["bbox"]) == 4
    assert time.monotonic() - start < 120
