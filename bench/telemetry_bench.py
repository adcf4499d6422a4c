#!/usr/bin/env python3
"""What tracing costs: CPU per request with span export on vs off, and its effect on latency.

    .venv/bin/python bench/telemetry_bench.py [--rates 1000,2500] [--duration 8] [--rounds 2]
    .venv/bin/python bench/telemetry_bench.py --receiver PORT      # the OTLP sink process alone

1. In-process micro-benchmark (median of repeats, µs per call): each per-request tracing step on
   the reactor thread (ids, context parsing, the upstream traceparent, the span record queued),
   and per span on the export thread (OTLP protobuf encoding; encoding + POST to the sink,
   measured with the export thread's own CPU clock). If opentelemetry-sdk and
   opentelemetry-exporter-otlp-proto-http are importable, the stock SDK path (span + attributes +
   BatchSpanProcessor + OTLPSpanExporter) is measured the same way for comparison.
2. Processes: upstream_fast.py, this file's OTLP/HTTP sink (--receiver: decodes every request
   with opentelemetry-proto when installed and counts spans), and two gateways, `mcpgw` (no
   telemetry section) and `mcpgw-otel` (otlp_endpoint = the sink). For each rate, each round
   (order alternating): one connection sends tools/call (~1 KB arguments) at that fixed rate
   for --duration seconds; the gateway process's CPU (utime+stime of all its threads, from
   /proc) over the run / requests = CPU µs per request. The difference between the two is what
   tracing costs per request, all threads together, at the same request rate. Latency
   percentiles of the same runs show the effect on the reactor (an export thread holding the
   GIL would show in p99/max). Then wrk at 8 connections (closed loop, max throughput) for the
   same CPU-per-request comparison at saturation.

Everything listens on 127.0.0.1 and is stopped at the end. Results: markdown on stdout and in
bench/results/telemetry-<timestamp>.md|json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import loadgen  # noqa: E402
import run  # noqa: E402  (the harness: processes, CPU accounting, wrk)

# -- the OTLP sink ----------------------------------------------------------------------------


def receiver(port: int) -> None:
    """
    An OTLP/HTTP trace sink: answers every POST with an empty ExportTraceServiceResponse,
    counts spans (decoding with opentelemetry-proto when installed, else counting requests only)
    and serves GET /stats as JSON.
    """
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
    except ImportError:
        ExportTraceServiceRequest = None
    import gzip

    stats = {"posts": 0, "spans": 0, "bytes": 0, "undecodable": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
                body = gzip.decompress(body)
            n = 0
            bad = 0
            if ExportTraceServiceRequest is not None:
                req = ExportTraceServiceRequest()
                try:
                    req.ParseFromString(body)
                    n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
                except Exception:
                    bad = 1
            with lock:
                stats["posts"] += 1
                stats["spans"] += n
                stats["bytes"] += len(body)
                stats["undecodable"] += bad
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            with lock:
                out = json.dumps(stats).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    httpd.serve_forever()


def receiverStats(port: int) -> dict[str, Any]:
    """GET /stats of a running sink."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return dict(json.loads(r.read()))


# -- 1. in-process micro-benchmark ------------------------------------------------------------


def perCall(stmt: Callable[[], object], number: int, repeat: int = 7) -> float:
    """Median µs per call of C{stmt}."""
    times = timeit.repeat(stmt, number=number, repeat=repeat)
    return statistics.median(times) / number * 1e6


class _Reactor:
    """Just enough reactor for the exporter outside Twisted."""

    def callFromThread(self, f: Callable[..., object], *a: Any, **kw: Any) -> None:
        f(*a, **kw)

    def seconds(self) -> float:
        return time.time()


def micro(sinkPort: int | None) -> dict[str, Any]:
    """Per-step costs of tracing, in µs."""
    from mcpgw import telemetry
    from mcpgw.config import TelemetryConfig

    out: dict[str, Any] = {}

    class X:  # the fields of a ProxyExchange the tracing steps read
        pass

    x = X()
    tpHeader = [b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]
    x.__dict__.update(
        traceId=telemetry.randomBits(128) or 1,
        spanId=telemetry.randomBits(64) or 1,
        parent=None,
        link=None,
        metaTrace=False,
        started=time.time() - 0.001,
        method="tools/call",
        tool="echo",
        httpMethod=b"POST",
        path=b"/mcp",
        route=type("R", (), {"name": "bench"})(),
        jsonrpcId=17,
        sessionId="f3c0d4e1a2b34c5d",
        protocolVersion="2025-06-18",
        decision="allow",
        ruleId=None,
        authResult=None,
        authKeyId=None,
        bytesIn=1100,
        bytesOut=1250,
        status=200,
        error=None,
        clientIp="127.0.0.1",
        requestId="0123456789abcdef01234567",
        secure=False,
        redacted=None,
        filteredTools=None,
        batchSize=None,
        target=None,
        clientCert=None,
        principal=None,
        redactedResults=None,
    )
    bits = telemetry.randomBits
    messages = [
        {
            "jsonrpc": "2.0",
            "id": 17,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "x" * 1000}},
        }
    ]
    rt: dict[str, float] = {}
    rt["ids (trace + span, new trace)"] = perCall(lambda: (bits(128) or 1, bits(64) or 1), 200_000)
    rt["traceparent header parsed (when sent)"] = perCall(
        lambda: telemetry.headerContext(tpHeader, None), 100_000
    )
    rt["params._meta looked up (none there)"] = perCall(
        lambda: telemetry.metaContext(messages), 200_000
    )
    rt["upstream traceparent value"] = perCall(lambda: telemetry.traceparentOf(x), 200_000)
    exporter = telemetry.SpanExporter(
        _Reactor(), "http://127.0.0.1:9/v1/traces", telemetry.resourceAttributes(TelemetryConfig())
    )
    exporter.maxQueue = 10**9
    tracer = telemetry.Tracer(_Reactor(), TelemetryConfig(), exporter)

    from mcpgw.record import recordOf

    def ended() -> None:
        tracer.ended(recordOf(x, time.time(), time.time()))
        if len(exporter._queue) > 50_000:
            exporter._queue.clear()

    rt["record frozen and its span queued (recordOf + Tracer.ended)"] = perCall(ended, 50_000)
    rt["audit ids formatted (hex)"] = perCall(
        lambda: (f"{x.traceId:032x}", f"{x.spanId:016x}"), 200_000
    )
    out["reactor_us"] = rt

    batch = []
    for i in range(512):  # distinct ids and request ids, as in real traffic
        x.spanId, x.requestId, x.jsonrpcId = i + 1, f"{i:024x}", i
        batch.append(recordOf(x, time.time(), time.time()))
    exporter = telemetry.SpanExporter(
        _Reactor(),
        "http://127.0.0.1:9/v1/traces",
        telemetry.resourceAttributes(TelemetryConfig()),
        sleep=lambda s: None,
    )
    ex: dict[str, float] = {}
    ex["encode (batches of 512)"] = perCall(lambda: exporter.encode(batch), 10) / 512
    body = exporter.encode(batch)
    ex["bytes per span (uncompressed)"] = len(body) / 512
    if sinkPort is not None:
        ex.update(_exportThread(sinkPort, batch))
    out["export_thread_us"] = ex
    sdk = _stockSdk(sinkPort)
    if sdk is not None:
        out["stock_sdk_us"] = sdk
    return out


def _exportThread(sinkPort: int, batch: list[Any]) -> dict[str, float]:
    """The export thread's own CPU per span (encode + POST), measured on that thread."""
    from mcpgw import telemetry
    from mcpgw.config import TelemetryConfig

    class Measured(telemetry.SpanExporter):
        cpu = 0.0

        def _drain(self) -> None:
            t0 = time.thread_time()
            super()._drain()
            self.cpu += time.thread_time() - t0

    exporter = Measured(
        _Reactor(),
        f"http://127.0.0.1:{sinkPort}/v1/traces",
        telemetry.resourceAttributes(TelemetryConfig()),
    )
    exporter.maxQueue = 10**6
    exporter.start()
    n = 0
    for _ in range(40):
        for r in batch:
            exporter.submit(r)
        n += len(batch)
        time.sleep(0.02)
    done = threading.Event()
    exporter.stop().addBoth(lambda _: done.set())
    done.wait(30)
    return {
        "encode + POST, export-thread CPU": exporter.cpu / n * 1e6,
        "exported share": exporter.exported / n,
    }


def _stockSdk(sinkPort: int | None) -> dict[str, float] | None:
    """The stock OpenTelemetry SDK path, for comparison (when installed)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
    except ImportError:
        return None
    if sinkPort is None:
        return None
    tp = TracerProvider(resource=Resource.create({"service.name": "mcpgw"}))
    bsp = BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{sinkPort}/v1/traces"),
        max_queue_size=100_000,
        schedule_delay_millis=1000,
    )
    tp.add_span_processor(bsp)
    tracer = tp.get_tracer("mcpgw")
    attrs = {
        "mcp.method.name": "tools/call",
        "gen_ai.tool.name": "echo",
        "mcp.tool.name": "echo",
        "gen_ai.operation.name": "execute_tool",
        "jsonrpc.request.id": "17",
        "mcp.protocol.version": "2025-06-18",
        "mcp.session.id": "f3c0d4e1a2b34c5d",
        "mcp.policy.decision": "allow",
        "mcp.upstream": "bench",
        "mcp.payload.bytes_in": 1100,
        "mcp.payload.bytes_out": 1250,
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "url.path": "/mcp",
        "client.address": "127.0.0.1",
        "network.protocol.name": "http",
        "request_id": "0123456789abcdef01234567",
        "resource.name": "tools/call echo",
        "operation.name": "mcp.server.request",
    }
    n = 20_000
    gc.collect()
    r0 = os.times()
    t0 = time.thread_time()
    for i in range(n):
        s = tracer.start_span("tools/call echo", kind=SpanKind.SERVER, attributes=attrs)
        s.end()
        if i % 50 == 49:
            time.sleep(0.005)  # paced, so the queue never overflows
    caller = time.thread_time() - t0
    tp.shutdown()
    r1 = os.times()
    total = (r1.user - r0.user) + (r1.system - r0.system)
    return {
        "caller thread (span + attributes + end)": caller / n * 1e6,
        "whole process incl. BSP + exporter thread": total / n * 1e6,
    }


# -- 2. processes at a fixed request rate ------------------------------------------------------


def paced(
    url: str, session: str | None, proto: str, rate: float, duration: float
) -> dict[str, Any]:
    """tools/call at C{rate} per second on one keep-alive connection; latencies in ms."""
    c = loadgen.RawConn(url)
    hd = loadgen.base_headers((), session, proto)
    args = json.dumps(loadgen.tool_args(1024), separators=(",", ":"))
    marker = loadgen.MARKER.encode()
    lat: list[float] = []
    bad = 0
    interval = 1.0 / rate
    gc_was = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        i = 0
        while True:
            due = start + i * interval
            now = time.perf_counter()
            if now - start >= duration:
                break
            if due > now:
                time.sleep(due - now)
            body = (
                '{"jsonrpc":"2.0","id":' + str(i) + ',"method":"tools/call",'
                '"params":{"name":"echo","arguments":' + args + "}}"
            ).encode()
            t0 = time.perf_counter_ns()
            try:
                st, _, b = c.roundtrip(c.build("POST", hd, body))
            except (OSError, loadgen.HTTPError):
                st, b = -1, b""
                c.close()
            lat.append((time.perf_counter_ns() - t0) / 1e6)
            if st != 200 or marker not in b:
                bad += 1
            i += 1
        elapsed = time.perf_counter() - start
    finally:
        if gc_was:
            gc.enable()
        c.close()
    lat.sort()
    return {
        "n": len(lat),
        "rate": len(lat) / elapsed,
        "bad": bad,
        "p50_ms": loadgen.pct(lat, 50),
        "p99_ms": loadgen.pct(lat, 99),
        "p999_ms": loadgen.pct(lat, 99.9),
        "max_ms": lat[-1] if lat else float("nan"),
    }


MCPGW_CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
upstreams:
  - {{name: bench, url: "{upstream}", path: /mcp}}
audit: {{path: {tmp}/audit-{name}.jsonl, fsync: interval, state_dir: {tmp}/state-{name}}}
"""


def macro(a: argparse.Namespace, tmp: Path, procs: run.Procs) -> dict[str, Any]:
    up_py, up_loop = run.upstream_python(not a.no_install)
    up_port = run.free_port()
    p = procs.spawn("upstream", [up_py, str(HERE / "upstream_fast.py"), "--port", str(up_port)])
    run.wait_ready(procs, p, up_port, 30)
    up_url = f"http://127.0.0.1:{up_port}/mcp"
    sink_port = run.free_port()
    p = procs.spawn(
        "otlp-sink",
        [sys.executable, str(HERE / "telemetry_bench.py"), "--receiver", str(sink_port)],
    )
    run.wait_ready(procs, p, sink_port, 30)
    systems: dict[str, Any] = {}
    for name in ("mcpgw", "mcpgw-otel"):
        port = run.free_port()
        cfg = tmp / f"{name}.yaml"
        text = MCPGW_CONFIG.format(port=port, upstream=up_url, tmp=tmp, name=name)
        if name == "mcpgw-otel":
            text += (
                f"telemetry: {{otlp_endpoint: 'http://127.0.0.1:{sink_port}/v1/traces',"
                " service_name: mcpgw-bench, environment: bench}\n"
            )
        cfg.write_text(text)
        p = procs.spawn(
            name, [sys.executable, "-m", "mcpgw", "run", "--config", str(cfg)], cwd=ROOT
        )
        url = f"http://127.0.0.1:{port}/mcp"
        run.wait_ready(procs, p, port, 60, f"http://127.0.0.1:{port}/healthz")
        info = loadgen.handshake(url)
        systems[name] = {"url": url, "proc": p, "info": info, "sent": 4}
    run.ensure_wrk(not a.no_install)
    time.sleep(1.0)
    rows: list[dict[str, Any]] = []
    names = list(systems)
    for rnd in range(1, a.rounds + 1):
        order = names if rnd % 2 else list(reversed(names))
        for rate in a.rates:
            for name in order:
                s = systems[name]
                info = s["info"]
                # warm-up at the same rate, then the measured run
                paced(s["url"], info["session"], info["proto"], rate, 1.0)
                c0 = run.group_cpu_seconds(s["proc"].pid)
                r = paced(s["url"], info["session"], info["proto"], rate, a.duration)
                c1 = run.group_cpu_seconds(s["proc"].pid)
                s["sent"] += r["n"] + int(rate)
                r.update(
                    system=name, round=rnd, load=f"{rate:g}/s", cpu_us=(c1 - c0) * 1e6 / r["n"]
                )
                rows.append(r)
                run.log(
                    f"round {rnd} {name:<11} {rate:>6g}/s: {r['rate']:.0f} req/s, CPU {r['cpu_us']:.1f} µs/req, "
                    f"p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} max {r['max_ms']:.2f} ms, bad {r['bad']}"
                )
                time.sleep(0.5)
        if a.wrk_seconds > 0:
            for name in order:
                s = systems[name]
                info = s["info"]
                c0 = run.group_cpu_seconds(s["proc"].pid)
                w = loadgen.run_wrk(
                    s["url"], 8, a.wrk_seconds, session=info["session"], proto=info["proto"]
                )
                c1 = run.group_cpu_seconds(s["proc"].pid)
                s["sent"] += w["requests"]
                rows.append(
                    {
                        "system": name,
                        "round": rnd,
                        "load": "wrk C=8",
                        "n": w["requests"],
                        "rate": w["rps"],
                        "bad": w["errors"],
                        "cpu_us": (c1 - c0) * 1e6 / max(1, w["requests"]),
                        "p50_ms": w.get("lat_p50_us", float("nan")) / 1000,
                        "p99_ms": w.get("lat_p99_us", float("nan")) / 1000,
                        "p999_ms": float("nan"),
                        "max_ms": float("nan"),
                    }
                )
                run.log(
                    f"round {rnd} {name:<11} wrk C=8: {w['rps']:.0f} req/s, CPU {rows[-1]['cpu_us']:.1f} µs/req"
                )
                time.sleep(1.5)
    time.sleep(2.5)  # the exporter sends at least once a second
    sink = receiverStats(sink_port)
    return {
        "rows": rows,
        "sink": sink,
        "sent_otel": systems["mcpgw-otel"]["sent"],
        "upstream_loop": up_loop,
    }


# -- report -----------------------------------------------------------------------------------


def render(meta: dict[str, Any], mic: dict[str, Any], mac: dict[str, Any] | None) -> str:
    o = [f"## mcpgw telemetry bench {meta['date']}", ""]
    o.append(
        f"machine: nproc={meta['nproc']}, load average at start {meta['loadavg_start']}; "
        f"mcpgw {meta['mcpgw_git']}; Python {meta['python']}"
    )
    o += ["", "### Per request, reactor thread (in-process, µs per call)", ""]
    o += ["| step | µs |", "|---|---:|"]
    for k, v in mic["reactor_us"].items():
        o.append(f"| {k} | {v:.2f} |")
    o += ["", "### Per span, export thread (µs)", "", "| step | value |", "|---|---:|"]
    for k, v in mic["export_thread_us"].items():
        o.append(f"| {k} | {v:.2f} |")
    if "stock_sdk_us" in mic:
        o += ["", "### For comparison: the stock OpenTelemetry SDK path (µs per span)", ""]
        o += ["| measure | µs |", "|---|---:|"]
        for k, v in mic["stock_sdk_us"].items():
            o.append(f"| {k} | {v:.1f} |")
    if mac is not None:
        o += [
            "",
            "### Gateway processes: export off (`mcpgw`) vs on (`mcpgw-otel`)",
            "",
            "CPU = utime+stime of the gateway process, all threads, per request. Medians over the rounds.",
            "",
            "| load | system | req/s | CPU µs/req | p50 ms | p99 ms | p99.9 ms | max ms | bad |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        loads = list(dict.fromkeys(r["load"] for r in mac["rows"]))
        cost: list[str] = []
        for load in loads:
            med: dict[str, dict[str, float]] = {}
            for name in ("mcpgw", "mcpgw-otel"):
                rs = [r for r in mac["rows"] if r["load"] == load and r["system"] == name]
                if not rs:
                    continue
                m = {
                    k: statistics.median(r[k] for r in rs)
                    for k in ("rate", "cpu_us", "p50_ms", "p99_ms", "p999_ms", "max_ms")
                }
                m["bad"] = sum(r["bad"] for r in rs)
                med[name] = m
                o.append(
                    f"| {load} | {name} | {m['rate']:.0f} | {m['cpu_us']:.1f} | {m['p50_ms']:.3f} | "
                    f"{m['p99_ms']:.3f} | {m['p999_ms']:.3f} | {m['max_ms']:.2f} | {m['bad']:.0f} |"
                )
            if len(med) == 2:
                d = med["mcpgw-otel"]["cpu_us"] - med["mcpgw"]["cpu_us"]
                per = [
                    on["cpu_us"] - off["cpu_us"]
                    for rnd in sorted({r["round"] for r in mac["rows"]})
                    for on in [
                        r
                        for r in mac["rows"]
                        if r["load"] == load and r["system"] == "mcpgw-otel" and r["round"] == rnd
                    ]
                    for off in [
                        r
                        for r in mac["rows"]
                        if r["load"] == load and r["system"] == "mcpgw" and r["round"] == rnd
                    ]
                ]
                cost.append(
                    f"- {load}: tracing adds **{d:+.1f} µs CPU per request** (median on - median off); "
                    f"per round: {', '.join(f'{x:+.1f}' for x in per)}"
                )
        o += ["", *cost, ""]
        sink = mac["sink"]
        o.append(
            f"Spans received by the sink: {sink['spans']} in {sink['posts']} POSTs "
            f"({sink['bytes'] / max(1, sink['spans']):.0f} bytes/span, {sink['undecodable']} undecodable); "
            f"requests sent to mcpgw-otel: {mac['sent_otel']} (plus those in flight when wrk stopped)."
        )
    return "\n".join(o) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--receiver", type=int, metavar="PORT", help="run only the OTLP sink on PORT")
    ap.add_argument("--rates", default="1000,2500", help="fixed request rates (req/s)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per paced run")
    ap.add_argument("--rounds", type=int, default=2, help="rounds (order alternates)")
    ap.add_argument("--wrk-seconds", type=int, default=5, help="wrk C=8 run per round (0: none)")
    ap.add_argument("--micro-only", action="store_true", help="only the in-process part")
    ap.add_argument(
        "--no-install", action="store_true", help="never apt-get wrk or pip-install uvloop"
    )
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    if a.receiver is not None:
        receiver(a.receiver)
        return 0
    a.rates = [float(x) for x in a.rates.split(",") if x.strip()]
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "loadavg_start": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
        "mcpgw_git": run.git_describe(),
        "python": sys.version.split()[0],
        "args": vars(a),
    }
    tmp = Path(tempfile.mkdtemp(prefix="mcpgw-telemetry-bench-"))
    procs = run.Procs(tmp)
    mac = None
    try:
        sink_port = run.free_port()
        sink = procs.spawn(
            "micro-sink",
            [sys.executable, str(HERE / "telemetry_bench.py"), "--receiver", str(sink_port)],
        )
        run.wait_ready(procs, sink, sink_port, 30)
        run.log("in-process micro-benchmark")
        mic = micro(sink_port)
        if not a.micro_only:
            mac = macro(a, tmp, procs)
    finally:
        procs.stop_all()
    md = render(meta, mic, mac)
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"telemetry-{stamp}.md").write_text(md)
    (out / f"telemetry-{stamp}.json").write_text(
        json.dumps({"meta": meta, "micro": mic, "macro": mac}, indent=1, default=str)
    )
    run.log(f"wrote {out}/telemetry-{stamp}.md and .json")
    bad = mac is not None and any(r["bad"] for r in mac["rows"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
