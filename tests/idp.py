"""
An in-test identity provider: signing keys made with C{cryptography} (RSA 2048, EC P-256,
Ed25519), its JWKS served over HTTP on 127.0.0.1, and access tokens signed with PyJWT.

Two ways to serve the JWKS: L{JWKSResource} (twisted.web, for tests running the gateway in the
test's reactor) and L{ThreadedJWKS} (the standard library's HTTP server in a thread, for tests
whose gateway is a subprocess). Both count fetches, can fail on purpose (an outage) and serve
whatever L{IdentityProvider.jwks} holds at that moment (key rotation).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.web import resource, server

#: The algorithm each kind of key signs with by default.
DEFAULT_ALG = {"rsa": "RS256", "ec": "ES256", "ed25519": "EdDSA"}


class SigningKey:
    """One private key, its kid and its public JWK."""

    def __init__(self, kind: str, kid: str | None = None, alg: str | None = None) -> None:
        self.kind = kind
        self.kid = kid or f"{kind}-{uuid.uuid4().hex[:8]}"
        private: Any
        if kind == "rsa":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
        elif kind == "ec":
            private = ec.generate_private_key(ec.SECP256R1())
            jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
        else:
            private = ed25519.Ed25519PrivateKey.generate()
            jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
        self.private = private
        jwk["kid"] = self.kid
        jwk["use"] = "sig"
        if alg is not None:
            jwk["alg"] = alg
        self.jwk = jwk

    def publicPEM(self) -> bytes:
        key = self.private.public_key()
        return bytes(
            key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


class IdentityProvider:
    """
    Keys and tokens of one issuer.

    @ivar keys: the keys whose public halves the JWKS publishes.
    @ivar fetches: JWKS requests served (or refused during an outage).
    @ivar down: when true, the JWKS endpoint answers 503.
    @ivar cacheControl: the C{Cache-Control} of JWKS answers.
    """

    def __init__(self, issuer: str = "https://idp.test/realms/corp") -> None:
        self.issuer = issuer
        self.keys = {kind: SigningKey(kind) for kind in ("rsa", "ec", "ed25519")}
        self.fetches = 0
        self.down = False
        self.cacheControl = "max-age=300"
        self._lock = threading.Lock()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk for k in self.keys.values()]}

    def rotate(self, kind: str = "rsa") -> SigningKey:
        """Replace the key of C{kind} by a new one (a new kid)."""
        key = self.keys[kind] = SigningKey(kind)
        return key

    def token(
        self,
        audience: str | list[str] | None,
        kind: str = "rsa",
        alg: str | None = None,
        key: SigningKey | None = None,
        lifetime: float = 300.0,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A signed access token for C{audience} (C{None}: no C{aud}); claims override."""
        now = time.time()
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "alice",
            "iat": int(now),
            "exp": int(now + lifetime),
            "scope": "mcp:tools",
        }
        if audience is not None:
            payload["aud"] = audience
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        signer = key or self.keys[kind]
        extra = {"kid": signer.kid, **(headers or {})}
        return jwt.encode(
            payload, signer.private, algorithm=alg or DEFAULT_ALG[signer.kind], headers=extra
        )

    def served(self) -> tuple[int, bytes, str]:
        """What the JWKS endpoint answers now: status, body, Cache-Control."""
        with self._lock:
            self.fetches += 1
        if self.down:
            return 503, b'{"error":"down"}', "no-store"
        return 200, json.dumps(self.jwks()).encode(), self.cacheControl


class JWKSResource(resource.Resource):
    """The JWKS endpoint as a twisted.web resource (any path)."""

    isLeaf = True

    def __init__(self, idp: IdentityProvider) -> None:
        super().__init__()
        self.idp = idp

    def render_GET(self, request: server.Request) -> bytes:
        status, body, cache = self.idp.served()
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", cache.encode())
        return body


class ThreadedJWKS:
    """The JWKS endpoint on 127.0.0.1, served by a thread (no reactor needed)."""

    def __init__(self, idp: IdentityProvider) -> None:
        provider = idp

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body, cache = provider.served()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", cache)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/realms/corp/protocol/openid-connect/certs"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
