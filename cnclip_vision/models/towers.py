"""The two towers of the dual encoder, as data-driven builders (the architecture lives in ``CLIPConfig``).

Image tower: OpenAI-CLIP ViT (timm ``VisionTransformer`` with QuickGELU, pre-norm, bias-free patch
embedding, LayerNorm eps 1e-5) whose classifier head is the bias-free visual projection; or the CLIP
ModifiedResNet-50 (timm ``resnet50_clip``, attention-pool head). Text tower: ``transformers.BertModel``
without pooler. timm and transformers are imported inside the builders, so importing this module stays light.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from torch import nn

from cnclip_vision.models.configs import CLIPConfig, VisionConfig

if TYPE_CHECKING:
    from timm.models.byobnet import ByobNet
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertModel

__all__ = ["build_image_tower", "build_text_tower", "check_resnet", "vit_kwargs"]


def vit_kwargs(vision: VisionConfig) -> dict[str, Any]:
    """timm ``VisionTransformer`` arguments of an OpenAI-CLIP ViT (QuickGELU, pre-norm, LayerNorm eps 1e-5;
    timm drops the patch-embedding bias when ``pre_norm`` is set)."""
    from timm.layers import LayerNorm

    return dict(
        img_size=vision.image_size,
        patch_size=vision.patch_size,
        embed_dim=vision.width,
        depth=vision.layers,
        num_heads=vision.heads,
        mlp_ratio=vision.mlp_ratio,
        qkv_bias=True,
        pre_norm=True,
        class_token=True,
        global_pool="token",
        norm_layer=partial(LayerNorm, eps=1e-5),
        act_layer="quick_gelu",
    )


def check_resnet(vision: VisionConfig) -> None:
    if vision.layers != (3, 4, 6, 3) or vision.width != 64 or vision.heads != 32:  # layers: an int or a tuple
        raise ValueError(
            f"ResNet image towers exist only in the RN50 layout (layers (3, 4, 6, 3), width 64, 32 heads); "
            f"got layers {vision.layers}, width {vision.width}, heads {vision.heads}"
        )


def build_image_tower(vision: VisionConfig, embed_dim: int) -> VisionTransformer | ByobNet:
    """A timm model mapping ``[N, 3, S, S]`` images to ``[N, embed_dim]`` image features."""
    if vision.kind == "vit":
        from timm.models.vision_transformer import VisionTransformer

        from cnclip_vision.models.layers import CLIPAttention, CLIPMlp, QuickGELU

        # attn_layer, mlp_layer, act_layer: timm's layers with a faster path (the attention kernel for short bf16
        # sequences on the CPU; QuickGELU folded into the MLP's matrix products or taken in place when no gradient
        # is recorded), same state dict.
        # dynamic_img_size: the same tower serves the detector's pyramid and dense embeddings at any input size;
        # at the native size timm leaves the position embedding untouched (outputs are bit-identical)
        kwargs = dict(vit_kwargs(vision), act_layer=QuickGELU, attn_layer=CLIPAttention, mlp_layer=CLIPMlp)
        tower = VisionTransformer(**kwargs, num_classes=embed_dim, dynamic_img_size=True)
        tower.head = nn.Linear(vision.width, embed_dim, bias=False)  # visual.proj, no bias
        return tower
    from timm.models.byobnet import ByobNet, model_cfgs

    check_resnet(vision)
    return ByobNet(cfg=model_cfgs["resnet50_clip"], num_classes=embed_dim, img_size=vision.image_size)


def build_text_tower(config: CLIPConfig) -> BertModel:
    """``transformers.BertModel`` without pooler, SDPA attention."""
    from transformers import BertConfig, BertModel

    bert_config = BertConfig(**config.text.to_bert_kwargs())
    bert_config._attn_implementation = "sdpa"
    return BertModel(bert_config, add_pooling_layer=False)
