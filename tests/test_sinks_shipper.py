"""
The shipper itself, with an in-memory sink: cursors, batching, rotation, restarts, reloads and
failure handling (no network; the real sinks have their own test modules).
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Any, cast

import orjson
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mcpgw.audit import shipper as shippermod
from mcpgw.audit import sinks
from mcpgw.audit.shipper import cursorPath
from mcpgw.audit.sinks import (
    SINK_LIBRARIES,
    SINKS_INSTALL,
    BatchRejected,
    BatchTooLarge,
    ISink,
    RetryLater,
    fileIdOf,
    missingLibrary,
)
from mcpgw.config import BatchConfig, S3SinkConfig, WebhookSinkConfig
from mcpgw.health import Readiness
from mcpgw.testing import MemorySink
from tests.sinkservers import ShipperHarness


def sinkConfig(name: str = "mem", lines: int = 100, seconds: float = 0.2) -> WebhookSinkConfig:
    return WebhookSinkConfig(
        name=name, url="https://unused.example/", batch=BatchConfig(lines, seconds)
    )


class ShipperTests(ShipperHarness, TestCase):
    """The shipping loop against a MemorySink."""

    def setUp(self) -> None:
        self.setUpHarness((sinkConfig(),))
        self.memory: dict[str, MemorySink] = {}
        self.refuse: dict[str, str] = {}

    def factory(self, reactor: Any, config: Any, pool: Any) -> MemorySink:
        sink = self.memory.get(config.name)
        if sink is None or sink.stopped:
            sink = self.memory[config.name] = MemorySink(config)
            sink.refuse = self.refuse.get(config.name)
        return sink

    def start(self) -> Any:
        return self.startShipping(self.factory)

    def allShipped(self) -> bytes:
        return b"".join(self.written)

    @inlineCallbacks
    def test_linesShippedExactlyInBatches(self) -> Any:
        """Every line arrives once, in order, byte for byte, in batches of at most max_lines."""
        verifyObject(ISink, MemorySink(sinkConfig()))
        self.write(250)
        self.start()
        yield self.waitFor(lambda: self.shippedAll("mem"), what="all shipped")
        sink = self.memory["mem"]
        self.assertEqual(sink.data(), self.allShipped())
        self.assertEqual([b.lineCount for b in sink.batches], [100, 100, 50])
        first = self.written[0]
        self.assertEqual({b.fileId for b in sink.batches}, {fileIdOf(first)})
        self.assertEqual(sink.batches[1].start, sink.batches[0].end)
        self.assertEqual(self.shipper("mem").status()["lag_lines"], 0)

    @inlineCallbacks
    def test_partialBatchWaitsForMaxSeconds(self) -> Any:
        """A batch that is not full is shipped once its first line waited max_seconds."""
        self.sinks = (sinkConfig(seconds=0.5),)
        self.start()
        yield self.waitFor(lambda: self.shipper("mem").state == "running")
        self.write(3)
        yield deferLater(reactor, 0.25, lambda: None)
        self.assertEqual(self.memory["mem"].batches, [])
        yield self.waitFor(lambda: self.shippedAll("mem"), what="shipped after max_seconds")
        self.assertEqual([b.lineCount for b in self.memory["mem"].batches], [3])

    @inlineCallbacks
    def test_cursorIsPersistedAtomically(self) -> Any:
        """After an acknowledged batch the cursor file holds the file identity and new offset."""
        self.write(10)
        self.start()
        yield self.waitFor(lambda: self.shippedAll("mem"))
        yield self.stopShipping()
        path = cursorPath(os.path.join(self.tmp, "state"), "mem")
        with open(path, "rb") as f:
            cursor = orjson.loads(f.read())
        st = os.stat(self.auditPath)
        self.assertEqual(cursor["offset"], st.st_size)
        self.assertEqual((cursor["file"]["dev"], cursor["file"]["ino"]), (st.st_dev, st.st_ino))
        self.assertEqual(cursor["file"]["id"], fileIdOf(self.written[0]))
        self.assertIsNone(cursor["inflight"])
        self.assertEqual([f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")], [])

    @inlineCallbacks
    def test_rotationFinishesOldFileThenFollowsNew(self) -> Any:
        """Lines written after the rename but before the reopen, then in the new file, all ship."""
        self.start()
        self.write(30)
        yield self.waitFor(lambda: self.shippedAll("mem"))
        os.rename(self.auditPath, self.auditPath + ".1")
        self.write(20)  # still the old (renamed) file: the writer has not reopened yet
        yield deferLater(reactor, 0.1, lambda: None)
        self.writer.reopen()
        self.shipping.auditReopened()
        self.write(40)
        yield self.waitFor(
            lambda: self.shippedAll("mem") and self.shipper("mem").shippedLines == 90
        )
        sink = self.memory["mem"]
        self.assertEqual(sink.data(), self.allShipped())
        self.assertEqual(len({b.fileId for b in sink.batches}), 2)
        self.assertEqual(len(self.shipper("mem").chain), 1)

    @inlineCallbacks
    def test_rotationWhileStoppedIsFoundByInode(self) -> Any:
        """A cursor in a file renamed while the shipper was stopped resumes in the renamed file."""
        self.start()
        self.write(20)
        yield self.waitFor(lambda: self.shippedAll("mem"))
        yield self.stopShipping()
        old = self.memory["mem"]
        self.write(15)
        self.rotate()
        self.write(5)
        self.start()
        yield self.waitFor(
            lambda: self.shippedAll("mem") and self.shipper("mem").shippedLines == 20
        )
        self.assertEqual(old.data() + self.memory["mem"].data(), self.allShipped())
        self.assertEqual(len(self.shipper("mem").chain), 1)

    @inlineCallbacks
    def test_restartWithBatchInFlightResendsSameBatch(self) -> Any:
        """A batch in flight at a stop is re-sent after the restart with the same id and range."""
        self.write(150)
        self.start()
        yield self.waitFor(lambda: "mem" in self.memory and bool(self.memory["mem"].batches))
        self.memory["mem"].hold = Deferred()  # the second batch never gets an answer
        yield self.waitFor(lambda: len(self.memory["mem"].attempts) == 2)
        old = self.memory["mem"]
        held = old.attempts[1]
        self.patch(shippermod, "STOP_GRACE", 0.2)
        yield self.stopShipping()
        self.start()
        yield self.waitFor(lambda: self.shippedAll("mem"))
        new = self.memory["mem"]
        self.assertEqual(new.batches[0].batchId, held.batchId)
        self.assertEqual(old.data() + new.data(), self.allShipped())

    @inlineCallbacks
    def test_transientFailuresAreRetriedWithSameBatch(self) -> Any:
        """Failures are retried with backoff; the same bytes are sent until acknowledged."""
        self.start()
        yield self.waitFor(lambda: "mem" in self.memory)
        self.memory["mem"].failures = [RuntimeError("down"), RetryLater("429", 0.1), OSError("x")]
        self.write(40)
        yield self.waitFor(lambda: self.shippedAll("mem"))
        sink = self.memory["mem"]
        self.assertEqual(len({(b.start, b.end) for b in sink.attempts}), 1)
        self.assertEqual(sink.data(), self.allShipped())
        status = self.shipper("mem").status()
        self.assertEqual(status["last_error"], "x")
        self.assertIsNotNone(status["last_success"])

    @inlineCallbacks
    def test_rejectedBatchHaltsUntilReload(self) -> Any:
        """A rejected batch halts the sink with nothing skipped; a reload resumes it."""
        self.start()
        yield self.waitFor(lambda: "mem" in self.memory)
        self.memory["mem"].failures = [BatchRejected("HTTP 401")]
        self.write(10)
        yield self.waitFor(lambda: self.shipper("mem").state == "halted")
        self.assertEqual(self.shipper("mem").lag()[1], sum(map(len, self.written)))
        _name, ok, detail = self.shipping.readinessCheck()
        self.assertTrue(ok)
        self.assertEqual(detail["mem"]["state"], "halted")
        yield self.shipping.reconfigure(self.auditConfig())
        yield self.waitFor(lambda: self.shippedAll("mem"))
        self.assertEqual(self.memory["mem"].data(), self.allShipped())

    @inlineCallbacks
    def test_tooLargeBatchIsHalved(self) -> Any:
        """A 413 makes the shipper retry with half the lines, and keep that size."""
        self.start()
        yield self.waitFor(lambda: "mem" in self.memory)
        self.memory["mem"].failures = [BatchTooLarge("HTTP 413")]
        self.write(100)
        yield self.waitFor(lambda: self.shippedAll("mem"))
        sink = self.memory["mem"]
        self.assertEqual([b.lineCount for b in sink.batches], [50, 50])
        self.assertEqual(sink.data(), self.allShipped())

    @inlineCallbacks
    def test_refusedSinkMakesReadinessFail(self) -> Any:
        """A sink whose startup check refuses does not ship and makes /readyz not ready."""
        self.refuse["mem"] = "bucket has no Object Lock"
        self.write(5)
        self.start()
        yield self.waitFor(lambda: self.shipper("mem").state == "refused")
        readiness = Readiness(reactor)
        readiness.extraChecks.append(self.shipping.readinessCheck)
        result = readiness._withState({"ready": True, "status": "ready", "generation": 1})
        self.assertFalse(result["ready"])
        self.assertEqual(result["sinks"]["mem"]["state"], "refused")
        self.assertIn("Object Lock", result["sinks"]["mem"]["last_error"])
        self.assertEqual(self.memory["mem"].attempts, [])

    @inlineCallbacks
    def test_reloadAddsRemovesAndChangesSinksKeepingCursors(self) -> Any:
        """Reconfigure adds a sink, changes one (it resumes at its cursor) and removes one."""
        self.start()
        self.write(30)
        yield self.waitFor(lambda: self.shippedAll("mem"))
        shipping = self.shipping
        assert shipping is not None
        yield shipping.reconfigure(self.auditConfig((sinkConfig(lines=7), sinkConfig("new"))))
        self.write(20)
        yield self.waitFor(lambda: self.shippedAll("mem") and self.shippedAll("new"))
        self.assertEqual(self.memory["mem"].data(), b"".join(self.written[30:]))
        self.assertLessEqual(max(b.lineCount for b in self.memory["mem"].batches), 7)
        self.assertEqual(self.memory["new"].data(), self.allShipped())
        yield shipping.reconfigure(self.auditConfig((sinkConfig("new"),)))
        self.assertEqual(sorted(shipping.shippers), ["new"])
        self.assertTrue(self.memory["mem"].stopped)

    @inlineCallbacks
    def test_stopShipsWhatIsLeft(self) -> Any:
        """Stopping ships the lines still waiting for max_seconds (within the grace period)."""
        self.sinks = (sinkConfig(seconds=60),)
        self.start()
        yield self.waitFor(lambda: "mem" in self.memory)
        self.write(5)
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.memory["mem"].batches, [])
        yield self.stopShipping()
        self.assertEqual(self.memory["mem"].data(), self.allShipped())


class StatusLogTests(ShipperHarness, TestCase):
    """The operational log says what a lagging or failing sink is doing."""

    def setUp(self) -> None:
        self.setUpHarness((sinkConfig(),))
        self.sink = MemorySink(sinkConfig())

    @inlineCallbacks
    def test_lagAndErrorsAreLogged(self) -> Any:
        """Failures are logged as they happen; the periodic status line has lag and last error."""
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.sink.failures = [RuntimeError("receiver down")] * 3
        self.startShipping(lambda reactor, config, pool: self.sink)
        self.write(7)
        yield self.waitFor(lambda: self.shipper("mem").attempts >= 2)
        assert self.shipping is not None
        self.shipping.logStatus()
        messages = [
            formatEvent(e) for e in events if e.get("log_namespace", "").endswith("shipper")
        ]
        self.assertTrue(any("receiver down" in m and "attempt 1" in m for m in messages))
        status = [m for m in messages if m.startswith("sink mem (webhook): retrying")]
        self.assertEqual(len(status), 1)
        self.assertIn("lag 7 lines", status[0])
        self.assertIn("last error receiver down", status[0])
        yield self.waitFor(lambda: self.shippedAll("mem"))


class MissingLibraryTests(ShipperHarness, TestCase):
    """
    A sink whose library cannot be imported once the shipper starts it. A config naming a sink
    whose library is not installed is refused before anything starts (see
    C{tests.test_config.SinkLibraryTests} and C{tests.test_cli.SinkLibraryCommandTests}); this is
    the backstop for a library that is found but fails to import (a broken install).
    """

    def setUp(self) -> None:
        self.setUpHarness((S3SinkConfig(name="s3", bucket="corp-mcp-audit"),))

    @inlineCallbacks
    def test_unavailableSinkIsNotReady(self) -> Any:
        """
        The sink is 'unavailable' with a message naming the module and the extra, and /readyz
        is not ready.
        """
        saved = {name: sys.modules.get(name) for name in ("boto3", "mcpgw.audit.sinks.s3")}

        def restore() -> None:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module

        self.addCleanup(restore)
        sys.modules["boto3"] = None  # type: ignore[assignment]  # "import boto3" fails
        sys.modules.pop("mcpgw.audit.sinks.s3", None)
        self.write(3)
        self.startShipping()
        yield self.waitFor(lambda: self.shipper("s3").state == "unavailable")
        assert self.shipping is not None
        _, ok, detail = self.shipping.readinessCheck()
        self.assertFalse(ok)
        self.assertIn("cannot import boto3", detail["s3"]["last_error"])
        self.assertIn("rivano-mcpgw[sinks]", detail["s3"]["last_error"])
        self.assertEqual(detail["s3"]["lag_bytes"], sum(map(len, self.written)))


#: Top-level packages a sink module may import without listing them in SINK_LIBRARIES: mcpgw's
#: own dependencies (setup.cfg install_requires) and mcpgw itself.
CORE_PACKAGES = frozenset(
    {"mcpgw", "twisted", "attr", "zope", "yaml", "httptools", "orjson", "argon2", "jwt"}
)


class SinkLibrariesTableTests(TestCase):
    """L{SINK_LIBRARIES}, which config validation checks, lists what each sink really imports."""

    def importedBy(self, kind: str) -> set[str]:
        """The modules the C{kind} sink module imports at its top level, beyond the core."""
        path = os.path.join(os.path.dirname(sinks.__file__), f"{kind}.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # "from google.cloud import storage" may import google.cloud.storage
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        return {
            name
            for name in names
            if (top := name.partition(".")[0]) not in CORE_PACKAGES
            and top not in sys.stdlib_module_names
            and top != "__future__"
        }

    def test_everyImportIsChecked(self) -> None:
        """Each non-core module a sink imports is, or is inside, a module the check looks for."""
        for kind, libraries in SINK_LIBRARIES.items():
            checked = [module for module, _ in libraries]
            imported = self.importedBy(kind)
            self.assertTrue(imported, kind)
            for name in imported:
                self.assertTrue(
                    any(name == m or name.startswith(m + ".") for m in checked),
                    f"{kind} imports {name}, not covered by SINK_LIBRARIES[{kind!r}] {checked}",
                )

    def test_allInstalled(self) -> None:
        """In the dev environment (which has the sinks extra) no sink library is missing."""
        for kind in SINK_LIBRARIES:
            self.assertIsNone(missingLibrary(kind), kind)

    def test_missing(self) -> None:
        """A module that cannot be found, or whose parent package cannot, is reported."""
        self.patch(
            sinks,
            "SINK_LIBRARIES",
            {"s3": (("mcpgw_test_absent", "absent-dist"),), "gcs": (("json.nope.x", "json"),)},
        )
        self.assertEqual(
            missingLibrary("s3"),
            "the s3 sink needs the Python module 'mcpgw_test_absent' (from absent-dist), which "
            f"is not installed: {SINKS_INSTALL}",
        )
        self.assertIn("'json.nope.x'", missingLibrary("gcs") or "")
        self.assertIsNone(missingLibrary("kafka"))
