"""Pictures of detections and heat maps: real Chinese glyphs (no tofu), boxes, tags, overlays, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from cnclip_vision.detection import visualize
from cnclip_vision.detection.visualize import draw_detections, find_cjk_font, heatmap_overlay, label_color

GRAY = (200, 200, 200)
CHINESE = ("猫", "狗", "电动车")
UNMAPPED = ("\U0010fffd", "\ue000")  # no CJK font maps these: they render as .notdef, or as nothing


def render(font: ImageFont.FreeTypeFont, text: str) -> np.ndarray:
    canvas = Image.new("L", (4 * font.size, 2 * font.size))
    ImageDraw.Draw(canvas).text((font.size // 2, font.size // 2), text, font=font, fill=255)
    return np.asarray(canvas)


@pytest.fixture
def fresh_lookup():
    """Forget the cached font lookup before and after the test."""
    visualize._resolve_font.cache_clear()
    yield
    visualize._resolve_font.cache_clear()


def toy_image(size: tuple[int, int] = (128, 128)) -> Image.Image:
    return Image.new("RGB", size, GRAY)


def close_to(pixels: np.ndarray, color: tuple[int, int, int], tol: int = 8) -> np.ndarray:
    return (np.abs(pixels.astype(int) - np.array(color)) <= tol).all(axis=-1)


# ------------------------------------------------------------------------------------------------ font


def test_font_draws_real_chinese_glyphs():
    font = find_cjk_font(32)
    glyphs = {text: render(font, text) for text in CHINESE}
    tofus = [render(font, text) for text in UNMAPPED]
    for text, bitmap in glyphs.items():
        assert bitmap.sum() > 0, f"{text!r} rendered as nothing with {font.getname()}"
        for tofu in tofus:
            assert not np.array_equal(bitmap, tofu), f"{text!r} rendered as .notdef (tofu) with {font.getname()}"
    assert not np.array_equal(glyphs["猫"], glyphs["狗"])
    assert not np.array_equal(glyphs["猫"], glyphs["电动车"])
    # the same glyph twice is the same bitmap: the comparisons above are meaningful
    assert np.array_equal(render(font, "猫"), glyphs["猫"])


def test_font_cmap_covers_the_characters():
    from fontTools import ttLib  # a dev dependency

    font = find_cjk_font(16)
    path = font.path if isinstance(font.path, str) else None
    assert path is not None, "no CJK font file found (the package depends on pylopdf-fonts-zh-cn)"
    tt = ttLib.TTFont(path, fontNumber=font.index) if path.lower().endswith((".ttc", ".otc")) else ttLib.TTFont(path)
    cmap = tt.getBestCmap()
    assert all(ord(c) in cmap for c in "".join(CHINESE) + "0123456789.")


def test_font_is_cached_and_sized():
    assert find_cjk_font(20) is find_cjk_font(20)
    assert find_cjk_font(20).size == 20 and find_cjk_font(31).size == 31
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="size"):
            find_cjk_font(bad)


def test_font_env_override(monkeypatch, fresh_lookup, tmp_path):
    path = find_cjk_font(12).path
    monkeypatch.setenv("CNCLIP_FONT", str(path))
    assert Path(find_cjk_font(12).path) == Path(path)
    monkeypatch.setenv("CNCLIP_FONT", str(tmp_path / "missing.ttf"))
    with pytest.raises(ValueError, match="CNCLIP_FONT"):
        find_cjk_font(12)
    (tmp_path / "junk.ttf").write_bytes(b"not a font")
    monkeypatch.setenv("CNCLIP_FONT", str(tmp_path / "junk.ttf"))
    with pytest.raises(ValueError, match="CNCLIP_FONT.*not a font"):
        find_cjk_font(12)


def _latin_only_font(path: Path) -> str:
    """A valid TrueType font mapping only 'A' (built with fontTools), so no machine font is needed."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    pen = TTGlyphPen(None)
    pen.moveTo((100, 0)), pen.lineTo((300, 700)), pen.lineTo((500, 0)), pen.closePath()
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", "A"])
    builder.setupCharacterMap({ord("A"): "A"})
    builder.setupGlyf({".notdef": TTGlyphPen(None).glyph(), "A": pen.glyph()})
    builder.setupHorizontalMetrics({".notdef": (600, 0), "A": (600, 100)})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": "LatinOnly", "styleName": "Regular"})
    builder.setupOS2()
    builder.setupPost()
    builder.save(str(path))
    return str(path)


def test_lookup_skips_fonts_without_chinese(monkeypatch, fresh_lookup, caplog, tmp_path):
    latin = _latin_only_font(tmp_path / "latin.ttf")
    monkeypatch.delenv("CNCLIP_FONT", raising=False)
    monkeypatch.setattr(visualize, "_fontconfig_candidate", lambda: [(latin, 0)])
    with caplog.at_level(logging.INFO, logger=visualize.__name__):
        font = find_cjk_font(24)
    assert Path(font.path) != Path(latin)
    assert "Using CJK font" in caplog.text


def test_no_cjk_font_warns_and_falls_back(monkeypatch, fresh_lookup, caplog):
    monkeypatch.delenv("CNCLIP_FONT", raising=False)
    for name in ("_fontconfig_candidate", "_system_candidates", "_pypi_candidates"):
        monkeypatch.setattr(visualize, name, list)
    with caplog.at_level(logging.WARNING, logger=visualize.__name__):
        font = find_cjk_font(18)
        find_cjk_font(19)
    assert isinstance(font, ImageFont.FreeTypeFont)
    assert caplog.text.count("No CJK font found") == 1  # warned once, not per call


# ---------------------------------------------------------------------------------------- detections


def detections(boxes, scores=None, names=("猫",)):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32), "label_names": list(names)}
    if scores is not None:
        out["scores"] = torch.tensor(scores)
    return out


def test_draw_boxes_in_label_colours_and_tags():
    image = toy_image()
    out = draw_detections(image, detections([[10, 20, 60, 100], [70, 30, 120, 120]], [0.87, 0.5], ["猫", "电动车"]))
    assert out.mode == "RGB" and out.size == (512, 512)  # 128 px enlarged to the 512 px default
    assert image.getpixel((0, 0)) == GRAY and image.size == (128, 128)  # input untouched
    pixels = np.asarray(out)
    cat, bike = label_color("猫"), label_color("电动车")
    assert cat != bike
    # box edges (x4 scale: the cat box spans x 40..240, y 80..400)
    assert close_to(pixels[300, 40], cat) and close_to(pixels[300, 239], cat)
    assert close_to(pixels[399, 140], cat)
    assert close_to(pixels[300, 280], bike) and close_to(pixels[479, 400], bike)
    assert close_to(pixels[250, 150], GRAY)  # inside the box: untouched
    # the tag: filled with the box colour just above the box, with text in a contrasting colour in it
    tag = pixels[52:79, 41:100]
    assert close_to(tag, cat).mean() > 0.3
    assert (~close_to(tag, cat, tol=40) & ~close_to(tag, GRAY, tol=40)).sum() > 20


def test_tags_show_the_glyphs():
    def tag(name: str) -> np.ndarray:
        out = draw_detections(toy_image(), detections([[10, 20, 60, 100]], [0.5], [name]), colors={name: "red"})
        return np.asarray(out)[40:80, 40:120]

    assert not np.array_equal(tag("猫"), tag("狗"))
    assert close_to(tag("猫"), (255, 0, 0)).mean() > 0.3


def test_tag_goes_inside_when_no_room_above():
    out = np.asarray(draw_detections(toy_image(), detections([[0, 0, 64, 64]], [0.9]), colors={"猫": "blue"}))
    assert close_to(out[5:25, 5:50], (0, 0, 255)).mean() > 0.3  # the tag, inside the box's top left
    assert close_to(out[300:, 300:], GRAY).all()


def test_tags_of_overlapping_boxes_never_cover_each_other():
    """The issue's picture: two boxes of nearly the same top left corner ("黄色五角星 0.47" was half hidden
    under "黄色十字形 0.92"); and a pile of six boxes at one place: every tag gets its own free spot."""
    from cnclip_vision.detection.visualize import _place_tags, _tag_size, find_cjk_font

    font = find_cjk_font(18)
    for boxes, names, scores in [
        ([[40, 80, 240, 400], [44, 84, 230, 380]], ["黄色五角星", "黄色十字形"], [0.47, 0.92]),
        ([[100, 100, 200, 200]] * 6, [f"类别{i}" for i in range(6)], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]),
    ]:
        texts = [f"{n} {s:.2f}" for n, s in zip(names, scores)]
        sizes = [_tag_size(font, t)[:2] for t in texts]
        order = np.argsort(scores)[::-1]
        places = _place_tags(np.array(boxes), sizes, order, (512, 512))
        rects = [(x, y, x + sizes[i][0], y + sizes[i][1]) for i, (x, y) in places.items()]
        for a in range(len(rects)):
            for b in range(a + 1, len(rects)):
                ra, rb = rects[a], rects[b]
                assert ra[2] <= rb[0] or rb[2] <= ra[0] or ra[3] <= rb[1] or rb[3] <= ra[1], (texts, rects)
        assert all(0 <= r[0] and r[2] <= 512 and 0 <= r[1] and r[3] <= 512 for r in rects)
        best = int(order[0])  # the highest score keeps the spot right above its box
        assert places[best][1] == boxes[best][1] - sizes[best][1]
    out = draw_detections(toy_image(), detections([[10, 20, 60, 100], [11, 21, 58, 95]], [0.47, 0.92], ["甲", "乙"]))
    assert out.size == (512, 512)


def test_draw_options_and_input_kinds():
    image = torch.full((3, 600, 800), 0.5)  # large enough: not enlarged
    det = {"boxes": np.array([[100, 100, 300, 400]]), "labels": torch.tensor([3])}  # no names: ids, no scores
    out = draw_detections(image, det, line_width=5, font_size=30)
    assert out.size == (800, 600)
    assert close_to(np.asarray(out)[250, 102], label_color("3"))
    assert draw_detections(toy_image(), detections([[0, 0, 10, 10]], [0.5]), min_side=0).size == (128, 128)


def test_empty_detections_draw_nothing():
    image = toy_image((600, 520))
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "label_names": []}
    out = draw_detections(image, empty)
    assert out is not image and np.array_equal(np.asarray(out), np.asarray(image))
    small = draw_detections(toy_image(), {"boxes": torch.zeros(0, 4)})  # enlarged like any picture
    assert small.size == (512, 512) and close_to(np.asarray(small), GRAY).all()


@pytest.mark.parametrize(
    ("det", "match"),
    [
        ({"boxes": torch.zeros(2, 3), "label_names": ["a", "b"]}, r"detections\['boxes'\].*\(N, 4\)"),
        ({"boxes": torch.zeros(4), "label_names": ["a"]}, r"detections\['boxes'\].*\(N, 4\)"),
        ({"boxes": [[5, 5, 1, 9]], "label_names": ["a"]}, r"detections\['boxes'\]\[0\]"),
        ({"boxes": [[0, 0, float("nan"), 9]], "label_names": ["a"]}, r"detections\['boxes'\].*NaN"),
        ({"boxes": torch.zeros(2, 4), "scores": torch.zeros(3), "label_names": ["a", "b"]}, r"detections\['scores'\]"),
        ({"boxes": torch.zeros(2, 4), "label_names": ["a"]}, r"detections\['label_names'\]"),
        ({"boxes": torch.zeros(1, 4), "label_names": "a"}, r"detections\['label_names'\]"),
        ({"boxes": torch.zeros(1, 4)}, r"label_names"),
        ({"scores": torch.zeros(1)}, r"'boxes'"),
    ],
)
def test_bad_detections(det, match):
    with pytest.raises(ValueError, match=match):
        draw_detections(toy_image(), det)


def test_bad_draw_options():
    det = detections([[0, 0, 10, 10]], [0.5])
    with pytest.raises(TypeError, match="detections must be a dict"):
        draw_detections(toy_image(), [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="line_width"):
        draw_detections(toy_image(), det, line_width=0)
    with pytest.raises(ValueError, match="min_side"):
        draw_detections(toy_image(), det, min_side=-1)
    for bad in ("not-a-colour", (1, 2), 7):
        with pytest.raises(ValueError, match=r"colors\['猫'\]"):
            draw_detections(toy_image(), det, colors={"猫": bad})


# ------------------------------------------------------------------------------------------ heat maps


def test_heatmap_hottest_region_is_where_the_heat_is():
    image = toy_image((64, 48))
    heat = torch.zeros(6, 8)
    heat[:2, 6:] = 1.0  # top right
    out = heatmap_overlay(image, heat, min_side=0)
    assert out.mode == "RGB" and out.size == (64, 48)
    pixels = np.asarray(out).astype(int)
    red_minus_blue = pixels[..., 0] - pixels[..., 2]
    y, x = np.unravel_index(np.argmax(red_minus_blue), red_minus_blue.shape)
    assert y < 16 and x >= 48
    assert pixels[2, 62, 0] > pixels[2, 62, 2]  # hot: red
    assert pixels[45, 2, 2] > pixels[45, 2, 0]  # cold: blue


def test_heatmap_sizes_options_and_caption():
    heat = np.random.default_rng(0).random((7, 7))
    out = heatmap_overlay(toy_image(), heat)
    assert out.size == (512, 512) and out.mode == "RGB"
    assert heatmap_overlay(torch.rand(3, 32, 40), heat, min_side=0).size == (40, 32)
    invisible = heatmap_overlay(toy_image(), heat, alpha=0.0)
    assert np.array_equal(np.asarray(invisible), np.asarray(toy_image().resize((512, 512))))
    heatmap_overlay(toy_image(), np.ones((3, 3)))  # a constant map is fine
    heatmap_overlay(toy_image(), heat, colormap="hot", value_range=(0.0, 2.0))
    captioned = np.asarray(heatmap_overlay(toy_image(), heat, caption="一只猫"))
    assert not np.array_equal(captioned[:30, :80], np.asarray(out)[:30, :80])
    assert np.array_equal(captioned[100:], np.asarray(out)[100:])


def test_heatmap_colorbar_shows_the_scale():
    heat = np.linspace(0.1, 0.3, 49).reshape(7, 7)
    plain = heatmap_overlay(toy_image(), heat)
    barred = heatmap_overlay(toy_image(), heat, colorbar=True)
    assert barred.height == plain.height and barred.width > plain.width
    assert np.array_equal(np.asarray(barred)[:, : plain.width], np.asarray(plain))  # the picture itself unchanged
    strip = np.asarray(barred)[:, plain.width :].astype(int)
    column = strip[:, strip.shape[1] // 8 + 6]  # inside the bar
    rows = np.flatnonzero(np.abs(column - 255).sum(axis=1) > 30)
    top, bottom = column[rows[2]], column[rows[-3]]
    assert top[0] > top[2] and bottom[2] > bottom[0]  # jet: red (high) at the top, blue (low) at the bottom


def test_heatmap_bad_input():
    with pytest.raises(ValueError, match="heat"):
        heatmap_overlay(toy_image(), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="heat"):
        heatmap_overlay(toy_image(), np.array([[0.0, np.inf]]))
    with pytest.raises(ValueError, match="alpha"):
        heatmap_overlay(toy_image(), np.zeros((2, 2)), alpha=1.5)
    with pytest.raises(ValueError, match="colormap"):
        heatmap_overlay(toy_image(), np.zeros((2, 2)), colormap="no-such-map")
    with pytest.raises(ValueError, match="value_range"):
        heatmap_overlay(toy_image(), np.zeros((2, 2)), value_range=(1.0, 1.0))
