"""``cnclip serve``: the HTTP service and web page (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from cnclip_vision.cli.common import number, positive_int, read_lines, resolve_device

logger = logging.getLogger("cnclip_vision.cli")

API_KEY_ENV = "CNCLIP_API_KEY"


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        lines = read_lines(args.api_key_file, "--api-key-file")  # missing, a folder, not UTF-8, empty
        if len(lines) > 1:
            raise ValueError(f"--api-key-file {args.api_key_file} holds {len(lines)} lines; expected the key alone")
        return lines[0]
    return os.environ.get(API_KEY_ENV) or None


def _serve(args: argparse.Namespace) -> int:
    import cnclip_vision.errors
    from cnclip_vision.serve import require_serve_extra

    try:
        require_serve_extra()
    except ImportError as e:
        raise cnclip_vision.errors.CNClipError(str(e)) from None
    from cnclip_vision.serve.app import create_app
    from cnclip_vision.serve.server import check_bind, is_loopback, run
    from cnclip_vision.serve.service import ServeConfig, Service

    if not args.host.strip():
        raise ValueError("--host is empty; give an address, e.g. 127.0.0.1 (0.0.0.0 with --allow-remote for all)")
    check_bind(args.host, args.allow_remote)  # before loading anything
    api_key = _api_key(args)
    for option, path in (("--index", args.index), ("--detector", args.detector), ("--images", args.images)):
        if path is not None and path not in ("toy-detector",) and not Path(path).is_dir():
            raise FileNotFoundError(f"{option} {path} is not a folder")
    config = ServeConfig(
        index=args.index,
        model=args.model,
        detector=args.detector,
        images=args.images,
        device=resolve_device(args.device),
        api_key=api_key,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_labels=args.max_labels,
        max_k=args.max_k,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        templates=args.templates,
    )
    if not is_loopback(args.host) and api_key is None:
        logger.warning(
            "listening on %s without an API key: anyone who can reach this port can use the service "
            "(set %s or --api-key-file)",
            args.host,
            API_KEY_ENV,
        )
    service = Service.load(config)
    logger.info("API key %s", f"required ({'X-API-Key'} header)" if api_key else "not required")
    run(
        create_app(service),
        args.host,
        args.port,
        allow_remote=args.allow_remote,
        access_log=args.access_log and not args.quiet,
        log_level="warning" if args.quiet else "info",
    )
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP service and web page: text/image search, zero-shot classification, detection",
        description="Serve an embedding index (from `cnclip embed`) over HTTP: a JSON API with an OpenAPI schema "
        "(/openapi.json) and a web page in Chinese at /. The model is loaded once; concurrent queries are batched "
        "into one encoder call. Listens on 127.0.0.1 unless --allow-remote; set CNCLIP_API_KEY (or "
        "--api-key-file) to require an X-API-Key header on every route but /api/health. Needs the serve extra: "
        'pip install "cnclip-vision[serve]".',
    )
    p.add_argument("--index", required=True, help="embedding directory written by `cnclip embed`")
    p.add_argument(
        "--model",
        default="ViT-B-16",
        help="the model the index was built with: name, directory or .pt (default: %(default)s)",
    )
    p.add_argument(
        "--detector", default=None, help="detector directory or toy-detector; without it /api/detect answers 503"
    )
    p.add_argument(
        "--images",
        default=None,
        help="folder the index ids are relative to, for thumbnails (default: the folder recorded when "
        "the index was built)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    net.add_argument(
        "--port", type=number(int, 0, 65535), default=8000, help="port; 0 picks a free one (default: %(default)s)"
    )
    net.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than loopback (the service is then reachable from other machines)",
    )
    net.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="do not log every request (the access log goes to stderr)",
    )
    net.add_argument(
        "--api-key-file",
        default=None,
        help=f"file holding the API key (default: the {API_KEY_ENV} environment variable; none: no key)",
    )
    lim = p.add_argument_group("limits and batching")
    lim.add_argument(
        "--max-upload-mb",
        type=_positive_float,
        default=20.0,
        help="largest accepted upload in MB (default: %(default)s)",
    )
    lim.add_argument("--max-labels", type=positive_int, default=256, help="labels per request (default: %(default)s)")
    lim.add_argument("--max-k", type=positive_int, default=100, help="results per search (default: %(default)s)")
    lim.add_argument(
        "--max-batch",
        type=positive_int,
        default=32,
        help="queries batched into one encoder call (default: %(default)s)",
    )
    lim.add_argument(
        "--batch-wait-ms",
        type=number(float, 0.0, 60_000.0),
        default=2.0,
        help="how long a batch waits for more queries once the model is free (default: %(default)s)",
    )
    lim.add_argument(
        "--templates",
        choices=("default", "single", "none"),
        default="default",
        help="prompt templates for /api/classify labels (default: %(default)s)",
    )
    p.set_defaults(func=_serve)
