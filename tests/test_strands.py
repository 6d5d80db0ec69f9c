"""Strands cover the whole corpus however it arrived (one CreateSession or create + appends)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import rnnserve.client
from rnnserve import Client
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(120)

CONFIG = ModelConfig(
    hidden_size=16, seq_length=10, batch_size=8, learning_rate=0.01, optimizer="adam", seed=3
)


def _text(n: int) -> str:
    """A corpus whose parts differ, so strands bunched in one part would train differently."""
    rng = np.random.default_rng(0)
    words = ["to be", "or not", "KING:", "QUEEN:", "thee", "thou", "hath", "\n", "lord", "my"]
    out: list[str] = []
    size = 0
    while size < n:
        part = size * 4 // n  # 4 regions with different word mixes
        w = words[(int(rng.integers(0, 6)) + 2 * part) % len(words)]
        out.append(w + " ")
        size += len(w) + 1
    return "".join(out)[:n]


def _gaps(trainer: Trainer) -> np.ndarray:
    """Distance from each strand's cursor to the next one's, around the cyclic corpus."""
    c = np.sort(trainer.cursors)
    return np.diff(np.append(c, c[0] + trainer.corpus_length))


def test_create_then_appends_is_the_same_trainer_as_one_create() -> None:
    text = _text(6000)
    vocab = Vocab.from_text(text)
    whole = Trainer(CONFIG, vocab, vocab.encode(text))
    pieces = Trainer(CONFIG, vocab, vocab.encode(text[:1000]))
    for start in range(1000, 6000, 1700):
        pieces.append(vocab.encode(text[start : start + 1700]))
    assert pieces.corpus_length == whole.corpus_length
    np.testing.assert_array_equal(pieces.cursors, whole.cursors)
    for _ in range(30):
        assert pieces.step().loss == whole.step().loss


def test_append_after_training_spreads_the_strands_over_the_new_corpus() -> None:
    text = _text(8000)
    vocab = Vocab.from_text(text)
    trainer = Trainer(CONFIG, vocab, vocab.encode(text[:1000]))
    for _ in range(25):  # strands move and wrap in the first 1000 characters
        trainer.step()
    trainer.append(vocab.encode(text[1000:]))
    L, B, T = trainer.corpus_length, CONFIG.batch_size, CONFIG.seq_length
    assert _gaps(trainer).max() <= L // B + T  # evenly spread, not bunched in the first 1000
    for _ in range(100):
        trainer.step()
    assert _gaps(trainer).max() <= L // B + 2 * T


def _losses(client: Client, session_id: str, text: str, steps: int) -> list[float]:
    session = client.create_session(
        text, session_id=session_id, hidden_size=16, seq_length=20, batch_size=8, seed=5
    )
    assert session.info().corpus_chars == len(text)
    session.train(steps, report_every=steps).wait()
    points = []
    with session.watch_loss(from_step=1) as stream:
        for point in stream:
            points.append(point.loss)
            if len(points) == steps:
                break
    return points


def test_a_session_built_by_create_and_appends_trains_like_one_built_in_one_call(
    module_server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _text(rnnserve.client.INLINE_TEXT_CHARS + 150_000)
    with module_server.client(timeout=60) as client:
        # The library sends the first INLINE_TEXT_CHARS inline and appends the rest.
        appended = _losses(client, "strands-appended", text, 40)
        monkeypatch.setattr(rnnserve.client, "INLINE_TEXT_CHARS", len(text))
        one_call = _losses(client, "strands-one-call", text, 40)
    # Same seed, same corpus, same strands: the same loss curve (float32 round-off at most).
    np.testing.assert_allclose(appended, one_call, rtol=1e-5)
