"""The smoothing methods hf_smooth knows, one row each; every other module reads this table.

A new method is one new row here (plus its formula in `hf_smooth.losses`, if it needs a new coefficient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["METHODS", "Method", "get_method"]


@dataclass(frozen=True)
class Method:
    """One method: its names, the loss keyword its strength goes to, the strength's range and default.

    Args:
        name: the value of ``smoothing_method`` / ``method=``.
        short: the spelling of a comparison arm (``recipes/compare.py --methods ce ls:0.1 maxsup:0.1-0.2``).
        label: the name in reports and tables.
        knob: the keyword of `hf_smooth.smoothed_cross_entropy` that takes the strength (``"epsilon"`` or
            ``"alpha"``), or None for plain cross-entropy, which has none.
        default: the strength when none is given.
        upper: the largest valid strength (label smoothing's epsilon is a probability mass), or None.
        summary: one line for help texts.
    """

    name: str
    short: str
    label: str
    knob: str | None
    default: float
    upper: float | None
    summary: str

    def check_strength(self, value: float, what: str = "strength") -> None:
        """`ValueError` naming `what` unless `value` is a valid strength for this method."""
        if self.knob is None:
            return
        value = float(value)
        upper = math.inf if self.upper is None else self.upper
        if not (0.0 <= value <= upper and math.isfinite(value)):  # NaN fails the comparison
            bound = f"in [0, {self.upper:g}]" if self.upper is not None else "a finite number >= 0"
            raise ValueError(f"{what}={value}: the {self.label} {self.knob} must be {bound}.")

    def knobs(self, strength: float, convention: str = "uniform") -> dict:
        """Keyword arguments of `hf_smooth.smoothed_cross_entropy` at this strength."""
        values = {"epsilon": 0.0, "alpha": 0.0, "convention": convention if self.knob == "epsilon" else "uniform"}
        if self.knob is not None:
            values[self.knob] = float(strength)
        return values


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("none", "ce", "CE", None, 0.0, None, "plain cross-entropy, exactly normalized"),
        Method("label_smoothing", "ls", "LS", "epsilon", 0.1, 1.0,
               "CE + eps*(z_y - mean z), the soft-target loss"),
        Method("maxsup", "maxsup", "MaxSup", "alpha", 0.1, None,
               "CE + alpha*(z_max - mean z), Max Suppression (arXiv 2502.15798)"),
    )
}


def get_method(name: str, *, allow_short: bool = False) -> Method:
    """The row for the method `name` (with ``allow_short``, also its short spelling, any case: ``ce``, ``LS``), or a
    `ValueError` listing the choices."""
    key = str(name).strip().lower() if allow_short else name
    for method in METHODS.values():
        if key == method.name or (allow_short and key == method.short):
            return method
    choices = ", ".join(repr(m.name) for m in METHODS.values())
    raise ValueError(f"Unknown method {name!r}; use one of {choices}.")
