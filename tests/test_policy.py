"""
Tests for L{mcpgw.policy}: matchers, first-match order, the default action, the decision cache,
C{explain}, redaction, token buckets (expiry, bounds, carry-over) and shadowed-rule warnings.
"""

from __future__ import annotations

import copy

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mcpgw.config import MatchSpec, PolicyConfig, PolicyRule, RateLimitSpec
from mcpgw.policy import REDACTED, Decision, Explanation, IPolicy, Policy, shadowedRules

# Realistic sample credentials (documentation examples and made-up values of the real shapes).
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
OPENAI_KEY = "sk-proj-4fQ9xT2mLr8VbN0cZk7WyHs3_Jd6PuEaGt1iOqRn-5vXbC2lMy9"
OPENAI_LEGACY_KEY = "sk-T3BlbkFJ7q2xVn8RkPzL0mWc4Ys9HdEa6GbUoJi1t"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
AWS_TEMP_KEY = "ASIAY34FZKBOKMUTVV7A"
GITHUB_TOKEN = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"


def rule(
    rule_id: str,
    action: str,
    kind: str,
    value: str | tuple[str, ...],
    redact: tuple[str, ...] = (),
    rate: tuple[float, float] | None = None,
) -> PolicyRule:
    """A L{PolicyRule}; C{rate} is C{(rate, burst)}."""
    spec = RateLimitSpec(*rate) if rate else None
    return PolicyRule(rule_id, action, MatchSpec(kind, value), redact, spec)


def policy(
    *rules: PolicyRule, default: str = "allow", cacheSize: int = 4096, maxBuckets: int = 10**6
) -> Policy:
    """A L{Policy} of C{rules}."""
    config = PolicyConfig(default, True, rules)
    return Policy(config, cacheSize=cacheSize, maxBuckets=maxBuckets)


#: The policy of DESIGN.md.
DESIGN_RULES = (
    rule("no-shell", "deny", "exact", "shell_exec"),
    rule("no-admin", "deny", "prefix", "admin_"),
    rule(
        "scrub-http",
        "redact",
        "glob",
        "http_*",
        redact=("bearer", "openai_key", "aws_access_key", "jwt", r"(?i)password=\S+"),
    ),
    rule("slow-search", "rate_limit", "regex", "^search(_.*)?$", rate=(0.5, 2)),
    rule("read-only", "allow", "list", ("read_file", "list_dir")),
)


class MatcherTests(SynchronousTestCase):
    """Each matcher kind, and the decisions of the DESIGN.md example."""

    def setUp(self) -> None:
        self.policy = policy(*DESIGN_RULES)

    def test_exact(self) -> None:
        """An exact rule decides for exactly its name."""
        self.assertEqual(
            self.policy.decide("shell_exec"), Decision("deny", "no-shell", "exact 'shell_exec'")
        )
        self.assertEqual(self.policy.decide("shell_exec2"), Decision("allow", None, None))
        self.assertEqual(self.policy.decide("shell_exe"), Decision("allow", None, None))

    def test_prefix(self) -> None:
        """A prefix rule decides for every name starting with its value, including the value."""
        expected = Decision("deny", "no-admin", "prefix 'admin_'")
        self.assertEqual(self.policy.decide("admin_"), expected)
        self.assertEqual(self.policy.decide("admin_delete_user"), expected)
        self.assertEqual(self.policy.decide("admin"), Decision("allow", None, None))
        self.assertEqual(self.policy.decide("xadmin_y"), Decision("allow", None, None))

    def test_glob(self) -> None:
        """A glob rule decides by fnmatch semantics."""
        expected = Decision("redact", "scrub-http", "glob 'http_*'")
        self.assertEqual(self.policy.decide("http_get"), expected)
        self.assertEqual(self.policy.decide("http_"), expected)
        self.assertEqual(self.policy.decide("https_get"), Decision("allow", None, None))

    def test_regex(self) -> None:
        """A regex rule decides for names it matches."""
        expected = Decision("rate_limit", "slow-search", "regex '^search(_.*)?$'")
        self.assertEqual(self.policy.decide("search"), expected)
        self.assertEqual(self.policy.decide("search_web"), expected)
        self.assertEqual(self.policy.decide("searchweb"), Decision("allow", None, None))
        self.assertEqual(self.policy.decide("research"), Decision("allow", None, None))

    def test_list(self) -> None:
        """A list rule decides for each of its names and nothing else."""
        expected = Decision("allow", "read-only", "list [read_file, list_dir]")
        self.assertEqual(self.policy.decide("read_file"), expected)
        self.assertEqual(self.policy.decide("list_dir"), expected)
        self.assertEqual(self.policy.decide("read_files"), Decision("allow", None, None))

    def test_globSemantics(self) -> None:
        """Globs are case-sensitive and support C{?}, C{[seq]}, C{[!seq]} and inner C{*}."""
        p = policy(
            rule("q", "deny", "glob", "get_?"),
            rule("seq", "deny", "glob", "put_[ab]"),
            rule("neg", "deny", "glob", "del_[!x]"),
            rule("inner", "deny", "glob", "a*_b*_c"),
            rule("literal", "deny", "glob", "plain"),
        )
        denied = ["get_x", "put_a", "put_b", "del_y", "a_b_c", "aXX_bYY_c", "plain"]
        allowed = ["get_", "get_xy", "put_c", "del_x", "a_b_cd", "A_b_c", "plainx", "GET_x"]
        self.assertEqual([p.decide(name).action for name in denied], ["deny"] * len(denied))
        self.assertEqual([p.decide(name).action for name in allowed], ["allow"] * len(allowed))

    def test_regexSearches(self) -> None:
        """A regex matches anywhere in the name unless anchored, and is case-sensitive."""
        p = policy(rule("exec", "deny", "regex", "exec"), rule("ci", "deny", "regex", "(?i)^drop"))
        self.assertEqual(p.decide("shell_exec_v2").rule_id, "exec")
        self.assertEqual(p.decide("EXEC").rule_id, None)
        self.assertEqual(p.decide("DROP_table").rule_id, "ci")
        self.assertEqual(p.decide("table_drop").rule_id, None)


class OrderTests(SynchronousTestCase):
    """First match wins, whatever the matcher kinds involved."""

    def test_firstMatchWins(self) -> None:
        """Of two rules matching a name, the earlier decides."""
        deny = rule("deny-it", "deny", "exact", "tool")
        allow = rule("allow-it", "allow", "exact", "tool")
        self.assertEqual(policy(deny, allow).decide("tool").rule_id, "deny-it")
        self.assertEqual(policy(allow, deny).decide("tool").rule_id, "allow-it")

    def test_patternBeforeExact(self) -> None:
        """An earlier regex, glob or prefix rule beats a later exact or list rule."""
        later = rule("exact", "allow", "exact", "admin_x")
        listed = rule("listed", "allow", "list", ("b", "admin_x"))
        for earlier in [
            rule("r", "deny", "regex", "x$"),
            rule("g", "deny", "glob", "*_x"),
            rule("p", "deny", "prefix", "admin"),
        ]:
            self.assertEqual(policy(earlier, later).decide("admin_x").rule_id, earlier.id)
            self.assertEqual(policy(earlier, listed).decide("admin_x").rule_id, earlier.id)
            self.assertEqual(policy(later, earlier).decide("admin_x").rule_id, "exact")

    def test_prefixOrder(self) -> None:
        """Of two matching prefixes the earlier rule decides, not the longer prefix."""
        short = rule("short", "deny", "prefix", "a")
        long = rule("long", "allow", "prefix", "ab")
        self.assertEqual(policy(short, long).decide("abc").rule_id, "short")
        self.assertEqual(policy(long, short).decide("abc").rule_id, "long")
        self.assertEqual(policy(long, short).decide("ax").rule_id, "short")

    def test_globAndRegexOrder(self) -> None:
        """Scanned rules are tried in order, and a later exact rule does not hide them."""
        p = policy(
            rule("g", "deny", "glob", "*_[0-9]"),
            rule("r", "redact", "regex", "_[0-9]$", redact=("jwt",)),
            rule("e", "allow", "exact", "tool_1"),
        )
        self.assertEqual(p.decide("tool_1").rule_id, "g")
        self.assertEqual(p.decide("x_1").rule_id, "g")
        self.assertEqual(p.decide("x_12").rule_id, None)

    def test_defaultAllow(self) -> None:
        """Without a matching rule the default action C{allow} decides."""
        p = policy(rule("no-shell", "deny", "exact", "shell_exec"))
        self.assertEqual(p.decide("read_file"), Decision("allow", None, None))
        self.assertTrue(p.allows("read_file"))

    def test_defaultDeny(self) -> None:
        """With C{default_action: deny} only the tools a rule allows pass."""
        p = policy(rule("read-only", "allow", "list", ("read_file", "list_dir")), default="deny")
        self.assertEqual(p.decide("write_file"), Decision("deny", None, None))
        self.assertEqual(p.decide("read_file").action, "allow")
        self.assertFalse(p.allows("write_file"))
        self.assertTrue(p.allows("list_dir"))

    def test_noRules(self) -> None:
        """A policy without rules gives every tool the default action."""
        self.assertEqual(policy(default="deny").decide("x"), Decision("deny", None, None))
        self.assertEqual(policy().decide(""), Decision("allow", None, None))

    def test_allows(self) -> None:
        """Only denied tools are hidden: redacted and rate-limited tools stay listed."""
        p = policy(*DESIGN_RULES)
        names = ["shell_exec", "admin_x", "http_get", "search", "read_file", "other"]
        self.assertEqual([p.allows(n) for n in names], [False, False, True, True, True, True])

    def test_attributes(self) -> None:
        """A policy provides L{IPolicy} and exposes its rule ids and settings."""
        p = Policy.fromConfig(PolicyConfig("deny", False, DESIGN_RULES))
        self.assertTrue(verifyObject(IPolicy, p))
        self.assertEqual(
            p.ruleIds, ("no-shell", "no-admin", "scrub-http", "slow-search", "read-only")
        )
        self.assertEqual(p.defaultAction, "deny")
        self.assertFalse(p.filterToolsList)


class CacheTests(SynchronousTestCase):
    """The per-name decision cache."""

    def test_sameAnswers(self) -> None:
        """A small cache that is cleared many times answers like no cache at all."""
        rules = [*DESIGN_RULES, rule("many", "deny", "regex", "7$")]
        cached = policy(*rules, cacheSize=16)
        uncached = policy(*rules, cacheSize=0)
        names = [
            f"{stem}{i}" for i in range(200) for stem in ("admin_", "http_", "search_", "x", "")
        ]
        for _ in range(2):
            for name in names:
                self.assertEqual(cached.decide(name), uncached.decide(name))
                self.assertLessEqual(len(cached._cache), 16)
        self.assertEqual(uncached._cache, {})

    def test_defaultBound(self) -> None:
        """The default cache holds at most 4096 names."""
        p = Policy.fromConfig(PolicyConfig(rules=DESIGN_RULES))
        sizes = set()
        for i in range(10000):
            p.decide(f"tool_{i}")
            sizes.add(len(p._cache))
        self.assertEqual(max(sizes), 4096)

    def test_manyRules(self) -> None:
        """With 1,000 rules of every kind each name gets the first matching rule."""
        rules = []
        for i in range(200):
            rules += [
                rule(f"e{i}", "deny", "exact", f"exact_{i}"),
                rule(f"p{i}", "deny", "prefix", f"pre_{i}_"),
                rule(f"g{i}", "deny", "glob", f"glob_{i}_[ab]"),
                rule(f"r{i}", "deny", "regex", f"^re_{i}$"),
                rule(f"l{i}", "allow", "list", (f"list_{i}", "exact_0")),
            ]
        p = policy(*rules)
        self.assertEqual(
            [p.decide(n).rule_id for n in ("exact_199", "pre_7_x", "glob_150_b", "re_42")],
            ["e199", "p7", "g150", "r42"],
        )
        self.assertEqual(p.decide("list_199").rule_id, "l199")
        self.assertEqual(p.decide("exact_0").rule_id, "e0")
        self.assertEqual(p.decide("glob_150_c").rule_id, None)


class ExplainTests(SynchronousTestCase):
    """C{explain} and its rendering for C{mcpgw policy explain}."""

    def setUp(self) -> None:
        self.policy = policy(*DESIGN_RULES)

    def test_firstRule(self) -> None:
        """The first rule deciding has nothing checked before it."""
        explanation = self.policy.explain("shell_exec")
        self.assertEqual(
            explanation,
            Explanation(
                "shell_exec", Decision("deny", "no-shell", "exact 'shell_exec'"), (), False
            ),
        )
        self.assertEqual(
            explanation.render(),
            "tool: shell_exec\n"
            "method: tools/call\n"
            "caller: anonymous\n"
            "decision: deny (rule no-shell, action deny)\n"
            "matched: exact 'shell_exec'\n"
            "checked before: (none)",
        )

    def test_laterRule(self) -> None:
        """A later rule lists the earlier rules with their matchers."""
        explanation = self.policy.explain("search_web")
        self.assertEqual(
            explanation.checked,
            (
                ("no-shell", "exact 'shell_exec'"),
                ("no-admin", "prefix 'admin_'"),
                ("scrub-http", "glob 'http_*'"),
            ),
        )
        self.assertEqual(
            explanation.render(),
            "tool: search_web\n"
            "method: tools/call\n"
            "caller: anonymous\n"
            "decision: rate_limit (rule slow-search, action rate_limit)\n"
            "matched: regex '^search(_.*)?$'\n"
            "checked before:\n"
            "  no-shell (exact 'shell_exec'): 'search_web' does not match\n"
            "  no-admin (prefix 'admin_'): 'search_web' does not match\n"
            "  scrub-http (glob 'http_*'): 'search_web' does not match",
        )

    def test_default(self) -> None:
        """When no rule matches every rule was checked and the default decides."""
        explanation = self.policy.explain("write_file")
        self.assertTrue(explanation.default_used)
        self.assertEqual(explanation.decision, Decision("allow", None, None))
        self.assertEqual(len(explanation.checked), 5)
        self.assertEqual(
            explanation.render().splitlines()[3:6],
            [
                "decision: allow (default_action; no rule matched)",
                "matched: (no rule)",
                "checked before:",
            ],
        )
        self.assertEqual(
            explanation.render().splitlines()[-1],
            "  read-only (list [read_file, list_dir]): 'write_file' does not match",
        )


class RedactTests(SynchronousTestCase):
    """C{redact}: built-in and custom patterns in nested JSON values."""

    def redact(self, entries: tuple[str, ...], arguments: object) -> tuple[object, int]:
        """Redact C{arguments} by a rule of C{entries}."""
        p = policy(rule("scrub", "redact", "glob", "*", redact=entries))
        return p.redact("scrub", arguments)

    def test_bearer(self) -> None:
        """C{bearer} replaces the whole C{Bearer <token>}, whatever its case."""
        self.assertEqual(
            self.redact(
                ("bearer",),
                [
                    f"Authorization: Bearer {GITHUB_TOKEN}",
                    "authorization: bearer abc.DEF-ghi_jkl~mno+pqr/stu==; next",
                    "BEARER x",
                    "the bearer of bad news",
                ],
            ),
            (
                [
                    f"Authorization: {REDACTED}",
                    f"authorization: {REDACTED}; next",
                    REDACTED,
                    f"the {REDACTED} bad news",  # case-insensitive: a false positive, by design
                ],
                4,
            ),
        )

    def test_openaiKey(self) -> None:
        """C{openai_key} replaces C{sk-} keys with at least 20 characters after C{sk-}."""
        self.assertEqual(
            self.redact(
                ("openai_key",),
                [
                    f"key={OPENAI_KEY}",
                    f"{OPENAI_LEGACY_KEY} and {OPENAI_KEY}",
                    "sk-short",
                    "sk-1234567890123456789",
                    "task-runner-configuration-service",
                ],
            ),
            (
                [
                    f"key={REDACTED}",
                    f"{REDACTED} and {REDACTED}",
                    "sk-short",
                    "sk-1234567890123456789",
                    "task-runner-configuration-service",
                ],
                2,
            ),
        )

    def test_awsAccessKey(self) -> None:
        """C{aws_access_key} replaces C{AKIA} and C{ASIA} key ids of the right length."""
        self.assertEqual(
            self.redact(
                ("aws_access_key",),
                [
                    f"aws_access_key_id = {AWS_KEY}",
                    f"{AWS_TEMP_KEY}",
                    "AKIAIOSFODNN7EXAMPLE1",
                    "akiaiosfodnn7example",
                ],
            ),
            (
                [
                    f"aws_access_key_id = {REDACTED}",
                    REDACTED,
                    "AKIAIOSFODNN7EXAMPLE1",
                    "akiaiosfodnn7example",
                ],
                2,
            ),
        )

    def test_jwt(self) -> None:
        """C{jwt} replaces three base64url segments whose first starts with C{eyJ}."""
        self.assertEqual(
            self.redact(
                ("jwt",),
                [f"token={JWT}&x=1", "eyJhbGciOiJIUzI1NiJ9 alone", "version 1.2.3"],
            ),
            ([f"token={REDACTED}&x=1", "eyJhbGciOiJIUzI1NiJ9 alone", "version 1.2.3"], 1),
        )

    def test_customRegex(self) -> None:
        """Any other entry is a regular expression."""
        self.assertEqual(
            self.redact(
                (r"(?i)password=\S+", r"\b\d{3}-\d{2}-\d{4}\b"), "PASSWORD=hunter2 ssn 078-05-1120"
            ),
            (f"{REDACTED} ssn {REDACTED}", 1),
        )

    def test_nested(self) -> None:
        """Strings nested in mappings and lists are redacted, keys too; numbers and the rest not."""
        arguments = {
            "url": "https://api.example.com",
            "headers": {"Authorization": f"Bearer {JWT}", f"Bearer {GITHUB_TOKEN}": 1},
            "body": [{"key": OPENAI_KEY, "n": 3, "ok": True}, [AWS_KEY, None, 1.5], "plain"],
            "count": 7,
        }
        original = copy.deepcopy(arguments)
        redacted, changed = self.redact(
            ("bearer", "openai_key", "aws_access_key", "jwt"), arguments
        )
        self.assertEqual(
            redacted,
            {
                "url": "https://api.example.com",
                "headers": {"Authorization": REDACTED, REDACTED: 1},
                "body": [{"key": REDACTED, "n": 3, "ok": True}, [REDACTED, None, 1.5], "plain"],
                "count": 7,
            },
        )
        self.assertEqual(changed, 4)
        self.assertEqual(arguments, original)
        self.assertIsNot(redacted["body"], arguments["body"])  # type: ignore[index]

    def test_nonStrings(self) -> None:
        """Values without strings come back equal with nothing counted."""
        values: list[object] = [None, 3, 2.5, True, [], {}, [1, [2, {"a": None}]]]
        for value in values:
            self.assertEqual(self.redact(("jwt",), value), (value, 0))

    def test_notRedactRule(self) -> None:
        """Redacting by a rule that is not a redact rule is a programming error."""
        p = policy(*DESIGN_RULES)
        self.assertRaises(KeyError, p.redact, "no-shell", {})
        self.assertRaises(KeyError, p.redact, "missing", {})


class RateLimitTests(SynchronousTestCase):
    """C{rateLimit}: token buckets per (rule, session), their expiry, bounds and carry-over."""

    def test_fractionalRate(self) -> None:
        """At 0.5 tokens a second with a burst of 2: two at once, then one every 2 seconds."""
        p = policy(*DESIGN_RULES)
        take = p.rateLimit
        self.assertEqual([take("slow-search", "s", 0.0) for _ in range(3)], [None, None, 2.0])
        self.assertEqual(take("slow-search", "s", 1.0), 1.0)
        self.assertIsNone(take("slow-search", "s", 2.0))
        self.assertEqual(take("slow-search", "s", 2.0), 2.0)
        self.assertEqual(take("slow-search", "s", 3.5), 0.5)
        self.assertIsNone(take("slow-search", "s", 4.0))

    def test_burstCap(self) -> None:
        """A long idle bucket holds at most C{burst} tokens."""
        p = policy(rule("rl", "rate_limit", "prefix", "x", rate=(0.25, 3)))
        self.assertEqual([p.rateLimit("rl", "s", 0.0) for _ in range(4)], [None] * 3 + [4.0])
        self.assertEqual(p.rateLimit("rl", "s", 3.0), 1.0)
        self.assertEqual([p.rateLimit("rl", "s", 4.0) for _ in range(2)], [None, 4.0])
        self.assertEqual([p.rateLimit("rl", "s", 1000.0) for _ in range(4)], [None] * 3 + [4.0])

    def test_sessionsSeparate(self) -> None:
        """Each session, and each rule, has its own bucket."""
        p = policy(
            rule("a", "rate_limit", "exact", "x", rate=(1, 1)),
            rule("b", "rate_limit", "exact", "y", rate=(1, 1)),
        )
        self.assertEqual(
            [p.rateLimit(r, s, 0.0) for r, s in [("a", "1"), ("a", "2"), ("b", "1"), ("a", "1")]],
            [None, None, None, 1.0],
        )
        self.assertEqual((p.bucketCount("a"), p.bucketCount("b")), (2, 1))

    def test_idleBucketsExpire(self) -> None:
        """A bucket idle for C{burst / rate} seconds is dropped, and behaves like a new one."""
        p = policy(*DESIGN_RULES)  # rate 0.5, burst 2: full again after 4 s
        for session, now in [("a", 0.0), ("b", 0.5), ("c", 3.0)]:
            p.rateLimit("slow-search", session, now)
            p.rateLimit("slow-search", session, now)
        self.assertEqual(p.bucketCount("slow-search"), 3)
        self.assertIsNone(p.rateLimit("slow-search", "d", 4.0))
        self.assertEqual(p.bucketCount("slow-search"), 3)  # a dropped, d added
        self.assertIsNone(p.rateLimit("slow-search", "d", 6.9))
        self.assertEqual(p.bucketCount("slow-search"), 2)  # b dropped
        self.assertEqual(
            [p.rateLimit("slow-search", "a", 7.0) for _ in range(3)], [None, None, 2.0]
        )
        self.assertEqual(p.bucketCount("slow-search"), 2)  # c dropped, a added

    def test_boundedBySessionRate(self) -> None:
        """100,000 sessions arriving over time keep only the buckets of the last idle period."""
        p = policy(rule("rl", "rate_limit", "exact", "x", rate=(16, 16)))  # idle after 1 s
        counts = set()
        for i in range(100_000):
            self.assertIsNone(p.rateLimit("rl", f"session-{i}", i / 1024))
            counts.add(p.bucketCount("rl"))
        self.assertEqual(max(counts), 1024)
        self.assertEqual(p.bucketCount("rl"), 1024)

    def test_hardCap(self) -> None:
        """At most C{maxBuckets} buckets are kept; the least recently used go first."""
        p = policy(rule("rl", "rate_limit", "exact", "x", rate=(1, 1)), maxBuckets=1000)
        p.rateLimit("rl", "first", 0.0)
        for i in range(100_000):
            p.rateLimit("rl", f"session-{i}", 0.0)
            if i % 500 == 0:
                p.rateLimit("rl", "first", 0.0)  # recently used: kept
        self.assertEqual(p.bucketCount("rl"), 1000)
        self.assertEqual(p.rateLimit("rl", "session-99999", 0.0), 1.0)
        self.assertEqual(p.rateLimit("rl", "first", 0.0), 1.0)
        self.assertIsNone(p.rateLimit("rl", "session-0", 0.0))

    def test_notRateLimitRule(self) -> None:
        """Rate limiting by a rule that is not a rate_limit rule is a programming error."""
        p = policy(*DESIGN_RULES)
        self.assertRaises(KeyError, p.rateLimit, "no-shell", "s", 0.0)
        self.assertRaises(KeyError, p.bucketCount, "missing")

    def exhausted(self, *rules: PolicyRule) -> Policy:
        """A policy of C{rules} whose rate-limit rules' buckets for session C{s} are empty."""
        p = policy(*rules)
        for r in rules:
            if r.rate_limit is not None:
                for _ in range(int(r.rate_limit.burst)):
                    self.assertIsNone(p.rateLimit(r.id, "s", 0.0))
        return p

    def test_carryOver(self) -> None:
        """Buckets of a rule with the same id, match and settings carry over to a new policy."""
        limited = rule("rl", "rate_limit", "prefix", "x", rate=(0.5, 2))
        old = self.exhausted(limited)
        new = Policy.fromConfig(
            PolicyConfig("deny", True, (rule("first", "deny", "exact", "y"), limited)), old
        )
        self.assertEqual(new.rateLimit("rl", "s", 0.0), 2.0)
        self.assertEqual(new.bucketCount("rl"), 1)
        self.assertEqual(old.rateLimit("rl", "s", 1.0), 1.0)  # shared with the old generation
        self.assertIsNone(new.rateLimit("rl", "s", 2.0))
        self.assertEqual(old.rateLimit("rl", "s", 2.0), 2.0)

    def test_resetWhenChanged(self) -> None:
        """A changed rate, burst, match or id starts with fresh buckets."""
        limited = rule("rl", "rate_limit", "prefix", "x", rate=(0.5, 2))
        for changed in [
            rule("rl", "rate_limit", "prefix", "x", rate=(1, 2)),
            rule("rl", "rate_limit", "prefix", "x", rate=(0.5, 3)),
            rule("rl", "rate_limit", "prefix", "xy", rate=(0.5, 2)),
            rule("rl2", "rate_limit", "prefix", "x", rate=(0.5, 2)),
        ]:
            old = self.exhausted(limited)
            new = Policy.fromConfig(PolicyConfig(rules=(changed,)), old)
            self.assertEqual(new.bucketCount(changed.id), 0)
            self.assertIsNone(new.rateLimit(changed.id, "s", 0.0))
            self.assertEqual(old.bucketCount("rl"), 1)

    def test_noPrevious(self) -> None:
        """A first policy, or a previous one without the rule, starts with empty buckets."""
        limited = rule("rl", "rate_limit", "prefix", "x", rate=(0.5, 2))
        first = Policy.fromConfig(PolicyConfig(rules=(limited,)))
        self.assertEqual(first.bucketCount("rl"), 0)
        other = self.exhausted(rule("deny", "deny", "prefix", "x"))
        self.assertEqual(
            Policy.fromConfig(PolicyConfig(rules=(limited,)), other).bucketCount("rl"), 0
        )


class ShadowedRulesTests(SynchronousTestCase):
    """C{shadowedRules}: warnings for rules that can never decide."""

    def shadowed(self, *rules: PolicyRule) -> list[tuple[int, str]]:
        """The warnings for a policy of C{rules}."""
        return shadowedRules(PolicyConfig(rules=rules))

    def test_exactByPrefix(self) -> None:
        """An exact name starting with an earlier prefix can never match."""
        self.assertEqual(
            self.shadowed(
                rule("no-admin", "deny", "prefix", "admin_"),
                rule("read-admin", "allow", "exact", "admin_read"),
            ),
            [
                (
                    1,
                    "rule 'read-admin' can never match: 'admin_read' is already matched by "
                    "rule 'no-admin' (prefix 'admin_')",
                )
            ],
        )

    def test_exactByEveryKind(self) -> None:
        """An exact name caught by an earlier exact, list, glob or regex rule can never match."""
        earlier = [
            rule("e", "deny", "exact", "tool"),
            rule("l", "deny", "list", ("a", "tool")),
            rule("g", "deny", "glob", "t??l"),
            rule("r", "deny", "regex", "oo"),
        ]
        for r in earlier:
            self.assertEqual(
                self.shadowed(r, rule("late", "allow", "exact", "tool")),
                [
                    (
                        1,
                        "rule 'late' can never match: 'tool' is already matched by rule "
                        f"'{r.id}' ({r.match.kind} {_value(r)})",
                    )
                ],
            )

    def test_listFully(self) -> None:
        """A list whose names are all caught names the rule catching each."""
        self.assertEqual(
            self.shadowed(
                rule("no-admin", "deny", "prefix", "admin_"),
                rule("no-http", "deny", "glob", "http_*"),
                rule("ops", "allow", "list", ("admin_read", "http_get")),
            ),
            [
                (
                    2,
                    "rule 'ops' can never match: 'admin_read' is already matched by rule "
                    "'no-admin' (prefix 'admin_'); 'http_get' is already matched by rule "
                    "'no-http' (glob 'http_*')",
                )
            ],
        )

    def test_listPartly(self) -> None:
        """A list with only some names caught says which names it never decides for."""
        self.assertEqual(
            self.shadowed(
                rule("no-admin", "deny", "prefix", "admin_"),
                rule("ops", "allow", "list", ("read_file", "admin_read")),
            ),
            [
                (
                    1,
                    "rule 'ops' never decides for 'admin_read': already matched by rule "
                    "'no-admin' (prefix 'admin_')",
                )
            ],
        )

    def test_prefixByPrefix(self) -> None:
        """A prefix starting with an earlier prefix (or C{literal*} glob) can never match."""
        for earlier in [rule("a", "deny", "prefix", "admin"), rule("a", "deny", "glob", "admin*")]:
            self.assertEqual(
                self.shadowed(earlier, rule("b", "allow", "prefix", "admin_read")),
                [
                    (
                        1,
                        "rule 'b' can never match: every name starting with 'admin_read' is "
                        f"already matched by rule 'a' ({earlier.match.kind} {_value(earlier)})",
                    )
                ],
            )

    def test_globByPrefix(self) -> None:
        """A glob whose literal start begins with an earlier prefix can never match."""
        self.assertEqual(
            self.shadowed(
                rule("a", "deny", "prefix", "admin_"), rule("b", "allow", "glob", "admin_[rw]*")
            ),
            [
                (
                    1,
                    "rule 'b' can never match: every name starting with 'admin_' is already "
                    "matched by rule 'a' (prefix 'admin_')",
                )
            ],
        )

    def test_literalGlob(self) -> None:
        """A glob without wildcards is checked like an exact name."""
        self.assertEqual(
            self.shadowed(rule("a", "deny", "exact", "plain"), rule("b", "allow", "glob", "plain")),
            [
                (
                    1,
                    "rule 'b' can never match: 'plain' is already matched by rule 'a' "
                    "(exact 'plain')",
                )
            ],
        )

    def test_duplicates(self) -> None:
        """A glob or regex identical to an earlier one can never match."""
        self.assertEqual(
            self.shadowed(
                rule("g1", "deny", "glob", "h?tp_*"),
                rule("r1", "deny", "regex", "^search"),
                rule("g2", "allow", "glob", "h?tp_*"),
                rule("r2", "allow", "regex", "^search"),
            ),
            [
                (2, "rule 'g2' can never match: rule 'g1' has the same glob 'h?tp_*'"),
                (3, "rule 'r2' can never match: rule 'r1' has the same regex '^search'"),
            ],
        )

    def test_noFalsePositives(self) -> None:
        """A sensible policy, with overlapping but reachable rules, gets no warning."""
        self.assertEqual(
            self.shadowed(
                *DESIGN_RULES,
                rule("admin-page", "allow", "exact", "admin"),
                rule("https", "allow", "prefix", "http"),
                rule("research", "allow", "exact", "research"),
                rule("searchers", "deny", "glob", "search*"),
                rule("other-regex", "deny", "regex", "^search"),
                rule("write", "allow", "list", ("write_file", "shell")),
            ),
            [],
        )
        self.assertEqual(self.shadowed(), [])


def _value(r: PolicyRule) -> str:
    """A rule's match value as in matcher text."""
    value = r.match.value
    return f"[{', '.join(value)}]" if isinstance(value, tuple) else f"'{value}'"
