/* The list-major IVF kernel's selection (cir_mine.miner.core.search.lists holds its contract and the
 * numpy code it replaces, top_positions):
 *
 *   top  each query's k best scores of its segment of a pass's buffer and their gallery rows, in no
 *        order: a threshold read off every stride-th score, the scores at or above it, the k best of
 *        those; the whole segment where the threshold leaves fewer than k. Ties at the k-th score
 *        keep the lower positions. Segments of at most k scores give all of theirs, then -inf / -1.
 */
#include "../_cbuffers.h"
#include <math.h>

/* the j-th smallest of a[0..n) (0-based), a reordered (Wirth's selection) */
static float kth_smallest(float *a, Py_ssize_t n, Py_ssize_t j) {
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
        float p = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        Py_ssize_t i = lo, k = hi;
        while (i <= k) {
            while (a[i] < p) i++;
            while (p < a[k]) k--;
            if (i <= k) {
                float t = a[i];
                a[i] = a[k];
                a[k] = t;
                i++;
                k--;
            }
        }
        if (j <= k)
            hi = k;
        else if (j >= i)
            lo = i;
        else
            return a[j];
    }
    return a[j];
}

#define BINS 1024

/* the j-th largest (1-based) of a[0..n), a reordered: a histogram of BINS equal value ranges between
 * the least and the largest finds the range that holds it (the map from a value to its range never
 * reverses an order), then Wirth's selection inside that range */
static float kth_largest(float *a, Py_ssize_t n, Py_ssize_t j) {
    float lo = a[0], hi = a[0];
    for (Py_ssize_t i = 1; i < n; i++) {
        lo = a[i] < lo ? a[i] : lo;
        hi = a[i] > hi ? a[i] : hi;
    }
    float scale = (float)BINS / (hi - lo);
    if (n < 256 || !(hi > lo) || !isfinite(scale)) return kth_smallest(a, n, n - j);
    int32_t hist[BINS] = {0};
    for (Py_ssize_t i = 0; i < n; i++) {
        float x = (a[i] - lo) * scale;
        hist[x >= BINS - 1 ? BINS - 1 : (int)x]++;
    }
    Py_ssize_t above = 0;
    int b = BINS - 1;
    while (above + hist[b] < j) above += hist[b--];
    Py_ssize_t c = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float x = (a[i] - lo) * scale;
        if ((x >= BINS - 1 ? BINS - 1 : (int)x) == b) a[c++] = a[i];
    }
    return kth_smallest(a, c, c - (j - above));
}

/* writes the positions of the k best of s[0..n) among those listed in idx[0..c) (idx NULL: all of
 * 0..n) to out: every one above the k-th best, then the first at it */
static void put_best(const float *s, const int64_t *idx, Py_ssize_t c, Py_ssize_t k, float *scratch, int64_t *out) {
    for (Py_ssize_t i = 0; i < c; i++) scratch[i] = s[idx ? idx[i] : i];
    float kth = kth_largest(scratch, c, k);
    Py_ssize_t got = 0;
    for (Py_ssize_t i = 0; i < c; i++) {
        int64_t p = idx ? idx[i] : (int64_t)i;
        if (s[p] > kth) out[got++] = p;
    }
    for (Py_ssize_t i = 0; i < c && got < k; i++) {
        int64_t p = idx ? idx[i] : (int64_t)i;
        if (s[p] == kth) out[got++] = p;
    }
}

/* the gallery rows of a query's positions o[0..c) in its segment (ascending runs: the walk over the
 * probe slots restarts where a position falls back), through its slots' offsets off[0..p) and lists
 * A[0..p): an empty slot shares the next one's offset, so the last slot at or before a position holds it */
static void rows_of(const int64_t *o, Py_ssize_t c, const int64_t *off, const int64_t *A, Py_ssize_t p,
                    const int64_t *lstart, const int64_t *ids, int64_t *rows) {
    Py_ssize_t s = 0;
    for (Py_ssize_t i = 0; i < c; i++) {
        int64_t pos = o[i];
        if (pos < off[s]) s = 0;
        while (s + 1 < p && off[s + 1] <= pos) s++;
        rows[i] = ids[lstart[A[s]] + pos - off[s]];
    }
}

typedef struct {
    const float *buf;
    const int64_t *starts, *lens, *off, *A, *lstart, *ids;
    Py_ssize_t m, p, k, stride, rank;
} top_args;

static void top_core(const top_args *a, float *scratch, int64_t *idx, float *D, int64_t *I) {
    Py_ssize_t k = a->k;
    for (Py_ssize_t q = 0; q < a->m; q++) {
        const float *s = a->buf + a->starts[q];
        Py_ssize_t n = (Py_ssize_t)a->lens[q], got = n < k ? n : k;
        float *d = D + q * k;
        int64_t *o = I + q * k;
        if (n <= k) {
            for (Py_ssize_t i = 0; i < n; i++) o[i] = i;
        } else {
            Py_ssize_t ns = (n + a->stride - 1) / a->stride, c = 0;
            if (a->rank < ns) {
                for (Py_ssize_t i = 0; i < ns; i++) scratch[i] = s[i * a->stride];
                float t = kth_largest(scratch, ns, a->rank);
                for (Py_ssize_t i = 0; i < n; i++) {
                    idx[c] = i;
                    c += s[i] >= t;
                }
            }
            if (c >= k)
                put_best(s, idx, c, k, scratch, o);
            else
                put_best(s, NULL, n, k, scratch, o);
        }
        for (Py_ssize_t i = 0; i < got; i++) d[i] = s[o[i]];
        rows_of(o, got, a->off + q * a->p, a->A + q * a->p, a->p, a->lstart, a->ids, o);
        for (Py_ssize_t i = got; i < k; i++) {
            d[i] = -INFINITY;
            o[i] = -1;
        }
    }
}

static PyObject *py_top(PyObject *self, PyObject *args) {
    Py_buffer buf, starts, lens, off, A, lstart, ids, D, I;
    top_args a;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*nnnnnw*w*", &buf, &starts, &lens, &off, &A, &lstart, &ids, &a.m, &a.p,
                          &a.k, &a.stride, &a.rank, &D, &I))
        return NULL;
    PyObject *res = NULL;
    a.buf = buf.buf;
    a.starts = starts.buf, a.lens = lens.buf, a.off = off.buf, a.A = A.buf, a.lstart = lstart.buf, a.ids = ids.buf;
    Py_ssize_t longest = 0, nlist = lstart.len / 8, ntotal = ids.len / 8;
    int ok = a.m >= 0 && a.p >= 1 && a.k >= 1 && a.stride >= 1 && a.rank >= 1 && need(&starts, a.m, 8, "starts") &&
             need(&lens, a.m, 8, "lens") && need(&off, a.m * a.p, 8, "off") && need(&A, a.m * a.p, 8, "A") &&
             need(&D, a.m * a.k, 4, "D") && need(&I, a.m * a.k, 8, "I");
    for (Py_ssize_t q = 0; ok && q < a.m; q++) {
        if (a.starts[q] < 0 || a.lens[q] < 0 || !need(&buf, a.starts[q] + a.lens[q], 4, "buf")) ok = 0;
        else if (a.lens[q] > longest) longest = (Py_ssize_t)a.lens[q];
        for (Py_ssize_t s = 0; ok && s < a.p; s++) {
            int64_t li = a.A[q * a.p + s], o = a.off[q * a.p + s];
            int64_t end = s + 1 < a.p ? a.off[q * a.p + s + 1] : a.lens[q];
            /* a slot's run of the segment lies in its list, and a list-less slot holds nothing */
            if (o < 0 || end < o || (end > o && (li < 0 || li >= nlist || a.lstart[li] < 0 ||
                                                  a.lstart[li] + (end - o) > ntotal)))
                ok = 0;
        }
    }
    if (ok) {
        float *scratch = malloc((size_t)(longest > 0 ? longest : 1) * sizeof(float));
        int64_t *idx = malloc((size_t)(longest > 0 ? longest : 1) * sizeof(int64_t));
        if (!scratch || !idx) {
            PyErr_NoMemory();
        } else {
            Py_BEGIN_ALLOW_THREADS top_core(&a, scratch, idx, (float *)D.buf, (int64_t *)I.buf);
            Py_END_ALLOW_THREADS res = Py_NewRef(Py_None);
        }
        free(scratch);
        free(idx);
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "top: bad shape");
    }
    Py_buffer *all[] = {&buf, &starts, &lens, &off, &A, &lstart, &ids, &D, &I};
    for (int i = 0; i < 9; i++) PyBuffer_Release(all[i]);
    return res;
}

/* column j of S (float32[size, m]) to buf[dst[j] .. dst[j] + size) */
static void scatter_core(const float *S, Py_ssize_t size, Py_ssize_t m, const int64_t *dst, float *buf) {
    for (Py_ssize_t j0 = 0; j0 < m; j0 += 8) {
        Py_ssize_t j1 = j0 + 8 < m ? j0 + 8 : m;
        for (Py_ssize_t i = 0; i < size; i++) {
            const float *row = S + i * m;
            for (Py_ssize_t j = j0; j < j1; j++) buf[dst[j] + i] = row[j];
        }
    }
}

static PyObject *py_scatter(PyObject *self, PyObject *args) {
    Py_buffer S, dst, buf;
    Py_ssize_t size, m;
    if (!PyArg_ParseTuple(args, "y*nny*w*", &S, &size, &m, &dst, &buf)) return NULL;
    PyObject *res = NULL;
    int ok = size >= 0 && m >= 0 && need(&S, size * m, 4, "S") && need(&dst, m, 8, "dst");
    for (Py_ssize_t j = 0; ok && j < m; j++)
        if (((const int64_t *)dst.buf)[j] < 0 || !need(&buf, ((const int64_t *)dst.buf)[j] + size, 4, "buf")) ok = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS scatter_core(S.buf, size, m, dst.buf, buf.buf);
        Py_END_ALLOW_THREADS res = Py_NewRef(Py_None);
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "scatter: bad shape");
    }
    PyBuffer_Release(&S);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&buf);
    return res;
}

static PyMethodDef methods[] = {
    {"top", py_top, METH_VARARGS,
     "top(buf, starts, lens, off, A, list_starts, ids, m, p, k, stride, rank, D, I): each of m segments' k best "
     "scores into D (float32[m, k], -inf pads) and their gallery rows into I (int64[m, k], -1 pads)"},
    {"scatter", py_scatter, METH_VARARGS,
     "scatter(S, size, m, dst, buf): column j of S (float32[size, m]) to buf[dst[j]:dst[j] + size]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lists", "The list-major IVF kernel's selection.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__lists(void) { return PyModule_Create(&module); }
