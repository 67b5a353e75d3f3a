/**
 * REQUEST / RESPONSE / ERROR frames (docs/protocol.md §5, §9, §10, §12).
 *
 * Bytes 0..19 (magic, version, kind, correlation id) are the same in every version; the body
 * layout is looked up by version in `BODIES`. Version 1 is the only one defined today; adding one
 * is a new `Bodies` entry (and its dtype set), the header code stays.
 */
import { Reader, WireError, Writer, strictUtf8, utf8 } from "./bytes.js";
import { type Encoding, type Tensor, V1_DTYPES, type WireTensor, readTensor, writeTensor } from "./tensor.js";

export const MAGIC = [0x4e, 0x4d] as const;
export const PROTOCOL_VERSION = 1;
export const HEADER_BYTES = 20;
export const MAX_TEXT = 1024;
export const MAX_DEADLINE_AHEAD_MS = 60000;
const MAX_DEADLINE = 1n << 63n;

export enum ErrorCode {
  BUSY = 1,
  BAD_REQUEST = 2,
  WRONG_MODEL_VERSION = 3,
  DEADLINE_EXCEEDED = 4,
  UNKNOWN_EXPERT = 5,
  INTERNAL = 6,
}

/** `BUSY` -> `busy`: the counter and `missing` name of a code, as the Python agent writes them. */
export function errorName(code: ErrorCode): string {
  return ErrorCode[code].toLowerCase();
}

interface Header {
  readonly version: number;
  readonly correlationId: Uint8Array; // 16 bytes
}

/** What a requester asks: the expert, until when, for which model, where to answer, the input. */
export interface Request extends Header {
  readonly kind: "request";
  readonly expertId: number;
  readonly deadlineMs: bigint;
  readonly modelVersion: string;
  readonly replyTopic: string;
  readonly tensor: WireTensor;
}

export interface Response extends Header {
  readonly kind: "response";
  readonly expertId: number;
  readonly computeUs: number;
  readonly probs: Tensor; // float32 [N, C]
}

export interface ErrorReply extends Header {
  readonly kind: "error";
  readonly code: ErrorCode;
  readonly expertId: number;
  readonly message: string;
}

export type Frame = Request | Response | ErrorReply;

/** A request to encode: its tensor is sent in `encoding`. */
export type RequestOut = Omit<Request, "tensor" | "version"> & { readonly tensor: Tensor; readonly encoding: Encoding;
  readonly version?: number };
export type FrameOut = RequestOut | (Omit<Response, "version"> & { readonly version?: number })
  | (Omit<ErrorReply, "version"> & { readonly version?: number });

/** A request's route, readable up to its tensor: what a server needs to answer BAD_REQUEST (§10). */
export interface Route {
  readonly version: number;
  readonly correlationId: Uint8Array;
  readonly expertId: number;
  readonly deadlineMs: bigint;
  readonly modelVersion: string;
  readonly replyTopic: string;
}

const KIND_CODES = { request: 1, response: 2, error: 3 } as const;

/** Body codec of one protocol version. */
interface Bodies {
  readonly dtypes: ReadonlySet<number>;
}

const BODIES: ReadonlyMap<number, Bodies> = new Map([[1, { dtypes: V1_DTYPES }]]);

function readString(r: Reader, length: number, what: string): string {
  return strictUtf8(r.take(length, what), what);
}

function readRoute(r: Reader, header: Header): Route {
  const expertId = r.u16("request header");
  const deadlineMs = r.u64("request header");
  const m = r.u8("request header");
  if (deadlineMs >= MAX_DEADLINE) throw new WireError("deadline_ms out of range");
  if (m === 0) throw new WireError("model version must be 1..255 bytes");
  const modelVersion = readString(r, m, "model version");
  const n = r.u8("reply topic length");
  if (n === 0) throw new WireError("reply topic must be 1..255 bytes");
  const replyTopic = readString(r, n, "reply topic");
  if (/[+#\u0000]/.test(replyTopic)) throw new WireError("reply topic contains a wildcard or NUL");
  return { ...header, expertId, deadlineMs, modelVersion, replyTopic };
}

function readHeader(r: Reader): { header: Header; kind: number; bodies: Bodies } {
  r.need(HEADER_BYTES, "header");
  const magic = r.take(2, "header");
  if (magic[0] !== MAGIC[0] || magic[1] !== MAGIC[1]) throw new WireError("bad magic");
  const version = r.u8("header");
  const bodies = BODIES.get(version);
  if (bodies === undefined) throw new WireError(`unsupported protocol version ${version}`);
  const kind = r.u8("header");
  if (kind < 1 || kind > 3) throw new WireError(`unknown message kind ${kind}`);
  const correlationId = r.take(16, "header").slice();
  return { header: { version, correlationId }, kind, bodies };
}

/** Decode one frame; WireError (naming the broken rule) for anything invalid. */
export function decodeFrame(payload: Uint8Array): Frame {
  const r = new Reader(payload);
  const { header, kind, bodies } = readHeader(r);
  if (kind === KIND_CODES.request) {
    const route = readRoute(r, header);
    return { kind: "request", ...route, tensor: readTensor(r, bodies.dtypes) };
  }
  if (kind === KIND_CODES.response) {
    r.need(6, "response header");
    const expertId = r.u16("response header");
    const computeUs = r.u32("response header");
    const probs = readTensor(r, bodies.dtypes);
    if (probs.encoding !== "fp32" || probs.shape.length !== 2) throw new WireError("response probs must be fp32 [N, C]");
    return { kind: "response", ...header, expertId, computeUs, probs: { shape: probs.shape, data: probs.data } };
  }
  r.need(5, "error header");
  const code = r.u8("error header");
  if (ErrorCode[code] === undefined) throw new WireError(`unknown error code ${code}`);
  const expertId = r.u16("error header");
  const length = r.u16("error header");
  if (length > MAX_TEXT) throw new WireError(`error message longer than ${MAX_TEXT} bytes`);
  const message = readString(r, length, "error message");
  r.end();
  return { kind: "error", ...header, code: code as ErrorCode, expertId, message };
}

/** The route of a request whose header is readable up to its tensor (§10), else null. */
export function peekRequestRoute(payload: Uint8Array): Route | null {
  try {
    const r = new Reader(payload);
    const { header, kind } = readHeader(r);
    return kind === KIND_CODES.request ? readRoute(r, header) : null;
  } catch (e) {
    if (e instanceof WireError) return null;
    throw e;
  }
}

function checkU16(v: number, what: string): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new WireError(`${what} out of range: ${v}`);
}

function writeString(w: Writer, text: string, what: string, max: number, min: number): void {
  const b = utf8(text);
  if (b.length < min || b.length > max) throw new WireError(`${what} must be ${min}..${max} bytes`);
  w.bytes(b);
}

/** Encode one frame (version 1 unless `msg.version` says otherwise); WireError for what §5 forbids. */
export function encodeFrame(msg: FrameOut): Uint8Array {
  const version = msg.version ?? PROTOCOL_VERSION;
  if (!BODIES.has(version)) throw new WireError(`unsupported protocol version ${version}`);
  if (msg.correlationId.length !== 16) throw new WireError("correlation id must be 16 bytes");
  const w = new Writer().u8(MAGIC[0]).u8(MAGIC[1]).u8(version).u8(KIND_CODES[msg.kind]).bytes(msg.correlationId);
  checkU16(msg.expertId, "expert_id");
  if (msg.kind === "request") {
    if (msg.deadlineMs < 0n || msg.deadlineMs >= MAX_DEADLINE) throw new WireError("deadline_ms out of range");
    if (/[+#\u0000]/.test(msg.replyTopic)) throw new WireError("reply topic contains a wildcard or NUL");
    w.u16(msg.expertId).u64(msg.deadlineMs);
    const model = utf8(msg.modelVersion);
    const reply = utf8(msg.replyTopic);
    if (model.length < 1 || model.length > 255) throw new WireError("model version must be 1..255 bytes");
    if (reply.length < 1 || reply.length > 255) throw new WireError("reply topic must be 1..255 bytes");
    w.u8(model.length).bytes(model).u8(reply.length).bytes(reply);
    writeTensor(w, msg.tensor, msg.encoding);
  } else if (msg.kind === "response") {
    if (!Number.isInteger(msg.computeUs) || msg.computeUs < 0 || msg.computeUs > 0xffffffff) {
      throw new WireError(`compute_us out of range: ${msg.computeUs}`);
    }
    if (msg.probs.shape.length !== 2) throw new WireError("response probs must be fp32 [N, C]");
    w.u16(msg.expertId).u32(msg.computeUs);
    writeTensor(w, msg.probs, "fp32");
  } else {
    if (ErrorCode[msg.code] === undefined) throw new WireError(`unknown error code ${msg.code}`);
    const text = utf8(msg.message);
    if (text.length > MAX_TEXT) throw new WireError(`error message longer than ${MAX_TEXT} bytes`);
    w.u8(msg.code).u16(msg.expertId).u16(text.length).bytes(text);
  }
  const out = w.finish();
  if (out.length > 1048576) throw new WireError("frame larger than MAX_PAYLOAD");
  return out;
}

/** §7: DEADLINE_EXCEEDED when passed, BAD_REQUEST when more than 60 s ahead, else null. */
export function deadlineError(deadlineMs: bigint, nowMs: number): ErrorCode | null {
  const now = BigInt(Math.floor(nowMs));
  if (now > deadlineMs) return ErrorCode.DEADLINE_EXCEEDED;
  if (deadlineMs - now > BigInt(MAX_DEADLINE_AHEAD_MS)) return ErrorCode.BAD_REQUEST;
  return null;
}

/** A new correlation id from the platform's cryptographically secure generator. */
export function newCorrelationId(): Uint8Array {
  return crypto.getRandomValues(new Uint8Array(16));
}

/** Cut `text` to at most `max` UTF-8 bytes without splitting a character. */
export function truncateUtf8(text: string, max: number = MAX_TEXT): string {
  let out = "";
  let bytes = 0;
  for (const ch of text) {
    const n = utf8(ch).length;
    if (bytes + n > max) break;
    out += ch;
    bytes += n;
  }
  return out;
}
