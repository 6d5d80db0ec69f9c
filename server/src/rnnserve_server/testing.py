"""Start rnnserve and the services a cluster uses, for tests, benchmarks and demos.

The one harness the test fixtures (``tests/conftest.py``, ``tests/cluster_fixtures.py``),
``bench/`` and ``scripts/demo.py`` share (test helpers shipped as a module, as structlog's
``testing``). Everything runs as a real subprocess on a free loopback port, and every wait is
for a condition with a deadline (a log line, a PING answered, a port accepting), never a sleep:

- :func:`start_server`: ``python -m rnnserve_server`` on 127.0.0.1 port 0, returned as a
  :class:`ServerHandle` once it logged ``event=serving``; its JSON log lines, SIGTERM / SIGKILL,
  a :class:`rnnserve.Client` for it. :func:`temporary_server` is one on a throwaway directory.
- :func:`start_redis`: a :class:`RedisProcess` (``appendonly yes``), restartable on its data;
  with ``requirepass`` and TLS on request (:class:`RedisTls`).
- :func:`start_nginx`: an :class:`NginxProcess` proxying gRPC to replicas, choosing one by
  ``hash $http_x_session_id consistent`` (the conf is :func:`nginx_conf`).
- :func:`start_prometheus`: a :class:`PrometheusProcess` scraping servers' ``/metrics`` every
  second and evaluating rule files, queried through its HTTP API.

::

    server = start_server(tmp_path / "data", max_sessions=5)
    with server.client() as client:
        ...
    assert server.stop() == 0          # SIGTERM, wait, exit code

It starts the server as a user would and imports none of its layers (only the client library),
so it sits beside them. redis-server, nginx and prometheus are the Debian packages
(``make deps``).
"""

from __future__ import annotations

import contextlib
import json
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
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from rnnserve import Client

__all__ = [
    "START_TIMEOUT",
    "NginxProcess",
    "PrometheusProcess",
    "PrometheusQueryError",
    "RedisProcess",
    "RedisTls",
    "ServerHandle",
    "daemons",
    "find_binary",
    "free_port",
    "nginx_conf",
    "server_command",
    "server_env",
    "start_nginx",
    "start_prometheus",
    "start_redis",
    "start_server",
    "temporary_server",
]

START_TIMEOUT = 30.0
# Log levels that leave out the info-level `serving` line: the port file says it instead.
QUIET_LOG_LEVELS = ("warning", "error")


def find_binary(name: str) -> str:
    """The path of a Debian-installed server binary (``/usr/sbin`` may not be on PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make deps`")
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago (callers retry if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path.name} not written)"


# ----- rnnserve-server ---------------------------------------------------------------------------


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without RNNSERVE_* variables (the flags say everything), plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def server_command(data_dir: Path, **settings: Any) -> list[str]:
    """``python -m rnnserve_server`` with settings as flags: ``max_sessions=2`` becomes
    ``--max-sessions 2``, a list or tuple repeats the flag, ``None`` leaves it out. Listens on
    127.0.0.1 port 0 and logs JSON unless told otherwise."""
    settings = {"address": "127.0.0.1:0", "log_format": "json", "grace": 10, **settings}
    args = [sys.executable, "-m", "rnnserve_server", "--data-dir", str(data_dir)]
    for name, value in settings.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        for item in value if isinstance(value, list | tuple) else [value]:
            args += [flag, str(item)]
    return args


class ServerHandle:
    """A running server subprocess and the JSON log lines it has written so far.

    Its stderr goes to a pipe a thread follows (a wait wakes on each line), or to ``log_file``,
    read only when asked (``logs``, ``wait_for_log``): then a benchmark's client process
    spends nothing on the server's log while it measures. The constructor returns once the
    server is serving (its ``serving`` line, or ``port_file`` when the log level hides that
    line), and kills the process if it does not get there.
    """

    def __init__(
        self,
        args: list[str],
        data_dir: Path,
        env: dict[str, str],
        log_file: Path | None = None,
        port_file: Path | None = None,
        timeout: float = START_TIMEOUT,
    ) -> None:
        self.args = args
        self.data_dir = data_dir
        self.log_file = log_file
        self._logs: list[dict[str, Any]] = []  # parsed JSON log lines
        self._raw: list[str] = []  # every stderr line, parsed or not
        self._cond = threading.Condition()
        self._read_to = 0  # bytes of log_file taken in
        self._partial = b""  # log_file's last line while it is being written
        self._reader: threading.Thread | None = None
        if port_file is not None:
            port_file.unlink(missing_ok=True)  # left by an earlier run on this directory
        if log_file is None:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
            )
            self._reader = threading.Thread(target=self._read_pipe, daemon=True)
            self._reader.start()
        else:
            with open(log_file, "wb") as out:
                self.process = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out, env=env
                )
        try:
            if port_file is None:
                self.port = int(self.wait_for_log("serving", timeout=timeout)["port"])
            else:
                self.port = self._wait_port_file(port_file, timeout)
        except BaseException:
            self.kill()
            raise
        self.host = "127.0.0.1"
        self.address = f"{self.host}:{self.port}"

    # -- the log ----------------------------------------------------------------------------

    def _take(self, raw_line: bytes) -> None:
        """Record one stderr line (the caller holds the condition)."""
        line = raw_line.decode("utf-8", "replace").rstrip("\n")
        self._raw.append(line)
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            self._logs.append(entry)

    def _read_pipe(self) -> None:
        assert self.process.stderr is not None
        for raw_line in self.process.stderr:
            with self._cond:
                self._take(raw_line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _catch_up(self) -> None:
        """Take in what the server wrote to ``log_file`` since the last look."""
        if self.log_file is None:
            return
        with open(self.log_file, "rb") as f:
            f.seek(self._read_to)
            data = f.read()
        self._read_to += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        with self._cond:
            for line in lines:
                self._take(line)

    def _finished(self) -> bool:
        """True once the process has exited and all it wrote has been read."""
        if self.process.poll() is None:
            return False
        return self._reader is None or not self._reader.is_alive()

    @property
    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far, parsed."""
        self._catch_up()
        return self._logs

    @property
    def raw(self) -> list[str]:
        """Every stderr line written so far, parsed or not."""
        self._catch_up()
        return self._raw

    def wait_for_log(
        self, event: str, timeout: float = 30.0, start: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """The first log entry (from index ``start``) with this event and field values.

        Raises AssertionError if the process exits or the timeout passes first.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                finished = self._finished()  # before reading: then nothing can come after
                self._catch_up()
                for entry in self._logs[start:]:
                    if entry.get("event") == event and all(
                        entry.get(k) == v for k, v in fields.items()
                    ):
                        return entry
                remaining = deadline - time.monotonic()
                if finished:
                    raise AssertionError(
                        f"server exited ({self.process.returncode}) before logging {event!r} "
                        f"{fields}:\n" + "\n".join(self._raw[-30:])
                    )
                if remaining <= 0:
                    raise AssertionError(
                        f"no {event!r} {fields} log within {timeout} s:\n"
                        + "\n".join(self._raw[-30:])
                    )
                self._pause(min(remaining, 0.5))

    def _pause(self, seconds: float) -> None:
        """Until the next log line (a pipe), or a moment (a file: returns early if the process
        exits); the caller holds the condition."""
        if self._reader is not None:
            self._cond.wait(seconds)
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(min(seconds, 0.02))

    def _wait_port_file(self, port_file: Path, timeout: float) -> int:
        """The port the server wrote to ``port_file`` (atomically) once serving."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not port_file.exists():
                if self._finished():
                    raise AssertionError(
                        f"server exited ({self.process.returncode}) before serving:\n"
                        + "\n".join(self.raw[-30:])
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"server not serving within {timeout} s")
                self._pause(0.02)
        return int(port_file.read_text())

    def mark(self) -> int:
        """The current log position, to wait only for entries written after it."""
        with self._cond:
            return len(self.logs)

    def text_log(self) -> str:
        """Everything the server wrote to stderr."""
        with self._cond:
            return "\n".join(self.raw)

    # -- the process ------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> Client:
        """A Client for this server (kwargs go to Client: token, ca_file, timeout, ...)."""
        kwargs.setdefault("timeout", 30.0)
        return Client(kwargs.pop("address", self.address), **kwargs)

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def rss_bytes(self) -> int:
        """The process's resident set size (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.process.pid}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (default SIGTERM), wait for the exit, return the exit code."""
        if self.alive:
            self.process.send_signal(sig)
        return self._wait(timeout, f" of {sig}")

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit (after a signal sent elsewhere); its exit code."""
        return self._wait(timeout)

    def _wait(self, timeout: float, after: str = "") -> int:
        """The exit code; kills the process and raises AssertionError after ``timeout`` s."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout} s{after}") from None
        self._join_reader()
        return code

    def kill(self) -> None:
        """SIGKILL the process and wait for it."""
        if self.alive:
            self.process.kill()
        self.process.wait(10)
        self._join_reader()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(5)


def start_server(
    data_dir: Path,
    env: dict[str, str] | None = None,
    *,
    log_file: Path | None = None,
    **settings: Any,
) -> ServerHandle:
    """A server on ``data_dir`` with settings as flags (see :func:`server_command`), started
    and serving; ``env`` adds environment variables, ``log_file`` takes its log (else a pipe).
    """
    port_file = None
    if str(settings.get("log_level", "info")).lower() in QUIET_LOG_LEVELS:
        port_file = settings.setdefault("port_file", data_dir.with_name(data_dir.name + ".port"))
    return ServerHandle(
        server_command(data_dir, **settings),
        data_dir,
        server_env(env),
        log_file=log_file,
        port_file=None if port_file is None else Path(port_file),
    )


@contextlib.contextmanager
def temporary_server(stop_timeout: float = 60.0, **settings: Any) -> Iterator[ServerHandle]:
    """A server on a fresh temporary directory (``data/``, and its log in ``server.log``, read
    only when asked), stopped with SIGTERM at the end and the directory removed."""
    with tempfile.TemporaryDirectory(prefix="rnnserve-") as tmp:
        server = start_server(Path(tmp) / "data", log_file=Path(tmp) / "server.log", **settings)
        try:
            yield server
        finally:
            server.stop(timeout=stop_timeout)


# ----- redis-server, nginx and prometheus --------------------------------------------------------


class _Daemon:
    """A server binary running in ``directory`` on a loopback port: started, waited for,
    stopped. Subclasses say how to run it and when it is ready."""

    name = ""  # the binary, for messages
    stop_signal = signal.SIGTERM  # its graceful shutdown

    def __init__(self, directory: Path, port: int | None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """Its log file."""
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """True while the (master) process runs."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it and return once it is ready."""
        raise NotImplementedError

    def _launch(
        self,
        args: list[str],
        ready: Callable[[], bool],
        timeout: float,
        what: str,
        output_to_log: bool = False,
    ) -> None:
        """Run ``args`` and return once ``ready()``; AssertionError with the log's tail if the
        process exits first or ``timeout`` passes (``what`` it did not do). With
        ``output_to_log`` its stdout and stderr go to ``log_path`` (a binary that can't be told
        where to log)."""
        with contextlib.ExitStack() as stack:
            output: IO[bytes] | int = subprocess.DEVNULL
            if output_to_log:
                output = stack.enter_context(self.log_path.open("wb"))
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise AssertionError(f"{self.name} exited:\n{tail(self.log_path)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} {what} within {timeout} s:\n{tail(self.log_path)}"
                )
            # Wait for the process (exits early on a crash) instead of a bare sleep.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(0.02)

    def stop(self, timeout: float = 20.0) -> int:
        """The graceful shutdown signal, wait; the exit code."""
        if self.process is None:
            return 0
        if self.alive:
            self.process.send_signal(self.stop_signal)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout} s") from None

    def kill(self) -> None:
        """SIGKILL the process and wait."""
        if self.process is not None and self.alive:
            self.process.kill()
        if self.process is not None:
            self.process.wait(10)


@dataclass(frozen=True)
class RedisTls:
    """TLS for a :class:`RedisProcess`: its certificate and key, the CA it checks clients
    against, and the client certificate rnnserve presents when Redis requires one."""

    cert: Path
    key: Path
    ca: Path
    client_cert: Path | None = None  # with client_key: Redis runs with tls-auth-clients yes
    client_key: Path | None = None


def _resp(*words: str) -> bytes:
    """A Redis command in the protocol's array form (a password may hold spaces)."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisProcess(_Daemon):
    """A ``redis-server`` on 127.0.0.1 with its data and log in ``directory``: ``url`` for
    clients; ``stop()`` is SIGTERM (it writes its append-only file), ``restart()`` the same
    port and data again, ``kill()`` a crash (up to ~1 s of writes may be lost).

    With ``password`` it runs with ``requirepass`` (the password is also written to
    ``password_file``); with ``tls`` it serves only TLS (``--port 0 --tls-port``) and ``url``
    is ``rediss://``. :meth:`server_settings` gives the rnnserve-server settings that reach it.
    """

    name = "redis-server"

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        options: Sequence[str] = (),
        *,
        password: str | None = None,
        tls: RedisTls | None = None,
    ) -> None:
        super().__init__(directory, port)
        self.options = list(options)  # more redis-server options, after the defaults: they win
        self.password = password
        self.tls = tls
        directory.mkdir(parents=True, exist_ok=True)
        self.password_file = directory / "password"
        if password is not None:
            self.password_file.write_text(password + "\n")

    @property
    def url(self) -> str:
        """The ``redis://`` (``rediss://`` with TLS) URL of the server, without password."""
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def server_settings(self) -> dict[str, Any]:
        """rnnserve-server settings (for :func:`start_server`) that reach this Redis."""
        settings: dict[str, Any] = {"redis_url": self.url}
        if self.password is not None:
            settings["redis_password_file"] = self.password_file
        if self.tls is not None:
            settings["redis_tls_ca"] = self.tls.ca
            settings["redis_tls_cert"] = self.tls.client_cert
            settings["redis_tls_key"] = self.tls.client_key
        return settings

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "redis.log"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and return once it answers PING (not ``-LOADING``)."""
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            tls = self.tls
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(tls.cert),
                "--tls-key-file", str(tls.key),
                "--tls-ca-cert-file", str(tls.ca),
                "--tls-auth-clients", "yes" if tls.client_cert else "no",
            ]  # fmt: skip
        if self.password is not None:
            listen += ["--requirepass", self.password]
        args = [
            find_binary("redis-server"),
            *listen,
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            *self.options,
        ]  # fmt: skip
        self._launch(args, self.ping, timeout, "did not answer PING")

    def ping(self) -> bool:
        """True if the server answers PING with PONG right now (after AUTH, over TLS)."""
        command = _resp("PING")
        if self.password is not None:
            command = _resp("AUTH", self.password) + command
        try:
            with contextlib.ExitStack() as stack:
                sock: socket.socket = stack.enter_context(
                    socket.create_connection(("127.0.0.1", self.port), timeout=1.0)
                )
                if self.tls is not None:
                    context = ssl.create_default_context(cafile=self.tls.ca)
                    if self.tls.client_cert is not None:
                        context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
                    sock = stack.enter_context(
                        context.wrap_socket(sock, server_hostname="127.0.0.1")
                    )
                sock.sendall(command)
                answer = b""
                while b"PONG" not in answer and not answer.startswith(b"-"):
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    answer += chunk
                return b"+PONG" in answer
        except OSError:
            return False

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop gracefully and start again on the same port with the same data."""
        self.stop()
        self.start(timeout)


NGINX_TEMPLATE = """\
# Written by rnnserve_server.testing: gRPC through nginx to rnnserve replicas.
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
  # key=value fields: tests read which upstream served which session id.
  log_format rnnserve 'status=$status upstream=$upstream_addr sid=$http_x_session_id '
                      'uri=$uri time=$request_time';
  access_log {dir}/access.log rnnserve;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  upstream rnnserve {{
    # The client library sends the session id as x-session-id: calls for one session usually
    # reach its owner; any replica forwards the rest.
    hash $http_x_session_id consistent;
{servers}
  }}
  server {{
    listen 127.0.0.1:{port} http2;
    client_max_body_size 64m;
    location / {{
      grpc_pass grpc://rnnserve;
      grpc_read_timeout 1h;   # Train / WatchLoss streams stay open
      grpc_send_timeout 1h;
    }}
  }}
}}
"""


def nginx_conf(directory: Path, port: int, upstreams: list[str]) -> str:
    """The nginx.conf text for ``upstreams`` (``host:port``) on 127.0.0.1:``port``."""
    servers = "\n".join(f"    server {address};" for address in upstreams)
    # As root, nginx's workers would drop to `nobody`, who cannot enter the temp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    return NGINX_TEMPLATE.format(user=user, dir=directory, port=port, servers=servers)


class NginxProcess(_Daemon):
    """``nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`` on 127.0.0.1:``port``; ``stop()``
    is SIGQUIT (a graceful shutdown)."""

    name = "nginx"
    stop_signal = signal.SIGQUIT

    def __init__(self, directory: Path, upstreams: list[str], port: int | None = None) -> None:
        super().__init__(directory, port)
        self.upstreams = list(upstreams)
        (directory / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf = directory / "nginx.conf"
        self.conf.write_text(nginx_conf(directory, self.port, self.upstreams))

    @property
    def address(self) -> str:
        """``host:port`` for gRPC clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """nginx's error log."""
        return self.directory / "error.log"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start nginx and return once its port accepts connections."""
        # -e: the error log before the config is read (else /var/log/nginx).
        args = [find_binary("nginx"), "-p", str(self.directory), "-c", str(self.conf), "-e"]
        args += [str(self.log_path), "-g", "daemon off;"]
        self._launch(args, self._accepting, timeout, "not accepting connections")

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the master and its workers, and wait."""
        if self.process is None:
            return
        # Found before the master dies: after that the workers are re-parented.
        workers = _worker_pids(self.process.pid) if self.alive else []
        super().kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _worker_pids(master: int) -> list[int]:
    """Pids whose parent is ``master`` (nginx workers), from /proc."""
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(master):
            pids.append(int(entry.name))
    return pids


PROMETHEUS_TEMPLATE = """\
# Written by rnnserve_server.testing: scrape rnnserve every second, evaluate its rules.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: {rule_files}
scrape_configs:
  - job_name: rnnserve
    static_configs:
      - targets: {targets}
"""


class PrometheusQueryError(AssertionError):
    """Prometheus answered an API call with an error (a bad expression, say)."""


class PrometheusProcess(_Daemon):
    """``prometheus`` on 127.0.0.1:``port`` scraping ``targets`` (``host:port`` of
    ``/metrics``, job ``rnnserve``) and evaluating ``rule_files`` every second, with its config,
    data and log in ``directory``. ``query(expr)`` runs an instant query, ``api(path)`` any
    other GET of the HTTP API."""

    name = "prometheus"

    def __init__(
        self, directory: Path, targets: list[str], rule_files: list[Path], port: int | None = None
    ) -> None:
        super().__init__(directory, port)
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "prometheus.yml"
        self.config.write_text(
            PROMETHEUS_TEMPLATE.format(
                rule_files=json.dumps([str(p.resolve()) for p in rule_files]),
                targets=json.dumps(targets),
            )
        )

    @property
    def log_path(self) -> Path:
        """Its stdout and stderr (prometheus logs to stderr only)."""
        return self.directory / "prometheus.log"

    @property
    def url(self) -> str:
        """The base URL of the web UI and HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start prometheus and return once ``/-/ready`` answers."""
        args = [
            find_binary("prometheus"),
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self._launch(args, self._ready, timeout, "not ready", output_to_log=True)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``: the ``data`` of a successful answer; PrometheusQueryError
        with Prometheus's message otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 / 422: the body says why
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: its result vector (``metric`` labels and ``value``)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])


DaemonT = TypeVar("DaemonT", bound=_Daemon)


def _start_on_a_free_port(make: Callable[[], DaemonT], tries: int = 5) -> DaemonT:
    """``make()`` (on a port free a moment ago) started; again if that port was taken
    between choosing and binding it."""
    for _ in range(tries):
        daemon = make()
        try:
            daemon.start()
            return daemon
        except AssertionError:
            daemon.kill()
            if "address already in use" not in tail(daemon.log_path).lower():
                raise
    raise AssertionError(f"no free port in {tries} tries")


def start_redis(
    directory: Path, *options: str, password: str | None = None, tls: RedisTls | None = None
) -> RedisProcess:
    """A started :class:`RedisProcess` with its data in ``directory`` (and more redis-server
    ``options``: ``"--appendonly", "no"``; ``password`` and ``tls``: see the class)."""
    return _start_on_a_free_port(
        lambda: RedisProcess(directory, options=options, password=password, tls=tls)
    )


def start_nginx(directory: Path, upstreams: list[str]) -> NginxProcess:
    """A started :class:`NginxProcess` in ``directory`` in front of ``upstreams``."""
    return _start_on_a_free_port(lambda: NginxProcess(directory, upstreams))


@contextlib.contextmanager
def daemons(
    directory: Path, name: str, start: Callable[..., DaemonT]
) -> Iterator[Callable[..., DaemonT]]:
    """A function that starts daemons: ``start(directory / f"{name}{n}", *args, **kwargs)``,
    n = 0, 1, ...; every one it started is stopped (gracefully, then killed) when the block
    ends."""
    started: list[DaemonT] = []

    def factory(*args: Any, **kwargs: Any) -> DaemonT:
        daemon = start(directory / f"{name}{len(started)}", *args, **kwargs)
        started.append(daemon)
        return daemon

    try:
        yield factory
    finally:
        for daemon in started:
            if daemon.alive:
                daemon.stop()
            daemon.kill()


def start_prometheus(
    directory: Path, targets: list[str], rule_files: list[Path]
) -> PrometheusProcess:
    """A started :class:`PrometheusProcess` in ``directory`` scraping ``targets``."""
    return _start_on_a_free_port(lambda: PrometheusProcess(directory, targets, rule_files))
