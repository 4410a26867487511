"""A deterministic synthetic world of coloured shapes with Chinese captions (DESIGN.md §7).

Images of 8 colours x 8 shapes on low-saturation textured backgrounds, Chinese captions that name
colour, shape, count and position ("左上角有一个红色的圆形，右边是两个蓝色的三角形。"), single-object
classification sets, retrieval sets whose captions identify their image, and COCO-format detection sets
whose category names are colour+shape phrases (红色圆形). It is a test bed for training and
open-vocabulary transfer without downloads, not a substitute for real data.

Everything is drawn from a seed: the same seed gives the same pixels and captions on every run and
machine for given Pillow and numpy versions (integer backgrounds, vertices on a fixed sub-pixel grid,
no text rendering, no set-order dependence). Each dataset function derives its own random stream from
the seed, so e.g. ``generate_pairs(n, 0)`` and ``retrieval_set(n, 0)`` do not share scenes.

Example::

    pairs = generate_pairs(100_000, seed=0, workers=2)  # images [n, 64, 64, 3] uint8, captions, class sets
    write_imagefolder("toy_zs", n_per_class=10, seed=1)  # label_cn.txt + test/000/... for eval-zeroshot
    write_detection_set("toy_det", 500, seed=2)  # images/ + annotations.json (COCO)
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from cnclip_vision.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_CATEGORIES",
    "BACKGROUND_KINDS",
    "BASE_CATEGORIES",
    "CATEGORIES",
    "COLOURS",
    "COUNT_WORDS",
    "DEFAULT_OBJECT_MIX",
    "HELD_OUT_COMBOS",
    "HELD_OUT_COLOURS",
    "HELD_OUT_SHAPES",
    "NOVEL_CATEGORIES",
    "POSITIONS",
    "PROTOCOLS",
    "SHAPES",
    "ZERO_SHOT_TEMPLATES",
    "object_map",
    "Background",
    "Category",
    "ClassificationSet",
    "Pairs",
    "Scene",
    "SceneObject",
    "caption",
    "caption_facts",
    "class_caption",
    "class_set_keys",
    "classification_set",
    "coco_from_scenes",
    "detection_scenes",
    "detection_set",
    "generate_pairs",
    "get_category",
    "position_index",
    "render",
    "render_array",
    "retrieval_set",
    "sample_scene",
    "scene_facts",
    "write_detection_set",
    "write_imagefolder",
    "write_pairs_jsonl",
    "write_pairs_tsv",
]

# ------------------------------------------------------------------------------------------ vocabulary
# Saturated colours (HSV saturation >= 0.8) at least ~80 apart in RGB; backgrounds stay below ~0.15.
COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (220, 30, 30),
    "橙色": (255, 140, 0),
    "黄色": (240, 220, 20),
    "绿色": (30, 170, 50),
    "青色": (0, 200, 210),
    "蓝色": (30, 60, 220),
    "紫色": (140, 40, 190),
    "粉色": (255, 120, 190),
}
# Chosen to differ in outline at radius 10 px (a hexagon was dropped: too close to a circle).
SHAPES: tuple[str, ...] = ("圆形", "正方形", "三角形", "五角星", "十字形", "菱形", "半圆形", "心形")

# 3x3 grid cells in reading order; the first word of each is the canonical one, the rest are synonyms.
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("左上角", "左上方"),
    ("上方", "上面"),
    ("右上角", "右上方"),
    ("左边", "左侧"),
    ("中间", "中央", "正中间"),
    ("右边", "右侧"),
    ("左下角", "左下方"),
    ("下方", "下面"),
    ("右下角", "右下方"),
)
COUNT_WORDS: tuple[str, ...] = ("一个", "两个", "三个", "四个", "五个", "六个", "七个", "八个", "九个")
DEFAULT_OBJECT_MIX: tuple[float, ...] = (0.5, 0.25, 0.25)  # P(1 object), P(2), P(3): DESIGN §7 recipe
# Prompts for zero-shot classification with the toy class names; they match the caption templates.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = ("{}", "一张{}的图片。", "一张{}的照片。", "图中是一个{}。", "图中有一个{}。")


@dataclass(frozen=True)
class Category:
    """One colour x shape class; ``name`` is the Chinese phrase used as class name (红色圆形)."""

    id: int
    name: str
    colour: str
    shape: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def colour_index(self) -> int:
        return (self.id - 1) // len(SHAPES)

    @property
    def shape_index(self) -> int:
        return (self.id - 1) % len(SHAPES)


# ids 1..64, colour-major: id = colour_index * 8 + shape_index + 1.
CATEGORIES: list[Category] = [
    Category(ci * len(SHAPES) + si + 1, colour + shape, colour, shape)
    for ci, colour in enumerate(COLOURS)
    for si, shape in enumerate(SHAPES)
]
ALL_CATEGORIES: tuple[Category, ...] = tuple(CATEGORIES)
_BY_ID = {c.id: c for c in CATEGORIES}
_BY_NAME = {c.name: c for c in CATEGORIES}

# Latin-square splits over (colour index c, shape index s), shape offset d = (s - c) mod 8:
#   novel: d in {1, 4}  -> 16 categories, 2 per colour and 2 per shape (detector: train base, test novel);
#   held-out combos: d == 6 -> 8 categories, each colour and each shape exactly once, never shown in
#   pretraining (measures compositional transfer). They are disjoint from the novel set, so they are base
#   categories for the detector.
NOVEL_CATEGORIES: tuple[Category, ...] = tuple(c for c in CATEGORIES if (c.shape_index - c.colour_index) % 8 in (1, 4))
BASE_CATEGORIES: tuple[Category, ...] = tuple(c for c in CATEGORIES if c not in NOVEL_CATEGORIES)
HELD_OUT_COMBOS: tuple[Category, ...] = tuple(c for c in CATEGORIES if (c.shape_index - c.colour_index) % 8 == 6)

# Attribute-held-out detection protocols: every category of two whole shapes (or two whole colours) is novel,
# so only the frozen CLIP has seen those shapes (colours); the compositional split above recombines a colour
# and a shape that base categories also carry. Each has 16 novel and 48 base categories, as the compositional.
HELD_OUT_SHAPES: tuple[str, ...] = ("五角星", "心形")
HELD_OUT_COLOURS: tuple[str, ...] = ("青色", "紫色")
PROTOCOLS: dict[str, tuple[Category, ...]] = {
    "compositional": NOVEL_CATEGORIES,
    "held-out-shapes": tuple(c for c in CATEGORIES if c.shape in HELD_OUT_SHAPES),
    "held-out-colours": tuple(c for c in CATEGORIES if c.colour in HELD_OUT_COLOURS),
}


def protocol_split(protocol: str) -> tuple[tuple[Category, ...], tuple[Category, ...]]:
    """``(base, novel)`` categories of a detection protocol (:data:`PROTOCOLS`): ``"compositional"``
    (:data:`NOVEL_CATEGORIES`), ``"held-out-shapes"`` or ``"held-out-colours"``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown toy detection protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    novel = PROTOCOLS[protocol]
    return tuple(c for c in CATEGORIES if c not in novel), novel


CategoryLike = Category | int | str


def get_category(key: CategoryLike) -> Category:
    """A category from itself, its id (1..64) or its Chinese name."""
    if isinstance(key, Category):
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and int(key) in _BY_ID:
        return _BY_ID[int(key)]
    if isinstance(key, str) and key in _BY_NAME:
        return _BY_NAME[key]
    raise ValueError(f"unknown toy category {key!r} (expected an id 1..{len(CATEGORIES)} or a name like 红色圆形)")


class _Pool(tuple[Category, ...]):
    """A resolved, non-empty tuple of categories (lets per-scene calls skip resolving)."""


def _resolve(categories: Iterable[CategoryLike] | None, exclude: Iterable[CategoryLike] = ()) -> tuple[Category, ...]:
    if type(categories) is _Pool and not exclude:
        return categories
    chosen = ALL_CATEGORIES if categories is None else tuple(get_category(c) for c in categories)
    dropped = {get_category(c).id for c in exclude}
    result = tuple(dict.fromkeys(c for c in chosen if c.id not in dropped))
    if not result:
        raise ValueError("no categories left to draw from (check categories / exclude)")
    return _Pool(result)


# -------------------------------------------------------------------------------------- shape geometry
_SS = 4  # supersampling factor of object masks (anti-aliasing, 1/4-pixel vertex grid)


def _normalised(points: list[tuple[float, float]]) -> np.ndarray:
    """Centre a polygon on its bounding-box centre, scale its farthest vertex to 1, round to 1e-6."""
    p = np.array(points, dtype=np.float64)
    p -= (p.min(0) + p.max(0)) / 2
    p /= np.sqrt((p**2).sum(1)).max()
    return np.round(p, 6)


def _unit_shapes() -> tuple[np.ndarray, ...]:
    def ring(n: int, r: float = 1.0, start: float = -90.0, end: float | None = None) -> list[tuple[float, float]]:
        end = start + 360.0 if end is None else end
        k = n if end - start >= 360.0 else n + 1
        step = (end - start) / n
        angles = [math.radians(start + i * step) for i in range(k)]
        return [(r * math.cos(a), r * math.sin(a)) for a in angles]

    t = 0.36  # half arm thickness of the cross
    cross = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    star = [pt for i in range(5) for pt in (ring(1, 1.0, -90 + 72 * i)[0], ring(1, 0.45, -54 + 72 * i)[0])]
    heart = []
    for i in range(48):
        a = 2 * math.pi * i / 48
        y = 13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)
        heart.append((16 * math.sin(a) ** 3, -y))
    shapes: dict[str, list[tuple[float, float]]] = {
        "圆形": ring(64),
        "正方形": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
        "三角形": ring(3),
        "五角星": star,
        "十字形": cross,
        "菱形": [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)],
        "半圆形": ring(32, start=180.0, end=360.0),  # dome up, flat side down
        "心形": heart,
    }
    return tuple(_normalised(shapes[name]) for name in SHAPES)


_UNIT_SHAPES = _unit_shapes()
# cos/sin of integer degrees -90..90, rounded so that every platform's libm gives the same table.
_ROTATION = {d: (round(math.cos(math.radians(d)), 9), round(math.sin(math.radians(d)), 9)) for d in range(-90, 91)}


def _object_mask(
    shape_index: int, centre: tuple[float, float], radius: float, rotation: int
) -> tuple[int, int, Image.Image]:
    """Anti-aliased coverage mask ("L") of one shape and the image position of its top-left pixel."""
    cos, sin = _ROTATION[rotation]
    unit = _UNIT_SHAPES[shape_index]
    cx, cy = centre
    x0, y0 = math.floor(cx - radius) - 1, math.floor(cy - radius) - 1
    side = math.ceil(2 * radius) + 3
    xs = (cx - x0 + radius * (unit[:, 0] * cos - unit[:, 1] * sin)) * _SS
    ys = (cy - y0 + radius * (unit[:, 0] * sin + unit[:, 1] * cos)) * _SS
    big = Image.new("L", (side * _SS, side * _SS), 0)
    ImageDraw.Draw(big).polygon(list(zip(np.round(xs).tolist(), np.round(ys).tolist())), fill=255)
    return x0, y0, big.reduce(_SS)


# ----------------------------------------------------------------------------------------- backgrounds
BACKGROUND_KINDS: tuple[str, ...] = ("noise", "gradient", "stripes", "checker", "blotches")
_TINTS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (10, 5, -8), (6, 3, -3), (-4, 0, 6), (-3, 3, -3), (8, 0, 2))
_DIRECTIONS: tuple[tuple[int, int], ...] = ((1, 0), (0, 1), (1, 1), (1, -1), (-1, 0), (0, -1), (-1, -1), (-1, 1))


@dataclass(frozen=True)
class Background:
    """A low-saturation textured background: grey ``levels`` plus a small colour ``tint``, luminance noise
    of amplitude ``noise``; ``period`` and ``direction`` shape stripes, checkers and gradients; ``seed``
    drives the noise."""

    kind: str
    levels: tuple[int, int]
    tint: tuple[int, int, int] = (0, 0, 0)
    noise: int = 0
    period: int = 8
    direction: int = 0
    seed: int = 0


_BANK = 1024  # side of the fixed noise bank that backgrounds crop their noise from


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """[1024, 1024] int16 uniform in -10..10 from a fixed seed (built on first use)."""
    return np.random.default_rng(20240607).integers(-10, 11, size=(_BANK, _BANK), dtype=np.int16)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.indices((size, size), dtype=np.int32)
    return y, x


@lru_cache(maxsize=64)
def _tint_lut(tint: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.arange(256, dtype=np.int32)[:, None] + np.asarray(tint, dtype=np.int32), 0, 255).astype(np.uint8)


def _render_background(bg: Background, size: int) -> np.ndarray:
    """[size, size, 3] uint8, integer arithmetic only; noise is a crop of the noise bank chosen by ``seed``."""
    if size > _BANK - 8:
        raise ValueError(f"image_size must be at most {_BANK - 8}, got {size}")
    bank = _noise_bank()
    span = _BANK - size
    key = int(bg.seed)
    ox, oy, key = key % span, (key // span) % span, key // span // span
    y, x = _grid(size)
    a, b = bg.levels
    if bg.kind == "noise":
        lum = np.full((size, size), a, dtype=np.int32)
    elif bg.kind == "gradient":
        dx, dy = _DIRECTIONS[bg.direction % len(_DIRECTIONS)]
        t = x * dx + y * dy
        t = t - t.min()
        lum = a + (b - a) * t // max(int(t.max()), 1)
    elif bg.kind == "stripes":
        dx, dy = _DIRECTIONS[bg.direction % 4]
        lum = np.where(((x * dx + y * dy) // max(bg.period, 1)) % 2 == 0, a, b)
    elif bg.kind == "checker":
        p = max(bg.period, 1)
        lum = np.where((x // p + y // p) % 2 == 0, a, b)
    elif bg.kind == "blotches":
        bx, by = key % (_BANK - 5), (key // (_BANK - 5)) % (_BANK - 5)
        coarse = np.clip(a + (bank[by : by + 5, bx : bx + 5].astype(np.int32) + 10) * (b - a) // 20, 0, 255)
        lum = np.asarray(
            Image.fromarray(coarse.astype(np.uint8), "L").resize((size, size), Image.Resampling.BILINEAR),
            dtype=np.int32,
        )
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}; expected one of {BACKGROUND_KINDS}")
    if bg.noise > 0:
        lum = lum + bank[oy : oy + size, ox : ox + size] * bg.noise // 10
    if min(a, b) - bg.noise < 0 or max(a, b) + bg.noise > 255:
        lum = np.clip(lum, 0, 255)
    return np.take(_tint_lut(tuple(bg.tint)), lum, axis=0)


def _randint(rng: np.random.Generator, n: int) -> int:
    """Uniform in 0..n-1 (one ``rng.random()`` draw: ~10x cheaper than ``rng.integers`` for scalars)."""
    return min(int(rng.random() * n), n - 1)


def _uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform in lo..hi inclusive."""
    return lo + _randint(rng, hi - lo + 1)


def _sample_background(rng: np.random.Generator) -> Background:
    kind = BACKGROUND_KINDS[_randint(rng, len(BACKGROUND_KINDS))]
    a = _uniform_int(rng, 30, 225)
    b = min(max(a + _uniform_int(rng, -60, 60), 25), 230)
    return Background(
        kind=kind,
        levels=(a, b),
        tint=_TINTS[_randint(rng, len(_TINTS))],
        noise=_uniform_int(rng, 0, 10),
        period=_uniform_int(rng, 3, 12),
        direction=_randint(rng, len(_DIRECTIONS)),
        seed=_randint(rng, 2**52),
    )


# --------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. ``box`` is the tight ``(x1, y1, x2, y2)`` box of every pixel the anti-aliased
    shape touches, in pixel-edge coordinates (x2, y2 exclusive: width = x2 - x1); the shape lies inside the
    circle of ``radius`` around ``centre``."""

    category_id: int
    box: tuple[int, int, int, int]
    centre: tuple[float, float]
    radius: float
    rotation: int = 0
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def category(self) -> Category:
        return _BY_ID[self.category_id]


@dataclass(frozen=True)
class Scene:
    """A square image of ``size`` pixels: a background and objects drawn in order."""

    size: int
    background: Background
    objects: tuple[SceneObject, ...]
    # masks computed while sampling, reused by render(); not part of the scene's identity
    _masks: tuple[tuple[int, int, Image.Image], ...] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def category_ids(self) -> tuple[int, ...]:
        """Sorted distinct category ids of the objects (the scene's class set)."""
        return tuple(sorted({o.category_id for o in self.objects}))


def position_index(centre: tuple[float, float], size: int) -> int:
    """3x3 grid cell 0..8 (reading order, see POSITIONS) of a point in an image of ``size`` pixels."""
    cx, cy = centre
    col = 0 if 3 * cx < size else (2 if 3 * cx >= 2 * size else 1)
    row = 0 if 3 * cy < size else (2 if 3 * cy >= 2 * size else 1)
    return 3 * row + col


def _quantise(v: float, step: int = 8) -> float:
    return math.floor(v * step) / step


def sample_scene(
    rng: np.random.Generator,
    *,
    image_size: int = 64,
    categories: Iterable[CategoryLike] | None = None,
    exclude: Iterable[CategoryLike] = (),
    n_objects: int | None = None,
    object_mix: Sequence[float] = DEFAULT_OBJECT_MIX,
    radius_single: tuple[float, float] | None = None,
    radius_multi: tuple[float, float] | None = None,
    max_rotation: int = 15,
    colour_jitter: int = 10,
    repeat_prob: float = 0.3,
    gap: float = 2.0,
) -> Scene:
    """Draw a scene: ``n_objects`` (or a count from ``object_mix``, P(1), P(2), ...) non-overlapping shapes
    fully inside the image, categories uniform over ``categories`` minus ``exclude`` (a later object
    repeats an earlier category with ``repeat_prob`` so counts like 两个 occur). Radii are uniform in
    ``radius_single`` for one object and ``radius_multi`` otherwise; the defaults (12-20 px and 10-12 px)
    are for 64 px and scale with ``image_size``. Rotations are whole degrees within ``max_rotation``."""
    pool = _resolve(categories, exclude)
    scale = image_size / 64
    if n_objects is None:
        mix = np.asarray(object_mix, dtype=np.float64)
        n_objects = 1 + int(np.searchsorted(np.cumsum(mix / mix.sum()), rng.random(), side="right"))
        n_objects = min(n_objects, len(mix))
    if n_objects < 1:
        raise ValueError(f"n_objects must be >= 1, got {n_objects}")
    if not 0 <= max_rotation <= 90:
        raise ValueError(f"max_rotation must be within 0..90 degrees, got {max_rotation}")
    if n_objects == 1:
        lo, hi = radius_single or (12 * scale, 20 * scale)
    else:
        lo, hi = radius_multi or (10 * scale, 12 * scale)
    if not 0 < lo <= hi or 2 * hi + 2 > image_size:
        raise ValueError(f"radius range ({lo}, {hi}) does not fit a {image_size} px image")

    cats: list[Category] = []
    for i in range(n_objects):
        if i > 0 and rng.random() < repeat_prob:
            cats.append(cats[_randint(rng, i)])
        else:
            cats.append(pool[_randint(rng, len(pool))])
    radii = sorted((_quantise(lo + (hi - lo) * rng.random()) for _ in range(n_objects)), reverse=True)
    centres = _place(rng, radii, image_size, gap)
    background = _sample_background(rng)

    objects, masks = [], []
    for cat, r, (cx, cy) in zip(cats, radii, centres):
        rotation = 0 if cat.shape == "圆形" else _uniform_int(rng, -max_rotation, max_rotation)
        red, green, blue = (min(max(v + _uniform_int(rng, -colour_jitter, colour_jitter), 0), 255) for v in cat.rgb)
        x0, y0, mask = _object_mask(cat.shape_index, (cx, cy), r, rotation)
        box = _mask_box(x0, y0, mask, image_size)
        objects.append(SceneObject(cat.id, box, (cx, cy), r, rotation, (red, green, blue)))
        masks.append((x0, y0, mask))
    scene = Scene(image_size, background, tuple(objects))
    object.__setattr__(scene, "_masks", tuple(masks))
    return scene


def _place(rng: np.random.Generator, radii: list[float], size: int, gap: float) -> list[tuple[float, float]]:
    """Centres on a 1/8-pixel grid with every shape inside the image and ``gap`` px between circles; after
    10 failed layouts the radii shrink by 10% per further attempt (only if a crowded layout is asked for)."""
    rs = list(radii)
    for attempt in range(40):
        if attempt >= 10:
            rs = [_quantise(r * 0.9) for r in rs]
        placed: list[tuple[float, float]] = []
        for r in rs:
            for _ in range(200):
                cx = _quantise(r + 1 + (size - 2 * r - 2) * rng.random())
                cy = _quantise(r + 1 + (size - 2 * r - 2) * rng.random())
                if all((cx - px) ** 2 + (cy - py) ** 2 >= (r + pr + gap) ** 2 for (px, py), pr in zip(placed, rs)):
                    placed.append((cx, cy))
                    break
            else:
                break
        if len(placed) == len(rs):
            radii[:] = rs
            return placed
    raise RuntimeError(f"could not place {len(radii)} objects in a {size} px image; use smaller radii or fewer objects")


def _mask_box(x0: int, y0: int, mask: Image.Image, size: int) -> tuple[int, int, int, int]:
    bbox = mask.getbbox()
    if bbox is None:
        raise RuntimeError("empty object mask")
    left, top, right, bottom = bbox
    return max(x0 + left, 0), max(y0 + top, 0), min(x0 + right, size), min(y0 + bottom, size)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image (pure function of the scene)."""
    image = Image.fromarray(_render_background(scene.background, scene.size), "RGB")
    masks = scene._masks
    if masks is None or len(masks) != len(scene.objects):
        masks = tuple(_object_mask(o.category.shape_index, o.centre, o.radius, o.rotation) for o in scene.objects)
    for obj, (x0, y0, mask) in zip(scene.objects, masks):
        image.paste(obj.rgb, (x0, y0), mask)
    return image


def render_array(scene: Scene) -> np.ndarray:
    """The scene as a [size, size, 3] uint8 array."""
    return np.asarray(render(scene))


def object_map(scene: Scene, *, coverage: float = 0.5) -> np.ndarray:
    """``[size, size]`` int16: at each pixel the index of the visible object (drawn last among those covering
    it by at least ``coverage`` of the anti-aliased mask), -1 on the background. The exact masks of
    :func:`render`: ``scene.objects[i].category_id`` gives the class map."""
    out = np.full((scene.size, scene.size), -1, dtype=np.int16)
    masks = scene._masks
    if masks is None or len(masks) != len(scene.objects):
        masks = tuple(_object_mask(o.category.shape_index, o.centre, o.radius, o.rotation) for o in scene.objects)
    threshold = round(coverage * 255)
    for index, (x0, y0, mask) in enumerate(masks):
        alpha = np.asarray(mask) >= threshold
        top, left = max(y0, 0), max(x0, 0)
        bottom, right = min(y0 + alpha.shape[0], scene.size), min(x0 + alpha.shape[1], scene.size)
        if bottom <= top or right <= left:
            continue
        window = alpha[top - y0 : bottom - y0, left - x0 : right - x0]
        out[top:bottom, left:right][window] = index
    return out


# -------------------------------------------------------------------------------------------- captions
_OBJECT_STYLES = ("{n}{c}的{s}", "{n}{c}{s}")
_PLAIN_TEMPLATES = (
    "图中有{L}。",
    "画面中有{L}。",
    "图片里有{L}。",
    "这张图片中有{L}。",
    "可以看到{L}。",
    "{L}。",
    "{L}",
    "一张有{L}的图片。",
    "画面上是{L}。",
    "背景上画着{L}。",
    "图中有{N}个图形：{L}。",
)
_SINGLE_TEMPLATES = (
    "一张{c}{s}的图片。",
    "一张{c}{s}的照片。",
    "{c}{s}",
    "这是一个{c}的{s}。",
    "图中是一个{c}{s}。",
    "一个{c}的{s}。",
)
_POSITION_FIRST = ("{p}有{o}", "{p}是{o}", "{p}画着{o}")
_OBJECT_FIRST = ("{o}在{p}", "{o}位于{p}")
_PREFIXES = ("", "图中", "画面", "图片")
_CLASS_TEMPLATES = ("{c}{s}", "一个{c}的{s}", "一个{c}{s}", "一张{c}{s}的图片。", "图中是一个{c}的{s}。")

FactKey = tuple[tuple[tuple[int, int | None], int], ...]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[_randint(rng, len(options))]


def _object_phrase(count: int, cat: Category, style: str) -> str:
    return style.format(n=COUNT_WORDS[count - 1], c=cat.colour, s=cat.shape)


def _join(parts: list[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    k = _randint(rng, 3)
    if k == 0:
        return "、".join(parts[:-1]) + "和" + parts[-1]
    if k == 1:
        return "，".join(parts)
    return "、".join(parts[:-1]) + "以及" + parts[-1]


def scene_facts(scene: Scene, *, with_positions: bool = True) -> FactKey:
    """Sorted ``((category_id, position or None), count)`` groups: what a caption of the scene states.
    With positions, identical objects in the same grid cell form one group."""
    counts = Counter(
        (o.category_id, position_index(o.centre, scene.size) if with_positions else None) for o in scene.objects
    )
    return tuple(sorted(counts.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])))


def caption(scene: Scene, rng: np.random.Generator, *, with_positions: bool | Literal["random"] = "random") -> str:
    """A Chinese caption of the scene from one of several template families; ``"random"`` mentions
    positions (3x3 grid) in half of the captions. Colour, shape and count of every object are always named."""
    if with_positions == "random":
        with_positions = bool(rng.random() < 0.5)
    facts = scene_facts(scene, with_positions=bool(with_positions))
    style = _pick(rng, _OBJECT_STYLES)
    groups = list(facts)
    for i in range(len(groups) - 1, 0, -1):  # Fisher-Yates
        j = _randint(rng, i + 1)
        groups[i], groups[j] = groups[j], groups[i]
    if not with_positions:
        if len(scene.objects) == 1 and rng.random() < 0.5:
            cat = _BY_ID[groups[0][0][0]]
            return _pick(rng, _SINGLE_TEMPLATES).format(c=cat.colour, s=cat.shape)
        parts = [_object_phrase(n, _BY_ID[cid], style) for (cid, _), n in groups]
        template = _pick(rng, _PLAIN_TEMPLATES if len(scene.objects) > 1 else _PLAIN_TEMPLATES[:-1])
        return template.format(L=_join(parts, rng), N=COUNT_WORDS[len(scene.objects) - 1][:-1])
    if rng.random() < 0.5:  # reading order instead of random order
        groups.sort(key=lambda g: -1 if g[0][1] is None else g[0][1])
    prefix = _pick(rng, _PREFIXES)
    clauses = []
    for i, ((cid, pos), n) in enumerate(groups):
        assert pos is not None
        word = _pick(rng, POSITIONS[pos])
        if i == 0 and prefix:
            word = ("画面" if prefix == "图中" and pos == 4 else prefix) + word
        obj = _object_phrase(n, _BY_ID[cid], style)
        template = _pick(rng, _POSITION_FIRST + _OBJECT_FIRST)
        clauses.append(template.format(p=word, o=obj))
    return _pick(rng, ("，", "；")).join(clauses) + _pick(rng, ("。", "。", "。", ""))


def class_caption(category: CategoryLike, rng: np.random.Generator | None = None) -> str:
    """A short text for one category: its name (红色圆形) without ``rng``, else a random short phrase
    ("一个红色的圆形", "一张红色圆形的图片。", ...)."""
    cat = get_category(category)
    if rng is None:
        return cat.name
    return _pick(rng, _CLASS_TEMPLATES).format(c=cat.colour, s=cat.shape)


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


_COUNT_CHARS = "".join(w[0] for w in COUNT_WORDS)
_OBJECT_RE = re.compile(f"(?:([{_COUNT_CHARS}])个)?({_alternation(COLOURS)})的?({_alternation(SHAPES)})")
_POSITION_RE = re.compile(_alternation(w for words in POSITIONS for w in words))
_POSITION_OF = {w: i for i, words in enumerate(POSITIONS) for w in words}


def caption_facts(text: str) -> FactKey:
    """Parse a caption produced by :func:`caption` back into :func:`scene_facts` form (a position applies
    to the objects of its clause; clauses end at ，；。：)."""
    counts: Counter[tuple[int, int | None]] = Counter()
    for clause in re.split("[，；。：]", text):
        objects = _OBJECT_RE.findall(clause)
        rest = _OBJECT_RE.sub("|", clause)
        positions = _POSITION_RE.findall(rest)
        pos = _POSITION_OF[positions[0]] if positions else None
        for count_char, colour, shape in objects:
            n = _COUNT_CHARS.index(count_char) + 1 if count_char else 1
            counts[(_BY_NAME[colour + shape].id, pos)] += n
    return tuple(sorted(counts.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])))


# -------------------------------------------------------------------------------------------- datasets
_STREAM_PAIRS, _STREAM_RETRIEVAL, _STREAM_CLASSIFICATION, _STREAM_DETECTION = 0, 1, 2, 3
PAIR_CHUNK = 500  # pairs per independently seeded chunk; fixed so results do not depend on ``workers``


def _rng(seed: int, *stream: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), *stream]))


class Pairs(NamedTuple):
    """Image/caption pairs: ``images`` [n, H, W, 3] uint8, ``captions``, and ``class_sets`` (sorted
    distinct category ids per image; pairs with equal class sets are not true negatives of each other)."""

    images: np.ndarray
    captions: list[str]
    class_sets: list[tuple[int, ...]]


def class_set_keys(class_sets: Sequence[Sequence[int]]) -> np.ndarray:
    """One int64 per class set (bit ``id - 1`` set for each id), so that equal sets give equal keys:
    ``keys[:, None] == keys[None, :]`` is the same-class-set matrix of a batch."""
    keys = np.zeros(len(class_sets), dtype=np.uint64)
    for i, ids in enumerate(class_sets):
        for cid in ids:
            keys[i] |= np.uint64(1) << np.uint64(cid - 1)
    return keys.view(np.int64)


def _pairs_chunk(args: tuple[int, int, int, dict[str, Any]]) -> Pairs:
    seed, chunk, n, options = args
    rng = _rng(seed, _STREAM_PAIRS, chunk)
    with_positions = options.pop("with_positions")
    size = options["image_size"]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions, class_sets = [], []
    for i in range(n):
        scene = sample_scene(rng, **options)
        images[i] = render_array(scene)
        captions.append(caption(scene, rng, with_positions=with_positions))
        class_sets.append(scene.category_ids)
    return Pairs(images, captions, class_sets)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(size, n - i * size)) for i in range(-(-n // size))]


def generate_pairs(
    n: int,
    seed: int,
    *,
    image_size: int = 64,
    categories: Iterable[CategoryLike] | None = None,
    exclude: Iterable[CategoryLike] = HELD_OUT_COMBOS,
    with_positions: bool | Literal["random"] = "random",
    object_mix: Sequence[float] = DEFAULT_OBJECT_MIX,
    radius_single: tuple[float, float] | None = None,
    radius_multi: tuple[float, float] | None = None,
    workers: int = 1,
    mp_context: str | None = None,
) -> Pairs:
    """``n`` pretraining pairs in one array. Chunks of PAIR_CHUNK pairs are seeded by (seed, chunk index),
    so the result is identical for any ``workers``; ``workers > 1`` uses a process pool (``fork`` where
    available, else ``spawn``; override with ``mp_context``). HELD_OUT_COMBOS are excluded by default."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    options = dict(
        image_size=image_size,
        categories=_resolve(categories, exclude),
        object_mix=tuple(object_mix),
        radius_single=radius_single,
        radius_multi=radius_multi,
        with_positions=with_positions,
    )
    jobs = [(seed, chunk, m, dict(options)) for chunk, m in _chunks(n, PAIR_CHUNK)]
    _rng(seed)  # validate the seed in this process
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    class_sets: list[tuple[int, ...]] = []
    start = time.perf_counter()
    for chunk, part in zip(jobs, _map(_pairs_chunk, jobs, workers, mp_context)):
        offset = chunk[1] * PAIR_CHUNK
        images[offset : offset + len(part.captions)] = part.images
        captions += part.captions
        class_sets += part.class_sets
    elapsed = time.perf_counter() - start
    logger.info(
        "generated %d toy pairs (%d px) in %.1f s: %.0f img/s with %d worker(s)",
        n,
        image_size,
        elapsed,
        n / max(elapsed, 1e-9),
        workers,
    )
    return Pairs(images, captions, class_sets)


def _map(fn: Any, jobs: list[Any], workers: int, mp_context: str | None) -> Iterator[Any]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    if mp_context is None:
        mp_context = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(mp_context)
    with ctx.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(fn, jobs)


def retrieval_set(
    n: int,
    seed: int,
    *,
    image_size: int = 64,
    categories: Iterable[CategoryLike] | None = None,
    exclude: Iterable[CategoryLike] = HELD_OUT_COMBOS,
    object_mix: Sequence[float] = DEFAULT_OBJECT_MIX,
    max_tries: int = 1000,
) -> Pairs:
    """``n`` pairs whose captions (always with positions) identify their image uniquely: no two scenes
    share the multiset of (colour, shape, position) facts (duplicates are redrawn). Drawn from the
    pretraining distribution (HELD_OUT_COMBOS excluded) but from a stream of its own."""
    rng = _rng(seed, _STREAM_RETRIEVAL)
    pool = _resolve(categories, exclude)
    seen: set[FactKey] = set()
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions, class_sets = [], []
    for i in range(n):
        for _ in range(max_tries):
            scene = sample_scene(rng, image_size=image_size, categories=pool, object_mix=object_mix)
            key = scene_facts(scene)
            if key not in seen:
                break
        else:
            raise RuntimeError(f"could not find {n} scenes with distinct captions; ask for fewer")
        seen.add(key)
        images[i] = render_array(scene)
        captions.append(caption(scene, rng, with_positions=True))
        class_sets.append(scene.category_ids)
    return Pairs(images, captions, class_sets)


class ClassificationSet(NamedTuple):
    """Single-object images, their class names (``labels``) and ``category_ids``; class-major order."""

    images: np.ndarray
    labels: list[str]
    category_ids: list[int]


def classification_set(
    n_per_class: int,
    seed: int,
    *,
    categories: Iterable[CategoryLike] | None = None,
    image_size: int = 64,
    radius: tuple[float, float] | None = None,
) -> ClassificationSet:
    """``n_per_class`` single-object images of each category (all 64 by default), radius as in
    pretraining single-object scenes unless given."""
    cats = _resolve(categories)
    rng = _rng(seed, _STREAM_CLASSIFICATION)
    images = np.empty((n_per_class * len(cats), image_size, image_size, 3), dtype=np.uint8)
    labels, ids = [], []
    for ci, cat in enumerate(cats):
        for j in range(n_per_class):
            scene = sample_scene(
                rng, image_size=image_size, categories=_Pool((cat,)), n_objects=1, radius_single=radius
            )
            images[ci * n_per_class + j] = render_array(scene)
            labels.append(cat.name)
            ids.append(cat.id)
    return ClassificationSet(images, labels, ids)


def detection_scenes(
    n_images: int,
    seed: int,
    *,
    image_size: int = 128,
    objects: tuple[int, int] = (3, 6),
    categories: Iterable[CategoryLike] | None = None,
    radius: tuple[float, float] = (10, 20),
) -> list[Scene]:
    """Scenes for detection: between ``objects[0]`` and ``objects[1]`` (inclusive) shapes each."""
    pool = _resolve(categories)
    lo, hi = objects
    if not 1 <= lo <= hi:
        raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {objects}")
    rng = _rng(seed, _STREAM_DETECTION)
    return [
        sample_scene(
            rng,
            image_size=image_size,
            categories=pool,
            n_objects=_uniform_int(rng, lo, hi),
            radius_single=radius,
            radius_multi=radius,
        )
        for _ in range(n_images)
    ]


def coco_from_scenes(
    scenes: Sequence[Scene],
    file_names: Sequence[str],
    *,
    categories: Iterable[CategoryLike] | None = None,
    annotate: Iterable[CategoryLike] | None = None,
    novel: Iterable[CategoryLike] | None = None,
) -> dict[str, Any]:
    """COCO detection dict of ``scenes``. ``categories`` lists the classes (global ids 1..64, so a subset
    such as BASE_CATEGORIES keeps its ids); objects of categories outside ``annotate`` (default: all listed)
    stay unannotated, as novel objects in OV-COCO training images. ``novel`` (default
    :data:`NOVEL_CATEGORIES`) sets each category record's ``"split"``."""
    cats = _resolve(categories)
    keep = {c.id for c in (cats if annotate is None else _resolve(annotate))} & {c.id for c in cats}
    novel_ids = {c.id for c in (NOVEL_CATEGORIES if novel is None else _resolve(novel))}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (scene, name) in enumerate(zip(scenes, file_names, strict=True), start=1):
        images.append({"id": image_id, "file_name": name, "width": scene.size, "height": scene.size})
        for obj in scene.objects:
            if obj.category_id not in keep:
                continue
            x1, y1, x2, y2 = obj.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj.category_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {
            "description": "cnclip-vision toy world: coloured shapes (synthetic)",
            "version": "1.0",
            "year": 2025,
            "contributor": "cnclip_vision.toyworld",
        },
        "licenses": [
            {"id": 1, "name": "CC0 1.0 (synthetic data)", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "images": images,
        "annotations": annotations,
        "categories": [
            {
                "id": c.id,
                "name": c.name,
                "supercategory": c.shape,
                "colour": c.colour,
                "shape": c.shape,
                "split": "novel" if c.id in novel_ids else "base",
            }
            for c in cats
        ],
    }


def detection_set(
    n_images: int,
    seed: int,
    *,
    image_size: int = 128,
    objects: tuple[int, int] = (3, 6),
    categories: Iterable[CategoryLike] | None = None,
    annotate: Iterable[CategoryLike] | None = None,
    novel: Iterable[CategoryLike] | None = None,
    radius: tuple[float, float] = (10, 20),
    image_format: str = "png",
) -> dict[str, Any]:
    """COCO dict of a detection set (file names ``000001.png``, ...); the images are those that
    :func:`write_detection_set` writes with the same arguments."""
    scenes = detection_scenes(
        n_images, seed, image_size=image_size, objects=objects, categories=categories, radius=radius
    )
    return coco_from_scenes(
        scenes, _file_names(n_images, image_format), categories=categories, annotate=annotate, novel=novel
    )


def _file_names(n: int, image_format: str) -> list[str]:
    ext = _extension(image_format)
    return [f"{i:06d}{ext}" for i in range(1, n + 1)]


# ------------------------------------------------------------------------------------------- writing
def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _extension(image_format: str) -> str:
    fmt = image_format.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    return ".png" if fmt == "png" else ".jpg"


def _save(array: np.ndarray, path: Path) -> None:
    image = Image.fromarray(array, "RGB")
    if path.suffix == ".png":
        image.save(path, format="PNG", compress_level=1)
    else:
        image.save(path, format="JPEG", quality=95)


def _write_images(images: np.ndarray, folder: Path, names: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for array, name in zip(images, names):
        _save(array, folder / name)


def write_pairs_jsonl(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    *,
    image_format: str = "png",
    file_name: str = "pairs.jsonl",
    **options: Any,
) -> Path:
    """Write ``n`` pairs (see :func:`generate_pairs` for ``options``) as ``images/0000000.png`` plus a
    JSONL of ``{"image": "images/...", "caption": ..., "category_ids": [...]}`` (image paths relative to
    the JSONL file). Returns the JSONL path."""
    out, rows = _write_pairs(Path(out_dir), n, seed, image_format, options)
    path = out / file_name
    _write_text(
        path,
        "".join(
            json.dumps({"image": i, "caption": c, "category_ids": list(s)}, ensure_ascii=False) + "\n"
            for i, c, s in rows
        ),
    )
    return path


def write_pairs_tsv(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    *,
    image_format: str = "png",
    file_name: str = "pairs.tsv",
    header: bool = True,
    **options: Any,
) -> Path:
    """As :func:`write_pairs_jsonl`, but a TSV of ``image<TAB>caption`` rows (first row the column names
    ``image``/``caption`` when ``header``). Returns the TSV path."""
    out, rows = _write_pairs(Path(out_dir), n, seed, image_format, options)
    path = out / file_name
    lines = (["image\tcaption"] if header else []) + [f"{i}\t{c}" for i, c, _ in rows]
    _write_text(path, "\n".join(lines) + "\n")
    return path


def _write_pairs(
    out: Path, n: int, seed: int, image_format: str, options: dict[str, Any]
) -> tuple[Path, list[tuple[str, str, tuple[int, ...]]]]:
    ext = _extension(image_format)
    pairs = generate_pairs(n, seed, **options)
    names = [f"{i:07d}{ext}" for i in range(n)]
    _write_images(pairs.images, out / "images", names)
    return out, [(f"images/{name}", c, s) for name, c, s in zip(names, pairs.captions, pairs.class_sets)]


def write_imagefolder(
    root: str | os.PathLike[str],
    n_per_class: int,
    seed: int,
    *,
    categories: Iterable[CategoryLike] | None = None,
    image_size: int = 64,
    split: str = "test",
    image_format: str = "png",
) -> Path:
    """Write a zero-shot evaluation folder: ``label_cn.txt`` (one class name per line) and
    ``{split}/000/000000.png``, ... (folder ``i`` holds class ``i`` of the label file). Returns ``root``."""
    root = Path(root)
    cats = _resolve(categories)
    data = classification_set(n_per_class, seed, categories=cats, image_size=image_size)
    ext = _extension(image_format)
    for ci in range(len(cats)):
        block = data.images[ci * n_per_class : (ci + 1) * n_per_class]
        _write_images(block, root / split / f"{ci:03d}", [f"{j:06d}{ext}" for j in range(n_per_class)])
    _write_text(root / "label_cn.txt", "".join(c.name + "\n" for c in cats))
    return root


def write_detection_set(
    root: str | os.PathLike[str],
    n_images: int,
    seed: int,
    *,
    image_size: int = 128,
    objects: tuple[int, int] = (3, 6),
    categories: Iterable[CategoryLike] | None = None,
    annotate: Iterable[CategoryLike] | None = None,
    novel: Iterable[CategoryLike] | None = None,
    radius: tuple[float, float] = (10, 20),
    image_format: str = "png",
    annotation_file: str = "annotations.json",
) -> Path:
    """Write ``root/images/000001.png``, ... and ``root/annotations.json`` (COCO; ``file_name`` relative
    to ``root/images``). Returns the annotation path."""
    root = Path(root)
    scenes = detection_scenes(
        n_images, seed, image_size=image_size, objects=objects, categories=categories, radius=radius
    )
    names = _file_names(n_images, image_format)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for scene, name in zip(scenes, names):
        _save(render_array(scene), root / "images" / name)
    coco = coco_from_scenes(scenes, names, categories=categories, annotate=annotate, novel=novel)
    path = root / annotation_file
    _write_text(path, json.dumps(coco, ensure_ascii=False))
    return path
