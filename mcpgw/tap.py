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


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> GatewayService:
    """
    Build the gateway: every service it runs, each handed what it needs (the only place that
    wires them together).

    @param options: L{Options} (or a dict with C{config}, the config file's path or C{None} for
        a config that is not reloaded, and optionally C{loaded}, the parsed
        L{mcpgw.config.Config}, and C{license}, its verified L{mcpgw.license.LicenseState}).
    @param reactor: the reactor; the global one when C{None}.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    from mcpgw.audit.chain import loadSigningKey
    from mcpgw.audit.shipper import ShippingService, WriterSource
    from mcpgw.audit.writer import AuditWriter
    from mcpgw.generation import buildGeneration
    from mcpgw.health import Readiness
    from mcpgw.pinning import PinningService
    from mcpgw.proxy.gateway import Gateway
    from mcpgw.proxy.server import GatewaySite
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

    path: str | None = options.get("config")
    config = options.get("loaded")
    if config is None:
        assert path is not None, "makeService needs a config file or a parsed config"
        config = load_config(path)
    state = options.get("license") or licenseState(config)

    stateBackend = makeState(reactor, config)
    integrity = config.audit.integrity
    writer = AuditWriter(
        reactor,
        config.audit.path,
        config.audit.fsync,
        chain=integrity.chain,
        signingKey=loadSigningKey(integrity.signing_key) if integrity.signing_key else None,
        checkpointLines=integrity.checkpoint.lines,
        checkpointSeconds=integrity.checkpoint.seconds,
    )
    audit = AuditService(writer)
    pool = argon2Pool()
    readiness = Readiness(reactor)
    shipping = ShippingService(reactor, config.audit, WriterSource(writer))
    shipping.setName("shipping")
    readiness.extraChecks.append(shipping.readinessCheck)
    readiness.extraChecks.append(
        lambda: writer.readinessCheck(gateway.generation.config.audit.on_write_failure == "refuse")
    )
    if stateBackend.shared:
        readiness.extraChecks.append(stateBackend.readinessCheck)
    pinning = PinningService(reactor, config.audit.state_dir)
    generation = buildGeneration(reactor, config, authPool=pool, state=stateBackend)
    pinning.configure(generation.config, generation.toolLock)
    gateway = Gateway(reactor, generation, writer, readiness, pins=pinning)
    site = GatewaySite(gateway, reactor, CLIENT_IDLE_TIMEOUT)
    telemetry = Telemetry(reactor, gateway, config.telemetry)
    tls = gateway.generation.tls
    tlsCreator = SwappableServerTLS(tls) if tls is not None else None
    reloader = Reloader(reactor, path, lambda: gateway.generation, pool, tlsCreator)
    license = LicenseService(reactor, state)

    # What a reload reaches: the audit file first (logrotate), then the new generation.
    reloader.onReopen(writer.reopen)
    reloader.onReopen(shipping.auditReopened)
    reloader.subscribe(lambda g: pinning.configure(g.config, g.toolLock))
    reloader.subscribe(gateway.publish)
    reloader.subscribe(lambda g: writer.configChanged(g.config.audit))
    reloader.subscribe(lambda g: shipping.reconfigure(g.config.audit))
    reloader.subscribe(lambda g: telemetry.reconfigure(g.config.telemetry))
    reloader.subscribe(lambda g: license.configChanged(g.config))

    root = GatewayService(
        reactor,
        gateway=gateway,
        reloader=reloader,
        listener=ListenerService(reactor, gateway, site, readiness, tlsCreator),
        audit=audit,
        shipping=shipping,
        telemetry=telemetry,
        readiness=readiness,
    )
    # Started in this order; stopped in GatewayService.stopOrder (the state backend last: the
    # requests drained at stop may still take tokens).
    children: list[Any] = [audit, shipping, PoolService(pool), telemetry, license]
    children += [pinning, reloader]
    if IService.providedBy(stateBackend):
        children.insert(0, stateBackend)
    for child in (*children, root.listener):
        child.setServiceParent(root)
    return root


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
