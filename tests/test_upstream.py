"""
The upstream client against a raw HTTP/1.1 server whose misbehaviour is scripted per connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mcpgw.interfaces import IResponseSink, IUpstreamPool
from mcpgw.proxy.upstream import UpstreamPool
from mcpgw.testing import RecordingSink
from tests.support import portOf

REQUEST = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


class RawServer(Protocol):
    """Answers each request per the factory's script: a list of actions per connection."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.index = 0
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf and self.buf.endswith(b"{}"):
            self.buf = b""
            self.factory.requests += 1
            action = self.factory.script(self.factory.connections, self.index)
            self.index += 1
            assert self.transport is not None
            if action == "ok":
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif action == "close":
                self.transport.loseConnection()
            elif action == "eof-body":
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart1")
                reactor.callLater(0.05, self.transport.write, b"part2")
                reactor.callLater(0.1, self.transport.loseConnection)
            elif action == "garbage":
                self.transport.write(b"NOT HTTP AT ALL\r\n\r\n")
            elif action == "late":
                reactor.callLater(
                    0.4, self.transport.write, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                )
            # "silent": no answer at all


class PoolTests(TestCase):
    def serve(self, script: Any, responseTimeout: float = 2.0) -> UpstreamPool:
        f = Factory.forProtocol(RawServer)
        f.noisy = False
        f.connections = 0
        f.requests = 0
        f.script = script
        self.factory = f
        port = reactor.listenTCP(0, f, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        pool = UpstreamPool(
            reactor, "raw", "http", "127.0.0.1", portOf(port), 2.0, responseTimeout
        )
        self.addCleanup(pool.close)
        return pool

    def send(self, pool: UpstreamPool) -> Deferred[RecordingSink]:
        c = RecordingSink()
        pool.request(REQUEST, c)
        return c.done

    @inlineCallbacks
    def test_reuseAndRetryOnStaleConnection(self) -> Any:
        """A reused connection that closes without answering is retried once on a new one."""
        # connection 1 answers its first request and drops the second; connection 2 answers
        pool = self.serve(lambda conn, i: "ok" if i == 0 else "close")
        verifyObject(IUpstreamPool, pool)
        verifyObject(IResponseSink, RecordingSink())
        first = yield self.send(pool)
        self.assertEqual((first.status, first.body), (200, b"ok"))
        self.assertEqual(pool.idleCount, 1)
        second = yield self.send(pool)
        self.assertEqual((second.status, second.body, second.error), (200, b"ok", None))
        self.assertEqual((self.factory.connections, self.factory.requests), (2, 3))

    @inlineCallbacks
    def test_freshConnectionClosedIsNotRetried(self) -> Any:
        """A new connection that closes before answering is a 502, not retried."""
        pool = self.serve(lambda conn, i: "close")
        c = yield self.send(pool)
        self.assertEqual(c.error.status, 502)
        self.assertIn("before responding", c.error.detail)
        self.assertEqual(self.factory.requests, 1)

    @inlineCallbacks
    def test_closeDelimitedBody(self) -> Any:
        """A body without length or chunking ends with the connection, streamed as it comes."""
        pool = self.serve(lambda conn, i: "eof-body")
        c = yield self.send(pool)
        self.assertEqual((c.status, c.body, c.error), (200, b"part1part2", None))
        self.assertEqual(pool.idleCount, 0)

    @inlineCallbacks
    def test_invalidResponseIs502(self) -> Any:
        """Bytes that are not HTTP end in a 502 and the connection is not reused."""
        pool = self.serve(lambda conn, i: "garbage")
        c = yield self.send(pool)
        self.assertEqual(c.error.status, 502)
        self.assertEqual(pool.idleCount, 0)


    @inlineCallbacks
    def test_eachExchangeTimesOutAtItsOwnDeadline(self) -> Any:
        """
        One pool timer serves every exchange: each silent exchange fails with a 504 one
        response timeout after it was sent (not sooner, not all at once), an exchange whose
        answer comes in time is not failed, and nothing is left scheduled afterwards.
        """
        pool = self.serve(
            lambda conn, i: "late" if self.factory.requests == 2 else "silent", responseTimeout=0.6
        )
        started = reactor.seconds()
        first = self.send(pool)
        yield deferLater(reactor, 0.1, lambda: None)
        answered = self.send(pool)  # the second request: answered 0.4 s later, in time
        yield deferLater(reactor, 0.2, lambda: None)
        second = self.send(pool)
        c1 = yield first
        t1 = reactor.seconds() - started
        c2 = yield second
        t2 = reactor.seconds() - started
        ok = yield answered
        self.assertEqual((c1.error.status, c2.error.status), (504, 504))
        self.assertIn("no response within 0.6s", c1.error.detail)
        self.assertGreaterEqual(t1, 0.6)
        self.assertLess(t1, 0.85)  # timed out on its own deadline, not the later one's
        self.assertGreaterEqual(t2, 0.9)
        self.assertEqual((ok.status, ok.body, ok.error), (200, b"ok", None))
        yield pool.close()
        self.assertEqual(pool._waiting, {})
        self.assertIsNone(pool._timer)


class EagerWriteTests(TestCase):
    def test_fallsBackForOtherTransports(self) -> None:
        """Anything that is not a plain TCP transport gets an ordinary write()."""
        from twisted.internet.testing import StringTransport

        from mcpgw.proxy.eager import eagerWrite

        t = StringTransport()
        eagerWrite(t, b"abc")
        self.assertEqual(t.value(), b"abc")
