"""
The gcs sink against a real C{fake-gcs-server} on 127.0.0.1 (create-only uploads).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mcpgw.audit.sinks import gcs as gcsmod
from mcpgw.config import BatchConfig, GCSSinkConfig
from tests.sinkservers import FakeGCS, SinkContract

_server: FakeGCS | None = None
BUCKET = "mcpgw-audit"


def server() -> FakeGCS:
    global _server
    if _server is None:
        _server = FakeGCS()
        _server.start()
        _server.client().create_bucket(BUCKET)
    return _server


def tearDownModule() -> None:
    if _server is not None:
        _server.close()


class GCSSinkTests(SinkContract, TestCase):
    """Objects of NDJSON batches, uploaded with if_generation_match=0."""

    name = "gcs-archive"

    def setUp(self) -> None:
        self.gcs = server()
        self.prefix = f"mcpgw/{self._testMethodName}/"
        self.patch(
            os,
            "environ",
            {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"},
        )
        self.patch(gcsmod, "RETRY_DEADLINE", 1.0)  # the shipper's backoff takes over sooner
        self.setUpContract(lines=500, seconds=0.1)

    def sinkConfig(self, name: str, lines: int, seconds: float) -> GCSSinkConfig:
        return GCSSinkConfig(
            name=name,
            bucket=BUCKET,
            prefix=self.prefix,
            endpoint_url=self.gcs.url,
            batch=BatchConfig(lines, seconds),
        )

    def items(self) -> list[tuple[str, bytes]]:
        bucket = self.gcs.client().bucket(BUCKET)
        blobs = sorted(bucket.list_blobs(prefix=self.prefix), key=lambda b: b.name)
        return [(b.name, b.download_as_bytes()) for b in blobs]

    def serverStop(self) -> None:
        self.gcs.stop()

    def serverStart(self) -> None:
        self.gcs.start()

    @inlineCallbacks
    def test_everyLineArrivesExactlyAsWritten(self) -> Any:
        """Every line arrives once, byte for byte, one object per batch."""
        yield self.check_everyLineArrivesExactlyAsWritten(1200)
        blobs = list(self.gcs.client().bucket(BUCKET).list_blobs(prefix=self.prefix))
        self.assertEqual(len(blobs), 3)
        self.assertEqual({b.content_type for b in blobs}, {"application/x-ndjson"})

    @inlineCallbacks
    def test_outageLosesNothing(self) -> Any:
        """fake-gcs-server is killed mid-stream and restarted; nothing is lost."""
        yield self.check_outageLosesNothing()

    @inlineCallbacks
    def test_restartMidBacklogLosesNothing(self) -> Any:
        """A shipper stopped abruptly mid-backlog resumes from its cursor; a batch that was
        stored already answers 412 and counts as shipped, so no object is duplicated."""
        dups = yield self.check_restartMidBacklogLosesNothing()
        self.assertEqual(dups, 0)

    @inlineCallbacks
    def test_existingObjectCountsAsShipped(self) -> Any:
        """An object already stored under a batch's key is not overwritten; the batch counts."""
        self.startShipping()
        self.write(10)
        yield self.waitFor(lambda: self.shippedAll(self.name))
        sink = self.shipper(self.name).sink
        batch = self.shipper(self.name)
        from mcpgw.audit.sinks import Batch

        ((key, data),) = self.items()
        first = self.written[0]
        from mcpgw.audit.sinks import fileIdOf

        again = Batch(fileIdOf(first), 0, len(data), data, 10)
        self.assertEqual(again.objectKey(self.prefix), key)
        yield sink.ship(again)
        self.assertEqual(sink.alreadyStored, 1)
        self.assertEqual(batch.state, "running")


class _RetentionProxy:
    """
    fake-gcs-server does not keep bucket retention policies: this forwards every request to it
    and adds C{retentionPolicy} (C{days}) to the answers about the bucket itself.
    """

    def __init__(self, target: str, days: int) -> None:
        import http.server
        import threading
        import urllib.request

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                req = urllib.request.Request(target + self.path, headers=dict(self.headers))
                with urllib.request.urlopen(req, timeout=10) as r:
                    body = r.read()
                    status = r.status
                if self.path.split("?")[0] == f"/storage/v1/b/{BUCKET}":
                    import json

                    obj = json.loads(body)
                    obj["retentionPolicy"] = {"retentionPeriod": str(proxy.days * 86400)}
                    body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.days = days
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RetentionCheckTests(TestCase):
    """C{min_retention_days}: the sink checks the bucket's retention policy at start."""

    def setUp(self) -> None:
        from twisted.python.threadpool import ThreadPool

        self.gcs = server()
        self.patch(
            os,
            "environ",
            {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"},
        )
        self.pool = ThreadPool(1, 1, "gcs-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def sink(self, url: str, days: int) -> Any:
        from twisted.internet import reactor

        config = GCSSinkConfig(name="gcs", bucket=BUCKET, endpoint_url=url, min_retention_days=days)
        return gcsmod.GCSSink(reactor, config, self.pool)

    @inlineCallbacks
    def test_bucketWithoutRetentionIsRefused(self) -> Any:
        from mcpgw.audit.sinks import SinkRefused

        with self.assertRaises(SinkRefused) as e:
            yield self.sink(self.gcs.url, 30).start()
        self.assertIn("has no retention policy", str(e.exception))

    @inlineCallbacks
    def test_retentionTooShortIsRefusedLongEnoughRuns(self) -> Any:
        from mcpgw.audit.sinks import SinkRefused

        proxy = _RetentionProxy(self.gcs.url, 7)
        self.addCleanup(proxy.close)
        with self.assertRaises(SinkRefused) as e:
            yield self.sink(proxy.url, 30).start()
        self.assertIn("retains objects 7 days, less than min_retention_days (30)", str(e.exception))
        yield self.sink(proxy.url, 7).start()
