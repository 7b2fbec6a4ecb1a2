"""The benchmark's load generator: a process of its own, so the client's CPU is not the
gateway's (and never shares its event loop).

It runs one scenario, read as JSON from stdin, and writes its result as JSON to stdout;
progress and errors go to stderr. It only talks to the URLs it is given (loopback, set by
``bench/run.py``) and every loop in it is bounded by a count and by a time budget.

Scenarios (``kind``):

- ``prepare``: add blobs of the given sizes directly on Kubo, return their CIDs.
- ``stream``: ``cat`` / ``ipfs`` (GET /ipfs/<cid>) / ``add`` of one size, interleaved over the
  targets round after round; returns MB/s per target per round.
- ``append``: record appends through the gateway's REST API, and a raw ``add`` of the same
  JSON bytes on Kubo (directly and through nginx), with ``concurrency`` clients; a ``raw_put``
  target stores each record as a dag-cbor block with ``block/put?pin=true`` on Kubo instead
  (what an append asks of Kubo, without the gateway: the most appends this Kubo allows).
- ``history_build``: one long episode, appended by ``parallel`` writers.
- ``history_page``: a page of an episode's history through the gateway, against fetching the
  same records one ``dag/get`` after another from Kubo.
- ``mix``: a clinical mix through the gateway — ``clients`` clients, each over patients with
  several episodes open at once, picking each step by weight: write the next record of a
  synthetic FHIR patient set (``bench/fhir_synth.py``), read an episode's latest history page,
  read a record back, add an attachment sealed for a patient and read it back.

Only the standard library, aiohttp, cbor2 (a dependency of the gateway) and
``bench/fhir_synth.py`` (standard library only): this file does not import the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from typing import AsyncIterator

import aiohttp
import cbor2

if __package__:
    from bench import fhir_synth
else:  # run as a script, as bench/run.py starts it: its own folder is on sys.path
    import fhir_synth

CHUNK = 1 << 18          # Kubo's default chunker (size-262144): one nonce per leaf block
NONCE = 32
BASE_LEN = 16 << 20      # random bytes the blobs are cut from
MB = 1e6

ENCOUNTER = "https://medicon.example/schemas/encounter/v1"
CLASSES = ("lab", "pharmacy", "doctor", "imaging")


class LoadError(RuntimeError):
    """A request failed: the numbers of this scenario would be meaningless."""


def log(msg: str) -> None:
    print(f"  loadgen: {msg}", file=sys.stderr, flush=True)


def make_session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
        auto_decompress=False,
        read_bufsize=1 << 20,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


# A keep-alive connection the server closed just as it was taken from the pool fails on the
# first write; every HTTP client retries that once. Counted per target and reported.
RETRIES: dict[str, int] = {}


async def retrying(name: str, call):
    for attempt in (1, 2):
        try:
            return await call()
        except aiohttp.ClientConnectorError:
            raise  # nothing listens: a real failure
        except aiohttp.ClientConnectionError:
            if attempt == 2:
                raise
            RETRIES[name] = RETRIES.get(name, 0) + 1


async def _fail(resp: aiohttp.ClientResponse, what: str) -> LoadError:
    body = (await resp.read())[:400].decode(errors="replace")
    return LoadError(f"{what}: HTTP {resp.status}: {body}")


# --- blobs -----------------------------------------------------------------------------------

class Blobs:
    """Unique content for every add, made cheaply: every 256 KiB block starts with a nonce
    (this process, this add, this block), so Kubo never finds a block it already stores and
    every target pays for the same work. The first byte is never ``{`` (nor whitespace), so
    the gateway sees a blob at once, as it would for a scan or a PDF."""

    def __init__(self) -> None:
        self.base = os.urandom(BASE_LEN)
        self.run = os.urandom(8)
        self.counter = 0
        self.boundary = "benchboundary" + uuid.uuid4().hex

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _nonce(self, add: int, block: int) -> bytes:
        return (b"\xff" + self.run + add.to_bytes(8, "big") + block.to_bytes(8, "big")).ljust(NONCE, b"\xfe")

    async def multipart(self, size: int, name: str = "blob") -> AsyncIterator[bytes]:
        self.counter += 1
        add = self.counter
        yield (f"--{self.boundary}\r\n"
               f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        offset = block = 0
        span = BASE_LEN - CHUNK
        while offset < size:
            n = min(CHUNK, size - offset)
            nonce = self._nonce(add, block)
            if n <= NONCE:
                yield nonce[:n]
            else:
                start = (block * 7919 * 4096) % span
                yield nonce + self.base[start + NONCE:start + n]
            offset += n
            block += 1
        yield f"\r\n--{self.boundary}--\r\n".encode()


def single_part(boundary: str, data: bytes, name: str) -> bytes:
    return (f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


# --- single requests -------------------------------------------------------------------------

async def drain(resp: aiohttp.ClientResponse) -> int:
    n = 0
    async for chunk in resp.content.iter_any():
        n += len(chunk)
    return n


async def cat(sess: aiohttp.ClientSession, target: dict, cid: str, size: int) -> None:
    await retrying(target["name"], lambda: _cat(sess, target, cid, size))


async def _cat(sess: aiohttp.ClientSession, target: dict, cid: str, size: int) -> None:
    async with sess.post(target["api"] + "/api/v0/cat", params={"arg": cid},
                         headers=target.get("headers")) as resp:
        if resp.status != 200:
            raise await _fail(resp, f"cat via {target['name']}")
        got = await drain(resp)
    if got != size:
        raise LoadError(f"cat via {target['name']}: {got} bytes of {size}")


async def ipfs_get(sess: aiohttp.ClientSession, target: dict, cid: str, size: int) -> None:
    await retrying(target["name"], lambda: _ipfs_get(sess, target, cid, size))


async def _ipfs_get(sess: aiohttp.ClientSession, target: dict, cid: str, size: int) -> None:
    async with sess.get(target["gw"] + "/ipfs/" + cid, headers=target.get("headers")) as resp:
        if resp.status != 200:
            raise await _fail(resp, f"GET /ipfs via {target['name']}")
        got = await drain(resp)
    if got != size:
        raise LoadError(f"GET /ipfs via {target['name']}: {got} bytes of {size}")


async def add(sess: aiohttp.ClientSession, target: dict, blobs: Blobs, size: int) -> str:
    return await retrying(target["name"], lambda: _add(sess, target, blobs, size))


async def _add(sess: aiohttp.ClientSession, target: dict, blobs: Blobs, size: int) -> str:
    headers = {**target.get("headers", {}), "Content-Type": blobs.content_type}
    async with sess.post(target["api"] + "/api/v0/add", data=blobs.multipart(size),
                         headers=headers) as resp:
        if resp.status != 200:
            raise await _fail(resp, f"add via {target['name']}")
        lines = [line for line in (await resp.text()).splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["Hash"]
    except (IndexError, ValueError, KeyError):
        raise LoadError(f"add via {target['name']}: unexpected answer {lines[-3:]!r}") from None


# --- scenarios -------------------------------------------------------------------------------

async def prepare(spec: dict) -> dict:
    """Add a blob of each size through ``target``; with ``check`` (a direct Kubo target), also
    count the bytes Kubo itself holds for it (more than the size: the gateway sealed it)."""
    blobs = Blobs()
    out, stored = {}, {}
    async with make_session(4) as sess:
        for size in spec["sizes"]:
            out[str(size)] = cid = await add(sess, spec["target"], blobs, size)
            if spec.get("check"):
                async with sess.post(spec["check"]["api"] + "/api/v0/cat", params={"arg": cid},
                                     headers=spec["check"].get("headers", {})) as resp:
                    if resp.status != 200:
                        raise await _fail(resp, "cat on Kubo")
                    stored[str(size)] = await drain(resp)
    return {"cids": out, "stored_bytes": stored}


def settle() -> None:
    """Flush dirty pages before a timed sample, outside the timing: the previous sample's
    writes (a 256 MiB add) must not be written back during the next target's sample."""
    os.sync()


def rotated(items: list, r: int) -> list:
    k = r % len(items)
    return items[k:] + items[:k]


async def stream(spec: dict) -> dict:
    """Throughput of one op at one size, interleaved over the targets round after round."""
    op, size, targets = spec["op"], spec["size"], spec["targets"]
    iterations = spec.get("iterations", 1)
    blobs = Blobs() if op == "add" else None

    async def once(sess: aiohttp.ClientSession, target: dict) -> None:
        if op == "cat":
            await cat(sess, target, target.get("cid", spec.get("cid")), size)
        elif op == "ipfs":
            await ipfs_get(sess, target, target.get("cid", spec.get("cid")), size)
        elif op == "add":
            await add(sess, target, blobs, size)
        else:
            raise LoadError(f"unknown op {op!r}")

    samples: dict[str, list[float]] = {t["name"]: [] for t in targets}
    rounds: list[dict[str, float]] = []
    started = time.monotonic()
    async with make_session(8) as sess:
        for target in targets:  # warm-up: connections, page cache, code paths
            await once(sess, target)
        for r in range(spec["repeats"]):
            if r >= spec.get("min_repeats", 1) and time.monotonic() - started > spec["budget_s"]:
                log(f"{op} {size}: time budget reached after {r} rounds")
                break
            row = {}
            for target in rotated(targets, r):
                settle()
                t0 = time.perf_counter()
                for _ in range(iterations):
                    await once(sess, target)
                elapsed = time.perf_counter() - t0
                row[target["name"]] = size * iterations / elapsed / MB
                samples[target["name"]].append(row[target["name"]])
            rounds.append(row)
    return {"samples": samples, "rounds": rounds, "iterations": iterations,
            "seconds": time.monotonic() - started}


def record_doc(patient: str, episode: str, client: int, k: int, tag: str) -> dict:
    return {"schema": ENCOUNTER, "patient": patient, "episode": episode, "author": "lab.central",
            "body": {"class": CLASSES[k % len(CLASSES)], "status": "finished",
                     "period": {"start": "2026-01-02T08:00:00Z"},
                     "notes": f"bench {tag} client {client} record {k}: fasting sample, HbA1c "
                              f"{6 + (k % 30) / 10:.1f}%, no complications reported."}}


def opened_doc() -> dict:
    return {"author": "dr.house",
            "body": {"type": "diabetes-care", "managingOrganization": "clinic-a",
                     "period": {"start": "2026-01-01T08:00:00Z"}}}


async def open_episode(sess: aiohttp.ClientSession, target: dict, patient: str) -> str:
    async def call() -> str:
        async with sess.post(f"{target['url']}/medicon/v1/patients/{patient}/episodes", json=opened_doc(),
                             headers=target.get("headers")) as resp:
            if resp.status != 201:
                raise await _fail(resp, "open episode")
            return (await resp.json())["episode"]["id"]
    return await retrying(target["name"], call)


async def append_record(sess: aiohttp.ClientSession, target: dict, episode: str, body: bytes) -> dict:
    headers = {**target.get("headers", {}), "Content-Type": "application/json"}
    tries = 0

    async def call() -> dict:
        nonlocal tries
        tries += 1
        async with sess.post(f"{target['url']}/medicon/v1/episodes/{episode}/records", data=body,
                             headers=headers) as resp:
            # 200: the same record again, after a retry whose first answer was lost
            if resp.status != 201 and not (tries > 1 and resp.status == 200):
                raise await _fail(resp, "append")
            return await resp.json()
    return await retrying(target["name"], call)


async def raw_write(sess: aiohttp.ClientSession, target: dict, body: bytes, boundary: str) -> None:
    """``add`` of ``body`` (a raw target's write); a ``raw_put`` target's ``body`` is the
    record's dag-cbor block (``as_raw``), stored with ``block/put?pin=true``."""
    headers = {**target.get("headers", {}), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    if target["kind"] == "raw_put":
        command, params = "block/put", {"cid-codec": "dag-cbor", "mhtype": "sha2-256", "pin": "true"}
    else:
        command, params = "add", {}

    async def call() -> None:
        async with sess.post(f"{target['url']}/api/v0/{command}", params=params, data=single_part(boundary, body, "record.json" if command == "add" else "record"),
                             headers=headers) as resp:
            if resp.status != 200:
                raise await _fail(resp, f"raw {command} via {target['name']}")
            await resp.read()
    await retrying(target["name"], call)


def as_raw(target: dict, body: bytes) -> bytes:
    """What a raw target writes for a record's JSON ``body``: the bytes themselves (``add``),
    or the record as a dag-cbor block (``raw_put``; canonical CBOR of a JSON document is
    dag-cbor), encoded before the clock starts."""
    return cbor2.dumps(json.loads(body), canonical=True) if target["kind"] == "raw_put" else body


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


async def appends(spec: dict) -> dict:
    """``concurrency`` clients, each owning ``episodes_per_client`` episodes and appending to
    them in turn (or all of them appending to the ``episodes`` given, e.g. 1: one episode); a
    raw ``add`` of the same JSON bytes on the other targets."""
    c, per_client = spec["concurrency"], spec["records_per_client"]
    n_episodes = spec.get("episodes") or c * spec.get("episodes_per_client", 4)
    targets = spec["targets"]
    boundary = "benchrec" + uuid.uuid4().hex
    tag = uuid.uuid4().hex[:8]
    runs: dict[str, list[dict]] = {t["name"]: [] for t in targets}
    started = time.monotonic()
    async with make_session(c + 4) as sess:
        episodes: dict[str, list[tuple[str, str]]] = {}
        for target in targets:
            if target["kind"] == "append":
                patients = [f"bench-{tag}-p{i}" for i in range(n_episodes)]
                sem = asyncio.Semaphore(max(c, 4))

                async def open_one(p: str, target=target) -> tuple[str, str]:
                    async with sem:
                        return p, await open_episode(sess, dict(target, url=(target.get("urls") or [target["url"]])[0]), p)
                episodes[target["name"]] = list(await asyncio.gather(*(open_one(p) for p in patients)))
            else:
                episodes[target["name"]] = [(f"bench-{tag}-p{i}", f"ep-raw-{tag}-{i}") for i in range(n_episodes)]
            # warm-up: a few requests per target (connections, caches)
            ep = episodes[target["name"]][0]
            for k in range(3 * len(target.get("urls") or [1])):
                body = json.dumps(record_doc(ep[0], ep[1], -1, k, f"{tag}-warm")).encode()
                if target["kind"] == "append":
                    urls = target.get("urls") or [target["url"]]
                    await append_record(sess, dict(target, url=urls[k % len(urls)]), ep[1], body)
                else:
                    await raw_write(sess, target, as_raw(target, body), boundary)

        for r in range(spec["repeats"]):
            if r >= 1 and time.monotonic() - started > spec["budget_s"]:
                log(f"appends c={c}: time budget reached after {r} rounds")
                break
            for target in rotated(targets, r):
                eps = episodes[target["name"]]
                latencies: list[float] = []
                deadline = time.monotonic() + spec["run_timeout_s"]

                async def client(i: int, target=target, eps=eps, latencies=latencies, deadline=deadline) -> None:
                    # a target with several gateways ("urls"): client i writes through the i-th, in turn
                    urls = target.get("urls") or [target.get("url")]
                    target = dict(target, url=urls[i % len(urls)])
                    for k in range(per_client):
                        if time.monotonic() > deadline:
                            return
                        patient, episode = eps[(i + k * c) % len(eps)]  # client i owns i, i+c, i+2c, ...
                        body = json.dumps(record_doc(patient, episode, i, k, f"{tag}-{r}"),
                                          separators=(",", ":")).encode()
                        if target["kind"] != "append":
                            body = as_raw(target, body)
                        t0 = time.perf_counter()
                        if target["kind"] == "append":
                            await append_record(sess, target, episode, body)
                        else:
                            await raw_write(sess, target, body, boundary)
                        latencies.append(time.perf_counter() - t0)

                settle()
                t0 = time.perf_counter()
                await asyncio.gather(*(client(i) for i in range(c)))
                wall = time.perf_counter() - t0
                if not latencies:
                    raise LoadError(f"appends c={c} via {target['name']}: no request completed")
                runs[target["name"]].append({
                    "records": len(latencies), "seconds": wall, "records_per_s": len(latencies) / wall,
                    "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
                    "mean_ms": statistics.fmean(latencies) * 1e3, "max_ms": max(latencies) * 1e3,
                    "truncated_by_time": len(latencies) < c * per_client,
                })
    return {"runs": runs, "episodes": n_episodes, "seconds": time.monotonic() - started}


async def history_build(spec: dict) -> dict:
    """One episode of ``length`` records, appended by ``parallel`` concurrent writers (the
    gateway queues appends to one episode, so this measures its sustained append rate)."""
    target, length = spec["target"], spec["length"]
    tag = uuid.uuid4().hex[:8]
    patient = f"bench-{tag}-history"
    started = time.monotonic()
    deadline = started + spec["budget_s"]
    async with make_session(spec["parallel"] + 2) as sess:
        episode = await open_episode(sess, target, patient)
        next_k = 1
        done = 1
        last_report = last_mark = started
        progress = [(0.0, 1)]  # (seconds, length): how the append rate changes as the episode grows

        async def writer(i: int) -> None:
            nonlocal next_k, done, last_report, last_mark
            while next_k < length and time.monotonic() < deadline:
                k = next_k
                next_k += 1
                body = json.dumps(record_doc(patient, episode, i, k, tag), separators=(",", ":")).encode()
                await append_record(sess, target, episode, body)
                done += 1
                now = time.monotonic()
                if now - last_mark >= 2:
                    last_mark = now
                    progress.append((round(now - started, 2), done))
                if now - last_report > 15:
                    last_report = now
                    rate = (done - progress[-2][1]) / max(1e-9, progress[-1][0] - progress[-2][0]) \
                        if len(progress) > 1 else 0
                    log(f"history: {done}/{length} records, now {rate:.0f}/s")

        await asyncio.gather(*(writer(i) for i in range(spec["parallel"])))
    seconds = time.monotonic() - started
    progress.append((round(seconds, 2), done))
    return {"episode": episode, "length": done, "wanted": length, "seconds": seconds,
            "records_per_s": done / seconds, "progress": progress}


async def history_page(spec: dict) -> dict:
    gateway, direct = spec["gateway"], spec.get("direct", [])
    episode, cursor, limit = spec["episode"], spec["cursor"], spec["limit"]
    url = f"{gateway['url']}/medicon/v1/episodes/{episode}/history"
    params = {"limit": str(limit), "cursor": str(cursor)}
    timings: dict[str, list[float]] = {gateway["name"]: [], **{t["name"]: [] for t in direct}}
    started = time.monotonic()
    async with make_session(4) as sess:
        async def page_once() -> dict:
            async with sess.get(url, params=params, headers=gateway.get("headers")) as resp:
                if resp.status != 200:
                    raise await _fail(resp, "history page")
                return await resp.json()

        async def page() -> dict:
            return await retrying(gateway["name"], page_once)

        first = await page()
        records = first["records"]
        seqs = [r["seq"] for r in records]
        if len(records) != limit or seqs != list(range(cursor + 1, cursor + 1 + limit)):
            raise LoadError(f"history page: got {len(records)} records, seqs {seqs[:3]}..{seqs[-3:]}")
        cids = [r["cid"] for r in records]

        async def dag_get(target: dict, cid: str) -> None:
            async with sess.post(target["url"] + "/api/v0/dag/get",
                                 params={"arg": cid, "output-codec": "dag-json"},
                                 headers=target.get("headers")) as resp:
                if resp.status != 200:
                    raise await _fail(resp, f"dag/get via {target['name']}")
                await resp.read()

        async def dag_gets(target: dict) -> None:
            for cid in cids:
                await retrying(target["name"], lambda: dag_get(target, cid))

        everyone = [gateway, *direct]
        for target in direct:
            await dag_gets(target)  # warm-up
        for r in range(spec["samples"]):
            if r >= 3 and time.monotonic() - started > spec["budget_s"]:
                log(f"history page: time budget reached after {r} samples")
                break
            for target in rotated(everyone, r):
                t0 = time.perf_counter()
                if target is gateway:
                    await page()
                else:
                    await dag_gets(target)
                timings[target["name"]].append((time.perf_counter() - t0) * 1e3)
    return {"timings_ms": timings, "records": len(cids), "first_seq": seqs[0]}


# --- clinical mix ----------------------------------------------------------------------------

MIX_WEIGHTS = {"record": 80, "history": 10, "read": 5, "attach": 5}
MIX_OPS = ("open", "append", "history", "read", "attach", "attach_read")  # as reported
KiB = 1 << 10


class MixErrors:
    """Every failed operation of the mix, by operation and status (0: no HTTP answer; a 2xx
    whose answer is wrong counts too), with the first distinct messages seen (and how often
    each came); never dropped."""

    def __init__(self, keep: int = 20) -> None:
        self.by_op: dict[str, int] = {}
        self.by_op_status: dict[str, int] = {}
        self.examples: list[dict] = []
        self.keep = keep
        self.total = 0

    def add(self, op: str, status: int, message: str) -> None:
        self.total += 1
        self.by_op[op] = self.by_op.get(op, 0) + 1
        key = f"{op} {status}"
        self.by_op_status[key] = self.by_op_status.get(key, 0) + 1
        message = message[:400]
        for seen in self.examples:
            if (seen["op"], seen["status"], seen["message"]) == (op, status, message):
                seen["count"] += 1
                return
        if len(self.examples) < self.keep:
            self.examples.append({"op": op, "status": status, "message": message, "count": 1})
            log(f"mix: {op} failed: {status} {message[:200]}")

    def as_dict(self) -> dict:
        return {"total": self.total, "by_op": self.by_op, "by_op_status": self.by_op_status,
                "examples": self.examples}


def _error_message(status: int, body: bytes) -> str:
    """The gateway's ``{"error": {"message"}}`` (or Kubo's ``{"Message"}``), else the body's start."""
    try:
        doc = json.loads(body)
        message = doc["error"]["message"] if "error" in doc else doc["Message"]
        return f"HTTP {status}: {message}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:300].decode(errors='replace')}"


class MixClient:
    """One client of the mix: a clinic's desk with ``patients`` patients, each with
    ``episodes`` episodes open at once (fhir_synth's lab, pharmacy and doctor encounters),
    written in the order the clinic would write them. Its choices come from its own
    ``random.Random``, seeded by the spec's seed and its number: the same seed gives every
    client the same steps, records and attachment sizes."""

    def __init__(self, spec: dict, number: int, sess: aiohttp.ClientSession, errors: MixErrors,
                 samples: dict[str, list[tuple[float, float]]]) -> None:
        self.spec, self.number, self.sess, self.errors, self.samples = spec, number, sess, errors, samples
        self.target = spec["target"]
        self.url = self.target["url"]
        self.rng = random.Random(f"mix:{spec['seed']}:{number}")
        weights = {**MIX_WEIGHTS, **spec.get("weights", {})}
        self.ops, self.weights = list(weights), list(weights.values())
        self.chunk: list = []
        self.chunk_no = -1
        self.position = 0
        self.chunk_cids: dict[int, str] = {}
        self.lengths: dict[str, int] = {}     # episode -> records written (seq of the next)
        self.patients: list[str] = []
        self.cids: list[str] = []
        self.steps = 0
        self.record_bytes: list[int] = []
        self.attachment_bytes = 0
        self.boundary = f"benchmix{number}x" + uuid.uuid4().hex

    # --- one request, timed and checked ----------------------------------------------------

    async def call(self, op: str, method: str, path: str, expect: tuple[int, ...], step_started: float | None = None,
                   **kw) -> bytes | None:
        """The answer's body, or None after counting the failure. Timed from the request to
        the end of its body; only successes are timed, and counted if their step
        (``step_started``, by default the request itself) began after the warm-up."""
        headers = {**self.target.get("headers", {}), **kw.pop("headers", {})}
        started = time.monotonic() if step_started is None else step_started
        t0 = time.perf_counter()

        async def once() -> tuple[int, bytes]:
            async with self.sess.request(method, self.url + path, headers=headers, **kw) as resp:
                return resp.status, await resp.read()
        try:
            status, body = await retrying(self.target["name"], once)
        except aiohttp.ClientError as exc:
            self.errors.add(op, 0, f"{type(exc).__name__}: {exc}")
            return None
        elapsed = time.perf_counter() - t0
        if not 200 <= status < 300 or status not in expect:
            self.errors.add(op, status, _error_message(status, body))
            return None
        self.samples[op].append((started, elapsed))
        return body

    def wrong(self, op: str, message: str) -> None:
        """A 2xx whose answer is not what was written: a failure like any other (its timing,
        already taken, stays: the request did cost that)."""
        self.errors.add(op, 200, f"wrong answer: {message}")

    # --- the steps --------------------------------------------------------------------------

    def next_record(self) -> tuple[int, "fhir_synth.SynthRecord"]:
        while self.position >= len(self.chunk):  # a new set of patients when one is written out
            self.chunk_no += 1
            if self.chunk_no >= 1000 or self.number >= 1000:
                raise LoadError("mix: more than 1000 clients or 1000 patient sets per client")
            seed = self.spec["seed"] * 1_000_000 + self.number * 1000 + self.chunk_no
            self.chunk = fhir_synth.generate(seed, self.spec["patients_per_client"],
                                             self.spec["episodes_per_patient"], self.spec["encounters"],
                                             prefix=f"mix-{self.spec['tag']}")
            self.position, self.chunk_cids = 0, {}
        index = self.position
        self.position += 1
        return index, self.chunk[index]

    async def write_record(self) -> None:
        index, synth = self.next_record()
        record = synth.record
        if synth.corrects is not None and synth.corrects in self.chunk_cids:
            # an amendment names the CID its corrected record got (if that write failed, the
            # placeholder stays and the gateway's answer says what it makes of it)
            record = {**record, "body": {**record["body"], "corrects": self.chunk_cids[synth.corrects]}}
        opening = record["schema"].endswith("/episode-opened/v2")
        op = "open" if opening else "append"
        path = (f"/medicon/v1/patients/{record['patient']}/episodes" if opening
                else f"/medicon/v1/episodes/{record['episode']}/records")
        body = fhir_synth.dumps(record).encode()
        self.record_bytes.append(len(body))
        # 200: the same record again, after a retry whose first answer was lost
        answer = await self.call(op, "POST", path, (200, 201), data=body,
                                 headers={"Content-Type": "application/json"})
        if answer is None:
            return
        got = json.loads(answer)
        self.chunk_cids[index] = got["cid"]
        self.cids.append(got["cid"])
        self.lengths[record["episode"]] = got["seq"] + 1
        if opening and record["patient"] not in self.patients:
            self.patients.append(record["patient"])

    async def read_history(self) -> None:
        """The latest page of one of its episodes, as a clinician opening the episode sees it."""
        limit = self.spec["history_limit"]
        episode = self.rng.choice(sorted(self.lengths))
        length = self.lengths[episode]
        cursor = max(-1, length - 1 - limit)
        answer = await self.call("history", "GET", f"/medicon/v1/episodes/{episode}/history", (200,),
                                 params={"limit": str(limit), "cursor": str(cursor)})
        if answer is None:
            return
        seqs = [r["seq"] for r in json.loads(answer)["records"]]
        if seqs != list(range(cursor + 1, length)):
            self.wrong("history", f"seqs {seqs[:2]}..{seqs[-2:]} ({len(seqs)}), wanted {cursor + 1}..{length - 1}")

    async def read_record(self) -> None:
        cid = self.rng.choice(self.cids)
        answer = await self.call("read", "GET", f"/medicon/v1/records/{cid}", (200,))
        if answer is not None and json.loads(answer)["cid"] != cid:
            self.wrong("read", "another record's CID in the answer")

    async def attach(self) -> None:
        """A small attachment (a scan, a PDF) sealed for one of its patients, then read back
        whole through ``GET /ipfs/<cid>`` and compared."""
        low, high = self.spec["attachment_kib"]
        size = self.rng.randint(low, high) * KiB
        data = b"\xff" + self.rng.randbytes(size - 1)  # never JSON: an attachment, not a record
        patient = self.rng.choice(self.patients)
        self.attachment_bytes += size
        step_started = time.monotonic()  # the read back counts with its add, in or out of the warm-up
        answer = await self.call("attach", "POST", "/api/v0/add", (200,), step_started,
                                 data=single_part(self.boundary, data, "scan.bin"),
                                 headers={"Content-Type": f"multipart/form-data; boundary={self.boundary}",
                                          "X-Medicon-Patient": patient})
        if answer is None:
            return
        try:
            cid = json.loads([line for line in answer.decode().splitlines() if line.strip()][-1])["Hash"]
        except (IndexError, ValueError, KeyError):
            self.wrong("attach", f"no Hash in {answer[:200]!r}")
            return
        back = await self.call("attach_read", "GET", f"/ipfs/{cid}", (200,), step_started)
        if back is not None and back != data:
            self.wrong("attach_read", f"{len(back)} bytes read, not the {size} added")

    async def run(self, end: float) -> None:
        while time.monotonic() < end and self.steps < self.spec.get("steps_per_client", 1 << 62):
            if self.errors.total >= self.spec["max_errors"]:
                return
            op = self.rng.choices(self.ops, self.weights)[0]
            self.steps += 1
            if op == "record" or not self.cids:  # nothing to read yet: write first
                await self.write_record()
            elif op == "history":
                await self.read_history()
            elif op == "read":
                await self.read_record()
            elif op == "attach":
                await self.attach()
            else:
                raise LoadError(f"mix: unknown operation {op!r}")


async def mix(spec: dict) -> dict:
    """``clients`` clients running the mix for ``warmup_s`` (not counted) and then
    ``duration_s``; per operation: count, ops/s, p50, p99, errors; and records/s."""
    spec = {"seed": 1, "clients": 16, "patients_per_client": 2, "episodes_per_patient": 4, "encounters": 8,
            "history_limit": 50, "attachment_kib": [64, 512], "warmup_s": 5, "duration_s": 60,
            "max_errors": 50, "tag": uuid.uuid4().hex[:6], **spec}
    errors = MixErrors()
    samples: dict[str, list[tuple[float, float]]] = {op: [] for op in MIX_OPS}
    async with make_session(spec["clients"] + 4) as sess:
        clients = [MixClient(spec, i, sess, errors, samples) for i in range(spec["clients"])]
        started = time.monotonic()
        counted_from = started + spec["warmup_s"]
        await asyncio.gather(*(c.run(counted_from + spec["duration_s"]) for c in clients))
        finished = time.monotonic()
    if errors.total >= spec["max_errors"]:
        log(f"mix: stopped after {errors.total} failed operations")
    seconds = max(0.0, finished - counted_from)  # 0: every client stopped within the warm-up

    def rate(n: int) -> float:
        return n / seconds if seconds else 0.0
    ops = {}
    for op in MIX_OPS:
        timed = [elapsed for t0, elapsed in samples[op] if t0 >= counted_from]
        ops[op] = {"count": len(timed), "ops_per_s": rate(len(timed)),
                   "p50_ms": percentile(timed, 50) * 1e3 if timed else None,
                   "p99_ms": percentile(timed, 99) * 1e3 if timed else None,
                   "mean_ms": statistics.fmean(timed) * 1e3 if timed else None,
                   "max_ms": max(timed) * 1e3 if timed else None,
                   "errors": errors.by_op.get(op, 0), "warmup_count": len(samples[op]) - len(timed)}
    records = ops["open"]["count"] + ops["append"]["count"]
    sizes = [n for c in clients for n in c.record_bytes]
    return {"clients": spec["clients"], "seed": spec["seed"], "tag": spec["tag"],
            "weights": {**MIX_WEIGHTS, **spec.get("weights", {})}, "warmup_s": spec["warmup_s"],
            "duration_s": spec["duration_s"], "patients_per_client": spec["patients_per_client"],
            "episodes_per_patient": spec["episodes_per_patient"], "history_limit": spec["history_limit"],
            "attachment_kib": spec["attachment_kib"], "seconds": seconds, "ops": ops, "records": records,
            "records_per_s": rate(records), "steps": sum(c.steps for c in clients),
            "patients": sum(len(c.patients) for c in clients),
            "episodes": sum(len(c.lengths) for c in clients),
            "record_bytes": {"mean": statistics.fmean(sizes) if sizes else None,
                             "p50": percentile(sizes, 50) if sizes else None,
                             "max": max(sizes, default=None)},
            "attachment_bytes": sum(c.attachment_bytes for c in clients),
            "stopped_by_errors": errors.total >= spec["max_errors"],
            "errors": errors.as_dict()}


SCENARIOS = {"prepare": prepare, "stream": stream, "append": appends,
             "history_build": history_build, "history_page": history_page, "mix": mix}


def main() -> int:
    spec = json.load(sys.stdin)
    try:
        result = asyncio.run(SCENARIOS[spec["kind"]](spec))
    except LoadError as exc:
        print(f"loadgen: error: {exc}", file=sys.stderr, flush=True)
        return 3
    except aiohttp.ClientError as exc:
        print(f"loadgen: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 3
    result["retries"] = RETRIES
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
