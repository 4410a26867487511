"""Dense features that localise: training-free variants of a CLIP ViT's last block.

A CLIP ViT's patch tokens after its last block are poorly aligned with text: the last attention mixes global
context into every token (the patch under an object often "sees" the whole image). The variants below run
the tower unchanged up to the input of its last block and replace that block only — one implementation on
the tower's own weights, not a second ViT:

* ``"raw"``: the block as trained (the tokens the detector's pyramid uses);
* ``"maskclip"`` (Zhou et al., ECCV 2022): each token's own value, through the output projection; no
  residual, no MLP;
* ``"sclip"`` (Wang et al., 2023): the attention replaced by ``softmax(q qᵀ s) + softmax(k kᵀ s)``
  (correlative self-attention); the residual and the MLP kept (ResCLIP's reference implementation);
* ``"clearclip"`` (Lan et al., ECCV 2024): ``softmax(q qᵀ s)``; no residual, no MLP;
* ``"naclip"`` (Hajimiri et al., 2024): ``softmax(k kᵀ s + G)`` with ``G`` a Gaussian of the patch-grid
  distance (std :data:`NACLIP_STD` patches) added to the logits between patches; no residual, no MLP.

``s`` is the attention's own scale (``head_dim ** -0.5``). The output then goes through the tower's final
norm as usual; project it with the visual projection for the joint image-text space.
"""

from __future__ import annotations

import functools
from typing import Literal, cast, get_args

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

__all__ = ["DENSE_MODES", "NACLIP_STD", "DenseMode", "check_dense_mode", "dense_tokens", "tokens_with_dense"]

DenseMode = Literal["raw", "maskclip", "sclip", "clearclip", "naclip"]
DENSE_MODES: tuple[DenseMode, ...] = get_args(DenseMode)
NACLIP_STD = 5.0  # NACLIP's default neighbourhood (in patches)


def check_dense_mode(mode: str) -> DenseMode:
    """``mode`` if it is one of :data:`DENSE_MODES`, else ValueError."""
    if mode not in DENSE_MODES:
        raise ValueError(f"dense_mode={mode!r}; allowed values: {', '.join(map(repr, DENSE_MODES))}")
    return mode


def _before_last_block(tower: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens ``[N, prefix + h*w, C]`` entering the last block, and the patch grid ``(h, w)``: timm's
    ``forward_features`` up to there."""
    x = tower.patch_embed(x)
    if x.ndim != 4:  # dynamic_img_size keeps the grid: [N, h, w, C]
        raise ValueError("dense modes need a tower built with dynamic_img_size=True (patch tokens as a grid)")
    grid = (x.shape[1], x.shape[2])  # not int(): an ONNX trace keeps them symbolic
    x = tower.norm_pre(tower.patch_drop(tower._pos_embed(x)))
    for block in tower.blocks[:-1]:
        x = block(x)
    return x, grid


@functools.lru_cache(maxsize=16)
def _neighbourhood(grid: tuple[int, int], std: float) -> torch.Tensor:
    """``[h*w, h*w]`` Gaussian of the squared grid distance between patches (NACLIP's attention bias)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()
    return torch.exp(-torch.cdist(points, points).pow(2) / (2 * std**2))


def _variant_attention(
    attn: Attention, x: torch.Tensor, mode: DenseMode, grid: tuple[int, int], prefix: int
) -> torch.Tensor:
    """A timm ``Attention`` module's output with the attention weights of ``mode`` (not ``"raw"``)."""
    if getattr(attn, "gate", None) is not None:
        raise ValueError("dense modes do not support gated attention")
    batch, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if mode == "maskclip":
        out = v  # every token attends to itself only
    else:

        def softmax(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            logits = (a @ b.transpose(-2, -1)) * attn.scale
            if bias is not None:
                logits = logits + bias
            return logits.softmax(dim=-1)

        if mode == "sclip":
            weights = softmax(q, q) + softmax(k, k)
        elif mode == "clearclip":
            weights = softmax(q, q)
        else:  # naclip
            bias = torch.zeros(n, n, dtype=q.dtype, device=q.device)
            bias[prefix:, prefix:] = _neighbourhood((int(grid[0]), int(grid[1])), NACLIP_STD).to(bias)
            weights = softmax(k, k, bias)
        out = weights @ v
    out = out.transpose(1, 2).reshape(batch, n, heads * head_dim)
    return attn.proj(attn.norm(out))


def _last_block(block: Block, x: torch.Tensor, mode: DenseMode, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    if mode == "raw":
        return block(x)
    attended = _variant_attention(cast(Attention, block.attn), block.norm1(x), mode, grid, prefix)
    if mode != "sclip":  # MaskCLIP, ClearCLIP, NACLIP: no residual, no MLP
        return attended
    x = x + block.ls1(attended)
    return x + block.ls2(block.mlp(block.norm2(x)))


def _as_map(tower: VisionTransformer, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Final norm, prefix tokens dropped, ``[N, C, h, w]``."""
    patches = tower.norm(tokens)[:, tower.num_prefix_tokens :]
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)


def dense_tokens(tower: VisionTransformer, x: torch.Tensor, mode: DenseMode = "raw") -> torch.Tensor:
    """The last block's patch tokens under ``mode``, after the final norm: ``[N, width, H/p, W/p]``."""
    check_dense_mode(mode)
    tokens, grid = _before_last_block(tower, x)
    last = cast(Block, tower.blocks[-1])
    return _as_map(tower, _last_block(last, tokens, mode, grid, tower.num_prefix_tokens), grid)


def tokens_with_dense(tower: VisionTransformer, x: torch.Tensor, mode: DenseMode) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw tokens, tokens under mode)`` from one pass through every block but the last (the last runs
    twice when ``mode`` is not ``"raw"``: one block's cost)."""
    check_dense_mode(mode)
    tokens, grid = _before_last_block(tower, x)
    last, prefix = cast(Block, tower.blocks[-1]), tower.num_prefix_tokens
    raw = _as_map(tower, last(tokens), grid)
    return raw, raw if mode == "raw" else _as_map(tower, _last_block(last, tokens, mode, grid, prefix), grid)
