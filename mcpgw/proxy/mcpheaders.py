# -*- test-case-name: tests.test_mcpheaders -*-
"""
MCP 2026-07-28 request metadata headers: C{Mcp-Method}, C{Mcp-Name}, C{Mcp-Param-*} and
C{MCP-Protocol-Version}, checked against the body the gateway decides on.

A 2026-07-28 client mirrors the method, the tool/prompt name or resource URI, and the arguments a
tool's C{inputSchema} marks with C{x-mcp-header} into headers, so that load balancers and gateways
can route without parsing the body. The specification requires any server that processes the body
to refuse a request whose headers disagree with it (400, -32020 C{HeaderMismatch}): otherwise the
gateway could allow C{read_file} from the body while the next hop routes C{shell_exec} from the
header.

What is checked, for a POST whose C{MCP-Protocol-Version} is 2026-07-28 or newer (older or absent
versions are not checked; their headers mean nothing):
  - C{MCP-Protocol-Version} equals C{params._meta["io.modelcontextprotocol/protocolVersion"]}
    when the body carries one (a body without it is the upstream's to refuse);
  - C{Mcp-Method} is present and equals C{method} (requests; notifications have no header rules);
  - for C{tools/call}, C{resources/read} and C{prompts/get}: C{Mcp-Name} is present and, after
    C{=?base64?...?=} decoding, equals C{params.name} (or C{params.uri});
  - for C{tools/call} of a tool whose C{x-mcp-header} annotations the gateway has seen in that
    upstream's C{tools/list} answers: each annotated argument present (not null) in the body has
    exactly one C{Mcp-Param-<token>} header equal to it (integers compared numerically, booleans as
    C{true}/C{false}); a header for an argument the body does not carry is a mismatch too.
Header values must be visible ASCII, space or tab; a malformed base64 sentinel is a mismatch.

Annotations (L{scanTool}) follow the specification's rules: only on C{string}, C{integer} or
C{boolean} properties reachable from the root through C{properties} keys alone, an RFC 9110 token,
unique regardless of case. A tool with an invalid annotation is left out of C{tools/list} answers
to 2026-07-28 clients (as the specification asks clients to do) and logged.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import attr
from twisted.logger import Logger

from mcpgw.errors import HeaderMismatch

log = Logger()

#: The first protocol revision with request metadata headers.
MODERN = "2026-07-28"
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")

_PV_META = "io.modelcontextprotocol/protocolVersion"
#: Methods whose C{Mcp-Name} header mirrors a body parameter, and which parameter.
NAMED = {"tools/call": "name", "resources/read": "uri", "prompts/get": "name"}

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_UNSAFE = re.compile(rb"[^\x20-\x7e\t]")
_DECIMAL = re.compile(r"^-?[0-9]+(?:\.[0-9]+)?$")
_B64_START, _B64_END = b"=?base64?", b"?="
#: The lower-case prefix of the headers that mirror tool arguments.
PARAM_PREFIX = b"mcp-param-"
_TYPES = frozenset({"string", "integer", "boolean"})

#: Keywords whose value is one subschema, a list of them, or a map of them (JSON Schema 2020-12).
#: Crossing any of them leaves the statically reachable chain. Data keywords (C{const},
#: C{default}, C{enum}, C{examples}) are never entered.
_SUB_ONE = frozenset(
    {
        "items",
        "contains",
        "additionalProperties",
        "unevaluatedItems",
        "unevaluatedProperties",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
        "contentSchema",
    }
)
_SUB_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUB_MAP = frozenset({"$defs", "definitions", "patternProperties", "dependentSchemas"})

#: Tools remembered per upstream (least recently listed dropped first).
MAX_TOOLS = 10_000


@attr.frozen
class ParamHeader:
    """
    One C{x-mcp-header} annotation.

    @ivar header: the lower-case header name, C{mcp-param-<token>}.
    @ivar path: the argument's path (the chain of C{properties} keys).
    @ivar type: C{string}, C{integer} or C{boolean}.
    """

    header: bytes
    path: tuple[str, ...]
    type: str


class InvalidAnnotation(ValueError):
    """A tool's C{x-mcp-header} annotations break the specification's rules."""


def scanTool(tool: Any) -> tuple[ParamHeader, ...]:
    """
    @param tool: one entry of a C{tools/list} answer.
    @return: the tool's C{x-mcp-header} annotations (empty when it has none).
    @raise InvalidAnnotation: an annotation is invalid.
    """
    schema = tool.get("inputSchema") if isinstance(tool, dict) else None
    found: list[ParamHeader] = []
    seen: set[str] = set()
    stack: list[tuple[tuple[str, ...] | None, Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        if "x-mcp-header" in node:
            found.append(_annotation(path, node, seen))
        for keyword, value in node.items():
            if keyword == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    stack.append(((*path, name) if path is not None else None, sub))
            elif keyword in _SUB_ONE:
                stack.append((None, value))
            elif keyword in _SUB_LIST and isinstance(value, list):
                stack.extend((None, sub) for sub in value)
            elif keyword in _SUB_MAP and isinstance(value, dict):
                stack.extend((None, sub) for sub in value.values())
    return tuple(found)


def _annotation(path: tuple[str, ...] | None, node: dict[str, Any], seen: set[str]) -> ParamHeader:
    token = node["x-mcp-header"]
    if not path:
        raise InvalidAnnotation("x-mcp-header on a schema position not reachable by properties")
    where = ".".join(path)
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise InvalidAnnotation(f"x-mcp-header of {where!r} is not an HTTP token")
    kind = node.get("type")
    if not isinstance(kind, str) or kind not in _TYPES:
        raise InvalidAnnotation(f"x-mcp-header on {where!r}, which is not a string/integer/boolean")
    low = token.lower()
    if low in seen:
        raise InvalidAnnotation(f"x-mcp-header {token!r} is used twice")
    seen.add(low)
    return ParamHeader(PARAM_PREFIX + low.encode("ascii"), path, kind)


class ToolHeaders:
    """
    The C{x-mcp-header} annotations seen in one upstream's C{tools/list} answers: tool name ->
    annotations, bounded (least recently listed dropped first), refreshed by every answer.
    """

    def __init__(self, maxTools: int = MAX_TOOLS) -> None:
        self._tools: OrderedDict[str, tuple[ParamHeader, ...]] = OrderedDict()
        self._max = maxTools

    def get(self, tool: str) -> tuple[ParamHeader, ...] | None:
        """The annotations of C{tool}; C{None} when it was never listed."""
        return self._tools.get(tool)

    def observe(self, tool: Any) -> str | None:
        """
        Record one listed tool.

        @return: why the tool's annotations are invalid (it should be left out), else C{None}.
        """
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str):
            return None
        try:
            found = scanTool(tool)
        except InvalidAnnotation as e:
            self._tools.pop(name, None)
            return str(e)
        tools = self._tools
        tools[name] = found
        tools.move_to_end(name)
        if len(tools) > self._max:
            tools.popitem(last=False)
        return None

    def __len__(self) -> int:
        return len(self._tools)


_modern: dict[str | bytes, bool] = {}


def isModern(version: str | bytes | None) -> bool:
    """
    Whether an C{MCP-Protocol-Version} value names 2026-07-28 or a later revision (memoised:
    clients send a handful of values).
    """
    if version is None:
        return False
    known = _modern.get(version)
    if known is None:
        text = (version.decode("latin-1") if isinstance(version, bytes) else version).strip()
        known = bool(_VERSION.match(text)) and text >= MODERN
        if len(_modern) >= 256:
            _modern.clear()
        _modern[version] = known
    return known


def sentinelText(raw: bytes) -> tuple[str, bool]:
    """
    A header value as text, leniently (for rewriting, not for checking): C{=?base64?...?=}
    decoded when it can be, else the value as it is.

    @return: the text, and whether it was in the sentinel form (rewrite it the same way).
    """
    if raw.startswith(_B64_START) and raw.endswith(_B64_END):
        try:
            return base64.b64decode(raw[len(_B64_START) : -len(_B64_END)]).decode(), True
        except (ValueError, UnicodeDecodeError):
            pass
    return raw.decode("latin-1"), False


def sentinel(text: str) -> bytes:
    """C{text} in the C{=?base64?...?=} form."""
    return _B64_START + base64.b64encode(text.encode()) + _B64_END


def decodeValue(raw: bytes, what: str) -> str:
    """
    A header value as text: C{=?base64?...?=} decoded (canonical base64, UTF-8), else as is.

    @raise HeaderMismatch: invalid characters or a malformed sentinel.
    """
    if _UNSAFE.search(raw) is not None:
        raise HeaderMismatch(f"{what} contains characters not allowed in a header value")
    if raw.startswith(_B64_START) and raw.endswith(_B64_END) and len(raw) >= 11:
        payload = raw[len(_B64_START) : -len(_B64_END)]
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise HeaderMismatch(f"{what} carries a malformed base64 value") from None
        if base64.b64encode(data) != payload:
            raise HeaderMismatch(f"{what} carries a malformed base64 value")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise HeaderMismatch(f"{what} carries a base64 value that is not UTF-8") from None
    return raw.decode("ascii")


def lowered(headers: Any) -> dict[bytes, Sequence[bytes]]:
    """A request's C{Headers} as lower-case name -> values, for L{checkRequest}."""
    return {name.lower(): values for name, values in headers.getAllRawHeaders()}


def _single(headers: Mapping[bytes, Sequence[bytes]], name: bytes, what: str) -> bytes | None:
    values = headers.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HeaderMismatch(f"{what} appears more than once")
    value: bytes = values[0]
    return value


def checkRequest(
    headers: Mapping[bytes, Sequence[bytes]],
    message: dict[str, Any],
    annotations: ToolHeaders | None,
) -> None:
    """
    Check a single 2026-07-28 JSON-RPC request against its headers (see the module docstring).

    @param headers: the request's headers by lower-case name (L{lowered}).
    @param annotations: the upstream's known C{x-mcp-header} annotations.
    @raise HeaderMismatch: a required header is missing, malformed or disagrees with the body.
    """
    if "id" not in message:
        return  # a notification: this revision defines no header rules for them
    method = message.get("method")
    params = message.get("params")
    if not isinstance(params, dict):
        params = {}
    meta = params.get("_meta")
    if isinstance(meta, dict) and _PV_META in meta:
        version = _single(headers, b"mcp-protocol-version", "MCP-Protocol-Version")
        if version is None or version.decode("latin-1").strip() != meta[_PV_META]:
            raise HeaderMismatch(
                "MCP-Protocol-Version does not match the body's _meta protocol version"
            )
    raw = _single(headers, b"mcp-method", "Mcp-Method")
    if raw is None:
        raise HeaderMismatch("the Mcp-Method header is missing")
    if _UNSAFE.search(raw) is not None or raw.decode("ascii") != method:
        raise HeaderMismatch("Mcp-Method does not match the body's method")
    key = NAMED.get(method) if isinstance(method, str) else None
    if key is None:
        return
    raw = _single(headers, b"mcp-name", "Mcp-Name")
    if raw is None:
        raise HeaderMismatch("the Mcp-Name header is missing")
    if decodeValue(raw, "Mcp-Name") != params.get(key):
        raise HeaderMismatch(f"Mcp-Name does not match the body's params.{key}")
    if method == "tools/call" and annotations is not None:
        name = params.get("name")
        found = annotations.get(name) if isinstance(name, str) else None
        if found:
            arguments = params.get("arguments")
            _checkParams(headers, found, arguments if isinstance(arguments, dict) else {})


def _checkParams(
    headers: Mapping[bytes, Sequence[bytes]],
    found: tuple[ParamHeader, ...],
    arguments: dict[str, Any],
) -> None:
    for p in found:
        what = "Mcp-Param-" + p.header[len(PARAM_PREFIX) :].decode("ascii")
        raw = _single(headers, p.header, what)
        value: Any = arguments
        for step in p.path:
            value = value.get(step) if isinstance(value, dict) else None
        if value is None:
            if raw is not None:
                raise HeaderMismatch(f"{what} is present but the body has no {'.'.join(p.path)}")
            continue
        if raw is None:
            raise HeaderMismatch(f"{what} is missing but the body has {'.'.join(p.path)}")
        if not _matches(value, decodeValue(raw, what)):
            raise HeaderMismatch(f"{what} does not match the body's {'.'.join(p.path)}")


def _matches(value: Any, text: str) -> bool:
    """Whether a decoded header value agrees with the body's argument value."""
    if isinstance(value, bool):
        return text == ("true" if value else "false")
    if isinstance(value, str):
        return text == value
    if isinstance(value, int | float):
        if isinstance(value, float) and not value.is_integer():
            return False
        if not _DECIMAL.match(text):
            return False
        whole, _, fraction = text.partition(".")
        return (not fraction or fraction.strip("0") == "") and int(whole) == int(value)
    return False  # an object or array cannot be mirrored into a header
