"""The Chinese-CLIP image towers as timm models (registered on ``import cnclip_vision``).

``timm.create_model("chinese_clip_vit_base_patch16_224", pretrained=True)`` loads the Hub repo;
``pretrained_cfg_overlay=dict(file=PATH)`` loads a Hugging Face ``pytorch_model.bin`` /
``model.safetensors``, an original ``clip_cn_*.pt`` or a file written by this library, all through
:func:`checkpoint_filter_fn`. The default head (``num_classes`` = embedding size) is the visual
projection (with a zero bias), so ``model(x)`` equals ``ChineseCLIP.encode_image(x)``.

The models script (``torch.jit.script``) and trace (``torch.fx``: torchvision's
``create_feature_extractor``, timm's ``features_only=True, feature_cls="fx"``) like timm's own twins
(``vit_base_patch16_clip_224``, ``resnet50_clip``): the input check is one TorchScript-compatible function
that ``torch.fx`` keeps as a single graph node, so scripted and traced models raise the same messages.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from timm.models import build_model_with_cfg, byobnet, generate_default_cfgs, register_model, vision_transformer
from timm.models.byobnet import ByobNet
from timm.models.vision_transformer import VisionTransformer

from cnclip_vision.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from cnclip_vision.errors import CheckpointError
from cnclip_vision.models.configs import get_config
from cnclip_vision.models.towers import check_resnet, vit_kwargs
from cnclip_vision.models.weights import detect_layout, fit_report, looks_like, to_native

__all__ = ["TIMM_NAMES", "ChineseCLIPViT", "ChineseCLIPResNet", "checkpoint_filter_fn"]

# timm name → registered Chinese-CLIP size
TIMM_NAMES = {
    "chinese_clip_vit_base_patch16_224": "ViT-B-16",
    "chinese_clip_vit_large_patch14_224": "ViT-L-14",
    "chinese_clip_vit_large_patch14_336": "ViT-L-14-336",
    "chinese_clip_vit_huge_patch14_224": "ViT-H-14",
    "chinese_clip_resnet50_224": "RN50",
}


@torch.fx.wrap  # one opaque node in torch.fx graphs (it branches on shapes); it still runs in the GraphModule
def _check_input(x: torch.Tensor, in_chans: int, min_size: int, name: str) -> torch.Tensor:
    """``x`` unchanged if it is a batch of ``in_chans``-channel images of at least ``min_size`` pixels a side,
    else a ``ValueError`` that says so. TorchScript-compatible (scripted models raise the same message, as
    ``torch.jit.Error: builtins.ValueError: ...``); returning ``x`` keeps the check in traced graphs, whose
    dead-code elimination would drop a node nothing uses."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        shape = ", ".join([str(s) for s in x.shape]) + ("," if x.dim() == 1 else "")  # tuple(x.shape), scriptable
        raise ValueError(f"{name} takes images [N, {in_chans}, H, W]; got a tensor of shape ({shape})")
    if min(x.shape[-2], x.shape[-1]) < min_size:
        raise ValueError(
            f"{name} needs inputs of at least {min_size}x{min_size} pixels; got {x.shape[-2]}x{x.shape[-1]}"
        )
    return x


def _renamed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` (a timm method) under another name. TorchScript has no ``super()`` and compiles a method under
    its function's ``__name__``, so an override calls the parent's implementation through this alias: the
    installed timm's own code, compiled from its source, with no copy of it here."""
    alias = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    alias.__kwdefaults__ = fn.__kwdefaults__
    alias.__annotations__ = dict(fn.__annotations__)
    alias.__doc__ = fn.__doc__
    alias.__module__ = fn.__module__
    alias.__qualname__ = f"{fn.__qualname__.rpartition('.')[0]}.{name}".lstrip(".")
    return alias


class ChineseCLIPViT(VisionTransformer):
    """timm ``VisionTransformer`` with input checks that name the problem (channels, too-small inputs)."""

    _timm_forward_features = _renamed(VisionTransformer.forward_features, "_timm_forward_features")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.input_check_name: str = type(self).__name__  # for the error messages (TorchScript has no type())

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        return _check_input(x, self.patch_embed.proj.in_channels, self.patch_embed.patch_size[0], self.input_check_name)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = self._check(x)
        return self._timm_forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_intermediates(  # type: ignore[override]  # timm's other parameters pass through **kwargs
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, **kwargs: Any
    ) -> Any:
        x = self._check(x)
        _check_indices(indices, len(self.blocks), "indices")
        return super().forward_intermediates(x, _as_timm_indices(indices), **kwargs)


class ChineseCLIPResNet(ByobNet):
    """timm ``ByobNet`` (``resnet50_clip``) with input checks."""

    _timm_forward_features = _renamed(ByobNet.forward_features, "_timm_forward_features")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.input_check_name: str = type(self).__name__

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        return _check_input(x, self.stem.conv1.conv.in_channels, 32, self.input_check_name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check(x)
        return self._timm_forward_features(x)

    def forward_intermediates(  # type: ignore[override]  # timm's other parameters pass through **kwargs
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, **kwargs: Any
    ) -> Any:
        x = self._check(x)
        _check_indices(indices, len(self.feature_info), "indices")
        return super().forward_intermediates(x, _as_timm_indices(indices), **kwargs)


def _as_timm_indices(indices: int | Sequence[int] | None) -> int | list[int] | None:
    """``indices`` as timm's ``forward_intermediates`` types them (it only iterates over a sequence)."""
    return indices if indices is None or isinstance(indices, int) else list(indices)


def _check_indices(indices: int | Sequence[int] | None, n: int, argument: str) -> None:
    if indices is None or isinstance(indices, int):
        if isinstance(indices, int) and not 0 < indices <= n:
            raise ValueError(f"{argument}={indices}: an int takes the last N of {n} feature levels (1..{n})")
        return
    bad = [i for i in indices if not -n <= int(i) < n]
    if bad:
        raise ValueError(f"{argument} {list(indices)} has {bad} out of range; allowed 0..{n - 1} (or -{n}..-1)")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Any Chinese-CLIP checkpoint layout → this timm model's keys (timm's own filter then resamples the
    position embedding for other image sizes)."""
    state = dict(state_dict.get("state_dict", state_dict))
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        layout = detect_layout(state)
    except CheckpointError:
        layout = None  # already this timm model's keys (e.g. saved from a timm model)
    if layout is not None:
        state = {k[len("visual.") :]: v for k, v in to_native(state).items() if k.startswith("visual.")}
    if isinstance(model, VisionTransformer):
        if "head.weight" in state and getattr(model.head, "bias", None) is not None and "head.bias" not in state:
            state["head.bias"] = torch.zeros(state["head.weight"].shape[0], dtype=state["head.weight"].dtype)
        state = vision_transformer.checkpoint_filter_fn(state, model)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head") + "."
    body = lambda d: {k: v for k, v in d.items() if not k.startswith(classifier)}  # noqa: E731 (timm adapts heads)
    problems = fit_report(body(model.state_dict()), body(state))
    if problems:
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise CheckpointError(
            "\n".join([f"checkpoint does not fit timm model {name}", *problems, looks_like(state_dict)])
        )
    return state


def _cfg(arch: str, hub_id: str, **kwargs: Any) -> dict[str, Any]:
    config = get_config(arch)
    size = config.vision.image_size
    return {
        "hf_hub_id": hub_id,
        "num_classes": config.embed_dim,
        "input_size": (3, size, size),
        "fixed_input_size": True,
        "pool_size": None,
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "interpolation": "bicubic",
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2211.01335",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "chinese_clip_vit_base_patch16_224.ofa_sys": _cfg("ViT-B-16", "OFA-Sys/chinese-clip-vit-base-patch16"),
        "chinese_clip_vit_large_patch14_224.ofa_sys": _cfg("ViT-L-14", "OFA-Sys/chinese-clip-vit-large-patch14"),
        "chinese_clip_vit_large_patch14_336.ofa_sys": _cfg(
            "ViT-L-14-336", "OFA-Sys/chinese-clip-vit-large-patch14-336px"
        ),
        "chinese_clip_vit_huge_patch14_224.ofa_sys": _cfg("ViT-H-14", "OFA-Sys/chinese-clip-vit-huge-patch14"),
        "chinese_clip_resnet50_224.ofa_sys": _cfg(
            "RN50",
            "OFA-Sys/chinese-clip-rn50",
            hf_hub_filename="clip_cn_rn50.pt",
            first_conv="stem.conv1.conv",
            classifier="head.proj",
            pool_size=(7, 7),
        ),
    }
)


def _create_vit(variant: str, pretrained: bool, **kwargs: Any) -> ChineseCLIPViT:
    model_args = dict(vit_kwargs(get_config(TIMM_NAMES[variant]).vision), **kwargs)
    out_indices = model_args.pop("out_indices", min(3, model_args["depth"]))  # timm's default: the last 3 blocks
    _check_indices(out_indices, model_args["depth"], "out_indices")
    return build_model_with_cfg(
        ChineseCLIPViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **model_args,
    )


@register_model
def chinese_clip_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> ChineseCLIPViT:
    """Chinese-CLIP ViT-B/16 image tower (QuickGELU)."""
    return _create_vit("chinese_clip_vit_base_patch16_224", pretrained, **kwargs)


@register_model
def chinese_clip_vit_large_patch14_224(pretrained: bool = False, **kwargs: Any) -> ChineseCLIPViT:
    """Chinese-CLIP ViT-L/14 image tower (QuickGELU)."""
    return _create_vit("chinese_clip_vit_large_patch14_224", pretrained, **kwargs)


@register_model
def chinese_clip_vit_large_patch14_336(pretrained: bool = False, **kwargs: Any) -> ChineseCLIPViT:
    """Chinese-CLIP ViT-L/14 image tower at 336 px (QuickGELU)."""
    return _create_vit("chinese_clip_vit_large_patch14_336", pretrained, **kwargs)


@register_model
def chinese_clip_vit_huge_patch14_224(pretrained: bool = False, **kwargs: Any) -> ChineseCLIPViT:
    """Chinese-CLIP ViT-H/14 image tower (16 heads of width 80, QuickGELU)."""
    return _create_vit("chinese_clip_vit_huge_patch14_224", pretrained, **kwargs)


@register_model
def chinese_clip_resnet50_224(pretrained: bool = False, **kwargs: Any) -> ChineseCLIPResNet:
    """Chinese-CLIP ModifiedResNet-50 image tower (attention-pool head)."""
    check_resnet(get_config("RN50").vision)
    if "out_indices" in kwargs:
        _check_indices(kwargs["out_indices"], 5, "out_indices")
    return build_model_with_cfg(
        ChineseCLIPResNet,
        "chinese_clip_resnet50_224",
        pretrained,
        model_cfg=byobnet.model_cfgs["resnet50_clip"],
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )
