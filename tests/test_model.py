"""Engine math: gradient check (and a check that it catches the seed's bug), training behaviour."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from rnnserve_server.engine.model_config import PARAM_NAMES
from rnnserve_server.engine.rnn.kernels import loss_and_grads, param_shapes
from rnnserve_server.engine.rnn.reference import reference_forward, reference_loss_and_grads


def _random_problem(
    seed: int, V: int = 5, H: int = 6, T: int = 4, B: int = 3
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Float64 weights at scale ~0.1 (biases too), a batch of windows, a nonzero h0."""
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape) * 0.1 for name, shape in param_shapes(V, H).items()}
    inputs = rng.integers(0, V, size=(B, T))
    targets = rng.integers(0, V, size=(B, T))
    h0 = np.tanh(rng.standard_normal((B, H)))
    return params, inputs, targets, h0


Grads = Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]


def _fast(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, h0: np.ndarray) -> Any:
    return loss_and_grads(params, x, y, h0)[1]


def _reference(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, h0: np.ndarray) -> Any:
    return reference_loss_and_grads(params, x, y, h0)[1]


def _without_dhnext(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, h0: np.ndarray
) -> dict[str, np.ndarray]:
    """The notebook seed's backward: dL/dh is not carried back through time (no dhnext)."""
    _, cache = reference_forward(params, x, y, h0)
    xs, hs, ps = cache["xs"], cache["hs"], cache["ps"]
    B, T = y.shape
    grads = {name: np.zeros_like(params[name]) for name in PARAM_NAMES}
    for t in reversed(range(T)):
        dy = ps[t].copy()
        dy[np.arange(B), y[:, t]] -= 1.0
        dy /= B
        grads["Why"] += dy.T @ hs[t]
        grads["by"] += dy.sum(axis=0)
        dhraw = (1.0 - hs[t] ** 2) * (dy @ params["Why"])  # the bug: + dhnext is missing
        grads["bh"] += dhraw.sum(axis=0)
        grads["Wxh"] += dhraw.T @ xs[t]
        grads["Whh"] += dhraw.T @ hs[t - 1]
    return grads


def _gradient_errors(seed: int, analytic_grads: Grads = _fast) -> dict[str, float]:
    """Norm-wise relative error, per tensor, of analytic vs centred-difference gradients."""
    params, inputs, targets, h0 = _random_problem(seed)
    grads = analytic_grads(params, inputs, targets, h0)
    eps = 1e-5
    errors: dict[str, float] = {}
    for name in PARAM_NAMES:
        p = params[name]
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):  # every entry
            old = p[i]
            p[i] = old + eps
            plus, _, _ = loss_and_grads(params, inputs, targets, h0)
            p[i] = old - eps
            minus, _, _ = loss_and_grads(params, inputs, targets, h0)
            p[i] = old
            numeric[i] = (plus - minus) / (2 * eps)
        analytic = grads[name]
        scale = max(float(np.linalg.norm(analytic)), float(np.linalg.norm(numeric)), 1e-12)
        errors[name] = float(np.linalg.norm(analytic - numeric)) / scale
    return errors


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("analytic", [_fast, _reference], ids=["fast", "reference"])
def test_gradient_check(seed: int, analytic: Grads) -> None:
    errors = _gradient_errors(seed, analytic)
    assert all(err < 1e-6 for err in errors.values()), errors


def test_fast_kernel_matches_the_reference() -> None:
    params, inputs, targets, h0 = _random_problem(4)
    loss, grads, h_last = loss_and_grads(params, inputs, targets, h0)
    ref_loss, ref_grads, ref_h = reference_loss_and_grads(params, inputs, targets, h0)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(h_last, ref_h, rtol=1e-12)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-9, atol=1e-14)


def test_gradient_check_catches_missing_dhnext() -> None:
    """The seed's bug (no gradient through time) must fail the same check."""
    errors = _gradient_errors(0, _without_dhnext)
    assert errors["Why"] < 1e-6 and errors["by"] < 1e-6, errors  # output layer unaffected
    failing = [name for name in ("Wxh", "Whh", "bh") if errors[name] >= 1e-6]
    assert failing == ["Wxh", "Whh", "bh"], errors
    assert max(errors[n] for n in failing) > 1e-3, errors


def test_loss_and_grads_reuses_buffers_and_leaves_inputs() -> None:
    params, inputs, targets, h0 = _random_problem(3)
    before = {k: v.copy() for k, v in params.items()}
    h0_before = h0.copy()
    loss1, g1, h1 = loss_and_grads(params, inputs, targets, h0)
    g1 = {k: v.copy() for k, v in g1.items()}
    loss2, g2, h2 = loss_and_grads(params, inputs, targets, h0)
    assert loss1 == loss2 and np.array_equal(h1, h2)
    assert all(np.array_equal(g1[k], g2[k]) for k in PARAM_NAMES)
    assert all(np.array_equal(before[k], params[k]) for k in PARAM_NAMES)
    assert np.array_equal(h0, h0_before)
