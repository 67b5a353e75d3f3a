/**
 * numpy's `default_rng([seed, expert])` (SeedSequence -> PCG64, XSL-RR output), so that random
 * routing (RanGate) draws exactly what the Python agent and `LocalNMoE` draw: `random()`,
 * `permutation()` as numpy's Generator computes them.
 */

const M32 = 0xffffffff;
const M64 = (1n << 64n) - 1n;
const M128 = (1n << 128n) - 1n;
const PCG_MULT = (2549297995355413924n << 64n) + 4865540595714422341n;

const mul32 = (a: number, b: number): number => Math.imul(a, b) >>> 0;

/** numpy.random.SeedSequence(entropy).generate_state(nWords64, uint64) for small non-negative ints. */
export function seedSequenceState(entropy: readonly number[], nWords64: number): bigint[] {
  const words = entropy.flatMap((v) => {
    if (!Number.isSafeInteger(v) || v < 0) throw new Error(`seed ${v} must be a non-negative integer`);
    const out: number[] = [];
    let x = v;
    do {
      out.push(x % 2 ** 32);
      x = Math.floor(x / 2 ** 32);
    } while (x > 0);
    return out;
  });
  const poolSize = 4;
  let hashConst = 0x43b0d7e5;
  const hashmix = (value: number): number => {
    let v = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, 0x931e8875);
    v = mul32(v, hashConst);
    return (v ^ (v >>> 16)) >>> 0;
  };
  const mix = (x: number, y: number): number => {
    const r = (mul32(0xca01f9dd, x) - mul32(0x4973f715, y)) >>> 0;
    return (r ^ (r >>> 16)) >>> 0;
  };
  const pool = Array.from({ length: poolSize }, (_, i) => hashmix(words[i] ?? 0));
  for (let src = 0; src < poolSize; src++) {
    for (let dst = 0; dst < poolSize; dst++) if (src !== dst) pool[dst] = mix(pool[dst]!, hashmix(pool[src]!));
  }
  for (let src = poolSize; src < words.length; src++) {
    for (let dst = 0; dst < poolSize; dst++) pool[dst] = mix(pool[dst]!, hashmix(words[src]!));
  }
  let hc = 0x8b51f9dd;
  const state32: number[] = [];
  for (let i = 0; i < 2 * nWords64; i++) {
    let v = (pool[i % poolSize]! ^ hc) >>> 0;
    hc = mul32(hc, 0x58f38ded);
    v = mul32(v, hc);
    state32.push((v ^ (v >>> 16)) >>> 0);
  }
  return Array.from({ length: nWords64 }, (_, i) => (BigInt(state32[2 * i + 1]!) << 32n) | BigInt(state32[2 * i]!));
}

/** numpy.random.Generator(PCG64(SeedSequence(entropy))): the draws random routing uses. */
export class NumpyRandom {
  private state: bigint;
  private readonly inc: bigint;
  private cachedUint32: number | null = null;

  constructor(entropy: readonly number[]) {
    const [s0, s1, s2, s3] = seedSequenceState(entropy, 4) as [bigint, bigint, bigint, bigint];
    this.inc = (((s2 << 64n) | s3) << 1n | 1n) & M128;
    this.state = 0n;
    this.step();
    this.state = (this.state + ((s0 << 64n) | s1)) & M128;
    this.step();
  }

  private step(): void {
    this.state = (this.state * PCG_MULT + this.inc) & M128;
  }

  nextUint64(): bigint {
    this.step();
    const xored = ((this.state >> 64n) ^ this.state) & M64;
    const rot = Number(this.state >> 122n);
    return ((xored >> BigInt(rot)) | (xored << BigInt((64 - rot) & 63))) & M64;
  }

  nextUint32(): number {
    if (this.cachedUint32 !== null) {
      const v = this.cachedUint32;
      this.cachedUint32 = null;
      return v;
    }
    const next = this.nextUint64();
    this.cachedUint32 = Number(next >> 32n);
    return Number(next & BigInt(M32));
  }

  /** A double in [0, 1): (next_uint64 >> 11) * 2^-53. */
  random(): number {
    return Number(this.nextUint64() >> 11n) * 2 ** -53;
  }

  /** An integer in [0, max] by masked rejection (numpy's random_interval). */
  private interval(max: number): number {
    if (max === 0) return 0;
    let mask = max;
    for (const s of [1, 2, 4, 8, 16]) mask |= mask >>> s;
    for (;;) {
      const v = (this.nextUint32() & mask) >>> 0;
      if (v <= max) return v;
    }
  }

  /** Generator.permutation of a 1-D array (Fisher-Yates from the end). */
  permutation<T>(items: readonly T[]): T[] {
    const x = [...items];
    for (let i = x.length - 1; i >= 1; i--) {
      const j = this.interval(i);
      [x[i], x[j]] = [x[j]!, x[i]!];
    }
    return x;
  }
}
