"""Training machinery: resume exactness, NaN guard, torchrun equivalence, accumulation, dataset readers."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnclip_vision
from cnclip_vision.data.datasets import CaptionDataset, OriginalLayoutDataset, read_pairs
from cnclip_vision.data.transforms import image_transform
from cnclip_vision.errors import CNClipError
from cnclip_vision.models.configs import CLIPConfig, TextConfig, VisionConfig
from cnclip_vision.training.clip import TrainConfig, TrainingError, clip_loss, train

TINY = CLIPConfig(
    32,
    VisionConfig(image_size=32, width=64, layers=1, heads=2, patch_size=8),
    TextConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128),
)
COLOURS = {
    "红色": (220, 30, 30),
    "蓝色": (30, 60, 220),
    "绿色": (30, 170, 60),
    "黄色": (230, 210, 30),
    "紫色": (140, 40, 200),
    "橙色": (240, 130, 20),
    "青色": (20, 200, 200),
    "粉色": (240, 120, 180),
}


def _write_pairs(root: Path, n: int = 128, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    names = list(COLOURS)
    for i in range(n):
        name = names[i % len(names)]
        image = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(90, 150, 3)))
        x, y = (int(v) for v in rng.integers(0, 14, 2))
        image.paste(COLOURS[name], (x, y, x + 18, y + 18))
        image.save(root / f"{i}.png")
        lines.append(
            json.dumps({"image": f"{i}.png", "caption": f"图中有一个{name}的方块，编号{i}"}, ensure_ascii=False)
        )
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "train.jsonl"


def _config(tmp_path: Path, data: Path, **kwargs) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / "run"),
        train_data=str(data),
        model={"config": TINY.to_dict()},
        epochs=2,
        batch_size=32,
        lr=2e-3,
        num_workers=0,
        save_every=3,
        log_every=1,
        progress=False,
    )
    return TrainConfig(**{**base, **kwargs})


def _losses(run: Path) -> list[float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_pairs(tmp_path_factory.mktemp("pairs"))


def test_loss_matches_definition():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    logits = 10 * img @ txt.t()
    expected = (
        torch.nn.functional.cross_entropy(logits, torch.arange(4))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(4))
    ) / 2
    torch.testing.assert_close(clip_loss(img, txt, torch.tensor(10.0)), expected)
    # pairs 0 and 1 share a key: they are removed from each other's negatives only
    masked = clip_loss(img, txt, torch.tensor(10.0), torch.tensor([7, 7, 1, 2]))
    logits[0, 1] = logits[1, 0] = float("-inf")
    expected = (
        torch.nn.functional.cross_entropy(logits, torch.arange(4))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(4))
    ) / 2
    torch.testing.assert_close(masked, expected)


def test_training_decreases_loss(tmp_path, data):
    summary = train(_config(tmp_path, data, epochs=10))
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
    model = cnclip_vision.load(summary["model_dir"])
    assert model.config == TINY and not model.training


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_resume_after_interruption_gives_the_same_weights(tmp_path, data, monkeypatch, accum_steps):
    import cnclip_vision.training.clip as train_module

    full = train(_config(tmp_path / "a", data, accum_steps=accum_steps))
    cfg = _config(tmp_path / "b", data, accum_steps=accum_steps)
    real, calls = train_module.clip_loss, {"n": 0}

    def killed_at_step_5(*args, **kwargs):  # the process dies during step 5; checkpoint.pt holds step 3
        calls["n"] += 1
        if calls["n"] == 4 * accum_steps + 1:  # one loss per micro-batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "clip_loss", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_module, "clip_loss", real)
    assert torch.load(Path(cfg.output_dir) / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed = train(cfg, resume=True)
    assert resumed["steps"] == full["steps"] == 8
    a = cnclip_vision.load(full["model_dir"]).state_dict()
    b = cnclip_vision.load(resumed["model_dir"]).state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, worst  # resumed training is bit-identical on the CPU
    assert _losses(Path(cfg.output_dir)) == _losses(tmp_path / "a" / "run")  # every step logged once, same losses


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, data, monkeypatch):
    import cnclip_vision.training.clip as train_module

    calls = {"n": 0}
    real = train_module.clip_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(train_module, "clip_loss", flaky)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*checkpoint\.pt"):
        train(_config(tmp_path, data))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_accumulation_keeps_the_global_batch(tmp_path, data):
    """accum_steps=2 gives the same first-step update as one batch of the same global size."""
    one = train(_config(tmp_path / "one", data, max_steps=1))
    two = train(_config(tmp_path / "two", data, max_steps=1, accum_steps=2))
    assert _losses(tmp_path / "one" / "run")[0] == pytest.approx(_losses(tmp_path / "two" / "run")[0], abs=1e-5)
    a = cnclip_vision.load(one["model_dir"]).state_dict()
    b = cnclip_vision.load(two["model_dir"]).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


# Parameters of the tiny CLIP (timm ViT + BERT) and whether AdamW decays them.
DECAYED = [
    "visual.patch_embed.proj.weight",
    "visual.blocks.0.attn.qkv.weight",
    "visual.blocks.0.mlp.fc1.weight",
    "visual.head.weight",
    "text.embeddings.word_embeddings.weight",
    "text.embeddings.token_type_embeddings.weight",
    "text.encoder.layer.0.attention.self.query.weight",
    "text.encoder.layer.0.output.dense.weight",
    "text_projection.weight",
]
NOT_DECAYED = [
    "logit_scale",
    "visual.pos_embed",
    "visual.cls_token",
    "visual.norm_pre.weight",
    "visual.norm_pre.bias",
    "visual.blocks.0.norm1.weight",
    "visual.blocks.0.attn.qkv.bias",
    "visual.norm.weight",
    "visual.norm.bias",
    "text.embeddings.position_embeddings.weight",
    "text.embeddings.LayerNorm.weight",
    "text.embeddings.LayerNorm.bias",
    "text.encoder.layer.0.attention.self.query.bias",
    "text.encoder.layer.0.output.LayerNorm.weight",
]


def _groups_by_name(module: torch.nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return tuple({names[id(p)] for p in g["params"]} for g in groups)  # type: ignore[return-value]


def test_weight_decay_groups():
    """open_clip's rule plus positional / class embeddings: no decay on biases, norms, gains, the logit scale,
    positional and class embeddings; decay on every weight matrix and kernel, the patch embedding and the word /
    token-type embeddings included (a substring rule on "embed" / "token" used to exempt those)."""
    from cnclip_vision.training.loop import param_groups

    model = cnclip_vision.create_model(TINY)
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed, exempt = _groups_by_name(model, groups)
    assert not decayed & exempt and decayed | exempt == {n for n, _ in model.named_parameters()}
    assert set(DECAYED) <= decayed, sorted(set(DECAYED) - decayed)
    assert set(NOT_DECAYED) <= exempt, sorted(set(NOT_DECAYED) - exempt)
    assert exempt == {n for n, p in model.named_parameters() if p.ndim < 2} | {
        "visual.pos_embed",
        "visual.cls_token",
        "text.embeddings.position_embeddings.weight",
    }


def test_the_run_uses_the_weight_decay_groups(tmp_path, data):
    """The optimizer state of a run (locked image tower: only trainable parameters) has those two groups."""
    from cnclip_vision.training.loop import param_groups

    train(_config(tmp_path, data, max_steps=1, lock_image=True, weight_decay=0.2))
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    model = cnclip_vision.create_model(TINY)
    model.visual.requires_grad_(False)
    decayed, exempt = _groups_by_name(model, param_groups(model, 0.2))
    assert not any(n.startswith("visual.") for n in decayed | exempt)
    assert [(len(g["params"]), g["weight_decay"]) for g in saved] == [(len(decayed), 0.2), (len(exempt), 0.0)]


def test_lock_image_freezes_the_tower(tmp_path, data):
    summary = train(_config(tmp_path, data, max_steps=2, lock_image=True))
    trained = cnclip_vision.load(summary["model_dir"])
    torch.manual_seed(0)  # the run's random initialisation is seeded with config.seed = 0
    start = cnclip_vision.create_model(TINY)
    for (name, a), (_, b) in zip(start.visual.state_dict().items(), trained.visual.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(
        not torch.equal(a, b) for a, b in zip(start.text.state_dict().values(), trained.text.state_dict().values())
    )


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_torchrun_two_processes_equal_one(tmp_path, data):
    recipe = _config(tmp_path / "single", data, max_steps=4, save_every=100).__dict__
    (tmp_path / "recipe.json").write_text(json.dumps(recipe, default=list))
    single = train(TrainConfig.from_file(tmp_path / "recipe.json"))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cnclip_vision.cli",
            "-q",
            "train",
            "--config",
            str(tmp_path / "recipe.json"),
            "--output-dir",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ddp_losses, single_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "single" / "run")
    assert len(ddp_losses) == len(single_losses) == 4
    np.testing.assert_allclose(ddp_losses, single_losses, atol=1e-4)  # stated tolerance: 1e-4
    a = cnclip_vision.load(single["model_dir"]).state_dict()
    b = cnclip_vision.load(tmp_path / "ddp" / "model").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# ----------------------------------------------------------------------------------- dataset readers
def test_jsonl_and_tsv_readers(tmp_path):
    jsonl = _write_pairs(tmp_path, n=4)
    (tmp_path / "train.tsv").write_text("0.png\t红色方块\n1.png\t蓝色方块\n\n", encoding="utf-8")
    pairs, missing = read_pairs(tmp_path / "train.tsv")
    assert [c for _, c in pairs] == ["红色方块", "蓝色方块"] and not missing
    dataset = CaptionDataset(jsonl, image_transform(32))
    sample = dataset[0]
    assert sample.pixel_values.shape == (3, 32, 32) and sample.caption.startswith("图中有")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", '{"image": "0.png", "caption": "猫"}\n{not json\n', r"bad\.jsonl:2: not valid JSON"),
        ("keys.jsonl", '{"img": "0.png"}\n', r"keys\.jsonl:1: expected an object"),
        ("bad.tsv", "0.png\t猫\n0.png 猫 no tab\n", r"bad\.tsv:2: expected 'image path<TAB>caption'"),
        ("empty.jsonl", "\n\n", "is empty"),
    ],
)
def test_malformed_files(tmp_path, name, content, match):
    _write_pairs(tmp_path, n=1)
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(CNClipError, match=match):
        read_pairs(tmp_path / name)


def test_missing_images_are_reported_skipped_counted(tmp_path, caplog):
    _write_pairs(tmp_path, n=3)
    (tmp_path / "train.jsonl").open("a").write('{"image": "gone.png", "caption": "不见了"}\n')
    with caplog.at_level("WARNING"):
        pairs, missing = read_pairs(tmp_path / "train.jsonl")
    assert len(pairs) == 3 and len(missing) == 1 and "gone.png" in missing[0]
    assert any("gone.png" in r.getMessage() for r in caplog.records)


def test_original_layout(tmp_path):
    images = []
    for i, colour in enumerate(((200, 0, 0), (0, 0, 200))):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
        images.append(f"{1000 + i}\t{base64.urlsafe_b64encode(buffer.getvalue()).decode()}")
    (tmp_path / "train_imgs.tsv").write_text("\n".join(images) + "\n")
    texts = [
        {"text_id": 1, "text": "红色", "image_ids": [1000]},
        {"text_id": 2, "text": "蓝色", "image_ids": [1001, 999]},
    ]
    (tmp_path / "train_texts.jsonl").write_text("\n".join(json.dumps(t, ensure_ascii=False) for t in texts) + "\n")
    dataset = OriginalLayoutDataset(tmp_path, "train", image_transform(32))
    assert len(dataset) == 2 and dataset.skipped == 1  # image 999 is not in the TSV
    red = dataset[0]
    assert red.caption == "红色" and red.pixel_values[0].mean() > red.pixel_values[2].mean()
    (tmp_path / "train_texts.jsonl").write_text('{"text_id": 1, "text": "x", "image_ids": [1000]}\n[broken\n')
    with pytest.raises(CNClipError, match=r"train_texts\.jsonl:2"):
        OriginalLayoutDataset(tmp_path, "train", image_transform(32))


def test_bad_training_config(tmp_path, data):
    with pytest.raises(TrainingError, match="divisible"):
        train(_config(tmp_path, data, batch_size=30, accum_steps=4))
    (tmp_path / "recipe.json").write_text('{"output_dir": "x", "train_data": "y", "learning_rate": 1}')
    with pytest.raises(CNClipError, match="unknown training options.*learning_rate"):
        TrainConfig.from_file(tmp_path / "recipe.json")
