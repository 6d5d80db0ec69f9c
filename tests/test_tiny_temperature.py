"""Issue 9 item 10, issue 16 item 5: a temperature between 0 and ~1e-39 (float32), or down to
5e-324 (float64), behaves like greedy sampling, for every cell, dtype and depth.

1/temperature used to be folded into float32 weights: it overflowed to inf, the logits became
NaN and every draw fell on the alphabet's last character, even with top_k=1. The tanh RNN's
sampler got the fix while the gated and stacked models had their own copy of the draw and kept
the bug ("zzzz"); now every model feeds the one draw in sampler.py.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from rnnserve import Client
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

TEXT = "the quick brown fox jumps over the lazy dog. " * 8
TINY = [1e-45, 1e-42, 1e-39, 1e-38, 1e-30, 1e-20, 1e-12]  # float32 subnormal .. small normal
# The smallest float32 and float64 subnormals: 1/T overflows both dtypes at 5e-324.
SMALLEST = (1e-45, 5e-324)
# Every model the server hosts: the seed's tanh RNN (one layer) and cells.py's (the rest).
MODELS = list(itertools.product(("rnn", "lstm", "gru"), ("float32", "float64"), (1, 2)))


def _trained(steps: int, **settings: Any) -> Trainer:
    """A trainer on TEXT (hidden 48, window 20, batch 4, Adam 0.01 unless ``settings`` say
    otherwise) after ``steps`` updates."""
    config = ModelConfig(
        **{"hidden_size": 48, "seq_length": 20, "batch_size": 4, "learning_rate": 0.01,
           "optimizer": "adam", **settings}
    )  # fmt: skip
    vocab = Vocab.from_text(TEXT)
    t = Trainer(config, vocab, vocab.encode(TEXT))
    for _ in range(steps):
        t.step()
    return t


@pytest.fixture(scope="module")
def trained() -> Trainer:
    return _trained(200, reset_every=5, seed=3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiny_temperatures_sample_the_argmax(dtype: str) -> None:
    t = _trained(100, dtype=dtype, seed=5)
    vocab = t.vocab
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


def _model(client: Client, name: str, cell: str, dtype: str, layers: int) -> tuple[str, str]:
    """A small session of this model, trained a little; (its id, its greedy text)."""
    s = client.create_session(
        TEXT,
        session_id=f"{name}-{cell}-{dtype}-{layers}",
        hidden_size=16, seq_length=16, batch_size=2, learning_rate=0.01, optimizer="adam",
        cell=cell, dtype=dtype, num_layers=layers, seed=4,
    )  # fmt: skip
    s.train(60).wait()
    greedy = s.generate(40, prime="the ", temperature=0.0)
    return s.id, greedy


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("cell", "dtype", "layers"), MODELS, ids=["-".join(map(str, m)) for m in MODELS]
)
def test_every_model_is_greedy_at_the_smallest_temperatures(
    module_server: ServerHandle, cell: str, dtype: str, layers: int
) -> None:
    """Generate and Train's sample, through the server: at the smallest subnormals the text is
    the argmax text (it was the alphabet's last character, "zzzz", for gated/stacked models)."""
    with module_server.client() as client:
        session_id, _ = _model(client, "tiny", cell, dtype, layers)
        s = client.session(session_id)
        for temperature in SMALLEST:
            final = list(s.train(5, sample_length=40, sample_temperature=temperature,
                                 sample_prime="the "))[-1]  # fmt: skip
            greedy = s.generate(40, prime="the ", temperature=0.0)
            assert final.sample == "the " + greedy, (temperature, final.sample)
            for top_k, seed in ((0, 1), (1, 2), (3, 3)):
                drawn = s.generate(
                    40, prime="the ", temperature=temperature, top_k=top_k, seed=seed
                )
                assert drawn == greedy, (temperature, top_k, drawn)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_a_seed_reproduces_the_same_text_for_every_cell(
    module_server: ServerHandle, cell: str
) -> None:
    """Ordinary temperatures: the same seed gives the same text, another seed another text;
    top_k=1 is greedy at any temperature."""
    with module_server.client() as client:
        session_id, greedy = _model(client, "seed", cell, "float32", 2)
        s = client.session(session_id)
        for top_k in (0, 3):
            a = s.generate(200, prime="the ", temperature=1.5, top_k=top_k, seed=7)
            assert s.generate(200, prime="the ", temperature=1.5, top_k=top_k, seed=7) == a
            assert s.generate(200, prime="the ", temperature=1.5, top_k=top_k, seed=8) != a
        assert s.generate(40, prime="the ", temperature=2.0, top_k=1, seed=5) == greedy


@pytest.mark.parametrize(
    ("cell", "dtype", "layers"), MODELS, ids=["-".join(map(str, m)) for m in MODELS]
)
def test_the_stream_does_not_depend_on_the_chunk_size(cell: str, dtype: str, layers: int) -> None:
    """One uniform per character, drawn up front: Generate's chunking never changes the text."""
    t = _trained(20, hidden_size=16, cell=cell, dtype=dtype, num_layers=layers, seed=2)
    prime = t.vocab.encode("the")
    whole = np.concatenate(list(t.sample(prime, 300, temperature=0.9, top_k=4, seed=3)))
    for chunk_size in (1, 7, 256):
        chunks = t.sample(prime, 300, temperature=0.9, top_k=4, seed=3, chunk_size=chunk_size)
        assert np.array_equal(np.concatenate(list(chunks)), whole)
