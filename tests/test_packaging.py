"""The built wheel holds every module of the source tree (detection/ installed as cnclip_vision.detection)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_module(tmp_path):
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
            str(ROOT),
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
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cnclip = cnclip_vision.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
