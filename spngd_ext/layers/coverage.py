"""Which parameters of a model get which curvature, and why the others train first-order.

:func:`classify_model` walks ``named_modules()`` once and decides, per module, whether a curvature
layer handles it; every parameter not handled is listed with the reason. The optimizer builds its
layers from the same walk, so the report is what the optimizer does, not a separate guess.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .base import CurvatureLayer

# Parameters that SP-NGD leaves first-order by design (no layer computes them as a weight of its
# input): listed as "expected" rather than as a gap.
_EXPECTED_FIRST_ORDER = ("class_token", "cls_token", "pos_embedding", "pos_embed", "layer_scale", "gamma")


@dataclass(frozen=True)
class ParameterCoverage:
    """How one parameter is trained.

    Args:
        name: the parameter's name in the model.
        numel: its element count.
        curvature: the curvature layer kind ("linear", "conv2d", "batchnorm", ...) or "first-order".
        layer: the curvature layer's name (empty for first-order).
        reason: why it is first-order (empty otherwise).
        expected: a first-order parameter that no curvature layer type is meant to cover
            (positional embeddings, class tokens, layer scales).
    """

    name: str
    numel: int
    curvature: str
    layer: str = ""
    reason: str = ""
    expected: bool = False


@dataclass
class Coverage:
    """The curvature each parameter of a model gets.

    Args:
        parameters: one entry per trainable parameter, in ``named_parameters()`` order.
    """

    parameters: list[ParameterCoverage] = field(default_factory=list)

    @property
    def first_order(self) -> list[ParameterCoverage]:
        """The parameters trained with the plain (momentum) gradient."""
        return [p for p in self.parameters if p.curvature == "first-order"]

    def fraction(self, weights_only: bool = False) -> float:
        """Fraction of parameter elements with curvature.

        Args:
            weights_only: count only parameters with two or more dimensions' worth of structure
                (names ending in ``weight``), as a coverage target is usually stated.
        """
        chosen = [p for p in self.parameters if not weights_only or p.name.endswith("weight")]
        total = sum(p.numel for p in chosen)
        covered = sum(p.numel for p in chosen if p.curvature != "first-order")
        return covered / total if total else 1.0

    def by_kind(self) -> dict[str, int]:
        """Parameter elements per curvature kind (including "first-order")."""
        counts: Counter[str] = Counter()
        for p in self.parameters:
            counts[p.curvature] += p.numel
        return dict(counts)

    def summary(self) -> str:
        """One line: elements per curvature kind and the first-order parameters with their reasons."""
        total = sum(p.numel for p in self.parameters) or 1
        kinds = ", ".join(f"{k} {n} ({100.0 * n / total:.1f}%)" for k, n in sorted(self.by_kind().items()))
        gaps = "; ".join(f"{p.name}: {p.reason}" for p in self.first_order)
        return f"SPNGD coverage: {kinds}" + (f"; first-order: {gaps}" if gaps else "")


def _mha_out_proj_names(model: nn.Module) -> dict[str, str]:
    """Names of the out_proj Linear of every nn.MultiheadAttention: F.multi_head_attention_forward
    reads its weight directly, so the Linear's own forward (and its hooks) never runs."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names[f"{name}.out_proj" if name else "out_proj"] = name or "<root>"
    return names


def classify_model(
    model: nn.Module, layer_for: Callable[[str, nn.Module], CurvatureLayer | list[CurvatureLayer] | str | None]
) -> tuple[list[CurvatureLayer], Coverage]:
    """The curvature layers of ``model`` and the coverage of every trainable parameter.

    Unsupported configurations (the reason string ``layer_for`` returns, a weight shared by two
    layers, a Linear used only through the functional API) warn once each, naming the parameter.

    Args:
        model: the model (unwrapped).
        layer_for: ``(name, module) ->`` a curvature layer, a reason the module's parameters stay
            first-order (an unsupported configuration), or None (no curvature type for the module).
    """
    reasons: dict[int, str] = {}
    claimed: dict[int, CurvatureLayer] = {}
    layers: list[CurvatureLayer] = []
    functional = _mha_out_proj_names(model)
    for name, module in model.named_modules():
        name = name or "<root>"
        if name in functional:
            own = list(module.parameters(recurse=False))
            if own and all(id(p) in claimed for p in own):
                continue  # covered through its attention module's projections
            why = (
                f"read by nn.MultiheadAttention {functional[name]} through the functional API (module hooks never run)"
            )
            _warn_first_order(name, module, why, reasons)
            continue
        found = layer_for(name, module)
        if isinstance(found, str):
            _warn_first_order(name, module, found, reasons)
            continue
        for result in found if isinstance(found, list) else [found]:
            if result is not None and getattr(result.module, "weight", None) is not None:
                _claim(result, name, module, layers, claimed, reasons)
    owners = {id(p): layer for layer in layers for p in layer.params}
    entries = []
    for pname, p in model.named_parameters():
        layer = owners.get(id(p))
        if layer is not None:
            entries.append(ParameterCoverage(pname, p.numel(), layer.kind, layer.name))
            continue
        expected = pname.rsplit(".", 1)[-1] in _EXPECTED_FIRST_ORDER
        reason = reasons.get(id(p)) or _default_reason(model, pname, expected)
        entries.append(ParameterCoverage(pname, p.numel(), "first-order", "", reason, expected))
    _warn_builtin_gaps(model, entries, reasons)
    return layers, Coverage(entries)


def _warn_builtin_gaps(model: nn.Module, entries: list[ParameterCoverage], reasons: dict[int, str]) -> None:
    """One warning per torch.nn module (Conv3d, BatchNorm3d, InstanceNorm, RNNs, the extra
    parameters of MultiheadAttention, ...) with first-order parameters that are not first-order by
    design and were not warned about yet, naming them; a model's own bare parameters are left to the
    coverage line."""
    gaps: dict[str, list[ParameterCoverage]] = {}
    for entry in entries:
        if (
            entry.curvature == "first-order"
            and not entry.expected
            and id(model.get_parameter(entry.name)) not in reasons
        ):
            gaps.setdefault(entry.name.rsplit(".", 1)[0] if "." in entry.name else "", []).append(entry)
    for owner_name, found in gaps.items():
        owner = model.get_submodule(owner_name) if owner_name else model
        if type(owner).__module__.startswith("torch.nn."):
            names = ", ".join(e.name.rsplit(".", 1)[-1] for e in found)
            warnings.warn(
                f"SPNGD: {owner_name or '<root>'} ({type(owner).__name__}; parameters {names}) is trained with the "
                f"plain gradient: {found[0].reason}",
                stacklevel=4,
            )


def _claim(
    layer: CurvatureLayer,
    name: str,
    module: nn.Module,
    layers: list[CurvatureLayer],
    claimed: dict[int, CurvatureLayer],
    reasons: dict[int, str],
) -> None:
    """Add ``layer`` unless a parameter of it already belongs to another layer; then neither gets
    curvature (their statistics would describe different uses of one weight)."""
    shared = [p for p in layer.params if id(p) in claimed]
    if shared:
        other = claimed[id(shared[0])]
        why = f"weight shared by the layers {other.name} and {layer.name}"
        if other in layers:
            layers.remove(other)
        for p in other.params:
            claimed.pop(id(p), None)
            reasons[id(p)] = why
        _warn_first_order(name, module, why, reasons)
        return
    layers.append(layer)
    for p in layer.params:
        claimed[id(p)] = layer


def _warn_first_order(name: str, module: nn.Module, why: str, reasons: dict[int, str]) -> None:
    params = [n for n, _ in module.named_parameters(recurse=False)]
    warnings.warn(
        f"SPNGD: {name} ({type(module).__name__}; parameters {', '.join(params) or 'none'}) is trained with the "
        f"plain gradient: {why}",
        stacklevel=4,
    )
    for p in module.parameters(recurse=False):
        reasons[id(p)] = why


def _default_reason(model: nn.Module, pname: str, expected: bool) -> str:
    owner_name = pname.rsplit(".", 1)[0] if "." in pname else ""
    owner = model.get_submodule(owner_name) if owner_name else model
    if expected:
        return f"{type(owner).__name__} parameter outside any layer type's input-to-output map (first-order by design)"
    if isinstance(owner, nn.MultiheadAttention) and pname.endswith("in_proj_bias"):
        return "bias slices of in_proj_bias shared by the separate q/k/v projections (no curvature type)"
    if isinstance(owner, nn.MultiheadAttention):
        return "key/value bias rows appended to the keys and values (add_bias_kv; no curvature type)"
    return f"no curvature type for {type(owner).__name__} parameters"
