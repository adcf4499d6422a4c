"""
In-memory fakes of mcpgw's interfaces, for tests (ours and users') that need no disk or sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mcpgw.audit.sinks import Batch, ISink, SinkRefused
from mcpgw.auth import EXTERNAL, AuthResult
from mcpgw.buckets import TokenBuckets
from mcpgw.interfaces import (
    IAuditLog,
    IAuthenticator,
    IBuckets,
    IResponseSink,
    IStateBackend,
    ITracer,
)

__all__ = [
    "HeldState",
    "MemoryAuditLog",
    "MemorySink",
    "MemoryTracer",
    "RecordingSink",
    "StaticAuthenticator",
]


@implementer(IAuditLog)
class MemoryAuditLog:
    """
    An audit log that keeps records in a list.

    @ivar records: every record written, in order.
    @ivar reopened: how many times L{reopen} was called.
    """

    failing = False
    durable = False

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.reopened = 0
        self.closed = False

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))

    def reopen(self) -> None:
        self.reopened += 1

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


@implementer(IResponseSink)
class RecordingSink:
    """
    Collects one upstream response.

    @ivar done: fires with this sink when the response ended or failed.
    """

    def __init__(self) -> None:
        self.status: int | None = None
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.error: Any = None
        self.midResponse = False
        self.done: Deferred[RecordingSink] = Deferred()

    @property
    def body(self) -> bytes:
        """The body received so far."""
        return b"".join(self.chunks)

    def upstreamResponse(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], transport: Any
    ) -> None:
        self.status, self.reason, self.headers = status, reason, headers

    def upstreamData(self, data: bytes) -> None:
        self.chunks.append(data)

    def upstreamDone(self) -> None:
        self.done.callback(self)

    def upstreamFailed(self, error: Any, midResponse: bool) -> None:
        self.error, self.midResponse = error, midResponse
        self.done.callback(self)


@implementer(ITracer)
class MemoryTracer:
    """
    Keeps the records of ended requests instead of exporting spans.

    @ivar records: every L{mcpgw.record.RequestRecord} received, in order.
    """

    def __init__(self) -> None:
        self.records: list[Any] = []

    def ended(self, record: Any) -> None:
        self.records.append(record)


@implementer(IAuthenticator)
class StaticAuthenticator:
    """
    Answers every request with the same L{AuthResult} (or raises the same error), and counts.

    @ivar calls: the C{(authorization, clientAddress, certIdentity)} of every call.
    """

    mode = "external"
    identityHeader: bytes | None = None
    documents: dict[bytes, bytes] = {}

    def __init__(self, result: AuthResult | Exception = EXTERNAL) -> None:
        self.result = result
        self.calls: list[tuple[bytes | None, str, str | None]] = []

    def authenticate(
        self,
        authorization: bytes | None,
        clientAddress: str,
        certIdentity: str | None,
        identity: bytes | None = None,
        path: bytes = b"",
    ) -> AuthResult:
        self.calls.append((authorization, clientAddress, certIdentity))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def carriesKey(self, value: bytes, presented: bytes | None) -> bool:
        return presented is not None and presented in value

    def headersToDrop(self, clientAddress: str | None) -> frozenset[bytes]:
        return frozenset()


@implementer(ISink)
class MemorySink:
    """
    An audit sink keeping every acknowledged batch.

    @ivar failures: exceptions raised by the next ship() calls, in order.
    @ivar refuse: when set, start() refuses with this reason (L{SinkRefused}).
    @ivar hold: when set, ship() returns this Deferred's result (tests fire it).
    """

    def __init__(self, config: Any) -> None:
        self.name = config.name
        self.maxLines = config.batch.max_lines
        self.maxSeconds = config.batch.max_seconds
        self.batches: list[Batch] = []
        self.attempts: list[Batch] = []
        self.failures: list[Exception] = []
        self.refuse: str | None = None
        self.hold: Deferred[None] | None = None
        self.stopped = False

    def start(self) -> Deferred[None]:
        if self.refuse:
            return defer.fail(SinkRefused(self.refuse))
        return defer.succeed(None)

    def ship(self, batch: Batch) -> Deferred[None]:
        self.attempts.append(batch)
        if self.failures:
            return defer.fail(self.failures.pop(0))
        if self.hold is not None:
            return self.hold
        self.batches.append(batch)
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return defer.succeed(None)

    def data(self) -> bytes:
        """Every shipped byte, in order."""
        return b"".join(b.data for b in self.batches)


@implementer(IStateBackend)
class HeldState:
    """
    A state backend that answers later, as a shared one (Redis) does, with no server: each take
    is decided at once by in-memory token buckets, but its answer is held in an unfired Deferred
    until the test calls L{release} (or L{fail}, which answers every held take the way an
    C{on_error} rule would).

    @ivar held: the held takes, oldest first: C{(kind, key, answer, deferred)}.
    """

    shared = True

    def __init__(self) -> None:
        self.held: list[tuple[str, str, float | None, Deferred[float | None]]] = []

    def buckets(self, kind: str, rate: float, burst: float, maxBuckets: int) -> IBuckets:
        return _HeldBuckets(self, kind, TokenBuckets(rate, burst, maxBuckets))

    def readinessCheck(self) -> tuple[str, bool, Any]:
        return ("state", True, {"backend": "held", "held": len(self.held)})

    def release(self) -> int:
        """Answer every held take with its decision, oldest first; return how many."""
        held, self.held = self.held, []
        for _, _, answer, d in held:
            d.callback(answer)
        return len(held)

    def fail(self, answer: float | None) -> int:
        """Answer every held take with C{answer} (C{None}: allow); return how many."""
        held, self.held = self.held, []
        for _, _, _, d in held:
            d.callback(answer)
        return len(held)


@implementer(IBuckets)
class _HeldBuckets:
    def __init__(self, state: HeldState, kind: str, buckets: TokenBuckets) -> None:
        self._state = state
        self.kind = kind
        self._buckets = buckets
        self.rate, self.burst = buckets.rate, buckets.burst

    def take(self, key: str, now: float) -> Deferred[float | None]:
        d: Deferred[float | None] = Deferred()
        self._state.held.append((self.kind, key, self._buckets.take(key, now), d))
        return d
