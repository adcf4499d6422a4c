# -*- test-case-name: tests.test_fleet -*-
"""
The worker's end of its two pipes to the supervisor (the supervisor's end is Twisted's process
transport), and the worker's audit log, which hands each line to the supervisor.

Framing, one message per line, both ways: a worker sends audit lines as they are (a JSON object,
so the line starts with C{{}) and control messages as C{!} followed by a JSON object; the
supervisor sends JSON objects. Audit lines never contain a newline (JSON escapes it).

B{Before the client is answered.} L{PipeWriter.send} writes at once with one C{os.write} when
nothing is queued, in the reactor turn that finishes the request: a worker's response bytes are
only queued on the socket in that turn (L{mcpgw.proxy.server.AuditFirstChannel}) and sent in a
later one, so once a client has its answer the
line is in the pipe, where the worker's death cannot lose it (the supervisor reads the pipe to
its end). The pipe holds L{PIPE_SIZE} bytes (thousands of lines); only while a stalled
supervisor leaves it full are lines queued in the worker, and then sent in order.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcpgw.interfaces import IAuditLog

log = Logger()

#: Bytes a worker's pipe to the supervisor holds (Linux F_SETPIPE_SZ; the default is 64 KiB).
PIPE_SIZE = 1024 * 1024
#: Child descriptors: the listening socket, worker -> supervisor, supervisor -> worker.
LISTEN_FD, TO_SUPERVISOR_FD, FROM_SUPERVISOR_FD = 3, 4, 5
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def enlargePipe(fd: int) -> None:
    """Ask for a L{PIPE_SIZE} pipe (best effort: the system's limit may be lower)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


def control(message: dict[str, Any]) -> bytes:
    """A worker's control message, framed."""
    return b"!" + orjson.dumps(message) + b"\n"


class PipeWriter:
    """
    Writes to a pipe from the reactor thread: at once when nothing is queued, else queued in
    order and written when the pipe has room (an C{IWriteDescriptor} while anything is queued).
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd
        os.set_blocking(fd, False)
        enlargePipe(fd)
        self._queue: list[bytes] = []
        self._drained: list[Deferred[None]] = []
        self.broken = False

    def send(self, data: bytes) -> None:
        if self.broken:
            return
        if self._queue:
            self._queue.append(data)
            return
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._broke(e)
            return
        if n < len(data):
            self._queue.append(data[n:])
            self.reactor.addWriter(self)

    def doWrite(self) -> None:
        while self._queue:
            data = self._queue[0]
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                return
            except OSError as e:
                self._broke(e)
                return
            if n < len(data):
                self._queue[0] = data[n:]
                return
            del self._queue[0]
        self.reactor.removeWriter(self)
        self._fireDrained()

    def whenDrained(self) -> Deferred[None]:
        """Fires when everything sent so far is in the pipe (or the pipe is gone)."""
        if not self._queue or self.broken:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def _broke(self, e: OSError) -> None:
        if e.errno != errno.EPIPE:
            log.error("the pipe to the supervisor failed: {e}", e=e)
        self.broken = True
        if self._queue:
            self._queue.clear()
            self.reactor.removeWriter(self)
        self._fireDrained()

    def _fireDrained(self) -> None:
        waiters, self._drained = self._drained, []
        for d in waiters:
            d.callback(None)

    def fileno(self) -> int:
        return self.fd

    def connectionLost(self, reason: Failure) -> None:
        self.broken = True
        self._fireDrained()

    def logPrefix(self) -> str:
        return "mcpgw-worker-pipe"


class PipeReader:
    """Reads newline-framed messages from a pipe (an C{IReadDescriptor}); C{onEnd} at its end."""

    def __init__(
        self,
        reactor: Any,
        fd: int,
        onMessage: Callable[[bytes], object],
        onEnd: Callable[[], object],
        pending: bytes = b"",
    ) -> None:
        self.reactor = reactor
        self.fd = fd
        os.set_blocking(fd, False)
        self.onMessage = onMessage
        self.onEnd = onEnd
        self._buffer = pending

    def start(self) -> None:
        self.reactor.addReader(self)
        if b"\n" in self._buffer:
            self.reactor.callLater(0, self._deliver)

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        except OSError as e:
            return Failure(e)
        if not data:
            from twisted.internet.main import CONNECTION_DONE

            return CONNECTION_DONE
        self._buffer += data
        self._deliver()
        return None

    def _deliver(self) -> None:
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line:
                self.onMessage(line)

    def fileno(self) -> int:
        return self.fd

    def connectionLost(self, reason: Failure) -> None:
        self.reactor.removeReader(self)
        self.onEnd()

    def logPrefix(self) -> str:
        return "mcpgw-worker-pipe"


@implementer(IAuditLog)
class PipeAuditLog:
    """
    A worker's audit log: every line goes to the supervisor, which writes the host's one
    canonical file (and runs the sinks).

    @ivar linesWritten: lines handed over.
    @ivar failing: never (the supervisor keeps what it cannot write yet).
    @ivar durable: C{fsync: always}: L{write} returns a Deferred that fires once the supervisor
        says the line is synced (its C{synced} acknowledgement, L{synced}), and the worker
        answers the request only then.
    """

    failing = False

    def __init__(self, writer: PipeWriter) -> None:
        self.writer = writer
        self.linesWritten = 0
        self.durable = False
        self._unsynced: deque[tuple[int, Deferred[None]]] = deque()

    def open(self) -> None:
        pass

    def write(self, record: dict[str, Any]) -> Deferred[None] | None:
        self.writer.send(orjson.dumps(record) + b"\n")
        self.linesWritten += 1
        if not self.durable:
            return None
        d: Deferred[None] = Deferred()
        self._unsynced.append((self.linesWritten, d))
        return d

    def synced(self, n: int) -> None:
        """The supervisor synced this worker's lines 1..C{n}."""
        unsynced = self._unsynced
        while unsynced and unsynced[0][0] <= n:
            unsynced.popleft()[1].callback(None)

    def reopen(self) -> None:
        pass  # the supervisor reopens the file

    def close(self) -> Deferred[None]:
        return self.writer.whenDrained()


def readFirst(fd: int) -> tuple[bytes, bytes]:
    """
    Block until the first line of C{fd} (a worker's start message, before its reactor runs).

    @return: the line and what was read after it.
    @raise EOFError: the pipe ended first.
    """
    buffer = b""
    while b"\n" not in buffer:
        data = os.read(fd, 65536)
        if not data:
            raise EOFError("the supervisor closed the pipe before the start message")
        buffer += data
    line, _, rest = buffer.partition(b"\n")
    return line, rest
