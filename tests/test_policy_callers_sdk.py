"""
Policy by caller seen by the official MCP SDK client (C{mcp} 2.x): two API keys against the same
gateway (a C{python -m mcpgw run} subprocess) in front of the demo server (SSE answers), in the
legacy handshake mode (2025-11-25) and in the SDK's default sessionless 2026-07-28 mode. Each key
calls, lists and reads what its C{when.keys} rules let it (tools, the demo resource, the greet
prompt), a rule on an argument refuses one call, C{redact_results} scrubs echo's result, a
per-key rate limit refuses a key's second whoami but not the other key's first, and the audit
line names the principal of each request. Refusals surface in the SDK as C{MCPError} with the
gateway's code, message and data; the demo server's access log proves they never reached it.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the demo extra (mcp) is not installed")

import anyio
import httpx2
import yaml
from mcp import MCPError

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
from tests.test_auth import FAST, KEY_A, KEY_B

SECRET = "AKIAIOSFODNN7EXAMPLE"

POLICY: dict[str, Any] = {
    "default_action": {"resources/read": "deny"},
    "rules": [
        {
            "id": "ci-no-add",
            "action": "deny",
            "match": {"exact": "add"},
            "when": {"keys": ["ci-bot"]},
        },
        {
            "id": "deploy-no-echo",
            "action": "deny",
            "match": {"exact": "echo"},
            "when": {"keys": ["deploy-*"]},
        },
        {
            "id": "no-big-add",
            "action": "deny",
            "match": {"exact": "add"},
            "when": {"arguments": {"a": {"exact": "1000"}}},
        },
        {
            "id": "ci-reads-demo",
            "action": "allow",
            "method": "resources/read",
            "match": {"prefix": "demo://"},
            "when": {"keys": ["ci-bot"]},
        },
        {
            "id": "deploy-no-greet",
            "action": "deny",
            "method": "prompts/get",
            "match": {"exact": "greet"},
            "when": {"keys": ["deploy-*"]},
        },
        {
            "id": "scrub-echo",
            "action": "allow",
            "match": {"exact": "echo"},
            "redact_results": ["aws_access_key"],
        },
        {
            "id": "whoami-budget",
            "action": "rate_limit",
            "match": {"exact": "whoami"},
            "rate_limit": {"rate": 0.01, "burst": 1, "per": "key"},
        },
    ],
}
"""
ci-bot may not call add and may read demo:// resources; deploy-eu may not call echo nor get the
greet prompt; nobody may call add with a = 1000; resources/read is denied by default; echo's
results lose AWS key ids; whoami: one call per key per 100 s.
"""

MODES = ["legacy", "auto"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policy-callers-sdk")


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[DemoServer]:
    """The demo server (SSE answers), logging every request it gets."""
    child = spawn_demo(workdir / "demo", "demo", "--log-level", "info")
    try:
        yield wait_demo(child)
    finally:
        child.stop()


@pytest.fixture(scope="module")
def gateways(server: DemoServer, workdir: Path) -> Iterator[dict[str, Gateway]]:
    """One gateway per SDK mode (each with its own rate-limit buckets), two API keys each."""
    gws = {}
    for mode in MODES:
        directory = workdir / f"gw-{mode}"
        port = free_port()
        config = write_policy_gateway_config(directory, port, server.url, POLICY)
        data = yaml.safe_load(config.read_text())
        data["auth"] = {
            "enabled": True,
            "keys": [
                {"id": "ci-bot", "hash": FAST.hash(KEY_A)},
                {"id": "deploy-eu", "hash": FAST.hash(KEY_B)},
            ],
        }
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        argv = [sys.executable, "-m", "mcpgw", "run", "--config", str(config)]
        child = spawn(f"gateway-{mode}", argv, directory)
        gws[mode] = Gateway(
            child, port, f"http://127.0.0.1:{port}/mcp", config, directory / "audit.jsonl"
        )
    try:
        yield {mode: wait_gateway(gw) for mode, gw in gws.items()}
    finally:
        for gw in gws.values():
            gw.child.stop()


@asynccontextmanager
async def keyed_client(url: str, key: str, recorder: Recorder, mode: str) -> AsyncIterator[Any]:
    """An SDK C{mcp.Client} presenting C{key} as its bearer token, its traffic recorded."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(
        timeout=httpx2.Timeout(30.0, read=60.0),
        headers={"Authorization": f"Bearer {key}"},
        event_hooks={"response": [recorder.on_response]},
    ) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, cache=None, read_timeout_seconds=20.0) as client:
            yield client


def upstream_posts(server: DemoServer) -> int:
    """How many POST requests the demo server has received (its access log)."""
    return server.child.stdout().count('"POST /mcp HTTP/1.1"')


class Session:
    """One SDK session with one key; C{refused} runs a call that must fail."""

    def __init__(self, client: Any, server: DemoServer) -> None:
        self.client = client
        self.server = server
        self.leaked = 0

    async def refused(self, call: Any) -> tuple[Any, ...]:
        """The MCPError's (code, message, data); counts upstream POSTs made meanwhile."""
        before = upstream_posts(self.server)
        with pytest.raises(MCPError) as info:
            await call
        self.leaked += upstream_posts(self.server) - before
        return (info.value.code, info.value.message, info.value.data)


def run(gw: Gateway, server: DemoServer, key: str, mode: str, body: Any) -> Any:
    """Run C{body(session)} in one SDK session presenting C{key} (blocking, with a deadline)."""
    out: list[Any] = []

    async def main() -> None:
        with anyio.fail_after(SESSION_TIMEOUT):
            async with keyed_client(gw.url, key, Recorder(), mode) as client:
                session = Session(client, server)
                out.append(await body(session))
                out.append(session.leaked)

    anyio.run(main)
    return out


def denied(rule: str | None) -> tuple[Any, ...]:
    return (-32001, "policy_denied", {"rule_id": rule})


def lines_for(gw: Gateway, before: int, principal: str, calls: int) -> list[dict[str, Any]]:
    """The new audit lines, once C{calls} tools/call lines of C{principal} are there."""

    def lines() -> list[dict[str, Any]]:
        return [x for x in read_audit(gw.audit)[before:] if x["principal"] == principal]

    wait_until(lambda: sum(x["method"] == "tools/call" for x in lines()) >= calls, timeout=5)
    return lines()


def decided(lines: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(method, tool or target, decision, rule_id, status) of each policy-decided line."""
    methods = ("tools/call", "resources/read", "prompts/get")
    return [
        (x["method"], x["tool"] or x["target"], x["decision"], x["rule_id"], x["status"])
        for x in lines
        if x["method"] in methods
    ]


@pytest.mark.parametrize("mode", MODES)
def test_ci_bot(gateways: dict[str, Gateway], server: DemoServer, mode: str) -> None:
    """ci-bot: add is hidden and refused (MCPError -32001 ci-no-add), echo's result is scrubbed, the demo resource is listed and readable, greet is listed and served, a second whoami is rate limited (-32002); refusals never reach the upstream; every audit line names ci-bot."""
    gw = gateways[mode]
    before = len(read_audit(gw.audit))

    async def body(s: Session) -> dict[str, Any]:
        c = s.client
        return {
            "tools": sorted(t.name for t in (await c.list_tools()).tools),
            "add": await s.refused(c.call_tool("add", {"a": 1, "b": 2})),
            "echo": await c.call_tool("echo", {"text": f"key {SECRET}"}),
            "resources": [str(r.uri) for r in (await c.list_resources()).resources],
            "read": await c.read_resource("demo://info"),
            "prompts": [p.name for p in (await c.list_prompts()).prompts],
            "greet": await c.get_prompt("greet", {"name": "Ada"}),
            "whoami": await c.call_tool("whoami", {}),
            "again": await s.refused(c.call_tool("whoami", {})),
        }

    got, leaked = run(gw, server, KEY_A, mode, body)
    assert got["tools"] == ["broadcast", "countdown", "echo", "whoami"]
    assert got["add"] == denied("ci-no-add")
    assert got["echo"].content[0].text == "key [REDACTED]"
    assert got["echo"].structured_content == {"result": "key [REDACTED]"}
    assert got["resources"] == ["demo://info"]
    assert "mcpgw-demo" in got["read"].contents[0].text
    assert got["prompts"] == ["greet"]
    assert "Ada" in got["greet"].messages[0].content.text
    assert not got["whoami"].is_error
    assert got["again"] == (-32002, "rate_limited", {"rule_id": "whoami-budget"})
    assert leaked == 0
    lines = lines_for(gw, before, "ci-bot", 4)
    assert decided(lines) == [
        ("tools/call", "add", "deny", "ci-no-add", 403),
        ("tools/call", "echo", "allow", "scrub-echo", 200),
        ("resources/read", "demo://info", "allow", "ci-reads-demo", 200),
        ("prompts/get", "greet", "allow", None, 200),
        ("tools/call", "whoami", "allow", "whoami-budget", 200),
        ("tools/call", "whoami", "rate_limit", "whoami-budget", 429),
    ]
    echo = next(x for x in lines if x["tool"] == "echo")
    assert echo["redacted_results"] == 2  # content[0].text and structuredContent.result
    assert {(x["auth_result"], x["auth_key_id"]) for x in lines} == {("ok", "ci-bot")}
    listings = {
        x["method"]: x["filtered_tools"] for x in lines if (x["method"] or "").endswith("/list")
    }
    assert listings["tools/list"] == 1
    assert listings["prompts/list"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_deploy_key(gateways: dict[str, Gateway], server: DemoServer, mode: str) -> None:
    """deploy-eu, on the same gateway: echo is hidden and refused (deploy-no-echo), add passes but not with a = 1000 (no-big-add), the demo resource is neither listed nor readable (default deny, rule null), greet is neither listed nor served, and its first whoami is its own bucket's."""
    gw = gateways[mode]
    before = len(read_audit(gw.audit))

    async def body(s: Session) -> dict[str, Any]:
        c = s.client
        return {
            "tools": sorted(t.name for t in (await c.list_tools()).tools),
            "echo": await s.refused(c.call_tool("echo", {"text": "hi"})),
            "add": await c.call_tool("add", {"a": 2, "b": 3}),
            "big": await s.refused(c.call_tool("add", {"a": 1000, "b": 1})),
            "resources": [str(r.uri) for r in (await c.list_resources()).resources],
            "read": await s.refused(c.read_resource("demo://info")),
            "prompts": [p.name for p in (await c.list_prompts()).prompts],
            "greet": await s.refused(c.get_prompt("greet", {"name": "Ada"})),
            "whoami": await c.call_tool("whoami", {}),
        }

    got, leaked = run(gw, server, KEY_B, mode, body)
    assert got["tools"] == ["add", "broadcast", "countdown", "whoami"]
    assert got["echo"] == denied("deploy-no-echo")
    assert got["add"].structured_content == {"result": 5.0}
    assert got["big"] == denied("no-big-add")
    assert got["resources"] == []
    assert got["read"] == denied(None)
    assert got["prompts"] == []
    assert got["greet"] == denied("deploy-no-greet")
    assert not got["whoami"].is_error
    assert KEY_B not in str(got["whoami"].structured_content)  # never forwarded
    assert leaked == 0
    lines = lines_for(gw, before, "deploy-eu", 4)
    assert decided(lines) == [
        ("tools/call", "echo", "deny", "deploy-no-echo", 403),
        ("tools/call", "add", "allow", None, 200),
        ("tools/call", "add", "deny", "no-big-add", 403),
        ("resources/read", "demo://info", "deny", None, 403),
        ("prompts/get", "greet", "deny", "deploy-no-greet", 403),
        ("tools/call", "whoami", "allow", "whoami-budget", 200),
    ]
    listings = {
        x["method"]: x["filtered_tools"] for x in lines if (x["method"] or "").endswith("/list")
    }
    assert listings == {"tools/list": 1, "resources/list": 1, "prompts/list": 1}
