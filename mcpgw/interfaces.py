"""
The seams of mcpgw. Implementations are marked with C{@implementer}; in-memory fakes of these
interfaces live in L{mcpgw.testing}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class IResponseSink(Interface):
    """Receives one upstream response, piece by piece, as it arrives."""

    def upstreamResponse(
        status: int, reason: bytes, headers: list[tuple[bytes, bytes]], transport: Any
    ) -> None:
        """
        The status line and headers arrived. C{transport} is the upstream connection, a push
        producer the sink may register on its consumer (backpressure) until the response ends.
        """

    def upstreamData(data: bytes) -> None:
        """A piece of the response body (for SSE usually one event)."""

    def upstreamDone() -> None:
        """The response ended normally."""

    def upstreamFailed(error: Any, midResponse: bool) -> None:
        """
        The exchange failed with a L{mcpgw.errors.GatewayError}; C{midResponse} says whether the
        response head had already been received.
        """


class IUpstreamPool(Interface):
    """Connections to one upstream."""

    name = Attribute("The upstream's configured name.")

    def request(data: bytes, sink: IResponseSink) -> Any:
        """
        Send a complete HTTP/1.1 request; return an exchange whose C{cancel()} abandons it.
        """

    def close() -> Deferred[Any]:
        """Close every connection; fires when they are all gone."""


class IAuditLog(Interface):
    """The canonical, append-only audit trail: one JSON object per line."""

    failing = Attribute("True while lines cannot be written (they wait in memory).")
    durable = Attribute(
        "True when write() returns a Deferred that fires once the line is synced (fsync: always);"
        " the gateway answers the request only then."
    )

    def write(record: dict[str, Any]) -> Deferred[None] | None:
        """
        Append one record as one line. Never blocks on the disk's sync; with C{durable}, the
        Deferred returned fires once the line is synced (else C{None}).
        """

    def reopen() -> None:
        """Reopen the file by path (after logrotate renamed it)."""

    def close() -> Deferred[None]:
        """Flush, sync and close; fires when the data is on disk."""


class IAuthenticator(Interface):
    """Who the caller is, for one generation (L{mcpgw.auth.Authenticator})."""

    mode = Attribute("C{keys}, C{mtls} or C{external}.")
    identityHeader = Attribute(
        "The lower-case name of the header a trusted auth proxy names the caller in, or C{None}."
    )
    documents = Attribute(
        "Gateway path (bytes) -> the RFC 9728 protected-resource metadata (JSON) served there."
    )

    def authenticate(
        authorization: bytes | None,
        clientAddress: str,
        certIdentity: str | None,
        identity: bytes | None = None,
        path: bytes = b"",
    ) -> Any:
        """
        An L{mcpgw.auth.AuthResult} now, or a Deferred of one (a key verified off the reactor, an
        issuer's keys fetched). Raises (or fails with) L{mcpgw.errors.Unauthenticated},
        L{mcpgw.errors.InsufficientScope}, L{mcpgw.errors.AuthUnavailable} or
        L{mcpgw.errors.RateLimited}. C{identity}: the request's L{identityHeader} value, if any;
        C{path}: the gateway path (which upstream: an OAuth token's audience).
        """

    def headersToDrop(clientAddress: str | None) -> frozenset[bytes]:
        """Lower-case header names never forwarded for a request from C{clientAddress}."""

    def carriesKey(value: bytes, presented: bytes | None) -> bool:
        """Whether a request header value carries one of the gateway's credentials."""


class ITracer(Interface):
    """Where ended requests' records go to become spans (L{mcpgw.telemetry.Tracer})."""

    def ended(record: Any) -> None:
        """A request ended: its L{mcpgw.record.RequestRecord}. Never blocks."""


class IBuckets(Interface):
    """
    Token buckets of one kind (one C{rate_limit} rule, the input limit, the auth throttle), keyed
    by a string (a session, a key id, a client address). A new bucket starts full.
    """

    rate = Attribute("Tokens added per second.")
    burst = Attribute("The bucket's size.")

    def take(key: str, now: float) -> Any:
        """
        Take one token from C{key}'s bucket.

        @param now: the caller's clock in seconds (a shared backend may use its own clock).
        @return: C{None} if a token was taken, else the seconds until one is available; or a
            Deferred of that (a shared backend answering over the network). Such a Deferred
            never fails: the backend's C{on_error} rule decides when it cannot answer in time.
        """


class IStateBackend(Interface):
    """
    Where token buckets live (C{state.backend}): in this process, or shared by every worker and
    replica (L{mcpgw.buckets.MemoryState}, L{mcpgw.redisstate.RedisState}).
    """

    shared = Attribute("Whether the buckets are shared with other processes.")

    def buckets(kind: str, rate: float, burst: float, maxBuckets: int) -> IBuckets:
        """
        The buckets of one kind, e.g. C{rule:<id>}, C{input} or C{auth}.

        @param maxBuckets: how many buckets a process-local backend keeps at most.
        """

    def readinessCheck() -> tuple[str, bool, Any]:
        """C{(name, ok, detail)} for C{/readyz} (L{mcpgw.health.Readiness.extraChecks})."""
