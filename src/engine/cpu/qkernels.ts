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

/** Bytes of each thread's dequantization area (chunks of W rows as f32 for the prefill path). */
export const DEQ_BYTES = 1 << 20;
/** Rows of a Q8_0 matrix with K columns dequantized per chunk. */
export const deqRowsFor = (K: number) => Math.max(1, Math.floor(DEQ_BYTES / (4 * K)));
/** Largest K a Q8_0 matrix may have here (one row must fit the dequantization area). */
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

/** Emits q8rows_*, q8deq and qgemm (exported) into `mb`; `gemm` is the f32 driver. */
export function emitQuantKernels(mb: ModuleBuilder, o: KernelOptions, gemm: Fn): { qgemm: Fn } {
  const rows = Array.from({ length: o.dmr }, (_, i) => emitQ8Rows(mb, o, i + 1));
  const deq = emitQ8Deq(mb);
  const g = mb.func("qgemm", [I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32, I32], [], true);
  const [X, LDX, WQ, WS, Y, LDY, M, N, K, FLAGS, SCR, DEQ, DEQROWS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
  const m = g.local(I32);
  const r = g.local(I32);
  const n0 = g.local(I32);
  g.get(M).i32Eqz().get(N).i32Eqz().i32Or().if(() => void g.return());
  g.get(M).i32Const(o.packMinM).i32LtU().if(
    () => {
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
        g.get(WQ).get(n0).get(K).i32Mul().i32Add();
        g.get(WS).get(n0).get(K).i32Mul().i32Const(3).i32ShrU().i32Add();
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
  return { qgemm: g };
}
