"""Inference: scoring a text, and the recurrence sampling feeds (no dropout, from a zero
state; the draw itself is engine/sampler.py's, shared with the tanh RNN)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ..arrays import EVAL_CHUNK
from .fast import forward
from .reference import cell_forward
from .spec import (
    Spec,
    StackWorkspace,
)


def _chunks(
    spec: Spec, p: dict[str, np.ndarray], inputs: np.ndarray, state: np.ndarray
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """The forward pass over ``inputs`` from ``state`` in chunks of EVAL_CHUNK steps (memory
    stays bounded for long texts): (start, stop, top layer's outputs (t, 1, H), state after)."""
    T = inputs.shape[0]
    ws: StackWorkspace | None = None
    for start in range(0, T, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, T)
        xs = np.asarray(inputs[start:stop], dtype=np.intp)[:, None]  # (t, 1)
        if ws is None or ws.key[0] != stop - start:
            ws = StackWorkspace(spec, stop - start, 1, p["Wy"].dtype)
        top, state = forward(spec, p, xs, state, ws)
        yield start, stop, top, state


def score(
    spec: Spec, p: dict[str, np.ndarray], inputs: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, float]:
    """From a zero state, the argmax id after each input (int32) and the summed nats of
    ``targets``; long texts run in chunks of EVAL_CHUNK steps with the state carried."""
    state = np.zeros((1, spec.state_size), dtype=p["Wy"].dtype)
    argmax = np.empty(inputs.shape[0], dtype=np.int32)
    nats = 0.0
    with np.errstate(all="ignore"):
        for start, stop, top, _ in _chunks(spec, p, inputs, state):
            logits = top[:, 0, :] @ p["Wy"] + p["by"]  # (t, V)
            logits = logits - logits.max(axis=1, keepdims=True)
            argmax[start:stop] = logits.argmax(axis=1)
            lse = np.log(np.exp(logits).sum(axis=1, dtype=np.float64))
            target = logits[np.arange(stop - start), targets[start:stop]].sum(dtype=np.float64)
            nats += float(lse.sum() - target)
    return argmax, nats


def recurrence(
    spec: Spec, p: dict[str, np.ndarray], prime: np.ndarray
) -> Callable[[int], np.ndarray]:
    """A stacked model's recurrence for sampling (sampler.draw): from a zero state warmed on
    ``prime[:-1]``, each call feeds one id through every layer and returns the top layer's
    new h (H,). No dropout."""
    dtype = p["Wy"].dtype
    state = np.zeros((1, spec.state_size), dtype=dtype)
    for *_, warmed in _chunks(spec, p, prime[:-1], state):
        state = warmed  # the state after the last chunk
    layers = [spec.layer_state(state, li) for li in range(spec.num_layers)]
    hc = [(h.copy(), None if c is None else c.copy()) for h, c in layers]

    def step(x: int) -> np.ndarray:
        inp: np.ndarray | None = None  # (1, H) the layer below's output
        for li in range(spec.num_layers):
            xp = p["Wx0"][x][None, :] if inp is None else inp @ p[f"Wx{li}"]
            h, c, _ = cell_forward(
                spec.cell, xp + p[f"b{li}"], hc[li][0], hc[li][1], p[f"Wh{li}"], p.get(f"bn{li}")
            )
            hc[li] = (h, c)
            inp = h
        assert inp is not None
        top: np.ndarray = inp[0]  # (H,)
        return top

    return step
