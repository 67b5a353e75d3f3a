/**
 * The federated-training frames of protocol version 2 (docs/protocol.md §16.2): COMMAND (kind 4),
 * the coordinator's task for one device, and RESULT (kind 5), the device's answer. Both carry a
 * JSON header and named float32 tensors:
 *
 *   header (20 B: "NM", 2, kind, task id) | u32 H | H bytes JSON object | u16 T | T x (u8 n, name, TENSOR)
 *
 * Frames larger than the link's maximum message size travel as CHUNKs (./chunks.ts). Every decoder
 * throws only WireError.
 */
import { Reader, WireError, Writer, strictUtf8, utf8 } from "./bytes.js";
import { MAGIC } from "./frames.js";
import { type Json, JsonError, JsonNumber, type JsonObject, parseJson, pythonJson } from "./json.js";
import { type Tensor, readTensor, writeTensor } from "./tensor.js";

export const TRAINING_VERSION = 2;
export const MAX_MESSAGE = 64 << 20;
export const MAX_HEADER = 16384;
export const MAX_TENSORS = 1024;
export const MAX_ERROR = 1024;
const NAME = /^[A-Za-z0-9_.-]{1,255}$/;
const ID = /^[A-Za-z0-9_.-]{1,64}$/;
const MAX_SEED = (1n << 63n) - 1n;
const FP32_ONLY: ReadonlySet<number> = new Set([1]);

export const OPS = ["setup", "fit", "use_extractor", "train_expert", "prepare_gate", "evaluate", "commit"] as const;
export type Op = (typeof OPS)[number];
export const STATUSES = ["ok", "error", "refused"] as const;
export type Status = (typeof STATUSES)[number];
export const KIND_CODES = { command: 4, result: 5 } as const;

/** Named float32 tensors, in any order (senders write them sorted by name). */
export type Tensors = ReadonlyMap<string, Tensor>;

interface Common {
  readonly taskId: Uint8Array; // 16 bytes
  readonly op: Op;
  readonly run: string;
  readonly job: string;
  readonly round: number;
  readonly tensors: Tensors;
}

/** One task for one device. `seed` and `deadlineMs` are integers up to 2^63-1: bigint. */
export interface Command extends Common {
  readonly kind: "command";
  readonly seed: bigint;
  readonly deadlineMs: bigint;
  readonly config: JsonObject; // op-specific settings (numbers keep whether they were integers)
  readonly upload: readonly string[];
}

/** A device's answer to one COMMAND. */
export interface Result extends Common {
  readonly kind: "result";
  readonly status: Status;
  readonly numExamples: number;
  readonly metrics: ReadonlyMap<string, number>;
  readonly error: string;
}

export type TrainingMessage = Command | Result;

function checkName(name: unknown): string {
  if (typeof name !== "string" || !NAME.test(name)) throw new WireError(`bad tensor name ${String(name).slice(0, 80)}`);
  return name;
}

function get(head: JsonObject, key: string): Json {
  const v = head.get(key);
  if (v === undefined) throw new WireError(`header missing '${key}'`);
  return v;
}

function str(head: JsonObject, key: string): string {
  const v = get(head, key);
  if (typeof v !== "string") throw new WireError(`header key '${key}' has the wrong type`);
  return v;
}

/** An integer-written JSON number 0..limit, exact (as bigint: seeds reach 2^63-1). */
function uint(head: JsonObject, key: string, limit: bigint): bigint {
  const v = get(head, key);
  if (!(v instanceof JsonNumber) || v.exact === null) throw new WireError(`header key '${key}' has the wrong type`);
  if (v.exact < 0n || v.exact > limit) throw new WireError(`header key '${key}' out of range`);
  return v.exact;
}

function checkHeader(kind: TrainingMessage["kind"], head: JsonObject): void {
  const op = str(head, "op");
  if (!(OPS as readonly string[]).includes(op)) throw new WireError(`unknown op ${JSON.stringify(op.slice(0, 40))}`);
  for (const key of ["run", "job"]) if (!ID.test(str(head, key))) throw new WireError(`bad ${key} id`);
  uint(head, "round", 0xffffffffn);
  if (kind === "command") {
    uint(head, "seed", MAX_SEED);
    uint(head, "deadline_ms", MAX_SEED);
    if (!(get(head, "config") instanceof Map)) throw new WireError("header key 'config' has the wrong type");
    const upload = get(head, "upload");
    if (!Array.isArray(upload)) throw new WireError("header key 'upload' has the wrong type");
    if (upload.length > MAX_TENSORS || new Set(upload.map(String)).size !== upload.length) {
      throw new WireError("upload: at most 1024 distinct names");
    }
    upload.forEach(checkName);
    return;
  }
  const status = str(head, "status");
  if (!(STATUSES as readonly string[]).includes(status)) throw new WireError(`unknown status ${JSON.stringify(status.slice(0, 40))}`);
  uint(head, "num_examples", 0xffffffffn);
  const metrics = get(head, "metrics");
  if (!(metrics instanceof Map)) throw new WireError("header key 'metrics' has the wrong type");
  for (const [name, v] of metrics) {
    if (!(v instanceof JsonNumber) || !Number.isFinite(v.value)) throw new WireError(`metric ${JSON.stringify(name.slice(0, 40))} must be a finite number`);
  }
  if (utf8(str(head, "error")).length > MAX_ERROR) throw new WireError(`error longer than ${MAX_ERROR} bytes`);
}

/** Parse one COMMAND or RESULT frame (any version >= 2 whose layout is §16.2's). */
export function decodeTraining(payload: Uint8Array): TrainingMessage {
  if (payload.length > MAX_MESSAGE) throw new WireError("payload too large");
  const r = new Reader(payload);
  r.need(4, "header");
  const magic = r.take(2, "header");
  if (magic[0] !== MAGIC[0] || magic[1] !== MAGIC[1]) throw new WireError("bad magic");
  const version = r.u8("header");
  if (version !== TRAINING_VERSION) throw new WireError(`unsupported protocol version ${version} for a training frame`);
  const code = r.u8("header");
  const kind = code === KIND_CODES.command ? "command" : code === KIND_CODES.result ? "result" : null;
  if (kind === null) throw new WireError(`unknown message kind ${code}`);
  const taskId = r.take(16, "header").slice();
  const length = r.u32("header");
  if (length > MAX_HEADER) throw new WireError(`header longer than ${MAX_HEADER} bytes`);
  const text = strictUtf8(r.take(length, "header"), "header");
  let head: Json;
  try {
    head = parseJson(text);
  } catch (e) {
    if (e instanceof JsonError) throw new WireError(`header is not JSON: ${e.message}`);
    throw e;
  }
  if (!(head instanceof Map)) throw new WireError("header must be a JSON object");
  checkHeader(kind, head);
  const count = r.u16("tensor count");
  if (count > MAX_TENSORS) throw new WireError(`more than ${MAX_TENSORS} tensors`);
  const tensors = new Map<string, Tensor>();
  for (let i = 0; i < count; i++) {
    const name = checkName(strictUtf8(r.take(r.u8("tensor name"), "tensor name"), "tensor name"));
    if (tensors.has(name)) throw new WireError(`duplicate tensor ${JSON.stringify(name)}`);
    const t = readTensor(r, FP32_ONLY, false, MAX_MESSAGE);
    tensors.set(name, { shape: t.shape, data: t.data });
  }
  r.end();
  const common = { taskId, op: str(head, "op") as Op, run: str(head, "run"), job: str(head, "job"),
    round: Number(uint(head, "round", 0xffffffffn)), tensors };
  if (kind === "command") {
    return { kind, ...common, seed: uint(head, "seed", MAX_SEED), deadlineMs: uint(head, "deadline_ms", MAX_SEED),
      config: head.get("config") as JsonObject, upload: (head.get("upload") as Json[]).map(String) };
  }
  const metrics = new Map([...(head.get("metrics") as JsonObject)].map(([k, v]) => [k, (v as JsonNumber).value]));
  return { kind, ...common, status: str(head, "status") as Status, numExamples: Number(uint(head, "num_examples", 0xffffffffn)),
    metrics, error: str(head, "error") };
}

function exactInteger(v: bigint): JsonNumber {
  return new JsonNumber(Number(v), true, v);
}

/** The frame of `msg` (possibly larger than one MQTT message: see chunks.ts `splitMessage`). */
export function encodeTraining(msg: TrainingMessage): Uint8Array {
  if (msg.taskId.length !== 16) throw new WireError("task id must be 16 bytes");
  const head: JsonObject = new Map<string, Json>([["op", msg.op], ["run", msg.run], ["job", msg.job],
    ["round", new JsonNumber(msg.round, true)]]);
  if (msg.kind === "command") {
    head.set("seed", exactInteger(msg.seed)).set("deadline_ms", exactInteger(msg.deadlineMs)).set("config", msg.config)
      .set("upload", [...msg.upload]);
  } else {
    head.set("status", msg.status).set("num_examples", new JsonNumber(msg.numExamples, true))
      .set("metrics", new Map([...msg.metrics].map(([k, v]) => [k, new JsonNumber(v, false)]))).set("error", msg.error);
  }
  checkHeader(msg.kind, head);
  let text: string;
  try {
    text = pythonJson(head);
  } catch (e) {
    if (e instanceof JsonError) throw new WireError(`header is not JSON-serializable: ${e.message}`);
    throw e;
  }
  const raw = utf8(text);
  if (raw.length > MAX_HEADER) throw new WireError(`header larger than ${MAX_HEADER} bytes`);
  if (msg.tensors.size > MAX_TENSORS) throw new WireError(`more than ${MAX_TENSORS} tensors`);
  const w = new Writer().u8(MAGIC[0]).u8(MAGIC[1]).u8(TRAINING_VERSION).u8(KIND_CODES[msg.kind]).bytes(msg.taskId)
    .u32(raw.length).bytes(raw).u16(msg.tensors.size);
  for (const name of [...msg.tensors.keys()].sort()) {
    const b = utf8(checkName(name));
    w.u8(b.length).bytes(b);
    writeTensor(w, msg.tensors.get(name)!, "fp32", MAX_MESSAGE);
  }
  const out = w.finish();
  if (out.length > MAX_MESSAGE) throw new WireError("frame larger than MAX_MESSAGE");
  return out;
}
