# -*- test-case-name: tests.test_auth -*-
"""
Inbound authentication: external (an auth proxy in front), mTLS identity, or Argon2id API keys.

Which applies, per generation:
  - C{auth.enabled: true} with keys: C{Authorization: Bearer <key>} is required and checked
    against the configured Argon2id hashes (C{auth_result} C{ok}, C{missing} or C{invalid}); with
    C{tls.client_ca} as well, the certificate gates the connection and its identity is recorded in
    the audit field C{client_cert}.
  - C{tls.client_ca} without API keys: the verified client certificate is the caller
    (C{auth_result: mtls}, C{auth_key_id} = SPIFFE URI SAN, else subject CN).
  - C{auth.enabled: true} with C{auth.oauth}: C{Authorization: Bearer <token>} carries an OAuth
    access token, verified by L{mcpgw.oauth.TokenVerifier} for the upstream the request is for
    (C{auth_result} C{oauth}; the principal is the C{principal_claim}; the token's claims and
    scopes go to policy). With API keys as well, an C{mcpgw_} credential is checked as an API
    key and anything else as a token. A missing or invalid credential then gets the upstream's
    OAuth challenge (C{resource_metadata}), so MCP clients find where to log in.
  - otherwise: C{auth_result: external}.
Without API keys, C{auth.external} names the header in which an auth proxy in front of mcpgw
names the caller: a request from a trusted proxy (its peer address in C{trusted_proxies}) carrying
it is the caller it names (C{auth_result: external}, the principal its value); from any other
peer the header is ignored, and the gateway removes it (L{Authenticator.headersToDrop}) so that
no upstream takes a client's word for who it is.

Every result names a principal, the identity policy's C{when.identities} sees: the key id, the
certificate identity, or the identity the proxy vouched for (L{AuthResult.caller}).

Argon2 never runs on the reactor thread: verifications go to a dedicated, bounded thread pool.
Results (good and bad) are cached under an HMAC of the presented secret (keyed with a per-process
random key, so neither the secret nor an offline-attackable hash of it is kept), for
L{CACHE_TTL} seconds and at most L{CACHE_SIZE} entries, so steady traffic pays a dict lookup.
Cache misses are throttled per client address and globally, so a brute-force loop cannot keep
the pool busy: excess attempts get 429 (C{data.scope: auth}) without any Argon2 work. A new
generation (SIGHUP) starts with empty caches: a removed key fails at once, a new one works.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import attr
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mcpgw.buckets import TokenBuckets
from mcpgw.config import AuthConfig, TLSConfig
from mcpgw.errors import RateLimited, Unauthenticated
from mcpgw.interfaces import IAuthenticator, IBuckets
from mcpgw.oauth import TokenInfo, TokenVerifier
from mcpgw.policy import Caller, Network, addressIn, networks

#: Seconds a verification result stays cached.
CACHE_TTL = 300.0
#: Cached verification results per generation (least recently used dropped first).
CACHE_SIZE = 10_000
#: Argon2 verifications of uncached keys allowed per client address: rate per second and burst.
MISS_RATE, MISS_BURST = 1.0, 10.0
#: Argon2 verifications queued or running at once, all clients together.
MAX_PENDING = 16
#: Prefix of keys made by C{mcpgw key generate}.
KEY_PREFIX = "mcpgw_"
KEY_PREFIX_BYTES = KEY_PREFIX.encode()

#: A token shaped like an mcpgw API key (what C{mcpgw key generate} makes, or a near miss).
_KEY_SHAPED = re.compile(rb"mcpgw_[A-Za-z0-9_-]{8,}")

_hasher = PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4 (argon2-cffi's RFC 9106 defaults)


def _defaultPrincipal(result: AuthResult) -> str | None:
    return result.keyId if result.keyId is not None else result.clientCert


@attr.frozen
class AuthResult:
    """
    Who the caller is.

    @ivar result: C{ok}, C{oauth}, C{mtls} or C{external} (failures are raised as
        L{Unauthenticated}).
    @ivar keyId: the API key id or the certificate identity.
    @ivar clientCert: the verified client certificate identity, if any.
    @ivar principal: the identity policy matches C{when.identities} against (the audit field
        C{principal}): the key id, else the certificate identity (so the part-1 constructor
        calls keep their meaning), or the identity a trusted auth proxy named; C{None} when
        anonymous.
    @ivar claims: an OAuth token's claims (C{when.claims}), else C{None}.
    @ivar scopes: an OAuth token's scopes (C{when.scopes}).
    """

    result: str
    keyId: str | None = None
    clientCert: str | None = None
    principal: str | None = attr.field(default=attr.Factory(_defaultPrincipal, takes_self=True))
    claims: Mapping[str, object] | None = attr.field(default=None, eq=False)
    scopes: frozenset[str] = frozenset()

    def caller(self, client: str | None, session: str | None) -> Caller:
        """
        The caller policy decides for: the key id only for an API key (C{ok}; an mTLS result's
        C{keyId} is a certificate identity, not a key), the principal, the client address and
        the MCP session.
        """
        return Caller(
            keyId=self.keyId if self.result == "ok" else None,
            principal=self.principal,
            client=client,
            session=session,
            claims=self.claims,
            scopes=self.scopes,
        )


EXTERNAL = AuthResult("external")


def generateKey() -> str:
    """A new API key: C{mcpgw_} and 256 random bits, base64url."""
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hashKey(key: str) -> str:
    """The Argon2id hash of C{key} to put under C{auth.keys[].hash}."""
    return _hasher.hash(key)


def _verifyAll(hashes: tuple[tuple[str, str], ...], presented: bytes) -> str | None:
    """Runs in the Argon2 pool: the id of the first key whose hash matches, or None."""
    for keyId, h in hashes:
        try:
            if _hasher.verify(h, presented):
                return keyId
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            continue
    return None


@attr.s(slots=True, auto_attribs=True)
class AuthStats:
    """
    API key checks since the start (kept across reloads, for the metrics).

    @ivar hits: answered from the verification cache.
    @ivar misses: sent to Argon2.
    @ivar throttled: refused with 429 before any Argon2 work.
    """

    hits: int = 0
    misses: int = 0
    throttled: int = 0


@implementer(IAuthenticator)
class Authenticator:
    """
    The authentication of one generation.

    @ivar mode: C{keys} (API keys, OAuth tokens or both), C{mtls} or C{external}.
    @ivar oauth: the token verifier (C{auth.oauth}), or C{None}.
    @ivar documents: gateway path -> RFC 9728 metadata document (empty without C{auth.oauth}).
    @ivar identityHeader: the lower-case name of C{auth.external.identity_header}, or C{None}.
    @ivar dropHeaders: the lower-case names of the headers the gateway removes before forwarding
        a request from a peer that is not a trusted proxy (L{headersToDrop}).
    """

    def __init__(
        self,
        reactor: Any,
        auth: AuthConfig,
        tls: TLSConfig | None,
        pool: ThreadPool | None,
        throttle: IBuckets | None = None,
        paths: tuple[str, ...] = (),
        previous: Authenticator | None = None,
        stats: AuthStats | None = None,
    ) -> None:
        """
        @param paths: the upstreams' gateway paths (each a protected resource with C{auth.oauth}).
        @param previous: the authenticator of the generation being replaced: JWKS fetched from
            URLs that did not change are kept (a reload does not refetch them).
        """
        self._reactor = reactor
        self.stats = stats if stats is not None else AuthStats()
        self._hashes = tuple((k.id, k.hash) for k in auth.keys)
        self.oauth: TokenVerifier | None = None
        self.documents: dict[bytes, bytes] = {}
        if auth.enabled and auth.oauth is not None:
            self.oauth = TokenVerifier(
                reactor,
                auth.oauth,
                paths,
                previous.oauth if previous is not None else None,
            )
            self.documents = self.oauth.documents
        if auth.enabled and (self._hashes or self.oauth is not None):
            self.mode = "keys"
        elif tls is not None and tls.client_ca is not None:
            self.mode = "mtls"
        else:
            self.mode = "external"
        self._pool = pool
        self._secret = os.urandom(32)
        self._cache: OrderedDict[bytes, tuple[str | None, float]] = OrderedDict()
        self._pending: dict[bytes, Deferred[str | None]] = {}
        #: The result of each valid key id (without a client certificate), made once.
        self._keyResults: dict[str, AuthResult] = {}
        #: The lengths of the valid keys verified so far (see L{carriesKey}).
        self._validLengths: set[int] = set()
        self._throttle: IBuckets = (
            throttle if throttle is not None else TokenBuckets(MISS_RATE, MISS_BURST, 1_000_000)
        )
        external = auth.external if _usesExternal(self.mode) else None
        self.identityHeader: bytes | None = None
        self._trusted: tuple[Network, ...] = ()
        self.dropHeaders: frozenset[bytes] = frozenset()
        if external is not None:
            self.identityHeader = external.identity_header.lower().encode("ascii")
            self._trusted = networks(external.trusted_proxies)
            self.dropHeaders = frozenset({self.identityHeader})

    def trusts(self, clientAddress: str | None) -> bool:
        """Whether C{clientAddress} is a trusted proxy's (C{auth.external.trusted_proxies})."""
        return addressIn(clientAddress, self._trusted)

    def headersToDrop(self, clientAddress: str | None) -> frozenset[bytes]:
        """
        The lower-case header names to remove before forwarding a request from C{clientAddress}:
        the identity header, unless a trusted proxy sent it (then the upstream may read it too).
        """
        if not self.dropHeaders or self.trusts(clientAddress):
            return frozenset()
        return self.dropHeaders

    def authenticate(
        self,
        authorization: bytes | None,
        clientAddress: str,
        certIdentity: str | None,
        identity: bytes | None = None,
        path: bytes = b"",
    ) -> AuthResult | Deferred[AuthResult]:
        """
        @param authorization: the request's C{Authorization} header value.
        @param certIdentity: the verified client certificate identity (mTLS), if any.
        @param identity: the value of the request's L{identityHeader}, if it has one (the
            gateway passes C{None} when the header is absent; a header sent twice should be
            refused as ambiguous before this is called).
        @param path: the gateway path (which upstream, so which token audience).
        @return: the result now (cached or no keys) or a Deferred of it (Argon2 on the pool).
        @raise Unauthenticated: missing or malformed credentials (or, via the Deferred, invalid).
        @raise RateLimited: too many uncached verifications from this address, or overall.
        """
        mode = self.mode
        if identity is not None and self.identityHeader is not None:
            vouched = _identityText(identity)
            if vouched is not None and self.trusts(clientAddress):
                return AuthResult("external", None, certIdentity, vouched)
        if mode == "external":
            return EXTERNAL if certIdentity is None else AuthResult("external", None, certIdentity)
        if mode == "mtls":
            return AuthResult("mtls", certIdentity, certIdentity)
        presented = bearerToken(authorization)
        oauth = self.oauth
        if oauth is not None:
            if presented is None:
                raise oauth.missing(path)
            if not self._hashes or not presented.startswith(KEY_PREFIX_BYTES):
                return self._token(oauth, presented, path, certIdentity)
        elif presented is None:
            raise Unauthenticated(auth_result="missing")
        digest = self._cacheKey(presented)
        now = self._reactor.seconds()
        entry = self._cache.get(digest)
        if entry is not None and entry[1] > now:
            self._cache.move_to_end(digest)
            self.stats.hits += 1
            return self._result(entry[0], certIdentity, path)
        pending = self._pending.get(digest)
        if pending is None:
            wait = self._throttle.take(clientAddress, now)
            if isinstance(wait, Deferred):  # a shared throttle (Redis) answers later
                return wait.addCallback(self._throttled, digest, presented, certIdentity, path)
            return self._throttled(wait, digest, presented, certIdentity, path)
        d: Deferred[str | None] = Deferred()
        pending.addCallback(_fanOut, d)
        return d.addCallback(self._result, certIdentity, path)

    def _throttled(
        self,
        wait: float | None,
        digest: bytes,
        presented: bytes,
        certIdentity: str | None,
        path: bytes,
    ) -> Deferred[AuthResult]:
        """The throttle answered: refuse, or verify the key (or join its verification)."""
        pending = self._pending.get(digest)  # another request may have started it meanwhile
        if pending is None:
            if wait is not None or len(self._pending) >= MAX_PENDING:
                self.stats.throttled += 1
                raise RateLimited(
                    "too many API key verifications; retry later",
                    retryAfter=1 if wait is None else max(1, math.ceil(wait)),
                    scope="auth",
                )
            pending = self._verify(digest, presented)
        self.stats.misses += 1
        d: Deferred[str | None] = Deferred()
        pending.addCallback(_fanOut, d)
        return d.addCallback(self._result, certIdentity, path)

    def _token(
        self, oauth: TokenVerifier, token: bytes, path: bytes, certIdentity: str | None
    ) -> AuthResult | Deferred[AuthResult]:
        """An OAuth access token: verified (cached) for the upstream at C{path}."""
        info = oauth.verify(token, path)
        if type(info) is TokenInfo:
            result = info.result
            if result is None:
                result = info.result = _tokenResult(info, None)
            return result if certIdentity is None else _tokenResult(info, certIdentity)
        assert isinstance(info, Deferred)
        return info.addCallback(_tokenResult, certIdentity)

    def _verify(self, digest: bytes, presented: bytes) -> Deferred[str | None]:
        assert self._pool is not None
        d = deferToThreadPool(self._reactor, self._pool, _verifyAll, self._hashes, presented)
        self._pending[digest] = d

        def done(keyId: str | None) -> str | None:
            del self._pending[digest]
            if keyId is not None:
                self._validLengths.add(len(presented))
            self._cache[digest] = (keyId, self._reactor.seconds() + CACHE_TTL)
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return keyId

        return d.addCallback(done)

    def _result(self, keyId: str | None, certIdentity: str | None, path: bytes) -> AuthResult:
        if keyId is None:
            if self.oauth is not None:
                raise self.oauth.invalid(path, "not a valid API key")
            raise Unauthenticated(auth_result="invalid")
        if certIdentity is None:  # the usual case: one (immutable) result per key
            result = self._keyResults.get(keyId)
            if result is None:
                result = self._keyResults[keyId] = AuthResult("ok", keyId)
            return result
        return AuthResult("ok", keyId, certIdentity)

    def _cacheKey(self, presented: bytes) -> bytes:
        """
        The verification cache's key for a presented credential: a keyed BLAKE2b (a MAC) with
        this process's random secret, so neither the key nor an offline-attackable hash of it
        is kept. BLAKE2b rather than HMAC-SHA256: the same guarantee in about a third of the
        time (one call per request).
        """
        return hashlib.blake2b(presented, key=self._secret, digest_size=32).digest()

    def carriesKey(self, value: bytes, presented: bytes | None) -> bool:
        """
        Whether a request header value carries one of the gateway's credentials, which must never
        reach an upstream: an C{mcpgw_} key-shaped token (valid or not), the credential presented
        in C{Authorization} (C{presented}, when 8 characters or longer: a shorter one would match
        too much), or (with API keys) any key this generation has verified as valid, alone or
        after an auth scheme (C{Bearer}, C{Basic}, ...).
        """
        if b"mcpgw_" in value and _KEY_SHAPED.search(value):
            return True
        if presented is not None and len(presented) >= 8 and presented in value:
            return True
        lengths = self._validLengths
        if not lengths:
            return False
        token = value.strip()
        _scheme, space, rest = token.partition(b" ")
        for candidate in (token, rest.strip()) if space else (token,):
            # Only a value as long as some valid key can be one: most headers skip the HMAC.
            if len(candidate) in lengths:
                entry = self._cache.get(self._cacheKey(candidate))
                if entry is not None and entry[0] is not None:
                    return True
        return False

    @property
    def cacheSize(self) -> int:
        """Cached verification results."""
        return len(self._cache)


def _tokenResult(info: TokenInfo, certIdentity: str | None) -> AuthResult:
    """The result of a verified OAuth token."""
    return AuthResult(
        "oauth", None, certIdentity, info.principal, claims=info.claims, scopes=info.scopes
    )


def _usesExternal(mode: str) -> bool:
    """Whether C{auth.external} applies in an authenticator C{mode} (no API keys checked)."""
    return mode in ("external", "mtls")


def _identityText(value: bytes) -> str | None:
    """An identity header's value as text (UTF-8, else Latin-1), trimmed; C{None} if empty."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    text = text.strip()
    return text or None


def _fanOut(keyId: str | None, d: Deferred[str | None]) -> str | None:
    d.callback(keyId)
    return keyId


def bearerToken(value: bytes | None) -> bytes | None:
    """The token of an C{Authorization: Bearer} value, else C{None}."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token
