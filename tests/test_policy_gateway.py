"""
Policy through the real gateway (real sockets, scripted recording upstream): deny, redact,
rate_limit, default deny, batches, tools/list filtering, audit fields, and reload.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks

from tests.support import GatewayTestCase, rpc

POLICY = r"""
policy:
  default_action: allow
  rules:
    - {id: no-shell, action: deny, match: {exact: shell_exec}}
    - {id: no-admin, action: deny, match: {prefix: admin_}}
    - id: scrub-http
      action: redact
      match: {glob: "http_*"}
      redact: [bearer, openai_key, aws_access_key, jwt, '(?i)password=\S+']
    - {id: slow-search, action: rate_limit, match: {regex: '^search(_.*)?$'}, rate_limit: {rate: 0.5, burst: 2}}
    - {id: read-only, action: allow, match: {list: [read_file, list_dir]}}
"""


def call(tool: str, arguments: Any = None, id: Any = 1) -> bytes:
    return rpc("tools/call", {"name": tool, "arguments": arguments or {}}, id=id)


class PolicyGatewayTests(GatewayTestCase):
    extraConfig = POLICY

    @inlineCallbacks
    def test_denyExact(self) -> Any:
        """A denied call gets 403 -32001 with the rule id and the request id; upstream untouched."""
        reply = yield self.call(body=call("shell_exec", id=42))
        self.assertEqual(reply.status, 403)
        self.assertEqual(
            reply.json(),
            {
                "jsonrpc": "2.0",
                "id": 42,
                "error": {
                    "code": -32001,
                    "message": "policy_denied",
                    "data": {"rule_id": "no-shell"},
                },
            },
        )
        self.assertEqual(self.upstream.seen, [])
        line = self.auditLines()[-1]
        self.assertEqual(
            (line["decision"], line["rule_id"], line["status"], line["tool"]),
            ("deny", "no-shell", 403, "shell_exec"),
        )

    @inlineCallbacks
    def test_denyPrefix(self) -> Any:
        """The prefix matcher denies admin_*."""
        reply = yield self.call(body=call("admin_reset"))
        self.assertEqual(reply.json()["error"]["data"], {"rule_id": "no-admin"})
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_allowListAndDefault(self) -> Any:
        """A list rule allows with its id; an unmatched tool gets the default (allow, no rule)."""
        reply = yield self.call(body=call("read_file"))
        self.assertEqual(reply.status, 200)
        reply = yield self.call(body=call("echo"))
        self.assertEqual(reply.status, 200)
        lines = self.auditLines()
        self.assertEqual(
            [(x["decision"], x["rule_id"]) for x in lines],
            [("allow", "read-only"), ("allow", None)],
        )

    @inlineCallbacks
    def test_otherMethodsPass(self) -> Any:
        """Methods other than tools/call are not subject to rules."""
        reply = yield self.call(body=rpc("resources/read", {"uri": "shell_exec"}))
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.auditLines()[-1]["decision"], "allow")

    @inlineCallbacks
    def test_redactEachBuiltinAndRegex(self) -> Any:
        """Each built-in and the custom regex are replaced in nested string arguments before forwarding."""
        jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlX2hlcmU"
        args = {
            "headers": {"Authorization": "Bearer abc.def-123"},
            "body": ["key sk-proj-ABCDEFGHIJKLMNOPQRSTUV12", {"aws": "AKIAIOSFODNN7EXAMPLE"}],
            "token": jwt,
            "form": "user=bob password=hunter2 next",
            "count": 5,
            "clean": "nothing secret",
        }
        reply = yield self.call(body=call("http_get", args, id=9))
        self.assertEqual(reply.status, 200)
        seen = self.upstream.seen[-1]
        forwarded = json.loads(seen.body)
        self.assertEqual(int(seen.header("content-length")[0]), len(seen.body))
        got = forwarded["params"]["arguments"]
        self.assertEqual(got["headers"]["Authorization"], "[REDACTED]")
        self.assertEqual(got["body"], ["key [REDACTED]", {"aws": "[REDACTED]"}])
        self.assertEqual(got["token"], "[REDACTED]")
        self.assertEqual(got["form"], "user=bob [REDACTED] next")
        self.assertEqual((got["count"], got["clean"]), (5, "nothing secret"))
        self.assertEqual(forwarded["id"], 9)
        for secret in (b"abc.def-123", b"sk-proj", b"AKIA", b"eyJ", b"hunter2"):
            self.assertNotIn(secret, seen.body)
        line = self.auditLines()[-1]
        self.assertEqual(
            (line["decision"], line["rule_id"], line["redacted"]), ("redact", "scrub-http", 5)
        )
        self.assertNotIn("hunter2", json.dumps(line))

    @inlineCallbacks
    def test_redactNothingForwardsBytesUnchanged(self) -> Any:
        """A redact rule that finds nothing forwards the client's bytes as they were."""
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"http_get","arguments":{"url":"x"}}}'
        yield self.call(body=body)
        self.assertEqual(self.upstream.seen[-1].body, body)
        self.assertEqual(self.auditLines()[-1]["redacted"], 0)

    @inlineCallbacks
    def test_rateLimitFractional(self) -> Any:
        """rate 0.5/s burst 2: two calls pass, the third gets 429, Retry-After 2, rule id."""
        for i in range(2):
            reply = yield self.call(body=call("search_web", id=i), headers={"Mcp-Session-Id": "s1"})
            self.assertEqual(reply.status, 200)
        reply = yield self.call(body=call("search_web", id=3), headers={"Mcp-Session-Id": "s1"})
        self.assertEqual(reply.status, 429)
        self.assertEqual(reply.header("retry-after"), ["2"])
        self.assertEqual(
            reply.json(),
            {
                "jsonrpc": "2.0",
                "id": 3,
                "error": {
                    "code": -32002,
                    "message": "rate_limited",
                    "data": {"rule_id": "slow-search"},
                },
            },
        )
        # another session has its own bucket
        reply = yield self.call(body=call("search_web"), headers={"Mcp-Session-Id": "s2"})
        self.assertEqual(reply.status, 200)
        self.assertEqual(len(self.upstream.seen), 3)
        lines = self.auditLines()
        self.assertEqual([x["decision"] for x in lines], ["allow", "allow", "rate_limit", "allow"])
        self.assertEqual({x["rule_id"] for x in lines}, {"slow-search"})

    @inlineCallbacks
    def test_batchWithDeniedCallIsRefusedWhole(self) -> Any:
        """A batch with one denied call is refused as a whole; each request gets the error."""
        body = json.dumps(
            [
                json.loads(call("echo", id=1)),
                json.loads(call("shell_exec", id=2)),
                {"jsonrpc": "2.0", "method": "notifications/x"},
            ]
        ).encode()
        reply = yield self.call(body=body)
        self.assertEqual(reply.status, 403)
        self.assertEqual(
            [(r["id"], r["error"]["data"]["rule_id"]) for r in reply.json()],
            [(1, "no-shell"), (2, "no-shell")],
        )
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_toolsListFilteredJSON(self) -> Any:
        """A JSON tools/list answer leaves out denied tools, with a correct Content-Length."""
        reply = yield self.call(path="/mcp?mode=tools", body=rpc("tools/list", id=5))
        names = [t["name"] for t in reply.json()["result"]["tools"]]
        self.assertEqual(names, ["echo", "http_get", "search_web", "read_file"])
        self.assertEqual(int(reply.header("content-length")[0]), len(reply.body))
        self.assertEqual(self.auditLines()[-1]["filtered_tools"], 2)

    @inlineCallbacks
    def test_toolsListFilteredSSE(self) -> Any:
        """An SSE tools/list answer: the notification passes, the answer event is filtered."""
        reply = yield self.call(path="/mcp?mode=toolsse", body=rpc("tools/list", id=5))
        events = [ln for ln in reply.body.split(b"\n") if ln.startswith(b"data:")]
        self.assertEqual(events[0], b'data: {"jsonrpc":"2.0","method":"notifications/message"}')
        names = [t["name"] for t in json.loads(events[1][5:])["result"]["tools"]]
        self.assertEqual(names, ["echo", "http_get", "search_web", "read_file"])
        self.assertEqual(self.auditLines()[-1]["filtered_tools"], 2)


class DefaultDenyTests(GatewayTestCase):
    """default_action: deny is an explicit allowlist."""

    extraConfig = "policy:\n  default_action: deny\n  rules:\n    - {id: ok, action: allow, match: {list: [echo]}}\n"

    @inlineCallbacks
    def test_onlyListedToolsPass(self) -> Any:
        """Listed tools pass; anything else is denied with rule_id null; tools/list shows only echo."""
        reply = yield self.call(body=call("echo"))
        self.assertEqual(reply.status, 200)
        reply = yield self.call(body=call("read_file"))
        self.assertEqual(reply.status, 403)
        self.assertEqual(reply.json()["error"]["data"], {"rule_id": None})
        reply = yield self.call(path="/mcp?mode=tools", body=rpc("tools/list"))
        self.assertEqual([t["name"] for t in reply.json()["result"]["tools"]], ["echo"])
        self.assertEqual(self.auditLines()[1]["decision"], "deny")


class FilterOffTests(GatewayTestCase):
    extraConfig = POLICY.replace(
        "default_action: allow", "default_action: allow\n  filter_tools_list: false"
    )

    @inlineCallbacks
    def test_filterOffPassesBytes(self) -> Any:
        """filter_tools_list: false relays the tools/list answer untouched."""
        reply = yield self.call(path="/mcp?mode=tools", body=rpc("tools/list"))
        self.assertEqual(len(reply.json()["result"]["tools"]), 6)


class PolicyReloadTests(GatewayTestCase):
    extraConfig = POLICY

    reloadable = True

    @inlineCallbacks
    def test_reloadChangesDecisionsAndKeepsBuckets(self) -> Any:
        """A reload that denies echo takes effect at once; an unchanged rate-limit rule keeps its bucket."""
        for _ in range(2):
            yield self.call(body=call("search_web"), headers={"Mcp-Session-Id": "s"})
        with open(self.configPath, "w") as f:
            f.write(
                self.configText().replace(
                    "match: {exact: shell_exec}", "match: {list: [shell_exec, echo]}"
                )
            )
        self.service.reload()
        self.assertEqual(self.service.generation.number, 2)
        reply = yield self.call(body=call("echo"))
        self.assertEqual(reply.status, 403)
        reply = yield self.call(body=call("search_web"), headers={"Mcp-Session-Id": "s"})
        self.assertEqual(reply.status, 429)  # the bucket emptied before the reload carried over

    @inlineCallbacks
    def test_brokenReloadKeepsPolicy(self) -> Any:
        """A reload with a bad regex is rejected; the old policy keeps deciding."""
        with open(self.configPath, "w") as f:
            f.write(self.configText().replace("'^search(_.*)?$'", "'(unclosed'"))
        self.service.reload()
        self.assertEqual(self.service.generation.number, 1)
        reply = yield self.call(body=call("shell_exec"))
        self.assertEqual(reply.status, 403)


class ParamHeaderRedactionTests(GatewayTestCase):
    """MCP 2026-07-28 mirrors arguments into Mcp-Param-* headers: they are redacted the same way."""

    extraConfig = POLICY

    @inlineCallbacks
    def test_paramHeadersRedactedLikeTheBody(self) -> Any:
        """Plain and base64-encoded Mcp-Param-* values lose the secret; other headers are untouched."""
        import base64

        secret = "Bearer abc.def-123"
        encoded = "=?base64?" + base64.b64encode(f"x {secret}".encode()).decode() + "?="
        yield self.call(
            body=call("http_get", {"token": secret, "note": f"x {secret}"}),
            headers={"Mcp-Param-Token": secret, "Mcp-Param-Note": encoded, "Mcp-Name": "http_get"},
        )
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.header("mcp-param-token"), ["[REDACTED]"])
        (note,) = seen.header("mcp-param-note")
        self.assertTrue(note.startswith("=?base64?"))
        self.assertEqual(base64.b64decode(note[9:-2]).decode(), "x [REDACTED]")
        self.assertEqual(seen.header("mcp-name"), ["http_get"])
        self.assertEqual(
            json.loads(seen.body)["params"]["arguments"],
            {"token": "[REDACTED]", "note": "x [REDACTED]"},
        )
