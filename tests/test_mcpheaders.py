"""MCP 2026-07-28 header rules as pure logic: annotations, value decoding, comparisons."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from mcpgw.errors import HeaderMismatch
from mcpgw.proxy.mcpheaders import (
    InvalidAnnotation,
    ParamHeader,
    ToolHeaders,
    checkRequest,
    decodeValue,
    isModern,
    lowered,
    scanTool,
)


def tool(properties: dict[str, Any], **schema: Any) -> dict[str, Any]:
    return {"name": "t", "inputSchema": {"type": "object", "properties": properties, **schema}}


class ScanTests(SynchronousTestCase):
    def test_validAnnotations(self) -> None:
        """Primitive properties reachable through properties keys, nested ones included."""
        found = scanTool(
            tool(
                {
                    "a": {"type": "string", "x-mcp-header": "A"},
                    "o": {
                        "type": "object",
                        "properties": {"n": {"type": "integer", "x-mcp-header": "N"}},
                    },
                    "x-mcp-header": {
                        "type": "boolean"
                    },  # a property with that name, not an annotation
                }
            )
        )
        self.assertEqual(
            sorted(found, key=lambda p: p.header),
            [
                ParamHeader(b"mcp-param-a", ("a",), "string"),
                ParamHeader(b"mcp-param-n", ("o", "n"), "integer"),
            ],
        )
        self.assertEqual(scanTool({"name": "t"}), ())
        self.assertEqual(scanTool(tool({}, default={"x-mcp-header": "Data"})), ())

    def test_invalidAnnotations(self) -> None:
        """Each rule of the specification makes a tool invalid when broken."""
        cases = [
            tool({"a": {"type": "array", "items": {"type": "string", "x-mcp-header": "A"}}}),
            tool({}, anyOf=[{"properties": {"a": {"type": "string", "x-mcp-header": "A"}}}]),
            tool({}, **{"$defs": {"d": {"type": "string", "x-mcp-header": "D"}}}),
            tool({"a": {"type": "number", "x-mcp-header": "A"}}),
            tool({"a": {"type": ["string", "null"], "x-mcp-header": "A"}}),
            tool({"a": {"type": "string", "x-mcp-header": ""}}),
            tool({"a": {"type": "string", "x-mcp-header": "Bad Name"}}),
            tool({"a": {"type": "string", "x-mcp-header": "X\r\nInjected: 1"}}),
            tool({"a": {"type": "string", "x-mcp-header": 5}}),
            tool(
                {
                    "a": {"type": "string", "x-mcp-header": "A"},
                    "b": {"type": "string", "x-mcp-header": "a"},
                }
            ),
            {"name": "t", "inputSchema": {"type": "string", "x-mcp-header": "Root"}},
        ]
        for case in cases:
            self.assertRaises(InvalidAnnotation, scanTool, case)

    def test_indexIsBoundedAndRefreshed(self) -> None:
        """The per-upstream index keeps the latest definition and at most its bound."""
        index = ToolHeaders(maxTools=2)
        index.observe(tool({"a": {"type": "string", "x-mcp-header": "A"}}))
        self.assertEqual(len(index.get("t") or ()), 1)
        index.observe(tool({}))
        self.assertEqual(index.get("t"), ())
        self.assertIsNotNone(index.observe(tool({"a": {"type": "number", "x-mcp-header": "A"}})))
        self.assertIsNone(index.get("t"))
        for name in ("x", "y", "z"):
            index.observe({"name": name, "inputSchema": {}})
        self.assertEqual((index.get("x"), len(index)), (None, 2))


class ValueTests(SynchronousTestCase):
    def test_decode(self) -> None:
        """Plain values as they are; the base64 sentinel decoded; malformed or unsafe ones refused."""
        self.assertEqual(decodeValue(b"us-west1", "h"), "us-west1")
        self.assertEqual(decodeValue(b"=?base64?SGVsbG8sIOS4lueVjA==?=", "h"), "Hello, 世界")
        self.assertEqual(decodeValue(b"=?BASE64?eA==?=", "h"), "=?BASE64?eA==?=")  # case-sensitive
        for bad in (
            b"=?base64?!!!?=",
            b"=?base64?eA=?=",
            b"=?base64?/w==?=",
            b"caf\xc3\xa9",
            b"a\x01b",
        ):
            self.assertRaises(HeaderMismatch, decodeValue, bad, "h")

    def test_isModern(self) -> None:
        self.assertTrue(isModern(b"2026-07-28"))
        self.assertTrue(isModern("2027-01-01"))
        self.assertFalse(isModern(b"2025-11-25"))
        self.assertFalse(isModern(None))
        self.assertFalse(isModern(b"garbage"))

    def test_notificationsAndUnknownToolsNotChecked(self) -> None:
        """Notifications have no header rules; a tool never listed has no Mcp-Param-* rules."""
        headers = Headers({b"mcp-method": [b"something/else"]})
        checkRequest(
            lowered(headers), {"jsonrpc": "2.0", "method": "notifications/x"}, ToolHeaders()
        )
        msg = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "t", "arguments": {"a": 1}},
        }
        ok = Headers({b"mcp-method": [b"tools/call"], b"mcp-name": [b"t"], b"mcp-param-a": [b"9"]})
        checkRequest(lowered(ok), msg, ToolHeaders())

    def test_numbers(self) -> None:
        """Integers compare numerically (42 == 42.0 == 42.00); floats, exponents and junk do not."""
        index = ToolHeaders()
        index.observe(tool({"n": {"type": "integer", "x-mcp-header": "N"}}))

        def check(value: Any, header: bytes) -> None:
            msg = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "t", "arguments": {"n": value}},
            }
            headers = Headers(
                {b"mcp-method": [b"tools/call"], b"mcp-name": [b"t"], b"mcp-param-n": [header]}
            )
            checkRequest(lowered(headers), msg, index)

        good: tuple[tuple[Any, bytes], ...] = (
            (42, b"42"),
            (42, b"42.0"),
            (42.0, b"42"),
            (-7, b"-7.00"),
            (2**60, b"1152921504606846976"),
        )
        for value, header in good:
            check(value, header)
        bad: tuple[tuple[Any, bytes], ...] = (
            (42, b"43"),
            (42, b"4.2e1"),
            (42.5, b"42.5"),
            (42, b" 42"),
            (True, b"1"),
            ("42", b"42.0"),
        )
        for value, header in bad:
            self.assertRaises(HeaderMismatch, check, value, header)
