# -*- test-case-name: tests.test_oauth -*-
"""
mcpgw as the OAuth 2.1 resource server of its upstreams (MCP authorization): JWT access tokens
from the configured issuers are verified here, and the RFC 9728 protected-resource metadata
documents are served.

A token is accepted for the upstream at gateway path P only if:
  - it is a JWS (compact) signed with one of L{ALGORITHMS} (never C{none}, never an HMAC: a
    public key used as an HMAC secret is refused before any key is looked at);
  - its C{iss} is exactly a configured issuer, and the signature verifies with one of that
    issuer's keys (PyJWT's L{jwt.PyJWK}: each key is bound to one algorithm, so a key can only
    verify the algorithm it was published for);
  - C{exp} is present and, like C{nbf}, holds with L{LEEWAY} seconds of leeway;
  - its C{aud} (a string or a list) contains P's resource identifier, C{public_url} + P (a token
    for C{/a} is refused at C{/b});
  - it names the caller in C{principal_claim}; and it carries every C{required_scopes} scope
    (else 403 C{insufficient_scope}). Scopes are read from C{scope} (space-separated) and C{scp}
    (a list or a string).

Keys: a C{jwks_file} is read when the generation is built (so SIGHUP re-reads it); a C{jwks_url}
is fetched with Twisted's non-blocking HTTP client (nothing waits on the reactor thread), its
key set kept across reloads (L{RemoteKeys}), refetched when its cache headers say it is stale
(C{Cache-Control: max-age}, C{Age}, C{Expires}; clamped to L{MIN_TTL}..L{MAX_TTL}), and when a
token names an unknown C{kid}, at most once every L{MIN_REFRESH} seconds. While a refetch runs or
after it failed, requests are verified with the keys already held: an outage of the identity
provider only refuses tokens signed with keys the gateway never saw.

Cost: a verified token is cached under the SHA-256 of its bytes until it expires (and at most
L{CACHE_SIZE} tokens per generation), so a busy client pays one signature check; afterwards a
request costs one SHA-256, one dict lookup and four comparisons. Tokens that
fail for good (bad signature, wrong issuer, malformed) are remembered for L{NEGATIVE_TTL} seconds.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from mcpgw.errors import AuthUnavailable, InsufficientScope, Unauthenticated

if TYPE_CHECKING:
    from jwt import PyJWK

    from mcpgw.config import IssuerConfig, OAuthConfig

__all__ = [
    "ALGORITHMS",
    "LEEWAY",
    "FileKeys",
    "RemoteKeys",
    "TokenInfo",
    "TokenVerifier",
    "jwksFileProblem",
    "keyTable",
    "metadataPath",
]

log = Logger()

#: The only signature algorithms accepted (the token's C{alg} header and each key's binding).
ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
#: Seconds of clock skew allowed on C{exp} and C{nbf}.
LEEWAY = 30.0
#: An unknown C{kid} refetches the issuer's JWKS at most once every this many seconds.
MIN_REFRESH = 5.0
#: Bounds on how long a fetched JWKS is used before it is refetched, whatever its headers say.
MIN_TTL, MAX_TTL = 30.0, 86400.0
#: How long a fetched JWKS is used when its response has no cache headers.
DEFAULT_TTL = 600.0
#: A JWKS response larger than this is refused.
MAX_JWKS_BYTES = 1 << 20
#: Seconds a JWKS fetch may take (connect included).
FETCH_TIMEOUT = 10.0
#: Verified tokens cached per generation (oldest dropped first).
CACHE_SIZE = 10_000
#: Seconds a token that failed for good (signature, issuer, form) stays refused without a check.
NEGATIVE_TTL = 60.0
#: Tokens longer than this are refused unread.
MAX_TOKEN_BYTES = 16384
#: The well-known path prefix of RFC 9728.
WELL_KNOWN = "/.well-known/oauth-protected-resource"

#: The algorithms a JWK without C{alg} may verify, by key type (and curve).
_IMPLIED: dict[object, tuple[str, ...]] = {
    "RSA": ("RS256", "PS256"),
    ("EC", "P-256"): ("ES256",),
    ("OKP", "Ed25519"): ("EdDSA",),
}
_MAX_AGE = re.compile(rb"(?i)(?:^|[,\s])max-age\s*=\s*\"?(\d+)")
_NO_CACHE = re.compile(rb"(?i)(?:^|[,\s])no-(?:cache|store)\b")

KeyTable = dict[tuple[str | None, str], "PyJWK"]


class _Bad(Exception):
    """A token refused for good (cached as such): C{str(e)} says why."""


def keyTable(jwks: object) -> KeyTable:
    """
    The usable signing keys of a JWKS (RFC 7517), by C{(kid, algorithm)}: keys for encryption
    (C{use: enc}), symmetric keys, algorithms outside L{ALGORITHMS} and malformed entries are left
    out. A key without C{alg} is bound to what its type implies (an RSA key to RS256 and PS256).

    @raise ValueError: C{jwks} is not a JSON object with a C{keys} list.
    """
    from jwt import PyJWK
    from jwt.exceptions import PyJWTError

    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError('not a JWKS (a JSON object with a "keys" list)')
    table: KeyTable = {}
    for jwk in jwks["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        alg = jwk.get("alg")
        if alg is not None:
            algorithms: tuple[str, ...] = (alg,) if alg in ALGORITHMS else ()
        else:
            kty = jwk.get("kty")
            algorithms = _IMPLIED.get(kty, ()) or _IMPLIED.get((kty, jwk.get("crv")), ())
        for algorithm in algorithms:
            try:
                table[(kid, algorithm)] = PyJWK(jwk, algorithm)
            except (PyJWTError, ValueError, TypeError, KeyError):
                continue
    return table


def _readFile(path: str) -> KeyTable:
    """
    The key table of a JWKS file.

    @raise ValueError: unreadable, not JSON, not a JWKS, or without one usable key.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    try:
        jwks = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    table = keyTable(jwks)
    if not table:
        raise ValueError(f"holds no usable signing key ({', '.join(ALGORITHMS)})")
    return table


def jwksFileProblem(path: str) -> str | None:
    """What is wrong with a C{jwks_file} (for C{config check}), or C{None}."""
    try:
        _readFile(path)
    except ValueError as e:
        return str(e)
    return None


class FileKeys:
    """An issuer's keys from a JWKS file, read once (a reload builds a new generation)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.table: KeyTable = _readFile(path)

    def current(self, now: float) -> KeyTable | None:
        return self.table

    def refresh(self, now: float) -> Deferred[None] | None:
        return None  # nothing new until SIGHUP


def _ttl(headers: Headers, now: float) -> float:
    """How long a JWKS response may be used, from its cache headers (clamped)."""
    control = b",".join(headers.getRawHeaders(b"cache-control") or [])
    ttl = DEFAULT_TTL
    if _NO_CACHE.search(control):
        ttl = MIN_TTL
    elif (m := _MAX_AGE.search(control)) is not None:
        ttl = float(m[1])
        age = (headers.getRawHeaders(b"age") or [b"0"])[0]
        if age.strip().isdigit():
            ttl -= float(age)
    elif expires := headers.getRawHeaders(b"expires"):
        try:
            when = email.utils.parsedate_to_datetime(expires[0].decode("latin-1")).timestamp()
            dated = headers.getRawHeaders(b"date")
            base = (
                email.utils.parsedate_to_datetime(dated[0].decode("latin-1")).timestamp()
                if dated
                else now
            )
            ttl = when - base
        except (TypeError, ValueError, IndexError):
            ttl = MIN_TTL  # an invalid Expires means already expired (RFC 9111 5.3)
    return min(MAX_TTL, max(MIN_TTL, ttl))


_DONE = Failure(ResponseDone())


class _Collect(Protocol):
    """Collects a response body up to a limit."""

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.finished.called:
                self.finished.errback(ValueError(f"larger than {self.limit} bytes"))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def _agent(reactor: Any, caFile: str | None) -> Agent:
    """A non-persistent HTTP client verifying https against C{caFile} (else the system store)."""
    from twisted.internet import ssl

    if caFile is not None:
        with open(caFile, "rb") as f:
            pem = f.read()
        blocks = re.findall(
            rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL
        )
        certs = [ssl.Certificate.loadPEM(block) for block in blocks]
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.trustRootFromCertificates(certs))
    else:
        policy = BrowserLikePolicyForHTTPS()
    pool = HTTPConnectionPool(reactor, persistent=False)
    return Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=FETCH_TIMEOUT)


class RemoteKeys:
    """
    An issuer's keys from its C{jwks_url}: fetched when first needed, refetched in the background
    when stale, and on demand (unknown C{kid}) at most once every L{MIN_REFRESH} seconds. A
    failed fetch keeps the keys held and is retried no sooner than L{MIN_REFRESH} seconds later.

    @ivar table: the keys held, or C{None} before the first successful fetch.
    @ivar fetches: fetches started (for tests and the log).
    """

    def __init__(self, reactor: Any, url: str, caFile: str | None = None) -> None:
        self._reactor = reactor
        self.url = url
        self.caFile = caFile
        self._agent = _agent(reactor, caFile)
        self.table: KeyTable | None = None
        self._expires = -math.inf
        self._lastAttempt = -math.inf
        self._pending: Deferred[None] | None = None
        self.fetches = 0
        self.lastError: str | None = None

    def current(self, now: float) -> KeyTable | None:
        """The keys held (starting a background refetch when they are stale)."""
        if (
            self.table is not None
            and now >= self._expires
            and self._pending is None
            and now - self._lastAttempt >= MIN_REFRESH
        ):
            self._start(now)
        return self.table

    def refresh(self, now: float) -> Deferred[None] | None:
        """
        Fetch now (or join the fetch in flight), unless one started less than L{MIN_REFRESH}
        seconds ago: then C{None}.

        @return: a Deferred firing (never failing) when the fetch ends, or C{None}.
        """
        if self._pending is None:
            if now - self._lastAttempt < MIN_REFRESH:
                return None
            self._start(now)
            if self._pending is None:
                return succeed(None)  # it ended at once
        d: Deferred[None] = Deferred()
        assert self._pending is not None

        def fire(result: None) -> None:
            d.callback(None)
            return result

        self._pending.addCallback(fire)
        return d

    def _start(self, now: float) -> None:
        self._lastAttempt = now
        self.fetches += 1
        pending: Deferred[None] = self._fetch().addCallbacks(self._fetched, self._failed)
        if not pending.called:
            self._pending = pending

    def _fetch(self) -> Deferred[tuple[Headers, bytes]]:
        headers = Headers({b"Accept": [b"application/json"], b"User-Agent": [b"mcpgw"]})
        d = self._agent.request(b"GET", self.url.encode("ascii"), headers)

        def gotResponse(response: Any) -> Deferred[tuple[Headers, bytes]]:
            body: Deferred[bytes] = Deferred()
            response.deliverBody(_Collect(body, MAX_JWKS_BYTES))
            if response.code != 200:
                return body.addBoth(lambda _: _raise(f"HTTP {response.code}"))
            return body.addCallback(lambda data: (response.headers, data))

        result: Deferred[tuple[Headers, bytes]] = d.addCallback(gotResponse)
        result.addTimeout(FETCH_TIMEOUT, self._reactor)
        return result

    def _fetched(self, result: tuple[Headers, bytes]) -> None:
        self._pending = None
        headers, data = result
        try:
            table = keyTable(orjson.loads(data))
        except (orjson.JSONDecodeError, ValueError) as e:
            self._failed(Failure(e))
            return
        now = self._reactor.seconds()
        self._expires = now + _ttl(headers, now)
        self.table = table
        self.lastError = None
        log.info("oauth: {n} signing key(s) fetched from {url}", n=len(table), url=self.url)

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        self.lastError = failure.getErrorMessage()
        held = "keeping the keys held" if self.table is not None else "no keys held yet"
        log.warn(
            "oauth: fetching {url} failed ({error}); {held}",
            url=self.url,
            error=self.lastError,
            held=held,
        )


def _raise(message: str) -> Any:
    raise ValueError(message)


class TokenInfo:
    """
    What a verified token says, cached until it expires.

    @ivar audiences: its C{aud} values.
    @ivar expires: its C{exp} (seconds since the epoch).
    @ivar notBefore: its C{nbf}, or C{None}.
    @ivar principal: the C{principal_claim} value, as text.
    @ivar scopes: the scopes granted (C{scope} and C{scp}).
    @ivar claims: the whole payload.
    @ivar missing: the C{required_scopes} it lacks.
    @ivar result: the L{mcpgw.auth.AuthResult} made from it (set once, by the authenticator).
    """

    __slots__ = (
        "audiences",
        "claims",
        "expires",
        "issuer",
        "missing",
        "notBefore",
        "principal",
        "result",
        "scopes",
    )

    def __init__(
        self,
        issuer: str,
        audiences: frozenset[str],
        expires: float,
        notBefore: float | None,
        principal: str,
        scopes: frozenset[str],
        claims: dict[str, Any],
        missing: tuple[str, ...],
    ) -> None:
        self.issuer = issuer
        self.audiences = audiences
        self.expires = expires
        self.notBefore = notBefore
        self.principal = principal
        self.scopes = scopes
        self.claims = claims
        self.missing = missing
        self.result: Any = None


_JWS_SHAPE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _b64(segment: bytes) -> bytes:
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def _segments(token: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """
    The unverified header and payload of a compact JWS, its signing input and its signature.

    @raise _Bad: not one (only base64url characters, three segments).
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise _Bad("the token is too long")
    if _JWS_SHAPE.fullmatch(token) is None:
        raise _Bad("not a JWT")
    signingInput, _, signature = token.rpartition(b".")
    head, _, body = signingInput.partition(b".")
    try:
        header = orjson.loads(_b64(head))
        payload = orjson.loads(_b64(body))
        sig = _b64(signature)
    except (binascii.Error, ValueError):
        raise _Bad("not a JWT") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise _Bad("not a JWT")
    return header, payload, signingInput, sig


def _time(claims: dict[str, Any], name: str, required: bool) -> float | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise _Bad(f"no valid {name!r} claim" if required else f"invalid {name!r} claim")
    return float(value)


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Scopes from C{scope} (space-separated) and C{scp} (a list, or a space-separated string)."""
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return frozenset(found)


def metadataPath(path: str) -> str:
    """The gateway path of the metadata document of the upstream at C{path} (RFC 9728 3.1)."""
    return WELL_KNOWN + (path if path != "/" else "")


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class _Resource:
    """One upstream path as a protected resource: its identifier and its challenges."""

    __slots__ = ("identifier", "invalidChallenge", "metadataURL", "missingChallenge", "scope")

    def __init__(self, config: OAuthConfig, path: str) -> None:
        self.identifier = config.resource(path)
        parts = urlsplit(config.public_url)
        prefix = parts.path.rstrip("/")
        self.metadataURL = f"{parts.scheme}://{parts.netloc}{metadataPath(prefix + path)}"
        base = f'Bearer resource_metadata="{_quoted(self.metadataURL)}"'
        self.scope = " ".join(config.required_scopes)
        scope = f', scope="{_quoted(self.scope)}"' if self.scope else ""
        self.missingChallenge = (base + scope).encode("latin-1", "replace")
        self.invalidChallenge = (base + ', error="invalid_token"').encode("latin-1", "replace")

    def invalid(self, detail: str) -> Unauthenticated:
        return Unauthenticated(detail, challenge=self.invalidChallenge, auth_result="invalid")

    def missing(self) -> Unauthenticated:
        return Unauthenticated(challenge=self.missingChallenge, auth_result="missing")


class TokenVerifier:
    """
    The token checks of one generation (see the module docstring).

    @ivar documents: gateway path -> the RFC 9728 metadata document (JSON bytes) served there.
    @ivar sources: issuer -> its keys (L{FileKeys} or L{RemoteKeys}).
    """

    def __init__(
        self,
        reactor: Any,
        config: OAuthConfig,
        paths: Iterable[str],
        previous: TokenVerifier | None = None,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._principal = config.principal_claim
        self._required = config.required_scopes
        self._cache: dict[bytes, TokenInfo | tuple[str, float]] = {}
        reuse = previous._remote() if previous is not None else {}
        self.sources: dict[str, FileKeys | RemoteKeys] = {}
        for issuer in config.issuers:
            self.sources[issuer.issuer] = _source(reactor, issuer, reuse)
        paths = list(paths)
        self._resources = {p.encode(): _Resource(config, p) for p in paths}
        self.documents: dict[bytes, bytes] = {}
        for p in paths:
            doc = orjson.dumps(
                {
                    "resource": config.resource(p),
                    "authorization_servers": [i.issuer for i in config.issuers],
                    "scopes_supported": list(config.scopes_supported),
                    "bearer_methods_supported": ["header"],
                }
            )
            self.documents[metadataPath(p).encode()] = doc
            if len(paths) == 1:
                self.documents[WELL_KNOWN.encode()] = doc

    def _remote(self) -> dict[tuple[str, str | None], RemoteKeys]:
        return {(s.url, s.caFile): s for s in self.sources.values() if isinstance(s, RemoteKeys)}

    def missing(self, path: bytes) -> Unauthenticated:
        """The 401 for a request to C{path} without a token."""
        resource = self._resources.get(path)
        if resource is None:
            return Unauthenticated(auth_result="missing")
        return resource.missing()

    def invalid(self, path: bytes, detail: str) -> Unauthenticated:
        """The 401 for a request to C{path} with a credential that is not valid."""
        resource = self._resources.get(path)
        if resource is None:
            return Unauthenticated(detail, auth_result="invalid")
        return resource.invalid(detail)

    def verify(self, token: bytes, path: bytes) -> TokenInfo | Deferred[TokenInfo]:
        """
        The verified token, now (cached, or keys held) or once the issuer's keys are fetched.

        @raise Unauthenticated: (or fails with) the token is not valid for C{path}.
        @raise InsufficientScope: valid, but without every C{required_scopes} scope.
        @raise AuthUnavailable: the issuer's keys could not be fetched and none are held.
        """
        resource = self._resources[path]
        digest = hashlib.sha256(token).digest()
        now = self._reactor.seconds()
        entry = self._cache.get(digest)
        if entry is not None:
            if type(entry) is TokenInfo:
                return self._check(entry, resource, now)
            detail, until = entry  # type: ignore[misc]
            if until > now:
                raise resource.invalid(detail)
            del self._cache[digest]
        return self._verify(token, digest, resource, now, True)

    def _check(self, info: TokenInfo, resource: _Resource, now: float) -> TokenInfo:
        """The per-request checks of a verified token."""
        if now >= info.expires + LEEWAY:
            raise resource.invalid("the token has expired")
        if info.notBefore is not None and now < info.notBefore - LEEWAY:
            raise resource.invalid("the token is not valid yet (nbf)")
        if resource.identifier not in info.audiences:
            raise resource.invalid(f"the token's audience (aud) is not {resource.identifier}")
        if info.missing:
            raise InsufficientScope(
                f"the token lacks the scope(s) {' '.join(info.missing)}",
                challenge=(
                    f'Bearer resource_metadata="{_quoted(resource.metadataURL)}", '
                    f'error="insufficient_scope", scope="{_quoted(resource.scope)}"'
                ).encode("latin-1", "replace"),
                principal=info.principal,
            )
        return info

    def _remember(self, digest: bytes, entry: TokenInfo | tuple[str, float]) -> None:
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[digest] = entry

    def _verify(
        self, token: bytes, digest: bytes, resource: _Resource, now: float, fetch: bool
    ) -> TokenInfo | Deferred[TokenInfo]:
        try:
            header, claims, signingInput, signature = _segments(token)
            alg = header.get("alg")
            if alg not in ALGORITHMS:
                raise _Bad(f"the algorithm {alg!r} is not accepted")
            if "crit" in header:
                raise _Bad("critical header extensions are not supported (crit)")
            issuer = claims.get("iss")
            source = self.sources.get(issuer) if isinstance(issuer, str) else None
            if source is None or not isinstance(issuer, str):
                raise _Bad(f"the issuer {issuer!r} is not accepted")
            table = source.current(now)
            kid = header.get("kid")
            if table is None:
                keys = None
            elif kid is not None:
                key = table.get((kid, alg)) if isinstance(kid, str) else None
                keys = [key] if key is not None else None
            else:
                keys = [k for (_, a), k in table.items() if a == alg] or None
            if keys is None:
                if not fetch:
                    if table is None:
                        raise AuthUnavailable(
                            f"the keys of issuer {issuer} could not be fetched", retryAfter=5
                        )
                    raise resource.invalid(f"no key {kid!r} for {alg} from issuer {issuer}")
                d = source.refresh(now)
                if d is None:
                    return self._verify(token, digest, resource, now, False)
                return d.addCallback(
                    lambda _: self._verify(token, digest, resource, self._reactor.seconds(), False)
                )
            info = self._validate(signingInput, signature, keys, issuer, claims)
        except _Bad as e:
            self._remember(digest, (str(e), now + NEGATIVE_TTL))
            raise resource.invalid(str(e)) from None
        self._remember(digest, info)
        return self._check(info, resource, now)

    def _validate(
        self,
        signingInput: bytes,
        signature: bytes,
        keys: list[PyJWK],
        issuer: str,
        claims: dict[str, Any],
    ) -> TokenInfo:
        # Each PyJWK is bound to one algorithm, the token's (the table is keyed by it): its
        # algorithm object verifies with its key. (PyJWS.decode_complete would parse the token
        # again, checking each base64 character in Python: 3/4 of the cost of a verification.)
        for key in keys:
            try:
                if key.Algorithm.verify(signingInput, key.key, signature):
                    break
            except (ValueError, TypeError):
                continue
        else:
            raise _Bad("the signature does not verify")
        expires = _time(claims, "exp", True)
        assert expires is not None
        notBefore = _time(claims, "nbf", False)
        aud = claims.get("aud")
        if isinstance(aud, str):
            audiences = frozenset((aud,))
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            audiences = frozenset(aud)
        else:
            raise _Bad("no valid 'aud' claim")
        principal = claims.get(self._principal)
        if type(principal) in (int, float):
            principal = str(principal)
        if not isinstance(principal, str) or not principal:
            raise _Bad(f"no {self._principal!r} claim (auth.oauth.principal_claim)")
        scopes = _scopes(claims)
        missing = tuple(s for s in self._required if s not in scopes)
        return TokenInfo(issuer, audiences, expires, notBefore, principal, scopes, claims, missing)

    @property
    def cacheSize(self) -> int:
        """Tokens cached (verified or refused)."""
        return len(self._cache)


def _source(
    reactor: Any, issuer: IssuerConfig, reuse: dict[tuple[str, str | None], RemoteKeys]
) -> FileKeys | RemoteKeys:
    if issuer.jwks_file is not None:
        return FileKeys(issuer.jwks_file)
    assert issuer.jwks_url is not None
    old = reuse.get((issuer.jwks_url, issuer.ca_file))
    return old if old is not None else RemoteKeys(reactor, issuer.jwks_url, issuer.ca_file)


def serveMetadata(request: Any, document: bytes) -> None:
    """Answer a metadata request (GET or HEAD: the gateway refuses others) with C{document}."""
    headers = request.responseHeaders
    headers.setRawHeaders(b"Content-Type", [b"application/json"])
    headers.setRawHeaders(b"Content-Length", [b"%d" % len(document)])
    headers.setRawHeaders(b"Cache-Control", [b"max-age=300"])
    headers.setRawHeaders(b"Access-Control-Allow-Origin", [b"*"])
    if request.method != b"HEAD":
        request.write(document)
    request.finish()
