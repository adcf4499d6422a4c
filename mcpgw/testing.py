"""
In-memory fakes of mcpgw's interfaces, for tests (ours and users') that need no disk or sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mcpgw.interfaces import IAuditLog, IResponseSink

__all__ = ["MemoryAuditLog", "RecordingSink"]


@implementer(IAuditLog)
class MemoryAuditLog:
    """
    An audit log that keeps records in a list.

    @ivar records: every record written, in order.
    @ivar reopened: how many times L{reopen} was called.
    """

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
