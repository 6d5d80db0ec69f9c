"""The `rnnserve` CLI driven as a subprocess against a real server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import cli_env, rnnserve, train_in_background

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(90)

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_create_train_predict_generate_with_json(module_server: ServerHandle) -> None:
    server = module_server
    created = json_lines(
        rnnserve(
            server,
            "--json",
            "create",
            "--text",
            "Hallo",
            "--preset",
            "notebook",
            "--seed",
            "0",
            "--id",
            "cli-hallo",
        )
    )
    assert len(created) == 1
    session = created[0]
    assert session["session_id"] == "cli-hallo"
    assert session["config"]["optimizer"] == "OPTIMIZER_SGD"
    assert session["config"]["seq_length"] == 5
    assert session["corpus_chars"] == 5 and session["step"] == 0

    progress = json_lines(
        rnnserve(server, "--json", "train", "cli-hallo", "--steps", "30", "--report-every", "10")
    )
    assert [p["steps_done"] for p in progress][-1] == 30
    assert progress[-1]["stop_reason"] == "STOP_REASON_COMPLETED"
    assert all(p["stop_reason"] == "STOP_REASON_UNSPECIFIED" for p in progress[:-1])

    (predicted,) = json_lines(rnnserve(server, "--json", "predict", "cli-hallo", "Hallo"))
    assert predicted["predicted"] == "alloH"
    assert predicted["bits_per_char"] > 0

    chunks = json_lines(
        rnnserve(server, "--json", "generate", "cli-hallo", "--length", "40", "--seed", "3")
    )
    text = "".join(c["text"] for c in chunks)
    assert len(text) == 40 and set(text) <= set("Hallo")
    plain = rnnserve(server, "generate", "cli-hallo", "--length", "40", "--seed", "3")
    assert plain.returncode == 0 and plain.stdout == text  # not a TTY: no trailing newline
    with server.client() as client:
        assert client.session("cli-hallo").generate(40, seed=3) == text

    (shown,) = json_lines(rnnserve(server, "--json", "show", "cli-hallo"))
    assert shown["step"] == 30 and shown["state"] == "SESSION_STATE_READY"


def test_create_from_stdin_and_file_append_step_list_delete(
    module_server: ServerHandle, tmp_path: Path
) -> None:
    server = module_server
    result = rnnserve(server, "create", "--id", "cli-stdin", "--hidden-size", "16", stdin=TEXT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "cli-stdin\n"

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    result = rnnserve(server, "create", str(corpus), "--hidden-size", "16")
    assert result.returncode == 0, result.stderr
    made_id = result.stdout.strip()
    assert made_id  # the server chose an id

    (appended,) = json_lines(rnnserve(server, "--json", "append", "cli-stdin", str(corpus)))
    assert appended["appended_chars"] == len(TEXT)
    assert appended["session"]["corpus_chars"] == 2 * len(TEXT)
    result = rnnserve(server, "append", "cli-stdin", stdin="the lazy dog")
    assert result.returncode == 0 and "appended 12 chars" in result.stdout

    (step,) = json_lines(rnnserve(server, "--json", "step", "cli-stdin"))
    assert step["step"] == 1 and step["loss"] > 0
    (step,) = json_lines(rnnserve(server, "--json", "step", "cli-stdin", "--text", "the fox"))
    assert step["step"] == 2 and step["chars"] == 6

    listed = {s["session_id"] for s in json_lines(rnnserve(server, "--json", "list"))}
    assert {"cli-stdin", made_id} <= listed
    table = rnnserve(server, "list")
    assert table.stdout.startswith("ID ") and "cli-stdin" in table.stdout

    result = rnnserve(server, "delete", "cli-stdin", made_id)
    assert result.returncode == 0 and result.stdout.count("deleted") == 2
    listed = {s["session_id"] for s in json_lines(rnnserve(server, "--json", "list"))}
    assert not {"cli-stdin", made_id} & listed


def test_errors_are_one_line_on_stderr_with_an_exit_code(module_server: ServerHandle) -> None:
    server = module_server
    result = rnnserve(server, "show", "no-such-session")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.startswith("rnnserve: not found: ")
    assert "no-such-session" in result.stderr
    assert result.stderr.count("\n") == 1

    assert rnnserve(server, "create", "--text", TEXT, "--id", "cli-taken").returncode == 0
    result = rnnserve(server, "create", "--text", TEXT, "--id", "cli-taken")
    assert result.returncode == 4 and result.stderr.startswith("rnnserve: already exists: ")

    result = rnnserve(server, "create", "--text", TEXT, "--learning-rate", "-1")
    assert result.returncode == 6 and "learning_rate" in result.stderr
    assert result.stderr.count("\n") == 1

    result = rnnserve(server, "create", "--text", TEXT, "--optimizer", "rmsprop")
    assert result.returncode == 2  # argparse: invalid choice

    result = rnnserve(server, "create", "/no/such/file.txt")
    assert result.returncode == 2 and "/no/such/file.txt: no such file" in result.stderr

    result = rnnserve(None, "--address", "127.0.0.1:1", "--timeout", "5", "list")
    assert result.returncode == 5
    assert result.stderr.startswith("rnnserve: unavailable: cannot reach the server at 127.0.0.1:1")


def test_health_exit_codes(module_server: ServerHandle) -> None:
    result = rnnserve(module_server, "health")
    assert (result.returncode, result.stdout) == (0, "SERVING\n")
    (status,) = json_lines(rnnserve(module_server, "--json", "health", "--wait", "5"))
    assert status == {"status": "SERVING"}
    result = rnnserve(None, "--address", "127.0.0.1:1", "--timeout", "3", "health")
    assert result.returncode == 5 and result.stdout == ""
    result = rnnserve(None, "--address", "127.0.0.1:1", "health", "--wait", "0.5")
    assert result.returncode == 5 and "not ready" in result.stderr


def test_watch_follows_training_by_another_client(module_server: ServerHandle) -> None:
    server = module_server
    with server.client() as client:
        session = client.create_session(TEXT, session_id="cli-watch", hidden_size=16, seed=1)
        watcher = subprocess.Popen(
            [
                *(sys.executable, "-m", "rnnserve", "--address", server.address, "--json"),
                *("watch", "cli-watch", "--from-step", "1", "--count", "20"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        try:
            session.step()  # history: the watcher replays it, then follows live
            assert watcher.stdout is not None
            first = json.loads(watcher.stdout.readline())  # the watcher is connected
            assert first["step"] == 1
            session.train(19, report_every=5).wait()
            out, err = watcher.communicate(timeout=60)
        finally:
            watcher.kill()
    points = [first] + [json.loads(line) for line in out.splitlines()]
    assert watcher.returncode == 0, err
    assert [p["step"] for p in points] == list(range(1, 21))
    assert all(p["loss"] > 0 for p in points)


def test_ctrl_c_cancels_training_cleanly(module_server: ServerHandle) -> None:
    server = module_server
    with server.client() as client:
        client.create_session(TEXT, session_id="cli-sigint", hidden_size=16, seed=1)
    train = train_in_background(server, "cli-sigint")
    try:
        assert train.stdout is not None
        json.loads(train.stdout.readline())  # training is running
        train.send_signal(signal.SIGINT)
        _, err = train.communicate(timeout=30)
    finally:
        train.kill()
    assert train.returncode == 130, err
    # The last line says where training stopped (a loaded CI machine once failed a check that
    # it is the first line too, and the run's stderr was not kept: we check what users read).
    assert err.splitlines()[-1].startswith("rnnserve: cancelled; the session is at step "), err
    # The server stopped between two updates and the session is usable.
    with server.client() as client:
        info = client.session("cli-sigint").info()
        assert info.step < 1_000_000
        assert info.state in (pb.SESSION_STATE_READY, pb.SESSION_STATE_TRAINING)


def test_train_max_seconds_stops_cleanly(module_server: ServerHandle) -> None:
    server = module_server
    assert rnnserve(server, "create", "--text", TEXT, "--id", "cli-budget").returncode == 0
    result = rnnserve(
        server,
        "train",
        "cli-budget",
        "--steps",
        "1000000",
        "--max-seconds",
        "1",
        "--report-every",
        "10",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "stopped after --max-seconds 1" in result.stderr
    assert "step " in result.stdout  # a progress line per report when there is no bar


def test_help_lists_every_command_with_exit_codes() -> None:
    result = rnnserve(None, "--help")
    assert result.returncode == 0
    for command in [
        "create",
        "list",
        "show",
        "delete",
        "append",
        "step",
        "train",
        "watch",
        "generate",
        "predict",
        "health",
    ]:
        assert command in result.stdout
        sub = rnnserve(None, command, "--help")
        assert sub.returncode == 0 and "examples:" in sub.stdout
    assert "exit codes:" in result.stdout and "RNNSERVE_ADDRESS" in result.stdout


@pytest.mark.timeout(120)
def test_demo_runs_end_to_end_and_leaves_the_readme_picture_alone(tmp_path: Path) -> None:
    root = Path(__file__).parent.parent
    picture = root / "docs" / "loss.png"  # tracked: `make demo` must not rewrite it
    before = picture.read_bytes()
    result = subprocess.run(
        [
            sys.executable,
            str(root / "scripts" / "demo.py"),
            *("--seconds", "2", "--steps", "50", "--chars", "20000"),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env={**cli_env(), "TMPDIR": str(tmp_path)},  # where its chart goes by default
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "server exited with 0" in result.stdout
    assert "predicted:" in result.stdout
    assert picture.read_bytes() == before
    (chart,) = tmp_path.glob("rnnserve-loss-*.png")
    assert f"wrote {chart} (" in result.stdout  # it says where
    assert chart.stat().st_size > 1000


def test_demo_writes_the_offline_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "input.txt"
    demo = Path(__file__).parent.parent / "scripts" / "demo.py"
    result = subprocess.run(
        [sys.executable, str(demo), "--corpus", str(corpus), "--chars", "30000"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = corpus.read_text(encoding="utf-8")
    assert len(text) == 30000 and "def " in text
