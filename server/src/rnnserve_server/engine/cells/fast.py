"""The fast forward/backward over a window (buffers reused; only the recurrence loops)."""

from __future__ import annotations

import numpy as np

from .spec import (
    Spec,
    StackWorkspace,
)


def _sigmoid_(x: np.ndarray) -> None:
    """x <- sigmoid(x) in place, as 0.5 tanh(x / 2) + 0.5 (no overflow, fewer passes)."""
    np.multiply(x, 0.5, out=x)
    np.tanh(x, out=x)
    np.multiply(x, 0.5, out=x)
    np.add(x, 0.5, out=x)


def _recurrent_weights(Wh: np.ndarray, ws: StackWorkspace) -> np.ndarray:
    """Wh (H, n*H) copied into ``ws.Whg`` in the recurrence's layout (``ws.gate_major``)."""
    if ws.gate_major:
        n, H = ws.Whg.shape[0], Wh.shape[0]
        np.copyto(ws.Whg, Wh.reshape(H, n, H).transpose(1, 0, 2))
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
    if spec.cell == "rnn":
        for a, h_prev, h in steps:
            dot(h_prev, Wh, out=tmp)
            add(a, tmp, out=h)
            tanh(h, out=h)
    elif spec.cell == "lstm":
        # sigmoid(x) = 0.5 tanh(x/2) + 0.5: the i, f, o columns of a are halved (in the
        # bulk input part here, in a copy of Wh) so one tanh covers all four gates.
        A = ws.A[li][:T]
        A[..., H:] *= 0.5
        Whg, tmpg = _recurrent_weights(Wh, ws), ws.tmpg
        ws.gates(Whg, 1, 4)[...] *= 0.5
        for a, a_g, s, g, i, f, o, c_prev, c, tc, h_prev, h in steps:
            matmul(h_prev, Whg, out=tmpg)
            add(a_g, tmpg, out=a_g)
            tanh(a, out=a)
            mul(s, 0.5, out=s)
            add(s, 0.5, out=s)
            mul(f, c_prev, out=c)
            mul(i, g, out=tmpH)
            add(c, tmpH, out=c)
            tanh(c, out=tc)
            mul(o, tc, out=h)
    else:  # gru
        bn = p[f"bn{li}"]
        Whg, tmpg = _recurrent_weights(Wh, ws), ws.tmpg
        tmp_rz, tmp_n = ws.gates(tmpg, 0, 2), ws.gates(tmpg, 2, 3)
        for rz, rz_g, r, z, n, ghn, h_prev, h in steps:
            matmul(h_prev, Whg, out=tmpg)
            add(rz_g, tmp_rz, out=rz_g)
            _sigmoid_(rz)
            add(tmp_n, bn, out=ghn)
            mul(r, ghn, out=tmpH)
            add(n, tmpH, out=n)
            tanh(n, out=n)
            np.subtract(h_prev, n, out=tmpH)
            mul(z, tmpH, out=tmpH)
            add(n, tmpH, out=h)


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
    for li in range(spec.num_layers):
        A = ws.A[li]
        if inp is None:
            np.take(p["Wx0"], xs, axis=0, out=A)  # the input projection as a gather
        else:
            np.matmul(inp.reshape(N, H), p[f"Wx{li}"], out=A.reshape(N, G))
        A += p[f"b{li}"]
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
    dL/da_t; K = o (1 - tanh(c_t)^2), the path from h_t to c_t. The window in chunks of time
    steps of ~64k numbers a block: the temporaries stay small and in cache (B 32, H 256: ~6 ms
    a window against 8-26 ms for the whole window at once)."""
    H = spec.hidden_size
    for t in _time_chunks(ws.A[li], H):
        A, M, tc = ws.A[li][t], ws.M[t], ws.tcs[li][t]
        g, i, f, o = A[..., :H], A[..., H : 2 * H], A[..., 2 * H : 3 * H], A[..., 3 * H :]
        M[..., :H] = i * (1.0 - g * g)
        M[..., H : 2 * H] = g * i * (1.0 - i)
        M[..., 2 * H : 3 * H] = ws.cs[li][:-1][t] * f * (1.0 - f)
        M[..., 3 * H :] = tc * o * (1.0 - o)
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
    elif spec.cell == "lstm":
        _lstm_partials(spec, ws, li)
        dc = ws.dc
        dc.fill(0.0)
        dc3 = dc[:, None, :]
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
            d, Q_t, K_t, R_t, r, z, dr, dz, dn, d_rz, dgh_rz, dgh_n, dgh = steps[t]
            if t < T - 1:
                add(d, carry, out=d)
            mul(d, Q_t, out=dn)
            mul(d, K_t, out=dz)
            mul(dn, R_t, out=dr)
            mul(dn, r, out=dgh_n)  # d(h Wh_n + bn)
            np.copyto(dgh_rz, d_rz)
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
        dA = ws.dA.reshape(N, G)
        np.matmul(ws.hs[li][:-1].reshape(N, H).T, ws.dGh.reshape(N, G), out=grads[f"Wh{li}"])
        np.sum(dA, axis=0, out=grads[f"b{li}"])
        if spec.cell == "gru":
            np.sum(ws.dGh[..., 2 * H :], axis=(0, 1), out=grads[f"bn{li}"])
        if li == 0:
            onehot, xs_flat = ws.onehot, xs.reshape(N)
            onehot[ws.rows, xs_flat] = 1.0
            np.matmul(onehot.T, dA, out=grads["Wx0"])
            onehot[ws.rows, xs_flat] = 0.0
        else:
            below = ws.drop[li - 1] if masks is not None else ws.hs[li - 1][1:]
            np.matmul(below.reshape(N, H).T, dA, out=grads[f"Wx{li}"])
            np.matmul(dA, p[f"Wx{li}"].T, out=ws.dH.reshape(N, H))
            if masks is not None:
                ws.dH *= masks[li - 1]
    return loss, new_state
