"""JSON-RPC parsing and the error mapping."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from mcpgw.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ParseError,
    UpstreamTimeout,
    errorResponse,
)
from mcpgw.jsonrpc import parseBody


class ParseTests(SynchronousTestCase):
    def test_request(self) -> None:
        """A tools/call request yields method, tool and id."""
        s = parseBody(b'{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"t"}}')
        self.assertEqual(
            (s.method, s.tool, s.requestId, s.isBatch), ("tools/call", "t", "a", False)
        )

    def test_notificationAndResponse(self) -> None:
        """Notifications have no id; client responses (result/error) are valid messages."""
        s = parseBody(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        self.assertEqual((s.method, s.requestId), ("notifications/initialized", None))
        s = parseBody(b'{"jsonrpc":"2.0","id":3,"result":{}}')
        self.assertIsNone(s.method)

    def test_batch(self) -> None:
        """A batch gives the first request's method and the first tool called."""
        s = parseBody(
            b'[{"jsonrpc":"2.0","method":"notifications/x"},'
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"b"}}]'
        )
        self.assertEqual(
            (s.isBatch, len(s.messages), s.method, s.tool), (True, 2, "notifications/x", "b")
        )

    def test_errors(self) -> None:
        """Not JSON: ParseError. JSON but not JSON-RPC: InvalidRequest, with the id when known."""
        self.assertRaises(ParseError, parseBody, b"")
        self.assertRaises(ParseError, parseBody, b"{")
        for bad in (
            b"1",
            b"[]",
            b"[1]",
            b'{"id":1}',
            b'{"jsonrpc":"2.0","id":1}',
            b'{"jsonrpc":"2.0","method":5}',
            b'{"jsonrpc":"2.0","method":"m","params":3}',
        ):
            self.assertRaises(InvalidRequest, parseBody, bad)
        e = self.assertRaises(InvalidRequest, parseBody, b'{"jsonrpc":"1.0","id":9,"method":"m"}')
        self.assertEqual(e.requestId, 9)


class ErrorMappingTests(SynchronousTestCase):
    def test_errorResponse(self) -> None:
        """Errors map to status, JSON-RPC body with the id, and extra headers."""
        status, headers, body = errorResponse(UpstreamTimeout("slow"), 4)
        self.assertEqual(status, 504)
        self.assertEqual(
            json.loads(body),
            {
                "jsonrpc": "2.0",
                "id": 4,
                "error": {
                    "code": -32011,
                    "message": "upstream_timeout",
                    "data": {"detail": "slow"},
                },
            },
        )
        self.assertIn((b"Content-Length", b"%d" % len(body)), headers)
        _, headers, _ = errorResponse(MethodNotAllowed())
        self.assertIn((b"Allow", b"GET, POST, DELETE"), headers)

    def test_dataMembers(self) -> None:
        """Keyword data lands in error.data (e.g. rule_id for later policy errors)."""
        e = GatewayError(rule_id="r1")
        self.assertEqual(e.errorObject()["data"], {"rule_id": "r1"})
