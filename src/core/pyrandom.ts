// Python's `random` module (CPython 3.x, MT19937), to reproduce draws the paper's code made with
// `random.seed(42); random.sample(xs, n)` bit for bit: the prompt sets of the refusal recipe (03d),
// and anything else the protocol draws that way. Checked against vectors written by python3
// (test/fixtures/pyrandom/vectors.json, scripts/pyrandom-vectors.py).
//
// What is ported, line for line from CPython's _randommodule.c and random.py:
// - `seed(int)`: init_by_array over the 32-bit words of |a|, least significant first ([0] for 0);
// - `getrandbits(k)` for k ≤ 32, `random()` (53-bit float), `_randbelow` (getrandbits with rejection);
// - `randrange(n)`, `sample(population, k)` (pool or set selection, as Python chooses), `shuffle(x)`.
// Not ported: seeding from str/bytes/None, getrandbits above 32 bits, `counts=` in sample.
import { UsageError } from "./errors.js";

const N = 624;
const M = 397;

export class PyRandom {
  private readonly mt = new Uint32Array(N);
  private mti = N + 1;

  /** Same state as Python's `random.seed(seed)` for an integer seed (|seed| < 2^53). */
  constructor(seed: number) {
    this.seed(seed);
  }

  seed(seed: number): void {
    if (!Number.isSafeInteger(seed)) throw new UsageError(`PyRandom: seed ${seed} must be an integer with |seed| < 2^53 (Python's seeds from str, bytes or None are not supported)`);
    const a = Math.abs(seed);
    const lo = a % 0x1_0000_0000;
    const hi = Math.floor(a / 0x1_0000_0000);
    this.initByArray(hi > 0 ? [lo, hi] : [lo]);
  }

  private initGenrand(s: number): void {
    const mt = this.mt;
    mt[0] = s >>> 0;
    for (let i = 1; i < N; i++) {
      const p = mt[i - 1]!;
      mt[i] = (Math.imul(1812433253, p ^ (p >>> 30)) + i) >>> 0;
    }
    this.mti = N;
  }

  private initByArray(key: readonly number[]): void {
    const mt = this.mt;
    this.initGenrand(19650218);
    let i = 1;
    let j = 0;
    for (let k = Math.max(N, key.length); k > 0; k--) {
      const p = mt[i - 1]!;
      mt[i] = ((mt[i]! ^ Math.imul(p ^ (p >>> 30), 1664525)) + key[j]! + j) >>> 0;
      i++;
      j++;
      if (i >= N) {
        mt[0] = mt[N - 1]!;
        i = 1;
      }
      if (j >= key.length) j = 0;
    }
    for (let k = N - 1; k > 0; k--) {
      const p = mt[i - 1]!;
      mt[i] = ((mt[i]! ^ Math.imul(p ^ (p >>> 30), 1566083941)) - i) >>> 0;
      i++;
      if (i >= N) {
        mt[0] = mt[N - 1]!;
        i = 1;
      }
    }
    mt[0] = 0x80000000;
  }

  /** genrand_uint32: the next 32-bit output. */
  nextU32(): number {
    const mt = this.mt;
    if (this.mti >= N) {
      const mag = (y: number) => (y & 1 ? 0x9908b0df : 0);
      let kk = 0;
      for (; kk < N - M; kk++) {
        const y = (mt[kk]! & 0x80000000) | (mt[kk + 1]! & 0x7fffffff);
        mt[kk] = mt[kk + M]! ^ (y >>> 1) ^ mag(y);
      }
      for (; kk < N - 1; kk++) {
        const y = (mt[kk]! & 0x80000000) | (mt[kk + 1]! & 0x7fffffff);
        mt[kk] = mt[kk + (M - N)]! ^ (y >>> 1) ^ mag(y);
      }
      const y = (mt[N - 1]! & 0x80000000) | (mt[0]! & 0x7fffffff);
      mt[N - 1] = mt[M - 1]! ^ (y >>> 1) ^ mag(y);
      this.mti = 0;
    }
    let y = mt[this.mti++]!;
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  /** random.getrandbits(k), 0 ≤ k ≤ 32. */
  getrandbits(k: number): number {
    if (!Number.isInteger(k) || k < 0 || k > 32) throw new UsageError(`PyRandom.getrandbits: k = ${k}; only 0..32 bits are ported`);
    if (k === 0) return 0;
    return this.nextU32() >>> (32 - k);
  }

  /** random.random(): 53 random bits as a float in [0, 1). */
  random(): number {
    const a = this.nextU32() >>> 5;
    const b = this.nextU32() >>> 6;
    return (a * 67108864 + b) / 9007199254740992;
  }

  /** _randbelow_with_getrandbits: uniform in [0, n), by rejection on n.bit_length() bits. */
  randbelow(n: number): number {
    if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new UsageError(`PyRandom.randbelow: n = ${n} must be an integer in 0..2^32-1`);
    if (n === 0) return 0;
    const k = 32 - Math.clz32(n);
    let r = this.getrandbits(k);
    while (r >= n) r = this.getrandbits(k);
    return r;
  }

  /** random.randrange(n) for one positive argument. */
  randrange(n: number): number {
    if (!Number.isInteger(n) || n <= 0) throw new UsageError(`PyRandom.randrange: empty range for randrange(${n})`);
    return this.randbelow(n);
  }

  /** random.sample(population, k): k distinct positions, in Python's selection order. */
  sample<T>(population: readonly T[], k: number): T[] {
    const n = population.length;
    if (!Number.isInteger(k) || k < 0 || k > n) throw new UsageError(`PyRandom.sample: sample of ${k} from a population of ${n} (Python: "Sample larger than population or is negative")`);
    const result = new Array<T>(k);
    // A set of size k costs more memory than a list of size n past this size (Python's rule).
    let setsize = 21;
    if (k > 5) setsize += 4 ** Math.ceil(Math.log(k * 3) / Math.log(4));
    if (n <= setsize) {
      const pool = [...population];
      for (let i = 0; i < k; i++) {
        const j = this.randbelow(n - i);
        result[i] = pool[j]!;
        pool[j] = pool[n - i - 1]!;
      }
    } else {
      const selected = new Set<number>();
      for (let i = 0; i < k; i++) {
        let j = this.randbelow(n);
        while (selected.has(j)) j = this.randbelow(n);
        selected.add(j);
        result[i] = population[j]!;
      }
    }
    return result;
  }

  /** random.shuffle(x), in place. */
  shuffle<T>(x: T[]): T[] {
    for (let i = x.length - 1; i > 0; i--) {
      const j = this.randbelow(i + 1);
      [x[i], x[j]] = [x[j]!, x[i]!];
    }
    return x;
  }
}
