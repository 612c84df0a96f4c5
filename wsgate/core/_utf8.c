/*
 * wsgate.core._utf8: the frame engine's UTF-8 check of (masked) text payloads, and its fast
 * path's walk over whole messages, in C.
 *
 * check(data, start, end, key, offset, state) -> state: feeds the bytes data[start:end],
 * unmasked with the 4-byte `key` (None: not masked) rotated by `offset`, to an incremental UTF-8
 * validator (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF) that starts in
 * `state` and returns the state it ends in: 0 between characters, 8 once the text is invalid (it
 * stays there), any other value in the middle of a character.  Nothing is copied or allocated.
 *
 * Two ways to the same verdict:
 * - the scalar state machine (step, check_scalar): runs of ASCII go 8 bytes at a time, common 2-
 *   and 3-byte characters inline;
 * - on x86-64 with GCC or Clang, SIMD blocks (32 bytes with AVX2, else 16 with SSSE3, chosen once
 *   at import from what the CPU supports; no global compiler flags) for chunks of a block and 3
 *   bytes or more: step() to a character boundary at least 3 bytes in, then blocks unmasked and checked
 *   with a handful of vector rules (see "The blocks" below; a run of ASCII blocks costs one test
 *   a block) up to the chunk's last multiple of 4 bytes, then step() again from the last
 *   character the blocks did not see whole (at most 6 bytes), so characters cut by the end of
 *   the chunk, and the state returned, are the scalar machine's.
 *
 * PATH names the way check() takes ("avx2", "ssse3" or "scalar"), PATHS every way this machine
 * has, and check_using(path, data, start, end, key, offset, state) takes a given one (the tests
 * compare them).
 *
 * wsgate/core/frames.py has the pure-Python twin (CPython's incremental decoder) with the same
 * verdicts at the same bytes; the tests run the engine both ways.
 *
 * scan(data, masked, deflate, limit, quota, check) -> (end, messages, payload bytes) is the
 * engine's fast path, which calls check()'s machinery on whole text messages: the walk over the
 * leading run of whole single-frame messages of a read (PyUtf8.scan is its twin).
 *
 * pump(source, sink, size, masked, deflate, limit, quota, check) is that walk with its I/O: a
 * non-blocking read of the socket `source` into one reused buffer, the walk there, and a send of
 * the read to the socket `sink` when it is whole messages; only what is left for the caller
 * becomes a bytes object (PyUtf8.pump is its twin).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define UTF8_SIMD 1
#include <immintrin.h>
#endif

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

/* The scalar state machine, over p[0:n] unmasked with key rotated by offset, from `state`. */
static int
check_scalar(const unsigned char *p, Py_ssize_t n, const unsigned char *key, Py_ssize_t offset,
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

#ifdef UTF8_SIMD
/* The key as a little-endian word k: its byte j unmasks p[j]; key_at(k, i) is the word that
   unmasks the 4 bytes at p + i (and, repeated, any multiple of 4 from there). */
static inline uint32_t
key_at(uint32_t k, Py_ssize_t i)
{
    unsigned r = 8 * (unsigned)(i & 3);
    return r ? (k >> r) | (k << (32 - r)) : k;
}

/*
 * The blocks.  blocks_*(p, i, end, k, masked) checks p[i:end] (i >= 3 and a character
 * boundary; end - i at least a block and a multiple of 4; unmasked with k if masked) and returns
 * 0 if it found the text invalid, else 1.  The blocks go from i, the last one ending at end and
 * overlapping the one before it (by a multiple of 4 bytes: the key pattern stays the same).
 * Every byte `cur` is checked against the three bytes before it (prev1, prev2, prev3: unaligned
 * loads 1, 2 and 3 bytes back, unmasked with the key pattern shifted to match; for the first
 * block they are the end of characters step() finished), by two rules:
 *
 * - structure: cur is a continuation byte (10xxxxxx) exactly when prev1 >= C0 (a lead), or
 *   prev2 >= E0 (a 3- or 4-byte lead), or prev3 >= F0 (a 4-byte lead).  Both sides are worked
 *   out in the high bit of each byte, and compared with XOR;
 * - pairs: a lead prev1 allows only some continuations.  Three 16-entry tables, looked up by the
 *   high and the low half of prev1 and the high half of cur, give each bad pair a bit that all
 *   three lookups share, so their AND is non-zero exactly for a bad pair:
 *     E0 then 80..9F (overlong)           ED then A0..BF (surrogate)
 *     F0 then 80..8F (overlong)           F4 then 90..BF (above U+10FFFF)
 *     C0 or C1 then 80..BF (overlong)     F5..FF then 80..BF (never in UTF-8)
 *   (a bad lead followed by anything but a continuation breaks the structure rule already).
 *
 * A block of ASCII skips both, and so do the ASCII blocks after it, one test each; but then the
 * block before it must not have ended inside a character (its last byte below C0, the one before
 * below E0, the one before that below F0: see tail_max).
 *
 * What the blocks cannot see, step() does: a lead byte among the last three bytes of the last
 * block, whose character may go on past `end`, and the rule that byte breaks.  So the caller
 * resumes at the last byte >= C0 among those three, if any.
 */
#define BAD_E0 0x01
#define BAD_ED 0x02
#define BAD_F0 0x04
#define BAD_F4 0x08
#define BAD_C0 0x10 /* C0, C1 */
#define BAD_F5 0x20 /* F5..FF */
#define BAD_CONT (BAD_C0 | BAD_F5)

/* by the high half of prev1 */
#define TABLE_LEAD_HI                                                                          \
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, BAD_C0, 0, BAD_E0 | BAD_ED, BAD_F0 | BAD_F4 | BAD_F5
/* by the low half of prev1 */
#define TABLE_LEAD_LO                                                                          \
    BAD_E0 | BAD_F0 | BAD_C0, BAD_C0, 0, 0, BAD_F4, BAD_F5, BAD_F5, BAD_F5, BAD_F5, BAD_F5,    \
        BAD_F5, BAD_F5, BAD_F5, BAD_ED | BAD_F5, BAD_F5, BAD_F5
/* by the high half of cur */
#define TABLE_CONT_HI                                                                          \
    0, 0, 0, 0, 0, 0, 0, 0, BAD_E0 | BAD_F0 | BAD_CONT, BAD_E0 | BAD_F4 | BAD_CONT,            \
        BAD_ED | BAD_F4 | BAD_CONT, BAD_ED | BAD_F4 | BAD_CONT, 0, 0, 0, 0

__attribute__((target("avx2"))) static inline __m256i
load32(const unsigned char *p, __m256i key, const int masked)
{
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return masked ? _mm256_xor_si256(v, key) : v;
}

__attribute__((target("avx2"), always_inline)) static inline int
blocks_avx2_body(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, uint32_t k,
                 const int masked)
{
    const __m256i k0 = _mm256_set1_epi32((int)key_at(k, i));
    const __m256i k1 = _mm256_set1_epi32((int)key_at(k, i - 1));
    const __m256i k2 = _mm256_set1_epi32((int)key_at(k, i - 2));
    const __m256i k3 = _mm256_set1_epi32((int)key_at(k, i - 3));
    const __m256i lead_hi = _mm256_setr_epi8(TABLE_LEAD_HI, TABLE_LEAD_HI);
    const __m256i lead_lo = _mm256_setr_epi8(TABLE_LEAD_LO, TABLE_LEAD_LO);
    const __m256i cont_hi = _mm256_setr_epi8(TABLE_CONT_HI, TABLE_CONT_HI);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i zero = _mm256_setzero_si256();
    /* subtracted (saturating) from a block: non-zero where it ends inside a character */
    const __m256i tail_max = _mm256_setr_epi8(
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, (char)0xEF, (char)0xDF, (char)0xBF);
    /* bad: any bit, a pair or a tail error; bad_structure: the high bit of a byte */
    __m256i bad = zero, bad_structure = zero, last = zero;
    __m256i cur, prev1, prev2, prev3, need, pair;

    while (i < end) {
        if (end - i < 32)
            i = end - 32; /* the last block, over the end of the one before */
        cur = load32(p + i, k0, masked);
        if (_mm256_movemask_epi8(cur) == 0) {
            /* ASCII: the block before, if not ASCII (else zero), must not end inside a
               character; then on past the ASCII blocks that follow */
            bad = _mm256_or_si256(bad, _mm256_subs_epu8(last, tail_max));
            last = zero;
            do
                i += 32;
            while (end - i >= 32 && _mm256_movemask_epi8(load32(p + i, k0, masked)) == 0);
            continue;
        }
        last = cur;
        prev1 = load32(p + i - 1, k1, masked);
        prev2 = load32(p + i - 2, k2, masked);
        prev3 = load32(p + i - 3, k3, masked);
        /* structure, in the high bit of each byte: a continuation byte is needed after a byte
           11xxxxxx (1), or 2 or 3 bytes after one above DF or EF (saturating subtraction of
           60 or 70 sets the bit); a byte 10xxxxxx is one */
        need = _mm256_or_si256(
            _mm256_and_si256(prev1, _mm256_slli_epi16(prev1, 1)),
            _mm256_or_si256(_mm256_subs_epu8(prev2, _mm256_set1_epi8(0x60)),
                            _mm256_subs_epu8(prev3, _mm256_set1_epi8(0x70))));
        bad_structure = _mm256_or_si256(
            bad_structure,
            _mm256_xor_si256(need, _mm256_andnot_si256(_mm256_slli_epi16(cur, 1), cur)));
        /* pairs */
        pair = _mm256_and_si256(
            _mm256_shuffle_epi8(lead_hi, _mm256_and_si256(_mm256_srli_epi16(prev1, 4), nibble)),
            _mm256_shuffle_epi8(lead_lo, _mm256_and_si256(prev1, nibble)));
        pair = _mm256_and_si256(
            pair,
            _mm256_shuffle_epi8(cont_hi, _mm256_and_si256(_mm256_srli_epi16(cur, 4), nibble)));
        bad = _mm256_or_si256(bad, pair);
        i += 32;
    }
    return _mm256_testz_si256(bad, bad) && _mm256_movemask_epi8(bad_structure) == 0;
}

__attribute__((target("avx2"))) static int
blocks_avx2(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, uint32_t k, int masked)
{
    return masked ? blocks_avx2_body(p, i, end, k, 1) : blocks_avx2_body(p, i, end, k, 0);
}

/* The same, 16 bytes at a time, for x86-64 CPUs without AVX2. */
__attribute__((target("ssse3"))) static inline __m128i
load16(const unsigned char *p, __m128i key, const int masked)
{
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return masked ? _mm_xor_si128(v, key) : v;
}

__attribute__((target("ssse3"), always_inline)) static inline int
blocks_ssse3_body(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, uint32_t k,
                  const int masked)
{
    const __m128i k0 = _mm_set1_epi32((int)key_at(k, i));
    const __m128i k1 = _mm_set1_epi32((int)key_at(k, i - 1));
    const __m128i k2 = _mm_set1_epi32((int)key_at(k, i - 2));
    const __m128i k3 = _mm_set1_epi32((int)key_at(k, i - 3));
    const __m128i lead_hi = _mm_setr_epi8(TABLE_LEAD_HI);
    const __m128i lead_lo = _mm_setr_epi8(TABLE_LEAD_LO);
    const __m128i cont_hi = _mm_setr_epi8(TABLE_CONT_HI);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i zero = _mm_setzero_si128();
    const __m128i tail_max = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                           (char)0xEF, (char)0xDF, (char)0xBF);
    __m128i bad = zero, bad_structure = zero, last = zero;
    __m128i cur, prev1, prev2, prev3, need, pair;

    while (i < end) {
        if (end - i < 16)
            i = end - 16;
        cur = load16(p + i, k0, masked);
        if (_mm_movemask_epi8(cur) == 0) {
            bad = _mm_or_si128(bad, _mm_subs_epu8(last, tail_max));
            last = zero;
            do
                i += 16;
            while (end - i >= 16 && _mm_movemask_epi8(load16(p + i, k0, masked)) == 0);
            continue;
        }
        last = cur;
        prev1 = load16(p + i - 1, k1, masked);
        prev2 = load16(p + i - 2, k2, masked);
        prev3 = load16(p + i - 3, k3, masked);
        need = _mm_or_si128(_mm_and_si128(prev1, _mm_slli_epi16(prev1, 1)),
                            _mm_or_si128(_mm_subs_epu8(prev2, _mm_set1_epi8(0x60)),
                                         _mm_subs_epu8(prev3, _mm_set1_epi8(0x70))));
        bad_structure = _mm_or_si128(
            bad_structure, _mm_xor_si128(need, _mm_andnot_si128(_mm_slli_epi16(cur, 1), cur)));
        pair = _mm_and_si128(
            _mm_shuffle_epi8(lead_hi, _mm_and_si128(_mm_srli_epi16(prev1, 4), nibble)),
            _mm_shuffle_epi8(lead_lo, _mm_and_si128(prev1, nibble)));
        pair = _mm_and_si128(
            pair, _mm_shuffle_epi8(cont_hi, _mm_and_si128(_mm_srli_epi16(cur, 4), nibble)));
        bad = _mm_or_si128(bad, pair);
        i += 16;
    }
    return _mm_movemask_epi8(_mm_cmpeq_epi8(bad, zero)) == 0xFFFF &&
           _mm_movemask_epi8(bad_structure) == 0;
}

__attribute__((target("ssse3"))) static int
blocks_ssse3(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, uint32_t k, int masked)
{
    return masked ? blocks_ssse3_body(p, i, end, k, 1) : blocks_ssse3_body(p, i, end, k, 0);
}
#endif /* UTF8_SIMD */

typedef int (*blocks_fn)(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, uint32_t k,
                         int masked);

static const struct path {
    const char *name;
    blocks_fn blocks; /* NULL: the scalar machine only */
    Py_ssize_t width;
} paths[] = {
    {"scalar", NULL, 0},
#ifdef UTF8_SIMD
    {"ssse3", blocks_ssse3, 16},
    {"avx2", blocks_avx2, 32},
#endif
};
static int n_usable = 1; /* paths[0 : n_usable] run on this CPU; check() takes the last */

/* check() by `path`: the scalar machine alone, or step() to a character boundary, the blocks,
   and step() for the last few bytes */
static int
check_bytes(const unsigned char *p, Py_ssize_t n, const unsigned char *key, Py_ssize_t offset,
            int state, const struct path *path)
{
#ifdef UTF8_SIMD
    uint32_t k = 0; /* byte j unmasks p[j], and p[j + 4], ... */
    Py_ssize_t i = 0, end, j;
    unsigned char c;

    if (path->blocks == NULL || n < 3 + path->width)
        return check_scalar(p, n, key, offset, state);
    if (key != NULL) {
        for (j = 3; j >= 0; j--)
            k = k << 8 | key[(offset + j) & 3];
    }
    /* to a character boundary at least 3 bytes in (the blocks look 3 bytes back) */
    while (i < n && (state != ACCEPT || i < 3)) {
        c = p[i] ^ (unsigned char)(k >> 8 * (i & 3));
        if (state != ACCEPT || c >= 0x80) {
            state = step(state, c);
            if (state == REJECT)
                return REJECT;
        }
        i++;
    }
    if (n - i < path->width)
        return check_scalar(p + i, n - i, key, (offset + i) & 3, state);
    /* blocks to the last multiple of 4 bytes (so the key pattern is the same in the last block,
       which overlaps the one before) */
    end = i + path->width + ((n - i - path->width) & ~(Py_ssize_t)3);
    if (!path->blocks(p, i, end, k, key != NULL))
        return REJECT;
    /* the step machine finishes from the last lead byte whose character the blocks may not
       have seen whole (one among their last three bytes), else from where they end: at most
       six bytes */
    for (i = end, j = end - 1; j >= end - 3; j--) {
        if ((p[j] ^ (unsigned char)(k >> 8 * (j & 3))) >= 0xC0) {
            i = j;
            break;
        }
    }
    for (; i < n; i++) {
        state = step(state, p[i] ^ (unsigned char)(k >> 8 * (i & 3)));
        if (state == REJECT)
            return REJECT;
    }
    return state;
#else
    return check_scalar(p, n, key, offset, state);
#endif
}

/* check(data, start, end, key, offset, state) with the given path */
static PyObject *
run_check(PyObject *const *args, Py_ssize_t nargs, const struct path *path)
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
                             offset & 3, state, path);
    if (key_bytes != NULL)
        PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return PyLong_FromLong(result);
}

static PyObject *
utf8_check(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return run_check(args, nargs, &paths[n_usable - 1]);
}

static PyObject *
utf8_check_using(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const char *name;
    int i;

    if (nargs < 1 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "check_using(path, data, start, end, key, offset, state)");
        return NULL;
    }
    name = PyUnicode_AsUTF8(args[0]);
    if (name == NULL)
        return NULL;
    for (i = 0; i < n_usable; i++) {
        if (strcmp(name, paths[i].name) == 0)
            return run_check(args + 1, nargs - 1, &paths[i]);
    }
    PyErr_Format(PyExc_ValueError, "no path %R on this machine", args[0]);
    return NULL;
}

/* The walk behind scan() and pump(): the leading run of complete single-frame text and binary
   messages of p[0:n] (fin set, no RSV bit but RSV1 with deflate, masked exactly when `masked`,
   payload at most `limit` bytes, text valid UTF-8 when `check`), at most `quota` of them.
   Returns where the run ends; adds its messages and payload bytes to *count and *total. */
static Py_ssize_t
walk(const unsigned char *p, Py_ssize_t n, int masked, int deflate, unsigned long long limit,
     Py_ssize_t quota, int check, Py_ssize_t *count, long long *total)
{
    unsigned long long length;
    Py_ssize_t i = 0, start, key = masked ? 4 : 0;
    unsigned char b0, b1;
    const struct path *path = &paths[n_usable - 1];

    while (n - i >= 2 && *count < quota) {
        b0 = p[i];
        b1 = p[i + 1];
        if (!(b0 == 0x81 || b0 == 0x82 || (deflate && (b0 == 0xC1 || b0 == 0xC2))))
            break;
        if ((b1 & 0x80) != (masked ? 0x80 : 0))
            break;
        length = b1 & 0x7F;
        start = i + 2;
        if (length == 126) {
            if (n - i < 4)
                break;
            length = (unsigned long long)p[i + 2] << 8 | p[i + 3];
            start += 2;
        } else if (length == 127) {
            int j;
            if (n - i < 10 || p[i + 2] & 0x80)
                break;
            for (length = 0, j = 2; j < 10; j++)
                length = length << 8 | p[i + j];
            start += 8;
        }
        if (n - start < key || length > (unsigned long long)(n - start - key) || length > limit)
            break;
        if (check && b0 == 0x81 &&
            check_bytes(p + start + key, (Py_ssize_t)length, masked ? p + start : NULL, 0, ACCEPT,
                        path) != ACCEPT)
            break;
        (*count)++;
        *total += (long long)length;
        i = start + key + (Py_ssize_t)length;
    }
    return i;
}

/* The flags scan() and pump() share, after their first arguments: masked, deflate, limit, quota,
   check.  Returns -1 with an exception set. */
static int
walk_flags(PyObject *const *args, int *masked, int *deflate, unsigned long long *limit,
           Py_ssize_t *quota, int *check)
{
    *masked = PyObject_IsTrue(args[0]);
    *deflate = PyObject_IsTrue(args[1]);
    *limit = PyLong_AsUnsignedLongLong(args[2]);
    *quota = PyLong_AsSsize_t(args[3]);
    *check = PyObject_IsTrue(args[4]);
    if (*masked < 0 || *deflate < 0 || *check < 0 || PyErr_Occurred())
        return -1;
    return 0;
}

/* scan(data, masked, deflate, limit, quota, check) -> (end, messages, payload bytes): the frame
   engine's fast path (in FrameEngine.receive; its pure-Python twin is PyUtf8.scan in
   frames.py): walk()'s run over data, and where it stopped. */
static PyObject *
frames_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data;
    unsigned long long limit;
    Py_ssize_t i, quota, count = 0;
    long long total = 0;
    int masked, deflate, check;

    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "scan(data, masked, deflate, limit, quota, check)");
        return NULL;
    }
    if (walk_flags(args + 1, &masked, &deflate, &limit, &quota, &check) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    i = walk(data.buf, data.len, masked, deflate, limit, quota, check, &count, &total);
    PyBuffer_Release(&data);
    return Py_BuildValue("(nnL)", i, count, total);
}

/* pump()'s buffer: reads land here, and only what the sink did not take becomes a bytes object.
   The GIL is held from the read to the copy (both calls are non-blocking), so one buffer
   serves every thread. */
static unsigned char *pump_buffer;
static Py_ssize_t pump_capacity;

/* pump(source, sink, size, masked, deflate, limit, quota, check)
       -> (read, end, messages, payload bytes, rest): the frame engine's fast path with its I/O
   (FrameEngine.pump; its pure-Python twin is PyUtf8.pump in frames.py).  Reads at most `size`
   bytes from the socket `source` (read: -1 when nothing is there, 0 at its end), walks them as
   scan() does and, when the read is whole messages only and `sink` is a socket (not -1), sends
   them to it at once.  `rest` is what is left for the caller: the bytes the sink did not take, or
   the whole read when the walk stopped short of its end (`end` < `read`).  A failed read raises
   OSError; a failed send sends nothing (the caller's queued write meets the error again). */
static PyObject *
frames_pump(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int source, sink, masked, deflate, check;
    Py_ssize_t size, n, i, quota, count = 0, sent = 0;
    unsigned long long limit;
    long long total = 0;
    PyObject *rest;

    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "pump(source, sink, size, masked, deflate, limit, quota, check)");
        return NULL;
    }
    source = (int)PyLong_AsLong(args[0]);
    sink = (int)PyLong_AsLong(args[1]);
    size = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred() || walk_flags(args + 3, &masked, &deflate, &limit, &quota, &check) < 0)
        return NULL;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "size must be positive");
        return NULL;
    }
    if (size > pump_capacity) {
        unsigned char *grown = PyMem_Realloc(pump_buffer, (size_t)size);
        if (grown == NULL)
            return PyErr_NoMemory();
        pump_buffer = grown;
        pump_capacity = size;
    }
    do
        n = recv(source, pump_buffer, (size_t)size, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return Py_BuildValue("(nnnLy#)", (Py_ssize_t)-1, (Py_ssize_t)0, (Py_ssize_t)0,
                                 (long long)0, "", (Py_ssize_t)0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    i = walk(pump_buffer, n, masked, deflate, limit, quota, check, &count, &total);
    if (i == n && n > 0 && sink >= 0) {
        do
            sent = send(sink, pump_buffer, (size_t)n, MSG_NOSIGNAL);
        while (sent < 0 && errno == EINTR);
        if (sent < 0)
            sent = 0;
    }
    rest = PyBytes_FromStringAndSize((const char *)pump_buffer + sent, n - sent);
    if (rest == NULL)
        return NULL;
    return Py_BuildValue("(nnnLN)", n, i, count, total, rest);
}

static PyMethodDef methods[] = {
    {"check", (PyCFunction)(void (*)(void))utf8_check, METH_FASTCALL,
     "check(data, start, end, key, offset, state) -> state: feed data[start:end], unmasked with "
     "key rotated by offset, to the UTF-8 validator; 0: between characters, 8: invalid."},
    {"check_using", (PyCFunction)(void (*)(void))utf8_check_using, METH_FASTCALL,
     "check_using(path, data, start, end, key, offset, state) -> state: check() by the given "
     "path, one of PATHS."},
    {"scan", (PyCFunction)(void (*)(void))frames_scan, METH_FASTCALL,
     "scan(data, masked, deflate, limit, quota, check) -> (end, messages, payload bytes): the "
     "frame engine's run of whole single-frame messages at the start of data."},
    {"pump", (PyCFunction)(void (*)(void))frames_pump, METH_FASTCALL,
     "pump(source, sink, size, masked, deflate, limit, quota, check) -> (read, end, messages, "
     "payload bytes, rest): read from the socket source, scan, send whole messages to sink."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "wsgate.core._utf8", "The frame engine's UTF-8 check, in C.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__utf8(void)
{
    PyObject *m, *names;
    int i;

#ifdef UTF8_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("ssse3")) {
        n_usable = 2;
        if (__builtin_cpu_supports("avx2"))
            n_usable = 3;
    }
#endif
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    names = PyTuple_New(n_usable);
    if (names == NULL)
        goto error;
    for (i = 0; i < n_usable; i++) {
        PyObject *name = PyUnicode_FromString(paths[i].name);
        if (name == NULL) {
            Py_DECREF(names);
            goto error;
        }
        PyTuple_SET_ITEM(names, i, name);
    }
    if (PyModule_AddObject(m, "PATHS", names) < 0) {
        Py_DECREF(names);
        goto error;
    }
    if (PyModule_AddStringConstant(m, "PATH", paths[n_usable - 1].name) < 0)
        goto error;
    return m;
error:
    Py_DECREF(m);
    return NULL;
}
