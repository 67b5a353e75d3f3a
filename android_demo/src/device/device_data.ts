/**
 * A device's own labelled data for federated training: the `.npz` file `nmoe fleet-data` writes
 * (device_agent/device_data.py, docs/federated.md): `train_x` uint8 [N, C, H, W], `train_y` int64,
 * `test_x`/`test_y`, optionally `global_x`/`global_y`, and `meta` (JSON: format, version, client,
 * input shape, pixel scale, mean, std, class names). Loaded from a URL like the bundle; every key,
 * dtype and shape is checked (DeviceDataError naming the problem).
 */
import { ArchiveError, readNpy, readNpyText, readZip } from "./archive.js";
import type { InputSpec } from "./bundle.js";

export const FORMAT = "nmoe-device-data";
export const VERSION = 1;

export class DeviceDataError extends Error {
  override name = "DeviceDataError";
}

/** Raw images [n, C, H, W] and labels. */
export interface Split {
  readonly n: number;
  readonly x: Uint8Array;
  readonly y: Int32Array;
}

export interface DeviceData {
  readonly client: number;
  readonly spec: InputSpec;
  readonly classNames: readonly string[];
  readonly train: Split;
  readonly test: Split;
  readonly globalTest: Split | null;
}

function split(arrays: Map<string, Uint8Array>, name: string, shape: readonly number[], classes: number): Split {
  const xs = arrays.get(`${name}_x.npy`);
  const ys = arrays.get(`${name}_y.npy`);
  if (xs === undefined || ys === undefined) throw new DeviceDataError(`missing ${name}_x / ${name}_y`);
  const x = readNpy(xs);
  const y = readNpy(ys);
  const n = x.shape[0] ?? 0;
  if (x.dtype !== "|u1" || x.shape.length !== 4 || x.shape.slice(1).some((d, i) => d !== shape[i])) {
    throw new DeviceDataError(`${name}_x must be uint8 [N, ${shape.join(", ")}], got ${x.dtype} [${x.shape.join(", ")}]`);
  }
  if (y.dtype !== "<i8" || y.shape.length !== 1 || y.shape[0] !== n) throw new DeviceDataError(`${name}_y must be int64 [${n}]`);
  const labels = Int32Array.from(y.data as Float64Array);
  if (labels.some((v) => v < 0 || v >= classes)) throw new DeviceDataError(`${name}_y has labels outside 0..${classes - 1}`);
  return { n, x: x.data as Uint8Array, y: labels };
}

/** Parse and check a device data file. */
export async function parseDeviceData(bytes: Uint8Array): Promise<DeviceData> {
  try {
    const arrays = await readZip(bytes);
    const metaBytes = arrays.get("meta.npy");
    if (metaBytes === undefined) throw new DeviceDataError("missing `meta` (a JSON string)");
    const meta = JSON.parse(readNpyText(metaBytes)) as Record<string, unknown>;
    if (meta["format"] !== FORMAT) throw new DeviceDataError(`not a device data file (meta.format != "${FORMAT}")`);
    if (meta["version"] !== VERSION) throw new DeviceDataError(`device data version ${meta["version"]}; this device reads ${VERSION}`);
    const shape = meta["input_shape"] as number[];
    const classNames = (meta["class_names"] as unknown[]).map(String);
    const mean = (meta["mean"] as number[]).map(Number);
    const std = (meta["std"] as number[]).map(Number);
    const scale = Number(meta["scale"]);
    if (shape.length !== 3 || mean.length !== shape[0] || std.length !== shape[0] || !std.every((s) => s > 0)
      || !(scale > 0) || classNames.length < 2) {
      throw new DeviceDataError("bad meta: input_shape [C, H, W], mean/std of C values (std > 0), scale > 0, 2+ classes");
    }
    const spec: InputSpec = { shape: [shape[0]!, shape[1]!, shape[2]!], dtype: "uint8", scale, mean, std, layout: "NCHW" };
    const train = split(arrays, "train", shape, classNames.length);
    if (train.n < 2) throw new DeviceDataError("fewer than 2 training samples");
    return { client: Number(meta["client"]), spec, classNames, train, test: split(arrays, "test", shape, classNames.length),
      globalTest: arrays.has("global_x.npy") ? split(arrays, "global", shape, classNames.length) : null };
  } catch (e) {
    if (e instanceof ArchiveError || e instanceof SyntaxError || e instanceof TypeError) {
      throw new DeviceDataError(`not a readable .npz device data file (${e.message})`);
    }
    throw e;
  }
}

/** Fetch and parse the device data file at `url`. */
export async function loadDeviceData(url: string): Promise<DeviceData> {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new DeviceDataError(`${url}: HTTP ${response.status}`);
  try {
    return await parseDeviceData(new Uint8Array(await response.arrayBuffer()));
  } catch (e) {
    if (e instanceof DeviceDataError) throw new DeviceDataError(`${url}: ${e.message}`);
    throw e;
  }
}
