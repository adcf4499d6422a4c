#!/usr/bin/env python3
"""
Brute force against API keys must not slow down the callers with good keys.

Starts the fast upstream and mcpgw with one API key (default Argon2id parameters), then measures
sequential tools/call latency of a client with the good (cached) key, in alternating phases:
quiet; a flood of the same requests without a key (401 missing, no Argon2: the cost of the
request volume alone on this shared 2-core box); and a brute-force loop (random wrong keys, as
fast as the gateway answers). Brute force is harmless when its phase matches the plain flood.
Prints p50/p99 for each phase and what the attackers got (401 after an Argon2 run, 429 from the
per-address verification throttle).

    .venv/bin/python bench/auth_bruteforce.py [--rounds 3] [--attackers 4] [--n 1500]
"""

from __future__ import annotations

import argparse
import http.client
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from mcpgw.auth import generateKey, hashKey  # noqa: E402

import loadgen  # noqa: E402
from run import free_port, upstream_python  # noqa: E402


def wait_http(url: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError as e:
            if getattr(e, "code", None):
                return  # an HTTP answer: the server is up
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def attacker(
    port: int, stop: threading.Event, counts: dict[int, int], lock: threading.Lock, withKey: bool
) -> None:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        hdrs = {"Content-Type": "application/json"}
        if withKey:
            hdrs["Authorization"] = "Bearer mcpgw_" + secrets.token_urlsafe(32)
        try:
            conn.request("POST", "/mcp", body, hdrs)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            status = -1
            conn.close()
        with lock:
            counts[status] = counts.get(status, 0) + 1
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--attackers", type=int, default=4)
    ap.add_argument("--n", type=int, default=1500, help="good calls measured per phase")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mcpgw-bruteforce-"))
    up_port, gw_port = free_port(), free_port()
    py, _ = upstream_python(install=True)
    key = generateKey()
    (tmp / "mcpgw.yaml").write_text(
        f"listen: {{host: 127.0.0.1, port: {gw_port}}}\n"
        f"upstreams: [{{name: bench, url: 'http://127.0.0.1:{up_port}/mcp'}}]\n"
        f"audit: {{path: {tmp}/audit.jsonl, fsync: interval}}\n"
        f"auth: {{enabled: true, keys: [{{id: good, hash: '{hashKey(key)}'}}]}}\n"
    )
    procs = [
        subprocess.Popen(
            [py, str(HERE / "upstream_fast.py"), "--port", str(up_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "mcpgw", "run", "--config", str(tmp / "mcpgw.yaml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        ),
    ]
    url = f"http://127.0.0.1:{gw_port}/mcp"
    headers = (("Authorization", f"Bearer {key}"),)
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{up_port}/stats")
        wait_http(f"http://127.0.0.1:{gw_port}/healthz")
        info = loadgen.handshake(
            url, extra_headers=headers
        )  # first use: one Argon2 run, then cached
        kw = {
            "session": info["session"],
            "tool": info["tool"],
            "proto": info["proto"],
            "extra_headers": headers,
        }
        for rnd in range(a.rounds):
            phases = ("quiet", "same flood, no key", "brute force")
            for phase in phases if rnd % 2 == 0 else phases[::-1]:
                stop = threading.Event()
                counts: dict[int, int] = {}
                lock = threading.Lock()
                threads = []
                if phase != "quiet":
                    withKey = phase == "brute force"
                    threads = [
                        threading.Thread(
                            target=attacker, args=(gw_port, stop, counts, lock, withKey)
                        )
                        for _ in range(a.attackers)
                    ]
                    for t in threads:
                        t.start()
                    time.sleep(1.0)
                started = time.monotonic()
                seq = loadgen.seq_latency(url, n=a.n, warmup=100, max_s=15.0, **kw)
                elapsed = time.monotonic() - started
                stop.set()
                for t in threads:
                    t.join(30)
                rows.append(
                    (
                        rnd + 1,
                        phase,
                        seq["p50_ms"],
                        seq["p99_ms"],
                        seq["bad"],
                        dict(counts),
                        elapsed,
                    )
                )
                time.sleep(1.0)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    print("| round | phase | good p50 ms | good p99 ms | good errors | attacker answers |")
    print("|---:|---|---:|---:|---:|---|")
    for rnd, phase, p50, p99, bad, counts, _ in rows:
        ans = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "-"
        print(f"| {rnd} | {phase} | {p50:.3f} | {p99:.3f} | {bad} | {ans} |")
    for phase in ("quiet", "same flood, no key", "brute force"):
        p50s = [r[2] for r in rows if r[1] == phase]
        p99s = [r[3] for r in rows if r[1] == phase]
        print(
            f"{phase}: median p50 {statistics.median(p50s):.3f} ms, median p99 {statistics.median(p99s):.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
