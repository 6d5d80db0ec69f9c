"""The gated cells' C step kernel (engine/cells/_kernel.c): built, the same numbers as the numpy
path in float32 and float64, and bad buffers refused with an exception (never a crash)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from rnnserve_server.engine.cells import (
    Spec,
    StackWorkspace,
    _kernel,
    dropout_masks,
    fast,
    init_stack,
    loss_and_grads,
)

pytestmark = pytest.mark.timeout(60)


def test_the_kernel_is_built_and_chosen_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make install` builds it (the import above fails this file otherwise); without the
    variable the engine uses it, RNNSERVE_ENGINE_KERNEL=numpy turns it off."""
    monkeypatch.delenv(fast.KERNEL_VARIABLE, raising=False)
    assert fast.load_kernel() is _kernel
    monkeypatch.setenv(fast.KERNEL_VARIABLE, "c")
    assert fast.load_kernel() is _kernel
    monkeypatch.setenv(fast.KERNEL_VARIABLE, "numpy")
    assert fast.load_kernel() is None
    monkeypatch.setenv(fast.KERNEL_VARIABLE, "fortran")
    with pytest.raises(ValueError, match="RNNSERVE_ENGINE_KERNEL must be c or numpy"):
        fast.load_kernel()


def _run(
    monkeypatch: pytest.MonkeyPatch, kernel: Any, spec: Spec, dtype: str, B: int, T: int
) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
    """One training window (dropout 0.3 between layers) from a nonzero state."""
    monkeypatch.setattr(fast, "KERNEL", kernel)
    rng = np.random.default_rng(3)
    _, params = init_stack(spec, rng, dtype)
    for p in params.values():  # nonzero biases; weights large enough to saturate some gates
        p += rng.uniform(-0.5, 0.5, p.shape).astype(dtype)
    inputs = rng.integers(0, spec.vocab_size, size=(B, T))
    targets = rng.integers(0, spec.vocab_size, size=(B, T))
    state = np.tanh(rng.standard_normal((B, spec.state_size))).astype(dtype)
    masks = dropout_masks(spec, 0.3, T, B, np.random.default_rng(4), np.dtype(dtype))
    grads = {k: np.empty_like(v) for k, v in params.items()}
    loss, final = loss_and_grads(spec, params, inputs, targets, state, grads, masks=masks)
    return loss, final, grads


@pytest.mark.parametrize(("dtype", "rtol"), [("float32", 2e-4), ("float64", 1e-10)])
@pytest.mark.parametrize(("B", "H"), [(1, 16), (3, 37)])  # 37: the vector loops' remainders
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_kernel_matches_the_numpy_path(
    monkeypatch: pytest.MonkeyPatch, cell: str, layers: int, B: int, H: int, dtype: str, rtol: float
) -> None:
    spec = Spec(cell, 11, H, layers)
    loss, final, grads = _run(monkeypatch, _kernel, spec, dtype, B, T=9)
    ref_loss, ref_final, ref_grads = _run(monkeypatch, None, spec, dtype, B, T=9)
    assert loss == pytest.approx(ref_loss, rel=rtol)
    assert final.dtype == ref_final.dtype == np.dtype(dtype)
    np.testing.assert_allclose(final, ref_final, rtol=rtol, atol=rtol)
    for name, g in grads.items():
        assert g.dtype == np.dtype(dtype), name
        scale = float(np.abs(ref_grads[name]).max())
        np.testing.assert_allclose(g, ref_grads[name], rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_float32_tanh_saturates_and_keeps_nan(
    cell: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Huge pre-activations (every gate saturated) give what numpy's tanh gives; a NaN weight
    makes the loss NaN (training notices it) instead of being clipped away."""
    spec = Spec(cell, 11, 16, 1)
    _, params = init_stack(spec, np.random.default_rng(0), "float32")
    params["Wx0"][...] *= 1e4
    inputs = np.arange(8).reshape(1, 8) % 11
    state = np.zeros((1, spec.state_size), np.float32)
    grads = {k: np.empty_like(v) for k, v in params.items()}
    results = []
    for kernel in (_kernel, None):
        monkeypatch.setattr(fast, "KERNEL", kernel)
        results.append(loss_and_grads(spec, params, inputs, inputs, state, grads))
    (loss, final), (ref_loss, ref_final) = results
    assert np.isfinite(loss) and loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(final, ref_final, atol=1e-6)
    monkeypatch.setattr(fast, "KERNEL", _kernel)
    params["Wh0"][0, 0] = np.nan
    loss, _ = loss_and_grads(spec, params, inputs, inputs, state, grads)
    assert np.isnan(loss)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_kernel_tanh_is_within_two_ulp(dtype: str) -> None:
    """The kernel's own tanh (vectorizable, unlike libm's) over the whole range, tiny inputs,
    infinities and NaN: a GRU step with no recurrent part gives n = tanh(input part)."""
    x = np.concatenate(
        [np.linspace(-30, 30, 60001), np.geomspace(1e-30, 1.0, 3001), [0.625, -0.625]]
    )
    x = np.concatenate([x, -x, [np.inf, -np.inf, np.nan]]).astype(dtype)
    H = x.size
    A = np.zeros((1, 1, 3 * H), dtype)
    A[0, 0, 2 * H :] = x
    ghn, hs, rec, bn = (np.zeros(shape, dtype) for shape in [(1, 1, H), (2, 1, H), 3 * H, H])
    dH, carry, dGx = np.zeros((1, 1, H), dtype), np.zeros((1, H), dtype), np.zeros((1, 1, 4 * H))
    _kernel.gru(A, ghn, hs, rec, bn, dH, carry, dGx.astype(dtype)).forward(0)
    got = A[0, 0, 2 * H :]
    exact = np.tanh(x.astype(np.longdouble))
    ulp = np.spacing(np.abs(exact.astype(dtype)))
    finite = np.isfinite(x)
    assert np.all(np.abs(got[finite] - exact[finite]) <= 2 * ulp[finite])
    assert list(got[~finite][:2]) == [1.0, -1.0] and np.isnan(got[-1])


def _lstm_arrays(T: int = 3, B: int = 2, H: int = 4, dtype: str = "float32") -> list[np.ndarray]:
    """lstm()'s arguments, in order, from a real workspace."""
    ws = StackWorkspace(Spec("lstm", 5, H, 1), T, B, dtype)
    return [
        ws.pre,
        ws.Z[0],
        ws.tcs[0],
        ws.hs[0],
        ws.tmpg.reshape(-1),
        ws.dH,
        ws.carry,
        ws.dc,
        ws.dA,
    ]


def _gru_arrays(T: int = 3, B: int = 2, H: int = 4) -> list[np.ndarray]:
    ws = StackWorkspace(Spec("gru", 5, H, 1), T, B, "float32")
    assert ws.dGx is not None
    return [ws.A[0], ws.ghn[0], ws.hs[0], ws.tmpg.reshape(-1), ws.tmpH2[0], ws.dH, ws.carry, ws.dGx]


def _replaced(arrays: list[np.ndarray], i: int, bad: Any) -> list[Any]:
    out: list[Any] = list(arrays)
    out[i] = bad
    return out


@pytest.mark.parametrize(
    ("make", "index", "damage", "error", "match"),
    [
        ("lstm", 1, lambda a: a[:-1], ValueError, "Z has the shape"),
        ("lstm", 0, lambda a: a.reshape(a.shape[0], -1), ValueError, "pre has the shape"),
        ("lstm", 2, lambda a: a.astype(np.float64), TypeError, "tcs is float64"),
        ("lstm", 1, lambda a: a.astype(np.int32), TypeError, "Z must be float32 or float64"),
        ("lstm", 6, lambda a: np.asfortranarray(np.ones((4, 2), a.dtype)), TypeError, "carry"),
        ("lstm", 8, lambda a: a[:, :, ::2], TypeError, "dA must be a C-contiguous"),
        ("lstm", 4, lambda a: a[:-1], ValueError, "rec has the shape"),
        ("lstm", 5, lambda a: a.tolist(), TypeError, "dH must be"),
        ("lstm", 3, lambda a: a[:, :0], ValueError, "hs must be"),
        ("gru", 4, lambda a: a[:-1], ValueError, "bn has the shape"),
        ("gru", 7, lambda a: a[..., :-1].copy(), ValueError, "dGx has the shape"),
        ("gru", 2, lambda a: a[:1], ValueError, "hs must be"),
    ],
)
def test_bad_buffers_are_refused(
    make: str, index: int, damage: Any, error: type[Exception], match: str
) -> None:
    arrays = _lstm_arrays() if make == "lstm" else _gru_arrays()
    with pytest.raises(error, match=match):
        getattr(_kernel, make)(*_replaced(arrays, index, damage(arrays[index])))


def test_read_only_outputs_wrong_counts_and_steps_are_refused() -> None:
    arrays = _lstm_arrays()
    frozen = arrays[1].copy()
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match="Z must be a C-contiguous, writable"):
        _kernel.lstm(*_replaced(arrays, 1, frozen))
    read_only_input = arrays[0].copy()
    read_only_input.flags.writeable = False
    _kernel.lstm(*_replaced(arrays, 0, read_only_input))  # inputs may be read-only
    with pytest.raises(TypeError, match=r"takes 9 arrays \(8 given\)"):
        _kernel.lstm(*arrays[:-1])
    layer = _kernel.lstm(*arrays)
    for t in (-1, 3, 2**70):
        with pytest.raises((IndexError, OverflowError)):
            layer.forward(t)
    with pytest.raises(TypeError):
        layer.backward("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one argument"):
        layer.forward()  # type: ignore[call-arg]
    for t in range(3):  # the steps in range run (on whatever the buffers hold)
        layer.forward(t)
        layer.backward(t)
    with pytest.raises(TypeError):
        _kernel.Layer()


def test_a_layer_keeps_its_arrays_alive() -> None:
    """The kernel holds the buffers it was given: dropping every other reference is safe."""
    layer = _kernel.gru(*_gru_arrays(T=5, B=3, H=8))
    for t in range(5):
        layer.forward(t)
        layer.backward(t)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scatter_sum_is_the_one_hot_product(dtype: str) -> None:
    """dL/dWx0 without the one-hot matrix: repeated ids add up, ids never seen give zero rows,
    and both out and rows may be column blocks of wider arrays (the GRU's two dA blocks)."""
    rng = np.random.default_rng(5)
    V, N = 7, 40
    ids = rng.integers(0, V - 2, N)  # the last two ids never occur
    wide_rows = rng.standard_normal((N, 30)).astype(dtype)
    rows = wide_rows[:, 5:17]
    out_wide = np.full((V, 20), np.nan, dtype)
    out = out_wide[:, 3:15]
    _kernel.scatter_sum(out, ids, rows)
    onehot = np.zeros((N, V))
    onehot[np.arange(N), ids] = 1.0
    np.testing.assert_allclose(out, onehot.T @ rows, rtol=1e-6, atol=1e-6)
    assert np.all(out[V - 2 :] == 0.0)
    assert np.isnan(out_wide[:, :3]).all() and np.isnan(out_wide[:, 15:]).all()  # only out
    _kernel.scatter_sum(out[:, :0], ids[:0], rows[:0, :0])  # nothing to do is fine


def test_scatter_sum_refuses_bad_ids_and_buffers_before_writing() -> None:
    out = np.full((5, 4), 7.0, np.float32)
    rows = np.ones((3, 4), np.float32)
    ids = np.array([0, 4, 2])
    bad: list[tuple[tuple[Any, ...], type[Exception], str]] = [
        ((out, np.array([0, 5, 1]), rows), ValueError, r"ids\[1\] = 5 is outside 0 .. 4"),
        ((out, np.array([0, -1, 1]), rows), ValueError, r"ids\[1\] = -1"),
        ((out, ids.astype(np.int32), rows), TypeError, "ids int64"),
        ((out, ids.astype(np.float64), rows), TypeError, "ids int64"),
        ((out, ids, rows.astype(np.float64)), TypeError, "float32 or float64 alike"),
        ((out, ids[:2], rows), ValueError, r"rows \(N, W\) and ids \(N,\)"),
        ((out, ids, np.ones((3, 5), np.float32)), ValueError, r"out must be \(V, W\)"),
        ((out, ids, np.ones((3, 8), np.float32)[:, ::2]), ValueError, "must be contiguous"),
        ((out.T, ids[:2] % 4, np.ones((2, 5), np.float32)), ValueError, "must be contiguous"),
        ((out, ids), TypeError, r"takes 3 arrays \(2 given\)"),
    ]
    for args, error, match in bad:
        with pytest.raises(error, match=match):
            _kernel.scatter_sum(*args)
    frozen = out.copy()
    frozen.flags.writeable = False
    with pytest.raises((TypeError, ValueError, BufferError)):
        _kernel.scatter_sum(frozen, ids, rows)
    assert np.all(out == 7.0)  # nothing was written by a refused call
