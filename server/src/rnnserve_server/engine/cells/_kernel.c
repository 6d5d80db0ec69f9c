/* rnnserve_server.engine.cells._kernel: one C call per time step for the gated cells' element-
 * wise work (gate nonlinearities, cell and hidden update; in the backward the gate gradients).
 * The matrix products stay in numpy (BLAS); fast.py calls a layer's forward(t) after each
 * step's h_{t-1} Wh and backward(t) before each step's dL/da_t Wh^T.
 *
 * lstm(...) and gru(...) check the window's arrays once (dtype, C order, shapes) and keep
 * their buffers exported, so each per-step call costs one int argument: at batch 1 the numpy
 * path's cost is mostly the 7 to 12 calls a step, not the arithmetic.
 *
 * scatter_sum(...) is layer 0's dL/dWx0 for one-hot inputs: rows of dL/da summed by id. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The buffers of a layer, by position in the lstm(...) / gru(...) arguments. */
enum { L_PRE, L_Z, L_TCS, L_HS, L_REC, L_DH, L_CARRY, L_DC, L_DA, L_COUNT };
enum { G_A, G_GHN, G_HS, G_REC, G_BN, G_DH, G_CARRY, G_DGX, G_COUNT };
#define MAX_VIEWS 9
/* The LSTM's gates in Z's (the loop's) order g f i o, as blocks of pre and rec (the weights'
 * order g i f o) */
static const int WEIGHTS_GATE[4] = {0, 2, 1, 3};

typedef struct {
    PyObject_HEAD
    int lstm;             /* 1 LSTM, 0 GRU */
    int f64;              /* 1 float64, 0 float32 */
    int nviews;
    Py_ssize_t T, B, H;
    Py_buffer view[MAX_VIEWS];
} Layer;

/* The portable build (SSE2 on x86-64) runs the float32 tanh below at ~2.5 ns a number, slower
 * than numpy's; AVX2 with FMA at ~0.7. GCC clones the step functions for x86-64-v3 and picks
 * one at load time (an ifunc: glibc), so the wheel still runs on any x86-64. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 \
    && defined(__GLIBC__)
#define VECTORIZE __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTORIZE
#endif

/* tanh for float32 that the compiler can vectorize (libm's tanhf is a call per number):
 * within 1.3 ulp of tanh. |x| < 0.625: Cephes' odd polynomial (no cancellation near 0);
 * otherwise 1 - 2 / (exp(2|x|) + 1) with Cephes' expf (2^n e^r, |r| <= ln 2 / 2). Both sides
 * are computed and one is selected so the loop has no branch (built with -fno-trapping-math).
 * NaN stays NaN. */
static inline float tanh_f32(float x)
{
    float ax = fabsf(x), x2 = x * x;
    float small = ((((-5.70498872745e-3f * x2 + 2.06390887954e-2f) * x2 - 5.37397155531e-2f) * x2
                    + 1.33314422036e-1f) * x2 - 3.33332819422e-1f) * x2 * x + x;
    float y = 2.0f * (ax > 15.0f ? 15.0f : ax);  /* tanh(15) rounds to 1 in float32 */
    float n = (y * 1.44269504089f + 12582912.0f) - 12582912.0f;  /* round(y / ln 2) */
    float r = (y - n * 0.693359375f) + n * 2.12194440e-4f;        /* y - n ln 2, in two parts */
    float e = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
                 + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r
              + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n, n in 0 .. 43 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float big = copysignf(1.0f - 2.0f / (e * scale + 1.0f), x);
    return ax < 0.625f ? small : big;
}

/* The same for float64 (libm's tanh is a call per number, ~4x slower than this; numpy's is
 * vectorized): within 1.4 ulp. |x| < 0.625: Cephes' x + x z P(z) / Q(z); otherwise
 * 1 - 2 / (exp(2|x|) + 1) with Cephes' exp (2^n (1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)))). */
static inline double tanh_f64(double x)
{
    double ax = fabs(x), z = x * x;
    double small = x + x * z
        * (((-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z
            - 1.61468768441708447952e3)
           / (((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z
              + 4.84406305325125486048e3));
    double y = 2.0 * (ax > 20.0 ? 20.0 : ax);  /* tanh(20) rounds to 1 in float64 */
    double n = (y * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;
    double r = (y - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
    double rr = r * r;
    double p = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr
                    + 9.99999999999999999910e-1);
    double q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr
                + 2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
    double e = 1.0 + 2.0 * (p / (q - p));
    double t = n + (4503599627370496.0 + 1023.0);  /* 2^52 + 1023 + n: low bits n + 1023 */
    uint64_t bits;
    memcpy(&bits, &t, sizeof bits);
    bits <<= 52;  /* 2^n, n in 0 .. 58 */
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    double big = copysign(1.0 - 2.0 / (e * scale + 1.0), x);
    return ax < 0.625 ? small : big;
}

#define CAT(a, b) a##_##b
#define NAME(a, b) CAT(a, b)

#define REAL float
#define FN(name) NAME(name, f32)
#define TANH tanh_f32
#include "_kernel_step.h"
#undef REAL
#undef FN
#undef TANH

#define REAL double
#define FN(name) NAME(name, f64)
#define TANH tanh_f64
#include "_kernel_step.h"
#undef REAL
#undef FN
#undef TANH

/* ---------------------------------------------------------------------------------------- */

static void layer_dealloc(Layer *self)
{
    for (int i = 0; i < self->nviews; i++)
        PyBuffer_Release(&self->view[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Above this many numbers a step, the GIL is released for it (as numpy does for big loops):
 * below, taking it back costs more than the step. */
#define RELEASE_GIL_NUMBERS 4096

typedef void (*step_fn)(const Layer *, Py_ssize_t);

static PyObject *run_step(Layer *self, PyObject *const *args, Py_ssize_t nargs, step_fn fn)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "a step takes one argument, the time step t");
        return NULL;
    }
    Py_ssize_t t = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
    if (t == -1 && PyErr_Occurred())
        return NULL;
    if (t < 0 || t >= self->T) {
        PyErr_Format(PyExc_IndexError, "time step %zd outside 0 .. %zd", t, self->T - 1);
        return NULL;
    }
    if (self->B * self->H >= RELEASE_GIL_NUMBERS) {
        Py_BEGIN_ALLOW_THREADS
        fn(self, t);
        Py_END_ALLOW_THREADS
    } else {
        fn(self, t);
    }
    Py_RETURN_NONE;
}

static PyObject *layer_forward(Layer *self, PyObject *const *args, Py_ssize_t nargs)
{
    step_fn fn = self->lstm ? (self->f64 ? lstm_forward_f64 : lstm_forward_f32)
                            : (self->f64 ? gru_forward_f64 : gru_forward_f32);
    return run_step(self, args, nargs, fn);
}

static PyObject *layer_backward(Layer *self, PyObject *const *args, Py_ssize_t nargs)
{
    step_fn fn = self->lstm ? (self->f64 ? lstm_backward_f64 : lstm_backward_f32)
                            : (self->f64 ? gru_backward_f64 : gru_backward_f32);
    return run_step(self, args, nargs, fn);
}

/* A METH_FASTCALL function in a PyMethodDef (the cast through void (*)(void) is the documented
 * way to store a function of another signature there) */
#define FASTCALL(fn) (PyCFunction)(void (*)(void))(fn), METH_FASTCALL

static PyMethodDef layer_methods[] = {
    {"forward", FASTCALL(layer_forward),
     "forward(t): step t's gates, c_t and h_t from its input part and h_{t-1} Wh."},
    {"backward", FASTCALL(layer_backward),
     "backward(t): step t's dL/da_t from dL/dh_t and the carried gradients."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LayerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rnnserve_server.engine.cells._kernel.Layer",
    .tp_basicsize = sizeof(Layer),
    .tp_dealloc = (destructor)layer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .tp_doc = "One gated layer's window buffers, exported once; forward(t) and backward(t).",
    .tp_methods = layer_methods,
};

/* A buffer's struct format without a prefix that says native byte order (other orders keep
 * theirs, and match no format below). */
static const char *native(const Py_buffer *v)
{
    const char *fmt = v->format;
    return fmt[0] == '@' || fmt[0] == '=' || fmt[0] == (PY_LITTLE_ENDIAN ? '<' : '>') ? fmt + 1
                                                                                     : fmt;
}

/* 1 float64, 0 float32, -1 neither */
static int float_format(const Py_buffer *v)
{
    const char *fmt = native(v);
    return strcmp(fmt, "d") == 0 ? 1 : strcmp(fmt, "f") == 0 ? 0 : -1;
}

/* What each argument must be: its name (for errors), its shape, and whether the kernel
 * writes it. A shape is one letter a dimension: 'T' T, 'U' T + 1, 'B' B, 'H' H, '3' to '5'
 * that many H, 'g' gates x B x H (rec, flat). */
typedef struct {
    const char *name;
    const char *dims;
    int writable;
} ArgSpec;

static const ArgSpec LSTM_ARGS[L_COUNT] = {
    {"pre", "TB4", 0}, {"Z", "UB5", 1}, {"tcs", "TBH", 1}, {"hs", "UBH", 1}, {"rec", "g", 0},
    {"dH", "TBH", 0}, {"carry", "BH", 0}, {"dc", "BH", 1}, {"dA", "TB4", 1},
};
static const ArgSpec GRU_ARGS[G_COUNT] = {
    {"A", "TB3", 1}, {"ghn", "TBH", 1}, {"hs", "UBH", 1}, {"rec", "g", 0},
    {"bn", "H", 0}, {"dH", "TBH", 1}, {"carry", "BH", 0}, {"dGx", "TB4", 1},
};

static Py_ssize_t expected_dim(char code, const Layer *k, int gates)
{
    switch (code) {
    case 'T': return k->T;
    case 'U': return k->T + 1;
    case 'B': return k->B;
    case 'H': return k->H;
    case 'g': return gates * k->B * k->H;
    default: return (code - '0') * k->H;
    }
}

/* Export every argument's buffer into k->view and check it against its ArgSpec; T, B, H are
 * read from hs (T + 1, B, H). On failure sets an exception and returns -1 (the caller
 * releases what was exported: k->nviews). */
static int export_views(Layer *k, PyObject *const *args, Py_ssize_t nargs, const ArgSpec *spec,
                        int count, int hs_index, int gates, const char *fname)
{
    if (nargs != count) {
        PyErr_Format(PyExc_TypeError, "%s() takes %d arrays (%zd given)", fname, count, nargs);
        return -1;
    }
    for (int i = 0; i < count; i++) {
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (spec[i].writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(args[i], &k->view[i], flags) < 0) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_Format(PyExc_TypeError, "%s(): %s must be a C-contiguous%s float array (%S)",
                         fname, spec[i].name, spec[i].writable ? ", writable" : "",
                         value ? value : Py_None);
            Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
            return -1;
        }
        k->nviews = i + 1;
        int f64 = float_format(&k->view[i]);
        if (f64 < 0) {
            PyErr_Format(PyExc_TypeError, "%s(): %s must be float32 or float64, not format '%s'",
                         fname, spec[i].name, k->view[i].format);
            return -1;
        }
        if (i == 0)
            k->f64 = f64;
        else if (f64 != k->f64) {
            PyErr_Format(PyExc_TypeError, "%s(): %s is float%d, the others float%d", fname,
                         spec[i].name, f64 ? 64 : 32, k->f64 ? 64 : 32);
            return -1;
        }
    }
    const Py_buffer *hs = &k->view[hs_index];
    if (hs->ndim != 3 || hs->shape[0] < 2 || hs->shape[1] < 1 || hs->shape[2] < 1) {
        PyErr_Format(PyExc_ValueError, "%s(): hs must be (T + 1, B, H) with T, B, H >= 1", fname);
        return -1;
    }
    k->T = hs->shape[0] - 1;
    k->B = hs->shape[1];
    k->H = hs->shape[2];
    for (int i = 0; i < count; i++) {
        const Py_buffer *v = &k->view[i];
        int ndim = (int)strlen(spec[i].dims), ok = v->ndim == ndim;
        for (int d = 0; ok && d < ndim; d++)
            ok = v->shape[d] == expected_dim(spec[i].dims[d], k, gates);
        if (!ok) {
            PyObject *want = PyTuple_New(ndim), *got = PyTuple_New(v->ndim);
            for (int d = 0; want && got && d < ndim; d++) {
                Py_ssize_t n = expected_dim(spec[i].dims[d], k, gates);
                PyTuple_SET_ITEM(want, d, PyLong_FromSsize_t(n));
            }
            for (int d = 0; want && got && d < v->ndim; d++)
                PyTuple_SET_ITEM(got, d, PyLong_FromSsize_t(v->shape[d]));
            if (want && got)
                PyErr_Format(PyExc_ValueError,
                             "%s(): %s has the shape %R, not %R (T=%zd, B=%zd, H=%zd from hs)",
                             fname, spec[i].name, got, want, k->T, k->B, k->H);
            Py_XDECREF(want);
            Py_XDECREF(got);
            return -1;
        }
    }
    return 0;
}

static PyObject *new_layer(PyObject *const *args, Py_ssize_t nargs, int lstm)
{
    Layer *k = PyObject_New(Layer, &LayerType);
    if (k == NULL)
        return NULL;
    k->lstm = lstm;
    k->nviews = 0;
    int rc = lstm ? export_views(k, args, nargs, LSTM_ARGS, L_COUNT, L_HS, 4, "lstm")
                  : export_views(k, args, nargs, GRU_ARGS, G_COUNT, G_HS, 3, "gru");
    if (rc < 0) {
        Py_DECREF(k);
        return NULL;
    }
    return (PyObject *)k;
}

static PyObject *kernel_lstm(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return new_layer(args, nargs, 1);
}

static PyObject *kernel_gru(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return new_layer(args, nargs, 0);
}

/* scatter_sum(out, ids, rows): out (V, W) float, rows (N, W) of the same type (rows may be
 * strided, each row contiguous), ids (N,) int64, each in 0 .. V - 1, all checked before
 * anything is written. */
static PyObject *kernel_scatter_sum(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "scatter_sum() takes 3 arrays (%zd given)", nargs);
        return NULL;
    }
    Py_buffer out, ids, rows;
    if (PyObject_GetBuffer(args[0], &out, PyBUF_STRIDES | PyBUF_FORMAT | PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &ids, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &rows, PyBUF_STRIDES | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&out);
        PyBuffer_Release(&ids);
        return NULL;
    }
    int f64 = float_format(&out);
    const char *id_fmt = native(&ids);
    int id_ok = ids.itemsize == 8 && strlen(id_fmt) == 1 && strchr("lqn", id_fmt[0]) != NULL;
    if (f64 < 0 || float_format(&rows) != f64 || !id_ok) {
        PyErr_SetString(PyExc_TypeError,
                        "scatter_sum(): out and rows must be float32 or float64 alike, ids int64");
    } else if (out.ndim != 2 || rows.ndim != 2 || ids.ndim != 1 || out.shape[1] != rows.shape[1]
               || rows.shape[0] != ids.shape[0]) {
        PyErr_SetString(PyExc_ValueError,
                        "scatter_sum(): out must be (V, W), rows (N, W) and ids (N,)");
    } else if (out.strides[1] != out.itemsize || rows.strides[1] != rows.itemsize) {
        PyErr_SetString(PyExc_ValueError, "scatter_sum(): the rows of out and rows must be "
                                          "contiguous");
    } else {
        const int64_t *id = ids.buf;
        for (Py_ssize_t n = 0; n < ids.shape[0]; n++)
            if (id[n] < 0 || id[n] >= out.shape[0]) {
                PyErr_Format(PyExc_ValueError, "scatter_sum(): ids[%zd] = %lld is outside 0 .. %zd",
                             n, (long long)id[n], out.shape[0] - 1);
                break;
            }
    }
    if (!PyErr_Occurred()) {
        int big = rows.shape[0] * rows.shape[1] >= RELEASE_GIL_NUMBERS;
        PyThreadState *state = big ? PyEval_SaveThread() : NULL;
        if (f64)
            scatter_sum_f64(&out, &ids, &rows);
        else
            scatter_sum_f32(&out, &ids, &rows);
        if (state)
            PyEval_RestoreThread(state);
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&rows);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef kernel_methods[] = {
    {"lstm", FASTCALL(kernel_lstm), "lstm(pre, Z, tcs, hs, rec, dH, carry, dc, dA) -> Layer"},
    {"scatter_sum", FASTCALL(kernel_scatter_sum),
     "scatter_sum(out, ids, rows): out[v] = the sum of rows[n] with ids[n] == v"},
    {"gru", FASTCALL(kernel_gru),
     "gru(A, ghn, hs, rec, bn, dH, carry, dGx) -> Layer"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kernel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rnnserve_server.engine.cells._kernel",
    .m_doc = "The gated cells' per-time-step element-wise work in C (fast.py uses it).",
    .m_size = -1,
    .m_methods = kernel_methods,
};

PyMODINIT_FUNC PyInit__kernel(void)
{
    PyObject *m = PyModule_Create(&kernel_module);
    if (m != NULL && PyModule_AddType(m, &LayerType) < 0)
        Py_CLEAR(m);
    return m;
}
