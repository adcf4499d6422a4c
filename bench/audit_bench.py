#!/usr/bin/env python3
"""What the audit hash chain costs per line, and how fast `mcpgw audit verify` is.

    .venv/bin/python bench/audit_bench.py [--lines 1000000] [--rounds 5]

1. Writer, same run: `AuditWriter.write()` of a real audit line (`mcpgw.record.auditLine`, as the
   gateway writes it) to a file with `fsync: none`, without the chain, with the chain, and with
   the chain and signed checkpoints every 10000 lines; the rounds alternate the order; median
   µs per line over the rounds (each round 50000 lines). The difference is what the chain adds on
   the reactor thread per request.
2. `fsync: always` with the chain on the real reactor: 20000 lines, 32 requests ending per
   reactor turn, each waiting for its sync: lines/s until durable, fdatasync calls (group
   commit), mean wait.
3. Verify: a file of --lines chained lines written by the writer (signed checkpoints every 10000
   lines), checked with `mcpgw audit verify --public-key` as a process (wall time, the number the
   issue asks for: 1 million lines in under 10 s), then gzip-compressed and checked again.

Results: markdown on stdout and in bench/results/audit-<timestamp>.md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from twisted.internet.task import Clock  # noqa: E402

from mcpgw.audit.chain import keygen, loadSigningKey  # noqa: E402
from mcpgw.audit.writer import AuditWriter  # noqa: E402
from mcpgw.record import RequestRecord, auditLine  # noqa: E402


def sampleLine(i: int) -> dict[str, Any]:
    record = RequestRecord(
        0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, None, None, 0, 0,
        "tools/call", "search_docs", b"POST", b"/mcp", "docs", i, "5f0c1a7e-session",
        "2025-06-18", "allow", "read-only", "ok", "ci-bot", 1234, 5678, 200, None,
        "10.1.2.3", f"01JD{i:022d}", True, None, None, None, "search_docs", None, 3.217,
        time.time(), "ci-bot", None, None,
    )  # fmt: skip
    return auditLine(record)


def writeRun(path: str, kind: str, n: int, key: Any) -> float:
    """µs per line for C{n} writes of kind C{plain}, C{chain} or C{signed}."""
    if os.path.exists(path):
        os.remove(path)
    w = AuditWriter(
        Clock(),
        path,
        "none",
        chain=kind != "plain",
        signingKey=key if kind == "signed" else None,
        checkpointLines=10000,
    )
    w.open()
    lines = [sampleLine(i) for i in range(n)]
    write = w.write
    t0 = time.perf_counter()
    for line in lines:
        write(line)
    elapsed = time.perf_counter() - t0
    w.close()
    return elapsed / n * 1e6


def alwaysRun(path: str, total: int, concurrent: int) -> tuple[float, int, float]:
    """
    C{fsync: always} with the chain on the real reactor: C{concurrent} requests end per reactor
    turn, each waiting for its line's sync (group commit on the audit thread).

    @return: lines per second until the last is durable, syncs run, mean µs a line waited.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import DeferredList

    from mcpgw.audit import writer as writermod

    if os.path.exists(path):
        os.remove(path)
    syncs = [0]
    realSync = os.fdatasync

    def counting(fd: int) -> None:
        syncs[0] += 1
        realSync(fd)

    writermod.os.fdatasync = counting  # type: ignore[attr-defined]
    w = AuditWriter(reactor, path, "always", chain=True)
    w.open()
    lines = [sampleLine(i) for i in range(total)]
    waits: list[float] = []
    result: list[float] = []

    def burst(i: int, ds: list[Any]) -> None:
        if i >= total:
            DeferredList(ds).addCallback(lambda _: finish())
            return
        for line in lines[i : i + concurrent]:
            t = time.perf_counter()
            d = w.write(line)
            assert d is not None
            d.addCallback(lambda _, t=t: waits.append(time.perf_counter() - t))
            ds.append(d)
        reactor.callLater(0, burst, i + concurrent, ds)  # type: ignore[attr-defined]

    def finish() -> None:
        result.append(time.perf_counter() - t0)
        w.close().addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    t0 = time.perf_counter()
    reactor.callWhenRunning(burst, 0, [])  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    writermod.os.fdatasync = realSync  # type: ignore[attr-defined]
    return total / result[0], syncs[0], statistics.mean(waits) * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=1_000_000, help="lines in the verified file")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="mcpgw-audit-bench-")
    try:
        keyPath = os.path.join(tmp, "signing.key")
        keygen(keyPath, keyPath + ".pub")
        key = loadSigningKey(keyPath)
        kinds = ["plain", "chain", "signed"]
        results: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            for kind in kinds if r % 2 == 0 else reversed(kinds):
                results[kind].append(writeRun(os.path.join(tmp, "w.jsonl"), kind, 50_000, key))
        med = {k: statistics.median(v) for k, v in results.items()}

        always = alwaysRun(os.path.join(tmp, "a.jsonl"), 20_000, 32)

        big = os.path.join(tmp, "audit.jsonl")
        w = AuditWriter(Clock(), big, "none", chain=True, signingKey=key, checkpointLines=10000)
        w.open()
        for i in range(args.lines):
            w.write(sampleLine(i))
        w.close()
        size = os.path.getsize(big)
        cmd = [sys.executable, "-m", "mcpgw", "audit", "verify", "--public-key", keyPath + ".pub"]
        t0 = time.perf_counter()
        out = subprocess.run([*cmd, big], capture_output=True, text=True, cwd=ROOT)
        plainSeconds = time.perf_counter() - t0
        with open(big, "rb") as f, gzip.open(big + ".gz", "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
        t0 = time.perf_counter()
        outGz = subprocess.run([*cmd, big + ".gz"], capture_output=True, text=True, cwd=ROOT)
        gzSeconds = time.perf_counter() - t0
        ok = out.returncode == 0 and outGz.returncode == 0

        lines = [
            f"# audit integrity bench ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
            f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]})",
            "",
            f"## Writer: µs per line (median of {args.rounds} rounds of 50000, fsync: none)",
            "",
            "| audit | µs/line | added by the chain |",
            "| --- | ---: | ---: |",
            f"| no chain | {med['plain']:.2f} | |",
            f"| chain | {med['chain']:.2f} | {med['chain'] - med['plain']:+.2f} |",
            f"| chain + signed checkpoints (every 10000 lines) | {med['signed']:.2f} | "
            f"{med['signed'] - med['plain']:+.2f} |",
            "",
            "## fsync: always, chain on (real reactor, 32 requests ending per reactor turn)",
            "",
            "| lines/s until durable | fdatasync calls for 20000 lines | mean wait µs |",
            "| ---: | ---: | ---: |",
            f"| {always[0]:,.0f} | {always[1]} | {always[2]:,.0f} |",
            "",
            f"## Verify: {args.lines} lines ({size / 1e6:.0f} MB), signatures checked",
            "",
            "| file | wall s | lines/s | exit |",
            "| --- | ---: | ---: | ---: |",
            f"| plain | {plainSeconds:.2f} | {args.lines / plainSeconds:,.0f} | {out.returncode} |",
            f"| gzip | {gzSeconds:.2f} | {args.lines / gzSeconds:,.0f} | {outGz.returncode} |",
            "",
            "```",
            out.stdout.strip(),
            "```",
        ]
        report = "\n".join(lines)
        print(report)
        results_dir = HERE / "results"
        results_dir.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        (results_dir / f"audit-{stamp}.md").write_text(report + "\n")
        if not ok:
            print(out.stdout, out.stderr, outGz.stdout, outGz.stderr, file=sys.stderr)
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
