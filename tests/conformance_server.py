"""
The reference MCP server for the official conformance suite (C{@modelcontextprotocol/conformance}),
written on the official Python SDK (C{mcp} 2.x). L{tests.test_conformance} runs the suite against
it directly and through the gateway.

    python -m tests.conformance_server --port 0 [--host 127.0.0.1] [--path /mcp]

It prints one ready line with the real port:

    conformance MCP server listening on http://127.0.0.1:PORT/mcp

It serves both wires on one endpoint, as the SDK does: the stateful 2025-11-25 protocol (an
C{initialize} handshake, C{Mcp-Session-Id}, server-to-client requests on the call's stream) and
the stateless 2026-07-28 protocol (per-request C{_meta}, C{server/discover}, C{InputRequiredResult}
instead of server-to-client requests, C{subscriptions/listen}). What each scenario asks of a
server (names, texts, behaviours) is in the scenario descriptions of the suite's
C{requirements/*.yaml} sets; docs/conformance.md lists what is implemented here.

Listens on 127.0.0.1 only; DNS-rebinding protection accepts only loopback C{Host}/C{Origin}.
"""

# No `from __future__ import annotations`: the SDK reads the tools' annotations at runtime.

import argparse
import base64
import contextlib
import json
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, get_args

import anyio
from mcp.server.caching import CacheHint
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.prompts.base import AssistantMessage, Message, UserMessage
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    AudioContent,
    CallToolResult,
    ClientCapabilities,
    Completion,
    CompletionArgument,
    CompletionContext,
    CreateMessageRequest,
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    InputRequest,
    InputRequiredResult,
    ListRootsRequest,
    ListRootsResult,
    PromptReference,
    ResourceTemplateReference,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from mcp_types.methods import CacheableMethod
from pydantic import Field

from mcpgw.demo.server import memory_event_store, serve

NAME = "mcpgw-conformance-reference"
READY = "conformance MCP server listening on"

# A 1x1 red PNG and a 1-sample 8 kHz mono WAV: the smallest real media of each kind.
RED_PIXEL_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
SILENT_WAV = base64.b64encode(
    b"RIFF"
    + (36 + 2).to_bytes(4, "little")
    + b"WAVEfmt "
    + (16).to_bytes(4, "little")
    + (1).to_bytes(2, "little")  # PCM
    + (1).to_bytes(2, "little")  # mono
    + (8000).to_bytes(4, "little")
    + (16000).to_bytes(4, "little")
    + (2).to_bytes(2, "little")
    + (16).to_bytes(2, "little")
    + b"data"
    + (2).to_bytes(4, "little")
    + b"\x00\x00"
).decode()

JSON_SCHEMA_2020_12: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}
"""The C{inputSchema} the C{json-schema-2020-12} scenario expects, keyword for keyword."""

LOG_LEVELS = ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]


def _text(result: Any) -> str:
    """The text of a sampling answer (C{CreateMessageResult}), or its repr."""
    content = getattr(result, "content", None)
    if isinstance(content, list):
        content = content[0] if content else None
    text = getattr(content, "text", None)
    return text if isinstance(text, str) else repr(result)


def _elicit(message: str, properties: dict[str, Any], required: list[str]) -> ElicitRequest:
    return ElicitRequest(
        params=ElicitRequestFormParams(
            message=message,
            requested_schema={"type": "object", "properties": properties, "required": required},
        )
    )


def _sample(text: str, max_tokens: int) -> CreateMessageRequest:
    return CreateMessageRequest(
        params=CreateMessageRequestParams(
            messages=[SamplingMessage(role="user", content=TextContent(type="text", text=text))],
            max_tokens=max_tokens,
        )
    )


def _accepted(responses: Any, key: str, field: str) -> str | None:
    """C{responses[key]} when it is an accepted elicitation carrying C{field}: that value."""
    answer = (responses or {}).get(key)
    if isinstance(answer, ElicitResult) and answer.action == "accept" and answer.content:
        value = answer.content.get(field)
        if value is not None:
            return str(value)
    return None


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    """Sampling, elicitation, roots and logging are deprecated at 2026-07-28; 2025-11-25 uses them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class LogLevels:
    """
    The level each 2025-11-25 session asked for with C{logging/setLevel} (default: everything),
    keyed by the SDK's connection-scoped session object.
    """

    def __init__(self) -> None:
        self.by_session: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def allows(self, session: Any, level: str) -> bool:
        wanted = self.by_session.get(session, "debug")
        return LOG_LEVELS.index(level) >= LOG_LEVELS.index(wanted)


def build_server() -> MCPServer[Any]:
    """The reference server: every tool, prompt and resource the suite's server scenarios call."""
    mcp: MCPServer[Any] = MCPServer(
        name=NAME,
        version="1.0.0",
        instructions="Reference server for the MCP conformance suite (mcpgw tests).",
        log_level="WARNING",
        cache_hints={
            method: CacheHint(ttl_ms=0, scope="private") for method in get_args(CacheableMethod)
        },
    )
    levels = LogLevels()
    subscriptions: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()

    async def log(ctx: Context, level: str, text: str) -> None:
        if not levels.allows(ctx.request_context.session, level):
            return
        with _no_warnings():
            await ctx.log(level, text, logger_name="conformance")  # type: ignore[arg-type]

    # ---- tools: content kinds ---------------------------------------------------------------

    @mcp.tool(description="Returns one text block.")
    def test_simple_text() -> str:
        return "This is a simple text response for testing."

    @mcp.tool(description="Returns one image block (a 1x1 red PNG).")
    def test_image_content() -> CallToolResult:
        return CallToolResult(
            content=[ImageContent(type="image", data=RED_PIXEL_PNG, mime_type="image/png")]
        )

    @mcp.tool(description="Returns one audio block (a tiny WAV).")
    def test_audio_content() -> CallToolResult:
        return CallToolResult(
            content=[AudioContent(type="audio", data=SILENT_WAV, mime_type="audio/wav")]
        )

    @mcp.tool(description="Returns one embedded text resource.")
    def test_embedded_resource() -> CallToolResult:
        return CallToolResult(
            content=[
                EmbeddedResource(
                    type="resource",
                    resource=TextResourceContents(
                        uri="test://embedded-resource",
                        mime_type="text/plain",
                        text="This is an embedded resource content.",
                    ),
                )
            ]
        )

    @mcp.tool(description="Returns a text, an image and an embedded resource block.")
    def test_multiple_content_types() -> CallToolResult:
        return CallToolResult(
            content=[
                TextContent(type="text", text="Multiple content types test:"),
                ImageContent(type="image", data=RED_PIXEL_PNG, mime_type="image/png"),
                EmbeddedResource(
                    type="resource",
                    resource=TextResourceContents(
                        uri="test://mixed-content-resource",
                        mime_type="application/json",
                        text=json.dumps({"test": "data", "value": 123}),
                    ),
                ),
            ]
        )

    @mcp.tool(description="Always fails: a tool error result (isError).")
    def test_error_handling() -> str:
        raise ToolError("This tool intentionally returns an error for testing")

    # ---- tools: notifications during a call -------------------------------------------------

    @mcp.tool(description="Sends three info log messages, 50 ms apart (2025-11-25).")
    async def test_tool_with_logging(ctx: Context) -> str:
        await log(ctx, "info", "Tool execution started")
        await anyio.sleep(0.05)
        await log(ctx, "info", "Tool processing data")
        await anyio.sleep(0.05)
        await log(ctx, "info", "Tool execution completed")
        return "Tool with logging executed successfully"

    @mcp.tool(description="Sends a log message (only when the request asked for a log level).")
    async def test_logging_tool(ctx: Context) -> str:
        await log(ctx, "info", "test_logging_tool ran")
        return "logged"

    @mcp.tool(description="Reports progress 0, 50, 100 of 100, 50 ms apart.")
    async def test_tool_with_progress(ctx: Context) -> str:
        for step, progress in enumerate((0, 50, 100)):
            if step:
                await anyio.sleep(0.05)
            await ctx.report_progress(progress, 100)
        return "Progress test completed"

    # ---- tools: server-to-client requests (2025-11-25) --------------------------------------

    @mcp.tool(description="Asks the client's LLM (sampling/createMessage) and returns its answer.")
    async def test_sampling(prompt: str, ctx: Context) -> str:
        with _no_warnings():
            result = await ctx.request_context.session.create_message(
                [SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
                max_tokens=100,
                related_request_id=ctx.request_context.request_id,
            )
        return f"LLM response: {_text(result)}"

    @mcp.tool(description="Asks the user (elicitation/create) for a username and an email.")
    async def test_elicitation(message: str, ctx: Context) -> str:
        schema = {
            "type": "object",
            "properties": {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"},
            },
            "required": ["username", "email"],
        }
        with _no_warnings():
            result = await ctx.request_context.session.elicit_form(
                message, schema, related_request_id=ctx.request_context.request_id
            )
        return f"User response: action={result.action}, content={json.dumps(result.content)}"

    @mcp.tool(description="Elicitation whose schema has a default for each primitive type.")
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "User name", "default": "John Doe"},
                "age": {"type": "integer", "description": "User age", "default": 30},
                "score": {"type": "number", "description": "User score", "default": 95.5},
                "status": {
                    "type": "string",
                    "description": "User status",
                    "enum": ["active", "inactive", "pending"],
                    "default": "active",
                },
                "verified": {"type": "boolean", "description": "Verified", "default": True},
            },
            "required": [],
        }
        with _no_warnings():
            result = await ctx.request_context.session.elicit_form(
                "Please review your details (every field has a default)",
                schema,
                related_request_id=ctx.request_context.request_id,
            )
        return (
            f"Elicitation completed: action={result.action}, content={json.dumps(result.content)}"
        )

    @mcp.tool(description="Elicitation whose schema has the five enum forms of SEP-1330.")
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        options = ["option1", "option2", "option3"]
        schema = {
            "type": "object",
            "properties": {
                "untitledSingle": {"type": "string", "enum": options},
                "titledSingle": {
                    "type": "string",
                    "oneOf": [
                        {"const": "value1", "title": "First Option"},
                        {"const": "value2", "title": "Second Option"},
                        {"const": "value3", "title": "Third Option"},
                    ],
                },
                "legacyEnum": {
                    "type": "string",
                    "enum": ["opt1", "opt2", "opt3"],
                    "enumNames": ["Option One", "Option Two", "Option Three"],
                },
                "untitledMulti": {"type": "array", "items": {"type": "string", "enum": options}},
                "titledMulti": {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {"const": "value1", "title": "First Choice"},
                            {"const": "value2", "title": "Second Choice"},
                            {"const": "value3", "title": "Third Choice"},
                        ]
                    },
                },
            },
            "required": [],
        }
        with _no_warnings():
            result = await ctx.request_context.session.elicit_form(
                "Pick some options", schema, related_request_id=ctx.request_context.request_id
            )
        return (
            f"Elicitation completed: action={result.action}, content={json.dumps(result.content)}"
        )

    # ---- tools: 2026-07-28 (stateless wire) diagnostics ----------------------------------------

    @mcp.tool(description="Needs the client's sampling capability; without it, error -32021.")
    async def test_missing_capability(ctx: Context) -> str:
        caps = ctx.client_capabilities
        if caps is None or caps.sampling is None:
            raise MCPError(
                code=MISSING_REQUIRED_CLIENT_CAPABILITY,
                message="This tool needs the client's sampling capability",
                data={"requiredCapabilities": {"sampling": {}}},
            )
        return "the client declared sampling"

    @mcp.tool(
        description="Asks for input as an InputRequiredResult (never a request on the stream)."
    )
    async def test_streaming_elicitation(ctx: Context) -> str | InputRequiredResult:
        await ctx.report_progress(0, 1)
        name = _accepted(ctx.input_responses, "answer", "answer")
        if name is not None:
            return f"You answered {name}"
        return InputRequiredResult(
            input_requests={
                "answer": _elicit("Say anything", {"answer": {"type": "string"}}, ["answer"])
            }
        )

    extra_tools: list[str] = []
    extra_prompts: list[str] = []

    @mcp.tool(description="Adds a tool, so that the tool list changes (list_changed).")
    async def test_trigger_tool_change(ctx: Context) -> str:
        name = f"test_dynamic_tool_{len(extra_tools) + 1}"
        extra_tools.append(name)
        mcp.add_tool(lambda: "dynamic", name=name, description="Added by test_trigger_tool_change")
        await ctx.notify_tools_changed()
        return f"added {name}"

    @mcp.tool(description="Adds a prompt, so that the prompt list changes (list_changed).")
    async def test_trigger_prompt_change(ctx: Context) -> str:
        name = f"test_dynamic_prompt_{len(extra_prompts) + 1}"
        extra_prompts.append(name)
        mcp.prompt(name=name, description="Added by test_trigger_prompt_change")(
            lambda: "A dynamic prompt."
        )
        await ctx.notify_prompts_changed()
        return f"added {name}"

    # ---- tools: pending scenarios (run, not scored) that exercise a proxy ------------------------

    @mcp.tool(description="Tool with JSON Schema 2020-12 features")
    def json_schema_2020_12_tool(
        name: str | None = None,
        address: dict[str, Any] | None = None,
        contactMethod: str | None = None,
        phone: str | None = None,
        email: str | None = None,
    ) -> str:
        return f"received {name!r} via {contactMethod or 'any'}"

    # The suite checks that these keywords survive tools/list, so the advertised schema is
    # exactly this one rather than the one derived from the signature.
    schema_tool = mcp._tool_manager.get_tool("json_schema_2020_12_tool")
    assert schema_tool is not None
    schema_tool.parameters = JSON_SCHEMA_2020_12

    @mcp.tool(
        description="Echoes a region that the client also sends as the Mcp-Param-Region header."
    )
    def test_header_param(
        region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})],
    ) -> str:
        return f"region={region}"

    @mcp.tool(description="Closes the call's SSE stream, then answers (the client resumes it).")
    async def test_reconnection(ctx: Context) -> str:
        # The answer is stored in the event store right after the close, before the client's
        # GET with Last-Event-ID arrives, so the GET replays it (see memory_event_store).
        await ctx.close_sse_stream()
        return "Reconnection test completed successfully"

    # ---- tools: InputRequiredResult (SEP-2322, 2026-07-28) ------------------------------------

    user_name = _elicit("What is your name?", {"name": {"type": "string"}}, ["name"])

    @mcp.tool(description="Asks for the user's name (elicitation) before greeting.")
    async def test_input_required_result_elicitation(ctx: Context) -> str | InputRequiredResult:
        name = _accepted(ctx.input_responses, "user_name", "name")
        if name is None:
            return InputRequiredResult(input_requests={"user_name": user_name})
        return f"Hello, {name}!"

    @mcp.tool(description="Asks the client's LLM a question (sampling) before answering.")
    async def test_input_required_result_sampling(ctx: Context) -> str | InputRequiredResult:
        answer = (ctx.input_responses or {}).get("capital_question")
        if not isinstance(answer, CreateMessageResult):
            return InputRequiredResult(
                input_requests={"capital_question": _sample("What is the capital of France?", 100)}
            )
        return f"The LLM answered: {_text(answer)}"

    @mcp.tool(description="Asks for the client's roots before answering.")
    async def test_input_required_result_list_roots(ctx: Context) -> str | InputRequiredResult:
        answer = (ctx.input_responses or {}).get("client_roots")
        if not isinstance(answer, ListRootsResult):
            return InputRequiredResult(input_requests={"client_roots": ListRootsRequest()})
        uris = ", ".join(str(root.uri) for root in answer.roots)
        return f"The client has {len(answer.roots)} root(s): {uris}"

    @mcp.tool(description="Round-trips a requestState and checks it on the retry.")
    async def test_input_required_result_request_state(ctx: Context) -> str | InputRequiredResult:
        ok = _accepted(ctx.input_responses, "confirm", "ok")
        if ok is None or ctx.request_state != "awaiting-confirm":
            return InputRequiredResult(
                input_requests={
                    "confirm": _elicit("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])
                },
                request_state="awaiting-confirm",
            )
        return f"state-ok: confirmed={ok}"

    @mcp.tool(description="Asks for an elicitation, a sampling and the roots at once.")
    async def test_input_required_result_multiple_inputs(
        ctx: Context,
    ) -> str | InputRequiredResult:
        responses = ctx.input_responses or {}
        name = _accepted(responses, "user_name", "name")
        greeting = responses.get("greeting")
        roots = responses.get("client_roots")
        if (
            name is None
            or not isinstance(greeting, CreateMessageResult)
            or not isinstance(roots, ListRootsResult)
            or ctx.request_state != "awaiting-three"
        ):
            requests: dict[str, InputRequest] = {
                "user_name": user_name,
                "greeting": _sample("Generate a greeting", 50),
                "client_roots": ListRootsRequest(),
            }
            return InputRequiredResult(input_requests=requests, request_state="awaiting-three")
        return f"{_text(greeting)} {name}, with {len(roots.roots)} root(s)"

    @mcp.tool(description="Two rounds of elicitation, the requestState changing between them.")
    async def test_input_required_result_multi_round(ctx: Context) -> str | InputRequiredResult:
        state = ctx.request_state
        if state is not None and state.startswith("round-2:"):
            color = _accepted(ctx.input_responses, "step2", "color")
            if color is not None:
                return f"{state.removeprefix('round-2:')} likes {color}"
        name = _accepted(ctx.input_responses, "step1", "name")
        if state == "round-1" and name is not None:
            return InputRequiredResult(
                input_requests={
                    "step2": _elicit(
                        "Step 2: What is your favorite color?",
                        {"color": {"type": "string"}},
                        ["color"],
                    )
                },
                request_state=f"round-2:{name}",
            )
        return InputRequiredResult(
            input_requests={
                "step1": _elicit(
                    "Step 1: What is your name?", {"name": {"type": "string"}}, ["name"]
                )
            },
            request_state="round-1",
        )

    @mcp.tool(description="Integrity-protected requestState: a tampered one is an error.")
    async def test_input_required_result_tampered_state(ctx: Context) -> str | InputRequiredResult:
        # The SDK seals every requestState it sends and rejects (-32602) one that does not verify.
        ok = _accepted(ctx.input_responses, "confirm", "ok")
        if ok is None or ctx.request_state != "sealed":
            return InputRequiredResult(
                input_requests={
                    "confirm": _elicit("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])
                },
                request_state="sealed",
            )
        return "state verified"

    @mcp.tool(description="Asks only for the kinds of input the client declared it supports.")
    async def test_input_required_result_capabilities(ctx: Context) -> str | InputRequiredResult:
        caps = ctx.client_capabilities or ClientCapabilities()
        responses = ctx.input_responses or {}
        requests: dict[str, InputRequest] = {}
        if caps.sampling is not None and not isinstance(
            responses.get("capital_question"), CreateMessageResult
        ):
            requests["capital_question"] = _sample("What is the capital of France?", 100)
        if caps.elicitation is not None and _accepted(responses, "user_name", "name") is None:
            requests["user_name"] = user_name
        if requests:
            return InputRequiredResult(input_requests=requests)
        return "nothing more to ask"

    # ---- prompts -------------------------------------------------------------------------------

    @mcp.prompt(description="A prompt without arguments.")
    def test_simple_prompt() -> str:
        return "This is a simple prompt for testing."

    @mcp.prompt(description="A prompt with two required arguments.")
    def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
        return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"

    @mcp.prompt(description="A prompt that embeds the resource it is given.")
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[Message]:
        return [
            UserMessage(
                content=EmbeddedResource(
                    type="resource",
                    resource=TextResourceContents(
                        uri=resourceUri,
                        mime_type="text/plain",
                        text="Embedded resource content for testing.",
                    ),
                )
            ),
            UserMessage(content="Please process the embedded resource above."),
        ]

    @mcp.prompt(description="A prompt with an image.")
    def test_prompt_with_image() -> list[Message]:
        return [
            UserMessage(
                content=ImageContent(type="image", data=RED_PIXEL_PNG, mime_type="image/png")
            ),
            UserMessage(content="Please analyze the image above."),
        ]

    @mcp.prompt(description="A prompt that first asks the user for context (InputRequiredResult).")
    def test_input_required_result_prompt(ctx: Context) -> list[Message] | InputRequiredResult:
        context = _accepted(ctx.input_responses, "user_context", "context")
        if context is None:
            return InputRequiredResult(
                input_requests={
                    "user_context": _elicit(
                        "What context should the prompt use?",
                        {"context": {"type": "string"}},
                        ["context"],
                    )
                }
            )
        return [
            UserMessage(content=f"Use this context: {context}"),
            AssistantMessage(content="Understood."),
        ]

    # ---- resources -----------------------------------------------------------------------------

    @mcp.resource(
        "test://static-text",
        name="static-text",
        description="A static text resource.",
        mime_type="text/plain",
    )
    def static_text() -> str:
        return "This is the content of the static text resource."

    @mcp.resource(
        "test://static-binary",
        name="static-binary",
        description="A static binary resource (a 1x1 red PNG).",
        mime_type="image/png",
    )
    def static_binary() -> bytes:
        return base64.b64decode(RED_PIXEL_PNG)

    @mcp.resource(
        "test://watched-resource",
        name="watched-resource",
        description="A resource clients may subscribe to.",
        mime_type="text/plain",
    )
    def watched_resource() -> str:
        return "Watched resource content."

    @mcp.resource(
        "test://template/{id}/data",
        name="template-data",
        description="Data for an id.",
        mime_type="application/json",
    )
    def template_data(id: str) -> str:
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    # ---- completion, subscriptions, logging level (low-level handlers) --------------------------

    @mcp.completion()
    async def complete(
        ref: PromptReference | ResourceTemplateReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion:
        candidates = ["paris", "park", "party"]
        values = [v for v in candidates if v.startswith(argument.value)]
        return Completion(values=values, total=len(values), has_more=False)

    lowlevel = mcp._lowlevel_server

    async def subscribe(
        ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams
    ) -> EmptyResult:
        subscriptions.setdefault(ctx.session, set()).add(str(params.uri))
        return EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams
    ) -> EmptyResult:
        subscriptions.get(ctx.session, set()).discard(str(params.uri))
        return EmptyResult()

    async def set_level(
        ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams
    ) -> EmptyResult:
        levels.by_session[ctx.session] = params.level
        return EmptyResult()

    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)
    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    return mcp


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.conformance_server",
        description="Reference MCP server for the official conformance suite.",
    )
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1"], help="loopback only")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--path", default="/mcp")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = args.path if args.path.startswith("/") else "/" + args.path
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
    # Resumable streams (an event store and a retry hint): server-sse-polling closes a call's
    # stream and resumes it with GET and Last-Event-ID.
    app = build_server().streamable_http_app(
        streamable_http_path=path,
        event_store=memory_event_store(),
        retry_interval=100,
        transport_security=security,
        host=args.host,
    )

    serve(app, args.host, args.port, path, args.log_level, READY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
