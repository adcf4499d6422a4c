"""
The OpenTelemetry conventions: the C{OTEL_*} environment variables (the YAML wins where both are
set), C{telemetry.sampler}, and sampling through the gateway to a real OTLP receiver.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from mcpgw.config import ConfigError, SamplerConfig, TelemetryConfig, config_from_string
from mcpgw.tap import makeService
from mcpgw.telemetry import TraceParent, makeSampler, resourceAttributes
from tests.otlpreceiver import OTLPReceiver
from tests.support import GatewayTestCase, portOf, rpc

BASE = "upstreams: [{name: a, url: 'http://127.0.0.1:9/mcp'}]\n"


def telemetry(yaml: str = "", **environ: str) -> TelemetryConfig:
    return config_from_string(BASE + yaml, environ=environ).telemetry


def problems(yaml: str = "", **environ: str) -> list[str]:
    try:
        config_from_string(BASE + yaml, environ=environ)
    except ConfigError as e:
        return [str(p) for p in e.problems]
    raise AssertionError("no problem reported")


class EnvironmentTests(SynchronousTestCase):
    def test_defaultsWithoutEither(self) -> None:
        """Neither YAML nor environment: no export, service mcpgw, parent-based always on."""
        t = telemetry()
        self.assertEqual((t.otlp_endpoint, t.service_name, t.headers), (None, "mcpgw", ()))
        self.assertEqual(t.sampler, SamplerConfig("parentbased_always_on", 1.0))

    def test_endpoints(self) -> None:
        """The base endpoint gets /v1/traces; the traces endpoint is used as is and wins."""
        base = "http://collector:4318/"
        self.assertEqual(
            telemetry(OTEL_EXPORTER_OTLP_ENDPOINT=base).otlp_endpoint,
            "http://collector:4318/v1/traces",
        )
        both = telemetry(
            OTEL_EXPORTER_OTLP_ENDPOINT=base,
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="https://traces.example/custom",
        )
        self.assertEqual(both.otlp_endpoint, "https://traces.example/custom")
        yaml = telemetry(
            "telemetry: {otlp_endpoint: 'http://127.0.0.1:4318/v1/traces'}\n",
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="https://traces.example/custom",
        )
        self.assertEqual(yaml.otlp_endpoint, "http://127.0.0.1:4318/v1/traces")

    def test_serviceNameAndResource(self) -> None:
        """OTEL_SERVICE_NAME beats service.name in OTEL_RESOURCE_ATTRIBUTES; the YAML beats both."""
        attrs = "service.name=from-attrs,team=a%20i,deployment.environment.name=staging"
        t = telemetry(OTEL_RESOURCE_ATTRIBUTES=attrs)
        self.assertEqual(t.service_name, "from-attrs")
        self.assertEqual(
            t.resource_attributes, (("deployment.environment.name", "staging"), ("team", "a i"))
        )
        self.assertEqual(
            telemetry(OTEL_RESOURCE_ATTRIBUTES=attrs, OTEL_SERVICE_NAME="svc").service_name, "svc"
        )
        yaml = telemetry(
            "telemetry: {service_name: gw, resource_attributes: {team: platform}}\n",
            OTEL_RESOURCE_ATTRIBUTES=attrs,
            OTEL_SERVICE_NAME="svc",
        )
        self.assertEqual(yaml.service_name, "gw")
        self.assertIn(("team", "platform"), yaml.resource_attributes)
        resource = dict(resourceAttributes(yaml))
        self.assertEqual(
            (resource["service.name"], resource["team"], resource["deployment.environment.name"]),
            ("gw", "platform", "staging"),
        )

    def test_headers(self) -> None:
        """OTLP headers: the traces variable beats the general one; the YAML beats both."""
        t = telemetry(
            OTEL_EXPORTER_OTLP_HEADERS="a=1",
            OTEL_EXPORTER_OTLP_TRACES_HEADERS="DD-API-KEY=abc%3D%3D, x-team = gw",
        )
        self.assertEqual(t.headers, (("DD-API-KEY", "abc=="), ("x-team", "gw")))
        self.assertNotIn("abc", repr(t))
        self.assertEqual(telemetry(OTEL_EXPORTER_OTLP_HEADERS="a=1").headers, (("a", "1"),))
        yaml = telemetry("telemetry: {headers: {X-Key: k}}\n", OTEL_EXPORTER_OTLP_HEADERS="a=1")
        self.assertEqual(yaml.headers, (("X-Key", "k"),))

    def test_sampler(self) -> None:
        """OTEL_TRACES_SAMPLER/_ARG; telemetry.sampler as a name or {type, ratio} wins."""
        env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
        self.assertEqual(telemetry(**env).sampler, SamplerConfig("parentbased_traceidratio", 0.25))
        self.assertEqual(
            telemetry("telemetry: {sampler: always_off}\n", **env).sampler,
            SamplerConfig("always_off", 1.0),
        )
        self.assertEqual(
            telemetry("telemetry: {sampler: {type: traceidratio, ratio: 0.1}}\n", **env).sampler,
            SamplerConfig("traceidratio", 0.1),
        )

    def test_badValuesReported(self) -> None:
        """Unknown samplers, ratios out of range and malformed variables are config problems."""
        self.assertIn("did you mean 'always_on'", problems(OTEL_TRACES_SAMPLER="always_onn")[0])
        self.assertIn(
            "between 0 and 1",
            problems(OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="2")[0],
        )
        self.assertIn("must be a number", problems(
            OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="half")[0])  # fmt: skip
        self.assertIn(
            "telemetry.sampler: must be one of",
            problems("telemetry: {sampler: {type: jaeger_remote}}\n")[0],
        )
        self.assertIn("not key=value", problems(OTEL_EXPORTER_OTLP_HEADERS="novalue")[0])
        self.assertIn(
            "OTEL_EXPORTER_OTLP_ENDPOINT", problems(OTEL_EXPORTER_OTLP_ENDPOINT="collector:4318")[0]
        )


class SamplerTests(SynchronousTestCase):
    SAMPLED = TraceParent(1, 2, 1)
    UNSAMPLED = TraceParent(1, 2, 0)

    def test_ratio(self) -> None:
        """traceidratio keeps about that share of random trace ids, the same ids every time."""
        rng = random.Random(7)
        ids = [rng.getrandbits(128) for _ in range(20000)]
        quarter = makeSampler(SamplerConfig("traceidratio", 0.25))
        kept = [i for i in ids if quarter(i, None)]
        self.assertLess(abs(len(kept) / len(ids) - 0.25), 0.02)
        self.assertEqual(kept, [i for i in ids if quarter(i, None)])
        self.assertFalse(any(makeSampler(SamplerConfig("traceidratio", 0.0))(i, None) for i in ids))
        self.assertTrue(all(makeSampler(SamplerConfig("traceidratio", 1.0))(i, None) for i in ids))

    def test_parentBased(self) -> None:
        """parentbased_* follow the caller's sampled flag; the others ignore it."""
        for kind in ("parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio"):
            sampled = makeSampler(SamplerConfig(kind, 0.0))
            self.assertTrue(sampled(1, self.SAMPLED), kind)
            self.assertFalse(sampled(1, self.UNSAMPLED), kind)
        self.assertTrue(makeSampler(SamplerConfig("always_on"))(1, self.UNSAMPLED))
        self.assertFalse(makeSampler(SamplerConfig("always_off"))(1, self.SAMPLED))
        self.assertFalse(makeSampler(SamplerConfig("parentbased_always_off"))(1, None))


class EnvironmentGatewayTests(GatewayTestCase):
    """A gateway configured for export by OTEL_* variables only, sampling new traces at 0."""

    def setUp(self) -> Any:
        self.receiver = OTLPReceiver().start()
        self.addCleanup(self.receiver.stop)
        self.environ = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.receiver.port}",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s%20ecret",
            "OTEL_SERVICE_NAME": "env-svc",
            "OTEL_RESOURCE_ATTRIBUTES": "team=ai",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
        }
        return super().setUp()

    def startGateway(self, text: str) -> Deferred[None]:
        config = config_from_string(text, source="test.yaml", base_dir=self.tmp, environ=self.environ)
        self.service = makeService({"config": None, "loaded": config}, reactor)
        self.service.startService()
        self.port = portOf(self.service.port)
        self.addCleanup(self._stopGateway)
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    @inlineCallbacks
    def test_sampledByTheEnvironment(self) -> Any:
        """
        A new trace is not sampled (ratio 0): no span, and the upstream's traceparent says so;
        a caller's sampled trace is exported with the variables' headers, service and resource;
        a caller's unsampled one is not.
        """
        body = rpc("tools/call", {"name": "echo", "arguments": {}})
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0"
        for flags in (None, "1", "0"):
            headers = {} if flags is None else {"traceparent": parent + flags}
            reply = yield self.call(body=body, headers=headers)
            self.assertEqual(reply.status, 200)
        sent = [seen.header("traceparent")[0][-2:] for seen in self.upstream.seen]
        self.assertEqual(sent, ["00", "01", "00"])
        yield self.service.telemetry.flush()
        spans = self.receiver.spans
        self.assertEqual([s["trace_id"] for s in spans], [parent[3:35]])
        self.assertEqual(spans[0]["resource"]["service.name"], "env-svc")
        self.assertEqual(spans[0]["resource"]["team"], "ai")
        self.assertEqual(self.receiver.posts[0][0]["x-api-key"], "s ecret")
        self.assertEqual(self.service.telemetry.tracer.unsampled, 2)
