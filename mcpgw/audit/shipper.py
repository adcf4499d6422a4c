# -*- test-case-name: tests.test_sinks_shipper -*-
"""
Ships copies of the canonical audit file to the configured sinks, reading the file forward from a
persisted cursor per sink. The file is the only queue: a sink that is down or slow only grows its
lag (bytes of the file not yet acknowledged), and never touches the request path, which appends
lines with one C{os.write} and knows nothing about sinks.

One L{SinkShipper} per sink, all children of one L{ShippingService}:

  - B{Cursor}: C{<audit.state_dir>/<sink name>.cursor.json} holds the file (device, inode and
    L{fileIdOf} its first line), the acknowledged byte offset, the files that follow it (after
    rotations) and the batch in flight, if any. It is written atomically (temporary file, fsync,
    rename, fsync of the directory) before a batch is sent (with the batch's byte range) and
    after the sink acknowledged it (with the new offset). After a restart the batch in flight is
    sent again with exactly the same range, hence the same object key / Idempotency-Key.
  - B{Batches}: complete lines of one file, at most the sink's C{max_lines} (and
    L{MAX_BATCH_BYTES}), shipped when full, when its first line has waited C{max_seconds}, when
    the file is finished (rotated), or at stop. One batch in flight per sink; the same bytes are
    retried until acknowledged, with exponential backoff and jitter.
  - B{Rotation}: logrotate renames the file and the gateway reopens the path on SIGHUP. The
    shipper identifies files by device and inode, keeps a read descriptor open on every file a
    sink still needs (so a rename, or even a delete or compress, loses nothing while it runs),
    and follows the file the audit writer I{has open}: only once the writer moved to a new file
    is the old one finished, after its last byte was shipped. A file is never re-read by name.
  - B{Threads}: file reads, cursor writes and the sink libraries' blocking calls run on the
    sink's own one-thread pool, never on the reactor or its shared pool.

State per sink (L{SinkShipper.status}): C{state} (C{starting}, C{running}, C{retrying},
C{refused}, C{halted}, C{unavailable}, C{stopped}), lag in lines and bytes, last success, last
error. It is in C{/readyz} and logged every L{STATUS_INTERVAL} while a sink lags or fails.
"""

from __future__ import annotations

import os
import random
import stat
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import attr
import orjson
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mcpgw.audit.sinks import (
    Batch,
    BatchRejected,
    BatchTooLarge,
    ISink,
    RetryLater,
    SinkRefused,
    SinkUnavailable,
    fileIdOf,
    makeSink,
)
from mcpgw.audit.writer import rfc3339ms
from mcpgw.config import AuditConfig, SinkConfig

log = Logger()

#: Seconds between looks at the file when a sink has nothing to ship.
POLL_INTERVAL = 0.5
#: Largest batch, in bytes, whatever C{max_lines} says.
MAX_BATCH_BYTES = 16 * 1024 * 1024
#: Retry delays: C{BACKOFF_BASE * 2**(attempt-1)}, at most C{BACKOFF_MAX}, with jitter (the
#: delay is drawn from its upper half).
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
#: Seconds before a refused sink's startup check is tried again (a reload also retries it).
REFUSED_RECHECK = 300.0
#: Seconds a stopping sink may spend shipping what is left (and finishing its batch in flight).
STOP_GRACE = 5.0
#: Seconds between status log lines for sinks that lag or fail.
STATUS_INTERVAL = 60.0
#: Most bytes counted per step for the lag in lines.
SCAN_BUDGET = 64 * 1024 * 1024
#: Read size for the file.
READ_CHUNK = 4 * 1024 * 1024
#: Suffix of a sink's cursor file in C{state_dir}.
CURSOR_SUFFIX = ".cursor.json"


# -- Files ------------------------------------------------------------------------------------


class TrackedFile:
    """
    A canonical audit file held open for reading, shared by the sinks that still need it.

    @ivar ident: C{(st_dev, st_ino)}.
    @ivar fileId: L{fileIdOf} its first line, once known.
    """

    def __init__(self, fd: int, ident: tuple[int, int], path: str) -> None:
        self.fd = fd
        self.ident = ident
        self.path = path
        self.fileId: str | None = None
        self.refs = 0

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def describe(self) -> dict[str, Any]:
        return {"dev": self.ident[0], "ino": self.ident[1], "id": self.fileId, "path": self.path}


class PathSource:
    """The audit file as found at its path (for a shipper running without the writer)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def open(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)


class WriterSource(PathSource):
    """
    The file the in-process L{mcpgw.audit.writer.AuditWriter} has open: after logrotate renamed
    the path, its lines still go to the old file until the writer reopens, so that is the file
    to follow, whatever is at the path.
    """

    def __init__(self, writer: Any) -> None:
        super().__init__(writer.path)
        self._writer = writer

    def _fd(self) -> int:
        return int(getattr(self._writer, "_fd", -1))

    def identity(self) -> tuple[int, int] | None:
        fd = self._fd()
        if fd < 0:
            return super().identity()
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino)

    def open(self) -> int:
        fd = self._fd()
        if fd >= 0:
            try:  # the same inode, wherever it was renamed
                return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
        return super().open()


class FileTracker:
    """Opens the canonical files once, for all sinks, and knows which one is being written."""

    def __init__(self, source: PathSource) -> None:
        self.source = source
        self.files: dict[tuple[int, int], TrackedFile] = {}
        self._newest: TrackedFile | None = None

    def current(self) -> TrackedFile | None:
        """The file being written now (opened if new), or C{None} if it cannot be opened."""
        ident = self.source.identity()
        if ident is None:
            return self._newest
        if self._newest is not None and self._newest.ident == ident:
            return self._newest
        try:
            fd = self.source.open()
        except OSError as e:
            log.warn("audit shipping cannot open {path}: {e}", path=self.source.path, e=e)
            return self._newest
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ident:  # renamed again meanwhile: next look
            os.close(fd)
            return self._newest
        tf = self.adopt(fd, ident, self.source.path)
        if self._newest is not None:
            self.release(self._newest)
        tf.refs += 1
        self._newest = tf
        return tf

    def adopt(self, fd: int, ident: tuple[int, int], path: str) -> TrackedFile:
        """Register an open descriptor (closing it if that file is already tracked)."""
        known = self.files.get(ident)
        if known is not None:
            os.close(fd)
            return known
        tf = self.files[ident] = TrackedFile(fd, ident, path)
        return tf

    def release(self, tf: TrackedFile) -> None:
        tf.refs -= 1
        if tf.refs <= 0 and self.files.get(tf.ident) is tf:
            del self.files[tf.ident]
            os.close(tf.fd)

    def closeAll(self) -> None:
        for tf in self.files.values():
            os.close(tf.fd)
        self.files.clear()
        self._newest = None


def _firstLine(fd: int, finished: bool) -> bytes | None:
    head = os.pread(fd, 65536, 0)
    nl = head.find(b"\n")
    if nl >= 0:
        return head[: nl + 1]
    return head if finished and head else None


def findFiles(
    directory: str, wanted: list[dict[str, Any]]
) -> list[tuple[int, tuple[int, int], str] | None]:
    """
    Find files by device and inode in C{directory} (where logrotate leaves rotated files),
    checking the first-line id when known. Runs in a thread.

    @return: for each wanted entry, C{(fd, ident, path)} opened for reading, or C{None}.
    """
    byIdent: dict[tuple[int, int], str] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        names = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            byIdent[(st.st_dev, st.st_ino)] = path
    found: list[tuple[int, tuple[int, int], str] | None] = []
    for entry in wanted:
        ident = (int(entry["dev"]), int(entry["ino"]))
        hit = byIdent.get(ident)
        fd = -1
        if hit is not None:
            try:
                fd = os.open(hit, os.O_RDONLY | os.O_CLOEXEC)
                st = os.fstat(fd)
                first = _firstLine(fd, True)
                if (st.st_dev, st.st_ino) != ident or (
                    entry.get("id") and (first is None or fileIdOf(first) != entry["id"])
                ):
                    os.close(fd)
                    fd = -1
            except OSError:
                fd = -1
        found.append((fd, ident, hit) if fd >= 0 and hit is not None else None)
    return found


# -- Cursor files -----------------------------------------------------------------------------


def cursorPath(stateDir: str, name: str) -> str:
    return os.path.join(stateDir, name + CURSOR_SUFFIX)


def loadCursor(stateDir: str, name: str) -> dict[str, Any] | None:
    """@return: a sink's saved cursor, or C{None} if it has none. Runs in a thread."""
    try:
        with open(cursorPath(stateDir, name), "rb") as f:
            state = orjson.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as e:
        log.error("sink {name}: unreadable cursor ({e}); starting over", name=name, e=e)
        return None
    return state if isinstance(state, dict) else None


def saveCursor(stateDir: str, name: str, state: dict[str, Any]) -> None:
    """Write a cursor atomically and durably: temporary file, fsync, rename, fsync dir."""
    path = cursorPath(stateDir, name)
    tmp = f"{path}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        data = orjson.dumps(state)
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(stateDir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- Reading ----------------------------------------------------------------------------------


@attr.frozen
class _ReadPlan:
    """What one read step looks at (a snapshot taken on the reactor)."""

    fds: tuple[int, ...]
    bufEnd: int
    wantLines: int
    wantBytes: int
    exactEnd: int | None
    scanIdx: int
    scanOff: int
    needIds: tuple[int, ...]


@attr.frozen
class _ReadResult:
    data: bytes
    lines: int
    bufEnd: int
    headSize: int
    scanIdx: int
    scanOff: int
    scanLines: int
    ids: dict[int, str]


def _takeLines(data: bytes, maxLines: int) -> tuple[int, int]:
    """@return: (bytes, lines) of the longest prefix of complete lines, at most C{maxLines}."""
    n = data.count(b"\n")
    if n <= maxLines:
        return (data.rfind(b"\n") + 1, n)
    pos = -1
    for _ in range(maxLines):
        pos = data.find(b"\n", pos + 1)
    return (pos + 1, maxLines)


def readStep(plan: _ReadPlan) -> _ReadResult:
    """Read new lines for the batch and count the lag in lines. Runs in the sink's thread."""
    last = len(plan.fds) - 1
    ids: dict[int, str] = {}
    for i in plan.needIds:
        first = _firstLine(plan.fds[i], i < last)
        if first is not None:
            ids[i] = fileIdOf(first)
    # Lag in lines: count forward from the scan position.
    idx, off, counted, budget = plan.scanIdx, plan.scanOff, 0, SCAN_BUDGET
    while idx <= last and budget > 0:
        fd = plan.fds[idx]
        size = os.fstat(fd).st_size
        final = idx < last
        while off < size and budget > 0:
            chunk = os.pread(fd, min(READ_CHUNK, size - off, budget), off)
            if not chunk:
                break
            budget -= len(chunk)
            if final:  # finished file: every byte counts, a torn last line too
                counted += chunk.count(b"\n")
                off += len(chunk)
                if off == size and not chunk.endswith(b"\n"):
                    counted += 1
                continue
            nl = chunk.rfind(b"\n")
            if nl < 0:
                break
            counted += chunk.count(b"\n", 0, nl + 1)
            off += nl + 1
        if not final or off < size:
            break
        idx, off = idx + 1, 0
    # The batch: complete lines from bufEnd, in the first file only.
    head = plan.fds[0]
    headSize = os.fstat(head).st_size
    data, lines = b"", 0
    end = plan.exactEnd if plan.exactEnd is not None else headSize
    want = min(end - plan.bufEnd, plan.wantBytes)
    if want > 0 and plan.wantLines > 0:
        raw = os.pread(head, want, plan.bufEnd)
        if plan.exactEnd is not None:
            data, lines = raw, raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
        else:
            taken, lines = _takeLines(raw, plan.wantLines)
            finished = last > 0 and plan.bufEnd + len(raw) == headSize
            if finished and taken < len(raw) and lines < plan.wantLines:
                taken, lines = len(raw), lines + 1  # torn final line of a finished file
            elif taken == 0 and len(raw) >= plan.wantBytes == MAX_BATCH_BYTES:
                taken, lines = len(raw), 1  # a "line" longer than a batch: ship it in parts
            data = raw[:taken]
    return _ReadResult(data, lines, plan.bufEnd + len(data), headSize, idx, off, counted, ids)


# -- One sink ---------------------------------------------------------------------------------


def _daemonThread(**kwargs: Any) -> threading.Thread:
    return threading.Thread(daemon=True, **kwargs)


class SinkShipper(Service):
    """
    Ships the canonical file to one sink (see the module docstring).

    @ivar state: C{starting}, C{running}, C{retrying}, C{refused}, C{halted}, C{unavailable} or
        C{stopped}.
    """

    def __init__(
        self,
        reactor: Any,
        config: SinkConfig,
        tracker: FileTracker,
        stateDir: str,
        sinkFactory: Callable[[Any, SinkConfig, ThreadPool], ISink] = makeSink,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.setName(config.name)
        self.tracker = tracker
        self.stateDir = stateDir
        self._sinkFactory = sinkFactory
        self.sink: ISink | None = None
        self.pool = ThreadPool(1, 1, f"mcpgw-sink-{config.name}")
        self.pool.threadFactory = _daemonThread  # type: ignore[assignment]
        self.state = "starting"
        self.chain: list[TrackedFile] = []
        self.pos = 0
        self._chunks: list[bytes] = []
        self._bufLines = 0
        self._bufEnd = 0
        self._firstSeen: float | None = None
        self._exactEnd: int | None = None
        self._scanIdx = 0
        self._scanOff = 0
        self._aheadLines = 0
        self._inflight: tuple[int, int] | None = None
        self._maxLinesNow: int | None = None
        self._busy = False
        self._timer: Any = None
        self._stopping = False
        self._flushing = False
        self._idle: Deferred[None] | None = None
        self._deferred: Callable[[], Any] | None = None
        self._restored = False
        self._seen: list[TrackedFile] = []
        self._closed = False
        self.attempts = 0
        self.lastSuccess: float | None = None
        self.lastError: str | None = None
        self.lastErrorAt: float | None = None
        self.shippedLines = 0
        self.shippedBatches = 0
        self.failingSince: float | None = None

    # -- lifecycle

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        self.noteFile()  # the file being written now, held until the cursor is resolved
        self._run(self._restore)

    def _run(self, f: Callable[[], Deferred[Any]]) -> None:
        self._busy = True
        d = defer.maybeDeferred(f)
        d.addErrback(lambda fail: log.failure("sink {name}: internal error", fail, name=self.name))
        d.addBoth(lambda _: self._settle())

    def _settle(self) -> None:
        self._busy = False
        if self._idle is not None:
            idle, self._idle = self._idle, None
            if not idle.called:
                idle.callback(None)
        elif self._deferred is not None and not self._stopping:
            f, self._deferred = self._deferred, None
            self._run(f)

    def _inThread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    @inlineCallbacks
    def _restore(self) -> Generator[Deferred[Any], Any, None]:
        saved = yield self._inThread(loadCursor, self.stateDir, self.config.name)
        self.noteFile()
        current = self._seen[0] if self._seen else None
        if saved is None:
            self._takeSeen()
            log.info(
                "sink {name}: no cursor yet, starting at the beginning of the current audit file",
                name=self.name,
            )
        else:
            yield self._resolve(saved, current)
            self._takeSeen()
        self._startScan()
        yield self._startSink()

    @inlineCallbacks
    def _resolve(
        self, saved: dict[str, Any], current: TrackedFile | None
    ) -> Generator[Deferred[Any], Any, None]:
        """Reopen the files of a saved cursor (found by inode in the audit directory)."""
        wanted = [saved.get("file") or {}, *(saved.get("next") or [])]
        wanted = [w for w in wanted if "dev" in w and "ino" in w]
        directory = os.path.dirname(self.tracker.source.path) or "."
        found = yield self._inThread(findFiles, directory, wanted)
        offset = int(saved.get("offset", 0))
        inflight = saved.get("inflight")
        for i, (entry, hit) in enumerate(zip(wanted, found, strict=True)):
            if hit is None:
                if current is not None and (entry["dev"], entry["ino"]) == current.ident:
                    self._push(current)
                    continue
                skipped = "" if i else f" (its lines after byte {offset} were not shipped)"
                log.error(
                    "sink {name}: audit file {path} (inode {ino}) of its cursor is gone{skipped}; "
                    "keep rotated files uncompressed until shipped (delaycompress)",
                    name=self.name,
                    path=entry.get("path"),
                    ino=entry["ino"],
                    skipped=skipped,
                )
                if i == 0:
                    offset, inflight = 0, None
                continue
            tf = self.tracker.adopt(*hit)
            if entry.get("id"):
                tf.fileId = entry["id"]
            self._push(tf)
        if not self.chain or self.chain[0].ident != (
            (wanted[0]["dev"], wanted[0]["ino"]) if wanted else None
        ):
            offset, inflight = 0, None
        if self.chain:
            size = self.chain[0].size()
            if offset > size:
                log.error(
                    "sink {name}: cursor at byte {o} but the file has {s}; resuming at its end",
                    name=self.name,
                    o=offset,
                    s=size,
                )
                offset, inflight = size, None
        self.pos = self._bufEnd = offset
        if inflight and self.chain and int(inflight[0]) == offset:
            end = min(int(inflight[1]), self.chain[0].size())
            self._exactEnd = end if end > offset else None
        log.info(
            "sink {name}: resuming at byte {o} of {path}{more}",
            name=self.name,
            o=offset,
            path=self.chain[0].path if self.chain else "?",
            more=f" (+{len(self.chain) - 1} newer files)" if len(self.chain) > 1 else "",
        )

    def _takeSeen(self) -> None:
        """Append the files seen during the restore (in order) to the chain."""
        self._restored = True
        for tf in self._seen:
            if tf in self.chain:
                self.tracker.release(tf)
            else:
                self.chain.append(tf)  # keeps the reference taken in noteFile
        self._seen = []

    def _push(self, tf: TrackedFile) -> None:
        if tf in self.chain:
            return
        tf.refs += 1
        self.chain.append(tf)

    def _startScan(self) -> None:
        self._scanIdx, self._scanOff, self._aheadLines = 0, self.pos, 0

    @inlineCallbacks
    def _startSink(self) -> Generator[Deferred[Any], Any, None]:
        if self._stopping:
            return
        if self.sink is None:
            try:
                self.sink = self._sinkFactory(self.reactor, self.config, self.pool)
            except SinkUnavailable as e:
                self._fail("unavailable", str(e))
                log.error("sink {name}: {e}; it does not ship", name=self.name, e=e)
                return
        try:
            yield self.sink.start()
        except SinkRefused as e:
            self._fail("refused", str(e))
            log.error(
                "sink {name}: {e}. It does not ship until this is fixed and the config "
                "reloaded (or the check passes in {s:.0f}s)",
                name=self.name,
                e=e,
                s=REFUSED_RECHECK,
            )
            self._schedule(REFUSED_RECHECK, self._startSink)
            yield self.scanLag()
            return
        except Exception as e:
            delay = self._failed(e, "startup check")
            self._schedule(delay, self._startSink)
            return
        if self.state != "retrying":
            self.state = "running"
        self._schedule(0, self._step)

    def _schedule(self, delay: float, f: Callable[[], Any]) -> None:
        if self._stopping and not self._flushing:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

        def fire() -> None:
            self._timer = None
            if self._busy:
                self._deferred = f  # run it when the current operation ends
            else:
                self._run(f)

        self._timer = self.reactor.callLater(delay, fire)

    def wakeUp(self) -> None:
        """Look at the file now (after a reopen, or when a batch is due)."""
        self.noteFile()
        if self.state in ("running", "retrying") and not self._busy and self.attempts == 0:
            self._schedule(0, self._step)

    def noteFile(self) -> None:
        """Follow the writer to a new file if it moved."""
        if self._stopping:
            return
        current = self.tracker.current()
        if current is None:
            return
        if not self._restored:  # files seen while the saved cursor is being resolved
            if current not in self._seen:
                current.refs += 1
                self._seen.append(current)
        elif current not in self.chain:
            self._push(current)

    # -- the loop

    @property
    def maxLines(self) -> int:
        limit = self.sink.maxLines if self.sink is not None else 1
        return min(limit, self._maxLinesNow) if self._maxLinesNow else int(limit)

    def _due(self) -> bool:
        if not self._bufLines:
            return False
        if self._flushing or self._exactEnd is not None or self._bufLines >= self.maxLines:
            return True
        if self._bufEnd - self.pos >= MAX_BATCH_BYTES:
            return True
        maxSeconds = self.sink.maxSeconds if self.sink is not None else 0
        assert self._firstSeen is not None
        return bool(self.reactor.seconds() - self._firstSeen >= maxSeconds)

    @inlineCallbacks
    def _step(self) -> Generator[Deferred[Any], Any, None]:
        self.noteFile()
        if not self.chain or self.sink is None:
            self._schedule(POLL_INTERVAL, self._step)
            return
        while True:
            if self._due():
                if self.attempts:  # retrying: keep the lag in lines current
                    yield self.scanLag()
                yield self._ship()
                return
            head = self.chain[0]
            if (
                len(self.chain) == 1
                and head.size() == self._bufEnd
                and self._scanIdx == 0
                and self._scanOff == self._bufEnd
            ):
                break  # nothing new: no thread hop
            plan = _ReadPlan(
                fds=tuple(tf.fd for tf in self.chain),
                bufEnd=self._bufEnd,
                wantLines=self.maxLines - self._bufLines,
                wantBytes=MAX_BATCH_BYTES - (self._bufEnd - self.pos),
                exactEnd=self._exactEnd,
                scanIdx=self._scanIdx,
                scanOff=self._scanOff,
                needIds=tuple(i for i, tf in enumerate(self.chain) if tf.fileId is None),
            )
            result: _ReadResult = yield self._inThread(readStep, plan)
            if self._stopping and not self._flushing:
                return
            for i, fileId in result.ids.items():
                self.chain[i].fileId = fileId
            self._scanIdx, self._scanOff = result.scanIdx, result.scanOff
            self._aheadLines += result.scanLines
            if result.lines:
                if not self._bufLines:
                    self._firstSeen = self.reactor.seconds()
                self._chunks.append(result.data)
                self._bufLines += result.lines
                self._bufEnd = result.bufEnd
            if self._due():
                continue
            if len(self.chain) > 1 and self._bufEnd == result.headSize:
                # The writer moved on and this file is read to its end.
                if self._bufLines:
                    yield self._ship()
                    return
                self._finishHead()
                continue
            break
        delay = POLL_INTERVAL
        if self._bufLines and self.sink is not None and self._firstSeen is not None:
            left = self._firstSeen + self.sink.maxSeconds - self.reactor.seconds()
            delay = max(0.0, min(delay, left))
        self._schedule(delay, self._step)

    @inlineCallbacks
    def scanLag(self) -> Generator[Deferred[Any], Any, None]:
        """Count lines written since the last look (for the lag) without reading a batch."""
        if not self.chain:
            return
        plan = _ReadPlan(
            fds=tuple(tf.fd for tf in self.chain),
            bufEnd=self._bufEnd,
            wantLines=0,
            wantBytes=0,
            exactEnd=None,
            scanIdx=self._scanIdx,
            scanOff=self._scanOff,
            needIds=(),
        )
        chain = list(self.chain)
        result: _ReadResult = yield self._inThread(readStep, plan)
        if chain == self.chain:
            self._scanIdx, self._scanOff = result.scanIdx, result.scanOff
            self._aheadLines += result.scanLines

    def refreshLag(self) -> None:
        """Update the lag in lines of a sink that is not shipping (refused, halted)."""
        if not self._busy and not self._stopping and self.state in ("refused", "halted"):
            self._run(self.scanLag)

    def _finishHead(self) -> None:
        """The first file is finished and fully shipped: move on to the next one."""
        done = self.chain.pop(0)
        log.info("sink {name}: finished shipping {path}", name=self.name, path=done.path)
        self.tracker.release(done)
        self.pos = self._bufEnd = 0
        if self._scanIdx == 0:
            self._scanOff, self._aheadLines = 0, 0
        else:
            self._scanIdx -= 1
        self._saveSoon()

    def _cursorState(self) -> dict[str, Any]:
        head = self.chain[0] if self.chain else None
        return {
            "version": 1,
            "sink": self.name,
            "type": self.config.type,
            "file": head.describe() if head is not None else None,
            "offset": self.pos,
            "inflight": list(self._inflight) if self._inflight else None,
            "next": [tf.describe() for tf in self.chain[1:]],
            "shipped_lines": self.shippedLines,
            "updated": rfc3339ms(time.time()),
        }

    def _save(self) -> Deferred[None]:
        if self._closed:  # a successor may own the cursor file now
            return defer.succeed(None)
        return self._inThread(self._saveIfOpen, self._cursorState())

    def _saveIfOpen(self, state: dict[str, Any]) -> None:
        if not self._closed:  # checked again in the thread: a queued save may run late
            saveCursor(self.stateDir, self.config.name, state)

    def _saveSoon(self) -> None:
        d = self._save()
        d.addErrback(
            lambda f: log.error(
                "sink {name}: cannot save cursor: {e}", name=self.name, e=f.getErrorMessage()
            )
        )

    @inlineCallbacks
    def _ship(self) -> Generator[Deferred[Any], Any, None]:
        assert self.sink is not None
        head = self.chain[0]
        if head.fileId is None:
            head.fileId = fileIdOf(_firstLine(head.fd, True) or b"")
        batch = Batch(head.fileId, self.pos, self._bufEnd, b"".join(self._chunks), self._bufLines)
        self._chunks = [batch.data]
        self._inflight = (batch.start, batch.end)
        try:
            yield self._save()
            yield self.sink.ship(batch)
        except Exception as e:
            self._shipFailed(e, batch)
            return
        self._inflight = None
        self.pos = batch.end
        self._chunks, self._bufLines, self._firstSeen, self._exactEnd = [], 0, None, None
        self._aheadLines = max(0, self._aheadLines - batch.lineCount)
        self.shippedLines += batch.lineCount
        self.shippedBatches += 1
        self.lastSuccess = time.time()
        if self.attempts:
            log.info(
                "sink {name}: shipping again after {n} failed attempts; lag {lag} lines",
                name=self.name,
                n=self.attempts,
                lag=self._aheadLines,
            )
        self.attempts, self.failingSince = 0, None
        self.state = "running"
        try:
            yield self._save()
        except Exception as e:
            log.error("sink {name}: cannot save cursor: {e}", name=self.name, e=e)
        self._schedule(0, self._step)

    def _shipFailed(self, error: Exception, batch: Batch) -> None:
        if isinstance(error, BatchTooLarge) and batch.lineCount > 1:
            self._maxLinesNow = max(1, batch.lineCount // 2)
            keep = self._splitBuffer(batch, self._maxLinesNow)
            log.warn(
                "sink {name}: batch of {n} lines too large ({e}); retrying with {k}",
                name=self.name,
                n=batch.lineCount,
                e=error,
                k=keep,
            )
            self._schedule(0, self._step)
            return
        if isinstance(error, BatchRejected):
            self._fail("halted", str(error))
            log.critical(
                "sink {name}: batch {batch} ({n} lines) rejected: {e}. The sink is HALTED with "
                "this batch unshipped (nothing is skipped); fix the receiver or the config, "
                "then reload (SIGHUP)",
                name=self.name,
                batch=batch.batchId,
                n=batch.lineCount,
                e=error,
            )
            self.reactor.callLater(0, self.refreshLag)
            return
        delay = self._failed(error, f"batch {batch.batchId} ({batch.lineCount} lines)")
        self._schedule(delay, self._step)

    def _splitBuffer(self, batch: Batch, lines: int) -> int:
        """Keep only the first C{lines} lines in the buffer (the rest is re-read)."""
        size, n = _takeLines(batch.data, lines)
        self._chunks = [batch.data[:size]]
        self._bufLines, self._bufEnd, self._exactEnd = n, batch.start + size, None
        self._inflight = None
        return n

    def _fail(self, state: str, message: str) -> None:
        self.state = state
        self.lastError, self.lastErrorAt = message, time.time()

    def _failed(self, error: Exception, what: str) -> float:
        """Record a transient failure; return the delay before the next attempt."""
        self.attempts += 1
        if self.failingSince is None:
            self.failingSince = time.time()
        message = str(error) or error.__class__.__name__
        self._fail("retrying", message)
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (self.attempts - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)
        if isinstance(error, RetryLater) and error.delay is not None:
            delay = max(delay, error.delay)
        log.warn(
            "sink {name}: {what} failed (attempt {n}): {e}; retrying in {d:.1f}s; lag {lag} lines",
            name=self.name,
            what=what,
            n=self.attempts,
            e=message,
            d=delay,
            lag=self._aheadLines,
        )
        return delay

    # -- stopping

    @inlineCallbacks
    def stop(self, flush: bool) -> Generator[Deferred[Any], Any, None]:
        """
        Stop shipping: finish the batch in flight and, with C{flush}, ship what is left, both
        within L{STOP_GRACE}; save the cursor; release files and threads.
        """
        if self._closed or self._stopping:
            return
        self._stopping = True
        self._flushing = flush and self.state == "running"
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None
        deadline = self.reactor.seconds() + STOP_GRACE
        try:
            if self._busy:
                self._idle = Deferred()
                yield self._idle.addTimeout(STOP_GRACE, self.reactor)
            while (
                self._flushing
                and self.state == "running"
                and self.reactor.seconds() < deadline
                and self.sink is not None
            ):
                before = (self.pos, len(self.chain))
                self._busy = True
                left = deadline - self.reactor.seconds()
                step = defer.maybeDeferred(self._step)
                yield step.addTimeout(max(0.1, left), self.reactor)
                self._busy = False
                if self._timer is not None and self._timer.active():
                    self._timer.cancel()
                    self._timer = None
                if (self.pos, len(self.chain)) == before and not self._bufLines:
                    break
        except defer.TimeoutError:
            log.warn(
                "sink {name}: stopped with a batch still in flight (it is re-sent at the "
                "next start)",
                name=self.name,
            )
        self._flushing = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.sink is not None:
            try:
                yield self.sink.stop().addTimeout(STOP_GRACE, self.reactor)
            except Exception as e:
                log.warn("sink {name}: stop: {e}", name=self.name, e=e)
        state = self._cursorState() if self.chain else None
        self._closed = True  # from here on only this final save writes the cursor
        if state is not None:
            try:  # not on the pool: its thread may be stuck in a network call
                yield _inDaemonThread(
                    self.reactor, saveCursor, self.stateDir, self.config.name, state
                )
            except Exception as e:
                log.error("sink {name}: cannot save cursor: {e}", name=self.name, e=e)
        for tf in self.chain:
            self.tracker.release(tf)
        self.chain = []
        self.state = "stopped"
        yield _stopPool(self.reactor, self.pool)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stop(flush=False)

    # -- state

    def lag(self) -> tuple[int, int]:
        """@return: (lines, bytes) written to the audit file and not yet acknowledged."""
        total = 0
        for i, tf in enumerate(self.chain):
            try:
                size = tf.size()
            except OSError:
                continue
            total += size - (self.pos if i == 0 else 0)
        return (self._aheadLines, max(0, total))

    @property
    def ready(self) -> bool:
        """Not ready when the sink cannot run at all (startup check failed, library missing)."""
        return self.state not in ("refused", "unavailable")

    def status(self) -> dict[str, Any]:
        lines, size = self.lag()

        def ts(t: float | None) -> str | None:
            return rfc3339ms(t) if t is not None else None

        return {
            "type": self.config.type,
            "state": self.state,
            "ready": self.ready,
            "lag_lines": lines,
            "lag_bytes": size,
            "last_success": ts(self.lastSuccess),
            "last_error": self.lastError,
            "last_error_at": ts(self.lastErrorAt),
            "failed_attempts": self.attempts,
            "shipped_lines": self.shippedLines,
            "shipped_batches": self.shippedBatches,
            "file": self.chain[0].path if self.chain else None,
            "offset": self.pos,
        }


def _inDaemonThread(reactor: Any, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run C{f} in a new daemon thread; the Deferred fires on the reactor with its result."""
    d: Deferred[Any] = Deferred()

    def run() -> None:
        try:
            result = f(*args)
        except BaseException:
            failure = Failure()
            reactor.callFromThread(d.errback, failure)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, name="mcpgw-sink-save", daemon=True).start()
    return d


def _stopPool(reactor: Any, pool: ThreadPool) -> Deferred[None]:
    """Stop a pool without blocking the reactor on a thread stuck in a network call."""
    d: Deferred[None] = Deferred()

    def stop() -> None:
        pool.stop()
        reactor.callFromThread(lambda: None if d.called else d.callback(None))

    threading.Thread(target=stop, name=f"{pool.name}-stop", daemon=True).start()
    return d.addTimeout(STOP_GRACE, reactor).addErrback(lambda f: f.trap(defer.TimeoutError))


# -- All sinks --------------------------------------------------------------------------------


def _verifiesBucket(config: SinkConfig) -> bool:
    """
    Whether a sink promises something about its bucket that its start checks (S3 Object Lock and
    versioning, a GCS retention policy): such a sink is restarted on every reload, so the check
    runs again (a bucket's settings can change under a running gateway).
    """
    return (
        getattr(config, "object_lock", None) is not None
        or getattr(config, "min_retention_days", None) is not None
    )


class ShippingService(MultiService):
    """
    The sinks of one gateway: started with it, stopped after the audit writer's final flush,
    reconfigured on reload without losing cursors (they are per sink name).
    """

    def __init__(
        self,
        reactor: Any,
        audit: AuditConfig,
        source: PathSource | None = None,
        sinkFactory: Callable[[Any, SinkConfig, ThreadPool], ISink] = makeSink,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.audit = audit
        self.tracker = FileTracker(source or PathSource(audit.path))
        self._sinkFactory = sinkFactory
        self.shippers: dict[str, SinkShipper] = {}
        self._status: LoopingCall | None = None
        self._changes: Deferred[Any] = defer.succeed(None)

    def _add(self, config: SinkConfig) -> SinkShipper:
        shipper = SinkShipper(
            self.reactor, config, self.tracker, self.audit.state_dir, self._sinkFactory
        )
        self.shippers[config.name] = shipper
        shipper.setServiceParent(self)
        return shipper

    def startService(self) -> None:
        if self.audit.sinks:
            os.makedirs(self.audit.state_dir, mode=0o750, exist_ok=True)
        for config in self.audit.sinks:
            self._add(config)
        super().startService()
        self._status = LoopingCall(self.logStatus)
        self._status.clock = self.reactor
        self._status.start(STATUS_INTERVAL, now=False)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        """Ship what is left (within L{STOP_GRACE}), save every cursor, release everything."""
        Service.stopService(self)
        if self._status is not None and self._status.running:
            self._status.stop()
        yield self._changes
        shippers = list(self.shippers.values())
        for s in shippers:
            s.running = False
        yield defer.DeferredList([s.stop(flush=True) for s in shippers], consumeErrors=True)
        self.tracker.closeAll()

    def auditReopened(self) -> None:
        """The writer reopened its file (SIGHUP): every sink follows it now."""
        for shipper in self.shippers.values():
            shipper.wakeUp()

    def reconfigure(self, audit: AuditConfig) -> Deferred[Any]:
        """
        Apply a reloaded C{audit} section: add, remove or change sinks. A changed or halted or
        refused sink, or one whose bucket settings its start checks (L{_verifiesBucket}), is
        stopped (its batch in flight finished) and started again from its saved cursor; an
        unchanged running sink keeps going. C{path} and C{state_dir} changes need a
        restart.
        """
        if (audit.path, audit.state_dir) != (self.audit.path, self.audit.state_dir):
            log.warn("audit.path and audit.state_dir changes take effect at the next restart")
            audit = attr.evolve(audit, path=self.audit.path, state_dir=self.audit.state_dir)

        def apply(_: object) -> Deferred[Any]:
            return self._reconfigure(audit)

        self._changes = self._changes.addBoth(apply)
        self._changes.addErrback(lambda f: log.failure("audit sinks: reconfiguring failed", f))
        return self._changes

    @inlineCallbacks
    def _reconfigure(self, audit: AuditConfig) -> Generator[Deferred[Any], Any, None]:
        if not self.running:
            self.audit = audit
            return
        wanted = {c.name: c for c in audit.sinks}
        if wanted:
            os.makedirs(audit.state_dir, mode=0o750, exist_ok=True)
        self.audit = audit
        restart = []
        for name, shipper in list(self.shippers.items()):
            config = wanted.get(name)
            if (
                config is None
                or config != shipper.config
                or not shipper.ready
                or (shipper.state == "halted")
                or _verifiesBucket(config)
            ):
                restart.append(shipper)
        for shipper in restart:
            del self.shippers[shipper.config.name]
            shipper.running = False
        yield defer.DeferredList([s.stop(flush=False) for s in restart], consumeErrors=True)
        for shipper in restart:
            self._detach(shipper)
        for name, config in wanted.items():
            if name not in self.shippers:
                self._add(config)
        log.info("audit sinks: {names}", names=", ".join(sorted(wanted)) or "none")

    def _detach(self, shipper: SinkShipper) -> None:
        """Forget a stopped shipper (C{removeService} would stop it a second time)."""
        self.namedServices.pop(shipper.name, None)
        self.services.remove(shipper)
        shipper.parent = None

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: s.status() for name, s in sorted(self.shippers.items())}

    def readinessCheck(self) -> tuple[str, bool, Any]:
        """For L{mcpgw.health.Readiness.extraChecks}: not ready if a sink cannot run at all."""
        return ("sinks", all(s.ready for s in self.shippers.values()), self.status())

    def logStatus(self) -> None:
        for name, s in sorted(self.shippers.items()):
            s.refreshLag()
            st = s.status()
            if st["state"] == "running" and st["lag_lines"] == 0:
                continue
            log.info(
                "sink {name} ({type}): {state}; lag {lines} lines / {bytes} bytes; "
                "last success {ok}; last error {err}",
                name=name,
                type=st["type"],
                state=st["state"],
                lines=st["lag_lines"],
                bytes=st["lag_bytes"],
                ok=st["last_success"],
                err=st["last_error"],
                sink_status=st,
            )


__all__ = [
    "FileTracker",
    "PathSource",
    "ShippingService",
    "SinkShipper",
    "WriterSource",
]
