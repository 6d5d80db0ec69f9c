"""Checks made before the server binds its port, each failing with one sentence saying what to
fix (``StartupError``: ``serve`` logs it as ``event=cannot_start`` and exits 2, no traceback).

gRPC's own errors for these cases are misleading ("Failed to bind to address" for a TLS key
that doesn't match its certificate) or come late (a read-only data directory only shows when
the first checkpoint fails, after sessions were acknowledged).
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path


class StartupError(Exception):
    """The server can't start with these settings; ``str()`` says what to fix."""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_data_dir(data_dir: Path) -> None:
    """Create the data directory and its ``sessions/`` and prove both writable (a probe file
    is made and removed); StartupError otherwise."""
    fix = (
        f"make it writable by the server's user (uid {os.geteuid()}), or choose another "
        "directory with --data-dir / RNNSERVE_DATA_DIR"
    )
    for directory in (data_dir, data_dir / "sessions"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"data directory {directory} can't be created ({_reason(exc)}): {fix}"
            ) from None
        try:
            # ".tmp-" is the prefix Store.open removes, should a crash leave the probe behind.
            fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-probe-")
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise StartupError(
                f"data directory {directory} is not writable ({_reason(exc)}): {fix}"
            ) from None


@dataclass(frozen=True)
class TlsFiles:
    """A certificate chain and its key, read and checked to belong together."""

    cert: bytes
    key: bytes
    not_after: datetime.datetime | None  # the leaf certificate's expiry, if it could be read


def load_tls(cert_path: Path, key_path: Path) -> TlsFiles:
    """Read and check the PEM certificate chain and private key; StartupError when a file is
    missing or unreadable, not PEM, or the key doesn't match the certificate."""
    data = {}
    for flag, path in (("--tls-cert", cert_path), ("--tls-key", key_path)):
        try:
            data[flag] = path.read_bytes()
        except FileNotFoundError:
            raise StartupError(f"{flag} {path} does not exist; fix the path") from None
        except OSError as exc:
            raise StartupError(
                f"{flag} {path} can't be read ({_reason(exc)}); make it readable by the server"
            ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(
                f"the private key --tls-key {key_path} does not match the certificate "
                f"--tls-cert {cert_path}; give the key the certificate was issued for"
            ) from None
        raise StartupError(
            f"--tls-cert {cert_path} and --tls-key {key_path} can't be loaded "
            f"({exc.reason or exc}); both must be PEM files: the certificate chain (leaf "
            "first) and its unencrypted private key"
        ) from None
    except OSError as exc:
        raise StartupError(
            f"--tls-cert {cert_path} / --tls-key {key_path} can't be read ({_reason(exc)})"
        ) from None
    return TlsFiles(data["--tls-cert"], data["--tls-key"], _not_after(data["--tls-cert"]))


def _not_after(pem: bytes) -> datetime.datetime | None:
    """The expiry of the first certificate in a PEM chain, or None if it can't be parsed."""
    try:
        text = pem.decode("ascii", "replace")
        begin = text.index("-----BEGIN CERTIFICATE-----")
        end_marker = "-----END CERTIFICATE-----"
        end = text.index(end_marker, begin) + len(end_marker)
        der = ssl.PEM_cert_to_DER_cert(text[begin:end])
        return _der_not_after(der)
    except (ValueError, IndexError):
        return None


def _der_item(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER item at ``pos``."""
    tag, length = der[pos], der[pos + 1]
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    return tag, start, start + length


def _der_not_after(der: bytes) -> datetime.datetime:
    """Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial,
    signature, issuer, validity SEQUENCE { notBefore, notAfter }, ... }, ... } (RFC 5280)."""
    _, cert_start, _ = _der_item(der, 0)
    _, pos, _ = _der_item(der, cert_start)  # into tbsCertificate
    tag, _, end = _der_item(der, pos)
    if tag == 0xA0:  # explicit version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        pos = _der_item(der, pos)[2]
    _, validity, _ = _der_item(der, pos)
    not_before_end = _der_item(der, validity)[2]
    tag, start, end = _der_item(der, not_before_end)
    value = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ: years 50-99 are 19xx (RFC 5280 4.1.2.5.1)
        year = int(value[:2])
        value = ("19" if year >= 50 else "20") + value
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError(f"unexpected time tag {tag:#x}")
    return datetime.datetime.strptime(value, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)
