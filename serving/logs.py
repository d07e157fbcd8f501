"""Structured logs: one JSON object per line (``MEDVISION_LOG_FORMAT=json``), with the request id when there is one.

What goes into a log record is already free of patient identifiers (routes log codes, counts, timings and
route templates); this only changes the shape, for log shippers that index fields.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "method", "route", "status", "duration_ms"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = record.exc_info[0].__name__ if record.exc_info[0] else "exception"
        return json.dumps(entry)


def use_json_logs() -> None:
    root = logging.getLogger()
    for handler in root.handlers or [logging.StreamHandler()]:
        handler.setFormatter(JsonFormatter())
        if handler not in root.handlers:
            root.addHandler(handler)
