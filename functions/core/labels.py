"""The answer's vocabulary: the three labels and the operating points that turn a calibrated probability into one.

A stated label is always the likelier class: NORMAL only when P(pneumonia) < 0.5, PNEUMONIA only when it is at
least 0.5, so a label's confidence (the calibrated probability of that label) is never below 0.5. Where the
screening operating point chosen on validation is not 0.5, the films between it and 0.5 are INDETERMINATE: refer
to a reader. Screening counts them as flagged (only NORMAL is a negative screen).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

EVEN_ODDS = 0.5
"""The probability at which neither class is the likelier one."""


class Label(StrEnum):
    """What a scored film is called."""

    NORMAL = "NORMAL"
    INDETERMINATE = "INDETERMINATE"
    PNEUMONIA = "PNEUMONIA"


@dataclass(frozen=True)
class Call:
    """A label and its confidence: the calibrated probability of the label, or for INDETERMINATE that of the
    likelier class; never below 0.5."""

    label: Label
    confidence: float

    @property
    def flagged(self) -> bool:
        """Whether screening refers the film: anything not called NORMAL."""
        return self.label is not Label.NORMAL


@dataclass(frozen=True)
class OperatingPoints:
    """NORMAL below ``normal_below``, PNEUMONIA from ``pneumonia_from``, INDETERMINATE between."""

    normal_below: float
    pneumonia_from: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.normal_below <= EVEN_ODDS <= self.pneumonia_from <= 1.0:
            raise ValueError(
                "operating points must satisfy 0 <= normal_below <= 0.5 <= pneumonia_from <= 1, got "
                f"{self.normal_below} and {self.pneumonia_from}"
            )

    @classmethod
    def around(cls, screening_point: float) -> OperatingPoints:
        """The band between a screening point and 0.5 (empty when the point is 0.5)."""
        return cls(normal_below=min(screening_point, EVEN_ODDS), pneumonia_from=max(screening_point, EVEN_ODDS))

    def call(self, pneumonia_probability: float) -> Call:
        """The label of a calibrated P(pneumonia)."""
        if pneumonia_probability < self.normal_below:
            return Call(Label.NORMAL, 1.0 - pneumonia_probability)
        if pneumonia_probability >= self.pneumonia_from:
            return Call(Label.PNEUMONIA, pneumonia_probability)
        return Call(Label.INDETERMINATE, max(pneumonia_probability, 1.0 - pneumonia_probability))

    def to_dict(self) -> dict[str, float]:
        return {"normal_below": self.normal_below, "pneumonia_from": self.pneumonia_from}
