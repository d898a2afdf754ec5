// The browser half of tests/browser.rs's relay-restart test: a page of the H5 demo (user 1,
// room 7) loses its relay, says it is reconnecting, comes back by itself to the new relay
// on the same port, rejoins room 7 and shows a room message the native client (user 3)
// sends after the restart. Helpers and the line protocol: common.mjs.
//
// Steps: `page-live` (the page is in room 7), `relay-down` (the Rust test has stopped the
// relay, the page says it is reconnecting and one attempt has failed already; the Rust
// test starts the new relay),
// `rejoined <reconnects>` (the page is back in room 7; the native client joins and sends),
// `done`.

import {
  SCREENSHOT, eventMatching, events, itemFrom, noErrors, openPage, run, stateIs, step, textIs,
} from "./common.mjs";

// Safety net for the way back: the page's waits grow 0.5, 1, 2, 4 s (at most, jittered).
const BACK_MS = 45_000;

await run("browser reconnect", async (browser) => {
  const page = await openPage(browser, 1);
  await stateIs(page, "live");
  await textIs(page, "#reconnects", "0");
  await step("page-live");               // the Rust test stops the relay

  // The relay said SHUTTING_DOWN and closed (1001): the page says it is reconnecting.
  await stateIs(page, "reconnecting");
  await eventMatching(page, /connection lost \(1001 SHUTTING_DOWN/);
  await eventMatching(page, /reconnecting in \d+\.\d s \(attempt 1\)$/);
  // Attempt 1 met a closed port: the page backs off and tries again.
  await eventMatching(page, /reconnecting in \d+\.\d s \(attempt 2\)$/);
  await step("relay-down");              // the Rust test starts a relay on the same port

  await stateIs(page, "live", BACK_MS);
  await eventMatching(page, /reconnected, rejoined room 7$/);
  const reconnects = await page.evaluate(() => document.body.dataset.reconnects);
  if (!(Number(reconnects) >= 1)) throw new Error(`the page counts ${reconnects} reconnects`);
  if (!(await page.locator("#reconnects").isVisible())) {
    throw new Error("the reconnect count is not shown");
  }
  await textIs(page, "#reconnects", reconnects);
  await step("rejoined", reconnects);    // the native client joins room 7 and talks

  await itemFrom(page, "chat-log", 3, "hello after the restart");
  await page.waitForSelector('#stage .danmaku[data-from="3"]');
  await textIs(page, "#online", "2");

  // While it was down, the page said what it was doing, not the same error every second.
  const lines = await events(page);
  const spam = lines.filter((l) => /ROOM_INFO failed|not connected/.test(l));
  if (spam.length) throw new Error(`error lines while reconnecting: ${JSON.stringify(spam)}`);
  await page.screenshot({ path: SCREENSHOT });
  // Chromium logs each failed attempt (refused, or refused by the stopping relay): expected.
  page.errors = page.errors.filter((e) => !/^WebSocket connection to '[^']*' failed/.test(e));
  noErrors(page);
});
