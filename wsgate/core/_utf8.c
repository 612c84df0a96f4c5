/*
 * wsgate.core._utf8: the frame engine's UTF-8 check of (masked) text payloads, in C.
 *
 * One function, check(data, start, end, key, offset, state) -> state: feeds the bytes
 * data[start:end], unmasked with the 4-byte `key` (None: not masked) rotated by `offset`, to an
 * incremental UTF-8 validator (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF)
 * that starts in `state` and returns the state it ends in: 0 between characters, 8 once the
 * text is invalid (it stays there), any other value in the middle of a character.  Nothing is
 * copied or allocated; runs of ASCII go 8 bytes at a time, common 2- and 3-byte characters
 * inline.
 *
 * wsgate/core/frames.py has the pure-Python twin (CPython's incremental decoder) with the same
 * verdicts at the same bytes; the tests run the engine both ways.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum {
    ACCEPT = 0,
    NEED1 = 1,   /* one continuation byte 80..BF to go */
    NEED2 = 2,   /* two */
    NEED3 = 3,   /* three */
    AFTER_E0 = 4, /* next must be A0..BF (no overlong), then NEED1 */
    AFTER_ED = 5, /* next must be 80..9F (no surrogate), then NEED1 */
    AFTER_F0 = 6, /* next must be 90..BF (no overlong), then NEED2 */
    AFTER_F4 = 7, /* next must be 80..8F (not above U+10FFFF), then NEED2 */
    REJECT = 8,
};

static inline int
step(int state, unsigned char c)
{
    switch (state) {
    case ACCEPT:
        if (c < 0x80) return ACCEPT;
        if (c < 0xC2) return REJECT;
        if (c < 0xE0) return NEED1;
        if (c == 0xE0) return AFTER_E0;
        if (c == 0xED) return AFTER_ED;
        if (c < 0xF0) return NEED2;
        if (c == 0xF0) return AFTER_F0;
        if (c < 0xF4) return NEED3;
        if (c == 0xF4) return AFTER_F4;
        return REJECT;
    case NEED1:
    case NEED2:
    case NEED3:
        return (c & 0xC0) == 0x80 ? state - 1 : REJECT;
    case AFTER_E0:
        return (c >= 0xA0 && c <= 0xBF) ? NEED1 : REJECT;
    case AFTER_ED:
        return (c >= 0x80 && c <= 0x9F) ? NEED1 : REJECT;
    case AFTER_F0:
        return (c >= 0x90 && c <= 0xBF) ? NEED2 : REJECT;
    case AFTER_F4:
        return (c >= 0x80 && c <= 0x8F) ? NEED2 : REJECT;
    default:
        return REJECT;
    }
}

static int
check_bytes(const unsigned char *p, Py_ssize_t n, const unsigned char *key, Py_ssize_t offset,
            int state)
{
    /* k[j] unmasks p[j]; it repeats every 4 bytes, so k + (i & 3) holds the 8 bytes for p + i */
    unsigned char k[12];
    unsigned char c, c1, c2;
    uint64_t kw, word;
    Py_ssize_t i = 0;
    int j;

    for (j = 0; j < 12; j++)
        k[j] = key != NULL ? key[(offset + j) & 3] : 0;
    for (;;) {
        /* a character left open (by the previous chunk, or a rare lead byte below) */
        while (state != ACCEPT && i < n) {
            state = step(state, p[i] ^ k[i & 3]);
            if (state == REJECT)
                return REJECT;
            i++;
        }
        if (i >= n)
            return state;
        /* eight bytes at a time while they are ASCII, then straight to the first byte that is
           not (the lowest set high bit, on little-endian machines) */
        memcpy(&kw, k + (i & 3), 8);
        while (n - i >= 8) {
            memcpy(&word, p + i, 8);
            word = (word ^ kw) & UINT64_C(0x8080808080808080);
            if (word)
                break;
            i += 8;
        }
        if (i >= n)
            return ACCEPT;
        c = p[i] ^ k[i & 3];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xC2 && c <= 0xDF && n - i >= 2) {
            /* the common two-byte characters (Latin, Greek, Cyrillic, ...) inline */
            c1 = p[i + 1] ^ k[(i + 1) & 3];
            if ((c1 & 0xC0) != 0x80)
                return REJECT;
            i += 2;
        } else if (((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) && n - i >= 3) {
            /* three-byte characters without range exceptions (most of the BMP) inline */
            c1 = p[i + 1] ^ k[(i + 1) & 3];
            c2 = p[i + 2] ^ k[(i + 2) & 3];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80)
                return REJECT;
            i += 3;
        } else {
            /* everything else through the state machine: E0, ED, F0-F4, invalid bytes, and
               characters cut by the end of the chunk */
            state = step(ACCEPT, c);
            if (state == REJECT)
                return REJECT;
            i++;
        }
    }
}

static PyObject *
utf8_check(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data, key;
    Py_ssize_t start, end, offset;
    int state, result;
    const unsigned char *key_bytes = NULL;

    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "check(data, start, end, key, offset, state)");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    end = PyLong_AsSsize_t(args[2]);
    offset = PyLong_AsSsize_t(args[4]);
    state = (int)PyLong_AsLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (state < 0 || state > REJECT) {
        PyErr_SetString(PyExc_ValueError, "state out of range");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (start < 0 || end > data.len || start > end) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "start and end out of range");
        return NULL;
    }
    if (args[3] != Py_None) {
        if (PyObject_GetBuffer(args[3], &key, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&data);
            return NULL;
        }
        if (key.len != 4) {
            PyBuffer_Release(&key);
            PyBuffer_Release(&data);
            PyErr_SetString(PyExc_ValueError, "a mask key is 4 bytes");
            return NULL;
        }
        key_bytes = key.buf;
    }
    if (state == REJECT)
        result = REJECT;
    else
        result = check_bytes((const unsigned char *)data.buf + start, end - start, key_bytes,
                             offset & 3, state);
    if (key_bytes != NULL)
        PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return PyLong_FromLong(result);
}

static PyMethodDef methods[] = {
    {"check", (PyCFunction)(void (*)(void))utf8_check, METH_FASTCALL,
     "check(data, start, end, key, offset, state) -> state: feed data[start:end], unmasked with "
     "key rotated by offset, to the UTF-8 validator; 0: between characters, 8: invalid."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "wsgate.core._utf8", "The frame engine's UTF-8 check, in C.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__utf8(void)
{
    return PyModule_Create(&module);
}
