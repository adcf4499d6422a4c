"""
End to end with real processes and the official MCP SDK (C{mcp} 2.x) on both sides: the demo MCP
server (C{python -m mcpgw.demo.server}) is the upstream, the gateway runs as C{python -m mcpgw run},
and the SDK's own client talks either to the server directly or through the gateway. Every
behaviour is checked against both targets, and the gateway's answers must be the same as the
direct ones: the gateway is transparent.

Four demo servers run for the whole module (SSE stateful, JSON stateful, SSE stateless, and SSE
stateful with resumable streams), each with its own gateway; the whole file takes about 10 s.
Clients run on asyncio via anyio (every SDK session has a deadline); no Twisted reactor here.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("mcp", reason="the demo extra (mcp) is not installed")

import httpx2

from tests.sdkutil import (
    ACCEPT_BOTH,
    LEGACY_VERSION,
    MODERN_VERSION,
    DemoServer,
    Gateway,
    Transcript,
    free_port,
    raw_session,
    read_audit,
    run_resumed_countdown,
    run_session,
    spawn,
    spawn_demo,
    spawn_gateway,
    time_countdown,
    wait_demo,
    wait_gateway,
    wait_until,
    write_gateway_config,
)

SERVER_FLAGS: dict[str, tuple[str, ...]] = {
    "sse": (),
    "json": ("--json-response",),
    "stateless": ("--stateless",),
    "resumable": ("--resumable",),
}
TARGETS = ["direct", "gateway"]
STATEFUL = ["sse", "json"]
TOOLS = {"echo", "add", "countdown", "broadcast", "whoami"}
AUDIT_KEYS = {
    "ts", "request_id", "session_id", "client_ip", "method", "tool", "upstream", "decision",
    "rule_id", "error", "auth_key_id", "auth_result", "bytes_in", "bytes_out", "status",
    "duration_ms", "transport",
}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Fixtures: the processes start once for the module.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdk-e2e")


@pytest.fixture(scope="module")
def servers(workdir: Path) -> Iterator[dict[str, DemoServer]]:
    """A demo server of each kind, started in parallel."""
    children = {
        kind: spawn_demo(workdir / kind, f"demo-{kind}", *flags)
        for kind, flags in SERVER_FLAGS.items()
    }
    try:
        yield {kind: wait_demo(child) for kind, child in children.items()}
    finally:
        for child in children.values():
            child.stop()


@pytest.fixture(scope="module")
def gateways(servers: dict[str, DemoServer], workdir: Path) -> Iterator[dict[str, Gateway]]:
    """One gateway in front of each demo server, started in parallel."""
    gws = {
        kind: spawn_gateway(workdir / f"gw-{kind}", s.url, f"gateway-{kind}")
        for kind, s in servers.items()
    }
    try:
        yield {kind: wait_gateway(gw) for kind, gw in gws.items()}
    finally:
        for gw in gws.values():
            gw.child.stop()


@pytest.fixture
def url_of(
    request: pytest.FixtureRequest, servers: dict[str, DemoServer]
) -> Callable[[str, str], str]:
    """C{url_of(kind, target)}: the MCP endpoint of that server, directly or via its gateway."""

    def url(kind: str, target: str) -> str:
        if target == "direct":
            return servers[kind].url
        gws: dict[str, Gateway] = request.getfixturevalue("gateways")
        return gws[kind].url

    return url


@pytest.fixture(scope="module")
def transcripts() -> dict[tuple[str, str, str], Transcript]:
    """SDK session transcripts by (server kind, target, client mode), for the whole module."""
    return {}


@pytest.fixture
def session(
    transcripts: dict[tuple[str, str, str], Transcript], url_of: Callable[[str, str], str]
) -> Callable[..., Transcript]:
    """
    C{session(kind, target, mode="legacy")}: the transcript of one whole SDK session against that
    target, run once per module and shared by the tests that look at different parts of it.
    """

    def get(kind: str, target: str, mode: str = "legacy") -> Transcript:
        key = (kind, target, mode)
        if key not in transcripts:
            transcripts[key] = run_session(url_of(kind, target), mode)
        return transcripts[key]

    return get


def same_as_direct(
    session: Callable[..., Transcript], kind: str, target: str, mode: str = "legacy"
) -> Transcript:
    """The transcript for C{target}; for the gateway, also assert its results equal direct's."""
    t = session(kind, target, mode)
    if target == "gateway":
        direct = session(kind, "direct", mode)
        assert t.results() == direct.results()
    return t


# ------------------------------------------------------------------------------------------------
# Stateful sessions (2025-11-25 initialize handshake), SSE and JSON responses


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_initialize(session: Callable[..., Transcript], kind: str, target: str) -> None:
    """initialize negotiates 2025-11-25, names the server, lists capabilities and assigns a session."""
    t = same_as_direct(session, kind, target)
    assert t.protocol_version == LEGACY_VERSION
    assert t.server_info == {"name": "mcpgw-demo", "version": "1.0.0"}
    assert {"tools", "resources", "prompts"} <= set(t.capabilities)
    assert t.instructions and "echo" in t.instructions
    assert t.session_id and len(t.session_id) >= 16
    init = next(e for e in t.exchanges if e.rpc_method == "initialize")
    assert init.status == 200
    assert init.content_type == ("text/event-stream" if kind == "sse" else "application/json")
    assert "mcp-session-id" not in init.request_headers


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_tools_list(session: Callable[..., Transcript], kind: str, target: str) -> None:
    """tools/list returns the demo tools with their input schemas, as direct."""
    t = same_as_direct(session, kind, target)
    tools = {tool["name"]: tool for tool in t.tools["tools"]}
    assert set(tools) == TOOLS
    assert set(tools["add"]["inputSchema"]["properties"]) == {"a", "b"}
    assert tools["echo"]["inputSchema"]["required"] == ["text"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_tools_call(session: Callable[..., Transcript], kind: str, target: str) -> None:
    """tools/call echo and add return their results (non-ASCII text intact), as direct."""
    t = same_as_direct(session, kind, target)
    assert t.echo["content"] == [{"type": "text", "text": "héllo, gateway"}]
    assert t.echo["structuredContent"] == {"result": "héllo, gateway"}
    assert t.add["structuredContent"] == {"result": 42.5}
    assert not t.add.get("isError")
    assert t.resource["contents"][0]["uri"] == "demo://info"
    assert "Ada" in t.prompt["messages"][0]["content"]["text"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_countdown_progress(session: Callable[..., Transcript], kind: str, target: str) -> None:
    """
    countdown's progress notifications and log messages reach the client on the call's SSE stream
    (several events, then the result); in JSON-response mode the SDK server has no wire for them,
    so none arrive, directly or via the gateway.
    """
    t = same_as_direct(session, kind, target)
    assert t.countdown["structuredContent"] == {"result": "liftoff"}
    call = next(e for e in t.exchanges if e.rpc_method == "tools/call" and e.tool == "countdown")
    assert call.status == 200
    if kind == "sse":
        assert call.content_type == "text/event-stream"
        assert t.progress == [(1.0, 3.0, "2 to go"), (2.0, 3.0, "1 to go"), (3.0, 3.0, "0 to go")]
        assert [log["data"] for log in t.logs] == ["T-minus 3", "T-minus 2", "T-minus 1"]
    else:
        assert call.content_type == "application/json"
        assert t.progress == [] and t.logs == []


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_session_id_reused(
    session: Callable[..., Transcript], servers: dict[str, DemoServer], kind: str, target: str
) -> None:
    """
    Every request after initialize carries the assigned Mcp-Session-Id and the server sees it;
    through the gateway the server also sees its own Host and X-Forwarded-For.
    """
    t = session(kind, target)
    later = [e for e in t.exchanges if e.rpc_method != "initialize"]
    assert later
    assert {e.request_headers.get("mcp-session-id") for e in later} == {t.session_id}
    assert {e.request_headers.get("mcp-protocol-version") for e in later} == {LEGACY_VERSION}
    for seen in t.whoami:
        assert seen["mcp-session-id"] == t.session_id
        assert seen["mcp-protocol-version"] == LEGACY_VERSION
        assert seen["host"] == urlsplit(servers[kind].url).netloc
        if target == "gateway":
            assert seen.get("x-forwarded-for") == "127.0.0.1", seen


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_get_stream_opened_by_sdk(
    session: Callable[..., Transcript], kind: str, target: str
) -> None:
    """The SDK client's standalone GET stream (after initialized) gets 200 text/event-stream."""
    t = session(kind, target)
    gets = [e for e in t.exchanges if e.http_method == "GET"]
    assert len(gets) == 1, t.shapes()
    assert gets[0].status == 200
    assert gets[0].content_type == "text/event-stream"
    assert gets[0].request_headers["mcp-session-id"] == t.session_id
    assert gets[0].response_headers.get("mcp-session-id") == t.session_id


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_standalone_stream_delivers(
    session: Callable[..., Transcript], kind: str, target: str
) -> None:
    """A message the server sends on the session's standalone GET stream reaches the client."""
    t = same_as_direct(session, kind, target)
    assert t.broadcast["structuredContent"] == {"result": "sent"}
    assert t.standalone_logs == [
        {"level": "notice", "logger": "broadcast", "data": "via the GET stream"}
    ]


@pytest.mark.parametrize("target", TARGETS)
def test_sse_streamed_not_buffered(url_of: Callable[[str, str], str], target: str) -> None:
    """Each SSE event of a slow tool call reaches the client when it is sent, not at the end."""
    times = time_countdown(url_of("sse", target), n=3, delay=0.3)
    assert len(times) == 4, times
    *progress, result = times
    assert result >= 0.85, times
    assert result - progress[0] >= 0.45, f"first progress event arrived late: {times}"
    assert progress[1] - progress[0] >= 0.1, times


@pytest.mark.parametrize("target", TARGETS)
def test_sse_resumed_with_last_event_id(url_of: Callable[[str, str], str], target: str) -> None:
    """
    When a resumable server closes a call's SSE stream midway, the SDK client resumes it with
    GET and Last-Event-ID and receives the rest of the events and the result, as direct.
    """
    r = run_resumed_countdown(url_of("resumable", target), n=4, close_after=2)
    assert r.result["structuredContent"] == {"result": "liftoff"}
    assert r.progress == [1.0, 2.0, 3.0, 4.0]
    assert r.logs == ["T-minus 4", "T-minus 3", "T-minus 2", "T-minus 1"]
    resumes = [e for e in r.exchanges if "last-event-id" in e.request_headers]
    assert [(e.http_method, e.status, e.content_type) for e in resumes] == [
        ("GET", 200, "text/event-stream")
    ]
    call = next(e for e in r.exchanges if e.rpc_method == "tools/call")
    assert resumes[0].request_headers["last-event-id"].startswith(f"{call.rpc_id}/")


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
VARYING = {"date", "mcp-session-id", "content-length"}


@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize("kind", [*STATEFUL, "stateless"])
def test_headers_pass_through(session: Callable[..., Transcript], kind: str, mode: str) -> None:
    """
    Through the gateway the client gets the server's response headers (except hop-by-hop ones),
    and the server gets the client's request headers, plus X-Forwarded-*.
    """
    direct, via = session(kind, "direct", mode), session(kind, "gateway", mode)
    assert len(direct.exchanges) == len(via.exchanges)

    def end_to_end(headers: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in headers.items() if k not in HOP_BY_HOP | VARYING}

    def lines(names: list[str]) -> Counter[str]:
        return Counter(n for n in names if n not in HOP_BY_HOP | {"date", "content-length"})

    for d, g in zip(direct.exchanges, via.exchanges, strict=True):
        assert d.shape() == g.shape()
        assert lines(g.response_header_names) == lines(d.response_header_names), (
            f"{d.shape()}: response header lines differ (gateway vs direct)"
        )
        assert end_to_end(g.response_headers) == end_to_end(d.response_headers), d.shape()
        assert ("mcp-session-id" in g.response_headers) == ("mcp-session-id" in d.response_headers)
    for seen_direct, seen_via in zip(direct.whoami, via.whoami, strict=True):
        forwarded = {k: v for k, v in seen_via.items() if k.startswith("x-forwarded-")}
        assert forwarded.get("x-forwarded-for") == "127.0.0.1"
        assert forwarded.get("x-forwarded-proto") == "http"
        assert end_to_end({k: v for k, v in seen_via.items() if k not in forwarded}) == end_to_end(
            seen_direct
        )


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_delete_ends_session(session: Callable[..., Transcript], kind: str, target: str) -> None:
    """The SDK's DELETE on close ends the session: the id then gets 404, the same body as direct."""
    t = session(kind, target)
    deletes = [e for e in t.exchanges if e.http_method == "DELETE"]
    assert [(d.status, d.request_headers["mcp-session-id"]) for d in deletes] == [
        (200, t.session_id)
    ]
    assert t.after_close is not None
    status, body = t.after_close
    assert status == 404
    assert isinstance(body, dict) and body["jsonrpc"] == "2.0" and "error" in body
    if target == "gateway":
        assert t.after_close == session(kind, "direct").after_close


@pytest.mark.parametrize("kind", [*STATEFUL, "stateless"])
def test_gateway_exchanges_match_direct(session: Callable[..., Transcript], kind: str) -> None:
    """Through the gateway the SDK makes the same HTTP requests and gets the same statuses and types."""
    assert session(kind, "gateway").shapes() == session(kind, "direct").shapes()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_get_stream_and_delete_raw(
    url_of: Callable[[str, str], str], kind: str, target: str
) -> None:
    """
    By hand: GET with Accept text/event-stream and the session id opens the server stream (200,
    text/event-stream); a second one at the same time gets 409; one without a session id 400;
    DELETE 200; afterwards GET and POST with that id 404; the same statuses direct and via gateway.
    """
    url = url_of(kind, target)
    statuses: list[tuple[str, int]] = []
    with raw_session(url) as (http, headers):
        sse = {**headers, "accept": "text/event-stream"}
        del sse["content-type"]
        with http.stream("GET", url, headers=sse) as stream:
            statuses.append(("GET", stream.status_code))
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers.get("mcp-session-id") == headers["mcp-session-id"]
            with httpx2.Client(timeout=10.0) as other:
                statuses.append(("GET again", other.get(url, headers=sse).status_code))
                no_session = {k: v for k, v in sse.items() if k != "mcp-session-id"}
                statuses.append(("GET no session", other.get(url, headers=no_session).status_code))
        statuses.append(("DELETE", http.delete(url, headers=headers).status_code))
        statuses.append(("GET after", http.get(url, headers=sse).status_code))
        ping = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
        statuses.append(("POST after", http.post(url, headers=headers, json=ping).status_code))
    assert statuses == [
        ("GET", 200),
        ("GET again", 409),
        ("GET no session", 400),
        ("DELETE", 200),
        ("GET after", 404),
        ("POST after", 404),
    ]


_J = "application/json"
_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": LEGACY_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}
_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
    "io.modelcontextprotocol/clientCapabilities": {},
}


def _modern(method: str, rid: int, params: dict[str, Any], **headers: str) -> dict[str, Any]:
    h = {"accept": ACCEPT_BOTH, "content-type": _J, "mcp-protocol-version": MODERN_VERSION}
    h["mcp-method"] = method
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    return {
        "method": "POST",
        "headers": h,
        "json": {"jsonrpc": "2.0", "id": rid, "method": method, "params": params},
    }


# Requests the server itself refuses or answers with an error; the gateway passes them through.
UPSTREAM_ERRORS: dict[str, dict[str, Any]] = {
    "accept-json-only-406": {
        "method": "POST",
        "headers": {"accept": _J, "content-type": _J},
        "json": _INIT,
    },
    "content-type-400": {
        "method": "POST",
        "headers": {"accept": ACCEPT_BOTH, "content-type": "text/plain"},
        "content": json.dumps(_INIT),
    },
    "unknown-session-404": {
        "method": "POST",
        "headers": {"accept": ACCEPT_BOTH, "content-type": _J, "mcp-session-id": "no-such-session"},
        "json": {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    },
    "missing-session-400": {
        "method": "POST",
        "headers": {"accept": ACCEPT_BOTH, "content-type": _J},
        "json": {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    },
    "modern-no-envelope-400": _modern("tools/list", 3, {}),
    "modern-unknown-method-404": _modern("foo/bar", 5, {"_meta": _META}),
    "modern-unknown-tool": _modern(
        "tools/call", 6, {"name": "nope", "arguments": {}, "_meta": _META}, mcp_name="nope"
    ),
    "modern-unsupported-version-400": _modern(
        "tools/list",
        7,
        {"_meta": {**_META, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}},
        mcp_protocol_version="2099-01-01",
    ),
    "modern-get-405": {
        "method": "GET",
        "headers": {"accept": "text/event-stream", "mcp-protocol-version": MODERN_VERSION},
    },
}


@pytest.mark.parametrize("case", sorted(UPSTREAM_ERRORS))
def test_upstream_errors_pass_through(url_of: Callable[[str, str], str], case: str) -> None:
    """The server's own refusals and errors reach the client unchanged: status, type and body."""
    spec = UPSTREAM_ERRORS[case]
    answers = []
    for target in TARGETS:
        with httpx2.Client(timeout=10.0) as http:
            r = http.request(url=url_of("sse", target), **spec)
            answers.append((r.status_code, r.headers.get("content-type"), r.content))
    assert answers[1] == answers[0]
    expected = case.rsplit("-", 1)[-1]
    assert str(answers[0][0]) == (expected if expected.isdigit() else "200")


def test_header_mismatch_answered_by_the_gateway(url_of: Callable[[str, str], str]) -> None:
    """
    A 2026-07-28 request whose Mcp-Name disagrees with its body: the server refuses it (400,
    -32020) and so does the gateway, by itself, before the upstream is contacted: same status,
    code and id both ways.
    """
    spec = _modern(
        "tools/call",
        4,
        {"name": "echo", "arguments": {"text": "x"}, "_meta": _META},
        mcp_name="add",
    )
    answers = []
    for target in TARGETS:
        with httpx2.Client(timeout=10.0) as http:
            r = http.request(url=url_of("sse", target), **spec)
            body = r.json()
            answers.append((r.status_code, body["id"], body["error"]["code"]))
    assert answers == [(400, 4, -32020), (400, 4, -32020)]
    assert body["error"]["message"] == "header_mismatch"


# ------------------------------------------------------------------------------------------------
# Stateless server and the sessionless 2026-07-28 revision


@pytest.mark.parametrize("target", TARGETS)
def test_stateless_server(session: Callable[..., Transcript], target: str) -> None:
    """A --stateless server works through the gateway: no session id, no GET, no DELETE."""
    t = same_as_direct(session, "stateless", target)
    assert t.protocol_version == LEGACY_VERSION
    assert t.session_id is None
    assert t.echo["structuredContent"] == {"result": "héllo, gateway"}
    assert len(t.progress) == 3
    assert all("mcp-session-id" not in e.response_headers for e in t.exchanges)
    assert {e.http_method for e in t.exchanges} == {"POST"}
    assert all("mcp-session-id" not in seen for seen in t.whoami)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", STATEFUL)
def test_modern_sessionless(session: Callable[..., Transcript], kind: str, target: str) -> None:
    """
    The SDK's default client (mode "auto") probes server/discover and speaks the sessionless
    2026-07-28 revision: no initialize, no Mcp-Session-Id, Mcp-Method/Mcp-Name headers on every
    POST; it works through the gateway with the same results as direct.
    """
    t = same_as_direct(session, kind, target, "auto")
    assert t.protocol_version == MODERN_VERSION
    assert t.server_info == {"name": "mcpgw-demo", "version": "1.0.0"}
    first = t.exchanges[0]
    assert (first.http_method, first.rpc_method, first.status) == ("POST", "server/discover", 200)
    assert first.request_headers["mcp-protocol-version"] == MODERN_VERSION
    assert "initialize" not in {e.rpc_method for e in t.exchanges}
    assert {e.http_method for e in t.exchanges} == {"POST"}
    for e in t.exchanges:
        assert (
            "mcp-session-id" not in e.request_headers and "mcp-session-id" not in e.response_headers
        )
        assert e.request_headers["mcp-method"] == e.rpc_method
        assert e.request_headers["mcp-protocol-version"] == MODERN_VERSION
        assert e.status == 200
    calls = [e for e in t.exchanges if e.rpc_method == "tools/call"]
    assert [e.request_headers["mcp-name"] for e in calls] == [
        "echo",
        "add",
        "countdown",
        "whoami",
        "whoami",
    ]
    for seen in t.whoami:
        assert seen["mcp-method"] == "tools/call" and seen["mcp-name"] == "whoami"
    assert t.add["structuredContent"] == {"result": 42.5}
    assert t.countdown["structuredContent"] == {"result": "liftoff"}
    if kind == "sse":
        assert len(t.progress) == 3 and len(t.logs) == 3
    if target == "gateway":
        assert t.shapes() == session(kind, "direct", "auto").shapes()


# ------------------------------------------------------------------------------------------------
# Audit


def test_audit_one_line_per_request(
    session: Callable[..., Transcript], gateways: dict[str, Gateway]
) -> None:
    """
    After an SDK session through the gateway, the audit file has one line per HTTP request of
    that session, with its JSON-RPC method, tool (for tools/call), session id, status and upstream.
    """
    t = session("sse", "gateway")
    sid = t.session_id
    expected = len(t.exchanges) + (1 if t.after_close else 0)

    def mine() -> list[dict[str, Any]]:
        return [line for line in read_audit(gateways["sse"].audit) if line.get("session_id") == sid]

    wait_until(lambda: len(mine()) >= expected, timeout=5)
    lines = mine()
    assert len(lines) == expected, (t.shapes(), lines)
    for line in lines:
        assert set(line) >= AUDIT_KEYS, sorted(AUDIT_KEYS - set(line))
        assert line["upstream"] == "demo"
        assert line["decision"] == "allow"
        assert line["client_ip"] == "127.0.0.1"
        assert isinstance(line["status"], int)

    rpc = {e.rpc_method for e in t.exchanges if e.rpc_method}
    posts = Counter((e.rpc_method, e.status) for e in t.exchanges if e.rpc_method)
    posts[("tools/list", 404)] += 1  # the request with the ended session's id
    assert (
        Counter((line["method"], line["status"]) for line in lines if line["method"] in rpc)
        == posts
    )
    others = sorted(line["status"] for line in lines if line["method"] not in rpc)
    assert others == [200, 200]  # the GET stream and the DELETE

    tools = Counter(line["tool"] for line in lines if line["method"] == "tools/call")
    assert tools == Counter(e.tool for e in t.exchanges if e.rpc_method == "tools/call")
    assert tools["whoami"] == 2 and tools["echo"] == tools["add"] == tools["countdown"] == 1
    assert all(line["tool"] is None for line in lines if line["method"] != "tools/call")
    init = next(line for line in lines if line["method"] == "initialize")
    assert init["status"] == 200 and init["session_id"] == sid


def test_audit_sessionless_requests(gateways: dict[str, Gateway]) -> None:
    """
    A 2026-07-28 (sessionless) SDK session through the gateway is audited one line per request,
    with its method and tool, a null session id and the protocol version from the headers.
    """
    audit = gateways["json"].audit
    before = len(read_audit(audit))
    t = run_session(gateways["json"].url, "auto", countdown_n=1)
    assert t.protocol_version == MODERN_VERSION
    wait_until(lambda: len(read_audit(audit)) - before >= len(t.exchanges), timeout=5)
    lines = read_audit(audit)[before:]
    assert len(lines) == len(t.exchanges), (t.shapes(), lines)
    assert [(x["method"], x["tool"], x["status"]) for x in lines] == [
        (e.rpc_method, e.tool, e.status) for e in t.exchanges
    ]
    assert all(x["session_id"] is None and x["upstream"] == "demo" for x in lines)
    assert {x.get("protocol_version", MODERN_VERSION) for x in lines} == {MODERN_VERSION}


def test_raw_initialize_same_as_direct(url_of: Callable[[str, str], str]) -> None:
    """A raw initialize via the gateway gets the same status, media type and result as direct."""
    answers = []
    for target in TARGETS:
        with httpx2.Client(timeout=10.0) as http:
            r = http.post(
                url_of("json", target),
                headers={"accept": ACCEPT_BOTH, "content-type": "application/json"},
                json={
                    "jsonrpc": "2.0",
                    "id": "init-1",
                    "method": "initialize",
                    "params": {
                        "protocolVersion": LEGACY_VERSION,
                        "capabilities": {},
                        "clientInfo": {"name": "raw", "version": "0"},
                    },
                },
            )
            body = r.json()
            answers.append(
                (r.status_code, r.headers["content-type"].split(";")[0], body["id"], body["result"])
            )
            assert r.headers.get("mcp-session-id")
            http.delete(
                url_of("json", target), headers={"mcp-session-id": r.headers["mcp-session-id"]}
            )
    assert answers[0] == answers[1]
    assert answers[0][0] == 200 and answers[0][2] == "init-1"


# ------------------------------------------------------------------------------------------------
# The `make run` launcher


def test_make_run_launcher(workdir: Path) -> None:
    """
    python -m mcpgw.demo.run starts the demo server and the gateway from the config, prints the
    gateway URL with examples once both are up, serves SDK calls, and on SIGINT stops both and
    exits 0.
    """
    upstream, listen = free_port(), free_port()
    base = workdir / "launcher"
    config = write_gateway_config(base, listen, f"http://127.0.0.1:{upstream}/mcp")
    child = spawn(
        "launcher", [sys.executable, "-m", "mcpgw.demo.run", "--config", str(config)], base
    )
    try:
        banner = f"mcpgw gateway: http://127.0.0.1:{listen}/mcp"
        assert wait_until(lambda: "Ctrl-C stops both" in child.stdout(), timeout=30), child.output()
        out = child.stdout()
        assert banner in out
        assert "Mcp-Session-Id" in out and "Accept: application/json, text/event-stream" in out
        assert "mcp.Client(" in out
        t = run_session(f"http://127.0.0.1:{listen}/mcp", countdown_n=1)
        assert t.echo["structuredContent"] == {"result": "héllo, gateway"}
        assert t.whoami[0]["host"] == f"127.0.0.1:{upstream}"
        child.proc.send_signal(signal.SIGINT)
        assert child.proc.wait(15) == 0, child.output()
        assert not port_open(upstream) and not port_open(listen)
    finally:
        child.stop()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
