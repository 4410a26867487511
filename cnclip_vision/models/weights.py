"""Checkpoint reading, layout conversion and saving (DESIGN.md §3).

Three layouts exist for the same weights:

- ``original``: the ``clip_cn_*.pt`` files of the Chinese-CLIP repository (``visual.*``, ``bert.*``,
  ``text_projection [hidden, embed]``), possibly ``module.``-prefixed, wrapped in ``{"state_dict": ...}``,
  with ``bert.pooler.*``, or with flash-attention ``Wqkv`` names;
- ``hf``: transformers' ``ChineseCLIPModel`` (``vision_model.*``, ``text_model.*``, ``*_projection.weight``);
- ``native``: this library's module names (timm image tower under ``visual.``, BERT under ``text.``).

Converters are pure functions: they never modify their input. The architecture is inferred from tensor
shapes where the file does not say.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from cnclip_vision.errors import CheckpointError
from cnclip_vision.io import atomic_write, write_json
from cnclip_vision.models.configs import CLIPConfig, TextConfig, VisionConfig, match_registered

if TYPE_CHECKING:
    from cnclip_vision.models.clip import ChineseCLIP

logger = logging.getLogger(__name__)

__all__ = [
    "StateDict",
    "read_native",
    "read_state_dict",
    "safetensors_metadata",
    "detect_layout",
    "to_native",
    "original_to_native",
    "hf_to_native",
    "native_to_hf",
    "infer_config",
    "load_native_state_dict",
    "save_pretrained",
    "stream_native",
]

StateDict = dict[str, torch.Tensor]
Layout = Literal["original", "hf", "native"]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
CONFIG_METADATA_KEY = "cnclip_vision_config"  # our config inside safetensors metadata and config.json


# ---------------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> tuple[StateDict, dict[str, str]]:
    """Tensors of a checkpoint file and its metadata, loaded safely.

    Safetensors files are read with ``safetensors``; anything else with ``torch.load(weights_only=True)``,
    which refuses pickles that would run code. The original ``{"state_dict": ...}`` wrapper and the
    ``module.`` prefix of data-parallel training are removed. ``dtype``: floating tensors are cast to it one
    by one as they are read, so that a checkpoint never sits in memory in its file's precision next to the
    cast copy (safetensors: peak = the cast state + one read group of <= 1/32 of the file; ``.pt`` files
    are memory-mapped, and the pages read stay counted in the RSS until loading ends).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty")
    metadata: dict[str, str] = {}
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                keys = list(f.keys())
            state = {}
            for group in _read_groups(path, keys):
                state.update(_read_cast(path, group, dtype))
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers/data
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            reason = str(e).splitlines()[0]
            if "weights_only" in str(e) or "Unsupported global" in str(e) or "Unsupported operand" in str(e):
                raise CheckpointError(
                    f"refusing to load {path}: it contains pickled objects other than tensors ({reason}). "
                    "It was NOT executed. Only tensor checkpoints (torch.save of a state dict) and safetensors "
                    "are loaded; convert it on a trusted machine if you trust its source."
                ) from e
            raise CheckpointError(f"{path} is not a PyTorch checkpoint: {reason}") from e
        except Exception as e:  # torch raises RuntimeError, EOFError, IndexError, ... for non-checkpoints
            raise CheckpointError(
                f"{path} could not be read as a PyTorch checkpoint (truncated or corrupt?): {str(e).splitlines()[0]}"
            ) from e
        state = _unwrap(obj, path)
        for key in state:
            state[key] = _cast(state[key], dtype)
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return _strip_prefix(state, "module."), metadata


def read_native(path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> tuple[StateDict, dict[str, str]]:
    """:func:`read_state_dict` then :func:`to_native`, except that a safetensors file in the Hugging Face or native
    layout read without a cast is read through :func:`stream_native` with the Hugging Face q/k/v parts each in a
    read group of its own: a part read as stored is a view of its group's mapped pages, which stay resident beside
    the fused copy while any other tensor of the group lives (an fp32 ViT-L-14 peaked at 1.21x its bytes that
    way, 1.01x now). Cast parts are copies, and fusing them after the whole read fragments the heap less (bf16
    ViT-L-14: 1.05-1.06x against 1.11-1.18x streamed)."""
    path = Path(path)
    if path.is_file() and _is_safetensors(path) and not _casts(path, dtype):
        try:
            stream = stream_native(path, dtype, order=lambda key, shape: int(bool(_HF_QKV_PART.search(key))))
        except CheckpointError:
            pass  # the original layout, or unreadable: read below, converted or reported there
        else:
            state = dict(stream)
            if state:
                return state, safetensors_metadata(path)
    state, metadata = read_state_dict(path, dtype)
    return to_native(state, consume=True), metadata


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a safetensors file (its header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


_HF_QKV_PART = re.compile(r"\.self_attn\.[qkv]_proj\.")


def _casts(path: Path, dtype: torch.dtype | None) -> bool:
    """Whether reading the safetensors file ``path`` at ``dtype`` casts any of its floating tensors."""
    from safetensors import safe_open

    if dtype is None:
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {f.get_slice(key).get_dtype() for key in f.keys()}
    except Exception:  # unreadable: read_state_dict reports it
        return True
    other_floats = set(_FLOAT_NAMES.values()) - {_FLOAT_NAMES.get(dtype)}
    return bool(stored & other_floats)


_FLOAT_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        return path.suffix == ".safetensors" or _looks_like_safetensors(f.read(16))


def stream_native(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    order: Callable[[str, list[int]], int] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors checkpoint in the Hugging Face or native layout, under native keys, read one
    group at a time (see :func:`read_state_dict`): a consumer that transforms each tensor as it comes (e.g.
    quantises it) never holds the file's precision copy of the whole checkpoint. q/k/v parts are held until
    their triple is complete. ``order(file key, shape)``: tensors are read by rank, then in file order; rank 0
    in the usual groups, every tensor of a higher rank on its own (an uncast tensor is a view of its group's
    mapped pages: tensors kept as read must not share a group with tensors about to be transformed, and a
    transformed tensor should leave no more behind than itself). Raises :class:`CheckpointError` for another
    layout or an unreadable file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    prefix = "module." if keys and all(k.startswith("module.") for k in keys) else ""
    layout = detect_layout(dict.fromkeys(k[len(prefix) :] for k in keys))
    if layout == "original":
        raise CheckpointError(f"{path}: the original layout is converted as a whole, not streamed")

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        ranks: dict[int, list[str]] = {}
        if order is not None:
            with safe_open(str(path), framework="pt") as f:
                for key in keys:
                    ranks.setdefault(order(key, list(f.get_slice(key).get_shape())), []).append(key)
        groups = [g for rank in sorted(ranks) for g in _read_groups(path, ranks[rank], 1 if rank else None)]
        for group in groups or _read_groups(path, keys):
            try:
                tensors = _read_cast(path, group, dtype)
            except Exception as e:
                raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
            for key in group:
                yield key[len(prefix) :], tensors.pop(key)

    return _hf_items_to_native(items()) if layout == "hf" else items()


_GROUP_BYTES = 256 * 1024**2  # at most; and at most 1/32 of the file, so a group's pages add <= ~6% to the peak


def _read_groups(path: Path, keys: list[str], limit: int | None = None) -> list[list[str]]:
    """``keys`` in file order, cut into groups of at most ``limit`` bytes (default 1/32 of the file, at most
    256 MB; a tensor larger than the limit is a group of its own)."""
    from safetensors import safe_open

    limit = limit or min(_GROUP_BYTES, max(1, path.stat().st_size // 32))
    groups: list[list[str]] = [[]]
    size = 0
    with safe_open(str(path), framework="pt") as f:
        for key in keys:
            part = f.get_slice(key)
            nbytes = math.prod(part.get_shape()) * _DTYPE_BYTES.get(part.get_dtype(), 4)
            if groups[-1] and size + nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(key)
            size += nbytes
    return groups


def _read_cast(path: Path, keys: list[str], dtype: torch.dtype | None) -> StateDict:
    """Tensors ``keys`` of a safetensors file, cast to ``dtype``. safetensors maps the file: the pages read stay
    resident (counted in the RSS) while the handle is open, so each group has its own short-lived handle and a
    cast group leaves only its cast copy behind (an uncast tensor keeps its pages, as it is the data)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: _cast(f.get_tensor(k), dtype) for k in keys}


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object
    return len(head) > 9 and head[8:9] == b"{"


def _unwrap(obj: object, path: Path) -> StateDict:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    return dict(obj)


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def detect_layout(state: Mapping[str, object]) -> Layout:
    """Which of the three layouts a (prefix-free) state dict is in."""
    keys = state.keys()
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith("bert.") for k in keys):
        return "original"
    if any(k.startswith("text.") for k in keys) and any(k.startswith("visual.") for k in keys):
        return "native"
    sample = ", ".join(list(keys)[:5])
    raise CheckpointError(
        "not a Chinese-CLIP checkpoint: expected keys starting with 'visual.'/'bert.' (original), "
        f"'vision_model.'/'text_model.' (Hugging Face) or 'visual.'/'text.' (cnclip_vision); found {sample}, ..."
    )


# ----------------------------------------------------------------------------------------- conversion
# (foreign name, native name) pairs; "{i}" stands for a layer index. Used in both directions.
_HF_NAMES = [
    ("vision_model.embeddings.patch_embedding.", "visual.patch_embed.proj."),
    ("vision_model.pre_layrnorm.", "visual.norm_pre."),
    ("vision_model.post_layernorm.", "visual.norm."),
    ("vision_model.encoder.layers.{i}.layer_norm1.", "visual.blocks.{i}.norm1."),
    ("vision_model.encoder.layers.{i}.layer_norm2.", "visual.blocks.{i}.norm2."),
    ("vision_model.encoder.layers.{i}.self_attn.out_proj.", "visual.blocks.{i}.attn.proj."),
    ("vision_model.encoder.layers.{i}.mlp.", "visual.blocks.{i}.mlp."),
    ("visual_projection.weight", "visual.head.weight"),
    ("text_projection.weight", "text_projection.weight"),
    ("logit_scale", "logit_scale"),
    ("text_model.", "text."),
]
_ORIGINAL_NAMES = [
    ("visual.conv1.", "visual.patch_embed.proj."),
    ("visual.ln_pre.", "visual.norm_pre."),
    ("visual.ln_post.", "visual.norm."),
    ("visual.transformer.resblocks.{i}.ln_1.", "visual.blocks.{i}.norm1."),
    ("visual.transformer.resblocks.{i}.ln_2.", "visual.blocks.{i}.norm2."),
    ("visual.transformer.resblocks.{i}.attn.out_proj.", "visual.blocks.{i}.attn.proj."),
    ("visual.transformer.resblocks.{i}.attn.in_proj_", "visual.blocks.{i}.attn.qkv."),
    ("visual.transformer.resblocks.{i}.attn.Wqkv.", "visual.blocks.{i}.attn.qkv."),
    ("visual.transformer.resblocks.{i}.mlp.c_fc.", "visual.blocks.{i}.mlp.fc1."),
    ("visual.transformer.resblocks.{i}.mlp.c_proj.", "visual.blocks.{i}.mlp.fc2."),
    ("logit_scale", "logit_scale"),
    ("bert.", "text."),
]
# HF / original keys that carry no weights (buffers, the unused BERT pooler)
_DROP = re.compile(r"^(text_model|bert)\.pooler\.|\.position_ids$|embeddings\.token_type_ids$")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _renamer(pairs: list[tuple[str, str]], reverse: bool = False) -> Callable[[str], str | None]:
    compiled = [(_pattern(b if reverse else a), b if not reverse else a) for a, b in pairs]

    def rename(key: str) -> str | None:
        for pattern, target in compiled:
            m = pattern.match(key)
            if m:
                return target.replace("{i}", m.groupdict().get("i") or "") + key[m.end() :]
        return None

    return rename


_from_hf, _to_hf = _renamer(_HF_NAMES), _renamer(_HF_NAMES, reverse=True)
_from_original = _renamer(_ORIGINAL_NAMES)


def hf_to_native(state: Mapping[str, torch.Tensor], *, consume: bool = False) -> StateDict:
    """transformers ``ChineseCLIPModel`` keys → native keys (q/k/v fused, class/position embeddings reshaped).
    ``consume``: empty ``state`` (a dict) on the way, so that each fused q/k/v triple is freed as soon as it is
    fused instead of living on next to the fused copy until the end."""
    return dict(_hf_items_to_native(_drain(state) if consume else iter(list(state.items()))))


def _hf_items_to_native(items: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`hf_to_native` on a stream of items: each converted item as soon as it is complete."""
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in items:
        if _DROP.search(key):
            continue
        m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            name = f"visual.blocks.{m[1]}.attn.qkv.{m[3]}"
            parts = qkv.setdefault(name, {})
            parts[m[2]] = value
            if len(parts) == 3:
                fused = torch.cat([parts.pop("q"), parts.pop("k"), parts.pop("v")], dim=0)
                del qkv[name]
                yield name, fused
        elif key == "vision_model.embeddings.class_embedding":
            yield "visual.cls_token", value.reshape(1, 1, -1)
        elif key == "vision_model.embeddings.position_embedding.weight":
            yield "visual.pos_embed", value.unsqueeze(0)
        else:
            yield _require(_from_hf(key), key, "Hugging Face"), value
        del value
    for key, parts in qkv.items():
        raise CheckpointError(f"incomplete attention weights for {key}: found only {sorted(parts)} of q, k, v")


def _drain(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The items of a dict, each removed from it as it is handed out (the caller then holds the only reference)."""
    if not isinstance(state, dict):
        raise TypeError("consume=True needs a dict")
    for key in list(state):
        yield key, state.pop(key)


def native_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Native keys → transformers ``ChineseCLIPModel`` keys (ViT towers only)."""
    out: StateDict = {}
    for key, value in state.items():
        m = re.match(r"^visual\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part.contiguous()
        elif key == "visual.cls_token":
            out["vision_model.embeddings.class_embedding"] = value.reshape(-1)
        elif key == "visual.pos_embed":
            out["vision_model.embeddings.position_embedding.weight"] = value.squeeze(0)
        elif key.startswith("visual.stem."):
            raise CheckpointError(
                "ResNet image towers have no Hugging Face layout (transformers has no class for them)"
            )
        else:
            out[_require(_to_hf(key), key, "native")] = value
    return out


def original_to_native(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Original ``clip_cn_*.pt`` keys (prefix and wrapper already removed) → native keys."""
    out: StateDict = {}
    resnet = "visual.layer1.0.conv1.weight" in state
    if resnet:
        visual = {k: v for k, v in state.items() if k.startswith("visual.")}
        out.update({f"visual.{k}": v for k, v in _resnet_filter(visual).items()})
    bert_qkv = re.compile(r"^bert\.encoder\.layer\.(\d+)\.attention\.self\.(Wqkv|out_proj)\.(weight|bias)$")
    for key, value in state.items():
        if (resnet and key.startswith("visual.")) or _DROP.search(key):
            continue
        m = bert_qkv.match(key)
        if m and m[2] == "Wqkv":
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"text.encoder.layer.{m[1]}.attention.self.{name}.{m[3]}"] = part
        elif m:  # flash-attention name of the attention output projection
            out[f"text.encoder.layer.{m[1]}.attention.output.dense.{m[3]}"] = value
        elif key == "visual.class_embedding":
            out["visual.cls_token"] = value.reshape(1, 1, -1)
        elif key == "visual.positional_embedding":
            out["visual.pos_embed"] = value.unsqueeze(0)
        elif key == "visual.proj":
            out["visual.head.weight"] = value.t()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t()
        else:
            out[_require(_from_original(key), key, "original Chinese-CLIP")] = value
    return out


def _resnet_filter(state: StateDict) -> StateDict:
    """timm's own OpenAI-CLIP ModifiedResNet → ``resnet50_clip`` key mapping (on a weightless model)."""
    from timm.models.byobnet import ByobNet, checkpoint_filter_fn

    from cnclip_vision.models.configs import get_config
    from cnclip_vision.models.towers import build_image_tower

    with torch.device("meta"):
        tower = build_image_tower(get_config("RN50").vision, 1024)
    if not isinstance(tower, ByobNet):
        raise TypeError(f"the RN50 image tower should be a timm ByobNet, got {type(tower).__name__}")
    return checkpoint_filter_fn(state, tower)


def _require(new_key: str | None, key: str, layout: str) -> str:
    if new_key is None:
        raise CheckpointError(f"unexpected key {key!r} in a {layout} checkpoint")
    return new_key


def to_native(state: Mapping[str, torch.Tensor], *, consume: bool = False) -> StateDict:
    """Any of the three layouts → native keys (``consume``: see :func:`hf_to_native`)."""
    layout = detect_layout(state)
    if layout == "hf":
        return hf_to_native(state, consume=consume)
    if layout == "original":
        return original_to_native(state)
    return dict(state)


# ------------------------------------------------------------------------------ architecture inference
def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in state for m in [rx.match(k)] if m})


def _vit_heads(width: int) -> int:
    # Released sizes: 64-wide heads, except ViT-H-14 whose 16 heads are 80 wide (DESIGN.md §2).
    return 16 if width == 1280 else max(1, width // 64)


def infer_config(state: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """The architecture of a native state dict, read from tensor shapes.

    Head counts are not stored in weights: they follow the released models (64-wide heads; 16 heads of
    width 80 for a 1280-wide ViT). Pass ``arch=`` to :func:`cnclip_vision.load` for other head counts.
    """
    try:
        word = state["text.embeddings.word_embeddings.weight"]
        text_hidden = word.shape[1]
        text = TextConfig(
            hidden_size=text_hidden,
            num_layers=_count(state, r"^text\.encoder\.layer\.(\d+)\."),
            num_heads=max(1, text_hidden // 64),
            intermediate_size=state["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
            vocab_size=word.shape[0],
            max_position_embeddings=state["text.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=state["text.embeddings.token_type_embeddings.weight"].shape[0],
        )
        if "visual.stem.conv1.conv.weight" in state:
            pos = state["visual.head.pos_embed"]
            grid = round((pos.shape[0] - 1) ** 0.5)
            layers = tuple(_count(state, rf"^visual\.stages\.{s}\.(\d+)\.") for s in range(4))
            vision = VisionConfig(kind="resnet", image_size=grid * 32, width=64, layers=layers, heads=32)
            embed_dim = state["visual.head.proj.weight"].shape[0]
        else:
            patch = state["visual.patch_embed.proj.weight"]
            width, patch_size = patch.shape[0], patch.shape[-1]
            grid = round((state["visual.pos_embed"].shape[1] - 1) ** 0.5)
            vision = VisionConfig(
                kind="vit",
                image_size=grid * patch_size,
                width=width,
                layers=_count(state, r"^visual\.blocks\.(\d+)\."),
                heads=_vit_heads(width),
                patch_size=patch_size,
                mlp_ratio=state["visual.blocks.0.mlp.fc1.weight"].shape[0] / width,
            )
            embed_dim = state["visual.head.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"cannot infer the architecture: the checkpoint has no {e.args[0]!r} tensor") from e
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)


def describe(config: CLIPConfig) -> str:
    name = match_registered(config)
    v = config.vision
    tower = f"ResNet {v.layers}" if v.kind == "resnet" else f"ViT width {v.width} x {v.layers} patch {v.patch_size}"
    text = f"BERT {config.text.hidden_size} x {config.text.num_layers}"
    return f"{name or 'custom'} ({tower} @ {v.image_size}px, {text}, embed {config.embed_dim})"


# ------------------------------------------------------------------------------------------- loading
def fit_report(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Lines naming the missing, unexpected and mis-shaped keys of ``state``; empty when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
            lines.append(f"  {len(items)} {title}: {', '.join(items[:8])}{more}")
    return lines


def looks_like(state: Mapping[str, torch.Tensor]) -> str:
    """``"the checkpoint looks like: ..."`` for error messages, or an empty string."""
    try:
        return f"  the checkpoint looks like: {describe(infer_config(to_native(state)))}"
    except CheckpointError:
        return ""


def load_native_state_dict(
    model: ChineseCLIP, state: Mapping[str, torch.Tensor], *, source: str, assign: bool = False
) -> None:
    """Strict load that names missing, unexpected and mis-shaped keys before torch would."""
    check_fit(model, state, source)
    model.load_state_dict(state, strict=True, assign=assign)


def check_fit(
    model: ChineseCLIP,
    state: Mapping[str, torch.Tensor],
    source: str,
    expected: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """:class:`CheckpointError` naming every missing, unexpected and mis-shaped key of ``state`` (tensors, or
    meta tensors of their shapes) against ``model`` (its state dict, or ``expected``, the state dict it had
    before layers were replaced)."""
    problems = fit_report(model.state_dict() if expected is None else expected, state)
    if problems:
        header = f"checkpoint {source} does not fit the model ({describe(model.config)})"
        raise CheckpointError("\n".join([header, *problems, looks_like(state)]).rstrip())


# -------------------------------------------------------------------------------------------- saving
def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], config: CLIPConfig) -> None:
    """Safetensors file whose metadata carries the config, so the file alone is self-describing."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_pretrained(model: ChineseCLIP, directory: str | os.PathLike[str]) -> None:
    """Hugging Face layout for ViT towers (transformers reads it), native layout for ResNet towers."""
    from cnclip_vision.data.processor import Processor

    if model.precision == "int8":
        raise ValueError(
            f"save_pretrained({str(directory)!r}): an int8 model is quantised as it loads and is not saved; "
            "save the model it was loaded from (precision='fp32') and load that with precision='int8'"
        )
    config = model.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if config.vision.kind == "vit":
        state, config_json = native_to_hf(state), config.to_hf_dict()
    else:
        config_json = {"architectures": ["ChineseCLIPResNet"]}
    config_json[CONFIG_METADATA_KEY] = config.to_dict()
    save_state_dict(state, directory / SAFETENSORS_NAME, config)
    write_json(directory / CONFIG_NAME, config_json)
    Processor(image_size=config.vision.image_size).save_pretrained(directory)
    logger.info("saved %s to %s", describe(config), directory)


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """``model``'s parameters and buffers, torchao's int8 tensor subclasses flattened into their tensors."""

    def leaves(t: torch.Tensor) -> list[torch.Tensor]:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            return [leaf for name in t.__tensor_flatten__()[0] for leaf in leaves(getattr(t, name))]
        return [t]

    return [leaf for t in [*model.parameters(), *model.buffers()] for leaf in leaves(t)]


def stored_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The plain tensors that hold ``model``'s parameters and buffers (torchao's int8 tensor subclasses
    flattened into theirs). Packed weights are not among them: those of
    :class:`~cnclip_vision.models.layers.Int8Linear` and the oneDNN tensors of
    :class:`~cnclip_vision.models.layers.PackedLinear` (:func:`parameter_bytes` counts both)."""
    return [t for t in _tensors(model) if not t.is_mkldnn]


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s weights as stored: its tensors (oneDNN's packed ones at their element count, padding
    aside) and the int8 Linear layers' packed weights (:meth:`~cnclip_vision.models.layers.Int8Linear.nbytes`)."""
    from cnclip_vision.models.layers import Int8Linear

    packed = sum(m.nbytes() for m in model.modules() if isinstance(m, Int8Linear))
    return packed + sum(t.numel() * t.element_size() for t in _tensors(model))


def config_from_json(path: Path) -> CLIPConfig | None:
    """Our config from a ``config.json`` (ours or transformers'); None when the file says nothing usable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    try:
        if CONFIG_METADATA_KEY in data:
            return CLIPConfig.from_dict(data[CONFIG_METADATA_KEY])
        if data.get("model_type") == "chinese_clip" or "vision_config" in data:
            return CLIPConfig.from_hf_dict(data)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return None
