//! The C ABI for iOS and Android apps: an opaque client handle over the thread-safe
//! [`SharedClient`], events as C structs the app frees, and a per-thread last error.
//!
//! Threads: every function taking a client may be called from any thread, concurrently
//! with `imrelay_poll_event` blocked on another (the usual shape: one thread polls, others
//! send). The exceptions are the two that free the handle, `imrelay_close` and
//! `imrelay_free`: no other call on that client may run or start once they are called.
//! `imrelay_shutdown` is the close any thread may call: the poll returns with the last
//! events, `CLOSED` last; free the handle after the polling thread has stopped.
//!
//! `include/imrelay.h` is generated from this file by cbindgen (`tests/c_abi.rs` fails when
//! the committed header is stale; run it with `IMRELAY_UPDATE_HEADER=1` to rewrite it).
//!
//! Rules every function here keeps: no panic crosses the boundary (each body runs under
//! `catch_unwind` and a panic becomes `IMRELAY_ERR_PANIC`); every pointer from C is checked
//! for NULL, and a data pointer is read only for the length given with it; strings from C
//! must be NUL-terminated UTF-8.
//!
//! TLS and login tokens are set on an options object (`imrelay_options_new`, the
//! `imrelay_options_set_*` calls) given to `imrelay_connect_with`.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::net::ToSocketAddrs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use crate::client::{
    tls_setting, ClientConfig, ConnectError, Event, FailReason, Listener, Polled, SendError,
    SharedClient, TlsCa, TlsRequestError,
};
use crate::proto::{RoomId, UserId};

/// Success.
pub const IMRELAY_OK: i32 = 0;
/// `imrelay_poll_event`: no event within the timeout.
pub const IMRELAY_TIMEOUT: i32 = 1;
/// A required pointer was NULL.
pub const IMRELAY_ERR_NULL: i32 = -1;
/// An argument is invalid (address not UTF-8 or not resolvable, user id 0, length too big).
pub const IMRELAY_ERR_INVALID: i32 = -2;
/// Connecting or logging in failed; the message says why.
pub const IMRELAY_ERR_CONNECT: i32 = -3;
/// The outbox is full: wait for Delivered/Failed events first.
pub const IMRELAY_ERR_OUTBOX_FULL: i32 = -4;
/// The payload is larger than the relay's max frame allows.
pub const IMRELAY_ERR_TOO_LARGE: i32 = -5;
/// Room traffic needs a live link.
pub const IMRELAY_ERR_NOT_CONNECTED: i32 = -6;
/// The client is closed.
pub const IMRELAY_ERR_CLOSED: i32 = -7;
/// A bug inside the library was caught before it could cross into C.
pub const IMRELAY_ERR_PANIC: i32 = -8;
/// This build of the library lacks the feature asked for (TLS: built without "tls").
pub const IMRELAY_ERR_UNSUPPORTED: i32 = -9;
/// The system refused a resource the library needs (a thread, a pipe: out of file
/// descriptors, say); the message says which.
pub const IMRELAY_ERR_SYSTEM: i32 = -10;

/// Logged in (again). `peer` = own user id, `count` = the relay's max frame.
pub const IMRELAY_EVENT_CONNECTED: i32 = 1;
/// The link is down; the client reconnects by itself. `count` = ms until the next attempt,
/// `code` = the relay's error code if it refused the login, `text` = why.
pub const IMRELAY_EVENT_DISCONNECTED: i32 = 2;
/// A direct message: `peer` = sender, `msg_id`, `data`/`len` = payload.
pub const IMRELAY_EVENT_MESSAGE: i32 = 3;
/// A sent message was delivered: `msg_id`, `count` = recipient connections.
pub const IMRELAY_EVENT_DELIVERED: i32 = 4;
/// A sent message failed: `msg_id`, `count` = an `IMRELAY_FAIL_*` value, `code` = the
/// relay's error code for `IMRELAY_FAIL_REJECTED`, `text` = why.
pub const IMRELAY_EVENT_FAILED: i32 = 5;
/// A room message: `room`, `peer` = sender, `data`/`len` = payload.
pub const IMRELAY_EVENT_ROOM_MESSAGE: i32 = 6;
/// A room's state: `room`, `count` = members, `code` = 1 if this client is a member.
pub const IMRELAY_EVENT_ROOM_STATE: i32 = 7;
/// Room messages dropped for this slow client: `room`, `count` = how many.
pub const IMRELAY_EVENT_ROOM_MISSED: i32 = 8;
/// An ERROR from the relay not tied to a message: `code`, `text`.
pub const IMRELAY_EVENT_ERROR: i32 = 9;
/// The client is closed: no more events.
pub const IMRELAY_EVENT_CLOSED: i32 = 10;
/// A stored message is in the recipient's inbox (on disk with a durable store): `msg_id`,
/// `count` = recipient connections it was pushed to right away.
pub const IMRELAY_EVENT_STORED: i32 = 11;
/// Stored messages expired before this client got them: sequence numbers `room` (from)
/// to `count` (to), both included.
pub const IMRELAY_EVENT_GAP: i32 = 12;
/// The relay says the login token expires soon: `count` = its `exp` (Unix seconds). With
/// a token provider the client has already asked it for a new token and sent REFRESH
/// (`TOKEN_REFRESHED` or `REFRESH_FAILED` follows); without one, call
/// `imrelay_refresh_token`, or let the relay close the link at expiry (the client then
/// logs in again).
pub const IMRELAY_EVENT_TOKEN_EXPIRING: i32 = 13;
/// The relay accepted a REFRESH: `count` = the new `exp` (Unix seconds; 0 from a relay
/// that checks no tokens).
pub const IMRELAY_EVENT_TOKEN_REFRESHED: i32 = 14;
/// The relay refused a REFRESH: `code` = its error code (AUTH_FAILED, 20), `text` = why.
/// The link stays up on the old token until it expires.
pub const IMRELAY_EVENT_REFRESH_FAILED: i32 = 15;
/// A stored message this user sent from another of its devices (protocol.md, section
/// 15.1): `peer` = the user it was sent to, `msg_id`, `data`/`len` = the message.
pub const IMRELAY_EVENT_SENT_FROM_OTHER_DEVICE: i32 = 16;

/// Failed: the relay refused the message (`code` says why).
pub const IMRELAY_FAIL_REJECTED: i32 = 1;
/// Failed: never written before the send timeout.
pub const IMRELAY_FAIL_NOT_SENT: i32 = 2;
/// Failed: written, but not confirmed before the send timeout or before `imrelay_close`
/// (including a message held for a resend after a "try later" answer): it may have
/// arrived, or (stored) be in the recipient's inbox. Its fate is unknown.
pub const IMRELAY_FAIL_UNCONFIRMED: i32 = 3;
/// Failed: the client was closed before the message was ever written.
pub const IMRELAY_FAIL_CLOSED: i32 = 4;

/// An opaque client, made by `imrelay_connect*` and freed by `imrelay_close` or
/// `imrelay_free` (exactly one of them, once). Any thread may use it, several at once:
/// typically one thread blocks in `imrelay_poll_event` while others call `imrelay_send`
/// and the rest; only the two freeing calls must not overlap with any other call on it.
pub struct ImrelayClient {
    client: Arc<SharedClient>,
    /// The network thread of `imrelay_start_listener`, if started.
    listener: Mutex<Option<Listener>>,
}

/// Gives the library a login token for `user`, e.g. a JWT the app's backend issued.
///
/// The library passes a buffer `out` of `cap` bytes (4096 at first, the relay's largest
/// token). Write the token there (no NUL needed) and return its length. If the token is
/// longer than `cap`, return its length without writing: the library calls again at once
/// with a buffer that large (up to 65536 bytes). Return a negative value for "no token
/// now": the LOGIN goes out with an empty credential (a relay checking tokens refuses it
/// and the client tries again after its backoff), and no REFRESH is sent.
///
/// When: at every connect and reconnect, just before the LOGIN, and when the relay sends
/// TOKEN_EXPIRING (for the REFRESH). Which thread: whichever thread is inside an
/// `imrelay_*` call that runs the client (`imrelay_connect_with` and `imrelay_poll_event`
/// chiefly, but a send or `imrelay_shutdown` on another thread may be the one), with the
/// client's lock held: never two at once for one client, never after `imrelay_close` or
/// `imrelay_free` returned. Clients that share a callback and `ctx` may run it
/// concurrently: it must then be thread-safe. It should return quickly (a cached token),
/// must not call `imrelay_*` functions on the same client (that would deadlock), and must
/// not unwind (throw) into the library.
///
/// Ownership: `out` belongs to the library and is valid only during the call. `ctx` is
/// the app's: the library passes it back unchanged, never reads or frees it; it must stay
/// valid until `imrelay_close` or `imrelay_free` returned for every client connected
/// with it.
pub type ImrelayTokenProvider =
    Option<unsafe extern "C" fn(user: u64, ctx: *mut c_void, out: *mut u8, cap: usize) -> isize>;

/// Connection options for `imrelay_connect_with`: credential or token provider, and TLS.
/// Made by `imrelay_options_new`, freed by `imrelay_options_free`; a client copies what
/// it needs at connect, so the options may be freed (or reused) right after.
pub struct ImrelayOptions {
    credential: Vec<u8>,
    device: Option<String>,
    provider: Option<crate::client::TokenProvider>,
    tls: Option<crate::client::TlsSetting>,
    background: crate::client::Background,
}

/// The app's `ctx` (or `user_data`) pointer, handed to its callback from whichever thread
/// drives the client: the callback's contract (see `ImrelayTokenProvider` and
/// `ImrelayListener`) makes that sound.
struct CallbackCtx(*mut c_void);
// SAFETY: the library never dereferences the pointer; the app promises (in the
// `ImrelayTokenProvider` and `ImrelayListener` contracts) that its callback may be called
// with it from the thread that drives a client, whichever that is.
unsafe impl Send for CallbackCtx {}
// SAFETY: as above.
unsafe impl Sync for CallbackCtx {}

/// The first buffer a token provider gets, and the largest one it may ask for.
const TOKEN_FIRST_CAP: usize = 4096;
const TOKEN_MAX_CAP: usize = 64 * 1024;

/// Calls a C token provider as [`ImrelayTokenProvider`] describes.
fn call_provider(
    callback: unsafe extern "C" fn(u64, *mut c_void, *mut u8, usize) -> isize,
    ctx: &CallbackCtx,
    user: UserId,
) -> Vec<u8> {
    let mut buf = vec![0u8; TOKEN_FIRST_CAP];
    for _ in 0..2 {
        // SAFETY: `buf` has `buf.len()` writable bytes for the duration of the call; the
        // app promised a callback that writes at most `cap` bytes.
        let n = unsafe { callback(user.0, ctx.0, buf.as_mut_ptr(), buf.len()) };
        let Ok(n) = usize::try_from(n) else {
            return Vec::new(); // negative: no token now
        };
        if n <= buf.len() {
            buf.truncate(n);
            return buf;
        }
        if n > TOKEN_MAX_CAP {
            log::warn!("token provider asked for {n} bytes, more than {TOKEN_MAX_CAP}");
            return Vec::new();
        }
        buf = vec![0u8; n];
    }
    log::warn!("token provider asked for a larger buffer twice");
    Vec::new()
}

/// One event. Allocated by the library and handed to the caller of `imrelay_poll_event`:
/// read it, then pass it to `imrelay_event_free` (once, from any thread). It, its `data`
/// and its `text` stay valid until then, whatever other threads do with the client (later
/// polls, `imrelay_shutdown`, even freeing the client). Read-only: another thread may read
/// it too if the app hands it over. Fields that do not apply to the kind are 0 (`data`
/// NULL, `text` an empty string).
#[repr(C)]
pub struct ImrelayEvent {
    /// One of the `IMRELAY_EVENT_*` values.
    pub kind: i32,
    /// The kind's error or flag code (see each kind).
    pub code: u16,
    /// A user id: the sender of a message, or this client's own id.
    pub peer: u64,
    /// The room of a room event.
    pub room: u64,
    /// The message id of a message, delivery or failure.
    pub msg_id: u64,
    /// The kind's count (see each kind).
    pub count: u64,
    /// The payload of a message (not NUL-terminated), or NULL.
    pub data: *const u8,
    /// The payload's length in bytes.
    pub len: usize,
    /// A NUL-terminated UTF-8 description; never NULL.
    pub text: *const c_char,
}

/// An event with the storage its pointers point into. `event` comes first, so a pointer to
/// the box is a pointer to the event.
#[repr(C)]
struct EventBox {
    event: ImrelayEvent,
    payload: Bytes,
    text: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<(i32, CString)> = RefCell::new((IMRELAY_OK, CString::default()));
}

fn set_error(code: i32, message: impl Into<String>) -> i32 {
    let text = CString::new(message.into().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = (code, text));
    code
}

/// Runs `body`, turning a panic into `IMRELAY_ERR_PANIC`.
fn guard(body: impl FnOnce() -> i32) -> i32 {
    catch_unwind(AssertUnwindSafe(body))
        .unwrap_or_else(|_| set_error(IMRELAY_ERR_PANIC, "internal error (panic caught)"))
}

/// Runs `body` on the client behind `client` under [`guard`]; NULL is `IMRELAY_ERR_NULL`.
/// Only a shared reference is made: other threads may hold one at the same time.
///
/// # Safety
/// `client` must be NULL or a live handle from `imrelay_connect` (not being freed).
unsafe fn with_client(client: *mut ImrelayClient, body: impl FnOnce(&SharedClient) -> i32) -> i32 {
    guard(|| {
        // SAFETY: the caller passes a live handle or NULL.
        match unsafe { client.as_ref() } {
            Some(c) => body(&c.client),
            None => set_error(IMRELAY_ERR_NULL, "client is NULL"),
        }
    })
}

fn send_status(e: SendError) -> i32 {
    let code = match e {
        SendError::OutboxFull => IMRELAY_ERR_OUTBOX_FULL,
        SendError::TooLarge => IMRELAY_ERR_TOO_LARGE,
        SendError::InvalidRecipient => IMRELAY_ERR_INVALID,
        SendError::NotConnected => IMRELAY_ERR_NOT_CONNECTED,
        SendError::Closed => IMRELAY_ERR_CLOSED,
    };
    set_error(code, e.to_string())
}

/// Copies `len` bytes from C. NULL is allowed only with length 0.
///
/// # Safety
/// `data` must point to `len` readable bytes when it is not NULL.
unsafe fn bytes_from_c(data: *const u8, len: usize) -> Result<Bytes, i32> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    if data.is_null() {
        return Err(set_error(
            IMRELAY_ERR_NULL,
            "data is NULL with a non-zero length",
        ));
    }
    if len > isize::MAX as usize {
        return Err(set_error(IMRELAY_ERR_INVALID, "length too large"));
    }
    // SAFETY: the caller guarantees `len` readable bytes at `data`, checked non-NULL.
    Ok(Bytes::copy_from_slice(unsafe {
        std::slice::from_raw_parts(data, len)
    }))
}

fn timeout_from_ms(ms: i32) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Connects to the relay at `addr` ("host:port"), logs in as `user` with `credential`
/// (may be NULL when `credential_len` is 0), and waits up to `timeout_ms` for the relay's
/// answer. Returns the client, or NULL (see `imrelay_last_error_code`). Once connected, the
/// client keeps the link up by itself: heartbeats, reconnects, resends.
///
/// Threads: any thread; the client may then be used from any thread (see
/// `ImrelayClient`). Ownership: `addr` and `credential` are the caller's (copied); the
/// client belongs to the caller, who frees it with `imrelay_close` or `imrelay_free`.
///
/// # Safety
/// `addr` must be NUL-terminated; `credential` must point to `credential_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn imrelay_connect(
    addr: *const c_char,
    user: u64,
    credential: *const u8,
    credential_len: usize,
    timeout_ms: i32,
) -> *mut ImrelayClient {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        connect_guarded(addr, user, timeout_ms, |config| {
            let credential = bytes_from_c(credential, credential_len)?;
            config.credential = credential.to_vec();
            Ok(())
        })
    }
}

/// `imrelay_connect` and `imrelay_connect_with` under their guard: checks `addr` and
/// `user`, lets `configure` fill in the rest of the settings, connects.
///
/// # Safety
/// `addr` must be NULL or NUL-terminated; `configure` upholds its callers' contracts.
unsafe fn connect_guarded(
    addr: *const c_char,
    user: u64,
    timeout_ms: i32,
    configure: impl FnOnce(&mut ClientConfig) -> Result<(), i32>,
) -> *mut ImrelayClient {
    let mut out = std::ptr::null_mut();
    guard(|| {
        // SAFETY: the caller guarantees NUL termination.
        let addr = match unsafe { str_from_c(addr, "addr") } {
            Ok(addr) => addr,
            Err(code) => return code,
        };
        if user == 0 {
            return set_error(IMRELAY_ERR_INVALID, "user id 0 is reserved");
        }
        let mut config = ClientConfig::new(UserId(user));
        if let Err(code) = configure(&mut config) {
            return code;
        }
        match connect_config(addr, config, timeout_ms) {
            Ok(client) => {
                out = client;
                IMRELAY_OK
            }
            Err(code) => code,
        }
    });
    out
}

/// The rest of `imrelay_connect` and `imrelay_connect_with`, under their guard.
fn connect_config(
    addr: &str,
    config: ClientConfig,
    timeout_ms: i32,
) -> Result<*mut ImrelayClient, i32> {
    let addr = match addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => {
            return Err(set_error(
                IMRELAY_ERR_INVALID,
                format!("cannot resolve {addr}"),
            ))
        }
    };
    match SharedClient::connect(addr, config, timeout_from_ms(timeout_ms)) {
        Ok((client, _)) => {
            set_error(IMRELAY_OK, "");
            Ok(Box::into_raw(Box::new(ImrelayClient {
                client: Arc::new(client),
                listener: Mutex::new(None),
            })))
        }
        Err(e @ ConnectError::Resolve(_)) => Err(set_error(IMRELAY_ERR_INVALID, e.to_string())),
        Err(e @ ConnectError::Wake(_)) => Err(set_error(IMRELAY_ERR_SYSTEM, e.to_string())),
        Err(e) => Err(set_error(IMRELAY_ERR_CONNECT, e.to_string())),
    }
}

/// New connection options: no credential, no token provider, plain TCP. Never NULL
/// (except on allocation failure, which aborts). Free with `imrelay_options_free`.
///
/// Threads: any thread. Options are not synchronised: one thread at a time per options
/// object (set them up, then connect with them from anywhere).
#[no_mangle]
pub extern "C" fn imrelay_options_new() -> *mut ImrelayOptions {
    Box::into_raw(Box::new(ImrelayOptions {
        credential: Vec::new(),
        device: None,
        provider: None,
        tls: None,
        background: crate::client::Background::KeepAlive,
    }))
}

/// Frees options from `imrelay_options_new`. NULL is ignored. Clients connected with them
/// are not affected.
///
/// Threads: any thread, but not while another call uses the same options.
///
/// # Safety
/// `options` must come from `imrelay_options_new` and not be freed twice.
#[no_mangle]
pub unsafe extern "C" fn imrelay_options_free(options: *mut ImrelayOptions) {
    if options.is_null() {
        return;
    }
    // SAFETY: a pointer from imrelay_options_new, given back once.
    let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(options) })));
}

/// Runs `body` on the options behind `options` under [`guard`]; NULL is `IMRELAY_ERR_NULL`.
///
/// # Safety
/// `options` must be NULL or live options from `imrelay_options_new`.
unsafe fn with_options(
    options: *mut ImrelayOptions,
    body: impl FnOnce(&mut ImrelayOptions) -> i32,
) -> i32 {
    guard(|| {
        // SAFETY: the caller passes live options or NULL.
        match unsafe { options.as_mut() } {
            Some(o) => body(o),
            None => set_error(IMRELAY_ERR_NULL, "options is NULL"),
        }
    })
}

/// Sets the static LOGIN credential (copied; `data` may be NULL when `len` is 0, and stays
/// the caller's). A token provider, if set, takes its place.
///
/// Threads: any thread, one at a time per options object.
///
/// # Safety
/// `options` must come from `imrelay_options_new`; `data` must point to `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn imrelay_options_set_credential(
    options: *mut ImrelayOptions,
    data: *const u8,
    len: usize,
) -> i32 {
    let body = |o: &mut ImrelayOptions| {
        // SAFETY: forwarded from the caller's guarantee.
        match unsafe { bytes_from_c(data, len) } {
            Ok(c) => {
                o.credential = c.to_vec();
                IMRELAY_OK
            }
            Err(code) => code,
        }
    };
    // SAFETY: forwarded from the caller's guarantee.
    unsafe { with_options(options, body) }
}

/// Sets (or, with NULL, clears) this install's device id, sent in every LOGIN (protocol.md,
/// section 15.1): each device of a user gets every stored message, and stored messages
/// the user sends reach its other devices (`IMRELAY_EVENT_SENT_FROM_OTHER_DEVICE`). Keep
/// the same id for every run of the app (generate one at first launch and store it). It
/// must be 1 to 64 bytes of UTF-8 without control characters, else
/// `IMRELAY_ERR_INVALID`. Copied; `device` stays the caller's.
///
/// Threads: any thread, one at a time per options object.
///
/// # Safety
/// `options` must come from `imrelay_options_new`; `device` must be NULL or
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn imrelay_options_set_device(
    options: *mut ImrelayOptions,
    device: *const c_char,
) -> i32 {
    let body = |o: &mut ImrelayOptions| {
        // SAFETY: forwarded from the caller's guarantee.
        match unsafe { opt_str_from_c(device, "device") } {
            Ok(Some(id)) if crate::proto::device::valid_device(id) => {
                o.device = Some(id.to_owned());
                IMRELAY_OK
            }
            Ok(Some(_)) => set_error(
                IMRELAY_ERR_INVALID,
                "a device id is 1 to 64 bytes of UTF-8 without control characters",
            ),
            Ok(None) => {
                o.device = None;
                IMRELAY_OK
            }
            Err(code) => code,
        }
    };
    // SAFETY: forwarded from the caller's guarantee.
    unsafe { with_options(options, body) }
}

/// Sets what the client does while the app is in the background (see
/// `imrelay_set_foreground`): `disconnect_after_ms` < 0 keeps the link (the default:
/// heartbeats at the relay's upper bound); 0 or more closes it cleanly that many
/// milliseconds after the app went to the background, and the client does not reconnect
/// until `imrelay_set_foreground(client, 1)` (which reconnects at once). Always
/// `IMRELAY_OK` for live options.
///
/// Threads: any thread, one at a time per options object.
///
/// # Safety
/// `options` must come from `imrelay_options_new`.
#[no_mangle]
pub unsafe extern "C" fn imrelay_options_set_background(
    options: *mut ImrelayOptions,
    disconnect_after_ms: i64,
) -> i32 {
    let body = |o: &mut ImrelayOptions| {
        o.background = match u64::try_from(disconnect_after_ms) {
            Ok(ms) => crate::client::Background::DisconnectAfter(Duration::from_millis(ms)),
            Err(_) => crate::client::Background::KeepAlive,
        };
        IMRELAY_OK
    };
    // SAFETY: forwarded from the caller's guarantee.
    unsafe { with_options(options, body) }
}

/// Sets (or, with a NULL `provider`, clears) the token provider: see
/// `ImrelayTokenProvider` for when it is called, on which thread, and who owns what.
///
/// Threads: any thread, one at a time per options object.
///
/// # Safety
/// `options` must come from `imrelay_options_new`; `provider` and `ctx` must keep the
/// `ImrelayTokenProvider` contract for every client connected with these options.
#[no_mangle]
pub unsafe extern "C" fn imrelay_options_set_token_provider(
    options: *mut ImrelayOptions,
    provider: ImrelayTokenProvider,
    ctx: *mut c_void,
) -> i32 {
    let body = |o: &mut ImrelayOptions| {
        o.provider = provider.map(|callback| {
            let ctx = CallbackCtx(ctx);
            let provider: crate::client::TokenProvider =
                Arc::new(move |user| call_provider(callback, &ctx, user));
            provider
        });
        IMRELAY_OK
    };
    // SAFETY: forwarded from the caller's guarantee.
    unsafe { with_options(options, body) }
}

/// Connects over TLS: the relay's certificate must be valid for `server_name` (a DNS name
/// or an IP address, NUL-terminated) and chain to the CA certificates in the PEM file
/// `ca_file`, or, when `ca_file` is NULL, to the system's trust store. The file is read
/// now: a missing file, a PEM without a certificate or an empty system store is
/// `IMRELAY_ERR_INVALID` here, not a connect failure later. A certificate that does not
/// verify is a `DISCONNECTED` event (or `imrelay_connect_with` failing), text
/// "TLS handshake failed: ...". `IMRELAY_ERR_UNSUPPORTED` from a library built without
/// TLS. The strings stay the caller's (copied).
///
/// Threads: any thread, one at a time per options object.
///
/// # Safety
/// `options` must come from `imrelay_options_new`; `server_name` must be NUL-terminated;
/// `ca_file` must be NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn imrelay_options_set_tls(
    options: *mut ImrelayOptions,
    server_name: *const c_char,
    ca_file: *const c_char,
) -> i32 {
    let body = |o: &mut ImrelayOptions| {
        // SAFETY: forwarded from the caller's guarantees.
        let (name, file) = match unsafe {
            (
                str_from_c(server_name, "server_name"),
                opt_str_from_c(ca_file, "ca_file"),
            )
        } {
            (Ok(name), Ok(file)) => (name, file),
            (Err(code), _) | (_, Err(code)) => return code,
        };
        let ca = file.map_or(TlsCa::SystemRoots, |f| TlsCa::File(f.into()));
        set_tls(o, name, ca)
    };
    // SAFETY: forwarded from the caller's guarantee.
    unsafe { with_options(options, body) }
}

/// Connects over TLS, trusting the CA certificates in `pem` (`len` bytes of PEM, one or
/// more CERTIFICATE blocks; copied): for a CA bundled with the app. As
/// `imrelay_options_set_tls` otherwise.
///
/// Threads: any thread, one at a time per options object.
///
/// # Safety
/// `options` must come from `imrelay_options_new`; `server_name` must be NUL-terminated;
/// `pem` must point to `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn imrelay_options_set_tls_ca_pem(
    options: *mut ImrelayOptions,
    server_name: *const c_char,
    pem: *const u8,
    len: usize,
) -> i32 {
    let body = |o: &mut ImrelayOptions| {
        // SAFETY: forwarded from the caller's guarantees.
        let name = match unsafe { str_from_c(server_name, "server_name") } {
            Ok(name) => name,
            Err(code) => return code,
        };
        // SAFETY: forwarded from the caller's guarantees.
        let pem = match unsafe { bytes_from_c(pem, len) } {
            Ok(pem) => pem,
            Err(code) => return code,
        };
        set_tls(o, name, TlsCa::Pem(pem.to_vec()))
    };
    // SAFETY: forwarded from the caller's guarantee.
    unsafe { with_options(options, body) }
}

/// `imrelay_options_set_tls*`: the TLS options the Java binding builds too
/// ([`tls_setting`]), kept on `o`.
fn set_tls(o: &mut ImrelayOptions, server_name: &str, ca: TlsCa) -> i32 {
    match tls_setting(server_name, ca) {
        Ok(tls) => {
            o.tls = Some(tls);
            IMRELAY_OK
        }
        Err(e @ TlsRequestError::Unsupported) => set_error(IMRELAY_ERR_UNSUPPORTED, e.to_string()),
        Err(e @ TlsRequestError::Invalid(_)) => set_error(IMRELAY_ERR_INVALID, e.to_string()),
    }
}

/// A NUL-terminated UTF-8 string from C; `what` names it in the error.
///
/// # Safety
/// `s` must be NULL or NUL-terminated.
unsafe fn str_from_c<'a>(s: *const c_char, what: &str) -> Result<&'a str, i32> {
    if s.is_null() {
        return Err(set_error(IMRELAY_ERR_NULL, format!("{what} is NULL")));
    }
    // SAFETY: checked non-NULL; the caller guarantees NUL termination.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|_| set_error(IMRELAY_ERR_INVALID, format!("{what} is not UTF-8")))
}

/// As [`str_from_c`], NULL being `None`.
///
/// # Safety
/// As [`str_from_c`].
unsafe fn opt_str_from_c<'a>(s: *const c_char, what: &str) -> Result<Option<&'a str>, i32> {
    if s.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded.
    unsafe { str_from_c(s, what) }.map(Some)
}

/// Connects to the relay at `addr` ("host:port") as `user` with `options` (NULL: the
/// defaults, plain TCP and an empty credential) and waits up to `timeout_ms` for the
/// relay's answer; as `imrelay_connect` otherwise. The options are copied: free them
/// whenever convenient. A failed TLS handshake or a refused token is
/// `IMRELAY_ERR_CONNECT`, the message saying why.
///
/// Threads: any thread (the options must not be changed meanwhile). Ownership: as
/// `imrelay_connect`; the options stay the caller's.
///
/// # Safety
/// `addr` must be NUL-terminated; `options` must be NULL or from `imrelay_options_new`.
#[no_mangle]
pub unsafe extern "C" fn imrelay_connect_with(
    addr: *const c_char,
    user: u64,
    options: *const ImrelayOptions,
    timeout_ms: i32,
) -> *mut ImrelayClient {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        connect_guarded(addr, user, timeout_ms, |config| {
            // SAFETY: NULL or live options, per the contract.
            if let Some(o) = options.as_ref() {
                config.credential = o.credential.clone();
                config.device = o.device.clone();
                config.token_provider = o.provider.clone();
                config.background = o.background;
                config.use_tls(o.tls.clone());
            }
            Ok(())
        })
    }
}

/// Sends REFRESH with a new login token (copied) if the link is up, and uses it for later
/// LOGINs unless a token provider is set. A `TOKEN_REFRESHED` or `REFRESH_FAILED` event
/// answers. `token` stays the caller's.
///
/// Threads: any thread, concurrently with `imrelay_poll_event` and the other calls on the
/// client (except `imrelay_close`/`imrelay_free`, which must not overlap with any).
///
/// # Safety
/// `client` must come from `imrelay_connect*` and not be being freed; `token` must point
/// to `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn imrelay_refresh_token(
    client: *mut ImrelayClient,
    token: *const u8,
    len: usize,
) -> i32 {
    let body = |c: &SharedClient| {
        // SAFETY: forwarded from the caller's guarantee on `token` and `len`.
        match unsafe { bytes_from_c(token, len) } {
            Ok(token) => c
                .refresh_token(token.to_vec())
                .map_or_else(send_status, |()| IMRELAY_OK),
            Err(code) => code,
        }
    };
    // SAFETY: forwarded from the caller's guarantee on `client`.
    unsafe { with_client(client, body) }
}

/// Queues a direct message to `to`. On success writes its id to `*msg_id` (if not NULL)
/// and returns `IMRELAY_OK`; a `DELIVERED` or `FAILED` event with that id follows (it may
/// reach a polling thread before this call returns). `data` is copied and stays the
/// caller's.
///
/// Threads: any thread, concurrently with `imrelay_poll_event` and the other calls on the
/// client (except `imrelay_close`/`imrelay_free`, which must not overlap with any).
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be being freed; `data` must point
/// to `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn imrelay_send(
    client: *mut ImrelayClient,
    to: u64,
    data: *const u8,
    len: usize,
    msg_id: *mut u64,
) -> i32 {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe { send_from_c(client, to, data, len, msg_id, false) }
}

/// Queues a stored message to `to`: the relay keeps it until the recipient's app has it,
/// even if the recipient is offline now. On success writes its id to `*msg_id` (if not
/// NULL); a `STORED` or `FAILED` event with that id follows. `data` is copied and stays
/// the caller's.
///
/// Threads: any thread, concurrently with `imrelay_poll_event` and the other calls on the
/// client (except `imrelay_close`/`imrelay_free`, which must not overlap with any).
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be being freed; `data` must point
/// to `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn imrelay_send_stored(
    client: *mut ImrelayClient,
    to: u64,
    data: *const u8,
    len: usize,
    msg_id: *mut u64,
) -> i32 {
    // SAFETY: forwarded from the caller's guarantees.
    unsafe { send_from_c(client, to, data, len, msg_id, true) }
}

/// The body of `imrelay_send` and `imrelay_send_stored`.
///
/// # Safety
/// As for those two.
unsafe fn send_from_c(
    client: *mut ImrelayClient,
    to: u64,
    data: *const u8,
    len: usize,
    msg_id: *mut u64,
    stored: bool,
) -> i32 {
    let body = |c: &SharedClient| {
        // SAFETY: forwarded from the caller's guarantee on `data` and `len`.
        let payload = match unsafe { bytes_from_c(data, len) } {
            Ok(p) => p,
            Err(code) => return code,
        };
        let sent = if stored {
            c.send_stored(UserId(to), payload)
        } else {
            c.send(UserId(to), payload)
        };
        match sent {
            Ok(id) => {
                // SAFETY: NULL or a valid place for a u64, per the contract.
                if let Some(out) = unsafe { msg_id.as_mut() } {
                    *out = id.0;
                }
                IMRELAY_OK
            }
            Err(e) => send_status(e),
        }
    };
    // SAFETY: forwarded from the caller's guarantee on `client`.
    unsafe { with_client(client, body) }
}

/// Joins a room (kept across reconnects). A `ROOM_STATE` event answers.
///
/// Threads: any thread, concurrently with `imrelay_poll_event` and the other calls on the
/// client (except `imrelay_close`/`imrelay_free`, which must not overlap with any).
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be being freed.
#[no_mangle]
pub unsafe extern "C" fn imrelay_join(client: *mut ImrelayClient, room: u64) -> i32 {
    // SAFETY: forwarded from the caller's guarantee.
    unsafe {
        with_client(client, |c| {
            c.join(RoomId(room))
                .map_or_else(send_status, |()| IMRELAY_OK)
        })
    }
}

/// Leaves a room.
///
/// Threads: any thread, concurrently with `imrelay_poll_event` and the other calls on the
/// client (except `imrelay_close`/`imrelay_free`, which must not overlap with any).
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be being freed.
#[no_mangle]
pub unsafe extern "C" fn imrelay_leave(client: *mut ImrelayClient, room: u64) -> i32 {
    // SAFETY: forwarded from the caller's guarantee.
    unsafe {
        with_client(client, |c| {
            c.leave(RoomId(room))
                .map_or_else(send_status, |()| IMRELAY_OK)
        })
    }
}

/// Sends a live room message (not kept while the link is down). `data` is copied and
/// stays the caller's.
///
/// Threads: any thread, concurrently with `imrelay_poll_event` and the other calls on the
/// client (except `imrelay_close`/`imrelay_free`, which must not overlap with any).
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be being freed; `data` must point
/// to `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn imrelay_room_send(
    client: *mut ImrelayClient,
    room: u64,
    data: *const u8,
    len: usize,
) -> i32 {
    let body = |c: &SharedClient| {
        // SAFETY: forwarded from the caller's guarantee on `data` and `len`.
        match unsafe { bytes_from_c(data, len) } {
            Ok(payload) => c
                .room_send(RoomId(room), payload)
                .map_or_else(send_status, |()| IMRELAY_OK),
            Err(code) => code,
        }
    };
    // SAFETY: forwarded from the caller's guarantee on `client`.
    unsafe { with_client(client, body) }
}

/// Runs the client for up to `timeout_ms` (0 = just check) and returns `IMRELAY_OK` with
/// the next event in `*event`, `IMRELAY_TIMEOUT` with `*event` set to NULL, or, once the
/// `CLOSED` event was taken (by this thread or another), `IMRELAY_ERR_CLOSED` at once with
/// `*event` NULL. Returns as soon as another thread's call gives the client work or
/// `imrelay_shutdown` is called.
///
/// Threads: any thread, concurrently with every other call on the client except
/// `imrelay_close`/`imrelay_free`. Several threads may poll at once; each event goes to
/// exactly one of them. Not with a listener: once `imrelay_start_listener` succeeded this
/// returns `IMRELAY_ERR_INVALID`.
///
/// Ownership: the event belongs to the caller, independent of the client and of later
/// polls: its `data` and `text` stay valid until the caller passes it to
/// `imrelay_event_free` (from any thread, before or after the client is freed).
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be being freed; `event` must be a
/// valid place for a pointer.
#[no_mangle]
pub unsafe extern "C" fn imrelay_poll_event(
    client: *mut ImrelayClient,
    timeout_ms: i32,
    event: *mut *mut ImrelayEvent,
) -> i32 {
    guard(|| {
        // SAFETY: NULL or a valid place, per the contract.
        let Some(out) = (unsafe { event.as_mut() }) else {
            return set_error(IMRELAY_ERR_NULL, "event is NULL");
        };
        *out = std::ptr::null_mut();
        // SAFETY: the caller passes a live handle or NULL; shared, as other threads may
        // be using it too.
        let Some(c) = (unsafe { client.as_ref() }) else {
            return set_error(IMRELAY_ERR_NULL, "client is NULL");
        };
        if c.has_listener() {
            return set_error(
                IMRELAY_ERR_INVALID,
                "a listener (imrelay_start_listener) takes this client's events",
            );
        }
        match c.client.poll_event(timeout_from_ms(timeout_ms)) {
            Polled::Event(e) => {
                *out = Box::into_raw(Box::new(to_c(e))).cast::<ImrelayEvent>();
                IMRELAY_OK
            }
            Polled::TimedOut => IMRELAY_TIMEOUT,
            Polled::Finished => set_error(IMRELAY_ERR_CLOSED, "the client is closed"),
        }
    })
}

/// Frees an event from `imrelay_poll_event` (its `data` and `text` with it). NULL is
/// ignored.
///
/// Threads: any thread; the event need not be freed on the thread that polled it, nor
/// before its client is freed.
///
/// # Safety
/// `event` must come from `imrelay_poll_event` and not be freed twice.
#[no_mangle]
pub unsafe extern "C" fn imrelay_event_free(event: *mut ImrelayEvent) {
    if event.is_null() {
        return;
    }
    // SAFETY: `event` is the first field of a boxed EventBox made by imrelay_poll_event.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        drop(unsafe { Box::from_raw(event.cast::<EventBox>()) })
    }));
}

/// Starts closing the session (BYE) and returns at once: messages never written fail now,
/// those in flight get their answers, then a `CLOSED` event ends the stream of events (a
/// thread blocked in `imrelay_poll_event` returns with them promptly). Later sends fail
/// with `IMRELAY_ERR_CLOSED`. Calling it again does nothing. The handle is not freed: do
/// that with `imrelay_free` once no other thread uses it (after the polling thread saw
/// `CLOSED` or `IMRELAY_ERR_CLOSED`, say).
///
/// Threads: any thread, concurrently with `imrelay_poll_event` and the other calls
/// (except `imrelay_close`/`imrelay_free`).
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be being freed.
#[no_mangle]
pub unsafe extern "C" fn imrelay_shutdown(client: *mut ImrelayClient) -> i32 {
    // SAFETY: forwarded from the caller's guarantee.
    unsafe {
        with_client(client, |c| {
            c.close();
            IMRELAY_OK
        })
    }
}

/// The device's network changed (Wi-Fi to cellular, back from airplane mode, the OS's
/// "network available" callback): drops the link and connects again at once, skipping any
/// backoff wait. Messages in flight are resent on the new link (DEDUP keeps them single).
///
/// Threads: any thread, concurrently with `imrelay_poll_event` and the other calls
/// (except `imrelay_close`/`imrelay_free`).
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be being freed.
#[no_mangle]
pub unsafe extern "C" fn imrelay_network_changed(client: *mut ImrelayClient) -> i32 {
    // SAFETY: forwarded from the caller's guarantee.
    unsafe {
        with_client(client, |c| {
            c.reconnect();
            IMRELAY_OK
        })
    }
}

/// Tells the client whether the app is in the foreground (`foreground` != 0) or in the
/// background (0): call it from the OS's lifecycle callbacks. In the background the
/// client heartbeats as seldom as the relay allows and, with a background policy set by
/// `imrelay_options_set_background`, closes the link after its grace period (an
/// `IMRELAY_EVENT_DISCONNECTED` whose text says so, `count` 0) and does not reconnect
/// until it is told the app is in the foreground again, which reconnects at once.
/// Messages sent meanwhile wait in the outbox. Repeating the current state does nothing.
///
/// Threads: any thread, concurrently with `imrelay_poll_event` and the other calls
/// (except `imrelay_close`/`imrelay_free`). Ownership: nothing is kept.
///
/// # Safety
/// `client` must come from `imrelay_connect*` and not be being freed.
#[no_mangle]
pub unsafe extern "C" fn imrelay_set_foreground(
    client: *mut ImrelayClient,
    foreground: i32,
) -> i32 {
    // SAFETY: forwarded from the caller's guarantee.
    unsafe {
        with_client(client, |c| {
            c.set_foreground(foreground != 0);
            IMRELAY_OK
        })
    }
}

/// Frees the client at once. A session still open is ended with a BYE (best effort: not
/// waited for), and events not taken yet are discarded, so call `imrelay_shutdown` and
/// poll until `CLOSED` first to learn the fate of every message. NULL is ignored. Events
/// already returned by `imrelay_poll_event` stay valid until their `imrelay_event_free`.
/// With a listener: closes, then waits until the listener got its last call (`CLOSED`)
/// before freeing; no listener call happens after this returns (unless called from inside
/// the listener, which cannot be waited for: its remaining calls then follow).
///
/// Threads: any thread, but no other call on this client may be running or start: join
/// (or otherwise stop) the threads using it first.
///
/// # Safety
/// `client` must come from `imrelay_connect`, not be used afterwards, and not be in use
/// by another thread.
#[no_mangle]
pub unsafe extern "C" fn imrelay_free(client: *mut ImrelayClient) {
    if client.is_null() {
        return;
    }
    // SAFETY: a handle from imrelay_connect, given back exactly once, used by no one else.
    let mut owned = unsafe { Box::from_raw(client) };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        owned.client.close();
        owned.stop_listener();
        drop(owned);
    }));
}

/// Closes the session (BYE), waits up to `timeout_ms` for answers to messages in flight,
/// and frees the client: `imrelay_shutdown`, polling until `CLOSED`, and `imrelay_free` in
/// one call, for a program where no other thread polls. NULL is ignored. Events still
/// pending are discarded. With a listener it is `imrelay_free`: the listener gets the
/// remaining events (`CLOSED` last) before this returns, within the client's own close
/// deadline rather than `timeout_ms`.
///
/// Threads: any thread, but no other call on this client may be running or start (it
/// frees the handle): stop the threads using it first.
///
/// # Safety
/// `client` must come from `imrelay_connect`, not be used afterwards, and not be in use
/// by another thread.
#[no_mangle]
pub unsafe extern "C" fn imrelay_close(client: *mut ImrelayClient, timeout_ms: i32) {
    if client.is_null() {
        return;
    }
    // SAFETY: a handle from imrelay_connect, given back exactly once, used by no one else.
    let mut owned = unsafe { Box::from_raw(client) };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if !owned.stop_listener() {
            owned.client.close_and_drain(timeout_from_ms(timeout_ms));
        }
        drop(owned);
    }));
}

/// Called by the library with each event of a client, from the network thread that
/// `imrelay_start_listener` started for it.
///
/// Threads and order: always on that one thread (one per client), for one event at a time,
/// in the order the client produced them; never concurrently with itself for one client
/// (clients sharing a listener and `user_data` may call it concurrently). `CLOSED` is the
/// last call for a client. The client's lock is not held: the listener may call
/// `imrelay_send`, `imrelay_shutdown` and the rest on the client, but not
/// `imrelay_poll_event` (refused) nor `imrelay_close`/`imrelay_free` (see there). While it
/// runs the link is not read, so it should return quickly. It must not unwind (throw).
///
/// Ownership: `event` belongs to the library and is valid only during the call (copy what
/// you keep; do not pass it to `imrelay_event_free`). `user_data` is the app's, passed back
/// unchanged; it must stay valid until the listener's last call (`CLOSED`, at the latest
/// when `imrelay_close`/`imrelay_free` returns).
pub type ImrelayListener =
    Option<unsafe extern "C" fn(event: *const ImrelayEvent, user_data: *mut c_void)>;

impl ImrelayClient {
    fn listener_slot(&self) -> std::sync::MutexGuard<'_, Option<Listener>> {
        self.listener.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has_listener(&self) -> bool {
        self.listener_slot().is_some()
    }

    /// Stops the listener, if one runs (closing the client, waiting for its `CLOSED`
    /// call). True if there was one.
    fn stop_listener(&mut self) -> bool {
        let listener = self
            .listener
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match listener {
            Some(listener) => {
                if listener.stop().is_err() {
                    log::warn!("the listener thread panicked");
                }
                true
            }
            None => false,
        }
    }
}

/// Hands one event to a C listener as [`ImrelayListener`] describes.
fn deliver(
    listener: unsafe extern "C" fn(*const ImrelayEvent, *mut c_void),
    user_data: &CallbackCtx,
    event: Event,
) {
    let boxed = to_c(event);
    // SAFETY: the event and the storage it points into live until the end of this
    // function; the app promised a listener that keeps the ImrelayListener contract.
    unsafe { listener(&boxed.event, user_data.0) };
}

/// The callback style: starts a network thread, owned by the library, that takes every
/// event of the client and calls `listener` with it (see `ImrelayListener` for the thread
/// and ordering guarantees). Returns `IMRELAY_OK`; `IMRELAY_ERR_NULL` for a NULL
/// `listener`; `IMRELAY_ERR_INVALID` if a listener already runs for this client;
/// `IMRELAY_ERR_SYSTEM` if no thread could be started. From then on
/// `imrelay_poll_event` on this client is refused. The thread ends after the `CLOSED`
/// call; `imrelay_shutdown` gets there from any thread, `imrelay_close`/`imrelay_free`
/// get there and wait for it.
///
/// Threads: any thread, concurrently with the other calls on the client (except
/// `imrelay_close`/`imrelay_free`). A poll already blocked in another thread may still
/// return one event.
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be being freed; `listener` and
/// `user_data` must keep the `ImrelayListener` contract.
#[no_mangle]
pub unsafe extern "C" fn imrelay_start_listener(
    client: *mut ImrelayClient,
    listener: ImrelayListener,
    user_data: *mut c_void,
) -> i32 {
    guard(|| {
        // SAFETY: the caller passes a live handle or NULL; shared, as other threads may
        // be using it too.
        let Some(c) = (unsafe { client.as_ref() }) else {
            return set_error(IMRELAY_ERR_NULL, "client is NULL");
        };
        let Some(listener) = listener else {
            return set_error(IMRELAY_ERR_NULL, "listener is NULL");
        };
        let mut slot = c.listener_slot();
        if slot.is_some() {
            return set_error(IMRELAY_ERR_INVALID, "a listener already runs");
        }
        let ctx = CallbackCtx(user_data);
        let started = Listener::start(Arc::clone(&c.client), move |event| {
            deliver(listener, &ctx, event)
        });
        match started {
            Ok(l) => {
                *slot = Some(l);
                IMRELAY_OK
            }
            Err(e) => set_error(IMRELAY_ERR_SYSTEM, format!("cannot start a thread: {e}")),
        }
    })
}

/// The code of the last failed call on this thread (`IMRELAY_OK` if it succeeded).
///
/// Threads: any thread; each thread has its own last error, so a send failing on one
/// thread never shows up on another.
#[no_mangle]
pub extern "C" fn imrelay_last_error_code() -> i32 {
    LAST_ERROR.with(|e| e.borrow().0)
}

/// Copies the last error's message on this thread into `buf` (NUL-terminated, truncated to
/// `len` bytes) and returns the message's full length without the NUL. `buf` may be NULL
/// to ask for the length.
///
/// Threads: any thread (its own last error). `buf` is the caller's.
///
/// # Safety
/// `buf` must be NULL or point to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn imrelay_last_error_message(buf: *mut c_char, len: usize) -> usize {
    LAST_ERROR.with(|e| {
        let e = e.borrow();
        let message = e.1.as_bytes();
        if !buf.is_null() && len > 0 {
            let n = message.len().min(len - 1);
            // SAFETY: `buf` has `len` writable bytes and n + 1 <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(message.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        message.len()
    })
}

fn to_c(event: Event) -> EventBox {
    let mut e = ImrelayEvent {
        kind: 0,
        code: 0,
        peer: 0,
        room: 0,
        msg_id: 0,
        count: 0,
        data: std::ptr::null(),
        len: 0,
        text: std::ptr::null(),
    };
    let mut payload = Bytes::new();
    let mut text = String::new();
    match event {
        Event::Connected { user, limits } => {
            e.kind = IMRELAY_EVENT_CONNECTED;
            e.peer = user.0;
            e.count = u64::from(limits.max_frame);
        }
        Event::Disconnected { reason, retry_in } => {
            e.kind = IMRELAY_EVENT_DISCONNECTED;
            e.count = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX);
            if let crate::client::DisconnectReason::LoginRejected { code, .. } = &reason {
                e.code = *code;
            }
            text = reason.to_string();
        }
        Event::Message {
            from,
            id,
            payload: p,
        } => {
            e.kind = IMRELAY_EVENT_MESSAGE;
            e.peer = from.0;
            e.msg_id = id.0;
            payload = p;
        }
        Event::SentFromOtherDevice { to, id, payload: p } => {
            e.kind = IMRELAY_EVENT_SENT_FROM_OTHER_DEVICE;
            e.peer = to.0;
            e.msg_id = id.0;
            payload = p;
        }
        Event::RoomMessage {
            room,
            from,
            payload: p,
        } => {
            e.kind = IMRELAY_EVENT_ROOM_MESSAGE;
            e.room = room.0;
            e.peer = from.0;
            payload = p;
        }
        Event::RoomState {
            room,
            members,
            is_member,
        } => {
            e.kind = IMRELAY_EVENT_ROOM_STATE;
            e.room = room.0;
            e.count = u64::from(members);
            e.code = u16::from(is_member);
        }
        Event::RoomMissed { room, missed } => {
            e.kind = IMRELAY_EVENT_ROOM_MISSED;
            e.room = room.0;
            e.count = missed;
        }
        Event::Delivered { id, devices } => {
            e.kind = IMRELAY_EVENT_DELIVERED;
            e.msg_id = id.0;
            e.count = u64::from(devices);
        }
        Event::Failed { id, reason } => {
            e.kind = IMRELAY_EVENT_FAILED;
            e.msg_id = id.0;
            e.count = match &reason {
                FailReason::Rejected { code, .. } => {
                    e.code = *code;
                    IMRELAY_FAIL_REJECTED as u64
                }
                FailReason::NotSent => IMRELAY_FAIL_NOT_SENT as u64,
                FailReason::Unconfirmed => IMRELAY_FAIL_UNCONFIRMED as u64,
                FailReason::Closed => IMRELAY_FAIL_CLOSED as u64,
            };
            text = reason.to_string();
        }
        Event::Error { code, reason } => {
            e.kind = IMRELAY_EVENT_ERROR;
            e.code = code;
            text = reason;
        }
        Event::Stored { id, devices } => {
            e.kind = IMRELAY_EVENT_STORED;
            e.msg_id = id.0;
            e.count = u64::from(devices);
        }
        Event::Gap { from, to } => {
            e.kind = IMRELAY_EVENT_GAP;
            e.room = from;
            e.count = to;
            text = format!("stored messages {from} to {to} expired before delivery");
        }
        Event::TokenExpiring { exp } => {
            e.kind = IMRELAY_EVENT_TOKEN_EXPIRING;
            e.count = exp;
            text = format!("the login token expires at {exp}");
        }
        Event::TokenRefreshed { exp } => {
            e.kind = IMRELAY_EVENT_TOKEN_REFRESHED;
            e.count = exp;
        }
        Event::RefreshFailed { code, reason } => {
            e.kind = IMRELAY_EVENT_REFRESH_FAILED;
            e.code = code;
            text = reason;
        }
        Event::Closed => e.kind = IMRELAY_EVENT_CLOSED,
    }
    let text = CString::new(text.replace('\0', " ")).unwrap_or_default();
    let mut boxed = EventBox {
        event: e,
        payload,
        text,
    };
    if !boxed.payload.is_empty() {
        boxed.event.data = boxed.payload.as_ptr();
        boxed.event.len = boxed.payload.len();
    }
    boxed.event.text = boxed.text.as_ptr();
    boxed
}
