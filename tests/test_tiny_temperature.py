"""Issue 9 item 10: a temperature between 0 and ~1e-39 behaves like greedy sampling.

1/temperature used to be folded into float32 weights: it overflowed to inf, the logits became
NaN and every draw fell on the alphabet's last character, even with top_k=1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

TEXT = "the quick brown fox jumps over the lazy dog. " * 8
TINY = [1e-45, 1e-42, 1e-39, 1e-38, 1e-30, 1e-20, 1e-12]  # float32 subnormal .. small normal


@pytest.fixture(scope="module")
def trained() -> Trainer:
    config = ModelConfig(
        hidden_size=48, seq_length=20, batch_size=4, learning_rate=0.01, optimizer="adam",
        reset_every=5, seed=3,
    )  # fmt: skip
    vocab = Vocab.from_text(TEXT)
    t = Trainer(config, vocab, vocab.encode(TEXT))
    for _ in range(200):
        t.step()
    return t


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiny_temperatures_sample_the_argmax(dtype: str) -> None:
    config = ModelConfig(
        hidden_size=48, seq_length=20, batch_size=4, learning_rate=0.01, optimizer="adam",
        dtype=dtype, seed=5,
    )  # fmt: skip
    vocab = Vocab.from_text(TEXT)
    t = Trainer(config, vocab, vocab.encode(TEXT))
    for _ in range(100):
        t.step()
    prime = vocab.encode("the lazy")
    greedy = np.concatenate(list(t.sample(prime, 80, temperature=0.0)))
    assert len(set(greedy.tolist())) > 1  # a real text, not one repeated id
    for temperature in TINY:
        for top_k in (0, 1, 3):
            drawn = np.concatenate(
                list(t.sample(prime, 80, temperature=temperature, top_k=top_k, seed=11))
            )
            assert np.array_equal(drawn, greedy), (temperature, top_k, vocab.decode(drawn))


def test_huge_weights_with_small_temperature_stay_greedy(trained: Trainer) -> None:
    """Large logits times a large 1/temperature overflow float32 even above 1e-39."""
    big = Trainer.from_state(*trained.state_dict())
    big.params["Why"][...] *= 1e30
    prime = big.vocab.encode("the")
    greedy = np.concatenate(list(big.sample(prime, 40, temperature=0.0)))
    drawn = np.concatenate(list(big.sample(prime, 40, temperature=1e-8, top_k=1, seed=1)))
    assert np.array_equal(drawn, greedy)


def test_ordinary_temperatures_draw_the_same_stream_as_before(trained: Trainer) -> None:
    """The fold is kept where it is safe, so a seed reproduces the same text as before."""
    prime = trained.vocab.encode("the")
    a = np.concatenate(list(trained.sample(prime, 200, temperature=0.8, top_k=5, seed=7)))
    b = np.concatenate(list(trained.sample(prime, 200, temperature=0.8, top_k=5, seed=7)))
    assert np.array_equal(a, b) and len(set(a.tolist())) > 3


@pytest.mark.timeout(60)
def test_generate_rpc_with_tiny_temperature_is_greedy(module_server: ServerHandle) -> None:
    with module_server.client() as client:
        s = client.create_session(TEXT, session_id="tiny-temp", seq_length=20)
        s.train(150).wait()  # to the end: sampling must see the final weights
        greedy = s.generate(60, prime="the ", temperature=0.0)
        assert len(set(greedy)) > 1
        for temperature in (1e-45, 1e-40, 1e-39, 1e-38):
            assert s.generate(60, prime="the ", temperature=temperature, top_k=1, seed=1) == greedy
            assert s.generate(60, prime="the ", temperature=temperature, seed=2) == greedy
