"""
The proxy end to end over real sockets: a blocking HTTP client -> the gateway -> a scripted
twisted.web upstream, all on 127.0.0.1.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from tests.support import GatewayTestCase, portOf, rpc


class ForwardingTests(GatewayTestCase):
    """JSON responses, headers both ways, keep-alive pooling."""

    @inlineCallbacks
    def test_jsonCallIsForwardedAndAnswered(self) -> Any:
        """A tools/call POST reaches the upstream byte for byte and its JSON answer comes back."""
        body = rpc("tools/call", {"name": "echo", "arguments": {"text": "hi"}}, id=7)
        reply = yield self.call(body=body, headers={"Mcp-Session-Id": "s-1"})
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["id"], 7)
        self.assertEqual(reply.json()["result"]["echo"], body.decode())
        self.assertEqual(self.upstream.seen[-1].body, body)
        self.assertEqual(reply.header("content-type"), ["application/json"])
        self.assertEqual(reply.header("mcp-session-id"), ["up-session"])

    @inlineCallbacks
    def test_endToEndHeadersPassHopByHopDropped(self) -> Any:
        """Session, protocol version and Last-Event-ID pass; hop-by-hop headers do not."""
        reply = yield self.call(
            body=rpc("ping"),
            headers={
                "Mcp-Session-Id": "s-42",
                "MCP-Protocol-Version": "2025-11-25",
                "Last-Event-ID": "ev-9",
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Client-Hop",
                "X-Client-Hop": "dropped",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Proxy-Authorization": "Basic Zm9v",
            },
        )
        self.assertEqual(reply.status, 200)
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.header("mcp-session-id"), ["s-42"])
        self.assertEqual(seen.header("mcp-protocol-version"), ["2025-11-25"])
        self.assertEqual(seen.header("last-event-id"), ["ev-9"])
        self.assertEqual(seen.header("x-custom"), ["kept"])
        for hop in ("x-client-hop", "keep-alive", "te", "proxy-authorization"):
            self.assertEqual(seen.header(hop), [], hop)
        # the response side: the upstream's hop-by-hop and Connection-nominated headers are dropped
        self.assertEqual(reply.header("x-upstream-only"), ["yes"])
        self.assertEqual(reply.header("x-hop"), [])
        self.assertEqual(reply.header("keep-alive"), [])

    @inlineCallbacks
    def test_upstreamGetsItsOwnHostAndForwardedHeaders(self) -> Any:
        """The upstream sees its own Host, X-Forwarded-* and the injected headers."""
        yield self.call(
            body=rpc("ping"),
            headers={
                "X-Forwarded-For": "10.1.1.1",
                "Authorization": "Bearer client",
                "X-Injected": "client",
            },
        )
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.header("host"), [f"127.0.0.1:{portOf(self.upstreamPort)}"])
        self.assertEqual(seen.header("x-forwarded-for"), ["10.1.1.1, 127.0.0.1"])
        self.assertEqual(seen.header("x-forwarded-proto"), ["http"])
        self.assertEqual(seen.header("x-forwarded-host"), [f"127.0.0.1:{self.port}"])
        self.assertEqual(seen.header("x-injected"), ["injected-value"])
        self.assertEqual(seen.header("authorization"), ["Bearer upstream-secret"])

    @inlineCallbacks
    def test_keepAliveConnectionIsReused(self) -> Any:
        """Sequential requests reuse one upstream connection from the pool."""
        for i in range(5):
            reply = yield self.call(body=rpc("ping", id=i))
            self.assertEqual(reply.status, 200)
        ports = {s.peer for s in self.upstream.seen}
        self.assertEqual(len(ports), 1, ports)

    @inlineCallbacks
    def test_queryStringIsForwarded(self) -> Any:
        """The client's query string reaches the upstream."""
        yield self.call(path="/mcp?mode=json&x=1", body=rpc("ping"))
        self.assertEqual(self.upstream.seen[-1].uri, "/mcp?mode=json&x=1")

    @inlineCallbacks
    def test_getAndDeleteAreForwarded(self) -> Any:
        """GET (server stream) and DELETE (end session) go to the upstream with the session id."""
        reply = yield self.call("GET", "/mcp?mode=sse&n=2", headers={"Mcp-Session-Id": "s-5"})
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.upstream.seen[-1].method, "GET")
        self.assertIn(b'data: {"n": 1}', reply.body)
        reply = yield self.call(
            "DELETE", "/mcp?mode=status&code=204", headers={"Mcp-Session-Id": "s-5"}
        )
        self.assertEqual(reply.status, 204)
        self.assertEqual(self.upstream.seen[-1].method, "DELETE")
        self.assertEqual(self.upstream.seen[-1].header("mcp-session-id"), ["s-5"])

    @inlineCallbacks
    def test_notificationGets202(self) -> Any:
        """A 202 without a body (notification accepted) passes through."""
        reply = yield self.call(
            path="/mcp?mode=status&code=202",
            body=b'{"jsonrpc": "2.0", "method": "notifications/initialized"}',
        )
        self.assertEqual(reply.status, 202)
        self.assertEqual(reply.body, b"")

    @inlineCallbacks
    def test_batchIsForwarded(self) -> Any:
        """A JSON-RPC batch array is accepted and forwarded unchanged."""
        body = b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}]'
        reply = yield self.call(body=body)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.upstream.seen[-1].body, body)
        line = self.auditLines()[-1]
        self.assertEqual(line["batch_size"], 2)
        self.assertEqual(line["method"], "ping")

    @inlineCallbacks
    def test_largeBodyStreamsWithLength(self) -> Any:
        """A large response keeps the upstream's Content-Length and arrives complete."""
        reply = yield self.call(path="/mcp?mode=big&size=3000000", body=rpc("ping"))
        self.assertEqual(reply.status, 200)
        self.assertEqual(len(reply.body), 3000000)
        self.assertEqual(reply.header("content-length"), ["3000000"])
        self.assertEqual(self.auditLines()[-1]["bytes_out"], 3000000)


class StreamingTests(GatewayTestCase):
    """SSE is relayed event by event, and a client that leaves cancels the upstream."""

    @inlineCallbacks
    def test_sseEventsArriveBeforeTheStreamEnds(self) -> Any:
        """Each event reaches the client when the upstream sends it, not at the end."""
        reply = yield self.call(
            path="/mcp?mode=sse&n=4&gap=0.3", body=rpc("tools/call", {"name": "slow"})
        )
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("x-accel-buffering"), ["no"])
        self.assertEqual(reply.header("content-type"), ["text/event-stream"])
        data = [(t - reply.started, line) for t, line in reply.chunks if line.startswith(b"data:")]
        self.assertEqual(len(data), 4)
        # the first event came ~0.9 s before the last one: nothing was buffered
        self.assertGreater(data[-1][0] - data[0][0], 0.6)
        end = self.upstream.finishedStreams[-1]
        self.assertLess(data[0][0] + reply.started, end - 0.5)

    @inlineCallbacks
    def test_upstreamAccelBufferingIsNotDuplicated(self) -> Any:
        """An upstream that sends X-Accel-Buffering itself keeps its single header."""
        reply = yield self.call(path="/mcp?mode=sse&n=1&accel=yes", body=rpc("ping"))
        self.assertEqual(reply.header("x-accel-buffering"), ["yes"])

    @inlineCallbacks
    def test_clientGoneCancelsUpstream(self) -> Any:
        """A client that disconnects mid-stream makes the gateway drop the upstream stream at once."""

        def readOneEventAndLeave() -> float:
            s = socket.create_connection(("127.0.0.1", self.port))
            s.sendall(
                b"GET /mcp?mode=sse&n=100&gap=0.1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Accept: text/event-stream\r\n\r\n"
            )
            buf = b""
            while b"data:" not in buf:
                buf += s.recv(4096)
            s.close()
            return time.monotonic()

        left = yield threads.deferToThread(readOneEventAndLeave)
        for _ in range(50):
            if self.upstream.cancelled:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(self.upstream.cancelled, "upstream stream was not cancelled")
        self.assertLess(self.upstream.cancelled[0] - left, 0.5)
        self.assertEqual(self.upstream.finishedStreams, [])
        line = self.auditLines()[-1]
        self.assertEqual(line["error"], "client_closed")
        self.assertEqual(line["http_method"], "GET")

    @inlineCallbacks
    def test_slowClientBackpressure(self) -> Any:
        """
        A client that does not read pauses the upstream (backpressure) instead of the gateway
        buffering the whole response; when the client leaves, the upstream is dropped.
        """
        total = 200 * 1024 * 1024

        def slowReader() -> int:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", self.port))
            body = b'{"jsonrpc":"2.0","id":1,"method":"x"}'
            s.sendall(
                b"POST /mcp?mode=produce&size=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (total, len(body), body)
            )
            s.recv(1024)
            time.sleep(1.5)
            produced = self.upstream.produced
            s.close()
            return produced

        produced = yield threads.deferToThread(slowReader)
        # socket buffers hold a few MiB at most; without backpressure all 200 MiB would be sent
        self.assertLess(produced, 32 * 1024 * 1024)
        for _ in range(100):
            if self.upstream.cancelled:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(self.upstream.cancelled)


class ErrorTests(GatewayTestCase):
    """Each error the gateway produces: JSON-RPC body, right status, an audit line."""

    def assertRpcError(
        self, reply: Any, status: int, code: int, message: str, id: Any = None
    ) -> None:
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.header("content-type"), ["application/json"])
        body = reply.json()
        self.assertEqual(body["jsonrpc"], "2.0")
        self.assertEqual(body["id"], id)
        self.assertEqual(body["error"]["code"], code)
        self.assertEqual(body["error"]["message"], message)

    @inlineCallbacks
    def test_parseError(self) -> Any:
        """A body that is not JSON gets 400 -32700 and never reaches the upstream."""
        reply = yield self.call(body=b"{not json")
        self.assertRpcError(reply, 400, -32700, "parse_error")
        self.assertEqual(self.upstream.seen, [])
        line = self.auditLines()[-1]
        self.assertEqual((line["status"], line["error"]), (400, "parse_error"))

    @inlineCallbacks
    def test_notJsonRpc(self) -> Any:
        """JSON that is not a JSON-RPC message gets 400 -32600 (with the id when there is one)."""
        reply = yield self.call(body=b'{"jsonrpc": "1.0", "id": 5, "method": "x"}')
        self.assertRpcError(reply, 400, -32600, "invalid_request", id=5)
        reply = yield self.call(body=b"[]")
        self.assertRpcError(reply, 400, -32600, "invalid_request")
        reply = yield self.call(body=b'"just a string"')
        self.assertRpcError(reply, 400, -32600, "invalid_request")
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_unknownPath(self) -> Any:
        """A path with no upstream gets 404, with the request's id; the audit line names the call."""
        body = rpc("tools/call", {"name": "echo", "arguments": {}}, id=31)
        reply = yield self.call(path="/nope", body=body)
        self.assertRpcError(reply, 404, -32004, "not_found", id=31)
        line = self.auditLines()[-1]
        self.assertEqual(
            (line["status"], line["method"], line["tool"], line["jsonrpc_id"]),
            (404, "tools/call", "echo", 31),
        )

    @inlineCallbacks
    def test_methodNotAllowed(self) -> Any:
        """PUT on an MCP path gets 405 with Allow."""
        reply = yield self.call("PUT", body=rpc("ping"))
        self.assertRpcError(reply, 405, -32005, "method_not_allowed")
        self.assertEqual(reply.header("allow"), ["GET, POST, DELETE"])

    @inlineCallbacks
    def test_bodyTooLargeFromContentLength(self) -> Any:
        """A Content-Length over the limit gets 413 before the body is read."""

        def send() -> bytes:
            s = socket.create_connection(("127.0.0.1", self.port))
            s.sendall(
                b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 99999999\r\n\r\n"
            )
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            return data

        raw = yield threads.deferToThread(send)
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertIn(b'"payload_too_large"', raw)
        self.assertEqual(self.upstream.seen, [])
        self.assertEqual(self.auditLines()[-1]["status"], 413)

    @inlineCallbacks
    def test_bodyTooLargeChunked(self) -> Any:
        """A chunked body that grows past the limit gets 413 while it is read."""

        def send() -> bytes:
            s = socket.create_connection(("127.0.0.1", self.port))
            s.sendall(
                b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"x" * 65536
            data = b""
            try:
                for _ in range(100):
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                pass
            s.settimeout(5)
            try:
                while True:
                    got = s.recv(65536)
                    if not got:
                        break
                    data += got
            except OSError:
                pass
            s.close()
            return data

        raw = yield threads.deferToThread(send)
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:200])
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_upstreamRefused502(self) -> Any:
        """An upstream that refuses connections gets 502."""
        yield self.upstreamPort.stopListening()
        reply = yield self.call(body=rpc("ping", id="a"))
        self.assertRpcError(reply, 502, -32010, "upstream_unavailable", id="a")
        self.assertEqual(self.auditLines()[-1]["error"], "upstream_unavailable")

    @inlineCallbacks
    def test_responseTimeout504(self) -> Any:
        """No first byte within timeouts.response (1 s here) gets 504."""
        reply = yield self.call(path="/mcp?mode=hang", body=rpc("ping", id=3))
        self.assertRpcError(reply, 504, -32011, "upstream_timeout", id=3)

    @inlineCallbacks
    def test_longStreamIsNotCutByResponseTimeout(self) -> Any:
        """A stream running longer than timeouts.response (1 s) is not cut once it started."""
        reply = yield self.call(path="/mcp?mode=sse&n=6&gap=0.3", body=rpc("ping"))
        self.assertEqual(reply.status, 200)
        self.assertEqual(len([c for _, c in reply.chunks if c.startswith(b"data:")]), 6)

    @inlineCallbacks
    def test_resetMidStreamTruncates(self) -> Any:
        """An upstream reset mid-stream closes the client connection (no clean end) and is audited."""
        reply = yield self.call(path="/mcp?mode=reset", body=rpc("ping")).addErrback(lambda f: f)
        if hasattr(reply, "status"):
            self.assertEqual(reply.status, 200)
        for _ in range(50):
            lines = self.auditLines()
            if lines:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(self.auditLines()[-1]["error"], "upstream_reset")

    @inlineCallbacks
    def test_connectTimeout502(self) -> Any:
        """An upstream address that never answers the connect gets 502 after timeouts.connect."""
        # A listening socket whose accept queue is full: the kernel drops further SYNs, so the
        # gateway's connect can only time out.
        blackhole = socket.socket()
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        self.addCleanup(blackhole.close)
        port = blackhole.getsockname()[1]
        fillers = []
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        for f in fillers:
            self.addCleanup(f.close)
        yield self.service.stopService()
        text = (
            self.configText()
            .replace(f"127.0.0.1:{portOf(self.upstreamPort)}", f"127.0.0.1:{port}")
            .replace("connect: 2", "connect: 0.5")
        )
        yield self.startGateway(text)
        started = time.monotonic()
        reply = yield self.call(body=rpc("ping", id=None))
        self.assertRpcError(reply, 502, -32010, "upstream_unavailable")
        self.assertIn("no connection within 0.5s", reply.json()["error"]["data"]["detail"])
        self.assertLess(time.monotonic() - started, 5)


class HostOriginTests(GatewayTestCase):
    """DNS-rebinding protection on a loopback listener with default lists."""

    @inlineCallbacks
    def test_foreignHostIsRefused(self) -> Any:
        """
        A Host that is not a loopback name gets 403 with the request's id, the upstream is not
        contacted, and the audit line names the method.
        """
        reply = yield self.call(body=rpc("ping", id=1), headers={"Host": "evil.example:80"})
        self.assertEqual(reply.status, 403)
        self.assertEqual(reply.json()["error"]["message"], "host_not_allowed")
        self.assertEqual(reply.json()["id"], 1)
        self.assertEqual(self.upstream.seen, [])
        line = self.auditLines()[-1]
        self.assertEqual((line["status"], line["method"], line["jsonrpc_id"]), (403, "ping", 1))

    @inlineCallbacks
    def test_loopbackHostAndOriginAreAccepted(self) -> Any:
        """localhost with any port and a loopback Origin pass."""
        reply = yield self.call(
            body=rpc("ping"), headers={"Host": "localhost:1234", "Origin": "http://localhost:3000"}
        )
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_foreignOriginIsRefused(self) -> Any:
        """An Origin that is not a loopback origin gets 403, with the id; the audit names the tool."""
        body = rpc("tools/call", {"name": "echo", "arguments": {}}, id=8)
        reply = yield self.call(body=body, headers={"Origin": "https://evil.example"})
        self.assertEqual(reply.status, 403)
        self.assertEqual(reply.json()["error"]["message"], "origin_not_allowed")
        self.assertEqual(reply.json()["id"], 8)
        self.assertEqual(self.upstream.seen, [])
        line = self.auditLines()[-1]
        self.assertEqual(
            (line["method"], line["tool"], line["jsonrpc_id"]), ("tools/call", "echo", 8)
        )


class ConfiguredHostsTests(GatewayTestCase):
    """Explicit allowed_hosts / allowed_origins."""

    extraConfig = ""

    def configText(self) -> str:
        return (
            super()
            .configText()
            .replace(
                "listen: {host: 127.0.0.1, port: 0}",
                "listen: {host: 127.0.0.1, port: 0, allowed_hosts: [gw.example.com, 'api.example.com:8443'],"
                " allowed_origins: ['https://app.example.com']}",
            )
        )

    @inlineCallbacks
    def test_configuredLists(self) -> Any:
        """Only the listed hosts (any port for bare names) and origins pass."""
        ok = yield self.call(
            body=rpc("ping"),
            headers={"Host": "gw.example.com:9999", "Origin": "https://app.example.com"},
        )
        self.assertEqual(ok.status, 200)
        ok = yield self.call(body=rpc("ping"), headers={"Host": "api.example.com:8443"})
        self.assertEqual(ok.status, 200)
        bad = yield self.call(body=rpc("ping"), headers={"Host": "api.example.com:9000"})
        self.assertEqual(bad.status, 403)
        bad = yield self.call(body=rpc("ping"), headers={"Host": "localhost"})
        self.assertEqual(bad.status, 403)
        bad = yield self.call(
            body=rpc("ping"), headers={"Host": "gw.example.com", "Origin": "http://localhost"}
        )
        self.assertEqual(bad.status, 403)


class HealthTests(GatewayTestCase):
    """/healthz and /readyz."""

    @inlineCallbacks
    def test_healthz(self) -> Any:
        """/healthz answers 200 while the process runs."""
        reply = yield self.call("GET", "/healthz")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json(), {"status": "ok"})

    @inlineCallbacks
    def test_readyzFollowsUpstream(self) -> Any:
        """/readyz is 200 while the upstream is reachable, 503 after it went away (cache expired)."""
        reply = yield self.call("GET", "/readyz")
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.json()["upstreams"]["up"]["reachable"], True)
        yield self.upstreamPort.stopListening()
        self.service.readiness._cached = None  # what 5 s of waiting would do
        reply = yield self.call("GET", "/readyz")
        self.assertEqual(reply.status, 503)
        self.assertEqual(reply.json()["upstreams"]["up"]["reachable"], False)


class AuditTests(GatewayTestCase):
    """The audit line's fields."""

    @inlineCallbacks
    def test_auditLineHasEveryField(self) -> Any:
        """One line per request, every DESIGN.md field present, values from the request."""
        body = rpc("tools/call", {"name": "echo", "arguments": {}}, id=11)
        reply = yield self.call(
            body=body, headers={"Mcp-Session-Id": "sess-1", "MCP-Protocol-Version": "2025-06-18"}
        )
        lines = self.auditLines()
        self.assertEqual(len(lines), 1)
        line = lines[0]
        for key in (
            "ts",
            "request_id",
            "session_id",
            "client_ip",
            "method",
            "tool",
            "upstream",
            "decision",
            "rule_id",
            "error",
            "auth_key_id",
            "auth_result",
            "bytes_in",
            "bytes_out",
            "status",
            "duration_ms",
            "transport",
        ):
            self.assertIn(key, line)
        self.assertRegex(line["ts"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(line["session_id"], "sess-1")
        self.assertEqual(line["client_ip"], "127.0.0.1")
        self.assertEqual(line["method"], "tools/call")
        self.assertEqual(line["tool"], "echo")
        self.assertEqual(line["upstream"], "up")
        self.assertEqual(line["decision"], "allow")
        self.assertIsNone(line["rule_id"])
        self.assertIsNone(line["error"])
        self.assertIsNone(line["auth_key_id"])
        self.assertEqual(line["auth_result"], "external")
        self.assertEqual(line["bytes_in"], len(body))
        self.assertEqual(line["bytes_out"], len(reply.body))
        self.assertEqual(line["status"], 200)
        self.assertIsInstance(line["duration_ms"], float)
        self.assertEqual(line["transport"], "http")
        self.assertEqual(line["jsonrpc_id"], 11)
        self.assertEqual(line["protocol_version"], "2025-06-18")
        self.assertEqual(len(line["request_id"]), 24)

    @inlineCallbacks
    def test_sessionIdFromResponse(self) -> Any:
        """On initialize the session id the upstream assigns is audited."""
        yield self.call(body=rpc("initialize", {}))
        self.assertEqual(self.auditLines()[-1]["session_id"], "up-session")
