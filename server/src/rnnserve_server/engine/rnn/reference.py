"""The tanh RNN's forward and backward written plainly, one equation per line, one time step
at a time (min-char-rnn's form, batched). Slow; tests hold kernels.loss_and_grads to it
and the gradient check runs both.

    h_t = tanh(Wxh x_t + Whh h_{t-1} + bh)     y_t = Why h_t + by     p_t = softmax(y_t)
    loss = -sum_t log p_t[target_t], averaged over the B strands
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model_config import PARAM_NAMES


def reference_forward(
    params: dict[str, np.ndarray], inputs: np.ndarray, targets: np.ndarray, h0: np.ndarray
) -> tuple[float, dict[str, Any]]:
    """(loss, cache) for ``inputs``/``targets`` (B, T) from ``h0`` (B, H); the cache holds
    the one-hot inputs ``xs``, hidden states ``hs`` (hs[-1] = h0) and probabilities ``ps``."""
    Wxh, Whh, Why, bh, by = (params[n] for n in PARAM_NAMES)
    V = Wxh.shape[1]
    B, T = inputs.shape
    rows = np.arange(B)
    xs: dict[int, np.ndarray] = {}
    hs: dict[int, np.ndarray] = {-1: h0}
    ps: dict[int, np.ndarray] = {}
    loss = 0.0
    for t in range(T):
        xs[t] = np.zeros((B, V), dtype=Wxh.dtype)  # (B, V) one-hot
        xs[t][rows, inputs[:, t]] = 1.0
        hs[t] = np.tanh(xs[t] @ Wxh.T + hs[t - 1] @ Whh.T + bh)  # (B, H)
        ys = hs[t] @ Why.T + by  # (B, V)
        ys = ys - ys.max(axis=1, keepdims=True)  # softmax is shift-invariant
        ps[t] = np.exp(ys) / np.exp(ys).sum(axis=1, keepdims=True)  # (B, V)
        loss += float(-np.log(ps[t][rows, targets[:, t]]).sum())
    return loss / B, {"xs": xs, "hs": hs, "ps": ps}


def reference_backward(
    params: dict[str, np.ndarray], targets: np.ndarray, cache: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The gradient of reference_forward's loss, by backpropagation through time (dL/dh_t
    gets both the output's and the next step's contribution: ``dhnext``)."""
    Whh, Why = params["Whh"], params["Why"]
    xs, hs, ps = cache["xs"], cache["hs"], cache["ps"]
    B, T = targets.shape
    rows = np.arange(B)
    grads = {name: np.zeros_like(params[name]) for name in PARAM_NAMES}
    dhnext = np.zeros_like(hs[-1])  # (B, H)
    for t in reversed(range(T)):
        dy = ps[t].copy()  # (B, V)
        dy[rows, targets[:, t]] -= 1.0
        dy /= B
        grads["Why"] += dy.T @ hs[t]
        grads["by"] += dy.sum(axis=0)
        dh = dy @ Why + dhnext  # (B, H)
        dhraw = (1.0 - hs[t] ** 2) * dh  # through tanh
        grads["bh"] += dhraw.sum(axis=0)
        grads["Wxh"] += dhraw.T @ xs[t]
        grads["Whh"] += dhraw.T @ hs[t - 1]
        dhnext = dhraw @ Whh
    return grads


def reference_loss_and_grads(
    params: dict[str, np.ndarray], inputs: np.ndarray, targets: np.ndarray, h0: np.ndarray
) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    """kernels.loss_and_grads's contract: (loss, grads, h_last)."""
    loss, cache = reference_forward(params, inputs, targets, h0)
    T = inputs.shape[1]
    return loss, reference_backward(params, targets, cache), cache["hs"][T - 1].copy()
