"""gRPC request bytes, bounded and parsed inside the method, so a bad request is
INVALID_ARGUMENT with a clear message.

grpc aio runs a method's request deserializer before the method and answers any exception
from it with UNKNOWN and the exception's class name: bytes that are not the message
(truncated, garbage, bad UTF-8 in a string field). `RequestParsing`, a server interceptor,
registers every unary-request method with no deserializer (the method receives the raw
bytes) and parses them itself at the start of the call: too many bytes or bytes that do
not parse abort the call with INVALID_ARGUMENT.

Size: a message over `max_request_bytes` is refused here, naming the limit. The transport's
own limit (`transport_options`) is twice that, so grpc never buffers more; a message over
it is refused by grpc itself with RESOURCE_EXHAUSTED ("Received message larger than max").

    server = grpc.aio.server(interceptors=[RequestParsing(limit)], options=transport_options(limit))
"""
from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

import grpc

from conductor.intake import MAX_REQUEST_BYTES


def transport_options(max_request_bytes: int = MAX_REQUEST_BYTES) -> list[tuple[str, int]]:
    """Channel options for a server behind `RequestParsing(max_request_bytes)`."""
    return [("grpc.max_receive_message_length", 2 * max_request_bytes)]


class RequestParsing(grpc.aio.ServerInterceptor):
    def __init__(self, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.max_request_bytes = max_request_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = self._parser(handler.request_deserializer)
        if handler.response_streaming:
            method = handler.unary_stream
            if inspect.isasyncgenfunction(method):
                return handler._replace(request_deserializer=None, unary_stream=_streaming(parse, method))
        else:
            method = handler.unary_unary
        if not inspect.iscoroutinefunction(method):
            return handler  # not an aio method: leave it as registered
        if handler.response_streaming:
            return handler._replace(request_deserializer=None, unary_stream=_unary(parse, method))
        return handler._replace(request_deserializer=None, unary_unary=_unary(parse, method))

    def _parser(self, deserialize: Callable[[bytes], Any]) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
        limit = self.max_request_bytes

        async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            if len(raw) > limit:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is {len(raw)} bytes; the limit is {limit}")
            try:
                return deserialize(raw)
            except Exception as e:  # protobuf's DecodeError, or whatever a deserializer raises
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {e}")

        return parse


def _streaming(parse, method):
    async def call(raw: bytes, context: grpc.aio.ServicerContext):
        stream = method(await parse(raw, context), context)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()  # at once, not when collected: closing is how a call aborts

    return call


def _unary(parse, method):
    async def call(raw: bytes, context: grpc.aio.ServicerContext):
        return await method(await parse(raw, context), context)

    return call
