// Web devices in headless Chromium, driven over stdin/stdout by toolkit/fleet/web_devices.py.
//
//   node scripts/web-devices.mjs PROFILE_DIR
//
// One Chromium (Debian's /usr/bin/chromium, or $NMOE_CHROMIUM) with one page per device. Commands
// are JSON lines on stdin, answers JSON lines on stdout:
//   {"cmd":"open","device":D,"url":PAGE,"config":{...},"events":FILE,"log":FILE[,"dataFile":NPZ]}
//        (dataFile: the page fetches its training data from config.data, answered here from that file)
//        -> {"event":"online","device":D} once its broker connection is up,
//           {"event":"failed","device":D,"error":...} when the page refuses to start (e.g. a tampered bundle)
//   {"cmd":"kill","device":D}   close the page abruptly (no DISCONNECT: the broker publishes its will) -> {"event":"killed"}
//   {"cmd":"eval","id":N,"device":D,"script":JS}  run an async function body in the page -> {"event":"result","id":N,...}
//   {"cmd":"stop"}              every page leaves cleanly (offline presence, counters event), Chromium exits
// A page that crashes or closes by itself -> {"event":"closed","device":D}. stdin closing means stop.
import { appendFileSync, mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-background-timer-throttling", "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows"];
const STOP_TIMEOUT_MS = 5000;

const say = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const pages = new Map(); // device -> {page, log, killed}
let stopping = null;

const context = await chromium.launchPersistentContext(process.argv[2], {
  executablePath: process.env.NMOE_CHROMIUM || "/usr/bin/chromium", headless: true, args: FLAGS,
  ignoreHTTPSErrors: true, viewport: { width: 412, height: 900 },
});

function append(file, line) {
  mkdirSync(dirname(file), { recursive: true });
  appendFileSync(file, `${line}\n`);
}

async function open({ device, url, config, events, log, dataFile }) {
  const page = await context.newPage();
  const entry = { page, log, killed: false, online: false };
  pages.set(device, entry);
  const note = (text) => append(log, `${new Date().toISOString()} ${text}`);
  page.on("console", (m) => note(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => note(`page error: ${e.message}`));
  page.on("crash", () => note("page crashed"));
  page.on("close", () => {
    if (!entry.killed && !stopping) say({ event: "closed", device });
  });
  await page.exposeFunction("nmoeEvent", (line) => {
    append(events, line);
    const e = JSON.parse(line);
    if (e.event === "fatal") {
      note(`nmoe: error: ${e.error}`);
      say({ event: "failed", device, error: e.error });
    } else if ((e.event === "connect" || e.event === "reconnect") && !entry.online) {
      entry.online = true;
      say({ event: "online", device });
    } else if (e.event === "connect" || e.event === "reconnect" || e.event.startsWith("connect_") || e.event === "disconnect") {
      note(`${e.event}: ${e.detail}`);
    }
  });
  if (dataFile) await page.route(config.data, (route) => route.fulfill({ path: dataFile, contentType: "application/octet-stream" }));
  await page.addInitScript((c) => { window.NMOE_CONFIG = c; }, config);
  note(`opening ${url} as ${device}`);
  await page.goto(url);
}

async function stop() {
  stopping ??= (async () => {
    await Promise.all([...pages.values()].filter((p) => !p.killed && !p.page.isClosed()).map((p) =>
      Promise.race([p.page.evaluate(() => window.nmoe?.stop()), new Promise((r) => setTimeout(r, STOP_TIMEOUT_MS))])
        .catch(() => undefined)));
    await context.close();
    say({ event: "stopped" });
    process.exit(0);
  })();
  return stopping;
}

async function handle(msg) {
  const entry = pages.get(msg.device);
  if (msg.cmd === "open") return open(msg);
  if (msg.cmd === "stop") return stop();
  if (entry === undefined) return say({ event: "result", id: msg.id, error: `no page for ${msg.device}` });
  if (msg.cmd === "kill") {
    entry.killed = true;
    await entry.page.close({ runBeforeUnload: false });
    return say({ event: "killed", device: msg.device });
  }
  if (msg.cmd === "eval") {
    try {
      const value = await entry.page.evaluate(`(async () => { ${msg.script} })()`);
      say({ event: "result", id: msg.id, value: value ?? null });
    } catch (e) {
      say({ event: "result", id: msg.id, error: String(e.message ?? e) });
    }
  }
}

for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"]) process.on(sig, () => void stop());
say({ event: "ready", browser: context.browser()?.version() ?? "chromium" });
const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (!line.trim()) return;
  handle(JSON.parse(line)).catch((e) => say({ event: "error", error: String(e?.message ?? e), cmd: line.slice(0, 200) }));
});
lines.on("close", () => void stop());
