"""Both Fisher types on inputs with a sequence dimension, against a brute-force Fisher.

A token-wise model (Linear → tanh → Linear on (N, L, d) inputs) with a token-mean cross-entropy
over the (N·L, C) logits: every token is one loss term, so the K-FAC factors average over the
N·L token rows, G = (1/(N·L)) Σ_{n,l} g gᵀ with g the gradient of that token's loss term. The
empirical Fisher uses the training labels (exact here); the Monte-Carlo Fisher's expectation
over sampled labels is E[g gᵀ] = diag(p) − p pᵀ at the logits. Both must have the same scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd_ext import SPNGD

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("float64_default", "one_thread"),
]

N, L, D, H, C = 5, 7, 4, 6, 3


def _model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))
    x = torch.randn(N, L, D)
    y = torch.randint(0, C, (N, L))
    return model, x, y


def _step(model, opt, x, y) -> None:
    opt.zero_grad()
    logits = model(x).reshape(-1, C)
    opt.backward(F.cross_entropy(logits, y.reshape(-1)), logits)  # token mean
    opt.step()


def _brute_force_factors(model, x, y):
    """A and G of both layers from per-token gradients (tokens do not interact in this model)."""
    hidden = model[0](x)
    hidden.retain_grad()
    logits = model[2](model[1](hidden))
    logits.retain_grad()
    per_token = F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="none")
    per_token.sum().backward()  # a token's loss reaches only its own rows: these are per-token gradients
    rows = N * L
    ones = torch.ones(rows, 1)
    a0 = torch.cat([x.reshape(rows, D), ones], dim=1)
    a2 = torch.cat([model[1](hidden).detach().reshape(rows, H), ones], dim=1)
    g0 = hidden.grad.reshape(rows, H)
    g2 = logits.grad.reshape(rows, C)
    probs = torch.softmax(logits.detach().reshape(rows, C), dim=-1)
    mc_g2 = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]).mean(0)
    return {
        "0": {"A": a0.T @ a0 / rows, "G": g0.T @ g0 / rows},
        "2": {"A": a2.T @ a2 / rows, "G": g2.T @ g2 / rows},
    }, mc_g2


def test_empirical_fisher_on_token_rows_matches_brute_force():
    model, x, y = _model_and_batch()
    want, _ = _brute_force_factors(model, x, y)
    opt = SPNGD(model, lr=0.0, fisher="emp", damping=1e-3, backend="torch")
    _step(model, opt, x, y)
    got = opt.factors()
    for layer in ("0", "2"):
        for name in ("A", "G"):
            torch.testing.assert_close(
                got[layer][name], want[layer][name], rtol=1e-10, atol=1e-13, msg=f"{layer}.{name}"
            )


def test_monte_carlo_fisher_on_token_rows_has_the_same_scale():
    """The last layer's MC G converges to (1/(N·L)) Σ (diag(p) − p pᵀ), the expectation of the
    empirical G's summands over labels drawn from the model: one scale for both Fisher types."""
    model, x, y = _model_and_batch()
    _, mc_g2 = _brute_force_factors(model, x, y)
    opt = SPNGD(model, lr=0.0, fisher="mc", mc_samples=400, damping=1e-3, backend="torch", seed=0)
    _step(model, opt, x, y)
    got = opt.factors()["2"]["G"]
    rel = float((got - mc_g2).norm() / mc_g2.norm())
    assert rel < 0.05, rel  # 400 samples × 35 tokens: sampling error about 1 %


# ---- LayerNorm on token rows: per-token losses under both Fisher types ------------------------


def _layernorm_model_and_batch():
    """A token-wise LayerNorm → tanh → Linear with random affine parameters: a token's loss term
    depends on its own row only, so per-term gradients are exact from one backward per term."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.LayerNorm(D), nn.Tanh(), nn.Linear(D, C))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.uniform_(-0.5, 0.5)
    return model, torch.randn(N, L, D), torch.randint(0, C, (N, L))


def _layernorm_unit_jacobians(model, x):
    """(N·L, C_out, D, 2): ∂logit_k / ∂(γ_c, β_c) of every token row, by brute force."""
    norm = model[0]
    logits = model(x).reshape(-1, C)
    jac = []
    for r in range(N * L):
        per_class = []
        for k in range(C):
            gw, gb = torch.autograd.grad(logits[r, k], (norm.weight, norm.bias), retain_graph=True)
            per_class.append(torch.stack([gw, gb], dim=-1))
        jac.append(torch.stack(per_class))
    return torch.stack(jac), torch.softmax(logits.detach(), dim=-1)


def _as_stored(fisher):
    """(D, 2, 2) blocks as the stored (D, 3) = (γγ, γβ, ββ)."""
    return torch.stack([fisher[:, 0, 0], fisher[:, 0, 1], fisher[:, 1, 1]], dim=1)


def test_layernorm_empirical_fisher_is_the_per_token_fisher():
    """Token-mean loss, fisher='emp': each unit's F is (1/(N·L)) Σ_{n,l} ∇ℓ_{nl} ∇ℓ_{nl}ᵀ over the
    per-term gradients of (γ_c, β_c) (the scale of the Linear factors above), and the update solves
    with it."""
    model, x, y = _layernorm_model_and_batch()
    jac, probs = _layernorm_unit_jacobians(model, x)
    resid = probs - F.one_hot(y.reshape(-1), C)  # ∂ℓ_{nl}/∂logits
    per_term = torch.einsum("rk,rkci->rci", resid, jac)  # (N·L, D, 2)
    want = torch.einsum("rci,rcj->cij", per_term, per_term) / (N * L)
    grad = per_term.mean(0)  # ∇ of the token-mean loss, (D, 2)
    lam = 1e-3
    opt = SPNGD(model, lr=1.0, momentum=0.0, fisher="emp", damping=lam, backend="torch")
    before = [p.detach().clone() for p in model[0].parameters()]
    _step(model, opt, x, y)
    torch.testing.assert_close(opt.factors()["0"]["F"], _as_stored(want), rtol=1e-10, atol=1e-13)
    update = torch.linalg.solve(want + lam * torch.eye(2), grad.unsqueeze(-1)).squeeze(-1)
    moved = torch.stack([b - p.detach() for b, p in zip(before, model[0].parameters())], dim=-1)
    torch.testing.assert_close(moved, update, rtol=1e-8, atol=1e-10)


def test_layernorm_monte_carlo_fisher_has_the_same_scale():
    """fisher='mc' converges to (1/(N·L)) Σ Jᵀ (diag(p) − p pᵀ) J per unit, the expectation of the
    empirical F's summands over labels drawn from the model."""
    model, x, y = _layernorm_model_and_batch()
    jac, probs = _layernorm_unit_jacobians(model, x)
    cov = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    want = torch.einsum("rkci,rkl,rlcj->cij", jac, cov, jac) / (N * L)
    opt = SPNGD(model, lr=0.0, fisher="mc", mc_samples=400, damping=1e-3, backend="torch", seed=0)
    _step(model, opt, x, y)
    got, expected = opt.factors()["0"]["F"], _as_stored(want)
    rel = float((got - expected).norm() / expected.norm())
    assert rel < 0.05, rel
