# -*- test-case-name: tests.test_policy -*-
"""
The policy engine: which rule decides a C{tools/call}, redaction of its arguments, and the
per-(rule, session) token buckets of C{rate_limit} rules.

Pure logic: no I/O and no reactor; time is passed in as C{now} (seconds, any monotonic clock).
One L{Policy} is compiled per config generation by L{Policy.fromConfig}.

Matching, by the tool name in C{params.name}, first rule that matches wins:
  - C{exact}: the name equals the value; C{list}: the name is one of the values.
  - C{prefix}: the name starts with the value.
  - C{glob}: L{fnmatch.fnmatchcase} semantics (case-sensitive; C{*}, C{?}, C{[seq]}, C{[!seq]}).
  - C{regex}: L{re.search}: a regex matches if it matches anywhere in the name; anchors
    (C{^...$}) are the author's to write.

Cost: exact and list names are one dict lookup; prefixes are one dict lookup per distinct prefix
length; a glob that is a literal or a literal followed by one C{*} is indexed like an exact or a
prefix rule. Only the remaining globs and regexes are scanned, and only those before the best
indexed match. Decisions are memoised per tool name in a bounded cache (tool names are a small set
in practice), so a warm decision costs one dict lookup however many rules there are.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

import attr
from zope.interface import Attribute, Interface, implementer

from mcpgw.buckets import TokenBuckets
from mcpgw.config import PolicyConfig, PolicyRule

__all__ = [
    "BUILTIN_PATTERNS",
    "REDACTED",
    "Decision",
    "Explanation",
    "IPolicy",
    "Policy",
    "shadowedRules",
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

_DEFAULT_CACHE_SIZE = 4096
_DEFAULT_MAX_BUCKETS = 1_000_000
_GLOB_SPECIALS = frozenset("*?[")


class IPolicy(Interface):
    """The compiled policy of one config generation."""

    defaultAction = Attribute("C{'allow'} or C{'deny'}: the action when no rule matches.")
    filterToolsList = Attribute("Whether C{tools/list} answers leave out denied tools.")
    ruleIds = Attribute("The rule ids, in order.")

    def decide(tool: str) -> Decision:
        """The L{Decision} for a C{tools/call} of C{tool}."""

    def allows(tool: str) -> bool:
        """Whether C{tool} is listed in C{tools/list} (not denied)."""

    def explain(tool: str) -> Explanation:
        """Why C{tool} gets the decision it gets."""

    def redact(rule_id: str, arguments: object) -> tuple[object, int]:
        """A redacted copy of C{arguments} and the number of string values changed."""

    def rateLimit(rule_id: str, session: str, now: float) -> float | None:
        """Take a token: C{None} if allowed, else the seconds until one is available."""


@attr.frozen
class Decision:
    """
    What policy says about one tool name.

    @ivar action: C{allow}, C{deny}, C{redact} or C{rate_limit}.
    @ivar rule_id: the deciding rule, or C{None} when the default action decided.
    @ivar matcher: what matched, e.g. C{"prefix 'admin_'"}; C{None} for the default.
    """

    action: str
    rule_id: str | None
    matcher: str | None


@attr.frozen
class Explanation:
    """
    The answer of C{mcpgw policy explain}.

    @ivar checked: the rules checked (and not matching) before the deciding one, in order, each
        as C{(rule id, matcher text)}; every rule when the default decided.
    @ivar default_used: no rule matched.
    """

    tool: str
    decision: Decision
    checked: tuple[tuple[str, str], ...]
    default_used: bool

    def render(self) -> str:
        """
        @return: multi-line human text, without a trailing newline.
        """
        d = self.decision
        if self.default_used:
            decided = f"{d.action} (default_action; no rule matched)"
        else:
            decided = f"{d.action} (rule {d.rule_id}, action {d.action})"
        before = ", ".join(f"{rule_id} ({text})" for rule_id, text in self.checked)
        return "\n".join(
            [
                f"tool: {self.tool}",
                f"decision: {decided}",
                f"matched: {d.matcher or '(no rule)'}",
                f"checked before: {before or '(none)'}",
            ]
        )


def matcherText(rule: PolicyRule) -> str:
    """
    @return: human text for a rule's matcher: C{"glob 'http_*'"}, C{"list [a, b]"}.
    """
    kind, value = rule.match.kind, rule.match.value
    if isinstance(value, tuple):
        return f"{kind} [{', '.join(value)}]"
    return f"{kind} '{value}'"


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


def _predicate(rule: PolicyRule) -> Callable[[str], bool]:
    """A function telling whether the rule matches a tool name."""
    kind, value = rule.match.kind, rule.match.value
    if isinstance(value, tuple):
        names = frozenset(value)
        return names.__contains__
    if kind == "exact":
        return value.__eq__
    if kind == "prefix":
        return lambda tool: tool.startswith(value)
    if kind == "glob":
        match = re.compile(fnmatch.translate(value)).match
    else:
        match = re.compile(value).search
    return lambda tool: match(tool) is not None


@implementer(IPolicy)
class Policy:
    """
    A compiled policy; build it with L{Policy.fromConfig}.

    Not thread-safe (the reactor thread uses it).

    @ivar defaultAction: C{allow} or C{deny}.
    @ivar filterToolsList: C{tools/list} answers leave out tools L{allows} refuses.
    """

    def __init__(
        self,
        config: PolicyConfig,
        previous: Policy | None = None,
        cacheSize: int = _DEFAULT_CACHE_SIZE,
        maxBuckets: int = _DEFAULT_MAX_BUCKETS,
    ) -> None:
        """
        Use L{fromConfig}; C{cacheSize} (decisions memoised, 0 for none) and C{maxBuckets}
        (per rate-limited rule) are for tests and benchmarks.
        """
        self.defaultAction = config.default_action
        self.filterToolsList = config.filter_tools_list
        self._cacheSize = cacheSize
        self._cache: dict[str, Decision] = {}
        rules = config.rules
        self._rules = rules
        self._decisions = [Decision(r.action, r.id, matcherText(r)) for r in rules]
        self._decisions.append(Decision(config.default_action, None, None))
        self._exact: dict[str, int] = {}
        self._prefixes: dict[str, int] = {}
        self._scan: list[tuple[int, Callable[[str], bool]]] = []
        self._redactions: dict[str, Callable[[str], str]] = {}
        self._limits: dict[str, TokenBuckets] = {}
        old = previous._limitsBySettings() if previous is not None else {}
        for i, rule in enumerate(rules):
            indexed = _indexedAs(rule)
            if rule.match.kind == "list":
                for name in _names(rule):
                    self._exact.setdefault(name, i)
            elif indexed is not None:
                table = self._exact if indexed[0] == "exact" else self._prefixes
                table.setdefault(indexed[1], i)
            else:
                self._scan.append((i, _predicate(rule)))
            if rule.action == "redact":
                self._redactions[rule.id] = _redactor(rule.redact)
            elif rule.action == "rate_limit" and rule.rate_limit is not None:
                spec = rule.rate_limit
                buckets = old.get(_settings(rule))
                if buckets is None:
                    buckets = TokenBuckets(spec.rate, spec.burst, maxBuckets)
                self._limits[rule.id] = buckets
        self._prefixLengths = sorted({len(p) for p in self._prefixes})

    @classmethod
    def fromConfig(cls, config: PolicyConfig, previous: Policy | None = None) -> Policy:
        """
        Compile a policy.

        @param previous: the policy of the generation being replaced: the rate-limit buckets of
            its rules whose id, match, rate and burst are unchanged carry over (shared).
        """
        return cls(config, previous)

    @property
    def ruleIds(self) -> tuple[str, ...]:
        """The rule ids, in order."""
        return tuple(rule.id for rule in self._rules)

    def _limitsBySettings(self) -> dict[tuple[object, ...], TokenBuckets]:
        return {_settings(r): self._limits[r.id] for r in self._rules if r.id in self._limits}

    def _index(self, tool: str) -> int:
        """The index of the deciding rule; C{len(rules)} for the default."""
        best = self._exact.get(tool, len(self._rules))
        prefixes = self._prefixes
        for length in self._prefixLengths:
            if length > len(tool):
                break
            i = prefixes.get(tool[:length])
            if i is not None and i < best:
                best = i
        for i, matches in self._scan:
            if i >= best:
                break
            if matches(tool):
                return i
        return best

    def decide(self, tool: str) -> Decision:
        """
        @return: the decision of the first rule matching C{tool}, else the default action.
        """
        decision = self._cache.get(tool)
        if decision is None:
            decision = self._decisions[self._index(tool)]
            if self._cacheSize:
                if len(self._cache) >= self._cacheSize:
                    self._cache.clear()
                self._cache[tool] = decision
        return decision

    def allows(self, tool: str) -> bool:
        """
        @return: C{False} iff C{tool} is denied (redacted and rate-limited tools are listed).
        """
        return self.decide(tool).action != "deny"

    def explain(self, tool: str) -> Explanation:
        """
        @return: the decision for C{tool}, and the rules checked before the deciding one.
        """
        index = self._index(tool)
        checked = tuple((rule.id, matcherText(rule)) for rule in self._rules[:index])
        return Explanation(tool, self._decisions[index], checked, index == len(self._rules))

    def redact(self, rule_id: str, arguments: object) -> tuple[object, int]:
        """
        Replace every match of the rule's patterns by L{REDACTED} in every string of a JSON value,
        object keys included (nested; a secret used as a key is no less a secret). Keys that
        become equal after scrubbing merge, the later value winning.

        @param rule_id: a C{redact} rule.
        @return: a redacted copy (C{arguments} is not changed) and how many strings changed.
        @raise KeyError: C{rule_id} is not a C{redact} rule of this policy.
        """
        scrub = self._redactions[rule_id]
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

        return walk(arguments), changed

    def rateLimit(self, rule_id: str, session: str, now: float) -> float | None:
        """
        Take one token from the bucket of (C{rule_id}, C{session}); a new bucket starts full.

        @param now: the current time in seconds.
        @return: C{None} if a token was taken, else the seconds until one is available (the caller
            rounds up for C{Retry-After}).
        @raise KeyError: C{rule_id} is not a C{rate_limit} rule of this policy.
        """
        return self._limits[rule_id].take(session, now)

    def bucketCount(self, rule_id: str) -> int:
        """
        @return: how many session buckets the C{rate_limit} rule C{rule_id} holds.
        """
        return len(self._limits[rule_id].buckets)


def _settings(rule: PolicyRule) -> tuple[object, ...]:
    """What must be unchanged for a rule's buckets to carry over to a new generation."""
    return (rule.id, rule.match, rule.rate_limit)


# -- Shadowed rules ---------------------------------------------------------------------------


def _globHead(pattern: str) -> str:
    """The literal text every name a glob matches starts with."""
    for i, c in enumerate(pattern):
        if c in _GLOB_SPECIALS:
            return pattern[:i]
    return pattern


#: Literal text every match of a built-in contains: the regex only runs when it is present.
_HINTS: dict[str, Callable[[str], bool]] = {
    "bearer": lambda text: "earer" in text or "EARER" in text or "bearer" in text.lower(),
    "openai_key": lambda text: "sk-" in text,
    "aws_access_key": lambda text: "AKIA" in text or "ASIA" in text,
    "jwt": lambda text: "eyJ" in text,
}


def _redactor(entries: tuple[str, ...]) -> Callable[[str], str]:
    """
    The scrubbing function of one C{redact} rule. A built-in pattern only runs on strings that
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


def shadowedRules(config: PolicyConfig) -> list[tuple[int, str]]:
    """
    Find rules that can never decide because earlier rules catch the names they match.

    Detected: an C{exact} name (or a glob without wildcards) or C{list} names matched by an earlier
    rule of any kind; a C{prefix} or C{glob} whose literal start begins with an earlier prefix (or
    C{literal*} glob); a C{glob} or C{regex} identical to an earlier one. A C{list} with only some
    names caught gets a warning naming those names. Not detected: other overlaps of patterns (a
    regex, or a glob, covered by a different earlier pattern).

    @return: C{(rule index, message)} warnings, in rule order.
    """
    warnings: list[tuple[int, str]] = []
    rules = config.rules
    predicates = [_predicate(rule) for rule in rules]
    for i, rule in enumerate(rules):
        earlier = rules[:i]
        kind, value = rule.match.kind, rule.match.value
        indexed = _indexedAs(rule)
        if kind == "list" or (indexed and indexed[0] == "exact"):
            names = _names(rule)
            caught = []
            for name in names:
                j = next((j for j in range(i) if predicates[j](name)), None)
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
        same = next((r for r in earlier if r.match == rule.match), None)
        if same is not None and kind != "prefix":
            text = matcherText(rule)
            warnings.append(
                (i, f"rule '{rule.id}' can never match: rule '{same.id}' has the same {text}")
            )
            continue
        if kind == "regex":
            continue
        head = value if kind == "prefix" else _globHead(value)
        for other in earlier:
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


def _describe(rule: PolicyRule) -> str:
    return f"rule '{rule.id}' ({matcherText(rule)})"
