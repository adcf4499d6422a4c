"""
SIGHUP under load: a real gateway process, clients on keep-alive connections calling in a loop,
20 reloads that change the policy: zero failed requests and zero dropped connections.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer

from twisted.trial.unittest import TestCase

from tests.support import EchoHandler, freePort


def config(gwPort: int, upPort: int, audit: str, blocked: str) -> str:
    return (
        f"listen: {{host: 127.0.0.1, port: {gwPort}}}\n"
        f"upstreams: [{{name: up, url: 'http://127.0.0.1:{upPort}/mcp'}}]\n"
        f"audit: {{path: {audit}, fsync: none}}\n"
        "policy:\n"
        "  rules:\n"
        f"    - {{id: block, action: deny, match: {{exact: {blocked}}}}}\n"
        "    - {id: lim, action: rate_limit, match: {prefix: lim_}, rate_limit: {rate: 1000, burst: 1000}}\n"
    )


class ReloadUnderLoadTests(TestCase):
    timeout = 120

    def test_twentyHupsNoFailureNoDrop(self) -> None:
        """Clients keep calling through 20 SIGHUPs: every call succeeds on its original connection."""
        up = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
        up.daemon_threads = True
        threading.Thread(target=up.serve_forever, daemon=True).start()
        self.addCleanup(up.shutdown)
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "mcpgw.yaml")
        audit = os.path.join(tmp, "audit.jsonl")
        port = freePort()
        upPort = up.server_address[1]
        with open(path, "w") as f:
            f.write(config(port, upPort, audit, "blocked_a"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcpgw", "run", "--config", path],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(lambda: None if proc.poll() is not None else proc.kill())
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                self.assertLess(time.monotonic(), deadline, "gateway did not start")
                time.sleep(0.1)

        stop = threading.Event()
        results: list[tuple[int, int, int]] = []  # (thread, ok, failures)
        sockets: dict[int, set[int]] = {}

        def client(n: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            ok = failed = 0
            i = 0
            seen: set[int] = set()
            tools = ["echo", "lim_x", "blocked_b"]
            while not stop.is_set():
                i += 1
                tool = tools[i % 2]  # never the tools the reloads block
                body = json.dumps(
                    {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool}}
                )
                try:
                    conn.request("POST", "/mcp", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    seen.add(conn.sock.getsockname()[1])
                    if resp.status == 200 and json.loads(data)["id"] == i:
                        ok += 1
                    else:
                        failed += 1
                except (OSError, http.client.HTTPException):
                    failed += 1
                    conn.close()
            conn.close()
            results.append((n, ok, failed))
            sockets[n] = seen

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        for k in range(20):
            with open(path, "w") as f:
                f.write(config(port, upPort, audit, "blocked_b" if k % 2 == 0 else "blocked_a"))
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.08)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)

        self.assertEqual(len(results), 4)
        self.assertEqual([r[2] for r in results], [0, 0, 0, 0], results)
        self.assertTrue(all(r[1] > 20 for r in results), results)
        # each client used one connection from start to end: none was dropped
        self.assertEqual({n: len(s) for n, s in sockets.items()}, {0: 1, 1: 1, 2: 1, 3: 1})
        swaps = [line for line in out.splitlines() if "reloaded" in line]
        self.assertGreaterEqual(len(swaps), 10, out[-2000:])
        self.assertIn("generation", swaps[-1])
        with open(audit) as f:
            statuses = {json.loads(line)["status"] for line in f}
        self.assertEqual(statuses, {200})
