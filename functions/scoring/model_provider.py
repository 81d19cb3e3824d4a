"""Keeps the promoted model in memory across invocations and notices a newly promoted one.

The pointer ``models/current.json`` is re-read at most every ``refresh_seconds``; a new version (or new pins of the
same one) is downloaded once to the cache folder, each file checked against the sha256 the pointer pins, and
swapped in. A promoted model that cannot be verified is refused and reported: with a model in memory, that model
keeps serving; without one, nothing is served and the records are retried. Without a registry the provider serves a
local artifact folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.model_card import ModelArtifactError
from core.model_registry import ModelPointer, ModelRegistry, RegistryError
from scoring.classifier import Classifier

REFUSED_KEEPING = (
    "promoted model refused: its files are not the ones models/current.json pins; the model in memory keeps serving"
)
REFUSED_SERVING_NOTHING = (
    "promoted model refused: its files are not the ones models/current.json pins; no model is served and the "
    "records are retried"
)


class ModelUnavailableError(RuntimeError):
    """No model can be served right now: the messages are retried."""


@dataclass(frozen=True)
class ModelRefusal:
    """A model the provider would not serve: a file differs from its pin or its card, or the pointer pins none."""

    refused_version: str | None
    """The promoted version refused; None for a local artifact folder."""
    serving_version: str | None
    """The version in memory that keeps serving; None when nothing is served."""
    detail: str
    """What failed: file names and checksums only."""

    @property
    def message(self) -> str:
        """The fixed text to log and alert on."""
        return REFUSED_KEEPING if self.serving_version is not None else REFUSED_SERVING_NOTHING


class ModelProvider:
    """The current ``Classifier``, refreshed from the registry at most every ``refresh_seconds``."""

    def __init__(
        self,
        registry: ModelRegistry | None,
        cache_dir: Path,
        refresh_seconds: float,
        local_model: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_refused: Callable[[ModelRefusal], None] | None = None,
    ) -> None:
        """``on_refused`` is told about every model refused, at a cold start or at a refresh."""
        if registry is None and local_model is None:
            raise ValueError("a model registry or a local model folder is required")
        self._registry = registry
        self._cache_dir = cache_dir
        self._refresh_seconds = refresh_seconds
        self._local_model = local_model
        self._clock = clock
        self._on_refused = on_refused
        self._classifier: Classifier | None = None
        self._pointer: ModelPointer | None = None
        """The pointer the classifier in memory was loaded and verified under."""
        self._promoted: ModelPointer | None = None
        """The pointer read last."""
        self._checked_at = float("-inf")

    @property
    def loaded_version(self) -> str | None:
        """The version in memory, without loading or refreshing anything."""
        return self._classifier.spec.version if self._classifier is not None else None

    def expire(self) -> None:
        """Re-read the promoted model's pointer on the next ``get``, whatever the refresh interval."""
        self._checked_at = float("-inf")

    def get(self) -> Classifier:
        """The classifier to score with, loading or refreshing it when due."""
        if self._classifier is not None and self._clock() - self._checked_at < self._refresh_seconds:
            return self._classifier
        try:
            self._classifier = self._load()
        except (RegistryError, OSError, ValueError, RuntimeError) as error:
            if isinstance(error, ModelArtifactError) and self._on_refused is not None:
                refused = self._promoted.version if self._promoted is not None else None
                self._on_refused(ModelRefusal(refused, self.loaded_version, str(error)))
            if self._classifier is None:
                raise ModelUnavailableError(f"no model could be loaded: {error}") from error
            # The model in memory stays in service when a refresh fails; the next refresh tries again.
            self._checked_at = self._clock()
            return self._classifier
        self._checked_at = self._clock()
        return self._classifier

    def _load(self) -> Classifier:
        if self._local_model is not None:
            return self._classifier or Classifier.from_directory(self._local_model)
        assert self._registry is not None  # Guaranteed by the constructor.
        self._promoted = pointer = self._registry.current()
        if self._classifier is not None and self._pointer is not None and _same_pins(self._pointer, pointer):
            return self._classifier
        classifier = Classifier.from_directory(self._registry.fetch(pointer, self._cache_dir))
        self._pointer = pointer
        return classifier


def _same_pins(loaded: ModelPointer, promoted: ModelPointer) -> bool:
    """Whether ``promoted`` names the very files the model in memory was verified against."""
    return loaded.version == promoted.version and loaded.files == promoted.files
