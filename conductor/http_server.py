"""Serving an ASGI app with uvicorn, from a background thread or as a task in your own loop.

The listening socket is bound in the constructor, so `port` is known at once (also when
asked for port 0) and a port already in use fails there, naming the address.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn


class HttpServer:
    """One uvicorn server on one socket.

    Thread: `serve_http(app, host, port)` (or `HttpServer(...).start()`), later `stop()`.
    Task: `asyncio.create_task(server.serve())` in your loop, later `server.stop()` (or
    `await server.shutdown()`). As a task in the main thread, uvicorn holds SIGINT/SIGTERM
    until it stops and then re-raises them.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        graceful_shutdown_s: float = 5.0,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            listening = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        # create_server leaves proto 0, which accepted sockets inherit; asyncio sets TCP_NODELAY
        # only on sockets whose proto is IPPROTO_TCP, and without it every response waited
        # ~40 ms for the client's delayed ACK (Nagle: headers and body are two writes)
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=listening.detach())
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level=log_level,
            lifespan="off",
            timeout_graceful_shutdown=graceful_shutdown_s,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._serving = False
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    async def serve(self) -> None:
        """Serve until `stop()`; closes the socket when done."""
        self._serving = True
        try:
            await self._server.serve(sockets=[self._socket])
        finally:
            self._socket.close()
            self._stopped.set()

    def start(self, timeout_s: float = 10.0) -> HttpServer:
        """Serve on a daemon thread; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the server was already started")
        self._thread = threading.Thread(target=asyncio.run, args=(self.serve(),), name=f"http:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on {self.url} did not start within {timeout_s}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the server to finish (idempotent); with a thread, wait for it."""
        self._server.should_exit = True
        if not self._serving:
            self._socket.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"the HTTP server on {self.url} did not stop within {timeout_s}s")

    async def shutdown(self) -> None:
        """From inside the serving loop: stop and wait until the server has stopped."""
        self._server.should_exit = True
        while self._serving and not self._stopped.is_set():
            await asyncio.sleep(0.01)


def serve_http(app: Any, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> HttpServer:
    """Start serving `app` on a background thread; returns the running server."""
    return HttpServer(app, host, port, **kwargs).start()
