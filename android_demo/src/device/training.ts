/**
 * A web device's part in federated training (docs/protocol.md §16, docs/federated.md): COMMANDs in
 * on `train/{me}/cmd` (QoS 1; CHUNKs reassembled), one at a time through `WebOps`, one RESULT per
 * COMMAND out on `train/{me}/up` (chunked above the maximum message size). The rules of §16.5, as
 * the Python agent's TrainingService keeps them:
 * - a COMMAND seen before (same task id: QoS 1 redelivery, a coordinator's re-send) is not run again,
 *   its stored RESULT is sent again (nothing while it runs); the last 64 are remembered;
 * - a COMMAND past its deadline, or of another run than the one set up, is `refused`;
 * - per job the last round and the gate before it are kept: the same round again is recomputed
 *   from the same state, an older round is `refused` (stale);
 * - an op the device cannot do (Stage 1: convolutions) is answered `error` with the reason, so the
 *   coordinator counts a failure of this client at once instead of waiting;
 * - `commit` installs the final models in TypeScript (fp32; no ONNX files, no int8) and serves them
 *   as the committed model version; its bundle's manifest must agree with the run's shapes.
 * State lives in the page's memory (see ./training_ops.ts): a closed page forgets its run.
 */
import { WireError, toHex } from "../wire/bytes.js";
import { Reassembler, decodeChunk, isChunk, splitMessage } from "../wire/chunks.js";
import { encodeFrame, newCorrelationId } from "../wire/frames.js";
import { fromJson } from "../wire/json.js";
import { rint } from "../wire/tensor.js";
import { type Command, type Result, type Status, decodeTraining, encodeTraining } from "../wire/training.js";
import { monotonicMs, nowMs } from "./clock.js";
import type { WebDevice } from "./device.js";
import type { DeviceData } from "./device_data.js";
import { Counters } from "./events.js";
import { CallGroup } from "./requester.js";
import { publishPacketSize } from "./transport.js";
import { extract } from "../train/extractor.js";
import { EXPERT, GATE, type Params, forward } from "../train/mlp.js";
import { INIT, type Metrics, OperationRefused, WebOps, copyParams, parseJob } from "./training_ops.js";

export const DEFAULT_MAX_MESSAGE = 256 * 1024;
const RESULTS_KEPT = 64;
const QUEUE_SIZE = 16;

/** How hard peer expert queries try (device_agent.expert_queries.QueryLimits). */
const QUERY = { waitMs: 10000, window: 8, retries: 5, peerTimeoutMs: 60000 };

/** The model version under which a device serves its Stage 2 expert during run `run`. */
export function trainingVersion(run: string, stage1: string): string {
  return `train-${run}-${stage1}`;
}

/** Contiguous row chunks of at most `maxRows` covering 0..n-1, none of a single row when n > 1 (expert_queries.row_chunks). */
export function rowChunks(n: number, maxRows: number): [number, number][] {
  const count = Math.max(1, Math.min(Math.ceil(n / Math.max(1, maxRows)), Math.floor(n / 2)));
  const bounds = Array.from({ length: count + 1 }, (_, i) => rint((n * i) / count));
  return bounds.slice(1).map((b, i) => [bounds[i]!, b] as [number, number]).filter(([a, b]) => b > a);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function initial(tensors: Command["tensors"]): Params {
  return copyParams(new Map([...tensors].filter(([k]) => k.startsWith(INIT)).map(([k, t]) => [k.slice(INIT.length), t])));
}

export class TrainingService {
  readonly counters = new Counters();
  private readonly chunks = new Reassembler();
  private readonly results = new Map<string, Result | null>(); // task id -> RESULT (null: running)
  private tail: Promise<void> = Promise.resolve();
  private queued = 0;
  private run: string | null = null;
  private ops: WebOps | null = null;
  private readonly rounds = new Map<string, number>(); // job -> its last round
  private readonly before = new Map<string, Params>(); // job -> its gate before that round

  constructor(readonly device: WebDevice, readonly data: DeviceData, readonly maxMessage = DEFAULT_MAX_MESSAGE) {}

  /** Take the device's training topic (before `device.start()`). */
  attach(): void {
    this.device.training = (payload) => void this.receive(payload);
  }

  async receive(payload: Uint8Array): Promise<void> {
    let frame: Uint8Array | null = payload;
    let cmd: Command;
    try {
      if (isChunk(payload)) frame = await this.chunks.add("coordinator", decodeChunk(payload));
      if (frame === null) return;
      const msg = decodeTraining(frame);
      if (msg.kind !== "command") {
        this.counters.add("dropped_not_command");
        return;
      }
      cmd = msg;
    } catch (e) {
      if (!(e instanceof WireError)) throw e;
      this.counters.add("malformed");
      return;
    }
    const key = toHex(cmd.taskId);
    if (this.results.has(key)) {
      this.counters.add("duplicate_commands");
      const stored = this.results.get(key);
      if (stored) await this.send(stored);
      return;
    }
    if (this.queued >= QUEUE_SIZE) {
      await this.send(this.result(cmd, "error", { error: `busy: ${QUEUE_SIZE} commands queued` }));
      return;
    }
    this.results.set(key, null);
    this.queued++;
    this.tail = this.tail.then(() => this.work(cmd, key));
  }

  private async work(cmd: Command, key: string): Promise<void> {
    const started = monotonicMs();
    let result: Result;
    try {
      result = await this.execute(cmd);
    } catch (e) {
      const error = `${e instanceof Error ? e.name : "Error"}: ${e instanceof Error ? e.message : e}`;
      if (!(e instanceof OperationRefused)) this.device.events.emit("error", { where: "training", op: cmd.op, error });
      result = this.result(cmd, "error", { error });
    }
    this.queued--;
    this.counters.add(`${cmd.op}_${result.status}`);
    this.device.events.emit("training", { op: cmd.op, job: cmd.job, round: cmd.round, status: result.status,
      seconds: Math.round(monotonicMs() - started) / 1000, error: result.error.slice(0, 200) });
    this.results.set(key, result);
    while (this.results.size > RESULTS_KEPT) this.results.delete(this.results.keys().next().value!);
    await this.send(result);
  }

  private async execute(cmd: Command): Promise<Result> {
    if (nowMs() > Number(cmd.deadlineMs)) return this.result(cmd, "refused", { error: "deadline passed before the task started" });
    if (cmd.op === "setup") return this.setup(cmd);
    const ops = this.ops;
    if (cmd.run !== this.run || ops === null) {
      return this.result(cmd, "refused", { error: `not set up for run ${cmd.run} (current: ${this.run})` });
    }
    const stage1 = String(fromJson(cmd.config.get("stage1") ?? null));
    const ok = ([n, metrics]: [number, Metrics]): Result => this.result(cmd, "ok", { n, metrics });
    switch (cmd.op) {
      case "fit":
        return this.fit(ops, cmd);
      case "evaluate":
        return ok(ops.evaluate(cmd.job, cmd.tensors, cmd.seed));
      case "use_extractor":
        return ok(ops.useExtractor(stage1, cmd.tensors));
      case "train_expert": {
        const answer = ops.trainExpert(stage1, cmd.seed, initial(cmd.tensors));
        this.device.serveExpertVersion(trainingVersion(cmd.run, stage1), ops.latentDim(stage1),
          (z, n) => ops.expertOutputs(stage1, z, n));
        return ok(answer);
      }
      case "prepare_gate": {
        const experts = (fromJson(cmd.config.get("experts") ?? null) as number[] | null) ?? [];
        const version = trainingVersion(cmd.run, stage1);
        return ok(await ops.prepareGate(stage1, experts, (e, z, n) => this.peerOutputs(e, version, z, n, ops.latentDim(stage1)),
          initial(cmd.tensors)));
      }
      case "commit":
        return ok(this.commit(ops, cmd));
      default:
        throw new OperationRefused(`unknown op ${cmd.op}`);
    }
  }

  /** Serve the final models as `model_version` (fp32, in TypeScript: a web device writes no ONNX files). */
  private commit(ops: WebOps, cmd: Command): [number, Metrics] {
    const started = monotonicMs();
    const c = fromJson(cmd.config) as Record<string, unknown>;
    const m = this.device.bundle.manifest;
    const final = ops.finalModels(String(c["stage1"]), c["gate_job"] ? String(c["gate_job"]) : null, cmd.tensors);
    const model = ops.config["model"] as Record<string, unknown>;
    const spec = this.data.spec;
    const differ = [["experts", c["num_experts"], m.numExperts], ["top_k", model["top_k"], m.topK],
      ["latent_dim", ops.latentDim(String(c["stage1"])), m.latentDim], ["classes", this.data.classNames.length, m.numClasses],
      ["input", JSON.stringify([spec.shape, spec.scale, spec.mean, spec.std]), JSON.stringify([m.input.shape, m.input.scale, m.input.mean, m.input.std])]]
      .filter(([, a, b]) => a !== b);
    if (differ.length) {
      throw new OperationRefused(`the run's models do not fit this device's bundle (${differ.map(([k, a, b]) => `${k} ${a} vs ${b}`).join(", ")})`);
    }
    this.device.install({
      extractor: { run: async (x, shape) => extract(final.extractor, x, shape[0]!, spec.shape).z },
      gate: final.gate === null ? null : { run: async (z, shape) => forward(GATE, final.gate!, z, shape[0]!).out },
      expert: { run: async (z, shape) => forward(EXPERT, final.expert, z, shape[0]!).out },
      precision: "fp32 (TypeScript)",
    }, String(c["model_version"]));
    return [this.data.train.n, { rebuild_s: Math.round(monotonicMs() - started) / 1000 }];
  }

  private setup(cmd: Command): Result {
    const config = fromJson(cmd.config.get("run_config") ?? null);
    if (config === null || typeof config !== "object" || Array.isArray(config)) {
      return this.result(cmd, "error", { error: "setup needs config.run_config (the resolved config)" });
    }
    if (cmd.run !== this.run) {
      this.ops = new WebOps(this.data.client, config as Record<string, unknown>, this.data);
      this.run = cmd.run;
      this.rounds.clear();
      this.before.clear();
    }
    const [c, h, w] = this.data.spec.shape;
    return this.result(cmd, "ok", { n: this.data.train.n, metrics: {
      client: this.data.client, num_classes: this.data.classNames.length, input_channels: c, input_height: h, input_width: w,
      test_examples: this.data.test.n, global_test_examples: this.data.globalTest?.n ?? 0, wants_init: 1 } });
  }

  /** A round of a Stage 3 job, recomputed from the same state when asked again; a stale round refused. */
  private fit(ops: WebOps, cmd: Command): Result {
    const last = this.rounds.get(cmd.job);
    if (last !== undefined && cmd.round < last) {
      return this.result(cmd, "refused", { error: `stale round ${cmd.round} of ${cmd.job} (this device trained round ${last})` });
    }
    if (parseJob(cmd.job).stage === 3) {
      if (last === cmd.round && this.before.has(cmd.job)) ops.gates.set(cmd.job, copyParams(this.before.get(cmd.job)!));
      else this.before.set(cmd.job, copyParams(ops.gateState(cmd.job)));
    }
    const [tensors, n, metrics] = ops.fit(cmd.job, cmd.tensors, cmd.upload, cmd.seed);
    this.rounds.set(cmd.job, cmd.round);
    return this.result(cmd, "ok", { n, metrics, tensors });
  }

  /** softmax(expert e(z)) [n, C] from the device holding expert `e` at model `version` (expert_queries.expert_outputs). */
  private async peerOutputs(e: number, version: string, z: Float32Array, n: number, dim: number): Promise<Float32Array> {
    const d = this.device;
    const end = monotonicMs() + QUERY.peerTimeoutMs;
    let peer = d.fleet.all().filter((p) => p.expert === e).sort((a, b) => b.ts - a.ts)[0];
    while (peer === undefined) {
      if (monotonicMs() > end) throw new OperationRefused(`no device online holds expert ${e}`);
      await sleep(100);
      peer = d.fleet.all().filter((p) => p.expert === e).sort((a, b) => b.ts - a.ts)[0];
    }
    const device = peer.device;
    const ask = async ([a, b]: [number, number]): Promise<Float32Array> => {
      for (let attempt = 1; ; attempt++) {
        const group = new CallGroup();
        const cid = newCorrelationId();
        const rows = Array.from({ length: b - a }, (_, i) => a + i);
        d.replies.track(group, cid, { expert: e, rows, device, sentAt: monotonicMs(), reply: null, roundTripMs: null, replyBytes: 0 });
        d.transport.publish(d.topics.expertRequest(e), encodeFrame({ kind: "request", correlationId: cid, expertId: e,
          deadlineMs: BigInt(Math.floor(nowMs()) + QUERY.waitMs), modelVersion: version, replyTopic: d.topics.reply(d.me),
          tensor: { shape: [b - a, dim], data: z.subarray(a * dim, b * dim) }, encoding: "fp32" }));
        await group.wait(monotonicMs() + QUERY.waitMs);
        d.replies.forget(group);
        const reply = group.calls.get(toHex(cid))!.reply;
        if (reply?.kind === "response" && reply.probs.shape[0] === b - a) return reply.probs.data;
        if (attempt > QUERY.retries) {
          throw new OperationRefused(`expert ${e} on ${device}: rows ${a}..${b - 1} failed ${attempt} times (${reply?.kind ?? "timeout"})`);
        }
        await sleep(Math.min(1000, 50 * 2 ** attempt));
      }
    };
    const todo = rowChunks(n, peer.caps.maxBatch);
    const parts = new Array<Float32Array>(todo.length);
    let next = 0;
    await Promise.all(Array.from({ length: Math.min(QUERY.window, todo.length) }, async () => {
      while (next < todo.length) {
        const i = next++;
        parts[i] = await ask(todo[i]!);
      }
    }));
    const c = parts[0]!.length / (todo[0]![1] - todo[0]![0]);
    const out = new Float32Array(n * c);
    todo.forEach(([a], i) => out.set(parts[i]!, a * c));
    return out;
  }

  private result(cmd: Command, status: Status, r: { n?: number; metrics?: Metrics; tensors?: Params; error?: string }): Result {
    return { kind: "result", taskId: cmd.taskId, op: cmd.op, run: cmd.run, job: cmd.job, round: cmd.round, status,
      numExamples: r.n ?? 0, metrics: new Map(Object.entries(r.metrics ?? {})), error: (r.error ?? "").slice(0, 1000),
      tensors: r.tensors ?? new Map() };
  }

  /** Publish a RESULT (QoS 1), as CHUNKs when its PUBLISH packet would exceed the maximum message size. */
  private async send(result: Result): Promise<void> {
    const d = this.device;
    const topic = d.topics.trainResult(d.me);
    const frame = encodeTraining(result);
    // the remaining-length field of a chunk's packet may be a few bytes longer than an empty one's
    const frames = publishPacketSize(topic, frame) <= this.maxMessage ? [frame]
      : await splitMessage(frame, result.taskId, this.maxMessage - publishPacketSize(topic, new Uint8Array(0)) - 4);
    for (const f of frames) d.transport.publish(topic, f, 1);
    this.counters.add("result_bytes", frames.reduce((s, f) => s + f.length, 0));
  }
}
