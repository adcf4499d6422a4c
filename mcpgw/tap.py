# -*- test-case-name: tests.test_tap -*-
"""
The composition root: C{twistd mcpgw} options and L{makeService}. C{mcpgw run} builds the same
service through L{makeService}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from mcpgw.config import Config, ConfigError, Problem, load_config
from mcpgw.license import LicenseService, LicenseState, licenseState


def loadChecked(path: str) -> tuple[Config, LicenseState]:
    """
    Everything a start checks before serving: the config, the license it names, and the TLS
    files (certificate, key, client CA) it points to.

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


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> IService:
    """
    Build the gateway service from parsed options.

    @param options: L{Options} (or a dict with C{config} and optionally C{loaded}, the parsed
        L{mcpgw.config.Config}, and C{license}, its verified L{mcpgw.license.LicenseState}).
    @param reactor: the reactor; the global one when C{None}.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    from mcpgw.service import GatewayService

    config = options.get("loaded") or load_config(options["config"])
    state = options.get("license") or licenseState(config)
    service = GatewayService(reactor, options["config"], config)
    LicenseService(reactor, state, lambda: service.generation.config).setServiceParent(service)
    return service
