"""``server.header_timeout``: a client that trickles its request headers (slowloris) is cut off
with 408; clients that pause between requests, or send a request slowly but in time, are not.

Every test talks to the gateway as a real process (``medicon-gateway serve``, the timeout set
through the environment) over a raw socket, so what is tested is what production runs.
"""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

from gateway.config import ConfigError, load_config

from conftest import start_gateway

HEADER_TIMEOUT = 1.0
SLACK = 1.5


@pytest.fixture(scope="module")
def gw(kubo):
    gw = start_gateway(kubo, env={"MEDICON_SERVER_HEADER_TIMEOUT": str(HEADER_TIMEOUT)})
    yield gw
    assert gw.stop() == 0


def connect(gw) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``deadline`` passes)."""
    data = b""
    while time.monotonic() < deadline:
        if not readable(sock, deadline - time.monotonic()):
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection still open after the deadline; got {data[:200]!r}")


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response (Content-Length or chunked body), leaving the connection open."""
    data = b""

    def more() -> None:
        nonlocal data
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data[:200]!r}"
        data += chunk

    while b"\r\n\r\n" not in data:
        more()
    head, _, data = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    status = int(lines[0].split()[1])
    if "content-length" in headers:
        while len(data) < int(headers["content-length"]):
            more()
        return status, data
    assert headers.get("transfer-encoding") == "chunked", headers
    body = b""
    while True:
        while b"\r\n" not in data:
            more()
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(data) < size + 2:
            more()
        body, data = body + data[:size], data[size + 2:]
        if size == 0:
            return status, body


def trickle(sock: socket.socket, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` a byte every 0.3 s until the server answers or closes; return what it sent
    until it closed, and the seconds that took."""
    t0 = time.monotonic()
    deadline = t0 + HEADER_TIMEOUT + SLACK
    for byte in data:
        if time.monotonic() > deadline:
            break
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        if readable(sock, 0.3):
            break
    return read_until_closed(sock, deadline), time.monotonic() - t0


def assert_408_then_closed(data: bytes) -> None:
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert body["Type"] == "error" and body["Code"] == 0 and "headers" in body["Message"]


def test_trickled_headers_are_cut_off_with_408(gw):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    with connect(gw) as sock:
        answer, elapsed = trickle(sock, request)  # 0.3 s a byte: the head would take a minute
    assert_408_then_closed(answer)
    assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + SLACK, elapsed


def test_silent_connection_is_cut_off(gw):
    """Connecting and sending nothing is a request head that never arrives."""
    with connect(gw) as sock:
        t0 = time.monotonic()
        answer = read_until_closed(sock, t0 + HEADER_TIMEOUT + SLACK)
    assert_408_then_closed(answer)
    assert time.monotonic() - t0 >= HEADER_TIMEOUT - 0.1


def test_trickled_head_of_a_second_request_is_cut_off(gw):
    """On a keep-alive connection the deadline applies to every request, not just the first,
    and runs from the request's first byte, not from the end of the idle pause before it."""
    with connect(gw) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        time.sleep(HEADER_TIMEOUT * 1.5)
        answer, elapsed = trickle(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100)
    assert_408_then_closed(answer)
    assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + SLACK, elapsed


def test_keep_alive_client_pausing_between_requests_is_not_affected(gw):
    """Idle time between requests is keepalive_timeout's business, not the header deadline's."""
    with connect(gw) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
            time.sleep(HEADER_TIMEOUT * 2)
        assert not readable(sock, 0)  # no 408, no close while idle
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_slow_but_timely_requests_succeed(gw):
    """A head sent in pieces within the deadline is served, each time on the same connection
    (the deadline restarts for each request), also after an idle pause."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"
    pieces = [request[i:i + 16] for i in range(0, len(request), 16)]
    with connect(gw) as sock:
        for pause in (0, HEADER_TIMEOUT * 2, 0):
            time.sleep(pause)
            for piece in pieces:  # about 0.6 s in all
                sock.sendall(piece)
                time.sleep(HEADER_TIMEOUT * 0.6 / len(pieces))
            assert read_response(sock)[0] == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_slow_body_is_not_charged_to_the_header_deadline(gw, framing):
    """Body bytes are server.body_timeout's business: an upload slower than header_timeout
    succeeds, and leaves no deadline behind on the idle connection."""
    body = (b'--B\r\nContent-Disposition: form-data; name="data"; filename="x"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\nslow block\r\n--B--\r\n")
    pieces = [body[i:i + 12] for i in range(0, len(body), 12)]
    if framing == "chunked":
        pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
        length = "Transfer-Encoding: chunked"
    else:
        length = f"Content-Length: {len(body)}"
    with connect(gw) as sock:
        sock.sendall((f"POST /api/v0/block/put HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.token}\r\n"
                      f"Content-Type: multipart/form-data; boundary=B\r\n{length}\r\n\r\n").encode())
        for piece in pieces:  # about 3 s for the body
            sock.sendall(piece)
            time.sleep(0.3)
        status, answer = read_response(sock)
        assert status == 200, answer
        time.sleep(HEADER_TIMEOUT * 2)
        assert not readable(sock, 0), sock.recv(200)  # no 408, no close while idle
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_header_timeout_config():
    assert load_config(env={}).server.header_timeout == 10.0
    assert load_config(env={"MEDICON_SERVER_HEADER_TIMEOUT": "2.5"}).server.header_timeout == 2.5
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="server.header_timeout"):
            load_config(env={"MEDICON_SERVER_HEADER_TIMEOUT": bad})
    with pytest.raises(ConfigError, match="server.header_timeout"):
        load_config(env={"MEDICON_SERVER_HEADER_TIMEOUT": "soon"})
