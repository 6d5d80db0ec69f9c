"""Trainer behaviour: the seed case, exact resume, reproducibility, errors, sampling."""

from __future__ import annotations

import io
import itertools
import json
import math
from typing import Any

import numpy as np
import pytest
from rnnserve_server.engine.model_config import PRESETS, DivergedError, EngineError, ModelConfig
from rnnserve_server.engine.rnn.kernels import forward_hidden, loss_and_grads, param_shapes
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import UnknownCharactersError, Vocab

TEXT = "the quick brown fox jumps over the lazy dog. " * 8


def _trainer(text: str = TEXT, **changes: Any) -> Trainer:
    base = ModelConfig(
        hidden_size=32, seq_length=10, batch_size=3, learning_rate=0.01, optimizer="adam"
    )
    vocab = Vocab.from_text(text)
    return Trainer(base.replace(**changes), vocab, vocab.encode(text))


def _state_equal(a: Trainer, b: Trainer) -> None:
    arrays_a, meta_a = a.state_dict()
    arrays_b, meta_b = b.state_dict()
    assert meta_a == meta_b
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        x, y = arrays_a[key], arrays_b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key  # bit for bit


# -- the notebook seed --------------------------------------------------------------------------


def test_seed_case_learns_hallo_within_30_updates() -> None:
    vocab = Vocab.from_text("Hallo")
    ids = vocab.encode("Hallo")
    trainer = Trainer(PRESETS["notebook"], vocab, ids)
    losses = []
    learned_at = None
    for _ in range(30):
        losses.append(trainer.step().loss)
        predicted, _ = trainer.predict(ids)
        if learned_at is None and vocab.decode(predicted) == "alloH":
            learned_at = trainer.step_count
    assert learned_at is not None and learned_at <= 30
    assert losses[-1] < losses[0] - 0.5
    assert all(b < a for a, b in itertools.pairwise(losses))  # falls every step
    predicted, nats = trainer.predict(ids)
    assert vocab.decode(predicted) == "alloH" and nats < 0.5


# -- exactness and reproducibility --------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_resume_is_bit_exact(optimizer: str, dtype: str) -> None:
    cfg: dict[str, Any] = {
        "optimizer": optimizer,
        "dtype": dtype,
        "reset_every": 4,
        "learning_rate": 0.05,
    }
    straight = _trainer(**cfg)
    for _ in range(20):
        straight.step()

    first = _trainer(**cfg)
    for _ in range(10):
        first.step()
    arrays, meta = first.state_dict()
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    buf.seek(0)
    with np.load(buf) as loaded:
        arrays2 = {k: loaded[k] for k in loaded.files}
    resumed = Trainer.from_state(arrays2, json.loads(json.dumps(meta)))
    for _ in range(10):
        resumed.step()
    assert resumed.step_count == 20
    _state_equal(straight, resumed)


_STATE = {"_theta", "hidden", "cursors", "_corpus", "_offsets", "mem", "m", "v"}


def _scratch_bytes(t: Trainer) -> int:
    """Bytes of the arrays a trainer, its optimizer and its workspace hold beyond its state."""
    owners = [t, t.optimizer] + ([t._ws] if t._ws is not None else [])
    return sum(
        a.nbytes
        for owner in owners
        for name, a in vars(owner).items()
        if isinstance(a, np.ndarray) and name not in _STATE
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_release_scratch_frees_update_buffers_and_changes_nothing(optimizer: str) -> None:
    cfg: dict[str, Any] = {"optimizer": optimizer, "reset_every": 4, "learning_rate": 0.05}
    kept, released = _trainer(**cfg), _trainer(**cfg)
    assert _scratch_bytes(released) == 0  # nothing allocated before the first update
    for i in range(12):
        kept.step()
        released.step()
        assert _scratch_bytes(released) > 0
        if i % 3 == 0:
            kept.step_on(kept.vocab.encode("the lazy fox"))
            released.step_on(released.vocab.encode("the lazy fox"))
        released.release_scratch()
        assert _scratch_bytes(released) == 0
    _state_equal(kept, released)


def test_same_seed_same_weights_other_seed_differs() -> None:
    a, b, c = _trainer(seed=7), _trainer(seed=7), _trainer(seed=8)
    for t in (a, b, c):
        for _ in range(5):
            t.step()
    _state_equal(a, b)
    assert not np.array_equal(a.params["Whh"], c.params["Whh"])


def test_init_like_the_seed() -> None:
    t = _trainer(hidden_size=100)
    assert t.params["Wxh"].dtype == np.float32
    assert abs(float(t.params["Whh"].std()) - 0.01) < 1e-3
    assert not t.params["bh"].any() and not t.params["by"].any()
    V = t.vocab.size
    assert t.parameter_count == sum(int(np.prod(s)) for s in param_shapes(V, 100).values())


def test_batch_mean_over_strands() -> None:
    """B identical strands give the loss and gradients of one (loss is a mean over strands)."""
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s) * 0.1 for k, s in param_shapes(5, 4).items()}
    x, y = rng.integers(0, 5, (1, 6)), rng.integers(0, 5, (1, 6))
    h0 = rng.standard_normal((1, 4)) * 0.5
    loss1, g1, _ = loss_and_grads(params, x, y, h0)
    g1 = {k: v.copy() for k, v in g1.items()}
    loss3, g3, _ = loss_and_grads(params, np.repeat(x, 3, 0), np.repeat(y, 3, 0), h0.repeat(3, 0))
    assert loss3 == pytest.approx(loss1, rel=1e-12)
    for k in g1:
        np.testing.assert_allclose(g3[k], g1[k], rtol=1e-10, atol=1e-14)


# -- the corpus feed ----------------------------------------------------------------------------


def test_corpus_is_kept_in_the_smallest_id_dtype_and_saved_as_int32() -> None:
    t = _trainer()
    assert t.corpus.dtype == np.uint8
    t.append(t.vocab.encode("lazy fox"))
    assert t.vocab.decode(t.corpus[-8:]) == "lazy fox" and t.corpus.dtype == np.uint8
    arrays, _ = t.state_dict()
    assert arrays["corpus"].dtype == np.int32  # the checkpoint format is unchanged
    assert np.array_equal(arrays["corpus"], t.corpus)
    wide = "".join(chr(0x4E00 + i) for i in range(300)) * 2  # 300 characters: uint16
    assert _trainer(wide).corpus.dtype == np.uint16


def test_strands_walk_the_cyclic_corpus_and_restart() -> None:
    text = "abcdefghij" * 3  # L = 30
    t = _trainer(text, seq_length=7, batch_size=3, optimizer="sgd")
    assert t.cursors.tolist() == [0, 10, 20]
    t.step()
    assert t.cursors.tolist() == [7, 17, 27]
    t.step()  # strand 2 would pass the end: restarts at 0
    assert t.cursors.tolist() == [14, 24, 7]
    assert t.step_count == 2 and t.windows == 2


def test_append_extends_the_corpus() -> None:
    t = _trainer("abcabcabcabc", seq_length=4, batch_size=1)
    t.step()
    t.append(t.vocab.encode("cab" * 1000))
    assert t.corpus_length == 12 + 3000
    for _ in range(10):
        t.step()
    assert t.cursors.tolist() == [44]
    with pytest.raises(EngineError):
        t.append(np.array([0, 99]))


def test_step_on_leaves_the_feed_alone() -> None:
    t = _trainer()
    t.step()
    cursors, hidden = t.cursors.copy(), t.hidden.copy()
    r = t.step_on(t.vocab.encode("the dog"))
    assert r.step == 2 and r.chars == 6 and r.loss > 0 and r.grad_norm > 0
    assert np.array_equal(t.cursors, cursors) and np.array_equal(t.hidden, hidden)
    with pytest.raises(EngineError, match="2 characters"):
        t.step_on(t.vocab.encode("t"))


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a", "ab"])
def test_degenerate_corpus(text: str) -> None:
    vocab = Vocab.from_text(text)
    trainer = Trainer(PRESETS["min-char-rnn"], vocab, vocab.encode(text))
    with pytest.raises(EngineError, match="seq_length"):
        trainer.step()


def test_corpus_shorter_than_window() -> None:
    """A trainer may hold too little text to train on (a weights-only import holds none): it
    refuses to step, naming the window and AppendText, until text is appended."""
    vocab = Vocab.from_text("hello world")
    trainer = Trainer(PRESETS["min-char-rnn"], vocab, vocab.encode("hello world"))
    with pytest.raises(EngineError, match="seq_length=25"):
        trainer.check_trainable()
    empty = Trainer(PRESETS["notebook"], vocab, vocab.encode(""))
    with pytest.raises(EngineError, match=r"0 character.*AppendText"):
        empty.step()
    assert empty.step_on(vocab.encode("hello")).step == 1  # text given: no corpus needed
    empty.append(vocab.encode("hello world"))
    assert empty.step().step == 2


def test_unknown_characters_in_later_text() -> None:
    t = _trainer()
    with pytest.raises(UnknownCharactersError, match="'Z'"):
        t.step_on(t.vocab.encode("the Zebra"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 0),
        ("seq_length", -1),
        ("batch_size", 1.5),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("clip", -1.0),
        ("optimizer", "rmsprop"),
        ("dtype", "float16"),
        ("reset_every", -2),
        ("seed", -1),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    cfg = PRESETS["default"].replace(**{field: value})
    with pytest.raises(EngineError, match=field):
        cfg.validate()


def test_config_dict_round_trip() -> None:
    for cfg in PRESETS.values():
        cfg.validate()
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(EngineError, match="bogus"):
        ModelConfig.from_dict({**PRESETS["default"].to_dict(), "bogus": 1})


def test_notebook_and_min_char_rnn_presets() -> None:
    nb, mc = PRESETS["notebook"], PRESETS["min-char-rnn"]
    assert (nb.hidden_size, nb.seq_length, nb.batch_size, nb.optimizer) == (100, 5, 1, "sgd")
    assert (nb.learning_rate, nb.clip) == (0.1, 5.0)
    assert (mc.hidden_size, mc.seq_length, mc.batch_size, mc.optimizer) == (100, 25, 1, "adagrad")
    assert mc.learning_rate == 0.1


def test_huge_learning_rate_diverges_without_changing_anything() -> None:
    t = _trainer(optimizer="sgd", learning_rate=1e38)  # float32: an update overflows soon
    for _ in range(10):
        arrays, meta = t.state_dict()
        try:
            t.step()
        except DivergedError as exc:
            assert "learning rate" in str(exc)
            break
    else:
        pytest.fail("no DivergedError")
    after, meta_after = t.state_dict()
    assert meta_after == meta
    assert all(after[k].tobytes() == arrays[k].tobytes() for k in arrays)
    assert all(np.isfinite(t.params[k]).all() for k in t.params)


def test_non_finite_loss_diverges_without_changing_anything() -> None:
    t = _trainer(optimizer="adagrad")
    t.step()
    t.params["by"][0] = np.inf  # poisoned weights: the loss is NaN
    arrays, meta = t.state_dict()
    with pytest.raises(DivergedError):
        t.step()
    after, meta_after = t.state_dict()
    assert meta_after == meta
    assert all(after[k].tobytes() == arrays[k].tobytes() for k in arrays)


def test_from_state_rejects_mismatched_arrays() -> None:
    arrays, meta = _trainer().state_dict()
    arrays["Whh"] = arrays["Whh"][:-1]
    with pytest.raises(EngineError, match="Whh"):
        Trainer.from_state(arrays, meta)
    del arrays["Whh"]
    with pytest.raises(EngineError, match="Whh"):
        Trainer.from_state(arrays, meta)


# -- evaluation and sampling --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained() -> Trainer:
    """A small model trained with reset_every on a repetitive text."""
    t = _trainer(hidden_size=64, seq_length=20, batch_size=4, learning_rate=0.01, reset_every=5)
    for _ in range(300):
        t.step()
    return t


def test_evaluate_from_zero_state(trained: Trainer) -> None:
    ids = trained.vocab.encode(TEXT[:200])
    nats = trained.evaluate(ids)
    assert nats < 0.3  # the text is almost deterministic after a few characters
    assert trained.evaluate(ids[:2]) > 0
    with pytest.raises(EngineError):
        trained.evaluate(ids[:1])
    # a long text is scored in chunks, with the same result as scoring it whole
    long = trained.vocab.encode(TEXT * 12)
    assert trained.evaluate(long) == pytest.approx(nats, abs=0.1)


def test_greedy_sample_from_zero_state_continues_the_text(trained: Trainer) -> None:
    vocab = trained.vocab
    text = vocab.decode(np.concatenate(list(trained.sample(vocab.encode("the quick"), 40, 0.0))))
    assert text.startswith(" brown fox jumps over the lazy dog")
    empty = list(trained.sample(np.zeros(0, dtype=np.int32), 30, temperature=0.0))
    assert vocab.decode(np.concatenate(empty)).startswith("he quick brown")  # after corpus[0]


def test_sample_reproducible_and_chunked(trained: Trainer) -> None:
    prime = trained.vocab.encode("the ")
    a = np.concatenate(list(trained.sample(prime, 300, 1.5, seed=3, chunk_size=7)))
    b_chunks = list(trained.sample(prime, 300, 1.5, seed=3))
    assert [len(c) for c in b_chunks] == [256, 44]
    assert np.array_equal(a, np.concatenate(b_chunks))
    c = np.concatenate(list(trained.sample(prime, 300, 1.5, seed=4)))
    assert not np.array_equal(a, c)
    assert list(trained.sample(prime, 0)) == []


def test_sample_never_touches_training_state(trained: Trainer) -> None:
    arrays, meta = trained.state_dict()
    gen = trained.sample(trained.vocab.encode("the"), 50, seed=1)
    next(gen)
    after, meta_after = trained.state_dict()
    assert meta == meta_after and all(np.array_equal(after[k], arrays[k]) for k in arrays)


def _logits_along(t: Trainer, ids: np.ndarray) -> np.ndarray:
    """Model logits (T, V) after each prefix of ``ids``, from a zero state (float64)."""
    p = {k: v.astype(np.float64) for k, v in t.params.items()}
    hs, _ = forward_hidden(p, ids, np.zeros(p["Whh"].shape[0]))
    return np.asarray(hs @ p["Why"].T + p["by"])


def test_temperature_zero_is_greedy_and_top_k_is_respected(trained: Trainer) -> None:
    prime = trained.vocab.encode("the lazy")
    greedy = np.concatenate(list(trained.sample(prime, 60, temperature=0.0, seed=1)))
    top1 = np.concatenate(list(trained.sample(prime, 60, temperature=2.0, top_k=1, seed=2)))
    assert np.array_equal(greedy, top1)
    logits = _logits_along(trained, np.concatenate([prime, greedy]))[len(prime) - 1 : -1]
    assert np.array_equal(greedy, logits.argmax(axis=1))

    k = 3
    drawn = np.concatenate(list(trained.sample(prime, 400, temperature=5.0, top_k=k, seed=5)))
    logits = _logits_along(trained, np.concatenate([prime, drawn]))[len(prime) - 1 : -1]
    rank = (logits > logits[np.arange(len(drawn)), drawn][:, None]).sum(axis=1)
    assert rank.max() < k  # always among the k most likely
    assert rank.max() == k - 1  # and temperature 5 does reach the k-th


def test_sample_draws_the_softmax_distribution(trained: Trainer) -> None:
    prime = trained.vocab.encode("the")
    temperature = 3.0
    logits = _logits_along(trained, prime)[-1] / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    n = 4000
    first = [int(next(iter(trained.sample(prime, 1, temperature, seed=s)))[0]) for s in range(n)]
    counts = np.bincount(first, minlength=p.shape[0])
    expected = p * n
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected + 1) + 2)


def test_sample_argument_errors(trained: Trainer) -> None:
    prime = trained.vocab.encode("the")
    for kwargs in ({"temperature": -1.0}, {"top_k": -1}, {"chunk_size": 0}):
        with pytest.raises(EngineError):
            trained.sample(prime, 10, **kwargs)
    with pytest.raises(EngineError, match="length"):
        trained.sample(prime, -1)


def test_predict_errors(trained: Trainer) -> None:
    with pytest.raises(EngineError, match="empty"):
        trained.predict(np.zeros(0, dtype=np.int32))


def test_huge_finite_weights_give_a_finite_loss() -> None:
    # float32 weights near float32's largest value: the logits (and pre-activations) overflow
    # float32, and inf - inf used to make the loss NaN.
    t = _trainer(hidden_size=16)
    rng = np.random.default_rng(0)
    big = np.float32(3e38)
    for p in t.params.values():
        p[...] = np.where(rng.random(p.shape) < 0.5, -big, big)
    ids = t.vocab.encode(TEXT[:60])
    # Reference in float64, where nothing overflows: h_t = tanh(...), log-softmax with the max.
    p64 = {k: v.astype(np.float64) for k, v in t.params.items()}
    hs, _ = forward_hidden(p64, ids, np.zeros(16))
    logits = hs @ p64["Why"].T + p64["by"]  # (T, V)
    top = logits.max(axis=1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    targets = np.roll(ids, -1)
    expected = float(-logp[np.arange(len(ids)), targets].mean())
    assert math.isfinite(expected) and expected > 1e30

    argmax, nats = t.predict(ids)
    assert math.isfinite(nats) and nats == pytest.approx(expected, rel=1e-9)
    assert np.array_equal(argmax, logits.argmax(axis=1))
    evaluated = t.evaluate(ids)
    want = float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
    assert math.isfinite(evaluated) and evaluated == pytest.approx(want, rel=1e-9)
