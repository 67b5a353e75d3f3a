/**
 * Just enough of ZIP and numpy's .npy to read a zipped bundle and a bundle's samples.npz (stored or
 * deflated members, ZIP64 sizes as numpy writes them); every length is checked before it is used.
 */

export class ArchiveError extends Error {
  override name = "ArchiveError";
}

const MAX_MEMBERS = 1000;

function u16(v: DataView, o: number): number {
  if (o + 2 > v.byteLength) throw new ArchiveError("truncated zip");
  return v.getUint16(o, true);
}

function u32(v: DataView, o: number): number {
  if (o + 4 > v.byteLength) throw new ArchiveError("truncated zip");
  return v.getUint32(o, true);
}

function u64(v: DataView, o: number): number {
  if (o + 8 > v.byteLength) throw new ArchiveError("truncated zip");
  const n = v.getBigUint64(o, true);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new ArchiveError("zip member too large");
  return Number(n);
}

async function inflate(data: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([data as Uint8Array<ArrayBuffer>]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Every file of a zip archive by name (folders dropped; a common top folder is kept in the name). */
export async function readZip(bytes: Uint8Array): Promise<Map<string, Uint8Array>> {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let eocd = -1;
  for (let o = bytes.length - 22; o >= Math.max(0, bytes.length - 22 - 65535); o--) {
    if (u32(v, o) === 0x06054b50) {
      eocd = o;
      break;
    }
  }
  if (eocd < 0) throw new ArchiveError("not a zip archive (no end of central directory)");
  let count = u16(v, eocd + 10);
  let offset = u32(v, eocd + 16);
  if (offset === 0xffffffff || count === 0xffff) { // ZIP64 end of central directory
    const locator = eocd - 20;
    if (locator < 0 || u32(v, locator) !== 0x07064b50) throw new ArchiveError("bad ZIP64 locator");
    const end64 = u64(v, locator + 8);
    if (u32(v, end64) !== 0x06064b50) throw new ArchiveError("bad ZIP64 end of central directory");
    count = u64(v, end64 + 32);
    offset = u64(v, end64 + 48);
  }
  if (count > MAX_MEMBERS) throw new ArchiveError(`more than ${MAX_MEMBERS} files in the zip`);
  const files = new Map<string, Uint8Array>();
  for (let i = 0; i < count; i++) {
    if (u32(v, offset) !== 0x02014b50) throw new ArchiveError("bad central directory entry");
    const method = u16(v, offset + 10);
    let compressed = u32(v, offset + 20);
    let size = u32(v, offset + 24);
    const nameLength = u16(v, offset + 28);
    const extraLength = u16(v, offset + 30);
    const commentLength = u16(v, offset + 32);
    let local = u32(v, offset + 42);
    const name = new TextDecoder().decode(bytes.subarray(offset + 46, offset + 46 + nameLength));
    let e = offset + 46 + nameLength;
    const extraEnd = e + extraLength;
    while (e + 4 <= extraEnd) { // ZIP64 extra field: the sizes and offset that are 0xffffffff above
      const id = u16(v, e);
      const len = u16(v, e + 2);
      if (id === 0x0001) {
        let p = e + 4;
        if (size === 0xffffffff) { size = u64(v, p); p += 8; }
        if (compressed === 0xffffffff) { compressed = u64(v, p); p += 8; }
        if (local === 0xffffffff) local = u64(v, p);
      }
      e += 4 + len;
    }
    offset = extraEnd + commentLength;
    if (name.endsWith("/")) continue;
    if (u32(v, local) !== 0x04034b50) throw new ArchiveError(`${name}: bad local header`);
    const start = local + 30 + u16(v, local + 26) + u16(v, local + 28);
    if (start + compressed > bytes.length) throw new ArchiveError(`${name}: truncated`);
    const raw = bytes.subarray(start, start + compressed);
    const data = method === 0 ? raw : method === 8 ? await inflate(raw) : null;
    if (data === null) throw new ArchiveError(`${name}: compression method ${method} is not supported`);
    if (data.length !== size) throw new ArchiveError(`${name}: ${data.length} bytes, the zip says ${size}`);
    files.set(name, data);
  }
  return files;
}

/** One array of a .npy file: its dtype ('|u1', '<f4', '<i8'), shape and values. */
export interface NpyArray {
  readonly dtype: string;
  readonly shape: readonly number[];
  readonly data: Uint8Array | Float32Array | Float64Array;
}

/** Parse a .npy file (C order; uint8, float32 or int64 little-endian). */
export function readNpy(bytes: Uint8Array): NpyArray {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < 10 || v.getUint8(0) !== 0x93 || new TextDecoder().decode(bytes.subarray(1, 6)) !== "NUMPY") {
    throw new ArchiveError("not a .npy file");
  }
  const major = v.getUint8(6);
  const headerLength = major === 1 ? v.getUint16(8, true) : v.getUint32(8, true);
  const headerStart = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(headerStart, headerStart + headerLength));
  const dtype = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (dtype === undefined || shapeText === undefined || /'fortran_order':\s*True/.test(header)) {
    throw new ArchiveError(`unsupported .npy header ${header.slice(0, 80)}`);
  }
  const shape = shapeText.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const body = bytes.slice(headerStart + headerLength);
  const need = (itemsize: number): ArrayBuffer => {
    if (body.length !== count * itemsize) throw new ArchiveError(`.npy data is ${body.length} bytes, shape needs ${count * itemsize}`);
    return body.buffer;
  };
  if (dtype === "|u1") return { dtype, shape, data: new Uint8Array(need(1)) };
  if (dtype === "<f4") return { dtype, shape, data: new Float32Array(need(4)) };
  if (dtype === "<i8") return { dtype, shape, data: Float64Array.from(new BigInt64Array(need(8)), Number) };
  throw new ArchiveError(`.npy dtype ${dtype} is not supported`);
}

/** The text of a 0-d numpy string array (dtype '<U{n}': n UTF-32LE code units, NUL-padded). */
export function readNpyText(bytes: Uint8Array): string {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < 10 || v.getUint8(0) !== 0x93 || new TextDecoder().decode(bytes.subarray(1, 6)) !== "NUMPY") {
    throw new ArchiveError("not a .npy file");
  }
  const major = v.getUint8(6);
  const headerStart = major === 1 ? 10 : 12;
  const headerLength = major === 1 ? v.getUint16(8, true) : v.getUint32(8, true);
  const header = new TextDecoder().decode(bytes.subarray(headerStart, headerStart + headerLength));
  const units = /'descr':\s*'<U(\d+)'/.exec(header)?.[1];
  if (units === undefined || !/'shape':\s*\(\)/.test(header)) throw new ArchiveError(`not a 0-d string .npy: ${header.slice(0, 80)}`);
  const body = headerStart + headerLength;
  if (bytes.length !== body + 4 * Number(units)) throw new ArchiveError("truncated string .npy");
  let text = "";
  for (let i = 0; i < Number(units); i++) {
    const cp = v.getUint32(body + 4 * i, true);
    if (cp === 0) break;
    if (cp > 0x10ffff) throw new ArchiveError("bad code point in string .npy");
    text += String.fromCodePoint(cp);
  }
  return text;
}
