"""
An in-process OTLP/HTTP trace receiver for tests (127.0.0.1 only): decodes every POSTed
C{ExportTraceServiceRequest} with C{opentelemetry-proto}, so the spans the gateway writes by hand
are checked by the reference decoder. It can answer with scripted failures (status codes,
C{Retry-After}, delays) to exercise the exporter's retries.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def anyValue(v: Any) -> Any:
    """An OTLP C{AnyValue} as a Python value (ints stay ints)."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [anyValue(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: anyValue(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def spansOf(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """The spans of a decoded request, as plain dicts."""
    out = []
    for rs in request.resource_spans:
        resource = {kv.key: anyValue(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "resource": resource,
                        "scope": (ss.scope.name, ss.scope.version),
                        "name": s.name,
                        "kind": s.kind,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "trace_state": s.trace_state,
                        "flags": s.flags,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "status": (s.status.code, s.status.message),
                        "attributes": {kv.key: anyValue(kv.value) for kv in s.attributes},
                        "links": [
                            {
                                "trace_id": link.trace_id.hex(),
                                "span_id": link.span_id.hex(),
                                "trace_state": link.trace_state,
                                "flags": link.flags,
                            }
                            for link in s.links
                        ],
                    }
                )
    return out


class OTLPReceiver:
    """
    A threaded OTLP/HTTP receiver on 127.0.0.1.

    @ivar spans: every span received (see L{spansOf}).
    @ivar posts: C{(headers, raw body)} of every POST, in arrival order.
    @ivar script: answers to give before the normal 200, each C{(status, headers, delay)};
        consumed one per POST.
    @ivar partial: when set, C{(rejected, message)} sent as a partial success.
    """

    def __init__(self, port: int = 0, path: str = "/v1/traces") -> None:
        self.spans: list[dict[str, Any]] = []
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.script: list[tuple[int, dict[str, str], float]] = []
        self.partial: tuple[int, str] | None = None
        self.onPost: Callable[[], None] | None = None
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver._received(self, body, path)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}{path}"
        self._thread: threading.Thread | None = None

    def _received(self, h: BaseHTTPRequestHandler, body: bytes, path: str) -> None:
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self._lock:
            self.posts.append((headers, body))
            step = self.script.pop(0) if self.script else None
        if self.onPost is not None:
            self.onPost()
        if step is not None:
            status, extra, delay = step
            if delay:
                time.sleep(delay)
            if status != 200:
                h.send_response(status)
                for k, v in extra.items():
                    h.send_header(k, v)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        if h.path != path:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        encoding = headers.get("content-encoding", "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self._lock:
            self.spans.extend(spansOf(request))
        response = ExportTraceServiceResponse()
        if self.partial is not None:
            response.partial_success.rejected_spans = self.partial[0]
            response.partial_success.error_message = self.partial[1]
        out = response.SerializeToString()
        h.send_response(200)
        h.send_header("Content-Type", "application/x-protobuf")
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)

    def start(self) -> OTLPReceiver:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def waitFor(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block (in a thread, not the reactor) until C{n} spans arrived; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.spans) >= n:
                    return list(self.spans)
            time.sleep(0.02)
        with self._lock:
            return list(self.spans)
