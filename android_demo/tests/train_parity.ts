/**
 * The TypeScript trainer on a case written by tests/web/test_web_trainer.py: `node
 * build/tools/train_parity.mjs IN.json OUT.json` runs fitExpert or fitGate on the case's initial
 * parameters, data, schedule and seed and writes the new parameters and the loss.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { type OptimSpec, type Params, fitExpert, fitGate } from "../src/train/mlp.js";

interface Case {
  kind: "expert" | "gate";
  params: Record<string, { shape: number[]; values: number[] }>;
  latents: number[];
  labels: number[];
  probs?: number[];
  classes: number;
  epochs: number;
  batch_size: number;
  optim: { kind: "sgd" | "adam"; lr: number; momentum: number; weight_decay: number; grad_clip: number };
  seed: string;
}

const c = JSON.parse(readFileSync(process.argv[2]!, "utf8")) as Case;
const params: Params = new Map(Object.entries(c.params).map(([k, t]) => [k, { shape: t.shape, data: Float32Array.from(t.values) }]));
const optim: OptimSpec = { kind: c.optim.kind, lr: c.optim.lr, momentum: c.optim.momentum, weightDecay: c.optim.weight_decay,
  gradClip: c.optim.grad_clip };
const schedule = { epochs: c.epochs, batchSize: c.batch_size, optim };
const latents = Float32Array.from(c.latents);
const labels = Int32Array.from(c.labels);
const started = performance.now();
const out = c.kind === "expert" ? fitExpert(params, latents, labels, schedule, BigInt(c.seed))
  : fitGate(params, latents, Float32Array.from(c.probs!), labels, c.classes, schedule, BigInt(c.seed));
writeFileSync(process.argv[3]!, JSON.stringify({ ms: performance.now() - started, loss: out.metrics.loss,
  params: Object.fromEntries([...out.params].map(([k, t]) => [k, [...t.data]])) }));
