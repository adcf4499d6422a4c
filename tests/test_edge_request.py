"""
The request edge through the real gateway (real sockets; raw ones where a client library would
merge or refuse what an attacker sends): duplicate singleton headers, MCP 2026-07-28 header
validation, the gateway's credentials never forwarded, redaction that cannot be sidestepped,
bodies that parse two ways, and ids on every refusal.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks

from tests.support import GatewayTestCase, Reply, rpc
from tests.test_auth import KEY_A, KEY_B, keysYaml
from tests.test_policy_gateway import POLICY

MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN}


def raw(port: int, lines: list[tuple[str, str]], body: bytes, path: str = "/mcp") -> Reply:
    """
    One request written byte for byte on a socket: C{lines} exactly as given (duplicates
    included), then C{Content-Length} unless C{lines} has one.
    """
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    head += ["Accept: application/json, text/event-stream"]
    head += [f"{k}: {v}" for k, v in lines]
    if not any(k.lower() == "content-length" for k, _ in lines):
        head.append(f"Content-Length: {len(body)}")
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        data = resp.read()
        return Reply(resp.status, resp.getheaders(), data, [], 0.0)
    finally:
        s.close()


def modernCall(tool: str, arguments: Any, id: Any = 1) -> bytes:
    return rpc("tools/call", {"name": tool, "arguments": arguments, "_meta": META}, id=id)


def modernHeaders(
    method: str = "tools/call", name: str | None = None, **extra: str
) -> dict[str, str]:
    h = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if name is not None:
        h["Mcp-Name"] = name
    h.update(extra)
    return h


class EdgeTestCase(GatewayTestCase):
    def rawCall(self, lines: list[tuple[str, str]], body: bytes, path: str = "/mcp") -> Any:
        return threads.deferToThread(raw, self.port, lines, body, path)

    def assertRefused(
        self, reply: Reply, status: int, code: int, message: str, id: Any
    ) -> dict[str, Any]:
        """The gateway's own JSON-RPC error, audited; the upstream never saw the request."""
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.header("content-type"), ["application/json"])
        body = reply.json()
        self.assertEqual(
            (body["id"], body["error"]["code"], body["error"]["message"]), (id, code, message)
        )
        self.assertEqual(self.upstream.seen, [])
        line: dict[str, Any] = self.auditLines()[-1]
        self.assertEqual((line["status"], line["error"], line["jsonrpc_id"]), (status, message, id))
        return line


class DuplicateHeaderTests(EdgeTestCase):
    SINGLETONS = (
        ("Authorization", "Bearer one", "Bearer two"),
        ("Host", "127.0.0.1", "localhost"),
        ("Origin", "http://localhost", "https://evil.example"),
        ("Mcp-Session-Id", "s-1", "s-2"),
        ("MCP-Protocol-Version", "2025-11-25", MODERN),
        ("Mcp-Method", "tools/call", "tools/list"),
        ("Mcp-Name", "echo", "shell_exec"),
    )

    @inlineCallbacks
    def test_singletonsTwiceAreRefused(self) -> Any:
        """
        Each header that must appear once, sent twice (same or different values): 400
        duplicate_header with the request's id, audited with the method and tool, never forwarded.
        """
        for i, (name, first, second) in enumerate(self.SINGLETONS):
            for values in ((first, second), (first, first)):
                body = rpc("tools/call", {"name": "echo", "arguments": {}}, id=i)
                lines = [(name, v) for v in values]
                if name == "Host":
                    body = body  # the helper's own Host is then a third copy
                reply = yield self.rawCall(lines, body)
                line = self.assertRefused(reply, 400, -32600, "duplicate_header", i)
                self.assertEqual((line["method"], line["tool"]), ("tools/call", "echo"), name)

    @inlineCallbacks
    def test_contentLengthTwice(self) -> Any:
        """Two Content-Length headers (equal or not) get a 400 JSON-RPC error, not a guess."""
        body = rpc("ping", id=3)
        for values in ((len(body), len(body)), (len(body), len(body) + 5)):
            reply = yield self.rawCall([("Content-Length", str(v)) for v in values], body)
            self.assertEqual(reply.status, 400)
            self.assertEqual(reply.json()["error"]["code"], -32600)
        self.assertEqual(self.upstream.seen, [])
        self.assertEqual([ln["status"] for ln in self.auditLines()], [400, 400])

    @inlineCallbacks
    def test_oneOfEachPasses(self) -> Any:
        """The same headers once each are forwarded as before."""
        lines = [(name, first) for name, first, _ in self.SINGLETONS if name not in ("Host",)]
        lines = [(k, v) for k, v in lines if k not in ("Mcp-Method", "Mcp-Name")]
        reply = yield self.rawCall(lines, rpc("ping", id=4))
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(len(self.upstream.seen), 1)


class ForwardedHeaderTests(EdgeTestCase):
    @inlineCallbacks
    def test_clientAddressClaimsDoNotPass(self) -> Any:
        """A client's Forwarded and X-Real-IP never reach the upstream; X-Forwarded-For is extended."""
        yield self.call(
            body=rpc("ping"),
            headers={
                "Forwarded": "for=10.9.9.9;proto=https",
                "X-Real-IP": "10.9.9.9",
                "X-Forwarded-For": "10.1.1.1",
            },
        )
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.header("forwarded"), [])
        self.assertEqual(seen.header("x-real-ip"), [])
        self.assertEqual(seen.header("x-forwarded-for"), ["10.1.1.1, 127.0.0.1"])


class AmbiguousBodyTests(EdgeTestCase):
    extraConfig = POLICY

    @inlineCallbacks
    def test_duplicateKeysAreRefused(self) -> Any:
        """
        A body whose objects repeat a key (the tool name, the method, an argument) is refused with
        400 before policy: mcpgw cannot know which copy the upstream will read.
        """
        bodies = [
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
            b'"params":{"name":"shell_exec","name":"echo","arguments":{}}}',
            b'{"jsonrpc":"2.0","id":2,"method":"tools/call","method":"ping",'
            b'"params":{"name":"shell_exec","arguments":{}}}',
            b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call", '
            b'"params": {"name": "echo", "arguments": {"a": 1, "a": 2}}}',
            b'[{"jsonrpc":"2.0","id":4,"method":"ping"},'
            b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"x","name":"echo"}}]',
        ]
        for i, body in enumerate(bodies, 1):
            reply = yield self.call(body=body)
            self.assertEqual(reply.status, 400, body)
            err = reply.json()
            if i < 4:
                self.assertEqual(err["id"], i)
            self.assertEqual(err["error"]["message"], "invalid_request")
            self.assertIn("duplicate key", err["error"]["data"]["detail"])
        self.assertEqual(self.upstream.seen, [])
        self.assertEqual([ln["status"] for ln in self.auditLines()], [400] * 4)

    @inlineCallbacks
    def test_spacedBodyWithoutDuplicatesPassesByteForByte(self) -> Any:
        """A body that is not compact JSON but has no duplicate is forwarded unchanged."""
        body = (
            b'{ "jsonrpc" : "2.0", "id": 6, "method": "tools/call",\n "params": {"name": "echo"} }'
        )
        reply = yield self.call(body=body)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.upstream.seen[-1].body, body)

    @inlineCallbacks
    def test_deepNestingIs400NotA500(self) -> Any:
        """
        Arguments nested past the documented depth under a redact rule: 400 invalid_request with
        the id (the redaction walk and re-serialisation never see it); past orjson's own limit:
        400 parse_error.
        """
        deep: Any = "Bearer abc"
        for _ in range(200):
            deep = {"k": deep}
        reply = yield self.call(
            body=rpc("tools/call", {"name": "http_get", "arguments": deep}, id=9)
        )
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.json()["id"], 9)
        self.assertIn("nested deeper than 64", reply.json()["error"]["data"]["detail"])
        body = (
            b'{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{"name":"http_get","arguments":'
            + b"[" * 5000
            + b"]" * 5000
            + b"}}"
        )
        reply = yield self.call(body=body)
        self.assertEqual((reply.status, reply.json()["error"]["message"]), (400, "parse_error"))
        self.assertEqual(
            [ln["error"] for ln in self.auditLines()], ["invalid_request", "parse_error"]
        )
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_nestingWithinTheLimitIsRedacted(self) -> Any:
        """Just inside the limit, a nested secret is still found and redacted."""
        deep: Any = "Bearer abc.def"
        for _ in range(60):
            deep = [deep]
        reply = yield self.call(
            body=rpc("tools/call", {"name": "http_get", "arguments": {"a": deep}})
        )
        self.assertEqual(reply.status, 200)
        self.assertNotIn(b"abc.def", self.upstream.seen[-1].body)


class RedactionBypassTests(EdgeTestCase):
    extraConfig = POLICY

    @inlineCallbacks
    def test_batchParamHeadersRedacted(self) -> Any:
        """In a batch, Mcp-Param-* headers are redacted with the rule that redacted a call."""
        secret = "Bearer abc.def-123"
        batch = json.dumps(
            [
                json.loads(rpc("ping", id=1)),
                json.loads(
                    rpc("tools/call", {"name": "http_get", "arguments": {"t": secret}}, id=2)
                ),
            ]
        ).encode()
        reply = yield self.call(body=batch, headers={"Mcp-Param-T": secret})
        self.assertEqual(reply.status, 200)
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.header("mcp-param-t"), ["[REDACTED]"])
        self.assertNotIn(b"abc.def", seen.body)

    @inlineCallbacks
    def test_everyValueOfRepeatedParamHeadersRedacted(self) -> Any:
        """Repeated Mcp-Param-* headers: every value is scrubbed, not only the first."""
        secret = "Bearer abc.def-123"
        encoded = "=?base64?" + base64.b64encode(secret.encode()).decode() + "?="
        reply = yield self.rawCall(
            [("Mcp-Param-T", "harmless"), ("Mcp-Param-T", secret), ("Mcp-Param-T", encoded)],
            rpc("tools/call", {"name": "http_get", "arguments": {"t": secret}}),
        )
        self.assertEqual(reply.status, 200)
        values = self.upstream.seen[-1].header("mcp-param-t")
        self.assertEqual(values[:2], ["harmless", "[REDACTED]"])
        self.assertEqual(base64.b64decode(values[2][9:-2]), b"[REDACTED]")

    @inlineCallbacks
    def test_objectKeysScrubbed(self) -> Any:
        """A secret used as an object key inside the arguments is redacted too."""
        reply = yield self.call(
            body=rpc(
                "tools/call",
                {"name": "http_get", "arguments": {"headers": {"Bearer abc.def-123": "x"}}},
            )
        )
        self.assertEqual(reply.status, 200)
        args = json.loads(self.upstream.seen[-1].body)["params"]["arguments"]
        self.assertEqual(args, {"headers": {"[REDACTED]": "x"}})
        self.assertEqual(self.auditLines()[-1]["redacted"], 1)

    @inlineCallbacks
    def test_paramHeaderRedactedEvenWhenTheBodyHadNoMatch(self) -> Any:
        """A redact rule scrubs Mcp-Param-* values even when the arguments held no secret."""
        yield self.call(
            body=rpc("tools/call", {"name": "http_get", "arguments": {"t": "plain"}}),
            headers={"Mcp-Param-T": "Bearer abc.def"},
        )
        self.assertEqual(self.upstream.seen[-1].header("mcp-param-t"), ["[REDACTED]"])


class CredentialTests(EdgeTestCase):
    """With API keys on: no mcpgw key reaches the upstream, whatever header carries it."""

    def configText(self) -> str:
        return super().configText() + keysYaml(("ci-bot", KEY_A), ("other", KEY_B))

    @inlineCallbacks
    def test_keysNeverForwarded(self) -> Any:
        """
        The presented key, another configured (verified) key, and key-shaped decoys, in custom
        headers, cookies, repeated headers and with auth schemes: all removed; other values of the
        same headers pass untouched.
        """
        # KEY_B verified once (it is a valid key of this gateway), then used as a smuggled value.
        ok = yield self.call(body=rpc("ping"), headers={"Authorization": f"Bearer {KEY_B}"})
        self.assertEqual(ok.status, 200)
        decoy = "mcpgw_" + "Z" * 43
        shapes = [
            ("X-Api-Key", KEY_A),
            ("X-Api-Key", "harmless-value"),
            ("X-Auth-Token", f"Bearer {KEY_A}"),
            ("Cookie", f"session=abc; token={KEY_A}"),
            ("X-Other-Key", KEY_B),
            ("X-Other-Auth", f"Token {KEY_B}"),
            ("X-Decoy", decoy),
            ("X-Decoy-Short", "mcpgw_notakey1"),
            ("Mcp-Session-Id", KEY_A),
            ("X-Custom", "kept"),
            ("Proxy-Authorization", f"Bearer {KEY_A}"),
        ]
        reply = yield self.rawCall(
            [("Authorization", f"Bearer {KEY_A}"), *shapes], rpc("ping", id=2)
        )
        self.assertEqual(reply.status, 200, reply.body)
        seen = self.upstream.seen[-1]
        sent = "\n".join(f"{k}: {v}" for k, v in seen.headers)
        for secret in (KEY_A, KEY_B, decoy, "mcpgw_"):
            self.assertNotIn(secret, sent)
        self.assertEqual(seen.header("x-api-key"), ["harmless-value"])
        self.assertEqual(seen.header("x-custom"), ["kept"])
        self.assertEqual(seen.header("authorization"), ["Bearer upstream-secret"])

    @inlineCallbacks
    def test_manyShapesUnderLoad(self) -> Any:
        """A thousand requests mixing 20 header shapes: not one upstream request carries a key."""

        def run() -> list[Reply]:
            out = []
            names = ["X-Api-Key", "X-Token", "Cookie", "X-Auth", "Api-Key"]
            forms = ["{k}", "Bearer {k}", "Basic {k}", "k={k}"]
            for i in range(1000):
                name = names[i % len(names)]
                form = forms[(i // len(names)) % len(forms)]
                key = (KEY_A, KEY_B, "mcpgw_" + "q" * 40)[i % 3]
                out.append(
                    raw(
                        self.port,
                        [("Authorization", f"Bearer {KEY_A}"), (name, form.format(k=key))],
                        rpc("ping", id=i),
                    )
                )
            return out

        replies = yield threads.deferToThread(run)
        self.assertEqual({r.status for r in replies}, {200})
        self.assertEqual(len(self.upstream.seen), 1000)
        leaked = [s for s in self.upstream.seen if any("mcpgw_" in v for _, v in s.headers)]
        self.assertEqual(leaked, [])


class HeaderValidationTests(EdgeTestCase):
    """MCP 2026-07-28: Mcp-Method, Mcp-Name, MCP-Protocol-Version and Mcp-Param-* against the body."""

    @inlineCallbacks
    def listTools(self, version: str = MODERN) -> Any:
        reply = yield self.call(
            path="/mcp?mode=xtools",
            body=rpc(
                "tools/list",
                {"_meta": {**META, "io.modelcontextprotocol/protocolVersion": version}},
            ),
            headers={"MCP-Protocol-Version": version, "Mcp-Method": "tools/list"},
        )
        self.assertEqual(reply.status, 200, reply.body)
        return [t["name"] for t in reply.json()["result"]["tools"]]

    @inlineCallbacks
    def test_matchingHeadersPass(self) -> Any:
        """Method, name and version that agree with the body: forwarded byte for byte."""
        body = modernCall("echo", {"text": "x"}, id=1)
        reply = yield self.call(body=body, headers=modernHeaders(name="echo"))
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(self.upstream.seen[-1].body, body)

    @inlineCallbacks
    def test_mismatchesAreRefused(self) -> Any:
        """Each disagreement or missing required header: 400 -32020 header_mismatch, with the id."""
        call = modernCall("read_file", {"path": "/etc/motd"}, id=7)
        cases: list[tuple[bytes, dict[str, str]]] = [
            (call, modernHeaders(name="shell_exec")),
            (call, modernHeaders(method="tools/list", name="read_file")),
            (call, modernHeaders()),  # Mcp-Name missing
            (call, {"MCP-Protocol-Version": MODERN, "Mcp-Name": "read_file"}),  # Mcp-Method missing
            (call, modernHeaders(name="=?base64?c2hlbGxfZXhlYw==?=")),  # base64 of shell_exec
            (call, modernHeaders(name="=?base64?not base64!?=")),
            (
                rpc(
                    "tools/call",
                    {
                        "name": "read_file",
                        "_meta": {**META, "io.modelcontextprotocol/protocolVersion": "2099-01-01"},
                    },
                    id=7,
                ),
                modernHeaders(name="read_file"),
            ),
            (
                rpc("resources/read", {"uri": "file:///a", "_meta": META}, id=7),
                modernHeaders(method="resources/read", name="file:///b"),
            ),
            (
                rpc("prompts/get", {"name": "p", "_meta": META}, id=7),
                modernHeaders(method="prompts/get", name="q"),
            ),
        ]
        for body, headers in cases:
            reply = yield self.call(body=body, headers=headers)
            line = self.assertRefused(reply, 400, -32020, "header_mismatch", 7)
            self.assertEqual(line["decision"], "allow")  # refused before policy

    @inlineCallbacks
    def test_base64NameDecoded(self) -> Any:
        """An Mcp-Name in the base64 sentinel form is decoded before comparing."""
        name = "résumé_tool"
        encoded = "=?base64?" + base64.b64encode(name.encode()).decode() + "?="
        reply = yield self.call(body=modernCall(name, {}), headers=modernHeaders(name=encoded))
        self.assertEqual(reply.status, 200, reply.body)

    @inlineCallbacks
    def test_olderVersionsNotValidated(self) -> Any:
        """With an older or absent MCP-Protocol-Version, these headers are not checked."""
        body = rpc("tools/call", {"name": "read_file", "arguments": {}}, id=2)
        for version in ("2025-11-25", None):
            headers = {"Mcp-Method": "tools/list", "Mcp-Name": "shell_exec"}
            if version:
                headers["MCP-Protocol-Version"] = version
            reply = yield self.call(body=body, headers=headers)
            self.assertEqual(reply.status, 200)
        self.assertEqual(len(self.upstream.seen), 2)

    @inlineCallbacks
    def test_batchIsRefused(self) -> Any:
        """2026-07-28 has no batches: a batch claiming it is refused (400 invalid_request)."""
        batch = (
            b"["
            + rpc("ping", {"_meta": META}, id=1)
            + b","
            + rpc("ping", {"_meta": META}, id=2)
            + b"]"
        )
        reply = yield self.call(body=batch, headers=modernHeaders(method="ping"))
        self.assertEqual(reply.status, 400)
        self.assertEqual([e["error"]["message"] for e in reply.json()], ["invalid_request"] * 2)
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_invalidAnnotationLeftOutForModernClients(self) -> Any:
        """
        A tool with an invalid x-mcp-header annotation is left out of a 2026-07-28 client's
        tools/list answer; an older client's answer is unchanged.
        """
        names = yield self.listTools()
        self.assertEqual(names, ["execute_sql", "echo"])
        self.assertEqual(self.auditLines()[-1]["filtered_tools"], 1)
        names = yield self.listTools("2025-11-25")
        self.assertEqual(names, ["execute_sql", "bad_items", "echo"])

    @inlineCallbacks
    def test_invalidAnnotationLeftOutOfSSEAnswers(self) -> Any:
        """The same in an SSE answer: the result event rewritten, other events byte for byte."""
        reply = yield self.call(
            path="/mcp?mode=xtoolsse",
            body=rpc("tools/list", {"_meta": META}),
            headers=modernHeaders(method="tools/list"),
        )
        self.assertEqual(reply.status, 200)
        events = reply.body.decode().split("\n\n")
        self.assertEqual(events[0], 'event: message\ndata: {"jsonrpc":"2.0","method":"x"}')
        listed = json.loads(events[1].removeprefix("data: "))
        self.assertEqual([t["name"] for t in listed["result"]["tools"]], ["execute_sql", "echo"])
        # and what was listed over SSE is enforced
        reply = yield self.call(
            body=modernCall("execute_sql", {"region": "us"}, id=3),
            headers=modernHeaders(name="execute_sql", **{"Mcp-Param-Region": "eu"}),
        )
        self.assertEqual((reply.status, reply.json()["error"]["code"]), (400, -32020))

    @inlineCallbacks
    def test_paramHeadersCheckedAfterListing(self) -> Any:
        """
        Once the upstream listed execute_sql with x-mcp-header annotations, its Mcp-Param-*
        headers must agree with the arguments: strings exactly, integers numerically, booleans
        as true/false, nested paths, base64 decoded; a missing one or one without a body value is
        a mismatch. Before the listing, the headers are not checked.
        """
        args = {
            "region": "us-west1",
            "limit": 42,
            "dry": True,
            "target": {"db": "main"},
            "query": "q",
        }
        good = {
            "Mcp-Param-Region": "us-west1",
            "Mcp-Param-Limit": "42.0",
            "Mcp-Param-Dry": "true",
            "Mcp-Param-Db": "main",
        }
        # not yet listed: a wrong header passes (nothing known to check against)
        reply = yield self.call(
            body=modernCall("execute_sql", args, id=1),
            headers=modernHeaders(name="execute_sql", **{**good, "Mcp-Param-Region": "eu"}),
        )
        self.assertEqual(reply.status, 200)
        yield self.listTools()
        self.upstream.seen.clear()
        reply = yield self.call(
            body=modernCall("execute_sql", args, id=2),
            headers=modernHeaders(name="execute_sql", **good),
        )
        self.assertEqual(reply.status, 200, reply.body)
        encoded = {
            **good,
            "Mcp-Param-Region": "=?base64?" + base64.b64encode(b"us-west1").decode() + "?=",
        }
        reply = yield self.call(
            body=modernCall("execute_sql", args, id=3),
            headers=modernHeaders(name="execute_sql", **encoded),
        )
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(len(self.upstream.seen), 2)
        self.upstream.seen.clear()
        bad: list[dict[str, str]] = [
            {**good, "Mcp-Param-Region": "eu-west1"},
            {**good, "Mcp-Param-Limit": "43"},
            {**good, "Mcp-Param-Limit": "42.5"},
            {**good, "Mcp-Param-Dry": "True"},
            {**good, "Mcp-Param-Db": "other"},
            {k: v for k, v in good.items() if k != "Mcp-Param-Region"},
            {**good, "Mcp-Param-Region": "=?base64?%%%?="},
        ]
        for headers in bad:
            reply = yield self.call(
                body=modernCall("execute_sql", args, id=7),
                headers=modernHeaders(name="execute_sql", **headers),
            )
            self.assertRefused(reply, 400, -32020, "header_mismatch", 7)
        # a header for an argument the body does not carry
        reply = yield self.call(
            body=modernCall("execute_sql", {"query": "q"}, id=7),
            headers=modernHeaders(name="execute_sql", **{"Mcp-Param-Region": "us-west1"}),
        )
        self.assertRefused(reply, 400, -32020, "header_mismatch", 7)
        # a null value needs no header
        reply = yield self.call(
            body=modernCall("execute_sql", {"region": None, "query": "q"}, id=8),
            headers=modernHeaders(name="execute_sql"),
        )
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_repeatedParamHeaderIsAMismatch(self) -> Any:
        """Two Mcp-Param-Region headers for an annotated argument: refused."""
        yield self.listTools()
        self.upstream.seen.clear()
        reply = yield self.rawCall(
            [
                ("MCP-Protocol-Version", MODERN),
                ("Mcp-Method", "tools/call"),
                ("Mcp-Name", "execute_sql"),
                ("Mcp-Param-Region", "us-west1"),
                ("Mcp-Param-Region", "eu-west1"),
            ],
            modernCall("execute_sql", {"region": "us-west1"}, id=5),
        )
        self.assertRefused(reply, 400, -32020, "header_mismatch", 5)


class InspectLimitTests(EdgeTestCase):
    @inlineCallbacks
    def test_answerTooLargeToInspectIs502(self) -> Any:
        """
        An answer mcpgw must inspect (a tools/list) larger than it reads whole: 502
        upstream_bad_response with the id, not held in memory, not relayed unfiltered.
        """
        from mcpgw.proxy import exchange

        self.patch(exchange, "INSPECT_MAX_BYTES", 1000)
        reply = yield self.call(path="/mcp?mode=big&size=5000", body=rpc("tools/list", id=4))
        self.assertEqual(reply.status, 502)
        self.assertEqual(
            (reply.json()["id"], reply.json()["error"]["message"]), (4, "upstream_bad_response")
        )
        # an answer nothing inspects is relayed whatever its size
        reply = yield self.call(path="/mcp?mode=big&size=5000", body=rpc("ping", id=5))
        self.assertEqual((reply.status, len(reply.body)), (200, 5000))
