/** Clocks: wall time for deadlines (unix ms, as the protocol's), a monotonic one for durations. */

export function nowMs(): number {
  return Date.now();
}

/** Monotonic milliseconds (high resolution). */
export function monotonicMs(): number {
  return performance.now();
}

/** Milliseconds between two monotonic stamps, rounded to the microsecond. */
export function elapsedMs(a: number, b: number): number {
  return Math.round((b - a) * 1000) / 1000;
}
