"""
Upstream faults through the real gateway: interim (1xx) responses never become a client's answer
and never leave a pooled connection carrying someone else's response; every framing error before
the response head is out is a 502 JSON-RPC error with the request's id, and audited.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks

from tests.faultupstream import listenFault
from tests.support import GatewayTestCase, Reply, request, rpc


def call(who: str, id: int) -> bytes:
    return rpc("tools/call", {"name": "echo", "arguments": {"who": who}}, id=id)


class FaultTestCase(GatewayTestCase):
    """A gateway in front of L{tests.faultupstream}."""

    def setUp(self) -> Any:
        self.fault, self.upstreamPort = listenFault()
        self.addCleanup(self.upstreamPort.stopListening)
        self.tmp = tempfile.mkdtemp(prefix="mcpgw-test-")
        self.auditPath = os.path.join(self.tmp, "audit.jsonl")
        return self.startGateway(self.configText())

    def post(self, fault: str, who: str, id: int) -> Any:
        return self.call(path=f"/mcp?fault={fault}", body=call(who, id))

    def assertOwnAnswer(self, reply: Reply, who: str, id: int) -> None:
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(
            reply.json(),
            {"jsonrpc": "2.0", "id": id, "result": {"who": who, "secret": f"{who}-PRIVATE"}},
        )

    def assertBadGateway(self, reply: Reply, id: int, kind: str = "upstream_bad_response") -> None:
        self.assertEqual(reply.status, 502, reply.body)
        body = reply.json()
        self.assertEqual(body["id"], id)
        code = {"upstream_bad_response": -32015, "upstream_unavailable": -32010}[kind]
        self.assertEqual(body["error"]["code"], code)
        self.assertEqual(body["error"]["message"], kind)
        self.assertEqual(reply.header("content-type"), ["application/json"])


class InterimResponseTests(FaultTestCase):
    @inlineCallbacks
    def test_interimThenNextClientGetsItsOwnAnswer(self) -> Any:
        """
        Client A's upstream answer starts with 103 Early Hints (or 100 Continue, or both): A gets
        its final answer, and client B, on another connection right after, gets B's own answer
        over the pooled upstream connection, never A's.
        """
        for i, fault in enumerate(("interim103", "continue100", "interims")):
            a = yield self.post(fault, "ALICE", 10 + i)
            b = yield self.post("none", "BOB", 20 + i)
            self.assertOwnAnswer(a, "ALICE", 10 + i)
            self.assertOwnAnswer(b, "BOB", 20 + i)
        # the interim responses did not cost a connection each: the pool kept one
        self.assertEqual(self.fault.connections, 1)
        lines = self.auditLines()
        self.assertEqual([ln["status"] for ln in lines], [200] * 6)

    @inlineCallbacks
    def test_concurrentLoadEachGetsOwnAnswer(self) -> Any:
        """Under a concurrent loop mixing interim answers and plain ones, nobody gets another's."""

        def run() -> list[tuple[str, int, Reply]]:
            jobs = []
            with ThreadPoolExecutor(8) as pool:
                for i in range(240):
                    who = f"client{i}"
                    fault = ("interim103", "none", "continue100", "none")[i % 4]
                    jobs.append(
                        (
                            who,
                            i,
                            pool.submit(
                                request, self.port, "POST", f"/mcp?fault={fault}", call(who, i), {}
                            ),
                        )
                    )
                return [(who, i, f.result()) for who, i, f in jobs]

        results = yield threads.deferToThread(run)
        for who, i, reply in results:
            self.assertOwnAnswer(reply, who, i)

    @inlineCallbacks
    def test_switchingProtocolsIs502(self) -> Any:
        """An upstream 101 is a 502 with the id; its connection is dropped, the next call works."""
        reply = yield self.post("switch101", "ALICE", 5)
        self.assertBadGateway(reply, 5)
        b = yield self.post("none", "BOB", 6)
        self.assertOwnAnswer(b, "BOB", 6)
        self.assertEqual(self.fault.connections, 2)
        line = self.auditLines()[0]
        self.assertEqual(
            (line["status"], line["error"], line["jsonrpc_id"]), (502, "upstream_bad_response", 5)
        )

    @inlineCallbacks
    def test_interimWithBodyIs502(self) -> Any:
        """A 1xx that declares a body (length or chunked) cannot be framed: 502, not reused."""
        for i, fault in enumerate(("interimbody", "interimchunked")):
            reply = yield self.post(fault, "ALICE", i)
            self.assertBadGateway(reply, i)
            b = yield self.post("none", "BOB", 100 + i)
            self.assertOwnAnswer(b, "BOB", 100 + i)
        self.assertEqual(self.fault.connections, 3)

    @inlineCallbacks
    def test_unsolicitedBytesAfterAnswerDropTheConnection(self) -> Any:
        """
        An upstream that sends a second response nobody asked for: the first client gets its
        answer, the connection is not pooled, and the next client gets its own answer.
        """
        a = yield self.post("extra", "ALICE", 1)
        self.assertOwnAnswer(a, "ALICE", 1)
        b = yield self.post("none", "BOB", 2)
        self.assertOwnAnswer(b, "BOB", 2)
        self.assertEqual(self.fault.connections, 2)


class FramingErrorTests(FaultTestCase):
    @inlineCallbacks
    def test_framingErrorsBeforeTheHeadAre502WithId(self) -> Any:
        """
        Bad chunking, garbage (C{upstream_bad_response}) and a body shorter than its
        Content-Length (C{upstream_unavailable}): a 502 JSON-RPC error with the id, audited.
        """
        faults = {
            "badchunk": "upstream_bad_response",
            "garbage": "upstream_bad_response",
            "short": "upstream_unavailable",
        }
        for i, (fault, kind) in enumerate(faults.items()):
            reply = yield self.post(fault, "ALICE", 40 + i)
            self.assertBadGateway(reply, 40 + i, kind)
        lines = self.auditLines()
        self.assertEqual(
            [
                (ln["status"], ln["error"], ln["jsonrpc_id"], ln["method"], ln["tool"])
                for ln in lines
            ],
            [(502, kind, 40 + i, "tools/call", "echo") for i, kind in enumerate(faults.values())],
        )
        b = yield self.post("none", "BOB", 50)
        self.assertOwnAnswer(b, "BOB", 50)

    @inlineCallbacks
    def test_framingErrorAfterTheHeadClosesAndAudits(self) -> Any:
        """
        A body already being relayed that breaks (bad chunking past the hold-back size; an SSE
        stream cut short): the client connection is closed without a complete answer, and the
        audit line says why.
        """
        for fault in ("bigbadchunk", "sseshort"):
            reply = yield threads.deferToThread(
                _rawPost, self.port, f"/mcp?fault={fault}", call("A", 1)
            )
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:100])
            self.assertNotIn(b"\r\n0\r\n\r\n", reply[-7:])  # no last chunk: truncated
        lines = self.auditLines()
        self.assertEqual([ln["error"] for ln in lines], ["upstream_bad_response", "upstream_reset"])


def _rawPost(port: int, path: str, body: bytes) -> bytes:
    """POST on a raw socket and read until the gateway closes the connection."""
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), len(body))
            + body
        )
        out = b""
        while True:
            data = s.recv(65536)
            if not data:
                return out
            out += data
    finally:
        s.close()
