# -*- test-case-name: tests.test_service -*-
"""
The gateway's lifecycle as a twistd service: listen, reload on SIGHUP, drain on stop.

Stop order (one sequential C{stopService}; C{MultiService} would stop children all at once):
stop listening -> end server-stream GETs and wait for in-flight requests (up to
L{SHUTDOWN_GRACE}) -> close client connections after their queued bytes are flushed -> close
upstream connections -> flush and sync the audit file. Waiting for requests alone is not enough:
a finished request's bytes may still sit in the transport's buffer.
"""

from __future__ import annotations

import signal
from collections.abc import Generator
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mcpgw import __version__
from mcpgw.audit.shipper import ShippingService, WriterSource
from mcpgw.audit.writer import AuditWriter
from mcpgw.config import Config, ConfigError, load_config
from mcpgw.generation import Generation, buildGeneration
from mcpgw.health import Readiness
from mcpgw.proxy.gateway import Gateway
from mcpgw.proxy.server import GatewaySite
from mcpgw.telemetry import Telemetry
from mcpgw.tls import ServerTLSFactory, SwappableServerTLS, TLSError

log = Logger()

#: Seconds in-flight requests get to finish after a stop is requested.
SHUTDOWN_GRACE = 25.0
#: Seconds client connections get to flush and close before they are aborted.
CLOSE_GRACE = 5.0
#: Idle client connections are closed after this many seconds without a byte.
CLIENT_IDLE_TIMEOUT = 60.0
#: Threads verifying API keys with Argon2.
AUTH_THREADS = 1
#: Listen backlog.
BACKLOG = 1024


class GatewayService(MultiService):
    """
    The root service: owns the listener, the audit writer and the current generation.

    @ivar port: the listening port once started.
    """

    def __init__(self, reactor: Any, configPath: str | None, config: Config) -> None:
        super().__init__()
        self.reactor = reactor
        self.configPath = configPath
        self.audit = AuditWriter(reactor, config.audit.path, config.audit.fsync)
        # Argon2 verifications: a dedicated pool of one thread (one verify already uses the
        # cores), never the reactor's shared pool, which also resolves host names.
        self.authPool = ThreadPool(0, AUTH_THREADS, "mcpgw-argon2")
        self.readiness = Readiness(reactor)
        # Audit sinks: owned here but started after the audit file is open and stopped
        # after its final flush (see stopService), so not a MultiService child.
        self.shipping = ShippingService(reactor, config.audit, WriterSource(self.audit))
        self.readiness.extraChecks.append(self.shipping.readinessCheck)
        self.gateway = Gateway(
            reactor,
            buildGeneration(reactor, config, authPool=self.authPool),
            self.audit,
            self.readiness,
        )
        self.site = GatewaySite(self.gateway, reactor, CLIENT_IDLE_TIMEOUT)
        # Spans: an exporter thread of its own when telemetry.otlp_endpoint is set.
        self.telemetry = Telemetry(reactor, self.gateway, config.telemetry)
        # With tls: the listener's connection creator; a reload swaps its certificate.
        tls = self.generation.tls
        self.tlsCreator = SwappableServerTLS(tls) if tls is not None else None
        self.port: Any = None
        self._previousHup: Any = None
        self._reloading = False
        self._reloadAgain = False
        self._hupScheduled = False
        self._sweeper: LoopingCall | None = None

    @property
    def generation(self) -> Generation:
        """The current generation."""
        return self.gateway.generation

    def startService(self) -> None:
        config = self.generation.config
        self.audit.open()
        self.shipping.startService()
        self.authPool.start()
        self.telemetry.start()
        self._sweeper = LoopingCall(self.gateway.sweepSlowClients)
        self._sweeper.clock = self.reactor
        self._sweeper.start(1.0, now=False)
        listen = config.listen
        factory: Any = self.site
        if self.tlsCreator is not None:
            factory = ServerTLSFactory(self.tlsCreator, self.site)
        if listen.reuse_port:
            binding = tcp.makeBinding(listen.host, listen.port, reuseAddress=True, reusePort=True)
            self.port = self.reactor.listenTCP(binding, factory, BACKLOG)
        else:
            self.port = self.reactor.listenTCP(listen.port, factory, BACKLOG, interface=listen.host)
        super().startService()
        if self.configPath is not None:
            self._previousHup = signal.signal(signal.SIGHUP, self._onSIGHUP)
        addr = self.port.getHost()
        host = f"[{addr.host}]" if ":" in addr.host else addr.host
        log.info(
            "mcpgw {version} listening on {scheme}://{host}:{port} "
            "(generation {gen}; upstreams: {ups})",
            version=__version__,
            scheme="http" if self.tlsCreator is None else "https",
            host=host,
            port=addr.port,
            gen=self.generation.number,
            ups=", ".join(f"{r.name} at {p.decode()}" for p, r in self.generation.routes.items()),
        )
        if self.tlsCreator is not None:
            log.info("tls: {tls}", tls=self.tlsCreator.current.describe())

    def _onSIGHUP(self, signum: int, frame: Any) -> None:
        # A signal handler only schedules; the work runs at a clean point in the reactor thread.
        # HUPs that arrive before the scheduled reload ran coalesce into it.
        if not self._hupScheduled:
            self._hupScheduled = True
            self.reactor.callFromThread(self._hupReload)

    def _hupReload(self) -> None:
        self._hupScheduled = False
        self.reload()

    def reload(self) -> None:
        """
        Reopen the audit file (logrotate) and rebuild the generation from the config file. A
        broken config is rejected with one log line and the current generation stays. HUPs that
        arrive during a reload coalesce into one more reload.
        """
        if self._reloading:
            self._reloadAgain = True
            return
        self._reloading = True
        try:
            self.audit.reopen()
            self.shipping.auditReopened()
            old = self.generation
            try:
                config = load_config(self.configPath)  # type: ignore[arg-type]
            except ConfigError as e:
                log.error(
                    "reload rejected, keeping generation {gen}: {problems}",
                    gen=old.number,
                    problems="; ".join(str(p) for p in e.problems),
                )
                return
            if (config.tls is None) != (self.tlsCreator is None):
                log.error(
                    "reload rejected, keeping generation {gen}: tls cannot be turned {onoff} by "
                    "a reload; restart mcpgw to change the listener between http and https",
                    gen=old.number,
                    onoff="off" if config.tls is None else "on",
                )
                return
            try:
                new = buildGeneration(
                    self.reactor, config, old.number + 1, previous=old, authPool=self.authPool
                )
                if self.tlsCreator is not None and new.tls is not None:
                    # Same reactor turn as the generation swap: new connections get the new
                    # certificate and CA from here on; open ones keep theirs.
                    self.tlsCreator.swap(new.tls)
            except TLSError as e:
                log.error("reload rejected, keeping generation {gen}: {e}", gen=old.number, e=e)
                return
            except Exception:
                log.failure("reload rejected, keeping generation {gen}", gen=old.number)
                return
            self.gateway.generation = new
            self.shipping.reconfigure(config.audit)
            self.telemetry.reconfigure(config.telemetry)
            if new.tls is not None and new.tls is not old.tls:
                log.info("tls: {tls}", tls=new.tls.describe())
            log.info(
                "reloaded {path}: generation {old} -> {gen}",
                path=self.configPath,
                old=old.number,
                gen=new.number,
            )
        finally:
            self._reloading = False
            if self._reloadAgain:
                self._reloadAgain = False
                self.reactor.callLater(0, self.reload)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        if self._previousHup is not None:
            signal.signal(signal.SIGHUP, self._previousHup)
            self._previousHup = None
        log.info(
            "stopping: {n} requests in flight, {c} connections open",
            n=len(self.gateway.inflight),
            c=len(self.gateway.connections),
        )
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self.port is not None:
            yield defer.maybeDeferred(self.port.stopListening)
        self.readiness.draining = True
        self.gateway.startDraining()
        try:
            yield self.gateway.whenIdle().addTimeout(SHUTDOWN_GRACE, self.reactor)
        except defer.TimeoutError:
            log.warn(
                "stop: {n} requests still running after {s}s; closing them",
                n=len(self.gateway.inflight),
                s=SHUTDOWN_GRACE,
            )
        try:
            yield self.gateway.closeConnections().addTimeout(CLOSE_GRACE, self.reactor)
        except defer.TimeoutError:
            for channel in list(self.gateway.connections):
                if channel.transport is not None:
                    channel.transport.abortConnection()
        yield defer.gatherResults([p.close() for p in self.generation.pools])
        yield super().stopService()
        yield self.audit.close()
        yield self.shipping.stopService()  # ships what is left, saves the cursors
        yield self.telemetry.stop()  # exports the last spans on the exporter's thread
        self.authPool.stop()
        log.info("stopped; {n} audit lines written", n=self.audit.linesWritten)
