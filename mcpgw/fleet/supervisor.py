# -*- test-case-name: tests.test_fleet -*-
"""
The supervisor of C{listen.workers: N} (N > 1): what C{twistd -n mcpgw} and C{mcpgw run} run
then. It binds the listening socket once and hands it to N worker processes
(L{mcpgw.fleet.worker}), and runs what there must be one of per host:

  - B{the audit file and its sinks}: each worker hands every audit line to the supervisor over
    its pipe before its client has the answer (L{mcpgw.fleet.channel}); the supervisor writes
    them, whole, with the one L{mcpgw.audit.writer.AuditWriter} (so one process appends to the
    file, and a hash chain over it has one writer), and one L{ShippingService} ships them;
  - B{the admin listener} (C{/metrics} for the whole host, C{/healthz}, C{/readyz});
  - B{SIGHUP}: the config file is read and validated once (a generation is built from it here),
    then every worker builds its generation from the same text (prepare) and, only when all
    could, switches to it (commit); if any could not, none does (abort);
  - B{workers}: a worker that ends is logged and replaced (after a pause that grows while
    workers keep dying young); SIGTERM drains every worker (each finishes its in-flight
    requests) and then stops the audit file and the sinks;
  - the license log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Generator
from typing import Any

import orjson
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpgw.config import Config, ConfigError, config_from_string
from mcpgw.fleet.channel import (
    FROM_SUPERVISOR_FD,
    LISTEN_FD,
    TO_SUPERVISOR_FD,
    enlargePipe,
)
from mcpgw.metrics import Sample, addUp, fromWire, monotonic

log = Logger()

#: Seconds workers get to drain and exit after SIGTERM before they are killed (the workers'
#: own grace, L{mcpgw.service.SHUTDOWN_GRACE} + L{mcpgw.service.CLOSE_GRACE}, and a margin).
STOP_GRACE = 35.0
#: Seconds a worker has to answer a reload's prepare.
PREPARE_TIMEOUT = 30.0
#: Seconds a worker has to answer a metrics request (then its last answer is used).
METRICS_TIMEOUT = 2.0
#: Pause before a worker is replaced; doubled (up to L{RESTART_MAX}) while workers die within
#: L{YOUNG} seconds of their start.
RESTART_MIN, RESTART_MAX, YOUNG = 0.1, 30.0, 10.0
#: Listen backlog.
BACKLOG = 1024
#: Seconds between two reads of a worker's pipe while lines keep coming, and the most read at
#: once: lines reach the audit file at most this late (the client has its answer already), and a
#: busy supervisor wakes up once per pause instead of once per line (measured under wrk at C=32:
#: 15 µs of supervisor CPU per request at 10 ms, 28-45 at 2 ms). A metrics or reload answer comes
#: through the same pipe after the lines sent before it, so /metrics counts every request answered
#: before the scrape.
READ_PAUSE, READ_SIZE = 0.01, 1024 * 1024


def bindListener(config: Config) -> socket.socket:
    """The listening socket of C{listen}, bound once for all workers."""
    listen = config.listen
    info = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if listen.reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(info[4])
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


class WorkerProcess(ProcessProtocol):
    """
    One worker, seen from the supervisor: its audit lines go to the host's audit log, its control
    messages to the supervisor.

    @ivar serving: the worker said it is serving.
    @ivar samples: its last metrics answer.
    """

    def __init__(self, supervisor: WorkerPool, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.serving = False
        self.started = supervisor.reactor.seconds()
        self.samples: list[Sample] = []
        self.number = 0
        self._buffer = b""
        self._resume: Any = None
        #: Audit lines received from this worker (the numbers its acknowledgements name).
        self.linesIn = 0

    #: The process id (kept after it ended, for the log).
    pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.writeToChild(FROM_SUPERVISOR_FD, orjson.dumps(message) + b"\n")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != TO_SUPERVISOR_FD:
            return
        self._lines(data)
        # Coalesce: the pipe is read again READ_PAUSE later, whole, instead of at every line (a
        # wakeup and an 8 KiB read per line or two cost more than the lines themselves).
        reader = self._reader()
        if reader is not None and self._resume is None:
            reader.stopReading()
            self._resume = self.supervisor.reactor.callLater(READ_PAUSE, self._readAll)

    def _reader(self) -> Any:
        pipes = getattr(self.transport, "pipes", None)
        return pipes.get(TO_SUPERVISOR_FD) if pipes else None

    def _readAll(self) -> None:
        self._resume = None
        reader = self._reader()
        if reader is None:
            return
        while True:
            try:
                data = os.read(reader.fileno(), READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                break  # the reader sees the error too, and reports it
            if not data:
                break  # the end: the reader sees it at once
            self._lines(data)
        reader.startReading()

    def _lines(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        audit = self.supervisor.audit
        for line in lines:
            try:
                if line[:1] == b"{":
                    self.linesIn += 1
                    synced = audit.write(orjson.loads(line))
                    if isinstance(synced, Deferred):
                        # fsync: always: the worker answers once this line is synced.
                        synced.addCallback(self._acknowledge, self.linesIn)
                elif line[:1] == b"!":
                    self.supervisor.controlReceived(self, orjson.loads(line[1:]))
            except ValueError:
                log.error("worker {i}: unreadable line dropped", i=self.index)
                self.supervisor.tornLines += 1
            except Exception:
                log.failure("worker {i}: a line could not be handled", i=self.index)

    def _acknowledge(self, _: object, n: int) -> None:
        """Lines 1..C{n} of this worker are synced: it may answer their requests."""
        self.send({"op": "synced", "n": n})

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == TO_SUPERVISOR_FD and self._buffer:
            # The worker died in the middle of handing a line over: never write half a line.
            log.error(
                "worker {i}: {n} bytes of an unfinished audit line dropped",
                i=self.index,
                n=len(self._buffer),
            )
            self.supervisor.tornLines += 1
            self._buffer = b""

    def processEnded(self, reason: Failure) -> None:
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
            self._resume = None
        self.supervisor.workerEnded(self, reason)


class WorkerPool(Service):
    """
    Starts, replaces, reloads and stops the worker processes (see the module docstring).

    @ivar audit: the host's audit log (every worker's lines are written there).
    @ivar restarts: workers replaced since the start.
    @ivar tornLines: audit lines lost because a worker died while handing them over.
    """

    name = "workers"

    def __init__(
        self,
        reactor: Any,
        path: str,
        text: str,
        number: int,
        count: int,
        bind: Callable[[], socket.socket],
        audit: Any,
        argv: list[str] | None = None,
    ) -> None:
        """
        @param bind: returns the listening socket (called at start, so that a port in use fails
            the start as it does without workers).
        """
        self.reactor = reactor
        self.path = path
        self.text = text
        self.number = number
        self.count = count
        self._bind = bind
        self.socket: Any = None
        self.audit = audit
        self.argv = argv or [sys.executable, "-m", "mcpgw.fleet.worker"]
        self.workers: dict[int, WorkerProcess] = {}
        self.restarts = 0
        self.tornLines = 0
        self.retired: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._stopping = False
        self._delay = RESTART_MIN
        self._ended: dict[int, Deferred[None]] = {}
        self._waiting: dict[tuple[int, str, int], Deferred[Any]] = {}
        self._seq = 0
        self._devnull = -1

    # -- lifecycle ---------------------------------------------------------------------------

    def startService(self) -> None:
        self.socket = self._bind()
        super().startService()
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        for index in range(self.count):
            self.spawn(index)
        host, port = self.socket.getsockname()[:2]
        log.info(
            "supervisor (pid {pid}): {n} workers on {host}:{port}",
            pid=os.getpid(),
            n=self.count,
            host=host,
            port=port,
        )

    def spawn(self, index: int) -> None:
        if self._stopping:
            return
        proto = WorkerProcess(self, index)
        self.workers[index] = proto
        self.reactor.spawnProcess(
            proto,
            self.argv[0],
            self.argv,
            env=os.environ.copy(),
            childFDs={
                0: self._devnull,
                1: 1,
                2: 2,
                LISTEN_FD: self.socket.fileno(),
                TO_SUPERVISOR_FD: "r",
                FROM_SUPERVISOR_FD: "w",
            },
        )
        reader = getattr(proto.transport, "pipes", {}).get(TO_SUPERVISOR_FD)
        if reader is not None:
            enlargePipe(reader.fileno())
        proto.send(
            {
                "op": "start",
                "index": index,
                "number": self.number,
                "path": self.path,
                "text": self.text,
            }
        )

    def controlReceived(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "ready":
            worker.serving = True
            worker.number = message.get("number", 0)
            log.info(
                "worker {i} (pid {pid}) serving generation {gen}",
                i=worker.index,
                pid=worker.pid,
                gen=worker.number,
            )
            if worker.number != self.number:
                # Started before a reload committed: bring it to the current generation.
                self._bringUp(worker)
        elif op in ("prepared", "metrics"):
            key = (worker.index, op, message.get("number", message.get("id", 0)))
            d = self._waiting.pop(key, None)
            if d is not None:
                d.callback(message)

    def workerEnded(self, worker: WorkerProcess, reason: Failure) -> None:
        self.retired = addUp(_items(self.retired), monotonic(worker.samples))
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        for key in [k for k in self._waiting if k[0] == worker.index]:
            self._waiting.pop(key).errback(Failure(RuntimeError("worker ended")))
        ended = self._ended.pop(worker.index, None)
        if ended is not None:
            ended.callback(None)
        if self._stopping:
            log.info("worker {i} (pid {pid}) stopped", i=worker.index, pid=worker.pid)
            return
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        now = self.reactor.seconds()
        if now - worker.started < YOUNG:
            self._delay = min(RESTART_MAX, self._delay * 2)
        else:
            self._delay = RESTART_MIN
        log.error(
            "worker {i} (pid {pid}) ended ({how}); replacing it in {d:.1f}s",
            i=worker.index,
            pid=worker.pid,
            how=f"signal {sig}" if sig else f"exit code {code}",
            d=self._delay,
        )
        self.restarts += 1
        self.reactor.callLater(self._delay, self.spawn, worker.index)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        """SIGTERM to every worker; wait until all ended (killing the ones that take too long)."""
        super().stopService()
        self._stopping = True
        waits = []
        for index, worker in list(self.workers.items()):
            d: Deferred[None] = Deferred()
            self._ended[index] = d
            waits.append(d)
            _signal(worker, signal.SIGTERM)
        if self.socket is not None:
            self.socket.close()  # the workers hold their own copies until they stop listening
        if waits:
            try:
                yield defer.gatherResults(waits).addTimeout(STOP_GRACE, self.reactor)
            except defer.TimeoutError:
                for worker in list(self.workers.values()):
                    log.error("worker {i} did not stop in time; killing it", i=worker.index)
                    _signal(worker, signal.SIGKILL)
                yield defer.DeferredList(list(self._ended.values()))
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1

    # -- reload ------------------------------------------------------------------------------

    @inlineCallbacks
    def reload(self, text: str, number: int) -> Generator[Deferred[Any], Any, bool]:
        """
        Every serving worker prepares the generation of C{text}; then all commit, or all abort.

        @return: (a Deferred of) whether the workers switched.
        """
        workers = [w for w in self.workers.values() if w.serving]
        message = {"op": "prepare", "number": number, "path": self.path, "text": text}
        answers = yield defer.DeferredList(
            [self._ask(w, "prepared", number, message, PREPARE_TIMEOUT) for w in workers],
            consumeErrors=True,
        )
        failed = []
        for worker, (ok, answer) in zip(workers, answers, strict=True):
            if not ok:
                failed.append(f"worker {worker.index}: no answer")
            elif not answer.get("ok"):
                failed.append(f"worker {worker.index}: {answer.get('error')}")
        if failed:
            for worker in workers:
                worker.send({"op": "abort", "number": number})
            log.error(
                "reload rejected by the workers, all keep generation {gen}: {why}",
                gen=self.number,
                why="; ".join(failed),
            )
            return False
        self.text, self.number = text, number
        for worker in workers:
            worker.send({"op": "commit", "number": number})
            worker.number = number
        return True

    @inlineCallbacks
    def _bringUp(self, worker: WorkerProcess) -> Generator[Deferred[Any], Any, None]:
        number = self.number
        message = {"op": "prepare", "number": number, "path": self.path, "text": self.text}
        try:
            answer = yield self._ask(worker, "prepared", number, message, PREPARE_TIMEOUT)
        except Exception:
            return
        if answer.get("ok"):
            worker.send({"op": "commit", "number": number})
            worker.number = number
        else:
            log.error("worker {i} cannot load the current config; restarting it", i=worker.index)
            _signal(worker, signal.SIGTERM)

    def _ask(
        self, worker: WorkerProcess, op: str, key: int, message: dict[str, Any], timeout: float
    ) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        wkey = (worker.index, op, key)
        self._waiting[wkey] = d
        worker.send(message)

        def forget(f: Failure) -> Failure:
            self._waiting.pop(wkey, None)
            return f

        return d.addTimeout(timeout, self.reactor).addErrback(forget)

    # -- metrics -----------------------------------------------------------------------------

    @inlineCallbacks
    def collect(self) -> Generator[Deferred[Any], Any, list[Sample]]:
        """
        Every serving worker's samples (its last answer if it does not answer in time), and
        the counters of the workers that ended.
        """
        workers = [w for w in self.workers.values() if w.serving]
        self._seq += 1
        seq = self._seq
        message = {"op": "metrics", "id": seq}
        answers = yield defer.DeferredList(
            [self._ask(w, "metrics", seq, message, METRICS_TIMEOUT) for w in workers],
            consumeErrors=True,
        )
        out: list[Sample] = [
            (name, labels, value) for (name, labels), value in self.retired.items()
        ]
        for worker, (ok, answer) in zip(workers, answers, strict=True):
            if ok:
                worker.samples = fromWire(answer.get("samples", ()))
            out.extend(worker.samples)
        return out

    def census(self) -> tuple[int, int, int]:
        """C{(configured, alive, restarts)}."""
        return self.count, sum(w.serving for w in self.workers.values()), self.restarts

    def readinessCheck(self) -> tuple[str, bool, Any]:
        """The C{workers} entry of C{/readyz}: ready while at least one worker serves."""
        configured, alive, restarts = self.census()
        detail = {"configured": configured, "alive": alive, "restarts": restarts}
        return "workers", alive > 0, detail


class _NoListener:
    """The supervisor serves no TLS itself: its reloader only checks tls stays on (or off)."""

    def swap(self, tls: Any) -> None:
        pass


def _items(d: dict[Any, float]) -> list[Sample]:
    return [(name, labels, value) for (name, labels), value in d.items()]


def _signal(worker: WorkerProcess, sig: int) -> None:
    """Signal a worker, unless it has already exited."""
    with contextlib.suppress(ProcessExitedAlready, OSError):
        if worker.transport is not None:
            worker.transport.signalProcess(sig)


class SupervisorService(MultiService):
    """
    The root service with workers: stops the workers first (they drain), then the admin
    listener, then the audit file (flushed and synced), then the sinks.
    """

    stopOrder = ("workers", "admin", "reloader", "license", "audit", "shipping")

    def __init__(self, pool: WorkerPool, reloader: Any, readReload: Callable[[], Any]) -> None:
        super().__init__()
        self.pool = pool
        self.reloader = reloader
        self._read = readReload
        #: The admin listener's readiness (set by L{buildSupervisor}).
        self.readiness: Any = None
        self._previousHup: Any = None
        self._reloading = False
        self._again = False

    @property
    def generation(self) -> Any:
        return self.reloader.current

    def startService(self) -> None:
        super().startService()
        self._previousHup = signal.signal(signal.SIGHUP, self._onSIGHUP)

    def _onSIGHUP(self, signum: int, frame: Any) -> None:
        self.pool.reactor.callFromThread(self.reload)

    @inlineCallbacks
    def reload(self) -> Generator[Deferred[Any], Any, None]:
        """SIGHUP (see the module docstring); HUPs during a reload coalesce into one more."""
        if self._reloading:
            self._again = True
            return
        self._reloading = True
        try:
            self.reloader.reopen()
            read = self._read()
            if read is not None:
                text, config = read
                new = self.reloader.prepare(config)
                if new is not None:
                    switched = yield self.pool.reload(text, new.number)
                    if switched:
                        self.reloader.publish(new)
        except Exception:
            log.failure("reload failed")
        finally:
            self._reloading = False
            if self._again:
                self._again = False
                self.pool.reactor.callLater(0, self.reload)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        Service.stopService(self)
        if self.readiness is not None:
            self.readiness.draining = True  # the admin /readyz says so while the workers drain
        if self._previousHup is not None:
            signal.signal(signal.SIGHUP, self._previousHup)
            self._previousHup = None
        children: list[IService] = list(self)
        named = {c.name: c for c in children}
        ordered = [named[n] for n in self.stopOrder if n in named]
        ordered += [c for c in reversed(children) if c not in ordered]
        for child in ordered:
            if child.running:
                yield defer.maybeDeferred(child.stopService)
        log.info("stopped; {n} audit lines written", n=self.pool.audit.linesWritten)


def buildSupervisor(reactor: Any, path: str, config: Config, state: Any) -> SupervisorService:
    """The supervisor's services (called by L{mcpgw.tap.makeService})."""
    from mcpgw.audit.shipper import ShippingService, WriterSource
    from mcpgw.generation import buildGeneration
    from mcpgw.health import Readiness
    from mcpgw.license import LicenseService
    from mcpgw.metrics import HostMetrics, MeteredAuditLog, RequestMetrics, render
    from mcpgw.service import AuditService, Reloader
    from mcpgw.tap import makeAuditWriter

    with open(path, encoding="utf-8") as f:
        text = f.read()
    # The supervisor's own generation: the config validated as the workers will build it, and
    # what /readyz on the admin listener probes. Its pools are never used.
    holder: list[Any] = [buildGeneration(reactor, config)]
    tlsMarker = _NoListener() if config.tls is not None else None
    reloader = Reloader(reactor, path, lambda: holder[0], None, tlsMarker)  # type: ignore[arg-type]
    writer = makeAuditWriter(reactor, config)  # the host's one chain (audit.integrity)
    requests = RequestMetrics() if config.listen.admin is not None else None
    audit: Any = MeteredAuditLog(writer, requests) if requests is not None else writer
    shipping = ShippingService(reactor, config.audit, WriterSource(writer))
    shipping.setName("shipping")
    license = LicenseService(reactor, state)
    pool = WorkerPool(
        reactor, path, text, 1, config.listen.workerCount, lambda: bindListener(config), audit
    )

    def read() -> tuple[str, Config] | None:
        try:
            with open(path, encoding="utf-8") as f:
                newText = f.read()
            new = config_from_string(
                newText, source=path, base_dir=os.path.dirname(os.path.abspath(path))
            )
        except (OSError, UnicodeDecodeError) as e:
            log.error("reload rejected, keeping generation {gen}: {e}", gen=pool.number, e=e)
            return None
        except ConfigError as e:
            log.error(
                "reload rejected, keeping generation {gen}: {problems}",
                gen=pool.number,
                problems="; ".join(str(p) for p in e.problems),
            )
            return None
        return newText, new

    reloader.onReopen(writer.reopen)
    reloader.onReopen(shipping.auditReopened)
    reloader.subscribe(lambda g: holder.__setitem__(0, g))
    reloader.subscribe(lambda g: writer.configChanged(g.config.audit))
    reloader.subscribe(lambda g: shipping.reconfigure(g.config.audit))
    reloader.subscribe(lambda g: license.configChanged(g.config))
    root = SupervisorService(pool, reloader, read)
    readiness = Readiness(reactor)
    readiness.extraChecks.append(shipping.readinessCheck)
    readiness.extraChecks.append(pool.readinessCheck)
    children: list[Any] = [AuditService(audit), shipping, license, pool]
    if config.listen.admin is not None:
        from mcpgw.admin import AdminResource, AdminService

        assert requests is not None
        host = HostMetrics(requests, writer, shipping, lambda: pool.number, pool.census)

        def metrics() -> Deferred[bytes]:
            d = pool.collect()
            host.tornLines = pool.tornLines
            return d.addCallback(lambda workers: render(addUp(host.samples(), workers)))

        resource = AdminResource(metrics, readiness, lambda: holder[0])
        children.append(AdminService(reactor, config.listen.admin, resource))
    root.readiness = readiness
    for child in children:
        child.setServiceParent(root)
    return root
