"""The screening stage: can this film be read at all, before the model says what it shows?

A classifier trained on two kinds of chest films answers NORMAL or PNEUMONIA for anything it is given. The stage
runs the artifact's checks in a fixed order over a batch; the first check that refuses a film decides its
rejection (a reason and a fixed detail), and a film no check refuses is scored. The checks, in order:

1. ``input_gate``: not a chest radiograph the model can read (``NOT_A_CHEST_XRAY``, ``core.input_gate``): what an
   image is comes before whether it can be read, so a small photograph is still called what it is;
2. ``source_resolution``: the decoded file is smaller than the model can read (``NON_DIAGNOSTIC_IMAGE``);
3. ``condition_judged``: the film-condition head could not judge the film (``NON_DIAGNOSTIC_IMAGE``);
4. ``inverted``: the grey levels are inverted (``INVERTED_IMAGE``);
5. ``rotated``: the film is turned by 90, 180 or 270 degrees (``ROTATED_IMAGE``);
6. ``partial``, ``occluded``, ``blurred``: only part of the chest, the lungs covered, or too blurred to read
   (``NON_DIAGNOSTIC_IMAGE``, each with its own detail).

Checks 3-6 read one film-condition head (``core.film_condition``); an artifact without a gate or a head is
screened by the checks it has. Each check carries the figures its card measured, so what refuses a film and how
well it was measured to do so travel together. A new check is one small class with ``name``, ``reason``,
``figures`` and ``judge``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from core.film_condition import UNJUDGED, ConditionHead, ConditionHeadError
from core.input_gate import InputGate
from core.rejections import RejectionReason

SOURCE_SHARE_OF_INPUT = 0.75
"""A file whose shorter side is below this share of the model's input side is refused: the model would read a film
blown up from too few pixels. Not the whole side, because a film cropped by 10-15% from a copy at the input size
is still a readable film."""

TOO_FEW_PIXELS = "the image is smaller than the model's input: too few pixels to read a chest film"
CONDITION_UNJUDGED = "the screening checks could not judge whether the film can be read"
GATE_UNJUDGED = "the input gate could not judge the image: the model gave no features"
INVERTED = "the film's grey levels are inverted (bone dark, air bright); send it as displayed for diagnosis"
ROTATED = "the film is turned by 90, 180 or 270 degrees; send it upright"
PARTIAL = "the image shows only part of the chest film (a quarter or a half of it)"
OCCLUDED = "the lungs are covered (a box over the lung fields)"
BLURRED = "the film is too blurred to read (heavy blur, or a small thumbnail blown up)"


@dataclass(frozen=True)
class Films:
    """One batch as the checks see it: the model inputs, the model's pooled features and each file's source size."""

    pixels: np.ndarray
    """``(n, size, size, 1)`` uint8 model inputs."""
    features: np.ndarray | None
    """``(n, features)`` pooled features of the model, or None for a model without that output."""
    source_sizes: tuple[tuple[int, int], ...]
    """Each decoded file's width and height before it was resized to the model's input."""
    _conditions: dict[int, list[str]] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.pixels)

    def conditions(self, head: ConditionHead) -> list[str]:
        """The head's condition of each film, computed once per batch however many checks read it."""
        if id(head) not in self._conditions:
            if self.features is None:
                self._conditions[id(head)] = [UNJUDGED] * len(self)
            else:
                self._conditions[id(head)] = head.conditions(self.pixels, self.features)
        return self._conditions[id(head)]


class Check(Protocol):
    """One check of the stage: which films it refuses, with one reason and fixed details."""

    @property
    def name(self) -> str: ...

    @property
    def reason(self) -> RejectionReason: ...

    @property
    def figures(self) -> Mapping[str, Any]:
        """What the artifact's card measured for this check (empty when it measured nothing)."""
        ...

    def judge(self, films: Films) -> list[str | None]:
        """For each film, the fixed detail of its refusal, or None when this check lets it through."""
        ...


@dataclass(frozen=True)
class Refusal:
    """Why the stage refuses a film: the check, its reason and a fixed detail."""

    check: str
    reason: RejectionReason
    detail: str


@dataclass(frozen=True)
class SourceResolutionCheck:
    """Refuses files whose shorter side is below ``min_side`` pixels."""

    min_side: int
    name: str = "source_resolution"
    reason: RejectionReason = RejectionReason.NON_DIAGNOSTIC_IMAGE
    figures: Mapping[str, Any] = field(default_factory=dict)

    def judge(self, films: Films) -> list[str | None]:
        return [TOO_FEW_PIXELS if min(width, height) < self.min_side else None for width, height in films.source_sizes]


@dataclass(frozen=True)
class InputGateCheck:
    """Refuses what the input gate does not accept as a chest radiograph (``core.input_gate``)."""

    gate: InputGate
    name: str = "input_gate"
    reason: RejectionReason = RejectionReason.NOT_A_CHEST_XRAY
    figures: Mapping[str, Any] = field(default_factory=dict)

    def judge(self, films: Films) -> list[str | None]:
        if films.features is None:  # A model with a gate always gives features; without them nothing is judged.
            return [GATE_UNJUDGED] * len(films)
        return [verdict.refusal for verdict in self.gate.check(films.pixels, films.features)]


@dataclass(frozen=True)
class ConditionCheck:
    """Refuses films whose condition, as the film-condition head reads it, is one of ``conditions``."""

    head: ConditionHead
    name: str
    reason: RejectionReason
    detail: str
    conditions: frozenset[str]
    figures: Mapping[str, Any] = field(default_factory=dict)

    def judge(self, films: Films) -> list[str | None]:
        return [self.detail if condition in self.conditions else None for condition in films.conditions(self.head)]


@dataclass(frozen=True)
class ScreeningStage:
    """The checks of one artifact, in the order they run."""

    checks: tuple[Check, ...]

    def screen(self, films: Films) -> list[Refusal | None]:
        """For each film, the first check's refusal, or None when every check lets it through."""
        refusals: list[Refusal | None] = [None] * len(films)
        for check in self.checks:
            for position, detail in enumerate(check.judge(films)):
                if detail is not None and refusals[position] is None:
                    refusals[position] = Refusal(check.name, check.reason, detail)
        return refusals

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(check.name for check in self.checks)


HEAD_CHECKS: tuple[tuple[str, RejectionReason, str, frozenset[str]], ...] = (
    ("condition_judged", RejectionReason.NON_DIAGNOSTIC_IMAGE, CONDITION_UNJUDGED, frozenset({UNJUDGED})),
    ("inverted", RejectionReason.INVERTED_IMAGE, INVERTED, frozenset({"inverted"})),
    ("rotated", RejectionReason.ROTATED_IMAGE, ROTATED, frozenset({"rotated_90", "rotated_180", "rotated_270"})),
    ("partial", RejectionReason.NON_DIAGNOSTIC_IMAGE, PARTIAL, frozenset({"partial"})),
    ("occluded", RejectionReason.NON_DIAGNOSTIC_IMAGE, OCCLUDED, frozenset({"occluded"})),
    ("blurred", RejectionReason.NON_DIAGNOSTIC_IMAGE, BLURRED, frozenset({"blurred"})),
)
"""The checks read from the film-condition head, in order: name, reason, detail and the head's classes."""


def minimum_source_side(input_size: int) -> int:
    """The shortest side a file may have for a model whose input has ``input_size`` pixels a side."""
    return math.ceil(SOURCE_SHARE_OF_INPUT * input_size)


def build_stage(
    input_size: int,
    gate: InputGate | None = None,
    head: ConditionHead | None = None,
    figures: Mapping[str, Mapping[str, Any]] | None = None,
) -> ScreeningStage:
    """The stage of an artifact: the source resolution check always, the gate and the head's checks when it has
    them, each with the figures its card measured (``figures`` by check name)."""
    measured = figures or {}
    checks: list[Check] = []
    if gate is not None:
        checks.append(InputGateCheck(gate, figures=measured.get("input_gate", {})))
    checks.append(SourceResolutionCheck(minimum_source_side(input_size), figures=measured.get("source_resolution", {})))
    if head is not None:
        checked = {name for _, _, _, names in HEAD_CHECKS for name in names} - {UNJUDGED}
        if set(head.classes[1:]) != checked:
            # A class no check refuses would be scored unseen; a check without its class would never refuse.
            raise ConditionHeadError(
                f"the screening head's classes {head.classes[1:]} are not the checks' {sorted(checked)}"
            )
        checks.extend(
            ConditionCheck(head, name, reason, detail, conditions, figures=measured.get(name, {}))
            for name, reason, detail, conditions in HEAD_CHECKS
        )
    return ScreeningStage(tuple(checks))
