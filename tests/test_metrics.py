"""
C{listen.admin} without workers: C{/metrics} of a real gateway counts exactly what its audit file
says (allowed, denied, rate-limited, refused by the input limit, upstream unreachable), in the
Prometheus text format (parsed with prometheus-client's own parser); C{/healthz} and C{/readyz}
answer there; the MCP listener serves no metrics. Also the units: adding up samples of several
processes, counters of ended workers, config keys and the C{config check} warning.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.cli import configCheck
from mcpgw.config import ConfigError, config_from_string
from mcpgw.metrics import (
    FAMILIES,
    Histogram,
    RequestMetrics,
    Sample,
    addUp,
    familyOf,
    fromWire,
    monotonic,
    render,
    toWire,
)
from tests.support import GatewayTestCase, freePort, portOf, rpc


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


class AdminListenerTests(GatewayTestCase):
    extraConfig = (
        "policy:\n"
        "  rules:\n"
        "    - {id: no-bad, action: deny, match: {exact: bad}}\n"
        "    - {id: slow, action: rate_limit, match: {exact: lim}, rate_limit: {rate: 0.01, burst: 1}}\n"
        "limits: {input_rate_limit: {rate: 0.01, burst: 30}}\n"
    )

    def configText(self) -> str:
        dead = freePort()
        return (
            super()
            .configText()
            .replace(
                "listen: {host: 127.0.0.1, port: 0}",
                "listen: {host: 127.0.0.1, port: 0, admin: {host: 127.0.0.1, port: 0}}",
            )
            .replace(
                "upstreams:\n",
                f"upstreams:\n  - {{name: gone, url: 'http://127.0.0.1:{dead}/mcp', path: /gone}}\n",
            )
        )

    def adminPort(self) -> int:
        return portOf(self.service.getServiceNamed("admin").port)

    @inlineCallbacks
    def test_metricsMatchTheAuditFile(self) -> Any:
        """
        /metrics on the admin port counts exactly the requests of the audit file, by upstream,
        method, decision and status, with the durations, refusals and upstream errors.
        """
        tools = ["ok", "ok", "bad", "lim", "lim", "ok"]
        for i, tool in enumerate(tools):
            yield self.call(body=rpc("tools/call", {"name": tool}, id=i))
        yield self.call(body=rpc("tools/list", id=10))
        yield self.call(body=rpc("vendor/odd", id=11))
        yield self.call(path="/gone", body=rpc("tools/call", {"name": "ok"}, id=12))
        yield self.call(path="/nowhere", body=rpc("ping", id=13))
        lines = self.auditLines()
        self.assertEqual(len(lines), 10)
        reply = yield self.call("GET", "/metrics", port=self.adminPort())
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("content-type"), ["text/plain; version=0.0.4; charset=utf-8"])
        m = parse(reply.body.decode())
        self.assertEqual(total(m, "mcpgw_requests_total"), 10)
        self.assertEqual(total(m, "mcpgw_request_duration_seconds_count"), 10)
        self.assertEqual(total(m, "mcpgw_audit_lines_written_total"), 10)
        expected = Counter(
            (line["upstream"] or "none", line["decision"], str(line["status"])) for line in lines
        )
        for (upstream, decision, status), n in expected.items():
            self.assertEqual(
                total(
                    m, "mcpgw_requests_total", upstream=upstream, decision=decision, status=status
                ),
                n,
                (upstream, decision, status),
            )
        self.assertEqual(total(m, "mcpgw_requests_total", decision="deny", status="403"), 1)
        self.assertEqual(total(m, "mcpgw_requests_total", method="other"), 1)  # vendor/odd
        self.assertEqual(total(m, "mcpgw_requests_total", method="tools/list"), 1)
        self.assertEqual(total(m, "mcpgw_rate_limited_total", scope="policy", rule="slow"), 1)
        self.assertEqual(
            total(m, "mcpgw_upstream_errors_total", upstream="gone", kind="connect"), 1
        )
        self.assertEqual(total(m, "mcpgw_workers", state="alive"), 1)
        self.assertEqual(total(m, "mcpgw_build_info"), 1)
        # the histogram is cumulative and ends at +Inf with the count
        buckets = [
            (dict(ls)["le"], v)
            for (n, ls), v in m.items()
            if n == "mcpgw_request_duration_seconds_bucket" and dict(ls)["upstream"] == "up"
        ]
        self.assertEqual(
            dict(buckets)["+Inf"], total(m, "mcpgw_request_duration_seconds_count", upstream="up")
        )

    @inlineCallbacks
    def test_inputLimitRefusalsCounted(self) -> Any:
        """Requests refused by the per-address input limit are counted with scope input."""
        statuses = []
        for i in range(33):
            r = yield self.call(body=rpc("ping", id=i))
            statuses.append(r.status)
        refused = statuses.count(429)
        self.assertGreater(refused, 0)
        reply = yield self.call("GET", "/metrics", port=self.adminPort())
        m = parse(reply.body.decode())
        self.assertEqual(total(m, "mcpgw_rate_limited_total", scope="input"), refused)
        self.assertEqual(total(m, "mcpgw_requests_total", status="429"), refused)

    @inlineCallbacks
    def test_healthOnAdminNoMetricsOnMcp(self) -> Any:
        """/healthz and /readyz answer on the admin port; the MCP listener has no /metrics."""
        health = yield self.call("GET", "/healthz", port=self.adminPort())
        self.assertEqual((health.status, health.json()), (200, {"status": "ok"}))
        ready = yield self.call("GET", "/readyz", port=self.adminPort())
        self.assertEqual(ready.json()["upstreams"]["up"]["reachable"], True)
        other = yield self.call("GET", "/nope", port=self.adminPort())
        self.assertEqual(other.status, 404)
        mcp = yield self.call("GET", "/metrics")
        self.assertEqual(mcp.status, 404)
        self.assertNotIn(b"mcpgw_", mcp.body)


class SampleTests(SynchronousTestCase):
    def test_addUpAndRender(self) -> None:
        """Samples of two processes add up per series; the text parses back to the sums."""
        a = [
            ("mcpgw_requests_in_flight", (), 2.0),
            ("mcpgw_auth_cache_total", (("result", "hit"),), 5.0),
        ]
        b = [
            ("mcpgw_requests_in_flight", (), 3.0),
            ("mcpgw_auth_cache_total", (("result", "hit"),), 1.0),
        ]
        m = parse(render(addUp(a, fromWire(toWire(b)))).decode())
        self.assertEqual(m[("mcpgw_requests_in_flight", ())], 5.0)
        self.assertEqual(m[("mcpgw_auth_cache_total", (("result", "hit"),))], 6.0)

    def test_endedWorkersKeepCountersNotGauges(self) -> None:
        """What is kept of an ended worker: its counters and histograms, not its gauges."""
        h = Histogram((0.1, 1.0))
        h.observe(0.5)
        samples: list[Sample] = [
            ("mcpgw_requests_in_flight", (), 2.0),
            ("mcpgw_spans_dropped_total", (), 4.0),
        ]
        samples += list(h.samples("mcpgw_redis_latency_seconds", ()))
        kept = {s[0] for s in monotonic(samples)}
        self.assertNotIn("mcpgw_requests_in_flight", kept)
        self.assertIn("mcpgw_spans_dropped_total", kept)
        self.assertIn("mcpgw_redis_latency_seconds_count", kept)

    def test_everySampleHasAFamily(self) -> None:
        """Every sample the request counters make belongs to a declared family."""
        r = RequestMetrics()
        r.observe(
            {
                "upstream": "u",
                "method": "tools/call",
                "decision": "rate_limit",
                "status": 429,
                "duration_ms": 3.0,
                "error": "upstream_timeout",
                "rule_id": "x",
            }
        )
        for name, _, _ in r.samples():
            self.assertIn(familyOf(name), FAMILIES)


class FleetConfigTests(SynchronousTestCase):
    base = "upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]\n"

    def test_workersAndAdmin(self) -> None:
        """listen.workers takes 1..256 or auto; listen.admin a host and port apart from the MCP one."""
        c = config_from_string(self.base + "listen: {workers: 3, admin: {port: 9999}}")
        assert c.listen.admin is not None
        self.assertEqual((c.listen.workerCount, c.listen.admin.port), (3, 9999))
        self.assertGreaterEqual(
            config_from_string(self.base + "listen: {workers: auto}").listen.workerCount, 1
        )
        self.assertEqual(config_from_string(self.base).listen.workers, 1)
        for bad, message in [
            ("listen: {workers: 0}", "listen.workers: must be between 1 and 256"),
            ("listen: {workers: lots}", "listen.workers: must be an integer or auto"),
            ("listen: {port: 9464, admin: {}}", "listen.admin.port: must differ from listen.port"),
            ("listen: {admin: {prot: 1}}", "listen.admin.prot: unknown key"),
        ]:
            with self.assertRaises(ConfigError) as e:
                config_from_string(self.base + bad)
            self.assertIn(message, str(e.exception))

    def test_configCheckWarnsLimitsPerWorker(self) -> None:
        """config check: workers > 1 with in-memory limits is valid, with a warning."""
        import contextlib
        import io

        path = os.path.join(tempfile.mkdtemp(), "c.yaml")
        with open(path, "w") as f:
            f.write(self.base + "listen: {workers: 4}\n")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(configCheck(path), 0)
        self.assertIn("listen.workers 4: rate-limit buckets", err.getvalue())
        self.assertIn("are per worker", err.getvalue())
        with open(path, "w") as f:
            f.write(self.base)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(configCheck(path), 0)
        self.assertNotIn("listen.workers", err.getvalue())


class GrafanaDashboardTests(SynchronousTestCase):
    def test_dashboardQueriesDeclaredMetrics(self) -> None:
        """
        etc/grafana-dashboard.json is a Grafana dashboard whose every query names metrics mcpgw
        serves (a declared family with its sample suffix), and it shows every family.
        """
        import json
        import re

        path = os.path.join(os.path.dirname(__file__), "..", "etc", "grafana-dashboard.json")
        with open(path) as f:
            dashboard = json.load(f)
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
        exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
        self.assertGreater(len(exprs), 20)
        used = set()
        for expr in exprs:
            for name in re.findall(r"\bmcpgw_[a-z_]+", expr):
                family = familyOf(name)
                kind = FAMILIES[family][0]
                suffix = name[len(family) :]
                allowed = {"counter": {"_total"}, "gauge": {""}, "histogram": {"_bucket"}}[kind]
                self.assertIn(suffix, allowed, name)
                used.add(family)
        self.assertEqual(set(FAMILIES) - used, set())
