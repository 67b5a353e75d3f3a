/**
 * Answering requests from the wire (docs/agent.md "Serving"): admission checks on arrival, a
 * bounded queue (BUSY when full), one micro-batching worker. `submit` never waits: it answers an
 * ERROR at once or queues; the worker takes the oldest request plus every next one that fits in
 * `maxBatch` rows, makes ONE model call and publishes one RESPONSE per request.
 */
import { WireError } from "../wire/bytes.js";
import {
  ErrorCode, type Request, deadlineError, decodeFrame, encodeFrame, errorName, peekRequestRoute, truncateUtf8,
} from "../wire/frames.js";
import type { Encoding, WireTensor } from "../wire/tensor.js";
import type { Topics } from "../wire/topics.js";
import { nowMs } from "./clock.js";
import { Counters, type EventLog } from "./events.js";

export type Publisher = (topic: string, payload: Uint8Array) => void;

/** What a server computes and which requests it accepts. */
export interface Served {
  readonly kind: "expert" | "infer";
  readonly expertId: number;
  readonly modelVersion: string;
  readonly rowShape: readonly number[]; // one input without the batch dim
  readonly encodings: readonly Encoding[];
  /** Rows [n, ...rowShape] of one batch and the requests they came from -> float32 probs [n, C]. */
  readonly compute: (inputs: Float32Array, n: number, requests: readonly Request[]) => Promise<Float32Array>;
  /** A decoded tensor's values as compute's input; a RangeError means BAD_REQUEST. */
  readonly check?: (t: WireTensor) => void;
}

export interface ServerLimits {
  readonly maxBatch: number;
  readonly queueSize: number;
  readonly microbatch: boolean;
}

export const DEFAULT_LIMITS: ServerLimits = { maxBatch: 32, queueSize: 64, microbatch: true };

interface Job {
  readonly request: Request;
  readonly replyTopic: string; // {inbox}/{me}
  readonly rows: number;
}

const MAX_U32 = 0xffffffff;

export class RequestServer {
  readonly counters = new Counters();
  private readonly queue: Job[] = [];
  private working = false;
  private stopping = false;

  constructor(readonly served: Served, readonly limits: ServerLimits, private readonly topics: Topics,
    private readonly me: string, private readonly publish: Publisher, private readonly events: EventLog) {}

  /** Check one request payload and queue it, answer an ERROR, or drop it (counted). */
  submit(payload: Uint8Array): void {
    this.counters.add("received");
    let msg;
    try {
      msg = decodeFrame(payload);
    } catch (e) {
      if (!(e instanceof WireError)) throw e;
      const route = peekRequestRoute(payload);
      const replyTopic = route === null ? null : this.replyTopic(route.replyTopic);
      if (route === null || replyTopic === null) {
        this.counters.add(route === null ? "dropped_malformed" : "dropped_reply_topic");
        return;
      }
      this.error(replyTopic, route.correlationId, route.expertId, ErrorCode.BAD_REQUEST, e.message);
      return;
    }
    if (msg.kind !== "request") {
      this.counters.add("dropped_not_request"); // never answer a reply: no loops
      return;
    }
    const replyTopic = this.replyTopic(msg.replyTopic);
    if (replyTopic === null) {
      this.counters.add("dropped_reply_topic");
      return;
    }
    const refusal = this.refusal(msg);
    if (refusal !== null) {
      this.error(replyTopic, msg.correlationId, msg.expertId, ...refusal);
      return;
    }
    if (this.queue.length >= this.limits.queueSize || this.stopping) {
      this.error(replyTopic, msg.correlationId, msg.expertId, ErrorCode.BUSY, `queue full (${this.limits.queueSize} requests)`);
      return;
    }
    this.queue.push({ request: msg, replyTopic, rows: msg.tensor.shape[0]! });
    void this.work();
  }

  /** Stop taking work; queued requests are dropped (counted as abandoned). */
  stop(): void {
    this.stopping = true;
    this.counters.add("abandoned", this.queue.length);
    this.queue.length = 0;
  }

  /** Counters plus `dropped` (all reasons) and the mean requests and rows per model call. */
  stats(): Record<string, number> {
    const c: Record<string, number> = this.counters.snapshot();
    c["dropped"] = Object.entries(c).filter(([k]) => k.startsWith("dropped_")).reduce((s, [, v]) => s + v, 0);
    const batches = c["batches"] ?? 0;
    c["mean_batch_size"] = batches ? (c["batched_requests"] ?? 0) / batches : 0;
    c["mean_batch_rows"] = batches ? (c["batched_rows"] ?? 0) / batches : 0;
    return c;
  }

  private replyTopic(inbox: string): string | null {
    try {
      return this.topics.replyFrom(this.topics.inboxOwner(inbox), this.me);
    } catch (e) {
      if (e instanceof WireError) return null;
      throw e;
    }
  }

  private refusal(req: Request): [ErrorCode, string] | null {
    const s = this.served;
    if (req.expertId !== s.expertId) return [ErrorCode.UNKNOWN_EXPERT, `this device holds expert ${s.expertId}`];
    if (req.modelVersion !== s.modelVersion) return [ErrorCode.WRONG_MODEL_VERSION, `this device runs model ${s.modelVersion}`];
    const late = deadlineError(req.deadlineMs, nowMs());
    if (late !== null) {
      return [late, late === ErrorCode.DEADLINE_EXCEEDED ? "deadline passed" : "deadline too far in the future"];
    }
    if (!s.encodings.includes(req.tensor.encoding)) {
      return [ErrorCode.BAD_REQUEST, `encoding ${req.tensor.encoding} not accepted (${s.encodings.join(", ")})`];
    }
    const shape = req.tensor.shape;
    if (shape.length !== s.rowShape.length + 1 || s.rowShape.some((d, i) => shape[i + 1] !== d)) {
      return [ErrorCode.BAD_REQUEST, `expected a tensor [N, ${s.rowShape.join(", ")}], got [${shape.join(", ")}]`];
    }
    if (shape[0]! > this.limits.maxBatch) return [ErrorCode.BAD_REQUEST, `N=${shape[0]} is more than max_batch=${this.limits.maxBatch}`];
    try {
      s.check?.(req.tensor);
    } catch (e) {
      if (e instanceof RangeError) return [ErrorCode.BAD_REQUEST, e.message];
      throw e;
    }
    return null;
  }

  private error(topic: string, cid: Uint8Array, expertId: number, code: ErrorCode, message: string): void {
    this.counters.add(errorName(code));
    this.publish(topic, encodeFrame({ kind: "error", correlationId: cid, code, expertId, message: truncateUtf8(message) }));
  }

  private async work(): Promise<void> {
    if (this.working) return;
    this.working = true;
    try {
      while (this.queue.length > 0 && !this.stopping) {
        const batch = this.takeBatch();
        const now = nowMs();
        const due = batch.filter((j) => j.request.deadlineMs >= BigInt(Math.floor(now)));
        for (const j of batch) {
          if (!due.includes(j)) {
            this.error(j.replyTopic, j.request.correlationId, j.request.expertId, ErrorCode.DEADLINE_EXCEEDED,
              "deadline passed while queued");
          }
        }
        if (due.length > 0) await this.run(due);
      }
    } finally {
      this.working = false;
    }
  }

  /** The oldest job plus, when micro-batching, every next one that fits in maxBatch rows. */
  private takeBatch(): Job[] {
    const batch = [this.queue.shift()!];
    let rows = batch[0]!.rows;
    while (this.limits.microbatch && this.queue.length > 0 && rows + this.queue[0]!.rows <= this.limits.maxBatch) {
      const next = this.queue.shift()!;
      batch.push(next);
      rows += next.rows;
    }
    return batch;
  }

  private async run(jobs: Job[]): Promise<void> {
    const n = jobs.reduce((s, j) => s + j.rows, 0);
    const rowSize = this.served.rowShape.reduce((a, b) => a * b, 1);
    const inputs = new Float32Array(n * rowSize);
    let offset = 0;
    for (const j of jobs) {
      inputs.set(j.request.tensor.data, offset);
      offset += j.request.tensor.data.length;
    }
    const start = performance.now();
    let frames: Uint8Array[];
    try {
      const probs = await this.served.compute(inputs, n, jobs.map((j) => j.request));
      const computeUs = Math.min(Math.round((performance.now() - start) * 1000), MAX_U32);
      const classes = probs.length / n;
      let row = 0;
      frames = jobs.map((j) => {
        const data = probs.slice(row * classes, (row + j.rows) * classes);
        row += j.rows;
        return encodeFrame({ kind: "response", correlationId: j.request.correlationId, expertId: this.served.expertId,
          computeUs, probs: { shape: [j.rows, classes], data } });
      });
    } catch (e) {
      this.events.emit("error", { where: `${this.served.kind} server`, error: `${e instanceof Error ? e.name : "Error"}: ${e}` });
      for (const j of jobs) {
        this.error(j.replyTopic, j.request.correlationId, j.request.expertId, ErrorCode.INTERNAL, `${this.served.kind} computation failed`);
      }
      return;
    }
    this.counters.add("batches");
    this.counters.add("batched_requests", jobs.length);
    this.counters.add("batched_rows", n);
    jobs.forEach((j, i) => this.publish(j.replyTopic, frames[i]!));
    this.counters.add("answered", jobs.length);
  }
}
