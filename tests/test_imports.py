"""What importing the package costs and what it keeps: ``import cnclip_vision`` and ``cnclip --help`` import no
torch, the timm models are registered in either import order, every public name resolves, and the module paths
of the 0.1 layout still import (with a DeprecationWarning)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings

import pytest

from cnclip_vision._imports import MOVED_MODULES

HEAVY = ("torch", "timm", "transformers", "torchvision", "numpy", "PIL")


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_import_does_no_work():
    loaded = json.loads(
        _python(f"import sys, json, cnclip_vision; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    )
    assert loaded == [], f"import cnclip_vision imported {loaded}"


def test_every_help_answers_without_torch():
    code = """
import contextlib, io, json, sys
from cnclip_vision.cli import build_parser, main
commands = sorted(build_parser()._subparsers._group_actions[0].choices)
for argv in [["--help"]] + [[c, "--help"] for c in commands]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert "usage:" in out.getvalue(), argv
print(json.dumps({"commands": commands, "heavy": [m for m in __HEAVY__ if m in sys.modules]}))
""".replace("__HEAVY__", repr(HEAVY))
    result = json.loads(_python(code))
    assert len(result["commands"]) >= 15, result["commands"]
    assert result["heavy"] == [], f"--help imported {result['heavy']}"


@pytest.mark.parametrize("order", ["cnclip_vision first", "timm first"])
def test_timm_models_registered_in_either_order(order):
    first, second = ("cnclip_vision", "timm") if order == "cnclip_vision first" else ("timm", "cnclip_vision")
    names = json.loads(_python(f"import json, {first}, {second}; print(json.dumps(timm.list_models('chinese_clip*')))"))
    assert "chinese_clip_vit_base_patch16_224" in names and "chinese_clip_resnet50_224" in names


def test_library_imports_timm_and_registers():
    """timm imported by the library itself (building a model) registers the models as well."""
    code = (
        "import json, cnclip_vision; cnclip_vision.create_model('toy-tiny'); import timm; "
        "print(json.dumps(timm.list_models('chinese_clip*')))"
    )
    assert "chinese_clip_vit_large_patch14_336" in json.loads(_python(code))


@pytest.mark.parametrize(
    "package",
    [
        "cnclip_vision",
        "cnclip_vision.models",
        "cnclip_vision.data",
        "cnclip_vision.backbones",
        "cnclip_vision.detection",
    ],
)
def test_public_names_resolve(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_moved_modules_still_import(old, new):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_old_from_imports_keep_working():
    for old in ("cnclip_vision.toyworld", "cnclip_vision.weights"):
        sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="cnclip_vision.toy.world"):
        from cnclip_vision.toyworld import CATEGORIES  # noqa: F401
    with pytest.warns(DeprecationWarning):
        from cnclip_vision.weights import to_native  # noqa: F401
    from cnclip_vision.data import iter_image_batches, list_images  # the 0.1 module is now the data package

    assert callable(iter_image_batches) and callable(list_images)
