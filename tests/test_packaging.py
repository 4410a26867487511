"""The built wheel holds every module of the source tree (detection/ installed as cnclip_vision.detection) and
every shipped asset."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _clean_copy(destination: Path) -> Path:
    """The files git would commit (tracked, or untracked and not ignored), without the checkout's build/: an
    in-place build would reuse a stale build/lib and hide a file the package data no longer names."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def test_wheel_contains_every_module(tmp_path):
    source = _clean_copy(tmp_path / "src")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("cnclip_vision-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "cnclip_vision").rglob("*.py")}
    expected |= {
        "cnclip_vision/detection/" + str(p.relative_to(ROOT / "detection")) for p in (ROOT / "detection").rglob("*.py")
    }
    expected |= {"cnclip_vision/data/vocab.txt", "cnclip_vision/py.typed"}
    # the shipped toy models and detectors, which registered names (toy-tiny, toy-tiny-dense, ...) load from
    assets = {str(p.relative_to(source)) for p in (source / "cnclip_vision" / "assets").rglob("*") if p.is_file()}
    assert any(a.endswith("toy-tiny-dense/model.safetensors") for a in assets)
    expected |= assets
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cnclip = cnclip_vision.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
