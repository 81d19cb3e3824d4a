"""The one object of an execution environment (a pipeline, a feed, an enqueuer and their clients), built on first
use and reused across invocations; the local stack and tests inject their own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Provider(Generic[T]):
    """Builds its value once, on the first ``get``; ``set`` replaces it (None: build again on the next ``get``)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None

    def get(self) -> T:
        if self._value is None:
            self._value = self._build()
        return self._value

    def set(self, value: T | None) -> None:
        self._value = value
