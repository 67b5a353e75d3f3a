/**
 * The web device: the browser/phone counterpart of `nmoe agent` (docs/agent.md). It serves its
 * expert (`expert/{id}/req`) and local inference (`infer/{me}/req`), and classifies with the fleet:
 * extractor -> gate (or RanGate) -> top-k among the live experts -> its own expert in
 * onnxruntime-web while the other chosen experts are asked over MQTT -> combine, renormalizing over
 * the experts that answered before the deadline; a row none of whose experts answered gets the
 * own expert alone, so an inference never fails while the device itself works.
 */
import { toHex } from "../wire/bytes.js";
import { ErrorCode, type Request, encodeFrame, errorName, newCorrelationId, peekRequestRoute } from "../wire/frames.js";
import { type Presence, encodePresence } from "../wire/presence.js";
import { ENCODINGS, type Encoding, type WireTensor } from "../wire/tensor.js";
import { Topics } from "../wire/topics.js";
import { WireError } from "../wire/bytes.js";
import type { Bundle } from "./bundle.js";
import { elapsedMs, monotonicMs, nowMs } from "./clock.js";
import { Counters, EventLog } from "./events.js";
import { FleetView } from "./fleet.js";
import { RUNTIME_NAME } from "./models.js";
import { type Route, argmaxRows, combine, expertsOf, gateRoute, preprocess, randomLiveRoute, renormalize, rowsOf, softmax } from "./nmoe.js";
import { CallGroup, ReplyRouter } from "./requester.js";
import { NumpyRandom } from "./rng.js";
import { DEFAULT_LIMITS, RequestServer, type ServerLimits } from "./server.js";
import { type ConnectionEvent, type MqttTransport, publishPacketSize } from "./transport.js";

export interface DeviceConfig {
  readonly prefix: string;
  readonly fleet: string;
  readonly latentEncoding: Encoding; // sent to peers that accept it (fp32 otherwise)
  readonly deadlineMs: number; // how long an inference waits for peer experts
  readonly limits: ServerLimits;
  readonly seed: number; // random routing: numpy's generator seeded [seed, expert_id], as LocalNMoE's
}

export const DEFAULT_CONFIG: DeviceConfig = {
  prefix: "nmoe", fleet: "default", latentEncoding: "fp32", deadlineMs: 1000, limits: DEFAULT_LIMITS, seed: 0,
};

/** One inference: the prediction and how the fleet produced it (as the Python agent's InferenceResult). */
export interface InferenceResult {
  readonly id: string;
  readonly labels: number[];
  readonly probs: Float32Array; // [n, C]
  readonly route: Route; // as combined: weights renormalized, fallback rows with the own expert first
  readonly answered: number[];
  readonly missing: Map<number, string>;
  readonly rerouted: Map<number, number>;
  readonly fallbackRows: number;
  readonly latencyMs: Record<"extract" | "route" | "send" | "own_expert" | "peers" | "total", number>;
  readonly remoteMs: Map<number, number>;
  readonly bytesSent: number;
  readonly bytesReceived: number;
  /** Which device answered for each peer expert. */
  readonly peers: Map<number, string>;
}

/** One model's runner: float32 [n, ...] in, float32 [n, ...] out (an onnxruntime-web session, or TypeScript). */
export interface ModelRunner {
  run(x: Float32Array, shape: number[]): Promise<Float32Array>;
}

/** The models a device runs: its bundle's (`DeviceModels`) or, after a commit, the ones it trained. */
export interface Models {
  readonly extractor: ModelRunner;
  readonly gate: ModelRunner | null; // null: random routing
  readonly expert: ModelRunner;
  readonly precision: string;
}

export class WebDevice {
  readonly events = new EventLog();
  readonly counters = new Counters();
  readonly topics: Topics;
  readonly fleet: FleetView;
  readonly replies = new ReplyRouter();
  readonly me: string;
  readonly expertId: number;
  expertServer: RequestServer;
  inferServer: RequestServer;
  connected = false;
  /** Receives the payloads of `train/{me}/cmd` (set before `start`: ./training.ts). */
  training: ((payload: Uint8Array) => void) | null = null;
  /** Servers of the expert at other model versions (federated training's staging expert). */
  private readonly versions = new Map<string, RequestServer>();
  private readonly rng: NumpyRandom;
  private ids = 0;
  private version: string;

  constructor(readonly bundle: Bundle, public models: Models, readonly transport: MqttTransport,
    readonly config: DeviceConfig = DEFAULT_CONFIG) {
    const m = bundle.manifest;
    this.me = m.deviceId;
    this.expertId = m.expertId;
    this.topics = new Topics(config.prefix, config.fleet);
    this.topics.reply(this.me); // WireError for a device id the protocol refuses
    this.fleet = new FleetView(this.me);
    this.rng = new NumpyRandom([config.seed, this.expertId]);
    this.version = bundle.modelVersion;
    [this.expertServer, this.inferServer] = this.servers(models, this.version);
  }

  /** The expert and inference servers of `models` at model `version`. */
  private servers(models: Models, version: string): [RequestServer, RequestServer] {
    const m = this.bundle.manifest;
    const publish = (topic: string, payload: Uint8Array): void => this.transport.publish(topic, payload);
    return [new RequestServer({
      kind: "expert", expertId: this.expertId, modelVersion: version, rowShape: [m.latentDim],
      encodings: ENCODINGS, compute: async (z, n) => softmax(await models.expert.run(z, [n, m.latentDim]), m.numClasses),
    }, this.config.limits, this.topics, this.me, publish, this.events), new RequestServer({
      kind: "infer", expertId: this.expertId, modelVersion: version, rowShape: [...m.input.shape],
      encodings: ENCODINGS, check: checkPixels,
      compute: async (x, n, requests) => (await this.infer(Uint8Array.from(x), n, requests)).probs,
    }, this.config.limits, this.topics, this.me, publish, this.events)];
  }

  get modelVersion(): string {
    return this.version;
  }

  /** Switch to `models` as model `version` (a federated commit), as the Python agent's `install`: serve
   * the new version and stop serving the old one (a request of the old version is answered
   * WRONG_MODEL_VERSION, so its sender re-routes), announce the new presence. Inferences already begun
   * finish with the models they began with. The bundle's manifest still gives the shapes (the commit
   * checks that they agree). */
  install(models: Models, version: string): void {
    const previous = this.version;
    const old = [this.expertServer, this.inferServer];
    this.models = models;
    this.version = version;
    [this.expertServer, this.inferServer] = this.servers(models, version);
    for (const server of old) server.stop();
    this.events.emit("install", { device: this.me, model: version, previous });
    if (this.connected) this.transport.publish(this.topics.presence(this.me), encodePresence(this.presence()), 1, true);
  }

  // lifecycle --------------------------------------------------------------------------------

  /** Subscribe and connect in the background (the birth presence goes out on every connect). */
  start(): void {
    const t = this.transport;
    t.subscribe(this.topics.presenceFilter(), 1);
    t.subscribe(this.topics.expertRequest(this.expertId));
    t.subscribe(this.topics.inferRequest(this.me));
    t.subscribe(this.topics.replyFilter(this.me));
    if (this.training !== null) t.subscribe(this.topics.trainCommand(this.me), 1);
    t.connect(this.offline(), (topic, payload) => this.onMessage(topic, payload), (e, d) => this.onConnection(e, d));
  }

  /** Publish the offline presence, disconnect, stop serving, log the counters. */
  async stop(): Promise<void> {
    await this.transport.close(this.offline());
    this.connected = false;
    this.expertServer.stop();
    this.inferServer.stop();
    for (const server of this.versions.values()) server.stop();
    this.events.emit("counters", { device: this.me, counters: this.stats() });
    this.events.emit("stop", { device: this.me });
  }

  /** Every counter, grouped as the Python agent's `Agent.stats()`. */
  stats(): Record<string, Record<string, number>> {
    return { agent: this.counters.snapshot(), expert_server: this.expertServer.stats(), infer_server: this.inferServer.stats(),
      replies: this.replies.counters.snapshot(), presence: this.fleet.counters.snapshot(),
      ...Object.fromEntries([...this.versions].map(([v, server]) => [`expert_server@${v}`, server.stats()])) };
  }

  /** Also answer expert requests of model `version` with `compute(latents, n) -> probs` (federated
   * training: the expert just trained, before any bundle holds it), as the Python agent's
   * `serve_expert_version`. */
  serveExpertVersion(version: string, latentDim: number, compute: (z: Float32Array, n: number) => Float32Array): void {
    this.versions.get(version)?.stop();
    this.versions.set(version, new RequestServer({
      kind: "expert", expertId: this.expertId, modelVersion: version, rowShape: [latentDim], encodings: ENCODINGS,
      compute: async (z, n) => compute(z, n),
    }, this.config.limits, this.topics, this.me, (topic, payload) => this.transport.publish(topic, payload), this.events));
  }

  presence(): Presence {
    return { status: "online", device: this.me, expert: this.expertId, model: this.modelVersion, ts: Date.now() / 1000,
      caps: { runtimes: [RUNTIME_NAME], latentEncodings: ENCODINGS, maxBatch: this.config.limits.maxBatch } };
  }

  private offline() {
    return { topic: this.topics.presence(this.me), payload: encodePresence({ status: "offline", device: this.me, expert: this.expertId }),
      qos: 1 as const, retain: true };
  }

  // inference --------------------------------------------------------------------------------

  /** Classify `n` uint8 images [n, C, H, W] with the fleet; `requests`: the wire requests these rows came from. */
  async infer(pixels: Uint8Array, n: number, requests: readonly Request[] = []): Promise<InferenceResult> {
    const m = this.bundle.manifest;
    const start = monotonicMs();
    const deadlineMs = BigInt(Math.floor(nowMs()) + this.config.deadlineMs);
    const until = start + this.config.deadlineMs;
    const z = await this.models.extractor.run(preprocess(pixels, m.input), [n, ...m.input.shape]);
    const extracted = monotonicMs();
    const route = await this.route(z, n);
    const routed = monotonicMs();
    const group = new CallGroup();
    const { missing, bytesSent, peers } = this.send(z, route, group, deadlineMs);
    const sent = monotonicMs();
    const outputs = new Map<number, Float32Array>();
    const have = new Map<number, Uint8Array>();
    for (const e of expertsOf(route)) {
      outputs.set(e, new Float32Array(n * m.numClasses));
      have.set(e, new Uint8Array(n));
    }
    if (outputs.has(this.expertId)) await this.runOwn(z, rowsOf(route, this.expertId).rows, outputs, have);
    const ownDone = monotonicMs();
    await group.wait(until);
    this.replies.forget(group);
    const waited = monotonicMs();
    const { remoteMs, bytesReceived } = this.collect(group, outputs, have, missing);
    const orphans = renormalize(route, (r, e) => have.get(e)![r] === 1);
    if (orphans.length > 0) {
      for (const r of orphans) {
        route.weights.fill(0, r * route.k, (r + 1) * route.k);
        route.experts[r * route.k] = this.expertId;
        route.weights[r * route.k] = 1;
      }
      if (!outputs.has(this.expertId)) {
        outputs.set(this.expertId, new Float32Array(n * m.numClasses));
        have.set(this.expertId, new Uint8Array(n));
      }
      await this.runOwn(z, orphans, outputs, have);
    }
    const probs = combine(route, outputs, m.numClasses);
    const answered = [...have].filter(([, rows]) => rows.some((v) => v === 1)).map(([e]) => e).sort((a, b) => a - b);
    const result: InferenceResult = {
      id: `${this.me}-${this.ids++}`, labels: argmaxRows(probs, m.numClasses), probs, route, answered,
      missing: new Map([...missing].sort(([a], [b]) => a - b)), rerouted: route.rerouted, fallbackRows: orphans.length,
      latencyMs: { extract: elapsedMs(start, extracted), route: elapsedMs(extracted, routed), send: elapsedMs(routed, sent),
        own_expert: elapsedMs(sent, ownDone), peers: elapsedMs(routed, waited), total: elapsedMs(start, monotonicMs()) },
      remoteMs, bytesSent, bytesReceived, peers,
    };
    this.record(result, answeredPerRequest(requests, have));
    return result;
  }

  /** Milliseconds of each of `calls` local passes (preprocess, extractor, gate, own expert) on one image. */
  async timeModels(pixels: Uint8Array, calls: number): Promise<number[]> {
    const m = this.bundle.manifest;
    const times: number[] = [];
    for (let i = 0; i < calls; i++) {
      const start = monotonicMs();
      const z = await this.models.extractor.run(preprocess(pixels, m.input), [1, ...m.input.shape]);
      await this.models.gate?.run(z, [1, m.latentDim]);
      await this.models.expert.run(z, [1, m.latentDim]);
      times.push(monotonicMs() - start);
    }
    return times;
  }

  private async route(z: Float32Array, n: number): Promise<Route> {
    const m = this.bundle.manifest;
    const live = new Set([this.expertId]);
    if (this.connected) for (const e of this.fleet.liveExperts(this.modelVersion)) if (e < m.numExperts) live.add(e);
    const gate = this.models.gate;
    if (gate !== null) return gateRoute(await gate.run(z, [n, m.latentDim]), m.numExperts, m.topK, live);
    return randomLiveRoute(n, m.numExperts, m.topK, live, this.rng);
  }

  /** One REQUEST per peer expert (split at the peer's max_batch); the experts not asked, bytes sent. */
  private send(z: Float32Array, route: Route, group: CallGroup, deadlineMs: bigint) {
    const d = this.bundle.manifest.latentDim;
    const missing = new Map<number, string>();
    const peers = new Map<number, string>();
    let bytesSent = 0;
    for (const e of expertsOf(route)) {
      if (e === this.expertId) continue;
      const peer = this.fleet.peer(e, this.modelVersion);
      if (peer === null) {
        missing.set(e, "offline");
        continue;
      }
      peers.set(e, peer.device);
      const encoding = peer.caps.latentEncodings.includes(this.config.latentEncoding) ? this.config.latentEncoding : "fp32";
      const topic = this.topics.expertRequest(e);
      for (const chunk of arraySplit(rowsOf(route, e).rows, Math.ceil(rowsOf(route, e).rows.length / peer.caps.maxBatch))) {
        const latent = new Float32Array(chunk.length * d);
        chunk.forEach((r, i) => latent.set(z.subarray(r * d, (r + 1) * d), i * d));
        const cid = newCorrelationId();
        const payload = this.request(cid, e, deadlineMs, { shape: [chunk.length, d], data: latent }, encoding);
        this.replies.track(group, cid, { expert: e, rows: chunk, device: peer.device, sentAt: monotonicMs(), reply: null,
          roundTripMs: null, replyBytes: 0 });
        this.transport.publish(topic, payload);
        bytesSent += publishPacketSize(topic, payload);
      }
    }
    return { missing, bytesSent, peers };
  }

  /** The REQUEST frame; fp32 when the latent does not fit `encoding` (fp16 beyond ±65504). */
  private request(cid: Uint8Array, expert: number, deadlineMs: bigint, latent: { shape: number[]; data: Float32Array },
    encoding: Encoding): Uint8Array {
    const frame = (enc: Encoding): Uint8Array => encodeFrame({ kind: "request", correlationId: cid, expertId: expert, deadlineMs,
      modelVersion: this.modelVersion, replyTopic: this.topics.reply(this.me), tensor: latent, encoding: enc });
    try {
      return frame(encoding);
    } catch (e) {
      if (e instanceof WireError) return frame("fp32");
      throw e;
    }
  }

  private async runOwn(z: Float32Array, rows: readonly number[], outputs: Map<number, Float32Array>, have: Map<number, Uint8Array>) {
    const { latentDim: d, numClasses: c } = this.bundle.manifest;
    if (rows.length === 0) return;
    const x = new Float32Array(rows.length * d);
    rows.forEach((r, i) => x.set(z.subarray(r * d, (r + 1) * d), i * d));
    const probs = softmax(await this.models.expert.run(x, [rows.length, d]), c);
    const out = outputs.get(this.expertId)!;
    rows.forEach((r, i) => {
      out.set(probs.subarray(i * c, (i + 1) * c), r * c);
      have.get(this.expertId)![r] = 1;
    });
  }

  /** Peer answers into outputs/have; failures into `missing`. Round trips and bytes. */
  private collect(group: CallGroup, outputs: Map<number, Float32Array>, have: Map<number, Uint8Array>, missing: Map<number, string>) {
    const c = this.bundle.manifest.numClasses;
    const remoteMs = new Map<number, number>();
    let bytesReceived = 0;
    for (const call of group.calls.values()) {
      const reply = call.reply;
      bytesReceived += call.replyBytes;
      if (reply?.kind === "response" && reply.probs.shape[0] === call.rows.length && reply.probs.shape[1] === c) {
        const out = outputs.get(call.expert)!;
        call.rows.forEach((r, i) => {
          out.set(reply.probs.data.subarray(i * c, (i + 1) * c), r * c);
          have.get(call.expert)![r] = 1;
        });
        remoteMs.set(call.expert, Math.max(remoteMs.get(call.expert) ?? 0, Math.round((call.roundTripMs ?? 0) * 1000) / 1000));
        continue;
      }
      if (reply?.kind === "error" && reply.code === ErrorCode.WRONG_MODEL_VERSION) this.fleet.markIncompatible(call.device);
      missing.set(call.expert, reply === null ? "timeout" : reply.kind === "response" ? "bad_response" : errorName(reply.code));
    }
    return { remoteMs, bytesReceived };
  }

  private record(r: InferenceResult, requests: Record<string, number[]>): void {
    this.counters.add("inferences");
    this.counters.add("inputs", r.labels.length);
    this.counters.add("inputs_rerouted", [...r.rerouted.values()].reduce((a, b) => a + b, 0));
    this.counters.add("experts_missing", r.missing.size);
    this.counters.add("fallback_rows", r.fallbackRows);
    const obj = <V>(m: Map<number, V>): Record<string, V> => Object.fromEntries([...m].map(([k, v]) => [String(k), v]));
    this.events.emit("inference", {
      id: r.id, inputs: r.labels.length, chosen: expertsOf(r.route), answered: r.answered, missing: obj(r.missing),
      rerouted: obj(r.rerouted), fallback_rows: r.fallbackRows, latency_ms: r.latencyMs, remote_ms: obj(r.remoteMs),
      bytes_sent: r.bytesSent, bytes_received: r.bytesReceived, requests,
    });
  }

  // transport callbacks ----------------------------------------------------------------------

  private onConnection(event: ConnectionEvent, detail: string): void {
    if (event === "connect" || event === "reconnect") {
      this.transport.publish(this.topics.presence(this.me), encodePresence(this.presence()), 1, true);
      this.connected = true;
    } else if (event === "disconnect") {
      this.connected = false;
      this.fleet.clear();
    }
    this.events.emit(event, { device: this.me, detail });
  }

  private onMessage(topic: string, payload: Uint8Array): void {
    try {
      this.dispatch(topic, payload);
    } catch (e) {
      this.counters.add("handler_errors");
      this.events.emit("error", { where: "message handler", topic: topic.slice(0, 100), error: `${e}` });
    }
  }

  private dispatch(topic: string, payload: Uint8Array): void {
    const t = this.topics.parse(topic);
    if (t?.kind === "presence") {
      const status = this.fleet.update(t.device, payload);
      if (status !== null) this.events.emit("presence", { device: t.device, status });
    } else if (t?.kind === "expert" && t.expert === this.expertId) {
      const version = peekRequestRoute(payload)?.modelVersion;
      ((version !== undefined ? this.versions.get(version) : undefined) ?? this.expertServer).submit(payload);
    } else if (t?.kind === "train" && t.direction === "cmd" && t.device === this.me && this.training !== null) {
      this.training(payload);
    } else if (t?.kind === "infer" && t.device === this.me) {
      this.inferServer.submit(payload);
    } else if (t?.kind === "reply" && t.device === this.me) {
      this.replies.deliver(payload, publishPacketSize(topic, payload));
    } else {
      this.counters.add("dropped_topic");
    }
  }
}

/** A raw-input tensor must hold integers 0..255 (uint8 pixels), whatever its encoding. */
function checkPixels(t: WireTensor): void {
  for (const v of t.data) if (!(v >= 0 && v <= 255 && Number.isInteger(v))) throw new RangeError("raw input values must be integers 0..255 (uint8 pixels)");
}

/** numpy.array_split(items, parts): the first len % parts parts one longer. */
function arraySplit<T>(items: readonly T[], parts: number): T[][] {
  const base = Math.floor(items.length / parts);
  const extra = items.length % parts;
  const out: T[][] = [];
  let i = 0;
  for (let p = 0; p < parts; p++) {
    const size = base + (p < extra ? 1 : 0);
    out.push(items.slice(i, i + size));
    i += size;
  }
  return out;
}

/** Correlation id (hex) of each wire request -> the experts that answered for its rows. */
function answeredPerRequest(requests: readonly Request[], have: Map<number, Uint8Array>): Record<string, number[]> {
  const out: Record<string, number[]> = {};
  let a = 0;
  for (const q of requests) {
    const b = a + q.tensor.shape[0]!;
    out[toHex(q.correlationId)] = [...have].filter(([, rows]) => rows.subarray(a, b).some((v) => v === 1)).map(([e]) => e)
      .sort((x, y) => x - y);
    a = b;
  }
  return out;
}
