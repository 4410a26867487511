"""``cnclip serve``: search, zero-shot classification and detection as an HTTP service with a web page.

Needs the ``serve`` extra (``pip install "cnclip-vision[serve]"``: FastAPI, uvicorn, python-multipart).

>>> from cnclip_vision.serve import BackgroundServer, ServeConfig, Service, create_app
>>> service = Service.load(ServeConfig(index="photo_emb", model="toy-tiny", detector="toy-detector"))
>>> with BackgroundServer(create_app(service)) as server:   # 127.0.0.1, a free port
...     print(server.url)

:mod:`.service` holds the model side (loading, validation, batching through :mod:`.batching`, thumbnails),
:mod:`.app` the routes, :mod:`.server` uvicorn; ``static/`` is the page.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BackgroundServer", "MicroBatcher", "ServeConfig", "ServeError", "Service", "create_app", "run"]

_WHERE = {
    "BackgroundServer": "server",
    "run": "server",
    "MicroBatcher": "batching",
    "ServeConfig": "service",
    "ServeError": "service",
    "Service": "service",
    "create_app": "app",
}


def require_serve_extra() -> None:
    """Raise an :class:`ImportError` that says how to install the web stack when it is missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f'cnclip serve needs {", ".join(missing)}: pip install "cnclip-vision[serve]"')


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    if _WHERE[name] in ("app", "server"):
        require_serve_extra()
    return getattr(importlib.import_module(f"cnclip_vision.serve.{_WHERE[name]}"), name)
