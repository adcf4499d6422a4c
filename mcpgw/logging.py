"""
Operational log: one JSON object per line on stdout (for journald), never the audit trail.

C{mcpgw run} installs it; under twistd use
C{twistd -n --logger=mcpgw.logging.observerFactory mcpgw}.
"""

from __future__ import annotations

import sys
from typing import IO, Any

import orjson
from twisted.logger import FileLogObserver, ILogObserver, formatEvent

from mcpgw.audit.writer import rfc3339ms


def formatJSON(event: dict[str, Any]) -> str:
    """@return: C{event} as one JSON line: C{ts}, C{level}, C{ns}, C{msg} (+ C{exc})."""
    record: dict[str, Any] = {
        "ts": rfc3339ms(event.get("log_time", 0.0)),
        "level": getattr(event.get("log_level"), "name", "info"),
        "ns": event.get("log_namespace"),
        "msg": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["exc"] = failure.getTraceback()
    return orjson.dumps(record, default=repr).decode() + "\n"


def jsonObserver(stream: IO[str] | None = None) -> ILogObserver:
    """@return: an observer writing JSON lines to C{stream} (stdout by default)."""
    return FileLogObserver(stream or sys.stdout, formatJSON)


def observerFactory() -> ILogObserver:
    """Zero-argument factory for twistd's C{--logger} option."""
    return jsonObserver()
