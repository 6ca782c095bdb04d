// Drives aengine's chat page in headless Chromium (playwright-core, the system's chromium).
// Usage: node chat_e2e.js CHROMIUM BASE_URL API_KEY SCREENSHOT.png
// Prints one JSON line of observations for tests/test_web.py to check.
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require("playwright-core");

const [exe, base, key, shot] = process.argv.slice(2);

// Records every text the newest answer showed, with a timestamp, so the test can tell a streamed
// answer (many growing snapshots) from one that appears at once.
const watchAnswers = () => {
  window.__seen = [];
  new MutationObserver(() => {
    const a = [...document.querySelectorAll(".assistant > span:first-child")].pop();
    if (a && (window.__seen.length === 0 || window.__seen.at(-1).text !== a.textContent)) {
      window.__seen.push({ t: performance.now(), text: a.textContent });
    }
  }).observe(document.getElementById("log"), { childList: true, subtree: true, characterData: true });
};

(async () => {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "aengine-chromium-"));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: exe,
    headless: true,
    viewport: { width: 1000, height: 640 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  const out = {};
  try {
    // 1. Without the key the server refuses the connection, and the page says so.
    const bare = await ctx.newPage();
    await bare.goto(base + "/");
    await bare.waitForSelector(".error", { timeout: 30000 });
    out.refused = await bare.textContent(".error");
    // Typing the key into its field reconnects.
    await bare.fill("#key", key);
    await bare.dispatchEvent("#key", "change");
    await bare.waitForFunction(() => document.getElementById("status").textContent.includes("context"));
    out.status_after_key = await bare.textContent("#status");
    await bare.close();

    // 2. With the key in the URL: a streamed answer, then a second one stopped midway.
    const page = await ctx.newPage();
    await page.goto(base + "/?api_key=" + encodeURIComponent(key));
    await page.waitForFunction(() => document.getElementById("status").textContent.includes("context"));
    out.status = await page.textContent("#status");
    await page.evaluate(watchAnswers);
    await page.fill("#temperature", "0");
    await page.fill("#max_tokens", "48");
    await page.fill("#input", "What is the capital of France?");
    await page.press("#input", "Enter");
    await page.waitForSelector(".assistant .stats", { timeout: 120000 });
    out.first = await page.evaluate(() => ({
      seen: window.__seen, stats: document.querySelector(".assistant .stats").textContent,
      text: document.querySelector(".assistant > span").textContent,
    }));

    await page.fill("#temperature", "0.7");
    await page.fill("#max_tokens", "400");
    await page.evaluate(() => { window.__seen = []; });
    await page.fill("#input", "Write a long story about a dragon who learns to bake bread.");
    await page.click("#send");
    // Stop once some pieces have streamed in (400 tokens would take far longer).
    await page.waitForFunction(() => window.__seen.length >= 10, null, { timeout: 120000 });
    await page.click("#stop");
    await page.waitForFunction(() => document.querySelectorAll(".assistant .stats").length === 2,
                               null, { timeout: 60000 });
    out.second = await page.evaluate(() => ({
      stats: document.querySelectorAll(".assistant .stats")[1].textContent,
      text: document.querySelectorAll(".assistant > span")[1].textContent,
      stop_disabled: document.getElementById("stop").disabled,
    }));
    await page.screenshot({ path: shot });
  } finally {
    await ctx.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
