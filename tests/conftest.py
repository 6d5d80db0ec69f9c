"""Shared fixtures: a real ``rnnserve-server`` subprocess on a free loopback port, started by
the harness shipped with the server (:mod:`rnnserve_server.testing`).

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

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rnnserve_server.testing import ServerHandle, start_server

__all__ = ["ServerFactory", "ServerHandle", "start_server"]

# A shell without job control starts background commands (a CI runner's `make test &`, say)
# with SIGINT ignored, and every process we start would inherit that: the CLI tests' Ctrl-C
# would then do nothing. With a Python handler installed here, children start with the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = ["cluster_fixtures", "prometheus_fixtures"]  # redis, nginx, prometheus

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
