/* sse_loadgen: N Server-Sent Events connections in one epoll loop, for infra/bench/nchan.py.
 *
 * Built by nchan.py at run time (gcc -O2 into a temp dir); nothing compiled is committed.
 * The same binary reads the broker's api and nginx + nchan, so neither side gets a faster
 * client than the other.
 *
 *   sse_loadgen --port P --path /sub/x --clients N --expect 200 --done 'event: done'
 *               [--host 127.0.0.1] [--last-event-id ID] [--match 'event: token']
 *               [--ts-key '"t":'] [--ts-base-ms MS] [--timeout S] [--concurrency 64]
 *               [--out FILE]
 *
 * Each client sends one HTTP/1.1 GET (Accept: text/event-stream, and Last-Event-ID when
 * given), reads the response head (status 200 expected; chunked or plain body), undoes the
 * chunked encoding and splits the body into SSE event blocks (ended by a blank line).
 *
 * - A block containing --match (default: every block with a data: line) is *counted*: its
 *   latency is the receive time (CLOCK_REALTIME, taken once per read(), in ms) minus
 *   (--ts-base-ms + the number after --ts-key in the block). The producer stamps that
 *   number just before handing the event to the system under test.
 * - A block containing --done is the terminal event: the client then closes its socket.
 * - A client is complete when its status was 200, it saw the terminal event, and it counted
 *   exactly --expect events.
 *
 * stdout, one line each, flushed:
 *   connected <ok> <failed> <seconds> <cpu_seconds>   once every client has its response head
 *                                                     (or failed)
 *   {"clients":..., ...}                               the summary (JSON) at the end
 * --out FILE: per client a little-endian uint32 count, then that many float32 latencies (ms)
 * in receive order (all counts first, then the latencies, client by client).
 *
 * The process ends when every client is done (terminal, error or closed by the server), or
 * at --timeout seconds after it was connected, or when stdin reaches EOF (its parent died).
 */
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
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { IDLE, CONNECTING, HEAD, BODY, DONE };
enum chunk_state { CH_SIZE, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF, CH_END };

struct client {
    int fd;
    enum state state;
    int status;
    int chunked;
    enum chunk_state ch;
    size_t chunk_left;
    size_t sent;         /* request bytes written */
    char *buf;           /* response head, then the decoded body not yet split into events */
    size_t len, cap;
    float *lat;          /* latencies of the counted events, ms */
    uint32_t nlat, latcap;
    uint32_t events;     /* blocks with a data: line */
    int terminal;
    int failed;          /* connect or read error, or status != 200 */
    int resolved;        /* response head received, or failed */
};

static const char *host = "127.0.0.1", *path = "/", *last_event_id = NULL;
static const char *match = NULL, *done_marker = NULL, *ts_key = "\"ts\":", *out_path = NULL;
static int port = 0, nclients = 1, concurrency = 64;
static long expect = -1;
static double ts_base_ms = 0, timeout_s = 120;
static char request[2048];
static size_t request_len;
static struct client *clients;
static int epfd;
static long reads, bytes_in;
static double first_receipt, last_receipt;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void append(struct client *c, const char *data, size_t n) {
    if (c->len + n + 1 > c->cap) {
        size_t cap = c->cap ? c->cap : 1024;
        while (c->len + n + 1 > cap) cap *= 2;
        c->buf = realloc(c->buf, cap);
        if (!c->buf) die("realloc");
        c->cap = cap;
    }
    memcpy(c->buf + c->len, data, n);
    c->len += n;
    c->buf[c->len] = 0;
}

static int open_left; /* clients not yet DONE */
static int resolved_count, connecting_now, next_to_start;

static void finish(struct client *c, int failed) {
    if (c->state == DONE) return;
    if (c->state == CONNECTING) connecting_now--;
    if (!c->resolved) {
        c->resolved = 1;
        resolved_count++;
    }
    if (failed) c->failed = 1;
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    c->state = DONE;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
    open_left--;
}

static void start(struct client *c) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = CONNECTING;
    connecting_now++;
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        finish(c, 1);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
}

static void start_more(void) {
    while (connecting_now < concurrency && next_to_start < nclients) start(&clients[next_to_start++]);
}

/* One complete event block (NUL-terminated, without its blank line). */
static void on_block(struct client *c, char *block, double t) {
    if (!strstr(block, "data:")) return; /* a comment (": ping") or a retry: line */
    c->events++;
    if (done_marker && strstr(block, done_marker)) {
        c->terminal = 1;
        return;
    }
    if (match && !strstr(block, match)) return;
    char *at = strstr(block, ts_key);
    double latency = -1e9; /* no stamp: recorded as a huge negative, reported as a problem */
    if (at) latency = t - (ts_base_ms + strtod(at + strlen(ts_key), NULL));
    if (c->nlat == c->latcap) {
        c->latcap = c->latcap ? 2 * c->latcap : 256;
        c->lat = realloc(c->lat, c->latcap * sizeof *c->lat);
        if (!c->lat) die("realloc");
    }
    c->lat[c->nlat++] = (float)latency;
}

/* Splits the decoded body into blocks; what is left is an incomplete block. */
static void split(struct client *c, double t) {
    char *p = c->buf, *end = c->buf + c->len;
    for (;;) {
        char *sep = memmem(p, end - p, "\n\n", 2);
        if (!sep) break;
        *sep = 0;
        on_block(c, p, t);
        p = sep + 2;
        if (c->terminal) break;
    }
    c->len = end - p;
    memmove(c->buf, p, c->len);
    c->buf[c->len] = 0;
}

/* Undoes the chunked transfer encoding of `n` bytes into the client's body buffer. */
static void dechunk(struct client *c, const char *d, size_t n) {
    size_t i = 0;
    while (i < n && c->ch != CH_END) {
        char x = d[i];
        switch (c->ch) {
        case CH_SIZE:
            if (x >= '0' && x <= '9') c->chunk_left = c->chunk_left * 16 + (x - '0');
            else if ((x | 32) >= 'a' && (x | 32) <= 'f') c->chunk_left = c->chunk_left * 16 + ((x | 32) - 'a' + 10);
            else if (x == '\r') c->ch = CH_SIZE_LF;
            else c->ch = CH_EXT; /* ;extension */
            i++;
            break;
        case CH_EXT:
            if (x == '\r') c->ch = CH_SIZE_LF;
            i++;
            break;
        case CH_SIZE_LF:
            i++;
            c->ch = c->chunk_left ? CH_DATA : CH_END;
            break;
        case CH_DATA: {
            size_t take = n - i < c->chunk_left ? n - i : c->chunk_left;
            append(c, d + i, take);
            i += take;
            c->chunk_left -= take;
            if (!c->chunk_left) c->ch = CH_DATA_CR;
            break;
        }
        case CH_DATA_CR:
            c->ch = CH_DATA_LF;
            i++;
            break;
        case CH_DATA_LF:
            c->ch = CH_SIZE;
            i++;
            break;
        case CH_END:
            break;
        }
    }
}

static void on_head(struct client *c) {
    char *end = strstr(c->buf, "\r\n\r\n");
    if (!end) return;
    size_t head_len = end + 4 - c->buf;
    c->status = c->len > 12 ? atoi(c->buf + 9) : 0;
    *end = 0;
    c->chunked = strcasestr(c->buf, "\ntransfer-encoding: chunked") != NULL;
    c->resolved = 1;
    resolved_count++;
    if (c->status != 200) {
        finish(c, 1);
        return;
    }
    c->state = BODY;
    size_t rest = c->len - head_len;
    char *tmp = malloc(rest + 1);
    memcpy(tmp, c->buf + head_len, rest);
    c->len = 0;
    if (c->chunked) dechunk(c, tmp, rest);
    else append(c, tmp, rest);
    free(tmp);
}

static char rbuf[256 * 1024];

static void readable(struct client *c) {
    for (;;) {
        ssize_t n = read(c->fd, rbuf, sizeof rbuf);
        if (n < 0) {
            if (errno == EAGAIN) return;
            finish(c, 1);
            return;
        }
        if (n == 0) { /* the server ended the response */
            finish(c, !c->terminal);
            return;
        }
        double t = now_ms();
        reads++;
        bytes_in += n;
        if (!first_receipt) first_receipt = t;
        last_receipt = t;
        if (c->state == HEAD) {
            append(c, rbuf, n);
            on_head(c);
            if (c->state != BODY) return;
        } else if (c->chunked) {
            dechunk(c, rbuf, n);
        } else {
            append(c, rbuf, n);
        }
        split(c, t);
        if (c->terminal || c->ch == CH_END) {
            finish(c, !c->terminal);
            return;
        }
        /* epoll is level-triggered: a short read emptied the socket, and a read more would
         * only say EAGAIN (a syscall per event, when events come one at a time) */
        if ((size_t)n < sizeof rbuf) return;
    }
}

static void writable(struct client *c) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            finish(c, 1);
            return;
        }
        connecting_now--;
        c->state = HEAD;
    }
    ssize_t n = write(c->fd, request + c->sent, request_len - c->sent);
    if (n < 0) {
        if (errno != EAGAIN) finish(c, 1);
        return;
    }
    c->sent += n;
    if (c->sent == request_len) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

static void usage(void) {
    fprintf(stderr, "usage: sse_loadgen --port P --path PATH --clients N [options]; see the source\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--path")) path = v;
        else if (!strcmp(a, "--clients")) nclients = atoi(v);
        else if (!strcmp(a, "--expect")) expect = atol(v);
        else if (!strcmp(a, "--done")) done_marker = v;
        else if (!strcmp(a, "--match")) match = v;
        else if (!strcmp(a, "--ts-key")) ts_key = v;
        else if (!strcmp(a, "--ts-base-ms")) ts_base_ms = atof(v);
        else if (!strcmp(a, "--last-event-id")) last_event_id = v;
        else if (!strcmp(a, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(a, "--concurrency")) concurrency = atoi(v);
        else if (!strcmp(a, "--out")) out_path = v;
        else usage();
    }
    if (!port || nclients < 1 || concurrency < 1) usage();
}

static void write_latencies(void) {
    FILE *f = fopen(out_path, "wb");
    if (!f) die(out_path);
    for (int i = 0; i < nclients; i++) fwrite(&clients[i].nlat, 4, 1, f);
    for (int i = 0; i < nclients; i++) fwrite(clients[i].lat, 4, clients[i].nlat, f);
    fclose(f);
}

static void summary(double cpu_connected, double cpu_end) {
    long events = 0, counted = 0, complete = 0, failed = 0, no_terminal = 0, wrong_count = 0;
    long no_stamp = 0;
    for (int i = 0; i < nclients; i++) {
        struct client *c = &clients[i];
        events += c->events;
        counted += c->nlat;
        for (uint32_t k = 0; k < c->nlat; k++) no_stamp += c->lat[k] < -1e8;
        if (c->failed || c->status != 200) failed++;
        else if (!c->terminal) no_terminal++;
        else if (expect >= 0 && c->nlat != expect) wrong_count++;
        else complete++;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"clients\": %d, \"complete\": %ld, \"failed\": %ld, \"no_terminal\": %ld, "
           "\"wrong_count\": %ld, \"no_stamp\": %ld, \"events\": %ld, \"counted\": %ld, "
           "\"reads\": %ld, \"bytes\": %ld, \"first_receipt_ms\": %.3f, \"last_receipt_ms\": %.3f, "
           "\"cpu_connected\": %.4f, \"cpu_end\": %.4f, \"max_rss_kb\": %ld}\n",
           nclients, complete, failed, no_terminal, wrong_count, no_stamp, events, counted, reads,
           bytes_in, first_receipt, last_receipt, cpu_connected, cpu_end, ru.ru_maxrss);
    fflush(stdout);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    request_len = snprintf(request, sizeof request,
                           "GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n"
                           "Cache-Control: no-cache\r\n%s%s%s\r\n",
                           path, host, port, last_event_id ? "Last-Event-ID: " : "",
                           last_event_id ? last_event_id : "", last_event_id ? "\r\n" : "");
    if (request_len >= sizeof request) usage();
    clients = calloc(nclients, sizeof *clients);
    for (int i = 0; i < nclients; i++) clients[i].fd = -1;
    open_left = nclients;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    /* stdin: EOF when the parent goes, so this process never outlives the benchmark */
    struct epoll_event sin = {.events = EPOLLIN, .data.ptr = NULL};
    int watch_stdin = epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &sin) == 0;

    double t0 = mono_s(), connected_at = 0, cpu_connected = 0;
    int announced = 0;
    struct epoll_event evs[512];
    start_more();
    while (open_left > 0) {
        if (!announced && resolved_count == nclients) {
            announced = 1;
            connected_at = mono_s();
            cpu_connected = cpu_s();
            int ok = 0;
            for (int i = 0; i < nclients; i++) ok += clients[i].status == 200 && !clients[i].failed;
            printf("connected %d %d %.3f %.4f\n", ok, nclients - ok, connected_at - t0, cpu_connected);
            fflush(stdout);
        }
        double now = mono_s();
        double deadline = announced ? connected_at + timeout_s : t0 + 30 + nclients / 50.0;
        if (now >= deadline) break;
        int wait_ms = (int)((deadline - now) * 1000) + 1;
        int n = epoll_wait(epfd, evs, 512, wait_ms > 1000 ? 1000 : wait_ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct client *c = evs[i].data.ptr;
            if (!c) {
                char junk[64];
                if (read(0, junk, sizeof junk) <= 0) {
                    if (watch_stdin) exit(3);
                }
                continue;
            }
            if (c->state == DONE) continue;
            if (c->state == CONNECTING || (evs[i].events & EPOLLOUT)) writable(c);
            else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(c);
        }
        start_more();
    }
    if (!announced) {
        printf("connected -1 %d %.3f %.4f\n", nclients, mono_s() - t0, cpu_s());
        fflush(stdout);
    }
    double cpu_end = cpu_s();
    if (out_path) write_latencies();
    summary(cpu_connected, cpu_end);
    return 0;
}
