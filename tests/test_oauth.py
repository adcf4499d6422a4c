"""
mcpgw as an OAuth 2.1 resource server, through a real gateway on 127.0.0.1 in front of a scripted
upstream, with an in-test identity provider (L{tests.idp}) serving its JWKS over HTTP: accepted
tokens of every algorithm, every rejection with its 401/403 and C{WWW-Authenticate}, key
rotation and an outage of the identity provider, the RFC 9728 metadata documents, claims and
scopes in policy (and in listings), API keys beside tokens, and no token ever forwarded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.web import server

from tests.idp import IdentityProvider, JWKSResource
from tests.support import GatewayTestCase, Reply, portOf, rpc
from tests.test_auth import FAST, KEY_A

PUBLIC = "https://mcp.example.com"
RESOURCE = PUBLIC + "/mcp"
METADATA = PUBLIC + "/.well-known/oauth-protected-resource/mcp"
MISSING = f'Bearer resource_metadata="{METADATA}", scope="mcp:tools"'
INVALID = f'Bearer resource_metadata="{METADATA}", error="invalid_token"'


def call(tool: str = "echo", id: Any = 7) -> bytes:
    return rpc("tools/call", {"name": tool, "arguments": {}}, id=id)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token signed by hand: HMAC-SHA256 with C{secret}, or no signature at all."""
    signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = b"" if secret is None else hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return signing + "." + _b64(sig)


class OAuthTestCase(GatewayTestCase):
    """A gateway with C{auth.oauth} (two upstreams, /mcp listing tools, /b) and an IdP."""

    oauthExtra = ""
    authExtra = ""
    policy = ""

    def setUp(self) -> Any:
        self.idp = IdentityProvider()
        site = server.Site(JWKSResource(self.idp))
        site.noisy = False
        self.idpPort = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(self.idpPort.stopListening)
        return super().setUp()

    def configText(self) -> str:
        up = portOf(self.upstreamPort)
        idp = portOf(self.idpPort)
        return (
            "listen: {host: 127.0.0.1, port: 0}\n"
            "upstreams:\n"
            f"  - {{name: up, url: 'http://127.0.0.1:{up}/mcp?mode=tools', path: /mcp,"
            " timeouts: {connect: 2, response: 5}}\n"
            f"  - {{name: b, url: 'http://127.0.0.1:{up}/b', path: /b}}\n"
            f"audit: {{path: {self.auditPath}, fsync: none, state_dir: {self.tmp}/state}}\n"
            "auth:\n"
            "  enabled: true\n"
            + self.authExtra
            + "  oauth:\n"
            f"    public_url: {PUBLIC}/\n"
            "    issuers:\n"
            f"      - issuer: {self.idp.issuer}\n"
            f"        jwks_url: http://127.0.0.1:{idp}/realms/corp/protocol/openid-connect/certs\n"
            "    scopes_supported: [mcp:tools, mcp:resources]\n"
            "    required_scopes: [mcp:tools]\n" + self.oauthExtra + self.policy
        )

    def bearer(
        self,
        token: str,
        path: str = "/mcp",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self.call(
            body=body if body is not None else call(),
            path=path,
            headers={"Authorization": f"Bearer {token}", **(headers or {})},
        )

    def source(self) -> Any:
        """The key source of the (only) issuer."""
        return next(iter(self.service.gateway.generation.auth.oauth.sources.values()))

    def assertRefused(
        self, reply: Reply, status: int, authResult: str | None, challenge: str
    ) -> dict[str, Any]:
        """The refusal's status, JSON-RPC error, challenge; upstream untouched; audited."""
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.header("WWW-Authenticate"), [challenge])
        body = reply.json()
        self.assertEqual(body["id"], 7)
        self.assertEqual(self.upstream.seen, [])
        line = self.auditLines()[-1]
        self.assertEqual((line["status"], line["auth_result"]), (status, authResult))
        self.assertEqual(line["error"], body["error"]["message"])
        error: dict[str, Any] = body["error"]
        return error


class TokenTests(OAuthTestCase):
    @inlineCallbacks
    def test_acceptedAlgorithms(self) -> Any:
        """RS256, PS256, ES256 and EdDSA tokens for /mcp pass: auth_result oauth, principal sub."""
        tokens = [
            self.idp.token(RESOURCE, "rsa"),
            self.idp.token(RESOURCE, "rsa", alg="PS256", sub="bob"),
            self.idp.token(RESOURCE, "ec", sub="carol"),
            self.idp.token([RESOURCE, "other"], "ed25519", sub="dave"),
        ]
        for token in tokens:
            reply = yield self.bearer(token)
            self.assertEqual(reply.status, 200, reply.body)
        lines = self.auditLines()
        self.assertEqual(
            [(x["auth_result"], x["principal"], x["auth_key_id"]) for x in lines],
            [("oauth", p, None) for p in ("alice", "bob", "carol", "dave")],
        )
        self.assertEqual(self.idp.fetches, 1)

    @inlineCallbacks
    def test_missing(self) -> Any:
        """No token: 401 missing, the challenge points at /mcp's metadata and required scope."""
        reply = yield self.call(body=call())
        error = self.assertRefused(reply, 401, "missing", MISSING)
        self.assertEqual(
            error, {"code": -32003, "message": "unauthenticated", "data": {"auth_result": "missing"}}
        )

    @inlineCallbacks
    def test_rejections(self) -> Any:
        """Expired, not yet valid, wrong issuer, wrong audience, another path's token, HMAC with the public key, alg none, no exp, garbage: each a 401 invalid_token, never forwarded."""
        idp = self.idp
        rsa = idp.keys["rsa"]
        claims = {"iss": idp.issuer, "aud": RESOURCE, "sub": "x", "exp": 4102444800}
        other = IdentityProvider("https://evil.test")
        cases = {
            "expired": idp.token(RESOURCE, lifetime=-31),
            "nbf": idp.token(RESOURCE, nbf=int(__import__("time").time()) + 120),
            "issuer": idp.token(RESOURCE, iss="https://other.test/realms/corp"),
            "audience": idp.token("https://mcp.example.com/other"),
            "other path": idp.token(PUBLIC + "/b"),
            "no audience": idp.token(None),
            "hmac with the public key": forged(
                {"alg": "HS256", "kid": rsa.kid}, claims, rsa.publicPEM()
            ),
            "hmac, no kid": forged({"alg": "HS256"}, claims, rsa.publicPEM()),
            "alg none": forged({"alg": "none", "kid": rsa.kid}, claims, None),
            "no exp": idp.token(RESOURCE, exp=None),
            "foreign key, same kid": other.token(
                RESOURCE, key=other.keys["rsa"], iss=idp.issuer, headers={"kid": rsa.kid}
            ),
            "garbage": "not.a.jwt",
            "no principal": idp.token(RESOURCE, sub=None),
        }
        for name, token in cases.items():
            reply = yield self.bearer(token)
            error = self.assertRefused(reply, 401, "invalid", INVALID)
            self.assertEqual(
                (error["code"], error["message"], error["data"]["auth_result"]),
                (-32003, "unauthenticated", "invalid"),
                name,
            )
        # A token for /mcp is good there, and refused at /b.
        token = idp.token(RESOURCE)
        reply = yield self.bearer(token, path="/b")
        self.assertEqual(reply.status, 401)
        self.assertEqual(
            reply.header("WWW-Authenticate"),
            [
                f'Bearer resource_metadata="{PUBLIC}/.well-known/oauth-protected-resource/b", '
                'error="invalid_token"'
            ],
        )
        reply = yield self.bearer(token)
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_insufficientScope(self) -> Any:
        """A valid token without the required scope: 403 insufficient_scope, audited with its principal."""
        token = self.idp.token(RESOURCE, scope="mcp:resources", sub="erin")
        reply = yield self.bearer(token)
        error = self.assertRefused(
            reply,
            403,
            "oauth",
            f'Bearer resource_metadata="{METADATA}", error="insufficient_scope", '
            'scope="mcp:tools"',
        )
        self.assertEqual((error["code"], error["message"]), (-32009, "insufficient_scope"))
        self.assertEqual(self.auditLines()[-1]["principal"], "erin")
        # scp (a list) counts too.
        reply = yield self.bearer(self.idp.token(RESOURCE, scope=None, scp=["mcp:tools"]))
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_rotation(self) -> Any:
        """A token signed with a rotated-in key (unknown kid) makes the gateway refetch once; an unknown kid soon after does not refetch again."""
        reply = yield self.bearer(self.idp.token(RESOURCE))
        self.assertEqual((reply.status, self.idp.fetches), (200, 1))
        new = self.idp.rotate("rsa")
        token = self.idp.token(RESOURCE, key=new)
        self.upstream.seen.clear()
        reply = yield self.bearer(token)  # right after a fetch: no refetch yet
        self.assertRefused(reply, 401, "invalid", INVALID)
        self.assertEqual(self.idp.fetches, 1)
        self.source()._lastAttempt -= 5  # MIN_REFRESH later
        reply = yield self.bearer(self.idp.token(RESOURCE, key=new))
        self.assertEqual((reply.status, self.idp.fetches), (200, 2))
        stranger = IdentityProvider(self.idp.issuer)
        self.upstream.seen.clear()
        reply = yield self.bearer(stranger.token(RESOURCE))
        self.assertRefused(reply, 401, "invalid", INVALID)
        self.assertEqual(self.idp.fetches, 2)  # within MIN_REFRESH of the last fetch

    @inlineCallbacks
    def test_outageWithCachedKeys(self) -> Any:
        """While the JWKS endpoint fails, tokens signed with held keys still pass; only unknown keys are refused."""
        reply = yield self.bearer(self.idp.token(RESOURCE, "ec"))
        self.assertEqual(reply.status, 200)
        self.idp.down = True
        source = self.source()
        source._lastAttempt -= 60  # the next unknown kid may refetch at once
        self.upstream.seen.clear()
        reply = yield self.bearer(IdentityProvider(self.idp.issuer).token(RESOURCE))
        self.assertRefused(reply, 401, "invalid", INVALID)
        self.assertEqual(self.idp.fetches, 2)
        self.assertIn("503", source.lastError)
        for kind in ("rsa", "ec", "ed25519"):  # new tokens: each a signature check
            reply = yield self.bearer(self.idp.token(RESOURCE, kind, sub=kind))
            self.assertEqual(reply.status, 200, kind)

    @inlineCallbacks
    def test_neverForwarded(self) -> Any:
        """The token reaches the upstream in no header: Authorization, a copy elsewhere, a cookie."""
        token = self.idp.token(RESOURCE)
        reply = yield self.bearer(token, headers={"X-Token": token, "Cookie": f"t={token}"})
        self.assertEqual(reply.status, 200)
        (seen,) = self.upstream.seen
        self.assertEqual(seen.header("Authorization"), [])
        for name, value in seen.headers:
            self.assertNotIn(token, value, name)
            self.assertNotIn(token.split(".")[2], value, name)

    @inlineCallbacks
    def test_cached(self) -> Any:
        """A token seen before is not verified again (the cache), and still checked per path."""
        token = self.idp.token(RESOURCE)
        verifier = self.service.gateway.generation.auth.oauth
        for _ in range(3):
            reply = yield self.bearer(token)
            self.assertEqual(reply.status, 200)
        self.assertEqual(verifier.cacheSize, 1)
        reply = yield self.bearer(token, path="/b")
        self.assertEqual(reply.status, 401)


class MetadataTests(OAuthTestCase):
    @inlineCallbacks
    def test_documents(self) -> Any:
        """Each upstream path has its RFC 9728 document; the bare well-known path only with one upstream."""
        for path in ("/mcp", "/b"):
            reply = yield self.call("GET", "/.well-known/oauth-protected-resource" + path)
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.header("Content-Type"), ["application/json"])
            self.assertEqual(
                reply.json(),
                {
                    "resource": PUBLIC + path,
                    "authorization_servers": [self.idp.issuer],
                    "scopes_supported": ["mcp:tools", "mcp:resources"],
                    "bearer_methods_supported": ["header"],
                },
            )
        reply = yield self.call("GET", "/.well-known/oauth-protected-resource")
        self.assertEqual(reply.status, 404)
        reply = yield self.call("POST", "/.well-known/oauth-protected-resource/mcp", b"{}")
        self.assertEqual(reply.status, 405)
        self.assertEqual(reply.header("Allow"), ["GET, HEAD"])
        self.assertEqual(reply.json()["error"]["message"], "method_not_allowed")
        line = self.auditLines()[-1]
        self.assertEqual((line["status"], line["error"]), (405, "method_not_allowed"))


class OneUpstreamTests(OAuthTestCase):
    def configText(self) -> str:
        text = super().configText()
        lines = text.splitlines(keepends=True)
        return "".join(line for line in lines if "name: b," not in line)

    @inlineCallbacks
    def test_bareWellKnown(self) -> Any:
        """With one upstream, /.well-known/oauth-protected-resource answers its document too."""
        reply = yield self.call("GET", "/.well-known/oauth-protected-resource")
        self.assertEqual(reply.json()["resource"], RESOURCE)


class KeysAndTokensTests(OAuthTestCase):
    authExtra = f"  keys: [{{id: ci-bot, hash: '{FAST.hash(KEY_A)}'}}]\n"

    @inlineCallbacks
    def test_both(self) -> Any:
        """An mcpgw_ credential is an API key, anything else a token; a bad key gets the OAuth challenge."""
        reply = yield self.bearer(KEY_A)
        self.assertEqual(reply.status, 200)
        reply = yield self.bearer(self.idp.token(RESOURCE))
        self.assertEqual(reply.status, 200)
        self.assertEqual(
            [(x["auth_result"], x["principal"]) for x in self.auditLines()],
            [("ok", "ci-bot"), ("oauth", "alice")],
        )
        self.upstream.seen.clear()
        reply = yield self.bearer("mcpgw_" + "x" * 43)
        self.assertRefused(reply, 401, "invalid", INVALID)
        reply = yield self.call(body=call())
        self.assertRefused(reply, 401, "missing", MISSING)


POLICY = """policy:
  default_action: deny
  rules:
    - id: admins-reset
      action: allow
      match: {exact: admin_reset}
      when: {claims: {groups: ["mcp-admins"]}}
    - id: writers-shell
      action: allow
      match: {exact: shell_exec}
      when: {scopes: [mcp:write]}
    - id: corp-reads
      action: allow
      match: {list: [echo, read_file]}
      when: {claims: {email: ["*@corp.example"]}}
"""


class PolicyTests(OAuthTestCase):
    policy = POLICY

    @inlineCallbacks
    def test_claimsAndScopes(self) -> Any:
        """when.claims (a list claim, a glob) and when.scopes decide calls, per token."""
        admin = self.idp.token(RESOURCE, groups=["staff", "mcp-admins"], email="a@corp.example")
        writer = self.idp.token(RESOURCE, scope="mcp:tools mcp:write", email="w@else.example")
        for token, tool, status in [
            (admin, "admin_reset", 200),
            (admin, "echo", 200),
            (admin, "shell_exec", 403),
            (writer, "shell_exec", 200),
            (writer, "admin_reset", 403),
            (writer, "echo", 403),
        ]:
            reply = yield self.bearer(token, body=call(tool))
            self.assertEqual(reply.status, status, (tool, reply.body))

    @inlineCallbacks
    def test_listing(self) -> Any:
        """tools/list shows each token caller what it may call."""
        admin = self.idp.token(RESOURCE, groups="mcp-admins", email="a@corp.example")
        writer = self.idp.token(RESOURCE, scope="mcp:tools mcp:write")
        shown = {}
        for name, token in (("admin", admin), ("writer", writer)):
            reply = yield self.bearer(token, body=rpc("tools/list", {}, id=7))
            shown[name] = sorted(t["name"] for t in reply.json()["result"]["tools"])
        self.assertEqual(
            shown, {"admin": ["admin_reset", "echo", "read_file"], "writer": ["shell_exec"]}
        )


class FileKeysTests(OAuthTestCase):
    """An air-gapped issuer: its JWKS from a file, re-read on reload."""

    reloadable = True

    def configText(self) -> str:
        self.jwksPath = os.path.join(self.tmp, "idp-jwks.json")
        if not os.path.exists(self.jwksPath):
            with open(self.jwksPath, "w") as f:
                json.dump(self.idp.jwks(), f)
        text = super().configText()
        return text.replace(
            next(line for line in text.splitlines() if "jwks_url:" in line),
            f"        jwks_file: {self.jwksPath}",
        )

    @inlineCallbacks
    def test_fileAndReload(self) -> Any:
        """Keys come from the file (no fetch); a rotated key works once the file is rewritten and the config reloaded."""
        reply = yield self.bearer(self.idp.token(RESOURCE, "ed25519"))
        self.assertEqual(reply.status, 200)
        new = self.idp.rotate("ed25519")
        token = self.idp.token(RESOURCE, key=new)
        reply = yield self.bearer(token)
        self.assertEqual(reply.status, 401)
        with open(self.jwksPath, "w") as f:
            json.dump(self.idp.jwks(), f)
        self.service.reload()
        reply = yield self.bearer(token)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.idp.fetches, 0)


class TLSKeysTests(OAuthTestCase):
    """The JWKS over https, trusted through ca_file; without it, nothing verifies (503)."""

    trusted = True

    def setUp(self) -> Any:
        from twisted.internet import ssl

        from tests.pki import CA

        self.ca = CA("idp test CA")
        issued = self.ca.server()
        self.idp = IdentityProvider()
        site = server.Site(JWKSResource(self.idp))
        site.noisy = False
        options = ssl.PrivateCertificate.loadPEM(issued.certPEM + issued.keyPEM).options()
        self.idpPort = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(self.idpPort.stopListening)
        return GatewayTestCase.setUp(self)

    def configText(self) -> str:
        text = super().configText()
        line = next(line for line in text.splitlines() if "jwks_url:" in line)
        url = line.split("jwks_url: ")[1].replace("http://127.0.0.1", "https://localhost")
        new = f"        jwks_url: {url}"
        if self.trusted:
            new += f"\n        ca_file: {self.ca.writeCert(self.tmp, 'idp-ca')}"
        return text.replace(line, new)

    @inlineCallbacks
    def test_https(self) -> Any:
        """The key set is fetched over https from a server the ca_file vouches for."""
        reply = yield self.bearer(self.idp.token(RESOURCE, "ec"))
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(self.idp.fetches, 1)


class UntrustedTLSKeysTests(TLSKeysTests):
    trusted = False

    @inlineCallbacks
    def test_https(self) -> Any:
        """A JWKS server the system store does not trust: no keys, so 503 auth_unavailable (not a 401 that would send the client to log in again)."""
        reply = yield self.bearer(self.idp.token(RESOURCE, "ec"))
        self.assertEqual(reply.status, 503, reply.body)
        self.assertEqual(reply.json()["error"]["message"], "auth_unavailable")
        self.assertEqual(reply.header("Retry-After"), ["5"])
        self.assertEqual(self.idp.fetches, 0)  # the handshake failed: no request reached it
        self.assertEqual(self.auditLines()[-1]["error"], "auth_unavailable")
