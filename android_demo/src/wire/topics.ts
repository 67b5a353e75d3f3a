/** The topic namespace of docs/protocol.md §2: `{prefix}/{fleet}/...`, built and parsed strictly. */
import { WireError, utf8 } from "./bytes.js";

export const MAX_TOPIC = 256;
const ID = /^[A-Za-z0-9_-]{1,64}$/;
const EXPERT = /^(?:0|[1-9]\d{0,4})$/;

/** Whether `id` is a valid fleet or device id (1..64 of A-Z a-z 0-9 _ -). */
export function isId(id: string): boolean {
  return ID.test(id);
}

function checkId(id: string, what: string): string {
  if (!isId(id)) throw new WireError(`bad ${what} id ${JSON.stringify(id)}`);
  return id;
}

/** The expert id written in a topic: decimal 0..65535, no sign, no leading zero; else null. */
export function parseExpertId(text: string): number | null {
  if (!EXPERT.test(text)) return null;
  const v = Number(text);
  return v <= 0xffff ? v : null;
}

export type ParsedTopic =
  | { readonly kind: "presence"; readonly device: string }
  | { readonly kind: "expert"; readonly expert: number }
  | { readonly kind: "reply"; readonly device: string; readonly server: string }
  | { readonly kind: "infer"; readonly device: string }
  | { readonly kind: "train"; readonly device: string; readonly direction: "cmd" | "up" };

/** Topics of one prefix and fleet. */
export class Topics {
  readonly base: string;

  constructor(readonly prefix = "nmoe", readonly fleet = "default") {
    if (prefix.startsWith("$") || !prefix.split("/").every(isId)) throw new WireError(`bad topic prefix ${JSON.stringify(prefix)}`);
    checkId(fleet, "fleet");
    this.base = `${prefix}/${fleet}`;
  }

  private topic(rest: string): string {
    const t = `${this.base}/${rest}`;
    if (utf8(t).length > MAX_TOPIC) throw new WireError(`topic longer than ${MAX_TOPIC} bytes`);
    return t;
  }

  presence(device: string): string {
    return this.topic(`presence/${checkId(device, "device")}`);
  }

  presenceFilter(): string {
    return `${this.base}/presence/+`;
  }

  expertRequest(expert: number): string {
    if (!Number.isInteger(expert) || expert < 0 || expert > 0xffff) throw new WireError(`bad expert id ${expert}`);
    return this.topic(`expert/${expert}/req`);
  }

  inferRequest(device: string): string {
    return this.topic(`infer/${checkId(device, "device")}/req`);
  }

  /** The reply inbox of `device`: written into its requests, never published on itself. */
  reply(device: string): string {
    return this.topic(`reply/${checkId(device, "device")}`);
  }

  /** Where `server` answers `owner`: `{inbox of owner}/{server}`. */
  replyFrom(owner: string, server: string): string {
    return this.topic(`reply/${checkId(owner, "device")}/${checkId(server, "device")}`);
  }

  replyFilter(device: string): string {
    return `${this.reply(device)}/+`;
  }

  /** Where the coordinator sends `device` its COMMANDs (§16.1). */
  trainCommand(device: string): string {
    return this.topic(`train/${checkId(device, "device")}/cmd`);
  }

  /** Where `device` publishes its RESULTs (§16.1). */
  trainResult(device: string): string {
    return this.topic(`train/${checkId(device, "device")}/up`);
  }

  /** The owner of a reply inbox of this fleet (a request's reply topic); WireError otherwise. */
  inboxOwner(topic: string): string {
    const head = `${this.base}/reply/`;
    const owner = topic.startsWith(head) ? topic.slice(head.length) : "";
    if (!isId(owner)) throw new WireError(`reply topic ${JSON.stringify(topic.slice(0, 100))} is not a reply inbox of ${this.base}`);
    return owner;
  }

  /** One of the topic forms of this prefix and fleet, or null for anything else. */
  parse(topic: string): ParsedTopic | null {
    if (!topic.startsWith(`${this.base}/`) || utf8(topic).length > MAX_TOPIC) return null;
    const parts = topic.slice(this.base.length + 1).split("/");
    const [kind, a = "", b] = parts;
    if (kind === "presence" && parts.length === 2 && isId(a)) return { kind, device: a };
    if (kind === "reply" && parts.length === 3 && isId(a) && b !== undefined && isId(b)) return { kind, device: a, server: b };
    if (kind === "train" && parts.length === 3 && isId(a) && (b === "cmd" || b === "up")) return { kind, device: a, direction: b };
    if (parts.length === 3 && b === "req") {
      if (kind === "infer" && isId(a)) return { kind, device: a };
      const expert = parseExpertId(a);
      if (kind === "expert" && expert !== null) return { kind, expert };
    }
    return null;
  }
}
