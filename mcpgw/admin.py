# -*- test-case-name: tests.test_metrics -*-
"""
The admin listener (C{listen.admin}): C{GET /metrics} (Prometheus text format, the whole host),
C{GET /healthz} and C{GET /readyz}. It has a port of its own, so that metrics and health never
share the MCP listener's Host/Origin rules, limits or audit, and can be firewalled apart. With
C{workers: N} the supervisor serves it; without workers the gateway process does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mcpgw.config import AdminConfig
from mcpgw.health import Readiness
from mcpgw.metrics import CONTENT_TYPE

log = Logger()


class AdminResource(Resource):
    """
    @ivar metrics: returns the C{/metrics} body (or a Deferred of it).
    @ivar generation: returns the generation C{/readyz} checks.
    """

    isLeaf = True

    def __init__(
        self,
        metrics: Callable[[], bytes | Deferred[bytes]],
        readiness: Readiness,
        generation: Callable[[], Any],
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self.readiness = readiness
        self.generation = generation

    def render(self, request: Any) -> Any:
        path = request.path
        if path in (b"/healthz", b"/readyz"):
            self.readiness.render(request, path, self.generation())
            return NOT_DONE_YET
        if path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found: try /metrics, /healthz or /readyz\n"
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            return b"use GET\n"
        d = maybeDeferred(self.metrics)

        def answer(body: bytes) -> None:
            if request._disconnected:
                return
            request.setHeader(b"Content-Type", CONTENT_TYPE)
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(f: Any) -> None:
            log.failure("collecting the metrics failed", f)
            if not request._disconnected:
                request.setResponseCode(500)
                request.write(b"metrics unavailable, see the gateway log\n")
                request.finish()

        d.addCallbacks(answer, failed)
        return NOT_DONE_YET


class AdminService(Service):
    """Listens on C{listen.admin} while running."""

    name = "admin"

    def __init__(self, reactor: Any, config: AdminConfig, resource: AdminResource) -> None:
        self.reactor = reactor
        self.config = config
        self.site = Site(resource)
        self.site.noisy = False
        self.site.log = lambda request: None  # type: ignore[method-assign]  # no access log
        self.port: Any = None

    def startService(self) -> None:
        self.port = self.reactor.listenTCP(self.config.port, self.site, interface=self.config.host)
        super().startService()
        addr = self.port.getHost()
        log.info("admin listener on http://{host}:{port}/metrics", host=addr.host, port=addr.port)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening)
