"""
Lifecycle of the gateway service: graceful stop (drain), SIGHUP reload and audit reopen.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from tests.support import GatewayTestCase, request, rpc


class DrainTests(GatewayTestCase):
    """SIGTERM semantics: stop accepting, finish what is in flight, then close."""

    @inlineCallbacks
    def test_inflightRequestFinishesDuringStop(self) -> Any:
        """A request in flight when the stop begins gets its full answer; new connects are refused."""
        port = self.port
        inflight = threads.deferToThread(
            request, port, "POST", "/mcp?mode=delay&s=0.6", rpc("ping", id=99), {}
        )
        yield deferLater(reactor, 0.2, lambda: None)
        stopping = self.service.stopService()
        yield deferLater(reactor, 0.05, lambda: None)

        def connectRefused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        refused = yield threads.deferToThread(connectRefused)
        self.assertTrue(refused)
        reply = yield inflight
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["id"], 99)
        yield stopping
        lines = self.auditLines()
        self.assertEqual([line["status"] for line in lines], [200])

    @inlineCallbacks
    def test_serverStreamsEndAtStop(self) -> Any:
        """An open GET server stream is ended at once by a stop (clients resume it)."""
        stream = threads.deferToThread(
            request, self.port, "GET", "/mcp?mode=sse&n=1000&gap=0.1", None, {}
        )
        yield deferLater(reactor, 0.3, lambda: None)
        yield self.service.stopService()
        reply = yield stream
        self.assertEqual(reply.status, 200)
        self.assertLess(len([c for _, c in reply.chunks if c.startswith(b"data:")]), 20)
        self.assertEqual(self.auditLines()[-1]["http_method"], "GET")


class ReloadTests(GatewayTestCase):
    """SIGHUP: reopen the audit file and swap in a new generation."""

    reloadable = True

    @inlineCallbacks
    def test_auditFileIsReopenedOnReload(self) -> Any:
        """After logrotate renames the file, a reload makes new lines go to a new file."""
        yield self.call(body=rpc("ping", id=1))
        os.rename(self.auditPath, self.auditPath + ".1")
        yield self.call(body=rpc("ping", id=2))  # still the renamed file
        self.service.reload()
        yield self.call(body=rpc("ping", id=3))
        with open(self.auditPath + ".1") as f:
            self.assertEqual(len(f.readlines()), 2)
        self.assertEqual([line["jsonrpc_id"] for line in self.auditLines()], [3])

    @inlineCallbacks
    def test_reloadSwapsGenerationAndKeepsPool(self) -> Any:
        """A changed config becomes generation 2; an unchanged upstream keeps its connections."""
        yield self.call(body=rpc("ping"))
        pool = self.service.generation.routes[b"/mcp"].pool
        with open(self.configPath, "w") as f:
            f.write(self.configText().replace("X-Injected: injected-value", "X-Injected: v2"))
        self.service.reload()
        self.assertEqual(self.service.generation.number, 2)
        self.assertIs(self.service.generation.routes[b"/mcp"].pool, pool)
        yield self.call(body=rpc("ping"))
        self.assertEqual(self.upstream.seen[-1].header("x-injected"), ["v2"])
        self.assertEqual(len({s.peer for s in self.upstream.seen}), 1)

    @inlineCallbacks
    def test_brokenConfigIsRejected(self) -> Any:
        """A reload with an invalid config keeps the current generation."""
        with open(self.configPath, "w") as f:
            f.write("listen: {port: 99999}\nupstreams: []\n")
        self.service.reload()
        self.assertEqual(self.service.generation.number, 1)
        reply = yield self.call(body=rpc("ping"))
        self.assertEqual(reply.status, 200)


class ReusePortTests(GatewayTestCase):
    """listen.reuse_port lets several gateway processes share one port."""

    def configText(self) -> str:
        return (
            super().configText().replace("port: 0}", f"port: {self.fixedPort}, reuse_port: true}}")
        )

    def setUp(self) -> Any:
        from tests.support import freePort

        self.fixedPort = freePort()
        return super().setUp()

    @inlineCallbacks
    def test_twoServicesShareThePort(self) -> Any:
        """A second service binds the same port with SO_REUSEPORT, and both serve."""
        from mcpgw.config import config_from_string
        from mcpgw.tap import makeService

        second = makeService(
            {"config": None, "loaded": config_from_string(self.configText(), base_dir=self.tmp)},
            reactor,
        )
        second.startService()
        self.addCleanup(second.stopService)
        self.assertEqual(second.port.getHost().port, self.fixedPort)
        reply = yield self.call(body=rpc("ping"))
        self.assertEqual(reply.status, 200)


class CompositionTests(GatewayTestCase):
    """makeService is the one composition root; a reload is published, not polled for."""

    reloadable = True

    def test_everyServiceIsAChild(self) -> None:
        """
        Audit, sinks, Argon2 pool, telemetry, license, tool pinning, reloader and listener, in
        start order.
        """
        self.assertEqual(
            [child.name for child in self.service],
            [
                "audit",
                "shipping",
                "argon2",
                "telemetry",
                "license",
                "pinning",
                "reloader",
                "listener",
            ],
        )
        self.assertTrue(all(child.running for child in self.service))

    def test_reloadIsPublished(self) -> None:
        """A reload hands the new generation to every subscriber in the same turn."""
        seen: list[Any] = []
        self.service.reloader.subscribe(seen.append)
        before = self.service.generation
        self.service.reload()
        self.assertEqual([g.number for g in seen], [before.number + 1])
        self.assertIs(self.service.generation, seen[0])

    @inlineCallbacks
    def test_stopOrder(self) -> Any:
        """Children stop one after another: listener (drain) first, the audit file before sinks."""
        stopped: list[str] = []
        for child in self.service:
            original = child.stopService

            def record(original: Any = original, name: str = child.name) -> Any:
                stopped.append(name)
                return original()

            child.stopService = record
        yield self.service.stopService()
        self.assertEqual(
            stopped,
            [
                "listener",
                "reloader",
                "pinning",
                "license",
                "audit",
                "shipping",
                "telemetry",
                "argon2",
            ],
        )
