/**
 * The NMoE arithmetic of a device (docs/bundle.md "Inference with a bundle fleet", docs/agent.md
 * "Inference"): preprocess, softmax, top-k routing among the live experts, combine and
 * renormalize. Every operation is float32, in numpy's order, so that a web device computes what
 * the Python agent and `LocalNMoE` compute.
 */
import type { InputSpec } from "./bundle.js";
import type { NumpyRandom } from "./rng.js";

const fr = Math.fround;

/** uint8 pixels [n, C, H, W] -> float32 (pixel * scale - mean[c]) / std[c]. */
export function preprocess(pixels: Uint8Array, spec: InputSpec): Float32Array {
  const [channels, h, w] = spec.shape;
  const plane = h * w;
  const scale = fr(spec.scale);
  const mean = spec.mean.map(fr);
  const std = spec.std.map(fr);
  const out = new Float32Array(pixels.length);
  for (let i = 0; i < pixels.length; i++) {
    const c = Math.floor(i / plane) % channels;
    out[i] = fr(fr(fr(pixels[i]! * scale) - mean[c]!) / std[c]!);
  }
  return out;
}

/** numpy's float32 pairwise sum of a[off .. off+n) (what `sum(axis=-1)` does on a contiguous row). */
function pairwiseSum(a: Float32Array, off: number, n: number): number {
  if (n < 8) {
    let res = 0;
    for (let i = 0; i < n; i++) res = fr(res + a[off + i]!);
    return res;
  }
  if (n <= 128) {
    const r = Array.from(a.subarray(off, off + 8));
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] = fr(r[j]! + a[off + i + j]!);
    let res = fr(fr(fr(r[0]! + r[1]!) + fr(r[2]! + r[3]!)) + fr(fr(r[4]! + r[5]!) + fr(r[6]! + r[7]!)));
    for (; i < n; i++) res = fr(res + a[off + i]!);
    return res;
  }
  let half = Math.floor(n / 2);
  half -= half % 8;
  return fr(pairwiseSum(a, off, half) + pairwiseSum(a, off + half, n - half));
}

/** Softmax over each row of a [rows, cols] float32 matrix. */
export function softmax(x: Float32Array, cols: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let o = 0; o < x.length; o += cols) {
    let m = -Infinity;
    for (let j = 0; j < cols; j++) m = Math.max(m, x[o + j]!);
    for (let j = 0; j < cols; j++) out[o + j] = fr(Math.exp(fr(x[o + j]! - m)));
    const s = fr(0 + pairwiseSum(out, o, cols));
    for (let j = 0; j < cols; j++) out[o + j] = fr(out[o + j]! / s);
  }
  return out;
}

/** Chosen experts [n, k] and their combine weights, and what was re-routed before sending. */
export interface Route {
  readonly n: number;
  readonly k: number;
  readonly experts: Int32Array;
  readonly weights: Float32Array;
  readonly rerouted: Map<number, number>;
}

/** Per row, the k largest of `columns` by logit (ties: lower index first), best first. */
function topIndices(logits: Float32Array, row: number, cols: number, columns: readonly number[], k: number): number[] {
  return [...columns].sort((a, b) => logits[row * cols + b]! - logits[row * cols + a]! || a - b).slice(0, k);
}

/** Top-k by gate logit among the `live` experts; weights = softmax over the chosen logits. */
export function gateRoute(logits: Float32Array, numExperts: number, k: number, live: ReadonlySet<number>): Route {
  const n = logits.length / numExperts;
  const all = Array.from({ length: numExperts }, (_, i) => i);
  const ids = all.filter((e) => live.has(e));
  const kk = Math.min(k, ids.length);
  const experts = new Int32Array(n * kk);
  const chosenLogits = new Float32Array(n * kk);
  const rerouted = new Map<number, number>();
  for (let r = 0; r < n; r++) {
    const chosen = topIndices(logits, r, numExperts, ids, kk);
    chosen.forEach((e, s) => {
      experts[r * kk + s] = e;
      chosenLogits[r * kk + s] = logits[r * numExperts + e]!;
    });
    if (ids.length !== numExperts) {
      for (const e of topIndices(logits, r, numExperts, all, k)) if (!live.has(e)) rerouted.set(e, (rerouted.get(e) ?? 0) + 1);
    }
  }
  return { n, k: kk, experts, weights: softmax(chosenLogits, kk), rerouted: new Map([...rerouted].sort(([a], [b]) => a - b)) };
}

/** The rows (and slots) of a route that chose expert `e`, in row order. */
export function rowsOf(route: Route, e: number): { rows: number[]; slots: number[] } {
  const rows: number[] = [];
  const slots: number[] = [];
  for (let i = 0; i < route.experts.length; i++) {
    if (route.experts[i] === e) {
      rows.push(Math.floor(i / route.k));
      slots.push(i % route.k);
    }
  }
  return { rows, slots };
}

/** The distinct experts of a route, ascending. */
export function expertsOf(route: Route): number[] {
  return [...new Set(route.experts)].sort((a, b) => a - b);
}

/** sum_k weights[:, k] * outputs[expert[:, k]]: experts ascending, each added on its rows in float32.
 * `outputs` holds one [n, C] matrix per chosen expert (rows it did not answer are never read). */
export function combine(route: Route, outputs: ReadonlyMap<number, Float32Array>, numClasses: number): Float32Array {
  const probs = new Float32Array(route.n * numClasses);
  for (const e of expertsOf(route)) {
    const out = outputs.get(e)!;
    const { rows, slots } = rowsOf(route, e);
    rows.forEach((r, i) => {
      const w = route.weights[r * route.k + slots[i]!]!;
      for (let c = 0; c < numClasses; c++) {
        const j = r * numClasses + c;
        probs[j] = fr(probs[j]! + fr(w * out[j]!));
      }
    });
  }
  return probs;
}

/** Weights renormalized over the answers each row got (rows with every answer keep theirs bit for
 * bit); rows without any answer are returned so the caller gives them the own expert alone. */
export function renormalize(route: Route, answered: (row: number, expert: number) => boolean): number[] {
  const orphans: number[] = [];
  for (let r = 0; r < route.n; r++) {
    const base = r * route.k;
    const got = Array.from({ length: route.k }, (_, s) => answered(r, route.experts[base + s]!));
    if (got.every(Boolean)) continue;
    const kept = got.map((g, s) => (g ? route.weights[base + s]! : 0));
    const total = pairwiseSum(Float32Array.from(kept), 0, kept.length);
    if (total > 0) {
      kept.forEach((w, s) => {
        route.weights[base + s] = fr(w / total);
      });
    } else {
      orphans.push(r);
    }
  }
  return orphans;
}

/** Index of the largest value of each row (first on ties, as numpy's argmax). */
export function argmaxRows(x: Float32Array, cols: number): number[] {
  const out: number[] = [];
  for (let o = 0; o < x.length; o += cols) {
    let best = 0;
    for (let j = 1; j < cols; j++) if (x[o + j]! > x[o + best]!) best = j;
    out.push(best);
  }
  return out;
}

/** RanGate: k distinct experts per input from numpy's draws (`random((n, E)).argsort()[:, :k]`), weights 1/k. */
function randomRoute(n: number, numExperts: number, k: number, rng: NumpyRandom): Route {
  const experts = new Int32Array(n * k);
  for (let r = 0; r < n; r++) {
    const draws = Array.from({ length: numExperts }, () => rng.random());
    const order = draws.map((_, i) => i).sort((a, b) => draws[a]! - draws[b]! || a - b);
    for (let s = 0; s < k; s++) experts[r * k + s] = order[s]!;
  }
  return { n, k, experts, weights: new Float32Array(n * k).fill(fr(1 / k)), rerouted: new Map() };
}

/** RanGate among the live experts: each unavailable choice replaced by a random live expert the
 * input does not have yet (numpy's permutation of the live ids), weights 1/k over those kept. */
export function randomLiveRoute(n: number, numExperts: number, k: number, live: ReadonlySet<number>, rng: NumpyRandom): Route {
  const wanted = randomRoute(n, numExperts, k, rng);
  if (wanted.experts.every((e) => live.has(e))) return wanted;
  const ids = [...live].sort((a, b) => a - b);
  const kLive = Math.min(k, ids.length);
  const experts = new Int32Array(n * kLive);
  const rerouted = new Map<number, number>();
  for (let r = 0; r < n; r++) {
    const row = [...wanted.experts.subarray(r * k, r * k + k)];
    const kept = row.filter((e) => live.has(e));
    const spare = rng.permutation(ids).filter((e) => !kept.includes(e));
    [...kept, ...spare].slice(0, kLive).forEach((e, s) => {
      experts[r * kLive + s] = e;
    });
    for (const e of row) if (!live.has(e)) rerouted.set(e, (rerouted.get(e) ?? 0) + 1);
  }
  return { n, k: kLive, experts, weights: new Float32Array(n * kLive).fill(fr(1 / kLive)),
    rerouted: new Map([...rerouted].sort(([a], [b]) => a - b)) };
}
