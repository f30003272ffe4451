"""HTTP errors in OpenAI's shape, and the mapping from the conductor's typed errors to them.

Every error body is `{"error": {"message", "type", "param", "code"}}`. The status follows
the table in `conductor/frontend_api.py`: bad input 400 (with `param` naming the field),
admission rejection 429 with `Retry-After`, no healthy node 503, a failed request 500.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from conductor.frontend_api import Rejected, RequestFailed, Unavailable
from engine.errors import InvalidRequestError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error response: raise it from request handling, render it with `body()`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param, code=code)


def not_found(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(404, message, "invalid_request_error", param=param, code=code)


def retry_after_header(seconds: float) -> str:
    """`Retry-After` takes whole seconds; round up and never say 0."""
    return str(max(1, math.ceil(seconds)))


def api_error_from(exc: BaseException) -> ApiError:
    """The response for an error raised while serving a request (unknown errors become 500s)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return invalid_request(exc.field or None, str(exc))
    if isinstance(exc, Rejected):
        return ApiError(
            429,
            f"the cluster is overloaded ({exc.reason}); retry after {exc.retry_after_s:g}s",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": retry_after_header(exc.retry_after_s)},
        )
    if isinstance(exc, Unavailable):
        return ApiError(503, f"no node can serve the request: {exc}", "service_unavailable", code="unavailable")
    if isinstance(exc, RequestFailed):
        return ApiError(500, f"the request failed: {exc}", "server_error", code="request_failed")
    log.error("unexpected error while serving a request", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error")
