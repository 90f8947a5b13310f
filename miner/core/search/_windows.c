/* Row windows for the exact re-scoring (cir_mine.miner.core.search.exact holds their contract: its
 * scores equal those of one FAISS call over every row, bit for bit).
 *
 *   count  per window of 2^shift gallery rows, the most rows one query holds in it -> the rows (not pads)
 *   place  each query's rows copied to its line of its window's block (-1 pads), and where each
 *          entry went
 *   keys   each entry's sort key from its score: the float's bits in descending order, then the row
 *          (cir_mine.miner.core.search.topk's key, so one sort of a line orders it as topk_desc does)
 *   unkey  the first k keys of each sorted line back to (score, row)
 *
 * The blocks let FAISS score one window of the gallery at a time against every query, so that the
 * rows it gathers stay in the cache; each score is still one dot product of one query and one row.
 */
#include "../_cbuffers.h"
#include <math.h>

/* widths[j] = max over queries of the rows of window j -> the rows; -1 on a row past the windows, -2 on memory */
static int64_t count_core(const int64_t *rows, Py_ssize_t b, Py_ssize_t L, int shift, Py_ssize_t nw, int64_t *widths) {
    int64_t *c = calloc((size_t)(nw > 0 ? nw : 1), sizeof(int64_t));
    if (!c) return -2;
    memset(widths, 0, (size_t)nw * sizeof(int64_t));
    int64_t valid = 0;
    for (Py_ssize_t i = 0; i < b; i++) {
        const int64_t *r = rows + i * L;
        for (Py_ssize_t j = 0; j < L; j++) {
            if (r[j] < 0) continue;
            int64_t w = r[j] >> shift;
            if (w >= nw) {
                free(c);
                return -1;
            }
            c[w]++;
            valid++;
        }
        for (Py_ssize_t w = 0; w < nw; w++) {
            if (c[w] > widths[w]) widths[w] = c[w];
            c[w] = 0;
        }
    }
    free(c);
    return valid;
}

/* ids[base[w] + i * widths[w] + slot] = rows[i, j] for its window w; pos[i, j] = that index (-1 for a
 * pad); every other entry of ids is -1. -1 on a row past the windows or a window overfull, -2 on memory */
static int place_core(const int64_t *rows, Py_ssize_t b, Py_ssize_t L, int shift, Py_ssize_t nw, const int64_t *base,
                      const int64_t *widths, int64_t *ids, Py_ssize_t nids, int64_t *pos) {
    int64_t *c = calloc((size_t)(nw > 0 ? nw : 1), sizeof(int64_t));
    if (!c) return -2;
    memset(ids, 0xFF, (size_t)nids * sizeof(int64_t)); /* all bits set: -1 */
    int st = 0;
    for (Py_ssize_t i = 0; i < b && !st; i++) {
        const int64_t *r = rows + i * L;
        int64_t *p = pos + i * L;
        for (Py_ssize_t j = 0; j < L; j++) {
            if (r[j] < 0) {
                p[j] = -1;
                continue;
            }
            int64_t w = r[j] >> shift;
            if (w >= nw || c[w] >= widths[w]) {
                st = -1;
                break;
            }
            int64_t at = base[w] + i * widths[w] + c[w]++;
            if (at < 0 || at >= nids) {
                st = -1;
                break;
            }
            ids[at] = r[j];
            p[j] = at;
        }
        memset(c, 0, (size_t)nw * sizeof(int64_t));
    }
    free(c);
    return st;
}

/* topk's key: the score's bits mapped so that ascending order is the floats' descending order (an
 * involution), -0.0 counted as 0.0 */
static inline uint32_t desc_bits(uint32_t bits) { return bits ^ (((bits >> 31) ^ 1u) * 0x7FFFFFFFu); }

/* keys[i] = desc_bits(scores[pos[i]] + 0) << 32 | rows[i] (low 32 bits); all ones where rows[i] < 0.
 * -1 on a position out of range */
static int keys_core(const float *scores, Py_ssize_t ns, const int64_t *pos, const int64_t *rows, Py_ssize_t n,
                     uint64_t *keys) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (rows[i] < 0) {
            keys[i] = UINT64_MAX;
            continue;
        }
        if (pos[i] < 0 || pos[i] >= ns) return -1;
        float s = scores[pos[i]] + 0.0f; /* -0.0 + 0.0 = 0.0, as topk's D + 0 */
        uint32_t u;
        memcpy(&u, &s, 4);
        keys[i] = ((uint64_t)desc_bits(u) << 32) | ((uint64_t)rows[i] & 0xFFFFFFFFu);
    }
    return 0;
}

/* the first k keys of each line of L: D = the score (-inf for a pad), I = the row (-1 for a pad) */
static void unkey_core(const uint64_t *keys, Py_ssize_t b, Py_ssize_t L, Py_ssize_t k, float *D, int64_t *I) {
    for (Py_ssize_t i = 0; i < b; i++) {
        const uint64_t *line = keys + i * L;
        for (Py_ssize_t j = 0; j < k; j++) {
            uint64_t key = line[j];
            if (key == UINT64_MAX) {
                D[i * k + j] = -INFINITY;
                I[i * k + j] = -1;
                continue;
            }
            uint32_t u = desc_bits((uint32_t)(key >> 32));
            memcpy(&D[i * k + j], &u, 4);
            I[i * k + j] = (int64_t)(key & 0xFFFFFFFFu);
        }
    }
}

static PyObject *py_count(PyObject *self, PyObject *args) {
    Py_buffer rows, widths;
    Py_ssize_t b, L, nw;
    int shift;
    if (!PyArg_ParseTuple(args, "y*nninw*", &rows, &b, &L, &shift, &nw, &widths)) return NULL;
    PyObject *res = NULL;
    if (b < 0 || L < 0 || nw < 1 || shift < 0 || shift > 62) {
        PyErr_SetString(PyExc_ValueError, "count: bad shape");
    } else if (need(&rows, b * L, 8, "rows") && need(&widths, nw, 8, "widths")) {
        int64_t st;
        Py_BEGIN_ALLOW_THREADS st = count_core((const int64_t *)rows.buf, b, L, shift, nw, (int64_t *)widths.buf);
        Py_END_ALLOW_THREADS if (st == -1) PyErr_SetString(PyExc_ValueError, "count: a row is past the windows");
        else if (st == -2) PyErr_NoMemory();
        else res = PyLong_FromLongLong(st);
    }
    PyBuffer_Release(&rows);
    PyBuffer_Release(&widths);
    return res;
}

static PyObject *py_place(PyObject *self, PyObject *args) {
    Py_buffer rows, base, widths, ids, pos;
    Py_ssize_t b, L, nw;
    int shift;
    if (!PyArg_ParseTuple(args, "y*nniny*y*w*w*", &rows, &b, &L, &shift, &nw, &base, &widths, &ids, &pos))
        return NULL;
    PyObject *res = NULL;
    if (b < 0 || L < 0 || nw < 1 || shift < 0 || shift > 62) {
        PyErr_SetString(PyExc_ValueError, "place: bad shape");
    } else if (need(&rows, b * L, 8, "rows") && need(&base, nw, 8, "base") && need(&widths, nw, 8, "widths") &&
               need(&pos, b * L, 8, "pos")) {
        int st;
        Py_BEGIN_ALLOW_THREADS st = place_core((const int64_t *)rows.buf, b, L, shift, nw, (const int64_t *)base.buf,
                                               (const int64_t *)widths.buf, (int64_t *)ids.buf, ids.len / 8,
                                               (int64_t *)pos.buf);
        Py_END_ALLOW_THREADS if (st == -1) PyErr_SetString(PyExc_ValueError, "place: a row does not fit its window");
        else if (st == -2) PyErr_NoMemory();
        else res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&rows);
    PyBuffer_Release(&base);
    PyBuffer_Release(&widths);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&pos);
    return res;
}

static PyObject *py_keys(PyObject *self, PyObject *args) {
    Py_buffer scores, pos, rows, keys;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*nw*", &scores, &pos, &rows, &n, &keys)) return NULL;
    PyObject *res = NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "keys: bad shape");
    } else if (need(&pos, n, 8, "pos") && need(&rows, n, 8, "rows") && need(&keys, n, 8, "keys")) {
        int st;
        Py_BEGIN_ALLOW_THREADS st = keys_core((const float *)scores.buf, scores.len / 4, (const int64_t *)pos.buf,
                                              (const int64_t *)rows.buf, n, (uint64_t *)keys.buf);
        Py_END_ALLOW_THREADS if (st == -1) PyErr_SetString(PyExc_ValueError, "keys: a position is out of range");
        else res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&scores);
    PyBuffer_Release(&pos);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&keys);
    return res;
}

static PyObject *py_unkey(PyObject *self, PyObject *args) {
    Py_buffer keys, D, I;
    Py_ssize_t b, L, k;
    if (!PyArg_ParseTuple(args, "y*nnnw*w*", &keys, &b, &L, &k, &D, &I)) return NULL;
    PyObject *res = NULL;
    if (b < 0 || L < 0 || k < 0 || k > L) {
        PyErr_SetString(PyExc_ValueError, "unkey: bad shape");
    } else if (need(&keys, b * L, 8, "keys") && need(&D, b * k, 4, "D") && need(&I, b * k, 8, "I")) {
        Py_BEGIN_ALLOW_THREADS unkey_core((const uint64_t *)keys.buf, b, L, k, (float *)D.buf, (int64_t *)I.buf);
        Py_END_ALLOW_THREADS res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&keys);
    PyBuffer_Release(&D);
    PyBuffer_Release(&I);
    return res;
}

static PyMethodDef methods[] = {
    {"count", py_count, METH_VARARGS,
     "count(rows, b, L, shift, nw, widths_out) -> the rows; widths_out: the most one query holds in each window"},
    {"place", py_place, METH_VARARGS,
     "place(rows, b, L, shift, nw, base, widths, ids_out, pos_out): each row to its window's block"},
    {"keys", py_keys, METH_VARARGS,
     "keys(scores, pos, rows, n, keys_out): topk's sort key of each entry, its score at scores[pos]"},
    {"unkey", py_unkey, METH_VARARGS, "unkey(keys, b, L, k, D_out, I_out): the first k keys of each line"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_windows", "Row windows for the exact re-scoring.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__windows(void) { return PyModule_Create(&module); }
