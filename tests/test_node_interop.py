"""A client that is not Python: Node's @grpc/grpc-js (package.json devDependencies, installed
by `make test` / `make lint`) calls a real server and decodes the google.rpc.Status in the
`grpc-status-details-bin` trailer with the googleapis protos (tests/interop/error_details.js)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from google.rpc import status_pb2

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "interop" / "error_details.js"
# The googleapis protos ship with the googleapis-common-protos package: <dir>/google/rpc/*.proto
GOOGLEAPIS = Path(status_pb2.__file__).resolve().parents[2]


@pytest.mark.timeout(90)
def test_a_node_grpc_js_client_decodes_the_error_details(server: ServerHandle) -> None:
    node = shutil.which("node")
    assert node is not None, "node is required (the Makefile installs the npm packages)"
    assert (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make test` (npm install)"
    assert (GOOGLEAPIS / "google" / "rpc" / "error_details.proto").is_file()
    done = subprocess.run(
        [node, str(SCRIPT), server.address, str(ROOT / "proto"), str(GOOGLEAPIS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    calls: dict[str, dict[str, Any]] = {}
    for line in done.stdout.splitlines():
        entry = json.loads(line)
        calls[entry["call"]] = entry

    missing = calls["GetSession"]
    assert missing["code"] == 5 and missing["status"]["code"] == 5  # NOT_FOUND
    assert missing["status"]["message"] == missing["details"]
    info = missing["status_details"][0]
    assert info["type"] == "google.rpc.ErrorInfo"
    assert (info["reason"], info["domain"]) == ("SESSION_NOT_FOUND", "rnnserve.v1")
    assert info["metadata"] == {"session_id": "node-missing"}

    invalid = calls["CreateSession"]
    assert invalid["code"] == 3  # INVALID_ARGUMENT
    by_type = {d["type"]: d for d in invalid["status_details"]}
    assert by_type["google.rpc.ErrorInfo"]["reason"] == "FIELD_INVALID"
    violations = by_type["google.rpc.BadRequest"]["fieldViolations"]
    assert [v["field"] for v in violations] == ["config.hidden_size"]
