"""The record model: what a record is, the kinds the chain gives a meaning to, and the errors
and results of appending one."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import Conflict, Invalid
from ..storage.model import Episode
from . import exactjson, strictjson

EPISODE_OPENED = "https://medicon.example/schemas/episode-opened/v1"
EPISODE_CLOSED = "https://medicon.example/schemas/episode-closed/v1"
# Every version of the kinds that open and close an episode (v2: FHIR-shaped bodies).
OPENING_KINDS = frozenset({EPISODE_OPENED, "https://medicon.example/schemas/episode-opened/v2"})
CLOSING_KINDS = frozenset({EPISODE_CLOSED, "https://medicon.example/schemas/episode-closed/v2"})


class RecordInvalid(Invalid):
    """The record breaks its schema or a plugin rule; each problem is named by JSON pointer."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid record: " + "; ".join(problems), details={"problems": problems})
        self.problems = problems


class ChainConflict(Conflict):
    """The append does not fit the episode as it stands (``episode``: as it is now)."""

    def __init__(self, message: str, episode: Episode | None) -> None:
        if episode is not None:
            message += f" (current head {episode.head}, length {episode.length}, {episode.status})"
        super().__init__(message)
        self.episode = episode


# The fields the gateway decides when it links a record into its episode.
ENVELOPE_FIELDS = ("prev", "seq", "recorded_at")


class ClientRecord(Mapping):
    """A record as JSON text and the value parsed from it (numbers with a fraction as
    ``Decimal``): what a client sent, kept byte for byte, and what every reader gets back.

    The text is what is sealed and stored; the parsed value is what the gateway reasons with
    (schema, chain, authorization). It reads as a mapping of the record's fields and cannot be
    changed in place: ``with_fields`` gives a new record whose text differs only in the
    members set (the gateway's envelope fields, or the ids a door fills in)."""

    __slots__ = ("text", "parsed")

    def __init__(self, text: str, parsed: dict[str, Any]) -> None:
        self.text = text
        self.parsed = parsed

    @classmethod
    def from_text(cls, text: str | bytes) -> "ClientRecord":
        """The record a client's JSON text holds, parsed strictly (``strictjson.BadJSON``);
        the whitespace around the object is not part of it."""
        parsed = strictjson.loads(text)
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(parsed, dict):
            return cls(text.strip(), parsed)
        return cls(exactjson.object_text(text), parsed)

    @classmethod
    def of(cls, doc: Any) -> "ClientRecord":
        """``doc`` as a record: itself if it is one, else a JSON value written out (keys in
        its order) and read back strictly. ``RecordInvalid`` if it has no JSON form."""
        if isinstance(doc, ClientRecord):
            return doc
        try:
            return cls.from_text(exactjson.dumps(doc))
        except (ValueError, TypeError) as bad:
            raise RecordInvalid([f"/: {bad}"]) from None

    def with_fields(self, **fields: Any) -> "ClientRecord":
        """This record with ``fields`` set. Members whose value does not change keep their
        text as the client wrote it."""
        changed = {k: v for k, v in fields.items() if k not in self.parsed or self.parsed[k] != v
                   or type(self.parsed[k]) is not type(v)}
        if not changed:
            return self
        return ClientRecord(exactjson.set_members(self.text, changed), {**self.parsed, **changed})

    def __getitem__(self, key: str) -> Any:
        return self.parsed[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.parsed)

    def __len__(self) -> int:
        return len(self.parsed)

    def __repr__(self) -> str:
        return f"ClientRecord({self.text[:60]!r}...)"


@dataclass(frozen=True)
class Appended:
    cid: str
    episode: Episode
    record: ClientRecord
    created: bool           # False: the exact same record was already appended (idempotent retry)

    @property
    def seq(self) -> int:
        return self.record["seq"]


def is_record_candidate(doc: Any) -> bool:
    """A JSON document that claims to be a record: an object naming a schema and an episode or
    patient. Other JSON is a blob like any file."""
    return isinstance(doc, dict) and "schema" in doc and ("episode" in doc or "patient" in doc)


def normalise(doc: ClientRecord) -> ClientRecord:
    """A record as written by a client: ``prev`` may arrive as an IPLD link ``{"/": cid}``."""
    prev = doc.get("prev")
    if isinstance(prev, dict) and set(prev) == {"/"}:
        doc = doc.with_fields(prev=prev["/"])
    return doc


def claimed_resource(doc: dict[str, Any]) -> dict[str, Any]:
    """What a record claims to be, for authorization before its schema is checked: a patient
    or episode that is not a string (an invalid record, refused later) is passed as its JSON
    text, so scopes and audit pseudonyms only ever see strings."""
    def named(value: Any) -> str | None:
        return value if value is None or isinstance(value, str) else exactjson.dumps(value, sort_keys=True)
    return {"kind": "record", "patient": named(doc.get("patient")), "episode": named(doc.get("episode"))}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def timestamp(value: str) -> dt.datetime:
    """An RFC 3339 time (validated by the schema). A leap second (``:60``), which Python's
    datetime cannot hold, counts as the last instant of its minute."""
    text = value.replace("Z", "+00:00").replace("z", "+00:00")
    leap = len(text) > 19 and text[17:19] == "60"
    if leap:
        text = text[:17] + "59" + text[19:]
    stamp = dt.datetime.fromisoformat(text)
    return stamp.replace(microsecond=999999) if leap else stamp


def dag_json_problems(value: Any, pointer: str = "") -> list[str]:
    """dag-json gives a map with the key "/" a meaning of its own (a link or bytes)."""
    if isinstance(value, dict):
        out = [f"{pointer}/~1: the key \"/\" is reserved by IPLD"] if "/" in value else []
        for key, item in value.items():
            out += dag_json_problems(item, f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}")
        return out
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in dag_json_problems(item, f"{pointer}/{i}")]
    return []


def request_digest(record: Mapping[str, Any], signer: str) -> str:
    """What identifies one append: the record as the client sent it (its value: numbers as
    written, keys in any order), and who sent it."""
    text = exactjson.render({"record": dict(record), "signer": signer}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
