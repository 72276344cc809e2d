"""Bad input: every op and the optimizer raise ValueError/TypeError/RuntimeError naming the argument."""

from __future__ import annotations

import warnings

import pytest
import torch
from fault_helpers import (
    Net,
    all_finite,
    data,
    forward_backward,
    skip_test_optimizer,
    spngd_warnings,
    train,
)
from torch import nn

from spngd_ext import SPNGD, cuda_ops_available, extension_loaded, ops
from spngd_ext.ops.torch_path import packed_size

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ============================================================================ bad input: ops
def _s(n: int, **kw) -> torch.Tensor:
    return torch.zeros(packed_size(n), **kw)


def _x(*shape, **kw) -> torch.Tensor:
    return torch.randn(*shape, **kw)


_ACC = dict(scale=1.0, decay=0.0)
_CONV = dict(kernel_size=3, has_bias=False, scale=1.0, decay=0.0)
_BN = dict(scale=1.0, decay=0.0)
_MOM = dict(lr=0.1, momentum=0.9, weight_decay=0.0)

# (id, call, exception type, message regex): the message names the op and the argument.
BAD_OP_INPUTS = [
    # ---- pack_upper
    (
        "pack_upper-dtype",
        lambda: ops.pack_upper([torch.ones(2, 2, dtype=torch.int64)]),
        TypeError,
        r"pack_upper: mats\[0\] must be a floating",
    ),
    (
        "pack_upper-not-tensor",
        lambda: ops.pack_upper([[1.0, 2.0]]),
        TypeError,
        r"pack_upper: mats\[0\] must be a torch.Tensor",
    ),
    ("pack_upper-1d", lambda: ops.pack_upper([torch.ones(4)]), ValueError, r"pack_upper: mats\[0\] must be 2-D"),
    (
        "pack_upper-not-square",
        lambda: ops.pack_upper([torch.ones(2, 2), torch.ones(2, 3)]),
        ValueError,
        r"pack_upper: mats\[1\] must be square",
    ),
    (
        "pack_upper-devices",
        lambda: ops.pack_upper([torch.ones(2, 2), torch.ones(2, 2, device="meta")]),
        ValueError,
        r"pack_upper: all tensors must be on one device.*mats\[1\] on meta",
    ),
    (
        "pack_upper-out-dtype",
        lambda: ops.pack_upper([torch.ones(2, 2)], dtype=torch.int32),
        TypeError,
        r"pack_upper: dtype",
    ),
    (
        "pack_upper-backend",
        lambda: ops.pack_upper([torch.ones(2, 2)], backend="gpu"),
        ValueError,
        r"pack_upper: backend must be one of",
    ),
    # ---- unpack_upper
    (
        "unpack_upper-dtype",
        lambda: ops.unpack_upper(torch.ones(3, dtype=torch.int64), [2]),
        TypeError,
        r"unpack_upper: buffer must be a floating",
    ),
    (
        "unpack_upper-2d",
        lambda: ops.unpack_upper(torch.ones(3, 1), [2]),
        ValueError,
        r"unpack_upper: buffer must be 1-D",
    ),
    (
        "unpack_upper-too-short",
        lambda: ops.unpack_upper(torch.ones(5), [3]),
        ValueError,
        r"unpack_upper: buffer has 5 elements.*need 6",
    ),
    (
        "unpack_upper-offset",
        lambda: ops.unpack_upper(torch.ones(6), [3], offset=1),
        ValueError,
        r"unpack_upper: buffer has 6 elements.*offset 1 need 7",
    ),
    (
        "unpack_upper-negative-offset",
        lambda: ops.unpack_upper(torch.ones(6), [1], offset=-1),
        ValueError,
        r"unpack_upper: .*offset -1",
    ),
    (
        "unpack_upper-size",
        lambda: ops.unpack_upper(torch.ones(6), [0]),
        ValueError,
        r"unpack_upper: sizes must be positive",
    ),
    (
        "unpack_upper-scale-shape",
        lambda: ops.unpack_upper(torch.ones(6), [2, 1], scale=torch.ones(3)),
        ValueError,
        r"unpack_upper: scale must be",
    ),
    (
        "unpack_upper-devices",
        lambda: ops.unpack_upper(torch.ones(6), [2, 1], scale=torch.ones(2, device="meta")),
        ValueError,
        r"unpack_upper: all tensors must be on one device.*scale on meta",
    ),
    (
        "unpack_upper-out-dtype",
        lambda: ops.unpack_upper(torch.ones(3), [2], dtype=torch.int64),
        TypeError,
        r"unpack_upper: dtype",
    ),
    (
        "unpack_upper-backend",
        lambda: ops.unpack_upper(torch.ones(3), [2], backend="tpu"),
        ValueError,
        r"unpack_upper: backend must be one of",
    ),
    # ---- accumulate_factor
    (
        "accumulate_factor-x-dtype",
        lambda: ops.accumulate_factor(_s(2), torch.ones(4, 2, dtype=torch.int64), **_ACC),
        TypeError,
        r"accumulate_factor: x must be a floating",
    ),
    (
        "accumulate_factor-state-dtype",
        lambda: ops.accumulate_factor(_s(2, dtype=torch.bfloat16), _x(4, 2), **_ACC),
        TypeError,
        r"accumulate_factor: state must be float32 or float64",
    ),
    (
        "accumulate_factor-x-shape",
        lambda: ops.accumulate_factor(_s(2), _x(4, 2, 1), **_ACC),
        ValueError,
        r"accumulate_factor: x must be 2-D",
    ),
    (
        "accumulate_factor-state-size",
        lambda: ops.accumulate_factor(_s(3), _x(4, 2), **_ACC),
        ValueError,
        r"accumulate_factor: state must have 3 elements, got 6",
    ),
    (
        "accumulate_factor-state-layout",
        lambda: ops.accumulate_factor(torch.zeros(6)[::2], _x(4, 2), **_ACC),
        ValueError,
        r"accumulate_factor: state must be contiguous",
    ),
    (
        "accumulate_factor-state-none",
        lambda: ops.accumulate_factor(None, _x(4, 2), **_ACC),
        TypeError,
        r"accumulate_factor: state must be a torch.Tensor",
    ),
    (
        "accumulate_factor-devices",
        lambda: ops.accumulate_factor(_s(2), _x(4, 2, device="meta"), **_ACC),
        ValueError,
        r"accumulate_factor: all tensors must be on one device.*x on meta",
    ),
    (
        "accumulate_factor-backend",
        lambda: ops.accumulate_factor(_s(2), _x(4, 2), **_ACC, backend="numpy"),
        ValueError,
        r"accumulate_factor: backend must be one of",
    ),
    # ---- conv_a_factor
    (
        "conv_a_factor-x-dtype",
        lambda: ops.conv_a_factor(_s(9), torch.ones(1, 1, 4, 4, dtype=torch.int64), **_CONV),
        TypeError,
        r"conv_a_factor: x must be a floating",
    ),
    (
        "conv_a_factor-state-dtype",
        lambda: ops.conv_a_factor(_s(9, dtype=torch.float16), _x(1, 1, 4, 4), **_CONV),
        TypeError,
        r"conv_a_factor: state must be float32 or float64",
    ),
    (
        "conv_a_factor-x-shape",
        lambda: ops.conv_a_factor(_s(9), _x(1, 4, 4), **_CONV),
        ValueError,
        r"conv_a_factor: x must be 4-D",
    ),
    (
        "conv_a_factor-state-size",
        lambda: ops.conv_a_factor(_s(10), _x(1, 1, 4, 4), **_CONV),
        ValueError,
        r"conv_a_factor: state must have 45 elements",
    ),
    (
        "conv_a_factor-state-layout",
        lambda: ops.conv_a_factor(torch.zeros(90)[::2], _x(1, 1, 4, 4), **_CONV),
        ValueError,
        r"conv_a_factor: state must be contiguous",
    ),
    (
        "conv_a_factor-stride",
        lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), **_CONV, stride=0),
        ValueError,
        r"conv_a_factor: need kernel_size, stride",
    ),
    (
        "conv_a_factor-padding",
        lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), **_CONV, padding=-1),
        ValueError,
        r"conv_a_factor: need kernel_size.*padding >= 0",
    ),
    (
        "conv_a_factor-kernel-triple",
        lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), kernel_size=(3, 3, 3), has_bias=False, scale=1.0, decay=0.0),
        ValueError,
        r"conv_a_factor: kernel_size must be an int or a pair",
    ),
    (
        "conv_a_factor-kernel-too-big",
        lambda: ops.conv_a_factor(_s(9), _x(1, 1, 2, 2), **_CONV),
        ValueError,
        r"conv_a_factor: .*kernel",
    ),
    (
        "conv_a_factor-devices",
        lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4, device="meta"), **_CONV),
        ValueError,
        r"conv_a_factor: all tensors must be on one device.*x on meta",
    ),
    (
        "conv_a_factor-backend",
        lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), **_CONV, backend="x"),
        ValueError,
        r"conv_a_factor: backend must be one of",
    ),
    # ---- cholesky_inverse_damped
    (
        "cholesky_inverse_damped-dtype",
        lambda: ops.cholesky_inverse_damped(torch.eye(2, dtype=torch.bfloat16)[None], 1.0),
        TypeError,
        r"cholesky_inverse_damped: mats must be float32 or float64",
    ),
    (
        "cholesky_inverse_damped-int",
        lambda: ops.cholesky_inverse_damped(torch.ones(1, 2, 2, dtype=torch.int32), 1.0),
        TypeError,
        r"cholesky_inverse_damped: mats must be a floating",
    ),
    (
        "cholesky_inverse_damped-2d",
        lambda: ops.cholesky_inverse_damped(torch.eye(2), 1.0),
        ValueError,
        r"cholesky_inverse_damped: mats must be 3-D",
    ),
    (
        "cholesky_inverse_damped-not-square",
        lambda: ops.cholesky_inverse_damped(torch.ones(1, 2, 3), 1.0),
        ValueError,
        r"cholesky_inverse_damped: mats must be \(B, n, n\)",
    ),
    (
        "cholesky_inverse_damped-damping-shape",
        lambda: ops.cholesky_inverse_damped(torch.ones(2, 2, 2), torch.ones(3)),
        ValueError,
        r"cholesky_inverse_damped: damping must be a float or a \(2,\) tensor",
    ),
    (
        "cholesky_inverse_damped-devices",
        lambda: ops.cholesky_inverse_damped(torch.ones(2, 2, 2), torch.ones(2, device="meta")),
        ValueError,
        r"cholesky_inverse_damped: all tensors must be on one device.*damping on meta",
    ),
    (
        "cholesky_inverse_damped-backend",
        lambda: ops.cholesky_inverse_damped(torch.ones(2, 2, 2), 1.0, backend="cpu"),
        ValueError,
        r"cholesky_inverse_damped: backend must be one of",
    ),
    # ---- bn_unitwise_fisher
    (
        "bn_unitwise_fisher-dtype",
        lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), torch.ones(4, 3, dtype=torch.int64), _x(4, 3), **_BN),
        TypeError,
        r"bn_unitwise_fisher: grad_out must be a floating",
    ),
    (
        "bn_unitwise_fisher-state-dtype",
        lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3, dtype=torch.bfloat16), _x(4, 3), _x(4, 3), **_BN),
        TypeError,
        r"bn_unitwise_fisher: state must be a contiguous float32/float64",
    ),
    (
        "bn_unitwise_fisher-shapes",
        lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4, 3), _x(4, 2), **_BN),
        ValueError,
        r"bn_unitwise_fisher: grad_out and xhat must share one",
    ),
    (
        "bn_unitwise_fisher-1d",
        lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4), _x(4), **_BN),
        ValueError,
        r"bn_unitwise_fisher: grad_out and xhat must share one \(N, C, \*\) shape",
    ),
    (
        "bn_unitwise_fisher-state-shape",
        lambda: ops.bn_unitwise_fisher(torch.zeros(3, 2), _x(4, 3), _x(4, 3), **_BN),
        ValueError,
        r"bn_unitwise_fisher: state must be \(3, 3\)",
    ),
    (
        "bn_unitwise_fisher-state-layout",
        lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3).t(), _x(4, 3), _x(4, 3), **_BN),
        (TypeError, ValueError),
        r"bn_unitwise_fisher: state must be .*contiguous",
    ),
    (
        "bn_unitwise_fisher-state-none",
        lambda: ops.bn_unitwise_fisher(None, _x(4, 3), _x(4, 3), **_BN),
        TypeError,
        r"bn_unitwise_fisher: state must be a torch.Tensor",
    ),
    (
        "bn_unitwise_fisher-devices",
        lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4, 3), _x(4, 3, device="meta"), **_BN),
        ValueError,
        r"bn_unitwise_fisher: all tensors must be on one device.*xhat on meta",
    ),
    (
        "bn_unitwise_fisher-backend",
        lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4, 3), _x(4, 3), **_BN, backend="CUDA"),
        ValueError,
        r"bn_unitwise_fisher: backend must be one of",
    ),
    # ---- bn_unitwise_solve
    (
        "bn_unitwise_solve-dtype",
        lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), torch.ones(3, dtype=torch.int64), _x(3), damping=1.0),
        TypeError,
        r"bn_unitwise_solve: grad_gamma must be a floating",
    ),
    (
        "bn_unitwise_solve-fisher-shape",
        lambda: ops.bn_unitwise_solve(torch.zeros(3, 2), _x(3), _x(3), damping=1.0),
        ValueError,
        r"bn_unitwise_solve: fisher must be \(C, 3\)",
    ),
    (
        "bn_unitwise_solve-grad-shape",
        lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3), _x(2), damping=1.0),
        ValueError,
        r"bn_unitwise_solve: grad_beta must have 3 entries",
    ),
    (
        "bn_unitwise_solve-grad-2d",
        lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3, 1), _x(3), damping=1.0),
        ValueError,
        r"bn_unitwise_solve: grad_gamma must be 1-D",
    ),
    (
        "bn_unitwise_solve-devices",
        lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3, device="meta"), _x(3), damping=1.0),
        ValueError,
        r"bn_unitwise_solve: all tensors must be on one device.*grad_gamma on meta",
    ),
    (
        "bn_unitwise_solve-backend",
        lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3), _x(3), damping=1.0, backend=""),
        ValueError,
        r"bn_unitwise_solve: backend must be one of",
    ),
    # ---- precondition
    (
        "precondition-dtype",
        lambda: ops.precondition(torch.eye(2), torch.ones(2, 3, dtype=torch.int64), torch.eye(3)),
        TypeError,
        r"precondition: grad must be a floating",
    ),
    (
        "precondition-dims",
        lambda: ops.precondition(torch.eye(2), torch.ones(2, 3), torch.eye(3)[None]),
        ValueError,
        r"precondition: g_inv, grad, a_inv must all be 2-D or all 3-D",
    ),
    (
        "precondition-chain",
        lambda: ops.precondition(torch.eye(2), torch.ones(3, 3), torch.eye(3)),
        ValueError,
        r"precondition: shapes do not chain",
    ),
    (
        "precondition-g_inv-not-square",
        lambda: ops.precondition(torch.ones(4, 2), torch.ones(2, 3), torch.eye(3)),
        ValueError,
        r"precondition: .*g_inv",
    ),
    (
        "precondition-batch",
        lambda: ops.precondition(torch.eye(2).expand(2, 2, 2), torch.ones(3, 2, 3), torch.eye(3).expand(3, 3, 3)),
        ValueError,
        r"precondition: .*batch|precondition: shapes",
    ),
    (
        "precondition-devices",
        lambda: ops.precondition(torch.eye(2), torch.ones(2, 3, device="meta"), torch.eye(3)),
        ValueError,
        r"precondition: all tensors must be on one device.*grad on meta",
    ),
    # ---- kl_clip_coefficient / kl_clip_from_total (no backend argument)
    (
        "kl_clip_coefficient-kl_clip",
        lambda: ops.kl_clip_coefficient([torch.ones(2)], [torch.ones(2)], [0.1], 0.0),
        ValueError,
        r"kl_clip_coefficient: kl_clip must be > 0",
    ),
    (
        "kl_clip_coefficient-kl_clip-nan",
        lambda: ops.kl_clip_coefficient([torch.ones(2)], [torch.ones(2)], [0.1], float("nan")),
        ValueError,
        r"kl_clip_coefficient: kl_clip must be > 0",
    ),
    (
        "kl_clip_coefficient-lengths",
        lambda: ops.kl_clip_coefficient([torch.ones(2)], [torch.ones(2)] * 2, [0.1], 1.0),
        ValueError,
        r"kl_clip_coefficient: updates, grads and lrs must have one entry per layer",
    ),
    (
        "kl_clip_coefficient-shape",
        lambda: ops.kl_clip_coefficient([torch.ones(2)], [torch.ones(3)], [0.1], 1.0),
        ValueError,
        r"kl_clip_coefficient: .*(shape|grads\[0\])",
    ),
    (
        "kl_clip_coefficient-devices",
        lambda: ops.kl_clip_coefficient([torch.ones(2, device="meta")], [torch.ones(2)], [0.1], 1.0),
        ValueError,
        r"kl_clip_coefficient: all tensors must be on one device",
    ),
    (
        "kl_clip_from_total-kl_clip",
        lambda: ops.kl_clip_from_total(torch.tensor(1.0), -1.0),
        ValueError,
        r"kl_clip_from_total: kl_clip must be > 0",
    ),
    # ---- momentum_update (no backend argument)
    (
        "momentum_update-lengths",
        lambda: ops.momentum_update([torch.zeros(2)], [torch.ones(2)] * 2, [torch.zeros(2)], **_MOM),
        ValueError,
        r"momentum_update: .*same (length|number)",
    ),
    (
        "momentum_update-shape",
        lambda: ops.momentum_update([torch.zeros(2)], [torch.ones(3)], [torch.zeros(2)], **_MOM),
        ValueError,
        r"momentum_update: updates\[0\]",
    ),
    (
        "momentum_update-devices",
        lambda: ops.momentum_update([torch.zeros(2)], [torch.ones(2, device="meta")], [torch.zeros(2)], **_MOM),
        ValueError,
        r"momentum_update: all tensors must be on one device",
    ),
    (
        "momentum_update-buffer-device",
        lambda: ops.momentum_update([torch.zeros(2)], [torch.ones(2)], [torch.zeros(2, device="meta")], **_MOM),
        ValueError,
        r"momentum_update: all tensors must be on one device",
    ),
]


@pytest.mark.parametrize("call,exc,pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in BAD_OP_INPUTS])
def test_ops_reject_bad_input_with_a_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# every op that takes a backend: (name, valid CPU call taking backend=...)
BACKEND_OPS = {
    "pack_upper": lambda b: ops.pack_upper([torch.eye(2)], backend=b),
    "unpack_upper": lambda b: ops.unpack_upper(torch.ones(3), [2], backend=b),
    "accumulate_factor": lambda b: ops.accumulate_factor(_s(2), _x(4, 2), **_ACC, backend=b),
    "conv_a_factor": lambda b: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), **_CONV, backend=b),
    "cholesky_inverse_damped": lambda b: ops.cholesky_inverse_damped(torch.eye(2)[None], 1.0, backend=b),
    "bn_unitwise_fisher": lambda b: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4, 3), _x(4, 3), **_BN, backend=b),
    "bn_unitwise_solve": lambda b: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3), _x(3), damping=1.0, backend=b),
    "precondition": lambda b: ops.precondition(torch.eye(2), torch.ones(2, 3), torch.eye(3), backend=b),
}


@pytest.mark.parametrize("name", sorted(BACKEND_OPS))
def test_ops_reject_an_unknown_backend_string(name):
    for bad in ("gpu", "CUDA", "", None):
        with pytest.raises(ValueError, match=rf"{name}: backend must be one of"):
            BACKEND_OPS[name](bad)
    BACKEND_OPS[name]("torch")
    BACKEND_OPS[name]("auto")


@pytest.mark.skipif(cuda_ops_available(), reason="the CUDA kernels are usable here")
@pytest.mark.parametrize("name", sorted(BACKEND_OPS))
def test_ops_backend_cuda_without_kernels_raises_runtime_error(name):
    """backend='cuda' insists on the kernel: without the extension or a GPU, a RuntimeError naming the op."""
    with pytest.raises(RuntimeError, match=rf"{name}: backend='cuda'"):
        BACKEND_OPS[name]("cuda")


@pytest.mark.skipif(cuda_ops_available() or not extension_loaded(), reason="needs the extension built and no GPU")
def test_backend_cuda_error_says_the_gpu_is_missing_when_the_extension_is_built():
    """The extension is built and loaded here; only a GPU is missing. The error must say so rather
    than send the user to rebuild the extension."""
    with pytest.raises(RuntimeError) as info:
        ops.accumulate_factor(_s(2), _x(4, 2), **_ACC, backend="cuda")
    message = str(info.value)
    assert "not built" not in message and ("GPU" in message or "CUDA device" in message), message


# ============================================================================ bad input: optimizer
def test_model_without_supported_layers_warns_exactly_once():
    """(That it is then exactly momentum SGD: tests/test_optimizer_api.py::test_model_without_supported_layers_warns_and_is_plain_sgd.)"""

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.w

    model = Plain()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = SPNGD(model, lr=0.1, fisher="mc", seed=0)
        for x, y in data(3):
            forward_backward(model, opt, x, y)
            opt.step()
    msgs = spngd_warnings(record)
    assert len(msgs) == 1 and "no supported layer" in msgs[0], msgs
    assert opt.counters["steps"] == 3 and all_finite(model)


def test_layer_on_a_second_device_raises_value_error_naming_the_layer():
    model = Net(bn=False)
    model.fc2.to("meta")
    # Caught at construction, before any hook or buffer exists.
    with pytest.raises(ValueError, match=r"one device.*fc2.*meta"):
        SPNGD(model, fisher="emp", backend="torch")


def test_plain_parameter_on_a_second_device_raises_value_error_naming_it():
    """A parameter outside the supported layers on another device (meta) than the rest (cpu): a
    ValueError that names the parameter — not a message claiming the model was moved."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.stray_scale = nn.Parameter(torch.ones(3, device="meta"))

        def forward(self, x):
            return self.fc(x)

    model = Mixed()
    x, y = data(1)[0]
    with pytest.raises(ValueError, match=r"stray_scale") as info:
        opt = SPNGD(model, fisher="emp", backend="torch")
        forward_backward(model, opt, x, y)
        opt.step()
    assert "moved" not in str(info.value), str(info.value)


def test_parameter_frozen_mid_run_is_untouched_then_trains_again():
    model = Net()
    opt = skip_test_optimizer(model)
    batches = data(6)
    train(model, opt, batches[:2])
    frozen = [model.fc1.weight, model.bn.bias]
    for p in frozen:
        p.requires_grad_(False)
    kept = [p.detach().clone() for p in frozen]
    others = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, opt, batches[2:4])
    for p, k in zip(frozen, kept):
        assert p.grad is None and torch.equal(p, k), "a frozen parameter moved"
    assert all(not torch.equal(others[n], p) for n, p in model.named_parameters() if n in others), "the rest must train"
    for p in frozen:
        p.requires_grad_(True)
    train(model, opt, batches[4:])
    for p, k in zip(frozen, kept):
        assert not torch.equal(p, k), "an unfrozen parameter must train again"
    assert opt.counters["steps"] == 6 and opt.counters["skipped_steps"] == 0 and all_finite(model)


@pytest.mark.parametrize(
    "name,value",
    [
        # complements tests/test_optimizer_api.py::test_invalid_arguments_raise_value_error_naming_the_argument
        ("lr", float("inf")),
        ("lr", "0.1"),
        ("lr", True),
        ("momentum", float("nan")),
        ("weight_decay", float("inf")),
        ("damping", float("inf")),
        ("damping", float("nan")),
        ("damping", True),
        ("damping", "1e-3"),
        ("fisher", None),
        ("mc_samples", 1.5),
        ("mc_samples", True),
        ("curvature_interval", 2.0),
        ("inverse_interval", -1),
        ("inverse_interval", None),
        ("ema_decay", float("nan")),
        ("ema_decay", "0.9"),
        ("kl_clip", float("inf")),
        ("kl_clip", float("nan")),
        ("backend", None),
        ("backend", "CUDA"),
        ("stale", "yes"),
        ("stale", 1),
        ("stale", None),
        ("comm_dtype", torch.int8),
        ("comm_dtype", torch.float64),
        ("comm_dtype", "bf16"),
        ("max_inverse_retries", -1),
        ("max_inverse_retries", 1.5),
    ],
)
def test_out_of_range_hyperparameters_raise_value_error_at_construction(name, value):
    with pytest.raises(ValueError, match=name):
        SPNGD(Net(), **{name: value})


def test_rejected_construction_leaves_the_model_usable():
    """A constructor that raises must not leave hooks behind on the model (they would call into
    a half-built optimizer at the next forward)."""
    model = Net()
    with pytest.raises(ValueError, match="stale"):
        SPNGD(model, stale="yes")
    x, _ = data(1)[0]
    model(x)  # must not raise
    assert all(len(m._forward_hooks) == 0 for m in model.modules()), "hooks left on the model"


@pytest.mark.parametrize(
    "schedule,bad_step",
    [
        pytest.param(lambda s: 1e-3 if s < 2 else float("nan"), 2, id="nan"),
        pytest.param(lambda s: 1e-3 if s < 1 else 0.0, 1, id="zero"),
        pytest.param(lambda s: -1e-3, 0, id="negative"),
        pytest.param(lambda s: 1e-3 if s < 2 else float("inf"), 2, id="inf"),
        pytest.param(lambda s: None, 0, id="none"),
        pytest.param(lambda s: "1e-3", 0, id="string"),
    ],
)
def test_bad_damping_schedule_value_raises_value_error_naming_the_step(schedule, bad_step):
    model = Net()
    opt = SPNGD(model, damping=schedule, fisher="mc", seed=0, backend="torch")
    batches = data(bad_step + 1)
    train(model, opt, batches[:bad_step])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forward_backward(model, opt, *batches[bad_step])
    with pytest.raises(ValueError, match=rf"damping schedule returned .* at step {bad_step}"):
        opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "a rejected step moved the weights"


def test_backend_cuda_without_kernels_fails_at_construction():
    if cuda_ops_available():
        pytest.skip("the CUDA kernels are usable here")
    model = Net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="SPNGD: backend='cuda' but .*(not built|no CUDA GPU)"):
        SPNGD(model, backend="cuda", fisher="mc", seed=0)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules()), (
        "a failed construction left hooks"
    )
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.gpu
def test_backend_cuda_with_a_cpu_model_fails_at_construction():
    if not cuda_ops_available():
        pytest.skip("needs the CUDA kernels")
    with pytest.raises(
        ValueError, match="backend='cuda' needs the model on a CUDA device, but its parameters are on cpu"
    ):
        SPNGD(Net(), backend="cuda")
