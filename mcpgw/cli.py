# -*- test-case-name: tests.test_cli,tests.test_cli_policy -*-
"""
The C{mcpgw} command: C{run}, C{config check}, C{policy explain}, C{policy test},
C{tools status}, C{tools approve}, C{key generate}, C{audit verify}, C{audit keygen},
C{license show}, C{--version}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attr

from mcpgw import __version__
from mcpgw.config import POLICY_METHODS, Config, ConfigError, load_config
from mcpgw.policy import LISTED_BY, Caller, Decision, Policy, shadowedRules, unknownKeys

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
    explain.add_argument(
        "target",
        metavar="TARGET",
        help="the tool name, resource URI or prompt name (params.name or params.uri)",
    )
    explain.add_argument("--method", "-m", default="tools/call", help="JSON-RPC method")
    explain.add_argument("--key-id", "-k", default=None, help="authenticated API key id")
    explain.add_argument(
        "--identity",
        "-i",
        default=None,
        help="the principal: certificate, external or OAuth identity (default: the key id)",
    )
    explain.add_argument("--client", default=None, type=_address, help="client IP address")
    explain.add_argument(
        "--arg",
        "-a",
        dest="args",
        action="append",
        default=[],
        type=_argument,
        metavar="NAME=VALUE",
        help="a call argument (NAME may be a dotted path); repeat for several",
    )
    explain.add_argument(
        "--claim",
        dest="claims",
        action="append",
        default=[],
        type=_argument,
        metavar="NAME=VALUE",
        help="a claim of the caller's OAuth token; repeat a NAME for a list claim",
    )
    explain.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        default=[],
        metavar="SCOPE",
        help="a scope granted to the caller's OAuth token (space-separated ones too); repeat",
    )
    test = psub.add_parser(
        "test", help="replay audited calls through a config's policy; print what would change"
    )
    test.add_argument("--config", "-c", default="/etc/mcpgw/mcpgw.yaml", help="YAML config file")
    test.add_argument(
        "--against",
        nargs="+",
        required=True,
        metavar="AUDIT.jsonl",
        help="audit files (rotated ones too, .gz accepted), oldest first",
    )
    test.add_argument(
        "--fail-on-change", action="store_true", help="exit 1 if any decision would change"
    )
    tools = sub.add_parser("tools", help="tool pinning: review and approve tool definitions")
    tsub = tools.add_subparsers(dest="tools_command", metavar="SUBCOMMAND")
    status = tsub.add_parser(
        "status", help="which tool definitions are new or changed since approval, with a diff"
    )
    status.add_argument("--config", "-c", default="/etc/mcpgw/mcpgw.yaml", help="YAML config file")
    approve = tsub.add_parser(
        "approve", help="approve tool definitions: write them to the lock file (then SIGHUP)"
    )
    approve.add_argument(
        "--config", "-c", default="/etc/mcpgw/mcpgw.yaml", help="YAML config file"
    )
    approve.add_argument(
        "targets",
        nargs="*",
        metavar="UPSTREAM/TOOL[@sha256:HEX]",
        help="tools to approve: their latest remembered definition, or exactly that digest",
    )
    approve.add_argument(
        "--all", action="store_true", help="approve every new or changed remembered definition"
    )
    audit = sub.add_parser("audit", help="audit trail tools")
    asub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    verify = asub.add_parser(
        "verify", help="check the hash chain and signed checkpoints of audit files"
    )
    verify.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="audit files, oldest first (rotated ones too, .gz accepted; sink copies too)",
    )
    verify.add_argument(
        "--public-key",
        default=None,
        metavar="KEY",
        help="Ed25519 public key (PEM): check signatures",
    )
    verify.add_argument(
        "--live",
        action="store_true",
        help="the last file is still being written: it need not end with the stop checkpoint",
    )
    verify.add_argument(
        "--sort-by-seq",
        action="store_true",
        help="the files are objects a sink shipped, in any order: order them by their first seq",
    )
    keygen = asub.add_parser("keygen", help="write an Ed25519 key pair for signed checkpoints")
    keygen.add_argument(
        "--out",
        default="audit-signing.key",
        metavar="PATH",
        help="private key file (mode 0600; the public key goes to PATH.pub); never overwritten",
    )
    lic = sub.add_parser("license", help="license tools")
    lsub = lic.add_subparsers(dest="license_command", metavar="SUBCOMMAND")
    show = lsub.add_parser("show", help="verify a license offline and print its claims")
    show.add_argument("file")
    return p


def _address(text: str) -> str:
    """An IP address (argparse type)."""
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
    return text


def _argument(text: str) -> tuple[str, str]:
    """C{NAME=VALUE} (argparse type)."""
    name, eq, value = text.partition("=")
    if not eq or not name or not all(name.split(".")):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _arguments(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """C{--arg} values as a C{params.arguments} object: dotted names become nested objects."""
    arguments: dict[str, Any] = {}
    for name, value in pairs:
        *parents, last = name.split(".")
        node = arguments
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[last] = value
    return arguments


class _Lines:
    """The 1-based lines of nodes of a YAML file, by config path (for warnings)."""

    def __init__(self, path: str) -> None:
        import yaml

        self._root: Any = None
        try:
            with open(path, encoding="utf-8") as f:
                self._root = yaml.compose(f, Loader=yaml.SafeLoader)
        except (OSError, yaml.YAMLError):
            pass

    def of(self, *path: str | int) -> int | None:
        """The line of the node at C{path} (mapping keys and list indices), if there is one."""
        import yaml

        node = self._root
        for step in path:
            if isinstance(step, int) and isinstance(node, yaml.SequenceNode):
                node = node.value[step] if step < len(node.value) else None
            elif isinstance(step, str) and isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if getattr(k, "value", None) == step), None)
            else:
                return None
        return None if node is None else node.start_mark.line + 1


def policyWarnings(path: str, config: Config) -> list[str]:
    """
    Warnings that do not make a config invalid: rules that can never match, and C{when.keys}
    entries that name no configured API key.

    @return: lines in the C{path.in.yaml: what is wrong (line N)} shape, in rule order.
    """
    lines = _Lines(path)
    found: list[tuple[int, int, str]] = []
    for index, message in shadowedRules(config.policy):
        line = lines.of("policy", "rules", index)
        where = f" (line {line})" if line is not None else ""
        found.append((index, -1, f"policy.rules[{index}]: {message}{where}"))
    keyIds = [key.id for key in config.auth.keys] if config.auth.enabled else []
    for index, entry, message in unknownKeys(config.policy, keyIds):
        line = lines.of("policy", "rules", index, "when", "keys", entry)
        where = f" (line {line})" if line is not None else ""
        found.append((index, entry, f"policy.rules[{index}].when.keys[{entry}]: {message}{where}"))
    return [text for _, _, text in sorted(found)]


def stateWarnings(config: Any, path: str | None = None) -> list[str]:
    """
    Warnings about where limits live: with several workers (C{listen.workers} other than 1) and
    C{state.backend: memory}, every worker keeps its own rate-limit buckets, input limit and
    brute-force throttle, so the host allows the configured rates once per worker.
    """
    listen = config.listen
    workers = getattr(listen, "workers", 1)
    if workers == 1 or config.state.backend != "memory":
        return []
    limited = [
        name
        for name, present in (
            ("rate_limit rules", any(r.action == "rate_limit" for r in config.policy.rules)),
            ("the input limit", config.limits.input_rate_limit is not None),
            ("the auth throttle", config.auth.enabled and bool(config.auth.keys)),
        )
        if present
    ]
    which = ", ".join(limited) or "rate-limit buckets, the input limit and the auth throttle"
    count = f"auto ({listen.workerCount} here)" if workers == "auto" else workers
    line = _Lines(path).of("listen", "workers") if path is not None else None
    where = f" (line {line})" if line is not None else ""
    return [
        f"state.backend: memory with listen.workers {count}: {which} are per worker (each "
        f"worker allows the configured rates){where}; use state.backend: redis to share them"
    ]


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
    for warning in policyWarnings(path, config) + stateWarnings(config, path):
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


def _loadPolicyConfig(path: str) -> Config | None:
    """The config at C{path}, or C{None} after printing its problems on stderr."""
    try:
        return load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return None


def policyExplain(
    path: str,
    target: str,
    method: str,
    keyId: str | None,
    identity: str | None = None,
    client: str | None = None,
    arguments: Sequence[tuple[str, str]] = (),
    claims: Sequence[tuple[str, str]] = (),
    scopes: Sequence[str] = (),
) -> int:
    """
    Print which rule decides a call of C{method} on C{target} by that caller with those
    arguments, every rule checked before it and why it did not match; 1 if the config is invalid.
    """
    config = _loadPolicyConfig(path)
    if config is None:
        return 1
    policy = Policy.fromConfig(config.policy)
    if method not in POLICY_METHODS:
        print(f"method: {method}")
        print(
            f"decision: allow (policy decides {', '.join(POLICY_METHODS)} only; other methods "
            "pass, audited)"
        )
        return 0
    tokenClaims: dict[str, Any] | None = None
    if claims:
        tokenClaims = {}
        for name, value in claims:
            if name in tokenClaims:
                old = tokenClaims[name]
                tokenClaims[name] = [*old, value] if isinstance(old, list) else [old, value]
            else:
                tokenClaims[name] = value
    caller = Caller(
        keyId=keyId,
        principal=identity or keyId,
        client=client,
        claims=tokenClaims,
        scopes=frozenset(s for text in scopes for s in text.split()),
    )
    args = _arguments(arguments) if arguments else None
    print(policy.explain(method, target, caller, args).render())
    decision = policy.decide(method, target, caller, args)
    if decision.action == "rate_limit":
        assert decision.rule_id is not None
        print(f"rate limit bucket: {_bucketText(config, decision.rule_id, keyId, identity)}")
    elif decision.action == "deny":
        print(
            "answer: HTTP 403, JSON-RPC error -32001 policy_denied; the upstream is not contacted"
        )
    if decision.redact_results:
        print(f"results: scrubbed by redact_results of rule {decision.rule_id}")
    if config.policy.filter_tools_list:
        listing = next(m for m, called in LISTED_BY.items() if called == method)
        shown = "shown" if policy.allows(method, target, caller) else "hidden"
        print(f"{listing}: {shown}")
    return 0


def _bucketText(config: Config, ruleId: str, keyId: str | None, identity: str | None) -> str:
    """Whose token bucket a call decided by the C{rate_limit} rule C{ruleId} takes from."""
    rule = next(r for r in config.policy.rules if r.id == ruleId)
    per = rule.rate_limit.per if rule.rate_limit is not None else "session"
    key = f"key id {keyId}" if keyId else "the authenticated key id"
    who = f"principal {identity or keyId}" if identity or keyId else "the principal"
    return {
        "session": f"per rule {ruleId} and session: the Mcp-Session-Id, else {key}, "
        "else the client address",
        "key": f"per rule {ruleId} and API key: {key}, else the client address",
        "identity": f"per rule {ruleId} and identity: {who}, else the client address",
        "client": f"per rule {ruleId} and client address",
        "global": f"per rule {ruleId}: one bucket for every caller",
    }[per]


#: Audit C{error} values of requests policy decided (the others were refused before it, or are
#: policy's own refusals, recognised by their decision).
_AFTER_POLICY = frozenset(
    {None, "upstream_unavailable", "upstream_bad_response", "upstream_timeout"}
)


@attr.frozen
class _Replayed:
    """One audited call whose decision would change."""

    where: str
    line: dict[str, Any]
    method: str
    target: str
    caller: Caller
    new: Decision


def _auditLines(path: str) -> Iterator[tuple[int, str]]:
    """The numbered lines of an audit file (gzip-compressed when its name ends in .gz)."""
    import gzip

    opener: Any = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        yield from enumerate(f, 1)


def _parseLine(text: str) -> dict[str, Any] | None:
    """One audit line as an object, or C{None} (blank, truncated or not an object)."""
    try:
        line = json.loads(text)
    except ValueError:
        return None
    return line if isinstance(line, dict) else None


def _callerOf(line: dict[str, Any]) -> Caller:
    """
    The caller of an audited request: the key id of an API-key request, the principal (or, in
    lines written before C{principal} existed, the key or certificate identity), the address and
    the session.
    """
    result = line.get("auth_result")
    keyId = line.get("auth_key_id")
    principal = line.get("principal")
    if "principal" not in line and result in ("ok", "mtls"):
        principal = keyId
    return Caller(
        keyId=keyId if result == "ok" else None,
        principal=principal,
        client=line.get("client_ip"),
        session=line.get("session_id"),
    )


def _changes(old: str | None, oldRule: str | None, new: Decision) -> bool:
    """
    Whether an audited decision differs from the new one. A rate-limited call that got a token
    was audited as C{allow} with the rule's id, so the same rule rate-limiting it is no change;
    nor is another rate limit for a call that was refused by one (that depends on traffic).
    """
    if new.action == "rate_limit":
        return not (old == "rate_limit" or (old == "allow" and oldRule == new.rule_id))
    return old != new.action


def policyTest(path: str, audits: Sequence[str], failOnChange: bool) -> int:
    """
    Replay the calls of audit files through the policy of the config at C{path} and print, grouped
    by the rule that would decide and the caller, every call whose decision would change.

    @return: 0; 1 with C{failOnChange} if a decision would change; 2 if the config is invalid or
        an audit file cannot be read.
    """
    config = _loadPolicyConfig(path)
    if config is None:
        return 2
    policy = Policy.fromConfig(config.policy)
    replayed = 0
    changed: dict[tuple[str, str], list[_Replayed]] = {}
    needArguments: dict[str, int] = {}
    skipped = {
        "unreadable": 0,
        "batch": 0,
        "refused before policy": 0,
        "refused by tool pinning": 0,
        "without a target": 0,
    }
    # The audit keeps an OAuth caller's principal, not its token's claims and scopes.
    onToken = any(
        r.when is not None and (r.when.claims or r.when.scopes) for r in config.policy.rules
    )
    tokenNote = "of OAuth token callers (rules on claims or scopes; the audit does not keep them)"
    skipped[tokenNote] = 0
    for audit in audits:
        try:
            for number, text in _auditLines(audit):
                line = _parseLine(text)
                if line is None:
                    skipped["unreadable"] += bool(text.strip())
                    continue
                method = line.get("method")
                if method not in POLICY_METHODS:
                    continue
                decision = line.get("decision")
                if line.get("batch_size") is not None:
                    skipped["batch"] += 1
                    continue
                if line.get("error") == "tool_not_approved":
                    skipped["refused by tool pinning"] += 1
                    continue
                if line.get("error") not in _AFTER_POLICY and decision not in (
                    "deny",
                    "rate_limit",
                ):
                    skipped["refused before policy"] += 1
                    continue
                target = line.get("target") if line.get("target") is not None else line.get("tool")
                if target is None and method == "tools/call":
                    target = ""  # decided as the empty name, as the gateway does
                if not isinstance(target, str):
                    skipped["without a target"] += 1
                    continue
                if onToken and line.get("auth_result") == "oauth":
                    skipped[tokenNote] += 1
                    continue
                caller = _callerOf(line)
                new = policy.decideWithoutArguments(method, target, caller)
                if new is None:
                    blocking = _argumentRule(policy, method, target, caller)
                    needArguments[blocking] = needArguments.get(blocking, 0) + 1
                    continue
                replayed += 1
                if _changes(decision, line.get("rule_id"), new):
                    group = (new.rule_id or "", caller.describe())
                    changed.setdefault(group, []).append(
                        _Replayed(f"{audit}:{number}", line, method, target, caller, new)
                    )
        except (OSError, EOFError) as e:
            print(f"mcpgw: cannot read {audit}: {e}", file=sys.stderr)
            return 2
    total = sum(len(calls) for calls in changed.values())
    print(
        f"replayed {replayed} call(s) from {len(audits)} audit file(s) through {path}: "
        f"{total} would change, {replayed - total} unchanged"
    )
    if needArguments:
        rules = ", ".join(f"{rule} ({n})" for rule, n in sorted(needArguments.items()))
        print(
            f"not replayed: {sum(needArguments.values())} call(s): a rule with argument "
            f"conditions would need their arguments, which the audit does not keep: {rules}"
        )
    notes = [f"{n} {what}" for what, n in skipped.items() if n]
    if notes:
        print(f"skipped lines: {', '.join(notes)}")
    for (ruleId, who), calls in sorted(changed.items()):
        first = calls[0].new
        rule = f"rule {ruleId}" if ruleId else "default_action"
        print(f"\n{rule} ({first.action}), caller {who}: {len(calls)} call(s)")
        for c in calls:
            was = c.line.get("decision")
            oldRule = c.line.get("rule_id")
            by = f"rule {oldRule}" if oldRule else "default"
            print(
                f"  {c.line.get('ts')} {c.line.get('request_id')} {c.method} {c.target}: "
                f"was {was} ({by}), would be {c.new.action}  [{c.where}]"
            )
    return 1 if failOnChange and total else 0


def _argumentRule(policy: Policy, method: str, target: str, caller: Caller) -> str:
    """The first rule with argument conditions a call would have to be decided by."""
    explanation = policy.explain(method, target, caller)
    for (ruleId, _), reason in zip(explanation.checked, explanation.reasons, strict=True):
        if reason.startswith("when.arguments."):
            return ruleId
    return explanation.decision.rule_id or "?"


def _pinningState(
    path: str,
) -> tuple[Config, dict[tuple[str, str], str], dict[str, dict[str, Any]], str] | None:
    """
    The config, its lock file and the remembered definitions (and their file), or C{None} after
    printing why one cannot be read.
    """
    from mcpgw.pinning import LockError, StoreError, readLock, readStore, storePath

    config = _loadPolicyConfig(path)
    if config is None:
        return None
    store = storePath(config.audit.state_dir)
    try:
        return config, readLock(config.tools.pinning.lock_file), readStore(store), store
    except (LockError, StoreError) as e:
        print(f"mcpgw: {e}", file=sys.stderr)
        return None


def _prettyDefinition(definition: Any) -> list[str]:
    """A definition as indented JSON lines (keys sorted), for reading and diffs."""
    if definition is None:
        return []
    return json.dumps(definition, indent=2, sort_keys=True, ensure_ascii=False).splitlines()


def toolsStatus(path: str) -> int:
    """
    Print, per upstream, every tool whose latest remembered definition the lock file does not
    approve (new, or changed with a diff against the approved definition when it is remembered).

    @return: 0 every remembered tool is approved as last listed; 1 some are new or changed;
        2 the config, lock file or remembered definitions cannot be read.
    """
    import difflib

    from mcpgw.pinning import CHANGED, NEW

    state = _pinningState(path)
    if state is None:
        return 2
    config, lock, store, storeFile = state
    pinning = config.tools.pinning
    print(f"tool pinning: mode {pinning.mode}")
    print(f"lock file: {pinning.lock_file} ({len(lock)} approved)")
    print(f"remembered definitions: {storeFile}")
    if pinning.mode == "off":
        print("(mode off: the gateway neither checks nor remembers tool definitions)")
    pending: list[str] = []
    current = unseen = 0
    for upstream in (u.name for u in config.upstreams):
        tools = store.get(upstream)
        tools = tools if isinstance(tools, dict) else {}
        approved = {tool: digest for (up, tool), digest in lock.items() if up == upstream}
        unseen += len(approved.keys() - tools.keys())
        for name in sorted(tools):
            entry = tools[name]
            latest = entry.get("latest") if isinstance(entry, dict) else None
            if not isinstance(latest, str):
                continue
            was = approved.get(name)
            if was == latest:
                current += 1
                continue
            versions = entry.get("versions")
            versions = versions if isinstance(versions, dict) else {}
            listed = versions.get(latest) or {}
            verdict = NEW if was is None else CHANGED
            pending.append(f"{upstream}/{name}@sha256:{latest}")
            print(
                f"\n{upstream}/{name}: {verdict}, sha256:{latest} "
                f"(first listed {listed.get('first_seen', '?')})"
            )
            old: Any = None
            if was is not None:
                print(f"  approved: sha256:{was}")
                old = (versions.get(was) or {}).get("definition")
                if old is None:
                    print("  (the approved definition is not remembered here: showing it whole)")
            new = listed.get("definition")
            if new is None:
                print("  (the listed definition is too large to remember)")
                continue
            diff = difflib.unified_diff(
                _prettyDefinition(old),
                _prettyDefinition(new),
                f"{upstream}/{name} approved" if old is not None else "(not approved)",
                f"{upstream}/{name} listed",
                lineterm="",
            )
            for line in diff:
                print(f"  {line}")
    print(
        f"\n{len(pending)} new or changed, {current} approved and unchanged, {unseen} approved "
        "but not listed since the definitions were remembered"
    )
    if pending:
        print(f"after review: mcpgw tools approve --config {path} {' '.join(pending)}")
        return 1
    return 0


def _target(text: str, upstreams: Sequence[str]) -> tuple[str, str, str | None] | None:
    """C{UPSTREAM/TOOL[@sha256:HEX]} of a configured upstream (names may hold a C{/})."""
    spec, at, digest = text.partition("@")
    for upstream in sorted(upstreams, key=len, reverse=True):
        if spec.startswith(upstream + "/") and len(spec) > len(upstream) + 1:
            if not at:
                return upstream, spec[len(upstream) + 1 :], None
            if digest.startswith("sha256:") and len(digest) == 71:
                hexa = digest[7:]
                if all(c in "0123456789abcdef" for c in hexa):
                    return upstream, spec[len(upstream) + 1 :], hexa
            return None
    return None


def toolsApprove(path: str, targets: Sequence[str], everything: bool) -> int:
    """
    Approve tool definitions: write their digests to the lock file, atomically.

    @param targets: C{UPSTREAM/TOOL} (its latest remembered definition) or
        C{UPSTREAM/TOOL@sha256:HEX} (exactly that definition, remembered or not).
    @param everything: approve every remembered definition that is new or changed.
    @return: 0 the lock file was written (or already approved everything asked); 1 a target
        names no configured upstream, has no remembered definition or a malformed digest
        (nothing written); 2 no target, or the config, lock file or remembered definitions
        cannot be read, or the lock file cannot be written.
    """
    from mcpgw.pinning import formatLock, writeAtomically

    if not targets and not everything:
        print("mcpgw tools approve: name UPSTREAM/TOOL ... or give --all", file=sys.stderr)
        return 2
    state = _pinningState(path)
    if state is None:
        return 2
    config, lock, store, _ = state
    upstreams = [u.name for u in config.upstreams]
    chosen: dict[tuple[str, str], str] = {}
    if everything:
        for upstream in upstreams:
            tools = store.get(upstream)
            for name, entry in (tools if isinstance(tools, dict) else {}).items():
                latest = entry.get("latest") if isinstance(entry, dict) else None
                if isinstance(latest, str):
                    chosen[(upstream, name)] = latest
    for text in targets:
        target = _target(text, upstreams)
        if target is None:
            print(
                f"mcpgw: {text!r} is not UPSTREAM/TOOL[@sha256:HEX] of a configured upstream "
                f"({', '.join(upstreams)}); nothing written",
                file=sys.stderr,
            )
            return 1
        upstream, name, digest = target
        if digest is None:
            entry = (store.get(upstream) or {}).get(name)
            digest = entry.get("latest") if isinstance(entry, dict) else None
            if not isinstance(digest, str):
                print(
                    f"mcpgw: no remembered definition of {upstream}/{name}: the gateway has not "
                    "listed it with pinning on (warn or enforce); nothing written",
                    file=sys.stderr,
                )
                return 1
        chosen[(upstream, name)] = digest
    changes = {key: digest for key, digest in chosen.items() if lock.get(key) != digest}
    if not changes:
        print(f"nothing to approve: {config.tools.pinning.lock_file} already approves them")
        return 0
    for (upstream, name), digest in sorted(changes.items()):
        before = lock.get((upstream, name))
        was = f"was sha256:{before}" if before else "new"
        print(f"approved {upstream}/{name} sha256:{digest} ({was})")
    lockFile = config.tools.pinning.lock_file
    try:
        writeAtomically(lockFile, formatLock({**lock, **changes}).encode())
    except OSError as e:
        print(f"mcpgw: cannot write {lockFile}: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {lockFile} ({len(lock.keys() | changes.keys())} approved tool(s)). The gateway "
        "reads it on reload: send it SIGHUP (systemctl reload mcpgw, or kill -HUP <pid>)."
    )
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


def auditVerify(
    files: Sequence[str], publicKeyPath: str | None, live: bool, sortBySeq: bool = False
) -> int:
    """
    Check the chain and checkpoints of audit files (oldest first).

    @return: 0 intact, 1 broken (the first break printed: file, line, kind) or unreadable key.
    """
    from mcpgw.audit.chain import bySeq, describe, loadPublicKey, verify

    key = None
    if publicKeyPath is not None:
        try:
            key = loadPublicKey(publicKeyPath)
        except (OSError, ValueError) as e:
            print(f"mcpgw: cannot use the public key: {e}", file=sys.stderr)
            return 1
    if sortBySeq:
        try:
            files = bySeq(files)
        except OSError as e:
            print(f"mcpgw: {e}", file=sys.stderr)
            return 1
    report = verify(files, key, live)
    if report.brk is not None:
        print(f"BROKEN: {report.brk}")
        print(
            f"verified {report.lines} chained line(s) up to seq {report.lastSeq} before the break"
        )
        return 1
    print(describe(report, key))
    return 0


def auditKeygen(out: str) -> int:
    """Write an Ed25519 key pair: C{out} (private, 0600) and C{out}.pub."""
    from mcpgw.audit.chain import keygen

    try:
        kid = keygen(out, out + ".pub")
    except OSError as e:
        print(f"mcpgw: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (private, keep it on the gateway host) and {out}.pub (key id {kid})")
    print(f"config: audit: {{integrity: {{chain: true, signing_key: {out}}}}}")
    print(f"verify: mcpgw audit verify --public-key {out}.pub FILE...")
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
        return policyExplain(
            args.config,
            args.target,
            args.method,
            args.key_id,
            args.identity,
            args.client,
            args.args,
            args.claims,
            args.scopes,
        )
    if args.command == "policy" and args.policy_command == "test":
        return policyTest(args.config, args.against, args.fail_on_change)
    if args.command == "tools" and args.tools_command == "status":
        return toolsStatus(args.config)
    if args.command == "tools" and args.tools_command == "approve":
        return toolsApprove(args.config, args.targets, args.all)
    if args.command == "audit" and args.audit_command == "verify":
        return auditVerify(args.files, args.public_key, args.live, args.sort_by_seq)
    if args.command == "audit" and args.audit_command == "keygen":
        return auditKeygen(args.out)
    if args.command == "license" and args.license_command == "show":
        return licenseShow(args.file)
    _parser().print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
