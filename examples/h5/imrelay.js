// imrelay.js: a browser client for the imrelay protocol (protocol.md), over WebSocket.
// Plain JavaScript, no build step, no dependencies: `import` it as an ES module.
//
// Try it: `cargo run --release --bin imrelay -- --demo`, then open
// http://127.0.0.1:7700/?user=1&room=7 (the demo page, index.html, is built on this module).
//
//   import { ImRelayClient } from "/imrelay.js";
//   const relay = new ImRelayClient(`ws://${location.host}/`);
//   relay.on("deliver", (f) => console.log(`user ${f.source} says ${f.text}`));
//   await relay.connect();
//   await relay.login(1001);          // resolves with LOGIN_OK's limits
//   await relay.join(7);              // resolves with ROOM_STATE { members, isMember }
//   await relay.roomSend(7, "666");   // resolves with the ACK count
//   await relay.send(1002, "hi bob"); // rejects with an ImRelayError (e.g. RECIPIENT_OFFLINE)
//
// Reconnecting is off unless asked for: `new ImRelayClient(url, { reconnect: true })`, or
// `{ reconnect: { initialMs: 500, maxMs: 15000, maxAttempts: Infinity } }` (the defaults).
// Once logged in, a connection that closes without close() or bye() (a relay restart's
// SHUTTING_DOWN, a dropped network) is retried after a random wait in
// [0, min(maxMs, initialMs * 2^(attempt-1))) ("full jitter": the clients of a restarted
// relay do not all come back at once). Each attempt connects, logs in again as the same
// user with the same credential (a token function is called again) and rejoins the rooms
// joined before. Events: "reconnecting" { attempt, delayMs, error } before each wait;
// "reconnected" { attempt, reconnects, rooms, failedRooms } once logged in and rejoined;
// "reconnectfailed" { attempts, error } when it gives up: after maxAttempts, or when the
// relay refuses a fixed (non-function) credential with AUTH_FAILED or TOKEN_EXPIRED.
// Meanwhile requests reject with "not connected" (`relay.connected` tells); nothing is
// resent, a request cut off by the close rejects and its caller decides. retryNow() skips
// the current wait (say, on the browser's "online" event).
//
// Stored delivery (protocol.md section 15): `sendStored(user, payload)` SENDs with the
// STORED and DEDUP flags (a msg_id of a random 32-bit tag per client and a counter); the
// relay keeps the message in the recipient's inbox until each of its devices acknowledges
// it, and the promise resolves with the ACK count (0: stored for later, the recipient is
// offline). A stored SEND cut off by a close is resent with the same msg_id after the
// reconnect's LOGIN_OK (the relay does not store it twice); it rejects only when the client
// stops or gives up. `new ImRelayClient(url, { inbox: true })` receives the user's inbox:
// after every LOGIN_OK (each reconnect too) it sends INBOX_SYNC with the store epoch and the
// last sequence number kept in localStorage under
// "imrelay.inbox|<url>|<user>[|<device>]", then:
//   "inboxstate" { epoch, firstSeq, lastSeq, expiredUpto, newDevice, waiting } for each
//     INBOX_STATE (BigInts but newDevice; waiting = how many messages the relay will
//     replay after this client's last);
//   "gap" { from, to } when the saved last < expiredUpto in the same epoch: messages
//     from..=to expired before this client got them;
//   "stored" { seq, storedAt (Date), source, target, msgId, payload, text, peer,
//     fromOtherDevice, frame } for each INBOX_DELIVER with a seq above the last (an older
//     one is dropped, and so is a second copy of a (source, msgId) it showed already);
//     fromOtherDevice is `source === own user`: the user sent it from another device, to
//     `target` (peer is the other user either way).
// The cursor is saved after the handlers ran (at least once: a reload in between shows a
// message again, so apps key what they show by seq), and acknowledged with INBOX_ACK every
// 32 messages or 100 ms after a message (`inbox: { ackBatch, ackDelayMs, storage }`
// changes those, and the Storage used).
//
// Device id (opt-in; a relay older than protocol.md section 15.1 refuses the flag):
// `{ device: true }` uses an id made once with crypto.randomUUID() and kept in localStorage ("imrelay.device");
// `{ device: "<id>" }` uses that one (1 to 64 UTF-8 bytes, no control characters). LOGIN
// then carries flag DEVICE (0x0008) and the payload u8 n ‖ n bytes of id ‖ credential; the
// inbox cursor's key names the device. An INBOX_STATE with flag NEW_DEVICE (0x0010) says
// the relay has not seen this device before: it starts from what the inbox holds.
//
// Each WebSocket binary message carries whole frames of protocol.md (32-byte big-endian
// header + payload); the relay sends one frame per message. User, room and message ids
// are u64: this module takes numbers, strings or BigInts and hands out BigInts.
//
// Room payload convention used by the demo (the relay never looks inside payloads): a
// ROOM_SEND whose payload is exactly the UTF-8 text "/like" is a like; anything else is a
// danmaku line of UTF-8 text. A telnet user can like with `ROOM 7 /like`.

export const HEADER_LEN = 32;
export const VERSION = 1;
export const LIKE = "/like";

/** Opcodes (protocol.md, section 5). */
export const Op = Object.freeze({
  LOGIN: 0x01, LOGIN_OK: 0x02, SEND: 0x03, DELIVER: 0x04, ACK: 0x05, ERROR: 0x06,
  PING: 0x07, PONG: 0x08, BYE: 0x09, JOIN: 0x10, LEAVE: 0x11, ROOM_SEND: 0x12,
  ROOM_DELIVER: 0x13, ROOM_INFO: 0x14, ROOM_STATE: 0x15, BROADCAST: 0x16, ROOM_MISSED: 0x17,
  INBOX_SYNC: 0x20, INBOX_STATE: 0x21, INBOX_DELIVER: 0x22, INBOX_ACK: 0x23,
  TOKEN_EXPIRING: 0x30, REFRESH: 0x31, REFRESH_OK: 0x32,
});

/**
 * Flag bits (protocol.md, section 4): NO_ACK, DEDUP and STORED on SEND; DEVICE on LOGIN
 * (a device id leads the payload); NEW_DEVICE on INBOX_STATE (from the relay).
 */
export const Flags = Object.freeze({
  NO_ACK: 0x0001, DEDUP: 0x0002, STORED: 0x0004, DEVICE: 0x0008, NEW_DEVICE: 0x0010,
});

/** Bytes an INBOX_DELIVER puts before the message: u64 seq ‖ u64 stored_at (Unix ms). */
export const STORED_PREFIX = 16;

/** Stored-delivery acknowledgement defaults (the Rust SDK's): every 32 messages or 100 ms. */
export const INBOX_DEFAULTS = Object.freeze({ ackBatch: 32, ackDelayMs: 100 });

/** localStorage key of the id `{ device: true }` makes once. */
export const DEVICE_KEY = "imrelay.device";

/** Error code names (protocol.md, section 6). */
export const ERROR_NAMES = Object.freeze({
  1: "MALFORMED", 2: "UNKNOWN_OPCODE", 3: "FRAME_TOO_LARGE", 4: "NOT_LOGGED_IN",
  5: "ALREADY_LOGGED_IN", 6: "RECIPIENT_OFFLINE", 7: "RECIPIENT_SLOW", 8: "LIMIT_REACHED",
  9: "SHUTTING_DOWN", 10: "LOGIN_TIMEOUT", 11: "IDLE_TIMEOUT", 12: "INVALID_FIELD",
  13: "UNSUPPORTED_VERSION", 14: "NOT_IN_ROOM", 15: "FORBIDDEN", 16: "RATE_LIMITED",
  17: "INBOX_FULL", 18: "STORE_FAILED", 19: "FRAME_TIMEOUT", 20: "AUTH_FAILED",
  21: "TOKEN_EXPIRED", 22: "CLUSTER_UNAVAILABLE",
});

const OP_NAMES = Object.fromEntries(Object.entries(Op).map(([name, code]) => [code, name]));
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder("utf-8");

/** An ERROR frame from the relay, as a rejected request's reason. */
export class ImRelayError extends Error {
  constructor(frame) {
    super(`${frame.codeName}: ${frame.reason}`);
    this.name = "ImRelayError";
    this.code = frame.code;
    this.codeName = frame.codeName;
    this.reason = frame.reason;
    this.frame = frame;
  }
}

function u64(value) {
  const v = BigInt(value);
  if (v < 0n || v > 0xffffffffffffffffn) throw new RangeError(`not a u64: ${value}`);
  return v;
}

function bytesOf(payload) {
  if (payload === undefined || payload === null) return new Uint8Array(0);
  if (typeof payload === "string") return utf8.encode(payload);
  if (payload instanceof Uint8Array) return payload;
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload);
  throw new TypeError("payload must be a string, Uint8Array or ArrayBuffer");
}

function u64Bytes(...values) {
  const out = new Uint8Array(8 * values.length);
  const view = new DataView(out.buffer);
  values.forEach((v, i) => view.setBigUint64(8 * i, u64(v)));
  return out;
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** INBOX_SYNC's frame: the client has everything up to `lastSeq` of store `epoch`. */
export function inboxSyncFrame(msgId, epoch, lastSeq) {
  return { opcode: Op.INBOX_SYNC, msgId, payload: u64Bytes(epoch, lastSeq) };
}

/** INBOX_ACK's frame: every stored message up to `upto` was received. */
export function inboxAckFrame(msgId, upto) {
  return { opcode: Op.INBOX_ACK, msgId, payload: u64Bytes(upto) };
}

/** Checks a device id (1 to 64 UTF-8 bytes, no control characters); returns its bytes. */
export function deviceBytes(device) {
  if (typeof device !== "string") throw new TypeError("a device id is a string");
  if (/[\u0000-\u001f\u007f-\u009f]/.test(device)) {
    throw new RangeError("a device id has no control characters");
  }
  const bytes = utf8.encode(device);
  if (bytes.length < 1 || bytes.length > 64) {
    throw new RangeError(`a device id is 1 to 64 UTF-8 bytes, not ${bytes.length}`);
  }
  return bytes;
}

/** LOGIN's frame; with a device id, flag DEVICE and the payload u8 n ‖ id ‖ credential. */
export function loginFrame(msgId, user, credential, device = null) {
  if (device === null || device === undefined) {
    return { opcode: Op.LOGIN, msgId, target: user, payload: credential };
  }
  const id = deviceBytes(device);
  return {
    opcode: Op.LOGIN, flags: Flags.DEVICE, msgId, target: user,
    payload: concat(Uint8Array.of(id.length), id, bytesOf(credential)),
  };
}

/** A random non-zero u32 (crypto when there is one). */
function randomU32() {
  const c = globalThis.crypto;
  let v = 0;
  while (v === 0) {
    if (c?.getRandomValues) v = c.getRandomValues(new Uint32Array(1))[0];
    else v = Math.floor(Math.random() * 0x1_0000_0000);
  }
  return v;
}

/** A Storage stand-in for places without localStorage (it forgets on reload). */
class MemoryStorage {
  constructor() { this.map = new Map(); }
  getItem(k) { return this.map.has(k) ? this.map.get(k) : null; }
  setItem(k, v) { this.map.set(k, String(v)); }
  removeItem(k) { this.map.delete(k); }
}

function defaultStorage() {
  try {
    if (globalThis.localStorage) return globalThis.localStorage;
  } catch {
    // a sandboxed frame or a browser setting forbids it
  }
  return new MemoryStorage();
}

/** Reconnect settings used for `reconnect: true` (see the top of this file). */
export const RECONNECT_DEFAULTS = Object.freeze({
  initialMs: 500, maxMs: 15_000, maxAttempts: Infinity,
});

/** The wait before reconnect attempt `attempt` (1, 2, …), in ms: full jitter, capped. */
export function backoffDelay(attempt, { initialMs, maxMs } = RECONNECT_DEFAULTS, random = Math.random) {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(attempt - 1, 30));
  return Math.floor(random() * cap);
}

/** LOGIN refusals that the same fixed credential will meet again. */
const FINAL_LOGIN_ERRORS = new Set(["AUTH_FAILED", "TOKEN_EXPIRED"]);

/** Encodes one frame: { opcode, flags?, msgId?, target?, payload? } to bytes. */
export function encodeFrame({ opcode, flags = 0, msgId = 0, target = 0, payload }) {
  const body = bytesOf(payload);
  const frame = new Uint8Array(HEADER_LEN + body.length);
  const view = new DataView(frame.buffer);
  view.setUint32(0, frame.length);
  view.setUint8(4, VERSION);
  view.setUint8(5, opcode);
  view.setUint16(6, flags);
  view.setBigUint64(8, u64(msgId));
  view.setBigUint64(16, u64(target));
  view.setBigUint64(24, 0n); // source: set by the relay only
  frame.set(body, HEADER_LEN);
  return frame;
}

/** Decodes the frame at `offset` of `bytes` (a Uint8Array); returns [frame, nextOffset]. */
export function decodeFrame(bytes, offset = 0) {
  if (bytes.length - offset < HEADER_LEN) throw new Error("truncated frame header");
  const view = new DataView(bytes.buffer, bytes.byteOffset + offset, bytes.length - offset);
  const length = view.getUint32(0);
  if (length < HEADER_LEN || length > bytes.length - offset) {
    throw new Error(`bad frame length ${length}`);
  }
  const frame = {
    length,
    version: view.getUint8(4),
    opcode: view.getUint8(5),
    flags: view.getUint16(6),
    msgId: view.getBigUint64(8),
    target: view.getBigUint64(16),
    source: view.getBigUint64(24),
    payload: bytes.slice(offset + HEADER_LEN, offset + length),
  };
  frame.name = OP_NAMES[frame.opcode] ?? `0x${frame.opcode.toString(16)}`;
  describe(frame);
  return [frame, offset + length];
}

/** Decodes a message holding one or more whole frames. */
export function decodeFrames(bytes) {
  const frames = [];
  let offset = 0;
  while (offset < bytes.length) {
    const [frame, next] = decodeFrame(bytes, offset);
    frames.push(frame);
    offset = next;
  }
  return frames;
}

/** Adds the opcode's payload fields to a decoded frame. */
function describe(f) {
  const p = new DataView(f.payload.buffer, f.payload.byteOffset, f.payload.byteLength);
  switch (f.opcode) {
    case Op.LOGIN_OK:
      if (p.byteLength >= 16) {
        f.limits = {
          maxFrame: p.getUint32(0), pingIntervalMs: p.getUint32(4),
          idleTimeoutMs: p.getUint32(8), outCap: p.getUint32(12),
        };
      }
      break;
    case Op.ACK:
      f.count = p.byteLength >= 4 ? p.getUint32(0) : 0;
      break;
    case Op.ERROR:
      f.code = p.byteLength >= 2 ? p.getUint16(0) : 0;
      f.codeName = ERROR_NAMES[f.code] ?? `ERROR_${f.code}`;
      f.reason = fromUtf8.decode(f.payload.subarray(2));
      break;
    case Op.ROOM_STATE:
      f.members = p.byteLength >= 4 ? p.getUint32(0) : 0;
      f.isMember = p.byteLength >= 5 && p.getUint8(4) === 1;
      break;
    case Op.ROOM_MISSED:
      f.missed = p.byteLength >= 8 ? p.getBigUint64(0) : 0n;
      break;
    case Op.TOKEN_EXPIRING:
    case Op.REFRESH_OK:
      f.exp = p.byteLength >= 8 ? p.getBigUint64(0) : 0n;
      break;
    case Op.INBOX_STATE:
      if (p.byteLength >= 32) {
        f.epoch = p.getBigUint64(0);
        f.firstSeq = p.getBigUint64(8);
        f.lastSeq = p.getBigUint64(16);
        f.expiredUpto = p.getBigUint64(24);
      }
      f.newDevice = (f.flags & Flags.NEW_DEVICE) !== 0;
      break;
    case Op.INBOX_DELIVER:
      if (p.byteLength >= STORED_PREFIX) {
        f.seq = p.getBigUint64(0);
        f.storedAtMs = p.getBigUint64(8);
        f.message = f.payload.subarray(STORED_PREFIX);
        f.text = fromUtf8.decode(f.message);
      }
      break;
    case Op.DELIVER:
    case Op.ROOM_DELIVER:
    case Op.PING:
    case Op.PONG:
      f.text = fromUtf8.decode(f.payload);
      if (f.opcode === Op.ROOM_DELIVER) f.isLike = f.text === LIKE;
      break;
    default:
      break;
  }
}

/**
 * One connection to the relay. Requests return promises settled by the relay's answer
 * (matched by msg_id); pushed frames are events: "deliver", "room", "like", "missed",
 * "error" (ERROR frames answering nothing), "frame" (every frame), "open", "close"
 * ({ code, reason, willReconnect }). With `options.reconnect` (top of this file), also
 * "reconnecting", "reconnected" and "reconnectfailed". With `options.inbox`, also
 * "inboxstate", "gap" and "stored" (stored delivery, top of this file).
 */
export class ImRelayClient {
  constructor(url, options = {}) {
    this.url = url;
    this.ws = null;
    this.nextId = 0n;
    this.pending = new Map();
    this.handlers = new Map();
    this.user = null;
    this.limits = null;
    const r = options.reconnect;
    /** Reconnect settings, or null (no reconnecting). */
    this.reconnectOptions = r ? { ...RECONNECT_DEFAULTS, ...(r === true ? {} : r) } : null;
    /** Successful reconnects so far. */
    this.reconnects = 0;
    /** Rooms this client is in (BigInt ids), rejoined after a reconnect. */
    this.rooms = new Set();
    this.credential = "";
    this.loggedIn = false;
    this.stopped = false;      // close() or bye(): no more reconnecting
    this.reconnecting = false; // the reconnect loop runs
    this.retryTimer = null;
    this.retryWake = null;
    // Stored SENDs: DEDUP msg ids are a random tag per client, then a counter (the SDK's).
    this.idTag = BigInt(randomU32()) << 32n;
    this.storedCounter = 0n;
    const inbox = options.inbox;
    /** Stored-delivery settings, or null (no INBOX_SYNC: the inbox is left alone). */
    this.inboxOptions = inbox
      ? { ...INBOX_DEFAULTS, storage: null, ...(inbox === true ? {} : inbox) }
      : null;
    this.storage = this.inboxOptions?.storage ?? null;
    /** Where this client stands in its user's inbox: { key, epoch, last, acked }. */
    this.inbox = null;
    this.ackTimer = null;
    /** (source, msgId) of stored messages shown lately, so a second copy is not. */
    this.storedSeen = new Set();
    this.deviceOption = options.device ?? null;
    if (this.deviceOption !== null && this.deviceOption !== false && this.deviceOption !== true) {
      deviceBytes(this.deviceOption); // a bad id fails here, not at every login
    }
    /** This client's device id once logged in with `options.device`, else null. */
    this.device = null;
  }

  /** The Storage for the inbox cursor and the device id (localStorage when there is one). */
  store() {
    if (!this.storage) this.storage = defaultStorage();
    return this.storage;
  }

  /** The device id to log in with, or null (`options.device`, top of this file). */
  deviceId() {
    const d = this.deviceOption;
    if (d === null || d === false) return null;
    if (d !== true) return d;
    const storage = this.store();
    let id = null;
    try { id = storage.getItem(DEVICE_KEY); } catch { /* no storage: a new id */ }
    if (!id) {
      id = globalThis.crypto?.randomUUID?.()
        ?? `${randomU32().toString(16)}-${randomU32().toString(16)}-${Date.now().toString(16)}`;
      try { storage.setItem(DEVICE_KEY, id); } catch { /* kept for this page only */ }
    }
    return id;
  }

  /** True while the connection is open and logged in: requests can go out. */
  get connected() {
    return this.loggedIn && this.ws?.readyState === WebSocket.OPEN;
  }

  /** Subscribes `fn` to event `type`; returns a function that unsubscribes. */
  on(type, fn) {
    if (!this.handlers.has(type)) this.handlers.set(type, new Set());
    this.handlers.get(type).add(fn);
    return () => this.handlers.get(type).delete(fn);
  }

  emit(type, value) {
    for (const fn of this.handlers.get(type) ?? []) {
      try { fn(value); } catch (e) { console.error(e); }
    }
  }

  /** Opens the WebSocket; resolves once it is open. */
  connect() {
    this.stopped = false;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      // A socket this client has moved on from (a failed reconnect attempt) is ignored.
      ws.onopen = () => {
        if (this.ws !== ws) return;
        this.emit("open");
        resolve(this);
      };
      ws.onerror = () => reject(new Error(`cannot connect to ${this.url}`));
      ws.onmessage = (event) => { if (this.ws === ws) this.onMessage(event.data); };
      ws.onclose = (event) => {
        const closed = new Error(`closed: ${event.code} ${event.reason}`);
        reject(closed); // if it never opened
        if (this.ws === ws) this.onClose(event, closed);
      };
    });
  }

  onClose(event, closed) {
    const wasLoggedIn = this.loggedIn;
    this.loggedIn = false;
    this.failPending(closed);
    // A logged-in session that drops starts the loop; a failed attempt's close is the
    // loop's business.
    const willReconnect = Boolean(this.reconnectOptions) && !this.stopped
      && (wasLoggedIn || this.reconnecting);
    this.stopAckTimer();
    // Stored SENDs wait for the reconnect, which resends them (same msg id, DEDUP).
    if (!willReconnect) this.failStored(closed);
    this.emit("close", { code: event.code, reason: event.reason, willReconnect });
    if (willReconnect && !this.reconnecting) this.reconnectLoop(closed);
  }

  /** Rejects every request waiting for an answer, except stored SENDs (kept to resend). */
  failPending(error) {
    for (const [id, waiter] of this.pending) {
      if (waiter.stored) continue;
      this.pending.delete(id);
      waiter.reject(error);
    }
  }

  /** Rejects the stored SENDs still waiting for their ACK: they will not be resent. */
  failStored(error) {
    for (const [id, waiter] of this.pending) {
      this.pending.delete(id);
      waiter.reject(error);
    }
  }

  /** Retries until logged in and rejoined again, or until it gives up or is stopped. */
  async reconnectLoop(cause) {
    const options = this.reconnectOptions;
    this.reconnecting = true;
    let error = cause;
    let back = false;
    try {
      for (let attempt = 1; !this.stopped; attempt += 1) {
        if (attempt > options.maxAttempts) {
          this.emit("reconnectfailed", { attempts: attempt - 1, error });
          return;
        }
        const delayMs = backoffDelay(attempt, options);
        this.emit("reconnecting", { attempt, delayMs, error });
        await this.pause(delayMs);
        if (this.stopped) return;
        try {
          await this.connect();
          await this.login(this.user, this.credential);
          this.resendStored();
          const failedRooms = [];
          for (const room of [...this.rooms]) {
            try {
              await this.join(room);
            } catch (e) {
              if (!(e instanceof ImRelayError)) throw e; // the connection went: retry all
              this.rooms.delete(room);
              failedRooms.push({ room, error: e });
            }
          }
          this.reconnects += 1;
          back = true;
          this.emit("reconnected", {
            attempt, reconnects: this.reconnects, rooms: [...this.rooms], failedRooms,
          });
          return;
        } catch (e) {
          error = e;
          const ws = this.ws;
          this.ws = null; // its close, if still to come, is not news
          this.loggedIn = false;
          this.failPending(e);
          if (ws && ws.readyState <= WebSocket.OPEN) ws.close();
          if (e instanceof ImRelayError && FINAL_LOGIN_ERRORS.has(e.codeName)
              && typeof this.credential !== "function") {
            this.emit("reconnectfailed", { attempts: attempt, error: e });
            return;
          }
        }
      }
    } finally {
      this.reconnecting = false;
      this.retryTimer = null;
      this.retryWake = null;
      // Given up or stopped: nothing will resend the stored SENDs still waiting.
      if (!back && !this.connected) this.failStored(error ?? new Error("not connected"));
    }
  }

  pause(ms) {
    return new Promise((resolve) => {
      this.retryWake = resolve;
      this.retryTimer = setTimeout(resolve, ms);
    });
  }

  /** Skips the wait before the next reconnect attempt, if one is waiting. */
  retryNow() {
    if (!this.retryWake) return;
    clearTimeout(this.retryTimer);
    this.retryWake();
  }

  /** Closes the connection (WebSocket code 1000) and stops reconnecting. */
  close() {
    this.stopped = true;
    this.retryNow();
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "bye");
  }

  onMessage(data) {
    if (typeof data === "string") return; // text mode is for people; this client is binary
    let frames;
    try {
      frames = decodeFrames(new Uint8Array(data));
    } catch (e) {
      console.error("imrelay: undecodable message", e);
      return;
    }
    for (const f of frames) this.onFrame(f);
  }

  onFrame(f) {
    this.emit("frame", f);
    switch (f.opcode) {
      case Op.PING:
        // The relay pings after silence; any frame counts as a sign of life.
        this.write({ opcode: Op.PONG, msgId: f.msgId, payload: f.payload });
        return;
      case Op.DELIVER:
        this.emit("deliver", f);
        return;
      case Op.ROOM_DELIVER:
        this.emit(f.isLike ? "like" : "room", f);
        return;
      case Op.ROOM_MISSED:
        this.emit("missed", f);
        return;
      case Op.INBOX_STATE:
        this.onInboxState(f);
        return;
      case Op.INBOX_DELIVER:
        this.onInboxDeliver(f);
        return;
      case Op.TOKEN_EXPIRING:
        // protocol.md section 16.8: fetch a new token and REFRESH before `exp`.
        this.emit("expiring", f);
        if (this.tokenProvider) {
          Promise.resolve(this.tokenProvider(this.user))
            .then((token) => this.refresh(token))
            .catch((e) => this.emit("error", { codeName: "REFRESH", reason: String(e) }));
        }
        return;
      default:
        break;
    }
    const waiter = this.pending.get(f.msgId);
    if (waiter && f.msgId !== 0n) {
      this.pending.delete(f.msgId);
      if (f.opcode === Op.ERROR) waiter.reject(new ImRelayError(f));
      else waiter.resolve(f);
    } else if (f.opcode === Op.ERROR) {
      this.emit("error", f);
    } else if (f.opcode === Op.ROOM_STATE) {
      this.emit("state", f);
    }
  }

  write(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) throw new Error("not connected");
    this.ws.send(encodeFrame(frame));
  }

  /** Sends a request frame; resolves with the frame that answers it (ERROR rejects). */
  request(opcode, target, payload, flags = 0) {
    return this.requestFrame({ opcode, flags, target, payload });
  }

  /**
   * Sends `frame` with a fresh msg id (or its own `msgId`); resolves with the frame that
   * answers it (ERROR rejects). A `stored` request outlives a reconnect (resendStored).
   */
  requestFrame(frame, stored = false) {
    let msgId = frame.msgId;
    if (msgId === undefined) {
      this.nextId += 1n;
      msgId = this.nextId;
    }
    const out = { ...frame, msgId };
    return new Promise((resolve, reject) => {
      this.pending.set(msgId, { resolve, reject, stored: stored ? out : null });
      try {
        this.write(out);
      } catch (e) {
        this.pending.delete(msgId);
        reject(e);
      }
    });
  }

  /** Writes again every stored SEND still waiting for its ACK (after a reconnect's login). */
  resendStored() {
    for (const waiter of this.pending.values()) {
      if (waiter.stored) this.write(waiter.stored);
    }
  }

  // ---- stored delivery (protocol.md section 15) ------------------------------------

  /** The localStorage key of the inbox cursor for this relay, user and device. */
  inboxKey() {
    const device = this.device === null ? "" : `|${this.device}`;
    return `imrelay.inbox|${this.url}|${this.user}${device}`;
  }

  /** The saved cursor { epoch, last } for `key` (0 and 0 when there is none). */
  loadCursor(key) {
    try {
      const saved = JSON.parse(this.store().getItem(key) ?? "null");
      if (saved) return { epoch: u64(saved.epoch), last: u64(saved.last) };
    } catch {
      // unreadable or not ours: start from the beginning
    }
    return { epoch: 0n, last: 0n };
  }

  saveCursor() {
    const { key, epoch, last } = this.inbox;
    try {
      this.store().setItem(key, JSON.stringify({ epoch: String(epoch), last: String(last) }));
    } catch (e) {
      console.warn("imrelay: cannot save the inbox cursor", e);
    }
  }

  /** After LOGIN_OK: INBOX_SYNC with the saved cursor (the relay takes `last` as an ack). */
  syncInbox() {
    this.stopAckTimer();
    const key = this.inboxKey();
    const { epoch, last } = this.loadCursor(key);
    this.inbox = { key, epoch, last, acked: last };
    this.nextId += 1n;
    this.write(inboxSyncFrame(this.nextId, epoch, last));
  }

  onInboxState(f) {
    const inbox = this.inbox;
    if (!inbox || f.epoch === undefined) {
      this.emit("inboxstate", f);
      return;
    }
    const sameEpoch = f.epoch === inbox.epoch;
    if (!sameEpoch) {
      // Another store (or the first sync): its numbers start afresh for this client.
      inbox.epoch = f.epoch;
      inbox.last = 0n;
      inbox.acked = 0n;
    }
    const after = inbox.last > f.firstSeq - 1n ? inbox.last : f.firstSeq - 1n;
    this.emit("inboxstate", {
      epoch: f.epoch, firstSeq: f.firstSeq, lastSeq: f.lastSeq, expiredUpto: f.expiredUpto,
      newDevice: f.newDevice, waiting: f.lastSeq > after ? f.lastSeq - after : 0n, frame: f,
    });
    if (sameEpoch && inbox.last < f.expiredUpto) {
      this.emit("gap", { from: inbox.last + 1n, to: f.expiredUpto });
      inbox.last = f.expiredUpto; // told: acknowledged, so the relay forgets the gap
      this.scheduleAck();
    }
    this.saveCursor();
  }

  onInboxDeliver(f) {
    const inbox = this.inbox;
    if (!inbox || f.seq === undefined || f.seq <= inbox.last) return; // had it already
    const pair = `${f.source}:${f.msgId}`;
    // A second copy of a message shown already (a resend stored twice after a relay crash)
    // takes its sequence number, but is not shown again.
    if (f.msgId === 0n || !this.storedSeen.has(pair)) {
      if (f.msgId !== 0n) {
        this.storedSeen.add(pair);
        if (this.storedSeen.size > 4096) {
          this.storedSeen.delete(this.storedSeen.values().next().value);
        }
      }
      const fromOtherDevice = f.source === this.user;
      this.emit("stored", {
        seq: f.seq, storedAt: new Date(Number(f.storedAtMs)), source: f.source,
        target: f.target, msgId: f.msgId, payload: f.message, text: f.text,
        peer: fromOtherDevice ? f.target : f.source, fromOtherDevice, frame: f,
      });
    }
    inbox.last = f.seq;
    this.saveCursor(); // after the app had it: at least once
    this.scheduleAck();
  }

  /** INBOX_ACK now when `ackBatch` are waiting, else within `ackDelayMs`. */
  scheduleAck() {
    const inbox = this.inbox;
    if (inbox.last - inbox.acked >= BigInt(this.inboxOptions.ackBatch)) {
      this.sendInboxAck();
    } else if (!this.ackTimer) {
      this.ackTimer = setTimeout(() => {
        this.ackTimer = null;
        this.sendInboxAck();
      }, this.inboxOptions.ackDelayMs);
    }
  }

  sendInboxAck() {
    this.stopAckTimer();
    const inbox = this.inbox;
    if (!inbox || inbox.last <= inbox.acked || !this.connected) return; // the next sync acks
    this.nextId += 1n;
    this.write(inboxAckFrame(this.nextId, inbox.last));
    inbox.acked = inbox.last;
  }

  stopAckTimer() {
    if (this.ackTimer) clearTimeout(this.ackTimer);
    this.ackTimer = null;
  }

  /**
   * LOGIN; resolves with the relay's limits. `credential` is the login token where the
   * relay checks tokens (protocol.md section 16), or a function `(user) => token` (may
   * return a promise) that is also called to REFRESH when the relay says the token
   * expires soon.
   */
  async login(user, credential = "") {
    this.credential = credential; // for logging in again after a reconnect
    if (typeof credential === "function") {
      this.tokenProvider = credential;
      credential = await credential(user);
    }
    const device = this.deviceId();
    const ok = await this.requestFrame(loginFrame(undefined, user, credential, device));
    this.user = ok.target;
    this.limits = ok.limits;
    this.device = device;
    this.loggedIn = true;
    if (this.inboxOptions) this.syncInbox();
    return ok.limits;
  }

  /** REFRESH with a new token; resolves with its `exp` (Unix seconds, BigInt). */
  async refresh(token) {
    return (await this.request(Op.REFRESH, 0, token)).exp;
  }

  /** SEND to a user; resolves with the number of its connections that got it. */
  async send(user, payload) {
    return (await this.request(Op.SEND, user, payload)).count;
  }

  /**
   * SEND with STORED and DEDUP: the relay keeps the message in `user`'s inbox until one of
   * its devices acknowledges it. Resolves with the ACK count: the recipient's connections
   * it was pushed to now (0: stored for later, the recipient is offline). Cut off by a
   * close, it is resent after the reconnect with the same msg id, stored once.
   */
  async sendStored(user, payload) {
    this.storedCounter += 1n;
    const msgId = this.idTag | (this.storedCounter & 0xffffffffn);
    const frame = {
      opcode: Op.SEND, flags: Flags.STORED | Flags.DEDUP, msgId, target: u64(user),
      payload: bytesOf(payload),
    };
    return (await this.requestFrame(frame, true)).count;
  }

  /** JOIN a room; resolves with { members, isMember }. */
  async join(room) {
    const s = await this.request(Op.JOIN, room);
    if (s.isMember) this.rooms.add(u64(room));
    return { members: s.members, isMember: s.isMember };
  }

  /** LEAVE a room; resolves with { members, isMember }. */
  async leave(room) {
    const s = await this.request(Op.LEAVE, room);
    this.rooms.delete(u64(room));
    return { members: s.members, isMember: s.isMember };
  }

  /** ROOM_INFO: the online count; resolves with { members, isMember }. */
  async roomInfo(room) {
    const s = await this.request(Op.ROOM_INFO, room);
    return { members: s.members, isMember: s.isMember };
  }

  /** ROOM_SEND to every other member; resolves with how many connections got it. */
  async roomSend(room, payload) {
    return (await this.request(Op.ROOM_SEND, room, payload)).count;
  }

  /** A like event in the room (the "/like" convention above). */
  like(room) {
    return this.roomSend(room, LIKE);
  }

  /** PING; resolves with the PONG's payload as text. */
  async ping(text = "") {
    return (await this.request(Op.PING, 0, text)).text;
  }

  /** BYE, then the relay closes the connection (and this client does not reconnect). */
  async bye() {
    this.stopped = true;
    this.retryNow();
    await this.request(Op.BYE, 0);
  }
}
