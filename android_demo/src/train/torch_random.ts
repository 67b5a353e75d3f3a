/**
 * torch's CPU random stream without torch (as device_agent/training/torch_stream.py): MT19937
 * seeded with the low 32 bits of the seed (init_genrand); one 32-bit output per step of
 * `torch.randperm` (Fisher-Yates: swap i with i + r % (n - i)) and per float32 of `torch.rand`
 * ((r & 0xFFFFFF) / 2^24). So the web device shuffles its minibatches and draws RanGate's routing
 * exactly as the simulation and the Python numpy trainer do.
 */

const N = 624;
const M = 397;

/** The outputs of `torch.Generator().manual_seed(seed)`, consumed as torch consumes them. */
export class TorchStream {
  private readonly mt = new Uint32Array(N);
  private index = N;

  constructor(seed: bigint | number) {
    const mt = this.mt;
    mt[0] = Number(BigInt(seed) & 0xffffffffn);
    for (let i = 1; i < N; i++) {
      const prev = mt[i - 1]! ^ (mt[i - 1]! >>> 30);
      mt[i] = (Math.imul(1812433253, prev) + i) >>> 0;
    }
  }

  private twist(): void {
    const mt = this.mt;
    for (let i = 0; i < N; i++) {
      const y = (mt[i]! & 0x80000000) | (mt[(i + 1) % N]! & 0x7fffffff);
      mt[i] = mt[(i + M) % N]! ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0);
    }
    this.index = 0;
  }

  /** The next 32-bit output (genrand_int32). */
  nextU32(): number {
    if (this.index >= N) this.twist();
    let y = this.mt[this.index++]!;
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  /** `torch.randperm(n, generator=g)`. */
  randperm(n: number): Int32Array {
    const perm = Int32Array.from({ length: n }, (_, i) => i);
    if (n < 2) return perm;
    for (let i = 0; i < n - 1; i++) {
      const j = i + (this.nextU32() % (n - i));
      [perm[i], perm[j]] = [perm[j]!, perm[i]!];
    }
    return perm;
  }

  /** `torch.rand(count, generator=g)` (float32, row-major). */
  rand(count: number): Float32Array {
    return Float32Array.from({ length: count }, () => (this.nextU32() & 0xffffff) / 2 ** 24);
  }
}
