# -*- test-case-name: tests.test_edge_request -*-
"""
The request the upstream receives, built in one piece (one C{send}): what crosses the gateway
(L{mcpgw.proxy.headers}), what never does (the gateway's credentials, in any header), and the
C{Mcp-Param-*} values a redact rule scrubbed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mcpgw.generation import Route
from mcpgw.proxy.headers import (
    REQUEST_DROP,
    endToEnd,
)
from mcpgw.proxy.mcpheaders import PARAM_PREFIX, sentinel, sentinelText
from mcpgw.telemetry import (
    TRACE_HEADERS,
    traceparentOf,
)

if TYPE_CHECKING:
    from mcpgw.proxy.exchange import ProxyExchange

#: Headers whose values are protocol data, never credentials: not scanned for keys. Anything
#: else a client sends is (an mcpgw key in any other header is removed before forwarding).
_NO_CREDENTIALS = frozenset(
    {
        b"accept",
        b"accept-encoding",
        b"content-type",
        b"mcp-protocol-version",
        b"mcp-method",
        b"traceparent",
        b"tracestate",
    }
)


def paramHeaderRewrites(
    headers: Any, policy: Any, ruleIds: Sequence[str]
) -> dict[tuple[bytes, bytes], bytes] | None:
    """
    MCP 2026-07-28 clients mirror some arguments into C{Mcp-Param-*} headers, which the server
    checks against the body: redact every value of every such header with the rules that
    redacted the body (each call's rule, for a batch), in the same encoding (plain or
    C{=?base64?...?=}), so the secret does not travel in a header and the two still agree. A
    value that cannot be decoded is scrubbed as it is.

    @return: C{(lower-case name, original value)} -> new value, for the values that changed; or
        None.
    """
    out: dict[tuple[bytes, bytes], bytes] = {}
    for name, values in headers.getAllRawHeaders():
        low = name.lower()
        if not low.startswith(PARAM_PREFIX):
            continue
        for value in values:
            text, encoded = sentinelText(value)
            changed = 0
            for ruleId in ruleIds:
                new, n = policy.redact(ruleId, text)
                text, changed = new, changed + n
            if changed:
                out[(low, value)] = sentinel(text) if encoded else text.encode("latin-1", "replace")
    return out or None


def upstreamRequest(
    x: ProxyExchange, route: Route, request: Any, body: bytes, tracing: bool
) -> bytes:
    """
    The HTTP/1.1 request the upstream gets, head and body in one piece: the client's end-to-end
    headers (hop-by-hop, credentials, client address claims and the gateway's own removed;
    redacted C{Mcp-Param-*} values replaced), the route's injected headers, trace context,
    C{X-Forwarded-*}, and the body policy decided on.

    @param tracing: the gateway traces requests: its span context replaces the client's (unless
        the operator injects a traceparent of their own for this upstream).
    """
    target = route.target
    if request.query:
        target += (b"&" if b"?" in target else b"?") + request.query
    parts = [request.method, b" ", target, b" HTTP/1.1\r\nHost: ", route.hostHeader, b"\r\n"]
    rh = request.requestHeaders
    injectedNames = route.injectedNames
    forwardedFor = None
    originalHost = None
    rewrite = x.headerRewrite
    carriesKey = x.generation.auth.carriesKey
    credential = x.credential
    tracing = tracing and b"traceparent" not in injectedNames
    drop = REQUEST_DROP
    extra = x.generation.auth.headersToDrop(x.clientIp)
    if extra:
        drop = drop | extra  # an identity header from a peer that is not a trusted proxy
    # Asked uncompressed: an answer mcpgw rewrites, or (tool pinning) any SSE stream it reads.
    inspected = x.transform is not None or x.pins is not None
    for name, value in endToEnd(list(rh.getAllRawHeaders()), drop):
        low = name.lower()
        if inspected and low == b"accept-encoding":
            continue  # an answer mcpgw rewrites must come uncompressed (identity, below)
        if low in injectedNames or (tracing and low in TRACE_HEADERS):
            continue
        if low not in _NO_CREDENTIALS and carriesKey(value, credential):
            continue  # the gateway's credentials never leave it
        if low == b"x-forwarded-for":
            forwardedFor = value if forwardedFor is None else forwardedFor + b", " + value
            continue
        if rewrite is not None:
            value = rewrite.get((low, value), value)
        parts += (name, b": ", value, b"\r\n")
    for name, value in route.injected:
        parts += (name, b": ", value, b"\r\n")
    if inspected:
        parts.append(b"Accept-Encoding: identity\r\n")
    if tracing:
        parts += (b"traceparent: ", traceparentOf(x), b"\r\n")
        state = x.parent.traceState if x.parent is not None else None
        if state is not None:
            parts += (b"tracestate: ", state.encode("ascii"), b"\r\n")
    hosts = rh.getRawHeaders(b"host")
    if hosts:
        originalHost = hosts[0]
        parts += (b"X-Forwarded-Host: ", originalHost, b"\r\n")
    client = (x.clientIp or "unknown").encode("latin-1")
    parts += (
        b"X-Forwarded-For: ",
        client if forwardedFor is None else forwardedFor + b", " + client,
        b"\r\nX-Forwarded-Proto: ",
        b"https" if x.secure else b"http",
        b"\r\nContent-Length: %d\r\n\r\n" % len(body),
        body,
    )
    return b"".join(parts)
