"""Which parameters get curvature: the coverage report of torchvision and torch models, and a few
finite steps of small models built from the same layer types."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from spngd_ext import SPNGD
from spngd_ext.layers import classify

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _spngd_warnings_of_training(model: nn.Module, opt: SPNGD, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Two training steps; the SPNGD warnings they raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            out = model(x)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
    return [str(w.message) for w in record if str(w.message).startswith("SPNGD")]


def _first_order(model: nn.Module) -> dict[str, str]:
    """The first-order parameters and their reasons (a supported model warns about nothing)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, coverage = classify(model)
    assert not record, [str(w.message) for w in record]
    return {p.name: p.reason for p in coverage.first_order}


@pytest.mark.parametrize(
    "build",
    [torchvision.models.resnet18, torchvision.models.mobilenet_v2, torchvision.models.convnext_tiny],
    ids=["resnet18", "mobilenet_v2", "convnext_tiny"],
)
def test_torchvision_convnets_have_every_weight_covered(build):
    model = build()
    gaps = _first_order(model)
    assert all(name.endswith("layer_scale") for name in gaps), gaps
    _, coverage = classify(model)
    assert coverage.fraction(weights_only=True) == 1.0
    assert all(p.expected for p in coverage.first_order)


def test_vit_b_16_and_transformer_encoder_have_every_weight_covered():
    """Attention projections through their F.linear calls; only the class token and the positional
    embedding (first-order by design) are left."""
    model = torchvision.models.vit_b_16()
    assert set(_first_order(model)) == {"class_token", "encoder.pos_embedding"}
    _, coverage = classify(model)
    assert coverage.fraction(weights_only=True) == 1.0 and all(p.expected for p in coverage.first_order)
    kinds = {p.name: p.curvature for p in coverage.parameters}
    block = "encoder.layers.encoder_layer_0"
    assert kinds["conv_proj.weight"] == "conv2d" and kinds[f"{block}.ln_1.weight"] == "layernorm"
    assert kinds[f"{block}.mlp.0.weight"] == "linear"
    assert kinds[f"{block}.self_attention.in_proj_weight"] == "attention_linear"
    assert kinds[f"{block}.self_attention.out_proj.weight"] == "attention_linear"
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128), 3, enable_nested_tensor=False)
    assert _first_order(encoder) == {}


def test_mha_out_proj_is_covered_through_the_attention_not_its_own_hooks():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    layers, coverage = classify(layer)
    names = [lay.name for lay in layers]
    assert names.count("self_attn.out_proj") == 1 and "self_attn.in_proj" in names
    out_proj = next(lay for lay in layers if lay.name == "self_attn.out_proj")
    assert out_proj.module is not layer.self_attn.out_proj  # its hooks would never fire
    assert out_proj.weight is layer.self_attn.out_proj.weight


def _steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> SPNGD:
    opt = SPNGD(model, lr=0.05, momentum=0.9, fisher="mc", backend="torch", curvature_interval=1, seed=0)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        out = out if out.dim() == 2 else out.mean(1)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert opt.counters["steps"] == steps
    return opt


def test_small_mobilenet_and_convnext_train_finite_with_curvature_on_every_weight():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2,))
    mobilenet = torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.1)
    opt = _steps(mobilenet, x, y)
    assert opt.coverage().fraction(weights_only=True) == 1.0
    assert any(layer.kind == "grouped_conv" for layer in opt.layers)
    convnext = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3)
    opt = _steps(convnext, x, y)
    assert opt.coverage().fraction(weights_only=True) == 1.0
    assert {layer.kind for layer in opt.layers} >= {"grouped_conv", "layernorm", "linear", "conv2d"}
    # the estimates exist for every layer after the steps
    assert set(opt.factors()) == {layer.name for layer in opt.layers}


def test_small_vit_and_transformer_encoder_train_finite():
    torch.manual_seed(1)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    _steps(vit, torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2,)))
    encoder = nn.Sequential(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=False),
        nn.Linear(8, 3),
    )
    opt = _steps(encoder, torch.randn(2, 5, 8), torch.randint(0, 3, (2,)))
    assert sum(layer.kind == "layernorm" for layer in opt.layers) == 4


def test_coverage_is_logged_once_at_construction(caplog):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2))
    model.extra = nn.Parameter(torch.zeros(3))
    with caplog.at_level(logging.INFO, logger="spngd_ext"):
        opt = SPNGD(model, lr=0.1, backend="torch")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SPNGD coverage")]
    assert len(lines) == 1
    assert "grouped_conv" in lines[0] and "groupnorm" in lines[0] and "extra:" in lines[0]
    kinds = {p.name: p.curvature for p in opt.coverage().parameters}
    assert kinds == {
        "extra": "first-order",
        "0.weight": "grouped_conv",
        "0.bias": "grouped_conv",
        "1.weight": "groupnorm",
        "1.bias": "groupnorm",
        "3.weight": "linear",
        "3.bias": "linear",
    }


def test_weight_shared_by_two_layers_warns_and_trains_first_order():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b)
    with pytest.warns(UserWarning, match=r"SPNGD: 2 .*shared by the layers 0 and 2"):
        opt = SPNGD(model, lr=0.1, backend="torch")
    assert opt.layers == []
    reasons = {p.name: p.reason for p in opt.coverage().first_order}
    assert "shared" in reasons["0.weight"] and "shared" in reasons["0.bias"] and "shared" in reasons["2.bias"]
    x = torch.randn(3, 4)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()


def test_a_registered_layer_that_never_runs_is_reported_once():
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    model = Skips()
    opt = SPNGD(model, lr=0.1, backend="torch")
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    messages = _spngd_warnings_of_training(model, opt, x, y)
    assert len(messages) == 1 and "unused" in messages[0] and "did not run" in messages[0], messages
    assert "eval mode" not in messages[0]


def test_a_layer_frozen_in_eval_mode_is_reported_as_such():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    opt = SPNGD(model, lr=0.1, backend="torch")
    model[1].eval()  # a frozen BatchNorm inside a training model
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    messages = _spngd_warnings_of_training(model, opt, x, y)
    assert len(messages) == 1 and "1 did not run" in messages[0] and "(1 in eval mode)" in messages[0], messages


class _Head(nn.Module):
    """``body`` on (N, …) inputs, flattened into a Linear classifier (a supported layer to train)."""

    def __init__(self, body: nn.Module, features: int) -> None:
        super().__init__()
        self.body, self.head = body, nn.Linear(features, 3)

    def forward(self, x):
        out = self.body(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out.flatten(1))


class _Attend(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, **kw)

    def forward(self, x):
        if self.attn._qkv_same_embed_dim:  # self-attention: one tensor as query, key and value
            return self.attn(x, x, x)[0]
        return self.attn(x, x[..., : self.attn.kdim], x[..., : self.attn.vdim])[0]


@pytest.mark.parametrize(
    "body,shape,features,params",
    [
        (nn.Conv3d(1, 2, 2), (4, 1, 3, 3, 3), 16, "weight, bias"),
        (nn.BatchNorm3d(1), (4, 1, 2, 3, 3), 18, "weight, bias"),
        (nn.InstanceNorm2d(1, affine=True), (4, 1, 3, 3), 9, "weight, bias"),
        (nn.GRU(4, 4, batch_first=True), (4, 5, 4), 20, "weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0"),
        (_Attend(add_bias_kv=True), (4, 5, 4), 20, "bias_k, bias_v"),
        (_Attend(kdim=3, vdim=2), (4, 5, 4), 20, "in_proj_bias"),
    ],
    ids=["conv3d", "batchnorm3d", "instancenorm", "gru", "attention_bias_kv", "attention_kdim"],
)
def test_torch_layer_without_curvature_warns_once_naming_its_parameters_and_trains(body, shape, features, params):
    """A torch.nn layer type (or part of one) without curvature is never silent: one warning at
    construction names its first-order parameters; training then runs without another warning."""
    torch.manual_seed(0)
    model = _Head(body, features)
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = SPNGD(model, lr=0.01, backend="torch")
    messages = [str(w.message) for w in record if str(w.message).startswith("SPNGD")]
    assert len(messages) == 1 and f"parameters {params})" in messages[0], messages
    assert _spngd_warnings_of_training(model, opt, x, y) == []
    assert opt.counters["steps"] == 2 and opt.counters["skipped_steps"] == 0


def test_a_models_own_bare_parameter_is_reported_without_a_warning():
    """First-order by design (the coverage line lists it): a model's own parameter outside any layer."""

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(4))
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x + self.shift)

    assert _first_order(Shifted()) == {"shift": "no curvature type for Shifted parameters"}
