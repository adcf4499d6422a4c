"""The response-transform stage: listing filters, cacheScope, result redaction; JSON and SSE."""

from __future__ import annotations

import json
from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.proxy import transforms
from mcpgw.proxy.transforms import LISTS, ResponseTransform

DENIED = {"admin_reset", "file:///etc/shadow", "file:///secret/{name}", "leak_prompt"}


def keep(kind: str, item: dict[str, Any]) -> bool:
    """Leave out the denied names (by the member naming items of that kind)."""
    member = {"tools": "name", "resources": "uri", "resourceTemplates": "uriTemplate"}.get(
        kind, "name"
    )
    return item.get(member) not in DENIED


#: One answer per listing method: two items kept, one denied.
ANSWERS: dict[str, dict[str, Any]] = {
    "tools/list": {
        "tools": [{"name": "echo", "inputSchema": {}}, {"name": "admin_reset"}, {"name": "add"}]
    },
    "resources/list": {
        "resources": [{"uri": "file:///a"}, {"uri": "file:///etc/shadow"}, {"uri": "file:///b"}]
    },
    "resources/templates/list": {
        "resourceTemplates": [
            {"uriTemplate": "file:///x/{n}"},
            {"uriTemplate": "file:///secret/{name}"},
            {"uriTemplate": "file:///y/{n}"},
        ]
    },
    "prompts/list": {"prompts": [{"name": "greet"}, {"name": "leak_prompt"}, {"name": "sum"}]},
}


def response(rid: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def listed(result: dict[str, Any]) -> list[str]:
    """The names of a listing result's items, whatever its kind."""
    for kind, member in LISTS.values():
        if kind in result:
            return [item[member] for item in result[kind]]
    raise AssertionError(f"not a listing result: {result!r}")


def sse(*payloads: Any, sep: bytes = b"\n") -> bytes:
    """An SSE stream with one message event per payload (each a JSON value or raw bytes)."""
    out = b""
    for p in payloads:
        data = p if isinstance(p, bytes) else orjson.dumps(p)
        out += b"event: message" + sep + b"data: " + data + sep + sep
    return out


def events(stream: bytes) -> list[bytes]:
    return [e for e in stream.replace(b"\r\n", b"\n").split(b"\n\n") if e]


def dataOf(event: bytes) -> Any:
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return json.loads(b"\n".join(ln[6:] for ln in lines if ln.startswith(b"data: ")))


SECRET = "AKIAIOSFODNN7EXAMPLE"


def scrub(result: Any) -> tuple[Any, int]:
    """A result with SECRET replaced in content[].text and every string of structuredContent."""
    count = 0

    def s(text: str) -> str:
        nonlocal count
        if SECRET in text:
            count += 1
            return text.replace(SECRET, "[REDACTED]")
        return text

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return s(v)
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    new = dict(result)
    if isinstance(result.get("content"), list):
        new["content"] = [
            {**c, "text": s(c["text"])} if isinstance(c.get("text"), str) else c
            for c in result["content"]
        ]
    if "structuredContent" in result:
        new["structuredContent"] = walk(result["structuredContent"])
    return (new, count) if count else (result, 0)


CALL_RESULT: dict[str, Any] = {
    "content": [
        {"type": "text", "text": f"key={SECRET}"},
        {"type": "image", "data": "aGVsbG8=", "mimeType": "image/png"},
    ],
    "structuredContent": {"key": SECRET, "nested": [SECRET, {SECRET: 1}], "n": 3},
    "isError": False,
}


class ListingJSONTests(SynchronousTestCase):
    def test_eachKindFiltered(self) -> None:
        """Each listing answer loses the items keep refuses; its other members stay."""
        for method, result in ANSWERS.items():
            t = ResponseTransform({7: method}, keep=keep)
            self.assertTrue(t.active)
            body = orjson.dumps(response(7, {**result, "nextCursor": "c"}))
            out = json.loads(t.jsonBody(body))
            self.assertEqual(len(listed(out["result"])), 2, method)
            self.assertNotIn("admin_reset", listed(out["result"]))
            self.assertEqual(out["result"]["nextCursor"], "c")
            self.assertEqual((out["id"], out["jsonrpc"]), (7, "2.0"))
            self.assertEqual(t.removed, 1)

    def test_keepSeesKindAndItem(self) -> None:
        """keep gets the list kind and each object item; non-object items stay unasked."""
        seen: list[tuple[str, Any]] = []

        def record(kind: str, item: dict[str, Any]) -> bool:
            seen.append((kind, item))
            return True

        t = ResponseTransform({1: "resources/templates/list"}, keep=record)
        body = orjson.dumps(response(1, {"resourceTemplates": [{"uriTemplate": "u"}, 5, "s"]}))
        self.assertIs(t.jsonBody(body), body)
        self.assertEqual(seen, [("resourceTemplates", {"uriTemplate": "u"})])

    def test_unchangedBodyIsTheSameObject(self) -> None:
        """A body nothing changes in is returned as the very same bytes object."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        body = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo"}]}}'
        self.assertIs(t.jsonBody(body), body)
        spaced = b'{"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "echo"}]}}'
        self.assertIs(t.jsonBody(spaced), spaced)
        self.assertEqual(t.removed, 0)

    def test_inactive(self) -> None:
        """Nothing to do for the request's methods: not active, bytes pass as they are."""
        t = ResponseTransform({1: "tools/call", 2: "ping"}, keep=keep, privateCache=False)
        self.assertFalse(t.active)
        body = orjson.dumps(response(1, ANSWERS["tools/list"]))
        self.assertIs(t.jsonBody(body), body)
        self.assertEqual(t.feed(b"data: x"), b"data: x")
        self.assertFalse(ResponseTransform({1: "tools/list"}).active)

    def test_batchMatchedById(self) -> None:
        """In a batch each response is transformed by its own id's method; others untouched."""
        t = ResponseTransform({1: "tools/list", "p": "prompts/list", 3: "tools/call"}, keep=keep)
        other = response(3, ANSWERS["tools/list"])  # a tools/call result that looks like a list
        stray = response(99, ANSWERS["tools/list"])  # no request of ours had this id
        note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}
        error = {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "m"}}
        batch = [
            response("p", ANSWERS["prompts/list"]),
            other,
            note,
            response(1, ANSWERS["tools/list"]),
            stray,
            error,
        ]
        out = json.loads(t.jsonBody(orjson.dumps(batch)))
        self.assertEqual(listed(out[0]["result"]), ["greet", "sum"])
        self.assertEqual(out[1], other)
        self.assertEqual(out[2], note)
        self.assertEqual(listed(out[3]["result"]), ["echo", "add"])
        self.assertEqual(out[4], stray)
        self.assertEqual(out[5], error)
        self.assertEqual(t.removed, 2)

    def test_serverRequestWithWatchedIdUntouched(self) -> None:
        """A request from the server reusing a watched id is not a response: left alone."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        req = {"jsonrpc": "2.0", "id": 1, "method": "x", "result": ANSWERS["tools/list"]}
        body = orjson.dumps(req)
        self.assertIs(t.jsonBody(body), body)

    def test_idsMatchAsJSONValues(self) -> None:
        """1 and 1.0 are the same id; "1" and true are not id 1."""
        self.assertFalse(ResponseTransform({True: "tools/list"}, keep=keep).active)
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        for rid, changes in ((1.0, True), ("1", False), (True, False)):
            body = orjson.dumps(response(rid, ANSWERS["tools/list"]))
            self.assertEqual(t.jsonBody(body) is not body, changes, rid)

    def test_hugeAndUnicodeIds(self) -> None:
        """Huge numbers, long and non-ASCII string ids match exactly."""
        ids: list[Any] = [2**63 - 1, 2**64 - 1, -(2**63), "ключ-🔑", "x" * 10_000, 1.5e300]
        for rid in ids:
            t = ResponseTransform({rid: "tools/list"}, keep=keep)
            out = json.loads(t.jsonBody(orjson.dumps(response(rid, ANSWERS["tools/list"]))))
            self.assertEqual(out["id"], rid)
            self.assertEqual(listed(out["result"]), ["echo", "add"])

    def test_idBeyond64Bits(self) -> None:
        """An id too large for 64 bits matches as orjson reads it, also via the lenient parser."""
        text = b"123456789012345678901234567890"
        rid = orjson.loads(text)  # as the gateway parsed the request
        t = ResponseTransform({rid: "tools/list"}, keep=keep)
        body = (
            b'{"jsonrpc":"2.0","id":'
            + text
            + b',"result":'
            + orjson.dumps(ANSWERS["tools/list"])
            + b"}"
        )
        self.assertEqual(listed(json.loads(t.jsonBody(body))["result"]), ["echo", "add"])
        lone = body.replace(b'"echo"', b'"echo\\ud800"')  # orjson refuses: lenient path
        out = json.loads(t.jsonBody(lone))
        self.assertEqual(len(out["result"]["tools"]), 2)

    def test_unicodeContentSurvives(self) -> None:
        """Non-ASCII names and text come out as the same strings after a rewrite."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        result = {
            "tools": [{"name": "日本語", "description": "é\u2028🙂"}, {"name": "admin_reset"}]
        }
        out = json.loads(t.jsonBody(orjson.dumps(response(1, result))))
        self.assertEqual(out["result"]["tools"], [result["tools"][0]])

    def test_malformedUnchanged(self) -> None:
        """Bodies that are not JSON for anyone pass unchanged."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        for body in (b"not json", b'{"id":1,"result":{"tools":[', b"", b'{"result":1,}'):
            self.assertIs(t.jsonBody(body), body)
        self.assertEqual((t.removed, t.refused), (0, 0))


class CacheScopeTests(SynchronousTestCase):
    def test_privateWhenAsked(self) -> None:
        """privateCache turns a public cacheScope private, even when nothing was removed."""
        for method, result in ANSWERS.items():
            t = ResponseTransform({1: method}, keep=lambda kind, item: True, privateCache=True)
            hinted = {**result, "ttlMs": 60000, "cacheScope": "public", "resultType": "complete"}
            out = json.loads(t.jsonBody(orjson.dumps(response(1, hinted))))
            self.assertEqual(out["result"], {**hinted, "cacheScope": "private"}, method)

    def test_notWhenNotAsked(self) -> None:
        """Without privateCache a public answer stays public, even when items were removed."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        hinted = {**ANSWERS["tools/list"], "ttlMs": 5, "cacheScope": "public"}
        out = json.loads(t.jsonBody(orjson.dumps(response(1, hinted))))
        self.assertEqual(out["result"]["cacheScope"], "public")
        self.assertEqual(t.removed, 1)

    def test_privateWithoutKeep(self) -> None:
        """privateCache alone activates the stage; resources/read answers are marked too."""
        self.assertEqual(transforms.CACHEABLE, {*LISTS, "resources/read"})
        t = ResponseTransform({1: "resources/read", 2: "tools/call"}, privateCache=True)
        self.assertTrue(t.active)
        read = {"contents": [{"uri": "file:///a", "text": "x"}], "ttlMs": 0, "cacheScope": "public"}
        out = json.loads(t.jsonBody(orjson.dumps(response(1, read))))
        self.assertEqual(out["result"]["cacheScope"], "private")
        call = orjson.dumps(response(2, {"content": [], "cacheScope": "public"}))
        self.assertIs(t.jsonBody(call), call)

    def test_missingOrOddScope(self) -> None:
        """ttlMs without a scope gets private; no hints stays as is; odd values become private."""
        t = ResponseTransform({1: "prompts/list"}, privateCache=True)
        base = ANSWERS["prompts/list"]
        body = orjson.dumps(response(1, {**base, "ttlMs": 10}))
        self.assertEqual(json.loads(t.jsonBody(body))["result"]["cacheScope"], "private")
        plain = orjson.dumps(response(1, base))
        self.assertIs(t.jsonBody(plain), plain)
        already = orjson.dumps(response(1, {**base, "ttlMs": 10, "cacheScope": "private"}))
        self.assertIs(t.jsonBody(already), already)
        for odd in ("PUBLIC", None, 1):
            body = orjson.dumps(response(1, {**base, "cacheScope": odd}))
            self.assertEqual(json.loads(t.jsonBody(body))["result"]["cacheScope"], "private")

    def test_sse(self) -> None:
        """In SSE the listing event's cacheScope is rewritten, other fields kept."""
        t = ResponseTransform({1: "tools/list"}, privateCache=True)
        hinted = {**ANSWERS["tools/list"], "ttlMs": 1, "cacheScope": "public"}
        out = t.feed(b"id: 9\n" + sse(response(1, hinted)))
        self.assertTrue(out.startswith(b"id: 9\nevent: message\ndata: "))
        self.assertEqual(dataOf(out)["result"]["cacheScope"], "private")


class RedactionTests(SynchronousTestCase):
    def test_json(self) -> None:
        """content[].text and structuredContent strings are scrubbed; counts add up."""
        t = ResponseTransform({1: "tools/call"}, redactResult=scrub, resultIds={1})
        self.assertTrue(t.active)
        out = json.loads(t.jsonBody(orjson.dumps(response(1, CALL_RESULT))))
        result = out["result"]
        self.assertEqual(result["content"][0]["text"], "key=[REDACTED]")
        self.assertEqual(result["content"][1], CALL_RESULT["content"][1])
        self.assertEqual(
            result["structuredContent"],
            {"key": "[REDACTED]", "nested": ["[REDACTED]", {"[REDACTED]": 1}], "n": 3},
        )
        self.assertEqual(t.redactedResults, 4)

    def test_onlyAskedIds(self) -> None:
        """Only the responses whose ids were asked for are scrubbed."""
        t = ResponseTransform({1: "tools/call", 2: "tools/call"}, redactResult=scrub, resultIds=[2])
        batch = orjson.dumps([response(1, CALL_RESULT), response(2, CALL_RESULT)])
        out = json.loads(t.jsonBody(batch))
        self.assertEqual(out[0]["result"], CALL_RESULT)
        self.assertNotIn(SECRET, json.dumps(out[1]))
        self.assertEqual(t.redactedResults, 4)
        unasked = ResponseTransform({1: "tools/call"}, redactResult=scrub, resultIds=())
        self.assertFalse(unasked.active)

    def test_perIdRedactors(self) -> None:
        """redactors gives each id its own function, winning over redactResult."""
        calls: list[str] = []

        def tagged(tag: str) -> Any:
            def f(result: Any) -> tuple[Any, int]:
                calls.append(tag)
                return result, 0

            return f

        t = ResponseTransform(
            {1: "tools/call", 2: "prompts/get"},
            redactResult=tagged("default"),
            resultIds={1, 2},
            redactors={2: tagged("two")},
        )
        t.jsonBody(orjson.dumps([response(1, {"content": []}), response(2, {"messages": []})]))
        self.assertEqual(calls, ["default", "two"])

    def test_sse(self) -> None:
        """The result event is rewritten; other events and the event's fields stay in place."""
        t = ResponseTransform({"c": "tools/call"}, redactResult=scrub, resultIds={"c"})
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"d": SECRET}}
        stream = b": hi\n\n" + sse(note) + b"id: 4\nretry: 10\n" + sse(response("c", CALL_RESULT))
        out = t.feed(stream)
        got = events(out)
        self.assertEqual(got[0], b": hi")
        self.assertEqual(got[1], events(sse(note))[0])
        self.assertTrue(got[2].startswith(b"id: 4\nretry: 10\nevent: message\ndata: "))
        self.assertNotIn(SECRET.encode(), got[2])
        self.assertEqual(t.redactedResults, 4)
        self.assertEqual(t.flush(), b"")

    def test_deepResultRefused(self) -> None:
        """A result too deep to scrub becomes an error response for that id, never passes."""
        depth = 1000
        body = b'{"jsonrpc":"2.0","id":1,"result":{"structuredContent":%s"%s"%s}}' % (
            b"[" * depth,
            SECRET.encode(),
            b"]" * depth,
        )
        t = ResponseTransform({1: "tools/call"}, redactResult=scrub, resultIds={1})
        out = json.loads(t.jsonBody(body))
        self.assertEqual(out["id"], 1)
        self.assertEqual(out["error"]["code"], -32015)
        self.assertEqual(t.refused, 1)


class SSETests(SynchronousTestCase):
    def test_eachKindFiltered(self) -> None:
        """Each listing answer is filtered in an SSE stream."""
        for method, result in ANSWERS.items():
            t = ResponseTransform({"r": method}, keep=keep)
            out = t.feed(sse(response("r", result)))
            self.assertEqual(len(listed(dataOf(out)["result"])), 2, method)
            self.assertEqual(t.removed, 1)

    def test_unchangedEventsByteForByte(self) -> None:
        """Events that change nothing (or are not responses) pass byte for byte."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        stream = (
            b": comment\n\nretry: 100\n\n"
            + b'event: message\ndata:{"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
            + b'data: {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "echo"}]}}\n\n'
            + b'data: {"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"admin_reset"}]}}\n\n'
            + b"data\n\n\n\n"
        )
        self.assertEqual(t.feed(stream), stream)
        self.assertEqual(t.flush(), b"")

    def test_quickCheckSkipsParsing(self) -> None:
        """An event without "result" in its bytes is not parsed at all."""
        parsed: list[bytes] = []
        real = ResponseTransform._payload

        def spy(self: ResponseTransform, payload: bytes) -> bytes | None:
            parsed.append(payload)
            return real(self, payload)

        self.patch(ResponseTransform, "_payload", spy)
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        note = b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
        self.assertEqual(t.feed(note * 3 + b": ping\n\n"), note * 3 + b": ping\n\n")
        self.assertEqual(parsed, [])
        t.feed(sse(response(1, ANSWERS["tools/list"])))
        self.assertEqual(len(parsed), 1)

    def test_splitAtEveryOffset(self) -> None:
        """One stream split in two at every byte offset gives the same output."""
        stream = (
            b"\xef\xbb\xbf: start\r\n\r\n"
            + b"id: 1\r\n"
            + sse(response(1, {**ANSWERS["tools/list"], "cacheScope": "public"}), sep=b"\r\n")
            + b'data: {"jsonrpc":"2.0","method":"n"}\r\r'
            + b'data: {"jsonrpc":"2.0",\ndata: "id":2,"result":'
            + orjson.dumps(CALL_RESULT)
            + b"}\n\n"
            + b"data: tail"
        )
        methods = {1: "tools/list", 2: "tools/call"}

        def run(*chunks: bytes) -> tuple[bytes, int, int]:
            t = ResponseTransform(
                methods, keep=keep, privateCache=True, redactResult=scrub, resultIds={2}
            )
            out = b"".join(t.feed(c) for c in chunks) + t.flush()
            return out, t.removed, t.redactedResults

        whole = run(stream)
        self.assertEqual(whole[1:], (1, 4))
        self.assertNotIn(b"admin_reset", whole[0])
        self.assertNotIn(SECRET.encode(), whole[0])
        self.assertIn(b'"cacheScope":"private"', whole[0])
        self.assertTrue(whole[0].startswith(b"\xef\xbb\xbf: start\r\n\r\nid: 1\r\nevent: message"))
        self.assertTrue(whole[0].endswith(b"}\n\ndata: tail"))
        for i in range(len(stream) + 1):
            self.assertEqual(run(stream[:i], stream[i:]), whole, i)
        self.assertEqual(run(*[stream[i : i + 1] for i in range(len(stream))]), whole)

    def test_eventsRelayedAsTheyComplete(self) -> None:
        """A partial event waits; complete events go out at once."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        ping = b": ping\n\n"
        event = sse(response(1, ANSWERS["tools/list"]))
        self.assertEqual(t.feed(ping + event[:20]), ping)
        out = t.feed(event[20:])
        self.assertEqual(listed(dataOf(out)["result"]), ["echo", "add"])
        self.assertTrue(out.endswith(b"\n\n"))

    def test_crlfStream(self) -> None:
        """CRLF streams: the rewritten event keeps CRLF and its other lines in order."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        payload = json.dumps(response(1, ANSWERS["tools/list"]), indent=1).encode().split(b"\n")
        event = b"event: message\r\nid: 3\r\n" + b"".join(b"data: " + p + b"\r\n" for p in payload)
        event += b": after\r\n\r\n"
        out = t.feed(event + b": ping\r\n\r\n")
        lines = out.split(b"\r\n")
        self.assertEqual(lines[:2], [b"event: message", b"id: 3"])
        self.assertTrue(lines[2].startswith(b"data: {"))
        self.assertEqual(listed(json.loads(lines[2][6:])["result"]), ["echo", "add"])
        self.assertEqual(lines[3:], [b": after", b"", b": ping", b"", b""])

    def test_mixedEndingsKeepEventEnd(self) -> None:
        """Data lines ending in CR then a LF blank line: the rewritten event still ends there."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        body = orjson.dumps(response(1, ANSWERS["tools/list"]))
        cut = body.index(b',"result"')
        event = b"data: " + body[:cut] + b"\rid: 2\rdata: " + body[cut:] + b"\n\n"
        out = t.feed(event + b"data: next\n\n")
        self.assertEqual(out[:7], b"id: 2\rd")
        self.assertTrue(out.endswith(b"}\n\ndata: next\n\n"))
        self.assertEqual(listed(dataOf(out.split(b"\n\n")[0])["result"]), ["echo", "add"])

    def test_crOnlyStream(self) -> None:
        """Bare CR line endings delimit lines and events."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        out = t.feed(sse(response(1, ANSWERS["tools/list"]), sep=b"\r") + b": x\r\r")
        self.assertEqual(listed(dataOf(out)["result"]), ["echo", "add"])
        self.assertTrue(out.endswith(b"\r\r: x\r\r"))

    def test_dataFieldRules(self) -> None:
        """One space after the colon is dropped, none required; data lines join with LF."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        body = orjson.dumps(response(1, ANSWERS["tools/list"]))
        cut = body.index(b',"result"')
        a, b = body[:cut], body[cut:]
        out = t.feed(b"data:" + a + b"\ndata:  " + b + b"\n\n")  # " " + b: still valid JSON
        self.assertEqual(listed(dataOf(out)["result"]), ["echo", "add"])

    def test_unterminatedLastEventUnchanged(self) -> None:
        """flush passes an unterminated last event as it is, even one that would change."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        event = sse(response(1, ANSWERS["tools/list"]))[:-1]
        self.assertEqual(t.feed(event), b"")
        self.assertEqual(t.flush(), event)
        self.assertEqual(t.removed, 0)

    def test_malformedEventUnchanged(self) -> None:
        """An event whose data is not JSON passes byte for byte."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        stream = b'data: {"id":1,"result":{"tools":[\n\ndata: result\n\n'
        self.assertEqual(t.feed(stream), stream)

    def test_bomOnlyAtStart(self) -> None:
        """A BOM opening the stream does not hide the first event's data line."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        out = t.feed(b"\xef\xbb\xbf" + sse(response(1, ANSWERS["tools/list"])))
        self.assertTrue(out.startswith(b"\xef\xbb\xbfevent: message\ndata: "))
        self.assertEqual(t.removed, 1)


class HostileUpstreamTests(SynchronousTestCase):
    """Answers shaped so that a client reads more than a naive filter would inspect."""

    def test_escapedKeys(self) -> None:
        """Keys spelled with \\u escapes are still found (no byte-check bypass)."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        data = orjson.dumps(response(1, ANSWERS["tools/list"]))
        data = data.replace(b'"result"', b'"\\u0072esult"').replace(b'"tools"', b'"\\u0074ools"')
        out = t.feed(b"data: " + data + b"\n\n")
        self.assertEqual(listed(dataOf(out)["result"]), ["echo", "add"])
        self.assertIsNot(t.jsonBody(data), data)

    def test_duplicateKeys(self) -> None:
        """A response with a duplicate key is re-serialised as inspected (the last copy)."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        body = (
            b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"admin_reset"}]},'
            b'"result":{"tools":[{"name":"echo"}]}}'
        )
        out = t.jsonBody(body)
        self.assertEqual(out, b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo"}]}}')
        dupId = b'{"jsonrpc":"2.0","id":1,"id":5,"result":{"tools":[]}}'
        self.assertEqual(
            json.loads(t.jsonBody(dupId)), {"jsonrpc": "2.0", "id": 5, "result": {"tools": []}}
        )
        out = t.feed(b"data: " + body + b"\n\n")
        self.assertNotIn(b"admin_reset", out)

    def test_orjsonRefusesClientsAccept(self) -> None:
        """Lone surrogates, invalid UTF-8, huge numbers, a BOM: read leniently and filtered."""
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        good = orjson.dumps(response(1, ANSWERS["tools/list"]))
        for bad in (
            good.replace(b'"echo"', b'"echo\\ud800"'),
            good.replace(b'"echo"', b'"echo\xff"'),
            good.replace(b'"inputSchema":{}', b'"inputSchema":{"max":1e400}'),
            b"\xef\xbb\xbf" + good,
        ):
            out = t.jsonBody(bad)
            self.assertNotIn(b"admin_reset", out, bad)
            self.assertEqual(len(json.loads(out)["result"]["tools"]), 2)
        out = t.feed(b"data: " + good.replace(b'"echo"', b'"echo\\udc00"') + b"\n\n")
        self.assertNotIn(b"admin_reset", out)

    def test_tooDeepToSerialise(self) -> None:
        """A filtered answer orjson cannot serialise (depth > 254) goes out via json."""
        deep: Any = {}
        for _ in range(400):
            deep = {"a": deep}
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        tools = {"tools": [{"name": "echo", "inputSchema": deep}, {"name": "admin_reset"}]}
        out = json.loads(t.jsonBody(json.dumps(response(1, tools)).encode()))
        self.assertEqual(listed(out["result"]), ["echo"])
        self.assertEqual(t.refused, 0)

    def test_tooDeepToParse(self) -> None:
        """An answer too deep for any parser here becomes an error for the watched ids."""
        body = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[' + b"[" * 2000 + b"]" * 2000 + b"]}}"
        t = ResponseTransform({1: "tools/list"}, keep=keep)
        out = json.loads(t.jsonBody(body))
        self.assertEqual((out["id"], out["error"]["code"]), (1, -32015))
        self.assertEqual(t.refused, 1)
