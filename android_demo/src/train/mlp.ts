/**
 * The MLP stages' client updates (Stage 2 expert, Stage 3 gate) as device_agent/training computes
 * them in numpy: Linear -> ReLU -> Linear forward and backward by hand, mean cross-entropy and the
 * gate's mixture NLL, gradient-norm clipping, torch's Adam/SGD, minibatches in torch's randperm
 * order. Every array is float32 (a Float32Array store rounds each value as numpy's float32 does);
 * sums run in float64 before their rounding, so results match numpy within float32 rounding, not
 * bit for bit (tests/web/test_web_trainer.py measures it).
 */
import type { Tensor } from "../wire/tensor.js";
import { TorchStream } from "./torch_random.js";

const fr = Math.fround;

/** Parameter name -> float32 tensor (torch's state-dict names). */
export type Params = Map<string, Tensor>;

/** An MLP's parameter names: Linear(`first`) -> ReLU -> Linear(`second`). */
export interface MlpNames {
  readonly first: string;
  readonly second: string;
}

export const EXPERT: MlpNames = { first: "net.0", second: "net.2" };
export const GATE: MlpNames = { first: "body.0", second: "final" };

/** Names in torch's parameter order. */
export function names(m: MlpNames): string[] {
  return [m.first, m.second].flatMap((l) => [`${l}.weight`, `${l}.bias`]);
}

interface Dims {
  readonly inputs: number;
  readonly hidden: number;
  readonly outputs: number;
}

/** The sizes `params` describe; Error naming the problem unless they form this MLP. */
export function dims(m: MlpNames, params: Params): Dims {
  const want = names(m);
  const missing = want.filter((n) => !params.has(n));
  const extra = [...params.keys()].filter((n) => !want.includes(n));
  if (missing.length || extra.length) throw new Error(`expected parameters ${want.join(", ")}; missing [${missing}], unexpected [${extra}]`);
  const [w0, b0, w2, b2] = want.map((n) => params.get(n)!.shape);
  if (w0!.length !== 2 || w2!.length !== 2 || b0!.length !== 1 || b2!.length !== 1 || b0![0] !== w0![0] || w2![1] !== w0![0]
    || b2![0] !== w2![0]) {
    throw new Error(`parameter shapes do not form Linear -> ReLU -> Linear: ${want.map((n, i) => `${n} [${[w0, b0, w2, b2][i]}]`).join(", ")}`);
  }
  return { inputs: w0![1]!, hidden: w0![0]!, outputs: w2![0]! };
}

/** y[b, o] = fr(fr(sum_i x[b, i] * w[o, i]) + bias[o]) for x [rows, inputs], w [outputs, inputs]. */
function linear(x: Float32Array, rows: number, w: Float32Array, bias: Float32Array, inputs: number, outputs: number): Float32Array {
  const y = new Float32Array(rows * outputs);
  for (let b = 0; b < rows; b++) {
    for (let o = 0; o < outputs; o++) {
      let s = 0;
      for (let i = 0; i < inputs; i++) s += x[b * inputs + i]! * w[o * inputs + i]!;
      y[b * outputs + o] = fr(fr(s) + bias[o]!);
    }
  }
  return y;
}

interface Activations {
  readonly x: Float32Array;
  readonly hidden: Float32Array; // after the ReLU
  readonly rows: number;
}

/** Outputs [rows, outputs] of the MLP on x [rows, inputs], and what backward needs. */
export function forward(m: MlpNames, params: Params, x: Float32Array, rows: number): { out: Float32Array; acts: Activations } {
  const d = dims(m, params);
  const p = (n: string): Float32Array => params.get(n)!.data;
  const hidden = linear(x, rows, p(`${m.first}.weight`), p(`${m.first}.bias`), d.inputs, d.hidden);
  for (let i = 0; i < hidden.length; i++) if (!(hidden[i]! > 0)) hidden[i] = 0;
  const out = linear(hidden, rows, p(`${m.second}.weight`), p(`${m.second}.bias`), d.hidden, d.outputs);
  return { out, acts: { x, hidden, rows } };
}

/** Gradients of every parameter from dLoss/dOutputs [rows, outputs]. */
function backward(m: MlpNames, params: Params, acts: Activations, dOut: Float32Array): Map<string, Float32Array> {
  const { inputs, hidden: h, outputs } = dims(m, params);
  const w2 = params.get(`${m.second}.weight`)!.data;
  const { x, hidden, rows } = acts;
  const dHidden = new Float32Array(rows * h);
  for (let b = 0; b < rows; b++) {
    for (let j = 0; j < h; j++) {
      if (!(hidden[b * h + j]! > 0)) continue; // ReLU passes the gradient where its output is positive
      let s = 0;
      for (let o = 0; o < outputs; o++) s += dOut[b * outputs + o]! * w2[o * h + j]!;
      dHidden[b * h + j] = s;
    }
  }
  const outer = (a: Float32Array, aCols: number, c: Float32Array, cCols: number): Float32Array => {
    const g = new Float32Array(aCols * cCols); // a.T @ c
    for (let i = 0; i < aCols; i++) {
      for (let j = 0; j < cCols; j++) {
        let s = 0;
        for (let b = 0; b < rows; b++) s += a[b * aCols + i]! * c[b * cCols + j]!;
        g[i * cCols + j] = s;
      }
    }
    return g;
  };
  const colSum = (a: Float32Array, cols: number): Float32Array => {
    const g = new Float32Array(cols);
    for (let j = 0; j < cols; j++) {
      let s = 0;
      for (let b = 0; b < rows; b++) s += a[b * cols + j]!;
      g[j] = s;
    }
    return g;
  };
  return new Map([[`${m.first}.weight`, outer(dHidden, h, x, inputs)], [`${m.first}.bias`, colSum(dHidden, h)],
    [`${m.second}.weight`, outer(dOut, outputs, hidden, h)], [`${m.second}.bias`, colSum(dOut, outputs)]]);
}

/** Row-wise softmax in float32 (numpy's order: exp of x - max, divided by the row sum). */
function softmaxRows(x: Float32Array, cols: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let o = 0; o < x.length; o += cols) {
    let mx = -Infinity;
    for (let j = 0; j < cols; j++) mx = Math.max(mx, x[o + j]!);
    let s = 0;
    for (let j = 0; j < cols; j++) s += (out[o + j] = fr(Math.exp(fr(x[o + j]! - mx))));
    const sum = fr(s);
    for (let j = 0; j < cols; j++) out[o + j] = fr(out[o + j]! / sum);
  }
  return out;
}

/** Mean cross-entropy of logits [B, C] against y, and its gradient (torch's cross_entropy). */
export function crossEntropy(logits: Float32Array, y: Int32Array, classes: number): { loss: number; grad: Float32Array } {
  const rows = y.length;
  const grad = new Float32Array(logits.length);
  let total = 0;
  for (let b = 0; b < rows; b++) {
    const o = b * classes;
    let mx = -Infinity;
    for (let j = 0; j < classes; j++) mx = Math.max(mx, logits[o + j]!);
    let s = 0;
    for (let j = 0; j < classes; j++) s += fr(Math.exp(fr(logits[o + j]! - mx)));
    const logSum = fr(Math.log(fr(s)));
    for (let j = 0; j < classes; j++) {
      const logProb = fr(fr(logits[o + j]! - mx) - logSum);
      if (j === y[b]) total -= logProb;
      grad[o + j] = fr(fr(fr(Math.exp(logProb)) - (j === y[b] ? 1 : 0)) / rows);
    }
  }
  return { loss: fr(total / rows), grad };
}

const P_MIN = fr(1e-8);

/** NLL of the gate-weighted mixture of frozen expert probabilities [B, E, C] (device_agent's mixture_nll). */
export function mixtureNll(gateLogits: Float32Array, probs: Float32Array, y: Int32Array, experts: number,
  classes: number): { loss: number; grad: Float32Array } {
  const rows = y.length;
  const w = softmaxRows(gateLogits, experts);
  const grad = new Float32Array(gateLogits.length);
  const scale = fr(-1 / rows);
  let total = 0;
  for (let b = 0; b < rows; b++) {
    const label = (j: number): number => probs[(b * experts + j) * classes + y[b]!]!;
    let s = 0;
    for (let j = 0; j < experts; j++) s += fr(w[b * experts + j]! * label(j));
    const pTrue = fr(s);
    total -= Math.log(Math.max(pTrue, P_MIN));
    if (!(pTrue >= P_MIN)) continue; // the clamp passes no gradient where it bites (as torch)
    const dPTrue = fr(scale / pTrue);
    let dot = 0;
    const dW = Array.from({ length: experts }, (_, j) => fr(dPTrue * label(j)));
    for (let j = 0; j < experts; j++) dot += fr(dW[j]! * w[b * experts + j]!);
    const sumDot = fr(dot);
    for (let j = 0; j < experts; j++) grad[b * experts + j] = fr(w[b * experts + j]! * fr(dW[j]! - sumDot));
  }
  return { loss: fr(total / rows), grad };
}

/** Optimizer settings (toolkit.training.OptimSpec's fields). */
export interface OptimSpec {
  readonly kind: "sgd" | "adam";
  readonly lr: number;
  readonly momentum?: number;
  readonly weightDecay?: number;
  readonly gradClip?: number; // default 5
}

type Step = (params: Params, grads: Map<string, Float32Array>) => void;

/** torch.optim.Adam (betas 0.9/0.999, eps 1e-8, L2 weight decay) or SGD (momentum, dampening 0), float32. */
function optimizer(spec: OptimSpec): Step {
  const wd = fr(spec.weightDecay ?? 0);
  const withDecay = (g: Float32Array, p: Float32Array): Float32Array => (wd ? g.map((v, i) => fr(v + fr(wd * p[i]!))) : g);
  if (spec.kind === "sgd") {
    const lr = fr(spec.lr);
    const momentum = fr(spec.momentum ?? 0);
    const buffers = new Map<string, Float32Array>();
    return (params, grads) => {
      for (const [name, t] of params) {
        let g = withDecay(grads.get(name)!, t.data);
        if (momentum) {
          const buf = buffers.get(name);
          if (buf === undefined) buffers.set(name, (g = g.slice()));
          else {
            for (let i = 0; i < buf.length; i++) buf[i] = fr(fr(buf[i]! * momentum) + g[i]!);
            g = buf;
          }
        }
        for (let i = 0; i < g.length; i++) t.data[i] = fr(t.data[i]! - fr(lr * g[i]!));
      }
    };
  }
  const [c1, b2, c2, eps] = [fr(1 - 0.9), fr(0.999), fr(1 - 0.999), fr(1e-8)];
  const m = new Map<string, Float32Array>();
  const v = new Map<string, Float32Array>();
  let steps = 0;
  return (params, grads) => {
    steps += 1;
    const stepSize = fr(-spec.lr / (1 - 0.9 ** steps));
    const bc2 = fr(Math.sqrt(1 - 0.999 ** steps));
    for (const [name, t] of params) {
      const g = withDecay(grads.get(name)!, t.data);
      const mm = m.get(name) ?? m.set(name, new Float32Array(g.length)).get(name)!;
      const vv = v.get(name) ?? v.set(name, new Float32Array(g.length)).get(name)!;
      for (let i = 0; i < g.length; i++) {
        mm[i] = fr(mm[i]! + fr(c1 * fr(g[i]! - mm[i]!)));
        vv[i] = fr(fr(vv[i]! * b2) + fr(fr(c2 * g[i]!) * g[i]!));
        const denom = fr(fr(fr(Math.sqrt(vv[i]!)) / bc2) + eps);
        t.data[i] = fr(t.data[i]! + fr(stepSize * fr(mm[i]! / denom)));
      }
    }
  };
}

/** Scale all gradients so their total L2 norm is at most maxNorm (torch's clip_grad_norm_); the norm. */
function clipGradNorm(grads: Map<string, Float32Array>, maxNorm: number): number {
  let sq = 0;
  for (const g of grads.values()) {
    let s = 0;
    for (const x of g) s += x * x;
    const norm = fr(Math.sqrt(fr(s)));
    sq += norm * norm;
  }
  const total = fr(Math.sqrt(fr(sq)));
  const coef = fr(fr(maxNorm) / fr(total + fr(1e-6)));
  if (!(coef >= 1)) for (const g of grads.values()) for (let i = 0; i < g.length; i++) g[i] = fr(g[i]! * coef);
  return total;
}

/** A local update's schedule: epochs of minibatches in torch's order of `seed`, one optimizer. */
export interface Schedule {
  readonly epochs: number;
  readonly batchSize: number;
  readonly optim: OptimSpec;
}

type BatchLoss = (params: Params, idx: Int32Array) => { loss: number; grad: Map<string, Float32Array> };

/** toolkit.training.optimize: shuffled minibatches (a trailing batch of one dropped), clip, step. */
function optimize(params: Params, s: Schedule, n: number, seed: bigint, batchLoss: BatchLoss): { loss: number } {
  const step = optimizer(s.optim);
  const stream = new TorchStream(seed);
  let total = 0;
  let count = 0;
  for (let e = 0; e < s.epochs; e++) {
    const perm = stream.randperm(n);
    for (let start = 0; start < n; start += s.batchSize) {
      const idx = perm.subarray(start, start + s.batchSize);
      if (idx.length < 2) continue;
      const { loss, grad } = batchLoss(params, idx);
      clipGradNorm(grad, s.optim.gradClip ?? 5);
      step(params, grad);
      total += loss * idx.length;
      count += idx.length;
    }
  }
  return { loss: total / Math.max(count, 1) };
}

function rowsOf(x: Float32Array, cols: number, idx: Int32Array): Float32Array {
  const out = new Float32Array(idx.length * cols);
  idx.forEach((r, i) => out.set(x.subarray(r * cols, (r + 1) * cols), i * cols));
  return out;
}

function ownCopy(m: MlpNames, params: Params): Params {
  return new Map(names(m).map((n) => [n, { shape: [...params.get(n)!.shape], data: Float32Array.from(params.get(n)!.data) }]));
}

/** Stage 2: the expert trained with mean cross-entropy on latents [N, D] and labels; new parameters and loss. */
export function fitExpert(params: Params, latents: Float32Array, labels: Int32Array, s: Schedule, seed: bigint) {
  const d = dims(EXPERT, params);
  const own = ownCopy(EXPERT, params);
  const metrics = optimize(own, s, labels.length, seed, (p, idx) => {
    const { out, acts } = forward(EXPERT, p, rowsOf(latents, d.inputs, idx), idx.length);
    const { loss, grad } = crossEntropy(out, idx.reduce((y, r, i) => ((y[i] = labels[r]!), y), new Int32Array(idx.length)), d.outputs);
    return { loss, grad: backward(EXPERT, p, acts, grad) };
  });
  return { params: own, metrics };
}

/** Stage 3: the gate trained with the mixture NLL against the experts' probabilities [N, E, C]. */
export function fitGate(params: Params, latents: Float32Array, probs: Float32Array, labels: Int32Array, classes: number,
  s: Schedule, seed: bigint) {
  const d = dims(GATE, params);
  const own = ownCopy(GATE, params);
  const metrics = optimize(own, s, labels.length, seed, (p, idx) => {
    const { out, acts } = forward(GATE, p, rowsOf(latents, d.inputs, idx), idx.length);
    const y = idx.reduce((a, r, i) => ((a[i] = labels[r]!), a), new Int32Array(idx.length));
    const { loss, grad } = mixtureNll(out, rowsOf(probs, d.outputs * classes, idx), y, d.outputs, classes);
    return { loss, grad: backward(GATE, p, acts, grad) };
  });
  return { params: own, metrics };
}
