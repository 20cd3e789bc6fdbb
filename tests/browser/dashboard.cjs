// Drives the operator's dashboard in Debian's headless Chromium, as an operator would:
// without the token (nothing shown, an action refused), with a wrong one, then with the token
// from the file taskd wrote; under load the jobs/s chart rises; a task process killed with -9
// shows its restart; a failing job shows under failures with its reason, as text; growing the
// pool and looking a job up, each confirmed; then a screenshot.
// Usage: NODE_PATH=target/browser-test/node_modules node dashboard.cjs URL TOKEN SCREENSHOT.png CHROMIUM
"use strict";
const { chromium } = require("playwright-core");

const WAIT = 30000;

async function main() {
  const [url, token, screenshot, executablePath] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
    page.on("console", msg => console.log("page:", msg.text()));
    page.on("pageerror", err => console.log("page error:", err.message));
    // Every action asks first: the operator says yes.
    page.on("dialog", d => { console.log("confirm:", d.message()); d.accept(); });
    const connected = () => page.waitForFunction(() => document.getElementById("status").textContent.startsWith("connected")
      || document.getElementById("status").textContent.startsWith("dashboard"), null, { timeout: WAIT });

    // 1. No token: the page of today, and an admin action is refused.
    await page.goto(url);
    await connected();
    await page.evaluate(() => window.taskd.send({ admin: "grow" }));
    await page.waitForFunction(() => document.getElementById("action-result").textContent.includes("need the admin token"),
      null, { timeout: WAIT });
    console.log("without token: dashboard hidden:", await page.locator("#dashboard").isHidden(),
      "| action:", await page.locator("#action-result").innerText());

    // 2. A wrong token: refused, still no dashboard.
    await page.fill("#token-form input[name=token]", "not-the-token-0123456789");
    await page.click("#token-form button");
    await page.waitForFunction(() => document.getElementById("token-status").textContent.includes("refused"),
      null, { timeout: WAIT });
    console.log("wrong token: dashboard hidden:", await page.locator("#dashboard").isHidden());

    // 3. The token, given once in the address: the dashboard, the token out of the address bar.
    await page.goto(url + "#token=" + token);
    await page.reload();
    await page.locator("#dashboard").waitFor({ state: "visible", timeout: WAIT });
    await page.waitForFunction(() => document.querySelectorAll("#dash-procs tr[data-role=task]").length > 0,
      null, { timeout: WAIT });
    console.log("with token: dashboard shown, address:", page.url().includes(token) ? "has the token" : "clean",
      "| tasks:", await page.locator("#dash-procs tr[data-role=task]").count());

    // 4. Under load the jobs/s chart rises (jobs sent through the page's own WebSocket).
    const chartMax = () => page.evaluate(() => Math.max(0, ...window.taskdCharts.jobs.data[1].filter(v => v !== null)));
    const before = await chartMax();
    await page.evaluate(() => {
      for (let i = 0; i < 400; i++) window.taskd.send({ type: "email", to: `load${i}@example.com`, body: "load" });
    });
    await page.waitForFunction(() => Math.max(0, ...window.taskdCharts.jobs.data[1].filter(v => v !== null)) >= 5,
      null, { timeout: 60000 });
    console.log(`jobs chart rose: from ${before} to ${await chartMax()} jobs/s`);
    await page.waitForFunction(() => window.taskdCharts.latency.data[2].some(v => v !== null && v > 0),
      null, { timeout: WAIT });

    // 5. kill -9 of a task process: the page shows the new process of its slot.
    const row = page.locator("#dash-procs tr[data-role=task][data-slot='0']");
    const pid = Number(await row.getAttribute("data-pid"));
    const restarts = Number(await row.getAttribute("data-restarts"));
    const killedAt = Date.now();
    process.kill(pid, "SIGKILL");
    await page.waitForFunction(([pid, restarts]) => {
      const tr = document.querySelector("#dash-procs tr[data-role=task][data-slot='0']");
      return tr && Number(tr.dataset.pid) > 0 && Number(tr.dataset.pid) !== pid && Number(tr.dataset.restarts) > restarts;
    }, [pid, restarts], { timeout: WAIT });
    console.log(`restart shown after ${Date.now() - killedAt} ms: task 0 was ${pid}, now`,
      await row.getAttribute("data-pid"));

    // 6. A failing job: under failures with its reason, as text.
    await page.evaluate(() => window.taskd.send({ type: "fail", to: "nobody@example.com" }));
    const failure = page.locator("#failures tbody tr").filter({ hasText: "nobody@example.com" });
    await failure.first().waitFor({ timeout: WAIT });
    console.log("failure shown:", await failure.first().locator("td.reason").innerText(),
      "| elements in it:", await page.locator("#failures tbody img, #failures tbody b").count());

    // 7. Actions, confirmed: grow the pool; look a job up.
    await page.click("button[data-action=grow]");
    await page.waitForFunction(() => /"action":"grow"/.test(document.getElementById("action-result").textContent),
      null, { timeout: WAIT });
    console.log("grow:", (await page.locator("#action-result").innerText()).replace(/\s+/g, " "));
    await page.waitForFunction(() => document.querySelectorAll("#dash-procs tr[data-role=task]").length >= 3,
      null, { timeout: WAIT });
    await page.fill("#lookup input[name=task_id]", "1");
    await page.click("#lookup button");
    await page.waitForFunction(() => /"action":"lookup"/.test(document.getElementById("action-result").textContent),
      null, { timeout: WAIT });
    console.log("lookup:", (await page.locator("#action-result").innerText()).replace(/\s+/g, " "));

    // The screenshot: load again, so that the charts show it.
    await page.evaluate(() => {
      for (let i = 0; i < 300; i++) window.taskd.send({ type: "email", to: `shot${i}@example.com`, body: "load" });
    });
    await page.waitForFunction(() => window.taskdCharts.jobs.data[1].slice(-3).every(v => v > 0)
      && Number(document.getElementById("tile-running").textContent) > 0, null, { timeout: WAIT });
    await page.screenshot({ path: screenshot });
  } finally {
    await browser.close();
  }
}

main().catch(err => { console.error(err); process.exit(1); });
