"""Working-memory estimates of one request, made before anything is allocated.

Each estimate is an upper bound of what the engine allocates for the call (checked against
tracemalloc's peak in tests/test_request_limits.py) from the sizes alone: characters of text,
the model's shape (cell, layers, hidden size H, alphabet size V) and the float size; a gated or
stacked model's window workspace from cells.workspace_buffers, the table StackWorkspace is
built from. The service refuses a call whose estimate is
over ``--max-request-bytes`` (RESOURCE_EXHAUSTED naming it), so no single Step, Predict, Generate
or Train can take the machine's memory: Step with a long text is one BPTT window over all of
it (T x (3H + 2V) floats for the tanh RNN), which the other size limits don't bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rnnserve_server.engine import cells
from rnnserve_server.engine.arrays import EVAL_CHUNK
from rnnserve_server.engine.cells.fast import PARTIAL_BLOCK_NUMBERS
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.trainer import parameter_total

VIEW_BYTES = 200  # a numpy view object: the tanh RNN's workspace keeps three per time step
ID_BYTES = 40  # per character: ids as int32 and intp, targets, and their copies on the way in
TEXT_BYTES = 16  # per character of text returned (ids, then the decoded str)


@dataclass(frozen=True)
class Model:
    """What the estimates need of a session's model over its alphabet."""

    spec: cells.Spec  # its shape (for the seed's tanh RNN too: a one-layer "rnn")
    stacked: bool  # a cells/ model (ModelConfig.stacked), not the seed's tanh RNN
    parameters: int  # number of weights
    itemsize: int  # bytes of a float
    dropout: bool = False  # training draws dropout masks (cells.dropout_masks)

    @classmethod
    def of(cls, config: ModelConfig, vocab: int) -> Model:
        spec = cells.Spec(config.cell, vocab, config.hidden_size, config.num_layers)
        weights = parameter_total(config, vocab)
        dropout = config.dropout > 0 and config.num_layers > 1
        return cls(spec, config.stacked, weights, np.dtype(config.dtype).itemsize, dropout)


def workspace_bytes(model: Model, steps: int, batch: int, vocab: int | None = None) -> int:
    """The workspace of a window of ``steps`` x ``batch``: cells.StackWorkspace's buffers
    (cells.workspace_bytes, from the table the workspace is built from), or the tanh RNN's
    rnn.kernels.Workspace(steps, batch, hidden, vocab): input rows, Whh.T, hidden states,
    logits, one-hot inputs, the two backward buffers, and per-step views. ``vocab``: the tanh
    RNN's logits width (0 for a forward pass without them; default the alphabet's)."""
    if model.stacked:
        return cells.workspace_bytes(model.spec, steps, batch, model.itemsize)
    hidden, n = model.spec.hidden_size, steps * batch
    vocab = model.spec.vocab_size if vocab is None else vocab
    floats = 2 * vocab * hidden + hidden * hidden + (steps + 2) * batch * hidden
    floats += 2 * n * vocab + 2 * n * hidden
    return floats * model.itemsize + n * 8 + 3 * (steps + 1) * VIEW_BYTES


def _dropout_and_partials(model: Model, steps: int, batch: int) -> int:
    """A cells/ model's update beyond its workspace: the dropout masks of the layers below
    the top (each drawn through a float64 and a bool temporary), and a gated cell's partials'
    temporaries (a few blocks of ~PARTIAL_BLOCK_NUMBERS, fast._time_chunks)."""
    spec, item = model.spec, model.itemsize
    block = steps * batch * spec.hidden_size
    masks = (spec.num_layers - 1) * block * item + block * (8 + 1) if model.dropout else 0
    gated = model.stacked and spec.cell != "rnn"
    partials = 4 * max(PARTIAL_BLOCK_NUMBERS, batch * spec.hidden_size) * item if gated else 0
    return masks + partials


def update_bytes(model: Model, steps: int, batch: int) -> int:
    """One update on ``batch`` windows of ``steps`` characters (Trainer.step / step_on):
    the workspace, gradient buffers, and per-character softmax temporaries."""
    n = steps * batch
    # Gradients, then the optimizer's update: its state (made at the first update) and
    # temporaries of the parameters' size (measured: up to ~6 parameter vectors in all).
    update = 6 * model.parameters * model.itemsize
    work = workspace_bytes(model, steps, batch) + _dropout_and_partials(model, steps, batch)
    return work + update + n * (ID_BYTES + 4 * 8)


def step_text_bytes(chars: int, model: Model) -> int:
    """Step with a text of ``chars`` characters: one window over all of it."""
    return update_bytes(model, max(chars - 1, 1), 1) + chars * ID_BYTES


def _forward_bytes(model: Model, chars: int, logits: bool) -> int:
    """A forward pass over ``chars`` characters in EVAL_CHUNK chunks, with ``logits`` or
    without. A shorter last chunk makes its own workspace while the previous one is still
    held: two at the peak."""
    c = max(min(chars, EVAL_CHUNK), 1)
    vocab, hidden, item = model.spec.vocab_size, model.spec.hidden_size, model.itemsize
    if model.stacked:
        ws = 2 * workspace_bytes(model, c, 1)
    else:
        ws = 2 * (workspace_bytes(model, c, 1, vocab=0) + (vocab * hidden * item if logits else 0))
    return ws + (c * vocab * (item + 3 * 8) if logits else 0)  # exp in float64, argmax temps


def predict_bytes(chars: int, model: Model) -> int:
    """Predict over ``chars`` characters: chunked forward passes (with float64 weights for
    a chunk that overflows the model's dtype) plus the per-character ids and reply."""
    wide = model.parameters * 8
    return _forward_bytes(model, chars, True) + wide + chars * (ID_BYTES + TEXT_BYTES)


def generate_bytes(prime_chars: int, length: int, model: Model) -> int:
    """Generate ``length`` characters after a prime: a snapshot of the weights, their
    transposed copies, the chunked warm-up over the prime, and the text produced."""
    vocab, hidden = model.spec.vocab_size, model.spec.hidden_size
    weights = (model.parameters + 2 * vocab * hidden + hidden * hidden) * model.itemsize
    warm = _forward_bytes(model, prime_chars, False)
    return weights + warm + 4 * vocab * 8 + prime_chars * ID_BYTES + length * TEXT_BYTES


def train_bytes(model: Model, seq_length: int, batch: int, sample_length: int) -> int:
    """Train: one corpus update at a time, plus a sample of ``sample_length`` characters."""
    update = update_bytes(model, seq_length, batch)
    sample = generate_bytes(1, sample_length, model) if sample_length else 0
    return update + sample


def most_chars(estimate: Callable[[int], int], limit: int, upper: int) -> int:
    """The largest n in [0, upper] with estimate(n) <= limit (estimate grows with n)."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        if estimate(mid) <= limit:
            low = mid
        else:
            high = mid - 1
    return low
