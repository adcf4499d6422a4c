#!/usr/bin/env python3
# Vendored verbatim from the shared mcpbench harness: shared/bench/twisted_proxy.py
# (2026-11-24, sha256 9024c4e62b47dae5...). Only this header was added; the file is kept
# as-is (hence the ruff exemption) so it can be diffed against the original.
# Used by bench/run.py (make bench).
# ruff: noqa
"""Minimal Twisted reverse proxy for MCP Streamable HTTP POSTs.

Stand-in for mcpgw's hot path: twisted.web Site -> read the whole body ->
JSON-parse it (stdlib json, or orjson with --orjson) -> forward with
twisted.web.client.Agent over a persistent HTTPConnectionPool -> read the whole
upstream body -> return status, Content-Type, Mcp-Session-Id and body.
No per-request access log (mcpgw would audit asynchronously).

Usage: twisted_proxy.py --port 18101 --upstream http://127.0.0.1:18001/mcp [--orjson]
"""
import argparse
import json
import os
import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.web import resource, server  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool, readBody  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402
from twisted.web.iweb import IBodyProducer  # noqa: E402
from zope.interface import implementer  # noqa: E402

FWD_REQ_HEADERS = (b"content-type", b"accept", b"mcp-session-id", b"mcp-protocol-version",
                   b"authorization", b"last-event-id")
FWD_RESP_HEADERS = (b"content-type", b"mcp-session-id")


@implementer(IBodyProducer)
class BytesProducer:
    """Writes the whole body at once (FileBodyProducer would go through a Cooperator)."""

    __slots__ = ("body", "length")

    def __init__(self, body):
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self):
        pass

    def stopProducing(self):
        pass

    def resumeProducing(self):
        pass


class ProxyResource(resource.Resource):
    isLeaf = True

    def __init__(self, agent, upstream, loads):
        super().__init__()
        self.agent = agent
        self.upstream = upstream.encode()
        self.loads = loads

    def render_POST(self, request):
        body = request.content.read()
        try:
            msg = self.loads(body)  # the "inspect" step: policy would look at msg here
        except ValueError:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}'
        del msg
        self._forward(request, b"POST", body)
        return server.NOT_DONE_YET

    def render_GET(self, request):
        self._forward(request, b"GET", None)
        return server.NOT_DONE_YET

    def render_DELETE(self, request):
        self._forward(request, b"DELETE", None)
        return server.NOT_DONE_YET

    def _forward(self, request, method, body):
        rh = request.requestHeaders
        h = Headers()
        for name in FWD_REQ_HEADERS:
            v = rh.getRawHeaders(name)
            if v:
                h.setRawHeaders(name, v)
        d = self.agent.request(method, self.upstream, h,
                               BytesProducer(body) if body is not None else None)
        d.addCallback(self._got_response, request)
        d.addErrback(self._failed, request)

    @defer.inlineCallbacks
    def _got_response(self, resp, request):
        data = yield readBody(resp)
        if request._disconnected:
            return
        request.setResponseCode(resp.code)
        for name in FWD_RESP_HEADERS:
            v = resp.headers.getRawHeaders(name)
            if v:
                request.responseHeaders.setRawHeaders(name, v)
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
        request.finish()

    def _failed(self, failure, request):
        if request._disconnected:
            return
        request.setResponseCode(502)
        request.setHeader(b"content-type", b"text/plain")
        request.write(("upstream error: %s\n" % failure.getErrorMessage()).encode())
        request.finish()


class QuietSite(server.Site):
    def log(self, request):  # no per-request access log
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18101)
    ap.add_argument("--upstream", default="http://127.0.0.1:18001/mcp")
    ap.add_argument("--orjson", action="store_true", help="parse with orjson instead of json")
    ap.add_argument("--pool", type=int, default=64, help="maxPersistentPerHost")
    a = ap.parse_args()
    loads = json.loads
    if a.orjson:
        import orjson
        loads = orjson.loads
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = a.pool
    pool.cachedConnectionTimeout = 240
    agent = Agent(reactor, pool=pool)
    site = QuietSite(ProxyResource(agent, a.upstream, loads))
    site.displayTracebacks = False
    reactor.listenTCP(a.port, site, backlog=1024, interface=a.host)
    sys.stderr.write("twisted_proxy pid %d on http://%s:%d/mcp -> %s (json=%s)\n"
                     % (os.getpid(), a.host, a.port, a.upstream,
                        "orjson" if a.orjson else "stdlib"))
    sys.stderr.flush()
    reactor.run()


if __name__ == "__main__":
    main()
