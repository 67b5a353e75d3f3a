/**
 * The training golden vectors (tests/vectors/training/, docs/protocol.md §16.6), platform-neutral:
 * every COMMAND and RESULT encoded from its fields and decoded to them byte for byte, every proper
 * prefix and every invalid vector rejected, the CHUNKs decoded, re-encoded, produced by splitting
 * command_fit and reassembled to it; plus deterministic mutations (decode or WireError, nothing else).
 */
import { fromHex, toHex } from "../src/wire/bytes.js";
import { CHUNK_HEADER, Reassembler, decodeChunk, encodeChunk, splitMessage } from "../src/wire/chunks.js";
import { type Json, JsonNumber, pythonJson, toJson } from "../src/wire/json.js";
import { type Op, type Status, type TrainingMessage, decodeTraining, encodeTraining } from "../src/wire/training.js";
import { type CheckResult, fuzzVectors, rejects } from "./vector_checks.js";

export interface TrainingVector {
  name: string;
  kind: "command" | "result" | "chunk";
  fields: Record<string, unknown>;
  hex: string;
}

export interface TrainingInvalid {
  name: string;
  decoder: "training" | "chunk";
  hex: string;
  reason: string;
}

interface TensorFields {
  shape: number[];
  values: unknown;
}

function flat(v: unknown): number[] {
  return Array.isArray(v) ? v.flatMap(flat) : [v as number];
}

function assert(ok: boolean, what: string): void {
  if (!ok) throw new Error(what);
}

/** The `fields` of a COMMAND or RESULT vector. */
interface MessageFields {
  task_id: string;
  op: Op;
  run: string;
  job: string;
  round: number;
  seed: number;
  deadline_ms: number;
  config: unknown;
  upload: string[];
  status: Status;
  num_examples: number;
  metrics: Record<string, number>;
  error: string;
  tensors: Record<string, TensorFields>;
}

/** The message a COMMAND or RESULT vector's fields describe. */
function messageOf(v: TrainingVector): TrainingMessage {
  const f = v.fields as unknown as MessageFields;
  const tensors = new Map(Object.entries(f.tensors).map(([k, t]) => [k, { shape: t.shape, data: Float32Array.from(flat(t.values)) }]));
  const common = { taskId: fromHex(f.task_id), op: f.op, run: f.run, job: f.job, round: f.round, tensors };
  if (v.kind === "command") {
    return { kind: "command", ...common, seed: BigInt(f.seed), deadlineMs: BigInt(f.deadline_ms),
      config: toJson(f.config) as Map<string, Json>, upload: f.upload };
  }
  return { kind: "result", ...common, status: f.status, numExamples: f.num_examples, metrics: new Map(Object.entries(f.metrics)),
    error: f.error };
}

/** The decoded message as the vector's `fields` (tensors by name, values nested by shape). */
function fieldsOf(m: TrainingMessage): unknown {
  const nest = (data: number[], shape: number[]): unknown => {
    if (shape.length <= 1) return data;
    const step = data.length / shape[0]!;
    return Array.from({ length: shape[0]! }, (_, i) => nest(data.slice(i * step, (i + 1) * step), shape.slice(1)));
  };
  const tensors = Object.fromEntries([...m.tensors].sort(([a], [b]) => (a < b ? -1 : 1))
    .map(([k, t]) => [k, { shape: [...t.shape], values: nest([...t.data], [...t.shape]) }]));
  const common = { task_id: toHex(m.taskId), op: m.op, run: m.run, job: m.job, round: m.round };
  if (m.kind === "command") {
    return { ...common, seed: Number(m.seed), deadline_ms: Number(m.deadlineMs), config: plain(m.config),
      upload: [...m.upload], tensors };
  }
  return { ...common, status: m.status, num_examples: m.numExamples, metrics: Object.fromEntries(m.metrics),
    error: m.error, tensors };
}

function plain(v: Json): unknown {
  if (v instanceof Map) return Object.fromEntries([...v].map(([k, x]) => [k, plain(x)]));
  if (Array.isArray(v)) return v.map(plain);
  return v !== null && typeof v === "object" ? v.value : v;
}

/** Deep equality with object keys in any order. */
function same(a: unknown, b: unknown): boolean {
  if (Array.isArray(a) && Array.isArray(b)) return a.length === b.length && a.every((x, i) => same(x, b[i]));
  if (a !== null && b !== null && typeof a === "object" && typeof b === "object") {
    const ka = Object.keys(a).sort();
    const kb = Object.keys(b).sort();
    return same(ka, kb) && ka.every((k) => same((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]));
  }
  return a === b;
}

/** Every check of the training vectors. */
export async function runTrainingChecks(valid: TrainingVector[], invalid: TrainingInvalid[]): Promise<CheckResult[]> {
  const results: CheckResult[] = [];
  const check = async (name: string, body: () => void | Promise<void>): Promise<void> => {
    try {
      await body();
      results.push({ name, error: null });
    } catch (e) {
      results.push({ name, error: e instanceof Error ? e.message : String(e) });
    }
  };
  const decoderOf = (kind: string) => (kind === "chunk" ? decodeChunk : decodeTraining);
  for (const v of valid) {
    const bytes = fromHex(v.hex);
    if (v.kind === "chunk") {
      await check(`training ${v.name}: decode to fields, re-encode`, () => {
        const c = decodeChunk(bytes);
        const got = { transfer_id: toHex(c.transferId), index: c.index, count: c.count, offset: c.offset, total: c.total,
          sha256: toHex(c.digest), data: toHex(c.data) };
        assert(same(got, v.fields), `decoded ${JSON.stringify(got)}`);
        assert(toHex(encodeChunk(c)) === v.hex, "re-encoded");
      });
    } else {
      await check(`training ${v.name}: encode from fields`, () => {
        const got = toHex(encodeTraining(messageOf(v)));
        assert(got === v.hex, `encoded ${got}`);
      });
      await check(`training ${v.name}: decode to fields, re-encode`, () => {
        const d = decodeTraining(bytes);
        assert(d.kind === v.kind, `kind ${d.kind}`);
        assert(same(fieldsOf(d), v.fields), `decoded ${JSON.stringify(fieldsOf(d))}`);
        assert(toHex(encodeTraining(d)) === v.hex, "re-encoded");
      });
    }
    await check(`training ${v.name}: every proper prefix rejected`, () => {
      // a CHUNK's slice length is not in its header: a prefix with 1+ data bytes is a chunk (the digest catches it)
      const end = v.kind === "chunk" ? CHUNK_HEADER + 1 : bytes.length;
      for (let n = 0; n < end; n++) {
        const why = rejects(() => decoderOf(v.kind)(bytes.subarray(0, n)));
        assert(why === null, `prefix of ${n} bytes: ${why}`);
      }
    });
  }
  for (const v of invalid) {
    await check(`training invalid ${v.name} (${v.reason})`, () => {
      const why = rejects(() => decoderOf(v.decoder)(fromHex(v.hex)));
      assert(why === null, why ?? "");
    });
  }
  const fit = valid.find((v) => v.name === "command_fit")!;
  const chunks = valid.filter((v) => v.kind === "chunk").sort((a, b) => (a.fields["index"] as number) - (b.fields["index"] as number));
  await check("training chunks: command_fit split under 100 bytes gives the chunk vectors", async () => {
    const frames = await splitMessage(fromHex(fit.hex), fromHex(fit.fields["task_id"] as string), 100);
    assert(same(frames.map(toHex), chunks.map((c) => c.hex)), `split into ${frames.length} other frames`);
  });
  await check("training chunks: reassembled in any order, duplicates ignored, to command_fit", async () => {
    const r = new Reassembler();
    const order = [...chunks].reverse();
    let message: Uint8Array | null = null;
    for (const c of [...order, order[0]!]) message = (await r.add("coordinator", decodeChunk(fromHex(c.hex)))) ?? message;
    assert(message !== null && toHex(message) === fit.hex, "not reassembled to command_fit");
    assert(r.counters.get("duplicates") === 1 && r.counters.get("completed") === 1 && r.pending() === 0, "counters");
  });
  await check("training chunks: a changed byte fails the digest, a conflicting chunk is dropped", async () => {
    const r = new Reassembler();
    const parts = chunks.map((c) => decodeChunk(fromHex(c.hex)));
    const bad = parts.map((c, i) => (i === 2 ? { ...c, data: c.data.map((b, j) => (j === 0 ? b ^ 1 : b)) } : c));
    for (const c of bad) assert((await r.add("coordinator", c)) === null, "a corrupted message handed over");
    assert(r.counters.get("bad_digest") === 1, "bad_digest not counted");
    const r2 = new Reassembler();
    await r2.add("coordinator", parts[0]!);
    await r2.add("coordinator", { ...parts[1]!, total: parts[1]!.total + 1 });
    assert(r2.counters.get("conflicting") === 1 && r2.pending() === 1, "conflicting chunk not dropped");
  });
  await check("training: the header JSON is spelled as Python's json.dumps (sorted, ASCII, float repr)", () => {
    const v = toJson({ b: [1e-5, 0.5, 1.0, 1e16, 1e15, 123456789012345680, 0.0001, -2.5e-7, 3], a: "\u00e9\u007f\n\u{1f600}" });
    const floats = (v as Map<string, Json>).get("b") as JsonNumber[];
    const spelled = new Map<string, Json>([["a", (v as Map<string, Json>).get("a")!],
      ["b", floats.map((x, i) => (i === 8 ? x : new JsonNumber(x.value, false)))]]);
    const want = '{"a":"\\u00e9\\u007f\\n\\ud83d\\ude00","b":[1e-05,0.5,1.0,1e+16,1000000000000000.0,1.2345678901234568e+17,0.0001,-2.5e-07,3]}';
    assert(pythonJson(spelled) === want, pythonJson(spelled));
  });
  await check("training: the header keeps 63-bit seeds exact and rejects 2^63", () => {
    const m = messageOf(fit) as Extract<TrainingMessage, { kind: "command" }>;
    const big = { ...m, seed: (1n << 63n) - 1n };
    assert((decodeTraining(encodeTraining(big)) as typeof m).seed === big.seed, "seed changed");
    assert(rejects(() => encodeTraining({ ...m, seed: 1n << 63n })) === null, "seed 2^63 encoded");
  });
  return results;
}

/** Deterministic mutations of every training vector: decode (and re-encode) or WireError only. */
export function runTrainingFuzz(valid: TrainingVector[], rounds: number, seed = 7): CheckResult[] {
  return fuzzVectors("training fuzz", valid, rounds, seed, (v, mutated) => {
    if (v.kind === "chunk") decodeChunk(mutated);
    else encodeTraining(decodeTraining(mutated));
  });
}
