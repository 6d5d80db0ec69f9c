"""The fast forward/backward over a window (buffers reused; only the recurrence loops).

The gated cells' per-step element-wise work runs in one C call a step (_kernel.c) when that
extension is built, else in numpy; RNNSERVE_ENGINE_KERNEL=numpy forces numpy (benchmarks' A/B,
or a build without a compiler), =c fails at import if the extension is missing."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

from .spec import (
    Spec,
    StackWorkspace,
    loop_order,
)

KERNEL_VARIABLE = "RNNSERVE_ENGINE_KERNEL"


def load_kernel() -> ModuleType | None:
    """The compiled step kernel, or None for the numpy path (see the module's docstring)."""
    choice = os.environ.get(KERNEL_VARIABLE, "")
    if choice not in ("", "c", "numpy"):
        raise ValueError(f"{KERNEL_VARIABLE} must be c or numpy, not {choice!r}")
    if choice == "numpy":
        return None
    try:
        from . import _kernel
    except ImportError:
        if choice == "c":
            raise
        return None
    return _kernel


KERNEL = load_kernel()  # tests and benchmarks set it to compare the two paths


def _kernel_layer(spec: Spec, ws: StackWorkspace, li: int) -> Any:
    """Layer li's buffers exported to the C kernel once per workspace (all of them are the
    workspace's own; GRU's bn is read from ws.tmpH2[0], which _forward_layer fills)."""
    layer = ws.kernel_layers.get(li)
    if layer is None:
        assert KERNEL is not None
        rec = ws.tmpg.reshape(-1)
        if spec.cell == "lstm":
            layer = KERNEL.lstm(
                ws.pre, ws.Z[li], ws.tcs[li], ws.hs[li], rec, ws.dH, ws.carry, ws.dc, ws.dA
            )
        else:
            assert ws.dGx is not None
            layer = KERNEL.gru(
                ws.A[li], ws.ghn[li], ws.hs[li], rec, ws.tmpH2[0], ws.dH, ws.carry, ws.dGx
            )
        ws.kernel_layers[li] = layer
    return layer


def _recurrent_weights(spec: Spec, Wh: np.ndarray, ws: StackWorkspace) -> np.ndarray:
    """Wh (H, n*H) copied into ``ws.Whg`` in the recurrence's layout (``ws.gate_major``; the
    LSTM's gates in loop_order)."""
    H = Wh.shape[0]
    if ws.gate_major:  # (n, H, H), seen as (H, n, H)
        blocks = ws.Whg.transpose(1, 0, 2)
        if spec.cell == "lstm":
            loop_order(spec, Wh, blocks)
        else:
            np.copyto(blocks, Wh.reshape(H, -1, H))
    elif spec.cell == "lstm":
        loop_order(spec, Wh, ws.Whg)
    else:
        np.copyto(ws.Whg, Wh)
    return ws.Whg


def _forward_layer(
    spec: Spec, p: dict[str, np.ndarray], li: int, ws: StackWorkspace, T: int
) -> None:
    """The recurrence of layer li over t = 1..T; ``ws.A[li]`` holds x_t Wx + b on entry,
    ``ws.hs[li][0]`` (and ``ws.cs[li][0]``) the incoming state."""
    H = spec.hidden_size
    Wh = p[f"Wh{li}"]
    tmp, tmpH, steps = ws.tmp, ws.tmpH, ws.fwd_views[li][:T]
    dot, add, mul, tanh = np.dot, np.add, np.multiply, np.tanh
    matmul = np.matmul if ws.gate_major else np.dot  # np.dot: less call overhead at B = 1
    if KERNEL is not None and spec.cell != "rnn":
        _kernel_forward(spec, p, li, ws, steps, matmul)
    elif spec.cell == "rnn":
        for a, h_prev, h in steps:
            dot(h_prev, Wh, out=tmp)
            add(a, tmp, out=h)
            tanh(h, out=h)
    elif spec.cell == "lstm":
        # sigmoid(x) = 0.5 tanh(x/2) + 0.5: the f, i, o columns are halved (in the input part
        # ws.pre by forward(), in a copy of Wh here) so one tanh covers all four gates.
        Whg, tmpg, half = _recurrent_weights(spec, Wh, ws), ws.tmpg, ws.half
        ws.gates(Whg, 1, 4)[...] *= 0.5
        P = ws.P
        P0, P1 = P[:, :H], P[:, H:]
        # 9 numpy calls a step, on same-shape operands (Z[t] = [c_{t-1}, g, f, i, o]).
        for pre, a_g, a, s, fi, cg, c, tc, o, h_prev, h in steps:
            matmul(h_prev, Whg, out=tmpg)
            add(pre, tmpg, out=a_g)
            tanh(a, out=a)
            mul(s, half, out=s)
            add(s, half, out=s)
            mul(fi, cg, out=P)  # [f c_{t-1}, i g]
            add(P0, P1, out=c)
            tanh(c, out=tc)
            mul(o, tc, out=h)
    else:  # gru
        bn = ws.tmpH2  # bn{li} (H,) as (B, H): a broadcast operand costs ~3x at B = 1
        np.copyto(bn, p[f"bn{li}"])
        Whg, tmpg, half, sub = _recurrent_weights(spec, Wh, ws), ws.tmpg, ws.half, np.subtract
        ws.gates(Whg, 0, 2)[...] *= 0.5  # r, z: sigmoid as tanh, as for the LSTM above
        tmp_rz, tmp_n = ws.gates(tmpg, 0, 2), ws.gates(tmpg, 2, 3)
        # 12 numpy calls a step, on same-shape operands
        for rz, rz_g, r, z, n, ghn, h_prev, h in steps:
            matmul(h_prev, Whg, out=tmpg)
            add(rz_g, tmp_rz, out=rz_g)
            tanh(rz, out=rz)
            mul(rz, half, out=rz)
            add(rz, half, out=rz)
            add(tmp_n, bn, out=ghn)
            mul(r, ghn, out=tmpH)
            add(n, tmpH, out=n)
            tanh(n, out=n)
            sub(h_prev, n, out=tmpH)
            mul(z, tmpH, out=tmpH)
            add(n, tmpH, out=h)


def _weights_order(spec: Spec, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``w`` as it is: the C kernel reads the input part in the weights' gate order (the
    numpy loop needs loop_order's copy)."""
    return w


def _kernel_forward(
    spec: Spec,
    p: dict[str, np.ndarray],
    li: int,
    ws: StackWorkspace,
    steps: list[Any],
    matmul: Any,
) -> None:
    """The gated recurrence with the C kernel: per step numpy's h_{t-1} Wh, then one call.
    Wh as it is (the kernel halves the sigmoid gates' part itself and reads the gates in the
    weights' order): no copy at B = 1, only the gate-major one for B > 1."""
    H, Wh = spec.hidden_size, p[f"Wh{li}"]
    if spec.cell == "gru":
        np.copyto(ws.tmpH2, p[f"bn{li}"])  # the kernel reads bn from tmpH2[0]
    if ws.gate_major:
        np.copyto(ws.Whg.transpose(1, 0, 2), Wh.reshape(H, -1, H))
        Wh = ws.Whg
    step, rec = _kernel_layer(spec, ws, li).forward, ws.tmpg
    for t, views in enumerate(steps):
        matmul(views[-2], Wh, out=rec)  # views[-2]: h_{t-1}
        step(t)


def forward(
    spec: Spec,
    p: dict[str, np.ndarray],
    xs: np.ndarray,
    state: np.ndarray,
    ws: StackWorkspace,
    masks: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run every layer over ``xs`` (T, B) intp ids from ``state`` (B, S).

    Returns the top layer's outputs (T, B, H) (a view into ``ws``) and the final state (B, S),
    a new array."""
    T = xs.shape[0]
    H, G, N = spec.hidden_size, spec.gates, xs.size
    new_state = np.empty_like(state)
    inp: np.ndarray | None = None
    # The sigmoid gates' columns (LSTM i, f, o; GRU r, z): their input part is halved here,
    # sigmoid(x) = 0.5 tanh(x/2) + 0.5 (_forward_layer). The LSTM's in either gate order.
    sig = {"lstm": slice(H, G), "gru": slice(0, 2 * H)}.get(spec.cell, slice(0))
    order = loop_order if KERNEL is None else _weights_order  # the C kernel reads either
    for li in range(spec.num_layers):
        A = ws.pre if spec.cell == "lstm" else ws.A[li]  # x_t Wx + b, (T, B, G)
        b = order(spec, p[f"b{li}"], ws.bl)
        if inp is None:
            E = ws.E  # the input rows with the bias folded in
            np.add(order(spec, p["Wx0"], E), b, out=E)
            E[:, sig] *= 0.5
            # The input projection as a gather. mode="wrap": ids are checked on the way in, and
            # the default mode="raise" gathers into a hidden copy of A (T x B x G floats).
            np.take(E, xs, axis=0, out=A, mode="wrap")
        else:
            Wx = order(spec, p[f"Wx{li}"], ws.Wxl)
            np.matmul(inp.reshape(N, H), Wx, out=A.reshape(N, G))
            A += b
            A[..., sig] *= 0.5
        h0, c0 = spec.layer_state(state, li)
        ws.hs[li][0] = h0
        if c0 is not None:
            ws.cs[li][0] = c0
        _forward_layer(spec, p, li, ws, T)
        h_last, c_last = spec.layer_state(new_state, li)
        h_last[...] = ws.hs[li][T]
        if c_last is not None:
            c_last[...] = ws.cs[li][T]
        inp = ws.hs[li][1:]
        if masks is not None and li < spec.num_layers - 1:
            np.multiply(inp, masks[li], out=ws.drop[li])
            inp = ws.drop[li]
    assert inp is not None
    return inp, new_state


PARTIAL_BLOCK_NUMBERS = 65536  # a (steps, B, H) block of the gate partials: stays in cache


def _time_chunks(A: np.ndarray, H: int) -> list[slice]:
    """Slices of the time axis of A (T, B, .) with ~PARTIAL_BLOCK_NUMBERS per (steps, B, H)."""
    T, B = A.shape[:2]
    chunk = max(1, PARTIAL_BLOCK_NUMBERS // (B * H))
    return [slice(t0, t0 + chunk) for t0 in range(0, T, chunk)]


def _lstm_partials(spec: Spec, ws: StackWorkspace, li: int) -> None:
    """M = the per-step factors that turn dL/dc_t (g, i, f blocks) and dL/dh_t (o block) into
    dL/da_t, in the weights' gate order; K = o (1 - tanh(c_t)^2), the path from h_t to c_t.
    The window in chunks of time steps of ~64k numbers a block: the temporaries stay small and
    in cache (B 32, H 256: ~6 ms a window against 8-26 ms for the whole window at once)."""
    H = spec.hidden_size
    for t in _time_chunks(ws.A[li], H):
        A, M, tc = ws.A[li][t], ws.M[t], ws.tcs[li][t]  # A: g, f, i, o (loop_order)
        g, f, i, o = A[..., :H], A[..., H : 2 * H], A[..., 2 * H : 3 * H], A[..., 3 * H :]
        M[..., :H] = i * (1.0 - g * g)
        M[..., H : 2 * H] = g * i * (1.0 - i)
        M[..., 2 * H : 3 * H] = ws.cs[li][:-1][t] * f * (1.0 - f)
        M[..., 3 * H : 4 * H] = tc * o * (1.0 - o)
        np.multiply(o, 1.0 - tc * tc, out=ws.K[t])


def _gru_partials(spec: Spec, ws: StackWorkspace, li: int) -> None:
    """Q = (1 - z)(1 - n^2): dL/dh_t -> dL/d(n pre-activation); K = (h_{t-1} - n) z (1 - z):
    dL/dh_t -> dL/d(z pre-activation); M[:, :, :H] = (h Wh_n + bn) r (1 - r): dL/d(n pre)
    -> dL/d(r pre). In chunks of time steps, as _lstm_partials."""
    H = spec.hidden_size
    for t in _time_chunks(ws.A[li], H):
        A = ws.A[li][t]
        r, z, n = A[..., :H], A[..., H : 2 * H], A[..., 2 * H :]
        np.multiply(1.0 - z, 1.0 - n * n, out=ws.Q[t])
        np.multiply((ws.hs[li][:-1][t] - n) * z, 1.0 - z, out=ws.K[t])
        np.multiply(ws.ghn[li][t] * r, 1.0 - r, out=ws.M[t][..., :H])


def _backward_layer(
    spec: Spec, p: dict[str, np.ndarray], li: int, ws: StackWorkspace, T: int
) -> None:
    """BPTT through layer li: ``ws.dH`` holds dL/dh_t from above on entry; fills ``ws.dA``
    (and ``ws.dGh`` for GRU). Nothing flows into the incoming state (truncated BPTT)."""
    WhT = p[f"Wh{li}"].T
    # B > 1: dA_t WhT ran 200 instead of 320 us (B 32, H 256) on a contiguous copy, which costs
    # ~0.8 ms per window (numpy transposes slowly); at B = 1 the copy costs more than it saves.
    if ws.gate_major:
        WhT = ws.WhT
        np.copyto(WhT, p[f"Wh{li}"].T)
    carry, tmpH, steps = ws.carry, ws.tmpH, ws.bwd_views[li][:T]
    dot, add, mul = np.dot, np.add, np.multiply
    if spec.cell == "rnn":
        hs = ws.hs[li][1:]
        D = ws.K  # 1 - h_t^2
        mul(hs, hs, out=D)
        np.subtract(1.0, D, out=D)
        for t in range(T - 1, -1, -1):
            d, D_t, da = steps[t]
            if t < T - 1:
                add(d, carry, out=d)
            mul(d, D_t, out=da)
            if t > 0:
                dot(da, WhT, out=carry)
    elif KERNEL is not None:
        # The gate gradients in one call a step; carry and dc start at zero (the last step's).
        step = _kernel_layer(spec, ws, li).backward
        carry.fill(0.0)
        ws.dc.fill(0.0)
        for t in range(T - 1, 0, -1):
            step(t)
            dot(steps[t][-1], WhT, out=carry)  # steps[t][-1]: dL/da_t (GRU: dL/d(h Wh + bn))
        step(0)
    elif spec.cell == "lstm":
        _lstm_partials(spec, ws, li)
        dc, tmpH = ws.dc, ws.tmpH
        dc.fill(0.0)
        dc3 = dc[:, None, :]
        # 7 numpy calls a step. (Fusing K d and f dc into one product needs f_{t+1} beside
        # K_t, a copy that cost more at B 32 than the call it saves at B 1.)
        for t in range(T - 1, -1, -1):
            d, K_t, M_gif, dA_gif, M_o, dA_o, f, da = steps[t]
            if t < T - 1:
                add(d, carry, out=d)
            mul(d, K_t, out=tmpH)
            add(dc, tmpH, out=dc)  # dL/dc_t: through h_t, and from c_{t+1}
            mul(M_gif, dc3, out=dA_gif)  # g, i, f
            mul(M_o, d, out=dA_o)  # o
            if t > 0:
                mul(dc, f, out=dc)
                dot(da, WhT, out=carry)
    else:  # gru
        _gru_partials(spec, ws, li)
        for t in range(T - 1, -1, -1):
            d, Q_t, K_t, R_t, r, z, dr, dz, dgh_n, dn, dgh = steps[t]
            if t < T - 1:
                add(d, carry, out=d)
            mul(d, Q_t, out=dn)
            mul(d, K_t, out=dz)
            mul(dn, R_t, out=dr)
            mul(dn, r, out=dgh_n)  # d(h Wh_n + bn)
            if t > 0:
                dot(dgh, WhT, out=carry)
                mul(d, z, out=tmpH)
                add(carry, tmpH, out=carry)


def loss_and_grads(
    spec: Spec,
    p: dict[str, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    state: np.ndarray,
    grads: dict[str, np.ndarray],
    ws: StackWorkspace | None = None,
    masks: list[np.ndarray] | None = None,
) -> tuple[float, np.ndarray]:
    """Forward and backward over one window: ``inputs``/``targets`` (B, T) ids, ``state``
    (B, S), ``masks`` the dropout masks (None: no dropout). Writes the exact unclipped
    gradient of the loss into ``grads``; returns ``(loss, final state)``."""
    B, T = inputs.shape
    H, G, N = spec.hidden_size, spec.gates, B * T
    dtype = p["Wy"].dtype
    if ws is None or ws.key != (T, B, dtype):
        ws = StackWorkspace(spec, T, B, dtype)
    xs = np.ascontiguousarray(inputs.T, dtype=np.intp)  # (T, B) time-major
    ys = targets.T.reshape(N)  # (N,) row n = t * B + b
    top, new_state = forward(spec, p, xs, state, ws, masks)
    top_flat = top.reshape(N, H)

    logits = ws.logits  # (N, V)
    np.matmul(top_flat, p["Wy"], out=logits)
    logits += p["by"]
    logits -= logits.max(axis=1, keepdims=True)
    target_logit = logits[ws.rows, ys]
    np.exp(logits, out=logits)
    total = logits.sum(axis=1, keepdims=True)
    loss = float(np.log(total).sum(dtype=np.float64) - target_logit.sum(dtype=np.float64)) / B
    logits /= total
    logits[ws.rows, ys] -= 1.0
    if B > 1:
        logits *= logits.dtype.type(1.0 / B)
    np.matmul(top_flat.T, logits, out=grads["Wy"])
    np.sum(logits, axis=0, out=grads["by"])
    np.matmul(logits, p["Wy"].T, out=ws.dH.reshape(N, H))

    for li in range(spec.num_layers - 1, -1, -1):
        _backward_layer(spec, p, li, ws, T)
        np.matmul(ws.hs[li][:-1].reshape(N, H).T, ws.dGh.reshape(N, G), out=grads[f"Wh{li}"])
        if spec.cell == "gru":
            np.sum(ws.dGh[..., 2 * H :], axis=(0, 1), out=grads[f"bn{li}"])
        # Layer 0's inputs are one-hot: dWx0 is a one-hot matrix product, or with the C kernel
        # a sum of dA's rows by input id (one pass: 10x faster at 128/50/1, 17x at 256/100/32).
        scatter = KERNEL.scatter_sum if KERNEL is not None and li == 0 else None
        xs_flat = xs.reshape(N)
        if li == 0:
            below = ws.onehot
            if scatter is None:
                below[ws.rows, xs_flat] = 1.0
        else:
            below = (ws.drop[li - 1] if masks is not None else ws.hs[li - 1][1:]).reshape(N, H)
        dH = ws.dH.reshape(N, H)
        for k, (cols, part) in enumerate(ws.dA_parts):  # dL/da_t: one block, GRU's two
            dA = part.reshape(N, -1)
            np.sum(dA, axis=0, out=grads[f"b{li}"][cols])
            if scatter is not None:
                scatter(grads["Wx0"][:, cols], xs_flat, dA)
            else:
                np.matmul(below.T, dA, out=grads[f"Wx{li}"][:, cols])
            if li > 0:  # dL/dh_t of the layer below
                tmp = ws.K.reshape(N, H) if k else dH  # K: free until the next partials
                np.matmul(dA, p[f"Wx{li}"][:, cols].T, out=tmp)
                if k:
                    dH += tmp
        if li == 0:
            if scatter is None:
                ws.onehot[ws.rows, xs_flat] = 0.0
        elif masks is not None:
            ws.dH *= masks[li - 1]
    return loss, new_state
