"""tools/list filtering of JSON and SSE answers."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from mcpgw.proxy.toolsfilter import SSEFilter, byName, filterJSONBody


def allowsName(name: str) -> bool:
    return not name.startswith("admin_")


allows = byName(allowsName)


LIST = {
    "jsonrpc": "2.0",
    "id": 2,
    "result": {
        "tools": [{"name": "echo", "inputSchema": {}}, {"name": "admin_reset"}, {"name": "add"}],
        "nextCursor": "c",
    },
}


class JSONTests(SynchronousTestCase):
    def test_deniedToolsRemoved(self) -> None:
        """Denied tools leave result.tools; everything else stays."""
        body, n = filterJSONBody(json.dumps(LIST).encode(), allows)
        out = json.loads(body)
        self.assertEqual(n, 1)
        self.assertEqual([t["name"] for t in out["result"]["tools"]], ["echo", "add"])
        self.assertEqual(out["result"]["nextCursor"], "c")
        self.assertEqual(out["id"], 2)

    def test_untouchedWhenNothingDenied(self) -> None:
        """Bytes are returned as they were when nothing is removed (or it is not JSON)."""
        raw = b'{"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "echo"}]}}'
        self.assertEqual(filterJSONBody(raw, allows), (raw, 0))
        self.assertEqual(filterJSONBody(b"not json", allows), (b"not json", 0))

    def test_batch(self) -> None:
        """Each response of a batch answer is filtered."""
        body, n = filterJSONBody(
            json.dumps([LIST, {"jsonrpc": "2.0", "id": 3, "result": {}}]).encode(), allows
        )
        self.assertEqual(n, 1)
        self.assertEqual(len(json.loads(body)), 2)


class SSETests(SynchronousTestCase):
    def test_eventsRewrittenWhenComplete(self) -> None:
        """A split event waits for its end; the tools event is rewritten, others pass as is."""
        f = SSEFilter(allows)
        ping = b": ping\n\n"
        note = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
        tools = b"event: message\nid: 7\ndata: " + json.dumps(LIST).encode() + b"\n\n"
        out = f.feed(ping + note + tools[:30])
        self.assertEqual(out, ping + note)
        out = f.feed(tools[30:])
        self.assertTrue(out.startswith(b"event: message\nid: 7\ndata: "))
        self.assertTrue(out.endswith(b"\n\n"))
        data = json.loads(out.split(b"data: ", 1)[1])
        self.assertEqual([t["name"] for t in data["result"]["tools"]], ["echo", "add"])
        self.assertEqual(f.removed, 1)
        self.assertEqual(f.flush(), b"")

    def test_crlfAndMultilineData(self) -> None:
        """CRLF separators and data split over several lines are handled."""
        f = SSEFilter(allows)
        payload = json.dumps(LIST, indent=1).encode().split(b"\n")
        event = b"\r\n".join(b"data: " + p for p in payload) + b"\r\n\r\n"
        out = f.feed(event)
        data = json.loads(out.split(b"data: ", 1)[1])
        self.assertEqual(len(data["result"]["tools"]), 2)
