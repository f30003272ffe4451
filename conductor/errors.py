"""Errors the scheduling core raises on purpose; each says what was wrong and what to do."""
from __future__ import annotations


class ConductorError(Exception):
    """Base class of the scheduling core's errors."""


class InvalidSetting(ConductorError, ValueError):
    """A settings change was refused; nothing was changed. `name` is the offending field."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class CostModelError(ConductorError, ValueError):
    """A cost-model file is missing or malformed, or a fit had too little data."""


class IndexSyncError(ConductorError):
    """A KV event cannot be applied to the global prefix index (e.g. a malformed event)."""
