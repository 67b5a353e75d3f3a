/**
 * The device's view of the fleet from the retained presences on `presence/+` (docs/agent.md
 * "Presence"): a peer is usable while its latest presence is online with our model version and it
 * has not answered WRONG_MODEL_VERSION since.
 */
import { WireError } from "../wire/bytes.js";
import { type Caps, type OnlinePresence, decodePresence } from "../wire/presence.js";
import { Counters } from "./events.js";

export interface Peer {
  readonly device: string;
  readonly expert: number;
  readonly model: string;
  readonly caps: Caps;
  readonly ts: number;
}

export class FleetView {
  readonly counters = new Counters();
  private readonly peers = new Map<string, Peer>();
  private readonly incompatible = new Set<string>();
  private readonly listeners: (() => void)[] = [];

  constructor(private readonly me: string) {}

  /** Apply the presence of `device` (named by its topic): "online", "offline", "removed", or null
   * when ignored (our own, or invalid: the previous view of that device is kept). */
  update(device: string, payload: Uint8Array): string | null {
    this.counters.add("received");
    if (device === this.me) return null;
    let status = "removed";
    let peer: Peer | null = null;
    if (payload.length > 0) {
      try {
        const p = decodePresence(payload);
        if (p.device !== device) throw new WireError("presence device differs from its topic");
        status = p.status;
        if (p.status === "online") peer = peerOf(p);
      } catch (e) {
        if (!(e instanceof WireError)) throw e;
        this.counters.add("invalid");
        return null;
      }
    }
    this.incompatible.delete(device);
    if (peer === null) this.peers.delete(device);
    else this.peers.set(device, peer);
    this.counters.add(status);
    this.changed();
    return status;
  }

  clear(): void {
    this.peers.clear();
    this.incompatible.clear();
    this.changed();
  }

  markIncompatible(device: string): void {
    this.incompatible.add(device);
  }

  /** The usable device holding `expert` (the most recently born if several do). */
  peer(expert: number, model: string): Peer | null {
    let best: Peer | null = null;
    for (const p of this.usable(model)) if (p.expert === expert && (best === null || p.ts > best.ts)) best = p;
    return best;
  }

  liveExperts(model: string): Set<number> {
    return new Set(this.usable(model).map((p) => p.expert));
  }

  /** Every peer seen online (whatever its model), for the UI. */
  all(): Peer[] {
    return [...this.peers.values()].sort((a, b) => a.expert - b.expert || (a.device < b.device ? -1 : 1));
  }

  onChange(listener: () => void): void {
    this.listeners.push(listener);
  }

  private changed(): void {
    for (const l of this.listeners) l();
  }

  private usable(model: string): Peer[] {
    return [...this.peers].filter(([d, p]) => p.model === model && !this.incompatible.has(d)).map(([, p]) => p);
  }
}

function peerOf(p: OnlinePresence): Peer {
  return { device: p.device, expert: p.expert, model: p.model, caps: p.caps, ts: p.ts };
}
