"""Engine math: gradient check (and a check that it catches the seed's bug), training behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from rnnserve_server.model import PARAM_NAMES, loss_and_grads, param_shapes


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


def _gradient_errors(seed: int, bptt: bool = True) -> dict[str, float]:
    """Norm-wise relative error, per tensor, of analytic vs centred-difference gradients."""
    params, inputs, targets, h0 = _random_problem(seed)
    _, grads, _ = loss_and_grads(params, inputs, targets, h0, bptt=bptt)
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
def test_gradient_check(seed: int) -> None:
    errors = _gradient_errors(seed)
    assert all(err < 1e-6 for err in errors.values()), errors


def test_gradient_check_catches_missing_dhnext() -> None:
    """The seed's bug (no gradient through time) must fail the same check."""
    errors = _gradient_errors(0, bptt=False)
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
