// The dashboard of a durable node in headless Chromium: the nodes are listed, and a dead
// letter is replayed from the page (confirmed) and leaves the list; another is discarded.
// Usage: NODE_PATH=target/browser-test/node_modules node dead_letters.cjs URL TOKEN REPLAY_ID DISCARD_ID CHROMIUM
"use strict";
const { chromium } = require("playwright-core");

const WAIT = 30000;

async function main() {
  const [url, token, replayId, discardId, executablePath] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
    page.on("pageerror", err => console.log("page error:", err.message));
    page.on("dialog", d => { console.log("confirm:", d.message()); d.accept(); });
    await page.goto(url + "#token=" + token);
    await page.locator("#durable").waitFor({ state: "visible", timeout: WAIT });
    await page.waitForFunction(() => document.querySelectorAll("#nodes tbody tr").length > 0, null, { timeout: WAIT });
    console.log("nodes:", (await page.locator("#nodes tbody").innerText()).replace(/\s+/g, " "));
    const row = id => page.locator(`#dead tbody tr[data-id='${id}']`);
    await row(replayId).waitFor({ timeout: WAIT });
    await row(discardId).waitFor({ timeout: WAIT });
    console.log("dead letter:", (await row(replayId).innerText()).replace(/\s+/g, " "));
    await row(replayId).locator("button.replay").click();
    await page.waitForFunction(() => /"action":"replay"/.test(document.getElementById("action-result").textContent),
      null, { timeout: WAIT });
    console.log("replay:", await page.locator("#action-result").innerText());
    await row(replayId).waitFor({ state: "detached", timeout: WAIT });
    await row(discardId).locator("button.discard").click();
    await page.waitForFunction(() => /"action":"discard"/.test(document.getElementById("action-result").textContent),
      null, { timeout: WAIT });
    console.log("discard:", await page.locator("#action-result").innerText());
    await row(discardId).waitFor({ state: "detached", timeout: WAIT });
    console.log("both gone from the page");
  } finally {
    await browser.close();
  }
}

main().catch(err => { console.error(err); process.exit(1); });
