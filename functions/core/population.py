"""The population a model was validated on, and the ages it accepts.

The model card declares the population (``population``: a description, the data set's ages, the accepted age
range); cards written before it existed get ``DEFAULT_POPULATION``, the Kermany et al. (2018) data set every model
here is trained on: chest radiographs of children aged one to five. An upload that states the patient's age (DICOM
``PatientAge``, or the object metadata ``patient-age``) outside the accepted range is rejected as
``OUTSIDE_VALIDATED_POPULATION``; an upload that states no age, or one that cannot be read, is scored.

An age is patient data: it is parsed here into a number that is compared and dropped. No text quotes it: the
rejection's detail names the accepted range only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from core.rejections import InvalidImageError, RejectionReason

DAYS_PER_YEAR = 365.25
_UNIT_YEARS = {"D": 1 / DAYS_PER_YEAR, "W": 7 / DAYS_PER_YEAR, "M": 1 / 12, "Y": 1.0}
_AGE_STRING = re.compile(r"(\d{1,3})\s*([DWMY])", re.IGNORECASE)
"""DICOM's Age String (AS): ``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``; fewer digits are read too."""
_PLAIN_YEARS = re.compile(r"\d{1,3}(?:\.\d+)?")
"""A plain number, as some anonymised archives and upload pipelines write an age: years."""


def age_in_years(text: object) -> float | None:
    """The age a DICOM ``PatientAge`` or a metadata value states, in years; None when it states none or cannot
    be read as one (it then counts as no stated age)."""
    if not isinstance(text, str):
        return None
    stripped = text.strip().rstrip("\x00").strip()
    if match := _AGE_STRING.fullmatch(stripped):
        return int(match.group(1)) * _UNIT_YEARS[match.group(2).upper()]
    if _PLAIN_YEARS.fullmatch(stripped):
        return float(stripped)
    return None


@dataclass(frozen=True)
class AgeRange:
    """Accepted ages in years: from ``min_years`` up to, not including, ``max_years_exclusive``."""

    min_years: float
    max_years_exclusive: float

    def __post_init__(self) -> None:
        finite = math.isfinite(self.min_years) and math.isfinite(self.max_years_exclusive)
        if not finite or self.min_years < 0 or self.min_years >= self.max_years_exclusive:
            raise ValueError(f"an age range needs 0 <= min < max, not {self.min_years} and {self.max_years_exclusive}")

    def contains(self, years: float) -> bool:
        return self.min_years <= years < self.max_years_exclusive

    def describe(self) -> str:
        """The range in words, e.g. ``0 to under 18 years``."""
        return f"{self.min_years:g} to under {self.max_years_exclusive:g} years"


@dataclass(frozen=True)
class Population:
    """What a model card declares about the patients the model was validated on."""

    description: str
    data_set_ages_years: tuple[float, float] | None
    """The ages of the data set's patients, youngest and oldest; None when the card does not say."""
    accepted: AgeRange
    """Ages scored; an upload stating another is ``OUTSIDE_VALIDATED_POPULATION``."""

    @classmethod
    def from_card(cls, section: dict[str, Any] | None) -> Population:
        """The card's ``population`` section, or ``DEFAULT_POPULATION`` for a card without one; raises
        ``KeyError``, ``TypeError`` or ``ValueError`` for a malformed section."""
        if section is None:
            return DEFAULT_POPULATION
        ages = section.get("data_set_ages_years")
        accepted = section["accepted_age_years"]
        return cls(
            description=str(section["description"]),
            data_set_ages_years=None if ages is None else (float(ages[0]), float(ages[1])),
            accepted=AgeRange(float(accepted["min"]), float(accepted["max_exclusive"])),
        )

    def to_card(self) -> dict[str, Any]:
        """The card's ``population`` section."""
        section: dict[str, Any] = {"description": self.description}
        if self.data_set_ages_years is not None:
            section["data_set_ages_years"] = [_number(age) for age in self.data_set_ages_years]
        section["accepted_age_years"] = {
            "min": _number(self.accepted.min_years),
            "max_exclusive": _number(self.accepted.max_years_exclusive),
        }
        return section


def _number(value: float) -> float | int:
    """Whole numbers as ints, so a card reads ``18``, not ``18.0``."""
    return int(value) if float(value).is_integer() else value


DEFAULT_POPULATION = Population(
    description="pediatric chest radiographs (Kermany et al. 2018: children aged one to five)",
    data_set_ages_years=(1.0, 5.0),
    accepted=AgeRange(0.0, 18.0),
)
"""The population of the data set every model here is trained on, and of every card that declares none: children;
adults (18 and over) are refused."""


@dataclass(frozen=True)
class AgeRangeOverride:
    """Bounds the deployment sets over the card's (template parameters): each one given replaces the card's."""

    min_years: float | None = None
    max_years_exclusive: float | None = None

    def applied_to(self, card_range: AgeRange) -> AgeRange:
        """The accepted range: this override's bounds where given, the card's elsewhere."""
        return AgeRange(
            card_range.min_years if self.min_years is None else self.min_years,
            card_range.max_years_exclusive if self.max_years_exclusive is None else self.max_years_exclusive,
        )


def outside_detail(accepted: AgeRange) -> str:
    """The fixed detail of an ``OUTSIDE_VALIDATED_POPULATION`` rejection: the accepted range, never the age."""
    return f"the stated patient age is outside the model's validated population (accepted: {accepted.describe()})"


def check_stated_age(age_years: float | None, accepted: AgeRange) -> None:
    """Raise ``OUTSIDE_VALIDATED_POPULATION`` when an age is stated and outside ``accepted``; no age passes."""
    if age_years is not None and not accepted.contains(age_years):
        raise InvalidImageError(RejectionReason.OUTSIDE_VALIDATED_POPULATION, outside_detail(accepted))
