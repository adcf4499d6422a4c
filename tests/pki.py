"""
A tiny PKI for the TLS tests, made with C{cryptography}: certificate authorities, server
certificates for 127.0.0.1/localhost, and client certificates (one with a SPIFFE URI SAN, one with
only a CN). Keys are P-256 (fast to make); every certificate gets a fresh random serial number.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The SPIFFE id of L{CA.client} C{uri=} certificates in the tests.
ALICE_SPIFFE = "spiffe://example.org/agent/alice"

_DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@attr.s(auto_attribs=True, frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def certPEM(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def keyPEM(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: str, name: str, chain: tuple[CA, ...] = ()) -> tuple[str, str]:
        """
        Write C{name.crt} (this certificate, then those of C{chain}) and C{name.key} into
        C{directory}; return their paths.
        """
        certPath = os.path.join(directory, name + ".crt")
        keyPath = os.path.join(directory, name + ".key")
        with open(certPath, "wb") as f:
            f.write(self.certPEM + b"".join(ca.certPEM for ca in chain))
        with open(keyPath, "wb") as f:
            f.write(self.keyPEM)
        return certPath, keyPath


class CA:
    """
    A certificate authority that issues server and client certificates: self-signed, or an
    intermediate signed by C{parent}.
    """

    def __init__(self, name: str = "mcpgw test CA", parent: CA | None = None) -> None:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        signer = parent.issued.key if parent is not None else key
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(parent.issued.cert.subject if parent is not None else _name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
        )
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                critical=False,
            )
        self.issued: Issued = Issued(builder.sign(signer, hashes.SHA256()), key)

    @property
    def certPEM(self) -> bytes:
        return self.issued.certPEM

    def writeCert(self, directory: str, name: str) -> str:
        """Write the CA certificate as C{name.crt}; return its path."""
        path = os.path.join(directory, name + ".crt")
        with open(path, "wb") as f:
            f.write(self.certPEM)
        return path

    def _issue(
        self,
        cn: str | None,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> Issued:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        issuerKey = self.issued.key
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn) if cn is not None else x509.Name([]))
            .issuer_name(self.issued.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=cn is None)
        return Issued(builder.sign(issuerKey, hashes.SHA256()), key)

    def server(self, cn: str = "localhost") -> Issued:
        """A server certificate for C{localhost} and C{127.0.0.1}."""
        return self._issue(
            cn,
            [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ],
            ExtendedKeyUsageOID.SERVER_AUTH,
        )

    def client(self, cn: str | None = "alice", uri: str | None = None) -> Issued:
        """
        A client certificate with subject C{CN=cn} (or an empty subject when C{cn} is None) and,
        when given, the URI SAN C{uri} (e.g. L{ALICE_SPIFFE}).
        """
        sans: list[x509.GeneralName] = []
        if uri is not None:
            # Other names first: the identity is the first spiffe:// URI, wherever it is.
            sans = [
                x509.DNSName("alice.example.org"),
                x509.UniformResourceIdentifier("https://example.org/alice"),
                x509.UniformResourceIdentifier(uri),
            ]
        return self._issue(cn, sans, ExtendedKeyUsageOID.CLIENT_AUTH)
