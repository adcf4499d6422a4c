# -*- test-case-name: tests.test_policy -*-
"""
Token buckets with bounded memory, for policy C{rate_limit} rules, the per-address input limit
and the per-address API-key verification throttle: the C{state.backend: memory} backend (each
process keeps its own; L{mcpgw.redisstate} shares them through Redis).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from zope.interface import implementer

from mcpgw.interfaces import IBuckets, IStateBackend


@implementer(IBuckets)
class TokenBuckets:
    """
    Token buckets keyed by a string (a session, a client address), least recently used first.

    A bucket untouched for C{burst / rate} seconds is full again, the same as a new one, so it is
    dropped; at most C{maxBuckets} are kept (the least recently used go first).
    """

    def __init__(self, rate: float, burst: float, maxBuckets: int) -> None:
        self.rate = rate
        self.burst = burst
        self.idle = burst / rate
        self.maxBuckets = maxBuckets
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.buckets)

    def take(self, session: str, now: float) -> float | None:
        """
        Take one token from C{session}'s bucket (a new bucket starts full).

        @return: C{None} if a token was taken, else the seconds until one is available.
        """
        buckets = self.buckets
        while buckets:
            oldest = next(iter(buckets))
            if now - buckets[oldest][1] < self.idle:
                break
            del buckets[oldest]
        state = buckets.pop(session, None)
        if state is None:
            tokens = self.burst
        else:
            tokens = min(self.burst, state[0] + max(0.0, now - state[1]) * self.rate)
        wait = None
        if tokens >= 1.0 - 1e-9:
            tokens = max(0.0, tokens - 1.0)
        else:
            wait = (1.0 - tokens) / self.rate
        buckets[session] = (tokens, now)
        if len(buckets) > self.maxBuckets:
            buckets.popitem(last=False)
        return wait


@implementer(IStateBackend)
class MemoryState:
    """
    C{state.backend: memory}: every kind of bucket in this process's memory. Answers at once,
    never over the network; with several workers or replicas each keeps its own buckets.
    """

    shared = False

    def buckets(self, kind: str, rate: float, burst: float, maxBuckets: int) -> TokenBuckets:
        return TokenBuckets(rate, burst, maxBuckets)

    def readinessCheck(self) -> tuple[str, bool, Any]:
        return ("state", True, {"backend": "memory"})
