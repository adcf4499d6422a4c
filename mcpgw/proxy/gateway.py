# -*- test-case-name: tests.test_proxy -*-
"""
The request path: route by path, DNS-rebinding check, one JSON-RPC parse, forward over the
upstream's keep-alive pool, relay the response (SSE event by event with backpressure), and write
one audit line per request.

Every request gets a L{ProxyExchange}, the small per-request record that the audit line and the
span (L{mcpgw.telemetry}) are built from, so the two can never disagree.
"""

from __future__ import annotations

import base64
import itertools
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mcpgw.auth import AuthResult, bearerToken
from mcpgw.errors import (
    DuplicateHeader,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PolicyDenied,
    RateLimited,
    RequestTimeout,
    ShuttingDown,
    Unauthenticated,
    UpstreamBadResponse,
    errorResponse,
    reasonPhrase,
)
from mcpgw.generation import Generation, Route
from mcpgw.interfaces import IAuditLog, IResponseSink
from mcpgw.jsonrpc import RpcSummary, parseBody
from mcpgw.proxy.headers import (
    REQUEST_DROP,
    RESPONSE_DROP,
    SINGLETONS,
    connectionTokens,
    endToEnd,
)
from mcpgw.proxy.mcpheaders import checkRequest, isModern, lowered
from mcpgw.proxy.toolsfilter import SSEFilter, filterJSONBody
from mcpgw.record import auditLine, recordOf
from mcpgw.telemetry import (
    TARGET_METHODS,
    TRACE_HEADERS,
    TraceParent,
    Tracer,
    headerContext,
    injectMeta,
    metaContext,
    randomBits,
    targetOf,
    traceparentOf,
    useMetaContext,
)

log = Logger()

_EVENT_STREAM = b"text/event-stream"
_FORWARDED_METHODS = (b"POST", b"GET", b"DELETE")

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


#: A JSON (not SSE) answer is held back until it is complete or this large, so that an upstream
#: that breaks framing early (a short body, bad chunking) still gets the client a 502.
HOLD_BYTES = 256 * 1024

_ID_PREFIX = secrets.token_hex(4)
_idCounter = itertools.count(secrets.randbelow(1 << 32))


_PARAM_HEADER = b"mcp-param-"
_B64_START, _B64_END = b"=?base64?", b"?="


def _redactParamHeaders(
    headers: Any, policy: Any, ruleIds: list[str]
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
        if not low.startswith(_PARAM_HEADER):
            continue
        for value in values:
            encoded = value.startswith(_B64_START) and value.endswith(_B64_END)
            text = None
            if encoded:
                try:
                    text = base64.b64decode(value[len(_B64_START) : -len(_B64_END)]).decode()
                except (ValueError, UnicodeDecodeError):
                    encoded = False
            if text is None:
                text = value.decode("latin-1")
            changed = 0
            for ruleId in ruleIds:
                new, n = policy.redact(ruleId, text)
                text, changed = new, changed + n
            if changed:
                out[(low, value)] = (
                    _B64_START + base64.b64encode(text.encode()) + _B64_END
                    if encoded
                    else text.encode("latin-1", "replace")
                )
    return out or None


def _certIdentity(request: Any) -> str | None:
    """The verified client certificate identity of a TLS request (cached per connection)."""
    from mcpgw.tls import peerIdentity

    return peerIdentity(request.channel.transport)


def _newRequestId() -> str:
    """24 hex characters: a random per-process prefix and a counter (no syscall per request)."""
    return f"{_ID_PREFIX}{next(_idCounter) & 0xFFFFFFFFFFFFFFFF:016x}"


@implementer(IResponseSink)
class ProxyExchange:
    """
    One client request on an MCP path, from arrival to its audit line.
    """

    __slots__ = (
        "_collected",
        "_held",
        "_heldBytes",
        "_producing",
        "_sseFilter",
        "authKeyId",
        "authResult",
        "batchIds",
        "batchSize",
        "bytesIn",
        "bytesOut",
        "clientCert",
        "clientIp",
        "closed",
        "credential",
        "decision",
        "error",
        "filteredTools",
        "gateway",
        "generation",
        "headSent",
        "headerRewrite",
        "httpMethod",
        "isStream",
        "jsonrpcId",
        "link",
        "listTools",
        "metaTrace",
        "method",
        "parent",
        "path",
        "protocolVersion",
        "redacted",
        "request",
        "requestId",
        "route",
        "ruleId",
        "secure",
        "sessionId",
        "spanId",
        "started",
        "status",
        "target",
        "tool",
        "traceId",
        "upstream",
    )

    def __init__(self, gateway: Gateway, request: Any, generation: Generation) -> None:
        self.gateway = gateway
        self.request = request
        self.generation = generation
        self.started = gateway.reactor.seconds()
        self.requestId = _newRequestId()
        self.route: Route | None = None
        self.upstream: Any = None
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
        self.link: TraceParent | None = None
        self.metaTrace = False
        self.traceId: int = parent.traceId if parent is not None else randomBits(128) or 1
        self.spanId: int = randomBits(64) or 1
        self.clientIp: str | None = getattr(request.client, "host", None)
        self.secure: bool = request.isSecure()
        self.authResult: str | None = None
        self.authKeyId: str | None = None
        self.clientCert: str | None = None
        self.method: str | None = None
        self.tool: str | None = None
        self.target: str | None = None
        self.jsonrpcId: Any = None
        self.batchSize: int | None = None
        self.batchIds: list[Any] | None = None
        self.decision = "allow"
        self.ruleId: str | None = None
        self.redacted: int | None = None
        self.listTools = False
        self.filteredTools: int | None = None
        self.headerRewrite: dict[tuple[bytes, bytes], bytes] | None = None
        #: The bearer token presented in C{Authorization} (never forwarded, in any header).
        self.credential: bytes | None = None
        self._sseFilter: SSEFilter | None = None
        self._collected: list[bytes] | None = None
        self._held: list[bytes] | None = None
        self._heldBytes = 0
        self.bytesIn = 0
        self.bytesOut = 0
        self.status: int | None = None
        self.error: str | None = None
        self.headSent = False
        self.isStream = False
        self.closed = False
        self._producing = False

    # -- response side: IResponseSink ------------------------------------------------------

    def upstreamResponse(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], transport: Any
    ) -> None:
        if self.closed:
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
        filtering = self.listTools and status == 200
        for name, value in headers:
            low = name.lower()
            if low in drop:
                if low == b"content-length" and not filtering:
                    add(b"Content-Length", value)  # the body is relayed unchanged
                continue
            if low == b"content-type" and value.startswith(_EVENT_STREAM):
                self.isStream = True
            elif low == b"x-accel-buffering":
                hasAccel = True
            elif low == b"mcp-session-id" and self.sessionId is None:
                self.sessionId = value.decode("latin-1")
            add(name, value)
        self.status = status
        self.headSent = True
        if filtering:
            if self.isStream:
                self._sseFilter = SSEFilter(self._keepTool)
            else:
                self._collected = []
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

    def _keepTool(self, tool: Any) -> bool:
        """
        Whether one entry of a C{tools/list} answer stays: policy would not deny it to the
        caller, and its C{x-mcp-header} annotations are valid (recorded for the upstream;
        an invalid one is left out for 2026-07-28 clients, logged).
        """
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str):
            return True
        gen = self.generation
        if gen.filterTools and not gen.policy.allows(name):
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
            return
        held = self._held
        if held is not None:
            held.append(data)
            self._heldBytes += len(data)
            if self._heldBytes <= HOLD_BYTES:
                return
            data = b"".join(held)
            self._held = None
        if self._sseFilter is not None:
            data = self._sseFilter.feed(data)
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
        if self._collected is not None:
            tail, removed = filterJSONBody(b"".join(self._collected), self._keepTool)
            self.filteredTools = removed
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(tail)])
        elif self._held is not None:
            tail = b"".join(self._held)
            self._held = None
        elif self._sseFilter is not None:
            tail = self._sseFilter.flush()
            self.filteredTools = self._sseFilter.removed
        if tail:
            self.bytesOut += len(tail)
            request.write(tail)
        request.finish()
        self._end()

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
        self._sseFilter = None
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
        self.respondError(error)

    def respondError(self, error: GatewayError) -> None:
        """Answer the client with C{error}'s JSON-RPC error response and end the exchange."""
        status, headers, body = errorResponse(error, self.jsonrpcId, self.batchIds)
        self.status = status
        self.error = error.message
        request = self.request
        request.setResponseCode(status, reasonPhrase(status))
        out = request.responseHeaders
        for name, value in headers:
            out.setRawHeaders(name, [value])
        self.bytesOut = len(body)
        request.write(body)
        request.finish()
        self._end()

    def _end(self) -> None:
        if self._sseFilter is not None and self.filteredTools is None:
            self.filteredTools = self._sseFilter.removed
        self.closed = True
        self.request.exchange = None
        self.gateway.exchangeEnded(self)


class Gateway:
    """
    The request handler behind the listener; holds the current L{Generation}.

    @ivar generation: the current generation (replaced as a whole on reload).
    @ivar inflight: exchanges that have not ended yet.
    """

    def __init__(
        self,
        reactor: Any,
        generation: Generation,
        audit: IAuditLog,
        readiness: Any = None,
        wallClock: Callable[[], float] = time.time,
    ) -> None:
        self.reactor = reactor
        self.wallClock = wallClock
        self.generation = generation
        self.audit = audit
        self.readiness = readiness
        self.inflight: set[ProxyExchange] = set()
        self.connections: set[Any] = set()
        #: Set by L{mcpgw.telemetry.Telemetry} when spans are exported; C{None}: tracing off.
        self.tracer: Tracer | None = None
        self.draining = False
        self._idleWaiters: list[Deferred[None]] = []
        self._connWaiters: list[Deferred[None]] = []

    @property
    def maxBodyBytes(self) -> int:
        """C{limits.max_body_bytes} of the current generation."""
        return self.generation.maxBodyBytes

    # -- connections (graceful stop) -----------------------------------------------------

    def connectionOpened(self, channel: Any) -> None:
        self.connections.add(channel)
        if self.draining:
            channel.transport.loseConnection()

    def connectionClosed(self, channel: Any) -> None:
        self.connections.discard(channel)
        if not self.connections:
            waiters, self._connWaiters = self._connWaiters, []
            for d in waiters:
                d.callback(None)

    # -- requests ------------------------------------------------------------------------

    def handle(self, request: Any) -> None:
        """Handle one complete request (headers and body received)."""
        path = request.path
        gen = self.generation
        route = gen.routes.get(path)
        if route is None and self.readiness is not None and path in (b"/healthz", b"/readyz"):
            self.readiness.render(request, path, gen)
            return
        x = ProxyExchange(self, request, gen)
        self.inflight.add(x)
        request.exchange = x
        x.route = route
        try:
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
            for name, values in headers.getAllRawHeaders():
                if len(values) > 1 and name.lower() in SINGLETONS:
                    raise DuplicateHeader(f"more than one {name.decode('latin-1')} header")
            if route is None:
                raise NotFound(f"no upstream at {path.decode('latin-1')!r}")
            hosts = headers.getRawHeaders(b"host")
            origins = headers.getRawHeaders(b"origin")
            gen.hostGuard.check(hosts[0] if hosts else None, origins[0] if origins else None)
            if method not in _FORWARDED_METHODS:
                raise MethodNotAllowed(f"{method.decode('latin-1')} is not an MCP method")
            if bodyError is not None:
                raise bodyError
            if summary is not None and isModern(x.protocolVersion):
                if summary.isBatch:
                    raise InvalidRequest("MCP 2026-07-28 and later have no batches")
                checkRequest(lowered(headers), summary.messages[0], route.toolHeaders)
            auths = headers.getRawHeaders(b"authorization")
            authorization = auths[0] if auths else None
            x.credential = bearerToken(authorization)
            result = gen.auth.authenticate(
                authorization,
                x.clientIp or "",
                _certIdentity(request) if x.secure else None,
            )
            if isinstance(result, Deferred):
                result.addCallbacks(
                    self._authenticated,
                    self._authFailed,
                    callbackArgs=(x, route, summary, body),
                    errbackArgs=(x,),
                )
                return
            self._authenticated(result, x, route, summary, body)
        except GatewayError as e:
            x.fail(e)

    def _authenticated(
        self,
        auth: AuthResult,
        x: ProxyExchange,
        route: Route,
        summary: RpcSummary | None,
        body: bytes,
    ) -> None:
        """The caller is known: policy, then forward."""
        if x.closed:
            return  # the client left while its key was being verified
        x.authResult, x.authKeyId, x.clientCert = auth.result, auth.keyId, auth.clientCert
        try:
            if summary is not None:
                body = self._applyPolicy(x, x.generation, summary, body)
                if x.metaTrace and self.tracer is not None:
                    # SEP-414: the upstream's parent is the gateway's span, in _meta too.
                    injectMeta(summary.messages, x)
                    msgs = summary.messages
                    body = orjson.dumps(msgs if summary.isBatch else msgs[0])
            if self.draining:
                raise ShuttingDown("the gateway is shutting down")
            self._forward(x, route, x.request, body)
        except GatewayError as e:
            x.fail(e)
        except Exception:
            self.internalError(x.request, Failure())

    def _authFailed(self, failure: Failure, x: ProxyExchange) -> None:
        if x.closed:
            return
        if failure.check(GatewayError):
            x.fail(failure.value)  # type: ignore[arg-type]
        else:
            self.internalError(x.request, failure)

    def _applyPolicy(
        self, x: ProxyExchange, gen: Generation, summary: RpcSummary, body: bytes
    ) -> bytes:
        """
        Decide every C{tools/call} of the body (each call of a batch). A denied or rate-limited
        call refuses the whole request: a denied call is never forwarded, not even with the rest
        of its batch. Redaction rewrites the arguments and re-serialises the body.

        @return: the body to forward.
        @raise PolicyDenied: a call is denied.
        @raise RateLimited: a call's token bucket is empty.
        """
        policy = gen.policy
        changed = False
        decided = False
        redactions: list[str] = []
        for msg in summary.messages:
            method = msg.get("method")
            if method == "tools/list":
                x.listTools = True
            if method != "tools/call":
                continue
            params = msg.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            d = policy.decide(name if isinstance(name, str) else "")
            action = d.action
            if action == "deny":
                x.decision, x.ruleId = "deny", d.rule_id
                raise PolicyDenied(rule_id=d.rule_id)
            if action == "rate_limit":
                assert d.rule_id is not None
                wait = policy.rateLimit(d.rule_id, self._sessionKey(x), self.reactor.seconds())
                if wait is not None:
                    x.decision, x.ruleId = "rate_limit", d.rule_id
                    raise RateLimited(retryAfter=max(1, math.ceil(wait)), rule_id=d.rule_id)
                action = "allow"  # a token was available: forwarded as is
            elif action == "redact" and isinstance(params, dict):
                assert d.rule_id is not None
                new, n = policy.redact(d.rule_id, params.get("arguments"))
                if n:
                    params["arguments"] = new
                    changed = True
                if d.rule_id not in redactions:
                    redactions.append(d.rule_id)
                x.redacted = (x.redacted or 0) + n
            if not decided or (action == "redact" and x.decision != "redact"):
                x.decision, x.ruleId = action, d.rule_id
                decided = True
        if redactions:
            # Every Mcp-Param-* value, whichever call of a batch it mirrors, and whether or not
            # the body itself held a match: a header is no place for a secret either.
            x.headerRewrite = _redactParamHeaders(x.request.requestHeaders, policy, redactions)
        if changed:
            return orjson.dumps(summary.messages if summary.isBatch else summary.messages[0])
        return body

    @staticmethod
    def _sessionKey(x: ProxyExchange) -> str:
        """
        Whose bucket a rate limit takes from: the MCP session, else (with auth) the key id, else
        the client address.
        """
        if x.sessionId is not None:
            return "session:" + x.sessionId
        if x.authKeyId is not None:
            return "key:" + x.authKeyId
        return "addr:" + (x.clientIp or "")

    def _forward(self, x: ProxyExchange, route: Route, request: Any, body: bytes) -> None:
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
        # Tracing on: the gateway's span context replaces the client's (unless the operator
        # injects a traceparent of their own for this upstream).
        tracing = self.tracer is not None and b"traceparent" not in injectedNames
        for name, value in endToEnd(list(rh.getAllRawHeaders()), REQUEST_DROP):
            low = name.lower()
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
        x.upstream = route.pool.request(b"".join(parts), x)

    def admit(self, request: Any, length: int | None) -> GatewayError | None:
        """
        Checks made when the headers are in, before the body is read, parsed or authenticated:
        the per-address input rate limit, then the declared body size.

        @return: the error to answer with, or C{None}.
        """
        limit = self.generation.inputLimit
        if limit is not None:
            wait = limit.take(getattr(request.client, "host", ""), self.reactor.seconds())
            if wait is not None:
                return RateLimited(retryAfter=max(1, math.ceil(wait)), scope="input")
        if length is not None and length > self.generation.maxBodyBytes:
            return self.tooLarge()
        return None

    def tooLarge(self) -> PayloadTooLarge:
        """The 413 for a body over C{limits.max_body_bytes}."""
        return PayloadTooLarge(f"the request body exceeds {self.maxBodyBytes} bytes")

    def rejectEarly(self, request: Any, error: GatewayError) -> None:
        """
        Answer C{error} before the request is complete (body too large from C{Content-Length}
        or while reading a chunked body, input rate limit, client too slow), audit it, then close
        the connection.
        """
        x = ProxyExchange(self, request, self.generation)
        x.route = self.generation.routes.get(request.path)
        x.bytesIn = request.bodySize
        self.inflight.add(x)
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        request.channel.persistent = False  # requestDone() closes the connection
        x.respondError(error)

    def sweepSlowClients(self) -> None:
        """
        Called about once a second: answer 408 and close connections whose request headers or
        body are arriving too slowly (C{limits.header_timeout}, C{limits.body_timeout}).
        """
        limits = self.generation.config.limits
        now = self.reactor.seconds()
        for channel in list(self.connections):
            head, body = channel.headStarted, channel.bodyStarted
            if head is not None and now - head > limits.header_timeout:
                channel.reject(
                    RequestTimeout(f"headers not received within {limits.header_timeout:g}s")
                )
            elif body is not None and now - body > limits.body_timeout:
                channel.reject(RequestTimeout(f"body not received within {limits.body_timeout:g}s"))

    def internalError(self, request: Any, failure: Failure) -> None:
        """An unexpected exception escaped the request path: log it, answer 500 if possible."""
        log.failure("unexpected error handling {uri}", failure, uri=getattr(request, "uri", b"?"))
        x = request.exchange
        if x is None:
            x = ProxyExchange(self, request, self.generation)
            self.inflight.add(x)
        if x.closed:
            return
        if x.upstream is not None:
            x.upstream.cancel()
        if not x.headSent and not request.startedWriting and not request.finished:
            x.respondError(InternalError("unexpected error, see the gateway log"))
        else:
            x.error = "internal_error"
            request.loseConnection()
            x._end()

    def exchangeEnded(self, x: ProxyExchange) -> None:
        self.inflight.discard(x)
        record = recordOf(x, self.wallClock(), self.reactor.seconds())
        try:
            self.audit.write(auditLine(record))
        except Exception:
            log.failure("could not write the audit line of request {id}", id=x.requestId)
        tracer = self.tracer
        if tracer is not None:
            try:
                tracer.ended(record)
            except Exception:
                log.failure("could not record the span of request {id}", id=x.requestId)
        if not self.inflight and self._idleWaiters:
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    # -- graceful stop -------------------------------------------------------------------

    def startDraining(self) -> None:
        """
        Take no new work. Server-stream GETs end at once (clients resume them with
        C{Last-Event-ID}); POSTs and DELETEs in flight are left to finish.
        """
        self.draining = True
        for x in list(self.inflight):
            if x.httpMethod == b"GET" and x.headSent and not x.closed:
                if x.upstream is not None:
                    x.upstream.cancel()
                if x._producing:
                    x._producing = False
                    x.request.unregisterProducer()
                x.request.finish()
                x._end()

    def whenIdle(self) -> Deferred[None]:
        """Fires when no request is in flight."""
        if not self.inflight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idleWaiters.append(d)
        return d

    def closeConnections(self) -> Deferred[None]:
        """Close every client connection (flushing what is queued); fires when all are gone."""
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._connWaiters.append(d)
        for channel in list(self.connections):
            if channel.transport is not None:
                channel.transport.loseConnection()
        return d
