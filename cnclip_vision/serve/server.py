"""Running the app on uvicorn: in the foreground (``cnclip serve``) or in a background thread."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import cnclip_vision.errors

logger = logging.getLogger(__name__)

__all__ = ["BackgroundServer", "check_bind", "is_loopback", "run"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    """Refuse to listen on anything but loopback unless ``allow_remote`` says so explicitly."""
    if not is_loopback(host) and not allow_remote:
        raise cnclip_vision.errors.CNClipError(
            f"--host {host} would accept connections from other machines; pass --allow-remote to do that on purpose "
            "(and protect the service with an API key: CNCLIP_API_KEY or --api-key-file)"
        )


def run(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    allow_remote: bool = False,
    access_log: bool = True,
    log_level: str = "info",
) -> None:
    """Serve ``app`` on uvicorn until interrupted (Ctrl+C / SIGTERM). Logs go through :mod:`logging`."""
    import uvicorn

    check_bind(host, allow_remote)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        log_level=log_level,
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


class BackgroundServer:
    """Run an ASGI app on uvicorn in a daemon thread, listening on ``host`` (loopback by default) and a free
    port, for tests, notebooks and benchmarks::

        with BackgroundServer(create_app(service)) as server:
            httpx.get(server.url + "/api/health")
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_remote: bool = False,
        log_level: str = "warning",
        startup_timeout: float = 120.0,
    ) -> None:
        check_bind(host, allow_remote)
        self.app, self.host, self.port = app, host, port
        self.log_level, self.startup_timeout = log_level, startup_timeout
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> BackgroundServer:
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_config=None,
            log_level=self.log_level,
            access_log=False,
            server_header=False,
            lifespan="on",
        )
        self._server = uvicorn.Server(config)

        def target() -> None:
            try:
                self._server.run(sockets=[sock])
            except BaseException as e:  # noqa: BLE001 - re-raised in start() / stop()
                self._error = e
            finally:
                sock.close()

        self._thread = threading.Thread(target=target, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server on {self.url} did not start within {self.startup_timeout} s")
            time.sleep(0.02)
        logger.info("serving on %s", self.url)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the server on %s did not stop within %s s", self.url, timeout)
        self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
