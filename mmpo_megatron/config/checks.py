"""The error every config check raises, and the one helper the checks use."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError ``field: message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
