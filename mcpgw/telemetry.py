# -*- test-case-name: tests.test_telemetry -*-
"""
One OpenTelemetry SERVER span per request on an MCP path, exported over OTLP/HTTP protobuf
(usually to the Datadog Agent on the same host), and W3C trace-context propagation.

Cost model (the reason this does not use the OpenTelemetry SDK's span objects; see
C{docs/datadog.md} and C{bench/telemetry_bench.py} for the figures):

  - On the reactor thread, per request: the trace context (ids only), the upstream
    C{traceparent} header, and at the end one tuple of the exchange's values appended to a
    bounded deque (L{SpanExporter.submit}, never blocking; when the deque is full the oldest
    record is dropped and counted).
  - On the exporter's own thread: every L{SpanExporter.interval} seconds, or as soon as
    L{SpanExporter.batchSize} records wait, the records are turned into an OTLP
    C{ExportTraceServiceRequest} by L{mcpgw.otlp} and POSTed with C{http.client} (retries with
    backoff on 429/502/503/504 and connection errors, honouring C{Retry-After}, within a deadline;
    a batch that still fails is dropped and counted). Drops are logged, at most every
    L{REPORT_INTERVAL} seconds.
  - Without C{telemetry.otlp_endpoint} there is no exporter and no span: a request only gets the
    two ids its audit line carries (C{trace_id}, C{span_id}), and the gateway forwards trace
    context untouched.

Trace context (SEP-414 and W3C Trace Context): the parent is C{params._meta.traceparent} of the
request body, else the HTTP C{traceparent} header; when both are valid and differ, the span links
the header's context. With tracing on, the upstream request carries the gateway span's context in
C{traceparent}/C{tracestate} (the client's headers of those names are replaced) and, only when the
body already had C{params._meta.traceparent}, in those C{_meta} keys too (other keys untouched;
the body is then re-serialised). A body without trace context is forwarded byte for byte.

Sampling (C{telemetry.sampler} or C{OTEL_TRACES_SAMPLER}/C{_ARG}; L{makeSampler}): the
OpenTelemetry samplers C{always_on}, C{always_off}, C{traceidratio} and their C{parentbased_}
forms; the default, C{parentbased_always_on}, honours a caller's C{traceparent} whose sampled flag
is off. The decision is a pure function of the trace id and the parent's flag, so it is the same
when the upstream request's C{traceparent} is written (its sampled flag says it) and when the
span is (or is not) queued. An unsampled request is still traced for propagation and its audit
line carries its ids; only its span is not exported (about 5 µs instead of about 90 µs of CPU).
"""

from __future__ import annotations

import http.client
import os
import random
import re
import ssl
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcpgw import __version__, errors, otlp
from mcpgw.config import SamplerConfig, TelemetryConfig, split_url
from mcpgw.interfaces import ITracer
from mcpgw.record import (
    R_AUTH_KEY,
    R_AUTH_RESULT,
    R_BATCH,
    R_BYTES_IN,
    R_BYTES_OUT,
    R_CLIENT_IP,
    R_DECISION,
    R_END,
    R_ERROR,
    R_FILTERED,
    R_HTTP_METHOD,
    R_JSONRPC_ID,
    R_LINK,
    R_METHOD,
    R_PARENT,
    R_PATH,
    R_PRINCIPAL,
    R_PROTOCOL,
    R_REDACTED,
    R_REDACTED_RESULTS,
    R_REQUEST_ID,
    R_RULE,
    R_SECURE,
    R_SESSION,
    R_SPAN,
    R_START,
    R_STATUS,
    R_TARGET,
    R_TOOL,
    R_TOOL_PIN,
    R_TRACE,
    R_UPSTREAM,
    RequestRecord,
)

log = Logger()

#: Default OTLP/HTTP traces endpoint of a local Datadog Agent (or any collector).
DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
#: Datadog's operation name for every mcpgw span (C{operation.name}).
OPERATION_NAME = "mcp.server.request"
#: Seconds between drop/failure log lines at most.
REPORT_INTERVAL = 30.0

# -- ids and trace context --------------------------------------------------------------------

# ids need to be unique, not secret (the OTel SDK uses random.getrandbits too)
_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)
#: C{randomBits(k)}: k random bits, for new trace (128) and span (64) ids; callers map 0
#: (probability 2**-64 or less) to 1, as W3C forbids zero ids.
randomBits: Callable[[int], int] = _rng.getrandbits

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACESTATE = re.compile(r"[\x20-\x7e]{0,512}")
#: The request headers the gateway replaces with its own span context (tracing on).
TRACE_HEADERS = frozenset((b"traceparent", b"tracestate"))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TraceParent:
    """
    A valid W3C trace context received with a request.

    @ivar traceId: 128-bit trace id (non-zero).
    @ivar spanId: the caller's 64-bit span id (non-zero): the parent of the gateway's span.
    @ivar flags: the W3C trace flags (bit 0: sampled).
    @ivar traceState: the W3C C{tracestate} received with it, or C{None}.
    """

    traceId: int
    spanId: int
    flags: int
    traceState: str | None = None


def parseTraceparent(value: str, traceState: str | None = None) -> TraceParent | None:
    """
    Parse a W3C C{traceparent} value.

    @param traceState: the C{tracestate} that came with it; kept only if it is printable ASCII
        of at most 512 characters (so it is safe to put in a header).
    @return: the context, or C{None} if C{value} is not a valid C{traceparent}.
    """
    m = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    traceId, spanId = int(trace, 16), int(span, 16)
    if not traceId or not spanId:
        return None
    if traceState is not None:
        traceState = traceState.strip(" \t")
        if not traceState or _TRACESTATE.fullmatch(traceState) is None:
            traceState = None
    return TraceParent(traceId, spanId, int(flags, 16), traceState)


def headerContext(traceparent: list[bytes], tracestate: list[bytes] | None) -> TraceParent | None:
    """
    The trace context of a request's HTTP headers.

    @param traceparent: the raw C{traceparent} header values (the first is used).
    @param tracestate: the raw C{tracestate} header values (joined with commas), or C{None}.
    """
    state = b",".join(tracestate).decode("latin-1") if tracestate else None
    return parseTraceparent(traceparent[0].decode("latin-1"), state)


def metaContext(messages: Sequence[dict[str, Any]]) -> tuple[Any, Any] | None:
    """
    SEP-414: the C{params._meta} trace context of a request body.

    @param messages: the parsed JSON-RPC messages.
    @return: C{(traceparent, tracestate)} of the first message whose C{params._meta} has a
        C{traceparent} key (values as found, possibly not strings), or C{None}.
    """
    for msg in messages:
        params = msg.get("params")
        if type(params) is dict:
            meta = params.get("_meta")
            if type(meta) is dict and "traceparent" in meta:
                return meta["traceparent"], meta.get("tracestate")
    return None


def useMetaContext(x: Any, traceparent: Any, tracestate: Any) -> None:
    """
    Make the body's C{_meta} context the parent of exchange C{x}'s span; the header context,
    if it is valid and different, becomes a link.
    """
    x.metaTrace = True
    if not isinstance(traceparent, str):
        return
    ctx = parseTraceparent(traceparent, tracestate if isinstance(tracestate, str) else None)
    if ctx is None:
        return
    header = x.parent
    if header is not None and (header.traceId, header.spanId) != (ctx.traceId, ctx.spanId):
        x.link = header
    x.parent = ctx
    x.traceId = ctx.traceId


def traceparentOf(x: Any) -> bytes:
    """
    The C{traceparent} value that carries exchange C{x}'s span to the upstream; its sampled
    flag is C{x.sampled} (the tracer's decision).
    """
    return b"00-%032x-%016x-%02x" % (
        x.traceId,
        x.spanId,
        otlp.FLAG_SAMPLED if x.sampled else 0,
    )


#: Trace ids are compared to the ratio on their low 64 bits (as the OpenTelemetry SDKs do).
_RATIO_MASK = (1 << 64) - 1


def makeSampler(config: SamplerConfig) -> Callable[[int, TraceParent | None], bool]:
    """
    The sampling decision of C{config}: a function of the trace id and the caller's context
    (C{None} for a new trace) returning whether the span is recorded and exported.

    C{traceidratio}: the trace is kept when its id's low 64 bits are below C{ratio * 2**64}, so
    every service using the same rule keeps the same traces. C{parentbased_X}: a caller's
    sampled flag decides; a new trace is decided by C{X}.
    """
    kind = config.type
    root = kind.removeprefix("parentbased_")
    decide: Callable[[int], bool]
    if root == "always_on":
        decide = _always
    elif root == "always_off":
        decide = _never
    else:
        bound = round(config.ratio * (_RATIO_MASK + 1))

        def decide(traceId: int) -> bool:
            return (traceId & _RATIO_MASK) < bound

    if kind == root:
        return lambda traceId, parent: decide(traceId)

    def parentBased(traceId: int, parent: TraceParent | None) -> bool:
        if parent is None:
            return decide(traceId)
        return bool(parent.flags & otlp.FLAG_SAMPLED)

    return parentBased


def _always(traceId: int) -> bool:
    return True


def _never(traceId: int) -> bool:
    return False


def injectMeta(messages: Sequence[dict[str, Any]], x: Any) -> None:
    """
    Replace C{traceparent}/C{tracestate} in every C{params._meta} that has a C{traceparent},
    with exchange C{x}'s span context. Other C{_meta} keys (C{baggage} too) are left alone.
    """
    value = traceparentOf(x).decode("ascii")
    parent = x.parent
    state = parent.traceState if parent is not None else None
    for msg in messages:
        params = msg.get("params")
        if type(params) is dict:
            meta = params.get("_meta")
            if type(meta) is dict and "traceparent" in meta:
                meta["traceparent"] = value
                if state is not None:
                    meta["tracestate"] = state
                else:
                    meta.pop("tracestate", None)


# -- the span of an exchange ------------------------------------------------------------------

#: Methods whose target the span names (prompts) or records (resources), per the MCP conventions.
TARGET_METHODS = frozenset(
    {"prompts/get", "resources/read", "resources/subscribe", "resources/unsubscribe"}
)


def targetOf(messages: Sequence[dict[str, Any]], method: str) -> str | None:
    """
    The target of the first C{method} request of a body: C{params.name} of a C{prompts/get},
    C{params.uri} of a C{resources/*} request.
    """
    key = "name" if method == "prompts/get" else "uri"
    for msg in messages:
        if msg.get("method") == method:
            params = msg.get("params")
            value = params.get(key) if type(params) is dict else None
            return value if isinstance(value, str) else None
    return None


def _key(name: str) -> otlp.AttributeKey:
    return otlp.AttributeKey(name)


A_RESOURCE_NAME = _key("resource.name")
A_OPERATION_NAME = _key("operation.name")
A_REQUEST_ID = _key("request_id")
A_METHOD = _key("mcp.method.name")
A_TOOL = _key("mcp.tool.name")
A_PROMPT = _key("gen_ai.prompt.name")
A_RESOURCE_URI = _key("mcp.resource.uri")
A_GENAI_TOOL = _key("gen_ai.tool.name")
A_GENAI_OPERATION = _key("gen_ai.operation.name")
A_JSONRPC_ID = _key("jsonrpc.request.id")
A_PROTOCOL = _key("mcp.protocol.version")
A_SESSION = _key("mcp.session.id")
A_DECISION = _key("mcp.policy.decision")
A_RULE = _key("mcp.policy.rule_id")
A_UPSTREAM = _key("mcp.upstream")
A_BYTES_IN = _key("mcp.payload.bytes_in")
A_BYTES_OUT = _key("mcp.payload.bytes_out")
A_AUTH_KEY = _key("mcp.auth.key_id")
A_AUTH_RESULT = _key("mcp.auth.result")
A_ERROR_KIND = _key("mcp.error.kind")
A_REDACTED = _key("mcp.policy.redacted")
A_REDACTED_RESULTS = _key("mcp.policy.redacted_results")
#: Tool pinning's verdict (C{new} or C{changed}; absent when approved or pinning is off).
A_TOOL_PIN = _key("mcp.tool.pin")
#: The caller policy saw (key id, certificate, external or OAuth identity): OpenTelemetry's
#: C{enduser.id} ("a username, email address, or other identifier").
A_PRINCIPAL = _key("enduser.id")
A_FILTERED = _key("mcp.tools.filtered")
A_BATCH = _key("jsonrpc.batch.size")
A_ERROR_TYPE = _key("error.type")
A_RPC_STATUS = _key("rpc.response.status_code")
A_HTTP_METHOD = _key("http.request.method")
A_HTTP_STATUS = _key("http.response.status_code")
A_URL_PATH = _key("url.path")
A_URL_SCHEME = _key("url.scheme")
A_CLIENT = _key("client.address")

_OPERATION = A_OPERATION_NAME.string(OPERATION_NAME)
_EXECUTE_TOOL = A_GENAI_OPERATION.string("execute_tool")
_CONSTANT = (
    _key("network.protocol.name").string("http")
    + _key("network.transport").string("tcp")
    + _OPERATION
)
_SCHEMES = {False: A_URL_SCHEME.string("http"), True: A_URL_SCHEME.string("https")}

#: The JSON-RPC code of each gateway error name (the audit line's C{error}).
ERROR_CODES: dict[str, int] = {}


def _collectCodes(cls: type[errors.GatewayError]) -> None:
    for sub in cls.__subclasses__():
        ERROR_CODES.setdefault(sub.auditName or sub.message, sub.code)
        _collectCodes(sub)


_collectCodes(errors.GatewayError)
ERROR_CODES.setdefault(errors.GatewayError.message, errors.GatewayError.code)

#: Errors that are the gateway's or the upstream's failure (span status ERROR) even though the
#: HTTP status the client saw is not a 5xx (the response had started).
_SERVER_FAULTS = frozenset({"upstream_reset", "upstream_bad_response", "internal_error"})
#: Outcomes that leave the span's status UNSET although the gateway answered with an error:
#: the gateway working as intended (policy and auth refusals, client mistakes, client gone).
_AUTH_FAILED = frozenset({"missing", "invalid"})


def spanName(rec: Sequence[Any]) -> str:
    """
    The span name (also Datadog's resource name): C{"{mcp.method.name} {target}"} where the
    target is the tool of a C{tools/call} or the prompt of a C{prompts/get}, else the method
    alone (a resource URI is an attribute, never part of the name); C{"{HTTP method} {path}"}
    for a request without a JSON-RPC method on an MCP path (GET, DELETE, a POST of responses)
    and for one refused before or by authentication (so unauthenticated callers cannot mint
    resource names); the HTTP method alone off the MCP paths.
    """
    method = rec[R_METHOD]
    http = rec[R_HTTP_METHOD].decode("latin-1")
    if rec[R_UPSTREAM] is None:
        return http
    auth = rec[R_AUTH_RESULT]
    if method is not None and auth is not None and auth not in _AUTH_FAILED:
        if method == "tools/call":
            target = rec[R_TOOL]
        elif method == "prompts/get":
            target = rec[R_TARGET]
        else:
            return str(method)
        return f"{method} {target}" if target is not None else str(method)
    return f"{http} {rec[R_PATH].decode('latin-1')}"


#: Encoded static parts of spans (see L{encodeSpan}), by the values they are made of.
_STATIC: dict[tuple[Any, ...], bytes] = {}
#: Entries kept at most in L{_STATIC} (then it starts over).
STATIC_CACHE_SIZE = 4096


def _staticKey(rec: Sequence[Any]) -> tuple[Any, ...]:
    return (
        rec[R_METHOD],
        rec[R_TOOL],
        rec[R_HTTP_METHOD],
        rec[R_PATH],
        rec[R_UPSTREAM],
        rec[R_DECISION],
        rec[R_RULE],
        rec[R_AUTH_RESULT],
        rec[R_AUTH_KEY],
        rec[R_PROTOCOL],
        rec[R_STATUS],
        rec[R_ERROR],
        rec[R_CLIENT_IP],
        rec[R_SECURE],
        rec[R_TARGET] if rec[R_METHOD] == "prompts/get" else None,
        rec[R_PRINCIPAL],
    )


def _staticFields(rec: Sequence[Any]) -> bytes:
    """
    The span's name, status and the attributes that many spans share (method, tool, policy,
    auth, HTTP, client, error), encoded as one run of fields.

    Status: ERROR, with C{error.type}, when the request failed on the gateway's or upstream's
    side: a 5xx status (the gateway's own, e.g. 502/504, or relayed from the upstream), an
    upstream reset mid-response, an internal error. Policy refusals (deny, rate_limit), auth
    failures, other 4xx and clients that left are UNSET: the gateway did its job; they carry
    C{mcp.policy.decision}, C{mcp.error.kind} and C{rpc.response.status_code} instead.
    """
    name = spanName(rec)
    a = [otlp.nameField(name), A_RESOURCE_NAME.string(name), _CONSTANT]
    add = a.append
    method = rec[R_METHOD]
    if method is not None:
        add(A_METHOD.string(method))
        if method == "tools/call":
            add(_EXECUTE_TOOL)
    tool = rec[R_TOOL]
    if tool is not None:
        add(A_TOOL.string(tool))
        add(A_GENAI_TOOL.string(tool))
    if method == "prompts/get" and rec[R_TARGET] is not None:
        add(A_PROMPT.string(rec[R_TARGET]))
    if rec[R_PROTOCOL] is not None:
        add(A_PROTOCOL.string(rec[R_PROTOCOL]))
    add(A_DECISION.string(rec[R_DECISION]))
    if rec[R_RULE] is not None:
        add(A_RULE.string(rec[R_RULE]))
    if rec[R_UPSTREAM] is not None:
        add(A_UPSTREAM.string(rec[R_UPSTREAM]))
    if rec[R_AUTH_KEY] is not None:
        add(A_AUTH_KEY.string(rec[R_AUTH_KEY]))
    if rec[R_AUTH_RESULT] is not None:
        add(A_AUTH_RESULT.string(rec[R_AUTH_RESULT]))
    if rec[R_PRINCIPAL] is not None:
        add(A_PRINCIPAL.string(rec[R_PRINCIPAL]))
    add(A_HTTP_METHOD.string(rec[R_HTTP_METHOD].decode("latin-1")))
    add(A_URL_PATH.string(rec[R_PATH].decode("latin-1")))
    add(_SCHEMES[bool(rec[R_SECURE])])
    status = rec[R_STATUS]
    if status is not None:
        add(A_HTTP_STATUS.integer(status))
    if rec[R_CLIENT_IP] is not None:
        add(A_CLIENT.string(rec[R_CLIENT_IP]))
    error = rec[R_ERROR]
    code = ERROR_CODES.get(error) if error is not None else None
    if error is not None:
        add(A_ERROR_KIND.string(error))
        if code is not None:
            add(A_RPC_STATUS.string(str(code)))
    if (status is not None and status >= 500) or error in _SERVER_FAULTS:
        if code is not None:
            errorType, message = str(code), error
        elif error is not None:
            errorType = message = error
        else:
            errorType, message = str(status), f"upstream answered HTTP {status}"
        add(A_ERROR_TYPE.string(errorType))
        add(otlp.statusField(otlp.STATUS_ERROR, message))
    return b"".join(a)


def encodeSpan(rec: Sequence[Any]) -> bytes:
    """
    The OTLP C{Span} (as a C{ScopeSpans.spans} field) of a request's record
    (L{mcpgw.record.RequestRecord}; any tuple with its layout).

    The fields most spans share with others (name, status, method, tool, policy, auth, HTTP,
    client) are encoded once per combination and cached; only ids, times, the request and
    JSON-RPC ids, the session and the byte counts are encoded per span.
    """
    key = _staticKey(rec)
    static = _STATIC.get(key)
    if static is None:
        if len(_STATIC) >= STATIC_CACHE_SIZE:
            _STATIC.clear()
        static = _STATIC[key] = _staticFields(rec)
    fields = [
        static,
        A_REQUEST_ID.string(rec[R_REQUEST_ID]),
        A_BYTES_IN.integer(rec[R_BYTES_IN]),
        A_BYTES_OUT.integer(rec[R_BYTES_OUT]),
    ]
    rid = rec[R_JSONRPC_ID]
    if rid is not None:
        fields.append(A_JSONRPC_ID.string(rid if isinstance(rid, str) else str(rid)))
    if rec[R_SESSION] is not None:
        fields.append(A_SESSION.string(rec[R_SESSION]))
    target = rec[R_TARGET]
    if target is not None and rec[R_METHOD] != "prompts/get":
        fields.append(A_RESOURCE_URI.string(target))
    if rec[R_REDACTED] is not None:
        fields.append(A_REDACTED.integer(rec[R_REDACTED]))
    if rec[R_FILTERED] is not None:
        fields.append(A_FILTERED.integer(rec[R_FILTERED]))
    if rec[R_REDACTED_RESULTS] is not None:
        fields.append(A_REDACTED_RESULTS.integer(rec[R_REDACTED_RESULTS]))
    if rec[R_TOOL_PIN] is not None:
        fields.append(A_TOOL_PIN.string(rec[R_TOOL_PIN]))
    if rec[R_BATCH] is not None:
        fields.append(A_BATCH.integer(rec[R_BATCH]))
    parent = rec[R_PARENT]
    if parent is None:
        parentId, state, flags = 0, None, _ROOT_FLAGS
    else:
        parentId, state = parent.spanId, parent.traceState
        flags = (parent.flags & 0xFF) | _REMOTE_FLAGS
    link = rec[R_LINK]
    links: Sequence[tuple[int, int, str | None, int]] = ()
    if link is not None:
        links = ((link.traceId, link.spanId, link.traceState, (link.flags & 0xFF) | _REMOTE_FLAGS),)
    return otlp.spanFromFields(
        rec[R_TRACE],
        rec[R_SPAN],
        parentId,
        state,
        flags,
        rec[R_START],
        rec[R_END],
        fields,
        links,
    )


_ROOT_FLAGS = otlp.FLAG_SAMPLED | otlp.FLAG_HAS_IS_REMOTE
_REMOTE_FLAGS = otlp.FLAG_HAS_IS_REMOTE | otlp.FLAG_IS_REMOTE


def resourceAttributes(config: TelemetryConfig) -> list[tuple[str, str]]:
    """
    The OTLP resource of this process: Datadog's service, env and version come from here.
    C{telemetry.resource_attributes} (or C{OTEL_RESOURCE_ATTRIBUTES}) come after the gateway's
    own, except where they name the same attribute (then theirs is kept: e.g. a
    C{service.instance.id} of the operator's choosing).
    """
    attrs = [
        ("service.name", config.service_name),
        ("service.version", __version__),
        ("service.instance.id", str(uuid.uuid4())),
        ("telemetry.sdk.name", "mcpgw"),
        ("telemetry.sdk.language", "python"),
        ("telemetry.sdk.version", __version__),
    ]
    if config.environment:
        attrs.insert(2, ("deployment.environment.name", config.environment))
    extra = dict(config.resource_attributes)
    for fixed in ("service.name", "telemetry.sdk.name", "telemetry.sdk.language"):
        extra.pop(fixed, None)
    extra.pop("telemetry.sdk.version", None)
    if config.environment:
        extra.pop("deployment.environment.name", None)
    attrs = [(k, extra.pop(k, v)) for k, v in attrs]
    attrs += extra.items()
    return attrs


# -- the exporter -----------------------------------------------------------------------------


class ExportError(Exception):
    """One attempt to POST a batch failed; C{retryAfter} is the server's hint, if any."""

    def __init__(self, message: str, retryable: bool, retryAfter: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retryAfter = retryAfter


_RETRYABLE = frozenset({429, 502, 503, 504})


class SpanExporter:
    """
    Queues span records from the reactor thread and exports them from a thread of its own.

    @ivar exported: spans the endpoint accepted.
    @ivar dropped: spans dropped because the queue was full.
    @ivar failed: spans of batches that could not be delivered (or that the endpoint rejected).
    @ivar batches: POSTs that succeeded.
    """

    #: Records kept waiting at most (then the oldest are dropped).
    maxQueue = 20_000
    #: Records per POST at most; this many waiting also wakes the thread early.
    batchSize = 512
    #: Seconds between exports when fewer than L{batchSize} records wait.
    interval = 1.0
    #: Seconds one batch may take, retries included.
    timeout = 10.0
    #: Seconds L{stop} gives the final export.
    stopTimeout = 5.0
    #: Spans encoded between two short pauses (L{encodePause} seconds) that leave the GIL to the
    #: reactor thread if it wants it: it then waits for about one chunk (tens of µs), not for a
    #: whole batch or Python's 5 ms switch interval. (C{sleep(0)} is not enough: the export
    #: thread would take the GIL back before the woken reactor thread gets to run.)
    encodeChunk = 16
    encodePause = 20e-6

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        resource: Sequence[tuple[str, str | bool | int | float]],
        *,
        compression: str | None = None,
        encoder: Callable[[Sequence[Any]], bytes] = encodeSpan,
        sleep: Callable[[float], object] = time.sleep,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """
        @param endpoint: the full OTLP/HTTP traces URL (e.g. C{http://localhost:4318/v1/traces}).
        @param headers: added to every export request (C{telemetry.headers},
            C{OTEL_EXPORTER_OTLP_HEADERS}).
        @param compression: C{"gzip"} or C{None}.
        @param encoder: turns a record into an encoded span (L{encodeSpan}).
        """
        self._reactor = reactor
        self.endpoint = endpoint
        scheme, host, port, target = split_url(endpoint)
        if target == b"/":  # a bare collector address: the standard OTLP/HTTP traces path
            target = b"/v1/traces"
            endpoint = endpoint.rstrip("/") + "/v1/traces"
            self.endpoint = endpoint
        self._scheme, self._host, self._port, self._target = scheme, host, port, target.decode()
        if compression not in (None, "gzip"):
            raise ValueError(f"unsupported compression {compression!r}")
        self.compression = compression
        self._headers = tuple(headers)
        self._encodeSpan = encoder
        self._request = otlp.RequestEncoder(
            otlp.resource(resource), otlp.scope("mcpgw", __version__)
        )
        self._queue: deque[tuple[Any, ...]] = deque(maxlen=self.maxQueue)
        self._wake = threading.Event()
        self._interrupt = threading.Event()
        self._lock = threading.Lock()
        self._flushWaiters: list[Deferred[None]] = []
        self._stopped: Deferred[None] | None = None
        self._stopDeadline = float("inf")
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._sleep = sleep
        self.exported = self.dropped = self.failed = self.batches = 0
        self._reported = (0, 0)
        self._lastReport = -REPORT_INTERVAL
        self._lastError: str | None = None

    # -- reactor thread ----------------------------------------------------------------------

    def submit(self, record: tuple[Any, ...]) -> None:
        """Queue one span record; never blocks (a full queue drops its oldest record)."""
        q = self._queue
        if len(q) >= self.maxQueue:
            self.dropped += 1
        q.append(record)
        if len(q) >= self.batchSize and not self._wake.is_set():
            self._wake.set()

    def start(self) -> None:
        """Start the export thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mcpgw-otlp", daemon=True)
            self._thread.start()

    def flush(self) -> Deferred[None]:
        """Fires once every record queued so far has been exported (or given up on)."""
        if self._thread is None or not self._thread.is_alive():
            return succeed(None)
        d: Deferred[None] = Deferred()
        with self._lock:
            self._flushWaiters.append(d)
        self._wake.set()
        return d

    def stop(self) -> Deferred[None]:
        """
        Export what is queued (within L{stopTimeout} seconds, on the export thread) and end the
        thread; fires when it has ended. The reactor is never blocked.
        """
        if self._stopped is not None:
            return self._stopped
        d: Deferred[None] = Deferred()
        self._stopped = d
        if self._thread is None or not self._thread.is_alive():
            d.callback(None)
            return d
        self._stopDeadline = time.monotonic() + self.stopTimeout
        self._interrupt.set()
        self._wake.set()
        return d

    # -- export thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(self.interval)
                self._wake.clear()
                stopping = self._stopped is not None
                with self._lock:
                    waiters, self._flushWaiters = self._flushWaiters, []
                try:
                    self._drain()
                except Exception:  # a bug: log it, keep exporting
                    failure = Failure()
                    self._reactor.callFromThread(log.failure, "telemetry: export failed", failure)
                self._report()
                for d in waiters:
                    self._reactor.callFromThread(d.callback, None)
                if stopping:
                    break
        finally:
            self._closeConnection()
            self._report(final=True)
            with self._lock:
                waiters, self._flushWaiters = self._flushWaiters, []
            for d in waiters:
                self._reactor.callFromThread(d.callback, None)
            if self._stopped is not None:
                self._reactor.callFromThread(self._stopped.callback, None)

    def _drain(self) -> None:
        # Only what is queued now: records that arrive meanwhile wait for the next wake-up (a
        # full batch or the interval), so batches stay large instead of chasing the tail.
        q = self._queue
        pop = q.popleft
        left = len(q)
        while left > 0 and q:
            n = min(left, len(q), self.batchSize)
            left -= n
            batch = [pop() for _ in range(n)]
            if time.monotonic() >= self._stopDeadline:
                self.failed += len(batch) + len(q)
                self._lastError = "stop deadline reached before the queue was exported"
                q.clear()
                return
            self._export(batch)

    def encode(self, batch: Sequence[tuple[Any, ...]]) -> bytes:
        """The C{ExportTraceServiceRequest} of a batch of records."""
        encodeSpan = self._encodeSpan
        spans: list[bytes] = []
        chunk = self.encodeChunk
        for i in range(0, len(batch), chunk):
            spans += [encodeSpan(r) for r in batch[i : i + chunk]]
            self._sleep(self.encodePause)
        return self._request.encode(spans)

    def _export(self, batch: list[tuple[Any, ...]]) -> None:
        try:
            body = self.encode(batch)
        except Exception as e:
            self.failed += len(batch)
            self._lastError = f"encoding failed: {e!r}"
            return
        headers = dict(self._headers)
        headers.update(
            {"Content-Type": "application/x-protobuf", "User-Agent": f"mcpgw/{__version__}"}
        )
        if self.compression == "gzip":
            body = zlib.compress(body, 6, 31)  # 31: gzip container
            headers["Content-Encoding"] = "gzip"
        deadline = min(time.monotonic() + self.timeout, self._stopDeadline)
        attempt = 0
        while True:
            try:
                rejected = self._post(body, headers, deadline)
            except ExportError as e:
                self._lastError = str(e)
                now = time.monotonic()
                if not e.retryable:
                    break
                if e.retryAfter is not None:
                    delay = e.retryAfter
                else:
                    delay = min(2.0**attempt, 30.0) * _rng.uniform(0.8, 1.2)
                deadline = min(deadline, self._stopDeadline)
                if now + delay >= deadline:
                    break
                attempt += 1
                if self._interrupt.wait(delay):
                    self._interrupt.clear()  # stop() shortened the deadline: look again
                continue
            self.batches += 1
            self.exported += len(batch) - rejected
            self.failed += rejected
            return
        self.failed += len(batch)

    def _post(self, body: bytes, headers: dict[str, str], deadline: float) -> int:
        """
        One POST. @return: spans the endpoint rejected (partial success).
        @raise ExportError: it failed.
        """
        left = deadline - time.monotonic()
        if left <= 0:
            raise ExportError("deadline reached", retryable=False)
        conn = self._conn
        try:
            if conn is None:
                if self._scheme == "https":
                    conn = http.client.HTTPSConnection(
                        self._host, self._port, timeout=left, context=ssl.create_default_context()
                    )
                else:
                    conn = http.client.HTTPConnection(self._host, self._port, timeout=left)
                self._conn = conn
            else:
                conn.timeout = left
                if conn.sock is not None:
                    conn.sock.settimeout(left)
            conn.request("POST", self._target, body, headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            self._closeConnection()
            raise ExportError(f"{self.endpoint}: {e!r}", retryable=True) from None
        if response.will_close:
            self._closeConnection()
        status = response.status
        if 200 <= status < 300:
            rejected, message = otlp.partialSuccess(data)
            if rejected or message:
                self._lastError = f"{self.endpoint} rejected {rejected} spans: {message}"
            return max(0, rejected)
        retryAfter = None
        value = response.getheader("Retry-After")
        if value is not None:
            try:
                retryAfter = max(0.0, float(value))
            except ValueError:
                retryAfter = None
        raise ExportError(
            f"{self.endpoint} answered HTTP {status}",
            retryable=status in _RETRYABLE,
            retryAfter=retryAfter,
        )

    def _closeConnection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _report(self, final: bool = False) -> None:
        now = time.monotonic()
        current = (self.dropped, self.failed)
        if current == self._reported:
            return
        if not final and now - self._lastReport < REPORT_INTERVAL:
            return
        newDropped = current[0] - self._reported[0]
        newFailed = current[1] - self._reported[1]
        self._reported, self._lastReport = current, now
        self._reactor.callFromThread(
            log.warn,
            "telemetry: {dropped} spans dropped (queue full) and {failed} not delivered since "
            "the last report ({exported} exported in all); last error: {error}",
            dropped=newDropped,
            failed=newFailed,
            exported=self.exported,
            error=self._lastError,
        )


# -- the reactor side -------------------------------------------------------------------------


@implementer(ITracer)
class Tracer:
    """
    What the gateway's request path calls when tracing is on.

    @ivar config: the C{telemetry} section it was built from.
    @ivar exporter: where finished spans go.
    @ivar sampled: the sampling decision (L{makeSampler}) of C{(trace id, parent)}.
    @ivar unsampled: spans not exported because the sampler said so.
    """

    def __init__(self, reactor: Any, config: TelemetryConfig, exporter: SpanExporter) -> None:
        self._reactor = reactor
        self.config = config
        self.exporter = exporter
        self.sampled = makeSampler(config.sampler)
        self.unsampled = 0

    def ended(self, record: RequestRecord) -> None:
        """A request ended: queue its span (unless the sampler leaves it out)."""
        if not self.sampled(record.traceId, record.parent):
            self.unsampled += 1
            return
        self.exporter.submit(record)


class Telemetry(Service):
    """
    Owns the exporter for the service and plugs the L{Tracer} into the gateway (or none when
    C{telemetry.otlp_endpoint} is unset). Survives reloads: a changed C{telemetry} section
    replaces the exporter (the old one flushes in the background).

    @ivar tracer: the current tracer, or C{None}.
    """

    def __init__(
        self,
        reactor: Any,
        gateway: Any,
        config: TelemetryConfig,
        exporterFactory: Callable[..., SpanExporter] = SpanExporter,
    ) -> None:
        self._reactor = reactor
        self._gateway = gateway
        self._factory = exporterFactory
        self._config = config
        self.tracer: Tracer | None = None
        self._retiring: list[Deferred[None]] = []

    def _build(self, config: TelemetryConfig) -> Tracer | None:
        if not config.otlp_endpoint:
            return None
        exporter = self._factory(
            self._reactor, config.otlp_endpoint, resourceAttributes(config), headers=config.headers
        )
        return Tracer(self._reactor, config, exporter)

    name = "telemetry"

    def startService(self) -> None:
        """Start exporting (when an endpoint is configured)."""
        super().startService()
        self._install(self._build(self._config))

    def _install(self, tracer: Tracer | None) -> None:
        self.tracer = tracer
        self._gateway.tracer = tracer
        if tracer is not None:
            tracer.exporter.start()
            sampler = tracer.config.sampler
            log.info(
                "telemetry: exporting spans to {endpoint} as service {service!r} (sampler "
                "{sampler}{ratio})",
                endpoint=tracer.exporter.endpoint,
                service=tracer.config.service_name,
                sampler=sampler.type,
                ratio=f", ratio {sampler.ratio:g}" if sampler.type.endswith("ratio") else "",
            )

    def reconfigure(self, config: TelemetryConfig) -> None:
        """A reload: apply a changed C{telemetry} section."""
        if config == self._config:
            return
        self._config = config
        old = self.tracer
        self._install(self._build(config))
        if old is not None:
            d = old.exporter.stop()
            self._retiring.append(d)
            d.addBoth(lambda _: self._retiring.remove(d))
        if self.tracer is None:
            log.info("telemetry: span export turned off")

    def flush(self) -> Deferred[None]:
        """Fires once every span queued so far has been exported (or given up on)."""
        if self.tracer is None:
            return succeed(None)
        return self.tracer.exporter.flush()

    def stopService(self) -> Deferred[None]:
        """Export what is left, off the reactor; fires when the export thread has ended."""
        super().stopService()
        tracer, self.tracer = self.tracer, None
        self._gateway.tracer = None
        waits = list(self._retiring)
        if tracer is not None:
            exporter = tracer.exporter
            d = exporter.stop()

            def stopped(_: object) -> None:
                log.info(
                    "telemetry: stopped; {exported} spans exported, {dropped} dropped, "
                    "{failed} not delivered",
                    exported=exporter.exported,
                    dropped=exporter.dropped,
                    failed=exporter.failed,
                )

            d.addCallback(stopped)
            waits.append(d)
        if not waits:
            return succeed(None)
        return gatherResults(waits).addCallback(lambda _: None)


def auditIds(x: Any) -> tuple[str, str]:
    """The C{trace_id} and C{span_id} of exchange C{x}'s audit line (lowercase hex)."""
    return f"{x.traceId:032x}", f"{x.spanId:016x}"


__all__ = [
    "DEFAULT_ENDPOINT",
    "OPERATION_NAME",
    "TARGET_METHODS",
    "TRACE_HEADERS",
    "SpanExporter",
    "Telemetry",
    "TraceParent",
    "Tracer",
    "encodeSpan",
    "headerContext",
    "injectMeta",
    "makeSampler",
    "metaContext",
    "parseTraceparent",
    "spanName",
    "targetOf",
    "traceparentOf",
    "useMetaContext",
]
