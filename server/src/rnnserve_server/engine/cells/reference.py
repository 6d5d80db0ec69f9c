"""The reference: the same math, one equation per line, time step by time step."""

from __future__ import annotations

import numpy as np

from .spec import (
    Spec,
)


def _sig(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


def cell_forward(
    cell: str,
    xp: np.ndarray,
    h: np.ndarray,
    c: np.ndarray | None,
    Wh: np.ndarray,
    bn: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...]]:
    """One step of one layer from xp = x Wx + b (B, G): (h_t, c_t, what backward needs)."""
    H = h.shape[1]
    if cell == "rnn":
        hn = np.tanh(xp + h @ Wh)
        return hn, None, (h, hn)
    if cell == "lstm":
        assert c is not None
        a = xp + h @ Wh
        g, i = np.tanh(a[:, :H]), _sig(a[:, H : 2 * H])
        f, o = _sig(a[:, 2 * H : 3 * H]), _sig(a[:, 3 * H :])
        cn = f * c + i * g
        hn = o * np.tanh(cn)
        return hn, cn, (h, c, g, i, f, o, cn)
    assert bn is not None
    gh = h @ Wh
    r = _sig(xp[:, :H] + gh[:, :H])
    z = _sig(xp[:, H : 2 * H] + gh[:, H : 2 * H])
    ghn = gh[:, 2 * H :] + bn
    n = np.tanh(xp[:, 2 * H :] + r * ghn)
    hn = (1.0 - z) * n + z * h
    return hn, None, (h, r, z, n, ghn)


def _cell_backward(
    cell: str, dh: np.ndarray, dc: np.ndarray | None, cache: tuple[np.ndarray, ...], Wh: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Given dL/dh_t and dL/dc_t (from t+1), return dL/dxp, dL/d(h_{t-1} Wh [+ bn]),
    dL/dh_{t-1} and dL/dc_{t-1}."""
    if cell == "rnn":
        _, hn = cache
        da = dh * (1.0 - hn * hn)
        return da, da, da @ Wh.T, None
    if cell == "lstm":
        assert dc is not None
        _, c, g, i, f, o, cn = cache
        tc = np.tanh(cn)
        do = dh * tc
        dc = dc + dh * o * (1.0 - tc * tc)
        dg, di, df = dc * i, dc * g, dc * c
        da = np.concatenate(
            [dg * (1.0 - g * g), di * i * (1.0 - i), df * f * (1.0 - f), do * o * (1.0 - o)], axis=1
        )
        return da, da, da @ Wh.T, dc * f
    h, r, z, n, ghn = cache
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h - n) * z * (1.0 - z)
    dr = dn * ghn * r * (1.0 - r)
    dax = np.concatenate([dr, dz, dn], axis=1)
    dah = np.concatenate([dr, dz, dn * r], axis=1)
    return dax, dah, dah @ Wh.T + dh * z, None


def reference_loss_and_grads(
    spec: Spec,
    p: dict[str, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    state: np.ndarray,
    masks: list[np.ndarray] | None = None,
) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    """``loss_and_grads`` written plainly: returns (loss, grads, final state)."""
    B, T = inputs.shape
    L, H = spec.num_layers, spec.hidden_size
    grads = {name: np.zeros_like(w) for name, w in p.items()}
    layers = [spec.layer_state(state, li) for li in range(L)]
    hc = [(h.copy(), None if c is None else c.copy()) for h, c in layers]
    caches: list[list[tuple[np.ndarray | None, tuple[np.ndarray, ...]]]] = []
    tops: list[np.ndarray] = []
    for t in range(T):
        inp: np.ndarray | None = None
        step: list[tuple[np.ndarray | None, tuple[np.ndarray, ...]]] = []
        for li in range(L):
            xp = (p["Wx0"][inputs[:, t]] if inp is None else inp @ p[f"Wx{li}"]) + p[f"b{li}"]
            h, c, cache = cell_forward(
                spec.cell, xp, hc[li][0], hc[li][1], p[f"Wh{li}"], p.get(f"bn{li}")
            )
            hc[li] = (h, c)
            step.append((inp, cache))
            inp = h * masks[li][t] if masks is not None and li < L - 1 else h
        assert inp is not None
        caches.append(step)
        tops.append(inp)
    loss = 0.0
    dh_next = [np.zeros((B, H), p["Wy"].dtype) for _ in range(L)]
    dc_next = [np.zeros((B, H), p["Wy"].dtype) if spec.cell == "lstm" else None for _ in range(L)]
    for t in range(T - 1, -1, -1):
        top = tops[t]
        y = top @ p["Wy"] + p["by"]
        y = y - y.max(axis=1, keepdims=True)
        prob = np.exp(y) / np.exp(y).sum(axis=1, keepdims=True)
        loss -= float(np.log(prob[np.arange(B), targets[:, t]]).sum()) / B
        dy = prob
        dy[np.arange(B), targets[:, t]] -= 1.0
        dy /= B
        grads["Wy"] += top.T @ dy
        grads["by"] += dy.sum(axis=0)
        dout = dy @ p["Wy"].T
        for li in range(L - 1, -1, -1):
            below, cache = caches[t][li]
            dax, dah, dh_next[li], dc_next[li] = _cell_backward(
                spec.cell, dout + dh_next[li], dc_next[li], cache, p[f"Wh{li}"]
            )
            grads[f"Wh{li}"] += cache[0].T @ dah
            grads[f"b{li}"] += dax.sum(axis=0)
            if spec.cell == "gru":
                grads[f"bn{li}"] += dah[:, 2 * H :].sum(axis=0)
            if below is None:
                np.add.at(grads["Wx0"], inputs[:, t], dax)
            else:
                grads[f"Wx{li}"] += below.T @ dax
                dout = dax @ p[f"Wx{li}"].T
                if masks is not None:
                    dout = dout * masks[li - 1][t]
    final = np.empty_like(state)
    for li in range(L):
        h, c = spec.layer_state(final, li)
        h[...] = hc[li][0]
        if c is not None:
            c[...] = hc[li][1]
    return loss, grads, final
