"""The HTTP layer of ``cnclip serve``: a FastAPI app around a :class:`~.service.Service`.

Routes (JSON unless said otherwise; every route but ``/api/health`` and the page's static files needs the
``X-API-Key`` header when the server has a key):

=======  ========================  =====================================================================
GET      ``/``                     the web page (``static/``; no build step, nothing from a CDN)
GET      ``/api/health``           liveness, model, index size, batching counters
GET      ``/api/info``             model, index, detector, limits (what the page shows)
POST     ``/api/search``           ``{"text": "红色的圆形", "k": 12}`` → ranked ids, scores, thumbnail URLs
POST     ``/api/search/image``     multipart ``image`` (+ ``k``) → ranked ids, scores, thumbnail URLs
POST     ``/api/classify``         multipart ``image``, ``labels`` ("猫，狗") (+ ``top_k``) → probabilities
POST     ``/api/detect``           multipart ``image``, ``labels`` (+ ``threshold``, ``draw``) → boxes
GET      ``/api/thumbnail``        ``?id=ID&size=256`` → JPEG of an indexed image (index ids only)
GET      ``/openapi.json``         the OpenAPI schema
=======  ========================  =====================================================================

Errors are ``{"detail": "message"}`` with a 4xx status (validation errors also list ``errors``); an
unexpected failure is a 500 with ``{"detail": "internal server error"}``, its traceback only in the log.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import cnclip_vision.errors
from cnclip_vision.serve.service import ServeConfig, ServeError, Service, picture_data_url

logger = logging.getLogger(__name__)

__all__ = ["API_KEY_HEADER", "create_app"]

API_KEY_HEADER = "X-API-Key"
STATIC_DIR = Path(__file__).parent / "static"
_FORM_OVERHEAD = 64 * 1024  # multipart headers and small fields around the uploaded file
_DRAIN_FACTOR = 4  # read (and drop) bodies up to this many times the limit, so the client sees the 413
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
        b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    ),
]


_KEY_HEADER = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="needed when the server has a key")


# --------------------------------------------------------------------------------------- API models
class SearchRequest(BaseModel):
    """A text query."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., description="the query, e.g. 红色的圆形", examples=["红色的圆形"])
    k: int = Field(12, ge=1, description="how many results")


class Hit(BaseModel):
    rank: int = Field(..., description="1 = best")
    id: str = Field(..., description="the index id (the image path relative to the indexed folder)")
    score: float = Field(..., description="cosine similarity")
    thumbnail: str | None = Field(None, description="URL of a JPEG thumbnail (null for text indexes)")


class SearchResponse(BaseModel):
    query: str | None = Field(None, description="the text query (null for an image query)")
    k: int
    results: list[Hit]
    took_ms: float


class LabelProb(BaseModel):
    label: str
    prob: float = Field(..., description="softmax over the given labels")
    score: float = Field(..., description="cosine similarity of the image and the label's text embedding")


class ClassifyResponse(BaseModel):
    labels: list[str]
    results: list[LabelProb] = Field(..., description="best first")
    took_ms: float


class Detection(BaseModel):
    box: list[float] = Field(
        ..., description="[x1, y1, x2, y2] in pixels of the uploaded image", min_length=4, max_length=4
    )
    label: str
    score: float


class DetectResponse(BaseModel):
    width: int
    height: int
    labels: list[str]
    threshold: float
    detections: list[Detection] = Field(..., description="best first")
    picture: str | None = Field(None, description="with draw=true: the picture with boxes, as a data: URL (PNG)")
    took_ms: float


class Health(BaseModel):
    status: str
    model: str
    index_size: int
    detector: str | None
    uptime_s: float
    batching: dict[str, dict[str, Any]]


class ErrorResponse(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (401, "missing or wrong API key"),
        (413, "upload or image too large"),
        (415, "not an image"),
        (422, "invalid request"),
        (503, "overloaded or no detector"),
    )
}


# --------------------------------------------------------------------------------------- middleware
class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with a JSON 413, before the app parses them. Bodies up to
    ``_DRAIN_FACTOR`` times the limit are read and dropped first, so that a client that sends its whole
    request before reading sees the 413 instead of a reset connection."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _drain(self, receive: Receive, already: int) -> None:
        total = already
        while total <= self.limit * _DRAIN_FACTOR:
            message = await receive()
            if message["type"] != "http.request":
                return
            total += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None and length > self.limit:
            if length <= self.limit * _DRAIN_FACTOR:
                await self._drain(receive, 0)
            await _json(413, f"the request body is {length} bytes, over the limit of {self.limit}")(
                scope, receive, send
            )
            return
        received = 0
        exceeded = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    if message.get("more_body", False):
                        await self._drain(receive, received)
                    raise _BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


class CatchAllMiddleware:
    """Any unexpected exception becomes a JSON 500 with no detail (the traceback goes to the log only). The
    exception is not re-raised: uvicorn would then close the connection under the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:  # noqa: BLE001 - logged with its traceback; the client gets a plain 500
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                await _json(500, "internal server error")(scope, receive, send)


class SecurityHeadersMiddleware:
    """``nosniff``, no referrer, no framing and a same-origin Content-Security-Policy on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _json(status: int, detail: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "ApiKey"} if status == 401 else {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A one-line message and a compact list (without the offending input, which may be huge)."""
    compact = []
    for e in errors:
        loc = [str(part) for part in e.get("loc", ()) if part not in ("body", "query")]
        compact.append({"field": ".".join(loc) or "body", "message": str(e.get("msg", "invalid"))})
    message = "; ".join(f"{c['field']}: {c['message']}" for c in compact[:5])
    return f"invalid request: {message}" if message else "invalid request", compact


# -------------------------------------------------------------------------------------------- app
def create_app(service: Service, *, manage_service: bool = True) -> FastAPI:
    """The ASGI app serving ``service``. With ``manage_service`` the app starts and stops the service's
    worker thread and batchers in its lifespan (the service's model stays loaded either way)."""
    config: ServeConfig = service.config

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_service:
            await service.start()
        try:
            yield
        finally:
            if manage_service:
                await service.stop()

    app = FastAPI(
        title="cnclip-vision service",
        description="Text and image search, zero-shot classification and open-vocabulary detection with Chinese "
        "labels, on Chinese-CLIP.",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # the Swagger and ReDoc pages load their scripts from a CDN
        redoc_url=None,
        openapi_url=None,  # served below, behind the API key
    )
    app.state.service = service

    async def require_key(key: Annotated[str | None, Depends(_KEY_HEADER)]) -> None:
        if config.api_key is None:
            return
        if key is None or not hmac.compare_digest(key.encode("utf-8"), config.api_key.encode("utf-8")):
            raise ServeError(f"missing or wrong API key: send it in the {API_KEY_HEADER} header", 401)

    protected = [Depends(require_key)]

    # ----------------------------------------------------------------------------- error handling
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _json(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, errors = _validation_message(list(exc.errors()))
        return _json(422, message, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such route: {request.url.path}"
        return _json(exc.status_code, detail)

    @app.exception_handler(cnclip_vision.errors.CNClipError)
    async def _library_error(request: Request, exc: cnclip_vision.errors.CNClipError) -> JSONResponse:
        return _json(422, _one_line(exc))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:  # the library's input checks
        return _json(422, _one_line(exc))

    # ---------------------------------------------------------------------------------- the page
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    # ----------------------------------------------------------------------------------- the API
    @app.get("/api/health", response_model=Health, tags=["service"], summary="liveness (no API key needed)")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": config.model,
            "index_size": len(service.index),
            "detector": config.detector,
            "uptime_s": round(time.time() - service.started_at, 1),
            "batching": service.stats(),
        }

    @app.get("/openapi.json", include_in_schema=False, dependencies=protected)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(
        "/api/info",
        tags=["service"],
        dependencies=protected,
        responses=_ERRORS,
        summary="model, index, detector and limits",
    )
    async def info() -> dict[str, Any]:
        return {**service.info(), "auth": config.api_key is not None}

    @app.post(
        "/api/search",
        response_model=SearchResponse,
        tags=["search"],
        dependencies=protected,
        responses=_ERRORS,
        summary="text → image search (text → text on a text index)",
    )
    async def search(body: SearchRequest) -> dict[str, Any]:
        start = time.perf_counter()
        results = await service.search_text(body.text, body.k)
        return {"query": body.text.strip(), "k": body.k, "results": results, "took_ms": _ms(start)}

    @app.post(
        "/api/search/image",
        response_model=SearchResponse,
        tags=["search"],
        dependencies=protected,
        responses=_ERRORS,
        summary="image → image search (upload an image)",
    )
    async def search_image(
        image: Annotated[UploadFile, File(description="the query image (PNG, JPEG, WebP, ...)")],
        k: Annotated[int, Form(ge=1, description="how many results")] = 12,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        picture = await _decode(service, image)
        results = await service.search_image(picture, k)
        return {"query": None, "k": k, "results": results, "took_ms": _ms(start)}

    @app.post(
        "/api/classify",
        response_model=ClassifyResponse,
        tags=["classify"],
        dependencies=protected,
        responses=_ERRORS,
        summary="zero-shot classification of an image over Chinese labels",
    )
    async def classify(
        image: Annotated[UploadFile, File(description="the image")],
        labels: Annotated[str, Form(description="labels separated by ，or , e.g. 猫，狗，兔子")],
        top_k: Annotated[int | None, Form(ge=1, description="only the best top_k labels")] = None,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        names = service.labels(labels)
        picture = await _decode(service, image)
        results = await service.classify(picture, names, top_k)
        return {"labels": names, "results": results, "took_ms": _ms(start)}

    @app.post(
        "/api/detect",
        response_model=DetectResponse,
        tags=["detect"],
        dependencies=protected,
        responses=_ERRORS,
        summary="open-vocabulary detection with Chinese labels",
    )
    async def detect(
        image: Annotated[UploadFile, File(description="the image")],
        labels: Annotated[str, Form(description="labels separated by ，or , e.g. 红色圆形，蓝色三角形")],
        threshold: Annotated[float, Form(ge=0, le=1, description="lowest score returned")] = 0.3,
        draw: Annotated[bool, Form(description="also return the picture with the boxes drawn")] = False,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        names = service.labels(labels)
        picture = await _decode(service, image)
        detections = await service.detect(picture, names, threshold)
        drawn = await run_in_threadpool(picture_data_url, picture, detections) if draw else None
        return {
            "width": picture.width,
            "height": picture.height,
            "labels": names,
            "threshold": threshold,
            "detections": detections,
            "picture": drawn,
            "took_ms": _ms(start),
        }

    @app.get(
        "/api/thumbnail",
        tags=["search"],
        dependencies=protected,
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}, "description": "JPEG"},
            **_ERRORS,
            404: {"model": ErrorResponse, "description": "not an image of the index"},
        },
        summary="thumbnail of an indexed image",
    )
    async def thumbnail(
        request: Request,
        id: Annotated[str, Query(min_length=1, max_length=4096, description="an id from the search results")],
        size: Annotated[int, Query(ge=16, le=1024, description="longest side in pixels")] = 256,
    ) -> Response:
        thumb = await run_in_threadpool(service.thumbnail, id, size)
        headers = {"ETag": thumb.etag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == thumb.etag:
            return Response(status_code=304, headers=headers)
        return Response(thumb.data, media_type=thumb.media_type, headers=headers)

    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=config.max_upload_bytes + _FORM_OVERHEAD)
    app.add_middleware(SecurityHeadersMiddleware)  # the last added is the outermost
    return app


async def _decode(service: Service, upload: UploadFile) -> Any:
    data = await upload.read(service.config.max_upload_bytes + 1)
    return await run_in_threadpool(service.decode_upload, data, "the uploaded image")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cnclip-vision")
    except Exception:  # noqa: BLE001 - not installed (a source tree on sys.path)
        return "0+unknown"
