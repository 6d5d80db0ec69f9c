"""The trainer of rnnserve: a character-level model (the seed's tanh RNN, rnn/kernels.py, or
a gated/stacked one, cells/) trained by truncated BPTT over a batch of strands of a corpus.

rnn/kernels.py has the equations and shapes. Losses are *reported* as mean nats per character.
Pure numpy: no grpc, no I/O. The ``Trainer`` is not thread-safe; the session layer serialises
the calls that mutate it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import cells, trainer_state
from .arrays import flat_size, split
from .inference import Inference, check_ids
from .model_config import MUTABLE_FIELDS, DivergedError, EngineError, ModelConfig, StepResult
from .optimizers import Optimizer, make_optimizer
from .rnn.kernels import Workspace, init_params, loss_and_grads, param_shapes
from .vocab import Vocab


def model_shapes(config: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Shape of each weight array of ``config``'s model over an alphabet of ``vocab_size``."""
    if config.stacked:
        return cells.Spec(config.cell, vocab_size, config.hidden_size, config.num_layers).shapes()
    return param_shapes(vocab_size, config.hidden_size)


def parameter_total(config: ModelConfig, vocab_size: int) -> int:
    """Number of weights of ``config``'s model over an alphabet of ``vocab_size``."""
    return flat_size(model_shapes(config, vocab_size))


def validation_split(length: int, fraction: float) -> int:
    """How many characters at the end of a corpus of ``length`` are held out: the tail of
    ``fraction`` of it, at least 2 (one prediction) when ``fraction`` is positive."""
    if fraction <= 0 or length <= 0:
        return 0
    return max(2, int(length * fraction))


def _id_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer dtype that holds ids 0 .. vocab_size - 1."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


class Trainer:
    """Model + optimizer + corpus feed (strands, cursors, carried hidden states).

    The corpus is cyclic, as in the notebook: the target after the last character is the first.
    Strand b starts at offset ``b * L // B``; each corpus step trains every strand on its next
    window of ``seq_length`` characters, carrying its hidden state from window to window. A
    strand whose next window would run past the end restarts at 0 with a zero state, and every
    ``reset_every`` windows all carried states are zeroed, so the model also works from a zero
    state (which is how it is evaluated and sampled). AppendText re-spreads the strands over
    the grown corpus (``append``). ``config.cell`` / ``num_layers`` other than the seed's
    one-layer ``rnn`` use cells/'s model; the carried state is then h (and c) of every layer,
    and dropout masks come from the trainer's own checkpointed generator. Not thread-safe.
    """

    def __init__(self, config: ModelConfig, vocab: Vocab, corpus: np.ndarray) -> None:
        """EngineError for a bad config. The corpus may be too short to train on, even empty
        (a weights-only import has no text): ``step`` refuses until there is enough."""
        config.validate()
        self.config = config
        self.vocab = vocab
        ids = check_ids(corpus, vocab.size, "corpus")
        # (capacity,) the first corpus_length entries are used; in the smallest unsigned dtype
        # that holds every id (uint8 up to 256 characters): 4x less memory than int32.
        self._corpus = ids.astype(_id_dtype(vocab.size))
        self.corpus_length = int(ids.shape[0])
        self.step_count = 0  # updates applied
        self.windows = 0  # corpus steps applied (drives reset_every)
        self.dtype = np.dtype(config.dtype)
        V, H, B = vocab.size, config.hidden_size, config.batch_size
        rng = np.random.default_rng(config.seed)
        # None: the seed's one-layer tanh RNN (this module); else a cells/ model.
        self._spec = cells.Spec(config.cell, V, H, config.num_layers) if config.stacked else None
        state_size = H
        if self._spec is None:
            self._shapes = param_shapes(V, H)
            self._theta, self.params = init_params(V, H, rng, config.dtype)  # (P,), named views
        else:
            self._shapes = self._spec.shapes()
            self._theta, self.params = cells.init_stack(self._spec, rng, config.dtype)
            state_size = self._spec.state_size
        # Predictions, scores and samples on these weights (inference.py).
        self.inference = Inference(self._spec, self.params, V)
        # Draws the dropout masks; its state is checkpointed so a resumed trainer draws the same.
        self.dropout_rng = np.random.default_rng([config.seed, 1])
        self.parameter_count = int(self._theta.shape[0])
        self._optimizer: Optimizer = make_optimizer(
            config.optimizer, self.parameter_count, config.learning_rate, self.dtype
        )
        self.hidden = np.zeros((B, state_size), dtype=self.dtype)  # carried state per strand
        self.cursors = (np.arange(B, dtype=np.int64) * self.train_length) // B  # (B,)
        self._offsets = np.arange(config.seq_length + 1, dtype=np.int64)  # (T+1,)
        # Scratch used only during an update, allocated by the first one and freed by
        # release_scratch(): with it an idle trainer would be ~2.5x its weights + state.
        self._grad: np.ndarray | None = None  # (P,) gradients
        self._grads: dict[str, np.ndarray] = {}  # named views into _grad
        self._proposed: np.ndarray | None = None  # (P,) parameters after a proposed update
        self._ws: Workspace | cells.StackWorkspace | None = None  # buffers of a corpus window

    # -- helpers -----------------------------------------------------------------------------

    def check_trainable(self) -> None:
        """EngineError unless the corpus, without its held-out tail, holds a training window:
        at least max(2, seq_length) characters."""
        held, train = self.validation_length, self.train_length
        if train < 2 or train < self.config.seq_length:
            extra = (
                f" after holding out {held} for validation (validation_fraction="
                f"{self.config.validation_fraction:g})"
                if held
                else ""
            )
            raise EngineError(
                f"the text has {self.corpus_length} character(s){extra}; training needs at "
                f"least max(2, seq_length={self.config.seq_length}): give more text (AppendText "
                "adds to a session's text) or a smaller seq_length"
            )

    def _check_ids(self, ids: np.ndarray, what: str) -> np.ndarray:
        """``ids`` as a 1-D int32 array of valid ids; EngineError otherwise."""
        return self.inference.check_ids(ids, what)

    @property
    def corpus(self) -> np.ndarray:
        """The corpus ids (a read-only view; uint8, uint16 or int32 by vocabulary size)."""
        view = self._corpus[: self.corpus_length]
        view.flags.writeable = False
        return view

    @property
    def validation_length(self) -> int:
        """Characters held out at the end of the corpus (0 without a validation split)."""
        return validation_split(self.corpus_length, self.config.validation_fraction)

    @property
    def train_length(self) -> int:
        """Characters trained on: the corpus without its held-out tail."""
        return self.corpus_length - self.validation_length

    # -- inference (on the current weights, from a zero state; inference.py) ------------------

    def predict(self, ids: np.ndarray) -> tuple[np.ndarray, float]:
        """Inference.predict: the notebook's predict (most likely next ids, mean nats)."""
        return self.inference.predict(ids)

    def evaluate(self, ids: np.ndarray) -> float:
        """Inference.evaluate: mean nats per character of ``ids[1:]`` after ``ids[:-1]``."""
        return self.inference.evaluate(ids)

    def validation_loss(self) -> float | None:
        """Mean nats per character over the held-out tail (Inference.held_out_loss); None
        without a validation split."""
        held = self.validation_length
        if held < 2:
            return None
        tail = self._corpus[self.corpus_length - held : self.corpus_length].astype(np.int32)
        return self.inference.held_out_loss(tail)

    def sample(
        self,
        prime: np.ndarray,
        length: int,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chunk_size: int = 256,
    ) -> Iterator[np.ndarray]:
        """Generate ``length`` ids after ``prime``, yielded in int32 chunks of ``chunk_size``.

        From a zero state, the hidden state is warmed on ``prime`` (empty prime: ``corpus[0]`` is
        the first input, and is not yielded); then each id is drawn from
        softmax(y / temperature) restricted to the ``top_k`` most likely ids (0 = all).
        Temperature 0 takes the argmax. Uses its own Generator seeded with ``seed`` (same seed,
        same weights -> same text) and a snapshot of the weights taken now, so it never touches
        the training state. Arguments are checked now (EngineError), not at the first chunk.
        """
        first = self._corpus[:1]
        return self.inference.sample(prime, length, temperature, top_k, seed, chunk_size, first)

    @property
    def optimizer(self) -> Optimizer:
        """The update rule and its state."""
        return self._optimizer

    def release_scratch(self) -> None:
        """Free what only an update uses (gradients, the proposed weights, the optimizer's
        staging and scratch, the window workspace); the next step allocates it again, with
        bit-identical results. The session layer calls this when the trainer goes idle."""
        self._grad = self._proposed = self._ws = None
        self._grads = {}
        self._optimizer.release_scratch()

    def _gradient_buffers(self) -> dict[str, np.ndarray]:
        """Named views of the flat gradient buffer (allocated if released)."""
        if self._grad is None:
            self._grad = np.empty_like(self._theta)  # every entry is written by a backward pass
            self._grads = split(self._grad, self._shapes)
        return self._grads

    def _forward_backward(
        self, inputs: np.ndarray, targets: np.ndarray, state: np.ndarray, *, corpus: bool
    ) -> tuple[float, np.ndarray]:
        """Loss and gradients (into the gradient buffer) of one window of (B, T) ids from
        ``state``; returns (loss, final state). Corpus windows reuse one workspace; dropout
        masks come from the trainer's own generator (restored if the update fails)."""
        grads = self._gradient_buffers()
        B, T = inputs.shape
        if self._spec is None:
            ws = None
            if corpus:
                if self._ws is None:
                    H, V = self.config.hidden_size, self.vocab.size
                    self._ws = Workspace(T, B, H, V, self.dtype)
                ws = self._ws
            assert ws is None or isinstance(ws, Workspace)
            loss, _, last = loss_and_grads(self.params, inputs, targets, state, grads=grads, ws=ws)
            return loss, last
        stack_ws = None
        if corpus:
            if self._ws is None:
                self._ws = cells.StackWorkspace(self._spec, T, B, self.dtype)
            stack_ws = self._ws
        assert stack_ws is None or isinstance(stack_ws, cells.StackWorkspace)
        masks = cells.dropout_masks(
            self._spec, self.config.dropout, T, B, self.dropout_rng, self.dtype
        )
        return cells.loss_and_grads(
            self._spec, self.params, inputs, targets, state, grads, stack_ws, masks
        )

    def _apply(self, loss: float) -> float:
        """Clip and apply the gradient in ``self._grad``; return its pre-clip norm.

        DivergedError (and nothing changed) if the loss, the gradient or the result is not
        finite.
        """
        g = self._grad
        assert g is not None, "_apply runs after a backward pass filled the gradients"
        if self._proposed is None:
            self._proposed = np.empty_like(self._theta)
        grad_norm = math.sqrt(float(np.dot(g, g)))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise DivergedError(
                f"the loss ({loss}) or gradient norm ({grad_norm}) is not finite; the update "
                "was not applied (the learning rate is probably too high)"
            )
        clip = self.dtype.type(self.config.clip)
        np.clip(g, -clip, clip, out=g)
        with np.errstate(all="ignore"):
            self._optimizer.propose(self._theta, g, self._proposed)
        if not np.isfinite(self._proposed).all():
            raise DivergedError(
                "the update would make weights non-finite; it was not applied "
                "(the learning rate is probably too high)"
            )
        np.copyto(self._theta, self._proposed)
        self._optimizer.commit()
        self.step_count += 1
        return grad_norm

    # -- training ----------------------------------------------------------------------------

    def append(self, ids: np.ndarray) -> None:
        """Add ``ids`` (1-D) to the end of the corpus and re-spread the strands over it.

        Each strand keeps how far it has come since its start ``b * L // B`` and moves to the
        same distance from its start in the longer corpus, so the strands cover the whole
        corpus however it arrived (left where they were, they would all sit in the first
        chunk and move through it as a bunch). A strand that moves has its carried state
        zeroed (the state belonged to other text). Before any corpus step every strand is at
        its start, so create + appends is exactly the same trainer as one create.
        """
        new = self._check_ids(ids, "text")
        n = new.shape[0]
        old_length, old_train = self.corpus_length, self.train_length
        need = old_length + n
        if need > self._corpus.shape[0]:
            grown = np.empty(max(need, 2 * self._corpus.shape[0]), dtype=self._corpus.dtype)
            grown[:old_length] = self._corpus[:old_length]
            self._corpus = grown
        self._corpus[old_length:need] = new
        self.corpus_length = need
        self._respread(old_train)

    def _respread(self, old_length: int) -> None:
        """Move each strand to its place in the trained part (``train_length``) of the corpus,
        which was ``old_length`` long."""
        B, L = self.config.batch_size, self.train_length
        strands = np.arange(B, dtype=np.int64)
        progress = (self.cursors - strands * old_length // B) % max(old_length, 1)  # (B,)
        cursors = (strands * L // B + progress) % L  # (B,)
        moved = cursors != self.cursors
        if moved.any():
            self.hidden = np.where(moved[:, None], self.dtype.type(0), self.hidden)
            self.cursors = cursors

    def step(self) -> StepResult:
        """One update on the next window of every strand.

        DivergedError leaves weights, optimizer state, cursors and hidden states untouched;
        EngineError (check_trainable) when the corpus is shorter than a window.
        """
        self.check_trainable()
        T, L = self.config.seq_length, self.train_length
        B = self.config.batch_size
        hidden = self.hidden
        reset = self.config.reset_every
        if reset and self.windows % reset == 0:
            hidden = np.zeros_like(hidden)
        cursors = self.cursors
        over = cursors + T > L  # (B,) strands whose window would pass the end restart at 0
        if over.any():
            cursors = np.where(over, 0, cursors)
            hidden = np.where(over[:, None], self.dtype.type(0), hidden)
        idx = cursors[:, None] + self._offsets  # (B, T+1)
        if int(cursors.max()) + T >= L:
            idx %= L  # only the very last target can wrap: cyclic corpus
        window = self._corpus[idx]  # (B, T+1)
        rng_state = self.dropout_rng.bit_generator.state
        try:
            with np.errstate(all="ignore"):  # non-finite values are reported as DivergedError
                loss, h_last = self._forward_backward(
                    window[:, :-1], window[:, 1:], hidden, corpus=True
                )
            grad_norm = self._apply(loss)
        except DivergedError:
            self.dropout_rng.bit_generator.state = rng_state
            raise
        self.hidden = h_last
        self.cursors = cursors + T
        self.windows += 1
        return StepResult(self.step_count, loss / T, grad_norm, B * T)

    def step_on(self, ids: np.ndarray) -> StepResult:
        """One update on the sequence ``ids`` (>= 2 ids) from a zero state: inputs ids[:-1],
        targets ids[1:], one BPTT window. The corpus feed (cursors, carried states) is untouched.
        """
        seq = self._check_ids(ids, "text")
        if seq.shape[0] < 2:
            raise EngineError("text must have at least 2 characters to train on")
        h0 = np.zeros((1, self.hidden.shape[1]), dtype=self.dtype)
        rng_state = self.dropout_rng.bit_generator.state
        try:
            with np.errstate(all="ignore"):  # non-finite values are reported as DivergedError
                loss, _ = self._forward_backward(seq[None, :-1], seq[None, 1:], h0, corpus=False)
            grad_norm = self._apply(loss)
        except DivergedError:
            self.dropout_rng.bit_generator.state = rng_state
            raise
        T = seq.shape[0] - 1
        return StepResult(self.step_count, loss / T, grad_norm, T)

    def reconfigure(self, **changes: Any) -> None:
        """Change the settings named in MUTABLE_FIELDS (EngineError for others or bad values).

        A new optimizer starts with fresh state; a new learning rate keeps the optimizer's
        state (Adagrad's sums, Adam's moments).
        """
        fixed = sorted(set(changes) - set(MUTABLE_FIELDS))
        if fixed:
            raise EngineError(f"{', '.join(fixed)} can't change on an existing trainer")
        config = self.config.replace(**changes)
        config.validate()
        old = self._optimizer
        optimizer = make_optimizer(
            config.optimizer, self.parameter_count, config.learning_rate, self.dtype
        )
        if config.optimizer == old.name:
            optimizer.load_state(old.state_arrays(), old.state_meta())
        self._optimizer = optimizer
        self.config = config
        self.release_scratch()  # the old optimizer's staging buffers go with it

    def set_learning_rate(self, learning_rate: float) -> None:
        """Update with ``learning_rate`` from now on (a job's schedule); config keeps the peak."""
        if self._optimizer.learning_rate != learning_rate:
            self._optimizer.set_learning_rate(learning_rate)

    def weights(self) -> np.ndarray:
        """A copy of every weight as one flat array (a job's best weights)."""
        return self._theta.copy()

    def set_weights(self, theta: np.ndarray) -> None:
        """Put back weights ``weights()`` returned (EngineError if they don't fit)."""
        if theta.shape != self._theta.shape:
            raise EngineError(
                f"weights of shape {theta.shape} don't fit a model of {self._theta.shape[0]}"
            )
        np.copyto(self._theta, theta)

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self, *, corpus: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything needed to resume exactly (trainer_state.py): named arrays (copies) and
        a JSON-able dict; ``corpus=False`` leaves out the corpus."""
        return trainer_state.state_dict(self, corpus=corpus)

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Trainer:
        """Rebuild a trainer from ``state_dict()`` output, exactly (bit for bit); EngineError
        if the state is malformed or its arrays do not match its config."""
        config, vocab = trainer_state.read_header(meta)
        try:
            corpus = np.asarray(arrays["corpus"])
        except KeyError as exc:
            raise EngineError(f"engine state is missing {exc}") from None
        trainer = cls(config, vocab, corpus)
        trainer_state.restore(trainer, arrays, meta)
        return trainer
