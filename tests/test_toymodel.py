"""The shipped toy-world model and the recipe that makes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cnclip_vision
from cnclip_vision.toy.model import QUALITY_BARS, TOY_CONFIG, TOY_MODEL_DIR, evaluate_toy_model
from cnclip_vision.training.clip import TrainConfig, train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy-tiny.json"


def test_recipe_describes_the_registered_model():
    recipe = json.loads(RECIPE.read_text())
    assert cnclip_vision.CLIPConfig.from_dict(recipe["model"]["config"]) == TOY_CONFIG
    assert recipe["train_data"]["toyworld"]["image_size"] == TOY_CONFIG.vision.image_size
    assert "toy-tiny" in cnclip_vision.list_models()


def test_shipped_model_meets_the_quality_bars():
    """The shipped weights, on freshly generated held-out data (other seeds than `make toy-model` used)."""
    assert (TOY_MODEL_DIR / "model.safetensors").is_file(), "run `make toy-model` to build the shipped model"
    model = cnclip_vision.load("toy-tiny")
    assert model.config == TOY_CONFIG and model.dtype == torch.float32
    report = evaluate_toy_model(model, seed=2024, n_per_class=10, n_retrieval=1000)
    for key, bar in QUALITY_BARS.items():
        assert report[key] >= bar, report
    assert report["zeroshot_top1_held_out_combos"] > 4 * report["chance_top1"], report


@pytest.mark.slow
def test_shortened_recipe_learns(tmp_path):
    """The recipe, shortened to ~2-3 minutes: zero-shot accuracy rises far above chance (1/64) and above
    the untrained model; the loss falls."""
    from cnclip_vision.toy import world as toyworld

    toyworld.write_imagefolder(tmp_path / "eval", n_per_class=3, seed=7, image_size=TOY_CONFIG.vision.image_size)
    recipe = json.loads(RECIPE.read_text())
    recipe["train_data"]["toyworld"].update(n=24000)
    recipe.update(
        output_dir=str(tmp_path / "run"),
        max_steps=250,
        log_every=25,
        save_every=1000,
        eval_zeroshot=str(tmp_path / "eval"),
        progress=False,
    )
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    config = TrainConfig.from_file(tmp_path / "recipe.json")
    torch.manual_seed(config.seed)
    untrained = cnclip_vision.create_model(TOY_CONFIG)
    before = evaluate_toy_model(untrained, seed=99, n_per_class=3, n_retrieval=200)["zeroshot_top1"]
    summary = train(config)
    after = evaluate_toy_model(cnclip_vision.load(summary["model_dir"]), seed=99, n_per_class=3, n_retrieval=200)
    losses = [
        json.loads(ln)["loss"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln
    ]
    assert losses[-1] < losses[0] - 0.5, losses
    assert after["zeroshot_top1"] > max(5 / 64, before + 0.05), (before, after)
