"""
Certificates made at test time with ``cryptography``: a CA, server certificates for any names
(optionally expired or signed by another CA), client certificates, written as PEM files.

``python -m tests.certs DIR`` writes the demo set that ``etc/wsgate-tls.toml`` uses (a demo CA,
a ``localhost`` server certificate and a client certificate, valid until 9999 as RFC 5280 allows
for "no well-defined expiration").  Those keys are public: for trying wsgate out, never for use.
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "Issued", "make_ca"]

_DAY = datetime.timedelta(days=1)
_FOREVER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Issued:
    """A certificate and its key, as PEM bytes, with ``write`` to put them in files."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path | str, stem: str) -> tuple[str, str]:
        """Write ``STEM.pem`` and ``STEM.key`` in ``directory``; return their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return str(cert), str(key)


class CA:
    """A certificate authority that issues server and client certificates."""

    def __init__(
        self, common_name: str = "wsgate test CA", not_after: datetime.datetime | None = None
    ):
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(not_after or now + 30 * _DAY)
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
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path | str, stem: str = "ca") -> str:
        path = Path(directory) / f"{stem}.pem"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem)
        return str(path)

    def issue(
        self,
        *names: str,
        client: bool = False,
        expired: bool = False,
        not_after: datetime.datetime | None = None,
        rsa: bool = False,
    ) -> Issued:
        """
        A certificate for ``names`` (DNS names or IP addresses; the first is the common name): a
        server certificate, or with ``client=True`` a client certificate.  ``expired=True`` makes
        one that ended yesterday.  Keys are EC P-256, or RSA 2048 with ``rsa=True``.
        """
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = _rsa_key() if rsa else _key()
        now = datetime.datetime.now(datetime.UTC)
        if expired:
            start, end = now - 30 * _DAY, now - _DAY
        else:
            start, end = now - _DAY, not_after or now + 30 * _DAY
        alt_names: list[x509.GeneralName] = []
        for name in names:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt_names.append(x509.DNSName(name))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def make_ca(common_name: str = "wsgate test CA") -> CA:
    return CA(common_name)


def write_demo_set(directory: str) -> None:
    """The demo certificates of ``etc/wsgate-tls.toml``."""
    ca = CA("wsgate demo CA (public key, for trying out only)", not_after=_FOREVER)
    ca.write(directory, "demo-ca")
    ca.issue("localhost", "*.localhost", "127.0.0.1", "::1", not_after=_FOREVER).write(
        directory, "localhost"
    )
    ca.issue("wsgate demo client", client=True, not_after=_FOREVER).write(directory, "client")


if __name__ == "__main__":
    write_demo_set(sys.argv[1] if len(sys.argv) > 1 else "etc/tls")
