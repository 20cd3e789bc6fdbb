// A web page as an attacker: from the page at PAGE_URL (in Debian's headless Chromium), open a
// WebSocket to WS_URL and send `stats`, then POST job lines to LINE_URL with fetch's no-cors
// mode, which any page may do. Prints what each attempt got.
// Usage: NODE_PATH=target/browser-test/node_modules node cross_origin.cjs PAGE_URL WS_URL LINE_URL
"use strict";
const { chromium } = require("playwright-core");

async function main() {
  const [pageUrl, wsUrl, lineUrl, executablePath] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath,
    // The machine has no network beyond loopback: keep Chromium from reaching out.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    // The attacker's page is served by another taskd, whose Content-Security-Policy would stop
    // the attack in the page itself: an attacker's own page has no such policy.
    const page = await browser.newPage({ bypassCSP: true });
    await page.goto(pageUrl);
    const ws = await page.evaluate(url => new Promise(resolve => {
      const socket = new WebSocket(url);
      socket.onopen = () => {
        socket.onmessage = m => resolve("open, got " + String(m.data).slice(0, 20));
        socket.send("stats");
      };
      socket.onerror = () => resolve("refused");
      setTimeout(() => resolve("no answer"), 15000);
    }), wsUrl);
    console.log("websocket:", ws);
    const post = await page.evaluate(url => fetch(url, {
      method: "POST",
      mode: "no-cors",
      body: "mallory@example.com\n{\"type\":\"email\",\"to\":\"eve@example.com\"}\n",
    }).then(() => "sent", e => "failed (" + e + ")"), lineUrl);
    console.log("fetch:", post);
  } finally {
    await browser.close();
  }
}

main().catch(err => { console.error(err); process.exit(1); });
