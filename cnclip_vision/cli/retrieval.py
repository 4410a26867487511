"""``cnclip embed``, ``cnclip search`` and ``cnclip eval-retrieval``."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from cnclip_vision.cli.common import (
    add_model_options,
    add_output_options,
    load_model,
    number,
    out_folder,
    positive_int,
    read_lines,
    seed,
    write_records,
)
from cnclip_vision.errors import CNClipError

logger = logging.getLogger("cnclip_vision.cli")

_SCALARS = (int, float, str, bool, type(None))


def _embed(args: argparse.Namespace) -> int:
    from cnclip_vision.retrieval.dist import local_device, world_from_env

    if (args.images is None) == (args.texts is None):
        raise ValueError("give either an image folder / list file or --texts FILE.jsonl (exactly one)")
    if args.images is not None and not Path(args.images).exists():
        raise CNClipError(f"no such image folder or list file: {args.images}")
    _check_inputs(args)  # before the model loads
    common = dict(
        batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype, resume=args.resume, verify=args.verify
    )
    if args.engine == "ray":
        summary = _embed_ray(args, common)
    else:
        rank, world, _ = world_from_env()
        if world > 1:  # torchrun / srun: each rank on its own device, only rank 0 prints the summary
            args.device = local_device(args.device)
        model = load_model(args)
        common.update(progress=not args.quiet, timeout_s=args.dist_timeout)
        if args.texts is not None:
            from cnclip_vision.retrieval import extract_text_embeddings

            summary = extract_text_embeddings(model, args.texts, args.out, **common)
        else:
            from cnclip_vision.retrieval import extract_image_embeddings

            summary = extract_image_embeddings(model, args.images, args.out, num_workers=args.workers, **common)
        if rank != 0:
            return 0
    summary["model"] = summary["model"]["description"]
    write_records(args, [{k: v for k, v in summary.items() if isinstance(v, _SCALARS)}], document=summary)
    return 0


def _check_inputs(args: argparse.Namespace) -> None:
    """``embed``'s inputs, read or looked at before any model is loaded: the texts file parses; an image folder
    holds at least one file (the full listing is the extraction's)."""
    if args.texts is not None:
        from cnclip_vision.data.jsonl import read_text_jsonl

        read_text_jsonl(args.texts)
    elif Path(args.images).is_dir():
        from cnclip_vision.data.images import walk_files

        if next(walk_files(args.images), None) is None:
            raise CNClipError(f"no images found in {args.images} (the folder is empty)")


def _embed_ray(args: argparse.Namespace, common: dict[str, Any]) -> dict[str, Any]:
    from cnclip_vision.retrieval import extract_image_embeddings_ray, extract_text_embeddings_ray

    precision = args.precision
    if precision == "auto":  # one concrete precision for every actor, so that their fingerprints agree
        from cnclip_vision.device import auto_precision

        gpu = bool(args.ray_gpus_per_actor) or str(args.device or "").startswith("cuda")
        precision = auto_precision("cuda") if gpu and _cuda_here() else "bf16" if gpu else auto_precision("cpu")
    options = {"arch": args.arch, "precision": precision}
    if args.device:
        options["device"] = args.device
    ray = dict(
        model_options=options,
        num_actors=args.ray_actors,
        num_gpus_per_actor=args.ray_gpus_per_actor,
        ray_address=args.ray_address,
        **common,
    )
    if args.texts is not None:
        return extract_text_embeddings_ray(args.model, args.texts, args.out, **ray)
    return extract_image_embeddings_ray(args.model, args.images, args.out, num_workers=args.workers or 0, **ray)


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def _store_model(path: str, option: str, modality: str) -> dict[str, Any]:
    """The ``model`` record of the embeddings directory ``path`` given as ``option``, which must hold
    ``modality`` embeddings (checked before any model is loaded)."""
    from cnclip_vision.retrieval import read_manifest

    manifest = read_manifest(path)
    if manifest.get("modality") not in (None, modality):
        raise ValueError(f"{option} {path} holds {manifest.get('modality')} embeddings; expected {modality} embeddings")
    return dict(manifest.get("model", {}))


def _model_of_index(args: argparse.Namespace) -> Any:
    """The model for searching ``--index``: ``--model``, or the one its manifest records; either way it must be
    the model (weights and precision) the embeddings were written with."""
    from cnclip_vision.retrieval import read_manifest
    from cnclip_vision.retrieval.extract import model_info

    built_with = read_manifest(args.index).get("model", {})
    if args.model is None:
        if not built_with.get("source"):
            raise ValueError(
                f"--index {args.index} does not record which model wrote it ({built_with.get('description')}); "
                "give --model"
            )
        args.model = built_with["source"]
        logger.info("--index %s was written with %s: using it", args.index, args.model)
    from cnclip_vision.models.identity import recorded_precision

    recorded = recorded_precision(built_with)
    if args.precision == "auto" and recorded:  # the index's precision, not this machine's choice
        args.precision = recorded
        logger.info("--index %s was written in %s: searching in it", args.index, recorded)
    model = load_model(args)
    fingerprint = built_with.get("fingerprint")
    if fingerprint not in (None, "external") and model_info(model)["fingerprint"] != fingerprint:
        raise ValueError(
            f"--model {args.model} ({args.precision}) is not the model --index {args.index} was written with "
            f"({built_with.get('source') or built_with.get('description')}, {built_with.get('dtype')}): "
            "its scores would mean nothing; pass that --model and --precision"
        )
    return model


def _memory(text: str) -> str:
    """argparse type of ``index build --memory``: a size such as 4GB or 512MB."""
    from cnclip_vision.retrieval.ann import parse_memory

    try:
        parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _ann_params(text: str) -> str:
    """argparse type of ``--ann-params``: ``NAME=INTEGER[,NAME=INTEGER]`` with known names."""
    from cnclip_vision.retrieval.ann import parse_search_params

    try:
        parse_search_params(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _check_ann_params(args: argparse.Namespace) -> None:
    """``--ann-params`` fit the folder's FAISS index (checked before the model is loaded)."""
    from cnclip_vision.retrieval.ann import parse_search_params, read_ann_info

    if args.exact:
        raise ValueError("--ann-params set the FAISS index's search parameters; --exact does not use the index")
    info = read_ann_info(args.index)
    if info is None:
        raise ValueError(
            f"--ann-params: --index {args.index} has no FAISS index (it is searched exactly); "
            f"build one with `cnclip index build {args.index}`"
        )
    try:
        parse_search_params(args.ann_params, info["index_key"])
    except ValueError as e:
        raise ValueError(f"--ann-params: {e}") from None


def _search(args: argparse.Namespace) -> int:
    from cnclip_vision.retrieval import EmbeddingIndex

    texts = list(args.queries)
    if args.queries_file:
        texts += read_lines(args.queries_file, "--queries-file")
    if any(not t.strip() for t in texts):
        raise ValueError("a query text is empty; give the words to search for")
    images = list(args.image or [])
    for image in images:
        if not Path(image).is_file():
            raise FileNotFoundError(f"--image {image} is not an image file")
    if not texts and not images:
        raise ValueError("give query texts, --queries-file FILE, or --image QUERY_IMAGE")
    if args.ann_params:
        _check_ann_params(args)
    model = _model_of_index(args)
    index = EmbeddingIndex.from_dir(
        args.index,
        ann=False if args.exact else None,
        ann_params=args.ann_params,
        use_faiss=args.faiss,
        device=model.device,
    )
    logger.info("%s: %d embeddings, %s search", args.index, len(index), index.backend)
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
    from cnclip_vision.data.jsonl import read_text_jsonl
    from cnclip_vision.models.encode import encode_texts
    from cnclip_vision.retrieval import evaluate_retrieval, extract_image_embeddings, load_embeddings

    if (args.images is None) == (args.image_embeddings is None):
        raise ValueError("give either --images DIR_OR_LIST or --image-embeddings DIR (exactly one)")
    if args.save_embeddings is not None and args.image_embeddings is not None:
        raise ValueError(
            "--save-embeddings keeps the image embeddings computed from --images; not with --image-embeddings"
        )
    records = read_text_jsonl(args.texts, require_image_ids=True)
    if args.images is not None and not Path(args.images).exists():
        raise CNClipError(f"no such image folder or list file: {args.images}")
    stores = {
        option: _store_model(path, option, modality)
        for option, path, modality in (
            ("--image-embeddings", args.image_embeddings, "image"),
            ("--text-embeddings", args.text_embeddings, "text"),
        )
        if path is not None
    }
    fingerprints = {m.get("fingerprint") for m in stores.values()} - {None, "external"}
    if len(fingerprints) > 1:
        raise ValueError("--image-embeddings and --text-embeddings were written by different models or precisions")
    need_model = args.images is not None or args.text_embeddings is None
    if need_model and stores and args.precision == "auto":  # the stores' precision, not this machine's choice
        from cnclip_vision.models.identity import recorded_precision

        args.precision = recorded_precision(next(iter(stores.values()))) or args.precision
    model = load_model(args) if need_model else None
    if model is not None and fingerprints:
        from cnclip_vision.models.identity import model_info, recorded_precision

        if model_info(model)["fingerprint"] not in fingerprints:
            option = next(iter(stores))
            written = stores[option]
            raise ValueError(
                f"--model {args.model} ({args.precision}) is not the model {option} was written with "
                f"({written.get('source') or written.get('description')}, "
                f"{recorded_precision(written)}): the scores would mean nothing; pass that "
                "--model and --precision"
            )

    if args.image_embeddings is not None:
        image_ids, image_emb = load_embeddings(args.image_embeddings)
    else:
        with tempfile.TemporaryDirectory(prefix="cnclip-eval-") as tmp:
            out = args.save_embeddings or tmp
            extract_image_embeddings(
                model, args.images, out, batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet
            )
            image_ids, image_emb = load_embeddings(out)
    if args.text_embeddings is not None:
        text_ids, text_emb = load_embeddings(args.text_embeddings)
    else:
        text_ids = [r.text_id for r in records]
        texts = [r.text for r in records]
        if model is None:  # need_model holds whenever the texts are encoded here
            raise RuntimeError("no model was loaded to encode the texts")
        text_emb = encode_texts(model, texts, batch_size=max(args.batch_size, 64), progress=not args.quiet)
    ground_truth = {r.text_id: r.image_ids for r in records}
    metrics = evaluate_retrieval(text_emb, text_ids, image_emb, image_ids, ground_truth)
    report: dict[str, Any] = {
        "texts": str(args.texts),
        "images": str(args.images or args.image_embeddings),
        **({"model": args.model} if model is not None else {}),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
    }
    logger.info(
        "t2i R@1/5/10 %.2f/%.2f/%.2f  i2t R@1/5/10 %.2f/%.2f/%.2f  mean recall %.2f",
        *(report[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)),
        report["mean_recall"],
    )
    write_records(args, [report], document=report)
    return 0


def _index_build(args: argparse.Namespace) -> int:
    from cnclip_vision.retrieval.ann import build_ann_index

    info = build_ann_index(
        args.embeddings,
        memory=args.memory,
        target_recall=args.recall,
        k=args.k,
        index_key=args.index_key,
        queries=args.queries,
        num_queries=args.num_queries,
        train_size=args.train_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    row = {k: v for k, v in info.items() if isinstance(v, _SCALARS)}
    row.update({f"test_{k}": v for k, v in info["measured"].items()})
    write_records(args, [row], document=info)
    return 0


def _index_info(args: argparse.Namespace) -> int:
    from cnclip_vision.retrieval import store
    from cnclip_vision.retrieval.ann import read_ann_info

    manifest = store.read_manifest(args.embeddings)  # "no such embeddings directory" first
    info = read_ann_info(args.embeddings)
    if info is None:
        raise CNClipError(
            f"{args.embeddings} has no FAISS index; build one with `cnclip index build {args.embeddings}`"
        )
    info["current"] = info.get("embeddings_digest") == store.embeddings_digest(manifest)
    row = {k: v for k, v in info.items() if isinstance(v, _SCALARS)}
    write_records(args, [row], document=info)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="extract image or text embeddings of a large collection to a folder of shards",
        description="Encode every image of a folder (searched recursively) or a .txt list file, or every text of "
        'a JSONL file ({"text_id", "text", "image_ids"} per line, the Chinese-CLIP/MUGE format), into --out: '
        "safetensors shards of L2-normalised embeddings, ids.txt and manifest.json. Image ids are paths relative "
        "to the folder (or as written in the list file). Unreadable images are reported on stderr, skipped and "
        "listed in the summary. An interrupted run resumes where it stopped when rerun with the same arguments; "
        "items are placed in shards by a hash of their id, so a rerun after adding or removing images rewrites only "
        "the shards that hold them and encodes only the new images. Several processes: `torchrun --nproc_per_node G "
        "[--nnodes N ...] -m cnclip_vision.cli embed ...` or `srun ... cnclip embed ...` (each rank on GPU "
        "LOCAL_RANK; the manifest is written once, after every rank has finished), or --engine ray. "
        "Prints a JSON summary (counts, failures).",
    )
    p.add_argument("images", nargs="?", help="image folder or .txt list file (omit with --texts)")
    p.add_argument("--texts", metavar="FILE.jsonl", help="embed the texts of this JSONL file instead of images")
    p.add_argument(
        "--out", type=out_folder, required=True, metavar="DIR", help="output folder (created; reused when resuming)"
    )
    p.add_argument(
        "--shard-size",
        type=number(int, 1),
        default=10_000,
        help="inputs per shard file; an interruption loses at most the shards in progress (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="storage type of the embeddings; float16 halves the size (default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the finished shards of an earlier run with the same inputs and model "
        "(--no-resume redoes everything; default: resume)",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="when resuming, check the finished shards' bytes against their checksums and redo damaged "
        "ones (--no-verify checks only headers and sizes; default: verify)",
    )
    p.add_argument(
        "--engine",
        choices=("torchrun", "ray"),
        default="torchrun",
        help="torchrun: this process, or one rank of `torchrun`/`srun` (detected from the environment); "
        "ray: a pool of Ray Data actors (pip install 'ray[data]') (default: %(default)s)",
    )
    p.add_argument(
        "--dist-timeout",
        type=number(float, 1.0),
        default=24 * 3600,
        metavar="SECONDS",
        help="under torchrun/srun: how long a rank waits for the others (default: %(default)s)",
    )
    p.add_argument("--ray-address", default=None, help="--engine ray: the cluster to join (default: start a local one)")
    p.add_argument(
        "--ray-actors",
        type=number(int, 1),
        default=1,
        help="--engine ray: actors, each with its own model (default: 1)",
    )
    p.add_argument(
        "--ray-gpus-per-actor",
        type=number(float, 0.0, 64.0),
        default=0.0,
        help="--engine ray: GPUs per actor; > 0 loads the model on cuda (default: 0)",
    )
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser(
        "search",
        help="top-k search of an embeddings folder with text or image queries",
        description="Cosine top-k search of the embeddings written by `cnclip embed` (through the folder's FAISS "
        "index when `cnclip index build` made one, memory-mapped where FAISS allows; exact otherwise): query texts "
        "against image embeddings (text→image), query images against image embeddings (image→image) or against text "
        "embeddings (image→text), texts against texts. Use the model the index was built with. Prints, per query, "
        "the k best ids with their cosine scores (JSON), or one row per hit (CSV / JSONL).",
    )
    p.add_argument("queries", nargs="*", help="query texts, e.g. 一只橘猫")
    p.add_argument("--queries-file", metavar="FILE", help="more query texts, one per line")
    p.add_argument("--image", action="append", metavar="QUERY_IMAGE", help="query image file (repeatable)")
    p.add_argument("--index", required=True, metavar="DIR", help="embeddings folder written by `cnclip embed`")
    p.add_argument("-k", "--top-k", type=positive_int, default=10, help="results per query (default: %(default)s)")
    p.add_argument(
        "--faiss",
        action="store_true",
        help="exact search with faiss.IndexFlatIP instead of torch (needs faiss-cpu; same results)",
    )
    p.add_argument(
        "--exact", action="store_true", help="ignore the folder's FAISS index (`cnclip index build`) and search exactly"
    )
    p.add_argument(
        "--ann-params",
        type=_ann_params,
        default=None,
        metavar="PARAMS",
        help="override the FAISS index's tuned search parameters: comma-separated NAME=INTEGER, efSearch (HNSW), "
        "nprobe (IVF) or quantizer_efSearch (IVF with an HNSW quantizer), e.g. efSearch=256 or nprobe=64",
    )
    add_model_options(p, model_default=None)
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
    p.add_argument(
        "--text-embeddings",
        metavar="DIR",
        help="text embeddings written by `cnclip embed --texts` (default: encode the texts now)",
    )
    p.add_argument(
        "--save-embeddings",
        type=out_folder,
        metavar="DIR",
        help="with --images: keep the image embeddings in DIR (resumable) instead of a temporary folder",
    )
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=_eval_retrieval)

    p = sub.add_parser(
        "index",
        help="approximate nearest-neighbour (FAISS) index of an embeddings folder",
        description="`cnclip index build EMB_DIR` chooses a FAISS index from the number of vectors and a memory budget "
        "as autofaiss does (Flat below 1,000 vectors, HNSW while it fits, IVF-Flat, then OPQ+IVF+PQ), trains it on a "
        "sample, adds the shards one by one, tunes nprobe / efSearch to the target recall@k against exact search on "
        "held-out queries, measures recall, latency and size on other held-out queries, and writes the index and "
        "ann.json (its parameters and figures) beside the embeddings. `cnclip search` and EmbeddingIndex.from_dir "
        "use it from then on. `cnclip index info EMB_DIR` prints ann.json.",
    )
    actions = p.add_subparsers(dest="index_command", required=True, metavar="ACTION", help="build or info")
    b = actions.add_parser("build", help="build, tune and write the index", description=p.description)
    b.add_argument("embeddings", metavar="EMB_DIR", help="embeddings folder written by `cnclip embed`")
    b.add_argument(
        "--memory",
        type=_memory,
        default="4GB",
        help="memory budget of the index, e.g. 1GB, 512MB (default: %(default)s)",
    )
    b.add_argument(
        "--recall",
        type=number(float, 0.01, 1.0),
        default=0.95,
        help="target recall@k against exact search to tune for (default: %(default)s)",
    )
    b.add_argument("-k", type=positive_int, default=10, help="the k of recall@k (default: %(default)s)")
    b.add_argument(
        "--index-key",
        default=None,
        metavar="KEY",
        help="a FAISS index factory key instead of the automatic choice, e.g. IVF1024,Flat",
    )
    b.add_argument(
        "--queries",
        default=None,
        metavar="DIR",
        help="embeddings folder of tuning/test queries, e.g. text embeddings for text→image search "
        "(default: rows of the collection, their own row left out)",
    )
    b.add_argument(
        "--num-queries",
        type=number(int, 1),
        default=1000,
        help="queries per set, tuning and test (default: %(default)s)",
    )
    b.add_argument(
        "--train-size", type=number(int, 1), default=None, help="training sample (default: 64 per IVF cluster)"
    )
    b.add_argument("--seed", type=seed, default=0, help="sampling seed (default: %(default)s)")
    add_output_options(b)
    b.set_defaults(func=_index_build)
    i = actions.add_parser(
        "info",
        help="print the index's parameters and measured figures",
        description="Print ann.json of an embeddings folder and whether it matches the embeddings.",
    )
    i.add_argument("embeddings", metavar="EMB_DIR", help="embeddings folder with a FAISS index")
    add_output_options(i)
    i.set_defaults(func=_index_info)
