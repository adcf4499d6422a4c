# -*- test-case-name: tests.test_server -*-
"""
The listening side: a small HTTP/1.1 server protocol on C{httptools} (llhttp, the parser of
Node.js) in place of twisted.web's C{HTTPChannel} and C{Request}.

Why not twisted.web: its line-based header parsing, C{Headers} canonicalisation per line and
per-request C{Request} set-up were the largest share of the gateway's own CPU per request
(C{docs/performance.md}, "The server protocol"). What twisted.web gave and this module now owns:

  - B{parsing and smuggling defences}: llhttp in its strict mode refuses a request with both
    C{Content-Length} and C{Transfer-Encoding}, a duplicate C{Content-Length}, a
    C{Transfer-Encoding} other than a final C{chunked}, obsolete line folding, whitespace before
    a header's colon, bare LF line ends and bad chunk framing: 400 C{bad_request}. Trailer fields
    of a chunked body are ignored (never merged into the headers);
  - B{limits}: request line and headers at most C{limits.max_header_bytes} (431), at most
    L{MAX_HEADERS} header fields (431), the body at most C{limits.max_body_bytes} (413, from
    C{Content-Length} before the body is read, else while a chunked body arrives);
  - B{timeouts}: headers and body must arrive within C{limits.header_timeout}/C{body_timeout}
    (408, swept about once a second by L{mcpgw.proxy.admission}), and a keep-alive connection
    idle for L{GatewaySite.idleTimeout} seconds between requests is closed (same sweep, no timer
    per connection or request);
  - B{keep-alive and pipelining}: HTTP/1.1 connections are persistent unless the client says
    C{Connection: close}; HTTP/1.0 ones are closed after the response. Pipelined requests are
    answered one at a time, in order: while a request is being answered, the ones behind it wait
    (admitted, read and dispatched only once it is done) and the socket is not read past one of
    them, so memory stays bounded;
  - B{C{Expect: 100-continue}}: answered C{100 Continue} once the request is admitted (never
    after a refusal, never ahead of an earlier response);
  - B{the response}: status line and headers held back and sent with the first body piece (one
    C{send()}), C{Content-Length} when the answer has one, else chunked (HTTP/1.1), nothing for
    C{HEAD}, 204 and 304; backpressure by registering the upstream's transport as the client
    transport's producer.

L{GatewayRequest} is the per-request object the gateway's stages see: the attributes they use
(C{method}, C{path}, C{requestHeaders}, C{responseHeaders}, C{body}, ...) and the C{Request}
methods the response side calls (C{setResponseCode}, C{write}, C{finish}, C{registerProducer},
C{loseConnection}), nothing else.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers, _nameEncoder

from mcpgw.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    InternalError,
    errorResponse,
    reasonPhrase,
)
from mcpgw.proxy.eager import eagerWrite

if TYPE_CHECKING:
    from mcpgw.proxy.gateway import Gateway

log = Logger()

#: At most this many header fields in one request (431 beyond).
MAX_HEADERS = 256
#: Per header line, the bytes the parser strips around its name and value (": " and CRLF).
_LINE_OVERHEAD = 4
_NO_BODY_CODES = frozenset((204, 304))
#: After a refusal, how long the client may go on sending before the connection is aborted.
LINGER_SECONDS = 2.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNK_END = b"0\r\n\r\n"
_canonical = _nameEncoder.encode


#: Header names (as received, and as the gateway's code and configuration ask for them) -> their
#: canonical form. Bounded: the first 1,024 distinct spellings; others only skip the cache.
_canonicalNames: dict[bytes, bytes] = {}


class RequestHeaders(Headers):
    """
    A request's C{Headers}, whose C{getRawHeaders} with a C{bytes} name (what the gateway asks,
    several times per request) is one cached canonical name and one dict lookup.
    """

    def getRawHeaders(self, name: Any, default: Any = None) -> Any:
        if name.__class__ is bytes:
            key = _canonicalNames.get(name)
            if key is None:
                key = _canonical(name)
                if len(_canonicalNames) < 1024:
                    _canonicalNames[name] = key
            return self._rawHeaders.get(key) or default
        return super().getRawHeaders(name, default)


def _headers(raw: dict[bytes, list[bytes]]) -> Headers:
    """A C{Headers} around C{raw} (keys already canonical), without copying or re-encoding."""
    headers = RequestHeaders.__new__(RequestHeaders)
    headers._rawHeaders = raw
    return headers


class GatewayRequest:
    """
    One HTTP request on the gateway's listener.

    @ivar body: the request body chunks.
    @ivar bodySize: bytes of body received.
    @ivar exchange: the in-flight proxy exchange, told when the client goes away.
    @ivar complete: the whole body has been received.
    @ivar pendingError: a refusal found while an earlier request was still being answered.
    """

    __slots__ = (
        "_bodyless",
        "_disconnected",
        "_rejected",
        "admission",
        "admitted",
        "body",
        "bodySize",
        "channel",
        "chunked",
        "client",
        "clientproto",
        "code",
        "code_message",
        "complete",
        "exchange",
        "expectContinue",
        "finished",
        "gateway",
        "method",
        "path",
        "pendingError",
        "persistent",
        "query",
        "requestHeaders",
        "responseHeaders",
        "startedWriting",
        "uri",
    )

    def __init__(
        self,
        channel: GatewayChannel,
        method: bytes,
        uri: bytes,
        version: bytes,
        headers: dict[bytes, list[bytes]],
    ) -> None:
        self.channel = channel
        self.gateway = channel.gateway
        self.client = channel.peer
        self.method = method
        self.uri = uri
        self.path, _, self.query = uri.partition(b"?")
        self.clientproto = version
        self.requestHeaders = _headers(headers)
        self.responseHeaders = Headers()
        self.body: list[bytes] = []
        self.bodySize = 0
        self.exchange: Any = None
        self.code = 200
        self.code_message = b"OK"
        self.chunked = False
        self.startedWriting = False
        self.finished = False
        self.complete = False
        self.admitted = False
        #: The admission decision while it is awaited (a shared state backend answers later).
        self.admission: Deferred[GatewayError | None] | None = None
        self.pendingError: GatewayError | None = None
        self._bodyless = False
        self._disconnected = False
        self._rejected = False
        self.expectContinue = False
        if version == b"HTTP/1.1":
            connection = headers.get(b"Connection")
            self.persistent = not (connection and b"close" in connection[0].lower())
            expect = headers.get(b"Expect")
            self.expectContinue = expect is not None and expect[0].lower() == b"100-continue"
        else:
            self.persistent = False

    def isSecure(self) -> bool:
        return self.channel.secure

    # -- the response ----------------------------------------------------------------------

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message or RESPONSES.get(code, b"Unknown Status")

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("GatewayRequest.write after finish")
        if self._disconnected:
            return
        if not self.startedWriting:
            self.startedWriting = True
            self._startResponse()
        if data and not self._bodyless:
            if self.chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            self.channel.write(data)

    def _startResponse(self) -> None:
        headers = self.responseHeaders
        raw = headers._rawHeaders
        code = self.code
        self._bodyless = self.method == b"HEAD" or code in _NO_BODY_CODES
        if b"Content-Length" not in raw and self.clientproto == b"HTTP/1.1" and not self._bodyless:
            raw[b"Transfer-Encoding"] = [b"chunked"]
            self.chunked = True
        if not self.persistent:
            raw[b"Connection"] = [b"close"]
        parts = [b"HTTP/1.1 %d " % code, self.code_message, b"\r\n"]
        for name, values in raw.items():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.channel.holdHead(b"".join(parts))

    def finish(self) -> None:
        if self._disconnected:
            raise RuntimeError("GatewayRequest.finish after the connection was lost")
        if self.finished:
            return
        if not self.startedWriting:
            self.write(b"")
        if self.chunked:
            self.channel.write(_CHUNK_END)
        self.finished = True
        self.channel.requestDone(self)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        transport = self.channel.transport
        if transport is not None and not self._disconnected:
            transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        transport = self.channel.transport
        if transport is not None and not self._disconnected:
            transport.unregisterProducer()

    def loseConnection(self) -> None:
        """Close the client connection (what was written still goes out)."""
        self.persistent = False
        self.channel.loseConnection()

    # -- before the request is complete ----------------------------------------------------

    def rejectEarly(self, error: GatewayError) -> None:
        """
        Answer C{error} before the request is complete (too large, input limit, too slow), audit
        it, and close the connection once the answer is out. A request behind another one still
        being answered keeps the refusal until its turn.
        """
        if self._rejected:
            return
        self._rejected = True
        self.body = []
        self.persistent = False
        self.expectContinue = False
        if not self.channel.isCurrent(self):
            self.pendingError = error
            return
        self.gateway.rejectEarly(self, error)

    def connectionLost(self) -> None:
        self._disconnected = True
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.clientGone()


class GatewayChannel(Protocol):
    """
    One client connection: parses requests with C{httptools} and answers them in order.

    @ivar headStarted: when the current request's first byte arrived (headers incomplete), else
        C{None}; read by the slow-client sweep.
    @ivar bodyStarted: when the current request's body started (body incomplete), else C{None}.
    @ivar lastActive: when the connection last received bytes or finished a response.
    """

    headStarted: float | None = None
    bodyStarted: float | None = None
    factory: GatewaySite
    transport: Any  # TCP or TLS: also a producer (pause/resume) and a consumer

    def __init__(self, site: GatewaySite) -> None:
        self.site = site
        self.gateway: Gateway = site.gateway
        self.peer: IAddress | None = None
        self.secure = False
        self.persistent = True
        self.lastActive = 0.0
        self._parser = httptools.HttpRequestParser(self)
        self._requests: deque[GatewayRequest] = deque()
        #: The request whose headers are being parsed (its header dict and URL so far).
        self._url = b""
        self._raw: dict[bytes, list[bytes]] = {}
        self._headBytes = 0
        self._count = 0
        self._inHead = False
        #: The request whose body is being read.
        self._reading: GatewayRequest | None = None
        self._head: bytes | None = None
        self._paused = False
        #: The byte stream could not be parsed: nothing more is read.
        self._broken = False
        #: A refusal of a request whose head broke off, answered after the earlier responses.
        self._error: GatewayError | None = None
        self._closing = False
        self._maxHeader = 0
        self._advancing = False
        self._again = False
        self._linger: Any = None

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self.peer = transport.getPeer()
        self.secure = ISSLTransport.providedBy(transport)
        self._maxHeader = self.gateway.generation.config.limits.max_header_bytes
        self.lastActive = self.gateway.reactor.seconds()
        self.gateway.connectionOpened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        requests, self._requests = self._requests, deque()
        for request in requests:
            request.connectionLost()
        self.gateway.connectionClosed(self)

    def getHost(self) -> IAddress:
        assert self.transport is not None
        return self.transport.getHost()

    # -- reading ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._broken or self._closing:
            return
        wasInHead = self._inHead
        if self.headStarted is None and not self._requests and self._reading is None:
            self.headStarted = self.lastActive = self.gateway.reactor.seconds()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadRequest("protocol upgrades are not supported"))
            return
        except httptools.HttpParserCallbackError as e:
            cause = e.__cause__ or e.__context__
            if not isinstance(cause, GatewayError):
                log.failure("unexpected error parsing a request", Failure(cause or e))
                cause = InternalError("unexpected error, see the gateway log")
            self._fail(cause)
            return
        except httptools.HttpParserError as e:
            self._fail(BadRequest(f"malformed HTTP request: {e}"))
            return
        if self._inHead and wasInHead:
            # A head arriving in many pieces: the parser buffers a partial header, so count
            # whole reads here too (the callbacks only see complete fields).
            self._headBytes += len(data)
            if self._headBytes > self._maxHeader:
                self._fail(HeadersTooLarge(f"headers exceed {self._maxHeader} bytes"))
                return
        if len(self._requests) > 1 and not self._paused and self.transport is not None:
            # Pipelined requests wait their turn; read no further until the first is answered.
            self._paused = True
            self.transport.pauseProducing()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._raw = {}
        self._headBytes = self._count = 0
        self._inHead = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._headBytes += len(url)
        if self._headBytes > self._maxHeader:
            raise HeadersTooLarge(f"the request line exceeds {self._maxHeader} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._inHead:
            return  # a trailer field of a chunked body: ignored, never merged
        size = self._headBytes + len(name) + len(value) + _LINE_OVERHEAD
        self._headBytes = size
        count = self._count = self._count + 1
        if size > self._maxHeader:
            raise HeadersTooLarge(f"headers exceed {self._maxHeader} bytes")
        if count > MAX_HEADERS:
            raise HeadersTooLarge(f"more than {MAX_HEADERS} header fields")
        key = _canonicalNames.get(name)
        if key is None:
            key = _canonical(name)
            if len(_canonicalNames) < 1024:
                _canonicalNames[name] = key
        values = self._raw.get(key)
        if values is None:
            self._raw[key] = [value.strip(b" \t")]
        else:
            values.append(value.strip(b" \t"))

    def on_headers_complete(self) -> None:
        self._inHead = False
        parser = self._parser
        request = GatewayRequest(
            self,
            parser.get_method(),
            self._url,
            b"HTTP/" + parser.get_http_version().encode("ascii"),
            self._raw,
        )
        self.headStarted = None
        self._reading = request
        self._requests.append(request)
        raw = self._raw
        if b"Content-Length" in raw:
            bodyExpected = raw[b"Content-Length"][0] != b"0"
        else:
            bodyExpected = b"Transfer-Encoding" in raw
        if bodyExpected:
            self.bodyStarted = self.gateway.reactor.seconds()
        if len(self._requests) == 1:
            self._admit(request)

    def on_body(self, data: bytes) -> None:
        request = self._reading
        if request is None or request._rejected:
            return
        request.bodySize += len(data)
        if request.bodySize > self.gateway.maxBodyBytes:
            request.rejectEarly(self.gateway.tooLarge())
            return
        request.body.append(data)

    def on_message_complete(self) -> None:
        request = self._reading
        self._reading = None
        self.bodyStarted = None
        if request is None:
            return
        request.complete = True
        if (
            request.admitted
            and request.admission is None
            and not request._rejected
            and self.isCurrent(request)
        ):
            self._dispatch(request)

    # -- answering, in order ---------------------------------------------------------------

    def isCurrent(self, request: GatewayRequest) -> bool:
        """C{request} is the one being answered (no earlier response is still going out)."""
        return bool(self._requests) and self._requests[0] is request

    def _admit(self, request: GatewayRequest) -> None:
        """The request's turn has come with its headers in: admission, then 100 Continue."""
        request.admitted = True
        pending = request.pendingError
        if pending is not None:
            request.pendingError = None
            self.gateway.rejectEarly(request, pending)
            return
        if request._rejected:
            return
        # A refusal, None, or (with a shared state backend) a Deferred of either.
        refusal: Any = self.gateway.admit(request, self._expectedOf(request))
        if isinstance(refusal, Deferred):
            # A shared state backend answers later: the body is read meanwhile, and the request
            # is forwarded only once admitted.
            request.admission = refusal
            refusal.addErrback(self._admissionFailed)
            refusal.addCallback(self._admitted, request)
            return
        self._admitted(refusal, request)

    def _admitted(self, refusal: GatewayError | None, request: GatewayRequest) -> None:
        """The admission decision: refuse, or 100 Continue and go on."""
        request.admission = None
        if request._disconnected or request._rejected:
            return
        if refusal is not None:
            request.rejectEarly(refusal)
            return
        if request.expectContinue and not request.complete and self.transport is not None:
            self.transport.write(_CONTINUE)
        if request.complete:
            self._dispatch(request)

    def _admissionFailed(self, failure: Failure) -> GatewayError:
        log.failure("the admission check failed", failure)
        return InternalError("unexpected error, see the gateway log")

    def _expectedOf(self, request: GatewayRequest) -> int | None:
        """The declared body size (llhttp checked it is one decimal number), else C{None}."""
        lengths = request.requestHeaders._rawHeaders.get(b"Content-Length")
        return int(lengths[0]) if lengths is not None else None

    def _dispatch(self, request: GatewayRequest) -> None:
        try:
            self.gateway.handle(request)
        except Exception:
            self.gateway.internalError(request, Failure())

    def requestDone(self, request: GatewayRequest) -> None:
        """C{request}'s response is complete: close, or take the next request."""
        self.flushHead()
        if self._requests and self._requests[0] is request:
            self._requests.popleft()
        self.lastActive = self.gateway.reactor.seconds()
        if not request.persistent or not self.persistent:
            self._requests.clear()
            if request._rejected or self._broken:
                self._lingeringClose()  # the client may still be sending
            else:
                self.loseConnection()
            return
        if self._advancing:
            self._again = True  # the loop below, further up the stack, takes the next one
            return
        self._advancing = True
        try:
            self._again = True
            while self._again and not self._closing:
                # Iterative, not recursive: a read full of pipelined requests that are each
                # answered at once must not nest one call per request.
                self._again = False
                if self._requests:
                    head = self._requests[0]
                    if not head.admitted:
                        self._admit(head)
                elif self._error is not None:
                    error, self._error = self._error, None
                    self._refuseHead(error)
        finally:
            self._advancing = False
        if self._paused and len(self._requests) <= 1 and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    # -- writing ---------------------------------------------------------------------------

    def holdHead(self, head: bytes) -> None:
        """The response head, sent with the first body piece: one C{send()} for both."""
        self._head = head

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        if data and self.transport is not None:
            self._send(data)

    def _send(self, data: bytes) -> None:
        """Out to the socket at once when nothing is queued (L{mcpgw.proxy.eager})."""
        eagerWrite(self.transport, data)

    def flushHead(self) -> None:
        """Send a held-back response head now (a stream whose first event may take a while)."""
        if self._head is not None:
            self.write(b"")

    def loseConnection(self) -> None:
        self.flushHead()
        self._closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _lingeringClose(self) -> None:
        """
        Close after a refusal sent while the client may still be sending (a body too large,
        headers too long, a broken request): send what was written and a FIN, then read and
        discard until the client closes, at most L{LINGER_SECONDS}. Closing at once with unread
        bytes would make the kernel answer with a reset, which can destroy the refusal before
        the client has read it.
        """
        self.flushHead()
        self._closing = True
        transport = self.transport
        if transport is None:
            return
        if self.secure or not hasattr(transport, "loseWriteConnection"):
            transport.loseConnection()
            return
        transport.loseWriteConnection()
        self._linger = self.gateway.reactor.callLater(LINGER_SECONDS, transport.abortConnection)

    # -- refusals --------------------------------------------------------------------------

    def _fail(self, error: GatewayError) -> None:
        """The byte stream cannot be parsed further: refuse, in turn, and close."""
        self._broken = True
        self.headStarted = self.bodyStarted = None
        reading = self._reading
        if reading is not None:
            # A body broke off (bad chunk framing, too large): the refusal is that request's.
            reading.rejectEarly(error)
            return
        if self._requests:
            # Earlier responses are still going out; answer once they are done.
            self._error = error
            return
        self._refuseHead(error)

    def _refuseHead(self, error: GatewayError) -> None:
        """Refuse a request whose headers never completed: audited when its line was read."""
        if self._url:
            try:
                method = self._parser.get_method()
            except httptools.HttpParserError:
                method = b"GET"
            request = GatewayRequest(self, method, self._url, b"HTTP/1.1", {})
            self._requests.append(request)
            request.rejectEarly(error)
        else:
            self._answerBare(error)

    def _answerBare(self, error: GatewayError) -> None:
        """A refusal that is no request's (nothing of one could be read): answered, not audited."""
        status, headers, body = errorResponse(error)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reasonPhrase(status))]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        head.append(b"Connection: close\r\n\r\n")
        self.persistent = False
        if self.transport is not None:
            self.transport.write(b"".join(head) + body)
        self._lingeringClose()

    def reject(self, error: GatewayError) -> None:
        """
        The slow-client sweep's refusal (408): through the request being read when there is one
        (so it is audited), else for the partial head.
        """
        self.headStarted = self.bodyStarted = None
        self._broken = True
        reading = self._reading
        if reading is not None:
            reading.rejectEarly(error)
        elif not self._requests:
            self._refuseHead(error)

    def idleFor(self, now: float) -> float:
        """Seconds this connection has been idle between requests (0 while one is under way)."""
        if self._requests or self._reading is not None or self.headStarted is not None:
            return 0.0
        return now - self.lastActive


class AuditFirstChannel(GatewayChannel):
    """
    The channel of a worker (C{listen.workers} above 1): response bytes are queued on the
    transport, never sent at once, so they leave in a later reactor turn than the one that ends
    the request, in which the worker hands the audit line to the supervisor. A client that has
    its whole answer therefore has its audit line in the supervisor's pipe, where the worker's
    death (SIGKILL) cannot lose it. Costs the eager write's saving (about 10 µs and 0.02-0.04 ms
    per request, L{mcpgw.proxy.eager}).
    """

    def _send(self, data: bytes) -> None:
        self.transport.write(data)  # queued: sent in a later reactor turn


class GatewaySite(Factory):
    """The listener's factory: a L{GatewayChannel} per connection, all handled by C{gateway}."""

    noisy = False
    #: The channel class (L{AuditFirstChannel} in a worker).
    protocol: type[GatewayChannel] = GatewayChannel  # type: ignore[assignment]

    def __init__(self, gateway: Gateway, reactor: Any, timeout: float) -> None:
        self.gateway = gateway
        self.reactor = reactor
        #: Seconds a keep-alive connection may stay idle between requests.
        self.idleTimeout = timeout

    def buildProtocol(self, addr: IAddress | None) -> Any:
        channel = self.protocol(self)
        channel.factory = self
        return channel
