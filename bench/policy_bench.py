#!/usr/bin/env python3
"""Micro-benchmark of the policy engine (mcpgw.policy), in-process, no network.

    .venv/bin/python bench/policy_bench.py [--repeat N]

Prints a markdown table of the cost per call (microseconds, median of N timeit repeats) of:
  - Policy.decide() for policies of 10 and 1,000 rules of mixed matchers (exact, list, prefix,
    glob, regex; 2 in 5 are globs or regexes that are scanned) and of 1,000 indexed rules (exact,
    list, prefix), where the deciding rule is the last one (a regex, so every earlier glob and
    regex is scanned) or no rule matches (the default decides);
    warm: the same tool name every call (the decision cache answers);
    cold: a new tool name every call, decision cache off (every call computes the decision);
  - the same for 1,000 mixed rules of which 100 have caller conditions (keys, identities,
    clients, in turn) and 50 argument conditions, decided for a caller with
    decide(method, target, caller, arguments): the deciding rule a caller-conditioned one, an
    argument-conditioned one (the arguments are matched on every call, warm or not), the last
    one, or the default; warm: the same call every time; cold: decision cache off;
  - Policy.lister() over a 100-tool tools/list answer for one caller (warm: memoised), and for
    a new caller (client address) each time (the targets' matching rules memoised, the caller
    conditions tested); Policy.verdict() of a one-call request;
  - Policy.redact() of a ~1 KB arguments object with the four built-ins and a custom regex, and
    Policy.redactResult() of a ~1 KB tool result;
  - Policy.rateLimit() for one session, and for a new session every call (expiry at work).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import timeit
from collections.abc import Callable, Iterator
from functools import partial

import attr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcpgw.config import Conditions, MatchSpec, PolicyConfig, PolicyRule, RateLimitSpec
from mcpgw.policy import Caller, Policy

MAKERS: dict[str, Callable[[int], tuple[str, str | tuple[str, ...]]]] = {
    "exact": lambda i: ("exact", f"tool_{i}"),
    "list": lambda i: ("list", (f"read_{i}", f"write_{i}", f"list_{i}")),
    "prefix": lambda i: ("prefix", f"ns{i}_"),
    "glob": lambda i: ("glob", f"svc_{i}_[ab]?_*"),
    "regex": lambda i: ("regex", f"^api_{i}_v[0-9]+$"),
}


def mixedRules(count: int, kinds: str = "exact list prefix glob regex") -> tuple[PolicyRule, ...]:
    """C{count} rules cycling through C{kinds} of matchers; the last is C{regex '^last_'}."""
    makers = [MAKERS[kind] for kind in kinds.split()]
    rules = []
    for i in range(count - 1):
        kind, value = makers[i % len(makers)](i)
        action = "deny" if i % 2 else "allow"
        rules.append(PolicyRule(f"r{i}", action, MatchSpec(kind, value)))
    rules.append(PolicyRule("last", "deny", MatchSpec("regex", "^last_")))
    return tuple(rules)


def conditionalRules(count: int = 1000) -> tuple[PolicyRule, ...]:
    """
    L{mixedRules}, with caller conditions on every rule C{i} with C{i % 10 == 3} (keys,
    identities and clients in turn) and argument conditions on every rule with C{i % 20 == 7}.
    """
    rules = []
    for i, rule in enumerate(mixedRules(count)):
        when = None
        if i % 10 == 3:
            when = [
                Conditions(keys=(f"team-{i}-*", "ops")),
                Conditions(identities=(f"spiffe://corp.example/{i}/*",)),
                Conditions(clients=(f"10.{i % 250}.0.0/16",)),
            ][(i // 10) % 3]
        elif i % 20 == 7:
            when = Conditions(arguments=(("query", MatchSpec("regex", r"(?i)^\s*drop\b")),))
        rules.append(attr.evolve(rule, when=when))
    return tuple(rules)


def callNext(f: Callable[[str], object], names: Iterator[str]) -> object:
    """Call C{f} with the next name."""
    return f(next(names))


def perCall(stmt: Callable[[], object], number: int, repeat: int) -> float:
    """Median microseconds per call of C{stmt}."""
    times = timeit.repeat(stmt, number=number, repeat=repeat)
    return statistics.median(times) / number * 1e6


def arguments1k() -> dict[str, object]:
    """A realistic ~1 KB C{tools/call} arguments object with a few secrets in it."""
    return {
        "url": "https://api.example.com/v2/orders?customer=8812&expand=items,shipping",
        "method": "POST",
        "headers": {
            "Authorization": "Bearer ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "Content-Type": "application/json",
            "X-Request-Id": "4b1d6c7e-2f0a-4c1b-9a77-3f5e2d8c9b10",
        },
        "body": {
            "items": [
                {"sku": f"SKU-{i:05d}", "qty": i, "note": "fragile, keep upright, ring twice"}
                for i in range(6)
            ],
            "comment": "aws key AKIAIOSFODNN7EXAMPLE was rotated; openai "
            "sk-proj-4fQ9xT2mLr8VbN0cZk7WyHs3_Jd6PuEaGt1iOqRn-5vXbC2lMy9",
            "login": "user=alice password=correct-horse-battery-staple",
        },
        "timeout": 30,
        "retries": [1, 2, 4],
    }


def toolResult1k() -> dict[str, object]:
    """A ~1 KB C{tools/call} result (text and structured content) with a few secrets in it."""
    rows = [
        {"id": i, "name": f"customer {i}", "note": "prefers email, no calls before 9"}
        for i in range(6)
    ]
    rows[2]["note"] = "ssn: 078-05-1120 on file"
    return {
        "content": [
            {"type": "text", "text": "Found 6 customers; export key AKIAIOSFODNN7EXAMPLE used."},
            {"type": "text", "text": json.dumps(rows)[:400]},
        ],
        "structuredContent": {"customers": rows, "exportedBy": "AKIAIOSFODNN7EXAMPLE"},
        "isError": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timeit repeats (median taken)")
    repeat = parser.parse_args().repeat
    rows: list[tuple[str, str, float]] = []
    policies = [
        ("10, mixed", mixedRules(10)),
        ("1,000, mixed", mixedRules(1000)),
        ("1,000, exact/list/prefix", mixedRules(1000, "exact list prefix")),
    ]
    for described, rules in policies:
        config = PolicyConfig("allow", True, rules)
        warm = Policy.fromConfig(config)
        cold = Policy(config, cacheSize=0)
        assert warm.decide("last_x").rule_id == "last"
        assert warm.decide("nomatch").rule_id is None
        for label, stem in (("deciding rule last", "last_"), ("no match, default", "nomatch_")):
            name = stem + "x"
            us = perCall(partial(warm.decide, name), 200_000, repeat)
            rows.append((f"decide, warm, {label}", described, us))
            number = 100_000 if len(rules) == 10 else 10_000
            names = iter([f"{stem}{i}" for i in range(number * repeat)])
            us = perCall(partial(callNext, cold.decide, names), number, repeat)
            rows.append((f"decide, cold, {label}", described, us))

    rules = conditionalRules()
    assert sum(r.when is not None and r.when.onCaller for r in rules) == 100
    assert sum(r.when is not None and bool(r.when.arguments) for r in rules) == 50
    config = PolicyConfig("allow", True, rules)
    warm = Policy.fromConfig(config)
    cold = Policy(config, cacheSize=0)
    described = "1,000: 100 caller-, 50 argument-cond."
    caller = Caller(keyId="team-3-ci", principal="team-3-ci", client="10.1.2.3", session="s")
    drop = {"query": "DROP TABLE accounts", "opts": {"dry_run": False}}
    cases = [
        ("caller-conditioned rule decides", "svc_3_ab_x", "r3", None),
        ("argument-conditioned rule decides", "ns7_tool", "r7", drop),
        ("deciding rule last", "last_x", "last", drop),
        ("no match, default", "nomatch_x", None, drop),
    ]
    for label, name, expected, arguments in cases:
        for policy, number, temperature in ((warm, 200_000, "warm"), (cold, 10_000, "cold")):
            call = partial(policy.decide, "tools/call", name, caller, arguments)
            assert call().rule_id == expected, label
            us = perCall(call, number, repeat)
            rows.append(
                (f"decide(method, target, caller, args), {temperature}, {label}", described, us)
            )
    tools = [f"tool_{i}" for i in range(0, 200, 2)]
    assert len(list(filter(warm.lister("tools/call", caller), tools))) == 100  # memo built
    us = perCall(lambda: list(filter(warm.lister("tools/call", caller), tools)), 5_000, repeat)
    rows.append(("lister, 100-tool tools/list answer, warm", described, us))
    clients = iter([f"10.{i // 250 % 250}.{i % 250}.1" for i in range(1_000 * repeat)])
    us = perCall(
        lambda: list(filter(warm.lister("tools/call", Caller(client=next(clients))), tools)),
        1_000,
        repeat,
    )
    rows.append(("lister, 100-tool tools/list answer, a new caller each", described, us))
    message = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "ns7_tool", "arguments": {"query": "select 1"}},
    }
    us = perCall(lambda: warm.verdict([message], caller, 0.0), 100_000, repeat)
    rows.append(("verdict, one tools/call, warm", described, us))

    redactRule = PolicyRule(
        "scrub",
        "redact",
        MatchSpec("glob", "http_*"),
        redact=("bearer", "openai_key", "aws_access_key", "jwt", r"(?i)password=\S+"),
    )
    limitRule = PolicyRule(
        "slow", "rate_limit", MatchSpec("prefix", "search"), rate_limit=RateLimitSpec(100, 100)
    )
    policy = Policy.fromConfig(PolicyConfig("allow", True, (redactRule, limitRule)))
    args = arguments1k()
    size = len(json.dumps(args))
    redacted, changed = policy.redact("scrub", args)
    assert changed == 3, (changed, redacted)
    us = perCall(lambda: policy.redact("scrub", args), 5_000, repeat)
    rows.append((f"redact, {size} B arguments, {changed} values changed", "-", us))

    resultPolicy = Policy.fromConfig(
        PolicyConfig(
            rules=(
                PolicyRule(
                    "results",
                    "allow",
                    MatchSpec("glob", "*"),
                    redact_results=("aws_access_key", "jwt", r"(?i)ssn:\s*\d{3}-\d{2}-\d{4}"),
                ),
            )
        )
    )
    result = toolResult1k()
    size = len(json.dumps(result))
    scrubbed, changed = resultPolicy.redactResult("results", result)
    assert changed == 4, (changed, scrubbed)
    us = perCall(lambda: resultPolicy.redactResult("results", result), 5_000, repeat)
    rows.append((f"redactResult, {size} B tool result, {changed} strings changed", "-", us))

    clock = itertools.count(0, 0.01)
    us = perCall(lambda: policy.rateLimit("slow", "s", next(clock)), 100_000, repeat)
    rows.append(("rateLimit, one session", "-", us))
    sessions = iter([f"session-{i}" for i in range(100_000 * repeat)])
    us = perCall(lambda: policy.rateLimit("slow", next(sessions), next(clock)), 100_000, repeat)
    rows.append((f"rateLimit, new session each call ({policy.bucketCount('slow')} live)", "-", us))

    print(f"policy micro-benchmark, Python {sys.version.split()[0]}, median of {repeat} repeats\n")
    print("| case | rules | µs/call |")
    print("|---|---:|---:|")
    for case, described, us in rows:
        print(f"| {case} | {described} | {us:.3f} |")


if __name__ == "__main__":
    main()
