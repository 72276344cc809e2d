"""GPU checks of the seams around the kernels: the raw ops' argument checks, no host
synchronisation, the Python dispatch passing the right arguments, and the first-use guard's own
checks passing on a working card. Listed by :func:`spngd_ext.selftest.kernel_checks.kernel_checks`.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops import packed_size
from . import kernel_cases as cases

__all__ = ["check_error_cases", "check_first_use_guard", "check_no_host_sync", "check_python_seam"]


def check_error_cases(k) -> str:
    from .op_error_cases import run_in_child

    ran, expected, error = run_in_child("cuda", timeout_s=120)
    if error or ran != expected:
        raise AssertionError(error or f"{ran} of {expected} cases ran")
    return f"{ran} cases raised the right error"


def check_no_host_sync(k) -> str:
    mats = cases.spd(4, 40, torch.float32)
    damping = torch.full((4,), 0.01, device=cases.DEV)
    x = torch.randn(64, 40, device=cases.DEV)
    state = torch.zeros(packed_size(40), device=cases.DEV)
    conv_state = torch.zeros(packed_size(3 * 9 + 1), device=cases.DEV)
    img = torch.randn(2, 3, 8, 8, device=cases.DEV)
    bn_state = torch.zeros(5, 3, device=cases.DEV)
    g = torch.randn(64, 5, 4, 4, device=cases.DEV)
    old = k.cholesky_kernel_max_n(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        k.unpack_upper(
            k.pack_upper([mats[0], mats[1]], torch.bfloat16),
            [40, 40],
            torch.ones(2, device=cases.DEV),
            0,
            torch.float32,
        )
        k.accumulate_factor(state, x, 1.0, 0.5)
        k.conv_a_factor(conv_state, img, [3, 3], [1, 1], [1, 1], [1, 1], True, 1.0, 0.0)
        k.bn_unitwise_fisher(bn_state, g, g, 1.0, 0.0)
        k.bn_unitwise_solve(bn_state, bn_state[:, 0].contiguous(), bn_state[:, 1].contiguous(), 1e-3)
        for limit in (10**6, 0):
            k.cholesky_kernel_max_n(limit)
            k.cholesky_inverse_damped(mats, damping)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        k.cholesky_kernel_max_n(old)
    return "every op, both Cholesky paths"


def check_python_seam(k) -> str:
    """spngd_ext.ops with backend='cuda' and 'torch' agree (the dispatch passes the right arguments)."""
    cases.seeded("seam")
    x = torch.randn(50, 20, device=cases.DEV)
    s_cuda, s_torch = torch.zeros(210, device=cases.DEV), torch.zeros(210, device=cases.DEV)
    ops.accumulate_factor(s_cuda, x, scale=0.1, decay=0.0, backend="cuda")
    ops.accumulate_factor(s_torch, x, scale=0.1, decay=0.0, backend="torch")
    cases.expect_close(s_cuda, s_torch, 1e-5, "accumulate_factor via spngd_ext.ops")
    (full,) = ops.unpack_upper(
        ops.pack_upper([torch.eye(3, device=cases.DEV)], backend="cuda"), [3], scale=2.0, backend="cuda"
    )
    if not torch.equal(full, 2 * torch.eye(3, device=cases.DEV)):
        raise AssertionError("pack/unpack via spngd_ext.ops")
    m = cases.spd(2, 10, torch.float32)
    inv_c, info_c = ops.cholesky_inverse_damped(m, 0.01, backend="cuda")
    inv_t, info_t = ops.cholesky_inverse_damped(m, 0.01, backend="torch")
    if not ((info_c == 0).all() and (info_t == 0).all()):
        raise AssertionError("cholesky via spngd_ext.ops flagged a positive definite matrix")
    cases.expect_close(inv_c, inv_t, 1e-4, "cholesky via spngd_ext.ops")
    return "accumulate_factor, pack/unpack, cholesky"


def check_first_use_guard(k) -> str:
    """The first-use checks of spngd_ext.kernel_guard pass on this card for every op and kernel dtype
    (a false alarm would quietly move an op to the PyTorch path)."""
    from .. import kernel_guard

    z = lambda *shape, dtype=torch.float32, **kw: torch.zeros(*shape, dtype=dtype, device=cases.DEV, **kw)  # noqa: E731
    probes = []
    for dt in cases.DTYPES:
        probes += [("pack_upper", [z(4, 4, dtype=dt)]), ("unpack_upper", [z(10, dtype=dt)])]
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        probes += [
            ("accumulate_factor", [z(10), z(3, 4, dtype=dt)]),
            ("accumulate_factor", [z(10), z(4, 3, dtype=dt).t()]),
            ("conv_a_factor", [z(10), z(2, 3, 5, 5, dtype=dt)]),
            ("conv_a_factor", [z(10), z(2, 3, 5, 5, dtype=dt).contiguous(memory_format=torch.channels_last)]),
            ("bn_unitwise_fisher", [z(4, 3), z(2, 4, 3, 3, dtype=dt), z(2, 4, 3, 3, dtype=dt)]),
        ]
    probes += [("cholesky_inverse_damped", [z(2, 3, 3, dtype=dt)]) for dt in (torch.float32, torch.float64)]
    probes.append(("bn_unitwise_solve", [z(4, 3), z(4), z(4)]))
    failed = [
        f"{op} {[str(t.dtype)[6:] for t in ts]}: {err}"
        for op, ts in probes
        if (err := kernel_guard.check_op(op, ts)) is not None
    ]
    if failed:
        raise AssertionError(f"{len(failed)} of {len(probes)} first-use checks failed: " + "; ".join(failed[:3]))
    return f"{len(probes)} op/dtype/layout checks"
