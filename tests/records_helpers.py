"""Builders for records used across the record tests."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid

BASE = "https://medicon.example/schemas"
OPENED = f"{BASE}/episode-opened/v1"
ENCOUNTER = f"{BASE}/encounter/v1"
CLOSED = f"{BASE}/episode-closed/v1"
AMENDMENT = f"{BASE}/amendment/v1"
_clock = itertools.count()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def stamp() -> str:
    """Strictly increasing times, so records built in order are in time order."""
    base = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return (base + dt.timedelta(seconds=next(_clock))).isoformat().replace("+00:00", "Z")


def opened(patient: str, episode: str, **extra) -> dict:
    return {"schema": OPENED, "patient": patient, "episode": episode, "author": "dr.house",
            "body": {"type": "diabetes-care", "managingOrganization": "clinic-a",
                     "period": {"start": "2026-01-01T08:00:00Z"}}, **extra}


def encounter(patient: str, episode: str, cls: str = "lab", note: str = "", **extra) -> dict:
    return {"schema": ENCOUNTER, "patient": patient, "episode": episode, "author": "lab.central",
            "body": {"class": cls, "status": "finished", "period": {"start": "2026-01-02T08:00:00Z"},
                     "notes": note}, **extra}


def closed(patient: str, episode: str, **extra) -> dict:
    return {"schema": CLOSED, "patient": patient, "episode": episode, "author": "dr.house",
            "body": {"reason": "treatment complete", "period_end": "2026-02-01T08:00:00Z"}, **extra}
