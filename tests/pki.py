"""Certificates made by the tests (with ``cryptography``: no openssl to be missing): CAs, the
certificates they sign, self-signed ones, as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOCAL = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Ca:
    """A CA: its certificate file, and what it needs to sign."""

    cert: Path
    name: x509.Name
    private_key: ec.EllipticCurvePrivateKey

    def issue(self, directory: Path, common_name: str, names: tuple[str, ...] = LOCAL) -> Issued:
        """A certificate for ``names`` (IP addresses or DNS names), usable as TLS server and
        client, signed by this CA; written to ``directory/<common_name>.{crt,key}``."""
        return _make(directory, common_name, common_name, names, issuer=self)


def make_ca(directory: Path, common_name: str) -> Ca:
    """A self-signed CA certificate in ``directory/<common_name>.crt``."""
    key = ec.generate_private_key(ec.SECP256R1())
    issued = _make(directory, common_name, common_name, (), ca=True, key=key)
    return Ca(issued.cert, _name(common_name), key)


def self_signed(
    directory: Path,
    stem: str,
    names: tuple[str, ...] = LOCAL,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A self-signed certificate (its own CA) for ``names``, valid from two days before
    ``not_after`` (default: a day from now); ``directory/<stem>.{crt,key}``."""
    return _make(directory, stem, "localhost", names, ca=True, not_after=not_after)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make(
    directory: Path,
    stem: str,
    common_name: str,
    names: tuple[str, ...],
    *,
    issuer: Ca | None = None,
    ca: bool = False,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    end = not_after if not_after is not None else now + datetime.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.name if issuer else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, end) - datetime.timedelta(days=2))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer.private_key if issuer else key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert_path, key_path)
