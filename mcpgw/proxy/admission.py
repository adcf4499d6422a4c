# -*- test-case-name: tests.test_auth -*-
"""
Admission: what is checked before a request's body is read, parsed or authenticated (the
per-address input rate limit, the declared body size) and the slow-client sweep (408 for headers
or a body arriving too slowly). Cheap, and first, so that a flood costs the gateway little.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mcpgw.errors import (
    GatewayError,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
)
from mcpgw.generation import Generation

log = Logger()


class Admission:
    """
    The admission checks of the current generation.

    @ivar current: returns the current L{Generation}.
    @ivar connections: the open client channels (swept for slow clients).
    """

    def __init__(
        self, reactor: Any, current: Callable[[], Generation], connections: set[Any]
    ) -> None:
        self.reactor = reactor
        self.current = current
        self.connections = connections
        #: Requests refused by the input rate limit since the start (for the metrics).
        self.inputRefused = 0

    @property
    def maxBodyBytes(self) -> int:
        """C{limits.max_body_bytes} of the current generation."""
        return self.current().maxBodyBytes

    def admit(
        self, request: Any, length: int | None
    ) -> GatewayError | Deferred[GatewayError | None] | None:
        """
        Checks made when the headers are in, before the body is read, parsed or authenticated:
        the per-address input rate limit, then the declared body size.

        @return: the error to answer with, or C{None}; or a Deferred of that when the input
            limit's buckets answer later (a shared state backend: the body is read meanwhile,
            and the request waits for the answer before it is parsed).
        """
        limit = self.current().inputLimit
        if limit is not None:
            wait = limit.take(getattr(request.client, "host", ""), self.reactor.seconds())
            if isinstance(wait, Deferred):
                return wait.addCallback(self._afterInputLimit, length)
            return self._afterInputLimit(wait, length)
        return self._sizeCheck(length)

    def _afterInputLimit(self, wait: float | None, length: int | None) -> GatewayError | None:
        if wait is not None:
            self.inputRefused += 1
            return RateLimited(retryAfter=max(1, math.ceil(wait)), scope="input")
        return self._sizeCheck(length)

    def _sizeCheck(self, length: int | None) -> GatewayError | None:
        if length is not None and length > self.current().maxBodyBytes:
            return self.tooLarge()
        return None

    def tooLarge(self) -> PayloadTooLarge:
        """The 413 for a body over C{limits.max_body_bytes}."""
        return PayloadTooLarge(f"the request body exceeds {self.maxBodyBytes} bytes")

    def sweepSlowClients(self) -> None:
        """
        Called about once a second: answer 408 and close connections whose request headers or
        body are arriving too slowly (C{limits.header_timeout}, C{limits.body_timeout}), and close
        keep-alive connections idle between requests for longer than the site's idle timeout.
        """
        limits = self.current().config.limits
        now = self.reactor.seconds()
        for channel in list(self.connections):
            head, body = channel.headStarted, channel.bodyStarted
            if head is not None and now - head > limits.header_timeout:
                channel.reject(
                    RequestTimeout(f"headers not received within {limits.header_timeout:g}s")
                )
            elif body is not None and now - body > limits.body_timeout:
                channel.reject(RequestTimeout(f"body not received within {limits.body_timeout:g}s"))
            elif channel.idleFor(now) > channel.site.idleTimeout:
                channel.loseConnection()  # a keep-alive connection idle between requests
