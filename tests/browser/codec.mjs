// Checks examples/h5/imrelay.js in Node.js, without a browser or a relay (run by
// tests/browser.rs; by hand: node tests/browser/codec.mjs):
//   1. its encoder and decoder against the hex vectors of protocol.md (read from the file,
//      so they cannot drift: LOGIN, SEND_DEDUP, SEND_STORED, INBOX_SYNC, INBOX_STATE,
//      INBOX_DELIVER, INBOX_ACK), and the device LOGIN of the same user;
//   2. its stored-delivery client (sync with the saved cursor, gap, replay drop, batched
//      acks, another device's message, stored SEND resent after a reconnect, device ids)
//      against a scripted fake relay behind a fake WebSocket.
// Every wait is on a frame the client writes; the timeouts are safety nets. Prints
// `codec ok` and exits 0, or the failure and exits 1.

import { readFileSync } from "node:fs";
import { strict as assert } from "node:assert";

const root = new URL("../../", import.meta.url);
const source = readFileSync(new URL("examples/h5/imrelay.js", root), "utf8");
// imrelay.js is a browser module; Node takes it as one from a data: URL.
const js = await import(`data:text/javascript;base64,${Buffer.from(source).toString("base64")}`);
const { Op, Flags, encodeFrame, decodeFrame, inboxSyncFrame, inboxAckFrame, loginFrame } = js;

// ---- 1. protocol.md's vectors -------------------------------------------------------

const vectors = {};
const md = readFileSync(new URL("protocol.md", root), "utf8");
for (const m of md.matchAll(/```hex (\w+)\n([\s\S]*?)```/g)) {
  vectors[m[1]] = Uint8Array.from(m[2].trim().split(/\s+/), (h) => parseInt(h, 16));
}
const vector = (name) => {
  assert.ok(vectors[name], `protocol.md has no hex vector ${name}`);
  return vectors[name];
};
const hex = (bytes) => Buffer.from(bytes).toString("hex");
const sameBytes = (got, name) => assert.equal(hex(got), hex(vector(name)), `${name} bytes`);

sameBytes(encodeFrame(loginFrame(1n, 1001n, "secret")), "LOGIN");
sameBytes(encodeFrame({
  opcode: Op.SEND, flags: Flags.DEDUP, msgId: 0x8c3f1a2e00000001n, target: 1002n,
  payload: "hi bob",
}), "SEND_DEDUP");
sameBytes(encodeFrame({
  opcode: Op.SEND, flags: Flags.STORED | Flags.DEDUP, msgId: 2n, target: 1002n,
  payload: "hi bob",
}), "SEND_STORED");
sameBytes(encodeFrame(inboxSyncFrame(7n, 0xcafe0001n, 4n)), "INBOX_SYNC");
sameBytes(encodeFrame(inboxAckFrame(8n, 7n)), "INBOX_ACK");

const [state] = decodeFrame(vector("INBOX_STATE"));
assert.equal(state.name, "INBOX_STATE");
assert.deepEqual(
  [state.msgId, state.target, state.epoch, state.firstSeq, state.lastSeq, state.expiredUpto, state.newDevice],
  [7n, 1002n, 0xcafe0001n, 6n, 7n, 5n, false],
);
const withNewDevice = vector("INBOX_STATE").slice();
withNewDevice[7] = Flags.NEW_DEVICE;
assert.equal(decodeFrame(withNewDevice)[0].newDevice, true, "NEW_DEVICE (0x0010)");

const [deliver] = decodeFrame(vector("INBOX_DELIVER"));
assert.equal(deliver.name, "INBOX_DELIVER");
assert.deepEqual(
  [deliver.msgId, deliver.target, deliver.source, deliver.seq, deliver.storedAtMs, deliver.text],
  [2n, 1002n, 1001n, 6n, 1_700_000_000_000n, "hi bob"],
);

// LOGIN with flag DEVICE (0x0008): u8 n ‖ n bytes of device id ‖ the credential.
assert.equal(hex(encodeFrame(loginFrame(1n, 1001n, "secret", "phone"))), [
  "0000002c 01 01 0008 0000000000000001",
  "00000000000003e9 0000000000000000",
  "05 70686f6e65 736563726574",
].join("").replace(/ /g, ""));
for (const bad of ["", "x".repeat(65), "a\nb", "tab\there", "del\u007f"]) {
  assert.throws(() => loginFrame(1n, 1n, "", bad), RangeError, JSON.stringify(bad));
}
assert.doesNotThrow(() => loginFrame(1n, 1n, "", "é".repeat(32))); // 64 bytes

// ---- 2. the client against a fake relay --------------------------------------------

const SAFETY_MS = 5_000;

/** A scripted relay end of a WebSocket: records what the client writes, answers LOGIN. */
class FakeWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;
  static all = [];

  constructor(url) {
    this.url = url;
    this.readyState = FakeWebSocket.CONNECTING;
    this.sent = [];
    this.waiters = [];
    this.newDevice = false;
    FakeWebSocket.all.push(this);
    setTimeout(() => {
      this.readyState = FakeWebSocket.OPEN;
      this.onopen?.();
    }, 0);
  }

  send(bytes) {
    const [f] = decodeFrame(new Uint8Array(bytes));
    this.sent.push(f);
    if (f.opcode === Op.LOGIN) {
      const limits = new Uint8Array(16);
      new DataView(limits.buffer).setUint32(0, 65536);
      this.push({ opcode: Op.LOGIN_OK, msgId: f.msgId, target: f.target, payload: limits });
    }
    for (const w of [...this.waiters]) {
      if (w.test(f)) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(f);
      }
    }
  }

  close(code = 1000, reason = "") {
    if (this.readyState === FakeWebSocket.CLOSED) return;
    this.readyState = FakeWebSocket.CLOSED;
    setTimeout(() => this.onclose?.({ code, reason }), 0);
  }

  /** The relay sends a frame (its `source` and `flags` as given), asynchronously. */
  push(frame) {
    const bytes = encodeFrame(frame);
    const view = new DataView(bytes.buffer);
    view.setBigUint64(24, BigInt(frame.source ?? 0n));
    setTimeout(() => this.onmessage?.({ data: bytes.buffer }), 0);
  }

  /** The same, delivered now (synchronously). */
  pushNow(frame) {
    const bytes = encodeFrame(frame);
    new DataView(bytes.buffer).setBigUint64(24, BigInt(frame.source ?? 0n));
    this.onmessage?.({ data: bytes.buffer });
  }

  /** Resolves with the first frame the client writes (from now or already) that passes `test`. */
  written(test, what) {
    const had = this.sent.find(test);
    if (had) return Promise.resolve(had);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the client did not write ${what}`)), SAFETY_MS);
      this.waiters.push({ test, resolve: (f) => { clearTimeout(timer); resolve(f); } });
    });
  }
}
globalThis.WebSocket = FakeWebSocket;

class Storage {
  constructor(entries = {}) { this.map = new Map(Object.entries(entries)); }
  getItem(k) { return this.map.has(k) ? this.map.get(k) : null; }
  setItem(k, v) { this.map.set(k, String(v)); }
}

const u64s = (...values) => {
  const out = new Uint8Array(8 * values.length);
  values.forEach((v, i) => new DataView(out.buffer).setBigUint64(8 * i, BigInt(v)));
  return out;
};
const EPOCH = 0xcafe0001n;
const inboxState = (msgId, target, first, last, expired, flags = 0) => ({
  opcode: Op.INBOX_STATE, flags, msgId, target, payload: u64s(EPOCH, first, last, expired),
});
const inboxDeliver = (seq, source, target, text, msgId = seq + 100n) => ({
  opcode: Op.INBOX_DELIVER, msgId, target, source,
  payload: new Uint8Array([...u64s(seq, 1_700_000_000_000n), ...new TextEncoder().encode(text)]),
});
const isOp = (op) => (f) => f.opcode === op;
const lastSocket = () => FakeWebSocket.all.at(-1);
/** Resolves with the next `type` event of `client`. */
const nextEvent = (client, type) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`no ${type} event`)), SAFETY_MS);
  const off = client.on(type, (e) => { off(); clearTimeout(timer); resolve(e); });
});

const URL_ = "ws://relay.test/";
const KEY = `imrelay.inbox|${URL_}|1002`;
const storage = new Storage({ [KEY]: JSON.stringify({ epoch: String(EPOCH), last: "4" }) });
const client = new js.ImRelayClient(URL_, {
  inbox: { storage }, reconnect: { initialMs: 1, maxMs: 1 },
});
const seen = { state: [], gap: [], stored: [] };
client.on("inboxstate", (s) => seen.state.push(s));
client.on("gap", (g) => seen.gap.push(g));
client.on("stored", (m) => {
  // Saved after the app had it: the cursor still says the one before.
  m.savedLastWhenShown = JSON.parse(storage.getItem(KEY)).last;
  seen.stored.push(m);
});
await client.connect();
await client.login(1002);
let ws = lastSocket();

// After LOGIN_OK: INBOX_SYNC with the saved epoch and last (protocol.md's INBOX_SYNC but
// for the msg id).
const sync = await ws.written(isOp(Op.INBOX_SYNC), "INBOX_SYNC");
const syncBytes = encodeFrame(inboxSyncFrame(sync.msgId, EPOCH, 4n));
assert.equal(hex(syncBytes.subarray(16)), hex(vector("INBOX_SYNC").subarray(16)));
assert.equal(sync.flags, 0);
assert.equal(sync.target, 0n);

// INBOX_STATE: 6 and 7 held, 5 expired: a gap 5..=5, acknowledged so the relay forgets it.
ws.pushNow(inboxState(sync.msgId, 1002n, 6n, 7n, 5n));
assert.equal(seen.state.length, 1);
assert.deepEqual(
  [seen.state[0].epoch, seen.state[0].firstSeq, seen.state[0].lastSeq, seen.state[0].expiredUpto,
    seen.state[0].newDevice, seen.state[0].waiting],
  [EPOCH, 6n, 7n, 5n, false, 2n],
);
assert.deepEqual(seen.gap, [{ from: 5n, to: 5n }]);

// The replay: 6, then 6 again (dropped), then 7; one INBOX_ACK for 7 within 100 ms.
ws.pushNow(inboxDeliver(6n, 1001n, 1002n, "hi bob", 2n));
ws.pushNow(inboxDeliver(6n, 1001n, 1002n, "hi bob", 2n));
ws.pushNow(inboxDeliver(7n, 1001n, 1002n, "and again"));
assert.equal(seen.stored.length, 2, "seq 6 twice is shown once");
const [m6, m7] = seen.stored;
assert.deepEqual(
  [m6.seq, m6.source, m6.target, m6.msgId, m6.text, m6.peer, m6.fromOtherDevice],
  [6n, 1001n, 1002n, 2n, "hi bob", 1001n, false],
);
assert.equal(m6.storedAt.getTime(), 1_700_000_000_000);
assert.equal(new TextDecoder().decode(m6.payload), "hi bob");
assert.equal(m6.savedLastWhenShown, "5", "the cursor is saved after the app had the message");
assert.equal(m7.seq, 7n);
assert.equal(JSON.parse(storage.getItem(KEY)).last, "7");
const ack7 = await ws.written((f) => isOp(Op.INBOX_ACK)(f) && f.payload.length === 8
  && new DataView(f.payload.buffer, f.payload.byteOffset).getBigUint64(0) === 7n, "INBOX_ACK 7");
assert.equal(ack7.target, 0n);
assert.equal(ws.sent.filter(isOp(Op.INBOX_ACK)).length, 1, "one ack for 5 (the gap), 6 and 7");

// 32 more: the 32nd is acknowledged at once, before any timer could run.
for (let seq = 8n; seq < 40n; seq += 1n) ws.pushNow(inboxDeliver(seq, 1001n, 1002n, `m${seq}`));
const lastWritten = ws.sent.at(-1);
assert.equal(lastWritten.opcode, Op.INBOX_ACK, "a batch of 32 is acknowledged at once");
assert.equal(new DataView(lastWritten.payload.buffer, lastWritten.payload.byteOffset).getBigUint64(0), 39n);

// A message the user sent from another device: source is the user, target the peer.
ws.pushNow(inboxDeliver(40n, 1002n, 1001n, "sent from my phone"));
const mine = seen.stored.at(-1);
assert.deepEqual([mine.fromOtherDevice, mine.peer, mine.text], [true, 1001n, "sent from my phone"]);
// A second copy of a message shown already, under a new seq (a resend stored twice):
// not shown, but its seq counts.
ws.pushNow(inboxDeliver(41n, 1001n, 1002n, "hi bob", 2n));
assert.equal(seen.stored.at(-1).seq, 40n);
assert.equal(JSON.parse(storage.getItem(KEY)).last, "41");

// sendStored: flags STORED|DEDUP, a tagged non-zero msg id; resolves with the ACK count.
const firstStored = client.sendStored(1003n, "for later");
const storedSend = await ws.written((f) => f.opcode === Op.SEND, "a stored SEND");
assert.equal(storedSend.flags, Flags.STORED | Flags.DEDUP);
assert.ok(storedSend.msgId >> 32n !== 0n, "a DEDUP msg id with the client's tag");
ws.push({ opcode: Op.ACK, msgId: storedSend.msgId, target: 1003n, payload: u64s(0n).subarray(4) });
assert.equal(await firstStored, 0, "count 0: stored for later");

// Another one, cut off by a close: resent after the reconnect with the same msg id.
const cutOff = client.sendStored(1003n, "through a reconnect");
const first = await ws.written((f) => f.opcode === Op.SEND && f.msgId !== storedSend.msgId, "the second stored SEND");
const reconnected = nextEvent(client, "reconnected");
ws.close(1001, "SHUTTING_DOWN");
await reconnected;
ws = lastSocket();
const resync = await ws.written(isOp(Op.INBOX_SYNC), "INBOX_SYNC after the reconnect");
assert.equal(hex(resync.payload), hex(u64s(EPOCH, 41n)), "the reconnect syncs from 41");
const resent = await ws.written((f) => f.opcode === Op.SEND, "the stored SEND again");
assert.deepEqual(
  [resent.msgId, resent.flags, resent.target, new TextDecoder().decode(resent.payload)],
  [first.msgId, Flags.STORED | Flags.DEDUP, 1003n, "through a reconnect"],
);
const loginAt = ws.sent.findIndex(isOp(Op.LOGIN));
assert.ok(ws.sent.indexOf(resent) > loginAt, "resent after LOGIN");
ws.push({ opcode: Op.ACK, msgId: resent.msgId, target: 1003n, payload: Uint8Array.of(0, 0, 0, 1) });
assert.equal(await cutOff, 1);
// A replay on the new link starts after 41: 41 again is dropped, by its seq alone (its
// (source, msgId) was never shown), and 42 is shown.
const before = seen.stored.length;
ws.pushNow(inboxState(resync.msgId, 1002n, 41n, 42n, 0n));
ws.pushNow(inboxDeliver(41n, 1001n, 1002n, "not again", 999n));
assert.equal(seen.stored.length, before);
ws.pushNow(inboxDeliver(42n, 1001n, 1002n, "after the reconnect"));
assert.equal(seen.stored.at(-1).text, "after the reconnect");
assert.deepEqual(seen.gap, [{ from: 5n, to: 5n }], "no new gap");
// A stored SEND that the close cuts off when nothing will resend it rejects.
const doomed = client.sendStored(1003n, "never acked");
await ws.written((f) => f.opcode === Op.SEND
  && new TextDecoder().decode(f.payload) === "never acked", "the doomed SEND");
client.close();
await assert.rejects(doomed, /closed/);

// Another epoch (a repaired store): counted from 0, and no gap for the old numbers.
const other = new js.ImRelayClient(URL_, { inbox: { storage } });
const otherStates = [];
const otherGaps = [];
other.on("inboxstate", (s) => otherStates.push(s));
other.on("gap", (g) => otherGaps.push(g));
await other.connect();
await other.login(1002);
ws = lastSocket();
const sync2 = await ws.written(isOp(Op.INBOX_SYNC), "INBOX_SYNC of a new client");
assert.equal(hex(sync2.payload), hex(u64s(EPOCH, 42n)), "a new client starts from the saved cursor");
ws.pushNow({ opcode: Op.INBOX_STATE, msgId: sync2.msgId, target: 1002n, payload: u64s(0xbeefn, 3n, 4n, 2n) });
assert.deepEqual([otherStates[0].waiting, otherGaps.length], [2n, 0]);
assert.deepEqual(JSON.parse(storage.getItem(KEY)), { epoch: String(0xbeefn), last: "0" });
other.close();

// ---- device ids ---------------------------------------------------------------------

const devStorage = new Storage();
const phone = new js.ImRelayClient(URL_, { inbox: { storage: devStorage }, device: true });
const phoneStates = [];
phone.on("inboxstate", (s) => phoneStates.push(s));
await phone.connect();
await phone.login(1002, "secret");
ws = lastSocket();
const login = ws.sent.find(isOp(Op.LOGIN));
const id = devStorage.getItem(js.DEVICE_KEY);
assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/, "a UUID kept");
assert.equal(login.flags, Flags.DEVICE);
assert.equal(hex(login.payload), hex(new Uint8Array([id.length, ...Buffer.from(id), ...Buffer.from("secret")])));
assert.equal(phone.device, id);
const devSync = await ws.written(isOp(Op.INBOX_SYNC), "the device's INBOX_SYNC");
ws.pushNow(inboxState(devSync.msgId, 1002n, 9n, 9n, 0n, Flags.NEW_DEVICE));
assert.equal(phoneStates[0].newDevice, true);
assert.ok(devStorage.getItem(`${KEY}|${id}`), "the cursor's key names the device");
phone.close();
// The same storage: the same id again.
const again = new js.ImRelayClient(URL_, { inbox: { storage: devStorage }, device: true });
await again.connect();
await again.login(1002, "secret");
assert.equal(again.device, id);
again.close();
// A given id, and none: LOGIN unchanged without the option.
const named = new js.ImRelayClient(URL_, { device: "phone" });
await named.connect();
await named.login(1001, "secret");
assert.equal(hex(encodeFrame(lastSocket().sent[0])),
  hex(encodeFrame(loginFrame(1n, 1001n, "secret", "phone"))));
named.close();
const plain = new js.ImRelayClient(URL_);
await plain.connect();
await plain.login(1001, "secret");
const plainLogin = lastSocket().sent[0];
assert.equal(hex(encodeFrame(plainLogin)), hex(vector("LOGIN")));
assert.equal(lastSocket().sent.filter(isOp(Op.INBOX_SYNC)).length, 0, "no inbox option: no sync");
plain.close();
assert.throws(() => new js.ImRelayClient(URL_, { device: "" }), RangeError);

console.log("codec ok");
process.exit(0);
