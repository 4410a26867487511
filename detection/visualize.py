"""Pictures: detections as boxes with Chinese label tags, and similarity heat maps over an image.

Chinese text needs a CJK font, which many machines lack (Pillow's default font draws empty boxes,
"tofu", for every Chinese character). :func:`find_cjk_font` looks, in order, at

1. the ``CNCLIP_FONT`` environment variable (a path to a .ttf/.otf/.ttc file);
2. the system: fontconfig's ``fc-match :lang=zh-cn``, then the usual places of Noto Sans CJK,
   Source Han Sans, WenQuanYi and Droid Sans Fallback (Linux), PingFang / STHeiti / Hiragino Sans GB
   (macOS), Microsoft YaHei / SimHei / SimSun (Windows);
3. fonts installed from PyPI: ``pylopdf-fonts-zh-cn`` (Noto Sans SC) or ``noto-cjk-sans-otc``;

and takes the first that really has glyphs for Chinese characters (checked by rendering, so a
fontconfig fallback such as DejaVu Sans is skipped). With none it logs a warning and returns Pillow's
default font, so pictures still render, with Chinese drawn as tofu.

Both drawing functions enlarge images whose short side is under ``min_side`` (512 px by default)
before drawing, so label text stays legible on small (e.g. 128x128 toy) images; the returned picture
then has the enlarged size, whether or not anything was drawn on it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Mapping, Sequence
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont

from cnclip_vision.data.transforms import ImageSource, load_image

logger = logging.getLogger(__name__)

__all__ = ["FONT_ENV_VAR", "draw_detections", "find_cjk_font", "heatmap_overlay", "label_color", "segmentation_overlay"]

FONT_ENV_VAR = "CNCLIP_FONT"

ColorLike = str | tuple[int, int, int]
ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

_PROBE_TEXT = "猫狗中文电动车"  # characters a CJK font must draw for us to take it
_NOTDEF = "\U0010fffd"  # a code point no font maps: renders as the font's .notdef ("tofu") glyph

# Font files from PyPI packages: (module, file inside it, preferred face).
_PYPI_FONTS: tuple[tuple[str, str, int], ...] = (
    ("pylopdf_fonts_zh_cn", "NotoSansSC-Regular.otf", 0),
    ("noto_cjk_sans_otc", "NotoSansCJK-Regular.ttc", 2),  # faces: JP, KR, SC, TC, HK, then Mono
)
_SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
_SYSTEM_FONT_PATTERNS = (  # best first
    "NotoSansCJK*-Regular.tt[cf]",
    "NotoSansCJK*-Regular.otf",
    "NotoSansSC-Regular.otf",
    "SourceHanSans*-Regular.tt[cf]",
    "SourceHanSans*-Regular.otf",
    "NotoSansCJK*.tt[cf]",
    "NotoSansCJK*.otf",
    "wqy-microhei.ttc",
    "wqy-zenhei.ttc",
    "DroidSansFallback*.ttf",
    "NotoSerifCJK*.tt[cf]",
)
_MACOS_FONTS = (
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
)
_WINDOWS_FONTS = ("msyh.ttc", "msyh.ttf", "simhei.ttf", "Deng.ttf", "simsun.ttc")
_SIMPLIFIED_FACE = re.compile(r"\b(SC|GB|CN|Hans|YaHei)\b")

# 20 well-separated colours (Tableau 20 order, saturated ones first); a label keeps its colour everywhere.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)


# --------------------------------------------------------------------------------------------- fonts


def _render(font: ImageFont.FreeTypeFont, text: str) -> bytes:
    """``text`` drawn in white on a fixed black canvas, as raw 8-bit pixels."""
    size = int(font.size)
    canvas = Image.new("L", (2 * size * max(1, len(text)), 2 * size))
    ImageDraw.Draw(canvas).text((size // 2, size // 2), text, font=font, fill=255)
    return canvas.tobytes()


def _missing_glyphs(font: ImageFont.FreeTypeFont, text: str) -> list[str]:
    """Characters of ``text`` that ``font`` draws as nothing or as its .notdef glyph."""
    tofu, blank = _render(font, _NOTDEF), _render(font, "")
    return [c for c in dict.fromkeys(text) if not c.isspace() and _render(font, c) in (tofu, blank)]


def _pick_face(path: str) -> int:
    """The face of a font collection (.ttc/.otc) to use: the first simplified-Chinese one, else 0."""
    if Path(path).suffix.lower() not in (".ttc", ".otc"):
        return 0
    for index in range(32):
        try:
            family = ImageFont.truetype(path, 12, index=index).getname()[0] or ""
        except OSError:  # past the last face
            break
        if _SIMPLIFIED_FACE.search(family) and "Mono" not in family:
            return index
    return 0


def _fontconfig_candidate() -> list[tuple[str, int]]:
    if shutil.which("fc-match") is None:
        return []
    try:
        out = subprocess.run(
            ["fc-match", "--format=%{file}|%{index}", ":lang=zh-cn"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("fc-match failed: %s", exc)
        return []
    file, _, index = out.strip().partition("|")
    return [(file, int(index) if index.isdigit() else 0)] if file else []


def _system_candidates() -> list[tuple[str, int]]:
    found: list[str] = []
    if sys.platform == "darwin":
        found += [p for p in _MACOS_FONTS if os.path.isfile(p)]
    elif sys.platform == "win32":
        fonts_dir = Path(os.environ.get("WINDIR", r"C:\Windows")) / "Fonts"
        found += [str(fonts_dir / name) for name in _WINDOWS_FONTS if (fonts_dir / name).is_file()]
    roots = [Path(d).expanduser() for d in _SYSTEM_FONT_DIRS]
    roots = [r for r in roots if r.is_dir()]
    for pattern in _SYSTEM_FONT_PATTERNS:
        for root in roots:
            found += sorted(str(p) for p in root.rglob(pattern) if p.is_file())
    return [(path, _pick_face(path)) for path in dict.fromkeys(found)]


def _pypi_candidates() -> list[tuple[str, int]]:
    found = []
    for module, filename, face in _PYPI_FONTS:
        if find_spec(module) is None:
            continue
        path = resources.files(module).joinpath(filename)
        if path.is_file():
            found.append((str(path), face))
    return found


@functools.cache
def _resolve_font(override: str | None) -> tuple[str, int] | None:
    """(path, face index) of the CJK font to use, or None; cached per value of ``CNCLIP_FONT``."""
    if override:
        path = str(Path(override).expanduser())
        if not os.path.isfile(path):
            raise ValueError(f"{FONT_ENV_VAR}={override!r}: no such file (expected a .ttf, .otf or .ttc font)")
        index = _pick_face(path)
        try:
            missing = _missing_glyphs(ImageFont.truetype(path, 24, index=index), _PROBE_TEXT)
        except OSError as exc:
            raise ValueError(f"{FONT_ENV_VAR}={override!r} is not a font Pillow can read: {exc}") from exc
        if missing:
            logger.warning(
                "%s=%s has no glyphs for %s; Chinese labels may show as empty boxes",
                FONT_ENV_VAR,
                path,
                "".join(missing),
            )
        logger.info("Using font %s (face %d) from %s", path, index, FONT_ENV_VAR)
        return path, index
    for source, candidates in (
        ("fontconfig", _fontconfig_candidate),
        ("system", _system_candidates),
        ("PyPI package", _pypi_candidates),
    ):
        for path, index in candidates():
            try:
                font = ImageFont.truetype(path, 24, index=index)
            except OSError as exc:
                logger.debug("Skipping font %s: %s", path, exc)
                continue
            if not _missing_glyphs(font, _PROBE_TEXT):
                logger.info("Using CJK font %s (face %d, %s) found via %s", path, index, font.getname()[0], source)
                return path, index
            logger.debug("Skipping font %s: no Chinese glyphs", path)
    logger.warning(
        "No CJK font found: Chinese labels will be drawn as empty boxes. Install one "
        "(`pip install pylopdf-fonts-zh-cn`, or e.g. `apt-get install fonts-noto-cjk`) or set %s to a font file",
        FONT_ENV_VAR,
    )
    return None


@functools.lru_cache(maxsize=64)
def _load_font(path: str | None, index: int, size: int) -> ImageFont.FreeTypeFont:
    if path is not None:
        return ImageFont.truetype(path, size, index=index)
    font = ImageFont.load_default(size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType support; it cannot draw scalable text")
    return font


def find_cjk_font(size: int) -> ImageFont.FreeTypeFont:
    """A font of ``size`` pixels that draws Chinese: ``$CNCLIP_FONT``, a system CJK font, or one from PyPI.

    The lookup (see the module docstring) runs once per value of ``CNCLIP_FONT`` and logs the font it
    chose; fonts are cached per size. Without any CJK font it warns once and returns Pillow's default
    font. Raises ``ValueError`` for a non-positive ``size`` or a ``CNCLIP_FONT`` that is not a font file.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int (pixels), got {size!r}")
    found = _resolve_font(os.environ.get(FONT_ENV_VAR) or None)
    path, index = found if found is not None else (None, 0)
    return _load_font(path, index, int(size))


# ------------------------------------------------------------------------------------------- drawing


def label_color(name: str) -> tuple[int, int, int]:
    """The RGB colour of label ``name``: the same in every picture and every run."""
    return _PALETTE[zlib.crc32(name.encode("utf-8")) % len(_PALETTE)]


def _canvas(image: ImageSource, min_side: int) -> tuple[Image.Image, float, float]:
    """``image`` as a new RGB PIL image, enlarged (bicubic) so its short side is at least ``min_side``,
    with the x and y scale factors from ``image`` to it."""
    if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 0:
        raise ValueError(f"min_side must be an int >= 0 (pixels), got {min_side!r}")
    picture = load_image(image)  # always a new image
    width, height = picture.size
    if min(width, height) >= min_side:
        return picture, 1.0, 1.0
    scale = min_side / min(width, height)
    picture = picture.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    return picture, picture.width / width, picture.height / height


def _as_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        what = type(value).__name__
        raise ValueError(f"{name} must be numeric (a tensor, array or list of numbers), got {what}") from exc
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _tag_size(font: ImageFont.FreeTypeFont, text: str) -> tuple[int, int, int]:
    """(width, height, padding) of a filled tag holding ``text``."""
    ascent, descent = font.getmetrics()
    pad = max(2, round(font.size / 6))
    return round(font.getlength(text)) + 2 * pad, ascent + descent + 2 * pad, pad


def _draw_tag(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: ImageFont.FreeTypeFont, fill: tuple[int, int, int]
) -> None:
    width, height, pad = _tag_size(font, text)
    x, y = xy
    draw.rectangle((x, y, x + width - 1, y + height - 1), fill=fill)
    draw.text((x + pad, y + pad), text, font=font, fill=_text_color(fill), anchor="la")


def _detection_fields(detections: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Checked (boxes [N, 4], scores [N] or None, label names [N]) of a detector output dict."""
    if not isinstance(detections, Mapping):
        raise TypeError(
            f"detections must be a dict with 'boxes', 'scores', 'label_names', got {type(detections).__name__}"
        )
    if "boxes" not in detections:
        raise ValueError(f"detections has no 'boxes' (keys: {sorted(detections)})")
    boxes = _as_array(detections["boxes"], "detections['boxes']")
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"detections['boxes'] must have shape (N, 4) (x1, y1, x2, y2 in pixels), got {boxes.shape}")
    bad = np.nonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0]
    if bad.size:
        raise ValueError(
            f"detections['boxes'][{bad[0]}] = {boxes[bad[0]].tolist()} is not (x1, y1, x2, y2) with x1 <= x2, y1 <= y2"
        )
    count = len(boxes)
    scores = None
    if detections.get("scores") is not None:
        scores = _as_array(detections["scores"], "detections['scores']").reshape(-1)
        if len(scores) != count:
            raise ValueError(f"detections['scores'] has {len(scores)} entries but detections['boxes'] has {count}")
    if detections.get("label_names") is not None:
        names = detections["label_names"]
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise ValueError("detections['label_names'] must be a list of str")
        names = list(names)
    elif detections.get("labels") is not None:
        names = [str(int(label)) for label in _as_array(detections["labels"], "detections['labels']").reshape(-1)]
    elif count == 0:
        names = []
    else:
        raise ValueError("detections has no 'label_names' (or 'labels') for its boxes")
    if len(names) != count:
        raise ValueError(f"detections['label_names'] has {len(names)} entries but detections['boxes'] has {count}")
    return boxes, scores, names


def draw_detections(
    image: ImageSource,
    detections: Mapping[str, Any],
    *,
    font_size: int | None = None,
    line_width: int | None = None,
    colors: Mapping[str, ColorLike] | None = None,
    min_side: int = 512,
) -> Image.Image:
    """Draw detection boxes with a filled "猫 0.87" tag each, in a colour per label name.

    ``image``: anything :func:`cnclip_vision.data.transforms.load_image` takes (PIL image, path, HxWxC array,
    CxHxW tensor). ``detections``: one detector output: ``boxes`` [N, 4] (x1, y1, x2, y2) in pixels of
    ``image``, ``scores`` [N] (optional) and ``label_names`` (N str; integer ``labels`` are shown when it
    is absent). Tags never cover each other: the highest score gets the spot above its box, the others the
    first free spot above, inside or below their box (stacked when needed); higher scores are drawn last.
    ``colors`` maps label names to PIL colours ("red", "#ff0000", (255, 0, 0)); other labels get
    :func:`label_color`. ``font_size`` / ``line_width`` default to sizes that scale with the picture.
    Images with a short side under ``min_side`` are enlarged first (boxes scaled along); pass
    ``min_side=0`` to keep the size. Returns a new RGB image; with no detections, the (possibly enlarged)
    image with nothing drawn. Raises ``ValueError`` naming the bad field of ``detections``.
    """
    boxes, scores, names = _detection_fields(detections)
    palette = {name: label_color(name) for name in names}
    for name, color in (colors or {}).items():
        try:
            rgb = ImageColor.getrgb(color)[:3] if isinstance(color, str) else tuple(int(c) for c in color)
        except (ValueError, TypeError):
            rgb = ()
        if len(rgb) != 3:
            raise ValueError(f"colors[{name!r}] = {color!r} is not a colour name, '#rrggbb' or an RGB tuple")
        palette[name] = rgb
    picture, sx, sy = _canvas(image, min_side)
    if not len(boxes):
        return picture
    short = min(picture.size)
    font = find_cjk_font(font_size if font_size is not None else max(14, round(short * 0.035)))
    width = line_width if line_width is not None else max(2, round(short / 200))
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ValueError(f"line_width must be a positive int (pixels), got {line_width!r}")

    scaled = np.round(boxes * np.array([sx, sy, sx, sy])).astype(int)
    order = np.argsort(scores, kind="stable") if scores is not None else np.arange(len(boxes))
    draw = ImageDraw.Draw(picture)
    for i in order:
        x1, y1, x2, y2 = scaled[i].tolist()
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=palette[names[i]], width=width)
    texts = [names[i] if scores is None else f"{names[i]} {scores[i]:.2f}" for i in range(len(boxes))]
    places = _place_tags(scaled, [_tag_size(font, t)[:2] for t in texts], order[::-1].tolist(), picture.size)
    for i in order:
        _draw_tag(draw, places[i], texts[i], font, palette[names[i]])
    return picture


def _place_tags(
    boxes: np.ndarray, sizes: list[tuple[int, int]], priority: Sequence[int], canvas: tuple[int, int]
) -> dict[int, tuple[int, int]]:
    """Top-left corners for the tags, so that no tag covers another: taken in ``priority`` order (highest score
    first), each goes to the first free spot of: above its box, inside its top edge, below it, inside its
    bottom edge, then further above / below in steps of its own height. Only when a picture is too crowded
    for any free spot does a tag fall back to above its box (drawn under the higher-scored ones)."""
    width, height = canvas
    placed: list[tuple[int, int, int, int]] = []
    places: dict[int, tuple[int, int]] = {}

    def free(x: int, y: int, w: int, h: int) -> bool:
        return all(x + w <= a or a2 <= x or y + h <= b or b2 <= y for a, b, a2, b2 in placed)

    for i in priority:
        x1, y1, _, y2 = (int(v) for v in boxes[i])
        w, h = sizes[i]
        x = min(max(x1, 0), max(0, width - w))
        candidates = [y1 - h, y1, y2, y2 - h]
        candidates += [y for k in range(2, 2 + height // max(h, 1)) for y in (y1 - k * h, y2 + (k - 1) * h)]
        inside = [y for y in candidates if 0 <= y <= height - h]
        spot = next((y for y in inside if free(x, y, w, h)), None)
        if spot is None:
            spot = min(max(y1 - h, 0), max(0, height - h))
        places[int(i)] = (x, spot)
        placed.append((x, spot, x + w, spot + h))
    return places


# ------------------------------------------------------------------------------------------ heat maps


def _colormap_lut(name: str) -> np.ndarray:
    """[256, 3] uint8 lookup table of colormap ``name`` (ours, or matplotlib's when it is installed)."""
    x = np.linspace(0.0, 1.0, 256)
    if name == "jet":
        lut = np.stack([1.5 - np.abs(4 * x - 3), 1.5 - np.abs(4 * x - 2), 1.5 - np.abs(4 * x - 1)], axis=1)
    elif name == "hot":
        lut = np.stack([3 * x, 3 * x - 1, 3 * x - 2], axis=1)
    elif name == "gray":
        lut = np.stack([x, x, x], axis=1)
    else:
        try:
            import matplotlib

            lut = matplotlib.colormaps[name](x)[:, :3]
        except (ImportError, KeyError) as exc:
            raise ValueError(
                f"colormap must be 'jet', 'hot', 'gray' (or a matplotlib colormap when it is installed), got {name!r}"
            ) from exc
    return np.round(np.clip(lut, 0.0, 1.0) * 255).astype(np.uint8)


def heatmap_overlay(
    image: ImageSource,
    heat: ArrayLike,
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    value_range: tuple[float, float] | None = None,
    caption: str | None = None,
    font_size: int | None = None,
    min_side: int = 512,
    colorbar: bool = False,
) -> Image.Image:
    """Blend a colour-mapped heat map (e.g. patch-text similarities) over ``image``.

    ``heat``: a 2-D [h, w] tensor or array covering the whole image at any resolution; it is upsampled
    bilinearly to the picture, scaled to 0..1 by ``value_range`` (low, high) or else by its own min and max
    (a constant map is all 0), and coloured with ``colormap`` ("jet": blue low, red high; "hot"; "gray";
    any matplotlib name if matplotlib is installed). ``alpha`` is the heat map's weight. ``caption`` (e.g.
    the query text, Chinese allowed) is drawn in a tag at the top left. Small images are enlarged to
    ``min_side`` as in :func:`draw_detections`. ``colorbar`` adds a colour scale on the right, labelled with
    the values of its ends (the picture gets wider by the bar). Returns a new RGB image.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    values = _as_array(heat, "heat")
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"heat must be a non-empty 2-D (H, W) map, got shape {values.shape}")
    lut = _colormap_lut(colormap)
    picture, _, _ = _canvas(image, min_side)

    resized = Image.fromarray(values.astype(np.float32)).resize(picture.size, Image.Resampling.BILINEAR)
    values = np.asarray(resized, dtype=np.float64)
    if value_range is not None:
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    else:
        low, high = float(values.min()), float(values.max())
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(values)
    colored = lut[np.round(scaled * 255).astype(np.intp)]
    blended = (1.0 - alpha) * np.asarray(picture, dtype=np.float64) + alpha * colored
    picture = Image.fromarray(np.round(blended).astype(np.uint8))
    font = find_cjk_font(font_size if font_size is not None else max(14, round(min(picture.size) * 0.035)))
    if caption:
        _draw_tag(ImageDraw.Draw(picture), (0, 0), caption, font, (0, 0, 0))
    if colorbar:
        picture = _with_colorbar(picture, lut, low, high, font)
    return picture


def _with_colorbar(
    picture: Image.Image, lut: np.ndarray, low: float, high: float, font: ImageFont.FreeTypeFont
) -> Image.Image:
    """``picture`` with a vertical colour scale on its right: high at the top, low at the bottom."""
    labels = [f"{high:.3f}", f"{(low + high) / 2:.3f}", f"{low:.3f}"]
    bar = max(12, picture.height // 24)
    margin = max(4, bar // 3)
    text_w = max(round(font.getlength(t)) for t in labels)
    out = Image.new("RGB", (picture.width + 3 * margin + bar + text_w, picture.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    top, bottom = margin + int(font.size) // 2, picture.height - margin - int(font.size) // 2
    ramp = lut[np.linspace(255, 0, max(1, bottom - top)).round().astype(np.intp)]  # [rows, 3], high first
    x0 = picture.width + margin
    out.paste(Image.fromarray(np.repeat(ramp[:, None, :], bar, axis=1)), (x0, top))
    draw = ImageDraw.Draw(out)
    draw.rectangle((x0, top, x0 + bar - 1, bottom - 1), outline=(0, 0, 0))
    for text, y in zip(labels, (top, (top + bottom) // 2, bottom)):
        draw.text((x0 + bar + margin, y), text, font=font, fill=(0, 0, 0), anchor="lm")
    return out


def segmentation_overlay(
    image: ImageSource,
    label_map: ArrayLike,
    labels: Sequence[str],
    *,
    alpha: float = 0.5,
    font_size: int | None = None,
    min_side: int = 512,
    legend: bool = True,
    note: str | None = None,
) -> Image.Image:
    """Blend a label map (``[H, W]`` indices into ``labels``, -1 = background, left as it is) over ``image``,
    one stable colour per label (:func:`label_color`), with a legend on the right: a swatch, the (Chinese)
    name and the share of the picture of every label present, largest first. ``note`` (e.g. a warning that
    the dense features are not aligned) is written under the legend. Returns a new RGB image."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    indices = _as_array(label_map, "label_map")
    if indices.ndim != 2 or 0 in indices.shape:
        raise ValueError(f"label_map must be a non-empty 2-D (H, W) map, got shape {indices.shape}")
    if indices.max() >= len(labels) or indices.min() < -1:
        raise ValueError(f"label_map holds indices outside -1..{len(labels) - 1}")
    picture, _, _ = _canvas(image, min_side)
    resized = Image.fromarray(indices.astype(np.int32)).resize(picture.size, Image.Resampling.NEAREST)
    indices = np.asarray(resized).astype(np.int64)
    palette = np.array([label_color(name) for name in labels] + [(0, 0, 0)], dtype=np.float64)  # -1 -> last
    colours = palette[indices]
    covered = (indices >= 0)[..., None]
    base = np.asarray(picture, dtype=np.float64)
    blended = np.where(covered, (1.0 - alpha) * base + alpha * colours, base)
    picture = Image.fromarray(np.round(blended).astype(np.uint8))
    if not legend:
        return picture
    font = find_cjk_font(font_size if font_size is not None else max(14, round(min(picture.size) * 0.035)))
    counts = np.bincount(indices[indices >= 0].ravel(), minlength=len(labels))
    present = [i for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    rows = [(labels[i], f"{labels[i]} {100 * counts[i] / indices.size:.1f}%") for i in present]
    lines = [note] if note else []
    ascent, descent = font.getmetrics()
    row_h = ascent + descent + max(4, font.size // 3)
    swatch = ascent
    margin = max(6, font.size // 2)
    text_w = max([round(font.getlength(t)) for _, t in rows] + [round(font.getlength(t)) for t in lines] + [1])
    height = int(max(picture.height, margin * 2 + row_h * (len(rows) + len(lines))))
    out = Image.new("RGB", (int(picture.width + 3 * margin + swatch + text_w), height), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    x0, y = picture.width + margin, margin
    for name, text in rows:
        draw.rectangle((x0, y, x0 + swatch - 1, y + swatch - 1), fill=label_color(name), outline=(0, 0, 0))
        draw.text((x0 + swatch + margin, y), text, font=font, fill=(0, 0, 0), anchor="la")
        y += row_h
    for text in lines:
        draw.text((x0, y), text, font=font, fill=(170, 0, 0), anchor="la")
        y += row_h
    return out
