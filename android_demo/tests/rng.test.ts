/** numpy's default_rng in TypeScript: the expected values were printed by numpy 2.4 (`np.random.default_rng([a, b])`). */
import { deepStrictEqual, strictEqual } from "node:assert";
import { test } from "node:test";
import { randomLiveRoute } from "../src/device/nmoe.js";
import { NumpyRandom, seedSequenceState } from "../src/device/rng.js";

test("SeedSequence([5, 0]).generate_state(4, uint64)", () => {
  deepStrictEqual(seedSequenceState([5, 0], 4).map(String),
    ["12631478326263854183", "4464650224815488352", "6320729261375576658", "2846562751307321766"]);
});

test("default_rng([0, 3]).random(5) and ([7, 12]).random(3), bit for bit", () => {
  const a = new NumpyRandom([0, 3]);
  deepStrictEqual(Array.from({ length: 5 }, () => a.random()),
    [0.8949727407898387, 0.8604144367749376, 0.32137482233751336, 0.31687460853267846, 0.29913400765044673]);
  const b = new NumpyRandom([7, 12]);
  deepStrictEqual(Array.from({ length: 3 }, () => b.random()), [0.16306756598284378, 0.6133987493209478, 0.20948362250426678]);
});

test("default_rng([0, 1]).permutation(arange(6)) three times", () => {
  const r = new NumpyRandom([0, 1]);
  deepStrictEqual([0, 1, 2].map(() => r.permutation([0, 1, 2, 3, 4, 5])),
    [[1, 4, 3, 0, 2, 5], [5, 1, 3, 2, 4, 0], [3, 4, 2, 0, 1, 5]]);
});

test("random_live_route(4, 5, 2, live {0, 2, 3}) as device_agent.routing computes it, and the draw after it", () => {
  const r = new NumpyRandom([0, 2]);
  const route = randomLiveRoute(4, 5, 2, new Set([0, 2, 3]), r);
  deepStrictEqual([...route.experts], [0, 2, 0, 3, 0, 3, 3, 0]);
  deepStrictEqual([...route.rerouted], [[1, 1], [4, 4]]);
  strictEqual(r.random(), 0.17512023075543737);
});
