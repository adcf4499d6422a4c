# -*- test-case-name: tests.test_pinning -*-
"""
Tool pinning: a tool definition that changed since it was approved is held back until someone
approves it again (C{tools.pinning}, docs/tool-pinning.md).

  - The pinned definition of a tool is its C{name}, C{title}, C{description}, C{inputSchema},
    C{outputSchema} and C{annotations} (the members present; others, such as C{icons} or
    C{_meta}, are not pinned). Its digest is the SHA-256 of the RFC 8785 (JSON Canonicalization
    Scheme) serialisation of that object (L{canonicalDefinition}, L{definitionHash}), so any
    program with a JCS library can compute it.
  - The lock file (L{parseLock}, L{formatLock}) lists the approved digests, one line per tool:
    C{UPSTREAM TOOL sha256:HEX}. Plain text for review and version control; written atomically
    by C{mcpgw tools approve} (L{writeAtomically}).
  - The gateway remembers the latest definition each upstream listed, and a few earlier ones
    (L{UpstreamPins}, saved as C{<audit.state_dir>/tool-definitions.json} by
    L{PinningService}), so C{mcpgw tools status} can show what changed and a restart does not
    forget a change it saw.

Cost: a C{tools/list} answer is hashed only when its tool list changed: L{UpstreamPins.listed}
memoises by the bytes of the answer's tool list (orjson's serialisation of the parsed list: the
answer's bytes without its JSON-RPC id, which differs per request). A C{tools/call} costs one dict
lookup (L{UpstreamPins.callStatus}).
"""

from __future__ import annotations

import calendar
import hashlib
import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpgw.audit.writer import rfc3339ms

log = Logger()

__all__ = [
    "CHANGED",
    "NEW",
    "PINNED_MEMBERS",
    "LockError",
    "PinningService",
    "StoreError",
    "UpstreamPins",
    "canonicalDefinition",
    "definitionHash",
    "formatLock",
    "jcs",
    "jcsBytes",
    "parseLock",
    "pinnedDefinition",
    "readLock",
    "readStore",
    "storePath",
    "writeAtomically",
]

#: A tool whose name the lock file does not list.
NEW = "new"
#: A tool the lock file lists with another digest.
CHANGED = "changed"

#: The members of a tool definition that are pinned, in the order the docs list them.
PINNED_MEMBERS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")

#: The file, in C{audit.state_dir}, holding the definitions the gateway saw.
STORE_NAME = "tool-definitions.json"
STORE_FORMAT = "mcpgw-tool-definitions/1"
#: Tools remembered per upstream (least recently changed dropped first).
MAX_TOOLS = 10_000
#: Definitions remembered per tool: the latest and earlier ones (for diffs against approvals).
MAX_VERSIONS = 4
#: A definition whose canonical form is larger is pinned by digest but not remembered whole.
MAX_DEFINITION_BYTES = 256 * 1024
#: Distinct tool lists memoised per upstream (pages of a paginated listing, protocol revisions),
#: and the most bytes they may hold together (a larger list is hashed every time).
MEMO_ANSWERS = 16
MEMO_BYTES = 8 * 1024 * 1024
#: The most bytes of remembered definitions (canonical form) per upstream: beyond it the
#: definitions of the least recently changed tools are forgotten (their digests are kept).
MAX_REMEMBERED_BYTES = 32 * 1024 * 1024
#: Seconds between a change and the write of the remembered definitions (changes coalesce).
SAVE_DELAY = 1.0

_HEX = re.compile(r"^sha256:([0-9a-f]{64})$")


# -- The canonical form ----------------------------------------------------------------------


def pinnedDefinition(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The pinned members of a listed tool (those present, C{null} values included)."""
    return {k: tool[k] for k in PINNED_MEMBERS if k in tool}


def _number(value: float) -> str:
    """A number as ECMAScript's C{Number.prototype.toString} writes it (RFC 8785 3.2.2.3)."""
    if not math.isfinite(value):
        raise ValueError("JSON numbers are finite")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    mantissa, _, exp = repr(abs(value)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    point = len(whole) + int(exp or 0)
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        text = digits[0] + ("." + digits[1:] if k > 1 else "") + ("e+" if e >= 0 else "e-")
        text += str(abs(e))
    return sign + text


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _string(value: str) -> bytes:
    """
    A string as C{JSON.stringify} writes it: C{"} and C{\\} escaped, control characters as
    C{\\b \\t \\n \\f \\r} or C{\\u00xx}, everything else as UTF-8 (orjson writes exactly
    that); unpaired surrogates (from a lenient parse) as C{\\udxxx}, as JSON.stringify does.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        text = json.dumps(value, ensure_ascii=False)
        text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
        return text.encode("utf-8")


def _utf16(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _serialise(value: Any, out: list[bytes]) -> None:
    if isinstance(value, str):
        out.append(_string(value))
    elif value is None:
        out.append(b"null")
    elif value is True:
        out.append(b"true")
    elif value is False:
        out.append(b"false")
    elif isinstance(value, dict):
        keys = list(value)
        # Code point order is UTF-16 order except between astral and U+E000..U+FFFF.
        keys.sort(key=None if all(k.isascii() for k in keys) else _utf16)
        out.append(b"{")
        first = True
        for key in keys:
            if not first:
                out.append(b",")
            first = False
            out.append(_string(key))
            out.append(b":")
            _serialise(value[key], out)
        out.append(b"}")
    elif isinstance(value, list | tuple):
        out.append(b"[")
        for i, item in enumerate(value):
            if i:
                out.append(b",")
            _serialise(item, out)
        out.append(b"]")
    elif isinstance(value, int):
        text = str(value) if -(2**53) <= value <= 2**53 else _number(float(value))
        out.append(text.encode("ascii"))
    elif isinstance(value, float):
        out.append(_number(value).encode("ascii"))
    else:
        raise ValueError(f"not a JSON value: {type(value).__name__}")


def jcsBytes(value: Any) -> bytes:
    """
    The RFC 8785 (JSON Canonicalization Scheme) serialisation of a JSON value, as UTF-8: object
    members sorted by the UTF-16 code units of their names, no whitespace, strings escaped as
    ECMAScript's C{JSON.stringify} does, numbers as its C{Number.prototype.toString} (integers
    beyond 2**53 are rounded to the nearest double, as every JCS implementation reads them).

    @raise ValueError: a value JSON cannot hold (NaN, infinity, a non-JSON type).
    @raise RecursionError: nested too deep.
    """
    if _plain(value):
        # No number orjson writes differently, no member name whose order could differ:
        # orjson's sorted compact output is the canonical form (tested against the slow path).
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # an unpaired surrogate
    out: list[bytes] = []
    _serialise(value, out)
    return b"".join(out)


_SAFE_INT = 2**53


def _plain(value: Any) -> bool:
    """No float, no integer beyond 2**53 and only ASCII member names, anywhere in C{value}."""
    stack = [value]
    pop, extend = stack.pop, stack.extend
    while stack:
        v = pop()
        t = type(v)
        if t is dict:
            for k in v:
                if not k.isascii():
                    return False
            extend(v.values())
        elif t is list:
            extend(v)
        elif t is float:
            return False
        elif t is int:
            if not -_SAFE_INT <= v <= _SAFE_INT:
                return False
        elif t is not str and t is not bool and v is not None:
            return False
    return True


def jcs(value: Any) -> str:
    """L{jcsBytes} as text."""
    return jcsBytes(value).decode("utf-8", "surrogatepass")


def canonicalDefinition(tool: Mapping[str, Any]) -> bytes:
    """The UTF-8 bytes of the JCS serialisation of the tool's pinned definition."""
    return jcsBytes(pinnedDefinition(tool))


def definitionHash(tool: Mapping[str, Any]) -> str:
    """The lower-case hex SHA-256 of L{canonicalDefinition}."""
    return hashlib.sha256(canonicalDefinition(tool)).hexdigest()


# -- The lock file ---------------------------------------------------------------------------


class LockError(ValueError):
    """The lock file cannot be read or is not in the lock file format."""


_BARE = re.compile(r"^[!$-~]+$")  # printable ASCII without space, '"' and '#'


def _field(text: str) -> str:
    """A name as a lock file field: bare when it can be, else a JSON string."""
    if _BARE.match(text) and not text.startswith("#"):
        return text
    return json.dumps(text, ensure_ascii=True)


_LOCK_HEADER = """\
# mcpgw tool lock file (tools.pinning.lock_file): the approved tool definitions.
# One line per tool: UPSTREAM TOOL sha256:HEX, the SHA-256 of the tool's canonical
# definition (RFC 8785 JSON of name, title, description, inputSchema, outputSchema,
# annotations; see docs/tool-pinning.md). Written by `mcpgw tools approve`; names with
# spaces or other characters outside printable ASCII are JSON strings. Review changes
# like code; the gateway reads this file at start and on SIGHUP.
"""


def formatLock(entries: Mapping[tuple[str, str], str]) -> str:
    """The lock file text for C{(upstream, tool) -> hex digest}, sorted."""
    lines = [_LOCK_HEADER]
    for (upstream, tool), digest in sorted(entries.items()):
        lines.append(f"{_field(upstream)} {_field(tool)} sha256:{digest}\n")
    return "".join(lines)


def _fields(line: str) -> list[str]:
    """Split a lock line into fields (bare words or JSON strings)."""
    fields: list[str] = []
    decoder = json.JSONDecoder()
    i, n = 0, len(line)
    while i < n:
        if line[i] in " \t":
            i += 1
            continue
        if line[i] == "#":
            break
        if line[i] == '"':
            value, end = decoder.raw_decode(line, i)
            if not isinstance(value, str):
                raise ValueError("a quoted field must be a string")
            fields.append(value)
            i = end
            if i < n and line[i] not in " \t":
                raise ValueError("expected a space after a quoted field")
            continue
        end = i
        while end < n and line[end] not in " \t":
            end += 1
        fields.append(line[i:end])
        i = end
    return fields


def parseLock(text: str, source: str = "<lock>") -> dict[tuple[str, str], str]:
    """
    Parse a lock file.

    @return: C{(upstream, tool) -> hex digest}.
    @raise LockError: naming the line of the first problem.
    """
    entries: dict[tuple[str, str], str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        try:
            fields = _fields(raw)
        except ValueError as e:
            raise LockError(f"{source}, line {number}: {e}") from None
        if not fields:
            continue
        if len(fields) != 3:
            raise LockError(
                f"{source}, line {number}: expected UPSTREAM TOOL sha256:HEX, got "
                f"{len(fields)} field(s)"
            )
        upstream, tool, digest = fields
        m = _HEX.match(digest)
        if m is None:
            raise LockError(
                f"{source}, line {number}: {digest!r} is not sha256: and 64 lower-case hex digits"
            )
        if (upstream, tool) in entries:
            raise LockError(f"{source}, line {number}: {upstream} {tool} is listed twice")
        entries[(upstream, tool)] = m.group(1)
    return entries


def readLock(path: str) -> dict[tuple[str, str], str]:
    """
    Read the lock file at C{path}; a missing file approves nothing.

    @raise LockError: unreadable or malformed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise LockError(f"cannot read {path}: {reason}") from None
    return parseLock(text, path)


def writeAtomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """
    Replace the file at C{path} with C{data} atomically and durably: a temporary file in the
    same directory, fsync, rename over C{path}, fsync of the directory. Readers see the old
    file or the new one, never a mix.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- The remembered definitions --------------------------------------------------------------


class StoreError(ValueError):
    """The file of remembered definitions cannot be read."""


def storePath(stateDir: str) -> str:
    """Where the remembered definitions live."""
    return os.path.join(stateDir, STORE_NAME)


class _Tool:
    """
    What one upstream listed for one tool: the latest digest and the remembered definitions,
    oldest first (digest -> (first seen, pinned definition or C{None} when not remembered, its
    canonical size)).
    """

    __slots__ = ("latest", "versions")

    def __init__(self, latest: str) -> None:
        self.latest = latest
        self.versions: OrderedDict[str, tuple[float, dict[str, Any] | None, int]] = OrderedDict()


def readStore(path: str) -> dict[str, dict[str, Any]]:
    """
    The remembered definitions as stored: upstream -> tool -> C{{"latest": HEX, "versions":
    {HEX: {"first_seen": RFC3339, "definition": {...} | null}}}}. A missing file: empty.

    @raise StoreError: unreadable or not in the format.
    """
    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as e:
        raise StoreError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise StoreError(f"{path} is not a {STORE_FORMAT} file")
    upstreams = data.get("upstreams")
    if not isinstance(upstreams, dict):
        raise StoreError(f"{path}: no upstreams")
    return upstreams


def _parseTime(text: Any) -> float:
    """An RFC 3339 UTC time as written by L{rfc3339ms}, in seconds (0 when unreadable)."""
    if not isinstance(text, str):
        return 0.0
    try:
        return float(calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return 0.0


class UpstreamPins:
    """
    One upstream's pinning state: the mode and the digests the lock file approves (set on every
    reload by L{configure}), the definitions the upstream listed (kept across reloads), and the
    table a C{tools/call} is checked against.

    @ivar table: approved tool name -> C{None} (its latest listed definition is the approved
        one, or it was never listed) or L{CHANGED}; a name not in it is L{NEW}.
    """

    def __init__(
        self,
        name: str,
        changed: Callable[[], object] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.mode = "off"
        self.enforce = False
        self.approved: dict[str, str] = {}
        self.table: dict[str, str | None] = {}
        self._tools: OrderedDict[str, _Tool] = OrderedDict()
        self._memo: OrderedDict[bytes, list[Any]] = OrderedDict()
        self._memoBytes = 0
        self._bytes = 0
        self._lastKey: bytes | None = None
        self._lastEntry: list[Any] | None = None
        self._lockVersion = 0
        self._changed = changed
        self._clock = clock

    # -- configuration -----------------------------------------------------------------------

    def configure(self, mode: str, approved: Mapping[str, str]) -> None:
        """A (re)loaded config: the mode and this upstream's approved digests."""
        self.mode = mode
        self.enforce = mode == "enforce"
        if dict(approved) != self.approved:
            self.approved = dict(approved)
            self._lockVersion += 1
        self._rebuild()

    def _rebuild(self) -> None:
        tools = self._tools
        table: dict[str, str | None] = {}
        for name, digest in self.approved.items():
            seen = tools.get(name)
            table[name] = None if seen is None or seen.latest == digest else CHANGED
        self.table = table

    # -- the hot paths -----------------------------------------------------------------------

    def callStatus(self, tool: str) -> str | None:
        """A C{tools/call} of C{tool}: C{None} (approved and unchanged), L{NEW} or L{CHANGED}."""
        return self.table.get(tool, NEW)

    def listed(self, items: list[Any]) -> dict[str, str]:
        """
        One C{tools/list} answer's tools: remember them, and say which are not approved.

        @param items: the answer's C{result.tools}.
        @return: tool name -> L{NEW} or L{CHANGED}, for the tools of the answer that the lock
            file does not approve as listed (empty when all are approved).
        """
        try:
            key: bytes | None = orjson.dumps(items)
        except orjson.JSONEncodeError:
            key = None  # e.g. an integer beyond 64 bits from a lenient parse: not memoised
        memo = self._memo
        if key is not None and key == self._lastKey:
            entry = self._lastEntry  # the same list as last time: a memcmp, no hashing
        else:
            entry = memo.get(key) if key is not None else None
        if entry is None:
            pairs = []
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    try:
                        canonical = canonicalDefinition(item)
                    except (ValueError, RecursionError):
                        canonical = orjson.dumps(None)
                    digest = hashlib.sha256(canonical).hexdigest()
                    pairs.append((item["name"], digest, item, len(canonical)))
            self._observe(pairs)
            entry = [tuple((n, d) for n, d, _, _ in pairs), None, -1]
            if key is not None and len(key) <= MEMO_BYTES:
                memo[key] = entry
                self._memoBytes += len(key)
                while len(memo) > MEMO_ANSWERS or self._memoBytes > MEMO_BYTES:
                    self._memoBytes -= len(memo.popitem(last=False)[0])
                self._lastKey, self._lastEntry = key, entry
        elif key != self._lastKey:
            memo.move_to_end(key)  # type: ignore[arg-type]
            self._lastKey, self._lastEntry = key, entry
            self._reobserve(entry[0])
        if entry[2] != self._lockVersion:
            approved = self.approved
            statuses: dict[str, str] = {}
            for name, digest in entry[0]:
                known = approved.get(name)
                if known != digest:
                    statuses[name] = NEW if known is None else CHANGED
            entry[1], entry[2] = statuses, self._lockVersion
        result: dict[str, str] = entry[1]
        return result

    # -- remembering -------------------------------------------------------------------------

    def _observe(self, pairs: list[tuple[str, str, dict[str, Any], int]]) -> None:
        tools = self._tools
        dirty = False
        now = self._clock()
        for name, digest, item, size in pairs:
            seen = tools.get(name)
            if seen is not None and seen.latest == digest:
                continue
            dirty = True
            if seen is None:
                seen = tools[name] = _Tool(digest)
            seen.latest = digest
            if digest in seen.versions:
                seen.versions.move_to_end(digest)
            else:
                if size <= MAX_DEFINITION_BYTES:
                    seen.versions[digest] = (now, pinnedDefinition(item), size)
                    self._bytes += size
                else:
                    seen.versions[digest] = (now, None, 0)
                self._trimVersions(name, seen)
            tools.move_to_end(name)
            self._noteChange(name, digest)
        if dirty:
            self._bound()
            self._rebuild()
            self._changed()

    def _bound(self) -> None:
        """Apply L{MAX_TOOLS} and L{MAX_REMEMBERED_BYTES} (least recently changed first)."""
        tools = self._tools
        while len(tools) > MAX_TOOLS:
            _, dropped = tools.popitem(last=False)
            self._bytes -= sum(size for _, _, size in dropped.versions.values())
        for latest in (False, True):
            for seen in tools.values():
                if self._bytes <= MAX_REMEMBERED_BYTES:
                    return
                for digest, (at, definition, size) in list(seen.versions.items()):
                    if definition is not None and (latest or digest != seen.latest):
                        seen.versions[digest] = (at, None, 0)
                        self._bytes -= size

    def _trimVersions(self, name: str, seen: _Tool) -> None:
        """Keep L{MAX_VERSIONS}, never dropping the latest nor the approved one."""
        keep = {seen.latest, self.approved.get(name)}
        for digest in list(seen.versions):
            if len(seen.versions) <= MAX_VERSIONS:
                break
            if digest not in keep:
                self._bytes -= seen.versions.pop(digest)[2]

    def _reobserve(self, pairs: tuple[tuple[str, str], ...]) -> None:
        """An answer listed before (memoised) is listed again: its digests are the latest."""
        tools = self._tools
        dirty = False
        for name, digest in pairs:
            seen = tools.get(name)
            if seen is None or seen.latest == digest:
                continue
            seen.latest = digest
            if digest in seen.versions:
                seen.versions.move_to_end(digest)
            else:  # forgotten since: the digest is known, the definition no longer
                seen.versions[digest] = (self._clock(), None, 0)
                self._trimVersions(name, seen)
            dirty = True
            self._noteChange(name, digest)
        if dirty:
            self._rebuild()
            self._changed()

    def _noteChange(self, name: str, digest: str) -> None:
        if self.mode == "off":
            return
        approved = self.approved.get(name)
        if approved == digest:
            return
        state = NEW if approved is None else CHANGED
        log.warn(
            "tool pinning: upstream {upstream} lists {state} tool {tool!r} (sha256:{digest}), "
            "not approved in the lock file; {action} (mcpgw tools status shows the definition)",
            upstream=self.name,
            state=state,
            tool=name,
            digest=digest,
            action="held back" if self.enforce else "passed (warn mode)",
        )

    # -- persistence -------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """This upstream's remembered definitions in the store's JSON shape."""
        out: dict[str, Any] = {}
        for name, seen in self._tools.items():
            out[name] = {
                "latest": seen.latest,
                "versions": {
                    digest: {"first_seen": rfc3339ms(at), "definition": definition}
                    for digest, (at, definition, _) in seen.versions.items()
                },
            }
        return out

    def load(self, stored: Mapping[str, Any]) -> None:
        """Remember what a previous run stored (L{dump}'s shape); malformed entries skipped."""
        for name, entry in stored.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("latest"), str):
                continue
            versions = entry.get("versions")
            seen = _Tool(entry["latest"])
            if isinstance(versions, dict):
                for digest, v in versions.items():
                    if isinstance(v, dict):
                        definition = v.get("definition")
                        if not isinstance(definition, dict):
                            definition = None
                        size = len(orjson.dumps(definition)) if definition is not None else 0
                        seen.versions[digest] = (_parseTime(v.get("first_seen")), definition, size)
                        self._bytes += size
            self._tools[name] = seen
        self._bound()
        self._rebuild()

    def __len__(self) -> int:
        return len(self._tools)


class PinningService(Service):
    """
    Tool pinning for the whole gateway: one L{UpstreamPins} per upstream name, configured from
    every generation (L{configure}, a reloader subscriber), and the remembered definitions:
    loaded at construction, written (atomically, in the reactor's thread pool) about
    L{SAVE_DELAY} seconds after a change, and at stop.

    In mode C{off} nothing is consulted (L{upstream} answers C{None}) and nothing is written.
    """

    name = "pinning"

    def __init__(self, reactor: Any, stateDir: str, threadPool: Any = None) -> None:
        self.reactor = reactor
        self.path = storePath(stateDir)
        self.stateDir = stateDir
        self._pool = threadPool
        self.mode = "off"
        self._upstreams: dict[str, UpstreamPins] = {}
        self._active: dict[str, UpstreamPins] = {}
        self._stored: dict[str, Any] = {}
        self._pending: Any = None
        self._saving: Deferred[None] | None = None
        self._again = False
        try:
            self._stored = readStore(self.path)
        except StoreError as e:
            log.error("tool pinning: {e}; starting with no remembered definitions", e=e)

    def upstream(self, name: str) -> UpstreamPins | None:
        """The pinning state of upstream C{name}, or C{None} when pinning is off."""
        return self._active.get(name)

    def configure(self, config: Any, lock: Mapping[tuple[str, str], str]) -> None:
        """
        Apply a generation's C{tools.pinning} and lock file.

        @param config: the L{mcpgw.config.Config}.
        @param lock: the parsed lock file.
        """
        mode = config.tools.pinning.mode
        self.mode = mode
        approved: dict[str, dict[str, str]] = {u.name: {} for u in config.upstreams}
        for (upstream, tool), digest in lock.items():
            if upstream in approved:
                approved[upstream][tool] = digest
        active: dict[str, UpstreamPins] = {}
        if mode != "off":
            for u in config.upstreams:
                pins = self._upstreams.get(u.name)
                if pins is None:
                    pins = self._upstreams[u.name] = UpstreamPins(
                        u.name, self._scheduleSave, self.reactor.seconds
                    )
                    stored = self._stored.get(u.name)
                    if isinstance(stored, dict):
                        pins.load(stored)
                pins.configure(mode, approved[u.name])
                active[u.name] = pins
        self._active = active

    # -- saving ------------------------------------------------------------------------------

    def _scheduleSave(self) -> None:
        if self._pending is None or not self._pending.active():
            self._pending = self.reactor.callLater(SAVE_DELAY, self.save)

    def _snapshot(self) -> bytes:
        upstreams = dict(self._stored)
        for name, pins in self._upstreams.items():
            upstreams[name] = pins.dump()
        return orjson.dumps(
            {"format": STORE_FORMAT, "upstreams": upstreams}, option=orjson.OPT_INDENT_2
        )

    def _write(self, data: bytes) -> None:
        os.makedirs(self.stateDir, mode=0o750, exist_ok=True)
        writeAtomically(self.path, data, 0o640)

    def save(self) -> Deferred[None]:
        """Write the remembered definitions now (one write at a time; changes meanwhile follow)."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._saving is not None:
            self._again = True
            return self._saving
        data = self._snapshot()
        if self._pool is not None:
            d = deferToThreadPool(self.reactor, self._pool, self._write, data)
        else:
            d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._write, data)
        self._saving = d

        def done(result: Any) -> None:
            self._saving = None
            if isinstance(result, Failure):
                log.error(
                    "tool pinning: cannot write {path}: {e}",
                    path=self.path,
                    e=result.getErrorMessage(),
                )
            if self._again:
                self._again = False
                self._scheduleSave()

        d.addBoth(done)
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()
        dirty = self._pending is not None and self._pending.active()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._saving is not None:
            saving = self._saving
            return saving.addBoth(lambda _: self._stopWrite(True))
        return self._stopWrite(dirty)

    def _stopWrite(self, dirty: bool) -> Deferred[None]:
        if not dirty and not self._again:
            return succeed(None)
        self._again = False
        # At stop the reactor's thread pool may already be stopping: write here.
        try:
            self._write(self._snapshot())
        except OSError as e:
            log.error("tool pinning: cannot write {path}: {e}", path=self.path, e=e)
        return succeed(None)
