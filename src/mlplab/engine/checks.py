"""Argument checks for the engine, scikit-learn style.

Engine functions and classes reject a bad argument with `ArgumentError` (a
ValueError) that names the argument, its value and what is allowed. The config layer
(`mlplab.app.config`) maps the argument to the config key it came from, so the checks are
written once, here in the engine, and a user still reads the key they typed.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


class ArgumentError(ValueError):
    """`argument=value` is outside what is allowed."""

    def __init__(self, argument: str, value, allowed: str):
        super().__init__(f"{argument}={value!r}: {allowed}")
        self.argument, self.value, self.allowed = argument, value, allowed

    def __reduce__(self):  # picklable, as a launcher's worker sends it back
        return type(self), (self.argument, self.value, self.allowed)


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def require(ok: bool, argument: str, value, allowed: str) -> None:
    """Raise ArgumentError(argument, value, allowed) unless `ok`."""
    if not ok:
        raise ArgumentError(argument, value, allowed)


def positive(argument: str, value: float) -> None:
    """A finite number > 0 (rates, strengths, scales)."""
    require(_number(value) and math.isfinite(value) and value > 0,
            argument, value, "must be finite and > 0")


def non_negative(argument: str, value: float) -> None:
    require(_number(value) and math.isfinite(value) and value >= 0,
            argument, value, "must be finite and >= 0")


def positive_int(argument: str, value: int) -> None:
    require(isinstance(value, Integral) and not isinstance(value, bool) and value > 0,
            argument, value, "must be an integer > 0")


def non_negative_int(argument: str, value: int) -> None:
    require(isinstance(value, Integral) and not isinstance(value, bool) and value >= 0,
            argument, value, "must be an integer >= 0")


def fraction(argument: str, value: float) -> None:
    """A number in [0, 1): rates of dropout, momentum, betas, label smoothing."""
    require(_number(value) and 0 <= value < 1, argument, value,
            "must be in [0, 1)")


def one_of(argument: str, value, allowed) -> None:
    require(value in allowed, argument, value, f"allowed {tuple(allowed)}")


def settings_of(kind: str, name: str, settings: dict, allowed) -> None:
    """Every key of `settings` is one that `kind` `name` takes (e.g. the optimiser
    "momentum" takes momentum and nesterov)."""
    for key, value in settings.items():
        require(key in allowed, key, value,
                f"not a setting of {kind} {name!r} (allowed {tuple(allowed)})")
