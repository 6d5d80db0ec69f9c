"""Checks made before the server binds its port, each failing with one sentence saying what to
fix (``StartupError``: ``serve`` logs it as ``event=cannot_start`` and exits 2, no traceback).

gRPC's own errors for these cases are misleading ("Failed to bind to address" for a TLS key
that doesn't match its certificate) or come late (a read-only data directory only shows when
the first checkpoint fails, after sessions were acknowledged).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

from rnnserve_server.cluster.security import PeerTls, RedisAccess
from rnnserve_server.config import Settings, peer_tls_on


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


def read_file(flag: str, path: Path) -> bytes:
    """The bytes of a file a setting names; StartupError if it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StartupError(f"{flag} {path} does not exist; fix the path") from None
    except OSError as exc:
        raise StartupError(
            f"{flag} {path} can't be read ({_reason(exc)}); make it readable by the server"
        ) from None


def load_tls(
    cert_path: Path, key_path: Path, flags: tuple[str, str] = ("--tls-cert", "--tls-key")
) -> TlsFiles:
    """Read and check the PEM certificate chain and private key; StartupError when a file is
    missing or unreadable, not PEM, or the key doesn't match the certificate. ``flags`` name
    the settings in the messages."""
    cert_flag, key_flag = flags
    cert, key = read_file(cert_flag, cert_path), read_file(key_flag, key_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(
                f"the private key {key_flag} {key_path} does not match the certificate "
                f"{cert_flag} {cert_path}; give the key the certificate was issued for"
            ) from None
        raise StartupError(
            f"{cert_flag} {cert_path} and {key_flag} {key_path} can't be loaded "
            f"({exc.reason or exc}); both must be PEM files: the certificate chain (leaf "
            "first) and its unencrypted private key"
        ) from None
    except OSError as exc:
        raise StartupError(
            f"{cert_flag} {cert_path} / {key_flag} {key_path} can't be read ({_reason(exc)})"
        ) from None
    return TlsFiles(cert, key, _not_after(cert))


def load_ca(flag: str, path: Path) -> bytes:
    """A PEM file of CA certificates; StartupError if it can't be read or holds none."""
    data = read_file(flag, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, ssl.SSLError) else _reason(exc)
        raise StartupError(
            f"{flag} {path} holds no PEM CA certificate ({reason or exc}); give the CA's "
            "certificate file"
        ) from None
    return data


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


# ----- cluster mode: mutual TLS between replicas, Redis with AUTH and TLS --------------------


def load_peer_tls(settings: Settings) -> PeerTls | None:
    """The peer TLS files when replicas talk mutual TLS (None when they don't), checked by a
    handshake in memory, this replica's certificate against itself both ways as two replicas
    would: signed by the CA, valid now, holding the name peers check, usable as server and as
    client. StartupError with what to fix otherwise."""
    if not peer_tls_on(settings):
        return None
    ca_path, cert_path = settings.peer_tls_ca, settings.peer_tls_cert
    key_path = settings.peer_tls_key
    assert ca_path and cert_path and key_path  # peer_tls_on
    ca = load_ca("--peer-tls-ca", ca_path)
    files = load_tls(cert_path, key_path, ("--peer-tls-cert", "--peer-tls-key"))
    host = (settings.advertise_address or "127.0.0.1:0").rsplit(":", 1)[0].strip("[]")
    name = settings.peer_tls_server_name or host
    reason = _mutual_handshake(ca_path, cert_path, key_path, name)
    if reason is not None:
        raise StartupError(
            f"other replicas would refuse --peer-tls-cert {cert_path} ({reason}): it must be "
            f"signed by --peer-tls-ca {ca_path}, valid now, hold the name {name!r} (the "
            "--advertise-address host, or --peer-tls-server-name) and allow server and client "
            "use"
        )
    return PeerTls(ca, files.cert, files.key, settings.peer_tls_server_name)


def _mutual_handshake(ca: Path, cert: Path, key: Path, name: str) -> str | None:
    """None if two replicas holding ``cert`` accept each other under ``ca`` (a TLS handshake
    with client certificates, in memory); else why not, in OpenSSL's words."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for context in (server, client):
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
    server.verify_mode = ssl.CERT_REQUIRED
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    ends = [
        (client.wrap_bio(to_client, to_server, server_hostname=name), to_server),
        (server.wrap_bio(to_server, to_client, server_side=True), to_client),
    ]
    for _ in range(10):  # a handshake is a few round trips
        finished = 0
        for end, _ in ends:
            try:
                end.do_handshake()
                finished += 1
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                return str(exc.verify_message)
            except ssl.SSLError as exc:
                return str(exc.reason or exc)
        if finished == len(ends):
            return None
    return "the handshake did not finish"


def load_redis_access(settings: Settings) -> RedisAccess:
    """The Redis password from --redis-password-file (its first line) and the checked TLS
    files; StartupError if one can't be read or the password file is empty."""
    password = None
    if settings.redis_password_file is not None:
        path = settings.redis_password_file
        try:
            lines = read_file("--redis-password-file", path).decode("utf-8").splitlines()
        except UnicodeError:
            raise StartupError(f"--redis-password-file {path} is not UTF-8 text") from None
        password = lines[0] if lines else ""
        if not password:
            raise StartupError(
                f"--redis-password-file {path} is empty (its first line is the password); "
                "write the password in it, or leave the setting unset for a Redis without AUTH"
            )
    ca = settings.redis_tls_ca
    if ca is not None:
        load_ca("--redis-tls-ca", ca)
    cert, key = settings.redis_tls_cert, settings.redis_tls_key
    if cert is not None and key is not None:
        load_tls(cert, key, ("--redis-tls-cert", "--redis-tls-key"))
    return RedisAccess(
        password,
        str(ca) if ca else None,
        str(cert) if cert else None,
        str(key) if key else None,
    )


async def check_redis(redis: Any, url: str, *, timeout: float) -> None:
    """One PING at start: Redis refusing the password, or TLS with it failing, stops the
    server (StartupError: settings to fix). A Redis that is down or slow does not: the server
    starts and health says NOT_SERVING until Redis answers."""
    where = urllib.parse.urlsplit(url).netloc
    try:
        async with asyncio.timeout(timeout):
            await redis.ping()
    except (AuthenticationError, NoPermissionError) as exc:
        raise StartupError(
            f"Redis at {where} refused this replica ({exc}): check --redis-password-file (the "
            "password Redis's requirepass or ACL user has) and the user in --redis-url"
        ) from None
    except (RedisError, OSError, TimeoutError) as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLError):
            reason = (
                cause.verify_message
                if isinstance(cause, ssl.SSLCertVerificationError)
                else cause.reason or cause
            )
            raise StartupError(
                f"TLS with Redis at {where} failed ({reason}): --redis-tls-ca must hold the CA "
                "that signed Redis's certificate, which must name the URL's host; give "
                "--redis-tls-cert/--redis-tls-key if Redis asks for a client certificate"
            ) from None
