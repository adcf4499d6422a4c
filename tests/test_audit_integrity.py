"""
Audit integrity end to end, with real gateway processes: the hash chain and signed checkpoints
across SIGHUP rotation, restart and C{kill -9} under load; C{mcpgw audit verify} on the untouched
output and on every kind of tampering; C{fsync: always} answers only after the line is synced.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer
from typing import Any

from twisted.trial.unittest import TestCase

from mcpgw.audit.chain import Chain, chainState, keygen, loadPublicKey, verify
from tests.support import EchoHandler, freePort

_upstream: ThreadingHTTPServer | None = None


def upstreamPort() -> int:
    global _upstream
    if _upstream is None:
        _upstream = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
        _upstream.daemon_threads = True
        threading.Thread(target=_upstream.serve_forever, daemon=True).start()
    return int(_upstream.server_address[1])


def tearDownModule() -> None:
    if _upstream is not None:
        _upstream.shutdown()
        _upstream.server_close()


class Gateway:
    """One C{mcpgw run} process on 127.0.0.1."""

    def __init__(self, directory: str, audit: str, env: dict[str, str] | None = None) -> None:
        self.port = freePort()
        self.config = os.path.join(directory, "mcpgw.yaml")
        with open(self.config, "w") as f:
            f.write(
                f"listen: {{host: 127.0.0.1, port: {self.port}}}\n"
                f"upstreams: [{{name: up, url: 'http://127.0.0.1:{upstreamPort()}/mcp'}}]\n"
                f"audit: {audit}\n"
            )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcpgw", "run", "--config", self.config],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                url = f"http://127.0.0.1:{self.port}/healthz"
                urllib.request.urlopen(url, timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out = self.proc.communicate()[0] if self.proc.poll() is not None else ""
                    self.kill()
                    raise AssertionError(f"gateway did not start: {out}") from None
                time.sleep(0.05)

    def call(self, rid: Any) -> tuple[int, Any]:
        body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                           "params": {"name": "echo"}})  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/mcp", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.communicate(timeout=30)[0]
        assert self.proc.returncode == 0, out
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


def lines(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [json.loads(x) for x in f]


_realRun: tuple[str, str] | None = None


def realRun() -> tuple[str, str]:
    """
    The untouched output of a real run (made once): chain on, signed checkpoints every 5 lines;
    12 calls, logrotate's rename and SIGHUP, 8 calls, stop; restart, 6 calls, stop.

    @return: the directory (audit.jsonl.1, audit.jsonl, the key pair) and the public key path.
    """
    global _realRun
    if _realRun is None:
        d = tempfile.mkdtemp(prefix="mcpgw-chain-")
        key = os.path.join(d, "signing.key")
        keygen(key, key + ".pub")
        audit = os.path.join(d, "audit.jsonl")
        spec = (
            f"{{path: {audit}, fsync: interval, integrity: {{chain: true, signing_key: {key},"
            " checkpoint: {lines: 5, seconds: 60}}}"
        )
        gw = Gateway(d, spec)
        try:
            for i in range(12):
                assert gw.call(f"a{i}")[0] == 200
            os.rename(audit, audit + ".1")
            gw.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while not os.path.exists(audit) and time.monotonic() < deadline:
                time.sleep(0.05)
            for i in range(8):
                assert gw.call(f"b{i}")[0] == 200
            gw.stop()
        finally:
            gw.kill()
        gw = Gateway(d, spec)
        try:
            for i in range(6):
                assert gw.call(f"c{i}")[0] == 200
            gw.stop()
        finally:
            gw.kill()
        _realRun = (d, key + ".pub")
    return _realRun


def mcpgw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcpgw", *args], capture_output=True, text=True, timeout=60
    )


class RealRunTests(TestCase):
    """C{mcpgw audit verify} on a real run's files, and on tampered copies of them."""

    timeout = 120

    def setUp(self) -> None:
        src, self.pub = realRun()
        self.dir = tempfile.mkdtemp(prefix="mcpgw-tamper-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        for name in ("audit.jsonl.1", "audit.jsonl"):
            shutil.copy(os.path.join(src, name), self.dir)
        self.old = os.path.join(self.dir, "audit.jsonl.1")
        self.new = os.path.join(self.dir, "audit.jsonl")
        self.key = loadPublicKey(self.pub)

    def raw(self, path: str) -> list[bytes]:
        with open(path, "rb") as f:
            return f.readlines()

    def rewrite(self, path: str, data: list[bytes]) -> None:
        with open(path, "wb") as f:
            f.writelines(data)

    def brk(self) -> tuple[str, int, str]:
        report = verify([self.old, self.new], self.key)
        self.assertIsNotNone(report.brk, "the tampering was not detected")
        assert report.brk is not None
        return os.path.basename(report.brk.file), report.brk.line, report.brk.kind

    def requestLineIndexes(self, path: str) -> list[int]:
        return [i for i, x in enumerate(lines(path)) if "event" not in x]

    def test_untouchedRunVerifies(self) -> None:
        """
        Every line is chained; the rotated file's successor starts with a chain line naming its
        last seq and hash; the restart resumes the same file; checkpoints are signed; verify
        says intact (exit 0), also with the rotated file gzip-compressed.
        """
        old, new = lines(self.old), lines(self.new)
        self.assertEqual([x["seq"] for x in old + new], list(range(1, len(old) + len(new) + 1)))
        self.assertEqual(old[0]["event"], "chain")
        self.assertEqual((old[0]["prev_seq"], old[0]["reason"]), (0, "start"))
        self.assertEqual(new[0]["event"], "chain")
        self.assertEqual(new[0]["reason"], "rotate")
        self.assertEqual(
            (new[0]["prev_seq"], new[0]["prev_hash"]), (old[-1]["seq"], old[-1]["hash"])
        )
        starts = [x for x in new if x.get("event") == "chain" and x["reason"] == "start"]
        self.assertEqual(len(starts), 1)
        stops = [x for x in old + new if x.get("event") == "checkpoint" and x["reason"] == "stop"]
        self.assertEqual(len(stops), 2)
        self.assertEqual(new[-1], stops[-1])
        calls = [x["jsonrpc_id"] for x in old + new if "event" not in x]
        self.assertEqual(
            calls, [f"a{i}" for i in range(12)] + [f"b{i}" for i in range(8)]
            + [f"c{i}" for i in range(6)],
        )  # fmt: skip
        self.assertTrue(all(x["sig"] for x in old + new if x.get("event") == "checkpoint"))

        out = mcpgw("audit", "verify", "--public-key", self.pub, self.old, self.new)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("intact", out.stdout)
        self.assertIn(f"seq 1..{len(old) + len(new)}", out.stdout)

        with open(self.old, "rb") as f, gzip.open(self.old + ".gz", "wb") as g:
            g.write(f.read())
        os.remove(self.old)
        report = verify([self.old + ".gz", self.new], self.key)
        self.assertIsNone(report.brk)
        self.assertEqual(report.signatures, report.checkpoints)

    def test_documentedFormatByHand(self) -> None:
        """
        A verifier written from docs/audit.md alone (hashlib, byte slicing, the signed message)
        accepts the real run's files: the documentation is enough.
        """
        import base64
        import hashlib

        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        with open(self.pub, "rb") as f:
            key: Any = load_pem_public_key(f.read())
        prev, seq = bytes(32), 0
        for path in (self.old, self.new):
            with open(path, "rb") as f:
                for line in f:
                    head, rest = line[:-76], line[-76:]
                    self.assertEqual((rest[:9], rest[-3:]), (b',"hash":"', b'"}\n'))
                    self.assertTrue(head.endswith(b',"seq":%d' % (seq + 1)))
                    digest = hashlib.sha256(prev + head).digest()
                    self.assertEqual(digest.hex().encode(), rest[9:73])
                    obj = json.loads(line)
                    if obj.get("event") == "checkpoint":
                        message = (
                            f"mcpgw-audit-checkpoint/v1 {obj['signed_seq']} {obj['signed_hash']} "
                            f"{obj['ts']} {obj['reason']}"
                        ).encode()
                        self.assertEqual((obj["signed_seq"], obj["signed_hash"]), (seq, prev.hex()))
                        key.verify(base64.b64decode(obj["sig"]), message)
                    prev, seq = digest, seq + 1

    def test_deletedLine(self) -> None:
        data = self.raw(self.old)
        i = self.requestLineIndexes(self.old)[3]
        del data[i]
        self.rewrite(self.old, data)
        self.assertEqual(self.brk(), ("audit.jsonl.1", i + 1, "removed"))

    def test_alteredField(self) -> None:
        """One field of one line changed (a denied call made to look allowed)."""
        data = self.raw(self.new)
        i = self.requestLineIndexes(self.new)[2]
        self.assertIn(b'"status":200', data[i])
        data[i] = data[i].replace(b'"status":200', b'"status":403')
        self.rewrite(self.new, data)
        self.assertEqual(self.brk(), ("audit.jsonl", i + 1, "altered"))
        out = mcpgw("audit", "verify", self.old, self.new)
        self.assertEqual(out.returncode, 1)
        self.assertIn(f"BROKEN: {self.new}:{i + 1}: altered", out.stdout)

    def test_insertedLine(self) -> None:
        """A copied line, and a forged line without chain fields, are both detected."""
        data = self.raw(self.old)
        i = self.requestLineIndexes(self.old)[4]
        self.rewrite(self.old, [*data[: i + 1], data[i], *data[i + 1 :]])
        self.assertEqual(self.brk(), ("audit.jsonl.1", i + 2, "inserted"))
        forged = b'{"ts":"2026-12-01T00:00:00.000Z","request_id":"x","status":200}\n'
        self.rewrite(self.old, [*data[: i + 1], forged, *data[i + 1 :]])
        self.assertEqual(self.brk(), ("audit.jsonl.1", i + 2, "inserted"))

    def test_swappedLines(self) -> None:
        data = self.raw(self.old)
        i = self.requestLineIndexes(self.old)[1]
        data[i], data[i + 1] = data[i + 1], data[i]
        self.rewrite(self.old, data)
        self.assertEqual(self.brk(), ("audit.jsonl.1", i + 1, "reordered"))

    def test_truncatedAfterCheckpoint(self) -> None:
        """Cut right after a periodic checkpoint: the stop checkpoint is missing."""
        data = self.raw(self.new)
        cps = [i for i, x in enumerate(lines(self.new)) if x.get("reason") == "lines"]
        self.rewrite(self.new, data[: cps[0] + 1])
        _, _, kind = self.brk()
        self.assertEqual(kind, "truncated")
        # the same cut in the rotated file: its successor says where the chain came from
        self.rewrite(self.new, data)
        old = self.raw(self.old)
        cps = [i for i, x in enumerate(lines(self.old)) if x.get("reason") == "lines"]
        self.rewrite(self.old, old[: cps[0] + 1])
        self.assertEqual(self.brk(), ("audit.jsonl", 1, "truncated"))

    def test_truncatedBeforeCheckpoint(self) -> None:
        """Cut in the middle of a file, before its last checkpoint, or mid-line."""
        data = self.raw(self.new)
        self.rewrite(self.new, data[:-2])
        self.assertEqual(self.brk()[2], "truncated")
        self.rewrite(self.new, [*data[:-1], data[-1][:40]])
        self.assertEqual(self.brk(), ("audit.jsonl", len(data), "truncated"))

    def test_rebuiltChainWithoutKey(self) -> None:
        """
        A forger alters a line and recomputes every hash after it (checkpoint fields included):
        the chain holds, but the signatures do not.
        """
        data = self.raw(self.old)
        i = self.requestLineIndexes(self.old)[0]
        state = chainState(data[i - 1])
        assert state is not None
        chain = Chain(*state)
        out = data[:i]
        for n, line in enumerate(data[i:]):
            obj = json.loads(line)
            if n == 0:
                obj["status"] = 403
            if obj.get("event") == "checkpoint":
                obj["signed_seq"], obj["signed_hash"] = chain.seq, chain.digest.hex()
            del obj["seq"], obj["hash"]
            out.append(chain.seal(json.dumps(obj, separators=(",", ":")).encode()))
        self.rewrite(self.old, out)
        self.assertIsNone(verify([self.old], None, live=True).brk)  # no key: not detectable
        self.assertEqual(self.brk()[2], "bad_signature")

    def test_wrongKey(self) -> None:
        other = os.path.join(self.dir, "other.key")
        keygen(other, other + ".pub")
        out = mcpgw("audit", "verify", "--public-key", other + ".pub", self.old, self.new)
        self.assertEqual(out.returncode, 1)
        self.assertIn("bad_signature", out.stdout)
        self.assertIn(f"{self.old}:", out.stdout)

    def test_fileAloneOrTwice(self) -> None:
        """The current file alone verifies (anchored by its chain line); a file given twice not."""
        self.assertIsNone(verify([self.new], self.key).brk)
        report = verify([self.old, self.old], self.key)
        assert report.brk is not None
        self.assertEqual((report.brk.line, report.brk.kind), (1, "inserted"))


class KillUnderLoadTests(TestCase):
    """
    C{fsync: always} with the chain: clients call in a loop while the gateway is killed with
    SIGKILL, five times; every answered call has its line, and the chain verifies across the
    crashes (each restart resumes from the last complete line).
    """

    timeout = 240

    def test_everyAnsweredCallHasItsLine(self) -> None:
        d = tempfile.mkdtemp(prefix="mcpgw-kill9-")
        self.addCleanup(shutil.rmtree, d, True)
        audit = os.path.join(d, "audit.jsonl")
        spec = f"{{path: {audit}, fsync: always, integrity: {{chain: true}}}}"
        answered: list[str] = []
        rounds = 5
        for r in range(rounds):
            gw = Gateway(d, spec)
            stop = threading.Event()

            def client(n: int, gw: Gateway = gw, stop: threading.Event = stop, r: int = r) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
                i = 0
                while not stop.is_set():
                    i += 1
                    rid = f"r{r}-c{n}-{i}"
                    body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                                       "params": {"name": "echo"}})  # fmt: skip
                    try:
                        conn.request("POST", "/mcp", body, {"Content-Type": "application/json"})
                        resp = conn.getresponse()
                        data = resp.read()
                        if resp.status == 200 and json.loads(data)["id"] == rid:
                            answered.append(rid)
                    except (OSError, http.client.HTTPException, ValueError):
                        return
                conn.close()

            threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
            for t in threads:
                t.start()
            time.sleep(0.6 + 0.1 * r)
            gw.proc.send_signal(signal.SIGKILL)
            gw.proc.communicate(timeout=30)
            stop.set()
            for t in threads:
                t.join(30)
        gw = Gateway(d, spec)
        gw.stop()

        audited = {x.get("jsonrpc_id") for x in lines(audit)}
        missing = [rid for rid in answered if rid not in audited]
        self.assertGreater(len(answered), 100)
        self.assertEqual(missing, [], f"{len(missing)} of {len(answered)} answered calls unaudited")
        report = verify([audit])
        self.assertIsNone(report.brk, str(report.brk))
        self.assertEqual(report.crashes, rounds)


class SyncBeforeAnswerTests(TestCase):
    """The answer waits for the sync: with the disk's sync stalled, no answer goes out."""

    timeout = 60

    def test_answerWaitsForSync(self) -> None:
        d = tempfile.mkdtemp(prefix="mcpgw-sync-")
        self.addCleanup(shutil.rmtree, d, True)
        audit = os.path.join(d, "audit.jsonl")
        # A gateway whose fdatasync blocks while a file exists (a stalled disk).
        gate = os.path.join(d, "stall")
        sitecustomize = os.path.join(d, "sitecustomize.py")
        with open(sitecustomize, "w") as f:
            f.write(
                "import os, time\n"
                "_real = os.fdatasync\n"
                "def _stalled(fd):\n"
                f"    while os.path.exists({gate!r}):\n"
                "        time.sleep(0.01)\n"
                "    return _real(fd)\n"
                "os.fdatasync = _stalled\n"
            )
        env = dict(os.environ, PYTHONPATH=d + os.pathsep + os.environ.get("PYTHONPATH", ""))
        gw = Gateway(d, f"{{path: {audit}, fsync: always}}", env)
        self.addCleanup(gw.kill)
        with open(gate, "w"):
            pass
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(gw.call("held")))
        t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(audit, "rb") as f:
                if b'"held"' in f.read():
                    break
            time.sleep(0.02)
        time.sleep(0.3)
        self.assertEqual(result, [], "answered before the audit line was synced")
        os.remove(gate)
        t.join(10)
        self.assertEqual(result[0][0], 200)
        gw.stop()
