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

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.gateway.connectionOpened(self)

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

    def gotLength(self, length: int | None) -> None:
        # The first call on a new request: the headers are in, the body is next.
        self.gateway: Gateway = cast(GatewayChannel, self.channel).site.gateway
        self.body: list[bytes] = []
        self.bodySize = 0
        if length is not None and length > self.gateway.maxBodyBytes:
            self._rejectTooLarge(self.gateway)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self.bodySize += len(data)
        if self.bodySize > self.gateway.maxBodyBytes:
            self._rejectTooLarge(self.gateway)
            return
        self.body.append(data)

    def _rejectTooLarge(self, gateway: Gateway) -> None:
        self._rejected = True
        self.body = []
        # Do not send 100 Continue after the answer; close once the answer is out.
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        self.method = getattr(channel, "_command", b"POST")
        self.uri = getattr(channel, "_path", b"/")
        self.path = self.uri.split(b"?", 1)[0]
        self.clientproto = getattr(channel, "_version", b"HTTP/1.1")
        gateway.rejectTooLarge(self)

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
