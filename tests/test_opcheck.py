"""The raw ops (``torch.ops.spngd_ext.<op>``) as the compiler sees them.

* ``torch.library.opcheck`` on every tensor op, for several shapes (1×1, odd sizes, sizes that are
  not multiples of anything) and every dtype the op takes: schema and mutation annotations
  (test_schema), autograd registration, fake against real kernel (test_faketensor), and AOT tracing
  with dynamic shapes against eager (test_aot_dispatch_dynamic). On the CPU always; on CUDA when a
  GPU is visible (marked gpu).
* The CPU kernels compute what the public PyTorch path computes in float64 (tolerance per dtype).
* The fakes reject what the C++ checks reject, with the same exception type and message.
* ``torch.compile(fullgraph=True)`` of a function that calls every op gives the eager results.

Skipped when the compiled extension is not built (SPNGD_REQUIRE_EXTENSION=1 makes that a failure).
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib

import pytest
import torch
from op_error_cases import error_cases
from torch._subclasses.fake_tensor import FakeTensorMode

from spngd_ext import ops
from spngd_ext.ops import extension, packed_size

REQUIRED = os.environ.get("SPNGD_REQUIRE_EXTENSION", "") not in ("", "0")
HALF_TYPES = (torch.bfloat16, torch.float16)
INPUT_TYPES = (torch.float32, *HALF_TYPES)  # what the accumulating ops read (fp32 sums)
FLOAT_TYPES = (torch.float32, torch.float64, *HALF_TYPES)


@pytest.fixture(scope="module")
def raw():
    if not extension.extension_loaded():
        reason = f"spngd_ext._C is not loaded: {extension.extension_error()}"
        if REQUIRED:
            pytest.fail(reason + " (SPNGD_REQUIRE_EXTENSION=1)")
        pytest.skip(reason)
    return torch.ops.spngd_ext


def _gen(key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _spd(gen, batch, n, dtype, device):
    r = torch.randn(batch, n, n + 2, generator=gen, dtype=torch.float64)
    return (r @ r.mT / (n + 2)).to(dtype=dtype, device=device)


def op_cases(device: str) -> list[tuple[str, str, tuple]]:
    """(op, case id, args): every tensor op, several shapes, every dtype it takes."""
    cases = []

    def add(op, ident, args):
        cases.append((op, f"{op}-{ident}", args))

    for dtype in FLOAT_TYPES:
        for sizes in ([1], [3, 5], [7, 2, 1]):
            g = _gen(("pack", dtype, sizes))
            for out in (None, torch.float32, torch.bfloat16):
                add(
                    "pack_upper",
                    f"{dtype}-{sizes}-{out}",
                    ([_randn(g, n, n, dtype=dtype, device=device) for n in sizes], out),
                )
        for sizes, offset in (([1], 0), ([3], 2), ([5, 2, 1], 1)):
            g = _gen(("unpack", dtype, sizes))
            buffer = _randn(g, offset + sum(packed_size(n) for n in sizes) + 3, dtype=dtype, device=device)
            scale = _randn(g, len(sizes), device=device)
            for out in (torch.float32, torch.float64, torch.bfloat16):
                add("unpack_upper", f"{dtype}-{sizes}-{offset}-{out}", (buffer, sizes, scale, offset, out))
    for dtype in INPUT_TYPES:
        for rows, d in ((1, 1), (5, 3), (33, 17)):
            g = _gen(("acc", dtype, rows, d))
            for decay in (0.0, 0.9):
                state = _randn(g, packed_size(d), device=device)
                add(
                    "accumulate_factor",
                    f"{dtype}-{rows}x{d}-{decay}",
                    (state, _randn(g, rows, d, dtype=dtype, device=device), 0.25, decay),
                )
        for shape, geometry, bias in (
            ((1, 1, 1, 1), ([1, 1], [1, 1], [0, 0], [1, 1]), True),
            ((2, 3, 7, 5), ([3, 3], [1, 1], [1, 1], [1, 1]), True),
            ((2, 2, 9, 8), ([3, 2], [2, 1], [0, 1], [1, 2]), False),
        ):
            g = _gen(("conv", dtype, shape))
            dim = shape[1] * geometry[0][0] * geometry[0][1] + int(bias)
            state = _randn(g, packed_size(dim), device=device)
            add(
                "conv_a_factor",
                f"{dtype}-{shape}-{bias}",
                (state, _randn(g, *shape, dtype=dtype, device=device), *geometry, bias, 0.5, 0.75),
            )
        for shape in ((4, 3), (1, 1, 1, 1), (3, 2, 7), (2, 5, 3, 3)):
            g = _gen(("bn", dtype, shape))
            state = _randn(g, shape[1], 3, device=device)
            add(
                "bn_unitwise_fisher",
                f"{dtype}-{shape}",
                (
                    state,
                    _randn(g, *shape, dtype=dtype, device=device),
                    _randn(g, *shape, dtype=dtype, device=device),
                    0.5,
                    0.9,
                ),
            )
    for dtype in (torch.float32, torch.float64):
        for batch, n in ((1, 1), (3, 5), (2, 17)):
            g = _gen(("chol", dtype, batch, n))
            damping = torch.rand(batch, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) + 0.1
            add("cholesky_inverse_damped", f"{dtype}-{batch}x{n}", (_spd(g, batch, n, dtype, device), damping))
        not_pd = -torch.eye(3, dtype=dtype, device=device).expand(2, 3, 3).contiguous()  # info != 0
        add("cholesky_inverse_damped", f"{dtype}-not-pd", (not_pd, torch.zeros(2, dtype=dtype, device=device)))
    for channels in (1, 5, 33):  # the op takes float32 only
        g = _gen(("solve", channels))
        fisher = _randn(g, channels, 3, device=device).abs()
        add(
            "bn_unitwise_solve",
            f"float32-{channels}",
            (fisher, _randn(g, channels, device=device), _randn(g, channels, device=device), 1e-3),
        )
    return cases


CPU_CASES = op_cases("cpu")


def test_every_tensor_op_has_cases():
    assert {op for op, _, _ in CPU_CASES} == set(extension.TENSOR_OPS)
    assert len(CPU_CASES) >= 100


@pytest.mark.parametrize(("op", "args"), [(op, args) for op, _, args in CPU_CASES], ids=[i for _, i, _ in CPU_CASES])
def test_opcheck_cpu(raw, op, args):
    result = torch.library.opcheck(getattr(raw, op).default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_opcheck_cuda(raw):
    failures = {}
    for op, ident, args in op_cases("cuda"):
        result = torch.library.opcheck(getattr(raw, op).default, args, raise_exception=False)
        if set(result.values()) != {"SUCCESS"}:
            failures[ident] = result
    assert not failures, failures


TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _as_float64(args):
    return tuple(
        a.double()
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else [t.double() for t in a]
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
        else a
        for a in args
    )


def _public_float64(op, args):
    """What spngd_ext.ops computes in float64 for the raw call ``op(*args)`` (the mutated state,
    or the outputs)."""
    a = _as_float64(args)
    if op == "pack_upper":
        return [ops.pack_upper(a[0], backend="torch")]
    if op == "unpack_upper":
        return ops.unpack_upper(a[0], a[1], scale=a[2], offset=a[3], dtype=torch.float64, backend="torch")
    if op == "accumulate_factor":
        return [ops.accumulate_factor(a[0], a[1], scale=a[2], decay=a[3], backend="torch")]
    if op == "conv_a_factor":
        return [
            ops.conv_a_factor(
                a[0],
                a[1],
                kernel_size=a[2],
                stride=a[3],
                padding=a[4],
                dilation=a[5],
                has_bias=a[6],
                scale=a[7],
                decay=a[8],
                backend="torch",
            )
        ]
    if op == "cholesky_inverse_damped":
        return list(ops.cholesky_inverse_damped(a[0], a[1], backend="torch"))
    if op == "bn_unitwise_fisher":
        return [ops.bn_unitwise_fisher(a[0], a[1], a[2], scale=a[3], decay=a[4], backend="torch")]
    return list(ops.bn_unitwise_solve(a[0], a[1], a[2], damping=a[3], backend="torch"))


@pytest.mark.parametrize(("op", "args"), [(op, args) for op, _, args in CPU_CASES], ids=[i for _, i, _ in CPU_CASES])
def test_cpu_kernel_matches_the_float64_path(raw, op, args):
    expect = _public_float64(op, args)
    args = tuple(
        [t.clone() for t in a]
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
        else a.clone()
        if isinstance(a, torch.Tensor)
        else a
        for a in args
    )
    out = getattr(raw, op)(*args)
    got = [args[0]] if out is None else list(out) if isinstance(out, (tuple, list)) else [out]
    if op == "pack_upper" and args[1] is not None:
        assert got[0].dtype == args[1]
    if op == "cholesky_inverse_damped":
        assert got[1].dtype == torch.int32
        assert torch.equal(got[1], expect[1].to(torch.int32))
        ok = expect[1] == 0
        got, expect = [got[0][ok]], [expect[0][ok]]
    dtypes = [t.dtype for t in args if isinstance(t, torch.Tensor)] + [t.dtype for t in got]
    dtypes += [t.dtype for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
    tol = max(TOL[d] for d in dtypes if d in TOL)
    assert len(got) == len(expect)
    for g, e in zip(got, expect):
        assert g.shape == e.shape
        err = (g.double() - e).norm() / e.norm().clamp_min(1e-30)
        assert err <= tol, f"{op}: relative error {err:.2e} > {tol:.0e}"


def _fake_cases(raw):
    """The CPU error cases with a rule the fakes enforce (contiguity is the kernel's alone)."""
    return [c for c in error_cases(raw, "cpu") if not c.needs_cuda and "contiguous" not in c.pattern]


def test_fakes_reject_what_the_checks_reject(raw):
    cases = _fake_cases(raw)
    assert len(cases) >= 25
    with FakeTensorMode():
        cases = _fake_cases(raw)  # tensors built inside the mode are fake: the calls reach the fakes
        for case in cases:
            with pytest.raises(case.exception) as caught:
                case.call()
            assert re.search(case.pattern, str(caught.value)), (case.name, str(caught.value))
            assert str(caught.value).startswith("spngd_ext::"), (case.name, str(caught.value))


def test_fakes_and_cpu_kernels_give_one_message(raw):
    """One case per op family: the fake's message is the C++ check's, word for word."""
    calls = {
        "x rank": lambda z: raw.accumulate_factor(z(10), z(1, 10, 4), 1.0, 0.0),
        "state size": lambda z: raw.conv_a_factor(
            z(44), z(1, 1, 4, 4), [3, 3], [1, 1], [0, 0], [1, 1], False, 1.0, 0.0
        ),
        "square": lambda z: raw.pack_upper([z(2, 2), z(3, 4)], None),
        "offset": lambda z: raw.unpack_upper(z(6), [3], z(1), 1, torch.float32),
        "damping dtype": lambda z: raw.cholesky_inverse_damped(z(2, 4, 4), z(2, dtype=torch.float64)),
        "bn shapes": lambda z: raw.bn_unitwise_fisher(z(3, 3), z(2, 3, 5), z(2, 3, 4), 1.0, 0.0),
        "solve": lambda z: raw.bn_unitwise_solve(z(3, 3), z(3), z(4), 0.0),
    }
    for name, call in calls.items():
        messages = []
        for mode in (contextlib.nullcontext(), FakeTensorMode()):
            with mode:
                with pytest.raises((TypeError, ValueError)) as caught:
                    call(torch.zeros)
            messages.append((type(caught.value), str(caught.value).split("\n")[0]))
        assert messages[0] == messages[1], (name, messages)


def _every_op(mats, scale, state, x, conv_state, image, chol, damping, bn_state, grad_out, xhat, fisher, grads):
    raw = torch.ops.spngd_ext
    buffer = raw.pack_upper(mats, None)
    unpacked = raw.unpack_upper(buffer * 2, [m.shape[0] for m in mats], scale, 0, torch.float32)
    raw.accumulate_factor(state, x.sin(), 0.5, 0.9)
    raw.conv_a_factor(conv_state, image, [3, 3], [1, 1], [1, 1], [1, 1], True, 0.25, 0.5)
    inv, info = raw.cholesky_inverse_damped(chol, damping)
    raw.bn_unitwise_fisher(bn_state, grad_out, xhat, 1.0, 0.0)
    ug, ub = raw.bn_unitwise_solve(fisher + bn_state.abs(), grads[0], grads[1], 1e-3)
    return [buffer, *unpacked, inv + 1, info, ug, ub, state * 2]


def test_compile_fullgraph_matches_eager(raw):
    g = _gen("compile")
    inputs = dict(
        mats=[_randn(g, 3, 3), _randn(g, 5, 5)],
        scale=_randn(g, 2),
        state=_randn(g, packed_size(4)),
        x=_randn(g, 7, 4),
        conv_state=_randn(g, packed_size(2 * 9 + 1)),
        image=_randn(g, 2, 2, 5, 6),
        chol=_spd(g, 3, 4, torch.float32, "cpu"),
        damping=torch.full((3,), 0.1),
        bn_state=_randn(g, 3, 3),
        grad_out=_randn(g, 2, 3, 4, 4),
        xhat=_randn(g, 2, 3, 4, 4),
        fisher=_randn(g, 3, 3).abs(),
        grads=[_randn(g, 3), _randn(g, 3)],
    )
    mutated = ("state", "conv_state", "bn_state")

    def copy():
        return {k: [t.clone() for t in v] if isinstance(v, list) else v.clone() for k, v in inputs.items()}

    eager_in, compiled_in = copy(), copy()
    torch._dynamo.reset()
    eager = _every_op(**eager_in)
    compiled = torch.compile(_every_op, fullgraph=True, backend="inductor")(**compiled_in)
    assert len(compiled) == len(eager)
    for c, e in zip(compiled, eager):
        assert c.dtype == e.dtype and c.shape == e.shape
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    for name in mutated:  # the in-place updates happened, once, in the compiled function too
        assert not torch.equal(eager_in[name], inputs[name])
        torch.testing.assert_close(compiled_in[name], eager_in[name], rtol=1e-5, atol=1e-6)
