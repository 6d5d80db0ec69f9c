"""Gated cells, layers and dropout through a real server: the client library and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
from typing import TYPE_CHECKING, Any

import pytest
from rnnserve import InvalidArgument, LimitExceeded
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import rnnserve

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(120)

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_an_lstm_with_two_layers_and_dropout_trains_and_survives_a_restart(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    with server.client(timeout=30) as client:
        session = client.create_session(
            TEXT,
            session_id="deep",
            cell="lstm",
            num_layers=2,
            dropout=0.2,
            hidden_size=32,
            seq_length=20,
            batch_size=4,
            seed=1,
        )
        config = session.info().config
        assert (config.cell, config.num_layers) == (pb.CELL_LSTM, 2)
        assert config.dropout == pytest.approx(0.2)
        first = session.step().loss
        final = session.train(150).wait()
        assert final.loss < first - 1.0
        before = session.predict("The quick brown fox")
        sample = session.generate(60, prime="The ", temperature=0.8, seed=4)
        assert len(sample) == 60
    server.stop()
    restarted = server_factory(data_dir=server.data_dir)
    with restarted.client(timeout=30) as client:
        session = client.session("deep")
        info = session.info()
        assert info.step == 151 and info.config.cell == pb.CELL_LSTM
        after = session.predict("The quick brown fox")
        assert after.loss == before.loss and after.predicted == before.predicted
        assert session.generate(60, prime="The ", temperature=0.8, seed=4) == sample
        session.train(5).wait()  # resumes with its carried (h, c) and dropout generator


def test_quality_preset_is_a_gated_cell(module_server: ServerHandle) -> None:
    with module_server.client(timeout=30) as client:
        session = client.create_session(TEXT, preset="quality", hidden_size=16, seq_length=20)
        config = session.info().config
        assert config.cell in (pb.CELL_LSTM, pb.CELL_GRU)
        assert session.step().loss > 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_layers": 1, "dropout": 0.5}, "dropout applies between layers"),
        ({"num_layers": 2, "dropout": 1.5}, "config.dropout must be a number in [0, 1)"),
        ({"num_layers": 0}, "config.num_layers must be an integer >= 1"),
        ({"cell": 9}, "config.cell 9 is not a known Cell value"),
    ],
)
def test_bad_cell_settings_are_invalid_argument(
    module_server: ServerHandle, changes: dict[str, object], message: str
) -> None:
    with (
        module_server.client(timeout=30) as client,
        pytest.raises(InvalidArgument, match=re.escape(message)),
    ):
        client.create_session(TEXT, **changes)  # type: ignore[arg-type]


def test_num_layers_over_the_limit_names_the_setting(module_server: ServerHandle) -> None:
    with (
        module_server.client(timeout=30) as client,
        pytest.raises(LimitExceeded, match=r"max.num.layers"),
    ):
        client.create_session(TEXT, cell="gru", num_layers=9)


def test_cli_creates_a_gru_with_layers(module_server: ServerHandle) -> None:
    created = json_lines(
        rnnserve(
            module_server,
            "--json",
            "create",
            "--text",
            TEXT,
            "--cell",
            "gru",
            "--num-layers",
            "2",
            "--dropout",
            "0.1",
            "--hidden-size",
            "16",
        )
    )
    config = created[0]["config"]
    assert config["cell"] == "CELL_GRU" and config["num_layers"] == 2
    assert config["dropout"] == pytest.approx(0.1)
    helped = rnnserve(None, "create", "--help")
    assert "--cell {rnn,lstm,gru}" in helped.stdout and "--num-layers" in helped.stdout


def test_deep_wide_models_are_refused_by_the_weight_limit(module_server: ServerHandle) -> None:
    with (
        module_server.client(timeout=30) as client,
        pytest.raises(LimitExceeded, match=r"recurrent weights .*--max-recurrent-weights"),
    ):
        # 8 LSTM layers of 1024: 8 x 4 x 1024^2 + 7 x 4 x 1024^2 = 62.9 M weights (>16.8 M)
        client.create_session(TEXT, cell="lstm", num_layers=8, hidden_size=1024)
