// WebAssembly SIMD GEMM kernels, emitted as bytes (see wasm-emit.ts).
//
//   gemm(x, ldx, w, ldw, y, ldy, M, N, K, flags, scratch)     all i32; x, w, y, ld* and scratch in BYTES
//     y[m*ldy + n] = (flags & ACCUMULATE ? y[m*ldy + n] : 0) + sum_k x[m*ldx + k] * w[n*ldw + k]   (m<M, n<N, k<K)
//     scratch: scratchBytes(options) bytes private to the calling thread (packing buffers)
//     flags & PACKED_X (packed path only): x is X already packed by packx (ldx ignored), so that
//     threads sharing one X split W among them without each re-packing X
//   packx(x, ldx, M, K, dst)  packs X [M, K] as gemm's packed path would, every K block, at dst
//     (packedXBytes(M, K) bytes; K block kb starts at dst + 4*M*kb, its rows 4*ceil4(kc) bytes apart)
//   task_list(ptr, count, scratch)   runs `count` tasks stored back to back at ptr, TASK_WORDS i32
//     each: word 0 the kind (TASK), then its arguments (see TASK). Threads share work as lists.
//   peak(iters) -> f32               a register-only multiply-add loop (the Wasm SIMD compute limit)
//   peakdot(iters) -> i32            the int8 rows' products in a register-only loop (their limit)
//
// Design ("dot" layout: rows of X and rows of W are both K-contiguous, so a tile of a rows of X
// by b rows of W keeps a*b f32x4 accumulators over K and reduces them horizontally at the end,
// with a 4x4 transpose-and-add that yields [y0..y3] for one Y row).
//
// Packed path (M >= packMinM): per K block of kc floats and M block of about l2Bytes of X:
//   pack the X block into panels of mr rows interleaved per 4 floats ([k/4][row][4], zero
//   padded to a multiple of 4); then per block of nb rows of W: pack it the same way (one
//   sequential burst of reads), and run the mr x nr microkernel of every X panel against each
//   of its tiles of nr rows (a tile stays in L1, the X block in L2). Packing makes each operand
//   one pointer with constant offsets, so the inner loop is 6 loads + 8 FMAs + 2 pointer bumps
//   + V8's per-iteration stack check. While it runs, the microkernel also touches (loads and
//   drops) one i32 per step of the raw W rows of the next block: a software prefetch that
//   makes the next pack read from cache (+10-20% with weights coming from DRAM).
// Direct path (small M, e.g. decode): up to dmr rows of X against each row of W in turn, both
//   read in place (K % 4 tail loaded with zero padding: load32_zero / load64_zero /
//   load32_lane), so W is streamed once, sequentially, at memory bandwidth, with no packing.
//
// What TurboFan (Node 20, V8 11.3) does with this, and the numbers behind the choices
// (1 thread, GFLOP/s, 128x2048x768 unless noted; the register-only peak is 57-59):
//  - It keeps v128 locals in xmm0..xmm14 (15 registers) and schedules all loads of a loop
//    iteration before the FMAs that use them, so accumulators + vectors loaded per iteration
//    must be <= 15 or it spills: 2x4 (8 + 6) and 3x3 (9 + 6) fit; 2x5, 2x6, 3x4, 4x3, 1x10
//    spill and run at 20-25. For the same reason unrolling K (ku = 2, 4) is slower (28 vs 44
//    unpacked), and loading W once per FMA ("reload") is erratic (17-41).
//  - Unpacked 2x4 tiles (6 pointer bumps per step): 44-47; packed 2x4: 46-49; packed 3x3 and
//    4x2: within noise of 2x4 (41-49); + W touch: 48-50. relaxed_madd (vfmadd231ps) vs
//    mul+add: 47-49 vs 37-39 (the peak loop is the same 58 both ways: the mul+add kernel is
//    limited by issue width, not by the FP pipes).
//  - kc 512 / 768 / 1024 / 2048 and l2Bytes 128K..1M: within noise (+-5%) except kc 2048
//    (W tile = all of L1: -20%) and l2Bytes 64K (-30%).
//  - Weight streaming (M = 1, DRAM): one W row at a time with 4 accumulator chains: 24-29 GB/s
//    (the machine reads ~28 GB/s); interleaving 2-8 rows of 3-8 KB (W register blocking) falls
//    to 9-16 GB/s: the hardware prefetcher loses such short interleaved streams.
//  - Cold weights, M = 4..8: direct 24-27 vs packed 13-24; M = 16: packed 33-37 vs direct 28.
import { emitElementwise } from "./elementwise.js";
import { DEQ_BYTES, emitQuantKernels } from "./qkernels.js";
import type { QuantType } from "../weights.js";
import { F32, type Fn, I32, ModuleBuilder, V128 } from "./wasm-emit.js";

export interface KernelOptions {
  /** Use f32x4.relaxed_madd instead of f32x4.mul + f32x4.add. */
  relaxed: boolean;
  /**
   * Int8-activation Q4_K/Q5_K/Q6_K rows with i16x8.relaxed_dot_i8x16_i7x16_s (16 products per
   * instruction instead of i32x4.dot_i16x8_s's 8 on widened weights); runtime.ts turns it on only
   * after running relaxedDotProbeBytes' module and checking its result.
   */
  relaxedDot: boolean;
  /** Import a shared memory (needed for worker threads). */
  shared: boolean;
  /** Packed microkernel: rows of X per tile. */
  mr: number;
  /** Packed microkernel: rows of W per tile. */
  nr: number;
  /** Packed microkernel: K-loop unroll (steps of 4 floats per iteration; power of two). */
  ku: number;
  /** K block of the packed path in floats (multiple of 4). */
  kc: number;
  /** Bytes of the packed X block (re-read from L2 for every W tile). */
  l2Bytes: number;
  /** Packed path: touch the next W block during the microkernel (a software prefetch). */
  touch: boolean;
  /** Rows of W packed at a time (a multiple of nr). */
  nb: number;
  /** Use the packed path when M >= packMinM. */
  packMinM: number;
  /** Direct (unpacked) path for small M: rows of X per pass over W, maximum K unroll. */
  dmr: number;
  dku: number;
  /**
   * Rows of X per pass over W in the int8-activation rows (qkernels.ts; every M). Two: more rows'
   * activation loads spill (V8 hoists a loop body's loads), and with four the rows ran no faster
   * than one at a time (in-process A/B, Q4_K 2048×8192 at M = 32, 1 thread: 1, 2, 3, 4 rows 32.9,
   * 38.1, 37.1, 34.8 G products/s).
   */
  idmr: number;
}

export const DEFAULT_KERNEL: Omit<KernelOptions, "relaxed" | "relaxedDot" | "shared"> = {
  mr: 2,
  nr: 4,
  ku: 1,
  kc: 1024,
  l2Bytes: 384 * 1024,
  nb: 16,
  touch: true,
  packMinM: 9,
  dmr: 4,
  dku: 4,
  idmr: 2,
};

/** i32 words per task record in a task_list (64 bytes). */
export const TASK_WORDS = 16;
/**
 * Task kinds and their arguments (words 1..; pointers and strides in bytes):
 *   GEMM       x, ldx, w, ldw, y, ldy, M, N, K, flags                       (gemm's arguments)
 *   GATED      g, ldg, u, ldu, out, ldo, rows, F, act (0 silu, 1 gelu_tanh):  out = act(g) · u per row
 *   RMSNORM    src, dst, w, rows, D, eps (f32), offset (f32): rows D floats apart
 *   ATTENTION  q, ldq, k, v, ldv, sc, z, T, S, hd, slot0, pad, window, scale (f32): one (row, head)
 *              pair: scores [T, S] = q·kᵀ into sc; each query t (slot slot0 + t) softmaxes
 *              (scale) the keys it sees — max(pad, slot - window + 1)..slot, or only itself if
 *              that is empty; z [T, hd] (rows ldq apart) = scores · v, v transposed [hd, S] (ldv)
 *   QGEMM      x, ldx, wq, ws, y, ldy, M, N, K, flags, deqRows   (qkernels.ts qgemm on Q8_0 rows)
 *   Q4KGEMM    the same for Q4_K rows (qkernels.ts q4kgemm; ws: the per-super-block meta)
 *   BF16GEMM   the same for BF16 rows (qkernels.ts bf16gemm; ws unused)
 *   Q6KGEMM    the same for Q6_K rows (qkernels.ts q6kgemm)
 *   Q40GEMM    the same for Q4_0 rows (qkernels.ts q40gemm)
 *   F16GEMM    the same for F16 rows (qkernels.ts f16gemm; ws unused)
 *   Q5KGEMM    the same for Q5_K rows (qkernels.ts q5kgemm)
 *   TOUCH      start, end: writes a zero byte into every 4 KiB page of [start, end), memory never
 *              written since it was grown (so already zero): its first-touch page faults, taken
 *              on every thread at once (runtime.ts allocBytes' prefault)
 */
export const TASK = { GEMM: 0, GATED: 1, RMSNORM: 2, ATTENTION: 3, QGEMM: 4, Q4KGEMM: 5, BF16GEMM: 6, Q6KGEMM: 7, Q40GEMM: 8, F16GEMM: 9, Q5KGEMM: 10, TOUCH: 11 } as const;
/** The task kind of each quantized type's driver. */
export const QUANT_TASK: Record<QuantType, number> = { q8_0: TASK.QGEMM, q4_0: TASK.Q40GEMM, q4_k: TASK.Q4KGEMM, q6_k: TASK.Q6KGEMM, bf16: TASK.BF16GEMM, f16: TASK.F16GEMM, q5_k: TASK.Q5KGEMM };
/** gemm flags: add to Y instead of overwriting it. */
export const ACCUMULATE = 1;
/** gemm flags: x points at X packed by packx (packed path, M >= packMinM, only). */
export const PACKED_X = 2;

/** Bytes packx writes for X [M, K] (K blocks of kc floats, each padded to a multiple of 4). */
export function packedXBytes(o: Pick<KernelOptions, "kc">, M: number, K: number): number {
  const full = Math.floor(K / o.kc) * o.kc;
  return 4 * M * (full + Math.ceil((K - full) / 4) * 4);
}
export const MAX_PAGES = 65536;

/** Bytes of per-thread scratch the f32 gemm needs (packing buffers). */
export function gemmScratchBytes(o: KernelOptions): number {
  return Math.ceil((o.l2Bytes + o.nb * o.kc * 4 + 64) / 64) * 64;
}

/** Bytes of per-thread scratch the kernels need: the gemm's, then qgemm's dequantization area. */
export function scratchBytes(o: KernelOptions): number {
  return gemmScratchBytes(o) + DEQ_BYTES;
}

function checkOptions(o: KernelOptions): void {
  const int = (v: number, lo: number, hi: number) => Number.isInteger(v) && v >= lo && v <= hi;
  if (!int(o.mr, 1, 6) || !int(o.nr, 1, 16) || !int(o.dmr, 1, 6) || !int(o.idmr, 1, 6)) throw new Error("kernel tile sizes out of range");
  for (const k of [o.ku, o.dku]) if (!int(k, 1, 8) || (k & (k - 1)) !== 0) throw new Error("kernel unroll must be a power of two <= 8");
  if (!int(o.kc, 4, 1 << 20) || o.kc % 4 !== 0) throw new Error("kernel kc must be a positive multiple of 4");
  if (!int(o.l2Bytes, o.mr * o.kc * 4, 1 << 28)) throw new Error("kernel l2Bytes must hold at least one X panel (mr * kc floats)");
  if (!int(o.nb, o.nr, 1024) || o.nb % o.nr !== 0) throw new Error("kernel nb must be a multiple of nr");
  if (!int(o.packMinM, 1, 1 << 30)) throw new Error("kernel packMinM must be >= 1");
}

interface Ctx {
  f: Fn;
  o: KernelOptions;
}

function madd(c: Ctx, acc: number, xl: number, wl: number): void {
  if (c.o.relaxed) c.f.get(xl).get(wl).get(acc).f32x4RelaxedMadd().set(acc);
  else c.f.get(acc).get(xl).get(wl).f32x4Mul().f32x4Add().set(acc);
}

/**
 * Reduces acc[i][0..b-1] of each of the a rows to sums and stores (or adds, if the i32 local
 * `accFlag` is set) them to y row i at py + i*ldy. Columns go in groups of 4 through a 4x4
 * transpose-and-add; a full group is one v128 store.
 */
function reduceStore(c: Ctx, acc: number[][], a: number, b: number, py: number, ldy: number, accFlag: number): void {
  const f = c.f;
  const t0 = f.local(V128);
  const t1 = f.local(V128);
  const r = f.local(V128);
  const sc = f.local(F32);
  const row = f.local(I32);
  f.get(py).set(row);
  for (let i = 0; i < a; i++) {
    const accRow = acc[i] as number[];
    for (let g = 0; g < b; g += 4) {
      const src = (j: number) => (g + j < b ? f.get(accRow[g + j] as number) : f.v128ConstF32(0));
      // t0 = [a0+a2, b0+b2, a1+a3, b1+b3] for columns g, g+1; t1 the same for g+2, g+3
      src(0); src(1); f.shuffle32(0, 4, 1, 5);
      src(0); src(1); f.shuffle32(2, 6, 3, 7);
      f.f32x4Add().set(t0);
      src(2); src(3); f.shuffle32(0, 4, 1, 5);
      src(2); src(3); f.shuffle32(2, 6, 3, 7);
      f.f32x4Add().set(t1);
      f.get(t0).get(t1).shuffle32(0, 1, 4, 5);
      f.get(t0).get(t1).shuffle32(2, 3, 6, 7);
      f.f32x4Add().set(r);
      if (b - g >= 4) {
        f.get(accFlag).if(() => void f.get(r).get(row).v128Load(4 * g).f32x4Add().set(r));
        f.get(row).get(r).v128Store(4 * g);
      } else {
        for (let j = 0; j < b - g; j++) {
          f.get(r).f32x4ExtractLane(j).set(sc);
          f.get(accFlag).if(() => void f.get(sc).get(row).f32Load(4 * (g + j)).f32Add().set(sc));
          f.get(row).get(sc).f32Store(4 * (g + j));
        }
      }
    }
    if (i + 1 < a) f.get(row).get(ldy).i32Add().set(row);
  }
}

/** Counted loop: `count` pushes the iteration count (may be 0); body runs that many times. */
function counted(f: Fn, cnt: number, count: () => void, body: () => void): void {
  count();
  f.tee(cnt).if(() => {
    f.loop(() => {
      body();
      f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
    });
  });
}

/**
 * Unroll and accumulator sets of a direct a x b tile: TurboFan issues all loads of a loop
 * iteration before its FMAs, so accumulators (sets * a * b) plus loaded vectors (ku * (a + b))
 * must fit in the 15 allocatable xmm registers, or it spills. Within that, unroll as much as
 * allowed (at most maxKu) and use up to 4 independent accumulator chains.
 */
export function directUnroll(a: number, b: number, maxKu: number): { ku: number; sets: number } {
  for (let ku = maxKu; ku > 1; ku >>= 1) {
    const sets = Math.min(ku, Math.max(1, Math.ceil(4 / (a * b))));
    if (sets * a * b + ku * (a + b) <= 14) return { ku, sets };
  }
  return { ku: 1, sets: 1 };
}

/**
 * Direct rows: a rows of X against every one of N rows of W, both read in place.
 * Params (px, ldx, pw, ldw, py, ldy, N, K, acc); K in floats, any value >= 0.
 * W rows are visited in order, one at a time, so W is read as one sequential stream (when
 * ldw = K): on this machine a single stream gets ~25 GB/s from DRAM, while interleaving 2-4
 * short rows (3-8 KB) drops to 10-15 GB/s, so there is no W register blocking here. Each row's
 * a dot products are reduced to scalars and stored before moving on.
 */
function emitDirectRows(mb: ModuleBuilder, o: KernelOptions, a: number): Fn {
  const f = mb.func(`drows_${a}`, [I32, I32, I32, I32, I32, I32, I32, I32, I32]);
  const c: Ctx = { f, o };
  const [PX, LDX, PW, LDW, PY, LDY, N, K, ACC] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
  const { ku, sets } = directUnroll(a, 1, o.dku);
  const xp = Array.from({ length: a }, () => f.local(I32));
  const wp = f.local(I32);
  const wrow = f.local(I32);
  const yp = f.local(I32);
  const n = f.local(I32);
  const cnt = f.local(I32);
  const tail = f.local(I32);
  const acc = Array.from({ length: sets }, () => Array.from({ length: a }, () => f.local(V128)));
  const xv = Array.from({ length: a }, () => f.local(V128));
  const wv = f.local(V128);
  const t = f.local(V128);
  const sc = f.local(F32);
  const at = (s: number, i: number) => (acc[s] as number[])[i] as number;

  f.get(N).i32Eqz().if(() => void f.return());
  // Pointers are results of i32.add (not bare parameters) so that V8 can use them as
  // zero-extended address indices without an extra mov in the loop.
  f.get(PW).get(LDW).i32Add().get(LDW).i32Sub().set(wrow);
  f.get(PY).get(LDY).i32Add().get(LDY).i32Sub().set(yp);
  f.loop(() => {
    f.get(PX).get(LDX).i32Add().get(LDX).i32Sub().set(xp[0] as number);
    for (let i = 1; i < a; i++) f.get(xp[i - 1] as number).get(LDX).i32Add().set(xp[i] as number);
    f.get(wrow).set(wp);
    for (let s = 0; s < sets; s++) for (let i = 0; i < a; i++) f.v128ConstF32(0).set(at(s, i));
    const step = (s: number, off: number) => {
      for (let i = 0; i < a; i++) f.get(xp[i] as number).v128Load(off).set(xv[i] as number);
      f.get(wp).v128Load(off).set(wv);
      for (let i = 0; i < a; i++) madd(c, at(s, i), xv[i] as number, wv);
    };
    const advance = (bytes: number) => {
      for (const p of [...xp, wp]) f.get(p).i32Const(bytes).i32Add().set(p);
    };
    counted(
      f,
      cnt,
      () => f.get(K).i32Const(Math.log2(4 * ku)).i32ShrU(),
      () => {
        for (let u = 0; u < ku; u++) step(u % sets, 16 * u);
        advance(16 * ku);
      },
    );
    if (ku > 1) {
      counted(
        f,
        cnt,
        () => f.get(K).i32Const(4 * ku - 1).i32And().i32Const(2).i32ShrU(),
        () => {
          step(0, 0);
          advance(16);
        },
      );
    }
    // K % 4 tail: zero-padded loads, one more step.
    f.get(K).i32Const(3).i32And().tee(tail).if(() => {
      const loadTail = (p: number, v: number) => {
        f.get(tail).i32Const(2).i32And().if(
          () => void f.get(p).v128Load64Zero().set(v),
          () => void f.get(p).v128Load32Zero().set(v),
        );
        f.get(tail).i32Const(3).i32Eq().if(() => void f.get(p).get(v).v128Load32Lane(2, 8).set(v));
      };
      for (let i = 0; i < a; i++) loadTail(xp[i] as number, xv[i] as number);
      loadTail(wp, wv);
      for (let i = 0; i < a; i++) madd(c, at(0, i), xv[i] as number, wv);
    });
    // Reduce: sets, then lanes; store y[i][n].
    for (let i = 0; i < a; i++) {
      for (let s = 1; s < sets; s++) f.get(at(0, i)).get(at(s, i)).f32x4Add().set(at(0, i));
      f.get(at(0, i)).get(at(0, i)).get(at(0, i)).shuffle32(2, 3, 0, 1).f32x4Add().set(t);
      f.get(t).get(t).get(t).shuffle32(1, 0, 3, 2).f32x4Add().f32x4ExtractLane(0).set(sc);
      const yAddr = () => (i === 0 ? f.get(yp) : f.get(yp).get(LDY).i32Const(i).i32Mul().i32Add());
      f.get(ACC).if(() => void yAddr().f32Load().get(sc).f32Add().set(sc));
      yAddr().get(sc).f32Store();
    }
    f.get(wrow).get(LDW).i32Add().set(wrow);
    f.get(yp).i32Const(4).i32Add().set(yp);
    f.get(n).i32Const(1).i32Add().tee(n).get(N).i32LtU().brIf(0);
  });
  return f;
}

/**
 * Packed tile: a x b block of Y from a packed X panel ([k/4][a][4] at xbase + xoff) and a packed
 * W tile ([k/4][b][4] at wbase + woff), `steps` steps of 4 floats.
 * Params (xbase, xoff, wbase, woff, py, ldy, steps, acc, pf, pfStep): with o.touch, each step
 * also loads (and drops) the i32 at pf and advances pf by pfStep bytes.
 */
function emitPackedTile(mb: ModuleBuilder, o: KernelOptions, a: number, b: number): Fn {
  const f = mb.func(`ptile_${a}x${b}`, [I32, I32, I32, I32, I32, I32, I32, I32, I32, I32]);
  const c: Ctx = { f, o };
  const [XB, XO, WB, WO, PY, LDY, STEPS, ACC, PF, PFSTEP] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
  const ku = o.ku;
  const sets = Math.max(1, Math.min(ku, Math.floor(8 / (a * b))));
  const px = f.local(I32);
  const pw = f.local(I32);
  const cnt = f.local(I32);
  const acc = Array.from({ length: sets }, () => Array.from({ length: a }, () => Array.from({ length: b }, () => f.local(V128))));
  const xv = Array.from({ length: a }, () => f.local(V128));
  const wv = Array.from({ length: b }, () => f.local(V128));
  const at = (s: number, i: number, j: number) => (acc[s] as number[][])[i]?.[j] as number;
  f.get(XB).get(XO).i32Add().set(px);
  f.get(WB).get(WO).i32Add().set(pw);

  const step = (s: number, u: number) => {
    const xo = 16 * a * u;
    const wo = 16 * b * u;
    if (a <= b) {
      for (let i = 0; i < a; i++) f.get(px).v128Load(xo + 16 * i).set(xv[i] as number);
      for (let j = 0; j < b; j++) {
        f.get(pw).v128Load(wo + 16 * j).set(wv[0] as number);
        for (let i = 0; i < a; i++) madd(c, at(s, i, j), xv[i] as number, wv[0] as number);
      }
    } else {
      for (let j = 0; j < b; j++) f.get(pw).v128Load(wo + 16 * j).set(wv[j] as number);
      for (let i = 0; i < a; i++) {
        f.get(px).v128Load(xo + 16 * i).set(xv[0] as number);
        for (let j = 0; j < b; j++) madd(c, at(s, i, j), xv[0] as number, wv[j] as number);
      }
    }
  };
  const advance = (u: number) => {
    f.get(px).i32Const(16 * a * u).i32Add().set(px);
    f.get(pw).i32Const(16 * b * u).i32Add().set(pw);
    if (o.touch) {
      // Touch the W rows to be packed next (a demand load acting as a prefetch; see driver).
      f.get(PF).i32Load().drop();
      f.get(PF).get(PFSTEP).i32Add().set(PF);
    }
  };
  counted(
    f,
    cnt,
    () => f.get(STEPS).i32Const(Math.log2(ku)).i32ShrU(),
    () => {
      for (let u = 0; u < ku; u++) step(u % sets, u);
      advance(ku);
    },
  );
  if (ku > 1) {
    counted(
      f,
      cnt,
      () => f.get(STEPS).i32Const(ku - 1).i32And(),
      () => {
        step(0, 0);
        advance(1);
      },
    );
  }
  for (let s = 1; s < sets; s++) {
    for (let i = 0; i < a; i++) {
      for (let j = 0; j < b; j++) f.get(at(0, i, j)).get(at(s, i, j)).f32x4Add().set(at(0, i, j));
    }
  }
  reduceStore(c, acc[0] as number[][], a, b, PY, LDY, ACC);
  return f;
}

/**
 * pack(src, ld, rows, k, dst): rows x k floats (row stride ld bytes) to [ceil(k/4)][rows][4]
 * at dst, the last group zero padded.
 */
function emitPack(mb: ModuleBuilder): Fn {
  const f = mb.func("pack", [I32, I32, I32, I32, I32]);
  const [SRC, LD, ROWS, K, DST] = [0, 1, 2, 3, 4];
  const i = f.local(I32);
  const p = f.local(I32);
  const q = f.local(I32);
  const rs = f.local(I32);
  const cnt = f.local(I32);
  const tail = f.local(I32);
  const v = f.local(V128);
  f.get(ROWS).i32Const(4).i32Shl().set(rs);
  f.get(K).i32Const(3).i32And().set(tail);
  f.loop(() => {
    f.get(SRC).get(i).get(LD).i32Mul().i32Add().set(p);
    f.get(DST).get(i).i32Const(4).i32Shl().i32Add().set(q);
    counted(
      f,
      cnt,
      () => f.get(K).i32Const(2).i32ShrU(),
      () => {
        f.get(q).get(p).v128Load().v128Store();
        f.get(p).i32Const(16).i32Add().set(p);
        f.get(q).get(rs).i32Add().set(q);
      },
    );
    f.get(tail).if(() => {
      f.get(tail).i32Const(2).i32And().if(
        () => void f.get(p).v128Load64Zero().set(v),
        () => void f.get(p).v128Load32Zero().set(v),
      );
      f.get(tail).i32Const(3).i32Eq().if(() => void f.get(p).get(v).v128Load32Lane(2, 8).set(v));
      f.get(q).get(v).v128Store();
    });
    f.get(i).i32Const(1).i32Add().tee(i).get(ROWS).i32LtU().brIf(0);
  });
  return f;
}

/**
 * pack_panels(src, ld, rows, kc, dst): rows x kc floats (row stride ld bytes) as the panels of mr
 * rows the packed microkernel reads: the panel holding row m starts at dst + m * 4*ceil4(kc)
 * (the last panel may be shorter). The gemm driver packs one M block of one K block into its
 * scratch this way; packx packs every K block of X.
 */
function emitPackPanels(mb: ModuleBuilder, o: KernelOptions, pack: Fn): Fn {
  const f = mb.func("pack_panels", [I32, I32, I32, I32, I32]);
  const [SRC, LD, ROWS, KC, DST] = [0, 1, 2, 3, 4];
  const m = f.local(I32);
  const rows = f.local(I32);
  const rowBytes = f.local(I32);
  f.get(ROWS).i32Eqz().if(() => void f.return());
  f.get(KC).i32Const(3).i32Add().i32Const(-4).i32And().i32Const(2).i32Shl().set(rowBytes);
  f.loop(() => {
    f.get(ROWS).get(m).i32Sub().set(rows);
    f.get(rows).i32Const(o.mr).i32GtU().if(() => void f.i32Const(o.mr).set(rows));
    f.get(SRC).get(m).get(LD).i32Mul().i32Add();
    f.get(LD);
    f.get(rows);
    f.get(KC);
    f.get(DST).get(m).get(rowBytes).i32Mul().i32Add();
    f.call(pack);
    f.get(m).get(rows).i32Add().tee(m).get(ROWS).i32LtU().brIf(0);
  });
  return f;
}

export function buildKernelModule(o: KernelOptions): Uint8Array<ArrayBuffer> {
  checkOptions(o);
  const mb = new ModuleBuilder({ initialPages: 1, maximumPages: MAX_PAGES, shared: o.shared });
  const grid = (rows: number, cols: number, make: (a: number, b: number) => Fn) => {
    const t: Fn[][] = [];
    for (let a = 1; a <= rows; a++) {
      const row: Fn[] = [];
      for (let b = 1; b <= cols; b++) row.push(make(a, b));
      t.push(row);
    }
    return (a: number, b: number) => (t[a - 1] as Fn[])[b - 1] as Fn;
  };
  const drowsFns = Array.from({ length: o.dmr }, (_, i) => emitDirectRows(mb, o, i + 1));
  const drows = (a: number) => drowsFns[a - 1] as Fn;
  const ptile = grid(o.mr, o.nr, (a, b) => emitPackedTile(mb, o, a, b));
  const pack = emitPack(mb);
  const packPanels = emitPackPanels(mb, o, pack);

  // --- driver ------------------------------------------------------------------------------
  const g = mb.func("gemm", [I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32], [], true);
  const [X, LDX, W, LDW, Y, LDY, M, N, K, ACC, SCRATCH] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
  const kb = g.local(I32);
  const kc = g.local(I32);
  const rowBytes = g.local(I32);
  const accF = g.local(I32);
  const m0 = g.local(I32);
  const m1 = g.local(I32);
  const mstep = g.local(I32);
  const n = g.local(I32);
  const m = g.local(I32);
  const rn = g.local(I32);
  const rm = g.local(I32);
  const sw = g.local(I32);
  const n0 = g.local(I32);
  const n1 = g.local(I32);
  const pf = g.local(I32);
  const pfStep = g.local(I32);
  const xb = g.local(I32); // this M block's packed X panels

  // if (local == v) body(v) for v in 1..max (a chain of ifs).
  const dispatch = (local: number, max: number, body: (v: number) => void) => {
    const rec = (v: number) => {
      if (v === max) return body(v);
      g.get(local).i32Const(v).i32Eq().if(() => body(v), () => rec(v + 1));
    };
    rec(1);
  };
  // for (m = m0; m1 - m >= step; m += step) full(); then rest(r) for the r = m1 - m left rows.
  const rowsLoop = (step: number, full: () => void, rest: (r: number) => void) => {
    g.get(m0).set(m);
    g.block(() => {
      g.loop(() => {
        g.get(m1).get(m).i32Sub().i32Const(step).i32LtU().brIf(1);
        full();
        g.get(m).i32Const(step).i32Add().set(m);
        g.br(0);
      });
    });
    if (step > 1) g.get(m1).get(m).i32Sub().tee(rm).if(() => dispatch(rm, step - 1, rest));
  };
  const yAt = () => g.get(Y).get(m).get(LDY).i32Mul().i32Add().get(n).i32Const(2).i32Shl().i32Add();

  // Direct path: dmr rows of X at a time against all of W.
  const direct = () => {
    const callD = (a: number) => {
      g.get(X).get(m).get(LDX).i32Mul().i32Add();
      g.get(LDX);
      g.get(W);
      g.get(LDW);
      g.get(Y).get(m).get(LDY).i32Mul().i32Add();
      g.get(LDY);
      g.get(N);
      g.get(K);
      g.get(ACC).i32Const(ACCUMULATE).i32And();
      g.call(drows(a));
    };
    g.i32Const(0).set(m0);
    g.get(M).set(m1);
    rowsLoop(o.dmr, () => callD(o.dmr), (a) => callD(a));
  };

  // Packed path.
  const packed = () => {
    g.get(SCRATCH).i32Const(o.l2Bytes).i32Add().set(sw);
    const callP = (a: number, b: number) => {
      g.get(xb);
      g.get(m).get(m0).i32Sub().get(rowBytes).i32Mul();
      g.get(sw);
      g.get(n).get(n0).i32Sub().get(rowBytes).i32Mul();
      yAt();
      g.get(LDY);
      g.get(rowBytes).i32Const(4).i32ShrU();
      g.get(accF);
      g.get(pf);
      g.get(pfStep);
      g.call(ptile(a, b));
      g.get(pf).get(rowBytes).i32Const(4).i32ShrU().get(pfStep).i32Mul().i32Add().set(pf);
    };
    g.i32Const(0).set(kb);
    g.loop(() => {
      // kc = min(o.kc, K - kb); rows of the packed block are rowBytes = 4 * ceil4(kc)
      g.get(K).get(kb).i32Sub().set(kc);
      g.get(kc).i32Const(o.kc).i32GtU().if(() => void g.i32Const(o.kc).set(kc));
      g.get(kc).i32Const(3).i32Add().i32Const(-4).i32And().i32Const(2).i32Shl().set(rowBytes);
      g.get(ACC).i32Const(ACCUMULATE).i32And().get(kb).i32Or().set(accF);
      // M block rows: (l2Bytes / rowBytes) rounded down to a multiple of mr (>= mr)
      g.i32Const(o.l2Bytes).get(rowBytes).i32DivU().i32Const(o.mr).i32DivU().i32Const(o.mr).i32Mul().set(mstep);
      g.i32Const(0).set(m0);
      g.loop(() => {
        g.get(m0).get(mstep).i32Add().set(m1);
        g.get(m1).get(M).i32GtU().if(() => void g.get(M).set(m1));
        // Pack X rows [m0, m1) as panels of mr rows (the last one may be shorter), or find
        // them in the caller's packed X (K block kb at X + 4*M*kb, row m at + m*rowBytes).
        g.get(ACC).i32Const(PACKED_X).i32And().if(
          () => void g.get(X).get(M).get(kb).i32Mul().i32Const(2).i32Shl().i32Add().get(m0).get(rowBytes).i32Mul().i32Add().set(xb),
          () => {
            g.get(SCRATCH).set(xb);
            g.get(X).get(m0).get(LDX).i32Mul().i32Add().get(kb).i32Const(2).i32Shl().i32Add();
            g.get(LDX);
            g.get(m1).get(m0).i32Sub();
            g.get(kc);
            g.get(SCRATCH);
            g.call(packPanels);
          },
        );
        // W in blocks of up to nb rows: pack the whole block (one sequential burst of reads),
        // then run every X panel against each of its tiles of nr rows.
        g.i32Const(0).set(n0);
        g.block(() => {
          g.loop(() => {
            g.get(n0).get(N).i32GeU().brIf(1);
            g.get(n0).i32Const(o.nb).i32Add().set(n1);
            g.get(n1).get(N).i32GtU().if(() => void g.get(N).set(n1));
            g.get(n0).set(n);
            g.loop(() => {
              g.get(W).get(n).get(LDW).i32Mul().i32Add().get(kb).i32Const(2).i32Shl().i32Add();
              g.get(LDW);
              g.get(n1).get(n).i32Sub().set(rn);
              g.get(rn).i32Const(o.nr).i32GtU().if(() => void g.i32Const(o.nr).set(rn));
              g.get(rn);
              g.get(kc);
              g.get(sw).get(n).get(n0).i32Sub().get(rowBytes).i32Mul().i32Add();
              g.call(pack);
              g.get(n).i32Const(o.nr).i32Add().tee(n).get(n1).i32LtU().brIf(0);
            });
            // Touch plan: spread one load per microkernel step over the next block's raw W
            // rows [n1, n2), (n2 - n1 - 1) * ldw + kc floats, so that it is in cache when packed.
            g.get(sw).set(pf);
            g.i32Const(0).set(pfStep);
            if (o.touch) {
              g.get(n1).get(N).i32LtU().if(() => {
                g.get(n1).i32Const(o.nb).i32Add().set(rm);
                g.get(rm).get(N).i32GtU().if(() => void g.get(N).set(rm));
                g.get(W).get(n1).get(LDW).i32Mul().i32Add().get(kb).i32Const(2).i32Shl().i32Add().set(pf);
                // bytes / (steps * tiles * panels) = bytes / (steps * ceil((n1-n0)/nr) * ceil((m1-m0)/mr))
                // (minus 4: the last touch reads 4 bytes and must stay inside W)
                g.get(rm).get(n1).i32Sub().i32Const(1).i32Sub().get(LDW).i32Mul().get(kc).i32Const(2).i32Shl().i32Add().i32Const(4).i32Sub();
                g.get(rowBytes).i32Const(4).i32ShrU();
                g.get(n1).get(n0).i32Sub().i32Const(o.nr - 1).i32Add().i32Const(o.nr).i32DivU().i32Mul();
                g.get(m1).get(m0).i32Sub().i32Const(o.mr - 1).i32Add().i32Const(o.mr).i32DivU().i32Mul();
                g.i32DivU().set(pfStep);
              });
            }
            g.get(n0).set(n);
            g.block(() => {
              g.loop(() => {
                g.get(n1).get(n).i32Sub().i32Const(o.nr).i32LtU().brIf(1);
                rowsLoop(o.mr, () => callP(o.mr, o.nr), (a) => callP(a, o.nr));
                g.get(n).i32Const(o.nr).i32Add().set(n);
                g.br(0);
              });
            });
            if (o.nr > 1) {
              g.get(n1).get(n).i32Sub().tee(rn).if(() => dispatch(rn, o.nr - 1, (b) => rowsLoop(o.mr, () => callP(o.mr, b), (a) => callP(a, b))));
            }
            g.get(n1).set(n0);
            g.br(0);
          });
        });
        g.get(m1).tee(m0).get(M).i32LtU().brIf(0);
      });
      g.get(kb).get(kc).i32Add().tee(kb).get(K).i32LtU().brIf(0);
    });
  };

  // The packed path pays off from a few rows of X (and needs K >= 4 for its block sizes).
  g.get(M).i32Const(o.packMinM).i32LtU().get(K).i32Const(4).i32LtU().i32Or().if(direct, packed);

  const qdrivers = emitQuantKernels(mb, o, g);

  // --- task_list ----------------------------------------------------------------------------
  const ew = emitElementwise(mb);
  const tl = mb.func("task_list", [I32, I32, I32], [], true);
  {
    const [PTR, COUNT, SCR] = [0, 1, 2];
    const op = tl.local(I32);
    const r = tl.local(I32);
    const rows = tl.local(I32);
    const a = tl.local(I32);
    const b = tl.local(I32);
    const c = tl.local(I32);
    const slot = tl.local(I32);
    const lo = tl.local(I32);
    const arg = (i: number) => tl.get(PTR).i32Load(4 * i);
    const argF = (i: number) => tl.get(PTR).f32Load(4 * i);
    // for (r = 0; r < rows; r++) body()
    const forRows = (body: () => void) => {
      tl.i32Const(0).set(r);
      tl.block(() =>
        tl.loop(() => {
          tl.get(r).get(rows).i32GeU().brIf(1);
          body();
          tl.get(r).i32Const(1).i32Add().set(r);
          tl.br(0);
        }),
      );
    };
    tl.get(COUNT).if(() => {
      tl.loop(() => {
        arg(0).set(op);
        tl.get(op).i32Const(TASK.GEMM).i32Eq().if(() => {
          for (let i = 1; i <= 10; i++) arg(i);
          tl.get(SCR).call(g);
        });
        for (const [type, kind] of Object.entries(QUANT_TASK) as [QuantType, number][]) {
          const fn = qdrivers[type];
          tl.get(op).i32Const(kind).i32Eq().if(() => {
            for (let i = 1; i <= 10; i++) arg(i);
            tl.get(SCR);
            tl.get(SCR).i32Const(gemmScratchBytes(o)).i32Add();
            arg(11);
            tl.call(fn);
          });
        }
        tl.get(op).i32Const(TASK.TOUCH).i32Eq().if(() => {
          arg(1).set(a);
          arg(2).set(b);
          tl.block(() =>
            tl.loop(() => {
              tl.get(a).get(b).i32GeU().brIf(1);
              tl.get(a).i32Const(0).i32Store8();
              tl.get(a).i32Const(4096).i32Add().set(a);
              tl.br(0);
            }),
          );
        });
        tl.get(op).i32Const(TASK.GATED).i32Eq().if(() => {
          arg(7).set(rows);
          arg(1).set(a);
          arg(3).set(b);
          arg(5).set(c);
          forRows(() => {
            const call = (fn: Fn) => () => {
              tl.get(a).get(b).get(c);
              arg(8);
              tl.call(fn);
            };
            arg(9).if(call(ew.gated_gelu_tanh), call(ew.gated_silu));
            tl.get(a);
            arg(2).i32Add().set(a);
            tl.get(b);
            arg(4).i32Add().set(b);
            tl.get(c);
            arg(6).i32Add().set(c);
          });
        });
        tl.get(op).i32Const(TASK.RMSNORM).i32Eq().if(() => {
          arg(4).set(rows);
          arg(1).set(a);
          arg(2).set(b);
          forRows(() => {
            tl.get(a).get(b);
            arg(3);
            arg(5);
            argF(6);
            argF(7);
            tl.call(ew.rmsnorm);
            arg(5).i32Const(2).i32Shl().set(c);
            tl.get(a).get(c).i32Add().set(a);
            tl.get(b).get(c).i32Add().set(b);
          });
        });
        tl.get(op).i32Const(TASK.ATTENTION).i32Eq().if(() => {
          // scores = q · kᵀ (k rows hd floats apart)
          arg(1); arg(2); arg(3); arg(10).i32Const(2).i32Shl(); arg(6); arg(9).i32Const(2).i32Shl(); arg(8); arg(9); arg(10);
          tl.i32Const(0).get(SCR).call(g);
          arg(8).set(rows);
          arg(6).set(a);
          forRows(() => {
            arg(11).get(r).i32Add().set(slot);
            tl.get(slot);
            arg(13).i32Sub().i32Const(1).i32Add().set(lo);
            tl.get(lo);
            arg(12).i32LtS().if(() => void arg(12).set(lo));
            tl.get(lo).get(slot).i32GtS().if(() => void tl.get(slot).set(lo));
            tl.get(a);
            arg(9);
            tl.get(lo).get(slot);
            argF(14);
            tl.call(ew.softmax);
            tl.get(a);
            arg(9).i32Const(2).i32Shl().i32Add().set(a);
          });
          // z = scores · v (v transposed: hd rows of ldv bytes)
          arg(6); arg(9).i32Const(2).i32Shl(); arg(4); arg(5); arg(7); arg(2); arg(8); arg(10); arg(9);
          tl.i32Const(0).get(SCR).call(g);
        });
        tl.get(PTR).i32Const(4 * TASK_WORDS).i32Add().set(PTR);
        tl.get(COUNT).i32Const(1).i32Sub().tee(COUNT).brIf(0);
      });
    });
  }

  // --- packx: X for every K block, in the packed path's layout -----------------------------
  const px = mb.func("packx", [I32, I32, I32, I32, I32], [], true);
  {
    const [PX, PLDX, PM, PK, DST] = [0, 1, 2, 3, 4];
    const pkb = px.local(I32);
    const pkc = px.local(I32);
    px.get(PK).i32Eqz().if(() => void px.return());
    px.loop(() => {
      px.get(PK).get(pkb).i32Sub().set(pkc);
      px.get(pkc).i32Const(o.kc).i32GtU().if(() => void px.i32Const(o.kc).set(pkc));
      px.get(PX).get(pkb).i32Const(2).i32Shl().i32Add();
      px.get(PLDX);
      px.get(PM);
      px.get(pkc);
      px.get(DST).get(PM).get(pkb).i32Mul().i32Const(2).i32Shl().i32Add();
      px.call(packPanels);
      px.get(pkb).get(pkc).i32Add().tee(pkb).get(PK).i32LtU().brIf(0);
    });
  }

  // --- peak: 12 independent accumulators, no memory ------------------------------------------
  const pk = mb.func("peak", [I32], [F32], true);
  const pa = pk.local(V128);
  const pb = pk.local(V128);
  const pacc = Array.from({ length: 12 }, () => pk.local(V128));
  pk.v128ConstF32(1.0000001).set(pa);
  pk.v128ConstF32(0.9999999).set(pb);
  pk.get(0).if(() => {
    pk.loop(() => {
      for (const acc of pacc) {
        if (o.relaxed) pk.get(pa).get(pb).get(acc).f32x4RelaxedMadd().set(acc);
        else pk.get(acc).get(pa).get(pb).f32x4Mul().f32x4Add().set(acc);
      }
      pk.get(0).i32Const(1).i32Sub().tee(0).brIf(0);
    });
  });
  pk.v128ConstF32(0);
  for (const acc of pacc) pk.get(acc).f32x4Add();
  pk.f32x4ExtractLane(0);

  // --- peakdot: the int8 rows' products, no memory ----------------------------------------------
  // What the Q4_K/Q5_K/Q6_K int8-activation rows do per 32 weights, with every operand in a
  // register: two relaxed i8 dots (16 products each) summed in i16 and widened and weighted by one
  // i32x4.dot_i16x8_s with a scale, added to an i32 accumulator (without the relaxed dot: the i16
  // rows' two i32x4.dot_i16x8_s per 16). PEAKDOT_CHAINS independent chains; each chain's next
  // activations are its last i16 sums, so nothing is loop-invariant (the values are meaningless
  // and only the time counts).
  const pd = mb.func("peakdot", [I32], [I32], true);
  const [dw0, dw1, dsc] = [pd.local(V128), pd.local(V128), pd.local(V128)];
  const dx = Array.from({ length: PEAKDOT_CHAINS }, () => pd.local(V128));
  const dacc = Array.from({ length: PEAKDOT_CHAINS }, () => pd.local(V128));
  pd.v128ConstI32(0x05030107).set(dw0);
  pd.v128ConstI32(0x0b0d0f02).set(dw1);
  pd.v128ConstI32(0x0003000b).set(dsc);
  dx.forEach((x, c) => void pd.v128ConstI32(0x01fe7f03 + c).set(x));
  pd.get(0).if(() => {
    pd.loop(() => {
      dx.forEach((x, c) => {
        if (o.relaxedDot) {
          pd.get(x).get(dw0).i16x8RelaxedDotI8x16I7x16S();
          pd.get(x).get(dw1).i16x8RelaxedDotI8x16I7x16S().i16x8Add().tee(x);
          pd.get(dsc).i32x4DotI16x8S().get(dacc[c]!).i32x4Add().set(dacc[c]!);
        } else {
          pd.get(x).get(dw0).i32x4DotI16x8S();
          pd.get(x).get(dw1).i32x4DotI16x8S().i32x4Add().get(dacc[c]!).i32x4Add().tee(dacc[c]!).set(x);
        }
      });
      pd.get(0).i32Const(1).i32Sub().tee(0).brIf(0);
    });
  });
  pd.v128ConstI32(0);
  for (const acc of dacc) pd.get(acc).i32x4Add();
  pd.i32x4ExtractLane(0);
  return mb.emit();
}

/** Flops per iteration of `peak`. */
export const PEAK_FLOPS_PER_ITER = 12 * 8;

/**
 * Independent chains of `peakdot`: two weight vectors, a scale, two vectors per chain and two
 * temporaries fill the 15 xmm registers V8 allocates with five (measured 2026-12-07, 1 thread:
 * 4 chains 52, 5 chains 62, 6 chains, which spill, 44 G products/s).
 */
const PEAKDOT_CHAINS = 5;

/** Int8 (or, without the relaxed dot, i16) products per iteration of `peakdot`: 32 per chain, 16 on the i16 path. */
export const peakDotMacsPerIter = (relaxedDot: boolean) => PEAKDOT_CHAINS * (relaxedDot ? 32 : 16);

/**
 * A module exporting dot(): i16x8.relaxed_dot_i8x16_i7x16_s of the 16 bytes at 0 (signed) and at
 * 16 (0..127), stored at 32. The relaxed instruction's deterministic range is all we use, but an
 * engine may still get it wrong (V8 11.3's i32x4 "add" variant returns twice the dot and drops the
 * accumulator), so the runtime runs this and compares before using it.
 */
export function relaxedDotProbeBytes(): Uint8Array<ArrayBuffer> {
  const mb = new ModuleBuilder({ initialPages: 1, maximumPages: 1, shared: false });
  const f = mb.func("dot", [], [], true);
  f.i32Const(32).i32Const(0).v128Load(0).i32Const(0).v128Load(16).i16x8RelaxedDotI8x16I7x16S().v128Store(0);
  return mb.emit();
}

/** A minimal module using f32x4.relaxed_madd, for WebAssembly.validate. */
export function relaxedProbeBytes(): Uint8Array<ArrayBuffer> {
  const mb = new ModuleBuilder({ initialPages: 1, maximumPages: 1, shared: false });
  const f = mb.func("f", [], [], false);
  f.v128ConstF32(1).v128ConstF32(2).v128ConstF32(3).f32x4RelaxedMadd().drop();
  return mb.emit();
}
