/**
 * The device's broker connection: mqtt.js over WebSockets (MQTT 3.1.1, clean session, keep-alive
 * 30 s, client id `{fleet}-{device}`, the last will registered at connect), reconnecting by itself
 * and subscribing again on every reconnect; the same seam as the Python agent's `Transport`.
 */
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";

/** One message to publish (also a will). */
export interface Publication {
  readonly topic: string;
  readonly payload: Uint8Array;
  readonly qos: 0 | 1;
  readonly retain: boolean;
}

/** The names are the event log's (docs/agent.md). */
export type ConnectionEvent = "connect" | "reconnect" | "disconnect" | "connect_refused" | "connect_failed";

export type MessageHandler = (topic: string, payload: Uint8Array) => void;
export type ConnectionHandler = (event: ConnectionEvent, detail: string) => void;

export interface TransportSettings {
  readonly url: string; // ws://host:port/mqtt or wss://...
  readonly clientId: string;
  readonly username?: string;
  readonly password?: string;
}

/** Bytes of an MQTT 3.1.1 QoS 0 PUBLISH packet carrying `payload` on `topic` (as the Python agent counts). */
export function publishPacketSize(topic: string, payload: Uint8Array): number {
  const remaining = 2 + new TextEncoder().encode(topic).length + payload.length;
  const lengthBytes = 1 + Number(remaining >= 128) + Number(remaining >= 16384) + Number(remaining >= 2097152);
  return 1 + lengthBytes + remaining;
}

/** Write what mqtt.js has queued now. It corks its stream per packet and uncorks on the next tick,
 * which its browser build implements with setTimeout(0): ~0.5 ms per message on a busy page. */
function flush(client: MqttClient): void {
  (client.stream as { uncork?: () => void } | undefined)?.uncork?.();
}

export class MqttTransport {
  private client: MqttClient | null = null;
  private readonly filters: [string, 0 | 1][] = [];
  private everConnected = false;

  constructor(private readonly settings: TransportSettings) {}

  /** Subscribe on every (re)connect (call before `connect`). */
  subscribe(filter: string, qos: 0 | 1 = 0): void {
    this.filters.push([filter, qos]);
  }

  /** Start connecting in the background with `will` as the last will. */
  connect(will: Publication, onMessage: MessageHandler, onConnection: ConnectionHandler): void {
    const s = this.settings;
    const options: IClientOptions = {
      clientId: s.clientId, clean: true, keepalive: 30, protocolVersion: 4, reconnectPeriod: 1000,
      connectTimeout: 10000, resubscribe: false,
      will: { topic: will.topic, payload: will.payload as never, qos: will.qos, retain: will.retain },
      ...(s.username === undefined ? {} : { username: s.username }),
      ...(s.password === undefined ? {} : { password: s.password }),
    };
    const client = mqtt.connect(s.url, options);
    this.client = client;
    let up = false; // connected right now
    let reported = false; // the current outage was already reported
    client.on("connect", () => {
      up = true;
      reported = false;
      // reported once the broker has granted every subscription: the birth presence that follows
      // promises peers that requests reach this device
      const filters = Object.fromEntries(this.filters.map(([filter, qos]) => [filter, { qos }]));
      client.subscribe(filters, () => {
        if (!client.connected) return;
        onConnection(this.everConnected ? "reconnect" : "connect", `${s.url} (MQTT 3.1.1)`);
        this.everConnected = true;
      });
      flush(client);
    });
    client.on("message", (topic, payload) => onMessage(topic, payload as Uint8Array));
    client.on("error", (e) => {
      if (!reported) onConnection("connect_refused", `${s.url}: ${e.message}`);
      reported = true;
    });
    client.on("close", () => {
      if (up) {
        up = false;
        onConnection("disconnect", `${s.url}: connection lost`);
      } else if (!reported) {
        // mqtt.js emits no error when the WebSocket handshake fails: a close before any CONNACK says it
        onConnection("connect_failed", `nothing answers at ${s.url}`);
        reported = true;
      }
    });
  }

  get connected(): boolean {
    return this.client?.connected ?? false;
  }

  /** Queue one message; QoS 0 while disconnected is dropped (requests are never queued for later). */
  publish(topic: string, payload: Uint8Array, qos: 0 | 1 = 0, retain = false): void {
    const client = this.client;
    if (client === null || (!client.connected && qos === 0)) return;
    client.publish(topic, payload as never, { qos, retain });
    flush(client);
  }

  /** Publish `last` (waiting up to `timeoutMs` for its PUBACK), then disconnect cleanly (no will). */
  async close(last: Publication | null, timeoutMs = 2000): Promise<void> {
    const client = this.client;
    if (client === null) return;
    if (last !== null && client.connected) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, timeoutMs);
        client.publish(last.topic, last.payload as never, { qos: last.qos, retain: last.retain }, () => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    await new Promise<void>((resolve) => client.end(false, {}, () => resolve()));
    this.client = null;
  }
}
