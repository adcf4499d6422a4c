# -*- test-case-name: tests.test_proxy -*-
"""
Named gateway errors and the one place that turns them into HTTP responses.

Every error the gateway itself produces is one of these exceptions. L{errorResponse} maps it to an
HTTP status, extra headers and a JSON-RPC error body carrying the request's id when it is known.
The audit line's C{error} field is the exception's C{message} (a stable snake_case name).

JSON-RPC error codes: the standard ones (-32700 parse error, -32600 invalid request, -32603
internal error) and mcpgw's own in the server-defined range, listed in C{docs/errors.md}.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    """
    Base class of every error the gateway answers by itself.

    @cvar status: the HTTP status code.
    @cvar code: the JSON-RPC error code.
    @cvar message: the JSON-RPC error message; also the audit line's C{error} value unless
        C{auditName} is set.
    @cvar auditName: the audit line's C{error} value when it names the refusal more precisely
        than C{message} (empty: C{message}).
    @ivar detail: a human-readable explanation, sent as C{error.data.detail}.
    @ivar requestId: the JSON-RPC id of the request, when the error knows it.
    @ivar data: extra members of C{error.data}.
    """

    status: ClassVar[int] = 500
    code: ClassVar[int] = -32603
    message: ClassVar[str] = "internal_error"
    auditName: ClassVar[str] = ""

    def __init__(self, detail: str | None = None, *, requestId: Any = None, **data: Any) -> None:
        super().__init__(detail or self.message)
        self.detail = detail
        self.requestId = requestId
        self.data = data

    def headers(self) -> list[tuple[bytes, bytes]]:
        """
        @return: extra response headers for this error (e.g. C{Allow}, C{Retry-After}).
        """
        return []

    def errorObject(self) -> dict[str, Any]:
        """
        @return: the JSON-RPC C{error} member for this error.
        """
        data = dict(self.data)
        if self.detail is not None:
            data["detail"] = self.detail
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if data:
            err["data"] = data
        return err


class ParseError(GatewayError):
    """The POST body is not valid JSON."""

    status = 400
    code = -32700
    message = "parse_error"


class InvalidRequest(GatewayError):
    """The POST body is JSON but not a JSON-RPC message or batch."""

    status = 400
    code = -32600
    message = "invalid_request"


class HeaderMismatch(GatewayError):
    """
    MCP 2026-07-28: a request metadata header (C{MCP-Protocol-Version}, C{Mcp-Method},
    C{Mcp-Name}, C{Mcp-Param-*}) is missing, malformed or disagrees with the body.
    """

    status = 400
    code = -32020
    message = "header_mismatch"


class DuplicateHeader(GatewayError):
    """
    A header that must appear once (C{Authorization}, C{Host}, C{Origin}, C{Content-Length},
    C{Mcp-Session-Id}, C{MCP-Protocol-Version}, C{Mcp-Method}, C{Mcp-Name}) appears more than
    once: ambiguous, so refused rather than guessed.
    """

    status = 400
    code = -32600
    message = "duplicate_header"


class PolicyDenied(GatewayError):
    """Policy denies the tool call (C{data.rule_id}; C{null} when C{default_action} decided)."""

    status = 403
    code = -32001
    message = "policy_denied"


class ToolNotApproved(PolicyDenied):
    """
    Tool pinning (C{enforce}): the called tool is not in the lock file, or its latest listed
    definition is not the approved one. C{data}: C{reason: tool_not_approved}, C{tool} and
    C{pin} (C{new} or C{changed}). The JSON-RPC message is policy's (clients treat it alike);
    the audit line's C{error} says C{tool_not_approved}, so replays of the audit (C{mcpgw
    policy test}) tell it from a policy decision.
    """

    auditName = "tool_not_approved"

    def __init__(self, tool: str, pin: str, *, requestId: Any = None) -> None:
        super().__init__(
            f"tool {tool!r} is {pin} and not approved: mcpgw tools approve, then reload",
            requestId=requestId,
            reason="tool_not_approved",
            tool=tool,
            pin=pin,
        )


class RateLimited(GatewayError):
    """
    A token bucket is empty: C{data.rule_id} for a policy rule, C{data.scope} for the input limit.

    @ivar retryAfter: whole seconds until a token is available (the C{Retry-After} header).
    """

    status = 429
    code = -32002
    message = "rate_limited"

    def __init__(self, detail: str | None = None, *, retryAfter: int = 1, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.retryAfter = retryAfter

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Retry-After", b"%d" % self.retryAfter)]


class Unauthenticated(GatewayError):
    """
    No valid credential (C{data.auth_result}: C{missing} or C{invalid}).

    @ivar challenge: the C{WWW-Authenticate} value: C{Bearer realm="mcpgw"}, or with OAuth the
        upstream's C{resource_metadata} (and C{error="invalid_token"} when a token was presented).
    """

    status = 401
    code = -32003
    message = "unauthenticated"

    def __init__(
        self,
        detail: str | None = None,
        *,
        challenge: bytes = b'Bearer realm="mcpgw"',
        **kw: Any,
    ) -> None:
        super().__init__(detail, **kw)
        self.challenge = challenge

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"WWW-Authenticate", self.challenge)]


class InsufficientScope(GatewayError):
    """
    A valid OAuth access token without every scope C{auth.oauth.required_scopes} lists (RFC 6750
    section 3.1): 403 with C{WWW-Authenticate: Bearer error="insufficient_scope", scope="..."}.

    @ivar principal: who the token names (for the audit line).
    """

    status = 403
    code = -32009
    message = "insufficient_scope"

    def __init__(
        self, detail: str | None = None, *, challenge: bytes, principal: str, **kw: Any
    ) -> None:
        super().__init__(detail, **kw)
        self.challenge = challenge
        self.principal = principal

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"WWW-Authenticate", self.challenge)]


class AuthUnavailable(GatewayError):
    """
    An OAuth token cannot be checked: its issuer's keys (C{jwks_url}) could not be fetched and
    none are held yet. Not the client's fault, so not a 401 (which would send it to log in again).
    """

    status = 503
    code = -32016
    message = "auth_unavailable"

    def __init__(self, detail: str | None = None, *, retryAfter: int = 5, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.retryAfter = retryAfter

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Retry-After", b"%d" % self.retryAfter)]


class RequestTimeout(GatewayError):
    """The client sent its headers or body too slowly (C{limits.header_timeout}/C{body_timeout})."""

    status = 408
    code = -32013
    message = "request_timeout"


class HeadersTooLarge(GatewayError):
    """The request line and headers exceed C{limits.max_header_bytes} (or a line is too long)."""

    status = 431
    code = -32014
    message = "headers_too_large"


class BadRequest(GatewayError):
    """The request is not valid HTTP (bad request line, header or chunked encoding)."""

    status = 400
    code = -32600
    message = "bad_request"


class NotFound(GatewayError):
    """No upstream is configured at the requested path."""

    status = 404
    code = -32004
    message = "not_found"


class MethodNotAllowed(GatewayError):
    """An HTTP method other than POST, GET or DELETE on an MCP path."""

    status = 405
    code = -32005
    message = "method_not_allowed"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Allow", b"GET, POST, DELETE")]


class MetadataMethodNotAllowed(MethodNotAllowed):
    """A method other than GET or HEAD on a protected-resource metadata path (C{auth.oauth})."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Allow", b"GET, HEAD")]


class PayloadTooLarge(GatewayError):
    """The request body is larger than C{limits.max_body_bytes}."""

    status = 413
    code = -32006
    message = "payload_too_large"


class HostNotAllowed(GatewayError):
    """The C{Host} header is not allowed by C{listen.allowed_hosts} (DNS-rebinding protection)."""

    status = 403
    code = -32007
    message = "host_not_allowed"


class OriginNotAllowed(GatewayError):
    """The C{Origin} header is not allowed by C{listen.allowed_origins}."""

    status = 403
    code = -32008
    message = "origin_not_allowed"


class UpstreamUnavailable(GatewayError):
    """The upstream refused, reset or did not accept the connection in time."""

    status = 502
    code = -32010
    message = "upstream_unavailable"


class UpstreamBadResponse(GatewayError):
    """
    The upstream broke HTTP framing: garbage, bad chunking, a body shorter than declared, a
    C{101 Switching Protocols} or an interim response with a body. Answered 502 when the response
    head has not gone to the client yet; otherwise the client connection is closed.
    """

    status = 502
    code = -32015
    message = "upstream_bad_response"


class UpstreamTimeout(GatewayError):
    """The upstream sent no byte of its response within C{timeouts.response}."""

    status = 504
    code = -32011
    message = "upstream_timeout"


class ShuttingDown(GatewayError):
    """The gateway is draining and takes no new work."""

    status = 503
    code = -32012
    message = "shutting_down"


class AuditUnavailable(GatewayError):
    """
    C{audit.on_write_failure: refuse} and the audit file cannot be written: no request is served
    without its record. Serving resumes by itself once lines can be written again.
    """

    status = 503
    code = -32017
    message = "audit_unavailable"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Retry-After", b"1")]


class InternalError(GatewayError):
    """A bug: an unexpected exception while handling a request (logged with its traceback)."""

    status = 500
    code = -32603
    message = "internal_error"


_PHRASES = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def reasonPhrase(status: int) -> bytes:
    """
    @return: the reason phrase for one of the statuses the gateway produces.
    """
    return _PHRASES.get(status, b"Error")


def errorBody(
    error: GatewayError, requestId: Any = None, batchIds: list[Any] | None = None
) -> bytes:
    """
    @param requestId: the JSON-RPC id of the request, or C{None} when unknown.
    @param batchIds: for a refused batch, the ids of its requests: the body is then an array with
        one error response per request (a batch of notifications only gets one error, id null).
    @return: the serialised JSON-RPC error response for C{error}.
    """
    err = error.errorObject()
    if batchIds:
        return orjson.dumps([{"jsonrpc": "2.0", "id": i, "error": err} for i in batchIds])
    return orjson.dumps({"jsonrpc": "2.0", "id": requestId, "error": err})


def errorResponse(
    error: GatewayError, requestId: Any = None, batchIds: list[Any] | None = None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """
    The single mapping from a gateway error to what goes on the wire.

    @return: C{(status, headers, body)}; headers include C{Content-Type} and C{Content-Length}.
    """
    body = errorBody(error, error.requestId if requestId is None else requestId, batchIds)
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"%d" % len(body)),
        (b"Cache-Control", b"no-store"),
        *error.headers(),
    ]
    return error.status, headers, body
