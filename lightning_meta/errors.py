"""Errors raised for bad configuration or data, before any training work starts."""

from __future__ import annotations

import math

__all__ = ["MetaConfigError", "ShardError", "require_non_negative", "require_positive"]


class MetaConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix.

    The ``lightning-meta`` command prints these as one-line errors instead of tracebacks. The
    most recent instance is remembered so that the command can find it again when a library
    (jsonargparse, while instantiating classes) re-raises it wrapped in another exception.
    """

    last: MetaConfigError | None = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        MetaConfigError.last = self


class ShardError(MetaConfigError):
    """Shards are missing, truncated, corrupt or inconsistent with their index."""


def require_positive(name: str, value: float, why: str) -> float:
    """Return ``float(value)``, or raise :class:`MetaConfigError` unless it is finite and > 0.

    ``value <= 0`` alone lets NaN through; this refuses NaN and infinities too.

    Example:
        >>> require_positive("temperature", 0.5, "logits are divided by it")
        0.5
        >>> require_positive("temperature", float("nan"), "logits are divided by it")
        Traceback (most recent call last):
        ...
        lightning_meta.errors.MetaConfigError: temperature=nan must be > 0 and finite (logits are divided by it)

    """
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise MetaConfigError(f"{name}={value} must be > 0 and finite ({why})")
    return number


def require_non_negative(name: str, value: float, why: str) -> float:
    """Return ``float(value)``, or raise :class:`MetaConfigError` unless it is finite and >= 0.

    Example:
        >>> require_non_negative("retry_delay", 0, "seconds before the first retry")
        0.0
        >>> require_non_negative("cache_mb", float("inf"), "0 disables the cache")
        Traceback (most recent call last):
        ...
        lightning_meta.errors.MetaConfigError: cache_mb=inf must be >= 0 and finite (0 disables the cache)

    """
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise MetaConfigError(f"{name}={value} must be >= 0 and finite ({why})")
    return number
