"""
C{mcpgw policy explain} with callers and arguments, C{mcpgw policy test} against audit files, and
the policy warnings of C{mcpgw config check} (contract part 2): outputs and exit codes.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial.unittest import TestCase

from mcpgw.cli import main

#: Any syntactically valid Argon2id hash: these tests never verify a key.
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"

CONFIG = f"""\
upstreams:
  - {{name: a, url: "http://127.0.0.1:9/mcp"}}
auth:
  enabled: true
  keys:
    - {{id: ci-bot, hash: "{HASH}"}}
    - {{id: deploy-eu, hash: "{HASH}"}}
policy:
  default_action: {{tools/call: deny, resources/read: deny}}
  rules:
    - id: ci-reads
      action: allow
      match: {{list: [read_file, list_dir]}}
      when: {{keys: [ci-bot, "deploy-*"]}}
    - id: finance-pays
      action: allow
      match: {{prefix: payments_}}
      when:
        identities: ["spiffe://corp.example/finance/*"]
        clients: [10.20.0.0/16]
    - id: no-payments
      action: deny
      match: {{prefix: payments_}}
    - id: no-sql-writes
      action: deny
      match: {{exact: execute_sql}}
      when:
        arguments:
          query: {{regex: '(?i)^\\s*(insert|update|delete|drop|alter|truncate)\\b'}}
          opts.dry_run: {{exact: "false"}}
    - id: docs-only
      action: allow
      method: resources/read
      match: {{prefix: "file:///srv/docs/"}}
    - id: per-key-budget
      action: rate_limit
      match: {{glob: "*"}}
      rate_limit: {{rate: 5, burst: 10, per: key}}
      redact_results: [aws_access_key]
"""


def run(*argv: str) -> tuple[int, str, str]:
    """C{mcpgw ARGV...} in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def auditLine(**fields: Any) -> str:
    """An audit line as the gateway writes it (part-1 fields), with C{fields} changed."""
    line: dict[str, Any] = {
        "ts": "2026-07-28T10:00:00.000Z",
        "request_id": "r",
        "session_id": "s1",
        "client_ip": "10.1.1.1",
        "method": "tools/call",
        "tool": None,
        "upstream": "a",
        "decision": "allow",
        "rule_id": None,
        "error": None,
        "auth_key_id": None,
        "auth_result": "external",
        "status": 200,
        "http_method": "POST",
        "batch_size": None,
    }
    line.update(fields)
    return json.dumps(line)


class ExplainTests(TestCase):
    """C{mcpgw policy explain TARGET [--method] [--key-id] [--identity] [--client] [--arg]}."""

    def setUp(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(), "p.yaml")
        with open(self.path, "w") as f:
            f.write(CONFIG)

    def explain(self, *args: str) -> str:
        code, out, err = run("policy", "explain", "--config", self.path, *args)
        self.assertEqual(code, 0, err)
        return out

    def test_keyId(self) -> None:
        """--key-id is the caller's key (and principal): a key-conditioned rule decides."""
        out = self.explain("read_file", "--key-id", "deploy-eu")
        self.assertIn("caller: key deploy-eu, principal deploy-eu\n", out)
        self.assertIn("decision: allow (rule ci-reads, action allow)", out)
        self.assertIn("matched: list [read_file, list_dir], when keys [ci-bot, deploy-*]", out)
        self.assertIn("tools/list: shown", out)

    def test_identityAndClient(self) -> None:
        """--identity and --client: a rule needing both decides only with both."""
        identity = "spiffe://corp.example/finance/payer"
        out = self.explain("payments_send", "--identity", identity, "--client", "10.20.1.2")
        self.assertIn("decision: allow (rule finance-pays, action allow)", out)
        out = self.explain("payments_send", "--identity", identity, "--client", "10.9.1.2")
        self.assertIn("decision: deny (rule no-payments, action deny)", out)
        self.assertIn(
            "  finance-pays (prefix 'payments_'): when.clients: 10.9.1.2 is in none of "
            "[10.20.0.0/16]\n",
            out,
        )
        self.assertIn("answer: HTTP 403", out)
        self.assertIn("tools/list: hidden", out)

    def test_arguments(self) -> None:
        """--arg NAME=VALUE, dotted names nested: argument conditions are evaluated."""
        out = self.explain(
            "execute_sql",
            "-k",
            "ci-bot",
            "--arg",
            "query=DROP TABLE t",
            "--arg",
            "opts.dry_run=false",
        )
        self.assertIn("decision: deny (rule no-sql-writes, action deny)", out)
        out = self.explain("execute_sql", "-k", "ci-bot", "--arg", "query=DROP TABLE t")
        self.assertIn(
            "  no-sql-writes (exact 'execute_sql'): when.arguments.opts.dry_run: absent, null, "
            "an object or an array\n",
            out,
        )
        self.assertIn("decision: rate_limit (rule per-key-budget, action rate_limit)", out)
        self.assertIn(
            "rate limit bucket: per rule per-key-budget and API key: key id ci-bot, else the "
            "client address",
            out,
        )
        self.assertIn("results: scrubbed by redact_results of rule per-key-budget", out)
        # a tool whose denial depends on its arguments stays listed
        self.assertIn("tools/list: shown", out)
        out = self.explain("execute_sql")
        self.assertIn("when.arguments.query: not given", out)

    def test_methods(self) -> None:
        """--method resources/read decides by the URI with that method's rules and default."""
        out = self.explain("file:///srv/docs/x.md", "--method", "resources/read")
        self.assertIn("resource: file:///srv/docs/x.md\n", out)
        self.assertIn("decision: allow (rule docs-only, action allow)", out)
        out = self.explain("file:///etc/passwd", "--method", "resources/read")
        self.assertIn("decision: deny (default_action; no rule matched)", out)
        self.assertIn("resources/list: hidden", out)
        out = self.explain("greet", "--method", "prompts/get")
        self.assertIn("decision: allow (default_action; no rule matched)", out)

    def test_badArguments(self) -> None:
        """A client that is not an address, or an --arg without '=', is a usage error (2)."""
        code, _, err = run("policy", "explain", "-c", self.path, "x", "--client", "nope")
        self.assertEqual(code, 2)
        self.assertIn("not an IP address: 'nope'", err)
        code, _, err = run("policy", "explain", "-c", self.path, "x", "--arg", "novalue")
        self.assertEqual(code, 2)
        self.assertIn("expected NAME=VALUE", err)


class PolicyTestTests(TestCase):
    """C{mcpgw policy test --config FILE --against AUDIT.jsonl... [--fail-on-change]}."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "p.yaml")
        with open(self.path, "w") as f:
            f.write(CONFIG)

    def audit(self, name: str, *lines: str) -> str:
        path = os.path.join(self.dir, name)
        opener: Any = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt") as f:
            f.write("".join(line + "\n" for line in lines))
        return path

    def test_changesGroupedByRuleAndCaller(self) -> None:
        """Every call whose decision would change is printed under its new rule and caller."""
        ci = {"auth_key_id": "ci-bot", "auth_result": "ok"}
        first = self.audit(
            "audit.jsonl.1",
            auditLine(request_id="a1", tool="read_file", rule_id="ci-reads", **ci),
            auditLine(request_id="a2", tool="payments_send", **ci),
            auditLine(request_id="a3", tool="payments_refund", **ci),
            auditLine(request_id="a4", tool="search", rule_id="per-key-budget", **ci),
        )
        second = self.audit(
            "audit.jsonl",
            auditLine(request_id="b1", method="resources/read", target="file:///etc/passwd"),
            auditLine(
                request_id="b2",
                tool="payments_send",
                principal="spiffe://corp.example/finance/x",
                client_ip="10.20.0.9",
                decision="deny",
                rule_id="old-deny",
                error="policy_denied",
                status=403,
            ),
        )
        code, out, err = run("policy", "test", "-c", self.path, "--against", first, second)
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(
            lines[0],
            f"replayed 6 call(s) from 2 audit file(s) through {self.path}: 4 would change, "
            "2 unchanged",
        )
        self.assertIn(
            "\nrule no-payments (deny), caller key ci-bot, principal ci-bot, client 10.1.1.1: "
            "2 call(s)\n"
            "  2026-07-28T10:00:00.000Z a2 tools/call payments_send: was allow (default), "
            f"would be deny  [{first}:2]\n"
            "  2026-07-28T10:00:00.000Z a3 tools/call payments_refund: was allow (default), "
            f"would be deny  [{first}:3]\n",
            out,
        )
        self.assertIn(
            "\ndefault_action (deny), caller client 10.1.1.1: 1 call(s)\n"
            "  2026-07-28T10:00:00.000Z b1 resources/read file:///etc/passwd: was allow "
            f"(default), would be deny  [{second}:1]\n",
            out,
        )
        self.assertIn(
            "\nrule finance-pays (allow), caller principal spiffe://corp.example/finance/x, "
            "client 10.20.0.9: 1 call(s)\n"
            "  2026-07-28T10:00:00.000Z b2 tools/call payments_send: was deny (rule old-deny), "
            f"would be allow  [{second}:2]",
            out,
        )
        self.assertNotIn(" a1 ", out)
        self.assertNotIn(" a4 ", out)  # rate-limited by the same rule, a token taken: no change

    def test_failOnChange(self) -> None:
        """--fail-on-change exits 1 when a decision would change, 0 when none would."""
        changed = self.audit("a.jsonl", auditLine(tool="payments_send"))
        same = self.audit("b.jsonl", auditLine(tool="payments_send", decision="deny", rule_id="x"))
        self.assertEqual(run("policy", "test", "-c", self.path, "--against", changed)[0], 0)
        self.assertEqual(
            run("policy", "test", "-c", self.path, "--against", changed, "--fail-on-change")[0], 1
        )
        code, out, _ = run("policy", "test", "-c", self.path, "--against", same, "--fail-on-change")
        self.assertEqual(code, 0)
        self.assertIn(": 0 would change, 1 unchanged", out)

    def test_argumentsNeeded(self) -> None:
        """Calls a rule with argument conditions would have to decide are counted, not replayed."""
        path = self.audit(
            "a.jsonl",
            auditLine(tool="execute_sql", auth_key_id="ci-bot", auth_result="ok"),
            auditLine(tool="execute_sql"),
            auditLine(tool="read_file", auth_key_id="ci-bot", auth_result="ok", rule_id="x"),
        )
        code, out, _ = run("policy", "test", "-c", self.path, "--against", path, "--fail-on-change")
        self.assertEqual(code, 0)
        self.assertIn("replayed 1 call(s)", out)
        self.assertIn(
            "not replayed: 2 call(s): a rule with argument conditions would need their "
            "arguments, which the audit does not keep: no-sql-writes (2)",
            out,
        )

    def test_skipped(self) -> None:
        """Other methods are ignored; batches, pre-policy refusals, junk and targetless lines
        are counted as skipped."""
        path = self.audit(
            "a.jsonl.gz",
            auditLine(method="tools/list"),
            auditLine(method=None, http_method="GET"),
            auditLine(tool="x", batch_size=3),
            auditLine(tool="x", error="unauthenticated", auth_result="missing", status=401),
            auditLine(method="prompts/get"),
            '{"ts": "2026-07-28T10:00:00.0',
            "",
            auditLine(tool="payments_x", decision="deny", error="policy_denied"),
        )
        code, out, err = run("policy", "test", "-c", self.path, "--against", path)
        self.assertEqual(code, 0, err)
        self.assertIn("replayed 1 call(s)", out)
        self.assertIn(
            "skipped lines: 1 unreadable, 1 batch, 1 refused before policy, 1 without a target",
            out,
        )

    def test_oldMtlsLines(self) -> None:
        """A line without principal takes the certificate identity of an mtls line as it."""
        path = self.audit(
            "a.jsonl",
            auditLine(
                tool="payments_send",
                auth_result="mtls",
                auth_key_id="spiffe://corp.example/finance/a",
                client_ip="10.20.1.1",
                decision="deny",
            ),
        )
        _, out, _ = run("policy", "test", "-c", self.path, "--against", path)
        self.assertIn("rule finance-pays (allow), caller principal spiffe://", out)

    def test_unreadable(self) -> None:
        """An invalid config or a missing audit file: exit 2 with the reason on stderr."""
        missing = os.path.join(self.dir, "missing.jsonl")
        code, _, err = run("policy", "test", "-c", self.path, "--against", missing)
        self.assertEqual(code, 2)
        self.assertIn(f"cannot read {missing}", err)
        bad = os.path.join(self.dir, "bad.yaml")
        with open(bad, "w") as f:
            f.write("upstreams: []\npolicy: {default_action: {tools/call: block}}\n")
        code, _, err = run("policy", "test", "-c", bad, "--against", missing)
        self.assertEqual(code, 2)
        self.assertIn("policy.default_action.tools/call: must be one of allow, deny", err)

    def test_realProcess(self) -> None:
        """The installed command line: exit status 1 with --fail-on-change, report on stdout."""
        path = self.audit("a.jsonl", auditLine(tool="payments_send"))
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mcpgw",
                *["policy", "test", "--fail-on-change", "--config"],
                self.path,
                "--against",
                path,
            ],
            capture_output=True,
            text=True,
        )
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn("1 would change", out.stdout)


class ConfigCheckWarningTests(TestCase):
    """C{mcpgw config check} warns about conditional shadowing and unknown keys, exit 0."""

    def test_warnings(self) -> None:
        """Each warning names the path and the line; the config stays valid."""
        path = os.path.join(tempfile.mkdtemp(), "w.yaml")
        with open(path, "w") as f:
            f.write(
                CONFIG + "    - id: late\n"
                "      action: allow\n"
                "      match: {exact: payments_x}\n"
                "      when:\n"
                "        keys:\n"
                "          - ci-bto\n"
            )
        code, out, err = run("config", "check", path)
        self.assertEqual(code, 0, err)
        self.assertIn("OK", out)
        self.assertEqual(
            [line for line in err.splitlines() if "warning" in line],
            [
                f"{path}: warning: policy.rules[6]: rule 'late' can never match: 'payments_x' is "
                "already matched by rule 'no-payments' (prefix 'payments_') (line 40)",
                f"{path}: warning: policy.rules[6].when.keys[0]: 'ci-bto' names no configured "
                "key; did you mean 'ci-bot'? (line 45)",
            ],
        )
