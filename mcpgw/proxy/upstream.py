# -*- test-case-name: tests.test_upstream -*-
"""
The upstream HTTP/1.1 client: a small httptools-based protocol over a LIFO keep-alive pool.

Not C{Agent}/C{readBody}: that path costs about three times the CPU and cannot stream SSE (see
C{docs/performance.md}). Here each upstream request is one C{transport.write}; the response is
handed to an L{IResponseSink} piece by piece as it arrives, and the upstream transport is given to
the sink so it can be registered as the push producer of the client response (backpressure).

Timeouts: C{connect} bounds the TCP (and TLS) connect and ends in a 502; C{response} bounds the
wait for the final response's head (interim 1xx responses do not count) and ends in a 504.
Nothing bounds a response once it has started, so a long SSE stream is never cut. A request sent
on a reused keep-alive connection that dies before any response byte is retried once on a fresh
connection (the upstream closed an idle connection just as the request went out; it never saw
the request).
"""

from __future__ import annotations

from typing import Any

import httptools
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, ITransport
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcpgw.errors import GatewayError, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from mcpgw.interfaces import IResponseSink, IUpstreamPool
from mcpgw.proxy.eager import eagerWrite

log = Logger()

#: Idle keep-alive connections older than this are closed instead of reused.
IDLE_TIMEOUT = 30.0
#: At most this many idle connections are kept per upstream.
MAX_IDLE = 128


class UpstreamExchange:
    """
    One request/response with an upstream; L{cancel} aborts it at any point.
    """

    __slots__ = (
        "_conn",
        "_pool",
        "cancelled",
        "data",
        "done",
        "gotBytes",
        "retried",
        "sink",
    )

    def __init__(self, pool: UpstreamPool, data: bytes, sink: IResponseSink) -> None:
        self._pool = pool
        self.data = data
        self.sink = sink
        self._conn: _UpstreamProtocol | None = None
        self.gotBytes = False
        self.cancelled = False
        self.retried = False
        self.done = False

    def cancel(self) -> None:
        """
        Abandon the exchange: the upstream connection is aborted (never reused) and the sink hears
        nothing more. Used when the client goes away.
        """
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self._stopTimer()
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.exchange = None
            conn.transport.abortConnection()  # type: ignore[attr-defined]

    def _stopTimer(self) -> None:
        self._pool._waiting.pop(self, None)

    def _attach(self, conn: _UpstreamProtocol) -> None:
        self._conn = conn
        conn.exchange = self
        self._pool._watch(self)
        eagerWrite(conn.transport, self.data)

    def _timedOut(self) -> None:
        self._fail(
            UpstreamTimeout(
                f"upstream {self._pool.name!r} sent no response within "
                f"{self._pool.responseTimeout:g}s"
            )
        )
        if self._conn is not None and self._conn.transport is not None:
            self._conn.exchange = None
            self._conn.transport.abortConnection()  # type: ignore[attr-defined]

    def _fail(self, err: GatewayError) -> None:
        if self.done or self.cancelled:
            return
        self.done = True
        self._stopTimer()
        self.sink.upstreamFailed(err, self.gotBytes)

    def _finish(self) -> None:
        if self.done or self.cancelled:
            return
        self.done = True
        self._stopTimer()
        self.sink.upstreamDone()


class _UpstreamProtocol(Protocol):
    """
    One keep-alive connection to an upstream, parsing responses with httptools.

    Framing rules (a connection that breaks one never carries another request):
      - an interim response (1xx other than 101) is skipped and the final response awaited; one
        that declares a body is a framing error;
      - C{101 Switching Protocols} or unparseable bytes (bad chunking, garbage) are framing
        errors: the exchange fails with L{UpstreamBadResponse} and the connection is aborted; a
        connection closed before a framed body ended fails with L{UpstreamUnavailable};
      - the connection returns to the pool only after a complete final response, when the
        upstream allows keep-alive and sent nothing beyond that response.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.exchange: UpstreamExchange | None = None
        self.reused = False
        self.idleSince = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._inBody = False
        self._framed = False
        self._interim = False
        self._bad: str | None = None
        self._complete = False
        self._extra = False
        self._keep = False

    def connectionMade(self) -> None:
        self.pool._track(self)

    def dataReceived(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes while idle (or after a cancel): the connection is unusable.
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        if not ex.gotBytes:
            ex.gotBytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad = self._bad or "switched protocols (101)"
        except httptools.HttpParserError as e:
            if not self._complete:
                self._bad = self._bad or f"sent an invalid response ({e})"
            else:
                self._extra = True
        if self._bad is not None and not self._complete:
            self._badResponse(ex, self._bad)
        elif self._complete:
            self._completed(ex)

    def _badResponse(self, ex: UpstreamExchange, why: str) -> None:
        """The upstream broke HTTP framing: fail the exchange and never reuse the connection."""
        self.exchange = None
        ex._conn = None
        log.warn("invalid response from upstream {name}: {why}", name=self.pool.name, why=why)
        ex._fail(UpstreamBadResponse(f"upstream {self.pool.name!r} {why}"))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _completed(self, ex: UpstreamExchange) -> None:
        """A final response ended: pool the connection (if clean), then tell the sink."""
        self.exchange = None
        self._complete = False
        self._inBody = False
        reusable = self._keep and not self._extra and not ex.cancelled
        self._extra = False
        # Back to the pool first, so that whatever the sink does next can reuse the connection.
        if reusable:
            self.pool._release(self)
        elif self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        ex._conn = None
        ex._finish()

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._complete:
            self._extra = True  # bytes after the final response: nobody asked for them
            return
        self._headers = []
        self._reason = b""
        self._inBody = False

    def on_status(self, status: bytes) -> None:
        if not self._complete:
            self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._complete:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._complete or self._bad is not None:
            return
        status = self._parser.get_status_code()
        if status == 101:
            self._bad = "switched protocols (101)"
            return
        if status < 200:
            # Interim (100 Continue, 103 Early Hints, ...): never the answer; the final one follows.
            self._interim = True
            for name, value in self._headers:
                low = name.lower()
                if low == b"transfer-encoding" or (
                    low == b"content-length" and value.strip() != b"0"
                ):
                    self._bad = f"sent an interim {status} response with a body"
            return
        ex = self.exchange
        if ex is None or ex.cancelled:
            return
        ex._stopTimer()
        self._inBody = True
        names = {n.lower() for n, _ in self._headers}
        self._framed = b"content-length" in names or b"transfer-encoding" in names
        assert self.transport is not None
        ex.sink.upstreamResponse(status, self._reason, self._headers, self.transport)

    def on_body(self, body: bytes) -> None:
        if self._complete or self._interim or self._bad is not None:
            return
        ex = self.exchange
        if ex is not None and not ex.cancelled and not ex.done:
            ex.sink.upstreamData(body)

    def on_message_complete(self) -> None:
        if self._complete or self._bad is not None:
            return
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._keep = self._parser.should_keep_alive()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.pool._untrack(self)
        ex = self.exchange
        self.exchange = None
        if ex is None or ex.done or ex.cancelled:
            return
        ex._conn = None
        if self._inBody and not self._framed:
            ex._finish()  # a close-delimited body ends with the connection
        elif self._inBody:
            ex._fail(
                UpstreamUnavailable(
                    f"upstream {self.pool.name!r} closed the connection before the body ended"
                )
            )
        elif not ex.gotBytes and self.reused and not ex.retried:
            ex.retried = True
            ex._stopTimer()
            self.pool._dispatch(ex)
        else:
            ex._fail(
                UpstreamUnavailable(
                    f"upstream {self.pool.name!r} closed the connection"
                    + (" mid-response" if ex.gotBytes else " before responding")
                )
            )


class _ConnectFactory(ClientFactory):
    """Makes one connection for one exchange; the connection then joins the pool."""

    noisy = False

    def __init__(self, pool: UpstreamPool, exchange: UpstreamExchange) -> None:
        self.pool = pool
        self.exchange = exchange

    def buildProtocol(self, addr: Any) -> _UpstreamProtocol:
        proto = _UpstreamProtocol(self.pool)
        proto.factory = self
        return proto

    def startedConnecting(self, connector: Any) -> None:
        pass

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if reason.check(ierror.TimeoutError, ierror.UserError):
            why = f"no connection within {self.pool.connectTimeout:g}s"
        elif reason.check(ierror.ConnectionRefusedError):
            why = "connection refused"
        elif reason.check(ierror.DNSLookupError):
            why = "host name lookup failed"
        else:
            why = "connection failed"
        self.exchange._fail(UpstreamUnavailable(f"upstream {self.pool.name!r}: {why}"))


@implementer(IUpstreamPool)
class UpstreamPool:
    """
    Keep-alive connections to one upstream, reused last-in first-out.

    @ivar name: the upstream's configured name (for messages).
    """

    def __init__(
        self,
        reactor: Any,
        name: str,
        scheme: str,
        host: str,
        port: int,
        connectTimeout: float,
        responseTimeout: float,
        tlsOptions: Any = None,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.scheme = scheme
        self.host = host
        self.port = port
        self.connectTimeout = connectTimeout
        self.responseTimeout = responseTimeout
        self._tlsOptions = tlsOptions
        self._idle: list[_UpstreamProtocol] = []
        self._all: dict[_UpstreamProtocol, Deferred[None] | None] = {}
        self._closing = False
        #: Exchanges waiting for a response head, by deadline, oldest first (the deadlines grow
        #: in this order: one timeout per pool). One timer for all of them (L{_expire}), not a
        #: C{callLater} and a C{cancel} per request.
        self._waiting: dict[UpstreamExchange, float] = {}
        self._timer: IDelayedCall | None = None

    def _watch(self, ex: UpstreamExchange) -> None:
        """C{ex} was sent: it fails with L{UpstreamTimeout} if no response head comes in time."""
        self._waiting[ex] = self.reactor.seconds() + self.responseTimeout
        if self._timer is None:
            self._timer = self.reactor.callLater(self.responseTimeout, self._expire)

    def _expire(self) -> None:
        """The timer: time out the exchanges whose deadline passed; wait for the next one."""
        self._timer = None
        now = self.reactor.seconds()
        waiting = self._waiting
        due = []
        for ex, deadline in waiting.items():
            if deadline > now:
                break
            due.append(ex)
        for ex in due:
            del waiting[ex]
            ex._timedOut()
        if waiting and self._timer is None:  # (a failure above may have armed it already)
            first = next(iter(waiting.values()))
            self._timer = self.reactor.callLater(max(0.0, first - now), self._expire)

    def request(self, data: bytes, sink: IResponseSink) -> UpstreamExchange:
        """
        Send one complete HTTP/1.1 request (head and body in C{data}); the response goes to C{sink}.
        """
        ex = UpstreamExchange(self, data, sink)
        self._dispatch(ex)
        return ex

    def _dispatch(self, ex: UpstreamExchange) -> None:
        now = self.reactor.seconds()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if now - conn.idleSince < IDLE_TIMEOUT and conn.transport is not None:
                conn.reused = True
                ex._attach(conn)
                return
            conn.transport.loseConnection()  # type: ignore[union-attr]
        self._connect(ex)

    def _connect(self, ex: UpstreamExchange) -> None:
        factory = _ConnectFactory(self, ex)
        if self.scheme == "https":
            self.reactor.connectSSL(
                self.host, self.port, factory, self._tlsOptions, timeout=self.connectTimeout
            )
        else:
            reactor: IReactorTCP = self.reactor
            reactor.connectTCP(self.host, self.port, factory, timeout=self.connectTimeout)

    def _track(self, conn: _UpstreamProtocol) -> None:
        self._all[conn] = None
        factory = conn.factory
        assert isinstance(factory, _ConnectFactory)
        ex = factory.exchange
        if ex.cancelled or ex.done:
            self._release(conn)
        else:
            ex._attach(conn)

    def _untrack(self, conn: _UpstreamProtocol) -> None:
        waiter = self._all.pop(conn, None)
        if conn in self._idle:
            self._idle.remove(conn)
        if waiter is not None:
            waiter.callback(None)

    def _release(self, conn: _UpstreamProtocol) -> None:
        transport: ITransport | None = conn.transport
        if transport is None:
            return
        if self._closing or len(self._idle) >= MAX_IDLE:
            transport.loseConnection()
            return
        transport.resumeProducing()  # type: ignore[attr-defined]
        conn.idleSince = self.reactor.seconds()
        self._idle.append(conn)

    @property
    def idleCount(self) -> int:
        """The number of idle keep-alive connections."""
        return len(self._idle)

    @property
    def connectionCount(self) -> int:
        """The number of open connections, idle or busy."""
        return len(self._all)

    def close(self) -> Deferred[Any]:
        """
        Close every connection (busy ones are aborted); fires when all are gone.
        """
        self._closing = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not self._all:
            return succeed(None)
        waits: list[Deferred[None]] = []
        for conn in list(self._all):
            d: Deferred[None] = Deferred()
            self._all[conn] = d
            waits.append(d)
            if conn.transport is not None:
                if conn.exchange is None:
                    conn.transport.loseConnection()
                else:
                    conn.transport.abortConnection()  # type: ignore[attr-defined]
        return DeferredList(waits)
