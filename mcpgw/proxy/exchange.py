# -*- test-case-name: tests.test_proxy -*-
"""
One client request on an MCP path, from arrival to its record: L{ProxyExchange} holds what the
request path learns about the request (the facts the record is frozen from when it ends) and
relays the upstream's answer to the client (L{IResponseSink}): JSON held until complete, SSE
event by event with backpressure, each through the response transforms.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mcpgw.errors import (
    GatewayError,
    InsufficientScope,
    Unauthenticated,
    UpstreamBadResponse,
    errorResponse,
    reasonPhrase,
)
from mcpgw.generation import Generation, Route
from mcpgw.interfaces import IResponseSink
from mcpgw.jsonrpc import RpcSummary
from mcpgw.pinning import UpstreamPins
from mcpgw.policy import ANONYMOUS, Caller
from mcpgw.proxy.headers import (
    RESPONSE_DROP,
    connectionTokens,
)
from mcpgw.proxy.mcpheaders import isModern
from mcpgw.proxy.transforms import CACHEABLE, LISTS, Redact, ResponseTransform
from mcpgw.telemetry import (
    TARGET_METHODS,
    TraceParent,
    headerContext,
    metaContext,
    randomBits,
    targetOf,
    useMetaContext,
)

log = Logger()

_EVENT_STREAM = b"text/event-stream"


def _isEventStream(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an answer's C{Content-Type} is C{text/event-stream}."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value[: len(_EVENT_STREAM)].lower() == _EVENT_STREAM
    return False


def _encoded(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an answer has a content coding (gzip, br, ...) other than identity."""
    for name, value in headers:
        if name.lower() == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return True
    return False


#: A listing kind -> the method and item member policy decides it by.
_LISTED = {
    "resources": ("resources/read", "uri"),
    "resourceTemplates": ("resources/read", "uriTemplate"),
    "prompts": ("prompts/get", "name"),
}
#: A JSON (not SSE) answer is held back until it is complete or this large, so that an upstream
#: that breaks framing early (a short body, bad chunking) still gets the client a 502.
HOLD_BYTES = 256 * 1024
#: A JSON answer that must be inspected (listing filter, result redaction) is read whole; one
#: larger than this is refused (502) instead of being held in memory.
INSPECT_MAX_BYTES = 16 * 1024 * 1024

_ID_PREFIX = secrets.token_hex(4)
_idCounter = itertools.count(secrets.randbelow(1 << 32))


def _newRequestId() -> str:
    """24 hex characters: a random per-process prefix and a counter (no syscall per request)."""
    return f"{_ID_PREFIX}{next(_idCounter) & 0xFFFFFFFFFFFFFFFF:016x}"


@implementer(IResponseSink)
class ProxyExchange:
    """
    One client request on an MCP path, from arrival to its audit line.
    """

    # Attributes that start with a constant value have it here, as class defaults: an exchange
    # is made per request, and assigning some forty constants in __init__ cost 4 % of the
    # interpreted work of a call (no __slots__ therefore: the instance dict holds what is set).
    route: Route | None = None
    upstream: Any = None
    link: TraceParent | None = None
    metaTrace = False
    #: The tracer's sampling decision (set when the request is forwarded with tracing on).
    sampled = True
    authResult: str | None = None
    authKeyId: str | None = None
    clientCert: str | None = None
    method: str | None = None
    tool: str | None = None
    target: str | None = None
    jsonrpcId: Any = None
    batchSize: int | None = None
    batchIds: list[Any] | None = None
    decision = "allow"
    ruleId: str | None = None
    redacted: int | None = None
    redactedResults: int | None = None
    #: JSON-RPC id -> the rule whose redact_results scrub that call's result.
    resultRules: dict[Any, str] | None = None
    #: Who policy saw: key id, certificate or external identity; None when anonymous.
    principal: str | None = None
    #: The response transforms of this exchange (None: the answer is relayed as it is).
    transform: ResponseTransform | None = None
    _transforming = False
    _listers: dict[str, Callable[[str], bool] | None] | None = None
    listing = False
    filteredTools: int | None = None
    #: Tool pinning for this request's upstream (C{None}: off).
    pins: UpstreamPins | None = None
    #: Tool pinning's verdict for the audit line: C{new}, C{changed} or C{None}.
    toolPin: str | None = None
    headerRewrite: dict[tuple[bytes, bytes], bytes] | None = None
    #: The bearer token presented in C{Authorization} (never forwarded, in any header).
    credential: bytes | None = None
    _collected: list[bytes] | None = None
    _held: list[bytes] | None = None
    _heldBytes = 0
    bytesIn = 0
    bytesOut = 0
    status: int | None = None
    error: str | None = None
    headSent = False
    isStream = False
    closed = False
    _producing = False

    def __init__(self, gateway: Any, request: Any, generation: Generation) -> None:
        self.gateway = gateway
        self.request = request
        self.generation = generation
        self.started = gateway.reactor.seconds()
        self.requestId = _newRequestId()
        self.httpMethod: bytes = request.method
        self.path: bytes = request.path
        headers = request.requestHeaders
        sid = headers.getRawHeaders(b"mcp-session-id")
        self.sessionId = sid[0].decode("latin-1") if sid else None
        pv = headers.getRawHeaders(b"mcp-protocol-version")
        self.protocolVersion = pv[0].decode("latin-1") if pv else None
        # Trace context: the header's for now; a body's params._meta one replaces it (handle).
        tp = headers.getRawHeaders(b"traceparent")
        parent: TraceParent | None = (
            headerContext(tp, headers.getRawHeaders(b"tracestate")) if tp else None
        )
        self.parent = parent
        self.traceId: int = parent.traceId if parent is not None else randomBits(128) or 1
        self.spanId: int = randomBits(64) or 1
        self.clientIp: str | None = getattr(request.client, "host", None)
        self.secure: bool = request.isSecure()
        #: Who policy decides for (set once authenticated).
        self.caller: Caller = ANONYMOUS

    # -- response side: IResponseSink ------------------------------------------------------

    def upstreamResponse(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], transport: Any
    ) -> None:
        if self.closed:
            return
        pins = self.pins
        if self.transform is None and pins is not None and _isEventStream(headers):
            # Pinning: a tools/list result may come on any SSE stream (a resumed GET, another
            # request's answer); every response with a tool list goes through the pin step.
            self.transform = ResponseTransform(
                {}, pin=pins.listed, holdBack=pins.enforce, pinAny=True
            )
        if self.transform is not None and 200 <= status < 300 and _encoded(headers):
            # Asked for identity (outbound), encoded anyway: an answer mcpgw must inspect and
            # cannot is not relayed (fail closed).
            if self.upstream is not None:
                self.upstream.cancel()
            self.respondError(
                UpstreamBadResponse(
                    "the upstream encoded (Content-Encoding) an answer mcpgw must inspect"
                )
            )
            return
        request = self.request
        request.setResponseCode(status, reason or None)
        add = request.responseHeaders.addRawHeader
        drop = RESPONSE_DROP
        for name, _ in headers:
            if name.lower() == b"connection":
                drop = drop | connectionTokens(headers)
                break
        hasAccel = False
        transform = self.transform
        # Every 2xx answer with a body: clients read any of them as the answer (not only 200).
        filtering = transform is not None and 200 <= status < 300 and status not in (204, 205)
        for name, value in headers:
            low = name.lower()
            if low in drop:
                if low == b"content-length" and not filtering:
                    add(b"Content-Length", value)  # the body is relayed unchanged
                continue
            if low == b"content-type" and value[: len(_EVENT_STREAM)].lower() == _EVENT_STREAM:
                # Media types are case-insensitive (RFC 9110 8.3.1), as clients read them.
                self.isStream = True
            elif low == b"x-accel-buffering":
                hasAccel = True
            elif low == b"mcp-session-id" and self.sessionId is None:
                self.sessionId = value.decode("latin-1")
            add(name, value)
        self.status = status
        self.headSent = True
        if filtering:
            self._transforming = True
            if not self.isStream:
                self._collected = []  # one parse of the whole answer
        elif not self.isStream:
            self._held = []
        request.registerProducer(transport, True)
        self._producing = True
        if self.isStream:
            # Events may be far apart: the head goes out now, not with the first event.
            if not hasAccel:
                add(b"X-Accel-Buffering", b"no")
            request.write(b"")
            request.channel.flushHead()

    def describe(self, summary: RpcSummary) -> None:
        """Record what a parsed POST body says (method, tool, ids, trace context)."""
        self.method = summary.method
        self.tool = summary.tool
        self.jsonrpcId = summary.requestId
        if summary.method in TARGET_METHODS:
            self.target = targetOf(summary.messages, summary.method)
        if summary.isBatch:
            self.batchSize = len(summary.messages)
            self.batchIds = [m["id"] for m in summary.messages if "method" in m and "id" in m]
        meta = metaContext(summary.messages)
        if meta is not None:
            useMetaContext(self, *meta)

    def prepareTransforms(self, messages: list[dict[str, Any]]) -> None:
        """
        Decide which response transforms the answer goes through (L{mcpgw.proxy.transforms}):
        listing answers filtered for this caller (and checked for x-mcp-header annotations, and
        by tool pinning: not approved tools noted, or held back in C{enforce} mode),
        C{cacheScope} made private in listing and C{resources/read} answers when policy depends
        on the caller (L{CACHEABLE}), and the results of calls under C{redact_results} scrubbed.
        Nothing applies: no transform at all.
        """
        methods: dict[Any, str] = {}
        listing = cacheable = False
        for msg in messages:
            method = msg.get("method")
            if isinstance(method, str) and "id" in msg:
                methods[msg["id"]] = method
                listing = listing or method in LISTS
                cacheable = cacheable or method in CACHEABLE
        rules = self.resultRules
        policy = self.generation.policy
        privateCache = policy.filterToolsList and policy.dependsOnCaller
        if not listing and not rules and not (cacheable and privateCache):
            return
        redactors: dict[Any, Redact] | None = None
        if rules:
            redactors = {rid: partial(policy.redactResult, rule) for rid, rule in rules.items()}
        pins = self.pins
        transform = ResponseTransform(
            methods,
            keep=self._keep if listing else None,
            privateCache=privateCache,
            redactors=redactors,
            pin=pins.listed if pins is not None else None,
            holdBack=pins is not None and pins.enforce,
            pinAny=pins is not None,
        )
        if transform.active:
            self.transform = transform
            self.listing = listing

    def _keep(self, kind: str, item: dict[str, Any]) -> bool:
        """Whether one listed item stays in a listing answer for this caller."""
        if kind == "tools":
            return self._keepTool(item)
        method, member = _LISTED[kind]
        shown = self._lister(method)
        if shown is None:
            return True
        target = item.get(member)
        return not isinstance(target, str) or shown(target)

    def _lister(self, method: str) -> Callable[[str], bool] | None:
        """
        Policy's memoised listing test for C{method} and this caller (one per answer), or
        C{None} when nothing of that method can be hidden.
        """
        listers = self._listers
        if listers is None:
            listers = self._listers = {}
        if method not in listers:
            policy = self.generation.policy
            filtering = policy.filterToolsList and policy.canDeny(method)
            listers[method] = policy.lister(method, self.caller) if filtering else None
        return listers[method]

    def _keepTool(self, tool: Any) -> bool:
        """
        Whether one entry of a C{tools/list} answer stays: policy would not deny it to the
        caller, and its C{x-mcp-header} annotations are valid (recorded for the upstream;
        an invalid one is left out for 2026-07-28 clients, logged).
        """
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str):
            return True
        shown = self._lister("tools/call")
        if shown is not None and not shown(name):
            return False
        assert self.route is not None
        why = self.route.toolHeaders.observe(tool)
        if why is None:
            return True
        log.warn(
            "upstream {upstream} lists tool {tool!r} with an invalid x-mcp-header annotation: "
            "{why}",
            upstream=self.route.name,
            tool=name,
            why=why,
        )
        return not isModern(self.protocolVersion)

    def upstreamData(self, data: bytes) -> None:
        if self.closed:
            return
        if self._collected is not None:
            self._collected.append(data)
            self._heldBytes += len(data)
            if self._heldBytes > INSPECT_MAX_BYTES:
                # Too large to inspect whole: fail closed rather than hold it all in memory.
                if self.upstream is not None:
                    self.upstream.cancel()
                self.upstreamFailed(
                    UpstreamBadResponse(
                        f"the upstream's answer exceeds {INSPECT_MAX_BYTES} bytes, more than "
                        "mcpgw inspects"
                    ),
                    True,
                )
            return
        held = self._held
        if held is not None:
            held.append(data)
            self._heldBytes += len(data)
            if self._heldBytes <= HOLD_BYTES:
                return
            if self.gateway.audit.durable:
                # The answer's last bytes wait for its audit line (fsync: always): keep the
                # last piece back, relay the rest.
                last = held.pop()
                data = b"".join(held)
                self._held = [last]
                self._heldBytes = len(last)
            else:
                data = b"".join(held)
                self._held = None
        if self._transforming:
            assert self.transform is not None
            data = self.transform.feed(data)
            if not data:
                return
        self.bytesOut += len(data)
        self.request.write(data)

    def upstreamDone(self) -> None:
        if self.closed:
            return
        request = self.request
        if self._producing:
            self._producing = False
            request.unregisterProducer()
        tail = b""
        transform = self.transform
        if self._collected is not None:
            assert transform is not None
            tail = transform.jsonBody(b"".join(self._collected))
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(tail)])
        elif self._held is not None:
            tail = b"".join(self._held)
            self._held = None
        elif self._transforming:
            assert transform is not None
            tail = transform.flush()
        if tail:
            self.bytesOut += len(tail)
        self._end(tail)

    def upstreamFailed(self, error: Any, midResponse: bool) -> None:
        if self.closed:
            return
        request = self.request
        if self._producing:
            self._producing = False
            request.unregisterProducer()
        if not request.startedWriting:
            # Nothing has gone to the client yet (the head waits for the first body piece, and a
            # filtered answer is collected whole): answer the error instead.
            if self.headSent:
                self._unsend()
            self.respondError(error)
            return
        # The upstream died mid-body: no final chunk, so the client sees a truncated response.
        self.error = (
            "upstream_bad_response" if isinstance(error, UpstreamBadResponse) else "upstream_reset"
        )
        request.loseConnection()
        self._end()

    def _unsend(self) -> None:
        """Forget an upstream response head that was set but never written."""
        self.headSent = False
        self.isStream = False
        self._collected = self._held = None
        self._transforming = False
        self.request.responseHeaders = Headers()

    # -- client side ---------------------------------------------------------------------

    def clientGone(self) -> None:
        """The client connection was lost before the response ended."""
        if self.closed:
            return
        upstream = self.upstream
        if upstream is not None:
            upstream.cancel()
        if self.error is None:
            self.error = "client_closed"
        if not self.headSent:
            self.status = 499
        self._producing = False
        self._end()

    def fail(self, error: GatewayError) -> None:
        """Answer with C{error}, recording what it says about the request first."""
        if self.jsonrpcId is None and error.requestId is not None:
            self.jsonrpcId = error.requestId
        if isinstance(error, Unauthenticated):
            self.authResult = error.data.get("auth_result")
        elif isinstance(error, InsufficientScope):
            self.authResult, self.principal = "oauth", error.principal
        self.respondError(error)

    def respondError(self, error: GatewayError) -> None:
        """Answer the client with C{error}'s JSON-RPC error response and end the exchange."""
        status, headers, body = errorResponse(error, self.jsonrpcId, self.batchIds)
        self.status = status
        self.error = error.auditName or error.message
        request = self.request
        request.setResponseCode(status, reasonPhrase(status))
        out = request.responseHeaders
        for name, value in headers:
            out.setRawHeaders(name, [value])
        self.bytesOut = len(body)
        self._end(body)

    def _end(self, tail: bytes | None = None) -> None:
        """
        The exchange is over: write its audit line. With C{tail} (the answer is complete), the
        rest of the answer, C{tail} and the end, goes out once the gateway releases it
        (L{Gateway.exchangeEnded}): with C{fsync: always}, after the line is synced.
        """
        transform = self.transform
        if transform is not None and self._transforming:
            if self.listing or transform.removed:
                self.filteredTools = transform.removed
            if transform.pinned is not None and self.toolPin is None:
                self.toolPin = transform.pinned
            if self.resultRules:
                self.redactedResults = transform.redactedResults
        self.closed = True
        request = self.request
        request.exchange = None
        if tail is None:
            self.gateway.exchangeEnded(self)
            return

        def release() -> None:
            if request.finished or request._disconnected:
                return
            if tail:
                request.write(tail)
            request.finish()

        self.gateway.exchangeEnded(self, release)
