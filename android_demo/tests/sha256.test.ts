/** SHA-256 with and without WebCrypto: a page served over plain http:// beyond localhost (a phone on the
 * LAN) has no `crypto.subtle`, and bundle checks and chunk digests then use @noble/hashes. */
import { strictEqual } from "node:assert";
import { createHash, randomBytes } from "node:crypto";
import { test } from "node:test";
import { sha256 } from "../src/wire/chunks.js";
import { toHex } from "../src/wire/bytes.js";

const inputs = [new Uint8Array(0), new TextEncoder().encode("abc"), new Uint8Array(randomBytes(64)),
  new Uint8Array(randomBytes(1_000_003))];

async function withoutWebCrypto<T>(run: () => Promise<T>): Promise<T> {
  const real = Object.getOwnPropertyDescriptor(globalThis, "crypto");
  Object.defineProperty(globalThis, "crypto", { value: { getRandomValues: crypto.getRandomValues.bind(crypto) },
    configurable: true });
  try {
    return await run();
  } finally {
    Object.defineProperty(globalThis, "crypto", real!);
  }
}

test("sha256 equals node:crypto's, with WebCrypto and without it", async () => {
  strictEqual(toHex(await sha256(new TextEncoder().encode("abc"))), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  for (const bytes of inputs) {
    const expected = createHash("sha256").update(bytes).digest("hex");
    strictEqual(toHex(await sha256(bytes)), expected);
    strictEqual(await withoutWebCrypto(async () => {
      strictEqual(globalThis.crypto.subtle, undefined);
      return toHex(await sha256(bytes));
    }), expected);
  }
});
