# -*- test-case-name: tests.test_cli -*-
"""
The C{mcpgw} command: C{run}, C{config check}, C{policy explain}, C{key generate},
C{license show}, C{--version}.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mcpgw import __version__
from mcpgw.config import Config, ConfigError, load_config
from mcpgw.policy import Policy, shadowedRules

if TYPE_CHECKING:
    from mcpgw.license import LicenseState


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
    key = sub.add_parser("key", help="API keys")
    ksub = key.add_subparsers(dest="key_command", metavar="SUBCOMMAND")
    generate = ksub.add_parser("generate", help="print a new API key and its auth.keys entry")
    generate.add_argument("--id", default=None, help="the key id (default: a random one)")
    policy = sub.add_parser("policy", help="policy tools")
    psub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    explain = psub.add_parser("explain", help="which rule decides a call, and why")
    explain.add_argument("--config", "-c", default="/etc/mcpgw/mcpgw.yaml", help="YAML config file")
    explain.add_argument("tool", help="the tool name (params.name of tools/call)")
    explain.add_argument("--method", "-m", default="tools/call", help="JSON-RPC method")
    explain.add_argument("--key-id", "-k", default=None, help="authenticated API key id")
    lic = sub.add_parser("license", help="license tools")
    lsub = lic.add_subparsers(dest="license_command", metavar="SUBCOMMAND")
    show = lsub.add_parser("show", help="verify a license offline and print its claims")
    show.add_argument("file")
    return p


def _ruleLines(path: str) -> list[int | None]:
    """The 1-based line of each C{policy.rules} entry in the YAML file (for warnings)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            root = yaml.compose(f, Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return []
    node: Any = root
    for key in ("policy", "rules"):
        if not isinstance(node, yaml.MappingNode):
            return []
        node = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in node.value]


def policyWarnings(path: str, config: Config) -> list[str]:
    """
    Warnings that do not make a config invalid: rules that can never match.

    @return: lines in the C{path.in.yaml: what is wrong (line N)} shape.
    """
    lines = _ruleLines(path)
    out = []
    for index, message in shadowedRules(config.policy):
        line = lines[index] if index < len(lines) else None
        where = f" (line {line})" if line is not None else ""
        out.append(f"policy.rules[{index}]: {message}{where}")
    return out


def _loadOrReport(path: str, summary: bool = False) -> tuple[Config, LicenseState] | None:
    """The checked config and license, or None after printing every problem on stderr."""
    from mcpgw.tap import loadChecked

    try:
        return loadChecked(path)
    except ConfigError as e:
        for problem in e.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        if summary:
            print(f"{path}: {len(e.problems)} problem(s)", file=sys.stderr)
        return None


def configCheck(path: str) -> int:
    """Print every problem of the config at C{path}; 0 if valid, 1 if not."""
    loaded = _loadOrReport(path, summary=True)
    if loaded is None:
        return 1
    config, state = loaded
    for warning in policyWarnings(path, config):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    for level, text in state.messages(time.time()):
        if level == "warn":
            print(f"{path}: warning: {text}", file=sys.stderr)
    ups = ", ".join(f"{u.name} ({u.path} -> {u.url})" for u in config.upstreams)
    print(f"{path}: OK ({len(config.upstreams)} upstream(s): {ups})")
    return 0


def keyGenerate(keyId: str | None) -> int:
    """Print a new API key once, and the YAML entry with its Argon2id hash."""
    import secrets

    from mcpgw.auth import generateKey, hashKey

    keyId = keyId or f"key-{secrets.token_hex(3)}"
    key = generateKey()
    print(f"# New API key {keyId!r}. It is shown only this once: store it in a secret manager.")
    print(f"key: {key}")
    print("# Paste under auth.keys in the config, then reload (systemctl reload mcpgw):")
    print(f"    - id: {keyId}")
    print(f"      hash: '{hashKey(key)}'")
    return 0


def policyExplain(path: str, tool: str, method: str, keyId: str | None) -> int:
    """Print which rule decides a call of C{tool} and why; 1 if the config is invalid."""
    try:
        config = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1
    policy = Policy.fromConfig(config.policy)
    if method != "tools/call":
        print(f"method: {method}")
        print("decision: allow (policy applies to tools/call only; other methods pass, audited)")
        return 0
    print(policy.explain(tool).render())
    decision = policy.decide(tool)
    if decision.action == "rate_limit":
        key = f"key id {keyId}" if keyId else "the authenticated key id"
        print(
            f"rate limit bucket: per rule {decision.rule_id} and session: the Mcp-Session-Id, "
            f"else {key}, else the client address"
        )
    elif decision.action == "deny":
        print(
            "answer: HTTP 403, JSON-RPC error -32001 policy_denied; the upstream is not contacted"
        )
    if config.policy.filter_tools_list:
        shown = "shown" if policy.allows(tool) else "hidden"
        print(f"tools/list: {shown}")
    return 0


def licenseShow(path: str) -> int:
    """
    Verify the license file at C{path} offline and print its claims.

    @return: 0 valid; 1 unreadable or invalid (bad signature, unknown key, wrong product,
        malformed); 3 genuine but expired or not yet valid.
    """
    from mcpgw.license import LicenseError, loadLicense

    try:
        lic = loadLicense(path)
    except LicenseError as e:
        print(f"mcpgw: license {path}: {e}", file=sys.stderr)
        return 1
    now = time.time()
    print(f"license: {path}")
    print(lic.render(now))
    if lic.status(now) != "valid":
        print(f"mcpgw: license {path}: {lic.describeStatus(now)}", file=sys.stderr)
        return 3
    return 0


def run(path: str) -> int:
    """Run the gateway in the foreground until SIGTERM/SIGINT; the service of C{twistd mcpgw}."""
    loaded = _loadOrReport(path)
    if loaded is None:
        return 1
    config, state = loaded

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from mcpgw.logging import jsonObserver
    from mcpgw.tap import makeService

    globalLogBeginner.beginLoggingTo([jsonObserver()], redirectStandardIO=False)
    try:
        service = makeService({"config": path, "loaded": config, "license": state}, reactor)
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
    if args.command == "key" and args.key_command == "generate":
        return keyGenerate(args.id)
    if args.command == "policy" and args.policy_command == "explain":
        return policyExplain(args.config, args.tool, args.method, args.key_id)
    if args.command == "license" and args.license_command == "show":
        return licenseShow(args.file)
    _parser().print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
