"""Cell specs, parameter layout and initialisation, dropout masks, the workspace."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..arrays import flat_size, split

CELLS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # gates per layer of each cell


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
        return GATES[self.cell] * self.hidden_size

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


def init_stack(
    spec: Spec, rng: np.random.Generator, dtype: str = "float32"
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weights uniform in +-1/sqrt(H) (torch's init, drawn in float64 in storage order), zero
    biases except the LSTM forget gate's, 1 (so c is remembered from the start)."""
    shapes = spec.shapes()
    flat = np.zeros(flat_size(shapes), dtype=dtype)  # (P,)
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
        self.tmp = np.empty((B, G), dtype)  # h_{t-1} @ Wh (rnn)
        # The gated recurrence's h_{t-1} Wh: for B > 1 one batched product over the n gate
        # blocks (n, H, H) into an (n, B, H) buffer, gate-major: it beat one (B, H) @ (H, n*H)
        # product (OpenBLAS, 1 thread, LSTM: 215 against 270 us at B = 32, H = 256; 52 against
        # 125 us at B = 8); at B = 1 the plain product was faster.
        n = GATES[spec.cell]
        self.hidden_size, self.gate_major = H, B > 1
        self.Whg = np.empty((n, H, H) if self.gate_major else (H, G), dtype)
        self.tmpg = np.empty((n, B, H) if self.gate_major else (B, G), dtype)
        self.WhT = np.empty((G, H) if self.gate_major else (0, 0), dtype)  # for the backward
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

    def loop_layout(self, a: np.ndarray) -> np.ndarray:
        """A step's (B, n*H) pre-activations as a view in the layout of ``tmpg``."""
        return (
            a.reshape(a.shape[0], -1, self.hidden_size).transpose(1, 0, 2) if self.gate_major else a
        )

    def gates(self, x: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Gates start .. stop-1 of ``x`` in the loop layout (``Whg``, ``tmpg``, loop_layout)."""
        if self.gate_major:
            return x[start] if stop == start + 1 else x[start:stop]
        H = self.hidden_size
        return x[..., start * H : stop * H]

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
            views = []
            for t, a in enumerate(A):
                state = (cs[t], cs[t + 1], tcs[t], hs[t], hs[t + 1])
                views.append((a, self.loop_layout(a), a[:, H:], *_blocks(a, H, 4), *state))
            return views
        if spec.cell == "gru":
            ghn = self.ghn[li]
            views = []
            for t, a in enumerate(A):
                rz_loop = self.gates(self.loop_layout(a), 0, 2)
                views.append((a[:, : 2 * H], rz_loop, *_blocks(a, H, 3), ghn[t], hs[t], hs[t + 1]))
            return views
        return [(A[t], hs[t], hs[t + 1]) for t in range(T)]


def _blocks(a: np.ndarray, H: int, n: int) -> list[np.ndarray]:
    """The n column blocks of width H of a (B, n*H) array, as views."""
    return [a[:, k * H : (k + 1) * H] for k in range(n)]
