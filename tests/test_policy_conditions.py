"""
Tests for L{mcpgw.policy}, contract part 2: rules by method and with C{when} conditions (keys,
identities, clients, arguments), per-method default actions, listing per caller, the verdict on a
whole request, result redaction, rate-limit buckets by C{per}, the caches, C{explain} reasons and
the config-check warnings about conditional rules.
"""

from __future__ import annotations

import copy
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mcpgw.config import Conditions, MatchSpec, PolicyConfig, PolicyRule, RateLimitSpec
from mcpgw.errors import PolicyDenied, RateLimited
from mcpgw.policy import (
    ANONYMOUS,
    REDACTED,
    Caller,
    Decision,
    Policy,
    addressIn,
    networks,
    shadowedRules,
    unknownKeys,
)

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
SSN = r"(?i)ssn:\s*\d{3}-\d{2}-\d{4}"

CI = Caller(keyId="ci-bot", principal="ci-bot", client="10.1.2.3", session="s1")
DEPLOY = Caller(keyId="deploy-eu", principal="deploy-eu", client="10.1.2.4")
FINANCE = Caller(principal="spiffe://corp.example/finance/payer", client="10.20.3.4")
OUTSIDER = Caller(principal="spiffe://corp.example/hr/x", client="192.0.2.7")


def rule(
    rule_id: str,
    action: str,
    kind: str,
    value: str | tuple[str, ...],
    *,
    method: str = "tools/call",
    keys: tuple[str, ...] = (),
    identities: tuple[str, ...] = (),
    clients: tuple[str, ...] = (),
    arguments: tuple[tuple[str, MatchSpec], ...] = (),
    redact: tuple[str, ...] = (),
    rate: tuple[float, float, str] | None = None,
    results: tuple[str, ...] = (),
) -> PolicyRule:
    """A L{PolicyRule}; C{rate} is C{(rate, burst, per)}; C{results} its C{redact_results}."""
    conditions = Conditions(keys, identities, clients, arguments)
    return PolicyRule(
        rule_id,
        action,
        MatchSpec(kind, value),
        redact,
        RateLimitSpec(*rate) if rate else None,
        method,
        conditions if conditions != Conditions() else None,
        results,
    )


def policy(
    *rules: PolicyRule,
    default: str = "allow",
    defaults: dict[str, str] | None = None,
    cacheSize: int = 4096,
) -> Policy:
    """A L{Policy} of C{rules}; C{defaults} is C{default_action} written as a map."""
    if defaults is not None:
        config = PolicyConfig(
            defaults.get("tools/call", "allow"), True, rules, tuple(defaults.items())
        )
    else:
        config = PolicyConfig(default, True, rules)
    return Policy(config, cacheSize=cacheSize)


#: The policy example of DESIGN.md, contract part 2.
DESIGN2 = (
    rule("ci-reads", "allow", "list", ("read_file", "list_dir"), keys=("ci-bot", "deploy-*")),
    rule(
        "finance-pays",
        "allow",
        "prefix",
        "payments_",
        identities=("spiffe://corp.example/finance/*",),
        clients=("10.20.0.0/16",),
    ),
    rule("no-payments", "deny", "prefix", "payments_"),
    rule(
        "no-sql-writes",
        "deny",
        "exact",
        "execute_sql",
        arguments=(
            ("query", MatchSpec("regex", r"(?i)^\s*(insert|update|delete|drop|alter|truncate)\b")),
        ),
    ),
    rule("docs-only", "allow", "prefix", "file:///srv/docs/", method="resources/read"),
    rule(
        "per-key-budget",
        "rate_limit",
        "glob",
        "*",
        rate=(5, 10, "key"),
        results=("aws_access_key", SSN),
    ),
)


def call(
    method: str, target: str, arguments: object = None, rid: object = 1, key: str = "name"
) -> dict[str, Any]:
    """A JSON-RPC request of C{method} on C{target}."""
    if method == "resources/read":
        key = "uri"
    params: dict[str, Any] = {key: target}
    if arguments is not None:
        params["arguments"] = arguments
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


class CallerConditionTests(SynchronousTestCase):
    """C{when.keys}, C{when.identities} and C{when.clients}."""

    def setUp(self) -> None:
        self.policy = policy(*DESIGN2, defaults={"tools/call": "deny", "resources/read": "deny"})

    def test_keys(self) -> None:
        """A key glob matches the API key id; no key or another key does not match."""
        p = self.policy
        self.assertEqual(p.decide("tools/call", "read_file", CI).rule_id, "ci-reads")
        self.assertEqual(p.decide("tools/call", "list_dir", DEPLOY).rule_id, "ci-reads")
        other = Caller(keyId="intern", principal="intern")
        self.assertEqual(p.decide("tools/call", "read_file", other).rule_id, "per-key-budget")
        self.assertEqual(p.decide("tools/call", "read_file").rule_id, "per-key-budget")

    def test_keysAreNotPrincipals(self) -> None:
        """C{keys} looks at the key id only: a principal of the same name is not a key."""
        p = policy(rule("k", "deny", "exact", "t", keys=("ci-bot",)))
        self.assertEqual(p.decide("tools/call", "t", Caller(principal="ci-bot")).rule_id, None)
        self.assertEqual(p.decide("tools/call", "t", Caller(keyId="ci-bot")).rule_id, "k")

    def test_identitiesAndClientsTogether(self) -> None:
        """Every condition of a C{when} must hold: the identity and the client network."""
        p = self.policy
        self.assertEqual(p.decide("tools/call", "payments_send", FINANCE).action, "allow")
        elsewhere = Caller(principal=FINANCE.principal, client="10.21.0.1")
        self.assertEqual(p.decide("tools/call", "payments_send", elsewhere).rule_id, "no-payments")
        self.assertEqual(p.decide("tools/call", "payments_send", OUTSIDER).rule_id, "no-payments")
        self.assertEqual(p.decide("tools/call", "payments_send").action, "deny")

    def test_globsAreCaseSensitive(self) -> None:
        """Identity globs follow fnmatchcase: case matters, C{*} crosses slashes."""
        p = policy(rule("i", "deny", "glob", "*", identities=("spiffe://corp/*",)))
        deep = Caller(principal="spiffe://corp/a/b/c")
        self.assertEqual(p.decide("tools/call", "x", deep).rule_id, "i")
        upper = Caller(principal="SPIFFE://corp/a")
        self.assertEqual(p.decide("tools/call", "x", upper).rule_id, None)

    def test_clientNetworks(self) -> None:
        """IPv4 and IPv6 networks; an IPv4-mapped address counts as IPv4; junk is in none."""
        nets = networks(("10.0.0.0/8", "2001:db8::/32", "127.0.0.1/32"))
        self.assertTrue(addressIn("10.255.0.1", nets))
        self.assertTrue(addressIn("::ffff:10.1.1.1", nets))
        self.assertTrue(addressIn("2001:db8::5", nets))
        self.assertTrue(addressIn("127.0.0.1", nets))
        self.assertFalse(addressIn("11.0.0.1", nets))
        self.assertFalse(addressIn("127.0.0.2", nets))
        self.assertFalse(addressIn("not-an-address", nets))
        self.assertFalse(addressIn(None, nets))

    def test_conditionalRuleDoesNotStopTheSearch(self) -> None:
        """
        First match wins across conditional and unconditional rules: a conditional rule that does
        not hold passes the call on to later rules, also to later scanned or indexed ones.
        """
        p = policy(
            rule("a", "allow", "regex", "^pay", keys=("k",)),
            rule("b", "redact", "prefix", "pay", keys=("j",), redact=("jwt",)),
            rule("c", "rate_limit", "exact", "pay_x", rate=(1, 1, "session")),
            rule("d", "deny", "glob", "pay_*"),
        )
        self.assertEqual(p.decide("tools/call", "pay_x", Caller(keyId="k")).rule_id, "a")
        self.assertEqual(p.decide("tools/call", "pay_x", Caller(keyId="j")).rule_id, "b")
        self.assertEqual(p.decide("tools/call", "pay_x", Caller(keyId="z")).rule_id, "c")
        self.assertEqual(p.decide("tools/call", "pay_y", Caller(keyId="z")).rule_id, "d")
        self.assertEqual(p.decide("tools/call", "payz", Caller(keyId="z")).rule_id, None)

    def test_unconditionalRuleHidesLaterConditionalOnes(self) -> None:
        """An earlier unconditional rule decides before any later conditional rule is tried."""
        p = policy(
            rule("all", "deny", "prefix", "x"),
            rule("ci", "allow", "exact", "x1", keys=("*",)),
        )
        self.assertEqual(p.decide("tools/call", "x1", CI).rule_id, "all")

    def test_dependsOnCaller(self) -> None:
        """Only keys, identities or clients conditions make decisions depend on the caller."""
        self.assertTrue(policy(*DESIGN2).dependsOnCaller)
        args = (("q", MatchSpec("exact", "x")),)
        self.assertFalse(policy(rule("a", "deny", "exact", "t", arguments=args)).dependsOnCaller)
        self.assertFalse(policy(rule("a", "deny", "exact", "t")).dependsOnCaller)


class ArgumentConditionTests(SynchronousTestCase):
    """C{when.arguments}: dotted paths, values compared as text."""

    def decide(self, matcher: MatchSpec, arguments: object, path: str = "q") -> str | None:
        p = policy(rule("r", "deny", "exact", "t", arguments=((path, matcher),)))
        return p.decide("tools/call", "t", ANONYMOUS, arguments).rule_id

    def test_designExample(self) -> None:
        """The SQL-write rule denies writes and lets reads through to the next rule."""
        p = policy(*DESIGN2)
        for query in ("DELETE FROM t", "  drop table x", "Insert into t values (1)"):
            d = p.decide("tools/call", "execute_sql", CI, {"query": query})
            self.assertEqual(d.rule_id, "no-sql-writes", query)
        d = p.decide("tools/call", "execute_sql", CI, {"query": "select * from deleted"})
        self.assertEqual(d.rule_id, "per-key-budget")

    def test_textOfScalars(self) -> None:
        """Strings as they are; numbers and booleans as their JSON text."""
        self.assertEqual(self.decide(MatchSpec("exact", "5"), {"q": 5}), "r")
        self.assertEqual(self.decide(MatchSpec("exact", "5"), {"q": "5"}), "r")
        self.assertEqual(self.decide(MatchSpec("exact", "2.5"), {"q": 2.5}), "r")
        self.assertEqual(self.decide(MatchSpec("exact", "true"), {"q": True}), "r")
        self.assertEqual(self.decide(MatchSpec("exact", "false"), {"q": False}), "r")
        self.assertEqual(self.decide(MatchSpec("exact", "True"), {"q": True}), None)
        self.assertEqual(self.decide(MatchSpec("list", ("1", "2")), {"q": 2}), "r")

    def test_absentOrNonScalarNeverMatches(self) -> None:
        """Absent, null, objects and arrays never match, not even a match-everything regex."""
        anything = MatchSpec("regex", "")
        cases: list[object] = [{}, {"q": None}, {"q": {}}, {"q": ["x"]}, None, [], "q", {"Q": "x"}]
        for arguments in cases:
            self.assertEqual(self.decide(anything, arguments), None, arguments)
        self.assertEqual(self.decide(anything, {"q": ""}), "r")

    def test_dottedPath(self) -> None:
        """Dots separate the keys of nested objects; arrays are not indexed."""
        spec = MatchSpec("prefix", "/etc/")
        self.assertEqual(self.decide(spec, {"opts": {"path": "/etc/passwd"}}, "opts.path"), "r")
        self.assertEqual(self.decide(spec, {"opts": {"path": "/tmp/x"}}, "opts.path"), None)
        self.assertEqual(self.decide(spec, {"opts.path": "/etc/passwd"}, "opts.path"), None)
        self.assertEqual(self.decide(spec, {"opts": [{"path": "/etc/x"}]}, "opts.0.path"), None)

    def test_everyMatcherKind(self) -> None:
        """exact, prefix, glob, regex (search) and list work on argument text."""
        cases = [
            (MatchSpec("exact", "a b"), "a b", "a bc"),
            (MatchSpec("prefix", "rm "), "rm -rf /", "echo rm"),
            (MatchSpec("glob", "*.pem"), "server.pem", "server.pem.txt"),
            (MatchSpec("regex", r"\bsudo\b"), "please sudo now", "pseudo"),
            (MatchSpec("list", ("prod", "live")), "live", "staging"),
        ]
        for spec, yes, no in cases:
            self.assertEqual(self.decide(spec, {"q": yes}), "r", spec)
            self.assertEqual(self.decide(spec, {"q": no}), None, spec)

    def test_allConditionsHold(self) -> None:
        """Several argument conditions, and caller conditions with them, must all hold."""
        p = policy(
            rule(
                "r",
                "deny",
                "exact",
                "t",
                keys=("ci-*",),
                arguments=(("a", MatchSpec("exact", "1")), ("b", MatchSpec("exact", "2"))),
            )
        )
        self.assertEqual(p.decide("tools/call", "t", CI, {"a": 1, "b": 2}).rule_id, "r")
        self.assertEqual(p.decide("tools/call", "t", CI, {"a": 1, "b": 3}).rule_id, None)
        self.assertEqual(p.decide("tools/call", "t", DEPLOY, {"a": 1, "b": 2}).rule_id, None)

    def test_argumentsOnlyReadWhenTargetMatches(self) -> None:
        """Argument conditions are not evaluated for a call whose target another rule decides."""
        read: list[object] = []

        class Spy(dict[str, object]):
            def get(self, key: str, default: object = None) -> object:
                read.append(key)
                return super().get(key, default)

        p = policy(
            rule("other", "deny", "exact", "u", arguments=(("q", MatchSpec("exact", "x")),)),
            rule("t", "allow", "exact", "t"),
        )
        self.assertEqual(p.decide("tools/call", "t", ANONYMOUS, Spy(q="x")).rule_id, "t")
        self.assertEqual(read, [])
        self.assertEqual(p.decide("tools/call", "u", ANONYMOUS, Spy(q="x")).rule_id, "other")
        self.assertEqual(read, ["q"])


class MethodTests(SynchronousTestCase):
    """C{method}: rules for resources/read and prompts/get, and default actions per method."""

    def test_ruleAppliesToItsMethodOnly(self) -> None:
        """A rule decides calls of its method only; the target is the URI or the prompt name."""
        p = policy(
            rule("docs", "allow", "prefix", "file:///srv/docs/", method="resources/read"),
            rule("no-files", "deny", "prefix", "file://", method="resources/read"),
            rule("no-greet", "deny", "exact", "greet", method="prompts/get"),
        )
        self.assertEqual(p.decide("resources/read", "file:///srv/docs/a.md").rule_id, "docs")
        self.assertEqual(p.decide("resources/read", "file:///etc/passwd").rule_id, "no-files")
        self.assertEqual(p.decide("prompts/get", "greet").rule_id, "no-greet")
        self.assertEqual(p.decide("tools/call", "greet"), Decision("allow", None, None))
        self.assertEqual(p.decide("tools/call", "file:///etc/passwd").rule_id, None)
        self.assertEqual(p.decide("resources/read", "greet").rule_id, None)

    def test_singleDefaultDecidesToolsOnly(self) -> None:
        """C{default_action: deny} (one action) keeps its meaning: other methods pass."""
        p = policy(default="deny")
        self.assertEqual(p.decide("tools/call", "x").action, "deny")
        self.assertEqual(p.decide("x").action, "deny")
        self.assertEqual(p.decide("resources/read", "file:///x").action, "allow")
        self.assertEqual(p.decide("prompts/get", "greet").action, "allow")
        self.assertEqual(p.defaultFor("tools/call"), "deny")
        self.assertEqual(p.defaultFor("resources/read"), "allow")

    def test_defaultPerMethod(self) -> None:
        """A map decides per method; a method left out is allowed."""
        p = policy(defaults={"resources/read": "deny", "prompts/get": "deny"})
        self.assertEqual(p.decide("tools/call", "x").action, "allow")
        self.assertEqual(p.decide("resources/read", "file:///x").action, "deny")
        self.assertEqual(p.decide("prompts/get", "greet").action, "deny")
        self.assertEqual(p.defaultAction, "allow")

    def test_otherMethodsPass(self) -> None:
        """A method policy does not decide is allowed, whatever the defaults."""
        p = policy(
            rule("all", "deny", "glob", "*"),
            defaults={"tools/call": "deny", "resources/read": "deny", "prompts/get": "deny"},
        )
        self.assertEqual(p.decide("tools/list", "x"), Decision("allow", None, None))
        self.assertTrue(p.allows("initialize", "x"))

    def test_canDeny(self) -> None:
        """canDeny tells, per method, whether a listing could lose anything."""
        p = policy(rule("r", "deny", "exact", "greet", method="prompts/get"))
        self.assertTrue(p.canDeny("prompts/get"))
        self.assertFalse(p.canDeny("tools/call"))
        self.assertFalse(p.canDeny("resources/read"))
        self.assertTrue(policy(defaults={"resources/read": "deny"}).canDeny("resources/read"))


class ListingTests(SynchronousTestCase):
    """C{allows} and C{lister}: what a listing shows to a caller."""

    def test_perCaller(self) -> None:
        """A tool is shown to the callers a rule allows it for and hidden from the others."""
        p = policy(*DESIGN2, default="deny")
        self.assertTrue(p.allows("tools/call", "read_file", CI))
        self.assertTrue(p.allows("tools/call", "payments_send", FINANCE))
        self.assertFalse(p.allows("tools/call", "payments_send", CI))
        self.assertFalse(p.allows("tools/call", "payments_send"))

    def test_argumentRulesNeverHide(self) -> None:
        """A deny rule with argument conditions does not hide its tool; the next rule decides."""
        args = (("q", MatchSpec("regex", "drop")),)
        p = policy(rule("no-drop", "deny", "exact", "sql", arguments=args))
        self.assertTrue(p.allows("tools/call", "sql"))
        then = policy(
            rule("no-drop", "deny", "exact", "sql", arguments=args),
            rule("no-sql", "deny", "exact", "sql"),
        )
        self.assertFalse(then.allows("tools/call", "sql"))

    def test_argumentAllowShows(self) -> None:
        """An allow rule with argument conditions before a deny shows the tool: some calls pass."""
        p = policy(
            rule("reads", "allow", "exact", "sql", arguments=(("q", MatchSpec("prefix", "sel")),)),
            default="deny",
        )
        self.assertTrue(p.allows("tools/call", "sql"))
        self.assertFalse(p.allows("tools/call", "other"))

    def test_methods(self) -> None:
        """Resources and prompts are listed by their own rules and defaults."""
        p = policy(*DESIGN2, defaults={"tools/call": "deny", "resources/read": "deny"})
        self.assertTrue(p.allows("resources/read", "file:///srv/docs/x"))
        self.assertFalse(p.allows("resources/read", "file:///etc/passwd"))
        self.assertTrue(p.allows("prompts/get", "anything"))

    def test_oldShape(self) -> None:
        """allows(tool) is an anonymous tools/call listing, as in part 1."""
        p = policy(*DESIGN2[:3], default="deny")
        self.assertFalse(p.allows("read_file"))
        self.assertFalse(p.allows("payments_x"))
        self.assertTrue(policy(*DESIGN2).allows("search"))

    def test_listerMemoisedPerCaller(self) -> None:
        """A warm lister answers from its table without evaluating rules again."""
        p = policy(*DESIGN2[:3], default="deny")
        calls = []
        real = p._listable

        def counting(method: str, target: str, caller: Caller) -> bool:
            calls.append(target)
            return real(method, target, caller)

        p._listable = counting  # type: ignore[method-assign]
        names = [f"tool_{i}" for i in range(100)] + ["read_file"]
        first = [p.lister("tools/call", CI)(n) for n in names]
        again = [p.lister("tools/call", CI)(n) for n in names]
        self.assertEqual(first, again)
        self.assertEqual(len(calls), len(names))
        self.assertFalse(p.lister("tools/call", ANONYMOUS)("read_file"))
        self.assertEqual(len(calls), len(names) + 1)
        # another session of the same key, from the same address, shares the table
        same = Caller(keyId="ci-bot", principal="ci-bot", client="10.1.2.3", session="s2")
        self.assertTrue(p.lister("tools/call", same)("read_file"))
        self.assertEqual(len(calls), len(names) + 1)

    def test_listingMemoBounded(self) -> None:
        """However many callers list, the memoised answers stay under the bound."""
        import mcpgw.policy

        self.patch(mcpgw.policy, "_MAX_LISTED", 50)
        p = policy(*DESIGN2[:3], default="deny")
        for i in range(40):
            caller = Caller(keyId=f"k{i}", principal=f"k{i}")
            for name in ("read_file", "list_dir", "payments_x", "other"):
                self.assertEqual(p.allows("tools/call", name, caller), False)
            self.assertLessEqual(sum(len(t) for t in p._listing.values()), 50)
        self.assertTrue(p.allows("tools/call", "read_file", CI))


class VerdictTests(SynchronousTestCase):
    """C{verdict}: a whole request, batches included."""

    def setUp(self) -> None:
        self.policy = policy(
            rule("no-shell", "deny", "exact", "shell_exec"),
            rule("scrub", "redact", "prefix", "http_", redact=("aws_access_key",)),
            rule("slow", "rate_limit", "exact", "search", rate=(1, 1, "session")),
            rule("scrub-prompt", "redact", "exact", "greet", method="prompts/get", redact=("jwt",)),
            rule("results", "allow", "exact", "report", results=("aws_access_key",)),
            rule("no-etc", "deny", "prefix", "file:///etc/", method="resources/read"),
        )

    def test_allowed(self) -> None:
        """Nothing decided by a rule: allow, nothing changed, the audit fields empty."""
        v = self.policy.verdict([call("tools/call", "echo", {"t": "x"})], CI, 0.0)
        self.assertEqual(
            (v.decision, v.ruleId, v.refusal, v.changed, v.redacted, v.redactRules, v.resultRules),
            ("allow", None, None, False, None, (), {}),
        )

    def test_otherMethodsPassOver(self) -> None:
        """Requests without a call policy decides, and responses, are allowed as they are."""
        messages = [
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            {"jsonrpc": "2.0", "id": 7, "result": {}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
        ]
        v = self.policy.verdict(messages, ANONYMOUS, 0.0)
        self.assertEqual((v.decision, v.ruleId, v.refusal), ("allow", None, None))

    def test_deniedRefusesTheBatch(self) -> None:
        """A denied call refuses the whole request with PolicyDenied carrying the rule id."""
        messages = [
            call("tools/call", "http_get", {"h": AWS_KEY}, 1),
            call("tools/call", "shell_exec", {}, 2),
        ]
        v = self.policy.verdict(messages, ANONYMOUS, 0.0)
        self.assertIsInstance(v.refusal, PolicyDenied)
        assert v.refusal is not None
        self.assertEqual(v.refusal.data, {"rule_id": "no-shell"})
        self.assertEqual((v.decision, v.ruleId), ("deny", "no-shell"))

    def test_resourceDenied(self) -> None:
        """resources/read is decided by its URI."""
        v = self.policy.verdict([call("resources/read", "file:///etc/shadow")], ANONYMOUS, 0.0)
        self.assertEqual((v.decision, v.ruleId), ("deny", "no-etc"))

    def test_defaultDenyHasNoRule(self) -> None:
        """A default deny refuses with a null rule_id."""
        v = policy(default="deny").verdict([call("tools/call", "x")], ANONYMOUS, 0.0)
        assert v.refusal is not None
        self.assertEqual(v.refusal.data, {"rule_id": None})

    def test_rateLimited(self) -> None:
        """Past its burst a rate-limited call refuses with RateLimited and Retry-After."""
        first = self.policy.verdict([call("tools/call", "search")], CI, 0.0)
        self.assertEqual((first.decision, first.ruleId, first.refusal), ("allow", "slow", None))
        second = self.policy.verdict([call("tools/call", "search")], CI, 0.2)
        self.assertIsInstance(second.refusal, RateLimited)
        assert isinstance(second.refusal, RateLimited)
        self.assertEqual(second.refusal.retryAfter, 1)
        self.assertEqual(second.refusal.data, {"rule_id": "slow"})
        self.assertEqual((second.decision, second.ruleId), ("rate_limit", "slow"))

    def test_redactInPlace(self) -> None:
        """Redaction rewrites params.arguments in place and says so; the rule scrubs headers."""
        messages = [
            call("tools/call", "echo", {"t": AWS_KEY}, 1),
            call("tools/call", "http_get", {"h": AWS_KEY, "n": [AWS_KEY]}, 2),
        ]
        v = self.policy.verdict(messages, ANONYMOUS, 0.0)
        self.assertEqual(messages[0]["params"]["arguments"], {"t": AWS_KEY})
        self.assertEqual(messages[1]["params"]["arguments"], {"h": REDACTED, "n": [REDACTED]})
        self.assertEqual(
            (v.decision, v.ruleId, v.changed, v.redacted, v.redactRules),
            ("redact", "scrub", True, 2, ("scrub",)),
        )

    def test_redactNothingFound(self) -> None:
        """A redact decision without a match changes nothing but is audited as redact, 0."""
        messages = [call("tools/call", "http_get", {"h": "clean"})]
        original = copy.deepcopy(messages)
        v = self.policy.verdict(messages, ANONYMOUS, 0.0)
        self.assertEqual(messages, original)
        self.assertEqual((v.decision, v.changed, v.redacted), ("redact", False, 0))
        self.assertEqual(v.redactRules, ("scrub",))

    def test_promptArgumentsRedacted(self) -> None:
        """prompts/get arguments are redacted like tool arguments."""
        jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"
        messages = [call("prompts/get", "greet", {"name": f"token {jwt}"})]
        v = self.policy.verdict(messages, ANONYMOUS, 0.0)
        self.assertEqual(messages[0]["params"]["arguments"], {"name": f"token {REDACTED}"})
        self.assertEqual((v.decision, v.ruleId), ("redact", "scrub-prompt"))

    def test_firstDecisionAudited(self) -> None:
        """Without refusal or redaction the first decided call's decision is audited."""
        messages = [call("tools/call", "search", rid=1), call("tools/call", "echo", rid=2)]
        v = self.policy.verdict(messages, CI, 0.0)
        self.assertEqual((v.decision, v.ruleId), ("allow", "slow"))

    def test_resultRules(self) -> None:
        """Calls decided by a rule with redact_results are named by their request id."""
        messages = [
            call("tools/call", "report", rid="a"),
            call("tools/call", "echo", rid="b"),
            call("tools/call", "report", rid=3),
            {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "report"}},
        ]
        v = self.policy.verdict(messages, ANONYMOUS, 0.0)
        self.assertEqual(v.resultRules, {"a": "results", 3: "results"})

    def test_nonStringTarget(self) -> None:
        """A call without a string name is decided as the empty name, like part 1."""
        p = policy(rule("empty", "deny", "exact", ""))
        odd = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 5}}
        self.assertEqual(p.verdict([odd], ANONYMOUS, 0.0).ruleId, "empty")
        listed = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["x"]}
        self.assertEqual(p.verdict([listed], ANONYMOUS, 0.0).ruleId, "empty")

    def test_argumentConditionsSeeTheCall(self) -> None:
        """Each call of a batch is decided with its own arguments."""
        p = policy(*DESIGN2)
        ok = call("tools/call", "execute_sql", {"query": "select 1"}, 1)
        bad = call("tools/call", "execute_sql", {"query": "drop table t"}, 2)
        self.assertIsNone(p.verdict([ok], CI, 0.0).refusal)
        self.assertEqual(p.verdict([ok, bad], CI, 0.0).ruleId, "no-sql-writes")


class RedactResultTests(SynchronousTestCase):
    """C{redactResult}: tool, resource and prompt results."""

    def setUp(self) -> None:
        self.policy = policy(*DESIGN2)

    def test_toolResult(self) -> None:
        """content[].text and every string of structuredContent, keys too, are scrubbed."""
        result = {
            "content": [
                {"type": "text", "text": f"key {AWS_KEY}; SSN: 078-05-1120"},
                {"type": "image", "data": AWS_KEY, "mimeType": "image/png"},
                {"type": "resource", "resource": {"uri": "x://1", "text": AWS_KEY}},
            ],
            "structuredContent": {"keys": [AWS_KEY, 5], AWS_KEY: {"n": "ssn: 123-45-6789"}},
            "isError": False,
        }
        original = copy.deepcopy(result)
        new, count = self.policy.redactResult("per-key-budget", result)
        self.assertEqual(
            new,
            {
                "content": [
                    {"type": "text", "text": f"key {REDACTED}; {REDACTED}"},
                    {"type": "image", "data": AWS_KEY, "mimeType": "image/png"},
                    {"type": "resource", "resource": {"uri": "x://1", "text": REDACTED}},
                ],
                "structuredContent": {"keys": [REDACTED, 5], REDACTED: {"n": REDACTED}},
                "isError": False,
            },
        )
        self.assertEqual(count, 5)
        self.assertEqual(result, original)

    def test_resourceAndPromptResults(self) -> None:
        """resources/read contents[].text and prompts/get messages[].content.text too."""
        resource = {"contents": [{"uri": "file:///a", "text": AWS_KEY}]}
        self.assertEqual(
            self.policy.redactResult("per-key-budget", resource),
            ({"contents": [{"uri": "file:///a", "text": REDACTED}]}, 1),
        )
        prompt = {"messages": [{"role": "user", "content": {"type": "text", "text": AWS_KEY}}]}
        self.assertEqual(
            self.policy.redactResult("per-key-budget", prompt),
            ({"messages": [{"role": "user", "content": {"type": "text", "text": REDACTED}}]}, 1),
        )

    def test_nothingToScrub(self) -> None:
        """A clean result comes back as the same object, count 0; so do non-objects."""
        result = {"content": [{"type": "text", "text": "clean"}], "structuredContent": {"a": 1}}
        new, count = self.policy.redactResult("per-key-budget", result)
        self.assertIs(new, result)
        self.assertEqual(count, 0)
        self.assertEqual(self.policy.redactResult("per-key-budget", None), (None, 0))

    def test_decisionSaysSo(self) -> None:
        """The decision of a rule with redact_results says so; others do not."""
        self.assertTrue(self.policy.decide("tools/call", "x", CI).redact_results)
        self.assertFalse(self.policy.decide("tools/call", "read_file", CI).redact_results)

    def test_notAResultRule(self) -> None:
        """Scrubbing results by a rule without redact_results is a programming error."""
        self.assertRaises(KeyError, self.policy.redactResult, "no-payments", {})


class BucketTests(SynchronousTestCase):
    """C{rate_limit.per}: whose bucket a call takes from."""

    def test_bucketKeys(self) -> None:
        """Each C{per} keys its buckets by its part of the caller, else by the client address."""
        rules = [
            rule(per, "rate_limit", "exact", per, rate=(1, 1, per))
            for per in ("session", "key", "identity", "client", "global")
        ]
        p = policy(*rules)
        full = Caller(keyId="k", principal="p", client="10.0.0.1", session="s")
        bare = Caller(client="10.0.0.2")
        keyed = Caller(keyId="k", principal="k", client="10.0.0.3")
        expected = {
            "session": ("session:s", "addr:10.0.0.2", "key:k"),
            "key": ("key:k", "addr:10.0.0.2", "key:k"),
            "identity": ("id:p", "addr:10.0.0.2", "id:k"),
            "client": ("addr:10.0.0.1", "addr:10.0.0.2", "addr:10.0.0.3"),
            "global": ("global", "global", "global"),
        }
        for per, keys in expected.items():
            self.assertEqual(tuple(p.bucketKey(per, c) for c in (full, bare, keyed)), keys, per)

    def test_perKeyAcrossSessions(self) -> None:
        """per: key shares one bucket between the sessions of a key, not between keys."""
        p = policy(rule("budget", "rate_limit", "glob", "*", rate=(1, 2, "key")))
        take = p.verdict
        a1 = Caller(keyId="a", session="1")
        a2 = Caller(keyId="a", session="2")
        self.assertIsNone(take([call("tools/call", "x")], a1, 0.0).refusal)
        self.assertIsNone(take([call("tools/call", "y")], a2, 0.0).refusal)
        self.assertIsNotNone(take([call("tools/call", "x")], a1, 0.0).refusal)
        self.assertIsNone(take([call("tools/call", "x")], Caller(keyId="b"), 0.0).refusal)

    def test_globalBucket(self) -> None:
        """per: global is one bucket for every caller."""
        p = policy(rule("all", "rate_limit", "glob", "*", rate=(1, 1, "global")))
        self.assertIsNone(p.verdict([call("tools/call", "x")], CI, 0.0).refusal)
        self.assertIsNotNone(p.verdict([call("tools/call", "x")], FINANCE, 0.0).refusal)

    def test_carryOverNeedsSamePer(self) -> None:
        """Buckets carry over to a new generation only when per is unchanged too."""
        same = rule("rl", "rate_limit", "glob", "*", rate=(1, 1, "key"))
        old = policy(same)
        self.assertIsNone(old.verdict([call("tools/call", "x")], CI, 0.0).refusal)
        kept = Policy.fromConfig(PolicyConfig(rules=(same,)), old)
        self.assertEqual(kept.bucketCount("rl"), 1)
        changed = rule("rl", "rate_limit", "glob", "*", rate=(1, 1, "client"))
        fresh = Policy.fromConfig(PolicyConfig(rules=(changed,)), old)
        self.assertEqual(fresh.bucketCount("rl"), 0)


class CacheTests(SynchronousTestCase):
    """The decision cache with callers and arguments in play."""

    def test_sameAnswersAsUncached(self) -> None:
        """A small, often-cleared cache answers like no cache for every caller and arguments."""
        cached = policy(*DESIGN2, default="deny", cacheSize=8)
        uncached = policy(*DESIGN2, default="deny", cacheSize=0)
        callers = [ANONYMOUS, CI, DEPLOY, FINANCE, OUTSIDER]
        targets = ["read_file", "payments_x", "execute_sql", "other"]
        argsList: list[object] = [None, {"query": "drop x"}, {"query": "select"}]
        for _ in range(2):
            for caller in callers:
                for target in targets:
                    for arguments in argsList:
                        self.assertEqual(
                            cached.decide("tools/call", target, caller, arguments),
                            uncached.decide("tools/call", target, caller, arguments),
                        )
                        self.assertLessEqual(len(cached._cache), 8)
        self.assertEqual(uncached._cache, {})

    def test_keyedByRelevantCallerParts(self) -> None:
        """Sessions do not multiply cache entries; only the parts rules look at key them."""
        p = policy(rule("ci", "allow", "exact", "t", keys=("ci-*",)), default="deny")
        for i in range(50):
            p.decide(
                "tools/call", "t", Caller(keyId="ci-bot", client=f"10.0.0.{i}", session=str(i))
            )
        self.assertEqual(len(p._cache), 1)

    def test_newCallerDoesNotRescan(self) -> None:
        """A target already matched is not matched against the rules again for a new caller."""
        p = policy(*DESIGN2, default="deny")
        scans: list[str] = []
        real = p._match

        def counting(method: str, target: str) -> list[Any]:
            scans.append(target)
            return real(method, target)

        p._match = counting  # type: ignore[method-assign]
        for i in range(20):
            caller = Caller(keyId=f"k{i}", principal=f"k{i}", client=f"10.0.0.{i}")
            p.decide("tools/call", "payments_x", caller)
            p.allows("tools/call", "read_file", caller)
        self.assertEqual(scans, ["payments_x", "read_file"])

    def test_argumentPlanCachedNotTheDecision(self) -> None:
        """With argument conditions the cached entry still decides by each call's arguments."""
        p = policy(*DESIGN2)
        bad = {"query": "drop table t"}
        good = {"query": "select 1"}
        for _ in range(3):
            self.assertEqual(
                p.decide("tools/call", "execute_sql", CI, bad).rule_id, "no-sql-writes"
            )
            self.assertEqual(
                p.decide("tools/call", "execute_sql", CI, good).rule_id, "per-key-budget"
            )

    def test_withoutArguments(self) -> None:
        """decideWithoutArguments says when an argument condition would need the arguments."""
        p = policy(*DESIGN2)
        self.assertIsNone(p.decideWithoutArguments("tools/call", "execute_sql", CI))
        d = p.decideWithoutArguments("tools/call", "read_file", CI)
        self.assertEqual(d and d.rule_id, "ci-reads")


class ExplainTests(SynchronousTestCase):
    """C{explain} with callers and arguments: why each earlier rule did not match."""

    def setUp(self) -> None:
        self.policy = policy(*DESIGN2, defaults={"tools/call": "deny", "resources/read": "deny"})

    def test_reasons(self) -> None:
        """Each checked rule says why: method, target, keys, identities, clients, arguments."""
        e = self.policy.explain(
            "tools/call", "payments_send", Caller(keyId="intern", principal="intern")
        )
        self.assertEqual(e.decision.rule_id, "no-payments")
        self.assertEqual(
            e.reasons,
            (
                "'payments_send' does not match",
                "when.identities: principal 'intern' matches none of "
                "[spiffe://corp.example/finance/*]",
            ),
        )
        e = self.policy.explain("tools/call", "read_file", Caller(client="10.0.0.1"))
        self.assertEqual(e.reasons[0], "when.keys: no API key")
        e = self.policy.explain(
            "tools/call",
            "payments_x",
            Caller(principal="spiffe://corp.example/finance/a", client="192.0.2.1"),
        )
        self.assertEqual(e.reasons[1], "when.clients: 192.0.2.1 is in none of [10.20.0.0/16]")
        e = self.policy.explain("tools/call", "execute_sql", CI, {"query": "select"})
        self.assertEqual(
            e.reasons[3],
            "when.arguments.query: 'select' does not match regex "
            r"'(?i)^\s*(insert|update|delete|drop|alter|truncate)\b'",
        )
        e = self.policy.explain("tools/call", "execute_sql", CI)
        self.assertEqual(e.reasons[3], "when.arguments.query: not given")
        e = self.policy.explain("tools/call", "execute_sql", CI, {})
        self.assertEqual(e.reasons[3], "when.arguments.query: absent, null, an object or an array")
        e = self.policy.explain("resources/read", "file:///etc/x")
        self.assertEqual(e.reasons[0], "applies to tools/call")
        self.assertTrue(e.default_used)
        self.assertEqual(e.decision, Decision("deny", None, None))

    def test_render(self) -> None:
        """The rendering names the caller, the deciding rule's conditions and each reason."""
        text = self.policy.explain("tools/call", "read_file", CI).render()
        self.assertEqual(
            text,
            "tool: read_file\n"
            "method: tools/call\n"
            "caller: key ci-bot, principal ci-bot, client 10.1.2.3\n"
            "decision: allow (rule ci-reads, action allow)\n"
            "matched: list [read_file, list_dir], when keys [ci-bot, deploy-*]\n"
            "checked before: (none)",
        )
        text = self.policy.explain("resources/read", "file:///srv/docs/a").render()
        self.assertIn("resource: file:///srv/docs/a\n", text)
        self.assertIn("  ci-reads (list [read_file, list_dir]): applies to tools/call\n", text)

    def test_agreesWithDecide(self) -> None:
        """explain decides like decide for every caller and arguments."""
        callers = [ANONYMOUS, CI, DEPLOY, FINANCE, OUTSIDER]
        for caller in callers:
            for target in ("read_file", "payments_x", "execute_sql", "zzz"):
                for arguments in (None, {"query": "drop"}, {"query": "x"}):
                    self.assertEqual(
                        self.policy.explain("tools/call", target, caller, arguments).decision,
                        self.policy.decide("tools/call", target, caller, arguments),
                    )


class WarningTests(SynchronousTestCase):
    """Warnings of C{config check}: conditional rules shadowed, keys that name no key."""

    def test_shadowedByUnconditional(self) -> None:
        """A conditional rule after an unconditional one catching its targets never matches."""
        config = PolicyConfig(
            rules=(
                rule("no-admin", "deny", "prefix", "admin_"),
                rule("ci-admin", "allow", "exact", "admin_read", keys=("ci-bot",)),
            )
        )
        self.assertEqual(
            shadowedRules(config),
            [
                (
                    1,
                    "rule 'ci-admin' can never match: 'admin_read' is already matched by rule "
                    "'no-admin' (prefix 'admin_')",
                )
            ],
        )

    def test_shadowedUnderWiderConditions(self) -> None:
        """An earlier rule whose conditions every call of the later one meets shadows it."""
        config = PolicyConfig(
            rules=(
                rule("ci", "allow", "prefix", "x_", keys=("ci-*",), clients=("10.0.0.0/8",)),
                rule("ci-bot", "deny", "exact", "x_1", keys=("ci-bot",), clients=("10.1.0.0/16",)),
                rule("same", "deny", "glob", "x_[ab]", keys=("ci-*",), clients=("10.0.0.0/8",)),
            )
        )
        warnings = shadowedRules(config)
        self.assertEqual([i for i, _ in warnings], [1, 2])
        self.assertIn(
            "'x_1' is already matched by rule 'ci' (prefix 'x_') when keys [ci-*], "
            "clients [10.0.0.0/8]",
            warnings[0][1],
        )

    def test_notShadowed(self) -> None:
        """Narrower earlier conditions, other methods and other keys shadow nothing."""
        args = (("q", MatchSpec("exact", "x")),)
        config = PolicyConfig(
            rules=(
                rule("a", "deny", "prefix", "x_", keys=("ci-bot",)),
                rule("b", "allow", "exact", "x_1", keys=("ci-*",)),
                rule("c", "allow", "exact", "x_1"),
                rule("d", "deny", "prefix", "y_", arguments=args),
                rule("e", "deny", "exact", "y_1"),
                rule("f", "deny", "prefix", "z_", clients=("10.1.0.0/16",)),
                rule("g", "deny", "exact", "z_1", clients=("10.0.0.0/8",)),
                rule("h", "deny", "prefix", "w_", method="prompts/get"),
                rule("i", "deny", "exact", "w_1"),
                rule("j", "deny", "prefix", "v_", identities=("a",)),
                rule("k", "deny", "exact", "v_1", keys=("a",)),
            )
        )
        self.assertEqual(shadowedRules(config), [])

    def test_unknownKeys(self) -> None:
        """when.keys entries matching no configured key id are reported, globs included."""
        config = PolicyConfig(
            rules=(
                rule("a", "allow", "exact", "t", keys=("ci-bot", "deploy-*", "ci-bto")),
                rule("b", "allow", "exact", "u", keys=("ops-*", "zzz")),
                rule("c", "allow", "exact", "v"),
            )
        )
        self.assertEqual(
            unknownKeys(config, ["ci-bot", "deploy-eu", "ops"]),
            [
                (0, 2, "'ci-bto' names no configured key; did you mean 'ci-bot'?"),
                (1, 0, "'ops-*' names no configured key; did you mean 'ops'?"),
                (1, 1, "'zzz' names no configured key (ci-bot, deploy-eu, ops)"),
            ],
        )
        self.assertEqual(
            unknownKeys(config, []),
            [
                (0, 0, "'ci-bot' can never match: no API keys are configured (auth.keys)"),
                (0, 1, "'deploy-*' can never match: no API keys are configured (auth.keys)"),
                (0, 2, "'ci-bto' can never match: no API keys are configured (auth.keys)"),
                (1, 0, "'ops-*' can never match: no API keys are configured (auth.keys)"),
                (1, 1, "'zzz' can never match: no API keys are configured (auth.keys)"),
            ],
        )
