# -*- test-case-name: tests.test_proxy -*-
"""
The request path, as a sequence of stages, each in its own module:

  1. admission (L{mcpgw.proxy.admission}): input limit and body size, before the body is read;
  2. inbound (L{mcpgw.proxy.inbound}): one parse, route, Host/Origin, singleton headers, MCP
     2026-07-28 headers;
  3. authentication (L{mcpgw.auth}), possibly off the reactor thread;
  4. the policy verdict for the whole request (L{mcpgw.policy});
  5. forward (L{mcpgw.proxy.outbound} builds the upstream request, L{mcpgw.proxy.upstream} sends
     it over the keep-alive pool and parses the answer);
  6. relay through the response transforms (L{mcpgw.proxy.exchange});
  7. record (L{mcpgw.record}): one frozen record when the request ends, from which the audit line
     and the span are made.

Errors are L{mcpgw.errors.GatewayError}s raised by any stage and answered in one place
(L{ProxyExchange.fail}).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpgw.auth import AuthResult, bearerToken
from mcpgw.errors import (
    AuditUnavailable,
    GatewayError,
    InternalError,
    MetadataMethodNotAllowed,
    PayloadTooLarge,
    ShuttingDown,
    ToolNotApproved,
)
from mcpgw.generation import Generation, Route
from mcpgw.interfaces import IAuditLog
from mcpgw.jsonrpc import RpcSummary
from mcpgw.oauth import serveMetadata
from mcpgw.pinning import PinningService, UpstreamPins
from mcpgw.policy import Verdict
from mcpgw.proxy.admission import Admission
from mcpgw.proxy.exchange import ProxyExchange
from mcpgw.proxy.inbound import inspect
from mcpgw.proxy.outbound import paramHeaderRewrites, upstreamRequest
from mcpgw.record import auditLine, recordOf
from mcpgw.telemetry import (
    Tracer,
    injectMeta,
)

log = Logger()


def _certIdentity(request: Any) -> str | None:
    """The verified client certificate identity of a TLS request (cached per connection)."""
    from mcpgw.tls import peerIdentity

    return peerIdentity(request.channel.transport)


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
        pins: PinningService | None = None,
    ) -> None:
        self.reactor = reactor
        self.wallClock = wallClock
        self.generation = generation
        self.audit = audit
        self.readiness = readiness
        #: Tool pinning (C{None}: off whatever the config says, e.g. a gateway built by hand).
        self.pins = pins
        self.inflight: set[ProxyExchange] = set()
        self.connections: set[Any] = set()
        self.admission = Admission(reactor, lambda: self.generation, self.connections)
        #: Set by L{mcpgw.telemetry.Telemetry} when spans are exported; C{None}: tracing off.
        self.tracer: Tracer | None = None
        self.draining = False
        self._idleWaiters: list[Deferred[None]] = []
        self._connWaiters: list[Deferred[None]] = []

    def publish(self, generation: Generation) -> None:
        """A reload's new generation: new requests get it, requests in flight keep theirs."""
        self.generation = generation

    @property
    def maxBodyBytes(self) -> int:
        """C{limits.max_body_bytes} of the current generation."""
        return self.admission.maxBodyBytes

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
        refusal: GatewayError | None = None
        if route is None:
            if self.readiness is not None and path in (b"/healthz", b"/readyz"):
                self.readiness.render(request, path, gen)
                return
            document = gen.auth.documents.get(path)
            if document is not None:  # RFC 9728 protected-resource metadata (auth.oauth)
                if request.method in (b"GET", b"HEAD"):
                    serveMetadata(request, document)
                    return
                refusal = MetadataMethodNotAllowed("use GET")
        x = ProxyExchange(self, request, gen)
        self.inflight.add(x)
        request.exchange = x
        x.route = route
        if refusal is not None:
            x.fail(refusal)  # a JSON-RPC error, audited, like every refusal
            return
        try:
            summary, body = inspect(x, request, route, gen)
            assert route is not None  # inspect() raised NotFound otherwise
            if self.audit.failing and gen.config.audit.on_write_failure == "refuse":
                raise AuditUnavailable(
                    "the audit trail cannot be written; requests are refused until it can"
                )
            headers = request.requestHeaders
            auths = headers.getRawHeaders(b"authorization")
            authorization = auths[0] if auths else None
            x.credential = bearerToken(authorization)
            auth = gen.auth
            identity = None
            if auth.identityHeader is not None:
                ids = headers.getRawHeaders(auth.identityHeader)
                identity = ids[0] if ids else None
            result = auth.authenticate(
                authorization,
                x.clientIp or "",
                _certIdentity(request) if x.secure else None,
                identity,
                path,
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
        x.principal = auth.principal
        x.caller = auth.caller(x.clientIp, x.sessionId)
        if self.pins is not None:
            x.pins = self.pins.upstream(route.name)
        if summary is None:
            self._forward(None, x, route, None, body)
            return
        try:
            if x.pins is not None and summary.method is not None:
                # Tool pinning before policy is asked (no rate-limit token taken for a refusal).
                self._pinned(x, x.pins, summary)
            verdict = x.generation.policy.verdict(
                summary.messages, x.caller, self.reactor.seconds()
            )
        except GatewayError as e:
            x.fail(e)
            return
        except Exception:
            self.internalError(x.request, Failure())
            return
        if isinstance(verdict, Deferred):  # a shared rate-limit bucket answers later
            verdict.addCallback(self._forward, x, route, summary, body)
            verdict.addErrback(self._forwardFailed, x)
            return
        self._forward(verdict, x, route, summary, body)

    def _forwardFailed(self, failure: Failure, x: ProxyExchange) -> None:
        if not x.closed:
            self.internalError(x.request, failure)

    def _forward(
        self,
        verdict: Verdict | None,
        x: ProxyExchange,
        route: Route,
        summary: RpcSummary | None,
        body: bytes,
    ) -> None:
        """Policy's verdict is in (C{None} for a body-less request): apply it, then forward."""
        if x.closed:
            return  # the client left while a rate-limit bucket was being asked
        tracer = self.tracer
        if tracer is not None:
            x.sampled = tracer.sampled(x.traceId, x.parent)
        try:
            if summary is not None:
                assert verdict is not None
                body = self._decide(x, verdict, summary, body)
                if x.metaTrace and tracer is not None:
                    # SEP-414: the upstream's parent is the gateway's span, in _meta too.
                    injectMeta(summary.messages, x)
                    msgs = summary.messages
                    body = orjson.dumps(msgs if summary.isBatch else msgs[0])
            if self.draining:
                raise ShuttingDown("the gateway is shutting down")
            data = upstreamRequest(x, route, x.request, body, self.tracer is not None)
            x.upstream = route.pool.request(data, x)
        except GatewayError as e:
            x.fail(e)
        except Exception:
            self.internalError(x.request, Failure())

    def _decide(
        self, x: ProxyExchange, verdict: Verdict, summary: RpcSummary, body: bytes
    ) -> bytes:
        """
        The policy verdict on the whole request (batch semantics live in
        L{mcpgw.policy.Policy.verdict}), applied: a refusal is raised, redacted arguments are
        re-serialised and the same rules scrub every C{Mcp-Param-*} value (whichever call of a
        batch it mirrors, and whether or not the body held a match: a header is no place for a
        secret either); listing answers and results to scrub are noted for the response side.

        @return: the body to forward.
        """
        policy = x.generation.policy
        x.decision, x.ruleId, x.redacted = verdict.decision, verdict.ruleId, verdict.redacted
        if verdict.refusal is not None:
            raise verdict.refusal
        if verdict.redactRules:
            x.headerRewrite = paramHeaderRewrites(
                x.request.requestHeaders, policy, verdict.redactRules
            )
        x.resultRules = verdict.resultRules or None
        x.prepareTransforms(summary.messages)
        if verdict.changed:
            return orjson.dumps(summary.messages if summary.isBatch else summary.messages[0])
        return body

    def _pinned(self, x: ProxyExchange, pins: UpstreamPins, summary: RpcSummary) -> None:
        """
        Tool pinning on the request's C{tools/call}s (each of a batch): one dict lookup per
        call. A tool that is new or changed since approval is noted for the audit line (the
        first such call's verdict) and, in C{enforce} mode, refused before policy is asked (the
        upstream is never contacted; a batch is refused whole, as for policy).

        @raise ToolNotApproved: C{enforce}, and a called tool is not approved as last listed.
        """
        if summary.isBatch:
            calls = [
                p.get("name") if isinstance(p := m.get("params"), dict) else None
                for m in summary.messages
                if m.get("method") == "tools/call"
            ]
        elif summary.method == "tools/call":
            calls = [x.tool]
        else:
            return
        for tool in calls:
            name = tool if isinstance(tool, str) else ""
            status = pins.callStatus(name)
            if status is None:
                continue
            if x.toolPin is None:
                x.toolPin = status
            if pins.enforce:
                x.decision, x.ruleId = "deny", None
                raise ToolNotApproved(name, status)

    def _authFailed(self, failure: Failure, x: ProxyExchange) -> None:
        if x.closed:
            return
        if failure.check(GatewayError):
            x.fail(failure.value)  # type: ignore[arg-type]
        else:
            self.internalError(x.request, failure)

    def admit(
        self, request: Any, length: int | None
    ) -> GatewayError | Deferred[GatewayError | None] | None:
        """Admission checks when the headers are in (L{Admission.admit})."""
        return self.admission.admit(request, length)

    def tooLarge(self) -> PayloadTooLarge:
        """The 413 for a body over C{limits.max_body_bytes}."""
        return self.admission.tooLarge()

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
        """Called about once a second (L{Admission.sweepSlowClients})."""
        self.admission.sweepSlowClients()

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

    def exchangeEnded(self, x: ProxyExchange, release: Callable[[], None] | None = None) -> None:
        """
        Write the audit line of an exchange that ended. C{release} sends what is left of its
        answer (the body, or a stream's end): at once, or, when the audit log is durable
        (C{fsync: always}), only once the line is synced, so no answer goes out without its
        line on disk. The exchange is in flight until then (a graceful stop waits for it).
        """
        if release is not None and not self.audit.durable:
            release()  # the answer first, as it always was; the record after
            release = None
        record = recordOf(x, self.wallClock(), self.reactor.seconds())
        synced = None
        try:
            synced = self.audit.write(auditLine(record))
        except Exception:
            log.failure("could not write the audit line of request {id}", id=x.requestId)
        tracer = self.tracer
        if tracer is not None:
            try:
                tracer.ended(record)
            except Exception:
                log.failure("could not record the span of request {id}", id=x.requestId)
        if synced is None:
            if release is not None:
                release()
            self._settled(x)
            return

        def released(_: object) -> None:
            if release is not None:
                release()

        synced.addCallback(released)
        synced.addErrback(lambda f: log.failure("could not answer request {id}", f, id=x.requestId))
        synced.addBoth(lambda _: self._settled(x))

    def _settled(self, x: ProxyExchange) -> None:
        self.inflight.discard(x)
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
