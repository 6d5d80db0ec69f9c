"""`rnnserve tensorboard` through the real CLI and a real server (issue 20 item 3): the event
files it writes, read back with TensorBoard's own reader, hold every point of every session,
its samples and its hyperparameters; --follow appends the live points until Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rnnserve import plot
from rnnserve import tensorboard as tb
from rnnserve.v1 import rnn_service_pb2 as pb
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from tests.cli_runner import cli_env, rnnserve, rnnserve_running

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(180)

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def read_run(directory: Path) -> Any:
    """The run as TensorBoard reads it (every event kept, none sampled away)."""
    run = event_accumulator.EventAccumulator(
        str(directory),
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
    )
    run.Reload()
    return run


def events(run: Any, tag: str) -> list[Any]:
    return run.Scalars(tag) if tag in run.Tags()["scalars"] else []


def scalars(run: Any, tag: str) -> dict[int, float]:
    """A tag's values by step; each step once."""
    steps = [e.step for e in events(run, tag)]
    assert len(steps) == len(set(steps)), f"{tag}: a step written twice"
    return {e.step: e.value for e in events(run, tag)}


def samples(run: Any) -> dict[int, str]:
    """Each text sample by step, without the Markdown indent it is written with."""
    tag = f"{tb.SAMPLE}/text_summary"
    if tag not in run.Tags()["tensors"]:
        return {}
    out = {}
    for event in run.Tensors(tag):
        text = event.tensor_proto.string_val[0].decode()
        out[event.step] = "\n".join(line.removeprefix("    ") for line in text.split("\n"))
    return out


def hyperparameters(run: Any) -> dict[str, object]:
    content = run.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {
        name: value.string_value if value.HasField("string_value") else value.number_value
        for name, value in start.hparams.items()
    }


def check_history(run: Any, history: list[pb.LossPoint]) -> None:
    """Every loss point, the server's moving average and the validation losses, as float32."""
    expected = plot.LossHistory()
    expected.extend(history)
    assert scalars(run, tb.LOSS) == pytest.approx(
        {p.step: p.loss for p in history}, rel=1e-6, abs=1e-7
    )
    smoothed = dict(zip(expected.steps, expected.columns["smoothed"], strict=True))
    assert scalars(run, tb.SMOOTHED) == pytest.approx(smoothed, rel=1e-6, abs=1e-7)
    validation = {p.step: p.validation_loss for p in history if p.HasField("validation_loss")}
    assert scalars(run, tb.VALIDATION) == pytest.approx(validation, rel=1e-6, abs=1e-7)


def test_tensorboard_writes_every_point_sample_and_hyperparameter(
    module_server: ServerHandle, tmp_path: Path
) -> None:
    with module_server.client() as client:
        a = client.create_session(
            TEXT,
            session_id="tb-a",
            cell="rnn",
            num_layers=1,
            hidden_size=16,
            seed=1,
            validation_fraction=0.2,
        )
        a.train(60, report_every=10).wait()
        b = client.create_session(TEXT, session_id="tb-b", hidden_size=8, cell="gru", seed=2)
        b.train(25).wait()
        infos = {s.id: s.info() for s in (a, b)}
        histories = {s.id: s.loss_history(1) for s in (a, b)}
        expected_sample = a.generate(40, "The ", 0.8, seed=1)
    logdir = tmp_path / "runs"
    args = ("tensorboard", "tb-a", "tb-b", "--logdir", str(logdir))
    result = rnnserve(module_server, *args, "--sample-length", "40", "--sample-prime", "The ")
    assert result.returncode == 0, result.stderr
    assert f"tb-a: 60 points up to step 60 in {logdir / 'tb-a'}" in result.stdout
    assert f"tb-b: 25 points up to step 25 in {logdir / 'tb-b'}" in result.stdout

    for session_id, info in infos.items():
        run = read_run(logdir / session_id)
        check_history(run, histories[session_id])
        # The smoothed loss ends where the server's does.
        assert scalars(run, tb.SMOOTHED)[info.step] == pytest.approx(info.smoothed_loss, rel=1e-5)
        assert scalars(run, tb.SPEED) == pytest.approx({info.step: info.chars_per_second})
        config = info.config
        assert hyperparameters(run) == pytest.approx(
            {
                "hidden_size": config.hidden_size,
                "seq_length": config.seq_length,
                "batch_size": config.batch_size,
                "learning_rate": config.learning_rate,
                "optimizer": "adam",
                "clip": config.clip,
                "seed": config.seed,
                "dtype": "float32",
                "reset_every": config.reset_every,
                "validation_fraction": config.validation_fraction,
                "cell": "rnn" if session_id == "tb-a" else "gru",  # tb-b: the default's 2 layers
                "num_layers": config.num_layers,
                "dropout": config.dropout,
                "parameter_count": info.parameter_count,
            }
        )
    assert len(scalars(read_run(logdir / "tb-a"), tb.VALIDATION)) == 6  # every 10 steps
    # The sample: the prime and 40 characters from the fixed seed, at the session's step.
    assert samples(read_run(logdir / "tb-a")) == {60: "The " + expected_sample}

    # Again: the run is rewritten from the server's history, not written twice.
    again = rnnserve(module_server, "tensorboard", "tb-b", "--logdir", str(logdir))
    assert again.returncode == 0, again.stderr
    assert len(list((logdir / "tb-b").glob("events.out.tfevents.*"))) == 1
    check_history(read_run(logdir / "tb-b"), histories["tb-b"])


def wait_until(condition: Any, timeout: float = 60.0) -> None:
    """Poll ``condition`` (files on disk: nothing to be notified by) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_tensorboard_follow_appends_live_points_until_ctrl_c(
    module_server: ServerHandle, tmp_path: Path
) -> None:
    with module_server.client() as client:
        session = client.create_session(TEXT, session_id="tb-live", hidden_size=8, seed=1)
        session.train(10).wait()
    logdir = tmp_path / "runs"
    follower = rnnserve_running(
        module_server,
        *("tensorboard", "tb-live", "--logdir", str(logdir), "--follow"),
        *("--interval", "0.2", "--sample-every", "20", "--sample-length", "30"),
    )
    try:
        assert follower.stderr is not None and follower.stdout is not None
        assert "following tb-live" in follower.stderr.readline()
        with module_server.client() as client:
            session = client.session("tb-live")
            session.train(30, report_every=10).wait()
            info = session.info()
            history = session.loss_history(1)
        run_dir = logdir / "tb-live"
        # The live points, then the Train's final speed and a sample after step 10 (the
        # follower reads them every 0.2 s, maybe also while the Train runs).
        final_speed = pytest.approx(info.chars_per_second, rel=1e-6)
        wait_until(
            lambda: [e.value for e in events(read_run(run_dir), tb.SPEED)][-1:] == [final_speed]
        )
        wait_until(lambda: max(samples(read_run(run_dir)), default=0) > 10)
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(30)
    assert follower.returncode == 130, err
    assert out.splitlines()[-1] == f"tb-live: 40 points up to step 40 in {run_dir}"
    run = read_run(run_dir)
    check_history(run, history)  # steps 1-10 from the history, 11-40 live: each once
    speed = events(run, tb.SPEED)
    assert speed[-1].step == 40 and speed[-1].value == final_speed
    assert speed[0].step == 10  # the first Train's, written with the history
    first_sample, *later = sorted(samples(run))
    assert first_sample == 10 and later and all(30 <= step <= 40 for step in later)
    assert all(len(text) == 30 for text in samples(run).values())


def test_tensorboard_without_the_extra_says_how_to_install_it(
    module_server: ServerHandle, tmp_path: Path
) -> None:
    with module_server.client() as client:
        client.create_session(TEXT, session_id="tb-noextra", hidden_size=8)
    # As if tensorboardX were not installed: its import fails.
    code = (
        "import sys; sys.modules['tensorboardX'] = None; "
        "from rnnserve.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    logdir = tmp_path / "runs"
    result = subprocess.run(
        [
            *(sys.executable, "-c", code, "--address", module_server.address),
            *("tensorboard", "tb-noextra", "--logdir", str(logdir)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"rnnserve: error: {tb.INSTALL_HINT}"
    assert not logdir.exists()  # nothing written
    missing = rnnserve(module_server, "tensorboard", "tb-nope", "--logdir", str(logdir))
    assert missing.returncode == 3 and not logdir.exists()
