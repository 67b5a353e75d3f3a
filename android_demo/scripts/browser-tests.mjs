// The golden-vector checks (tests/vector_checks.ts and tests/training_checks.ts, built by `node scripts/build.mjs --tests`) in
// headless Chromium: prints one JSON line per check and `N passed, N failed`; exit 1 on any failure.
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const vectorsDir = join(root, "..", "tests", "vectors");
const files = readdirSync(vectorsDir).filter((f) => f.endsWith(".json") && f !== "invalid.json").sort();
const valid = files.map((f) => JSON.parse(readFileSync(join(vectorsDir, f), "utf8")));
const invalid = JSON.parse(readFileSync(join(vectorsDir, "invalid.json"), "utf8"));
const trainingDir = join(vectorsDir, "training");
const training = readdirSync(trainingDir).filter((f) => f.endsWith(".json") && f !== "invalid.json").sort()
  .map((f) => JSON.parse(readFileSync(join(trainingDir, f), "utf8")));
const trainingInvalid = JSON.parse(readFileSync(join(trainingDir, "invalid.json"), "utf8"));

const browser = await chromium.launch({ executablePath: process.env.NMOE_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"] });
try {
  const page = await browser.newPage();
  // a secure context (http://localhost, served here, no network): WebCrypto's SHA-256 of the CHUNK checks needs one
  await page.route("http://localhost/", (route) => route.fulfill({ contentType: "text/html", body: "<!doctype html><title>checks</title>" }));
  await page.goto("http://localhost/");
  await page.addScriptTag({ content: readFileSync(join(root, "build", "browser", "checks.js"), "utf8") });
  const { results, agent } = await page.evaluate(async ([v, i, tv, ti]) => ({
    results: [...window.nmoeChecks.runVectorChecks(v, i), ...window.nmoeChecks.runFuzz(v, 5000),
      ...await window.nmoeChecks.runTrainingChecks(tv, ti), ...window.nmoeChecks.runTrainingFuzz(tv, 5000)],
    agent: navigator.userAgent,
  }), [valid, invalid, training, trainingInvalid]);
  for (const r of results) console.log(JSON.stringify(r));
  const failed = results.filter((r) => r.error !== null).length;
  console.log(`${agent}`);
  console.log(`${results.length - failed} passed, ${failed} failed`);
  process.exitCode = failed || results.length < 100 || !results.some((r) => r.name.startsWith("training")) ? 1 : 0;
} finally {
  await browser.close();
}
