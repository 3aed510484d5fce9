"""The error every config check raises, and the one helper the checks use."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def choices(values: tuple) -> str:
    """The allowed values for an error message: ``a, b or c`` (None as null, YAML's word)."""
    words = ["null" if value is None else str(value) for value in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError ``field: message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
