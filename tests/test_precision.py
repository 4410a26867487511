"""Speed levers of `load` / `create_model`: precision (fp32 / bf16 / fp16 / int8) and torch.compile, each
against the fp32 model on the same weights."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cnclip_vision
from cnclip_vision.cli import main

from .conftest import random_inputs, small_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    cnclip_vision.create_model(small_config("ViT-B-16")).save_pretrained(path)
    return path


def _features(model, config):
    pixels, ids, mask = random_inputs(config, n_images=4)
    with torch.inference_mode():
        return model.encode_image(pixels).float(), model.encode_text(ids, mask).float()


@pytest.mark.parametrize("precision, min_cosine", [("int8", 0.99), ("bf16", 0.99)])
def test_precision_keeps_the_embeddings(saved, precision, min_cosine):
    config = small_config("ViT-B-16")
    ref_image, ref_text = _features(cnclip_vision.load(saved), config)
    model = cnclip_vision.load(saved, precision=precision)
    image, text = _features(model, config)
    assert F.cosine_similarity(image, ref_image).min() >= min_cosine
    assert F.cosine_similarity(text, ref_text).min() >= min_cosine
    assert not torch.equal(image, ref_image)  # the lever really changed the computation
    if precision == "int8":
        assert model.int8_backend == "fbgemm"  # eager: torch's quantised engine (torchao with compile=True)
        assert _int8_linears(model.visual) and _int8_linears(model.text)
    else:
        assert model.dtype == torch.bfloat16


def _int8_linears(module: torch.nn.Module) -> list[str]:
    """The Linear layers of ``module`` whose weights are int8 (torch's dynamically quantised Linear, ours
    included, or a Linear holding torchao's int8 tensor subclass)."""
    from torch.ao.nn.quantized import dynamic as nnqd

    found = []
    for name, m in module.named_modules():
        if isinstance(m, nnqd.Linear) or isinstance(m, torch.nn.Linear) and type(m.weight.data) is not torch.Tensor:
            found.append(name)
    return found


def _min_cosine(model, reference, config, n_images=4):
    image, text = _features(model, config)
    ref_image, ref_text = _features(reference, config)
    return min(F.cosine_similarity(image, ref_image).min(), F.cosine_similarity(text, ref_text).min()).item()


def test_int8_quantises_every_linear_but_the_image_projection(saved, monkeypatch):
    """Eager int8: our FBGEMM layer (per-channel weights) on every Linear of both towers but the image
    projection, each image's activations quantised on their own: an image's embedding does not depend on its
    batch. With compile=True: torchao's layers (their quantisation ops fuse), or FBGEMM without torchao."""
    import builtins

    from cnclip_vision.models.layers import Int8Linear

    config = small_config("ViT-B-16")
    fp32 = cnclip_vision.load(saved)
    model = cnclip_vision.load(saved, precision="int8")
    linears = [name for name, m in fp32.visual.named_modules() if isinstance(m, torch.nn.Linear)]
    assert _int8_linears(model.visual) == [name for name in linears if name != "head"]
    assert type(model.visual.head) is torch.nn.Linear
    assert all(isinstance(model.get_submodule(f"visual.{name}"), Int8Linear) for name in _int8_linears(model.visual))
    text_linears = [name for name, m in fp32.text.named_modules() if isinstance(m, torch.nn.Linear)]
    assert _int8_linears(model.text) == text_linears
    assert _min_cosine(model, fp32, config) >= 0.999
    pixels, _, _ = random_inputs(config, n_images=4)
    with torch.inference_mode():
        batch, alone = model.encode_image(pixels), model.encode_image(pixels[2:3])
    assert torch.equal(batch[2:3], alone)  # one image at a time: its activation scales are its own
    with torch.inference_mode():  # the tower on its own quantises each image's activations apart too
        tower_batch, tower_alone = model.visual(pixels), model.visual(pixels[2:3])
    assert (tower_batch[2:3] - tower_alone).abs().max() < 1e-5

    compiled = cnclip_vision.load(saved, precision="int8", compile=True)  # not run here: which layers
    assert compiled.int8_backend == "torchao" and model.int8_backend == "fbgemm"
    assert not any(isinstance(m, Int8Linear) for m in compiled.modules()) and _int8_linears(compiled.text)
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao' (test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    without = cnclip_vision.load(saved, precision="int8", compile=True)
    monkeypatch.undo()
    assert without.int8_backend == "fbgemm" and any(isinstance(m, Int8Linear) for m in without.text.modules())


def test_int8_mlp_folds_quick_gelu_into_the_weights():
    """The image MLP's int8 layers carry QuickGELU's factor (fc1 x 1.702, fc2 / 1.702) and the MLP runs one SiLU:
    the same function as int8 layers without the factor under timm's QuickGELU, and close to fp32."""
    from cnclip_vision.models.layers import CLIPMlp, Int8Linear, QuickGELU

    torch.manual_seed(0)
    mlp = CLIPMlp(64, 256, act_layer=QuickGELU).eval()
    folded, plain = CLIPMlp(64, 256, act_layer=QuickGELU).eval(), CLIPMlp(64, 256, act_layer=QuickGELU).eval()
    for name in ("fc1", "fc2"):
        setattr(folded, name, Int8Linear.from_linear(getattr(mlp, name), False, *mlp.int8_scales(name)))
        setattr(plain, name, Int8Linear.from_linear(getattr(mlp, name)))
    assert folded._int8_folded() and not plain._int8_folded()
    assert (folded.fc1.output_scale, folded.fc2.input_scale) == (1.702, 1.702)
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        exact, a, b = mlp(x), folded(x), plain(x)
    assert a.shape == exact.shape
    assert F.cosine_similarity(a.flatten(), exact.flatten(), dim=0) > 0.999
    assert (a - b).abs().max() < 0.05 * exact.abs().max()  # both int8: the scales move the grid, not the result
    assert not torch.equal(a, b)  # the folded path really ran


def test_int8_model_is_not_saved(saved, tmp_path):
    """An int8 model holds packed kernels, not a checkpoint: saving it is refused with what to do instead."""
    with pytest.raises(ValueError, match="int8 model .* save the model it was loaded from"):
        cnclip_vision.load(saved, precision="int8").save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_bf16_packs_the_tower_linears_on_the_cpu(saved, tmp_path):
    """Eager bf16 on the CPU: every Linear of both towers but the image projection becomes a PackedLinear (where
    this torch and CPU have oneDNN's bf16 inner product), which computes F.linear's results bit for bit, keeps
    nn.Linear's state dict and survives deepcopy, pickling and casting; gradients reach the input, and a
    training forward is refused. Where oneDNN has no bf16 here, the model keeps plain Linear layers."""
    import copy
    import io

    from cnclip_vision.models.layers import PackedLinear, can_pack

    model = cnclip_vision.load(saved, precision="bf16")
    plain = cnclip_vision.load(saved).to(torch.bfloat16)  # the same weights, nn.Linear in bf16
    packed = {n for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    linears = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    if not can_pack():
        assert not packed
        return
    assert packed == linears - {"visual.head", "text_projection"}
    assert any(n.startswith("text.") for n in packed) and any(n.startswith("visual.") for n in packed)
    state, plain_state = model.state_dict(), plain.state_dict()
    assert state.keys() == plain_state.keys() and all(torch.equal(state[k], plain_state[k]) for k in state)

    torch.manual_seed(1)
    layer, ref = model.get_submodule("visual.blocks.0.attn.qkv"), plain.get_submodule("visual.blocks.0.attn.qkv")
    for shape in [(1, layer.in_features), (3, 7, layer.in_features)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(layer(x), ref(x))
    config = small_config("ViT-B-16")
    image, text = _features(model, config)
    plain_image, plain_text = _features(plain, config)
    assert F.cosine_similarity(image, plain_image).min() >= 0.9999  # the MLPs scale after rounding
    assert F.cosine_similarity(text, plain_text).min() >= 0.9999

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert isinstance(twin.get_submodule("visual.blocks.0.attn.qkv"), PackedLinear)
        assert torch.equal(_features(twin, config)[0], image)
    model.save_pretrained(tmp_path / "bf16")
    again = cnclip_vision.load(tmp_path / "bf16", precision="bf16").state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)

    pixels = random_inputs(config, n_images=1)[0].bfloat16().requires_grad_()
    model.encode_image(pixels).float().sum().backward()  # F.linear's backward: oneDNN's op has none
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="PackedLinear is for inference"):
        model.train().encode_image(pixels)
    as_fp32 = copy.deepcopy(model).eval().float()
    assert as_fp32.dtype == torch.float32 and not as_fp32.get_submodule("visual.blocks.0.attn.qkv").weight.is_mkldnn
    assert F.cosine_similarity(_features(as_fp32, config)[0], image).min() >= 0.999
    compiled = cnclip_vision.load(saved, precision="bf16", compile=True)
    assert not any(isinstance(m, PackedLinear) for m in compiled.modules())  # inductor packs its own
    small = torch.nn.Linear(16, 8).bfloat16().eval()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():  # a packed model compiled by hand: F.linear on the dense weight
        assert torch.equal(torch.compile(PackedLinear.from_linear(small))(x), small(x))


def test_create_model_takes_precision_too():
    model = cnclip_vision.create_model(small_config("ViT-B-16"), precision="int8")
    assert _int8_linears(model.visual) and model.precision == "int8"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(precision="fp16"), "needs a GPU"),
        (dict(precision="int4"), "allowed values"),
        (dict(precision="bf16", dtype="bf16"), "either dtype= or precision="),
    ],
)
def test_bad_precision(saved, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cnclip_vision.load(saved, **kwargs)


def test_cli_precision_int8(saved, capsys, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    assert (
        main(["-q", "classify", str(image), "--labels", "红色,蓝色", "--model", str(saved), "--precision", "int8"]) == 0
    )
    assert "红色" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile's CPU backend needs a C++ compiler",
)
def test_compile_gives_the_same_embeddings(saved):
    config = small_config("ViT-B-16")
    ref_image, ref_text = _features(cnclip_vision.load(saved), config)
    image, text = _features(cnclip_vision.load(saved, compile=True), config)
    torch.testing.assert_close(image, ref_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text, ref_text, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_kernel_is_chosen_per_call(saved, monkeypatch, precision):
    """CPU bf16, short sequences: the explicit softmax(q kᵀ) v (faster there); fp32 or long sequences: SDPA.
    Both give the same features."""
    from cnclip_vision.models import layers

    config = small_config("ViT-B-16")
    model = cnclip_vision.load(saved, precision=precision)
    assert all(isinstance(b.attn, layers.CLIPAttention) for b in model.visual.blocks)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    pixels = random_inputs(config, n_images=4)[0]
    with torch.inference_mode():
        chosen = model.encode_image(pixels).float()
        assert len(calls) == (0 if precision == "bf16" else len(model.visual.blocks))
        monkeypatch.setattr(layers, "EXPLICIT_MAX_TOKENS", 0)  # every sequence "long": SDPA
        fused = model.encode_image(pixels).float()
    assert len(calls) == (2 if precision == "fp32" else 1) * len(model.visual.blocks)
    assert F.cosine_similarity(chosen, fused).min() >= 0.9999


def test_compile_freezes_only_for_inference_on_the_cpu(saved):
    from torch._inductor import config as inductor

    from cnclip_vision.models.clip import _compile_options

    model = cnclip_vision.load(saved, compile=True)
    assert model.freeze_compiled and not cnclip_vision.load(saved).freeze_compiled
    with torch.no_grad(), _compile_options(model):
        assert inductor.freezing
    with _compile_options(model):  # gradients on: a training graph, never frozen
        assert not inductor.freezing
    assert not inductor.freezing


# --------------------------------------------------------------------------------------- precision="auto"
@pytest.mark.parametrize(
    "amx, avx512_bf16, expected",
    [(True, True, ("bf16", "AMX")), (False, True, ("bf16", "AVX512-BF16")), (False, False, ("fp32", "without"))],
)
def test_auto_precision_follows_the_cpu(monkeypatch, amx, avx512_bf16, expected):
    from cnclip_vision import device

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    fast, why = device.bf16_is_fast("cpu")
    assert fast == (expected[0] == "bf16") and expected[1] in why
    assert device.auto_precision("cpu") == expected[0]


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch, bf16, expected):
    from cnclip_vision import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert device.auto_precision("cuda") == expected


def test_load_auto_resolves_and_records_the_precision(saved, monkeypatch):
    from cnclip_vision.models.identity import model_info

    for chosen, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        monkeypatch.setattr("cnclip_vision.device.auto_precision", lambda device=None, c=chosen: c)
        model = cnclip_vision.load(saved, precision="auto")
        assert (model.precision, model.dtype) == (chosen, dtype)
        assert model_info(model)["precision"] == chosen
    assert cnclip_vision.load(saved).precision == "fp32"  # the Python API's default stays fp32
    int8, fp32 = cnclip_vision.load(saved, precision="int8"), cnclip_vision.load(saved)
    assert model_info(int8)["precision"] == "int8"
    assert model_info(int8)["fingerprint"] != model_info(fp32)["fingerprint"]  # same dtype, other numbers


def test_cli_default_is_auto_and_logged(saved, capsys, tmp_path, monkeypatch, caplog):
    import logging

    from PIL import Image

    from cnclip_vision import device

    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    device._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="cnclip_vision"):
        assert main(["classify", str(image), "--labels", "红色,蓝色", "--model", str(saved)]) == 0
    chosen = device.auto_precision("cpu")
    assert any(f"precision auto on cpu: {chosen}" in r.getMessage() for r in caplog.records)


def test_classifier_cache_records_and_checks_the_model(saved, tmp_path):
    from cnclip_vision.errors import CNClipError
    from cnclip_vision.zeroshot import ZeroShotClassifier

    cache = tmp_path / "classes.safetensors"
    fp32 = cnclip_vision.load(saved)
    ZeroShotClassifier(fp32, ["红色", "蓝色"], templates="none").save(cache)
    assert ZeroShotClassifier.load(cache, cnclip_vision.load(saved)).labels == ["红色", "蓝色"]
    for other in ("bf16", "int8"):
        with pytest.raises(CNClipError, match="another model or precision"):
            ZeroShotClassifier.load(cache, cnclip_vision.load(saved, precision=other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quick_gelu_is_timms_bit_for_bit(dtype):
    from timm.layers import QuickGELU as TimmQuickGELU

    from cnclip_vision.models.layers import QuickGELU

    x = torch.randn(64, 300, dtype=dtype) * 4
    ref = TimmQuickGELU()(x)
    with torch.no_grad():  # the in-place path
        assert torch.equal(QuickGELU()(x), ref)
    y = x.clone().requires_grad_()
    out = QuickGELU()(y)
    out.sum().backward()  # with gradients: the out-of-place path, differentiable
    assert torch.equal(out.detach(), ref) and y.grad is not None and torch.isfinite(y.grad).all()
    assert isinstance(cnclip_vision.create_model(small_config("ViT-B-16")).visual.blocks[0].mlp.act, QuickGELU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_folds_quick_gelu_only_without_gradients(dtype):
    """CLIPMlp without gradients: fc2(silu(1.702 fc1(x)) / 1.702), as close to the fp32 MLP as timm's Mlp is (closer
    in bf16); with gradients, int8 layers or a norm: timm's Mlp exactly."""
    from timm.layers import Mlp

    from cnclip_vision.models.layers import CLIPMlp, QuickGELU

    torch.manual_seed(0)
    ours = CLIPMlp(96, 384, act_layer=QuickGELU).eval()
    timms = Mlp(96, 384, act_layer=QuickGELU).eval()
    timms.load_state_dict(ours.state_dict())
    x = torch.randn(2, 50, 96)
    with torch.no_grad():
        exact = timms(x).double()
        ours_out, timm_out = ours.to(dtype)(x.to(dtype)), timms.to(dtype)(x.to(dtype))
        assert ours_out.shape == timm_out.shape == (2, 50, 96) and ours_out.dtype == dtype
        assert not torch.equal(ours_out, timm_out)  # the folded path ran
        ours_err = (ours_out.double() - exact).abs().max().item()
        timm_err = (timm_out.double() - exact).abs().max().item()
        assert ours_err <= (1e-5 if dtype == torch.float32 else timm_err), (ours_err, timm_err)
    y = x.to(dtype).requires_grad_()
    out = ours(y)
    out.sum().backward()  # with gradients: timm's path
    assert torch.equal(out.detach(), timm_out) and y.grad is not None
    model = cnclip_vision.create_model(small_config("ViT-B-16"), precision="int8")
    with torch.no_grad():
        assert isinstance(model.visual.blocks[0].mlp, CLIPMlp) and not model.visual.blocks[0].mlp._foldable()
    ours.norm = torch.nn.LayerNorm(384).to(dtype)
    with torch.no_grad():
        assert not ours._foldable()


def test_compiled_mlp_keeps_timms_graph():
    """Under torch.compile the MLP is timm's (sigmoid, no folded SiLU), the graph inductor's CPU freezing fuses."""
    from cnclip_vision.models.layers import CLIPMlp, QuickGELU

    graphs: list[str] = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    mlp = CLIPMlp(32, 64, act_layer=QuickGELU).eval()
    with torch.no_grad():
        torch.compile(mlp, backend=backend)(torch.randn(4, 32))
    assert graphs and "sigmoid" in graphs[0] and "silu" not in graphs[0]


SATURATING_CHILD = r"""
import copy, json, torch, torch.nn.functional as F, cnclip_vision
from cnclip_vision.device import int8_saturates
from cnclip_vision.models import factory
from cnclip_vision.models.layers import Int8Linear
from tests.conftest import random_inputs, small_config
torch.manual_seed(0)
config = small_config("ViT-B-16")
fp32 = cnclip_vision.create_model(config)
ours, plain = copy.deepcopy(fp32), copy.deepcopy(fp32)
factory._quantize_int8(ours)
for name in factory._tower_linears(plain):  # 8-bit activations, whatever the CPU
    parent, _, leaf = name.rpartition(".")
    setattr(plain.get_submodule(parent), leaf, Int8Linear.from_linear(plain.get_submodule(name)))
compiled = cnclip_vision.create_model(config, precision="int8", compile=True)  # not run: its freezing flag
pixels, ids, mask = random_inputs(config, n_images=8)
layer = torch.nn.Linear(64, 16, bias=False)  # weights and inputs near their maximum: 8-bit products saturate
with torch.inference_mode():
    layer.weight.copy_(torch.rand(16, 64) * 0.1 + 0.9)
    x = torch.rand(8, 64) * 0.2 + 0.8
    error = lambda rr: ((Int8Linear.from_linear(layer, rr)(x) - layer(x)).abs().max() / layer(x).abs().max()).item()
    ref = fp32.encode_image(pixels)
    cos = lambda m: F.cosine_similarity(m.encode_image(pixels), ref).min().item()
    print(json.dumps({"saturates": [int8_saturates("torchao"), int8_saturates("fbgemm")],
                      "reduce_range": sorted({m.reduce_range for m in ours.modules() if isinstance(m, Int8Linear)}),
                      "torchao_7bit": factory._torchao_int8_config().reduce_range,
                      "freeze": compiled.freeze_compiled, "ours": cos(ours), "plain": cos(plain),
                      "error_7bit": error(True), "error_8bit": error(False)}))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an AVX2 cap is x86")
def test_int8_adapts_to_saturating_kernels():
    """With oneDNN and FBGEMM held to AVX2 (an AVX2-only CPU's int8 kernels: u8 x s8 pairs summed in int16,
    saturating) both probes see it: eager int8 quantises activations to 7 bits, torchao's (compile=True) to 7
    bits asymmetric, and compile runs unfrozen. On near-maximal weights and inputs 8-bit activations are far off
    there and 7-bit ones exact; on the model's Gaussian weights both stay close to fp32."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", PYTHONWARNINGS="ignore")
    env["FBGEMM_ENABLE_INSTRUCTIONS"] = "AVX2"
    out = subprocess.run(
        [sys.executable, "-c", SATURATING_CHILD], capture_output=True, text=True, env=env, cwd=REPO, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["saturates"] == [True, True] and result["freeze"] is False, result
    assert result["reduce_range"] == [True] and result["torchao_7bit"] is True, result
    assert result["error_7bit"] < 0.01 < result["error_8bit"], result
    assert result["ours"] >= 0.999 and result["plain"] >= 0.99, result
