/* hiredis (Debian's libhiredis-dev) through the client-matrix scenario of
 * tests/test_clients.py. Build: gcc -O2 -o hiredis_client hiredis_client.c -lhiredis
 *
 * The synchronous API: each (P|S)SUBSCRIBE is one command whose reply is its confirmation,
 * then the pushes are read one reply at a time. A blocking read with a timeout would leave
 * the context unusable, so the reads wait on the socket with poll() first. hiredis has no
 * pub/sub reconnection: after a lost connection this program reconnects (redisReconnect)
 * and resubscribes itself. hiredis before 1.0 speaks RESP2 only.
 */
#include <hiredis/hiredis.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N 20

enum { MESSAGE, PMESSAGE, SMESSAGE, KINDS };
static const char *KIND[KINDS] = {"message", "pmessage", "smessage"};
static const char PREFIX[KINDS] = {'c', 'p', 's'};
static char ch[256], pat[256], px[256], sh[256];
static int got[KINDS], phase = 1;

static void say(const char *line) {
    printf("%s\n", line);
    fflush(stdout);
}

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static redisContext *connect_to(const char *addr) {
    char host[256];
    const char *colon = strrchr(addr, ':');
    if (!colon || colon - addr >= (int)sizeof host) fail("bad address %s", addr);
    snprintf(host, sizeof host, "%.*s", (int)(colon - addr), addr);
    redisContext *c = redisConnect(host, atoi(colon + 1));
    if (!c || c->err) fail("connect %s: %s", addr, c ? c->errstr : "out of memory");
    return c;
}

/* SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE, each answered by its confirmation; 0 on a lost connection. */
static int subscribe_all(redisContext *c) {
    const char *commands[3][2] = {{"SUBSCRIBE", ch}, {"PSUBSCRIBE", pat}, {"SSUBSCRIBE", sh}};
    for (int i = 0; i < 3; i++) {
        redisReply *r = redisCommand(c, "%s %s", commands[i][0], commands[i][1]);
        if (!r) return 0;
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 || strcasecmp(r->element[0]->str, commands[i][0]) ||
            strcmp(r->element[1]->str, commands[i][1]))
            fail("%s %s: unexpected confirmation", commands[i][0], commands[i][1]);
        freeReplyObject(r);
    }
    return 1;
}

/* Reads at most one reply within ms and checks it; returns 0 when the connection is lost. */
static int read_one(redisContext *c, int ms) {
    void *reply = NULL;
    if (redisGetReplyFromReader(c, &reply) != REDIS_OK) return 0;
    if (!reply) {
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        if (poll(&p, 1, ms) <= 0) return 1;
        if (redisBufferRead(c) != REDIS_OK || redisGetReplyFromReader(c, &reply) != REDIS_OK) return 0;
        if (!reply) return 1;
    }
    redisReply *r = reply;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 3) fail("unexpected reply type %d", r->type);
    int kind = 0;
    while (kind < KINDS && strcmp(r->element[0]->str, KIND[kind])) kind++;
    if (kind == KINDS) fail("unexpected %s", r->element[0]->str);
    const char *pattern = kind == PMESSAGE ? r->element[1]->str : NULL;
    const char *channel = r->element[kind == PMESSAGE ? 2 : 1]->str;
    const char *data = r->element[kind == PMESSAGE ? 3 : 2]->str;
    const char *want_ch = kind == MESSAGE ? ch : kind == PMESSAGE ? px : sh;
    if (strcmp(channel, want_ch) || (kind == PMESSAGE && strcmp(pattern, pat)))
        fail("%s on %s pattern %s, expected %s", KIND[kind], channel, pattern ? pattern : "-", want_ch);
    char expected[32];
    snprintf(expected, sizeof expected, "%c%d", PREFIX[kind], got[kind] + 1);
    if (phase == 1 ? strcmp(data, expected) : strncmp(data, "after", 5))
        fail("%s %s after %d of them, expected %s", KIND[kind], data, got[kind], phase == 1 ? expected : "after<k>");
    got[kind]++;
    freeReplyObject(r);
    return 1;
}

static int all_got(int n) {
    for (int k = 0; k < KINDS; k++)
        if (got[k] < n) return 0;
    return 1;
}

/* One round of publishes (c<i>, p<i>, s<i>, or after<i> in phase 2); each reply checked
 * in phase 1. Returns 0 when the connection is lost. */
static int publish_round(redisContext *pub, int i) {
    const char *commands[3][2] = {{"PUBLISH", ch}, {"PUBLISH", px}, {"SPUBLISH", sh}};
    for (int k = 0; k < KINDS; k++) {
        char payload[32];
        if (phase == 1)
            snprintf(payload, sizeof payload, "%c%d", PREFIX[k], i);
        else
            snprintf(payload, sizeof payload, "after%d", i);
        redisReply *r = redisCommand(pub, "%s %s %s", commands[k][0], commands[k][1], payload);
        if (!r) return 0;
        if (phase == 1 && (r->type != REDIS_REPLY_INTEGER || r->integer < 1))
            fail("%s %s %s answered type %d, %lld", commands[k][0], commands[k][1], payload, r->type, r->integer);
        freeReplyObject(r);
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 5 || (argc == 5 && strcmp(argv[4], "resp2")))
        fail("usage: <sub host:port> <pub host:port> <tag> [resp2] (hiredis 0.14 speaks RESP2 only)");
    const char *tag = argv[3];
    snprintf(ch, sizeof ch, "t.%s.ch", tag);
    snprintf(pat, sizeof pat, "t.%s.p*", tag);
    snprintf(px, sizeof px, "t.%s.px", tag);
    snprintf(sh, sizeof sh, "{t%s}sh", tag);

    redisContext *sub = connect_to(argv[1]), *pub = connect_to(argv[2]);
    redisContext *both[2] = {sub, pub};
    for (int i = 0; i < 2; i++) {
        redisReply *r = redisCommand(both[i], "PING");
        if (!r || r->type != REDIS_REPLY_STATUS || strcmp(r->str, "PONG")) fail("PING");
        freeReplyObject(r);
    }
    if (!subscribe_all(sub)) fail("subscribe: %s", sub->errstr);

    for (int i = 1; i <= N; i++)
        if (!publish_round(pub, i)) fail("publish: %s", pub->errstr);
    double deadline = now() + 10;
    while (!all_got(N)) {
        if (now() > deadline) fail("phase 1 timed out, got %d %d %d", got[0], got[1], got[2]);
        if (!read_one(sub, 100)) fail("subscriber: %s", sub->errstr);
    }

    say("PHASE1 OK");
    say("KILL");
    char line[16];
    if (!fgets(line, sizeof line, stdin) || strcmp(line, "go\n")) fail("expected `go` on stdin");
    phase = 2;
    memset(got, 0, sizeof got);
    deadline = now() + 30;
    double next_round = 0;
    int reconnected = 0;
    for (int k = 1; !all_got(1);) {
        if (now() > deadline) fail("phase 2 timed out, got %d %d %d", got[0], got[1], got[2]);
        if (now() >= next_round) {
            next_round = now() + 0.1;
            if (!publish_round(pub, k++)) redisReconnect(pub); /* the next round retries */
        }
        if (!read_one(sub, 50)) {
            if (redisReconnect(sub) == REDIS_OK && subscribe_all(sub))
                reconnected = 1;
            else
                usleep(100000); /* still restarting */
        }
    }
    if (!reconnected) fail("the subscriber never lost its connection");
    say("RECONNECT app");
    say("PHASE2 OK");
    redisFree(sub);
    redisFree(pub);
    return 0;
}
