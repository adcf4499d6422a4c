#!/usr/bin/env python3
"""Audit sink shipping throughput: how fast each sink drains a backlog of the canonical file.

    .venv/bin/python bench/sinks_bench.py [--lines 100000] [--sinks s3,gcs,kafka,webhook]

For each sink: writes LINES audit lines (about 430 bytes each, like real ones) to a fresh audit
file, starts the shipper (the same ShippingService the gateway runs, default batch sizes) against
a real server on 127.0.0.1 started here (moto_server, fake-gcs-server, tansu, and an HTTPS
receiver in its own process), and reports lines/s until the sink acknowledged the last line, and
what arrived (checked: every line, once).

    .venv/bin/python bench/sinks_bench.py --receiver PORT [--cert F --key F]

runs only the webhook receiver (used above and by bench/run.py --sink-webhook up): answers 200
to every POST and counts the NDJSON lines it got.
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def receiver(port: int, cert: str | None, key: str | None) -> None:
    """A keep-alive HTTP(S) receiver; GET /count answers the number of lines received."""
    lock = threading.Lock()
    count = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                count[0] += body.count(b"\n")
            self._answer(b'{"ok":true}')

        def do_GET(self) -> None:
            with lock:
                self._answer(str(count[0]).encode())

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    if cert and key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


def log(msg: str) -> None:
    sys.stderr.write("[{}] {}\n".format(time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def writeBacklog(path: str, n: int) -> bytes:
    import orjson

    from mcpgw.audit.writer import rfc3339ms

    lines = []
    for i in range(n):
        lines.append(
            orjson.dumps(
                {
                    "ts": rfc3339ms(time.time()),
                    "request_id": f"{i:024x}",
                    "session_id": "a699c2f4e0b94e7f8c1d2e3f4a5b6c7d",
                    "client_ip": "127.0.0.1",
                    "method": "tools/call",
                    "tool": "echo",
                    "upstream": "bench",
                    "decision": "allow",
                    "rule_id": None,
                    "error": None,
                    "auth_key_id": None,
                    "auth_result": "external",
                    "bytes_in": 1123,
                    "bytes_out": 1187,
                    "status": 200,
                    "duration_ms": 1.746,
                    "transport": "http",
                    "http_method": "POST",
                    "path": "/mcp",
                    "jsonrpc_id": i,
                    "batch_size": None,
                    "protocol_version": "2025-11-25",
                    "redacted": None,
                    "filtered_tools": None,
                }
            )
            + b"\n"
        )
    data = b"".join(lines)
    with open(path, "wb") as f:
        f.write(data)
    return data


def run(a: argparse.Namespace) -> int:
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import deferLater

    from mcpgw.audit.shipper import PathSource, ShippingService
    from mcpgw.config import (
        AuditConfig,
        GCSSinkConfig,
        KafkaSinkConfig,
        ObjectLockConfig,
        S3SinkConfig,
        WebhookSinkConfig,
    )
    from tests.sinkservers import FakeGCS, MotoS3, Tansu, TestCA, freePort, waitForPort

    tmp = tempfile.mkdtemp(prefix="mcpgw-sinks-bench-")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    servers: list[Any] = []
    results: list[tuple[str, int, float, str]] = []
    failed = 0

    def configFor(kind: str) -> tuple[Any, Any]:
        """A sink config and a function counting what arrived."""
        if kind == "s3":
            s3 = MotoS3()
            s3.start()
            servers.append(s3)
            client = s3.client()
            client.create_bucket(Bucket="mcpgw-bench", ObjectLockEnabledForBucket=True)

            def counted() -> bytes:
                keys = sorted(
                    o["Key"]
                    for page in client.get_paginator("list_objects_v2").paginate(
                        Bucket="mcpgw-bench"
                    )
                    for o in page.get("Contents", [])
                )
                return b"".join(
                    client.get_object(Bucket="mcpgw-bench", Key=k)["Body"].read() for k in keys
                )

            return (
                S3SinkConfig(
                    name="s3",
                    bucket="mcpgw-bench",
                    region="us-east-1",
                    endpoint_url=s3.url,
                    object_lock=ObjectLockConfig("GOVERNANCE", 1),
                ),
                counted,
            )
        if kind == "gcs":
            gcs = FakeGCS()
            gcs.start()
            servers.append(gcs)
            gclient = gcs.client()
            gclient.create_bucket("mcpgw-bench")

            def gcounted() -> bytes:
                blobs = sorted(gclient.list_blobs("mcpgw-bench"), key=lambda b: b.name)
                return b"".join(b.download_as_bytes() for b in blobs)

            return GCSSinkConfig(name="gcs", bucket="mcpgw-bench", endpoint_url=gcs.url), gcounted
        if kind == "kafka":
            broker = Tansu()
            broker.start()
            servers.append(broker)
            broker.createTopic("mcpgw-bench")

            def kcounted() -> bytes:
                records = broker.readAll("mcpgw-bench", a.lines, timeout=120)
                return b"".join(m.value() + b"\n" for m in records)

            return (
                KafkaSinkConfig(
                    name="kafka", bootstrap_servers=(broker.bootstrap,), topic="mcpgw-bench"
                ),
                kcounted,
            )
        ca = TestCA(tmp)
        port = freePort()
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--receiver",
                str(port),
                "--cert",
                ca.certFile,
                "--key",
                ca.keyFile,
            ],
        )
        servers.append(proc)
        waitForPort(port)
        context = ssl.create_default_context(cafile=ca.caFile)

        def wcounted() -> bytes:
            n = urllib.request.urlopen(f"https://127.0.0.1:{port}/count", context=context).read()
            return b"%d lines" % int(n)

        return (
            WebhookSinkConfig(name="webhook", url=f"https://127.0.0.1:{port}/", ca_file=ca.caFile),
            wcounted,
        )

    async def bench() -> None:
        nonlocal failed
        for kind in a.sinks.split(","):
            config, counted = configFor(kind)
            directory = os.path.join(tmp, kind)
            os.makedirs(directory)
            path = os.path.join(directory, "audit.jsonl")
            data = writeBacklog(path, a.lines)
            audit = AuditConfig(
                path=path,
                fsync="none",
                state_dir=os.path.join(directory, "state"),
                sinks=(config,),
            )
            service = ShippingService(reactor, audit, PathSource(path))
            log(f"{kind}: shipping a backlog of {a.lines} lines ({len(data) / 1e6:.1f} MB)")
            started = time.perf_counter()
            service.startService()
            shipper = service.shippers[config.name]
            while shipper.lag()[1] > 0 or shipper.shippedLines < a.lines:
                if time.perf_counter() - started > a.timeout:
                    log(f"{kind}: TIMEOUT: {shipper.status()}")
                    failed += 1
                    break
                await deferLater(reactor, 0.01, lambda: None)
            elapsed = time.perf_counter() - started
            status = shipper.status()
            await service.stopService()
            got = counted()
            expected = data if kind != "webhook" else b"%d lines" % a.lines
            check = "ok" if got == expected else f"MISMATCH ({len(got)} vs {len(expected)})"
            if got != expected:
                failed += 1
            results.append((kind, status["shipped_batches"], elapsed, check))
            log(
                f"{kind}: {a.lines / elapsed:,.0f} lines/s ({elapsed:.2f} s, "
                f"{status['shipped_batches']} batches): {check}"
            )

    def stop(_: object) -> None:
        reactor.stop()

    d = ensureDeferred(bench())
    d.addErrback(lambda f: (f.printTraceback(), results.append(("error", 0, 0, str(f.value)))))
    d.addBoth(stop)
    try:
        reactor.run()
    finally:
        for s in servers:
            if isinstance(s, subprocess.Popen):
                s.kill()
                s.wait()
            else:
                s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| sink | lines | batches | seconds | lines/s | check |\n|---|---|---|---|---|---|")
    for kind, batches, elapsed, check in results:
        rate = f"{a.lines / elapsed:,.0f}" if elapsed else "-"
        print(f"| {kind} | {a.lines} | {batches} | {elapsed:.2f} | {rate} | {check} |")
    return 1 if failed or any(r[0] == "error" for r in results) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lines", type=int, default=100_000, help="backlog size")
    ap.add_argument("--sinks", default="s3,gcs,kafka,webhook")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per sink")
    ap.add_argument("--receiver", type=int, help="only run the webhook receiver on this port")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()
    if a.receiver:
        receiver(a.receiver, a.cert, a.key)
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
