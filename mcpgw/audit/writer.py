# -*- test-case-name: tests.test_audit -*-
"""
The canonical audit file: one JSON object per line, appended with one C{os.write} per line on an
C{O_APPEND} descriptor, from the reactor thread (about 2 µs a line).

C{fsync} policy, never blocking the reactor:
  - C{none}: the page cache decides.
  - C{interval}: group commit; about once a second, if anything was written, one C{fdatasync}
    runs on the audit thread.
  - C{always}: a C{fdatasync} is requested after every line; while one runs, the next lines
    coalesce into the following one (group commit with no timer), so throughput is not capped at
    one sync per request.
L{reopen} (on SIGHUP, after logrotate renamed the file) opens the path anew; the old descriptor is
synced and closed on the audit thread. A failed write (e.g. ENOSPC) keeps the line in memory and
retries it before the next one, so a full disk delays lines instead of losing them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mcpgw.interfaces import IAuditLog

log = Logger()

#: Seconds between group commits with C{fsync: interval}.
SYNC_INTERVAL = 1.0
#: Lines kept in memory while the file cannot be written (then the oldest are dropped, counted).
MAX_BACKLOG = 100_000

#: The audit line's fields are defined once, in L{mcpgw.record.auditLine}.

_tsCache: list[Any] = [-1, b""]


def rfc3339ms(t: float) -> str:
    """
    @return: C{t} as RFC 3339 UTC with milliseconds, e.g. C{2026-11-24T09:30:00.123Z}.
    """
    sec = int(t)
    if sec != _tsCache[0]:
        _tsCache[0] = sec
        _tsCache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    ms = int((t - sec) * 1000)
    return f"{_tsCache[1]}.{ms:03d}Z"


@implementer(IAuditLog)
class AuditWriter:
    """
    Appends audit lines to the canonical file.

    @ivar linesWritten: lines written since start.
    @ivar linesDropped: lines dropped because the backlog overflowed (should stay 0).
    """

    def __init__(self, reactor: Any, path: str, fsync: str = "interval") -> None:
        self._reactor = reactor
        self.path = path
        self.fsync = fsync
        self._fd = -1
        self._dirty = False
        self._syncing = False
        self._syncAgain = False
        self._backlog: list[bytes] = []
        self._loop: LoopingCall | None = None
        self._pool: ThreadPool | None = None
        self.linesWritten = 0
        self.linesDropped = 0

    def open(self) -> None:
        """
        Open (create) the file and start the audit thread. Raises C{OSError} if that fails, so a
        service that cannot audit refuses to start.
        """
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._fd = self._openFd()
        if self.fsync != "none":
            self._pool = ThreadPool(1, 1, "mcpgw-audit")
            self._pool.start()
        if self.fsync == "interval":
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self._reactor
            self._loop.start(SYNC_INTERVAL, now=False)

    def _openFd(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record) + b"\n"
        if self._backlog and not self._flushBacklog():
            self._keep(line)
            return
        try:
            self._writeLine(line)
        except OSError as e:
            self._keep(line)
            log.error(
                "audit write to {path} failed: {e}; keeping lines in memory", path=self.path, e=e
            )
            return
        self.linesWritten += 1
        if self.fsync == "always":
            self._requestSync()
        else:
            self._dirty = True

    def _writeLine(self, line: bytes) -> None:
        n = os.write(self._fd, line)
        while n < len(line):  # only on a full disk or a signal: finish the line
            line = line[n:]
            n = os.write(self._fd, line)

    def _keep(self, line: bytes) -> None:
        self._backlog.append(line)
        if len(self._backlog) > MAX_BACKLOG:
            del self._backlog[0]
            self.linesDropped += 1

    def _flushBacklog(self) -> bool:
        while self._backlog:
            try:
                self._writeLine(self._backlog[0])
            except OSError:
                return False
            del self._backlog[0]
            self.linesWritten += 1
            self._dirty = True
        return True

    def _tick(self) -> None:
        if self._backlog:
            self._flushBacklog()
        if self._dirty:
            self._requestSync()

    def _requestSync(self) -> None:
        self._dirty = False
        if self._pool is None or self._fd < 0:
            return
        if self._syncing:
            self._syncAgain = True
            return
        self._syncing = True
        d = deferToThreadPool(self._reactor, self._pool, os.fdatasync, self._fd)
        d.addErrback(lambda f: log.failure("audit fdatasync failed", f))
        d.addBoth(self._synced)

    def _synced(self, _: object) -> None:
        self._syncing = False
        if self._syncAgain:
            self._syncAgain = False
            self._requestSync()

    def reopen(self) -> None:
        if self._fd < 0:
            return
        try:
            newFd = self._openFd()
        except OSError as e:
            log.error(
                "audit reopen of {path} failed: {e}; still writing the old file",
                path=self.path,
                e=e,
            )
            return
        old, self._fd = self._fd, newFd
        self._retire(old)
        log.info("audit file reopened: {path}", path=self.path)

    def _retire(self, fd: int) -> Deferred[None]:
        def syncClose() -> None:
            try:
                if self.fsync != "none":
                    os.fdatasync(fd)
            finally:
                os.close(fd)

        if self._pool is None:
            syncClose()
            return succeed(None)
        return deferToThreadPool(self._reactor, self._pool, syncClose)

    def close(self) -> Deferred[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._fd < 0:
            return succeed(None)
        self._flushBacklog()
        fd, self._fd = self._fd, -1
        d = self._retire(fd)
        pool = self._pool
        if pool is not None:
            self._pool = None

            def stopPool(result: object) -> object:
                pool.stop()
                return result

            d.addBoth(stopPool)
        return d
