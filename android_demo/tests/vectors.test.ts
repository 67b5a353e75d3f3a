/** Golden vectors in Node: every valid vector encoded and decoded byte for byte, every invalid one rejected. */
import { readFileSync, readdirSync } from "node:fs";
import { test } from "node:test";
import { type InvalidVector, type Vector, runFuzz, runVectorChecks } from "./vector_checks.js";

const DIR = new URL("../../../tests/vectors/", import.meta.url);

function load(): { valid: Vector[]; invalid: InvalidVector[] } {
  const files = readdirSync(DIR).filter((f) => f.endsWith(".json") && f !== "invalid.json").sort();
  const valid = files.map((f) => JSON.parse(readFileSync(new URL(f, DIR), "utf8")) as Vector);
  const invalid = JSON.parse(readFileSync(new URL("invalid.json", DIR), "utf8")) as InvalidVector[];
  return { valid, invalid };
}

const { valid, invalid } = load();

test("the vector files are there", () => {
  if (valid.length < 16 || invalid.length < 40) throw new Error(`found ${valid.length} valid, ${invalid.length} invalid`);
});

for (const r of [...runVectorChecks(valid, invalid), ...runFuzz(valid, 5000)]) {
  test(r.name, () => {
    if (r.error !== null) throw new Error(r.error);
  });
}
