"""
C{make run}: the demo MCP server and the gateway in front of it, in the foreground.

    python -m mcpgw.demo.run [--config etc/mcpgw.yaml]

Reads C{listen.host}, C{listen.port} and C{upstreams[0].url} from the config, starts the demo
server (C{python -m mcpgw.demo.server}) at that upstream URL and the gateway
(C{python -m mcpgw run --config CONFIG}), waits until both accept connections (the gateway's
C{GET /healthz} answers 200), then prints the gateway's URL and copy-paste examples: a session, a
streamed tool call, and what the config's policy does to demo calls (the default config denies
C{whoami} and redacts secrets in arguments, so a denied call and a redacted one are shown; the
examples are worked out from the policy, so another config gets its own, or none). Their output
is shown with a C{[demo]} / C{[gateway]} prefix. Ctrl-C or SIGTERM stops both (terminate, wait,
then kill) and exits 0; if either dies, the other is stopped and the exit status is non-zero.
"""

import argparse
import http.client
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit

import yaml

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
LOOPBACK = {"127.0.0.1", "localhost"}
PROTOCOL_VERSION = "2025-11-25"
#: The demo server's tools (L{mcpgw.demo.server}), in the order a denied example is looked for.
DEMO_TOOLS = ("whoami", "broadcast", "countdown", "add", "echo")
#: A made-up secret of each built-in redaction's shape, for the redaction example.
SAMPLE_SECRETS = {
    "aws_access_key": ("an AWS access key", "AKIAIOSFODNN7EXAMPLE"),
    "openai_key": ("an OpenAI key", "sk-proj-4fQ9xT2mLr8VbN0cZk7WyHs3"),
    "bearer": ("a bearer token", "Bearer ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    "jwt": (
        "a JWT",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIn0.c2lnbmF0dXJlLW5vdC1jaGVja2Vk",
    ),
}


class RunError(Exception):
    """The demo cannot start; the message says why."""


@dataclass(frozen=True)
class Plan:
    """What to start, from the config file."""

    config: str
    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    upstream_path: str
    gateway_path: str

    @property
    def connect_host(self) -> str:
        """Where to reach the gateway from this machine."""
        return "127.0.0.1" if self.listen_host in ("", "0.0.0.0", "::") else self.listen_host

    @property
    def gateway_url(self) -> str:
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"http://{host}:{self.listen_port}{self.gateway_path}"


def read_plan(path: str) -> Plan:
    """Read C{listen.host}, C{listen.port} and the first upstream from the YAML at C{path}."""
    try:
        with open(path, encoding="utf-8") as f:
            doc: Any = yaml.safe_load(f)
    except OSError as e:
        raise RunError(f"cannot read {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise RunError(f"{path}: not valid YAML: {e}") from e
    try:
        listen = doc.get("listen") or {}
        upstream = doc["upstreams"][0]
        host = os.path.expandvars(str(listen.get("host", "127.0.0.1")))
        port = int(listen.get("port", 8080))
        url = urlsplit(os.path.expandvars(str(upstream["url"])))
        gateway_path = str(upstream.get("path") or url.path or "/mcp")
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise RunError(f"{path}: needs listen.port and upstreams[0].url ({e!r})") from e
    if url.scheme != "http" or url.hostname not in LOOPBACK:
        raise RunError(
            f"{path}: upstreams[0].url must be http://127.0.0.1:PORT/PATH for the demo server, "
            f"not {url.geturl()}"
        )
    return Plan(
        config=path,
        listen_host=host,
        listen_port=port,
        upstream_host=url.hostname,
        upstream_port=url.port or 80,
        upstream_path=url.path or "/",
        gateway_path=gateway_path,
    )


@dataclass(frozen=True)
class PolicyDemo:
    """
    What the config's policy does to demo calls, for the examples.

    @ivar denied: a demo tool the policy denies, and the rule that does (C{None}: the default).
    @ivar redacted: the rule redacting C{echo}'s arguments, what kind of secret and a sample of it.
    @ivar audit: the audit file.
    """

    denied: tuple[str, str | None] | None
    redacted: tuple[str, str, str] | None
    audit: str | None


def read_policy(path: str) -> PolicyDemo | None:
    """
    The policy examples of the config at C{path}; C{None} if it is not valid (the gateway will
    say why).
    """
    from mcpgw.config import ConfigError, load_config
    from mcpgw.policy import Policy

    try:
        config = load_config(path)
    except ConfigError:
        return None
    policy = Policy.fromConfig(config.policy)
    denied = None
    for tool in DEMO_TOOLS:
        decision = policy.decide(tool)
        if decision.action == "deny":
            denied = (tool, decision.rule_id)
            break
    redacted = None
    decision = policy.decide("echo")
    if decision.action == "redact" and decision.rule_id is not None:
        rule = next(r for r in config.policy.rules if r.id == decision.rule_id)
        for entry in SAMPLE_SECRETS:
            if entry in rule.redact:
                what, secret = SAMPLE_SECRETS[entry]
                _, changed = policy.redact(rule.id, f"deploy with {secret}")
                if changed:
                    redacted = (rule.id, what, secret)
                    break
    return PolicyDemo(denied, redacted, config.audit.path)


class Child:
    """A subprocess in its own process group, its output copied to ours with a prefix."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
        )
        assert self.proc.stdout is not None
        self._pump = threading.Thread(target=self._copy, args=(self.proc.stdout,), daemon=True)
        self._pump.start()

    def _copy(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            print(f"[{self.name}] {line}", flush=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Terminate, wait, then kill; and let the rest of its output through."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"[{self.name}] did not stop in {STOP_TIMEOUT:g}s; killing it", flush=True)
                self.proc.kill()
                self.proc.wait()
        self._pump.join(2.0)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def healthy(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def examples(plan: Plan, policy: PolicyDemo | None = None) -> str:
    """
    The banner: the gateway's URL and copy-paste examples (curl, then the Python SDK); with
    C{policy}, a denied call and a redacted one when the policy has them.
    """
    url = plan.gateway_url
    q = shlex.quote
    accept = q("Accept: application/json, text/event-stream")
    ctype = q("Content-Type: application/json")
    init = (
        '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"'
        + PROTOCOL_VERSION
        + '","capabilities":{},"clientInfo":{"name":"curl","version":"0"}}}'
    )
    initialized = '{"jsonrpc":"2.0","method":"notifications/initialized"}'
    call = (
        '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"countdown",'
        '"arguments":{"n":3},"_meta":{"progressToken":"t1"}}}'
    )
    session = f'-H "Mcp-Session-Id: $SID" -H {q("MCP-Protocol-Version: " + PROTOCOL_VERSION)}'
    # One line: exec() defines the coroutine (no single quotes inside, so the shell quoting stays
    # readable).
    py = (
        'import anyio, mcp; exec("async def main():\\n'
        f'    async with mcp.Client(\\"{url}\\") as c:\\n'
        '        print(await c.call_tool(\\"add\\", {\\"a\\": 1, \\"b\\": 2}))"); anyio.run(main)'
    )
    lines = [
        "",
        f"mcpgw gateway: {url}  ->  demo MCP server: "
        f"http://{plan.upstream_host}:{plan.upstream_port}{plan.upstream_path}",
        "",
        "# 1. initialize; keep the Mcp-Session-Id the gateway passes back",
        f"SID=$(curl -si {url} -H {accept} -H {ctype} \\",
        f"  -d {q(init)} \\",
        "  | tr -d '\\r' | awk -F': ' 'tolower($1)==\"mcp-session-id\" {print $2}'); echo $SID",
        "# 2. initialized, then a tool call streamed back as SSE (progress, logs, result)",
        f"curl -s -w '%{{http_code}}\\n' {url} -H {accept} -H {ctype} {session} \\",
        f"  -d {q(initialized)}",
        f"curl -sN {url} -H {accept} -H {ctype} {session} \\",
        f"  -d {q(call)}",
    ]
    step = 3
    if policy is not None and policy.denied is not None:
        tool, rule = policy.denied
        by = f"rule {rule}" if rule else "default_action: deny"
        denied = _toolCall(3, tool, {})
        lines += [
            f"# {step}. policy: {tool} is denied ({by}): HTTP 403, JSON-RPC error policy_denied;",
            "#    the demo server never sees the call",
            f"curl -s -w '\\n%{{http_code}}\\n' {url} -H {accept} -H {ctype} {session} \\",
            f"  -d {q(denied)}",
        ]
        step += 1
    if policy is not None and policy.redacted is not None:
        rule, what, secret = policy.redacted
        redacted = _toolCall(4, "echo", {"text": f"deploy with {secret}"})
        lines += [
            f"# {step}. policy: {what} in the arguments is redacted (rule {rule}) before the call",
            "#    is forwarded, so echo answers [REDACTED]",
            f"curl -sN {url} -H {accept} -H {ctype} {session} \\",
            f"  -d {q(redacted)}",
        ]
    if policy is not None and policy.audit is not None:
        lines.append(f"# every request has an audit line: tail -f {q(policy.audit)}")
    lines += [
        "",
        "# Python, official MCP SDK (tools: echo, add, countdown, broadcast, whoami):",
        f"{sys.executable} -c {q(py)}",
        "",
        "Ctrl-C stops both.",
        "",
    ]
    return "\n".join(lines)


def _toolCall(requestId: int, tool: str, arguments: dict[str, Any]) -> str:
    """A compact JSON-RPC C{tools/call} request."""
    import json

    body = {
        "jsonrpc": "2.0",
        "id": requestId,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }
    return json.dumps(body, separators=(",", ":"))


def wait_ready(plan: Plan, demo: Child, gateway: Child) -> None:
    """Until both accept connections; L{RunError} if one dies or the deadline passes."""
    deadline = time.monotonic() + READY_TIMEOUT
    demo_up = gateway_up = False
    while not (demo_up and gateway_up):
        for child in (demo, gateway):
            if not child.alive():
                raise RunError(f"{child.name} exited with status {child.proc.returncode}")
        demo_up = demo_up or port_open("127.0.0.1", plan.upstream_port)
        gateway_up = gateway_up or healthy(plan.connect_host, plan.listen_port)
        if time.monotonic() > deadline:
            waiting = [n for n, up in (("demo", demo_up), ("gateway", gateway_up)) if not up]
            raise RunError(f"{' and '.join(waiting)} not ready after {READY_TIMEOUT:g}s")
        time.sleep(0.1)


def check_ports_free(plan: Plan) -> None:
    """L{RunError} if something already answers on either port (it would pass for our children)."""
    for what, host, port in (
        ("the demo server's", "127.0.0.1", plan.upstream_port),
        ("the gateway's", plan.connect_host, plan.listen_port),
    ):
        if port_open(host, port):
            raise RunError(
                f"{host}:{port} ({what} address) is already in use; is another run going?"
            )


def run(plan: Plan) -> int:
    try:
        check_ports_free(plan)
    except RunError as e:
        print(f"mcpgw.demo.run: {e}", file=sys.stderr, flush=True)
        return 1
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    children: list[Child] = []
    try:
        demo = Child(
            "demo",
            [
                sys.executable,
                "-m",
                "mcpgw.demo.server",
                "--host",
                "127.0.0.1",  # the demo server binds loopback only
                "--port",
                str(plan.upstream_port),
                "--path",
                plan.upstream_path,
            ],
        )
        children.append(demo)
        gateway = Child("gateway", [sys.executable, "-m", "mcpgw", "run", "--config", plan.config])
        children.append(gateway)
        try:
            wait_ready(plan, demo, gateway)
        except RunError as e:
            if stopping:
                return 0
            print(f"mcpgw.demo.run: {e}", file=sys.stderr, flush=True)
            return 1
        if not stopping:
            print(examples(plan, read_policy(plan.config)), flush=True)
        while not stopping:
            for child in children:
                if not child.alive():
                    code = child.proc.returncode
                    print(
                        f"mcpgw.demo.run: {child.name} exited with status {code}; stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                    return code if code and code > 0 else 1
            time.sleep(0.2)
        return 0
    finally:
        for child in reversed(children):  # the gateway first, then its upstream
            child.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mcpgw.demo.run",
        description="Run the demo MCP server and the gateway in front of it (Ctrl-C stops both).",
    )
    p.add_argument("--config", "-c", default="etc/mcpgw.yaml", help="gateway config (YAML)")
    args = p.parse_args(argv)
    try:
        plan = read_plan(args.config)
    except RunError as e:
        print(f"mcpgw.demo.run: {e}", file=sys.stderr)
        return 2
    return run(plan)


if __name__ == "__main__":
    sys.exit(main())
