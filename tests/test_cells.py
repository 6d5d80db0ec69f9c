"""Gated cells and stacked layers: gradient checks (and that they catch broken backwards), the
fast implementation against the plain reference, dropout fixed by seed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from rnnserve_server.engine import cells
from rnnserve_server.engine.cells import (
    Spec,
    _kernel,
    dropout_masks,
    loss_and_grads,
    reference_loss_and_grads,
)

CASES = [
    ("rnn", 2, 0.0),
    ("lstm", 1, 0.0),
    ("gru", 1, 0.0),
    ("lstm", 2, 0.5),
    ("gru", 2, 0.5),
    ("rnn", 2, 0.5),
]

Masks = list[np.ndarray] | None

Problem = tuple[Spec, dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, Masks]


@pytest.fixture(params=["c", "numpy"])
def engine_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test that uses it runs on both paths of the gated cells' steps: the C kernel (an
    import error here if it is not built: the test fails) and numpy."""
    monkeypatch.setattr(cells.fast, "KERNEL", _kernel if request.param == "c" else None)
    return str(request.param)


@pytest.fixture
def numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The numpy path: the tests that damage its gate partials."""
    monkeypatch.setattr(cells.fast, "KERNEL", None)


def _problem(cell: str, layers: int, dropout: float, seed: int = 0, B: int = 3) -> Problem:
    """Float64 weights at scale ~0.1 (biases too), a batch of B windows, a nonzero state, and
    dropout masks drawn from a seeded generator (fixed for the whole check)."""
    V, H, T = 5, 4, 4
    spec = Spec(cell, V, H, layers)
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape) * 0.1 for name, shape in spec.shapes().items()}
    inputs = rng.integers(0, V, size=(B, T))
    targets = rng.integers(0, V, size=(B, T))
    state = np.tanh(rng.standard_normal((B, spec.state_size)))
    mask_rng = np.random.default_rng(seed + 100)
    masks = dropout_masks(spec, dropout, T, B, mask_rng, np.dtype(np.float64))
    return spec, params, inputs, targets, state, masks


def _loss(problem: Problem) -> float:
    spec, params, inputs, targets, state, masks = problem
    grads = {k: np.empty_like(v) for k, v in params.items()}
    loss, _ = loss_and_grads(spec, params, inputs, targets, state, grads, masks=masks)
    return loss


def _gradient_errors(problem: Problem) -> dict[str, float]:
    """Norm-wise relative error, per tensor, of the fast analytic gradient vs centred
    differences (eps 1e-5) over every entry."""
    spec, params, inputs, targets, state, masks = problem
    grads = {k: np.empty_like(v) for k, v in params.items()}
    loss_and_grads(spec, params, inputs, targets, state, grads, masks=masks)
    eps = 1e-5
    errors: dict[str, float] = {}
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            plus = _loss(problem)
            p[i] = old - eps
            minus = _loss(problem)
            p[i] = old
            numeric[i] = (plus - minus) / (2 * eps)
        analytic = grads[name]
        scale = max(float(np.linalg.norm(analytic)), float(np.linalg.norm(numeric)), 1e-12)
        errors[name] = float(np.linalg.norm(analytic - numeric)) / scale
    return errors


@pytest.mark.usefixtures("engine_path")
@pytest.mark.parametrize(("cell", "layers", "dropout"), CASES)
def test_gradient_check(cell: str, layers: int, dropout: float) -> None:
    problem = _problem(cell, layers, dropout)
    if dropout:
        masks = problem[5]
        assert masks is not None and any((m == 0).any() for m in masks)  # dropout really drops
    errors = _gradient_errors(problem)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.usefixtures("engine_path")
@pytest.mark.parametrize("block", [None, 1])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize(("cell", "layers", "dropout"), CASES)
def test_fast_matches_reference(
    cell: str,
    layers: int,
    dropout: float,
    B: int,
    block: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every layout the fast kernels pick (B = 1 keeps Wh as is; B > 1 gate-major) and the
    gate partials in one block or one time step a block."""
    if block is not None:
        monkeypatch.setattr(cells.fast, "PARTIAL_BLOCK_NUMBERS", block)
    spec, params, inputs, targets, state, masks = _problem(cell, layers, dropout, seed=7, B=B)
    grads = {k: np.empty_like(v) for k, v in params.items()}
    loss, final = loss_and_grads(spec, params, inputs, targets, state, grads, masks=masks)
    ref_loss, ref_grads, ref_final = reference_loss_and_grads(
        spec, params, inputs, targets, state, masks
    )
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(final, ref_final, rtol=1e-12, atol=1e-14)
    for name in params:
        np.testing.assert_allclose(
            grads[name], ref_grads[name], rtol=1e-9, atol=1e-14, err_msg=name
        )


def _broken(
    monkeypatch: pytest.MonkeyPatch, name: str, damage: Callable[[cells.StackWorkspace, int], None]
) -> None:
    """Replace a backward helper of the fast kernels by one whose result is damaged afterwards."""
    original = getattr(cells.fast, name)

    def broken(spec: Spec, ws: cells.StackWorkspace, li: int) -> None:
        original(spec, ws, li)
        damage(ws, spec.hidden_size)

    monkeypatch.setattr(cells.fast, name, broken)


@pytest.mark.usefixtures("numpy_path")
@pytest.mark.parametrize("layers", [1, 2])
def test_gradient_check_catches_a_dropped_forget_gate_gradient(
    monkeypatch: pytest.MonkeyPatch, layers: int
) -> None:
    def drop_forget(ws: cells.StackWorkspace, H: int) -> None:
        ws.M[..., 2 * H : 3 * H] = 0.0  # dL/d(forget pre-activation) lost

    _broken(monkeypatch, "_lstm_partials", drop_forget)
    errors = _gradient_errors(_problem("lstm", layers, 0.5 if layers > 1 else 0.0))
    assert errors["Wy"] < 1e-6 and errors["by"] < 1e-6, errors  # output layer unaffected
    assert errors["Wh0"] > 1e-3 and errors["b0"] > 1e-3, errors


@pytest.mark.usefixtures("numpy_path")
@pytest.mark.parametrize("layers", [1, 2])
def test_gradient_check_catches_a_dropped_reset_gate_gradient(
    monkeypatch: pytest.MonkeyPatch, layers: int
) -> None:
    def drop_reset(ws: cells.StackWorkspace, H: int) -> None:
        ws.M[..., :H] = 0.0  # dL/d(reset pre-activation) lost

    _broken(monkeypatch, "_gru_partials", drop_reset)
    errors = _gradient_errors(_problem("gru", layers, 0.5 if layers > 1 else 0.0))
    assert errors["Wy"] < 1e-6 and errors["by"] < 1e-6, errors
    assert errors["Wh0"] > 1e-3 and errors["b0"] > 1e-3, errors


@pytest.mark.usefixtures("numpy_path")
def test_gradient_check_catches_a_cell_state_not_carried_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_c_path(ws: cells.StackWorkspace, H: int) -> None:
        ws.K[...] = 0.0  # h_t no longer reaches c_t in the backward

    _broken(monkeypatch, "_lstm_partials", no_c_path)
    errors = _gradient_errors(_problem("lstm", 1, 0.0))
    assert max(errors.values()) > 1e-3, errors
