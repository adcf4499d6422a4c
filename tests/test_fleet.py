"""
C{listen.workers: 2}: a real supervisor (C{mcpgw run}) and its two worker processes, a real
upstream, real sockets; clients are threads on keep-alive connections. Workers are killed with
SIGKILL, the supervisor gets SIGHUP and SIGTERM; the audit file and C{/metrics} are checked line
by line and count by count.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mcpgw.fleet.supervisor import PREPARE_TIMEOUT, WorkerPool, WorkerProcess
from tests.support import EchoHandler, freePort


def call(conn: http.client.HTTPConnection, rid: int, tool: str = "echo") -> int:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool}}
    )
    conn.request("POST", "/mcp", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status == 200:
        assert json.loads(data)["id"] == rid
    return resp.status


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


class Fleet:
    """A supervisor with two workers, its upstream, its config and its log."""

    def __init__(
        self,
        test: TestCase,
        extra: str = "",
        twistd: bool = False,
        audit: str = "",
        fsync: str = "none",
    ) -> None:
        self.auditExtra, self.fsync = audit, fsync
        self.up = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
        self.up.daemon_threads = True
        threading.Thread(target=self.up.serve_forever, daemon=True).start()
        test.addCleanup(self.up.shutdown)
        self.tmp = tempfile.mkdtemp(prefix="mcpgw-fleet-")
        self.path = os.path.join(self.tmp, "mcpgw.yaml")
        self.audit = os.path.join(self.tmp, "audit.jsonl")
        self.port, self.admin = freePort(), freePort()
        self.write(extra)
        self.log = open(os.path.join(self.tmp, "log"), "w+")  # noqa: SIM115 (closed by kill)
        command = [sys.executable, "-m", "mcpgw", "run", "--config", self.path]
        if twistd:
            twistdBin = os.path.join(os.path.dirname(sys.executable), "twistd")
            command = [twistdBin, "-n", "--pidfile=", "mcpgw", "--config", self.path]
        self.proc = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        test.addCleanup(self.kill)
        self.waitFor(lambda: self.census()[1] == 2, "two workers serving")

    def write(self, extra: str = "") -> None:
        with open(self.path, "w") as f:
            f.write(
                f"listen: {{host: 127.0.0.1, port: {self.port}, workers: 2,"
                f" admin: {{port: {self.admin}}}}}\n"
                f"upstreams: [{{name: up, url: 'http://127.0.0.1:{self.up.server_address[1]}/mcp'}}]\n"
                f"audit: {{path: {self.audit}, fsync: {self.fsync}, state_dir: {self.tmp}/state"
                f"{self.auditExtra}}}\n" + extra
            )

    def census(self) -> tuple[float, float]:
        try:
            m = metrics(self.admin)
        except OSError:
            return (0, 0)
        return total(m, "mcpgw_worker_restarts_total"), total(m, "mcpgw_workers", state="alive")

    def waitFor(self, check: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None, f"supervisor exited: {self.output()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}: {self.output()[-3000:]}"
            )
            time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def workerPids(self) -> set[int]:
        return {
            int(p) for p in re.findall(r"worker \d \(pid (\d+)\) serving generation", self.output())
        }

    def auditLines(self) -> list[dict[str, Any]]:
        with open(self.audit, "rb") as f:
            raw = f.read()
        assert raw.endswith(b"\n") or not raw
        return [json.loads(line) for line in raw.splitlines()]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.log.closed:
            return  # killed already
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.workerPids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


def load(
    port: int, threads: int, stop: threading.Event, perThread: int | None = None
) -> Iterator[Any]:
    """Start C{threads} clients; yields the per-thread results list (rid -> status) when done."""
    results: list[dict[int, int | str]] = [{} for _ in range(threads)]

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        i = 0
        while not stop.is_set() and (perThread is None or i < perThread):
            i += 1
            rid = n * 1_000_000 + i
            try:
                results[n][rid] = call(conn, rid)
            except (OSError, http.client.HTTPException) as e:
                results[n][rid] = type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.close()

    ts = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    yield results
    for t in ts:
        t.join(60)
    yield results


class FleetTests(TestCase):
    timeout = 180

    def test_auditAndMetricsExactUnder16Threads(self) -> None:
        """
        16 threads through 2 workers: the audit file has exactly one whole line per request (no
        line torn or interleaved, every id once), both workers served, and /metrics counts
        exactly the requests sent.
        """
        fleet = Fleet(self)
        stop = threading.Event()
        gen = load(fleet.port, 16, stop, perThread=40)
        next(gen)
        results = next(gen)
        sent = {rid: status for r in results for rid, status in r.items()}
        self.assertEqual(len(sent), 640)
        self.assertEqual(set(sent.values()), {200})
        m = metrics(fleet.admin)
        self.assertEqual(total(m, "mcpgw_requests_total"), 640)
        self.assertEqual(total(m, "mcpgw_requests_total", status="200", method="tools/call"), 640)
        self.assertEqual(total(m, "mcpgw_request_duration_seconds_count"), 640)
        self.assertEqual(total(m, "mcpgw_audit_lines_written_total"), 640)
        # each worker has its own upstream connections: both served
        self.assertEqual(total(m, "mcpgw_workers", state="alive"), 2)
        self.assertNotIn("mcpgw_requests_total", _get(fleet.port, "/metrics"))
        self.assertEqual(fleet.stop(), 0)
        lines = fleet.auditLines()
        self.assertEqual([line["status"] for line in lines if line["path"] == "/metrics"], [404])
        lines = [line for line in lines if line["path"] == "/mcp"]
        self.assertEqual(len(lines), 640)
        self.assertEqual(sorted(line["jsonrpc_id"] for line in lines), sorted(sent))
        self.assertEqual(len({line["request_id"] for line in lines}), 640)

    def test_oneVerifiableChainPerHost(self) -> None:
        """
        audit.integrity.chain with two workers: the supervisor seals every worker's line into
        one chain for the host, across a SIGHUP and a worker killed with SIGKILL under load;
        C{mcpgw audit verify} finds it intact after the stop.
        """
        fleet = Fleet(self, audit=", integrity: {chain: true}")
        stop = threading.Event()
        gen = load(fleet.port, 4, stop)
        next(gen)
        time.sleep(0.5)
        fleet.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        os.kill(sorted(fleet.workerPids())[0], signal.SIGKILL)
        fleet.waitFor(lambda: fleet.census() == (1, 2), "the killed worker replaced")
        time.sleep(0.5)
        stop.set()
        results = next(gen)
        answered = {rid for r in results for rid, status in r.items() if status == 200}
        self.assertGreater(len(answered), 20)
        self.assertEqual(fleet.stop(), 0)
        lines = fleet.auditLines()
        self.assertEqual([line["seq"] for line in lines], list(range(1, len(lines) + 1)))
        calls = {line["jsonrpc_id"] for line in lines if line.get("path") == "/mcp"}
        self.assertLessEqual(answered, calls)
        verify = subprocess.run(
            [sys.executable, "-m", "mcpgw", "audit", "verify", fleet.audit],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)

    def test_killedWorkerReplacedWhileLoadContinues(self) -> None:
        """
        SIGKILL to a worker under load: it is replaced and logged, the load keeps getting
        answers, and every request a client got an answer for has its audit line.
        """
        fleet = Fleet(self)
        before = fleet.workerPids()
        stop = threading.Event()
        gen = load(fleet.port, 4, stop)
        results = next(gen)
        time.sleep(0.5)
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        fleet.waitFor(lambda: fleet.census() == (1, 2), "the worker replaced")
        counts = [len(r) for r in results]
        time.sleep(0.5)
        self.assertTrue(
            all(len(r) > c for r, c in zip(results, counts, strict=False)), "load stalled"
        )
        stop.set()
        next(gen)
        self.assertEqual(fleet.stop(), 0)
        answered = {rid for r in results for rid, status in r.items() if status == 200}
        failed = [s for r in results for s in r.values() if s != 200]
        self.assertLessEqual(len(failed), 4, failed)  # at most the calls in flight on the victim
        audited = {line["jsonrpc_id"] for line in fleet.auditLines()}
        self.assertEqual(answered - audited, set())
        out = fleet.output()
        self.assertIn(f"(pid {victim}) ended (signal 9); replacing it", out)
        self.assertEqual(len(fleet.workerPids() - before), 1)

    def test_sighupReachesEveryWorkerAllOrNone(self) -> None:
        """
        SIGHUP: a new policy reaches both workers (every new connection sees it); a broken
        config is rejected once and every worker keeps the current generation.
        """
        fleet = Fleet(self)
        fleet.write("policy: {rules: [{id: no-echo, action: deny, match: {exact: echo}}]}\n")
        fleet.proc.send_signal(signal.SIGHUP)
        fleet.waitFor(lambda: fleet.output().count("generation 1 -> 2") >= 3, "3 reloads logged")
        statuses = []
        for i in range(12):
            conn = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=10)
            statuses.append(call(conn, i))
            conn.close()
        self.assertEqual(set(statuses), {403})
        with open(fleet.path, "a") as f:
            f.write("bogus: 1\n")
        fleet.proc.send_signal(signal.SIGHUP)
        fleet.waitFor(lambda: "reload rejected" in fleet.output(), "the rejection")
        self.assertEqual(total(metrics(fleet.admin), "mcpgw_config_generation"), 2)
        conn = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=10)
        self.assertEqual(call(conn, 99), 403)
        conn.close()
        self.assertEqual(fleet.stop(), 0)
        self.assertNotIn("generation 2 -> 3", fleet.output())

    def test_sigtermDrainsEveryWorker(self) -> None:
        """
        SIGTERM to C{twistd -n mcpgw} while calls of 3 s are in flight on both workers: each
        completes with 200 and its audit line, then every process exits.
        """
        fleet = Fleet(self, twistd=True)
        pids = fleet.workerPids()
        statuses: list[int] = []

        def slow(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=20)
            statuses.append(call(conn, i, "slow_op"))
            conn.close()

        ts = [threading.Thread(target=slow, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        fleet.waitFor(
            lambda: total(metrics(fleet.admin), "mcpgw_requests_in_flight") == 6, "6 in flight"
        )
        self.assertIn(fleet.stop(), (0, -signal.SIGTERM))  # twistd re-raises SIGTERM
        for t in ts:
            t.join(30)
        self.assertEqual(statuses, [200] * 6)
        self.assertEqual(len(fleet.auditLines()), 6)
        draining = [
            int(n) for n in re.findall(r"stopping: (\d+) requests in flight", fleet.output())
        ]
        self.assertEqual((len(draining), sum(draining)), (2, 6))  # each worker drained its own
        for pid in pids:
            self.assertFalse(os.path.exists(f"/proc/{pid}"), f"worker {pid} still running")


def _get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return str(r.read().decode())
    except urllib.error.HTTPError as e:
        return str(e.read().decode())


class _FakeChildTransport:
    """The process transport of a worker, recording what the supervisor sends it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.pid = 1

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.sent.extend(json.loads(line) for line in data.splitlines())

    def signalProcess(self, sig: int) -> None:
        pass


class TwoStepReloadTests(SynchronousTestCase):
    def pool(self) -> tuple[WorkerPool, list[WorkerProcess]]:
        pool = WorkerPool(Clock(), "/x.yaml", "old", 1, 2, None, None)  # type: ignore[arg-type]
        workers = []
        for i in range(2):
            w = WorkerProcess(pool, i)
            w.makeConnection(_FakeChildTransport())
            w.serving = True
            pool.workers[i] = w
            workers.append(w)
        return pool, workers

    def test_oneWorkerRefusesNoneSwitches(self) -> None:
        """A reload one worker cannot build is aborted in every worker; none commits."""
        pool, (w0, w1) = self.pool()
        d = pool.reload("new", 2)
        self.assertEqual([m["op"] for m in w0.transport.sent], ["prepare"])
        pool.controlReceived(w0, {"op": "prepared", "number": 2, "ok": True})
        pool.controlReceived(w1, {"op": "prepared", "number": 2, "ok": False, "error": "bad"})
        self.assertIs(self.successResultOf(d), False)
        for w in (w0, w1):
            self.assertEqual([m["op"] for m in w.transport.sent], ["prepare", "abort"])
        self.assertEqual((pool.number, pool.text), (1, "old"))

    def test_allPreparedAllCommit(self) -> None:
        """When every worker prepared the new generation, every worker commits it."""
        pool, (w0, w1) = self.pool()
        d = pool.reload("new", 2)
        for w in (w0, w1):
            pool.controlReceived(w, {"op": "prepared", "number": 2, "ok": True})
        self.assertIs(self.successResultOf(d), True)
        for w in (w0, w1):
            self.assertEqual([m["op"] for m in w.transport.sent], ["prepare", "commit"])
        self.assertEqual((pool.number, pool.text), (2, "new"))

    def test_silentWorkerAbortsAll(self) -> None:
        """A worker that does not answer in time aborts the reload for all."""
        pool, (w0, _w1) = self.pool()
        d = pool.reload("new", 2)
        pool.controlReceived(w0, {"op": "prepared", "number": 2, "ok": True})
        pool.reactor.advance(PREPARE_TIMEOUT + 1)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(w0.transport.sent[-1]["op"], "abort")


class HandoverTests(SynchronousTestCase):
    def test_wholeLinesOnlyTornTailDropped(self) -> None:
        """
        The supervisor writes every whole line a worker handed over, however the pipe splits
        them, and drops (and counts) the unfinished tail of a worker that died mid-line.
        """
        written: list[dict[str, Any]] = []

        class Audit:
            def write(self, record: dict[str, Any]) -> None:
                written.append(record)

        pool = WorkerPool(Clock(), "/x.yaml", "", 1, 2, None, Audit())  # type: ignore[arg-type]
        w = WorkerProcess(pool, 0)
        data = b'{"n":1}\n{"n":2}\n!{"op":"ready","number":1}\n{"n":3}\n{"n":'
        for i in range(0, len(data), 5):  # arbitrary splits
            w._lines(data[i : i + 5])
        self.assertEqual(written, [{"n": 1}, {"n": 2}, {"n": 3}])
        self.assertTrue(w.serving)
        w.childConnectionLost(4)
        self.assertEqual((len(written), pool.tornLines), (3, 1))


class FsyncAlwaysTests(TestCase):
    timeout = 180

    def test_kill9UnderLoadKeepsEveryAnsweredLine(self) -> None:
        """
        C{fsync: always} with two workers: a worker answers only once the supervisor says the
        line is synced. SIGKILL to the supervisor and both workers under load, twice: every
        call a client got an answer for has its line in the file. (Without the acknowledgement
        the lines still in the pipes, or written and not synced, die with the supervisor.)
        """
        for _ in range(2):
            fleet = Fleet(self, fsync="always")
            stop = threading.Event()
            gen = load(fleet.port, 6, stop)
            next(gen)
            time.sleep(1.0)
            fleet.kill()
            stop.set()
            results = next(gen)
            answered = {rid for r in results for rid, status in r.items() if status == 200}
            self.assertGreater(len(answered), 20)
            with open(fleet.audit, "rb") as f:
                lines = [json.loads(line) for line in f.read().splitlines() if line.endswith(b"}")]
            calls = {line.get("jsonrpc_id") for line in lines}
            self.assertEqual(answered - calls, set())
