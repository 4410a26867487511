"""``cnclip train``: contrastive training / fine-tuning (single process or under ``torchrun``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from cnclip_vision.cli.common import number, out_folder, seed

_OVERRIDES = {  # option -> (type or tuple of choices, help)
    "output_dir": (out_folder, "folder for checkpoint.pt, metrics.jsonl and the final model/ directory"),
    "train_data": (str, ".jsonl / .tsv of image path + caption, or a folder in the original Chinese-CLIP layout"),
    "model": (str, "model name or path to fine-tune (a recipe may instead give a config for random init)"),
    "split": (str, "split name for the original layout ({split}_imgs.tsv, {split}_texts.jsonl)"),
    "epochs": (number(int, 1), "number of epochs"),
    "max_steps": (number(int, 1), "stop after this many optimizer steps (overrides epochs)"),
    "batch_size": (
        number(int, 1),
        "global batch: summed over ranks and accumulation steps; all of it acts as negatives",
    ),
    "accum_steps": (number(int, 1), "gradient accumulation steps (micro-batch = batch / ranks / accum)"),
    "lr": (number(float, 0.0), "peak learning rate of AdamW"),
    "weight_decay": (
        number(float, 0.0),
        "AdamW weight decay (not on biases, norms, gains, logit scale, positional/class embeddings)",
    ),
    "warmup": (number(float, 0.0), "warmup: a fraction of the steps (< 1) or a number of steps"),
    "precision": (("fp32", "bf16", "fp16"), "fp32, bf16 (autocast; CPU or GPU) or fp16 (GPU only)"),
    "seed": (seed, "random seed (initialisation and data order)"),
    "num_workers": (number(int, 0), "DataLoader worker processes"),
    "save_every": (number(int, 1), "write checkpoint.pt every N steps (and at the end)"),
    "log_every": (number(int, 1), "append to metrics.jsonl every N steps"),
    "eval_zeroshot": (str, "ImageFolder tree with label_cn.txt, evaluated after each epoch"),
    "device": (str, "torch device (default: the local GPU under torchrun, else cuda if available, else cpu)"),
}


_CLIPSELF_OVERRIDES = {  # option -> (type or tuple of choices, help)
    "output_dir": (out_folder, "folder for checkpoint.pt, metrics.jsonl and the distilled model/ directory"),
    "train_data": (str, "a folder of images (searched recursively); no labels or captions needed"),
    "model": (str, "the teacher and the student's starting point: a name or a path"),
    "image_size": (number(int, 16, 4096), "the student's input side in pixels (CLIPSelf: 1024)"),
    "max_split": (number(int, 1, 32), "grid cells per side drawn from 1..N per image"),
    "trainable_layers": (number(int, 1), "train only the last N tower blocks (default: the whole tower)"),
    "proposals": (
        str,
        "region-level CLIPSelf: a COCO json of boxes (file_name relative to --train-data; "
        "categories unread), 'toyworld' for toy scenes' object boxes, or 'none' for grid cells only",
    ),
    "max_proposals": (number(int, 0), "proposals distilled per image and step (a random subset)"),
    "proposal_margin": (number(float, 0.0), "context around a proposal's teacher crop, per side, x long side"),
    "region_bins": (number(int, 1, 16), "each region's features in N x N bins, each pulled to its target (paper: 1)"),
    **{k: _OVERRIDES[k] for k in ("epochs", "max_steps", "batch_size", "accum_steps", "lr", "weight_decay")},
    **{k: _OVERRIDES[k] for k in ("warmup", "precision", "seed", "num_workers", "save_every", "log_every")},
    "device": _OVERRIDES["device"],
}


def _run(args: argparse.Namespace, options: dict[str, Any], config_type: Any, run: Any, fixed: dict[str, Any]) -> int:
    """Build the run's config from ``--config`` and the flags (flags win), run it, print the JSON summary."""
    overrides = {name: getattr(args, name) for name in options} | fixed
    overrides["progress"] = not args.quiet
    if args.config:
        config = config_type.from_file(args.config, **overrides)
    else:
        missing = [f"--{n.replace('_', '-')}" for n in ("output_dir", "train_data") if overrides[n] is None]
        if missing:
            raise ValueError(f"give --config RECIPE.json or at least {' and '.join(missing)}")
        config = config_type(**{k: v for k, v in overrides.items() if v is not None})
    summary = run(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        json.dump(
            {"config": dataclasses.asdict(config), **summary}, sys.stdout, ensure_ascii=False, indent=2, default=list
        )
        sys.stdout.write("\n")
    return 0


def _clipself(args: argparse.Namespace) -> int:
    from cnclip_vision.training.clipself import CLIPSelfConfig, train_clipself

    return _run(args, _CLIPSELF_OVERRIDES, CLIPSelfConfig, train_clipself, {})


def _train(args: argparse.Namespace) -> int:
    from cnclip_vision.training.clip import TrainConfig, train

    fixed = {flag: True for flag in ("lock_image", "grad_checkpointing") if getattr(args, flag)}
    return _run(args, _OVERRIDES, TrainConfig, train, fixed)


def _add_overrides(parser: argparse.ArgumentParser, options: dict[str, Any]) -> None:
    parser.add_argument("--config", help="JSON recipe with any of the options below (e.g. recipes/toy-tiny.json)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt if it exists")
    for name, (kind, text) in options.items():
        parse = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        parser.add_argument("--" + name.replace("_", "-"), **parse, default=None, help=text)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="contrastive training / fine-tuning on image-caption pairs",
        description="Train or fine-tune a Chinese-CLIP model with symmetric InfoNCE. Options come from a JSON "
        "recipe (--config) and/or the flags below (flags win). Run under `torchrun --nproc_per_node N` for "
        "data-parallel training (gloo on CPU, nccl on GPU). Progress and logs go to stderr, metrics to "
        "OUTPUT_DIR/metrics.jsonl, the final model to OUTPUT_DIR/model; a JSON summary is printed at the end.",
    )
    _add_overrides(p, _OVERRIDES)
    p.add_argument("--lock-image", action="store_true", help="freeze the image tower (locked-image tuning)")
    p.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory in both towers")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "clipself",
        help="CLIPSelf: distil the image tower's dense features from its own crops (images only, no labels)",
        description="Self-distillation of dense features (Wu et al., ICLR 2024): the student's patch embeddings, "
        "RoI-aligned over a random grid of cells, are pulled to the frozen teacher's pooled embeddings of the same "
        "cells cropped and re-encoded; the text tower is untouched. Same loop as train (torchrun, exact resume). "
        "Recipes: recipes/toy-clipself.json, recipes/clipself-vit-b-16-coco.json. The distilled model goes to "
        "OUTPUT_DIR/model; a JSON summary is printed at the end.",
    )
    _add_overrides(p, _CLIPSELF_OVERRIDES)
    p.set_defaults(func=_clipself)
