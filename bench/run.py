#!/usr/bin/env python3
"""make bench: added latency, throughput and CPU of mcpgw against the upstream called directly
and against the Twisted reference stand-in, on 127.0.0.1.

    .venv/bin/python bench/run.py [--rounds N] [--duration S] [--quick]

Starts (each in its own process group, all stopped at the end, also on Ctrl-C or an error):
  direct         bench/upstream_fast.py, a fast MCP echo upstream (asyncio + uvloop + httptools)
  twisted-proxy  bench/twisted_proxy.py, the reference stand-in (twisted.web + Agent) in front of it
  mcpgw          python -m mcpgw run --config <generated YAML> in front of it, audit line on
  mcpgw-auth     the same with API keys on
  mcpgw-oauth    the same with OAuth access tokens on (auth.oauth, an ES256 key from a JWKS file;
                 one token, verified once, then the cache)
  mcpgw-full     API key on (cached), 20 policy rules with caller conditions (keys, identities,
                 clients), the deciding one conditional on the key, audit line on: the issue #12 bar
  mcpgw-otel     the same with span export on (telemetry.otlp_endpoint = a local OTLP sink,
                 bench/telemetry_bench.py --receiver, in its own process)
  mcpgw-w2       the mcpgw system with listen.workers: 2 (a supervisor and two workers; CPU is
                 the whole process group's); the report's Fleet line compares it with mcpgw

Then, round by round (system order reversed every round), for each system: an MCP handshake,
1 s of wrk warmup, the sequential test (loadgen.seq_latency: tools/call echo with ~1 KB of
arguments on one keep-alive connection) and wrk + mcp_call.lua at 8 and 32 connections, with
the CPU time of the system's process around each wrk run. Every response is checked (HTTP 200
and the echoed marker). Results: a markdown table on stdout and in bench/results/run-*.md|json.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402  (vendored beside this file)

#: venv for the upstream when the running interpreter has no uvloop (override: MCPGW_BENCH_VENV).
UPSTREAM_VENV = Path(os.environ.get("MCPGW_BENCH_VENV", "/tmp/mcpgw-bench-venv"))
UPSTREAM_SPEC = ["uvloop==0.23.0", "httptools==0.9.0", "orjson==3.13.0"]
SYSTEMS = (
    "direct",
    "twisted-proxy",
    "mcpgw",
    "mcpgw-auth",
    "mcpgw-oauth",
    "mcpgw-otel",
    "mcpgw-full",
    "mcpgw-w2",
)
STANDIN = "twisted-proxy"
#: The issue's bar: mcpgw added p50 / stand-in added p50 <= 0.5; mcpgw / stand-in req/s at C=32 >= 2.
BAR_P50 = 0.5
BAR_RPS = 2.0
#: The bars per system: added p50 ratio at most, req/s ratio at least (against the stand-in).
BARS = {"mcpgw": (BAR_P50, BAR_RPS), "mcpgw-full": (0.35, 3.0)}
CLK_TCK = os.sysconf("SC_CLK_TCK")
MCPGW_CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
upstreams:
  - {{name: bench, url: "{upstream}", path: /mcp}}
audit: {{path: {tmp}/audit.jsonl, fsync: interval, state_dir: {tmp}/state}}
"""


def policy_yaml(n: int) -> str:
    """A policy of C{n} rules with every matcher kind, none of which matches the bench's C{echo}
    (so every call goes through the whole rule list to the default, the most expensive path)."""
    if n <= 0:
        return ""
    kinds = [
        "{{exact: tool_{i}}}",
        "{{prefix: pre_{i}_}}",
        "{{glob: 'glob_{i}_*'}}",
        "{{regex: '^re_{i}(_.*)?$'}}",
        "{{list: [list_{i}_a, list_{i}_b]}}",
    ]
    lines = ["policy:", "  default_action: allow", "  rules:"]
    for i in range(n):
        action = "deny" if i % 2 == 0 else "allow"
        lines.append(f"    - {{id: r{i}, action: {action}, match: {kinds[i % 5].format(i=i)}}}")
    return "\n".join(lines) + "\n"


def full_policy_yaml() -> str:
    """The policy of C{mcpgw-full}: 19 rules with caller conditions that do not hold for the
    bench's caller, each on a target C{echo} matches, then the allow for the bench's key; default
    deny. Every call checks every caller condition before its own rule decides."""
    lines = ["policy:", "  default_action: deny", "  rules:"]
    whens = [
        "{{keys: [other-{i}, 'team-{i}-*']}}",
        "{{identities: ['spiffe://corp.example/team-{i}/*']}}",
        "{{clients: [10.{i}.0.0/16]}}",
    ]
    for i in range(19):
        when = whens[i % 3].format(i=i)
        lines.append(f"    - {{id: c{i}, action: allow, match: {{glob: 'ech*'}}, when: {when}}}")
    lines.append(
        "    - {id: bench-echo, action: allow, match: {exact: echo}, when: {keys: [bench]}}"
    )
    return "\n".join(lines) + "\n"


def oauth_yaml(tmp: Path) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The C{auth.oauth} block of C{mcpgw-oauth} (keys from a JWKS file) and its token header."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="bench", use="sig", alg="ES256")
    path = tmp / "bench-jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    issuer = "https://idp.bench.example"
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": "https://mcp.bench.example/mcp",
        "sub": "bench",
        "scope": "mcp:tools",
        "iat": now,
        "exp": now + 6 * 3600,
    }
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "bench"})
    block = (
        "auth:\n  enabled: true\n  oauth:\n    public_url: https://mcp.bench.example\n"
        f"    issuers: [{{issuer: '{issuer}', jwks_file: '{path}'}}]\n"
    )
    return block, (("Authorization", f"Bearer {token}"),)


def sink_yaml(mode: str, tmp: Path, procs: Any) -> str:
    """The C{audit.sinks} entry for C{--sink-webhook}: a webhook sink whose receiver is down
    (a port nothing listens on) or up (bench/sinks_bench.py --receiver), or none."""
    if mode == "none":
        return ""
    port = free_port()
    if mode == "up":
        p = procs.spawn(
            "webhook-receiver",
            [sys.executable, str(HERE / "sinks_bench.py"), "--receiver", str(port)],
        )
        deadline = time.monotonic() + 20
        while not port_open(port):
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the webhook receiver did not start")
            time.sleep(0.05)
    return (
        f", sinks: [{{type: webhook, name: bench-siem, url: 'http://127.0.0.1:{port}/ingest', "
        "batch: {max_lines: 500, max_seconds: 1}}]"
    )


def log(msg: str) -> None:
    sys.stderr.write("[{}] {}\n".format(time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# ------------------------------------------------------------------------------------ set-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_wrk(install: bool) -> str:
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    if not install or os.geteuid() != 0:
        raise SystemExit("wrk not found: apt-get install wrk (as root), then run again")
    log("wrk not found: apt-get install wrk")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env, stdout=subprocess.DEVNULL
    )
    wrk = shutil.which("wrk")
    if not wrk:
        raise SystemExit("wrk still not found after apt-get install wrk")
    return wrk


def has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def upstream_python(install: bool) -> tuple[str, str]:
    """The interpreter for upstream_fast.py, preferring one with uvloop (as in the shared harness)."""
    if has_module(sys.executable, "uvloop"):
        return sys.executable, "uvloop"
    py = str(UPSTREAM_VENV / "bin" / "python")
    stamp = UPSTREAM_VENV / ".bench-spec"
    spec = " ".join(UPSTREAM_SPEC)
    ready = Path(py).exists() and stamp.exists() and stamp.read_text() == spec
    if not ready and install:
        log(f"creating {UPSTREAM_VENV} for the upstream: {spec}")
        shutil.rmtree(UPSTREAM_VENV, ignore_errors=True)
        ok = subprocess.run([sys.executable, "-m", "venv", str(UPSTREAM_VENV)]).returncode == 0
        ok = (
            ok
            and subprocess.run(
                [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *UPSTREAM_SPEC]
            ).returncode
            == 0
        )
        if ok and has_module(py, "uvloop"):
            stamp.write_text(spec)
            ready = True
    if ready:
        return py, "uvloop"
    log("WARNING: no uvloop for the upstream; it runs on the plain asyncio loop (slower direct)")
    return sys.executable, "asyncio (no uvloop)"


def version_of(python: str, dist: str) -> str:
    r = subprocess.run(
        [python, "-c", "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))", dist],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() or "?"


def git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "mcpgw"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"
    return (head or "?") + (" + uncommitted changes in mcpgw/" if dirty else "")


# ------------------------------------------------------------------------------------ processes


def group_pids(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        if int(st[st.rfind(")") + 2 :].split()[2]) == pgid:
            out.append(int(d))
    return out


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime (all threads) of every live process in process group pgid."""
    total = 0
    for pid in group_pids(pgid):
        try:
            st = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = st[st.rfind(")") + 2 :].split()
        total += int(rest[11]) + int(rest[12])
    return total / CLK_TCK


class Procs:
    """Processes started by the harness, each the leader of its own process group."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def spawn(self, tag: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        path = self.logdir / f"{tag}.log"
        with path.open("wb") as lf:
            p = subprocess.Popen(
                argv,
                stdout=lf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                start_new_session=True,
            )
        self.procs.append(p)
        self.logs[p.pid] = path
        return p

    def tail(self, p: subprocess.Popen[bytes], n: int = 20) -> str:
        try:
            lines = self.logs[p.pid].read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line[:400] for line in lines[-n:])

    def stop_all(self) -> None:
        """SIGTERM every group we started, wait up to 10 s, then SIGKILL what is left."""
        for p in reversed(self.procs):
            if p.poll() is None or group_pids(p.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.poll() is None or group_pids(p.pid):
                log(f"SIGKILL process group {p.pid}")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=3)
        self.procs = []


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def wait_ready(
    procs: Procs, p: subprocess.Popen[bytes], port: int, timeout: float, health: str | None = None
) -> None:
    """Poll the port (and GET health, if given, until 200); fail early if the process exits."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if p.poll() is not None:
            raise RuntimeError(f"exited with rc={p.returncode}:\n{procs.tail(p)}")
        if port_open(port) and (health is None or http_status(health) == 200):
            return
        time.sleep(0.2)
    raise RuntimeError(f"not ready on port {port} after {timeout:.0f}s:\n{procs.tail(p)}")


class System:
    def __init__(
        self,
        name: str,
        url: str,
        proc: subprocess.Popen[bytes],
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.name = name
        self.url = url
        self.proc = proc
        self.headers = headers  # sent with every request (e.g. the API key)
        self.error: str | None = None
        self.sent = 0  # HTTP requests sent to it (counted ones; see audit_check)
        self.in_flight_slack = 0  # requests wrk may have had in flight when it stopped

    def cpu(self) -> float:
        return group_cpu_seconds(self.proc.pid)

    def leaderCpu(self) -> float:
        """The process's own CPU (with workers: the supervisor's, not its workers')."""
        try:
            rest = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = rest[rest.rfind(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ------------------------------------------------------------------------------------ measuring


def upstream_stats(port: int, reset: bool = False) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/stats{'?reset' if reset else ''}", timeout=5
        ) as r:
            return dict(json.loads(r.read()))
    except (OSError, ValueError):
        return {}


def settle(w: dict[str, Any]) -> None:
    """Let the in-flight work of a finished wrk run drain before the next measurement."""
    time.sleep(min(3.0, max(0.5, 1.5 * w.get("lat_p50_us", 0) / 1e6)))


def measure(s: System, rnd: int, a: argparse.Namespace, up_port: int) -> dict[str, Any]:
    info = loadgen.handshake(s.url, extra_headers=s.headers)
    s.sent += 4  # initialize, notifications/initialized, tools/list, tools/call
    kw = {
        "session": info["session"],
        "tool": info["tool"],
        "proto": info["proto"],
        "extra_headers": s.headers,
    }
    res: dict[str, Any] = {"system": s.name, "round": rnd, "wrk": {}}
    upstream_stats(up_port, reset=True)
    calls = 1
    if a.warmup_s > 0:
        w = loadgen.run_wrk(s.url, 8, a.warmup_s, arg_bytes=a.arg_bytes, **kw)
        s.sent += w["requests"]
        s.in_flight_slack += 8
        calls += w["requests"]
        res["warmup_errors"] = w["errors"]
        res["warmup_first_bad"] = w["first_bad"]
        settle(w)
    c0, l0 = s.cpu(), s.leaderCpu()
    seq = loadgen.seq_latency(
        s.url, n=a.n, warmup=a.seq_warmup, arg_bytes=a.arg_bytes, max_s=a.seq_max_s, **kw
    )
    c1, l1 = s.cpu(), s.leaderCpu()
    done = seq["n"] + seq["warmup"]
    # CPU per request at one request at a time: the cost of the code path, with little of the
    # contention for the two cores that a saturating wrk run adds
    seq["cpu_us_per_req"] = (c1 - c0) * 1e6 / done if done else None
    seq["leader_cpu_us_per_req"] = (l1 - l0) * 1e6 / done if done else None
    s.sent += seq["n"] + seq["warmup"]
    calls += seq["n"] + seq["warmup"]
    res["seq"] = seq
    for c in a.conc:
        c0, l0 = s.cpu(), s.leaderCpu()
        w = loadgen.run_wrk(s.url, c, a.duration, arg_bytes=a.arg_bytes, **kw)
        c1, l1 = s.cpu(), s.leaderCpu()
        w["cpu_us_per_req"] = (c1 - c0) * 1e6 / w["requests"] if w["requests"] else None
        w["leader_cpu_us_per_req"] = (l1 - l0) * 1e6 / w["requests"] if w["requests"] else None
        s.sent += w["requests"]
        s.in_flight_slack += c
        calls += w["requests"]
        res["wrk"][str(c)] = w
        settle(w)
    st = upstream_stats(up_port)
    if st.get("tools/call"):
        res["upstream"] = {
            "stats": st,
            "client_calls": calls,
            "up_per_call": sum(v for k, v in st.items() if not k.startswith("_"))
            / st["tools/call"],
        }
    return res


def audit_check(path: Path, mcpgw: System) -> dict[str, Any]:
    """Count the audit lines and compare with the requests sent to mcpgw."""
    out: dict[str, Any] = {
        "path": str(path),
        "sent_counted": mcpgw.sent,
        "sent_max": mcpgw.sent + mcpgw.in_flight_slack,
    }
    if not path.exists():
        out["problem"] = "audit file missing"
        return out
    lines = 0
    bad_json = 0
    by: dict[str, collections.Counter[str]] = {
        k: collections.Counter() for k in ("status", "method", "path", "decision", "error")
    }
    with path.open("rb") as f:
        for raw in f:
            lines += 1
            try:
                rec = json.loads(raw)
            except ValueError:
                bad_json += 1
                continue
            for k, c in by.items():
                c["null" if rec.get(k) is None else str(rec.get(k))] += 1
    out["lines"] = lines
    out["unparsable_lines"] = bad_json
    out.update({k: dict(c.most_common(8)) for k, c in by.items()})
    out["ok"] = out["sent_counted"] <= lines <= out["sent_max"] and not bad_json
    return out


# ------------------------------------------------------------------------------------ report


def med(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None and x == x]
    return statistics.median(v) if v else None


def fmt(x: float | None, nd: int = 3, sign: bool = False) -> str:
    if x is None or x != x:
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def fmt_rps(x: float | None) -> str:
    return "—" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")


def errors_of(r: dict[str, Any]) -> int:
    return int(
        r["seq"]["bad"] + r.get("warmup_errors", 0) + sum(w["errors"] for w in r["wrk"].values())
    )


def summarize(results: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    ok = [r for r in results if "seq" in r]
    by: dict[str, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for r in ok:
        by[r["system"]][r["round"]] = r
    direct = by.get("direct", {})
    rows: dict[str, Any] = {}
    for n in names:
        rs = by.get(n, {})
        if not rs:
            continue

        def added(key: str, rs: dict[int, dict[str, Any]] = rs) -> float | None:
            return med(
                [r["seq"][key] - direct[k]["seq"][key] for k, r in rs.items() if k in direct]
            )

        def wrk(c: str, key: str, rs: dict[int, dict[str, Any]] = rs) -> float | None:
            return med([r["wrk"][c][key] for r in rs.values() if c in r["wrk"]])

        rows[n] = {
            "rounds": len(rs),
            "p50_ms": med([r["seq"]["p50_ms"] for r in rs.values()]),
            "p99_ms": med([r["seq"]["p99_ms"] for r in rs.values()]),
            "added_p50_ms": added("p50_ms") if n != "direct" else None,
            "added_p99_ms": added("p99_ms") if n != "direct" else None,
            "rps_c8": wrk("8", "rps"),
            "rps_c32": wrk("32", "rps"),
            "cpu_us_per_req_c32": wrk("32", "cpu_us_per_req"),
            "errors": sum(errors_of(r) for r in rs.values()),
        }
    t = by.get(STANDIN, {})
    m = by.get("mcpgw", {})
    # span export on minus off, CPU per request, within each round
    otel = by.get("mcpgw-otel", {})
    tracing: dict[str, Any] = {}
    for c in ("8", "32"):
        d = [
            otel[k]["wrk"][c]["cpu_us_per_req"] - m[k]["wrk"][c]["cpu_us_per_req"]
            for k in sorted(set(otel) & set(m))
            if c in otel[k]["wrk"] and c in m[k]["wrk"]
        ]
        if d:
            tracing[c] = {"median": statistics.median(d), "per_round": d}
    allRatios: dict[str, Any] = {}
    for name, (barP50, barRps) in BARS.items():
        sm = by.get(name, {})
        ratios: dict[str, Any] = {"per_round": []}
        for k in sorted(set(sm) & set(t) & set(direct)):
            ap_m = sm[k]["seq"]["p50_ms"] - direct[k]["seq"]["p50_ms"]
            ap_t = t[k]["seq"]["p50_ms"] - direct[k]["seq"]["p50_ms"]
            rm, rt = sm[k]["wrk"].get("32", {}).get("rps"), t[k]["wrk"].get("32", {}).get("rps")
            ratios["per_round"].append(
                {
                    "round": k,
                    "added_p50_ratio": ap_m / ap_t if ap_t > 0 else None,
                    "rps_c32_ratio": rm / rt if rm and rt else None,
                }
            )
        for key, bar, better in (
            ("added_p50_ratio", barP50, "le"),
            ("rps_c32_ratio", barRps, "ge"),
        ):
            vals = [x[key] for x in ratios["per_round"] if x[key] is not None]
            if vals:
                mm = statistics.median(vals)
                ratios[key] = {
                    "median": mm,
                    "min": min(vals),
                    "max": max(vals),
                    "bar": bar,
                    "meets_bar": mm <= bar if better == "le" else mm >= bar,
                }
        if ratios["per_round"]:
            allRatios[name] = ratios
    # listen.workers: 2 against 1 (the mcpgw system), within each round
    w2 = by.get("mcpgw-w2", {})
    fleet: dict[str, Any] = {}
    for c in ("8", "32"):
        pairs = [(m[k]["wrk"].get(c), w2[k]["wrk"].get(c)) for k in sorted(set(w2) & set(m))]
        pairs = [(one, two) for one, two in pairs if one and two and one["rps"]]
        if pairs:
            fleet[c] = {
                "rps_ratio": statistics.median(two["rps"] / one["rps"] for one, two in pairs),
                "rps_ratio_per_round": [two["rps"] / one["rps"] for one, two in pairs],
                "cpu_us_added": statistics.median(
                    two["cpu_us_per_req"] - one["cpu_us_per_req"] for one, two in pairs
                ),
                "supervisor_cpu_us": statistics.median(
                    two["leader_cpu_us_per_req"] for _, two in pairs
                ),
            }
    both = sorted(set(w2) & set(m))
    p50 = [w2[k]["seq"]["p50_ms"] - m[k]["seq"]["p50_ms"] for k in both]
    if p50:
        fleet["seq_p50_added_ms"] = statistics.median(p50)
        fleet["seq_cpu_added_us"] = statistics.median(
            w2[k]["seq"]["cpu_us_per_req"] - m[k]["seq"]["cpu_us_per_req"] for k in both
        )
        fleet["seq_supervisor_cpu_us"] = statistics.median(
            w2[k]["seq"]["leader_cpu_us_per_req"] for k in both
        )
    return {"systems": rows, "ratios": allRatios, "tracing": tracing, "fleet": fleet}


def render(
    meta: dict[str, Any],
    results: list[dict[str, Any]],
    summary: dict[str, Any],
    failed: dict[str, str],
    audit: dict[str, Any] | None,
    conc: list[int],
) -> str:
    o = [f"## mcpgw bench {meta['date']}", ""]
    o.append(
        f"machine: nproc={meta['nproc']}, load average at start {meta['loadavg_start']}, "
        f"at end {meta.get('loadavg_end', '?')}; {meta['rounds']} round(s); elapsed "
        f"{meta.get('elapsed_s', '?')} s{'; INTERRUPTED' if meta.get('interrupted') else ''}"
    )
    o.append(
        f"mcpgw {meta['mcpgw_git']}; Twisted {meta['twisted']}; Python {meta['python']}; "
        f"upstream loop: {meta['upstream_loop']}; {meta['wrk']}; "
        f"mcpgw policy rules: {meta['args'].get('policy_rules', 0)}; "
        f"webhook sink: {meta['args'].get('sink_webhook', 'none')}"
    )
    o.append("")
    o.append(
        "| system | p50 ms | p99 ms | added p50 vs direct | added p99 | req/s C=8 | req/s C=32 "
        "| CPU µs/req (C=32) | errors |"
    )
    o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = summary["systems"]
    for n in meta["systems"]:
        if n in failed:
            lines = [x.strip() for x in failed[n].splitlines() if x.strip()]
            why = lines[0] + (" ... " + lines[-1] if len(lines) > 1 else "")
            o.append(f"| {n} | FAILED: {why[:200]} | | | | | | | |")
            continue
        r = rows.get(n)
        if r is None:
            o.append(f"| {n} | no data | | | | | | | |")
            continue
        direct = n == "direct"
        o.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                n,
                fmt(r["p50_ms"]),
                fmt(r["p99_ms"]),
                "—" if direct else fmt(r["added_p50_ms"], sign=True),
                "—" if direct else fmt(r["added_p99_ms"], sign=True),
                fmt_rps(r["rps_c8"]),
                fmt_rps(r["rps_c32"]),
                fmt(r["cpu_us_per_req_c32"], 0),
                r["errors"],
            )
        )
    o.append("")
    o.append(
        "Medians over the rounds. p50/p99: sequential tools/call on one keep-alive connection "
        "(~1 KB arguments). added = system - direct within the same round. req/s: wrk, 1 thread. "
        "CPU: utime+stime of the system's own process (for direct: the upstream) per request "
        "during the C=32 run. errors: responses that were not HTTP 200 with the echoed marker, "
        "plus socket errors."
    )
    o.append("")
    for name, rat in summary["ratios"].items():
        o.append(f"**The bar for {name}** (per round, then median (min-max) over the rounds):")
        o.append("")
        o.append("| ratio | median | min-max | bar | meets bar |")
        o.append("|---|---:|---:|---:|---|")
        for key, label, op in (
            ("added_p50_ratio", f"{name} added p50 ÷ stand-in added p50", "≤"),
            ("rps_c32_ratio", f"{name} req/s C=32 ÷ stand-in req/s C=32", "≥"),
        ):
            x = rat.get(key)
            if x:
                o.append(
                    f"| {label} | {x['median']:.2f} | {x['min']:.2f}-{x['max']:.2f} | {op} {x['bar']} "
                    f"| {'yes' if x['meets_bar'] else 'NO'} |"
                )
        o.append("")
        o.append(
            "Per round: "
            + "; ".join(
                f"round {x['round']}: p50 ratio {fmt(x['added_p50_ratio'], 2)}, req/s ratio {fmt(x['rps_c32_ratio'], 2)}"
                for x in rat["per_round"]
            )
        )
        o.append("")
    tracing = summary.get("tracing")
    if tracing:
        o.append(
            "**Tracing cost** (mcpgw-otel CPU µs/req minus mcpgw's in the same round, all threads "
            "of the process: span records on the reactor, encoding and POSTs on the export thread): "
            + "; ".join(
                f"C={c}: {x['median']:+.1f} (per round: {', '.join(f'{v:+.1f}' for v in x['per_round'])})"
                for c, x in tracing.items()
            )
        )
        sink = meta.get("otlp_sink")
        if sink:
            o.append(
                f"Spans received by the OTLP sink: {sink.get('spans', '?')} in {sink.get('posts', '?')} "
                f"POSTs, for {sink.get('sent', '?')} requests sent to mcpgw-otel (plus those in "
                "flight when wrk stopped)."
            )
        o.append("")
    fleet = summary.get("fleet")
    if fleet:
        parts = [
            f"C={c}: req/s ratio {x['rps_ratio']:.2f} (per round "
            f"{', '.join(f'{v:.2f}' for v in x['rps_ratio_per_round'])}), CPU "
            f"{x['cpu_us_added']:+.1f} µs/req (of which the supervisor "
            f"{x['supervisor_cpu_us']:.1f})"
            for c, x in fleet.items()
            if not c.startswith("seq_")
        ]
        if "seq_p50_added_ms" in fleet:
            parts.append(
                f"sequential (one call at a time): p50 {fleet['seq_p50_added_ms'] * 1000:+.0f} µs, "
                f"CPU {fleet['seq_cpu_added_us']:+.1f} µs/req (of which the supervisor "
                f"{fleet['seq_supervisor_cpu_us']:.1f})"
            )
        o.append(
            "**Fleet** (mcpgw-w2, listen.workers: 2, against mcpgw in the same round; CPU of the "
            "supervisor and both workers): " + "; ".join(parts)
        )
        o.append("")
    if audit is not None:
        o.append("**Audit file check** (mcpgw, read after it stopped):")
        o.append("")
        if audit.get("problem"):
            o.append(f"- {audit['problem']}")
        else:
            slack = audit["sent_max"] - audit["sent_counted"]
            o.append(
                f"- {audit['lines']} lines; {audit['sent_counted']} requests sent to mcpgw and "
                f"answered, plus up to {slack} that wrk may have had in flight when it stopped "
                f"(expected {audit['sent_counted']} to {audit['sent_max']}): "
                f"**{'OK' if audit['ok'] else 'MISMATCH'}**; unparsable lines: {audit['unparsable_lines']}"
            )
            for k in ("status", "method", "decision", "error", "path"):
                o.append(f"- by {k}: " + ", ".join(f"{v}: {n}" for v, n in audit[k].items()))
        o.append("")
    o.append(
        "Per round (seq = sequential test; C=N = wrk: req/s, wrk's p50 and p99 in ms, CPU µs/req; "
        "up/call = upstream requests per tools/call that reached the upstream):"
    )
    o.append("")
    hdr = "| round | system | seq n | seq p50 | seq p90 | seq p99 | seq max |"
    sep = "|---:|---|---:|---:|---:|---:|---:|"
    for c in conc:
        hdr += f" C={c} req/s | C={c} p50 | C={c} p99 | C={c} cpu µs |"
        sep += "---:|---:|---:|---:|"
    o += [hdr + " errors | up/call |", sep + "---:|---:|"]
    for r in results:
        if "seq" not in r:
            o.append(f"| {r['round']} | {r['system']} | FAILED: {r.get('error', '')[:200]} |")
            continue
        q = r["seq"]
        line = (
            f"| {r['round']} | {r['system']} | {q['n']} | {fmt(q['p50_ms'])} | {fmt(q['p90_ms'])} "
            f"| {fmt(q['p99_ms'])} | {fmt(q['max_ms'], 2)} |"
        )
        for c in conc:
            w = r["wrk"].get(str(c))
            line += (
                (
                    f" {fmt_rps(w['rps'])} | {fmt(w['p50_ms'], 2)} | {fmt(w['p99_ms'], 2)} "
                    f"| {fmt(w['cpu_us_per_req'], 0)} |"
                )
                if w
                else " — | — | — | — |"
            )
        up = r.get("upstream")
        line += f" {errors_of(r)} | {fmt(up['up_per_call'], 2) if up else '—'} |"
        o.append(line)
    notes = []
    for r in results:
        if "seq" not in r:
            continue
        checks = [
            ("seq", r["seq"]["bad"], r["seq"]["first_bad"]),
            ("warmup", r.get("warmup_errors", 0), r.get("warmup_first_bad", "")),
        ]
        checks += [
            (
                f"C={c}",
                w["errors"],
                w["first_bad"]
                or "socket errors: connect {} read {} write {} timeout {}".format(
                    w["err_connect"], w["err_read"], w["err_write"], w["err_timeout"]
                ),
            )
            for c, w in r["wrk"].items()
        ]
        notes += [
            f"- round {r['round']} {r['system']} {what}: {n} errors, first: {why[:300]}"
            for what, n, why in checks
            if n
        ]
    if notes:
        o += ["", "Errors:", "", *notes]
    for n, why in failed.items():
        o += ["", f"{n} failed to start (end of its output):", ""]
        o += ["    " + x for x in why.splitlines()]
    return "\n".join(o) + "\n"


# ------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds; the system order reverses every round"
    )
    ap.add_argument(
        "--duration", type=int, default=6, help="seconds per wrk run (each concurrency)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 round, 500 sequential calls (4 s cap), 3 s wrk runs",
    )
    ap.add_argument("--n", type=int, default=2000, help="sequential calls measured (after warmup)")
    ap.add_argument("--seq-warmup", type=int, default=200, help="sequential warmup calls")
    ap.add_argument("--seq-max-s", type=float, default=10.0, help="time cap of one sequential test")
    ap.add_argument(
        "--warmup-s", type=int, default=1, help="wrk C=8 warmup before each measurement"
    )
    ap.add_argument("--conc", default="8,32", help="wrk connection counts")
    ap.add_argument("--arg-bytes", type=int, default=1024, help="size of the tools/call arguments")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="subset of " + ",".join(SYSTEMS))
    ap.add_argument("--settle-start", type=float, default=2.0, help="idle seconds after start-up")
    ap.add_argument(
        "--policy-rules",
        type=int,
        default=0,
        help="give mcpgw a policy of N rules (all matcher kinds, none matching the bench's tool)",
    )
    ap.add_argument(
        "--sink-webhook",
        choices=("none", "dead", "up"),
        default="none",
        help="give mcpgw a webhook audit sink: at a dead port (sink down) or a local receiver",
    )
    ap.add_argument(
        "--no-install", action="store_true", help="never apt-get wrk or pip-install uvloop"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, audit file)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where run-*.md|json go")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.n, a.seq_max_s, a.duration = 1, 500, 4.0, 3
    a.conc = [int(x) for x in a.conc.split(",") if x.strip()]
    names = [n for n in SYSTEMS if n in a.systems.split(",")]
    if "direct" not in names:
        names.insert(0, "direct")

    loadavg = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    t_start = time.monotonic()
    wrk = ensure_wrk(not a.no_install)
    up_py, up_loop = upstream_python(not a.no_install)
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "loadavg_start": loadavg,
        "rounds": a.rounds,
        "systems": names,
        "args": vars(a),
        "mcpgw_git": git_describe(),
        "twisted": version_of(sys.executable, "twisted"),
        "python": sys.version.split()[0],
        "upstream_loop": up_loop,
        "wrk": subprocess.run([wrk, "-v"], capture_output=True, text=True)
        .stdout.split(" Copyright")[0]
        .strip(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="mcpgw-bench-"))
    procs = Procs(tmp)
    systems: dict[str, System] = {}
    failed: dict[str, str] = {}
    results: list[dict[str, Any]] = []
    audit: dict[str, Any] | None = None
    sink_port: int | None = None  # the OTLP sink of mcpgw-otel

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (nohup, &)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    log(f"load average {loadavg}; nproc {os.cpu_count()}; temp dir {tmp}")
    try:
        up_port = free_port()
        up_url = f"http://127.0.0.1:{up_port}/mcp"
        p = procs.spawn("upstream", [up_py, str(HERE / "upstream_fast.py"), "--port", str(up_port)])
        wait_ready(procs, p, up_port, 30)
        systems["direct"] = System("direct", up_url, p)
        if STANDIN in names:
            port = free_port()
            p = procs.spawn(
                STANDIN,
                [
                    sys.executable,
                    str(HERE / "twisted_proxy.py"),
                    "--port",
                    str(port),
                    "--upstream",
                    up_url,
                ],
            )
            systems[STANDIN] = System(STANDIN, f"http://127.0.0.1:{port}/mcp", p)
        if "mcpgw" in names:
            port = free_port()
            cfg = tmp / "mcpgw.yaml"
            sinks = sink_yaml(a.sink_webhook, tmp, procs)
            cfg.write_text(
                MCPGW_CONFIG.format(port=port, upstream=up_url, tmp=tmp).replace(
                    "/state}", "/state" + sinks + "}"
                )
                + policy_yaml(a.policy_rules)
            )
            p = procs.spawn(
                "mcpgw", [sys.executable, "-m", "mcpgw", "run", "--config", str(cfg)], cwd=ROOT
            )
            systems["mcpgw"] = System("mcpgw", f"http://127.0.0.1:{port}/mcp", p)

        def spawn_mcpgw(
            name: str,
            extra_yaml: str,
            headers: tuple[tuple[str, str], ...] = (),
            rules: bool = True,
            listen: str = "",
        ) -> None:
            """A variant of the mcpgw system: its own port, audit file and extra config."""
            port = free_port()
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(
                MCPGW_CONFIG.format(port=port, upstream=up_url, tmp=tmp)
                .replace("audit.jsonl", f"audit-{name}.jsonl")
                .replace(f"port: {port}}}", f"port: {port}{listen}}}")
                + (policy_yaml(a.policy_rules) if rules else "")
                + extra_yaml
            )
            p = procs.spawn(
                name, [sys.executable, "-m", "mcpgw", "run", "--config", str(cfg)], cwd=ROOT
            )
            systems[name] = System(name, f"http://127.0.0.1:{port}/mcp", p, headers)

        if "mcpgw-auth" in names:
            # the same gateway with API keys on: one Argon2id verification, then the cache
            from mcpgw.auth import generateKey, hashKey

            key = generateKey()
            spawn_mcpgw(
                "mcpgw-auth",
                f"auth:\n  enabled: true\n  keys: [{{id: bench, hash: '{hashKey(key)}'}}]\n",
                (("Authorization", f"Bearer {key}"),),
            )
        if "mcpgw-oauth" in names:
            # the same gateway validating an OAuth access token (ES256): verified once, then cached
            spawn_mcpgw("mcpgw-oauth", *oauth_yaml(tmp))
        if "mcpgw-full" in names:
            # API key on and cached, 20 caller-conditioned rules, audit line: the #12 bar
            from mcpgw.auth import generateKey, hashKey

            key = generateKey()
            spawn_mcpgw(
                "mcpgw-full",
                f"auth:\n  enabled: true\n  keys: [{{id: bench, hash: '{hashKey(key)}'}}]\n"
                + full_policy_yaml(),
                (("Authorization", f"Bearer {key}"),),
                rules=False,
            )
        if "mcpgw-otel" in names:
            # the same gateway exporting one span per request to a local OTLP/HTTP sink
            sink_port = free_port()
            sp = procs.spawn(
                "otlp-sink",
                [sys.executable, str(HERE / "telemetry_bench.py"), "--receiver", str(sink_port)],
            )
            wait_ready(procs, sp, sink_port, 30)
            spawn_mcpgw(
                "mcpgw-otel",
                f"telemetry: {{otlp_endpoint: 'http://127.0.0.1:{sink_port}/v1/traces'}}\n",
            )
        if "mcpgw-w2" in names:
            # the mcpgw system with a supervisor and two workers
            spawn_mcpgw("mcpgw-w2", "", listen=", workers: 2")
        for n, s in systems.items():
            if n == "direct":
                continue
            port = int(s.url.split(":")[2].split("/")[0])
            health = f"http://127.0.0.1:{port}/healthz" if n.startswith("mcpgw") else None
            try:
                wait_ready(procs, s.proc, port, 60, health)
                loadgen.handshake(s.url, extra_headers=s.headers)
                if n in ("mcpgw", "mcpgw-otel"):
                    s.sent += 4
                log(f"{n} ready at {s.url}")
            except Exception as e:
                failed[n] = f"start: {e}"
                log(f"{n} FAILED to start: {e}")
        time.sleep(a.settle_start)
        live = [n for n in names if n in systems and n not in failed]
        for rnd in range(1, a.rounds + 1):
            order = live if rnd % 2 else list(reversed(live))
            log(f"round {rnd}/{a.rounds}: {' -> '.join(order)}")
            for n in order:
                t0 = time.monotonic()
                try:
                    r = measure(systems[n], rnd, a, up_port)
                    q = r["seq"]
                    log(
                        "  {:<14} seq p50 {:.3f} p99 {:.3f} ms (n={}) | {} | errors {} [{:.0f}s]".format(
                            n,
                            q["p50_ms"],
                            q["p99_ms"],
                            q["n"],
                            "  ".join(
                                "C={} {} req/s {} µs/req".format(
                                    c, fmt_rps(w["rps"]), fmt(w["cpu_us_per_req"], 0)
                                )
                                for c, w in r["wrk"].items()
                            ),
                            errors_of(r),
                            time.monotonic() - t0,
                        )
                    )
                except Exception as e:
                    r = {"system": n, "round": rnd, "error": f"{type(e).__name__}: {e}"}
                    log(f"  {n} FAILED: {r['error']}")
                    if systems[n].proc.poll() is not None:
                        log(
                            f"  {n} exited (rc={systems[n].proc.returncode}):\n{procs.tail(systems[n].proc)}"
                        )
                results.append(r)
    except KeyboardInterrupt as e:
        meta["interrupted"] = str(e) or "Ctrl-C"
        log(f"interrupted: {meta['interrupted']}")
    finally:
        if sink_port is not None and "mcpgw-otel" in systems and not meta.get("interrupted"):
            time.sleep(2.5)  # the exporter sends at least once a second
            stats = f"http://127.0.0.1:{sink_port}/stats"
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(stats, timeout=5) as r,
            ):
                meta["otlp_sink"] = dict(json.loads(r.read()), sent=systems["mcpgw-otel"].sent)
        log("stopping everything the bench started")
        procs.stop_all()
    if "mcpgw" in systems and "mcpgw" not in failed and not meta.get("interrupted"):
        audit = audit_check(tmp / "audit.jsonl", systems["mcpgw"])
        mlog = tmp / "mcpgw.log"
        if mlog.exists():
            text = mlog.read_text(errors="replace").splitlines()
            audit["mcpgw_log_lines"] = len(text)
            audit["mcpgw_log_warnings"] = [
                x[:400] for x in text if '"level":"info"' not in x.replace(" ", "")
            ][:20]
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["loadavg_end"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    summary = summarize(results, names)
    md = render(meta, results, summary, failed, audit, a.conc)
    if audit and audit.get("mcpgw_log_warnings"):
        md += (
            "\nmcpgw log lines above level info (first 20):\n\n"
            + "\n".join("    " + x for x in audit["mcpgw_log_warnings"])
            + "\n"
        )
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"run-{stamp}.md").write_text(md)
    (out / f"run-{stamp}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "audit": audit,
                "failed": failed,
                "results": results,
            },
            indent=1,
            default=str,
        )
    )
    log(f"wrote {out}/run-{stamp}.md and .json")
    bad = (
        bool(failed)
        or any("seq" not in r for r in results)
        or any(errors_of(r) for r in results if "seq" in r)
        or (audit is not None and not audit.get("ok"))
    )
    if bad or a.keep:
        log(f"kept {tmp} (logs{', audit file' if audit else ''})")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad or meta.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
