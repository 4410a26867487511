"""Training-free dense modes on the tower's last block: each against an independent implementation (SDPA on
the timm block's own weights), shared by dense_image_embeddings, the detector's dense branch and heat maps,
and measured on the toy world's exact masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cnclip_vision
from cnclip_vision.backbones.dense import DENSE_MODES, NACLIP_STD, dense_tokens, tokens_with_dense
from cnclip_vision.backbones.pyramid import dense_image_embeddings, last_tokens
from cnclip_vision.toy import world
from cnclip_vision.toy.dense import evaluate_dense_alignment, patch_targets


@pytest.fixture(scope="module")
def model():
    return cnclip_vision.load("toy-tiny").eval()


def _reference(tower, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The last block re-implemented with F.scaled_dot_product_attention on the block's weights."""
    tokens = tower.norm_pre(tower._pos_embed(tower.patch_embed(x)))
    h, w = x.shape[-2] // 8, x.shape[-1] // 8
    for block in tower.blocks[:-1]:
        tokens = block(tokens)
    block = tower.blocks[-1]
    attn = block.attn
    b, n, c = tokens.shape
    qkv = attn.qkv(block.norm1(tokens)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if mode == "maskclip":
        out = v
    elif mode == "sclip":
        out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    elif mode == "clearclip":
        out = F.scaled_dot_product_attention(q, q, v)
    else:
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
        bias = torch.zeros(n, n)
        bias[1:, 1:] = torch.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / (2 * NACLIP_STD**2))
        out = F.scaled_dot_product_attention(k, k, v, attn_mask=bias)
    out = attn.proj(out.transpose(1, 2).reshape(b, n, c))
    if mode == "sclip":
        out = tokens + out
        out = out + block.mlp(block.norm2(out))
    patches = tower.norm(out)[:, 1:]
    return patches.transpose(1, 2).reshape(b, c, h, w)


@torch.no_grad()
def test_raw_is_the_tower_and_variants_match_a_reference(model):
    x = torch.randn(2, 3, 64, 40)
    raw = last_tokens(model.visual, x)
    torch.testing.assert_close(dense_tokens(model.visual, x, "raw"), raw)
    for mode in DENSE_MODES[1:]:
        variant = dense_tokens(model.visual, x, mode)
        torch.testing.assert_close(variant, _reference(model.visual, x, mode), rtol=1e-4, atol=1e-4)
        assert (variant - raw).abs().max() > 1e-2, mode  # a different block, not the raw one
        shared_raw, shared = tokens_with_dense(model.visual, x, mode)
        torch.testing.assert_close(shared_raw, raw)
        torch.testing.assert_close(shared, variant)


@torch.no_grad()
def test_dense_image_embeddings_and_errors(model):
    x = torch.randn(1, 3, 48, 48)
    raw = dense_image_embeddings(model, x, normalize=True)
    nac = dense_image_embeddings(model, x, normalize=True, dense_mode="naclip")
    assert raw.shape == nac.shape == (1, model.config.embed_dim, 6, 6)
    torch.testing.assert_close(nac.norm(dim=1), torch.ones(1, 6, 6))
    with pytest.raises(ValueError, match="dense_mode"):
        dense_image_embeddings(model, x, dense_mode="gem")  # type: ignore[arg-type]


def test_heatmap_and_detector_take_the_mode(model):
    from cnclip_vision.detection import DetectionPredictor, OpenVocabDetector
    from cnclip_vision.detection.heatmap import similarity_map

    scene = world.render(world.detection_scenes(1, 31)[0])
    raw = similarity_map(model, scene, ["红色圆形"], size=64)
    mask = similarity_map(model, scene, ["红色圆形"], size=64, dense_mode="maskclip")
    assert raw.shape == mask.shape and not torch.allclose(raw, mask)

    image = torch.from_numpy(np.array(scene)).permute(2, 0, 1).float() / 255
    labels = [c.name for c in world.CATEGORIES[:10]]
    outputs = {}
    for mode in ("raw", "naclip"):
        detector = OpenVocabDetector.from_pretrained("toy-detector", dense_mode=mode)
        assert detector.config.dense_mode == mode
        off = detector.predict([image], labels, vlm_mode="off", score_threshold=0.05)[0]
        dense = detector.predict([image], labels, vlm_mode="dense", score_threshold=0.05)[0]
        outputs[mode] = (off, dense)
    # a per-call dense_mode is the configured one, and the config is left as it was
    per_call = detector.predict([image], labels, vlm_mode="dense", dense_mode="raw", score_threshold=0.05)[0]
    torch.testing.assert_close(per_call["scores"], outputs["raw"][1]["scores"])
    torch.testing.assert_close(per_call["boxes"], outputs["raw"][1]["boxes"])
    predictor = DetectionPredictor(detector, vlm_mode="dense", dense_mode="raw", score_threshold=0.05)
    torch.testing.assert_close(predictor.predict([image], labels)[0]["scores"], outputs["raw"][1]["scores"])
    assert detector.config.dense_mode == "naclip"
    with pytest.raises(ValueError, match="dense_mode"):
        detector.predict([image], labels, vlm_mode="dense", dense_mode="gem")
    with pytest.raises(ValueError, match="dense_mode"):
        DetectionPredictor(detector, dense_mode="gem")  # type: ignore[arg-type]
    # the pyramid always sees the raw tokens: "off" does not depend on the dense mode; "dense" does
    torch.testing.assert_close(outputs["raw"][0]["scores"], outputs["naclip"][0]["scores"])
    a, b = outputs["raw"][1]["scores"], outputs["naclip"][1]["scores"]
    assert a.shape != b.shape or not torch.allclose(a, b)
    with pytest.raises(Exception, match="dense_mode"):
        OpenVocabDetector.from_pretrained("toy-detector", dense_mode="gem")


def test_object_map_and_patch_targets():
    scene = world.sample_scene(np.random.default_rng(5), image_size=64, n_objects=3)
    objects = world.object_map(scene)
    assert objects.shape == (64, 64) and (objects == -1).any()
    for i, obj in enumerate(scene.objects):
        ys, xs = np.nonzero(objects == i)
        if len(xs):  # inside its tight box (a later object may hide it)
            x1, y1, x2, y2 = obj.box
            assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2
    # the last-drawn object is never hidden
    assert (objects == len(scene.objects) - 1).any()
    targets = patch_targets(scene, 8)
    assert targets.shape == (8, 8)
    assert set(np.unique(targets)) <= {-1} | {o.category_id for o in scene.objects}


def test_training_free_variants_localise_better_than_raw(model):
    """Fresh scenes (seed not used in training): MaskCLIP's and NACLIP's blocks beat the raw tokens of the tiny
    model (chance: 1/64), which are barely aligned (DESIGN.md §7)."""
    result = evaluate_dense_alignment(model, modes=("raw", "maskclip", "naclip"), n_images=40, seed=2027)
    accuracy = {m: r["patch_accuracy"] for m, r in result["modes"].items()}
    assert result["modes"]["raw"]["patches"] > 500
    assert accuracy["maskclip"] > accuracy["raw"] and accuracy["naclip"] > accuracy["raw"], accuracy
