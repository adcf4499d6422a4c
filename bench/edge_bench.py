#!/usr/bin/env python3
"""Micro-benchmark of the request edge's checks, in-process, no network.

    .venv/bin/python bench/edge_bench.py [--repeat N]

Prints a markdown table of the cost per request (microseconds, median of N timeit repeats) of:
  - the body parse alone (orjson), the duplicate-key and depth check (C{checkShape}) of a compact
    body (the MCP SDKs' form: proven duplicate-free by re-serialising it) and of a spaced one
    (parsed a second time with the duplicate detector), and the whole C{parseBody}, for a small
    call and a ~1 KB one;
  - the 2026-07-28 header check (C{checkRequest}) when the headers match: method, name and
    version only, and with three C{Mcp-Param-*} annotations (one nested, one integer);
  - the singleton-header check (eight lookups) and the credential scan of a request's headers
    with API keys on (C{Authenticator.carriesKey} per forwarded header).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import timeit
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from mcpgw.auth import Authenticator
from mcpgw.config import APIKey, AuthConfig
from mcpgw.jsonrpc import checkShape, parseBody
from mcpgw.proxy.headers import SINGLETONS
from mcpgw.proxy.mcpheaders import ToolHeaders, checkRequest, lowered

META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}


def perCall(stmt: Callable[[], object], number: int, repeat: int) -> float:
    """Median microseconds per call of C{stmt}."""
    return statistics.median(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e6


def message(arguments: dict[str, object]) -> dict[str, object]:
    return {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "execute_sql", "arguments": arguments, "_meta": META},
    }


SMALL = {"region": "us-west1", "limit": 42, "target": {"db": "main"}, "query": "select 1"}
LARGE = {**SMALL, "rows": [{"sku": f"SKU-{i:05d}", "qty": i, "note": "fragile"} for i in range(20)]}

TOOL = {
    "name": "execute_sql",
    "inputSchema": {
        "type": "object",
        "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "limit": {"type": "integer", "x-mcp-header": "Limit"},
            "target": {
                "type": "object",
                "properties": {"db": {"type": "string", "x-mcp-header": "Db"}},
            },
            "query": {"type": "string"},
        },
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    n, r = 20000, args.repeat
    rows: list[tuple[str, float]] = []
    for label, arguments in (("small", SMALL), ("~1 KB", LARGE)):
        msg = message(arguments)
        compact = orjson.dumps(msg)
        spaced = json.dumps(msg).encode()
        rows.append(
            (
                f"orjson.loads only, {label} body ({len(compact)} B)",
                perCall(lambda b=compact: orjson.loads(b), n, r),
            )
        )
        parsed = orjson.loads(compact)
        for form, body in (("compact", compact), (f"spaced ({len(spaced)} B)", spaced)):
            rows.append(
                (
                    f"checkShape (duplicate keys, depth), {form} {label} body",
                    perCall(lambda b=body, v=parsed: checkShape(b, v), n, r),
                )
            )
        rows.append(
            (
                f"parseBody (all of it), compact {label}",
                perCall(lambda b=compact: parseBody(b), n, r),
            )
        )
    msg = message(SMALL)
    base = {
        b"mcp-protocol-version": [b"2026-07-28"],
        b"mcp-method": [b"tools/call"],
        b"mcp-name": [b"execute_sql"],
        b"accept": [b"application/json, text/event-stream"],
        b"content-type": [b"application/json"],
    }
    plain = Headers(base)
    withParams = Headers(
        {
            **base,
            b"mcp-param-region": [b"us-west1"],
            b"mcp-param-limit": [b"42"],
            b"mcp-param-db": [b"main"],
        }
    )
    index = ToolHeaders()
    index.observe(TOOL)
    rows.append(
        (
            "lowered + checkRequest, method + name + version",
            perCall(lambda: checkRequest(lowered(plain), msg, ToolHeaders()), n, r),
        )
    )
    rows.append(
        (
            "lowered + checkRequest, + 3 Mcp-Param-* (annotated tool)",
            perCall(lambda: checkRequest(lowered(withParams), msg, index), n, r),
        )
    )

    def singletons() -> None:
        for name, values in withParams.getAllRawHeaders():
            if len(values) > 1 and name.lower() in SINGLETONS:
                raise AssertionError(name)

    rows.append(("singleton-header check (8 headers)", perCall(singletons, n, r)))
    clock = Clock()
    auth = Authenticator(
        clock, AuthConfig(enabled=True, keys=(APIKey("k", "$argon2id$x"),)), None, None
    )
    auth._cache[b"x" * 32] = ("k", 1e18)  # a verified key of the same length as one header:
    auth._validLengths.add(len(b"s-4b1d6c7e2f0a4c1b"))  # that header pays one HMAC
    values = [b"Mozilla/5.0 (X11) client/1.0", b"s-4b1d6c7e2f0a4c1b", b"gzip, deflate", b"x-value"]
    presented = b"mcpgw_" + b"a" * 43

    def scan() -> None:
        for v in values:
            auth.carriesKey(v, presented)

    rows.append(("credential scan, 4 forwarded headers (API keys on)", perCall(scan, n, r)))
    print("| check | µs per request |")
    print("|---|---:|")
    for label, us in rows:
        print(f"| {label} | {us:.2f} |")


if __name__ == "__main__":
    main()
