# -*- test-case-name: tests.test_proxy -*-
"""
The listening side: twisted.web's C{HTTPChannel} (its parser, header limits and idle timeout)
with a lean C{Request} subclass.

L{GatewayRequest} keeps the body as a list of chunks (no BytesIO or temporary file), enforces
C{limits.max_body_bytes} from C{Content-Length} before reading and while reading chunked bodies,
skips form parsing, query parsing and resource traversal, and hands itself to the
L{mcpgw.proxy.gateway.Gateway}. Each channel registers with the gateway so a graceful stop can
close every connection once the in-flight requests have finished.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from mcpgw.errors import BadRequest, GatewayError, HeadersTooLarge, errorResponse, reasonPhrase
from mcpgw.proxy.eager import eagerWrite

if TYPE_CHECKING:
    from mcpgw.proxy.gateway import Gateway

log = Logger()


class GatewayChannel(http.HTTPChannel):
    """
    C{HTTPChannel} that registers with the gateway (for graceful stop) and answers C{getHost}
    from a cache (no C{getsockname} per request).
    """

    _host: IAddress | None = None
    _head: bytes | None = None
    site: GatewaySite

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        # Held back and sent with the first body piece: one send() for head and body.
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self._head = b"".join(parts)

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        if data:
            eagerWrite(self.transport, data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.write(b"".join(iovec))

    def flushHead(self) -> None:
        """Send a held-back response head now (a stream whose first event may take a while)."""
        if self._head is not None:
            self.write(b"")

    def requestDone(self, request: Any) -> None:
        self.flushHead()
        super().requestDone(request)

    def loseConnection(self) -> None:
        self.flushHead()
        super().loseConnection()

    #: When the current request's first byte arrived (headers incomplete), else None.
    headStarted: float | None = None
    #: When the current request's body started (body incomplete), else None.
    bodyStarted: float | None = None

    def connectionMade(self) -> None:
        limits = self.site.gateway.generation.config.limits
        self.MAX_LENGTH = self.totalHeadersSize = limits.max_header_bytes
        super().connectionMade()
        self.site.gateway.connectionOpened(self)

    def dataReceived(self, data: bytes) -> None:
        if self.headStarted is None and not self._handlingRequest and self.bodyStarted is None:
            self.headStarted = self.site.gateway.reactor.seconds()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self.headStarted = None
        if self.length != 0:
            self.bodyStarted = self.site.gateway.reactor.seconds()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self.bodyStarted = None
        super().allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.reject(HeadersTooLarge(f"headers exceed {self.totalHeadersSize} bytes"))
        else:
            self.reject(BadRequest("malformed HTTP request"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reject(HeadersTooLarge(f"a header line exceeds {self.MAX_LENGTH} bytes"))

    def reject(self, error: GatewayError) -> None:
        """
        Answer C{error} and close: through the current request when there is one (so it is
        audited), else as a bare response.
        """
        self.headStarted = self.bodyStarted = None
        self.persistent = False
        request = self.requests[-1] if self.requests else None
        if (
            isinstance(request, GatewayRequest)
            and request.exchange is None
            and not request.finished
            and hasattr(self, "_command")
        ):
            request.rejectEarly(error)
            return
        status, headers, body = errorResponse(error)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reasonPhrase(status))]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        head.append(b"Connection: close\r\n\r\n")
        if self.transport is not None:
            self.transport.write(b"".join(head) + body)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.site.gateway.connectionClosed(self)

    def getHost(self) -> IAddress:
        if self._host is None:
            self._host = super().getHost()
        return self._host


class GatewayRequest(server.Request):
    """
    One HTTP request on the gateway's listener.

    @ivar body: the request body chunks.
    @ivar bodySize: bytes of body received.
    @ivar exchange: the in-flight proxy exchange, told when the client goes away.
    """

    defaultContentType = None
    content = None
    exchange: Any = None
    _rejected = False
    query = b""

    body: list[bytes] = []
    bodySize = 0

    def gotLength(self, length: int | None) -> None:
        # The first call on a new request: the headers are in, the body is next.
        self.gateway: Gateway = cast(GatewayChannel, self.channel).site.gateway
        self.body = []
        error = self.gateway.admit(self, length)
        if error is not None:
            self.rejectEarly(error)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self.bodySize += len(data)
        if self.bodySize > self.gateway.maxBodyBytes:
            self.rejectEarly(self.gateway.tooLarge())
            return
        self.body.append(data)

    def rejectEarly(self, error: GatewayError) -> None:
        """
        Answer C{error} before the request is complete (too large, input limit, too slow), audit
        it, and close the connection once the answer is out.
        """
        if self._rejected:
            return
        self._rejected = True
        self.body = []
        # Do not send 100 Continue after the answer.
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        if not hasattr(self, "gateway"):
            self.gateway = cast(GatewayChannel, channel).site.gateway
        self.method = getattr(channel, "_command", b"GET")
        self.uri = getattr(channel, "_path", b"/")
        self.path = self.uri.split(b"?", 1)[0]
        self.clientproto = getattr(channel, "_version", b"HTTP/1.1")
        self.gateway.rejectEarly(self, error)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        self.method = command
        self.uri = path
        self.clientproto = version
        self.path, _, self.query = path.partition(b"?")
        self.args = {}
        self.process()

    def process(self) -> None:
        try:
            self.gateway.handle(self)
        except Exception:
            self.gateway.internalError(self, Failure())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.clientGone()


class AuditFirstChannel(GatewayChannel):
    """
    The channel of a worker (C{listen.workers} above 1): response bytes are queued on the
    transport, never sent at once, so they leave in a later reactor turn than the one that ends
    the request, in which the worker hands the audit line to the supervisor. A client that has
    its whole answer therefore has its audit line in the supervisor's pipe, where the worker's
    death (SIGKILL) cannot lose it. Costs the eager write's saving (about 10 µs and 0.02-0.04 ms
    per request, L{mcpgw.proxy.eager}).
    """

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        transport = self.transport
        if data and transport is not None:
            transport.write(data)


class GatewaySite(server.Site):
    """A C{Site} whose requests go straight to the L{Gateway} (no resource tree)."""

    requestFactory = GatewayRequest
    protocol = GatewayChannel  # type: ignore[assignment]
    noisy = False

    def __init__(self, gateway: Gateway, reactor: Any, timeout: float) -> None:
        super().__init__(None, requestFactory=GatewayRequest, reactor=reactor, timeout=timeout)
        self.gateway = gateway
        self._parsePOSTFormSubmission = False

    def log(self, request: Any) -> None:
        """No access log: the audit line is the record of each request."""
