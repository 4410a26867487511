"""Detector training (``cnclip_vision.detection.train``) on toy-world COCO sets and the shipped tiny CLIP:
the loss falls on a fixed batch while CLIP stays frozen, a run writes its checkpoint / metrics / detector,
resuming after an interruption gives bit-identical weights (also with gradient accumulation), the weight-decay
groups, ``categories="base"``, bad configs, the NaN guard, and unreadable training images."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cnclip_vision
from cnclip_vision.detection import DetectorConfig, OpenVocabDetector
from cnclip_vision.detection.train import DetectorTrainConfig, build_dataset, train_detector
from cnclip_vision.errors import CNClipError
from cnclip_vision.toy import world as toyworld
from cnclip_vision.training.clip import TrainingError

DETECTOR = dict(
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
BASE_NAMES = [c.name for c in sorted(toyworld.BASE_CATEGORIES, key=lambda c: c.id)]
N_TRAIN, BATCH, STEPS = 12, 4, 5  # 3 steps per epoch: 5 steps cross an epoch boundary


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy-detection")
    return {
        "train": toyworld.write_detection_set(root / "train", N_TRAIN, seed=0, annotate=toyworld.BASE_CATEGORIES),
        "val": toyworld.write_detection_set(root / "val", 4, seed=777),  # all 64 categories annotated
    }


def make_config(output_dir: Path, train_data: Path, **overrides) -> DetectorTrainConfig:
    options = dict(
        output_dir=str(output_dir),
        train_data=str(train_data),
        clip="toy-tiny",
        detector=dict(DETECTOR),
        batch_size=BATCH,
        max_steps=STEPS,
        lr=1e-3,
        num_workers=0,
        progress=False,
        log_every=1,
        save_every=1,
        device="cpu",
        seed=0,
    )
    return DetectorTrainConfig(**{**options, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_records(path: Path) -> list[dict]:
    return [r for r in read_jsonl(path) if "loss" in r]


# ------------------------------------------------------------------------------- the optimisation
@pytest.fixture(scope="module")
def clip():
    return cnclip_vision.load("toy-tiny")


def test_a_few_steps_reduce_the_loss(clip):
    torch.manual_seed(0)
    det = OpenVocabDetector(clip, DetectorConfig(clip="toy-tiny", **DETECTOR))
    vocab = det.encode_vocabulary(BASE_NAMES)
    det.train()
    scenes = toyworld.detection_scenes(4, seed=21)
    images = [torch.from_numpy(toyworld.render_array(s).copy()).permute(2, 0, 1).float() / 255 for s in scenes]
    targets = []
    for s in scenes:
        objects = [o for o in s.objects if o.category.name in BASE_NAMES]
        targets.append(
            {
                "boxes": torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([BASE_NAMES.index(o.category.name) for o in objects], dtype=torch.int64),
            }
        )
    assert sum(len(t["labels"]) for t in targets) >= 4
    clip_before = {k: v.clone() for k, v in clip.state_dict().items()}
    params = [p for _, p in det.trainable_named_parameters()]
    clip_ids = {id(p) for p in clip.parameters()}
    assert params and not any(id(p) in clip_ids for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def losses() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same proposal sampling every time
        return det(images, vocab, targets)

    with torch.no_grad():
        first = losses()
    assert set(first) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(v.ndim == 0 and math.isfinite(float(v)) for v in first.values())
    start = float(sum(first.values()))
    for _ in range(5):
        optimizer.zero_grad()
        sum(losses().values()).backward()
        optimizer.step()
    with torch.no_grad():
        end = float(sum(losses().values()))
    assert end < 0.6 * start, f"loss {start:.3f} -> {end:.3f}"
    assert all(p.grad is None for p in clip.parameters()), "gradients reached the frozen CLIP"
    for k, v in clip.state_dict().items():
        assert torch.equal(v, clip_before[k]), f"the frozen CLIP changed: {k}"


def test_training_needs_targets(clip):
    det = OpenVocabDetector(clip, DetectorConfig(clip="toy-tiny", **DETECTOR)).train()
    vocab = det.encode_vocabulary(BASE_NAMES)
    with pytest.raises(ValueError, match="needs targets"):
        det([torch.rand(3, 64, 64)], vocab)
    with pytest.raises(AttributeError):  # the vocabulary is an argument of every call, not state
        det([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[1.0, 1, 20, 20]]), "labels": torch.tensor([0])}])


def test_periodic_evaluation_keeps_the_training_vocabulary(clip, data):
    """Evaluation during training scores all of the eval file's categories; afterwards the training vocabulary
    (which the target labels index) must be back."""
    from cnclip_vision.detection.inference import detect_coco

    det = OpenVocabDetector(clip, DetectorConfig(clip="toy-tiny", **{**DETECTOR, "vlm_mode": "off"})).train()
    results, dataset = detect_coco(det, data["val"], progress=False)
    assert len(dataset.category_names) == 64 and results
    assert not hasattr(det, "vocabulary")  # detect_coco used its own predictor; nothing to restore
    assert det.training


# -------------------------------------------------------------------------------------- full runs
@pytest.fixture(scope="module")
def run_a(data, tmp_path_factory) -> tuple[DetectorTrainConfig, dict]:
    """STEPS steps straight through, base categories only, evaluated at the end."""
    config = make_config(
        tmp_path_factory.mktemp("run-a"), data["train"], categories="base", eval_data=str(data["val"]), eval_every=STEPS
    )  # evaluated once, after the last step
    return config, train_detector(config)


def test_run_writes_checkpoint_metrics_and_detector(run_a, data):
    config, summary = run_a
    out = Path(config.output_dir)
    assert summary["steps"] == STEPS
    assert summary["detector_dir"] == str(out / "detector") and summary["checkpoint"] == str(out / "checkpoint.pt")

    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["step"] == STEPS
    assert {"detector", "optimizer", "scheduler", "rng"} <= set(checkpoint)
    assert not any(k.startswith("clip.") for k in checkpoint["detector"])
    assert json.loads(checkpoint["train_config"])["max_steps"] == STEPS

    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["epoch"] for r in train] == [0, 0, 0, 1, 1]
    for r in train:
        parts = r["loss_classifier"] + r["loss_box_reg"] + r["loss_objectness"] + r["loss_rpn_box_reg"]
        assert math.isfinite(r["loss"]) and r["loss"] == pytest.approx(parts, abs=1e-4)
        assert r["lr"] <= config.lr
    evals = [r for r in records if "AP50" in r]
    assert [r["step"] for r in evals] == [STEPS]
    assert all(0 <= r[k] <= 1 for r in evals for k in ("AP50", "AP50_base", "AP50_novel"))
    assert summary["eval"] == evals[-1]

    detector = OpenVocabDetector.from_pretrained(summary["detector_dir"])
    assert detector.config.seen_categories == tuple(BASE_NAMES)  # categories="base": base names only
    assert detector.config.clip == "toy-tiny" and detector.config.out_channels == DETECTOR["out_channels"]
    for k, v in detector.head_state_dict().items():
        assert torch.equal(v, checkpoint["detector"][k]), k
    image = toyworld.render(toyworld.detection_scenes(1, seed=5)[0])
    result = detector.predict(image, ["红色圆形", "蓝色方形"], score_threshold=0.0)[0]
    assert len(result["scores"]) > 0


def test_weight_decay_groups(clip, run_a):
    """No decay on biases, norms, the background embedding and the temperature; decay on every weight matrix
    and kernel (the region head's embedding projection and the fine-tuned tower blocks included). The run's
    optimizer has these two groups."""
    from cnclip_vision.training.loop import param_groups

    def split(detector: OpenVocabDetector) -> tuple[set[str], set[str], set[str]]:
        named = detector.trainable_named_parameters()
        names = {id(p): n for n, p in named}
        decayed, exempt = ({names[id(p)] for p in g["params"]} for g in param_groups(detector, 0.1, named))
        return decayed, exempt, {n for n, p in named if p.ndim < 2}

    det = OpenVocabDetector(clip, DetectorConfig(clip="toy-tiny", **{**DETECTOR, "trainable_layers": 1}))
    decayed, exempt, vectors = split(det)
    assert not decayed & exempt and exempt == vectors
    assert {
        "background",
        "log_inv_temperature",
        "backbone.tower.blocks.3.norm1.weight",
        "backbone.tower.norm.bias",
        "rpn.head.cls_logits.bias",
        "region_head.embed.bias",
    } <= exempt
    assert {
        "region_head.embed.weight",
        "region_head.mlp.fc6.weight",
        "region_head.bbox.weight",
        "rpn.head.conv.0.0.weight",
        "backbone.tower.blocks.3.attn.qkv.weight",
        "backbone.stages.0.0.weight",
    } <= decayed

    config_a, _ = run_a
    decayed, exempt, _ = split(OpenVocabDetector(clip, DetectorConfig(clip="toy-tiny", **config_a.detector)))
    saved = torch.load(Path(config_a.output_dir) / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(len(g["params"]), g["weight_decay"]) for g in saved] == [(len(decayed), 0.1), (len(exempt), 0.0)]


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def run_a_accumulated(data, tmp_path_factory) -> tuple[DetectorTrainConfig, dict]:
    """Run A with two micro-batches per optimizer step (no evaluation)."""
    config = make_config(tmp_path_factory.mktemp("run-a-accum"), data["train"], categories="base", accum_steps=2)
    return config, train_detector(config)


def _die_in_step(monkeypatch, step: int, accum_steps: int) -> None:
    """The process dies in the first training forward pass of optimizer step ``step`` (with ``save_every=1`` the
    checkpoint then holds step ``step - 1``)."""
    real = OpenVocabDetector.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == (step - 1) * accum_steps + 1:
                raise _Interrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(OpenVocabDetector, "forward", forward)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_resume_is_exact(request, accum_steps, tmp_path, monkeypatch):
    """Run B dies in step 3 (its checkpoint holds step 2) and resumes: its final weights and its losses from
    step 3 on are those of the uninterrupted run A, also when a step accumulates several micro-batches (the
    resumed position, counted in optimizer steps, was once handed to a sampler that counted micro-batches)."""
    config_a, _ = request.getfixturevalue("run_a" if accum_steps == 1 else "run_a_accumulated")
    assert config_a.accum_steps == accum_steps
    config_b = dataclasses.replace(
        config_a, output_dir=str(tmp_path / "run-b"), eval_data=None
    )  # A evaluates after its last step only
    with monkeypatch.context() as patch:
        _die_in_step(patch, 3, accum_steps)
        with pytest.raises(_Interrupt):
            train_detector(config_b)
    assert not (tmp_path / "run-b" / "detector").exists()
    assert torch.load(tmp_path / "run-b" / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == 2
    summary = train_detector(dataclasses.replace(config_b), resume=True)
    assert summary["steps"] == STEPS

    losses_a = {r["step"]: r["loss"] for r in train_records(Path(config_a.output_dir) / "metrics.jsonl")}
    losses_b = {r["step"]: r["loss"] for r in train_records(tmp_path / "run-b" / "metrics.jsonl")}
    assert sorted(losses_b) == list(range(1, STEPS + 1))
    assert losses_b == losses_a
    a = load_file(Path(config_a.output_dir) / "detector" / "detector.safetensors")
    b = load_file(tmp_path / "run-b" / "detector" / "detector.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"


def test_resume_a_finished_run_does_nothing(run_a, tmp_path):
    config_a, _ = run_a
    out = tmp_path / "copy"
    shutil.copytree(config_a.output_dir, out)
    before = load_file(out / "detector" / "detector.safetensors")
    summary = train_detector(dataclasses.replace(config_a, output_dir=str(out), eval_data=None), resume=True)
    assert summary["steps"] == STEPS
    assert len(train_records(out / "metrics.jsonl")) == STEPS
    after = load_file(out / "detector" / "detector.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_another_detector_config(run_a, tmp_path):
    """A checkpoint that does not fit the detector (the recipe changed between runs) is a clear error naming the
    checkpoint, not a torch traceback (and never a silent partial load)."""
    config_a, _ = run_a
    out = tmp_path / "changed"
    shutil.copytree(config_a.output_dir, out)
    changed = dataclasses.replace(
        config_a, output_dir=str(out), eval_data=None, detector={**config_a.detector, "out_channels": 16}
    )
    with pytest.raises(CNClipError, match="checkpoint.pt"):
        train_detector(changed, resume=True)


def test_dataset_categories(data, tmp_path):
    def names(**kw):
        return build_dataset(make_config(tmp_path, data["train"], **kw), 128).category_names

    assert names() == [c.name for c in toyworld.CATEGORIES]  # every category listed in the file
    assert names(categories="base") == BASE_NAMES
    first, tenth = toyworld.CATEGORIES[0], toyworld.CATEGORIES[9]
    assert names(categories=[tenth.name, first.id]) == [first.name, tenth.name]  # names or ids, in id order
    with pytest.raises(TrainingError, match="categories"):
        names(categories="novel")


# ------------------------------------------------------------------------------------ bad configs
def test_recipe_file(data, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "output_dir": str(tmp_path),
                "train_data": str(data["train"]),
                "betas": [0.9, 0.99],
                "detector": DETECTOR,
                "batch_size": 8,
            }
        ),
        encoding="utf-8",
    )
    config = DetectorTrainConfig.from_file(recipe, batch_size=4, lr=None)  # overrides win, None is "not given"
    assert config.batch_size == 4 and config.betas == (0.9, 0.99) and config.lr == DetectorTrainConfig.lr

    recipe.write_text(json.dumps({"output_dir": str(tmp_path), "train_data": "x.json", "learning_rate": 1e-3}))
    with pytest.raises(CNClipError, match=r"unknown detector training options \['learning_rate'\]"):
        DetectorTrainConfig.from_file(recipe)
    recipe.write_text("{broken", encoding="utf-8")
    with pytest.raises(CNClipError, match="recipe.json"):
        DetectorTrainConfig.from_file(recipe)
    with pytest.raises(CNClipError, match="missing.json"):
        DetectorTrainConfig.from_file(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(batch_size=6, accum_steps=4), "divisible"),
        (dict(precision="fp8"), "precision"),
        (dict(precision="fp16"), "GPU"),
        (dict(epochs=0, max_steps=None), "epochs"),
        (dict(scale_range=(2.0, 1.0)), "scale_range"),
        (dict(batch_size=64), "fewer than one batch"),
        (dict(detector={**DETECTOR, "image_size": 100}), "multiple of 32"),
        (dict(detector={**DETECTOR, "bogus": 1}), "bogus"),
    ],
)
def test_bad_training_config(data, tmp_path, overrides, match):
    config = make_config(tmp_path / "out", data["train"], **overrides)
    with pytest.raises((CNClipError, ValueError, TypeError), match=match) as info:
        train_detector(config)
    if overrides.get("precision") or "batch_size" in overrides or "epochs" in overrides:
        assert isinstance(info.value, TrainingError)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------- NaN guard
def _nan_from(monkeypatch, first_bad_call: int) -> None:
    real = OpenVocabDetector.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if not self.training:
            return out
        calls["n"] += 1
        if calls["n"] >= first_bad_call:
            out = {**out, "loss_classifier": out["loss_classifier"] * float("nan")}
        return out

    monkeypatch.setattr(OpenVocabDetector, "forward", forward)


def test_nan_guard_names_step_and_checkpoint(data, tmp_path, monkeypatch):
    _nan_from(monkeypatch, 3)
    config = make_config(tmp_path / "nan", data["train"], max_steps=4)
    checkpoint = tmp_path / "nan" / "checkpoint.pt"
    with pytest.raises(TrainingError, match="step 3") as info:
        train_detector(config)
    assert str(checkpoint) in str(info.value)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["step"] == 2  # the last good checkpoint was not overwritten by NaN weights
    assert all(torch.isfinite(v).all() for v in state["detector"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "detector").exists()


def test_nan_guard_before_any_checkpoint(data, tmp_path, monkeypatch):
    _nan_from(monkeypatch, 1)
    with pytest.raises(TrainingError, match=r"step 1\b.*no checkpoint"):
        train_detector(make_config(tmp_path / "nan", data["train"], max_steps=2))


# ---------------------------------------------------------------------------------- bad images
def test_unreadable_training_image_is_skipped(data, tmp_path, caplog):
    root = tmp_path / "train"
    shutil.copytree(data["train"].parent, root)
    bad = root / "images" / "000003.png"
    assert bad.is_file()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage" * 4)
    steps = N_TRAIN // BATCH  # one epoch: every image is read once
    config = make_config(tmp_path / "out", root / "annotations.json", max_steps=steps)
    with caplog.at_level(logging.WARNING):
        summary = train_detector(config)
    assert summary["steps"] == steps
    assert any("000003.png" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert [r["step"] for r in train_records(tmp_path / "out" / "metrics.jsonl")] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in train_records(tmp_path / "out" / "metrics.jsonl"))
    OpenVocabDetector.from_pretrained(summary["detector_dir"])


# ------------------------------------------------------------------------------------ data parallel
@pytest.mark.skipif(__import__("sys").platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_torchrun_two_processes(data, tmp_path):
    """Two gloo processes train one detector (DDP averages the gradients): the run completes, logs every step
    and writes a detector that loads. (Losses are not compared with one process: the RPN and RoI samplers
    draw from each process's own RNG.)"""
    import os
    import subprocess
    import sys

    recipe = dataclasses.asdict(make_config(tmp_path / "ddp", data["train"], max_steps=3, save_every=100))
    (tmp_path / "recipe.json").write_text(json.dumps(recipe, default=list), encoding="utf-8")
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cnclip_vision.cli",
            "-q",
            "train-detector",
            "--config",
            str(tmp_path / "recipe.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in train_records(tmp_path / "ddp" / "metrics.jsonl")] == [1, 2, 3]
    summary = json.loads(out.stdout)
    assert summary["steps"] == 3
    OpenVocabDetector.from_pretrained(tmp_path / "ddp" / "detector")
