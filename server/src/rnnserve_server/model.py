"""The math of rnnserve: a character-level tanh RNN, trained by truncated BPTT over a batch.

Equations (column-vector form, as in the notebook seed and min-char-rnn)::

    h_t = tanh(Wxh x_t + Whh h_{t-1} + bh)      x_t one-hot over the vocabulary
    y_t = Why h_t + by                          p_t = softmax(y_t)

Shapes (V = vocabulary size, H = hidden size)::

    Wxh (H, V)   Whh (H, H)   Why (V, H)   bh (H,)   by (V,)

The code works with row vectors (a batch of B strands is a (B, H) matrix), so ``Whh h`` is
written ``h @ Whh.T``. ``Wxh x_t`` with a one-hot ``x_t`` is the column ``Wxh[:, x_t]``, so the
input projection is an index gather, never a product with a one-hot matrix. The output
projection and all weight gradients are one matrix product each over every time step of the
window; only the recurrence itself loops over t.

The loss that is differentiated is min-char-rnn's: cross-entropy summed over the window's time
steps, averaged over the strands (so batch 1 is exactly min-char-rnn, and the batch size does
not change the effective step size). Losses are *reported* as mean nats per character.

Gated cells (LSTM, GRU), stacked layers and dropout are in cells.py; the Trainer below drives
either model. Pure numpy: no grpc, no I/O. The ``Trainer`` is not thread-safe; the session
layer serialises the calls that mutate it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from . import cells
from .optim import OPTIMIZERS, Optimizer, make_optimizer
from .vocab import Vocab

__all__ = [
    "DTYPES",
    "PARAM_NAMES",
    "PRESETS",
    "DivergedError",
    "EngineError",
    "ModelConfig",
    "StepResult",
    "Trainer",
    "Workspace",
    "forward_hidden",
    "init_params",
    "loss_and_grads",
    "nats_to_bits",
    "param_shapes",
]

PARAM_NAMES = ("Wxh", "Whh", "Why", "bh", "by")
DTYPES = ("float32", "float64")
STATE_FORMAT = 1
MAX_VALIDATION_FRACTION = 0.5
# Settings that can change on a live trainer (Trainer.reconfigure); the rest fix the weights'
# shapes or the corpus feed.
MUTABLE_FIELDS = ("learning_rate", "clip", "reset_every", "optimizer")
_EVAL_CHUNK = 2048  # time steps per forward chunk when scoring long texts (bounds memory)


class EngineError(ValueError):
    """Bad configuration or text; the message names the field and says how to fix it."""


class DivergedError(ArithmeticError):
    """The loss, the gradient or the updated weights were not finite; nothing was changed."""


def nats_to_bits(nats: float) -> float:
    """Convert a loss in nats per character to bits per character."""
    return nats / math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one model. ``validate`` checks them; the constructor does not."""

    hidden_size: int
    seq_length: int
    batch_size: int
    learning_rate: float
    optimizer: str  # "sgd" | "adagrad" | "adam"
    clip: float = 5.0  # gradients are clipped element-wise to [-clip, clip]
    seed: int = 0  # seeds the weight initialisation
    dtype: str = "float32"  # "float32" | "float64"
    reset_every: int = 0  # zero the carried hidden states every N corpus windows; 0 = never
    cell: str = "rnn"  # "rnn" | "lstm" | "gru" (cells.py); one-layer "rnn" is the seed's model
    num_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # between layers, training only: share of a layer's outputs zeroed
    validation_fraction: float = 0.0  # share of the corpus, at its end, never trained on

    def validate(self) -> None:
        """Raise EngineError naming the first invalid field and the values it accepts."""

        def positive_int(name: str, value: object, low: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EngineError(f"{name} must be an integer >= {low}, got {value!r}")

        positive_int("hidden_size", self.hidden_size)
        positive_int("seq_length", self.seq_length)
        positive_int("batch_size", self.batch_size)
        positive_int("seed", self.seed, 0)
        positive_int("reset_every", self.reset_every, 0)
        for name in ("learning_rate", "clip"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise EngineError(f"{name} must be a finite number > 0, got {value!r}")
        frac = self.validation_fraction
        if (
            isinstance(frac, bool)
            or not isinstance(frac, int | float)
            or not math.isfinite(frac)
            or not 0.0 <= frac <= MAX_VALIDATION_FRACTION
        ):
            raise EngineError(
                f"validation_fraction must be a number from 0 to {MAX_VALIDATION_FRACTION}, "
                f"got {frac!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise EngineError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.dtype not in DTYPES:
            raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.cell not in cells.CELLS:
            raise EngineError(f"cell must be one of {', '.join(cells.CELLS)}, got {self.cell!r}")
        positive_int("num_layers", self.num_layers)
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d < 1:
            raise EngineError(f"dropout must be a number in [0, 1), got {d!r}")
        if d > 0 and self.num_layers < 2:
            raise EngineError(
                "dropout applies between layers: set num_layers >= 2, or dropout to 0"
            )

    @property
    def recurrent_weights(self) -> int:
        """Weights that do not depend on the alphabet: every layer's Wh, and the input
        weights of the layers above the first (what num_layers and hidden_size multiply)."""
        H = self.hidden_size
        gates = {"rnn": 1, "lstm": 4, "gru": 3}.get(self.cell, 1) * H
        return self.num_layers * H * gates + (self.num_layers - 1) * H * gates

    @property
    def stacked(self) -> bool:
        """True when the model is cells.py's (gated cell or several layers), not the seed's."""
        return self.cell != "rnn" or self.num_layers > 1

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; EngineError for unknown or missing fields or bad values."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EngineError(f"unknown model config field(s): {', '.join(unknown)}")
        try:
            config = cls(**data)
        except TypeError as exc:
            raise EngineError(f"incomplete model config: {exc}") from None
        config.validate()
        return config

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (not validated)."""
        return replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Chosen with bench/quality.py: clearly better held-out loss than min-char-rnn in the same
    # wall-clock time (see README, "Performance").
    # 120 s runs on this 2-core machine (held-out bits/char from a zero state): this preset 2.58
    # (2.56 with lr 5e-3);
    # min-char-rnn 2.82; hidden 256 / 512 (batch 16-32, adam 2e-3..3e-3) 2.72-2.75 (too few
    # updates in the budget).
    "default": ModelConfig(
        hidden_size=128,
        seq_length=50,
        batch_size=32,
        learning_rate=3e-3,
        optimizer="adam",
        reset_every=10,
    ),
    # The notebook seed: learns `Hallo` -> `alloH`; diverges on real text.
    "notebook": ModelConfig(
        hidden_size=100, seq_length=5, batch_size=1, learning_rate=0.1, optimizer="sgd"
    ),
    # Karpathy's min-char-rnn.
    "min-char-rnn": ModelConfig(
        hidden_size=100, seq_length=25, batch_size=1, learning_rate=0.1, optimizer="adagrad"
    ),
    # Best held-out loss on tiny Shakespeare after 1,200 s here (bench/quality.py through the
    # service, BENCHMARKS.md "Gated cells"): GRU 256 1.580 nats (1.692 at 300 s), GRU 128 1.618
    # (1.663 at 300 s, saturating at 16 epochs); LSTMs and the tanh default did worse at 300 s.
    "quality": ModelConfig(
        hidden_size=256,
        seq_length=50,
        batch_size=32,
        learning_rate=3e-3,
        optimizer="adam",
        reset_every=10,
        cell="gru",
    ),
}


@dataclass(frozen=True)
class StepResult:
    """What one optimizer update did."""

    step: int  # step count after the update
    loss: float  # mean nats per character
    grad_norm: float  # global L2 norm of the gradients before clipping
    chars: int  # characters trained on (batch_size * seq_length for a corpus step)

    @property
    def bits(self) -> float:
        """The loss in bits per character."""
        return nats_to_bits(self.loss)


# ---------------------------------------------------------------------------------------------
# Pure functions: parameters in, numbers out


def param_shapes(vocab_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Shape of each parameter tensor, in PARAM_NAMES order."""
    V, H = vocab_size, hidden_size
    return {"Wxh": (H, V), "Whh": (H, H), "Why": (V, H), "bh": (H,), "by": (V,)}


def parameter_total(config: ModelConfig, vocab_size: int) -> int:
    """Number of weights of ``config``'s model over an alphabet of ``vocab_size``."""
    if config.stacked:
        spec = cells.Spec(config.cell, vocab_size, config.hidden_size, config.num_layers)
        shapes = spec.shapes()
    else:
        shapes = param_shapes(vocab_size, config.hidden_size)
    return sum(math.prod(shape) for shape in shapes.values())


def _views(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Split a flat vector into named views of the given shapes (no copy)."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].reshape(shape)
        offset += n
    return out


def init_params(
    vocab_size: int, hidden_size: int, rng: np.random.Generator, dtype: str = "float32"
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weights as in the seed: ``randn * 0.01`` (drawn in float64, Wxh, Whh, Why in that order),
    zero biases. Returns the flat vector and named views into it."""
    shapes = param_shapes(vocab_size, hidden_size)
    flat = np.zeros(sum(math.prod(s) for s in shapes.values()), dtype=dtype)  # (P,)
    params = _views(flat, shapes)
    for name in ("Wxh", "Whh", "Why"):
        params[name][...] = rng.standard_normal(shapes[name]) * 0.01
    return flat, params


class Workspace:
    """Preallocated buffers for one window shape (T steps, B strands); reused across steps."""

    def __init__(self, T: int, B: int, H: int, V: int, dtype: np.dtype | str) -> None:
        self.shape = (T, B, H, V)
        N = T * B
        self.E = np.empty((V, H), dtype=dtype)  # Wxh.T + bh: input rows with the bias folded in
        self.WhhT = np.empty((H, H), dtype=dtype)  # Whh.T, contiguous
        self.hs = np.empty((T + 1, B, H), dtype=dtype)  # hs[0] = h0, hs[t+1] = h_t
        self.tmp = np.empty((B, H), dtype=dtype)  # h_{t-1} @ Whh.T, then the carried dh
        self.logits = np.empty((N, V), dtype=dtype)  # y, then p, then dL/dy
        self.dhs = np.empty((T, B, H), dtype=dtype)  # dL/dh_t, then dL/d(pre-activation)
        self.dtanh = np.empty((T, B, H), dtype=dtype)  # 1 - h_t^2
        self.onehot = np.zeros((N, V), dtype=dtype)  # inputs one-hot, for dWxh as one product
        self.rows = np.arange(N)  # (N,)
        self.h_steps = list(self.hs)  # per-step views, to keep indexing out of the hot loop
        self.dh_steps = list(self.dhs)
        self.dt_steps = list(self.dtanh)


def _recur(params: dict[str, np.ndarray], xs: np.ndarray, ws: Workspace, T: int) -> None:
    """h_t = tanh(Wxh[:, x_t] + bh + h_{t-1} @ Whh.T) into hs[t], for t = 1..T (the only loop
    over t of the forward pass); ``xs`` (T, B) are intp ids, ``hs[0]`` holds h0."""
    np.add(params["Wxh"].T, params["bh"], out=ws.E)  # (V, H) input rows with the bias
    np.copyto(ws.WhhT, params["Whh"].T)  # a contiguous Whh.T: the GEMM is faster than on a view
    E, WhhT = ws.E, ws.WhhT
    hsteps, tmp = ws.h_steps, ws.tmp
    take, dot, add, tanh = np.take, np.dot, np.add, np.tanh  # np.dot: less overhead than matmul
    for t in range(T):
        h = hsteps[t + 1]
        # The input projection as a gather of B rows, step by step: the rows are still in
        # cache for the add (one gather of all T*B rows up front cost ~0.8 ms more at B = 32).
        take(E, xs[t], axis=0, out=h, mode="wrap")  # ids are checked on the way in
        dot(hsteps[t], WhhT, out=tmp)
        add(h, tmp, out=h)
        tanh(h, out=h)


def loss_and_grads(
    params: dict[str, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    h0: np.ndarray,
    *,
    grads: dict[str, np.ndarray] | None = None,
    ws: Workspace | None = None,
    bptt: bool = True,
) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    """Forward and backward pass over one window of B strands.

    ``inputs`` and ``targets`` are int arrays of shape (B, T); ``h0`` (B, H) is the incoming
    hidden state. Returns ``(loss, grads, h_last)``: ``loss`` is the cross-entropy summed over
    the T steps and averaged over the B strands (the quantity differentiated), ``grads`` the
    exact, unclipped gradient of ``loss`` per parameter (written into ``grads`` if given), and
    ``h_last`` (B, H) a copy of the final hidden state. Gradients do not flow into ``h0``
    (truncated BPTT). ``ws`` reuses preallocated buffers of the right shape.

    ``bptt=False`` reproduces the notebook seed's bug (dL/dh is not carried back through
    time); it exists only so that tests can show the gradient check catches it.
    """
    Wxh, Whh, Why = params["Wxh"], params["Whh"], params["Why"]
    H, V = Wxh.shape
    B, T = inputs.shape
    N = T * B
    if ws is None or ws.shape != (T, B, H, V) or ws.hs.dtype != Wxh.dtype:
        ws = Workspace(T, B, H, V, Wxh.dtype)
    if grads is None:
        grads = {name: np.empty_like(p) for name, p in params.items()}
    xs = np.ascontiguousarray(inputs.T, dtype=np.intp)  # (T, B) time-major
    ys = targets.T.reshape(N)  # (N,) time-major, row n = t * B + b

    # Forward.
    ws.hs[0] = h0
    _recur(params, xs, ws, T)
    hs_flat = ws.hs[1:].reshape(N, H)  # (N, H) h_1..h_T
    logits = ws.logits  # (N, V)
    np.matmul(hs_flat, Why.T, out=logits)
    logits += params["by"]
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax; loss is shift-invariant
    target_logit = logits[ws.rows, ys]  # (N,)
    np.exp(logits, out=logits)
    total = logits.sum(axis=1, keepdims=True)  # (N, 1)
    loss = float(np.log(total).sum(dtype=np.float64) - target_logit.sum(dtype=np.float64)) / B

    # Backward: dL/dy = (p - onehot(target)) / B.
    logits /= total
    logits[ws.rows, ys] -= 1.0
    if B > 1:
        logits *= logits.dtype.type(1.0 / B)
    dy = logits  # (N, V)
    np.matmul(dy.T, hs_flat, out=grads["Why"])
    np.sum(dy, axis=0, out=grads["by"])
    dhs = ws.dhs  # (T, B, H)
    np.matmul(dy, Why, out=dhs.reshape(N, H))
    np.multiply(ws.hs[1:], ws.hs[1:], out=ws.dtanh)
    np.subtract(1.0, ws.dtanh, out=ws.dtanh)
    dsteps, tsteps, carry = ws.dh_steps, ws.dt_steps, ws.tmp
    dot, add, mul = np.dot, np.add, np.multiply
    for t in range(T - 1, 0, -1):
        d = dsteps[t]
        mul(d, tsteps[t], out=d)  # now dL/d(pre-activation at t)
        if bptt:
            dot(d, Whh, out=carry)  # dL/dh_{t-1} through the recurrence
            add(dsteps[t - 1], carry, out=dsteps[t - 1])
    mul(dsteps[0], tsteps[0], out=dsteps[0])
    dpre = dhs.reshape(N, H)  # (N, H)
    np.matmul(dpre.T, ws.hs[:-1].reshape(N, H), out=grads["Whh"])
    np.sum(dpre, axis=0, out=grads["bh"])
    onehot = ws.onehot  # (N, V)
    xs_flat = xs.reshape(N)
    onehot[ws.rows, xs_flat] = 1.0
    np.matmul(dpre.T, onehot, out=grads["Wxh"])
    onehot[ws.rows, xs_flat] = 0.0
    return loss, grads, ws.hs[T].copy()


def forward_hidden(
    params: dict[str, np.ndarray], ids: np.ndarray, h0: np.ndarray, ws: Workspace | None = None
) -> tuple[np.ndarray, Workspace]:
    """Run one strand over ``ids`` (T,) from ``h0`` (H,); returns (h_1..h_T as (T, H), ws).

    The returned array is a view into ``ws`` (valid until it is reused).
    """
    Wxh = params["Wxh"]
    H, V = Wxh.shape
    T = ids.shape[0]
    if ws is None or ws.shape[:3] != (T, 1, H) or ws.hs.dtype != Wxh.dtype:
        ws = Workspace(T, 1, H, 0, Wxh.dtype)
        ws.E = np.empty((V, H), dtype=Wxh.dtype)
    ws.hs[0, 0] = h0
    _recur(params, ids.astype(np.intp).reshape(T, 1), ws, T)
    return ws.hs[1:, 0], ws


def _shifted_logits(hs: np.ndarray, Why: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Logits (t, V) of hidden states ``hs`` (t, H), minus each row's max (log-softmax's shift)."""
    logits: np.ndarray = hs @ Why.T + by  # (t, V)
    logits -= logits.max(axis=1, keepdims=True)
    return logits


def _score(
    params: dict[str, np.ndarray], inputs: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, float]:
    """From a zero state: argmax next id at each position of ``inputs`` (T,) and the summed
    nats of ``targets`` (T,). Runs in chunks so memory stays bounded for long texts.

    Finite weights give a finite loss, however large: a chunk whose pre-activations, logits or
    logit spread overflow the model's dtype (``inf - inf`` would be NaN) is recomputed in
    float64, where float32 weights cannot overflow (|logit| <= (H + 1) * 3.4e38).
    """
    H = params["Whh"].shape[0]
    T = inputs.shape[0]
    dtype = params["Whh"].dtype
    h = np.zeros(H, dtype=dtype)  # (H,)
    argmax = np.empty(T, dtype=np.int32)  # (T,)
    nats = 0.0
    ws: Workspace | None = None
    wide: dict[str, np.ndarray] | None = None  # float64 weights, made at the first overflow
    for start in range(0, T, _EVAL_CHUNK):
        stop = min(start + _EVAL_CHUNK, T)
        x, y = inputs[start:stop], targets[start:stop]
        with np.errstate(all="ignore"):  # overflow is detected below and handled
            hs, ws = forward_hidden(params, x, h, ws)  # reuses ws if same length
            logits = _shifted_logits(hs, params["Why"], params["by"])  # (t, V)
            if not np.isfinite(logits).all():
                if wide is None:
                    wide = {name: p.astype(np.float64) for name, p in params.items()}
                hs, _ = forward_hidden(wide, x, h.astype(np.float64))
                logits = _shifted_logits(hs, wide["Why"], wide["by"])
            argmax[start:stop] = logits.argmax(axis=1)
            lse = np.log(np.exp(logits).sum(axis=1, dtype=np.float64))  # (t,)
            target = logits[np.arange(stop - start), y].sum(dtype=np.float64)
            nats += float(lse.sum() - target)
        h = hs[-1].astype(dtype)
    return argmax, nats


# Validation scoring: a long held-out tail is read as parallel strands (one matrix product per
# time step for all of them instead of one tiny one per character: a 100k-character tail took
# 5.4 s as one strand on a busy 2-core machine), each at least this long so that losing the
# context at a strand's start changes the mean loss little.
_VALIDATION_STRAND_CHARS = 1024
_VALIDATION_MAX_STRANDS = 64
_VALIDATION_CHUNK_FLOATS = 1 << 20  # bounds (time steps x strands x (H + V)) per chunk


def _score_strands(params: dict[str, np.ndarray], ids: np.ndarray) -> float:
    """Summed nats of ``ids[1:]`` given the preceding ids, read as up to
    _VALIDATION_MAX_STRANDS contiguous strands of at least _VALIDATION_STRAND_CHARS, each from
    a zero state; a tail shorter than two strands is one strand (exactly ``_score``).
    Memory is bounded by scoring _VALIDATION_CHUNK_FLOATS at a time."""
    inputs, targets = ids[:-1], ids[1:]
    P = inputs.shape[0]
    S = min(_VALIDATION_MAX_STRANDS, P // _VALIDATION_STRAND_CHARS)
    if S < 2:
        return _score(params, inputs, targets)[1]
    L = P // S  # predictions per strand; the remainder is scored as one more strand
    nats = 0.0
    if P > S * L:
        nats += _score(params, inputs[S * L :], targets[S * L :])[1]
    X = inputs[: S * L].reshape(S, L)  # (S, L)
    Y = targets[: S * L].reshape(S, L)  # (S, L)
    Wxh = params["Wxh"]
    H, V = Wxh.shape
    dtype = Wxh.dtype
    C = max(1, min(L, _VALIDATION_CHUNK_FLOATS // (S * (H + V))))  # time steps per chunk
    h = np.zeros((S, H), dtype=dtype)  # (S, H)
    wide: dict[str, np.ndarray] | None = None  # float64 weights, made at the first overflow
    for start in range(0, L, C):
        stop = min(start + C, L)
        T = stop - start
        xs = np.ascontiguousarray(X[:, start:stop].T, dtype=np.intp)  # (T, S)
        ys = Y[:, start:stop].T.reshape(T * S)  # (T*S,) time-major like the rows below
        with np.errstate(all="ignore"):  # overflow is detected below and handled
            for p in (params, wide):
                if p is None:
                    wide = {name: q.astype(np.float64) for name, q in params.items()}
                    p = wide
                ws = Workspace(T, S, H, 0, p["Whh"].dtype)
                ws.E = np.empty((V, H), dtype=p["Whh"].dtype)
                ws.hs[0] = h
                _recur(p, xs, ws, T)
                logits = _shifted_logits(ws.hs[1:].reshape(T * S, H), p["Why"], p["by"])
                if np.isfinite(logits).all():
                    break
            lse = np.log(np.exp(logits).sum(axis=1, dtype=np.float64))  # (T*S,)
            nats += float(lse.sum() - logits[np.arange(T * S), ys].sum(dtype=np.float64))
        h = ws.hs[T].astype(dtype)
    return nats


# ---------------------------------------------------------------------------------------------
# The trainer: model + optimizer + corpus feed


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
    one-layer ``rnn`` use cells.py's model; the carried state is then h (and c) of every layer,
    and dropout masks come from the trainer's own checkpointed generator. Not thread-safe.
    """

    def __init__(self, config: ModelConfig, vocab: Vocab, corpus: np.ndarray) -> None:
        """EngineError for a bad config or a corpus shorter than seq_length or 2 characters."""
        config.validate()
        self.config = config
        self.vocab = vocab
        ids = self._check_ids(corpus, "corpus")
        held = validation_split(ids.shape[0], config.validation_fraction)
        train = ids.shape[0] - held
        if train < 2 or train < config.seq_length:
            extra = (
                f" after holding out {held} for validation (validation_fraction="
                f"{config.validation_fraction:g})"
                if held
                else ""
            )
            raise EngineError(
                f"the text has {ids.shape[0]} character(s){extra}; training needs at least "
                f"max(2, seq_length={config.seq_length}): give more text or a smaller seq_length"
            )
        # (capacity,) the first corpus_length entries are used; in the smallest unsigned dtype
        # that holds every id (uint8 up to 256 characters): 4x less memory than int32.
        self._corpus = ids.astype(_id_dtype(vocab.size))
        self.corpus_length = int(ids.shape[0])
        self.step_count = 0  # updates applied
        self.windows = 0  # corpus steps applied (drives reset_every)
        self._dtype = np.dtype(config.dtype)
        V, H, B = vocab.size, config.hidden_size, config.batch_size
        rng = np.random.default_rng(config.seed)
        # None: the seed's one-layer tanh RNN (this module); else a cells.py model.
        self._spec = cells.Spec(config.cell, V, H, config.num_layers) if config.stacked else None
        state_size = H
        if self._spec is None:
            self._shapes = param_shapes(V, H)
            self._theta, self.params = init_params(V, H, rng, config.dtype)  # (P,), named views
        else:
            self._shapes = self._spec.shapes()
            self._theta, self.params = cells.init_stack(self._spec, rng, config.dtype)
            state_size = self._spec.state_size
        # Draws the dropout masks; its state is checkpointed so a resumed trainer draws the same.
        self._dropout_rng = np.random.default_rng([config.seed, 1])
        self.parameter_count = int(self._theta.shape[0])
        self._optimizer: Optimizer = make_optimizer(
            config.optimizer, self.parameter_count, config.learning_rate, self._dtype
        )
        self.hidden = np.zeros((B, state_size), dtype=self._dtype)  # carried state per strand
        self.cursors = (np.arange(B, dtype=np.int64) * self.train_length) // B  # (B,)
        self._offsets = np.arange(config.seq_length + 1, dtype=np.int64)  # (T+1,)
        # Scratch used only during an update, allocated by the first one and freed by
        # release_scratch(): with it an idle trainer would be ~2.5x its weights + state.
        self._grad: np.ndarray | None = None  # (P,) gradients
        self._grads: dict[str, np.ndarray] = {}  # named views into _grad
        self._proposed: np.ndarray | None = None  # (P,) parameters after a proposed update
        self._ws: Workspace | cells.StackWorkspace | None = None  # buffers of a corpus window

    # -- helpers -----------------------------------------------------------------------------

    def _check_ids(self, ids: np.ndarray, what: str) -> np.ndarray:
        """``ids`` as a 1-D int32 array of valid ids; EngineError otherwise."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise EngineError(f"{what} must be a 1-D array of character ids")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab.size):
            raise EngineError(f"{what} has ids outside the vocabulary [0, {self.vocab.size})")
        return arr.astype(np.int32, copy=False)

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
            self._grads = _views(self._grad, self._shapes)
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
                    self._ws = Workspace(T, B, H, V, self._dtype)
                ws = self._ws
            assert ws is None or isinstance(ws, Workspace)
            loss, _, last = loss_and_grads(self.params, inputs, targets, state, grads=grads, ws=ws)
            return loss, last
        stack_ws = None
        if corpus:
            if self._ws is None:
                self._ws = cells.StackWorkspace(self._spec, T, B, self._dtype)
            stack_ws = self._ws
        assert stack_ws is None or isinstance(stack_ws, cells.StackWorkspace)
        masks = cells.dropout_masks(
            self._spec, self.config.dropout, T, B, self._dropout_rng, self._dtype
        )
        return cells.loss_and_grads(
            self._spec, self.params, inputs, targets, state, grads, stack_ws, masks
        )

    def _score(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, float]:
        """From a zero state: argmax after each input and the summed nats of the targets."""
        if self._spec is None:
            return _score(self.params, inputs, targets)
        return cells.score(self._spec, self.params, inputs, targets)

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
        clip = self._dtype.type(self.config.clip)
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
            self.hidden = np.where(moved[:, None], self._dtype.type(0), self.hidden)
            self.cursors = cursors

    def step(self) -> StepResult:
        """One update on the next window of every strand.

        DivergedError leaves weights, optimizer state, cursors and hidden states untouched.
        """
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
            hidden = np.where(over[:, None], self._dtype.type(0), hidden)
        idx = cursors[:, None] + self._offsets  # (B, T+1)
        if int(cursors.max()) + T >= L:
            idx %= L  # only the very last target can wrap: cyclic corpus
        window = self._corpus[idx]  # (B, T+1)
        rng_state = self._dropout_rng.bit_generator.state
        try:
            with np.errstate(all="ignore"):  # non-finite values are reported as DivergedError
                loss, h_last = self._forward_backward(
                    window[:, :-1], window[:, 1:], hidden, corpus=True
                )
            grad_norm = self._apply(loss)
        except DivergedError:
            self._dropout_rng.bit_generator.state = rng_state
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
        h0 = np.zeros((1, self.hidden.shape[1]), dtype=self._dtype)
        rng_state = self._dropout_rng.bit_generator.state
        try:
            with np.errstate(all="ignore"):  # non-finite values are reported as DivergedError
                loss, _ = self._forward_backward(seq[None, :-1], seq[None, 1:], h0, corpus=False)
            grad_norm = self._apply(loss)
        except DivergedError:
            self._dropout_rng.bit_generator.state = rng_state
            raise
        T = seq.shape[0] - 1
        return StepResult(self.step_count, loss / T, grad_norm, T)

    # -- inference ---------------------------------------------------------------------------

    def predict(self, ids: np.ndarray) -> tuple[np.ndarray, float]:
        """The notebook's predict: from a zero state, the most likely next id at each position
        (int32, same length as ``ids``) and the mean nats per character, where the target after
        the last character is the first (``Hallo`` -> ``alloH``). EngineError for empty text."""
        seq = self._check_ids(ids, "text")
        if seq.shape[0] < 1:
            raise EngineError("text is empty: give at least 1 character to predict from")
        argmax, nats = self._score(seq, np.roll(seq, -1))
        return argmax, nats / seq.shape[0]

    def evaluate(self, ids: np.ndarray) -> float:
        """Mean nats per character of ``ids[1:]`` given the preceding characters, from a zero
        state, without updating anything. EngineError for fewer than 2 ids."""
        seq = self._check_ids(ids, "text")
        if seq.shape[0] < 2:
            raise EngineError("text must have at least 2 characters to evaluate")
        _, nats = self._score(seq[:-1], seq[1:])
        return float(nats / (seq.shape[0] - 1))

    def validation_loss(self) -> float | None:
        """Mean nats per character over the held-out tail, from a zero state: a tail under
        2 * 1024 characters as one strand (exactly ``evaluate``), a longer one as up to 64
        strands of >= 1024 characters scored side by side, each from a zero state (see
        _score_strands). Memory stays bounded. None without a validation split."""
        held = self.validation_length
        if held < 2:
            return None
        tail = self._corpus[self.corpus_length - held : self.corpus_length].astype(np.int32)
        if self._spec is not None:  # gated or stacked cells: one strand, in chunks
            return float(self._score(tail[:-1], tail[1:])[1] / (held - 1))
        return float(_score_strands(self.params, tail) / (held - 1))

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
            config.optimizer, self.parameter_count, config.learning_rate, self._dtype
        )
        if config.optimizer == old.name:
            optimizer.load_state(old.state_arrays(), old.state_meta())
        self._optimizer = optimizer
        self.config = config
        self.release_scratch()  # the old optimizer's staging buffers go with it

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
        seq = self._check_ids(prime, "prime")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise EngineError(f"length must be an integer >= 0, got {length!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise EngineError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise EngineError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise EngineError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        if seq.shape[0] == 0:
            seq = self._corpus[:1].astype(np.int32)
        params = {name: p.copy() for name, p in self.params.items()}  # snapshot
        rng = np.random.default_rng(seed)
        if self._spec is not None:
            return cells.sample(
                self._spec, params, seq, length, float(temperature), top_k, rng, chunk_size
            )
        return _sample(params, seq, length, float(temperature), top_k, rng, chunk_size)

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self, *, corpus: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything needed to resume exactly: named arrays (copies) and a JSON-able dict.

        ``corpus=False`` leaves out the corpus (checkpoints keep it in its own file, copied
        only when it changed); ``from_state`` needs it back as ``arrays["corpus"]``.
        """
        arrays: dict[str, np.ndarray] = {name: p.copy() for name, p in self.params.items()}
        for name, arr in self._optimizer.state_arrays().items():
            arrays[f"optim.{name}"] = arr
        arrays["hidden"] = self.hidden.copy()
        arrays["cursors"] = self.cursors.copy()
        if corpus:
            arrays["corpus"] = self._corpus[: self.corpus_length].astype(np.int32)
        meta: dict[str, Any] = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "alphabet": self.vocab.alphabet,
            "step_count": self.step_count,
            "windows": self.windows,
            "optim": self._optimizer.state_meta(),
            "dropout_rng": self._dropout_rng.bit_generator.state,
        }
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Trainer:
        """Rebuild a trainer from ``state_dict()`` output, exactly (bit for bit).

        EngineError if the state is malformed or its arrays do not match its config.
        """
        try:
            if meta.get("format") != STATE_FORMAT:
                raise EngineError(f"unsupported engine state format {meta.get('format')!r}")
            config = ModelConfig.from_dict(dict(meta["config"]))
            vocab = Vocab(str(meta["alphabet"]))
            trainer = cls(config, vocab, np.asarray(arrays["corpus"]))
            expected = {name: p for name, p in trainer.params.items()}
            expected["hidden"] = trainer.hidden
            expected["cursors"] = trainer.cursors
            for name, arr in trainer._optimizer.state_arrays().items():
                expected[f"optim.{name}"] = arr
            for name, ref in expected.items():
                got = np.asarray(arrays[name])
                if got.shape != ref.shape or got.dtype != ref.dtype:
                    raise EngineError(
                        f"engine state array {name!r} is {got.dtype}{got.shape}, "
                        f"expected {ref.dtype}{ref.shape}"
                    )
            for name in trainer.params:
                np.copyto(trainer.params[name], arrays[name])
            if "dropout_rng" in meta:  # absent from checkpoints written before cells.py
                try:
                    trainer._dropout_rng.bit_generator.state = dict(meta["dropout_rng"])
                except (TypeError, ValueError, OverflowError, KeyError) as exc:
                    raise EngineError(f"engine state 'dropout_rng' is invalid ({exc})") from None
            trainer._optimizer.load_state(
                {
                    k[len("optim.") :]: np.asarray(v)
                    for k, v in arrays.items()
                    if k.startswith("optim.")
                },
                dict(meta["optim"]),
            )
            trainer.hidden = np.array(arrays["hidden"], dtype=trainer._dtype)
            trainer.cursors = np.array(arrays["cursors"], dtype=np.int64)
            trainer.step_count = int(meta["step_count"])
            trainer.windows = int(meta["windows"])
        except KeyError as exc:
            raise EngineError(f"engine state is missing {exc}") from None
        return trainer


def _fold_is_finite(Why: np.ndarray, by: np.ndarray, scale: float) -> bool:
    """Whether logits computed with ``scale`` folded into ``Why`` and ``by`` stay finite (with
    room for the max-shift) in their dtype, for any hidden state (|h| <= 1 after tanh)."""
    bound = float(np.abs(Why).astype(np.float64).sum(axis=1).max(initial=0.0))
    bound += float(np.abs(by).astype(np.float64).max(initial=0.0))
    limit = float(np.finfo(Why.dtype).max) / 4
    return math.isfinite(scale) and scale * max(bound, 1.0) < limit


def _sample(
    params: dict[str, np.ndarray],
    prime: np.ndarray,
    length: int,
    temperature: float,
    top_k: int,
    rng: np.random.Generator,
    chunk_size: int,
) -> Iterator[np.ndarray]:
    """The sampling loop behind ``Trainer.sample`` (arguments already checked)."""
    Wxh, Whh, Why = params["Wxh"], params["Whh"], params["Why"]
    H, V = Wxh.shape
    dtype = Wxh.dtype
    h = np.zeros(H, dtype=dtype)  # (H,)
    ws: Workspace | None = None
    # Warm up in chunks: a workspace over a whole long prime held 3 x len x H floats.
    for start in range(0, prime.shape[0] - 1, _EVAL_CHUNK):
        hs, ws = forward_hidden(
            params, prime[start : min(start + _EVAL_CHUNK, prime.shape[0] - 1)], h, ws
        )
        h = hs[-1].copy()
    x = int(prime[-1])
    E = np.ascontiguousarray(Wxh.T + params["bh"])  # (V, H) input row + bias for each id
    WhhT = np.ascontiguousarray(Whh.T)  # (H, H)
    greedy = temperature == 0.0
    scale = 1.0 if greedy else 1.0 / temperature
    # 1/temperature is folded into the weights when the scaled logits stay finite in the
    # model's dtype; a tiny temperature (1/T or the logits overflow: inf - inf = NaN picked the
    # last id) divides the shifted float64 logits instead, which tends to greedy as T -> 0.
    divide = not greedy and not _fold_is_finite(Why, params["by"], scale)
    if divide:
        scale = 1.0
    WhyT = np.ascontiguousarray(Why.T * dtype.type(scale))  # (H, V) with 1/temperature folded in
    by = params["by"] * dtype.type(scale)  # (V,)
    k = top_k if 0 < top_k < V else 0
    tmp = np.empty(H, dtype=dtype)  # (H,)
    y = np.empty(V, dtype=dtype)  # (V,)
    p = np.empty(V, dtype=np.float64)  # (V,)
    cdf = np.empty(V, dtype=np.float64)  # (V,)
    done = 0
    while done < length:
        n = min(chunk_size, length - done)
        out = np.empty(n, dtype=np.int32)
        # One uniform per character, drawn up front: the same stream for any chunk_size.
        u = rng.random(n) if not greedy else None
        for i in range(n):
            np.matmul(h, WhhT, out=tmp)
            tmp += E[x]
            np.tanh(tmp, out=h)
            np.matmul(h, WhyT, out=y)
            y += by
            if u is None:
                x = int(y.argmax())
            else:
                if k:
                    y[np.argpartition(y, V - k)[: V - k]] = -np.inf
                np.subtract(y, y.max(), out=p)
                if divide:
                    with np.errstate(over="ignore"):  # 0 stays 0 (the max); the rest -> -inf
                        np.divide(p, temperature, out=p)
                np.exp(p, out=p)
                np.cumsum(p, out=cdf)
                # Inverse-CDF draw: the first id whose cumulative mass exceeds u * total.
                x = min(int(np.searchsorted(cdf, u[i] * cdf[-1], side="right")), V - 1)
            out[i] = x
        done += n
        yield out
