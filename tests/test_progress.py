"""Progress of the long commands: ``check`` and ``keys rotate`` draw a progress bar when stderr is
a terminal (a real pseudo-terminal here) and write plain lines when it is not (a pipe, as in CI
and logs); stdout keeps only the command's result either way."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from conftest import storage_env, ROOT, app_client, gateway_config
from gateway.config import keyring_path
from gateway.security.keyring import LocalKeyring
from records_helpers import encounter, opened, uid

PLAIN = re.compile(r"(?P<cmd>[a-z ]+): (?P<phase>[a-z ]+) (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\)")


def run(args: list[str], env: dict[str, str], *, terminal: bool) -> tuple[int, str, str]:
    """``medicon-gateway ARGS``: stdout always a pipe; stderr a pipe, or a 100-column
    pseudo-terminal. Returns (exit status, stdout, stderr)."""
    cmd = [sys.executable, "-m", "gateway", *args]
    full_env = {**os.environ, **env}
    if not terminal:
        done = subprocess.run(cmd, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(60), out, seen.decode()


def plain_lines(stderr: str, command: str) -> dict[str, list[tuple[int, int, int]]]:
    """Every line of ``stderr`` that is progress, by phase: [(done, total, percent)]."""
    phases: dict[str, list[tuple[int, int, int]]] = {}
    for line in stderr.splitlines():
        m = PLAIN.fullmatch(line)
        if m and m["cmd"] == command:
            phases.setdefault(m["phase"], []).append((int(m["done"]), int(m["total"]), int(m["pct"])))
    return phases


async def _records(aiohttp_client, kubo, episodes: int = 6) -> tuple[object, int]:
    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg)
    for _ in range(episodes):
        patient, episode = uid("p"), uid("e")
        assert (await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))).status == 201
        r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode))
        assert r.status == 201
    return cfg, episodes * 2


def _check_env(cfg, kubo) -> dict[str, str]:
    return {"MEDICON_KUBO_API_URL": kubo.api_url, "MEDICON_KUBO_GATEWAY_URL": kubo.gateway_url, "MEDICON_KUBO_API_AUTH": kubo.api_secret,
            "MEDICON_RECORDS_DATA_DIR": cfg.records.data_dir, **storage_env(cfg.records.data_dir)}


async def test_check_writes_plain_progress_lines_when_not_on_a_terminal(aiohttp_client, kubo):
    cfg, records = await _records(aiohttp_client, kubo)
    status, out, err = run(["check"], _check_env(cfg, kubo), terminal=False)
    assert status == 0, err
    assert json.loads(out)["records"] == records  # stdout: the report alone
    phases = plain_lines(err, "check")
    assert set(phases) == {"records", "pins"}
    assert phases["records"][0] == (0, records, 0) and phases["records"][-1] == (records, records, 100)
    assert phases["pins"][-1][0] == phases["pins"][-1][1]  # the pins the index lacks, all examined
    assert len(phases["records"]) <= 11  # a line every tenth of the way, not one per record
    assert "\r" not in err and "|" not in err


async def test_check_draws_a_progress_bar_on_a_terminal(aiohttp_client, kubo):
    cfg, records = await _records(aiohttp_client, kubo)
    status, out, err = run(["check"], _check_env(cfg, kubo), terminal=True)
    assert status == 0, err
    assert json.loads(out)["clean"] is True
    assert "\r" in err  # the bar is redrawn in place
    assert re.search(rf"check: records: 100%\|[^|\n]+\| {records}/{records}", err), err
    assert not plain_lines(err, "check")


def _with_provider(data_dir: str, use):
    """``await use(provider, storage)`` with the key file attached to the data dir's key store,
    as the ``keys`` commands open it."""
    from gateway.cli import with_key_provider
    from gateway.config import load_config
    return asyncio.run(with_key_provider(load_config(env={}, overrides={"records.data_dir": data_dir}), use))


def _keyring_with_patients(tmp_path, patients: int) -> tuple[str, dict[str, bytes]]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    LocalKeyring.init(data_dir / "keyring.json")

    async def enrol(provider, _storage):
        return {f"patient-{i}": (await provider.data_key_for_patient(f"patient-{i}"))[1] for i in range(patients)}
    return str(data_dir), _with_provider(str(data_dir), enrol)


def _still_readable(data_dir: str, keys: dict[str, bytes]) -> str:
    async def read(provider, storage):
        assert {p: (await provider.data_key_for_patient(p, create=False))[1] for p in keys} == keys
        return (await storage.keys.state()).active_kek
    return _with_provider(data_dir, read)


def test_keys_rotate_plain_lines_when_not_on_a_terminal(tmp_path):
    data_dir, keys = _keyring_with_patients(tmp_path, 30)
    before = _still_readable(data_dir, keys)
    status, out, err = run(["keys", "rotate", "--batch", "3", "--data-dir", data_dir], {}, terminal=False)
    assert status == 0, err
    assert _still_readable(data_dir, keys) != before
    lines = plain_lines(err, "keys rotate")["data keys"]
    assert lines[0] == (3, 30, 10) and lines[-1] == (30, 30, 100)  # one line a batch of 3
    assert [pct for _, _, pct in lines] == sorted(pct for _, _, pct in lines)
    assert len(lines) <= 11 and "\r" not in err and out == ""


def test_keys_rotate_draws_a_progress_bar_on_a_terminal(tmp_path):
    data_dir, keys = _keyring_with_patients(tmp_path, 30)
    before = _still_readable(data_dir, keys)
    status, out, err = run(["keys", "rotate", "--data-dir", data_dir], {}, terminal=True)
    assert status == 0, err
    assert _still_readable(data_dir, keys) != before
    assert re.search(r"keys rotate: data keys: 100%\|[^|\n]+\| 30/30", err), err
    assert not plain_lines(err, "keys rotate")
