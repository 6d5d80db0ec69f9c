"""Fixtures for cluster mode: a real ``redis-server`` and a real ``nginx`` (Debian packages,
installed by ``make deps``) on free loopback ports, each in a temporary directory.

``redis_server`` is a started :class:`RedisProcess` (``appendonly yes``): ``.url`` for clients,
``.restart()`` stops it (SIGTERM: it writes its data) and starts it again on the same port and
data, ``.kill()`` for a crash. ``redis_factory(*options)`` starts others with more
redis-server options (``"--appendonly", "no"``: a restart loses everything).
``nginx_factory(upstreams)`` starts an :class:`NginxProcess` that proxies gRPC (``grpc_pass``)
to the given ``host:port`` upstreams, choosing one by ``hash $http_x_session_id consistent``.
Both wait on a condition with a deadline (PING answered,
port accepting), never a sleep, and are stopped at the end of the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

START_TIMEOUT = 20.0


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


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path.name} not written)"


class RedisProcess:
    """A ``redis-server`` on 127.0.0.1 with its data and log in ``directory``."""

    def __init__(
        self, directory: Path, port: int | None = None, options: Sequence[str] = ()
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.options = list(options)  # after the defaults: they win
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "redis.log"

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and return once it answers PING."""
        args = [
            find_binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            *self.options,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll PING until ``+PONG`` (not ``-LOADING``) or the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise AssertionError(f"redis-server exited:\n{_tail(self.log_path)}")
            if self.ping():
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"redis-server did not answer PING within {timeout} s:\n{_tail(self.log_path)}"
                )
            # Wait for the process (exits early on a crash) instead of a bare sleep.
            assert self.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(0.02)

    def ping(self) -> bool:
        """True if the server answers PING with PONG right now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (Redis writes its append-only file and exits), wait; the exit code."""
        if self.process is None:
            return 0
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"redis-server did not exit within {timeout} s") from None

    def kill(self) -> None:
        """SIGKILL the server (a crash: up to ~1 s of writes may be lost) and wait."""
        if self.process is not None and self.alive:
            self.process.kill()
        if self.process is not None:
            self.process.wait(10)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop gracefully and start again on the same port with the same data."""
        self.stop()
        self.start(timeout)


def start_redis(directory: Path, options: Sequence[str] = ()) -> RedisProcess:
    """A started redis-server with its data in ``directory``."""
    server: RedisProcess | None = None
    for _ in range(5):  # a free port can be taken between choosing and binding it
        server = RedisProcess(directory, options=options)
        try:
            server.start()
            break
        except AssertionError:
            server.kill()
            if "Address already in use" not in _tail(server.log_path):
                raise
    assert server is not None and server.alive
    return server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A started redis-server for one test; stopped at the end."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.kill()


RedisFactory = Callable[..., RedisProcess]


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[RedisFactory]:
    """Start redis-servers with more options (``redis_factory("--appendonly", "no")``); all
    killed at the end of the test."""
    started: list[RedisProcess] = []

    def factory(*options: str) -> RedisProcess:
        server = start_redis(tmp_path / f"redis{len(started)}", options)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.kill()


NGINX_TEMPLATE = """\
# Written by tests/cluster_fixtures.py: gRPC through nginx to rnnserve replicas.
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


class NginxProcess:
    """``nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`` on 127.0.0.1:``port``."""

    def __init__(self, directory: Path, upstreams: list[str], port: int | None = None) -> None:
        self.directory = directory
        self.upstreams = list(upstreams)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf = directory / "nginx.conf"
        self.conf.write_text(nginx_conf(directory, self.port, self.upstreams))

    @property
    def address(self) -> str:
        """``host:port`` for gRPC clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        """True while the master process runs."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start nginx and return once its port accepts connections."""
        nginx = find_binary("nginx")
        # -e: the error log before the config is read (else /var/log/nginx).
        args = [nginx, "-p", str(self.directory), "-c", str(self.conf), "-e"]
        args += [str(self.directory / "error.log"), "-g", "daemon off;"]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise AssertionError(f"nginx exited:\n{_tail(self.directory / 'error.log')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"nginx not accepting within {timeout} s:\n"
                    + _tail(self.directory / "error.log")
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(0.02)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGQUIT (graceful shutdown), wait; the exit code."""
        if self.process is None:
            return 0
        if self.alive:
            self.process.send_signal(signal.SIGQUIT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"nginx did not exit within {timeout} s") from None

    def kill(self) -> None:
        """SIGKILL the master and its workers, and wait."""
        if self.process is None:
            return
        # Found before the master dies: after that the workers are re-parented.
        workers = _worker_pids(self.process.pid) if self.alive else []
        if self.alive:
            self.process.kill()
        self.process.wait(10)
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


NginxFactory = Callable[[list[str]], NginxProcess]


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[NginxFactory]:
    """Start nginx instances in front of given upstreams; all stopped at the end."""
    started: list[NginxProcess] = []
    counter = iter(range(1_000_000))

    def factory(upstreams: list[str]) -> NginxProcess:
        for _ in range(5):  # retry if the chosen port was taken meanwhile
            handle = NginxProcess(tmp_path / f"nginx{next(counter)}", upstreams)
            started.append(handle)
            try:
                handle.start()
                return handle
            except AssertionError:
                handle.kill()
                if "Address already in use" not in _tail(handle.directory / "error.log"):
                    raise
        raise AssertionError("nginx found no free port in 5 tries")

    yield factory
    for handle in started:
        if handle.alive:
            handle.stop()
        handle.kill()
