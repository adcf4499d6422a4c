# -*- test-case-name: tests.test_record -*-
"""
The per-request record: built once when a request ends, frozen, and the only thing the audit line
(L{auditLine}) and the span (L{mcpgw.telemetry.encodeSpan}) are made from, so the two can never
disagree.

A C{typing.NamedTuple}, not a frozen attrs class: it is built on the reactor for every request,
and a 33-field frozen attrs instance costs about three times as much to build (one
C{object.__setattr__} per field). Its first 29 fields keep the layout the span encoder indexes
(C{R_*} below); fields added later go at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from mcpgw.audit.writer import rfc3339ms

if TYPE_CHECKING:
    from mcpgw.telemetry import TraceParent


class RequestRecord(NamedTuple):
    """
    Everything known about one request when it ended.

    Times: C{startNs}/C{endNs} are Unix nanoseconds (the span's), C{endedAt} the same end in
    seconds (the audit line's C{ts}); C{durationMs} is measured on the reactor's clock.
    """

    traceId: int
    spanId: int
    parent: TraceParent | None
    link: TraceParent | None
    startNs: int
    endNs: int
    method: str | None
    tool: str | None
    httpMethod: bytes
    path: bytes
    upstream: str | None
    jsonrpcId: Any
    sessionId: str | None
    protocolVersion: str | None
    decision: str
    ruleId: str | None
    authResult: str | None
    authKeyId: str | None
    bytesIn: int
    bytesOut: int
    status: int | None
    error: str | None
    clientIp: str | None
    requestId: str
    secure: bool
    redacted: int | None
    filteredTools: int | None
    batchSize: int | None
    target: str | None
    clientCert: str | None
    durationMs: float
    endedAt: float
    principal: str | None
    redactedResults: int | None
    toolPin: str | None


#: Indexes of the fields the span encoder reads (a tuple index is the cheapest access).
(
    R_TRACE,
    R_SPAN,
    R_PARENT,
    R_LINK,
    R_START,
    R_END,
    R_METHOD,
    R_TOOL,
    R_HTTP_METHOD,
    R_PATH,
    R_UPSTREAM,
    R_JSONRPC_ID,
    R_SESSION,
    R_PROTOCOL,
    R_DECISION,
    R_RULE,
    R_AUTH_RESULT,
    R_AUTH_KEY,
    R_BYTES_IN,
    R_BYTES_OUT,
    R_STATUS,
    R_ERROR,
    R_CLIENT_IP,
    R_REQUEST_ID,
    R_SECURE,
    R_REDACTED,
    R_FILTERED,
    R_BATCH,
    R_TARGET,
) = range(29)
#: Fields added after the original span layout.
R_PRINCIPAL = 32
R_REDACTED_RESULTS = 33
R_TOOL_PIN = 34


assert RequestRecord._fields[R_PRINCIPAL] == "principal"
assert RequestRecord._fields[R_REDACTED_RESULTS] == "redactedResults"
assert RequestRecord._fields[R_TOOL_PIN] == "toolPin"


def recordOf(x: Any, endedAt: float, now: float) -> RequestRecord:
    """
    Freeze what exchange C{x} learnt into its record.

    @param endedAt: the wall clock at the end, in seconds.
    @param now: the reactor's clock at the end (C{x.started} is on the same clock).
    """
    route = x.route
    duration = now - x.started
    endNs = int(endedAt * 1e9)
    return RequestRecord(
        x.traceId,
        x.spanId,
        x.parent,
        x.link,
        endNs - int(duration * 1e9),
        endNs,
        x.method,
        x.tool,
        x.httpMethod,
        x.path,
        route.name if route is not None else None,
        x.jsonrpcId,
        x.sessionId,
        x.protocolVersion,
        x.decision,
        x.ruleId,
        x.authResult,
        x.authKeyId,
        x.bytesIn,
        x.bytesOut,
        x.status,
        x.error,
        x.clientIp,
        x.requestId,
        x.secure,
        x.redacted,
        x.filteredTools,
        x.batchSize,
        x.target,
        x.clientCert,
        round(duration * 1000.0, 3),
        endedAt,
        x.principal,
        x.redactedResults,
        x.toolPin,
    )


def auditLine(r: RequestRecord) -> dict[str, Any]:
    """
    The audit line of a request: every field of DESIGN.md, in this order, nulls included. This
    function is the one definition of the audit fields (L{AUDIT_FIELDS} is read off it).
    """
    return {
        "ts": rfc3339ms(r.endedAt),
        "request_id": r.requestId,
        "session_id": r.sessionId,
        "client_ip": r.clientIp,
        "method": r.method,
        "tool": r.tool,
        "upstream": r.upstream,
        "decision": r.decision,
        "rule_id": r.ruleId,
        "error": r.error,
        "auth_key_id": r.authKeyId,
        "auth_result": r.authResult,
        "bytes_in": r.bytesIn,
        "bytes_out": r.bytesOut,
        "status": r.status,
        "duration_ms": r.durationMs,
        "transport": "https" if r.secure else "http",
        "http_method": r.httpMethod.decode("latin-1"),
        "path": r.path.decode("latin-1"),
        "jsonrpc_id": r.jsonrpcId,
        "batch_size": r.batchSize,
        "protocol_version": r.protocolVersion,
        "redacted": r.redacted,
        "filtered_tools": r.filteredTools,
        "client_cert": r.clientCert,
        "trace_id": f"{r.traceId:032x}",
        "span_id": f"{r.spanId:016x}",
        "principal": r.principal,
        "redacted_results": r.redactedResults,
        "target": r.target,
        "tool_pin": r.toolPin,
    }


_EXAMPLE = RequestRecord(
    1, 1, None, None, 0, 0, None, None, b"", b"", None, None, None, None, "allow", None, None,
    None, 0, 0, None, None, None, "", False, None, None, None, None, None, 0.0, 0.0, None, None,
    None,
)  # fmt: skip

#: The audit line's field names, in order.
AUDIT_FIELDS: tuple[str, ...] = tuple(auditLine(_EXAMPLE))
