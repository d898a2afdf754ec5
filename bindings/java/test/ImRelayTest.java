import io.imrelay.ImRelayClient;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Set;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import java.util.function.Predicate;

/**
 * The Java binding against a live relay, driven by tests/java.rs:
 * {@code java -Djava.library.path=DIR ImRelayTest HOST PORT SCENARIO...}.
 *
 * <p>Scenarios: {@code direct} (two clients, a message each way, one of them sent from a
 * callback; callbacks on the SDK's thread; a throwing callback; close), {@code reconnect}
 * ({@code networkChanged()} logs in again: reconnects goes 0 to 1), {@code stored-send}
 * (a stored message to user 202, offline) and {@code stored-receive} (user 202 gets it:
 * run after the relay restarted), {@code tls} (a relay speaking TLS: two clients trusting
 * its CA exchange messages, a bad PEM is refused, a client trusting only the system store
 * fails the handshake; needs the system properties {@code imrelay.test.tlsServerName} and
 * {@code imrelay.test.caPem}, a PEM file, and {@code SSL_CERT_FILE} naming a CA that did
 * not sign the relay's certificate).
 *
 * <p>Prints an {@code OK <check>} line per check passed, then {@code ALL OK}, and exits 0;
 * on the first failure prints {@code FAIL <why>} and exits 1. Nothing waits on time: every
 * wait is on an event, with a generous timeout that only turns a hang into a failure.
 */
public final class ImRelayTest {
    /** Only turns a hang into a failure; no check depends on it. */
    static final long TIMEOUT_SECONDS = 60;

    static final Thread MAIN = Thread.currentThread();

    public static void main(String[] args) {
        try {
            if (args.length < 3) {
                throw new Failure("usage: ImRelayTest HOST PORT SCENARIO...");
            }
            String host = args[0];
            int port = Integer.parseInt(args[1]);
            for (String scenario : Arrays.asList(args).subList(2, args.length)) {
                switch (scenario) {
                    case "direct":
                        direct(host, port);
                        break;
                    case "reconnect":
                        reconnect(host, port);
                        break;
                    case "background":
                        background(host, port);
                        break;
                    case "stored-send":
                        storedSend(host, port);
                        break;
                    case "stored-receive":
                        storedReceive(host, port);
                        break;
                    case "tls":
                        tls(host, port);
                        break;
                    default:
                        throw new Failure("unknown scenario " + scenario);
                }
            }
            System.out.println("ALL OK");
            System.out.flush();
            System.exit(0);
        } catch (Throwable t) {
            System.out.println("FAIL " + t);
            t.printStackTrace(System.out);
            System.out.flush();
            System.exit(1);
        }
    }

    // ---- scenarios -----------------------------------------------------------------------

    static final long ALICE = 101;
    static final long BOB = 102;

    static void direct(String host, int port) throws Exception {
        Recorder alice = new Recorder("alice");
        Recorder bob = new Recorder("bob");
        // Alice's first onDelivered throws: later callbacks must still come.
        alice.throwOnFirstDelivered = true;
        // Bob answers from inside onMessage, and tries close() there (refused).
        AtomicReference<ImRelayClient> bobClient = new AtomicReference<>();
        bob.onMessageHook = (from, payload) -> {
            ImRelayClient self = bobClient.get();
            long reply = self.send(from, bytes("hi alice"));
            bob.note("replied", reply, 0, null);
            try {
                self.close();
                bob.note("close-from-callback-allowed", 0, 0, null);
            } catch (IllegalStateException expected) {
                bob.note("close-from-callback-refused", 0, 0, expected.getMessage());
            }
        };
        Set<Long> tokenUsers = java.util.Collections.synchronizedSet(new LinkedHashSet<>());
        ImRelayClient.TokenProvider tokens = user -> {
            tokenUsers.add(user);
            return new byte[0]; // this relay checks no tokens
        };

        ImRelayClient a = ImRelayClient.connect(host, port, ALICE, null, null, alice);
        ImRelayClient b = ImRelayClient.connect(host, port, BOB, tokens, "bob-phone", bob);
        bobClient.set(b);
        check(alice.await("connected", e -> true).a == ALICE, "alice onConnected names user 101");
        check(bob.await("connected", e -> true).a == BOB, "bob onConnected names user 102");
        check(tokenUsers.contains(BOB), "the token provider was asked for user 102");
        ok("connected");

        // (a) a direct message, alice to bob.
        byte[] hello = bytes("hello bob");
        long id = a.send(BOB, hello);
        Event got = bob.await("message", e -> true);
        check(got.a == ALICE, "onMessage sender is alice, got " + got.a);
        check(Arrays.equals(got.data, hello), "onMessage payload is 'hello bob'");
        ok("direct-message from=" + got.a + " payload=" + text(got.data));
        Event delivered = alice.await("delivered", e -> e.a == id);
        check(delivered.b >= 1, "delivered to at least one device, got " + delivered.b);
        ok("delivered id=" + id + " devices=" + delivered.b);

        // Bob's reply, sent from his callback, reaches alice; close() there was refused.
        Event replied = bob.await("replied", e -> true);
        bob.await("delivered", e -> e.a == replied.a);
        Event back = alice.await("message", e -> e.a == BOB);
        check(Arrays.equals(back.data, bytes("hi alice")), "alice got bob's reply");
        ok("send-from-callback");
        bob.await("close-from-callback-refused", e -> true);
        ok("close-from-callback-refused");

        // Rooms: both join, alice's live message reaches bob.
        a.join(900);
        alice.await("room-state", e -> e.a == 900 && "member".equals(e.text));
        b.join(900);
        Event state = bob.await("room-state", e -> e.a == 900 && "member".equals(e.text));
        check(state.b >= 2, "two members in room 900, got " + state.b);
        a.roomSend(900, bytes("danmaku"));
        Event room = bob.await("room-message", e -> e.a == 900);
        check(room.b == ALICE && Arrays.equals(room.data, bytes("danmaku")), "bob got " + room);
        ok("room-message room=900 from=" + room.b);

        // Alice's onDelivered threw once: her thread lives on.
        long second = a.send(BOB, bytes("still there?"));
        alice.await("delivered", e -> e.a == second);
        bob.await("message", e -> Arrays.equals(e.data, bytes("still there?")));
        ok("callback-exception-survived");

        // (c) callbacks on the SDK's network thread: not main, one per client.
        Thread aliceThread = alice.onlyThread();
        Thread bobThread = bob.onlyThread();
        check(aliceThread != bobThread, "each client has its own network thread");
        check(aliceThread.getName().equals("imrelay-network"),
                "the SDK names its thread, got " + aliceThread.getName());
        ok("callbacks-on-network-thread alice=" + aliceThread.getName()
                + " bob=" + bobThread.getName());

        // close: returns after onClosed; idempotent; calls after it are refused.
        a.close();
        check(alice.closed.getCount() == 0, "alice's onClosed ran before close() returned");
        b.close();
        check(bob.closed.getCount() == 0, "bob's onClosed ran before close() returned");
        a.close();
        b.close();
        try {
            a.send(BOB, hello);
            throw new Failure("send after close did not throw");
        } catch (IllegalStateException expected) {
            // as documented
        }
        check(alice.onlyThread() == aliceThread, "onClosed ran on alice's network thread too");
        ok("close");
    }

    static void reconnect(String host, int port) throws Exception {
        Recorder r = new Recorder("carol");
        ImRelayClient c = ImRelayClient.connect(host, port, 301, null, "carol-phone", r);
        r.await("connected", e -> true);
        check(c.reconnects() == 0, "reconnects() is 0 after the first login, got " + c.reconnects());
        c.networkChanged();
        r.await("disconnected", e -> true);
        r.await("connected", e -> true);
        check(c.reconnects() == 1, "reconnects() is 1 after networkChanged(), got " + c.reconnects());
        ok("reconnect 0 -> 1");
        // The link works again: a message to self comes back.
        long id = c.send(301, bytes("me again"));
        r.await("message", e -> e.a == 301);
        r.await("delivered", e -> e.a == id);
        c.close();
        check(c.reconnects() == 1, "reconnects() after close keeps its count");
        r.onlyThread();
        ok("reconnect-link-works");
    }

    /**
     * setForeground(false) under a background policy with no grace: the link is closed (one
     * onDisconnected saying why, no new onConnected); a message sent meanwhile waits;
     * setForeground(true) logs in again at once (reconnects() 0 to 1) and the message goes.
     */
    static void background(String host, int port) throws Exception {
        Recorder r = new Recorder("frank");
        ImRelayClient c = ImRelayClient.connect(host, port, 401, null, "frank-phone", r, 0);
        r.await("connected", e -> true);
        c.setForeground(false);
        Event down = r.await("disconnected", e -> true);
        check(down.text.contains("background"), "the reason names the background: " + down.text);
        long id = c.send(401, bytes("after the background"));
        check(c.reconnects() == 0, "no login while in the background, got " + c.reconnects());
        ok("background-disconnected");
        c.setForeground(true);
        r.await("connected", e -> true);
        r.await("message", e -> e.a == 401);
        r.await("delivered", e -> e.a == id);
        check(c.reconnects() == 1, "one login back in the foreground, got " + c.reconnects());
        c.close();
        r.onlyThread();
        ok("background-foreground-reconnected");
    }

    static final long SENDER = 201;
    static final long OFFLINE = 202;
    static final String KEPT = "kept across a restart";

    static void storedSend(String host, int port) throws Exception {
        Recorder r = new Recorder("dave");
        ImRelayClient c = ImRelayClient.connect(host, port, SENDER, null, null, r);
        r.await("connected", e -> true);
        long id = c.sendStored(OFFLINE, bytes(KEPT));
        Event stored = r.await("stored", e -> e.a == id);
        check(stored.b == 0, "nobody online to push it to, got " + stored.b);
        c.close();
        ok("stored-send id=" + id);
    }

    static void storedReceive(String host, int port) throws Exception {
        Recorder r = new Recorder("erin");
        ImRelayClient c = ImRelayClient.connect(host, port, OFFLINE, null, "erin-phone", r);
        Event got = r.await("message", e -> e.a == SENDER);
        check(Arrays.equals(got.data, bytes(KEPT)), "the stored payload, got " + text(got.data));
        c.close();
        r.onlyThread();
        ok("stored-receive from=" + got.a + " payload=" + text(got.data));
    }

    static final long GRACE = 501;
    static final long HENRY = 502;
    static final long IVAN = 503;

    /**
     * TLS: the relay's certificate is for {@code imrelay.test.tlsServerName}, signed by the
     * CA in the file {@code imrelay.test.caPem}. Options are checked as they are set; a bad
     * PEM is an IllegalArgumentException from connect; two clients given the CA with
     * tlsCaPem exchange a message each way; a client with tls() trusts the system store
     * (here SSL_CERT_FILE, a CA that did not sign the relay's certificate): its handshake
     * fails, reported by onDisconnected, and it never logs in.
     */
    static void tls(String host, int port) throws Exception {
        String serverName = requiredProperty("imrelay.test.tlsServerName");
        byte[] caPem = Files.readAllBytes(Paths.get(requiredProperty("imrelay.test.caPem")));

        // The builder checks what it can at once.
        expect(IllegalArgumentException.class, () -> new ImRelayClient.Options().device(""));
        expect(IllegalArgumentException.class,
                () -> new ImRelayClient.Options().device("tab\there"));
        expect(IllegalArgumentException.class,
                () -> new ImRelayClient.Options().backgroundDisconnectAfterMs(-1));
        expect(NullPointerException.class, () -> new ImRelayClient.Options().tls(null));
        expect(IllegalArgumentException.class, () -> new ImRelayClient.Options().tls(""));
        expect(IllegalArgumentException.class,
                () -> new ImRelayClient.Options().tlsCaPem(serverName, new byte[0]));
        expect(NullPointerException.class,
                () -> ImRelayClient.connect(host, port, GRACE, null, new Recorder("nobody")));
        ok("tls-options-checked");

        // A PEM without a certificate: connect throws, naming the problem.
        ImRelayClient.Options badPem =
                new ImRelayClient.Options().tlsCaPem(serverName, bytes("not a certificate"));
        IllegalArgumentException bad = expect(IllegalArgumentException.class,
                () -> ImRelayClient.connect(host, port, GRACE, badPem, new Recorder("nobody")));
        check(bad.getMessage().contains("TLS") && bad.getMessage().contains("CERTIFICATE"),
                "the message names the problem: " + bad.getMessage());
        ok("tls-bad-pem " + bad.getMessage());

        // Two clients trusting the relay's CA. Grace's array is overwritten after the setter:
        // the options hold their own copy.
        byte[] graceCopy = caPem.clone();
        ImRelayClient.Options graceOptions =
                new ImRelayClient.Options().tlsCaPem(serverName, graceCopy).device("grace-phone");
        Arrays.fill(graceCopy, (byte) 0);
        Recorder grace = new Recorder("grace");
        Recorder henry = new Recorder("henry");
        ImRelayClient g = ImRelayClient.connect(host, port, GRACE, graceOptions, grace);
        ImRelayClient h = ImRelayClient.connect(host, port, HENRY,
                new ImRelayClient.Options().tlsCaPem(serverName, caPem), henry);
        check(grace.await("connected", e -> true).a == GRACE, "grace logged in over TLS");
        check(henry.await("connected", e -> true).a == HENRY, "henry logged in over TLS");
        long there = g.send(HENRY, bytes("over tls"));
        Event got = henry.await("message", e -> e.a == GRACE);
        check(Arrays.equals(got.data, bytes("over tls")), "henry got " + text(got.data));
        grace.await("delivered", e -> e.a == there);
        long back = h.send(GRACE, bytes("and back"));
        Event reply = grace.await("message", e -> e.a == HENRY);
        check(Arrays.equals(reply.data, bytes("and back")), "grace got " + text(reply.data));
        henry.await("delivered", e -> e.a == back);
        ok("tls-both-ways");

        // The system trust store does not hold the relay's CA: no login, a reason instead.
        Recorder ivan = new Recorder("ivan");
        ImRelayClient i = ImRelayClient.connect(
                host, port, IVAN, new ImRelayClient.Options().tls(serverName), ivan);
        Event down = ivan.await("disconnected", e -> true);
        String reason = down.text;
        check(reason.contains("TLS") && reason.toLowerCase().contains("certificate"),
                "the reason names TLS and the certificate: " + reason);
        i.close();
        // close() returned after onClosed: every event ivan will ever get is recorded.
        List<Event> all = new ArrayList<>(ivan.skipped);
        ivan.events.drainTo(all);
        for (Event e : all) {
            check(!e.kind.equals("connected"), "ivan must never log in, got " + all);
        }
        ok("tls-untrusted-refused reason=" + reason);

        g.close();
        h.close();
        grace.onlyThread();
        henry.onlyThread();
    }

    // ---- helpers -------------------------------------------------------------------------

    static final class Failure extends Exception {
        private static final long serialVersionUID = 1L;

        Failure(String message) {
            super(message);
        }
    }

    static void check(boolean condition, String what) throws Failure {
        if (!condition) {
            throw new Failure(what);
        }
    }

    static String requiredProperty(String name) throws Failure {
        String value = System.getProperty(name);
        check(value != null, "system property " + name + " is not set");
        return value;
    }

    interface Action {
        void run() throws Exception;
    }

    /** Runs {@code action}, which must throw a {@code type}; returns what it threw. */
    static <T extends Throwable> T expect(Class<T> type, Action action) throws Exception {
        try {
            action.run();
        } catch (Throwable t) {
            if (type.isInstance(t)) {
                return type.cast(t);
            }
            throw new Failure("expected " + type.getSimpleName() + ", got " + t);
        }
        throw new Failure("expected " + type.getSimpleName() + ", nothing was thrown");
    }

    static void ok(String what) {
        System.out.println("OK " + what);
        System.out.flush();
    }

    static byte[] bytes(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    static String text(byte[] b) {
        return new String(b, StandardCharsets.UTF_8);
    }

    /** One callback (or a note a callback made), and the thread it ran on. */
    static final class Event {
        final String kind;
        final long a;
        final long b;
        final byte[] data;
        final String text;

        Event(String kind, long a, long b, byte[] data, String text) {
            this.kind = kind;
            this.a = a;
            this.b = b;
            this.data = data;
            this.text = text;
        }

        @Override
        public String toString() {
            return kind + "(" + a + ", " + b + (data == null ? "" : ", " + text(data))
                    + (text == null ? "" : ", " + text) + ")";
        }
    }

    interface MessageHook {
        void onMessage(long from, byte[] payload) throws Exception;
    }

    /** A listener that queues every callback and remembers the threads they ran on. */
    static final class Recorder implements ImRelayClient.Listener {
        final String name;
        final BlockingQueue<Event> events = new LinkedBlockingQueue<>();
        final Set<Thread> threads = java.util.Collections.synchronizedSet(new LinkedHashSet<>());
        final CountDownLatch closed = new CountDownLatch(1);
        volatile boolean throwOnFirstDelivered;
        volatile MessageHook onMessageHook;
        /** Events {@link #await} passed over, in order: later awaits look here first. */
        final List<Event> skipped = new ArrayList<>();

        Recorder(String name) {
            this.name = name;
        }

        void note(String kind, long a, long b, String text) {
            events.add(new Event(kind, a, b, null, text));
        }

        private void record(String kind, long a, long b, byte[] data, String text) {
            threads.add(Thread.currentThread());
            events.add(new Event(kind, a, b, data, text));
        }

        /**
         * The first event of `kind` matching `which`, earlier skipped ones included; the
         * others stay for later awaits.
         */
        Event await(String kind, Predicate<Event> which) throws Exception {
            for (int i = 0; i < skipped.size(); i++) {
                Event e = skipped.get(i);
                if (e.kind.equals(kind) && which.test(e)) {
                    return skipped.remove(i);
                }
            }
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(TIMEOUT_SECONDS);
            while (true) {
                long left = deadline - System.nanoTime();
                Event e = events.poll(Math.max(left, 0), TimeUnit.NANOSECONDS);
                if (e == null) {
                    throw new Failure(name + ": no " + kind + " event; skipped " + skipped);
                }
                if (e.kind.equals(kind) && which.test(e)) {
                    return e;
                }
                skipped.add(e);
            }
        }

        /** The one thread every callback ran on; fails if none, several, or main. */
        Thread onlyThread() throws Failure {
            Set<Thread> seen;
            synchronized (threads) {
                seen = new LinkedHashSet<>(threads);
            }
            check(seen.size() == 1, name + ": callbacks ran on one thread, saw " + seen);
            Thread t = seen.iterator().next();
            check(t != MAIN, name + ": callbacks ran on the main thread");
            return t;
        }

        @Override
        public void onConnected(long user) {
            record("connected", user, 0, null, null);
        }

        @Override
        public void onDisconnected(String reason) {
            record("disconnected", 0, 0, null, reason);
        }

        @Override
        public void onMessage(long from, long id, byte[] payload) {
            record("message", from, id, payload, null);
            MessageHook hook = onMessageHook;
            if (hook != null) {
                onMessageHook = null;
                try {
                    hook.onMessage(from, payload);
                } catch (Exception e) {
                    note("hook-failed", 0, 0, e.toString());
                }
            }
        }

        @Override
        public void onDelivered(long id, int devices) {
            record("delivered", id, devices, null, null);
            if (throwOnFirstDelivered) {
                throwOnFirstDelivered = false;
                throw new RuntimeException(
                        name + ": a deliberate exception from onDelivered (the test expects it)");
            }
        }

        @Override
        public void onStored(long id, int devices) {
            record("stored", id, devices, null, null);
        }

        @Override
        public void onFailed(long id, String reason) {
            record("failed", id, 0, null, reason);
        }

        @Override
        public void onSentFromOtherDevice(long to, long id, byte[] payload) {
            record("sent-from-other-device", to, id, payload, null);
        }

        @Override
        public void onRoomMessage(long room, long from, byte[] payload) {
            record("room-message", room, from, payload, null);
        }

        @Override
        public void onRoomState(long room, int members, boolean isMember) {
            record("room-state", room, members, null, isMember ? "member" : "not a member");
        }

        @Override
        public void onGap(long from, long to) {
            record("gap", from, to, null, null);
        }

        @Override
        public void onError(int code, String reason) {
            record("error", code, 0, null, reason);
        }

        @Override
        public void onClosed() {
            record("closed", 0, 0, null, null);
            closed.countDown();
        }
    }
}
