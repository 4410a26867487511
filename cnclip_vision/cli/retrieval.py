"""``cnclip embed``, ``cnclip search`` and ``cnclip eval-retrieval``."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from cnclip_vision.errors import CNClipError
from cnclip_vision.cli.common import add_model_options, add_output_options, load_model, write_records

logger = logging.getLogger("cnclip_vision.cli")

_SCALARS = (int, float, str, bool, type(None))


def _embed(args: argparse.Namespace) -> int:
    from cnclip_vision.retrieval import extract_image_embeddings, extract_text_embeddings

    if (args.images is None) == (args.texts is None):
        raise ValueError("give either an image folder / list file or --texts FILE.jsonl (exactly one)")
    if args.images is not None and not Path(args.images).exists():
        raise CNClipError(f"no such image folder or list file: {args.images}")
    model = load_model(args)
    common = dict(batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype, resume=args.resume,
                  progress=not args.quiet)  # fmt: skip
    if args.texts is not None:
        summary = extract_text_embeddings(model, args.texts, args.out, **common)
    else:
        summary = extract_image_embeddings(model, args.images, args.out, num_workers=args.workers, **common)
    summary["model"] = summary["model"]["description"]
    write_records(args, [{k: v for k, v in summary.items() if isinstance(v, _SCALARS)}], document=summary)
    return 0


def _search(args: argparse.Namespace) -> int:
    from cnclip_vision.retrieval import EmbeddingIndex

    texts = list(args.queries)
    if args.queries_file:
        path = Path(args.queries_file)
        if not path.is_file():
            raise FileNotFoundError(f"--queries-file {path} does not exist")
        texts += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    images = list(args.image or [])
    if not texts and not images:
        raise ValueError("give query texts, --queries-file FILE, or --image QUERY_IMAGE")
    model = load_model(args)
    index = EmbeddingIndex.from_dir(args.index, use_faiss=args.faiss, device=model.device)
    results = []
    if texts:
        results += [("text", q, hits) for q, hits in zip(texts, index.search_text(model, texts, args.top_k))]
    if images:
        results += [("image", q, hits) for q, hits in zip(images, index.search_image(model, images, args.top_k))]
    document = []
    for kind, query, hits in results:
        found = [{"rank": h.rank + 1, "id": h.id, "score": round(h.score, 6)} for h in hits]
        document.append({"query": query, "query_type": kind, "results": found})
    rows = [{"query": d["query"], "query_type": d["query_type"], **hit} for d in document for hit in d["results"]]
    write_records(args, rows, document=document)
    return 0


def _eval_retrieval(args: argparse.Namespace) -> int:
    from cnclip_vision.models.encode import encode_texts
    from cnclip_vision.retrieval import evaluate_retrieval, extract_image_embeddings, load_embeddings
    from cnclip_vision.data.jsonl import read_text_jsonl

    if (args.images is None) == (args.image_embeddings is None):
        raise ValueError("give either --images DIR_OR_LIST or --image-embeddings DIR (exactly one)")
    records = read_text_jsonl(args.texts, require_image_ids=True)
    if args.images is not None and not Path(args.images).exists():
        raise CNClipError(f"no such image folder or list file: {args.images}")
    need_model = args.images is not None or args.text_embeddings is None
    model = load_model(args) if need_model else None

    if args.image_embeddings is not None:
        image_ids, image_emb = load_embeddings(args.image_embeddings)
    else:
        with tempfile.TemporaryDirectory(prefix="cnclip-eval-") as tmp:
            out = args.save_embeddings or tmp
            extract_image_embeddings(model, args.images, out, batch_size=args.batch_size, num_workers=args.workers,
                                     progress=not args.quiet)  # fmt: skip
            image_ids, image_emb = load_embeddings(out)
    if args.text_embeddings is not None:
        text_ids, text_emb = load_embeddings(args.text_embeddings)
    else:
        text_ids = [r.text_id for r in records]
        texts = [r.text for r in records]
        text_emb = encode_texts(model, texts, batch_size=max(args.batch_size, 64), progress=not args.quiet)
    ground_truth = {r.text_id: r.image_ids for r in records}
    metrics = evaluate_retrieval(text_emb, text_ids, image_emb, image_ids, ground_truth)
    report: dict[str, Any] = {"texts": str(args.texts), "images": str(args.images or args.image_embeddings),
                              **({"model": args.model} if model is not None else {}),
                              **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}  # fmt: skip
    logger.info("t2i R@1/5/10 %.2f/%.2f/%.2f  i2t R@1/5/10 %.2f/%.2f/%.2f  mean recall %.2f",
                *(report[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)), report["mean_recall"])  # fmt: skip
    write_records(args, [report], document=report)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="extract image or text embeddings of a large collection to a folder of shards",
        description="Encode every image of a folder (searched recursively) or a .txt list file, or every text of "
        'a JSONL file ({"text_id", "text", "image_ids"} per line, the Chinese-CLIP/MUGE format), into --out: '
        "safetensors shards of L2-normalised embeddings, ids.txt and manifest.json. Image ids are paths relative "
        "to the folder (or as written in the list file). Unreadable images are reported on stderr, skipped and "
        "listed in the summary. An interrupted run resumes where it stopped when rerun with the same arguments. "
        "Prints a JSON summary (counts, failures).",
    )
    p.add_argument("images", nargs="?", help="image folder or .txt list file (omit with --texts)")
    p.add_argument("--texts", metavar="FILE.jsonl", help="embed the texts of this JSONL file instead of images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused when resuming)")
    p.add_argument("--shard-size", type=int, default=10_000,
                   help="inputs per shard file; an interruption loses at most the shards in progress "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage type of the embeddings; float16 halves the size (default: %(default)s)")  # fmt: skip
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the finished shards of an earlier run with the same inputs and model "
                        "(--no-resume redoes everything; default: resume)")  # fmt: skip
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser(
        "search",
        help="top-k search of an embeddings folder with text or image queries",
        description="Exact cosine top-k search of the embeddings written by `cnclip embed`: query texts against "
        "image embeddings (text→image), query images against image embeddings (image→image) or against text "
        "embeddings (image→text), texts against texts. Use the model the index was built with. Prints, per query, "
        "the k best ids with their cosine scores (JSON), or one row per hit (CSV / JSONL).",
    )
    p.add_argument("queries", nargs="*", help="query texts, e.g. 一只橘猫")
    p.add_argument("--queries-file", metavar="FILE", help="more query texts, one per line")
    p.add_argument("--image", action="append", metavar="QUERY_IMAGE", help="query image file (repeatable)")
    p.add_argument("--index", required=True, metavar="DIR", help="embeddings folder written by `cnclip embed`")
    p.add_argument("-k", "--top-k", type=int, default=10, help="results per query (default: %(default)s)")
    p.add_argument("--faiss", action="store_true", help="search with faiss.IndexFlatIP (needs faiss-cpu; same results)")
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=_search)

    p = sub.add_parser(
        "eval-retrieval",
        help="text↔image recall@1/5/10 and mean recall on an annotated image-text set (MUGE, Flickr30K-CN, ...)",
        description="Evaluate retrieval as the original Chinese-CLIP evaluation does: text→image R@k is the share "
        "of texts with at least one of their images among the k best of all images; image→text R@k the share of "
        "annotated images with at least one of their texts among the k best of all texts; mean recall the mean of "
        "the six (percent). --texts is the annotation (JSONL with text_id, text, image_ids); image ids match the "
        "file paths relative to the folder, with or without extension (123 finds 123.jpg). Prints a JSON report.",
    )
    p.add_argument("--texts", required=True, metavar="FILE.jsonl", help="texts with their ground-truth image_ids")
    src = p.add_argument_group("images (exactly one)")
    src.add_argument("--images", metavar="DIR_OR_LIST", help="image folder or .txt list file, encoded now")
    src.add_argument("--image-embeddings", metavar="DIR", help="image embeddings written earlier by `cnclip embed`")
    p.add_argument("--text-embeddings", metavar="DIR",
                   help="text embeddings written by `cnclip embed --texts` (default: encode the texts now)")  # fmt: skip
    p.add_argument("--save-embeddings", metavar="DIR",
                   help="with --images: keep the image embeddings in DIR (resumable) instead of a temporary folder")  # fmt: skip
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=_eval_retrieval)
