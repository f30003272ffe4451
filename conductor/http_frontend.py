"""The conductor's OpenAI-compatible HTTP front door, over the `Backend` protocol.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent
events ending in `data: [DONE]`, or whole; one choice per parallel sample, with tool calls
and logprobs as `conductor.http_choices` lays out), `GET /v1/models`, `GET /v1/models/{id}`
(404 `model_not_found` for another id), `GET /health` (liveness: 200
while the process serves), `GET /ready` (readiness: 503 naming what is missing until a
request could be served), `GET /metrics`. With an API key (`build_app(..., api_key=KEY)`),
every `/v1/...` request must send `Authorization: Bearer KEY` (else 401 `invalid_api_key`);
the health, readiness and metrics routes stay open.

A streamed request waits for its first item before sending headers, so an admission
rejection is still a real 429 (and bad input a 400), never an error inside a 200 stream.
The backend's generator is iterated in the request's task and closed whenever the
request ends early: a client that disconnects (while waiting or mid-stream) stops the
iteration, which is how the conductor learns to abort. Request timings and outcomes are
the backend's to record (it serves gRPC too); this module counts HTTP responses only.

    app = build_app(backend, registry)
    server = serve_http(app, "127.0.0.1", 8000)   # or: await HttpServer(app, ...).serve()
"""
from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Send

from conductor.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from conductor.metrics import HttpMetrics, exposition
from conductor.auth import key_problem
from conductor.frontend_api import Backend, Finished, GenerateRequest, RequestFailed, TokenChunk
from conductor.http_errors import ApiError, api_error_from, not_found
from conductor.http_choices import Choices
from conductor.http_responses import ChatShape, CompletionShape, ResponseShape
from conductor.http_schema import ChatCompletionBody, CompletionBody, read_request
from conductor.http_server import HttpServer, serve_http
from conductor.intake import MAX_REQUEST_BYTES

__all__ = ["build_app", "serve_http", "HttpServer"]

T = TypeVar("T")
Item = TokenChunk | Finished
CLIENT_CLOSED = 499  # nginx's "client closed request": what the metrics record for a disconnect
CLOSE_TIMEOUT_S = 5.0  # how long closing a backend generator may take once the client is gone


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` in this task; cancel it and raise `ClientGone` if the client disconnects."""
    result: list[T] = []
    error: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await _wait_for_disconnect(request)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await work())
        except Exception as exc:  # re-raised below, outside the task group
            error.append(exc)
        finally:
            tg.cancel_scope.cancel()  # stop the watcher
    if error:
        raise error[0]
    if not result:
        raise ClientGone()
    return result[0]


async def _aclose(stream: AsyncIterator[Item]) -> None:
    """Close a backend generator, shielded so cleanup runs even in a cancelled request."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await aclose()


async def _events(stream: AsyncIterator[Item], first: Item, choices: Choices) -> AsyncIterator[bytes]:
    """The SSE body (`Choices.events`), closing the backend's stream however it ends."""
    try:
        async for event in choices.events(stream, first):
            yield event
    finally:
        await _aclose(stream)


class _EventStream(StreamingResponse):
    """A streaming response that closes its body (and so the backend) however it ends."""

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._body = body

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await self._body.aclose()  # type: ignore[attr-defined]


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _keyed(api_key: str | None, endpoint: Callable[[Request], Awaitable[Response]]):
    """`endpoint`, answering 401 first unless the request carries `Authorization: Bearer <api_key>`."""
    if api_key is None:
        return endpoint

    async def checked(request: Request) -> Response:
        problem = key_problem(api_key, request.headers.get("authorization"))
        if problem is not None:
            raise ApiError(401, problem, "invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer realm="halfmoon"'})
        return await endpoint(request)

    return checked


class _Frontend:
    def __init__(self, backend: Backend, registry: CollectorRegistry, ready: Callable[[], str | None] | None,
                 max_body_bytes: int) -> None:
        self.backend = backend
        self.max_body_bytes = max_body_bytes
        self.registry = registry
        self.not_ready_reason = ready
        self.http_metrics = HttpMetrics(registry)
        self.started = int(time.time())

    def route(self, path: str, endpoint: Callable[[Request], Awaitable[Response]], method: str) -> Route:
        """A route whose errors become OpenAI error bodies and whose responses are counted."""

        async def handle(request: Request) -> Response:
            try:
                response = await endpoint(request)
            except (ClientGone, ClientDisconnect):  # gone while waiting, or while sending the body
                response = Response(status_code=CLIENT_CLOSED)
            except Exception as exc:
                response = _error_response(api_error_from(exc))
            self.http_metrics.observe_response(path, response.status_code)
            return response

        return Route(path, handle, methods=[method])

    async def completions(self, request: Request) -> Response:
        body, req = await read_request(CompletionBody, request, self.max_body_bytes)
        return await self._generate(request, body, req, CompletionShape)

    async def chat_completions(self, request: Request) -> Response:
        body, req = await read_request(ChatCompletionBody, request, self.max_body_bytes)
        return await self._generate(request, body, req, ChatShape)

    async def _generate(
        self, request: Request, body: CompletionBody | ChatCompletionBody, req: GenerateRequest,
        shape_type: type[ResponseShape],
    ) -> Response:
        model = self.backend.model_name
        if body.model is not None and body.model != model:
            message = f"the model {body.model!r} does not exist; this server serves {model!r}"
            raise not_found(message, param="model", code="model_not_found")
        token_bytes = getattr(self.backend, "token_bytes", None) or (lambda t: str(t).encode())
        shape = shape_type(f"{shape_type.id_prefix}-{uuid.uuid4().hex}", int(time.time()), model, body.include_usage,
                           body.return_token_ids, token_bytes)
        echo = ""
        if getattr(body, "echo", False):  # completions: the prompt's text first
            echo = req.prompt if req.prompt is not None else b"".join(
                map(token_bytes, req.prompt_token_ids or ())).decode("utf-8", errors="replace")
        choices = Choices(shape, req.sampling.n, logprobs=req.sampling.logprobs is not None, tools=req.tool_use,
                          echo=echo)
        stream = self.backend.generate(replace(req, request_id=shape.id))
        handed_over = False
        try:
            if body.stream:
                first = await _unless_disconnected(request, lambda: anext(stream))
                handed_over = True  # from here on the response body closes the stream
                return _EventStream(_events(stream, first, choices))
            return JSONResponse(await _unless_disconnected(request, lambda: choices.collect(stream)))
        except StopAsyncIteration:
            raise RequestFailed("the backend's stream ended without a Finished") from None
        finally:
            if not handed_over:
                await _aclose(stream)

    def _card(self) -> dict:
        return {"id": self.backend.model_name, "object": "model", "created": self.started, "owned_by": "halfmoon"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        wanted = request.path_params["model_id"]
        if wanted != self.backend.model_name:
            raise not_found(f"the model {wanted!r} does not exist; this server serves {self.backend.model_name!r}",
                            param="model", code="model_not_found")
        return JSONResponse(self._card())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        reason = self.not_ready_reason() if self.not_ready_reason is not None else None
        if reason is not None:
            raise ApiError(503, f"not ready: {reason}", "service_unavailable", code="not_ready")
        return JSONResponse({"status": "ready"})

    async def metrics(self, request: Request) -> Response:
        return Response(exposition(self.registry), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method, ...) in OpenAI's error shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    message = f"{detail} ({request.method} {request.url.path})"
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return _error_response(ApiError(status, message, kind, headers=headers))


def build_app(
    backend: Backend, registry: CollectorRegistry, *, ready: Callable[[], str | None] | None = None,
    max_body_bytes: int = MAX_REQUEST_BYTES, api_key: str | None = None,
) -> Starlette:
    """The HTTP app. `ready`, if given, returns None when a request could be served, else
    why not: `/ready` answers 503 with that reason meanwhile. A request body over
    `max_body_bytes` is refused with 413."""
    fe = _Frontend(backend, registry, ready, max_body_bytes)
    routes = [
        fe.route("/v1/completions", _keyed(api_key, fe.completions), "POST"),
        fe.route("/v1/chat/completions", _keyed(api_key, fe.chat_completions), "POST"),
        fe.route("/v1/models", _keyed(api_key, fe.models), "GET"),
        fe.route("/v1/models/{model_id:path}", _keyed(api_key, fe.model), "GET"),
        fe.route("/health", fe.health, "GET"),
        fe.route("/ready", fe.ready, "GET"),
        fe.route("/metrics", fe.metrics, "GET"),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
