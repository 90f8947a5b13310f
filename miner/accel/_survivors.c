/* The bfloat16 scan's survivor kernels (cir_mine.miner.accel.survivors holds their contract and the
 * numpy code they must match, element for element).
 *
 *   take    one block of bfloat16 scores -> the (query, key, row) of every score at or above its
 *           query's threshold key, in query order and row order within a query
 *   levels  per query, how many survivors lie at or above each bfloat16 level -> the level of each
 *           asked rank, and each query's survivor count
 *   rows    per query, the rows of the survivors at or above a floor key, in the order held
 *   kth     per row of a block of bfloat16 scores, the key of its r-th largest (the scan's threshold
 *           from its sample of the gallery)
 *
 * Keys are integers in the values' order: a bfloat16 bit pattern b >= 0 is its own key, b < 0 has
 * -(b & 0x7FFF). Every comparison is exact integer arithmetic, so each instruction set (AVX-512BW,
 * AVX2, plain C) returns the same arrays.
 */
#include "../core/_cbuffers.h"
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CIR_X86 1
#endif

enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

static int has_isa(int isa) {
    if (isa == ISA_SCALAR) return 1;
#ifdef CIR_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2");
    if (isa == ISA_AVX512) return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

static inline int32_t key16(int16_t b) { return b >= 0 ? (int32_t)b : -(int32_t)(b & 0x7FFF); }

typedef struct {
    int32_t *q, *k;
    int64_t *row;
    int64_t cap, n;
} Out;

static inline void emit(Out *o, int32_t q, int32_t k, int64_t row) {
    if (o->n < o->cap) {
        o->q[o->n] = q;
        o->k[o->n] = k;
        o->row[o->n] = row;
    }
    o->n++;
}

/* columns [j, w) of one query's scores, compared one at a time */
static void take_tail(const int16_t *s, int64_t j, int64_t w, int32_t lo, int32_t q, int64_t start, Out *o) {
    for (; j < w; j++) {
        int32_t k = key16(s[j]);
        if (k >= lo) emit(o, q, k, start + j);
    }
}

#ifdef CIR_X86
/* a threshold key lo > 0: a key >= lo iff the int16 bit pattern >= lo (negative values and -0 have
 * negative patterns), and the survivor's key is its pattern */
__attribute__((target("avx512f,avx512bw,bmi"))) static int64_t take_avx512(const int16_t *s, int64_t w, int32_t lo,
                                                                           int32_t q, int64_t start, Out *o) {
    __m512i l = _mm512_set1_epi16((int16_t)lo);
    int64_t j = 0;
    for (; j + 32 <= w; j += 32) {
        uint32_t m = _mm512_cmpge_epi16_mask(_mm512_loadu_si512((const void *)(s + j)), l);
        while (m) {
            int t = __builtin_ctz(m);
            m &= m - 1;
            emit(o, q, s[j + t], start + j + t);
        }
    }
    return j;
}

__attribute__((target("avx2,bmi"))) static int64_t take_avx2(const int16_t *s, int64_t w, int32_t lo, int32_t q,
                                                             int64_t start, Out *o) {
    __m256i l = _mm256_set1_epi16((int16_t)(lo - 1)); /* v >= lo iff v > lo - 1 */
    int64_t j = 0;
    for (; j + 16 <= w; j += 16) {
        uint32_t m = (uint32_t)_mm256_movemask_epi8(_mm256_cmpgt_epi16(_mm256_loadu_si256((const __m256i *)(s + j)), l));
        while (m) { /* two mask bits per 16-bit lane */
            int t = __builtin_ctz(m) >> 1;
            m &= m - 1;
            m &= m - 1;
            emit(o, q, s[j + t], start + j + t);
        }
    }
    return j;
}
#endif

static void take_rows(const int16_t *S, int64_t ld, int64_t a, int64_t e, int64_t w, const int32_t *low,
                      int64_t start, int isa, Out *o) {
    for (int64_t i = a; i < e; i++) {
        const int16_t *s = S + i * ld;
        int32_t lo = low[i - a], q = (int32_t)(i - a);
        int64_t j = 0;
#ifdef CIR_X86
        if (lo > 0 && isa == ISA_AVX512) j = take_avx512(s, w, lo, q, start, o);
        else if (lo > 0 && isa == ISA_AVX2) j = take_avx2(s, w, lo, q, start, o);
#endif
        take_tail(s, j, w, lo, q, start, o);
    }
}

/* buffer helpers: a contiguous buffer of at least `count` items of `size` bytes */
static int pick_isa(int isa) {
    if (isa != ISA_AUTO) return has_isa(isa) ? isa : -1;
    if (has_isa(ISA_AVX512)) return ISA_AVX512;
    if (has_isa(ISA_AVX2)) return ISA_AVX2;
    return ISA_SCALAR;
}

static PyObject *py_take(PyObject *self, PyObject *args) {
    Py_buffer S, low, oq, ok, orow;
    Py_ssize_t ld, a, e, w, start;
    int isa;
    if (!PyArg_ParseTuple(args, "y*nnnny*nw*w*w*i", &S, &ld, &a, &e, &w, &low, &start, &oq, &ok, &orow, &isa))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t cap = oq.len / 4;
    int chosen = pick_isa(isa);
    if (chosen < 0) {
        PyErr_Format(PyExc_ValueError, "instruction set %d is not available on this CPU", isa);
    } else if (a < 0 || e < a || w < 0 || ld < w || start < 0) {
        PyErr_SetString(PyExc_ValueError, "take: bad block shape");
    } else if ((e == a || need(&S, (e - 1) * ld + w, 2, "scores")) && need(&low, e - a, 4, "thresholds") &&
               need(&ok, cap, 4, "keys") && need(&orow, cap, 8, "rows")) {
        Out o = {(int32_t *)oq.buf, (int32_t *)ok.buf, (int64_t *)orow.buf, cap, 0};
        Py_BEGIN_ALLOW_THREADS take_rows((const int16_t *)S.buf, ld, a, e, w, (const int32_t *)low.buf, start, chosen, &o);
        Py_END_ALLOW_THREADS res = PyLong_FromLongLong(o.n);
    }
    PyBuffer_Release(&S);
    PyBuffer_Release(&low);
    PyBuffer_Release(&oq);
    PyBuffer_Release(&ok);
    PyBuffer_Release(&orow);
    return res;
}

/* -1 on a query index outside [0, m) */
static int64_t levels_core(const int32_t *q, const int32_t *k, Py_ssize_t n, const int32_t *low, Py_ssize_t m,
                           int64_t max_levels, const int64_t *ranks, Py_ssize_t R, int64_t *firsts, int64_t *totals) {
    int64_t top = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (q[i] < 0 || q[i] >= m) return -1;
        int64_t rel = (int64_t)k[i] - low[q[i]];
        if (rel > top) top = rel;
    }
    int64_t levels = top + 1 < max_levels ? top + 1 : max_levels;
    int64_t *hist = calloc((size_t)(m * levels > 0 ? m * levels : 1), sizeof(int64_t));
    if (!hist) return -2;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t rel = (int64_t)k[i] - low[q[i]];
        rel = rel < 0 ? 0 : (rel > levels - 1 ? levels - 1 : rel);
        hist[q[i] * levels + (levels - 1 - rel)]++; /* counted from the top level */
    }
    for (Py_ssize_t j = 0; j < m; j++) {
        const int64_t *h = hist + j * levels;
        int64_t cum = 0;
        for (Py_ssize_t r = 0; r < R; r++) firsts[j * R + r] = -1;
        for (int64_t l = 0; l < levels; l++) {
            cum += h[l];
            for (Py_ssize_t r = 0; r < R; r++)
                if (firsts[j * R + r] < 0 && cum >= ranks[r]) firsts[j * R + r] = l;
        }
        for (Py_ssize_t r = 0; r < R; r++)
            if (firsts[j * R + r] < 0) firsts[j * R + r] = 0; /* numpy's argmax of no True */
        totals[j] = cum;
    }
    free(hist);
    return levels;
}

static PyObject *py_levels(PyObject *self, PyObject *args) {
    Py_buffer q, k, low, ranks, firsts, totals;
    Py_ssize_t max_levels;
    if (!PyArg_ParseTuple(args, "y*y*y*ny*w*w*", &q, &k, &low, &max_levels, &ranks, &firsts, &totals)) return NULL;
    PyObject *res = NULL;
    Py_ssize_t n = q.len / 4, m = low.len / 4, R = ranks.len / 8;
    if (max_levels < 1) {
        PyErr_SetString(PyExc_ValueError, "levels: max_levels < 1");
    } else if (need(&k, n, 4, "keys") && need(&firsts, m * R, 8, "firsts") && need(&totals, m, 8, "totals")) {
        int64_t levels;
        Py_BEGIN_ALLOW_THREADS levels = levels_core((const int32_t *)q.buf, (const int32_t *)k.buf, n,
                                                    (const int32_t *)low.buf, m, max_levels,
                                                    (const int64_t *)ranks.buf, R, (int64_t *)firsts.buf,
                                                    (int64_t *)totals.buf);
        Py_END_ALLOW_THREADS if (levels == -1) PyErr_SetString(PyExc_ValueError, "levels: a query index is out of range");
        else if (levels == -2) PyErr_NoMemory();
        else res = PyLong_FromLongLong(levels);
    }
    PyBuffer_Release(&q);
    PyBuffer_Release(&k);
    PyBuffer_Release(&low);
    PyBuffer_Release(&ranks);
    PyBuffer_Release(&firsts);
    PyBuffer_Release(&totals);
    return res;
}

/* count (out == NULL) or place the rows of survivors with key >= floor[q]; -1 on a bad query index,
 * -2 when a query has more than `width` of them */
static int64_t rows_core(const int32_t *q, const int32_t *k, const int64_t *r, Py_ssize_t n, const int32_t *floor,
                         Py_ssize_t m, int64_t *counts, int64_t *out, int64_t width) {
    memset(counts, 0, (size_t)m * sizeof(int64_t));
    for (Py_ssize_t i = 0; i < n; i++) {
        if (q[i] < 0 || q[i] >= m) return -1;
        if (k[i] < floor[q[i]]) continue;
        int64_t c = counts[q[i]]++;
        if (out) {
            if (c >= width) return -2;
            out[q[i] * width + c] = r[i];
        }
    }
    return 0;
}

static PyObject *py_rows(PyObject *self, PyObject *args) {
    Py_buffer q, k, r, floor, counts, out;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*w*n", &q, &k, &r, &floor, &counts, &out, &width)) return NULL;
    PyObject *res = NULL;
    Py_ssize_t n = q.len / 4, m = floor.len / 4;
    int place = out.len > 0;
    if (width < 0) {
        PyErr_SetString(PyExc_ValueError, "rows: width < 0");
    } else if (need(&k, n, 4, "keys") && need(&r, n, 8, "rows") && need(&counts, m, 8, "counts") &&
               (!place || need(&out, m * width, 8, "out"))) {
        int64_t st;
        Py_BEGIN_ALLOW_THREADS st = rows_core((const int32_t *)q.buf, (const int32_t *)k.buf, (const int64_t *)r.buf,
                                              n, (const int32_t *)floor.buf, m, (int64_t *)counts.buf,
                                              place ? (int64_t *)out.buf : NULL, width);
        Py_END_ALLOW_THREADS if (st == -1) PyErr_SetString(PyExc_ValueError, "rows: a query index is out of range");
        else if (st == -2) PyErr_SetString(PyExc_ValueError, "rows: a query has more rows than the width");
        else res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&q);
    PyBuffer_Release(&k);
    PyBuffer_Release(&r);
    PyBuffer_Release(&floor);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&out);
    return res;
}

/* the key of the r-th largest of each row [a, e) of S (1 <= r <= w): a radix select on the keys
 * shifted to 0..65535, their high 10 bits first (two interleaved histograms), then the low 6 bits
 * within the chosen bin */
static int kth_core(const int16_t *S, Py_ssize_t ld, Py_ssize_t a, Py_ssize_t e, Py_ssize_t w, Py_ssize_t r,
                    int32_t *out) {
    uint16_t *u = malloc((size_t)w * sizeof(uint16_t));
    uint32_t *h0 = malloc(2 * 1024 * sizeof(uint32_t));
    if (!u || !h0) {
        free(u);
        free(h0);
        return -1;
    }
    uint32_t *h1 = h0 + 1024;
    for (Py_ssize_t i = a; i < e; i++) {
        const int16_t *s = S + i * ld;
        for (Py_ssize_t j = 0; j < w; j++) {
            int32_t b = s[j], m = b >> 15; /* the key, without a branch: b, or -(b & 0x7FFF) below zero */
            u[j] = (uint16_t)(((b ^ (m & 0x7FFF)) - m) + 32768);
        }
        memset(h0, 0, 2 * 1024 * sizeof(uint32_t));
        Py_ssize_t j = 0;
        for (; j + 1 < w; j += 2) {
            h0[u[j] >> 6]++;
            h1[u[j + 1] >> 6]++;
        }
        if (j < w) h0[u[j] >> 6]++;
        Py_ssize_t left = r;
        int hb = 1023;
        for (; hb > 0 && (Py_ssize_t)(h0[hb] + h1[hb]) < left; hb--) left -= h0[hb] + h1[hb];
        uint32_t lo[64] = {0};
        for (j = 0; j < w; j++)
            if ((u[j] >> 6) == (unsigned)hb) lo[u[j] & 63]++;
        int lb = 63;
        for (; lb > 0 && (Py_ssize_t)lo[lb] < left; lb--) left -= lo[lb];
        out[i - a] = (int32_t)((hb << 6) | lb) - 32768;
    }
    free(u);
    free(h0);
    return 0;
}

static PyObject *py_kth(PyObject *self, PyObject *args) {
    Py_buffer S, out;
    Py_ssize_t ld, a, e, w, r;
    if (!PyArg_ParseTuple(args, "y*nnnnnw*", &S, &ld, &a, &e, &w, &r, &out)) return NULL;
    PyObject *res = NULL;
    if (a < 0 || e < a || w < 1 || ld < w || r < 1 || r > w) {
        PyErr_SetString(PyExc_ValueError, "kth: bad block shape or rank");
    } else if ((e == a || need(&S, (e - 1) * ld + w, 2, "scores")) && need(&out, e - a, 4, "out")) {
        int st;
        Py_BEGIN_ALLOW_THREADS st = kth_core((const int16_t *)S.buf, ld, a, e, w, r, (int32_t *)out.buf);
        Py_END_ALLOW_THREADS if (st < 0) PyErr_NoMemory();
        else res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&S);
    PyBuffer_Release(&out);
    return res;
}

static PyObject *py_isas(PyObject *self, PyObject *noargs) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    const char *names[] = {"", "scalar", "avx2", "avx512bw"};
    for (int isa = ISA_SCALAR; isa <= ISA_AVX512; isa++) {
        if (!has_isa(isa)) continue;
        PyObject *s = PyUnicode_FromString(names[isa]);
        if (!s || PyList_Append(out, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(s);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"take", py_take, METH_VARARGS,
     "take(S, ld, a, e, w, low_key, start, q_out, key_out, row_out, isa) -> n survivors (written up to the "
     "outputs' capacity)"},
    {"levels", py_levels, METH_VARARGS,
     "levels(q, key, low_key, max_levels, ranks, firsts_out, totals_out) -> the histogram's levels"},
    {"rows", py_rows, METH_VARARGS,
     "rows(q, key, row, floor, counts_out, out, width): count (out empty) or place each query's rows"},
    {"kth", py_kth, METH_VARARGS,
     "kth(S, ld, a, e, w, r, out): the key of the r-th largest score of each row [a, e) of S"},
    {"isas", py_isas, METH_NOARGS, "isas() -> the instruction sets this CPU runs take with"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_survivors", "The bfloat16 scan's survivor kernels.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__survivors(void) { return PyModule_Create(&module); }
