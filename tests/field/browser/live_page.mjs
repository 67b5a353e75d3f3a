// Open the live fleet page in headless Chromium, wait until it shows `want` inference requests served in
// total (or the timeout), save a screenshot, and print what the page shows as JSON:
//   node live_page.mjs URL SCREENSHOT.png WANT_SERVED TIMEOUT_MS
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, screenshot, want, timeoutMs] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), "nmoe-live-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1400, height: 900 },
});
try {
  const page = context.pages()[0] || await context.newPage();
  await page.goto(url);
  await page.waitForFunction(
    (n) => { const c = document.querySelector("[data-total=served_infer]"); return c && Number(c.textContent) >= n; },
    Number(want), { timeout: Number(timeoutMs), polling: 200 });
  await page.waitForTimeout(1200);  // two more polls: the final numbers, not a half-updated table
  await page.screenshot({ path: screenshot, fullPage: true });
  const shown = await page.evaluate(() => {
    const devices = {};
    for (const c of document.querySelectorAll("#devices td[data-field]")) {
      (devices[c.dataset.device] ||= {})[c.dataset.field] = c.textContent;
    }
    const routing = {};
    for (const c of document.querySelectorAll("#routing td[data-expert]")) {
      (routing[c.dataset.device] ||= {})[c.dataset.expert] = c.textContent;
    }
    const totals = {};
    for (const c of document.querySelectorAll("[data-total]")) totals[c.dataset.total] = c.textContent;
    return { devices, routing, totals, online: document.getElementById("online").textContent,
             models: document.getElementById("models").textContent,
             polls: document.getElementById("updated").textContent };
  });
  console.log(JSON.stringify(shown));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
