/** Presence (docs/protocol.md §4): retained birth message and last will, strict JSON, canonical form. */
import { WireError, strictUtf8, utf8 } from "./bytes.js";
import { type Json, JsonError, JsonNumber, type JsonObject, canonicalJson, parseJson } from "./json.js";
import { ENCODINGS, type Encoding } from "./tensor.js";
import { isId } from "./topics.js";

export const MAX_PRESENCE = 4096;
export const PRESENCE_VERSION = 1;
const MAX_U32 = 0xffffffff;
const BASE_KEYS = ["v", "device", "expert", "status"] as const;
const ONLINE_KEYS = ["model", "caps", "ts"] as const;

export interface Caps {
  readonly runtimes: readonly string[];
  readonly latentEncodings: readonly Encoding[];
  readonly maxBatch: number;
}

interface Base {
  readonly device: string;
  readonly expert: number;
  /** Optional keys beyond version 1's (ignored by v1 receivers, e.g. a later "protocols"). */
  readonly extra?: ReadonlyMap<string, Json>;
}

export interface OnlinePresence extends Base {
  readonly status: "online";
  readonly model: string;
  readonly caps: Caps;
  readonly ts: number;
}

export interface OfflinePresence extends Base {
  readonly status: "offline";
}

export type Presence = OnlinePresence | OfflinePresence;

function get(obj: JsonObject, key: string, where = "presence"): Json {
  const v = obj.get(key);
  if (v === undefined) throw new WireError(`${where} missing key '${key}'`);
  return v;
}

function int(v: Json, key: string): number {
  if (!(v instanceof JsonNumber) || !v.integer) throw new WireError(`presence key '${key}' has the wrong type`);
  return v.value;
}

function str(v: Json, key: string): string {
  if (typeof v !== "string") throw new WireError(`presence key '${key}' has the wrong type`);
  return v;
}

function strings(v: Json, key: string): string[] {
  if (!Array.isArray(v)) throw new WireError(`presence key '${key}' has the wrong type`);
  return v.map((x) => str(x, key));
}

function caps(v: Json): Caps {
  if (!(v instanceof Map)) throw new WireError("presence key 'caps' has the wrong type");
  const runtimes = strings(get(v, "runtimes", "presence caps"), "caps.runtimes");
  if (runtimes.length === 0) throw new WireError("caps.runtimes must not be empty");
  if (runtimes.some((r) => utf8(r).length < 1 || utf8(r).length > 64)) throw new WireError("caps.runtimes entries must be 1..64 bytes");
  const encodings = strings(get(v, "latent_encodings", "presence caps"), "caps.latent_encodings");
  if (encodings.some((e) => !(ENCODINGS as readonly string[]).includes(e)) || new Set(encodings).size !== encodings.length
      || !encodings.includes("fp32")) {
    throw new WireError("caps.latent_encodings must be distinct values of fp32, fp16, int8 and contain fp32");
  }
  const maxBatch = int(get(v, "max_batch", "presence caps"), "caps.max_batch");
  if (maxBatch < 1 || maxBatch > MAX_U32) throw new WireError("caps.max_batch must be >= 1 and < 2^32");
  return { runtimes, latentEncodings: encodings as Encoding[], maxBatch };
}

/** Decode a presence payload (not an empty one: that is a removal); WireError for anything invalid. */
export function decodePresence(payload: Uint8Array): Presence {
  if (payload.length > MAX_PRESENCE) throw new WireError(`presence larger than ${MAX_PRESENCE} bytes`);
  let obj: Json;
  try {
    obj = parseJson(strictUtf8(payload, "presence"));
  } catch (e) {
    if (e instanceof JsonError && e.message.startsWith("NaN")) throw new WireError(e.message);
    throw new WireError(`presence is not UTF-8 JSON (${e instanceof Error ? e.message : e})`);
  }
  if (!(obj instanceof Map)) throw new WireError("presence must be a JSON object");
  const v = int(get(obj, "v"), "v");
  if (v !== PRESENCE_VERSION) throw new WireError(`unsupported presence version ${v}`);
  const device = str(get(obj, "device"), "device");
  if (!isId(device)) throw new WireError(`bad device id ${JSON.stringify(device)}`);
  const expert = int(get(obj, "expert"), "expert");
  if (expert < 0 || expert > 0xffff) throw new WireError("expert out of range");
  const status = str(get(obj, "status"), "status");
  const extra = new Map([...obj].filter(([k]) => !(BASE_KEYS as readonly string[]).includes(k)
    && !(ONLINE_KEYS as readonly string[]).includes(k)));
  if (status === "offline") {
    if (ONLINE_KEYS.some((k) => obj.has(k))) throw new WireError("offline presence carries only v, device, expert, status");
    return { status, device, expert, extra };
  }
  if (status !== "online") throw new WireError("bad presence status");
  const model = str(get(obj, "model"), "model");
  if (utf8(model).length < 1 || utf8(model).length > 255) throw new WireError("model version must be 1..255 bytes");
  const c = caps(get(obj, "caps"));
  const tsValue = get(obj, "ts");
  if (!(tsValue instanceof JsonNumber)) throw new WireError("presence key 'ts' has the wrong type");
  if (!Number.isFinite(tsValue.value) || tsValue.value < 0) throw new WireError("presence ts must be finite and >= 0");
  return { status, device, expert, model, caps: c, ts: tsValue.value, extra };
}

/** The canonical JSON bytes of a presence (docs/protocol.md §4). */
export function encodePresence(p: Presence): Uint8Array {
  const obj: JsonObject = new Map(p.extra ?? []);
  obj.set("v", new JsonNumber(PRESENCE_VERSION, true));
  obj.set("device", p.device);
  obj.set("expert", new JsonNumber(p.expert, true));
  obj.set("status", p.status);
  if (p.status === "online") {
    obj.set("model", p.model);
    obj.set("caps", new Map<string, Json>([
      ["runtimes", [...p.caps.runtimes]],
      ["latent_encodings", [...p.caps.latentEncodings]],
      ["max_batch", new JsonNumber(p.caps.maxBatch, true)],
    ]));
    obj.set("ts", new JsonNumber(p.ts, false));
  }
  const bytes = utf8(canonicalJson(obj));
  if (bytes.length > MAX_PRESENCE) throw new WireError(`presence larger than ${MAX_PRESENCE} bytes`);
  return bytes;
}
