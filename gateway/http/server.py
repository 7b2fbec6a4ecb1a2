"""The HTTP server the gateway runs in: aiohttp's, plus a request-header read timeout.

aiohttp bounds an idle keep-alive connection (``keepalive_timeout``) and the gateway bounds a
stalled body (``server.body_timeout``), but nothing bounds a client that sends its request
headers a byte a second (slowloris): each such client holds a connection for as long as it
likes. Here a connection gets ``server.header_timeout`` seconds to deliver a complete request
head, counted from accept, or on a keep-alive connection from the first byte of the next
request (idle time between requests stays ``keepalive_timeout``'s business, as in nginx's
``client_header_timeout``). Past it the client gets 408 in Kubo's error shape and the
connection is closed.

This subclasses aiohttp's ``RequestHandler`` and ``web.Server`` (not public API), so
``pyproject.toml`` pins aiohttp to the minor release it was tested with, and the header-timeout
tests run against the real server process (``tests/test_header_timeout.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("medicon_gateway")


def _timeout_response(header_timeout: float) -> bytes:
    body = json.dumps({"Message": f"request headers not received within {header_timeout:g}s",
                       "Code": 0, "Type": "error"}).encode() + b"\n"
    return (b"HTTP/1.1 408 Request Timeout\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body)


_MALFORMED = {400: "malformed HTTP request", 413: "request too large", 414: "request line too long",
              431: "request header fields too large"}


class HeaderTimeoutHandler(RequestHandler):
    """aiohttp's connection protocol with a deadline for each request head.

    The deadline is armed when the connection is accepted and when a byte arrives that can
    only belong to a new request head (the previous request's body, if any, is complete); it
    is disarmed when the parser produces a request. If it expires while the connection waits
    for a request, the client is answered 408 and cut off; if a request is still being served
    (a pipelined head trickling in behind it), the deadline restarts: the client is not
    charged for the gateway's own time.
    """

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        self._last_payload = None  # body of the newest parsed request; None before the first

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse (or a failure before any handler ran). aiohttp's
        own answer echoes the offending bytes, and its log line carries them: with a folded,
        over-long or malformed ``Authorization`` header that is the credential. Answer in
        Kubo's error shape with a fixed message, and log only the kind of failure."""
        log.info("refused a malformed request: %d %s", status, type(exc).__name__ if exc else "")
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; the connection is closed instead")
        text = _MALFORMED.get(status, "the request could not be handled")
        body = json.dumps({"Message": text, "Code": 1 if status < 500 else 2, "Type": "error"})
        resp = web.Response(status=status, text=body + "\n", content_type="application/json")
        resp.force_close()
        return resp

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Judged before parsing: bytes that complete a body are not the start of a head.
        body_done = self._last_payload is None or self._last_payload.is_eof()
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:  # a request head is complete
            self._last_payload = self._messages[-1][1]
            self._disarm_header_deadline()
        elif self._upgraded or self._payload_parser is not None:
            self._disarm_header_deadline()  # no longer HTTP/1 requests (an upgraded protocol)
        elif data and body_done and self._header_deadline is None:
            self._arm_header_deadline()  # the first bytes of the next request head

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self._loop.call_later(self._header_timeout, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self.transport is None or self._upgraded:
            return
        waiting_for_request = self._waiter is not None and not self._waiter.done()
        if not waiting_for_request:
            self._arm_header_deadline()
            return
        log.debug("closing connection from %s: request headers not received within %gs",
                  self.peername, self._header_timeout)
        self.transport.write(_timeout_response(self._header_timeout))
        self.force_close()  # closes the transport once the 408 is flushed


class GatewayServer(web.Server):
    """``web.Server`` whose connections are ``HeaderTimeoutHandler``s."""

    def __init__(self, handler, *, header_timeout: float, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return HeaderTimeoutHandler(self, loop=self._loop, header_timeout=self._header_timeout,
                                    **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving the app through a ``GatewayServer``: what ``serve`` and ``dev``
    run, so the header timeout protects the real server."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's startup, builds aiohttp's server
        return GatewayServer(base.request_handler, request_factory=base.request_factory,
                             handler_cancellation=base.handler_cancellation,
                             header_timeout=self._header_timeout, **base._kwargs)
