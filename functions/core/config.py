"""What every function raises when its environment lacks a setting."""

from __future__ import annotations


class ConfigurationError(RuntimeError):
    """A required setting is missing or malformed."""
