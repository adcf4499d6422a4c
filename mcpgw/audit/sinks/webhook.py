# -*- test-case-name: tests.test_sinks_webhook -*-
"""
The C{webhook} sink: each batch is one C{POST} of NDJSON (the lines exactly as written), with
treq on the reactor (no thread).

  - Headers: C{Content-Type: application/x-ndjson}, C{Idempotency-Key: <batchId>} (the same for
    every attempt of a batch, also after a restart), C{X-Mcpgw-Lines}, then the configured
    C{headers}.
  - TLS: the platform's trust store, or only C{ca_file} when it is set; the host name is verified.
  - 2xx: acknowledged. 5xx, 408, 429 and network errors: transient, retried by the shipper with
    exponential backoff and jitter (C{Retry-After} is honoured). 413: L{BatchTooLarge} (the
    shipper halves the batch). Any other 4xx: L{BatchRejected}; the sink halts with the batch
    unshipped until the next reload (see docs/sinks.md for why it is not skipped).
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import treq
from twisted.internet import ssl
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

from mcpgw import __version__
from mcpgw.audit.sinks import Batch, BatchRejected, BatchTooLarge, ISink, RetryLater
from mcpgw.config import WebhookSinkConfig

#: Seconds for one POST, connection included.
TIMEOUT = 30.0
#: Longest C{Retry-After} honoured, in seconds.
MAX_RETRY_AFTER = 300.0
#: Statuses (besides 5xx) that are retried.
RETRY_STATUSES = frozenset({408, 425, 429})


def retryAfter(value: bytes | None, now: float) -> float | None:
    """
    @return: seconds from a C{Retry-After} value (delta-seconds or an HTTP date), or C{None}.
    """
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when - now, MAX_RETRY_AFTER))


@implementer(ISink)
class WebhookSink:
    """POSTs NDJSON batches."""

    def __init__(self, reactor: Any, config: WebhookSinkConfig) -> None:
        self._reactor = reactor
        self._config = config
        self.name = config.name
        self.maxLines = config.batch.max_lines
        self.maxSeconds = config.batch.max_seconds
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 1
        self._pool.retryAutomatically = False
        trustRoot: Any = None
        if config.ca_file:
            with open(config.ca_file, "rb") as f:
                trustRoot = ssl.Certificate.loadPEM(f.read())
        self._agent = Agent(
            reactor,
            contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trustRoot),
            pool=self._pool,
            connectTimeout=TIMEOUT,
        )
        self._headers: dict[bytes | str, list[bytes | str]] = {
            b"Content-Type": [b"application/x-ndjson"],
            b"User-Agent": [f"mcpgw/{__version__}".encode()],
        }
        for name, value in config.headers:
            self._headers.setdefault(name.encode("latin-1"), []).append(value.encode("latin-1"))

    def start(self) -> Deferred[None]:
        return succeed(None)

    @inlineCallbacks
    def ship(self, batch: Batch) -> Any:
        headers: dict[bytes | str, list[bytes | str]] = dict(self._headers)
        headers[b"Idempotency-Key"] = [batch.batchId.encode()]
        headers[b"X-Mcpgw-Lines"] = [b"%d" % batch.lineCount]
        response = yield treq.post(
            self._config.url,
            data=batch.data,
            headers=headers,
            agent=self._agent,
            timeout=TIMEOUT,
            allow_redirects=False,
            reactor=self._reactor,
        )
        body = yield treq.content(response)
        code = response.code
        if 200 <= code < 300:
            return None
        snippet = body[:200].decode("utf-8", "replace")
        message = f"HTTP {code} from {self._config.url}: {snippet}"
        if code >= 500 or code in RETRY_STATUSES:
            raw = response.headers.getRawHeaders(b"Retry-After")
            raise RetryLater(message, retryAfter(raw[0] if raw else None, time.time()))
        if code == 413:
            raise BatchTooLarge(message)
        raise BatchRejected(message)

    def stop(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()
