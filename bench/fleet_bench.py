#!/usr/bin/env python3
"""make bench: what listen.workers costs per request, path by path, in one process (no sockets,
so the figures hold on a busy machine where the throughput runs of run.py cannot).

    .venv/bin/python bench/fleet_bench.py [--lines N]

  worker      the audit line of a request: AuditWriter.write (workers: 1, into the file) against
              PipeAuditLog.write (a worker, into its pipe to the supervisor; a thread drains it)
  supervisor  one audit line through the supervisor: reading it from the pipe's data, parsing it,
              writing it with the AuditWriter, and counting it for /metrics (listen.admin set)
              or not
  metrics     counting one request: mcpgw.metrics.RequestMetrics.observe (what the supervisor
              does) against prometheus-client's multiprocess mode (a labelled counter and a
              histogram, each increment written to an mmap'd file, in the worker)

Audit lines are real ones (a tools/call line of ~650 bytes). Median of 5 repetitions, µs per line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet.task import Clock  # noqa: E402

from mcpgw.audit.writer import AuditWriter  # noqa: E402
from mcpgw.fleet.channel import PipeAuditLog, PipeWriter  # noqa: E402
from mcpgw.fleet.supervisor import WorkerProcess  # noqa: E402
from mcpgw.metrics import MeteredAuditLog, RequestMetrics  # noqa: E402

LINE: dict[str, Any] = {
    "ts": "2026-12-03T12:00:00.123Z",
    "request_id": "6f1c2a9b3d4e5f6a7b8c9d0e",
    "session_id": "3b7d9f2a-5c1e-4a8b-9d0f-1e2a3b4c5d6e",
    "client_ip": "127.0.0.1",
    "method": "tools/call",
    "tool": "echo",
    "upstream": "bench",
    "decision": "allow",
    "rule_id": None,
    "error": None,
    "auth_key_id": None,
    "auth_result": "external",
    "bytes_in": 1187,
    "bytes_out": 1143,
    "status": 200,
    "duration_ms": 0.412,
    "transport": "http",
    "http_method": "POST",
    "path": "/mcp",
    "jsonrpc_id": 123456,
    "batch_size": None,
    "protocol_version": "2025-06-18",
    "redacted": None,
    "filtered_tools": None,
    "client_cert": None,
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "span_id": "00f067aa0ba902b7",
    "principal": None,
    "redacted_results": None,
    "target": "echo",
}


def timed(fn: Any, n: int, reps: int = 5) -> float:
    """Median µs per item of C{fn(n)} over C{reps} runs."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(n)
        out.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(out)


def worker(n: int, tmp: str) -> tuple[float, float]:
    writer = AuditWriter(Clock(), os.path.join(tmp, "file.jsonl"), "none")
    writer.open()

    def toFile(k: int) -> None:
        for _ in range(k):
            writer.write(LINE)

    fileUs = timed(toFile, n)
    r, w = os.pipe()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                if not os.read(r, 1 << 20):
                    return
            except BlockingIOError:
                time.sleep(0.0005)

    os.set_blocking(r, False)
    t = threading.Thread(target=drain, daemon=True)
    t.start()

    class Reactor:  # the writer registers itself while the pipe is full; written below
        def addWriter(self, _: object) -> None:
            pass

        def removeWriter(self, _: object) -> None:
            pass

    pipe = PipeAuditLog(PipeWriter(Reactor(), w))

    def toPipe(k: int) -> None:
        for _ in range(k):
            pipe.write(LINE)
            while pipe.writer._queue:  # the reactor would write it when the pipe has room
                time.sleep(0.0001)
                pipe.writer.doWrite()

    pipeUs = timed(toPipe, n)
    stop.set()
    os.close(w)
    return fileUs, pipeUs


def supervisor(n: int, tmp: str, metered: bool) -> float:
    import orjson

    writer = AuditWriter(Clock(), os.path.join(tmp, f"sup-{metered}.jsonl"), "none")
    writer.open()
    audit: Any = MeteredAuditLog(writer, RequestMetrics()) if metered else writer

    class Pool:
        pass

    pool: Any = Pool()
    pool.audit, pool.tornLines = audit, 0
    proto = WorkerProcess.__new__(WorkerProcess)
    proto.supervisor, proto.index, proto._buffer = pool, 0, b""
    data = (orjson.dumps(LINE) + b"\n") * 64  # what one read of the pipe brings under load

    def run(k: int) -> None:
        for _ in range(k // 64):
            proto._lines(data)

    return timed(run, n)


def metricsCost(n: int, tmp: str) -> tuple[float, float]:
    requests = RequestMetrics()

    def ours(k: int) -> None:
        for _ in range(k):
            requests.observe(LINE)

    oursUs = timed(ours, n)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    counter = Counter("req", "r", ["upstream", "method", "decision", "status"], registry=registry)
    hist = Histogram("dur", "d", ["upstream"], registry=registry)

    def theirs(k: int) -> None:
        for _ in range(k):
            counter.labels("bench", "tools/call", "allow", "200").inc()
            hist.labels("bench").observe(0.000412)

    return oursUs, timed(theirs, n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=20_000, help="lines per repetition")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mcpgw-fleet-bench-")
    n = a.lines
    fileUs, pipeUs = worker(n, tmp)
    plain = supervisor(n, tmp, False)
    metered = supervisor(n, tmp, True)
    oursUs, promUs = metricsCost(n, tmp)
    load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(f"## listen.workers: cost per request, µs (median of 5 x {n} lines; load {load})\n")
    print("| path | µs per request |")
    print("|---|---:|")
    print(f"| worker: audit line into the file (workers: 1) | {fileUs:.2f} |")
    print(f"| worker: audit line into the pipe (workers > 1) | {pipeUs:.2f} |")
    print(f"| supervisor: one line from the pipe to the file | {plain:.2f} |")
    print(f"| supervisor: the same, counted for /metrics | {metered:.2f} |")
    print(f"| counting a request: RequestMetrics.observe (supervisor) | {oursUs:.2f} |")
    print(f"| counting a request: prometheus-client multiprocess mode | {promUs:.2f} |")
    print(
        f"\nAdded per request by workers: {pipeUs - fileUs:+.2f} in the worker, "
        f"{plain:.2f} ({metered:.2f} with /metrics) in the supervisor."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
