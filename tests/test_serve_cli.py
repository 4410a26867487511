"""``cnclip serve`` as a command: refuses non-loopback hosts without --allow-remote, refuses a folder that is
not an index, and serves (API key from CNCLIP_API_KEY) on 127.0.0.1 with --port 0 until SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cnclip_vision.serve.demo import build_demo

CLI = [sys.executable, "-m", "cnclip_vision.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CNCLIP_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("serve-cli"), per_class=1, scenes=2, seed=5)


def _cnclip(capsys, *argv: str) -> tuple[int, str, str]:
    from cnclip_vision.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as e:  # --help
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_lists_the_options(capsys):
    rc, out, _ = _cnclip(capsys, "serve", "--help")
    assert rc == 0
    for option in (
        "--index",
        "--model",
        "--detector",
        "--host",
        "--port",
        "--allow-remote",
        "--api-key-file",
        "--max-upload-mb",
    ):
        assert option in out


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_remote_host_needs_allow_remote(capsys, host, tmp_path):
    rc, _, err = _cnclip(capsys, "serve", "--index", str(tmp_path), "--host", host)
    assert rc == 2
    assert "--allow-remote" in err and "Traceback" not in err


def test_not_an_index(capsys, tmp_path):
    rc, _, err = _cnclip(capsys, "serve", "--index", str(tmp_path), "--model", "toy-tiny")
    assert rc == 2
    assert "not an embedding directory" in err and "cnclip embed" in err


def test_bad_api_key_file(capsys, tmp_path):
    (tmp_path / "key").write_text("short\n", encoding="utf-8")
    rc, _, err = _cnclip(capsys, "serve", "--index", str(tmp_path), "--api-key-file", str(tmp_path / "key"))
    assert rc == 2 and "at least 8 characters" in err


def test_serves_until_terminated(world):
    """The real command in a subprocess: prints its address, answers, stops on SIGTERM."""
    key = "cli-test-key-42424242"
    proc = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--index",
            str(world.index),
            "--model",
            "toy-tiny",
            "--detector",
            "toy-detector",
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_env(CNCLIP_API_KEY=key),
    )
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            log.append(line)
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url is not None, "".join(log)
        assert httpx.get(url + "/api/health", timeout=30).json()["status"] == "ok"
        assert httpx.get(url + "/api/info", timeout=30).status_code == 401
        r = httpx.post(url + "/api/search", json={"text": "红色圆形", "k": 3}, headers={"X-API-Key": key}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        assert any("API key required" in line for line in log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    reader.join(timeout=10)
    while not lines.empty():
        log.append(lines.get())
    # a graceful shutdown; uvicorn then re-raises the SIGTERM it caught, the conventional exit of a stopped server
    assert any("Application shutdown complete" in line for line in log), "".join(log)
    assert rc in (0, -signal.SIGTERM), "".join(log)
