"""The open-vocabulary detector (``cnclip_vision.detection.model``) on the shipped tiny CLIP: config and
vocabulary validation, the text/image class embeddings against manual CLIP computations, ``predict`` on
every kind of image (boxes in original pixels, sorted scores, NMS, limits), the VLM ensemble against a
manual recomputation, and ``save_pretrained`` / ``from_pretrained`` (round trip, CLIP copy, fp16, errors)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.ops import box_iou

import cnclip_vision
import cnclip_vision.models.encode
import cnclip_vision.zeroshot
from cnclip_vision.data.transforms import image_transform
from cnclip_vision.detection import DetectionPredictor, DetectorConfig, ImageQuery, OpenVocabDetector, Vocabulary
from cnclip_vision.errors import CheckpointError, CNClipError
from cnclip_vision.models.clip import ChineseCLIP
from cnclip_vision.models.configs import get_config
from cnclip_vision.toy import world as toyworld

SMALL = dict(
    clip="toy-tiny",
    image_size=128,
    out_channels=32,
    levels="p3-p7",
    representation_size=64,
    rpn_pre_nms_top_n=(200, 100),
    rpn_post_nms_top_n=(100, 50),
    box_batch_size_per_image=32,
    crop_top_k=10,
    templates=("{}",),
)
LABELS = [c.name for c in toyworld.CATEGORIES[:6]]  # 红色圆形, ...
THRESHOLD = 0.05  # the untrained head's scores are low in "crops" mode; invariants hold at any threshold


def small_config(**overrides) -> DetectorConfig:
    return DetectorConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def clip() -> ChineseCLIP:
    return cnclip_vision.load("toy-tiny")


@pytest.fixture(scope="module")
def detector(clip) -> OpenVocabDetector:
    torch.manual_seed(0)
    return OpenVocabDetector(clip, small_config()).eval()


@pytest.fixture(scope="module")
def scene_image() -> Image.Image:
    return toyworld.render(toyworld.detection_scenes(1, seed=3)[0])


def fresh(clip, **overrides) -> OpenVocabDetector:
    torch.manual_seed(1)
    return OpenVocabDetector(clip, small_config(**overrides)).eval()


def check_result(r: dict, width: int, height: int, labels, *, threshold=THRESHOLD, nms=0.5, limit=100) -> None:
    """The documented contract of one ``predict`` dict."""
    boxes, scores, idx = r["boxes"], r["scores"], r["labels"]
    k = len(scores)
    assert boxes.shape == (k, 4) and boxes.dtype == torch.float32 and idx.shape == (k,)
    assert k <= limit
    assert len(r["label_names"]) == k
    assert r["label_names"] == [labels[i] if isinstance(labels[i], str) else labels[i].name for i in idx.tolist()]
    if k == 0:
        return
    eps = 1e-3
    assert (boxes[:, 0] >= -eps).all() and (boxes[:, 1] >= -eps).all()
    assert (boxes[:, 2] <= width + eps).all() and (boxes[:, 3] <= height + eps).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert (scores >= threshold).all() and (scores <= 1 + 1e-6).all()
    assert (scores[:-1] >= scores[1:]).all(), "scores must be sorted in descending order"
    assert 0 <= int(idx.min()) and int(idx.max()) < len(labels)
    for c in idx.unique():
        same = boxes[idx == c]
        iou = box_iou(same, same)
        iou.fill_diagonal_(0)
        assert float(iou.max()) <= nms + 1e-5, f"two boxes of label {int(c)} overlap with IoU {float(iou.max()):.3f}"


# ----------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vlm_mode="both"), "vlm_mode='both'"),
        (dict(image_size=100), "multiple of 32"),
        (dict(image_size=0), "image_size"),
        (dict(image_size=True), "image_size"),
        (dict(alpha_seen=1.5), "alpha_seen"),
        (dict(alpha_unseen=-0.1), "alpha_unseen"),
        (dict(crop_margin=-1.0), "crop_margin"),
        (dict(out_channels=2.5), "out_channels"),
        (dict(crop_top_k=0), "crop_top_k"),
        (dict(distill_weight=-0.5), "distill_weight"),
        (dict(distill_proposals=0), "distill_proposals"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kwargs)


def test_config_from_dict():
    config = small_config(seen_categories=["红色圆形"], templates=["{}", "一张{}的图片"])
    assert config.seen_categories == ("红色圆形",) and config.templates == ("{}", "一张{}的图片")
    assert DetectorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # JSON round trip
    with pytest.raises(CNClipError, match=r"recipe\.json: unknown detector options \['out_chanels'\]"):
        DetectorConfig.from_dict({**config.to_dict(), "out_chanels": 64}, source="recipe.json")


def test_rn50_clip_is_rejected():
    with torch.device("meta"):  # the check comes before any weight is touched
        rn50 = ChineseCLIP(get_config("RN50"))
    with pytest.raises(ValueError, match="ViT.*RN50"):
        OpenVocabDetector(rn50, small_config())


# ------------------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize(
    "labels, error, match",
    [
        ([], ValueError, "empty"),
        (["红色圆形", "蓝色方形", "红色圆形"], ValueError, r"duplicate labels \['红色圆形'\]"),
        (["红色圆形", 3], (TypeError, ValueError), r"labels\[1\]"),
        (["红色圆形", "  "], ValueError, r"labels\[1\]"),
        (["红色圆形", None], (TypeError, ValueError), r"labels\[1\]"),
        ("红色圆形", TypeError, "list"),
    ],
)
def test_bad_vocabulary(detector, labels, error, match):
    with pytest.raises(error, match=match):
        detector.encode_vocabulary(labels)
    with pytest.raises(error, match=match):
        DetectionPredictor(detector).set_vocabulary(labels)


def _count_text_encodings(monkeypatch) -> list:
    calls = []
    real = cnclip_vision.zeroshot.encode_texts

    def counting(model, texts, **kwargs):
        calls.append(list(texts))
        return real(model, texts, **kwargs)

    monkeypatch.setattr(cnclip_vision.zeroshot, "encode_texts", counting)
    return calls


def test_vocabulary_is_cached(clip, monkeypatch):
    predictor = DetectionPredictor(fresh(clip))
    calls = _count_text_encodings(monkeypatch)
    first = predictor.set_vocabulary(["红色圆形", "蓝色方形"])
    assert len(calls) == 1 and calls[0] == ["红色圆形", "蓝色方形"]
    again = predictor.set_vocabulary(["红色圆形", "蓝色方形"])
    assert len(calls) == 1, "the same labels were encoded twice"
    assert again is first and predictor.vocabulary is first
    predictor.predict(
        np.zeros((64, 64, 3), np.uint8), ("红色圆形", "蓝色方形"), vlm_mode="off"
    )  # predict reuses it too
    assert len(calls) == 1
    predictor.set_vocabulary(["蓝色方形", "红色圆形"])  # another order is another vocabulary
    assert len(calls) == 2
    assert torch.equal(predictor.vocabulary.embeddings, first.embeddings.flip(0))


def test_vocabulary_cache_keeps_the_most_recent(clip, monkeypatch):
    predictor = DetectionPredictor(fresh(clip), cache_size=2)
    calls = _count_text_encodings(monkeypatch)
    for labels in (["甲"], ["乙"], ["甲"], ["丙"], ["甲"], ["乙"]):  # 甲 is used again before 丙 arrives: 乙 is dropped
        predictor.set_vocabulary(labels)
    assert [c[0] for c in calls] == ["甲", "乙", "丙", "乙"]


def test_detector_is_stateless(detector, scene_image):
    """The model holds no vocabulary: two vocabularies in turn give the same answers as each one alone."""
    a, b = detector.encode_vocabulary(LABELS[:3]), detector.encode_vocabulary(LABELS[3:])
    x = [torch.from_numpy(np.array(scene_image)).permute(2, 0, 1).float() / 255]
    with torch.no_grad():
        first, _, again = (
            detector(x, a, vlm_mode="off")[0],
            detector(x, b, vlm_mode="off"),
            detector(x, a, vlm_mode="off")[0],
        )
    assert not hasattr(detector, "set_vocabulary") and not hasattr(detector, "vocabulary")
    for k in ("boxes", "scores", "labels", "embeddings"):
        assert torch.equal(first[k], again[k]), k
    e = first["embeddings"]
    assert e.shape == (len(first["scores"]), detector.embed_dim) and len(e) > 0
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(e)), atol=1e-5, rtol=0)  # region embeddings, unit norm


def test_seen_mask(clip):
    det = DetectionPredictor(fresh(clip, seen_categories=("红色圆形",)))
    assert det.set_vocabulary(["红色圆形", "蓝色方形"]).seen.tolist() == [True, False]
    assert det.set_vocabulary(["红色圆形", "蓝色方形"], seen=[False, True]).seen.tolist() == [False, True]
    assert det.set_vocabulary(["红色圆形", "蓝色方形"]).seen.tolist() == [True, False]  # not the override's entry
    with pytest.raises(ValueError, match="seen has 1 entries for 2 labels"):
        det.set_vocabulary(["红色圆形", "蓝色方形"], seen=[True])


def test_template_averaged_text_embedding(clip):
    templates = ("{}", "一张{}的图片。", "图中是一个{}。")
    det = fresh(clip, templates=templates)
    labels = ["红色圆形", "蓝色三角形", "猫"]
    vocab = det.encode_vocabulary(labels)
    assert vocab.names == labels and vocab.embeddings.shape == (3, clip.config.embed_dim)
    for i, label in enumerate(labels):
        per_template = cnclip_vision.models.encode.encode_texts(
            clip, [t.format(label) for t in templates]
        )  # normalised
        expected = F.normalize(per_template.mean(0), dim=0)
        torch.testing.assert_close(vocab.embeddings[i], expected, atol=1e-5, rtol=1e-5)
    single = fresh(clip).encode_vocabulary(labels).embeddings  # templates ("{}",): the plain name
    torch.testing.assert_close(single, cnclip_vision.models.encode.encode_texts(clip, labels), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single, vocab.embeddings, atol=1e-3)


def _image_embedding(clip, image: Image.Image) -> torch.Tensor:
    with torch.no_grad():
        return clip.encode_image(image_transform(clip.image_size)(image)[None], normalize=True)[0].float()


def test_image_query_embedding(detector, clip, scene_image):
    scene = toyworld.detection_scenes(1, seed=3)[0]
    box = tuple(int(round(v)) for v in scene.objects[0].box)
    vocab = detector.encode_vocabulary(
        ["红色圆形", ImageQuery(scene_image, "样例", box), ImageQuery(scene_image, "整图")]
    )
    assert vocab.names == ["红色圆形", "样例", "整图"]
    torch.testing.assert_close(vocab.embeddings[1], _image_embedding(clip, scene_image.crop(box)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vocab.embeddings[2], _image_embedding(clip, scene_image), atol=1e-5, rtol=1e-5)
    text_only = detector.encode_vocabulary(["红色圆形"]).embeddings[0]
    torch.testing.assert_close(vocab.embeddings[0], text_only, atol=1e-6, rtol=1e-6)  # text rows unaffected
    assert vocab.seen.tolist() == [False, False, False]


def test_image_query_new_image_gets_new_embedding(clip):
    """Each query image is encoded, even when Python reuses the id() of an earlier, freed image."""
    det = DetectionPredictor(fresh(clip))  # the predictor's cache must not reuse image queries either
    scenes = toyworld.detection_scenes(8, seed=11)
    for i, scene in enumerate(scenes):
        got = det.set_vocabulary([ImageQuery(toyworld.render_array(scene), "查询")]).embeddings[0].clone()
        expected = _image_embedding(clip, toyworld.render(scene))
        assert torch.allclose(got, expected, atol=1e-4), (
            f"scene {i}: the embedding of an earlier query image was reused"
        )


@pytest.mark.parametrize("box", [(10, 10, 10, 40), (20, 30, 60, 30.5), (200, 200, 300, 300), (-50, -50, -10, -10)])
def test_image_query_zero_size_crop(detector, scene_image, box):
    with pytest.raises(ValueError, match="ImageQuery '空框'.*zero size"):
        detector.encode_vocabulary(["红色圆形", ImageQuery(scene_image, "空框", box)])


def test_image_query_bad_box(detector, scene_image):
    with pytest.raises(ValueError, match="ImageQuery '坏框'"):
        detector.encode_vocabulary([ImageQuery(scene_image, "坏框", (1, 2, 3))])  # type: ignore[arg-type]


def test_use_vocabulary(detector):
    predictor = DetectionPredictor(detector)
    good = predictor.set_vocabulary(["红色圆形", "蓝色方形"])
    with pytest.raises(ValueError, match="shape"):
        predictor.use_vocabulary(Vocabulary(["a", "b"], torch.zeros(2, 7), torch.zeros(2, dtype=torch.bool)))
    swapped = Vocabulary(["甲", "乙"], good.embeddings.flip(0), good.seen)
    predictor.use_vocabulary(swapped)
    assert predictor.vocabulary is swapped
    assert predictor.predict(np.zeros((32, 32, 3), np.uint8), vlm_mode="off", score_threshold=0.0)[0]["label_names"][
        0
    ] in ("甲", "乙")


def test_no_vocabulary(clip):
    with pytest.raises(CNClipError, match="no vocabulary"):
        DetectionPredictor(fresh(clip)).predict(np.zeros((32, 32, 3), np.uint8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(score_threshold=1.5), "score_threshold"),
        (dict(nms_threshold=0.0), "nms_threshold"),
        (dict(max_detections=0), "max_detections"),
        (dict(vlm_mode="clip"), "vlm_mode"),
    ],
)
def test_predict_bad_arguments(detector, scene_image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        detector.predict(scene_image, LABELS, **kwargs)


# ---------------------------------------------------------------------------------------- predict
def _variants(base: Image.Image, tmp_path: Path) -> dict:
    gray16 = (np.asarray(base.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    path = tmp_path / "scene.png"
    base.save(path)
    return {
        "rgb": base,
        "L": base.convert("L"),
        "RGBA": base.convert("RGBA"),
        "P": base.convert("P"),
        "I;16": Image.fromarray(gray16),
        "wide 300x100": base.resize((300, 100)),
        "tall 90x250": base.resize((90, 250)),
        "tiny 20x20": base.resize((20, 20)),
        "large 400x400": base.resize((400, 400)),
        "path": path,
        "str path": str(path),
        "numpy": np.asarray(base),
        "tensor uint8": torch.from_numpy(np.array(base)).permute(2, 0, 1).contiguous(),
    }


KINDS = [
    "rgb",
    "L",
    "RGBA",
    "P",
    "I;16",
    "wide 300x100",
    "tall 90x250",
    "tiny 20x20",
    "large 400x400",
    "path",
    "str path",
    "numpy",
    "tensor uint8",
]


@pytest.mark.parametrize("kind", KINDS)
def test_predict_any_image(detector, scene_image, tmp_path, kind):
    image = _variants(scene_image, tmp_path)[kind]
    if kind == "I;16":
        assert image.mode == "I;16"
    width, height = {
        "wide 300x100": (300, 100),
        "tall 90x250": (90, 250),
        "tiny 20x20": (20, 20),
        "large 400x400": (400, 400),
    }.get(kind, scene_image.size)
    results = detector.predict(image, LABELS, score_threshold=THRESHOLD, vlm_mode="off")
    assert isinstance(results, list) and len(results) == 1
    check_result(results[0], width, height, LABELS)
    if kind != "tiny 20x20":
        assert len(results[0]["scores"]) > 0, "no detection at all: the checks above were vacuous"


@pytest.mark.parametrize("mode", ["crops", "dense", "off"])
def test_every_vlm_mode(detector, scene_image, mode):
    wide = scene_image.resize((300, 100))
    results = detector.predict([scene_image, wide], LABELS, score_threshold=THRESHOLD, vlm_mode=mode, batch_size=1)
    assert len(results) == 2
    check_result(results[0], 128, 128, LABELS)
    check_result(results[1], 300, 100, LABELS)
    assert len(results[0]["scores"]) > 0


def test_vlm_modes_differ(detector, scene_image):
    scores = {
        m: detector.predict(scene_image, LABELS, score_threshold=0.0, vlm_mode=m)[0]["scores"]
        for m in ("crops", "dense", "off")
    }
    assert not torch.allclose(scores["dense"][:5], scores["off"][:5])
    assert not torch.allclose(scores["crops"][:5], scores["off"][:5])
    # "crops" re-scores only the crop_top_k best proposals
    assert len(scores["crops"]) <= detector.config.crop_top_k * len(LABELS) < len(scores["off"])


def test_boxes_are_in_original_pixels(detector, scene_image):
    """A 2x nearest-upscaled image reaches the network exactly as the original (bilinear halving of
    duplicated pixels), so its detections must be the original's with boxes x2."""
    big = scene_image.resize((256, 256), Image.NEAREST)
    small_r, big_r = detector.predict(
        [scene_image, big], LABELS, score_threshold=THRESHOLD, vlm_mode="off", batch_size=1
    )
    assert len(small_r["scores"]) > 0
    torch.testing.assert_close(big_r["scores"], small_r["scores"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(big_r["boxes"], 2 * small_r["boxes"], atol=1e-2, rtol=1e-4)
    assert torch.equal(big_r["labels"], small_r["labels"])


def test_max_detections_and_nms(detector, scene_image):
    full = detector.predict(scene_image, LABELS, score_threshold=0.0, vlm_mode="off")[0]
    assert len(full["scores"]) > 5
    top = detector.predict(scene_image, LABELS, score_threshold=0.0, vlm_mode="off", max_detections=5)[0]
    check_result(top, 128, 128, LABELS, threshold=0.0, limit=5)
    assert len(top["scores"]) == 5
    assert torch.equal(top["boxes"], full["boxes"][:5]) and torch.equal(top["scores"], full["scores"][:5])
    loose = detector.predict(scene_image, LABELS, score_threshold=0.0, vlm_mode="off", nms_threshold=0.9)[0]
    check_result(loose, 128, 128, LABELS, threshold=0.0, nms=0.9)
    strict = detector.predict(scene_image, LABELS, score_threshold=0.0, vlm_mode="off", nms_threshold=0.1)[0]
    check_result(strict, 128, 128, LABELS, threshold=0.0, nms=0.1)
    assert len(strict["scores"]) < len(loose["scores"])
    high = detector.predict(scene_image, LABELS, score_threshold=float(full["scores"][3]), vlm_mode="off")[0]
    assert len(high["scores"]) <= 3 and (high["scores"] > full["scores"][3]).all()


def test_predict_order_and_batches(detector, scene_image):
    other = toyworld.render(toyworld.detection_scenes(1, seed=4)[0])
    results = detector.predict(
        [scene_image, other, scene_image], LABELS, score_threshold=THRESHOLD, vlm_mode="off", batch_size=1
    )
    assert len(results) == 3
    assert torch.equal(results[0]["boxes"], results[2]["boxes"]) and torch.equal(
        results[0]["scores"], results[2]["scores"]
    )
    assert not torch.equal(results[0]["scores"], results[1]["scores"])


def test_predict_keeps_training_mode(clip, scene_image):
    clip_mode = clip.training
    det = fresh(clip).train()
    assert det.clip.training == clip_mode, "train() must not change the caller's CLIP"
    det.predict(scene_image, LABELS, vlm_mode="off")
    assert det.training and det.clip.training == clip_mode
    det.eval()
    det.predict(scene_image, LABELS, vlm_mode="off")
    assert not det.training


def _manual_p_det(det: OpenVocabDetector, image: Image.Image, vocab: Vocabulary) -> torch.Tensor:
    """p_det of every proposal, recomputed from the detector's parts: softmax over background + classes."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        batch, _ = det.transform([x])
        features = det.backbone(batch.tensors)
        proposals, _ = det.rpn(batch, features)
        embeddings, _ = det.region_head(det.roi_heads.box_roi_pool(features, proposals, batch.image_sizes))
        logits = det._det_logits(embeddings, vocab.embeddings)
    return logits.softmax(-1)[:, 1:]


def test_off_mode_scores_are_p_det(detector, scene_image):
    """Without NMS, threshold or limit, "off" returns every (proposal, class) pair scored p_det."""
    predictor = DetectionPredictor(detector)
    p_det = _manual_p_det(detector, scene_image, predictor.set_vocabulary(LABELS))
    assert (p_det.sum(-1) < 1).all()  # the background takes the rest
    out = predictor.predict(
        scene_image, score_threshold=0.0, nms_threshold=1.0, max_detections=100_000, vlm_mode="off"
    )[0]
    expected = p_det.flatten().sort(descending=True).values
    assert len(out["scores"]) == len(expected)
    torch.testing.assert_close(out["scores"], expected, atol=1e-6, rtol=1e-5)


def _scores_by_pair(result: dict) -> dict:
    return {
        (tuple(round(v, 3) for v in b.tolist()), int(c)): float(s)
        for b, c, s in zip(result["boxes"], result["labels"], result["scores"])
    }


def test_geometric_ensemble(clip, scene_image, monkeypatch):
    """score = p_det^(1-a) * p_vlm^a with a = alpha_seen / alpha_unseen per class (dense mode: the same boxes
    for every alpha, so scores can be matched pair by pair)."""
    det = fresh(clip)
    predictor = DetectionPredictor(det)
    seen = [True, False, True, False, True, False]
    predictor.set_vocabulary(LABELS, seen=seen)
    kw = dict(score_threshold=0.0, nms_threshold=1.0, max_detections=100_000, vlm_mode="dense")

    def run(a_seen: float, a_unseen: float) -> dict:
        monkeypatch.setattr(det.config, "alpha_seen", a_seen)
        monkeypatch.setattr(det.config, "alpha_unseen", a_unseen)
        return _scores_by_pair(predictor.predict(scene_image, **kw)[0])

    p_det, p_vlm, mixed, half = run(0.0, 0.0), run(1.0, 1.0), run(0.0, 1.0), run(0.5, 0.5)
    assert len(p_det) > 50 and p_det.keys() == p_vlm.keys() == mixed.keys() == half.keys()
    for key in p_det:
        expected = p_det[key] if seen[key[1]] else p_vlm[key]
        assert math.isclose(mixed[key], expected, rel_tol=1e-4, abs_tol=1e-7)
        assert math.isclose(half[key], math.sqrt(p_det[key] * p_vlm[key]), rel_tol=1e-4, abs_tol=1e-7)
    off = predictor.predict(scene_image, **{**kw, "vlm_mode": "off"})[0]["scores"]
    torch.testing.assert_close(off, torch.tensor(sorted(p_det.values(), reverse=True)), atol=1e-5, rtol=1e-4)
    # p_vlm is a softmax over the classes: each box's p_vlm sums to 1
    per_box: dict = {}
    for (box, _), s in p_vlm.items():
        per_box[box] = per_box.get(box, 0.0) + s
    assert all(math.isclose(v, 1.0, abs_tol=1e-4) for v in per_box.values())


# ------------------------------------------------------------------------------------ persistence
def test_head_state_dict(detector, clip):
    head = detector.head_state_dict()
    assert head and not any(k.startswith("clip.") for k in head)
    assert not any(k.startswith("backbone.tower.") for k in head)  # frozen tower: not the detector's weights
    assert {"background", "log_inv_temperature"} <= set(head)
    assert any(k.startswith("rpn.") for k in head) and any(k.startswith("region_head.") for k in head)
    head_bytes = sum(v.numel() * v.element_size() for v in head.values())
    clip_bytes = sum(v.numel() * v.element_size() for v in clip.state_dict().values())
    assert head_bytes < clip_bytes / 4


def _model_snapshot(model: ChineseCLIP) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
    )


def _assert_unchanged(model: ChineseCLIP, snapshot: tuple) -> None:
    state, flags, modes = snapshot
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "the caller's weights changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, "requires_grad flags changed"
    assert {n: m.training for n, m in model.named_modules()} == modes, "train/eval modes changed"


def _one_training_step(det: OpenVocabDetector, scene_image) -> None:
    scene = toyworld.detection_scenes(1, seed=3)[0]
    vocab = det.encode_vocabulary([c.name for c in toyworld.CATEGORIES])
    target = {
        "boxes": torch.tensor([o.box for o in scene.objects], dtype=torch.float32),
        "labels": torch.tensor([toyworld.CATEGORIES.index(o.category) for o in scene.objects]),
    }
    x = torch.from_numpy(np.array(scene_image)).permute(2, 0, 1).float() / 255
    det.train()
    params = [p for _, p in det.trainable_named_parameters()]
    optimizer = torch.optim.SGD(params, lr=1.0)
    sum(det([x], vocab, [target]).values()).backward()
    optimizer.step()
    det.eval()


def test_frozen_detector_uses_the_clip_tower_itself(scene_image):
    """One image-tower object: the pyramid runs clip.visual itself; building, training the head and predicting
    leave the caller's model exactly as it was (weights, requires_grad flags, modes)."""
    mine = cnclip_vision.load("toy-tiny").train()  # a user's model in train mode, every parameter trainable
    before = _model_snapshot(mine)
    det = OpenVocabDetector(mine, small_config())
    assert det.backbone.tower is mine.visual
    _one_training_step(det, scene_image)
    det.predict(scene_image, LABELS, vlm_mode="crops")
    _assert_unchanged(mine, before)
    assert not any(n.startswith(("clip.", "backbone.tower.")) for n, _ in det.trainable_named_parameters())


def test_trainable_layers_train_a_copy(clip, scene_image):
    """trainable_layers > 0 fine-tunes a copy of the tower: the caller's CLIP never changes, and the crops
    branch keeps scoring with the frozen CLIP tower."""
    mine = copy.deepcopy(clip)
    before = _model_snapshot(mine)
    det = OpenVocabDetector(mine, small_config(trainable_layers=1))
    assert det.backbone.tower is not mine.visual and det.clip is mine
    assert not any(a.data_ptr() == b.data_ptr() for a in det.backbone.tower.parameters() for b in mine.parameters())
    image = det.transform([torch.from_numpy(np.array(scene_image)).permute(2, 0, 1).float() / 255])[0].tensors
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0], [30.0, 40.0, 100.0, 90.0]])
    with torch.no_grad():
        crops_before, tokens_before = det._crop_embeddings(image, [boxes])[0], det.backbone._tokens(image, 32)
    _one_training_step(det, scene_image)
    _assert_unchanged(mine, before)
    with torch.no_grad():
        crops_after, tokens_after = det._crop_embeddings(image, [boxes])[0], det.backbone._tokens(image, 32)
    assert not torch.allclose(tokens_after, tokens_before), "the copied tower was not trained"
    torch.testing.assert_close(crops_after, crops_before, atol=0, rtol=0)  # crops: the frozen CLIP tower


def test_from_pretrained_does_not_freeze_the_callers_model(tmp_path):
    mine = cnclip_vision.load("toy-tiny").train()
    before = _model_snapshot(mine)
    det = OpenVocabDetector.from_pretrained("toy-detector", clip=mine)
    det.predict(np.zeros((64, 64, 3), np.uint8), LABELS, vlm_mode="off")
    det.train().eval()
    _assert_unchanged(mine, before)


def test_head_state_dict_with_trainable_layers(clip):
    det = OpenVocabDetector(copy.deepcopy(clip), small_config(trainable_layers=1))
    tower = [k for k in det.head_state_dict() if k.startswith("backbone.tower.")]
    assert tower, "fine-tuned tower blocks belong to the detector's weights"
    trainable = {f"backbone.tower.{n}" for n, p in det.backbone.tower.named_parameters() if p.requires_grad}
    assert set(tower) == trainable


def test_save_and_load_round_trip(detector, clip, scene_image, tmp_path):
    out = detector.save_pretrained(tmp_path / "det")
    assert sorted(p.name for p in out.iterdir()) == ["detector.safetensors", "detector_config.json"]
    meta = json.loads((out / "detector_config.json").read_text(encoding="utf-8"))
    assert meta["detector"]["clip"] == "toy-tiny" and meta["detector"]["out_channels"] == 32
    weights = load_file(out / "detector.safetensors")
    assert not any(k.startswith("clip.") for k in weights)
    assert (out / "detector.safetensors").stat().st_size < sum(v.numel() * 4 for v in clip.state_dict().values()) / 4

    loaded = OpenVocabDetector.from_pretrained(out)  # the CLIP by name, as the config says
    assert not loaded.training and loaded.config == detector.config
    for k, v in detector.head_state_dict().items():
        assert torch.equal(loaded.head_state_dict()[k], v), k
    for mode, images in (("crops", [scene_image]), ("off", [scene_image, scene_image.resize((300, 100))])):
        a = detector.predict(images, LABELS, score_threshold=THRESHOLD, vlm_mode=mode)
        b = loaded.predict(images, LABELS, score_threshold=THRESHOLD, vlm_mode=mode)
        for ra, rb in zip(a, b):
            assert len(ra["scores"]) > 0
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(ra[key], rb[key]), (mode, key)
            assert ra["label_names"] == rb["label_names"]
    again = OpenVocabDetector.from_pretrained(out, clip=clip, vlm_mode="dense")  # a given CLIP; an inference override
    assert again.clip is clip and again.config.vlm_mode == "dense"


def test_save_with_clip(clip, scene_image, tmp_path, monkeypatch):
    other_clip = copy.deepcopy(clip)
    torch.manual_seed(5)
    with torch.no_grad():  # a CLIP that is not toy-tiny any more: loading it by name would be wrong
        other_clip.logit_scale.add_(0.5)
        for p in other_clip.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    det = fresh(other_clip)
    out = det.save_pretrained(tmp_path / "with-clip", include_clip=True)
    assert (out / "clip").is_dir()
    assert json.loads((out / "detector_config.json").read_text(encoding="utf-8"))["detector"]["clip"] == "clip"
    standalone = cnclip_vision.load(out / "clip")  # an ordinary loadable CLIP directory
    for k, v in other_clip.state_dict().items():
        torch.testing.assert_close(standalone.state_dict()[k].float(), v.float(), atol=1e-3, rtol=1e-3)
    monkeypatch.chdir(tmp_path)  # "clip" resolves against the detector directory, not the working directory
    loaded = OpenVocabDetector.from_pretrained(out)
    assert float(loaded.clip.logit_scale) == pytest.approx(float(other_clip.logit_scale), abs=1e-3)
    a = det.predict(scene_image, LABELS, score_threshold=THRESHOLD)[0]
    b = loaded.predict(scene_image, LABELS, score_threshold=THRESHOLD)[0]
    assert len(a["scores"]) > 0
    torch.testing.assert_close(b["scores"], a["scores"], atol=1e-3, rtol=1e-3)


def test_save_half(detector, scene_image, tmp_path):
    full = detector.save_pretrained(tmp_path / "fp32")
    half = detector.save_pretrained(tmp_path / "fp16", half=True)
    stored = load_file(half / "detector.safetensors")
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert (half / "detector.safetensors").stat().st_size < 0.6 * (full / "detector.safetensors").stat().st_size
    loaded = OpenVocabDetector.from_pretrained(half)
    head = loaded.head_state_dict()
    original = detector.head_state_dict()
    for k, v in original.items():
        assert head[k].dtype == v.dtype, k  # loads back in the model's dtype (fp32)
        assert torch.equal(head[k], v.half().to(v.dtype)) if v.is_floating_point() else torch.equal(head[k], v)
        torch.testing.assert_close(head[k], v, atol=1e-3, rtol=2e-3)
    a = detector.predict(scene_image, LABELS, score_threshold=0.0, vlm_mode="off", nms_threshold=1.0)[0]
    b = loaded.predict(scene_image, LABELS, score_threshold=0.0, vlm_mode="off", nms_threshold=1.0)[0]
    torch.testing.assert_close(b["scores"][:20], a["scores"][:20], atol=0.05, rtol=0.05)


@pytest.fixture
def saved(detector, tmp_path) -> Path:
    return detector.save_pretrained(tmp_path / "saved")


def test_load_missing(tmp_path):
    with pytest.raises(CheckpointError, match="detector_config.json is missing"):
        OpenVocabDetector.from_pretrained(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty.*detector_config.json"):
        OpenVocabDetector.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_load_bad_weights_file(saved, damage):
    weights = saved / "detector.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"this is not a safetensors file" * 10)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match="detector.safetensors"):
        OpenVocabDetector.from_pretrained(saved)


@pytest.mark.parametrize("change", [dict(out_channels=16), dict(representation_size=32), dict(levels="p2-p6")])
def test_load_mismatching_config(saved, change):
    path = saved / "detector_config.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["detector"].update(change)
    path.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"detector\.safetensors does not fit"):
        OpenVocabDetector.from_pretrained(saved)


def test_load_extra_or_missing_tensors(saved):
    path = saved / "detector.safetensors"
    state = load_file(path)
    save_file({**state, "extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected \['extra.weight'\]"):
        OpenVocabDetector.from_pretrained(saved)
    state.pop("background")
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing \['background'\]"):
        OpenVocabDetector.from_pretrained(saved)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"clip_config": {}}),  # no "detector" section
        json.dumps({"detector": ["clip", "toy-tiny"]}),
        "UNKNOWN_KEY",  # an option this version does not know
        "BAD_VALUE",  # a value DetectorConfig rejects
    ],
)
def test_load_bad_config_file(saved, content):
    """Whatever is wrong inside detector_config.json, the error is a CheckpointError naming that file."""
    path = saved / "detector_config.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    if content == "UNKNOWN_KEY":
        content = json.dumps({**meta, "detector": {**meta["detector"], "box_score_threshold": 0.5}})
    elif content == "BAD_VALUE":
        content = json.dumps({**meta, "detector": {**meta["detector"], "image_size": 100}})
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match="detector_config.json"):
        OpenVocabDetector.from_pretrained(saved)


def test_load_unknown_override(saved):
    with pytest.raises(CNClipError, match="vlm_modus"):
        OpenVocabDetector.from_pretrained(saved, vlm_modus="dense")
    with pytest.raises(ValueError, match="vlm_mode"):
        OpenVocabDetector.from_pretrained(saved, vlm_mode="everything")


def test_config_dataclass_is_not_shared(detector, tmp_path):
    """save_pretrained(include_clip=True) must not rewrite the live detector's config."""
    before = dataclasses.asdict(detector.config)
    detector.save_pretrained(tmp_path / "copy", include_clip=True)
    assert dataclasses.asdict(detector.config) == before


def test_crops_of_several_images_share_batches_and_match_one_image_at_a_time(clip, scene_image):
    """crops mode batches the crops of all images together (crop_batch_size across images): the embeddings and
    the detections are those of one image at a time."""
    det = OpenVocabDetector(clip, small_config(crop_batch_size=3, crop_top_k=5)).eval()
    pixels = torch.from_numpy(np.array(scene_image)).permute(2, 0, 1).float() / 255
    images = [pixels, pixels.flip(-1)]
    batch = det.transform(images)[0].tensors
    boxes = [
        torch.tensor([[10.0, 10.0, 60.0, 60.0], [30.0, 40.0, 100.0, 90.0]]),
        torch.tensor([[5.0, 5.0, 50.0, 70.0]]),
    ]
    with torch.no_grad():
        together = det._crop_embeddings(batch, boxes)
        alone = [det._crop_embeddings(batch[i : i + 1], [b])[0] for i, b in enumerate(boxes)]
        empty = det._crop_embeddings(batch, [boxes[0][:0], boxes[0][:0]])
    assert [t.shape[0] for t in together] == [2, 1] and [e.shape for e in empty] == [(0, det.embed_dim)] * 2
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    labels = [c.name for c in toyworld.CATEGORIES[:4]]
    both = det.predict(images, labels, vlm_mode="crops", score_threshold=0.0, batch_size=2)
    single = [det.predict([im], labels, vlm_mode="crops", score_threshold=0.0)[0] for im in images]
    for a, b in zip(both, single):
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=1e-4)


def test_predictor_bf16_runs_the_backbone_in_bf16_and_keeps_the_detections(clip, scene_image, monkeypatch):
    """precision="bf16": the backbone under bf16 autocast, heads and boxes in fp32 (float32 results close to
    fp32's); "auto" follows the device's bf16 units; anything else is refused."""
    det = OpenVocabDetector(clip, small_config()).eval()
    seen = []
    hook = det.backbone.register_forward_hook(lambda m, i, out: seen.append({v.dtype for v in out.values()}))
    labels = [c.name for c in toyworld.CATEGORIES[:4]]
    results = {}
    for precision in ("fp32", "bf16"):
        predictor = DetectionPredictor(det, precision=precision, score_threshold=0.0)
        results[precision] = predictor.predict([scene_image], labels, vlm_mode="crops")[0]
    hook.remove()
    assert seen == [{torch.float32}, {torch.bfloat16}]
    a, b = results["fp32"], results["bf16"]
    assert all(v.dtype == torch.float32 for k, v in b.items() if k in ("boxes", "scores", "embeddings"))
    assert len(a["scores"]) and len(b["scores"])
    assert box_iou(a["boxes"][:1], b["boxes"][:1]).item() > 0.9  # the best box survives bf16
    for chosen, expected in (("bf16", "bf16"), ("fp32", "fp32")):
        monkeypatch.setattr("cnclip_vision.device.auto_precision", lambda device=None, c=chosen: c)
        assert DetectionPredictor(det, precision="auto").precision == expected
    with pytest.raises(ValueError, match="precision"):
        DetectionPredictor(det, precision="int8")


def _training_batch(n: int = 2) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    coco = toyworld.detection_scenes(n, seed=11)
    images, targets = [], []
    for scene in coco:
        images.append(torch.from_numpy(np.array(toyworld.render(scene))).permute(2, 0, 1).float() / 255)
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)
        targets.append({"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long)})
    return images, targets


def test_vild_distillation_loss(clip):
    """``distill_weight`` adds ``loss_distill`` in training (linear in the weight), its gradient reaches the region
    head and never the frozen CLIP, and optimising it pulls the region embeddings to the CLIP's crop embeddings."""
    images, targets = _training_batch()
    torch.manual_seed(0)
    plain = OpenVocabDetector(clip, small_config()).train()
    vocab = plain.encode_vocabulary(LABELS[:1])
    assert "loss_distill" not in plain(images, vocab, targets)
    distilled = OpenVocabDetector(clip, small_config(distill_weight=1.0, distill_proposals=8))
    distilled.load_state_dict(plain.state_dict())
    distilled.train()
    torch.manual_seed(0)
    loss = distilled(images, vocab, targets)["loss_distill"]
    half = copy.deepcopy(distilled)
    half.config = dataclasses.replace(distilled.config, distill_weight=0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(half(images, vocab, targets)["loss_distill"], loss / 2)
    assert 0 < float(loss.detach()) <= 2 * math.sqrt(clip.config.embed_dim)  # L1 of two unit vectors <= 2 sqrt(D)
    loss.backward()
    assert distilled.region_head.embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())
    head = [p for n, p in distilled.trainable_named_parameters() if n.startswith("region_head.")]
    optimizer = torch.optim.Adam(head, lr=3e-3)
    for _ in range(25):
        optimizer.zero_grad()
        distilled(images, vocab, targets)["loss_distill"].backward()
        optimizer.step()
    after = float(distilled(images, vocab, targets)["loss_distill"])
    assert after < 0.5 * float(loss.detach()), (float(loss.detach()), after)
