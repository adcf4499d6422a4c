# -*- test-case-name: tests.test_service -*-
"""
The gateway's services, as L{mcpgw.tap.makeService} composes them: each is an C{IService} with
one job, handed what it needs.

  - L{AuditService}: the canonical audit file (open at start; flushed and synced at stop);
  - the audit sinks (L{mcpgw.audit.shipper.ShippingService});
  - L{PoolService}: the Argon2 thread pool;
  - span export (L{mcpgw.telemetry.Telemetry});
  - the license log (L{mcpgw.license.LicenseService});
  - tool pinning's remembered definitions (L{mcpgw.pinning.PinningService});
  - L{Reloader}: SIGHUP re-reads the config, builds a new generation and publishes it to whoever
    subscribed (the gateway, the sinks, telemetry, the license), no polling;
  - L{ListenerService}: the listening port, the slow-client sweep, and the drain at stop.

L{GatewayService} is the root. C{MultiService} stops its children all at once; a gateway must not:
stop listening -> end server-stream GETs and wait for in-flight requests (up to
L{SHUTDOWN_GRACE}) -> close client connections after their queued bytes are flushed -> close
upstream connections -> flush and sync the audit file -> ship what is left -> export the last
spans. So the root starts its children in order and stops them one after another in
L{GatewayService.stopOrder}.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Generator
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mcpgw import __version__
from mcpgw.audit.writer import AuditWriter
from mcpgw.config import Config, ConfigError, ListenConfig, load_config
from mcpgw.generation import Generation, buildGeneration
from mcpgw.health import Readiness
from mcpgw.pinning import LockError
from mcpgw.proxy.gateway import Gateway
from mcpgw.proxy.server import GatewaySite
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


class AuditService(Service):
    """The canonical audit file: opened at start, flushed and synced at stop."""

    name = "audit"

    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer

    def startService(self) -> None:
        self.writer.open()
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.writer.close()


class PoolService(Service):
    """A thread pool started and stopped with the gateway (named after the pool)."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.name = pool.name.removeprefix("mcpgw-") if pool.name else "pool"

    def startService(self) -> None:
        self.pool.start()
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class Reloader(Service):
    """
    SIGHUP: reopen the audit file (logrotate), re-read the config, build a complete new
    generation off to the side and publish it to every subscriber in the same reactor turn. A
    broken config or certificate is rejected with one log line and the current generation stays.
    HUPs that arrive during a reload coalesce into one more reload.
    """

    name = "reloader"

    def __init__(
        self,
        reactor: Any,
        configPath: str | None,
        current: Callable[[], Generation],
        authPool: ThreadPool,
        tlsCreator: SwappableServerTLS | None,
    ) -> None:
        self.reactor = reactor
        self.configPath = configPath
        self._current = current
        self._authPool = authPool
        self._tlsCreator = tlsCreator
        self._subscribers: list[Callable[[Generation], object]] = []
        self._reopeners: list[Callable[[], object]] = []
        self._previousHup: Any = None
        self._reloading = False
        self._reloadAgain = False
        self._hupScheduled = False

    def subscribe(self, listener: Callable[[Generation], object]) -> None:
        """Call C{listener} with every new generation, in subscription order."""
        self._subscribers.append(listener)

    def onReopen(self, listener: Callable[[], object]) -> None:
        """Call C{listener} on every SIGHUP, before the config is read (audit file reopen)."""
        self._reopeners.append(listener)

    def startService(self) -> None:
        super().startService()
        if self.configPath is not None:
            self._previousHup = signal.signal(signal.SIGHUP, self._onSIGHUP)

    def stopService(self) -> None:
        super().stopService()
        if self._previousHup is not None:
            signal.signal(signal.SIGHUP, self._previousHup)
            self._previousHup = None

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
        """Reopen, re-read and publish (see the class docstring)."""
        if self._reloading:
            self._reloadAgain = True
            return
        self._reloading = True
        try:
            self.reopen()
            config = self.read()
            new = self.prepare(config) if config is not None else None
            if new is not None:
                self.publish(new)
        finally:
            self._reloading = False
            if self._reloadAgain:
                self._reloadAgain = False
                self.reactor.callLater(0, self.reload)

    @property
    def current(self) -> Generation:
        """The current generation."""
        return self._current()

    def reopen(self) -> None:
        """Call every L{onReopen} listener (the audit file, after logrotate)."""
        for reopen in self._reopeners:
            reopen()

    def read(self) -> Config | None:
        """The config file, or C{None} after logging why it is rejected."""
        try:
            return load_config(self.configPath)  # type: ignore[arg-type]
        except ConfigError as e:
            log.error(
                "reload rejected, keeping generation {gen}: {problems}",
                gen=self._current().number,
                problems="; ".join(str(p) for p in e.problems),
            )
            return None

    def prepare(self, config: Config, number: int | None = None) -> Generation | None:
        """
        Build the generation of C{config} off to the side (nothing is published), or return
        C{None} after logging why it is rejected.

        @param number: its generation number (default: the current one's + 1).
        """
        old = self._current()
        if (config.tls is None) != (self._tlsCreator is None):
            log.error(
                "reload rejected, keeping generation {gen}: tls cannot be turned {onoff} by "
                "a reload; restart mcpgw to change the listener between http and https",
                gen=old.number,
                onoff="off" if config.tls is None else "on",
            )
            return None
        if (config.listen.workers, config.listen.admin) != (
            old.config.listen.workers,
            old.config.listen.admin,
        ):
            log.warn("listen.workers and listen.admin changes take effect at the next restart")
        try:
            new = buildGeneration(
                self.reactor,
                config,
                old.number + 1 if number is None else number,
                previous=old,
                authPool=self._authPool,
            )
            if new.tls is not None:
                new.tls.options.getContext()  # what publish's swap does: fail here, not there
        except (TLSError, LockError) as e:
            log.error("reload rejected, keeping generation {gen}: {e}", gen=old.number, e=e)
            return None
        except Exception:
            log.failure("reload rejected, keeping generation {gen}", gen=old.number)
            return None
        if config.state != old.config.state:
            log.warn(
                "state: the state section changed; it takes effect at the next start (the "
                "buckets stay where they are until then)"
            )
        return new

    def publish(self, new: Generation) -> None:
        """Make C{new} current: the TLS listener and every subscriber, in one reactor turn."""
        old = self._current()
        if self._tlsCreator is not None and new.tls is not None:
            # Same reactor turn as the generation swap: new connections get the new
            # certificate and CA from here on; open ones keep theirs.
            self._tlsCreator.swap(new.tls)
            if new.tls is not old.tls:
                log.info("tls: {tls}", tls=new.tls.describe())
        log.info(
            "reloaded {path}: generation {old} -> {gen}",
            path=self.configPath or new.config.source,
            old=old.number,
            gen=new.number,
        )
        for listener in self._subscribers:
            listener(new)


class ListenerService(Service):
    """
    The listening port and the requests it brings: listens at start (plain or TLS, optionally
    with SO_REUSEPORT), sweeps slow clients every second, and at stop drains: stop listening,
    end server-stream GETs, wait for in-flight requests, close client connections once flushed,
    close upstream connections.
    """

    name = "listener"

    def __init__(
        self,
        reactor: Any,
        gateway: Gateway,
        site: GatewaySite,
        readiness: Readiness,
        tlsCreator: SwappableServerTLS | None,
        adopt: tuple[int, int] | None = None,
    ) -> None:
        """
        @param adopt: C{(fd, address family)} of a listening socket to serve instead of binding
            one (a worker of L{mcpgw.fleet}); the descriptor is closed once adopted.
        """
        self.reactor = reactor
        self.gateway = gateway
        self.site = site
        self.readiness = readiness
        self.tlsCreator = tlsCreator
        self.adopt = adopt
        self.port: Any = None
        self._sweeper: LoopingCall | None = None

    def startService(self) -> None:
        self._sweeper = LoopingCall(self.gateway.sweepSlowClients)
        self._sweeper.clock = self.reactor
        self._sweeper.start(1.0, now=False)
        listen: ListenConfig = self.gateway.generation.config.listen
        factory: Any = self.site
        if self.tlsCreator is not None:
            factory = ServerTLSFactory(self.tlsCreator, self.site)
        if self.adopt is not None:
            fd, family = self.adopt
            self.port = OneAcceptPort._fromListeningDescriptor(self.reactor, fd, family, factory)
            self.port.startListening()
            os.close(fd)  # the port holds a duplicate
        elif listen.reuse_port:
            binding = tcp.makeBinding(listen.host, listen.port, reuseAddress=True, reusePort=True)
            self.port = self.reactor.listenTCP(binding, factory, BACKLOG)
        else:
            self.port = self.reactor.listenTCP(listen.port, factory, BACKLOG, interface=listen.host)
        super().startService()
        generation = self.gateway.generation
        addr = self.port.getHost()
        host = f"[{addr.host}]" if ":" in addr.host else addr.host
        log.info(
            "mcpgw {version} listening on {scheme}://{host}:{port} "
            "(generation {gen}; upstreams: {ups})",
            version=__version__,
            scheme="http" if self.tlsCreator is None else "https",
            host=host,
            port=addr.port,
            gen=generation.number,
            ups=", ".join(f"{r.name} at {p.decode()}" for p, r in generation.routes.items()),
        )
        if self.tlsCreator is not None:
            log.info("tls: {tls}", tls=self.tlsCreator.current.describe())

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        gateway = self.gateway
        log.info(
            "stopping: {n} requests in flight, {c} connections open",
            n=len(gateway.inflight),
            c=len(gateway.connections),
        )
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self.port is not None:
            yield defer.maybeDeferred(self.port.stopListening)
        self.readiness.draining = True
        gateway.startDraining()
        try:
            yield gateway.whenIdle().addTimeout(SHUTDOWN_GRACE, self.reactor)
        except defer.TimeoutError:
            log.warn(
                "stop: {n} requests still running after {s}s; closing them",
                n=len(gateway.inflight),
                s=SHUTDOWN_GRACE,
            )
        try:
            yield gateway.closeConnections().addTimeout(CLOSE_GRACE, self.reactor)
        except defer.TimeoutError:
            for channel in list(gateway.connections):
                if channel.transport is not None:
                    channel.transport.abortConnection()
        yield defer.gatherResults([p.close() for p in gateway.generation.pools])


class OneAcceptPort(tcp.Port):
    """
    A listening port shared by several worker processes: each wakeup accepts one connection
    (Twisted accepts up to 100, growing), so the workers take turns instead of the first one
    awake taking a whole burst of connections (measured: 32 connections opened at once went
    about 50/50 instead of 85/15).
    """

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass


class GatewayService(MultiService):
    """
    The root service (see the module docstring for the stop order). Built by
    L{mcpgw.tap.makeService}; the attributes are the parts it was handed.

    @ivar stopOrder: child names, stopped one after another in this order (children not named
        are stopped last, in reverse order of addition).
    """

    stopOrder = (
        "listener",
        "admin",
        "reloader",
        "pinning",
        "license",
        "audit",
        "shipping",
        "telemetry",
        "argon2",
    )

    def __init__(
        self,
        reactor: Any,
        gateway: Gateway,
        reloader: Reloader,
        listener: ListenerService,
        audit: AuditService,
        shipping: Any,
        telemetry: Any,
        readiness: Readiness,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.gateway = gateway
        self.reloader = reloader
        self.listener = listener
        self.auditService = audit
        self.audit = audit.writer
        #: The process's L{mcpgw.metrics.ProcessMetrics} (set by the composition root).
        self.metrics: Any = None
        self.shipping = shipping
        self.telemetry = telemetry
        self.readiness = readiness

    @property
    def generation(self) -> Generation:
        """The current generation."""
        return self.gateway.generation

    @property
    def configPath(self) -> str | None:
        """The config file a reload reads."""
        return self.reloader.configPath

    @configPath.setter
    def configPath(self, path: str | None) -> None:
        self.reloader.configPath = path

    @property
    def port(self) -> Any:
        """The listening port once started."""
        return self.listener.port

    @property
    def tlsCreator(self) -> SwappableServerTLS | None:
        """The listener's swappable TLS connection creator (C{None} without tls)."""
        return self.listener.tlsCreator

    def reload(self) -> None:
        """What SIGHUP does (L{Reloader.reload})."""
        self.reloader.reload()

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        Service.stopService(self)
        children: list[IService] = list(self)
        named = {c.name: c for c in children}
        ordered = [named[n] for n in self.stopOrder if n in named]
        ordered += [c for c in reversed(children) if c not in ordered]
        for child in ordered:
            if child.running:
                yield defer.maybeDeferred(child.stopService)
        log.info("stopped; {n} audit lines written", n=self.audit.linesWritten)


def argon2Pool() -> ThreadPool:
    """
    The Argon2 verification pool: a dedicated pool of L{AUTH_THREADS} (one verification already
    uses the cores), never the reactor's shared pool, which also resolves host names.
    """
    return ThreadPool(0, AUTH_THREADS, "mcpgw-argon2")


__all__ = [
    "CLIENT_IDLE_TIMEOUT",
    "AuditService",
    "GatewayService",
    "ListenerService",
    "PoolService",
    "Reloader",
    "argon2Pool",
]
