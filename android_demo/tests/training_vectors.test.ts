/** The training golden vectors (tests/vectors/training/) in Node: see training_checks.ts. */
import { readFileSync, readdirSync } from "node:fs";
import { test } from "node:test";
import { type TrainingInvalid, type TrainingVector, runTrainingChecks, runTrainingFuzz } from "./training_checks.js";

const DIR = new URL("../../../tests/vectors/training/", import.meta.url);
const files = readdirSync(DIR).filter((f) => f.endsWith(".json") && f !== "invalid.json").sort();
const valid = files.map((f) => JSON.parse(readFileSync(new URL(f, DIR), "utf8")) as TrainingVector);
const invalid = JSON.parse(readFileSync(new URL("invalid.json", DIR), "utf8")) as TrainingInvalid[];

test("training vectors", async (t) => {
  if (valid.length < 11 || invalid.length < 8) throw new Error(`found ${valid.length} valid, ${invalid.length} invalid`);
  for (const r of [...(await runTrainingChecks(valid, invalid)), ...runTrainingFuzz(valid, 5000)]) {
    await t.test(r.name, () => {
      if (r.error !== null) throw new Error(r.error);
    });
  }
});
