"""Open-vocabulary segmentation: shapes and probabilities at the input resolution, the background rule, the
picture with its Chinese legend, the command line and its alignment warning, and the toy-world mIoU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cnclip_vision
from cnclip_vision.cli import main
from cnclip_vision.segmentation import segment
from cnclip_vision.toy import world
from cnclip_vision.toy.dense import evaluate_segmentation


@pytest.fixture(scope="module")
def model():
    return cnclip_vision.load("toy-tiny").eval()


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "scene.png"
    world.render(world.detection_scenes(1, 77, image_size=128)[0]).crop((0, 0, 128, 100)).save(path)
    return path


def test_maps_at_the_input_resolution(model, scene_file):
    labels = ["红色圆形", "绿色三角形", "粉色正方形"]
    (result,) = segment(model, [scene_file], labels)
    assert result.label_map.shape == (100, 128) and result.scores.shape == (3, 100, 128)
    torch.testing.assert_close(result.scores.sum(0), torch.ones(100, 128))
    torch.testing.assert_close(result.label_map, result.scores.argmax(0))
    assert sum(result.areas().values()) == pytest.approx(1.0)
    (strict,) = segment(model, scene_file, labels, background_threshold=1.0)  # one image, not a list
    assert (strict.label_map == -1).all() and sum(strict.areas().values()) == 0.0


def test_bad_arguments(model, scene_file):
    with pytest.raises(ValueError, match="empty"):
        segment(model, [scene_file], [])
    with pytest.raises(ValueError, match="duplicate"):
        segment(model, [scene_file], ["猫", "猫"])
    with pytest.raises(ValueError, match="background_threshold"):
        segment(model, [scene_file], ["猫"], background_threshold=1.5)
    with pytest.raises(ValueError, match="dense_mode"):
        segment(model, [scene_file], ["猫"], dense_mode="gem")  # type: ignore[arg-type]


def test_overlay_has_a_legend_of_the_labels_present():
    from cnclip_vision.detection.visualize import label_color, segmentation_overlay

    image = Image.new("RGB", (64, 64), (255, 255, 255))
    label_map = np.full((64, 64), -1)
    label_map[:32] = 1
    picture = segmentation_overlay(image, label_map, ["猫", "狗"], alpha=1.0, min_side=64)
    assert picture.width > 64 and picture.height >= 64  # the legend panel on the right
    pixels = np.asarray(picture)
    assert tuple(pixels[5, 5]) == label_color("狗") and tuple(pixels[50, 5]) == (255, 255, 255)
    with pytest.raises(ValueError, match="indices"):
        segmentation_overlay(image, np.full((64, 64), 2), ["猫", "狗"])


def test_cli_writes_areas_and_warns_about_unaligned_tokens(scene_file, tmp_path, capsys, caplog):
    picture = tmp_path / "seg.png"
    code = main(["segment", str(scene_file), "--model", "toy-tiny", "--labels", "红色圆形,绿色三角形",
                 "--draw", str(picture), "--format", "csv"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and picture.is_file()
    header, row = captured.out.strip().splitlines()
    assert header.split(",")[:4] == ["image", "width", "height", "background"]
    assert "area_红色圆形" in header
    assert "mostly noise" in caplog.text  # toy-tiny's dense tokens are known to be unaligned
    assert main(["segment", str(scene_file), "--model", "toy-tiny", "--draw", str(picture)]) == 2  # no labels
    assert main(["segment", str(scene_file), "--labels", "猫", "--background-threshold", "2"]) == 2


def test_toy_miou_is_measured_over_present_categories(model):
    result = evaluate_segmentation(model, modes=("raw", "naclip"), n_images=6, seed=4244)
    for mode in ("raw", "naclip"):
        r = result["modes"][mode]
        assert 0.0 <= r["mIoU"] <= 1.0 and r["categories"] >= 5
    assert json.dumps(result)  # plain values
