"""Keeps the promoted model in memory across invocations and notices a newly promoted one.

The pointer ``models/current.json`` is re-read at most every ``refresh_seconds``; a new version is downloaded once
to the cache folder, checked against its card's sha256, and swapped in. Without a registry the provider serves a
local artifact folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from core.model_registry import ModelRegistry, RegistryError
from scoring.classifier import Classifier


class ModelUnavailableError(RuntimeError):
    """No model can be served right now: the messages are retried."""


class ModelProvider:
    """The current ``Classifier``, refreshed from the registry at most every ``refresh_seconds``."""

    def __init__(
        self,
        registry: ModelRegistry | None,
        cache_dir: Path,
        refresh_seconds: float,
        local_model: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if registry is None and local_model is None:
            raise ValueError("a model registry or a local model folder is required")
        self._registry = registry
        self._cache_dir = cache_dir
        self._refresh_seconds = refresh_seconds
        self._local_model = local_model
        self._clock = clock
        self._classifier: Classifier | None = None
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
            if self._classifier is None:
                raise ModelUnavailableError(f"no model could be loaded: {error}") from error
            # The model in memory stays in service when a refresh fails; the next call tries again.
            return self._classifier
        self._checked_at = self._clock()
        return self._classifier

    def _load(self) -> Classifier:
        if self._local_model is not None:
            return self._classifier or Classifier.from_directory(self._local_model)
        assert self._registry is not None  # Guaranteed by the constructor.
        pointer = self._registry.current()
        if self._classifier is not None and self._classifier.spec.version == pointer.version:
            return self._classifier
        return Classifier.from_directory(self._registry.fetch(pointer, self._cache_dir))
