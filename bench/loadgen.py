#!/usr/bin/env python3
# Vendored verbatim from the shared mcpbench harness: shared/bench/loadgen.py
# (2026-11-24, sha256 70846c14367a1cf2...). Only this header was added; the file is kept
# as-is (hence the ruff exemption) so it can be diffed against the original.
# Used by bench/run.py (make bench).
# ruff: noqa
"""Load generator for MCP Streamable HTTP endpoints (stdlib only).

  * handshake(): initialize -> notifications/initialized -> tools/list -> one
    tools/call, validated (handles application/json and text/event-stream bodies,
    Content-Length and chunked).  Returns the Mcp-Session-Id and the tool name
    (exactly "echo", else the one tool whose name ends in "echo", e.g.
    ContextForge's "<gateway>-echo").
  * seq_latency(): sequential single-connection latency over N tools/call
    requests (~1 KB arguments) with a raw keep-alive socket client; exact
    percentiles from perf_counter_ns; every response is checked (HTTP 200 and
    the echoed marker present).  Stops after N requests or max_s seconds.
  * run_wrk(): throughput at concurrency C for a fixed duration with wrk and
    mcp_call.lua (unique JSON-RPC ids per request); returns req/s and wrk's
    latency percentiles.

Standalone:  loadgen.py --url http://127.0.0.1:18001/mcp [-H 'Authorization: Bearer x']
                        [--n 2000] [--conc 8,32] [--duration 8] [--json out.json]
"""
import argparse
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
LUA = os.path.join(HERE, "mcp_call.lua")
PROTO = "2025-06-18"
MARKER = "mcpbench-marker"


class HTTPError(Exception):
    pass


class RawConn:
    """Minimal HTTP/1.1 keep-alive client on one socket."""

    def __init__(self, url, timeout=30.0):
        u = urlsplit(url)
        self.host = u.hostname
        self.port = u.port or 80
        self.path = (u.path or "/") + (("?" + u.query) if u.query else "")
        self.hosthdr = "%s:%d" % (self.host, self.port)
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def connect(self):
        self.close()
        s = socket.create_connection((self.host, self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.buf = b""

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def build(self, method, headers, body=b""):
        lines = ["%s %s HTTP/1.1" % (method, self.path), "Host: " + self.hosthdr]
        for k, v in headers:
            lines.append("%s: %s" % (k, v))
        lines.append("Content-Length: %d" % len(body))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _recv(self):
        d = self.sock.recv(262144)
        if not d:
            raise HTTPError("connection closed by peer")
        self.buf += d

    def roundtrip(self, raw):
        """Send raw request bytes; return (status, headers{lower: str}, body bytes)."""
        if self.sock is None:
            self.connect()
        self.sock.sendall(raw)
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            self._recv()
        head = self.buf[:i].decode("latin-1")
        self.buf = self.buf[i + 4:]
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if status < 200 or status in (204, 304):
            return self.roundtrip_continue(status, hdrs, b"")
        te = hdrs.get("transfer-encoding", "").lower()
        if "content-length" in hdrs:
            n = int(hdrs["content-length"])
            while len(self.buf) < n:
                self._recv()
            body, self.buf = self.buf[:n], self.buf[n:]
        elif "chunked" in te:
            out = []
            while True:
                while True:
                    j = self.buf.find(b"\r\n")
                    if j >= 0:
                        break
                    self._recv()
                size = int(self.buf[:j].split(b";")[0], 16)
                self.buf = self.buf[j + 2:]
                while len(self.buf) < size + 2:
                    self._recv()
                out.append(self.buf[:size])
                self.buf = self.buf[size + 2:]
                if size == 0:
                    # (trailers not supported; final CRLF consumed above)
                    break
            body = b"".join(out)
        else:  # read until close
            try:
                while True:
                    self._recv()
            except HTTPError:
                pass
            body, self.buf = self.buf, b""
            self.close()
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return status, hdrs, body

    def roundtrip_continue(self, status, hdrs, body):
        if 100 <= status < 200:  # skip interim responses
            raise HTTPError("unexpected 1xx response")
        return status, hdrs, body


def parse_jsonrpc_body(hdrs, body, want_id=None):
    """Return the JSON-RPC message from a JSON or SSE body (the one with want_id if given)."""
    ct = hdrs.get("content-type", "")
    if "text/event-stream" in ct:
        msgs = []
        for block in re.split(r"\r?\n\r?\n", body.decode("utf-8", "replace")):
            data = "\n".join(l[5:].lstrip() for l in block.splitlines() if l.startswith("data:"))
            if data.strip():
                try:
                    msgs.append(json.loads(data))
                except ValueError:
                    pass
        for m in msgs:
            if want_id is None or (isinstance(m, dict) and m.get("id") == want_id):
                return m
        return msgs[-1] if msgs else None
    if not body:
        return None
    return json.loads(body)


def base_headers(extra_headers, session=None, proto=PROTO):
    h = [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")]
    if proto:
        h.append(("MCP-Protocol-Version", proto))
    if session:
        h.append(("Mcp-Session-Id", session))
    h.extend(extra_headers)
    return h


def parse_header_args(items):
    out = []
    for it in items or []:
        k, _, v = it.partition(":")
        out.append((k.strip(), v.strip()))
    return out


def tool_args(nbytes):
    pad = "x" * max(0, nbytes - len(MARKER) - 12)
    return {"text": MARKER + "-" + pad}


def handshake(url, extra_headers=(), tool=None, verbose=False):
    """MCP handshake + one validated tools/call.  Returns dict(session, tool, proto, server)."""
    c = RawConn(url)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": PROTO, "capabilities": {},
                       "clientInfo": {"name": "mcpbench", "version": "1.0"}}}
    st, h, b = c.roundtrip(c.build("POST", base_headers(extra_headers, proto=None),
                                   json.dumps(init).encode()))
    if st != 200:
        raise HTTPError("initialize -> HTTP %d: %s" % (st, b[:300]))
    m = parse_jsonrpc_body(h, b, 1)
    if not m or "result" not in m:
        raise HTTPError("initialize: bad response %r" % (b[:300],))
    session = h.get("mcp-session-id")
    proto = m["result"].get("protocolVersion", PROTO)
    server = m["result"].get("serverInfo", {})
    hd = base_headers(extra_headers, session, proto)
    st, h, b = c.roundtrip(c.build("POST", hd, json.dumps(
        {"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()))
    if st not in (200, 202, 204):
        raise HTTPError("notifications/initialized -> HTTP %d: %s" % (st, b[:300]))
    st, h, b = c.roundtrip(c.build("POST", hd, json.dumps(
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).encode()))
    m = parse_jsonrpc_body(h, b, 2)
    if st != 200 or not m or "result" not in m:
        raise HTTPError("tools/list -> HTTP %d: %s" % (st, b[:300]))
    names = [t.get("name") for t in m["result"].get("tools", [])]
    if tool is None:
        if "echo" in names:
            tool = "echo"
        else:
            cands = [n for n in names if n and n.endswith("echo")]
            if len(cands) != 1:
                raise HTTPError("cannot pick the echo tool from %r" % (names,))
            tool = cands[0]
    args = tool_args(64)
    st, h, b = c.roundtrip(c.build("POST", hd, json.dumps(
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
         "params": {"name": tool, "arguments": args}}).encode()))
    m = parse_jsonrpc_body(h, b, 3)
    if st != 200 or not m or "result" not in m:
        raise HTTPError("tools/call -> HTTP %d: %s" % (st, b[:300]))
    text = m["result"]["content"][0]["text"]
    if args["text"] not in text:
        raise HTTPError("tools/call did not echo the arguments: %r" % (text[:200],))
    c.close()
    info = {"session": session, "tool": tool, "proto": proto, "server": server,
            "tools": names, "content_type": h.get("content-type", "")}
    if verbose:
        print("handshake ok: %s" % json.dumps(info), file=sys.stderr)
    return info


def pct(sorted_vals, p):
    """Nearest-rank percentile of a sorted list."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def seq_latency(url, extra_headers=(), session=None, tool="echo", proto=PROTO, n=2000,
                warmup=200, arg_bytes=1024, max_s=20.0):
    """Sequential single-connection tools/call latency. Times in ms."""
    c = RawConn(url)
    hd = base_headers(extra_headers, session, proto)
    args = json.dumps(tool_args(arg_bytes), separators=(",", ":"))
    prefix = '{"jsonrpc":"2.0","id":'
    suffix = ',"method":"tools/call","params":{"name":%s,"arguments":%s}}' % (json.dumps(tool), args)
    body_len = len(prefix) + len(suffix)
    marker = MARKER.encode()
    lat = []
    bad = 0
    first_bad = ""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        # warmup gets at most a quarter of the time budget, the measured part max_s
        t_start = time.monotonic()
        deadline = t_start + max_s / 4.0
        total = warmup + n
        for i in range(total):
            if i == warmup or (i < warmup and time.monotonic() > deadline):
                if i < warmup:  # warmup cut short by its time budget
                    warmup = i
                deadline = time.monotonic() + max_s
            body = (prefix + str(1000 + i) + suffix).encode()
            raw = c.build("POST", hd, body)
            t0 = time.perf_counter_ns()
            try:
                st, h, b = c.roundtrip(raw)
            except (OSError, HTTPError) as e:
                st, h, b = -1, {}, str(e).encode()
                c.close()
            t1 = time.perf_counter_ns()
            if st != 200 or marker not in b:
                bad += 1
                if not first_bad:
                    first_bad = "HTTP %d %r" % (st, b[:160])
            if i >= warmup:
                lat.append((t1 - t0) / 1e6)
                if time.monotonic() > deadline:
                    break
    finally:
        if gc_was:
            gc.enable()
        c.close()
    lat.sort()
    return {"n": len(lat), "warmup": warmup, "bad": bad, "first_bad": first_bad, "body_bytes": body_len + 4,
            "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
            "max_ms": lat[-1] if lat else float("nan"), "min_ms": lat[0] if lat else float("nan"),
            "mean_ms": (sum(lat) / len(lat)) if lat else float("nan")}


def run_wrk(url, conns, duration_s, extra_headers=(), session=None, tool="echo", proto=PROTO,
            threads=1, arg_bytes=1024, timeout_s=10):
    """Closed-loop load at `conns` connections for `duration_s` seconds with wrk."""
    wrk = shutil.which("wrk")
    if not wrk:
        raise RuntimeError("wrk not found (apt-get install wrk)")
    env = dict(os.environ)
    env.update({"MCP_SESSION_ID": session or "", "MCP_TOOL": tool, "MCP_ARG_BYTES": str(arg_bytes),
                "MCP_MARKER": MARKER, "MCP_PROTOCOL_VERSION": proto or PROTO,
                "MCP_EXTRA_HEADERS": "\n".join("%s: %s" % kv for kv in extra_headers)})
    threads = max(1, min(threads, conns))
    cmd = [wrk, "-t%d" % threads, "-c%d" % conns, "-d%ds" % duration_s, "--timeout", "%ds" % timeout_s,
           "--latency", "-s", LUA, url]
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=duration_s + timeout_s + 30)
    m = re.search(r"^WRKJSON (\{.*\})\s*$", p.stdout, re.M)
    if not m:
        raise RuntimeError("wrk failed (rc=%d): %s" % (p.returncode, p.stdout[-2000:]))
    r = json.loads(m.group(1))
    secs = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / secs if secs > 0 else 0.0
    r["ok_rps"] = r["ok"] / secs if secs > 0 else 0.0
    r["p50_ms"] = r["lat_p50_us"] / 1000.0
    r["p99_ms"] = r["lat_p99_us"] / 1000.0
    r["conns"] = conns
    r["errors"] = (r["bad_status"] + r["bad_body"] + r["err_connect"] + r["err_read"]
                   + r["err_write"] + r["err_timeout"])
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("-H", "--header", action="append", default=[], help="extra header 'Name: value'")
    ap.add_argument("--tool", default=None, help="tool name (default: auto from tools/list)")
    ap.add_argument("--n", type=int, default=2000, help="sequential requests")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--max-s", type=float, default=20.0, help="time cap of the sequential test")
    ap.add_argument("--arg-bytes", type=int, default=1024)
    ap.add_argument("--conc", default="8,32", help="comma-separated wrk concurrencies ('' = none)")
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--json", help="write results as JSON here")
    a = ap.parse_args()
    hdrs = parse_header_args(a.header)
    info = handshake(a.url, hdrs, a.tool, verbose=True)
    res = {"url": a.url, "handshake": info}
    res["seq"] = seq_latency(a.url, hdrs, info["session"], info["tool"], info["proto"], a.n,
                             a.warmup, a.arg_bytes, a.max_s)
    s = res["seq"]
    print("sequential n=%d bad=%d  p50 %.3f  p90 %.3f  p99 %.3f  max %.3f ms" % (
        s["n"], s["bad"], s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"]))
    res["wrk"] = {}
    for cc in [int(x) for x in a.conc.split(",") if x.strip()]:
        r = run_wrk(a.url, cc, a.duration, hdrs, info["session"], info["tool"], info["proto"],
                    a.threads, a.arg_bytes)
        res["wrk"][str(cc)] = r
        print("C=%-3d %9.1f req/s  p50 %.3f  p99 %.3f ms  errors=%d %s" % (
            cc, r["rps"], r["p50_ms"], r["p99_ms"], r["errors"], r["first_bad"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
