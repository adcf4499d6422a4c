"""
A small, real MCP server on the official Python SDK (C{mcp} 2.x), for C{make run} and the
end-to-end tests: the gateway's upstream.

    python -m mcpgw.demo.server --host 127.0.0.1 --port 9000 --path /mcp [--json-response]
        [--stateless] [--resumable]

Tools:

  - C{echo(text)}: returns C{text}.
  - C{add(a, b)}: returns C{a + b}.
  - C{countdown(n, delay=0.05)}: sends C{n} progress notifications and log messages, one every
    C{delay} seconds, then returns C{"liftoff"} (so an SSE response carries several events).
  - C{broadcast(text)}: sends C{text} as a log message on the session's standalone GET stream
    (not on the call's own response), to show that stream is relayed.
  - C{whoami()}: the HTTP request headers this server saw for the call (proves header injection
    and what a proxy forwards).

Also a resource C{demo://info} and a prompt C{greet(name)}.

By default sessions are stateful and answers are SSE streams (the SDK's defaults);
C{--resumable} keeps SSE events in memory so that streams resume with C{Last-Event-ID}. It listens
on 127.0.0.1 only; DNS-rebinding protection accepts C{Host} C{127.0.0.1[:*]} and C{localhost[:*]}.
C{--port 0} picks a free port; the ready line names the real one:

    demo MCP server listening on http://127.0.0.1:9000/mcp

This module needs the C{demo} extra (C{mcp}, C{uvicorn}); the gateway never imports it.
"""

# No `from __future__ import annotations` here: the SDK evaluates the tools' annotations, which
# name `Context`, imported inside build_server() so that only the demo needs `mcp`.

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any


def build_server() -> Any:
    """The demo C{MCPServer} with its tools, resource and prompt."""
    from mcp.server.mcpserver import Context, MCPServer

    mcp = MCPServer(
        name="mcpgw-demo",
        version="1.0.0",
        instructions="Demo server behind mcpgw: echo, add, countdown, broadcast, whoami.",
        log_level="WARNING",
    )

    @mcp.tool(description="Return the text unchanged.")
    def echo(text: str) -> str:
        return text

    @mcp.tool(description="Add two numbers.")
    def add(a: float, b: float) -> float:
        return a + b

    @mcp.tool(
        description="Count down from n: a progress notification and a log message per step. "
        "With close_after=k (resumable servers only) the server closes the call's SSE stream "
        "after k steps; the client resumes it with GET and Last-Event-ID."
    )
    async def countdown(
        n: int, ctx: Context, delay: float = 0.05, close_after: int | None = None
    ) -> str:
        import anyio

        n = max(0, min(n, 1000))
        delay = max(0.0, min(delay, 10.0))
        for i in range(n):
            if close_after is not None and i == close_after:
                await ctx.close_sse_stream()
            with warnings.catch_warnings():
                # The logging capability is deprecated at 2026-07-28; it still works.
                warnings.simplefilter("ignore")
                await ctx.info(f"T-minus {n - i}")
            await ctx.report_progress(i + 1, n, f"{n - i - 1} to go")
            await anyio.sleep(delay)
        return "liftoff"

    @mcp.tool(
        description="Send text as a log message on the session's standalone stream (the GET "
        "stream), not on this call's response; on 2026-07-28 it rides the call's response."
    )
    async def broadcast(text: str, ctx: Context) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await ctx.session.send_log_message("notice", text, logger="broadcast")
        return "sent"

    @mcp.tool(description="The HTTP request headers the server saw for this call.")
    def whoami(ctx: Context) -> dict[str, str]:
        headers = ctx.headers
        return {k.lower(): v for k, v in headers.items()} if headers is not None else {}

    @mcp.resource("demo://info", name="info", mime_type="application/json")
    def info() -> str:
        return json.dumps(
            {"server": "mcpgw-demo", "tools": ["echo", "add", "countdown", "broadcast", "whoami"]}
        )

    @mcp.prompt(description="A friendly greeting.")
    def greet(name: str) -> str:
        return f"Say hello to {name}."

    return mcp


def memory_event_store(limit: int = 10_000) -> Any:
    """
    A bounded in-memory C{EventStore}: what makes SSE streams resumable (C{Last-Event-ID}).
    Event ids are C{"<stream id>/<n>"}; a replay sends the stream's later events, in order.
    """
    from collections import deque

    from mcp.server.streamable_http import EventMessage, EventStore

    class MemoryEventStore(EventStore):
        def __init__(self) -> None:
            self.events: deque[tuple[str, str, Any]] = deque(maxlen=limit)
            self.counter = 0

        async def store_event(self, stream_id: str, message: Any) -> str:
            self.counter += 1
            event_id = f"{stream_id}/{self.counter}"
            self.events.append((event_id, stream_id, message))
            return event_id

        async def replay_events_after(self, last_event_id: str, send_callback: Any) -> str | None:
            found: str | None = None
            for event_id, stream_id, message in list(self.events):
                if found is None:
                    if event_id == last_event_id:
                        found = stream_id
                elif stream_id == found and message is not None:
                    await send_callback(EventMessage(message, event_id))
            return found

    return MemoryEventStore()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mcpgw.demo.server", description="The demo MCP server (official SDK)."
    )
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1"], help="loopback only")
    p.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    p.add_argument("--path", default="/mcp")
    p.add_argument("--json-response", action="store_true", help="answer with JSON, not SSE")
    p.add_argument("--stateless", action="store_true", help="no sessions (no Mcp-Session-Id)")
    p.add_argument(
        "--resumable",
        action="store_true",
        help="keep SSE events in memory so a client can resume a stream with Last-Event-ID",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = args.path if args.path.startswith("/") else "/" + args.path

    from mcp.server.transport_security import TransportSecuritySettings

    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "127.0.0.1", "localhost"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*"],
    )
    app = build_server().streamable_http_app(
        streamable_http_path=path,
        json_response=args.json_response,
        stateless_http=args.stateless,
        event_store=memory_event_store() if args.resumable else None,
        retry_interval=100 if args.resumable else None,
        transport_security=security,
        host=args.host,
    )

    serve(app, args.host, args.port, path, args.log_level, "demo MCP server listening on")
    return 0


def serve(app: Any, host: str, port: int, path: str, logLevel: str, announce: str) -> None:
    """
    Run an ASGI MCP app with uvicorn until interrupted, printing C{announce} and the endpoint's
    URL once listening (the port actually bound when C{port} is 0), which launchers wait for.
    """
    import anyio
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.should_exit:
                return
            bound = port
            for server in self.servers:
                for sock in server.sockets:
                    bound = sock.getsockname()[1]
            print(f"{announce} http://{host}:{bound}{path}", flush=True)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=logLevel,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(Server(config).serve)


if __name__ == "__main__":
    sys.exit(main())
