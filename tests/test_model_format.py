"""docs/model-format.md runs as written, for every cell with 1 to 3 layers in float32 and
float64: its code blocks, run in order in a directory holding a real server's archive as
``model.rnn``, define a plain-numpy ``loss`` and ``generate`` and onnxruntime's
``onnx_loss`` and ``onnx_generate`` (through ``rnnserve convert``'s model); each loss equals
Predict's within 1e-4 and each greedy text equals Generate's at temperature 0 character for
character. float32 cases read weights-only archives, float64 ones whole-session archives."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rnnserve import Client

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(120)

DOC = Path(__file__).resolve().parent.parent / "docs" / "model-format.md"
TEXT = (
    "The quick brown fox jumps over the lazy dog. A lazy dog sleeps; the brown fox runs "
    "on, quick as ever, over the hills and far away. "
) * 12
PROBE = "the lazy brown fox sleeps; a quick dog runs over the hills."
PRIME = "The quick"
LENGTH = 80
# Small and quick to train, trained far enough that greedy text is more than one repeated
# character (so comparing it means something).
MODEL: dict[str, Any] = {
    "hidden_size": 24,
    "seq_length": 16,
    "batch_size": 8,
    "learning_rate": 0.02,
    "dropout": 0.0,  # the default preset has 0.25 between layers; this model is tiny
    "seed": 1,
}
STEPS = 150
CASES = [
    (cell, layers, dtype)
    for dtype in ("float32", "float64")
    for cell in ("rnn", "lstm", "gru")
    for layers in (1, 2, 3)
]


def doc_blocks() -> list[str]:
    """The doc's fenced code blocks, in order; every one is Python."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks, "docs/model-format.md has no code blocks"
    assert {lang for lang, _ in blocks} == {"python"}, "every block runs here: python only"
    return [code for _, code in blocks]


def run_doc() -> dict[str, Any]:
    """Every block of the doc, in order, in one namespace (the current directory holds
    model.rnn)."""
    namespace: dict[str, Any] = {"__name__": "model_format_doc"}
    for code in doc_blocks():
        exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def client(module_server: ServerHandle) -> Iterator[Client]:
    with module_server.client(timeout=60) as c:
        yield c


@pytest.mark.parametrize(("cell", "layers", "dtype"), CASES)
def test_the_docs_numpy_and_onnx_recipes_match_predict_and_greedy_generate(
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cell: str,
    layers: int,
    dtype: str,
) -> None:
    session = client.create_session(TEXT, cell=cell, num_layers=layers, dtype=dtype, **MODEL)
    session.train(STEPS, report_every=STEPS).wait()
    monkeypatch.chdir(tmp_path)
    session.export("model.rnn", weights_only=dtype == "float32")
    predicted = session.predict(PROBE).loss
    greedy = session.generate(LENGTH, prime=PRIME, temperature=0)
    assert len(set(greedy)) >= 5, f"undertrained: greedy text {greedy!r}"

    doc = run_doc()

    assert doc["loss"](PROBE) == pytest.approx(predicted, abs=1e-4)
    assert doc["generate"](PRIME, LENGTH) == greedy
    assert doc["onnx_loss"](PROBE) == pytest.approx(predicted, abs=1e-4)
    assert doc["onnx_generate"](PRIME, LENGTH) == greedy
