"""Gated cells (LSTM, GRU) and stacked layers with dropout: the math for every model except
the seed's one-layer tanh RNN (which stays in model.py, unchanged).

Row-vector form (a batch of B strands is a (B, H) matrix). Layer li of L maps its input x_t
(a one-hot id for layer 0, the layer below's output for the others) and its state to h_t::

    a_t = x_t Wx + b + h_{t-1} Wh                           (B, G*H), G gates
    rnn:  h_t = tanh(a_t)
    lstm: [g, i, f, o] = [tanh, sigmoid, sigmoid, sigmoid](a_t)
          c_t = f * c_{t-1} + i * g          h_t = o * tanh(c_t)
    gru:  (PyTorch's form: one recurrent product per step)
          [r, z] = sigmoid(x_t Wx[:, :2H] + b[:2H] + h_{t-1} Wh[:, :2H])
          n = tanh(x_t Wx[:, 2H:] + b[2H:] + r * (h_{t-1} Wh[:, 2H:] + bn))
          h_t = (1 - z) * n + z * h_{t-1}
    y_t = h_t^{L-1} Wy + by                                 p_t = softmax(y_t)

Dropout (training only) multiplies each layer's output by a mask m / (1 - dropout) before it
feeds the layer above; never the top layer's output (as torch.nn.LSTM does).

Shapes (V vocabulary, H hidden, G gates: rnn 1, lstm 4, gru 3)::

    Wx0 (V, G*H)   Wx{li>0} (H, G*H)   Wh{li} (H, G*H)   b{li} (G*H,)   bn{li} (H,) gru only
    Wy (H, V)      by (V,)

The carried state of a strand is one row of S = L * H (rnn, gru) or L * 2H (lstm: h then c
per layer) numbers, so the trainer keeps a (B, S) array whatever the cell.

Two implementations: ``loss_and_grads`` (fast: buffers reused, every product that can span
the window is one matrix product, only the recurrence loops over t, the backward's per-step
work reduced to a few element-wise products of partials computed up front) and
``reference_loss_and_grads`` (short, one equation per line; tests hold the fast one to it).
The loss is model.py's: cross-entropy summed over the window, averaged over strands.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CELLS",
    "Spec",
    "StackWorkspace",
    "init_stack",
    "loss_and_grads",
    "reference_loss_and_grads",
    "sample",
    "score",
]

CELLS = ("rnn", "lstm", "gru")
_GATES = {"rnn": 1, "lstm": 4, "gru": 3}
_EVAL_CHUNK = 2048  # time steps per forward chunk when scoring long texts (bounds memory)


@dataclass(frozen=True)
class Spec:
    """The shape of a stacked model."""

    cell: str  # "rnn" | "lstm" | "gru"
    vocab_size: int
    hidden_size: int
    num_layers: int

    @property
    def gates(self) -> int:
        """G*H: width of a layer's pre-activations."""
        return _GATES[self.cell] * self.hidden_size

    @property
    def state_size(self) -> int:
        """Numbers carried per strand: h (and c for LSTM) of every layer."""
        per_layer = 2 if self.cell == "lstm" else 1
        return self.num_layers * per_layer * self.hidden_size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each parameter tensor, in storage order."""
        V, H, G = self.vocab_size, self.hidden_size, self.gates
        out: dict[str, tuple[int, ...]] = {}
        for li in range(self.num_layers):
            out[f"Wx{li}"] = (V if li == 0 else H, G)
            out[f"Wh{li}"] = (H, G)
            out[f"b{li}"] = (G,)
            if self.cell == "gru":
                out[f"bn{li}"] = (H,)
        out["Wy"] = (H, V)
        out["by"] = (V,)
        return out

    def layer_state(self, state: np.ndarray, li: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Views of layer li's h (B, H) and c (B, H, or None) in a (B, S) state."""
        H = self.hidden_size
        if self.cell == "lstm":
            h = state[:, 2 * li * H : (2 * li + 1) * H]
            return h, state[:, (2 * li + 1) * H : (2 * li + 2) * H]
        return state[:, li * H : (li + 1) * H], None


def split(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Named views (no copy) of a flat vector, in ``shapes`` order."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].reshape(shape)
        offset += n
    return out


def init_stack(
    spec: Spec, rng: np.random.Generator, dtype: str = "float32"
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weights uniform in +-1/sqrt(H) (torch's init, drawn in float64 in storage order), zero
    biases except the LSTM forget gate's, 1 (so c is remembered from the start)."""
    shapes = spec.shapes()
    flat = np.zeros(sum(math.prod(s) for s in shapes.values()), dtype=dtype)  # (P,)
    params = split(flat, shapes)
    k = 1.0 / math.sqrt(spec.hidden_size)
    for name, shape in shapes.items():
        if name.startswith("W"):
            params[name][...] = rng.uniform(-k, k, shape)
    if spec.cell == "lstm":
        H = spec.hidden_size
        for li in range(spec.num_layers):
            params[f"b{li}"][2 * H : 3 * H] = 1.0
    return flat, params


def dropout_masks(
    spec: Spec, rate: float, T: int, B: int, rng: np.random.Generator, dtype: np.dtype
) -> list[np.ndarray] | None:
    """Inverted-dropout masks (T, B, H) for the outputs of layers 0 .. L-2; None if none."""
    if rate <= 0.0 or spec.num_layers < 2:
        return None
    keep = 1.0 - rate
    shape = (T, B, spec.hidden_size)
    return [
        ((rng.random(shape) < keep) * (1.0 / keep)).astype(dtype)
        for _ in range(spec.num_layers - 1)
    ]


# ---------------------------------------------------------------------------------------------
# The fast implementation


class StackWorkspace:
    """Buffers for one window shape (T steps, B strands), reused across steps."""

    def __init__(self, spec: Spec, T: int, B: int, dtype: np.dtype | str) -> None:
        self.key = (T, B, np.dtype(dtype))
        L, H, G, V = spec.num_layers, spec.hidden_size, spec.gates, spec.vocab_size
        N = T * B
        lstm, gru = spec.cell == "lstm", spec.cell == "gru"
        self.A = [np.empty((T, B, G), dtype) for _ in range(L)]  # activated gates (rnn: unused)
        self.hs = [np.empty((T + 1, B, H), dtype) for _ in range(L)]  # hs[0] = h0
        self.cs = [np.empty((T + 1, B, H), dtype) for _ in range(L)] if lstm else []
        self.tcs = [np.empty((T, B, H), dtype) for _ in range(L)] if lstm else []  # tanh(c_t)
        self.ghn = [np.empty((T, B, H), dtype) for _ in range(L)] if gru else []  # h Wh_n + bn
        self.drop = [np.empty((T, B, H), dtype) for _ in range(L - 1)]  # masked outputs
        self.tmp = np.empty((B, G), dtype)  # h_{t-1} @ Wh
        self.tmpH = np.empty((B, H), dtype)
        self.carry = np.empty((B, H), dtype)  # dL/dh_{t-1} through the recurrence
        self.dc = np.empty((B, H), dtype)  # dL/dc_t (LSTM)
        self.M = np.empty((T, B, G), dtype)  # per-step partials of the gates (backward)
        self.K = np.empty((T, B, H), dtype)  # LSTM: o * (1 - tanh(c)^2); GRU: (h - n) z (1 - z)
        self.Q = np.empty((T, B, H), dtype)  # GRU: (1 - z)(1 - n^2)
        self.dA = np.empty((T, B, G), dtype)  # dL/da_t
        self.dGh = np.empty((T, B, G), dtype) if gru else self.dA  # dL/d(h_{t-1} Wh [+ bn])
        self.dH = np.empty((T, B, H), dtype)  # dL/dh_t of the layer being differentiated
        self.logits = np.empty((N, V), dtype)  # y, then p, then dL/dy
        self.onehot = np.zeros((N, V), dtype)  # layer 0's inputs, for dWx0 as one product
        self.rows = np.arange(N)
        # Per-step views, made once: slicing in the hot loops cost ~20 % of a batch-1 step.
        self.fwd_views = [self._forward_views(spec, li, T) for li in range(L)]
        self.bwd_views = [self._backward_views(spec, li, T, B) for li in range(L)]

    def _backward_views(self, spec: Spec, li: int, T: int, B: int) -> list[tuple[np.ndarray, ...]]:
        H, dH, dA, K = spec.hidden_size, self.dH, self.dA, self.K
        if spec.cell == "lstm":
            M4, dA4 = self.M.reshape(T, B, 4, H), dA.reshape(T, B, 4, H)
            f = self.A[li][..., 2 * H : 3 * H]
            return [
                (dH[t], K[t], M4[t, :, :3], dA4[t, :, :3], M4[t, :, 3], dA4[t, :, 3], f[t], dA[t])
                for t in range(T)
            ]
        if spec.cell == "gru":
            r, z = self.A[li][..., :H], self.A[li][..., H : 2 * H]
            Q, R, G = self.Q, self.M[..., :H], self.dGh
            views = []
            for t in range(T):
                gates = (Q[t], K[t], R[t], r[t], z[t])
                grads = (*_blocks(dA[t], H, 3), dA[t][:, : 2 * H])
                views.append((dH[t], *gates, *grads, G[t][:, : 2 * H], G[t][:, 2 * H :], G[t]))
            return views
        return [(dH[t], K[t], dA[t]) for t in range(T)]

    def _forward_views(self, spec: Spec, li: int, T: int) -> list[tuple[np.ndarray, ...]]:
        H, A, hs = spec.hidden_size, self.A[li], self.hs[li]
        if spec.cell == "lstm":
            cs, tcs = self.cs[li], self.tcs[li]
            return [
                (a, a[:, H:], *_blocks(a, H, 4), cs[t], cs[t + 1], tcs[t], hs[t], hs[t + 1])
                for t, a in enumerate(A)
            ]
        if spec.cell == "gru":
            ghn = self.ghn[li]
            return [
                (a[:, : 2 * H], *_blocks(a, H, 3), ghn[t], hs[t], hs[t + 1])
                for t, a in enumerate(A)
            ]
        return [(A[t], hs[t], hs[t + 1]) for t in range(T)]


def _blocks(a: np.ndarray, H: int, n: int) -> list[np.ndarray]:
    """The n column blocks of width H of a (B, n*H) array, as views."""
    return [a[:, k * H : (k + 1) * H] for k in range(n)]


def _sigmoid_(x: np.ndarray) -> None:
    """x <- sigmoid(x) in place, as 0.5 tanh(x / 2) + 0.5 (no overflow, fewer passes)."""
    np.multiply(x, 0.5, out=x)
    np.tanh(x, out=x)
    np.multiply(x, 0.5, out=x)
    np.add(x, 0.5, out=x)


def _forward_layer(
    spec: Spec, p: dict[str, np.ndarray], li: int, ws: StackWorkspace, T: int
) -> None:
    """The recurrence of layer li over t = 1..T; ``ws.A[li]`` holds x_t Wx + b on entry,
    ``ws.hs[li][0]`` (and ``ws.cs[li][0]``) the incoming state."""
    H = spec.hidden_size
    Wh = p[f"Wh{li}"]
    tmp, tmpH, steps = ws.tmp, ws.tmpH, ws.fwd_views[li][:T]
    dot, add, mul, tanh = np.dot, np.add, np.multiply, np.tanh
    if spec.cell == "rnn":
        for a, h_prev, h in steps:
            dot(h_prev, Wh, out=tmp)
            add(a, tmp, out=h)
            tanh(h, out=h)
    elif spec.cell == "lstm":
        # sigmoid(x) = 0.5 tanh(x/2) + 0.5: the i, f, o columns of a are halved (in the
        # bulk input part here, in a copy of Wh) so one tanh covers all four gates.
        A = ws.A[li][:T]
        A[..., H:] *= 0.5
        Wh = Wh.copy()
        Wh[:, H:] *= 0.5
        for a, s, g, i, f, o, c_prev, c, tc, h_prev, h in steps:
            dot(h_prev, Wh, out=tmp)
            add(a, tmp, out=a)
            tanh(a, out=a)
            mul(s, 0.5, out=s)
            add(s, 0.5, out=s)
            mul(f, c_prev, out=c)
            mul(i, g, out=tmpH)
            add(c, tmpH, out=c)
            tanh(c, out=tc)
            mul(o, tc, out=h)
    else:  # gru
        bn = p[f"bn{li}"]
        tmp_rz, tmp_n = tmp[:, : 2 * H], tmp[:, 2 * H :]
        for rz, r, z, n, ghn, h_prev, h in steps:
            dot(h_prev, Wh, out=tmp)
            add(rz, tmp_rz, out=rz)
            _sigmoid_(rz)
            add(tmp_n, bn, out=ghn)
            mul(r, ghn, out=tmpH)
            add(n, tmpH, out=n)
            tanh(n, out=n)
            np.subtract(h_prev, n, out=tmpH)
            mul(z, tmpH, out=tmpH)
            add(n, tmpH, out=h)


def forward(
    spec: Spec,
    p: dict[str, np.ndarray],
    xs: np.ndarray,
    state: np.ndarray,
    ws: StackWorkspace,
    masks: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run every layer over ``xs`` (T, B) intp ids from ``state`` (B, S).

    Returns the top layer's outputs (T, B, H) (a view into ``ws``) and the final state (B, S),
    a new array."""
    T = xs.shape[0]
    H, G, N = spec.hidden_size, spec.gates, xs.size
    new_state = np.empty_like(state)
    inp: np.ndarray | None = None
    for li in range(spec.num_layers):
        A = ws.A[li]
        if inp is None:
            np.take(p["Wx0"], xs, axis=0, out=A)  # the input projection as a gather
        else:
            np.matmul(inp.reshape(N, H), p[f"Wx{li}"], out=A.reshape(N, G))
        A += p[f"b{li}"]
        h0, c0 = spec.layer_state(state, li)
        ws.hs[li][0] = h0
        if c0 is not None:
            ws.cs[li][0] = c0
        _forward_layer(spec, p, li, ws, T)
        h_last, c_last = spec.layer_state(new_state, li)
        h_last[...] = ws.hs[li][T]
        if c_last is not None:
            c_last[...] = ws.cs[li][T]
        inp = ws.hs[li][1:]
        if masks is not None and li < spec.num_layers - 1:
            np.multiply(inp, masks[li], out=ws.drop[li])
            inp = ws.drop[li]
    assert inp is not None
    return inp, new_state


def _lstm_partials(spec: Spec, ws: StackWorkspace, li: int) -> None:
    """M = the per-step factors that turn dL/dc_t (g, i, f blocks) and dL/dh_t (o block) into
    dL/da_t; K = o (1 - tanh(c_t)^2), the path from h_t to c_t. Whole window at once."""
    H = spec.hidden_size
    A, M = ws.A[li], ws.M
    g, i, f, o = A[..., :H], A[..., H : 2 * H], A[..., 2 * H : 3 * H], A[..., 3 * H :]
    tc = ws.tcs[li]
    M[..., :H] = i * (1.0 - g * g)
    M[..., H : 2 * H] = g * i * (1.0 - i)
    M[..., 2 * H : 3 * H] = ws.cs[li][:-1] * f * (1.0 - f)
    M[..., 3 * H :] = tc * o * (1.0 - o)
    np.multiply(o, 1.0 - tc * tc, out=ws.K)


def _gru_partials(spec: Spec, ws: StackWorkspace, li: int) -> None:
    """Q = (1 - z)(1 - n^2): dL/dh_t -> dL/d(n pre-activation); K = (h_{t-1} - n) z (1 - z):
    dL/dh_t -> dL/d(z pre-activation); M[:, :, :H] = (h Wh_n + bn) r (1 - r): dL/d(n pre)
    -> dL/d(r pre). Whole window at once."""
    H = spec.hidden_size
    A = ws.A[li]
    r, z, n = A[..., :H], A[..., H : 2 * H], A[..., 2 * H :]
    np.multiply(1.0 - z, 1.0 - n * n, out=ws.Q)
    np.multiply((ws.hs[li][:-1] - n) * z, 1.0 - z, out=ws.K)
    np.multiply(ws.ghn[li] * r, 1.0 - r, out=ws.M[..., :H])


def _backward_layer(
    spec: Spec, p: dict[str, np.ndarray], li: int, ws: StackWorkspace, T: int
) -> None:
    """BPTT through layer li: ``ws.dH`` holds dL/dh_t from above on entry; fills ``ws.dA``
    (and ``ws.dGh`` for GRU). Nothing flows into the incoming state (truncated BPTT)."""
    WhT = p[f"Wh{li}"].T
    carry, tmpH, steps = ws.carry, ws.tmpH, ws.bwd_views[li][:T]
    dot, add, mul = np.dot, np.add, np.multiply
    if spec.cell == "rnn":
        hs = ws.hs[li][1:]
        D = ws.K  # 1 - h_t^2
        mul(hs, hs, out=D)
        np.subtract(1.0, D, out=D)
        for t in range(T - 1, -1, -1):
            d, D_t, da = steps[t]
            if t < T - 1:
                add(d, carry, out=d)
            mul(d, D_t, out=da)
            if t > 0:
                dot(da, WhT, out=carry)
    elif spec.cell == "lstm":
        _lstm_partials(spec, ws, li)
        dc = ws.dc
        dc.fill(0.0)
        dc3 = dc[:, None, :]
        for t in range(T - 1, -1, -1):
            d, K_t, M_gif, dA_gif, M_o, dA_o, f, da = steps[t]
            if t < T - 1:
                add(d, carry, out=d)
            mul(d, K_t, out=tmpH)
            add(dc, tmpH, out=dc)  # dL/dc_t: through h_t, and from c_{t+1}
            mul(M_gif, dc3, out=dA_gif)  # g, i, f
            mul(M_o, d, out=dA_o)  # o
            if t > 0:
                mul(dc, f, out=dc)
                dot(da, WhT, out=carry)
    else:  # gru
        _gru_partials(spec, ws, li)
        for t in range(T - 1, -1, -1):
            d, Q_t, K_t, R_t, r, z, dr, dz, dn, d_rz, dgh_rz, dgh_n, dgh = steps[t]
            if t < T - 1:
                add(d, carry, out=d)
            mul(d, Q_t, out=dn)
            mul(d, K_t, out=dz)
            mul(dn, R_t, out=dr)
            mul(dn, r, out=dgh_n)  # d(h Wh_n + bn)
            np.copyto(dgh_rz, d_rz)
            if t > 0:
                dot(dgh, WhT, out=carry)
                mul(d, z, out=tmpH)
                add(carry, tmpH, out=carry)


def loss_and_grads(
    spec: Spec,
    p: dict[str, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    state: np.ndarray,
    grads: dict[str, np.ndarray],
    ws: StackWorkspace | None = None,
    masks: list[np.ndarray] | None = None,
) -> tuple[float, np.ndarray]:
    """Forward and backward over one window: ``inputs``/``targets`` (B, T) ids, ``state``
    (B, S), ``masks`` the dropout masks (None: no dropout). Writes the exact unclipped
    gradient of the loss into ``grads``; returns ``(loss, final state)``."""
    B, T = inputs.shape
    H, G, N = spec.hidden_size, spec.gates, B * T
    dtype = p["Wy"].dtype
    if ws is None or ws.key != (T, B, dtype):
        ws = StackWorkspace(spec, T, B, dtype)
    xs = np.ascontiguousarray(inputs.T, dtype=np.intp)  # (T, B) time-major
    ys = targets.T.reshape(N)  # (N,) row n = t * B + b
    top, new_state = forward(spec, p, xs, state, ws, masks)
    top_flat = top.reshape(N, H)

    logits = ws.logits  # (N, V)
    np.matmul(top_flat, p["Wy"], out=logits)
    logits += p["by"]
    logits -= logits.max(axis=1, keepdims=True)
    target_logit = logits[ws.rows, ys]
    np.exp(logits, out=logits)
    total = logits.sum(axis=1, keepdims=True)
    loss = float(np.log(total).sum(dtype=np.float64) - target_logit.sum(dtype=np.float64)) / B
    logits /= total
    logits[ws.rows, ys] -= 1.0
    if B > 1:
        logits *= logits.dtype.type(1.0 / B)
    np.matmul(top_flat.T, logits, out=grads["Wy"])
    np.sum(logits, axis=0, out=grads["by"])
    np.matmul(logits, p["Wy"].T, out=ws.dH.reshape(N, H))

    for li in range(spec.num_layers - 1, -1, -1):
        _backward_layer(spec, p, li, ws, T)
        dA = ws.dA.reshape(N, G)
        np.matmul(ws.hs[li][:-1].reshape(N, H).T, ws.dGh.reshape(N, G), out=grads[f"Wh{li}"])
        np.sum(dA, axis=0, out=grads[f"b{li}"])
        if spec.cell == "gru":
            np.sum(ws.dGh[..., 2 * H :], axis=(0, 1), out=grads[f"bn{li}"])
        if li == 0:
            onehot, xs_flat = ws.onehot, xs.reshape(N)
            onehot[ws.rows, xs_flat] = 1.0
            np.matmul(onehot.T, dA, out=grads["Wx0"])
            onehot[ws.rows, xs_flat] = 0.0
        else:
            below = ws.drop[li - 1] if masks is not None else ws.hs[li - 1][1:]
            np.matmul(below.reshape(N, H).T, dA, out=grads[f"Wx{li}"])
            np.matmul(dA, p[f"Wx{li}"].T, out=ws.dH.reshape(N, H))
            if masks is not None:
                ws.dH *= masks[li - 1]
    return loss, new_state


# ---------------------------------------------------------------------------------------------
# Inference: scoring a text and sampling (no dropout, from a zero state)


def score(
    spec: Spec, p: dict[str, np.ndarray], inputs: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, float]:
    """From a zero state, the argmax id after each input (int32) and the summed nats of
    ``targets``; long texts run in chunks of _EVAL_CHUNK steps with the state carried."""
    T = inputs.shape[0]
    dtype = p["Wy"].dtype
    state = np.zeros((1, spec.state_size), dtype=dtype)
    argmax = np.empty(T, dtype=np.int32)
    nats = 0.0
    ws: StackWorkspace | None = None
    for start in range(0, T, _EVAL_CHUNK):
        stop = min(start + _EVAL_CHUNK, T)
        xs = np.asarray(inputs[start:stop], dtype=np.intp)[:, None]  # (t, 1)
        if ws is None or ws.key[0] != stop - start:
            ws = StackWorkspace(spec, stop - start, 1, dtype)
        with np.errstate(all="ignore"):
            top, state = forward(spec, p, xs, state, ws)
            logits = top[:, 0, :] @ p["Wy"] + p["by"]  # (t, V)
            logits = logits - logits.max(axis=1, keepdims=True)
            argmax[start:stop] = logits.argmax(axis=1)
            lse = np.log(np.exp(logits).sum(axis=1, dtype=np.float64))
            target = logits[np.arange(stop - start), targets[start:stop]].sum(dtype=np.float64)
            nats += float(lse.sum() - target)
    return argmax, nats


def sample(
    spec: Spec,
    p: dict[str, np.ndarray],
    prime: np.ndarray,
    length: int,
    temperature: float,
    top_k: int,
    rng: np.random.Generator,
    chunk_size: int,
) -> Iterator[np.ndarray]:
    """model.Trainer.sample's loop for a stacked model (arguments already checked): warm the
    state on ``prime`` from zero, then draw each id (inverse CDF, one uniform per id)."""
    dtype = p["Wy"].dtype
    V = spec.vocab_size
    state = np.zeros((1, spec.state_size), dtype=dtype)
    if prime.shape[0] > 1:
        ws = StackWorkspace(spec, prime.shape[0] - 1, 1, dtype)
        _, state = forward(spec, p, np.asarray(prime[:-1], dtype=np.intp)[:, None], state, ws)
    layers = [spec.layer_state(state, li) for li in range(spec.num_layers)]
    hc = [(h.copy(), None if c is None else c.copy()) for h, c in layers]
    x = int(prime[-1])
    greedy = temperature == 0.0
    scale = dtype.type(1.0 if greedy else 1.0 / temperature)
    Wy, by = p["Wy"] * scale, p["by"] * scale
    k = top_k if 0 < top_k < V else 0
    pr = np.empty(V, dtype=np.float64)
    cdf = np.empty(V, dtype=np.float64)
    done = 0
    while done < length:
        n = min(chunk_size, length - done)
        out = np.empty(n, dtype=np.int32)
        u = rng.random(n) if not greedy else None
        for j in range(n):
            inp: np.ndarray | None = None
            for li in range(spec.num_layers):
                xp = p["Wx0"][x][None, :] if inp is None else inp @ p[f"Wx{li}"]
                h, c, _ = _cell_forward(
                    spec.cell,
                    xp + p[f"b{li}"],
                    hc[li][0],
                    hc[li][1],
                    p[f"Wh{li}"],
                    p.get(f"bn{li}"),
                )
                hc[li] = (h, c)
                inp = h
            assert inp is not None
            y = (inp @ Wy)[0] + by  # (V,)
            if u is None:
                x = int(y.argmax())
            else:
                if k:
                    y[np.argpartition(y, V - k)[: V - k]] = -np.inf
                np.subtract(y, y.max(), out=pr)
                np.exp(pr, out=pr)
                np.cumsum(pr, out=cdf)
                x = min(int(np.searchsorted(cdf, u[j] * cdf[-1], side="right")), V - 1)
            out[j] = x
        done += n
        yield out


# ---------------------------------------------------------------------------------------------
# The reference: the same math, one equation per line, time step by time step


def _sig(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


def _cell_forward(
    cell: str,
    xp: np.ndarray,
    h: np.ndarray,
    c: np.ndarray | None,
    Wh: np.ndarray,
    bn: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...]]:
    """One step of one layer from xp = x Wx + b (B, G): (h_t, c_t, what backward needs)."""
    H = h.shape[1]
    if cell == "rnn":
        hn = np.tanh(xp + h @ Wh)
        return hn, None, (h, hn)
    if cell == "lstm":
        assert c is not None
        a = xp + h @ Wh
        g, i = np.tanh(a[:, :H]), _sig(a[:, H : 2 * H])
        f, o = _sig(a[:, 2 * H : 3 * H]), _sig(a[:, 3 * H :])
        cn = f * c + i * g
        hn = o * np.tanh(cn)
        return hn, cn, (h, c, g, i, f, o, cn)
    assert bn is not None
    gh = h @ Wh
    r = _sig(xp[:, :H] + gh[:, :H])
    z = _sig(xp[:, H : 2 * H] + gh[:, H : 2 * H])
    ghn = gh[:, 2 * H :] + bn
    n = np.tanh(xp[:, 2 * H :] + r * ghn)
    hn = (1.0 - z) * n + z * h
    return hn, None, (h, r, z, n, ghn)


def _cell_backward(
    cell: str, dh: np.ndarray, dc: np.ndarray | None, cache: tuple[np.ndarray, ...], Wh: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Given dL/dh_t and dL/dc_t (from t+1), return dL/dxp, dL/d(h_{t-1} Wh [+ bn]),
    dL/dh_{t-1} and dL/dc_{t-1}."""
    if cell == "rnn":
        _, hn = cache
        da = dh * (1.0 - hn * hn)
        return da, da, da @ Wh.T, None
    if cell == "lstm":
        assert dc is not None
        _, c, g, i, f, o, cn = cache
        tc = np.tanh(cn)
        do = dh * tc
        dc = dc + dh * o * (1.0 - tc * tc)
        dg, di, df = dc * i, dc * g, dc * c
        da = np.concatenate(
            [dg * (1.0 - g * g), di * i * (1.0 - i), df * f * (1.0 - f), do * o * (1.0 - o)], axis=1
        )
        return da, da, da @ Wh.T, dc * f
    h, r, z, n, ghn = cache
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h - n) * z * (1.0 - z)
    dr = dn * ghn * r * (1.0 - r)
    dax = np.concatenate([dr, dz, dn], axis=1)
    dah = np.concatenate([dr, dz, dn * r], axis=1)
    return dax, dah, dah @ Wh.T + dh * z, None


def reference_loss_and_grads(
    spec: Spec,
    p: dict[str, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    state: np.ndarray,
    masks: list[np.ndarray] | None = None,
) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    """``loss_and_grads`` written plainly: returns (loss, grads, final state)."""
    B, T = inputs.shape
    L, H = spec.num_layers, spec.hidden_size
    grads = {name: np.zeros_like(w) for name, w in p.items()}
    layers = [spec.layer_state(state, li) for li in range(L)]
    hc = [(h.copy(), None if c is None else c.copy()) for h, c in layers]
    caches: list[list[tuple[np.ndarray | None, tuple[np.ndarray, ...]]]] = []
    tops: list[np.ndarray] = []
    for t in range(T):
        inp: np.ndarray | None = None
        step: list[tuple[np.ndarray | None, tuple[np.ndarray, ...]]] = []
        for li in range(L):
            xp = (p["Wx0"][inputs[:, t]] if inp is None else inp @ p[f"Wx{li}"]) + p[f"b{li}"]
            h, c, cache = _cell_forward(
                spec.cell, xp, hc[li][0], hc[li][1], p[f"Wh{li}"], p.get(f"bn{li}")
            )
            hc[li] = (h, c)
            step.append((inp, cache))
            inp = h * masks[li][t] if masks is not None and li < L - 1 else h
        assert inp is not None
        caches.append(step)
        tops.append(inp)
    loss = 0.0
    dh_next = [np.zeros((B, H), p["Wy"].dtype) for _ in range(L)]
    dc_next = [np.zeros((B, H), p["Wy"].dtype) if spec.cell == "lstm" else None for _ in range(L)]
    for t in range(T - 1, -1, -1):
        top = tops[t]
        y = top @ p["Wy"] + p["by"]
        y = y - y.max(axis=1, keepdims=True)
        prob = np.exp(y) / np.exp(y).sum(axis=1, keepdims=True)
        loss -= float(np.log(prob[np.arange(B), targets[:, t]]).sum()) / B
        dy = prob
        dy[np.arange(B), targets[:, t]] -= 1.0
        dy /= B
        grads["Wy"] += top.T @ dy
        grads["by"] += dy.sum(axis=0)
        dout = dy @ p["Wy"].T
        for li in range(L - 1, -1, -1):
            below, cache = caches[t][li]
            dax, dah, dh_next[li], dc_next[li] = _cell_backward(
                spec.cell, dout + dh_next[li], dc_next[li], cache, p[f"Wh{li}"]
            )
            grads[f"Wh{li}"] += cache[0].T @ dah
            grads[f"b{li}"] += dax.sum(axis=0)
            if spec.cell == "gru":
                grads[f"bn{li}"] += dah[:, 2 * H :].sum(axis=0)
            if below is None:
                np.add.at(grads["Wx0"], inputs[:, t], dax)
            else:
                grads[f"Wx{li}"] += below.T @ dax
                dout = dax @ p[f"Wx{li}"].T
                if masks is not None:
                    dout = dout * masks[li - 1][t]
    final = np.empty_like(state)
    for li in range(L):
        h, c = spec.layer_state(final, li)
        h[...] = hc[li][0]
        if c is not None:
            c[...] = hc[li][1]
    return loss, grads, final
