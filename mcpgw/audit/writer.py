# -*- test-case-name: tests.test_audit -*-
"""
The canonical audit file: one JSON object per line, appended with one C{os.write} per line on an
C{O_APPEND} descriptor, from the reactor thread (about 2 µs a line).

C{fsync} policy, never blocking the reactor:
  - C{none}: the page cache decides.
  - C{interval}: group commit; about once a second, if anything was written, one C{fdatasync}
    runs on the audit thread.
  - C{always}: L{write} returns a Deferred that fires once an C{fdatasync} that started after the
    line was written has returned; the gateway answers the request only then. While one sync
    runs, the next lines coalesce into the following one (group commit with no timer), so
    throughput is not capped at one sync per request.

With C{audit.integrity.chain} (L{mcpgw.audit.chain}), this writer is the chain's one sequencer:
every line gets the next C{seq} and hash when it is appended, in the order it is written. At
start it resumes from the last complete line on disk (cutting an incomplete line a crash left,
counted in the C{chain} line it writes), or, when the file is new, from the newest rotated file
beside it; after a rotation the new file starts with a C{chain} line naming the previous line's
seq and hash. With a signing key it writes signed checkpoint lines every C{checkpoint.lines}
lines or C{checkpoint.seconds} seconds; it writes one at stop in any case.

L{reopen} (on SIGHUP, after logrotate renamed the file) opens the path anew; the old descriptor is
synced and closed on the audit thread. A failed write (e.g. ENOSPC) keeps the line in memory,
retries about once a second and before the next line, so a full disk delays lines instead of
losing them; L{failing} says so meanwhile (C{audit.on_write_failure: refuse} answers 503 then).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mcpgw.audit.chain import (
    Chain,
    chainState,
    checkpointMessage,
    keyId,
    lastChainState,
    previousFile,
    readTail,
    sign,
)
from mcpgw.interfaces import IAuditLog

log = Logger()

#: Seconds between group commits with C{fsync: interval}.
SYNC_INTERVAL = 1.0
#: Seconds between retries while lines cannot be written.
RETRY_INTERVAL = 1.0
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
    @ivar writeFailures: writes (and syncs) that failed since start.
    @ivar lastError: the last write or sync error, or C{None}.
    """

    def __init__(
        self,
        reactor: Any,
        path: str,
        fsync: str = "interval",
        *,
        chain: bool = False,
        signingKey: Ed25519PrivateKey | None = None,
        checkpointLines: int = 10000,
        checkpointSeconds: float = 60.0,
        wallClock: Callable[[], float] = time.time,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self.fsync = fsync
        self._always = fsync == "always"
        self._fd = -1
        self._dirty = False
        self._syncing = False
        self._syncAgain = False
        self._syncFailed = False
        #: Lines not written yet (the file failed), each with its durability waiter.
        self._backlog: list[tuple[bytes, Deferred[None] | None]] = []
        #: Waiters of lines written but not yet covered by a started sync.
        self._waiting: list[Deferred[None]] = []
        self._loop: LoopingCall | None = None
        self._checkpoints: LoopingCall | None = None
        self._retry: Any = None
        self._pool: ThreadPool | None = None
        self._clock = wallClock
        self._chain: Chain | None = Chain() if chain else None
        self._signer = signingKey
        self.keyId = keyId(signingKey.public_key()) if signingKey is not None else None
        self._cpLines = checkpointLines if signingKey is not None else 0
        self._cpSeconds = checkpointSeconds
        self._sinceCheckpoint = 0
        self.linesWritten = 0
        self.linesDropped = 0
        self.writeFailures = 0
        self.lastError: str | None = None

    @property
    def failing(self) -> bool:
        """Lines cannot be written (or synced) right now."""
        return bool(self._backlog) or self._syncFailed

    @property
    def durable(self) -> bool:
        """L{write} returns a Deferred that fires once the line is synced (C{fsync: always})."""
        return self._always

    @property
    def chained(self) -> bool:
        return self._chain is not None

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
        if self._chain is not None:
            self._resume()
            if self._signer is not None:
                self._checkpoints = LoopingCall(self._periodicCheckpoint)
                self._checkpoints.clock = self._reactor
                self._checkpoints.start(self._cpSeconds, now=False)

    def _openFd(self) -> int:
        # A chained writer reads the file's last line to resume from it.
        mode = os.O_RDWR if self._chain is not None else os.O_WRONLY
        return os.open(self.path, mode | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def configChanged(self, audit: Any) -> None:
        """A reload: C{integrity} and C{fsync} are fixed at start; say so if they changed."""
        integrity = audit.integrity
        if (
            integrity.chain != self.chained
            or audit.fsync != self.fsync
            or (integrity.signing_key is not None) != (self._signer is not None)
        ):
            log.warn("audit.fsync and audit.integrity changes take effect at the next restart")

    # -- the chain -----------------------------------------------------------------------

    def _resume(self) -> None:
        """Continue the chain from the file's last complete line, or the previous file's."""
        assert self._chain is not None
        line, torn, at = readTail(self._fd)
        if torn:
            # An incomplete last line: a crash cut it mid-write, so it was never acknowledged
            # (with fsync: always) and cannot be verified; cut it, say so in the chain line.
            os.ftruncate(self._fd, at)
            log.warn(
                "audit file {path} ended with an incomplete line ({n} bytes, a crash): cut it",
                path=self.path,
                n=torn,
            )
        state = chainState(line) if line else None
        source = self.path
        if line is None:
            previous = previousFile(self.path)
            if previous is not None:
                try:
                    state = lastChainState(previous)
                    source = previous
                except (OSError, EOFError) as e:
                    log.warn("cannot read {p} to resume the audit chain: {e}", p=previous, e=e)
        if state is not None:
            self._chain.seq, self._chain.digest = state
            log.info("audit chain resumes after seq {seq} of {source}", seq=state[0], source=source)
        self._event("chain", reason="start", torn_bytes=torn)

    def _event(self, event: str, **fields: Any) -> None:
        """Append a chained line that is not a request (a chain or checkpoint line)."""
        chain = self._chain
        assert chain is not None
        ts = rfc3339ms(self._clock())
        body: dict[str, Any] = {"ts": ts, "event": event}
        if event == "chain":
            # host and a random nonce: no two chain lines are alike, so neither are the files
            # they start (a sink names a file by its first line; two hosts may share a bucket).
            body.update(
                prev_seq=chain.seq,
                prev_hash=chain.digest.hex(),
                host=socket.gethostname(),
                nonce=os.urandom(8).hex(),
            )
        body.update(fields)
        if event == "checkpoint":
            seq, digest = chain.seq, chain.digest.hex()
            sig = None
            if self._signer is not None:
                sig = sign(self._signer, checkpointMessage(seq, digest, ts, fields["reason"]))
            body.update(signed_seq=seq, signed_hash=digest, key_id=self.keyId, sig=sig)
            self._sinceCheckpoint = 0
        self._append(chain.seal(orjson.dumps(body)), None)

    def checkpoint(self, reason: str) -> None:
        """Write a checkpoint line now."""
        if self._chain is not None and self._fd >= 0:
            self._event("checkpoint", reason=reason)

    def _periodicCheckpoint(self) -> None:
        if self._sinceCheckpoint:
            self.checkpoint("seconds")

    # -- writing -------------------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> Deferred[None] | None:
        return self.writeLine(orjson.dumps(record))

    def writeLine(self, body: bytes) -> Deferred[None] | None:
        """
        Append one serialised record (a JSON object, no newline, no C{seq}/C{hash}). This is the
        seam for L{listen.workers}: workers hand their records over whole, and the one process
        that owns the file seals and appends them here, so the host has one chain.

        @return: with C{fsync: always}, a Deferred firing once the line is synced; else C{None}.
        """
        chain = self._chain
        line = chain.seal(body) if chain is not None else body + b"\n"
        waiter: Deferred[None] | None = Deferred() if self._always else None
        self._append(line, waiter)
        if chain is not None:
            self._sinceCheckpoint += 1
            if self._sinceCheckpoint == self._cpLines:
                self.checkpoint("lines")
        return waiter

    def _append(self, line: bytes, waiter: Deferred[None] | None) -> None:
        if self._backlog and not self._flushBacklog():
            self._keep(line, waiter)
            return
        try:
            self._writeLine(line)
        except OSError as e:
            self._keep(line, waiter)
            self._failed(e)
            return
        self.linesWritten += 1
        if self._always:
            if waiter is not None:
                self._waiting.append(waiter)
            self._requestSync()
        else:
            self._dirty = True

    def _writeLine(self, line: bytes) -> None:
        n = os.write(self._fd, line)
        while n < len(line):  # only on a full disk or a signal: finish the line
            line = line[n:]
            n = os.write(self._fd, line)

    def _failed(self, e: OSError) -> None:
        self.writeFailures += 1
        if self.lastError is None:
            log.error(
                "audit write to {path} failed: {e}; keeping lines in memory, retrying",
                path=self.path,
                e=e,
            )
        self.lastError = str(e)
        if self._retry is None or not self._retry.active():
            self._retry = self._reactor.callLater(RETRY_INTERVAL, self._retryBacklog)

    def _retryBacklog(self) -> None:
        self._retry = None
        if self._fd >= 0 and self._backlog and not self._flushBacklog():
            self._retry = self._reactor.callLater(RETRY_INTERVAL, self._retryBacklog)

    def _keep(self, line: bytes, waiter: Deferred[None] | None) -> None:
        self._backlog.append((line, waiter))
        if len(self._backlog) > MAX_BACKLOG:
            _, lost = self._backlog.pop(0)
            self.linesDropped += 1
            if lost is not None:
                lost.callback(None)

    def _flushBacklog(self) -> bool:
        backlog = self._backlog
        written = 0
        ok = True
        while backlog:
            line, waiter = backlog[0]
            try:
                self._writeLine(line)
            except OSError as e:
                self.writeFailures += 1
                self.lastError = str(e)
                ok = False
                break
            del backlog[0]
            written += 1
            if waiter is not None:
                self._waiting.append(waiter)
        if written:
            self.linesWritten += written
            if self._always:
                self._requestSync()
            else:
                self._dirty = True
        if ok and written and self.lastError is not None and not self._syncFailed:
            log.info("audit writes to {path} work again", path=self.path)
            self.lastError = None
        return ok

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
        batch, self._waiting = self._waiting, []
        d = deferToThreadPool(self._reactor, self._pool, os.fdatasync, self._fd)
        d.addCallbacks(self._syncOk, self._syncError)
        d.addBoth(self._synced, batch)

    def _syncOk(self, _: object) -> None:
        if self._syncFailed:
            self._syncFailed = False
            if not self._backlog:
                log.info("audit syncs of {path} work again", path=self.path)
                self.lastError = None

    def _syncError(self, f: Any) -> None:
        log.failure("audit fdatasync failed", f)
        self.writeFailures += 1
        self.lastError = f.getErrorMessage()
        self._syncFailed = True

    def _synced(self, _: object, batch: list[Deferred[None]]) -> None:
        self._syncing = False
        for d in batch:
            d.callback(None)
        if self._syncAgain or self._waiting:
            self._syncAgain = False
            self._requestSync()

    def readinessCheck(self, refuse: bool) -> tuple[str, bool, Any]:
        """For L{mcpgw.health.Readiness.extraChecks}; not ready while failing if C{refuse}."""
        detail = {
            "writing": not self.failing,
            "write_failures": self.writeFailures,
            "backlog_lines": len(self._backlog),
            "last_error": self.lastError,
            "on_write_failure": "refuse" if refuse else "serve",
        }
        return ("audit", not (refuse and self.failing), detail)

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
        oldStat, newStat = os.fstat(old), os.fstat(newFd)
        self._retire(old)
        if (oldStat.st_dev, oldStat.st_ino) == (newStat.st_dev, newStat.st_ino):
            return
        log.info("audit file reopened: {path}", path=self.path)
        if self._chain is not None:
            self._event("chain", reason="rotate", torn_bytes=0)

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
        for loop in (self._loop, self._checkpoints):
            if loop is not None and loop.running:
                loop.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._fd < 0:
            return succeed(None)
        if self._chain is not None:
            self.checkpoint("stop")
        self._flushBacklog()
        fd, self._fd = self._fd, -1
        d = self._retire(fd)
        pool = self._pool

        def release(result: object) -> object:
            waiting, self._waiting = self._waiting, []
            lost, self._backlog = self._backlog, []
            if lost:
                self.linesDropped += len(lost)
                log.error("audit: {n} lines could not be written before stop", n=len(lost))
            for w in [*waiting, *(w for _, w in lost if w is not None)]:
                w.callback(None)
            return result

        d.addBoth(release)
        if pool is not None:
            self._pool = None

            def stopPool(result: object) -> object:
                pool.stop()
                return result

            d.addBoth(stopPool)
        return d
