"""
The listener's own HTTP/1.1 server protocol (L{mcpgw.proxy.server}), through the real gateway
over raw sockets: pipelining answered in order, C{Expect: 100-continue}, keep-alive and
C{Connection: close}, HTTP/1.0, chunked request bodies (trailers never merged), the parser's
smuggling defences, header limits and the idle timeout. Every refusal is a JSON-RPC error,
audited, and the upstream never sees the request.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks

from tests.support import GatewayTestCase, rpc


class RawResponse:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """A socket and a reader of whole responses (Content-Length, chunked or until close)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        # Refused early, the gateway may close its side first: the answer is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("closed before a full line")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("closed before the end of the body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self, head: bool = False) -> RawResponse:
        status = int(self._line().split(b" ", 2)[1])
        headers = []
        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.partition(b":")
            headers.append((name.decode().strip(), value.decode().strip()))
        reply = RawResponse(status, headers, b"")
        if head or status in (100, 204, 304):
            return reply
        if reply.header("content-length"):
            reply.body = self._exact(int(reply.header("content-length")[0]))
        elif reply.header("transfer-encoding") == ["chunked"]:
            parts = []
            while True:
                size = int(self._line(), 16)
                if size == 0:
                    self._line()
                    break
                parts.append(self._exact(size))
                self._line()
            reply.body = b"".join(parts)
        else:
            while self._fill():
                pass
            reply.body, self.buf = self.buf, b""
        return reply

    def closed(self) -> bool:
        """The gateway closed the connection (nothing more to read)."""
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False

    def close(self) -> None:
        self.sock.close()


def post(body: bytes, path: str = "/mcp", extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Accept: application/json, text/event-stream\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


HEAD = (
    "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    "Accept: application/json, text/event-stream\r\n"
)


class ServerProtocolTests(GatewayTestCase):
    def inThread(self, f: Any, *args: Any) -> Any:
        return threads.deferToThread(f, *args)

    def client(self) -> RawClient:
        c = RawClient(self.port)
        self.addCleanup(c.close)
        return c

    def assertAuditedRefusal(self, reply: RawResponse, status: int, message: str) -> None:
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.header("content-type"), ["application/json"])
        self.assertEqual(reply.json()["error"]["message"], message)
        self.assertEqual(self.upstream.seen, [])
        line = self.auditLines()[-1]
        self.assertEqual((line["status"], line["error"]), (status, message))

    @inlineCallbacks
    def test_pipelinedRequestsAnsweredInOrder(self) -> Any:
        """
        Three requests in one write, the first slow: the answers come in request order, each
        with its own id, and the upstream sees the second only after the first was answered.
        """

        def run() -> list[RawResponse]:
            c = self.client()
            c.send(
                post(rpc("tools/call", {"name": "a"}, id=1), path="/mcp?mode=delay&s=0.3")
                + post(rpc("tools/call", {"name": "b"}, id=2))
                + post(rpc("tools/call", {"name": "c"}, id=3))
            )
            return [c.response() for _ in range(3)]

        replies = yield self.inThread(run)
        self.assertEqual([r.status for r in replies], [200, 200, 200])
        self.assertEqual([json.loads(r.body)["id"] for r in replies], [1, 2, 3])
        self.assertEqual(
            [json.loads(s.body)["params"]["name"] for s in self.upstream.seen], ["a", "b", "c"]
        )
        self.assertEqual([line["jsonrpc_id"] for line in self.auditLines()], [1, 2, 3])

    @inlineCallbacks
    def test_pipelinedRefusalWaitsItsTurn(self) -> Any:
        """A pipelined request refused by the parser is answered after the earlier answer."""

        def run() -> list[RawResponse]:
            c = self.client()
            c.send(
                post(rpc("tools/call", {"name": "a"}, id=1), path="/mcp?mode=delay&s=0.2")
                + b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            first = c.response()
            second = c.response()
            self.assertTrue(c.closed())
            return [first, second]

        first, second = yield self.inThread(run)
        self.assertEqual((first.status, first.json()["id"]), (200, 1))
        self.assertEqual(second.status, 400)
        self.assertEqual(second.json()["error"]["message"], "bad_request")
        self.assertEqual(len(self.upstream.seen), 1)
        self.assertEqual(sorted(line["status"] for line in self.auditLines()), [200, 400])

    @inlineCallbacks
    def test_keepAlive(self) -> Any:
        """Requests on one HTTP/1.1 connection reuse it; the answer says nothing of closing."""

        def run() -> list[RawResponse]:
            c = self.client()
            out = []
            for i in range(3):
                c.send(post(rpc("ping", id=i)))
                out.append(c.response())
            return out

        replies = yield self.inThread(run)
        self.assertEqual([r.status for r in replies], [200] * 3)
        self.assertEqual([r.header("connection") for r in replies], [[]] * 3)
        self.assertEqual(len({s.peer for s in self.upstream.seen}), 1)

    @inlineCallbacks
    def test_connectionClose(self) -> Any:
        """C{Connection: close}: the answer says so and the connection is closed after it."""

        def run() -> tuple[RawResponse, bool]:
            c = self.client()
            c.send(post(rpc("ping"), extra="Connection: close\r\n"))
            return c.response(), c.closed()

        reply, closed = yield self.inThread(run)
        self.assertEqual((reply.status, reply.header("connection")), (200, ["close"]))
        self.assertTrue(closed)

    @inlineCallbacks
    def test_http10(self) -> Any:
        """HTTP/1.0: answered (never chunked) and the connection closed after the answer."""

        def run() -> tuple[RawResponse, bool]:
            c = self.client()
            c.send(
                post(
                    rpc("tools/call", {"name": "echo"}),
                    path="/mcp?mode=answer&chunks=3",
                    version="1.0",
                )
            )
            return c.response(), c.closed()

        reply, closed = yield self.inThread(run)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("transfer-encoding"), [])
        self.assertEqual(reply.header("connection"), ["close"])
        self.assertEqual(reply.json()["id"], 1)
        self.assertTrue(closed)

    @inlineCallbacks
    def test_chunkedAnswerWithoutLength(self) -> Any:
        """An upstream answer without Content-Length goes to an HTTP/1.1 client chunked."""

        def run() -> RawResponse:
            c = self.client()
            c.send(post(rpc("tools/call", {"name": "echo"}), path="/mcp?mode=answer&chunks=3"))
            return c.response()

        reply = yield self.inThread(run)
        self.assertEqual(reply.header("transfer-encoding"), ["chunked"])
        self.assertEqual(reply.json()["id"], 1)

    @inlineCallbacks
    def test_expectContinue(self) -> Any:
        """C{Expect: 100-continue}: C{100 Continue} first, then the answer once the body came."""
        body = rpc("tools/call", {"name": "echo"})

        def run() -> tuple[RawResponse, RawResponse]:
            c = self.client()
            c.send((HEAD + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode())
            interim = c.response()
            c.send(body)
            return interim, c.response()

        interim, reply = yield self.inThread(run)
        self.assertEqual(interim.status, 100)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.upstream.seen[0].body, body)

    @inlineCallbacks
    def test_expectContinueRefused(self) -> Any:
        """A body over the limit with C{Expect: 100-continue}: 413 at once, never a 100."""

        def run() -> tuple[RawResponse, bool]:
            c = self.client()
            c.send((HEAD + "Content-Length: 99999999\r\nExpect: 100-continue\r\n\r\n").encode())
            return c.response(), c.closed()

        reply, closed = yield self.inThread(run)
        self.assertAuditedRefusal(reply, 413, "payload_too_large")
        self.assertTrue(closed)

    @inlineCallbacks
    def test_chunkedRequestBodyTrailersIgnored(self) -> Any:
        """
        A chunked request body reaches the upstream whole; a trailer field is not merged into
        the headers (so it cannot smuggle an C{Authorization} or an C{Mcp-Method}).
        """
        body = rpc("tools/call", {"name": "echo", "arguments": {"x": "y" * 100}})
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:10], body[10:]))

        def run() -> RawResponse:
            c = self.client()
            c.send(
                (HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode()
                + chunked
                + b"0\r\nX-Smuggled: yes\r\n\r\n"
            )
            return c.response()

        reply = yield self.inThread(run)
        self.assertEqual(reply.status, 200, reply.body)
        seen = self.upstream.seen[0]
        self.assertEqual(seen.body, body)
        self.assertNotIn("x-smuggled", [k.lower() for k, _ in seen.headers])

    @inlineCallbacks
    def test_smugglingShapesRefused(self) -> Any:
        """Each ambiguous framing is a 400 bad_request, audited, the connection closed."""
        shapes = [
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            b"Transfer-Encoding: gzip, chunked, identity\r\n\r\n",
            b"X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
            b"Content-Length : 0\r\n\r\n",
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            b"Content-Length: -1\r\n\r\n",
        ]

        def run(extra: bytes) -> tuple[RawResponse, bool]:
            c = self.client()
            c.send(HEAD.encode() + extra)
            return c.response(), c.closed()

        for shape in shapes:
            reply, closed = yield self.inThread(run, shape)
            self.assertAuditedRefusal(reply, 400, "bad_request")
            self.assertTrue(closed, shape)
        self.assertEqual(len(self.auditLines()), len(shapes))

    @inlineCallbacks
    def test_garbageAnsweredNotAudited(self) -> Any:
        """Bytes that are no request line at all: a 400 JSON-RPC error and close."""

        def run() -> RawResponse:
            c = self.client()
            c.send(b"\x16\x03\x01\x02\x00 not http\r\n\r\n")
            return c.response()

        reply = yield self.inThread(run)
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.json()["error"]["message"], "bad_request")

    @inlineCallbacks
    def test_headersTooLarge(self) -> Any:
        """Headers over C{limits.max_header_bytes}, whole or a piece at a time: 431, audited."""

        def oneWrite() -> RawResponse:
            c = self.client()
            c.send((HEAD + "X-Big: " + "a" * 70000 + "\r\n\r\n").encode())
            return c.response()

        def trickle() -> RawResponse:
            c = self.client()
            c.send((HEAD + "X-Big: ").encode())
            for _ in range(40):
                c.send(b"a" * 4096)
                time.sleep(0.005)
            return c.response()

        for f in (oneWrite, trickle):
            reply = yield self.inThread(f)
            self.assertAuditedRefusal(reply, 431, "headers_too_large")

    @inlineCallbacks
    def test_tooManyHeaders(self) -> Any:
        def run() -> RawResponse:
            c = self.client()
            c.send((HEAD + "".join(f"X-{i}: v\r\n" for i in range(300)) + "\r\n").encode())
            return c.response()

        reply = yield self.inThread(run)
        self.assertAuditedRefusal(reply, 431, "headers_too_large")

    @inlineCallbacks
    def test_idleConnectionClosed(self) -> Any:
        """A keep-alive connection idle past the idle timeout is closed by the sweep."""
        self.service.listener.site.idleTimeout = 0.5

        def run() -> tuple[RawResponse, float]:
            c = self.client()
            c.send(post(rpc("ping")))
            reply = c.response()
            started = time.monotonic()
            self.assertTrue(c.closed())
            return reply, time.monotonic() - started

        reply, waited = yield self.inThread(run)
        self.assertEqual(reply.status, 200)
        self.assertLess(waited, 4.5)
        self.assertEqual(self.service.gateway.connections, set())
