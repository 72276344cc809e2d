"""The first-use kernel guard (spngd_ext.kernel_guard), on the CPU.

A GPU is faked: the dispatch is told the extension is usable and that CPU tensors are on the
kernels' device, and the compiled ops (``torch.ops.spngd_ext.<op>``) are replaced by Python
callables: correct ones (the PyTorch path behind the raw op's signature), wrong ones (a small error
in the result) and raising ones. The guard must let the correct ones through, catch the others with
one warning naming the op, the device and the error, and leave results equal to the PyTorch path.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from fake_kernels import CORRECT, install_fake_gpu, raising, wrong

from spngd_ext import SPNGD, kernel_guard, ops
from spngd_ext.bench.models import small_bn_cnn


@pytest.fixture
def fake_gpu(monkeypatch):
    yield from install_fake_gpu(monkeypatch)


def _factor_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(21, generator=g), torch.randn(40, 6, generator=g).to(dtype)


def _guard_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, kernel_guard.KernelGuardWarning)]


def test_correct_kernel_is_used_without_warning(fake_gpu):
    calls = fake_gpu("accumulate_factor", CORRECT["accumulate_factor"])
    state, x = _factor_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ops.accumulate_factor(state, x, scale=0.5, decay=0.0)
        ops.accumulate_factor(state, x, scale=0.5, decay=0.9)
    assert not _guard_warnings(record)
    assert len(calls) == 2 + 2  # the check's two probes, then both calls on the kernel
    assert list(kernel_guard.verdicts().values()) == [None]
    assert kernel_guard.fallbacks() == []


@pytest.mark.parametrize("bad", ["wrong", "raising"])
def test_bad_kernel_falls_back_with_one_warning(fake_gpu, bad):
    calls = fake_gpu("accumulate_factor", wrong("accumulate_factor") if bad == "wrong" else raising)
    state, x = _factor_inputs()
    expect = state.clone()
    ops.accumulate_factor(expect, x, scale=0.5, decay=0.9, backend="torch")
    ops.accumulate_factor(expect, x, scale=0.5, decay=0.9, backend="torch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ops.accumulate_factor(state, x, scale=0.5, decay=0.9)
        ops.accumulate_factor(state, x, scale=0.5, decay=0.9)
    messages = _guard_warnings(record)
    assert len(messages) == 1, messages
    error = "relative error" if bad == "wrong" else "no kernel image is available"
    assert "accumulate_factor" in messages[0] and "on cpu" in messages[0] and error in messages[0]
    assert torch.equal(state, expect)  # the PyTorch path, bit for bit
    assert len(calls) == (2 if bad == "wrong" else 1)  # only the check ever reached the kernel
    (record_,) = kernel_guard.fallbacks()
    assert record_["op"] == "accumulate_factor" and record_["device"] == "cpu" and error in record_["error"]
    assert record_["inputs"] == ["float32 contiguous"]
    assert kernel_guard.fallback_count() == 1


@pytest.mark.parametrize("bad", ["wrong", "raising"])
def test_backend_cuda_raises_instead(fake_gpu, bad):
    fake_gpu("accumulate_factor", wrong("accumulate_factor") if bad == "wrong" else raising)
    state, x = _factor_inputs()
    error = "relative error" if bad == "wrong" else "no kernel image"
    for _ in range(2):  # the cached verdict raises again
        with pytest.raises(kernel_guard.KernelCheckError, match=f"accumulate_factor: .* on cpu: .*{error}"):
            ops.accumulate_factor(state, x, scale=0.5, decay=0.9, backend="cuda")
    assert kernel_guard.fallbacks() == []


def test_environment_variable_turns_the_guard_off(fake_gpu, monkeypatch):
    calls = fake_gpu("accumulate_factor", wrong("accumulate_factor"))
    monkeypatch.setenv(kernel_guard.ENV_VAR, "0")
    assert not kernel_guard.enabled()
    state, x = _factor_inputs()
    expect = state.clone()
    ops.accumulate_factor(expect, x, scale=0.5, decay=0.9, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernel_guard.KernelGuardWarning)
        ops.accumulate_factor(state, x, scale=0.5, decay=0.9)
    assert len(calls) == 1 and not torch.allclose(state, expect)  # the (wrong) kernel ran unchecked
    assert kernel_guard.verdicts() == {}


def test_one_check_per_op_device_dtype_and_layout(fake_gpu):
    calls = fake_gpu("accumulate_factor", CORRECT["accumulate_factor"])
    state, x = _factor_inputs()
    ops.accumulate_factor(state, x, scale=1.0, decay=0.5)
    ops.accumulate_factor(state, x, scale=1.0, decay=0.5)
    ops.accumulate_factor(state, x.to(torch.bfloat16), scale=1.0, decay=0.5)  # new dtype: checked
    ops.accumulate_factor(state, x.t().contiguous().t(), scale=1.0, decay=0.5)  # new layout: checked
    assert len(calls) == 3 * 2 + 4
    assert len(kernel_guard.verdicts()) == 3 and all(v is None for v in kernel_guard.verdicts().values())


def _op_inputs(op: str, layout: str = "contiguous") -> list[torch.Tensor]:
    """Real-looking tensors for the check of ``op`` (only their dtype, layout and device matter)."""
    z = torch.zeros
    if op == "pack_upper":
        return [z(5, 5), z(3, 3, dtype=torch.bfloat16)]
    if op == "unpack_upper":
        return [z(30)]
    if op == "accumulate_factor":
        return [z(10), z(3, 4) if layout == "contiguous" else z(4, 3).t()]
    if op == "conv_a_factor":
        x = z(2, 3, 5, 5)
        return [z(10), x if layout == "contiguous" else x.contiguous(memory_format=torch.channels_last)]
    if op == "cholesky_inverse_damped":
        return [z(2, 4, 4)]
    if op == "bn_unitwise_fisher":
        return [z(4, 3), z(2, 4, 3, 3), z(2, 4, 3, 3)]
    return [z(4, 3), z(4), z(4)]


CASES = [(op, "contiguous") for op in CORRECT] + [("accumulate_factor", "strided"), ("conv_a_factor", "channels_last")]


@pytest.mark.parametrize("op,layout", CASES)
def test_every_check_passes_a_correct_kernel_and_catches_a_wrong_one(fake_gpu, op, layout):
    """With tiny probes: no tensor a check hands the kernel has more than 500 elements."""
    tensors = _op_inputs(op, layout)
    calls = fake_gpu(op, CORRECT[op])
    rng = torch.get_rng_state()
    assert kernel_guard.check_op(op, tensors) is None
    assert torch.equal(torch.get_rng_state(), rng), "the check must not move the global generator"
    assert calls and max(calls) <= 500
    fake_gpu(op, wrong(op))
    error = kernel_guard.check_op(op, tensors)
    assert error is not None and ("relative error" in error or "flags" in error), error
    fake_gpu(op, raising)
    assert "no kernel image" in kernel_guard.check_op(op, tensors)


def test_non_finite_kernel_result_is_caught(fake_gpu):
    def nan_kernel(state, x, scale, decay):
        state.fill_(float("nan"))

    fake_gpu("accumulate_factor", nan_kernel)
    assert "non-finite" in kernel_guard.check_op("accumulate_factor", list(_factor_inputs()))


def _train(backend: str, steps: int = 3) -> tuple[dict, SPNGD]:
    torch.manual_seed(0)
    model = small_bn_cnn()
    g = torch.Generator().manual_seed(1)
    opt = SPNGD(model, lr=0.05, momentum=0.9, damping=1e-2, backend=backend, seed=2)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


def test_optimizer_with_bad_kernels_equals_the_torch_path(fake_gpu):
    """Every kernel wrong or raising: the optimizer's steps equal the PyTorch path's exactly, each
    op that fell back warned once, and opt.counters counts the fallbacks."""
    for i, op in enumerate(CORRECT):
        fake_gpu(op, wrong(op) if i % 2 == 0 else raising)
    expect, _ = _train("torch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, opt = _train("auto")
    for name in expect:
        assert torch.equal(got[name], expect[name]), name
    messages = _guard_warnings(record)
    fallen = kernel_guard.fallbacks()
    assert messages and len(messages) == len(fallen)
    assert {f["op"] for f in fallen} <= set(CORRECT) and len({f["op"] for f in fallen}) >= 3
    assert opt.counters["kernel_fallbacks"] == len(fallen)


def test_tracing_with_fake_tensors_skips_the_check(fake_gpu):
    """Fake tensors (torch.compile / shape propagation) have no values to compare: no check runs
    and nothing is cached, so the first real call is still checked."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = fake_gpu("accumulate_factor", wrong("accumulate_factor"))
    with FakeTensorMode(allow_non_fake_inputs=True):  # the PyTorch path caches real index tensors
        state, x = torch.empty(21), torch.empty(40, 6)
        ops.accumulate_factor(state, x, scale=1.0, decay=0.5)
    assert len(calls) == 1 and kernel_guard.verdicts() == {}
    state, x = _factor_inputs()
    with pytest.warns(kernel_guard.KernelGuardWarning, match="accumulate_factor"):
        ops.accumulate_factor(state, x, scale=1.0, decay=0.5)
