"""Three layers of the image tower, timm's with a faster path: the attention (kernel chosen per call), the MLP
(QuickGELU folded into its matrix products) and QuickGELU; the int8 Linear of eager ``precision="int8"`` and the
packed bf16 Linear of eager ``precision="bf16"`` on the CPU.

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

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

__all__ = ["EXPLICIT_MAX_TOKENS", "CLIPAttention", "CLIPMlp", "Int8Linear", "PackedLinear", "QuickGELU", "can_pack"]

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
    ninth of ``silu_``'s rate there), and closer to fp32 (the scaling happens before rounding); with
    :class:`PackedLinear` layers, whose kernel takes no factor, the scaling is an in-place pass on each output.
    int8 layers,
    a norm, active dropout, a gradient or ``torch.compile`` (whose CPU freezing matches plain ``addmm`` + bias
    to fuse the activation) take timm's path — except :class:`Int8Linear` layers quantised with the factor in
    their weights (:meth:`int8_scales`): then ``fc2(silu_(fc1(x)))``, one sample at a time, whose tensors stay
    small enough for the allocator to reuse (a new ``[32 x 197, 3072]`` fp32 tensor costs more in page faults
    than the in-place SiLU: 19 against 2 ms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._int8_folded():
            return self._int8_forward(x)
        if not self._foldable():
            return super().forward(x)
        if isinstance(self.fc1, PackedLinear) or isinstance(self.fc2, PackedLinear):  # their GEMM takes no factor
            h = F.silu(self.fc1(x).mul_(_QUICK_GELU_A), inplace=True)
            return self.fc2(h).mul_(1 / _QUICK_GELU_A)
        b1, b2 = self.fc1.bias, self.fc2.bias
        if b1 is None or b2 is None:
            return super().forward(x)
        h = torch.addmm(b1, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), beta=_QUICK_GELU_A, alpha=_QUICK_GELU_A)
        F.silu(h, inplace=True)
        out = torch.addmm(b2, h, self.fc2.weight.t(), alpha=1 / _QUICK_GELU_A)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def int8_scales(self, name: str) -> tuple[float, float]:
        """``(input_scale, output_scale)`` for :meth:`Int8Linear.from_linear` of the layer ``name`` (fc1 or fc2)
        that fold QuickGELU's factor into the int8 weights: ``silu(a fc1(x)) / a``, the ``1/a`` into fc2."""
        if not (isinstance(self.act, QuickGELU) and isinstance(self.norm, nn.Identity)):
            return 1.0, 1.0
        return {"fc1": (1.0, _QUICK_GELU_A), "fc2": (_QUICK_GELU_A, 1.0)}.get(name, (1.0, 1.0))

    def _int8_folded(self) -> bool:
        fc1, fc2 = self.fc1, self.fc2
        return (
            isinstance(fc1, Int8Linear)
            and isinstance(fc2, Int8Linear)
            and (fc1.input_scale, fc1.output_scale) == self.int8_scales("fc1") != (1.0, 1.0)
            and (fc2.input_scale, fc2.output_scale) == self.int8_scales("fc2")
            and not (self.training and (self.drop1.p or self.drop2.p))
        )

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_sample(lambda sample: self.fc2(F.silu(self.fc1(sample), inplace=True)), x)

    def _foldable(self) -> bool:
        plain, fcs = (torch.Tensor, nn.Parameter), (self.fc1, self.fc2)
        return (
            not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # inductor fuses QuickGELU into the GEMM (frozen, on the CPU)
            and isinstance(self.act, QuickGELU)
            and isinstance(self.norm, nn.Identity)
            and not (self.training and (self.drop1.p or self.drop2.p))
            and all(type(fc) in (nn.Linear, PackedLinear) and type(fc.weight) in plain for fc in fcs)
        )


def _per_sample(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each slice of ``x`` along its first dimension, stacked; one call where ``x`` has fewer
    than three dimensions or one slice, and under ``torch.compile``."""
    if x.dim() < 3 or x.shape[0] == 1 or torch.compiler.is_compiling():
        return fn(x)
    return torch.stack([fn(sample) for sample in x.unbind(0)])


class Int8Linear(nnqd.Linear):
    """torch's dynamically quantised Linear (FBGEMM on x86, QNNPACK on ARM), whose kernel quantises the
    activations itself, with int8 weights scaled per output channel and one activation scale per *sample*
    (each slice along the first of three or more dimensions) instead of one per call: a sample's output does not
    depend on the batch it came in (one scale per call: cosine 0.99876 between an image embedded alone and in a
    batch of 32, ViT-B-16), and is closer to fp32. ``reduce_range``: 7-bit activations, for CPUs whose int8
    products saturate (:func:`~cnclip_vision.device.int8_saturates`). Under ``torch.compile``: one scale per call.
    It computes ``output_scale * linear(x / input_scale)`` (exactly so: scaling moves the quantisation grid, not
    the integers), which lets :class:`CLIPMlp` fold QuickGELU's factor into its weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce_range: bool = False) -> None:
        super().__init__(in_features, out_features, bias_=bias, dtype=torch.qint8)
        self.has_bias, self.reduce_range = bias, reduce_range
        self.input_scale = self.output_scale = 1.0

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, reduce_range: bool = False, input_scale: float = 1.0, output_scale: float = 1.0
    ) -> Int8Linear:
        """``linear`` quantised (symmetric int8 weights, one scale per output channel), computing
        ``output_scale * linear(x / input_scale)``."""
        from torch.ao.quantization.observer import default_per_channel_weight_observer

        weight = linear.weight.detach().float() * (output_scale / input_scale)
        observer = default_per_channel_weight_observer()
        observer(weight)
        scale, zero_point = observer.calculate_qparams()
        bias = None if linear.bias is None else linear.bias.detach().float() * output_scale
        with warnings.catch_warnings():  # torch >= 2.14 announces the quantised tensors' move to torchao
            warnings.simplefilter("ignore", (UserWarning, DeprecationWarning, FutureWarning))
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, reduce_range)
            layer.set_weight_bias(torch.quantize_per_channel(weight, scale, zero_point, 0, torch.qint8), bias)
        layer.input_scale, layer.output_scale = input_scale, output_scale
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_params._packed_params
        return _per_sample(lambda s: torch.ops.quantized.linear_dynamic(s, packed, reduce_range=self.reduce_range), x)

    def nbytes(self) -> int:
        """Bytes of the int8 weight matrix and the fp32 bias and scales (what the packed kernel holds, padding
        aside; ``self.bias()`` would unpack a copy of the weights)."""
        return self.in_features * self.out_features + 4 * self.out_features * (2 if self.has_bias else 1)

    def extra_repr(self) -> str:
        scales = f", input_scale={self.input_scale}, output_scale={self.output_scale}"
        return f"{super().extra_repr()}, reduce_range={self.reduce_range}" + (scales if self._scaled() else "")

    def _scaled(self) -> bool:
        return (self.input_scale, self.output_scale) != (1.0, 1.0)

    def _get_name(self) -> str:
        return "Int8Linear"


def can_pack() -> bool:
    """Whether this torch has oneDNN's packed bf16 inner product (:class:`PackedLinear`) and the CPU runs it."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")):
        return False
    return hasattr(mkldnn, "_reorder_linear_weight") and bool(mkldnn._is_mkldnn_bf16_supported())


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's inner-product layout where it is a bf16 CPU matrix (else as it is)."""
    if weight.is_mkldnn or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


class PackedLinear(nn.Module):
    """A bf16 Linear for inference on the CPU whose weight oneDNN has reordered once into its inner-product
    layout, as ``torch.compile``'s CPU freezing does; ``F.linear`` reorders it on every call. The results equal
    ``F.linear``'s bit for bit. 2-core AVX512-BF16 EPYC, ``[6304, 768] x [768, 3072]`` (a ViT-B-16 fc1 at batch
    32): 77.6 against 92.3 ms; one row: 0.066 against 0.265 ms.

    Otherwise an ``nn.Linear`` (``weight``, ``bias``, the same state dict, dense): ``.to()``, ``deepcopy`` and
    pickling go through a dense weight, which is packed again where it is still bf16 on the CPU; elsewhere, and
    under ``torch.compile`` (whose inductor takes oneDNN's op only with packed constants of its own making),
    ``F.linear`` runs. The weights are buffers, not parameters: gradients reach the input (through ``F.linear``)
    but not the weights, so a training forward raises; train a model loaded in fp32 (bf16 autocast).
    """

    in_features: int
    out_features: int
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", _pack(weight.detach()))
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """``linear``'s weight and bias, packed (in ``linear``'s mode: training or eval)."""
        return cls(linear.weight, linear.bias).train(linear.training)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a plain ``[out_features, in_features]`` tensor."""
        return self.weight.to_dense() if self.weight.is_mkldnn else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        if grad and self.training:
            raise RuntimeError(
                "PackedLinear is for inference (its weights take no gradient): load(precision='bf16') packs the "
                "CPU model's Linears; to train, load the model in fp32 and use bf16 autocast"
            )
        if (
            self.weight.is_mkldnn
            and x.dtype == torch.bfloat16
            and not (grad and x.requires_grad)
            and not torch.compiler.is_compiling()  # inductor takes oneDNN's op with packed constants only
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.dense_weight(), self.bias)  # oneDNN's op has no backward

    def extra_repr(self) -> str:
        packed = ", packed" if self.weight.is_mkldnn else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{packed}"

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PackedLinear:
        self.weight = self.dense_weight()
        super()._apply(fn, recurse)
        self.weight = _pack(self.weight)
        return self

    def _save_to_state_dict(self, destination: dict[str, object], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight()

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        self.weight = self.dense_weight()
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)
        finally:
            self.weight = _pack(self.weight)

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_buffers"] = {**self._buffers, "weight": self.dense_weight()}
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        self.weight = _pack(self.weight)
