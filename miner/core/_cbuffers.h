/* What the C extensions of cir_mine share: Python's buffer protocol, checked before a kernel reads
 * or writes a buffer (miner/core/search/_windows.c, miner/core/strategies/_select.c,
 * miner/accel/_survivors.c). */
#ifndef CIR_MINE_CBUFFERS_H
#define CIR_MINE_CBUFFERS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 1 when buffer ``b`` holds at least ``count`` items of ``size`` bytes, else 0 with a ValueError */
static inline int need(Py_buffer *b, Py_ssize_t count, Py_ssize_t size, const char *name) {
    if (count < 0 || b->len < count * size) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, at least %zd needed", name, b->len, count * size);
        return 0;
    }
    return 1;
}
#endif
