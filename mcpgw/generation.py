# -*- test-case-name: tests.test_generation -*-
"""
A generation: every runtime object one parsed config needs, built together and swapped by one
reference. A request keeps the generation it started with until it ends.

Upstream connection pools outlive generations: a new generation reuses the pool of an upstream
whose address and timeouts did not change, so a reload drops no keep-alive connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attr
from twisted.internet.ssl import optionsForClientTLS

from mcpgw.auth import MISS_BURST, MISS_RATE, Authenticator
from mcpgw.buckets import MemoryState
from mcpgw.config import Config, ListenConfig, UpstreamConfig
from mcpgw.errors import HostNotAllowed, OriginNotAllowed
from mcpgw.interfaces import IBuckets, IStateBackend
from mcpgw.pinning import readLock
from mcpgw.policy import Policy
from mcpgw.proxy.mcpheaders import ToolHeaders
from mcpgw.proxy.upstream import UpstreamPool
from mcpgw.tls import ServerTLS, loadServerTLS

#: At most this many client addresses are tracked by the input rate limit (oldest dropped).
MAX_ADDRESSES = 1_000_000

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def isLoopback(host: str) -> bool:
    """
    @return: whether a listen address is a loopback address or name.
    """
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostPart(value: str) -> str:
    """C{example.com:8080} -> C{example.com}; C{[::1]:80} -> C{[::1]}."""
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HostGuard:
    """
    DNS-rebinding protection from C{listen.allowed_hosts} and C{listen.allowed_origins}.

    @ivar anyHost: every C{Host} is accepted (non-loopback listener, no list configured).
    @ivar hostsExact: accepted C{host:port} values (lower case).
    @ivar hostsAnyPort: accepted host names on any port (lower case).
    @ivar origins: accepted origins (lower case), or C{None} for the loopback rule.
    @ivar loopbackOrigins: accept loopback origins (loopback listener, no list configured).
    """

    anyHost: bool
    hostsExact: frozenset[bytes]
    hostsAnyPort: frozenset[bytes]
    origins: frozenset[bytes]
    loopbackOrigins: bool

    @classmethod
    def fromConfig(cls, listen: ListenConfig) -> HostGuard:
        loopback = isLoopback(listen.host)
        exact: set[bytes] = set()
        anyPort: set[bytes] = set()
        for h in listen.allowed_hosts:
            h = h.lower()
            (exact if _hostPart(h) != h else anyPort).add(h.encode())
        if not listen.allowed_hosts and loopback:
            anyPort = {n.encode() for n in ("localhost", "127.0.0.1", "[::1]")}
        return cls(
            anyHost=not listen.allowed_hosts and not loopback,
            hostsExact=frozenset(exact),
            hostsAnyPort=frozenset(anyPort),
            origins=frozenset(o.lower().rstrip("/").encode() for o in listen.allowed_origins),
            loopbackOrigins=not listen.allowed_origins and loopback,
        )

    def check(self, host: bytes | None, origin: bytes | None) -> None:
        """
        @raise HostNotAllowed: C{host} is not accepted.
        @raise OriginNotAllowed: C{origin} is present and not accepted.
        """
        if not self.anyHost:
            h = (host or b"").lower()
            if (
                h not in self.hostsExact
                and _hostPart(h.decode("latin-1")).encode("latin-1") not in self.hostsAnyPort
            ):
                raise HostNotAllowed(f"Host {h.decode('latin-1')!r} is not allowed")
        if origin is not None:
            o = origin.lower().rstrip(b"/")
            if o in self.origins:
                return
            if self.loopbackOrigins:
                parts = urlsplit(o.decode("latin-1"))
                name = parts.hostname or ""
                if parts.scheme in ("http", "https") and (
                    name in ("localhost", "127.0.0.1") or name == "::1"
                ):
                    return
            raise OriginNotAllowed(f"Origin {origin.decode('latin-1')!r} is not allowed")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Route:
    """
    One upstream as the hot path needs it: bytes precomputed once per generation.

    @ivar hostHeader: the C{Host} value the upstream gets (its own).
    @ivar target: the upstream request target (path and query of its URL).
    @ivar injected: C{upstreams[].headers} as C{(name, value)} byte pairs.
    @ivar injectedNames: their lower-case names (client headers of these names are replaced).
    @ivar toolHeaders: the C{x-mcp-header} annotations seen in this upstream's C{tools/list}
        answers (kept across reloads with the pool; dropped with the upstream).
    """

    config: UpstreamConfig
    name: str
    pool: UpstreamPool
    hostHeader: bytes
    target: bytes
    injected: tuple[tuple[bytes, bytes], ...]
    injectedNames: frozenset[bytes]
    toolHeaders: ToolHeaders


def _poolKey(u: UpstreamConfig) -> tuple[Any, ...]:
    return (u.name, u.scheme, u.host, u.port, u.timeouts.connect, u.timeouts.response)


def makePool(reactor: Any, u: UpstreamConfig) -> UpstreamPool:
    """A connection pool for upstream C{u}."""
    tls = optionsForClientTLS(u.host) if u.scheme == "https" else None
    return UpstreamPool(
        reactor, u.name, u.scheme, u.host, u.port, u.timeouts.connect, u.timeouts.response, tls
    )


def makeRoute(
    u: UpstreamConfig, pool: UpstreamPool, toolHeaders: ToolHeaders | None = None
) -> Route:
    """Precompute the hot-path bytes of upstream C{u}."""
    default = 443 if u.scheme == "https" else 80
    host = u.host if ":" not in u.host else f"[{u.host}]"
    hostHeader = host if u.port == default else f"{host}:{u.port}"
    injected = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in u.headers)
    return Route(
        config=u,
        name=u.name,
        pool=pool,
        hostHeader=hostHeader.encode("ascii"),
        target=u.target,
        injected=injected,
        injectedNames=frozenset(k.lower() for k, _ in injected),
        toolHeaders=toolHeaders if toolHeaders is not None else ToolHeaders(),
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Generation:
    """
    Everything built from one config.

    @ivar number: 1 for the config the process started with, then +1 per successful reload.
    @ivar routes: gateway path (bytes) -> L{Route}.
    @ivar policy: the compiled policy (rate-limit buckets of unchanged rules carried over).
    @ivar auth: the authenticator, with caches of its own (a reload starts them empty).
    @ivar inputLimit: the per-address buckets of C{limits.input_rate_limit}, or C{None}.
    @ivar tls: the listener's TLS options (context built, so the files are known good), or
        C{None} without C{tls}.
    @ivar toolLock: the tool pinning lock file, C{(upstream, tool) -> SHA-256 hex} (empty when
        C{tools.pinning.mode} is off; L{mcpgw.pinning}).
    @ivar state: where token buckets live (C{state.backend}); the process's first generation's,
        kept by every later one (changing C{state} takes a restart).
    """

    number: int
    config: Config
    routes: dict[bytes, Route]
    hostGuard: HostGuard
    maxBodyBytes: int
    policy: Policy
    auth: Authenticator
    inputLimit: IBuckets | None
    tls: ServerTLS | None = None
    toolLock: Mapping[tuple[str, str], str] = attr.Factory(dict)
    state: IStateBackend = attr.ib(factory=MemoryState)

    @property
    def pools(self) -> list[UpstreamPool]:
        """The connection pools of this generation's upstreams."""
        return [r.pool for r in self.routes.values()]


def _inputLimit(
    config: Config, previous: Generation | None, state: IStateBackend
) -> IBuckets | None:
    """The per-address input buckets; unchanged settings keep the previous generation's."""
    spec = config.limits.input_rate_limit
    if spec is None:
        return None
    old = previous.inputLimit if previous is not None else None
    if old is not None and (old.rate, old.burst) == (spec.rate, spec.burst):
        return old
    return state.buckets("input", spec.rate, spec.burst, MAX_ADDRESSES)


def buildGeneration(
    reactor: Any,
    config: Config,
    number: int = 1,
    previous: Generation | None = None,
    authPool: Any = None,
    state: IStateBackend | None = None,
) -> Generation:
    """
    Build a complete generation from a validated config, reusing the previous generation's pools
    where an upstream's address and timeouts are unchanged.

    @param state: where token buckets live (default: the previous generation's, else this
        process's memory).

    @raise mcpgw.tls.TLSError: the TLS files are unusable (the reload is rejected).
    @raise mcpgw.pinning.LockError: the tool pinning lock file is unreadable or malformed (the
        reload is rejected).
    """
    toolLock: dict[tuple[str, str], str] = {}
    if config.tools.pinning.mode != "off":
        toolLock = readLock(config.tools.pinning.lock_file)
    tls = None
    if config.tls is not None:
        tls = loadServerTLS(config.tls, previous.tls if previous is not None else None)
    oldRoutes = {}
    if previous is not None:
        oldRoutes = {_poolKey(r.config): r for r in previous.routes.values()}
    routes = {}
    for u in config.upstreams:
        old = oldRoutes.get(_poolKey(u))
        if old is not None:
            routes[u.path.encode()] = makeRoute(u, old.pool, old.toolHeaders)
        else:
            routes[u.path.encode()] = makeRoute(u, makePool(reactor, u))
    if state is None:
        state = previous.state if previous is not None else MemoryState()
    pc = config.policy
    policy = Policy.fromConfig(pc, previous.policy if previous is not None else None, state)
    # A memory throttle starts empty with each generation (as its key cache does); a shared one
    # is the same buckets whatever the generation.
    throttle = state.buckets("auth", MISS_RATE, MISS_BURST, 1_000_000)
    return Generation(
        number=number,
        config=config,
        routes=routes,
        hostGuard=HostGuard.fromConfig(config.listen),
        maxBodyBytes=config.limits.max_body_bytes,
        policy=policy,
        auth=Authenticator(
            reactor,
            config.auth,
            config.tls,
            authPool,
            throttle,
            paths=tuple(u.path for u in config.upstreams),
            previous=previous.auth if previous is not None else None,
            stats=previous.auth.stats if previous is not None else None,
        ),
        inputLimit=_inputLimit(config, previous, state),
        tls=tls,
        toolLock=toolLock,
        state=state,
    )
