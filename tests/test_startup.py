"""Start-up refusals: settings that can't be served safely stop the real server process with
exit code 2 and one line on stderr saying what to fix, never a traceback, never a server that
runs anyway (auth fails closed)."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve_server.testing import server_env

from tests.pki import make_ca, self_signed

if TYPE_CHECKING:
    from tests.conftest import ServerFactory


EXIT_TIMEOUT = 60.0  # a server that starts serving instead of refusing never exits: a failure


def run_server(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, data_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the server with these flags until it exits (it must refuse to start)."""
    argv = [
        sys.executable,
        "-m",
        "rnnserve_server",
        "--address",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--data-dir",
        str(data_dir if data_dir is not None else tmp_path / "data"),
        *args,
    ]
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=server_env(env),
            timeout=EXIT_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"the server did not refuse to start: still running after {EXIT_TIMEOUT} s; "
            f"stderr:\n{exc.stderr!r}"
        ) from None


def assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, no traceback, and one stderr line holding every needle; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "serving" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, (needles, result.stderr)
    return lines[0]


# ----- auth fails closed (issue 9 item 1) ---------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--auth-token", ""], None, "--auth-token"),
        ([], {"RNNSERVE_AUTH_TOKEN": ""}, "RNNSERVE_AUTH_TOKEN"),
        ([], {"RNNSERVE_AUTH_TOKEN": ","}, "RNNSERVE_AUTH_TOKEN"),
        ([], {"RNNSERVE_AUTH_TOKEN": " , "}, "RNNSERVE_AUTH_TOKEN"),
    ],
    ids=["flag-empty", "env-empty", "env-comma", "env-blanks"],
)
def test_empty_auth_token_refuses_to_start(
    tmp_path: Path, args: list[str], env: dict[str, str] | None, needle: str
) -> None:
    line = assert_refused(run_server(tmp_path, *args, env=env), "auth", needle)
    assert "no token" in line


@pytest.mark.timeout(90)
def test_token_file_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# only a comment\n\n   \n# and another\n", encoding="utf-8")
    line = assert_refused(run_server(tmp_path, "--auth-token-file", str(tokens)), str(tokens))
    assert "no token" in line


@pytest.mark.timeout(90)
def test_missing_token_file_refuses_to_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokens"
    line = assert_refused(run_server(tmp_path, "--auth-token-file", str(missing)), str(missing))
    assert "does not exist" in line


@pytest.mark.timeout(90)
def test_unset_auth_still_means_no_auth(tmp_path: Path) -> None:
    """Not configuring auth at all is not an error (the variable must be absent, not empty)."""
    from rnnserve_server.config import load_settings

    settings = load_settings(["--data-dir", str(tmp_path)], environ={})
    assert not settings.auth_configured() and settings.tokens() == frozenset()
    with_env = load_settings(["--data-dir", str(tmp_path)], environ={"RNNSERVE_AUTH_TOKEN": "a,b"})
    assert with_env.tokens() == frozenset({"a", "b"})
    with pytest.raises(SystemExit) as exc:
        load_settings(["--data-dir", str(tmp_path)], environ={"RNNSERVE_AUTH_TOKEN": ""})
    assert exc.value.code == 2


# ----- startup errors (issue 9 item 12) -----------------------------------------------------


def _read_only_argv(directory: Path) -> list[str]:
    """A prefix that runs a command with ``directory`` read-only: as root (which ignores mode
    bits) a read-only bind mount in a private mount namespace; otherwise mode 0555."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", str(directory)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fresh", [True, False], ids=["empty-dir", "dir-with-sessions"])
def test_read_only_data_dir_refuses_to_start(tmp_path: Path, fresh: bool) -> None:
    data = tmp_path / "ro-data"
    data.mkdir()
    if not fresh:
        (data / "sessions").mkdir()
        (data / ".lock").write_bytes(b"")
    argv = [
        *_read_only_argv(data),
        sys.executable, "-m", "rnnserve_server", "--address", "127.0.0.1:0",
        "--log-format", "json", "--data-dir", str(data),
    ]  # fmt: skip
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            env=server_env(None), timeout=EXIT_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise AssertionError("the server started on a read-only data directory") from None
    finally:
        data.chmod(0o755)
    line = assert_refused(result, "cannot_start", str(data))
    assert "not writable" in line and "--data-dir" in line


def _certificate(
    directory: Path, name: str, *, not_after: datetime.datetime | None = None
) -> tuple[Path, Path]:
    """A self-signed localhost certificate and its key as PEM files ``name``.crt / .key."""
    issued = self_signed(directory, name, ("localhost",), not_after)
    return issued.cert, issued.key


@pytest.mark.timeout(90)
def test_tls_key_not_matching_the_certificate_refuses_to_start(tmp_path: Path) -> None:
    cert, _ = _certificate(tmp_path, "a")
    _, other_key = _certificate(tmp_path, "b")
    result = run_server(tmp_path, "--tls-cert", str(cert), "--tls-key", str(other_key))
    line = assert_refused(result, "cannot_start", "does not match")
    assert str(cert) in line and str(other_key) in line
    assert "Failed to bind" not in result.stderr


@pytest.mark.timeout(90)
def test_missing_or_garbled_tls_files_refuse_to_start(tmp_path: Path) -> None:
    _, key = _certificate(tmp_path, "a")
    missing = tmp_path / "nope.pem"
    result = run_server(tmp_path, "--tls-cert", str(missing), "--tls-key", str(key))
    assert "does not exist" in assert_refused(result, "cannot_start", str(missing))
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("not a certificate\n")
    result = run_server(tmp_path, "--tls-cert", str(garbled), "--tls-key", str(key))
    assert "PEM" in assert_refused(result, "cannot_start", str(garbled))


@pytest.mark.timeout(90)
def test_expired_certificate_is_served_with_a_warning(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    expired = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    cert, key = _certificate(tmp_path, "old", not_after=expired)
    server = server_factory(tls_cert=cert, tls_key=key)
    warning = server.wait_for_log("tls_certificate_expired", timeout=5)
    assert warning["level"] == "warning" and "renew" in warning["fix"]
    assert warning["not_after"].startswith(expired.strftime("%Y-%m-%dT%H:%M:%S"))
    assert server.stop() == 0


@pytest.mark.parametrize("years", [1, 30, 80])  # UTCTime before 2050, GeneralizedTime after
def test_certificate_expiry_is_read_without_third_party_code(tmp_path: Path, years: int) -> None:
    from rnnserve_server.startup import load_tls

    end = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(
        days=365 * years
    )
    cert, key = _certificate(tmp_path, f"y{years}", not_after=end)
    assert load_tls(cert, key).not_after == end


# ----- cluster mode across machines: peer mutual TLS, Redis AUTH and TLS (issue 19) ----------

REDIS = ["--redis-url", "redis://127.0.0.1:1/0", "--shared-dir", "/tmp/rnnserve-unused"]
PEER_FLAGS = "--peer-address, --peer-tls-ca, --peer-tls-cert, --peer-tls-key"


@pytest.mark.timeout(120)
def test_cluster_security_settings_refuse_to_start_with_a_sentence(tmp_path: Path) -> None:
    """A partial or contradictory security setting stops the server (exit 2) saying what to
    fix; none of them turns itself off."""
    ca = make_ca(tmp_path, "peer-ca")
    peer = ca.issue(tmp_path, "replica")
    cert, key = _certificate(tmp_path, "clients")
    peer_tls = [
        "--peer-address", "127.0.0.1:0",
        "--peer-tls-ca", str(ca.cert),
        "--peer-tls-cert", str(peer.cert),
        "--peer-tls-key", str(peer.key),
    ]  # fmt: skip
    cases: list[tuple[list[str], dict[str, str] | None, str]] = [
        (
            [*REDIS, "--peer-tls-ca", str(ca.cert)],
            None,
            f"rnnserve-server: mutual TLS between replicas needs all of {PEER_FLAGS}; missing "
            "--peer-address, --peer-tls-cert, --peer-tls-key (docs/cluster.md, Security)",
        ),
        (
            [*REDIS, "--tls-cert", str(cert), "--tls-key", str(key)],
            None,
            "rnnserve-server: cluster mode with --tls-cert needs mutual TLS between replicas too "
            f"(forwarded calls carry the callers' tokens): give {PEER_FLAGS} (docs/cluster.md, "
            "Security)",
        ),
        (
            peer_tls,
            None,
            f"rnnserve-server: cluster mode settings ({PEER_FLAGS}) without --redis-url: give "
            "it too, or leave them out",
        ),
        (
            ["--redis-url", "redis://:hunter2@127.0.0.1:1/0", "--shared-dir", "/tmp/x"],
            None,
            "rnnserve-server: --redis-url holds a password, which command lines and logs show: "
            "remove it from the URL and put it in a file given by --redis-password-file",
        ),
        (
            [*REDIS, "--redis-tls-ca", str(ca.cert)],
            None,
            "rnnserve-server: --redis-tls-ca: only with a rediss:// --redis-url (Redis over TLS)",
        ),
        (
            [*REDIS],
            {"RNNSERVE_PEER_TLS_CA": ""},
            "rnnserve-server: bad RNNSERVE_PEER_TLS_CA: is empty: give a value, or leave the "
            "setting unset (an empty security setting stops the server rather than turn the "
            "protection off)",
        ),
        (
            [],
            {"RNNSERVE_AUTH_TOKEN_FILE": ""},  # was: no token file, so no auth
            "rnnserve-server: bad RNNSERVE_AUTH_TOKEN_FILE: is empty: give a value, or leave the "
            "setting unset (an empty security setting stops the server rather than turn the "
            "protection off)",
        ),
        (
            ["--tls-cert", "", "--tls-key", ""],
            None,
            "rnnserve-server: error: argument --tls-cert: is empty: give a value, or leave the "
            "setting unset (an empty security setting stops the server rather than turn the "
            "protection off)",
        ),
    ]
    for args, env, sentence in cases:
        result = run_server(tmp_path, *args, env=env)
        assert assert_refused(result, sentence) == sentence
        assert "hunter2" not in result.stderr


@pytest.mark.timeout(120)
def test_cluster_security_files_refuse_to_start_with_a_sentence(tmp_path: Path) -> None:
    """Files that can't serve: an empty Redis password file, a peer certificate its CA did not
    sign, one without the name peers check (cannot_start, before Redis is asked)."""
    ca, other = make_ca(tmp_path, "peer-ca"), make_ca(tmp_path, "other-ca")
    signed, foreign = ca.issue(tmp_path, "replica"), other.issue(tmp_path, "foreign")
    empty = tmp_path / "password"
    empty.write_text("\n")
    result = run_server(tmp_path, *REDIS, "--redis-password-file", str(empty))
    line = assert_refused(result, "cannot_start", "--redis-password-file")
    assert f"--redis-password-file {empty} is empty (its first line is the password)" in line

    def peer(cert: Path, key: Path, *more: str) -> subprocess.CompletedProcess[str]:
        return run_server(
            tmp_path, *REDIS,
            "--peer-address", "127.0.0.1:0",
            "--peer-tls-ca", str(ca.cert),
            "--peer-tls-cert", str(cert),
            "--peer-tls-key", str(key),
            *more,
        )  # fmt: skip

    line = assert_refused(peer(foreign.cert, foreign.key), "cannot_start", "would refuse")
    assert f"other replicas would refuse --peer-tls-cert {foreign.cert} (" in line
    assert f"it must be signed by --peer-tls-ca {ca.cert}, valid now" in line
    unnamed = peer(signed.cert, signed.key, "--advertise-address", "replica-7.internal:50052")
    assert "'replica-7.internal'" in assert_refused(unnamed, "cannot_start", "would refuse")
    line = assert_refused(peer(signed.cert, foreign.key), "cannot_start", "does not match")
    assert f"--peer-tls-key {foreign.key} does not match the certificate --peer-tls-cert" in line
