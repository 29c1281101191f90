"""Logging set-up shared by ``groupsec serve`` and ``groupsec-agent run``: ``--log-format text|json``.

The JSON form writes one object per line: ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
``logger``, ``message``, then any structured extras passed with ``log.info(..., extra={...})`` and
``exc`` for a traceback. Bytes never reach the output: an extra that is (or contains) bytes is
written as ``"<N bytes>"``, so key material passed by mistake as an extra is not logged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from typing import IO, Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# attributes every LogRecord has: whatever else is on a record came from ``extra=``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def add_log_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default) or json: one JSON object per line (time, level, logger, message, extras)")


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON-safe copy of an extra; bytes are replaced by their length (never their content)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if depth > 4:
        return str(value)[:200]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v, depth + 1) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (no newlines inside: json.dumps escapes them)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_") and k not in doc:
                doc[k] = _plain(v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(fmt: str = "text", level: int = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one writing ``fmt`` to ``stream`` (stderr)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
