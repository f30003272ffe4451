"""HTTP errors in OpenAI's shape, and the mapping from the conductor's typed errors to them.

Every error body is `{"error": {"message", "type", "param", "code"}}`. The status follows
the table in `conductor/frontend_api.py`: bad input 400 (with `param` naming the field), a
body over the size limit 413, a body that is not JSON 415, admission rejection 429 with
`Retry-After`, no healthy node 503, a failed request 500. A message never carries a Python
class name, and always encodes (text a client sent is escaped where it is not valid Unicode).
"""
from __future__ import annotations

import logging
import math
import uuid
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
        message = _encodable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = None if param is None else _encodable(param)
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param, code=code)


def payload_too_large(message: str) -> ApiError:
    return ApiError(413, message, "invalid_request_error", code="request_too_large")


def unsupported_media_type(message: str) -> ApiError:
    return ApiError(415, message, "invalid_request_error", code="unsupported_media_type")


def _encodable(text: str) -> str:
    """`text`, with anything UTF-8 cannot carry (a lone surrogate) escaped."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
    ref = uuid.uuid4().hex[:12]
    log.error("unexpected error while serving a request (reference %s)", ref, exc_info=exc)
    return ApiError(500, f"internal error (reference {ref} in the server's log)", "server_error",
                    code="internal_error")
