"""A client that trickles its body is cut off with 408 on every door that reads a body itself:
the REST API's JSON, and the multipart ``add``/``dag/put`` the gateway parses for records (the
pass-through proxy is covered in test_reliability). Nothing of the stalled request is stored."""

from __future__ import annotations

import json
import time

import pytest

from conftest import app_client, gateway_config, trickle_body
from records_helpers import opened, uid

BOUNDARY = "trickle-boundary"


@pytest.mark.parametrize("door", ["rest", "add", "dag_put"])
async def test_trickled_body_gets_408_and_nothing_is_stored(aiohttp_client, kubo, door):
    cfg = gateway_config(kubo, **{"server.body_timeout": 1.0})
    c = await app_client(aiohttp_client, cfg)
    patient, episode = uid("p"), uid("e")
    record = json.dumps(opened(patient, episode)).encode()
    auth = f"Authorization: Bearer {c.token}\r\nHost: x\r\n"
    if door == "rest":
        head = (f"POST /medicon/v1/patients/{patient}/episodes HTTP/1.1\r\n{auth}"
                "Content-Type: application/json\r\n")
        first, total = record[:-1], len(record) + 50
    else:
        command = "add" if door == "add" else "dag/put"
        part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"r.json\"\r\n"
                "Content-Type: application/json\r\n\r\n").encode() + record
        head = (f"POST /api/v0/{command} HTTP/1.1\r\n{auth}"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n")
        first, total = part[:-1], len(part) + 60
    t0 = time.monotonic()
    answer = await trickle_body(c.server.host, c.server.port, head, first, total)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert time.monotonic() - t0 < 8
    assert b"stalled" in answer
    # the episode was never opened
    r = await c.get(f"/medicon/v1/episodes/{episode}")
    assert r.status == 404
