"""The record model: what a record is, the kinds the chain gives a meaning to, and the errors
and results of appending one."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..errors import Conflict, Invalid
from ..security import crypto
from ..storage.model import Episode

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


@dataclass(frozen=True)
class Appended:
    cid: str
    episode: Episode
    record: dict[str, Any]
    created: bool           # False: the exact same record was already appended (idempotent retry)

    @property
    def seq(self) -> int:
        return self.record["seq"]


def is_record_candidate(doc: Any) -> bool:
    """A JSON document that claims to be a record: an object naming a schema and an episode or
    patient. Other JSON is a blob like any file."""
    return isinstance(doc, dict) and "schema" in doc and ("episode" in doc or "patient" in doc)


def normalise(doc: dict[str, Any]) -> dict[str, Any]:
    """A record as written by a client: ``prev`` may arrive as an IPLD link ``{"/": cid}``."""
    prev = doc.get("prev")
    if isinstance(prev, dict) and set(prev) == {"/"}:
        doc = {**doc, "prev": prev["/"]}
    return doc


def claimed_resource(doc: dict[str, Any]) -> dict[str, Any]:
    """What a record claims to be, for authorization before its schema is checked: a patient
    or episode that is not a string (an invalid record, refused later) is passed as its JSON
    text, so scopes and audit pseudonyms only ever see strings."""
    def named(value: Any) -> str | None:
        return value if value is None or isinstance(value, str) else json.dumps(value, sort_keys=True)
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


def request_digest(record: dict[str, Any], signer: str) -> str:
    """What identifies one append: the record as the client sent it, and who sent it."""
    return hashlib.sha256(crypto.canonical_json({"record": record, "signer": signer})).hexdigest()
