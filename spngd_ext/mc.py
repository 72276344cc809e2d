"""The curvature backward of ``fisher="mc"``: labels sampled from the model's own predictions.

The backward differentiates with respect to the captured layer outputs, not the weights: it then
stops at the first layer and skips every weight-gradient GEMM (about half the cost), and leaves
every parameter's ``.grad`` untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

__all__ = ["LabelSampler"]


class LabelSampler:
    """Samples labels and runs the sampled-label backward; owns the seeded generator.

    Args:
        seed: the base seed (each rank offsets it by its rank); None: from ``torch.initial_seed()``.
        rank: this process's rank.
    """

    def __init__(self, seed: int | None, rank: int) -> None:
        self.seed = int(seed) if seed is not None else int(torch.initial_seed() % (2**62))
        self.rank = rank
        self.generator: torch.Generator | None = None
        self.active = False  # True while the sampled-label backward runs
        self.outputs: list[tuple[Tensor, int, Tensor]] = []  # (layer output, its version, weight)

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The generator on ``device`` (created, and seeded, on first use there)."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed + 1_000_003 * self.rank)
        return self.generator

    def remember_output(self, output: Tensor, weight: Tensor) -> None:
        """Record a layer output whose gradient the sampled-label backward must reach."""
        self.outputs.append((output, output._version, weight))

    def backward(self, out: Tensor, samples: int) -> int:
        """Backward of the cross-entropy with labels sampled from ``out`` (summed over examples,
        so each output gradient is a per-example gradient), ``samples`` times.

        Args:
            out: the model's (N, C[, ...]) logits.
            samples: how many label draws (backwards).

        Returns:
            the number of backwards run.
        """
        # An output modified in place after its hook ran is no longer the tensor the hook saw; for
        # that layer ask for its weight instead, which forces the backward through it.
        targets = [o if o._version == v else w for o, v, w in self.outputs]
        targets = [t for t in targets if t.requires_grad]
        self.outputs = []
        if not targets or not out.requires_grad:
            return 0
        logits = out.detach().float()
        classes = logits.shape[1]
        flat = logits.movedim(1, -1).reshape(-1, classes)
        probs = torch.softmax(flat, dim=-1)
        # Non-finite logits (an overflowing AMP step, a corrupt batch) would make the sampler
        # fail on the device; sample those rows uniformly instead — the step is then skipped by
        # the finite check on the gradients, so these labels never reach the weights.
        bad_rows = ~torch.isfinite(probs).all(dim=-1, keepdim=True)
        probs = torch.where(bad_rows, torch.full_like(probs, 1.0 / classes), probs)
        target_shape = (logits.shape[0],) + tuple(logits.shape[2:])
        gen = self.generator_for(out.device)
        self.active = True
        try:
            with record_function("spngd::mc_backward"):
                for _ in range(samples):
                    y = torch.multinomial(probs, 1, generator=gen).reshape(target_shape)
                    loss_mc = F.cross_entropy(out, y, reduction="sum")
                    try:
                        torch.autograd.grad(loss_mc, targets, retain_graph=True, allow_unused=True)
                    except RuntimeError as exc:
                        if "donated buffers" not in str(exc):
                            raise
                        raise RuntimeError(
                            "SPNGD: fisher='mc' runs a second backward through the model's graph, which a "
                            "torch.compile'd model allows only without donated buffers: set "
                            "torch._functorch.config.donated_buffer = False before the model's first compiled call "
                            "(SPNGD(fisher='mc') does so when it is built), or use fisher='emp'"
                        ) from exc
        finally:
            self.active = False
        return samples

    def state_dict(self) -> dict:
        """The seed and the generator's device and state (None before the first draw)."""
        rng = None if self.generator is None else (str(self.generator.device), self.generator.get_state())
        return {"seed": self.seed, "mc_rng": rng}

    def load_state_dict(self, seed: int, rng: tuple[str, Tensor] | None) -> None:
        """Restore the seed and, when saved, the generator state."""
        self.seed = int(seed)
        if rng is not None:
            device, state = rng
            self.generator = None
            self.generator_for(torch.device(device)).set_state(state)
