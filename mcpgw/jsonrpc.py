# -*- test-case-name: tests.test_jsonrpc -*-
"""
The one parse of a POST body as JSON-RPC 2.0: a single message or a batch array.

The gateway parses each body exactly once (with orjson) and keeps the parsed messages for policy,
audit and telemetry. The bytes forwarded upstream are the client's own bytes unless a later stage
(policy redaction) has to rewrite them.

Because the client's bytes are forwarded, the gateway must read them exactly as the upstream will:
  - a JSON object with a duplicate key is refused (400, C{invalid_request}): parsers disagree on
    which copy counts (orjson keeps the last, others the first), so policy could decide on
    C{"name":"echo"} while the upstream runs C{"name":"shell_exec"}. The check is cheap: when
    re-serialising the parsed value gives back the body's own bytes (compact JSON, as the MCP SDKs
    send) there can be no duplicate; only other bodies are parsed a second time with a duplicate
    detector (Python's C{json} with an C{object_pairs_hook}, about 4 µs for a typical call);
  - nesting deeper than L{MAX_DEPTH} arrays and objects is refused (400, C{invalid_request}), so
    no later stage (redaction, re-serialisation) can hit a recursion limit. Bodies with fewer
    brackets than that in all are not walked.
"""

from __future__ import annotations

import json
from typing import Any

import attr
import orjson

from mcpgw.errors import InvalidRequest, ParseError


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RpcSummary:
    """
    What the gateway learnt from one POST body.

    @ivar messages: the parsed JSON-RPC messages (one unless C{isBatch}).
    @ivar isBatch: the body was a JSON array.
    @ivar method: the first request's C{method}, or C{None} when the body holds only responses.
    @ivar tool: C{params.name} of the first C{tools/call}, if any.
    @ivar requestId: the first request's C{id} (C{None} for notifications and batches).
    """

    messages: list[dict[str, Any]]
    isBatch: bool
    method: str | None
    tool: str | None
    requestId: Any


def _checkMessage(msg: object) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise InvalidRequest("a JSON-RPC message must be a JSON object")
    if msg.get("jsonrpc") != "2.0":
        raise InvalidRequest('"jsonrpc" must be "2.0"', requestId=_safeId(msg.get("id")))
    if "method" in msg:
        if not isinstance(msg["method"], str):
            raise InvalidRequest('"method" must be a string', requestId=_safeId(msg.get("id")))
        params = msg.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise InvalidRequest(
                '"params" must be an object or an array', requestId=_safeId(msg.get("id"))
            )
    elif "result" not in msg and "error" not in msg:
        raise InvalidRequest('a JSON-RPC message needs "method", "result" or "error"')
    return msg


def _safeId(value: object) -> Any:
    return value if isinstance(value, str | int | float) or value is None else None


def _toolOf(msg: dict[str, Any]) -> str | None:
    if msg.get("method") != "tools/call":
        return None
    params = msg.get("params")
    if isinstance(params, dict):
        name = params.get("name")
        if isinstance(name, str):
            return name
    return None


#: The deepest nesting of arrays and objects a body may have (the message object is level 1).
MAX_DEPTH = 64


class _DuplicateKey(ValueError):
    pass


def _noDuplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


_strictDecoder = json.JSONDecoder(object_pairs_hook=_noDuplicates)


def _depth(value: Any) -> int:
    """The nesting depth of arrays and objects in a parsed JSON value (iterative)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if level > deepest:
            deepest = level
            if deepest > MAX_DEPTH:
                return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _idOf(value: Any) -> Any:
    return _safeId(value.get("id")) if isinstance(value, dict) else None


def checkShape(body: bytes, value: Any) -> None:
    """
    Refuse a parsed body whose nesting is deeper than L{MAX_DEPTH} or that has a JSON object
    with a duplicate key (see the module docstring).

    @raise InvalidRequest: either.
    """
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise InvalidRequest(
            f"the body is nested deeper than {MAX_DEPTH} levels", requestId=_idOf(value)
        )
    key = duplicateKey(body, value)
    if key is not None:
        # The id itself may be the duplicate: then no id is trustworthy.
        rid = None if key == "id" else _idOf(value)
        raise InvalidRequest(f"duplicate key {key!r} in a JSON object", requestId=rid)


def duplicateKey(body: bytes, value: Any) -> str | None:
    """
    The first key an object of C{body} repeats, else C{None}. C{value} is C{body} as orjson
    parsed it (keeping the last copy of a repeated key). Compact JSON is proven duplicate-free
    by re-serialising C{value}; any other body is parsed a second time with a detector.

    @raise RecursionError: C{body} is too deep for the second parse.
    """
    try:
        if orjson.dumps(value) == body:
            return None
    except orjson.JSONEncodeError:
        pass
    try:
        _strictDecoder.decode(body.decode("utf-8"))
    except _DuplicateKey as e:
        return str(e.args[0])
    return None


def parseBody(body: bytes) -> RpcSummary:
    """
    Parse and validate a JSON-RPC POST body.

    @raise ParseError: the body is not JSON.
    @raise InvalidRequest: the body is JSON but not a JSON-RPC message or a non-empty batch, or
        it is ambiguous or too deep (L{checkShape}).
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ParseError(f"invalid JSON: {e}") from None
    checkShape(body, value)
    if isinstance(value, list):
        if not value:
            raise InvalidRequest("an empty batch is not a JSON-RPC message")
        messages = [_checkMessage(m) for m in value]
        first = next((m for m in messages if "method" in m), None)
        return RpcSummary(
            messages=messages,
            isBatch=True,
            method=first["method"] if first is not None else None,
            tool=next((t for t in map(_toolOf, messages) if t is not None), None),
            requestId=None,
        )
    msg = _checkMessage(value)
    return RpcSummary(
        messages=[msg],
        isBatch=False,
        method=msg.get("method"),
        tool=_toolOf(msg),
        requestId=_safeId(msg.get("id")),
    )
