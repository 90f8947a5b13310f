/* Selection kernels for the strategies (cir_mine.miner.core.strategies.selection holds their contract
 * and the numpy code they must equal, entry for entry).
 *
 *   hash     the hashed random keys of (query, value) pairs in a stream: SplitMix64's finalizer, as
 *            selection.hash_keys computes it
 *   first_k  the first k positions of each line's stable ascending sort of its keys, where every
 *            entry that is not eligible holds the largest key: the eligible entries by (key, column),
 *            then the other columns in order
 */
#include "../_cbuffers.h"

static inline uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

static void hash_core(const uint64_t *qhash, const int64_t *values, Py_ssize_t b, Py_ssize_t L, uint64_t stream,
                      uint64_t *out) {
    uint64_t s = splitmix64(stream);
    for (Py_ssize_t i = 0; i < b; i++) {
        uint64_t q = qhash[i];
        const int64_t *v = values + i * L;
        uint64_t *o = out + i * L;
        for (Py_ssize_t j = 0; j < L; j++) o[j] = splitmix64(q ^ splitmix64((uint64_t)v[j] ^ s));
    }
}

typedef struct {
    uint64_t key;
    int64_t col;
} entry;

static inline int before(entry a, entry b) { return a.key < b.key || (a.key == b.key && a.col < b.col); }

/* sorts e[0..n) by (key, col); the pairs are distinct (one column each), so any sort is stable */
static void sort_entries(entry *e, Py_ssize_t n) {
    while (n > 16) {
        Py_ssize_t m = n / 2;
        if (before(e[m], e[0])) { entry t = e[m]; e[m] = e[0]; e[0] = t; }
        if (before(e[n - 1], e[0])) { entry t = e[n - 1]; e[n - 1] = e[0]; e[0] = t; }
        if (before(e[n - 1], e[m])) { entry t = e[n - 1]; e[n - 1] = e[m]; e[m] = t; }
        entry p = e[m];
        Py_ssize_t i = 0, j = n - 1;
        for (;;) {
            while (before(e[i], p)) i++;
            while (before(p, e[j])) j--;
            if (i >= j) break;
            entry t = e[i]; e[i] = e[j]; e[j] = t;
            i++;
            j--;
        }
        /* e[0..j] <= p <= e[j+1..n): recurse into the smaller side, loop on the larger */
        Py_ssize_t left = j + 1;
        if (left < n - left) {
            sort_entries(e, left);
            e += left;
            n -= left;
        } else {
            sort_entries(e + left, n - left);
            n = left;
        }
    }
    for (Py_ssize_t i = 1; i < n; i++) {
        entry x = e[i];
        Py_ssize_t j = i;
        while (j > 0 && before(x, e[j - 1])) {
            e[j] = e[j - 1];
            j--;
        }
        e[j] = x;
    }
}

/* kind 0: uint64 keys; 1: int64 keys (order kept by flipping the sign bit); 2: no keys (column order).
 * -2 on memory */
static int first_k_core(const void *keys, const uint8_t *eligible, Py_ssize_t b, Py_ssize_t L, Py_ssize_t k, int kind,
                        int64_t *order) {
    entry *e = malloc((size_t)(L > 0 ? L : 1) * sizeof(entry));
    if (!e) return -2;
    const uint64_t FILL = UINT64_MAX;
    for (Py_ssize_t i = 0; i < b; i++) {
        const uint8_t *ok = eligible + i * L;
        int64_t *out = order + i * k;
        Py_ssize_t n = 0;
        for (Py_ssize_t j = 0; j < L; j++) {
            if (!ok[j]) continue;
            uint64_t key = kind == 0   ? ((const uint64_t *)keys)[i * L + j]
                           : kind == 1 ? (uint64_t)((const int64_t *)keys)[i * L + j] ^ 0x8000000000000000ull
                                       : (uint64_t)j;
            if (key == FILL) continue; /* ties with the ineligible entries: placed among them by column */
            e[n].key = key;
            e[n].col = j;
            n++;
        }
        if (kind != 2) sort_entries(e, n);
        Py_ssize_t got = n < k ? n : k;
        for (Py_ssize_t t = 0; t < got; t++) out[t] = e[t].col;
        if (got == k) continue;
        /* the rest: columns whose key is the fill, in column order */
        for (Py_ssize_t j = 0; j < L && got < k; j++) {
            int fill = !ok[j];
            if (!fill && kind != 2) {
                uint64_t key = kind == 0 ? ((const uint64_t *)keys)[i * L + j]
                                         : (uint64_t)((const int64_t *)keys)[i * L + j] ^ 0x8000000000000000ull;
                fill = key == FILL;
            }
            if (fill) out[got++] = j;
        }
    }
    free(e);
    return 0;
}

static PyObject *py_hash(PyObject *self, PyObject *args) {
    Py_buffer qhash, values, out;
    Py_ssize_t b, L;
    unsigned long long stream;
    if (!PyArg_ParseTuple(args, "y*y*nnKw*", &qhash, &values, &b, &L, &stream, &out)) return NULL;
    PyObject *res = NULL;
    if (b < 0 || L < 0) {
        PyErr_SetString(PyExc_ValueError, "hash: bad shape");
    } else if (need(&qhash, b, 8, "qhash") && need(&values, b * L, 8, "values") && need(&out, b * L, 8, "out")) {
        Py_BEGIN_ALLOW_THREADS hash_core((const uint64_t *)qhash.buf, (const int64_t *)values.buf, b, L,
                                         (uint64_t)stream, (uint64_t *)out.buf);
        Py_END_ALLOW_THREADS res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&qhash);
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    return res;
}

static PyObject *py_first_k(PyObject *self, PyObject *args) {
    Py_buffer keys, eligible, order;
    Py_ssize_t b, L, k;
    int kind;
    if (!PyArg_ParseTuple(args, "y*y*nnniw*", &keys, &eligible, &b, &L, &k, &kind, &order)) return NULL;
    PyObject *res = NULL;
    if (b < 0 || L < 0 || k < 0 || k > L || kind < 0 || kind > 2) {
        PyErr_SetString(PyExc_ValueError, "first_k: bad shape");
    } else if ((kind == 2 || need(&keys, b * L, 8, "keys")) && need(&eligible, b * L, 1, "eligible") &&
               need(&order, b * k, 8, "order")) {
        int st;
        Py_BEGIN_ALLOW_THREADS st = first_k_core(keys.buf, (const uint8_t *)eligible.buf, b, L, k, kind,
                                                 (int64_t *)order.buf);
        Py_END_ALLOW_THREADS if (st == -2) PyErr_NoMemory();
        else res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&keys);
    PyBuffer_Release(&eligible);
    PyBuffer_Release(&order);
    return res;
}

static PyMethodDef methods[] = {
    {"hash", py_hash, METH_VARARGS, "hash(qhash, values, b, L, stream, out): hash_keys into out (uint64[b, L])"},
    {"first_k", py_first_k, METH_VARARGS,
     "first_k(keys, eligible, b, L, k, kind, order_out): the first k of each line's stable sort (kind 0 uint64, "
     "1 int64, 2 column order)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_select", "Selection kernels for the strategies.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__select(void) { return PyModule_Create(&module); }
