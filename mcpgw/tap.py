# -*- test-case-name: tests.test_service -*-
"""
The composition root: C{twistd mcpgw} options and L{makeService}. C{mcpgw run} builds the same
service through L{makeService}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.python import usage

from mcpgw.config import Config, ConfigError, Problem, load_config
from mcpgw.interfaces import IStateBackend
from mcpgw.license import LicenseService, LicenseState, licenseState

if TYPE_CHECKING:
    from mcpgw.service import GatewayService


def loadChecked(path: str) -> tuple[Config, LicenseState]:
    """
    Everything a start checks before serving: the config, the license it names, the TLS
    files (certificate, key, client CA) it points to, and the tool pinning lock file.

    @raise ConfigError: with every problem, in the C{path.in.yaml: what is wrong} shape.
    """
    config = load_config(path)
    state = licenseState(config)
    if config.tls is not None:
        from mcpgw.tls import TLSError, loadServerTLS

        try:
            loadServerTLS(config.tls)
        except TLSError as e:
            raise ConfigError((Problem("tls", str(e)),), path) from None
    if config.tools.pinning.mode != "off":
        from mcpgw.pinning import LockError, readLock

        try:
            readLock(config.tools.pinning.lock_file)
        except LockError as e:
            raise ConfigError((Problem("tools.pinning.lock_file", str(e)),), path) from None
    return config, state


class Options(usage.Options):
    """C{twistd mcpgw} command line."""

    synopsis = "--config FILE"
    optParameters = [
        ["config", "c", "/etc/mcpgw/mcpgw.yaml", "Path to the YAML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["loaded"], self["license"] = loadChecked(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"invalid configuration {self['config']}:\n{e}") from None


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> Any:
    """
    Build the gateway: every service it runs, each handed what it needs (the only place that
    wires them together). With C{listen.workers} above 1, the supervisor of
    L{mcpgw.fleet.supervisor} (which starts the workers, each built by L{makeWorker}); else the
    gateway itself, in this process (L{mcpgw.service.GatewayService}).

    @param options: L{Options} (or a dict with C{config}, the config file's path or C{None} for
        a config that is not reloaded, and optionally C{loaded}, the parsed
        L{mcpgw.config.Config}, and C{license}, its verified L{mcpgw.license.LicenseState}).
    @param reactor: the reactor; the global one when C{None}.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    path: str | None = options.get("config")
    config = options.get("loaded")
    if config is None:
        assert path is not None, "makeService needs a config file or a parsed config"
        config = load_config(path)
    state = options.get("license") or licenseState(config)
    if config.listen.workerCount > 1:
        assert path is not None, "workers re-read the config file: it needs a path"
        return makeSupervisor(reactor, path, config, state)
    return _makeGateway(reactor, path, config, state)


def makeAuditWriter(reactor: Any, config: Config) -> Any:
    """The host's one audit file writer (C{audit.path}, C{fsync}, C{integrity})."""
    from mcpgw.audit.chain import loadSigningKey
    from mcpgw.audit.writer import AuditWriter

    integrity = config.audit.integrity
    return AuditWriter(
        reactor,
        config.audit.path,
        config.audit.fsync,
        chain=integrity.chain,
        signingKey=loadSigningKey(integrity.signing_key) if integrity.signing_key else None,
        checkpointLines=integrity.checkpoint.lines,
        checkpointSeconds=integrity.checkpoint.seconds,
    )


def _makeGateway(
    reactor: Any,
    path: str | None,
    config: Config,
    state: LicenseState | None,
    worker: Any = None,
    number: int = 1,
) -> GatewayService:
    """
    The gateway: the whole host (C{worker} is C{None}), or one worker serving the supervisor's
    listening socket and handing its audit lines to it (C{worker}: a
    L{mcpgw.fleet.worker.WorkerLink}); a worker has no audit file, sinks, license or admin
    listener of its own: the supervisor runs them once for the host.
    """
    from mcpgw.audit.shipper import ShippingService, WriterSource
    from mcpgw.generation import buildGeneration
    from mcpgw.health import Readiness
    from mcpgw.metrics import HostMetrics, MeteredAuditLog, ProcessMetrics, RequestMetrics
    from mcpgw.pinning import PinningService
    from mcpgw.proxy.gateway import Gateway
    from mcpgw.proxy.server import AuditFirstChannel, GatewaySite
    from mcpgw.service import (
        CLIENT_IDLE_TIMEOUT,
        AuditService,
        GatewayService,
        ListenerService,
        PoolService,
        Reloader,
        argon2Pool,
    )
    from mcpgw.telemetry import Telemetry
    from mcpgw.tls import SwappableServerTLS

    stateBackend = makeState(reactor, config)
    pool = argon2Pool()
    readiness = Readiness(reactor)
    writer: Any
    requests = None
    if worker is None:
        writer = makeAuditWriter(reactor, config)
        shipping = ShippingService(reactor, config.audit, WriterSource(writer))
        shipping.setName("shipping")
        readiness.extraChecks.append(shipping.readinessCheck)
        readiness.extraChecks.append(
            lambda: writer.readinessCheck(
                gateway.generation.config.audit.on_write_failure == "refuse"
            )
        )
        audit = writer
        if config.listen.admin is not None:
            requests = RequestMetrics()
            audit = MeteredAuditLog(writer, requests)
    else:
        audit = writer = worker.auditLog
        # fsync: always: answer once the supervisor has synced the line (its acknowledgement).
        audit.durable = config.audit.fsync == "always"
        shipping = None
    if stateBackend.shared:
        readiness.extraChecks.append(stateBackend.readinessCheck)
    pinning = PinningService(reactor, config.audit.state_dir)
    generation = buildGeneration(reactor, config, number, authPool=pool, state=stateBackend)
    pinning.configure(generation.config, generation.toolLock)
    gateway = Gateway(reactor, generation, audit, readiness, pins=pinning)
    site = GatewaySite(gateway, reactor, CLIENT_IDLE_TIMEOUT)
    if worker is not None:
        # The audit line before the answer (see AuditFirstChannel).
        site.protocol = AuditFirstChannel
    telemetry = Telemetry(reactor, gateway, config.telemetry)
    tls = gateway.generation.tls
    tlsCreator = SwappableServerTLS(tls) if tls is not None else None
    reloader = Reloader(
        reactor, path if worker is None else None, lambda: gateway.generation, pool, tlsCreator
    )
    listener = ListenerService(
        reactor, gateway, site, readiness, tlsCreator, worker.listening if worker else None
    )
    # What a reload reaches: the audit file first (logrotate), then the new generation.
    if shipping is not None:
        reloader.onReopen(writer.reopen)
        reloader.onReopen(shipping.auditReopened)
    reloader.subscribe(lambda g: pinning.configure(g.config, g.toolLock))
    reloader.subscribe(gateway.publish)
    if shipping is not None:
        reloader.subscribe(lambda g: writer.configChanged(g.config.audit))
        reloader.subscribe(lambda g: shipping.reconfigure(g.config.audit))
    reloader.subscribe(lambda g: telemetry.reconfigure(g.config.telemetry))
    root = GatewayService(
        reactor,
        gateway=gateway,
        reloader=reloader,
        listener=listener,
        audit=AuditService(audit),
        shipping=shipping,
        telemetry=telemetry,
        readiness=readiness,
    )
    processMetrics = ProcessMetrics(gateway, telemetry)
    if stateBackend.shared:
        from mcpgw.metrics import redisSamples

        stats = stateBackend.stats  # type: ignore[attr-defined]
        processMetrics.sources.append(lambda: redisSamples(stats))
    root.metrics = processMetrics
    # Started in this order; stopped in GatewayService.stopOrder (the state backend last: the
    # requests drained at stop may still take tokens).
    children: list[Any] = [root.auditService]
    if IService.providedBy(stateBackend):
        children.insert(0, stateBackend)
    if worker is None:
        assert shipping is not None and state is not None
        license = LicenseService(reactor, state)
        reloader.subscribe(lambda g: license.configChanged(g.config))
        children += [shipping, PoolService(pool), telemetry, license, pinning, reloader, listener]
        if config.listen.admin is not None:
            from mcpgw.admin import AdminResource, AdminService
            from mcpgw.metrics import addUp, render

            assert requests is not None
            host = HostMetrics(requests, writer, shipping, lambda: gateway.generation.number)
            resource = AdminResource(
                lambda: render(addUp(host.samples(), processMetrics.samples())),
                readiness,
                lambda: gateway.generation,
            )
            children.append(AdminService(reactor, config.listen.admin, resource))
    else:
        worker.attach(root, reloader, processMetrics)
        children += [PoolService(pool), telemetry, pinning, reloader, listener]
    for child in children:
        child.setServiceParent(root)
    return root


def makeWorker(reactor: Any, path: str, config: Config, worker: Any, number: int) -> Any:
    """One worker of L{mcpgw.fleet} (see L{_makeGateway})."""
    return _makeGateway(reactor, path, config, None, worker, number)


def makeSupervisor(reactor: Any, path: str, config: Config, state: LicenseState) -> Any:
    """The supervisor of C{listen.workers} processes (L{mcpgw.fleet.supervisor})."""
    from mcpgw.fleet.supervisor import buildSupervisor

    return buildSupervisor(reactor, path, config, state)


def makeState(reactor: Any, config: Config) -> IStateBackend:
    """
    The C{state.backend}: this process's memory, or a Redis connection (an C{IService} the
    root service starts and stops).
    """
    if config.state.backend == "redis":
        from mcpgw.redisstate import RedisState

        return RedisState(reactor, config.state.redis)
    from mcpgw.buckets import MemoryState

    return MemoryState()
