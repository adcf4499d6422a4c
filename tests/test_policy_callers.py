"""
Contract part 2, policy by caller, through the real gateway (real sockets on 127.0.0.1, the
scripted recording upstream of L{tests.support}, the in-process gateway): C{when} conditions
(keys, identities from mTLS and from a trusted auth proxy, client networks, arguments), rules per
C{method} and C{default_action} as a map, the external identity header, listings per caller with
private C{cacheScope}, C{redact_results}, rate-limit buckets by C{per}, and the principal in the
audit line and the span (C{enduser.id}).

Every test fails if the feature it names is missing: a condition that is ignored lets the wrong
caller through (or refuses the right one), an unfiltered listing shows what must be hidden, and so
on. Refusals are checked on the wire (status, JSON-RPC error), at the upstream (which must not
have been contacted) and in the audit line.
"""

from __future__ import annotations

import gzip
import http.client
import json
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks

from tests.otlpreceiver import OTLPReceiver
from tests.pki import ALICE_SPIFFE
from tests.support import CANNED_RESULTS, SECRET, GatewayTestCase, Reply, rpc
from tests.test_auth import FAST, KEY_A, KEY_B
from tests.test_tls import TLSGatewayTestCase

#: A third key: its id, C{deployer}, is not matched by the glob C{deploy-*}.
KEY_C = "mcpgw_" + "c" * 43

KEYS = "auth:\n  enabled: true\n  keys:\n" + "".join(
    f"    - {{id: {i}, hash: '{FAST.hash(k)}'}}\n"
    for i, k in (("ci-bot", KEY_A), ("deploy-eu", KEY_B), ("deployer", KEY_C))
)
"""Three API keys: C{ci-bot} (L{KEY_A}), C{deploy-eu} (L{KEY_B}), C{deployer} (L{KEY_C})."""

A = {"Authorization": "Bearer " + KEY_A}
B = {"Authorization": "Bearer " + KEY_B}
C = {"Authorization": "Bearer " + KEY_C}

#: The four listing methods: the result member holding the list and the member naming items.
LISTINGS = {
    "tools/list": ("tools", "name"),
    "resources/list": ("resources", "uri"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate"),
    "prompts/list": ("prompts", "name"),
}

#: The index of the answer event in L{tests.support.answerStream}.
ANSWER_EVENT = 3


def call(tool: str, arguments: Any = None, id: Any = 1) -> bytes:
    params: dict[str, Any] = {"name": tool}
    if arguments is not None:
        params["arguments"] = arguments
    return rpc("tools/call", params, id=id)


def events(stream: bytes) -> list[bytes]:
    """The events of an LF-framed SSE stream, each with its blank line."""
    return [e + b"\n\n" for e in stream.split(b"\n\n") if e]


def dataOf(event: bytes) -> Any:
    """The JSON value of an event's data lines."""
    lines = [ln[6:] for ln in event.split(b"\n") if ln.startswith(b"data: ")]
    return json.loads(b"\n".join(lines))


def listed(result: dict[str, Any], method: str) -> list[str]:
    kind, member = LISTINGS[method]
    return [item[member] for item in result[kind]]


def denied(rid: Any, ruleId: str | None) -> dict[str, Any]:
    """The body of a policy refusal."""
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "error": {"code": -32001, "message": "policy_denied", "data": {"rule_id": ruleId}},
    }


def limited(rid: Any, ruleId: str) -> dict[str, Any]:
    """The body of a rate-limit refusal."""
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "error": {"code": -32002, "message": "rate_limited", "data": {"rule_id": ruleId}},
    }


class CallerTestCase(GatewayTestCase):
    """A gateway in front of the scripted upstream, with helpers to check refusals."""

    def forwarded(self) -> list[Any]:
        """C{params.name} (or C{params.uri}) of each JSON-RPC request the upstream received."""
        out = []
        for seen in self.upstream.seen:
            params = json.loads(seen.body).get("params") or {}
            out.append(params.get("name", params.get("uri")))
        return out

    def assertDenied(self, reply: Reply, rid: Any, ruleId: str | None) -> None:
        self.assertEqual((reply.status, reply.json()), (403, denied(rid, ruleId)))

    def assertLimited(self, reply: Reply, rid: Any, ruleId: str, retryAfter: str) -> None:
        self.assertEqual((reply.status, reply.json()), (429, limited(rid, ruleId)))
        self.assertEqual(reply.header("retry-after"), [retryAfter])

    def audit(self, *fields: str) -> list[tuple[Any, ...]]:
        """The given fields of every audit line, in order."""
        return [tuple(line[f] for f in fields) for line in self.auditLines()]


# -- when.keys ---------------------------------------------------------------------------------


class KeyConditionTests(CallerTestCase):
    """C{when.keys}: globs over the authenticated API key id."""

    extraConfig = (
        KEYS
        + """
policy:
  default_action: deny
  rules:
    - {id: ci-reads, action: allow, match: {list: [read_file, list_dir]}, when: {keys: [ci-bot]}}
    - {id: deploy-no-read, action: deny, match: {exact: read_file}, when: {keys: ["deploy-*"]}}
    - {id: deploy-all, action: allow, match: {glob: "*"}, when: {keys: ["deploy-*"]}}
"""
    )

    @inlineCallbacks
    def test_eachKeyDecidedByItsRules(self) -> Any:
        """Two keys calling the same two tools get opposite answers; a key the glob misses gets the default; refusals never reach the upstream."""
        replies = []
        for headers in (A, B, C):
            for i, tool in enumerate(("read_file", "echo")):
                replies.append((yield self.call(body=call(tool, id=i), headers=headers)))
        self.assertEqual(replies[0].status, 200)  # ci-bot read_file: ci-reads
        self.assertDenied(replies[1], 1, None)  # ci-bot echo: the default
        self.assertDenied(replies[2], 0, "deploy-no-read")  # deploy-eu read_file
        self.assertEqual(replies[3].status, 200)  # deploy-eu echo: deploy-all
        self.assertDenied(replies[4], 0, None)  # deployer: "deploy-*" needs the hyphen
        self.assertDenied(replies[5], 1, None)
        self.assertEqual(self.forwarded(), ["read_file", "echo"])
        self.assertEqual(
            [s.header("authorization") for s in self.upstream.seen],
            [["Bearer upstream-secret"]] * 2,
        )
        self.assertEqual(
            self.audit("principal", "auth_key_id", "auth_result", "tool", "decision", "rule_id"),
            [
                ("ci-bot", "ci-bot", "ok", "read_file", "allow", "ci-reads"),
                ("ci-bot", "ci-bot", "ok", "echo", "deny", None),
                ("deploy-eu", "deploy-eu", "ok", "read_file", "deny", "deploy-no-read"),
                ("deploy-eu", "deploy-eu", "ok", "echo", "allow", "deploy-all"),
                ("deployer", "deployer", "ok", "read_file", "deny", None),
                ("deployer", "deployer", "ok", "echo", "deny", None),
            ],
        )


# -- when.identities: mTLS ---------------------------------------------------------------------


class MTLSIdentityTests(TLSGatewayTestCase):
    """C{when.identities} against the verified client certificate's identity (SPIFFE URI SAN)."""

    mtls = True
    extraConfig = """
policy:
  rules:
    - id: agents-admin
      action: allow
      match: {prefix: admin_}
      when: {identities: ["spiffe://example.org/agent/*"]}
    - {id: no-admin, action: deny, match: {prefix: admin_}}
"""

    def postAs(self, cn: str, uri: str | None, body: bytes) -> Any:
        client = self.client(self.clientCA.client(cn=cn, uri=uri))
        return threads.deferToThread(client.post, body)

    @inlineCallbacks
    def test_spiffeIdentityDecides(self) -> Any:
        """A SPIFFE id under spiffe://example.org/agent/ may call admin_reset; another SPIFFE id and a CN-only certificate are denied by the next rule."""
        alice = yield self.postAs("alice", ALICE_SPIFFE, call("admin_reset", {}, id=1))
        self.assertEqual(alice.status, 200)
        other = yield self.postAs(
            "svc", "spiffe://example.org/service/x", call("admin_reset", id=2)
        )
        self.assertEqual((other.status, json.loads(other.body)), (403, denied(2, "no-admin")))
        bob = yield self.postAs("bob", None, call("admin_reset", id=3))
        self.assertEqual((bob.status, json.loads(bob.body)), (403, denied(3, "no-admin")))
        self.assertEqual(len(self.upstream.seen), 1)
        lines = self.auditLines()
        self.assertEqual(
            [(x["principal"], x["auth_result"], x["transport"], x["rule_id"]) for x in lines],
            [
                (ALICE_SPIFFE, "mtls", "https", "agents-admin"),
                ("spiffe://example.org/service/x", "mtls", "https", "no-admin"),
                ("bob", "mtls", "https", "no-admin"),
            ],
        )
        self.assertEqual([x["decision"] for x in lines], ["allow", "deny", "deny"])


# -- when.identities: an auth proxy's identity header ------------------------------------------

EXTERNAL_POLICY = """
policy:
  rules:
    - id: finance-pays
      action: allow
      match: {prefix: payments_}
      when: {identities: ["*@finance.example"]}
    - {id: no-payments, action: deny, match: {prefix: payments_}}
    - id: by-identity
      action: rate_limit
      match: {exact: search}
      rate_limit: {rate: 0.01, burst: 1, per: identity}
"""

ALICE = {"X-Forwarded-Email": "alice@finance.example"}
BOB = {"X-Forwarded-Email": "bob@hr.example"}


class TrustedProxyTests(CallerTestCase):
    """C{auth.external} with the test client's address (127.0.0.1) among the trusted proxies."""

    extraConfig = (
        "auth:\n  external: {identity_header: X-Forwarded-Email,"
        " trusted_proxies: [10.0.0.0/8, 127.0.0.1/32]}\n" + EXTERNAL_POLICY
    )

    @inlineCallbacks
    def test_headerIsThePrincipal(self) -> Any:
        """From a trusted proxy the header names the principal (auth_result external) and when.identities applies to it; the upstream gets the header."""
        ok = yield self.call(body=call("payments_send", id=1), headers=ALICE)
        self.assertEqual(ok.status, 200)
        self.assertEqual(
            self.upstream.seen[0].header("x-forwarded-email"), ["alice@finance.example"]
        )
        bob = yield self.call(body=call("payments_send", id=2), headers=BOB)
        self.assertDenied(bob, 2, "no-payments")
        nobody = yield self.call(body=call("payments_send", id=3))
        self.assertDenied(nobody, 3, "no-payments")
        self.assertEqual(len(self.upstream.seen), 1)
        self.assertEqual(
            self.audit("principal", "auth_result", "auth_key_id", "decision", "rule_id"),
            [
                ("alice@finance.example", "external", None, "allow", "finance-pays"),
                ("bob@hr.example", "external", None, "deny", "no-payments"),
                (None, "external", None, "deny", "no-payments"),
            ],
        )

    @inlineCallbacks
    def test_headerTwiceRefused(self) -> Any:
        """The identity header sent twice (any spelling) is ambiguous: 400 duplicate_header with the request's id, audited, the upstream never contacted."""
        headers = {**ALICE, "x-forwarded-email": "mallory@finance.example"}
        reply = yield self.call(body=call("payments_send", id=9), headers=headers)
        self.assertEqual(reply.status, 400)
        body = reply.json()
        self.assertEqual((body["id"], body["error"]["message"]), (9, "duplicate_header"))
        self.assertEqual(body["error"]["code"], -32600)
        self.assertEqual(self.upstream.seen, [])
        self.assertEqual(
            self.audit("status", "error", "tool", "principal"),
            [(400, "duplicate_header", "payments_send", None)],
        )

    @inlineCallbacks
    def test_rateLimitPerIdentity(self) -> Any:
        """per: identity: one bucket per vouched identity whatever the session; another identity has its own; without one the client address is the bucket."""
        sessions = [
            (ALICE, "s1", 200),
            ({**ALICE, "Mcp-Session-Id": "s2"}, "s2", 429),  # same identity, other session
            (BOB, "s1", 200),
            ({}, "s3", 200),  # anonymous: the address's bucket
            ({}, "s4", 429),
        ]
        for i, (headers, session, status) in enumerate(sessions):
            reply = yield self.call(
                body=call("search", id=i), headers={"Mcp-Session-Id": session, **headers}
            )
            self.assertEqual(reply.status, status, i)
            if status == 429:
                self.assertLimited(reply, i, "by-identity", "100")
        self.assertEqual(len(self.upstream.seen), 3)
        self.assertEqual(
            self.audit("principal", "decision", "rule_id"),
            [
                ("alice@finance.example", "allow", "by-identity"),
                ("alice@finance.example", "rate_limit", "by-identity"),
                ("bob@hr.example", "allow", "by-identity"),
                (None, "allow", "by-identity"),
                (None, "rate_limit", "by-identity"),
            ],
        )


class UntrustedProxyTests(CallerTestCase):
    """C{auth.external} trusting only 10.0.0.0/8: the test client (127.0.0.1) is not a proxy."""

    extraConfig = (
        "auth:\n  external: {identity_header: X-Forwarded-Email, trusted_proxies: [10.0.0.0/8]}\n"
        + EXTERNAL_POLICY
    )

    @inlineCallbacks
    def test_headerIgnoredAndRemoved(self) -> Any:
        """From an untrusted peer the identity header is ignored (no principal, identities do not match) and removed before forwarding, whatever its case; other headers pass."""
        reply = yield self.call(body=call("payments_send", id=1), headers=ALICE)
        self.assertDenied(reply, 1, "no-payments")
        for i, name in enumerate(("X-Forwarded-Email", "x-forwarded-email", "X-FORWARDED-EMAIL")):
            reply = yield self.call(
                body=call("echo", id=i),
                headers={name: "alice@finance.example", "X-Other": "kept"},
            )
            self.assertEqual(reply.status, 200)
        self.assertEqual(len(self.upstream.seen), 3)
        for seen in self.upstream.seen:
            self.assertEqual(seen.header("x-forwarded-email"), [])
            self.assertNotIn("alice@finance.example", repr(seen.headers))
            self.assertEqual(seen.header("x-other"), ["kept"])
        self.assertEqual(
            self.audit("principal", "auth_result", "decision", "rule_id"),
            [(None, "external", "deny", "no-payments")] + [(None, "external", "allow", None)] * 3,
        )

    @inlineCallbacks
    def test_headerTwiceRefused(self) -> Any:
        """Twice from an untrusted peer too: 400 duplicate_header, the upstream never contacted."""
        headers = {**ALICE, "x-forwarded-email": "bob@hr.example"}
        reply = yield self.call(body=call("echo", id=4), headers=headers)
        self.assertEqual(
            (reply.status, reply.json()["error"]["message"]), (400, "duplicate_header")
        )
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_untrustedIdentitiesShareTheAddressBucket(self) -> Any:
        """per: identity from an untrusted peer: the claimed identities are ignored, so both callers take from the address's bucket."""
        first = yield self.call(body=call("search", id=1), headers=ALICE)
        self.assertEqual(first.status, 200)
        second = yield self.call(body=call("search", id=2), headers=BOB)
        self.assertLimited(second, 2, "by-identity", "100")


# -- when.clients ------------------------------------------------------------------------------


class ClientConditionTests(CallerTestCase):
    """C{when.clients}: the client address (here always 127.0.0.1) in one of the networks."""

    extraConfig = """
policy:
  rules:
    - {id: loopback-no-shell, action: deny, match: {exact: shell_exec}, when: {clients: [127.0.0.0/8]}}
    - {id: host-no-deploy, action: deny, match: {exact: deploy}, when: {clients: [10.1.2.3, 127.0.0.1]}}
    - {id: office-no-echo, action: deny, match: {exact: echo}, when: {clients: [10.20.0.0/16, "::1/128"]}}
    - {id: neighbour-no-read, action: deny, match: {exact: read_file}, when: {clients: [127.0.0.2/32]}}
"""

    @inlineCallbacks
    def test_addressInNetworks(self) -> Any:
        """127.0.0.1 is in 127.0.0.0/8 and in 127.0.0.1/32 (denied), not in 10.20.0.0/16, ::1/128 or 127.0.0.2/32 (allowed by default)."""
        replies = []
        for i, tool in enumerate(("shell_exec", "deploy", "echo", "read_file")):
            replies.append((yield self.call(body=call(tool, id=i))))
        self.assertDenied(replies[0], 0, "loopback-no-shell")
        self.assertDenied(replies[1], 1, "host-no-deploy")
        self.assertEqual([r.status for r in replies[2:]], [200, 200])
        self.assertEqual(self.forwarded(), ["echo", "read_file"])
        self.assertEqual(
            self.audit("client_ip", "principal", "decision", "rule_id"),
            [
                ("127.0.0.1", None, "deny", "loopback-no-shell"),
                ("127.0.0.1", None, "deny", "host-no-deploy"),
                ("127.0.0.1", None, "allow", None),
                ("127.0.0.1", None, "allow", None),
            ],
        )


# -- when.arguments ----------------------------------------------------------------------------


class ArgumentConditionTests(CallerTestCase):
    """C{when.arguments}: one matcher per dotted argument path, values compared as text."""

    extraConfig = r"""
policy:
  rules:
    - id: no-sql-writes
      action: deny
      match: {exact: execute_sql}
      when: {arguments: {target.query: {regex: '(?i)^\s*(insert|update|delete|drop)\b'}}}
    - id: no-limit-1000
      action: deny
      match: {exact: execute_sql}
      when: {arguments: {limit: {exact: "1000"}}}
    - id: no-wet-runs
      action: deny
      match: {exact: execute_sql}
      when: {arguments: {opts.dry: {exact: "false"}}}
    - id: any-region
      action: deny
      match: {exact: execute_sql}
      when: {arguments: {region: {glob: "*"}}}
"""

    @inlineCallbacks
    def check(self, cases: list[tuple[Any, str | None]]) -> Any:
        """Call execute_sql with each arguments value; C{None}: allowed, else the denying rule."""
        for i, (arguments, ruleId) in enumerate(cases):
            reply = yield self.call(body=call("execute_sql", arguments, id=i))
            if ruleId is None:
                self.assertEqual(reply.status, 200, arguments)
            else:
                self.assertDenied(reply, i, ruleId)
        allowed = [json.dumps(a) for a, r in cases if r is None]
        self.assertEqual(
            [json.dumps(json.loads(s.body)["params"].get("arguments")) for s in self.upstream.seen],
            allowed,
        )
        self.assertEqual(
            self.audit("tool", "decision", "rule_id"),
            [("execute_sql", "deny" if r else "allow", r) for _, r in cases],
        )

    def test_regexOnNestedPath(self) -> Any:
        """target.query is the nested member query of target; the regex searches its text."""
        return self.check(
            [
                ({"target": {"query": "  DROP TABLE users"}}, "no-sql-writes"),
                ({"target": {"query": "delete from t", "db": "x"}}, "no-sql-writes"),
                ({"target": {"query": "select 1"}}, None),
                ({"query": "drop table users"}, None),  # not under target
                ({"target": "drop table users"}, None),  # target is not an object
                ({"target.query": "drop table users"}, None),  # a dot is a path, not a name
            ]
        )

    def test_numbersAndBooleansAsJSONText(self) -> Any:
        """A number matches by its JSON text (1000 and "1000" alike, 100 not), a boolean as true/false."""
        return self.check(
            [
                ({"limit": 1000}, "no-limit-1000"),
                ({"limit": "1000"}, "no-limit-1000"),
                ({"limit": 100}, None),
                ({"opts": {"dry": False}}, "no-wet-runs"),
                ({"opts": {"dry": "false"}}, "no-wet-runs"),
                ({"opts": {"dry": True}}, None),
            ]
        )

    def test_absentNeverMatches(self) -> Any:
        """Even glob "*" never matches an absent argument, a null, an object or an array, nor a call without arguments."""
        return self.check(
            [
                ({"region": "eu"}, "any-region"),
                ({"region": ""}, "any-region"),
                ({}, None),
                ({"region": None}, None),
                ({"region": {"name": "eu"}}, None),
                ({"region": ["eu"]}, None),
                (None, None),
            ]
        )


# -- method rules and default_action as a map --------------------------------------------------


class MethodRuleTests(CallerTestCase):
    """Rules for resources/read (by URI) and prompts/get (by name); a per-method default."""

    extraConfig = """
policy:
  default_action: {resources/read: deny, prompts/get: allow}
  rules:
    - {id: docs-only, action: allow, method: resources/read, match: {prefix: "file:///srv/docs/"}}
    - {id: no-leak, action: deny, method: prompts/get, match: {exact: leak}}
    - {id: no-shell, action: deny, match: {exact: shell_exec}}
"""

    def read(self, uri: str, id: int) -> Any:
        return self.call(body=rpc("resources/read", {"uri": uri}, id=id))

    def prompt(self, name: str, id: int) -> Any:
        return self.call(body=rpc("prompts/get", {"name": name, "arguments": {}}, id=id))

    @inlineCallbacks
    def test_resourcesReadByURI(self) -> Any:
        """resources/read is decided by its URI: the docs prefix is allowed, anything else is denied by the resources/read default (rule null), a tools/call rule never applies."""
        replies = [
            (yield self.read("file:///srv/docs/guide.md", 1)),
            (yield self.read("file:///srv/secret/keys.txt", 2)),
            (yield self.read("file:///srv/docs", 3)),
            (yield self.read("shell_exec", 4)),
        ]
        self.assertEqual(replies[0].status, 200)
        for reply, rid in zip(replies[1:], (2, 3, 4), strict=True):
            self.assertDenied(reply, rid, None)
        self.assertEqual(self.forwarded(), ["file:///srv/docs/guide.md"])
        self.assertEqual(
            self.audit("method", "target", "decision", "rule_id"),
            [
                ("resources/read", "file:///srv/docs/guide.md", "allow", "docs-only"),
                ("resources/read", "file:///srv/secret/keys.txt", "deny", None),
                ("resources/read", "file:///srv/docs", "deny", None),
                ("resources/read", "shell_exec", "deny", None),
            ],
        )

    @inlineCallbacks
    def test_promptsGetByName(self) -> Any:
        """prompts/get is decided by the prompt name; its default (allow) passes the rest, and a prompt named like a denied tool."""
        leak = yield self.prompt("leak", 1)
        self.assertDenied(leak, 1, "no-leak")
        for rid, name in ((2, "greet"), (3, "shell_exec")):
            reply = yield self.prompt(name, rid)
            self.assertEqual(reply.status, 200)
        self.assertEqual(self.forwarded(), ["greet", "shell_exec"])
        self.assertEqual(
            self.audit("method", "target", "decision", "rule_id"),
            [
                ("prompts/get", "leak", "deny", "no-leak"),
                ("prompts/get", "greet", "allow", None),
                ("prompts/get", "shell_exec", "allow", None),
            ],
        )

    @inlineCallbacks
    def test_toolsCallLeftOutOfTheMap(self) -> Any:
        """tools/call, left out of the map, defaults to allow; resources/read and prompts/get rules do not apply to tools of the same name; listings pass undecided."""
        replies = []
        for rid, tool in enumerate(("file:///srv/secret/keys.txt", "leak", "echo", "shell_exec")):
            replies.append((yield self.call(body=call(tool, id=rid))))
        self.assertEqual([r.status for r in replies[:3]], [200, 200, 200])
        self.assertDenied(replies[3], 3, "no-shell")
        reply = yield self.call(body=rpc("resources/list", id=9))
        self.assertEqual(reply.status, 200)
        self.assertEqual(len(self.upstream.seen), 4)
        self.assertEqual(
            self.audit("method", "decision", "rule_id")[-2:],
            [("tools/call", "deny", "no-shell"), ("resources/list", "allow", None)],
        )


class SingleDefaultTests(CallerTestCase):
    """C{default_action: deny} written as one action keeps its part-1 meaning."""

    extraConfig = """
policy:
  default_action: deny
  rules:
    - {id: echo-ok, action: allow, match: {exact: echo}}
"""

    @inlineCallbacks
    def test_decidesToolsCallOnly(self) -> Any:
        """Unmatched tools/call is denied, unmatched resources/read and prompts/get pass."""
        tool = yield self.call(body=call("read_file", id=1))
        self.assertDenied(tool, 1, None)
        read = yield self.call(body=rpc("resources/read", {"uri": "file:///etc/passwd"}, id=2))
        prompt = yield self.call(body=rpc("prompts/get", {"name": "anything"}, id=3))
        self.assertEqual((read.status, prompt.status), (200, 200))
        self.assertEqual(self.forwarded(), ["file:///etc/passwd", "anything"])
        self.assertEqual(
            self.audit("method", "decision"),
            [("tools/call", "deny"), ("resources/read", "allow"), ("prompts/get", "allow")],
        )


# -- listings per caller -----------------------------------------------------------------------

LISTING_POLICY = r"""
policy:
  rules:
    - {id: ci-no-admin, action: deny, match: {prefix: admin_}, when: {keys: [ci-bot]}}
    - {id: deploy-no-read, action: deny, match: {list: [read_file]}, when: {keys: ["deploy-*"]}}
    - id: big-echo
      action: deny
      match: {exact: echo}
      when: {arguments: {size: {regex: '^[0-9]{4,}$'}}}
    - id: ci-no-secret
      action: deny
      method: resources/read
      match: {prefix: "file:///srv/secret/"}
      when: {keys: [ci-bot]}
    - id: deploy-no-docs
      action: deny
      method: resources/read
      match: {prefix: "file:///srv/docs/"}
      when: {keys: ["deploy-*"]}
    - {id: ci-no-leak, action: deny, method: prompts/get, match: {exact: leak}, when: {keys: [ci-bot]}}
    - {id: deploy-no-g, action: deny, method: prompts/get, match: {glob: "g*"}, when: {keys: ["deploy-*"]}}
"""

#: What each key sees per listing method (the canned lists are in tests.support).
SEEN = {
    "ci-bot": {
        "tools/list": ["echo", "read_file", "deploy"],
        "resources/list": ["file:///srv/docs/guide.md", "file:///srv/docs/api.md"],
        "resources/templates/list": ["file:///srv/docs/{name}"],
        "prompts/list": ["greet", "summarise"],
    },
    "deploy-eu": {
        "tools/list": ["echo", "admin_reset", "deploy"],
        "resources/list": ["file:///srv/secret/keys.txt"],
        "resources/templates/list": ["file:///srv/secret/{name}"],
        "prompts/list": ["leak", "summarise"],
    },
}
KEY_OF = {"ci-bot": A, "deploy-eu": B}


class ListingPerCallerTests(CallerTestCase):
    """Listings filtered per caller (two API keys), as JSON and as SSE."""

    extraConfig = KEYS + LISTING_POLICY

    @inlineCallbacks
    def test_jsonListingsPerCaller(self) -> Any:
        """Each key gets each of the four JSON listings without what it may not call, cacheScope private, ttlMs kept, a correct Content-Length and filtered_tools counted."""
        expected = []
        for keyId, headers in KEY_OF.items():
            for rid, method in enumerate(LISTINGS):
                reply = yield self.call(
                    path="/mcp?mode=answer", body=rpc(method, id=rid), headers=headers
                )
                self.assertEqual(reply.status, 200)
                self.assertEqual(int(reply.header("content-length")[0]), len(reply.body))
                body = reply.json()
                self.assertEqual(body["id"], rid)
                result = body["result"]
                self.assertEqual(listed(result, method), SEEN[keyId][method], (keyId, method))
                self.assertEqual((result["cacheScope"], result["ttlMs"]), ("private", 60000))
                # The items kept are the upstream's, member for member.
                kind = LISTINGS[method][0]
                self.assertTrue(all(i in CANNED_RESULTS[method][kind] for i in result[kind]))
                removed = len(CANNED_RESULTS[method][kind]) - len(result[kind])
                expected.append((keyId, method, 200, removed))
        self.assertEqual(self.audit("principal", "method", "status", "filtered_tools"), expected)
        self.assertEqual(sum(x[3] for x in expected), 9)

    @inlineCallbacks
    def test_sseListingsPerCaller(self) -> Any:
        """In an SSE answer only the listing event is rewritten (filtered per key, cacheScope private, its id and event lines kept); every other event is relayed byte for byte."""
        expected = []
        for keyId, headers in KEY_OF.items():
            for rid, method in enumerate(LISTINGS):
                reply = yield self.call(
                    path="/mcp?mode=answersse", body=rpc(method, id=rid), headers=headers
                )
                self.assertEqual(reply.status, 200)
                self.assertTrue(reply.header("content-type")[0].startswith("text/event-stream"))
                sent, got = events(self.upstream.sent[-1]), events(reply.body)
                self.assertEqual(len(got), len(sent))
                for i, (a, b) in enumerate(zip(sent, got, strict=True)):
                    if i != ANSWER_EVENT:
                        self.assertEqual(a, b)
                answer = got[ANSWER_EVENT]
                self.assertTrue(answer.startswith(b"id: 7\nevent: message\ndata: "), answer)
                result = dataOf(answer)["result"]
                self.assertEqual(listed(result, method), SEEN[keyId][method], (keyId, method))
                self.assertEqual(result["cacheScope"], "private")
                kind = LISTINGS[method][0]
                expected.append(
                    (keyId, method, len(CANNED_RESULTS[method][kind]) - len(result[kind]))
                )
        self.assertEqual(self.audit("principal", "method", "filtered_tools"), expected)

    @inlineCallbacks
    def test_unfilteredCallerStillPrivate(self) -> Any:
        """A key no rule concerns sees every item, yet its answer's cacheScope becomes private: the policy depends on the caller, so a shared cache must not keep the full list."""
        for rid, method in enumerate(LISTINGS):
            reply = yield self.call(path="/mcp?mode=answer", body=rpc(method, id=rid), headers=C)
            result = reply.json()["result"]
            kind = LISTINGS[method][0]
            self.assertEqual(result[kind], CANNED_RESULTS[method][kind])
            self.assertEqual(result["cacheScope"], "private")
        self.assertEqual(self.audit("principal", "filtered_tools"), [("deployer", 0)] * 4)

    @inlineCallbacks
    def test_resourcesReadPrivate(self) -> Any:
        """A resources/read answer (JSON or SSE) depends on the caller too, who may read it being decided per caller: its public cacheScope becomes private, its contents unchanged."""
        body = rpc("resources/read", {"uri": "file:///srv/docs/guide.md"}, id=1)
        reply = yield self.call(path="/mcp?mode=answer", body=body, headers=A)
        self.assertEqual(reply.status, 200)
        results = [reply.json()["result"]]
        reply = yield self.call(path="/mcp?mode=answersse", body=body, headers=A)
        results.append(dataOf(events(reply.body)[ANSWER_EVENT])["result"])
        for result in results:
            self.assertEqual(result["contents"], CANNED_RESULTS["resources/read"]["contents"])
            self.assertEqual(result["cacheScope"], "private")
        self.assertEqual(
            self.audit("target", "filtered_tools"), [("file:///srv/docs/guide.md", None)] * 2
        )


class ListingNotByCallerTests(CallerTestCase):
    """Rules without caller conditions: listings are filtered alike for everyone, cacheScope stays public."""

    extraConfig = """
policy:
  rules:
    - {id: no-admin, action: deny, match: {prefix: admin_}}
    - {id: no-secret, action: deny, method: resources/read, match: {prefix: "file:///srv/secret/"}}
    - {id: big-echo, action: deny, match: {exact: echo}, when: {arguments: {size: {regex: "^[0-9]{4,}$"}}}}
"""

    @inlineCallbacks
    def test_publicStaysPublic(self) -> Any:
        """Listings filtered alike for everyone keep cacheScope public (JSON and SSE, other SSE events byte for byte); an arguments rule hides nothing; answers with nothing to filter (prompts/list, resources/read) are relayed byte for byte."""
        expected = {
            "tools/list": ["echo", "read_file", "deploy"],
            "resources/list": ["file:///srv/docs/guide.md", "file:///srv/docs/api.md"],
            "resources/templates/list": ["file:///srv/docs/{name}"],
            "prompts/list": ["greet", "leak", "summarise"],
        }
        for path in ("/mcp?mode=answer", "/mcp?mode=answersse"):
            for rid, method in enumerate(LISTINGS):
                reply = yield self.call(path=path, body=rpc(method, id=rid))
                if path.endswith("sse"):
                    got, sent = events(reply.body), events(self.upstream.sent[-1])
                    del got[ANSWER_EVENT], sent[ANSWER_EVENT]
                    self.assertEqual(got, sent)
                    result = dataOf(events(reply.body)[ANSWER_EVENT])["result"]
                else:
                    result = reply.json()["result"]
                self.assertEqual(listed(result, method), expected[method], (path, method))
                self.assertEqual(result["cacheScope"], "public", (path, method))
                if method == "prompts/list":
                    self.assertEqual(reply.body, self.upstream.sent[-1])
        body = rpc("resources/read", {"uri": "file:///srv/docs/guide.md"}, id=9)
        reply = yield self.call(path="/mcp?mode=answer", body=body)
        self.assertEqual(reply.body, self.upstream.sent[-1])
        self.assertEqual(
            self.audit("method", "filtered_tools")[:4],
            [
                ("tools/list", 1),
                ("resources/list", 1),
                ("resources/templates/list", 1),
                ("prompts/list", 0),
            ],
        )


# -- redact_results ----------------------------------------------------------------------------

RESULTS_POLICY = r"""
policy:
  rules:
    - id: scrub-report
      action: allow
      match: {exact: fetch_report}
      redact_results: [aws_access_key, '(?i)ssn:\s*\d{3}-\d{2}-\d{4}']
    - id: budget
      action: rate_limit
      match: {exact: fetch_budget}
      rate_limit: {rate: 10, burst: 100}
      redact_results: [aws_access_key]
    - id: scrub-docs
      action: allow
      method: resources/read
      match: {prefix: "file:///srv/docs/"}
      redact_results: [aws_access_key]
"""

#: The canned tools/call result as C{scrub-report} leaves it.
SCRUBBED = {
    "content": [
        {"type": "text", "text": "key=[REDACTED] [REDACTED]"},
        {"type": "image", "data": "aGVsbG8=", "mimeType": "image/png"},
        {"type": "text", "text": "nothing to hide"},
    ],
    "structuredContent": {"key": "[REDACTED]", "nested": [{"note": "id [REDACTED]"}], "n": 3},
    "isError": False,
}


class RedactResultsTests(CallerTestCase):
    """C{redact_results}: secrets scrubbed from results, in JSON and in SSE answers."""

    extraConfig = RESULTS_POLICY

    @inlineCallbacks
    def test_jsonResultScrubbed(self) -> Any:
        """content[].text and every string of structuredContent are scrubbed in a JSON answer (whole or chunked), with a correct Content-Length and redacted_results in the audit line."""
        for rid, path in enumerate(("/mcp?mode=answer", "/mcp?mode=answer&chunks=5")):
            reply = yield self.call(path=path, body=call("fetch_report", {"q": 1}, id=rid))
            self.assertEqual(reply.status, 200)
            self.assertEqual(int(reply.header("content-length")[0]), len(reply.body))
            self.assertEqual(reply.json(), {"jsonrpc": "2.0", "id": rid, "result": SCRUBBED})
            self.assertNotIn(SECRET.encode(), reply.body)
            self.assertNotIn(b"123-45-6789", reply.body)
            self.assertIn(SECRET.encode(), self.upstream.sent[-1])
        self.assertEqual(
            self.audit("tool", "decision", "rule_id", "redacted_results", "bytes_out"),
            [
                ("fetch_report", "allow", "scrub-report", 3, len(reply.body)),
                ("fetch_report", "allow", "scrub-report", 3, len(reply.body)),
            ],
        )

    @inlineCallbacks
    def test_sseResultScrubbed(self) -> Any:
        """In an SSE answer the result event is scrubbed (its id and event lines kept); the notifications and the server request around it, secret included, pass byte for byte."""
        reply = yield self.call(path="/mcp?mode=answersse", body=call("fetch_report", id=5))
        self.assertEqual(reply.status, 200)
        sent, got = events(self.upstream.sent[-1]), events(reply.body)
        self.assertEqual(len(got), len(sent))
        for i, (a, b) in enumerate(zip(sent, got, strict=True)):
            if i != ANSWER_EVENT:
                self.assertEqual(a, b)
        self.assertIn(SECRET.encode(), got[ANSWER_EVENT + 1])  # not a result: untouched
        self.assertIn(SECRET.encode(), got[2])  # a server request reusing the id: untouched
        answer = got[ANSWER_EVENT]
        self.assertTrue(answer.startswith(b"id: 7\nevent: message\ndata: "))
        self.assertEqual(dataOf(answer), {"jsonrpc": "2.0", "id": 5, "result": SCRUBBED})
        self.assertEqual(self.audit("redacted_results", "bytes_out"), [(3, len(reply.body))])

    @inlineCallbacks
    def test_onlyTheRulesCalls(self) -> Any:
        """A call no redact_results rule decides gets its result as the upstream sent it (JSON and SSE); redacted_results stays null."""
        reply = yield self.call(path="/mcp?mode=answer", body=call("echo", id=1))
        self.assertEqual(reply.body, self.upstream.sent[-1])
        reply = yield self.call(path="/mcp?mode=answersse", body=call("echo", id=2))
        self.assertEqual(reply.body, self.upstream.sent[-1])
        self.assertEqual(self.audit("rule_id", "redacted_results"), [(None, None)] * 2)

    @inlineCallbacks
    def test_rateLimitRuleScrubs(self) -> Any:
        """redact_results on a rate_limit rule scrubs the results of the calls it lets through."""
        reply = yield self.call(path="/mcp?mode=answer", body=call("fetch_budget", id=1))
        self.assertEqual(reply.json()["result"]["structuredContent"]["key"], "[REDACTED]")
        self.assertEqual(
            reply.json()["result"]["content"][0]["text"], "key=[REDACTED] ssn: 123-45-6789"
        )
        self.assertEqual(
            self.audit("decision", "rule_id", "redacted_results"), [("allow", "budget", 3)]
        )

    @inlineCallbacks
    def test_resourcesReadScrubbed(self) -> Any:
        """A resources/read rule's redact_results scrubs the text of the contents read."""
        body = rpc("resources/read", {"uri": "file:///srv/docs/guide.md"}, id=1)
        reply = yield self.call(path="/mcp?mode=answer", body=body)
        self.assertEqual(reply.json()["result"]["contents"][0]["text"], "aws [REDACTED]")
        self.assertEqual(
            self.audit("target", "rule_id", "redacted_results"),
            [("file:///srv/docs/guide.md", "scrub-docs", 1)],
        )


# -- rate_limit.per ----------------------------------------------------------------------------


class RateLimitPerTests(CallerTestCase):
    """Whose bucket a call takes from, by C{rate_limit.per} (one token, refilled after 100 s)."""

    extraConfig = (
        KEYS
        + """
policy:
  rules:
    - {id: by-default, action: rate_limit, match: {exact: t_default}, rate_limit: {rate: 0.01, burst: 1}}
    - {id: by-session, action: rate_limit, match: {exact: t_session}, rate_limit: {rate: 0.01, burst: 1, per: session}}
    - {id: by-key, action: rate_limit, match: {exact: t_key}, rate_limit: {rate: 0.01, burst: 1, per: key}}
    - {id: by-identity, action: rate_limit, match: {exact: t_identity}, rate_limit: {rate: 0.01, burst: 1, per: identity}}
    - {id: by-client, action: rate_limit, match: {exact: t_client}, rate_limit: {rate: 0.01, burst: 1, per: client}}
    - {id: by-global, action: rate_limit, match: {exact: t_global}, rate_limit: {rate: 0.01, burst: 1, per: global}}
"""
    )

    @inlineCallbacks
    def check(
        self, tool: str, ruleId: str, calls: list[tuple[dict[str, str], str | None, int]]
    ) -> Any:
        """Each call (key headers, session, expected status): 429s carry the rule and Retry-After."""
        for i, (headers, session, status) in enumerate(calls):
            h = dict(headers)
            if session is not None:
                h["Mcp-Session-Id"] = session
            reply = yield self.call(body=call(tool, id=i), headers=h)
            if status == 429:
                self.assertLimited(reply, i, ruleId, "100")
            else:
                self.assertEqual(reply.status, 200, i)
        self.assertEqual(len(self.upstream.seen), sum(s == 200 for _, _, s in calls))
        self.assertEqual(
            self.audit("decision", "rule_id", "status"),
            [("rate_limit" if s == 429 else "allow", ruleId, s) for _, _, s in calls],
        )

    def test_perSession(self) -> Any:
        """per: session: each session its own bucket (whatever the key); without a session, the key's."""
        return self.check(
            "t_session",
            "by-session",
            [
                (A, "s1", 200),
                (A, "s1", 429),
                (A, "s2", 200),
                (B, "s1", 429),
                (A, None, 200),
                (A, None, 429),
                (B, None, 200),
            ],
        )

    def test_defaultIsSession(self) -> Any:
        """Without per, buckets are per session."""
        return self.check(
            "t_default", "by-default", [(A, "s1", 200), (A, "s1", 429), (A, "s2", 200)]
        )

    def test_perKey(self) -> Any:
        """per: key: one bucket per API key, shared by its sessions; two keys do not share."""
        return self.check(
            "t_key",
            "by-key",
            [(A, "s1", 200), (A, "s2", 429), (B, "s1", 200), (B, None, 429), (C, "s1", 200)],
        )

    def test_perIdentity(self) -> Any:
        """per: identity: the principal (here the key id) owns the bucket."""
        return self.check(
            "t_identity", "by-identity", [(A, "s1", 200), (A, "s2", 429), (B, "s1", 200)]
        )

    def test_perClient(self) -> Any:
        """per: client: every caller from 127.0.0.1 shares the address's bucket, keys and sessions alike."""
        return self.check("t_client", "by-client", [(A, "s1", 200), (B, "s2", 429), (C, None, 429)])

    def test_perGlobal(self) -> Any:
        """per: global: one bucket for all callers."""
        return self.check("t_global", "by-global", [(A, "s1", 200), (B, "s2", 429), (C, None, 429)])

    @inlineCallbacks
    def test_rulesDoNotShareBuckets(self) -> Any:
        """Each rule has its own buckets: emptying per-global does not touch per-client."""
        yield self.check("t_global", "by-global", [(A, "s1", 200), (A, "s1", 429)])
        reply = yield self.call(body=call("t_client"), headers=A)
        self.assertEqual(reply.status, 200)


# -- the principal in the span -----------------------------------------------------------------


class PrincipalSpanTests(CallerTestCase):
    """The span of a request carries the principal as C{enduser.id} (real OTLP/HTTP export)."""

    extraConfig = (
        KEYS + "policy:\n  rules:\n    - {id: no-shell, action: deny, match: {exact: shell_exec}}\n"
    )

    def setUp(self) -> Any:
        self.receiver = OTLPReceiver().start()
        self.addCleanup(self.receiver.stop)
        return super().setUp()

    def configText(self) -> str:
        return super().configText() + (
            f"telemetry: {{otlp_endpoint: '{self.receiver.endpoint}', service_name: t}}\n"
        )

    @inlineCallbacks
    def test_enduserIsThePrincipal(self) -> Any:
        """Allowed and denied calls' spans carry enduser.id = the audit line's principal (the key id); an unauthenticated request's span has none."""
        yield self.call(body=call("echo", id=1), headers=A)
        yield self.call(body=call("shell_exec", id=2), headers=B)
        yield self.call(body=call("echo", id=3))
        yield self.service.telemetry.flush()
        spans = {s["attributes"]["request_id"]: s["attributes"] for s in self.receiver.spans}
        lines = self.auditLines()
        self.assertEqual([x["principal"] for x in lines], ["ci-bot", "deploy-eu", None])
        got = [
            (
                spans[x["request_id"]].get("enduser.id"),
                spans[x["request_id"]]["mcp.policy.decision"],
            )
            for x in lines
        ]
        self.assertEqual(got, [("ci-bot", "allow"), ("deploy-eu", "deny"), (None, "allow")])


# -- what a client reads is what the transforms saw --------------------------------------------


class AnswerFormTests(CallerTestCase):
    """
    Listings per caller and C{redact_results} hold whatever form the upstream's answer takes that
    a client still reads as an answer: compressed (the client asked for gzip, as httpx does by
    default, and the upstream compresses, as compressing middleware does), a media type in
    another case (media types are case-insensitive; the MCP SDK lower-cases it), another 2xx
    status (the MCP SDK reads the body of every 2xx but 202).
    """

    extraConfig = KEYS + LISTING_POLICY + RESULTS_POLICY.replace("policy:\n  rules:\n", "")

    def decoded(self, reply: Reply) -> bytes:
        """The body as the client reads it (a gzip Content-Encoding undone)."""
        if reply.header("content-encoding") == ["gzip"]:
            return gzip.decompress(reply.body)
        return reply.body

    @inlineCallbacks
    def test_gzipListing(self) -> Any:
        """
        A client that accepts gzip (httpx's default): an answer mcpgw must inspect is asked for
        uncompressed (Accept-Encoding: identity upstream), and the listing is filtered for its key.
        """
        gz = {"Accept-Encoding": "gzip", **A}
        reply = yield self.call(path="/mcp?mode=answer&gzip=1", body=rpc("tools/list"), headers=gz)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.upstream.seen[-1].header("accept-encoding"), ["identity"])
        tools = listed(json.loads(self.decoded(reply))["result"], "tools/list")
        self.assertEqual(tools, SEEN["ci-bot"]["tools/list"])

    @inlineCallbacks
    def test_gzipResult(self) -> Any:
        """The same for a tools/call answer under redact_results: it is scrubbed."""
        gz = {"Accept-Encoding": "gzip", **A}
        path = "/mcp?mode=answer&gzip=1"
        reply = yield self.call(path=path, body=call("fetch_report"), headers=gz)
        self.assertEqual(reply.status, 200)
        self.assertEqual(json.loads(self.decoded(reply))["result"], SCRUBBED)

    @inlineCallbacks
    def test_encodedAnywayFailsClosed(self) -> Any:
        """
        An upstream that gzips an answer mcpgw must inspect although it was asked not to: 502
        upstream_bad_response with the id, never the unfiltered answer.
        """
        for body in (rpc("tools/list", id=5), call("fetch_report", id=5)):
            reply = yield self.call(path="/mcp?mode=answer&gzip=force", body=body, headers=A)
            self.assertEqual(reply.status, 502)
            self.assertEqual(reply.json()["id"], 5)
            self.assertEqual(reply.json()["error"]["message"], "upstream_bad_response")
        self.assertEqual(self.auditLines()[-1]["error"], "upstream_bad_response")

    @inlineCallbacks
    def test_uninspectedAnswersKeepTheClientsEncoding(self) -> Any:
        """An answer no transform touches is relayed as the upstream encoded it."""
        gz = {"Accept-Encoding": "gzip", **A}
        body = call("echo", {"text": "x"}, id=6)
        reply = yield self.call(path="/mcp?mode=answer&gzip=1", body=body, headers=gz)
        self.assertEqual(self.upstream.seen[-1].header("accept-encoding"), ["gzip"])
        self.assertEqual((reply.status, reply.header("content-encoding")), (200, ["gzip"]))

    @inlineCallbacks
    def test_mediaTypeInAnotherCase(self) -> Any:
        """An SSE answer typed Text/Event-Stream is an SSE answer: its listing and result events are transformed, the others relayed byte for byte."""
        path = "/mcp?mode=answersse&ctype=Text/Event-Stream"
        reply = yield self.call(path=path, body=rpc("tools/list", id=1), headers=A)
        got = events(reply.body)
        self.assertEqual(len(got), len(events(self.upstream.sent[-1])))
        tools = listed(dataOf(got[ANSWER_EVENT])["result"], "tools/list")
        self.assertEqual(tools, SEEN["ci-bot"]["tools/list"])
        reply = yield self.call(path=path, body=call("fetch_report", id=2), headers=A)
        self.assertEqual(dataOf(events(reply.body)[ANSWER_EVENT])["result"], SCRUBBED)

    @inlineCallbacks
    def test_otherSuccessStatus(self) -> Any:
        """A listing answered with 203 (JSON or SSE) is filtered like a 200 one, and a 203 result is scrubbed."""
        reply = yield self.call(
            path="/mcp?mode=answer&status=203", body=rpc("tools/list", id=1), headers=A
        )
        self.assertEqual(reply.status, 203)
        tools = listed(reply.json()["result"], "tools/list")
        self.assertEqual(tools, SEEN["ci-bot"]["tools/list"])
        reply = yield self.call(
            path="/mcp?mode=answersse&status=203", body=rpc("tools/list", id=2), headers=A
        )
        self.assertEqual(reply.status, 203)
        tools = listed(dataOf(events(reply.body)[ANSWER_EVENT])["result"], "tools/list")
        self.assertEqual(tools, SEEN["ci-bot"]["tools/list"])
        reply = yield self.call(
            path="/mcp?mode=answer&status=203", body=call("fetch_report", id=3), headers=A
        )
        self.assertEqual(reply.json()["result"], SCRUBBED)


def readEvents(port: int, path: str, body: bytes, headers: dict[str, str], n: int) -> bytes:
    """POST, read C{n} SSE events of the answer, then close the connection (blocking)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        hdrs = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        conn.request("POST", path, body=body, headers={**hdrs, **headers})
        resp = conn.getresponse()
        data = b""
        while data.count(b"\n\n") < n:
            line = resp.readline()
            if not line:
                break
            data += line
        return data
    finally:
        conn.close()


class ClientLeavesTests(CallerTestCase):
    """A client that closes an SSE answer once it has what it needs (the MCP SDK does)."""

    extraConfig = KEYS + LISTING_POLICY + RESULTS_POLICY.replace("policy:\n  rules:\n", "")

    @inlineCallbacks
    def test_countsKeptWhenTheClientLeaves(self) -> Any:
        """The client reads the answer event and leaves while the upstream's stream is still open: the audit line still counts filtered_tools and redacted_results (error client_closed)."""
        for body in (rpc("tools/list", id=1), call("fetch_report", id=2)):
            data = yield threads.deferToThread(
                readEvents, self.port, "/mcp?mode=answersse&hold=1", body, A, ANSWER_EVENT + 2
            )
            self.assertEqual(len(events(data)), ANSWER_EVENT + 2)
            self.assertNotIn(b"admin_reset", data)
            self.assertNotIn(SECRET.encode(), events(data)[ANSWER_EVENT])
            yield self.service.gateway.whenIdle()
        self.assertEqual(
            self.audit("method", "status", "error", "filtered_tools", "redacted_results"),
            [
                ("tools/list", 200, "client_closed", 1, None),
                ("tools/call", 200, "client_closed", None, 3),
            ],
        )
