"""The Trainer with gated cells, layers and dropout: learning, exact resume, old checkpoints,
inference from a zero state, errors."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
import pytest
from rnnserve_server.engine.model_config import PRESETS, EngineError, ModelConfig
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab

TEXT = "the quick brown fox jumps over the lazy dog. " * 8
VARIANTS = [
    {"cell": "lstm"},
    {"cell": "gru"},
    {"cell": "rnn", "num_layers": 2},
    {"cell": "lstm", "num_layers": 2, "dropout": 0.25},
    {"cell": "gru", "num_layers": 3, "dropout": 0.1},
]


def _trainer(text: str = TEXT, **changes: Any) -> Trainer:
    base = ModelConfig(
        hidden_size=24, seq_length=10, batch_size=3, learning_rate=0.01, optimizer="adam"
    )
    vocab = Vocab.from_text(text)
    return Trainer(base.replace(**changes), vocab, vocab.encode(text))


def _roundtrip(trainer: Trainer) -> Trainer:
    """Through the same serialisation as a checkpoint (npz arrays, JSON meta)."""
    arrays, meta = trainer.state_dict()
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    buf.seek(0)
    with np.load(buf) as loaded:
        arrays = {k: loaded[k] for k in loaded.files}
    return Trainer.from_state(arrays, json.loads(json.dumps(meta)))


def _same(a: Trainer, b: Trainer) -> None:
    arrays_a, meta_a = a.state_dict()
    arrays_b, meta_b = b.state_dict()
    assert meta_a == meta_b
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        assert arrays_a[key].tobytes() == arrays_b[key].tobytes(), key


@pytest.mark.parametrize("changes", VARIANTS)
def test_learns_the_text_and_predicts_from_a_zero_state(changes: dict[str, Any]) -> None:
    trainer = _trainer(**changes, learning_rate=0.02)
    before = trainer.evaluate(trainer.corpus)
    for _ in range(200):
        trainer.step()
    after = trainer.evaluate(trainer.corpus)
    assert before > 3.0 and after < 0.25, (before, after)
    predicted, nats = trainer.predict(trainer.vocab.encode("quick brown fox"))
    got = trainer.vocab.decode(predicted)
    assert sum(a == b for a, b in zip(got, "uick brown fox ", strict=True)) >= 12, got
    assert nats > 0


@pytest.mark.parametrize("changes", VARIANTS)
def test_save_resume_is_bit_exact_with_dropout_and_carried_state(changes: dict[str, Any]) -> None:
    straight = _trainer(**changes, reset_every=3)
    for _ in range(12):
        straight.step()
    first = _trainer(**changes, reset_every=3)
    for _ in range(6):
        first.step()
    resumed = _roundtrip(first)
    for _ in range(6):
        resumed.step()
    _same(straight, resumed)
    assert resumed.hidden.any()  # the carried state (h and c) went through the checkpoint


@pytest.mark.parametrize("changes", VARIANTS)
def test_sampling_is_reproducible_and_leaves_training_alone(changes: dict[str, Any]) -> None:
    trainer = _trainer(**changes)
    for _ in range(40):
        trainer.step()
    before, _ = trainer.state_dict()
    prime = trainer.vocab.encode("the ")
    one = np.concatenate(list(trainer.sample(prime, 50, 0.8, seed=3, chunk_size=7)))
    two = np.concatenate(list(trainer.sample(prime, 50, 0.8, seed=3)))
    assert one.tolist() == two.tolist() and len(one) == 50
    greedy = trainer.vocab.decode(np.concatenate(list(trainer.sample(prime, 20, 0.0))))
    assert greedy.strip()
    after, _ = trainer.state_dict()
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)


def test_dropout_is_training_only() -> None:
    trainer = _trainer(cell="lstm", num_layers=2, dropout=0.5)
    for _ in range(20):
        trainer.step()
    ids = trainer.vocab.encode("the quick brown fox")
    assert trainer.evaluate(ids) == trainer.evaluate(ids)  # no masks drawn when scoring


def test_step_on_text_trains_a_gated_model() -> None:
    trainer = _trainer(cell="gru", num_layers=2, dropout=0.2)
    ids = trainer.vocab.encode("the lazy dog")
    first = trainer.step_on(ids).loss
    for _ in range(30):
        last = trainer.step_on(ids).loss
    assert last < first


def test_checkpoint_of_the_old_format_still_loads() -> None:
    """A state written before cells.py: no cell/num_layers/dropout, no dropout generator."""
    trainer = _trainer(reset_every=2)
    for _ in range(5):
        trainer.step()
    arrays, meta = trainer.state_dict()
    old_meta = json.loads(json.dumps(meta))
    for key in ("cell", "num_layers", "dropout"):
        del old_meta["config"][key]
    del old_meta["dropout_rng"]
    loaded = Trainer.from_state(arrays, old_meta)
    assert loaded.config == trainer.config
    for _ in range(5):
        trainer.step()
        loaded.step()
    _same(trainer, loaded)


def test_seed_presets_are_still_the_tanh_rnn() -> None:
    for name in ("notebook", "min-char-rnn"):
        config = PRESETS[name]
        assert (config.cell, config.num_layers, config.dropout) == ("rnn", 1, 0.0)
    # The default became two GRU layers with dropout (chosen on three corpora: BENCHMARKS.md).
    default = PRESETS["default"]
    assert (default.cell, default.num_layers, default.dropout) == ("gru", 2, 0.25)
    trainer = _trainer()
    assert set(trainer.params) == {"Wxh", "Whh", "Why", "bh", "by"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cell": "transformer"}, "cell must be one of rnn, lstm, gru"),
        ({"num_layers": 0}, "num_layers must be an integer >= 1"),
        ({"cell": "lstm", "num_layers": 2, "dropout": 1.0}, "dropout must be a number in [0, 1)"),
        ({"cell": "lstm", "dropout": 0.5}, "dropout applies between layers"),
    ],
)
def test_bad_cell_settings_are_refused_with_the_field_named(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(EngineError, match=re.escape(message)):
        _trainer(**changes)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_optimizer_and_dtype_resumes_exactly(optimizer: str, dtype: str) -> None:
    changes: dict[str, Any] = {
        "cell": "gru",
        "num_layers": 2,
        "dropout": 0.3,
        "optimizer": optimizer,
        "dtype": dtype,
        "clip": 0.5,  # small enough that clipping is active
    }
    straight = _trainer(**changes)
    for _ in range(8):
        straight.step()
    first = _trainer(**changes)
    for _ in range(4):
        first.step()
    resumed = _roundtrip(first)
    for _ in range(4):
        resumed.step()
    _same(straight, resumed)
