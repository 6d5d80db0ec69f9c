"""Sampling for every model: temperature, top-k, greedy, in chunks, with its own generator
(sampling never disturbs training state).

One draw for every cell: a model supplies only its recurrence (a ``Recurrence``: the tanh
RNN's below, ``cells.recurrence`` for gated and stacked models), warmed on the prime; ``draw``
turns the top layer's hidden state into logits and picks each id.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from .arrays import EVAL_CHUNK
from .rnn.kernels import Workspace, forward_hidden

# Feed one input id, get the top layer's new hidden state h_t (H,), |h_t| <= 1 for every cell.
Recurrence = Callable[[int], np.ndarray]


def rnn_recurrence(params: dict[str, np.ndarray], prime: np.ndarray) -> Recurrence:
    """The tanh RNN's recurrence from a zero state warmed on ``prime[:-1]`` (its last id is
    the first input ``draw`` feeds)."""
    Wxh, Whh = params["Wxh"], params["Whh"]
    H = Wxh.shape[0]
    h = np.zeros(H, dtype=Wxh.dtype)  # (H,)
    ws: Workspace | None = None
    # Warm up in chunks: a workspace over a whole long prime held 3 x len x H floats.
    for start in range(0, prime.shape[0] - 1, EVAL_CHUNK):
        hs, ws = forward_hidden(
            params, prime[start : min(start + EVAL_CHUNK, prime.shape[0] - 1)], h, ws
        )
        h = hs[-1].copy()
    E = np.ascontiguousarray(Wxh.T + params["bh"])  # (V, H) input row + bias for each id
    WhhT = np.ascontiguousarray(Whh.T)  # (H, H)
    tmp = np.empty(H, dtype=Wxh.dtype)  # (H,)

    def step(x: int) -> np.ndarray:
        np.matmul(h, WhhT, out=tmp)
        np.add(tmp, E[x], out=tmp)
        np.tanh(tmp, out=h)
        return h

    return step


def _fold_is_finite(Wy: np.ndarray, by: np.ndarray, scale: float) -> bool:
    """Whether logits computed with ``scale`` folded into ``Wy`` (H, V) and ``by`` stay finite
    (with room for the max-shift) in their dtype, for any hidden state with |h| <= 1."""
    bound = float(np.abs(Wy).astype(np.float64).sum(axis=0).max(initial=0.0))
    bound += float(np.abs(by).astype(np.float64).max(initial=0.0))
    limit = float(np.finfo(Wy.dtype).max) / 4
    return math.isfinite(scale) and scale * max(bound, 1.0) < limit


def draw(
    step: Recurrence,
    x: int,
    Wy: np.ndarray,
    by: np.ndarray,
    length: int,
    temperature: float,
    top_k: int,
    rng: np.random.Generator,
    chunk_size: int,
) -> Iterator[np.ndarray]:
    """``length`` ids in int32 chunks of ``chunk_size``: feed ``x``, then each drawn id, to
    ``step``; draw from softmax((h Wy + by) / temperature) over the ``top_k`` most likely ids
    (0: all), or take the argmax at temperature 0 (arguments already checked)."""
    V = Wy.shape[1]
    dtype = Wy.dtype
    greedy = temperature == 0.0
    scale = 1.0 if greedy else 1.0 / temperature
    # 1/temperature is folded into the weights when the scaled logits stay finite in the
    # model's dtype; a tiny temperature (1/T or the logits overflow: inf - inf = NaN picked the
    # last id) divides the shifted float64 logits instead, which tends to greedy as T -> 0.
    divide = not greedy and not _fold_is_finite(Wy, by, scale)
    if divide:
        scale = 1.0
    W = np.ascontiguousarray(Wy * dtype.type(scale))  # (H, V) with 1/temperature folded in
    b = by * dtype.type(scale)  # (V,)
    k = top_k if 0 < top_k < V else 0
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
            np.matmul(step(x), W, out=y)
            y += b
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
