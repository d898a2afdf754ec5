//! The Java binding (feature "java"), for Android apps: the native methods of
//! `io.imrelay.ImRelayClient` (`bindings/java/io/imrelay/ImRelayClient.java`), compiled into
//! the same `libimrelay.so` as the C ABI (`src/ffi.rs`).
//!
//! This file owns the native half of one Java client: a handle (a `jlong` that is a boxed
//! [`Native`]: the `Arc<SharedClient>`, the [`Listener`] network thread and a count of
//! logins), the calls from the SDK's thread into the app's Java `Listener` and
//! `TokenProvider`, and the mapping of every failure to a Java exception.
//!
//! Connect options: `ImRelayClient.Options` reaches `nativeConnect` as plain parameters,
//! one per option, and becomes a [`ClientConfig`]; TLS there is built by
//! [`tls_setting`], the helper the C ABI's `imrelay_options_set_tls*` use too, so a build
//! without the "tls" feature refuses it the same way (`UnsupportedOperationException`).
//!
//! Ownership: `nativeConnect` makes the handle; `nativeFree` (called once by `close()`)
//! frees it. The Java class guards the handle with a read-write lock: every call that uses
//! the handle holds the read lock, `nativeFree` runs under the write lock with no
//! other call in progress, and the field is zeroed before the lock is let go, so no call
//! can see a freed handle. The Java listener and token provider are held as `GlobalRef`s:
//! the listener's by the network thread's closure (dropped when that thread ends after
//! `onClosed`), the provider's by the client's config (dropped with the client, in
//! `nativeFree`).
//!
//! Threads: the SDK's network thread ([`Listener`]) attaches itself to the JVM once, as a
//! daemon (it stays attached until it ends, so every callback of a client sees the same
//! `Thread`, and a client the app forgot to close does not keep the JVM from exiting), and
//! calls the Java listener for each event in a local-reference frame of its own (an
//! attached native thread never returns to Java, so local references would pile up
//! otherwise). Only methods of the app's objects are looked up on that thread, never a
//! class by name: on Android a native thread's class loader cannot see the app's classes.
//! The token provider runs on whichever thread drives the client (the network thread, or
//! an app thread inside a send), with the client's lock held.
//!
//! Rules every native method keeps, like `src/ffi.rs`: no panic crosses into the JVM (each
//! body runs under `catch_unwind`; a panic becomes an `IllegalStateException`), no JNI
//! result is unwrapped (a failure becomes a Java exception thrown back to the caller), and
//! a Java exception thrown by a callback is printed (`ExceptionDescribe`, to stderr or
//! logcat), cleared and logged: it never ends the network thread.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, ThreadId};
use std::time::Duration;

use ::jni::objects::{GlobalRef, JByteArray, JClass, JObject, JString, JValue};
use ::jni::sys::{jboolean, jint, jlong, JNI_FALSE, JNI_TRUE};
use ::jni::{JNIEnv, JavaVM};

use crate::client::{
    tls_setting, Background, ClientConfig, Event, Listener, SendError, SharedClient, TlsCa,
    TlsRequestError, TlsSetting, TokenProvider,
};
use crate::proto::{MessageId, RoomId, UserId};

const ILLEGAL_STATE: &str = "java/lang/IllegalStateException";
const ILLEGAL_ARGUMENT: &str = "java/lang/IllegalArgumentException";
const NULL_POINTER: &str = "java/lang/NullPointerException";
const IO: &str = "java/io/IOException";
const UNKNOWN_HOST: &str = "java/net/UnknownHostException";
const UNSUPPORTED: &str = "java/lang/UnsupportedOperationException";

/// Local references one callback makes (a payload array, a string): the frame's capacity.
const CALLBACK_FRAME: i32 = 8;

/// Why a native method failed; [`Fail::throw`] turns it into the Java exception the
/// caller gets.
#[derive(Debug)]
enum Fail {
    /// A JNI call failed. If it left a Java exception pending, that one propagates;
    /// otherwise an `IllegalStateException` says which call failed.
    Jni(::jni::errors::Error),
    /// A required argument was null: `NullPointerException`.
    Null(&'static str),
    /// An argument is out of range: `IllegalArgumentException`.
    Invalid(String),
    /// The host did not resolve: `UnknownHostException`.
    UnknownHost(String),
    /// This build of the library lacks what was asked for (TLS without the "tls"
    /// feature): `UnsupportedOperationException`.
    Unsupported(String),
    /// The system refused a resource (the wake pipe, the network thread): `IOException`.
    System(String),
    /// The SDK refused a send or a room call.
    Send(SendError),
    /// The client is closed (its handle is 0): `IllegalStateException`.
    Closed,
    /// `close()` on the client's own network thread, which cannot wait for itself.
    CloseFromCallback,
    /// A bug inside the library, caught before it reached the JVM.
    Panic,
}

impl From<::jni::errors::Error> for Fail {
    fn from(e: ::jni::errors::Error) -> Fail {
        Fail::Jni(e)
    }
}

impl Fail {
    /// The Java exception class for this failure.
    fn class(&self) -> &'static str {
        match self {
            Fail::Null(_) => NULL_POINTER,
            Fail::Invalid(_) => ILLEGAL_ARGUMENT,
            Fail::UnknownHost(_) => UNKNOWN_HOST,
            Fail::Unsupported(_) => UNSUPPORTED,
            Fail::System(_) => IO,
            Fail::Send(SendError::TooLarge | SendError::InvalidRecipient) => ILLEGAL_ARGUMENT,
            Fail::Send(_) => ILLEGAL_STATE,
            Fail::Jni(_) | Fail::Closed | Fail::CloseFromCallback | Fail::Panic => ILLEGAL_STATE,
        }
    }

    /// Throws the matching exception, unless a Java exception is already pending (it then
    /// propagates as it is: it says more than we could).
    fn throw(self, env: &mut JNIEnv) {
        if env.exception_check().unwrap_or(false) {
            return;
        }
        let class = self.class();
        if let Err(e) = env.throw_new(class, self.to_string()) {
            log::error!("imrelay: cannot throw {class} ({self}): {e}");
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Jni(e) => write!(f, "imrelay: JNI call failed: {e}"),
            Fail::Null(what) => write!(f, "{what} is null"),
            Fail::Invalid(why) => f.write_str(why),
            Fail::UnknownHost(host) => write!(f, "cannot resolve {host}"),
            Fail::System(why) | Fail::Unsupported(why) => f.write_str(why),
            Fail::Send(e) => write!(f, "{e}"),
            Fail::Closed => f.write_str("client closed"),
            Fail::CloseFromCallback => f.write_str(
                "close() called from a callback, on the client's own network thread, which \
                 cannot wait for itself: call shutdown() there, close() from another thread",
            ),
            Fail::Panic => f.write_str("imrelay: internal error (panic caught)"),
        }
    }
}

impl std::error::Error for Fail {}

/// Runs a native method's `body` with panics caught; a failure (or a panic) is thrown as
/// a Java exception and the method returns `fallback` (which Java never sees).
fn boundary<'local, T>(
    env: &mut JNIEnv<'local>,
    fallback: T,
    body: impl FnOnce(&mut JNIEnv<'local>) -> Result<T, Fail>,
) -> T {
    let outcome = catch_unwind(AssertUnwindSafe(|| body(env)));
    let fail = match outcome {
        Ok(Ok(value)) => return value,
        Ok(Err(fail)) => fail,
        Err(_) => Fail::Panic,
    };
    fail.throw(env);
    fallback
}

/// The native half of one `ImRelayClient`; a `jlong` handle is a `Box<Native>`.
struct Native {
    client: Arc<SharedClient>,
    /// The network thread, until `nativeStop` takes it to stop it.
    listener: Mutex<Option<Listener>>,
    /// That thread's id, kept apart from `listener` so `close()` from a callback is
    /// refused even while another thread is stopping the listener.
    network_thread: Option<ThreadId>,
    /// `Connected` events so far (the first login, then one per reconnect).
    connected: Arc<AtomicU64>,
}

/// The client behind `handle`.
///
/// # Safety
/// `handle` must be 0 or a handle from `nativeConnect` not yet given to `nativeFree`:
/// `ImRelayClient` keeps this by calling with its read lock held and freeing under the
/// write lock (see the module docs).
unsafe fn native<'a>(handle: jlong) -> Result<&'a Native, Fail> {
    let ptr = handle as usize as *const Native;
    // SAFETY: per the contract above, `ptr` is NULL or points to a live `Native`, which
    // no one frees while this call runs.
    unsafe { ptr.as_ref() }.ok_or(Fail::Closed)
}

/// A Java string argument that must not be null.
fn string_arg(env: &mut JNIEnv, s: &JString, what: &'static str) -> Result<String, Fail> {
    if s.is_null() {
        return Err(Fail::Null(what));
    }
    Ok(env.get_string(s)?.into())
}

/// A Java byte array argument that must not be null, copied.
fn bytes_arg(env: &mut JNIEnv, a: &JByteArray, what: &'static str) -> Result<Vec<u8>, Fail> {
    if a.is_null() {
        return Err(Fail::Null(what));
    }
    Ok(env.convert_byte_array(a)?)
}

/// A Java `long` carrying an unsigned 64-bit id (the bits as they are).
fn id_arg(value: jlong) -> u64 {
    value as u64
}

/// An unsigned 64-bit id as a Java `long` (the bits as they are).
fn id_out(value: u64) -> jlong {
    value as jlong
}

// ---- connect ------------------------------------------------------------------------------

/// `static native long nativeConnect(String host, int port, long user, Listener listener,
/// TokenProvider tokens, String device, long backgroundDisconnectAfterMs, String
/// tlsServerName, byte[] tlsCaPem)`: starts a client that connects (and reconnects) by
/// itself, and its network thread calling `listener`. Returns the handle.
///
/// The parameters after `listener` are the fields of `ImRelayClient.Options`, one by one
/// (`OptionArgs`): passed as parameters rather than read from the object by field name,
/// so nothing here depends on names that R8 could rename, and the method's signature says
/// everything native code reads. A new option is one more parameter here and in Java.
///
/// Throws `UnknownHostException` if `host` does not resolve, `IllegalArgumentException`
/// for a port out of range, user 0, an invalid device id or unusable TLS options (a server
/// name that is no DNS name or IP address, a PEM without a certificate, an empty system
/// trust store), `UnsupportedOperationException` for TLS from a library built without the
/// "tls" feature, `NullPointerException` for a null host or listener, `IOException` if the
/// system refuses a pipe or a thread.
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeConnect<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    host: JString<'local>,
    port: jint,
    user: jlong,
    listener: JObject<'local>,
    tokens: JObject<'local>,
    device: JString<'local>,
    background_disconnect_after_ms: jlong,
    tls_server_name: JString<'local>,
    tls_ca_pem: JByteArray<'local>,
) -> jlong {
    let options = OptionArgs {
        tokens: &tokens,
        device: &device,
        background_disconnect_after_ms,
        tls_server_name: &tls_server_name,
        tls_ca_pem: &tls_ca_pem,
    };
    boundary(&mut env, 0, |env| {
        connect(env, &host, port, user, &listener, &options)
    })
}

/// The fields of `ImRelayClient.Options` as `nativeConnect` gets them.
struct OptionArgs<'a, 'local> {
    /// The `TokenProvider`, or null for an empty credential.
    tokens: &'a JObject<'local>,
    /// The device id, or null for the user's default device.
    device: &'a JString<'local>,
    /// Below 0: [`Background::KeepAlive`]; else [`Background::DisconnectAfter`] this many
    /// milliseconds.
    background_disconnect_after_ms: jlong,
    /// Null: plain TCP; else TLS, the name the relay's certificate must carry.
    tls_server_name: &'a JString<'local>,
    /// With TLS: the CA certificates (PEM) to trust, or null for the system trust store.
    tls_ca_pem: &'a JByteArray<'local>,
}

fn connect(
    env: &mut JNIEnv,
    host: &JString,
    port: jint,
    user: jlong,
    listener: &JObject,
    options: &OptionArgs,
) -> Result<jlong, Fail> {
    let host = string_arg(env, host, "host")?;
    if listener.is_null() {
        return Err(Fail::Null("listener"));
    }
    let port = u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| Fail::Invalid(format!("port {port} is not in 1..=65535")))?;
    let user = id_arg(user);
    if user == 0 {
        return Err(Fail::Invalid("user id 0 is reserved".to_string()));
    }
    let vm = Arc::new(env.get_java_vm()?);
    let config = client_config(env, &vm, UserId(user), options)?;
    let addr = resolve(&host, port)?;
    let listener = env.new_global_ref(listener)?;
    let client = SharedClient::start(addr, config)
        .map_err(|e| Fail::System(format!("cannot start the client: {e}")))?;
    let client = Arc::new(client);
    let connected = Arc::new(AtomicU64::new(0));
    let callback = {
        let connected = Arc::clone(&connected);
        let mut named = false;
        move |event: Event| on_event(&vm, &listener, &connected, &mut named, &event)
    };
    let listener = Listener::start(Arc::clone(&client), callback)
        .map_err(|e| Fail::System(format!("cannot start the network thread: {e}")))?;
    let native = Box::new(Native {
        client,
        network_thread: listener.thread_id(),
        listener: Mutex::new(Some(listener)),
        connected,
    });
    Ok(Box::into_raw(native) as usize as jlong)
}

/// The client's settings for `user` from the Java options (everything copied, the token
/// provider held as a global reference).
fn client_config(
    env: &mut JNIEnv,
    vm: &Arc<JavaVM>,
    user: UserId,
    options: &OptionArgs,
) -> Result<ClientConfig, Fail> {
    let mut config = ClientConfig::new(user);
    config.device = device_arg(env, options.device)?;
    config.background = background_arg(options.background_disconnect_after_ms);
    config.use_tls(tls_arg(env, options.tls_server_name, options.tls_ca_pem)?);
    if !options.tokens.is_null() {
        let provider = env.new_global_ref(options.tokens)?;
        config.token_provider = Some(token_provider(Arc::clone(vm), provider));
    }
    Ok(config)
}

/// A device id (null: none), checked as the relay checks it.
fn device_arg(env: &mut JNIEnv, device: &JString) -> Result<Option<String>, Fail> {
    if device.is_null() {
        return Ok(None);
    }
    let device: String = env.get_string(device)?.into();
    if !crate::proto::device::valid_device(&device) {
        return Err(Fail::Invalid(
            "a device id is 1 to 64 bytes of UTF-8 without control characters".to_string(),
        ));
    }
    Ok(Some(device))
}

/// The background policy: below 0 keep the link, else disconnect after that many ms.
fn background_arg(disconnect_after_ms: jlong) -> Background {
    match u64::try_from(disconnect_after_ms) {
        Ok(ms) => Background::DisconnectAfter(Duration::from_millis(ms)),
        Err(_) => Background::KeepAlive,
    }
}

/// The TLS options (null server name: none, plain TCP), built by the same
/// [`tls_setting`] as the C ABI's `imrelay_options_set_tls*`: the PEM is copied and
/// parsed (or the system trust store read) now.
fn tls_arg(
    env: &mut JNIEnv,
    server_name: &JString,
    ca_pem: &JByteArray,
) -> Result<Option<TlsSetting>, Fail> {
    if server_name.is_null() {
        return Ok(None);
    }
    let server_name: String = env.get_string(server_name)?.into();
    let ca = if ca_pem.is_null() {
        TlsCa::SystemRoots
    } else {
        TlsCa::Pem(env.convert_byte_array(ca_pem)?)
    };
    match tls_setting(&server_name, ca) {
        Ok(tls) => Ok(Some(tls)),
        Err(e @ TlsRequestError::Unsupported) => Err(Fail::Unsupported(e.to_string())),
        Err(TlsRequestError::Invalid(why)) => Err(Fail::Invalid(format!("TLS options: {why}"))),
    }
}

/// The first address `host:port` resolves to (blocks on DNS for a name).
fn resolve(host: &str, port: u16) -> Result<SocketAddr, Fail> {
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Fail::UnknownHost(host.to_string()))
}

// ---- calls into Java ----------------------------------------------------------------------

/// Why a call into the app's Java code did not complete; logged, never thrown.
#[derive(Debug)]
enum CallbackError {
    /// The thread could not attach to the JVM, or a JNI call failed.
    Jni(::jni::errors::Error),
    /// The Java method threw (the exception was printed and cleared).
    Threw(&'static str),
    /// The provider returned null (no token now).
    NoToken,
}

impl From<::jni::errors::Error> for CallbackError {
    fn from(e: ::jni::errors::Error) -> CallbackError {
        CallbackError::Jni(e)
    }
}

impl fmt::Display for CallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallbackError::Jni(e) => write!(f, "JNI call failed: {e}"),
            CallbackError::Threw(method) => write!(f, "{method} threw (printed above)"),
            CallbackError::NoToken => f.write_str("no token (null)"),
        }
    }
}

impl std::error::Error for CallbackError {}

/// After a call into Java: if it threw, print the exception (stderr, or logcat on
/// Android), clear it so the thread can go on, and report which method threw.
fn check_thrown(env: &mut JNIEnv, method: &'static str) -> Result<(), CallbackError> {
    if env.exception_check()? {
        // Printing clears it too; clear again in case describing failed.
        let _ = env.exception_describe();
        env.exception_clear()?;
        return Err(CallbackError::Threw(method));
    }
    Ok(())
}

/// Calls `method` (returning void) on `target`, then [`check_thrown`].
fn call_void(
    env: &mut JNIEnv,
    target: &JObject,
    method: &'static str,
    sig: &str,
    args: &[JValue],
) -> Result<(), CallbackError> {
    let called = env.call_method(target, method, sig, args);
    check_thrown(env, method)?;
    called?;
    Ok(())
}

/// The name the network thread has in Java (`Thread.getName()`), for stack dumps.
const THREAD_NAME: &str = "imrelay-network";

/// The network thread's closure: counts logins, then hands `event` to the Java listener.
/// `named` is false until the thread has its Java name.
fn on_event(
    vm: &JavaVM,
    listener: &GlobalRef,
    connected: &AtomicU64,
    named: &mut bool,
    event: &Event,
) {
    if matches!(event, Event::Connected { .. }) {
        // Before the callback, so `reconnects()` called from onConnected counts this one.
        connected.fetch_add(1, Ordering::SeqCst);
    }
    match catch_unwind(AssertUnwindSafe(|| deliver(vm, listener, named, event))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("imrelay: Java listener: {e}"),
        Err(_) => log::error!("imrelay: internal error delivering an event (panic caught)"),
    }
}

/// Attaches this thread (once: it stays attached, as a daemon, until it ends; the first
/// time it also gets its Java name) and calls the listener method for `event` inside a
/// local-reference frame of its own.
fn deliver(
    vm: &JavaVM,
    listener: &GlobalRef,
    named: &mut bool,
    event: &Event,
) -> Result<(), CallbackError> {
    let mut env = vm.attach_current_thread_as_daemon()?;
    env.with_local_frame(CALLBACK_FRAME, |env| {
        if !*named {
            *named = true;
            if let Err(e) = name_thread(env) {
                log::warn!("imrelay: naming the network thread: {e}");
            }
        }
        dispatch(env, listener.as_obj(), event)
    })
}

/// `Thread.currentThread().setName(THREAD_NAME)` (a system class: found by any class
/// loader, an Android native thread's included).
fn name_thread(env: &mut JNIEnv) -> Result<(), CallbackError> {
    let current = env.call_static_method(
        "java/lang/Thread",
        "currentThread",
        "()Ljava/lang/Thread;",
        &[],
    );
    check_thrown(env, "currentThread")?;
    let current = current?.l()?;
    let name = env.new_string(THREAD_NAME)?;
    call_void(
        env,
        &current,
        "setName",
        "(Ljava/lang/String;)V",
        &[(&name).into()],
    )
}

/// The Java listener method for each event (see `ImRelayClient.Listener`).
fn dispatch(env: &mut JNIEnv, l: &JObject, event: &Event) -> Result<(), CallbackError> {
    match event {
        Event::Connected { user, .. } => {
            call_void(env, l, "onConnected", "(J)V", &[id_out(user.0).into()])
        }
        Event::Disconnected { reason, .. } => {
            let reason = env.new_string(reason.to_string())?;
            call_void(
                env,
                l,
                "onDisconnected",
                "(Ljava/lang/String;)V",
                &[(&reason).into()],
            )
        }
        Event::Message { from, id, payload } => {
            let payload = env.byte_array_from_slice(payload)?;
            call_void(
                env,
                l,
                "onMessage",
                "(JJ[B)V",
                &[
                    id_out(from.0).into(),
                    id_out(id.0).into(),
                    (&payload).into(),
                ],
            )
        }
        Event::SentFromOtherDevice { to, id, payload } => {
            let payload = env.byte_array_from_slice(payload)?;
            call_void(
                env,
                l,
                "onSentFromOtherDevice",
                "(JJ[B)V",
                &[id_out(to.0).into(), id_out(id.0).into(), (&payload).into()],
            )
        }
        Event::RoomMessage {
            room,
            from,
            payload,
        } => {
            let payload = env.byte_array_from_slice(payload)?;
            call_void(
                env,
                l,
                "onRoomMessage",
                "(JJ[B)V",
                &[
                    id_out(room.0).into(),
                    id_out(from.0).into(),
                    (&payload).into(),
                ],
            )
        }
        Event::RoomMissed { room, missed } => call_void(
            env,
            l,
            "onRoomMissed",
            "(JJ)V",
            &[id_out(room.0).into(), id_out(*missed).into()],
        ),
        Event::RoomState {
            room,
            members,
            is_member,
        } => call_void(
            env,
            l,
            "onRoomState",
            "(JIZ)V",
            &[
                id_out(room.0).into(),
                count_out(*members).into(),
                JValue::Bool(if *is_member { JNI_TRUE } else { JNI_FALSE }),
            ],
        ),
        Event::Delivered { id, devices } => call_void(
            env,
            l,
            "onDelivered",
            "(JI)V",
            &[id_out(id.0).into(), count_out(*devices).into()],
        ),
        Event::Stored { id, devices } => call_void(
            env,
            l,
            "onStored",
            "(JI)V",
            &[id_out(id.0).into(), count_out(*devices).into()],
        ),
        Event::Gap { from, to } => call_void(
            env,
            l,
            "onGap",
            "(JJ)V",
            &[id_out(*from).into(), id_out(*to).into()],
        ),
        Event::Failed { id, reason } => {
            let reason = env.new_string(reason.to_string())?;
            call_void(
                env,
                l,
                "onFailed",
                "(JLjava/lang/String;)V",
                &[id_out(id.0).into(), (&reason).into()],
            )
        }
        Event::Error { code, reason } => {
            let reason = env.new_string(reason)?;
            call_void(
                env,
                l,
                "onError",
                "(ILjava/lang/String;)V",
                &[jint::from(*code).into(), (&reason).into()],
            )
        }
        Event::TokenExpiring { exp } => {
            call_void(env, l, "onTokenExpiring", "(J)V", &[id_out(*exp).into()])
        }
        Event::TokenRefreshed { exp } => {
            call_void(env, l, "onTokenRefreshed", "(J)V", &[id_out(*exp).into()])
        }
        Event::RefreshFailed { code, reason } => {
            let reason = env.new_string(reason)?;
            call_void(
                env,
                l,
                "onRefreshFailed",
                "(ILjava/lang/String;)V",
                &[jint::from(*code).into(), (&reason).into()],
            )
        }
        Event::Closed => call_void(env, l, "onClosed", "()V", &[]),
    }
}

/// A count as a Java `int` (saturating: a count never gets near 2^31 in practice).
fn count_out(n: u32) -> jint {
    jint::try_from(n).unwrap_or(jint::MAX)
}

/// A [`TokenProvider`] that asks the Java `TokenProvider` (`byte[] token(long user)`).
/// A null answer, an exception or a JNI failure is logged and gives an empty token ("none
/// now", see [`TokenProvider`]).
fn token_provider(vm: Arc<JavaVM>, provider: GlobalRef) -> TokenProvider {
    Arc::new(move |user: UserId| {
        match catch_unwind(AssertUnwindSafe(|| ask_token(&vm, &provider, user))) {
            Ok(Ok(token)) => token,
            Ok(Err(e)) => {
                log::warn!("imrelay: Java token provider: {e}");
                Vec::new()
            }
            Err(_) => {
                log::error!("imrelay: internal error asking for a token (panic caught)");
                Vec::new()
            }
        }
    })
}

fn ask_token(vm: &JavaVM, provider: &GlobalRef, user: UserId) -> Result<Vec<u8>, CallbackError> {
    // An app thread (inside a send, say) is attached already: this is then a no-op.
    let mut env = vm.attach_current_thread_as_daemon()?;
    env.with_local_frame(CALLBACK_FRAME, |env| {
        let called = env.call_method(
            provider.as_obj(),
            "token",
            "(J)[B",
            &[id_out(user.0).into()],
        );
        check_thrown(env, "token")?;
        let token = called?.l()?;
        if token.is_null() {
            return Err(CallbackError::NoToken);
        }
        Ok(env.convert_byte_array(JByteArray::from(token))?)
    })
}

// ---- calls on a client --------------------------------------------------------------------

/// Runs `body` on the client behind `handle`, under [`boundary`].
fn with_native<'local, T>(
    env: &mut JNIEnv<'local>,
    handle: jlong,
    fallback: T,
    body: impl FnOnce(&mut JNIEnv<'local>, &Native) -> Result<T, Fail>,
) -> T {
    boundary(env, fallback, |env| {
        // SAFETY: `ImRelayClient` calls with its read lock held on a live (or 0) handle.
        let native = unsafe { native(handle) }?;
        body(env, native)
    })
}

/// `static native long nativeSend(long handle, long to, byte[] payload)`: queues a direct
/// message; returns its id (an `onDelivered` or `onFailed` with it follows).
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeSend<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    to: jlong,
    payload: JByteArray<'local>,
) -> jlong {
    send_with(&mut env, handle, to, &payload, |c, to, p| c.send(to, p))
}

/// `nativeSend` and `nativeSendStored`: the payload copied in, `send` called, the id out.
fn send_with<'local>(
    env: &mut JNIEnv<'local>,
    handle: jlong,
    to: jlong,
    payload: &JByteArray<'local>,
    send: impl FnOnce(&SharedClient, UserId, Vec<u8>) -> Result<MessageId, SendError>,
) -> jlong {
    with_native(env, handle, 0, |env, n| {
        let payload = bytes_arg(env, payload, "payload")?;
        let id = send(&n.client, UserId(id_arg(to)), payload).map_err(Fail::Send)?;
        Ok(id_out(id.0))
    })
}

/// `static native long nativeSendStored(long handle, long to, byte[] payload)`: queues a
/// stored message; returns its id (an `onStored` or `onFailed` with it follows).
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeSendStored<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    to: jlong,
    payload: JByteArray<'local>,
) -> jlong {
    send_with(&mut env, handle, to, &payload, |c, to, p| {
        c.send_stored(to, p)
    })
}

/// `static native void nativeJoin(long handle, long room)`: joins a room (an
/// `onRoomState` answers; re-joined after every reconnect).
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeJoin<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    room: jlong,
) {
    with_native(&mut env, handle, (), |_, n| {
        n.client.join(RoomId(id_arg(room))).map_err(Fail::Send)
    })
}

/// `static native void nativeLeave(long handle, long room)`: leaves a room.
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeLeave<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    room: jlong,
) {
    with_native(&mut env, handle, (), |_, n| {
        n.client.leave(RoomId(id_arg(room))).map_err(Fail::Send)
    })
}

/// `static native void nativeRoomSend(long handle, long room, byte[] payload)`: sends a
/// live room message (needs a live link).
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeRoomSend<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    room: jlong,
    payload: JByteArray<'local>,
) {
    with_native(&mut env, handle, (), |env, n| {
        let payload = bytes_arg(env, &payload, "payload")?;
        n.client
            .room_send(RoomId(id_arg(room)), payload)
            .map_err(Fail::Send)
    })
}

/// `static native void nativeNetworkChanged(long handle)`: drops the link and connects
/// again now ([`SharedClient::reconnect`]).
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeNetworkChanged<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) {
    with_native(&mut env, handle, (), |_, n| {
        n.client.reconnect();
        Ok(())
    })
}

/// `static native void nativeSetForeground(long handle, boolean foreground)`: the app
/// went to the background or came back ([`SharedClient::set_foreground`]).
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeSetForeground<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
    foreground: jboolean,
) {
    with_native(&mut env, handle, (), |_, n| {
        n.client.set_foreground(foreground != JNI_FALSE);
        Ok(())
    })
}

/// `static native long nativeReconnects(long handle)`: logins after the first one.
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeReconnects<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) -> jlong {
    with_native(&mut env, handle, 0, |_, n| {
        let logins = n.connected.load(Ordering::SeqCst);
        Ok(jlong::try_from(logins.saturating_sub(1)).unwrap_or(jlong::MAX))
    })
}

/// `static native boolean nativeOnNetworkThread(long handle)`: true when called from a
/// callback of this client (on its network thread).
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeOnNetworkThread<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) -> jboolean {
    with_native(&mut env, handle, JNI_FALSE, |_, n| {
        Ok(if n.network_thread == Some(thread::current().id()) {
            JNI_TRUE
        } else {
            JNI_FALSE
        })
    })
}

/// `static native void nativeShutdown(long handle)`: starts closing and returns at once
/// (any thread, callbacks included): messages never written fail, those in flight get
/// their answers, then `onClosed`.
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeShutdown<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) {
    with_native(&mut env, handle, (), |_, n| {
        n.client.close();
        Ok(())
    })
}

/// `static native void nativeStop(long handle)`: closes the client and waits until the
/// network thread delivered `onClosed` and ended. Throws `IllegalStateException` on that
/// thread itself (from a callback). A second call finds the thread gone and returns.
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeStop<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) {
    with_native(&mut env, handle, (), |_, n| {
        if n.network_thread == Some(thread::current().id()) {
            return Err(Fail::CloseFromCallback);
        }
        n.client.close();
        let listener = n
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(listener) = listener {
            // The closure catches its own panics; a join error would be a bug in the SDK.
            if listener.stop().is_err() {
                log::error!("imrelay: the network thread panicked");
            }
        }
        Ok(())
    })
}

/// `static native void nativeFree(long handle)`: frees the native side (after
/// `nativeStop`): the client, its socket, and the token provider's global reference.
/// `ImRelayClient.close()` calls it once, under its write lock, and zeroes its handle.
#[no_mangle]
pub extern "system" fn Java_io_imrelay_ImRelayClient_nativeFree<'local>(
    mut env: JNIEnv<'local>,
    _class: JClass<'local>,
    handle: jlong,
) {
    boundary(&mut env, (), |_| {
        let ptr = handle as usize as *mut Native;
        if ptr.is_null() {
            return Ok(());
        }
        // SAFETY: `ptr` came from `Box::into_raw` in `connect`, and `ImRelayClient` frees it
        // once, under its write lock, so no other call is using it.
        let native = unsafe { Box::from_raw(ptr) };
        drop(native);
        Ok(())
    })
}
