"""Working-memory estimates of one request, made before anything is allocated.

Each estimate is an upper bound of what the engine allocates for the call (checked against
tracemalloc's peak in tests/test_request_limits.py) from the sizes alone: characters of text,
hidden size H, alphabet size V and the float size. The service refuses a call whose estimate is
over ``--max-request-bytes`` (RESOURCE_EXHAUSTED naming it), so no single Step, Predict, Generate
or Train can take the machine's memory: Step with a long text is one BPTT window over all of
it (T x (3H + 2V) floats), which the other size limits don't bound.
"""

from __future__ import annotations

from collections.abc import Callable

from rnnserve_server.engine.arrays import EVAL_CHUNK
from rnnserve_server.engine.cells import GATES
from rnnserve_server.engine.model_config import ModelConfig

VIEW_BYTES = 200  # a numpy view object: the workspace keeps three per time step
ID_BYTES = 40  # per character: ids as int32 and intp, targets, and their copies on the way in
TEXT_BYTES = 16  # per character of text returned (ids, then the decoded str)


def width(config: ModelConfig) -> int:
    """The hidden size the tanh-RNN estimates below are given for ``config``'s model: gates x
    layers x hidden_size, an upper bound of a gated or stacked model's per-step work and
    weights (each layer's G x H pre-activations and state, and its weights)."""
    return GATES.get(config.cell, 4) * config.num_layers * config.hidden_size


def param_count(hidden: int, vocab: int) -> int:
    """Parameters of the tanh RNN: Wxh, Whh, Why, bh, by."""
    return 2 * hidden * vocab + hidden * hidden + hidden + vocab


def _workspace(steps: int, batch: int, hidden: int, vocab: int, itemsize: int) -> int:
    """rnn.kernels.Workspace(steps, batch, hidden, vocab): input rows, Whh.T, hidden states, logits,
    one-hot inputs, the two backward buffers, and per-step views."""
    n = steps * batch
    floats = 2 * vocab * hidden + hidden * hidden + (steps + 2) * batch * hidden
    floats += 2 * n * vocab + 2 * n * hidden
    return floats * itemsize + n * 8 + 3 * (steps + 1) * VIEW_BYTES


def update_bytes(steps: int, batch: int, hidden: int, vocab: int, itemsize: int) -> int:
    """One update on ``batch`` windows of ``steps`` characters (Trainer.step / step_on):
    the workspace, gradient buffers, and per-character softmax temporaries."""
    n = steps * batch
    # Gradients, then the optimizer's update: its state (made at the first update) and
    # temporaries of the parameters' size (measured: up to ~6 parameter vectors in all).
    update = 6 * param_count(hidden, vocab) * itemsize
    return _workspace(steps, batch, hidden, vocab, itemsize) + update + n * (ID_BYTES + 4 * 8)


def step_text_bytes(chars: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Step with a text of ``chars`` characters: one window over all of it."""
    return update_bytes(max(chars - 1, 1), 1, hidden, vocab, itemsize) + chars * ID_BYTES


def _forward_bytes(chars: int, hidden: int, vocab: int, itemsize: int) -> int:
    """A forward pass over ``chars`` characters in EVAL_CHUNK chunks, with logits. A shorter
    last chunk makes its own workspace while the previous one is still held: two at the peak."""
    c = max(min(chars, EVAL_CHUNK), 1)
    ws = 2 * (_workspace(c, 1, hidden, 0, itemsize) + vocab * hidden * itemsize)
    return ws + c * vocab * (itemsize + 3 * 8)  # logits, exp in float64, argmax temporaries


def predict_bytes(chars: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Predict over ``chars`` characters: chunked forward passes (with float64 weights for
    a chunk that overflows the model's dtype) plus the per-character ids and reply."""
    wide = param_count(hidden, vocab) * 8
    return _forward_bytes(chars, hidden, vocab, itemsize) + wide + chars * (ID_BYTES + TEXT_BYTES)


def generate_bytes(prime_chars: int, length: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Generate ``length`` characters after a prime: a snapshot of the weights, their
    transposed copies, the chunked warm-up over the prime, and the text produced."""
    weights = (param_count(hidden, vocab) + 2 * vocab * hidden + hidden * hidden) * itemsize
    warm = _forward_bytes(prime_chars, hidden, 0, itemsize)
    return weights + warm + 4 * vocab * 8 + prime_chars * ID_BYTES + length * TEXT_BYTES


def train_bytes(
    seq_length: int, batch: int, hidden: int, vocab: int, itemsize: int, sample_length: int
) -> int:
    """Train: one corpus update at a time, plus a sample of ``sample_length`` characters."""
    update = update_bytes(seq_length, batch, hidden, vocab, itemsize)
    sample = generate_bytes(1, sample_length, hidden, vocab, itemsize) if sample_length else 0
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
