"""SP-NGD's hyperparameters as the application sees them, generated from :class:`spngd_ext.options.SPNGDOptions`.

The library's options dataclass is the single list of SP-NGD hyperparameters. From it this module
derives, with no second list:

* :class:`SpngdSettings`, a dataclass with one field per option that the command line can express
  (plain values: strings for the enums, floats for the damping), the base of
  :class:`~spngd_ext.train.cli.TrainConfig` and :class:`~spngd_ext.train.baselines.OptimizerSettings`;
* :func:`add_spngd_flags`, one ``--<name-with-dashes>`` flag per such option, typed from the
  field's annotation, helped from its ``metadata["help"]``, validated by the dataclass itself;
* :func:`spngd_kwargs`, the keyword arguments for ``SPNGD(model, **kwargs)``.

Left out: the settings every optimizer shares (:data:`SHARED_SETTINGS`, which the application
defines itself) and options marked ``metadata["cli"] = False`` (no command-line form).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any, Union

from spngd_ext.options import SPNGDOptions

__all__ = ["SHARED_SETTINGS", "ALSO_ASDL", "SpngdSettings", "add_spngd_flags", "spngd_kwargs", "spngd_option_names"]

# lr, momentum and weight decay apply to every optimizer and have per-optimizer defaults; the seed
# is the run's (data order, initial weights), passed on to SP-NGD's label sampling.
SHARED_SETTINGS = ("lr", "momentum", "weight_decay", "seed")
# Options ASDL's K-FAC baseline reads too (named in their help).
ALSO_ASDL = ("damping", "fisher", "mc_samples", "curvature_interval", "inverse_interval")


@dataclasses.dataclass(frozen=True)
class _CliForm:
    """How one option appears on the command line."""

    name: str
    value_type: type  # bool, int, float or str
    default: Any
    optional: bool  # None is a valid value (and the default)
    choices: tuple[str, ...] | None
    help: str


def _cli_form(f: dataclasses.Field, hint: Any) -> _CliForm:
    members: tuple[Any, ...] = (hint,)
    if typing.get_origin(hint) in (Union, types.UnionType):
        members = typing.get_args(hint)
    optional = type(None) in members
    concrete = [m for m in members if m is not type(None)]
    base = concrete[0]  # e.g. damping: float | schedule -> float; stale: bool | StalePolicy -> bool
    default = f.default
    choices = None
    if isinstance(base, type) and issubclass(base, enum.Enum):
        choices = tuple(e.value for e in base)
        default = default.value if isinstance(default, enum.Enum) else default
        value_type: type = str
    elif base in (bool, int, float):
        value_type = base
    else:
        raise TypeError(
            f"SPNGDOptions.{f.name}: the command line has no form for {hint!r}; "
            "give it metadata cli=False or a bool/int/float/enum type"
        )
    text = f.metadata["help"] + (" (also asdl-kfac)" if f.name in ALSO_ASDL else "")
    return _CliForm(f.name, value_type, default, optional, choices, text)


def _forms() -> list[_CliForm]:
    hints = typing.get_type_hints(SPNGDOptions)
    return [
        _cli_form(f, hints[f.name])
        for f in dataclasses.fields(SPNGDOptions)
        if f.name not in SHARED_SETTINGS and f.metadata.get("cli", True)
    ]


_FORMS = _forms()


def spngd_option_names() -> tuple[str, ...]:
    """The SP-NGD options the application exposes (fields of :class:`SpngdSettings`)."""
    return tuple(form.name for form in _FORMS)


def _field_type(form: _CliForm) -> Any:
    return form.value_type | None if form.optional else form.value_type


SpngdSettings = dataclasses.make_dataclass(
    "SpngdSettings",
    [(form.name, _field_type(form), dataclasses.field(default=form.default)) for form in _FORMS],
    kw_only=True,
)
SpngdSettings.__module__ = __name__
SpngdSettings.__doc__ = "The SP-NGD options of :class:`SPNGDOptions` that the application exposes, as plain values."


def _validating(form: _CliForm):
    """argparse ``type``: convert the text, then let SPNGDOptions judge the value."""

    def parse(text: str):
        try:
            value = form.value_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {form.value_type.__name__}") from None
        try:
            SPNGDOptions(**{form.name: value})
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    parse.__name__ = form.value_type.__name__
    return parse


def add_spngd_flags(parser: argparse.ArgumentParser) -> None:
    """Add one ``--<name-with-dashes>`` flag per exposed SP-NGD option.

    Args:
        parser: the parser to extend; each flag's destination is the option's name.
    """
    group = parser.add_argument_group("SP-NGD", "options of spngd_ext.SPNGD (see its docstring)")
    for form in _FORMS:
        flag = "--" + form.name.replace("_", "-")
        if form.value_type is bool:
            action = argparse.BooleanOptionalAction if form.default else "store_true"
            group.add_argument(flag, action=action, default=form.default, help=form.help)
        elif form.choices is not None:
            group.add_argument(flag, choices=form.choices, default=form.default, help=form.help)
        else:
            group.add_argument(flag, type=_validating(form), default=form.default, help=form.help)


def spngd_kwargs(settings: Any) -> dict[str, Any]:
    """The exposed SP-NGD options of ``settings`` (any object with those attributes) as keyword
    arguments for ``SPNGD(model, **kwargs)``.

    Args:
        settings: a :class:`SpngdSettings` (or subclass) instance.
    """
    return {form.name: getattr(settings, form.name) for form in _FORMS}
