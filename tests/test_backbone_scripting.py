"""Our timm backbones under TorchScript and torch.fx, as timm's twins (``vit_base_patch16_clip_224``,
``resnet50_clip``) are: ``torch.jit.script``, torchvision's ``create_feature_extractor``, FX then
TorchScript, timm's ``features_only=True, feature_cls="fx"``; outputs equal the eager model's, and the
input checks still raise their messages (eagerly, scripted and traced).

Full-size ViT-B/16 and RN50 with random weights (a forward of one 224 px image is ~1 s on 2 cores); the
backward test uses a 2-block ViT-B/16 (same class). The last test runs timm's own tests/test_models.py
(tests/timm_suite/run_timm_model_tests.py)."""

from __future__ import annotations

import inspect
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models.byobnet import ByobNet
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.feature_extraction import create_feature_extractor

from cnclip_vision.backbones.timm_models import ChineseCLIPResNet, ChineseCLIPViT

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:FutureWarning")  # deprecated, still supported

VIT, RN50 = "chinese_clip_vit_base_patch16_224", "chinese_clip_resnet50_224"
# how timm itself calls torchvision's FX feature extraction on its models (tests/test_models.py, timm.layers)
TIMM_TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
# a node of the body whose output forward_features returns, and the classifier
FEATURE_NODE = {VIT: "norm", RN50: "final_conv"}
ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    out = {name: timm.create_model(name, pretrained=False).eval() for name in (VIT, RN50)}
    assert type(out[VIT]) is ChineseCLIPViT and type(out[RN50]) is ChineseCLIPResNet
    return out


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def eager(models, x) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(forward_features, forward) of the eager models."""
    with torch.no_grad():
        return {name: (m.forward_features(x), m(x)) for name, m in models.items()}


@pytest.fixture(scope="module")
def scripted(models) -> dict[str, torch.jit.ScriptModule]:
    return {name: torch.jit.script(m) for name, m in models.items()}


BAD_INPUTS = {  # name -> [(input, message regex)]
    VIT: [
        (
            torch.randn(3, 224, 224),
            r"ChineseCLIPViT takes images \[N, 3, H, W\]; got a tensor of shape \(3, 224, 224\)",
        ),
        (torch.randn(1, 1, 224, 224), r"takes images \[N, 3, H, W\]; got a tensor of shape \(1, 1, 224, 224\)"),
        (torch.randn(5), r"got a tensor of shape \(5,\)"),
        (torch.randn(1, 3, 8, 8), r"ChineseCLIPViT needs inputs of at least 16x16 pixels; got 8x8"),
    ],
    RN50: [
        (torch.randn(2, 3, 224), r"ChineseCLIPResNet takes images \[N, 3, H, W\]; got a tensor of shape \(2, 3, 224\)"),
        (torch.randn(1, 4, 224, 224), r"takes images \[N, 3, H, W\]; got a tensor of shape \(1, 4, 224, 224\)"),
        (torch.randn(1, 3, 16, 224), r"ChineseCLIPResNet needs inputs of at least 32x32 pixels; got 16x224"),
    ],
}


# ------------------------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("name", [VIT, RN50])
def test_torchscript_matches_eager(name, scripted, eager, x):
    s = scripted[name]
    with torch.no_grad():
        _close(s.forward_features(x), eager[name][0])
        _close(s(x), eager[name][1])
        buffer = io.BytesIO()  # a saved and reloaded scripted model (no Python fallbacks left in it)
        torch.jit.save(s, buffer)
        buffer.seek(0)
        _close(torch.jit.load(buffer)(x), eager[name][1])


@pytest.mark.parametrize("name", [VIT, RN50])
def test_torchscript_keeps_the_input_checks(name, scripted):
    for bad, message in BAD_INPUTS[name]:
        with pytest.raises(torch.jit.Error, match=message):  # TorchScript re-raises as builtins.ValueError: ...
            scripted[name](bad)


# ---------------------------------------------------------------------------------------------- torch.fx
@pytest.mark.parametrize("name", [VIT, RN50])
def test_torchvision_feature_extractor_and_fx_torchscript_match_eager(name, models, eager, x):
    """torchvision's create_feature_extractor (with timm's leaf modules / functions, as for timm's twins),
    then the traced graph under TorchScript."""
    fe = create_feature_extractor(
        models[name], return_nodes={FEATURE_NODE[name]: "features", "head": "out"}, tracer_kwargs=TIMM_TRACER
    ).eval()
    with torch.no_grad():
        out = fe(x)
        _close(out["features"], eager[name][0])
        _close(out["out"], eager[name][1])
        for bad, message in BAD_INPUTS[name]:  # the check is a node of the graph
            with pytest.raises(ValueError, match=message):
                fe(bad)
        sfe = torch.jit.script(fe)
        out = sfe(x)
        _close(out["features"], eager[name][0])
        _close(out["out"], eager[name][1])
        with pytest.raises(torch.jit.Error, match=BAD_INPUTS[name][1][1]):
            sfe(BAD_INPUTS[name][1][0])


def test_vit_traces_with_a_plain_fx_tracer(models, eager, x):
    """The ViT (like vit_base_patch16_clip_224) needs no timm tracer settings: plain torch.fx and
    torchvision's defaults."""
    model = models[VIT]
    graph = torch.fx.symbolic_trace(model)
    assert any(n.op == "call_function" and n.target.__name__ == "_check_input" for n in graph.graph.nodes)
    fe = create_feature_extractor(model, return_nodes=["blocks.5", "head"]).eval()
    with torch.no_grad():
        _close(graph(x), eager[VIT][1])
        _close(fe(x)["head"], eager[VIT][1])
        blocks = model.forward_intermediates(
            x, indices=[5], output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
        spatial, prefix = blocks[0]
        _close(fe(x)["blocks.5"], torch.cat([prefix, spatial], dim=1))


@pytest.mark.parametrize("name", [VIT, RN50])
def test_timm_fx_features_only(name, x):
    """timm.create_model(features_only=True, feature_cls="fx"): equal to the blocks' outputs in the eager
    model with the same (seeded) weights, and scriptable."""
    kwargs = dict(out_indices=(3, 7, 11)) if name == VIT else {}
    torch.manual_seed(0)
    fx_net = timm.create_model(name, features_only=True, feature_cls="fx", **kwargs).eval()
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    modules = dict(model.named_modules())
    hooked: dict[str, torch.Tensor] = {}
    for module_name in fx_net.feature_info.module_name():
        modules[module_name].register_forward_hook(lambda m, i, o, key=module_name: hooked.__setitem__(key, o))
    with torch.no_grad():
        model(x)
        feats = fx_net(x)
        assert len(feats) == len(hooked) == len(fx_net.feature_info.channels()) >= 3
        for f, key in zip(feats, fx_net.feature_info.module_name()):
            _close(f, hooked[key])
        for a, b in zip(torch.jit.script(fx_net)(x), feats):
            _close(a, b)
        with pytest.raises(ValueError, match=BAD_INPUTS[name][1][1]):
            fx_net(BAD_INPUTS[name][1][0])


@pytest.mark.parametrize("name", [VIT, RN50])
def test_fx_backward_reaches_every_parameter(name):
    """timm's test_model_backward_fx on our classes: the train-mode graph gives every parameter a gradient."""
    kwargs = dict(depth=2) if name == VIT else {}
    model = timm.create_model(name, num_classes=7, **kwargs).train()
    node = "blocks.1" if name == VIT else "stages.3"
    fe = create_feature_extractor(
        model, train_return_nodes=[node, "head"], eval_return_nodes=["head"], tracer_kwargs=TIMM_TRACER
    )
    x = torch.randn(2, 3, 224, 224)
    out = fe(x)
    assert out["head"].shape == (2, 7)
    out["head"].mean().backward()
    missing = [n for n, p in fe.named_parameters() if p.grad is None]
    assert not missing and len(list(fe.parameters())) == len(list(model.parameters()))


# -------------------------------------------------------------------------------------------- eager mode
@pytest.mark.parametrize("name", [VIT, RN50])
def test_eager_bad_inputs_name_the_problem(name, models):
    model = models[name]
    for bad, message in BAD_INPUTS[name]:
        for call in (model, model.forward_features, model.forward_intermediates):
            with pytest.raises(ValueError, match=message):
                call(bad)


@pytest.mark.parametrize(("ours", "timm_class"), [(ChineseCLIPViT, VisionTransformer), (ChineseCLIPResNet, ByobNet)])
def test_forward_features_signature_is_timms(ours, timm_class):
    """Our override takes exactly timm's arguments (a new timm argument would otherwise be dropped)."""

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(ours.forward_features) == params(timm_class.forward_features)
    # and it runs the installed timm's own implementation, not a copy
    assert ours._timm_forward_features.__code__ is timm_class.forward_features.__code__


def test_forward_features_keyword_arguments(models, eager, x):
    """timm's ViT forward_features(x, attn_mask=..., is_causal=...) still reach the blocks."""
    model = models[VIT]
    with torch.no_grad():
        _close(model.forward_features(x, attn_mask=None, is_causal=False), eager[VIT][0])
        n = eager[VIT][0].shape[1]
        attend_all = torch.ones(1, 1, n, n, dtype=torch.bool)  # True = may attend: the same as no mask
        _close(model.forward_features(x, attn_mask=attend_all), eager[VIT][0])
        assert not torch.allclose(model.forward_features(x, is_causal=True), eager[VIT][0], atol=1e-3)


# ------------------------------------------------------------------------------------- timm's own tests
@pytest.mark.slow
def test_timm_own_model_tests_pass_where_the_twins_pass(tmp_path):
    """timm's tests/test_models.py (downloaded sdist, cached under build/) on ViT-B-16, RN50 and their twins.
    About 2 min on 2 cores; fails with the pip hint when the sdist can be neither found nor downloaded."""
    script = Path(__file__).resolve().parent / "timm_suite" / "run_timm_model_tests.py"
    out = subprocess.run(
        [sys.executable, str(script), "--sizes", "small", "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode == 2 and "could not download" in out.stderr:  # PyPI is reachable on every project machine
        pytest.fail("timm's sdist could not be downloaded (pip download --no-binary :all: timm): " + out.stderr[-500:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    table = json.loads((tmp_path / "r.json").read_text())["table"]
    for test in (
        "test_model_forward_torchscript",
        "test_model_forward_fx",
        "test_model_backward_fx",
        "test_model_forward_fx_torchscript",
        "test_model_forward",
        "test_model_backward",
    ):
        for model in (VIT, RN50):
            assert table[f"{test}[{model}]"] == "passed", (test, model)
