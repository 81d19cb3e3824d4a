"""The promotion gate: when a candidate model may replace the current one.

The floors come from the deployment (the template's parameters, through the promotion function's environment),
never from the request that asks for a promotion. AUCs are compared only when both models were evaluated on the
same data (the same ``data_manifest_sha256`` in their cards); and a model evaluated on too few test images is
never promoted, whatever its AUC, since its interval is too wide to mean anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.model_card import ServingSpec


@dataclass(frozen=True)
class GateFloor:
    """The least a candidate must show; the defaults (no floor) are for an operator's manual promotion."""

    minimum_test_auc: float = 0.0
    minimum_test_count: int = 0
    """The fewest test images the candidate's card may report (``metrics.test.count``)."""


def gate_refusal(candidate: ServingSpec, current: ServingSpec | None, floor: GateFloor) -> str | None:
    """Why ``candidate`` may not replace ``current`` (None when there is none yet), or None when it may."""
    return _below_floor(candidate, floor) or (_not_better(candidate, current) if current is not None else None)


def _below_floor(candidate: ServingSpec, floor: GateFloor) -> str | None:
    if candidate.test_auc is None:
        return f"{candidate.version} has no test AUC in its card"
    if candidate.test_count is None or candidate.test_count < floor.minimum_test_count:
        return (
            f"{candidate.version} was evaluated on {candidate.test_count} test images, fewer than the minimum "
            f"{floor.minimum_test_count}"
        )
    if candidate.test_auc < floor.minimum_test_auc:
        return f"{candidate.version} has test AUC {candidate.test_auc}, below the minimum {floor.minimum_test_auc}"
    return None


def _not_better(candidate: ServingSpec, current: ServingSpec) -> str | None:
    if candidate.data_manifest_sha256 is None or candidate.data_manifest_sha256 != current.data_manifest_sha256:
        return (
            f"{candidate.version} was evaluated on other data than current {current.version} (data manifest "
            f"{candidate.data_manifest_sha256} vs {current.data_manifest_sha256}): their AUCs are not comparable"
        )
    if current.test_auc is not None and candidate.test_auc is not None and candidate.test_auc < current.test_auc:
        return (
            f"{candidate.version} has test AUC {candidate.test_auc}, below current {current.version} "
            f"({current.test_auc})"
        )
    return None
