"""The canonical audit file writer."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mcpgw.audit import writer as writermod
from mcpgw.audit.writer import AuditWriter, rfc3339ms
from mcpgw.interfaces import IAuditLog
from mcpgw.testing import MemoryAuditLog


class TimestampTests(SynchronousTestCase):
    def test_rfc3339ms(self) -> None:
        """Timestamps are RFC 3339 UTC with milliseconds."""
        self.assertEqual(rfc3339ms(1795000000.1234), "2026-11-18T11:06:40.123Z")
        self.assertEqual(rfc3339ms(1795000001.0), "2026-11-18T11:06:41.000Z")


class WriterTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "sub", "audit.jsonl")
        self.syncs: list[int] = []
        realSync = os.fdatasync

        def recordingSync(fd: int) -> None:
            self.syncs.append(threading.get_ident())
            realSync(fd)

        self.patch(writermod.os, "fdatasync", recordingSync)

    def lines(self, path: str | None = None) -> list[Any]:
        with open(path or self.path, "rb") as f:
            return [json.loads(line) for line in f]

    @inlineCallbacks
    def test_oneLinePerRecordAndProvidesInterface(self) -> Any:
        """Each record is one JSON line; the directory is created; the mode is 0640."""
        w = AuditWriter(reactor, self.path, "none")
        verifyObject(IAuditLog, w)
        verifyObject(IAuditLog, MemoryAuditLog())
        w.open()
        w.write({"a": 1, "b": None})
        w.write({"a": 2, "s": "x\ny"})
        yield w.close()
        self.assertEqual(self.lines(), [{"a": 1, "b": None}, {"a": 2, "s": "x\ny"}])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o640)
        self.assertEqual(self.syncs, [])

    @inlineCallbacks
    def test_intervalGroupCommitOffTheReactorThread(self) -> Any:
        """fsync: interval syncs about once a second, on the audit thread, only when dirty."""
        self.patch(writermod, "SYNC_INTERVAL", 0.1)
        w = AuditWriter(reactor, self.path, "interval")
        w.open()
        for i in range(50):
            w.write({"i": i})
        yield deferLater(reactor, 0.35, lambda: None)
        self.assertEqual(len(self.syncs), 1)  # 50 lines, one group commit, then nothing dirty
        self.assertNotIn(threading.get_ident(), self.syncs)
        yield w.close()
        self.assertEqual(len(self.lines()), 50)

    @inlineCallbacks
    def test_alwaysCoalescesSyncs(self) -> Any:
        """fsync: always syncs after writes, coalescing those that arrive during a sync."""
        w = AuditWriter(reactor, self.path, "always")
        w.open()
        for i in range(100):
            w.write({"i": i})
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertGreaterEqual(len(self.syncs), 1)
        self.assertLess(len(self.syncs), 100)
        yield w.close()
        self.assertEqual(len(self.lines()), 100)

    @inlineCallbacks
    def test_fullDiskKeepsLinesUntilWritable(self) -> Any:
        """A write that fails (ENOSPC) keeps the line; it is written, in order, once possible."""
        w = AuditWriter(reactor, "/dev/full", "none")
        w.open()
        w.write({"i": 1})
        w.write({"i": 2})
        self.assertEqual(w.linesWritten, 0)
        w.path = self.path
        os.makedirs(os.path.dirname(self.path))
        w.reopen()
        w.write({"i": 3})
        yield w.close()
        self.assertEqual([x["i"] for x in self.lines()], [1, 2, 3])
        self.assertEqual(w.linesWritten, 3)
        self.assertEqual(w.linesDropped, 0)

    @inlineCallbacks
    def test_reopenAfterRename(self) -> Any:
        """reopen() after a rename starts a new file; the old one keeps its lines."""
        w = AuditWriter(reactor, self.path, "interval")
        w.open()
        w.write({"i": 1})
        os.rename(self.path, self.path + ".1")
        w.write({"i": 2})
        w.reopen()
        w.write({"i": 3})
        yield w.close()
        self.assertEqual(self.lines(self.path + ".1"), [{"i": 1}, {"i": 2}])
        self.assertEqual(self.lines(), [{"i": 3}])
