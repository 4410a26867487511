"""The one CLI convention (README "Command line"): shared options, `-o -`, global options anywhere, `--version`,
exit codes, one-line errors naming the argument, arguments checked before any model is loaded, flat CSV,
quiet logs. In-process through `main()` where the result is the exit code and stdout; subprocesses where the
logging setup and stderr of a fresh process are the point."""

from __future__ import annotations

import csv
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

from cnclip_vision.cli import build_parser, main

LABELS = "红色圆形,蓝色三角形,绿色正方形"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_conv_images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def _no_model_load(monkeypatch) -> None:
    """Any model load fails the test: arguments must be checked before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("cnclip_vision.models.factory._resolve", refuse)


# ---------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize(
    "device, words",
    [("nonsense", ["--device", "'nonsense'", "not a torch device"]), ("cuda:7", ["--device", "cuda:7"])],
)
def test_bad_device_is_one_line_before_loading(images, device, words, capsys, monkeypatch):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.fail("this machine has 8+ GPUs: pick another impossible index for the test")
    _no_model_load(monkeypatch)
    code = main(["classify", str(images), "--labels", LABELS, "--model", "toy-tiny", "--device", device])
    assert code == 2
    line = _error_line(capsys)
    for word in words:
        assert word in line, line


def test_cuda_without_gpu_is_one_line_and_train_writes_nothing(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    _no_model_load(monkeypatch)
    assert main(["classify", str(images), "--labels", LABELS, "--model", "toy-tiny", "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in _error_line(capsys)
    out = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text('{"image": "a.png", "text": "猫"}\n', encoding="utf-8")
    code = main(
        ["train", "--output-dir", str(out), "--train-data", str(data), "--model", "toy-tiny", "--device", "cuda"]
    )
    assert code == 2
    assert "cuda" in _error_line(capsys)
    assert not out.exists(), "a failed start left an output folder behind"


# ------------------------------------------------------------------------------------------ arguments
def test_unknown_model_suggests_the_close_name(images, capsys):
    assert main(["classify", str(images), "--labels", LABELS, "--model", "toy-tiyn"]) == 2
    line = _error_line(capsys)
    assert "'toy-tiyn'" in line and "did you mean 'toy-tiny'" in line, line


@pytest.mark.parametrize(
    "argv", [["classify", "IMG", "--labels", LABELS, "-k", "0"], ["search", "q", "--index", "X", "-k", "-1"]]
)
def test_k_below_one_is_a_usage_error(argv, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    assert main(argv) == 2  # argparse's exit code, returned
    assert "-k/--top-k: must be >= 1" in _error_line(capsys)


def test_labels_and_labels_file_together_are_refused(images, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    labels = tmp_path / "labels.txt"
    labels.write_text("猫\n狗\n", encoding="utf-8")
    code = main(["classify", str(images), "--labels", LABELS, "--labels-file", str(labels), "--model", "toy-tiny"])
    assert code == 2
    assert "not both" in _error_line(capsys)


def test_output_that_is_a_folder_is_refused_before_the_work(images, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    assert main(["classify", str(images), "--labels", LABELS, "--model", "toy-tiny", "-o", str(tmp_path)]) == 2
    assert "is a folder" in _error_line(capsys)


def test_global_options_anywhere_and_version(capsys):
    parser = build_parser()
    assert parser.parse_args(["-q", "models"]).quiet is True
    assert parser.parse_args(["models", "-q"]).quiet is True
    assert parser.parse_args(["models"]).quiet is False
    assert parser.parse_args(["index", "build", "DIR", "-v"]).verbose is True
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("cnclip 0.")


# --------------------------------------------------------------------------------------------- output
def test_dash_output_is_stdout_and_csv_cells_are_flat(images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["classify", str(images), "--labels", LABELS, "--model", "toy-tiny", "--device", "cpu", "--workers", "0"]
    assert main([*argv, "-o", "-"]) == 0
    assert not (tmp_path / "-").exists(), "-o - wrote a file named '-'"
    document = json.loads(capsys.readouterr().out)
    assert len(document["results"]) == 3
    assert main([*argv, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3
    for row in rows:
        assert not any(cell.startswith(("[", "{")) for cell in row.values()), row
        assert len(row["labels"].split(";")) == len(row["probs"].split(";")) == 3, row


def test_search_uses_the_model_the_index_records_and_refuses_another(images, tmp_path, capsys, monkeypatch):
    index = tmp_path / "emb"
    embed = ["-q", "embed", str(images), "--out", str(index), "--model", "toy-tiny", "--device", "cpu"]
    assert main([*embed, "--precision", "fp32"]) == 0
    capsys.readouterr()
    recorded = json.loads((index / "manifest.json").read_text())["model"]
    assert (recorded["source"], recorded["precision"]) == ("toy-tiny", "fp32")
    # precision auto would pick bf16 here, but an index is searched in the precision it was written in
    monkeypatch.setattr("cnclip_vision.device.auto_precision", lambda device=None: "bf16")
    assert main(["search", "红色圆形", "--index", str(index), "-k", "2", "--device", "cpu"]) == 0  # no --model
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    assert [h["rank"] for h in hits] == [1, 2]
    code = main(["search", "红色圆形", "--index", str(index), "--model", "toy-tiny", "--precision", "bf16"])
    assert code == 2
    line = _error_line(capsys)
    assert "is not the model" in line and "toy-tiny" in line, line


# ----------------------------------------------------------------------------------------------- logs
def test_verbose_logs_have_no_third_party_debug_and_no_progress_bars_off_a_terminal(images, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    argv = ["classify", str(images), "--labels", LABELS, "--model", "toy-tiny", "--device", "cpu", "--workers", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "cnclip_vision.cli", *argv, "-v"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "DEBUG cnclip_vision" in result.stderr or "INFO cnclip_vision" in result.stderr, result.stderr
    assert "DEBUG PIL" not in result.stderr, result.stderr
    assert "\r" not in result.stderr, "a progress bar wrote into a non-terminal stderr"


def test_unexpected_failures_are_one_line_with_exit_1(images, capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("the encoder ran out of memory\nsecond line")

    monkeypatch.setattr("cnclip_vision.cli.zeroshot.load_model", boom)
    assert main(["classify", str(images), "--labels", LABELS, "--model", "toy-tiny"]) == 1
    line = _error_line(capsys)
    assert line.startswith("cnclip classify: failed: RuntimeError: the encoder ran out of memory; second line"), line


def test_permission_errors_name_the_file(images, tmp_path, capsys):
    if os.geteuid() == 0:  # root reads everything: make the file a folder instead (IsADirectoryError)
        labels = tmp_path / "labels.txt"
        labels.mkdir()
    else:
        labels = tmp_path / "labels.txt"
        labels.write_text("猫\n", encoding="utf-8")
        labels.chmod(0)
    code = main(["classify", str(images), "--labels-file", str(labels), "--model", "toy-tiny"])
    assert code == 2
    line = _error_line(capsys)
    assert str(labels) in line, line
