"""Sampling from the tanh RNN: temperature, top-k, greedy, in chunks, with its own
generator (sampling never disturbs training state)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..arrays import EVAL_CHUNK
from .kernels import Workspace, forward_hidden


def _fold_is_finite(Why: np.ndarray, by: np.ndarray, scale: float) -> bool:
    """Whether logits computed with ``scale`` folded into ``Why`` and ``by`` stay finite (with
    room for the max-shift) in their dtype, for any hidden state (|h| <= 1 after tanh)."""
    bound = float(np.abs(Why).astype(np.float64).sum(axis=1).max(initial=0.0))
    bound += float(np.abs(by).astype(np.float64).max(initial=0.0))
    limit = float(np.finfo(Why.dtype).max) / 4
    return math.isfinite(scale) and scale * max(bound, 1.0) < limit


def sample(
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
    for start in range(0, prime.shape[0] - 1, EVAL_CHUNK):
        hs, ws = forward_hidden(
            params, prime[start : min(start + EVAL_CHUNK, prime.shape[0] - 1)], h, ws
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
