// The browser half of tests/browser.rs's phone test: the H5 demo (user 1, room 7) at
// 390x844 (an iPhone 13: touch, mobile viewport, 3x pixels), used with taps while the
// native client (user 3) talks in the room. The script measures the layout and hands it to
// the Rust test, which judges it; then it saves a screenshot (SCREENSHOT).
// Helpers and the line protocol: common.mjs.
//
// Steps: `page-live` (the native client joins room 7 and sends a message), `layout <boxes>`
// (see below), `phone-sent` (the page liked and sent a message: the native client checks),
// `done`. <boxes> is space-separated `key=value`: `viewport=WxH`, `scroll=W,H` (the
// document's scrollWidth and window.scrollX), and for each element checked
// `<name>=left,top,width,height` in CSS pixels of the viewport.

import {
  SAFETY_MS, SCREENSHOT, itemFrom, noErrors, openPage, run, stateIs, step, textIs,
} from "./common.mjs";

const PHONE = {
  viewport: { width: 390, height: 844 },
  deviceScaleFactor: 3,
  isMobile: true,
  hasTouch: true,
};

/** What must be on screen, by the name the Rust test knows it by. */
const CHECKED = {
  header: "header",
  title: "header h1",
  status: "#status",
  room: "#room-label",
  user: "#user-label",
  online: "#online-pill",
  likes: "#likes-pill",
  stage: "#stage",
  "live-badge": "#stage .live",
  "msg-input": "#msg-input",
  send: "#msg-send",
  like: "#like-btn",
};

async function layout(page) {
  const parts = [];
  const viewport = page.viewportSize();
  parts.push(`viewport=${viewport.width}x${viewport.height}`);
  const [scrollWidth, scrollX] = await page.evaluate(
    () => [document.documentElement.scrollWidth, window.scrollX],
  );
  parts.push(`scroll=${scrollWidth},${scrollX}`);
  for (const [name, selector] of Object.entries(CHECKED)) {
    const box = await page.locator(selector).boundingBox();
    if (!box) throw new Error(`${selector} is not rendered`);
    parts.push(`${name}=${[box.x, box.y, box.width, box.height].map((v) => v.toFixed(1)).join(",")}`);
  }
  return parts.join(" ");
}

await run("browser mobile", async (browser) => {
  const page = await openPage(browser, 1, PHONE);
  await stateIs(page, "live");
  await step("page-live");                 // the native client joins room 7 and talks
  await itemFrom(page, "chat-log", 3, "hello phone");
  await textIs(page, "#online", "2");
  await step("layout", await layout(page));

  // Usable by thumb: a tap likes, a tap sends, and neither scrolls the page.
  await page.tap("#like-btn");
  await textIs(page, "#likes", "1");
  await page.tap("#msg-input");
  await page.fill("#msg-input", "hi from my phone");
  await page.tap("#msg-send");
  await itemFrom(page, "chat-log", 1, "hi from my phone", "mine");
  await step("phone-sent");

  // Still fits, with the chat filled and danmaku in flight.
  await step("layout", await layout(page));
  await page.waitForFunction(() => {
    const stage = document.querySelector("#stage").getBoundingClientRect();
    return [...document.querySelectorAll("#stage .danmaku")].some(
      (d) => d.getBoundingClientRect().left < stage.left + stage.width * 0.6,
    );
  }, null, { timeout: SAFETY_MS });
  await page.screenshot({ path: SCREENSHOT });
  noErrors(page);
});
