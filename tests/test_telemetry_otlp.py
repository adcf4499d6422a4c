"""
The hand-written OTLP protobuf encoding (checked with the reference decoder from
opentelemetry-proto), the span mapping of a record, and W3C trace-context parsing.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span
from twisted.trial.unittest import SynchronousTestCase

from mcpgw import otlp, telemetry
from mcpgw.config import TelemetryConfig
from mcpgw.record import RequestRecord
from mcpgw.telemetry import TraceParent, parseTraceparent
from tests.otlpreceiver import anyValue, spansOf

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def decodeSpan(field: bytes) -> Span:
    """An encoded C{ScopeSpans.spans} field, decoded."""
    holder = ScopeSpans()
    holder.ParseFromString(field)
    assert len(holder.spans) == 1
    return holder.spans[0]


def record(**changes: Any) -> tuple[Any, ...]:
    """A span record with plausible values, some replaced."""
    values: dict[str, Any] = {
        "R_TRACE": int(TRACE, 16),
        "R_SPAN": int(SPAN, 16),
        "R_PARENT": None,
        "R_LINK": None,
        "R_START": 1_795_000_000_000_000_000,
        "R_END": 1_795_000_000_002_500_000,
        "R_METHOD": "tools/call",
        "R_TOOL": "echo",
        "R_HTTP_METHOD": b"POST",
        "R_PATH": b"/mcp",
        "R_UPSTREAM": "up",
        "R_JSONRPC_ID": 7,
        "R_SESSION": None,
        "R_PROTOCOL": None,
        "R_DECISION": "allow",
        "R_RULE": None,
        "R_AUTH_RESULT": "external",
        "R_AUTH_KEY": None,
        "R_BYTES_IN": 120,
        "R_BYTES_OUT": 300,
        "R_STATUS": 200,
        "R_ERROR": None,
        "R_CLIENT_IP": "127.0.0.1",
        "R_REQUEST_ID": "a" * 24,
        "R_SECURE": False,
        "R_REDACTED": None,
        "R_FILTERED": None,
        "R_BATCH": None,
        "R_TARGET": None,
        "R_PRINCIPAL": None,
        "R_REDACTED_RESULTS": None,
        "R_TOOL_PIN": None,
    }
    values.update(changes)
    out: list[Any] = [None] * len(RequestRecord._fields)
    for name, value in values.items():
        out[getattr(telemetry, name)] = value
    return RequestRecord(*out)


def attributes(span: Span) -> dict[str, Any]:
    return {kv.key: anyValue(kv.value) for kv in span.attributes}


class WireFormatTests(SynchronousTestCase):
    """The writer's bytes are valid protobuf that the reference decoder reads back exactly."""

    def test_varint(self) -> None:
        """Varints: one byte below 128, little-endian groups of 7 bits, int64 negatives as 10 bytes."""
        self.assertEqual(otlp.varint(0), b"\x00")
        self.assertEqual(otlp.varint(127), b"\x7f")
        self.assertEqual(otlp.varint(128), b"\x80\x01")
        self.assertEqual(otlp.varint(300), b"\xac\x02")
        self.assertEqual(otlp.varint(1 << 40), b"\x80\x80\x80\x80\x80\x20")
        self.assertEqual(otlp.varint(-1), b"\xff" * 9 + b"\x01")

    def test_attributeValues(self) -> None:
        """Strings of every length class, UTF-8, ints (negative, huge), bools and floats."""
        cases: list[Any] = [
            "",
            "x",
            "x" * 95,
            "x" * 125,
            "x" * 126,
            "x" * 300,
            "é" * 70,
            "日本語",
            0,
            -32001,
            1 << 62,
            True,
            False,
            2.5,
        ]
        fields = [otlp.AttributeKey("k").value(v) for v in cases]
        fields.append(otlp.AttributeKey("a.rather.long.attribute.key.name" * 4).string("v" * 90))
        span = decodeSpan(otlp.span(1, 2, 0, None, 0, "n", 1, 2, fields))
        decoded = [anyValue(kv.value) for kv in span.attributes]
        self.assertEqual(decoded, [*cases, "v" * 90])
        self.assertEqual(span.attributes[-1].key, "a.rather.long.attribute.key.name" * 4)

    def test_longValuesTruncated(self) -> None:
        """String values are cut at MAX_VALUE_CHARS characters (never inside a UTF-8 sequence)."""
        field = otlp.AttributeKey("k").string("é" * (otlp.MAX_VALUE_CHARS + 10))
        span = decodeSpan(otlp.span(1, 2, 0, None, 0, "n", 1, 2, [field]))
        self.assertEqual(anyValue(span.attributes[0].value), "é" * otlp.MAX_VALUE_CHARS)

    def test_unencodableTextReplaced(self) -> None:
        """A lone surrogate cannot break the batch: it is replaced."""
        field = otlp.AttributeKey("k").string("a\ud800b")
        span = decodeSpan(otlp.span(1, 2, 0, None, 0, "n\udfff", 1, 2, [field]))
        self.assertEqual(anyValue(span.attributes[0].value), "a?b")
        self.assertEqual(span.name, "n?")

    def test_spanFields(self) -> None:
        """Ids, parent, trace state, name, kind, times, status, links and flags round-trip."""
        field = otlp.span(
            int(TRACE, 16),
            int(SPAN, 16),
            0x1234,
            "v=1",
            0x301,
            "tools/call x",
            1_700_000_000_123_456_789,
            1_700_000_000_223_456_789,
            [],
            otlp.STATUS_ERROR,
            "boom",
            [(5, 6, "l=1", 0x301), (7, 8, None, 0x100)],
        )
        span = decodeSpan(field)
        self.assertEqual(span.trace_id.hex(), TRACE)
        self.assertEqual(span.span_id.hex(), SPAN)
        self.assertEqual(span.parent_span_id.hex(), "0000000000001234")
        self.assertEqual(span.trace_state, "v=1")
        self.assertEqual(span.name, "tools/call x")
        self.assertEqual(span.kind, Span.SPAN_KIND_SERVER)
        self.assertEqual(span.start_time_unix_nano, 1_700_000_000_123_456_789)
        self.assertEqual(span.end_time_unix_nano, 1_700_000_000_223_456_789)
        self.assertEqual((span.status.code, span.status.message), (2, "boom"))
        self.assertEqual(span.flags, 0x301)
        self.assertEqual(
            [
                (x.trace_id.hex()[-2:], x.span_id.hex()[-2:], x.trace_state, x.flags)
                for x in span.links
            ],
            [("05", "06", "l=1", 0x301), ("07", "08", "", 0x100)],
        )

    def test_rootSpanHasNoParentOrStatus(self) -> None:
        """A root span with status UNSET writes neither field."""
        span = decodeSpan(otlp.span(1, 2, 0, None, 0x101, "n", 1, 2, []))
        self.assertEqual(span.parent_span_id, b"")
        self.assertFalse(span.HasField("status"))

    def test_request(self) -> None:
        """A whole ExportTraceServiceRequest: one resource, one scope, every span in order."""
        encoder = otlp.RequestEncoder(
            otlp.resource([("service.name", "svc"), ("n", 3)]), otlp.scope("mcpgw", "1.2")
        )
        spans = [otlp.span(1, i + 1, 0, None, 0, f"s{i}", 1, 2, []) for i in range(300)]
        request = ExportTraceServiceRequest()
        request.ParseFromString(encoder.encode(spans))
        self.assertEqual(len(request.resource_spans), 1)
        rs = request.resource_spans[0]
        self.assertEqual(
            {kv.key: anyValue(kv.value) for kv in rs.resource.attributes},
            {"service.name": "svc", "n": 3},
        )
        self.assertEqual(
            (rs.scope_spans[0].scope.name, rs.scope_spans[0].scope.version), ("mcpgw", "1.2")
        )
        self.assertEqual([s.name for s in rs.scope_spans[0].spans], [f"s{i}" for i in range(300)])

    def test_emptyRequest(self) -> None:
        """A request without spans is still valid."""
        encoder = otlp.RequestEncoder(otlp.resource([]), otlp.scope("mcpgw"))
        request = ExportTraceServiceRequest()
        request.ParseFromString(encoder.encode([]))
        self.assertEqual(len(request.resource_spans[0].scope_spans[0].spans), 0)

    def test_partialSuccess(self) -> None:
        """The response's partial_success is read; an empty or unreadable body means none."""
        response = ExportTraceServiceResponse()
        response.partial_success.rejected_spans = 3
        response.partial_success.error_message = "too old"
        self.assertEqual(otlp.partialSuccess(response.SerializeToString()), (3, "too old"))
        self.assertEqual(otlp.partialSuccess(b""), (0, ""))
        self.assertEqual(otlp.partialSuccess(b"\x0a\x05\x08"), (0, ""))


class SpanMappingTests(SynchronousTestCase):
    """A span record becomes the span Datadog and the semantic conventions expect."""

    def encode(self, **changes: Any) -> Span:
        return decodeSpan(telemetry.encodeSpan(record(**changes)))

    def test_resourceAttributes(self) -> None:
        """service.name, service.version and deployment.environment.name are on the resource."""
        attrs = dict(
            telemetry.resourceAttributes(TelemetryConfig(service_name="gw", environment="prod"))
        )
        self.assertEqual(attrs["service.name"], "gw")
        self.assertEqual(attrs["deployment.environment.name"], "prod")
        self.assertIn("service.version", attrs)
        self.assertNotIn(
            "deployment.environment.name", dict(telemetry.resourceAttributes(TelemetryConfig()))
        )

    def test_names(self) -> None:
        """Method and tool; method alone; HTTP method and route; HTTP method alone off-route."""
        self.assertEqual(self.encode().name, "tools/call echo")
        self.assertEqual(self.encode(R_METHOD="tools/list", R_TOOL=None).name, "tools/list")
        self.assertEqual(
            self.encode(R_METHOD=None, R_TOOL=None, R_HTTP_METHOD=b"DELETE").name, "DELETE /mcp"
        )
        self.assertEqual(self.encode(R_UPSTREAM=None, R_PATH=b"/x", R_METHOD=None).name, "POST")
        self.assertEqual(self.encode(R_AUTH_RESULT="invalid").name, "POST /mcp")
        self.assertEqual(self.encode(R_AUTH_RESULT="ok").name, "tools/call echo")
        # refused before authentication (Host, duplicate header, header mismatch): no method name
        self.assertEqual(self.encode(R_AUTH_RESULT=None).name, "POST /mcp")

    def test_targets(self) -> None:
        """A prompt names its span and is gen_ai.prompt.name; a resource URI is only an attribute."""
        span = self.encode(R_METHOD="prompts/get", R_TOOL=None, R_TARGET="summarize")
        self.assertEqual(span.name, "prompts/get summarize")
        self.assertEqual(attributes(span)["gen_ai.prompt.name"], "summarize")
        span = self.encode(R_METHOD="resources/read", R_TOOL=None, R_TARGET="file:///etc/motd")
        self.assertEqual(span.name, "resources/read")
        self.assertEqual(attributes(span)["mcp.resource.uri"], "file:///etc/motd")
        self.assertNotIn("gen_ai.prompt.name", attributes(span))
        # a batch led by tools/list that also calls a tool: named after its first method only
        span = self.encode(R_METHOD="tools/list", R_TOOL="echo")
        self.assertEqual(span.name, "tools/list")
        self.assertEqual(attributes(span)["mcp.tool.name"], "echo")
        self.assertNotIn("gen_ai.operation.name", attributes(span))

    def test_jsonrpcIdIsAString(self) -> None:
        """jsonrpc.request.id is the id's string form, whatever its JSON type."""
        for rid, text in ((7, "7"), ("x-1", "x-1"), (1.5, "1.5")):
            self.assertEqual(attributes(self.encode(R_JSONRPC_ID=rid))["jsonrpc.request.id"], text)

    def test_errorStatus(self) -> None:
        """5xx and mid-response failures are ERROR with error.type; refusals are UNSET."""
        cases: list[tuple[dict[str, Any], int, str | None]] = [
            ({"R_STATUS": 502, "R_ERROR": "upstream_unavailable"}, 2, "-32010"),
            ({"R_STATUS": 504, "R_ERROR": "upstream_timeout"}, 2, "-32011"),
            ({"R_STATUS": 503, "R_ERROR": "shutting_down"}, 2, "-32012"),
            ({"R_STATUS": 500, "R_ERROR": "internal_error"}, 2, "-32603"),
            ({"R_STATUS": 500}, 2, "500"),
            ({"R_STATUS": 200, "R_ERROR": "upstream_reset"}, 2, "upstream_reset"),
            ({"R_STATUS": 200, "R_ERROR": "internal_error"}, 2, "-32603"),
            ({"R_STATUS": 403, "R_ERROR": "policy_denied"}, 0, None),
            ({"R_STATUS": 429, "R_ERROR": "rate_limited"}, 0, None),
            ({"R_STATUS": 401, "R_ERROR": "unauthenticated"}, 0, None),
            ({"R_STATUS": 400, "R_ERROR": "parse_error"}, 0, None),
            ({"R_STATUS": 499, "R_ERROR": "client_closed"}, 0, None),
            ({"R_STATUS": 404}, 0, None),
        ]
        for changes, code, errorType in cases:
            span = self.encode(**changes)
            attrs = attributes(span)
            self.assertEqual(span.status.code, code, changes)
            self.assertEqual(attrs.get("error.type"), errorType, changes)
            if changes.get("R_ERROR"):
                self.assertEqual(attrs["mcp.error.kind"], changes["R_ERROR"])

    def test_parentAndLink(self) -> None:
        """A remote parent sets the parent id, trace state and remote flags; a link is written."""
        parent = TraceParent(int(TRACE, 16), 0xABC, 1, "a=1")
        link = TraceParent(5, 6, 1, None)
        span = self.encode(R_PARENT=parent, R_LINK=link)
        self.assertEqual(span.parent_span_id.hex(), "0000000000000abc")
        self.assertEqual(span.trace_state, "a=1")
        self.assertEqual(span.flags, 0x301)
        self.assertEqual([x.span_id.hex() for x in span.links], ["0000000000000006"])

    def test_optionalIntegers(self) -> None:
        """Redaction count, filtered tools and batch size are ints when present, absent otherwise."""
        attrs = attributes(self.encode(R_REDACTED=2, R_FILTERED=3, R_BATCH=4))
        self.assertEqual(
            (
                attrs["mcp.policy.redacted"],
                attrs["mcp.tools.filtered"],
                attrs["jsonrpc.batch.size"],
            ),
            (2, 3, 4),
        )
        attrs = attributes(self.encode())
        for key in ("mcp.policy.redacted", "mcp.tools.filtered", "jsonrpc.batch.size"):
            self.assertNotIn(key, attrs)

    def test_requestDecodes(self) -> None:
        """The exporter's request of a batch decodes to the same spans."""
        exporter = telemetry.SpanExporter(
            None, "http://127.0.0.1:9/v1/traces", [("service.name", "x")], sleep=lambda s: None
        )
        request = ExportTraceServiceRequest()
        request.ParseFromString(exporter.encode([record(R_SPAN=i + 1) for i in range(100)]))
        spans = spansOf(request)
        self.assertEqual([int(s["span_id"], 16) for s in spans], list(range(1, 101)))
        self.assertEqual(spans[0]["resource"], {"service.name": "x"})


class TraceparentTests(SynchronousTestCase):
    """W3C traceparent and tracestate parsing."""

    def test_valid(self) -> None:
        """A version-00 traceparent and its tracestate."""
        ctx = parseTraceparent(f"00-{TRACE}-{SPAN}-01", "a=1,b=2")
        self.assertEqual(ctx, TraceParent(int(TRACE, 16), int(SPAN, 16), 1, "a=1,b=2"))

    def test_invalid(self) -> None:
        """Wrong lengths, upper case, zero ids, version ff, extra fields on 00: not a context."""
        for value in (
            "",
            "garbage",
            f"00-{TRACE}-{SPAN}",
            f"00-{TRACE.upper()}-{SPAN}-01",
            f"00-{'0' * 32}-{SPAN}-01",
            f"00-{TRACE}-{'0' * 16}-01",
            f"ff-{TRACE}-{SPAN}-01",
            f"00-{TRACE}-{SPAN}-01-extra",
            f"0-{TRACE}-{SPAN}-01",
            f"00-{TRACE}-{SPAN}-1",
        ):
            self.assertIsNone(parseTraceparent(value), value)

    def test_futureVersion(self) -> None:
        """A later version may carry more fields after the four known ones."""
        ctx = parseTraceparent(f"01-{TRACE}-{SPAN}-01-whatever")
        self.assertIsNotNone(ctx)

    def test_badTracestateDropped(self) -> None:
        """A tracestate with control characters or over 512 characters is dropped, not forwarded."""
        tp = f"00-{TRACE}-{SPAN}-01"
        ctx = parseTraceparent(tp, "a=1\r\nX-Evil: 1")
        self.assertIsNotNone(ctx)
        assert ctx is not None
        self.assertIsNone(ctx.traceState)
        ctx = parseTraceparent(tp, "a=" + "x" * 600)
        assert ctx is not None
        self.assertIsNone(ctx.traceState)

    def test_headerContext(self) -> None:
        """Header values: the first traceparent; tracestate values joined with commas."""
        ctx = telemetry.headerContext([f"00-{TRACE}-{SPAN}-01".encode()], [b"a=1", b"b=2"])
        assert ctx is not None
        self.assertEqual(ctx.traceState, "a=1,b=2")

    def test_metaContext(self) -> None:
        """The first message whose params._meta has a traceparent key; non-dict params ignored."""
        msgs: list[dict[str, Any]] = [
            {"method": "a", "params": [1]},
            {"method": "b", "params": {"_meta": {"progressToken": 1}}},
            {"method": "c", "params": {"_meta": {"traceparent": "t", "tracestate": "s"}}},
        ]
        self.assertEqual(telemetry.metaContext(msgs), ("t", "s"))
        self.assertIsNone(telemetry.metaContext(msgs[:2]))
