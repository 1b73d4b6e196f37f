"""Argument checks shared across the package, so every bad value is reported the same way."""

from __future__ import annotations

from collections.abc import Iterable


def check_choice(argument: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; else a TypeError/ValueError naming ``argument``."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}; got {value!r}")
    return value
