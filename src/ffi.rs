//! The C ABI for iOS and Android apps: an opaque client handle over the blocking
//! [`Client`], events as C structs the app frees, and a per-thread
//! last error.
//!
//! `include/imrelay.h` is generated from this file by cbindgen (`tests/c_abi.rs` fails when
//! the committed header is stale; run it with `IMRELAY_UPDATE_HEADER=1` to rewrite it).
//!
//! Rules every function here keeps: no panic crosses the boundary (each body runs under
//! `catch_unwind` and a panic becomes `IMRELAY_ERR_PANIC`); every pointer from C is checked
//! for NULL, and a data pointer is read only for the length given with it; strings from C
//! must be NUL-terminated UTF-8.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::net::ToSocketAddrs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use bytes::Bytes;

use crate::client::{Client, ClientConfig, ConnectError, Event, FailReason, SendError};
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

/// An opaque client. Use one handle from one thread at a time.
pub struct ImrelayClient {
    client: Client,
}

/// One event. Owned by the library: read it, then pass it to `imrelay_event_free`.
/// Fields that do not apply to the kind are 0 (`data` NULL, `text` an empty string).
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
///
/// # Safety
/// `client` must be NULL or a live handle from `imrelay_connect`.
unsafe fn with_client(client: *mut ImrelayClient, body: impl FnOnce(&mut Client) -> i32) -> i32 {
    guard(|| {
        // SAFETY: the caller passes a live handle or NULL.
        match unsafe { client.as_mut() } {
            Some(c) => body(&mut c.client),
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
    let mut out = std::ptr::null_mut();
    guard(|| {
        if addr.is_null() {
            return set_error(IMRELAY_ERR_NULL, "addr is NULL");
        }
        // SAFETY: checked non-NULL; the caller guarantees NUL termination.
        let Ok(addr) = unsafe { CStr::from_ptr(addr) }.to_str() else {
            return set_error(IMRELAY_ERR_INVALID, "addr is not UTF-8");
        };
        if user == 0 {
            return set_error(IMRELAY_ERR_INVALID, "user id 0 is reserved");
        }
        // SAFETY: forwarded from the caller's guarantee.
        let credential = match unsafe { bytes_from_c(credential, credential_len) } {
            Ok(c) => c,
            Err(code) => return code,
        };
        let mut config = ClientConfig::new(UserId(user));
        config.credential = credential.to_vec();
        let addr = match addr.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => a,
            _ => return set_error(IMRELAY_ERR_INVALID, format!("cannot resolve {addr}")),
        };
        match Client::connect(addr, config, timeout_from_ms(timeout_ms)) {
            Ok((client, _)) => {
                out = Box::into_raw(Box::new(ImrelayClient { client }));
                set_error(IMRELAY_OK, "")
            }
            Err(e @ ConnectError::Resolve(_)) => set_error(IMRELAY_ERR_INVALID, e.to_string()),
            Err(e) => set_error(IMRELAY_ERR_CONNECT, e.to_string()),
        }
    });
    out
}

/// Queues a direct message to `to`. On success writes its id to `*msg_id` (if not NULL)
/// and returns `IMRELAY_OK`; a `DELIVERED` or `FAILED` event with that id follows.
///
/// # Safety
/// `client` must come from `imrelay_connect`; `data` must point to `len` bytes.
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
/// NULL); a `STORED` or `FAILED` event with that id follows.
///
/// # Safety
/// `client` must come from `imrelay_connect`; `data` must point to `len` bytes.
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
    let body = |c: &mut Client| {
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
/// # Safety
/// `client` must come from `imrelay_connect`.
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
/// # Safety
/// `client` must come from `imrelay_connect`.
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

/// Sends a live room message (not kept while the link is down).
///
/// # Safety
/// `client` must come from `imrelay_connect`; `data` must point to `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn imrelay_room_send(
    client: *mut ImrelayClient,
    room: u64,
    data: *const u8,
    len: usize,
) -> i32 {
    let body = |c: &mut Client| {
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
/// the next event in `*event`, or `IMRELAY_TIMEOUT` with `*event` set to NULL. Free each
/// event with `imrelay_event_free`.
///
/// # Safety
/// `client` must come from `imrelay_connect`; `event` must be a valid place for a pointer.
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
        // SAFETY: the caller passes a live handle or NULL.
        let Some(c) = (unsafe { client.as_mut() }) else {
            return set_error(IMRELAY_ERR_NULL, "client is NULL");
        };
        match c.client.recv(timeout_from_ms(timeout_ms)) {
            Some(e) => {
                *out = Box::into_raw(Box::new(to_c(e))).cast::<ImrelayEvent>();
                IMRELAY_OK
            }
            None => IMRELAY_TIMEOUT,
        }
    })
}

/// Frees an event from `imrelay_poll_event`. NULL is ignored.
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

/// Closes the session (BYE), waits up to `timeout_ms` for answers to messages in flight,
/// and frees the client. NULL is ignored. Events still pending are discarded.
///
/// # Safety
/// `client` must come from `imrelay_connect` and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn imrelay_close(client: *mut ImrelayClient, timeout_ms: i32) {
    if client.is_null() {
        return;
    }
    // SAFETY: a handle from imrelay_connect, given back exactly once.
    let mut owned = unsafe { Box::from_raw(client) };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        owned.client.close(timeout_from_ms(timeout_ms));
    }));
}

/// The code of the last failed call on this thread (`IMRELAY_OK` if it succeeded).
#[no_mangle]
pub extern "C" fn imrelay_last_error_code() -> i32 {
    LAST_ERROR.with(|e| e.borrow().0)
}

/// Copies the last error's message on this thread into `buf` (NUL-terminated, truncated to
/// `len` bytes) and returns the message's full length without the NUL. `buf` may be NULL
/// to ask for the length.
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
