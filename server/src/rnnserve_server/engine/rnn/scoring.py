"""Scoring a text with the tanh RNN from a zero state: next-character argmax and summed
nats; a long validation tail as parallel strands."""

from __future__ import annotations

import numpy as np

from ..arrays import EVAL_CHUNK
from .kernels import Workspace, forward_hidden, recur


def _shifted_logits(hs: np.ndarray, Why: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Logits (t, V) of hidden states ``hs`` (t, H), minus each row's max (log-softmax's shift)."""
    logits: np.ndarray = hs @ Why.T + by  # (t, V)
    logits -= logits.max(axis=1, keepdims=True)
    return logits


def score(
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
    for start in range(0, T, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, T)
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


def score_strands(params: dict[str, np.ndarray], ids: np.ndarray) -> float:
    """Summed nats of ``ids[1:]`` given the preceding ids, read as up to
    _VALIDATION_MAX_STRANDS contiguous strands of at least _VALIDATION_STRAND_CHARS, each from
    a zero state; a tail shorter than two strands is one strand (exactly ``score``).
    Memory is bounded by scoring _VALIDATION_CHUNK_FLOATS at a time."""
    inputs, targets = ids[:-1], ids[1:]
    P = inputs.shape[0]
    S = min(_VALIDATION_MAX_STRANDS, P // _VALIDATION_STRAND_CHARS)
    if S < 2:
        return score(params, inputs, targets)[1]
    L = P // S  # predictions per strand; the remainder is scored as one more strand
    nats = 0.0
    if P > S * L:
        nats += score(params, inputs[S * L :], targets[S * L :])[1]
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
                recur(p, xs, ws, T)
                logits = _shifted_logits(ws.hs[1:].reshape(T * S, H), p["Why"], p["by"])
                if np.isfinite(logits).all():
                    break
            lse = np.log(np.exp(logits).sum(axis=1, dtype=np.float64))  # (T*S,)
            nats += float(lse.sum() - logits[np.arange(T * S), ys].sum(dtype=np.float64))
        h = ws.hs[T].astype(dtype)
    return nats
