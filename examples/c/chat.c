/*
 * chat.c: the imrelay C ABI end to end, as an iOS or Android app would use it.
 *
 *   chat <relay host:port> <my user id> <peer user id> <message>
 *
 * Logs in, sends <message> to <peer>, prints every event, and exits 0 once the message
 * was delivered and a message from <peer> came back (exit 1 on any failure).
 * Build: cc examples/c/chat.c -Iinclude target/debug/libimrelay.a -lpthread -ldl -lm
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imrelay.h"

/* The name of an IMRELAY_ERR_* code, for messages a person reads. */
static const char *error_name(int code) {
    switch (code) {
    case IMRELAY_ERR_NULL: return "IMRELAY_ERR_NULL";
    case IMRELAY_ERR_INVALID: return "IMRELAY_ERR_INVALID";
    case IMRELAY_ERR_CONNECT: return "IMRELAY_ERR_CONNECT";
    case IMRELAY_ERR_OUTBOX_FULL: return "IMRELAY_ERR_OUTBOX_FULL";
    case IMRELAY_ERR_TOO_LARGE: return "IMRELAY_ERR_TOO_LARGE";
    case IMRELAY_ERR_NOT_CONNECTED: return "IMRELAY_ERR_NOT_CONNECTED";
    case IMRELAY_ERR_CLOSED: return "IMRELAY_ERR_CLOSED";
    case IMRELAY_ERR_PANIC: return "IMRELAY_ERR_PANIC";
    case IMRELAY_ERR_UNSUPPORTED: return "IMRELAY_ERR_UNSUPPORTED";
    case IMRELAY_ERR_SYSTEM: return "IMRELAY_ERR_SYSTEM";
    default: return "unknown error";
    }
}

/* One line: what failed, the library's reason (it already says "connect failed: ..." for
 * a connect, so that prefix is not repeated), and the code's name. */
static void print_last_error(const char *what) {
    char message[256];
    imrelay_last_error_message(message, sizeof message);
    const char *why = message;
    size_t what_len = strlen(what);
    if (strncmp(why, what, what_len) == 0 && strncmp(why + what_len, " failed: ", 9) == 0) {
        why += what_len + 9;
    }
    int code = imrelay_last_error_code();
    fprintf(stderr, "chat: %s failed: %s; code %s\n", what, why, error_name(code));
    if (code == IMRELAY_ERR_CONNECT) {
        fprintf(stderr, "chat: is the relay running? (cargo run --release --bin imrelay)\n");
    }
}

/* A user id, or 0 when `s` is not a whole decimal number. */
static uint64_t user_id(const char *s) {
    char *end = NULL;
    uint64_t id = strtoull(s, &end, 10);
    return *s >= '0' && *s <= '9' && end != s && *end == '\0' ? id : 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s <host:port> <user> <peer> <message>\n", argv[0]);
        return 2;
    }
    uint64_t me = user_id(argv[2]);
    uint64_t peer = user_id(argv[3]);
    if (me == 0 || peer == 0) {
        fprintf(stderr, "chat: user ids are numbers from 1, got \"%s\" and \"%s\"\n", argv[2],
                argv[3]);
        fprintf(stderr, "usage: %s <host:port> <user> <peer> <message>\n", argv[0]);
        return 2;
    }
    const char *text = argv[4];

    ImrelayClient *client = imrelay_connect(argv[1], me, NULL, 0, 5000);
    if (client == NULL) {
        print_last_error("connect");
        return 1;
    }
    printf("connected as %" PRIu64 "\n", me);

    uint64_t sent_id = 0;
    if (imrelay_send(client, peer, (const uint8_t *)text, strlen(text), &sent_id) != IMRELAY_OK) {
        print_last_error("send");
        imrelay_close(client, 1000);
        return 1;
    }

    int delivered = 0, answered = 0, failed = 0;
    for (int waited = 0; !(delivered && answered) && !failed && waited < 100; waited++) {
        ImrelayEvent *event = NULL;
        int rc = imrelay_poll_event(client, 100, &event);
        if (rc == IMRELAY_TIMEOUT) {
            continue;
        }
        if (rc != IMRELAY_OK) {
            print_last_error("poll");
            failed = 1;
            break;
        }
        switch (event->kind) {
        case IMRELAY_EVENT_DELIVERED:
            if (event->msg_id == sent_id) {
                printf("delivered to %" PRIu64 " device(s)\n", event->count);
                delivered = 1;
            }
            break;
        case IMRELAY_EVENT_FAILED:
            printf("failed: %s\n", event->text);
            failed = 1;
            break;
        case IMRELAY_EVENT_MESSAGE:
            printf("message from %" PRIu64 ": %.*s\n", event->peer, (int)event->len,
                   (const char *)event->data);
            answered = event->peer == peer;
            break;
        case IMRELAY_EVENT_DISCONNECTED:
            printf("disconnected: %s\n", event->text);
            break;
        default:
            break;
        }
        imrelay_event_free(event);
    }
    imrelay_close(client, 1000);
    printf("bye\n");
    return delivered && answered && !failed ? 0 : 1;
}
