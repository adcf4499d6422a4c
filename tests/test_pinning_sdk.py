"""
Tool pinning seen by the official MCP SDK (C{mcp} 2.x): a rug pull. The gateway (a C{python -m
mcpgw run} subprocess) fronts an SDK server (L{tests.pinning_server}) whose C{add} tool is
replaced, while a client is connected, by a poisoned definition, announced with
C{notifications/tools/list_changed}. The rollout follows docs/tool-pinning.md: C{warn} first
(everything passes, audited C{new}), C{mcpgw tools approve --all}, switch to C{enforce} and
SIGHUP; then the rug pull: the notification reaches the client, the next C{tools/list} (legacy
and 2026-07-28 clients) leaves C{add} out, a call to it is refused (-32001 C{tool_not_approved})
while C{echo} passes; C{mcpgw tools status} shows the diff; a restarted gateway still refuses
C{add} before any listing; C{mcpgw tools approve demo/add} and SIGHUP bring it back.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the demo extra (mcp) is not installed")

import anyio
import yaml
from mcp import MCPError

from tests.pinning_server import POISONED
from tests.sdkutil import (
    REPO,
    SESSION_TIMEOUT,
    Gateway,
    Recorder,
    free_port,
    read_audit,
    sdk_client,
    spawn,
    wait_gateway,
    wait_until,
    write_gateway_config,
)

READY = re.compile(r"pinning MCP server listening on (http://127\.0\.0\.1:\d+/mcp)")


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[str]:
    child = spawn("upstream", [sys.executable, "-m", "tests.pinning_server"], tmp_path / "up")
    try:
        assert wait_until(lambda: READY.search(child.stdout()) is not None, timeout=30), (
            child.output()
        )
        m = READY.search(child.stdout())
        assert m is not None
        yield m.group(1)
    finally:
        child.stop()


def start_gateway(workdir: Path, config: Path, port: int, name: str) -> Gateway:
    argv = [sys.executable, "-m", "mcpgw", "run", "--config", str(config)]
    child = spawn(name, argv, workdir)
    gw = Gateway(child, port, f"http://127.0.0.1:{port}/mcp", config, workdir / "audit.jsonl")
    return wait_gateway(gw)


def set_mode(config: Path, mode: str) -> None:
    data = yaml.safe_load(config.read_text())
    data["tools"] = {"pinning": {"mode": mode, "lock_file": "tools.lock"}}
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def mcpgw(*argv: str) -> subprocess.CompletedProcess[str]:
    """The C{mcpgw} command, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mcpgw", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def reload(gw: Gateway) -> None:
    """SIGHUP, then wait for the gateway's log to say the new generation is in force."""
    before = gw.child.stdout().count("reloaded ")
    gw.child.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: gw.child.stdout().count("reloaded ") > before, timeout=10), (
        gw.child.output()
    )


def session(url: str, body: Any, mode: str = "legacy", **kwargs: Any) -> Any:
    """Run C{body(client)} in one SDK session (blocking, with a deadline)."""
    out: list[Any] = []

    async def main() -> None:
        with anyio.fail_after(SESSION_TIMEOUT):
            async with sdk_client(url, Recorder(), mode=mode, **kwargs) as client:
                out.append(await body(client))

    anyio.run(main)
    return out[0]


async def refused(call: Any) -> tuple[Any, ...]:
    with pytest.raises(MCPError) as info:
        await call
    data = info.value.data or {}
    return (info.value.code, info.value.message, data.get("reason"), data.get("pin"))


NOT_APPROVED = (-32001, "policy_denied", "tool_not_approved", "changed")


def test_rugPull(upstream: str, tmp_path: Path) -> None:
    """The rollout and the rug pull of the module docstring, step by step."""
    port = free_port()
    config = write_gateway_config(tmp_path, port, upstream)
    set_mode(config, "warn")
    store = tmp_path / "state" / "tool-definitions.json"
    gw = start_gateway(tmp_path, config, port, "gateway")
    try:
        # warn: everything passes, audited new; the definitions are remembered.
        async def first(c: Any) -> Any:
            names = sorted(t.name for t in (await c.list_tools()).tools)
            return names, (await c.call_tool("echo", {"text": "hi"})).content[0].text

        assert session(gw.url, first) == (["add", "echo", "rug_pull"], "hi")
        assert wait_until(lambda: store.exists(), timeout=10)
        assert "lists new tool 'add'" in gw.child.stdout()
        assert "passed (warn mode)" in gw.child.stdout()
        pins = [(x["method"], x["tool_pin"]) for x in read_audit(gw.audit) if x["tool_pin"]]
        assert ("tools/list", "new") in pins and ("tools/call", "new") in pins
        status = mcpgw("tools", "status", "--config", str(config))
        assert status.returncode == 1, status
        assert "demo/add: new" in status.stdout
        approve = mcpgw("tools", "approve", "--config", str(config), "--all")
        assert approve.returncode == 0, approve
        assert "SIGHUP" in approve.stdout
        assert mcpgw("tools", "status", "--config", str(config)).returncode == 0

        set_mode(config, "enforce")
        reload(gw)

        # The rug pull, while a legacy client is connected.
        notes: list[str] = []

        async def handler(message: Any) -> None:
            method = getattr(message, "method", None)
            if isinstance(method, str):
                notes.append(method)

        async def pull(c: Any) -> Any:
            before = sorted(t.name for t in (await c.list_tools()).tools)
            pulled = (await c.call_tool("rug_pull", {})).content[0].text
            with anyio.fail_after(10):
                while "notifications/tools/list_changed" not in notes:
                    await anyio.sleep(0.05)
            after = sorted(t.name for t in (await c.list_tools()).tools)
            return {
                "before": before,
                "pulled": pulled,
                "after": after,
                "add": await refused(c.call_tool("add", {"a": 1, "b": 2})),
                "echo": (await c.call_tool("echo", {"text": "still"})).content[0].text,
            }

        got = session(gw.url, pull, message_handler=handler)
        assert got == {
            "before": ["add", "echo", "rug_pull"],
            "pulled": "pulled",
            "after": ["echo", "rug_pull"],
            "add": NOT_APPROVED,
            "echo": "still",
        }

        # A 2026-07-28 client sees the same held-back state.
        async def modern(c: Any) -> Any:
            names = sorted(t.name for t in (await c.list_tools()).tools)
            return names, await refused(c.call_tool("add", {"a": 1, "b": 2}))

        assert session(gw.url, modern, mode="auto") == (["echo", "rug_pull"], NOT_APPROVED)
        lines = read_audit(gw.audit)
        call = [x for x in lines if x["method"] == "tools/call" and x["tool"] == "add"][-1]
        assert (call["decision"], call["status"], call["tool_pin"]) == ("deny", 403, "changed")

        assert "lists changed tool 'add'" in gw.child.stdout()
        assert "held back" in gw.child.stdout()

        # The reviewer's view: a diff of the definition.
        assert wait_until(lambda: POISONED in store.read_text(), timeout=10)
        status = mcpgw("tools", "status", "--config", str(config))
        assert status.returncode == 1, status
        assert "demo/add: changed" in status.stdout
        assert '-  "description": "Add two numbers.",' in status.stdout
        assert "<IMPORTANT>" in status.stdout
    finally:
        gw.child.stop()

    # A restart remembers the change: add is refused before any listing.
    gw = start_gateway(tmp_path, config, port, "gateway-again")
    try:

        async def direct(c: Any) -> Any:
            return await refused(c.call_tool("add", {"a": 1, "b": 2}))

        assert session(gw.url, direct) == NOT_APPROVED
        approve = mcpgw("tools", "approve", "--config", str(config), "demo/add")
        assert approve.returncode == 0, approve
        reload(gw)

        async def approved(c: Any) -> Any:
            names = sorted(t.name for t in (await c.list_tools()).tools)
            result = await c.call_tool("add", {"a": 1, "b": 2})
            return names, result.structured_content

        assert session(gw.url, approved) == (["add", "echo", "rug_pull"], {"result": 3.0})
    finally:
        gw.child.stop()
