"""Bulk import: records from a file of JSON lines, appended in order through the record service
(validated, chained, sealed, signed, audited exactly as through any door), with progress.

Each line's ``Idempotency-Key`` is its place in the file (``<prefix>:<line number>``), so an
import that stopped half-way (a crash, a full disk, a refused record) is simply run again: what
was appended is answered as already there, and the rest goes on.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ..errors import Invalid, MediconError
from . import strictjson
from .access import Caller
from .records import ClientRecord, is_record_candidate
from .service import RecordService

Progress = Callable[[str, int, int], None]


async def import_records(service: RecordService, lines: Iterable[str], caller: Caller, *, key_prefix: str,
                         keep_going: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Append every record of ``lines`` (one JSON object each; blank lines skipped) in order.
    Stops at the first refused record unless ``keep_going``; the report names each refusal by
    line number, never by content."""
    items = [(number, text) for number, text in enumerate(lines, 1) if text.strip()]
    report: dict[str, Any] = {"records": len(items), "imported": 0, "repeated": 0, "failed": []}
    for done, (number, text) in enumerate(items, 1):
        try:
            doc = ClientRecord.from_text(text)  # the line's text is what is stored and read back
            if not is_record_candidate(doc.parsed):
                raise Invalid("not a record: a JSON object naming a schema and an episode or patient")
            appended = await service.append(doc, caller, f"{key_prefix}:{number}")
        except MediconError as err:
            report["failed"].append({"line": number, "error": type(err).__name__, "message": err.message})
            if not keep_going:
                break
        except strictjson.BadJSON as bad:
            report["failed"].append({"line": number, "error": "Invalid", "message": f"invalid JSON: {bad}"})
            if not keep_going:
                break
        else:
            report["imported" if appended.created else "repeated"] += 1
        if progress is not None:
            progress("records", done, len(items))
    return report
