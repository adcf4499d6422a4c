"""
The official MCP SDK client (C{mcp} 2.x) with an OAuth bearer token, through a gateway
(C{python -m mcpgw run}) in front of the demo server, the access token's keys fetched from an
in-test identity provider (L{tests.idp.ThreadedJWKS}) on 127.0.0.1. In both SDK modes (the legacy
handshake and the default sessionless one): a policy on scopes and claims hides and refuses
C{add}, the others work, the demo server's C{whoami} proves no credential reached it, the audit
line names the token's principal; without a token the client is pointed at the RFC 9728
metadata document, which names the identity provider.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the demo extra (mcp) is not installed")

import anyio
import httpx2
import yaml
from mcp import MCPError

from tests.idp import IdentityProvider, ThreadedJWKS
from tests.sdkutil import (
    SESSION_TIMEOUT,
    DemoServer,
    Gateway,
    Recorder,
    free_port,
    read_audit,
    spawn,
    spawn_demo,
    wait_demo,
    wait_gateway,
    wait_until,
    write_policy_gateway_config,
)
from tests.test_policy_callers_sdk import keyed_client

PUBLIC = "https://mcp.example.com"
POLICY: dict[str, Any] = {
    "rules": [
        {
            "id": "math-needs-scope",
            "action": "deny",
            "match": {"exact": "add"},
            "when": {"claims": {"groups": ["interns"]}},
        },
        {"id": "no-broadcast", "action": "deny", "match": {"exact": "broadcast"}},
        {
            "id": "countdown-writers",
            "action": "deny",
            "match": {"exact": "countdown"},
            "when": {"scopes": ["mcp:readonly"]},
        },
    ]
}


@pytest.fixture(scope="module")
def idp() -> Iterator[tuple[IdentityProvider, ThreadedJWKS]]:
    provider = IdentityProvider()
    served = ThreadedJWKS(provider)
    try:
        yield provider, served
    finally:
        served.close()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, idp: tuple[IdentityProvider, ThreadedJWKS]
) -> Iterator[tuple[DemoServer, Gateway]]:
    """The demo server and a gateway with auth.oauth in front of it."""
    provider, served = idp
    workdir = tmp_path_factory.mktemp("oauth-sdk")
    demo = wait_demo(spawn_demo(workdir / "demo", "demo", "--log-level", "info"))
    port = free_port()
    config = write_policy_gateway_config(workdir, port, demo.url, POLICY)
    data = yaml.safe_load(config.read_text())
    data["auth"] = {
        "enabled": True,
        "oauth": {
            "public_url": PUBLIC,
            "issuers": [{"issuer": provider.issuer, "jwks_url": served.url}],
            "principal_claim": "email",
            "scopes_supported": ["mcp:tools"],
            "required_scopes": ["mcp:tools"],
        },
    }
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    argv = [sys.executable, "-m", "mcpgw", "run", "--config", str(config)]
    child = spawn("gateway", argv, workdir)
    gw = Gateway(child, port, f"http://127.0.0.1:{port}/mcp", config, workdir / "audit.jsonl")
    try:
        yield demo, wait_gateway(gw)
    finally:
        gw.child.stop()
        demo.child.stop()


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_sdkWithToken(
    stack: tuple[DemoServer, Gateway], idp: tuple[IdentityProvider, ThreadedJWKS], mode: str
) -> None:
    """An intern's token: add and broadcast hidden, add refused (-32001), echo and whoami work, whoami sees no credential, the audit names the intern."""
    _demo, gw = stack
    provider, _ = idp
    email = f"intern-{mode}@corp.example"
    token = provider.token(
        f"{PUBLIC}/mcp", "ec", email=email, groups=["staff", "interns"], scope="mcp:tools"
    )
    before = len(read_audit(gw.audit))
    out: dict[str, Any] = {}

    async def main() -> None:
        with anyio.fail_after(SESSION_TIMEOUT):
            async with keyed_client(gw.url, token, Recorder(), mode) as client:
                out["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
                out["echo"] = await client.call_tool("echo", {"text": "hi"})
                out["whoami"] = await client.call_tool("whoami", {})
                with pytest.raises(MCPError) as info:
                    await client.call_tool("add", {"a": 1, "b": 2})
                out["add"] = (info.value.code, info.value.message, info.value.data)

    anyio.run(main)
    assert out["tools"] == ["countdown", "echo", "whoami"]
    assert out["echo"].content[0].text == "hi"
    seen = out["whoami"].structured_content or {}
    seen = seen.get("result", seen)
    assert "x-forwarded-for" in seen  # the headers the demo server saw
    assert "authorization" not in seen
    assert not any(token in str(v) or token.split(".")[2] in str(v) for v in seen.values())
    assert out["add"] == (-32001, "policy_denied", {"rule_id": "math-needs-scope"})

    def lines() -> list[dict[str, Any]]:
        return [x for x in read_audit(gw.audit)[before:] if x["principal"] == email]

    assert wait_until(lambda: sum(x["method"] == "tools/call" for x in lines()) >= 3, timeout=5)
    assert {(x["auth_result"], x["auth_key_id"]) for x in lines()} == {("oauth", None)}
    assert provider.fetches == 1  # the JWKS fetched once, by the first request


def test_discovery(stack: tuple[DemoServer, Gateway], idp: tuple[IdentityProvider, Any]) -> None:
    """Without a token: 401 whose challenge names the metadata URL; the document names the IdP."""
    _, gw = stack
    provider, _ = idp
    with httpx2.Client(timeout=10) as http:
        r = http.post(
            gw.url,
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Accept": "application/json, text/event-stream"},
        )
        assert r.status_code == 401
        metadata = f"{PUBLIC}/.well-known/oauth-protected-resource/mcp"
        assert r.headers["www-authenticate"] == (
            f'Bearer resource_metadata="{metadata}", scope="mcp:tools"'
        )
        assert r.json()["error"]["data"] == {"auth_result": "missing"}
        local = metadata.replace(PUBLIC, f"http://127.0.0.1:{gw.port}")
        doc = http.get(local).json()
    assert doc == {
        "resource": f"{PUBLIC}/mcp",
        "authorization_servers": [provider.issuer],
        "scopes_supported": ["mcp:tools"],
        "bearer_methods_supported": ["header"],
    }
