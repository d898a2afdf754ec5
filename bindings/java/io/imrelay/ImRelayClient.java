package io.imrelay;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.Objects;
import java.util.concurrent.locks.ReentrantReadWriteLock;

/**
 * A client of an imrelay relay: direct messages, stored messages, rooms. A thin Java face
 * over the Rust SDK in {@code libimrelay.so} (the native methods are in {@code src/jni.rs}).
 *
 * <h2>Lifecycle</h2>
 * {@link #connect connect} starts the client and returns at once; the client connects,
 * logs in, and from then on keeps the link up by itself: heartbeats, reconnects with
 * backoff after a failure, resends of unanswered messages, replay of stored ones. Its
 * events arrive at the {@link Listener}: {@code onConnected} after each login, {@code
 * onDisconnected} when the link drops, the messages, the answers to sends. {@link #close}
 * ends it: messages never written fail ({@code onFailed}), those in flight get their
 * answers, then {@code onClosed} is the last call, and {@code close} returns after it.
 *
 * <h2>Threads</h2>
 * Every callback of a client (listener and token provider alike, apart from a token asked
 * inside a send, see {@link TokenProvider}) runs on that client's own network thread,
 * owned by the SDK: one callback at a time, never concurrently with itself, in the order
 * the events happened; {@code onClosed} is the last. A callback should return quickly
 * (the link is not read while it runs): hand the work to the app's own executor, on
 * Android the main looper for UI. Every method of this class may be called from any
 * thread, several at once, and from inside a callback, except {@link #close}: a callback
 * cannot wait for its own thread to end; it may call {@link #shutdown} instead (the
 * client then closes, and {@code close()} from another thread frees it).
 *
 * <h2>Who frees what</h2>
 * The native side (a socket, the network thread, the client's buffers) belongs to this
 * object until {@link #close}, which frees it: call {@code close()} once the client is no
 * longer needed (try-with-resources works). It is idempotent and safe to call from
 * several threads: every call returns after {@code onClosed}. Without it the native side
 * and the network thread live on (they are not garbage collected). Byte arrays are copied
 * both ways: the app may reuse an array it passed to {@code send}, and owns every array
 * a callback gets.
 *
 * <h2>TLS</h2>
 * A production app connects over TLS: {@link Options#tls} trusts the system's CAs, {@link
 * Options#tlsCaPem} a CA bundled with the app. The handshake is part of connecting: a
 * certificate that does not verify is an {@code onDisconnected} whose reason says so (then
 * the usual backoff), not an exception. The native library must be built with the cargo
 * features {@code java,tls}; without {@code tls}, asking for TLS makes {@code connect}
 * throw {@code UnsupportedOperationException}.
 *
 * <h2>Ids</h2>
 * User ids, room ids and message ids are unsigned 64-bit numbers carried in a {@code long}
 * (the bits as they are). User 0 is reserved.
 */
public final class ImRelayClient implements AutoCloseable {
    static {
        System.loadLibrary("imrelay");
    }

    /**
     * What the client tells the app. Every method runs on the client's network thread (see
     * the class docs); all but {@link #onMessage} do nothing unless overridden. An
     * exception thrown from a callback is printed (stderr, logcat on Android) and dropped:
     * the next events still arrive.
     */
    public interface Listener {
        /**
         * Logged in as {@code user}, the first time or again after a reconnect; queued
         * messages are being (re)sent now.
         */
        default void onConnected(long user) {}

        /**
         * The link is down ({@code reason} says why); the client reconnects by itself.
         */
        default void onDisconnected(String reason) {}

        /**
         * A direct message (or a stored one) from {@code from}, shown once even if the
         * relay sent it twice.
         */
        void onMessage(long from, long id, byte[] payload);

        /** Sent with {@link #send}: the relay handed it to {@code devices} connections. */
        default void onDelivered(long id, int devices) {}

        /**
         * Sent with {@link #sendStored}: it is in the recipient's inbox (on disk with a
         * durable relay), pushed at once to {@code devices} connections (0: offline).
         */
        default void onStored(long id, int devices) {}

        /** Message {@code id} will not be delivered by this client; nothing is resent. */
        default void onFailed(long id, String reason) {}

        /**
         * A stored message this user sent to {@code to} from another of its devices, so
         * this one can show both sides of the conversation.
         */
        default void onSentFromOtherDevice(long to, long id, byte[] payload) {}

        /** A live message in a joined room. */
        default void onRoomMessage(long room, long from, byte[] payload) {}

        /** The relay's answer to join or leave: members online, and whether this is one. */
        default void onRoomState(long room, int members, boolean isMember) {}

        /** The relay dropped {@code missed} room messages because this client was slow. */
        default void onRoomMissed(long room, long missed) {}

        /** Stored messages {@code from..to} (sequence numbers) expired before arriving. */
        default void onGap(long from, long to) {}

        /** An error from the relay that answers none of this client's messages. */
        default void onError(int code, String reason) {}

        /** The login token expires at {@code exp} (Unix seconds); see {@link TokenProvider}. */
        default void onTokenExpiring(long exp) {}

        /** The relay accepted a refreshed token, valid until {@code exp} (Unix seconds). */
        default void onTokenRefreshed(long exp) {}

        /** The relay refused a refreshed token; the link stays up on the old one. */
        default void onRefreshFailed(int code, String reason) {}

        /** The client is closed: the last call, no other follows. */
        default void onClosed() {}
    }

    /**
     * Gives the client a login token (a JWT from the app's backend, say): asked at every
     * connect and reconnect, and when the relay says the token expires soon. It runs with
     * the client's lock held, on the network thread or (rarely) on a thread inside a call
     * of this client: it must return quickly (a cached token), must not call the client
     * (that would deadlock), and should not throw. {@code null} or an exception means "no token now": the login
     * goes out without one (a relay that checks tokens refuses it, and the client tries
     * again after its backoff).
     */
    public interface TokenProvider {
        /** The token for {@code user}. */
        byte[] token(long user);
    }

    /** Guards {@link #handle}: calls hold the read lock, {@link #close} frees under the write lock. */
    private final ReentrantReadWriteLock lock = new ReentrantReadWriteLock();
    /** One {@link #close} at a time: a second one waits for the first to finish. */
    private final Object closing = new Object();
    /** The native client (0 once closed). */
    private long handle;
    /** {@link #reconnects} as it was at {@link #close}. */
    private long reconnectsAtClose;

    private ImRelayClient(long handle) {
        this.handle = handle;
    }

    /**
     * How a client connects: its login tokens, its device id, its background policy, and
     * TLS. Every option has a default (no token, the user's default device, keep the link in
     * the background, plain TCP); set the ones you need with the fluent setters and pass the
     * object to {@link ImRelayClient#connect(String, int, long, Options, Listener)}:
     *
     * <pre>{@code
     * ImRelayClient.Options options = new ImRelayClient.Options()
     *         .device(deviceId)
     *         .tokens(user -> tokenCache.current())
     *         .tlsCaPem("relay.example.com", caPemBytes);
     * ImRelayClient client =
     *         ImRelayClient.connect("relay.example.com", 7700, me, options, listener);
     * }</pre>
     *
     * <p>Each setter checks its argument at once ({@code NullPointerException} for null,
     * {@code IllegalArgumentException} for a value out of range) and returns this object.
     * What only the native library can check (a server name that is neither a DNS name nor
     * an IP address, a PEM holding no usable certificate, TLS from a library built without
     * it) is checked by {@code connect}.
     *
     * <p>Threads: an {@code Options} is not synchronised: set it up on one thread (or
     * publish it safely), and do not change it while a {@code connect} with it runs. {@code
     * connect} copies every value (the PEM bytes included), so changing or reusing the
     * object afterwards does not affect clients already started; only the {@link
     * TokenProvider} object itself is shared, held by the client until {@link #close}.
     */
    public static final class Options {
        /** The largest device id, in bytes of UTF-8 (the relay's limit). */
        private static final int MAX_DEVICE_BYTES = 64;

        private TokenProvider tokens;
        private String device;
        private long backgroundDisconnectAfterMs = -1;
        private String tlsServerName;
        private byte[] tlsCaPem;

        /** Options with every default: no token, default device, keep-alive, plain TCP. */
        public Options() {}

        /**
         * This install's device id: 1 to 64 bytes of UTF-8 without control characters, the
         * same at every start of the app (each device of a user gets every stored message).
         * Default: the user's default device, shared by every client that names none.
         *
         * @throws NullPointerException if {@code device} is null
         * @throws IllegalArgumentException if it is empty, longer than 64 bytes of UTF-8, or
         *     holds a control character
         */
        public Options device(String device) {
            Objects.requireNonNull(device, "device");
            int bytes = device.getBytes(StandardCharsets.UTF_8).length;
            boolean control = device.codePoints().anyMatch(Character::isISOControl);
            if (bytes == 0 || bytes > MAX_DEVICE_BYTES || control) {
                throw new IllegalArgumentException(
                        "a device id is 1 to 64 bytes of UTF-8 without control characters");
            }
            this.device = device;
            return this;
        }

        /**
         * Where login tokens come from (see {@link TokenProvider}). Default: a static, empty
         * credential, for a relay that checks no tokens; for a fixed token pass {@code u ->
         * token}. The provider object is not copied: the client holds it until {@link
         * ImRelayClient#close}.
         *
         * @throws NullPointerException if {@code tokens} is null
         */
        public Options tokens(TokenProvider tokens) {
            this.tokens = Objects.requireNonNull(tokens, "tokens");
            return this;
        }

        /**
         * A background policy (see {@link ImRelayClient#setForeground}): close the link
         * cleanly this many milliseconds after {@code setForeground(false)} (0: at once),
         * and do not reconnect until {@code setForeground(true)}. Default: keep the link in
         * the background, heartbeating as seldom as the relay allows.
         *
         * @throws IllegalArgumentException if {@code ms} is negative
         */
        public Options backgroundDisconnectAfterMs(long ms) {
            if (ms < 0) {
                throw new IllegalArgumentException("backgroundDisconnectAfterMs " + ms + " < 0");
            }
            this.backgroundDisconnectAfterMs = ms;
            return this;
        }

        /**
         * Connects over TLS, trusting the system's trust store (on Android the system CA
         * certificates; user-installed CAs are not read): the relay's certificate must be
         * valid for {@code serverName} (a DNS name or an IP address, usually the host given
         * to {@code connect}) and chain to a CA there. Replaces an earlier {@link
         * #tlsCaPem}. A handshake that fails (an unknown CA, a wrong name) is not an
         * exception: the client reports it with {@link Listener#onDisconnected} (the reason
         * names TLS and the certificate problem) and tries again after its backoff.
         *
         * <p>{@code connect} throws {@code UnsupportedOperationException} if the native
         * library was built without TLS (cargo feature {@code tls}), and {@code
         * IllegalArgumentException} if {@code serverName} is neither a DNS name nor an IP
         * address or the trust store holds no usable certificate.
         *
         * @throws NullPointerException if {@code serverName} is null
         * @throws IllegalArgumentException if {@code serverName} is empty
         */
        public Options tls(String serverName) {
            this.tlsServerName = serverName(serverName);
            this.tlsCaPem = null;
            return this;
        }

        /**
         * Connects over TLS, trusting only the CA certificates in {@code pem} (one or more
         * PEM {@code CERTIFICATE} blocks, as bytes): for a relay with a private CA or a
         * self-signed certificate, the CA bundled with the app. The array is copied now:
         * the app may reuse it. Replaces an earlier {@link #tls}; otherwise as {@link #tls}.
         *
         * <p>{@code connect} throws {@code IllegalArgumentException} naming the problem if
         * the PEM is malformed or holds no usable certificate, and {@code
         * UnsupportedOperationException} if the native library was built without TLS.
         *
         * @throws NullPointerException if {@code serverName} or {@code pem} is null
         * @throws IllegalArgumentException if {@code serverName} or {@code pem} is empty
         */
        public Options tlsCaPem(String serverName, byte[] pem) {
            Objects.requireNonNull(pem, "pem");
            if (pem.length == 0) {
                throw new IllegalArgumentException("the CA PEM is empty");
            }
            this.tlsServerName = serverName(serverName);
            this.tlsCaPem = pem.clone();
            return this;
        }

        private static String serverName(String serverName) {
            Objects.requireNonNull(serverName, "serverName");
            if (serverName.isEmpty()) {
                throw new IllegalArgumentException("the TLS server name is empty");
            }
            return serverName;
        }
    }

    /**
     * Starts a client for {@code user} on the relay at {@code host:port} with {@code
     * options} and returns at once: {@code onConnected} follows when it has logged in (it
     * may come before this method returns). Resolves {@code host} first, and with {@link
     * Options#tls} reads the system trust store, so it may block: call it off the UI thread.
     * The options are copied (see {@link Options}): changing them later affects no client.
     *
     * @param options how to connect ({@code new Options()} for every default)
     * @param listener the events; held until {@code onClosed}
     * @throws java.net.UnknownHostException if {@code host} does not resolve
     * @throws IOException if the system refuses a resource (a thread, a pipe)
     * @throws IllegalArgumentException for a port out of range, user 0, or TLS options the
     *     library cannot use (the message names the problem: a bad PEM, a server name that
     *     is no DNS name or IP address, an empty trust store)
     * @throws UnsupportedOperationException for TLS options when the native library was
     *     built without TLS (cargo feature {@code tls})
     * @throws NullPointerException if {@code host}, {@code options} or {@code listener} is
     *     null
     */
    public static ImRelayClient connect(
            String host, int port, long user, Options options, Listener listener)
            throws IOException {
        Objects.requireNonNull(host, "host");
        Objects.requireNonNull(options, "options");
        Objects.requireNonNull(listener, "listener");
        return new ImRelayClient(
                nativeConnect(
                        host,
                        port,
                        user,
                        listener,
                        options.tokens,
                        options.device,
                        options.backgroundDisconnectAfterMs,
                        options.tlsServerName,
                        options.tlsCaPem));
    }

    /**
     * Starts a client over plain TCP: as {@link #connect(String, int, long, Options,
     * Listener)} with {@link Options#tokens} and {@link Options#device} set when not null.
     *
     * @param tokens where login tokens come from, or {@code null} for a static, empty
     *     credential (a relay that checks no tokens); for a fixed token pass {@code u -> token}
     * @param device this install's device id (1 to 64 bytes of UTF-8, the same at every
     *     start of the app), or {@code null} for the user's default device
     * @param listener the events; held until {@code onClosed}
     * @throws java.net.UnknownHostException if {@code host} does not resolve
     * @throws IOException if the system refuses a resource (a thread, a pipe)
     * @throws IllegalArgumentException for a port out of range, user 0 or a bad device id
     */
    public static ImRelayClient connect(
            String host, int port, long user, TokenProvider tokens, String device, Listener listener)
            throws IOException {
        return connect(host, port, user, tokens, device, listener, -1);
    }

    /**
     * As {@link #connect(String, int, long, TokenProvider, String, Listener)}, with a
     * background policy (see {@link #setForeground} and {@link
     * Options#backgroundDisconnectAfterMs}).
     *
     * @param backgroundDisconnectAfterMs below 0: keep the link while the app is in the
     *     background (heartbeating as seldom as the relay allows; the default); 0 or more:
     *     close it cleanly this many milliseconds after {@code setForeground(false)}, and do
     *     not reconnect until {@code setForeground(true)}
     */
    public static ImRelayClient connect(
            String host,
            int port,
            long user,
            TokenProvider tokens,
            String device,
            Listener listener,
            long backgroundDisconnectAfterMs)
            throws IOException {
        Options options = new Options();
        if (tokens != null) {
            options.tokens(tokens);
        }
        if (device != null) {
            options.device(device);
        }
        if (backgroundDisconnectAfterMs >= 0) {
            options.backgroundDisconnectAfterMs(backgroundDisconnectAfterMs);
        }
        return connect(host, port, user, options, listener);
    }

    /**
     * Queues a direct message to {@code to}; returns its id. Exactly one {@code onDelivered}
     * or {@code onFailed} with that id follows (a recipient offline fails it).
     *
     * @throws IllegalStateException if the client is closed or its outbox is full
     * @throws IllegalArgumentException if {@code to} is 0 or the payload is too large
     */
    public long send(long to, byte[] payload) {
        Objects.requireNonNull(payload, "payload");
        lock.readLock().lock();
        try {
            return nativeSend(live(), to, payload);
        } finally {
            lock.readLock().unlock();
        }
    }

    /**
     * Queues a stored message to {@code to}, kept by the relay until every device of the
     * recipient got it; returns its id. Exactly one {@code onStored} or {@code onFailed}
     * with that id follows.
     *
     * @throws IllegalStateException if the client is closed or its outbox is full
     * @throws IllegalArgumentException if {@code to} is 0 or the payload is too large
     */
    public long sendStored(long to, byte[] payload) {
        Objects.requireNonNull(payload, "payload");
        lock.readLock().lock();
        try {
            return nativeSendStored(live(), to, payload);
        } finally {
            lock.readLock().unlock();
        }
    }

    /**
     * Joins a room ({@code onRoomState} answers); the client joins it again after every
     * reconnect.
     *
     * @throws IllegalStateException if the client is closed
     */
    public void join(long room) {
        lock.readLock().lock();
        try {
            nativeJoin(live(), room);
        } finally {
            lock.readLock().unlock();
        }
    }

    /**
     * Leaves a room.
     *
     * @throws IllegalStateException if the client is closed
     */
    public void leave(long room) {
        lock.readLock().lock();
        try {
            nativeLeave(live(), room);
        } finally {
            lock.readLock().unlock();
        }
    }

    /**
     * Sends a live message to a room (not kept, not resent).
     *
     * @throws IllegalStateException if the client is closed or not connected now
     */
    public void roomSend(long room, byte[] payload) {
        Objects.requireNonNull(payload, "payload");
        lock.readLock().lock();
        try {
            nativeRoomSend(live(), room, payload);
        } finally {
            lock.readLock().unlock();
        }
    }

    /**
     * Tells the client whether the app is in the foreground: call it from the activity
     * lifecycle ({@code onStart}/{@code onStop}, or {@code ProcessLifecycleOwner}). In the
     * background the client heartbeats as seldom as the relay allows; with a background
     * policy given to {@code connect}, it closes the link after the grace period ({@code
     * onDisconnected}) and reconnects only when the app is in the foreground again, at
     * once. Any thread; repeating the current state does nothing.
     *
     * @throws IllegalStateException if the client is closed
     */
    public void setForeground(boolean foreground) {
        lock.readLock().lock();
        try {
            nativeSetForeground(live(), foreground);
        } finally {
            lock.readLock().unlock();
        }
    }

    /**
     * Tells the client the network changed (Wi-Fi to cellular, say): it drops the link and
     * connects again now instead of waiting for a heartbeat to time out. Nothing is lost:
     * unanswered messages are resent. On Android, call it from a {@code
     * ConnectivityManager.NetworkCallback}.
     *
     * @throws IllegalStateException if the client is closed
     */
    public void networkChanged() {
        lock.readLock().lock();
        try {
            nativeNetworkChanged(live());
        } finally {
            lock.readLock().unlock();
        }
    }

    /**
     * How many times the client logged in again after its first login ({@code onConnected}
     * calls minus one, counted before each call). After {@link #close}, the count at close.
     */
    public long reconnects() {
        lock.readLock().lock();
        try {
            return handle == 0 ? reconnectsAtClose : nativeReconnects(handle);
        } finally {
            lock.readLock().unlock();
        }
    }

    /**
     * Starts closing and returns at once; {@code onClosed} follows. Unlike {@link #close}
     * it may be called from a callback. It frees nothing: {@link #close} still must be
     * called (from a thread other than the network thread). Does nothing once closed.
     */
    public void shutdown() {
        lock.readLock().lock();
        try {
            if (handle != 0) {
                nativeShutdown(handle);
            }
        } finally {
            lock.readLock().unlock();
        }
    }

    /**
     * Closes the client: messages never written fail, those in flight get their answers,
     * then {@code onClosed}; returns after {@code onClosed} has returned, and frees the
     * native side. Idempotent: a second call (or a concurrent one) returns once the client
     * is closed. Callbacks may still call the client while it closes (their calls fail with
     * {@code IllegalStateException} once it is closed).
     *
     * @throws IllegalStateException if called from a callback of this client (on its
     *     network thread, which cannot wait for itself to end): use {@link #shutdown} there
     */
    @Override
    public void close() {
        lock.readLock().lock();
        try {
            if (handle != 0 && nativeOnNetworkThread(handle)) {
                throw new IllegalStateException(
                        "close() from a callback of this client: call shutdown() there");
            }
        } finally {
            lock.readLock().unlock();
        }
        synchronized (closing) {
            // Waits for the network thread under the read lock: its callbacks may still call
            // the client (they take the read lock too) while it delivers the last events.
            lock.readLock().lock();
            try {
                if (handle == 0) {
                    return;
                }
                nativeStop(handle);
            } finally {
                lock.readLock().unlock();
            }
            lock.writeLock().lock();
            try {
                if (handle != 0) {
                    reconnectsAtClose = nativeReconnects(handle);
                    long h = handle;
                    handle = 0;
                    nativeFree(h);
                }
            } finally {
                lock.writeLock().unlock();
            }
        }
    }

    /** The handle, or IllegalStateException once closed. Call with the read lock held. */
    private long live() {
        if (handle == 0) {
            throw new IllegalStateException("client closed");
        }
        return handle;
    }

    /**
     * The fields of {@link Options} are passed one by one (not read by name from native
     * code, which R8 could break): {@code tlsServerName} null is plain TCP, {@code
     * tlsCaPem} null with a server name is the system trust store.
     */
    private static native long nativeConnect(
            String host,
            int port,
            long user,
            Listener listener,
            TokenProvider tokens,
            String device,
            long backgroundDisconnectAfterMs,
            String tlsServerName,
            byte[] tlsCaPem)
            throws IOException;

    private static native long nativeSend(long handle, long to, byte[] payload);

    private static native long nativeSendStored(long handle, long to, byte[] payload);

    private static native void nativeJoin(long handle, long room);

    private static native void nativeLeave(long handle, long room);

    private static native void nativeRoomSend(long handle, long room, byte[] payload);

    private static native void nativeNetworkChanged(long handle);

    private static native void nativeSetForeground(long handle, boolean foreground);

    private static native long nativeReconnects(long handle);

    private static native boolean nativeOnNetworkThread(long handle);

    private static native void nativeShutdown(long handle);

    private static native void nativeStop(long handle);

    private static native void nativeFree(long handle);
}
