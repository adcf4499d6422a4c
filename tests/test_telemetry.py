"""
Spans through the real gateway (real sockets: client -> gateway -> scripted upstream; the
gateway's exporter thread -> an in-test OTLP/HTTP receiver decoding with opentelemetry-proto):
span content for each outcome, the audit line join, trace-context propagation both ways, and
serving with the receiver down or slow.
"""

from __future__ import annotations

import json
import time
from typing import Any

from argon2 import PasswordHasher
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from mcpgw import __version__
from mcpgw.telemetry import SpanExporter
from tests.otlpreceiver import OTLPReceiver
from tests.support import GatewayTestCase, freePort, rpc

POLICY = r"""
policy:
  default_action: allow
  rules:
    - {id: no-shell, action: deny, match: {exact: shell_exec}}
    - {id: scrub-http, action: redact, match: {glob: "http_*"}, redact: [bearer]}
    - {id: slow-search, action: rate_limit, match: {prefix: search}, rate_limit: {rate: 0.01, burst: 1}}
"""

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
META_TRACE = "0af7651916cd43dd8448eb211c80319c"
META_SPAN = "b7ad6b7169203331"


def call(tool: str, arguments: Any = None, id: Any = 1, meta: Any = None) -> bytes:
    params: dict[str, Any] = {"name": tool, "arguments": arguments or {}}
    if meta is not None:
        params["_meta"] = meta
    return rpc("tools/call", params, id=id)


class TracingTestCase(GatewayTestCase):
    """A gateway exporting to an in-test receiver, with a policy and a dead second upstream."""

    extraConfig = POLICY
    serviceName = "mcpgw-test"

    def setUp(self) -> Any:
        self.receiver = OTLPReceiver().start()
        self.addCleanup(self.receiver.stop)
        self.deadPort = freePort()
        return super().setUp()

    def endpoint(self) -> str | None:
        return self.receiver.endpoint

    def configText(self) -> str:
        text = (
            super()
            .configText()
            .replace(
                "audit:",
                f"  - {{name: dead, url: 'http://127.0.0.1:{self.deadPort}/mcp', path: /dead}}\naudit:",
                1,
            )
        )
        endpoint = self.endpoint()
        if endpoint is not None:
            text += (
                f"telemetry: {{otlp_endpoint: '{endpoint}', service_name: {self.serviceName},"
                " environment: test}\n"
            )
        return text

    @inlineCallbacks
    def spans(self) -> Any:
        """Every span received once the gateway's queue is flushed."""
        yield self.service.telemetry.flush()
        return list(self.receiver.spans)

    @inlineCallbacks
    def spanAndLine(self, index: int = -1) -> Any:
        """The audit line at C{index} and the span with its request_id."""
        spans = yield self.spans()
        line = self.auditLines()[index]
        matching = [s for s in spans if s["attributes"]["request_id"] == line["request_id"]]
        self.assertEqual(len(matching), 1, (line, spans))
        return matching[0], line

    def assertJoined(self, span: dict[str, Any], line: dict[str, Any]) -> None:
        """The span and the audit line describe the same request."""
        self.assertEqual(span["attributes"]["request_id"], line["request_id"])
        self.assertEqual(span["trace_id"], line["trace_id"])
        self.assertEqual(span["span_id"], line["span_id"])


class SpanContentTests(TracingTestCase):
    """One SERVER span per request, named and attributed for Datadog."""

    @inlineCallbacks
    def test_allowedCall(self) -> Any:
        """An allowed tools/call: its name, resource, every attribute, and the audit join."""
        body = call("echo", {"text": "hi"}, id=7)
        reply = yield self.call(
            body=body, headers={"Mcp-Session-Id": "s-1", "MCP-Protocol-Version": "2025-06-18"}
        )
        self.assertEqual(reply.status, 200)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        self.assertEqual(span["name"], "tools/call echo")
        self.assertEqual(span["kind"], 2)  # SERVER
        self.assertEqual(span["status"], (0, ""))
        self.assertEqual(span["parent_span_id"], "")
        self.assertEqual(span["flags"], 0x101)  # sampled; parent not remote (root)
        self.assertEqual(span["scope"], ("mcpgw", __version__))
        resource = span["resource"]
        self.assertEqual(resource["service.name"], "mcpgw-test")
        self.assertEqual(resource["service.version"], __version__)
        self.assertEqual(resource["deployment.environment.name"], "test")
        attrs = span["attributes"]
        expected = {
            "resource.name": "tools/call echo",
            "operation.name": "mcp.server.request",
            "mcp.method.name": "tools/call",
            "mcp.tool.name": "echo",
            "gen_ai.tool.name": "echo",
            "gen_ai.operation.name": "execute_tool",
            "jsonrpc.request.id": "7",
            "mcp.protocol.version": "2025-06-18",
            "mcp.session.id": "s-1",
            "mcp.policy.decision": "allow",
            "mcp.upstream": "up",
            "mcp.payload.bytes_in": len(body),
            "mcp.payload.bytes_out": line["bytes_out"],
            "network.protocol.name": "http",
            "network.transport": "tcp",
            "client.address": "127.0.0.1",
            "http.request.method": "POST",
            "http.response.status_code": 200,
            "url.path": "/mcp",
            "url.scheme": "http",
            "request_id": line["request_id"],
        }
        self.assertEqual({k: attrs.get(k) for k in expected}, expected)
        for absent in ("error.type", "mcp.error.kind", "mcp.policy.rule_id", "mcp.auth.key_id"):
            self.assertNotIn(absent, attrs)
        # byte counts are ints (Datadog measures), not strings
        self.assertIsInstance(attrs["mcp.payload.bytes_out"], int)
        duration_ms = (span["end"] - span["start"]) / 1e6
        self.assertTrue(0 < duration_ms < 5000, duration_ms)
        self.assertLess(abs(duration_ms - line["duration_ms"]), 5)
        self.assertLess(abs(span["end"] / 1e9 - time.time()), 30)

    @inlineCallbacks
    def test_sessionIdOnlyFromAHeader(self) -> Any:
        """Without an Mcp-Session-Id header either way, the span has no mcp.session.id."""
        reply = yield self.call(path="/mcp?mode=status&code=202", body=rpc("ping", id=None))
        self.assertEqual(reply.status, 202)
        span, line = yield self.spanAndLine()
        self.assertIsNone(line["session_id"])
        self.assertNotIn("mcp.session.id", span["attributes"])
        self.assertNotIn("jsonrpc.request.id", span["attributes"])
        self.assertEqual(span["name"], "ping")

    @inlineCallbacks
    def test_sessionIdFromTheUpstream(self) -> Any:
        """The session id the upstream assigned in its answer is on the span, as in the audit line."""
        yield self.call(body=rpc("initialize", {}))
        span, line = yield self.spanAndLine()
        self.assertEqual(span["attributes"]["mcp.session.id"], "up-session")
        self.assertEqual(line["session_id"], "up-session")
        self.assertNotIn("gen_ai.operation.name", span["attributes"])

    @inlineCallbacks
    def test_deny(self) -> Any:
        """A denial: status UNSET, no error.type; decision, rule, kind and JSON-RPC code as tags."""
        reply = yield self.call(body=call("shell_exec", id="a"))
        self.assertEqual(reply.status, 403)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        attrs = span["attributes"]
        self.assertEqual(span["name"], "tools/call shell_exec")
        self.assertEqual(span["status"], (0, ""))
        self.assertNotIn("error.type", attrs)
        self.assertEqual(attrs["mcp.policy.decision"], "deny")
        self.assertEqual(attrs["mcp.policy.rule_id"], "no-shell")
        self.assertEqual(attrs["mcp.error.kind"], "policy_denied")
        self.assertEqual(attrs["rpc.response.status_code"], "-32001")
        self.assertEqual(attrs["http.response.status_code"], 403)
        self.assertEqual(attrs["jsonrpc.request.id"], "a")
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_redact(self) -> Any:
        """A redacted call: decision redact and the number of rewritten values (an int)."""
        reply = yield self.call(body=call("http_get", {"h": "Bearer abcdefghijklmnopqrstuvwxyz"}))
        self.assertEqual(reply.status, 200)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        attrs = span["attributes"]
        self.assertEqual(attrs["mcp.policy.decision"], "redact")
        self.assertEqual(attrs["mcp.policy.rule_id"], "scrub-http")
        self.assertEqual(attrs["mcp.policy.redacted"], 1)
        self.assertEqual(span["status"], (0, ""))

    @inlineCallbacks
    def test_rateLimited(self) -> Any:
        """A rate-limited call: 429, decision rate_limit, status UNSET."""
        first = yield self.call(body=call("search_web"))
        second = yield self.call(body=call("search_web"))
        self.assertEqual((first.status, second.status), (200, 429))
        spans = yield self.spans()
        self.assertEqual(len(spans), 2)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        attrs = span["attributes"]
        self.assertEqual(attrs["mcp.policy.decision"], "rate_limit")
        self.assertEqual(attrs["mcp.policy.rule_id"], "slow-search")
        self.assertEqual(attrs["http.response.status_code"], 429)
        self.assertEqual(attrs["rpc.response.status_code"], "-32002")
        self.assertEqual(span["status"], (0, ""))
        self.assertEqual(spans[0]["attributes"]["mcp.policy.decision"], "allow")
        self.assertEqual(spans[0]["attributes"]["mcp.policy.rule_id"], "slow-search")

    @inlineCallbacks
    def test_upstreamErrorStatus(self) -> Any:
        """An upstream 5xx relayed to the client: ERROR with error.type = the HTTP status."""
        reply = yield self.call(path="/mcp?mode=status&code=503", body=call("echo"))
        self.assertEqual(reply.status, 503)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        self.assertEqual(span["status"], (2, "upstream answered HTTP 503"))
        self.assertEqual(span["attributes"]["error.type"], "503")
        self.assertEqual(span["attributes"]["http.response.status_code"], 503)

    @inlineCallbacks
    def test_upstreamUnavailable(self) -> Any:
        """No upstream listening: 502, ERROR, error.type is the JSON-RPC code, kind the name."""
        reply = yield self.call(path="/dead", body=call("echo"))
        self.assertEqual(reply.status, 502)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        attrs = span["attributes"]
        self.assertEqual(span["status"], (2, "upstream_unavailable"))
        self.assertEqual(attrs["error.type"], "-32010")
        self.assertEqual(attrs["rpc.response.status_code"], "-32010")
        self.assertEqual(attrs["mcp.error.kind"], "upstream_unavailable")
        self.assertEqual(attrs["mcp.upstream"], "dead")

    @inlineCallbacks
    def test_upstreamTimeout(self) -> Any:
        """An upstream that never answers: 504 and an ERROR span."""
        reply = yield self.call(path="/mcp?mode=hang", body=call("echo"))
        self.assertEqual(reply.status, 504)
        span, _ = yield self.spanAndLine()
        self.assertEqual(span["status"], (2, "upstream_timeout"))
        self.assertEqual(span["attributes"]["error.type"], "-32011")

    @inlineCallbacks
    def test_upstreamResetMidStream(self) -> Any:
        """An SSE answer cut by the upstream: the client saw 200, the span is ERROR upstream_reset."""
        yield self.call(path="/mcp?mode=reset", body=call("echo"))
        yield deferLater(reactor, 0.3, lambda: None)
        span, line = yield self.spanAndLine()
        self.assertEqual(line["error"], "upstream_reset")
        self.assertEqual(span["status"], (2, "upstream_reset"))
        self.assertEqual(span["attributes"]["error.type"], "upstream_reset")
        self.assertEqual(span["attributes"]["http.response.status_code"], 200)

    @inlineCallbacks
    def test_sseCall(self) -> Any:
        """A tools/call answered with SSE: one span at the end of the stream, bytes_out counted."""
        reply = yield self.call(path="/mcp?mode=sse&n=3&gap=0.02", body=call("echo", id=3))
        self.assertEqual(reply.status, 200)
        self.assertEqual(sum(1 for _, line in reply.chunks if line.startswith(b"data:")), 3)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        self.assertEqual(span["name"], "tools/call echo")
        self.assertEqual(span["attributes"]["mcp.payload.bytes_out"], line["bytes_out"])
        self.assertGreater(line["bytes_out"], 0)
        self.assertGreaterEqual((span["end"] - span["start"]) / 1e9, 0.04)

    @inlineCallbacks
    def test_getStream(self) -> Any:
        """A GET server stream has no JSON-RPC method: the span is named "GET /mcp"."""
        reply = yield self.call("GET", path="/mcp?mode=sse&n=2&gap=0.01")
        self.assertEqual(reply.status, 200)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        self.assertEqual(span["name"], "GET /mcp")
        self.assertEqual(span["attributes"]["resource.name"], "GET /mcp")
        self.assertEqual(span["attributes"]["http.request.method"], "GET")
        self.assertNotIn("mcp.method.name", span["attributes"])

    @inlineCallbacks
    def test_unknownPath(self) -> Any:
        """Off the MCP paths (404) the name is the HTTP method alone: scans mint no resources."""
        reply = yield self.call(path="/nope/123", body=call("echo"))
        self.assertEqual(reply.status, 404)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        self.assertEqual(span["name"], "POST")
        self.assertEqual(span["attributes"]["url.path"], "/nope/123")
        self.assertNotIn("mcp.upstream", span["attributes"])
        self.assertEqual(span["status"], (0, ""))

    @inlineCallbacks
    def test_batch(self) -> Any:
        """A batch: named after its first request, with its size."""
        body = json.dumps([json.loads(call("echo", id=1)), json.loads(call("read_file", id=2))])
        reply = yield self.call(body=body.encode())
        self.assertEqual(reply.status, 200)
        span, _ = yield self.spanAndLine()
        self.assertEqual(span["name"], "tools/call echo")
        self.assertEqual(span["attributes"]["jsonrpc.batch.size"], 2)
        self.assertNotIn("jsonrpc.request.id", span["attributes"])

    @inlineCallbacks
    def test_oneSpanPerRequest(self) -> Any:
        """Every request on an MCP path gets exactly one span, each with its own ids."""
        for i in range(5):
            yield self.call(body=call("echo", id=i))
        spans = yield self.spans()
        lines = self.auditLines()
        self.assertEqual(len(spans), 5)
        self.assertEqual(
            sorted((s["trace_id"], s["span_id"]) for s in spans),
            sorted((x["trace_id"], x["span_id"]) for x in lines),
        )
        self.assertEqual(len({s["trace_id"] for s in spans}), 5)


class AuthSpanTests(TracingTestCase):
    """Spans of authenticated and refused requests."""

    def setUp(self) -> Any:
        self.key = "mcpgw_test_key_0123456789"
        hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        self.extraConfig = (
            f"auth: {{enabled: true, keys: [{{id: k1, hash: '{hasher.hash(self.key)}'}}]}}\n"
        )
        return super().setUp()

    @inlineCallbacks
    def test_authenticated(self) -> Any:
        """A good key: the key id and result ok are on the span."""
        reply = yield self.call(body=call("echo"), headers={"Authorization": f"Bearer {self.key}"})
        self.assertEqual(reply.status, 200)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        self.assertEqual(span["name"], "tools/call echo")
        self.assertEqual(span["attributes"]["mcp.auth.key_id"], "k1")
        self.assertEqual(span["attributes"]["mcp.auth.result"], "ok")

    @inlineCallbacks
    def test_missingKey(self) -> Any:
        """No key: 401, auth result missing, the generic name, status UNSET."""
        reply = yield self.call(body=call("echo"))
        self.assertEqual(reply.status, 401)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        attrs = span["attributes"]
        self.assertEqual(span["name"], "POST /mcp")
        self.assertEqual(attrs["mcp.auth.result"], "missing")
        self.assertEqual(attrs["mcp.error.kind"], "unauthenticated")
        self.assertEqual(attrs["rpc.response.status_code"], "-32003")
        self.assertEqual(attrs["mcp.method.name"], "tools/call")
        self.assertEqual(span["status"], (0, ""))
        self.assertNotIn("error.type", attrs)
        self.assertNotIn("mcp.auth.key_id", attrs)

    @inlineCallbacks
    def test_invalidKey(self) -> Any:
        """A wrong key: 401 with auth result invalid."""
        reply = yield self.call(body=call("echo"), headers={"Authorization": "Bearer nope"})
        self.assertEqual(reply.status, 401)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        self.assertEqual(span["attributes"]["mcp.auth.result"], "invalid")


class PropagationTests(TracingTestCase):
    """W3C trace context in, the gateway span's context out (headers and SEP-414 _meta)."""

    @inlineCallbacks
    def test_headerContextContinued(self) -> Any:
        """The HTTP traceparent is the parent; the upstream gets the gateway span as its parent."""
        reply = yield self.call(
            body=call("echo"),
            headers={
                "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
                "tracestate": "vendor=abc",
            },
        )
        self.assertEqual(reply.status, 200)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        self.assertEqual(span["trace_id"], CALLER_TRACE)
        self.assertEqual(span["parent_span_id"], CALLER_SPAN)
        self.assertEqual(span["trace_state"], "vendor=abc")
        self.assertEqual(span["flags"], 0x301)  # sampled, remote parent
        self.assertEqual(span["links"], [])
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.header("traceparent"), [f"00-{CALLER_TRACE}-{span['span_id']}-01"])
        self.assertEqual(seen.header("tracestate"), ["vendor=abc"])

    @inlineCallbacks
    def test_metaContextWinsAndLinksTheHeader(self) -> Any:
        """_meta.traceparent is the parent, the differing header context a link; only W3C keys change."""
        meta = {
            "traceparent": f"00-{META_TRACE}-{META_SPAN}-01",
            "tracestate": "m=1",
            "baggage": "k=v",
            "progressToken": 5,
        }
        reply = yield self.call(
            body=call("echo", {"q": 1}, meta=meta),
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        )
        self.assertEqual(reply.status, 200)
        span, line = yield self.spanAndLine()
        self.assertJoined(span, line)
        self.assertEqual(span["trace_id"], META_TRACE)
        self.assertEqual(span["parent_span_id"], META_SPAN)
        self.assertEqual(span["trace_state"], "m=1")
        self.assertEqual(
            [(x["trace_id"], x["span_id"]) for x in span["links"]], [(CALLER_TRACE, CALLER_SPAN)]
        )
        seen = self.upstream.seen[-1]
        ours = f"00-{META_TRACE}-{span['span_id']}-01"
        self.assertEqual(seen.header("traceparent"), [ours])
        self.assertEqual(seen.header("tracestate"), ["m=1"])
        forwarded = json.loads(seen.body)
        self.assertEqual(
            forwarded["params"]["_meta"],
            {"traceparent": ours, "tracestate": "m=1", "baggage": "k=v", "progressToken": 5},
        )
        self.assertEqual(forwarded["params"]["arguments"], {"q": 1})
        # bytes_in is the client's body, before the rewrite
        self.assertEqual(line["bytes_in"], len(call("echo", {"q": 1}, meta=meta)))

    @inlineCallbacks
    def test_sameContextNoLink(self) -> Any:
        """The same context in _meta and in the header: no link."""
        tp = f"00-{META_TRACE}-{META_SPAN}-01"
        yield self.call(body=call("echo", meta={"traceparent": tp}), headers={"traceparent": tp})
        span, _ = yield self.spanAndLine()
        self.assertEqual(span["links"], [])
        self.assertEqual(span["parent_span_id"], META_SPAN)
        # no tracestate came in: none goes out, in _meta or in the headers
        seen = self.upstream.seen[-1]
        self.assertNotIn("tracestate", json.loads(seen.body)["params"]["_meta"])
        self.assertEqual(seen.header("tracestate"), [])

    @inlineCallbacks
    def test_bodyWithoutContextForwardedByteForByte(self) -> Any:
        """A body without _meta.traceparent is forwarded unchanged; only the header carries the span."""
        body = (
            b'{"jsonrpc":"2.0",  "id":1, "method":"tools/call",'
            b' "params":{"name":"echo","arguments":{"s":"\\u00e9 x"},"_meta":{"progressToken":1}}}'
        )
        reply = yield self.call(body=body, headers={"traceparent": "garbage", "tracestate": "x=1"})
        self.assertEqual(reply.status, 200)
        span, _ = yield self.spanAndLine()
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.body, body)
        self.assertEqual(span["parent_span_id"], "")
        self.assertEqual(
            seen.header("traceparent"), [f"00-{span['trace_id']}-{span['span_id']}-01"]
        )
        self.assertEqual(seen.header("tracestate"), [])

    @inlineCallbacks
    def test_invalidMetaContextReplaced(self) -> Any:
        """An invalid _meta.traceparent is not a parent (the header is) but is still replaced."""
        yield self.call(
            body=call("echo", meta={"traceparent": "00-zz", "other": True}),
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        )
        span, _ = yield self.spanAndLine()
        self.assertEqual(span["parent_span_id"], CALLER_SPAN)
        self.assertEqual(span["links"], [])
        meta = json.loads(self.upstream.seen[-1].body)["params"]["_meta"]
        self.assertEqual(
            meta, {"traceparent": f"00-{CALLER_TRACE}-{span['span_id']}-01", "other": True}
        )

    @inlineCallbacks
    def test_batchMetaInjectedWhereItWas(self) -> Any:
        """In a batch, only the messages that carried _meta.traceparent get the new context."""
        tp = f"00-{META_TRACE}-{META_SPAN}-01"
        body = json.dumps(
            [
                json.loads(call("echo", id=1)),
                json.loads(call("read_file", id=2, meta={"traceparent": tp})),
            ]
        ).encode()
        yield self.call(body=body)
        span, _ = yield self.spanAndLine()
        self.assertEqual(span["trace_id"], META_TRACE)
        forwarded = json.loads(self.upstream.seen[-1].body)
        self.assertNotIn("_meta", forwarded[0]["params"])
        self.assertEqual(
            forwarded[1]["params"]["_meta"],
            {"traceparent": f"00-{META_TRACE}-{span['span_id']}-01"},
        )

    @inlineCallbacks
    def test_redactAndMeta(self) -> Any:
        """Redaction and _meta injection together: both in the forwarded body."""
        tp = f"00-{META_TRACE}-{META_SPAN}-01"
        yield self.call(
            body=call(
                "http_get", {"h": "Bearer abcdefghijklmnopqrstuvwxyz"}, meta={"traceparent": tp}
            )
        )
        span, _ = yield self.spanAndLine()
        params = json.loads(self.upstream.seen[-1].body)["params"]
        self.assertEqual(params["arguments"], {"h": "[REDACTED]"})
        self.assertEqual(params["_meta"]["traceparent"], f"00-{META_TRACE}-{span['span_id']}-01")

    @inlineCallbacks
    def test_unsampledCallerHonoured(self) -> Any:
        """A caller that did not sample: no span exported, the context still propagated (flags 00)."""
        yield self.call(
            body=call("echo"), headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"}
        )
        yield self.call(body=call("echo"))
        spans = yield self.spans()
        lines = self.auditLines()
        self.assertEqual([s["attributes"]["request_id"] for s in spans], [lines[1]["request_id"]])
        self.assertEqual(lines[0]["trace_id"], CALLER_TRACE)
        self.assertEqual(
            self.upstream.seen[0].header("traceparent"),
            [f"00-{CALLER_TRACE}-{lines[0]['span_id']}-00"],
        )


class TracingOffTests(TracingTestCase):
    """Without telemetry.otlp_endpoint: no exporter, ids for the audit line, context untouched."""

    def endpoint(self) -> str | None:
        return None

    @inlineCallbacks
    def test_auditIdsWithoutExport(self) -> Any:
        """Audit lines still carry trace_id/span_id (lowercase hex); nothing is exported."""
        self.assertIsNone(self.service.gateway.tracer)
        yield self.call(body=call("echo"))
        yield self.call(
            body=call("echo"), headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        )
        first, second = self.auditLines()
        for line in (first, second):
            self.assertRegex(line["trace_id"], r"^[0-9a-f]{32}$")
            self.assertRegex(line["span_id"], r"^[0-9a-f]{16}$")
        self.assertEqual(second["trace_id"], CALLER_TRACE)
        self.assertNotEqual(second["span_id"], CALLER_SPAN)
        self.assertEqual(self.receiver.posts, [])

    @inlineCallbacks
    def test_contextForwardedUntouched(self) -> Any:
        """Tracing off: the client's traceparent header and _meta pass through unchanged."""
        tp = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        body = call("echo", meta={"traceparent": tp})
        yield self.call(body=body, headers={"traceparent": tp, "tracestate": "a=b"})
        seen = self.upstream.seen[-1]
        self.assertEqual(seen.body, body)
        self.assertEqual(seen.header("traceparent"), [tp])
        self.assertEqual(seen.header("tracestate"), ["a=b"])


class ReloadTests(TracingTestCase):
    """A reload turns export on, changes it, and turns it off."""

    reloadable = True

    def endpoint(self) -> str | None:
        return None

    def rewrite(self, endpoint: str | None, service: str = "mcpgw-test") -> None:
        self.serviceName = service
        original = self.endpoint
        self.endpoint = lambda: endpoint  # type: ignore[method-assign]
        try:
            with open(self.configPath, "w") as f:
                f.write(self.configText())
        finally:
            self.endpoint = original  # type: ignore[method-assign]
        self.service.reload()

    @inlineCallbacks
    def test_reloadTogglesExport(self) -> Any:
        """Off -> on (spans flow) -> renamed service -> off (the old exporter flushed)."""
        yield self.call(body=call("echo"))
        self.rewrite(self.receiver.endpoint)
        self.assertIsNotNone(self.service.gateway.tracer)
        yield self.call(body=call("echo"))
        self.rewrite(self.receiver.endpoint, "renamed")
        yield self.call(body=call("echo"))
        self.rewrite(None)
        self.assertIsNone(self.service.gateway.tracer)
        yield self.call(body=call("echo"))
        yield deferLater(reactor, 0.5, lambda: None)
        spans = self.receiver.waitFor(2, 5)
        lines = self.auditLines()
        self.assertEqual(
            sorted((s["resource"]["service.name"], s["attributes"]["request_id"]) for s in spans),
            sorted([("mcpgw-test", lines[1]["request_id"]), ("renamed", lines[2]["request_id"])]),
        )


class DownReceiverTests(TracingTestCase):
    """The collector down or slow never slows a request."""

    def endpoint(self) -> str | None:
        return f"http://127.0.0.1:{self.collectorPort}/v1/traces"

    def setUp(self) -> Any:
        self.patch(SpanExporter, "timeout", 0.3)
        self.collectorPort = freePort()
        return super().setUp()

    @inlineCallbacks
    def test_servesWithCollectorDown(self) -> Any:
        """Nothing listens at the endpoint: requests are answered as usual, spans counted as failed."""
        started = time.monotonic()
        for i in range(20):
            reply = yield self.call(body=call("echo", id=i))
            self.assertEqual(reply.status, 200)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 5.0)
        yield self.service.telemetry.flush()
        exporter = self.service.gateway.tracer.exporter
        self.assertEqual((exporter.exported, exporter.failed), (0, 20))
        self.assertEqual(len(self.auditLines()), 20)


class SlowReceiverTests(TracingTestCase):
    """A collector that takes seconds to answer."""

    @inlineCallbacks
    def test_slowCollectorDoesNotSlowRequests(self) -> Any:
        """While the export thread waits 2 s on the collector, requests are answered at once."""
        self.receiver.script = [(200, {}, 2.0)]
        yield self.call(body=call("echo"))
        flushed = self.service.telemetry.flush()  # the thread is now stuck for 2 s
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(self.receiver.posts), 1)
        for i in range(10):
            t0 = time.monotonic()
            reply = yield self.call(body=call("echo", id=i))
            self.assertEqual(reply.status, 200)
            self.assertLess(time.monotonic() - t0, 0.5)
        yield flushed
        spans = yield self.spans()
        self.assertEqual(len(spans), 11)


class StopTests(TracingTestCase):
    """The last spans are exported when the service stops."""

    def setUp(self) -> Any:
        self.patch(SpanExporter, "interval", 60.0)
        return super().setUp()

    @inlineCallbacks
    def test_stopExportsWhatIsLeft(self) -> Any:
        """Stopping the service exports the queued spans (off the reactor) before it completes."""
        yield self.call(body=call("echo"))
        yield self.call(body=call("echo"))
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.receiver.spans, [])
        yield self.service.stopService()
        self.assertEqual(len(self.receiver.spans), 2)


class TargetTests(TracingTestCase):
    """Prompts and resources, as the MCP semantic conventions name and tag them."""

    @inlineCallbacks
    def test_promptAndResource(self) -> Any:
        """prompts/get is named after its prompt; resources/read carries mcp.resource.uri."""
        yield self.call(body=rpc("prompts/get", {"name": "summarize", "arguments": {}}))
        yield self.call(body=rpc("resources/read", {"uri": "file:///srv/notes.txt"}))
        spans = yield self.spans()
        self.assertEqual([s["name"] for s in spans], ["prompts/get summarize", "resources/read"])
        self.assertEqual(spans[0]["attributes"]["gen_ai.prompt.name"], "summarize")
        self.assertEqual(spans[1]["attributes"]["mcp.resource.uri"], "file:///srv/notes.txt")


class InjectedTraceparentTests(TracingTestCase):
    """An operator who injects traceparent for an upstream keeps control of it."""

    def configText(self) -> str:
        return (
            super()
            .configText()
            .replace(
                "X-Injected: injected-value,", "X-Injected: injected-value, traceparent: fixed,"
            )
        )

    @inlineCallbacks
    def test_operatorTraceparentWins(self) -> Any:
        """The upstream gets the configured value only; the span is still exported."""
        yield self.call(
            body=call("echo"), headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        )
        self.assertEqual(self.upstream.seen[-1].header("traceparent"), ["fixed"])
        span, _ = yield self.spanAndLine()
        self.assertEqual(span["parent_span_id"], CALLER_SPAN)
