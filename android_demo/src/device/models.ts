/**
 * A device's three models (extractor, gate, own expert) in onnxruntime-web (WebAssembly, one
 * thread: a WebView is not cross-origin isolated). Float in, float out; int8 model I/O, where a
 * manifest declares it, is quantized with the manifest's parameters (docs/bundle.md `quantization`).
 */
import * as ort from "onnxruntime-web/wasm";
import { type Bundle, BundleError, type ModelEntry, type Precision, type Role, type TensorSpec, findModel } from "./bundle.js";
import { rint } from "../wire/tensor.js";

export const RUNTIME_NAME = "onnxruntime-web";

/** Where onnxruntime-web finds its .wasm and .mjs (copied beside the app; never a CDN). */
export function configureOrt(wasmBase: string): void {
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.wasmPaths = wasmBase;
}

/** Calls run one at a time (one WebAssembly instance; a queue keeps them in arrival order). */
class Serial {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(work: () => Promise<T>): Promise<T> {
    const next = this.tail.then(work, work);
    this.tail = next.catch(() => undefined);
    return next;
  }
}

const serial = new Serial();

function toModelInput(x: Float32Array, spec: TensorSpec, shape: number[]): ort.Tensor {
  const q = spec.quantization;
  if (q === null) return new ort.Tensor("float32", x, shape);
  const [lo, hi, Arr] = spec.dtype === "uint8" ? [0, 255, Uint8Array] as const : [-128, 127, Int8Array] as const;
  const data = new Arr(x.length);
  for (let i = 0; i < x.length; i++) data[i] = Math.min(hi, Math.max(lo, rint(x[i]! / q.scale) + q.zeroPoint));
  return new ort.Tensor(spec.dtype === "uint8" ? "uint8" : "int8", data, shape);
}

function fromModelOutput(t: ort.Tensor, spec: TensorSpec): Float32Array {
  const q = spec.quantization;
  if (q === null) return t.data as Float32Array;
  const data = t.data as Int8Array | Uint8Array;
  const scale = Math.fround(q.scale);
  return Float32Array.from(data, (v) => Math.fround(Math.fround(v - q.zeroPoint) * scale));
}

/** One ONNX model with one input and one output. */
export class OrtModel {
  private constructor(private readonly session: ort.InferenceSession, readonly entry: ModelEntry) {}

  static async open(bundle: Bundle, entry: ModelEntry): Promise<OrtModel> {
    const bytes = bundle.files.get(entry.file);
    if (bytes === undefined) throw new BundleError(`${bundle.source}${entry.file}: not loaded`);
    if (entry.inputs.length !== 1 || entry.outputs.length !== 1) {
      throw new BundleError(`${bundle.source}${entry.file}: expected one input and one output`);
    }
    const session = await serial.run(() => ort.InferenceSession.create(bytes, {
      executionProviders: ["wasm"], graphOptimizationLevel: "all" }));
    return new OrtModel(session, entry);
  }

  /** float32 [n, ...rowShape] in, float32 [n, ...] out. */
  run(x: Float32Array, shape: number[]): Promise<Float32Array> {
    const input = this.entry.inputs[0]!;
    const output = this.entry.outputs[0]!;
    return serial.run(async () => {
      const result = await this.session.run({ [input.name]: toModelInput(x, input, shape) });
      const t = result[output.name] ?? Object.values(result)[0];
      if (t === undefined) throw new Error(`${this.entry.file}: no output`);
      return fromModelOutput(t, output);
    });
  }
}

/** The models of one precision; `gate` is null for a bundle with random routing. */
export class DeviceModels {
  private constructor(readonly extractor: OrtModel, readonly gate: OrtModel | null, readonly expert: OrtModel,
    readonly precision: Precision) {}

  static async open(bundle: Bundle, precision: Precision): Promise<DeviceModels> {
    const load = (role: Role): Promise<OrtModel> => OrtModel.open(bundle, findModel(bundle, role, precision, "onnx"));
    const gate = bundle.manifest.routing === "gate" ? await load("gate") : null;
    return new DeviceModels(await load("extractor"), gate, await load("expert"), precision);
  }
}
