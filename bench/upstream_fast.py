#!/usr/bin/env python3
# Vendored verbatim from the shared mcpbench harness: shared/bench/upstream_fast.py
# (2026-11-24, sha256 4abd2f5700d04e21...). Only this header was added; the file is kept
# as-is (hence the ruff exemption) so it can be diffed against the original.
# Used by bench/run.py (make bench).
# ruff: noqa
"""Minimal, fast MCP-ish Streamable HTTP upstream for benchmarking proxies.

Raw asyncio (uvloop when importable) + httptools parser + orjson (falls back to
stdlib json).  HTTP/1.1 keep-alive, one process, one thread.

POST /mcp (any path is accepted) with a JSON-RPC message or batch:
  initialize                -> result + "Mcp-Session-Id" response header
  notifications/* or a JSON-RPC response (no "method"/"id")  -> 202, empty body
  ping                      -> {}
  tools/list                -> one tool, "echo"
  tools/call  name=echo     -> content=[{"type":"text","text": json(arguments)}]
  resources/list, prompts/list, resources/templates/list -> empty lists
  anything else             -> JSON-RPC error -32601
GET /mcp -> 405 (no server-initiated SSE stream), DELETE /mcp -> 200.
GET /stats -> JSON counts per JSON-RPC method and TCP connections accepted
(GET /stats?reset returns them, then zeroes them): shows how many upstream
requests/connections a proxy makes per client tools/call.
Responses are always Content-Type: application/json (json_response style).
Sessions are issued but not enforced (any or no Mcp-Session-Id is accepted).

Usage: upstream_fast.py --port 18001 [--host 127.0.0.1]
"""
import argparse
import asyncio
import os
import signal
import sys
import uuid

try:
    import orjson

    def jdumps(o):
        return orjson.dumps(o)

    jloads = orjson.loads
except ImportError:  # pragma: no cover
    import json

    def jdumps(o):
        return json.dumps(o, separators=(",", ":")).encode()

    jloads = json.loads

import httptools

PROTOCOL_VERSION = "2025-06-18"
ECHO_TOOL = {
    "name": "echo",
    "description": "Echo the arguments back as text content.",
    "inputSchema": {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "additionalProperties": True,
    },
}

STATS = {}  # JSON-RPC method -> count; plus "_connections", "_get", "_other"


def handle_message(msg, extra_headers):
    """Return a JSON-able response object, or None for notifications/responses."""
    if not isinstance(msg, dict):
        return {"jsonrpc": "2.0", "id": None,
                "error": {"code": -32600, "message": "Invalid Request"}}
    method = msg.get("method")
    mid = msg.get("id")
    k = method if isinstance(method, str) else "_other"
    STATS[k] = STATS.get(k, 0) + 1
    if method is None or mid is None:
        # notification (e.g. notifications/initialized) or a client response
        return None
    params = msg.get("params") or {}
    if method == "tools/call":
        name = params.get("name")
        if name != "echo":
            return {"jsonrpc": "2.0", "id": mid,
                    "error": {"code": -32602, "message": "Unknown tool: %s" % (name,)}}
        args = params.get("arguments") or {}
        return {"jsonrpc": "2.0", "id": mid, "result": {
            "content": [{"type": "text", "text": jdumps(args).decode()}],
            "isError": False}}
    if method == "initialize":
        sid = uuid.uuid4().hex
        extra_headers.append((b"Mcp-Session-Id", sid.encode()))
        return {"jsonrpc": "2.0", "id": mid, "result": {
            "protocolVersion": params.get("protocolVersion") or PROTOCOL_VERSION,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "bench-upstream-fast", "version": "1.0.0"}}}
    if method == "tools/list":
        return {"jsonrpc": "2.0", "id": mid, "result": {"tools": [ECHO_TOOL]}}
    if method == "ping":
        return {"jsonrpc": "2.0", "id": mid, "result": {}}
    if method == "resources/list":
        return {"jsonrpc": "2.0", "id": mid, "result": {"resources": []}}
    if method == "resources/templates/list":
        return {"jsonrpc": "2.0", "id": mid, "result": {"resourceTemplates": []}}
    if method == "prompts/list":
        return {"jsonrpc": "2.0", "id": mid, "result": {"prompts": []}}
    return {"jsonrpc": "2.0", "id": mid,
            "error": {"code": -32601, "message": "Method not found: %s" % (method,)}}


class HTTPProto(asyncio.Protocol):
    __slots__ = ("transport", "parser", "url", "body", "method")

    def __init__(self):
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.body = []
        self.url = b""

    # asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        STATS["_connections"] = STATS.get("_connections", 0) + 1

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(400, b"text/plain", b"bad request", [], close=True)

    def connection_lost(self, exc):
        self.transport = None

    # httptools callbacks
    def on_message_begin(self):
        self.body = []

    def on_url(self, url):
        self.url = url

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        method = self.parser.get_method()
        keep = self.parser.should_keep_alive()
        if method == b"POST":
            raw = b"".join(self.body)
            extra = []
            try:
                msg = jloads(raw)
            except Exception:
                self._send(400, b"application/json", jdumps({
                    "jsonrpc": "2.0", "id": None,
                    "error": {"code": -32700, "message": "Parse error"}}), extra, not keep)
                return
            if isinstance(msg, list):
                out = [r for r in (handle_message(m, extra) for m in msg) if r is not None]
                resp = out if out else None
            else:
                resp = handle_message(msg, extra)
            if resp is None:
                self._send(202, None, b"", extra, not keep)
            else:
                self._send(200, b"application/json", jdumps(resp), extra, not keep)
        elif method == b"GET" and self.url.startswith(b"/stats"):
            self._send(200, b"application/json", jdumps(STATS), [], not keep)
            if b"reset" in self.url:
                STATS.clear()
        elif method == b"GET":
            STATS["_get"] = STATS.get("_get", 0) + 1
            self._send(405, b"text/plain", b"Method Not Allowed", [(b"Allow", b"POST, DELETE")], not keep)
        elif method == b"DELETE":
            self._send(200, None, b"", [], not keep)
        else:
            self._send(405, b"text/plain", b"Method Not Allowed", [], not keep)

    _REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 405: b"Method Not Allowed"}

    def _send(self, status, ctype, body, headers, close):
        if self.transport is None:
            return
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, self._REASONS.get(status, b"OK"))]
        if ctype:
            parts.append(b"Content-Type: " + ctype + b"\r\n")
        for k, v in headers:
            parts.append(k + b": " + v + b"\r\n")
        parts.append(b"Content-Length: %d\r\n" % len(body))
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        self.transport.write(b"".join(parts))
        if close:
            self.transport.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18001)
    ap.add_argument("--no-uvloop", action="store_true")
    a = ap.parse_args()
    if not a.no_uvloop:
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(HTTPProto, a.host, a.port, backlog=1024, reuse_address=True))
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, loop.stop)
    sys.stderr.write("upstream_fast listening on http://%s:%d/mcp (pid %d, loop %s)\n"
                     % (a.host, a.port, os.getpid(), type(loop).__module__))
    sys.stderr.flush()
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
