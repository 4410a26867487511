"""Three layers of the image tower, timm's with a faster path: the attention (kernel chosen per call), the MLP
(QuickGELU folded into its matrix products) and QuickGELU.

Attention: timm's ``Attention`` (same parameters and state dict).

On the CPU in bf16 (bf16 weights, or bf16 autocast) and for sequences of at most :data:`EXPLICIT_MAX_TOKENS`
tokens, the explicit ``softmax(q kᵀ) v`` — two oneDNN bf16 batched matmuls — beats the fused flash kernel of
``F.scaled_dot_product_attention``. Measured on a 2-core AVX512-BF16 EPYC, 12 heads of 64: batch 32 x 197
tokens (ViT-B-16 at 224 px), 12 layers, 0.18-0.21 s against 0.38 s for the attention alone; the whole
ViT-B-16 tower with ``compile=True`` 21.2 against 17.4 img/s (one process, alternating runs), eager from
0.97x (while the machine was loaded: the explicit path's copies then cost as much as it saves) to 1.28x;
8 x 257 tokens 12.9 against 17.7 ms; at 577 tokens and more the fused kernel is faster (87.8 against 77.9 ms
at 8 x 577, 61.2 against 50.2 at 1 x 1601). In fp32 the fused kernel is twice as fast as
the explicit one, and on GPUs it is the one to use, so everywhere else timm's own choice stands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from torch import nn

__all__ = ["EXPLICIT_MAX_TOKENS", "CLIPAttention", "CLIPMlp", "QuickGELU"]

#: Longest sequence that takes the explicit product on the CPU in bf16 (the measured crossover lies
#: between 257 and 577 tokens).
EXPLICIT_MAX_TOKENS = 400


def _explicit_is_faster(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.shape[1] > EXPLICIT_MAX_TOKENS:
        return False
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 or autocast


class CLIPAttention(Attention):
    """timm's ``Attention`` (same parameters and state dict); see the module docstring for the kernel choice."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        plain = attn_mask is None and not is_causal and getattr(self, "gate", None) is None
        if not (self.fused_attn and plain and _explicit_is_faster(x)):
            if is_causal:
                return super().forward(x, attn_mask=attn_mask, is_causal=True)
            return super().forward(x, attn_mask=attn_mask)  # timm 1.0.24 has no is_causal
        # timm's non-fused branch, without the mask handling this call does not need
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        weights = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        x = (weights @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class QuickGELU(nn.Module):
    """OpenAI CLIP's ``x * sigmoid(1.702 x)``, bit-identical to timm's, in two passes instead of three when no
    gradient is recorded (the product is taken in place). bf16, ``[6304, 3072]`` (one ViT-B-16 MLP at batch
    32) on a 2-core AVX512-BF16 EPYC: 27 against 39 ms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # autograd needs the sigmoid's output intact
            return x * torch.sigmoid(1.702 * x)
        return torch.sigmoid(x * 1.702).mul_(x)


#: QuickGELU's factor: ``x * sigmoid(a x) = silu(a x) / a``.
_QUICK_GELU_A = 1.702


class CLIPMlp(Mlp):
    """timm's ``Mlp`` (same parameters and state dict). With QuickGELU and no gradient recorded, its factor is
    folded into the two matrix products, ``fc2(silu(1.702 fc1(x)) / 1.702)``: ``addmm``'s ``alpha``/``beta``
    scale inside the GEMM, and one in-place SiLU pass replaces QuickGELU's three. bf16, ``[6304, 768]`` (one
    ViT-B-16 MLP at batch 32) on a 2-core AVX512-BF16 EPYC: 88 against 117 ms (bf16 ``sigmoid`` runs at a
    ninth of ``silu_``'s rate there), and closer to fp32 (the scaling happens before rounding). int8 layers,
    a norm, active dropout, a gradient or ``torch.compile`` (whose CPU freezing matches plain ``addmm`` + bias
    to fuse the activation) take timm's path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.fc1.bias, self.fc2.bias
        if b1 is None or b2 is None or not self._foldable():
            return super().forward(x)
        h = torch.addmm(b1, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), beta=_QUICK_GELU_A, alpha=_QUICK_GELU_A)
        F.silu(h, inplace=True)
        out = torch.addmm(b2, h, self.fc2.weight.t(), alpha=1 / _QUICK_GELU_A)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _foldable(self) -> bool:
        plain, fcs = (torch.Tensor, nn.Parameter), (self.fc1, self.fc2)
        return (
            not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # inductor fuses QuickGELU into the GEMM (frozen, on the CPU)
            and isinstance(self.act, QuickGELU)
            and isinstance(self.norm, nn.Identity)
            and not (self.training and (self.drop1.p or self.drop2.p))
            and all(type(fc) is nn.Linear and type(fc.weight) in plain for fc in fcs)
        )
