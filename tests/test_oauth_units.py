"""
The OAuth pieces without sockets: the JWKS cache (staleness, cache headers, failures, the
unknown-kid refetch limit) on a L{Clock}, token expiry and leeway in the verified-token cache,
the key table of a JWKS, C{config check} on C{auth.oauth}, and C{policy explain} with token
claims and scopes.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from contextlib import redirect_stdout

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from mcpgw import oauth
from mcpgw.cli import main
from mcpgw.config import ConfigError, config_from_string
from mcpgw.errors import InsufficientScope, Unauthenticated
from mcpgw.oauth import MIN_REFRESH, MIN_TTL, RemoteKeys, TokenVerifier, _ttl, keyTable
from tests.idp import IdentityProvider

RESOURCE = "https://mcp.example.com/mcp"


class FakeRemote(RemoteKeys):
    """A L{RemoteKeys} whose fetches are Deferreds the test fires."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, "http://idp.test/certs")
        self.calls: list[Deferred[tuple[Headers, bytes]]] = []

    def _fetch(self) -> Deferred[tuple[Headers, bytes]]:
        d: Deferred[tuple[Headers, bytes]] = Deferred()
        self.calls.append(d)
        return d


def answer(idp: IdentityProvider, cache: str = "max-age=300") -> tuple[Headers, bytes]:
    return Headers({b"Cache-Control": [cache.encode()]}), json.dumps(idp.jwks()).encode()


class RemoteKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.idp = IdentityProvider()
        self.keys = FakeRemote(self.clock)

    def test_staleKeysServeWhileRefetching(self) -> None:
        """Stale keys keep serving while a background refetch runs, and after it fails."""
        self.assertIsNone(self.keys.current(self.clock.seconds()))
        d = self.keys.refresh(self.clock.seconds())
        assert d is not None
        self.keys.calls[0].callback(answer(self.idp, "max-age=120"))
        self.successResultOf(d)
        table = self.keys.table
        self.assertEqual(len(table or {}), 4)  # RSA as RS256 and PS256, EC, Ed25519
        self.clock.advance(119)
        self.assertIs(self.keys.current(self.clock.seconds()), table)
        self.assertEqual(len(self.keys.calls), 1)
        self.clock.advance(2)  # stale: served, and refetched in the background
        self.assertIs(self.keys.current(self.clock.seconds()), table)
        self.assertEqual(len(self.keys.calls), 2)
        self.keys.calls[1].errback(ConnectionRefusedError("down"))
        self.assertIs(self.keys.current(self.clock.seconds()), table)
        self.assertEqual(len(self.keys.calls), 2)  # not again at once
        self.clock.advance(MIN_REFRESH)
        self.keys.current(self.clock.seconds())
        self.assertEqual(len(self.keys.calls), 3)

    def test_unknownKidLimit(self) -> None:
        """On-demand refetches run at most once every MIN_REFRESH seconds; callers share one in flight."""
        first = self.keys.refresh(self.clock.seconds())
        second = self.keys.refresh(self.clock.seconds())
        self.assertEqual(len(self.keys.calls), 1)
        self.keys.calls[0].callback(answer(self.idp))
        self.successResultOf(first)  # type: ignore[arg-type]
        self.successResultOf(second)  # type: ignore[arg-type]
        self.clock.advance(MIN_REFRESH - 0.5)
        self.assertIsNone(self.keys.refresh(self.clock.seconds()))
        self.clock.advance(0.5)
        self.assertIsNotNone(self.keys.refresh(self.clock.seconds()))

    def test_cacheHeaders(self) -> None:
        """max-age (less Age), Expires against Date, no-store, nothing: clamped TTLs."""
        now = 1_700_000_000.0

        def ttl(**headers: str) -> float:
            h = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})
            return _ttl(h, now)

        self.assertEqual(ttl(cache_control="public, max-age=3600"), 3600)
        self.assertEqual(ttl(cache_control="max-age=3600", age="600"), 3000)
        self.assertEqual(ttl(cache_control="no-store"), MIN_TTL)
        self.assertEqual(ttl(cache_control="max-age=1"), MIN_TTL)
        self.assertEqual(ttl(cache_control="max-age=99999999"), oauth.MAX_TTL)
        self.assertEqual(
            ttl(date="Tue, 14 Nov 2023 22:13:20 GMT", expires="Tue, 14 Nov 2023 23:13:20 GMT"),
            3600,
        )
        self.assertEqual(ttl(expires="0"), MIN_TTL)
        self.assertEqual(ttl(), oauth.DEFAULT_TTL)


class VerifierTests(SynchronousTestCase):
    """The verified-token cache on a clock set to now."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.idp = IdentityProvider()
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "jwks.json")
        with open(path, "w") as f:
            json.dump(self.idp.jwks(), f)
        config = config_from_string(
            "upstreams: [{name: a, url: 'http://127.0.0.1:1/mcp', path: /mcp}]\n"
            "auth:\n"
            "  enabled: true\n"
            "  oauth:\n"
            "    public_url: https://mcp.example.com\n"
            f"    issuers: [{{issuer: '{self.idp.issuer}', jwks_file: {path}}}]\n"
            "    principal_claim: email\n"
            "    required_scopes: [mcp:tools]\n"
        )
        assert config.auth.oauth is not None
        self.verifier = TokenVerifier(self.clock, config.auth.oauth, ["/mcp"])

    def test_expiryWithLeeway(self) -> None:
        """A cached token is good until exp + 30 s, then refused without a new check."""
        token = self.idp.token(RESOURCE, lifetime=60, email="a@corp.example").encode()
        info = self.verifier.verify(token, b"/mcp")
        self.assertEqual(getattr(info, "principal", None), "a@corp.example")
        self.clock.advance(60 + 29)
        self.assertIs(self.verifier.verify(token, b"/mcp"), info)
        self.clock.advance(2)
        error = self.assertRaises(Unauthenticated, self.verifier.verify, token, b"/mcp")
        self.assertIn("expired", str(error.detail))

    def test_notBeforeLeeway(self) -> None:
        """nbf 20 s ahead passes (30 s leeway); 40 s ahead does not."""
        now = int(self.clock.seconds())
        good = self.idp.token(RESOURCE, nbf=now + 20, email="x@y").encode()
        self.verifier.verify(good, b"/mcp")
        early = self.idp.token(RESOURCE, nbf=now + 40, email="x@y").encode()
        self.assertRaises(Unauthenticated, self.verifier.verify, early, b"/mcp")
        self.clock.advance(11)
        self.verifier.verify(early, b"/mcp")

    def test_scopeAndPrincipal(self) -> None:
        """Missing required scope: InsufficientScope naming the principal; no principal claim: invalid."""
        token = self.idp.token(RESOURCE, scope="other", email="b@corp.example").encode()
        error = self.assertRaises(InsufficientScope, self.verifier.verify, token, b"/mcp")
        self.assertEqual(error.principal, "b@corp.example")
        self.assertIn(b'error="insufficient_scope", scope="mcp:tools"', error.challenge)
        token = self.idp.token(RESOURCE).encode()  # no email
        error2 = self.assertRaises(Unauthenticated, self.verifier.verify, token, b"/mcp")
        self.assertIn("'email'", str(error2.detail))


class ReloadTests(SynchronousTestCase):
    def test_remoteKeysKept(self) -> None:
        """A new generation keeps the fetched key set of an unchanged jwks_url; a changed one starts afresh."""

        def verifier(url: str, previous: TokenVerifier | None = None) -> TokenVerifier:
            config = config_from_string(
                BASE + "auth:\n"
                "  enabled: true\n"
                "  oauth:\n"
                "    public_url: https://mcp.example.com\n"
                f"    issuers: [{{issuer: 'https://a.test', jwks_url: '{url}'}}]\n"
            )
            assert config.auth.oauth is not None
            return TokenVerifier(Clock(), config.auth.oauth, ["/mcp"], previous)

        first = verifier("https://a.test/k")
        second = verifier("https://a.test/k", first)
        third = verifier("https://a.test/other", second)
        self.assertIs(second.sources["https://a.test"], first.sources["https://a.test"])
        self.assertIsNot(third.sources["https://a.test"], first.sources["https://a.test"])


class KeyTableTests(SynchronousTestCase):
    def test_keyTable(self) -> None:
        """Only signing keys of accepted algorithms: no oct (HMAC), no enc, no RS512."""
        idp = IdentityProvider()
        jwks = idp.jwks()
        jwks["keys"] += [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**idp.keys["ec"].jwk, "kid": "enc", "use": "enc"},
            {**idp.keys["rsa"].jwk, "kid": "rs512", "alg": "RS512"},
            {**idp.keys["rsa"].jwk, "kid": "ps", "alg": "PS256"},
            "junk",
        ]
        table = keyTable(jwks)
        self.assertEqual(
            sorted((kid.split("-")[0] if kid else kid, alg) for kid, alg in table),
            [
                ("ec", "ES256"),
                ("ed25519", "EdDSA"),
                ("ps", "PS256"),
                ("rsa", "PS256"),
                ("rsa", "RS256"),
            ],
        )
        self.assertRaises(ValueError, keyTable, {"nokeys": []})


BASE = "upstreams: [{name: a, url: 'http://127.0.0.1:1/mcp', path: /mcp}]\n"


class ConfigTests(SynchronousTestCase):
    def problems(self, text: str, base: str | None = None) -> list[str]:
        try:
            config_from_string(BASE + text, source="t.yaml", base_dir=base)
        except ConfigError as e:
            return [str(p) for p in e.problems]
        return []

    def test_problems(self) -> None:
        """URLs, files, a fragment in public_url, one key source per issuer, oauth needs enabled."""
        tmp = tempfile.mkdtemp()
        with open(os.path.join(tmp, "bad.json"), "w") as f:
            f.write('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
        got = self.problems(
            "auth:\n"
            "  oauth:\n"
            "    public_url: https://mcp.example.com/#frag\n"
            "    issuers:\n"
            "      - {issuer: 'https://a.test', jwks_url: 'ftp://a.test/certs'}\n"
            "      - {issuer: 'https://b.test'}\n"
            "      - {issuer: 'https://c.test', jwks_url: 'https://c.test/k', jwks_file: x.json}\n"
            "      - {issuer: 'https://d.test', jwks_file: missing.json}\n"
            "      - {issuer: 'https://e.test', jwks_file: bad.json, ca_file: bad.json}\n"
            "      - {issuer: 'https://a.test', jwks_url: 'https://a.test/k'}\n"
            "    required_scopes: ['two words']\n",
            tmp,
        )
        self.assertEqual(
            got,
            [
                "auth.oauth: is only used with auth.enabled: true (set it to validate access "
                "tokens) (line 4)",
                "auth.oauth.public_url: must not have a fragment (RFC 8707) (line 4)",
                "auth.oauth.issuers[0].jwks_url: must start with http:// or https:// (line 6)",
                "auth.oauth.issuers[1]: needs exactly one key source: jwks_url or jwks_file "
                "(line 7)",
                "auth.oauth.issuers[2]: needs exactly one key source: jwks_url or jwks_file "
                "(both are set) (line 8)",
                "auth.oauth.issuers[2].jwks_file: file not found: "
                f"{os.path.join(tmp, 'x.json')} (line 8)",
                "auth.oauth.issuers[3].jwks_file: file not found: "
                f"{os.path.join(tmp, 'missing.json')} (line 9)",
                "auth.oauth.issuers[4].jwks_file: holds no usable signing key (RS256, PS256, "
                "ES256, EdDSA) (line 10)",
                "auth.oauth.issuers[4].ca_file: is only used with jwks_url (line 10)",
                "auth.oauth.issuers[5].issuer: duplicate issuer 'https://a.test' (line 11)",
                "auth.oauth.required_scopes[0]: 'two words' is not a scope (no spaces, quotes "
                "or backslashes) (line 12)",
            ],
        )

    def test_valid(self) -> None:
        """A valid block parses; public_url loses its trailing slash; when.claims/scopes parse."""
        config = config_from_string(
            BASE + "auth:\n"
            "  enabled: true\n"
            "  oauth:\n"
            "    public_url: https://mcp.example.com/\n"
            "    issuers: [{issuer: 'https://a.test', jwks_url: 'https://a.test/k'}]\n"
            "policy:\n"
            "  rules:\n"
            "    - {id: r, action: allow, match: {exact: t},"
            " when: {claims: {groups: [admins, 'ops-*']}, scopes: [mcp:write]}}\n"
        )
        assert config.auth.oauth is not None
        self.assertEqual(config.auth.oauth.resource("/mcp"), "https://mcp.example.com/mcp")
        when = config.policy.rules[0].when
        assert when is not None
        self.assertEqual(
            (when.claims, when.scopes), ((("groups", ("admins", "ops-*")),), ("mcp:write",))
        )


class ExplainTests(SynchronousTestCase):
    def test_claimsAndScopes(self) -> None:
        """policy explain takes --claim NAME=VALUE (repeated: a list claim) and --scope."""
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "c.yaml")
        with open(path, "w") as f:
            f.write(
                BASE + "policy:\n"
                "  default_action: deny\n"
                "  rules:\n"
                "    - {id: admins, action: allow, match: {exact: t},"
                " when: {claims: {groups: [admins]}}}\n"
                "    - {id: writers, action: allow, match: {exact: t},"
                " when: {scopes: [mcp:write]}}\n"
            )

        def explain(*flags: str) -> str:
            out = io.StringIO()
            with redirect_stdout(out):
                self.assertEqual(main(["policy", "explain", "--config", path, "t", *flags]), 0)
            return out.getvalue()

        got = explain("--identity", "alice", "--claim", "groups=staff", "--claim", "groups=admins")
        self.assertIn("decision: allow (rule admins, action allow)", got)
        got = explain("--claim", "groups=staff", "--scope", "mcp:tools mcp:write")
        self.assertIn("decision: allow (rule writers, action allow)", got)
        self.assertIn("admins (exact 't'): when.claims.groups: 'staff' matches none of [admins]", got)
        got = explain()
        self.assertIn("when.claims.groups: no such claim", got)
        self.assertIn("when.scopes: scope(s) mcp:write not granted", got)

    def test_policyTestSkipsTokenCallers(self) -> None:
        """policy test does not replay OAuth callers' calls through rules on claims or scopes (the audit does not keep them), and says so; shadowing sees claims and scopes."""
        from mcpgw.config import PolicyConfig
        from mcpgw.policy import shadowedRules

        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "c.yaml")
        with open(path, "w") as f:
            f.write(
                BASE + "policy:\n"
                "  rules:\n"
                "    - {id: admins, action: deny, match: {exact: t}, when: {scopes: [a]}}\n"
            )
        audit = os.path.join(tmp, "audit.jsonl")
        line = {"method": "tools/call", "tool": "t", "decision": "allow", "error": None}
        with open(audit, "w") as f:
            f.write(json.dumps({**line, "auth_result": "oauth", "principal": "alice"}) + "\n")
            f.write(json.dumps({**line, "auth_result": "ok", "auth_key_id": "ci"}) + "\n")
        out = io.StringIO()
        with redirect_stdout(out):
            main(["policy", "test", "-c", path, "--against", audit])
        self.assertIn("replayed 1 call(s)", out.getvalue())
        self.assertIn("1 of OAuth token callers", out.getvalue())
        config = config_from_string(
            BASE + "policy:\n"
            "  rules:\n"
            "    - {id: a, action: deny, match: {exact: t}, when: {scopes: [x]}}\n"
            "    - {id: b, action: deny, match: {exact: t}, when: {scopes: [x, y]}}\n"
            "    - {id: c, action: deny, match: {exact: u}, when: {claims: {g: ['a*']}}}\n"
            "    - {id: d, action: deny, match: {exact: u}, when: {claims: {g: [ab]}}}\n"
            "    - {id: e, action: deny, match: {exact: u}, when: {claims: {h: [ab]}}}\n"
        )
        self.assertIsInstance(config.policy, PolicyConfig)
        self.assertEqual([i for i, _ in shadowedRules(config.policy)], [1, 3])


class ClaimConditionTests(SynchronousTestCase):
    def test_claimPaths(self) -> None:
        """A claim named with dots is that claim if it exists, else a path into nested objects; numbers and booleans match as JSON text; a caller's different claim values are cached apart."""
        from mcpgw.policy import Caller, Policy

        config = config_from_string(
            BASE + "policy:\n"
            "  default_action: deny\n"
            "  rules:\n"
            "    - {id: kc, action: allow, match: {exact: a},"
            " when: {claims: {realm_access.roles: [admin]}}}\n"
            "    - {id: url, action: allow, match: {exact: b},"
            " when: {claims: {'https://corp.example/roles': ['ops-*']}}}\n"
            "    - {id: num, action: allow, match: {exact: c},"
            " when: {claims: {level: ['3'], verified: ['true']}}}\n"
        )
        policy = Policy.fromConfig(config.policy)

        def action(tool: str, **claims: object) -> str:
            return policy.decide("tools/call", tool, Caller(principal="p", claims=claims)).action

        self.assertEqual(action("a", realm_access={"roles": ["user", "admin"]}), "allow")
        self.assertEqual(action("a", realm_access={"roles": ["user"]}), "deny")
        self.assertEqual(action("a", **{"realm_access.roles": "admin"}), "allow")
        self.assertEqual(action("b", **{"https://corp.example/roles": ["ops-eu"]}), "allow")
        self.assertEqual(action("b", **{"https://corp.example/roles": "dev"}), "deny")
        self.assertEqual(action("c", level=3, verified=True), "allow")
        self.assertEqual(action("c", level=3, verified=False), "deny")
        self.assertEqual(action("c", level={"x": 3}, verified=True), "deny")
