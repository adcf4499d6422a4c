"""
Helpers for the end-to-end tests that use real processes and the official MCP SDK client:
start and stop the demo MCP server (C{python -m mcpgw.demo.server}) and the gateway
(C{python -m mcpgw run}) as subprocesses on 127.0.0.1, record every HTTP exchange the SDK client
makes, and run a whole SDK session into a comparable L{Transcript}.

No Twisted reactor here: the client side runs on asyncio through anyio.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import yaml

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY = re.compile(r"demo MCP server listening on (http://127\.0\.0\.1:(\d+)(/\S*))")
ACCEPT_BOTH = "application/json, text/event-stream"
LEGACY_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"
SESSION_TIMEOUT = 30.0
"""Seconds a whole SDK session may take before the test fails (instead of hanging)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Child:
    """A subprocess whose stdout and stderr go to files (never a pipe that could fill up)."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def output(self, limit: int = 4000) -> str:
        """The end of the child's stdout and stderr, for assertion messages."""
        out = self.stdout()[-limit:]
        err = self.stderr_path.read_text(errors="replace")[-limit:]
        code = self.proc.poll()
        return f"--- {self.name} (exit code {code}) stdout:\n{out}\n--- {self.name} stderr:\n{err}"

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate, wait, then kill if it is still there."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def spawn(name: str, argv: list[str], workdir: Path) -> Child:
    """Start C{argv} in the repository, its output in C{workdir/NAME.out} and C{NAME.err}."""
    workdir.mkdir(parents=True, exist_ok=True)
    out, err = workdir / f"{name}.out", workdir / f"{name}.err"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=REPO, env=env
        )
    return Child(name, proc, out, err)


@dataclass
class DemoServer:
    """A running demo MCP server."""

    child: Child
    url: str
    port: int
    path: str


def spawn_demo(workdir: Path, name: str, *flags: str) -> Child:
    """Start C{python -m mcpgw.demo.server} on a free port (C{--port 0}) with C{flags}."""
    argv = [
        sys.executable,
        "-m",
        "mcpgw.demo.server",
        "--host",
        HOST,
        "--port",
        "0",
        "--path",
        "/mcp",
    ]
    return spawn(name, [*argv, *flags], workdir)


def wait_demo(child: Child, deadline: float = 30.0) -> DemoServer:
    """Wait for the demo server's ready line; on failure stop it and raise with its output."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        m = READY.search(child.stdout())
        if m:
            return DemoServer(child, m.group(1), int(m.group(2)), m.group(3))
        if child.proc.poll() is not None:
            break
        time.sleep(0.05)
    child.stop()
    raise RuntimeError(f"demo server {child.name} did not become ready\n{child.output()}")


@dataclass
class Gateway:
    """A running gateway in front of one upstream."""

    child: Child
    port: int
    url: str
    config: Path
    audit: Path


def write_gateway_config(workdir: Path, port: int, upstream_url: str, name: str = "demo") -> Path:
    """A minimal gateway config: one upstream at C{/mcp}, audit without fsync."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "listen": {"host": HOST, "port": port},
        "upstreams": [{"name": name, "url": upstream_url, "path": "/mcp"}],
        "audit": {
            "path": str(workdir / "audit.jsonl"),
            "state_dir": str(workdir / "state"),
            "fsync": "none",
        },
    }
    path = workdir / "mcpgw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def spawn_gateway(workdir: Path, upstream_url: str, name: str = "gateway") -> Gateway:
    """Start C{python -m mcpgw run --config CFG} on a free port in front of C{upstream_url}."""
    port = free_port()
    config = write_gateway_config(workdir, port, upstream_url)
    child = spawn(name, [sys.executable, "-m", "mcpgw", "run", "--config", str(config)], workdir)
    return Gateway(child, port, f"http://{HOST}:{port}/mcp", config, workdir / "audit.jsonl")


def wait_gateway(gateway: Gateway, deadline: float = 30.0) -> Gateway:
    """Poll C{GET /healthz} until it answers 200; on failure stop it and raise with its output."""
    end = time.monotonic() + deadline
    last = "no answer"
    with httpx2.Client(timeout=2.0) as http:
        while time.monotonic() < end:
            if gateway.child.proc.poll() is not None:
                break
            try:
                r = http.get(f"http://{HOST}:{gateway.port}/healthz")
                if r.status_code == 200:
                    return gateway
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx2.TransportError as e:
                last = repr(e)
            time.sleep(0.1)
    gateway.child.stop()
    raise RuntimeError(f"gateway did not become healthy ({last})\n{gateway.child.output()}")


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every complete line of an audit file, parsed."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll C{predicate} until it is true or C{timeout} passes; its last value."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


# ------------------------------------------------------------------------------------------------
# Recording the SDK client's HTTP traffic


@dataclass
class Exchange:
    """One HTTP request the SDK client made and the head of its answer."""

    http_method: str
    rpc_method: str | None
    rpc_params: dict[str, Any] | None
    rpc_id: Any
    request_headers: dict[str, str]
    status: int
    response_headers: dict[str, str]
    response_header_names: list[str] = field(default_factory=list)
    """Every response header line's name, lower case, repeats included."""

    @property
    def tool(self) -> str | None:
        """C{params.name} of a tools/call."""
        name = (self.rpc_params or {}).get("name") if self.rpc_method == "tools/call" else None
        return name if isinstance(name, str) else None

    @property
    def content_type(self) -> str:
        """The response's media type, without parameters."""
        return self.response_headers.get("content-type", "").split(";")[0].strip().lower()

    def shape(self) -> tuple[str, str | None, int, str]:
        """What must be the same direct and through the gateway."""
        return (self.http_method, self.rpc_method, self.status, self.content_type)


@dataclass
class Recorder:
    """An httpx2 response hook that records every exchange."""

    exchanges: list[Exchange] = field(default_factory=list)

    async def on_response(self, response: httpx2.Response) -> None:
        request = response.request
        method: str | None = None
        params: dict[str, Any] | None = None
        rpc_id: Any = None
        try:
            body = json.loads(request.content) if request.content else None
        except (ValueError, httpx2.RequestNotRead):
            body = None
        if isinstance(body, dict):
            method = body.get("method")
            params = body.get("params")
            rpc_id = body.get("id")
        self.exchanges.append(
            Exchange(
                http_method=request.method,
                rpc_method=method,
                rpc_params=params,
                rpc_id=rpc_id,
                request_headers={k.lower(): v for k, v in request.headers.items()},
                status=response.status_code,
                response_headers={k.lower(): v for k, v in response.headers.items()},
                response_header_names=[k.lower() for k, _ in response.headers.multi_items()],
            )
        )

    def of(self, http_method: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.http_method == http_method]


@asynccontextmanager
async def sdk_client(
    url: str, recorder: Recorder, *, mode: str = "legacy", **kwargs: Any
) -> AsyncIterator[Any]:
    """
    An official SDK C{mcp.Client} on streamable HTTP at C{url} whose HTTP traffic C{recorder}
    sees. C{mode="legacy"} forces the initialize handshake (2025-11-25); the SDK's default,
    C{"auto"}, probes C{server/discover} and speaks 2026-07-28 to a server that answers it.
    The client's response cache is off so that every call reaches the wire.
    """
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    timeout = httpx2.Timeout(30.0, read=60.0)
    async with httpx2.AsyncClient(
        timeout=timeout, event_hooks={"response": [recorder.on_response]}
    ) as http:
        transport = streamable_http_client(url, http_client=http)
        kwargs.setdefault("read_timeout_seconds", 20.0)
        async with Client(transport, mode=mode, cache=None, **kwargs) as client:
            yield client


def dump(model: Any) -> Any:
    """A pydantic model as plain JSON-able data."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass
class Transcript:
    """Everything observable about one SDK session, to compare direct with via-gateway."""

    protocol_version: str = ""
    server_info: Any = None
    capabilities: Any = None
    instructions: str | None = None
    tools: Any = None
    echo: Any = None
    add: Any = None
    countdown: Any = None
    progress: list[tuple[float, float | None, str | None]] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)
    broadcast: Any = None
    standalone_logs: list[Any] = field(default_factory=list)
    whoami: list[dict[str, str]] = field(default_factory=list)
    resource: Any = None
    prompt: Any = None
    exchanges: list[Exchange] = field(default_factory=list)
    session_id: str | None = None
    after_close: tuple[int, Any] | None = None

    def results(self) -> dict[str, Any]:
        """The MCP-level results (what a client program sees)."""
        return {
            "protocol_version": self.protocol_version,
            "server_info": self.server_info,
            "capabilities": self.capabilities,
            "instructions": self.instructions,
            "tools": self.tools,
            "echo": self.echo,
            "add": self.add,
            "countdown": self.countdown,
            "progress": self.progress,
            "logs": self.logs,
            "broadcast": self.broadcast,
            "standalone_logs": self.standalone_logs,
            "resource": self.resource,
            "prompt": self.prompt,
        }

    def shapes(self) -> list[tuple[str, str | None, int, str]]:
        """The HTTP exchanges (method, JSON-RPC method, status, media type), in a stable order."""
        return sorted(e.shape() for e in self.exchanges)


async def _run_session(url: str, mode: str, countdown_n: int) -> Transcript:
    t = Transcript()
    recorder = Recorder()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        t.progress.append((progress, total, message))

    async def on_log(params: Any) -> None:
        (t.standalone_logs if params.logger == "broadcast" else t.logs).append(dump(params))

    async with sdk_client(
        url, recorder, mode=mode, logging_callback=on_log, log_level="debug"
    ) as c:
        init = [e for e in recorder.exchanges if e.rpc_method == "initialize"]
        t.session_id = init[0].response_headers.get("mcp-session-id") if init else None
        if t.session_id is not None:
            # The SDK opens the standalone GET stream in the background after `initialized`.
            with anyio.move_on_after(5):
                while not recorder.of("GET"):
                    await anyio.sleep(0.02)
        t.protocol_version = c.protocol_version
        t.server_info = dump(c.server_info) if c.server_info is not None else None
        t.capabilities = dump(c.server_capabilities)
        t.instructions = c.instructions
        t.tools = dump(await c.list_tools())
        t.echo = dump(await c.call_tool("echo", {"text": "héllo, gateway"}))
        t.add = dump(await c.call_tool("add", {"a": 2, "b": 40.5}))
        t.countdown = dump(
            await c.call_tool(
                "countdown", {"n": countdown_n, "delay": 0.02}, progress_callback=on_progress
            )
        )
        for _ in range(2):
            t.whoami.append((await c.call_tool("whoami", {})).structured_content or {})
        t.resource = dump(await c.read_resource("demo://info"))
        t.prompt = dump(await c.get_prompt("greet", {"name": "Ada"}))
        if t.session_id is not None:
            # A message the server sends on the session's standalone (GET) stream.
            t.broadcast = dump(await c.call_tool("broadcast", {"text": "via the GET stream"}))
            with anyio.move_on_after(5):
                while not t.standalone_logs:
                    await anyio.sleep(0.02)
    # Leaving the client sent DELETE (when there was a session); what does the session id get now?
    if t.session_id is not None:
        async with httpx2.AsyncClient(timeout=10.0) as http:
            r = await http.post(
                url,
                headers={
                    "accept": ACCEPT_BOTH,
                    "content-type": "application/json",
                    "mcp-session-id": t.session_id,
                    "mcp-protocol-version": t.protocol_version,
                },
                json={"jsonrpc": "2.0", "id": 99, "method": "tools/list"},
            )
            try:
                body: Any = r.json()
            except ValueError:
                body = r.text
            t.after_close = (r.status_code, body)
    t.exchanges = recorder.exchanges
    return t


def run_session(url: str, mode: str = "legacy", countdown_n: int = 3) -> Transcript:
    """Run a whole SDK session against C{url} (blocking) and return what it saw."""
    result: list[Transcript] = []

    async def main() -> None:
        with anyio.fail_after(SESSION_TIMEOUT):
            result.append(await _run_session(url, mode, countdown_n))

    anyio.run(main)
    return result[0]


def time_countdown(url: str, mode: str = "legacy", n: int = 3, delay: float = 0.3) -> list[float]:
    """
    Seconds after the start of a C{countdown(n, delay)} call at which each progress notification
    arrived at the SDK client, then the result.
    """
    times: list[float] = []

    async def main() -> None:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            times.append(anyio.current_time() - start)

        with anyio.fail_after(SESSION_TIMEOUT):
            async with sdk_client(url, Recorder(), mode=mode) as c:
                start = anyio.current_time()
                args = {"n": n, "delay": delay}
                await c.call_tool("countdown", args, progress_callback=on_progress)
                times.append(anyio.current_time() - start)

    anyio.run(main)
    return times


@dataclass
class Resumed:
    """A countdown whose SSE stream the server closed midway, as the SDK client saw it."""

    result: Any
    progress: list[float]
    logs: list[Any]
    exchanges: list[Exchange]


def run_resumed_countdown(url: str, n: int = 4, close_after: int = 2) -> Resumed:
    """
    Call C{countdown(n, close_after=...)}: the client must resume with C{Last-Event-ID}.

    With no delay between steps the tool has finished (its events stored) well before the
    client's resuming GET (the server's retry hint is 100 ms), so the GET replays the rest of the
    stream. The SDK server (mcp 2.3.0) can lose an event that is produced while a replay is
    switching to the live stream, leaving the client waiting for ever, directly as well as
    through a proxy; this test stays out of that window.
    """
    out: list[Resumed] = []

    async def main() -> None:
        recorder = Recorder()
        progress: list[float] = []
        logs: list[Any] = []

        async def on_progress(p: float, total: float | None, message: str | None) -> None:
            progress.append(p)

        async def on_log(params: Any) -> None:
            logs.append(params.data)

        with anyio.fail_after(SESSION_TIMEOUT):
            async with sdk_client(url, recorder, logging_callback=on_log) as c:
                args = {"n": n, "delay": 0.0, "close_after": close_after}
                result = await c.call_tool("countdown", args, progress_callback=on_progress)
        out.append(Resumed(dump(result), progress, logs, recorder.exchanges))

    anyio.run(main)
    return out[0]


@contextmanager
def raw_session(url: str) -> Iterator[tuple[httpx2.Client, dict[str, str]]]:
    """
    A session opened by hand (C{initialize} then C{notifications/initialized}, 2025-11-25) with a
    plain HTTP client; yields the client and the headers later requests need.
    """
    with httpx2.Client(timeout=httpx2.Timeout(10.0, read=10.0)) as http:
        r = http.post(
            url,
            headers={"accept": ACCEPT_BOTH, "content-type": "application/json"},
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": LEGACY_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "raw-test", "version": "0"},
                },
            },
        )
        assert r.status_code == 200, (r.status_code, r.text)
        sid = r.headers.get("mcp-session-id")
        headers = {
            "accept": ACCEPT_BOTH,
            "content-type": "application/json",
            "mcp-protocol-version": LEGACY_VERSION,
        }
        if sid:
            headers["mcp-session-id"] = sid
        n = http.post(
            url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"}
        )
        assert n.status_code == 202, (n.status_code, n.text)
        yield http, headers


# ------------------------------------------------------------------------------------------------
# Gateways with a policy section


def write_policy_gateway_config(
    workdir: Path, port: int, upstream_url: str, policy: dict[str, Any], name: str = "demo"
) -> Path:
    """L{write_gateway_config} plus a C{policy} section (rewrites the same C{mcpgw.yaml})."""
    path = write_gateway_config(workdir, port, upstream_url, name)
    config = yaml.safe_load(path.read_text())
    config["policy"] = policy
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def spawn_policy_gateway(
    workdir: Path, upstream_url: str, policy: dict[str, Any], name: str = "gateway"
) -> Gateway:
    """L{spawn_gateway} with a C{policy} section in its config; wait for it with L{wait_gateway}."""
    port = free_port()
    config = write_policy_gateway_config(workdir, port, upstream_url, policy)
    child = spawn(name, [sys.executable, "-m", "mcpgw", "run", "--config", str(config)], workdir)
    return Gateway(child, port, f"http://{HOST}:{port}/mcp", config, workdir / "audit.jsonl")
