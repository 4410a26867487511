"""Import machinery, so that ``import cnclip_vision`` costs almost nothing and old import paths keep working.

- :func:`lazy_exports`: a package's public names are imported on first use (PEP 562), as transformers and
  scikit-image do, so ``cnclip --help`` answers without importing torch.
- :func:`register_timm_models_on_import`: our timm models are registered as soon as timm is imported (at once
  when it already is), so ``import cnclip_vision; timm.create_model("chinese_clip_…")`` works in either order
  without ``import cnclip_vision`` importing timm and torch itself.
- :data:`MOVED_MODULES`: module paths of earlier releases, importable with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["MOVED_MODULES", "install_import_hooks", "lazy_exports", "register_timm_models_on_import"]

TIMM_REGISTRY_MODULE = "cnclip_vision.backbones.timm_models"

# old module path -> new one (0.1 layout -> the layout with one folder per concern)
MOVED_MODULES: dict[str, str] = {
    "cnclip_vision.configs": "cnclip_vision.models.configs",
    "cnclip_vision.model": "cnclip_vision.models.clip",
    "cnclip_vision.weights": "cnclip_vision.models.weights",
    "cnclip_vision.hub": "cnclip_vision.models.hub",
    "cnclip_vision.factory": "cnclip_vision.models.factory",
    "cnclip_vision.inference": "cnclip_vision.models.encode",
    "cnclip_vision.tokenizer": "cnclip_vision.data.tokenizer",
    "cnclip_vision.transforms": "cnclip_vision.data.transforms",
    "cnclip_vision.processor": "cnclip_vision.data.processor",
    "cnclip_vision.datasets": "cnclip_vision.data.datasets",
    "cnclip_vision.train": "cnclip_vision.training.clip",
    "cnclip_vision.toyworld": "cnclip_vision.toy.world",
    "cnclip_vision.toymodel": "cnclip_vision.toy.model",
    "cnclip_vision.onnx_export": "cnclip_vision.export.onnx",
    "cnclip_vision.detection.toy": "cnclip_vision.toy.detector",
}


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose attribute ``name`` is ``names[name]``'s attribute of the
    same name (a module path, absolute)."""

    def __getattr__(name: str) -> Any:
        try:
            module = names[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.target}; the old path will be removed in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:  # the target module is already executed
        return None


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(MOVED_MODULES[fullname]))


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Wraps timm's own loader so that our models are registered right after timm's ``__init__`` ran."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the look-up below from finding us again
        spec = next((s for f in sys.meta_path if (s := _find(f, fullname, path, target)) is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            importlib.import_module(TIMM_REGISTRY_MODULE)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]  # this spec's loader only
        return spec


def _find(finder: Any, fullname: str, path: Any, target: Any) -> importlib.machinery.ModuleSpec | None:
    find_spec = getattr(finder, "find_spec", None)
    return find_spec(fullname, path, target) if find_spec is not None else None


def register_timm_models_on_import() -> None:
    """Register our timm models now if timm is imported, else as soon as it is."""
    if "timm" in sys.modules:
        importlib.import_module(TIMM_REGISTRY_MODULE)
    elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())


def install_import_hooks() -> None:
    """The moved-module aliases and the timm registration (idempotent)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
    register_timm_models_on_import()
