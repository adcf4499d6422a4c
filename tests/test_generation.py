"""Generations: DNS-rebinding rules and route precomputation."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.config import ListenConfig, config_from_string
from mcpgw.errors import HostNotAllowed, OriginNotAllowed
from mcpgw.generation import HostGuard, buildGeneration, isLoopback


class HostGuardTests(SynchronousTestCase):
    def test_loopbackDefaults(self) -> None:
        """Loopback listener, no lists: loopback Host names (any port) and loopback origins."""
        g = HostGuard.fromConfig(ListenConfig(host="127.0.0.1"))
        for host in (b"127.0.0.1:8080", b"localhost", b"LOCALHOST:1", b"[::1]:8080"):
            g.check(host, None)
        g.check(b"localhost", b"http://127.0.0.1:5173")
        g.check(b"localhost", b"https://localhost")
        self.assertRaises(HostNotAllowed, g.check, b"evil.example", None)
        self.assertRaises(HostNotAllowed, g.check, None, None)
        self.assertRaises(OriginNotAllowed, g.check, b"localhost", b"http://evil.example")
        self.assertRaises(OriginNotAllowed, g.check, b"localhost", b"null")

    def test_publicListenerDefaults(self) -> None:
        """Non-loopback listener, no lists: any Host; any Origin is refused."""
        g = HostGuard.fromConfig(ListenConfig(host="0.0.0.0"))
        g.check(b"anything.example", None)
        self.assertRaises(OriginNotAllowed, g.check, b"x", b"http://localhost")

    def test_lists(self) -> None:
        """Configured hosts: bare names match any port, host:port exactly; origins exactly."""
        g = HostGuard.fromConfig(
            ListenConfig(
                host="0.0.0.0",
                allowed_hosts=("gw.example", "api.example:8443"),
                allowed_origins=("https://app.example",),
            )
        )
        g.check(b"GW.example:1", b"https://app.example/")
        g.check(b"api.example:8443", None)
        self.assertRaises(HostNotAllowed, g.check, b"api.example", None)
        self.assertRaises(OriginNotAllowed, g.check, b"gw.example", b"https://other.example")

    def test_isLoopback(self) -> None:
        self.assertTrue(isLoopback("127.0.0.2"))
        self.assertTrue(isLoopback("::1"))
        self.assertFalse(isLoopback("0.0.0.0"))
        self.assertFalse(isLoopback("gw.example"))


class RouteTests(SynchronousTestCase):
    def test_routesAndPoolReuse(self) -> None:
        """Routes carry the upstream's own Host; unchanged upstreams keep their pool on rebuild."""
        text = (
            "upstreams:\n"
            "  - {name: a, url: 'http://127.0.0.1:9000/mcp?x=1', path: /a, headers: {X-K: v}}\n"
            "  - {name: b, url: 'https://tools.example/mcp', path: /b}\n"
        )
        clock = Clock()
        g1 = buildGeneration(clock, config_from_string(text))
        a, b = g1.routes[b"/a"], g1.routes[b"/b"]
        self.assertEqual(
            (a.hostHeader, a.target, a.injected),
            (b"127.0.0.1:9000", b"/mcp?x=1", ((b"X-K", b"v"),)),
        )
        self.assertEqual((b.hostHeader, b.target, b.pool.port), (b"tools.example", b"/mcp", 443))
        g2 = buildGeneration(clock, config_from_string(text.replace("X-K: v", "X-K: w")), 2, g1)
        self.assertIs(g2.routes[b"/a"].pool, a.pool)
        g3 = buildGeneration(clock, config_from_string(text.replace("9000", "9001")), 3, g2)
        self.assertIsNot(g3.routes[b"/a"].pool, a.pool)
        # x-mcp-header annotations live as long as the pool: kept when unchanged, else dropped
        self.assertIs(g2.routes[b"/a"].toolHeaders, a.toolHeaders)
        self.assertIs(g2.routes[b"/b"].toolHeaders, b.toolHeaders)
        self.assertIsNot(g3.routes[b"/a"].toolHeaders, a.toolHeaders)
        self.assertIs(g3.routes[b"/b"].toolHeaders, b.toolHeaders)
