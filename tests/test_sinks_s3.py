"""
The s3 sink against a real C{moto_server} on 127.0.0.1 (Object Lock, Content-MD5, HEAD checks).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mcpgw.config import BatchConfig, ObjectLockConfig, S3SinkConfig
from tests.sinkservers import MotoS3, ShipperHarness, SinkContract
from tests.support import GatewayTestCase

_server: MotoS3 | None = None
LOCKED = "mcpgw-audit-locked"
PLAIN = "mcpgw-audit-plain"


def server() -> MotoS3:
    global _server
    if _server is None:
        _server = MotoS3()
        _server.start()
        prepare(_server)
    return _server


def prepare(s: MotoS3) -> None:
    """Buckets: one with Object Lock, one without (again after a restart, which loses them)."""
    client = s.client()
    client.create_bucket(Bucket=LOCKED, ObjectLockEnabledForBucket=True)
    client.create_bucket(Bucket=PLAIN)


def setUpModule() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")


def tearDownModule() -> None:
    if _server is not None:
        _server.close()


class S3SinkTests(SinkContract, TestCase):
    """Objects of NDJSON batches in a bucket with Object Lock."""

    name = "s3-archive"
    prefix = "mcpgw/"

    def setUp(self) -> None:
        self.s3 = server()
        self.prefix = f"mcpgw/{self._testMethodName}/"
        self.setUpContract(lines=500, seconds=0.1)

    def sinkConfig(self, name: str, lines: int, seconds: float) -> S3SinkConfig:
        return S3SinkConfig(
            name=name,
            bucket=LOCKED,
            prefix=self.prefix,
            region="us-east-1",
            endpoint_url=self.s3.url,
            object_lock=ObjectLockConfig("GOVERNANCE", 30),
            batch=BatchConfig(lines, seconds),
        )

    def keys(self) -> list[str]:
        client = self.s3.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=LOCKED, Prefix=self.prefix
        ):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)

    def items(self) -> list[tuple[str, bytes]]:
        client = self.s3.client()
        return [(k, client.get_object(Bucket=LOCKED, Key=k)["Body"].read()) for k in self.keys()]

    def serverStop(self) -> None:
        self.s3.stop()

    def serverStart(self) -> None:
        self.s3.start()
        prepare(self.s3)

    @inlineCallbacks
    def test_everyLineArrivesWithObjectLock(self) -> Any:
        """Every line arrives once; each object is locked (HEAD: GOVERNANCE, retain ~30 days)."""
        yield self.check_everyLineArrivesExactlyAsWritten(1200)
        client = self.s3.client()
        keys = self.keys()
        self.assertEqual(len(keys), 3)
        day = datetime.datetime.now(datetime.UTC).strftime("%Y/%m/%d")
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
        for key in keys:
            self.assertTrue(key.startswith(f"{self.prefix}{day}/"), key)
            self.assertTrue(key.endswith(".jsonl"))
            head = client.head_object(Bucket=LOCKED, Key=key)
            self.assertEqual(head["ObjectLockMode"], "GOVERNANCE")
            until = head["ObjectLockRetainUntilDate"]
            self.assertLess(abs((until - soon).total_seconds()), 3600)
            self.assertEqual(head["ContentType"], "application/x-ndjson")
            body = client.get_object(Bucket=LOCKED, Key=key)["Body"].read()
            self.assertEqual(head["Metadata"]["mcpgw-lines"], str(body.count(b"\n")))

    @inlineCallbacks
    def test_outageLosesNothing(self) -> Any:
        """moto_server is killed mid-stream and restarted; every line written meanwhile arrives."""
        yield self.check_outageLosesNothing()

    @inlineCallbacks
    def test_restartMidBacklogLosesNothing(self) -> Any:
        """A shipper stopped abruptly mid-backlog resumes from its cursor; a re-sent batch has
        the same key (a second identical version, nothing else)."""
        yield self.check_restartMidBacklogLosesNothing()

    @inlineCallbacks
    def test_bucketWithoutObjectLockIsRefused(self) -> Any:
        """object_lock on a bucket without Object Lock: the sink refuses and puts nothing."""
        self.sinks = (
            S3SinkConfig(
                name=self.name,
                bucket=PLAIN,
                prefix=self.prefix,
                region="us-east-1",
                endpoint_url=self.s3.url,
                object_lock=ObjectLockConfig("COMPLIANCE", 1),
            ),
        )
        self.write(10)
        self.startShipping()
        yield self.waitFor(lambda: self.shipper(self.name).state == "refused")
        assert self.shipping is not None
        _, ok, detail = self.shipping.readinessCheck()
        self.assertFalse(ok)
        self.assertIn("does not have Object Lock", detail[self.name]["last_error"])
        yield self.waitFor(lambda: self.shipper(self.name).status()["lag_lines"] == 10)
        objects = self.s3.client().list_objects_v2(Bucket=PLAIN).get("Contents", [])
        self.assertEqual(objects, [])


class GatewayReadyzS3Tests(GatewayTestCase):
    """/readyz of a gateway whose S3 sink refused (bucket without Object Lock)."""

    def setUp(self) -> Any:
        setUpModule()
        self.s3 = server()
        return super().setUp()

    def configText(self) -> str:
        return (
            super()
            .configText()
            .replace(
                "state_dir: " + self.tmp + "/state}",
                "state_dir: " + self.tmp + "/state, sinks: [{type: s3, name: s3-archive, "
                f"bucket: {PLAIN}, region: us-east-1, endpoint_url: '{self.s3.url}', "
                "object_lock: {mode: GOVERNANCE, retain_days: 1}}]}",
            )
        )

    @inlineCallbacks
    def test_readyzNotReady(self) -> Any:
        """The refused sink makes /readyz answer 503 with the sink's state and reason."""
        shipper = self.service.shipping.shippers["s3-archive"]
        yield ShipperHarness.waitFor(self, lambda: shipper.state == "refused")  # type: ignore[arg-type]
        reply = yield self.call("GET", "/readyz")
        self.assertEqual(reply.status, 503)
        body = reply.json()
        self.assertFalse(body["ready"])
        self.assertEqual(body["sinks"]["s3-archive"]["state"], "refused")
        reply = yield self.call(body=b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
        self.assertEqual(reply.status, 200)


class BucketCheckOnReloadTests(GatewayTestCase):
    """
    The Object Lock and versioning check runs at start and again on every reload: a bucket that
    cannot honour C{object_lock} makes the sink refuse and /readyz say why; fixed, a reload
    brings it back; broken again (versioning suspended), the next reload notices. The chained
    lines it shipped verify as downloaded, in any order.
    """

    reloadable = True

    def setUp(self) -> Any:
        setUpModule()
        self.s3 = server()
        self.bucket = "mcpgw-audit-reload"
        self.s3.client().create_bucket(Bucket=self.bucket)
        self.addCleanup(self.emptyBucket)
        return super().setUp()

    def emptyBucket(self) -> None:
        client = self.s3.client()
        for v in client.list_object_versions(Bucket=self.bucket).get("Versions", []):
            client.delete_object(
                Bucket=self.bucket,
                Key=v["Key"],
                VersionId=v["VersionId"],
                BypassGovernanceRetention=True,
            )
        client.delete_bucket(Bucket=self.bucket)

    def configText(self) -> str:
        return (
            super()
            .configText()
            .replace(
                "state_dir: " + self.tmp + "/state}",
                "state_dir: " + self.tmp + "/state, integrity: {chain: true}, sinks: [{type: s3, "
                f"name: s3-archive, bucket: {self.bucket}, region: us-east-1, endpoint_url: "
                f"'{self.s3.url}', object_lock: {{mode: GOVERNANCE, retain_days: 1}}, "
                "batch: {max_lines: 2, max_seconds: 0.05}}]}",
            )
        )

    def shipperState(self) -> str:
        shipper = self.service.shipping.shippers.get("s3-archive")  # absent while restarting
        return str(shipper.state) if shipper is not None else ""

    def waitState(self, state: str) -> Any:
        return ShipperHarness.waitFor(self, lambda: self.shipperState() == state)  # type: ignore[arg-type]

    @inlineCallbacks
    def test_checkedAtStartAndOnReload(self) -> Any:
        import tempfile

        from mcpgw.audit.chain import bySeq, verify

        yield self.waitState("refused")
        reply = yield self.call("GET", "/readyz")
        self.assertEqual(reply.status, 503)
        self.assertIn(
            "does not have Object Lock", reply.json()["sinks"]["s3-archive"]["last_error"]
        )

        client = self.s3.client()
        client.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
        )
        client.put_object_lock_configuration(
            Bucket=self.bucket, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"}
        )
        self.service.reload()
        yield self.waitState("running")
        for i in range(5):
            reply = yield self.call(body=b'{"jsonrpc":"2.0","id":%d,"method":"ping"}' % i)
            self.assertEqual(reply.status, 200)

        def objects() -> list[bytes]:
            listed = client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
            return [
                client.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read() for o in listed
            ]

        def shippedAll() -> bool:
            return sum(o.count(b"\n") for o in objects()) == len(self.auditLines())

        yield ShipperHarness.waitFor(self, shippedAll)  # type: ignore[arg-type]

        client.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Suspended"}
        )
        self.service.reload()
        yield self.waitState("refused")
        reply = yield self.call("GET", "/readyz")
        self.assertEqual(reply.status, 503)
        self.assertIn("versioning is Suspended", reply.json()["sinks"]["s3-archive"]["last_error"])

        d = tempfile.mkdtemp()
        paths = []
        for n, data in enumerate(objects()):
            paths.append(os.path.join(d, f"{n}.jsonl"))
            with open(paths[-1], "wb") as f:
                f.write(data)
        self.assertGreater(len(paths), 2)
        report = verify(bySeq(list(reversed(paths))), live=True)
        self.assertIsNone(report.brk, str(report.brk))
        self.assertEqual(report.firstSeq, 1)
