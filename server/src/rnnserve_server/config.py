"""Server settings from command-line flags and ``RNNSERVE_*`` environment variables.

Precedence: a flag beats its environment variable, which beats the default. Every setting's
flag is ``--name-with-dashes`` and its variable ``RNNSERVE_NAME_IN_CAPS``; ``--help`` lists
them all with their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from rnnserve_server import __version__

ENV_PREFIX = "RNNSERVE_"


def _default_data_dir() -> Path:
    """``$XDG_DATA_HOME/rnnserve``, else ``~/.local/share/rnnserve`` (``make run`` uses ./data)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "rnnserve"


def _default_resident_bytes() -> int:
    """Half the memory this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return max(total // 2, 1)


def _opt(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


def _secret(help: str) -> dict[str, Any]:
    """A security setting: given empty (``--tls-cert ''``, ``RNNSERVE_PEER_TLS_CA=""``) it
    stops the server rather than turn the protection off."""
    return {"help": help, "fail_closed": True}


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told. Limits are enforced by the registry and service."""

    address: str = field(
        default="localhost:50051",
        metadata=_opt("host:port to listen on; port 0 picks a free port (logged as event=serving)"),
    )
    data_dir: Path = field(
        default_factory=_default_data_dir,
        metadata=_opt("directory holding session checkpoints (created if missing)"),
    )
    port_file: Path | None = field(
        default=None, metadata=_opt("write the bound port to this file once serving")
    )
    grace: float = field(
        default=10.0, metadata=_opt("seconds in-flight RPCs get to finish at shutdown")
    )
    checkpoint_interval: float = field(
        default=5.0,
        metadata=_opt("most seconds between checkpoints during a long Train"),
    )
    max_sessions: int = field(default=1000, metadata=_opt("most sessions on the server"))
    max_corpus_bytes: int = field(
        default=20_000_000, metadata=_opt("most corpus bytes (UTF-8) in one session")
    )
    max_total_corpus_bytes: int = field(
        default=200_000_000, metadata=_opt("most corpus bytes (UTF-8) over all sessions")
    )
    max_alphabet_size: int = field(
        default=4096, metadata=_opt("most distinct characters in a session's alphabet")
    )
    max_hidden_size: int = field(default=1024, metadata=_opt("largest hidden_size"))
    max_batch_size: int = field(default=256, metadata=_opt("largest batch_size"))
    max_num_layers: int = field(default=8, metadata=_opt("most stacked layers (num_layers)"))
    max_recurrent_weights: int = field(
        default=16_777_216,
        metadata=_opt(
            "most weights in a session's recurrent layers (hidden_size^2 x gates x layers, "
            "input weights of upper layers included): bounds a session's memory"
        ),
    )
    max_seq_length: int = field(default=1000, metadata=_opt("largest seq_length"))
    max_window_chars: int = field(
        default=16_384,
        metadata=_opt(
            "most characters in one training step (batch_size x seq_length): a step holds "
            "batch x seq x (hidden + alphabet) floats, so this bounds its memory"
        ),
    )
    max_train_steps: int = field(default=1_000_000, metadata=_opt("most steps in one Train call"))
    max_running_jobs: int = field(
        default=0,
        metadata=_opt(
            "most training jobs (and Trains) computing at once; the others wait QUEUED and all "
            "take turns by chunk. 0 = the cores this process may use (affinity and cgroup "
            "quota) minus one, at least one, so interactive calls keep a core"
        ),
    )
    max_job_seconds: float = field(
        default=0.0,
        metadata=_opt("end any training job after this much training time (0 = no limit)"),
    )
    max_jobs_per_token: int = field(
        default=0,
        metadata=_opt(
            "most queued or running training jobs one bearer token may have (0 = no cap)"
        ),
    )
    max_generate_length: int = field(
        default=100_000, metadata=_opt("most characters in one Generate call or Train sample")
    )
    max_text_chars: int = field(
        default=1_000_000, metadata=_opt("most characters in a Step or Predict text")
    )
    max_import_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_opt(
            "largest session archive ImportSession accepts (it is held in memory while "
            "checked); also bounds the arrays it may declare"
        ),
    )
    max_message_bytes: int = field(
        default=4 * 1024 * 1024, metadata=_opt("largest gRPC message received or sent")
    )
    max_resident_sessions: int = field(
        default=100, metadata=_opt("most sessions kept in memory; the rest stay on disk")
    )
    max_resident_bytes: int = field(
        default_factory=_default_resident_bytes,
        metadata=_opt(
            "most bytes the resident sessions' models may hold (weights, optimizer state, update "
            "scratch, corpus); least recently used sessions are evicted to disk beyond it, and a "
            "session larger than it on its own is refused. Default: half the machine's memory "
            "(or of its cgroup limit)"
        ),
    )
    idle_evict_seconds: float = field(
        default=600.0,
        metadata=_opt("evict a session from memory after this many idle seconds (0 = never)"),
    )
    blas_threads: int = field(
        default=1,
        metadata=_opt(
            "threads per BLAS call (sets OPENBLAS/OMP/MKL_NUM_THREADS unless already set; "
            "0 = the library's default). One is fastest for a server: sessions train in "
            "parallel, and multi-threaded BLAS spins badly on a busy machine"
        ),
    )
    log_format: str = field(
        default="auto",
        metadata=_opt(
            "auto (JSON unless stderr is a terminal), json or console",
            choices=["auto", "json", "console"],
        ),
    )
    log_level: str = field(
        default="info",
        metadata=_opt(
            "debug, info, warning or error", choices=["debug", "info", "warning", "error"]
        ),
    )
    metrics_port: int = field(
        default=0, metadata=_opt("serve Prometheus metrics on this port (0 = off)")
    )
    health_port: int = field(
        default=0,
        metadata=_opt(
            "also serve grpc.health.v1 alone, in plain text, on this port of --address's host "
            "(for Kubernetes grpc probes, which can't speak TLS); 0 = off"
        ),
    )
    metrics_max_sessions: int = field(
        default=100,
        metadata=_opt(
            "most sessions with their own rnnserve_session_* series (step, losses, chars/s): "
            "the most recently active ones; 0 = none"
        ),
    )
    auth_token: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "require 'authorization: Bearer <token>' on every RPC but health; repeatable; "
            "the variable takes a comma-separated list"
        ),
    )
    auth_token_file: Path | None = field(
        default=None, metadata=_secret("file of accepted tokens, one a line ('#' comments)")
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=_secret(
            "PEM certificate chain: serve TLS (needs --tls-key; in cluster mode also mutual "
            "TLS between replicas, the --peer-* settings)"
        ),
    )
    tls_key: Path | None = field(default=None, metadata=_secret("PEM private key for --tls-cert"))
    max_request_bytes: int = field(
        default=1024**3,
        metadata=_opt(
            "most working memory one Step (text), Predict, Generate or Train call may take, "
            "estimated from its text length and the session's model before allocating"
        ),
    )
    keepalive_time: float = field(
        default=60.0,
        metadata=_opt(
            "seconds of quiet on a connection before the server sends a keepalive ping "
            "(also on long idle streams such as WatchLoss)"
        ),
    )
    keepalive_timeout: float = field(
        default=20.0,
        metadata=_opt("seconds to wait for a keepalive ping's answer before closing a connection"),
    )
    keepalive_min_ping_interval: float = field(
        default=5.0,
        metadata=_opt(
            "shortest interval between client keepalive pings the server accepts, with or "
            "without calls in flight; faster pings get the connection closed (too_many_pings)"
        ),
    )

    # Cluster mode (issue 11): off unless --redis-url is given.
    redis_url: str = field(
        default="",
        metadata=_opt(
            "cluster mode: the Redis URL (redis://host:port/db, rediss:// for TLS) holding "
            "leases, the session directory and loss streams; needs --shared-dir. No password "
            "in it: --redis-password-file. Unset: one process, --data-dir only"
        ),
    )
    redis_password_file: Path | None = field(
        default=None,
        metadata=_secret(
            "cluster mode: file whose first line is the Redis password (AUTH; the user, if "
            "not default, goes in the URL: rediss://user@host:port/0)"
        ),
    )
    redis_tls_ca: Path | None = field(
        default=None,
        metadata=_secret(
            "cluster mode, rediss:// URL: PEM CA certificates Redis's certificate is checked "
            "against (with its host name); default: the system's CAs"
        ),
    )
    redis_tls_cert: Path | None = field(
        default=None,
        metadata=_secret(
            "cluster mode, rediss:// URL: PEM client certificate for a Redis that requires "
            "one (tls-auth-clients yes); needs --redis-tls-key"
        ),
    )
    redis_tls_key: Path | None = field(
        default=None, metadata=_secret("PEM private key for --redis-tls-cert")
    )
    peer_address: str = field(
        default="",
        metadata=_secret(
            "cluster mode, mutual TLS between replicas: host:port this replica listens on for "
            "the calls other replicas forward to it (each must present a certificate signed "
            "by --peer-tls-ca); --advertise-address then names this port. Needs the three "
            "--peer-tls-* files"
        ),
    )
    peer_tls_ca: Path | None = field(
        default=None,
        metadata=_secret(
            "cluster mode: PEM CA certificate that signs every replica's peer certificate "
            "(and nothing else): both ends of a forward are checked against it"
        ),
    )
    peer_tls_cert: Path | None = field(
        default=None,
        metadata=_secret(
            "cluster mode: this replica's PEM peer certificate chain, signed by --peer-tls-ca, "
            "presented as server and as client (no extended key usage, or both serverAuth "
            "and clientAuth)"
        ),
    )
    peer_tls_key: Path | None = field(
        default=None, metadata=_secret("PEM private key for --peer-tls-cert")
    )
    peer_tls_server_name: str = field(
        default="",
        metadata=_opt(
            "cluster mode: the name every replica's peer certificate holds (DNS SAN), checked "
            "instead of the advertised host, so one certificate serves every replica (pod IPs "
            "change); default: the host of the other replica's --advertise-address"
        ),
    )
    shared_dir: Path | None = field(
        default=None,
        metadata=_opt("cluster mode: the checkpoint directory every replica mounts"),
    )
    advertise_address: str = field(
        default="",
        metadata=_opt(
            "cluster mode: host:port other replicas reach this one at (forwarded calls); "
            "default 127.0.0.1:<bound port>"
        ),
    )
    lease_ttl: float = field(
        default=3.0,
        metadata=_opt(
            "cluster mode: seconds a session's lease lives without renewal; a dead owner's "
            "sessions move to another replica after about this long"
        ),
    )
    idle_release_seconds: float = field(
        default=30.0,
        metadata=_opt(
            "cluster mode: checkpoint and release (lease and memory) a session idle this long"
        ),
    )
    job_claim_interval: float = field(
        default=0.0,
        metadata=_opt(
            "cluster mode: seconds between each replica's look for training jobs that lost "
            "their replica (died, drained, handed off) and for free job slots elsewhere; "
            "0 means a third of --lease-ttl"
        ),
    )
    gc_interval: float = field(
        default=300.0,
        metadata=_opt(
            "cluster mode: seconds between sweeps of the shared directory for checkpoint blobs "
            "no session points at (one replica sweeps per interval); 0 turns sweeps off"
        ),
    )
    gc_grace: float = field(
        default=300.0,
        metadata=_opt(
            "cluster mode: a sweep removes only blobs older than this many seconds (a write "
            "in flight is never taken for garbage)"
        ),
    )

    def auth_configured(self) -> bool:
        """True when an auth option was given at all, even one that yields no token (an
        empty --auth-token or RNNSERVE_AUTH_TOKEN, an empty token file): such a server must
        refuse to start, never run open (check_auth)."""
        return bool(self.auth_token) or self.auth_token_file is not None

    def tokens(self) -> frozenset[str]:
        """Accepted bearer tokens: --auth-token values plus the lines of --auth-token-file."""
        tokens = {t.strip() for t in self.auth_token if t.strip()}
        if self.auth_token_file is not None:
            for line in self.auth_token_file.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    tokens.add(line)
        return frozenset(tokens)


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _field_type(f: dataclasses.Field[Any]) -> str:
    return str(f.type)


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _field_type(f)
    if f.metadata.get("fail_closed") and not raw.strip():
        raise argparse.ArgumentTypeError(
            "is empty: give a value, or leave the setting unset (an empty security setting "
            "stops the server rather than turn the protection off)"
        )
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind in ("Path", "Path | None"):
        return Path(raw).expanduser() if raw else None
    if kind == "tuple[str, ...]":
        # Empty items are kept: RNNSERVE_AUTH_TOKEN="" or "," is a configured, empty auth
        # source (refused by check_auth), not "auth off".
        return tuple(t.strip() for t in raw.split(","))
    return raw


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return str(f.default_factory())
    if f.default is None or f.default == ():
        return "unset"
    return str(f.default)


def build_parser() -> argparse.ArgumentParser:
    """The ``rnnserve-server`` argument parser, one flag per Settings field."""
    parser = argparse.ArgumentParser(
        prog="rnnserve-server",
        description="Serve character-level RNN sessions over gRPC (rnnserve.v1.RnnService).",
        epilog="Each flag can also be set by the environment variable shown; the flag wins.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        meta.pop("fail_closed", None)
        help_text = f"{meta.pop('help')} [env {_env_name(f.name)}; default {_default_text(f)}]"
        kind = _field_type(f)
        if kind == "tuple[str, ...]":
            parser.add_argument(flag, action="append", default=None, help=help_text, **meta)
        else:
            parser.add_argument(
                flag,
                default=None,
                type=functools.partial(_convert, f),
                help=help_text,
                metavar=f.name.upper(),
                **meta,
            )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags (argv, default sys.argv) over environment (default os.environ)."""
    env = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        flag_value = args.get(f.name)
        if flag_value is not None:
            values[f.name] = tuple(flag_value) if isinstance(flag_value, list) else flag_value
        elif _env_name(f.name) in env:
            try:
                values[f.name] = _convert(f, env[_env_name(f.name)])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                fail(f"bad {_env_name(f.name)}: {exc}")
    settings = Settings(**values)
    check_settings(settings)
    return settings


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def apply_blas_threads(settings: Settings) -> None:
    """Set the BLAS thread-count variables; must run before numpy is first imported."""
    if settings.blas_threads > 0:
        for name in BLAS_THREAD_VARIABLES:
            os.environ.setdefault(name, str(settings.blas_threads))


def fail(message: str) -> NoReturn:
    """Print ``rnnserve-server: <message>`` (one line, no traceback) and exit with code 2,
    the code for bad settings (argparse uses it too)."""
    print(f"rnnserve-server: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# Limits where 0 means "the default" (max_running_jobs) or "none" (the other two).
ZERO_MEANS_DEFAULT = ("max_running_jobs", "max_job_seconds", "max_jobs_per_token")


def check_settings(settings: Settings) -> None:
    """Exit (code 2) with a one-line message when settings contradict each other."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        fail("--tls-cert and --tls-key must be given together")
    for name in (
        "grace",
        "checkpoint_interval",
        "idle_evict_seconds",
        "blas_threads",
        "keepalive_min_ping_interval",
        *ZERO_MEANS_DEFAULT,
        "metrics_max_sessions",
        "health_port",
    ):
        if getattr(settings, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("keepalive_time", "keepalive_timeout"):
        if not getattr(settings, name) > 0:
            fail(f"--{name.replace('_', '-')} must be > 0")
    for f in dataclasses.fields(Settings):
        if (
            f.name.startswith("max_")
            and f.name not in ZERO_MEANS_DEFAULT
            and getattr(settings, f.name) < 1
        ):
            fail(f"--{f.name.replace('_', '-')} must be >= 1")
    if settings.redis_url and settings.shared_dir is None:
        fail("--redis-url needs --shared-dir (the checkpoint directory every replica mounts)")
    if settings.shared_dir is not None and not settings.redis_url:
        fail("--shared-dir is for cluster mode: give --redis-url too")
    check_cluster_security(settings)
    if not settings.lease_ttl > 0:
        fail("--lease-ttl must be > 0")
    if settings.idle_release_seconds < 0:
        fail("--idle-release-seconds must be >= 0")
    if settings.job_claim_interval < 0:
        fail("--job-claim-interval must be >= 0 (0 means a third of --lease-ttl)")
    if settings.gc_interval < 0:
        fail("--gc-interval must be >= 0 (0 turns the sweeps off)")
    if settings.gc_grace < 0:
        fail("--gc-grace must be >= 0")
    check_auth(settings)


def check_auth(settings: Settings) -> None:
    """Fail closed: an auth option that yields no token, or a token file that can't be read,
    stops the server (exit 2) instead of running without auth."""
    path = settings.auth_token_file
    try:
        tokens = settings.tokens()
    except FileNotFoundError:
        fail(f"--auth-token-file {path} does not exist; create it (a token a line) or fix the path")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        fail(f"--auth-token-file {path} can't be read ({reason}); make it a readable UTF-8 file")
    if settings.auth_configured() and not tokens:
        where = []
        if settings.auth_token:
            where.append("--auth-token / RNNSERVE_AUTH_TOKEN is empty")
        if path is not None:
            where.append(f"--auth-token-file {path} holds no token (only blank or '#' lines)")
        fail(
            "auth is configured but gives no token ("
            + "; ".join(where)
            + "): give at least one non-empty token, or unset the auth options to run without auth"
        )


PEER_TLS = ("peer_address", "peer_tls_ca", "peer_tls_cert", "peer_tls_key")
REDIS_SECURITY = ("redis_password_file", "redis_tls_ca", "redis_tls_cert", "redis_tls_key")


def _flags(names: Sequence[str]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


def peer_tls_on(settings: Settings) -> bool:
    """True when replicas forward to each other over mutual TLS (all four settings given)."""
    return all(getattr(settings, name) for name in PEER_TLS)


def check_cluster_security(settings: Settings) -> None:
    """Fail closed: a partial peer TLS or Redis TLS setting, a password in the Redis URL, or
    TLS for clients with plain text between replicas stops the server (exit 2)."""
    given = [name for name in PEER_TLS if getattr(settings, name)]
    if settings.peer_tls_server_name and not given:
        given = ["peer_tls_server_name"]
    redis_given = [name for name in REDIS_SECURITY if getattr(settings, name) is not None]
    if not settings.redis_url and (given or redis_given):
        fail(
            f"cluster mode settings ({_flags(given + redis_given)}) without --redis-url: give "
            "it too, or leave them out"
        )
    if given and not peer_tls_on(settings):
        missing = [name for name in PEER_TLS if not getattr(settings, name)]
        fail(
            f"mutual TLS between replicas needs all of {_flags(PEER_TLS)}; missing "
            f"{_flags(missing)} (docs/cluster.md, Security)"
        )
    if settings.redis_url and settings.tls_cert is not None and not peer_tls_on(settings):
        fail(
            "cluster mode with --tls-cert needs mutual TLS between replicas too (forwarded "
            f"calls carry the callers' tokens): give {_flags(PEER_TLS)} (docs/cluster.md, "
            "Security)"
        )
    if not settings.redis_url:
        return
    url = urllib.parse.urlsplit(settings.redis_url)
    if url.scheme not in ("redis", "rediss", "unix"):
        fail(
            f"--redis-url must start with redis://, rediss:// (TLS) or unix://, not {url.scheme}://"
        )
    if url.password is not None:
        fail(
            "--redis-url holds a password, which command lines and logs show: remove it from "
            "the URL and put it in a file given by --redis-password-file"
        )
    tls_files = [name for name in REDIS_SECURITY[1:] if getattr(settings, name) is not None]
    if tls_files and url.scheme != "rediss":
        fail(f"{_flags(tls_files)}: only with a rediss:// --redis-url (Redis over TLS)")
    if (settings.redis_tls_cert is None) != (settings.redis_tls_key is None):
        fail("--redis-tls-cert and --redis-tls-key must be given together")
