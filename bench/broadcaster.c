/*
 * broadcaster: the machine's limit in the chat-svc benchmark.
 *
 * The least a line-relaying chat server can do, in C: one thread, one epoll loop,
 * every complete line a member sends copied once into every other member's outbound
 * buffer, and the buffers written in passes, one write() per member per pass.
 *
 * Why passes: on loopback a write() costs a few microseconds whatever its size (the
 * kernel charges the receiver's TCP work to the writer), so capacity is lines per
 * write. A pass starts at once when the previous one began more than PASS_MS ago (a
 * quiet room pays no delay) and otherwise waits until then, so under load each write
 * carries everything sent in the last PASS_MS: at most PASS_MS of added latency for
 * a bounded number of writes per member per second, whatever the rate.
 *
 * No nicks, rooms, notices or flood control; a member whose buffer falls more than
 * OUT_MAX behind is dropped, as chat-svc drops a slow consumer. bench/ measures chat-svc
 * against it on the same core in the same run, so the report can say how close chat-svc
 * comes to what this machine can do.
 *
 *   broadcaster PORT [HOST [PASS_MS]]     SIGTERM or SIGINT: close everything, exit 0
 *
 * Built by bench/ with `gcc -O2`; no dependencies beyond libc.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXEV 1024
#define READ_MAX (64 * 1024)
#define LINE_MAX_BYTES 8192
#define OUT_MAX (4 * 1024 * 1024)
#define PASS_MS 10

typedef struct {
    int open, dirty, doomed, want_out, slot;
    char *out;
    size_t len, off, cap;
    char carry[LINE_MAX_BYTES];
    size_t carry_len;
} member_t;

static member_t *m;         /* indexed by fd */
static int *members, n_members; /* open member fds, unordered */
static int *dirty, n_dirty, *doomed, n_doomed;
static int ep;
static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void watch(int fd, int op, int out) {
    struct epoll_event e = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.fd = fd};
    epoll_ctl(ep, op, fd, &e);
}

static void drop(int fd) {
    member_t *c = &m[fd];
    if (!c->open) return;
    c->open = 0;
    close(fd); /* also leaves the epoll set */
    int last = members[--n_members];
    members[c->slot] = last;
    m[last].slot = c->slot;
    free(c->out);
    c->out = NULL;
    c->len = c->off = c->cap = c->carry_len = 0;
}

/* one write() of everything queued; the rest waits for EPOLLOUT */
static void flush(int fd) {
    member_t *c = &m[fd];
    if (!c->open || c->doomed || c->off == c->len) return;
    ssize_t w = write(fd, c->out + c->off, c->len - c->off);
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { drop(fd); return; }
    if (w > 0) c->off += (size_t)w;
    if (c->off == c->len) c->off = c->len = 0;
    int want_out = c->off < c->len;
    if (want_out != c->want_out) { watch(fd, EPOLL_CTL_MOD, want_out); c->want_out = want_out; }
}

static void queue(int fd, const char *p, size_t n) {
    member_t *c = &m[fd];
    if (c->doomed) return;
    if (c->len - c->off + n > OUT_MAX) { c->doomed = 1; doomed[n_doomed++] = fd; return; }
    if (c->off && c->len + n > c->cap) { /* reclaim the written prefix first */
        memmove(c->out, c->out + c->off, c->len - c->off);
        c->len -= c->off;
        c->off = 0;
    }
    if (c->len + n > c->cap) {
        size_t cap = c->cap ? c->cap : 16384;
        while (cap < c->len + n) cap *= 2;
        char *grown = realloc(c->out, cap);
        if (!grown) { c->doomed = 1; doomed[n_doomed++] = fd; return; }
        c->out = grown;
        c->cap = cap;
    }
    memcpy(c->out + c->len, p, n);
    c->len += n;
    if (!c->dirty) { c->dirty = 1; dirty[n_dirty++] = fd; }
}

/* complete lines go to every other member at once; a partial line waits in carry */
static void relay(int fd) {
    static char buf[LINE_MAX_BYTES + READ_MAX];
    member_t *c = &m[fd];
    size_t have = c->carry_len;
    memcpy(buf, c->carry, have);
    ssize_t r = read(fd, buf + have, READ_MAX);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) { drop(fd); return; }
    if (r < 0) return;
    have += (size_t)r;
    char *end = memrchr(buf, '\n', have);
    size_t lines = end ? (size_t)(end - buf) + 1 : 0;
    if (have - lines > LINE_MAX_BYTES) { drop(fd); return; } /* a line longer than any chat line */
    if (lines)
        for (int i = 0; i < n_members; i++)
            if (members[i] != fd) queue(members[i], buf, lines);
    c->carry_len = have - lines;
    memcpy(c->carry, buf + lines, c->carry_len);
}

static void admit(int lfd, int max_fd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        if (fd >= max_fd) { close(fd); continue; }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int listed = m[fd].dirty; /* a closed member's slot in dirty[] serves the new one */
        memset(&m[fd], 0, sizeof m[fd]);
        m[fd].dirty = listed;
        m[fd].open = 1;
        m[fd].slot = n_members;
        members[n_members++] = fd;
        watch(fd, EPOLL_CTL_ADD, 0);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: broadcaster PORT [HOST [PASS_MS]]\n"); return 2; }
    long long pass_ms = argc > 3 ? atoll(argv[3]) : PASS_MS, last_pass = -pass_ms;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
    int max_fd = (int)rl.rlim_cur;
    m = calloc((size_t)max_fd, sizeof *m);
    members = malloc(sizeof(int) * (size_t)max_fd);
    dirty = malloc(sizeof(int) * (size_t)max_fd);
    doomed = malloc(sizeof(int) * (size_t)max_fd);
    if (!m || !members || !dirty || !doomed) { perror("broadcaster: memory"); return 1; }

    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    if (inet_pton(AF_INET, argc > 2 ? argv[2] : "0.0.0.0", &a.sin_addr) != 1) {
        fprintf(stderr, "broadcaster: bad host %s\n", argv[2]);
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, SOMAXCONN) < 0) {
        perror("broadcaster: listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    watch(lfd, EPOLL_CTL_ADD, 0);

    struct epoll_event evs[MAXEV];
    while (!stopping) {
        int wait = -1; /* nothing queued: sleep until input */
        if (n_dirty) {
            long long due = last_pass + pass_ms - now_ms();
            wait = due > 0 ? (int)due : 0;
        }
        int n = epoll_wait(ep, evs, MAXEV, wait);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("broadcaster: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) { admit(lfd, max_fd); continue; }
            if (!m[fd].open) continue;
            if (evs[i].events & EPOLLOUT) flush(fd);
            if (m[fd].open && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) relay(fd);
        }
        if (n_dirty && now_ms() >= last_pass + pass_ms) {
            last_pass = now_ms();
            for (int i = 0; i < n_dirty; i++) {
                m[dirty[i]].dirty = 0;
                flush(dirty[i]);
            }
            n_dirty = 0;
        }
        for (int i = 0; i < n_doomed; i++)
            if (m[doomed[i]].doomed) drop(doomed[i]); /* not a newcomer on a reused descriptor */
        n_doomed = 0;
    }
    while (n_members) drop(members[0]);
    close(lfd);
    return 0;
}
