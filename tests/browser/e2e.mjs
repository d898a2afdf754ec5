// The browser half of tests/browser.rs: two pages of the H5 demo in Debian's headless
// Chromium share a live room with a native binary-TCP client that the Rust test drives.
//
// Usage (the Rust test does this): RELAY_URL=http://127.0.0.1:PORT SCREENSHOT=out.png \
//   node tests/browser/e2e.mjs
// Over TLS: RELAY_URL=https://localhost:PORT, SPKI=<base64 SHA-256 of the relay
// certificate's public key>, which Chromium is told to trust (and nothing else), and
// TOKENS={"1":"<jwt>","2":"<jwt>"}, the pages' login tokens.
// The two processes take turns over a line protocol: this script prints `STEP <name>` on
// stdout when the native client has something to check or do, and waits for the Rust test
// to answer one line on stdin (`ok`, or `fail <why>`). Waits on the pages are conditions on
// the DOM; their timeouts are only safety nets. Any failure exits non-zero with the reason.

import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const RELAY_URL = process.env.RELAY_URL;
const SCREENSHOT = process.env.SCREENSHOT;
const SAFETY_MS = 15_000;
const SPKI = process.env.SPKI;
const TOKENS = JSON.parse(process.env.TOKENS ?? "{}");
if (!RELAY_URL || !SCREENSHOT) {
  console.error("RELAY_URL and SCREENSHOT must be set");
  process.exit(2);
}

// A safety net for a hung browser, not a synchronisation: every wait above has its own.
setTimeout(() => {
  console.error("browser e2e: gave up after 120 s");
  process.exit(1);
}, 120_000).unref();

const answers = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** Hands a step to the Rust test and waits for its answer. */
async function step(name) {
  console.log(`STEP ${name}`);
  const { value, done } = await answers.next();
  if (done) throw new Error(`the Rust test went away during ${name}`);
  if (value.trim() !== "ok") throw new Error(`native client, ${name}: ${value}`);
}

/** Waits until `selector`'s text is exactly `expected`. */
async function textIs(page, selector, expected) {
  await page.waitForFunction(
    ([sel, want]) => document.querySelector(sel)?.textContent === want,
    [selector, expected],
    { timeout: SAFETY_MS },
  ).catch(async () => {
    const got = await page.locator(selector).textContent().catch(() => "(missing)");
    throw new Error(`${page.label}: ${selector} shows ${JSON.stringify(got)}, not ${JSON.stringify(expected)}`);
  });
}

/** Waits for a list item in `list` from user `from` whose text contains `text`. */
async function itemFrom(page, list, from, text, cls = "") {
  await page.waitForFunction(
    ([l, f, t, c]) => [...document.querySelectorAll(`#${l} li`)].some(
      (li) => li.dataset.from === f && li.textContent.includes(t) && (!c || li.classList.contains(c)),
    ),
    [list, String(from), text, cls],
    { timeout: SAFETY_MS },
  ).catch(async () => {
    const items = await page.locator(`#${list} li`).allTextContents();
    throw new Error(`${page.label}: no #${list} item from ${from} with ${JSON.stringify(text)}; has ${JSON.stringify(items)}`);
  });
}

async function openPage(browser, user) {
  const page = await browser.newPage({ viewport: { width: 1200, height: 760 } });
  page.label = `page of user ${user}`;
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") page.errors.push(m.text()); });
  const token = TOKENS[user] ? `&token=${encodeURIComponent(TOKENS[user])}` : "";
  await page.goto(`${RELAY_URL}/?user=${user}&room=7${token}`, { timeout: SAFETY_MS });
  return page;
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", ...(SPKI ? [`--ignore-certificate-errors-spki-list=${SPKI}`] : [])],
});
let failed = null;
try {
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

  for (const page of [a, b]) {
    if (page.errors.length) throw new Error(`${page.label} logged errors: ${page.errors.join("; ")}`);
  }
  console.log("STEP done");
} catch (e) {
  failed = e;
} finally {
  await browser.close();
}
if (failed) {
  console.error(`browser e2e failed: ${failed.stack ?? failed}`);
  process.exit(1);
}
process.exit(0); // stdin is still open: do not wait for it
