// The browser half of tests/browser.rs's stored-send test: user 1's page (H5 demo, room 7)
// sends a direct message to user 3, who is offline. The relay refuses the plain SEND
// (RECIPIENT_OFFLINE), the page sends it again as a stored message and says so; the native
// client then logs in as user 3 and finds it in its inbox. Helpers and the line protocol:
// common.mjs.
//
// Steps: `dm-stored` (the page says "stored for 3": the native client logs in as 3, syncs
// and checks the INBOX_DELIVER), `done`.

import {
  SCREENSHOT, eventMatching, frameSeen, itemFrom, noErrors, openPage, run, stateIs, step,
} from "./common.mjs";

const SEND = 0x03;
const ACK = 0x05;
const ERROR = 0x06;
const STORED_DEDUP = 0x0006;

await run("browser offline dm", async (browser) => {
  const page = await openPage(browser, 1);
  await stateIs(page, "live");

  await page.fill("#dm-to", "3");
  await page.fill("#dm-input", "see you later, 3");
  await page.click("#dm-send");
  await itemFrom(page, "dm-list", 1, "stored for 3, delivered when they come online", "dm-out");
  await itemFrom(page, "dm-list", 1, "→ 3: see you later, 3", "dm-pending");
  await eventMatching(page, /direct message to user 3 stored for 3, delivered when they come online$/);

  // On the wire: a plain SEND refused RECIPIENT_OFFLINE, then SEND with STORED|DEDUP and a
  // non-zero msg id, answered ACK with count 0.
  const plain = await frameSeen(page, (f) => f.dir === "sent" && f.opcode === SEND && f.flags === 0, "the plain SEND");
  const refused = await frameSeen(page, (f) => f.dir === "received" && f.msgId === plain.msgId, "its answer");
  if (refused.opcode !== ERROR || refused.payload.readUInt16BE(0) !== 6) {
    throw new Error(`the plain SEND was answered ${refused.opcode} (not RECIPIENT_OFFLINE)`);
  }
  const stored = await frameSeen(page, (f) => f.dir === "sent" && f.opcode === SEND && f.flags !== 0, "the stored SEND");
  if (stored.flags !== STORED_DEDUP || stored.msgId === 0n || stored.target !== 3n) {
    throw new Error(`the stored SEND: flags ${stored.flags}, msg id ${stored.msgId}, target ${stored.target}`);
  }
  const ack = await frameSeen(page, (f) => f.dir === "received" && f.msgId === stored.msgId, "its ACK");
  if (ack.opcode !== ACK || ack.payload.readUInt32BE(0) !== 0) {
    throw new Error(`the stored SEND was answered ${ack.opcode} ${ack.payload.toString("hex")}`);
  }
  await step("dm-stored");             // the native client logs in as 3 and syncs

  await page.screenshot({ path: SCREENSHOT });
  noErrors(page);
});
