// The CPU GEMM runtime (src/engine/cpu/runtime.ts, kernels.ts, wasm-emit.ts, worker.ts) against a
// float64 plain-JS reference: random and edge shapes on both kernel paths (direct for small M,
// packed for larger M, K blocks beyond kc), unaligned offsets, strides wider than the rows,
// accumulate on/off, 1 and 2 threads, gemmBatch with many tiny gemms; that the checker would
// catch typical kernel bugs; the allocator (alignment, zero fill, mark/release, growth, the
// 4 GiB limit); argument checks; and that dispose() (or no dispose at all) lets the process exit.
// Nothing here is timed.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { CpuRuntime, guidedCuts, type Gemm } from "../src/engine/cpu/runtime.js";
import { buildKernelModule, DEFAULT_KERNEL, directUnroll } from "../src/engine/cpu/kernels.js";
import { prng } from "./support/prng.js";

/** Deterministic uniform [-1, 1) generator. */
function rng(seed: number): () => number {
  const u = prng(seed);
  return () => u() * 2 - 1;
}

/** Float64 reference of one gemm over a snapshot of the memory (y read from `y0`). */
function reference(f: Float32Array, y0: Float32Array, g: Gemm): Float64Array {
  const out = new Float64Array(g.M * g.N);
  for (let m = 0; m < g.M; m++) {
    for (let n = 0; n < g.N; n++) {
      let s = g.accumulate ? y0[g.y + m * g.ldy + n]! : 0;
      const xo = g.x + m * g.ldx;
      const wo = g.w + n * g.ldw;
      for (let k = 0; k < g.K; k++) s += f[xo + k]! * f[wo + k]!;
      out[m * g.N + n] = s;
    }
  }
  return out;
}

/**
 * Worst |y - ref| over the tolerance 2e-5 * (sqrt(K) * max|x| * max|w| + max|y0|): < 1 passes.
 * (f32 accumulation of K products has error ~ sqrt(K) * eps * |x||w|; eps = 6e-8.)
 */
function errorRatio(y: ArrayLike<number>, ref: Float64Array, K: number, xmax: number, wmax: number, y0max: number): number {
  const tol = 2e-5 * (Math.sqrt(Math.max(K, 1)) * xmax * wmax + y0max) + 1e-30;
  let worst = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = Math.abs(y[i]! - ref[i]!);
    if (!(d <= tol * 1e30)) return Infinity; // NaN or absurd
    worst = Math.max(worst, d / tol);
  }
  return worst;
}

interface Layout {
  M: number;
  N: number;
  K: number;
  /** Extra floats per row beyond K (X, W) or N (Y). */
  padX?: number;
  padW?: number;
  padY?: number;
  /** Offsets (in floats) of each operand from a 64-byte aligned allocation. */
  offX?: number;
  offW?: number;
  offY?: number;
  accumulate?: boolean;
}

/**
 * Runs one gemm of the given layout on random data and checks it against the reference. Y rows
 * are surrounded by sentinels that must stay untouched (the padding between N and ldy, and a
 * guard before and after), and without accumulate Y starts as NaN so that reading it would show.
 */
function checkGemm(rt: CpuRuntime, L: Layout, seed: number): void {
  const r = rng(seed);
  const { M, N, K } = L;
  const ldx = K + (L.padX ?? 0);
  const ldw = K + (L.padW ?? 0);
  const ldy = N + (L.padY ?? 0);
  const mark = rt.mark();
  const GUARD = 8;
  const xa = rt.alloc(M * ldx + 16);
  const wa = rt.alloc(N * ldw + 16);
  const ya = rt.alloc(M * ldy + 16 + 2 * GUARD);
  const g: Gemm = { x: xa + (L.offX ?? 0), ldx, w: wa + (L.offW ?? 0), ldw, y: ya + GUARD + (L.offY ?? 0), ldy, M, N, K, accumulate: L.accumulate ?? false };
  const f = rt.f32;
  for (let i = 0; i < M * ldx; i++) f[g.x + i] = r();
  for (let i = 0; i < N * ldw; i++) f[g.w + i] = r() * 0.5;
  const SENT = 12345.5;
  for (let i = ya; i < ya + M * ldy + 16 + 2 * GUARD; i++) f[i] = SENT;
  for (let m = 0; m < M; m++) for (let n = 0; n < N; n++) f[g.y + m * ldy + n] = g.accumulate ? r() * 4 : NaN;
  // Snapshot of the three allocations (contiguous), with the gemm's offsets shifted to it.
  const lo = Math.min(xa, wa, ya);
  const hi = Math.max(xa + M * ldx + 16, wa + N * ldw + 16, ya + M * ldy + 16 + 2 * GUARD);
  const snap = f.slice(lo, hi);
  const y0 = { at: (i: number) => snap[i - lo]! };
  rt.gemm(g);
  const out = rt.f32;
  const ref = reference(snap, snap, { ...g, x: g.x - lo, w: g.w - lo, y: g.y - lo });
  const y = new Float64Array(M * N);
  for (let m = 0; m < M; m++) for (let n = 0; n < N; n++) y[m * N + n] = out[g.y + m * ldy + n]!;
  const ratio = errorRatio(y, ref, K, 1, 0.5, g.accumulate ? 4 : 0);
  const what = `gemm M=${M} N=${N} K=${K} ld=${ldx}/${ldw}/${ldy} off=${L.offX ?? 0}/${L.offW ?? 0}/${L.offY ?? 0} acc=${g.accumulate} threads=${rt.threads}`;
  assert.ok(ratio < 1, `${what}: error ${ratio.toFixed(3)} x tolerance`);
  // Everything in the Y allocation outside the M x N block is untouched.
  for (let i = ya; i < ya + M * ldy + 16 + 2 * GUARD; i++) {
    const rel = i - g.y;
    const inBlock = rel >= 0 && rel < M * ldy && rel % ldy < N;
    if (!inBlock) assert.equal(out[i], SENT, `${what}: wrote outside Y at ${rel}`);
  }
  // X and W are unchanged.
  for (let i = 0; i < M * ldx; i++) if (out[g.x + i] !== y0.at(g.x + i)) assert.fail(`${what}: X modified`);
  for (let i = 0; i < N * ldw; i++) if (out[g.w + i] !== y0.at(g.w + i)) assert.fail(`${what}: W modified`);
  rt.release(mark);
}

const SIZES = [1, 2, 3, 5, 7, 64, 128, 131, 768];

/** A reproducible list of layouts: edge cases plus random draws from SIZES. */
function layouts(): Layout[] {
  const list: Layout[] = [
    { M: 1, N: 1, K: 1 },
    { M: 1, N: 1, K: 1, accumulate: true },
    { M: 1, N: 5, K: 3, offX: 1, offW: 3, offY: 1 },
    { M: 2, N: 3, K: 2, padX: 1, padW: 2, padY: 3 },
    { M: 3, N: 7, K: 7, offX: 3, offW: 1, offY: 2, accumulate: true },
    { M: 4, N: 4, K: 4 },
    { M: 5, N: 9, K: 13, padX: 3, padW: 1, padY: 1, offX: 1, offW: 2, offY: 3 },
    { M: 7, N: 131, K: 5, accumulate: true },
    { M: 64, N: 64, K: 768, offX: 1, offW: 1, offY: 1 },
    { M: 131, N: 7, K: 131, padX: 5, padW: 3, padY: 2, accumulate: true },
    // K beyond the packed path's K block (kc): several blocks, the later ones accumulate.
    { M: 9, N: 6, K: 2 * DEFAULT_KERNEL.kc + 3, offX: 1, offW: 2, offY: 1 },
    { M: 6, N: 5, K: DEFAULT_KERNEL.kc + 1, accumulate: true, padX: 1 },
    { M: 2, N: 3, K: 2 * DEFAULT_KERNEL.kc + 2 },
    // M blocks: more X rows than fit in one packed block (l2Bytes / (4 * K) rows).
    { M: 100, N: 9, K: 1536, offY: 1 },
    { M: 128, N: 128, K: 64, accumulate: true, offX: 3, offW: 3, offY: 3, padY: 1 },
  ];
  const r = rng(7);
  const pick = () => SIZES[Math.floor(((r() + 1) / 2) * SIZES.length)] as number;
  while (list.length < 60) {
    const M = pick();
    const N = pick();
    const K = pick();
    if (M * N * K > 6e6) continue;
    const odd = () => Math.floor(((r() + 1) / 2) * 4);
    list.push({ M, N, K, padX: odd(), padW: odd(), padY: odd(), offX: odd(), offW: odd(), offY: odd(), accumulate: r() > 0 });
  }
  return list;
}

describe("checker", () => {
  test("the error measure rejects typical kernel bugs", () => {
    const r = rng(3);
    const M = 3;
    const N = 5;
    const K = 67;
    const f = new Float32Array(M * K + N * K + M * N);
    for (let i = 0; i < M * K + N * K; i++) f[i] = r();
    const g: Gemm = { x: 0, ldx: K, w: M * K, ldw: K, y: M * K + N * K, ldy: N, M, N, K };
    const ref = reference(f, f, g);
    // A correct f32 computation passes.
    const good = new Float32Array(ref);
    assert.ok(errorRatio(good, ref, K, 1, 1, 0) < 1);
    // Dropping the K % 4 tail, the last k, a row offset error, a wrong stride: all fail.
    const variant = (kEnd: number, xShift: number, wld: number) => {
      const out = new Float64Array(M * N);
      for (let m = 0; m < M; m++) {
        for (let n = 0; n < N; n++) {
          let s = 0;
          for (let k = 0; k < kEnd; k++) s += f[Math.min(M - 1, m + xShift) * K + k]! * f[M * K + n * wld + k]!;
          out[m * N + n] = s;
        }
      }
      return out;
    };
    assert.ok(errorRatio(variant(K - (K % 4), 0, K), ref, K, 1, 1, 0) > 1, "tail dropped");
    assert.ok(errorRatio(variant(K - 1, 0, K), ref, K, 1, 1, 0) > 1, "last k dropped");
    assert.ok(errorRatio(variant(K, 1, K), ref, K, 1, 1, 0) > 1, "wrong X row");
    assert.ok(errorRatio(variant(K, 0, K - 1), ref, K, 1, 1, 0) > 1, "wrong W stride");
    const nan = new Float64Array(ref);
    nan[4] = NaN;
    assert.equal(errorRatio(nan, ref, K, 1, 1, 0), Infinity, "NaN");
  });

  test("kernel modules validate for every tile configuration tried", () => {
    for (const relaxed of [false, true]) {
      for (const shared of [false, true]) {
        for (const [mr, nr] of [[2, 4], [3, 3], [4, 2], [1, 8]] as const) {
          const bytes = buildKernelModule({ ...DEFAULT_KERNEL, relaxed, relaxedDot: relaxed, shared, mr, nr, nb: 4 * nr });
          if (!relaxed) assert.ok(WebAssembly.validate(bytes), `mr=${mr} nr=${nr} shared=${shared}`);
        }
      }
    }
    // Direct tiles stay within the register budget.
    for (let a = 1; a <= 4; a++) {
      const { ku, sets } = directUnroll(a, 1, 4);
      assert.ok(sets * a + ku * (a + 1) <= 14 && ku >= 1 && sets >= 1);
    }
  });
});

for (const threads of [1, 2]) {
  describe(`CpuRuntime, ${threads} thread(s)`, () => {
    let rt: CpuRuntime;
    before(async () => {
      rt = await CpuRuntime.create({ threads });
    });
    after(async () => {
      await rt.dispose();
    });

    test("reports its configuration", () => {
      assert.equal(rt.threads, threads);
      assert.match(rt.simd, /^wasm-simd128(\+relaxed-madd)?(\+relaxed-dot)?$/);
    });

    test("gemm matches the float64 reference on random and edge layouts", () => {
      let seed = 100 * threads;
      for (const L of layouts()) checkGemm(rt, L, seed++);
    });

    test("gemm with large shapes (split across threads)", () => {
      checkGemm(rt, { M: 1, N: 768, K: 768, offX: 1, offW: 1, offY: 1 }, 1);
      checkGemm(rt, { M: 8, N: 1029, K: 131, accumulate: true, padW: 1 }, 2);
      checkGemm(rt, { M: 128, N: 768, K: 131, offY: 1 }, 3);
      checkGemm(rt, { M: 768, N: 7, K: 128, padY: 3 }, 4); // narrow N: split by M
    });

    test("gemmBatch runs many tiny gemms (and a big one) correctly", () => {
      const r = rng(11 + threads);
      const mark = rt.mark();
      const K = 64;
      const list: Gemm[] = [];
      // 200 attention-like gemms: 1..16 query rows x 1..80 keys x 64, some accumulating.
      const make = (M: number, N: number, K: number, acc: boolean): Gemm => {
        const x = rt.alloc(M * (K + 1)) + 1;
        const w = rt.alloc(N * (K + 2)) + 2;
        const y = rt.alloc(M * (N + 3)) + 3;
        return { x, ldx: K + 1, w, ldw: K + 2, y, ldy: N + 3, M, N, K, accumulate: acc };
      };
      for (let i = 0; i < 200; i++) list.push(make(1 + Math.floor(((r() + 1) / 2) * 16), 1 + Math.floor(((r() + 1) / 2) * 80), K, r() > 0.5));
      list.splice(100, 0, make(64, 300, 256, false)); // big enough to be split by N
      const f = rt.f32;
      for (const g of list) {
        for (let i = 0; i < g.M * g.ldx; i++) f[g.x + i] = r();
        for (let i = 0; i < g.N * g.ldw; i++) f[g.w + i] = r();
        for (let m = 0; m < g.M; m++) for (let n = 0; n < g.N; n++) f[g.y + m * g.ldy + n] = g.accumulate ? r() : NaN;
      }
      const snap = f.slice(); // (only a few MiB of memory in use here)
      rt.gemmBatch(list);
      const out = rt.f32;
      for (const [i, g] of list.entries()) {
        const ref = reference(snap, snap, g);
        const y = new Float64Array(g.M * g.N);
        for (let m = 0; m < g.M; m++) for (let n = 0; n < g.N; n++) y[m * g.N + n] = out[g.y + m * g.ldy + n]!;
        const ratio = errorRatio(y, ref, g.K, 1, 1, g.accumulate ? 1 : 0);
        assert.ok(ratio < 1, `gemmBatch item ${i} (M=${g.M} N=${g.N} K=${g.K} acc=${g.accumulate}): error ${ratio} x tolerance`);
      }
      rt.release(mark);
    });

    test("gemmBatch with more gemms than one dispatch holds", () => {
      const mark = rt.mark();
      const r = rng(5);
      const K = 9;
      const x = rt.alloc(K);
      const w = rt.alloc(K);
      const n = 9000;
      const y = rt.alloc(n);
      const f = rt.f32;
      for (let k = 0; k < K; k++) {
        f[x + k] = r();
        f[w + k] = r();
      }
      let dot = 0;
      for (let k = 0; k < K; k++) dot += f[x + k]! * f[w + k]!;
      // Every gemm writes its own y; every other one accumulates onto a preset 1.
      const list: Gemm[] = [];
      for (let i = 0; i < n; i++) {
        f[y + i] = i % 2 ? 1 : NaN;
        list.push({ x, ldx: K, w, ldw: K, y: y + i, ldy: 1, M: 1, N: 1, K, accumulate: i % 2 === 1 });
      }
      rt.gemmBatch(list);
      const out = rt.f32;
      for (let i = 0; i < n; i++) assert.ok(Math.abs(out[y + i]! - (dot + (i % 2))) < 1e-5, `item ${i}: ${out[y + i]}`);
      rt.gemmBatch([]);
      rt.release(mark);
    });

    test("back-to-back dispatches give the same result as one thread would", () => {
      // Many consecutive mid-size gemms, each accumulating onto the previous result.
      const mark = rt.mark();
      const M = 3;
      const N = 256;
      const K = 256;
      const x = rt.alloc(M * K);
      const w = rt.alloc(N * K);
      const y = rt.alloc(M * N);
      const f = rt.f32;
      const r = rng(9);
      for (let i = 0; i < M * K; i++) f[x + i] = r();
      for (let i = 0; i < N * K; i++) f[w + i] = r();
      const once = reference(f, f, { x, ldx: K, w, ldw: K, y, ldy: N, M, N, K });
      const reps = 300;
      for (let i = 0; i < reps; i++) rt.gemm({ x, ldx: K, w, ldw: K, y, ldy: N, M, N, K, accumulate: i > 0 });
      const out = rt.f32;
      for (let i = 0; i < M * N; i++) {
        const want = once[i]! * reps;
        assert.ok(Math.abs(out[y + i]! - want) <= 1e-4 * reps * Math.sqrt(K), `element ${i}: ${out[y + i]} vs ${want}`);
      }
      rt.release(mark);
    });

    test("operands ending at the very end of the memory are not over-read", () => {
      for (const [M, N, K] of [[1, 9, 7], [3, 5, 2051], [16, 40, 131], [12, 37, 1028]] as const) {
        for (const last of ["x", "w", "y"] as const) {
          const mark = rt.mark();
          const start = Math.ceil(mark / 16) * 16;
          const n = rt.f32.length - start;
          const a = rt.alloc(n); // exactly up to the end: no growth
          assert.equal(a + n, rt.f32.length);
          const sizes = { x: M * K, w: N * K, y: M * N };
          const off = { x: a, w: a + sizes.x + 5, y: a + sizes.x + sizes.w + 9 };
          off[last] = a + n - sizes[last];
          const f = rt.f32;
          const r = rng(M + N + K);
          for (let i = 0; i < sizes.x; i++) f[off.x + i] = r();
          for (let i = 0; i < sizes.w; i++) f[off.w + i] = r();
          const g: Gemm = { x: off.x, ldx: K, w: off.w, ldw: K, y: off.y, ldy: N, M, N, K };
          const snap = f.slice();
          rt.gemm(g);
          const ref = reference(snap, snap, g);
          const y = Array.from({ length: M * N }, (_, i) => rt.f32[off.y + i]!);
          assert.ok(errorRatio(y, ref, K, 1, 1, 0) < 1, `M=${M} N=${N} K=${K} ${last} last`);
          rt.release(mark);
        }
      }
    });

    test("rejects bad arguments with clear errors", () => {
      const mark = rt.mark();
      const a = rt.alloc(64);
      const size = rt.f32.length;
      assert.throws(() => rt.gemm({ x: a, ldx: 4, w: a, ldw: 4, y: a, ldy: 4, M: 2, N: 2, K: -1 }), /non-negative integers/);
      assert.throws(() => rt.gemm({ x: a, ldx: 4, w: a, ldw: 4, y: a, ldy: 4, M: 2, N: 2.5, K: 4 }), /non-negative integers/);
      assert.throws(() => rt.gemm({ x: size - 3, ldx: 4, w: a, ldw: 4, y: a, ldy: 4, M: 1, N: 1, K: 4 }), /X .* outside the memory/);
      assert.throws(() => rt.gemm({ x: a, ldx: 4, w: size - 8, ldw: 4, y: a, ldy: 4, M: 1, N: 2, K: 5 }), /W .* outside the memory/);
      assert.throws(() => rt.gemmBatch([{ x: a, ldx: 4, w: a, ldw: 4, y: size, ldy: 4, M: 1, N: 1, K: 4 }]), /Y .* outside the memory/);
      // Empty gemms are no-ops; K = 0 writes zeros (or leaves Y when accumulating).
      rt.gemm({ x: a, ldx: 4, w: a, ldw: 4, y: a, ldy: 4, M: 0, N: 3, K: 4 });
      const f = rt.f32;
      f[a + 32] = 5;
      f[a + 33] = 6;
      rt.gemm({ x: a, ldx: 4, w: a, ldw: 4, y: a + 32, ldy: 4, M: 1, N: 1, K: 0 });
      rt.gemm({ x: a, ldx: 4, w: a, ldw: 4, y: a + 33, ldy: 4, M: 1, N: 1, K: 0, accumulate: true });
      assert.equal(rt.f32[a + 32], 0);
      assert.equal(rt.f32[a + 33], 6);
      rt.release(mark);
    });
  });
}

describe("guidedCuts (decode-size pieces, largest first)", () => {
  test("cover [0, N) once, in pieces that never grow and end small", () => {
    for (const [N, threads, pieces] of [[16384, 2, 16], [2048, 2, 16], [128256, 4, 32], [5, 2, 16], [1, 2, 1]] as const) {
      const cuts = guidedCuts(N, threads, pieces);
      const sizes = cuts.map((c, i) => c - (cuts[i - 1] ?? 0));
      assert.equal(cuts.at(-1), N, `${N}: the last cut is N`);
      assert.ok(sizes.every((z) => z > 0), `${N}: every piece has rows`);
      assert.ok(sizes.every((z, i) => i === 0 || z <= sizes[i - 1]!), `${N}: pieces never grow (${sizes.join(",")})`);
      if (N >= 2048) assert.ok(sizes.at(-2)! <= N / (2 * pieces), `${N}: the tail pieces are small (${sizes.join(",")})`);
    }
  });
});

describe("CpuRuntime determinism", () => {
  test("1 and 2 threads give bitwise identical results (N splits over a shared packed X, both paths)", async () => {
    const rt1 = await CpuRuntime.create({ threads: 1 });
    const rt2 = await CpuRuntime.create({ threads: 2 });
    try {
      for (const [M, N, K] of [[1, 1000, 300], [5, 700, 257], [8, 9, 4000], [10, 5, 3000], [16, 10, 4000], [64, 500, 130], [300, 20, 256], [40, 30, 1030], [130, 203, 2 * DEFAULT_KERNEL.kc + 5]] as const) {
        const r = rng(M * N + K);
        const xs = Float32Array.from({ length: M * K }, r);
        const ws = Float32Array.from({ length: N * K }, r);
        const outs = [rt1, rt2].map((rt) => {
          const mark = rt.mark();
          const x = rt.alloc(M * K);
          const w = rt.alloc(N * K);
          const y = rt.alloc(M * N);
          rt.f32.set(xs, x);
          rt.f32.set(ws, w);
          rt.gemm({ x, ldx: K, w, ldw: K, y, ldy: N, M, N, K });
          const out = rt.f32.slice(y, y + M * N);
          rt.release(mark);
          return out;
        });
        assert.deepEqual(outs[1], outs[0], `M=${M} N=${N} K=${K}`);
      }
    } finally {
      await rt1.dispose();
      await rt2.dispose();
    }
  });
});

describe("CpuRuntime memory", () => {
  let rt: CpuRuntime;
  before(async () => {
    rt = await CpuRuntime.create({ threads: 2 });
  });
  after(async () => {
    await rt.dispose();
  });

  test("alloc is 64-byte aligned and zero-filled, also when reusing released memory", () => {
    const m0 = rt.mark();
    const a = rt.alloc(3);
    const b = rt.alloc(5);
    assert.equal(a % 16, 0);
    assert.equal(b % 16, 0);
    assert.ok(b >= a + 3);
    rt.f32.fill(7, a, b + 5);
    rt.release(m0);
    const c = rt.alloc(40);
    assert.equal(c, a, "release frees everything allocated after the mark");
    for (let i = 0; i < 40; i++) assert.equal(rt.f32[c + i], 0);
    const m1 = rt.mark();
    const d = rt.alloc(1);
    rt.release(m1);
    assert.equal(rt.alloc(1), d);
    rt.release(m0);
    assert.equal(rt.mark(), m0);
    assert.throws(() => rt.release(m0 + 1e9), /not a mark/);
    assert.deepEqual(rt.alloc(0) % 16, 0);
    rt.release(m0);
  });

  test("memory growth keeps the data and refreshes the f32 view", () => {
    const m0 = rt.mark();
    const a = rt.alloc(1000);
    for (let i = 0; i < 1000; i++) rt.f32[a + i] = i + 0.5;
    const view = rt.f32;
    const before = view.length;
    const big = rt.alloc(before); // at least doubles the memory
    const after = rt.f32;
    assert.ok(after.length > before, "the memory grew");
    assert.notEqual(after, view, "the view was re-created");
    for (let i = 0; i < 1000; i++) assert.equal(after[a + i], i + 0.5);
    assert.equal(after[big], 0);
    assert.equal(after[big + before - 1], 0);
    // A gemm on the new memory, run by both threads.
    const K = 256;
    const N = 512;
    const w = big + 16;
    const y = rt.alloc(N);
    for (let i = 0; i < K; i++) after[a + i] = 1;
    for (let i = 0; i < N * K; i++) after[w + i] = (i % K) === 0 ? 2 : 0;
    rt.gemm({ x: a, ldx: K, w, ldw: K, y, ldy: N, M: 1, N, K });
    for (let n = 0; n < N; n++) assert.equal(rt.f32[y + n], 2);
    rt.release(m0);
  });

  test("allocBytes with prefault touches the fresh pages on every thread and changes no byte, before or inside the range", async () => {
    const fresh = await CpuRuntime.create({ threads: 2 });
    try {
      // Past what create() used (its warm-up), then data ending mid-page in fresh memory, then a
      // prefaulted range from the next 64 bytes: the page they share is written by the touch at the
      // range's first byte, never below it.
      fresh.allocBytes(16 << 20);
      const a = fresh.allocBytes(5000);
      const u8 = () => new Uint8Array(fresh.memory.buffer);
      u8().fill(0xab, a, a + 5000);
      const before = fresh.stats.dispatches;
      const n = (3 << 20) + 100;
      const b = fresh.allocBytes(n, true);
      assert.ok(fresh.stats.dispatches > before, "the touch ran as a dispatch");
      assert.ok(b < a + 5064 && b % 4096 !== 0, "the range starts inside the data's last page");
      const mem = u8();
      for (let i = a; i < a + 5000; i++) if (mem[i] !== 0xab) assert.fail(`byte ${i - a} of the data changed`);
      for (let i = b; i < b + n; i++) if (mem[i] !== 0) assert.fail(`byte ${i - b} of the range is ${mem[i]}`);
      // Memory written before (released, below the high-water mark) is zero-filled as by alloc.
      const m = fresh.mark();
      const c = fresh.allocBytes(1 << 20);
      u8().fill(7, c, c + (1 << 20));
      fresh.release(m);
      const d = fresh.allocBytes(2 << 20, true);
      assert.equal(d, c);
      const mem2 = u8();
      for (let i = d; i < d + (2 << 20); i++) if (mem2[i] !== 0) assert.fail(`reused byte ${i - d} is ${mem2[i]}`);
    } finally {
      await fresh.dispose();
    }
  });

  test("alloc past the wasm32 4 GiB limit throws a clear error", () => {
    assert.throws(() => rt.alloc(2 ** 30), /4 GiB/);
    assert.throws(() => rt.alloc(-1), /non-negative integer/);
  });
});

describe("CpuRuntime lifecycle", () => {
  const runtimeUrl = new URL("../src/engine/cpu/runtime.js", import.meta.url).href;
  const run = (body: string) =>
    spawnSync(process.execPath, ["--input-type=module", "-e", `import { CpuRuntime } from ${JSON.stringify(runtimeUrl)};\n${body}`], {
      encoding: "utf8",
      timeout: 60_000,
    });

  test("dispose terminates the workers and the process exits", () => {
    const r = run(`
      const rt = await CpuRuntime.create({ threads: 2 });
      const x = rt.alloc(64 * 256), w = rt.alloc(512 * 256), y = rt.alloc(64 * 512);
      rt.gemm({ x, ldx: 256, w, ldw: 256, y, ldy: 512, M: 64, N: 512, K: 256 });
      await rt.dispose();
      await rt.dispose();
      let threw = false;
      try { rt.gemm({ x, ldx: 256, w, ldw: 256, y, ldy: 512, M: 1, N: 1, K: 1 }); } catch { threw = true; }
      console.log("done", threw);
    `);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /done true/);
  });

  test("a forgotten dispose does not keep the process alive", () => {
    const r = run(`
      const rt = await CpuRuntime.create({ threads: 2 });
      const x = rt.alloc(64 * 256), w = rt.alloc(512 * 256), y = rt.alloc(64 * 512);
      rt.gemm({ x, ldx: 256, w, ldw: 256, y, ldy: 512, M: 64, N: 512, K: 256 });
      await new Promise((r) => setTimeout(r, 50)); // workers are asleep by now
      rt.gemm({ x, ldx: 256, w, ldw: 256, y, ldy: 512, M: 64, N: 512, K: 256 });
      console.log("done");
    `);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /done/);
    assert.equal(r.signal, null, "not killed by the timeout");
  });

  test("threads: 1 runs without workers", async () => {
    const rt = await CpuRuntime.create({ threads: 1 });
    assert.equal(rt.threads, 1);
    await rt.dispose();
    assert.ok(fileURLToPath(runtimeUrl).endsWith("runtime.js"));
  });
});
