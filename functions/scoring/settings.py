"""The scoring function's configuration, read once from the environment into a frozen value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigurationError

DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024


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
    input_prefix: str = ""
    """Only keys under this prefix are read (the function's role can read nothing else)."""

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
            )
        except KeyError as missing:
            raise ConfigurationError(f"environment variable {missing} is required") from missing
        except ValueError as error:
            raise ConfigurationError(f"malformed setting: {error}") from error
        if not settings.input_bucket:
            raise ConfigurationError("INPUT_BUCKET must name the input bucket")
        if settings.model_bucket is None and settings.model_path is None:
            raise ConfigurationError("set MODEL_BUCKET (the model registry) or MODEL_PATH (a local artifact)")
        return settings
