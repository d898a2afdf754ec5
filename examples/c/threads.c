/*
 * threads.c: one imrelay client handle used from two threads at once, as an app with a
 * network thread and a UI thread uses it, against an echo peer.
 *
 *   threads <relay host:port> <count>
 *
 * User 1 has ONE handle and two threads on it: a polling thread that blocks in
 * imrelay_poll_event (3 s timeout) and takes every event, and a sending thread that sends
 * <count> messages "msg <i>" to user 2 as fast as the outbox takes them, then, once
 * everything is accounted for, calls imrelay_shutdown on the handle while the polling
 * thread is blocked in it. User 2 (a second handle) takes the callback style: a listener
 * (imrelay_start_listener) that the library calls on its own network thread echoes every
 * message back from inside the callback; imrelay_close waits for its last call (CLOSED).
 *
 * Prints the counts and exits 0 only if every send got exactly one DELIVERED (no FAILED)
 * and every echo came back exactly once; 1 otherwise, 2 on bad usage.
 * Build: cc examples/c/threads.c -Iinclude target/debug/libimrelay.a -lpthread -ldl -lm
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imrelay.h"

enum { USER_A = 1, USER_B = 2, POLL_MS = 3000, STALL_POLLS = 10, PAYLOAD_MAX = 32 };

/* User 1's bookkeeping, shared by its two threads under `lock`. */
typedef struct {
    ImrelayClient *client;
    int count;
    pthread_mutex_t lock;
    pthread_cond_t changed; /* an answer or an echo came, or the poller gave up */
    int sent;               /* sends accepted by the library */
    int send_errors;        /* sends refused other than OUTBOX_FULL */
    uint64_t *sent_ids;     /* [count], written by the sender only */
    uint64_t *answer_ids;   /* [count], DELIVERED/FAILED ids in arrival order */
    int answers, delivered, failed, extra_answers;
    int *echoes;            /* [count]: how many times echo i came back */
    int echoes_once, echo_duplicates, echo_garbage;
    int stalled;            /* STALL_POLLS polls in a row timed out */
    int closed;             /* the poller saw CLOSED */
} Side;

static void print_last_error(const char *what) {
    char message[256];
    imrelay_last_error_message(message, sizeof message);
    fprintf(stderr, "%s failed: %d %s\n", what, imrelay_last_error_code(), message);
}

/* The index i of a "msg <i>" payload, or -1. */
static int parse_index(const uint8_t *data, size_t len, int count) {
    char text[PAYLOAD_MAX];
    if (data == NULL || len < 5 || len >= sizeof text) {
        return -1;
    }
    memcpy(text, data, len);
    text[len] = '\0';
    if (strncmp(text, "msg ", 4) != 0) {
        return -1;
    }
    char *end = NULL;
    long i = strtol(text + 4, &end, 10);
    if (*end != '\0' || i < 0 || i >= count) {
        return -1;
    }
    return (int)i;
}

static int all_accounted(const Side *s) {
    return s->answers + s->extra_answers >= s->sent && s->echoes_once >= s->delivered;
}

/* User 1's sending thread. */
static void *send_all(void *arg) {
    Side *s = arg;
    for (int i = 0; i < s->count; i++) {
        char text[PAYLOAD_MAX];
        int len = snprintf(text, sizeof text, "msg %d", i);
        for (;;) {
            pthread_mutex_lock(&s->lock);
            int answers_before = s->answers;
            int stalled = s->stalled;
            pthread_mutex_unlock(&s->lock);
            if (stalled) {
                goto done;
            }
            uint64_t id = 0;
            int rc = imrelay_send(s->client, USER_B, (const uint8_t *)text, (size_t)len, &id);
            if (rc == IMRELAY_OK) {
                s->sent_ids[i] = id;
                pthread_mutex_lock(&s->lock);
                s->sent++;
                pthread_mutex_unlock(&s->lock);
                break;
            }
            if (rc != IMRELAY_ERR_OUTBOX_FULL) {
                print_last_error("send");
                pthread_mutex_lock(&s->lock);
                s->send_errors++;
                pthread_mutex_unlock(&s->lock);
                goto done;
            }
            /* The outbox is full: wait until the polling thread sees an answer. */
            pthread_mutex_lock(&s->lock);
            while (s->answers == answers_before && !s->stalled) {
                pthread_cond_wait(&s->changed, &s->lock);
            }
            pthread_mutex_unlock(&s->lock);
        }
    }
done:
    /* Every send answered and every delivered message echoed (or the poller gave up). */
    pthread_mutex_lock(&s->lock);
    while (!all_accounted(s) && !s->stalled) {
        pthread_cond_wait(&s->changed, &s->lock);
    }
    pthread_mutex_unlock(&s->lock);
    /* From this thread, while the polling thread is (most likely) blocked in poll. */
    if (imrelay_shutdown(s->client) != IMRELAY_OK) {
        print_last_error("shutdown");
    }
    return NULL;
}

static void record_answer(Side *s, const ImrelayEvent *event, int failed) {
    pthread_mutex_lock(&s->lock);
    if (s->answers < s->count) {
        s->answer_ids[s->answers++] = event->msg_id;
    } else {
        s->extra_answers++;
    }
    if (failed) {
        s->failed++;
    } else {
        s->delivered++;
    }
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->lock);
}

static void record_echo(Side *s, const ImrelayEvent *event) {
    int i = event->peer == USER_B ? parse_index(event->data, event->len, s->count) : -1;
    pthread_mutex_lock(&s->lock);
    if (i < 0) {
        s->echo_garbage++;
    } else if (++s->echoes[i] == 1) {
        s->echoes_once++;
    } else {
        s->echo_duplicates++;
    }
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->lock);
}

/* User 1's polling thread: every event of the handle, until CLOSED. */
static void *poll_all(void *arg) {
    Side *s = arg;
    int idle = 0;
    for (;;) {
        ImrelayEvent *event = NULL;
        int rc = imrelay_poll_event(s->client, POLL_MS, &event);
        if (rc == IMRELAY_TIMEOUT) {
            if (++idle == STALL_POLLS) {
                fprintf(stderr, "poller: nothing for %d polls in a row\n", STALL_POLLS);
                pthread_mutex_lock(&s->lock);
                s->stalled = 1;
                pthread_cond_broadcast(&s->changed);
                pthread_mutex_unlock(&s->lock);
            }
            continue;
        }
        if (rc != IMRELAY_OK) {
            print_last_error("poll");
            break;
        }
        idle = 0;
        int closed = 0;
        switch (event->kind) {
        case IMRELAY_EVENT_DELIVERED:
            record_answer(s, event, 0);
            break;
        case IMRELAY_EVENT_FAILED:
            fprintf(stderr, "message %" PRIu64 " failed: %s\n", event->msg_id, event->text);
            record_answer(s, event, 1);
            break;
        case IMRELAY_EVENT_MESSAGE:
            record_echo(s, event);
            break;
        case IMRELAY_EVENT_DISCONNECTED:
            fprintf(stderr, "user %d disconnected: %s\n", USER_A, event->text);
            break;
        case IMRELAY_EVENT_CLOSED:
            closed = 1;
            break;
        default:
            break;
        }
        imrelay_event_free(event);
        if (closed) {
            pthread_mutex_lock(&s->lock);
            s->closed = 1;
            pthread_mutex_unlock(&s->lock);
            break;
        }
    }
    return NULL;
}

/* User 2: its listener echoes every message to user 1. Only the library's network thread
 * touches this until imrelay_close(user 2) returns. */
typedef struct {
    ImrelayClient *client;
    int capacity;
    uint8_t (*queue)[PAYLOAD_MAX]; /* echoes not taken by the outbox yet */
    size_t *lengths;
    int head, tail; /* queue[head..tail) */
    int received, echoed, answers, failed, errors, closed;
} Echo;

static void echo_flush(Echo *e) {
    while (e->head < e->tail) {
        int rc = imrelay_send(e->client, USER_A, e->queue[e->head], e->lengths[e->head], NULL);
        if (rc == IMRELAY_ERR_OUTBOX_FULL) {
            return; /* again after the next event (an answer frees a slot) */
        }
        if (rc != IMRELAY_OK) {
            print_last_error("echo");
            e->errors++;
        } else {
            e->echoed++;
        }
        e->head++;
    }
}

/* The listener: called by the library, one event at a time, in order. */
static void echo_event(const ImrelayEvent *event, void *user_data) {
    Echo *e = user_data;
    switch (event->kind) {
    case IMRELAY_EVENT_MESSAGE:
        e->received++;
        if (event->peer != USER_A || event->len > PAYLOAD_MAX || e->tail == e->capacity) {
            e->errors++;
        } else {
            if (event->len > 0) {
                memcpy(e->queue[e->tail], event->data, event->len);
            }
            e->lengths[e->tail++] = event->len;
        }
        break;
    case IMRELAY_EVENT_FAILED:
        e->failed++;
        e->answers++;
        break;
    case IMRELAY_EVENT_DELIVERED:
        e->answers++;
        break;
    case IMRELAY_EVENT_CLOSED:
        e->closed++;
        return;
    default:
        break;
    }
    echo_flush(e);
}

static int compare_ids(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Every accepted send has exactly one answer, and no answer is for an unknown id. */
static int answers_match(Side *s) {
    if (s->answers != s->sent || s->extra_answers != 0) {
        return 0;
    }
    qsort(s->sent_ids, (size_t)s->sent, sizeof *s->sent_ids, compare_ids);
    qsort(s->answer_ids, (size_t)s->answers, sizeof *s->answer_ids, compare_ids);
    return memcmp(s->sent_ids, s->answer_ids, (size_t)s->sent * sizeof *s->sent_ids) == 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s <host:port> <count>\n", argv[0]);
        return 2;
    }
    int count = atoi(argv[2]);
    if (count <= 0) {
        fprintf(stderr, "count must be positive\n");
        return 2;
    }
    /* User 2 first, so user 1's messages never find it offline. */
    ImrelayClient *b = imrelay_connect(argv[1], USER_B, NULL, 0, 10000);
    if (b == NULL) {
        print_last_error("connect user 2");
        return 1;
    }
    ImrelayClient *a = imrelay_connect(argv[1], USER_A, NULL, 0, 10000);
    if (a == NULL) {
        print_last_error("connect user 1");
        imrelay_close(b, 1000);
        return 1;
    }

    Side side = {.client = a, .count = count};
    pthread_mutex_init(&side.lock, NULL);
    pthread_cond_init(&side.changed, NULL);
    side.sent_ids = calloc((size_t)count, sizeof *side.sent_ids);
    side.answer_ids = calloc((size_t)count, sizeof *side.answer_ids);
    side.echoes = calloc((size_t)count, sizeof *side.echoes);
    Echo echo = {.client = b, .capacity = count};
    echo.queue = calloc((size_t)count, sizeof *echo.queue);
    echo.lengths = calloc((size_t)count, sizeof *echo.lengths);
    if (!side.sent_ids || !side.answer_ids || !side.echoes || !echo.queue || !echo.lengths) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }

    if (imrelay_start_listener(b, echo_event, &echo) != IMRELAY_OK) {
        print_last_error("start listener");
        return 1;
    }
    pthread_t poller, sender;
    if (pthread_create(&poller, NULL, poll_all, &side) != 0 ||
        pthread_create(&sender, NULL, send_all, &side) != 0) {
        fprintf(stderr, "cannot start the threads\n");
        return 1;
    }
    pthread_join(sender, NULL);
    pthread_join(poller, NULL);
    /* No thread of ours uses user 1's handle any more: free it. */
    imrelay_free(a);
    /* Closes user 2 and returns after its listener's last call (CLOSED). */
    imrelay_close(b, 1000);

    int missing = 0;
    for (int i = 0; i < count; i++) {
        missing += side.echoes[i] == 0;
    }
    int matched = answers_match(&side);
    printf("sent %d of %d, delivered %d, failed %d, answers match sends: %s\n", side.sent, count,
           side.delivered, side.failed, matched ? "yes" : "no");
    printf("echoes %d, missing %d, duplicates %d, garbage %d\n", side.echoes_once, missing,
           side.echo_duplicates, side.echo_garbage);
    printf("user 2 received %d, echoed %d, answered %d, failed %d, errors %d, closed %d\n",
           echo.received, echo.echoed, echo.answers, echo.failed, echo.errors, echo.closed);
    printf("closed: %s, stalled: %s\n", side.closed ? "yes" : "no", side.stalled ? "yes" : "no");
    int ok = side.sent == count && side.send_errors == 0 && matched && side.delivered == count &&
             side.failed == 0 && side.echoes_once == count && missing == 0 &&
             side.echo_duplicates == 0 && side.echo_garbage == 0 && side.closed &&
             !side.stalled && echo.received == count && echo.echoed == count &&
             echo.answers == count && echo.failed == 0 && echo.errors == 0 && echo.closed == 1;

    free(side.sent_ids);
    free(side.answer_ids);
    free(side.echoes);
    free(echo.queue);
    free(echo.lengths);
    pthread_mutex_destroy(&side.lock);
    pthread_cond_destroy(&side.changed);
    printf("%s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
