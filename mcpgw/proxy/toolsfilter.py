# -*- test-case-name: tests.test_toolsfilter -*-
"""
C{tools/list} answers filtered: a client never sees a tool that policy would deny it, nor (MCP
2026-07-28) a tool whose C{x-mcp-header} annotations are invalid. The caller decides per tool
entry with a C{keep} function, which also sees every listed tool (the gateway records each tool's
annotations there).

Two shapes of answer are handled:
  - JSON (C{application/json}): the whole body is collected (it is small), filtered and re-sent
    with a correct C{Content-Length};
  - SSE (C{text/event-stream}): events are relayed one by one as they complete; an event whose
    C{data} is a JSON-RPC response carrying C{result.tools} is rewritten, every other event passes
    byte for byte.
Anything that is not a JSON-RPC response with a C{result.tools} list passes unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

#: Decides whether one C{tools/list} entry stays in the answer.
Keep = Callable[[Any], bool]


def byName(allows: Callable[[str], bool]) -> Keep:
    """A L{Keep} from a predicate on tool names (entries without a string name are kept)."""

    def keep(tool: Any) -> bool:
        name = tool.get("name") if isinstance(tool, dict) else None
        return not isinstance(name, str) or allows(name)

    return keep


def filterMessage(value: Any, keep: Keep) -> tuple[Any, int]:
    """
    @param value: a parsed JSON-RPC message or batch.
    @return: the message with the tools C{keep} refuses removed from every C{result.tools}, and
        how many were removed (0: C{value} itself is returned).
    """
    if isinstance(value, list):
        total = 0
        out = []
        for item in value:
            new, n = filterMessage(item, keep)
            out.append(new)
            total += n
        return (out, total) if total else (value, 0)
    if not isinstance(value, dict):
        return value, 0
    result = value.get("result")
    if not isinstance(result, dict):
        return value, 0
    tools = result.get("tools")
    if not isinstance(tools, list):
        return value, 0
    kept = [t for t in tools if keep(t)]
    removed = len(tools) - len(kept)
    if not removed:
        return value, 0
    return {**value, "result": {**result, "tools": kept}}, removed


def filterJSONBody(body: bytes, keep: Keep) -> tuple[bytes, int]:
    """
    @return: the filtered body (the original bytes when nothing was removed or it is not JSON)
        and the number of tools removed.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body, 0
    new, removed = filterMessage(value, keep)
    return (orjson.dumps(new), removed) if removed else (body, 0)


class SSEFilter:
    """
    Incremental SSE rewriter: feed it bytes as they come, it returns the bytes to send now (whole
    events only; a partial event waits for its end).
    """

    def __init__(self, keep: Keep) -> None:
        self._keep = keep
        self._buf = b""
        self.removed = 0

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data
        out: list[bytes] = []
        start = 0
        while True:
            end, sep = _eventEnd(buf, start)
            if end < 0:
                break
            out.append(self._event(buf[start:end]) + sep)
            start = end + len(sep)
        self._buf = buf[start:]
        return b"".join(out)

    def flush(self) -> bytes:
        """The bytes of an unterminated last event, unchanged."""
        rest, self._buf = self._buf, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        if b"tools" not in event:
            return event
        lines = event.replace(b"\r\n", b"\n").split(b"\n")
        data = [ln[5:].lstrip(b" ") if ln.startswith(b"data:") else None for ln in lines]
        payload = b"\n".join(d for d in data if d is not None)
        new, removed = filterJSONBody(payload, self._keep)
        if not removed:
            return event
        self.removed += removed
        kept = [ln for ln, d in zip(lines, data, strict=True) if d is None]
        return b"\n".join([*kept, b"data: " + new])


def _eventEnd(buf: bytes, start: int) -> tuple[int, bytes]:
    """Index and separator of the first blank line at or after C{start}; (-1, b"") if none."""
    best = -1
    bestSep = b""
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = buf.find(sep, start)
        if i >= 0 and (best < 0 or i < best):
            best, bestSep = i, sep
    return best, bestSep
