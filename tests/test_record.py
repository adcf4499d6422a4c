"""The per-request record: frozen, and the one source of the audit line and the span."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mcpgw.record import AUDIT_FIELDS, RequestRecord, auditLine, recordOf
from mcpgw.telemetry import encodeSpan
from tests.test_telemetry_otlp import attributes, decodeSpan


class _Route:
    name = "up"


def exchange(**changes: Any) -> Any:
    """An object with the attributes of a ProxyExchange that the record reads."""

    class X:
        pass

    x = X()
    x.__dict__.update(
        traceId=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        spanId=0x00F067AA0BA902B7,
        parent=None,
        link=None,
        started=100.0,
        method="tools/call",
        tool="echo",
        httpMethod=b"POST",
        path=b"/mcp",
        route=_Route(),
        jsonrpcId=7,
        sessionId="s-1",
        protocolVersion="2025-11-25",
        decision="allow",
        ruleId=None,
        authResult="ok",
        authKeyId="ci-bot",
        bytesIn=120,
        bytesOut=300,
        status=200,
        error=None,
        clientIp="127.0.0.1",
        requestId="0123456789abcdef01234567",
        secure=True,
        redacted=None,
        filteredTools=None,
        batchSize=None,
        target=None,
        clientCert=None,
        principal="ci-bot",
        redactedResults=2,
        toolPin="changed",
    )
    x.__dict__.update(changes)
    return x


class RecordTests(SynchronousTestCase):
    def test_auditFieldsAreTheContract(self) -> None:
        """The audit line has DESIGN.md's fields, in order, then mcpgw's extensions."""
        self.assertEqual(
            AUDIT_FIELDS[:17],
            (
                "ts", "request_id", "session_id", "client_ip", "method", "tool", "upstream",
                "decision", "rule_id", "error", "auth_key_id", "auth_result", "bytes_in",
                "bytes_out", "status", "duration_ms", "transport",
            ),
        )  # fmt: skip
        self.assertIn("trace_id", AUDIT_FIELDS)

    def test_frozen(self) -> None:
        """A record cannot be changed once built."""
        record = recordOf(exchange(), 1_795_000_000.25, 100.0025)
        self.assertRaises(AttributeError, setattr, record, "status", 500)
        self.assertIsInstance(record, RequestRecord)

    def test_auditAndSpanAgree(self) -> None:
        """The line's ts and duration are the span's end and length; ids, status and bytes match."""
        record = recordOf(exchange(), 1_795_000_000.25, 100.0025)
        line = auditLine(record)
        self.assertEqual(line["ts"], "2026-11-18T11:06:40.250Z")
        self.assertEqual(line["duration_ms"], 2.5)
        self.assertEqual(
            (line["trace_id"], line["span_id"], line["transport"], line["upstream"]),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "https", "up"),
        )
        # float seconds carry the wall clock to within a microsecond
        self.assertLess(abs(record.endNs - 1_795_000_000_250_000_000), 1000)
        self.assertLess(abs(record.endNs - record.startNs - 2_500_000), 1000)
        span = decodeSpan(encodeSpan(record))
        self.assertEqual(span.end_time_unix_nano, record.endNs)
        self.assertEqual(span.start_time_unix_nano, record.startNs)
        self.assertEqual(span.trace_id.hex(), line["trace_id"])
        self.assertEqual(span.span_id.hex(), line["span_id"])
        attrs = attributes(span)
        self.assertEqual(attrs["request_id"], line["request_id"])
        self.assertEqual(attrs["mcp.payload.bytes_in"], line["bytes_in"])
        self.assertEqual(attrs["mcp.auth.key_id"], line["auth_key_id"])
        self.assertEqual(attrs["enduser.id"], line["principal"])
        self.assertEqual(attrs["mcp.policy.redacted_results"], line["redacted_results"])
        self.assertEqual(attrs["mcp.tool.pin"], line["tool_pin"])
        self.assertEqual(line["tool_pin"], "changed")
