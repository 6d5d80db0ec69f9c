"""The server's stderr is one JSON object per line, its own lines and the standard logging
lines of the libraries it runs on (grpc, asyncio) alike."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import ServerFactory

pytestmark = pytest.mark.timeout(60)


def test_library_log_lines_are_json(server_factory: ServerFactory) -> None:
    # At debug level asyncio logs its selector and grpc's aio layer its I/O engine, both
    # through the standard logging module, before the server says it serves.
    server = server_factory(log_level="debug")
    server.wait_for_log("serving")
    selector = server.wait_for_log("Using selector: EpollSelector", logger_name="asyncio")
    assert selector["level"] == "debug" and selector["timestamp"].endswith("Z")
    deadline = time.monotonic() + 30
    while not any(e.get("logger_name", "").startswith("grpc") for e in server.logs):
        assert time.monotonic() < deadline, "no line from a grpc logger"
        server.wait_for_log("serving", timeout=0.2)  # yields to the reader thread
    with server.client() as client:
        assert client.health() == "SERVING"
    assert server.stop() == 0
    lines = [line for line in server.text_log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        entry = json.loads(line)  # no bare text in the stream
        assert isinstance(entry, dict) and "event" in entry and "level" in entry, line


def test_rpc_line_is_compact_json_with_the_call_fields(server_factory: ServerFactory) -> None:
    server = server_factory()
    with server.client() as client:
        client.create_session("log me " * 10, session_id="logged", hidden_size=8)
    entry = server.wait_for_log("rpc", method="/rnnserve.v1.RnnService/CreateSession")
    assert entry["session_id"] == "logged" and entry["code"] == "OK"
    assert entry["level"] == "info" and isinstance(entry["duration_ms"], float)
