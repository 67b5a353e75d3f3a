/**
 * A web device's side of the NMoE recipe for Stages 2 and 3 (docs/federated.md), as the Python
 * agent's torch-free operations compute it (device_agent/training/numpy_ops.py): the shared
 * extractor's latents of its own data, its expert trained on them, every expert's probabilities on
 * them (its own here, the others' from their devices), its gates trained and evaluated. Stage 1
 * trains convolutions: a web device refuses it (`OperationRefused`), like a Python device without torch.
 *
 * Private state (the extractor's latents, the expert, the gate data, every gate including FedGate's
 * final layer) lives in this object, i.e. in the page's memory: it is never published, and it is
 * lost when the page closes (a reopened page joins the next run; docs/federated.md).
 */
import type { Tensor } from "../wire/tensor.js";
import { extract } from "../train/extractor.js";
import { EXPERT, GATE, type Params, type Schedule, fitExpert, fitGate, forward } from "../train/mlp.js";
import { TorchStream } from "../train/torch_random.js";
import type { DeviceData, Split } from "./device_data.js";
import { type Route, argmaxRows, combine, gateRoute, preprocess, softmax } from "./nmoe.js";

export type Metrics = Record<string, number>;
/** (expert, latents [n, D], n) -> that expert's probabilities [n, C], from the device holding it. */
export type PeerOutputs = (expert: number, z: Float32Array, n: number) => Promise<Float32Array>;
export const INIT = "init."; // the coordinator's seeded initial parameters (TRAIN_EXPERT, PREPARE_GATE)
export const ROUTING = "routing.";

/** This device cannot do the operation; the RESULT (`error`) says why. */
export class OperationRefused extends Error {
  override name = "OperationRefused";
}

interface Latents {
  readonly dim: number;
  readonly train: Float32Array;
  readonly personal: Float32Array;
  readonly public: Float32Array;
}

interface GateInputs {
  readonly trainProbs: Float32Array; // [N, E, C]
  readonly personalProbs: Float32Array;
  readonly publicProbs: Float32Array;
  readonly experts: number;
  readonly init: Params;
}

/** (stage, Stage 1 method, gate) of a job name (stage1_<m>, stage3_<m>_<gate>). */
export function parseJob(job: string): { stage: 1 | 3; stage1: string; gate: string | null } {
  const [kind, ...rest] = job.split("_");
  if (kind === "stage1" && rest.length === 1) return { stage: 1, stage1: rest[0]!, gate: null };
  if (kind === "stage3" && rest.length >= 2) return { stage: 3, stage1: rest[0]!, gate: rest.slice(1).join("_") };
  throw new OperationRefused(`unknown job ${job}`);
}

/** Deep copy of parameters. */
export function copyParams(p: ReadonlyMap<string, Tensor>): Params {
  return new Map([...p].map(([k, t]) => [k, { shape: [...t.shape], data: Float32Array.from(t.data) }]));
}

const num = (o: Record<string, unknown>, section: string, key: string): number => {
  const v = (o[section] as Record<string, unknown> | undefined)?.[key];
  if (typeof v !== "number") throw new OperationRefused(`run_config.${section}.${key} is missing`);
  return v;
};

export class WebOps {
  private readonly extractors = new Map<string, Params>(); // by Stage 1 method
  private readonly latents = new Map<string, Latents>();
  private readonly experts = new Map<string, Params>();
  private readonly gateInputs = new Map<string, GateInputs>();
  readonly gates = new Map<string, Params>(); // by Stage 3 job

  constructor(readonly cid: number, readonly config: Record<string, unknown>, readonly data: DeviceData) {}

  private get numClasses(): number {
    return this.data.classNames.length;
  }

  private latentsOf(stage1: string): Latents {
    const z = this.latents.get(stage1);
    if (z === undefined) throw new OperationRefused(`no extractor of ${stage1} on this device yet (use_extractor first)`);
    return z;
  }

  private inputsOf(stage1: string): GateInputs {
    const g = this.gateInputs.get(stage1);
    if (g === undefined) throw new OperationRefused(`no gate data of ${stage1} on this device yet (prepare_gate first)`);
    return g;
  }

  /** The latent size of Stage 1 method `stage1`'s extractor. */
  latentDim(stage1: string): number {
    return this.latentsOf(stage1).dim;
  }

  useExtractor(stage1: string, tensors: ReadonlyMap<string, Tensor>): [number, Metrics] {
    const weights = new Map([...tensors].map(([k, t]) => [k.startsWith("extractor.") ? k.slice("extractor.".length) : k, t]));
    this.extractors.set(stage1, copyParams(weights));
    let dim = 0;
    const run = (s: Split | null): Float32Array => {
      if (s === null) throw new OperationRefused("the device data has no global test split");
      const r = extract(weights, preprocess(s.x, this.data.spec), s.n, this.data.spec.shape);
      dim = r.dim;
      return r.z;
    };
    const train = run(this.data.train);
    this.latents.set(stage1, { train, personal: run(this.data.test), public: run(this.data.globalTest), dim });
    return [this.data.train.n, {}];
  }

  trainExpert(stage1: string, seed: bigint, init: Params): [number, Metrics] {
    if (init.size === 0) throw new OperationRefused("a web device cannot draw torch's seeded initial expert: send init.* (wants_init)");
    const e = this.config;
    const schedule: Schedule = { epochs: num(e, "expert", "epochs"), batchSize: num(e, "expert", "batch_size"),
      optim: { kind: "adam", lr: num(e, "expert", "lr"), weightDecay: num(e, "expert", "weight_decay") } };
    const { params, metrics } = fitExpert(init, this.latentsOf(stage1).train, this.data.train.y, schedule, seed);
    this.experts.set(stage1, params);
    return [this.data.train.n, metrics];
  }

  /** softmax(own expert(z)) [n, C]. */
  expertOutputs(stage1: string, z: Float32Array, n: number): Float32Array {
    const expert = this.experts.get(stage1);
    if (expert === undefined) throw new OperationRefused(`no expert of ${stage1} on this device yet`);
    return softmax(forward(EXPERT, expert, z, n).out, this.numClasses);
  }

  async prepareGate(stage1: string, experts: readonly number[], peers: PeerOutputs, init: Params): Promise<[number, Metrics]> {
    const z = this.latentsOf(stage1);
    const c = this.numClasses;
    const probs = async (latents: Float32Array): Promise<Float32Array> => {
      const n = latents.length / z.dim;
      const out = new Float32Array(n * experts.length * c);
      for (const [j, e] of experts.entries()) {
        const p = e === this.cid ? this.expertOutputs(stage1, latents, n) : await peers(e, latents, n);
        if (p.length !== n * c) throw new OperationRefused(`expert ${e} answered ${p.length / n} classes, not ${c}`);
        for (let r = 0; r < n; r++) out.set(p.subarray(r * c, (r + 1) * c), (r * experts.length + j) * c);
      }
      return out;
    };
    this.gateInputs.set(stage1, { trainProbs: await probs(z.train), personalProbs: await probs(z.personal),
      publicProbs: await probs(z.public), experts: experts.length, init: copyParams(init) });
    return [this.data.train.n, {}];
  }

  /** The gate of `job`, from the coordinator's initial gate on first use. */
  gateState(job: string): Params {
    let gate = this.gates.get(job);
    if (gate === undefined) {
      const init = this.inputsOf(parseJob(job).stage1).init;
      if (init.size === 0) throw new OperationRefused("a web device cannot draw the initial gate: send init.* (wants_init)");
      this.gates.set(job, (gate = copyParams(init)));
    }
    return gate;
  }

  fit(job: string, params: ReadonlyMap<string, Tensor>, upload: readonly string[], seed: bigint): [Params, number, Metrics] {
    const { stage, stage1 } = parseJob(job);
    if (stage === 1) throw new OperationRefused("Stage 1 trains convolutions: a web device trains Stages 2 and 3 only");
    const g = this.config;
    const schedule: Schedule = { epochs: num(g, "gate", "local_epochs"), batchSize: num(g, "gate", "batch_size"),
      optim: { kind: "adam", lr: num(g, "gate", "lr"), weightDecay: num(g, "gate", "weight_decay") } };
    const state: Params = new Map([...this.gateState(job), ...params]);
    const { params: trained, metrics } = fitGate(state, this.latentsOf(stage1).train, this.inputsOf(stage1).trainProbs,
      this.data.train.y, this.numClasses, schedule, seed);
    this.gates.set(job, trained);
    const missing = upload.filter((n) => !trained.has(n));
    if (missing.length) throw new OperationRefused(`asked to send unknown tensors ${missing.join(", ")}`);
    return [new Map(upload.map((n) => [n, trained.get(n)!])), this.data.train.n, metrics];
  }

  /** The models a commit serves (the gate: the job's state merged with the final shared parameters). */
  finalModels(stage1: string, gateJob: string | null, shared: ReadonlyMap<string, Tensor>): FinalModels {
    const extractor = this.extractors.get(stage1);
    const expert = this.experts.get(stage1);
    if (extractor === undefined || expert === undefined) throw new OperationRefused(`no extractor or expert of ${stage1} on this device`);
    return { extractor, expert, gate: gateJob === null ? null : new Map([...this.gateState(gateJob), ...copyParams(shared)]) };
  }

  evaluate(job: string, params: ReadonlyMap<string, Tensor>, seed: bigint): [number, Metrics] {
    const { stage, stage1, gate } = parseJob(job);
    if (stage === 1) throw new OperationRefused("Stage 1 trains convolutions: a web device trains Stages 2 and 3 only");
    const z = this.latentsOf(stage1);
    const inputs = this.inputsOf(stage1);
    const k = num(this.config, "model", "top_k");
    const e = inputs.experts;
    const route = (latents: Float32Array): Route => {
      const n = latents.length / z.dim;
      if (gate === "rangate") return randomRoute(n, e, k, seed);
      const weights: Params = new Map([...this.gateState(job), ...params]);
      return gateRoute(forward(GATE, weights, latents, n).out, e, k, new Set(Array.from({ length: e }, (_, i) => i)));
    };
    const nmoe = (latents: Float32Array, probs: Float32Array): { predicted: number[]; route: Route } => {
      const r = route(latents);
      const c = this.numClasses;
      const outputs = new Map(Array.from({ length: e }, (_, j) => {
        const m = new Float32Array(r.n * c);
        for (let row = 0; row < r.n; row++) m.set(probs.subarray((row * e + j) * c, (row * e + j + 1) * c), row * c);
        return [j, m] as const;
      }));
      return { predicted: argmaxRows(combine(r, outputs, c), c), route: r };
    };
    const own = nmoe(z.personal, inputs.personalProbs);
    const global = nmoe(z.public, inputs.publicProbs);
    const accuracy = (pred: number[], y: Int32Array): number => pred.filter((p, i) => p === y[i]).length / y.length;
    const shares: Metrics = {};
    for (let j = 0; j < e; j++) shares[`${ROUTING}${j}`] = own.route.experts.filter((x) => x === j).length / own.route.experts.length;
    return [this.data.test.n, { personalized_accuracy: accuracy(own.predicted, this.data.test.y),
      global_accuracy: accuracy(global.predicted, this.data.globalTest!.y), ...shares }];
  }
}

/** What a commit serves: the shared extractor and this device's gate (null: RanGate) and expert. */
export interface FinalModels {
  readonly extractor: Params;
  readonly gate: Params | null;
  readonly expert: Params;
}

/** RanGate as toolkit.evaluate.random_router: torch.rand(n, E) of a fresh stream of `seed`, argsort, first k, weights 1/k. */
function randomRoute(n: number, e: number, k: number, seed: bigint): Route {
  const draws = new TorchStream(seed).rand(n * e);
  const experts = new Int32Array(n * k);
  for (let r = 0; r < n; r++) {
    const order = Array.from({ length: e }, (_, i) => i).sort((a, b) => draws[r * e + a]! - draws[r * e + b]! || a - b);
    for (let s = 0; s < k; s++) experts[r * k + s] = order[s]!;
  }
  return { n, k, experts, weights: new Float32Array(n * k).fill(Math.fround(1 / k)), rerouted: new Map() };
}
