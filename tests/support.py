"""
Test fixtures with real sockets on 127.0.0.1: a scriptable, recording upstream (twisted.web),
an in-process gateway, and a blocking HTTP client run in a thread (so SSE arrival times are
measured by a real client, independent of the reactor under test).
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import tempfile
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import attr
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IPullProducer
from twisted.trial.unittest import TestCase
from twisted.web import resource, server
from zope.interface import implementer

from mcpgw.config import config_from_string
from mcpgw.tap import makeService


@attr.s(auto_attribs=True)
class Seen:
    """One request as the upstream saw it."""

    method: str
    uri: str
    headers: list[tuple[str, str]]
    body: bytes
    peer: int

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class ScriptedUpstream(resource.Resource):
    """
    An upstream whose behaviour is chosen by the query string (the gateway forwards it):

      - C{mode=json} (default): 200 JSON echo of the request; C{Mcp-Session-Id: up-session}.
      - C{mode=sse&n=N&gap=S}: N SSE events, S seconds apart, then the end.
      - C{mode=delay&s=S}: the JSON answer after S seconds.
      - C{mode=hang}: never answers.
      - C{mode=reset}: headers and one SSE event, then the connection is aborted.
      - C{mode=status&code=C}: an empty answer with status C.
      - C{mode=big&size=N}: N bytes of body (Content-Length).
      - C{mode=tools} / C{mode=toolsse}: a tools/list answer listing L{TOOL_NAMES}, as JSON or as
        SSE (a notification event, then the answer).
      - C{mode=xtools} / C{mode=xtoolsse}: a tools/list answer listing L{ANNOTATED_TOOLS} (MCP
        2026-07-28 C{x-mcp-header} annotations, one of them invalid), as JSON or as SSE.
      - C{mode=produce&size=N}: N bytes written 64 KiB at a time as the socket drains (a pull
        producer), counting what was produced in C{produced}.
      - C{mode=answer} / C{mode=answersse}: the result C{results[method]} for the request's
        method (by default L{CANNED_RESULTS}: the four listings with C{cacheScope: public}, a
        C{tools/call}, C{resources/read} and C{prompts/get} result holding L{SECRET}), as JSON
        (C{&chunks=N}: the body written in N chunks, no Content-Length; C{&gzip=1}: gzipped (C{&gzip=force}: even when not accepted)
        when the request accepts it, as compressing middleware does) or as the SSE stream
        L{answerStream} (events around the answer that no transform may touch; C{&hold=1}:
        the stream stays open after them, until the gateway goes away); C{&status=N}
        and C{&ctype=T} set the status and the Content-Type. The bytes sent are appended to
        C{sent}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.cancelled: list[float] = []
        self.finishedStreams: list[float] = []
        self.produced = 0
        #: The result answered per method in C{mode=answer} / C{mode=answersse}.
        self.results: dict[str, Any] = json.loads(json.dumps(CANNED_RESULTS))
        #: The body bytes sent in C{mode=answer} / C{mode=answersse}, one entry per request.
        self.sent: list[bytes] = []

    def render(self, request: server.Request) -> Any:
        body = request.content.read() if request.content is not None else b""
        self.seen.append(
            Seen(
                method=request.method.decode(),
                uri=request.uri.decode(),
                headers=[
                    (k.decode(), v.decode())
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                    for v in vs
                ],
                body=body,
                peer=request.getClientAddress().port,
            )
        )
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        mode = args.get("mode", "json")
        pending: list[Any] = []
        request.pending = pending

        def gone(_: object) -> None:
            self.cancelled.append(time.monotonic())
            for call in pending:
                if call.active():
                    call.cancel()

        request.notifyFinish().addErrback(gone)
        if mode == "json":
            return self._json(request, body)
        if mode == "delay":
            pending.append(reactor.callLater(float(args["s"]), self._jsonLater, request, body))
            return server.NOT_DONE_YET
        if mode == "hang":
            return server.NOT_DONE_YET
        if mode == "status":
            request.setResponseCode(int(args["code"]))
            request.setHeader(b"content-length", b"0")
            return b""
        if mode == "big":
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"x" * int(args["size"])
        if mode in ("xtools", "xtoolsse"):
            rid = json.loads(body).get("id") if body else None
            payload = json.dumps(
                {"jsonrpc": "2.0", "id": rid, "result": {"tools": ANNOTATED_TOOLS}}
            ).encode()
            if mode == "xtools":
                request.setHeader(b"content-type", b"application/json")
                return payload
            request.setHeader(b"content-type", b"text/event-stream")
            return (
                b'event: message\ndata: {"jsonrpc":"2.0","method":"x"}\n\ndata: '
                + payload
                + b"\n\n"
            )
        if mode in ("tools", "toolsse"):
            rid = json.loads(body).get("id") if body else None
            tools = [{"name": n, "inputSchema": {"type": "object"}} for n in TOOL_NAMES]
            payload = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}}).encode()
            if mode == "tools":
                request.setHeader(b"content-type", b"application/json")
                return payload
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(
                b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/message"}\n\n'
            )
            request.write(b"event: message\nid: 1\ndata: " + payload + b"\n\n")
            request.finish()
            return server.NOT_DONE_YET
        if mode in ("answer", "answersse"):
            return self._answer(request, body, mode == "answersse", args)
        if mode == "produce":
            total = int(args["size"])
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % total)
            request.registerProducer(_Producer(self, request, total), False)
            return server.NOT_DONE_YET
        if mode in ("sse", "reset"):
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            if "accel" in args:
                request.setHeader(b"x-accel-buffering", args["accel"].encode())
            request.setHeader(b"mcp-session-id", b"up-session")
            n = int(args.get("n", "3"))
            gap = float(args.get("gap", "0.05"))
            self._event(request, 0, n, gap, mode == "reset")
            return server.NOT_DONE_YET
        raise AssertionError(mode)

    def _json(self, request: server.Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"mcp-session-id", b"up-session")
        request.setHeader(b"x-upstream-only", b"yes")
        request.setHeader(b"connection", b"keep-alive, x-hop")
        request.setHeader(b"x-hop", b"must-not-pass")
        request.setHeader(b"keep-alive", b"timeout=5")
        try:
            parsed = json.loads(body) if body else None
            rid = parsed.get("id") if isinstance(parsed, dict) else None
        except ValueError:
            rid = None
        return json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"echo": body.decode()}}).encode()

    def _answer(self, request: server.Request, body: bytes, sse: bool, args: dict[str, str]) -> Any:
        msg = json.loads(body)
        rid = msg.get("id")
        # json.dumps' spacing, not orjson's compact form: a relayed answer is the same bytes only
        # if the gateway left it alone.
        payload = json.dumps({"jsonrpc": "2.0", "id": rid, "result": self.results[msg["method"]]})
        if "status" in args:
            request.setResponseCode(int(args["status"]))
        chunks = int(args.get("chunks", "0"))
        if not sse:
            request.setHeader(b"content-type", args.get("ctype", "application/json").encode())
            data = payload.encode()
            accepts = b",".join(request.requestHeaders.getRawHeaders(b"accept-encoding", []))
            if "gzip" in args and (b"gzip" in accepts or args["gzip"] == "force"):
                request.setHeader(b"content-encoding", b"gzip")
                data = gzip.compress(data)
            self.sent.append(data)
            if not chunks:
                return data
            step = -(-len(data) // chunks)
            for i in range(0, len(data), step):
                request.write(data[i : i + step])
            request.finish()
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", args.get("ctype", "text/event-stream").encode())
        request.setHeader(b"cache-control", b"no-cache")
        pieces = answerStream(rid, payload.encode())
        self.sent.append(b"".join(pieces))
        for piece in pieces:
            request.write(piece)
        if "hold" not in args:
            request.finish()
        return server.NOT_DONE_YET

    def _jsonLater(self, request: server.Request, body: bytes) -> None:
        if not request._disconnected:
            request.write(self._json(request, body))
            request.finish()

    def _event(self, request: server.Request, i: int, n: int, gap: float, reset: bool) -> None:
        if request._disconnected:
            return
        request.write(b'id: %d\nevent: message\ndata: {"n": %d}\n\n' % (i, i))
        if reset:
            request.pending.append(reactor.callLater(0.2, request.transport.abortConnection))
            return
        if i + 1 < n:
            request.pending.append(
                reactor.callLater(gap, self._event, request, i + 1, n, gap, reset)
            )
        else:
            self.finishedStreams.append(time.monotonic())
            request.finish()


@implementer(IPullProducer)
class _Producer:
    def __init__(self, upstream: ScriptedUpstream, request: server.Request, total: int) -> None:
        self.upstream = upstream
        self.request = request
        self.left = total

    def resumeProducing(self) -> None:
        if self.request._disconnected:
            return
        if self.left <= 0:
            self.request.unregisterProducer()
            self.request.finish()
            return
        n = min(65536, self.left)
        self.left -= n
        self.upstream.produced += n
        self.request.write(b"x" * n)

    def stopProducing(self) -> None:
        self.left = 0


#: Tools with C{x-mcp-header} annotations (C{mode=xtools}): C{bad_items} is invalid (an annotation
#: under C{items}, not reachable through C{properties} alone).
ANNOTATED_TOOLS: list[dict[str, Any]] = [
    {
        "name": "execute_sql",
        "inputSchema": {
            "type": "object",
            "properties": {
                "region": {"type": "string", "x-mcp-header": "Region"},
                "limit": {"type": "integer", "x-mcp-header": "Limit"},
                "dry": {"type": "boolean", "x-mcp-header": "Dry"},
                "target": {
                    "type": "object",
                    "properties": {"db": {"type": "string", "x-mcp-header": "Db"}},
                },
                "query": {"type": "string"},
            },
        },
    },
    {
        "name": "bad_items",
        "inputSchema": {
            "type": "object",
            "properties": {
                "names": {"type": "array", "items": {"type": "string", "x-mcp-header": "Name"}}
            },
        },
    },
    {"name": "echo", "inputSchema": {"type": "object"}},
]

#: The tools the scripted upstream lists (C{mode=tools} / C{mode=toolsse}).
TOOL_NAMES = ("echo", "shell_exec", "admin_reset", "http_get", "search_web", "read_file")


#: A secret (an AWS access key id, the C{aws_access_key} built-in) in the canned results.
SECRET = "AKIAIOSFODNN7EXAMPLE"

#: Cache hints as MCP 2026-07-28 puts them on a result.
_PUBLIC = {"cacheScope": "public", "ttlMs": 60000}

#: What C{mode=answer} / C{mode=answersse} answer, per request method.
CANNED_RESULTS: dict[str, Any] = {
    "tools/list": {
        "tools": [
            {"name": n, "inputSchema": {"type": "object"}}
            for n in ("echo", "read_file", "admin_reset", "deploy")
        ],
        **_PUBLIC,
    },
    "resources/list": {
        "resources": [
            {"uri": "file:///srv/docs/guide.md", "name": "guide"},
            {"uri": "file:///srv/secret/keys.txt", "name": "keys"},
            {"uri": "file:///srv/docs/api.md", "name": "api"},
        ],
        **_PUBLIC,
    },
    "resources/templates/list": {
        "resourceTemplates": [
            {"uriTemplate": "file:///srv/docs/{name}", "name": "doc"},
            {"uriTemplate": "file:///srv/secret/{name}", "name": "secret"},
        ],
        **_PUBLIC,
    },
    "prompts/list": {
        "prompts": [{"name": "greet"}, {"name": "leak"}, {"name": "summarise"}],
        **_PUBLIC,
    },
    "tools/call": {
        "content": [
            {"type": "text", "text": f"key={SECRET} ssn: 123-45-6789"},
            {"type": "image", "data": "aGVsbG8=", "mimeType": "image/png"},
            {"type": "text", "text": "nothing to hide"},
        ],
        "structuredContent": {"key": SECRET, "nested": [{"note": f"id {SECRET}"}], "n": 3},
        "isError": False,
    },
    "resources/read": {
        "contents": [{"uri": "file:///srv/docs/guide.md", "text": f"aws {SECRET}"}],
        **_PUBLIC,
    },
    "prompts/get": {
        "messages": [{"role": "user", "content": {"type": "text", "text": f"use {SECRET}"}}]
    },
}


def answerStream(rid: Any, payload: bytes) -> list[bytes]:
    """
    The SSE answer of C{mode=answersse}, as the pieces written: a comment, a notification and a
    server request reusing the client's id (both with L{SECRET} and the word C{result}), the
    answer event (C{payload}, split across two writes), then another notification.
    """
    rid_text = json.dumps(rid).encode()
    secret = SECRET.encode()
    answer = b"id: 7\nevent: message\ndata: " + payload + b"\n\n"
    half = len(answer) // 2
    return [
        b": opened\n\n",
        b'event: message\ndata: {"jsonrpc": "2.0", "method": "notifications/message", '
        b'"params": {"level": "info", "data": "result ' + secret + b'"}}\n\n',
        b'event: message\ndata: {"jsonrpc": "2.0", "id": ' + rid_text + b', "method": '
        b'"sampling/createMessage", "params": {"result": "' + secret + b'"}}\n\n',
        answer[:half],
        answer[half:],
        b'event: message\ndata: {"jsonrpc": "2.0", "method": "notifications/message", '
        b'"params": {"data": "after the result ' + secret + b'"}}\n\n',
    ]


def portOf(listeningPort: Any) -> int:
    """The TCP port number a listening port is bound to."""
    return int(listeningPort.getHost().port)


def freePort() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


class GatewayTestCase(TestCase):
    """Starts a scripted upstream and a gateway in front of it, both on 127.0.0.1."""

    extraConfig = ""
    upstreamPath = "/mcp"
    #: Write the config to C{self.configPath} so that C{self.service.reload()} re-reads it.
    reloadable = False

    def setUp(self) -> Any:
        self.upstream = ScriptedUpstream()
        site = server.Site(self.upstream)
        site.noisy = False
        self.upstreamPort = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(self.upstreamPort.stopListening)
        self.tmp = tempfile.mkdtemp(prefix="mcpgw-test-")
        self.auditPath = os.path.join(self.tmp, "audit.jsonl")
        self.configPath = os.path.join(self.tmp, "mcpgw.yaml")
        d = self.startGateway(self.configText())
        if self.reloadable:
            with open(self.configPath, "w") as f:
                f.write(self.configText())
            self.service.configPath = self.configPath
        return d

    def configText(self) -> str:
        up = portOf(self.upstreamPort)
        return (
            "listen: {host: 127.0.0.1, port: 0}\n"
            "upstreams:\n"
            f"  - {{name: up, url: 'http://127.0.0.1:{up}{self.upstreamPath}', path: /mcp,"
            " headers: {X-Injected: injected-value, Authorization: Bearer upstream-secret},"
            " timeouts: {connect: 2, response: 1}}\n"
            f"audit: {{path: {self.auditPath}, fsync: none, state_dir: {self.tmp}/state}}\n"
            + self.extraConfig
        )

    def startGateway(self, text: str) -> Deferred[None]:
        config = config_from_string(text, source="test.yaml", base_dir=self.tmp)
        self.service = makeService({"config": None, "loaded": config}, reactor)
        self.service.startService()
        self.port = portOf(self.service.port)
        self.addCleanup(self._stopGateway)
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    @inlineCallbacks
    def _stopGateway(self) -> Any:
        if self.service.running:
            yield self.service.stopService()

    def url(self, path: str = "/mcp") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def auditLines(self) -> list[dict[str, Any]]:
        with open(self.auditPath, "rb") as f:
            return [json.loads(line) for line in f]

    def call(
        self,
        method: str = "POST",
        path: str = "/mcp",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        port: int | None = None,
    ) -> Deferred[Reply]:
        return threads.deferToThread(request, port or self.port, method, path, body, headers or {})


@attr.s(auto_attribs=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    chunks: list[tuple[float, bytes]]
    started: float

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float = 10.0,
) -> Reply:
    """A blocking HTTP/1.1 request; SSE lines are timestamped as they arrive."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        hdrs.update(headers)
        started = time.monotonic()
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        chunks: list[tuple[float, bytes]] = []
        data = b""
        if resp.getheader("content-type", "").startswith("text/event-stream"):
            while True:
                line = resp.readline()
                if not line:
                    break
                chunks.append((time.monotonic(), line))
                data += line
        else:
            data = resp.read()
        return Reply(resp.status, resp.getheaders(), data, chunks, started)
    finally:
        conn.close()


def rpc(method: str, params: dict[str, Any] | None = None, id: Any = 1) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg).encode()


class EchoHandler(BaseHTTPRequestHandler):
    """
    A plain threaded upstream for tests that run gateway processes (C{ThreadingHTTPServer}):
    answers every JSON-RPC call with its id and C{{"ok": true}}; C{slow_*} tools take 3 s.
    """

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if str(body.get("params", {}).get("name", "")).startswith("slow_"):
            time.sleep(3.0)
        out = json.dumps({"jsonrpc": "2.0", "id": body.get("id"), "result": {"ok": True}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass
