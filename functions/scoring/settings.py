"""The scoring function's configuration, read once from the environment into a frozen value."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ConfigurationError
from core.population import AgeRangeOverride
from core.results import DEFAULT_BY_DAY_SHARDS
from scoring.pipeline import DEFAULT_IO_CONCURRENCY

DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
HEATMAP_POLICIES = {"Flagged": True, "OnRequest": False}
"""``HEATMAPS`` (the template's ``Heatmaps``) -> whether every flagged film gets a heatmap; either way a film whose
upload or backfill request asks for one gets it."""


@dataclass(frozen=True)
class Settings:
    """Where results go, where the model comes from, and the limits on input."""

    results_table: str
    input_bucket: str
    """The only bucket read: a record naming another (even the model bucket) is dropped, never read."""
    model_bucket: str | None
    model_path: Path | None
    """A local artifact folder that overrides the registry (tests, or a model bundled with the function)."""
    model_refresh_seconds: float
    model_cache_dir: Path
    max_image_bytes: int
    heatmap_bucket: str | None = None
    """Where heatmap overlays go; without it no heatmap is made."""
    heatmaps_for_flagged: bool = True
    """Whether every flagged film gets a heatmap (``HEATMAPS=Flagged``, the default when unset) or only those asked
    for (``OnRequest``)."""
    input_prefix: str = ""
    """Only keys under this prefix are read (the function's role can read nothing else)."""
    accepted_ages: AgeRangeOverride = field(default_factory=AgeRangeOverride)
    """Accepted patient ages set by the deployment (``MIN_PATIENT_AGE_YEARS``, ``MAX_PATIENT_AGE_YEARS``, the
    template's ``MinPatientAgeYears`` and ``MaxPatientAgeYears``); each bound left empty is the model card's."""
    io_concurrency: int = DEFAULT_IO_CONCURRENCY
    """S3 reads and DynamoDB writes of one batch in flight at once (``IO_CONCURRENCY``); 1 makes them sequential."""
    by_day_shards: int = DEFAULT_BY_DAY_SHARDS
    """Partition keys per day of the results table's by-day index (``RESULTS_BY_DAY_SHARDS``, the template's
    ``ResultsByDayShards``)."""

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] = os.environ) -> Settings:
        try:
            settings = cls(
                results_table=environment["RESULTS_TABLE"],
                input_bucket=environment["INPUT_BUCKET"],
                input_prefix=environment.get("INPUT_PREFIX", ""),
                model_bucket=environment.get("MODEL_BUCKET") or None,
                model_path=Path(environment["MODEL_PATH"]) if environment.get("MODEL_PATH") else None,
                model_refresh_seconds=float(environment.get("MODEL_REFRESH_SECONDS", "60")),
                model_cache_dir=Path(
                    environment.get("MODEL_CACHE_DIR", "/tmp/pneumoscan-models")
                ),  # Lambda: only /tmp is writable.
                max_image_bytes=int(environment.get("MAX_IMAGE_BYTES", str(DEFAULT_MAX_IMAGE_BYTES))),
                heatmap_bucket=environment.get("HEATMAP_BUCKET") or None,
                heatmaps_for_flagged=heatmap_policy(environment),
                accepted_ages=accepted_ages(environment),
                io_concurrency=int(environment.get("IO_CONCURRENCY", str(DEFAULT_IO_CONCURRENCY))),
                by_day_shards=int(environment.get("RESULTS_BY_DAY_SHARDS", str(DEFAULT_BY_DAY_SHARDS))),
            )
        except KeyError as missing:
            raise ConfigurationError(f"environment variable {missing} is required") from missing
        except ValueError as error:
            raise ConfigurationError(f"malformed setting: {error}") from error
        if not settings.input_bucket:
            raise ConfigurationError("INPUT_BUCKET must name the input bucket")
        if settings.model_bucket is None and settings.model_path is None:
            raise ConfigurationError("set MODEL_BUCKET (the model registry) or MODEL_PATH (a local artifact)")
        if settings.io_concurrency < 1:
            raise ConfigurationError("IO_CONCURRENCY must be at least 1")
        if settings.by_day_shards < 1:
            raise ConfigurationError("RESULTS_BY_DAY_SHARDS must be at least 1")
        lowest, highest = settings.accepted_ages.min_years, settings.accepted_ages.max_years_exclusive
        if lowest is not None and highest is not None and lowest >= highest:
            raise ConfigurationError("MIN_PATIENT_AGE_YEARS must be below MAX_PATIENT_AGE_YEARS")
        return settings


def heatmap_policy(environment: Mapping[str, str]) -> bool:
    """Whether ``HEATMAPS`` (unset or empty: ``Flagged``) asks for a heatmap of every flagged film; raises
    ``ValueError`` for a value that is neither policy."""
    text = environment.get("HEATMAPS", "").strip() or "Flagged"
    if text not in HEATMAP_POLICIES:
        raise ValueError(f"HEATMAPS must be one of {', '.join(HEATMAP_POLICIES)}")
    return HEATMAP_POLICIES[text]


def accepted_ages(environment: Mapping[str, str]) -> AgeRangeOverride:
    """The accepted-age bounds of ``MIN_PATIENT_AGE_YEARS`` and ``MAX_PATIENT_AGE_YEARS`` (each unset or empty: the
    card's); raises ``ValueError`` for a bound that is not a number of years."""
    return AgeRangeOverride(_years(environment, "MIN_PATIENT_AGE_YEARS"), _years(environment, "MAX_PATIENT_AGE_YEARS"))


def _years(environment: Mapping[str, str], name: str) -> float | None:
    """An age bound in years, or None when the variable is unset or empty (the card's bound applies)."""
    text = environment.get(name, "").strip()
    if not text:
        return None
    try:
        years = float(text)
    except ValueError:
        years = math.nan
    if not math.isfinite(years) or years < 0:
        raise ValueError(f"{name} must be a number of years, at least 0")
    return years
