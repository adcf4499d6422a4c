# -*- test-case-name: tests.test_tls -*-
"""
Native TLS and mTLS on the gateway's listener, with certificates swapped on SIGHUP.

  - L{loadServerTLS} reads C{tls.cert_file} (the certificate, then any intermediates),
    C{tls.key_file} and C{tls.client_ca}, and builds a server context: TLS 1.2 minimum, Twisted's
    default ciphers, and with C{client_ca} a client certificate signed by one of its certificates
    is required (C{VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT}). The context is built at once, so a
    broken pair fails the whole new generation (the reload is rejected, the old one stays).
  - L{SwappableServerTLS} is the listener's connection creator: every new connection takes the
    options current at its accept; L{SwappableServerTLS.swap} publishes new ones. Open
    connections keep the context they were accepted with. L{ServerTLSFactory} wraps the site
    with it.
  - L{peerIdentity} is the client certificate identity of a connection (SPIFFE URI SAN, else the
    subject CN), computed once per connection.

Certificates and keys are handed to pyOpenSSL as C{cryptography} objects (pyOpenSSL's own X509
and PKey types are deprecated). A reload whose three files are byte-for-byte unchanged keeps the
previous options object, and so its context.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
from typing import Any, cast

import attr
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509, X509StoreFlags
from twisted.internet._producer_helpers import _PullToPush
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import implementer

from mcpgw.config import TLSConfig

log = Logger()

#: The oldest protocol version a client may use.
MINIMUM_VERSION = TLSVersion.TLSv1_2

#: ALPN: the listener speaks HTTP/1.1 only.
ALPN_PROTOCOLS = (b"http/1.1",)


_SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class TLSError(Exception):
    """The TLS material of a config cannot be used; the message names the file and why."""


@implementer(IOpenSSLTrustRoot)
class ClientCAs:
    """
    A trust root for client certificates: each certificate of C{tls.client_ca} is a trust anchor
    (an intermediate CA may be configured alone: C{X509_V_FLAG_PARTIAL_CHAIN}), and their subjects
    are sent to clients as the acceptable issuers.
    """

    def __init__(self, certificates: list[x509.Certificate]) -> None:
        self.certificates = certificates

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        store = context.get_cert_store()
        assert store is not None
        store.set_flags(X509StoreFlags.PARTIAL_CHAIN)
        for cert in self.certificates:
            store.add_cert(X509.from_cryptography(cert))
            context.add_client_ca(cert)


@attr.frozen
class ServerTLS:
    """
    The TLS side of one generation.

    @ivar options: the server options (its context is built and cached).
    @ivar certificate: the server certificate.
    @ivar clientCAs: the trusted client CAs (mTLS), or C{None}.
    @ivar digest: SHA-256 over the contents of the three files (unchanged files -> reused).
    """

    options: CertificateOptions
    certificate: x509.Certificate
    clientCAs: tuple[x509.Certificate, ...] | None
    digest: bytes

    @property
    def mtls(self) -> bool:
        """Client certificates are required."""
        return self.clientCAs is not None

    def describe(self) -> str:
        """One line for the log: the certificate's subject, serial and expiry, and mTLS."""
        c = self.certificate
        text = (
            f"certificate {c.subject.rfc4514_string()!r} serial {c.serial_number:x} "
            f"expires {c.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
        if self.clientCAs is not None:
            names = ", ".join(repr(ca.subject.rfc4514_string()) for ca in self.clientCAs)
            text += f"; client certificates required (CA {names})"
        return text


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"tls.{key} {path}: cannot read: {e.strerror}") from None


def _certificates(key: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSError(f"tls.{key} {path}: no PEM certificate in the file")
    return certs


def _privateKey(path: str, data: bytes) -> Any:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSError(
            f"tls.key_file {path}: the key is encrypted; give an unencrypted PEM key "
            "(readable by the mcpgw user only)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSError(f"tls.key_file {path}: not a usable PEM private key ({e})") from None
    if not isinstance(key, _SIGNING_KEYS):
        raise TLSError(f"tls.key_file {path}: unsupported key type {type(key).__name__}")
    return key


def _publicBytes(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _checkDates(what: str, cert: x509.Certificate) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        log.warn(
            "{what} {subject} expired at {when}",
            what=what,
            subject=cert.subject.rfc4514_string(),
            when=cert.not_valid_after_utc.isoformat(),
        )
    elif cert.not_valid_before_utc > now:
        log.warn(
            "{what} {subject} is not valid before {when}",
            what=what,
            subject=cert.subject.rfc4514_string(),
            when=cert.not_valid_before_utc.isoformat(),
        )


def loadServerTLS(config: TLSConfig, previous: ServerTLS | None = None) -> ServerTLS:
    """
    Read the files of C{config} and build the server options, context included.

    @param previous: the current generation's; returned as is when the three files are unchanged.
    @raise TLSError: a file cannot be read or parsed, the key does not match the certificate,
        or OpenSSL refuses the context.
    """
    certData = _read("cert_file", config.cert_file)
    keyData = _read("key_file", config.key_file)
    caData = _read("client_ca", config.client_ca) if config.client_ca is not None else None
    h = hashlib.sha256()
    for part in (certData, keyData, caData if caData is not None else b"-"):
        h.update(hashlib.sha256(part).digest())
    digest = h.digest()
    if previous is not None and previous.digest == digest:
        return previous

    chain = _certificates("cert_file", config.cert_file, certData)
    key = _privateKey(config.key_file, keyData)
    leaf = chain[0]
    if _publicBytes(leaf.public_key()) != _publicBytes(key.public_key()):
        raise TLSError(
            f"tls.key_file {config.key_file} does not match the certificate in "
            f"tls.cert_file {config.cert_file} (the first certificate must be the server's)"
        )
    _checkDates("tls.cert_file certificate", leaf)
    clientCAs = None
    trustRoot = None
    if caData is not None:
        assert config.client_ca is not None
        clientCAs = tuple(_certificates("client_ca", config.client_ca, caData))
        for ca in clientCAs:
            _checkDates("tls.client_ca certificate", ca)
        trustRoot = ClientCAs(list(clientCAs))
    # Twisted's annotations name pyOpenSSL's X509/PKey; pyOpenSSL takes cryptography objects
    # (and deprecates its own), so the cryptography ones are passed.
    options = CertificateOptions(
        privateKey=cast(Any, key),
        certificate=cast(Any, leaf),
        extraCertChain=cast(Any, chain[1:]) or None,
        trustRoot=trustRoot,
        raiseMinimumTo=MINIMUM_VERSION,
        acceptableProtocols=ALPN_PROTOCOLS,
    )
    try:
        options.getContext()  # loads the pair and checks it: fail here, before publishing
    except SSL.Error as e:
        raise TLSError(
            f"tls: OpenSSL refused {config.cert_file} / {config.key_file}: {e}"
        ) from None
    return ServerTLS(options=options, certificate=leaf, clientCAs=clientCAs, digest=digest)


@implementer(IOpenSSLServerConnectionCreator)
class SwappableServerTLS:
    """
    The listener's TLS connection creator. Each accepted connection gets a connection object
    from the options current at that moment; L{swap} replaces them for later connections.
    """

    def __init__(self, tls: ServerTLS) -> None:
        self.current = tls

    def swap(self, tls: ServerTLS) -> None:
        """
        Publish C{tls} for new connections (reactor thread). Its context is built first, so a
        broken one raises here and the current one stays.
        """
        tls.options.getContext()
        self.current = tls

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.current.options.serverConnectionForTLS(tlsProtocol)


class ServerTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS server protocol, made to close like a TCP transport. C{loseConnection} still
    flushes what was written, but:

      - a I{streaming} producer does not hold the close (TCP does not wait for one either). A
        request's upstream transport stays registered as one while its answer streams, so
        without this a C{channel.transport.loseConnection()} (graceful stop) would wait until
        the client goes away;
      - after our C{close_notify} the TCP connection is closed at once, without waiting for the
        client's (RFC 8446 6.1 and RFC 5246 7.2.1 allow it): an idle keep-alive client does not
        read, so it would never answer.

    Without both, a graceful stop with any idle HTTPS keep-alive connection waited out its whole
    close grace (5 s). Relies on C{TLSMemoryBIOProtocol} internals (C{_producer}, C{_aborted},
    C{_shutdownTLS}) of the pinned Twisted; C{tests/test_tls.py} checks the behaviour.
    """

    def loseConnection(self) -> None:
        producer = self._producer
        if producer is not None and not isinstance(producer._producer, _PullToPush):
            self.unregisterProducer()
        super().loseConnection()

    def _shutdownTLS(self) -> None:
        super()._shutdownTLS()
        transport = self.transport
        if self.disconnecting and not self._aborted and transport is not None:
            transport.loseConnection()  # flushes the close_notify, then closes


class ServerTLSFactory(TLSMemoryBIOFactory):
    """Wraps the site: TLS with L{ServerTLSProtocol}, connections from C{creator}."""

    protocol = ServerTLSProtocol

    def __init__(self, creator: SwappableServerTLS, wrappedFactory: Any) -> None:
        super().__init__(creator, False, wrappedFactory)


def certificateIdentity(cert: x509.Certificate) -> str:
    """
    The identity of a client certificate: its first C{spiffe://} URI SAN, else its subject CN,
    else its whole subject (RFC 4514), else C{sha256:<hex>} of the certificate.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri[:9].lower() == "spiffe://":
                return uri
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    subject = cert.subject.rfc4514_string()
    if subject:
        return subject
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


_CACHE = "_mcpgwPeerIdentity"
_UNSET = object()


def peerIdentity(transport: Any) -> str | None:
    """
    The verified client certificate identity of a connection (L{certificateIdentity}), or
    C{None} when the transport is not TLS or the client presented no certificate (TLS without
    C{tls.client_ca} never asks for one).

    Computed once per connection and cached on the transport: call it while handling a request
    (after the handshake); later requests on the same connection pay an attribute lookup.
    """
    cached = getattr(transport, _CACHE, _UNSET)
    if cached is not _UNSET:
        return cast("str | None", cached)
    identity = None
    if transport is not None and ISSLTransport.providedBy(transport):
        connection: Any = cast(Any, transport).getHandle()
        cert = None
        # A certificate counts only if OpenSSL was told to verify it (client_ca set).
        if (
            isinstance(connection, SSL.Connection)
            and connection.get_context().get_verify_mode() & SSL.VERIFY_PEER
        ):
            cert = connection.get_peer_certificate(as_cryptography=True)
        if cert is not None:
            identity = certificateIdentity(cert)
        elif not getattr(transport, "_handshakeDone", True):
            return None  # too early to know; do not cache
    with contextlib.suppress(AttributeError):
        setattr(transport, _CACHE, identity)
    return identity
