// Kernels on weights kept in their quantized format (issue 16): Q8_0, Q4_0, Q4_K, Q6_K and BF16,
// each a rows kernel and a dequantization kernel on one shared skeleton (emitRows, emitDeq) and a
// driver (emitDriver). Q8_0 first: a llama.cpp Q8_0 block is 32 int8 quants and one scale. We hold a matrix W [N, K] (K a multiple of 32) as
//   qs: int8 [N][K] at wq (bytes)      ds: f32 [N][K/32] at ws (bytes)
// i.e. the file's blocks with the f16 scale widened to f32 and moved aside, so that the quants of
// a row are one contiguous stream (1.125 bytes per weight instead of the file's 1.0625; 4 bytes
// as f32).
//
//   q8rows_a(px, ldx, wq, ws, py, ldy, N, K, acc)   a = 1..dmr rows of X (the int8-activation rows: 1..idmr) against all N rows of W:
//     y[i][n] (+)= Σ_b ds[n][b] · Σ_{j<32} x[i][32b+j] · qs[n][32b+j]
//     The float path: quants widened to f32 in registers (i8 → i16 → i32 → f32) and multiplied
//     with f32 activations, so the result differs from the f32 engine's only by summation order
//     (no activation quantization, unlike llama.cpp's q8 dot). Decode is bandwidth-bound: W is
//     streamed once, row after row, at 1.125 instead of 4 bytes per weight.
//   q8deq(wq, ws, rows, K, dst)   dequantize rows to f32 [rows][K] at dst (bytes).
//   qgemm(x, ldx, wq, ws, y, ldy, M, N, K, flags, scratch, deq, deqRows)   Y (+)= X · Wᵀ:
//     M < packMinM (or int8 activations): the direct rows above. Otherwise chunks of deqRows rows of W are dequantized
//     into the thread's `deq` area and multiplied by the f32 gemm (its packed path: the dequant
//     pass is amortized over the M rows of X; flags as gemm's, PACKED_X included).
import { F32, type Fn, I32, type ModuleBuilder, V128 } from "./wasm-emit.js";
import type { KernelOptions } from "./kernels.js";
import type { QuantType } from "../weights.js";

/** Bytes of (wq, ws) for N rows of K of a quantized matrix. */
export function quantBytes(type: QuantType, N: number, K: number): { wq: number; ws: number } {
  if (type === "bf16" || type === "f16") return { wq: N * K * 2, ws: 0 };
  if (type === "q6_k") return { wq: ((N * K) / 256) * 192, ws: ((N * K) / 256) * 20 };
  if (type === "q4_0") return { wq: (N * K) / 2, ws: (N * K) / 8 };
  if (type === "q5_k") return { wq: ((N * K) / 256) * 160, ws: ((N * K) / 256) * 24 };
  return type === "q8_0" ? { wq: N * K, ws: (N * K) / 8 } : { wq: (N * K) / 2, ws: ((N * K) / 256) * 24 };
}
/** Row length a quantized matrix must be a multiple of. */
export const QUANT_BLOCK: Record<QuantType, number> = { q8_0: 32, q4_k: 256, bf16: 8, q6_k: 256, q4_0: 32, f16: 8, q5_k: 256 };

/** Driver flag (beside kernels.ts ACCUMULATE 1, PACKED_X 2): the int8-activation rows (with PACKED_X: X already quantized by q8act). */
export const INT8_ACT = 4;
/** kernels.ts PACKED_X (kernels.ts imports this file, so the value is repeated, not imported). */
const PACKED_X = 2;

/** Bytes of each thread's dequantization area (chunks of W rows as f32 for the prefill path). */
export const DEQ_BYTES = 1 << 20;
/** Rows of a Q8_0 matrix with K columns dequantized per chunk. */
export const deqRowsFor = (K: number) => Math.max(1, Math.floor(DEQ_BYTES / (4 * K)));
/** Largest K a quantized matrix may have here (one row must fit the dequantization area). */
export const MAX_Q8_K = DEQ_BYTES / 4;

// ---- shared pieces of the kernels ---------------------------------------------------------

type Madd = (acc: number, x: number, w: number) => void;

/** acc += x·w: f32x4.relaxed_madd when the engine has it (as kernels.ts), else mul + add. */
function maddOf(f: Fn, o: KernelOptions): Madd {
  return (acc, x, w) => {
    if (o.relaxed) f.get(x).get(w).get(acc).f32x4RelaxedMadd().set(acc);
    else f.get(acc).get(x).get(w).f32x4Mul().f32x4Add().set(acc);
  };
}

/**
 * Widens the 16 byte lanes of `u` (signed or unsigned) to four f32x4, lanes 4k..4k+3 for k = 0..3:
 * before(k) runs first (e.g. pushes a store address), then the vector is pushed and each(k) runs.
 */
function widen8(f: Fn, u: number, w16: number, signed: boolean, each: (k: number) => void, before?: (k: number) => void): void {
  for (let part = 0; part < 2; part++) {
    f.get(u);
    if (signed && part === 0) f.i16x8ExtendLowI8x16S();
    else if (signed) f.i16x8ExtendHighI8x16S();
    else if (part === 0) f.i16x8ExtendLowI8x16U();
    else f.i16x8ExtendHighI8x16U();
    f.set(w16);
    for (let g = 0; g < 2; g++) {
      before?.(2 * part + g);
      f.get(w16);
      if (signed && g === 0) f.i32x4ExtendLowI16x8S();
      else if (signed) f.i32x4ExtendHighI16x8S();
      else if (g === 0) f.i32x4ExtendLowI16x8U();
      else f.i32x4ExtendHighI16x8U();
      f.f32x4ConvertI32x4S();
      each(2 * part + g);
    }
  }
}

/** What a rows kernel's type-specific parts see (emitRows). */
interface RowsCtx {
  f: Fn;
  a: number;
  madd: Madd;
  /** The a rows of X (byte pointers, advanced by emitRows after each block). */
  xp: number[];
  /** Per row, the f32x4 accumulator emitRows reduces and stores. */
  acc: number[];
  /** Parameters: LDX, WQ, WS, K, and the extra ones after ACC. */
  LDX: number;
  WQ: number;
  WS: number;
  K: number;
  extra: number[];
}

/**
 * A rows kernel, `name`_a(px, ldx, wq, ws, py, ldy, N, K, acc, ...extra): a rows of X against all
 * N rows of W, W's rows visited in order (one sequential stream). The skeleton every type shares:
 * per W row, xp[i] = px + i·ldx and acc[i] = 0; per block of 2^shift weights `block()` (which reads
 * and advances the type's own W pointers) then xp[i] += 4·2^shift; finally y[i][n] (+)= Σ lanes of
 * acc[i] (minus the scalar sub[i] when given). `build` declares the type's locals and parts.
 */
function emitRows(
  mb: ModuleBuilder,
  o: KernelOptions,
  name: string,
  a: number,
  extraParams: number,
  /** xBytes: bytes of X per weight (4: f32; 2: the int8-activation kernels' i16 quants). */
  build: (c: RowsCtx) => { shift: number; xBytes?: number; init(): void; rowStart?(): void; block(): void; beforeStore?(i: number): void; sub?: number[] },
): Fn {
  const f = mb.func(`${name}_${a}`, Array.from({ length: 9 + extraParams }, () => I32));
  const [PX, LDX, WQ, WS, PY, LDY, N, K, ACC] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
  const xp = Array.from({ length: a }, () => f.local(I32));
  const yp = f.local(I32);
  const n = f.local(I32);
  const cnt = f.local(I32);
  const acc = Array.from({ length: a }, () => f.local(V128));
  const tmp = f.local(V128);
  const sc = f.local(F32);
  const k = build({ f, a, madd: maddOf(f, o), xp, acc, LDX, WQ, WS, K, extra: Array.from({ length: extraParams }, (_, i) => 9 + i) });
  f.get(N).i32Eqz().if(() => void f.return());
  k.init();
  f.get(PY).i32Const(0).i32Add().set(yp);
  f.loop(() => {
    // Pointers are results of i32.add (not bare parameters), as in kernels.ts.
    f.get(PX).i32Const(0).i32Add().set(xp[0]!);
    for (let i = 1; i < a; i++) f.get(xp[i - 1]!).get(LDX).i32Add().set(xp[i]!);
    for (let i = 0; i < a; i++) f.v128ConstF32(0).set(acc[i]!);
    k.rowStart?.();
    f.get(K).i32Const(k.shift).i32ShrU().tee(cnt).if(() => {
      f.loop(() => {
        k.block();
        for (let i = 0; i < a; i++) f.get(xp[i]!).i32Const((k.xBytes ?? 4) << k.shift).i32Add().set(xp[i]!);
        f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
      });
    });
    for (let i = 0; i < a; i++) {
      k.beforeStore?.(i);
      const A = acc[i]!;
      f.get(A).get(A).get(A).shuffle32(2, 3, 0, 1).f32x4Add().set(tmp);
      f.get(tmp).get(tmp).get(tmp).shuffle32(1, 0, 3, 2).f32x4Add().f32x4ExtractLane(0);
      if (k.sub) f.get(k.sub[i]!).f32Sub();
      f.set(sc);
      const yAddr = () => (i === 0 ? f.get(yp) : f.get(yp).get(LDY).i32Const(i).i32Mul().i32Add());
      f.get(ACC).if(() => void yAddr().f32Load().get(sc).f32Add().set(sc));
      yAddr().get(sc).f32Store();
    }
    f.get(yp).i32Const(4).i32Add().set(yp);
    f.get(n).i32Const(1).i32Add().tee(n).get(N).i32LtU().brIf(0);
  });
  return f;
}

/**
 * Accumulates the 16 i8/u8 weights in `u` against X at byte offset `off` (+ 16·k for lanes 4k..):
 * t[i] = x·w for the first vector of a group (first() true), t[i] += x·w after.
 */
function dot16(c: RowsCtx, u: number, signed: boolean, l: { w16: number; wf: number; xv: number; t: number[] }, off: number, first: { on: boolean }): void {
  widen8(c.f, u, l.w16, signed, (k) => {
    c.f.set(l.wf);
    for (let i = 0; i < c.a; i++) {
      c.f.get(c.xp[i]!).v128Load(off + 16 * k).set(l.xv);
      if (first.on) c.f.get(l.xv).get(l.wf).f32x4Mul().set(l.t[i]!);
      else c.madd(l.t[i]!, l.xv, l.wf);
    }
    first.on = false;
  });
}

/** dot16's locals with two accumulator chains per row: tA for the even f32x4 of each 16 weights, tB for the odd. */
interface Chains { w16: number; wf: number; xv: number; tA: number[]; tB: number[] }

/**
 * dot16 on two accumulator chains per row, so that consecutive multiply-adds do not wait on each
 * other's latency (one chain made the float rows latency-bound once their loop steps stopped
 * spilling); X from the pointers xp at byte offset `off`; first: the chains start here.
 */
function dot16x2(c: RowsCtx, xp: number[], u: number, signed: boolean, l: Chains, off: number, first: boolean): void {
  widen8(c.f, u, l.w16, signed, (k) => {
    c.f.set(l.wf);
    for (let i = 0; i < c.a; i++) {
      const t = (k % 2 ? l.tB : l.tA)[i]!;
      c.f.get(xp[i]!).v128Load(off + 16 * k).set(l.xv);
      if (first && k < 2) c.f.get(l.xv).get(l.wf).f32x4Mul().set(t);
      else c.madd(t, l.xv, l.wf);
    }
  });
}

/** acc[i] += (tA[i] + tB[i]) · splat(scale on the stack), via the f32x4 local `tmp`. */
function scaleChainsInto(c: RowsCtx, l: Chains, tmp: number): void {
  c.f.f32x4Splat().set(tmp);
  for (let i = 0; i < c.a; i++) {
    c.f.get(l.tA[i]!).get(l.tB[i]!).f32x4Add().set(l.tA[i]!);
    c.madd(c.acc[i]!, l.tA[i]!, tmp);
  }
}

/**
 * acc[i] −= dmin · Σ_j m_j · s_j for one Q4_K/Q5_K super-block: its eight 6-bit mins (bytes at
 * mt + 16) as f32 against the row's eight sums per 32 at sumAt(i) (Σx in the float rows,
 * xd·Σ qx in the int8 rows). l: five f32x4 locals for the mins, the sums and −dmin.
 */
function minsInto(c: RowsCtx, mt: number, dmin: number, sumAt: (i: number) => void, l: { mlo: number; mhi: number; s: number; t: number; neg: number }): void {
  const { f } = c;
  f.get(mt).v128Load8x8U(16).set(l.t);
  f.get(l.t).i32x4ExtendLowI16x8U().f32x4ConvertI32x4S().set(l.mlo);
  f.get(l.t).i32x4ExtendHighI16x8U().f32x4ConvertI32x4S().set(l.mhi);
  f.get(dmin).f32Neg().f32x4Splat().set(l.neg);
  for (let i = 0; i < c.a; i++) {
    sumAt(i);
    f.v128Load(0).get(l.mlo).f32x4Mul().set(l.t);
    sumAt(i);
    f.v128Load(16).set(l.s);
    c.madd(l.t, l.s, l.mhi);
    c.madd(c.acc[i]!, l.t, l.neg);
  }
}

/** acc[i] += t[i] · splat(scale on the stack), via the f32x4 local `tmp`. */
function scaleInto(c: RowsCtx, t: number[], tmp: number): void {
  c.f.f32x4Splat().set(tmp);
  for (let i = 0; i < c.a; i++) c.madd(c.acc[i]!, t[i]!, tmp);
}

/**
 * A dequantization kernel, `name`(wq, ws, rows, K, dst): rows·K weights as f32 at dst, in blocks of
 * 2^shift weights: `block(p)` writes one block at the byte pointer p (advanced here by 4·2^shift)
 * and advances the type's own pointers.
 */
function emitDeq(mb: ModuleBuilder, name: string, shift: number, build: (f: Fn, P: { WQ: number; WS: number }) => { init(): void; block(p: number): void }): Fn {
  const f = mb.func(name, [I32, I32, I32, I32, I32], [], true);
  const [WQ, WS, ROWS, K, DST] = [0, 1, 2, 3, 4];
  const p = f.local(I32);
  const cnt = f.local(I32);
  const k = build(f, { WQ, WS });
  f.get(ROWS).get(K).i32Mul().i32Const(shift).i32ShrU().tee(cnt).i32Eqz().if(() => void f.return());
  k.init();
  f.get(DST).i32Const(0).i32Add().set(p);
  f.loop(() => {
    k.block(p);
    f.get(p).i32Const(4 << shift).i32Add().set(p);
    f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
  });
  return f;
}

/** Stores the 16 widened lanes of `u` times the f32x4 `s` (minus `m` when given) at p + off. */
function store16(f: Fn, u: number, w16: number, signed: boolean, p: number, off: number, s: number, m?: number): void {
  widen8(
    f,
    u,
    w16,
    signed,
    (k) => {
      f.get(s).f32x4Mul();
      if (m !== undefined) f.get(m).f32x4Sub();
      f.v128Store(off + 16 * k);
    },
    () => void f.get(p),
  );
}

/** Sets q = WQ + 0 and s = WS + 0 (pointers as i32.add results, as in kernels.ts). */
function pointers(f: Fn, q: number, WQ: number, s: number, WS: number): void {
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(WS).i32Const(0).i32Add().set(s);
}

// ---- Q8_0 -------------------------------------------------------------------------------------

const emitQ8Rows = (mb: ModuleBuilder, o: KernelOptions, a: number): Fn =>
  emitRows(mb, o, "q8rows", a, 0, (c) => {
    const { f } = c;
    const q = f.local(I32), s = f.local(I32);
    const t = Array.from({ length: c.a }, () => f.local(V128));
    const l = { w16: f.local(V128), wf: f.local(V128), xv: f.local(V128), t };
    const wv = f.local(V128), d = f.local(V128);
    return {
      shift: 5,
      init: () => pointers(f, q, c.WQ, s, c.WS),
      block: () => {
        const first = { on: true };
        for (let h = 0; h < 2; h++) {
          f.get(q).v128Load(16 * h).set(wv);
          dot16(c, wv, true, l, 64 * h, first);
        }
        f.get(s).f32Load();
        scaleInto(c, t, d);
        f.get(q).i32Const(32).i32Add().set(q);
        f.get(s).i32Const(4).i32Add().set(s);
      },
    };
  });

const emitQ8Deq = (mb: ModuleBuilder): Fn =>
  emitDeq(mb, "q8deq", 5, (f, P) => {
    const q = f.local(I32), s = f.local(I32);
    const wv = f.local(V128), w16 = f.local(V128), d = f.local(V128);
    return {
      init: () => pointers(f, q, P.WQ, s, P.WS),
      block: (p) => {
        f.get(s).f32Load().f32x4Splat().set(d);
        for (let h = 0; h < 2; h++) {
          f.get(q).v128Load(16 * h).set(wv);
          store16(f, wv, w16, true, p, 64 * h, d);
        }
        f.get(q).i32Const(32).i32Add().set(q);
        f.get(s).i32Const(4).i32Add().set(s);
      },
    };
  });

// Q4_K (llama.cpp's 4-bit K-quant: super-blocks of 256 = 8 sub-blocks of 32, each with a 6-bit
// scale and min; value = d·sc·q − dmin·m). W [N, K] (K % 256 == 0) is held as
//   wq: the file's nibbles, K/2 bytes per row (per super-block 4 chunks of 32 bytes: low nibbles
//       are sub-block 2c, high nibbles sub-block 2c+1, 32 weights each)
//   wm: per super-block 24 bytes: d (f32), dmin (f32), sc[8] (u8), m[8] (u8)
// i.e. 0.59 bytes per weight (the file's 0.5625 with d, dmin widened and the 6-bit codes unpacked).
// The dot product of a row with x is Σ_j d·sc_j·Σ x·q − dmin·m_j·Σ_j x: the sums of x per 32 are
// computed once per call (xsums, in the thread's scratch) and the min term is a scalar per
// sub-block. d·sc_j is one f32 multiply, as in ggml's dequantization.

/** xsums(px, ldx, M, K, dst): dst[m][b] = Σ_{j<32} x[m][32b + j] (f32, rows K/32 floats apart). */
function emitXSums(mb: ModuleBuilder): Fn {
  const f = mb.func("xsums", [I32, I32, I32, I32, I32]);
  const [PX, LDX, M, K, DST] = [0, 1, 2, 3, 4];
  const m = f.local(I32);
  const p = f.local(I32);
  const d = f.local(I32);
  const cnt = f.local(I32);
  const v = f.local(V128);
  f.get(M).i32Eqz().get(K).i32Const(5).i32ShrU().i32Eqz().i32Or().if(() => void f.return());
  f.get(DST).i32Const(0).i32Add().set(d);
  f.loop(() => {
    f.get(PX).get(m).get(LDX).i32Mul().i32Add().set(p);
    f.get(K).i32Const(5).i32ShrU().set(cnt);
    f.loop(() => {
      f.get(p).v128Load(0);
      for (let i = 1; i < 8; i++) f.get(p).v128Load(16 * i).f32x4Add();
      f.set(v);
      f.get(d);
      f.get(v).get(v).get(v).shuffle32(2, 3, 0, 1).f32x4Add().set(v);
      f.get(v).get(v).get(v).shuffle32(1, 0, 3, 2).f32x4Add().f32x4ExtractLane(0);
      f.f32Store();
      f.get(d).i32Const(4).i32Add().set(d);
      f.get(p).i32Const(128).i32Add().set(p);
      f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
    });
    f.get(m).i32Const(1).i32Add().tee(m).get(M).i32LtU().brIf(0);
  });
  return f;
}

/** Pushes the 16 nibbles of `v` (low if hi is false, else high) as u8 lanes. */
function nibbles(f: Fn, v: number, hi: boolean): void {
  f.get(v);
  // A 16-bit shift and the mask rather than i8x16.shr_u: x64 has no byte shift, and V8 builds that
  // shift's own mask in every use, while one v128.const is kept in a register.
  if (hi) f.i32Const(4).i16x8ShrU();
  f.v128ConstI32(0x0f0f0f0f).v128And();
}

/** Q5_K: ors the fifth bit of sub-block j's 16 quants (bit j of each byte of `qh`) into the nibbles on the stack. */
function fifthBit(f: Fn, qh: number, j: number): void {
  f.get(qh);
  // 16-bit shifts (see nibbles): bit 0 of each byte after the shift by j < 8 is that byte's bit j.
  if (j > 0) f.i32Const(j).i16x8ShrU();
  // Bytes are 0 or 1 after the mask, so a 16-bit shift by 4 never carries into the next byte.
  f.v128ConstI32(0x01010101).v128And().i32Const(4).i16x8Shl().v128Or();
}

/**
 * q4krows_a(px, ldx, wq, wm, py, ldy, N, K, acc, xs): a rows of X against all N rows of a Q4_K
 * matrix; xs: the rows' xsums (K/32 floats per row, consecutive).
 */
const emitQ4KRows = (mb: ModuleBuilder, o: KernelOptions, a: number, five = false): Fn =>
  emitRows(mb, o, five ? "q5krows" : "q4krows", a, 1, (c) => {
    const { f } = c;
    const XS = c.extra[0]!;
    const xs = f.local(I32), q = f.local(I32), mt = f.local(I32);
    // Two accumulator chains per row (even and odd f32x4 of each 16 weights): one chain waited
    // on the multiply-add latency. One loop step per 64 weights (see Q8I_BLOCKS): its own pointers.
    const l: Chains = { w16: f.local(V128), wf: f.local(V128), xv: f.local(V128), tA: Array.from({ length: c.a }, () => f.local(V128)), tB: Array.from({ length: c.a }, () => f.local(V128)) };
    const xq = Array.from({ length: c.a }, () => f.local(I32));
    const qq = f.local(I32), mq = f.local(I32), step = f.local(I32);
    const v0 = f.local(V128), v1 = f.local(V128), u = f.local(V128), tmp = f.local(V128), mlo = f.local(V128), mhi = f.local(V128);
    const qh = [f.local(V128), f.local(V128)];
    const dd = f.local(F32), dmin = f.local(F32);
    /** Row i's xsums: K/32 floats (K/8 bytes) after row i−1's. */
    const xsAddr = (i: number) => (i === 0 ? f.get(xs) : f.get(xs).i32Const(i).get(c.K).i32Mul().i32Const(3).i32ShrU().i32Add());
    return {
      shift: 8,
      init: () => pointers(f, q, c.WQ, mt, c.WS),
      rowStart: () => void f.get(XS).i32Const(0).i32Add().set(xs),
      block: () => {
        f.get(mt).f32Load(0).set(dd);
        f.get(mt).f32Load(4).set(dmin);
        if (five) for (let h = 0; h < 2; h++) f.get(q).v128Load(128 + 16 * h).set(qh[h]!);
        f.get(q).i32Const(0).i32Add().set(qq);
        f.get(mt).i32Const(0).i32Add().set(mq);
        for (let i = 0; i < c.a; i++) f.get(c.xp[i]!).i32Const(0).i32Add().set(xq[i]!);
        f.i32Const(4).set(step);
        f.loop(() => {
          f.get(qq).v128Load(0).set(v0);
          f.get(qq).v128Load(16).set(v1);
          for (const hi of [false, true]) {
            const j = hi ? 1 : 0;
            for (const [vi, v] of [v0, v1].entries()) {
              nibbles(f, v, hi);
              if (five) fifthBit(f, qh[vi]!, j);
              f.set(u);
              dot16x2(c, xq, u, false, l, 4 * (32 * j + 16 * vi), vi === 0);
            }
            // acc += (tA + tB) · (d·sc_j)
            f.get(dd).get(mq).i32Load8U(8 + j).f32ConvertI32U().f32Mul();
            scaleChainsInto(c, l, tmp);
          }
          f.get(qq).i32Const(32).i32Add().set(qq);
          f.get(mq).i32Const(2).i32Add().set(mq);
          for (let i = 0; i < c.a; i++) f.get(xq[i]!).i32Const(256).i32Add().set(xq[i]!);
          if (five) for (let h = 0; h < 2; h++) f.get(qh[h]!).i32Const(2).i16x8ShrU().set(qh[h]!);
          f.get(step).i32Const(1).i32Sub().tee(step).brIf(0);
        });
        // acc −= dmin · Σ_j m_j · Σx_j, once per super-block.
        minsInto(c, mt, dmin, xsAddr, { mlo, mhi, s: l.xv, t: tmp, neg: l.wf });
        f.get(q).i32Const(five ? 160 : 128).i32Add().set(q);
        f.get(mt).i32Const(24).i32Add().set(mt);
        f.get(xs).i32Const(32).i32Add().set(xs);
      },
    };
  });

// The int8-activation path (weights "native-int8"; decode rows, and Q4_K/Q5_K prefill): like llama.cpp's q4_K·q8_K
// dot, each row of X is quantized per 256 values to int8 with one f32 scale (q = nearest(x·127 /
// max|x|), ties to even), held as i16 so that i32x4.dot_i16x8_s multiplies 8 weight–activation
// pairs per instruction; per sub-block the integer sums are weighted by the 6-bit scales in i32
// and each super-block's total converted once: Σ_b d_b·xd_b·Σ_j sc_j·Σ q·qx. The min term uses
// the sums of the rounded activations too (xd·Σ qx per 32, as llama.cpp's bsums), so the result
// is the dot of the dequantized weights with the dequantized activations. (Exact sums of x there
// would leave the rounding error multiplied by the uncentred d·sc·q part of the weights.)

/**
 * Bytes of one row of X in the int8-activation layout: xd·Σ qx per 32 (K/32 f32), scales xd (K/256
 * f32), quants qx (K i16, for i32x4.dot_i16x8_s), the same quants as i8 (K bytes, for the relaxed
 * dot), Σ qx per 16 (K/16 i16, for the relaxed Q6_K rows' −32 term).
 */
export const q8actRowBytes = (K: number) => K / 8 + K / 64 + 3 * K + K / 8;

/** Pushes q8actRowBytes of the i32 in local K (the q8act layout's row stride, computed in Wasm). */
function pushQ8actRowBytes(f: Fn, K: number): void {
  f.get(K).i32Const(3).i32ShrU().i32Const(1).i32Shl().get(K).i32Const(6).i32ShrU().i32Add().get(K).i32Const(3).i32Mul().i32Add();
}

/** q8act(px, ldx, M, K, dst): M rows of f32 X into the int8-activation layout, q8actRowBytes(K) apart (exported: the runtime quantizes X once for all threads). */
function emitQ8Act(mb: ModuleBuilder): Fn {
  const f = mb.func("q8act", [I32, I32, I32, I32, I32], [], true);
  const [PX, LDX, M, K, DST] = [0, 1, 2, 3, 4];
  const m = f.local(I32), p = f.local(I32), row = f.local(I32), sd = f.local(I32), qd = f.local(I32), cnt = f.local(I32), i = f.local(I32), xs = f.local(I32), qb = f.local(I32), bs = f.local(I32);
  const mx = f.local(V128), inv = f.local(V128), a0 = f.local(V128), a1 = f.local(V128), sum = f.local(V128), s4 = f.local(V128);
  const n16 = [f.local(V128), f.local(V128)];
  const amax = f.local(F32), d = f.local(F32);
  f.get(M).i32Eqz().if(() => void f.return());
  f.loop(() => {
    // This row's area: xsums, then the scales, the quants (i16, then i8), the sums per 16.
    f.get(DST).get(m);
    pushQ8actRowBytes(f, K);
    f.i32Mul().i32Add().set(row);
    f.get(PX).get(m).get(LDX).i32Mul().i32Add().set(p);
    f.get(row).i32Const(0).i32Add().set(xs);
    f.get(row).get(K).i32Const(3).i32ShrU().i32Add().set(sd);
    f.get(sd).get(K).i32Const(6).i32ShrU().i32Add().set(qd);
    f.get(qd).get(K).i32Const(1).i32Shl().i32Add().set(qb);
    f.get(qb).get(K).i32Add().set(bs);
    f.get(K).i32Const(8).i32ShrU().set(cnt);
    f.loop(() => {
      f.v128ConstF32(0).set(mx);
      f.i32Const(0).set(i);
      f.loop(() => {
        f.get(mx).get(p).get(i).i32Add().v128Load(0).f32x4Abs().f32x4Max().set(mx);
        f.get(i).i32Const(16).i32Add().tee(i).i32Const(1024).i32LtU().brIf(0);
      });
      f.get(mx).get(mx).get(mx).shuffle32(2, 3, 0, 1).f32x4Max().set(mx);
      f.get(mx).get(mx).get(mx).shuffle32(1, 0, 3, 2).f32x4Max().f32x4ExtractLane(0).set(amax);
      // d = max|x|/127 (0 for an all-zero block, whose quants are then 0).
      f.get(amax).f32Const(127).f32Div().set(d);
      f.get(sd).get(d).f32Store();
      f.get(amax).f32Const(0).f32Gt().if(
        () => void f.f32Const(127).get(amax).f32Div().f32x4Splat().set(inv),
        () => void f.v128ConstF32(0).set(inv),
      );
      f.i32Const(0).set(i);
      f.loop(() => {
        // 32 values -> 32 i16 quants (64 bytes), and d·Σ of those quants (exact integers in f32 until the product).
        f.v128ConstF32(0).set(sum);
        for (let h = 0; h < 4; h++) {
          f.get(p).get(i).i32Add().v128Load(32 * h).get(inv).f32x4Mul().f32x4Nearest().set(a0);
          f.get(p).get(i).i32Add().v128Load(32 * h + 16).get(inv).f32x4Mul().f32x4Nearest().set(a1);
          f.get(sum).get(a0).f32x4Add().get(a1).f32x4Add().set(sum);
          f.get(qd).get(i).i32Const(1).i32ShrU().i32Add();
          f.get(a0).i32x4TruncSatF32x4S().get(a1).i32x4TruncSatF32x4S().i16x8NarrowI32x4S().tee(n16[h % 2]!).v128Store(16 * h);
          if (h % 2) {
            // The same 16 quants as i8 (|q| <= 127: the narrowing is exact), and their sum as i16.
            f.get(qb).get(i).i32Const(2).i32ShrU().i32Add().get(n16[0]!).get(n16[1]!).i8x16NarrowI16x8S().v128Store(8 * (h - 1));
            f.get(n16[0]!).get(n16[1]!).i16x8Add().v128ConstI32(0x00010001).i32x4DotI16x8S().set(s4);
            f.get(s4).get(s4).get(s4).shuffle32(2, 3, 0, 1).i32x4Add().set(s4);
            f.get(bs).get(i).i32Const(5).i32ShrU().i32Add();
            f.get(s4).get(s4).get(s4).shuffle32(1, 0, 3, 2).i32x4Add().i32x4ExtractLane(0).i32Store16(h - 1);
          }
        }
        f.get(xs);
        f.get(sum).get(sum).get(sum).shuffle32(2, 3, 0, 1).f32x4Add().set(sum);
        f.get(sum).get(sum).get(sum).shuffle32(1, 0, 3, 2).f32x4Add().f32x4ExtractLane(0).get(d).f32Mul().f32Store();
        f.get(xs).i32Const(4).i32Add().set(xs);
        f.get(i).i32Const(128).i32Add().tee(i).i32Const(1024).i32LtU().brIf(0);
      });
      f.get(p).i32Const(1024).i32Add().set(p);
      f.get(qd).i32Const(512).i32Add().set(qd);
      f.get(qb).i32Const(256).i32Add().set(qb);
      f.get(bs).i32Const(32).i32Add().set(bs);
      f.get(sd).i32Const(4).i32Add().set(sd);
      f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
    });
    f.get(m).i32Const(1).i32Add().tee(m).get(M).i32LtU().brIf(0);
  });
  return f;
}

/**
 * q8act32(px, ldx, M, K, dst): M rows of f32 X quantized for the Q8_0 int8 rows as llama.cpp's
 * quantize_row_q8_0 (x86) does it: per 32 values d = max|x|/127, q = nearest(x · 127/max|x|) ties
 * to even, and d kept as the f16 the q8_0 block stores (rounded to nearest even: F16C), which is
 * what its q8_0·q8_0 dot multiplies by. Same row stride as q8act (q8actRowBytes(K)): the K/32
 * scales (as f32) where q8act puts its sums per 32, the i16 quants where q8act puts its own.
 */
function emitQ8Act32(mb: ModuleBuilder): Fn {
  const f = mb.func("q8act32", [I32, I32, I32, I32, I32], [], true);
  const [PX, LDX, M, K, DST] = [0, 1, 2, 3, 4];
  const m = f.local(I32), p = f.local(I32), end = f.local(I32), sd = f.local(I32), qd = f.local(I32), bits = f.local(I32);
  const x = Array.from({ length: 8 }, () => f.local(V128));
  const mx = f.local(V128), inv = f.local(V128);
  const amax = f.local(F32), d = f.local(F32);
  f.get(M).i32Eqz().if(() => void f.return());
  f.loop(() => {
    f.get(DST).get(m);
    pushQ8actRowBytes(f, K);
    f.i32Mul().i32Add().set(sd);
    f.get(sd).get(K).i32Const(3).i32ShrU().i32Add().get(K).i32Const(6).i32ShrU().i32Add().set(qd);
    f.get(PX).get(m).get(LDX).i32Mul().i32Add().tee(p).get(K).i32Const(2).i32Shl().i32Add().set(end);
    f.loop(() => {
      for (let k = 0; k < 8; k++) f.get(p).v128Load(16 * k).set(x[k]!);
      f.get(x[0]!).f32x4Abs().set(mx);
      for (let k = 1; k < 8; k++) f.get(mx).get(x[k]!).f32x4Abs().f32x4Max().set(mx);
      f.get(mx).get(mx).get(mx).shuffle32(2, 3, 0, 1).f32x4Max().set(mx);
      f.get(mx).get(mx).get(mx).shuffle32(1, 0, 3, 2).f32x4Max().f32x4ExtractLane(0).tee(amax).f32Const(127).f32Div().set(d);
      // d to the nearest f16 (ties to even): below 2^-14 a multiple of 2^-24, above it 10 mantissa bits; past 65504 infinity.
      f.get(d).f32Const(2 ** -14).f32Lt().if(
        () => void f.get(d).f32Const(2 ** 24).f32Mul().f32Nearest().f32Const(2 ** -24).f32Mul().set(d),
        () => {
          f.get(d).i32ReinterpretF32().tee(bits).i32Const(13).i32ShrU().i32Const(1).i32And().get(bits).i32Add().i32Const(0xfff).i32Add().i32Const(-0x2000).i32And().f32ReinterpretI32().set(d);
          f.get(d).f32Const(65504).f32Gt().if(() => void f.f32Const(Infinity).set(d));
        },
      );
      f.get(sd).get(d).f32Store();
      f.get(amax).f32Const(0).f32Gt().if(
        () => void f.f32Const(127).get(amax).f32Div().f32x4Splat().set(inv),
        () => void f.v128ConstF32(0).set(inv),
      );
      for (let h = 0; h < 4; h++) {
        f.get(qd);
        f.get(x[2 * h]!).get(inv).f32x4Mul().f32x4Nearest().i32x4TruncSatF32x4S();
        f.get(x[2 * h + 1]!).get(inv).f32x4Mul().f32x4Nearest().i32x4TruncSatF32x4S();
        f.i16x8NarrowI32x4S().v128Store(16 * h);
      }
      f.get(sd).i32Const(4).i32Add().set(sd);
      f.get(qd).i32Const(64).i32Add().set(qd);
      f.get(p).i32Const(128).i32Add().tee(p).get(end).i32LtU().brIf(0);
    });
    f.get(m).i32Const(1).i32Add().tee(m).get(M).i32LtU().brIf(0);
  });
  return f;
}

/**
 * acc[i] += f32(iacc[i]) · (d · xd_i): an int8-activation super-block's integer sums converted once
 * (dd: the weights' d; xd: the byte pointer to row 0's activation scale, rows LDX apart).
 */
function iaccInto(c: RowsCtx, iacc: number[], dd: number, xd: number, tmp: number, cv: number): void {
  const { f } = c;
  for (let i = 0; i < c.a; i++) {
    f.get(dd);
    (i === 0 ? f.get(xd) : f.get(xd).get(c.LDX).i32Const(i).i32Mul().i32Add()).f32Load(0);
    f.f32Mul().f32x4Splat().set(tmp);
    f.get(iacc[i]!).f32x4ConvertI32x4S().set(cv);
    c.madd(c.acc[i]!, tmp, cv);
  }
}

/**
 * q4kirows_a(px, ldx, wq, wm, py, ldy, N, K, acc, xs): a rows of int8-activation X (px: the first
 * row's quants, ldx: q8actRowBytes(K)) against all N rows of a Q4_K matrix; xs: the first row's area.
 * Per 32 weights of sub-block j the integer Σ q·qx is weighted by sc_j in i32:
 *  - i16 quants (q4kirows): the nibbles widened to i16, two i32x4.dot_i16x8_s per 16, then × sc_j;
 *  - relaxed (q4krrows, KernelOptions.relaxedDot; px then points at the i8 quants): two
 *    i16x8.relaxed_dot_i8x16_i7x16_s of the i8 activations with the nibbles (0..15, or 0..31 with
 *    Q5_K's fifth bit: within i7) give 8 i16 pair sums (|Σ| <= 2·2·127·31 < 2^15), and one
 *    i32x4.dot_i16x8_s with sc_j splat widens and weights them. Each super-block's integer total is
 *    the same; it is spread over the lanes differently, so the f32 accumulation may round
 *    differently: the same dot of dequantized values either way.
 */
/**
 * Sub-blocks of 32 per loop step of the int8-activation Q4_K/Q5_K rows: two. Measured against four
 * (2026-12-07, in-process A/B, 1 thread): as fast at decode (one activation row per pass;
 * 32.8-32.9 G weights/s either way), and with two rows per pass (prefill, 2048×8192 at M = 32) 38
 * instead of 31 G products/s, where four sub-blocks' loads spilled; eight spilled at decode too.
 * Fixed: the relaxed rows load each step's two scales (pairLanes16(0) of eight bytes).
 */
const Q4K_STEP = 2;
const emitQ4KIRows = (mb: ModuleBuilder, o: KernelOptions, a: number, five = false, relaxed = false): Fn =>
  emitRows(mb, o, `${five ? "q5k" : "q4k"}${relaxed ? "r" : "i"}rows`, a, 1, (c) => {
    const { f } = c;
    const XS = c.extra[0]!;
    const xs = f.local(I32), xd = f.local(I32), q = f.local(I32), mt = f.local(I32);
    const iacc = Array.from({ length: c.a }, () => f.local(V128));
    const sub = Array.from({ length: c.a }, () => f.local(V128));
    const v = [f.local(V128), f.local(V128)], u = [f.local(V128), f.local(V128)];
    const lo = f.local(V128), scv = f.local(V128), tmp = f.local(V128), scs = f.local(V128), mlo = f.local(V128), mhi = f.local(V128);
    const dd = f.local(F32), dmin = f.local(F32);
    const qh = [f.local(V128), f.local(V128)];
    // One loop step per Q4K_STEP sub-blocks (see Q8I_BLOCKS): its own pointers into W, X and the scales.
    const qq = f.local(I32), mq = f.local(I32), step = f.local(I32);
    const xq = Array.from({ length: c.a }, () => f.local(I32));
    const rowOff = (i: number, base: number) => (i === 0 ? f.get(base) : f.get(base).get(c.LDX).i32Const(i).i32Mul().i32Add());
    /** iacc += sc_j · Σ q·qx over sub-block j, whose two 16-nibble halves are u[0], u[1]. */
    const subBlock = (j: number) => {
      if (relaxed) {
        f.get(scs).get(scs).splatLane32(j).set(scv);
        for (let i = 0; i < c.a; i++) {
          f.get(xq[i]!).v128Load(32 * j).get(u[0]!).i16x8RelaxedDotI8x16I7x16S();
          f.get(xq[i]!).v128Load(32 * j + 16).get(u[1]!).i16x8RelaxedDotI8x16I7x16S().i16x8Add();
          f.get(scv).i32x4DotI16x8S().get(iacc[i]!).i32x4Add().set(iacc[i]!);
        }
        return;
      }
      for (let vi = 0; vi < 2; vi++) {
        const hi = u[vi]!;
        f.get(hi).i16x8ExtendLowI8x16U().set(lo);
        f.get(hi).i16x8ExtendHighI8x16U().set(hi);
        const off = 2 * (32 * j + 16 * vi);
        for (let i = 0; i < c.a; i++) {
          f.get(lo).get(xq[i]!).v128Load(off).i32x4DotI16x8S();
          f.get(hi).get(xq[i]!).v128Load(off + 16).i32x4DotI16x8S().i32x4Add();
          if (vi === 0) f.set(sub[i]!);
          else f.get(sub[i]!).i32x4Add().set(sub[i]!);
        }
      }
      f.get(mq).i32Load8U(8 + j).i32x4Splat().set(scv);
      for (let i = 0; i < c.a; i++) f.get(iacc[i]!).get(sub[i]!).get(scv).i32x4Mul().i32x4Add().set(iacc[i]!);
    };
    return {
      shift: 8,
      xBytes: relaxed ? 1 : 2,
      init: () => pointers(f, q, c.WQ, mt, c.WS),
      rowStart: () => {
        f.get(XS).i32Const(0).i32Add().set(xs);
        f.get(XS).get(c.K).i32Const(3).i32ShrU().i32Add().set(xd);
      },
      block: () => {
        f.get(mt).f32Load(0).set(dd);
        f.get(mt).f32Load(4).set(dmin);
        for (let i = 0; i < c.a; i++) f.v128ConstI32(0).set(iacc[i]!);
        if (five) for (let h = 0; h < 2; h++) f.get(q).v128Load(128 + 16 * h).set(qh[h]!);
        f.get(q).i32Const(0).i32Add().set(qq);
        f.get(mt).i32Const(0).i32Add().set(mq);
        for (let i = 0; i < c.a; i++) f.get(c.xp[i]!).i32Const(0).i32Add().set(xq[i]!);
        f.i32Const(8 / Q4K_STEP).set(step);
        f.loop(() => {
          // This step's 6-bit scales, each as an i16 pair in scs, splat by a one-instruction 32-bit
          // shuffle where its sub-block needs it (eight bytes from the step's first scale stay
          // within the block's 24: its mins follow).
          if (relaxed) f.get(mq).v128Load8x8U(8).tee(tmp).get(tmp).pairLanes16(0).set(scs);
          // Sub-blocks j = 0..Q4K_STEP−1 of this step (pairs sharing 32 bytes of nibbles).
          for (let ch = 0; ch < Q4K_STEP / 2; ch++) {
            f.get(qq).v128Load(32 * ch).set(v[0]!);
            f.get(qq).v128Load(32 * ch + 16).set(v[1]!);
            for (const high of [false, true]) {
              const j = 2 * ch + (high ? 1 : 0);
              for (let vi = 0; vi < 2; vi++) {
                nibbles(f, v[vi]!, high);
                if (five) fifthBit(f, qh[vi]!, j);
                f.set(u[vi]!);
              }
              subBlock(j);
            }
          }
          f.get(qq).i32Const(16 * Q4K_STEP).i32Add().set(qq);
          f.get(mq).i32Const(Q4K_STEP).i32Add().set(mq);
          for (let i = 0; i < c.a; i++) f.get(xq[i]!).i32Const((relaxed ? 32 : 64) * Q4K_STEP).i32Add().set(xq[i]!);
          // The next step's fifth bits at bit 0..
          if (five) for (let h = 0; h < 2; h++) f.get(qh[h]!).i32Const(Q4K_STEP).i16x8ShrU().set(qh[h]!);
          f.get(step).i32Const(1).i32Sub().tee(step).brIf(0);
        });
        // acc += f32(iacc) · (d · xd): one conversion per super-block.
        iaccInto(c, iacc, dd, xd, tmp, scv);
        // acc −= dmin · Σ_j m_j · xd·Σ qx_j, once per super-block.
        minsInto(c, mt, dmin, (i) => void rowOff(i, xs), { mlo, mhi, s: lo, t: tmp, neg: scv });
        f.get(q).i32Const(five ? 160 : 128).i32Add().set(q);
        f.get(mt).i32Const(24).i32Add().set(mt);
        f.get(xs).i32Const(32).i32Add().set(xs);
        f.get(xd).i32Const(4).i32Add().set(xd);
      },
    };
  });

/**
 * q8irows_a(px, ldx, wq, ws, py, ldy, N, K, acc, xs): the int8-activation rows of a Q8_0 matrix
 * (K % 256 == 0; X quantized by q8act32, xs: its scales): per 32 weights Σ qw·qx by
 * i32x4.dot_i16x8_s, converted and scaled by d_w·d_x (both per 32, as llama.cpp's q8_0·q8_0 dot).
 * Q8I_BLOCKS blocks of 32 per loop step: V8 loads every operand of a step at its top, so a whole
 * super-block per step (the first version) spilled most of them to the stack.
 */
const Q8I_BLOCKS = 2 as const; // two scales per step: one 64-bit load each (below)
const emitQ8IRows = (mb: ModuleBuilder, o: KernelOptions, a: number): Fn =>
  emitRows(mb, o, "q8irows", a, 1, (c) => {
    const { f } = c;
    const XS = c.extra[0]!;
    const xd = f.local(I32), q = f.local(I32), s = f.local(I32);
    const w = Array.from({ length: 4 }, () => f.local(V128));
    const sub = Array.from({ length: c.a }, () => f.local(V128));
    const sc = Array.from({ length: c.a }, () => f.local(V128));
    const v = f.local(V128), tmp = f.local(V128), cv = f.local(V128);
    const rowOff = (i: number, base: number) => (i === 0 ? f.get(base) : f.get(base).get(c.LDX).i32Const(i).i32Mul().i32Add());
    return {
      shift: 5 + Math.log2(Q8I_BLOCKS),
      xBytes: 2,
      init: () => pointers(f, q, c.WQ, s, c.WS),
      rowStart: () => void f.get(XS).set(xd),
      block: () => {
        // The step's two weight scales times each row's two activation scales, by one multiply:
        // a scalar load and multiply per block and row ran 9% slower than the per-256 scale did
        // from a register (in-process A/B, 1 thread, 8192×2048).
        for (let i = 0; i < c.a; i++) {
          f.get(s).v128Load64Zero();
          rowOff(i, xd).v128Load64Zero();
          f.f32x4Mul().set(sc[i]!);
        }
        for (let b = 0; b < Q8I_BLOCKS; b++) {
          f.get(q).v128Load(32 * b).set(v);
          f.get(v).i16x8ExtendLowI8x16S().set(w[0]!);
          f.get(v).i16x8ExtendHighI8x16S().set(w[1]!);
          f.get(q).v128Load(32 * b + 16).set(v);
          f.get(v).i16x8ExtendLowI8x16S().set(w[2]!);
          f.get(v).i16x8ExtendHighI8x16S().set(w[3]!);
          for (let i = 0; i < c.a; i++) {
            for (let k = 0; k < 4; k++) {
              f.get(w[k]!).get(c.xp[i]!).v128Load(2 * (32 * b + 8 * k)).i32x4DotI16x8S();
              if (k > 0) f.i32x4Add();
            }
            f.set(sub[i]!);
          }
          // acc += f32(Σ) · (d_w · d_x), the step's products of scales in lanes 0..1 of sc.
          for (let i = 0; i < c.a; i++) {
            f.get(sc[i]!).get(sc[i]!).shuffle32(b, b, b, b).set(tmp);
            f.get(sub[i]!).f32x4ConvertI32x4S().set(cv);
            c.madd(c.acc[i]!, tmp, cv);
          }
        }
        f.get(q).i32Const(32 * Q8I_BLOCKS).i32Add().set(q);
        f.get(s).i32Const(4 * Q8I_BLOCKS).i32Add().set(s);
        f.get(xd).i32Const(4 * Q8I_BLOCKS).i32Add().set(xd);
      },
    };
  });

/** q4kdeq(wq, wm, rows, K, dst): rows of a Q4_K matrix as f32, exactly as ggml's dequantize_row_q4_K (q5kdeq: Q5_K, five). */
const emitQ4KDeq = (mb: ModuleBuilder, five = false): Fn =>
  emitDeq(mb, five ? "q5kdeq" : "q4kdeq", 8, (f, P) => {
    const q = f.local(I32), mt = f.local(I32);
    const qh = [f.local(V128), f.local(V128)];
    const v0 = f.local(V128), v1 = f.local(V128), u = f.local(V128), w16 = f.local(V128), s = f.local(V128), m = f.local(V128);
    const dd = f.local(F32), dmin = f.local(F32);
    return {
      init: () => pointers(f, q, P.WQ, mt, P.WS),
      block: (p) => {
        f.get(mt).f32Load(0).set(dd);
        f.get(mt).f32Load(4).set(dmin);
        if (five) for (let h = 0; h < 2; h++) f.get(q).v128Load(128 + 16 * h).set(qh[h]!);
        for (let ch = 0; ch < 4; ch++) {
          f.get(q).v128Load(32 * ch).set(v0);
          f.get(q).v128Load(32 * ch + 16).set(v1);
          for (const hi of [false, true]) {
            const j = 2 * ch + (hi ? 1 : 0);
            f.get(dd).get(mt).i32Load8U(8 + j).f32ConvertI32U().f32Mul().f32x4Splat().set(s);
            f.get(dmin).get(mt).i32Load8U(16 + j).f32ConvertI32U().f32Mul().f32x4Splat().set(m);
            for (const [vi, v] of [v0, v1].entries()) {
              nibbles(f, v, hi);
              if (five) fifthBit(f, qh[vi]!, j);
              f.set(u);
              store16(f, u, w16, false, p, 4 * (32 * j + 16 * vi), s, m);
            }
          }
        }
        f.get(q).i32Const(five ? 160 : 128).i32Add().set(q);
        f.get(mt).i32Const(24).i32Add().set(mt);
      },
    };
  });

// Q6_K (llama.cpp's 6-bit K-quant; Q4_K_M files use it for the output/embedding and some
// matrices): super-blocks of 256 = 16 groups of 16, value = d·sc_g·(q − 32) with q six bits
// (in the file: low 4 in ql, high 2 in qh, interleaved across the super-block), sc_g int8.
// W [N, K] (K % 256 == 0) is held as
//   wq: 192 bytes per super-block, four steps of 64 consecutive weights (groups 4s..4s+3), 48
//       bytes each: with q0..q3 the codes of lane i of the step's groups, three bytes
//         A = q0 | (q3 & 3) << 6 at 48s + i, B = q1 | (q3 >> 2 & 3) << 6 at 48s + 16 + i,
//         C = q2 | (q3 >> 4) << 6 at 48s + 32 + i
//       (repackQ6_K: the file's ql/qh bits rearranged, same size)
//   ws: per super-block d (f32) and the 16 scales (int8, group order): 20 bytes
// i.e. 0.83 bytes per weight (the file's 0.82). Why not the file's ql/qh: rebuilding q from them
// takes 17 vector operations per 64 weights (shifts, masks and ors for every code), these 11 (a
// mask for q0..q2, three masked shifts and two ors for q3), and the int8 rows are instruction-
// bound; and a step of consecutive weights is one uniform loop step (X, scales and W advance by
// fixed strides), so a loop need not hold a whole super-block's operands in 16 registers.

/** Pushes the four 6-bit quant vectors (minus 32 unless c32 is null, as i8) of one 16-lane step (see above) and calls use(k, v) for each. */
function q6Quants(f: Fn, A: number, B: number, C: number, m3f: number, mc0: number, c32: number | null, u: number, use: (k: number) => void): void {
  const done = (k: number) => {
    // c32 null: the 6-bit codes 0..63 (the relaxed rows subtract 32·Σ qx per super-block instead).
    if (c32 !== null) f.get(c32).i8x16Sub();
    f.set(u);
    use(k);
  };
  [A, B, C].forEach((v, k) => {
    f.get(v).get(m3f).v128And();
    done(k);
  });
  // q4: the top two bits of A, B and C moved to bits 0-1, 2-3 and 4-5. Masked first, so the 16-bit
  // shifts (x64 has no byte shift) carry nothing into the neighbouring byte.
  [A, B, C].forEach((v, i) => {
    f.get(v).get(mc0).v128And().i32Const(6 - 2 * i).i16x8ShrU();
    if (i > 0) f.v128Or();
  });
  done(3);
}

/** The Q6_K constants' locals (0x3f, 0xc0 and 32 per byte); set() emits their values. */
function q6Constants(f: Fn): { m3f: number; mc0: number; c32: number; set(): void } {
  const m3f = f.local(V128), mc0 = f.local(V128), c32 = f.local(V128);
  return {
    m3f,
    mc0,
    c32,
    set: () => {
      f.v128ConstI32(0x3f3f3f3f).set(m3f);
      f.v128ConstI32(0xc0c0c0c0 | 0).set(mc0);
      f.v128ConstI32(0x20202020).set(c32);
    },
  };
}

/** Loads the A, B and C vectors (see above) of step s (64 weights) of the super-block at q. */
function q6Load(f: Fn, q: number, s: number, A: number, B: number, C: number): void {
  f.get(q).v128Load(48 * s).set(A);
  f.get(q).v128Load(48 * s + 16).set(B);
  f.get(q).v128Load(48 * s + 32).set(C);
}

// The Q6_K rows (float and relaxed int8) loop over the four steps of 64 weights, one per loop
// iteration. Measured against two per iteration (1 thread, in-process A/B, several processes since
// code placement moves a build by ±20%): float rows 5.2-6.9 G weights/s vs 3.4-5.2; relaxed int8
// rows 23.5-24.2 vs 22.7-23.3.

/** q6krows_a(px, ldx, wq, ws, py, ldy, N, K, acc): a rows of X against all N rows of a Q6_K matrix. */
const emitQ6KRows = (mb: ModuleBuilder, o: KernelOptions, a: number): Fn =>
  emitRows(mb, o, "q6krows", a, 0, (c) => {
    const { f } = c;
    const q = f.local(I32), mt = f.local(I32);
    // Two accumulator chains per row (even and odd f32x4 of each 16 weights), as in q4krows.
    const l: Chains = { w16: f.local(V128), wf: f.local(V128), xv: f.local(V128), tA: Array.from({ length: c.a }, () => f.local(V128)), tB: Array.from({ length: c.a }, () => f.local(V128)) };
    const A = f.local(V128), B = f.local(V128), C = f.local(V128), u = f.local(V128), tmp = f.local(V128);
    const k6 = q6Constants(f);
    const dd = f.local(F32);
    // One loop iteration per step of 64 weights: its own pointers into W, X and the scales.
    const qq = f.local(I32), mq = f.local(I32), step = f.local(I32);
    const xq = Array.from({ length: c.a }, () => f.local(I32));
    return {
      shift: 8,
      init: () => {
        k6.set();
        pointers(f, q, c.WQ, mt, c.WS);
      },
      block: () => {
        f.get(mt).f32Load(0).set(dd);
        f.get(q).i32Const(0).i32Add().set(qq);
        f.get(mt).i32Const(0).i32Add().set(mq);
        for (let i = 0; i < c.a; i++) f.get(c.xp[i]!).i32Const(0).i32Add().set(xq[i]!);
        f.i32Const(4).set(step);
        f.loop(() => {
          q6Load(f, qq, 0, A, B, C);
          q6Quants(f, A, B, C, k6.m3f, k6.mc0, k6.c32, u, (k) => {
            dot16x2(c, xq, u, true, l, 4 * 16 * k, true);
            // acc += (tA + tB) · (d · sc[group])
            f.get(dd).get(mq).i32Load8S(4 + k).f32ConvertI32S().f32Mul();
            scaleChainsInto(c, l, tmp);
          });
          f.get(qq).i32Const(48).i32Add().set(qq);
          f.get(mq).i32Const(4).i32Add().set(mq);
          for (let i = 0; i < c.a; i++) f.get(xq[i]!).i32Const(256).i32Add().set(xq[i]!);
          f.get(step).i32Const(1).i32Sub().tee(step).brIf(0);
        });
        f.get(q).i32Const(192).i32Add().set(q);
        f.get(mt).i32Const(20).i32Add().set(mt);
      },
    };
  });

/**
 * q6kirows_a(px, ldx, wq, ws, py, ldy, N, K, acc, xs): the int8-activation rows of a Q6_K matrix
 * (layout as q4kirows; no min term): per 16 weights Σ (q − 32)·qx by i32x4.dot_i16x8_s, weighted by
 * the int8 scale in i32, each super-block converted once and scaled by d·xd.
 */
const emitQ6KIRows = (mb: ModuleBuilder, o: KernelOptions, a: number): Fn =>
  emitRows(mb, o, "q6kirows", a, 1, (c) => {
    const { f } = c;
    const XS = c.extra[0]!;
    const xd = f.local(I32), q = f.local(I32), mt = f.local(I32);
    const iacc = Array.from({ length: c.a }, () => f.local(V128));
    const A = f.local(V128), B = f.local(V128), C = f.local(V128), u = f.local(V128), lo = f.local(V128), scv = f.local(V128), tmp = f.local(V128);
    const k6 = q6Constants(f);
    const dd = f.local(F32);
    return {
      shift: 8,
      xBytes: 2,
      init: () => {
        k6.set();
        pointers(f, q, c.WQ, mt, c.WS);
      },
      rowStart: () => void f.get(XS).get(c.K).i32Const(3).i32ShrU().i32Add().set(xd),
      block: () => {
        f.get(mt).f32Load(0).set(dd);
        for (let i = 0; i < c.a; i++) f.v128ConstI32(0).set(iacc[i]!);
        for (let st = 0; st < 4; st++) {
          q6Load(f, q, st, A, B, C);
          q6Quants(f, A, B, C, k6.m3f, k6.mc0, k6.c32, u, (k) => {
            f.get(u).i16x8ExtendLowI8x16S().set(lo);
            f.get(u).i16x8ExtendHighI8x16S().set(u);
            f.get(mt).i32Load8S(4 + 4 * st + k).i32x4Splat().set(scv);
            const off = 2 * (64 * st + 16 * k);
            for (let i = 0; i < c.a; i++) {
              f.get(lo).get(c.xp[i]!).v128Load(off).i32x4DotI16x8S();
              f.get(u).get(c.xp[i]!).v128Load(off + 16).i32x4DotI16x8S().i32x4Add();
              f.get(scv).i32x4Mul().get(iacc[i]!).i32x4Add().set(iacc[i]!);
            }
          });
        }
        iaccInto(c, iacc, dd, xd, tmp, scv);
        f.get(q).i32Const(192).i32Add().set(q);
        f.get(mt).i32Const(20).i32Add().set(mt);
        f.get(xd).i32Const(4).i32Add().set(xd);
      },
    };
  });

/** q6kdeq(wq, ws, rows, K, dst): rows of a Q6_K matrix as f32, exactly as ggml's dequantize_row_q6_K. */
const emitQ6KDeq = (mb: ModuleBuilder): Fn =>
  emitDeq(mb, "q6kdeq", 8, (f, P) => {
    const q = f.local(I32), mt = f.local(I32);
    const A = f.local(V128), B = f.local(V128), C = f.local(V128), u = f.local(V128), w16 = f.local(V128), s = f.local(V128);
    const k6 = q6Constants(f);
    const dd = f.local(F32);
    return {
      init: () => {
        k6.set();
        pointers(f, q, P.WQ, mt, P.WS);
      },
      block: (p) => {
        f.get(mt).f32Load(0).set(dd);
        for (let st = 0; st < 4; st++) {
          q6Load(f, q, st, A, B, C);
          q6Quants(f, A, B, C, k6.m3f, k6.mc0, k6.c32, u, (k) => {
            f.get(dd).get(mt).i32Load8S(4 + 4 * st + k).f32ConvertI32S().f32Mul().f32x4Splat().set(s);
            store16(f, u, w16, true, p, 4 * (64 * st + 16 * k), s);
          });
        }
        f.get(q).i32Const(192).i32Add().set(q);
        f.get(mt).i32Const(20).i32Add().set(mt);
      },
    };
  });

// Q4_0 (blocks of 32: an f16 d and 16 bytes of nibbles, low nibbles the first 16 weights, high the
// last 16; value = d·(q − 8)). Held as wq: the nibbles, 16 bytes per block back to back; ws: d as
// f32 per block: 0.625 bytes per weight (the file's 0.5625).

/** Pushes block b's 32 quants minus 8 as two i8 vectors' worth of work: use(h) after u holds half h (0: low nibbles). */
function q4Quants(f: Fn, v: number, m0f: number, c8: number, u: number, use: (h: number) => void): void {
  for (let h = 0; h < 2; h++) {
    f.get(v);
    if (h === 1) f.i32Const(4).i16x8ShrU();
    f.get(m0f).v128And().get(c8).i8x16Sub().set(u);
    use(h);
  }
}

/** q40rows_a(px, ldx, wq, ws, py, ldy, N, K, acc): a rows of X against all N rows of a Q4_0 matrix. */
const emitQ40Rows = (mb: ModuleBuilder, o: KernelOptions, a: number): Fn =>
  emitRows(mb, o, "q40rows", a, 0, (c) => {
    const { f } = c;
    const q = f.local(I32), s = f.local(I32);
    const t = Array.from({ length: c.a }, () => f.local(V128));
    const l = { w16: f.local(V128), wf: f.local(V128), xv: f.local(V128), t };
    const v = f.local(V128), u = f.local(V128), tmp = f.local(V128), m0f = f.local(V128), c8 = f.local(V128);
    return {
      shift: 5,
      init: () => {
        f.v128ConstI32(0x0f0f0f0f).set(m0f);
        f.v128ConstI32(0x08080808).set(c8);
        pointers(f, q, c.WQ, s, c.WS);
      },
      block: () => {
        f.get(q).v128Load().set(v);
        const first = { on: true };
        q4Quants(f, v, m0f, c8, u, (h) => dot16(c, u, true, l, 64 * h, first));
        f.get(s).f32Load();
        scaleInto(c, t, tmp);
        f.get(q).i32Const(16).i32Add().set(q);
        f.get(s).i32Const(4).i32Add().set(s);
      },
    };
  });

/** q40deq(wq, ws, rows, K, dst): rows of a Q4_0 matrix as f32, exactly as ggml's dequantize_row_q4_0. */
const emitQ40Deq = (mb: ModuleBuilder): Fn =>
  emitDeq(mb, "q40deq", 5, (f, P) => {
    const q = f.local(I32), s = f.local(I32);
    const v = f.local(V128), u = f.local(V128), w16 = f.local(V128), d = f.local(V128), m0f = f.local(V128), c8 = f.local(V128);
    return {
      init: () => {
        f.v128ConstI32(0x0f0f0f0f).set(m0f);
        f.v128ConstI32(0x08080808).set(c8);
        pointers(f, q, P.WQ, s, P.WS);
      },
      block: (p) => {
        f.get(s).f32Load().f32x4Splat().set(d);
        f.get(q).v128Load().set(v);
        q4Quants(f, v, m0f, c8, u, (h) => store16(f, u, w16, true, p, 64 * h, d));
        f.get(q).i32Const(16).i32Add().set(q);
        f.get(s).i32Const(4).i32Add().set(s);
      },
    };
  });

// BF16 (Hugging Face checkpoints' usual dtype): W [N, K] (K % 8 == 0) as the file's 2-byte values,
// row after row. A bf16 is the top half of an f32, so widening is exact: u16 → u32, shift left 16.

/** bf16rows_a(px, ldx, wq, ws, py, ldy, N, K, acc): a rows of X against all N rows of a BF16 matrix (ws unused). */
const emitBf16Rows = (mb: ModuleBuilder, o: KernelOptions, a: number): Fn =>
  emitRows(mb, o, "bf16rows", a, 0, (c) => {
    const { f } = c;
    const q = f.local(I32);
    // A second accumulator per row (lanes 4..7 of each 8): two independent chains.
    const acc2 = Array.from({ length: c.a }, () => f.local(V128));
    const wv = f.local(V128), wf = f.local(V128), xv = f.local(V128);
    return {
      shift: 3,
      init: () => void f.get(c.WQ).i32Const(0).i32Add().set(q),
      rowStart: () => {
        for (let i = 0; i < c.a; i++) f.v128ConstF32(0).set(acc2[i]!);
      },
      block: () => {
        f.get(q).v128Load().set(wv);
        for (let half = 0; half < 2; half++) {
          f.get(wv);
          if (half === 0) f.i32x4ExtendLowI16x8U();
          else f.i32x4ExtendHighI16x8U();
          f.i32Const(16).i32x4Shl().set(wf);
          for (let i = 0; i < c.a; i++) {
            f.get(c.xp[i]!).v128Load(16 * half).set(xv);
            c.madd(half === 0 ? c.acc[i]! : acc2[i]!, xv, wf);
          }
        }
        f.get(q).i32Const(16).i32Add().set(q);
      },
      beforeStore: (i) => void f.get(c.acc[i]!).get(acc2[i]!).f32x4Add().set(c.acc[i]!),
    };
  });

/** bf16deq(wq, ws, rows, K, dst): rows of a BF16 matrix as f32 (exact). */
const emitBf16Deq = (mb: ModuleBuilder): Fn =>
  emitDeq(mb, "bf16deq", 3, (f, P) => {
    const q = f.local(I32), wv = f.local(V128);
    return {
      init: () => void f.get(P.WQ).i32Const(0).i32Add().set(q),
      block: (p) => {
        f.get(q).v128Load().set(wv);
        f.get(p).get(wv).i32x4ExtendLowI16x8U().i32Const(16).i32x4Shl().v128Store(0);
        f.get(p).get(wv).i32x4ExtendHighI16x8U().i32Const(16).i32x4Shl().v128Store(16);
        f.get(q).i32Const(16).i32Add().set(q);
      },
    };
  });

// F16 (GGUF F16 files, fp16 safetensors): W [N, K] (K % 8 == 0) as the file's 2-byte values. An f16
// h widens exactly as f32: bits (h & 0x7fff) << 13 read as an f32 and multiplied by 2^112 (the
// exponent bias difference; f16 subnormals land on f32 subnormals, which Wasm keeps), then the
// sign bit (h & 0x8000) << 16. Infinities and NaN do not survive this; the loader refuses them.

/** Pushes the 4 f32 values of f16 lanes 4k..4k+3 of `wv` (k = 0 low half, 1 high half). */
function f16Widen(f: Fn, wv: number, half: number, m: { mag: number; sign: number; scale: number }): void {
  const u = () => {
    f.get(wv);
    if (half === 0) f.i32x4ExtendLowI16x8U();
    else f.i32x4ExtendHighI16x8U();
  };
  u();
  f.get(m.mag).v128And().i32Const(13).i32x4Shl().get(m.scale).f32x4Mul();
  u();
  f.get(m.sign).v128And().i32Const(16).i32x4Shl().v128Or();
}

function f16Constants(f: Fn): { mag: number; sign: number; scale: number; set(): void } {
  const mag = f.local(V128), sign = f.local(V128), scale = f.local(V128);
  return {
    mag,
    sign,
    scale,
    set: () => {
      f.v128ConstI32(0x7fff).set(mag);
      f.v128ConstI32(0x8000).set(sign);
      f.v128ConstI32(0x77800000).set(scale); // 2^112 as f32 bits
    },
  };
}

/** f16rows_a(px, ldx, wq, ws, py, ldy, N, K, acc): a rows of X against all N rows of an F16 matrix (ws unused). */
const emitF16Rows = (mb: ModuleBuilder, o: KernelOptions, a: number): Fn =>
  emitRows(mb, o, "f16rows", a, 0, (c) => {
    const { f } = c;
    const q = f.local(I32);
    const acc2 = Array.from({ length: c.a }, () => f.local(V128));
    const wv = f.local(V128), wf = f.local(V128), xv = f.local(V128);
    const k = f16Constants(f);
    return {
      shift: 3,
      init: () => {
        k.set();
        f.get(c.WQ).i32Const(0).i32Add().set(q);
      },
      rowStart: () => {
        for (let i = 0; i < c.a; i++) f.v128ConstF32(0).set(acc2[i]!);
      },
      block: () => {
        f.get(q).v128Load().set(wv);
        for (let half = 0; half < 2; half++) {
          f16Widen(f, wv, half, k);
          f.set(wf);
          for (let i = 0; i < c.a; i++) {
            f.get(c.xp[i]!).v128Load(16 * half).set(xv);
            c.madd(half === 0 ? c.acc[i]! : acc2[i]!, xv, wf);
          }
        }
        f.get(q).i32Const(16).i32Add().set(q);
      },
      beforeStore: (i) => void f.get(c.acc[i]!).get(acc2[i]!).f32x4Add().set(c.acc[i]!),
    };
  });

/** f16deq(wq, ws, rows, K, dst): rows of an F16 matrix as f32 (exact). */
const emitF16Deq = (mb: ModuleBuilder): Fn =>
  emitDeq(mb, "f16deq", 3, (f, P) => {
    const q = f.local(I32), wv = f.local(V128);
    const k = f16Constants(f);
    return {
      init: () => {
        k.set();
        f.get(P.WQ).i32Const(0).i32Add().set(q);
      },
      block: (p) => {
        f.get(q).v128Load().set(wv);
        for (let half = 0; half < 2; half++) {
          f.get(p);
          f16Widen(f, wv, half, k);
          f.v128Store(16 * half);
        }
        f.get(q).i32Const(16).i32Add().set(q);
      },
    };
  });

/**
 * q6krrows_a: q6kirows with i16x8.relaxed_dot_i8x16_i7x16_s (KernelOptions.relaxedDot). The
 * relaxed dot needs one operand in 0..127, so the codes stay uncentred: per 16 weights one relaxed
 * dot of the i8 activations with the codes 0..63 (pair sums <= 2·127·63 < 2^15), widened and weighted
 * by the int8 scale in one i32x4.dot_i16x8_s; per super-block 32·Σ_j sc_j·Σ qx_j (the activations'
 * sums per 16, xs's last area) is subtracted. Integer sums equal to q6kirows's.
 */
const emitQ6KRRows = (mb: ModuleBuilder, o: KernelOptions, a: number): Fn =>
  emitRows(mb, o, "q6krrows", a, 1, (c) => {
    const { f } = c;
    const XS = c.extra[0]!;
    const xd = f.local(I32), bsp = f.local(I32), q = f.local(I32), mt = f.local(I32);
    const iacc = Array.from({ length: c.a }, () => f.local(V128));
    const A = f.local(V128), B = f.local(V128), C = f.local(V128), u = f.local(V128), scv = f.local(V128), tmp = f.local(V128), sp = f.local(V128);
    const k6 = q6Constants(f);
    const dd = f.local(F32);
    // One loop iteration per step of 64 weights: its own pointers into W, X and the scales.
    const qq = f.local(I32), mq = f.local(I32), step = f.local(I32);
    const xq = Array.from({ length: c.a }, () => f.local(I32));
    const rowOff = (i: number, base: number) => (i === 0 ? f.get(base) : f.get(base).get(c.LDX).i32Const(i).i32Mul().i32Add());
    return {
      shift: 8,
      xBytes: 1,
      init: () => {
        k6.set();
        pointers(f, q, c.WQ, mt, c.WS);
      },
      rowStart: () => {
        f.get(XS).get(c.K).i32Const(3).i32ShrU().i32Add().set(xd);
        // The sums per 16: after the xsums (K/8), scales (K/64) and quants (3K bytes).
        f.get(xd).get(c.K).i32Const(6).i32ShrU().i32Add().get(c.K).i32Const(3).i32Mul().i32Add().set(bsp);
      },
      block: () => {
        f.get(mt).f32Load(0).set(dd);
        for (let i = 0; i < c.a; i++) f.v128ConstI32(0).set(iacc[i]!);
        f.get(q).i32Const(0).i32Add().set(qq);
        f.get(mt).i32Const(0).i32Add().set(mq);
        for (let i = 0; i < c.a; i++) f.get(c.xp[i]!).i32Const(0).i32Add().set(xq[i]!);
        f.i32Const(4).set(step);
        f.loop(() => {
          // This step's four int8 scales as i16 pairs, each splat where its group needs it by a
          // one-instruction 32-bit shuffle (four bytes: eight would read past the last super-block's scales).
          f.get(mq).v128Load32Zero(4).i16x8ExtendLowI8x16S().tee(sp).get(sp).pairLanes16(0).set(sp);
          q6Load(f, qq, 0, A, B, C);
          q6Quants(f, A, B, C, k6.m3f, k6.mc0, null, u, (k) => {
            f.get(sp).get(sp).splatLane32(k).set(scv);
            for (let i = 0; i < c.a; i++) {
              f.get(xq[i]!).v128Load(16 * k).get(u).i16x8RelaxedDotI8x16I7x16S();
              f.get(scv).i32x4DotI16x8S().get(iacc[i]!).i32x4Add().set(iacc[i]!);
            }
          });
          f.get(qq).i32Const(48).i32Add().set(qq);
          f.get(mq).i32Const(4).i32Add().set(mq);
          for (let i = 0; i < c.a; i++) f.get(xq[i]!).i32Const(64).i32Add().set(xq[i]!);
          f.get(step).i32Const(1).i32Sub().tee(step).brIf(0);
        });
        // iacc −= 32 · Σ_g sc_g · Σ qx_g (g: the 16 groups of 16, scales as i16, sums as i16).
        f.get(mt).v128Load8x8S(4).set(A);
        f.get(mt).v128Load8x8S(12).set(B);
        for (let i = 0; i < c.a; i++) {
          f.get(iacc[i]!);
          rowOff(i, bsp).v128Load(0).get(A).i32x4DotI16x8S();
          rowOff(i, bsp).v128Load(16).get(B).i32x4DotI16x8S().i32x4Add();
          f.i32Const(5).i32x4Shl().i32x4Sub().set(iacc[i]!);
        }
        iaccInto(c, iacc, dd, xd, tmp, scv);
        f.get(q).i32Const(192).i32Add().set(q);
        f.get(mt).i32Const(20).i32Add().set(mt);
        f.get(xd).i32Const(4).i32Add().set(xd);
        f.get(bsp).i32Const(32).i32Add().set(bsp);
      },
    };
  });

/** The exported names of each type's driver and dequantization kernel (runtime.ts calls them by type). */
export const QUANT_EXPORTS: Record<QuantType, { gemm: string; deq: string }> = {
  q8_0: { gemm: "qgemm", deq: "q8deq" },
  q4_0: { gemm: "q40gemm", deq: "q40deq" },
  q4_k: { gemm: "q4kgemm", deq: "q4kdeq" },
  q6_k: { gemm: "q6kgemm", deq: "q6kdeq" },
  bf16: { gemm: "bf16gemm", deq: "bf16deq" },
  f16: { gemm: "f16gemm", deq: "f16deq" },
  q5_k: { gemm: "q5kgemm", deq: "q5kdeq" },
};

/** Pushes the f32 of the f16 bits in local h, exactly (as the F16 kernels: bits & 0x7fff shifted into an f32's place, times 2^112, then the sign; subnormals included). */
function f16Value(f: Fn, h: number): void {
  f.get(h).i32Const(0x7fff).i32And().i32Const(13).i32Shl().f32ReinterpretI32().f32Const(2 ** 112).f32Mul();
  f.i32ReinterpretF32().get(h).i32Const(0x8000).i32And().i32Const(16).i32Shl().i32Or().f32ReinterpretI32();
}

/**
 * The loader's repacks of file blocks into this file's layouts, run in Wasm on blocks read into the
 * engine's memory (runtime.ts quantReadIo): `name`(src, nb, dq, dm) -> i32 repacks nb blocks at src
 * (the file's layout) into quants at dq and scales/meta at dm and returns the first block with a
 * non-finite f16 scale (infinity or NaN), or -1, as the JavaScript repacks in io/gguf-quants.ts do
 * (their tests hold these to them bit for bit). `build` declares the kernel's locals and returns its
 * constants' setup and one block's code, which reads and writes at the byte pointers (advanced here)
 * and calls scale(offset, to) for each f16 scale it widens.
 */
function emitRepack(
  mb: ModuleBuilder,
  name: string,
  sizes: { src: number; q: number; m: number },
  build: (f: Fn, p: { SRC: number; DQ: number; DM: number }, scale: (offset: number, to: () => void) => void) => { init?(): void; block(): void },
): void {
  const f = mb.func(name, [I32, I32, I32, I32], [I32], true);
  const [SRC, NB, DQ, DM] = [0, 1, 2, 3];
  const i = f.local(I32), h = f.local(I32), bad = f.local(I32);
  const scale = (offset: number, to: () => void) => {
    f.get(SRC).i32Load16U(offset).set(h);
    f.get(h).i32Const(0x7fff).i32And().i32Const(0x7c00).i32GeU().get(bad).i32Const(0).i32LtS().i32And().if(() => void f.get(i).set(bad));
    to();
    f16Value(f, h);
    f.f32Store();
  };
  const k = build(f, { SRC, DQ, DM }, scale);
  f.i32Const(-1).set(bad);
  k.init?.();
  f.get(NB).if(() => {
    f.loop(() => {
      k.block();
      f.get(SRC).i32Const(sizes.src).i32Add().set(SRC);
      f.get(DQ).i32Const(sizes.q).i32Add().set(DQ);
      f.get(DM).i32Const(sizes.m).i32Add().set(DM);
      f.get(i).i32Const(1).i32Add().tee(i).get(NB).i32LtU().brIf(0);
    });
  });
  f.get(bad);
}

/** Copies n bytes (a multiple of 16) from SRC + s to DQ + d. */
function copy16(f: Fn, SRC: number, s: number, DQ: number, d: number, n: number): void {
  for (let k = 0; k < n; k += 16) f.get(DQ).get(SRC).v128Load(s + k).v128Store(d + k);
}

/**
 * The Q4_K/Q5_K meta (qkernels' 24 bytes: d and dmin as f32, then the eight 6-bit scales and the
 * eight mins as bytes) from the file's d, dmin and 12 packed bytes b (ggml's get_scale_min_k4: for
 * j < 4 sc = b[j] & 63, m = b[j+4] & 63; else sc = (b[j+4] & 15) | (b[j-4] >> 6) << 4,
 * m = (b[j+4] >> 4) | (b[j] >> 6) << 4), all sixteen bytes by shuffles and masks at once.
 */
function kMeta(f: Fn, p: { SRC: number; DM: number }, scale: (offset: number, to: () => void) => void, l: { v: number; t: number; c1: number; c2: number; c3: number; zero: number }): void {
  scale(0, () => void f.get(p.DM));
  scale(2, () => void f.get(p.DM).i32Const(4).i32Add());
  f.get(p.SRC).v128Load(4).set(l.v); // b0..b11 (and four quant bytes, unused)
  f.get(p.DM);
  // [b0..3, b8..11, b4..7, b8..11] masked to [sc0..3 | low nibbles | m0..3 | 0], plus the high nibbles of b8..11 in lanes 12..15.
  f.get(l.v).get(l.v).shuffle8([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]).tee(l.t).get(l.c1).v128And();
  f.get(l.t).i32Const(4).i16x8ShrU().get(l.c2).v128And().v128Or();
  // The top two bits of b0..7 (16-bit shift, then a mask: nothing crosses bytes), into lanes 4..7 and 12..15, times 16.
  f.get(l.v).i32Const(6).i16x8ShrU().get(l.c3).v128And().get(l.zero).shuffle8([16, 16, 16, 16, 0, 1, 2, 3, 16, 16, 16, 16, 4, 5, 6, 7]).i32Const(4).i16x8Shl().v128Or();
  f.v128Store(8);
}

/** The constants kMeta uses, in locals of f. */
function kMetaLocals(f: Fn): { v: number; t: number; c1: number; c2: number; c3: number; zero: number; set(): void } {
  const l = { v: f.local(V128), t: f.local(V128), c1: f.local(V128), c2: f.local(V128), c3: f.local(V128), zero: f.local(V128) };
  return {
    ...l,
    set: () => {
      f.v128ConstI32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0).set(l.c1);
      f.v128ConstI32(0, 0, 0, 0x0f0f0f0f).set(l.c2);
      f.v128ConstI32(0x03030303).set(l.c3);
      f.v128ConstI32(0).set(l.zero);
    },
  };
}

/**
 * splitq8 / splitq4: Q8_0 / Q4_0 blocks (an f16 d, then 32 / 16 quant bytes) into quants at dq
 * and d as f32 at ds. repackq4k / repackq5k / repackq6k: the K-quants into the layouts above
 * (Q6_K's rearranged steps as repackQ6_K in io/gguf-quants.ts computes them, 16 lanes at a time).
 * In Wasm 5-8x faster than the JavaScript loops (Q8_0: 2.7 vs 20 ns per block), which took 4.6 s
 * of a 1.3 GB Q8_0 file's 6 s load and 3.2 s of the 8B Q4_K_M file's 18 (2026-12-07; most of
 * the rest is page faults).
 */
function emitRepackKernels(mb: ModuleBuilder): void {
  for (const [name, qb] of [["splitq8", 32], ["splitq4", 16]] as const) {
    emitRepack(mb, name, { src: qb + 2, q: qb, m: 4 }, (f, p, scale) => ({
      block: () => {
        scale(0, () => void f.get(p.DM));
        copy16(f, p.SRC, 2, p.DQ, 0, qb);
      },
    }));
  }
  for (const five of [false, true]) {
    emitRepack(mb, five ? "repackq5k" : "repackq4k", { src: five ? 176 : 144, q: five ? 160 : 128, m: 24 }, (f, p, scale) => {
      const l = kMetaLocals(f);
      return {
        init: l.set,
        block: () => {
          kMeta(f, p, scale, l);
          // Q4_K: the 128 nibble bytes; Q5_K: its 128 nibble bytes (file offset 48), then the 32 bytes of fifth bits (offset 16).
          if (five) {
            copy16(f, p.SRC, 48, p.DQ, 0, 128);
            copy16(f, p.SRC, 16, p.DQ, 128, 32);
          } else copy16(f, p.SRC, 16, p.DQ, 0, 128);
        },
      };
    });
  }
  emitRepack(mb, "repackq6k", { src: 210, q: 192, m: 20 }, (f, p, scale) => {
    const L = { hlo: f.local(V128), hhi: f.local(V128), q: [f.local(V128), f.local(V128), f.local(V128), f.local(V128)], m0f: f.local(V128), m03: f.local(V128) };
    return {
      init: () => {
        f.v128ConstI32(0x0f0f0f0f).set(L.m0f);
        f.v128ConstI32(0x03030303).set(L.m03);
      },
      block: () => q6Block(f, p, scale, L),
    };
  });
}

/** One Q6_K block of repackq6k (locals L). */
function q6Block(f: Fn, p: { SRC: number; DQ: number; DM: number }, scale: (offset: number, to: () => void) => void, L: { hlo: number; hhi: number; q: number[]; m0f: number; m03: number }): void {
  scale(208, () => void f.get(p.DM));
  f.get(p.DM).get(p.SRC).v128Load(192).v128Store(4); // the 16 int8 scales
  // Weight 128h + 32k + l has its low four bits in ql[64h + 32(k & 1) + l] (low nibble for k < 2,
  // high for k >= 2) and its high two in qh[32h + l] at bit 2k; step s = 2h + e holds k = 2e (groups
  // 0, 1: l < 16, l >= 16) and k = 2e + 1 (groups 2, 3). 16-bit shifts, each masked so that no bit
  // crosses into another byte.
  for (let s = 0; s < 4; s++) {
    const h = s >> 1, sh = 4 * (s & 1);
    const ql = 64 * h, qh = 128 + 32 * h;
    f.get(p.SRC).v128Load(qh).set(L.hlo);
    f.get(p.SRC).v128Load(qh + 16).set(L.hhi);
    for (let g = 0; g < 4; g++) {
      f.get(p.SRC).v128Load(ql + 16 * g);
      if (sh) f.i32Const(sh).i16x8ShrU();
      f.get(L.m0f).v128And();
      f.get(g % 2 ? L.hhi : L.hlo);
      const hs = sh + (g >= 2 ? 2 : 0);
      if (hs) f.i32Const(hs).i16x8ShrU();
      f.get(L.m03).v128And().i32Const(4).i16x8Shl().v128Or().set(L.q[g]!);
    }
    // A = q0 | (q3 & 3) << 6, B = q1 | (q3 >> 2 & 3) << 6, C = q2 | (q3 >> 4) << 6.
    for (let v = 0; v < 3; v++) {
      f.get(p.DQ);
      f.get(L.q[v]!).get(L.q[3]!).v128ConstI32((0x03030303 << (2 * v)) | 0).v128And();
      f.i32Const(6 - 2 * v).i16x8Shl().v128Or();
      f.v128Store(48 * s + 16 * v);
    }
  }
}

/** Emits every type's rows and dequantization kernels and its driver (exported); `gemm` is the f32 driver. */
export function emitQuantKernels(mb: ModuleBuilder, o: KernelOptions, gemm: Fn): Record<QuantType, Fn> {
  emitRepackKernels(mb);
  const rowsOf = (emit: (mb: ModuleBuilder, o: KernelOptions, a: number) => Fn, n = o.dmr) => Array.from({ length: n }, (_, i) => emit(mb, o, i + 1));
  /** The int8-activation rows: up to o.idmr rows of X per pass over W. */
  const irowsOf = (emit: (mb: ModuleBuilder, o: KernelOptions, a: number) => Fn) => rowsOf(emit, o.idmr);
  const xsums = emitXSums(mb);
  const q8act = emitQ8Act(mb);
  // Each driver's byte offsets of row n0 in wq (pushed) and ws (pushed by the returned function).
  return {
    q8_0: emitDriver(
      mb,
      o,
      gemm,
      QUANT_EXPORTS.q8_0.gemm,
      rowsOf(emitQ8Rows),
      emitQ8Deq(mb),
      null,
      (g, n0, K) => {
        g.get(n0).get(K).i32Mul(); // quant bytes before row n0
        return () => void g.get(n0).get(K).i32Mul().i32Const(3).i32ShrU(); // scale bytes: n0·K/32·4
      },
      { rows: irowsOf(emitQ8IRows), prep: emitQ8Act32(mb) },
    ),
    q4_0: emitDriver(mb, o, gemm, QUANT_EXPORTS.q4_0.gemm, rowsOf(emitQ40Rows), emitQ40Deq(mb), null, (g, n0, K) => {
      g.get(n0).get(K).i32Mul().i32Const(1).i32ShrU(); // nibble bytes: n0·K/2
      return () => void g.get(n0).get(K).i32Mul().i32Const(3).i32ShrU(); // scales: n0·K/32·4
    }),
    q4_k: emitDriver(
      mb,
      o,
      gemm,
      QUANT_EXPORTS.q4_k.gemm,
      rowsOf(emitQ4KRows),
      emitQ4KDeq(mb),
      xsums,
      (g, n0, K) => {
        g.get(n0).get(K).i32Mul().i32Const(1).i32ShrU(); // nibble bytes: n0·K/2
        return () => void g.get(n0).get(K).i32Mul().i32Const(8).i32ShrU().i32Const(24).i32Mul(); // meta: n0·K/256·24
      },
      { rows: irowsOf((m, oo, a) => emitQ4KIRows(m, oo, a, false, o.relaxedDot)), prep: q8act, i8: o.relaxedDot },
    ),
    q5_k: emitDriver(
      mb,
      o,
      gemm,
      QUANT_EXPORTS.q5_k.gemm,
      rowsOf((m, oo, a) => emitQ4KRows(m, oo, a, true)),
      emitQ4KDeq(mb, true),
      xsums,
      (g, n0, K) => {
        g.get(n0).get(K).i32Mul().i32Const(8).i32ShrU().i32Const(160).i32Mul(); // nibbles and high bits: n0·K/256·160
        return () => void g.get(n0).get(K).i32Mul().i32Const(8).i32ShrU().i32Const(24).i32Mul(); // meta: n0·K/256·24
      },
      { rows: irowsOf((m, oo, a) => emitQ4KIRows(m, oo, a, true, o.relaxedDot)), prep: q8act, i8: o.relaxedDot },
    ),
    q6_k: emitDriver(
      mb,
      o,
      gemm,
      QUANT_EXPORTS.q6_k.gemm,
      rowsOf(emitQ6KRows),
      emitQ6KDeq(mb),
      null,
      (g, n0, K) => {
        g.get(n0).get(K).i32Mul().i32Const(8).i32ShrU().i32Const(192).i32Mul(); // n0·K/256·192
        return () => void g.get(n0).get(K).i32Mul().i32Const(8).i32ShrU().i32Const(20).i32Mul(); // n0·K/256·20
      },
      o.relaxedDot ? { rows: irowsOf(emitQ6KRRows), prep: q8act, i8: true } : { rows: irowsOf(emitQ6KIRows), prep: q8act },
    ),
    bf16: emitDriver(mb, o, gemm, QUANT_EXPORTS.bf16.gemm, rowsOf(emitBf16Rows), emitBf16Deq(mb), null, (g, n0, K) => {
      g.get(n0).get(K).i32Mul().i32Const(1).i32Shl(); // value bytes: n0·K·2
      return () => void g.i32Const(0); // no scales
    }),
    f16: emitDriver(mb, o, gemm, QUANT_EXPORTS.f16.gemm, rowsOf(emitF16Rows), emitF16Deq(mb), null, (g, n0, K) => {
      g.get(n0).get(K).i32Mul().i32Const(1).i32Shl(); // value bytes: n0·K·2
      return () => void g.i32Const(0); // no scales
    }),
  };
}

/**
 * One driver: (x, ldx, wq, ws, y, ldy, M, N, K, flags, scratch, deq, deqRows). M < packMinM or
 * INT8_ACT: the direct rows kernels (with the rows' xsums in `scratch` first when `xsums` is given,
 * or X quantized first); otherwise chunks of deqRows rows dequantized into `deq` and multiplied by
 * the f32 gemm.
 */
function emitDriver(
  mb: ModuleBuilder,
  o: KernelOptions,
  gemm: Fn,
  name: string,
  rows: Fn[],
  deq: Fn,
  xsums: Fn | null,
  rowOffsets: (g: Fn, n0: number, K: number) => () => void,
  /** i8: the rows read the i8 quants (after the i16 ones) instead of the i16. */
  int8?: { rows: Fn[]; prep: Fn; i8?: boolean },
): Fn {
  const g = mb.func(name, [I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32], [], true);
  const [X, LDX, WQ, WS, Y, LDY, M, N, K, FLAGS, SCR, DEQ, DEQROWS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
  const m = g.local(I32);
  const r = g.local(I32);
  const n0 = g.local(I32);
  const stride = g.local(I32);
  // The W rows direct() runs against: all of them, or (int8 rows) one chunk at a time.
  const wq = g.local(I32), ws = g.local(I32), y = g.local(I32), nr = g.local(I32), qx = g.local(I32);
  const whole = () => {
    g.get(WQ).i32Const(0).i32Add().set(wq);
    g.get(WS).i32Const(0).i32Add().set(ws);
    g.get(Y).i32Const(0).i32Add().set(y);
    g.get(N).i32Const(0).i32Add().set(nr);
  };
  /** Direct: fns.length rows of X at a time against the nr rows of W at wq/ws (the rest through a smaller kernel). */
  const direct = (fns: Fn[], x: () => void, ldx: () => void, xs: (() => void) | null) =>
    g.loop(() => {
      const amax = fns.length;
      g.get(M).get(m).i32Sub().set(r);
      g.get(r).i32Const(amax).i32GtU().if(() => void g.i32Const(amax).set(r));
      const call = (fn: Fn) => {
        x();
        ldx();
        g.get(wq).get(ws);
        g.get(y).get(m).get(LDY).i32Mul().i32Add();
        g.get(LDY).get(nr).get(K);
        g.get(FLAGS).i32Const(1).i32And();
        xs?.();
        g.call(fn);
      };
      const chain = (a: number) => {
        if (a === amax) return call(fns[a - 1]!);
        g.get(r).i32Const(a).i32Eq().if(() => call(fns[a - 1]!), () => chain(a + 1));
      };
      chain(1);
      g.get(m).get(r).i32Add().tee(m).get(M).i32LtU().brIf(0);
    });
  const floatDirect = () => {
    whole();
    if (xsums) {
      g.get(X).get(LDX).get(M).get(K).get(SCR);
      g.call(xsums);
    }
    direct(
      rows,
      () => void g.get(X).get(m).get(LDX).i32Mul().i32Add(),
      () => void g.get(LDX),
      xsums ? () => void g.get(SCR).get(m).get(K).i32Mul().i32Const(3).i32ShrU().i32Add() : null,
    );
  };
  g.get(M).i32Eqz().get(N).i32Eqz().i32Or().if(() => void g.return());
  g.get(M).i32Const(o.packMinM).i32LtU().get(FLAGS).i32Const(int8 ? INT8_ACT : 0).i32And().i32Or().if(
    () => {
      if (!int8) return floatDirect();
      // INT8_ACT (any M: the runtime sets it where the int8 rows beat the dequantized f32 GEMM, and
      // keeps M·q8actRowBytes(K) within the dequantization area): X quantized into that area, then
      // the int8 rows kernels.
      g.get(FLAGS).i32Const(INT8_ACT).i32And().if(() => {
        pushQ8actRowBytes(g, K);
        g.set(stride);
        // With PACKED_X, x already holds X in that layout (the runtime quantizes it once for all
        // threads); otherwise quantize it into the dequantization area here.
        g.get(FLAGS).i32Const(PACKED_X).i32And().if(
          () => void g.get(X).i32Const(0).i32Add().set(qx),
          () => {
            g.get(X).get(LDX).get(M).get(K).get(DEQ);
            g.call(int8.prep);
            g.get(DEQ).i32Const(0).i32Add().set(qx);
          },
        );
        const int8Direct = () =>
          direct(
            int8.rows,
            () => {
              g.get(qx).get(m).get(stride).i32Mul().i32Add().get(K).i32Const(3).i32ShrU().i32Add().get(K).i32Const(6).i32ShrU().i32Add();
              if (int8.i8) g.get(K).i32Const(1).i32Shl().i32Add();
            },
            () => void g.get(stride),
            () => void g.get(qx).get(m).get(stride).i32Mul().i32Add(),
          );
        // W in chunks of about 256 KiB (K bytes per row bounds every type's), each against all M
        // rows of X: at prefill sizes a chunk then stays in L2 across the M/idmr passes over it
        // instead of streaming from L3 or memory on each.
        g.i32Const(0).set(n0);
        g.loop(() => {
          g.get(N).get(n0).i32Sub().set(nr);
          g.i32Const(1 << 18).get(K).i32DivU().tee(r).get(nr).i32LtU().if(() => void g.get(r).set(nr));
          g.get(WQ);
          const metaOffset = rowOffsets(g, n0, K);
          g.i32Add().set(wq);
          g.get(WS);
          metaOffset();
          g.i32Add().set(ws);
          g.get(Y).get(n0).i32Const(2).i32Shl().i32Add().set(y);
          g.i32Const(0).set(m);
          int8Direct();
          g.get(n0).get(nr).i32Add().tee(n0).get(N).i32LtU().brIf(0);
        });
      }, floatDirect);
    },
    () => {
      // Chunks of W rows dequantized to f32, then the f32 gemm on them.
      g.loop(() => {
        g.get(N).get(n0).i32Sub().set(r);
        g.get(r).get(DEQROWS).i32GtU().if(() => void g.get(DEQROWS).set(r));
        g.get(WQ);
        const metaOffset = rowOffsets(g, n0, K);
        g.i32Add();
        g.get(WS);
        metaOffset();
        g.i32Add();
        g.get(r).get(K).get(DEQ);
        g.call(deq);
        g.get(X).get(LDX).get(DEQ).get(K).i32Const(2).i32Shl();
        g.get(Y).get(n0).i32Const(2).i32Shl().i32Add();
        g.get(LDY).get(M).get(r).get(K).get(FLAGS).get(SCR);
        g.call(gemm);
        g.get(n0).get(r).i32Add().tee(n0).get(N).i32LtU().brIf(0);
      });
    },
  );
  return g;
}
