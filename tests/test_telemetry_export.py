"""
The span exporter on its own (an in-test OTLP/HTTP receiver): batching, gzip, retries with
C{Retry-After}, dropped batches and full queues counted, flush and stop off the reactor. And one
smoke test through a real collector: C{rotel-agent} from the C{rotel} wheel, which receives the
gateway's spans over OTLP/HTTP and forwards them (OTLP/HTTP) to the in-test receiver.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, cast

from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from mcpgw.config import TelemetryConfig
from mcpgw.telemetry import SpanExporter, resourceAttributes
from tests.otlpreceiver import OTLPReceiver
from tests.support import GatewayTestCase, freePort, rpc
from tests.test_telemetry_otlp import record


class ExporterTests(TestCase):
    """L{SpanExporter} against a scripted receiver."""

    def setUp(self) -> None:
        self.receiver = OTLPReceiver().start()
        self.addCleanup(self.receiver.stop)

    def exporter(
        self, endpoint: str | None = None, start: bool = True, **kw: Any
    ) -> SpanExporter:
        exporter = SpanExporter(
            reactor,
            endpoint or self.receiver.endpoint,
            resourceAttributes(TelemetryConfig(service_name="t")),
            **kw,
        )
        if start:
            exporter.start()
        self.addCleanup(exporter.stop)
        return exporter

    @inlineCallbacks
    def test_batches(self) -> Any:
        """More records than a batch: several POSTs, every span delivered once, in order."""
        # Queued before the export thread starts: a thread woken by the first full batch while
        # the loop still submits would drain whatever is queued by then (more, smaller POSTs).
        exporter = self.exporter(start=False)
        exporter.batchSize = 100
        for i in range(250):
            exporter.submit(record(R_SPAN=i + 1))
        exporter.start()
        yield exporter.flush()
        self.assertEqual([int(s["span_id"], 16) for s in self.receiver.spans], list(range(1, 251)))
        self.assertEqual(len(self.receiver.posts), 3)
        self.assertEqual((exporter.exported, exporter.failed, exporter.batches), (250, 0, 3))
        headers = self.receiver.posts[0][0]
        self.assertEqual(headers["content-type"], "application/x-protobuf")
        self.assertNotIn("content-encoding", headers)

    @inlineCallbacks
    def test_batchSizeWakesTheThread(self) -> Any:
        """A full batch is exported without waiting for the interval."""
        exporter = self.exporter()
        exporter.interval = 60.0
        yield deferLater(reactor, 0.05, lambda: None)  # the thread now sleeps with a 1 s wait
        exporter.batchSize = 10
        started = time.monotonic()
        for i in range(10):
            exporter.submit(record(R_SPAN=i + 1))
        spans = yield threads.deferToThread(self.receiver.waitFor, 10, 5.0)
        self.assertEqual(len(spans), 10)
        self.assertLess(time.monotonic() - started, 0.8)  # the 1 s wait was cut short

    @inlineCallbacks
    def test_gzip(self) -> Any:
        """With gzip the body is compressed and says so."""
        exporter = self.exporter(compression="gzip")
        exporter.submit(record())
        yield exporter.flush()
        self.assertEqual(self.receiver.posts[0][0]["content-encoding"], "gzip")
        self.assertEqual(len(self.receiver.spans), 1)

    def test_unknownCompression(self) -> None:
        """Only gzip is supported."""
        self.assertRaises(
            ValueError, SpanExporter, reactor, self.receiver.endpoint, [], compression="br"
        )

    @inlineCallbacks
    def test_retriesHonourRetryAfter(self) -> Any:
        """429/503 with Retry-After are retried after that long; the batch then gets through."""
        self.receiver.script = [(503, {"Retry-After": "0"}, 0), (429, {"Retry-After": "0.2"}, 0)]
        exporter = self.exporter()
        exporter.submit(record())
        started = time.monotonic()
        yield exporter.flush()
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        self.assertEqual(len(self.receiver.posts), 3)
        self.assertEqual((exporter.exported, exporter.failed), (1, 0))

    @inlineCallbacks
    def test_retryBackoffWithoutRetryAfter(self) -> Any:
        """A 502 without Retry-After is retried after about a second (jittered)."""
        self.receiver.script = [(502, {}, 0)]
        exporter = self.exporter()
        exporter.submit(record())
        started = time.monotonic()
        yield exporter.flush()
        self.assertTrue(0.7 <= time.monotonic() - started < 5, time.monotonic() - started)
        self.assertEqual((exporter.exported, exporter.failed), (1, 0))

    @inlineCallbacks
    def test_nonRetryableDropped(self) -> Any:
        """A 400 is not retried: the batch is dropped and counted; the next one goes through."""
        self.receiver.script = [(400, {}, 0)]
        exporter = self.exporter()
        exporter.submit(record())
        yield exporter.flush()
        exporter.submit(record())
        yield exporter.flush()
        self.assertEqual(len(self.receiver.posts), 2)
        self.assertEqual((exporter.exported, exporter.failed), (1, 1))

    @inlineCallbacks
    def test_deadlineBoundsRetries(self) -> Any:
        """A collector that keeps failing: retries stop at the deadline and the batch is dropped."""
        self.receiver.script = [(503, {"Retry-After": "0.1"}, 0)] * 100
        exporter = self.exporter()
        exporter.timeout = 0.5
        exporter.submit(record())
        started = time.monotonic()
        yield exporter.flush()
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual((exporter.exported, exporter.failed), (0, 1))
        self.assertGreater(len(self.receiver.posts), 2)

    @inlineCallbacks
    def test_partialSuccessCounted(self) -> Any:
        """Spans the collector rejects in a partial success are counted as not delivered."""
        self.receiver.partial = (2, "too old")
        exporter = self.exporter()
        for _ in range(5):
            exporter.submit(record())
        yield exporter.flush()
        self.assertEqual((exporter.exported, exporter.failed), (3, 2))

    @inlineCallbacks
    def test_bareEndpointGetsTheTracesPath(self) -> Any:
        """An endpoint without a path (http://host:4318) posts to /v1/traces."""
        exporter = self.exporter(endpoint=f"http://127.0.0.1:{self.receiver.port}")
        self.assertEqual(exporter.endpoint, self.receiver.endpoint)
        exporter.submit(record())
        yield exporter.flush()
        self.assertEqual(len(self.receiver.spans), 1)

    @inlineCallbacks
    def test_encodingErrorCounted(self) -> Any:
        """A record that cannot be encoded fails its batch (counted); the next batch goes out."""
        exporter = self.exporter()
        exporter.submit(("not", "a", "record"))
        yield exporter.flush()
        exporter.submit(record())
        yield exporter.flush()
        self.assertEqual((exporter.exported, exporter.failed), (1, 1))
        self.assertIn("encoding failed", exporter._lastError or "")

    @inlineCallbacks
    def test_threadSurvivesABug(self) -> Any:
        """An unexpected exception in an export is logged and the thread goes on."""
        exporter = self.exporter()
        calls: list[int] = []
        original = exporter._export

        def export(batch: list[Any]) -> None:
            calls.append(len(batch))
            if len(calls) == 1:
                raise RuntimeError("boom")
            original(batch)

        exporter._export = export  # type: ignore[method-assign]
        exporter.submit(record())
        yield exporter.flush()
        exporter.submit(record())
        yield exporter.flush()
        self.assertEqual(len(self.receiver.spans), 1)
        assert exporter._thread is not None
        self.assertTrue(exporter._thread.is_alive())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_fullQueueDropsOldest(self) -> None:
        """submit never blocks: over maxQueue the oldest records go, counted."""
        exporter = SpanExporter(reactor, self.receiver.endpoint, [])
        exporter.maxQueue = 3
        exporter._queue = type(exporter._queue)(maxlen=3)
        for i in range(5):
            exporter.submit(record(R_SPAN=i + 1))
        self.assertEqual(exporter.dropped, 2)
        self.assertEqual([r[1] for r in exporter._queue], [3, 4, 5])

    def test_submitIsCheap(self) -> None:
        """Queueing a record costs microseconds, collector or not (no I/O, no lock wait)."""
        exporter = SpanExporter(reactor, "http://127.0.0.1:9/v1/traces", [])
        rec = record()
        started = time.perf_counter()
        for _ in range(10000):
            exporter.submit(rec)
        self.assertLess((time.perf_counter() - started) / 10000, 50e-6)

    @inlineCallbacks
    def test_stopExportsAndEnds(self) -> Any:
        """stop() exports what is queued on the export thread and fires when it has ended."""
        exporter = self.exporter()
        exporter.interval = 60.0
        for _ in range(3):
            exporter.submit(record())
        reactorThread = threading.get_ident()
        yield exporter.stop()
        self.assertEqual(len(self.receiver.spans), 3)
        assert exporter._thread is not None
        exporter._thread.join(5)  # it fired the Deferred as its last step, and is returning
        self.assertFalse(exporter._thread.is_alive())
        self.assertNotEqual(exporter._thread.ident, reactorThread)
        # flush and stop after the end fire at once
        yield exporter.flush()
        yield exporter.stop()

    @inlineCallbacks
    def test_stopWithCollectorDownIsBounded(self) -> Any:
        """With nothing listening, stop() gives up after stopTimeout and counts the spans."""
        exporter = self.exporter(endpoint=f"http://127.0.0.1:{freePort()}/v1/traces")
        exporter.stopTimeout = 0.5
        exporter.interval = 60.0
        for _ in range(3):
            exporter.submit(record())
        started = time.monotonic()
        yield exporter.stop()
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual((exporter.exported, exporter.failed), (0, 3))

    @inlineCallbacks
    def test_dropsAreLogged(self) -> Any:
        """Undelivered spans are reported in the log (rate-limited)."""
        from twisted.logger import ILogObserver, globalLogPublisher

        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.receiver.script = [(400, {}, 0)] * 2
        exporter = self.exporter()
        exporter.submit(record())
        yield exporter.flush()
        exporter.submit(record())
        yield exporter.flush()
        yield deferLater(reactor, 0.05, lambda: None)
        reports = [e for e in events if "not delivered" in e.get("log_format", "")]
        self.assertEqual(len(reports), 1)  # the second drop is within the report interval
        self.assertEqual(reports[0]["failed"], 1)
        self.assertIn("HTTP 400", reports[0]["error"])


def rotelAgent() -> str | None:
    """The rotel-agent binary shipped in the rotel wheel, if installed."""
    spec = importlib.util.find_spec("rotel")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "rotel-agent")
    return path if os.access(path, os.X_OK) else None


class RealCollectorTests(GatewayTestCase):
    """
    mcpgw -> rotel-agent (a real OpenTelemetry collector: OTLP/HTTP receiver, batch, OTLP/HTTP
    exporter) -> the in-test receiver.
    """

    def setUp(self) -> Any:
        agent = rotelAgent()
        if agent is None:
            raise SkipTest("rotel is not installed (pip install rotel)")
        self.receiver = OTLPReceiver().start()
        self.addCleanup(self.receiver.stop)
        self.rotelPort = freePort()
        rundir = tempfile.mkdtemp(prefix="mcpgw-rotel-")
        self.addCleanup(shutil.rmtree, rundir, True)
        self.rotelLog = os.path.join(rundir, "out.log")
        with open(self.rotelLog, "wb") as out:
            self.rotel = subprocess.Popen(
                [
                    agent,
                    "start",
                    "--otlp-http-endpoint",
                    f"127.0.0.1:{self.rotelPort}",
                    "--otlp-grpc-endpoint",
                    f"127.0.0.1:{freePort()}",
                    "--exporter",
                    "otlp",
                    "--otlp-exporter-protocol",
                    "http",
                    "--otlp-exporter-endpoint",
                    f"http://127.0.0.1:{self.receiver.port}",
                    "--batch-timeout",
                    "100ms",
                    "--pid-file",
                    os.path.join(rundir, "rotel.pid"),
                    "--log-file",
                    os.path.join(rundir, "rotel.log"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.addCleanup(self._stopRotel)
        self._waitListening(self.rotelPort, 10.0)
        return super().setUp()

    def _waitListening(self, port: int, timeout: float) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.rotel.poll() is not None:
                with open(self.rotelLog) as f:
                    raise AssertionError(f"rotel-agent exited: {f.read()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("rotel-agent did not start listening")

    def _stopRotel(self) -> None:
        self.rotel.terminate()
        try:
            self.rotel.wait(10)
        except subprocess.TimeoutExpired:
            self.rotel.kill()
            self.rotel.wait()

    def configText(self) -> str:
        return (
            super().configText()
            + f"telemetry: {{otlp_endpoint: 'http://127.0.0.1:{self.rotelPort}/v1/traces',"
            " service_name: mcpgw-smoke, environment: ci}\n"
        )

    @inlineCallbacks
    def test_spanThroughRotel(self) -> Any:
        """A tools/call's span crosses a real collector intact: ids, name, resource, attributes."""
        reply = yield self.call(
            body=rpc("tools/call", {"name": "echo", "arguments": {}}, id=9),
            headers={"Mcp-Session-Id": "smoke"},
        )
        self.assertEqual(reply.status, 200)
        yield self.service.telemetry.flush()
        spans = yield threads.deferToThread(self.receiver.waitFor, 1, 15.0)
        self.assertEqual(len(spans), 1, "no span came out of rotel")
        span, line = spans[0], self.auditLines()[-1]
        self.assertEqual((span["trace_id"], span["span_id"]), (line["trace_id"], line["span_id"]))
        self.assertEqual(span["name"], "tools/call echo")
        self.assertEqual(span["kind"], 2)
        self.assertEqual(span["resource"]["service.name"], "mcpgw-smoke")
        self.assertEqual(span["resource"]["deployment.environment.name"], "ci")
        attrs = span["attributes"]
        self.assertEqual(attrs["request_id"], line["request_id"])
        self.assertEqual(attrs["mcp.session.id"], "smoke")
        self.assertEqual(attrs["mcp.payload.bytes_out"], line["bytes_out"])
        self.assertEqual(attrs["operation.name"], "mcp.server.request")
