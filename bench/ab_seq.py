#!/usr/bin/env python3
"""Paired A/B of sequential latency: mcpgw-full from two source trees, side by side.

    .venv/bin/python bench/ab_seq.py TREE_A TREE_B [--rounds 12] [--n 1000]

For a change whose effect on the sequential latency is smaller than the host's noise (a shared
VM swings by 100 µs between runs of the same code). Both gateways run at once in front of one
bench/upstream_fast.py, each from its own tree (`python -m mcpgw run` with the tree as working
directory, so its `mcpgw` package is the one imported), with the configuration of run.py's
mcpgw-full (API key, 20 caller rules, audit line). Each round measures N sequential tools/call
against both, in an order swapped every round, plus the upstream alone; the result is the
median of the per-round differences B - A. Run it once with the same tree twice (A/A) to see the
noise floor of the moment. Not part of `make bench` (it compares two trees).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from mcpgw.auth import generateKey, hashKey  # noqa: E402

import loadgen  # noqa: E402
import run  # noqa: E402


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="source tree A (a git worktree)")
    ap.add_argument("b", help="source tree B")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--n", type=int, default=1000, help="sequential calls per system and round")
    args = ap.parse_args()
    up = freePort()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "upstream_fast.py"), "--port", str(up)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    key = generateKey()
    urls = []
    try:
        for tree in (args.a, args.b):
            tmp = tempfile.mkdtemp(prefix="mcpgw-ab-")
            port = freePort()
            cfg = run.MCPGW_CONFIG.format(port=port, upstream=f"http://127.0.0.1:{up}/mcp", tmp=tmp)
            cfg += f"auth:\n  enabled: true\n  keys: [{{id: bench, hash: '{hashKey(key)}'}}]\n"
            cfg += run.full_policy_yaml()
            Path(tmp, "full.yaml").write_text(cfg)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mcpgw", "run", "--config", f"{tmp}/full.yaml"],
                    cwd=tree,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            urls.append(f"http://127.0.0.1:{port}/mcp")
        time.sleep(3)
        hdr = (("Authorization", f"Bearer {key}"),)
        for u in urls:
            loadgen.seq_latency(u, extra_headers=hdr, n=300)
        a: list[float] = []
        b: list[float] = []
        direct: list[float] = []
        for i in range(args.rounds):
            p50 = {}
            for k in (0, 1) if i % 2 == 0 else (1, 0):
                p50[k] = loadgen.seq_latency(urls[k], extra_headers=hdr, n=args.n, warmup=50)[
                    "p50_ms"
                ]
            a.append(p50[0])
            b.append(p50[1])
            direct.append(
                loadgen.seq_latency(f"http://127.0.0.1:{up}/mcp", n=args.n // 2, warmup=50)["p50_ms"]
            )
        diffs = [(y - x) * 1000 for x, y in zip(a, b, strict=True)]
        print(
            f"A p50 {statistics.median(a):.3f} ms, B p50 {statistics.median(b):.3f} ms, "
            f"upstream alone {statistics.median(direct):.3f} ms; B - A, median of "
            f"{args.rounds} paired rounds: {statistics.median(diffs):+.0f} µs "
            f"(min {min(diffs):+.0f}, max {max(diffs):+.0f})"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
