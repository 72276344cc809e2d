"""nn.Embedding: diagonal A (token frequencies) and G from per-example output gradients, and the
update Â⁻¹∇WĜ⁻¹ against the explicit Kronecker solve, in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from steps import one_step_update
from torch import nn

from spngd_ext import SPNGD

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]


class _Tokens(nn.Module):
    def __init__(self, vocab: int, dim: int, length: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.head = nn.Linear(length * dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens)).flatten(1))


def _reference(model: _Tokens, tokens: torch.Tensor, y: torch.Tensor, pad: int | None):
    """A (V,) and G (D×D) from per-example output gradients (one backward per example)."""
    rows_g, rows_t = [], []
    for n in range(tokens.shape[0]):
        store = {}

        def hook(mod, inp, out, store=store):
            out.register_hook(lambda g: store.__setitem__("g", g.detach().clone()))

        h = model.emb.register_forward_hook(hook)
        F.cross_entropy(model(tokens[n : n + 1]), y[n : n + 1]).backward()
        h.remove()
        model.zero_grad()
        rows_g.append(store["g"][0])
        rows_t.append(tokens[n])
    g, t = torch.cat(rows_g), torch.cat(rows_t)
    if pad is not None:
        g, t = g[t != pad], t[t != pad]
    vocab = model.emb.num_embeddings
    return torch.bincount(t, minlength=vocab).double() / t.numel(), g.T @ g / t.numel()


@pytest.mark.parametrize("pad", [None, 0])
def test_embedding_factors_and_update_match_bruteforce(pad):
    torch.manual_seed(0)
    model = _Tokens(vocab=7, dim=3, length=4, padding_idx=pad)
    tokens, y = torch.randint(0, 7, (5, 4)), torch.randint(0, 3, (5,))
    tokens[0, 0] = 0  # a padding row when pad=0
    lam = 1e-2
    a_ref, g_ref = _reference(model, tokens, y, pad)
    opt, grads, deltas = one_step_update(model, tokens, y, damping=lam)
    est = opt.factors()["emb"]
    torch.testing.assert_close(est["A"], a_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est["G"], g_ref, rtol=1e-10, atol=1e-12)
    pi = math.sqrt((a_ref.sum() / 7) / (torch.trace(g_ref) / 3))
    kron = torch.kron(torch.diag(a_ref + pi * math.sqrt(lam)), g_ref + math.sqrt(lam) / pi * torch.eye(3))
    expected = torch.linalg.solve(kron, grads["emb.weight"].reshape(-1)).reshape(7, 3)
    torch.testing.assert_close(deltas["emb.weight"], expected, rtol=1e-8, atol=1e-10)
    if pad is not None:
        assert torch.equal(deltas["emb.weight"][pad], torch.zeros(3))


def test_embedding_under_adaptive_refresh_measures_its_change():
    """The diagonal A (7 entries, not a packed matrix) takes part in the change measurement."""
    torch.manual_seed(1)
    model = _Tokens(vocab=7, dim=3, length=4)
    opt = SPNGD(model, lr=0.1, fisher="emp", backend="torch", stale=True)
    for _ in range(3):
        tokens, y = torch.randint(0, 7, (5, 4)), torch.randint(0, 3, (5,))
        opt.zero_grad()
        out = model(tokens)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert opt.coverage().by_kind()["embedding"] == 21


def test_sparse_embedding_warns_naming_it_and_trains_first_order():
    model = nn.Sequential(nn.Embedding(5, 2, sparse=True), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"SPNGD: 0 \(Embedding; parameters weight\).*sparse"):
        opt = SPNGD(model, lr=0.1, backend="torch")
    assert [layer.name for layer in opt.layers] == ["2"]
    # It trains (a sparse gradient must not stop a step): the first step is plain SGD on it.
    x, y = torch.tensor([[0, 3], [3, 1], [4, 4]]), torch.tensor([0, 1, 1])
    for k in range(3):
        before = model[0].weight.detach().clone()
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        grad = model[0].weight.grad.to_dense()
        opt.step()
        if k == 0:
            torch.testing.assert_close(model[0].weight.detach(), before - 0.1 * grad)
    assert opt.counters["steps"] == 3 and opt.counters["skipped_steps"] == 0
