"""Logging for the ``medicon-gateway`` commands: text for people (the default, and ``dev``'s),
or one JSON object a line for log pipelines (``--log-format json``).

A JSON line has ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, plus
``request_id`` when it was logged while a request was served, plus the fields the record was
logged with (the access log's ``principal``, ``method``, ``surface``, ``route``, ``status``,
``duration_ms``). What the gateway logs never holds a credential or a patient identifier: routes
are templates, never paths; queries and bodies are never logged.
"""

from __future__ import annotations

import contextvars
import logging
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The id of the request being served in this task (set by ``gateway.http.metrics``), so any line
# logged on its behalf carries it.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("medicon_request_id", default=None)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = REQUEST_ID.get()
            if request_id is not None:
                record.request_id = request_id
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter("%(levelname)s %(name)s %(message)s", timestamp="time",
                         rename_fields={"levelname": "level", "name": "logger"})


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the process's log records to ``stream`` (stderr by default) as ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (known: {', '.join(FORMATS)})")
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(json_formatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
