# -*- test-case-name: tests.test_edge_request -*-
"""
The inbound stage: what the gateway learns from a complete request before it asks who the caller
is. One parse of a POST body, then every refusal that needs no caller, in this order: more than
one of a singleton header (400), no upstream at the path (404), Host/Origin (403), an HTTP method
MCP does not use (405), a body that is not JSON-RPC or is ambiguous (400), MCP 2026-07-28 headers
that disagree with the body (400). The body is parsed first so that every one of these answers
carries the request's id and its audit line the method and tool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mcpgw.errors import DuplicateHeader, GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from mcpgw.jsonrpc import RpcSummary, parseBody
from mcpgw.proxy.headers import SINGLETONS
from mcpgw.proxy.mcpheaders import checkRequest, isModern, lowered

if TYPE_CHECKING:
    from mcpgw.generation import Generation, Route
    from mcpgw.proxy.exchange import ProxyExchange

#: The HTTP methods of MCP's Streamable HTTP transport.
FORWARDED_METHODS = (b"POST", b"GET", b"DELETE")


def inspect(
    x: ProxyExchange, request: Any, route: Route | None, gen: Generation
) -> tuple[RpcSummary | None, bytes]:
    """
    Parse and check one complete request, recording what it says on C{x}.

    @return: the parsed body (C{None} for GET and DELETE) and its bytes.
    @raise GatewayError: the request is refused (see the module docstring for the order).
    """
    path = request.path
    method = request.method
    body = b"".join(request.body) if request.body else b""
    x.bytesIn = len(body)
    summary = None
    bodyError: GatewayError | None = None
    if method == b"POST":
        # Parsed first, so that every later refusal (404, 403, 400) carries the id and
        # its audit line the method and tool; a body error is answered after those.
        try:
            summary = parseBody(body)
        except GatewayError as e:
            bodyError = e
        else:
            x.describe(summary)
    headers = request.requestHeaders
    identity = gen.auth.identityHeader
    for name, values in headers.getAllRawHeaders():
        if len(values) > 1:
            low = name.lower()
            if low in SINGLETONS or low == identity:
                raise DuplicateHeader(f"more than one {name.decode('latin-1')} header")
    if route is None:
        raise NotFound(f"no upstream at {path.decode('latin-1')!r}")
    hosts = headers.getRawHeaders(b"host")
    origins = headers.getRawHeaders(b"origin")
    gen.hostGuard.check(hosts[0] if hosts else None, origins[0] if origins else None)
    if method not in FORWARDED_METHODS:
        raise MethodNotAllowed(f"{method.decode('latin-1')} is not an MCP method")
    if bodyError is not None:
        raise bodyError
    if summary is not None and isModern(x.protocolVersion):
        if summary.isBatch:
            raise InvalidRequest("MCP 2026-07-28 and later have no batches")
        checkRequest(lowered(headers), summary.messages[0], route.toolHeaders)
    return summary, body
