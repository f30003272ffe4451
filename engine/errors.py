"""Errors the engine raises; each names what was wrong so a server can map it to a status."""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request field has a bad value. `field` names it (e.g. ``sampling.top_p``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OutOfBlocksError(EngineError):
    """The KV block pool cannot hold a request even when it runs alone."""


class ModelLoadError(EngineError):
    """The model files are missing or malformed."""
