/** From settings to a running web device: verify the bundle, load its training data (if any), open its models, connect. */
import { type Bundle, type BundleSource, type Precision, loadBundle } from "./bundle.js";
import { DEFAULT_CONFIG, type DeviceConfig, WebDevice } from "./device.js";
import { loadDeviceData } from "./device_data.js";
import { DeviceModels, configureOrt } from "./models.js";
import { TrainingService } from "./training.js";
import { MqttTransport } from "./transport.js";

export interface Settings {
  readonly broker: string; // ws://host:port/mqtt or wss://...
  readonly username?: string;
  readonly password?: string;
  readonly precision?: Precision; // default: fp32 when the bundle has it, else int8
  readonly device?: Partial<DeviceConfig>;
  /** URL of the device's training data (.npz, `nmoe fleet-data`): the device then takes part in
   * federated training (Stages 2-3, docs/federated.md). */
  readonly data?: string;
  readonly maxMessage?: number; // chunk RESULTs above this MQTT packet size (default 256 KiB, §16.4)
}

/** The precision to run: the one asked for, else fp32 when the bundle's ONNX has it, else int8. */
export function choosePrecision(bundle: Bundle, asked?: Precision): Precision {
  if (asked !== undefined) return asked;
  return bundle.manifest.models.some((m) => m.format === "onnx" && m.precision === "fp32") ? "fp32" : "int8";
}

/** Verify `source` (BundleError when it does not verify), open the models, start the device. */
export async function launch(source: BundleSource, settings: Settings, wasmBase: string): Promise<WebDevice> {
  const bundle = await loadBundle(source);
  const data = settings.data === undefined ? null : await loadDeviceData(settings.data);
  if (data !== null && data.client !== bundle.manifest.expertId) {
    throw new Error(`${settings.data}: the data of client ${data.client}, but the bundle holds expert ${bundle.manifest.expertId}`);
  }
  configureOrt(wasmBase);
  const models = await DeviceModels.open(bundle, choosePrecision(bundle, settings.precision));
  const config = { ...DEFAULT_CONFIG, ...settings.device };
  const transport = new MqttTransport({
    url: settings.broker, clientId: `${config.fleet}-${bundle.manifest.deviceId}`,
    ...(settings.username ? { username: settings.username } : {}),
    ...(settings.password ? { password: settings.password } : {}),
  });
  const device = new WebDevice(bundle, models, transport, config);
  if (data !== null) new TrainingService(device, data, settings.maxMessage).attach();
  device.start();
  return device;
}
