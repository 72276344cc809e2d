"""nn.MultiheadAttention's projections: F.linear calls captured by what is computed, their Kronecker
factors against a hand-written attention in float64, and the update against the Kronecker solve."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from steps import one_step_update
from torch import nn

from spngd_ext import SPNGD

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]


class _AttentionHead(nn.Module):
    def __init__(self, embed: int, heads: int, classes: int, **kw) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True, **kw)
        self.head = nn.Linear(embed, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.attn(x, x, x, need_weights=False)[0]).mean(1))


def _manual_attention(model: _AttentionHead, x: torch.Tensor):
    """The same forward written out: returns logits and the two projection outputs (grad retained)."""
    attn = model.attn
    n, length, e = x.shape
    h, d = attn.num_heads, e // attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    qkv.retain_grad()
    q, k, v = (t.reshape(n, length, h, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    ctx = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v).transpose(1, 2).reshape(n, length, e)
    out = F.linear(ctx, attn.out_proj.weight, attn.out_proj.bias)
    out.retain_grad()
    return model.head(torch.tanh(out).mean(1)), x, qkv, ctx, out


def _with_ones(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)


def test_in_and_out_projection_factors_and_update_match_the_written_out_attention():
    torch.manual_seed(0)
    model = _AttentionHead(4, 2, 3)
    x, y = torch.randn(3, 5, 4), torch.randint(0, 3, (3,))
    logits, _, qkv, ctx, out = _manual_attention(model, x)
    torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    F.cross_entropy(logits, y).backward()
    model.zero_grad()
    n, rows = x.shape[0], x.shape[0] * x.shape[1]
    refs = {
        "attn.in_proj": (_with_ones(x.reshape(rows, -1)), n * qkv.grad.reshape(rows, -1)),
        "attn.out_proj": (_with_ones(ctx.detach().reshape(rows, -1)), n * out.grad.reshape(rows, -1)),
    }
    lam = 1e-2
    opt, grads, deltas = one_step_update(model, x, y, damping=lam)
    est = opt.factors()
    assert {layer.name for layer in opt.layers} == {"attn.in_proj", "attn.out_proj", "head"}
    for name, (a, g) in refs.items():
        torch.testing.assert_close(est[name]["A"], a.T @ a / rows, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(est[name]["G"], g.T @ g / rows, rtol=1e-10, atol=1e-12)
    for name, (w, b) in {
        "attn.in_proj": ("attn.in_proj_weight", "attn.in_proj_bias"),
        "attn.out_proj": ("attn.out_proj.weight", "attn.out_proj.bias"),
    }.items():
        big_a, big_g = est[name]["A"], est[name]["G"]
        pi = math.sqrt((torch.trace(big_a) / big_a.shape[0]) / (torch.trace(big_g) / big_g.shape[0]))
        kron = torch.kron(
            big_g + math.sqrt(lam) / pi * torch.eye(big_g.shape[0]),
            big_a + pi * math.sqrt(lam) * torch.eye(big_a.shape[0]),
        )
        grad = torch.cat([grads[w], grads[b][:, None]], dim=1)
        expected = torch.linalg.solve(kron, grad.reshape(-1)).reshape(grad.shape)
        got = torch.cat([deltas[w], deltas[b][:, None]], dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_separate_qkv_weights_get_factors_and_their_bias_stays_first_order():
    torch.manual_seed(1)
    attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True)
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 6, 3), torch.randn(2, 6, 5)
    opt = SPNGD(attn, lr=0.1, momentum=0.0, fisher="emp", backend="torch")
    out = attn(q, k, v)[0].mean(1)
    loss = F.cross_entropy(out, torch.tensor([0, 1]))
    opt.backward(loss, out)
    opt.step()
    est = opt.factors()
    torch.testing.assert_close(est["<root>.k_proj"]["A"], k.reshape(-1, 3).T @ k.reshape(-1, 3) / 12)
    torch.testing.assert_close(est["<root>.v_proj"]["A"], v.reshape(-1, 5).T @ v.reshape(-1, 5) / 12)
    cov = {p.name: p for p in opt.coverage().parameters}
    assert cov["q_proj_weight"].curvature == "attention_linear"
    assert cov["in_proj_bias"].curvature == "first-order" and cov["in_proj_bias"].reason


def test_routing_is_removed_with_the_capture_and_leaves_f_linear_untouched():
    model = _AttentionHead(4, 2, 3)
    opt = SPNGD(model, lr=0.1, backend="torch", fisher="emp")
    x = torch.randn(2, 3, 4)
    plain = F.linear
    out = model(x)
    opt.backward(F.cross_entropy(out, torch.tensor([0, 2])), out)
    opt.step()
    assert F.linear is plain
    assert opt.factors()["attn.in_proj"]["A"].abs().sum() > 0  # the routed forward ran
    assert "forward" in model.attn.__dict__
    opt._capture.remove()
    assert "forward" not in model.attn.__dict__  # the module's own forward again
    assert torch.equal(model(x), model(x))


def test_a_deep_copy_of_the_model_gets_the_module_forward_bound_to_the_copy():
    """The routed forward is an instance attribute: copy.deepcopy gives the copy the module's own
    forward, bound to the copy, and the copy computes what the original does."""
    import copy

    torch.manual_seed(0)
    model = _AttentionHead(4, 2, 3)
    SPNGD(model, lr=0.1, backend="torch")
    x = torch.randn(2, 3, 4)
    clone = copy.deepcopy(model)
    forward = clone.attn.__dict__["forward"]
    assert forward.__self__ is clone.attn and forward.__func__ is nn.MultiheadAttention.forward
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    assert clone.attn.in_proj_weight is not model.attn.in_proj_weight
    assert model.attn.__dict__["forward"].router.attention is model.attn  # the original keeps its routing


def test_a_deep_copy_trained_beside_the_model_leaves_the_optimizer_alone():
    """An EMA-style copy made after SPNGD was built: its training forwards and backwards add nothing
    to the optimizer's statistics (factors equal a run without the copy), and a new SPNGD can be
    built on the copy."""
    import copy

    def run(with_copy: bool) -> dict:
        torch.manual_seed(0)
        model = _AttentionHead(4, 2, 3)
        opt = SPNGD(model, lr=0.1, backend="torch", fisher="emp")
        clone = copy.deepcopy(model)
        data = torch.Generator().manual_seed(1)
        for _ in range(2):
            x, y = torch.randn(2, 3, 4, generator=data), torch.randint(0, 3, (2,), generator=data)
            opt.zero_grad()
            out = model(x)
            if with_copy:
                F.cross_entropy(clone(x * 2), y).backward()
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
        if with_copy:
            SPNGD(clone, lr=0.1, backend="torch")
        return {f"{k}.{n}": t.clone() for k, v in opt.factors().items() for n, t in v.items()}

    alone, beside = run(False), run(True)
    assert alone.keys() == beside.keys() and "attn.in_proj.A" in alone
    for key, value in alone.items():
        torch.testing.assert_close(beside[key], value, rtol=0, atol=0, msg=key)


def test_a_forward_the_user_set_on_the_instance_is_kept_and_given_back():
    model = _AttentionHead(4, 2, 3)
    calls = []

    def own_forward(*args, **kwargs):
        calls.append(1)
        return nn.MultiheadAttention.forward(model.attn, *args, **kwargs)

    model.attn.forward = own_forward
    opt = SPNGD(model, lr=0.1, backend="torch", fisher="emp")
    out = model(torch.randn(2, 3, 4))
    opt.backward(F.cross_entropy(out, torch.tensor([0, 2])), out)
    opt.step()
    assert calls == [1] and opt.factors()["attn.out_proj"]["G"].abs().sum() > 0
    opt._capture.remove()
    assert model.attn.forward is own_forward


def test_cross_attention_with_a_packed_weight_warns_once_at_run_time():
    torch.manual_seed(2)
    attn = nn.MultiheadAttention(4, 2, batch_first=True)
    opt = SPNGD(attn, lr=0.1, momentum=0.0, fisher="emp", backend="torch")
    q, kv = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.warns(UserWarning, match=r"in_proj_weight is applied in slices"):
        out = attn(q, kv, kv)[0].mean(1)
    opt.backward(F.cross_entropy(out, torch.tensor([0, 1])), out)
    opt.step()
    assert "<root>.in_proj" not in opt.factors() or "A" not in opt.factors()["<root>.in_proj"]
    assert all(bool(torch.isfinite(p).all()) for p in attn.parameters())
