"""The Chinese-CLIP ViT image tower as a torchvision detection backbone (ViTDet simple feature pyramid).

:func:`vit_fpn_backbone` returns a :class:`ViTDetBackbone`: a timm Chinese-CLIP ViT (``dynamic_img_size``,
so the position embedding is interpolated to any grid) whose last-block tokens (after the final LayerNorm
``ln_post``, class token dropped) form one stride-16 map, and the simple feature pyramid of Li et al.
2022 (*Exploring Plain Vision Transformer Backbones for Object Detection*) built from it::

    stride 4:  deconv 2x2/2 -> LN -> GELU -> deconv 2x2/2  -+
    stride 8:  deconv 2x2/2                                 |  each then conv 1x1 + LN, conv 3x3 + LN
    stride 16: identity                                     |  -> out_channels
    stride 32: max-pool 2x2/2                              -+
    stride 64: max-pool kernel 1 stride 2 of stride 32 (torchvision ``LastLevelMaxPool``)

The output is an ``OrderedDict`` named ``"0"``, ``"1"``, ``"2"``, ``"3"``, ``"pool"`` like torchvision's
ResNet-FPN, so ``FasterRCNN(vit_fpn_backbone("ViT-B-16"), num_classes=...)`` works with torchvision's
default anchors and ``MultiScaleRoIAlign(["0", "1", "2", "3"])``. ``levels="p3-p7"`` gives strides
8..128 (``"0"``, ``"1"``, ``"2"``, ``"p6"``, ``"p7"``; P6/P7 from torchvision's ``LastLevelP6P7``), the
RetinaNet / FCOS layout. :func:`detector_kwargs` gives matching anchors and RoI pooling for
``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` and ``FCOS``.

Inputs: ``[N, 3, H, W]`` with H and W multiples of 32 (what ``GeneralizedRCNNTransform`` produces with
its default ``size_divisible=32``), non-square allowed.

Patch-14 towers (ViT-L-14, ViT-L-14-336, ViT-H-14). ``MultiScaleRoIAlign`` and the anchor generators
assume power-of-two strides, so the token grid must be H/16 x W/16. Two modes (``patch14_mode``):

* ``"resize"`` (default): the input is resized by 14/16 (bicubic, antialiased, as CLIP preprocessing)
  before the unchanged patch-14 tower; a token then covers 16 input pixels. The tower computes exactly
  what the released model computes on a 7/8-scale image.
* ``"resample"``: the patch embedding is resampled to 16x16 on loading (FlexiViT pseudo-inverse resize,
  timm's ``resample_patch_embed``) and the tower runs on the full-resolution input.

Both use the same number of tokens. Measured on ViT-L-14 (24 blocks) with random weights written by
``create_model("ViT-L-14").save_pretrained`` and read back through each mode: cosine similarity to the
native patch-14 tower run on the same scene at 7/8 scale (224x224 for a 256x256 input, 420x560 for
480x640), of the projected class token ("pooled") and of every projected patch token ("dense"); "centred"
subtracts the mean over the images first (random towers give all images a large common component: pooled
features of *different* images have cosine 0.74-0.80, dense 0.24-0.30)::

    pooled/dense                   input     resize                         resample
    scenes (images)                          cosine         centred         cosine         centred
    smooth (rendered at 2x, 8)     256x256   1.0000/0.9999  1.0000/0.9999   1.0000/0.9997  0.9999/0.9996
                                   480x640   1.0000/1.0000  1.0000/1.0000   1.0000/0.9999  1.0000/0.9998
    detailed (pixel noise, 6)      256x256   1.0000/1.0000  1.0000/1.0000   0.9986/0.9768  0.9945/0.9656
                                   480x640   1.0000/1.0000  1.0000/1.0000   0.9989/0.9794  0.9954/0.9693

``"resize"`` reproduces the released features (the only difference to the native tower is resizing the
image once more); ``"resample"`` is as good on smooth images but drifts on fine detail (dense centred
cosine about 0.97), in exchange for seeing all input pixels. The tower is frozen by default, so feature
fidelity matters most: ``"resize"`` is the default; ``"resample"`` is an option when fine-tuning.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation

from cnclip_vision.backbones.dense import DenseMode, check_dense_mode, dense_tokens, tokens_with_dense
from cnclip_vision.backbones.timm_models import TIMM_NAMES
from cnclip_vision.errors import CheckpointError
from cnclip_vision.models.clip import ChineseCLIP
from cnclip_vision.models.configs import CLIPConfig, get_config, list_models, match_registered
from cnclip_vision.models.towers import vit_kwargs

logger = logging.getLogger(__name__)

__all__ = [
    "ViTDetBackbone",
    "anchor_generator",
    "dense_image_embeddings",
    "detector_kwargs",
    "last_tokens",
    "vit_fpn_backbone",
]

Levels = Literal["p2-p6", "p3-p7"]
PatchMode = Literal["resize", "resample"]
Norm = Literal["ln", "gn", "none"]
DetectorKind = Literal["faster_rcnn", "mask_rcnn", "retinanet", "fcos"]

_LEVELS: dict[str, tuple[float, ...]] = {"p2-p6": (4.0, 2.0, 1.0, 0.5), "p3-p7": (2.0, 1.0, 0.5)}
_NORMS = ("ln", "gn", "none")
_PATCH_MODES = ("resize", "resample")
_DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
_SIZE_DIVISIBLE = 32  # the stride-32 map must be exact; GeneralizedRCNNTransform pads to 32 by default
_STRIDE = 16  # the stride of the tower's token grid, whatever its patch size


def _norm_layer(norm: str, *channels: int) -> Callable[[int], nn.Module] | None:
    """The pyramid's channel norm; ``channels``: the widths it will normalise (GroupNorm needs multiples of 32)."""
    if norm == "ln":
        return LayerNorm2d
    if norm == "gn":
        bad = [c for c in channels if c % 32]
        if bad:
            raise ValueError(f"norm='gn' (GroupNorm with 32 groups) needs channels divisible by 32; got {bad}")
        return partial(nn.GroupNorm, 32)
    if norm == "none":
        return None
    raise ValueError(f"norm={norm!r}; allowed values: {', '.join(map(repr, _NORMS))}")


def _check_trainable_layers(n: Any, depth: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= depth:
        raise ValueError(
            f"trainable_layers={n!r}; allowed values: an int from 0 (frozen tower) to {depth} (every block)"
        )


def _check_images(x: Any, multiple: int, patch: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} takes images [N, 3, H, W]; got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{what} takes float images (normalised pixels); got dtype {x.dtype}")
    h, w = x.shape[-2:]
    if min(h, w) < max(patch, multiple):
        raise ValueError(
            f"{what}: input {h}x{w} is smaller than one patch; H and W must be at least {max(patch, multiple)} "
            f"and multiples of {multiple}"
        )
    if h % multiple or w % multiple:
        raise ValueError(
            f"{what}: input {h}x{w} is not a multiple of {multiple}; pad H and W to multiples of {multiple} "
            "(torchvision's GeneralizedRCNNTransform does so with size_divisible=32)"
        )


def last_tokens(tower: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The patch tokens of a ViT's last block after its final norm, ``[N, width, H/p, W/p]`` (class token dropped;
    the tower's ``dynamic_img_size`` interpolates the position embedding to any grid). The one way this library
    computes dense tokens: the detector's pyramid, its ``dense`` branch and :func:`dense_image_embeddings`."""
    out = tower.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)
    if not isinstance(out, list):  # intermediates_only: timm returns the list of the taken blocks' maps
        raise TypeError(f"{type(tower).__name__}.forward_intermediates gave a {type(out).__name__}, expected a list")
    return out[0]


def _project(head: nn.Module, tokens: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Apply the visual projection to every position of a ``[N, C, h, w]`` map."""
    out = head(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return F.normalize(out, dim=1) if normalize else out


class ViTDetBackbone(nn.Module):
    """A ViT tower plus the ViTDet simple feature pyramid; a torchvision detection backbone.

    ``forward(x [N, 3, H, W])`` (H, W multiples of 32) returns an ``OrderedDict`` of ``len(strides)`` maps
    ``[N, out_channels, H / s, W / s]`` (the top level rounds up). Towers whose patch is not 16 pixels get
    their input resized by ``patch / 16`` so that the token grid is always H/16 x W/16.

    ``trainable_layers``: 0 freezes the whole tower (run without gradients, kept in eval mode); n > 0 trains
    the last n blocks and the final norm. The pyramid is always trainable; the visual projection
    (``tower.head``, used only by :meth:`dense_embeddings`) is always frozen. ``shared``: the tower is another
    model's (e.g. ``clip.visual``, the same object); it is then frozen without touching its ``requires_grad``
    flags or its train/eval mode, so the owner's model is never changed.
    """

    out_channels: int
    strides: tuple[int, ...]

    def __init__(
        self,
        tower: VisionTransformer,
        *,
        out_channels: int = 256,
        levels: Levels = "p2-p6",
        norm: Norm = "ln",
        trainable_layers: int = 0,
        shared: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(tower, VisionTransformer) or tower.cls_token is None or tower.num_prefix_tokens != 1:
            raise ValueError("tower must be a timm VisionTransformer with a class token (a Chinese-CLIP ViT)")
        if not getattr(tower, "dynamic_img_size", False):
            raise ValueError("tower must be created with timm.create_model(..., dynamic_img_size=True)")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels={out_channels!r}; expected a positive int")
        if levels not in _LEVELS:
            raise ValueError(f"levels={levels!r}; allowed values: {', '.join(map(repr, _LEVELS))}")
        _check_trainable_layers(trainable_layers, len(tower.blocks))
        if shared and trainable_layers:
            raise ValueError("a shared tower is never trained (it belongs to a model the caller keeps); pass a copy")
        norm_layer = _norm_layer(norm, out_channels, tower.embed_dim // 2)
        self.tower = tower
        self.trainable_layers = trainable_layers
        self.shared = shared
        self.patch_size = int(tower.patch_embed.patch_size[0])
        self.out_channels = out_channels
        self.embed_dim = tower.num_features if isinstance(tower.head, nn.Identity) else tower.head.out_features

        dim = tower.embed_dim
        scales = _LEVELS[levels]
        self.stages = nn.ModuleList()
        for scale in scales:
            if scale == 4.0:
                resample: nn.Module = nn.Sequential(
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    norm_layer(dim // 2) if norm_layer is not None else nn.Identity(),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                )
                width = dim // 4
            elif scale == 2.0:
                resample, width = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
            elif scale == 1.0:
                resample, width = nn.Identity(), dim
            else:
                resample, width = nn.MaxPool2d(2, 2), dim
            self.stages.append(
                nn.Sequential(
                    resample,
                    Conv2dNormActivation(width, out_channels, 1, norm_layer=norm_layer, activation_layer=None),
                    Conv2dNormActivation(out_channels, out_channels, 3, norm_layer=norm_layer, activation_layer=None),
                )
            )
        self.top_block = LastLevelMaxPool() if levels == "p2-p6" else LastLevelP6P7(out_channels, out_channels)
        n_top = 1 if levels == "p2-p6" else 2
        top = int(_STRIDE / scales[-1])
        self.strides = tuple(int(_STRIDE / s) for s in scales) + tuple(top * 2 ** (i + 1) for i in range(n_top))
        self._freeze()

    # --- freezing ------------------------------------------------------------------------------------
    def _trainable_tower_modules(self) -> list[nn.Module]:
        n = self.trainable_layers
        return [*self.tower.blocks[len(self.tower.blocks) - n :], self.tower.norm] if n else []

    def trainable_tower_parameter_names(self) -> set[str]:
        """Names (relative to ``tower``) of the tower parameters this backbone trains."""
        ids = {id(p) for m in self._trainable_tower_modules() for p in m.parameters()}
        return {n for n, p in self.tower.named_parameters() if id(p) in ids}

    def _freeze(self) -> None:
        if not self.shared:
            self.tower.requires_grad_(False)
            for module in self._trainable_tower_modules():
                module.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> ViTDetBackbone:
        """Frozen parts of the tower stay in eval mode; trainable blocks and the pyramid follow ``mode``. A shared
        tower's mode is left as its owner set it."""
        for name, child in self.named_children():
            if name != "tower":
                child.train(mode)
        self.training = mode
        if not self.shared:
            self.tower.eval()
            for module in self._trainable_tower_modules():
                module.train(mode)
        return self

    # --- forward -------------------------------------------------------------------------------------
    def _tower_input(self, x: torch.Tensor, multiple: int) -> torch.Tensor:
        """``x`` checked, and resized by ``patch / 16`` for towers whose patch is not 16 pixels."""
        _check_images(x, multiple, self.patch_size, type(self).__name__)
        if self.patch_size != _STRIDE:
            h, w = (s // _STRIDE * self.patch_size for s in x.shape[-2:])
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        return x

    def _tokens(self, x: torch.Tensor, multiple: int, dense_mode: DenseMode = "raw") -> torch.Tensor:
        """Last-block tokens (under ``dense_mode``) after the final norm, class token dropped:
        ``[N, width, H/16, W/16]``."""
        x = self._tower_input(x, multiple)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable_layers > 0):
            return last_tokens(self.tower, x) if dense_mode == "raw" else dense_tokens(self.tower, x, dense_mode)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Feature maps ``{"0": stride 4, "1": 8, "2": 16, "3": 32, "pool": 64}`` (``levels="p2-p6"``)."""
        return self._pyramid(self._tokens(x, _SIZE_DIVISIBLE))

    def forward_with_dense(
        self, x: torch.Tensor, normalize: bool = False, dense_mode: DenseMode = "raw"
    ) -> tuple[OrderedDict[str, torch.Tensor], torch.Tensor]:
        """``forward(x)`` and ``dense_embeddings(x, dense_mode=dense_mode)`` from one pass through the tower (the
        last block runs a second time, as ``dense_mode`` says, unless it is ``"raw"``)."""
        if dense_mode == "raw":
            feature = dense = self._tokens(x, _SIZE_DIVISIBLE)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable_layers > 0):
                feature, dense = tokens_with_dense(self.tower, self._tower_input(x, _SIZE_DIVISIBLE), dense_mode)
        return self._pyramid(feature), _project(self.tower.head, dense, normalize)

    def _pyramid(self, feature: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = [stage(feature) for stage in self.stages]
        names = [str(i) for i in range(len(maps))]
        maps, names = self.top_block(maps, maps, names)
        return OrderedDict(zip(names, maps))

    def dense_embeddings(self, x: torch.Tensor, normalize: bool = False, dense_mode: DenseMode = "raw") -> torch.Tensor:
        """Every patch token through ``ln_post`` and the visual projection: ``[N, embed_dim, H/16, W/16]``, in
        the joint image-text space (H, W multiples of 16); ``dense_mode``: the last block's variant
        (:mod:`cnclip_vision.backbones.dense`)."""
        return _project(self.tower.head, self._tokens(x, _STRIDE, check_dense_mode(dense_mode)), normalize)


def _vit_config(arch: str | CLIPConfig) -> tuple[CLIPConfig, str]:
    """The config and the timm model name of a ViT size."""
    vit_names = {a: n for n, a in TIMM_NAMES.items() if get_config(a).vision.kind == "vit"}
    if isinstance(arch, CLIPConfig):
        config = arch
        if config.vision.kind != "vit":
            raise ValueError("arch: the detection backbone needs a ViT image tower; got a ResNet config")
    elif isinstance(arch, str) and arch in vit_names:
        config = get_config(arch)
    else:
        known = "RN50 has no stride-16 token map" if arch in list_models() else "unknown name"
        raise ValueError(f"arch={arch!r} ({known}); allowed values: {', '.join(vit_names)} or a ViT CLIPConfig")
    name = vit_names.get(match_registered(config) or "")
    if name is None:  # a custom config: any registered ViT entry point, every architecture argument overridden
        name = "chinese_clip_vit_base_patch16_224"
    return config, name


def _weights_file(weights: str | os.PathLike[str]) -> Path:
    from cnclip_vision.models.factory import _weights_in_dir

    path = Path(weights)
    if path.is_dir():
        return _weights_in_dir(path)
    if not path.is_file():
        raise CheckpointError(f"weights={str(weights)!r}: no such file or directory")
    return path


def vit_fpn_backbone(
    arch: str | CLIPConfig = "ViT-B-16",
    *,
    weights: str | os.PathLike[str] | bool | ChineseCLIP | None = None,
    trainable_layers: int = 0,
    out_channels: int = 256,
    levels: Levels = "p2-p6",
    patch14_mode: PatchMode = "resize",
    norm: Norm = "ln",
    grad_checkpointing: bool = False,
    tower_kwargs: Mapping[str, Any] | None = None,
) -> ViTDetBackbone:
    """A Chinese-CLIP ViT image tower with a ViTDet simple feature pyramid, for torchvision detectors.

    Args:
        arch: a registered ViT size (``"ViT-B-16"``, ``"ViT-L-14"``, ``"ViT-L-14-336"``, ``"ViT-H-14"``) or a
            custom ViT :class:`CLIPConfig`.
        weights: ``None`` / ``False``: random initialisation. ``True``: the released weights from the Hub
            repo (registered sizes only). A path: a Hugging Face ``pytorch_model.bin`` / ``model.safetensors``,
            an original ``clip_cn_*.pt``, a file written by ``save_pretrained``, or a directory holding one. A
            loaded :class:`ChineseCLIP`: its image tower itself (``model.visual``, the same object, never changed)
            when frozen; a copy of it when ``trainable_layers`` > 0.
        trainable_layers: 0 (default) freezes the tower; n trains its last n blocks and final norm.
        out_channels: channels of every pyramid level.
        levels: ``"p2-p6"`` (strides 4..64, names ``"0".."3", "pool"``) or ``"p3-p7"`` (strides 8..128, names
            ``"0", "1", "2", "p6", "p7"``).
        patch14_mode: how towers with 14-pixel patches reach stride 16: ``"resize"`` the input by 14/16
            (default, keeps the released features) or ``"resample"`` the patch embedding to 16x16 (see the
            module docstring for the measured effect).
        norm: the pyramid's normalisation: ``"ln"`` (channel LayerNorm, ViTDet), ``"gn"`` (GroupNorm(32)) or
            ``"none"`` (biased convolutions).
        grad_checkpointing: activation checkpointing in the tower's blocks.
        tower_kwargs: extra ``timm.create_model`` arguments for the tower (e.g. ``drop_path_rate``).
    """
    config, timm_name = _vit_config(arch)
    if patch14_mode not in _PATCH_MODES:
        raise ValueError(f"patch14_mode={patch14_mode!r}; allowed values: {', '.join(map(repr, _PATCH_MODES))}")
    _norm_layer(norm, out_channels, config.vision.width // 2)  # validate before the (slow) tower is built
    if levels not in _LEVELS:
        raise ValueError(f"levels={levels!r}; allowed values: {', '.join(map(repr, _LEVELS))}")
    _check_trainable_layers(trainable_layers, int((tower_kwargs or {}).get("depth", config.vision.layers)))

    kwargs: dict[str, Any] = dict(vit_kwargs(config.vision), num_classes=config.embed_dim, dynamic_img_size=True)
    kwargs["out_indices"] = 1  # only used by features_only; timm_models' default (3) rejects towers under 3 blocks
    if config.vision.patch_size != _STRIDE and patch14_mode == "resample":
        kwargs.update(patch_size=_STRIDE, img_size=config.vision.grid_size * _STRIDE)  # same grid, 16-px patches
    kwargs.update(tower_kwargs or {})

    shared = False
    if isinstance(weights, ChineseCLIP):
        tower, shared = _model_tower(weights, config, kwargs, trainable_layers, tower_kwargs), not trainable_layers
    elif weights is None or weights is False:
        tower = _create_tower(timm_name, pretrained=False, **kwargs)
    elif weights is True:
        if match_registered(config) is None:
            raise ValueError("weights=True needs a registered size for arch; pass a weights file for a custom config")
        tower = _create_tower(timm_name, pretrained=True, **kwargs)
    elif isinstance(weights, (str, os.PathLike)):
        file = _weights_file(weights)
        # num_classes in the overlay too: timm drops (leaves random) a head whose size differs from the cfg's
        overlay = dict(file=str(file), num_classes=config.embed_dim)
        tower = _create_tower(timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        raise ValueError(
            f"weights={weights!r}; expected None, True, a ChineseCLIP model, or a path to a weights file or directory"
        )

    if grad_checkpointing and not shared:  # a frozen shared tower runs without gradients anyway
        tower.set_grad_checkpointing(True)
    backbone = ViTDetBackbone(
        tower, out_channels=out_channels, levels=levels, norm=norm, trainable_layers=trainable_layers, shared=shared
    )
    logger.info(
        "ViTDet backbone on %s: strides %s, %d trainable tower blocks%s",
        arch if isinstance(arch, str) else "a custom ViT",
        backbone.strides,
        trainable_layers,
        f", input resized by {backbone.patch_size}/16" if backbone.patch_size != _STRIDE else "",
    )
    return backbone


def _create_tower(timm_name: str, **kwargs: Any) -> VisionTransformer:
    """``timm.create_model(timm_name, **kwargs)``, a ViT (the registered Chinese-CLIP ViT towers)."""
    tower = timm.create_model(timm_name, **kwargs)
    if not isinstance(tower, VisionTransformer):
        raise TypeError(f"timm model {timm_name!r} is a {type(tower).__name__}, not a VisionTransformer")
    return tower


def _model_tower(
    model: ChineseCLIP,
    config: CLIPConfig,
    kwargs: dict[str, Any],
    trainable_layers: int,
    tower_kwargs: Mapping[str, Any] | None,
) -> VisionTransformer:
    """``model.visual`` itself when the tower stays frozen (one tower object, no copy, the model untouched);
    a deep copy when blocks are trained, so the caller's model never changes."""
    if model.config.vision != config.vision or model.config.embed_dim != config.embed_dim:
        raise ValueError("weights is a ChineseCLIP model of another architecture than arch")
    if kwargs.get("patch_size", config.vision.patch_size) != config.vision.patch_size:
        raise ValueError(
            "patch14_mode='resample' changes the patch embedding and cannot use a model's tower; save the model "
            "(model.save_pretrained(dir)) and pass weights=dir"
        )
    if tower_kwargs:
        raise ValueError(
            f"tower_kwargs {sorted(tower_kwargs)} cannot rebuild a loaded model's tower; save the model "
            "(model.save_pretrained(dir)) and pass weights=dir"
        )
    tower = model.visual
    if not isinstance(tower, VisionTransformer) or not tower.dynamic_img_size:
        raise ValueError("weights is a ChineseCLIP whose image tower is not a dynamic-size ViT")
    return copy.deepcopy(tower) if trainable_layers else tower


# --- detectors ---------------------------------------------------------------------------------------
_OBJECT_SIZES = (32, 64, 128, 256, 512)  # anchor sizes of the five levels, as torchvision's defaults


def anchor_generator(kind: DetectorKind, strides: tuple[int, ...] = (4, 8, 16, 32, 64)) -> AnchorGenerator:
    """Anchors for ``kind`` on a backbone with these ``strides`` (one entry per level).

    ``faster_rcnn`` / ``mask_rcnn``: sizes 32..512, aspect ratios 0.5, 1, 2 (torchvision's defaults).
    ``retinanet``: three scales per octave from 32..512, aspect ratios 0.5, 1, 2 (torchvision's defaults).
    ``fcos``: one square anchor per level of the level's stride (FCOS assigns objects by size relative to it).
    """
    if kind not in _DETECTORS:
        raise ValueError(f"kind={kind!r}; allowed values: {', '.join(map(repr, _DETECTORS))}")
    if len(strides) != len(_OBJECT_SIZES):
        raise ValueError(f"strides={strides}: expected {len(_OBJECT_SIZES)} levels")
    if kind == "fcos":
        return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    sizes: tuple[tuple[int, ...], ...]
    if kind == "retinanet":
        sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in _OBJECT_SIZES)
    else:
        sizes = tuple((x,) for x in _OBJECT_SIZES)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def detector_kwargs(kind: DetectorKind, backbone: ViTDetBackbone) -> dict[str, Any]:
    """Keyword arguments that fit torchvision's ``kind`` detector to ``backbone``'s levels.

    ``FasterRCNN(backbone, num_classes=n, **detector_kwargs("faster_rcnn", backbone))``; likewise
    ``MaskRCNN`` (``"mask_rcnn"``), ``RetinaNet`` (``"retinanet"``), ``FCOS`` (``"fcos"``). With the default
    ``levels="p2-p6"`` torchvision's own defaults already work for all four; these kwargs make the FCOS
    anchors match the strides, and the RoI pooling levels match ``levels="p3-p7"``.
    """
    anchors = anchor_generator(kind, backbone.strides)
    if kind in ("retinanet", "fcos"):
        return {"anchor_generator": anchors}
    roi_levels = _level_names(backbone)[:-1]  # the top (max-pooled / P7) level is for the RPN only
    kwargs: dict[str, Any] = {
        "rpn_anchor_generator": anchors,
        "box_roi_pool": MultiScaleRoIAlign(featmap_names=roi_levels, output_size=7, sampling_ratio=2),
    }
    if kind == "mask_rcnn":
        kwargs["mask_roi_pool"] = MultiScaleRoIAlign(featmap_names=roi_levels, output_size=14, sampling_ratio=2)
    return kwargs


def _level_names(backbone: ViTDetBackbone) -> list[str]:
    names = [str(i) for i in range(len(backbone.stages))]
    return names + (["pool"] if isinstance(backbone.top_block, LastLevelMaxPool) else ["p6", "p7"])


# --- dense embeddings of a dual encoder ------------------------------------------------------------------
def dense_image_embeddings(
    model: ChineseCLIP, pixel_values: torch.Tensor, normalize: bool = False, dense_mode: DenseMode = "raw"
) -> torch.Tensor:
    """Dense patch embeddings ``[N, embed_dim, H/p, W/p]`` of a Chinese-CLIP ViT (patch size p): every patch
    token of the last block through ``ln_post`` and the visual projection, in the joint image-text space.
    ``dense_mode`` picks the last block's variant (``"raw"``: as trained; ``"maskclip"``, ``"sclip"``,
    ``"clearclip"``, ``"naclip"``: training-free variants that localise, :mod:`cnclip_vision.backbones.dense`).

    Any H, W that are multiples of the patch size work (the position embedding is interpolated bicubically,
    as timm's ``dynamic_img_size``); at the model's own size the tokens are exactly those of
    ``model.visual.forward_features``.
    """
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError("dense_image_embeddings needs a ViT image tower; this model's is a ResNet (RN50)")
    if visual.cls_token is None or visual.num_prefix_tokens != 1 or not visual.dynamic_img_size:
        raise ValueError("dense_image_embeddings expects an OpenAI-CLIP ViT built by cnclip_vision (dynamic_img_size)")
    patch = int(visual.patch_embed.patch_size[0])
    _check_images(pixel_values, patch, patch, "dense_image_embeddings")
    pixels = pixel_values.to(device=model.device, dtype=model.dtype)
    mode = check_dense_mode(dense_mode)
    tokens = last_tokens(visual, pixels) if mode == "raw" else dense_tokens(visual, pixels, mode)
    return _project(visual.head, tokens, normalize)
