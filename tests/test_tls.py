"""
Native TLS and mTLS with real handshakes on 127.0.0.1: the gateway in process (and once as
C{mcpgw run}), clients made with the stdlib C{ssl} module in threads, certificates from
L{tests.pki}. Covers TLS 1.2 as the minimum, certificate and client-CA hot swap on reload (new
connections get the new one, open ones keep theirs), rejected broken pairs, the mTLS outcomes and
L{mcpgw.tls.peerIdentity}.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import warnings
from typing import Any

import attr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mcpgw.config import TLSConfig
from mcpgw.service import CLOSE_GRACE
from mcpgw.tls import TLSError, certificateIdentity, loadServerTLS, peerIdentity
from tests.pki import ALICE_SPIFFE, CA, Issued
from tests.support import GatewayTestCase, freePort, rpc

# -- a blocking HTTPS client ----------------------------------------------------------------------


@attr.s(auto_attribs=True)
class TLSReply:
    status: int
    body: bytes
    serial: int
    version: str | None
    alpn: str | None


def clientContext(
    ca: CA,
    cert: tuple[str, str] | None = None,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context trusting C{ca}, presenting C{cert} (paths) if given."""
    ctx = ssl.create_default_context(cadata=ca.certPEM.decode())
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1/TLSv1_1 constants
        if minimum is not None:
            ctx.minimum_version = minimum
        if maximum is not None:
            ctx.maximum_version = maximum
    if minimum is not None and minimum < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer what the server must refuse
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


class TLSClient:
    """One keep-alive HTTPS connection (blocking: call it in a thread)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)

    def post(self, body: bytes, path: str = "/mcp") -> TLSReply:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.conn.request("POST", path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        sock = self.conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return TLSReply(
            resp.status,
            data,
            x509.load_der_x509_certificate(der).serial_number,
            sock.version(),
            sock.selected_alpn_protocol(),
        )

    def close(self) -> None:
        self.conn.close()


#: How a refusal after the client's Finished can look when the alert races the server's close
#: (TLS 1.3: the client has already sent its request, so the close may come as a reset).
CLOSED = ("ConnectionResetError", "BrokenPipeError", "SSLEOFError", "RemoteDisconnected")


def refusal(port: int, context: ssl.SSLContext) -> str:
    """
    Make a request that must be refused during or right after the handshake; return the
    OpenSSL reason of the alert, else the exception's name (see L{CLOSED}).
    """
    client = TLSClient(port, context)
    try:
        reply = client.post(rpc("ping"))
    except ssl.SSLError as e:
        return str(e.reason) if e.reason else type(e).__name__
    except (ConnectionError, http.client.RemoteDisconnected) as e:
        return type(e).__name__
    finally:
        client.close()
    raise AssertionError(f"served: {reply}")


@implementer(ILogObserver)
class LogCapture:
    """The formatted text of every log event while it is installed."""

    def __init__(self, test: TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(formatEvent(event))

    def text(self) -> str:
        return "\n".join(self.lines)


# -- the gateway with TLS -------------------------------------------------------------------------


class TLSGatewayTestCase(GatewayTestCase):
    """A gateway listening with TLS (and mTLS when C{mtls}), reloadable from C{configPath}."""

    mtls = False
    reloadable = True

    def setUp(self) -> Any:
        self.ca = CA("mcpgw test CA")
        self.clientCA = CA("mcpgw clients CA")
        self.server = self.ca.server()
        self.certPath = self.keyPath = self.clientCAPath = ""
        self.logs = LogCapture(self)
        return super().setUp()

    def configText(self) -> str:
        if not self.certPath:
            self.certPath, self.keyPath = self.server.write(self.tmp, "server")
            self.clientCAPath = self.clientCA.writeCert(self.tmp, "clients-ca")
        ca = f", client_ca: {self.clientCAPath}" if self.mtls else ""
        return (
            super().configText()
            + f"tls: {{cert_file: {self.certPath}, key_file: {self.keyPath}{ca}}}\n"
        )

    def client(self, cert: Issued | None = None, **kw: Any) -> TLSClient:
        paths = cert.write(self.tmp, f"client-{cert.serial:x}") if cert is not None else None
        c = TLSClient(self.port, clientContext(self.ca, paths, **kw))
        self.addCleanup(c.close)
        return c

    def post(self, client: TLSClient, id: int = 1) -> Any:
        return threads.deferToThread(client.post, rpc("ping", id=id))

    def refused(self, cert: Issued | None = None, **kw: Any) -> Any:
        paths = cert.write(self.tmp, f"client-{cert.serial:x}") if cert is not None else None
        return threads.deferToThread(refusal, self.port, clientContext(self.ca, paths, **kw))

    def installServerCert(self, cert: Issued, keyFrom: Issued | None = None) -> None:
        """Overwrite the configured cert/key files in place (as certbot and friends do)."""
        with open(self.certPath, "wb") as f:
            f.write(cert.certPEM)
        with open(self.keyPath, "wb") as f:
            f.write((keyFrom or cert).keyPEM)


class TLSTests(TLSGatewayTestCase):
    """C{tls} without C{client_ca}: HTTPS, TLS 1.2 minimum, hot swap of the certificate."""

    @inlineCallbacks
    def test_httpsRequest(self) -> Any:
        """A request over TLS is proxied; the audit line says C{transport: https}."""
        reply = yield self.post(self.client(), id=7)
        self.assertEqual(reply.status, 200)
        self.assertEqual(json.loads(reply.body)["id"], 7)
        self.assertEqual(reply.serial, self.server.serial)
        self.assertEqual(reply.version, "TLSv1.3")
        self.assertEqual(reply.alpn, "http/1.1")
        self.assertEqual(len(self.upstream.seen), 1)
        [line] = self.auditLines()
        self.assertEqual(line["transport"], "https")
        self.assertEqual(line["auth_result"], "external")
        self.assertIsNone(line["client_cert"])
        self.assertIn(f"listening on https://127.0.0.1:{self.port}", self.logs.text())
        self.assertIn(
            f"tls: certificate 'CN=localhost' serial {self.server.serial:x}", self.logs.text()
        )

    @inlineCallbacks
    def test_stopClosesIdleConnectionsCleanly(self) -> Any:
        """
        A graceful stop closes an idle keep-alive HTTPS connection with a close_notify at once: it
        neither waits for the client's close_notify (an idle client does not read) nor for the
        close grace to run out and abort.
        """
        client = self.client()
        reply = yield self.post(client)
        self.assertEqual(reply.status, 200)
        started = time.monotonic()
        yield self.service.stopService()
        self.assertLess(time.monotonic() - started, CLOSE_GRACE / 2)

        def read() -> bytes:
            sock = client.conn.sock
            sock.settimeout(5)
            return bytes(sock.recv(100))

        self.assertEqual((yield threads.deferToThread(read)), b"")  # close_notify, not a reset

    @inlineCallbacks
    def test_earlyErrorClosesTheConnection(self) -> Any:
        """
        An answer that closes the connection (431 here) closes it on the server side too, even
        while the client keeps its socket open and never answers the close_notify.
        """

        def oversized() -> tuple[ssl.SSLSocket, bytes]:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock = clientContext(self.ca).wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(
                b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):  # until the server's close_notify
                data += chunk
            return sock, data

        sock, data = yield threads.deferToThread(oversized)
        self.addCleanup(sock.close)
        self.assertTrue(data.startswith(b"HTTP/1.1 431 "), data[:40])
        for _ in range(100):
            if not self.service.gateway.connections:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(self.service.gateway.connections, set())

    @inlineCallbacks
    def test_streamsOverTLS(self) -> Any:
        """
        SSE events are relayed one by one over TLS (not held back until the end), and a large
        answer goes through the producer/backpressure path intact.
        """

        def get(path: str) -> tuple[int, list[float], int]:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.port, context=clientContext(self.ca), timeout=10
            )
            try:
                conn.request("GET" if "sse" in path else "POST", path, body=rpc("ping"))
                resp = conn.getresponse()
                arrivals, size = [], 0
                while line := resp.readline():
                    size += len(line)
                    if line.startswith(b"data:"):
                        arrivals.append(time.monotonic())
                return resp.status, arrivals, size
            finally:
                conn.close()

        status, arrivals, _ = yield threads.deferToThread(get, "/mcp?mode=sse&n=4&gap=0.1")
        self.assertEqual((status, len(arrivals)), (200, 4))
        self.assertGreater(arrivals[-1] - arrivals[0], 0.2)  # spread out as sent, 0.1 s apart
        status, _, size = yield threads.deferToThread(get, "/mcp?mode=produce&size=4000000")
        self.assertEqual((status, size), (200, 4_000_000))

    @inlineCallbacks
    def test_tls12Accepted(self) -> Any:
        """TLS 1.2 is the minimum, and accepted."""
        reply = yield self.post(self.client(maximum=ssl.TLSVersion.TLSv1_2))
        self.assertEqual((reply.status, reply.version), (200, "TLSv1.2"))

    @inlineCallbacks
    def test_oldVersionsRefused(self) -> Any:
        """A client offering only TLS 1.0 or 1.1 gets a protocol_version alert."""
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            reason = yield self.refused(minimum=version, maximum=version)
            if reason == "NO_PROTOCOLS_AVAILABLE":
                self.skipTest(f"the local OpenSSL does not let a client offer {version.name}")
            self.assertEqual(reason, "TLSV1_ALERT_PROTOCOL_VERSION", version)
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_hotSwap(self) -> Any:
        """
        After a reload with a new certificate, a new connection sees the new serial while an
        already-open keep-alive connection keeps working with the old one.
        """
        old = self.client()
        before = yield self.post(old, 1)
        self.assertEqual(before.serial, self.server.serial)
        renewed = self.ca.server()
        self.assertNotEqual(renewed.serial, self.server.serial)
        self.installServerCert(renewed)
        self.service.reload()
        self.assertEqual(self.service.generation.number, 2)
        fresh = yield self.post(self.client(), 2)
        self.assertEqual((fresh.status, fresh.serial), (200, renewed.serial))
        still = yield self.post(old, 3)
        self.assertEqual((still.status, still.serial), (200, self.server.serial))
        self.assertEqual(len({json.loads(r.body)["id"] for r in (before, fresh, still)}), 3)
        self.assertIn(f"serial {renewed.serial:x}", self.logs.text())

    @inlineCallbacks
    def test_brokenPairRejected(self) -> Any:
        """
        A certificate with a key that is not its own: the reload is rejected with a clear log
        line, the generation stays, and new connections still get the old certificate.
        """
        before = self.service.generation
        self.installServerCert(self.ca.server(), keyFrom=self.ca.server())
        self.service.reload()
        self.assertIs(self.service.generation, before)
        self.assertIn("reload rejected, keeping generation 1", self.logs.text())
        self.assertIn("does not match the certificate", self.logs.text())
        reply = yield self.post(self.client())
        self.assertEqual((reply.status, reply.serial), (200, self.server.serial))

    @inlineCallbacks
    def test_garbageCertificateRejected(self) -> Any:
        """A certificate file that is not PEM (a half-written renewal) is rejected too."""
        with open(self.certPath, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nMIIB")
        self.service.reload()
        self.assertEqual(self.service.generation.number, 1)
        self.assertIn("no PEM certificate", self.logs.text())
        reply = yield self.post(self.client())
        self.assertEqual(reply.serial, self.server.serial)

    def test_unchangedFilesKeepTheContext(self) -> None:
        """A reload that leaves the TLS files alone keeps the same options (and context)."""
        tls = self.service.generation.tls
        self.service.reload()
        self.assertEqual(self.service.generation.number, 2)
        self.assertIs(self.service.generation.tls, tls)

    @inlineCallbacks
    def test_tlsCannotBeTurnedOffByReload(self) -> Any:
        """Switching the listener from https to http needs a restart: the reload is refused."""
        with open(self.configPath, "w") as f:
            f.write(GatewayTestCase.configText(self))
        self.service.reload()
        self.assertEqual(self.service.generation.number, 1)
        self.assertIn("tls cannot be turned off by a reload", self.logs.text())
        reply = yield self.post(self.client())
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_intermediateChainIsServed(self) -> Any:
        """C{cert_file} holding the certificate and an intermediate: clients trusting only
        the root verify the chain."""
        intermediate = CA("mcpgw intermediate", parent=self.ca)
        leaf = intermediate.server()
        leaf.write(self.tmp, "server", chain=(intermediate,))
        self.service.reload()
        self.assertEqual(self.service.generation.number, 2)
        reply = yield self.post(self.client())
        self.assertEqual((reply.status, reply.serial), (200, leaf.serial))


class PlainListenerTests(GatewayTestCase):
    """Without C{tls}: plain HTTP, and a reload cannot turn TLS on."""

    @inlineCallbacks
    def test_tlsCannotBeTurnedOnByReload(self) -> Any:
        ca = CA()
        cert, key = ca.server().write(self.tmp, "server")
        path = os.path.join(self.tmp, "mcpgw.yaml")
        with open(path, "w") as f:
            f.write(self.configText() + f"tls: {{cert_file: {cert}, key_file: {key}}}\n")
        self.service.configPath = path
        logs = LogCapture(self)
        self.service.reload()
        self.assertEqual(self.service.generation.number, 1)
        self.assertIsNone(self.service.generation.tls)
        self.assertIn("tls cannot be turned on by a reload", logs.text())
        reply = yield self.call(body=rpc("ping"))
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.auditLines()[-1]["transport"], "http")


class MTLSTests(TLSGatewayTestCase):
    """C{tls.client_ca}: every connection must present a certificate signed by it."""

    mtls = True

    @inlineCallbacks
    def test_noClientCertificate(self) -> Any:
        """
        No certificate: TLS 1.2 fails the handshake (handshake_failure alert); TLS 1.3 refuses
        at the client's first read (certificate_required alert, or the close it races with).
        """
        reason = yield self.refused(maximum=ssl.TLSVersion.TLSv1_2)
        self.assertEqual(reason, "SSLV3_ALERT_HANDSHAKE_FAILURE")
        reason = yield self.refused()
        self.assertIn(reason, ("TLSV13_ALERT_CERTIFICATE_REQUIRED", *CLOSED))
        self.assertEqual(self.upstream.seen, [])
        self.assertFalse(os.path.exists(self.auditPath) and self.auditLines())

    @inlineCallbacks
    def test_certificateFromAnotherCA(self) -> Any:
        """A certificate signed by a CA other than C{client_ca} (here: the server's) is refused."""
        for issuer in (CA("elsewhere"), self.ca):
            cert = issuer.client(uri=ALICE_SPIFFE)
            reason = yield self.refused(cert, maximum=ssl.TLSVersion.TLSv1_2)
            self.assertEqual(reason, "TLSV1_ALERT_UNKNOWN_CA")
            reason = yield self.refused(cert)
            self.assertIn(reason, ("TLSV1_ALERT_UNKNOWN_CA", *CLOSED))
        self.assertEqual(self.upstream.seen, [])

    @inlineCallbacks
    def test_spiffeIdentity(self) -> Any:
        """A valid certificate is served; its SPIFFE URI SAN is the caller (C{auth_result: mtls})."""
        client = self.client(self.clientCA.client(cn="alice", uri=ALICE_SPIFFE))
        reply = yield self.post(client, 1)
        self.assertEqual(reply.status, 200)
        [line] = self.auditLines()
        self.assertEqual(
            (line["transport"], line["auth_result"], line["auth_key_id"], line["client_cert"]),
            ("https", "mtls", ALICE_SPIFFE, ALICE_SPIFFE),
        )
        [channel] = self.service.gateway.connections
        self.assertEqual(peerIdentity(channel.transport), ALICE_SPIFFE)
        self.assertEqual(channel.transport._mcpgwPeerIdentity, ALICE_SPIFFE)  # cached
        yield self.post(client, 2)
        self.assertEqual(self.auditLines()[-1]["auth_key_id"], ALICE_SPIFFE)

    @inlineCallbacks
    def test_commonNameIdentity(self) -> Any:
        """Without a SPIFFE URI SAN, the subject CN is the identity."""
        reply = yield self.post(self.client(self.clientCA.client(cn="bob")))
        self.assertEqual(reply.status, 200)
        [channel] = self.service.gateway.connections
        self.assertEqual(peerIdentity(channel.transport), "bob")
        self.assertEqual(self.auditLines()[-1]["auth_key_id"], "bob")

    @inlineCallbacks
    def test_intermediateClientCAs(self) -> Any:
        """
        An intermediate CA alone in C{client_ca} is a trust anchor; with the root there instead,
        a client sending its intermediate along verifies too.
        """
        intermediate = CA("mcpgw clients issuing CA", parent=self.clientCA)
        cert = intermediate.client(cn="carol")
        intermediate.writeCert(self.tmp, "clients-ca")
        self.service.reload()
        reply = yield self.post(self.client(cert))
        self.assertEqual(reply.status, 200)
        self.clientCA.writeCert(self.tmp, "clients-ca")
        self.service.reload()
        self.assertEqual(self.service.generation.number, 3)
        reason = yield self.refused(cert, maximum=ssl.TLSVersion.TLSv1_2)
        self.assertEqual(reason, "TLSV1_ALERT_UNKNOWN_CA")
        paths = cert.write(self.tmp, "carol-chain", chain=(intermediate,))
        client = TLSClient(self.port, clientContext(self.ca, paths))
        self.addCleanup(client.close)
        reply = yield self.post(client)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.auditLines()[-1]["auth_key_id"], "carol")

    @inlineCallbacks
    def test_clientCASwappedByReload(self) -> Any:
        """
        After C{client_ca} is replaced and reloaded, certificates from the new CA work and
        those from the old CA are refused on new connections; an open connection keeps going.
        """
        oldCert = self.clientCA.client(cn="old")
        open_ = self.client(oldCert)
        reply = yield self.post(open_, 1)
        self.assertEqual(reply.status, 200)
        newCA = CA("mcpgw clients CA 2")
        newCert = newCA.client(cn="new")
        reason = yield self.refused(newCert)
        self.assertIn(reason, ("TLSV1_ALERT_UNKNOWN_CA", *CLOSED))
        newCA.writeCert(self.tmp, "clients-ca")
        self.service.reload()
        self.assertEqual(self.service.generation.number, 2)
        reply = yield self.post(self.client(newCert), 2)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.auditLines()[-1]["auth_key_id"], "new")
        reason = yield self.refused(oldCert)
        self.assertIn(reason, ("TLSV1_ALERT_UNKNOWN_CA", *CLOSED))
        reply = yield self.post(open_, 3)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.auditLines()[-1]["auth_key_id"], "old")


# -- units ----------------------------------------------------------------------------------------


class LoadServerTLSTests(SynchronousTestCase):
    """L{loadServerTLS}: what it accepts, and the message for what it does not."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="mcpgw-tls-")
        self.ca = CA()
        self.cert, self.key = self.ca.server().write(self.tmp, "server")

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertTLSError(self, config: TLSConfig, text: str) -> None:
        e = self.assertRaises(TLSError, loadServerTLS, config)
        self.assertIn(text, str(e))

    def test_loads(self) -> None:
        """A good pair loads; without C{client_ca} no client certificate is asked for."""
        tls = loadServerTLS(TLSConfig(self.cert, self.key))
        self.assertFalse(tls.mtls)
        self.assertIn("serial", tls.describe())
        self.assertEqual(tls.options.getContext().get_verify_mode(), 0)

    def test_clientCA(self) -> None:
        """With C{client_ca}, a certificate is required (and described in the log line)."""
        ca = self.ca.writeCert(self.tmp, "ca")
        tls = loadServerTLS(TLSConfig(self.cert, self.key, ca))
        self.assertTrue(tls.mtls)
        self.assertIn("client certificates required", tls.describe())
        self.assertTrue(tls.options.getContext().get_verify_mode() & 2)  # FAIL_IF_NO_PEER_CERT

    def test_reuseWhenUnchanged(self) -> None:
        """Same bytes: the previous object; new bytes: a new one."""
        first = loadServerTLS(TLSConfig(self.cert, self.key))
        self.assertIs(loadServerTLS(TLSConfig(self.cert, self.key), first), first)
        self.ca.server().write(self.tmp, "server")
        self.assertIsNot(loadServerTLS(TLSConfig(self.cert, self.key), first), first)

    def test_combinedFile(self) -> None:
        """One PEM holding both the key and the certificate works for both settings."""
        issued = self.ca.server()
        both = self.write("both.pem", issued.keyPEM + issued.certPEM)
        tls = loadServerTLS(TLSConfig(both, both))
        self.assertEqual(tls.certificate.serial_number, issued.serial)

    def test_mismatchedKey(self) -> None:
        _, otherKey = self.ca.server().write(self.tmp, "other")
        self.assertTLSError(TLSConfig(self.cert, otherKey), "does not match the certificate")

    def test_notACertificate(self) -> None:
        self.assertTLSError(TLSConfig(self.key, self.key), "no PEM certificate")

    def test_notAKey(self) -> None:
        self.assertTLSError(TLSConfig(self.cert, self.cert), "not a usable PEM private key")

    def test_encryptedKey(self) -> None:
        issued = self.ca.server()
        cert, _ = issued.write(self.tmp, "enc")
        key = self.write(
            "enc.key",
            issued.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        self.assertTLSError(TLSConfig(cert, key), "encrypted")

    def test_emptyClientCA(self) -> None:
        ca = self.write("ca.pem", b"# nothing here\n")
        self.assertTLSError(TLSConfig(self.cert, self.key, ca), "tls.client_ca")

    def test_missingFile(self) -> None:
        self.assertTLSError(TLSConfig(self.cert, os.path.join(self.tmp, "gone.key")), "cannot read")


class IdentityTests(SynchronousTestCase):
    """L{certificateIdentity} and L{peerIdentity} without a connection."""

    def test_spiffeFirst(self) -> None:
        """The first C{spiffe://} URI wins over other URIs, DNS names and the CN."""
        cert = CA().client(cn="alice", uri=ALICE_SPIFFE).cert
        self.assertEqual(certificateIdentity(cert), ALICE_SPIFFE)

    def test_commonName(self) -> None:
        self.assertEqual(certificateIdentity(CA().client(cn="bob").cert), "bob")

    def test_noNameAtAll(self) -> None:
        """No SAN, empty subject: the certificate's SHA-256 fingerprint."""
        cert = CA().client(cn=None).cert
        self.assertTrue(certificateIdentity(cert).startswith("sha256:"))

    def test_notTLS(self) -> None:
        """No TLS, no identity (and the answer is cached on the transport)."""
        self.assertIsNone(peerIdentity(None))
        transport = StringTransport()
        self.assertIsNone(peerIdentity(transport))
        self.assertIsNone(transport._mcpgwPeerIdentity)


# -- as users run it ------------------------------------------------------------------------------


class RunWithTLSTests(TestCase):
    """C{mcpgw run} with TLS: serve over HTTPS, swap the certificate on SIGHUP, stop cleanly."""

    def test_sighupSwapsCertificate(self) -> None:
        import sys

        tmp = tempfile.mkdtemp(prefix="mcpgw-tls-cli-")
        ca = CA()
        first = ca.server()
        first.write(tmp, "server")
        port = freePort()
        config = os.path.join(tmp, "mcpgw.yaml")
        with open(config, "w") as f:
            f.write(
                f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                "upstreams:\n"
                f"  - {{name: gone, url: 'http://127.0.0.1:{freePort()}/mcp'}}\n"
                "audit: {path: audit.jsonl, fsync: always}\n"
                "tls: {cert_file: server.crt, key_file: server.key}\n"
            )
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcpgw", "run", "--config", config],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

        self.addCleanup(kill)
        context = clientContext(ca)

        def newConnectionSerial() -> int | None:
            client = TLSClient(port, context)
            try:
                return client.post(rpc("ping")).serial
            except OSError:
                return None
            finally:
                client.close()

        def waitFor(serial: int) -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    self.fail(f"exited early: {proc.stdout.read() if proc.stdout else ''}")
                if newConnectionSerial() == serial:
                    return
                time.sleep(0.1)
            self.fail(f"no new connection saw serial {serial:x}")

        waitFor(first.serial)
        kept = TLSClient(port, context)
        self.addCleanup(kept.close)
        self.assertEqual(kept.post(rpc("ping")).status, 502)  # the upstream is gone
        renewed = ca.server()
        renewed.write(tmp, "server")
        proc.send_signal(signal.SIGHUP)
        waitFor(renewed.serial)
        reply = kept.post(rpc("ping"))
        self.assertEqual((reply.status, reply.serial), (502, first.serial))
        kept.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        self.assertEqual(proc.returncode, 0, out)
        self.assertIn("listening on https://127.0.0.1", out)
        self.assertIn(f"serial {renewed.serial:x}", out)
        with open(os.path.join(tmp, "audit.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        self.assertTrue(lines)
        self.assertEqual({line["transport"] for line in lines}, {"https"})
