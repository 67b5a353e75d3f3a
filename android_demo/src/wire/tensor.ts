/**
 * The tensor encoding of docs/protocol.md §6: dtype, ndim, dims, (int8: scale, zero point), data.
 *
 * Each dtype is one entry of `DTYPES`; a protocol version lists the dtype codes it accepts
 * (`V1_DTYPES`), so a new version adds an entry and a set, not a new decoder.
 */
import { type Reader, WireError, type Writer } from "./bytes.js";

export const MAX_PAYLOAD = 1048576;
export const MAX_DIMS = 4;

/** How a tensor travels: the latent encodings of §6.1 (a later version may add more). */
export type Encoding = "fp32" | "fp16" | "int8";
export const ENCODINGS: readonly Encoding[] = ["fp32", "fp16", "int8"];

/** A float32 tensor, row-major, batch first. */
export interface Tensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** A decoded tensor: float32 values (fp16 widened, int8 dequantized) and how it was sent. */
export interface WireTensor extends Tensor {
  readonly encoding: Encoding;
}

interface DType {
  readonly code: number;
  readonly encoding: Encoding;
  readonly itemsize: number;
  /** Read `count` elements (and any per-tensor parameters already read into `params`). */
  readonly read: (bytes: Uint8Array, count: number, params: Int8Params | null) => Float32Array;
  /** Write the data (and per-tensor parameters before it). */
  readonly write: (w: Writer, data: Float32Array) => void;
  readonly hasParams: boolean;
}

interface Int8Params {
  readonly scale: number;
  readonly zeroPoint: number;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** IEEE half bits -> the float32 value (exact). */
export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1024 + mant) * 2 ** (exp - 25);
}

/** A float32 value -> IEEE half bits, rounded to nearest even (overflow gives infinity). */
export function floatToHalf(v: number): number {
  f32[0] = v;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 112; // rebias 127 -> 15
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 2 ** (shift - 1);
    let h = Math.floor(mant / 2 ** shift);
    const rem = mant - h * 2 ** shift;
    if (rem > half || (rem === half && h & 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
  return sign | h;
}

/** Round half to even (numpy `rint`, Java `Math.rint`). */
export function rint(v: number): number {
  const f = Math.floor(v);
  const d = v - f;
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

const clampI8 = (v: number): number => Math.min(127, Math.max(-128, v));

/** §6.2: asymmetric per-tensor quantization over the range extended to 0, in float64. */
export function quantizeInt8(data: Float32Array): { scale: number; zeroPoint: number; q: Int8Array } {
  let lo = 0;
  let hi = 0;
  for (const x of data) {
    if (x < lo) lo = x;
    if (x > hi) hi = x;
  }
  let scale = Math.fround((hi - lo) / 255);
  if (scale === 0) scale = 1.0;
  const zeroPoint = clampI8(rint(-128 - lo / scale));
  const q = new Int8Array(data.length);
  for (let i = 0; i < data.length; i++) q[i] = clampI8(rint(data[i]! / scale) + zeroPoint);
  return { scale, zeroPoint, q };
}

/** real = float32(scale) * float32(q - zero_point), one float32 multiplication. */
export function dequantizeInt8(q: Int8Array, scale: number, zeroPoint: number): Float32Array {
  const out = new Float32Array(q.length);
  for (let i = 0; i < q.length; i++) out[i] = Math.fround(scale * (q[i]! - zeroPoint));
  return out;
}

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

const FP32: DType = {
  code: 1, encoding: "fp32", itemsize: 4, hasParams: false,
  read: (bytes, count) => {
    const v = view(bytes);
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) out[i] = v.getFloat32(4 * i, true);
    return out;
  },
  write: (w, data) => {
    for (const x of data) w.f32(x);
  },
};

const FP16: DType = {
  code: 2, encoding: "fp16", itemsize: 2, hasParams: false,
  read: (bytes, count) => {
    const v = view(bytes);
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) out[i] = halfToFloat(v.getUint16(2 * i, true));
    return out;
  },
  write: (w, data) => {
    for (const x of data) {
      const h = floatToHalf(x);
      if ((h & 0x7c00) === 0x7c00) throw new WireError(`value ${x} does not fit float16 (beyond ±65504)`);
      w.u16(h);
    }
  },
};

const INT8: DType = {
  code: 3, encoding: "int8", itemsize: 1, hasParams: true,
  read: (bytes, count, params) => {
    const q = new Int8Array(bytes.buffer, bytes.byteOffset, count);
    return dequantizeInt8(q, params!.scale, params!.zeroPoint);
  },
  write: (w, data) => {
    const { scale, zeroPoint, q } = quantizeInt8(data);
    w.f32(scale).i8(zeroPoint);
    for (const v of q) w.i8(v);
  },
};

/** Every dtype any version knows, by wire code. */
const DTYPES: ReadonlyMap<number, DType> = new Map([FP32, FP16, INT8].map((d) => [d.code, d]));
/** The dtype codes protocol version 1 accepts. */
export const V1_DTYPES: ReadonlySet<number> = new Set([1, 2, 3]);

function dtypeOf(encoding: Encoding): DType {
  for (const d of DTYPES.values()) if (d.encoding === encoding) return d;
  throw new WireError(`unknown encoding ${encoding}`);
}

/** Number of elements, or WireError when ndim, a dim or the byte size (at most `maxBytes`) breaks §6. */
function checkedSize(shape: readonly number[], itemsize: number, maxBytes: number): number {
  if (shape.length < 1 || shape.length > MAX_DIMS) throw new WireError(`bad tensor ndim ${shape.length}`);
  let bytes = itemsize;
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 1) throw new WireError("tensor dims must be >= 1");
    bytes *= d; // dims are < 2^32 and bytes <= 2^26 before this: below 2^58, exact enough to compare
    if (bytes > maxBytes) throw new WireError("tensor too large");
  }
  return bytes / itemsize;
}

/** Append `tensor` in `encoding`; WireError for a shape or value the encoding cannot carry (data
 * larger than `maxBytes`: MAX_PAYLOAD, or more inside a training frame, §16.2). */
export function writeTensor(w: Writer, tensor: Tensor, encoding: Encoding, maxBytes = MAX_PAYLOAD): void {
  const dtype = dtypeOf(encoding);
  const count = checkedSize(tensor.shape, dtype.itemsize, maxBytes);
  if (count !== tensor.data.length) throw new WireError(`tensor data has ${tensor.data.length} values, shape says ${count}`);
  for (const x of tensor.data) if (!Number.isFinite(x)) throw new WireError("non-finite value in tensor");
  w.u8(dtype.code).u8(tensor.shape.length);
  for (const d of tensor.shape) w.u32(d);
  dtype.write(w, tensor.data);
}

/** Read a tensor of one of the `allowed` dtype codes; it must end the frame unless `last` is false
 * (the named tensors of a training frame, whose data may reach `maxBytes`, §16.2). */
export function readTensor(r: Reader, allowed: ReadonlySet<number>, last = true, maxBytes = MAX_PAYLOAD): WireTensor {
  const code = r.u8("tensor header");
  const dtype = DTYPES.get(code);
  if (dtype === undefined || !allowed.has(code)) throw new WireError(`unknown tensor dtype ${code}`);
  const ndim = r.u8("tensor header");
  if (ndim < 1 || ndim > MAX_DIMS) throw new WireError(`bad tensor ndim ${ndim}`);
  const shape: number[] = [];
  for (let i = 0; i < ndim; i++) shape.push(r.u32("tensor dims"));
  const count = checkedSize(shape, dtype.itemsize, maxBytes);
  let params: Int8Params | null = null;
  if (dtype.hasParams) {
    r.need(5, "int8 parameters");
    const scale = r.f32("int8 parameters");
    const zeroPoint = r.i8("int8 parameters");
    if (!(Number.isFinite(scale) && scale > 0)) throw new WireError("int8 scale must be finite and > 0");
    params = { scale, zeroPoint };
  }
  const raw = r.take(count * dtype.itemsize, "tensor data");
  if (last) r.end();
  const data = dtype.read(raw, count, params);
  for (const x of data) if (!Number.isFinite(x)) throw new WireError("non-finite value in tensor");
  return { shape, data, encoding: dtype.encoding };
}
