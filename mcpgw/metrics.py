# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics for the whole host, served on C{listen.admin} (L{mcpgw.admin}).

Where the numbers come from:

  - B{Requests} (counts by upstream, method, decision and status; the duration histogram;
    upstream errors; policy rate-limit refusals) are counted from the audit line of each request,
    by the process that owns the host's audit file (L{MeteredAuditLog}): the gateway itself with
    C{workers: 1}, the supervisor with more. So C{/metrics} and the audit file always agree, and
    a worker killed with SIGKILL loses no request it had answered from either. Nothing is counted
    on the request path when C{listen.admin} is not configured.
  - B{Process} state (in-flight requests, connections, upstream pools, the auth cache, the input
    limit, span export) is read from each serving process when C{/metrics} is scraped
    (L{ProcessMetrics}); the supervisor asks every worker for its samples and adds them up.
    Counters of a worker that exited are kept (its last answer), so host counters never go
    backwards.
  - B{Host} state (audit lines, sinks, workers, the config generation) is read by the owner of
    the audit file (L{HostMetrics}).

Every metric family is declared once, in L{FAMILIES} (name, type, help). A sample is a tuple
C{(sampleName, labels, value)}, C{labels} a tuple of C{(name, value)} pairs; samples from several
processes are added up by C{(sampleName, labels)} (L{addUp}) and rendered in the Prometheus text
format by prometheus-client (L{render}).

B{Adding a source} (e.g. the Redis state backend): declare its families in L{FAMILIES} (the
C{mcpgw_redis_*} names are reserved below), write a callable returning its samples, and append
it to L{ProcessMetrics.sources} where the backend is built (each worker then reports it, the
supervisor adds it up). A latency histogram can use L{Histogram}.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from zope.interface import implementer

from mcpgw import __version__
from mcpgw.interfaces import IAuditLog

#: A sample: C{(sampleName, ((label, value), ...), value)}.
Sample = tuple[str, tuple[tuple[str, str], ...], float]

#: Every family: name -> (type, help). Counters' samples end in C{_total}; histograms' in
#: C{_bucket}, C{_sum}, C{_count}.
FAMILIES: dict[str, tuple[str, str]] = {
    # requests (from the audit lines)
    "mcpgw_requests": (
        "counter",
        "HTTP requests on MCP paths, by upstream, JSON-RPC method, policy decision and status.",
    ),
    "mcpgw_request_duration_seconds": (
        "histogram",
        "Time from the request's arrival to its end, by upstream.",
    ),
    "mcpgw_upstream_errors": (
        "counter",
        "Requests that failed at the upstream: kind connect (unreachable), timeout (no answer "
        "in time), bad_response (broken HTTP), reset (died mid-answer).",
    ),
    "mcpgw_rate_limited": (
        "counter",
        "Requests refused with 429: scope policy (by rule), input (per-address input limit).",
    ),
    # per process, added up
    "mcpgw_requests_in_flight": ("gauge", "Requests being handled."),
    "mcpgw_client_connections": ("gauge", "Open client connections."),
    "mcpgw_upstream_connections": (
        "gauge",
        "Connections to each upstream: state idle (kept alive in the pool) or busy.",
    ),
    "mcpgw_auth_cache": (
        "counter",
        "API key checks answered from the verification cache (hit) or verified with Argon2 (miss).",
    ),
    "mcpgw_auth_throttled": (
        "counter",
        "API key checks refused with 429 before any Argon2 work (brute-force throttle).",
    ),
    "mcpgw_spans_exported": ("counter", "Spans the OTLP endpoint accepted."),
    "mcpgw_spans_dropped": ("counter", "Spans dropped because the export queue was full."),
    "mcpgw_spans_failed": ("counter", "Spans of batches that could not be delivered."),
    # Reserved for the Redis state backend (state.backend: redis), reported per process:
    "mcpgw_redis_latency_seconds": ("histogram", "Redis round trips of the state backend."),
    "mcpgw_redis_errors": (
        "counter",
        "Redis calls that failed or timed out, by kind (lease: a background prefetch or "
        "give-back of a lease, which decides no call).",
    ),
    "mcpgw_redis_leased": (
        "counter",
        "Rate-limited takes allowed from a lease's spare tokens, without a Redis round trip.",
    ),
    "mcpgw_redis_up": ("gauge", "1 while the state backend's Redis connection is usable."),
    # host (the owner of the audit file)
    "mcpgw_audit_lines_written": ("counter", "Lines appended to the canonical audit file."),
    "mcpgw_audit_lines_failed": (
        "counter",
        "Audit lines lost: dropped (the in-memory backlog overflowed while the file could not be "
        "written) or torn (a worker died in the middle of handing a line over).",
    ),
    "mcpgw_audit_lines_pending": (
        "gauge",
        "Audit lines kept in memory because the file cannot be written (e.g. a full disk).",
    ),
    "mcpgw_sink_lag_lines": ("gauge", "Lines of the audit file a sink has not shipped yet."),
    "mcpgw_sink_lag_bytes": ("gauge", "Bytes of the audit file a sink has not shipped yet."),
    "mcpgw_sink_shipped_lines": ("counter", "Lines a sink acknowledged since the start."),
    "mcpgw_sink_state": ("gauge", "1 for each sink's current state (running, retrying, ...)."),
    "mcpgw_workers": ("gauge", "Worker processes: configured, and alive (serving)."),
    "mcpgw_worker_restarts": ("counter", "Worker processes that ended and were replaced."),
    "mcpgw_config_generation": ("gauge", "The config generation being served."),
    "mcpgw_build_info": ("gauge", "Always 1; the labels name the mcpgw version."),
}

#: Kinds of C{mcpgw_upstream_errors}, by the audit line's C{error}.
UPSTREAM_ERRORS = {
    "upstream_unavailable": "connect",
    "upstream_timeout": "timeout",
    "upstream_bad_response": "bad_response",
    "upstream_reset": "reset",
}

#: C{le} bounds (seconds) of C{mcpgw_request_duration_seconds}.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
)  # fmt: skip

#: JSON-RPC methods counted by name; any other method is counted as C{other} (a client chooses
#: the method, and a label must not take unbounded values).
KNOWN_METHODS = frozenset(
    {
        "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read",
        "resources/templates/list", "resources/subscribe", "resources/unsubscribe",
        "prompts/list", "prompts/get", "completion/complete", "logging/setLevel",
        "server/discover", "subscriptions/listen", "notifications/initialized",
        "notifications/cancelled", "notifications/progress", "notifications/roots/list_changed",
        "notifications/subscriptions/acknowledged",
    }
)  # fmt: skip

#: Family types whose samples are kept from processes that ended (they only grow).
MONOTONIC = frozenset({"counter", "histogram"})


def familyOf(sampleName: str) -> str:
    """The family a sample name belongs to (C{mcpgw_requests_total} -> C{mcpgw_requests})."""
    if sampleName in FAMILIES:
        return sampleName
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sampleName.endswith(suffix) and sampleName[: -len(suffix)] in FAMILIES:
            return sampleName[: -len(suffix)]
    raise KeyError(sampleName)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Histogram:
    """Bucket counts, sum and count of one labelled histogram series (cheap to observe)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self, name: str, labels: tuple[tuple[str, str], ...]) -> Iterator[Sample]:
        """Cumulative C{_bucket} samples, C{_sum} and C{_count}."""
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            yield (f"{name}_bucket", (*labels, ("le", _le(bound))), float(total))
        yield (f"{name}_sum", labels, self.sum)
        yield (f"{name}_count", labels, float(total))


class RequestMetrics:
    """Request counts, durations and refusals, from audit lines (L{observe})."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.upstreamErrors: dict[tuple[str, str], int] = {}
        self.policyRefusals: dict[str, int] = {}

    def observe(self, line: dict[str, Any]) -> None:
        """Count one request by its audit line."""
        upstream = line.get("upstream") or "none"
        method = line.get("method")
        if method is None:
            method = "none"
        elif method not in KNOWN_METHODS:
            method = "other"
        decision = line.get("decision") or "none"
        status = line.get("status")
        key = (upstream, method, decision, "none" if status is None else str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.durations.get(upstream)
        if h is None:
            h = self.durations[upstream] = Histogram()
        h.observe((line.get("duration_ms") or 0.0) / 1000.0)
        error = line.get("error")
        if error is not None:
            kind = UPSTREAM_ERRORS.get(error)
            if kind is not None:
                ek = (upstream, kind)
                self.upstreamErrors[ek] = self.upstreamErrors.get(ek, 0) + 1
        if decision == "rate_limit":
            rule = line.get("rule_id") or "none"
            self.policyRefusals[rule] = self.policyRefusals.get(rule, 0) + 1

    def samples(self) -> Iterator[Sample]:
        for (upstream, method, decision, status), n in self.requests.items():
            labels = (
                ("upstream", upstream),
                ("method", method),
                ("decision", decision),
                ("status", status),
            )
            yield ("mcpgw_requests_total", labels, float(n))
        for upstream, h in self.durations.items():
            yield from h.samples("mcpgw_request_duration_seconds", (("upstream", upstream),))
        for (upstream, kind), n in self.upstreamErrors.items():
            yield ("mcpgw_upstream_errors_total", (("upstream", upstream), ("kind", kind)), n)
        for rule, n in self.policyRefusals.items():
            yield ("mcpgw_rate_limited_total", (("scope", "policy"), ("rule", rule)), float(n))


@implementer(IAuditLog)
class MeteredAuditLog:
    """
    The host's audit log, counting every line it is handed in L{RequestMetrics} after writing it.
    Used only when C{listen.admin} is configured.
    """

    def __init__(self, log: Any, requests: RequestMetrics) -> None:
        self.log = log
        self.requests = requests

    @property
    def linesWritten(self) -> int:
        return int(self.log.linesWritten)

    @property
    def failing(self) -> bool:
        return bool(self.log.failing)

    @property
    def durable(self) -> bool:
        return bool(self.log.durable)

    def open(self) -> None:
        self.log.open()

    def write(self, record: dict[str, Any]) -> Any:
        synced = self.log.write(record)
        self.requests.observe(record)
        return synced

    def reopen(self) -> None:
        self.log.reopen()

    def close(self) -> Any:
        return self.log.close()


class ProcessMetrics:
    """
    The samples of one serving process (the gateway, or one worker).

    @ivar sources: callables returning samples, called at every scrape.
    """

    def __init__(self, gateway: Any, telemetry: Any) -> None:
        self.gateway = gateway
        self.telemetry = telemetry
        self._exporters: list[Any] = []
        self.sources: list[Callable[[], Iterable[Sample]]] = [self._gatewaySamples]
        if telemetry is not None:
            self.sources.append(self._spanSamples)

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        for source in self.sources:
            out.extend(source())
        return out

    def _gatewaySamples(self) -> Iterator[Sample]:
        gateway = self.gateway
        yield ("mcpgw_requests_in_flight", (), float(len(gateway.inflight)))
        yield ("mcpgw_client_connections", (), float(len(gateway.connections)))
        generation = gateway.generation
        for route in generation.routes.values():
            pool = route.pool
            idle = float(pool.idleCount)
            busy = float(pool.connectionCount) - idle
            yield (
                "mcpgw_upstream_connections",
                (("upstream", route.name), ("state", "idle")),
                idle,
            )
            yield (
                "mcpgw_upstream_connections",
                (("upstream", route.name), ("state", "busy")),
                busy,
            )
        stats = generation.auth.stats
        yield ("mcpgw_auth_cache_total", (("result", "hit"),), float(stats.hits))
        yield ("mcpgw_auth_cache_total", (("result", "miss"),), float(stats.misses))
        yield ("mcpgw_auth_throttled_total", (), float(stats.throttled))
        refused = float(gateway.admission.inputRefused)
        yield ("mcpgw_rate_limited_total", (("scope", "input"), ("rule", "none")), refused)

    def _spanSamples(self) -> Iterator[Sample]:
        tracer = self.telemetry.tracer
        if tracer is not None and not any(e is tracer.exporter for e in self._exporters):
            # Exporters replaced by a reload keep counting while they flush: remember them all.
            self._exporters.append(tracer.exporter)
        for name in ("exported", "dropped", "failed"):
            total = sum(getattr(e, name) for e in self._exporters)
            yield (f"mcpgw_spans_{name}_total", (), float(total))


def redisSamples(stats: Any) -> Iterator[Sample]:
    """
    The samples of the Redis state backend (L{mcpgw.redisstate.RedisStats}): whether it is up
    (added up over the workers: how many are connected), failed calls by kind, takes allowed
    from leases and the round-trip histogram.
    """
    from mcpgw.redisstate import LATENCY_BOUNDS

    yield ("mcpgw_redis_up", (), 1.0 if stats.connected else 0.0)
    for kind, n in (
        ("error", stats.errors),
        ("timeout", stats.timeouts),
        ("unavailable", stats.unavailable),
        ("lease", stats.leaseErrors),
    ):
        yield ("mcpgw_redis_errors_total", (("kind", kind),), float(n))
    yield ("mcpgw_redis_leased_total", (), float(stats.leased))
    total = 0
    for bound, n in zip((*LATENCY_BOUNDS, float("inf")), stats.latencyCounts, strict=True):
        total += n
        yield ("mcpgw_redis_latency_seconds_bucket", (("le", _le(bound)),), float(total))
    yield ("mcpgw_redis_latency_seconds_sum", (), float(stats.latencySum))
    yield ("mcpgw_redis_latency_seconds_count", (), float(total))


class HostMetrics:
    """
    The samples of the owner of the host's audit file: requests (from the audit lines), the audit
    file, the sinks, the workers and the config generation.

    @ivar workers: returns C{(configured, alive, restarts)}.
    """

    def __init__(
        self,
        requests: RequestMetrics,
        writer: Any,
        shipping: Any,
        generation: Callable[[], int],
        workers: Callable[[], tuple[int, int, int]] = lambda: (1, 1, 0),
    ) -> None:
        self.requests = requests
        self.writer = writer
        self.shipping = shipping
        self.generation = generation
        self.workers = workers
        #: Audit lines lost in transit from workers (a worker died mid-line).
        self.tornLines = 0

    def samples(self) -> list[Sample]:
        out = list(self.requests.samples())
        w = self.writer
        out.append(("mcpgw_audit_lines_written_total", (), float(w.linesWritten)))
        out.append(
            ("mcpgw_audit_lines_failed_total", (("reason", "dropped"),), float(w.linesDropped))
        )
        out.append(("mcpgw_audit_lines_failed_total", (("reason", "torn"),), self.tornLines))
        out.append(("mcpgw_audit_lines_pending", (), float(len(getattr(w, "_backlog", ())))))
        for name, shipper in sorted(self.shipping.shippers.items()):
            sink = (("sink", name),)
            lines, size = shipper.lag()
            out.append(("mcpgw_sink_lag_lines", sink, float(lines)))
            out.append(("mcpgw_sink_lag_bytes", sink, float(size)))
            out.append(("mcpgw_sink_shipped_lines_total", sink, float(shipper.shippedLines)))
            out.append(("mcpgw_sink_state", (*sink, ("state", shipper.state)), 1.0))
        configured, alive, restarts = self.workers()
        out.append(("mcpgw_workers", (("state", "configured"),), float(configured)))
        out.append(("mcpgw_workers", (("state", "alive"),), float(alive)))
        out.append(("mcpgw_worker_restarts_total", (), float(restarts)))
        out.append(("mcpgw_config_generation", (), float(self.generation())))
        out.append(("mcpgw_build_info", (("version", __version__),), 1.0))
        return out


def addUp(*groups: Iterable[Sample]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples added up by C{(sampleName, labels)}."""
    total: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for group in groups:
        for name, labels, value in group:
            key = (name, labels)
            total[key] = total.get(key, 0.0) + value
        # (a histogram added up bucket by bucket is the histogram of the union)
    return total


def monotonic(samples: Iterable[Sample]) -> list[Sample]:
    """The counter and histogram samples of C{samples} (what is kept of an ended worker)."""
    return [s for s in samples if FAMILIES[familyOf(s[0])][0] in MONOTONIC]


def toWire(samples: Iterable[Sample]) -> list[list[Any]]:
    """Samples as JSON-able lists (worker -> supervisor)."""
    return [[name, [list(p) for p in labels], value] for name, labels, value in samples]


def fromWire(data: Iterable[Sequence[Any]]) -> list[Sample]:
    """The inverse of L{toWire} (unknown families are left out)."""
    out: list[Sample] = []
    for name, labels, value in data:
        try:
            familyOf(name)
        except KeyError:
            continue
        out.append((str(name), tuple((str(k), str(v)) for k, v in labels), float(value)))
    return out


def render(total: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of added-up samples."""
    from prometheus_client.core import Metric
    from prometheus_client.exposition import generate_latest

    families: dict[str, Metric] = {}
    for (name, labels), value in total.items():
        family = familyOf(name)
        metric = families.get(family)
        if metric is None:
            kind, text = FAMILIES[family]
            metric = families[family] = Metric(family, text, kind)
        metric.add_sample(name, dict(labels), value)

    class _Collector:
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    return bytes(generate_latest(_Collector()))


#: The C{Content-Type} of L{render}'s output.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
