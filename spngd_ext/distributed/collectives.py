"""The optimizer's collectives on ``torch.distributed`` (NCCL on GPUs, Gloo on CPUs).

Three operations on a flat buffer cut into ``world_size`` equal chunks (see :mod:`spngd_ext.layout`):

* ``reduce_scatter``: rank r ends up with the sum over ranks of chunk r, and the rest of its
  buffer is zeroed. Whatever the algorithm (an all-reduce or per-owner reduces leave partial or
  full sums in the other chunks), a slot that nobody rewrites before the next call (a statistic
  that is not due under stale statistics) then keeps its value instead of being summed again
  and again (with an all-reduce it would grow W-fold per call until it overflows);
* ``all_gather``: in place, chunk r of every rank's buffer becomes rank r's chunk r;
* ``any_flag``: a logical OR over ranks (``all_reduce`` MAX of an int32).

How the sum is computed (``reduce_impl``: ``reduce_scatter``, ``all_reduce``, ``reduce``,
``all_to_all``; ``"auto"`` picks by backend and wire dtype), the all-gather (``gather_impl``:
``all_gather`` or ``broadcast``), reduced-precision communication (``comm_dtype``; sums kept in
fp32, fp16 scaled by powers of two) and the Gloo measurements behind each default are described
in ``docs/scaling.md`` ("Collective algorithms and reduced precision"). The true-length segment
operations the optimizer uses (``reduce_segments``, ``gather_segments``, ``exchange``) are in
:mod:`spngd_ext.distributed.uneven`; ``segment_reduce_impl`` picks their reduce algorithm and
``staging_numel`` bounds the all-to-all's receive staging.

Bytes: ``bytes_sent()`` counts what each rank *contributes* to each collective, numel × element
size of the wire dtype: the whole buffer for a reduce-scatter (whatever the algorithm), its own
chunk for an all-gather, 4 bytes per flag. ``{"last": {kind: bytes}, "total": {kind: bytes}}``
with kinds ``stats``, ``grads``, ``precond`` (and ``flag``); the optimizer calls
:meth:`begin_step` at the start of each step. On-the-wire bytes of a ring implementation are
(W−1)/W of a reduce-scatter contribution and (W−1)× an all-gather contribution
(see ``docs/scaling.md``).

Failures: a collective that raises (a peer exited, or the process group's ``timeout`` expired
because a peer stalls) is re-raised as a ``RuntimeError`` that names the operation, the kind
and the rank. Gloo applies the ``timeout`` given to ``init_process_group`` to every collective;
NCCL needs its watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default in recent torch),
which aborts the process when a collective exceeds the timeout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import uneven
from .communicator import Communicator

__all__ = ["TorchDistributedCommunicator", "REDUCE_IMPLS", "SEGMENT_REDUCE_IMPLS", "GATHER_IMPLS", "KINDS"]

REDUCE_IMPLS = ("auto", "reduce_scatter", "all_reduce", "reduce", "all_to_all")
SEGMENT_REDUCE_IMPLS = ("auto", "all_to_all", "reduce")
GATHER_IMPLS = ("auto", "all_gather", "broadcast")
KINDS = ("stats", "grads", "precond", "flag")
_LOW = (torch.bfloat16, torch.float16)
_FP16_TARGET_EXP = 14  # scale each fp16 chunk so its largest magnitude is below 2**15 (max 65504)


# torch 2.14 renamed reduce_scatter_tensor / all_gather_into_tensor (the old names warn).
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _zero_counts() -> dict[str, int]:
    return {k: 0 for k in KINDS}


class TorchDistributedCommunicator(Communicator):
    """Collectives over a ``torch.distributed`` process group (default: the world group).

    Args:
        group: the process group (None: the world group).
        comm_dtype: the wire dtype for floating buffers: bfloat16 or float16 (reduced precision,
            module docstring); None, float32 or float64 send the buffer in its own dtype.
        reduce_impl: the reduce-scatter algorithm, one of :data:`REDUCE_IMPLS`.
        gather_impl: the all-gather algorithm, one of :data:`GATHER_IMPLS`.
        segment_reduce_impl: the algorithm of :meth:`reduce_segments`, one of :data:`SEGMENT_REDUCE_IMPLS`.
        staging_numel: the most receive-staging elements per all-to-all round of :meth:`reduce_segments`.
    """

    def __init__(
        self,
        group=None,
        comm_dtype: torch.dtype | None = None,
        *,
        reduce_impl: str = "auto",
        gather_impl: str = "auto",
        segment_reduce_impl: str = "auto",
        staging_numel: int = uneven.DEFAULT_STAGING_NUMEL,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchDistributedCommunicator: torch.distributed is not initialised (call init_process_group first)"
            )
        if comm_dtype not in (None, torch.float32, torch.float64) + _LOW:
            raise ValueError(
                f"TorchDistributedCommunicator: comm_dtype must be None, float32, bfloat16 or float16, got {comm_dtype!r}"
            )
        if reduce_impl not in REDUCE_IMPLS:
            raise ValueError(
                f"TorchDistributedCommunicator: reduce_impl must be one of {REDUCE_IMPLS}, got {reduce_impl!r}"
            )
        if gather_impl not in GATHER_IMPLS:
            raise ValueError(
                f"TorchDistributedCommunicator: gather_impl must be one of {GATHER_IMPLS}, got {gather_impl!r}"
            )
        if segment_reduce_impl not in SEGMENT_REDUCE_IMPLS:
            raise ValueError(
                f"TorchDistributedCommunicator: segment_reduce_impl must be one of {SEGMENT_REDUCE_IMPLS}, "
                f"got {segment_reduce_impl!r}"
            )
        if int(staging_numel) < 1:
            raise ValueError(f"TorchDistributedCommunicator: staging_numel must be >= 1, got {staging_numel}")
        self.segment_reduce_impl = segment_reduce_impl
        self.staging_numel = int(staging_numel)
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))
        # None (or the buffer's own dtype) means "send the buffer as it is".
        self.comm_dtype = comm_dtype if comm_dtype in _LOW else None
        self.reduce_impl = reduce_impl
        self.gather_impl = gather_impl
        self._global_ranks = [
            dist.get_global_rank(self.group, r) if self.group is not dist.group.WORLD else r  # type: ignore[arg-type]  # not None: set above
            for r in range(self.world_size)
        ]
        self._last = _zero_counts()
        self._total = _zero_counts()

    # ------------------------------------------------------------------ byte counter
    def begin_step(self) -> None:
        """Start a step: the per-step byte counts (``bytes_sent()["last"]``) restart at zero."""
        self._last = _zero_counts()

    def bytes_sent(self) -> dict[str, dict[str, int]]:
        """Bytes this rank contributed, per kind: ``{"last": {...}, "total": {...}}`` for the step
        since :meth:`begin_step` and since construction (module docstring)."""
        return {"last": dict(self._last), "total": dict(self._total)}

    def _count(self, kind: str, nbytes: int) -> None:
        self._last[kind] = self._last.get(kind, 0) + nbytes
        self._total[kind] = self._total.get(kind, 0) + nbytes

    def _wire_dtype(self, buffer: Tensor) -> torch.dtype:
        return self.comm_dtype if self.comm_dtype is not None and buffer.is_floating_point() else buffer.dtype

    # ------------------------------------------------------------------ collectives
    def reduce_scatter(self, buffer: Tensor, chunk_numel: int, *, kind: str) -> Tensor:
        """Sum chunk ``rank`` over ranks by :meth:`reduce_impl_for`'s algorithm; returns it (a view),
        the other chunks are zeroed. Args: as :meth:`Communicator.reduce_scatter`."""
        w, r, c = self.world_size, self.rank, chunk_numel
        if buffer.dim() != 1 or buffer.numel() != w * c:
            raise ValueError(
                f"reduce_scatter({kind}): expected a flat buffer of {w}×{c} elements, got shape {tuple(buffer.shape)}"
            )
        mine = buffer[r * c : (r + 1) * c]
        if c == 0:
            return mine
        wire = self._wire_dtype(buffer)
        impl = self.reduce_impl_for(buffer)
        self._count(kind, buffer.numel() * wire.itemsize)
        try:
            if wire == buffer.dtype:
                self._reduce_full(buffer, mine, c, impl)
            elif impl == "all_to_all":
                self._reduce_all_to_all_low(buffer, mine, c, wire, kind)
            else:
                self._reduce_native_low(buffer, mine, c, wire, kind, impl)
        except RuntimeError as exc:
            raise self._failure("reduce_scatter", kind, exc) from exc
        buffer[: r * c].zero_()
        buffer[(r + 1) * c :].zero_()
        return mine

    def all_gather(self, buffer: Tensor, chunk_numel: int, *, kind: str) -> None:
        """In place, chunk r becomes rank r's chunk r everywhere, by :meth:`gather_impl_for`'s
        algorithm (reduced precision: every chunk the rounded values). Args: as :meth:`Communicator.all_gather`."""
        w, r, c = self.world_size, self.rank, chunk_numel
        if buffer.dim() != 1 or buffer.numel() != w * c:
            raise ValueError(
                f"all_gather({kind}): expected a flat buffer of {w}×{c} elements, got shape {tuple(buffer.shape)}"
            )
        if c == 0:
            return
        mine = buffer[r * c : (r + 1) * c]
        wire = self._wire_dtype(buffer)
        self._count(kind, c * wire.itemsize)
        try:
            if wire == buffer.dtype:
                self._gather(buffer, mine.clone(), c, buffer)
                return
            scale = None
            if wire == torch.float16:
                scale = _pow2_scale(mine.unsqueeze(0), 1.0)  # (1,)
                send = (mine * scale.to(mine.dtype)).to(wire)
                scales = torch.empty(w, dtype=torch.float32, device=buffer.device)
                _all_gather_single(scales, scale, group=self.group)
                self._count(kind, 4)
            else:
                send = mine.to(wire)
            out = torch.empty(w * c, dtype=wire, device=buffer.device)
            self._gather(out, send, c, buffer)
            buffer.copy_(out)  # every chunk, the own one included, now holds the rounded values
            if scale is not None:
                buffer.view(w, c).div_(scales.to(buffer.dtype).unsqueeze(1))
        except RuntimeError as exc:
            raise self._failure("all_gather", kind, exc) from exc

    # ------------------------------------------------------------------ which algorithm
    def reduce_impl_for(self, buffer: Tensor) -> str:
        """The reduce-scatter algorithm used for ``buffer`` (``reduce_impl`` unless "auto").

        Args:
            buffer: the buffer to be reduced (its dtype and device choose under "auto").
        """
        if self.reduce_impl != "auto":
            return self.reduce_impl
        if self.comm_dtype is not None and buffer.is_floating_point():
            return "all_to_all"  # the only way to keep fp32 accumulation
        if "gloo" in self.backend and not buffer.is_cuda:
            # Gloo's reduce-scatter sends as much as an all-reduce and is slower; per-owner
            # reduces send less than an all-reduce from W=4 on (module docstring)
            return "all_reduce" if self.world_size == 2 else "reduce"
        return "reduce_scatter"

    def gather_impl_for(self, buffer: Tensor) -> str:
        """The all-gather algorithm used for ``buffer`` (``gather_impl`` unless "auto").

        Args:
            buffer: the buffer to be gathered (its device chooses under "auto").
        """
        if self.gather_impl != "auto":
            return self.gather_impl
        if "gloo" in self.backend and not buffer.is_cuda:
            return "broadcast"  # same bytes as Gloo's all-gather, about 2x faster (docs/scaling.md)
        return "all_gather"

    def _gather(self, out: Tensor, mine: Tensor, c: int, like: Tensor) -> None:
        """``out`` (W·c) ← every rank's ``mine`` (c), by the configured algorithm."""
        if self.gather_impl_for(like) == "broadcast":
            out[self.rank * c : (self.rank + 1) * c].copy_(mine)
            works = [
                dist.broadcast(out[s * c : (s + 1) * c], src=self._global_ranks[s], group=self.group, async_op=True)
                for s in range(self.world_size)
            ]
            for work in works:
                work.wait()  # type: ignore[union-attr]  # async_op=True returns a Work
        else:
            _all_gather_single(out, mine, group=self.group)

    # ------------------------------------------------------------------ true-length segments
    def segment_reduce_impl_for(self, buffer: Tensor) -> str:
        """The algorithm :meth:`reduce_segments` uses for ``buffer``.

        Args:
            buffer: the buffer to be reduced (its dtype and device choose under "auto").
        """
        if self.comm_dtype is not None and buffer.is_floating_point():
            return "all_to_all"  # fp32 accumulation of reduced-precision contributions
        if self.segment_reduce_impl != "auto":
            return self.segment_reduce_impl
        # Gloo: measured faster than per-segment reduces, and its bytes are exact (docs/scaling.md)
        return "all_to_all" if "gloo" in self.backend and not buffer.is_cuda else "reduce"

    def reduce_segments(self, buffer: Tensor, sends, *, kind: str) -> None:
        """Each owner gets the sum of its segments (:func:`.uneven.reduce_segments`); what this rank
        sent to other owners is zeroed. Args: as :meth:`Communicator.reduce_segments`."""
        try:
            uneven.reduce_segments(
                self,
                buffer,
                sends,
                kind=kind,
                impl=self.segment_reduce_impl_for(buffer),
                wire=self._wire_dtype(buffer),
                staging_numel=self.staging_numel,
            )
        except RuntimeError as exc:
            raise self._failure("reduce_segments", kind, exc) from exc

    def gather_segments(self, buffer: Tensor, owned, *, kind: str) -> None:
        """Every rank's copy of each owner's segments becomes the owner's values
        (:func:`.uneven.gather_segments`). Args: as :meth:`Communicator.gather_segments`."""
        try:
            uneven.gather_segments(self, buffer, owned, kind=kind, wire=self._wire_dtype(buffer))
        except RuntimeError as exc:
            raise self._failure("gather_segments", kind, exc) from exc

    def exchange(self, sends, receives, *, kind: str, dtype: torch.dtype, device: torch.device) -> None:
        """Point to point: ``sends[d]`` go to rank d into its ``receives[this rank]``
        (:func:`.uneven.exchange`). Args: as :meth:`Communicator.exchange`."""
        try:
            uneven.exchange(self, sends, receives, kind=kind, dtype=dtype, device=device)
        except RuntimeError as exc:
            raise self._failure("exchange", kind, exc) from exc

    def any_flag(self, flag: Tensor) -> Tensor:
        """Logical OR of ``flag`` over ranks (``all_reduce`` MAX of an int32, 4 bytes counted).
        Args: as :meth:`Communicator.any_flag`."""
        t = flag.detach().reshape(1).to(torch.int32)
        self._count("flag", t.numel() * t.element_size())
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        except RuntimeError as exc:
            raise self._failure("any_flag", "flag", exc) from exc
        return t[0] > 0

    # ------------------------------------------------------------------ implementations
    def _reduce_full(self, buffer: Tensor, mine: Tensor, c: int, impl: str) -> None:
        w, g = self.world_size, self.group
        if impl == "reduce_scatter":
            out = torch.empty_like(mine)
            _reduce_scatter_single(out, buffer, group=g)
            mine.copy_(out)
        elif impl == "all_reduce":
            dist.all_reduce(buffer, group=g)
        elif impl == "reduce":
            works = [
                dist.reduce(buffer[s * c : (s + 1) * c], dst=self._global_ranks[s], group=g, async_op=True)
                for s in range(w)
            ]
            for work in works:
                work.wait()  # type: ignore[union-attr]  # async_op=True returns a Work
        elif impl == "all_to_all":
            recv = torch.empty_like(buffer)
            dist.all_to_all_single(recv, buffer, group=g)
            torch.sum(recv.view(w, c), dim=0, out=mine)
        else:  # pragma: no cover - validated in __init__
            raise ValueError(impl)

    def _reduce_all_to_all_low(self, buffer: Tensor, mine: Tensor, c: int, wire: torch.dtype, kind: str) -> None:
        w, g = self.world_size, self.group
        chunks = buffer.view(w, c)
        if wire == torch.float16:
            scale = _pow2_scale(chunks, 1.0)  # (W,): this rank's scale for each destination chunk
            send = (chunks * scale.to(buffer.dtype).unsqueeze(1)).to(wire)
            their_scales = torch.empty_like(scale)
            dist.all_to_all_single(their_scales, scale, group=g)
            self._count(kind, scale.numel() * 4)
        else:
            send, their_scales = buffer.to(wire), None
        recv = torch.empty(w * c, dtype=wire, device=buffer.device)
        dist.all_to_all_single(recv, send.reshape(-1), group=g)
        got = recv.view(w, c)
        if their_scales is None:
            torch.sum(got, dim=0, dtype=buffer.dtype, out=mine)  # fp32 accumulation of rounded contributions
        else:
            mine.copy_((got.to(buffer.dtype) / their_scales.to(buffer.dtype).unsqueeze(1)).sum(dim=0))

    def _reduce_native_low(self, buffer: Tensor, mine: Tensor, c: int, wire: torch.dtype, kind: str, impl: str) -> None:
        """The backend sums in the wire dtype (see the module docstring)."""
        w, g = self.world_size, self.group
        scale = None
        if wire == torch.float16:  # one scale for all ranks, so that the sum of W values fits
            local = _pow2_scale(buffer.view(1, -1), float(w))
            scale = local.clone()
            dist.all_reduce(scale, op=dist.ReduceOp.MIN, group=g)
            self._count(kind, 4)
            send = (buffer * scale.to(buffer.dtype)).to(wire)
        else:
            send = buffer.to(wire)
        if impl == "all_reduce":
            dist.all_reduce(send, group=g)
            out = send[self.rank * c : (self.rank + 1) * c]
        elif impl == "reduce":
            works = [
                dist.reduce(send[s * c : (s + 1) * c], dst=self._global_ranks[s], group=g, async_op=True)
                for s in range(w)
            ]
            for work in works:
                work.wait()  # type: ignore[union-attr]  # async_op=True returns a Work
            out = send[self.rank * c : (self.rank + 1) * c]
        else:
            out = torch.empty(c, dtype=wire, device=buffer.device)
            _reduce_scatter_single(out, send, group=g)
        mine.copy_(out)
        if scale is not None:
            mine.div_(scale.to(buffer.dtype))

    def _failure(self, op: str, kind: str, exc: BaseException) -> RuntimeError:
        return RuntimeError(
            f"SPNGD: {op} of the {kind} buffer failed on rank {self.rank} of {self.world_size} "
            f"({self.backend}): {exc}. A peer process probably exited or stalled past the process group's timeout."
        )


def _pow2_scale(chunks: Tensor, headroom: float) -> Tensor:
    """Per row of ``chunks``, a power of two s (fp32) with max|finite x|·s·headroom < 2**15; 1 for
    all-zero rows. Powers of two keep the scaling exact (short of fp16 underflow)."""
    mag = torch.where(torch.isfinite(chunks), chunks.abs(), torch.zeros((), dtype=chunks.dtype, device=chunks.device))
    amax = mag.amax(dim=1).float() * headroom
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)), torch.full_like(amax, _FP16_TARGET_EXP))
    return torch.exp2(_FP16_TARGET_EXP - exp).clamp(max=2.0**100, min=2.0**-100)
