#!/usr/bin/env python3
"""Micro-benchmark of OAuth access-token authentication (mcpgw.auth, mcpgw.oauth), in-process.

    .venv/bin/python bench/oauth_bench.py [--repeat N] [--tokens N]

Prints a markdown table of the cost per request (microseconds, median of N repeats) of:
  - Authenticator.authenticate() for a token already verified (the cache: HMAC of the token,
    one dict lookup, expiry/audience/scope checks), and the same for an API key (its cache) for
    comparison; then AuthResult.caller() (the policy caller, claims and scopes included);
  - the first verification of a new token (parse, issuer and key lookup, signature, claims,
    cached afterwards) signed RS256 (RSA 2048), PS256, ES256 (P-256) and EdDSA (Ed25519): every
    iteration presents a token never seen before (distinct C{jti}), so each pays the signature.
Keys come from a JWKS file (no network); the verifier is the one the gateway uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import timeit
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from argon2 import PasswordHasher
from twisted.internet.task import Clock

from mcpgw.auth import Authenticator
from mcpgw.config import config_from_string
from tests.idp import IdentityProvider

RESOURCE = "https://mcp.example.com/mcp"


def build(idp: IdentityProvider, withKey: str | None = None) -> Authenticator:
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "jwks.json")
    with open(path, "w") as f:
        json.dump(idp.jwks(), f)
    keys = ""
    if withKey is not None:
        fast = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        keys = f"  keys: [{{id: ci, hash: '{fast.hash(withKey)}'}}]\n"
    config = config_from_string(
        "upstreams: [{name: a, url: 'http://127.0.0.1:1/mcp', path: /mcp}]\n"
        "auth:\n"
        "  enabled: true\n" + keys + "  oauth:\n"
        "    public_url: https://mcp.example.com\n"
        f"    issuers: [{{issuer: '{idp.issuer}', jwks_file: {path}}}]\n"
        "    required_scopes: [mcp:tools]\n"
    )
    clock = Clock()
    clock.advance(time.time())
    return Authenticator(clock, config.auth, None, None, paths=("/mcp",))


def perCall(fn: Any, number: int, repeat: int) -> float:
    """Median microseconds per call."""
    times = timeit.repeat(fn, number=number, repeat=repeat)
    return statistics.median(times) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=300, help="new tokens per algorithm")
    args = parser.parse_args()
    idp = IdentityProvider()
    key = "mcpgw_" + "k" * 43
    auth = build(idp, withKey=key)
    rows: list[tuple[str, float]] = []

    token = b"Bearer " + idp.token(RESOURCE, "rsa", groups=["staff"], email="a@b").encode()
    first = auth.authenticate(token, "127.0.0.1", None, None, b"/mcp")
    assert getattr(first, "result", None) == "oauth", first
    rows.append(
        (
            "token, cached (authenticate)",
            perCall(lambda: auth.authenticate(token, "127.0.0.1", None, None, b"/mcp"), 20000,
                    args.repeat),
        )
    )
    # The API key path: verify once through Argon2 in this thread, then the cache answers.
    from twisted.internet.defer import Deferred

    keyAuth = build(idp, withKey=key)
    keyAuth._pool = None  # type: ignore[assignment]
    keyAuth._verify = lambda digest, presented: _syncVerify(keyAuth, digest, presented)  # type: ignore[method-assign]
    header = b"Bearer " + key.encode()
    got = keyAuth.authenticate(header, "127.0.0.1", None, None, b"/mcp")
    if isinstance(got, Deferred):
        got.addErrback(lambda f: None)
    rows.append(
        (
            "API key, cached (authenticate), for comparison",
            perCall(lambda: keyAuth.authenticate(header, "127.0.0.1", None, None, b"/mcp"),
                    20000, args.repeat),
        )
    )
    result = auth.authenticate(token, "127.0.0.1", None, None, b"/mcp")
    rows.append(
        (
            "AuthResult.caller() of a token",
            perCall(lambda: result.caller("127.0.0.1", "s1"), 20000, args.repeat),  # type: ignore[union-attr]
        )
    )
    for kind, alg in (("rsa", "RS256"), ("rsa", "PS256"), ("ec", "ES256"), ("ed25519", "EdDSA")):
        samples = []
        for _ in range(args.repeat):
            tokens = [
                b"Bearer " + idp.token(RESOURCE, kind, alg=alg, jti=f"{alg}-{i}-{time.time()}").encode()
                for i in range(args.tokens)
            ]
            start = time.perf_counter()
            for t in tokens:
                auth.authenticate(t, "127.0.0.1", None, None, b"/mcp")
            samples.append((time.perf_counter() - start) / len(tokens) * 1e6)
        rows.append((f"first verification, {alg}", statistics.median(samples)))
    print("| operation | µs per request (median) |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")


def _syncVerify(auth: Authenticator, digest: bytes, presented: bytes) -> Any:
    from twisted.internet.defer import succeed

    from mcpgw.auth import _verifyAll

    keyId = _verifyAll(auth._hashes, presented)
    auth._validLengths.add(len(presented))
    auth._cache[digest] = (keyId, auth._reactor.seconds() + 300)
    return succeed(keyId)


if __name__ == "__main__":
    main()
