"""The optimizers the training CLI can compare, each wrapped as one callable training step.

Every optimizer here needs a different call sequence for one step (SP-NGD takes the output for
its sampled-label backward, ASDL's K-FAC runs forward and backward itself), so each is wrapped in
a :class:`TrainStep` whose ``__call__(x, y)`` does forward, backward and update and returns the
loss and logits. The training loop then treats them all alike.

None of the baselines is implemented here: LARS is ``pytorch_optimizer.LARS``, K-FAC is ASDL's
``KfacGradientMaker`` followed by ``torch.optim.SGD``, and SP-NGD is :class:`spngd_ext.SPNGD`
(imported only when asked for).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .spngd_settings import SpngdSettings, spngd_kwargs

__all__ = [
    "OPTIMIZERS",
    "DEFAULT_LR",
    "DEFAULT_WEIGHT_DECAY",
    "OptimizerSettings",
    "TrainStep",
    "OptimizerUnavailableError",
    "build_train_step",
]

OPTIMIZERS = ("spngd", "sgd", "lars", "adamw", "asdl-kfac")

# Base learning rates at the default batch size (4096), 10 epochs, 1 warm-up epoch and poly
# decay, for the main-job CNN on Fashion-MNIST: the best of each grid of bench/convergence.py
# (CPU, seed 0; bench/results/convergence). SP-NGD 0.01 reached 88% and 90% in the fewest steps
# (0.02 ends 0.3 points higher); SGD 0.1 has the best accuracy of {0.05, 0.1, 0.2, 0.4}, LARS 0.4
# (trust coefficient 0.1, see below) of {0.1, 0.2, 0.4, 0.8}. ASDL's K-FAC (0.03) and AdamW
# (8e-3) keep the best of an earlier H200 grid.
DEFAULT_LR: dict[str, float] = {
    "spngd": 0.01,
    "sgd": 0.1,
    "lars": 0.4,
    "adamw": 8e-3,
    "asdl-kfac": 0.03,
}
# pytorch-optimizer's LARS applies the plain lr to 1-D parameters (BN, biases) and lr * trust *
# ||w|| / ||g|| to the rest, so with its default trust 1e-3 one lr cannot suit both: at lr 1 the BN
# parameters move 10x faster than under SGD's best lr while the weights move 1e-3 of their norm
# per step. 3-epoch probes at batch 4096 (lr, trust -> accuracy): (1, 1e-3) 59.5%, (0.1, 1e-2)
# 65.6%, (0.2, 1e-2) 68.6%, (0.5, 1e-3) 55.9%, (0.1, 2e-2) 72.3%, (0.1, 5e-2) 78.6%, (0.1, 0.1)
# 82.6%; SGD lr 0.1 82.7%. Command: python -m spngd_ext.train --optimizer lars --batch-size 4096
# --epochs 3 --lr LR --trust-coefficient T --eval-every 5 --threads 1 (2026-11-26, this CPU).
LARS_TRUST_COEFFICIENT = 0.1
DEFAULT_WEIGHT_DECAY: dict[str, float] = {
    "spngd": 5e-4,
    "sgd": 5e-4,
    "lars": 5e-4,
    "adamw": 5e-2,
    "asdl-kfac": 5e-4,
}


class OptimizerUnavailableError(RuntimeError):
    """The requested optimizer cannot be built in this environment or configuration."""


@dataclass(kw_only=True)
class OptimizerSettings(SpngdSettings):
    """Hyperparameters of all optimizers; each uses the fields that apply to it.

    The SP-NGD options (damping, fisher, curvature_interval, ...) are inherited from
    :class:`~spngd_ext.train.spngd_settings.SpngdSettings`, generated from
    :class:`spngd_ext.options.SPNGDOptions`; the fields here are shared by every optimizer.
    """

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trust_coefficient: float = LARS_TRUST_COEFFICIENT
    seed: int | None = None  # SP-NGD's MC sampling
    amp: bool = False
    label_smoothing: float = 0.0  # of the training loss, for every optimizer


class TrainStep:
    """One optimizer step on a batch: ``loss, logits = step(x, y)``.

    ``optimizer`` is the ``torch.optim.Optimizer`` whose ``param_groups`` carry the learning
    rate, so an LR scheduler can drive it.
    """

    optimizer: torch.optim.Optimizer
    label_smoothing: float = 0.0  # build_train_step sets it from OptimizerSettings

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: bool) -> None:
        self.model = model
        self.optimizer = optimizer
        self.amp = amp

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss: mean cross-entropy, with the configured label smoothing. (SP-NGD's
        MC Fisher samples its own labels from the model, so smoothing changes the gradient only.)"""
        return F.cross_entropy(out, y, label_smoothing=self.label_smoothing)

    def _autocast(self, x: torch.Tensor):
        # bf16 needs no loss scaling, so autocast alone is enough on both CPU and CUDA.
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def counters(self) -> dict:
        """Optimizer-specific bookkeeping for the run summary (e.g. SP-NGD's refresh counts)."""
        return {}


class GradientStep(TrainStep):
    """Plain ``loss.backward(); optimizer.step()`` (SGD, LARS, AdamW)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast(x):
            out = self.model(x)
            loss = self.loss(out, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), out.detach()


class SpngdStep(TrainStep):
    """SP-NGD's protocol: ``opt.backward(loss, out)`` does the curvature backward when due."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        opt = self.optimizer
        opt.zero_grad()
        with self._autocast(x):
            out = self.model(x)
            loss = self.loss(out, y)
        opt.backward(loss, out)
        opt.step()
        return loss.detach(), out.detach()

    @property
    def counters(self) -> dict:
        return dict(getattr(self.optimizer, "counters", {}) or {})


class AsdlKfacStep(TrainStep):
    """ASDL K-FAC: its gradient maker runs forward/backward and preconditions ``p.grad``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: bool, grad_maker, config) -> None:
        super().__init__(model, optimizer, amp)
        self.grad_maker = grad_maker
        self.config = config
        self.curvature_updates = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        # ASDL sums the loss over the batch and divides by data_size; the last batch of an
        # epoch may be smaller, so keep data_size equal to the batch actually used.
        self.config.data_size = int(x.shape[0])
        if self.grad_maker.do_update_curvature():
            self.curvature_updates += 1
        # Logits in fp32 even under bf16 autocast: ASDL samples MC labels from softmax(logits),
        # and bf16 probabilities fail torch.distributions' simplex check.
        dummy_out = self.grad_maker.setup_model_call(lambda inp: self.model(inp).float(), x)
        # ASDL sets the loss's `reduction` itself, so it gets F.cross_entropy, not self.loss.
        self.grad_maker.setup_loss_call(F.cross_entropy, dummy_out, y, label_smoothing=self.label_smoothing)
        with self._autocast(x), warnings.catch_warnings():
            # ASDL's module hooks trigger torch's "non-full backward hook" deprecation warning.
            warnings.simplefilter("ignore", FutureWarning)
            out, loss = self.grad_maker.forward_and_backward()
        self.optimizer.step()
        return loss.detach(), out.detach()

    @property
    def counters(self) -> dict:
        return {"curvature_updates": self.curvature_updates}


def _build_spngd(model: nn.Module, s: OptimizerSettings, distributed: bool) -> TrainStep:
    from spngd_ext import SPNGD  # the library's public surface

    # SP-NGD does its own communication (data-parallel gradients, model-parallel curvature), so
    # the model is never wrapped in DDP; under torchrun it joins the default process group.
    opt = SPNGD(
        model,
        lr=s.lr,
        momentum=s.momentum,
        weight_decay=s.weight_decay,
        seed=s.seed,  # reproducible MC label sampling
        **spngd_kwargs(s),
    )
    return SpngdStep(model, opt, s.amp)


def _build_asdl_kfac(model: nn.Module, s: OptimizerSettings, distributed: bool) -> TrainStep:
    if distributed:
        raise OptimizerUnavailableError(
            "--optimizer asdl-kfac under torchrun (WORLD_SIZE>1): ASDL's KfacGradientMaker "
            "rejects DDP-wrapped models; run it on a single process."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # asdl uses torch.jit.script at import
        try:
            from asdl import KfacGradientMaker, PreconditioningConfig
        except ImportError as exc:
            raise OptimizerUnavailableError(
                f"--optimizer asdl-kfac needs ASDL: pip install asdfghjkl==0.1a5 ({exc})"
            ) from exc
    if s.curvature_interval != s.inverse_interval:
        raise OptimizerUnavailableError(
            "--optimizer asdl-kfac: ASDL (without a curvature EMA) inverts the factors whenever "
            "it refreshes them, so --curvature-interval and --inverse-interval must be equal"
        )
    config = PreconditioningConfig(
        data_size=1,  # reset to each batch's size before every step
        damping=s.damping,
        curvature_upd_interval=s.curvature_interval,
        preconditioner_upd_interval=s.inverse_interval,
    )
    fisher_type = {"mc": "fisher_mc", "emp": "fisher_emp"}[s.fisher]
    grad_maker = KfacGradientMaker(model, config, fisher_type=fisher_type, n_mc_samples=s.mc_samples)
    sgd = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    return AsdlKfacStep(model, sgd, s.amp, grad_maker, config)


def build_train_step(
    name: str,
    model: nn.Module,
    settings: OptimizerSettings,
    distributed: bool = False,
    ddp_model: nn.Module | None = None,
) -> TrainStep:
    """Build optimizer ``name`` for ``model``.

    ``ddp_model`` (the DDP wrapper of ``model``) is what the gradient-based baselines run forward
    through under torch.distributed; SP-NGD and ASDL get the bare model.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if settings.fisher not in ("mc", "emp"):
        raise ValueError(f"fisher must be 'mc' or 'emp', got {settings.fisher!r}")
    ls = settings.label_smoothing
    if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0.0 <= ls < 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {ls!r}")
    step = _build_train_step(name, model, settings, distributed, ddp_model)
    step.label_smoothing = float(ls)
    return step


def _build_train_step(
    name: str,
    model: nn.Module,
    settings: OptimizerSettings,
    distributed: bool,
    ddp_model: nn.Module | None,
) -> TrainStep:
    if name == "spngd":
        return _build_spngd(model, settings, distributed)
    if name == "asdl-kfac":
        return _build_asdl_kfac(model, settings, distributed)
    forward_model = ddp_model if ddp_model is not None else model
    params = model.parameters()
    if name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    elif name == "lars":
        try:
            from pytorch_optimizer import LARS
        except ImportError as exc:
            raise OptimizerUnavailableError(
                f"--optimizer lars needs pytorch-optimizer: pip install pytorch-optimizer ({exc})"
            ) from exc
        opt = LARS(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            trust_coefficient=settings.trust_coefficient,
        )
    else:  # adamw
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return GradientStep(forward_model, opt, settings.amp)
