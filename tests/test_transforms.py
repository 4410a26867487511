"""Image loading and preprocessing: parity with transformers and the original, every input kind and mode."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnclip_vision.data.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    image_transform,
    load_image,
)
from cnclip_vision.errors import ImageLoadError

# The Hub preprocessor_config.json of OFA-Sys/chinese-clip-vit-base-patch16 (L-14-336 has 336).
HUB_CONFIG = {
    "crop_size": 224,
    "do_center_crop": False,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": {"height": 224, "width": 224},
}
DOWNSCALED = [(640, 480), (500, 375), (1024, 768), (224, 224)]
UPSCALED = [(100, 300)]


def natural_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients, noise and a few hard-edged shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    array = np.stack([x, y, (x + y) / 2], -1) * 255 + rng.normal(0, 20, (height, width, 3))
    array[height // 4 : height // 2, width // 4 : width // 2] = [200, 30, 60]
    array[(x - 0.6) ** 2 + (y - 0.5) ** 2 < 0.02] = [20, 180, 240]
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def transform() -> ImageTransform:
    return image_transform(224)


@pytest.fixture(scope="module")
def original_transform():
    """The original ``cn_clip`` transform (the Makefile installs ``cn-clip`` with --no-deps)."""
    from cn_clip.clip import image_transform as original

    return original(224)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---- parity ---------------------------------------------------------------------------------------


def test_parity_with_original_cn_clip(transform, original_transform):
    for width, height in DOWNSCALED + UPSCALED:
        image = natural_image(width, height)
        assert _max_diff(transform(image), original_transform(image)) == 0.0


def test_parity_with_transformers_image_processors(transform, record_property):
    """Max abs difference against ChineseCLIPImageProcessor configured like the Hub config: the default
    (torchvision backend, what ``AutoImageProcessor`` / ``ChineseCLIPProcessor`` give) and the PIL backend."""
    from transformers import ChineseCLIPImageProcessor

    processors = {"torchvision (default)": ChineseCLIPImageProcessor(**HUB_CONFIG)}
    try:
        from transformers import ChineseCLIPImageProcessorPil
    except ImportError:  # transformers 4: the slow class is ChineseCLIPImageProcessor itself
        ChineseCLIPImageProcessorPil = None  # noqa: N806
    if ChineseCLIPImageProcessorPil is not None:
        processors["PIL"] = ChineseCLIPImageProcessorPil(**HUB_CONFIG)
    for name, processor in processors.items():
        diffs = {}
        for width, height in DOWNSCALED + UPSCALED:
            image = natural_image(width, height)
            theirs = processor(image, return_tensors="pt")["pixel_values"][0]
            diffs[(width, height)] = diff = _max_diff(transform(image), theirs)
            if (width, height) in DOWNSCALED or name == "PIL":
                assert diff < 0.05, (name, width, height, diff)
            else:
                # torchvision's uint8 bicubic *upsampling* differs from PIL's (mean abs diff ~0.004)
                assert diff < 0.15 and (transform(image) - theirs).abs().mean() < 0.01, (name, diff)
        print(f"max abs diff vs ChineseCLIPImageProcessor [{name}]: {diffs}")
        record_property(f"max_abs_diff[{name}]", diffs)


def test_image_size_336_and_batch():
    transform = image_transform(336)
    out = transform.batch([natural_image(640, 480), natural_image(100, 300, seed=1)])
    assert out.shape == (2, 3, 336, 336) and out.dtype == torch.float32
    assert transform.image_size == 336 and transform.mean == OPENAI_CLIP_MEAN and transform.std == OPENAI_CLIP_STD
    assert "image_size=336" in repr(transform) and "bicubic" in repr(transform)
    assert type(transform(natural_image(50, 50))) is torch.Tensor  # a plain tensor, not a tv_tensors.Image
    with pytest.raises(ValueError, match="empty"):
        transform.batch([])
    with pytest.raises(ValueError, match="image_size"):
        image_transform(0)


def test_transform_pickles(transform):
    image = natural_image(64, 48)
    assert torch.equal(pickle.loads(pickle.dumps(transform))(image), transform(image))


# ---- modes --------------------------------------------------------------------------------------


def _modes() -> dict[str, Image.Image]:
    rgb = natural_image(120, 90)
    gray = np.asarray(rgb.convert("L"))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    return {
        "RGB": rgb,
        "L": rgb.convert("L"),
        "LA": rgb.convert("LA"),
        "P": palette,
        "P+transparency": transparent,
        "RGBA": rgb.convert("RGBA"),
        "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
        "I": Image.fromarray(gray.astype(np.int32) * 257),
        "F": Image.fromarray(gray.astype(np.float32) / 255),
        "F>1": Image.fromarray(gray.astype(np.float32) * 2),
        "PA": palette.convert("PA"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_gives_a_finite_square_tensor(transform, mode):
    image = _modes()[mode]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's "Palette images with Transparency" warning
        loaded = load_image(image)
        out = transform(image)
    assert loaded.mode == "RGB" and loaded.size == image.size
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_mode_conversions_are_exact():
    modes = _modes()
    gray = np.asarray(modes["L"].convert("RGB"))
    for mode in ("I;16", "I", "F"):  # 16-bit range scaled (not clipped); F in [0, 1] scaled by 255
        assert np.array_equal(np.asarray(load_image(modes[mode])), gray), mode
    clipped = np.minimum(np.asarray(modes["L"], dtype=np.int32) * 2, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(modes["F>1"]))[..., 0], clipped)
    rgba = modes["RGBA"].copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    assert np.array_equal(np.asarray(load_image(rgba)), np.asarray(rgba.convert("RGB")))  # alpha dropped
    transparent = modes["P+transparency"]
    assert np.array_equal(np.asarray(load_image(transparent)), np.asarray(transparent.convert("RGBA"))[..., :3])


def test_exif_orientation_is_applied(tmp_path):
    image = natural_image(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    with Image.open(path) as raw:  # the stored pixels, orientation not applied
        expected = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert loaded.size == (40, 60)
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))
    assert np.array_equal(np.asarray(load_image(Image.open(path))), np.asarray(expected))


# ---- input kinds --------------------------------------------------------------------------------


def test_every_input_kind_gives_the_same_tensor(transform, tmp_path):
    image = natural_image(90, 70)
    path = tmp_path / "image.png"
    image.save(path)
    data = path.read_bytes()
    array = np.array(image)  # writable, for torch.from_numpy
    reference = transform(image)
    with open(path, "rb") as file:
        sources = {
            "str": str(path),
            "Path": path,
            "bytes": data,
            "bytearray": bytearray(data),
            "memoryview": memoryview(data),
            "BytesIO": io.BytesIO(data),
            "file": file,
            "ndarray": array,
            "ndarray float": array / 255.0,
            "ndarray uint16": array.astype(np.uint16) * 257,
            "ndarray RGBA": np.dstack([array, np.full(array.shape[:2], 7, np.uint8)]),
            "non-contiguous ndarray": np.asfortranarray(array),
            "tensor uint8": torch.from_numpy(array).permute(2, 0, 1),
            "tensor float": torch.from_numpy(array).permute(2, 0, 1) / 255.0,
        }
        for name, source in sources.items():
            assert torch.equal(transform(source), reference), name
    gray = np.array(image.convert("L"))
    gray_reference = transform(image.convert("L"))
    for name, source in {
        "HxW": gray,
        "HxWx1": gray[..., None],
        "tensor HxW": torch.from_numpy(gray),
        "tensor 1xHxW": torch.from_numpy(gray)[None],
        "tensor float HxW": torch.from_numpy(gray) / 255.0,
    }.items():
        assert torch.equal(transform(source), gray_reference), name


# ---- errors -------------------------------------------------------------------------------------


def _jpeg(tmp_path: Path, name: str, size: tuple[int, int] = (200, 150)) -> Path:
    path = tmp_path / name
    natural_image(*size).save(path, quality=90)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="no_such_image.jpg.*does not exist") as info:
        load_image(tmp_path / "no_such_image.jpg")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match="notes.jpg.*not an image"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(b"this is not an image")


def test_truncated_jpeg(tmp_path, transform):
    path = _jpeg(tmp_path, "cut.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg.*truncated") as info:
        load_image(path)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(ImageLoadError, match="truncated"):
        transform(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg.*truncated"):
        load_image(Image.open(path))  # a lazily opened PIL image is decoded and checked too


@pytest.mark.parametrize("limit", [20_000, 10_000])  # 30,000 pixels: over the warning / the error threshold
def test_decompression_bomb(tmp_path, monkeypatch, limit):
    path = _jpeg(tmp_path, "bomb.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # must fail even where the user silences Pillow's warning
        with pytest.raises(ImageLoadError, match="bomb.jpg") as info:
            load_image(path)
    message = str(info.value)
    assert "30000 pixels" in message and f"MAX_IMAGE_PIXELS = {limit}" in message and "raise it" in message
    assert isinstance(info.value.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning))


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        (None, TypeError, "None"),
        (42, TypeError, "int"),
        ([natural_image(8, 8)], TypeError, "list"),
        (np.zeros((2, 8, 8, 3), np.uint8), ImageLoadError, r"shape.*\(2, 8, 8, 3\)"),
        (np.zeros((8, 8, 2), np.uint8), ImageLoadError, r"\(8, 8, 2\)"),
        (np.zeros((8, 8, 3), np.int64), ImageLoadError, "int64"),
        (np.full((8, 8, 3), 2.0), ImageLoadError, r"\[0, 1\]"),
        (np.full((8, 8), np.nan), ImageLoadError, r"\[0, 1\]"),
        (torch.zeros(2, 3, 8, 8), ImageLoadError, r"tensor of shape \(2, 3, 8, 8\)"),
        (torch.zeros(8, 8, 3), ImageLoadError, "CxHxW"),
    ],
)
def test_bad_sources(source, error, match):
    with pytest.raises(error, match=match):
        load_image(source)
