# -*- test-case-name: tests.test_sinks_s3 -*-
"""
The C{s3} sink: one object per batch, put with boto3 on the sink's dedicated thread pool.

  - Key: C{<prefix>YYYY/MM/DD/<fileId>-<start>-<end>.jsonl} (L{Batch.objectKey}); a re-sent batch
    has the same key, and with versioning (Object Lock implies it) only adds an identical version.
  - C{Content-MD5} of the body on every put (S3 verifies it; Object Lock puts require a checksum).
  - With C{object_lock}: at start and on every reload, C{GetObjectLockConfiguration} must say
    C{Enabled} and C{GetBucketVersioning} C{Enabled}, or the sink refuses to ship (L{SinkRefused},
    not ready in C{/readyz} with the reason); each put carries C{ObjectLockMode} and
    C{ObjectLockRetainUntilDate} = now + C{retain_days}.

Credentials come from boto3's standard chain (environment, shared config, instance roles).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from twisted.internet.defer import Deferred, succeed
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mcpgw.audit.sinks import Batch, ISink, PooledSink, SinkRefused
from mcpgw.config import S3SinkConfig

#: botocore timeouts (seconds) and attempts: a dead endpoint fails a batch in bounded time and
#: the shipper's own backoff takes over.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
MAX_ATTEMPTS = 3


@implementer(ISink)
class S3Sink(PooledSink):
    """Ships batches as S3 objects."""

    _config: S3SinkConfig

    def __init__(self, reactor: Any, config: S3SinkConfig, pool: ThreadPool) -> None:
        super().__init__(reactor, config, pool)
        self._client: Any = None

    def start(self) -> Deferred[None]:
        return self._call(self._startInThread)

    def _startInThread(self) -> None:
        c = self._config
        self._client = boto3.session.Session().client(
            "s3",
            region_name=c.region,
            endpoint_url=c.endpoint_url,
            config=BotoConfig(
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            ),
        )
        if c.object_lock is None:
            return
        try:
            answer = self._client.get_object_lock_configuration(Bucket=c.bucket)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code == "ObjectLockConfigurationNotFoundError":
                raise SinkRefused(
                    f"bucket {c.bucket} does not have Object Lock enabled, but object_lock is "
                    "configured; refusing to ship to it"
                ) from None
            raise
        enabled = answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        if enabled != "Enabled":
            raise SinkRefused(
                f"bucket {c.bucket} does not have Object Lock enabled "
                f"(ObjectLockEnabled={enabled!r}); refusing to ship to it"
            )
        versioning = self._client.get_bucket_versioning(Bucket=c.bucket).get("Status")
        if versioning != "Enabled":
            raise SinkRefused(
                f"bucket {c.bucket} has Object Lock but versioning is {versioning or 'off'}, "
                "so retained objects are not protected; refusing to ship to it"
            )

    def ship(self, batch: Batch) -> Deferred[None]:
        return self._call(self._put, batch)

    def _put(self, batch: Batch) -> None:
        c = self._config
        extra: dict[str, Any] = {}
        if c.object_lock is not None:
            extra["ObjectLockMode"] = c.object_lock.mode
            extra["ObjectLockRetainUntilDate"] = datetime.datetime.now(
                datetime.UTC
            ) + datetime.timedelta(days=c.object_lock.retain_days)
        self._client.put_object(
            Bucket=c.bucket,
            Key=batch.objectKey(c.prefix),
            Body=batch.data,
            ContentMD5=base64.b64encode(hashlib.md5(batch.data).digest()).decode(),  # noqa: S324
            ContentType="application/x-ndjson",
            Metadata={"mcpgw-batch": batch.batchId, "mcpgw-lines": str(batch.lineCount)},
            **extra,
        )

    def stop(self) -> Deferred[None]:
        self._client = None
        return succeed(None)
