"""Errors raised for bad configuration or data, before any training work starts."""

from __future__ import annotations

__all__ = ["MetaConfigError", "ShardError"]


class MetaConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix.

    The ``lightning-meta`` command prints these as one-line errors instead of tracebacks.
    """


class ShardError(MetaConfigError):
    """Shards are missing, truncated, corrupt or inconsistent with their index."""
