"""
Inbound auth (API keys with Argon2id off the reactor, caches, throttling), the pre-parse input
limit, and the listener's protection against oversized and slow requests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from argon2 import PasswordHasher
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from mcpgw.auth import EXTERNAL, KEY_PREFIX, Authenticator, AuthResult, generateKey
from mcpgw.config import APIKey, AuthConfig, ExternalAuthConfig
from mcpgw.errors import RateLimited, Unauthenticated
from mcpgw.policy import Caller
from tests.support import GatewayTestCase, rpc

#: Cheap Argon2id parameters for tests (the verifier reads them from each hash).
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
KEY_A = "mcpgw_" + "a" * 43
KEY_B = "mcpgw_" + "b" * 43


def keysYaml(*pairs: tuple[str, str]) -> str:
    entries = "".join(f"    - {{id: {i}, hash: '{FAST.hash(k)}'}}\n" for i, k in pairs)
    return "auth:\n  enabled: true\n  keys:\n" + entries


class AuthenticatorTests(TestCase):
    """The authenticator alone, with a real thread pool and real Argon2id hashes."""

    def pending(self, header: bytes, address: str = "10.0.0.1") -> Deferred[AuthResult]:
        d = self.auth.authenticate(header, address, None)
        assert isinstance(d, Deferred), d
        return d

    def setUp(self) -> None:
        self.pool = ThreadPool(0, 1, "test-argon2")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.calls = 0
        import mcpgw.auth as authmod

        real = authmod._verifyAll

        def counting(*a: Any) -> Any:
            self.calls += 1
            self.verifyThread = threading.get_ident()
            return real(*a)

        self.patch(authmod, "_verifyAll", counting)
        config = AuthConfig(
            enabled=True, keys=(APIKey("a", FAST.hash(KEY_A)), APIKey("b", FAST.hash(KEY_B)))
        )
        self.auth = Authenticator(reactor, config, None, self.pool)

    @inlineCallbacks
    def test_validKeyVerifiedOffReactorThenCached(self) -> Any:
        """The first use runs Argon2 on the pool thread; later uses are answered from the cache."""
        d = self.auth.authenticate(b"Bearer " + KEY_B.encode(), "10.0.0.1", None)
        self.assertIsInstance(d, Deferred)
        result = yield d
        self.assertEqual(result, AuthResult("ok", "b", None))
        self.assertNotEqual(self.verifyThread, threading.get_ident())
        again = self.auth.authenticate(b"bearer   " + KEY_B.encode(), "10.0.0.1", None)
        self.assertEqual(again, AuthResult("ok", "b", None))
        self.assertEqual(self.calls, 1)

    @inlineCallbacks
    def test_badKeyCachedToo(self) -> Any:
        """A wrong key is 'invalid', and repeating it does not run Argon2 again."""
        f = yield self.assertFailure(self.pending(b"Bearer nope"), Unauthenticated)
        self.assertEqual(f.data, {"auth_result": "invalid"})
        self.assertRaises(Unauthenticated, self.auth.authenticate, b"Bearer nope", "10.0.0.1", None)
        self.assertEqual(self.calls, 1)

    @inlineCallbacks
    def test_concurrentSameKeyVerifiedOnce(self) -> Any:
        """Requests with the same uncached key wait for one verification."""
        ds = [self.pending(b"Bearer " + KEY_A.encode()) for _ in range(5)]
        results = yield _all(ds)
        self.assertEqual({r.keyId for r in results}, {"a"})
        self.assertEqual(self.calls, 1)

    def test_missing(self) -> None:
        """No header, another scheme or an empty token are 'missing'."""
        for value in (None, b"", b"Basic Zm9vOmJhcg==", b"Bearer "):
            e = self.assertRaises(Unauthenticated, self.auth.authenticate, value, "10.0.0.1", None)
            self.assertEqual(e.data, {"auth_result": "missing"})

    @inlineCallbacks
    def test_bruteForceThrottledWithoutArgon2(self) -> Any:
        """Past the per-address burst, unknown keys get 429 (scope auth) and cost no Argon2 run."""
        pending = []
        throttled = 0
        for i in range(40):
            try:
                pending.append(self.pending(b"Bearer guess-%d" % i, "10.6.6.6"))
            except RateLimited as e:
                throttled += 1
                self.assertEqual(e.data, {"scope": "auth"})
        self.assertEqual(len(pending), 10)
        self.assertEqual(throttled, 30)
        for d in pending:
            yield self.assertFailure(d, Unauthenticated)
        self.assertEqual(self.calls, 10)
        # another address is not affected
        ok = yield self.auth.authenticate(b"Bearer " + KEY_A.encode(), "10.0.0.2", None)
        self.assertEqual(ok.keyId, "a")

    def test_modes(self) -> None:
        """No keys: external; client_ca without keys: the certificate identity (mtls)."""
        from mcpgw.config import TLSConfig

        ext = Authenticator(reactor, AuthConfig(), None, None)
        self.assertEqual(ext.authenticate(b"Bearer x", "a", None), AuthResult("external"))
        mtls = Authenticator(reactor, AuthConfig(), TLSConfig("c", "k", "ca"), None)
        self.assertEqual(
            mtls.authenticate(None, "a", "spiffe://x/y"),
            AuthResult("mtls", "spiffe://x/y", "spiffe://x/y"),
        )


class ExternalIdentityTests(TestCase):
    """C{auth.external}: the identity a trusted auth proxy names, and nobody else."""

    def setUp(self) -> None:
        external = ExternalAuthConfig("X-Forwarded-Email", ("10.0.0.0/8", "127.0.0.1/32"))
        self.auth = Authenticator(reactor, AuthConfig(external=external), None, None)

    def test_trustedProxy(self) -> None:
        """A trusted peer's header is the principal, auth_result external."""
        result = self.auth.authenticate(None, "10.1.2.3", None, b" alice@example.com ")
        self.assertEqual(result, AuthResult("external", None, None, "alice@example.com"))
        self.assertEqual(
            self.auth.authenticate(None, "::ffff:127.0.0.1", None, b"bob").principal,
            "bob",
        )
        utf8 = self.auth.authenticate(None, "10.0.0.1", None, "zoë".encode())
        self.assertEqual(utf8.principal, "zoë")

    def test_untrustedPeerIgnored(self) -> None:
        """From any other peer the header is ignored: anonymous external."""
        for address in ("192.0.2.1", "127.0.0.2", "not-an-address"):
            result = self.auth.authenticate(None, address, None, b"admin@example.com")
            self.assertEqual(result, AuthResult("external"))
            self.assertIsNone(result.principal)

    def test_emptyOrAbsent(self) -> None:
        """An empty or absent header from a trusted proxy is no identity."""
        self.assertEqual(self.auth.authenticate(None, "10.0.0.1", None, b"  "), EXTERNAL)
        self.assertEqual(self.auth.authenticate(None, "10.0.0.1", None), EXTERNAL)

    def test_headersToDrop(self) -> None:
        """The header is removed from untrusted peers' requests, kept from trusted proxies'."""
        self.assertEqual(self.auth.identityHeader, b"x-forwarded-email")
        self.assertEqual(self.auth.dropHeaders, frozenset({b"x-forwarded-email"}))
        self.assertEqual(self.auth.headersToDrop("192.0.2.1"), frozenset({b"x-forwarded-email"}))
        self.assertEqual(self.auth.headersToDrop(None), frozenset({b"x-forwarded-email"}))
        self.assertEqual(self.auth.headersToDrop("10.9.9.9"), frozenset())
        plain = Authenticator(reactor, AuthConfig(), None, None)
        self.assertEqual(plain.headersToDrop("192.0.2.1"), frozenset())
        self.assertIsNone(plain.identityHeader)
        self.assertEqual(plain.authenticate(None, "10.0.0.1", None, b"x"), EXTERNAL)

    def test_mtlsProxy(self) -> None:
        """Behind mTLS, a trusted proxy's named caller wins; its certificate is kept."""
        from mcpgw.config import TLSConfig

        external = ExternalAuthConfig("X-User", ("10.0.0.0/8",))
        auth = Authenticator(
            reactor, AuthConfig(external=external), TLSConfig("c", "k", "ca"), None
        )
        self.assertEqual(
            auth.authenticate(None, "10.0.0.1", "spiffe://proxy", b"carol"),
            AuthResult("external", None, "spiffe://proxy", "carol"),
        )
        self.assertEqual(
            auth.authenticate(None, "192.0.2.1", "spiffe://x", b"carol"),
            AuthResult("mtls", "spiffe://x", "spiffe://x", "spiffe://x"),
        )

    def test_notWithKeys(self) -> None:
        """With API keys the header means nothing (config check refuses the combination)."""
        external = ExternalAuthConfig("X-User", ("10.0.0.0/8",))
        config = AuthConfig(enabled=True, keys=(APIKey("a", "$argon2id$x"),), external=external)
        auth = Authenticator(reactor, config, None, None)
        self.assertIsNone(auth.identityHeader)
        self.assertRaises(Unauthenticated, auth.authenticate, None, "10.0.0.1", None, b"carol")


class PrincipalTests(TestCase):
    """C{AuthResult.principal} and the policy caller built from a result."""

    def test_defaults(self) -> None:
        """Part-1 constructions name the key id, else the certificate identity."""
        self.assertEqual(AuthResult("ok", "ci-bot").principal, "ci-bot")
        self.assertEqual(AuthResult("ok", "ci-bot", "spiffe://c").principal, "ci-bot")
        self.assertEqual(AuthResult("mtls", "spiffe://c", "spiffe://c").principal, "spiffe://c")
        self.assertEqual(AuthResult("external", None, "spiffe://c").principal, "spiffe://c")
        self.assertIsNone(EXTERNAL.principal)

    def test_caller(self) -> None:
        """Only an API key result has a key id; every result passes its principal on."""
        self.assertEqual(
            AuthResult("ok", "ci-bot").caller("10.0.0.1", "s"),
            Caller(keyId="ci-bot", principal="ci-bot", client="10.0.0.1", session="s"),
        )
        self.assertEqual(
            AuthResult("mtls", "spiffe://c", "spiffe://c").caller("10.0.0.1", None),
            Caller(principal="spiffe://c", client="10.0.0.1"),
        )
        self.assertEqual(EXTERNAL.caller(None, None), Caller())


def _all(ds: list[Deferred[Any]]) -> Deferred[list[Any]]:
    from twisted.internet.defer import gatherResults

    return gatherResults(ds)


class GatewayAuthTests(GatewayTestCase):
    """API keys through the real gateway."""

    def configText(self) -> str:
        return super().configText() + keysYaml(("ci-bot", KEY_A))

    reloadable = True

    @inlineCallbacks
    def test_outcomesAndAudit(self) -> Any:
        """missing and invalid get 401 with WWW-Authenticate; a valid key passes with its id."""
        reply = yield self.call(body=rpc("ping", id=1))
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.header("www-authenticate"), ['Bearer realm="mcpgw"'])
        self.assertEqual(
            reply.json(),
            {
                "jsonrpc": "2.0",
                "id": 1,
                "error": {
                    "code": -32003,
                    "message": "unauthenticated",
                    "data": {"auth_result": "missing"},
                },
            },
        )
        reply = yield self.call(
            body=rpc("ping", id=2), headers={"Authorization": "Bearer " + KEY_B}
        )
        self.assertEqual(
            (reply.status, reply.json()["error"]["data"]), (401, {"auth_result": "invalid"})
        )
        self.assertEqual(self.upstream.seen, [])
        reply = yield self.call(
            body=rpc("ping", id=3), headers={"Authorization": "Bearer " + KEY_A}
        )
        self.assertEqual(reply.status, 200)
        lines = self.auditLines()
        self.assertEqual(
            [(x["status"], x["auth_result"], x["auth_key_id"]) for x in lines],
            [(401, "missing", None), (401, "invalid", None), (200, "ok", "ci-bot")],
        )

    @inlineCallbacks
    def test_credentialNotForwarded(self) -> Any:
        """The client's Authorization never reaches the upstream; the injected one does."""
        yield self.call(body=rpc("ping"), headers={"Authorization": "Bearer " + KEY_A})
        self.assertEqual(self.upstream.seen[-1].header("authorization"), ["Bearer upstream-secret"])
        self.assertNotIn(
            KEY_A.encode(), b"".join(v.encode() for _, v in self.upstream.seen[-1].headers)
        )

    @inlineCallbacks
    def test_keyRotationByReload(self) -> Any:
        """After a reload, a removed key fails at once and a new key works at once."""
        reply = yield self.call(body=rpc("ping"), headers={"Authorization": "Bearer " + KEY_A})
        self.assertEqual(reply.status, 200)
        with open(self.configPath, "w") as f:
            f.write(GatewayTestCase.configText(self) + keysYaml(("new-bot", KEY_B)))
        self.service.reload()
        reply = yield self.call(body=rpc("ping"), headers={"Authorization": "Bearer " + KEY_A})
        self.assertEqual(reply.status, 401)
        reply = yield self.call(body=rpc("ping"), headers={"Authorization": "Bearer " + KEY_B})
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.auditLines()[-1]["auth_key_id"], "new-bot")

    @inlineCallbacks
    def test_clientGoneDuringVerification(self) -> Any:
        """A client that leaves while its key is verified is audited, and nothing is forwarded."""

        def leave() -> None:
            s = socket.create_connection(("127.0.0.1", self.port))
            body = rpc("ping")
            s.sendall(
                b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer "
                + KEY_A.encode()
                + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            s.close()

        yield threads.deferToThread(leave)
        for _ in range(100):
            if os.path.exists(self.auditPath) and self.auditLines():
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(self.auditLines()[-1]["error"], "client_closed")
        self.assertEqual(self.upstream.seen, [])


class InputLimitTests(GatewayTestCase):
    """limits.input_rate_limit is checked before the body is read, parsed or authenticated."""

    def configText(self) -> str:
        return (
            super().configText()
            + "limits: {input_rate_limit: {rate: 0.5, burst: 2}}\n"
            + keysYaml(("a", KEY_A))
        )

    @inlineCallbacks
    def test_429BeforeAuth(self) -> Any:
        """Requests past the burst get 429 scope input (not 401), with Retry-After."""
        statuses = []
        for _ in range(3):
            reply = yield self.call(body=b"{not even json")
            statuses.append(reply.status)
        self.assertEqual(statuses, [400, 400, 429])
        self.assertEqual(reply.header("retry-after"), ["2"])
        self.assertEqual(
            reply.json()["error"],
            {"code": -32002, "message": "rate_limited", "data": {"scope": "input"}},
        )
        self.assertEqual(self.auditLines()[-1]["status"], 429)


class ListenerProtectionTests(GatewayTestCase):
    """Oversized and slow requests get JSON-RPC errors, never a traceback or a hung socket."""

    extraConfig = "limits: {max_header_bytes: 2048, header_timeout: 0.3, body_timeout: 0.3}\n"

    def raw(self, payload: bytes, pause: float = 0.0, more: bytes = b"") -> Deferred[bytes]:
        def run() -> bytes:
            s = socket.create_connection(("127.0.0.1", self.port))
            s.settimeout(10)
            s.sendall(payload)
            if pause:
                time.sleep(pause)
                with contextlib.suppress(OSError):
                    s.sendall(more)
            data = b""
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            s.close()
            return data

        return threads.deferToThread(run)

    @inlineCallbacks
    def test_headersTooLarge(self) -> Any:
        """Headers over max_header_bytes get 431 with a JSON-RPC body."""
        data = yield self.raw(
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * 3000 + b"\r\n\r\n"
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 431 "), data[:100])
        self.assertIn(b'"headers_too_large"', data)

    @inlineCallbacks
    def test_badRequestLine(self) -> Any:
        """A malformed request gets 400 with a JSON-RPC body, not Twisted's bare 400."""
        data = yield self.raw(b"THIS IS NOT HTTP\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 400 "), data[:100])
        self.assertIn(b'"bad_request"', data)

    @inlineCallbacks
    def test_slowHeaders(self) -> Any:
        """Headers that trickle in past header_timeout get 408, audited."""
        data = yield self.raw(
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n", pause=2.5, more=b"X-A: b\r\n"
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data[:100])
        self.assertIn(b'"request_timeout"', data)
        self.assertEqual(self.auditLines()[-1]["status"], 408)

    @inlineCallbacks
    def test_slowBody(self) -> Any:
        """A body that stops arriving past body_timeout gets 408, audited."""
        data = yield self.raw(
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{",
            pause=2.5,
            more=b"x",
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data[:100])
        self.assertEqual(self.auditLines()[-1]["error"], "request_timeout")


class KeyGenerateTests(TestCase):
    def test_keyGenerate(self) -> None:
        """C{mcpgw key generate --id X} prints a prefixed key and a YAML entry whose hash verifies it."""
        out = subprocess.run(
            [sys.executable, "-m", "mcpgw", "key", "generate", "--id", "ci-bot"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        key = next(
            line.split()[-1]
            for line in out.splitlines()
            if KEY_PREFIX in line and "hash" not in line
        )
        self.assertTrue(key.startswith(KEY_PREFIX))
        self.assertEqual(len(key), len(generateKey()))
        h = next(
            line.split("hash: ", 1)[1].strip().strip("'\"")
            for line in out.splitlines()
            if "hash:" in line
        )
        self.assertTrue(h.startswith("$argon2id$"))
        self.assertTrue(PasswordHasher().verify(h, key))
        self.assertIn("- id: ci-bot", out)
