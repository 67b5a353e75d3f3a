/**
 * CHUNK frames (protocol version 2, kind 6; docs/protocol.md §16.4): a COMMAND or RESULT larger
 * than the link's maximum message size travels in slices, each with the transfer id (the message's
 * task id), its index, the chunk count, its offset, the whole message's length and SHA-256. The
 * receiver keys chunks by (sender, transfer id, index) and hands a message over only when the
 * slices tile it exactly and hash to the digest.
 */
import { sha256 as nobleSha256 } from "@noble/hashes/sha2.js";
import { Reader, WireError, Writer, toHex } from "./bytes.js";
import { MAGIC } from "./frames.js";
import { MAX_MESSAGE, TRAINING_VERSION } from "./training.js";

export const CHUNK_KIND = 6;
export const CHUNK_HEADER = 68;
export const MAX_CHUNKS = 65535;
const REMEMBER_DONE = 1024; // finished transfers remembered, so a late redelivered chunk is a duplicate

export interface Chunk {
  readonly transferId: Uint8Array;
  readonly index: number;
  readonly count: number;
  readonly offset: number;
  readonly total: number;
  readonly digest: Uint8Array; // 32 bytes
  readonly data: Uint8Array;
}

/**
 * SHA-256 of `bytes`: WebCrypto where the page has it, else @noble/hashes. Browsers give WebCrypto's
 * `crypto.subtle` only to secure contexts (https://, localhost): a phone that opens the bridge's
 * http://<LAN address>:PORT/ page has none.
 */
export async function sha256(bytes: Uint8Array): Promise<Uint8Array> {
  const subtle = globalThis.crypto?.subtle;
  if (subtle === undefined) return nobleSha256(bytes);
  return new Uint8Array(await subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>));
}

/** Whether `payload` starts like a CHUNK frame (magic, version 2, kind 6). */
export function isChunk(payload: Uint8Array): boolean {
  return payload.length >= 4 && payload[0] === MAGIC[0] && payload[1] === MAGIC[1] && payload[2] === TRAINING_VERSION
    && payload[3] === CHUNK_KIND;
}

/** Parse one CHUNK frame; WireError on anything malformed. */
export function decodeChunk(payload: Uint8Array): Chunk {
  if (!isChunk(payload)) throw new WireError("not a CHUNK frame");
  if (payload.length <= CHUNK_HEADER) throw new WireError("truncated chunk");
  const r = new Reader(payload);
  r.take(4, "chunk header");
  const transferId = r.take(16, "chunk header").slice();
  const index = r.u32("chunk header");
  const count = r.u32("chunk header");
  const offset = r.u32("chunk header");
  const total = r.u32("chunk header");
  const digest = r.take(32, "chunk header").slice();
  const data = r.take(r.remaining, "chunk data").slice();
  if (count < 2 || count > MAX_CHUNKS || index >= count) throw new WireError(`chunk index ${index} of ${count}`);
  if (total < 1 || total > MAX_MESSAGE || offset + data.length > total) throw new WireError("chunk outside the message");
  return { transferId, index, count, offset, total, digest, data };
}

/** The CHUNK frame of `chunk`. */
export function encodeChunk(c: Chunk): Uint8Array {
  return new Writer().u8(MAGIC[0]).u8(MAGIC[1]).u8(TRAINING_VERSION).u8(CHUNK_KIND).bytes(c.transferId).u32(c.index)
    .u32(c.count).u32(c.offset).u32(c.total).bytes(c.digest).bytes(c.data).finish();
}

/** `message` as CHUNK frames of at most `maxFrame` bytes each, in order, all the same size but the last. */
export async function splitMessage(message: Uint8Array, transferId: Uint8Array, maxFrame: number): Promise<Uint8Array[]> {
  if (transferId.length !== 16) throw new WireError("transfer id must be 16 bytes");
  if (message.length < 1 || message.length > MAX_MESSAGE) throw new WireError(`a chunked message has 1..${MAX_MESSAGE} bytes`);
  const size = maxFrame - CHUNK_HEADER;
  if (size < 1) throw new WireError(`max frame size ${maxFrame} leaves no room for chunk data`);
  const count = Math.ceil(message.length / size);
  if (count > MAX_CHUNKS) throw new WireError(`${count} chunks needed; at most ${MAX_CHUNKS}: raise the maximum message size`);
  const digest = await sha256(message);
  const frames: Uint8Array[] = [];
  for (let i = 0; i < count; i++) {
    frames.push(encodeChunk({ transferId, index: i, count, offset: i * size, total: message.length, digest,
      data: message.subarray(i * size, (i + 1) * size) }));
  }
  return frames;
}

interface Transfer {
  readonly count: number;
  readonly total: number;
  readonly digest: string;
  readonly started: number;
  readonly parts: Map<number, Chunk>;
}

/**
 * Collects CHUNK frames per (sender, transfer id) into whole messages (§16.4): a repeated chunk is
 * ignored, one whose count, total or digest differ from its transfer's first chunk is dropped, at
 * most `maxTransfers` incomplete transfers per sender, forgotten after `ttlMs`. Counters as the
 * Python Reassembler's: chunks, duplicates, conflicting, bad_digest, expired, too_many_transfers, completed.
 */
export class Reassembler {
  readonly counters = new Map<string, number>();
  private readonly transfers = new Map<string, Transfer>();
  private readonly done = new Set<string>();

  constructor(private readonly maxTransfers = 4, private readonly ttlMs = 120000,
    private readonly now: () => number = () => performance.now()) {}

  private count(name: string): void {
    this.counters.set(name, (this.counters.get(name) ?? 0) + 1);
  }

  /** Take one chunk from `sender`; the whole message when this chunk completed it (and it verified). */
  async add(sender: string, chunk: Chunk): Promise<Uint8Array | null> {
    this.count("chunks");
    const key = `${sender}/${toHex(chunk.transferId)}`;
    const now = this.now();
    for (const [k, t] of this.transfers) {
      if (now - t.started > this.ttlMs) {
        this.transfers.delete(k);
        this.count("expired");
      }
    }
    if (this.done.has(key)) {
      this.count("duplicates");
      return null;
    }
    let t = this.transfers.get(key);
    if (t === undefined) {
      if ([...this.transfers.keys()].filter((k) => k.startsWith(`${sender}/`)).length >= this.maxTransfers) {
        this.count("too_many_transfers");
        return null;
      }
      t = { count: chunk.count, total: chunk.total, digest: toHex(chunk.digest), started: now, parts: new Map() };
      this.transfers.set(key, t);
    }
    if (chunk.count !== t.count || chunk.total !== t.total || toHex(chunk.digest) !== t.digest) {
      this.count("conflicting");
      return null;
    }
    if (t.parts.has(chunk.index)) {
      this.count("duplicates");
      return null;
    }
    t.parts.set(chunk.index, chunk);
    if (t.parts.size < t.count) return null;
    this.transfers.delete(key);
    this.done.add(key);
    if (this.done.size > REMEMBER_DONE) this.done.delete(this.done.values().next().value!);
    const message = join(t);
    if (message === null || toHex(await sha256(message)) !== t.digest) {
      this.count("bad_digest");
      return null;
    }
    this.count("completed");
    return message;
  }

  /** Transfers still incomplete. */
  pending(): number {
    return this.transfers.size;
  }
}

/** The message from its parts, or null unless they tile 0..total exactly. */
function join(t: Transfer): Uint8Array | null {
  const parts = [...t.parts.values()].sort((a, b) => a.offset - b.offset);
  const out = new Uint8Array(t.total);
  let end = 0;
  for (const p of parts) {
    if (p.offset !== end || end + p.data.length > t.total) return null;
    out.set(p.data, end);
    end += p.data.length;
  }
  return end === t.total ? out : null;
}
