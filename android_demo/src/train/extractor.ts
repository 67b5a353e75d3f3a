/**
 * The shared Stage 1 extractor on the device, from its named weights (toolkit.models.Extractor,
 * device_agent/model_build.py): three 3x3 stride-2 padding-1 convolutions with ReLU, flatten,
 * a linear projection to the latent. Float32 storage, float64 sums: the latents equal ONNX
 * Runtime's within float32 rounding.
 */
import type { Tensor } from "../wire/tensor.js";

const fr = Math.fround;
const CONVS = ["features.0", "features.2", "features.4"] as const;

function weight(weights: ReadonlyMap<string, Tensor>, name: string): Tensor {
  const t = weights.get(name);
  if (t === undefined) throw new Error(`extractor: no weight ${name}`);
  return t;
}

/** One conv layer + ReLU on x [n, c, h, w]; the output and its shape. */
function convRelu(x: Float32Array, n: number, c: number, h: number, w: number, k: Tensor, b: Tensor) {
  const out = k.shape[0]!;
  if (k.shape.length !== 4 || k.shape[1] !== c || k.shape[2] !== 3 || k.shape[3] !== 3 || b.shape[0] !== out) {
    throw new Error(`extractor: conv weight [${k.shape}] does not take ${c} channels`);
  }
  const oh = Math.floor((h - 1) / 2) + 1;
  const ow = Math.floor((w - 1) / 2) + 1;
  const y = new Float32Array(n * out * oh * ow);
  for (let s = 0; s < n; s++) {
    for (let o = 0; o < out; o++) {
      for (let i = 0; i < oh; i++) {
        for (let j = 0; j < ow; j++) {
          let acc = 0;
          for (let ci = 0; ci < c; ci++) {
            for (let di = 0; di < 3; di++) {
              const r = 2 * i - 1 + di;
              if (r < 0 || r >= h) continue;
              for (let dj = 0; dj < 3; dj++) {
                const q = 2 * j - 1 + dj;
                if (q < 0 || q >= w) continue;
                acc += x[((s * c + ci) * h + r) * w + q]! * k.data[((o * c + ci) * 3 + di) * 3 + dj]!;
              }
            }
          }
          y[((s * out + o) * oh + i) * ow + j] = Math.max(0, fr(fr(acc) + b.data[o]!));
        }
      }
    }
  }
  return { y, c: out, h: oh, w: ow };
}

/** Latents [n, D] of normalized inputs x [n, C, H, W]; `weights` named without the "extractor." prefix. */
export function extract(weights: ReadonlyMap<string, Tensor>, x: Float32Array, n: number, shape: readonly [number, number, number]) {
  let [c, h, w] = shape;
  let a = x;
  for (const layer of CONVS) {
    const r = convRelu(a, n, c, h, w, weight(weights, `${layer}.weight`), weight(weights, `${layer}.bias`));
    [a, c, h, w] = [r.y, r.c, r.h, r.w];
  }
  const pw = weight(weights, "project.weight");
  const pb = weight(weights, "project.bias");
  const flat = c * h * w;
  const d = pw.shape[0]!;
  if (pw.shape[1] !== flat || pb.shape[0] !== d) throw new Error(`extractor: project.weight [${pw.shape}] does not take ${flat} features`);
  const z = new Float32Array(n * d);
  for (let s = 0; s < n; s++) {
    for (let o = 0; o < d; o++) {
      let acc = 0;
      for (let i = 0; i < flat; i++) acc += a[s * flat + i]! * pw.data[o * flat + i]!;
      z[s * d + o] = fr(fr(acc) + pb.data[o]!);
    }
  }
  return { z, dim: d };
}
