"""
The webhook sink against a real HTTPS receiver on 127.0.0.1 (certificate from a test CA).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mcpgw.config import BatchConfig, WebhookSinkConfig
from tests.sinkservers import ShipperHarness, SinkContract, TestCA, WebhookReceiver, freePort
from tests.support import GatewayTestCase, rpc

_ca: TestCA | None = None
_caDir = tempfile.mkdtemp(prefix="mcpgw-webhook-ca-")


def theCA() -> TestCA:
    global _ca
    if _ca is None:
        _ca = TestCA(_caDir)
    return _ca


def tearDownModule() -> None:
    shutil.rmtree(_caDir, ignore_errors=True)


class WebhookSinkTests(SinkContract, TestCase):
    """POSTs of NDJSON batches to a real HTTPS receiver."""

    name = "siem"
    receiver: WebhookReceiver

    @classmethod
    def setUpClass(cls) -> None:
        cls.receiver = WebhookReceiver(theCA())
        cls.receiver.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.receiver.close()

    def setUp(self) -> None:
        self.receiver.requests.clear()
        self.receiver.answers.clear()
        self.receiver.always = None
        if self.receiver._server is None:
            self.receiver.start()
        self.setUpContract()

    def sinkConfig(self, name: str, lines: int, seconds: float, **kw: Any) -> WebhookSinkConfig:
        return WebhookSinkConfig(
            name=name,
            url=self.receiver.url,
            headers=(("Authorization", "Bearer siem-token"), ("X-Tenant", "acme")),
            ca_file=theCA().caFile,
            batch=BatchConfig(lines, seconds),
            **kw,
        )

    def items(self) -> list[tuple[str, bytes]]:
        return [(h["Idempotency-Key"], body) for h, body in self.receiver.requests]

    def serverStop(self) -> None:
        self.receiver.stop()

    def serverStart(self) -> None:
        self.receiver.start()

    @inlineCallbacks
    def test_everyLineArrivesExactlyAsWritten(self) -> Any:
        """Every line arrives once, byte for byte, as NDJSON batches with the sink's headers."""
        yield self.check_everyLineArrivesExactlyAsWritten(1200)
        headers = [h for h, _ in self.receiver.requests]
        self.assertEqual([h["X-Mcpgw-Lines"] for h in headers], ["500", "500", "200"])
        for h in headers:
            self.assertEqual(h["Content-Type"], "application/x-ndjson")
            self.assertEqual(h["Authorization"], "Bearer siem-token")
            self.assertEqual(h["X-Tenant"], "acme")
        self.assertEqual(len({h["Idempotency-Key"] for h in headers}), 3)

    @inlineCallbacks
    def test_outageLosesNothing(self) -> Any:
        """The receiver stops mid-stream, lines keep coming; after it is back all have arrived."""
        yield self.check_outageLosesNothing()

    @inlineCallbacks
    def test_restartMidBacklogLosesNothing(self) -> Any:
        """A shipper stopped abruptly mid-backlog resumes from its cursor; re-sent batches keep
        their Idempotency-Key."""
        yield self.check_restartMidBacklogLosesNothing()

    @inlineCallbacks
    def test_rotationMidStream(self) -> Any:
        """Lines before and after a logrotate rename + reopen all arrive, in order."""
        self.startShipping()
        self.write(700)
        self.rotate()
        self.write(300)
        self.rotate()
        self.write(10)
        yield self.waitFor(
            lambda: self.shippedAll(self.name) and self.shipper(self.name).shippedLines == 1010
        )
        got, _ = self.received()
        self.assertEqual(got, self.allWritten())

    @inlineCallbacks
    def test_retriesOn5xxAnd429(self) -> Any:
        """503 and 429 answers are retried (Retry-After honoured) until the batch is taken."""
        self.receiver.answers = [503, 429, 502]
        self.startShipping()
        self.write(20)
        yield self.waitFor(lambda: self.shippedAll(self.name))
        got, _ = self.received()
        self.assertEqual(got, self.allWritten())
        self.assertIn("HTTP 502", self.shipper(self.name).status()["last_error"])

    @inlineCallbacks
    def test_clientErrorHaltsWithoutSkipping(self) -> Any:
        """A 400 is not retried: the sink halts with the batch unshipped; a reload resumes it."""
        self.receiver.always = 400
        self.startShipping()
        self.write(20)
        yield self.waitFor(lambda: self.shipper(self.name).state == "halted")
        status = self.shipper(self.name).status()
        self.assertIn("HTTP 400", status["last_error"])
        self.assertEqual(status["lag_lines"], 20)
        self.receiver.always = None
        assert self.shipping is not None
        yield self.shipping.reconfigure(self.auditConfig())
        yield self.waitFor(lambda: self.shippedAll(self.name))
        got, _ = self.received()
        self.assertEqual(got, self.allWritten())

    @inlineCallbacks
    def test_certificateOutsideTrustRootIsRefused(self) -> Any:
        """Without ca_file the test CA is not trusted: nothing is sent, the error says why."""
        self.sinks = (
            self.sinkConfig(self.name, 500, 0.1, **{}).__class__(
                name=self.name, url=self.receiver.url, batch=BatchConfig(500, 0.1)
            ),
        )
        self.startShipping()
        self.write(5)
        yield self.waitFor(lambda: self.shipper(self.name).attempts >= 1)
        self.assertEqual(self.receiver.requests, [])
        self.assertEqual(self.shipper(self.name).state, "retrying")


class GatewayWithDeadWebhookTests(GatewayTestCase):
    """A gateway whose webhook sink is down keeps answering; /readyz shows the sink's state."""

    def configText(self) -> str:
        return (
            super()
            .configText()
            .replace(
                "state_dir: " + self.tmp + "/state}",
                "state_dir: " + self.tmp + "/state, sinks: [{type: webhook, name: siem, "
                f"url: 'http://127.0.0.1:{freePort()}/dead', batch: {{max_lines: 10, max_seconds: 0.1}}}}]}}",
            )
        )

    @inlineCallbacks
    def test_requestsUnaffectedAndReadyzShowsLag(self) -> Any:
        """Requests succeed while the sink fails; /readyz stays ready and reports lag and error."""
        shipper = self.service.shipping.shippers["siem"]
        reply = yield self.call(body=rpc("ping", id=0))
        yield ShipperHarness.waitFor(self, lambda: shipper.attempts >= 1)  # type: ignore[arg-type]
        for i in range(1, 20):
            reply = yield self.call(body=rpc("ping", id=i))
            self.assertEqual(reply.status, 200)
        yield ShipperHarness.waitFor(self, lambda: shipper.attempts >= 2)  # type: ignore[arg-type]
        # The shipper counts lines as it scans the file (every batch period): wait for the scan
        # that has seen all 20.
        yield ShipperHarness.waitFor(self, lambda: shipper.lag()[0] >= 20)  # type: ignore[arg-type]
        reply = yield self.call("GET", "/readyz")
        self.assertEqual(reply.status, 200)
        sink = reply.json()["sinks"]["siem"]
        self.assertEqual(sink["state"], "retrying")
        self.assertEqual(sink["lag_lines"], 20)
        self.assertGreater(sink["lag_bytes"], 0)
        self.assertIn("refused", sink["last_error"].lower())
        self.assertTrue(os.path.exists(os.path.join(self.tmp, "state", "siem.cursor.json")))


class GatewayReloadSinksTests(GatewayTestCase):
    """SIGHUP reload with logrotate: a changed sink keeps its cursor, an added one starts."""

    reloadable = True

    def setUp(self) -> Any:
        self.receiver = WebhookReceiver(theCA())
        self.receiver.start()
        self.addCleanup(self.receiver.close)
        self.sinksYaml = self.sinkYaml("siem", 5)
        return super().setUp()

    def sinkYaml(self, name: str, lines: int) -> str:
        return (
            f"{{type: webhook, name: {name}, url: '{self.receiver.url}', "
            f"headers: {{X-Sink: {name}}}, ca_file: '{theCA().caFile}', "
            f"batch: {{max_lines: {lines}, max_seconds: 0.1}}}}"
        )

    def configText(self) -> str:
        return (
            super()
            .configText()
            .replace(
                "state_dir: " + self.tmp + "/state}",
                "state_dir: " + self.tmp + "/state, sinks: [" + self.sinksYaml + "]}",
            )
        )

    def received(self, sink: str) -> list[bytes]:
        return [body for headers, body in self.receiver.requests if headers["X-Sink"] == sink]

    @inlineCallbacks
    def test_reloadChangesAndAddsSinksKeepingCursors(self) -> Any:
        """After rotate + reload, siem (changed) resumes at its cursor, siem2 (added) starts."""
        shipping = self.service.shipping
        for i in range(12):
            yield self.call(body=rpc("ping", id=i))
        yield ShipperHarness.waitFor(
            self,  # type: ignore[arg-type]
            lambda: shipping.shippers["siem"].shippedLines == 12,
        )
        os.rename(self.auditPath, self.auditPath + ".1")
        yield self.call(body=rpc("ping", id=12))  # still the renamed file
        self.sinksYaml = self.sinkYaml("siem", 3) + ", " + self.sinkYaml("siem2", 100)
        with open(self.configPath, "w") as f:
            f.write(self.configText())
        self.service.reload()
        self.assertEqual(self.service.generation.number, 2)
        for i in range(13, 20):
            yield self.call(body=rpc("ping", id=i))
        yield ShipperHarness.waitFor(
            self,  # type: ignore[arg-type]
            lambda: (
                "siem2" in shipping.shippers
                and shipping.shippers["siem"].lag()[1] == 0
                and shipping.shippers["siem2"].shippedLines == 7
            ),
        )
        with open(self.auditPath + ".1", "rb") as f:
            old = f.read()
        with open(self.auditPath, "rb") as f:
            new = f.read()
        self.assertEqual(old.count(b"\n"), 13)
        self.assertEqual(b"".join(self.received("siem")), old + new)
        self.assertEqual(b"".join(self.received("siem2")), new)
        self.assertLessEqual(max(b.count(b"\n") for b in self.received("siem")[-3:]), 3)
