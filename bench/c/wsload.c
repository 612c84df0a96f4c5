/* wsload: the benchmark's WebSocket load generator.
 *
 * One thread, epoll, non-blocking sockets; it does the HTTP upgrade itself and sends
 * masked client frames (a fresh random mask key per frame). Three modes:
 *
 *   closed     N connections, K messages in flight on each; every echo that comes back
 *              sends the next message. Reports messages/s, MB/s and round-trip times.
 *   open       a fixed total rate spread round-robin over N connections; each message's
 *              latency runs from its *intended* send time, so a stalled proxy cannot
 *              hide its queueing (no coordinated omission).
 *   handshake  open N sessions with M handshakes in flight, hold them T seconds, close
 *              them all with a Close handshake. Reports handshakes/s and, with --watch,
 *              the watched processes' RSS before, while holding and after.
 *
 * --text sends text messages (opcode 0x1) instead of binary ones (0x2): the payload is then
 * valid UTF-8 of exactly --size bytes, JSON-like and mostly ASCII with some 2- and 3-byte
 * characters (see fill_text), and an echo that comes back with another opcode is an error.
 * --dump-payload writes the payload wsload would send to stdout and exits.
 *
 * --watch PID,PID  processes whose CPU time (utime+stime) is sampled at the start and
 * end of the measurement window (and RSS in handshake mode); --backend-pid likewise for
 * the echo backend. Every phase is bounded in time; the program always exits by itself.
 * Results: one JSON object on stdout.
 */
#include "wscommon.h"

#include <math.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>

enum { M_CLOSED, M_OPEN, M_HANDSHAKE };
enum { C_IDLE, C_CONNECTING, C_TLS, C_UPGRADE, C_OPEN, C_CLOSING, C_DONE };

typedef struct conn {
    io_t io;
    int state;
    uint32_t ev;
    buf_t rbuf, wbuf;
    uint64_t rem;       /* payload bytes left in the current data frame */
    int fin_pending;    /* current data frame ends a message */
    uint64_t msg_bytes; /* payload bytes of the message being received */
    int msg_op;         /* opcode of the message being received */
    uint64_t *ts;       /* FIFO of send times of messages in flight */
    uint32_t ts_mask, ts_head, ts_count;
    uint64_t t_begin; /* connect started */
    int got_close, sent_close;
} conn_t;

/* ---------- options ---------- */
static int mode = M_CLOSED;
static const char *host = "127.0.0.1", *path = "/";
static int port;
static int nconns = 1, msg_size = 64, inflight = 1, opcode = WS_BIN, use_tls;
static double rate, warmup = 1, duration = 5, hold = 5;
static int hs_inflight = 100;
static double connect_timeout = 15;
static int watch_pids[64], n_watch, backend_pids[8], n_backend;
static unsigned long busy_cpus; /* cores whose busy time is reported (0: all) */

/* ---------- state ---------- */
static int ep;
static conn_t *conns;
static SSL_CTX *ssl_ctx;
static unsigned char *payload;
static unsigned char rdbuf[256 * 1024];
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t t_ms = UINT64_MAX, t_me = UINT64_MAX; /* measurement window */
static int sending;                                   /* may new messages be sent */
static volatile sig_atomic_t stop_flag;

static long n_pending, n_open, n_done, n_attempted;
static long err_connect, err_handshake, err_proto, err_size, err_opcode, err_dropped, err_not_sent;
static long closed_clean;
static uint64_t w_msgs, w_bytes, total_sent, total_recv;
static uint32_t *samples;
static size_t n_samples, cap_samples;
static uint32_t *hs_samples;
static size_t n_hs, cap_hs;

static inline uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void add_sample(uint32_t **arr, size_t *n, size_t *cap, uint64_t v)
{
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 1 << 16;
        *arr = xrealloc(*arr, *cap * sizeof **arr);
    }
    (*arr)[(*n)++] = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

static void set_events(conn_t *c, uint32_t ev)
{
    if (c->ev == ev)
        return;
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->io.fd, &e);
    c->ev = ev;
}

static void update_events(conn_t *c)
{
    if (c->state == C_DONE || c->state == C_IDLE)
        return;
    uint32_t ev = EPOLLIN;
    if (c->state == C_CONNECTING || buf_used(&c->wbuf))
        ev |= EPOLLOUT;
    set_events(c, ev);
}

static void conn_finish(conn_t *c, int clean)
{
    if (c->state == C_DONE || c->state == C_IDLE)
        return;
    if (c->state == C_CONNECTING || c->state == C_TLS || c->state == C_UPGRADE)
        n_pending--;
    if (c->state == C_OPEN || c->state == C_CLOSING)
        n_open--;
    if (clean)
        closed_clean++;
    if (c->io.ssl)
        SSL_free(c->io.ssl);
    c->io.ssl = NULL;
    close(c->io.fd);
    buf_free(&c->rbuf);
    buf_free(&c->wbuf);
    c->state = C_DONE;
    n_done++;
}

/* A connection failed before it was open. */
static void conn_fail(conn_t *c, long *counter)
{
    (*counter)++;
    conn_finish(c, 0);
}

/* ---------- sending ---------- */
static void queue_frame(conn_t *c, int op, const unsigned char *d, size_t n)
{
    unsigned char h[14];
    size_t hl = ws_header(h, 1, op, 1, n);
    uint32_t m = (uint32_t)rnd();
    memcpy(h + hl, &m, 4);
    buf_reserve(&c->wbuf, hl + 4 + n);
    memcpy(c->wbuf.p + c->wbuf.len, h, hl + 4);
    xor_mask(c->wbuf.p + c->wbuf.len + hl + 4, d, n, h + hl, 0);
    c->wbuf.len += hl + 4 + n;
}

static int send_msg(conn_t *c, uint64_t ts)
{
    if (c->ts_count > c->ts_mask) {
        err_not_sent++;
        return 0;
    }
    queue_frame(c, opcode, payload, (size_t)msg_size);
    c->ts[(c->ts_head + c->ts_count) & c->ts_mask] = ts;
    c->ts_count++;
    total_sent++;
    return 1;
}

static void send_close(conn_t *c)
{
    if (c->sent_close || c->state != C_OPEN)
        return;
    unsigned char code[2] = {0x03, 0xE8}; /* 1000 */
    queue_frame(c, WS_CLOSE, code, 2);
    c->sent_close = 1;
    c->state = C_CLOSING;
}

static void send_upgrade(conn_t *c)
{
    unsigned char kb[16];
    for (int i = 0; i < 16; i += 8) {
        uint64_t r = rnd();
        memcpy(kb + i, &r, 8);
    }
    char key[32];
    b64_encode(kb, 16, key);
    /* Room for a long --path (a JWT in the query string is ~600 bytes); a longer one is cut
     * and the handshake fails visibly instead of reading past the buffer. */
    char req[4096];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     path, host, port, key);
    if (n >= (int)sizeof req)
        n = (int)sizeof req - 1;
    buf_append(&c->wbuf, req, (size_t)n);
    c->state = C_UPGRADE;
}

/* ---------- receiving ---------- */
static void message_done(conn_t *c, uint64_t now)
{
    total_recv++;
    if (c->ts_count == 0) {
        err_proto++; /* an echo nobody asked for */
        return;
    }
    uint64_t ts = c->ts[c->ts_head];
    c->ts_head = (c->ts_head + 1) & c->ts_mask;
    c->ts_count--;
    if (now >= t_ms && now < t_me) {
        w_msgs++;
        w_bytes += c->msg_bytes;
        add_sample(&samples, &n_samples, &cap_samples, now > ts ? now - ts : 0);
        if (c->msg_bytes != (uint64_t)msg_size)
            err_size++;
    }
    if (c->msg_op != opcode)
        err_opcode++; /* a text message must come back as text, a binary one as binary */
    if (mode == M_CLOSED && sending && c->state == C_OPEN)
        send_msg(c, now);
}

/* Parse server frames in d[0..n); returns bytes consumed. */
static size_t ws_process(conn_t *c, const unsigned char *d, size_t n, uint64_t now)
{
    size_t pos = 0;
    while (pos < n && c->state != C_DONE) {
        if (c->rem) {
            size_t take = n - pos;
            if (take > c->rem)
                take = (size_t)c->rem;
            c->rem -= take;
            c->msg_bytes += take;
            pos += take;
            if (!c->rem && c->fin_pending)
                message_done(c, now);
            continue;
        }
        wshdr_t h;
        long hl = ws_parse_header(d + pos, n - pos, &h);
        if (hl == 0)
            break;
        if (hl < 0) {
            err_proto++;
            conn_finish(c, 0);
            break;
        }
        if (h.opcode >= 8) {
            if (h.len > 125) {
                err_proto++;
                conn_finish(c, 0);
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
            if (h.opcode == WS_PING && c->state == C_OPEN) {
                queue_frame(c, WS_PONG, pl, (size_t)h.len);
            } else if (h.opcode == WS_CLOSE) {
                c->got_close = 1;
                if (!c->sent_close) {
                    if (c->state == C_OPEN)
                        err_dropped++; /* the server closed a session we held */
                    send_close(c);
                }
            }
            continue;
        }
        if (h.opcode != WS_CONT) {
            c->msg_bytes = 0;
            c->msg_op = h.opcode;
        }
        c->rem = h.len;
        c->fin_pending = h.fin;
        pos += (size_t)hl;
        if (!c->rem && c->fin_pending)
            message_done(c, now);
    }
    return pos;
}

static size_t upgrade_process(conn_t *c, const unsigned char *d, size_t n, uint64_t now)
{
    size_t hl = http_head_len(d, n);
    if (!hl) {
        if (n > 16384)
            conn_fail(c, &err_handshake);
        return 0;
    }
    if (hl < 12 || memcmp(d, "HTTP/1.1 101", 12) != 0) {
        conn_fail(c, &err_handshake);
        return hl;
    }
    c->state = C_OPEN;
    n_pending--;
    n_open++;
    add_sample(&hs_samples, &n_hs, &cap_hs, now - c->t_begin);
    return hl;
}

static size_t feed(conn_t *c, const unsigned char *d, size_t n, uint64_t now)
{
    size_t used = 0;
    if (c->state == C_UPGRADE)
        used = upgrade_process(c, d, n, now);
    if ((c->state == C_OPEN || c->state == C_CLOSING) && used < n)
        used += ws_process(c, d + used, n - used, now);
    return used;
}

static void on_readable(conn_t *c)
{
    for (int rounds = 0; rounds < 16; rounds++) {
        if (c->state == C_DONE)
            return;
        long r = io_read(&c->io, rdbuf, sizeof rdbuf);
        if (r == IO_AGAIN)
            return;
        if (r < 0) {
            if (c->state == C_CLOSING && c->got_close)
                conn_finish(c, 1);
            else if (c->state == C_UPGRADE)
                conn_fail(c, &err_handshake);
            else {
                err_dropped++;
                conn_finish(c, 0);
            }
            return;
        }
        uint64_t now = now_ns();
        if (!buf_used(&c->rbuf)) {
            size_t used = feed(c, rdbuf, (size_t)r, now);
            if (used < (size_t)r && c->state != C_DONE)
                buf_append(&c->rbuf, rdbuf + used, (size_t)r - used);
        } else {
            buf_append(&c->rbuf, rdbuf, (size_t)r);
            size_t used = feed(c, c->rbuf.p + c->rbuf.off, buf_used(&c->rbuf), now);
            if (c->state != C_DONE)
                buf_consume(&c->rbuf, used);
        }
        if (!c->io.ssl && (size_t)r < sizeof rdbuf)
            return;
    }
}

static void start_tls_or_upgrade(conn_t *c)
{
    if (use_tls) {
        c->io.ssl = SSL_new(ssl_ctx);
        SSL_set_fd(c->io.ssl, c->io.fd);
        SSL_set_connect_state(c->io.ssl);
        c->state = C_TLS;
    } else {
        send_upgrade(c);
    }
}

static void handle(conn_t *c, uint32_t events)
{
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->io.fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            conn_fail(c, &err_connect);
            return;
        }
        start_tls_or_upgrade(c);
    }
    if (c->state == C_TLS) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->io.ssl);
        if (r != 1) {
            int e = SSL_get_error(c->io.ssl, r);
            if (e == SSL_ERROR_WANT_READ)
                set_events(c, EPOLLIN);
            else if (e == SSL_ERROR_WANT_WRITE)
                set_events(c, EPOLLIN | EPOLLOUT);
            else
                conn_fail(c, &err_handshake);
            return;
        }
        send_upgrade(c);
    }
    on_readable(c);
    if (c->state == C_DONE)
        return;
    if (io_flush(&c->io, &c->wbuf) < 0) {
        if (c->state == C_UPGRADE)
            conn_fail(c, &err_handshake);
        else {
            if (!(c->state == C_CLOSING && c->got_close))
                err_dropped++;
            conn_finish(c, c->state == C_CLOSING && c->got_close);
        }
        return;
    }
    update_events(c);
}

static void start_conn(conn_t *c)
{
    n_attempted++;
    c->t_begin = now_ns();
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        err_connect++;
        c->state = C_DONE;
        n_done++;
        return;
    }
    set_nodelay(fd);
    c->io.fd = fd;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, host, &a.sin_addr);
    n_pending++;
    c->state = C_CONNECTING;
    c->ev = EPOLLIN | EPOLLOUT;
    struct epoll_event e = {.events = c->ev, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0) {
        conn_fail(c, &err_connect);
        return;
    }
    int r = connect(fd, (struct sockaddr *)&a, sizeof a);
    if (r < 0 && errno != EINPROGRESS) {
        conn_fail(c, &err_connect);
        return;
    }
}

/* Flush all connections with pending output (after a batch of sends). */
static void flush_conn(conn_t *c)
{
    if (c->state != C_OPEN && c->state != C_CLOSING)
        return;
    if (io_flush(&c->io, &c->wbuf) < 0) {
        err_dropped++;
        conn_finish(c, 0);
        return;
    }
    update_events(c);
}

/* One turn of the event loop, waiting at most until `until` (monotonic ns). */
static void poll_once(uint64_t until)
{
    static struct epoll_event evs[1024];
    uint64_t now = now_ns();
    uint64_t wait = until > now ? until - now : 0;
    if (wait > 100000000ull)
        wait = 100000000ull;
    struct timespec ts = {.tv_sec = (time_t)(wait / 1000000000ull),
                          .tv_nsec = (long)(wait % 1000000000ull)};
    int n = epoll_pwait2(ep, evs, 1024, &ts, NULL);
    if (n < 0) {
        if (errno == EINTR)
            return;
        die("epoll_pwait2");
    }
    for (int i = 0; i < n; i++)
        handle((conn_t *)evs[i].data.ptr, evs[i].events);
}

/* Fail connections stuck before open for longer than connect_timeout. */
static void reap_stuck(uint64_t now)
{
    static uint64_t last;
    if (now - last < 100000000ull)
        return;
    last = now;
    uint64_t lim = (uint64_t)(connect_timeout * 1e9);
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        if ((c->state == C_CONNECTING || c->state == C_TLS || c->state == C_UPGRADE) &&
            now - c->t_begin > lim)
            conn_fail(c, c->state == C_CONNECTING ? &err_connect : &err_handshake);
    }
}

/* ---------- reporting ---------- */
static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(const uint32_t *s, size_t n, double p)
{
    if (!n)
        return -1;
    size_t i = (size_t)ceil(p * (double)n);
    if (i > 0)
        i--;
    if (i >= n)
        i = n - 1;
    return s[i] / 1000.0;
}

static void print_dist(const char *name, uint32_t *s, size_t n)
{
    qsort(s, n, sizeof *s, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += s[i];
    printf("\"%s\":{\"count\":%zu,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p999\":%.1f,"
           "\"max\":%.1f,\"mean\":%.1f}",
           name, n, pct(s, n, 0.5), pct(s, n, 0.9), pct(s, n, 0.99), pct(s, n, 0.999),
           n ? s[n - 1] / 1000.0 : -1, n ? sum / (double)n / 1000.0 : -1);
}

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

/* The text payload: exactly n bytes of valid UTF-8. A JSON-like record, mostly ASCII with some
 * 2-byte (é, á, è, à, ï) and 3-byte (€) characters (11 % of the bytes at 64 B, 15 % at 1 KiB and
 * more), repeated; a character that would not fit whole at the end is replaced by spaces, never
 * cut. */
static void fill_text(unsigned char *p, size_t n)
{
    static const char pat[] = "{\"id\":1042,\"user\":\"José\",\"price\":\"12,50 €\",\"city\":"
                              "\"Málaga\",\"msg\":\"café crème à la carte\",\"tags\":[\"naïve\","
                              "\"déjà vu\"]},";
    size_t i = 0, j = 0;
    while (i < n) {
        unsigned char b = (unsigned char)pat[j];
        size_t cl = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
        if (i + cl > n) {
            memset(p + i, ' ', n - i);
            break;
        }
        memcpy(p + i, pat + j, cl);
        i += cl;
        j = (j + cl) % (sizeof pat - 1);
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: wsload --port P [--host H] [--path /] [--mode closed|open|handshake]\n"
            "  [--conns N] [--size BYTES] [--inflight K] [--rate MSGS_PER_S] [--text]\n"
            "  [--warmup S] [--duration S] [--sessions N] [--hs-inflight M] [--hold S]\n"
            "  [--tls] [--connect-timeout S] [--watch PID,..] [--backend-pid PID]\n"
            "  [--cpus 0,1]   (cores whose busy time is reported as machine_busy_s)\n"
            "  [--dump-payload]   (write the payload to stdout and exit)\n");
    exit(2);
}

/* Close every open session with a Close handshake; bounded by `limit_s`. */
static void close_all(double limit_s)
{
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        if (c->state == C_OPEN) {
            send_close(c);
            flush_conn(c);
        } else if (c->state != C_DONE && c->state != C_IDLE && c->state != C_CLOSING) {
            conn_finish(c, 0);
        }
    }
    uint64_t end = now_ns() + (uint64_t)(limit_s * 1e9);
    while (n_open > 0 && now_ns() < end && !stop_flag)
        poll_once(end);
    for (int i = 0; i < nconns; i++)
        conn_finish(&conns[i], 0);
}

int main(int argc, char **argv)
{
    int sessions = 0, dump_payload = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--tls")) {
            use_tls = 1;
            continue;
        }
        if (!strcmp(a, "--text")) {
            opcode = WS_TEXT;
            continue;
        }
        if (!strcmp(a, "--dump-payload")) {
            dump_payload = 1;
            continue;
        }
        const char *v = i + 1 < argc ? argv[++i] : NULL;
        if (!v)
            usage();
        if (!strcmp(a, "--port"))
            port = atoi(v);
        else if (!strcmp(a, "--host"))
            host = v;
        else if (!strcmp(a, "--path"))
            path = v;
        else if (!strcmp(a, "--mode"))
            mode = !strcmp(v, "open") ? M_OPEN : !strcmp(v, "handshake") ? M_HANDSHAKE : M_CLOSED;
        else if (!strcmp(a, "--conns"))
            nconns = atoi(v);
        else if (!strcmp(a, "--sessions"))
            sessions = atoi(v);
        else if (!strcmp(a, "--size"))
            msg_size = atoi(v);
        else if (!strcmp(a, "--inflight"))
            inflight = atoi(v);
        else if (!strcmp(a, "--rate"))
            rate = atof(v);
        else if (!strcmp(a, "--warmup"))
            warmup = atof(v);
        else if (!strcmp(a, "--duration"))
            duration = atof(v);
        else if (!strcmp(a, "--hold"))
            hold = atof(v);
        else if (!strcmp(a, "--hs-inflight"))
            hs_inflight = atoi(v);
        else if (!strcmp(a, "--connect-timeout"))
            connect_timeout = atof(v);
        else if (!strcmp(a, "--watch"))
            n_watch = parse_pids(v, watch_pids, 64);
        else if (!strcmp(a, "--backend-pid"))
            n_backend = parse_pids(v, backend_pids, 8);
        else if (!strcmp(a, "--cpus")) {
            for (const char *p = v; *p;) { /* "0,1": a list of core numbers */
                char *end;
                long id = strtol(p, &end, 10);
                if (end == p || id < 0 || id >= 64)
                    usage();
                busy_cpus |= 1ul << id;
                p = *end == ',' ? end + 1 : end;
            }
        }
        else
            usage();
    }
    if (msg_size < 0)
        usage();
    payload = xcalloc(1, (size_t)msg_size + 1);
    if (opcode == WS_TEXT)
        fill_text(payload, (size_t)msg_size);
    else
        for (int i = 0; i < msg_size; i++)
            payload[i] = (unsigned char)('a' + i % 26);
    if (dump_payload) {
        fwrite(payload, 1, (size_t)msg_size, stdout);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    if (mode == M_HANDSHAKE && sessions > 0)
        nconns = sessions;
    if (!port || nconns < 1 || msg_size < 0 || inflight < 1 || (mode == M_OPEN && rate <= 0) ||
        hs_inflight < 1 || duration <= 0 || warmup < 0 || hold < 0)
        usage();

    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    rng ^= now_ns() ^ ((uint64_t)getpid() << 32);

    if (use_tls) {
        ssl_ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_mode(ssl_ctx,
                         SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    conns = xcalloc((size_t)nconns, sizeof *conns);
    uint32_t cap = 1;
    uint32_t want = mode == M_OPEN ? 4096 : (uint32_t)inflight;
    while (cap < want)
        cap <<= 1;
    for (int i = 0; i < nconns; i++) {
        conns[i].ts_mask = cap - 1;
        conns[i].ts = mode == M_HANDSHAKE ? NULL : xcalloc(cap, sizeof(uint64_t));
        conns[i].state = C_IDLE;
    }

    uint64_t t_start = now_ns();
    double cpu0 = pids_cpu_s(watch_pids, n_watch), bcpu0 = pids_cpu_s(backend_pids, n_backend);
    double scpu0 = self_cpu_s(), mbusy0 = machine_busy_s(busy_cpus);
    double cpu1 = cpu0, bcpu1 = bcpu0, scpu1 = scpu0, mbusy1 = mbusy0;
    long rss_before = pids_rss_kb(watch_pids, n_watch), rss_opened = -1, rss_held = -1,
         rss_after = -1;
    uint64_t t_opened = 0, t_closed = 0;
    int timed_out = 0;

    /* ---- open the connections ---- */
    long limit = mode == M_HANDSHAKE ? hs_inflight : nconns;
    int next = 0;
    uint64_t open_deadline =
        t_start + (uint64_t)((connect_timeout + (mode == M_HANDSHAKE ? 120 : 0)) * 1e9);
    while (!stop_flag) {
        while (next < nconns && n_pending < limit)
            start_conn(&conns[next++]);
        if (next >= nconns && n_pending == 0)
            break;
        uint64_t now = now_ns();
        if (now > open_deadline) {
            timed_out = 1;
            break;
        }
        reap_stuck(now);
        poll_once(now + 100000000ull);
    }
    t_opened = now_ns();
    for (int i = 0; i < nconns; i++)
        if (conns[i].state == C_CONNECTING || conns[i].state == C_TLS ||
            conns[i].state == C_UPGRADE)
            conn_fail(&conns[i], &err_handshake);
    long opened = n_open;

    if (mode == M_HANDSHAKE) {
        cpu1 = pids_cpu_s(watch_pids, n_watch);
        bcpu1 = pids_cpu_s(backend_pids, n_backend);
        scpu1 = self_cpu_s();
        mbusy1 = machine_busy_s(busy_cpus);
        rss_opened = pids_rss_kb(watch_pids, n_watch);
        uint64_t end = t_opened + (uint64_t)(hold * 1e9);
        long open_at_start = n_open;
        while (!stop_flag && now_ns() < end)
            poll_once(end);
        rss_held = pids_rss_kb(watch_pids, n_watch);
        long dropped = open_at_start - n_open;
        uint64_t tc = now_ns();
        close_all(20);
        t_closed = now_ns();
        rss_after = pids_rss_kb(watch_pids, n_watch);
        double open_s = (double)(t_opened - t_start) / 1e9;
        printf("{\"mode\":\"handshake\",\"tls\":%s,\"sessions\":%d,\"hs_inflight\":%d,"
               "\"opened\":%ld,\"open_s\":%.3f,\"handshakes_per_s\":%.1f,",
               use_tls ? "true" : "false", nconns, hs_inflight, opened, open_s,
               open_s > 0 ? (double)opened / open_s : 0);
        print_dist("hs_us", hs_samples, n_hs);
        printf(",\"hold_s\":%.1f,\"dropped_during_hold\":%ld,\"close_s\":%.3f,"
               "\"closed_clean\":%ld,\"rss_before_kb\":%ld,\"rss_opened_kb\":%ld,"
               "\"rss_held_kb\":%ld,\"rss_after_kb\":%ld,\"proxy_cpu_s\":%.3f,"
               "\"backend_cpu_s\":%.3f,\"client_cpu_s\":%.3f,\"machine_busy_s\":%.3f,",
               hold, dropped, (double)(t_closed - tc) / 1e9, closed_clean, rss_before,
               rss_opened, rss_held, rss_after, cpu1 - cpu0, bcpu1 - bcpu0, scpu1 - scpu0,
               mbusy1 - mbusy0);
    } else {
        /* ---- echo traffic ---- */
        uint64_t t0 = now_ns();
        t_ms = t0 + (uint64_t)(warmup * 1e9);
        t_me = t_ms + (uint64_t)(duration * 1e9);
        sending = 1;
        if (mode == M_CLOSED) {
            for (int i = 0; i < nconns; i++)
                if (conns[i].state == C_OPEN) {
                    for (int k = 0; k < inflight; k++)
                        send_msg(&conns[i], t0);
                    flush_conn(&conns[i]);
                }
        }
        uint64_t interval = mode == M_OPEN ? (uint64_t)(1e9 / rate) : 0;
        uint64_t j = 0, next_due = t0;
        int in_window = 0;
        while (!stop_flag) {
            uint64_t now = now_ns();
            if (!in_window && now >= t_ms) {
                in_window = 1;
                cpu0 = pids_cpu_s(watch_pids, n_watch);
                bcpu0 = pids_cpu_s(backend_pids, n_backend);
                scpu0 = self_cpu_s();
                mbusy0 = machine_busy_s(busy_cpus);
            }
            if (now >= t_me)
                break;
            if (n_open == 0)
                break;
            uint64_t until = in_window ? t_me : t_ms;
            if (mode == M_OPEN) {
                while (next_due <= now && next_due < t_me) {
                    conn_t *c = &conns[j % (uint64_t)nconns];
                    j++;
                    if (c->state == C_OPEN) {
                        send_msg(c, next_due);
                        flush_conn(c);
                    } else {
                        err_not_sent++;
                    }
                    next_due = t0 + j * interval;
                }
                if (next_due < until)
                    until = next_due;
            }
            poll_once(until);
        }
        cpu1 = pids_cpu_s(watch_pids, n_watch);
        bcpu1 = pids_cpu_s(backend_pids, n_backend);
        scpu1 = self_cpu_s();
        mbusy1 = machine_busy_s(busy_cpus);
        double win = (double)(now_ns() < t_me ? now_ns() - t_ms : t_me - t_ms) / 1e9;
        if (now_ns() < t_ms)
            win = 0;
        sending = 0;
        /* drain what is in flight, bounded */
        uint64_t end = now_ns() + 2000000000ull;
        for (;;) {
            long infl = 0;
            for (int i = 0; i < nconns; i++)
                if (conns[i].state == C_OPEN)
                    infl += conns[i].ts_count;
            if (!infl || now_ns() >= end || stop_flag)
                break;
            poll_once(end);
        }
        close_all(3);
        printf("{\"mode\":\"%s\",\"tls\":%s,\"text\":%s,\"conns\":%d,\"conns_open\":%ld,\"size\":%d,"
               "\"inflight\":%d,\"rate\":%.1f,\"window_s\":%.3f,\"messages\":%llu,"
               "\"msgs_per_s\":%.1f,\"mb_per_s\":%.2f,",
               mode == M_OPEN ? "open" : "closed", use_tls ? "true" : "false",
               opcode == WS_TEXT ? "true" : "false", nconns, opened,
               msg_size, inflight, rate, win, (unsigned long long)w_msgs,
               win > 0 ? (double)w_msgs / win : 0, win > 0 ? (double)w_bytes / win / 1e6 : 0);
        print_dist("rtt_us", samples, n_samples);
        printf(",\"proxy_cpu_s\":%.3f,\"backend_cpu_s\":%.3f,\"client_cpu_s\":%.3f,"
               "\"machine_busy_s\":%.3f,",
               cpu1 - cpu0, bcpu1 - bcpu0, scpu1 - scpu0, mbusy1 - mbusy0);
    }
    printf("\"sent\":%llu,\"received\":%llu,\"errors\":{\"connect\":%ld,\"handshake\":%ld,"
           "\"protocol\":%ld,\"size\":%ld,\"opcode\":%ld,\"dropped\":%ld,\"not_sent\":%ld},"
           "\"timed_out\":%s,\"interrupted\":%s}\n",
           (unsigned long long)total_sent, (unsigned long long)total_recv, err_connect,
           err_handshake, err_proto, err_size, err_opcode, err_dropped, err_not_sent,
           timed_out ? "true" : "false", stop_flag ? "true" : "false");
    fflush(stdout);
    return 0;
}
