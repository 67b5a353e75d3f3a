/**
 * Strict JSON for the protocol's presence and the bundle manifest: a parser that keeps whether a
 * number was written as an integer, rejects duplicate keys, NaN/Infinity and anything outside
 * RFC 8259; and the canonical serializer of docs/protocol.md §4 (sorted keys, no whitespace).
 */

/** A JSON number and whether its text was an integer (no fraction, no exponent); an integer also
 * keeps its exact value (`exact`), which `value` loses beyond 2^53. */
export class JsonNumber {
  readonly exact: bigint | null;

  constructor(readonly value: number, readonly integer: boolean, exact?: bigint) {
    this.exact = integer ? exact ?? (Number.isSafeInteger(value) ? BigInt(value) : null) : null;
  }
}

export type Json = null | boolean | string | JsonNumber | Json[] | JsonObject;
export type JsonObject = Map<string, Json>;

export class JsonError extends Error {
  override name = "JsonError";
}

const MAX_DEPTH = 64;
const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
const ESCAPES: Record<string, string> = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" };

/** Parse `text` as one strict JSON value (JsonError naming the problem). */
export function parseJson(text: string): Json {
  let pos = 0;

  const fail = (what: string): never => {
    throw new JsonError(`${what} at character ${pos}`);
  };
  const ws = (): void => {
    while (pos < text.length && " \t\n\r".includes(text[pos]!)) pos++;
  };

  const str = (): string => {
    pos++; // opening quote
    let out = "";
    for (;;) {
      if (pos >= text.length) fail("unterminated string");
      const c = text[pos]!;
      if (c === '"') {
        pos++;
        return out;
      }
      if (c < " ") fail("control character in string");
      if (c !== "\\") {
        out += c;
        pos++;
        continue;
      }
      const e = text[pos + 1];
      if (e === "u") {
        const hex = text.slice(pos + 2, pos + 6);
        if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail("bad \\u escape");
        out += String.fromCharCode(parseInt(hex, 16));
        pos += 6;
      } else if (e !== undefined && e in ESCAPES) {
        out += ESCAPES[e];
        pos += 2;
      } else {
        fail("bad escape");
      }
    }
  };

  const value = (depth: number): Json => {
    if (depth > MAX_DEPTH) fail("nested too deeply");
    ws();
    const c = text[pos];
    if (c === "{") {
      pos++;
      const obj: JsonObject = new Map();
      ws();
      if (text[pos] === "}") {
        pos++;
        return obj;
      }
      for (;;) {
        ws();
        if (text[pos] !== '"') fail("expected a key");
        const key = str();
        if (obj.has(key)) fail(`duplicate key ${JSON.stringify(key)}`);
        ws();
        if (text[pos] !== ":") fail("expected ':'");
        pos++;
        obj.set(key, value(depth + 1));
        ws();
        if (text[pos] === ",") {
          pos++;
          continue;
        }
        if (text[pos] === "}") {
          pos++;
          return obj;
        }
        fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      pos++;
      const arr: Json[] = [];
      ws();
      if (text[pos] === "]") {
        pos++;
        return arr;
      }
      for (;;) {
        arr.push(value(depth + 1));
        ws();
        if (text[pos] === ",") {
          pos++;
          continue;
        }
        if (text[pos] === "]") {
          pos++;
          return arr;
        }
        fail("expected ',' or ']'");
      }
    }
    if (c === '"') return str();
    for (const [word, v] of [["true", true], ["false", false], ["null", null]] as const) {
      if (text.startsWith(word, pos)) {
        pos += word.length;
        return v;
      }
    }
    NUMBER.lastIndex = pos;
    const m = NUMBER.exec(text);
    if (m === null) return fail(c === "N" || c === "I" || c === "-" ? "NaN is not allowed" : "unexpected character");
    pos += m[0].length;
    const integer = !/[.eE]/.test(m[0]);
    return new JsonNumber(Number(m[0]), integer, integer ? BigInt(m[0]) : undefined);
  };

  const result = value(0);
  ws();
  if (pos !== text.length) fail("extra data after the JSON value");
  return result;
}

/** Compare by Unicode code point (what Python's sorted() does), not UTF-16 unit. */
function byCodePoint(a: string, b: string): number {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i]!.codePointAt(0)! - y[i]!.codePointAt(0)!;
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

function quote(s: string, ascii = false): string {
  let out = '"';
  for (const c of s) {
    const code = c.codePointAt(0)!;
    if (ascii && code > 0x7e) {
      for (let i = 0; i < c.length; i++) out += "\\u" + c.charCodeAt(i).toString(16).padStart(4, "0");
      continue;
    }
    if (c === '"') out += '\\"';
    else if (c === "\\") out += "\\\\";
    else if (c === "\n") out += "\\n";
    else if (c === "\r") out += "\\r";
    else if (c === "\t") out += "\\t";
    else if (c === "\b") out += "\\b";
    else if (c === "\f") out += "\\f";
    else if (code < 0x20) out += "\\u" + code.toString(16).padStart(4, "0");
    else out += c;
  }
  return out + '"';
}

/** The shortest decimal that parses back to `x`, without exponent, with at least one fraction digit. */
export function plainFloat(x: number): string {
  if (!Number.isFinite(x)) throw new JsonError(`${x} is not allowed in JSON`);
  let s = String(x);
  const m = /^(-?)(\d+)(?:\.(\d+))?e([+-]\d+)$/.exec(s);
  if (m !== null) {
    const [, sign, int, frac = "", exp] = m;
    const digits = int! + frac;
    const point = int!.length + Number(exp);
    s = point <= 0 ? `${sign}0.${"0".repeat(-point)}${digits}`
      : point >= digits.length ? `${sign}${digits}${"0".repeat(point - digits.length)}`
      : `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
  }
  return s.includes(".") ? s : `${s}.0`;
}

/** The canonical form: keys sorted by code point at every level, separators `,` `:`, raw UTF-8. */
export function canonicalJson(v: Json): string {
  if (v === null) return "null";
  if (typeof v === "boolean") return v ? "true" : "false";
  if (typeof v === "string") return quote(v);
  if (v instanceof JsonNumber) {
    if (!v.integer) return plainFloat(v.value);
    if (!Number.isSafeInteger(v.value)) throw new JsonError(`integer ${v.value} is not exact`);
    return String(v.value);
  }
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(",")}]`;
  const keys = [...v.keys()].sort(byCodePoint);
  return `{${keys.map((k) => `${quote(k)}:${canonicalJson(v.get(k)!)}`).join(",")}}`;
}

/** Python's `repr(float)`: the shortest round-trip digits, exponent form below 1e-4 and from 1e16. */
export function pythonFloat(x: number): string {
  if (!Number.isFinite(x)) throw new JsonError(`${x} is not allowed in JSON`);
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mantissa, expText] = x.toExponential().split("e") as [string, string];
  const exp = Number(expText);
  if (exp < -4 || exp >= 16) {
    return `${mantissa}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  return plainFloat(x);
}

/** What Python's `json.dumps(v, sort_keys=True, separators=(",", ":"))` writes (ASCII, \u escapes):
 * the header of the training frames (docs/protocol.md §16.2). */
export function pythonJson(v: Json): string {
  if (v === null || typeof v === "boolean") return canonicalJson(v);
  if (typeof v === "string") return quote(v, true);
  if (v instanceof JsonNumber) {
    if (!v.integer) return pythonFloat(v.value);
    if (v.exact === null) throw new JsonError(`integer ${v.value} is not exact`);
    return String(v.exact);
  }
  if (Array.isArray(v)) return `[${v.map(pythonJson).join(",")}]`;
  const keys = [...v.keys()].sort(byCodePoint);
  return `{${keys.map((k) => `${quote(k, true)}:${pythonJson(v.get(k)!)}`).join(",")}}`;
}

/** A plain JS value (numbers, strings, arrays, objects) as Json; integers stay integers. */
export function toJson(v: unknown): Json {
  if (v === null || typeof v === "boolean" || typeof v === "string" || v instanceof JsonNumber) return v;
  if (typeof v === "number") return new JsonNumber(v, Number.isInteger(v));
  if (Array.isArray(v)) return v.map(toJson);
  if (typeof v === "object") return new Map(Object.entries(v as object).map(([k, x]) => [k, toJson(x)]));
  throw new JsonError(`cannot serialize ${typeof v}`);
}

/** Json as plain JS values (numbers as numbers, objects as records). */
export function fromJson(v: Json): unknown {
  if (v instanceof JsonNumber) return v.value;
  if (Array.isArray(v)) return v.map(fromJson);
  if (v instanceof Map) return Object.fromEntries([...v].map(([k, x]) => [k, fromJson(x)]));
  return v;
}
