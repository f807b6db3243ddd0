/*
 * chatload: the chat-svc benchmark's fan-out load generator.
 *
 * One thread, one epoll loop. Opens N TCP connections to a line-based chat
 * server (optionally spread over several ports: two instances sharing a room),
 * proves with a barrier that the server delivers to every one of them, lets S
 * of them send paced 64-byte lines and measures what every other connection
 * receives. Writes one JSON object to stdout. Built by bench/ (python -m bench) with
 * `gcc -O2`; no dependencies beyond libc (Linux >= 5.11 for epoll_pwait2).
 *
 * Wire format (client -> server), one line each:
 *   ~LM <gid> <t_ns> xxxx...\n   load message <gid>, composed at CLOCK_MONOTONIC
 *                                <t_ns>; sender = senders[gid % S], padded to --size
 *   ~LS <k>\n                    barrier line
 *   ~LP <k>\n                    the idle-mode probe broadcast
 * Receivers split on '\n' and look for "~L?" anywhere in a line, so any prefix
 * ("[nick] ", "\n[('127.0.0.1', 4242): ") is fine; every token in a line counts
 * (a chunk-relaying server glues lines: `merged_lines`). A load token counts only
 * if <gid> was sent and <t_ns> equals the stored compose time of that gid and is
 * followed by a space; anything else (a header torn by a chunk relay) is
 * `malformed`.
 *
 * --protocol irc (for an IRC server such as ngircd, measured as a peer): each
 * connection registers (NICK u<idx>, USER; on 432/433 it retries u<idx>_<n>),
 * joins #load after 001 and counts as ready on 366 (end of NAMES); it answers
 * PING with PONG, and every line above is sent as "PRIVMSG #load :<line>\r\n",
 * the same 64-byte text as in raw mode inside IRC framing. The ramp ends once
 * every connection has joined or failed (connect or join within
 * --connect-timeout: `join_failed`).
 *
 * --max-connecting N: at most N connections started and not ready yet (connected;
 * joined or upgraded) at once, whatever --connect-rate asks: a burst the server
 * takes in more slowly than it arrives then waits here, not past the server's
 * backlog (where the kernel drops the handshake and TCP retries it seconds
 * later) and not past --connect-timeout.
 *
 * --protocol ws (chat-svc's WebSocket endpoint, GET /ws): each connection sends
 * the upgrade request and counts as ready on "HTTP/1.1 101"; every line above
 * goes out as one masked text frame (RFC 6455 5.3). Server frames (unmasked) are
 * taken apart in place as they arrive: text payloads feed the same line splitter,
 * a ping is answered with a pong, a close frame closes the connection. Server
 * messages hold whole lines, so `ws_frames` / reads shows how many lines the
 * server coalesced into each message.
 *
 * Loss = expected - delivered, where expected sums, for every composed message,
 * the connections that had passed the barrier and were still open, minus the
 * sender. Per (receiver, sender) the last seq is kept: lower = out_of_order,
 * equal = duplicate (neither is counted as delivered).
 *
 * --ids (raw protocol, chat-svc): every connection sends "/ids" first, and every
 * room line must then arrive as "@<epoch>:<offset> <line>": the prefix is
 * checked and stripped. A load line without one is `id_missing`; offsets that
 * do not grow per receiver (or an epoch that changes) are `id_errors`; the same
 * load line arriving with different ids at different receivers (two instances
 * through Redis) is `id_mismatch`.
 *
 * --join R (raw or ws): every connection sends "/join R" first, so several
 * generators, one per room, can load several rooms of the same servers at once;
 * the barrier then proves every member is in R. t_send_start_mono_s and
 * t_send_end_mono_s (CLOCK_MONOTONIC) let the caller read other processes' CPU
 * over exactly the sending window.
 *
 * --storm-after T (with --ids and two ports): the senders sit on the second port,
 * the other connections on the first. T seconds into sending, every connection
 * of the first port closes at once and reconnects to the second with
 * "/resume <room> <epoch>:<last offset seen>"; it counts as back on
 * "* resumed ..." (complete) or "! resume incomplete ..." (incomplete). Lines
 * without an id before that answer were sent before ids were on and are in the
 * replay: they are skipped; "[history]" lines are never deliveries. Loss,
 * duplicates and order are then judged across the reconnect as everywhere else,
 * and `storm_*` reports how long the members took to be back.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXEV 512
#define RAMP_BATCH 64 /* connections started at most between two looks at the sockets */
#define RB_SIZE (256 * 1024)
#define CARRY_MAX 8192
#define MAX_PIDS 8
#define MAX_PORTS 8

enum { C_IDLE = 0, C_CONNECTING, C_OPEN, C_CLOSED };
enum { P_RAMP = 0, P_SYNC, P_WARM, P_SEND, P_DRAIN, P_HOLD, P_PROBE, P_DONE };

typedef struct {
    int fd;
    uint8_t state, synced, probed, port_idx, joined, nick_tries;
    uint8_t stormed, resuming; /* --storm-after: reconnected; waiting for the resume's answer */
    int32_t sender;          /* sender index or -1 */
    int64_t t_start, t_synced, t_back;
    uint64_t last_off;       /* --ids: the last offset seen, of epoch[] */
    char epoch[17];
    char *carry;
    uint32_t carry_len;
    char *out;
    uint32_t out_len, out_off, out_cap;
    /* --protocol ws: the server frame being read */
    uint64_t ws_left;        /* payload bytes still to come */
    uint8_t ws_op, ws_hlen;  /* its opcode; header bytes collected so far */
    uint8_t ws_hdr[14];
    uint8_t ws_ctl_len;      /* a ping's payload, echoed in the pong */
    uint8_t ws_ctl[125];
} conn_t;

typedef struct {
    int64_t ts;        /* compose time, -1 = skipped */
    uint32_t expected; /* receivers joined at compose time */
    uint32_t got;
    uint64_t off;      /* --ids: the offset it first arrived with */
} msg_t;

/* ---------- options ---------- */
static const char *o_host = "127.0.0.1";
static int o_ports[MAX_PORTS], o_nports = 0;
static int o_clients = 10, o_senders = -1, o_size = 64, o_idle = 0, o_rst = 0, o_observe = 0;
static double o_rate = 10, o_duration = 5, o_warmup = 1, o_drain = 5, o_connect_rate = 1000;
static double o_connect_timeout = 10, o_sync_timeout = 15;
static int o_max_connecting = 0;
static int o_pids[MAX_PIDS], o_npids = 0;
static const char *o_label = "";
static int o_verbose = 0, o_irc = 0, o_ws = 0, o_ids = 0;
static double o_storm_after = 0;
static const char *o_room = "lobby";
static int o_join = 0;
#define IRC_CHANNEL "#load"
#define IRC_PREFIX "PRIVMSG " IRC_CHANNEL " :"

/* ---------- state ---------- */
static int ep;
static conn_t *conns;
static int *sender_conn; /* sender idx -> conn idx */
static msg_t *msgs;
static uint64_t nmsgs_cap, nsent;
/* [receiver * S + sender]: (last seq + 1) mod 256, compared wrap-aware as a signed
   8-bit difference (one byte per pair keeps the table in cache; exact while a
   receiver is fewer than 128 lines of one sender behind, far beyond any loss) */
static uint8_t *last_seq;
static int S;
static int phase = P_RAMP;
static char *rb;

static uint64_t n_connected, n_connect_failed, n_open, n_synced_alive, n_disconnects;
static uint64_t n_ready, n_join_failed, irc_errors; /* ready = connected (raw) or joined (irc) */
static int64_t t_first_disconnect = -1;
static int syncer = -1, syncer_reached = 0, sync_ok = 0, sync_rounds = 0;
static uint64_t expected, delivered, malformed, merged_lines, ignored_lines, overlong;
static uint64_t self_echo, unexpected, duplicates, out_of_order, send_skipped;
static uint64_t send_backlog_events, max_outbuf, unwritten_at_end;
static uint64_t ws_frames, ws_pings, ws_closes;
static uint64_t n_reads_window, bytes_read_window, load_lines_window;
static int counting; /* inside the send+drain window */
static int64_t t_last_delivery = -1, send_lag_max = 0;
static double send_lag_sum = 0;
static uint64_t probe_expected, probe_got;
static int64_t t_probe_sent = -1, t_probe_last = -1;
static int64_t lat_max_ns = 0;
static double lat_sum_us = 0;
static uint64_t id_missing, id_errors, id_mismatch, ids_seen;
static int64_t t_storm = -1;
static uint64_t storm_members, storm_connected, storm_failed, storm_complete, storm_incomplete, storm_replayed;
static uint64_t storm_no_id;

/* latency histogram: log-linear over microseconds, 512 sub-buckets per octave */
#define SUB 512
#define HBUCKETS (2 * SUB + SUB * 40)
static uint64_t hist[HBUCKETS], hist_n;

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* 1 us buckets below 1024 us, then 512 buckets per power of two (<= 0.2 %) */
static inline int hbucket(uint64_t us) {
    if (us < 2 * SUB) return (int)us;
    int e = 63 - __builtin_clzll(us) - 9; /* >= 1; us >> e in [SUB, 2*SUB) */
    int b = 2 * SUB + (e - 1) * SUB + (int)((us >> e) - SUB);
    return b < HBUCKETS ? b : HBUCKETS - 1;
}
static double hvalue(int b) { /* midpoint of bucket b, us */
    if (b < 2 * SUB) return b;
    int e = (b - 2 * SUB) / SUB + 1;
    uint64_t lo = ((uint64_t)((b - 2 * SUB) % SUB + SUB)) << e;
    return (double)lo + (double)((1ULL << e) - 1) / 2.0;
}
static double hpct(double p) {
    if (!hist_n) return -1;
    uint64_t want = (uint64_t)(p * (double)hist_n);
    if (want >= hist_n) want = hist_n - 1;
    uint64_t acc = 0;
    for (int b = 0; b < HBUCKETS; b++) {
        acc += hist[b];
        if (acc > want) return hvalue(b);
    }
    return -1;
}

/* ---------- /proc sampling ---------- */
/* seconds a task was runnable but waiting for a CPU (the second field of schedstat);
   on a pinned core this is time other processes took from it */
static double runq_wait_s(int pid) {
    char path[64];
    unsigned long long run = 0, wait = 0;
    if (pid > 0) snprintf(path, sizeof path, "/proc/%d/schedstat", pid);
    else snprintf(path, sizeof path, "/proc/thread-self/schedstat");
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    if (fscanf(f, "%llu %llu", &run, &wait) != 2) wait = 0;
    fclose(f);
    return (double)wait / 1e9;
}
typedef struct { double cpu_s, user_s, wait_s; long rss_kb, hwm_kb; int alive; } srv_sample_t;
static srv_sample_t srv_sample(void) {
    srv_sample_t s = {0, 0, 0, 0, 0, 1};
    long tck = sysconf(_SC_CLK_TCK);
    for (int i = 0; i < o_npids; i++) {
        char path[64], buf[4096];
        snprintf(path, sizeof path, "/proc/%d/stat", o_pids[i]);
        FILE *f = fopen(path, "r");
        if (!f) { s.alive = 0; continue; }
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        unsigned long ut = 0, st = 0;
        if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) == 2)
        {
            s.cpu_s += (double)(ut + st) / (double)tck;
            s.user_s += (double)ut / (double)tck;
        }
        s.wait_s += runq_wait_s(o_pids[i]);
        snprintf(path, sizeof path, "/proc/%d/status", o_pids[i]);
        f = fopen(path, "r");
        if (!f) { s.alive = 0; continue; }
        while (fgets(buf, sizeof buf, f)) {
            long v;
            if (sscanf(buf, "VmRSS: %ld", &v) == 1) s.rss_kb += v;
            else if (sscanf(buf, "VmHWM: %ld", &v) == 1) s.hwm_kb += v;
        }
        fclose(f);
    }
    return s;
}
static double self_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}
/* per-cpu busy and total steal, seconds */
typedef struct { double busy[4]; double steal; } cpu_sample_t;
static cpu_sample_t cpu_sample(void) {
    cpu_sample_t c;
    memset(&c, 0, sizeof c);
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return c;
    char line[512];
    long tck = sysconf(_SC_CLK_TCK);
    while (fgets(line, sizeof line, f)) {
        unsigned long long u, n, sy, id, io, irq, sirq, stl;
        int cpu;
        if (sscanf(line, "cpu%d %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &u, &n, &sy, &id, &io, &irq, &sirq, &stl) == 9) {
            if (cpu >= 0 && cpu < 4) c.busy[cpu] = (double)(u + n + sy + irq + sirq) / tck;
            c.steal += (double)stl / tck;
        }
    }
    fclose(f);
    return c;
}

/* ---------- connections ---------- */
/* --max-connecting: a connection may start while fewer than that many started are not ready yet */
static int may_connect(int started) {
    return !o_max_connecting || (uint64_t)started < n_ready + n_connect_failed + n_join_failed + (uint64_t)o_max_connecting;
}

static void ep_mod(conn_t *c, int idx, uint32_t evs) {
    struct epoll_event e = {.events = evs, .data.u32 = (uint32_t)idx};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void conn_close(int idx, int by_server) {
    conn_t *c = &conns[idx];
    if (c->state == C_CLOSED || c->state == C_IDLE) return;
    if (c->state == C_OPEN && (o_irc || o_ws) && !c->joined) {
        n_open--;
        n_join_failed++;
    } else if (c->state == C_OPEN) {
        n_open--;
        if (c->synced) n_synced_alive--;
        if (by_server) {
            n_disconnects++;
            if (t_first_disconnect < 0) t_first_disconnect = now_ns();
        }
    } else if (c->state == C_CONNECTING) {
        if (c->stormed) storm_failed++;
        else n_connect_failed++;
    }
    if (o_rst) {
        struct linger l = {1, 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    }
    close(c->fd);
    c->state = C_CLOSED;
    free(c->carry); c->carry = NULL; c->carry_len = 0;
    free(c->out); c->out = NULL; c->out_len = c->out_off = c->out_cap = 0;
}

static void conn_start(int idx) {
    conn_t *c = &conns[idx];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { c->state = C_CLOSED; n_connect_failed++; return; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)o_ports[c->port_idx])};
    inet_pton(AF_INET, o_host, &a.sin_addr);
    c->fd = fd;
    c->t_start = now_ns();
    int r = connect(fd, (struct sockaddr *)&a, sizeof a);
    if (r < 0 && errno != EINPROGRESS) { close(fd); c->state = C_CLOSED; n_connect_failed++; return; }
    c->state = C_CONNECTING;
    struct epoll_event e = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)idx};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
}

/* write (or queue) bytes on connection idx; keeps order */
static void conn_write(int idx, const char *p, uint32_t len) {
    conn_t *c = &conns[idx];
    if (c->state != C_OPEN) return;
    if (c->out_len == c->out_off) {
        ssize_t w = write(c->fd, p, len);
        if (w == (ssize_t)len) return;
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) { conn_close(idx, 1); return; }
            w = 0;
        }
        p += w; len -= (uint32_t)w;
        c->out_len = c->out_off = 0;
        send_backlog_events++;
        ep_mod(c, idx, EPOLLIN | EPOLLOUT | EPOLLET);
    }
    if (c->out_len + len > c->out_cap) {
        uint32_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + len) cap *= 2;
        c->out = realloc(c->out, cap);
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, p, len);
    c->out_len += len;
    if (c->out_len - c->out_off > max_outbuf) max_outbuf = c->out_len - c->out_off;
}

static void conn_flush(int idx) {
    conn_t *c = &conns[idx];
    while (c->out_off < c->out_len) {
        ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            conn_close(idx, 1);
            return;
        }
        c->out_off += (uint32_t)w;
    }
    c->out_len = c->out_off = 0;
    ep_mod(c, idx, EPOLLIN | EPOLLET);
}

/* ---------- irc ---------- */
/* the chat text framed for the protocol: raw "<text>\n", irc "PRIVMSG #load :<text>\r\n";
   text is padded with 'x' to `size` bytes including the raw newline */
/* --protocol ws: the line in buf becomes one masked text frame (header and key in front) */
static int ws_mask(char *buf, size_t cap, int len) {
    static const uint8_t key[4] = {0x37, 0xfa, 0x21, 0x3d};
    uint8_t head[8];
    int h = 0;
    head[h++] = 0x81; /* FIN, text */
    if (len < 126) head[h++] = (uint8_t)(0x80 | len);
    else { head[h++] = 0x80 | 126; head[h++] = (uint8_t)(len >> 8); head[h++] = (uint8_t)len; }
    memcpy(head + h, key, 4);
    h += 4;
    if ((size_t)(len + h) > cap) return 0;
    memmove(buf + h, buf, (size_t)len);
    memcpy(buf, head, (size_t)h);
    for (int i = 0; i < len; i++) buf[h + i] ^= (char)key[i & 3];
    return len + h;
}

static int frame(char *buf, size_t cap, const char *text, int size) {
    int len = snprintf(buf, cap, "%s%s", o_irc ? IRC_PREFIX : "", text);
    int want = (o_irc ? (int)strlen(IRC_PREFIX) : 0) + size - 1;
    while (len < want && len < (int)cap - 17) buf[len++] = 'x';
    if (o_irc) buf[len++] = '\r';
    buf[len++] = '\n';
    return o_ws ? ws_mask(buf, cap, len) : len;
}

static void ws_upgrade(int idx) {
    char l[256];
    int n = snprintf(l, sizeof l,
                     "GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: Y2hhdGxvYWQgYmVuY2ggIQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     o_host, o_ports[conns[idx].port_idx]);
    conn_write(idx, l, (uint32_t)n);
}

/* A member's first lines once it can talk: /join the generator's room (--join), /ids (--ids). */
static void enter(int idx) {
    if (o_join) {
        char l[128], text[64];
        snprintf(text, sizeof text, "/join %s", o_room);
        int n = frame(l, sizeof l, text, 0);
        conn_write(idx, l, (uint32_t)n);
    }
    if (o_ids) conn_write(idx, "/ids\n", 5);
}

/* Takes the server's frames in [src, end) apart: text payloads are copied down to dst (dst <= src),
   pings answered, a close frame noted. Returns the end of the payload bytes written. */
static char *ws_deframe(int idx, const char *src, const char *end, char *dst, int *closed) {
    conn_t *c = &conns[idx];
    while (src < end) {
        if (c->ws_left) {
            size_t k = (size_t)(end - src) < c->ws_left ? (size_t)(end - src) : (size_t)c->ws_left;
            if (c->ws_op <= 1) { memmove(dst, src, k); dst += k; }
            else if (c->ws_op == 9 && c->ws_ctl_len + k <= sizeof c->ws_ctl) {
                memcpy(c->ws_ctl + c->ws_ctl_len, src, k);
                c->ws_ctl_len += (uint8_t)k;
            }
            src += k;
            c->ws_left -= k;
        } else {
            c->ws_hdr[c->ws_hlen++] = (uint8_t)*src++;
            if (c->ws_hlen < 2) continue;
            int code = c->ws_hdr[1] & 0x7f, need = 2 + (code == 126 ? 2 : code == 127 ? 8 : 0);
            need += (c->ws_hdr[1] & 0x80) ? 4 : 0; /* a server must not mask; skip a key if one is there */
            if (c->ws_hlen < need) continue;
            uint64_t len = (uint64_t)code;
            if (code == 126) len = (uint64_t)c->ws_hdr[2] << 8 | c->ws_hdr[3];
            else if (code == 127) { len = 0; for (int i = 2; i < 10; i++) len = len << 8 | c->ws_hdr[i]; }
            c->ws_op = c->ws_hdr[0] & 0x0f;
            c->ws_left = len;
            c->ws_hlen = 0;
            c->ws_ctl_len = 0;
            if (c->ws_op <= 1) ws_frames++;
        }
        if (!c->ws_left && !c->ws_hlen) { /* a whole frame is in */
            if (c->ws_op == 9) {
                char pong[160];
                memcpy(pong, c->ws_ctl, c->ws_ctl_len);
                int n = ws_mask(pong, sizeof pong, c->ws_ctl_len);
                pong[0] = (char)0x8a; /* FIN, pong */
                ws_pings++;
                conn_write(idx, pong, (uint32_t)n);
                c->ws_op = 0xff;
            } else if (c->ws_op == 8) {
                ws_closes++;
                *closed = 1;
                return dst;
            }
        }
    }
    return dst;
}

static void irc_nick(int idx) {
    char l[128];
    conn_t *c = &conns[idx];
    int n = c->nick_tries ? snprintf(l, sizeof l, "NICK u%d_%d\r\n", idx, c->nick_tries)
                          : snprintf(l, sizeof l, "NICK u%d\r\nUSER u%d 0 * :u%d\r\n", idx, idx, idx);
    conn_write(idx, l, (uint32_t)n);
}

/* server lines that are not chat: returns 1 when the line was one (PING, ERROR, numerics) */
static int irc_control(int idx, const char *p, const char *nl) {
    size_t n = (size_t)(nl - p);
    if (n && p[n - 1] == '\r') n--;
    if (n >= 5 && !memcmp(p, "PING ", 5)) {
        char l[600];
        int k = snprintf(l, sizeof l, "PONG %.*s\r\n", (int)(n - 5 > 500 ? 500 : n - 5), p + 5);
        conn_write(idx, l, (uint32_t)k);
        return 1;
    }
    if (n >= 6 && !memcmp(p, "ERROR ", 6)) { irc_errors++; return 1; }
    const char *sp = n && p[0] == ':' ? memchr(p, ' ', n) : NULL;
    if (!sp || sp + 4 >= p + n || sp[4] != ' ') return 0;
    if (sp[1] < '0' || sp[1] > '9' || sp[2] < '0' || sp[2] > '9' || sp[3] < '0' || sp[3] > '9') return 0;
    int code = (sp[1] - '0') * 100 + (sp[2] - '0') * 10 + (sp[3] - '0');
    conn_t *c = &conns[idx];
    if (code == 1) conn_write(idx, "JOIN " IRC_CHANNEL "\r\n", (uint32_t)strlen("JOIN " IRC_CHANNEL "\r\n"));
    else if ((code == 432 || code == 433) && !c->joined && c->nick_tries < 9) { c->nick_tries++; irc_nick(idx); }
    else if (code == 366 && !c->joined) { c->joined = 1; n_ready++; }
    return 1;
}

/* ---------- receive path ---------- */
static inline int parse_u64(const char **pp, const char *end, uint64_t *v) {
    const char *p = *pp;
    uint64_t x = 0;
    int nd = 0;
    while (p < end && *p >= '0' && *p <= '9' && nd < 20) { x = x * 10 + (uint64_t)(*p - '0'); p++; nd++; }
    if (!nd || p >= end || *p != ' ') return 0;
    *pp = p + 1;
    *v = x;
    return 1;
}

static int64_t t_begin_g;

/* --observe: another process sent the line, so only its clock is checked */
static void on_observed_token(const char *p, const char *end, int64_t t) {
    uint64_t gid, ts;
    if (!parse_u64(&p, end, &gid) || !parse_u64(&p, end, &ts) || (int64_t)ts > t || (int64_t)ts < t_begin_g - 600000000000LL) {
        malformed++;
        return;
    }
    delivered++;
    int64_t lat = t - (int64_t)ts;
    hist[hbucket((uint64_t)(lat / 1000))]++;
    hist_n++;
    lat_sum_us += (double)lat / 1000.0;
    if (lat > lat_max_ns) lat_max_ns = lat;
    t_last_delivery = t;
}

static void on_load_token(int ridx, const char *p, const char *end, int64_t t, uint64_t off) {
    uint64_t gid, ts;
    if (o_observe) { on_observed_token(p, end, t); return; }
    if (!parse_u64(&p, end, &gid) || !parse_u64(&p, end, &ts) || gid >= nsent || msgs[gid].ts != (int64_t)ts) {
        malformed++;
        return;
    }
    if (o_ids) {
        if (!off) id_missing++;
        else if (!msgs[gid].off) msgs[gid].off = off;
        else if (msgs[gid].off != off) id_mismatch++;
    }
    int s = (int)(gid % (uint64_t)S);
    if (sender_conn[s] == ridx) { self_echo++; return; }
    conn_t *c = &conns[ridx];
    if (!c->synced || c->t_synced > (int64_t)ts) { unexpected++; return; }
    int32_t seq = (int32_t)(gid / (uint64_t)S);
    if (last_seq) {
        uint8_t *ls = &last_seq[(size_t)ridx * (size_t)S + (size_t)s];
        int8_t d = (int8_t)(uint8_t)((uint8_t)(seq + 1) - *ls);
        if (d == 0) { duplicates++; return; }
        if (d < 0) { out_of_order++; return; }
        *ls = (uint8_t)(seq + 1);
    }
    delivered++;
    msgs[gid].got++;
    int64_t lat = t - (int64_t)ts;
    if (lat < 0) lat = 0;
    hist[hbucket((uint64_t)(lat / 1000))]++;
    hist_n++;
    lat_sum_us += (double)lat / 1000.0;
    if (lat > lat_max_ns) lat_max_ns = lat;
    t_last_delivery = t;
}

/* "@<epoch>:<offset> " at p: checks it against the receiver's last id, returns what follows (NULL: no id) */
static const char *strip_id(int ridx, const char *p, const char *nl, uint64_t *off) {
    conn_t *c = &conns[ridx];
    char epoch[17];
    int n = 0;
    const char *q = p + 1;
    while (q < nl && n < 16 && isalnum((unsigned char)*q)) epoch[n++] = *q++;
    epoch[n] = 0;
    if (!n || q >= nl || *q != ':') return NULL;
    q++;
    if (!parse_u64(&q, nl, off) || !*off) return NULL;
    ids_seen++;
    if (c->epoch[0] && (strcmp(c->epoch, epoch) || *off <= c->last_off)) id_errors++;
    memcpy(c->epoch, epoch, (size_t)n + 1);
    c->last_off = *off;
    return q;
}

static void on_resumed(int ridx, const char *p, const char *nl, int64_t t) {
    conn_t *c = &conns[ridx];
    c->resuming = 0;
    c->t_back = t;
    if (nl - p > 10 && !memcmp(p, "* resumed ", 10)) {
        storm_complete++;
        const char *colon = memchr(p, ':', (size_t)(nl - p));
        if (colon) storm_replayed += strtoull(colon + 1, NULL, 10);
    } else {
        storm_incomplete++;
    }
}

static void on_line(int ridx, const char *p, const char *nl, int64_t t) {
    int tokens = 0;
    uint64_t off = 0;
    if (o_irc && irc_control(ridx, p, nl)) { ignored_lines++; return; }
    if (o_ids && p < nl && *p == '@') {
        const char *rest = strip_id(ridx, p, nl, &off);
        if (rest) p = rest;
    }
    if (nl - p >= 10 && !memcmp(p, "[history] ", 10)) { ignored_lines++; return; }
    if (conns[ridx].resuming) {
        if ((nl - p > 10 && !memcmp(p, "* resumed ", 10)) || (nl - p > 20 && !memcmp(p, "! resume incomplete ", 20))) {
            on_resumed(ridx, p, nl, t);
            ignored_lines++;
            return;
        }
        if (!off) { ignored_lines++; return; } /* live before ids were on: the replay has it */
    }
    const char *q = p;
    while (q + 4 <= nl && (q = memchr(q, '~', (size_t)(nl - q))) != NULL) {
        if (q + 4 <= nl && q[1] == 'L' && q[3] == ' ') {
            char k = q[2];
            if (k == 'M') { tokens++; load_lines_window++; on_load_token(ridx, q + 4, nl, t, off); }
            else if (k == 'S') {
                tokens++;
                if (ridx != syncer) {
                    conn_t *c = &conns[ridx];
                    if (!c->synced && c->state == C_OPEN) { c->synced = 1; c->t_synced = t; n_synced_alive++; }
                    if (!syncer_reached && syncer >= 0 && conns[syncer].state == C_OPEN) {
                        syncer_reached = 1;
                        conns[syncer].synced = 1; conns[syncer].t_synced = t; n_synced_alive++;
                    }
                }
            } else if (k == 'P') {
                tokens++;
                conn_t *c = &conns[ridx];
                if (ridx != syncer && t_probe_sent >= 0 && !c->probed) { c->probed = 1; probe_got++; t_probe_last = t; }
            }
            q += 4;
        } else {
            q++;
        }
    }
    if (o_observe && tokens == 0) {
        /* the observer also understands the independent generator's documented "LT <sender> <seq> <t_ns> "
           lines, so the two generators can be compared against the same passive clients */
        const char *r = p;
        while (r + 3 <= nl && (r = memmem(r, (size_t)(nl - r), "LT ", 3)) != NULL) {
            if (r == p || !((r[-1] >= '0' && r[-1] <= '9') || (r[-1] >= 'A' && r[-1] <= 'Z') || (r[-1] >= 'a' && r[-1] <= 'z'))) {
                uint64_t sidx;
                const char *f = r + 3;
                if (parse_u64(&f, nl, &sidx)) { tokens++; on_observed_token(f, nl, t); }
            }
            r += 3;
        }
    }
    if (tokens == 0) ignored_lines++;
    else if (tokens > 1) merged_lines++;
}

/* edge-triggered: read until the kernel queue is empty (a short read or EAGAIN) */
static void conn_read(int idx) {
    conn_t *c = &conns[idx];
    for (;;) {
        uint32_t cl = c->carry_len;
        if (cl) memcpy(rb, c->carry, cl);
        ssize_t n = read(c->fd, rb + cl, RB_SIZE);
        if (n == 0) { conn_close(idx, 1); return; }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) conn_close(idx, 1);
            return;
        }
        int64_t t = now_ns();
        if (counting) { n_reads_window++; bytes_read_window += (uint64_t)n; }
        const char *p = rb, *end = rb + cl + n, *nl;
        int closed = 0;
        if (o_ws && !c->joined) { /* the handshake's answer, then frames */
            const char *hend = memmem(rb, (size_t)(end - rb), "\r\n\r\n", 4);
            if (!hend) {
                if ((size_t)(end - rb) > CARRY_MAX) { conn_close(idx, 1); return; }
                if (!c->carry) c->carry = malloc(CARRY_MAX);
                memmove(c->carry, rb, (size_t)(end - rb));
                c->carry_len = (uint32_t)(end - rb);
                if (n < RB_SIZE) return;
                continue;
            }
            if (memcmp(rb, "HTTP/1.1 101", 12)) { conn_close(idx, 1); return; }
            c->joined = 1;
            n_ready++;
            enter(idx);
            end = ws_deframe(idx, hend + 4, end, rb, &closed);
        } else if (o_ws) {
            end = ws_deframe(idx, rb + cl, end, rb + cl, &closed);
        }
        while ((nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
            on_line(idx, p, nl, t);
            p = nl + 1;
        }
        if (closed) { conn_close(idx, 1); return; }
        size_t left = (size_t)(end - p);
        if (left > CARRY_MAX) { overlong++; left = 0; }
        if (left) {
            if (!c->carry) c->carry = malloc(CARRY_MAX);
            memmove(c->carry, p, left);
        }
        c->carry_len = (uint32_t)left;
        if (n < RB_SIZE) return; /* the queue was drained */
    }
}

/* ---------- the reconnect storm ---------- */
static void storm_drop(void) {
    t_storm = now_ns();
    for (int i = 0; i < o_clients; i++) {
        conn_t *c = &conns[i];
        if (c->sender >= 0 || c->state != C_OPEN) continue;
        close(c->fd);
        n_open--;
        free(c->carry); c->carry = NULL; c->carry_len = 0;
        free(c->out); c->out = NULL; c->out_len = c->out_off = c->out_cap = 0;
        c->state = C_IDLE;
        c->port_idx = 1;
        c->stormed = c->resuming = 1;
        storm_members++;
    }
    for (int i = 0; i < o_clients; i++)
        if (conns[i].stormed && conns[i].state == C_IDLE) conn_start(i);
}

/* the first line of a reconnected member: resume from the last id it saw */
static void storm_resume(int idx) {
    conn_t *c = &conns[idx];
    char l[128];
    if (!c->epoch[0]) storm_no_id++;
    int n = snprintf(l, sizeof l, "/resume %s %s:%" PRIu64 "\n", o_room, c->epoch[0] ? c->epoch : "none",
                     c->last_off);
    conn_write(idx, l, (uint32_t)n);
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* ---------- sending ---------- */
static char linebuf[4096];

static void send_msg(int64_t t_sched) {
    uint64_t gid = nsent;
    if (gid >= nmsgs_cap) return;
    int s = (int)(gid % (uint64_t)S);
    int ci = sender_conn[s];
    conn_t *c = &conns[ci];
    nsent++;
    if (c->state != C_OPEN) { msgs[gid].ts = -1; msgs[gid].expected = 0; send_skipped++; return; }
    int64_t t = now_ns();
    char text[64];
    snprintf(text, sizeof text, "~LM %" PRIu64 " %" PRId64 " ", gid, t);
    int len = frame(linebuf, sizeof linebuf, text, o_size);
    msgs[gid].ts = t;
    msgs[gid].expected = (uint32_t)(n_synced_alive - (c->synced ? 1 : 0));
    expected += msgs[gid].expected;
    int64_t lag = t - t_sched;
    if (lag > send_lag_max) send_lag_max = lag;
    send_lag_sum += (double)lag;
    conn_write(ci, linebuf, (uint32_t)len);
}

/* ---------- main ---------- */
static void usage(void) {
    fprintf(stderr,
            "usage: chatload --port P[,P...] [--host H] [--clients N] [--senders S] [--rate R]\n"
            "  [--duration T] [--warmup W] [--drain D] [--size B] [--connect-rate C]\n"
            "  [--connect-timeout S] [--max-connecting N] [--sync-timeout S] [--idle | --observe] [--server-pid P[,P...]]\n"
            "  [--protocol raw|irc|ws] [--rst] [--label L] [--verbose] [--ids] [--storm-after T] [--room R]\n"
            "  [--join R]\n");
    exit(2);
}

static int parse_list(const char *s, int *out, int max) {
    int n = 0;
    char *dup = strdup(s), *save = NULL;
    for (char *tok = strtok_r(dup, ",", &save); tok && n < max; tok = strtok_r(NULL, ",", &save)) out[n++] = atoi(tok);
    free(dup);
    return n;
}

int main(int argc, char **argv) {
    static struct option lo[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"clients", 1, 0, 'n'}, {"senders", 1, 0, 's'},
        {"rate", 1, 0, 'r'}, {"duration", 1, 0, 'd'}, {"warmup", 1, 0, 'w'}, {"drain", 1, 0, 'D'},
        {"size", 1, 0, 'b'}, {"connect-rate", 1, 0, 'c'}, {"connect-timeout", 1, 0, 'C'},
        {"sync-timeout", 1, 0, 'Y'}, {"idle", 0, 0, 'I'}, {"observe", 0, 0, 'O'}, {"server-pid", 1, 0, 'P'}, {"rst", 0, 0, 'R'},
        {"label", 1, 0, 'l'}, {"verbose", 0, 0, 'v'}, {"protocol", 1, 0, 'X'}, {"ids", 0, 0, 'i'},
        {"storm-after", 1, 0, 'T'}, {"room", 1, 0, 'm'}, {"max-connecting", 1, 0, 'M'}, {"join", 1, 0, 'J'},
        {0, 0, 0, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (opt) {
        case 'h': o_host = optarg; break;
        case 'p': o_nports = parse_list(optarg, o_ports, MAX_PORTS); break;
        case 'n': o_clients = atoi(optarg); break;
        case 's': o_senders = atoi(optarg); break;
        case 'r': o_rate = atof(optarg); break;
        case 'd': o_duration = atof(optarg); break;
        case 'w': o_warmup = atof(optarg); break;
        case 'D': o_drain = atof(optarg); break;
        case 'b': o_size = atoi(optarg); break;
        case 'c': o_connect_rate = atof(optarg); break;
        case 'C': o_connect_timeout = atof(optarg); break;
        case 'Y': o_sync_timeout = atof(optarg); break;
        case 'I': o_idle = 1; break;
        case 'O': o_observe = 1; o_idle = 1; break;
        case 'P': o_npids = parse_list(optarg, o_pids, MAX_PIDS); break;
        case 'R': o_rst = 1; break;
        case 'l': o_label = optarg; break;
        case 'v': o_verbose = 1; break;
        case 'i': o_ids = 1; break;
        case 'T': o_storm_after = atof(optarg); break;
        case 'm': o_room = optarg; break;
        case 'M': o_max_connecting = atoi(optarg); break;
        case 'J': o_room = optarg; o_join = 1; break;
        case 'X':
            if (!strcmp(optarg, "irc")) o_irc = 1;
            else if (!strcmp(optarg, "ws")) o_ws = 1;
            else if (strcmp(optarg, "raw")) usage();
            break;
        default: usage();
        }
    }
    if (o_nports == 0 || o_clients < 2 || o_size < 40 || o_size > 4000) usage();
    if ((o_ids && (o_irc || o_ws)) || (o_storm_after > 0 && (!o_ids || o_nports < 2 || o_idle)) ||
        (o_join && (o_irc || strlen(o_room) > 32)))
        usage();
    if (o_idle) o_senders = 1;
    if (o_senders < 0 || o_senders > o_clients) o_senders = o_clients;
    if (o_senders < 1) o_senders = 1;
    S = o_senders;
    signal(SIGPIPE, SIG_IGN);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)o_clients + 16 > rl.rlim_cur) {
        fprintf(stderr, "chatload: %d clients need more descriptors than RLIMIT_NOFILE=%lu; run several processes\n",
                o_clients, (unsigned long)rl.rlim_cur);
        return 2;
    }

    ep = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc((size_t)o_clients, sizeof *conns);
    sender_conn = malloc(sizeof(int) * (size_t)S);
    for (int i = 0; i < o_clients; i++) { conns[i].sender = -1; conns[i].port_idx = (uint8_t)(i % o_nports); }
    for (int s = 0; s < S; s++) {
        int ci = (int)((int64_t)s * o_clients / S);
        sender_conn[s] = ci;
        conns[ci].sender = s;
    }
    if (o_storm_after > 0) /* the senders stay on the second port; everyone else starts on the first */
        for (int i = 0; i < o_clients; i++) conns[i].port_idx = conns[i].sender >= 0 ? 1 : 0;
    nmsgs_cap = o_idle ? 1 : (uint64_t)(o_rate * o_duration) + 16;
    msgs = calloc(nmsgs_cap, sizeof *msgs);
    if ((uint64_t)o_clients * (uint64_t)S <= 256ULL * 1024 * 1024) {
        last_seq = calloc((size_t)o_clients * (size_t)S, 1);
    }
    rb = malloc(RB_SIZE + CARRY_MAX + 16);

    srv_sample_t s_start = srv_sample();
    double g_cpu_start = self_cpu();
    int64_t t_begin = t_begin_g = now_ns(), t_ramp_end = -1, t_sync_end = -1, t_next_sync = 0, t_warm_end = 0;
    int64_t t_send_start = 0, t_send_end = 0, t_drain_deadline = 0, t_hold_end = 0, t_probe_deadline = 0;
    int64_t t_next_sample = 0, t_next_timeout_scan = 0, t_done = 0;
    int next_conn = 0;
    long rss_max_sampled = s_start.rss_kb;
    srv_sample_t s_send = {0}, s_end = {0}, s_hold = {0};
    double g_cpu_send = 0, g_cpu_send_end = 0, g_cpu_end = 0, g_wait_send = 0;
    cpu_sample_t c_send = {0}, c_end = {0};
    int64_t ns_per_conn = (int64_t)(1e9 / (o_connect_rate > 0 ? o_connect_rate : 1e9));
    double ns_per_msg = o_rate > 0 ? 1e9 / o_rate : 1e18;
    struct epoll_event evs[MAXEV];

    while (phase != P_DONE) {
        int64_t t = now_ns();
        int phase_before = phase;
        int64_t deadline = t + 50000000; /* wake at least every 50 ms */

        if (t >= t_next_sample && o_npids) {
            srv_sample_t ss = srv_sample();
            if (ss.rss_kb > rss_max_sampled) rss_max_sampled = ss.rss_kb;
            t_next_sample = t + 1000000000LL;
        }
        switch (phase) {
        case P_RAMP:
            /* Behind schedule (connect() itself slows down as the ephemeral ports of one source
               address fill up), catch up a batch at a time: the connections already made must get
               their first bytes (a WebSocket upgrade) out before the server's sniff window ends. */
            for (int batch = 0; batch < RAMP_BATCH && next_conn < o_clients && may_connect(next_conn) &&
                                t >= t_begin + (int64_t)next_conn * ns_per_conn; batch++)
                conn_start(next_conn++);
            if (t >= t_next_timeout_scan) {
                for (int i = 0; i < next_conn; i++)
                    if ((conns[i].state == C_CONNECTING || ((o_irc || o_ws) && conns[i].state == C_OPEN && !conns[i].joined)) &&
                        t - conns[i].t_start > (int64_t)(o_connect_timeout * 1e9))
                        conn_close(i, 0);
                t_next_timeout_scan = t + 100000000;
            }
            if (next_conn < o_clients) {
                int64_t d = t_begin + (int64_t)next_conn * ns_per_conn;
                if (d < deadline && may_connect(next_conn)) deadline = d; /* else: woken as they get ready */
            } else if (n_ready + n_connect_failed + n_join_failed >= (uint64_t)o_clients) {
                t_ramp_end = t;
                for (int i = 0; i < o_clients; i++)
                    if (conns[i].state == C_OPEN) { syncer = i; break; }
                if (syncer < 0) { fprintf(stderr, "chatload: no connection succeeded\n"); phase = P_DONE; break; }
                if (o_observe) { /* a passive observer: no barrier, no probe, just listen */
                    s_send = srv_sample();
                    g_cpu_send = self_cpu();
                    c_send = cpu_sample();
                    t_send_start = t;
                    counting = 1;
                    t_hold_end = t + (int64_t)(o_duration * 1e9);
                    phase = P_HOLD;
                    break;
                }
                phase = P_SYNC;
                t_next_sync = t;
                t_sync_end = t + (int64_t)(o_sync_timeout * 1e9);
            }
            break;
        case P_SYNC:
            if (n_open > 0 && n_synced_alive >= n_open && syncer_reached) {
                sync_ok = 1;
                t_sync_end = t;
                phase = P_WARM;
                t_warm_end = t + (int64_t)(o_warmup * 1e9);
                break;
            }
            if (t >= t_sync_end) { t_sync_end = t; phase = P_WARM; t_warm_end = t + (int64_t)(o_warmup * 1e9); break; }
            if (t >= t_next_sync) {
                char l[128], text[32];
                snprintf(text, sizeof text, "~LS %d", ++sync_rounds);
                int n = frame(l, sizeof l, text, 0);
                if (conns[syncer].state != C_OPEN) { /* pick another */
                    syncer = -1;
                    for (int i = 0; i < o_clients; i++)
                        if (conns[i].state == C_OPEN) { syncer = i; break; }
                    if (syncer < 0) { phase = P_DONE; break; }
                }
                conn_write(syncer, l, (uint32_t)n);
                t_next_sync = t + 250000000;
            }
            if (t_next_sync < deadline) deadline = t_next_sync;
            break;
        case P_WARM:
            if (t >= t_warm_end) {
                s_send = srv_sample();
                g_cpu_send = self_cpu();
                g_wait_send = runq_wait_s(0);
                c_send = cpu_sample();
                t_send_start = now_ns();
                counting = 1;
                if (o_idle) {
                    phase = P_HOLD;
                    t_hold_end = t_send_start + (int64_t)(o_duration * 1e9);
                } else {
                    phase = P_SEND;
                    t_send_end = t_send_start + (int64_t)(o_duration * 1e9);
                }
            } else if (t_warm_end < deadline) deadline = t_warm_end;
            break;
        case P_SEND: {
            if (o_storm_after > 0 && t_storm < 0 && t >= t_send_start + (int64_t)(o_storm_after * 1e9)) storm_drop();
            uint64_t due = (uint64_t)((double)(t - t_send_start) / ns_per_msg) + 1;
            if (due > nmsgs_cap) due = nmsgs_cap;
            while (nsent < due && t < t_send_end) send_msg(t_send_start + (int64_t)((double)nsent * ns_per_msg));
            if (t >= t_send_end) {
                g_cpu_send_end = self_cpu();
                phase = P_DRAIN;
                t_drain_deadline = t + (int64_t)(o_drain * 1e9);
                break;
            }
            int64_t nd = t_send_start + (int64_t)((double)nsent * ns_per_msg);
            if (nd < deadline) deadline = nd;
            if (t_send_end < deadline) deadline = t_send_end;
            break;
        }
        case P_DRAIN:
            if ((delivered >= expected && storm_complete + storm_incomplete + storm_failed >= storm_members) ||
                t >= t_drain_deadline) { t_done = t; phase = P_DONE; }
            else if (t_drain_deadline < deadline) deadline = t_drain_deadline;
            break;
        case P_HOLD:
            if (o_observe && t >= t_hold_end) { t_done = t; phase = P_DONE; break; }
            if (t >= t_hold_end) {
                s_hold = srv_sample();
                char l[128];
                int n = frame(l, sizeof l, "~LP 1", 0);
                if (conns[syncer].state != C_OPEN) { phase = P_DONE; break; }
                probe_expected = n_synced_alive - (conns[syncer].synced ? 1 : 0);
                t_probe_sent = now_ns();
                conn_write(syncer, l, (uint32_t)n);
                t_probe_deadline = t_probe_sent + (int64_t)(o_drain * 1e9);
                phase = P_PROBE;
            } else if (t_hold_end < deadline) deadline = t_hold_end;
            break;
        case P_PROBE:
            if (probe_got >= probe_expected || t >= t_probe_deadline) { t_done = t; phase = P_DONE; }
            else if (t_probe_deadline < deadline) deadline = t_probe_deadline;
            break;
        }
        if (phase == P_DONE) break;
        if (phase != phase_before) continue; /* run the new phase's actions now */
        if (t_storm >= 0 && t >= t_next_timeout_scan) {
            for (int i = 0; i < o_clients; i++)
                if (conns[i].stormed && conns[i].state == C_CONNECTING &&
                    t - conns[i].t_start > (int64_t)(o_connect_timeout * 1e9))
                    conn_close(i, 0);
            t_next_timeout_scan = t + 100000000;
        }

        int64_t wait = deadline - now_ns();
        if (wait < 0) wait = 0;
        struct timespec to = {.tv_sec = wait / 1000000000LL, .tv_nsec = wait % 1000000000LL};
        int n = epoll_pwait2(ep, evs, MAXEV, &to, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_pwait2");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int idx = (int)evs[i].data.u32;
            conn_t *c = &conns[idx];
            uint32_t e = evs[i].events;
            if (c->state == C_CONNECTING) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err || (e & (EPOLLERR | EPOLLHUP))) { conn_close(idx, 0); continue; }
                c->state = C_OPEN;
                n_open++;
                ep_mod(c, idx, EPOLLIN | EPOLLET);
                if (c->stormed) { /* back after the storm: resume, nothing else */
                    storm_connected++;
                    storm_resume(idx);
                    if (!(e & EPOLLIN)) continue;
                } else {
                    n_connected++;
                    if (o_irc) irc_nick(idx); /* after ep_mod: a short write re-arms EPOLLOUT */
                    else if (o_ws) ws_upgrade(idx);
                    else {
                        n_ready++;
                        enter(idx);
                    }
                }
                if (!(e & EPOLLIN)) continue;
            }
            if (c->state != C_OPEN) continue;
            if (e & EPOLLOUT) conn_flush(idx);
            if (c->state == C_OPEN && (e & (EPOLLIN | EPOLLERR | EPOLLHUP))) conn_read(idx);
            /* keep the send schedule while a large batch of reads is processed */
            if (phase == P_SEND && (i & 31) == 31) {
                int64_t t2 = now_ns();
                if (t2 < t_send_end) {
                    uint64_t due = (uint64_t)((double)(t2 - t_send_start) / ns_per_msg) + 1;
                    if (due > nmsgs_cap) due = nmsgs_cap;
                    while (nsent < due) send_msg(t_send_start + (int64_t)((double)nsent * ns_per_msg));
                }
            }
        }
    }

    s_end = srv_sample();
    g_cpu_end = self_cpu();
    double g_wait_end = runq_wait_s(0);
    c_end = cpu_sample();
    if (!t_done) t_done = now_ns();
    if (g_cpu_send_end == 0) g_cpu_send_end = g_cpu_end;
    for (int i = 0; i < o_clients; i++) {
        if (conns[i].state == C_OPEN) unwritten_at_end += conns[i].out_len - conns[i].out_off;
    }
    uint64_t msgs_with_loss = 0;
    for (uint64_t g = 0; g < nsent; g++)
        if (msgs[g].ts >= 0 && msgs[g].got < msgs[g].expected) msgs_with_loss++;

    double send_window = o_idle ? 0 : (double)(t_send_end - t_send_start) / 1e9;
    double window = (double)(t_done - t_send_start) / 1e9; /* send + drain */
    double dwin = t_last_delivery > t_send_start ? (double)(t_last_delivery - t_send_start) / 1e9 : 0;
    uint64_t lost = expected > delivered ? expected - delivered : 0;
    double srv_cpu_win = s_end.cpu_s - s_send.cpu_s;

    printf("{\"tool\":\"chatload\",\"label\":\"%s\",\"mode\":\"%s\",", o_label, o_observe ? "observe" : o_idle ? "idle" : "fanout");
    printf("\"clients\":%d,\"senders\":%d,\"rate\":%.3f,\"duration\":%.3f,\"size\":%d,\"ports\":%d,",
           o_clients, S, o_rate, o_duration, o_size, o_nports);
    printf("\"protocol\":\"%s\",\"join_failed\":%" PRIu64 ",\"irc_errors\":%" PRIu64 ",",
           o_irc ? "irc" : o_ws ? "ws" : "raw", n_join_failed, irc_errors);
    printf("\"ws_frames\":%" PRIu64 ",\"ws_pings\":%" PRIu64 ",\"ws_closes\":%" PRIu64 ",", ws_frames, ws_pings,
           ws_closes);
    printf("\"connected\":%" PRIu64 ",\"connect_failed\":%" PRIu64 ",\"ramp_s\":%.3f,\"open_at_end\":%" PRIu64 ",",
           n_connected, n_connect_failed, t_ramp_end > 0 ? (double)(t_ramp_end - t_begin) / 1e9 : -1.0, n_open);
    printf("\"sync_ok\":%s,\"sync_s\":%.3f,\"sync_rounds\":%d,\"joined\":%" PRIu64 ",", sync_ok ? "true" : "false",
           t_ramp_end > 0 && t_sync_end > 0 ? (double)(t_sync_end - t_ramp_end) / 1e9 : -1.0, sync_rounds, n_synced_alive);
    printf("\"sent\":%" PRIu64 ",\"send_skipped\":%" PRIu64 ",\"achieved_send_rate\":%.1f,", nsent, send_skipped,
           send_window > 0 ? (double)(nsent - send_skipped) / send_window : 0.0);
    printf("\"send_lag_max_us\":%.1f,\"send_lag_mean_us\":%.1f,", send_lag_max / 1e3,
           nsent ? send_lag_sum / (double)nsent / 1e3 : 0.0);
    printf("\"send_backlog_events\":%" PRIu64 ",\"max_outbuf_bytes\":%" PRIu64 ",\"unwritten_at_end\":%" PRIu64 ",",
           send_backlog_events, max_outbuf, unwritten_at_end);
    printf("\"expected\":%" PRIu64 ",\"delivered\":%" PRIu64 ",\"lost\":%" PRIu64 ",\"loss_ratio\":%.6g,"
           "\"msgs_with_loss\":%" PRIu64 ",",
           expected, delivered, lost, expected ? (double)lost / (double)expected : 0.0, msgs_with_loss);
    printf("\"malformed\":%" PRIu64 ",\"merged_lines\":%" PRIu64 ",\"ignored_lines\":%" PRIu64 ",\"overlong_lines\":%" PRIu64
           ",\"self_echo\":%" PRIu64 ",\"unexpected\":%" PRIu64 ",\"duplicates\":%" PRIu64 ",\"out_of_order\":%" PRId64 ",",
           malformed, merged_lines, ignored_lines, overlong, self_echo, unexpected, duplicates,
           last_seq ? (int64_t)out_of_order : (int64_t)-1);
    printf("\"ids\":%s,\"ids_seen\":%" PRIu64 ",\"id_missing\":%" PRIu64 ",\"id_errors\":%" PRIu64
           ",\"id_mismatch\":%" PRIu64 ",", o_ids ? "true" : "false", ids_seen, id_missing, id_errors, id_mismatch);
    if (o_storm_after > 0) {
        int64_t *backs = malloc(sizeof(int64_t) * (storm_members + 1));
        uint64_t nb = 0;
        for (int i = 0; i < o_clients; i++)
            if (conns[i].stormed && conns[i].t_back > 0) backs[nb++] = conns[i].t_back - t_storm;
        qsort(backs, nb, sizeof *backs, cmp_i64);
        printf("\"storm_members\":%" PRIu64 ",\"storm_connected\":%" PRIu64 ",\"storm_connect_failed\":%" PRIu64
               ",\"storm_complete\":%" PRIu64 ",\"storm_incomplete\":%" PRIu64 ",\"storm_no_id\":%" PRIu64
               ",\"storm_replayed_lines\":%" PRIu64 ",\"storm_back\":%" PRIu64 ",",
               storm_members, storm_connected, storm_failed, storm_complete, storm_incomplete, storm_no_id,
               storm_replayed, nb);
        printf("\"storm_all_back_s\":%.3f,\"storm_p50_s\":%.3f,\"storm_p99_s\":%.3f,",
               nb == storm_members && nb ? backs[nb - 1] / 1e9 : -1.0, nb ? backs[nb / 2] / 1e9 : -1.0,
               nb ? backs[(size_t)((double)(nb - 1) * 0.99)] / 1e9 : -1.0);
        free(backs);
    }
    printf("\"disconnects_by_server\":%" PRIu64 ",\"first_disconnect_s\":%.3f,", n_disconnects,
           t_first_disconnect >= 0 ? (double)(t_first_disconnect - t_begin) / 1e9 : -1.0);
    printf("\"t_send_start_mono_s\":%.6f,\"t_send_end_mono_s\":%.6f,", t_send_start / 1e9,
           (t_send_end ? t_send_end : t_send_start) / 1e9);
    printf("\"deliveries_per_s\":%.1f,\"delivery_window_s\":%.3f,\"window_s\":%.3f,", dwin > 0 ? (double)delivered / dwin : 0.0,
           dwin, window);
    printf("\"latency_ms\":{\"n\":%" PRIu64 ",\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f},",
           hist_n, hist_n ? lat_sum_us / (double)hist_n / 1e3 : -1.0, hpct(0.50) / 1e3, hpct(0.90) / 1e3, hpct(0.99) / 1e3,
           hpct(0.999) / 1e3, lat_max_ns / 1e6);
    if (o_idle)
        printf("\"probe_expected\":%" PRIu64 ",\"probe_delivered\":%" PRIu64 ",\"probe_last_ms\":%.3f,"
               "\"server_rss_kb_hold\":%ld,",
               probe_expected, probe_got, t_probe_last > 0 ? (double)(t_probe_last - t_probe_sent) / 1e6 : -1.0,
               s_hold.rss_kb);
    if (o_npids)
        printf("\"server_alive_end\":%s,\"server_rss_kb_start\":%ld,\"server_rss_kb_send_start\":%ld,"
               "\"server_rss_kb_end\":%ld,\"server_rss_kb_max_sampled\":%ld,\"server_hwm_kb_end\":%ld,"
               "\"server_cpu_s_window\":%.3f,\"server_user_s_window\":%.3f,\"server_cpu_util_window\":%.4f,"
               "\"server_cpu_us_per_delivery\":%.4f,",
               s_end.alive ? "true" : "false", s_start.rss_kb, s_send.rss_kb, s_end.rss_kb, rss_max_sampled, s_end.hwm_kb,
               srv_cpu_win, s_end.user_s - s_send.user_s, window > 0 ? srv_cpu_win / window : 0.0,
               delivered ? srv_cpu_win * 1e6 / (double)delivered : -1.0);
    printf("\"cpu_busy_s_window\":[%.3f,%.3f],\"steal_s_window\":%.3f,", c_end.busy[0] - c_send.busy[0],
           c_end.busy[1] - c_send.busy[1], c_end.steal - c_send.steal);
    printf("\"reads_window\":%" PRIu64 ",\"bytes_per_read\":%.1f,\"load_lines_per_read\":%.2f,", n_reads_window,
           n_reads_window ? (double)bytes_read_window / (double)n_reads_window : 0.0,
           n_reads_window ? (double)load_lines_window / (double)n_reads_window : 0.0);
    printf("\"server_runq_wait_s_window\":%.4f,\"loadgen_runq_wait_s_window\":%.4f,",
           o_npids ? s_end.wait_s - s_send.wait_s : 0.0, g_wait_end - g_wait_send);
    printf("\"loadgen_cpu_s\":%.3f,\"loadgen_cpu_util_send\":%.4f,\"loadgen_cpu_util_window\":%.4f}\n",
           g_cpu_end - g_cpu_start, send_window > 0 ? (g_cpu_send_end - g_cpu_send) / send_window : 0.0,
           window > 0 ? (g_cpu_end - g_cpu_send) / window : 0.0);
    fflush(stdout);
    for (int i = 0; i < o_clients; i++) conn_close(i, 0);
    return 0;
}
