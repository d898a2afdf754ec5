// The browser half of tests/browser.rs's stored-delivery test: user 1's page (H5 demo, room
// 7, `inbox: true`) syncs its inbox and is closed; while no page of user 1 is open, the
// native clients store two messages for user 1 (one from user 3, one from user 1's own
// other device). A new page of user 1 in the same browser context (the same localStorage)
// shows both in Direct messages with their stored time, and acknowledges them; a reload
// shows neither again. Helpers and the line protocol: common.mjs.
//
// Steps: `page-closed` (the first page synced, saved its cursor and is closed: the native
// clients store the messages), `acked <seq>` (the new page shows them, the highest seq
// it showed is <seq>, and the relay has processed its INBOX_ACK up to <seq>: the native
// client checks that user 1's inbox is empty), `done`.

import {
  DESKTOP, SAFETY_MS, SCREENSHOT, eventMatching, frameSeen, itemFrom, noErrors, openPageIn,
  run, stateIs, step,
} from "./common.mjs";

const INBOX_ACK = 0x23;
const ROOM_INFO = 0x14;
const ROOM_STATE = 0x15;

/** The stored messages the page shows: [{ from, seq, who, text, storedAt }]. */
function storedItems(page) {
  return page.$$eval("#dm-list li.dm-stored", (items) => items.map((li) => ({
    from: li.dataset.from,
    seq: li.dataset.seq,
    cls: li.className,
    who: li.querySelector(".who")?.textContent,
    text: li.textContent,
    storedAt: li.querySelector("time.stored-at")?.dateTime,
  })));
}

await run("browser inbox", async (browser) => {
  const context = await browser.newContext(DESKTOP);
  const first = await openPageIn(context, 1);
  await stateIs(first, "live");
  // Synced (INBOX_STATE came, saying the relay has not seen this browser's device yet):
  // its cursor (the store's epoch, last 0) is in localStorage.
  await eventMatching(first, /inbox synced: 0 stored message\(s\) waiting \(new device\)$/);
  noErrors(first);
  await first.close();
  await step("page-closed");          // the native clients store two messages for user 1

  const page = await openPageIn(context, 1);
  await stateIs(page, "live");
  await eventMatching(page, /inbox synced: 2 stored message\(s\) waiting$/);
  await itemFrom(page, "dm-list", 3, "stored hello for 1", "dm-in");
  await itemFrom(page, "dm-list", 1, "→ 1: a note from my phone", "dm-out");
  const items = await storedItems(page);
  if (items.length !== 2) throw new Error(`stored items: ${JSON.stringify(items)}`);
  for (const item of items) {
    if (!item.storedAt || !item.text.includes("stored ") || !/^[1-9][0-9]*$/.test(item.seq ?? "")) {
      throw new Error(`a stored message without its seq or stored time: ${JSON.stringify(item)}`);
    }
  }
  const mine = items.find((i) => i.from === "1");
  if (mine.who !== "you, from another device") {
    throw new Error(`a message from another device shows as ${JSON.stringify(mine)}`);
  }
  const seq = items.map((i) => BigInt(i.seq)).reduce((a, b) => (a > b ? a : b));

  // The page acknowledged up to `seq` (INBOX_ACK, within 100 ms of the last message) and
  // the relay has processed it: it answered a ROOM_INFO the page sent after the ack (a
  // connection's frames are handled in order; the page asks every second).
  const ack = await frameSeen(page, (f) => f.dir === "sent" && f.opcode === INBOX_ACK
    && f.payload.length === 8 && f.payload.readBigUInt64BE(0) >= seq, `INBOX_ACK up to ${seq}`);
  const info = await frameSeen(page, (f) => f.dir === "sent" && f.opcode === ROOM_INFO
    && f.index > ack.index, "a ROOM_INFO after the INBOX_ACK");
  await frameSeen(page, (f) => f.dir === "received" && f.opcode === ROOM_STATE
    && f.msgId === info.msgId, "the ROOM_STATE answering it");
  await step("acked", String(seq));    // a fresh sync of user 1 finds the inbox empty

  // A reload syncs from the saved cursor: nothing is waiting, nothing is shown again.
  await page.screenshot({ path: SCREENSHOT });
  noErrors(page);
  await page.reload({ timeout: SAFETY_MS });
  await stateIs(page, "live");
  await eventMatching(page, /inbox synced: 0 stored message\(s\) waiting$/);
  const again = await storedItems(page);
  if (again.length) throw new Error(`shown again after a reload: ${JSON.stringify(again)}`);
  noErrors(page);
});
