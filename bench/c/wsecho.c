/* wsecho: the benchmark's WebSocket echo backend.
 *
 * One thread, epoll (level-triggered), non-blocking sockets. Every data frame is
 * answered with a frame carrying the same FIN bit, opcode and (unmasked) payload, so
 * each message comes back as the same message, streamed: a 64 KiB frame is echoed
 * while it arrives and is never buffered whole. Ping -> Pong, Close -> Close.
 * Optional TLS listener (--tls-port, --cert, --key) for the direct-over-TLS row.
 *
 *   wsecho --port 9001 [--host 127.0.0.1] [--tls-port 9002 --cert c.pem --key k.pem]
 *
 * Runs until SIGTERM or SIGINT.
 */
#include "wscommon.h"

#include <signal.h>
#include <sys/epoll.h>

enum { S_TLS, S_HTTP, S_WS, S_SHUT };

#define HIGH_WATER (8u << 20)
#define MAX_HEAD 16384

typedef struct conn {
    io_t io;
    int state;
    int closing; /* Close sent (or plain HTTP answer queued): shut down after flush */
    int err;
    uint32_t ev;
    buf_t rbuf, wbuf;
    uint64_t rem; /* payload bytes left in the current data frame */
    int masked;
    unsigned char mask[4];
    unsigned mpos;
} conn_t;

static int ep;
static volatile sig_atomic_t stop_flag;
static SSL_CTX *ssl_ctx;
static int lfd_plain = -1, lfd_tls = -1;
static char marker_plain, marker_tls;
static unsigned char rdbuf[256 * 1024];
static long n_conns;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void set_events(conn_t *c, uint32_t ev)
{
    if (c->ev == ev)
        return;
    struct epoll_event e = {.events = ev, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->io.fd, &e) < 0)
        c->err = 1;
    c->ev = ev;
}

static void conn_free(conn_t *c)
{
    if (c->io.ssl)
        SSL_free(c->io.ssl);
    close(c->io.fd);
    buf_free(&c->rbuf);
    buf_free(&c->wbuf);
    free(c);
    n_conns--;
}

static void add_conn(int fd, int tls)
{
    conn_t *c = xcalloc(1, sizeof *c);
    c->io.fd = fd;
    set_nodelay(fd);
    c->state = S_HTTP;
    if (tls) {
        c->io.ssl = SSL_new(ssl_ctx);
        SSL_set_fd(c->io.ssl, fd);
        SSL_set_accept_state(c->io.ssl);
        c->state = S_TLS;
    }
    c->ev = EPOLLIN;
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0) {
        conn_free(c);
        return;
    }
    n_conns++;
}

/* Echo every complete frame part in d[0..n); returns bytes consumed. */
static size_t ws_process(conn_t *c, const unsigned char *d, size_t n)
{
    size_t pos = 0;
    while (pos < n && !c->closing && !c->err) {
        if (c->rem) {
            size_t take = n - pos;
            if (take > c->rem)
                take = (size_t)c->rem;
            buf_reserve(&c->wbuf, take);
            if (c->masked)
                xor_mask(c->wbuf.p + c->wbuf.len, d + pos, take, c->mask, c->mpos);
            else
                memcpy(c->wbuf.p + c->wbuf.len, d + pos, take);
            c->wbuf.len += take;
            c->mpos = (c->mpos + (unsigned)take) & 3;
            c->rem -= take;
            pos += take;
            continue;
        }
        wshdr_t h;
        long hl = ws_parse_header(d + pos, n - pos, &h);
        if (hl == 0)
            break;
        if (hl < 0) {
            c->err = 1;
            break;
        }
        unsigned char oh[10];
        if (h.opcode >= 8) {
            if (h.len > 125 || !h.fin) {
                c->err = 1;
                break;
            }
            if (n - pos < (size_t)hl + h.len)
                break;
            unsigned char pl[125];
            if (h.masked)
                xor_mask(pl, d + pos + hl, (size_t)h.len, h.mask, 0);
            else
                memcpy(pl, d + pos + hl, (size_t)h.len);
            pos += (size_t)hl + (size_t)h.len;
            if (h.opcode == WS_PING) {
                buf_append(&c->wbuf, oh, ws_header(oh, 1, WS_PONG, 0, h.len));
                buf_append(&c->wbuf, pl, (size_t)h.len);
            } else if (h.opcode == WS_CLOSE) {
                size_t cl = h.len >= 2 ? 2 : 0; /* echo the code, drop the reason */
                buf_append(&c->wbuf, oh, ws_header(oh, 1, WS_CLOSE, 0, cl));
                buf_append(&c->wbuf, pl, cl);
                c->closing = 1;
            }
            continue;
        }
        buf_append(&c->wbuf, oh, ws_header(oh, h.fin, h.opcode, 0, h.len));
        c->rem = h.len;
        c->masked = h.masked;
        memcpy(c->mask, h.mask, 4);
        c->mpos = 0;
        pos += (size_t)hl;
    }
    return pos;
}

/* HTTP upgrade request: returns bytes consumed (0: need more). */
static size_t http_process(conn_t *c, const unsigned char *d, size_t n)
{
    size_t hl = http_head_len(d, n);
    if (!hl) {
        if (n > MAX_HEAD)
            c->err = 1;
        return 0;
    }
    size_t klen = 0;
    const char *key = http_header((const char *)d, hl, "Sec-WebSocket-Key", &klen);
    if (!key || klen == 0 || klen > 64) {
        static const char ok[] =
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
            "Connection: close\r\n\r\nok\n";
        buf_append(&c->wbuf, ok, sizeof ok - 1);
        c->closing = 1;
        return hl;
    }
    char acc[64];
    ws_accept_key(key, klen, acc);
    char resp[256];
    int rl = snprintf(resp, sizeof resp,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                      acc);
    buf_append(&c->wbuf, resp, (size_t)rl);
    c->state = S_WS;
    return hl;
}

static size_t feed(conn_t *c, const unsigned char *d, size_t n)
{
    size_t used = 0;
    if (c->state == S_HTTP)
        used = http_process(c, d, n);
    if (c->state == S_WS && used < n)
        used += ws_process(c, d + used, n - used);
    return used;
}

static void on_readable(conn_t *c)
{
    for (int rounds = 0; rounds < 64 && !c->err && !c->closing; rounds++) {
        if (buf_used(&c->wbuf) > HIGH_WATER)
            break;
        long r = io_read(&c->io, rdbuf, sizeof rdbuf);
        if (r == IO_AGAIN)
            break;
        if (r < 0) {
            c->err = 1;
            break;
        }
        if (c->state == S_SHUT)
            continue; /* draining until EOF */
        if (!buf_used(&c->rbuf)) {
            size_t used = feed(c, rdbuf, (size_t)r);
            if (used < (size_t)r && !c->closing)
                buf_append(&c->rbuf, rdbuf + used, (size_t)r - used);
        } else {
            buf_append(&c->rbuf, rdbuf, (size_t)r);
            size_t used = feed(c, c->rbuf.p + c->rbuf.off, buf_used(&c->rbuf));
            buf_consume(&c->rbuf, used);
        }
        if (!c->io.ssl && (size_t)r < sizeof rdbuf)
            break;
    }
}

static void handle(conn_t *c, uint32_t events)
{
    if (c->state == S_TLS) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->io.ssl);
        if (r == 1) {
            c->state = S_HTTP;
        } else {
            int e = SSL_get_error(c->io.ssl, r);
            if (e == SSL_ERROR_WANT_READ)
                set_events(c, EPOLLIN);
            else if (e == SSL_ERROR_WANT_WRITE)
                set_events(c, EPOLLIN | EPOLLOUT);
            else
                c->err = 1;
            if (c->err)
                conn_free(c);
            return;
        }
    }
    (void)events; /* level-triggered: a read that finds nothing just returns EAGAIN */
    on_readable(c);
    if (!c->err && io_flush(&c->io, &c->wbuf) < 0)
        c->err = 1;
    if (!c->err && c->closing && !buf_used(&c->wbuf) && c->state != S_SHUT) {
        if (c->io.ssl)
            SSL_shutdown(c->io.ssl);
        shutdown(c->io.fd, SHUT_WR);
        c->state = S_SHUT;
        c->closing = 0; /* keep reading until the peer's EOF */
    }
    if (c->err) {
        conn_free(c);
        return;
    }
    uint32_t ev = 0;
    if (buf_used(&c->wbuf) <= HIGH_WATER && !c->closing)
        ev |= EPOLLIN; /* (closing: nothing more is read until the answer is flushed) */
    if (buf_used(&c->wbuf))
        ev |= EPOLLOUT;
    set_events(c, ev);
}

static void accept_all(int lfd, int tls)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return; /* EAGAIN, or EMFILE: try again on the next event */
        }
        add_conn(fd, tls);
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: wsecho --port P [--host 127.0.0.1] [--backlog N] "
                    "[--tls-port Q --cert CERT --key KEY]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *cert = NULL, *key = NULL;
    int port = 0, tls_port = 0, backlog = 4096;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        if (!strcmp(a, "--port"))
            port = atoi(v);
        else if (!strcmp(a, "--host"))
            host = v;
        else if (!strcmp(a, "--tls-port"))
            tls_port = atoi(v);
        else if (!strcmp(a, "--cert"))
            cert = v;
        else if (!strcmp(a, "--key"))
            key = v;
        else if (!strcmp(a, "--backlog"))
            backlog = atoi(v);
        else
            usage();
        i++;
    }
    if (!port)
        usage();
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    lfd_plain = listen_on(host, port, backlog);
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = &marker_plain};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd_plain, &e);
    if (tls_port) {
        if (!cert || !key)
            usage();
        ssl_ctx = SSL_CTX_new(TLS_server_method());
        if (!ssl_ctx || SSL_CTX_use_certificate_chain_file(ssl_ctx, cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ssl_ctx, key, SSL_FILETYPE_PEM) != 1) {
            ERR_print_errors_fp(stderr);
            exit(2);
        }
        SSL_CTX_set_mode(ssl_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        lfd_tls = listen_on(host, tls_port, backlog);
        struct epoll_event et = {.events = EPOLLIN, .data.ptr = &marker_tls};
        epoll_ctl(ep, EPOLL_CTL_ADD, lfd_tls, &et);
    }

    struct epoll_event evs[512];
    while (!stop_flag) {
        int n = epoll_wait(ep, evs, 512, 1000);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &marker_plain)
                accept_all(lfd_plain, 0);
            else if (p == &marker_tls)
                accept_all(lfd_tls, 1);
            else
                handle((conn_t *)p, evs[i].events);
        }
    }
    return 0;
}
