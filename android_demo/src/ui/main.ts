/**
 * The page: join a fleet (broker + bundle), draw or pick an input, classify it with the fleet, and
 * see which experts answered, with their weights and round trips, and which devices are live.
 *
 * Headless use (`nmoe trial --web-devices`, tests): a launcher sets `window.NMOE_CONFIG` before the
 * page loads (the device starts by itself) and may expose `window.nmoeEvent` to receive every event
 * as a JSON line; `window.nmoe` gives scripts the running device.
 */
import { type BundleSource, mapSource, type Precision, urlSource } from "../device/bundle.js";
import type { InferenceResult, WebDevice } from "../device/device.js";
import { readNpy, readZip } from "../device/archive.js";
import { launch } from "../device/launch.js";
import { DEFAULT_LIMITS } from "../device/server.js";
import type { Encoding } from "../wire/tensor.js";
import { DrawPad } from "./canvas.js";

/** What a launcher may set before the page loads. */
interface HeadlessConfig {
  broker: string;
  bundle: string; // URL of the bundle folder
  username?: string;
  password?: string;
  precision?: Precision;
  latentEncoding?: Encoding;
  deadlineMs?: number;
  fleet?: string;
  prefix?: string;
  maxBatch?: number;
  queueSize?: number;
  microbatch?: boolean;
  data?: string; // URL of the device's training data (.npz): it takes part in federated training
  maxMessage?: number;
}

interface NmoeApi {
  device: WebDevice | null;
  error: string | null;
  /** Classify `n` uint8 images given as numbers; a plain-JSON summary of the result. */
  infer(pixels: number[], n: number): Promise<Record<string, unknown>>;
  /** Milliseconds of `calls` local passes (extractor, gate, own expert) on one image. */
  timeModels(pixels: number[], calls: number): Promise<number[]>;
  stop(): Promise<void>;
}

declare global {
  interface Window {
    NMOE_CONFIG?: HeadlessConfig;
    nmoeEvent?: (line: string) => void;
    nmoe: NmoeApi;
  }
}

const $ = <T extends HTMLElement>(id: string): T => document.getElementById(id) as T;
const WASM_BASE = new URL("ort/", document.baseURI).href;
let device: WebDevice | null = null;
let pad: DrawPad | null = null;
let picked: BundleSource | null = null;

window.nmoe = {
  device: null,
  error: null,
  async infer(pixels, n) {
    if (device === null) throw new Error("no device running");
    return summary(await device.infer(Uint8Array.from(pixels), n));
  },
  async timeModels(pixels, calls) {
    if (device === null) throw new Error("no device running");
    return device.timeModels(Uint8Array.from(pixels), calls);
  },
  async stop() {
    await device?.stop();
  },
};

function summary(r: InferenceResult): Record<string, unknown> {
  return { labels: r.labels, probs: [...r.probs], experts: [...r.route.experts], weights: [...r.route.weights], k: r.route.k,
    answered: r.answered, missing: Object.fromEntries(r.missing), fallbackRows: r.fallbackRows, latencyMs: r.latencyMs };
}

function setStatus(text: string, kind: "" | "online" | "offline" = ""): void {
  const el = $("status");
  el.textContent = text;
  el.className = `pill ${kind}`;
}

function showError(message: string): void {
  window.nmoe.error = message;
  const el = $("error");
  el.textContent = message;
  el.hidden = false;
  setStatus("error", "offline");
}

async function start(source: BundleSource, broker: string, options: Omit<HeadlessConfig, "broker" | "bundle">): Promise<void> {
  $("error").hidden = true;
  setStatus("verifying bundle…");
  try {
    device = await launch(source, {
      broker,
      ...(options.username ? { username: options.username } : {}),
      ...(options.password ? { password: options.password } : {}),
      ...(options.precision ? { precision: options.precision } : {}),
      ...(options.data ? { data: options.data } : {}),
      ...(options.maxMessage ? { maxMessage: options.maxMessage } : {}),
      device: {
        ...(options.latentEncoding ? { latentEncoding: options.latentEncoding } : {}),
        ...(options.deadlineMs ? { deadlineMs: options.deadlineMs } : {}),
        ...(options.fleet ? { fleet: options.fleet } : {}),
        ...(options.prefix ? { prefix: options.prefix } : {}),
        limits: { maxBatch: options.maxBatch ?? DEFAULT_LIMITS.maxBatch, queueSize: options.queueSize ?? DEFAULT_LIMITS.queueSize,
          microbatch: options.microbatch ?? DEFAULT_LIMITS.microbatch },
      },
    }, WASM_BASE);
  } catch (e) {
    showError(e instanceof Error ? e.message : String(e));
    window.nmoeEvent?.(JSON.stringify({ ts: Date.now() / 1000, event: "fatal", error: window.nmoe.error }));
    return;
  }
  window.nmoe.device = device;
  wire(device);
}

/** Connect a running device to the page: events out, status, fleet list, input pad, samples. */
function wire(d: WebDevice): void {
  const m = d.bundle.manifest;
  d.events.subscribe((e) => window.nmoeEvent?.(JSON.stringify(e)));
  d.events.subscribe((e) => {
    if (e.event === "connect" || e.event === "reconnect") setStatus(`online as ${d.me}`, "online");
    else if (e.event === "disconnect" || e.event === "connect_failed" || e.event === "connect_refused") {
      setStatus(`${e.event.replace("_", " ")}`, "offline");
    }
    if (e.event === "stop") setStatus("left the fleet", "offline");
    renderCounters(d);
  });
  d.fleet.onChange(() => renderFleet(d));
  $("setup").hidden = true;
  $("device").hidden = false;
  $("fleet-card").hidden = false;
  $("device-title").textContent = `${m.deviceId} · expert ${m.expertId}`;
  $("device-info").textContent = `${m.numExperts} experts, top-${m.topK}, ${m.routing} routing, `
    + `${d.models.precision} models in onnxruntime-web, model ${d.modelVersion.slice(0, 12)}`;
  const [channels, h, w] = m.input.shape;
  pad = new DrawPad($("canvas"), h, w);
  $("classify").onclick = () => void classify(d, pad!.pixels(channels));
  $("clear").onclick = () => pad!.clear();
  $("stop").onclick = () => void d.stop();
  renderSamples(d);
  renderFleet(d);
}

async function classify(d: WebDevice, pixels: Uint8Array): Promise<void> {
  const r = await d.infer(pixels, 1);
  const m = d.bundle.manifest;
  $("result").hidden = false;
  $("prediction").textContent = m.classNames[r.labels[0]!] ?? String(r.labels[0]);
  const ranked = [...r.probs].map((p, c) => [p, c] as const).sort((a, b) => b[0] - a[0]).slice(0, 3);
  $("top").replaceChildren(...ranked.map(([p, c]) => {
    const li = document.createElement("li");
    li.innerHTML = `<span></span><span class="bar" style="width:${(100 * p).toFixed(1)}%"></span><span>${(100 * p).toFixed(1)}%</span>`;
    li.firstElementChild!.textContent = m.classNames[c] ?? String(c);
    return li;
  }));
  const rows = [];
  for (let s = 0; s < r.route.k; s++) {
    const e = r.route.experts[s]!;
    const own = e === d.expertId;
    const tr = document.createElement("tr");
    const cells = [String(e), own ? `${d.me} (this)` : r.peers.get(e) ?? "—", r.route.weights[s]!.toFixed(3),
      own ? r.latencyMs.own_expert.toFixed(1) : r.remoteMs.has(e) ? r.remoteMs.get(e)!.toFixed(1) : "—",
      r.missing.get(e) ?? (r.answered.includes(e) ? "answered" : "")];
    for (const c of cells) tr.insertCell().textContent = c;
    rows.push(tr);
  }
  $("experts").querySelector("tbody")!.replaceChildren(...rows);
  $("timing").textContent = `total ${r.latencyMs.total.toFixed(1)} ms (extract ${r.latencyMs.extract.toFixed(1)}, `
    + `peers ${r.latencyMs.peers.toFixed(1)}); ${r.bytesSent + r.bytesReceived} B on the wire`
    + (r.fallbackRows ? "; no chosen expert answered: own expert alone" : "");
}

function renderFleet(d: WebDevice): void {
  const items = [{ device: d.me, expert: d.expertId, model: d.modelVersion, self: true },
    ...d.fleet.all().map((p) => ({ ...p, self: false }))];
  $("fleet").replaceChildren(...items.map((p) => {
    const li = document.createElement("li");
    li.innerHTML = `<span class="dot${p.model === d.modelVersion ? "" : " other"}"></span>`;
    li.append(`${p.device} · expert ${p.expert}${p.self ? " (this device)" : ""}${p.model === d.modelVersion ? "" : " · other model"}`);
    return li;
  }));
}

function renderCounters(d: WebDevice): void {
  const s = d.stats();
  $("counters").textContent = `served ${s.expert_server!["answered"] ?? 0} expert requests, `
    + `${s.infer_server!["answered"] ?? 0} inference requests; ${s.agent!["inferences"] ?? 0} inferences; `
    + `${(s.expert_server!["dropped"] ?? 0) + (s.infer_server!["dropped"] ?? 0)} malformed dropped`;
}

function renderSamples(d: WebDevice): void {
  const ref = d.bundle.manifest.samples;
  const bytes = ref === null ? undefined : d.bundle.files.get(ref.file);
  if (bytes === undefined) return;
  void readZip(bytes).then((files) => {
    const images = readNpy(files.get("images.npy")!);
    const [n = 0, c = 1, h = 0, w = 0] = images.shape;
    const size = c * h * w;
    $("samples").replaceChildren(...Array.from({ length: n }, (_, i) => {
      const pixels = (images.data as Uint8Array).subarray(i * size, (i + 1) * size);
      const thumb = new DrawPad(document.createElement("canvas"), h, w);
      thumb.show(pixels);
      thumb.canvas.onclick = () => {
        pad?.show(pixels);
        void classify(d, pixels.slice());
      };
      return thumb.canvas;
    }));
  }).catch((e) => console.warn("samples.npz unreadable", e));
}

// setup form ------------------------------------------------------------------------------------

/** Fill the form from a fleet address (`nmoe broker --websockets` serves the bundle list and MQTT there). */
async function loadFleet(address: string, wanted: string | null): Promise<void> {
  const base = new URL(address.endsWith("/") ? address : `${address}/`);
  ($("broker") as HTMLInputElement).value = `${base.protocol === "https:" ? "wss" : "ws"}://${base.host}/mqtt`;
  const select = $("bundle-list") as HTMLSelectElement;
  try {
    const list = (await (await fetch(new URL("bundles/index.json", base), { cache: "no-store" })).json()) as { devices: string[] };
    select.replaceChildren(new Option("(choose this phone's device)", ""),
      ...list.devices.map((d) => new Option(d, new URL(`bundles/${d}/`, base).href)));
    if (wanted) select.value = new URL(`bundles/${wanted}/`, base).href;
    $("error").hidden = true;
  } catch {
    showError(`${base.href} lists no bundles (start it with nmoe broker --websockets PORT --bundles DIR), or is unreachable`);
  }
}

async function fillDefaults(): Promise<void> {
  const hash = new URLSearchParams(location.hash.slice(1));
  for (const key of ["username", "password"]) {
    const v = hash.get(key);
    if (v) ($(key) as HTMLInputElement).value = v;
  }
  const wanted = hash.get("device");
  if (wanted && !hash.get("username")) ($("username") as HTMLInputElement).value = wanted;
  // served by the bridge (not by the Android app's own http://localhost): the fleet is this page's origin
  if ((location.protocol === "http:" || location.protocol === "https:") && location.hostname !== "localhost") {
    ($("fleet-address") as HTMLInputElement).value = location.origin;
    await loadFleet(location.origin, wanted);
  }
}

function wireForm(): void {
  ($("bundle-folder") as HTMLInputElement).onchange = (e) => {
    const files = [...((e.target as HTMLInputElement).files ?? [])];
    const byName = new Map(files.map((f) => [f.name, f as Blob]));
    picked = mapSource(`${files[0]?.webkitRelativePath.split("/")[0] ?? "folder"}/`, byName);
    $("bundle-picked").textContent = `${files.length} files picked`;
  };
  ($("bundle-zip") as HTMLInputElement).onchange = async (e) => {
    const file = (e.target as HTMLInputElement).files?.[0];
    if (file === undefined) return;
    try {
      const entries = await readZip(new Uint8Array(await file.arrayBuffer()));
      const byName = new Map([...entries].map(([name, data]) => [name.split("/").pop()!, data]));
      picked = mapSource(`${file.name}:`, byName);
      $("bundle-picked").textContent = `${file.name}: ${entries.size} files`;
    } catch (err) {
      showError(`${file.name}: ${err instanceof Error ? err.message : err}`);
    }
  };
  $("load").onclick = () => void loadFleet(($("fleet-address") as HTMLInputElement).value.trim(), null);
  $("start").onclick = () => {
    const url = ($("bundle-url") as HTMLInputElement).value.trim() || ($("bundle-list") as HTMLSelectElement).value;
    const source = picked ?? (url ? urlSource(url) : null);
    const broker = ($("broker") as HTMLInputElement).value.trim();
    if (source === null || !broker) {
      showError("give a broker URL and a bundle (from the list, a URL, a folder or a zip)");
      return;
    }
    const value = (id: string): string => ($(id) as HTMLInputElement).value;
    const data = new URLSearchParams(location.hash.slice(1)).get("data"); // training data: #data=URL of its .npz
    void start(source, broker, { username: value("username"), password: value("password"), ...(data ? { data } : {}),
      ...(value("precision") ? { precision: value("precision") as Precision } : {}),
      latentEncoding: value("encoding") as Encoding });
  };
}

const headless = window.NMOE_CONFIG;
if (headless !== undefined) {
  void start(urlSource(headless.bundle), headless.broker, headless);
} else {
  wireForm();
  void fillDefaults();
}
