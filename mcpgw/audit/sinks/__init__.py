# -*- test-case-name: tests.test_sinks_shipper -*-
"""
Audit sinks: where L{mcpgw.audit.shipper} sends copies of the canonical audit file.

A sink receives a L{Batch} (consecutive complete lines of one canonical file, with the byte range
they occupy) and answers with a Deferred that fires once the remote side has I{acknowledged} the
whole batch; only then does the shipper advance the sink's cursor. A sink never reads the file
and keeps no queue: the file is the queue.

Failures are told apart by exception type:
  - L{SinkRefused} from L{ISink.start}: a startup check found a configuration that must not
    ship (an S3 bucket without Object Lock). The sink does not run; C{/readyz} is not ready.
  - L{BatchRejected} from L{ISink.ship}: the remote side refused the batch for good (a webhook
    4xx other than 408/429). The sink halts, with the batch still unshipped, until a reload.
    L{BatchTooLarge} (413) first makes the shipper retry with half as many lines.
  - anything else: transient; the shipper retries the same batch with exponential backoff and
    jitter (at least L{RetryLater.delay} when given).

Sink libraries (boto3, google-cloud-storage, confluent-kafka, treq) are imported only by the
module of a sink that is configured, so the gateway runs without the C{sinks} extra. A configured
sink whose library is not installed is a configuration error (L{missingLibrary}, called by
L{mcpgw.config}, looks for the modules without importing them): a start, C{mcpgw config check}
and a reload refuse it rather than run a sink that ships nothing. L{SinkUnavailable} remains for
a library that is found but fails to import (a broken install).
"""

from __future__ import annotations

import hashlib
import importlib.util
from typing import TYPE_CHECKING, Any

import attr
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

    from mcpgw.config import SinkConfig

__all__ = [
    "SINKS_INSTALL",
    "SINK_LIBRARIES",
    "Batch",
    "BatchRejected",
    "BatchTooLarge",
    "ISink",
    "PooledSink",
    "RetryLater",
    "SinkRefused",
    "SinkUnavailable",
    "fileIdOf",
    "makeSink",
    "missingLibrary",
]

#: How to install every sink library: the C{sinks} extra of the distribution.
SINKS_INSTALL = "pip install 'rivano-mcpgw[sinks]'"

#: For each sink type, the modules its module imports beyond mcpgw's own dependencies (all from
#: the C{sinks} extra), each with the distribution that provides it.
SINK_LIBRARIES: dict[str, tuple[tuple[str, str], ...]] = {
    "s3": (("boto3", "boto3"), ("botocore", "botocore")),
    "gcs": (
        ("google.cloud.storage", "google-cloud-storage"),
        ("google.auth", "google-auth"),
        ("google.api_core", "google-api-core"),
    ),
    "kafka": (("confluent_kafka", "confluent-kafka"),),
    "webhook": (("treq", "treq"),),
}


class SinkRefused(Exception):
    """A sink's startup check failed; it must not ship (e.g. no Object Lock on the bucket)."""


class SinkUnavailable(Exception):
    """The library a sink needs is not installed (the C{sinks} extra)."""


class BatchRejected(Exception):
    """The remote side refused a batch for good; retrying the same request cannot help."""


class BatchTooLarge(BatchRejected):
    """The remote side refused a batch for its size (HTTP 413); smaller batches may pass."""


class RetryLater(Exception):
    """
    A transient failure with a hint of when to retry (e.g. C{Retry-After}).

    @ivar delay: seconds to wait at least, or C{None}.
    """

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


def fileIdOf(firstLine: bytes) -> str:
    """
    @return: the stable id of a canonical file: 16 hex digits of the SHA-256 of its first line
        (which holds a unique C{request_id}), so it survives renames and differs between hosts.
    """
    return hashlib.sha256(firstLine).hexdigest()[:16]


@attr.frozen
class Batch:
    """
    Consecutive complete lines of one canonical file.

    @ivar fileId: L{fileIdOf} the file.
    @ivar start: byte offset of the first line in the file.
    @ivar end: byte offset just past the last line.
    @ivar data: the bytes C{[start, end)} exactly as in the file (each line ends with C{\\n},
        except possibly the last line of a file that ended with a torn line).
    @ivar lineCount: how many lines C{data} holds.
    """

    fileId: str
    start: int
    end: int
    data: bytes
    lineCount: int

    @property
    def batchId(self) -> str:
        """The batch's stable id: C{<fileId>-<start>-<end>} (zero-padded offsets)."""
        return f"{self.fileId}-{self.start:012d}-{self.end:012d}"

    @property
    def day(self) -> str:
        """C{YYYY/MM/DD} of the first line's C{ts}, or C{undated}."""
        i = self.data.find(b'"ts":"', 0, 4096)
        raw = self.data[i + 6 : i + 16] if i >= 0 else b""
        if len(raw) == 10 and raw[4:5] == b"-" and raw[7:8] == b"-" and raw[:4].isdigit():
            return f"{raw[:4].decode()}/{raw[5:7].decode()}/{raw[8:10].decode()}"
        return "undated"

    def objectKey(self, prefix: str) -> str:
        """An object-store key: C{<prefix>YYYY/MM/DD/<batchId>.jsonl}."""
        return f"{prefix}{self.day}/{self.batchId}.jsonl"

    def lines(self) -> list[bytes]:
        """The lines, without their C{\\n}."""
        return self.data.rstrip(b"\n").split(b"\n") if self.data else []


class ISink(Interface):
    """One configured audit sink (one remote destination)."""

    name = Attribute("The sink's configured, unique name.")
    maxLines = Attribute("Most lines in one batch.")
    maxSeconds = Attribute("Longest a line waits for its batch to fill (0: ship at once).")

    def start() -> Deferred[None]:
        """
        Create clients and run the startup check. Fails with L{SinkRefused} when the sink must
        not ship, with another exception when the check could not be done (retried).
        """

    def ship(batch: Batch) -> Deferred[None]:
        """Send C{batch}; fire once the remote side acknowledged all of it."""

    def stop() -> Deferred[None]:
        """Release clients and threads. Fires when done (or abandoned after a grace period)."""


class PooledSink:
    """
    Base of the sinks whose library calls block (boto3, google-cloud-storage): every call runs on
    the sink's own thread pool.
    """

    def __init__(self, reactor: Any, config: Any, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._config = config
        self._pool = pool
        self.name: str = config.name
        self.maxLines: int = config.batch.max_lines
        self.maxSeconds: float = config.batch.max_seconds

    def _call(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)


def _installed(module: str) -> bool:
    """Whether C{module} can be imported, found without importing it (only its parents)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False
    except ValueError:  # imported already, without a __spec__
        return True


def missingLibrary(kind: str) -> str | None:
    """
    Check that the library a sink type needs is installed, without importing it.

    @param kind: a sink type (C{s3}, C{gcs}, C{kafka}, C{webhook}).
    @return: C{None} if it is, else why not: the first missing module and how to install it.
    """
    for module, distribution in SINK_LIBRARIES.get(kind, ()):
        if not _installed(module):
            source = "" if distribution == module else f" (from {distribution})"
            return (
                f"the {kind} sink needs the Python module {module!r}{source}, which is not "
                f"installed: {SINKS_INSTALL}"
            )
    return None


def makeSink(reactor: Any, config: SinkConfig, pool: ThreadPool) -> ISink:
    """
    Build the sink for C{config}, importing only that sink type's library.

    @param pool: a dedicated, bounded thread pool for the library's blocking calls; the sink
        does not start or stop it.
    @raise SinkUnavailable: its library cannot be imported (a config names only sinks whose
        library is installed, see L{missingLibrary}, so this is a broken install).
    """
    from mcpgw.config import GCSSinkConfig, KafkaSinkConfig, S3SinkConfig, WebhookSinkConfig

    try:
        if isinstance(config, S3SinkConfig):
            from mcpgw.audit.sinks.s3 import S3Sink

            return S3Sink(reactor, config, pool)
        if isinstance(config, GCSSinkConfig):
            from mcpgw.audit.sinks.gcs import GCSSink

            return GCSSink(reactor, config, pool)
        if isinstance(config, KafkaSinkConfig):
            from mcpgw.audit.sinks.kafka import KafkaSink

            return KafkaSink(reactor, config, pool)
        if isinstance(config, WebhookSinkConfig):
            from mcpgw.audit.sinks.webhook import WebhookSink

            return WebhookSink(reactor, config)
    except ImportError as e:
        raise SinkUnavailable(
            f"the {config.type} sink cannot import {e.name or 'its library'} ({e}): {SINKS_INSTALL}"
        ) from None
    raise TypeError(f"unknown sink config {config!r}")
