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

# MultiheadAttention's packed projection and its out_proj are read by F.multi_head_attention_forward:
# no curvature type captures them yet, and the report must say so.
_MHA = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def _first_order(model: nn.Module) -> dict[str, str]:
    """The first-order parameters and their reasons; only MultiheadAttention may warn."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, coverage = classify(model)
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert bool(record) == has_mha, [str(w.message) for w in record]
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


def test_vit_b_16_reports_attention_and_tokens_as_first_order_with_reasons():
    model = torchvision.models.vit_b_16()
    gaps = _first_order(model)
    allowed = {"class_token", "encoder.pos_embedding"}
    for name, reason in gaps.items():
        assert name in allowed or name.endswith(_MHA), name
        assert reason, name
    assert sum(name.endswith("in_proj_weight") for name in gaps) == 12
    _, coverage = classify(model)
    kinds = {p.name: p.curvature for p in coverage.parameters}
    assert kinds["conv_proj.weight"] == "conv2d" and kinds["encoder.layers.encoder_layer_0.ln_1.weight"] == "layernorm"
    assert kinds["encoder.layers.encoder_layer_0.mlp.0.weight"] == "linear"


def test_mha_out_proj_is_not_registered_as_a_layer_whose_hooks_never_fire():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.warns(UserWarning, match=r"SPNGD: self_attn.out_proj .*functional API"):
        layers, coverage = classify(layer)
    assert "self_attn.out_proj" not in [lay.name for lay in layers]
    by_name = {p.name: p for p in coverage.parameters}
    assert by_name["self_attn.out_proj.weight"].curvature == "first-order"
    assert "functional" in by_name["self_attn.in_proj_weight"].reason
    assert by_name["norm1.weight"].curvature == "layernorm" and by_name["linear1.weight"].curvature == "linear"


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
