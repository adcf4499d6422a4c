# -*- test-case-name: tests.test_jsonrpc -*-
"""
The one parse of a POST body as JSON-RPC 2.0: a single message or a batch array.

The gateway parses each body exactly once (with orjson) and keeps the parsed messages for policy,
audit and telemetry. The bytes forwarded upstream are the client's own bytes unless a later stage
(policy redaction) has to rewrite them.
"""

from __future__ import annotations

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


def parseBody(body: bytes) -> RpcSummary:
    """
    Parse and validate a JSON-RPC POST body.

    @raise ParseError: the body is not JSON.
    @raise InvalidRequest: the body is JSON but not a JSON-RPC message or a non-empty batch.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ParseError(f"invalid JSON: {e}") from None
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
