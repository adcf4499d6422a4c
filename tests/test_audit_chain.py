"""
The chained writer (resume after a crash, the first line of a new file, checkpoints) and
C{audit.on_write_failure: refuse} through a real gateway on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from mcpgw.audit import writer as writermod
from mcpgw.audit.chain import GENESIS, Chain, keygen, loadPublicKey, loadSigningKey, verify
from mcpgw.audit.writer import AuditWriter
from tests.support import GatewayTestCase, rpc


def lines(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [json.loads(x) for x in f]


class ChainWriterTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "audit.jsonl")
        self.key = os.path.join(self.dir, "k")
        keygen(self.key, self.key + ".pub")

    def writer(self, **kw: Any) -> AuditWriter:
        w = AuditWriter(Clock(), self.path, "none", chain=True, **kw)
        w.open()
        return w

    def test_sealIsTheDocumentedHash(self) -> None:
        """hash_N = SHA-256(hash_{N-1} || the line's bytes before ,"hash":")."""
        import hashlib

        line = Chain().seal(b'{"a":1}')
        head = b'{"a":1,"seq":1'
        self.assertEqual(
            line,
            head + b',"hash":"' + hashlib.sha256(GENESIS + head).hexdigest().encode() + b'"}\n',
        )

    @inlineCallbacks
    def test_resumesAfterTornLine(self) -> Any:
        """
        A crash mid-line (no stop checkpoint, an incomplete last line): the next start cuts the
        incomplete line, says so, and continues from the last complete line.
        """
        w = self.writer()
        for i in range(3):
            w.write({"i": i})
        # a crash: no close(), and half a line
        with open(self.path, "ab") as f:
            f.write(b'{"i":3,"se')
        os.close(w._fd)
        w = self.writer()
        w.write({"i": 4})
        yield w.close()
        got = lines(self.path)
        self.assertEqual([x["seq"] for x in got], list(range(1, len(got) + 1)))
        start = got[4]
        self.assertEqual(
            (start["event"], start["reason"], start["torn_bytes"]), ("chain", "start", 10)
        )
        self.assertEqual(start["prev_seq"], 4)
        report = verify([self.path])
        self.assertIsNone(report.brk)
        self.assertEqual(report.crashes, 1)

    @inlineCallbacks
    def test_restartIntoEmptyFileFindsRotatedOne(self) -> Any:
        """Restarted after logrotate renamed (and compressed) the file: the chain continues."""
        import gzip

        w = self.writer()
        w.write({"i": 1})
        yield w.close()
        with open(self.path, "rb") as f, gzip.open(self.path + "-20261203.gz", "wb") as g:
            g.write(f.read())
        os.remove(self.path)
        w = self.writer()
        w.write({"i": 2})
        yield w.close()
        first = lines(self.path)[0]
        self.assertEqual(first["prev_seq"], 3)
        self.assertIsNone(verify([self.path + "-20261203.gz", self.path]).brk)

    @inlineCallbacks
    def test_checkpointsByLinesAndSeconds(self) -> Any:
        """Signed checkpoints every N lines, every S seconds if anything was written, at stop."""
        clock = Clock()
        w = AuditWriter(
            clock,
            self.path,
            "none",
            chain=True,
            signingKey=loadSigningKey(self.key),
            checkpointLines=4,
            checkpointSeconds=10,
        )
        w.open()
        for i in range(5):
            w.write({"i": i})
        clock.advance(10)
        clock.advance(10)  # nothing written since: no checkpoint
        yield w.close()
        reasons = [x["reason"] for x in lines(self.path) if x.get("event") == "checkpoint"]
        self.assertEqual(reasons, ["lines", "seconds", "stop"])
        report = verify([self.path], loadPublicKey(self.key + ".pub"))
        self.assertIsNone(report.brk)
        self.assertEqual(report.signatures, 3)

    def test_configRefusesAKeyThatIsNotEd25519(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from mcpgw.config import ConfigError, config_from_string

        bad = os.path.join(self.dir, "ec.key")
        with open(bad, "wb") as f:
            f.write(
                ec.generate_private_key(ec.SECP256R1()).private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        text = (
            "upstreams: [{name: a, url: 'http://127.0.0.1:1/mcp'}]\n"
            f"audit: {{integrity: {{chain: true, signing_key: {bad}}}}}\n"
        )
        with self.assertRaises(ConfigError) as e:
            config_from_string(text, base_dir=self.dir)
        self.assertIn("audit.integrity.signing_key", str(e.exception))
        self.assertIn("not an Ed25519 key", str(e.exception))
        ok = config_from_string(text.replace(bad, self.key), base_dir=self.dir)
        self.assertTrue(ok.audit.integrity.chain)
        with self.assertRaises(ConfigError) as e:
            config_from_string(
                text.replace("chain: true", "chian: true").replace(bad, self.key),
                base_dir=self.dir,
            )
        self.assertIn("audit.integrity.chian: unknown key; did you mean 'chain'?", str(e.exception))
        self.assertIn("needs audit.integrity.chain: true", str(e.exception))


class RefuseTests(GatewayTestCase):
    """
    C{on_write_failure: refuse}: while lines cannot be written (the disk is full), requests are
    answered 503 with a JSON-RPC error and /readyz says why; serving resumes by itself.
    """

    def configText(self) -> str:
        return (
            super()
            .configText()
            .replace("fsync: none,", "fsync: none, on_write_failure: refuse,")
            .replace("state_dir:", "integrity: {chain: true}, state_dir:")
        )

    @inlineCallbacks
    def test_refusesWhileFailingAndRecovers(self) -> Any:
        self.patch(writermod, "RETRY_INTERVAL", 0.1)
        ok = yield self.call(body=rpc("ping", id=1))
        self.assertEqual(ok.status, 200)
        writer = self.service.audit
        saved = os.dup(writer._fd)
        self.addCleanup(os.close, saved)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, writer._fd)  # the disk is full now
        os.close(full)
        inflight = yield self.call(body=rpc("ping", id=2))
        self.assertEqual(inflight.status, 200)  # it was served before its line failed
        self.assertTrue(writer.failing)
        refused = yield self.call(body=rpc("tools/call", {"name": "echo"}, id=3))
        self.assertEqual(refused.status, 503)
        self.assertEqual(refused.header("Retry-After"), ["1"])
        body = refused.json()
        self.assertEqual(body["id"], 3)
        self.assertEqual(body["error"]["code"], -32017)
        self.assertEqual(body["error"]["message"], "audit_unavailable")
        self.assertEqual(len(self.upstream.seen), 2)  # the upstream was not contacted
        ready = yield self.call("GET", "/readyz")
        self.assertEqual(ready.status, 503)
        audit = ready.json()["audit"]
        self.assertEqual((audit["writing"], audit["backlog_lines"]), (False, 2))
        self.assertIn("No space left", audit["last_error"])
        self.assertGreaterEqual(audit["write_failures"], 2)

        os.dup2(saved, writer._fd)  # space again: no operator action needed
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(writer.failing)
        again = yield self.call(body=rpc("ping", id=4))
        self.assertEqual(again.status, 200)
        ready = yield self.call("GET", "/readyz")
        self.assertEqual(ready.status, 200)
        calls = [x for x in lines(self.auditPath) if "event" not in x]
        self.assertEqual([x["jsonrpc_id"] for x in calls], [1, 2, 3, 4])
        self.assertEqual([x["status"] for x in calls], [200, 200, 503, 200])
        self.assertEqual(calls[2]["error"], "audit_unavailable")
        self.assertIsNone(verify([self.auditPath], live=True).brk)


class ServeTests(GatewayTestCase):
    """The default, C{on_write_failure: serve}: a failing audit file does not stop requests."""

    @inlineCallbacks
    def test_servesWhileFailing(self) -> Any:
        writer = self.service.audit
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, writer._fd)
        os.close(full)
        for i in range(2):
            reply = yield self.call(body=rpc("ping", id=i))
            self.assertEqual(reply.status, 200)
        ready = yield self.call("GET", "/readyz")
        self.assertEqual(ready.status, 200)
        self.assertFalse(ready.json()["audit"]["writing"])
