/* Shared helpers for the wsgate benchmark tools (wsecho, wsload).
 *
 * Plain C, Linux only: epoll, non-blocking sockets, optional OpenSSL for TLS.
 * Everything here is small on purpose; both programs are single-threaded.
 */
#ifndef WSCOMMON_H
#define WSCOMMON_H

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#define IO_ERR (-1)
#define IO_AGAIN (-2)
#define IO_EOF (-3)

#define WS_CONT 0x0
#define WS_TEXT 0x1
#define WS_BIN 0x2
#define WS_CLOSE 0x8
#define WS_PING 0x9
#define WS_PONG 0xA

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void die(const char *msg)
{
    fprintf(stderr, "fatal: %s: %s\n", msg, strerror(errno));
    exit(2);
}

static inline void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (!q && n)
        die("out of memory");
    return q;
}

static inline void *xcalloc(size_t a, size_t b)
{
    void *q = calloc(a, b);
    if (!q && a && b)
        die("out of memory");
    return q;
}

/* ---------- byte buffer: live data is p[off..len) ---------- */
typedef struct {
    unsigned char *p;
    size_t off, len, cap;
} buf_t;

static inline size_t buf_used(const buf_t *b) { return b->len - b->off; }

static inline void buf_reserve(buf_t *b, size_t extra)
{
    if (b->off == b->len)
        b->off = b->len = 0;
    if (b->len + extra <= b->cap)
        return;
    if (b->off) {
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap)
            return;
    }
    size_t nc = b->cap ? b->cap : 4096;
    while (nc < b->len + extra)
        nc *= 2;
    b->p = xrealloc(b->p, nc);
    b->cap = nc;
}

static inline void buf_append(buf_t *b, const void *d, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->p + b->len, d, n);
    b->len += n;
}

static inline void buf_consume(buf_t *b, size_t n)
{
    b->off += n;
    if (b->off == b->len)
        b->off = b->len = 0;
}

static inline void buf_free(buf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* ---------- masking ---------- */
/* dst[i] = src[i] ^ mask[(pos + i) & 3]; dst may equal src. */
static inline void xor_mask(unsigned char *dst, const unsigned char *src, size_t n,
                            const unsigned char mask[4], unsigned pos)
{
    unsigned char mk[8];
    for (int i = 0; i < 8; i++)
        mk[i] = mask[(pos + i) & 3];
    uint64_t w;
    memcpy(&w, mk, 8);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, src + i, 8);
        x ^= w;
        memcpy(dst + i, &x, 8);
    }
    for (; i < n; i++)
        dst[i] = src[i] ^ mk[i & 7];
}

/* Frame header for a payload of n bytes; returns header length (without mask key). */
static inline size_t ws_header(unsigned char *h, int fin, int opcode, int masked, uint64_t n)
{
    h[0] = (unsigned char)((fin ? 0x80 : 0) | (opcode & 0x0f));
    unsigned char m = masked ? 0x80 : 0;
    if (n < 126) {
        h[1] = m | (unsigned char)n;
        return 2;
    }
    if (n < 65536) {
        h[1] = m | 126;
        h[2] = (unsigned char)(n >> 8);
        h[3] = (unsigned char)n;
        return 4;
    }
    h[1] = m | 127;
    for (int i = 0; i < 8; i++)
        h[2 + i] = (unsigned char)(n >> (56 - 8 * i));
    return 10;
}

/* Parsed frame header. Returns header length incl. mask key, 0 if more bytes needed,
 * -1 on a protocol error. */
typedef struct {
    int fin, opcode, masked;
    uint64_t len;
    unsigned char mask[4];
} wshdr_t;

static inline long ws_parse_header(const unsigned char *d, size_t n, wshdr_t *h)
{
    if (n < 2)
        return 0;
    h->fin = d[0] >> 7;
    h->opcode = d[0] & 0x0f;
    h->masked = d[1] >> 7;
    uint64_t len = d[1] & 0x7f;
    size_t need = 2;
    if (len == 126) {
        need = 4;
        if (n < need)
            return 0;
        len = ((uint64_t)d[2] << 8) | d[3];
    } else if (len == 127) {
        need = 10;
        if (n < need)
            return 0;
        len = 0;
        for (int i = 0; i < 8; i++)
            len = (len << 8) | d[2 + i];
        if (len >> 62)
            return -1;
    }
    if (h->masked) {
        if (n < need + 4)
            return 0;
        memcpy(h->mask, d + need, 4);
        need += 4;
    }
    h->len = len;
    return (long)need;
}

/* ---------- base64 + handshake key ---------- */
static inline size_t b64_encode(const unsigned char *in, size_t n, char *out)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = tbl[(v >> 18) & 63];
        out[o++] = tbl[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tbl[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? tbl[v & 63] : '=';
    }
    out[o] = 0;
    return o;
}

/* Sec-WebSocket-Accept for a key (RFC 6455 section 4.2.2). out needs 29 bytes. */
static inline void ws_accept_key(const char *key, size_t keylen, char *out)
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha1(), NULL);
    EVP_DigestUpdate(ctx, key, keylen);
    EVP_DigestUpdate(ctx, guid, sizeof guid - 1);
    EVP_DigestFinal_ex(ctx, digest, &dlen);
    EVP_MD_CTX_free(ctx);
    b64_encode(digest, dlen, out);
}

/* Case-insensitive search for "\r\nName:" in an HTTP head; returns the trimmed value. */
static inline const char *http_header(const char *head, size_t n, const char *name, size_t *vlen)
{
    size_t nl = strlen(name);
    for (size_t i = 0; i + nl + 3 < n; i++) {
        if (head[i] != '\r' || head[i + 1] != '\n')
            continue;
        if (strncasecmp(head + i + 2, name, nl) != 0 || head[i + 2 + nl] != ':')
            continue;
        const char *v = head + i + 3 + nl;
        const char *end = head + n;
        while (v < end && (*v == ' ' || *v == '\t'))
            v++;
        const char *e = v;
        while (e < end && *e != '\r')
            e++;
        while (e > v && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        *vlen = (size_t)(e - v);
        return v;
    }
    return NULL;
}

/* Find "\r\n\r\n"; returns the length of the head including it, or 0. */
static inline size_t http_head_len(const unsigned char *d, size_t n)
{
    for (size_t i = 3; i < n; i++)
        if (d[i] == '\n' && d[i - 1] == '\r' && d[i - 2] == '\n' && d[i - 3] == '\r')
            return i + 1;
    return 0;
}

/* ---------- sockets ---------- */
static inline void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static inline int listen_on(const char *host, int port, int backlog)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1)
        die("bad listen address");
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    if (listen(fd, backlog) < 0)
        die("listen");
    return fd;
}

/* ---------- I/O over plain TCP or TLS ---------- */
typedef struct {
    int fd;
    SSL *ssl;
} io_t;

static inline long io_read(io_t *io, void *b, size_t n)
{
    if (!io->ssl) {
        ssize_t r = read(io->fd, b, n);
        if (r > 0)
            return r;
        if (r == 0)
            return IO_EOF;
        return (errno == EAGAIN || errno == EINTR) ? IO_AGAIN : IO_ERR;
    }
    ERR_clear_error();
    int r = SSL_read(io->ssl, b, (int)(n > 1u << 30 ? 1u << 30 : n));
    if (r > 0)
        return r;
    int e = SSL_get_error(io->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return IO_AGAIN;
    if (e == SSL_ERROR_ZERO_RETURN)
        return IO_EOF;
    return IO_ERR;
}

static inline long io_write(io_t *io, const void *b, size_t n)
{
    if (!io->ssl) {
        ssize_t r = write(io->fd, b, n);
        if (r >= 0)
            return r;
        return (errno == EAGAIN || errno == EINTR) ? IO_AGAIN : IO_ERR;
    }
    ERR_clear_error();
    int r = SSL_write(io->ssl, b, (int)(n > 1u << 30 ? 1u << 30 : n));
    if (r > 0)
        return r;
    int e = SSL_get_error(io->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return IO_AGAIN;
    return IO_ERR;
}

/* Write as much of b as the socket takes. Returns 0 (maybe partial) or IO_ERR. */
static inline int io_flush(io_t *io, buf_t *b)
{
    while (buf_used(b)) {
        long w = io_write(io, b->p + b->off, buf_used(b));
        if (w == IO_AGAIN)
            return 0;
        if (w < 0)
            return IO_ERR;
        buf_consume(b, (size_t)w);
    }
    return 0;
}

/* ---------- /proc readers ---------- */
/* utime+stime of a process in seconds, or -1. */
static inline double proc_cpu_s(int pid)
{
    char path[64], line[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(line, 1, sizeof line - 1, f);
    fclose(f);
    line[n] = 0;
    char *p = strrchr(line, ')');
    if (!p)
        return -1;
    unsigned long ut = 0, st = 0;
    /* after ')': state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* VmRSS of a process in KiB, or -1. */
static inline long proc_rss_kb(int pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kb = strtol(line + 6, NULL, 10);
            break;
        }
    fclose(f);
    return kb;
}

/* CPU seconds spent busy since boot by the cores in `cpus` (a bit mask; 0: all cores), from
 * /proc/stat: user nice system irq softirq steal (guest time is already in user). */
static inline double machine_busy_s(unsigned long cpus)
{
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return -1;
    char line[512];
    unsigned long long busy = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "cpu", 3) != 0)
            break;
        int id = -1;
        unsigned long long v[8] = {0};
        if (line[3] == ' ') {
            if (cpus)
                continue;
        } else if (sscanf(line + 3, "%d", &id) != 1 || !cpus || id >= 64 ||
                   !(cpus >> id & 1)) {
            continue;
        }
        const char *p = strchr(line, ' ');
        if (!p || sscanf(p, "%llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                         &v[3], &v[4], &v[5], &v[6], &v[7]) < 4)
            continue;
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    }
    fclose(f);
    return (double)busy / (double)sysconf(_SC_CLK_TCK);
}

/* Parse "1,2,3" into pids[]; returns the count. */
static inline int parse_pids(const char *s, int *pids, int max)
{
    int n = 0;
    while (s && *s && n < max) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s)
            break;
        if (v > 0)
            pids[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

static inline double pids_cpu_s(const int *pids, int n)
{
    double t = 0;
    for (int i = 0; i < n; i++) {
        double c = proc_cpu_s(pids[i]);
        if (c > 0)
            t += c;
    }
    return t;
}

static inline long pids_rss_kb(const int *pids, int n)
{
    long t = 0;
    for (int i = 0; i < n; i++) {
        long r = proc_rss_kb(pids[i]);
        if (r > 0)
            t += r;
    }
    return t;
}

#endif
