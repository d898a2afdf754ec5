// What the browser scripts of tests/browser.rs share: the line protocol with the Rust test,
// Chromium, opening a page of the H5 demo, and waits on the DOM.
//
// The two processes take turns over a line protocol: a script prints `STEP <name> [data]`
// on stdout when the native client (or the relay) has something to check or do, and waits
// for the Rust test to answer one line on stdin (`ok`, or `fail <why>`). Waits on the
// pages are conditions on the DOM; their timeouts are only safety nets. Any failure exits
// non-zero with the reason.
//
// Environment: RELAY_URL (http://127.0.0.1:PORT, or https://localhost:PORT with SPKI, the
// base64 SHA-256 of the relay certificate's public key, which Chromium is told to trust,
// and nothing else), TOKENS ({"1":"<jwt>",…}, the pages' login tokens), SCREENSHOT (where
// to save a PNG).

import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

export const RELAY_URL = process.env.RELAY_URL;
export const SCREENSHOT = process.env.SCREENSHOT;
export const SAFETY_MS = 15_000;
const SPKI = process.env.SPKI;
const TOKENS = JSON.parse(process.env.TOKENS ?? "{}");

const answers = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** Hands a step (and optional data, one line) to the Rust test and waits for its answer. */
export async function step(name, data = "") {
  console.log(data ? `STEP ${name} ${data}` : `STEP ${name}`);
  const { value, done } = await answers.next();
  if (done) throw new Error(`the Rust test went away during ${name}`);
  if (value.trim() !== "ok") throw new Error(`native client, ${name}: ${value}`);
}

/** Waits until `selector`'s text is exactly `expected`. */
export async function textIs(page, selector, expected, timeout = SAFETY_MS) {
  await page.waitForFunction(
    ([sel, want]) => document.querySelector(sel)?.textContent === want,
    [selector, expected],
    { timeout },
  ).catch(async () => {
    const got = await page.locator(selector).textContent().catch(() => "(missing)");
    throw new Error(`${page.label}: ${selector} shows ${JSON.stringify(got)}, not ${JSON.stringify(expected)}`);
  });
}

/** Waits for a list item in `list` from user `from` whose text contains `text`. */
export async function itemFrom(page, list, from, text, cls = "") {
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

/** The lines of the page's Events panel, newest first (without their time stamps). */
export async function events(page) {
  const lines = await page.locator("#events li").allTextContents();
  return lines.map((l) => l.replace(/^\S+( [AP]M)? /, ""));
}

/** Waits for an Events line matching `pattern` (a RegExp); returns it. */
export async function eventMatching(page, pattern, timeout = SAFETY_MS) {
  const handle = await page.waitForFunction(
    ([source, flags]) => {
      const re = new RegExp(source, flags);
      return [...document.querySelectorAll("#events li")].map((li) => li.textContent)
        .find((t) => re.test(t));
    },
    [pattern.source, pattern.flags],
    { timeout },
  ).catch(async () => {
    throw new Error(`${page.label}: no event matching ${pattern}; has ${JSON.stringify(await events(page))}`);
  });
  return handle.jsonValue();
}

/** Waits until `body[data-state]` is `state`. */
export async function stateIs(page, state, timeout = SAFETY_MS) {
  await page.waitForSelector(`body[data-state="${state}"]`, { timeout }).catch(async () => {
    const got = await page.evaluate(() => [document.body.dataset.state, document.querySelector("#status")?.textContent]);
    throw new Error(`${page.label}: state ${JSON.stringify(got)}, not ${state}; events ${JSON.stringify(await events(page))}`);
  });
}

/** Debian's Chromium, headless; trusting the relay's certificate when SPKI is set. */
export function launch() {
  return chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", ...(SPKI ? [`--ignore-certificate-errors-spki-list=${SPKI}`] : [])],
  });
}

export const DESKTOP = { viewport: { width: 1200, height: 760 } };

/** The demo page as `user` in room 7; `context` options (viewport, …) for its browser context. */
export async function openPage(browser, user, context = DESKTOP) {
  return openIn(await browser.newPage(context), user);
}

/** The demo page as `user` in room 7, in `context` (a BrowserContext: its storage is shared). */
export async function openPageIn(context, user) {
  return openIn(await context.newPage(), user);
}

async function openIn(page, user) {
  page.label = `page of user ${user}`;
  recordFrames(page);
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") page.errors.push(m.text()); });
  const token = TOKENS[user] ? `&token=${encodeURIComponent(TOKENS[user])}` : "";
  await page.goto(`${RELAY_URL}/?user=${user}&room=7${token}`, { timeout: SAFETY_MS });
  return page;
}

/**
 * Records the protocol frames of the page's WebSockets in `page.wsFrames`, in order:
 * { dir: "sent" | "received", opcode, flags, msgId, target, source, payload (Buffer) }.
 */
function recordFrames(page) {
  page.wsFrames = [];
  page.frameWaiters = new Set();
  page.on("websocket", (ws) => {
    const add = (dir) => ({ payload }) => {
      if (typeof payload === "string") return;
      for (let at = 0; at + 32 <= payload.length;) {
        const length = payload.readUInt32BE(at);
        if (length < 32 || at + length > payload.length) break;
        const f = {
          dir, index: page.wsFrames.length, opcode: payload[at + 5],
          flags: payload.readUInt16BE(at + 6), msgId: payload.readBigUInt64BE(at + 8),
          target: payload.readBigUInt64BE(at + 16), source: payload.readBigUInt64BE(at + 24),
          payload: payload.subarray(at + 32, at + length),
        };
        page.wsFrames.push(f);
        for (const w of page.frameWaiters) w(f);
        at += length;
      }
    };
    ws.on("framesent", add("sent"));
    ws.on("framereceived", add("received"));
  });
}

/** Resolves with the first frame the page sent or received (recorded already or still to come) that passes `test`. */
export function frameSeen(page, test, what, timeout = SAFETY_MS) {
  const had = page.wsFrames.find(test);
  if (had) return Promise.resolve(had);
  return new Promise((resolve, reject) => {
    const waiter = (f) => {
      if (!test(f)) return;
      page.frameWaiters.delete(waiter);
      clearTimeout(timer);
      resolve(f);
    };
    const timer = setTimeout(() => {
      page.frameWaiters.delete(waiter);
      reject(new Error(`${page.label}: no ${what} on its WebSocket`));
    }, timeout);
    page.frameWaiters.add(waiter);
  });
}

/** Fails if a page logged errors (script exceptions, console.error). */
export function noErrors(...pages) {
  for (const page of pages) {
    if (page.errors.length) throw new Error(`${page.label} logged errors: ${page.errors.join("; ")}`);
  }
}

/**
 * Runs `scenario(browser)` in a fresh Chromium, then prints `STEP done` and exits 0; on a
 * failure, prints it and exits 1. `limitMs` is a safety net for a hung browser.
 */
export async function run(name, scenario, limitMs = 120_000) {
  if (!RELAY_URL || !SCREENSHOT) {
    console.error("RELAY_URL and SCREENSHOT must be set");
    process.exit(2);
  }
  setTimeout(() => {
    console.error(`${name}: gave up after ${limitMs / 1000} s`);
    process.exit(1);
  }, limitMs).unref();
  const browser = await launch();
  let failed = null;
  try {
    await scenario(browser);
    console.log("STEP done");
  } catch (e) {
    failed = e;
  } finally {
    await browser.close();
  }
  if (failed) {
    console.error(`${name} failed: ${failed.stack ?? failed}`);
    process.exit(1);
  }
  process.exit(0); // stdin is still open: do not wait for it
}
