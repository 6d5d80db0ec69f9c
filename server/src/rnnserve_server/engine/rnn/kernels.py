"""The seed's one-layer tanh RNN, fast: parameters in, numbers out; trained by truncated BPTT.

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

reference.py has the same math written plainly; tests hold this to it.
"""

from __future__ import annotations

import numpy as np

from ..arrays import flat_size, split


def param_shapes(vocab_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Shape of each parameter tensor, in PARAM_NAMES order."""
    V, H = vocab_size, hidden_size
    return {"Wxh": (H, V), "Whh": (H, H), "Why": (V, H), "bh": (H,), "by": (V,)}


def init_params(
    vocab_size: int, hidden_size: int, rng: np.random.Generator, dtype: str = "float32"
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weights as in the seed: ``randn * 0.01`` (drawn in float64, Wxh, Whh, Why in that order),
    zero biases. Returns the flat vector and named views into it."""
    shapes = param_shapes(vocab_size, hidden_size)
    flat = np.zeros(flat_size(shapes), dtype=dtype)  # (P,)
    params = split(flat, shapes)
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


def recur(params: dict[str, np.ndarray], xs: np.ndarray, ws: Workspace, T: int) -> None:
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
) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    """Forward and backward pass over one window of B strands.

    ``inputs`` and ``targets`` are int arrays of shape (B, T); ``h0`` (B, H) is the incoming
    hidden state. Returns ``(loss, grads, h_last)``: ``loss`` is the cross-entropy summed over
    the T steps and averaged over the B strands (the quantity differentiated), ``grads`` the
    exact, unclipped gradient of ``loss`` per parameter (written into ``grads`` if given), and
    ``h_last`` (B, H) a copy of the final hidden state. Gradients do not flow into ``h0``
    (truncated BPTT). ``ws`` reuses preallocated buffers of the right shape.

    reference.py computes the same numbers plainly; the gradient check runs both.
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
    recur(params, xs, ws, T)
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
    recur(params, ids.astype(np.intp).reshape(T, 1), ws, T)
    return ws.hs[1:, 0], ws
