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

static void print_last_error(const char *what) {
    char message[256];
    imrelay_last_error_message(message, sizeof message);
    fprintf(stderr, "%s failed: %d %s\n", what, imrelay_last_error_code(), message);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s <host:port> <user> <peer> <message>\n", argv[0]);
        return 2;
    }
    uint64_t me = strtoull(argv[2], NULL, 10);
    uint64_t peer = strtoull(argv[3], NULL, 10);
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
