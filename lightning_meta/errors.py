"""Errors raised for bad configuration or data, before any training work starts."""

from __future__ import annotations

import math
import numbers
import os

import torch

__all__ = [
    "MetaConfigError",
    "ShardError",
    "as_integer",
    "require_file_name",
    "require_int",
    "require_non_negative",
    "require_number",
    "require_positive",
]


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
    number = require_number(name, value, why)
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
    number = require_number(name, value, why)
    if not (math.isfinite(number) and number >= 0):
        raise MetaConfigError(f"{name}={value} must be >= 0 and finite ({why})")
    return number


def require_number(name: str, value: object, why: str) -> float:
    """Return ``float(value)`` for a real number; refuse strings, booleans and other objects.

    ``float("0.1")`` and ``float(True)`` succeed, so a string or a boolean given from Python would
    otherwise pass a range check and fail (or silently mean 1) deep inside training.

    Example:
        >>> require_number("lr", 1e-3, "the outer learning rate")
        0.001
        >>> require_number("lr", "1e-3", "the outer learning rate")
        Traceback (most recent call last):
        ...
        lightning_meta.errors.MetaConfigError: lr='1e-3' must be a number, not str (the outer learning rate)

    """
    if _is_one_element(value) and not value.dtype.is_complex and value.dtype != torch.bool:
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MetaConfigError(f"{name}={value!r} must be a number, not {type(value).__name__} ({why})")
    return float(value)


def require_int(name: str, value: object, minimum: int, why: str = "") -> int:
    """Return ``int(value)`` for an integer ``>= minimum``; refuse floats, strings and booleans.

    Example:
        >>> require_int("shots", 5, 1)
        5
        >>> require_int("shots", 1.5, 1, "support examples per class")
        Traceback (most recent call last):
        ...
        lightning_meta.errors.MetaConfigError: shots=1.5 must be an integer >= 1, not float (support examples per class)

    """
    note = f" ({why})" if why else ""
    number = as_integer(value)
    if number is None:
        raise MetaConfigError(f"{name}={value!r} must be an integer >= {minimum}, not {type(value).__name__}{note}")
    if number < minimum:
        raise MetaConfigError(f"{name}={value} must be >= {minimum}{note}")
    return number


def as_integer(value: object) -> int | None:
    """``int(value)`` for an integer (Python, numpy, or a one-element integer tensor), else ``None``.

    Booleans, floats (even ``2.0``) and strings are not integers here.

    Example:
        >>> as_integer(3), as_integer(torch.tensor(4)), as_integer(2.0), as_integer(True)
        (3, 4, None, None)

    """
    if _is_one_element(value) and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def require_file_name(name: str, value: object, example: str) -> str:
    """Return ``value`` if it is a plain file name (no folder part, not ``.``/``..``), else refuse it.

    Example:
        >>> require_file_name("filename", "results.json", "results.json")
        'results.json'
        >>> require_file_name("filename", "..", "results.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_meta.errors.MetaConfigError: filename='..' must be a plain file name such as 'results.json' ...

    """
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    if not isinstance(value, str) or value in ("", ".", "..") or any(s in value for s in seps):
        raise MetaConfigError(
            f"{name}={value!r} must be a plain file name such as {example!r} (no folder part, not '.' or '..')"
        )
    return value



def _is_one_element(value: object) -> bool:
    """A one-element tensor (``torch.tensor(0.4)``), read as the number it holds."""
    return isinstance(value, torch.Tensor) and value.numel() == 1
