// Drives taskd's web page in Debian's headless Chromium: submit an email job in the form and
// wait until its row turns `done`; then take a screenshot.
// Usage: NODE_PATH=target/browser-test/node_modules node submit_job.cjs URL SCREENSHOT.png CHROMIUM
// (CHROMIUM: the browser's path, as found on PATH by the test and by .ci/run.)
"use strict";
const { chromium } = require("playwright-core");

async function main() {
  const [url, screenshot, executablePath] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath,
    // The machine has no network beyond loopback: keep Chromium from reaching out.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 520 } });
    page.on("console", msg => console.log("page:", msg.text()));
    await page.goto(url);
    await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("connected"));
    await page.fill("input[name=to]", "browser@example.com");
    await page.fill("input[name=text]", "hello from the browser");
    await page.click("button");
    const row = page.locator("tr.accepted, tr.done").filter({ hasText: "browser@example.com" });
    await row.first().waitFor({ timeout: 20000 });
    console.log("accepted:", (await row.first().innerText()).replace(/\s+/g, " "));
    const done = page.locator("tr.done").filter({ hasText: "browser@example.com" });
    await done.waitFor({ timeout: 30000 });
    console.log("done:", await done.locator("td").nth(4).innerText());
    await page.waitForFunction(() => document.querySelectorAll("#proclist tr").length > 0);
    await page.screenshot({ path: screenshot });
  } finally {
    await browser.close();
  }
}

main().catch(err => { console.error(err); process.exit(1); });
