# -*- test-case-name: tests.test_redisstate -*-
"""
C{state.backend: redis}: the token buckets of C{rate_limit} rules (every C{per} kind), the input
limit and the auth brute-force throttle kept in Redis (or Valkey), so every worker and every
replica takes from the same buckets.

How a decision is made:

  - One token bucket is one small Redis hash (C{v}: tokens, C{t}: when), updated by one Lua
    script (L{TAKE_SCRIPT}) that reads the server's clock (C{TIME}): the take is atomic and the
    hosts' clocks do not matter. An idle bucket expires when it would be full again (plus a
    second), like the in-memory buckets are dropped.
  - The script runs by its SHA1 (C{EVALSHA}); it is loaded when the connection is made, and
    again if the server says C{NOSCRIPT} (a restart or C{SCRIPT FLUSH}; that one call gets the
    C{on_error} answer).
  - Commands are pipelined on one connection: a take never waits for another's answer, the
    commands of one reactor turn go out in one send, and the replies come back in order
    (L{RedisProtocol}); on an idle connection a take is sent at once (C{eagerWrite}). Nothing
    blocks the reactor thread; the Redis protocol is parsed by hiredis (C).
  - Each take waits at most C{timeout_ms}; then, or at once when there is no connection, the
    C{on_error} rule answers a policy C{rate_limit} call (C{allow}: a token; C{deny}: refused,
    retry after a second). The input limit and the auth throttle fall back to this process's
    own buckets instead (L{LOCAL_FALLBACK}): a flood or a key-guessing run stays limited (per
    process) while Redis is away, and an outage never refuses every request. A connection whose
    overdue replies stay missing for L{DEAD_AFTER} timeouts is dropped.
  - Leases (C{state.redis.lease_tokens}): a take may ask for several tokens at once; the spare
    ones are kept by this process (L{RedisState.leases}, per Redis key) for its next calls of
    that key, which are then allowed at once without asking Redis. Only tokens above half the
    bucket's burst are leased (a bucket below half full is decided one token per call, fleet
    wide), a lease asks for more in the background once half of it is used, and spares unused
    for L{LEASE_SECONDS} are given back to the bucket. Every allowed call still spent a token
    taken atomically from Redis: leases never allow more than the bucket.
  - The connection is remade with exponential backoff (L{RETRY_INITIAL} to L{RETRY_MAX}
    seconds) by a C{ClientService}; C{AUTH} and C{SELECT} from the URL are sent first.

Why a protocol of our own on hiredis's parser rather than txredisapi: see C{docs/scaling-redis.md}
(measured with C{bench/redis_bench.py}).

L{RedisStats} holds the counters and the latency histogram for the metrics endpoint.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any

import attr
import hiredis
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcpgw.buckets import TokenBuckets
from mcpgw.config import RedisConfig, lease_size, redis_address
from mcpgw.interfaces import IBuckets, IStateBackend
from mcpgw.proxy.eager import eagerWrite

log = Logger()

#: The token bucket, atomically on the server. KEYS[1]: the bucket; ARGV: rate (tokens/s),
#: burst, n, mode. Returns C{{granted, wait}}: the tokens granted and, when none was, the
#: microseconds until one is available.
#:
#:  - mode C{t} (a call's take): the first token exactly as without leases (granted when one is
#:    there); up to C{n - 1} more only while the bucket keeps at least half its burst after the
#:    grant, so a bucket below half full gives one token per call.
#:  - mode C{p} (a lease's prefetch, in the background): up to C{n} tokens, all above half the
#:    burst (nothing, and no wait, when the bucket is at or below half).
#:  - mode C{r} (a lease given back): C{n} unused tokens return, up to the burst; a bucket that
#:    expired meanwhile (full again) is left alone.
TAKE_SCRIPT = b"""\
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local mode = ARGV[4]
local s = redis.call('HMGET', KEYS[1], 'v', 't')
if mode == 'r' and not s[1] then
  return {0, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tokens = burst
if s[1] then
  local elapsed = now - tonumber(s[2])
  if elapsed < 0 then elapsed = 0 end
  tokens = math.min(burst, tonumber(s[1]) + elapsed * rate)
end
local granted = 0
local wait = 0
if mode == 'r' then
  tokens = math.min(burst, tokens + n)
else
  local first = 0
  if mode == 't' then
    if tokens >= 1 - 1e-9 then
      tokens = math.max(0, tokens - 1)
      granted = 1
    else
      wait = math.ceil((1 - tokens) / rate * 1000000)
    end
    first = 1
  end
  if mode == 'p' or granted == 1 then
    local extra = math.min(n - first, math.floor(tokens - burst / 2 + 1e-9))
    if extra > 0 then
      tokens = tokens - extra
      granted = granted + extra
    end
  end
end
redis.call('HSET', KEYS[1], 'v', string.format('%.17g', tokens), 't', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {granted, wait}
"""
TAKE_SHA = hashlib.sha1(TAKE_SCRIPT, usedforsecurity=False).hexdigest().encode("ascii")

#: Seconds before the first reconnection attempt, and at most between two.
RETRY_INITIAL = 0.1
RETRY_MAX = 5.0
#: Seconds a TCP (and TLS) connection may take to be made.
CONNECT_TIMEOUT = 5.0
#: Seconds the connection's first commands (AUTH, SELECT, SCRIPT LOAD) may take.
HANDSHAKE_TIMEOUT = 5.0
#: A connection whose overdue replies are still missing after this many C{timeout_ms} (and at
#: least L{DEAD_MIN} seconds) is dropped and remade.
DEAD_AFTER = 20
DEAD_MIN = 1.0
#: C{Retry-After} seconds of a refusal decided by C{on_error: deny}.
DENY_RETRY = 1.0
#: Bucket kinds that fall back to in-process buckets (not C{on_error}) when Redis cannot answer.
LOCAL_FALLBACK = frozenset({"input", "auth"})
#: Seconds a lease's spare tokens are kept after they were granted (the key's last grant);
#: then they are given back to the bucket (by the sweep, every L{SWEEP_SECONDS}).
LEASE_SECONDS = 1.0
SWEEP_SECONDS = 0.25
#: Upper bounds (seconds) of the latency histogram's buckets (plus +Inf).
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class RedisError(Exception):
    """Redis answered an error (C{-ERR ...}), or the connection failed."""


class RedisTimeout(RedisError):
    """Redis did not answer within C{timeout_ms}."""


@attr.s(slots=True, auto_attribs=True)
class RedisStats:
    """
    What the Redis backend did, for C{/readyz} and the metrics endpoint (all counters only
    grow, from the process's start).

    @ivar connected: a connection is up and its handshake done.
    @ivar connects: connections made (handshake done).
    @ivar disconnects: connections lost or dropped.
    @ivar commands: takes sent to Redis.
    @ivar errors: takes that failed (an error reply, a lost connection).
    @ivar timeouts: takes not answered within C{timeout_ms}.
    @ivar unavailable: takes answered by C{on_error} at once, with no connection.
    @ivar onError: decisions made without Redis (errors + timeouts + unavailable): by the
        C{on_error} rule, or by the local fallback buckets of the input limit and auth throttle.
    @ivar lateReplies: replies that came after their take had timed out (dropped).
    @ivar leased: takes allowed from a lease's spare tokens, without asking Redis.
    @ivar leaseFetches: leases asked for in the background (prefetches).
    @ivar givebacks: give-backs sent (one per key whose spares expired).
    @ivar givenBack: spare tokens given back.
    @ivar leaseErrors: prefetches and give-backs that failed, timed out or could not be sent
        (they never decide a call).
    @ivar latencyCounts: answered takes by latency, one count per L{LATENCY_BOUNDS} bound and a
        last one for larger (not cumulative).
    @ivar latencySum: seconds, over every answered take.
    @ivar latencyCount: answered takes.
    @ivar lastError: the last connection or command problem, or C{None}.
    """

    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    commands: int = 0
    errors: int = 0
    timeouts: int = 0
    unavailable: int = 0
    onError: int = 0
    lateReplies: int = 0
    leased: int = 0
    leaseFetches: int = 0
    givebacks: int = 0
    givenBack: int = 0
    leaseErrors: int = 0
    latencyCounts: list[int] = attr.Factory(lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latencySum: float = 0.0
    latencyCount: int = 0
    lastError: str | None = None

    def observe(self, seconds: float) -> None:
        """One answered take took C{seconds}."""
        i = 0
        for bound in LATENCY_BOUNDS:
            if seconds <= bound:
                break
            i += 1
        self.latencyCounts[i] += 1
        self.latencySum += seconds
        self.latencyCount += 1

    def asDict(self) -> dict[str, Any]:
        """The counters as a JSON-ready mapping (C{/readyz})."""
        return {
            "connected": self.connected,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "commands": self.commands,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "unavailable": self.unavailable,
            "decided_without_redis": self.onError,
            "late_replies": self.lateReplies,
            "leased": self.leased,
            "lease_fetches": self.leaseFetches,
            "given_back": self.givenBack,
            "lease_errors": self.leaseErrors,
            "latency_ms_avg": (
                round(self.latencySum / self.latencyCount * 1000, 3) if self.latencyCount else None
            ),
            "last_error": self.lastError,
        }


class RedisProtocol(Protocol):
    """
    A pipelined RESP client: each command is written at once; replies, which Redis sends in
    order, are matched to the oldest outstanding command. Every command has a deadline; one
    timer (not one per command) fails the commands whose deadline passed, in order.

    @ivar onLost: called with the reason when the connection is gone.
    """

    def __init__(self, reactor: Any, stats: RedisStats, timeout: float) -> None:
        self._reactor = reactor
        self._stats = stats
        self.timeout = timeout
        #: Outstanding commands, oldest first: [deferred, deadline, sent].
        self._pending: deque[tuple[Deferred[Any], float, float]] = deque()
        #: How many of the oldest outstanding commands have timed out already (always a
        #: prefix: deadlines grow in sending order). Their replies are dropped.
        self._expired = 0
        self._timer: Any = None
        self._reader = hiredis.Reader()
        self.onLost: Any = None

    def connectionMade(self) -> None:
        # One small command per take: never wait for Nagle (not every transport has the knob).
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)

    def execute(self, *args: bytes | str, timeout: float | None = None) -> Deferred[Any]:
        """
        Send one command.

        @param timeout: seconds to wait for its reply (default: L{timeout}); only the commands
            sent before any other (the handshake) may use another.
        @return: a Deferred firing with the reply, or failing with L{RedisError} (an error
            reply, a lost connection) or L{RedisTimeout}.
        """
        d: Deferred[Any] = Deferred()
        now = self._reactor.seconds()
        deadline = now + (self.timeout if timeout is None else timeout)
        pending = self._pending
        data = hiredis.pack_command(args)  # type: ignore[arg-type]
        if pending:
            # Others are on their way: queue it, so that every command of this reactor turn
            # goes out in one send (pipelining).
            self.transport.write(data)  # type: ignore[union-attr]
        else:
            # An idle connection: send now rather than on the reactor's next pass.
            eagerWrite(self.transport, data)
        pending.append((d, deadline, now))
        timer = self._timer
        if timer is None:
            self._timer = self._reactor.callLater(deadline - now, self._expire)
        elif timer.getTime() > deadline:  # it waits for a silent connection's end: sooner
            timer.reset(deadline - now)
        return d

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        stats = self._stats
        now = self._reactor.seconds()
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as e:
                stats.lastError = f"protocol error: {e}"
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            if reply is False:
                return
            if not pending:
                stats.lastError = "a reply nobody asked for"
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            d, _, sent = pending.popleft()
            if self._expired:
                self._expired -= 1
                stats.lateReplies += 1
                continue
            stats.observe(now - sent)
            if isinstance(reply, hiredis.ReplyError):
                d.errback(RedisError(str(reply)))
            else:
                d.callback(reply)

    def _expire(self) -> None:
        """The timer: fail the commands whose deadline passed; drop a connection gone silent."""
        self._timer = None
        now = self._reactor.seconds()
        pending = self._pending
        i = self._expired
        while i < len(pending) and pending[i][1] <= now:
            self._expired = i + 1
            pending[i][0].errback(RedisTimeout(f"no answer within {self.timeout * 1000:g} ms"))
            i += 1
        if self._expired and now - pending[0][2] >= max(DEAD_MIN, DEAD_AFTER * self.timeout):
            self._stats.lastError = "Redis stopped answering; reconnecting"
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        if i < len(pending):
            when = pending[i][1]
            if self._expired:
                when = min(when, pending[0][2] + max(DEAD_MIN, DEAD_AFTER * self.timeout))
            self._timer = self._reactor.callLater(max(0.0, when - now), self._expire)
        elif self._expired:
            dead = pending[0][2] + max(DEAD_MIN, DEAD_AFTER * self.timeout)
            self._timer = self._reactor.callLater(max(0.0, dead - now), self._expire)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, deque()
        expired, self._expired = self._expired, 0
        error = RedisError(f"connection lost: {reason.getErrorMessage()}")
        for n, (d, _, _) in enumerate(pending):
            if n >= expired:
                d.errback(error)
        if self.onLost is not None:
            self.onLost(reason)


class Lease:
    """
    The spare tokens this process holds for one Redis key.

    @ivar count: spare tokens (each one taken from the bucket in Redis, not yet used).
    @ivar expires: when they are given back (L{LEASE_SECONDS} after the last grant).
    @ivar fetching: a take or prefetch asking for tokens of this key is on its way.
    @ivar more: the last answer granted all that was asked (the bucket was above half full):
        a prefetch may get more.
    @ivar args: the bucket's rate and burst, as sent (for the give-back).
    """

    __slots__ = ("args", "count", "expires", "fetching", "more")

    def __init__(self, expires: float, args: tuple[bytes, bytes]) -> None:
        self.count = 0
        self.expires = expires
        self.fetching = False
        self.more = False
        self.args = args


@implementer(IBuckets)
class RedisBuckets:
    """
    The buckets of one kind, in Redis (keys C{<key_prefix>rl:<kind>:<key>}).

    @ivar lease: the tokens one take asks for (1: no lease; L{lease_size}).
    """

    def __init__(
        self, state: RedisState, kind: str, rate: float, burst: float, maxBuckets: int
    ) -> None:
        self._state = state
        self.kind = kind
        self.rate = rate
        self.burst = burst
        #: The in-process buckets answering for Redis when it cannot (L{LOCAL_FALLBACK}).
        self.local = TokenBuckets(rate, burst, maxBuckets) if kind in LOCAL_FALLBACK else None
        self._prefix = (state.config.key_prefix + "rl:" + kind + ":").encode("utf-8")
        self._rate = repr(float(rate)).encode("ascii")
        self._burst = repr(float(burst)).encode("ascii")
        self.lease = lease_size(state.config.lease_tokens, burst)
        self._leaseArg = str(self.lease).encode("ascii")

    def take(self, key: str, now: float) -> Deferred[float | None] | None:
        """
        Take a token: from this process's lease of the key when it holds a spare one (C{None}
        at once), else on the server (C{now} is not used: the server's clock is).

        @return: C{None} (taken from the lease), or a Deferred that never fails: C{None}
            (taken) or the seconds to wait; when Redis fails or is late, the answer of
            L{withoutRedis}.
        """
        state = self._state
        full = self._prefix + key.encode("utf-8")
        n = self.lease
        lease = None
        if n > 1:
            lease = state.leases.get(full)
            if lease is not None:
                if lease.count and lease.expires > state.clock.seconds():
                    lease.count -= 1
                    state.stats.leased += 1
                    if lease.more and not lease.fetching and lease.count * 2 <= n:
                        self._prefetch(full, lease)
                    return None
                if lease.fetching:
                    n = 1  # tokens are on their way: this take asks for its own only
                elif lease.count:
                    state.expire(full, lease)
                    lease = None
        proto = state.protocol
        if proto is None:
            state.stats.unavailable += 1
            return succeed(self.withoutRedis(key, now))
        state.stats.commands += 1
        if n > 1:
            if lease is None:
                lease = state.leases[full] = Lease(0.0, (self._rate, self._burst))
            lease.fetching = True
            d = proto.execute(
                b"EVALSHA", TAKE_SHA, b"1", full, self._rate, self._burst, self._leaseArg, b"t"
            )
            return d.addCallbacks(
                self._leaseGranted,
                self._leaseFailed,
                callbackArgs=(lease,),
                errbackArgs=(key, now, lease),
            )
        d = proto.execute(b"EVALSHA", TAKE_SHA, b"1", full, self._rate, self._burst, b"1", b"t")
        return d.addCallbacks(_waitOf, self._failed, errbackArgs=(key, now))

    def withoutRedis(self, key: str, now: float) -> float | None:
        """The answer when Redis cannot give one: the local buckets', or C{on_error}'s."""
        self._state.stats.onError += 1
        if self.local is not None:
            return self.local.take(key, now)
        return self._state.errorAnswer()

    def _failed(self, failure: Failure, key: str, now: float) -> float | None:
        self._state.takeFailed(failure)
        return self.withoutRedis(key, now)

    # -- leases --------------------------------------------------------------------------------

    def _leaseGranted(self, reply: list[int], lease: Lease) -> float | None:
        """A take that asked for a lease: one token is the call's, the others are spares."""
        lease.fetching = False
        granted, wait = reply
        if granted > 1:
            lease.count += granted - 1
            lease.expires = self._state.clock.seconds() + LEASE_SECONDS
        lease.more = granted == self.lease
        return None if granted else wait / 1e6

    def _leaseFailed(self, failure: Failure, key: str, now: float, lease: Lease) -> float | None:
        lease.fetching = False
        return self._failed(failure, key, now)

    def _prefetch(self, full: bytes, lease: Lease) -> None:
        """Ask for the rest of the lease in the background (tokens above half the burst)."""
        state = self._state
        proto = state.protocol
        if proto is None:
            return
        want = self.lease - lease.count
        state.stats.leaseFetches += 1
        lease.fetching = True
        d = proto.execute(
            b"EVALSHA", TAKE_SHA, b"1", full, self._rate, self._burst, str(want).encode(), b"p"
        )
        d.addCallbacks(
            self._prefetched,
            self._prefetchFailed,
            callbackArgs=(lease, want),
            errbackArgs=(lease,),
        )

    def _prefetched(self, reply: list[int], lease: Lease, want: int) -> None:
        lease.fetching = False
        granted = reply[0]
        if granted:
            lease.count += granted
            lease.expires = self._state.clock.seconds() + LEASE_SECONDS
        lease.more = granted == want

    def _prefetchFailed(self, failure: Failure, lease: Lease) -> None:
        lease.fetching = False
        lease.more = False  # the next take with no spare asks for itself
        self._state.backgroundFailed(failure)


def _waitOf(reply: list[int]) -> float | None:
    return None if reply[0] else reply[1] / 1e6


@implementer(IStateBackend)
class RedisState(Service):
    """
    C{state.backend: redis}: one connection to Redis, kept up by a C{ClientService}.

    @ivar config: the C{state.redis} section (fixed for the process's life: a reload that
        changes it is logged and takes effect at the next start).
    @ivar stats: L{RedisStats}.
    @ivar protocol: the connected, ready L{RedisProtocol}, or C{None}.
    @ivar clock: the reactor (its C{seconds} dates the leases).
    @ivar leases: the spare tokens this process holds, by Redis key (L{Lease}); kept across
        reloads (the buckets are rebuilt, this state is not).
    """

    name = "state"
    shared = True

    def __init__(
        self, reactor: Any, config: RedisConfig, endpoint: Any = None, clock: Any = None
    ) -> None:
        """
        @param endpoint: the client endpoint to connect with (default: from the URL; tests
            may pass their own).
        @param clock: what dates the leases and runs their sweep (default: C{reactor}).
        """
        self._reactor = reactor
        self.clock = reactor if clock is None else clock
        self.config = config
        self.stats = RedisStats()
        self.leases: dict[bytes, Lease] = {}
        self._sweeper: LoopingCall | None = None
        self.protocol: RedisProtocol | None = None
        tls, host, port, db, user, password = redis_address(config.url)
        self._address = (tls, host, port)
        self._db, self._user, self._password = db, user, password
        self._endpoint = endpoint
        self._timeout = config.timeout_ms / 1000.0
        self._deny = config.on_error == "deny"
        self._loading: Deferred[Any] | None = None
        self._client: ClientService | None = None
        self._stopping = False

    def _clientService(self) -> ClientService:
        reactor = self._reactor
        endpoint = self._endpoint
        if endpoint is None:
            tls, host, port = self._address
            endpoint = HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
            if tls:
                trustRoot: Any = None
                if self.config.ca_file:
                    with open(self.config.ca_file, "rb") as f:
                        trustRoot = Certificate.loadPEM(f.read())
                options = optionsForClientTLS(host, trustRoot=trustRoot)
                endpoint = wrapClientTLS(options, endpoint)
        factory = Factory.forProtocol(lambda: RedisProtocol(reactor, self.stats, self._timeout))
        factory.noisy = False
        return ClientService(
            endpoint,
            factory,
            retryPolicy=backoffPolicy(RETRY_INITIAL, RETRY_MAX),
            clock=reactor,
            prepareConnection=self._prepare,
        )

    # -- IStateBackend -------------------------------------------------------------------------

    def buckets(self, kind: str, rate: float, burst: float, maxBuckets: int) -> RedisBuckets:
        return RedisBuckets(self, kind, rate, burst, maxBuckets)

    def readinessCheck(self) -> tuple[str, bool, Any]:
        """
        Redis's state, shown in C{/readyz} without making the gateway unready: while Redis is
        away the C{on_error} rule decides, and taking every replica out of a load balancer
        because their shared Redis is down would turn fewer limits into no service at all.
        """
        detail = {"backend": "redis", "url": self.config.display, "on_error": self.config.on_error}
        detail.update(self.stats.asDict())
        return ("state", True, detail)

    # -- answers -------------------------------------------------------------------------------

    def errorAnswer(self) -> float | None:
        """The C{on_error} decision: C{None} (allow) or the seconds to wait (deny)."""
        return DENY_RETRY if self._deny else None

    def takeFailed(self, failure: Failure) -> None:
        """A take failed or timed out: count it (and reload the script if Redis lost it)."""
        stats = self.stats
        if failure.check(RedisTimeout):
            stats.timeouts += 1
        else:
            stats.errors += 1
            message = failure.getErrorMessage()
            stats.lastError = message
            if message.startswith("NOSCRIPT"):
                self._loadScript()
            elif not failure.check(RedisError):
                log.failure("state: unexpected error in a Redis take", failure)

    def backgroundFailed(self, failure: Failure) -> None:
        """A prefetch or give-back failed: count it (no call waits for it)."""
        stats = self.stats
        stats.leaseErrors += 1
        message = failure.getErrorMessage()
        if message.startswith("NOSCRIPT"):
            stats.lastError = message
            self._loadScript()
        elif not failure.check(RedisError):
            log.failure("state: unexpected error in a Redis lease", failure)

    # -- leases --------------------------------------------------------------------------------

    def expire(self, full: bytes, lease: Lease) -> Deferred[Any] | None:
        """Forget C{full}'s lease, giving its spare tokens back to the bucket."""
        if self.leases.get(full) is lease:
            del self.leases[full]
        count, lease.count = lease.count, 0
        if not count:
            return None
        proto = self.protocol
        stats = self.stats
        if proto is None:
            stats.leaseErrors += 1  # the tokens are lost: fewer calls allowed, never more
            return None
        stats.givebacks += 1
        stats.givenBack += count
        rate, burst = lease.args
        d = proto.execute(b"EVALSHA", TAKE_SHA, b"1", full, rate, burst, b"%d" % count, b"r")
        return d.addErrback(self.backgroundFailed)

    def sweep(self) -> None:
        """Give back the spares of every lease that expired (and forget those leases)."""
        now = self.clock.seconds()
        expired = [
            (full, lease)
            for full, lease in self.leases.items()
            if lease.expires <= now and not lease.fetching
        ]
        for full, lease in expired:
            self.expire(full, lease)

    # -- the connection ------------------------------------------------------------------------

    def _prepare(self, connected: Any) -> Deferred[None]:
        """A new connection: AUTH, SELECT, SCRIPT LOAD; then it serves takes."""
        # ClientService hands over a proxy of the protocol (to hear of its loss): use ours.
        proto: RedisProtocol = getattr(connected, "_protocol", connected)
        commands: list[tuple[bytes | str, ...]] = []
        if self._password is not None:
            if self._user is not None:
                commands.append((b"AUTH", self._user, self._password))
            else:
                commands.append((b"AUTH", self._password))
        if self._db:
            commands.append((b"SELECT", str(self._db)))
        commands.append((b"SCRIPT", b"LOAD", TAKE_SCRIPT))
        results = [proto.execute(*c, timeout=HANDSHAKE_TIMEOUT) for c in commands]
        d = results[-1]
        errors: list[Failure] = []
        for other in results[:-1]:
            other.addErrback(errors.append)  # reported through the last command

        def ready(sha: Any) -> None:
            if sha != TAKE_SHA:
                raise RedisError(f"SCRIPT LOAD answered {sha!r}")
            proto.onLost = self._lost
            self.protocol = proto
            stats = self.stats
            stats.connected = True
            stats.connects += 1
            stats.lastError = None
            log.info("state: connected to {url}", url=self.config.display)

        def failed(f: Failure) -> Failure:
            # Report the first command's error (a failed AUTH makes the others fail too).
            if errors:
                f = errors[0]
            message = f.getErrorMessage()
            if message != self.stats.lastError:
                log.warn(
                    "state: Redis at {url} refused the connection's setup: {e}",
                    url=self.config.display,
                    e=message,
                )
            self.stats.lastError = message
            # ClientService leaves a connection whose preparation failed open, and would trip
            # over its later loss (no transition for it while waiting to retry): close it
            # ourselves, unheard by ClientService, which retries with its backoff.
            connected._lostNotification = lambda reason: None
            if proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
            return f

        return d.addCallbacks(ready, failed)

    def _lost(self, reason: Failure) -> None:
        self.protocol = None
        stats = self.stats
        stats.connected = False
        stats.disconnects += 1
        if not self._stopping:
            stats.lastError = stats.lastError or reason.getErrorMessage()
            log.warn(
                "state: lost the connection to {url} ({e}); reconnecting, meanwhile on_error "
                "({onError}) decides",
                url=self.config.display,
                e=reason.getErrorMessage(),
                onError=self.config.on_error,
            )

    def _loadScript(self) -> None:
        proto = self.protocol
        if proto is None or self._loading is not None:
            return
        d = self._loading = proto.execute(b"SCRIPT", b"LOAD", TAKE_SCRIPT)

        def done(_: object) -> None:
            self._loading = None

        d.addBoth(done)

    def startService(self) -> None:
        super().startService()
        log.info(
            "state: rate-limit buckets in Redis at {url} (timeout {t:g} ms, on_error {e})",
            url=self.config.display,
            t=self.config.timeout_ms,
            e=self.config.on_error,
        )
        self._client = self._clientService()
        self._client.startService()
        if self.config.lease_tokens == "auto" or int(self.config.lease_tokens) > 1:
            self._sweeper = LoopingCall(self.sweep)
            self._sweeper.clock = self.clock
            self._sweeper.start(SWEEP_SECONDS, now=False)

    def stopService(self) -> Deferred[None]:
        """Give every spare token back (best effort, within C{timeout_ms}), then disconnect."""
        super().stopService()
        self._stopping = True
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.running:
            sweeper.stop()
        givebacks = [self.expire(full, lease) for full, lease in list(self.leases.items())]
        pending = [d for d in givebacks if d is not None]
        client, self._client = self._client, None

        def disconnect(_: object) -> Deferred[None]:
            return client.stopService() if client is not None else succeed(None)

        if pending:
            return DeferredList(pending, consumeErrors=True).addCallback(disconnect)
        return disconnect(None)

    def whenConnected(self) -> Deferred[Any]:
        """Fires once a connection is ready (for tests and benchmarks); needs L{startService}."""
        if self.protocol is not None:
            return succeed(self.protocol)
        assert self._client is not None, "not started"
        return self._client.whenConnected()


__all__ = [
    "LEASE_SECONDS",
    "TAKE_SCRIPT",
    "Lease",
    "RedisBuckets",
    "RedisError",
    "RedisProtocol",
    "RedisState",
    "RedisStats",
    "RedisTimeout",
]
