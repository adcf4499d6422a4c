# -*- test-case-name: tests.test_telemetry_otlp -*-
"""
A small, hand-written protobuf writer for OTLP/HTTP trace export (C{ExportTraceServiceRequest}
of C{opentelemetry/proto/collector/trace/v1/trace_service.proto}).

Why not the SDK: building stock SDK spans and encoding them with the generated protobuf classes
costs about 90 µs of CPU per span (the research notes measured 55 µs of it in pure-Python
message building on the export thread, which also holds the GIL). mcpgw exports one span shape
only, so it writes the wire format directly: constant parts (resource, scope, attribute keys)
are encoded once, and each span is a handful of C{bytes} operations. The output is plain
protobuf; the tests decode it with C{opentelemetry-proto}.

Wire format reminders: a field's tag is C{(number << 3) | wiretype} as a varint; wiretype 0 is
a varint, 1 a little-endian 64-bit value, 2 a length-delimited value (varint length, then the
bytes), 5 a little-endian 32-bit value. Repeated message fields are simply repeated.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

#: C{Span.SpanKind}.
SPAN_KIND_SERVER = 2
#: C{Status.StatusCode}.
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
#: C{SpanFlags}: the W3C trace flags are the low byte; these say whether the parent is remote.
FLAG_SAMPLED = 0x01
FLAG_HAS_IS_REMOTE = 0x100
FLAG_IS_REMOTE = 0x200

#: Attribute values longer than this many characters are truncated (like the SDK's
#: C{OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT}), so one huge tool name cannot bloat a batch.
MAX_VALUE_CHARS = 4096

_VARINTS: list[bytes] = []


def _encodeVarint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINTS.extend(_encodeVarint(i) for i in range(4096))


def varint(n: int) -> bytes:
    """
    @param n: a non-negative integer, or a negative one (encoded as 64-bit two's complement,
        ten bytes, as protobuf does for C{int64}).
    @return: the varint encoding of C{n}.
    """
    if 0 <= n < 4096:
        return _VARINTS[n]
    if n < 0:
        n &= 0xFFFFFFFFFFFFFFFF
    return _encodeVarint(n)


def tag(number: int, wiretype: int) -> bytes:
    """The encoded tag of field C{number} with C{wiretype}."""
    return varint((number << 3) | wiretype)


def lengthDelimited(number: int, payload: bytes) -> bytes:
    """Field C{number} holding C{payload} (a string, bytes or an embedded message)."""
    return tag(number, 2) + varint(len(payload)) + payload


def _text(value: str) -> bytes:
    if len(value) > MAX_VALUE_CHARS:
        value = value[:MAX_VALUE_CHARS]
    return value.encode("utf-8", "replace")


# -- AnyValue / KeyValue ----------------------------------------------------------------------


def anyValue(value: str | bool | int | float) -> bytes:
    """The encoded C{AnyValue} of a string, bool, int or float."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    return lengthDelimited(1, _text(value))


def keyValue(key: str, value: str | bool | int | float) -> bytes:
    """The encoded C{KeyValue} message (not wrapped in a field)."""
    return lengthDelimited(1, key.encode()) + lengthDelimited(2, anyValue(value))


class AttributeKey:
    """
    One attribute key, pre-encoded, that produces whole C{attributes} fields (number C{field}
    of the enclosing message: 9 in a C{Span}, 1 in a C{Resource}, 4 in a C{Link}).

    @ivar key: the attribute name.
    """

    __slots__ = ("_fieldTag", "_head", "key")

    def __init__(self, key: str, field: int = 9) -> None:
        self.key = key
        # KeyValue: key (1, string), then value (2, AnyValue) whose length follows.
        self._head = lengthDelimited(1, key.encode()) + b"\x12"
        self._fieldTag = tag(field, 2)

    def string(self, value: str) -> bytes:
        """The field for a string value."""
        s = _text(value)
        n = len(s)
        head = self._head
        if n < 126:
            # AnyValue = 0x0a len s: all one-byte lengths while the KeyValue stays under 128.
            kvLen = len(head) + 3 + n
            if kvLen < 128:
                return b"%b%c%b%c\x0a%c%b" % (self._fieldTag, kvLen, head, n + 2, n, s)
        av = b"\x0a" + varint(n) + s
        kv = head + varint(len(av)) + av
        return self._fieldTag + varint(len(kv)) + kv

    def integer(self, value: int) -> bytes:
        """The field for an C{int64} value."""
        av = b"\x18" + varint(value)
        kv = self._head + varint(len(av)) + av
        return self._fieldTag + varint(len(kv)) + kv

    def boolean(self, value: bool) -> bytes:
        """The field for a bool value."""
        kv = self._head + (b"\x02\x10\x01" if value else b"\x02\x10\x00")
        return self._fieldTag + varint(len(kv)) + kv

    def value(self, value: str | bool | int | float) -> bytes:
        """The field for any supported value."""
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, bool):
            return self.boolean(value)
        if isinstance(value, int):
            return self.integer(value)
        kv = self._head + varint(9) + anyValue(value)
        return self._fieldTag + varint(len(kv)) + kv


# -- Resource, scope, request -----------------------------------------------------------------


def resource(attributes: Iterable[tuple[str, str | bool | int | float]]) -> bytes:
    """An encoded C{Resource} message (not wrapped in a field)."""
    return b"".join(AttributeKey(k, 1).value(v) for k, v in attributes)


def scope(name: str, version: str | None = None) -> bytes:
    """An encoded C{InstrumentationScope} message (not wrapped in a field)."""
    out = lengthDelimited(1, name.encode())
    if version:
        out += lengthDelimited(2, version.encode())
    return out


class RequestEncoder:
    """
    Wraps encoded spans into an C{ExportTraceServiceRequest} under one resource and one scope.
    """

    __slots__ = ("_prefix",)

    def __init__(self, resourceMessage: bytes, scopeMessage: bytes) -> None:
        # ResourceSpans: resource (1), then scope_spans (2) whose ScopeSpans starts with scope (1)
        # and continues with the spans (2 each).
        self._prefix = (lengthDelimited(1, resourceMessage), lengthDelimited(1, scopeMessage))

    def encode(self, spans: Sequence[bytes]) -> bytes:
        """
        @param spans: encoded C{Span} fields, each as returned by L{span} (already wrapped as
            field 2 of C{ScopeSpans}).
        @return: the serialised C{ExportTraceServiceRequest}.
        """
        res, sc = self._prefix
        body = b"".join(spans)
        scopeSpans = sc + body
        resourceSpans = res + b"\x12" + varint(len(scopeSpans)) + scopeSpans
        return b"\x0a" + varint(len(resourceSpans)) + resourceSpans


# -- Span -------------------------------------------------------------------------------------

_TIMES = struct.Struct("<BQBQ")
_FLAGS = struct.Struct("<I")
_KIND_SERVER = b"\x30\x02"


def _link(traceId: int, spanId: int, traceState: str | None, flags: int) -> bytes:
    body = b"\x0a\x10" + traceId.to_bytes(16, "big") + b"\x12\x08" + spanId.to_bytes(8, "big")
    if traceState:
        body += lengthDelimited(3, _text(traceState))
    body += b"\x35" + _FLAGS.pack(flags)
    return b"\x6a" + varint(len(body)) + body


def nameField(name: str) -> bytes:
    """The C{Span.name} field."""
    n = _text(name)
    return b"\x2a" + varint(len(n)) + n


def statusField(code: int, message: str | None = None) -> bytes:
    """The C{Span.status} field; empty for C{STATUS_UNSET} (the field is then left out)."""
    if not code:
        return b""
    status = b"\x18" + varint(code)
    if message:
        status = lengthDelimited(2, _text(message)) + status
    return b"\x7a" + varint(len(status)) + status


def spanFromFields(
    traceId: int,
    spanId: int,
    parentSpanId: int,
    traceState: str | None,
    flags: int,
    startNs: int,
    endNs: int,
    fields: Sequence[bytes],
    links: Sequence[tuple[int, int, str | None, int]] = (),
) -> bytes:
    """
    One SERVER C{Span}, already wrapped as field 2 of C{ScopeSpans}, from its ids and times and
    C{fields}: already encoded fields (name, attributes, status, in any order: protobuf does
    not require field order), so that parts shared by many spans can be encoded once.

    @param traceId: 128-bit trace id (non-zero).
    @param spanId: 64-bit span id (non-zero).
    @param parentSpanId: the parent's span id, or 0 for a root span.
    @param traceState: the W3C C{tracestate} of the span, or C{None}.
    @param flags: C{Span.flags}: W3C trace flags and the C{FLAG_*IS_REMOTE} bits.
    @param links: C{(traceId, spanId, traceState, flags)} of each link.
    """
    parts = [
        b"\x0a\x10",
        traceId.to_bytes(16, "big"),
        b"\x12\x08",
        spanId.to_bytes(8, "big"),
        _KIND_SERVER,
        _TIMES.pack(0x39, startNs, 0x41, endNs),
        b"\x85\x01",
        _FLAGS.pack(flags),
    ]
    if traceState:
        parts.append(lengthDelimited(3, _text(traceState)))
    if parentSpanId:
        parts += (b"\x22\x08", parentSpanId.to_bytes(8, "big"))
    parts += fields
    for link in links:
        parts.append(_link(*link))
    body = b"".join(parts)
    return b"\x12" + varint(len(body)) + body


def span(
    traceId: int,
    spanId: int,
    parentSpanId: int,
    traceState: str | None,
    flags: int,
    name: str,
    startNs: int,
    endNs: int,
    attributes: Sequence[bytes],
    statusCode: int = STATUS_UNSET,
    statusMessage: str | None = None,
    links: Sequence[tuple[int, int, str | None, int]] = (),
) -> bytes:
    """
    One SERVER C{Span}, already wrapped as field 2 of C{ScopeSpans} (see L{spanFromFields}).

    @param attributes: encoded attribute fields (L{AttributeKey} results).
    """
    fields = [nameField(name), *attributes, statusField(statusCode, statusMessage)]
    return spanFromFields(
        traceId, spanId, parentSpanId, traceState, flags, startNs, endNs, fields, links
    )


# -- Response ---------------------------------------------------------------------------------


def _readVarint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes) -> Iterable[tuple[int, int | bytes]]:
    i, n = 0, len(data)
    while i < n:
        key, i = _readVarint(data, i)
        number, wiretype = key >> 3, key & 7
        value: int | bytes
        if wiretype == 0:
            value, i = _readVarint(data, i)
        elif wiretype == 2:
            length, i = _readVarint(data, i)
            value = data[i : i + length]
            if len(value) != length:
                raise ValueError("truncated field")
            i += length
        elif wiretype == 1:
            value = data[i : i + 8]
            i += 8
        elif wiretype == 5:
            value = data[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wiretype}")
        yield number, value


def partialSuccess(response: bytes) -> tuple[int, str]:
    """
    Read C{ExportTraceServiceResponse.partial_success}.

    @return: C{(rejected_spans, error_message)}; C{(0, "")} when everything was accepted or the
        body cannot be read.
    """
    try:
        for number, value in _fields(response):
            if number == 1 and isinstance(value, bytes):
                rejected, message = 0, ""
                for n2, v2 in _fields(value):
                    if n2 == 1 and isinstance(v2, int):
                        rejected = v2 - (1 << 64) if v2 >= 1 << 63 else v2
                    elif n2 == 2 and isinstance(v2, bytes):
                        message = v2.decode("utf-8", "replace")
                return rejected, message
    except (ValueError, IndexError):
        pass
    return 0, ""
