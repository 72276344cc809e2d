"""The compiled extension on a machine without a GPU: it loads, declares the expected schemas
(mutation annotations included), every tensor op has a CUDA kernel, a CPU kernel (the C++ argument
checks, then the pure-PyTorch path) and a fake, and the fakes let tracing run through every op (and
through the spngd_ext.ops call sites). tests/test_opcheck.py runs torch.library.opcheck on them.

Skipped when spngd_ext._C is not built; with SPNGD_REQUIRE_EXTENSION=1 a missing extension fails.
FakeTensorMode creates fake CUDA tensors without a GPU, so the CUDA dispatch path is traced here.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from op_error_cases import child_command, error_cases
from torch._subclasses.fake_tensor import FakeTensorMode

from spngd_ext import ops as ops_py
from spngd_ext.ops import dispatch as ops_dispatch
from spngd_ext.ops import extension as _extension

REQUIRED = os.environ.get("SPNGD_REQUIRE_EXTENSION", "") not in ("", "0")

EXPECTED_SCHEMAS = {
    "pack_upper": "spngd_ext::pack_upper(Tensor[] mats, ScalarType? dtype) -> Tensor",
    "unpack_upper": "spngd_ext::unpack_upper(Tensor buffer, int[] sizes, Tensor scale, int offset, "
    "ScalarType dtype) -> Tensor[]",
    "accumulate_factor": "spngd_ext::accumulate_factor(Tensor(a!) state, Tensor x, float scale, float decay) -> ()",
    "conv_a_factor": "spngd_ext::conv_a_factor(Tensor(a!) state, Tensor x, int[] kernel_size, int[] stride, "
    "int[] padding, int[] dilation, bool has_bias, float scale, float decay) -> ()",
    "cholesky_inverse_damped": "spngd_ext::cholesky_inverse_damped(Tensor mats, Tensor damping) -> (Tensor, Tensor)",
    "bn_unitwise_fisher": "spngd_ext::bn_unitwise_fisher(Tensor(a!) state, Tensor grad_out, Tensor xhat, "
    "float scale, float decay) -> ()",
    "bn_unitwise_solve": "spngd_ext::bn_unitwise_solve(Tensor fisher, Tensor grad_gamma, Tensor grad_beta, "
    "float damping) -> (Tensor, Tensor)",
    "cholesky_kernel_max_n": "spngd_ext::cholesky_kernel_max_n(int n=-1) -> int",
}
TENSOR_OPS = sorted(set(EXPECTED_SCHEMAS) - {"cholesky_kernel_max_n"})
# Each tensor op's argument checks alone, as an op: its schema with no mutation and no result.
EXPECTED_SCHEMAS.update(
    {
        f"_check_{name}": EXPECTED_SCHEMAS[name]
        .replace(f"::{name}(", f"::_check_{name}(")
        .replace("Tensor(a!)", "Tensor")
        .rsplit(" -> ", 1)[0]
        + " -> ()"
        for name in TENSOR_OPS
    }
)


@pytest.fixture(scope="module")
def kernels():
    if not _extension.extension_loaded():
        reason = f"spngd_ext._C is not loaded: {_extension.extension_error()}"
        if REQUIRED:
            pytest.fail(reason + " (SPNGD_REQUIRE_EXTENSION=1)")
        pytest.skip(reason)
    return torch.ops.spngd_ext


def test_extension_loads(kernels):
    import spngd_ext._C  # noqa: F401  (importable as a module, as setup.py/CMake build it)

    assert _extension.extension_error() is None


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMAS))
def test_schema(kernels, name):
    assert str(getattr(kernels, name).default._schema) == EXPECTED_SCHEMAS[name]


def test_no_unexpected_ops(kernels):
    declared = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("spngd_ext::")}
    assert declared == set(EXPECTED_SCHEMAS)


def test_cholesky_threshold_knob(kernels):
    old = kernels.cholesky_kernel_max_n(-1)
    assert old >= 0
    assert kernels.cholesky_kernel_max_n(17) == old
    assert kernels.cholesky_kernel_max_n() == 17
    kernels.cholesky_kernel_max_n(old)


def _valid_cpu_calls(kernels) -> dict:
    """One call per tensor op with arguments that pass every check, on CPU tensors; each returns the
    op's outputs, or for an accumulating op (which returns nothing) the state it updated in place."""
    x = torch.arange(20.0).reshape(5, 4) / 7

    def updated(op, state, *args):
        assert op(state, *args) is None
        return state

    return {
        "pack_upper": lambda: kernels.pack_upper([torch.eye(3)], None),
        "unpack_upper": lambda: kernels.unpack_upper(torch.arange(6.0), [3], torch.ones(1), 0, torch.float32),
        "accumulate_factor": lambda: updated(kernels.accumulate_factor, torch.ones(10), x, 1.0, 0.5),
        "conv_a_factor": lambda: updated(
            kernels.conv_a_factor,
            torch.full((45,), float("nan")),  # decay 0 overwrites
            x.reshape(1, 1, 5, 4),
            [3, 3],
            [1, 1],
            [0, 0],
            [1, 1],
            False,
            1.0,
            0.0,
        ),
        "cholesky_inverse_damped": lambda: kernels.cholesky_inverse_damped(
            (torch.eye(3) * 3).expand(2, 3, 3).contiguous(), torch.ones(2)
        ),
        "bn_unitwise_fisher": lambda: updated(
            kernels.bn_unitwise_fisher,
            torch.full((3, 3), float("nan")),
            x[:, :3].contiguous(),
            x[:, 1:].contiguous(),
            1.0,
            0.0,
        ),
        "bn_unitwise_solve": lambda: kernels.bn_unitwise_solve(torch.ones(3, 3), torch.ones(3), torch.zeros(3), 0.0),
    }


@pytest.mark.parametrize("name", TENSOR_OPS)
def test_every_tensor_op_has_cpu_cuda_and_fake_registrations(kernels, name):
    for key in ("CPU", "CUDA", "Meta"):  # Meta: the fake, which FakeTensorMode and torch.compile run
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"spngd_ext::{name}", key), (name, key)
    # The check-only op has one implementation for every backend (and no kernel of its own).
    check = f"spngd_ext::_check_{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(check, "CompositeImplicitAutograd"), check
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(check, "CPU"), check
    assert name in _valid_cpu_calls(kernels)  # and test_cpu_kernel_computes_the_pytorch_path calls it


def _expected_cpu_result(name: str) -> list[torch.Tensor]:
    """What the valid call of ``name`` gives, computed here from the definitions (float64)."""
    x = torch.arange(20.0, dtype=torch.float64).reshape(5, 4) / 7
    triu = torch.triu_indices
    if name == "pack_upper":
        return [torch.tensor([1.0, 0, 0, 1, 0, 1])]
    if name == "unpack_upper":
        return [torch.tensor([[0.0, 1, 2], [1, 3, 4], [2, 4, 5]])]
    if name == "accumulate_factor":
        gram = x.T @ x
        return [0.5 + gram[triu(4, 4)[0], triu(4, 4)[1]]]
    if name == "conv_a_factor":
        patches = torch.nn.functional.unfold(x.reshape(1, 1, 5, 4), 3)[0].T  # (6 patches, 9)
        gram = patches.T @ patches
        return [gram[triu(9, 9)[0], triu(9, 9)[1]]]
    if name == "cholesky_inverse_damped":
        return [torch.eye(3).expand(2, 3, 3) / 4, torch.zeros(2, dtype=torch.int32)]
    if name == "bn_unitwise_fisher":
        g, xh = x[:, :3], x[:, 1:]
        ug, ub = g * xh, g
        return [torch.stack([(ug * ug).sum(0), (ug * ub).sum(0), (ub * ub).sum(0)], dim=1)]
    # bn_unitwise_solve: [[1, 1], [1, 1]] is singular, so every channel keeps its gradient.
    return [torch.ones(3), torch.zeros(3)]


@pytest.mark.parametrize("name", TENSOR_OPS)
def test_cpu_kernel_computes_the_pytorch_path(kernels, name):
    """Valid arguments on CPU tensors: the op computes (in place for the accumulating ops) what its
    definition says, in the output dtype and layout of the CUDA kernel."""
    out = _valid_cpu_calls(kernels)[name]()
    out = list(out) if isinstance(out, (tuple, list)) else [out]
    expect = _expected_cpu_result(name)
    assert len(out) == len(expect)
    for got, want in zip(out, expect):
        assert got.dtype == (torch.int32 if want.dtype == torch.int32 else torch.float32), (name, got.dtype)
        assert got.is_contiguous() and got.shape == want.shape, (name, got.shape)
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", TENSOR_OPS)
def test_cpu_kernel_runs_the_cpp_checks_first(kernels, name):
    """An invalid CPU call fails in the C++ check (its message format: ``spngd_ext::<op>: ...``
    and sizes printed as [a, b]) before the PyTorch path runs, and the check op alone says the same."""
    bad = {
        "pack_upper": ([torch.zeros(3, 4)], None),
        "unpack_upper": (torch.zeros(2, 3), [2], torch.ones(1), 0, torch.float32),
        "accumulate_factor": (torch.zeros(10), torch.zeros(1, 10, 4), 1.0, 0.0),
        "conv_a_factor": (torch.zeros(44), torch.zeros(1, 1, 4, 4), [3, 3], [1, 1], [0, 0], [1, 1], False, 1.0, 0.0),
        "cholesky_inverse_damped": (torch.zeros(2, 3, 4), torch.zeros(2)),
        "bn_unitwise_fisher": (torch.zeros(3, 2), torch.zeros(2, 3), torch.zeros(2, 3), 1.0, 0.0),
        "bn_unitwise_solve": (torch.zeros(3, 2), torch.zeros(3), torch.zeros(3), 0.0),
    }[name]
    with pytest.raises(ValueError, match=rf"^spngd_ext::{name}: .*\[\d+(, \d+)*\]") as from_op:
        getattr(kernels, name)(*bad)
    with pytest.raises(ValueError) as from_check:
        getattr(kernels, f"_check_{name}")(*bad)
    assert str(from_op.value) == str(from_check.value)


def test_argument_checks_on_cpu(kernels):
    """Every C++ argument check that is not about the device (tests/op_error_cases.py) raises the
    right exception, naming the argument, through the CPU kernel. In a child process, so a
    crash in an error path fails this test and names the case."""
    proc = subprocess.run(child_command("cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "all error cases raised" in proc.stdout, (
        f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    ran = [line for line in proc.stdout.splitlines() if line.startswith("case: ")]
    cpu_cases = [c for c in error_cases(None, "cpu") if not c.needs_cuda]
    assert len(ran) == len(cpu_cases) >= 25


def _fake(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def test_fake_shapes_and_dtypes(kernels):
    with FakeTensorMode():
        out = kernels.pack_upper([_fake(3, 3), _fake(5, 5, dtype=torch.bfloat16)], torch.float16)
        assert out.shape == (6 + 15,) and out.dtype == torch.float16 and out.device.type == "cuda"
        assert kernels.pack_upper([_fake(4, 4, dtype=torch.float64)], None).dtype == torch.float64

        mats = kernels.unpack_upper(_fake(30), [3, 4], _fake(2), 2, torch.bfloat16)
        assert [tuple(m.shape) for m in mats] == [(3, 3), (4, 4)] and all(m.dtype == torch.bfloat16 for m in mats)

        state = _fake(10)
        assert kernels.accumulate_factor(state, _fake(7, 4, dtype=torch.bfloat16), 1.0, 0.0) is None
        assert (
            kernels.conv_a_factor(
                _fake(28 * 29 // 2), _fake(2, 3, 8, 8), [3, 3], [1, 1], [1, 1], [1, 1], True, 1.0, 0.5
            )
            is None
        )

        inv, info = kernels.cholesky_inverse_damped(_fake(6, 9, 9, dtype=torch.float64), _fake(6, dtype=torch.float64))
        assert (
            inv.shape == (6, 9, 9) and inv.dtype == torch.float64 and info.shape == (6,) and info.dtype == torch.int32
        )

        assert kernels.bn_unitwise_fisher(_fake(5, 3), _fake(4, 5, 2, 2), _fake(4, 5, 2, 2), 1.0, 0.0) is None
        ug, ub = kernels.bn_unitwise_solve(_fake(5, 3), _fake(5), _fake(5), 1e-3)
        assert ug.shape == ub.shape == (5,) and ug.dtype == ub.dtype == torch.float32


def test_python_seam_traces_through_kernels(kernels, monkeypatch):
    """spngd_ext.ops's backend='cuda' call sites, traced with fake CUDA tensors: the dispatcher parses each
    call against its schema, so a mismatch between spngd_ext.ops and the C++ declarations fails here."""
    monkeypatch.setattr(ops_dispatch, "cuda_ops_available", lambda: True)
    with FakeTensorMode():
        buf = ops_py.pack_upper([_fake(3, 3), _fake(2, 2)], dtype=torch.bfloat16, backend="cuda")
        assert buf.shape == (9,) and buf.dtype == torch.bfloat16
        mats = ops_py.unpack_upper(buf, [3, 2], scale=0.5, dtype=torch.float32, backend="cuda")
        assert [tuple(m.shape) for m in mats] == [(3, 3), (2, 2)]
        mats = ops_py.unpack_upper(buf, [3, 2], scale=_fake(2), backend="cuda")
        assert len(mats) == 2

        state = _fake(10)
        assert ops_py.accumulate_factor(state, _fake(5, 4), scale=1.0, decay=0.9, backend="cuda") is state
        conv_state = _fake(28 * 29 // 2)
        out = ops_py.conv_a_factor(
            conv_state,
            _fake(2, 3, 8, 8),
            kernel_size=3,
            stride=1,
            padding=1,
            has_bias=True,
            scale=1.0,
            decay=0.0,
            backend="cuda",
        )
        assert out is conv_state

        inv, info = ops_py.cholesky_inverse_damped(_fake(4, 6, 6), 1e-3, backend="cuda")
        assert inv.shape == (4, 6, 6) and info.dtype == torch.int32

        bn_state = _fake(5, 3)
        assert (
            ops_py.bn_unitwise_fisher(
                bn_state, _fake(4, 5, 2, 2), _fake(4, 5, 2, 2), scale=1.0, decay=0.0, backend="cuda"
            )
            is bn_state
        )
        ug, ub = ops_py.bn_unitwise_solve(_fake(5, 3), _fake(5), _fake(5), damping=1e-3, backend="cuda")
        assert ug.shape == (5,)

        with pytest.raises(TypeError, match="backend='cuda' kernel takes"):
            ops_py.accumulate_factor(
                _fake(10, dtype=torch.float64), _fake(5, 4, dtype=torch.float64), scale=1.0, decay=0.0, backend="cuda"
            )
