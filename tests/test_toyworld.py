"""The synthetic toy world: vocabulary and splits, determinism, exact boxes, captions that parse back,
retrieval uniqueness, COCO output, file layouts."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections import Counter

import numpy as np
import PIL
import pytest
from PIL import Image

from cnclip_vision.toy import world as tw

logger = logging.getLogger(__name__)

# Golden digests of generate_pairs(50, seed=0), recorded with these versions (images depend on Pillow's
# polygon rasteriser and numpy's integer sampler; captions only on numpy's Generator.random).
GOLDEN_VERSIONS = ("13.0.0", "2.4.6")
GOLDEN_IMAGES = "58872510cb7d7422726bc04086cb146ca81aeefee1e7f7589bc461b8bac3bd81"
GOLDEN_CAPTIONS = "8c67c85cd62ff6939489d8f4481dc0c74757dc3f1de78673cc150f1e40f3c374"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------- vocabulary
def test_vocabulary() -> None:
    assert len(tw.COLOURS) == 8 and len(tw.SHAPES) == 8
    assert len(tw.CATEGORIES) == 64
    assert [c.id for c in tw.CATEGORIES] == list(range(1, 65))
    assert len({c.name for c in tw.CATEGORIES}) == 64
    for c in tw.CATEGORIES:
        assert c.name == c.colour + c.shape
        assert tw.get_category(c.id) is c and tw.get_category(c.name) is c
        assert list(tw.COLOURS)[c.colour_index] == c.colour and tw.SHAPES[c.shape_index] == c.shape
    with pytest.raises(ValueError):
        tw.get_category(65)
    with pytest.raises(ValueError):
        tw.get_category("白色圆形")


def test_colours_separable_and_backgrounds_grey() -> None:
    colours = list(tw.COLOURS.values())
    assert min(float(np.linalg.norm(np.subtract(a, b))) for a, b in itertools.combinations(colours, 2)) > 80
    assert min(max(c) - min(c) for c in colours) >= 130  # chroma of every object colour
    rng = np.random.default_rng(0)
    for _ in range(300):
        bg = tw._sample_background(rng)
        arr = tw._render_background(bg, 64).astype(int)
        assert int((arr.max(-1) - arr.min(-1)).max()) <= 20, bg  # backgrounds stay grey / beige


def test_base_novel_split_covers_every_colour_and_shape() -> None:
    base, novel, held = tw.BASE_CATEGORIES, tw.NOVEL_CATEGORIES, tw.HELD_OUT_COMBOS
    assert len(base) == 48 and len(novel) == 16
    assert {c.id for c in base} | {c.id for c in novel} == set(range(1, 65))
    assert not {c.id for c in base} & {c.id for c in novel}
    for side in (base, novel):
        assert {c.colour for c in side} == set(tw.COLOURS)
        assert {c.shape for c in side} == set(tw.SHAPES)
    assert set(Counter(c.colour for c in novel).values()) == {2}
    assert set(Counter(c.shape for c in novel).values()) == {2}
    # held-out combos: each colour and shape at most once, disjoint from the novel set
    assert 4 <= len(held) <= 8
    assert len({c.colour for c in held}) == len(held) == len({c.shape for c in held})
    assert not {c.id for c in held} & {c.id for c in novel}
    # pretraining without the held-out combos still shows every colour and shape
    rest = [c for c in tw.CATEGORIES if c not in held]
    assert {c.colour for c in rest} == set(tw.COLOURS) and {c.shape for c in rest} == set(tw.SHAPES)


# --------------------------------------------------------------------------------------- determinism
def test_pairs_deterministic_and_independent_of_workers() -> None:
    n = tw.PAIR_CHUNK * 2 + 37  # three chunks, the last one partial
    a = tw.generate_pairs(n, 7)
    b = tw.generate_pairs(n, 7)
    c = tw.generate_pairs(n, 7, workers=2)
    assert a.images.shape == (n, 64, 64, 3) and a.images.dtype == np.uint8
    for other in (b, c):
        assert np.array_equal(a.images, other.images)
        assert a.captions == other.captions and a.class_sets == other.class_sets
    d = tw.generate_pairs(40, 8)
    assert not np.array_equal(a.images[:40], d.images) and a.captions[:40] != d.captions
    # a prefix is stable: the first chunk does not depend on n
    e = tw.generate_pairs(40, 7)
    assert np.array_equal(a.images[:40], e.images) and a.captions[:40] == e.captions


def test_golden_digests() -> None:
    pairs = tw.generate_pairs(50, 0)
    assert _digest("\n".join(pairs.captions).encode()) == GOLDEN_CAPTIONS
    if (PIL.__version__, np.__version__) != GOLDEN_VERSIONS:
        pytest.skip(f"image digest recorded with Pillow/numpy {GOLDEN_VERSIONS}")
    assert _digest(pairs.images.tobytes()) == GOLDEN_IMAGES


def test_render_is_a_pure_function_of_the_scene() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = tw.sample_scene(rng)
        rebuilt = tw.Scene(scene.size, scene.background, scene.objects)  # no cached masks
        assert rebuilt == scene
        assert np.array_equal(tw.render_array(scene), tw.render_array(rebuilt))


def test_held_out_combos_never_in_pairs_and_speed() -> None:
    n = 2000
    start, cpu = time.perf_counter(), time.process_time()
    pairs = tw.generate_pairs(n, 1)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    logger.info(
        "generate_pairs: %d 64 px pairs in %.2f s wall (%.0f img/s), %.2f s CPU (%.0f img/s per core)",
        n,
        wall,
        n / wall,
        cpu,
        n / max(cpu, 1e-9),
    )
    held = {c.id for c in tw.HELD_OUT_COMBOS}
    seen = {cid for s in pairs.class_sets for cid in s}
    assert not seen & held
    assert seen == {c.id for c in tw.CATEGORIES} - held  # everything else shows up in 2,000 pairs
    mentioned = {cid for text in pairs.captions for (cid, _), _ in tw.caption_facts(text)}
    assert mentioned == seen


# ------------------------------------------------------------------------------------------- geometry
PLAIN = tw.Background("noise", (128, 128))


def _touched_box(arr: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((arr != 128).any(-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("kind", ["pairs", "detection"])
def test_boxes_are_tight_and_inside(kind: str) -> None:
    rng = np.random.default_rng(11)
    scenes = [tw.sample_scene(rng) for _ in range(150)] if kind == "pairs" else tw.detection_scenes(40, 2)
    for scene in scenes:
        full = tw.render_array(scene)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= scene.size and 0 <= y1 < y2 <= scene.size
            # alone on a flat grey background, the touched pixels span exactly the box
            alone = tw.render_array(tw.Scene(scene.size, PLAIN, (obj,)))
            assert _touched_box(alone) == obj.box, (obj, scene.background)
            # in the scene, the object's colour fills its box: pixels near that colour reach within 1 px of
            # each side (2 px at the anti-aliased tip of a triangle, diamond or star point)
            near = np.abs(full[y1:y2, x1:x2].astype(int) - np.asarray(obj.rgb)).max(-1) <= 40
            ys, xs = np.nonzero(near)
            assert len(xs) > 0, obj
            slack = 1 if obj.category.shape in ("圆形", "正方形", "十字形", "半圆形") else 2
            assert max(xs.min(), ys.min(), (x2 - x1 - 1) - xs.max(), (y2 - y1 - 1) - ys.max()) <= slack, obj
        # objects do not overlap
        for a, b in itertools.combinations(scene.objects, 2):
            assert np.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]) >= a.radius + b.radius


def test_object_count_mix_and_radii() -> None:
    rng = np.random.default_rng(5)
    scenes = [tw.sample_scene(rng) for _ in range(2000)]
    counts = Counter(len(s.objects) for s in scenes)
    for k, p in zip((1, 2, 3), tw.DEFAULT_OBJECT_MIX):
        assert abs(counts[k] / 2000 - p) < 0.04, counts
    for s in scenes:
        lo, hi = (12, 20) if len(s.objects) == 1 else (10, 12)
        assert all(lo <= o.radius <= hi for o in s.objects)
    assert {s.background.kind for s in scenes} == set(tw.BACKGROUND_KINDS)
    assert any(len(s.category_ids) < len(s.objects) for s in scenes)  # repeated categories (counts > 1)


def test_categories_and_exclude_restrict_scenes() -> None:
    rng = np.random.default_rng(6)
    novel = {c.id for c in tw.NOVEL_CATEGORIES}
    for _ in range(200):
        assert set(tw.sample_scene(rng, categories=tw.BASE_CATEGORIES).category_ids).isdisjoint(novel)
        assert set(tw.sample_scene(rng, exclude=tw.BASE_CATEGORIES).category_ids) <= novel
    with pytest.raises(ValueError):
        tw.sample_scene(rng, categories=["红色圆形"], exclude=[1])


# ------------------------------------------------------------------------------------------- captions
def test_captions_state_colour_shape_count_and_position() -> None:
    rng = np.random.default_rng(9)
    for _ in range(500):
        scene = tw.sample_scene(rng)
        with_pos, without = tw.scene_facts(scene), tw.scene_facts(scene, with_positions=False)
        assert tw.caption_facts(tw.caption(scene, rng, with_positions=True)) == with_pos
        assert tw.caption_facts(tw.caption(scene, rng, with_positions=False)) == without
        assert tw.caption_facts(tw.caption(scene, rng)) in (with_pos, without)
        assert sum(n for _, n in without) == len(scene.objects)


def test_caption_examples_parse() -> None:
    red_circle, blue_triangle = tw.get_category("红色圆形").id, tw.get_category("蓝色三角形").id
    facts = tw.caption_facts("左上角有一个红色的圆形，右边是两个蓝色的三角形")
    assert facts == (((red_circle, 0), 1), ((blue_triangle, 5), 2))
    assert tw.caption_facts("画面中央是一个紫色的菱形") == (((tw.get_category("紫色菱形").id, 4), 1),)
    assert tw.caption_facts("图中有三个图形：一个红色半圆形和两个红色圆形。") == (
        ((red_circle, None), 2),
        ((tw.get_category("红色半圆形").id, None), 1),
    )


def test_captions_vary() -> None:
    rng = np.random.default_rng(10)
    scene = tw.sample_scene(rng, n_objects=2)
    texts = {tw.caption(scene, rng) for _ in range(200)}
    assert len(texts) > 30
    pairs = tw.generate_pairs(300, 4)
    assert any(p[0] in t for t in pairs.captions for p in tw.POSITIONS)
    assert any("两个" in t for t in pairs.captions) and any("三个" in t for t in pairs.captions)
    positional = sum(tw.caption_facts(t)[0][0][1] is not None for t in pairs.captions)
    assert 0.35 < positional / 300 < 0.65  # "random": about half of the captions name positions


def test_class_caption() -> None:
    cat = tw.get_category(1)
    assert tw.class_caption(cat) == cat.name == "红色圆形"
    rng = np.random.default_rng(0)
    texts = {tw.class_caption(cat, rng) for _ in range(50)}
    assert len(texts) > 2 and all(tw.caption_facts(t) == (((1, None), 1),) for t in texts)
    assert all("{}" in t for t in tw.ZERO_SHOT_TEMPLATES)


def test_class_set_keys() -> None:
    sets = [(1,), (1, 64), (64, 1), (2,), (), (1,)]
    keys = tw.class_set_keys([tuple(sorted(s)) for s in sets])
    assert keys.dtype == np.int64
    same = keys[:, None] == keys[None, :]
    expected = np.array([[set(a) == set(b) for b in sets] for a in sets])
    assert np.array_equal(same, expected)


# ------------------------------------------------------------------------------------------- datasets
def test_retrieval_set_captions_identify_their_image() -> None:
    n = 400
    data = tw.retrieval_set(n, 3)
    assert data.images.shape == (n, 64, 64, 3)
    facts = [tw.caption_facts(c) for c in data.captions]
    assert len(set(facts)) == n
    assert all(f[0][0][1] is not None for f in facts)  # positions always stated
    assert all(tuple(sorted({cid for (cid, _), _ in f})) == s for f, s in zip(facts, data.class_sets))
    again = tw.retrieval_set(n, 3)
    assert again.captions == data.captions and np.array_equal(again.images, data.images)


def test_classification_set_and_imagefolder(tmp_path) -> None:
    from cnclip_vision.zeroshot import read_label_file

    data = tw.classification_set(2, 0, categories=tw.NOVEL_CATEGORIES)
    assert data.images.shape == (32, 64, 64, 3)
    assert data.labels == [c.name for c in tw.NOVEL_CATEGORIES for _ in range(2)]
    root = tw.write_imagefolder(tmp_path / "zs", 2, 0)
    labels = read_label_file(root / "label_cn.txt")
    assert labels == [c.name for c in tw.CATEGORIES]
    folders = sorted(p.name for p in (root / "test").iterdir())
    assert folders == [f"{i:03d}" for i in range(64)]
    full = tw.classification_set(2, 0)
    for i in (0, 37, 63):
        files = sorted((root / "test" / f"{i:03d}").iterdir())
        assert len(files) == 2
        assert np.array_equal(np.asarray(Image.open(files[1]).convert("RGB")), full.images[2 * i + 1])


def test_pairs_files(tmp_path) -> None:
    path = tw.write_pairs_jsonl(tmp_path / "j", 30, 0)
    pairs = tw.generate_pairs(30, 0)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["caption"] for r in rows] == pairs.captions
    assert [tuple(r["category_ids"]) for r in rows] == pairs.class_sets
    for r, image in zip(rows, pairs.images):
        assert np.array_equal(np.asarray(Image.open(path.parent / r["image"]).convert("RGB")), image)
    tsv = tw.write_pairs_tsv(tmp_path / "t", 30, 0)
    lines = tsv.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "image\tcaption" and len(lines) == 31
    assert [ln.split("\t")[1] for ln in lines[1:]] == pairs.captions
    assert all((tsv.parent / ln.split("\t")[0]).is_file() for ln in lines[1:])


def test_coco_detection_set(tmp_path) -> None:
    from pycocotools.coco import COCO

    path = tw.write_detection_set(tmp_path / "det", 12, 0)
    coco = COCO(str(path))
    assert sorted(coco.getCatIds()) == list(range(1, 65))  # contiguous
    assert [c["name"] for c in coco.loadCats(list(range(1, 65)))] == [c.name for c in tw.CATEGORIES]
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert {"info", "licenses", "images", "annotations", "categories"} <= raw.keys()
    assert raw == tw.detection_set(12, 0)
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        with Image.open(path.parent / "images" / info["file_name"]) as im:
            assert im.size == (info["width"], info["height"]) == (128, 128)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 3 <= len(anns) <= 6
        for a in anns:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
            assert a["iscrowd"] == 0 and a["area"] == w * h
    ids = [a["id"] for a in raw["annotations"]]
    assert ids == list(range(1, len(ids) + 1))


def test_coco_base_only_and_unannotated_novel() -> None:
    base_ids = {c.id for c in tw.BASE_CATEGORIES}
    coco = tw.detection_set(10, 1, categories=tw.BASE_CATEGORIES)
    assert {c["id"] for c in coco["categories"]} == base_ids  # global ids kept
    assert all(c["split"] == "base" for c in coco["categories"])
    assert {a["category_id"] for a in coco["annotations"]} <= base_ids
    # all categories drawn, only base ones annotated (novel objects appear as unlabelled background)
    mixed = tw.detection_set(20, 1, annotate=tw.BASE_CATEGORIES)
    scenes = tw.detection_scenes(20, 1)
    drawn = sum(len(s.objects) for s in scenes)
    assert len(mixed["annotations"]) == sum(o.category_id in base_ids for s in scenes for o in s.objects) < drawn


@pytest.mark.parametrize("protocol", ["held-out-shapes", "held-out-colours"])
def test_attribute_held_out_protocols_withhold_whole_attributes(protocol: str) -> None:
    base, novel = tw.protocol_split(protocol)
    assert len(novel) == 16 and len(base) == 48 and set(base) | set(novel) == set(tw.CATEGORIES)
    attribute = "shape" if protocol == "held-out-shapes" else "colour"
    held = tw.HELD_OUT_SHAPES if attribute == "shape" else tw.HELD_OUT_COLOURS
    # every category of the held-out attribute values is novel, none of them appears in a base category
    assert {getattr(c, attribute) for c in novel} == set(held)
    assert not {getattr(c, attribute) for c in base} & set(held)
    other = "colour" if attribute == "shape" else "shape"
    assert {getattr(c, other) for c in novel} == {getattr(c, other) for c in tw.CATEGORIES}
    # training files of the protocol: base boxes only, novel objects drawn but unlabelled, splits recorded
    coco = tw.detection_set(30, 5, annotate=base, novel=novel)
    novel_ids = {c.id for c in novel}
    assert {c["id"] for c in coco["categories"] if c["split"] == "novel"} == novel_ids
    assert not {a["category_id"] for a in coco["annotations"]} & novel_ids
    assert any(o.category_id in novel_ids for s in tw.detection_scenes(30, 5) for o in s.objects)


def test_compositional_protocol_is_the_default_split() -> None:
    assert tw.protocol_split("compositional") == (tw.BASE_CATEGORIES, tw.NOVEL_CATEGORIES)
    coco = tw.detection_set(2, 0)
    assert {c["id"] for c in coco["categories"] if c["split"] == "novel"} == {c.id for c in tw.NOVEL_CATEGORIES}
    with pytest.raises(ValueError, match="held-out-shapes"):
        tw.protocol_split("held-out-sizes")
