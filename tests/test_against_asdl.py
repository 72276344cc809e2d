"""SP-NGD's curvature against an independent implementation: ASDL (``asdfghjkl==0.1a5``, ``import asdl``).

Both libraries see the same model (same initial weights), the same batch and the same Fisher type;
the comparison goes through ASDL's own public API (``asdl.FisherConfig`` + ``asdl.get_fisher_maker``,
``asdl.extend`` for input means, ``asdl.KfacGradientMaker`` for preconditioned gradients).

Mapping of conventions (read from asdl/fisher.py, asdl/operations/{operation,linear,conv,batchnorm}.py,
asdl/symmatrix.py, asdl/precondition/natural_gradient.py):

* ASDL's Fisher makers use a *sum*-reduced loss, so its output gradients are per-example
  gradients g_n = ∂ℓ_n/∂s_n — the same g_n as ours (N·∂(batch-mean loss)/∂s_n). Every statistic
  is multiplied by ``scale / data_size`` = 1/N, and A and B are *both* scaled by 1/N.
* **Bias**: ASDL's Kronecker ``A`` never contains the bias (``cov_kron_A`` is called on the raw
  inputs; ``extend_in_data`` is used only for the unit-wise shape); ASDL preconditions the bias
  with ``B⁻¹`` alone. Our A folds the bias as a trailing 1. So ours ``A[:d, :d]`` ↔ ASDL ``A``, and
  the bias row ``A[:d, d]`` ↔ the mean input (ASDL's ``OP_MEAN_INPUTS``), ``A[d, d] = 1``.
* **Conv2d** (T = H_out·W_out, ASDL's ``OP_OUT_SPATIAL_SIZE``): ASDL's ``cov_kron_A`` divides the
  patch Gram matrix by T and ``cov_kron_B`` does not; ours (KFC) does the opposite. Hence
  ``A_ours = T·A_asdl``, ``G_ours = B_asdl / T``; the bias row is ``T·mean_patch_asdl`` (ASDL's
  ``in_data_mean`` averages over positions and examples), ``A[d, d] = T``.
* **Linear**: ``A_ours[:d, :d] = A_asdl``, ``G_ours = B_asdl`` (no N² factor on either side).
* **BatchNorm** (unit-wise): ASDL recovers x̂ = (y − β)/γ and stores per channel the 2×2 block
  [[Σ(Σ_hw g x̂)², Σ(Σ g x̂)(Σ g)], [·, Σ(Σ_hw g)²]] / N; ours stores the same as (C, 3).
* **Damping**: ASDL's ``Kron.update_inv`` / ``cov_kron_damping`` uses the same π-factored Tikhonov
  damping (π² = (tr A/dim A)/(tr B/dim B), shifts √λ·π and √λ/π, clamped below at 1e-7 — inactive
  here) and BN uses (F_c + λI)⁻¹. The damped K-FAC update is invariant to moving T between the
  factors, so without biases the preconditioned gradients must agree exactly. With biases
  ASDL's block structure differs by design (bias outside A), so there we compare our update with
  a brute-force Kronecker solve built from ASDL's statistics mapped to our convention.
* **MC sampling**: ASDL draws ``Categorical(softmax(logits)).sample()`` from the global generator
  after ``torch.manual_seed(config.seed)``; we draw ``torch.multinomial(softmax, 1)`` from our own
  generator seeded with ``seed`` (rank 0). For a single draw both go through the same
  exponential-race kernel, so equal seeds give equal labels when the probabilities have the same
  dtype (our sampling runs in float32, hence a float32 model for that test). Independently of that
  implementation detail, our MC estimate averaged over many draws is compared with ASDL's
  FISHER_EXACT (a stated statistical tolerance).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import asdl
    from asdl import FisherConfig, KfacGradientMaker, PreconditioningConfig, get_fisher_maker
    from asdl.grad_maker import LOSS_CROSS_ENTROPY
    from asdl.matrices import FISHER_EMP, FISHER_EXACT, FISHER_MC, SHAPE_KRON, SHAPE_UNIT_WISE
    from asdl.operations.operation import OP_MEAN_INPUTS, OP_OUT_SPATIAL_SIZE

from steps import one_step_update

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
    pytest.mark.usefixtures("float64_default"),
]

N = 8


def _randomize_bn(model: nn.Module) -> None:
    """γ away from 1 (and from 0: ASDL divides by γ), β ≠ 0, so the BN mapping is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def make_mlp(bias: bool, seed: int = 11) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, 6, bias=bias),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 7, bias=bias),
        nn.Tanh(),
        nn.Linear(7, 4, bias=bias),
    )
    _randomize_bn(model)
    return model


def make_cnn(bias: bool, seed: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=bias),
        nn.BatchNorm2d(4),
        nn.ReLU(),  # T = 36
        nn.Conv2d(4, 3, 3, stride=2, bias=bias),
        nn.BatchNorm2d(3),
        nn.Tanh(),  # T = 4
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 5, bias=bias),
    )
    _randomize_bn(model)
    return model


def make_batch(kind: str, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(N, 5, generator=g)
        y = torch.randint(0, 4, (N,), generator=g)
    else:
        x = torch.randn(N, 2, 6, 6, generator=g)
        y = torch.randint(0, 5, (N,), generator=g)
    return x, y


MAKERS = {"mlp": make_mlp, "cnn": make_cnn}
_SHAPES = [(nn.BatchNorm1d, SHAPE_UNIT_WISE), (nn.BatchNorm2d, SHAPE_UNIT_WISE), SHAPE_KRON]


# ------------------------------------------------------------------------------------------ ASDL side
def asdl_fisher(model: nn.Module, x, y, fisher_type: str, seed: int | None = None) -> dict:
    """ASDL's K-FAC factors (A, B) and BN unit-wise blocks, by module name."""
    config = FisherConfig(
        fisher_type=fisher_type, fisher_shapes=_SHAPES, loss_type=LOSS_CROSS_ENTROPY, data_size=x.shape[0], seed=seed
    )
    maker = get_fisher_maker(model, config)
    dummy_y = maker.setup_model_call(model, x)
    maker.setup_loss_call(F.cross_entropy, dummy_y, y)
    maker.forward_and_backward()
    out = {}
    for name, m in model.named_modules():
        fisher = getattr(m, "fisher", None)
        if fisher is None:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"unit": fisher.unit.data.detach().clone()}
        else:
            out[name] = {"A": fisher.kron.A.detach().clone(), "B": fisher.kron.B.detach().clone()}
    maker.zero_fisher()
    return out


def asdl_input_stats(model: nn.Module, x) -> dict:
    """ASDL's mean input (patch) and output spatial size of each Linear/Conv2d."""
    with asdl.extend(
        model, (nn.Linear, OP_MEAN_INPUTS, OP_OUT_SPATIAL_SIZE), (nn.Conv2d, OP_MEAN_INPUTS, OP_OUT_SPATIAL_SIZE)
    ) as cxt:
        with torch.no_grad():
            model(x)
        stats = {}
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                stats[name] = (cxt.mean_in_data(m).detach().clone(), int(cxt.out_spatial_size(m)))
    return stats


def asdl_in_our_convention(model: nn.Module, x, asdl_stats: dict) -> dict:
    """ASDL's statistics mapped to our A (bias folded), G and BN (C, 3) layout (module docstring)."""
    inputs = asdl_input_stats(model, x)
    mapped = {}
    for name, m in model.named_modules():
        if name not in asdl_stats:
            continue
        s = asdl_stats[name]
        if "unit" in s:
            u = s["unit"]
            mapped[name] = {"F": torch.stack([u[:, 0, 0], u[:, 0, 1], u[:, 1, 1]], dim=1)}
            continue
        mean_in, T = inputs[name]
        A = T * s["A"]
        if m.bias is not None:
            d = A.shape[0]
            full = torch.empty(d + 1, d + 1)
            full[:d, :d] = A
            full[:d, d] = T * mean_in
            full[d, :d] = T * mean_in
            full[d, d] = float(T)
            A = full
        mapped[name] = {"A": A, "G": s["B"] / T}
    return mapped


# ------------------------------------------------------------------------------------------ our side


def _check_factors(ours: dict, ref: dict, rtol: float, atol: float) -> None:
    assert set(ours) == set(ref), f"layers differ: ours {sorted(ours)} vs ASDL {sorted(ref)}"
    for name in ref:
        assert set(ours[name]) == set(ref[name]), name
        for key in ref[name]:
            torch.testing.assert_close(
                ours[name][key], ref[name][key], rtol=rtol, atol=atol, msg=lambda m, n=name, k=key: f"{n}.{k}: {m}"
            )


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bias", [True, False])
def test_empirical_fisher_factors_match_asdl(kind, bias):
    x, y = make_batch(kind)
    ref_model = MAKERS[kind](bias)
    ref = asdl_in_our_convention(ref_model, x, asdl_fisher(ref_model, x, y, FISHER_EMP))
    opt, _, _ = one_step_update(MAKERS[kind](bias), x, y, "emp")
    _check_factors(opt.factors(), ref, rtol=1e-10, atol=1e-12)


def test_conv_spatial_scaling_is_not_trivially_one():
    """The conv mapping above relies on T; make sure the test models really have T > 1 and that
    ASDL's raw A differs from ours by exactly that T (so a wrong T would be caught)."""
    x, y = make_batch("cnn")
    ref_model = make_cnn(False)
    raw = asdl_fisher(ref_model, x, y, FISHER_EMP)
    Ts = {name: T for name, (_, T) in asdl_input_stats(ref_model, x).items()}
    assert Ts == {"0": 36, "3": 4, "7": 1}
    opt, _, _ = one_step_update(make_cnn(False), x, y, "emp")
    ours = opt.factors()
    for name in ("0", "3"):
        ratio_a = torch.trace(ours[name]["A"]) / torch.trace(raw[name]["A"])
        ratio_g = torch.trace(raw[name]["B"]) / torch.trace(ours[name]["G"])
        assert math.isclose(float(ratio_a), Ts[name], rel_tol=1e-10)
        assert math.isclose(float(ratio_g), Ts[name], rel_tol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_mc_fisher_with_matched_sampling_matches_asdl(kind):
    """Same seed → same sampled labels (see module docstring) → same MC factors. float32 model."""
    torch.set_default_dtype(torch.float32)
    x, y = make_batch(kind)
    x = x.float()
    x = torch.cat([x] * 4)  # 32 examples: many draws, so a sampling mismatch cannot hide
    y = torch.cat([y] * 4)
    seed = 1234
    ref_model = MAKERS[kind](True)
    ref = asdl_in_our_convention(ref_model, x, asdl_fisher(ref_model, x, y, FISHER_MC, seed=seed))
    opt, _, _ = one_step_update(MAKERS[kind](True), x, y, "mc", seed=seed)
    _check_factors(opt.factors(), ref, rtol=2e-5, atol=1e-6)
    # a different seed draws different labels: the comparison above is sensitive to the draw
    other, _, _ = one_step_update(MAKERS[kind](True), x, y, "mc", seed=seed + 1)
    last = [n for n in ref if "G" in ref[n]][-1]
    assert not torch.allclose(other.factors()[last]["G"], ref[last]["G"], rtol=1e-3, atol=1e-5)


# Layers whose output gradient of example n depends on example n only, when BN is in training
# mode: the layers after the last BatchNorm, and that BatchNorm itself. For layers *before* a
# training-mode BatchNorm the batch statistics couple the examples: ASDL's FISHER_EXACT then labels
# every example with the same class c in one backward (weighted by √p_nc), which keeps cross-example
# terms that independent per-example sampling averages away, so the two are different quantities
# there. Those layers are compared with BatchNorm in eval mode instead, where examples decouple.
PER_EXAMPLE_IN_TRAIN_MODE = {"mlp": {"1", "3", "5"}, "cnn": {"4", "7"}}


def _bn_eval_with_running_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(99)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_mc_fisher_averages_to_asdl_exact_fisher(kind, bn_mode):
    """Our MC Fisher averaged over many draws ≈ ASDL's FISHER_EXACT (Σ_c p_c g_c g_cᵀ).

    The batch is the 8-example batch repeated R = 250 times (BatchNorm batch statistics are
    unchanged by repetition), with mc_samples = 4: 1000 independent label draws per distinct example
    at the cost of 4 backward passes. The relative Frobenius error of such a sample mean is a few
    percent; we allow 8 % and also require the MC estimate to be much closer to the exact Fisher
    than the empirical Fisher is (so the tolerance is not vacuous). float32 (the tolerance is
    statistical anyway, and float64 convolutions on CPU are an order of magnitude slower).
    """
    torch.set_default_dtype(torch.float32)
    x, y = make_batch(kind)
    reps = 250
    x, y = x.repeat(reps, *([1] * (x.dim() - 1))), y.repeat(reps)

    def build():
        model = MAKERS[kind](True)
        return _bn_eval_with_running_stats(model) if bn_mode == "eval" else model

    ref_model = build()
    exact = asdl_in_our_convention(ref_model, x, asdl_fisher(ref_model, x, y, FISHER_EXACT))
    mc, _, _ = one_step_update(build(), x, y, "mc", mc_samples=4, seed=7)
    emp, _, _ = one_step_update(build(), x, y, "emp")
    f_mc = {n: v for n, v in mc.factors().items() if v}
    f_emp = emp.factors()
    if bn_mode == "eval":  # eval-mode BatchNorm has no training statistics in SP-NGD
        exact = {n: v for n, v in exact.items() if "F" not in v}
        checked = set(exact)
    else:
        checked = PER_EXAMPLE_IN_TRAIN_MODE[kind]
    assert set(f_mc) == set(exact)
    for name, ref in exact.items():
        if "A" in ref:  # A does not depend on the labels: agreement to float32 rounding for every layer
            # (relative to the whole matrix: our conv A comes from shifted correlations, ASDL's from im2col,
            # both float32 sums over 2000 examples' positions in different orders; measured 2.5e-5 with
            # 1 thread and under 2e-5 with 2, so 1e-4 leaves rounding room and still fails any wrong A)
            err_a = float((f_mc[name]["A"] - ref["A"]).norm() / ref["A"].norm())
            assert err_a < 1e-4, f"{name}.A: {err_a:.2e} from ASDL's"
        if name not in checked:
            continue
        key = "G" if "G" in ref else "F"
        err_mc = float((f_mc[name][key] - ref[key]).norm() / ref[key].norm())
        err_emp = float((f_emp[name][key] - ref[key]).norm() / ref[key].norm())
        assert err_mc < 0.08, f"{name}.{key}: MC vs exact Fisher off by {err_mc:.3f}"
        assert err_mc < 0.5 * err_emp, f"{name}.{key}: MC ({err_mc:.3f}) not closer to exact than emp ({err_emp:.3f})"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("lam", [1e-3, 1e-1])
def test_preconditioned_update_matches_asdl_kfac_without_bias(kind, lam):
    """Without biases ASDL's K-FAC blocks and ours are the same model of the Fisher (up to the
    factor T moved between A and G, which π-damping cancels): the updates agree."""
    x, y = make_batch(kind)
    ref_model = MAKERS[kind](False)
    maker = KfacGradientMaker(
        ref_model, PreconditioningConfig(data_size=x.shape[0], damping=lam), fisher_type=FISHER_EMP
    )
    dummy_y = maker.setup_model_call(ref_model, x)
    maker.setup_loss_call(F.cross_entropy, dummy_y, y)
    maker.forward_and_backward()
    ref_update = {n: p.grad.detach().clone() for n, p in ref_model.named_parameters()}

    _, grads, update = one_step_update(MAKERS[kind](False), x, y, "emp", damping=lam)
    assert set(update) == set(ref_update)
    for n in ref_update:
        # the update really is preconditioned (differs from the plain gradient)
        assert not torch.allclose(ref_update[n], grads[n], rtol=1e-3)
        torch.testing.assert_close(update[n], ref_update[n], rtol=1e-8, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_preconditioned_update_with_bias_matches_bruteforce_from_asdl_statistics(kind):
    """With biases ASDL preconditions the bias with B⁻¹ only, so its update is not ours by design.
    Build U = (Ĝ ⊗ Â)⁻¹ vec[∇W | ∇b] by brute force from ASDL's statistics in our convention
    (π-damped), and (F_c + λI)⁻¹ ∇ for BN, and compare with our step."""
    lam = 1e-2
    x, y = make_batch(kind)
    ref_model = MAKERS[kind](True)
    mapped = asdl_in_our_convention(ref_model, x, asdl_fisher(ref_model, x, y, FISHER_EMP))
    model = MAKERS[kind](True)
    _, grads, update = one_step_update(model, x, y, "emp", damping=lam)
    for name, stats in mapped.items():
        if "F" in stats:
            Fc = stats["F"]
            blocks = torch.stack([torch.stack([Fc[:, 0], Fc[:, 1]], -1), torch.stack([Fc[:, 1], Fc[:, 2]], -1)], -2)
            rhs = torch.stack([grads[f"{name}.weight"], grads[f"{name}.bias"]], dim=1).unsqueeze(-1)
            U = torch.linalg.solve(blocks + lam * torch.eye(2), rhs).squeeze(-1)
            torch.testing.assert_close(update[f"{name}.weight"], U[:, 0], rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(update[f"{name}.bias"], U[:, 1], rtol=1e-8, atol=1e-10)
            continue
        A, G = stats["A"], stats["G"]
        pi = math.sqrt((float(torch.trace(A)) / A.shape[0]) / (float(torch.trace(G)) / G.shape[0]))
        Ad = A + pi * math.sqrt(lam) * torch.eye(A.shape[0])
        Gd = G + math.sqrt(lam) / pi * torch.eye(G.shape[0])
        grad = torch.cat([grads[f"{name}.weight"].reshape(G.shape[0], -1), grads[f"{name}.bias"][:, None]], dim=1)
        U = torch.linalg.solve(torch.kron(Gd, Ad), grad.reshape(-1)).reshape(grad.shape)
        got = torch.cat([update[f"{name}.weight"].reshape(G.shape[0], -1), update[f"{name}.bias"][:, None]], dim=1)
        torch.testing.assert_close(got, U, rtol=1e-8, atol=1e-10, msg=lambda msg, n=name: f"{n}: {msg}")
