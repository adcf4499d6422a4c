# -*- test-case-name: tests.test_fleet -*-
"""
A worker process: C{python -m mcpgw.fleet.worker}, started only by the supervisor
(L{mcpgw.fleet.supervisor}), with the listening socket on descriptor 3, its pipe to the supervisor
on 4 and the supervisor's pipe to it on 5. The first message on 5 is the config text to serve.

The worker serves the socket like a gateway without workers does, except that its audit lines go
to the supervisor (L{mcpgw.fleet.channel.PipeAuditLog}), and that reloads come from the
supervisor in two steps (prepare, then commit or abort) so that every worker switches or none.
SIGTERM drains it (in-flight requests finish, as for the gateway); SIGHUP and SIGINT are ignored
(the supervisor forwards what they mean); the end of the supervisor's pipe (the supervisor died)
also drains it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import orjson
from twisted.logger import Logger

from mcpgw.config import ConfigError, config_from_string
from mcpgw.fleet.channel import (
    FROM_SUPERVISOR_FD,
    LISTEN_FD,
    TO_SUPERVISOR_FD,
    PipeAuditLog,
    PipeReader,
    PipeWriter,
    control,
    readFirst,
)
from mcpgw.metrics import toWire

log = Logger(namespace="mcpgw.fleet.worker")


def parseConfig(message: dict[str, Any]) -> Any:
    """The config of a start or prepare message (its text, read relative to its path)."""
    path = message["path"]
    return config_from_string(
        message["text"], source=path, base_dir=os.path.dirname(os.path.abspath(path))
    )


class WorkerLink:
    """
    The worker's side of the supervisor: its audit log, the socket to adopt, and the control
    messages (reload in two steps, metrics).

    @ivar index: the worker's number (0 to workers - 1).
    """

    def __init__(self, reactor: Any, index: int, family: int) -> None:
        self.reactor = reactor
        self.index = index
        self.writer = PipeWriter(reactor, TO_SUPERVISOR_FD)
        self.auditLog = PipeAuditLog(self.writer)
        self.listening = (LISTEN_FD, family)
        self._root: Any = None
        self._reloader: Any = None
        self._metrics: Any = None
        self._prepared: Any = None
        self._reader: PipeReader | None = None

    def attach(self, root: Any, reloader: Any, metrics: Any) -> None:
        """Called by the composition root with the parts messages act on."""
        self._root, self._reloader, self._metrics = root, reloader, metrics

    def listen(self, pending: bytes) -> None:
        """Start reading the supervisor's messages (C{pending}: already read)."""
        self._reader = PipeReader(
            self.reactor, FROM_SUPERVISOR_FD, self.received, self.supervisorGone, pending
        )
        self._reader.start()

    def send(self, message: dict[str, Any]) -> None:
        self.writer.send(control(message))

    def received(self, line: bytes) -> None:
        try:
            message = orjson.loads(line)
            op = message["op"]
        except (ValueError, KeyError, TypeError):
            log.error("worker {i}: unreadable message from the supervisor", i=self.index)
            return
        if op == "metrics":
            self.send({"op": "metrics", "id": message["id"], "samples": toWire(self._samples())})
        elif op == "prepare":
            self._prepare(message)
        elif op == "commit":
            prepared, self._prepared = self._prepared, None
            if prepared is not None and prepared.number == message["number"]:
                self._reloader.publish(prepared)
        elif op == "abort":
            self._prepared = None
        elif op == "synced":
            self.auditLog.synced(message["n"])

    def _samples(self) -> list[Any]:
        return self._metrics.samples() if self._metrics is not None else []

    def _prepare(self, message: dict[str, Any]) -> None:
        number = message["number"]
        error = None
        try:
            config = parseConfig(message)
        except ConfigError as e:
            config, error = None, "; ".join(str(p) for p in e.problems)
        if config is not None:
            self._prepared = self._reloader.prepare(config, number)
            if self._prepared is None:
                error = "the new generation could not be built (see the worker's log)"
        self.send({"op": "prepared", "number": number, "ok": error is None, "error": error})

    def supervisorGone(self) -> None:
        if self.reactor.running:
            log.warn("worker {i}: the supervisor is gone; stopping", i=self.index)
            stopOnce(self.reactor)


_stopping: list[bool] = []


def stopOnce(reactor: Any) -> None:
    """Stop the reactor (drain) once, however many times asked."""
    if not _stopping:
        _stopping.append(True)
        reactor.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """The worker process (see the module docstring)."""
    # Ctrl-C in a terminal reaches the whole process group: the supervisor drains the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        first, pending = readFirst(FROM_SUPERVISOR_FD)
        start = orjson.loads(first)
    except (EOFError, ValueError, OSError) as e:
        print(f"mcpgw worker: no start message: {e}", file=sys.stderr)
        return 1
    index = int(start["index"])
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    from twisted.logger import FileLogObserver, globalLogBeginner

    from mcpgw.logging import formatJSON
    from mcpgw.tap import makeWorker

    def formatWorker(event: dict[str, Any]) -> str:
        # Each worker's log lines say which worker wrote them.
        return formatJSON(event)[:-2] + f',"worker":{index}}}\n'

    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stdout, formatWorker)], redirectStandardIO=False
    )
    family = socket.socket(fileno=os.dup(LISTEN_FD))
    link = WorkerLink(reactor, index, family.family)
    family.close()
    try:
        config = parseConfig(start)
        service = makeWorker(reactor, start["path"], config, link, int(start["number"]))
        service.startService()
    except Exception as e:
        print(f"mcpgw worker {index}: cannot start: {e}", file=sys.stderr)
        return 1
    link.listen(pending)
    link.send({"op": "ready", "pid": os.getpid(), "number": service.generation.number})
    log.info("worker {i} (pid {pid}) serving", i=index, pid=os.getpid())
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

    def onTerm(signum: int, frame: Any) -> None:
        reactor.callFromThread(stopOnce, reactor)

    reactor.callWhenRunning(signal.signal, signal.SIGTERM, onTerm)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
