# -*- test-case-name: tests.test_policy,tests.test_policy_conditions -*-
"""
The policy engine: which rule decides a C{tools/call}, C{resources/read} or C{prompts/get} for a
given caller and arguments, the verdict on a whole request (batches), redaction of arguments and
of results, and the token buckets of C{rate_limit} rules.

Pure logic: no I/O and no reactor; time is passed in as C{now} (seconds, any monotonic clock).
One L{Policy} is compiled per config generation by L{Policy.fromConfig}. The token buckets come
from an L{mcpgw.interfaces.IStateBackend}: in memory they answer at once; in Redis they answer
later, and then L{Policy.verdict} returns a Deferred of its verdict.

A rule matches a call when its C{method} is the call's method, its matcher matches the call's
target (the tool name, the resource URI, the prompt name) and every C{when} condition holds:
  - C{exact}: the target equals the value; C{list}: the target is one of the values.
  - C{prefix}: the target starts with the value.
  - C{glob}: L{fnmatch.fnmatchcase} semantics (case-sensitive; C{*}, C{?}, C{[seq]}, C{[!seq]}).
  - C{regex}: L{re.search}: a regex matches if it matches anywhere in the target; anchors
    (C{^...$}) are the author's to write.
  - C{when.keys} / C{when.identities}: a glob matches the API key id / the principal;
    C{when.claims}: for each claim named, one of its globs matches the OAuth token's claim (any
    item of a list claim; numbers and booleans as their JSON text; a name with dots that is not
    a claim of its own reaches into nested objects); C{when.scopes}: the token was granted every
    scope listed;
    C{when.clients}: the client address is in one of the networks; C{when.arguments}: the
    argument at each dotted path, as text (strings as they are, numbers and booleans as their
    JSON text), matches its matcher. A condition about something absent (no key, no principal, no
    address, no such argument, a null, an object or an array) never holds.
The first rule that matches decides, whether or not it has conditions; else the default action of
the call's method (L{PolicyConfig.defaultFor}).

Cost: the rules of each method are indexed by target: exact and list names are one dict lookup,
prefixes one dict lookup per distinct prefix length, a glob that is a literal or a literal followed
by one C{*} is indexed like an exact or a prefix rule; only the remaining globs and regexes are
scanned, and only those before the first unconditional indexed match. Conditions are only
evaluated for rules whose method and target already matched, caller conditions before argument
conditions. Decisions are memoised per (method, target) and, when some rule has caller conditions,
per the parts of the caller rules look at, in a bounded cache; when argument-conditioned rules
match the target, what is memoised is the short list of them left to try in order, so a warm
decision costs one dict lookup (plus one matcher per argument-conditioned candidate).
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import math
import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import lru_cache
from typing import Any, TypeAlias

import attr
from twisted.internet.defer import Deferred, gatherResults
from zope.interface import Attribute, Interface, implementer

from mcpgw.buckets import MemoryState
from mcpgw.config import POLICY_METHODS, Conditions, MatchSpec, PolicyConfig, PolicyRule
from mcpgw.errors import GatewayError, PolicyDenied, RateLimited
from mcpgw.interfaces import IBuckets, IStateBackend

__all__ = [
    "ANONYMOUS",
    "BUILTIN_PATTERNS",
    "LISTED_BY",
    "POLICY_METHODS",
    "REDACTED",
    "Caller",
    "Decision",
    "Explanation",
    "IPolicy",
    "Policy",
    "Verdict",
    "addressIn",
    "shadowedRules",
    "unknownKeys",
]

#: What a redacted match is replaced with.
REDACTED = "[REDACTED]"

#: The built-in redactions (L{mcpgw.config.BUILTIN_REDACTIONS}), as regular expressions.
BUILTIN_PATTERNS: dict[str, str] = {
    # RFC 6750 b64token after the scheme; the whole "Bearer <token>" is replaced.
    "bearer": r"(?i)\bbearer[ \t]+[A-Za-z0-9._~+/-]+=*",
    # OpenAI keys: sk-..., sk-proj-..., sk-svcacct-...: at least 20 characters after "sk-".
    "openai_key": r"\bsk-[A-Za-z0-9_-]{20,}",
    # AWS access key ids: long-term (AKIA) and temporary (ASIA).
    "aws_access_key": r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",
    # JWS compact serialisation: three base64url segments, the header starting with '{"'.
    "jwt": r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
}

#: The listing methods, and the method whose policy decides what their answers show.
LISTED_BY: dict[str, str] = {
    "tools/list": "tools/call",
    "resources/list": "resources/read",
    "resources/templates/list": "resources/read",
    "prompts/list": "prompts/get",
}

#: The C{params} member naming the target of each method policy decides.
_TARGET_PARAM = {"tools/call": "name", "resources/read": "uri", "prompts/get": "name"}

_DEFAULT_CACHE_SIZE = 4096
_DEFAULT_MAX_BUCKETS = 1_000_000
#: Listing answers memoised, all callers together, before they are all dropped (about 100
#: bytes each): a bound however many callers and targets there are.
_MAX_LISTED = 65536
_GLOB_SPECIALS = frozenset("*?[")
#: No rule: an index past every rule.
_NONE = [1 << 62]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@attr.frozen
class Caller:
    """
    Who makes a call, as policy sees it. Build it from the request's authentication
    (L{mcpgw.auth.AuthResult.caller}).

    @ivar keyId: the authenticated API key id (C{when.keys}).
    @ivar principal: the identity C{when.identities} matches: the key id, the verified client
        certificate identity, the identity an auth proxy vouched for, the OAuth principal.
    @ivar client: the client address (C{when.clients}).
    @ivar session: the MCP session id (the C{session} rate-limit bucket).
    @ivar claims: the OAuth access token's claims (C{when.claims}), else C{None}.
    @ivar scopes: the OAuth access token's scopes (C{when.scopes}).
    """

    keyId: str | None = None
    principal: str | None = None
    client: str | None = None
    session: str | None = None
    claims: Mapping[str, object] | None = attr.field(default=None, hash=False)
    scopes: frozenset[str] = frozenset()

    def describe(self) -> str:
        """
        @return: human text, e.g. C{"key ci-bot, principal ci-bot, client 10.0.0.1"}.
        """
        parts = [
            f"{label} {value}"
            for label, value in (
                ("key", self.keyId),
                ("principal", self.principal),
                ("client", self.client),
            )
            if value is not None
        ]
        if self.scopes:
            parts.append(f"scopes {' '.join(sorted(self.scopes))}")
        if self.claims:
            shown = ", ".join(f"{k}={v}" for k, v in self.claims.items())
            parts.append(f"claims {shown}")
        return ", ".join(parts) or "anonymous"


#: The caller of a request nothing is known about.
ANONYMOUS = Caller()


class IPolicy(Interface):
    """The compiled policy of one config generation."""

    defaultAction = Attribute("C{'allow'} or C{'deny'}: tools/call's action when no rule matches.")
    filterToolsList = Attribute("Whether listing answers leave out what policy would deny.")
    dependsOnCaller = Attribute("Whether some rule has C{keys}, C{identities} or C{clients}.")
    ruleIds = Attribute("The rule ids, in order.")

    def decide(
        method: str, target: str | None = None, caller: Caller = ANONYMOUS, arguments: object = None
    ) -> Decision:
        """
        The L{Decision} for a call of C{method} on C{target} by C{caller} with C{arguments};
        C{decide(tool)} is a C{tools/call} of C{tool} by an anonymous caller.
        """

    def allows(method: str, target: str | None = None, caller: Caller = ANONYMOUS) -> bool:
        """Whether C{target} is listed for C{caller}; C{allows(tool)}: a tool, anonymously."""

    def lister(method: str, caller: Caller = ANONYMOUS) -> Callable[[str], bool]:
        """L{allows} for one method and caller, as a memoised function of the target."""

    def canDeny(method: str) -> bool:
        """Whether some call of C{method} can be denied (else its listings need no filter)."""

    def defaultFor(method: str) -> str:
        """The action for a call of C{method} that no rule matches."""

    def verdict(
        messages: Sequence[Any], caller: Caller, now: float
    ) -> Verdict | Deferred[Verdict]:
        """
        The decision on a whole request (one message or a batch); a Deferred of it when a
        rate-limit bucket answers later (a shared state backend).
        """

    def explain(
        method: str, target: str | None = None, caller: Caller = ANONYMOUS, arguments: object = None
    ) -> Explanation:
        """Why a call gets the decision it gets."""

    def redact(rule_id: str, arguments: object) -> tuple[object, int]:
        """A redacted copy of C{arguments} and the number of string values changed."""

    def redactResult(rule_id: str, result: object) -> tuple[object, int]:
        """A copy of a call's C{result} scrubbed by the rule's C{redact_results}, and the count."""

    def bucketKey(rule_id: str, caller: Caller) -> str:
        """Whose bucket of the C{rate_limit} rule C{rule_id} a call by C{caller} takes from."""

    def rateLimit(rule_id: str, session: str, now: float) -> float | None:
        """Take a token: C{None} if allowed, else the seconds until one is available."""


@attr.frozen
class Decision:
    """
    What policy says about one call.

    @ivar action: C{allow}, C{deny}, C{redact} or C{rate_limit}.
    @ivar rule_id: the deciding rule, or C{None} when the default action decided.
    @ivar matcher: what matched, e.g. C{"prefix 'admin_'"}; C{None} for the default.
    @ivar redact_results: the deciding rule has C{redact_results}: the call's result must be
        scrubbed with L{Policy.redactResult}C{(rule_id, ...)}.
    """

    action: str
    rule_id: str | None
    matcher: str | None
    redact_results: bool = False


#: The decision for a method policy does not decide.
PASS = Decision("allow", None, None)


@attr.frozen(eq=False)
class Verdict:
    """
    Policy's decision on a whole request: one message, or every message of a batch.

    @ivar decision: the audit line's C{decision}: the refusing call's, else C{redact} if any
        call was redacted, else the first decided call's (C{allow} when no call was decided).
    @ivar ruleId: the rule of that decision (C{None} for a default action).
    @ivar refusal: the error answering the whole request (L{PolicyDenied} or L{RateLimited},
        carrying C{rule_id} and C{Retry-After}), or C{None} to forward it.
    @ivar changed: some call's C{params.arguments} was rewritten in place (re-serialise).
    @ivar redacted: how many strings were redacted in arguments; C{None} when no redact rule
        decided a call (the audit field stays null).
    @ivar redactRules: the C{redact} rules that decided calls, in order: every C{Mcp-Param-*}
        header value must be scrubbed with them too.
    @ivar resultRules: JSON-RPC request id -> the rule whose C{redact_results} must scrub that
        call's result. Read-only: verdicts that forward a request unchanged are shared.
    """

    decision: str = "allow"
    ruleId: str | None = None
    refusal: GatewayError | None = None
    changed: bool = False
    redacted: int | None = None
    redactRules: tuple[str, ...] = ()
    resultRules: dict[Any, str] = attr.Factory(dict)


@attr.frozen
class Explanation:
    """
    The answer of C{mcpgw policy explain}.

    @ivar tool: the call's target (the tool name, resource URI or prompt name).
    @ivar checked: the rules checked (and not matching) before the deciding one, in order, each
        as C{(rule id, matcher text)}; every rule when the default decided.
    @ivar default_used: no rule matched.
    @ivar method: the call's method.
    @ivar reasons: why each rule of C{checked} did not match, in the same order.
    @ivar caller: who called.
    @ivar conditions: the deciding rule's C{when}, as text (L{conditionsText}).
    """

    tool: str
    decision: Decision
    checked: tuple[tuple[str, str], ...]
    default_used: bool
    method: str = "tools/call"
    reasons: tuple[str, ...] = ()
    caller: Caller = ANONYMOUS
    conditions: str | None = None

    def render(self) -> str:
        """
        @return: multi-line human text, without a trailing newline.
        """
        d = self.decision
        if self.default_used:
            decided = f"{d.action} (default_action; no rule matched)"
        else:
            decided = f"{d.action} (rule {d.rule_id}, action {d.action})"
        noun = {"tools/call": "tool", "resources/read": "resource", "prompts/get": "prompt"}
        lines = [
            f"{noun.get(self.method, 'target')}: {self.tool}",
            f"method: {self.method}",
            f"caller: {self.caller.describe()}",
            f"decision: {decided}",
        ]
        matched = d.matcher or "(no rule)"
        if self.conditions:
            matched += f", when {self.conditions}"
        lines.append(f"matched: {matched}")
        if not self.checked:
            lines.append("checked before: (none)")
        else:
            lines.append("checked before:")
            reasons = self.reasons or ("",) * len(self.checked)
            for (rule_id, text), reason in zip(self.checked, reasons, strict=True):
                lines.append(f"  {rule_id} ({text}){': ' + reason if reason else ''}")
        return "\n".join(lines)


def matcherText(rule: PolicyRule) -> str:
    """
    @return: human text for a rule's matcher: C{"glob 'http_*'"}, C{"list [a, b]"}.
    """
    return _specText(rule.match)


def _specText(spec: MatchSpec) -> str:
    kind, value = spec.kind, spec.value
    if isinstance(value, tuple):
        return f"{kind} [{', '.join(value)}]"
    return f"{kind} '{value}'"


def conditionsText(when: Conditions | None) -> str | None:
    """
    @return: human text for a rule's C{when}, e.g. C{"keys [ci-bot], clients [10.0.0.0/8]"}.
    """
    if when is None:
        return None
    parts = [
        f"{name} [{', '.join(values)}]"
        for name, values in (
            ("keys", when.keys),
            ("identities", when.identities),
            ("clients", when.clients),
            ("scopes", when.scopes),
        )
        if values
    ]
    parts += [f"claim {name} [{', '.join(globs)}]" for name, globs in when.claims]
    parts += [f"argument {path} {_specText(spec)}" for path, spec in when.arguments]
    return ", ".join(parts)


def _names(rule: PolicyRule) -> tuple[str, ...]:
    value = rule.match.value
    return value if isinstance(value, tuple) else (value,)


def _indexedAs(rule: PolicyRule) -> tuple[str, str] | None:
    """
    C{("exact", name)} or C{("prefix", p)} when the rule matches exactly like one; else C{None}.
    """
    kind, value = rule.match.kind, rule.match.value
    if kind in ("exact", "prefix") and isinstance(value, str):
        return kind, value
    if kind == "glob" and isinstance(value, str):
        if not _GLOB_SPECIALS.intersection(value):
            return "exact", value
        if value.endswith("*") and not _GLOB_SPECIALS.intersection(value[:-1]):
            return "prefix", value[:-1]
    return None


def _matcher(spec: MatchSpec) -> Callable[[str], bool]:
    """A function telling whether a matcher matches a text."""
    kind, value = spec.kind, spec.value
    if isinstance(value, tuple):
        names = frozenset(value)
        return names.__contains__
    if kind == "exact":
        return value.__eq__
    if kind == "prefix":
        return lambda text: text.startswith(value)
    if kind == "glob":
        match = re.compile(fnmatch.translate(value)).match
    else:
        match = re.compile(value).search
    return lambda text: match(text) is not None


def _predicate(rule: PolicyRule) -> Callable[[str], bool]:
    """A function telling whether the rule's matcher matches a target."""
    return _matcher(rule.match)


def _globs(patterns: Sequence[str]) -> Callable[[str | None], bool]:
    """One compiled test: the text matches one of the globs (C{None} never does)."""
    match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match
    return lambda text: text is not None and match(text) is not None


@lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address, an IPv4-mapped IPv6 address as its IPv4 one; C{None} if not one."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def addressIn(address: str | None, networks: Sequence[Network]) -> bool:
    """
    Whether a client address (text, as Twisted gives it) is in one of C{networks}; C{::ffff:a.b.c.d}
    counts as C{a.b.c.d}. No address, or text that is not one, is in none.
    """
    if address is None:
        return False
    parsed = _address(address)
    return parsed is not None and any(parsed in network for network in networks)


def networks(texts: Sequence[str]) -> tuple[Network, ...]:
    """The networks of validated CIDR texts (L{mcpgw.config} normalised them)."""
    return tuple(ipaddress.ip_network(text) for text in texts)


def argumentText(arguments: object, path: Sequence[str]) -> str | None:
    """
    The argument at C{path} (keys of nested objects) as text: a string as it is, a number or a
    boolean as its JSON text; C{None} when absent, null, an object or an array.
    """
    value: object = arguments
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    kind = type(value)
    if kind is str:
        return value  # type: ignore[return-value]
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return repr(value)  # what json.dumps writes (JSON has no inf or nan)
    return None


class _Rule:
    """One compiled rule: its decision, and its conditions as fast tests."""

    __slots__ = ("arguments", "decision", "index", "onCaller", "rule", "unconditional")

    def __init__(self, index: int, rule: PolicyRule) -> None:
        self.index = index
        self.rule = rule
        self.decision = Decision(rule.action, rule.id, matcherText(rule), bool(rule.redact_results))
        when = rule.when
        self.onCaller: Callable[[Caller], bool] | None = None
        self.arguments: tuple[tuple[tuple[str, ...], Callable[[str], bool]], ...] = ()
        if when is not None:
            if when.onCaller:
                self.onCaller = _callerTest(when)
            self.arguments = tuple(
                (tuple(path.split(".")), _matcher(spec)) for path, spec in when.arguments
            )
        self.unconditional = self.onCaller is None and not self.arguments

    def argumentsMatch(self, arguments: object) -> bool:
        """Whether every argument condition holds (L{argumentText} inlined for strings)."""
        if not isinstance(arguments, dict):
            return False
        for path, matches in self.arguments:
            value = arguments.get(path[0]) if len(path) == 1 else None
            text = value if type(value) is str else argumentText(arguments, path)
            if text is None or not matches(text):
                return False
        return True


def _callerTest(when: Conditions) -> Callable[[Caller], bool]:
    """One function testing every caller condition of a C{when}."""
    tests: list[Callable[[Caller], bool]] = []
    if when.keys:
        keys = _globs(when.keys)
        tests.append(lambda caller: keys(caller.keyId))
    if when.identities:
        identities = _globs(when.identities)
        tests.append(lambda caller: identities(caller.principal))
    if when.clients:
        nets = networks(when.clients)
        tests.append(lambda caller: addressIn(caller.client, nets))
    for name, patterns in when.claims:
        tests.append(_claimTest(name, _globs(patterns)))
    if when.scopes:
        wanted = frozenset(when.scopes)
        tests.append(lambda caller: wanted <= caller.scopes)
    if len(tests) == 1:
        return tests[0]
    return lambda caller: all(test(caller) for test in tests)


def claimTexts(claims: Mapping[str, object] | None, name: str) -> tuple[str, ...]:
    """
    The values of claim C{name} as texts: a string as it is, a number or a boolean as its JSON
    text, each scalar item of a list; C{()} when absent, null or an object. A name with dots that
    is not a claim of its own reaches into nested objects (C{realm_access.roles}).
    """
    if claims is None:
        return ()
    value = claims.get(name)
    if value is None and "." in name:
        node: object = claims
        for key in name.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        value = node
    if isinstance(value, list):
        texts = (argumentText(item, ()) for item in value)
        return tuple(t for t in texts if t is not None)
    text = argumentText(value, ())
    return () if text is None else (text,)


def _claimTest(name: str, matches: Callable[[str | None], bool]) -> Callable[[Caller], bool]:
    return lambda caller: any(matches(text) for text in claimTexts(caller.claims, name))


class _ArgumentPlan:
    """
    What is left to decide once the method, the target and the caller are known: the rules with
    argument conditions still in the running, in order, and the decision if none of them holds.
    """

    __slots__ = ("fallback", "steps")

    def __init__(self, steps: tuple[_Rule, ...], fallback: Decision) -> None:
        self.steps = steps
        self.fallback = fallback

    def decide(self, arguments: object) -> Decision:
        for step in self.steps:
            if step.argumentsMatch(arguments):
                return step.decision
        return self.fallback


class _Index:
    """The rules of one method, indexed by target (see the module docstring)."""

    __slots__ = ("conditional", "exact", "prefixLengths", "prefixes", "scan")

    def __init__(self) -> None:
        #: Some rule of the method has conditions (else the first match decides, always).
        self.conditional = False
        self.exact: dict[str, list[int]] = {}
        self.prefixes: dict[str, list[int]] = {}
        self.prefixLengths: list[int] = []
        self.scan: list[tuple[int, Callable[[str], bool]]] = []


def _callerKeyOf(rules: Sequence[PolicyRule]) -> Callable[[Caller], object] | None:
    """
    The parts of a caller that some rule's conditions look at, as a function (the decision
    cache's key part); C{None} when no rule looks at the caller.
    """
    parts = []
    whens = [rule.when for rule in rules if rule.when is not None]
    if any(when.keys for when in whens):
        parts.append("keyId")
    if any(when.identities for when in whens):
        parts.append("principal")
    if any(when.clients for when in whens):
        parts.append("client")
    claimNames = tuple(sorted({name for when in whens for name, _ in when.claims}))
    scopes = frozenset(scope for when in whens for scope in when.scopes)
    if not claimNames and not scopes:
        return operator.attrgetter(*parts) if parts else None
    plain = operator.attrgetter(*parts) if parts else None

    def key(caller: Caller) -> object:
        return (
            plain(caller) if plain is not None else None,
            tuple(claimTexts(caller.claims, name) for name in claimNames),
            scopes & caller.scopes,
        )

    return key


@implementer(IPolicy)
class Policy:
    """
    A compiled policy; build it with L{Policy.fromConfig}.

    Not thread-safe (the reactor thread uses it).

    @ivar defaultAction: C{allow} or C{deny}: the default for C{tools/call}.
    @ivar filterToolsList: listing answers leave out what L{allows} refuses.
    @ivar dependsOnCaller: some rule has caller conditions, so what is listed (and a listing
        answer's cacheability) depends on the caller.
    """

    def __init__(
        self,
        config: PolicyConfig,
        previous: Policy | None = None,
        cacheSize: int = _DEFAULT_CACHE_SIZE,
        maxBuckets: int = _DEFAULT_MAX_BUCKETS,
        state: IStateBackend | None = None,
    ) -> None:
        """
        Use L{fromConfig}; C{cacheSize} (decisions memoised, 0 for none) and C{maxBuckets}
        (per rate-limited rule) are for tests and benchmarks.

        @param state: where the C{rate_limit} rules' buckets live (default: this process's
            memory).
        """
        if state is None:
            state = MemoryState()
        self.defaultAction = config.default_action
        self.filterToolsList = config.filter_tools_list
        self._cacheSize = cacheSize
        self._cache: dict[object, Decision | _ArgumentPlan] = {}
        self._listing: dict[object, dict[str, bool]] = {}
        self._listed = 0
        self._matched: dict[tuple[str, str], list[_Rule]] = {}
        #: Verdicts that forward a request unchanged, by (decision, rule id): immutable, shared.
        self._plainVerdicts: dict[tuple[str, str | None], Verdict] = {}
        rules = config.rules
        self._rules = rules
        self._compiled = [_Rule(i, rule) for i, rule in enumerate(rules)]
        self._defaults = {m: Decision(config.defaultFor(m), None, None) for m in POLICY_METHODS}
        self._indexes = {m: _Index() for m in POLICY_METHODS}
        self._callerKey = _callerKeyOf(rules)
        self.dependsOnCaller = self._callerKey is not None
        self._redactions: dict[str, Callable[[str], str]] = {}
        self._resultRedactions: dict[str, Callable[[str], str]] = {}
        self._limits: dict[str, IBuckets] = {}
        self._per: dict[str, str] = {}
        old = previous._limitsBySettings() if previous is not None else {}
        for i, rule in enumerate(rules):
            index = self._indexes[rule.method]
            index.conditional = index.conditional or not self._compiled[i].unconditional
            indexed = _indexedAs(rule)
            if rule.match.kind == "list":
                for name in dict.fromkeys(_names(rule)):
                    index.exact.setdefault(name, []).append(i)
            elif indexed is not None:
                table = index.exact if indexed[0] == "exact" else index.prefixes
                table.setdefault(indexed[1], []).append(i)
            else:
                index.scan.append((i, _predicate(rule)))
            if rule.action == "redact":
                self._redactions[rule.id] = _redactor(rule.redact)
            elif rule.action == "rate_limit" and rule.rate_limit is not None:
                spec = rule.rate_limit
                buckets = old.get(_settings(rule))
                if buckets is None:
                    buckets = state.buckets("rule:" + rule.id, spec.rate, spec.burst, maxBuckets)
                self._limits[rule.id] = buckets
                self._per[rule.id] = spec.per
            if rule.redact_results:
                self._resultRedactions[rule.id] = _redactor(rule.redact_results)
        for index in self._indexes.values():
            index.prefixLengths = sorted({len(p) for p in index.prefixes})

    @classmethod
    def fromConfig(
        cls,
        config: PolicyConfig,
        previous: Policy | None = None,
        state: IStateBackend | None = None,
    ) -> Policy:
        """
        Compile a policy.

        @param previous: the policy of the generation being replaced: the rate-limit buckets of
            its rules whose id, method, match, rate, burst and C{per} are unchanged carry over
            (shared).
        @param state: where new buckets live (default: this process's memory).
        """
        return cls(config, previous, state=state)

    @property
    def ruleIds(self) -> tuple[str, ...]:
        """The rule ids, in order."""
        return tuple(rule.id for rule in self._rules)

    def defaultFor(self, method: str) -> str:
        """
        @return: the action for a call of C{method} no rule matches (C{allow} for a method policy
            does not decide).
        """
        return self._defaults.get(method, PASS).action

    def canDeny(self, method: str) -> bool:
        """
        Whether some call of C{method} can be denied (a deny rule, or a deny default): when not,
        its listing answers need no filtering.
        """
        return self.defaultFor(method) == "deny" or any(
            rule.method == method and rule.action == "deny" for rule in self._rules
        )

    def _limitsBySettings(self) -> dict[tuple[object, ...], IBuckets]:
        return {_settings(r): self._limits[r.id] for r in self._rules if r.id in self._limits}

    # -- Deciding ------------------------------------------------------------------------------

    def _candidates(self, method: str, target: str) -> list[_Rule]:
        """
        The rules of C{method} whose matcher matches C{target}, in order, up to the first one
        without conditions (which always decides). Memoised per (method, target) when some rule
        looks at the caller: a new caller (a new client address, say) then costs its condition
        tests, not a scan of the rules.
        """
        if self._callerKey is None or not self._cacheSize:
            return self._match(method, target)
        key = (method, target)
        found = self._matched.get(key)
        if found is None:
            found = self._match(method, target)
            if len(self._matched) >= self._cacheSize:
                self._matched.clear()
            self._matched[key] = found
        return found

    def _match(self, method: str, target: str) -> list[_Rule]:
        """L{_candidates}, computed from the index."""
        index = self._indexes.get(method)
        if index is None:
            return []
        compiled = self._compiled
        if not index.conditional:
            # Only unconditional rules: the first match is the only candidate.
            best = index.exact.get(target, _NONE)[0]
            prefixes = index.prefixes
            for length in index.prefixLengths:
                if length > len(target):
                    break
                hits = prefixes.get(target[:length])
                if hits is not None and hits[0] < best:
                    best = hits[0]
            for i, matches in index.scan:
                if i >= best:
                    break
                if matches(target):
                    return [compiled[i]]
            return [compiled[best]] if best < len(compiled) else []
        found = list(index.exact.get(target, ()))
        prefixes = index.prefixes
        for length in index.prefixLengths:
            if length > len(target):
                break
            hits = prefixes.get(target[:length])
            if hits is not None:
                found += hits
        bound = min((i for i in found if compiled[i].unconditional), default=len(compiled))
        for i, matches in index.scan:
            if i >= bound:
                break
            if matches(target):
                found.append(i)
                if compiled[i].unconditional:
                    bound = i
                    break
        return [compiled[i] for i in sorted({i for i in found if i <= bound})]

    def _plan(self, method: str, target: str, caller: Caller) -> Decision | _ArgumentPlan:
        """The decision, or what is left to decide by the arguments."""
        steps: list[_Rule] = []
        fallback = self._defaults.get(method, PASS)
        for rule in self._candidates(method, target):
            if rule.onCaller is not None and not rule.onCaller(caller):
                continue
            if rule.arguments:
                steps.append(rule)
                continue
            fallback = rule.decision
            break
        return _ArgumentPlan(tuple(steps), fallback) if steps else fallback

    def _entry(self, method: str, target: str, caller: Caller) -> Decision | _ArgumentPlan:
        """The memoised L{_plan} of a call (L{decide} inlines the lookup)."""
        callerKey = self._callerKey
        key: object
        if callerKey is None:
            key = target if method == "tools/call" else (method, target)
        else:
            key = (method, target, callerKey(caller))
        entry = self._cache.get(key)
        if entry is None:
            entry = self._remember(key, method, target, caller)
        return entry

    def _remember(
        self, key: object, method: str, target: str, caller: Caller
    ) -> Decision | _ArgumentPlan:
        entry = self._plan(method, target, caller)
        if self._cacheSize:
            if len(self._cache) >= self._cacheSize:
                self._cache.clear()
            self._cache[key] = entry
        return entry

    def decide(
        self,
        method: str,
        target: str | None = None,
        caller: Caller = ANONYMOUS,
        arguments: object = None,
    ) -> Decision:
        """
        @param method: the call's method; or, alone, the tool name of an anonymous
            C{tools/call} (the part-1 shape C{decide(tool)}).
        @param target: the tool name, resource URI or prompt name.
        @param arguments: the call's C{params.arguments} (only read by rules with argument
            conditions, and only when their method, target and caller conditions hold).
        @return: the decision of the first rule matching the call, else the method's default
            action (C{allow} for a method policy does not decide).
        """
        # The warm path, inlined: one dict lookup (the key as in _entry).
        key: object
        if target is None:
            key = target = method
            method = "tools/call"
            if self._callerKey is not None:
                key = (method, target, self._callerKey(caller))
        elif self._callerKey is None:
            key = target if method == "tools/call" else (method, target)
        else:
            key = (method, target, self._callerKey(caller))
        entry = self._cache.get(key)
        if entry is None:
            entry = self._remember(key, method, target, caller)
        if type(entry) is Decision:
            return entry
        assert isinstance(entry, _ArgumentPlan)
        return entry.decide(arguments)

    def decideWithoutArguments(
        self, method: str, target: str, caller: Caller = ANONYMOUS
    ) -> Decision | None:
        """
        The decision for a call whose arguments are unknown (replaying an audit log).

        @return: the decision, or C{None} when a rule with argument conditions would need them.
        """
        entry = self._entry(method, target, caller)
        return entry if isinstance(entry, Decision) else None

    def allows(self, method: str, target: str | None = None, caller: Caller = ANONYMOUS) -> bool:
        """
        Whether a listing answer shows C{target} to C{caller}: C{False} iff every call of it by
        that caller would be denied, whatever its arguments. A rule with argument conditions
        never hides anything (a deny one is passed over; an allow, redact or rate_limit one shows
        the target). Redacted and rate-limited targets are listed. Memoised per
        (method, caller).

        @param method: the method that calls what is listed (L{LISTED_BY}), or alone the tool
            name of an anonymous C{tools/call} (the part-1 shape C{allows(tool)}).
        """
        if target is None:
            method, target = "tools/call", method
        if self._cacheSize:
            callerKey = self._callerKey
            table = self._listing.get((method, None if callerKey is None else callerKey(caller)))
            if table is not None:
                answer = table.get(target)
                if answer is not None:
                    return answer
        return self.lister(method, caller)(target)

    def lister(self, method: str, caller: Caller = ANONYMOUS) -> Callable[[str], bool]:
        """
        L{allows} for one method and caller, as a function: what a listing answer calls for
        each entry (memoised, so a list of 100 tools costs 100 dict lookups when warm).
        """
        if not self._cacheSize:
            return lambda target: self._listable(method, target, caller)
        key = (method, self._callerKey(caller) if self._callerKey is not None else None)
        table = self._listing.get(key)
        if table is None:
            table = self._listing[key] = {}
        size = self._cacheSize
        listable = self._listable

        def shown(target: str) -> bool:
            answer = table.get(target)
            if answer is None:
                answer = listable(method, target, caller)
                if len(table) >= size:
                    table.clear()
                self._listed += 1
                if self._listed > _MAX_LISTED:
                    self._listed = 1
                    self._listing.clear()  # start over, keeping this caller's table
                    self._listing[key] = table
                    table.clear()
                table[target] = answer
            return answer

        return shown

    def _listable(self, method: str, target: str, caller: Caller) -> bool:
        for rule in self._candidates(method, target):
            if rule.onCaller is not None and not rule.onCaller(caller):
                continue
            if rule.arguments:
                if rule.decision.action != "deny":
                    return True
                continue
            return rule.decision.action != "deny"
        return self.defaultFor(method) != "deny"

    # -- A whole request -----------------------------------------------------------------------

    def verdict(
        self, messages: Sequence[Any], caller: Caller = ANONYMOUS, now: float = 0.0
    ) -> Verdict | Deferred[Verdict]:
        """
        Decide every C{tools/call}, C{resources/read} and C{prompts/get} of a request (each call
        of a batch). A denied or rate-limited call refuses the whole request: a denied call is
        never forwarded, not even with the rest of its batch, and forwarding the rest would split
        what the client sent as one. A C{redact} decision rewrites that call's
        C{params.arguments} in place (C{messages} is changed; L{Verdict.changed} says so). A
        C{rate_limit} call that gets a token is forwarded as it is (audited as C{allow} with the
        rule's id).

        @param messages: the parsed JSON-RPC messages of the body (responses and other methods
            are passed over).
        @param now: the current time in seconds, for token buckets.
        @return: the verdict; a Deferred of it when a C{rate_limit} call's bucket answers later
            (a shared state backend). Then every call's token is asked for at once (pipelined)
            and the verdict is the same as if they had been taken one by one, except that calls
            after a refused one in the same batch may have used a token too.
        """
        decision, ruleId, decided = "allow", None, False
        #: Takes answered later: (Deferred wait, rule id, changed, redacted, redact rules).
        pending: list[tuple[Deferred[float | None], str, bool, int | None, tuple[str, ...]]] = []
        changed = False
        redacted: int | None = None
        redactRules: list[str] = []
        resultRules: dict[Any, str] | None = None
        decide = self.decide
        for msg in messages:
            method = msg.get("method") if type(msg) is dict else None
            param = _TARGET_PARAM.get(method) if type(method) is str else None
            if param is None:
                continue
            assert isinstance(method, str)
            params = msg.get("params")
            if type(params) is dict:
                target = params.get(param)
                arguments = params.get("arguments")
            else:
                target = arguments = None
            d = decide(method, target if type(target) is str else "", caller, arguments)
            action = d.action
            if action == "allow":
                pass
            elif action == "deny":
                denied = Verdict(
                    "deny",
                    d.rule_id,
                    PolicyDenied(rule_id=d.rule_id),
                    changed,
                    redacted,
                    tuple(redactRules),
                )
                return _settle(pending, denied) if pending else denied
            elif action == "rate_limit":
                assert d.rule_id is not None
                wait = self._limits[d.rule_id].take(self.bucketKey(d.rule_id, caller), now)
                if isinstance(wait, Deferred):
                    pending.append((wait, d.rule_id, changed, redacted, tuple(redactRules)))
                elif wait is not None:
                    refusal = RateLimited(retryAfter=max(1, math.ceil(wait)), rule_id=d.rule_id)
                    return Verdict(
                        "rate_limit", d.rule_id, refusal, changed, redacted, tuple(redactRules)
                    )
                action = "allow"  # a token was available: forwarded as is
            elif action == "redact" and type(params) is dict:
                assert d.rule_id is not None
                new, n = self.redact(d.rule_id, arguments)
                if n:
                    params["arguments"] = new
                    changed = True
                if d.rule_id not in redactRules:
                    redactRules.append(d.rule_id)
                redacted = (redacted or 0) + n
            if d.redact_results and _isRequestId(msg.get("id")):
                assert d.rule_id is not None
                if resultRules is None:
                    resultRules = {}
                resultRules[msg["id"]] = d.rule_id
            if not decided or (action == "redact" and decision != "redact"):
                decision, ruleId, decided = action, d.rule_id, True
        if redacted is None and resultRules is None:
            # The common case, shared: one verdict per (decision, rule).
            plain = self._plainVerdicts.get((decision, ruleId))
            if plain is None:
                plain = self._plainVerdicts[(decision, ruleId)] = Verdict(decision, ruleId)
            return _settle(pending, plain) if pending else plain
        result = Verdict(
            decision,
            ruleId,
            None,
            changed,
            redacted,
            tuple(redactRules),
            {} if resultRules is None else resultRules,
        )
        return _settle(pending, result) if pending else result

    # -- Explaining ----------------------------------------------------------------------------

    def explain(
        self,
        method: str,
        target: str | None = None,
        caller: Caller = ANONYMOUS,
        arguments: object = None,
    ) -> Explanation:
        """
        @param method: as for L{decide} (C{explain(tool)}: an anonymous C{tools/call}).
        @return: the decision, every rule checked before the deciding one and why it did not
            match.
        """
        if target is None:
            method, target = "tools/call", method
        checked: list[tuple[str, str]] = []
        reasons: list[str] = []
        for compiled in self._compiled:
            rule = compiled.rule
            reason = _whyNot(compiled, method, target, caller, arguments)
            if reason is None:
                return Explanation(
                    target,
                    compiled.decision,
                    tuple(checked),
                    False,
                    method,
                    tuple(reasons),
                    caller,
                    conditionsText(rule.when),
                )
            checked.append((rule.id, matcherText(rule)))
            reasons.append(reason)
        decision = self._defaults.get(method, PASS)
        return Explanation(target, decision, tuple(checked), True, method, tuple(reasons), caller)

    # -- Redaction -----------------------------------------------------------------------------

    def redact(self, rule_id: str, arguments: object) -> tuple[object, int]:
        """
        Replace every match of the rule's patterns by L{REDACTED} in every string of a JSON value,
        object keys included (nested; a secret used as a key is no less a secret). Keys that
        become equal after scrubbing merge, the later value winning.

        @param rule_id: a C{redact} rule.
        @return: a redacted copy (C{arguments} is not changed) and how many strings changed.
        @raise KeyError: C{rule_id} is not a C{redact} rule of this policy.
        """
        return _scrubJSON(self._redactions[rule_id], arguments)

    def redactResult(self, rule_id: str, result: object) -> tuple[object, int]:
        """
        Scrub a call's C{result} with the rule's C{redact_results}: every string (object keys
        too, nested) of C{structuredContent}, and the C{text} of each C{content[]} item (and of
        an embedded C{resource}); for C{resources/read} results the C{text} of each
        C{contents[]} item, for C{prompts/get} results each C{messages[].content} item's. Other
        members (C{type}, C{mimeType}, base64 C{data}, C{_meta}, ...) are left alone.

        @param rule_id: a rule with C{redact_results} (L{Decision.redact_results}).
        @return: a scrubbed copy (C{result} is not changed; the same object when nothing changed)
            and how many strings changed.
        @raise KeyError: C{rule_id} has no C{redact_results}.
        """
        scrub = self._resultRedactions[rule_id]
        if not isinstance(result, dict):
            return result, 0
        new = dict(result)
        count = 0
        for key in ("content", "contents"):
            items = result.get(key)
            if isinstance(items, list):
                scrubbed = [_scrubItem(scrub, item) for item in items]
                new[key] = [item for item, _ in scrubbed]
                count += sum(n for _, n in scrubbed)
        messages = result.get("messages")
        if isinstance(messages, list):
            out = []
            for message in messages:
                if isinstance(message, dict) and "content" in message:
                    item, n = _scrubItem(scrub, message["content"])
                    if n:
                        message = {**message, "content": item}
                        count += n
                out.append(message)
            new["messages"] = out
        if "structuredContent" in result:
            new["structuredContent"], n = _scrubJSON(scrub, result["structuredContent"])
            count += n
        return (new, count) if count else (result, 0)

    # -- Rate limits ---------------------------------------------------------------------------

    def bucketKey(self, rule_id: str, caller: Caller) -> str:
        """
        Whose bucket a call decided by the C{rate_limit} rule C{rule_id} takes from, by the
        rule's C{per}: C{session}: the MCP session, else the API key id, else the client address;
        C{key}: the key id, else the address; C{identity}: the principal, else the address;
        C{client}: the address; C{global}: one bucket for all.

        @raise KeyError: C{rule_id} is not a C{rate_limit} rule of this policy.
        """
        per = self._per[rule_id]
        if per == "global":
            return "global"
        if per == "session" and caller.session is not None:
            return "session:" + caller.session
        if per in ("session", "key") and caller.keyId is not None:
            return "key:" + caller.keyId
        if per == "identity" and caller.principal is not None:
            return "id:" + caller.principal
        return "addr:" + (caller.client or "")

    def rateLimit(self, rule_id: str, session: str, now: float) -> float | None:
        """
        Take one token from the bucket of (C{rule_id}, C{session}); a new bucket starts full.

        @param session: the bucket's key (L{bucketKey}).
        @param now: the current time in seconds.
        @return: C{None} if a token was taken, else the seconds until one is available (the caller
            rounds up for C{Retry-After}).
        @raise KeyError: C{rule_id} is not a C{rate_limit} rule of this policy.
        """
        return self._limits[rule_id].take(session, now)

    def bucketCount(self, rule_id: str) -> int:
        """
        @return: how many buckets the C{rate_limit} rule C{rule_id} holds (in this process's
            memory).
        """
        return len(self._limits[rule_id].buckets)  # type: ignore[attr-defined]


def _settle(
    pending: list[tuple[Deferred[float | None], str, bool, int | None, tuple[str, ...]]],
    otherwise: Verdict,
) -> Deferred[Verdict]:
    """
    The verdict once the takes answered later are in: the first refused one (in the request's
    order) refuses the request, else C{otherwise}.
    """

    def decide(waits: list[float | None]) -> Verdict:
        for wait, (_, ruleId, changed, redacted, redactRules) in zip(waits, pending, strict=True):
            if wait is not None:
                refusal = RateLimited(retryAfter=max(1, math.ceil(wait)), rule_id=ruleId)
                return Verdict("rate_limit", ruleId, refusal, changed, redacted, redactRules)
        return otherwise

    if len(pending) == 1:  # the usual case: one call, no DeferredList
        return pending[0][0].addCallback(lambda wait: decide([wait]))
    return gatherResults([p[0] for p in pending]).addCallback(decide)


def _isRequestId(value: object) -> bool:
    """A JSON-RPC request id usable as a dict key (a string or a number, never a boolean)."""
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _settings(rule: PolicyRule) -> tuple[object, ...]:
    """What must be unchanged for a rule's buckets to carry over to a new generation."""
    return (rule.id, rule.method, rule.match, rule.rate_limit)


def _whyNot(
    compiled: _Rule, method: str, target: str, caller: Caller, arguments: object
) -> str | None:
    """Why a rule does not match a call (human text), or C{None} if it does."""
    rule = compiled.rule
    if rule.method != method:
        return f"applies to {rule.method}"
    if not _predicate(rule)(target):
        return f"{target!r} does not match"
    when = rule.when
    if when is None:
        return None
    if when.keys and not _globs(when.keys)(caller.keyId):
        if caller.keyId is None:
            return "when.keys: no API key"
        return f"when.keys: key {caller.keyId!r} matches none of [{', '.join(when.keys)}]"
    if when.identities and not _globs(when.identities)(caller.principal):
        if caller.principal is None:
            return "when.identities: no principal"
        return (
            f"when.identities: principal {caller.principal!r} matches none of "
            f"[{', '.join(when.identities)}]"
        )
    if when.clients and not addressIn(caller.client, networks(when.clients)):
        if caller.client is None:
            return "when.clients: no client address"
        return f"when.clients: {caller.client} is in none of [{', '.join(when.clients)}]"
    for name, patterns in when.claims:
        texts = claimTexts(caller.claims, name)
        if not texts:
            return f"when.claims.{name}: no such claim"
        if not any(_globs(patterns)(text) for text in texts):
            shown = ", ".join(repr(t) for t in texts)
            return f"when.claims.{name}: {shown} matches none of [{', '.join(patterns)}]"
    missing = [scope for scope in when.scopes if scope not in caller.scopes]
    if missing:
        return f"when.scopes: scope(s) {', '.join(missing)} not granted"
    for path, spec in when.arguments:
        text = argumentText(arguments, path.split("."))
        if text is None:
            what = "not given" if arguments is None else "absent, null, an object or an array"
            return f"when.arguments.{path}: {what}"
        if not _matcher(spec)(text):
            return f"when.arguments.{path}: {text!r} does not match {_specText(spec)}"
    return None


# -- Redaction --------------------------------------------------------------------------------

#: Literal text every match of a built-in contains: the regex only runs when it is present.
_HINTS: dict[str, Callable[[str], bool]] = {
    "bearer": lambda text: "earer" in text or "EARER" in text or "bearer" in text.lower(),
    "openai_key": lambda text: "sk-" in text,
    "aws_access_key": lambda text: "AKIA" in text or "ASIA" in text,
    "jwt": lambda text: "eyJ" in text,
}


def _redactor(entries: tuple[str, ...]) -> Callable[[str], str]:
    """
    The scrubbing function of one rule's patterns. A built-in pattern only runs on strings that
    contain its literal hint (C{sk-}, C{AKIA}, C{eyJ}, ...), which makes the common case of a
    string without secrets cost a few substring checks; custom regexes always run, in order.
    """
    steps: list[tuple[Callable[[str], bool] | None, re.Pattern[str]]] = [
        (_HINTS.get(entry), re.compile(BUILTIN_PATTERNS.get(entry, entry))) for entry in entries
    ]

    def scrub(text: str) -> str:
        for hint, pattern in steps:
            if hint is None or hint(text):
                text = pattern.sub(REDACTED, text)
        return text

    return scrub


def _scrubJSON(scrub: Callable[[str], str], value: object) -> tuple[object, int]:
    """A copy of a JSON value with every string (object keys too) scrubbed, and the count."""
    changed = 0

    def walk(value: object) -> object:
        nonlocal changed
        if isinstance(value, str):
            new = scrub(value)
            changed += new != value
            return new
        if isinstance(value, dict):
            return {walk(key): walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    return walk(value), changed


def _scrubItem(scrub: Callable[[str], str], item: object) -> tuple[object, int]:
    """A content item with its C{text} (and an embedded resource's C{text}) scrubbed."""
    if not isinstance(item, dict):
        return item, 0
    count = 0
    new = item
    text = item.get("text")
    if isinstance(text, str) and (scrubbed := scrub(text)) != text:
        new = {**new, "text": scrubbed}
        count += 1
    resource = item.get("resource")
    if isinstance(resource, dict):
        inner, n = _scrubItem(scrub, resource)
        if n:
            new = {**new, "resource": inner}
            count += n
    return new, count


# -- Warnings for config check ----------------------------------------------------------------


def _globHead(pattern: str) -> str:
    """The literal text every name a glob matches starts with."""
    for i, c in enumerate(pattern):
        if c in _GLOB_SPECIALS:
            return pattern[:i]
    return pattern


def _globsCover(wide: Sequence[str], narrow: Sequence[str]) -> bool:
    """Every text one of the C{narrow} globs matches, one of the C{wide} globs matches too."""
    for pattern in narrow:
        if pattern in wide or "*" in wide:
            continue
        if _GLOB_SPECIALS.intersection(pattern) or not _globs(wide)(pattern):
            return False
    return True


def _implies(later: Conditions | None, earlier: Conditions | None) -> bool:
    """
    Whether every call meeting C{later}'s conditions meets C{earlier}'s too (so the earlier rule,
    with a matcher covering the later one's, catches all its calls). Sound, not complete:
    globs are compared as texts (a literal is tested against the earlier globs), networks by
    inclusion, argument conditions by equality.
    """
    if earlier is None:
        return True
    if later is None:
        return False
    if earlier.keys and not (later.keys and _globsCover(earlier.keys, later.keys)):
        return False
    if earlier.identities and not (
        later.identities and _globsCover(earlier.identities, later.identities)
    ):
        return False
    laterClaims = dict(later.claims)
    for name, globs in earlier.claims:
        if name not in laterClaims or not _globsCover(globs, laterClaims[name]):
            return False
    if not set(earlier.scopes) <= set(later.scopes):
        return False
    if earlier.clients:
        wide = networks(earlier.clients)
        if not later.clients or not all(
            any(n.version == w.version and n.subnet_of(w) for w in wide)  # type: ignore[arg-type]
            for n in networks(later.clients)
        ):
            return False
    return set(earlier.arguments) <= set(later.arguments)


def shadowedRules(config: PolicyConfig) -> list[tuple[int, str]]:
    """
    Find rules that can never decide because earlier rules of the same method, under the same or
    wider conditions, catch the targets they match.

    Detected: an C{exact} target (or a glob without wildcards) or C{list} targets matched by an
    earlier rule of any kind; a C{prefix} or C{glob} whose literal start begins with an earlier
    prefix (or C{literal*} glob); a C{glob} or C{regex} identical to an earlier one. The earlier
    rule must have no C{when}, or conditions every call of the later rule meets (see
    L{_implies}). A C{list} with only some targets caught gets a warning naming those targets.
    Not detected: other overlaps of patterns (a regex, or a glob, covered by a different earlier
    pattern) and of conditions.

    @return: C{(rule index, message)} warnings, in rule order.
    """
    warnings: list[tuple[int, str]] = []
    rules = config.rules
    predicates = [_predicate(rule) for rule in rules]
    for i, rule in enumerate(rules):
        earlier = [
            j
            for j in range(i)
            if rules[j].method == rule.method and _implies(rule.when, rules[j].when)
        ]
        kind, value = rule.match.kind, rule.match.value
        indexed = _indexedAs(rule)
        if kind == "list" or (indexed and indexed[0] == "exact"):
            names = _names(rule)
            caught = []
            for name in names:
                j = next((j for j in earlier if predicates[j](name)), None)
                if j is not None:
                    caught.append((name, _describe(rules[j])))
            if caught and len(caught) == len(names):
                reasons = "; ".join(f"'{n}' is already matched by {d}" for n, d in caught)
                warnings.append((i, f"rule '{rule.id}' can never match: {reasons}"))
            elif caught:
                reasons = "; ".join(f"'{n}': already matched by {d}" for n, d in caught)
                warnings.append((i, f"rule '{rule.id}' never decides for {reasons}"))
            continue
        assert isinstance(value, str)
        same = next((rules[j] for j in earlier if rules[j].match == rule.match), None)
        if same is not None and kind != "prefix":
            text = matcherText(rule)
            warnings.append(
                (
                    i,
                    f"rule '{rule.id}' can never match: {_describe(same, False)} has the "
                    f"same {text}",
                )
            )
            continue
        if kind == "regex":
            continue
        head = value if kind == "prefix" else _globHead(value)
        for j in earlier:
            other = rules[j]
            indexed = _indexedAs(other)
            if indexed and indexed[0] == "prefix" and head.startswith(indexed[1]):
                warnings.append(
                    (
                        i,
                        f"rule '{rule.id}' can never match: every name starting with "
                        f"'{head}' is already matched by {_describe(other)}",
                    )
                )
                break
    return warnings


def _describe(rule: PolicyRule, matcher: bool = True) -> str:
    text = f"rule '{rule.id}'"
    if matcher:
        text += f" ({matcherText(rule)})"
    if rule.when is not None:
        text += f" when {conditionsText(rule.when)}"
    return text


def unknownKeys(config: PolicyConfig, keyIds: Collection[str]) -> list[tuple[int, int, str]]:
    """
    Find C{when.keys} entries that name no configured API key (globs are matched against the
    configured ids): such a condition never holds for them, which is most likely a typo or a key
    removed from C{auth.keys}.

    @param keyIds: the ids of C{auth.keys} (empty when API keys are not used).
    @return: C{(rule index, entry index, message)} warnings, in rule order.
    """
    warnings = []
    known = sorted(keyIds)
    for i, rule in enumerate(config.rules):
        if rule.when is None:
            continue
        for j, pattern in enumerate(rule.when.keys):
            if any(fnmatch.fnmatchcase(key, pattern) for key in known):
                continue
            if not known:
                message = f"'{pattern}' can never match: no API keys are configured (auth.keys)"
            else:
                message = f"'{pattern}' names no configured key"
                close = difflib.get_close_matches(pattern, known, n=1)
                message += f"; did you mean '{close[0]}'?" if close else f" ({', '.join(known)})"
            warnings.append((i, j, message))
    return warnings
