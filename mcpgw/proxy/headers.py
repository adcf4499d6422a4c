# -*- test-case-name: tests.test_proxy -*-
"""
Which headers cross the gateway.

End-to-end headers pass both ways (C{Mcp-Session-Id}, C{MCP-Protocol-Version}, C{Last-Event-ID},
C{Accept}, C{Authorization}, ...). Hop-by-hop headers (RFC 9110 section 7.6.1) and every header a
C{Connection} header nominates are dropped; framing headers are recomputed by each hop.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Request headers the gateway sets itself on the upstream request, the client's credential
#: (never forwarded: upstream credentials come from C{upstreams[].headers}), and the client's own
#: claims about where the request came from (C{Forwarded}, C{X-Real-IP}: an upstream must not
#: take a client's word for its address; C{X-Forwarded-For} is extended with the real peer).
REQUEST_DROP: frozenset[bytes] = HOP_BY_HOP | {
    b"authorization",
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"x-real-ip",
}

#: Request headers that must appear at most once: more than one is refused (400), not guessed.
SINGLETONS: frozenset[bytes] = frozenset(
    {
        b"authorization",
        b"host",
        b"origin",
        b"content-length",
        b"mcp-session-id",
        b"mcp-protocol-version",
        b"mcp-method",
        b"mcp-name",
    }
)

#: Response headers recomputed by the gateway's own framing.
RESPONSE_DROP: frozenset[bytes] = HOP_BY_HOP | {b"content-length"}


def connectionTokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """@return: the lower-case header names nominated by the C{Connection} headers in C{headers}."""
    out: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(out)


def _nominated(headers: Iterable[tuple[bytes, list[bytes]]]) -> frozenset[bytes]:
    out: set[bytes] = set()
    for name, values in headers:
        if name.lower() == b"connection":
            for value in values:
                out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(out)


def endToEnd(
    headers: list[tuple[bytes, list[bytes]]], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """
    @param headers: C{(name, [values])} pairs as given by C{Headers.getAllRawHeaders}.
    @param drop: lower-case names never to pass (e.g. L{REQUEST_DROP}).
    @return: the C{(name, value)} pairs that pass, in order, with the names the
        C{Connection} header nominates removed too.
    """
    out: list[tuple[bytes, bytes]] = []
    connection = False
    for name, values in headers:
        low = name.lower()
        if low == b"connection":
            connection = True
        if low in drop:
            continue
        for value in values:
            out.append((name, value))
    if connection:  # rare: drop what the Connection header nominates, too
        nominated = _nominated(headers)
        out = [(name, value) for name, value in out if name.lower() not in nominated]
    return out
