"""Errors raised for bad configuration or data, before any training work starts."""

from __future__ import annotations

__all__ = ["MetaConfigError", "ShardError"]


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
