# -*- test-case-name: tests.test_transforms -*-
"""
The response-transform stage: every rewrite the gateway applies to an upstream's answer, done in
one parse of each JSON body or SSE event, whatever transforms apply.

Pure logic: no Twisted, no I/O. The gateway builds one L{ResponseTransform} per exchange from the
request's ids and methods and the per-exchange settings, skips the stage when it is not
L{ResponseTransform.active}, and otherwise passes a complete C{application/json} body to
L{ResponseTransform.jsonBody}, or C{text/event-stream} bytes, as they come, to
L{ResponseTransform.feed} and, at the end, L{ResponseTransform.flush}.

Transforms (each acts on the C{result} of a JSON-RPC response whose id the request used):
  - listing filter (C{keep}): answers to C{tools/list}, C{resources/list},
    C{resources/templates/list} and C{prompts/list} lose the items C{keep(kind, item)} refuses
    (L{LISTS}: the kind and the member naming each item). Items that are not JSON objects are
    kept (not passed to C{keep});
  - private caching (C{privateCache}): MCP 2026-07-28 puts caching hints on the result itself
    (C{CacheableResult}: C{result.ttlMs}, C{result.cacheScope}); when the answer depends on the
    caller, a C{cacheScope} other than C{"private"} becomes C{"private"}. Decided here where the
    contract is silent: the rewrite follows C{privateCache} alone, whether or not this caller's
    answer lost items (an unfiltered answer cached publicly would be served to a caller who must
    not see all of it; a filter that does not depend on the caller leaves a public answer
    public). It applies to the four listing answers and to C{resources/read} answers (whether
    the caller may read a resource is decided per caller too). A result with C{ttlMs} but no
    C{cacheScope} gets C{"private"} (some SDKs read a missing scope as public); a result with
    neither (an earlier protocol revision: no caching hints) is left alone;
  - tool pinning (C{pin}, C{holdBack}; L{mcpgw.pinning}): a C{tools/list} answer's tool list is
    passed whole to C{pin}, which says which tools the lock file does not approve (memoised by
    the list's bytes, so an unchanged list is not hashed again); the worst verdict is kept in
    L{ResponseTransform.pinned} (C{changed} over C{new}). With C{holdBack} (C{enforce}) those
    tools are left out, in the same pass as the listing filter, and an answer that lost one
    gets a private C{cacheScope} (as for C{privateCache}, below). Every entry of a tool whose
    name is not approved is left out, even when the same name is listed twice. With C{pinAny}
    (SSE streams, GET ones included, when pinning is on) the same step applies to any response
    whose C{result.tools} is a list, whatever its id: an upstream cannot slip a listing past it
    on a resumed stream or inside another request's stream;
  - result redaction (C{redactResult} with C{resultIds}, or C{redactors} per id): the C{result}
    of a response whose id was asked for is replaced by what the function returns; the count it
    returns adds to L{ResponseTransform.redactedResults}. Any method's response is scrubbed when
    its id is asked for (policy names C{tools/call}, C{resources/read} and C{prompts/get} calls).

Adding a transform: a new keyword setting of L{ResponseTransform}, and in
L{ResponseTransform.__init__} a step for the ids it concerns (a function from a result object to
a new one, or C{None} when it leaves it alone). Steps act on C{result}, so the quick byte check
below (C{result} spelled in the bytes) holds for them; a transform acting elsewhere adds its own.

Which messages are touched: only responses (no C{method} member) whose C{id} is one of the
request's (or, for C{pinAny}, whose C{result.tools} is a list) and whose C{result} is an
object; requests from the server reuse ids from another space and are never touched, nor are
notifications and error responses. Ids match as JSON values
(C{1} and C{1.0} alike; a boolean is never an id). Every response with a watched id is
transformed, even a second one.

Cheap when nothing applies: an SSE event, or a body, whose bytes neither contain C{result} nor a
C{\\u00XX} escape of one of its letters cannot hold a result and is relayed without being parsed.

Fail closed, since an upstream may be hostile and clients parse more leniently than orjson:
  - a payload orjson refuses but an ordinary parser accepts (lone surrogate escapes, invalid
    UTF-8 bytes, C{1e400}, a BOM before a body) is read with the standard library, as a lenient
    client would, and transformed like any other;
  - a payload holding a response with a duplicate key in any object (even C{id}) is
    re-serialised as parsed (the last copy wins), so no client can read a copy the gateway did
    not inspect. Compact JSON (what the SDKs send) is recognised by re-serialising it (a few
    microseconds per KB); other payloads holding a response are parsed a second time, by the
    standard library, to look for duplicates;
  - a response that cannot be transformed or re-serialised (nesting too deep) becomes a
    JSON-RPC error (C{upstream_bad_response}, -32015) with its id; a payload with C{result} in
    it that no parser here can read for its depth becomes one such error per watched id. Both
    count in L{ResponseTransform.refused};
  - a payload that is not JSON for anyone passes unchanged.

SSE framing follows the WHATWG parsing rules: lines end with CRLF, LF or CR (a CRLF may be split
across feeds), a blank line ends an event, C{data} values are joined with LF, one space after the
colon is dropped, a BOM at the start of the stream is ignored. A rewritten event keeps its other
lines (id, event, retry, comments) in place; its data lines become one C{data:} line where the
last stood. An unterminated last event is passed unchanged by L{ResponseTransform.flush}
(clients discard it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import orjson

from mcpgw.errors import UpstreamBadResponse
from mcpgw.jsonrpc import duplicateKey

__all__ = [
    "CACHEABLE",
    "LISTS",
    "Keep",
    "Pin",
    "Redact",
    "ResponseTransform",
]

#: Decides whether one listed item stays: C{keep(kind, item)}, C{kind} as in L{LISTS}.
Keep = Callable[[str, dict[str, Any]], bool]

#: Tool pinning's verdict on one C{tools/list} answer's C{result.tools}: the name of each tool
#: the lock file does not approve -> C{"new"} or C{"changed"}
#: (L{mcpgw.pinning.UpstreamPins.listed}).
Pin = Callable[[list[Any]], Mapping[str, str]]

#: Scrubs one C{result}: the new result (the same object when nothing changed) and how many
#: strings changed.
Redact = Callable[[Any], tuple[Any, int]]

#: Listing methods: the result member holding the list (the kind passed to L{Keep}) and the
#: item member naming each entry.
LISTS: Mapping[str, tuple[str, str]] = {
    "tools/list": ("tools", "name"),
    "resources/list": ("resources", "uri"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate"),
    "prompts/list": ("prompts", "name"),
}

#: Methods whose answers L{ResponseTransform} marks private when C{privateCache} is set.
CACHEABLE = frozenset({*LISTS, "resources/read"})

_Step = Callable[[dict[str, Any]], "dict[str, Any] | None"]

#: A C{\\u00XX} escape of one of the letters of C{result} (r e s u l t).
_ESCAPED = re.compile(rb"\\u00(?:7[2-5]|6[5cC])")
_BOM = b"\xef\xbb\xbf"
_REFUSAL = UpstreamBadResponse(
    "mcpgw could not inspect the upstream's answer (too deeply nested or not serialisable)"
).errorObject()


def _idKey(value: object) -> str | int | float | None:
    """A JSON-RPC id usable as a key, C{None} if the value cannot be an id."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return value


def _mayHoldResult(buf: bytes | bytearray, start: int = 0, end: int | None = None) -> bool:
    """The quick check: C{result} spelled in C{buf[start:end]}, plainly or with an escape."""
    if end is None:
        end = len(buf)
    return buf.find(b"result", start, end) >= 0 or _ESCAPED.search(buf, start, end) is not None


def _isResponse(message: object) -> bool:
    return isinstance(message, dict) and "method" not in message and "id" in message


class ResponseTransform:
    """
    One exchange's response rewriting (see the module docstring).

    @ivar active: whether anything can change; when C{False} the stage can be skipped.
    @ivar removed: listed items left out so far.
    @ivar redactedResults: strings changed in results so far.
    @ivar refused: responses replaced by an error because they could not be inspected or
        re-serialised.
    @ivar pinned: tool pinning's verdict on the listed tools: C{"changed"} if any listed tool
        changed since approval, else C{"new"} if any is not approved, else C{None}.
    """

    def __init__(
        self,
        methods: Mapping[Any, str],
        *,
        keep: Keep | None = None,
        privateCache: bool = False,
        redactResult: Redact | None = None,
        resultIds: Collection[Any] = (),
        redactors: Mapping[Any, Redact] | None = None,
        pin: Pin | None = None,
        holdBack: bool = False,
        pinAny: bool = False,
    ) -> None:
        """
        @param methods: JSON-RPC request id -> method, for every request the answer may respond
            to (one request, or each request of a batch).
        @param keep: the listing filter (C{None}: nothing is left out).
        @param privateCache: the answer depends on the caller: C{cacheScope} becomes private.
        @param redactResult: scrubs the results of the responses to C{resultIds}.
        @param redactors: request id -> its scrubbing function, for a batch whose calls need
            different ones (wins over C{redactResult} for its ids).
        @param pin: tool pinning's verdict on a C{tools/list} answer's tools (C{None}: off).
        @param holdBack: leave the tools C{pin} names out (C{enforce}); else only note them.
        @param pinAny: also pass through C{pin} the tool list of any other response whose
            C{result.tools} is a list, whatever its id (a C{tools/list} result delivered on a
            resumed GET stream or inside another request's stream).
        """
        self.removed = 0
        self.pinned: str | None = None
        self.redactedResults = 0
        self.refused = 0
        byId: dict[str | int | float, str] = {}
        for rid, method in methods.items():
            key = _idKey(rid)
            if key is not None:
                byId[key] = method
        scrubbers: dict[str | int | float, Redact] = {}
        if redactResult is not None:
            for rid in resultIds:
                key = _idKey(rid)
                if key is not None:
                    scrubbers[key] = redactResult
        for rid, scrub in (redactors or {}).items():
            key = _idKey(rid)
            if key is not None:
                scrubbers[key] = scrub
        plans: dict[str | int | float, tuple[_Step, ...]] = {}
        for key in byId.keys() | scrubbers.keys():
            answers = byId.get(key, "")
            steps: list[_Step] = []
            pinning = pin if answers == "tools/list" else None
            if (keep is not None or pinning is not None) and answers in LISTS:
                steps.append(self._listStep(LISTS[answers][0], keep, pinning, holdBack))
            if privateCache and answers in CACHEABLE:
                steps.append(_privateScope)
            if key in scrubbers:
                steps.append(self._redactStep(scrubbers[key]))
            if steps:
                plans[key] = tuple(steps)
        self._plans = plans
        self._anyTools: tuple[_Step, ...] | None = None
        if pinAny and pin is not None:
            self._anyTools = (self._listStep("tools", None, pin, holdBack),)
        self.active = bool(plans) or self._anyTools is not None
        self._buf = bytearray()
        self._scan = 0
        self._atStart = True

    # -- Steps -------------------------------------------------------------------------------

    def _listStep(self, kind: str, keep: Keep | None, pin: Pin | None, holdBack: bool) -> _Step:
        def step(result: dict[str, Any]) -> dict[str, Any] | None:
            items = result.get(kind)
            if not isinstance(items, list):
                return None
            held: Mapping[str, str] | None = None
            if pin is not None:
                verdicts = pin(items)
                if verdicts:
                    worst = "changed" if "changed" in verdicts.values() else "new"
                    if self.pinned != "changed":
                        self.pinned = worst
                    if holdBack:
                        held = verdicts
            if held is None:
                if keep is None:
                    return None
                kept = [item for item in items if not isinstance(item, dict) or keep(kind, item)]
            else:
                kept = [
                    item
                    for item in items
                    if not isinstance(item, dict)
                    or (not _named(item, held) and (keep is None or keep(kind, item)))
                ]
            if len(kept) == len(items):
                return None
            self.removed += len(items) - len(kept)
            new = {**result, kind: kept}
            if held is not None and any(isinstance(i, dict) and _named(i, held) for i in items):
                # A transitional answer (tools held back until approved): no shared cache.
                new = _privateScope(new) or new
            return new

        return step

    def _redactStep(self, redact: Redact) -> _Step:
        def step(result: dict[str, Any]) -> dict[str, Any] | None:
            new, count = redact(result)
            self.redactedResults += count
            return new if new is not result else None

        return step

    # -- Messages ----------------------------------------------------------------------------

    def message(self, value: Any) -> Any:
        """
        Transform a parsed JSON-RPC message or batch.

        @return: the new value, or C{value} itself when nothing changed. A response a step could
            not handle (nesting too deep) is replaced by an error response.
        """
        if not isinstance(value, list):
            return self._one(value)
        out = [self._one(item) for item in value]
        if all(new is old for new, old in zip(out, value, strict=True)):
            return value
        return out

    def _one(self, message: Any) -> Any:
        if not _isResponse(message):
            return message
        result = message.get("result")
        if not isinstance(result, dict):
            return message
        key = _idKey(message.get("id"))
        plan = self._plans.get(key) if key is not None else None
        if plan is None:
            if self._anyTools is None or not isinstance(result.get("tools"), list):
                return message
            plan = self._anyTools
        new = result
        try:
            for step in plan:
                changed = step(new)
                if changed is not None:
                    new = changed
        except RecursionError:
            return self._refusal(message.get("id"))
        return message if new is result else {**message, "result": new}

    def _refusal(self, rid: Any) -> dict[str, Any]:
        self.refused += 1
        return {
            "jsonrpc": "2.0",
            "id": rid if _idKey(rid) is not None else None,
            "error": dict(_REFUSAL),
        }

    def _payload(self, payload: bytes) -> bytes | None:
        """
        The rewritten JSON text of one body or event payload, or C{None} to relay it as it is.
        """
        if not _mayHoldResult(payload):
            return None
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return self._lenient(payload)
        new = self.message(value)
        if new is not value:
            return self._dumps(new)
        items = value if isinstance(value, list) else (value,)
        if any(map(_isResponse, items)):
            # A duplicate key (even "id") means clients may read a copy not inspected here.
            try:
                duplicates = duplicateKey(payload, value) is not None
            except (ValueError, RecursionError):
                duplicates = True  # cannot tell: send what was inspected
            if duplicates:
                return self._dumps(value)
        return None

    def _lenient(self, payload: bytes) -> bytes | None:
        """A payload orjson refuses, read as a lenient client would."""
        try:
            value, duplicates = _decodeLenient(payload)
        except ValueError:
            return None  # not JSON for any client either
        except RecursionError:
            # Too deep for every parser here, not necessarily for the client's.
            refusals = [self._refusal(rid) for rid in self._plans]
            return self._dumps(refusals[0] if len(refusals) == 1 else refusals)
        new = self.message(value)
        if new is value:
            items = value if isinstance(value, list) else (value,)
            if not (duplicates and any(map(_isResponse, items))):
                return None
        return self._dumps(new)

    def _dumps(self, value: Any) -> bytes:
        """Serialise a payload; a message that cannot be becomes an error response."""
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass
        if isinstance(value, list):
            return b"[" + b",".join(self._dumpOne(item) for item in value) + b"]"
        return self._dumpOne(value)

    def _dumpOne(self, value: Any) -> bytes:
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass
        try:
            text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        except (ValueError, RecursionError):
            return orjson.dumps(self._refusal(value.get("id") if isinstance(value, dict) else None))
        return text.encode("ascii")

    # -- JSON bodies -------------------------------------------------------------------------

    def jsonBody(self, body: bytes) -> bytes:
        """
        Transform a complete C{application/json} answer (one response or a batch).

        @return: C{body} itself when nothing changed, else the re-serialised answer.
        """
        if not self.active:
            return body
        new = self._payload(body)
        return body if new is None else new

    # -- SSE streams -------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """
        Take the next bytes of an SSE stream.

        @return: the bytes to send now: every event completed by C{data}, rewritten if it holds a
            response that changes, else byte for byte (a partial event waits for its end).
        """
        if not self.active:
            return data
        buf: bytes | bytearray
        if self._buf:
            buf = self._buf
            buf += data
        else:
            buf = data  # the common case: no partial event waiting, no copy
        out: list[bytes] = []
        start = 0
        sent = 0  # buf[sent:start]: complete events passed as they are, not yet in out
        pos = self._scan
        while (end := _blankEnd(buf, pos)) >= 0:
            new = self._event(buf, start, end) if _mayHoldResult(buf, start, end) else None
            if new is not None:
                if sent < start:
                    out.append(bytes(buf[sent:start]))
                out.append(new)
                sent = end
            start = pos = end
            self._atStart = False
        if sent < start:
            if not out and buf is data:
                out.append(data if start == len(data) else data[:start])
            else:
                out.append(bytes(buf[sent:start]))
        if buf is data:
            if start < len(data):
                self._buf = bytearray(data[start:])
        elif start:
            del self._buf[:start]
        # The next search starts where a blank line could begin with the bytes to come.
        self._scan = max(0, len(self._buf) - 1)
        return out[0] if len(out) == 1 else b"".join(out)

    def flush(self) -> bytes:
        """The bytes of an unterminated last event, unchanged (clients discard them)."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return rest

    def _event(self, buf: bytes | bytearray, start: int, end: int) -> bytes | None:
        """The rewritten event C{buf[start:end]} (its blank line included), or C{None}."""
        raw = bytes(buf[start:end])
        prefix = b""
        if self._atStart and raw.startswith(_BOM):
            prefix, raw = _BOM, raw[len(_BOM) :]
        lines = raw.splitlines(keepends=True)
        values: list[bytes] = []
        isData: list[bool] = []
        for line in lines:
            name, _, value = line.rstrip(b"\r\n").partition(b":")
            if name == b"data":
                values.append(value[1:] if value.startswith(b" ") else value)
            isData.append(name == b"data")
        if not values:
            return None
        new = self._payload(b"\n".join(values))
        if new is None:
            return None
        # The new data line stands where the last one stood, with its terminator: what follows
        # it is what followed it before (a CR moved in front of the LF of the blank line would
        # merge with it into one CRLF, and the event would not end).
        last = len(isData) - 1 - isData[::-1].index(True)
        out = [prefix]
        for i, (line, data) in enumerate(zip(lines, isData, strict=True)):
            if not data:
                out.append(line)
            elif i == last:
                out.append(b"data: " + new + line[len(line.rstrip(b"\r\n")) :])
        return b"".join(out)


def _blankEnd(buf: bytes | bytearray, pos: int) -> int:
    """
    Where the first blank line at or after C{pos} ends, -1 if none yet.

    Two line terminators in a row always show as LF LF, LF CR or CR CR (a CR followed by LF is
    one terminator, CRLF), and each of these is a blank line; the blank line's own terminator may
    be CRLF. A CR ending the buffer ends the blank line: an LF arriving next belongs to it and
    is relayed as the first byte of the next event (the same bytes either way).
    """
    best = buf.find(b"\n\n", pos)
    limit = len(buf) if best < 0 else best + 1
    for pair in (b"\n\r", b"\r\r"):
        i = buf.find(pair, pos, limit)
        if i >= 0:
            best, limit = i, i + 1
    if best < 0:
        return -1
    end = best + 2
    if buf[best + 1] == 0x0D and buf[end : end + 1] == b"\n":
        end += 1
    return end


def _named(item: dict[str, Any], names: Mapping[str, str]) -> bool:
    """Whether a listed item's C{name} is one of C{names}."""
    name = item.get("name")
    return isinstance(name, str) and name in names


def _privateScope(result: dict[str, Any]) -> dict[str, Any] | None:
    """C{cacheScope} made private (added when the result has C{ttlMs} but no scope)."""
    if "cacheScope" in result:
        if result["cacheScope"] == "private":
            return None
    elif "ttlMs" not in result:
        return None
    return {**result, "cacheScope": "private"}


def _parseInt(text: str) -> int | float:
    """Integers as orjson reads them: beyond 64 bits, a float (so ids compare alike)."""
    number = int(text)
    return number if -(2**63) <= number < 2**64 else float(text)


def _decodeLenient(payload: bytes) -> tuple[Any, bool]:
    """
    Parse as a lenient client would (invalid UTF-8 replaced, lone surrogates and huge numbers
    accepted, a leading BOM ignored).

    @return: the value and whether an object had a duplicate key.
    @raise ValueError: not JSON.
    @raise RecursionError: nested too deep for this parser.
    """
    duplicates = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicates
        out = dict(items)
        if len(out) != len(items):
            duplicates = True
        return out

    text = payload.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    value = json.loads(text, object_pairs_hook=pairs, parse_int=_parseInt)
    return value, duplicates
