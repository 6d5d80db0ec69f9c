"""Shared fixtures: start a real ``rnnserve-server`` subprocess on a free loopback port.

``server_factory(**settings)`` starts a server and returns a :class:`ServerHandle` once it
logged ``event=serving`` (no sleeps: a reader thread follows its JSON log on stderr).
Keyword settings become flags (``max_sessions=2`` -> ``--max-sessions 2``; a list or tuple
repeats the flag; ``None`` leaves it out); ``data_dir`` defaults to a fresh temporary
directory, so pass ``data_dir=old.data_dir`` to restart on the same sessions. ``env=`` adds
environment variables. Every server still running at the end of the test is killed.

    def test_x(server_factory):
        server = server_factory(max_sessions=5)
        with server.client() as client:
            ...
        assert server.stop() == 0          # SIGTERM, wait, exit code

``server`` is a function-scoped server with default settings; ``module_server`` is one shared
by a test module (don't stop it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rnnserve import Client

# A shell without job control starts background commands (a CI runner's `make test &`, say)
# with SIGINT ignored, and every process we start would inherit that: the CLI tests' Ctrl-C
# would then do nothing. With a Python handler installed here, children start with the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = ["cluster_fixtures"]  # redis_server, nginx_factory

START_TIMEOUT = 30.0


class ServerHandle:
    """A running server subprocess and the JSON log lines it has written so far."""

    def __init__(self, args: list[str], data_dir: Path, env: dict[str, str]) -> None:
        self.args = args
        self.data_dir = data_dir
        self.logs: list[dict[str, Any]] = []  # parsed JSON log lines
        self.raw: list[str] = []  # every stderr line, parsed or not
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        serving = self.wait_for_log("serving", timeout=START_TIMEOUT)
        self.port = int(serving["port"])
        self.host = "127.0.0.1"
        self.address = f"{self.host}:{self.port}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw_line in self.process.stderr:
            line = raw_line.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.raw.append(line)
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if isinstance(entry, dict):
                    self.logs.append(entry)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_log(
        self, event: str, timeout: float = 30.0, start: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """The first log entry (from index ``start``) with this event and field values.

        Raises AssertionError if the process exits or the timeout passes first.
        """
        deadline = time.monotonic() + timeout

        def match() -> dict[str, Any] | None:
            for entry in self.logs[start:]:
                if entry.get("event") == event and all(
                    entry.get(k) == v for k, v in fields.items()
                ):
                    return entry
            return None

        with self._cond:
            while True:
                found = match()
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"server exited ({self.process.returncode}) before logging {event!r} "
                        f"{fields}:\n" + "\n".join(self.raw[-30:])
                    )
                if remaining <= 0:
                    raise AssertionError(
                        f"no {event!r} {fields} log within {timeout} s:\n"
                        + "\n".join(self.raw[-30:])
                    )
                self._cond.wait(min(remaining, 0.5))

    def mark(self) -> int:
        """The current log position, to wait only for entries written after it."""
        with self._cond:
            return len(self.logs)

    def client(self, **kwargs: Any) -> Client:
        """A Client for this server (kwargs go to Client: token, ca_file, timeout, ...)."""
        kwargs.setdefault("timeout", 30.0)
        return Client(kwargs.pop("address", self.address), **kwargs)

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (default SIGTERM), wait for the exit, return the exit code."""
        if self.alive:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout} s of {sig}") from None
        self._reader.join(5)
        return code

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit (after a signal sent elsewhere); its exit code."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout} s") from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL the process and wait for it."""
        if self.alive:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)

    def text_log(self) -> str:
        """Everything the server wrote to stderr."""
        with self._cond:
            return "\n".join(self.raw)


def _server_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_server(
    data_dir: Path, env: dict[str, str] | None = None, **settings: Any
) -> ServerHandle:
    """Start ``python -m rnnserve_server`` on 127.0.0.1 port 0 with settings as flags."""
    settings.setdefault("address", "127.0.0.1:0")
    settings.setdefault("log_format", "json")
    settings.setdefault("grace", 10)
    args = [sys.executable, "-m", "rnnserve_server", "--data-dir", str(data_dir)]
    for name, value in settings.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        for item in value if isinstance(value, list | tuple) else [value]:
            args += [flag, str(item)]
    return ServerHandle(args, data_dir, _server_env(env))


ServerFactory = Callable[..., ServerHandle]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers with given settings; all are killed at the end of the test."""
    started: list[ServerHandle] = []
    counter = iter(range(1_000_000))

    def factory(
        data_dir: Path | None = None, env: dict[str, str] | None = None, **settings: Any
    ) -> ServerHandle:
        directory = data_dir if data_dir is not None else tmp_path / f"data{next(counter)}"
        handle = start_server(directory, env, **settings)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        handle.kill()


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerHandle:
    """A server with default settings, for one test."""
    return server_factory()


@pytest.fixture(scope="module")
def module_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    """A server shared by a test module; don't stop it. Default settings, or the module's
    ``MODULE_SERVER_SETTINGS`` dict (e.g. low limits)."""
    settings = dict(getattr(request.module, "MODULE_SERVER_SETTINGS", {}))
    handle = start_server(tmp_path_factory.mktemp("module-data"), **settings)
    yield handle
    handle.kill()
