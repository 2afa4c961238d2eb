// Kernels on Q8_0 weights kept quantized in memory (issue 16): a llama.cpp Q8_0 block is 32
// int8 quants and one scale. We hold a matrix W [N, K] (K a multiple of 32) as
//   qs: int8 [N][K] at wq (bytes)      ds: f32 [N][K/32] at ws (bytes)
// i.e. the file's blocks with the f16 scale widened to f32 and moved aside, so that the quants of
// a row are one contiguous stream (1.125 bytes per weight instead of the file's 1.0625; 4 bytes
// as f32).
//
//   q8rows_a(px, ldx, wq, ws, py, ldy, N, K, acc)   a = 1..dmr rows of X against all N rows of W:
//     y[i][n] (+)= Σ_b ds[n][b] · Σ_{j<32} x[i][32b+j] · qs[n][32b+j]
//     The float path: quants widened to f32 in registers (i8 → i16 → i32 → f32) and multiplied
//     with f32 activations, so the result differs from the f32 engine's only by summation order
//     (no activation quantization, unlike llama.cpp's q8 dot). Decode is bandwidth-bound: W is
//     streamed once, row after row, at 1.125 instead of 4 bytes per weight.
//   q8deq(wq, ws, rows, K, dst)   dequantize rows to f32 [rows][K] at dst (bytes).
//   qgemm(x, ldx, wq, ws, y, ldy, M, N, K, flags, scratch, deq, deqRows)   Y (+)= X · Wᵀ:
//     M < packMinM: the direct rows above. Otherwise chunks of deqRows rows of W are dequantized
//     into the thread's `deq` area and multiplied by the f32 gemm (its packed path: the dequant
//     pass is amortized over the M rows of X; flags as gemm's, PACKED_X included).
import { F32, type Fn, I32, type ModuleBuilder, V128 } from "./wasm-emit.js";
import type { KernelOptions } from "./kernels.js";
import type { QuantType } from "../weights.js";

/** Bytes of (wq, ws) for N rows of K of a quantized matrix. */
export function quantBytes(type: QuantType, N: number, K: number): { wq: number; ws: number } {
  if (type === "bf16") return { wq: N * K * 2, ws: 0 };
  if (type === "q6_k") return { wq: ((N * K) / 256) * 192, ws: ((N * K) / 256) * 20 };
  if (type === "q4_0") return { wq: (N * K) / 2, ws: (N * K) / 8 };
  return type === "q8_0" ? { wq: N * K, ws: (N * K) / 8 } : { wq: (N * K) / 2, ws: ((N * K) / 256) * 24 };
}
/** Row length a quantized matrix must be a multiple of. */
export const QUANT_BLOCK: Record<QuantType, number> = { q8_0: 32, q4_k: 256, bf16: 8, q6_k: 256, q4_0: 32 };

/** Bytes of each thread's dequantization area (chunks of W rows as f32 for the prefill path). */
export const DEQ_BYTES = 1 << 20;
/** Rows of a Q8_0 matrix with K columns dequantized per chunk. */
export const deqRowsFor = (K: number) => Math.max(1, Math.floor(DEQ_BYTES / (4 * K)));
/** Largest K a quantized matrix may have here (one row must fit the dequantization area). */
export const MAX_Q8_K = DEQ_BYTES / 4;

function emitQ8Rows(mb: ModuleBuilder, o: KernelOptions, a: number): Fn {
  const f = mb.func(`q8rows_${a}`, [I32, I32, I32, I32, I32, I32, I32, I32, I32]);
  const [PX, LDX, WQ, WS, PY, LDY, N, K, ACC] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
  const xp = Array.from({ length: a }, () => f.local(I32));
  const q = f.local(I32);
  const s = f.local(I32);
  const yp = f.local(I32);
  const n = f.local(I32);
  const cnt = f.local(I32);
  const acc = Array.from({ length: a }, () => f.local(V128));
  const t = Array.from({ length: a }, () => f.local(V128));
  const wv = f.local(V128);
  const w16 = f.local(V128);
  const wf = f.local(V128);
  const xv = f.local(V128);
  const d = f.local(V128);
  const sc = f.local(F32);
  const madd = (accL: number, x: number, w: number) => {
    if (o.relaxed) f.get(x).get(w).get(accL).f32x4RelaxedMadd().set(accL);
    else f.get(accL).get(x).get(w).f32x4Mul().f32x4Add().set(accL);
  };
  f.get(N).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(WS).i32Const(0).i32Add().set(s);
  f.get(PY).i32Const(0).i32Add().set(yp);
  f.loop(() => {
    f.get(PX).i32Const(0).i32Add().set(xp[0]!);
    for (let i = 1; i < a; i++) f.get(xp[i - 1]!).get(LDX).i32Add().set(xp[i]!);
    for (let i = 0; i < a; i++) f.v128ConstF32(0).set(acc[i]!);
    f.get(K).i32Const(5).i32ShrU().tee(cnt).if(() => {
      f.loop(() => {
        let first = true;
        for (let h = 0; h < 2; h++) {
          f.get(q).v128Load(16 * h).set(wv);
          for (let part = 0; part < 2; part++) {
            f.get(wv);
            if (part === 0) f.i16x8ExtendLowI8x16S();
            else f.i16x8ExtendHighI8x16S();
            f.set(w16);
            for (let g = 0; g < 2; g++) {
              f.get(w16);
              if (g === 0) f.i32x4ExtendLowI16x8S();
              else f.i32x4ExtendHighI16x8S();
              f.f32x4ConvertI32x4S().set(wf);
              const off = 4 * (16 * h + 8 * part + 4 * g);
              for (let i = 0; i < a; i++) {
                f.get(xp[i]!).v128Load(off).set(xv);
                if (first) f.get(xv).get(wf).f32x4Mul().set(t[i]!);
                else madd(t[i]!, xv, wf);
              }
              first = false;
            }
          }
        }
        f.get(s).f32Load().f32x4Splat().set(d);
        for (let i = 0; i < a; i++) madd(acc[i]!, t[i]!, d);
        f.get(q).i32Const(32).i32Add().set(q);
        f.get(s).i32Const(4).i32Add().set(s);
        for (let i = 0; i < a; i++) f.get(xp[i]!).i32Const(128).i32Add().set(xp[i]!);
        f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
      });
    });
    for (let i = 0; i < a; i++) {
      const A = acc[i]!;
      f.get(A).get(A).get(A).shuffle32(2, 3, 0, 1).f32x4Add().set(wf);
      f.get(wf).get(wf).get(wf).shuffle32(1, 0, 3, 2).f32x4Add().f32x4ExtractLane(0).set(sc);
      const yAddr = () => (i === 0 ? f.get(yp) : f.get(yp).get(LDY).i32Const(i).i32Mul().i32Add());
      f.get(ACC).if(() => void yAddr().f32Load().get(sc).f32Add().set(sc));
      yAddr().get(sc).f32Store();
    }
    f.get(yp).i32Const(4).i32Add().set(yp);
    f.get(n).i32Const(1).i32Add().tee(n).get(N).i32LtU().brIf(0);
  });
  return f;
}

function emitQ8Deq(mb: ModuleBuilder): Fn {
  const f = mb.func("q8deq", [I32, I32, I32, I32, I32], [], true);
  const [WQ, WS, ROWS, K, DST] = [0, 1, 2, 3, 4];
  const q = f.local(I32);
  const s = f.local(I32);
  const p = f.local(I32);
  const cnt = f.local(I32);
  const wv = f.local(V128);
  const w16 = f.local(V128);
  const d = f.local(V128);
  f.get(ROWS).get(K).i32Mul().i32Const(5).i32ShrU().tee(cnt).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(WS).i32Const(0).i32Add().set(s);
  f.get(DST).i32Const(0).i32Add().set(p);
  f.loop(() => {
    f.get(s).f32Load().f32x4Splat().set(d);
    for (let h = 0; h < 2; h++) {
      f.get(q).v128Load(16 * h).set(wv);
      for (let part = 0; part < 2; part++) {
        f.get(wv);
        if (part === 0) f.i16x8ExtendLowI8x16S();
        else f.i16x8ExtendHighI8x16S();
        f.set(w16);
        for (let g = 0; g < 2; g++) {
          f.get(p);
          f.get(w16);
          if (g === 0) f.i32x4ExtendLowI16x8S();
          else f.i32x4ExtendHighI16x8S();
          f.f32x4ConvertI32x4S().get(d).f32x4Mul();
          f.v128Store(4 * (16 * h + 8 * part + 4 * g));
        }
      }
    }
    f.get(q).i32Const(32).i32Add().set(q);
    f.get(s).i32Const(4).i32Add().set(s);
    f.get(p).i32Const(128).i32Add().set(p);
    f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
  });
  return f;
}

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
  if (hi) f.i32Const(4).i8x16ShrU();
  else f.v128ConstI32(0x0f0f0f0f).v128And();
}

/**
 * q4krows_a(px, ldx, wq, wm, py, ldy, N, K, acc, xs): a rows of X against all N rows of a Q4_K
 * matrix; xs: the rows' xsums (K/32 floats per row, consecutive).
 */
function emitQ4KRows(mb: ModuleBuilder, o: KernelOptions, a: number): Fn {
  const f = mb.func(`q4krows_${a}`, [I32, I32, I32, I32, I32, I32, I32, I32, I32, I32]);
  const [PX, LDX, WQ, WM, PY, LDY, N, K, ACC, XS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
  const xp = Array.from({ length: a }, () => f.local(I32));
  const xs = f.local(I32);
  const q = f.local(I32);
  const mt = f.local(I32);
  const yp = f.local(I32);
  const n = f.local(I32);
  const cnt = f.local(I32);
  const acc = Array.from({ length: a }, () => f.local(V128));
  const macc = Array.from({ length: a }, () => f.local(F32));
  const t = Array.from({ length: a }, () => f.local(V128));
  const v0 = f.local(V128);
  const v1 = f.local(V128);
  const u = f.local(V128);
  const w16 = f.local(V128);
  const wf = f.local(V128);
  const xv = f.local(V128);
  const dd = f.local(F32);
  const dmin = f.local(F32);
  const sc = f.local(F32);
  const mm = f.local(F32);
  const madd = (accL: number, x: number, w: number) => {
    if (o.relaxed) f.get(x).get(w).get(accL).f32x4RelaxedMadd().set(accL);
    else f.get(accL).get(x).get(w).f32x4Mul().f32x4Add().set(accL);
  };
  const kb = K; // K/32 * 4 = K/8 bytes between the xsum rows
  f.get(N).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(WM).i32Const(0).i32Add().set(mt);
  f.get(PY).i32Const(0).i32Add().set(yp);
  f.loop(() => {
    f.get(PX).i32Const(0).i32Add().set(xp[0]!);
    for (let i = 1; i < a; i++) f.get(xp[i - 1]!).get(LDX).i32Add().set(xp[i]!);
    f.get(XS).i32Const(0).i32Add().set(xs);
    for (let i = 0; i < a; i++) {
      f.v128ConstF32(0).set(acc[i]!);
      f.f32Const(0).set(macc[i]!);
    }
    f.get(K).i32Const(8).i32ShrU().tee(cnt).if(() => {
      f.loop(() => {
        f.get(mt).f32Load(0).set(dd);
        f.get(mt).f32Load(4).set(dmin);
        for (let c = 0; c < 4; c++) {
          f.get(q).v128Load(32 * c).set(v0);
          f.get(q).v128Load(32 * c + 16).set(v1);
          for (const hi of [false, true]) {
            const j = 2 * c + (hi ? 1 : 0);
            let first = true;
            for (const [vi, v] of [v0, v1].entries()) {
              nibbles(f, v, hi);
              f.set(u);
              for (let part = 0; part < 2; part++) {
                f.get(u);
                if (part === 0) f.i16x8ExtendLowI8x16U();
                else f.i16x8ExtendHighI8x16U();
                f.set(w16);
                for (let g = 0; g < 2; g++) {
                  f.get(w16);
                  if (g === 0) f.i32x4ExtendLowI16x8U();
                  else f.i32x4ExtendHighI16x8U();
                  f.f32x4ConvertI32x4S().set(wf);
                  const off = 4 * (32 * j + 16 * vi + 8 * part + 4 * g);
                  for (let i = 0; i < a; i++) {
                    f.get(xp[i]!).v128Load(off).set(xv);
                    if (first) f.get(xv).get(wf).f32x4Mul().set(t[i]!);
                    else madd(t[i]!, xv, wf);
                  }
                  first = false;
                }
              }
            }
            // acc += t · (d·sc_j); macc += (dmin·m_j) · xsum_j
            f.get(dd).get(mt).i32Load8U(8 + j).f32ConvertI32U().f32Mul().set(sc);
            f.get(dmin).get(mt).i32Load8U(16 + j).f32ConvertI32U().f32Mul().set(mm);
            f.get(sc).f32x4Splat().set(wf);
            for (let i = 0; i < a; i++) {
              madd(acc[i]!, t[i]!, wf);
              const xsAddr = () => (i === 0 ? f.get(xs) : f.get(xs).i32Const(i).get(kb).i32Mul().i32Const(3).i32ShrU().i32Add());
              f.get(macc[i]!).get(mm);
              xsAddr().f32Load(4 * j);
              f.f32Mul().f32Add().set(macc[i]!);
            }
          }
        }
        f.get(q).i32Const(128).i32Add().set(q);
        f.get(mt).i32Const(24).i32Add().set(mt);
        f.get(xs).i32Const(32).i32Add().set(xs);
        for (let i = 0; i < a; i++) f.get(xp[i]!).i32Const(1024).i32Add().set(xp[i]!);
        f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
      });
    });
    for (let i = 0; i < a; i++) {
      const A = acc[i]!;
      f.get(A).get(A).get(A).shuffle32(2, 3, 0, 1).f32x4Add().set(wf);
      f.get(wf).get(wf).get(wf).shuffle32(1, 0, 3, 2).f32x4Add().f32x4ExtractLane(0).get(macc[i]!).f32Sub().set(sc);
      const yAddr = () => (i === 0 ? f.get(yp) : f.get(yp).get(LDY).i32Const(i).i32Mul().i32Add());
      f.get(ACC).if(() => void yAddr().f32Load().get(sc).f32Add().set(sc));
      yAddr().get(sc).f32Store();
    }
    f.get(yp).i32Const(4).i32Add().set(yp);
    f.get(n).i32Const(1).i32Add().tee(n).get(N).i32LtU().brIf(0);
  });
  return f;
}

/** q4kdeq(wq, wm, rows, K, dst): rows of a Q4_K matrix as f32, exactly as ggml's dequantize_row_q4_K. */
function emitQ4KDeq(mb: ModuleBuilder): Fn {
  const f = mb.func("q4kdeq", [I32, I32, I32, I32, I32], [], true);
  const [WQ, WM, ROWS, K, DST] = [0, 1, 2, 3, 4];
  const q = f.local(I32);
  const mt = f.local(I32);
  const p = f.local(I32);
  const cnt = f.local(I32);
  const v0 = f.local(V128);
  const v1 = f.local(V128);
  const u = f.local(V128);
  const w16 = f.local(V128);
  const s = f.local(V128);
  const m = f.local(V128);
  const dd = f.local(F32);
  const dmin = f.local(F32);
  f.get(ROWS).get(K).i32Mul().i32Const(8).i32ShrU().tee(cnt).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(WM).i32Const(0).i32Add().set(mt);
  f.get(DST).i32Const(0).i32Add().set(p);
  f.loop(() => {
    f.get(mt).f32Load(0).set(dd);
    f.get(mt).f32Load(4).set(dmin);
    for (let c = 0; c < 4; c++) {
      f.get(q).v128Load(32 * c).set(v0);
      f.get(q).v128Load(32 * c + 16).set(v1);
      for (const hi of [false, true]) {
        const j = 2 * c + (hi ? 1 : 0);
        f.get(dd).get(mt).i32Load8U(8 + j).f32ConvertI32U().f32Mul().f32x4Splat().set(s);
        f.get(dmin).get(mt).i32Load8U(16 + j).f32ConvertI32U().f32Mul().f32x4Splat().set(m);
        for (const [vi, v] of [v0, v1].entries()) {
          nibbles(f, v, hi);
          f.set(u);
          for (let part = 0; part < 2; part++) {
            f.get(u);
            if (part === 0) f.i16x8ExtendLowI8x16U();
            else f.i16x8ExtendHighI8x16U();
            f.set(w16);
            for (let g = 0; g < 2; g++) {
              f.get(p);
              f.get(w16);
              if (g === 0) f.i32x4ExtendLowI16x8U();
              else f.i32x4ExtendHighI16x8U();
              f.f32x4ConvertI32x4S().get(s).f32x4Mul().get(m).f32x4Sub();
              f.v128Store(4 * (32 * j + 16 * vi + 8 * part + 4 * g));
            }
          }
        }
      }
    }
    f.get(q).i32Const(128).i32Add().set(q);
    f.get(mt).i32Const(24).i32Add().set(mt);
    f.get(p).i32Const(1024).i32Add().set(p);
    f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
  });
  return f;
}

// Q6_K (llama.cpp's 6-bit K-quant; Q4_K_M files use it for the output/embedding and some
// matrices): super-blocks of 256 = 16 groups of 16, value = d·sc_g·(q − 32) with q six bits from
// ql (low 4) and qh (high 2), sc_g int8. W [N, K] (K % 256 == 0) is held as
//   wq: the file's ql (128 bytes) and qh (64 bytes) per super-block, back to back (192 bytes)
//   ws: per super-block d (f32) and the 16 scales (int8): 20 bytes
// i.e. 0.83 bytes per weight (the file's 0.82). Per 128 weights (half n) and l = 0..31:
//   q1 = ql[l] & 15 | (qh[l] & 3) << 4, q2 = ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4,
//   q3 = ql[l] >> 4 | (qh[l] >> 4 & 3) << 4, q4 = ql[l+32] >> 4 | (qh[l] >> 6) << 4
// are weights l, l+32, l+64, l+96 of the half, scale index l/16 + 0, 2, 4, 6.

/** Pushes the four 6-bit quant vectors (minus 32, as i8) of one 16-lane step (see above) and calls use(k, v) for each. */
function q6Quants(f: Fn, L0: number, L1: number, H: number, m0f: number, m30: number, c32: number, u: number, use: (k: number) => void): void {
  const lowOf = (L: number, hi: boolean) => {
    f.get(L);
    if (hi) f.i32Const(4).i16x8ShrU();
    f.get(m0f).v128And();
  };
  const highOf = (shift: number) => {
    // (qh >> s & 3) << 4 = (qh << (4 - s)) & 0x30 for s <= 4, (qh >> (s - 4)) & 0x30 beyond.
    f.get(H);
    if (shift < 4) f.i32Const(4 - shift).i16x8Shl();
    else if (shift > 4) f.i32Const(shift - 4).i16x8ShrU();
    f.get(m30).v128And();
  };
  const parts: [number, boolean, number][] = [[L0, false, 0], [L1, false, 2], [L0, true, 4], [L1, true, 6]];
  parts.forEach(([L, hi, shift], k) => {
    lowOf(L, hi);
    highOf(shift);
    f.v128Or().get(c32).i8x16Sub().set(u);
    use(k);
  });
}

/** q6krows_a(px, ldx, wq, ws, py, ldy, N, K, acc): a rows of X against all N rows of a Q6_K matrix. */
function emitQ6KRows(mb: ModuleBuilder, o: KernelOptions, a: number): Fn {
  const f = mb.func(`q6krows_${a}`, [I32, I32, I32, I32, I32, I32, I32, I32, I32]);
  const [PX, LDX, WQ, WS, PY, LDY, N, K, ACC] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
  const xp = Array.from({ length: a }, () => f.local(I32));
  const q = f.local(I32);
  const mt = f.local(I32);
  const yp = f.local(I32);
  const n = f.local(I32);
  const cnt = f.local(I32);
  const acc = Array.from({ length: a }, () => f.local(V128));
  const t = Array.from({ length: a }, () => f.local(V128));
  const L0 = f.local(V128), L1 = f.local(V128), H = f.local(V128);
  const u = f.local(V128), w16 = f.local(V128), wf = f.local(V128), xv = f.local(V128);
  const m0f = f.local(V128), m30 = f.local(V128), c32 = f.local(V128);
  const dd = f.local(F32);
  const sc = f.local(F32);
  const madd = (accL: number, x: number, w: number) => {
    if (o.relaxed) f.get(x).get(w).get(accL).f32x4RelaxedMadd().set(accL);
    else f.get(accL).get(x).get(w).f32x4Mul().f32x4Add().set(accL);
  };
  f.v128ConstI32(0x0f0f0f0f).set(m0f);
  f.v128ConstI32(0x30303030).set(m30);
  f.v128ConstI32(0x20202020).set(c32);
  f.get(N).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(WS).i32Const(0).i32Add().set(mt);
  f.get(PY).i32Const(0).i32Add().set(yp);
  f.loop(() => {
    f.get(PX).i32Const(0).i32Add().set(xp[0]!);
    for (let i = 1; i < a; i++) f.get(xp[i - 1]!).get(LDX).i32Add().set(xp[i]!);
    for (let i = 0; i < a; i++) f.v128ConstF32(0).set(acc[i]!);
    f.get(K).i32Const(8).i32ShrU().tee(cnt).if(() => {
      f.loop(() => {
        f.get(mt).f32Load(0).set(dd);
        for (let half = 0; half < 2; half++) {
          for (let lb = 0; lb < 2; lb++) {
            f.get(q).v128Load(64 * half + 16 * lb).set(L0);
            f.get(q).v128Load(64 * half + 32 + 16 * lb).set(L1);
            f.get(q).v128Load(128 + 32 * half + 16 * lb).set(H);
            q6Quants(f, L0, L1, H, m0f, m30, c32, u, (k) => {
              let first = true;
              for (let part = 0; part < 2; part++) {
                f.get(u);
                if (part === 0) f.i16x8ExtendLowI8x16S();
                else f.i16x8ExtendHighI8x16S();
                f.set(w16);
                for (let g = 0; g < 2; g++) {
                  f.get(w16);
                  if (g === 0) f.i32x4ExtendLowI16x8S();
                  else f.i32x4ExtendHighI16x8S();
                  f.f32x4ConvertI32x4S().set(wf);
                  const off = 4 * (128 * half + 32 * k + 16 * lb + 8 * part + 4 * g);
                  for (let i = 0; i < a; i++) {
                    f.get(xp[i]!).v128Load(off).set(xv);
                    if (first) f.get(xv).get(wf).f32x4Mul().set(t[i]!);
                    else madd(t[i]!, xv, wf);
                  }
                  first = false;
                }
              }
              // acc += t · (d · sc[8·half + lb + 2k])
              f.get(dd).get(mt).i32Load8S(4 + 8 * half + lb + 2 * k).f32ConvertI32S().f32Mul().set(sc);
              f.get(sc).f32x4Splat().set(wf);
              for (let i = 0; i < a; i++) madd(acc[i]!, t[i]!, wf);
            });
          }
        }
        f.get(q).i32Const(192).i32Add().set(q);
        f.get(mt).i32Const(20).i32Add().set(mt);
        for (let i = 0; i < a; i++) f.get(xp[i]!).i32Const(1024).i32Add().set(xp[i]!);
        f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
      });
    });
    for (let i = 0; i < a; i++) {
      const A = acc[i]!;
      f.get(A).get(A).get(A).shuffle32(2, 3, 0, 1).f32x4Add().set(wf);
      f.get(wf).get(wf).get(wf).shuffle32(1, 0, 3, 2).f32x4Add().f32x4ExtractLane(0).set(sc);
      const yAddr = () => (i === 0 ? f.get(yp) : f.get(yp).get(LDY).i32Const(i).i32Mul().i32Add());
      f.get(ACC).if(() => void yAddr().f32Load().get(sc).f32Add().set(sc));
      yAddr().get(sc).f32Store();
    }
    f.get(yp).i32Const(4).i32Add().set(yp);
    f.get(n).i32Const(1).i32Add().tee(n).get(N).i32LtU().brIf(0);
  });
  return f;
}

/** q6kdeq(wq, ws, rows, K, dst): rows of a Q6_K matrix as f32, exactly as ggml's dequantize_row_q6_K. */
function emitQ6KDeq(mb: ModuleBuilder): Fn {
  const f = mb.func("q6kdeq", [I32, I32, I32, I32, I32], [], true);
  const [WQ, WS, ROWS, K, DST] = [0, 1, 2, 3, 4];
  const q = f.local(I32), mt = f.local(I32), p = f.local(I32), cnt = f.local(I32);
  const L0 = f.local(V128), L1 = f.local(V128), H = f.local(V128);
  const u = f.local(V128), w16 = f.local(V128), s = f.local(V128);
  const m0f = f.local(V128), m30 = f.local(V128), c32 = f.local(V128);
  const dd = f.local(F32);
  f.v128ConstI32(0x0f0f0f0f).set(m0f);
  f.v128ConstI32(0x30303030).set(m30);
  f.v128ConstI32(0x20202020).set(c32);
  f.get(ROWS).get(K).i32Mul().i32Const(8).i32ShrU().tee(cnt).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(WS).i32Const(0).i32Add().set(mt);
  f.get(DST).i32Const(0).i32Add().set(p);
  f.loop(() => {
    f.get(mt).f32Load(0).set(dd);
    for (let half = 0; half < 2; half++) {
      for (let lb = 0; lb < 2; lb++) {
        f.get(q).v128Load(64 * half + 16 * lb).set(L0);
        f.get(q).v128Load(64 * half + 32 + 16 * lb).set(L1);
        f.get(q).v128Load(128 + 32 * half + 16 * lb).set(H);
        q6Quants(f, L0, L1, H, m0f, m30, c32, u, (k) => {
          f.get(dd).get(mt).i32Load8S(4 + 8 * half + lb + 2 * k).f32ConvertI32S().f32Mul().f32x4Splat().set(s);
          for (let part = 0; part < 2; part++) {
            f.get(u);
            if (part === 0) f.i16x8ExtendLowI8x16S();
            else f.i16x8ExtendHighI8x16S();
            f.set(w16);
            for (let g = 0; g < 2; g++) {
              f.get(p);
              f.get(w16);
              if (g === 0) f.i32x4ExtendLowI16x8S();
              else f.i32x4ExtendHighI16x8S();
              f.f32x4ConvertI32x4S().get(s).f32x4Mul();
              f.v128Store(4 * (128 * half + 32 * k + 16 * lb + 8 * part + 4 * g));
            }
          }
        });
      }
    }
    f.get(q).i32Const(192).i32Add().set(q);
    f.get(mt).i32Const(20).i32Add().set(mt);
    f.get(p).i32Const(1024).i32Add().set(p);
    f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
  });
  return f;
}

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
function emitQ40Rows(mb: ModuleBuilder, o: KernelOptions, a: number): Fn {
  const f = mb.func(`q40rows_${a}`, [I32, I32, I32, I32, I32, I32, I32, I32, I32]);
  const [PX, LDX, WQ, WS, PY, LDY, N, K, ACC] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
  const xp = Array.from({ length: a }, () => f.local(I32));
  const q = f.local(I32), s = f.local(I32), yp = f.local(I32), n = f.local(I32), cnt = f.local(I32);
  const acc = Array.from({ length: a }, () => f.local(V128));
  const t = Array.from({ length: a }, () => f.local(V128));
  const v = f.local(V128), u = f.local(V128), w16 = f.local(V128), wf = f.local(V128), xv = f.local(V128);
  const m0f = f.local(V128), c8 = f.local(V128);
  const sc = f.local(F32);
  const madd = (accL: number, x: number, w: number) => {
    if (o.relaxed) f.get(x).get(w).get(accL).f32x4RelaxedMadd().set(accL);
    else f.get(accL).get(x).get(w).f32x4Mul().f32x4Add().set(accL);
  };
  f.v128ConstI32(0x0f0f0f0f).set(m0f);
  f.v128ConstI32(0x08080808).set(c8);
  f.get(N).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(WS).i32Const(0).i32Add().set(s);
  f.get(PY).i32Const(0).i32Add().set(yp);
  f.loop(() => {
    f.get(PX).i32Const(0).i32Add().set(xp[0]!);
    for (let i = 1; i < a; i++) f.get(xp[i - 1]!).get(LDX).i32Add().set(xp[i]!);
    for (let i = 0; i < a; i++) f.v128ConstF32(0).set(acc[i]!);
    f.get(K).i32Const(5).i32ShrU().tee(cnt).if(() => {
      f.loop(() => {
        f.get(q).v128Load().set(v);
        let first = true;
        q4Quants(f, v, m0f, c8, u, (h) => {
          for (let part = 0; part < 2; part++) {
            f.get(u);
            if (part === 0) f.i16x8ExtendLowI8x16S();
            else f.i16x8ExtendHighI8x16S();
            f.set(w16);
            for (let g = 0; g < 2; g++) {
              f.get(w16);
              if (g === 0) f.i32x4ExtendLowI16x8S();
              else f.i32x4ExtendHighI16x8S();
              f.f32x4ConvertI32x4S().set(wf);
              const off = 4 * (16 * h + 8 * part + 4 * g);
              for (let i = 0; i < a; i++) {
                f.get(xp[i]!).v128Load(off).set(xv);
                if (first) f.get(xv).get(wf).f32x4Mul().set(t[i]!);
                else madd(t[i]!, xv, wf);
              }
              first = false;
            }
          }
        });
        f.get(s).f32Load().f32x4Splat().set(wf);
        for (let i = 0; i < a; i++) madd(acc[i]!, t[i]!, wf);
        f.get(q).i32Const(16).i32Add().set(q);
        f.get(s).i32Const(4).i32Add().set(s);
        for (let i = 0; i < a; i++) f.get(xp[i]!).i32Const(128).i32Add().set(xp[i]!);
        f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
      });
    });
    for (let i = 0; i < a; i++) {
      const A = acc[i]!;
      f.get(A).get(A).get(A).shuffle32(2, 3, 0, 1).f32x4Add().set(wf);
      f.get(wf).get(wf).get(wf).shuffle32(1, 0, 3, 2).f32x4Add().f32x4ExtractLane(0).set(sc);
      const yAddr = () => (i === 0 ? f.get(yp) : f.get(yp).get(LDY).i32Const(i).i32Mul().i32Add());
      f.get(ACC).if(() => void yAddr().f32Load().get(sc).f32Add().set(sc));
      yAddr().get(sc).f32Store();
    }
    f.get(yp).i32Const(4).i32Add().set(yp);
    f.get(n).i32Const(1).i32Add().tee(n).get(N).i32LtU().brIf(0);
  });
  return f;
}

/** q40deq(wq, ws, rows, K, dst): rows of a Q4_0 matrix as f32, exactly as ggml's dequantize_row_q4_0. */
function emitQ40Deq(mb: ModuleBuilder): Fn {
  const f = mb.func("q40deq", [I32, I32, I32, I32, I32], [], true);
  const [WQ, WS, ROWS, K, DST] = [0, 1, 2, 3, 4];
  const q = f.local(I32), s = f.local(I32), p = f.local(I32), cnt = f.local(I32);
  const v = f.local(V128), u = f.local(V128), w16 = f.local(V128), d = f.local(V128);
  const m0f = f.local(V128), c8 = f.local(V128);
  f.v128ConstI32(0x0f0f0f0f).set(m0f);
  f.v128ConstI32(0x08080808).set(c8);
  f.get(ROWS).get(K).i32Mul().i32Const(5).i32ShrU().tee(cnt).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(WS).i32Const(0).i32Add().set(s);
  f.get(DST).i32Const(0).i32Add().set(p);
  f.loop(() => {
    f.get(s).f32Load().f32x4Splat().set(d);
    f.get(q).v128Load().set(v);
    q4Quants(f, v, m0f, c8, u, (h) => {
      for (let part = 0; part < 2; part++) {
        f.get(u);
        if (part === 0) f.i16x8ExtendLowI8x16S();
        else f.i16x8ExtendHighI8x16S();
        f.set(w16);
        for (let g = 0; g < 2; g++) {
          f.get(p);
          f.get(w16);
          if (g === 0) f.i32x4ExtendLowI16x8S();
          else f.i32x4ExtendHighI16x8S();
          f.f32x4ConvertI32x4S().get(d).f32x4Mul();
          f.v128Store(4 * (16 * h + 8 * part + 4 * g));
        }
      }
    });
    f.get(q).i32Const(16).i32Add().set(q);
    f.get(s).i32Const(4).i32Add().set(s);
    f.get(p).i32Const(128).i32Add().set(p);
    f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
  });
  return f;
}

// BF16 (Hugging Face checkpoints' usual dtype): W [N, K] (K % 8 == 0) as the file's 2-byte values,
// row after row. A bf16 is the top half of an f32, so widening is exact: u16 → u32, shift left 16.

/** bf16rows_a(px, ldx, wq, ws, py, ldy, N, K, acc): a rows of X against all N rows of a BF16 matrix (ws unused). */
function emitBf16Rows(mb: ModuleBuilder, o: KernelOptions, a: number): Fn {
  const f = mb.func(`bf16rows_${a}`, [I32, I32, I32, I32, I32, I32, I32, I32, I32]);
  const [PX, LDX, WQ, , PY, LDY, N, K, ACC] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
  const xp = Array.from({ length: a }, () => f.local(I32));
  const q = f.local(I32);
  const yp = f.local(I32);
  const n = f.local(I32);
  const cnt = f.local(I32);
  const acc = Array.from({ length: a }, () => [f.local(V128), f.local(V128)] as const);
  const wv = f.local(V128);
  const wf = f.local(V128);
  const xv = f.local(V128);
  const sc = f.local(F32);
  const madd = (accL: number, x: number, w: number) => {
    if (o.relaxed) f.get(x).get(w).get(accL).f32x4RelaxedMadd().set(accL);
    else f.get(accL).get(x).get(w).f32x4Mul().f32x4Add().set(accL);
  };
  f.get(N).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(PY).i32Const(0).i32Add().set(yp);
  f.loop(() => {
    f.get(PX).i32Const(0).i32Add().set(xp[0]!);
    for (let i = 1; i < a; i++) f.get(xp[i - 1]!).get(LDX).i32Add().set(xp[i]!);
    for (const [lo, hi] of acc) {
      f.v128ConstF32(0).set(lo);
      f.v128ConstF32(0).set(hi);
    }
    f.get(K).i32Const(3).i32ShrU().tee(cnt).if(() => {
      f.loop(() => {
        f.get(q).v128Load().set(wv);
        for (let half = 0; half < 2; half++) {
          f.get(wv);
          if (half === 0) f.i32x4ExtendLowI16x8U();
          else f.i32x4ExtendHighI16x8U();
          f.i32Const(16).i32x4Shl().set(wf);
          for (let i = 0; i < a; i++) {
            f.get(xp[i]!).v128Load(16 * half).set(xv);
            madd(acc[i]![half]!, xv, wf);
          }
        }
        f.get(q).i32Const(16).i32Add().set(q);
        for (let i = 0; i < a; i++) f.get(xp[i]!).i32Const(32).i32Add().set(xp[i]!);
        f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
      });
    });
    for (let i = 0; i < a; i++) {
      const [lo, hi] = acc[i]!;
      f.get(lo).get(hi).f32x4Add().set(lo);
      f.get(lo).get(lo).get(lo).shuffle32(2, 3, 0, 1).f32x4Add().set(wf);
      f.get(wf).get(wf).get(wf).shuffle32(1, 0, 3, 2).f32x4Add().f32x4ExtractLane(0).set(sc);
      const yAddr = () => (i === 0 ? f.get(yp) : f.get(yp).get(LDY).i32Const(i).i32Mul().i32Add());
      f.get(ACC).if(() => void yAddr().f32Load().get(sc).f32Add().set(sc));
      yAddr().get(sc).f32Store();
    }
    f.get(yp).i32Const(4).i32Add().set(yp);
    f.get(n).i32Const(1).i32Add().tee(n).get(N).i32LtU().brIf(0);
  });
  return f;
}

/** bf16deq(wq, ws, rows, K, dst): rows of a BF16 matrix as f32 (exact). */
function emitBf16Deq(mb: ModuleBuilder): Fn {
  const f = mb.func("bf16deq", [I32, I32, I32, I32, I32], [], true);
  const [WQ, , ROWS, K, DST] = [0, 1, 2, 3, 4];
  const q = f.local(I32);
  const p = f.local(I32);
  const cnt = f.local(I32);
  const wv = f.local(V128);
  f.get(ROWS).get(K).i32Mul().i32Const(3).i32ShrU().tee(cnt).i32Eqz().if(() => void f.return());
  f.get(WQ).i32Const(0).i32Add().set(q);
  f.get(DST).i32Const(0).i32Add().set(p);
  f.loop(() => {
    f.get(q).v128Load().set(wv);
    f.get(p).get(wv).i32x4ExtendLowI16x8U().i32Const(16).i32x4Shl().v128Store(0);
    f.get(p).get(wv).i32x4ExtendHighI16x8U().i32Const(16).i32x4Shl().v128Store(16);
    f.get(q).i32Const(16).i32Add().set(q);
    f.get(p).i32Const(32).i32Add().set(p);
    f.get(cnt).i32Const(1).i32Sub().tee(cnt).brIf(0);
  });
  return f;
}

/** Emits the Q8_0, Q4_0, Q4_K, Q6_K and BF16 kernels and their drivers (exported); `gemm` is the f32 driver. */
export function emitQuantKernels(mb: ModuleBuilder, o: KernelOptions, gemm: Fn): { qgemm: Fn; q4kgemm: Fn; bf16gemm: Fn; q6kgemm: Fn; q40gemm: Fn } {
  const q8rows = Array.from({ length: o.dmr }, (_, i) => emitQ8Rows(mb, o, i + 1));
  const q8deq = emitQ8Deq(mb);
  const q4rows = Array.from({ length: o.dmr }, (_, i) => emitQ4KRows(mb, o, i + 1));
  const q4deq = emitQ4KDeq(mb);
  const xsums = emitXSums(mb);
  const bfrows = Array.from({ length: o.dmr }, (_, i) => emitBf16Rows(mb, o, i + 1));
  const bfdeq = emitBf16Deq(mb);
  const q6rows = Array.from({ length: o.dmr }, (_, i) => emitQ6KRows(mb, o, i + 1));
  const q6deq = emitQ6KDeq(mb);
  const q40rows = Array.from({ length: o.dmr }, (_, i) => emitQ40Rows(mb, o, i + 1));
  const q40deq = emitQ40Deq(mb);
  return {
    q40gemm: emitDriver(mb, o, gemm, "q40gemm", q40rows, q40deq, null, (g, n0, K) => {
      g.get(n0).get(K).i32Mul().i32Const(1).i32ShrU(); // nibble bytes: n0·K/2
      return () => void g.get(n0).get(K).i32Mul().i32Const(3).i32ShrU(); // scales: n0·K/32·4
    }),
    q6kgemm: emitDriver(mb, o, gemm, "q6kgemm", q6rows, q6deq, null, (g, n0, K) => {
      g.get(n0).get(K).i32Mul().i32Const(8).i32ShrU().i32Const(192).i32Mul(); // n0·K/256·192
      return () => void g.get(n0).get(K).i32Mul().i32Const(8).i32ShrU().i32Const(20).i32Mul(); // n0·K/256·20
    }),
    bf16gemm: emitDriver(mb, o, gemm, "bf16gemm", bfrows, bfdeq, null, (g, n0, K) => {
      g.get(n0).get(K).i32Mul().i32Const(1).i32Shl(); // value bytes: n0·K·2
      return () => void g.i32Const(0); // no scales
    }),
    qgemm: emitDriver(mb, o, gemm, "qgemm", q8rows, q8deq, null, (g, n0, K) => {
      g.get(n0).get(K).i32Mul(); // quant bytes before row n0
      return () => void g.get(n0).get(K).i32Mul().i32Const(3).i32ShrU(); // scale bytes: n0·K/32·4
    }),
    q4kgemm: emitDriver(mb, o, gemm, "q4kgemm", q4rows, q4deq, xsums, (g, n0, K) => {
      g.get(n0).get(K).i32Mul().i32Const(1).i32ShrU(); // nibble bytes: n0·K/2
      return () => void g.get(n0).get(K).i32Mul().i32Const(8).i32ShrU().i32Const(24).i32Mul(); // meta: n0·K/256·24
    }),
  };
}

/**
 * One driver: (x, ldx, wq, ws, y, ldy, M, N, K, flags, scratch, deq, deqRows). M < packMinM: the
 * direct rows kernels (with the rows' xsums in `scratch` first when `xsums` is given); otherwise
 * chunks of deqRows rows dequantized into `deq` and multiplied by the f32 gemm.
 */
function emitDriver(mb: ModuleBuilder, o: KernelOptions, gemm: Fn, name: string, rows: Fn[], deq: Fn, xsums: Fn | null, rowOffsets: (g: Fn, n0: number, K: number) => () => void): Fn {
  const g = mb.func(name, [I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32], [], true);
  const [X, LDX, WQ, WS, Y, LDY, M, N, K, FLAGS, SCR, DEQ, DEQROWS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
  const m = g.local(I32);
  const r = g.local(I32);
  const n0 = g.local(I32);
  g.get(M).i32Eqz().get(N).i32Eqz().i32Or().if(() => void g.return());
  g.get(M).i32Const(o.packMinM).i32LtU().if(
    () => {
      if (xsums) {
        g.get(X).get(LDX).get(M).get(K).get(SCR);
        g.call(xsums);
      }
      // Direct: dmr rows of X at a time against all of W (the rest through a smaller kernel).
      g.loop(() => {
        g.get(M).get(m).i32Sub().set(r);
        g.get(r).i32Const(o.dmr).i32GtU().if(() => void g.i32Const(o.dmr).set(r));
        const call = (fn: Fn) => {
          g.get(X).get(m).get(LDX).i32Mul().i32Add();
          g.get(LDX).get(WQ).get(WS);
          g.get(Y).get(m).get(LDY).i32Mul().i32Add();
          g.get(LDY).get(N).get(K);
          g.get(FLAGS).i32Const(1).i32And();
          if (xsums) g.get(SCR).get(m).get(K).i32Mul().i32Const(3).i32ShrU().i32Add();
          g.call(fn);
        };
        const chain = (a: number) => {
          if (a === o.dmr) return call(rows[a - 1]!);
          g.get(r).i32Const(a).i32Eq().if(() => call(rows[a - 1]!), () => chain(a + 1));
        };
        chain(1);
        g.get(m).get(r).i32Add().tee(m).get(M).i32LtU().brIf(0);
      });
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
