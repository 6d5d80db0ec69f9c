"""``rnnserve convert`` (rnnserve.convert): the CLI command, the ONNX graph's batch and state
semantics in onnxruntime, the errors for files that are not archives, the message when the
onnx extra is missing, and a base client that imports neither numpy nor onnx. That the
graph's loss and greedy text match Predict and Generate for every cell and 1 to 3 layers is
tests/test_model_format.py's (through the doc's example)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime
import pytest
from rnnserve import Client, InvalidArgument
from rnnserve.convert import read_archive, to_onnx

from tests.cli_runner import cli_env, rnnserve
from tests.test_weights_only import TEXT, trained

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client(module_server: ServerHandle) -> Iterator[Client]:
    with module_server.client(timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def lstm_archive(client: Client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained 2-layer LSTM's weights-only archive."""
    session = trained(client, 30, session_id="conv-lstm", cell="lstm", num_layers=2)
    path = tmp_path_factory.mktemp("archive") / "model.rnn"
    session.export(path, weights_only=True)
    return path


def test_cli_convert_writes_the_model_and_says_what_it_takes(
    lstm_archive: Path, tmp_path: Path
) -> None:
    result = rnnserve(None, "convert", str(lstm_archive), str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"converted {lstm_archive} to {tmp_path / 'm.onnx'}: 2-layer lstm, hidden 16, 29 "
        "characters; inputs ids, h0, c0; outputs logits, log_probs, h, c\n"
    )
    model = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    assert [i.name for i in model.get_inputs()] == ["ids", "h0", "c0"]
    assert model.get_modelmeta().custom_metadata_map["alphabet"] == "".join(sorted(set(TEXT)))

    default = lstm_archive.with_suffix(".onnx")  # no OUTPUT: next to the archive
    result = rnnserve(None, "--json", "convert", str(lstm_archive))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "archive": str(lstm_archive),
        "path": str(default),
        "inputs": ["ids", "h0", "c0"],
        "outputs": ["logits", "log_probs", "h", "c"],
    }
    assert default.read_bytes() == (tmp_path / "m.onnx").read_bytes()


def test_the_graph_runs_batches_and_carries_state_across_calls(
    client: Client, lstm_archive: Path
) -> None:
    """B sequences at once give what each gives alone, and a text fed in two calls with the
    state carried gives what it gives in one."""
    onnx_model = onnxruntime.InferenceSession(to_onnx(lstm_archive).SerializeToString())
    alphabet = read_archive(lstm_archive).alphabet
    zeros = np.zeros((2, 2, 16), np.float32)  # (L, B, H)
    texts = ["the lazy dog.", "The quick fox"]
    ids = np.array([[alphabet.index(ch) for ch in t] for t in texts], dtype=np.int64).T  # (T, 2)
    logits, log_probs, h, c = onnx_model.run(None, {"ids": ids, "h0": zeros, "c0": zeros})
    assert logits.shape == log_probs.shape == (13, 2, len(alphabet))
    for b, text in enumerate(texts):
        alone = onnx_model.run(
            None, {"ids": ids[:, b : b + 1], "h0": zeros[:, :1], "c0": zeros[:, :1]}
        )
        np.testing.assert_allclose(alone[1][:, 0], log_probs[:, b], atol=1e-6)
        # Predict's loss of the text (the last target wraps around to the first character).
        nats = -log_probs[np.arange(13), b, np.roll(ids[:, b], -1)].astype(np.float64).mean()
        assert nats == pytest.approx(client.session("conv-lstm").predict(text).loss, abs=1e-4)
    first = onnx_model.run(None, {"ids": ids[:6], "h0": zeros, "c0": zeros})
    rest = onnx_model.run(None, {"ids": ids[6:], "h0": first[2], "c0": first[3]})
    np.testing.assert_allclose(np.concatenate([first[1], rest[1]]), log_probs, atol=1e-6)
    np.testing.assert_allclose(rest[2], h, atol=1e-6)
    np.testing.assert_allclose(rest[3], c, atol=1e-6)


def test_a_file_that_is_not_an_archive_is_refused_naming_the_problem(
    lstm_archive: Path, tmp_path: Path
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an archive")
    with pytest.raises(InvalidArgument, match="not an archive"):
        to_onnx(text)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(InvalidArgument, match="not an rnnserve archive"):
        to_onnx(other_zip)
    with np.load(lstm_archive, allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files if name != "trainer.Wh1"}
    missing = tmp_path / "missing.rnn"
    with missing.open("wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(InvalidArgument, match="weight 'Wh1' is missing"):
        to_onnx(missing)

    result = rnnserve(None, "convert", str(missing), str(tmp_path / "m.onnx"))
    assert result.returncode == 6  # invalid argument
    assert result.stderr.startswith(f"rnnserve: invalid argument: {missing}: weight 'Wh1'")
    assert not (tmp_path / "m.onnx").exists()
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"")
    result = rnnserve(None, "convert", str(onnx_path))  # the default output is the input
    assert result.returncode == 2 and "is the archive itself" in result.stderr


def test_without_the_onnx_extra_convert_says_how_to_install_it(
    lstm_archive: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "no_onnx"
    (blocker / "onnx").mkdir(parents=True)
    (blocker / "onnx" / "__init__.py").write_text("raise ImportError('No module named onnx')\n")
    env = cli_env()
    env["PYTHONPATH"] = str(blocker)
    result = subprocess.run(
        [sys.executable, "-m", "rnnserve", "convert", str(lstm_archive), str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "pip install 'rnnserve[onnx]'" in result.stderr


def test_the_base_client_imports_neither_numpy_nor_onnx() -> None:
    code = (
        "import sys, rnnserve, rnnserve.aio, rnnserve.cli.parser\n"
        "rnnserve.cli.parser.build_parser()\n"
        "print(sorted({'numpy', 'onnx'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == "[]\n"
