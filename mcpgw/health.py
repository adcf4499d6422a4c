# -*- test-case-name: tests.test_proxy -*-
"""
C{GET /healthz} (the process is alive) and C{GET /readyz} (a config is loaded and every upstream
accepts TCP connections). The upstream check runs at most once per L{CACHE_SECONDS}, never per
request: concurrent C{/readyz} calls share one probe, later ones get the cached answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

if TYPE_CHECKING:
    from mcpgw.generation import Generation

log = Logger()

#: How long a readiness probe result is reused.
CACHE_SECONDS = 5.0
#: Upper bound on one probe's connect time.
PROBE_TIMEOUT = 2.0


class Readiness:
    """
    Answers the health endpoints.

    @ivar extraChecks: callables returning C{(name, ok, detail)} added to C{/readyz} (e.g. sinks).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._cached: tuple[float, int, dict[str, Any]] | None = None
        self._probing: Deferred[dict[str, Any]] | None = None
        self.draining = False
        self.extraChecks: list[Callable[[], tuple[str, bool, Any]]] = []

    def render(self, request: Any, path: bytes, generation: Generation) -> None:
        """Answer C{/healthz} or C{/readyz} on C{request}."""
        if request.method not in (b"GET", b"HEAD"):
            _send(request, 405, {"status": "error", "detail": "use GET"})
            return
        if path == b"/healthz":
            _send(request, 200, {"status": "ok"})
            return
        d = self.check(generation)

        def answer(result: dict[str, Any]) -> None:
            if request.finished or request._disconnected:
                return
            _send(request, 200 if result["ready"] else 503, result)

        d.addCallback(answer)
        d.addErrback(lambda f: log.failure("readiness check failed", f))

    def check(self, generation: Generation) -> Deferred[dict[str, Any]]:
        """
        @return: a Deferred firing with C{{"ready": bool, "generation": n, "upstreams": {...}}}.
        """
        now = self._reactor.seconds()
        cached = self._cached
        if (
            cached is not None
            and cached[1] == generation.number
            and now - cached[0] < CACHE_SECONDS
        ):
            return succeed(self._withState(cached[2]))
        if self._probing is None:
            self._probing = self._probe(generation)
        d: Deferred[dict[str, Any]] = Deferred()

        def fire(result: dict[str, Any]) -> dict[str, Any]:
            d.callback(self._withState(result))
            return result

        self._probing.addCallback(fire)
        return d

    def _withState(self, result: dict[str, Any]) -> dict[str, Any]:
        if self.extraChecks:  # fresh on every call, not cached
            result = dict(result)
            for check in self.extraChecks:
                name, ok, detail = check()
                result[name] = detail
                if not ok and result["ready"]:
                    result.update(ready=False, status="not_ready")
        if self.draining:
            return {**result, "ready": False, "status": "draining"}
        return result

    def _probe(self, generation: Generation) -> Deferred[dict[str, Any]]:
        routes = list(generation.routes.values())
        probes = [
            self._probeOne(r.config.host, r.config.port, r.config.timeouts.connect) for r in routes
        ]

        def collect(results: list[tuple[bool, Any]]) -> dict[str, Any]:
            upstreams = {}
            for route, (_, (ok, detail)) in zip(routes, results, strict=True):
                upstreams[route.name] = {"reachable": ok, "detail": detail}
            ready = all(u["reachable"] for u in upstreams.values())
            result = {
                "status": "ready" if ready else "not_ready",
                "ready": ready,
                "generation": generation.number,
                "upstreams": upstreams,
            }
            self._cached = (self._reactor.seconds(), generation.number, result)
            self._probing = None
            return result

        return DeferredList(probes, consumeErrors=True).addCallback(collect)

    def _probeOne(self, host: str, port: int, timeout: float) -> Deferred[tuple[bool, str | None]]:
        ep = HostnameEndpoint(self._reactor, host, port, timeout=min(timeout, PROBE_TIMEOUT))
        factory = Factory.forProtocol(Protocol)
        factory.noisy = False
        d = ep.connect(factory)

        def ok(proto: Protocol) -> tuple[bool, str | None]:
            assert proto.transport is not None
            proto.transport.loseConnection()
            return (True, None)

        def bad(f: Any) -> tuple[bool, str | None]:
            return (False, f.getErrorMessage())

        return d.addCallbacks(ok, bad)


def _send(request: Any, status: int, payload: dict[str, Any]) -> None:
    body = orjson.dumps(payload)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.responseHeaders.setRawHeaders(b"Cache-Control", [b"no-store"])
    request.write(body)
    request.finish()
