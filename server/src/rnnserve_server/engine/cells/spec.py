"""Cell specs, parameter layout and initialisation, dropout masks, the workspace."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


def loop_order(spec: Spec, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``w`` (..., G) with its gate columns in the fast forward's order: for the LSTM ``out``
    with the gates as g, f, i, o (the weights have g, i, f, o) so that [f, i] sits under
    [c_{t-1}, g] (StackWorkspace.Z), in two strided copies (3-4x faster than a fancy-indexed
    take here); for the other cells ``w`` itself."""
    if spec.cell != "lstm":
        return w
    H = spec.hidden_size
    w4, out4 = w.reshape(-1, 4, H), out.reshape(-1, 4, H)
    assert np.may_share_memory(out4, out), "out must reshape to a view"
    np.copyto(out4[:, ::3], w4[:, ::3])  # g, o stay
    np.copyto(out4[:, 1:3], w4[:, 2:0:-1])  # i, f -> f, i
    return out


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


# Python objects StackWorkspace keeps besides its buffers, measured with tracemalloc: the
# per-step views of each layer (forward and backward, with their tuples; ~0.9 KB a step for
# rnn, ~2.6-2.7 KB for LSTM and GRU) and, once, the workspace's own objects (~5-10 KB).
STEP_VIEW_BYTES = {"rnn": 1000, "lstm": 2800, "gru": 2900}
OBJECT_BYTES = 16384


def workspace_buffers(spec: Spec, T: int, B: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Every array StackWorkspace(spec, T, B) allocates: name -> (how many, shape of each).
    The workspace is built from this table and engine/budget.py sizes it from this table, so
    the memory estimate can't drift from what is allocated."""
    L, H, G, V = spec.num_layers, spec.hidden_size, spec.gates, spec.vocab_size
    N, n = T * B, GATES[spec.cell]
    lstm, gru, gate_major = spec.cell == "lstm", spec.cell == "gru", B > 1
    return {
        "hs": (L, (T + 1, B, H)),
        "Z": (L if lstm else 0, (T + 1, B, 5 * H)),
        "A": (0 if lstm else L, (T, B, G)),
        "tcs": (L if lstm else 0, (T, B, H)),
        "ghn": (L if gru else 0, (T, B, H)),
        "drop": (L - 1, (T, B, H)),
        "tmp": (1, (B, G)),
        "E": (1, (V, G)),
        "Wxl": (1, (H, G) if lstm and L > 1 else (0, G)),
        "bl": (1, (G,)),
        "Whg": (1, (n, H, H) if gate_major else (H, G)),
        "tmpg": (1, (n, B, H) if gate_major else (B, G)),
        "WhT": (1, (G, H) if gate_major else (0, 0)),
        "tmpH": (1, (B, H)),
        "tmpH2": (1, (B, H)),
        "carry": (1, (B, H)),
        "dA": (1, (0, 0, G) if gru else (T, B, G)),
        "M": (1, (T, B, G)),
        "K": (1, (T, B, H)),
        "dc": (1, (B, H)),
        "P": (1 if lstm else 0, (B, 2 * H)),
        "Q": (1 if gru else 0, (T, B, H)),
        "dGx": (1 if gru else 0, (T, B, 4 * H)),
        "half": (1, (B, (3 if lstm else 2) * H)),
        "dH": (1, (T, B, H)),
        "logits": (1, (N, V)),
        "onehot": (1, (N, V)),
    }


def workspace_bytes(spec: Spec, T: int, B: int, itemsize: int) -> int:
    """What StackWorkspace(spec, T, B) of floats of ``itemsize`` bytes holds: its buffers
    (workspace_buffers), the row indices and the per-step views."""
    floats = sum(
        count * math.prod(shape) for count, shape in workspace_buffers(spec, T, B).values()
    )
    views = spec.num_layers * T * STEP_VIEW_BYTES[spec.cell] + OBJECT_BYTES
    return floats * itemsize + T * B * np.dtype(np.intp).itemsize + views


class StackWorkspace:
    """Buffers for one window shape (T steps, B strands), reused across steps; each is one of
    workspace_buffers (the rest are views into them)."""

    def __init__(self, spec: Spec, T: int, B: int, dtype: np.dtype | str) -> None:
        self.key = (T, B, np.dtype(dtype))
        L, H, G = spec.num_layers, spec.hidden_size, spec.gates
        N = T * B
        lstm, gru = spec.cell == "lstm", spec.cell == "gru"
        table = workspace_buffers(spec, T, B)

        def layers(name: str) -> list[np.ndarray]:
            count, shape = table[name]
            return [np.empty(shape, dtype) for _ in range(count)]

        def one(name: str) -> np.ndarray:
            return np.empty(table[name][1], dtype)

        self.hs = layers("hs")  # hs[li][0] = h0
        # LSTM: row t of Z (B, 5H) is [c_t | g f i o of step t] (gates in loop_order), so
        # one product [f, i] * [c_{t-1}, g] and one sum make c_t; A and cs are views into it.
        self.Z = layers("Z")
        # activated gates (T, B, G) (rnn: the pre-activations, then h)
        self.A = [z[:T, :, H:] for z in self.Z] if lstm else layers("A")
        self.cs = [z[:, :, :H] for z in self.Z]  # c_t (T + 1, B, H), cs[0] = c0
        self.tcs = layers("tcs")  # tanh(c_t) (LSTM)
        self.ghn = layers("ghn")  # h Wh_n + bn (GRU)
        self.drop = layers("drop")  # masked outputs
        self.tmp = one("tmp")  # h_{t-1} @ Wh (rnn)
        self.E = one("E")  # Wx0 + b0, sigmoid gates halved: layer 0's input rows
        self.Wxl = one("Wxl")  # loop_order(Wx{li>0}) (LSTM)
        self.bl = one("bl")  # loop_order(b)
        # The gated recurrence's h_{t-1} Wh: for B > 1 one batched product over the n gate
        # blocks (n, H, H) into an (n, B, H) buffer, gate-major: it beat one (B, H) @ (H, n*H)
        # product (OpenBLAS, 1 thread, LSTM: 215 against 270 us at B = 32, H = 256; 52 against
        # 125 us at B = 8); at B = 1 the plain product was faster.
        self.hidden_size, self.gate_major = H, B > 1
        self.Whg = one("Whg")
        self.tmpg = one("tmpg")
        self.WhT = one("WhT")  # for the backward (B > 1)
        self.tmpH = one("tmpH")
        self.tmpH2 = one("tmpH2")
        self.carry = one("carry")  # dL/dh_{t-1} through the recurrence
        # At B = 1 a numpy call costs ~0.35 us on same-shape operands and ~1 us when one is
        # broadcast or has a negative stride (the general iterator), so the per-step buffers
        # below are laid out for same-shape calls.
        self.dA = one("dA")  # dL/da_t (GRU: dGx's blocks instead)
        self.M = one("M")  # per-step partials of the gates (backward)
        self.K = one("K")  # LSTM: o (1 - tanh(c)^2); GRU: (h - n) z (1 - z)
        self.dc = one("dc")  # dL/dc_t (LSTM)
        if lstm:
            # The forward's input part x_t Wx + b in the loop's gate order, in dA's memory:
            # dead before the backward writes dA.
            self.pre = self.dA
            self.P = one("P")  # [f c_{t-1}, i g]
        self.Q = one("Q") if gru else self.K  # GRU: (1 - z)(1 - n^2)
        self.dA_parts = [(slice(0, G), self.dA)]  # dL/da_t as (gate columns, (T, B, .)) blocks
        self.dGh = self.dA  # dL/d(h_{t-1} Wh [+ bn])
        self.dGx: np.ndarray | None = None
        if gru:
            # dGx[t] = [dr, dz, dgh_n, dn] (dgh_n = dL/d(h Wh_n + bn)): dGh is its first three
            # blocks and dL/da_t = [dr, dz, dn] two blocks of it (no per-step copy).
            dGx = self.dGx = one("dGx")
            self.dGh = dGx[..., :G]
            self.dA_parts = [(slice(0, 2 * H), dGx[..., : 2 * H]), (slice(2 * H, G), dGx[..., G:])]
        # sigmoid(x) = 0.5 tanh(x / 2) + 0.5: the affine part over the sigmoid gates, with
        # same-shape operands
        self.half = one("half")
        self.half.fill(0.5)
        self.dH = one("dH")  # dL/dh_t of the layer being differentiated
        self.logits = one("logits")  # y, then p, then dL/dy
        self.onehot = one("onehot")  # layer 0's inputs, for dWx0 as one product
        self.onehot.fill(0.0)
        self.rows = np.arange(N)
        # Per-step views, made once: slicing in the hot loops cost ~20 % of a batch-1 step.
        self.fwd_views = [self._forward_views(spec, li, T) for li in range(L)]
        self.bwd_views = [self._backward_views(spec, li, T, B) for li in range(L)]
        # Layer li's buffers exported to the C step kernel (fast._kernel_layer), made once.
        self.kernel_layers: dict[int, Any] = {}

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
            f = self.A[li][..., H : 2 * H]  # the loop's gate order
            return [
                (dH[t], K[t], M4[t, :, :3], dA4[t, :, :3], M4[t, :, 3], dA4[t, :, 3], f[t], dA[t])
                for t in range(T)
            ]
        if spec.cell == "gru":
            r, z = self.A[li][..., :H], self.A[li][..., H : 2 * H]
            Q, R, G = self.Q, self.M[..., :H], self.dGh
            dn = self.dA_parts[1][1]
            gru: list[tuple[np.ndarray, ...]] = [
                (dH[t], Q[t], K[t], R[t], r[t], z[t], *_blocks(G[t], H, 3), dn[t], G[t])
                for t in range(T)
            ]
            return gru
        return [(dH[t], K[t], dA[t]) for t in range(T)]

    def _forward_views(self, spec: Spec, li: int, T: int) -> list[tuple[np.ndarray, ...]]:
        H, A, hs = spec.hidden_size, self.A[li], self.hs[li]
        if spec.cell == "lstm":
            Z, tcs, pre = self.Z[li], self.tcs[li], self.pre
            views: list[tuple[np.ndarray, ...]] = []
            for t, a in enumerate(A):
                z = Z[t]  # [c_{t-1}, g, f, i, o]: the loop's gate order (loop_order)
                loop = (self.loop_layout(pre[t]), self.loop_layout(a), a, a[:, H:])
                cell = (z[:, 2 * H : 4 * H], z[:, : 2 * H], Z[t + 1][:, :H], tcs[t], z[:, 4 * H :])
                views.append((*loop, *cell, hs[t], hs[t + 1]))
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
