/* The element-wise work of one time step of the gated cells, for one float type.
 *
 * _kernel.c includes this file once per type, with REAL (float or double), FN(name) (the
 * function name with the type's suffix) and TANH defined. Each step function is the loop body
 * of fast.py's numpy loop for the same cell, fused: one pass over the step's rows instead of 7
 * to 12 numpy calls. Layouts (row-major, C-contiguous; b a strand, H hidden units):
 *   rec   the step's h_{t-1} Wh from numpy, gate-major (gates, B, H), in the weights' gate
 *         order and not halved (the weights are used as they are at batch 1)
 *   hs    (T + 1, B, H) h_t, hs[0] the incoming state
 * LSTM: Z (T + 1, B, 5H), row t = [c_{t-1} | g f i o of step t] (the loop's gate order),
 *       pre (T, B, 4H) x_t Wx + b in the weights' order, tcs (T, B, H) tanh(c_t),
 *       dA (T, B, 4H) dL/da_t in the weights' order g i f o.
 * GRU:  A (T, B, 3H) r z n, pre-activations (input part) in, activations out;
 *       ghn (T, B, H) h_{t-1} Wh_n + bn; dGx (T, B, 4H) [dr, dz, dghn, dn].
 * The sigmoid gates' input part arrives halved (sigmoid(x) = 0.5 tanh(x / 2) + 0.5, as in the
 * numpy path), their rec is halved here: exact in binary floating point, so the same numbers
 * as the numpy path's halved copy of Wh, which the kernel path does without.
 *
 * The per-row functions take restrict parameters (GCC honours restrict on parameters, also
 * once inlined, not on local pointers): without it every loop would need run-time alias checks
 * and most would stay scalar. */

/* act = tanh(pre + rec), or if sig sigmoid: 0.5 tanh(pre + rec / 2) + 0.5 (pre is halved) */
static inline void FN(activate)(Py_ssize_t H, int sig, const REAL *restrict pre,
                                const REAL *restrict rec, REAL *restrict act)
{
    if (sig)
        for (Py_ssize_t j = 0; j < H; j++)
            act[j] = (REAL)0.5 * TANH(pre[j] + (REAL)0.5 * rec[j]) + (REAL)0.5;
    else
        for (Py_ssize_t j = 0; j < H; j++)
            act[j] = TANH(pre[j] + rec[j]);
}

/* a = sigmoid of (a halved) + rec (the GRU's r and z, in place) */
static inline void FN(sigmoid_in_place)(Py_ssize_t H, REAL *restrict a, const REAL *restrict rec)
{
    for (Py_ssize_t j = 0; j < H; j++)
        a[j] = (REAL)0.5 * TANH(a[j] + (REAL)0.5 * rec[j]) + (REAL)0.5;
}

/* c_t = f c_{t-1} + i g, tanh(c_t), h_t = o tanh(c_t) */
static inline void FN(lstm_cell)(Py_ssize_t H, const REAL *restrict z, REAL *restrict c,
                                 REAL *restrict tc, REAL *restrict h)
{
    const REAL *cp = z, *g = z + H, *f = z + 2 * H, *i = z + 3 * H, *o = z + 4 * H;
    for (Py_ssize_t j = 0; j < H; j++) {
        REAL cj = f[j] * cp[j] + i[j] * g[j];
        REAL tj = TANH(cj);
        c[j] = cj;
        tc[j] = tj;
        h[j] = o[j] * tj;
    }
}

static VECTORIZE void FN(lstm_forward)(const Layer *k, Py_ssize_t t)
{
    const Py_ssize_t B = k->B, H = k->H;
    const REAL *pre = k->view[L_PRE].buf, *rec = k->view[L_REC].buf;
    REAL *Z = k->view[L_Z].buf, *tcs = k->view[L_TCS].buf, *hs = k->view[L_HS].buf;
    for (Py_ssize_t b = 0; b < B; b++) {
        const Py_ssize_t row = t * B + b, next = (t + 1) * B + b;
        REAL *z = Z + row * 5 * H;  /* c_{t-1}, g, f, i, o */
        for (int g = 0; g < 4; g++)  /* g (tanh), f, i, o (sigmoid) */
            FN(activate)(H, g > 0, pre + row * 4 * H + WEIGHTS_GATE[g] * H,
                         rec + (WEIGHTS_GATE[g] * B + b) * H, z + (g + 1) * H);
        /* c_t goes into the next row's first block */
        FN(lstm_cell)(H, z, Z + next * 5 * H, tcs + row * H, hs + next * H);
    }
}

/* dc (in: dL/dc_{t+1} f_{t+1}; out: dL/dc_t f_t) and dA from d = dL/dh_t */
static inline void FN(lstm_grad)(Py_ssize_t H, const REAL *restrict z, const REAL *restrict tc,
                                 const REAL *restrict dh, const REAL *restrict carry,
                                 REAL *restrict dc, REAL *restrict da)
{
    const REAL *cp = z, *g = z + H, *f = z + 2 * H, *i = z + 3 * H, *o = z + 4 * H;
    REAL *dg = da, *di = da + H, *df = da + 2 * H, *dout = da + 3 * H;
    for (Py_ssize_t j = 0; j < H; j++) {
        REAL d = dh[j] + carry[j], tj = tc[j];
        REAL dcj = dc[j] + d * (o[j] * ((REAL)1 - tj * tj));
        dg[j] = dcj * (i[j] * ((REAL)1 - g[j] * g[j]));
        di[j] = dcj * (g[j] * i[j] * ((REAL)1 - i[j]));
        df[j] = dcj * (cp[j] * f[j] * ((REAL)1 - f[j]));
        dout[j] = d * (tj * o[j] * ((REAL)1 - o[j]));
        dc[j] = dcj * f[j];
    }
}

/* dL/dh_t = dH[t] + carry (carry = dL/da_{t+1} Wh^T from numpy, zero at the last step); dc is
 * zero at the last step. */
static VECTORIZE void FN(lstm_backward)(const Layer *k, Py_ssize_t t)
{
    const Py_ssize_t B = k->B, H = k->H;
    const REAL *Z = k->view[L_Z].buf, *tcs = k->view[L_TCS].buf, *dH = k->view[L_DH].buf;
    const REAL *carry = k->view[L_CARRY].buf;
    REAL *dc = k->view[L_DC].buf, *dA = k->view[L_DA].buf;
    for (Py_ssize_t b = 0; b < B; b++) {
        const Py_ssize_t row = t * B + b;
        FN(lstm_grad)(H, Z + row * 5 * H, tcs + row * H, dH + row * H, carry + b * H,
                      dc + b * H, dA + row * 4 * H);
    }
}

/* ghn = h_{t-1} Wh_n + bn, n = tanh(x_t Wx_n + b_n + r ghn), h_t = n + z (h_{t-1} - n) */
static inline void FN(gru_cell)(Py_ssize_t H, REAL *restrict a, const REAL *restrict rn,
                                const REAL *restrict bn, const REAL *restrict hp,
                                REAL *restrict ghn, REAL *restrict h)
{
    const REAL *r = a, *z = a + H;
    REAL *n = a + 2 * H;
    for (Py_ssize_t j = 0; j < H; j++) {
        REAL g = rn[j] + bn[j];
        REAL nj = TANH(n[j] + r[j] * g);
        ghn[j] = g;
        n[j] = nj;
        h[j] = nj + z[j] * (hp[j] - nj);
    }
}

static VECTORIZE void FN(gru_forward)(const Layer *k, Py_ssize_t t)
{
    const Py_ssize_t B = k->B, H = k->H;
    const REAL *rec = k->view[G_REC].buf, *bn = k->view[G_BN].buf;
    REAL *A = k->view[G_A].buf, *ghn = k->view[G_GHN].buf, *hs = k->view[G_HS].buf;
    for (Py_ssize_t b = 0; b < B; b++) {
        const Py_ssize_t row = t * B + b;
        REAL *a = A + row * 3 * H;  /* r, z, n */
        for (int g = 0; g < 2; g++)  /* r, z */
            FN(sigmoid_in_place)(H, a + g * H, rec + (g * B + b) * H);
        FN(gru_cell)(H, a, rec + (2 * B + b) * H, bn, hs + row * H, ghn + row * H,
                     hs + ((t + 1) * B + b) * H);
    }
}

/* dGx's row [dr, dz, dghn, dn] from d = dL/dh_t; dprev (dL/dh_{t-1} from above, or NULL at
 * t = 0) gets the direct path h_{t-1} -> h_t, z d. */
static inline void FN(gru_grad)(Py_ssize_t H, const REAL *restrict a, const REAL *restrict ghn,
                                const REAL *restrict hp, const REAL *restrict dh,
                                const REAL *restrict carry, REAL *restrict dg,
                                REAL *restrict dprev)
{
    const REAL *r = a, *z = a + H, *n = a + 2 * H;
    REAL *dr = dg, *dz = dg + H, *dghn = dg + 2 * H, *dn = dg + 3 * H;
    for (Py_ssize_t j = 0; j < H; j++) {
        REAL d = dh[j] + carry[j];
        REAL dnj = d * (((REAL)1 - z[j]) * ((REAL)1 - n[j] * n[j]));
        dr[j] = dnj * (ghn[j] * r[j] * ((REAL)1 - r[j]));
        dz[j] = d * ((hp[j] - n[j]) * z[j] * ((REAL)1 - z[j]));
        dghn[j] = dnj * r[j];
        dn[j] = dnj;
    }
    if (dprev)
        for (Py_ssize_t j = 0; j < H; j++)
            dprev[j] += (dh[j] + carry[j]) * z[j];
}

/* dL/dh_t = dH[t] + carry (carry = dL/d(h_t Wh [+ bn]) Wh^T from numpy, zero at the last
 * step); the direct path z h_{t-1} is added into dH[t - 1] here, not through carry. */
static VECTORIZE void FN(gru_backward)(const Layer *k, Py_ssize_t t)
{
    const Py_ssize_t B = k->B, H = k->H;
    const REAL *A = k->view[G_A].buf, *ghn = k->view[G_GHN].buf, *hs = k->view[G_HS].buf;
    const REAL *carry = k->view[G_CARRY].buf;
    REAL *dH = k->view[G_DH].buf, *dGx = k->view[G_DGX].buf;
    for (Py_ssize_t b = 0; b < B; b++) {
        const Py_ssize_t row = t * B + b;
        FN(gru_grad)(H, A + row * 3 * H, ghn + row * H, hs + row * H, dH + row * H,
                     carry + b * H, dGx + row * 4 * H, t > 0 ? dH + (row - B) * H : NULL);
    }
}

static inline void FN(add_row)(Py_ssize_t W, REAL *restrict dst, const REAL *restrict src)
{
    for (Py_ssize_t j = 0; j < W; j++)
        dst[j] += src[j];
}

/* out[v] = the sum of rows[n] over the n with ids[n] == v (dL/dWx0 from the one-hot inputs:
 * what a one-hot matrix product computes, in one pass over rows). Checked by scatter_sum(). */
static VECTORIZE void FN(scatter_sum)(const Py_buffer *out, const Py_buffer *ids,
                                      const Py_buffer *rows)
{
    const Py_ssize_t V = out->shape[0], W = out->shape[1], N = rows->shape[0];
    const int64_t *id = ids->buf;
    for (Py_ssize_t v = 0; v < V; v++)
        memset((char *)out->buf + v * out->strides[0], 0, W * sizeof(REAL));
    for (Py_ssize_t n = 0; n < N; n++)
        FN(add_row)(W, (REAL *)((char *)out->buf + id[n] * out->strides[0]),
                    (const REAL *)((const char *)rows->buf + n * rows->strides[0]));
}
