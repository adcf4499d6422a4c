# -*- test-case-name: tests.test_cli -*-
"""
The C{mcpgw} command: C{run}, C{config check}, C{--version}.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mcpgw import __version__
from mcpgw.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcpgw", description="Model Context Protocol gateway")
    p.add_argument("--version", action="version", version=f"mcpgw {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the gateway in the foreground (same as twistd -n mcpgw)")
    run.add_argument("--config", "-c", default="/etc/mcpgw/mcpgw.yaml", help="YAML config file")
    config = sub.add_parser("config", help="configuration tools")
    csub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    check = csub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    return p


def configCheck(path: str) -> int:
    """Print every problem of the config at C{path}; 0 if valid, 1 if not."""
    try:
        config = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        print(f"{path}: {len(e.problems)} problem(s)", file=sys.stderr)
        return 1
    ups = ", ".join(f"{u.name} ({u.path} -> {u.url})" for u in config.upstreams)
    print(f"{path}: OK ({len(config.upstreams)} upstream(s): {ups})")
    return 0


def run(path: str) -> int:
    """Run the gateway in the foreground until SIGTERM/SIGINT; the service of C{twistd mcpgw}."""
    try:
        config = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from mcpgw.logging import jsonObserver
    from mcpgw.tap import makeService

    globalLogBeginner.beginLoggingTo([jsonObserver()], redirectStandardIO=False)
    service = makeService({"config": path, "loaded": config}, reactor)
    try:
        service.startService()
    except Exception as e:
        print(f"mcpgw: cannot start: {e}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args.config)
    if args.command == "config" and args.config_command == "check":
        return configCheck(args.file)
    _parser().print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
