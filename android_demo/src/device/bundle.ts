/**
 * Device bundles (docs/bundle.md, manifest schema versions 2 and 1), verified before anything runs:
 * strict JSON, schema version, every field, then every listed file's size and sha256.
 * A bundle comes from a `BundleSource`: a URL (a folder served over HTTP), picked files or a zip.
 */
import { toHex } from "../wire/bytes.js";
import { sha256 } from "../wire/chunks.js";
import { type Json, JsonError, JsonNumber, type JsonObject, fromJson, parseJson } from "../wire/json.js";

export const SCHEMA_VERSIONS = [2, 1] as const; // 2 adds model_version; 1 takes it from provenance.config_hash
export const MANIFEST = "manifest.json";
const MAX_MANIFEST_BYTES = 1 << 20;
const ROLES = ["extractor", "gate", "expert"] as const;
const PRECISIONS = ["fp32", "int8"] as const;
const DTYPES = ["float32", "int8", "uint8"] as const;
const FILE = /^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$/;
const SHA256 = /^[0-9a-f]{64}$/;

export type Role = (typeof ROLES)[number];
export type Precision = (typeof PRECISIONS)[number];

/** A bundle that cannot be used; the message names the file and the problem. */
export class BundleError extends Error {
  override name = "BundleError";
}

export interface Quantization {
  readonly scale: number;
  readonly zeroPoint: number;
}

export interface TensorSpec {
  readonly name: string;
  readonly shape: readonly (number | string)[];
  readonly dtype: (typeof DTYPES)[number];
  readonly quantization: Quantization | null;
}

export interface ModelEntry {
  readonly role: Role;
  readonly format: string;
  readonly precision: Precision;
  readonly file: string;
  readonly sha256: string;
  readonly bytes: number;
  readonly inputs: readonly TensorSpec[];
  readonly outputs: readonly TensorSpec[];
}

export interface InputSpec {
  readonly shape: readonly [number, number, number];
  readonly dtype: "uint8";
  readonly scale: number;
  readonly mean: readonly number[];
  readonly std: readonly number[];
  readonly layout: "NCHW";
}

export interface FileRef {
  readonly file: string;
  readonly sha256: string;
  readonly bytes: number;
}

export interface Manifest {
  readonly schemaVersion: number;
  readonly deviceId: string;
  readonly expertId: number;
  readonly numExperts: number;
  readonly topK: number;
  readonly latentDim: number;
  readonly numClasses: number;
  readonly classNames: readonly string[];
  readonly routing: "gate" | "random";
  readonly input: InputSpec;
  readonly models: readonly ModelEntry[];
  readonly provenance: Readonly<Record<string, unknown>>;
  readonly samples: FileRef | null;
  /** Schema 2's `model_version` (null in schema 1). */
  readonly modelVersion: string | null;
}

/** Where a bundle's files come from. */
export interface BundleSource {
  /** Shown in messages: the URL, folder or zip name. */
  readonly name: string;
  /** A file's bytes, or null when it is not there. */
  read(file: string): Promise<Uint8Array | null>;
}

/** A verified bundle: its manifest and the verified bytes of every listed file. */
export interface Bundle {
  readonly source: string;
  readonly manifest: Manifest;
  readonly files: ReadonlyMap<string, Uint8Array>;
  /** The model version peers compare: provenance.config_hash. */
  readonly modelVersion: string;
}

/** A bundle folder served over HTTP(S) at `base` (ending in `/`). */
export function urlSource(base: string): BundleSource {
  const root = base.endsWith("/") ? base : `${base}/`;
  return {
    name: root,
    async read(file) {
      const response = await fetch(new URL(file, new URL(root, globalThis.location?.href)), { cache: "no-store" });
      return response.ok ? new Uint8Array(await response.arrayBuffer()) : null;
    },
  };
}

/** Files by name (from a picked folder or an unpacked zip). */
export function mapSource(name: string, files: ReadonlyMap<string, Uint8Array | Blob>): BundleSource {
  return {
    name,
    async read(file) {
      const f = files.get(file);
      if (f === undefined) return null;
      return f instanceof Uint8Array ? f : new Uint8Array(await f.arrayBuffer());
    },
  };
}

class Malformed extends Error {}

type Check<T> = (v: Json, where: string) => T;

function obj(v: Json, where: string): JsonObject {
  if (!(v instanceof Map)) throw new Malformed(`${where}: expected an object`);
  return v;
}

function field<T>(o: JsonObject, key: string, where: string, check: Check<T>): T {
  const full = where ? `${where}.${key}` : key;
  const v = o.get(key);
  if (v === undefined) throw new Malformed(`${full}: missing`);
  return check(v, full);
}

const int: Check<number> = (v, where) => {
  if (!(v instanceof JsonNumber) || !v.integer) throw new Malformed(`${where}: expected an integer`);
  return v.value;
};
const positive: Check<number> = (v, where) => {
  const n = int(v, where);
  if (n < 1) throw new Malformed(`${where}: must be >= 1, got ${n}`);
  return n;
};
const nonNegative: Check<number> = (v, where) => {
  const n = int(v, where);
  if (n < 0) throw new Malformed(`${where}: must be >= 0, got ${n}`);
  return n;
};
const num: Check<number> = (v, where) => {
  if (!(v instanceof JsonNumber)) throw new Malformed(`${where}: expected a number`);
  return v.value;
};
const str: Check<string> = (v, where) => {
  if (typeof v !== "string") throw new Malformed(`${where}: expected a string`);
  return v;
};
const matching = (re: RegExp, what: string): Check<string> => (v, where) => {
  const s = str(v, where);
  if (!re.test(s)) throw new Malformed(`${where}: ${JSON.stringify(s)} is not ${what}`);
  return s;
};
const choice = <T extends string>(options: readonly T[]): Check<T> => (v, where) => {
  const s = str(v, where);
  if (!(options as readonly string[]).includes(s)) throw new Malformed(`${where}: must be one of ${options.join(", ")}, got ${JSON.stringify(s)}`);
  return s as T;
};
const listOf = <T>(item: Check<T>): Check<T[]> => (v, where) => {
  if (!Array.isArray(v)) throw new Malformed(`${where}: expected a list`);
  return v.map((x, i) => item(x, `${where}[${i}]`));
};
const dim: Check<number | string> = (v, where) => (typeof v === "string" ? v : positive(v, where));

const tensorSpec: Check<TensorSpec> = (v, where) => {
  const o = obj(v, where);
  const q = o.get("quantization");
  let quantization: Quantization | null = null;
  if (q !== undefined && q !== null) {
    const qo = obj(q, `${where}.quantization`);
    const scale = field(qo, "scale", `${where}.quantization`, num);
    if (!(scale > 0)) throw new Malformed(`${where}.quantization.scale: must be > 0, got ${scale}`);
    quantization = { scale, zeroPoint: field(qo, "zero_point", `${where}.quantization`, int) };
  }
  return { name: field(o, "name", where, str), shape: field(o, "shape", where, listOf(dim)),
    dtype: field(o, "dtype", where, choice(DTYPES)), quantization };
};

const modelEntry: Check<ModelEntry> = (v, where) => {
  const o = obj(v, where);
  return { role: field(o, "role", where, choice(ROLES)), format: field(o, "format", where, str),
    precision: field(o, "precision", where, choice(PRECISIONS)),
    file: field(o, "file", where, matching(FILE, "a plain file name inside the bundle")),
    sha256: field(o, "sha256", where, matching(SHA256, "64 lowercase hex digits")),
    bytes: field(o, "bytes", where, nonNegative),
    inputs: field(o, "inputs", where, listOf(tensorSpec)), outputs: field(o, "outputs", where, listOf(tensorSpec)) };
};

const inputSpec: Check<InputSpec> = (v, where) => {
  const o = obj(v, where);
  const shape = field(o, "shape", where, listOf(positive));
  if (shape.length !== 3) throw new Malformed(`${where}.shape: expected [C, H, W], got [${shape}]`);
  const mean = field(o, "mean", where, listOf(num));
  const std = field(o, "std", where, listOf(num));
  if (mean.length !== shape[0] || std.length !== shape[0] || !std.every((s) => s > 0)) {
    throw new Malformed(`${where}: mean and std need ${shape[0]} values each (std > 0)`);
  }
  return { shape: shape as [number, number, number], dtype: field(o, "dtype", where, choice(["uint8"] as const)),
    scale: field(o, "scale", where, num), mean, std, layout: field(o, "layout", where, choice(["NCHW"] as const)) };
};

const fileRef: Check<FileRef> = (v, where) => {
  const o = obj(v, where);
  return { file: field(o, "file", where, matching(FILE, "a plain file name inside the bundle")),
    sha256: field(o, "sha256", where, matching(SHA256, "64 lowercase hex digits")),
    bytes: field(o, "bytes", where, nonNegative) };
};

/** Validate a parsed manifest.json (schema version 2 or 1); Malformed names the dotted key. */
function parseManifest(v: Json): Manifest {
  const m = obj(v, "manifest");
  const schemaVersion = field(m, "schema_version", "", int);
  if (!(SCHEMA_VERSIONS as readonly number[]).includes(schemaVersion)) {
    throw new Malformed(`schema_version ${schemaVersion} is not supported (this device reads schema_version `
      + `${SCHEMA_VERSIONS.join(" and ")}); export the bundle again with a matching nmoe-edge`);
  }
  const numExperts = field(m, "num_experts", "", positive);
  const numClasses = field(m, "num_classes", "", positive);
  const classNames = field(m, "class_names", "", listOf(str));
  if (classNames.length !== numClasses) throw new Malformed(`class_names: ${classNames.length} names for num_classes=${numClasses}`);
  const expertId = field(m, "expert_id", "", int);
  if (expertId < 0 || expertId >= numExperts) throw new Malformed(`expert_id: ${expertId} is not in [0, num_experts=${numExperts})`);
  const topK = field(m, "top_k", "", positive);
  if (topK > numExperts) throw new Malformed(`top_k: ${topK} is more than num_experts=${numExperts}`);
  const routing = field(m, "routing", "", choice(["gate", "random"] as const));
  const models = field(m, "models", "", listOf(modelEntry));
  checkModels(models, routing);
  const samples = m.get("samples");
  return { schemaVersion, deviceId: field(m, "device_id", "", str), expertId, numExperts, topK,
    latentDim: field(m, "latent_dim", "", positive), numClasses, classNames, routing,
    input: field(m, "input", "", inputSpec), models,
    provenance: fromJson(field(m, "provenance", "", obj)) as Record<string, unknown>,
    samples: samples === undefined || samples === null ? null : fileRef(samples, "samples"),
    modelVersion: schemaVersion >= 2 ? field(m, "model_version", "", str) : null };
}

function checkModels(models: ModelEntry[], routing: string): void {
  const files = models.map((e) => e.file);
  if (new Set(files).size !== files.length) throw new Malformed(`models: a file is listed twice`);
  const keys = models.map((e) => `${e.role}/${e.format}/${e.precision}`);
  if (new Set(keys).size !== keys.length) throw new Malformed("models: a role/format/precision is listed twice");
  const needed = routing === "gate" ? ["expert", "extractor", "gate"] : ["expert", "extractor"];
  for (const variant of new Set(models.map((e) => `${e.format} ${e.precision}`))) {
    const roles = models.filter((e) => `${e.format} ${e.precision}` === variant).map((e) => e.role).sort();
    if (roles.join() !== needed.join()) {
      throw new Malformed(`models: ${variant} has roles [${roles}], routing "${routing}" needs [${needed}]`);
    }
  }
}

async function sha256Hex(bytes: Uint8Array): Promise<string> {
  return toHex(await sha256(bytes));
}

/** Read and verify a bundle: manifest fields, then the size and sha256 of every listed file. */
export async function loadBundle(source: BundleSource): Promise<Bundle> {
  const where = `${source.name}${MANIFEST}`;
  const raw = await source.read(MANIFEST);
  if (raw === null) throw new BundleError(`${where}: cannot read (not found)`);
  if (raw.length > MAX_MANIFEST_BYTES) throw new BundleError(`${where}: larger than ${MAX_MANIFEST_BYTES} bytes`);
  let manifest: Manifest;
  try {
    manifest = parseManifest(parseJson(new TextDecoder("utf-8", { fatal: true }).decode(raw)));
  } catch (e) {
    if (e instanceof Malformed) throw new BundleError(`${where}: ${e.message}`);
    if (e instanceof JsonError || e instanceof TypeError) throw new BundleError(`${where}: not valid JSON (${e.message})`);
    throw e;
  }
  const version = manifest.modelVersion ?? manifest.provenance["config_hash"];
  const key = manifest.modelVersion === null ? "provenance.config_hash" : "model_version";
  if (typeof version !== "string" || version.length < 1 || new TextEncoder().encode(version).length > 255) {
    throw new BundleError(`${where}: ${key} must be a string of 1..255 bytes (the model version peers compare)`);
  }
  const refs: FileRef[] = [...manifest.models, ...(manifest.samples ? [manifest.samples] : [])];
  const files = new Map<string, Uint8Array>();
  await Promise.all(refs.map(async (ref) => {
    const path = `${source.name}${ref.file}`;
    const data = await source.read(ref.file);
    if (data === null) throw new BundleError(`${path}: listed in ${MANIFEST} but missing`);
    if (data.length !== ref.bytes) throw new BundleError(`${path}: ${data.length} bytes, ${MANIFEST} says ${ref.bytes} (truncated or replaced)`);
    const digest = await sha256Hex(data);
    if (digest !== ref.sha256) {
      throw new BundleError(`${path}: sha256 ${digest} does not match ${MANIFEST} (${ref.sha256}): corrupted or tampered`);
    }
    files.set(ref.file, data);
  }));
  return { source: source.name, manifest, files, modelVersion: version };
}

/** The entry of one role/precision/format, or BundleError naming what the bundle has. */
export function findModel(bundle: Bundle, role: Role, precision: Precision, format = "onnx"): ModelEntry {
  const e = bundle.manifest.models.find((m) => m.role === role && m.precision === precision && m.format === format);
  if (e === undefined) {
    const have = bundle.manifest.models.map((m) => `${m.role} ${m.precision} ${m.format}`).join(", ");
    throw new BundleError(`${bundle.source}${MANIFEST}: no ${role} ${precision} ${format} model (has: ${have})`);
  }
  return e;
}
