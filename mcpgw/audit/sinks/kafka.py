# -*- test-case-name: tests.test_sinks_kafka -*-
"""
The C{kafka} sink: one record per audit line, produced with confluent-kafka (librdkafka).

  - Producer settings: C{acks=all}, C{enable.idempotence=true}, C{compression.type=lz4}, after
    the sink's C{config} (which cannot turn the first two off).
  - Record key: the line's C{request_id} (so a re-sent line is dedupable by key); value: the
    line exactly as written, without its C{\\n}; header C{mcpgw-source}: C{<fileId>:<offset>}.
  - L{ship} runs on the sink's thread pool: it produces every line of the batch, then waits until
    librdkafka reported delivery of all of them; a batch with any failed delivery fails as a
    whole and is produced again from the file (duplicates are dedupable by key).
  - A small poll thread serves delivery reports (C{poll(0.1)} in a loop).
  - Backpressure: C{produce()} raising C{BufferError} (librdkafka's queue is full) makes the
    producing thread wait for the queue to drain and try that line again; nothing is dropped,
    and the backlog stays in the canonical file.
  - A fatal producer error (e.g. an idempotence state the broker no longer knows, after a broker
    lost its data) fails the batch and replaces the producer.
  - librdkafka's own log lines are not printed; its last error report is kept and quoted in the
    batch failures the shipper logs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import confluent_kafka
import orjson
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mcpgw.audit.sinks import Batch, ISink
from mcpgw.config import KafkaSinkConfig

#: librdkafka's default delivery timeout for this sink (overridable with config
#: C{message.timeout.ms}); a batch waits this long plus L{WAIT_MARGIN} for its reports.
MESSAGE_TIMEOUT_MS = 120_000
WAIT_MARGIN = 10.0
#: Seconds to wait before retrying a C{produce()} that raised C{BufferError}.
BUFFER_WAIT = 0.05
#: Lines per batch (Kafka batches inside librdkafka; this bounds one cursor step).
MAX_LINES = 5000


class _Delivery:
    """Counts the delivery reports of one batch."""

    def __init__(self, expected: int) -> None:
        self.left = expected
        self.errors: list[str] = []
        self.fatal = False
        self.done = threading.Event()
        self._lock = threading.Lock()
        if expected == 0:
            self.done.set()

    def report(self, err: Any, msg: Any) -> None:
        with self._lock:
            if err is not None:
                self.errors.append(str(err))
                self.fatal = self.fatal or bool(err.fatal())
            self.left -= 1
            if self.left <= 0:
                self.done.set()


@implementer(ISink)
class KafkaSink:
    """Produces every audit line to a topic."""

    def __init__(self, reactor: Any, config: KafkaSinkConfig, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._config = config
        self._pool = pool
        self._producer: Any = None
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closing = threading.Event()
        self.name = config.name
        self.maxLines = MAX_LINES
        self.maxSeconds = 0.0
        self.settings: dict[str, str] = {
            "message.timeout.ms": str(MESSAGE_TIMEOUT_MS),
            "compression.type": "lz4",
            "linger.ms": "5",
            **dict(config.config),
            "bootstrap.servers": ",".join(config.bootstrap_servers),
            "acks": "all",
            "enable.idempotence": "true",
        }
        #: How many times produce() met a full queue (BufferError), for tests and the log.
        self.bufferWaits = 0
        #: The client's last error report (connection refused, authentication, ...).
        self.lastClientError: str | None = None
        self._fatal = False
        self._clientLog = logging.getLogger(f"mcpgw.sinks.kafka.{config.name}")
        self._clientLog.addHandler(logging.NullHandler())
        self._clientLog.propagate = False

    def start(self) -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._pool, self._newProducer)

    def _onError(self, err: Any) -> None:
        self.lastClientError = str(err)
        if err.fatal():
            self._fatal = True

    def _newProducer(self) -> None:
        self._fatal = False
        self._producer = confluent_kafka.Producer(
            {**self.settings, "error_cb": self._onError, "logger": self._clientLog}
        )
        if self._poller is None:
            self._poller = threading.Thread(
                target=self._poll, name=f"mcpgw-sink-{self.name}-poll", daemon=True
            )
            self._poller.start()

    def _poll(self) -> None:
        while not self._stopping.is_set():
            producer = self._producer
            if producer is None:
                time.sleep(0.1)
                continue
            try:
                producer.poll(0.1)
            except Exception as e:  # a fatal error is also raised here
                self.lastClientError = str(e)
                self._fatal = True
                time.sleep(0.1)

    def ship(self, batch: Batch) -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._pool, self._produce, batch)

    def _produce(self, batch: Batch) -> None:
        if self._fatal or self._producer is None:
            # e.g. the broker forgot the idempotent producer's id: start a new producer
            self._newProducer()
        producer = self._producer
        lines = batch.lines()
        delivery = _Delivery(len(lines))
        offset = batch.start
        for line in lines:
            source = f"{batch.fileId}:{offset}".encode()
            offset += len(line) + 1
            try:
                key = orjson.loads(line).get("request_id")
            except (orjson.JSONDecodeError, AttributeError):
                key = None
            while True:
                try:
                    producer.produce(
                        self._config.topic,
                        value=line,
                        key=key.encode() if isinstance(key, str) else None,
                        headers=[("mcpgw-source", source)],
                        on_delivery=delivery.report,
                    )
                    break
                except BufferError:
                    self.bufferWaits += 1
                    if self._closing.wait(BUFFER_WAIT):
                        raise RuntimeError("sink stopping") from None
        timeout = int(self.settings["message.timeout.ms"]) / 1000 + WAIT_MARGIN
        deadline = time.monotonic() + timeout
        while not delivery.done.wait(0.1):
            if self._closing.is_set():
                raise RuntimeError("sink stopping")
            if self._fatal:
                raise RuntimeError(f"fatal producer error: {self.lastClientError}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{delivery.left} deliveries not reported after {timeout:.0f}s "
                    f"(last client error: {self.lastClientError})"
                )
        if delivery.errors:
            self._fatal = self._fatal or delivery.fatal
            raise RuntimeError(
                f"{len(delivery.errors)} of {len(lines)} lines not delivered: {delivery.errors[0]}"
                f" (last client error: {self.lastClientError})"
            )

    def stop(self) -> Deferred[None]:
        self._closing.set()

        def close() -> None:
            producer, self._producer = self._producer, None
            if producer is not None:
                producer.flush(5.0)
            self._stopping.set()

        return deferToThreadPool(self._reactor, self._pool, close)
