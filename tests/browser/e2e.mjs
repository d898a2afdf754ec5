// The browser half of tests/browser.rs: two pages of the H5 demo in Debian's headless
// Chromium share a live room with a native binary-TCP client that the Rust test drives.
//
// Usage (the Rust test does this): RELAY_URL=http://127.0.0.1:PORT SCREENSHOT=out.png \
//   node tests/browser/e2e.mjs
// Over TLS: RELAY_URL=https://localhost:PORT, SPKI=<base64 SHA-256 of the relay
// certificate's public key>, which Chromium is told to trust (and nothing else), and
// TOKENS={"1":"<jwt>","2":"<jwt>"}, the pages' login tokens.
// The line protocol with the Rust test, and the helpers: common.mjs.

import { SAFETY_MS, SCREENSHOT, itemFrom, noErrors, openPage, run, step, textIs } from "./common.mjs";

await run("browser e2e", async (browser) => {
  const a = await openPage(browser, 1);
  const b = await openPage(browser, 2);
  for (const page of [a, b]) {
    await page.waitForSelector('body[data-state="live"]', { timeout: SAFETY_MS });
  }
  await textIs(a, "#user-label", "user 1");
  await step("pages-live");                 // the native client (user 3) joins room 7

  await textIs(a, "#online", "3");
  await textIs(b, "#online", "3");

  // A room message typed on page A flies on page B (and is checked by the native client).
  await a.fill("#msg-input", "hello from A");
  await a.click("#msg-send");
  await itemFrom(a, "chat-log", 1, "hello from A", "mine");
  await itemFrom(b, "chat-log", 1, "hello from A");
  await b.waitForSelector('#stage .danmaku[data-from="1"]', { timeout: SAFETY_MS });
  await step("room-sent");

  // A like on page B counts on both pages (and reaches the native client).
  await b.click("#like-btn");
  await textIs(b, "#likes", "1");
  await textIs(a, "#likes", "1");
  await step("liked");                       // native sends a room message and a DM to user 1

  await itemFrom(a, "chat-log", 3, "hi from native");
  await itemFrom(b, "chat-log", 3, "hi from native");
  await itemFrom(a, "dm-list", 3, "private hello from native", "dm-in");
  if ((await b.locator("#dm-list li").count()) !== 0) {
    throw new Error("page B shows a direct message meant for user 1");
  }

  // A direct message from page A to the native client.
  await a.fill("#dm-to", "3");
  await a.fill("#dm-input", "hello native");
  await a.click("#dm-send");
  await itemFrom(a, "dm-list", 1, "hello native", "dm-out");
  await step("dm-sent");

  // A little more traffic so the screenshot shows danmaku in flight.
  for (const text of ["666", "this relay is fast", "hello everyone"]) {
    await b.fill("#msg-input", text);
    await b.click("#msg-send");
    await itemFrom(a, "chat-log", 2, text);
  }
  await a.click("#like-btn");
  await textIs(a, "#likes", "2");
  // Shoot once the first danmaku has flown to the middle of the stage.
  await a.waitForFunction(() => {
    const stage = document.querySelector("#stage").getBoundingClientRect();
    return [...document.querySelectorAll("#stage .danmaku")].some(
      (d) => d.getBoundingClientRect().left < stage.left + stage.width * 0.6,
    );
  }, null, { timeout: SAFETY_MS });
  await a.screenshot({ path: SCREENSHOT });

  noErrors(a, b);
});
