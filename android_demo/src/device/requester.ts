/**
 * Expert requests in flight and the replies that answer them: a reply is matched by correlation id
 * and must come from the expert asked; anything else (malformed, unknown, late, duplicate, wrong
 * expert) is dropped and counted (docs/protocol.md §8).
 */
import { WireError, toHex } from "../wire/bytes.js";
import { type ErrorReply, type Response, decodeFrame, errorName } from "../wire/frames.js";
import { monotonicMs } from "./clock.js";
import { Counters } from "./events.js";

export type Reply = Response | ErrorReply;

/** One REQUEST: the expert and rows it asked for, and its reply once it came. */
export interface Call {
  readonly expert: number;
  readonly rows: readonly number[];
  readonly device: string;
  readonly sentAt: number; // monotonic ms
  reply: Reply | null;
  roundTripMs: number | null;
  replyBytes: number;
}

/** The calls of one inference; `done` resolves when every call is answered. */
export class CallGroup {
  readonly calls = new Map<string, Call>();
  private unanswered = 0;
  private wake: (() => void) | null = null;

  add(cid: string, call: Call): void {
    this.calls.set(cid, call);
    this.unanswered++;
  }

  answer(cid: string, reply: Reply, nbytes: number): boolean {
    const call = this.calls.get(cid)!;
    if (call.reply !== null) return false;
    call.reply = reply;
    call.replyBytes = nbytes;
    call.roundTripMs = monotonicMs() - call.sentAt;
    if (--this.unanswered === 0) this.wake?.();
    return true;
  }

  /** Resolves when every call is answered or `untilMs` (monotonic) is reached. */
  wait(untilMs: number): Promise<void> {
    if (this.unanswered === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(), Math.max(0, untilMs - monotonicMs()));
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }
}

export class ReplyRouter {
  readonly counters = new Counters();
  private readonly groups = new Map<string, CallGroup>();

  /** Register a call before its request is published. */
  track(group: CallGroup, cid: Uint8Array, call: Call): void {
    const key = toHex(cid);
    group.add(key, call);
    this.groups.set(key, group);
    this.counters.add("sent");
  }

  /** Stop matching the group's calls: their late replies are dropped from now on. */
  forget(group: CallGroup): void {
    for (const [cid, call] of group.calls) {
      this.groups.delete(cid);
      if (call.reply === null) this.counters.add("timed_out");
    }
  }

  /** One frame from `reply/{me}/+` (`nbytes`: its size on the wire). */
  deliver(payload: Uint8Array, nbytes: number): void {
    this.counters.add("received");
    let reply;
    try {
      reply = decodeFrame(payload);
    } catch (e) {
      if (!(e instanceof WireError)) throw e;
      this.counters.add("dropped_malformed");
      return;
    }
    if (reply.kind === "request") {
      this.counters.add("dropped_not_reply");
      return;
    }
    const cid = toHex(reply.correlationId);
    const group = this.groups.get(cid);
    if (group === undefined) {
      this.counters.add("dropped_unexpected");
      return;
    }
    if (group.calls.get(cid)!.expert !== reply.expertId) {
      this.counters.add("dropped_wrong_expert");
      return;
    }
    if (!group.answer(cid, reply, nbytes)) {
      this.counters.add("dropped_duplicate");
      return;
    }
    this.counters.add(reply.kind === "response" ? "responses" : `error_${errorName(reply.code)}`);
  }
}
