/** Counters and the event stream of a web device: the same event names and fields as `nmoe agent --events`. */

/** Named counters that start at 0. */
export class Counters {
  private readonly values = new Map<string, number>();

  add(name: string, n = 1): void {
    this.values.set(name, (this.values.get(name) ?? 0) + n);
  }

  get(name: string): number {
    return this.values.get(name) ?? 0;
  }

  snapshot(): Record<string, number> {
    return Object.fromEntries([...this.values].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
  }
}

/** One event: `ts` (unix seconds), `event` and its fields (docs/agent.md "Event log"). */
export type DeviceEvent = { readonly ts: number; readonly event: string } & Readonly<Record<string, unknown>>;

export type EventSink = (event: DeviceEvent) => void;

/** Fans events out to every subscriber (the UI, the headless launcher, the console). */
export class EventLog {
  private readonly sinks: EventSink[] = [];

  subscribe(sink: EventSink): void {
    this.sinks.push(sink);
  }

  emit(event: string, fields: Record<string, unknown> = {}): void {
    const e: DeviceEvent = { ts: Date.now() / 1000, event, ...fields };
    for (const sink of this.sinks) {
      try {
        sink(e);
      } catch (err) {
        console.error("event sink failed", err);
      }
    }
  }
}
