#!/usr/bin/env python3
"""state.backend: redis: what a shared bucket costs, and which Redis client to use.

    .venv/bin/python bench/redis_bench.py [--rounds N] [--calls N] [--skip-gateway]

Starts its own redis-server (Debian's package; 127.0.0.1, a free port, no persistence) and stops
it at the end, by pid. Two parts:

  1. client: one token-bucket take (the EVALSHA of mcpgw.redisstate.TAKE_SCRIPT) from a Twisted
     reactor, with mcpgw's own protocol on hiredis's parser (RedisState) and with txredisapi
     1.6 (its evalsha, hiredis parser where it can): the sequential latency (p50/p99 of N takes,
     one at a time) and the pipelined throughput and CPU per take (N takes in flight at once).
  2. gateway: python -m mcpgw run three times, identical but for state (memory; redis with
     leases, lease_tokens: auto; redis with lease_tokens: 0, one round trip per call), in front
     of bench/upstream_fast.py, with one rate_limit rule deciding every tools/call (a bucket so
     large it never refuses: auto leases 16 tokens); loadgen.seq_latency (tools/call echo,
     ~1 KB) against each in turn, N rounds. Reported: p50 of each and the added p50 of each
     Redis variant (redis - memory), against the issue's target of +0.15 ms with a local Redis.

Results are printed as markdown. See docs/scaling-redis.md for the figures and what they mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from tests.redisserver import REDIS_SERVER, RedisServer  # noqa: E402

import loadgen  # noqa: E402
import run  # noqa: E402  (the harness: Procs, wait_ready, upstream_python)

GATEWAY_CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
upstreams:
  - {{name: bench, url: "http://127.0.0.1:{up}/mcp", path: /mcp}}
audit: {{path: {tmp}/audit-{name}.jsonl, fsync: interval, state_dir: {tmp}/state-{name}}}
policy:
  rules:
    - id: budget
      action: rate_limit
      match: {{exact: echo}}
      rate_limit: {{rate: 1000000000, burst: 1000000000, per: client}}
state:
  backend: {backend}
  redis: {{url: "redis://127.0.0.1:{redis}/0", timeout_ms: 50, lease_tokens: {lease}}}
"""

#: The gateways compared: name -> (state.backend, state.redis.lease_tokens).
VARIANTS = {"memory": ("memory", "auto"), "redis": ("redis", "auto"), "redis-nolease": ("redis", 0)}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


# -- 1. the clients ---------------------------------------------------------------------------


def clientBench(port: int, calls: int, rounds: int) -> list[dict[str, Any]]:
    from twisted.internet import defer, reactor

    from mcpgw.config import RedisConfig
    from mcpgw.redisstate import TAKE_SCRIPT, TAKE_SHA, RedisState

    results: list[dict[str, Any]] = []

    @defer.inlineCallbacks
    def measure(name: str, take: Any) -> Any:
        for _ in range(200):  # warm-up
            yield take("warm")
        seq: list[float] = []
        for i in range(calls):
            t0 = time.perf_counter()
            yield take(f"k{i % 100}")
            seq.append((time.perf_counter() - t0) * 1e6)
        cpu0, t0 = time.process_time(), time.perf_counter()
        batch = 100
        for r in range(calls // batch):
            yield defer.gatherResults([take(f"p{(r * batch + j) % 1000}") for j in range(batch)])
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        n = (calls // batch) * batch
        results.append(
            {
                "client": name,
                "seq_p50_us": pct(seq, 50),
                "seq_p99_us": pct(seq, 99),
                "pipelined_per_s": n / wall,
                "cpu_us_per_take": cpu / n * 1e6,
            }
        )

    @defer.inlineCallbacks
    def main() -> Any:
        import txredisapi

        state = RedisState(reactor, RedisConfig(url=f"redis://127.0.0.1:{port}/0", lease_tokens=0))
        state.startService()
        yield state.whenConnected()
        buckets = state.buckets("rule:bench", 1e9, 1e9, 10)
        tx = yield txredisapi.Connection("127.0.0.1", port, reconnect=False, convertNumbers=True)
        yield tx.execute_command("SCRIPT", "LOAD", TAKE_SCRIPT)

        def txTake(key: str) -> Any:
            return tx.execute_command(
                "EVALSHA", TAKE_SHA, 1, "mcpgw:rl:rule:bench:" + key, "1e9", "1e9", "1", "t"
            )

        for _ in range(rounds):
            yield measure("mcpgw RedisProtocol (hiredis)", lambda k: buckets.take(k, 0.0))
            yield measure(f"txredisapi {txredisapi.__version__}", txTake)
        yield tx.disconnect()
        yield state.stopService()

    failure: list[Any] = []

    def go() -> None:
        d = main()
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if failure:
        failure[0].raiseException()
    return results


# -- 2. the gateway ---------------------------------------------------------------------------


def gatewayBench(redisPort: int, calls: int, rounds: int, tmp: Path) -> dict[str, Any]:
    procs = run.Procs(tmp)
    try:
        upPy, loop = run.upstream_python(install=False)
        upPort = run.free_port()
        up = procs.spawn("upstream", [upPy, str(HERE / "upstream_fast.py"), "--port", str(upPort)])
        run.wait_ready(procs, up, upPort, 30)
        urls = {}
        for name, (backend, lease) in VARIANTS.items():
            port = run.free_port()
            path = tmp / f"{name}.yaml"
            path.write_text(
                GATEWAY_CONFIG.format(
                    port=port,
                    up=upPort,
                    tmp=tmp,
                    name=name,
                    backend=backend,
                    redis=redisPort,
                    lease=lease,
                )
            )
            p = procs.spawn(name, [sys.executable, "-m", "mcpgw", "run", "--config", str(path)])
            run.wait_ready(procs, p, port, 30, f"http://127.0.0.1:{port}/healthz")
            urls[name] = f"http://127.0.0.1:{port}/mcp"
        session = {b: loadgen.handshake(u) for b, u in urls.items()}
        p50s: dict[str, list[float]] = {b: [] for b in VARIANTS}
        p99s: dict[str, list[float]] = {b: [] for b in VARIANTS}
        order = list(VARIANTS)
        for _ in range(rounds):
            for backend in order:
                r = loadgen.seq_latency(urls[backend], session=session[backend], n=calls)
                if r["bad"]:
                    raise RuntimeError(f"{backend}: {r['bad']} bad answers: {r['first_bad']}")
                p50s[backend].append(r["p50_ms"])
                p99s[backend].append(r["p99_ms"])
            order.reverse()
        readyz = {
            b: json.loads(
                urllib.request.urlopen(urls[b].replace("/mcp", "/readyz"), timeout=5).read()
            )["state"]
            for b in ("redis", "redis-nolease")
        }
        return {
            "loop": loop,
            "readyz": readyz,
            "p50": {b: statistics.median(v) for b, v in p50s.items()},
            "p99": {b: statistics.median(v) for b, v in p99s.items()},
            "rounds": p50s,
        }
    finally:
        procs.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--skip-gateway", action="store_true")
    ap.add_argument("--skip-clients", action="store_true")
    ap.add_argument(
        "--redis-nice",
        type=int,
        default=None,
        help="renice redis-server (e.g. -10, as root): tells scheduling delay on a busy machine "
        "from the cost of the round trip itself",
    )
    a = ap.parse_args()
    if REDIS_SERVER is None:
        print("redis-server is not installed (Debian: apt-get install redis-server)")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="mcpgw-redis-bench-"))
    redis = RedisServer(str(tmp)).start()
    if a.redis_nice is not None:
        assert redis.proc is not None
        os.setpriority(os.PRIO_PROCESS, redis.proc.pid, a.redis_nice)
    version = redis.command("INFO", "server").decode().split("redis_version:")[1].split()[0]
    try:
        load = os.getloadavg()[0]
        nice = f", redis-server niced {a.redis_nice}" if a.redis_nice is not None else ""
        print(
            f"# state.backend: redis (redis-server {version}, {os.cpu_count()} CPUs, "
            f"load average {load:.1f}{nice})\n"
        )
        if not a.skip_clients:
            rows = clientBench(redis.port, a.calls, a.rounds)
            print("## One take (EVALSHA of the bucket script), from a Twisted reactor\n")
            print("| client | seq p50 µs | seq p99 µs | pipelined takes/s | CPU µs/take |")
            print("|---|---|---|---|---|")
            for name in dict.fromkeys(r["client"] for r in rows):
                mine = [r for r in rows if r["client"] == name]

                def m(key: str, rows: list[dict[str, Any]] = mine) -> float:
                    return statistics.median(r[key] for r in rows)

                print(
                    f"| {name} | {m('seq_p50_us'):.0f} | {m('seq_p99_us'):.0f} | "
                    f"{m('pipelined_per_s'):,.0f} | {m('cpu_us_per_take'):.1f} |"
                )
            print()
        if not a.skip_gateway:
            g = gatewayBench(redis.port, a.calls, a.rounds, tmp)
            print(
                "## A rate-limited tools/call through mcpgw, sequential (upstream: "
                + g["loop"]
                + ")\n"
            )
            print("| gateway | p50 ms | p99 ms | p50 per round |")
            print("|---|---|---|---|")
            labels = {
                "memory": "state.backend: memory",
                "redis": "redis, lease_tokens: auto (16)",
                "redis-nolease": "redis, lease_tokens: 0",
            }
            for b in VARIANTS:
                rounds = ", ".join(f"{x:.3f}" for x in g["rounds"][b])
                print(f"| {labels[b]} | {g['p50'][b]:.3f} | {g['p99'][b]:.3f} | {rounds} |")
            print()
            for b in ("redis", "redis-nolease"):
                added = g["p50"][b] - g["p50"]["memory"]
                verdict = "meets" if added <= 0.15 else "misses"
                state = g["readyz"][b]
                avg = state["latency_ms_avg"]
                print(
                    f"- {labels[b]}: added p50 {added * 1000:+.0f} µs ({verdict} the +150 µs "
                    f"target); {state['leased']:,} takes leased, {state['commands']:,} calls "
                    f"waited for Redis, {state['lease_fetches']:,} background lease fetches; "
                    f"mean round trip {avg * 1000 if avg is not None else float('nan'):.0f} µs"
                )
    finally:
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
