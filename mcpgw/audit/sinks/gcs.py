# -*- test-case-name: tests.test_sinks_gcs -*-
"""
The C{gcs} sink: one object per batch, uploaded with google-cloud-storage on the sink's dedicated
thread pool.

Uploads are create-only (C{if_generation_match=0}): an object that already exists under the
batch's key (L{Batch.objectKey}) answers 412, which means an earlier attempt of this same batch
was stored, so it counts as shipped. Objects are never overwritten. Retention on GCS is a bucket
retention policy set up out of band; with C{min_retention_days}, the sink checks at start and on
every reload that the bucket's policy keeps objects at least that long, else refuses to ship
(L{SinkRefused}, not ready in C{/readyz} with the reason).

Credentials come from Google's standard chain (C{GOOGLE_APPLICATION_CREDENTIALS}, metadata
server). With C{endpoint_url} (an emulator or private endpoint) and no
C{GOOGLE_APPLICATION_CREDENTIALS}, requests are anonymous.
"""

from __future__ import annotations

import os
from typing import Any

import google.auth
from google.api_core.exceptions import PreconditionFailed
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from twisted.internet.defer import Deferred, succeed
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mcpgw.audit.sinks import Batch, ISink, PooledSink, SinkRefused
from mcpgw.config import GCSSinkConfig

#: Per-request timeout and total time the library's own retries may take, in seconds; after
#: that the shipper's backoff takes over.
TIMEOUT = 30.0
RETRY_DEADLINE = 30.0


@implementer(ISink)
class GCSSink(PooledSink):
    """Ships batches as GCS objects, create-only."""

    _config: GCSSinkConfig

    def __init__(self, reactor: Any, config: GCSSinkConfig, pool: ThreadPool) -> None:
        super().__init__(reactor, config, pool)
        self._bucket: Any = None
        #: Batches found already stored (412), for tests and the log.
        self.alreadyStored = 0

    def start(self) -> Deferred[None]:
        return self._call(self._startInThread)

    def _startInThread(self) -> None:
        c = self._config
        options = {"api_endpoint": c.endpoint_url} if c.endpoint_url else None
        credentials: Any
        project: str | None
        if c.endpoint_url and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            credentials, project = AnonymousCredentials(), "mcpgw"
        else:
            credentials, project = google.auth.default()
        client = storage.Client(
            project=project or "mcpgw", credentials=credentials, client_options=options
        )
        self._bucket = client.bucket(c.bucket)
        if c.min_retention_days is not None:
            self._checkRetention(client, c.bucket, c.min_retention_days)

    def _checkRetention(self, client: Any, name: str, days: int) -> None:
        """The bucket's retention policy must keep objects at least C{days} days."""
        bucket = client.get_bucket(name, timeout=TIMEOUT)
        seconds = bucket.retention_period
        if seconds is None:
            raise SinkRefused(
                f"bucket {name} has no retention policy, but min_retention_days is {days}; "
                "refusing to ship to it"
            )
        if int(seconds) < days * 86400:
            raise SinkRefused(
                f"bucket {name} retains objects {int(seconds) / 86400:g} days, less than "
                f"min_retention_days ({days}); refusing to ship to it"
            )

    def ship(self, batch: Batch) -> Deferred[None]:
        return self._call(self._upload, batch)

    def _upload(self, batch: Batch) -> None:
        blob = self._bucket.blob(batch.objectKey(self._config.prefix))
        blob.metadata = {"mcpgw-batch": batch.batchId, "mcpgw-lines": str(batch.lineCount)}
        try:
            blob.upload_from_string(
                batch.data,
                content_type="application/x-ndjson",
                if_generation_match=0,
                timeout=TIMEOUT,
                retry=Retry(deadline=RETRY_DEADLINE),
                checksum="md5",
            )
        except PreconditionFailed:
            self.alreadyStored += 1

    def stop(self) -> Deferred[None]:
        self._bucket = None
        return succeed(None)
