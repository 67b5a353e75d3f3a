/**
 * The golden-vector checks of tests/vectors/README.md, platform-neutral: Node's test runner and the
 * Chromium page (scripts/browser-tests.mjs) run the same function on the same files.
 */
import { WireError, fromHex, toHex } from "../src/wire/bytes.js";
import { ErrorCode, type Frame, type FrameOut, decodeFrame, encodeFrame, peekRequestRoute } from "../src/wire/frames.js";
import { parseJson } from "../src/wire/json.js";
import { type Presence, decodePresence, encodePresence } from "../src/wire/presence.js";
import { type Encoding, quantizeInt8 } from "../src/wire/tensor.js";

/** One vector file as JSON (`name`, `kind`, `fields`, `hex`). */
export interface Vector {
  name: string;
  kind: "request" | "response" | "error" | "presence";
  fields: Record<string, unknown>;
  hex: string;
}

export interface InvalidVector {
  name: string;
  decoder: "frame" | "presence";
  hex: string;
  reason: string;
}

/** A named check and its failure (null when it passed). */
export interface CheckResult {
  name: string;
  error: string | null;
}

interface TensorFields {
  dtype: string;
  shape: number[];
  values: unknown;
  scale?: number;
  zero_point?: number;
  q?: unknown;
  dequantized?: unknown;
}

/** The `fields` of a frame vector. */
interface FrameFields {
  correlation_id: string;
  expert_id: number;
  deadline_ms: number;
  model_version: string;
  reply_topic: string;
  encoding: Encoding;
  latent: TensorFields;
  compute_us: number;
  probs: TensorFields;
  code: number;
  code_name: string;
  message: string;
}

const ENCODING_OF: Record<string, Encoding> = { float32: "fp32", float16: "fp16", int8: "int8" };

function flat(v: unknown): number[] {
  return Array.isArray(v) ? v.flatMap(flat) : [v as number];
}

function f32(values: unknown): Float32Array {
  return Float32Array.from(flat(values));
}

function sameBits(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  return x.every((v, i) => v === y[i]);
}

function assert(ok: boolean, what: string): void {
  if (!ok) throw new Error(what);
}

/** The message a vector's `fields` describe, ready to encode. */
export function messageOf(v: Vector): FrameOut {
  const f = v.fields as unknown as FrameFields;
  const correlationId = fromHex(f.correlation_id);
  if (v.kind === "request") {
    const t = f.latent;
    return { kind: "request", correlationId, expertId: f.expert_id, deadlineMs: BigInt(f.deadline_ms),
      modelVersion: f.model_version, replyTopic: f.reply_topic, encoding: f.encoding,
      tensor: { shape: t.shape, data: f32(t.values) } };
  }
  if (v.kind === "response") {
    const t = f.probs;
    return { kind: "response", correlationId, expertId: f.expert_id, computeUs: f.compute_us,
      probs: { shape: t.shape, data: f32(t.values) } };
  }
  return { kind: "error", correlationId, expertId: f.expert_id, code: f.code as ErrorCode, message: f.message };
}

function checkDecoded(v: Vector, d: Frame): void {
  const f = v.fields as unknown as FrameFields;
  assert(d.kind === v.kind, `decoded kind ${d.kind}`);
  assert(toHex(d.correlationId) === f.correlation_id, "correlation id");
  assert(d.expertId === f.expert_id, "expert id");
  if (d.kind === "request") {
    const t = f.latent;
    assert(d.deadlineMs === BigInt(f.deadline_ms), "deadline_ms");
    assert(d.modelVersion === f.model_version && d.replyTopic === f.reply_topic, "model version / reply topic");
    assert(d.tensor.encoding === f.encoding && d.tensor.encoding === ENCODING_OF[t.dtype], "encoding");
    assert(JSON.stringify(d.tensor.shape) === JSON.stringify(t.shape), "shape");
    assert(sameBits(d.tensor.data, f32(t.dtype === "int8" ? t.dequantized : t.values)), "tensor values (bit for bit)");
    const route = peekRequestRoute(fromHex(v.hex));
    assert(route !== null && route.replyTopic === d.replyTopic && route.expertId === d.expertId, "peekRequestRoute");
  } else if (d.kind === "response") {
    const t = f.probs;
    assert(d.computeUs === f.compute_us, "compute_us");
    assert(JSON.stringify(d.probs.shape) === JSON.stringify(t.shape), "shape");
    assert(sameBits(d.probs.data, f32(t.values)), "probs (bit for bit)");
    assert(peekRequestRoute(fromHex(v.hex)) === null, "peekRequestRoute of a response");
  } else {
    assert(d.code === f.code && ErrorCode[d.code] === f.code_name, "code");
    assert(d.message === f.message, "message");
  }
}

function checkInt8(v: Vector): void {
  const t = (v.fields as { latent?: TensorFields }).latent;
  if (t?.dtype !== "int8") return;
  const { scale, zeroPoint, q } = quantizeInt8(f32(t.values));
  assert(scale === t.scale && zeroPoint === t.zero_point, `scale/zero point ${scale}/${zeroPoint}`);
  assert(JSON.stringify([...q]) === JSON.stringify(flat(t.q)), `q ${[...q]}`);
}

function checkPresence(v: Vector): void {
  const decoded = decodePresence(fromHex(v.hex));
  const back = encodePresence(decoded);
  assert(toHex(back) === v.hex, `re-encoded ${toHex(back)}`);
  const fields = v.fields as { status: string; device: string; expert: number; model: string; ts: number;
    caps: { runtimes: string[]; latent_encodings: Encoding[]; max_batch: number } };
  const built: Presence = fields.status === "online"
    ? { status: "online", device: fields.device, expert: fields.expert, model: fields.model, ts: fields.ts,
      caps: { runtimes: fields.caps.runtimes, latentEncodings: fields.caps.latent_encodings, maxBatch: fields.caps.max_batch } }
    : { status: "offline", device: fields.device, expert: fields.expert };
  assert(toHex(encodePresence(built)) === v.hex, "encoded from fields");
  const same = (a: unknown, b: unknown): boolean => JSON.stringify(a) === JSON.stringify(b);
  assert(decoded.status === built.status && decoded.device === built.device && decoded.expert === built.expert,
    "decoded status / device / expert");
  if (decoded.status === "online" && built.status === "online") {
    assert(decoded.model === built.model && decoded.ts === built.ts, "decoded model / ts");
    assert(same(decoded.caps, built.caps), "decoded caps");
  }
}

/** null when `decode` throws WireError, else what it did instead. */
export function rejects(decode: () => unknown): string | null {
  try {
    decode();
  } catch (e) {
    if (e instanceof WireError) return null;
    return `threw ${e instanceof Error ? e.name : typeof e} instead of WireError: ${e}`;
  }
  return "accepted";
}

/** Every check of the vectors README on `valid` and `invalid`, plus the oversized payloads it leaves to tests. */
export function runVectorChecks(valid: Vector[], invalid: InvalidVector[]): CheckResult[] {
  const results: CheckResult[] = [];
  const check = (name: string, body: () => void): void => {
    try {
      body();
      results.push({ name, error: null });
    } catch (e) {
      results.push({ name, error: e instanceof Error ? e.message : String(e) });
    }
  };
  for (const v of valid) {
    const bytes = fromHex(v.hex);
    if (v.kind === "presence") {
      check(`${v.name}: decode and re-encode canonically`, () => checkPresence(v));
    } else {
      check(`${v.name}: encode from fields`, () => {
        checkInt8(v);
        const got = toHex(encodeFrame(messageOf(v)));
        assert(got === v.hex, `encoded ${got}`);
      });
      check(`${v.name}: decode to fields`, () => checkDecoded(v, decodeFrame(bytes)));
    }
    check(`${v.name}: every proper prefix rejected`, () => {
      for (let n = 0; n < bytes.length; n++) {
        const prefix = bytes.subarray(0, n);
        const why = rejects(() => (v.kind === "presence" ? decodePresence(prefix) : decodeFrame(prefix)));
        assert(why === null, `prefix of ${n} bytes: ${why}`);
      }
    });
  }
  for (const v of invalid) {
    check(`invalid ${v.name} (${v.reason})`, () => {
      const bytes = fromHex(v.hex);
      const why = rejects(() => (v.decoder === "presence" ? decodePresence(bytes) : decodeFrame(bytes)));
      assert(why === null, why ?? "");
    });
  }
  check("frame larger than MAX_PAYLOAD rejected, and refused by the encoder", () => {
    const request = valid.find((v) => v.name === "request_fp32_1x4")!;
    const head = fromHex(request.hex).subarray(0, fromHex(request.hex).length - 2 - 8 - 16);
    const big = new Uint8Array(head.length + 2 + 8 + 4 * 262145);
    big.set(head);
    big.set([1, 2, 1, 0, 0, 0, 0x01, 0x00, 0x04, 0x00], head.length); // fp32 [1, 262145]
    assert(rejects(() => decodeFrame(big)) === null, "decoded a 1 MiB + 4 B tensor");
    const msg = messageOf(request);
    const tooBig = { ...msg, tensor: { shape: [1, 262145], data: new Float32Array(262145) } } as FrameOut;
    assert(rejects(() => encodeFrame(tooBig)) === null, "encoded a 1 MiB + 4 B tensor");
  });
  check("presence larger than MAX_PRESENCE rejected", () => {
    const online = valid.find((v) => v.name === "presence_online")!;
    const text = new TextDecoder().decode(fromHex(online.hex));
    const padded = new TextEncoder().encode(`${text.slice(0, -1)},"pad":"${"x".repeat(4096)}"}`);
    assert(rejects(() => decodePresence(padded)) === null, "accepted");
    assert(parseJson(new TextDecoder().decode(padded)) instanceof Map, "the padded presence is valid JSON");
  });
  return results;
}

/** `rounds` deterministic mutations (a byte set, a bit flipped, a truncation) of the vectors' payloads,
 * each given to `decode`, which may return or throw WireError, nothing else; the failures as one check. */
export function fuzzVectors<V extends { name: string; hex: string }>(name: string, valid: V[], rounds: number, seed: number,
  decode: (v: V, payload: Uint8Array) => void): CheckResult[] {
  let state = seed >>> 0;
  const rand = (n: number): number => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state % n;
  };
  const failures: string[] = [];
  for (let i = 0; i < rounds; i++) {
    const v = valid[rand(valid.length)]!;
    const bytes = fromHex(v.hex).slice();
    const kind = rand(3);
    if (kind === 0) bytes[rand(bytes.length)] = rand(256);
    else if (kind === 1) bytes[rand(bytes.length)]! ^= 1 << rand(8);
    try {
      decode(v, kind === 2 ? bytes.subarray(0, rand(bytes.length + 1)) : bytes);
    } catch (e) {
      if (!(e instanceof WireError)) failures.push(`${v.name} mutation ${i}: ${e}`);
    }
  }
  return [{ name: `${name}: ${rounds} mutations decode or raise WireError only`, error: failures.length ? failures.slice(0, 5).join("; ") : null }];
}

/** Deterministic mutations of every valid payload: decoders may accept or reject (WireError), never throw else. */
export function runFuzz(valid: Vector[], rounds: number, seed = 1): CheckResult[] {
  return fuzzVectors("fuzz", valid, rounds, seed, (v, mutated) => {
    const d = v.kind === "presence" ? decodePresence(mutated) : decodeFrame(mutated);
    if (v.kind !== "presence") peekRequestRoute(mutated);
    if ("kind" in d && d.kind === "response") encodeFrame(d);
  });
}
