"""
A raw HTTP/1.1 upstream that misbehaves on request: interim responses, protocol switches, broken
framing, unsolicited bytes. Written on a bare Twisted C{Protocol} so that every byte it sends is
chosen by the test, not by an HTTP library.

The fault is chosen by the request's query string (the gateway forwards it): C{?fault=NAME}.
Every final answer is a JSON-RPC result naming the request it answers (C{id} and the
C{params.arguments.who} of the request body), so a test can tell whose answer a client received.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol


def answerFor(body: bytes) -> bytes:
    """The final JSON answer to a request body: its id and who sent it."""
    try:
        msg = json.loads(body)
    except ValueError:
        msg = {}
    params = msg.get("params") if isinstance(msg, dict) else None
    args = params.get("arguments") if isinstance(params, dict) else None
    who = args.get("who") if isinstance(args, dict) else None
    return json.dumps(
        {"jsonrpc": "2.0", "id": msg.get("id"), "result": {"who": who, "secret": f"{who}-PRIVATE"}}
    ).encode()


def finalResponse(payload: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(payload)
        + payload
    )


#: fault name -> (bytes sent at once, whether the final answer follows after a short delay)
FAULTS: dict[str, tuple[bytes, bool]] = {
    "none": (b"", True),
    "interim103": (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n", True),
    "continue100": (b"HTTP/1.1 100 Continue\r\n\r\n", True),
    "interims": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        True,
    ),
    "switch101": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        False,
    ),
    "interimbody": (b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\nhello", True),
    "interimchunked": (
        b"HTTP/1.1 100 Continue\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        True,
    ),
    "badchunk": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n{}\r\n",
        False,
    ),
    "garbage": (b"SURPRISE, NOT HTTP\r\n\r\n", False),
    "short": (
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"a":',
        False,
    ),
    "bigbadchunk": (b"", False),
    "sseshort": (b"", False),
}


class FaultServer(Protocol):
    """Reads whole requests (Content-Length bodies) and answers per the request's fault."""

    factory: FaultFactory

    def connectionMade(self) -> None:
        self.buf = b""
        self.pending: list[Any] = []
        self.factory.connections += 1

    def connectionLost(self, reason: Any = None) -> None:
        for call in self.pending:
            if call.active():
                call.cancel()

    def later(self, delay: float, f: Any, *args: Any) -> None:
        self.pending.append(reactor.callLater(delay, f, *args))

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(rest) < length:
                return
            body, self.buf = rest[:length], rest[length:]
            target = head.split(b"\r\n", 1)[0].split(b" ")[1]
            fault = "none"
            if b"fault=" in target:
                fault = target.split(b"fault=", 1)[1].split(b"&", 1)[0].decode()
            self.factory.requests.append((fault, body))
            self.answer(fault, body)

    def answer(self, fault: str, body: bytes) -> None:
        t = self.transport
        assert t is not None
        final = finalResponse(answerFor(body))
        if fault == "extra":
            # A complete answer, then a second one nobody asked for, in the same write.
            t.write(final + finalResponse(b'{"jsonrpc":"2.0","id":999,"result":"UNSOLICITED"}'))
            return
        if fault == "bigbadchunk":
            big = b"x" * (512 * 1024)
            t.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(big) + big + b"\r\nzz\r\n"
            )
            return
        if fault == "sseshort":
            t.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 500\r\n\r\n"
                b"event: message\ndata: {}\n\n"
            )
            self.later(0.05, t.loseConnection)
            return
        now, follows = FAULTS[fault]
        if now:
            t.write(now)
        if follows:
            # The final answer comes a moment later, as a real server's would after early hints.
            self.later(0.03 if now else 0, self._late, final)
        elif fault in ("short",):
            self.later(0.03, t.loseConnection)

    def _late(self, data: bytes) -> None:
        if self.transport is not None and self.connected:
            self.transport.write(data)


class FaultFactory(Factory):
    protocol = FaultServer  # type: ignore[assignment]
    noisy = False

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, bytes]] = []


def listenFault() -> Any:
    """Start a fault upstream on 127.0.0.1; returns C{(factory, listening port)}."""
    factory = FaultFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    return factory, port
