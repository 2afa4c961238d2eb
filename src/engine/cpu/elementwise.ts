// The per-token work between matrix products, as Wasm SIMD kernels on the engine's memory:
// RMSNorm, SwiGLU/GeGLU, GELU, residual add and the attention softmax. In plain TypeScript these
// took ~25% of a 128-token prefill (Math.exp in SiLU and softmax above all); here they are 4 lanes
// wide with a Cephes-style exp (~1 ulp). They run on the calling thread: they are a few percent
// of the work once vectorised, and the matrix products around them are threaded.
//
// All pointers are f32 element offsets into the memory (converted to bytes here).
import { F32, I32, ModuleBuilder, V128, type Fn, type ValType } from "./wasm-emit.js";

export type GatedAct = "silu" | "gelu_tanh";

export interface Elementwise {
  /** dst[r] = src[r] / rms(src[r]) · (offset + w), R rows of D (dst may alias src). */
  rmsnorm(src: number, dst: number, w: number, R: number, D: number, eps: number, offset: 0 | 1): void;
  /** out[r, i] = act(g[r, i]) · u[r, i] for R rows of F, rows ldg/ldu/ldo apart. */
  gated(g: number, ldg: number, u: number, ldu: number, out: number, ldo: number, R: number, F: number, act: GatedAct): void;
  /** p[i] = gelu_tanh(p[i]) for n values. */
  geluTanh(p: number, n: number): void;
  /** x[i] += y[i] for n values. */
  add(x: number, y: number, n: number): void;
  /**
   * Attention softmax of one score row of n slots: entries from..to (inclusive) become
   * softmax(scale · x), the rest 0.
   */
  softmax(p: number, n: number, from: number, to: number, scale: number): void;
  /** Rotate-half RoPE in place on x [R, N, dHead] with cos/sin [R, dHead/2] (dHead/2 a multiple of 4 or not). */
  rope(x: number, cos: number, sin: number, R: number, N: number, hd: number): void;
  /** dst[i · stride] = src[i] for i < n (a transposed cache write). */
  scatter(src: number, dst: number, n: number, stride: number): void;
  /** Σ a[i]·b[i] over n (f32, 4 lanes). */
  dot(a: number, b: number, n: number): number;
  /** y[i] += alpha · x[i] over n (the product rounded to f32, then added: jax's x + m·v). */
  axpy(y: number, x: number, n: number, alpha: number): void;
}

const LOG2E = Math.LOG2E;
const EXP_HI = 88.3762626647949;
const EXP_LO = -87.3365447505531; // keeps 2^n normal (n >= -126)
const C1 = 0.693359375;
const C2 = -2.12194440e-4;
const P = [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1];
const GELU_K = Math.sqrt(2 / Math.PI);

/**
 * Emits exp of the v128 in local `x` onto the stack (clobbers x and the temps). Below EXP_LO the
 * result is exactly 0 (as expf underflows), NaN stays NaN.
 */
function vexp(f: Fn, x: number, t: { fx: number; r: number; m: number }): void {
  f.get(x).v128ConstF32(EXP_LO).f32x4Lt().set(t.m);
  f.get(x).v128ConstF32(EXP_HI).f32x4Min().v128ConstF32(EXP_LO).f32x4Max().set(x);
  f.get(x).v128ConstF32(LOG2E).f32x4Mul().f32x4Nearest().set(t.fx);
  f.get(x).get(t.fx).v128ConstF32(C1).f32x4Mul().f32x4Sub().get(t.fx).v128ConstF32(C2).f32x4Mul().f32x4Sub().set(t.r);
  f.v128ConstF32(P[0]!);
  for (let i = 1; i < P.length; i++) f.get(t.r).f32x4Mul().v128ConstF32(P[i]!).f32x4Add();
  // y = p·r² + r + 1, times 2^fx built in the exponent bits.
  f.get(t.r).get(t.r).f32x4Mul().f32x4Mul().get(t.r).f32x4Add().v128ConstF32(1).f32x4Add();
  f.get(t.fx).i32x4TruncSatF32x4S().v128ConstI32(127).i32x4Add().i32Const(23).i32x4Shl().f32x4Mul();
  f.get(t.m).v128AndNot();
}

/** Emits act(v) for the v128 in local `v`, leaving it on the stack. */
function vact(f: Fn, v: number, act: GatedAct, t: { e: number; fx: number; r: number; m: number }): void {
  if (act === "silu") {
    // v / (1 + exp(-v))
    f.v128ConstF32(0).get(v).f32x4Sub().set(t.e);
    f.get(v);
    vexp(f, t.e, t);
    f.v128ConstF32(1).f32x4Add().f32x4Div();
    return;
  }
  // 0.5 v (1 + tanh(y)) with y = k (v + 0.044715 v³) is v · sigmoid(2y) = v / (1 + exp(-2y)):
  // no cancellation in the negative tail (1 + tanh(y) → 0).
  f.get(v).get(v).f32x4Mul().get(v).f32x4Mul().v128ConstF32(0.044715).f32x4Mul().get(v).f32x4Add().v128ConstF32(-2 * GELU_K).f32x4Mul().set(t.e);
  f.get(v);
  vexp(f, t.e, t);
  f.v128ConstF32(1).f32x4Add().f32x4Div();
}

/**
 * A loop over i in [0, n) stepping 4 while i + 4 <= n, then one lane at a time: `body(addr, lanes)`
 * emits the work for byte offset `addr` (a local) and 4 or 1 lanes.
 */
function lanes(f: Fn, n: number, i: number, body: (lanes: 4 | 1) => void): void {
  f.i32Const(0).set(i);
  f.block(() =>
    f.loop(() => {
      f.get(i).i32Const(4).i32Add().get(n).i32GtU().brIf(1);
      body(4);
      f.get(i).i32Const(4).i32Add().set(i);
      f.br(0);
    }),
  );
  f.block(() =>
    f.loop(() => {
      f.get(i).get(n).i32GeU().brIf(1);
      body(1);
      f.get(i).i32Const(1).i32Add().set(i);
      f.br(0);
    }),
  );
}

/** Load 4 lanes, or 1 lane splatted, from byte address on the stack. */
function load(f: Fn, k: 4 | 1): void {
  if (k === 4) f.v128Load();
  else f.f32Load().f32x4Splat();
}
/** Store the v128 in local `v` (4 lanes, or lane 0) at the byte address on the stack. */
function store(f: Fn, v: number, k: 4 | 1): void {
  if (k === 4) f.get(v).v128Store();
  else f.get(v).f32x4ExtractLane(0).f32Store();
}

/** The functions emitElementwise adds to a module (exported under these names). */
export type ElementwiseFns = Record<"add" | "rmsnorm" | "gated_silu" | "gated_gelu_tanh" | "gelu_tanh" | "softmax" | "rope" | "scatter" | "dot" | "axpy", Fn>;

/**
 * Emits the elementwise kernels into `m`: their own module here, and the GEMM module too, whose
 * task list runs them on worker threads (kernels.ts).
 */
export function emitElementwise(mb: ModuleBuilder): ElementwiseFns {
  const fns: Partial<ElementwiseFns> = {};
  const m = {
    func(name: keyof ElementwiseFns, params: readonly ValType[], results: readonly ValType[], exported: boolean): Fn {
      return (fns[name] = mb.func(name, params, results, exported));
    },
  };
  const addr = (f: Fn, base: number, i: number) => f.get(base).get(i).i32Const(2).i32Shl().i32Add();

  // add(x, y, n)
  {
    const f = m.func("add", [I32, I32, I32], [], true);
    const [x, y, n] = [0, 1, 2];
    const i = f.local(I32), v = f.local(V128);
    lanes(f, n, i, (k) => {
      addr(f, x, i);
      load(f, k);
      addr(f, y, i);
      load(f, k);
      f.f32x4Add().set(v);
      addr(f, x, i);
      store(f, v, k);
    });
  }

  // rmsnorm(src, dst, w, D, eps, offset) — one row; JS loops rows.
  {
    const f = m.func("rmsnorm", [I32, I32, I32, I32, F32, F32], [], true);
    const [src, dst, w, D, eps, off] = [0, 1, 2, 3, 4, 5];
    const i = f.local(I32), acc = f.local(V128), v = f.local(V128), inv = f.local(F32), sc = f.local(V128);
    f.v128ConstF32(0).set(acc);
    lanes(f, D, i, (k) => {
      addr(f, src, i);
      if (k === 4) f.v128Load();
      else f.v128Load32Zero();
      f.set(v).get(v).get(v).f32x4Mul().get(acc).f32x4Add().set(acc);
    });
    // inv = 1 / sqrt(sum / D + eps)
    f.f32Const(1);
    f.get(acc).f32x4ExtractLane(0).get(acc).f32x4ExtractLane(1).f32Add().get(acc).f32x4ExtractLane(2).f32Add().get(acc).f32x4ExtractLane(3).f32Add();
    f.get(D).f32ConvertI32U().f32Div().get(eps).f32Add().f32Sqrt().f32Div().set(inv);
    f.get(inv).f32x4Splat().set(sc);
    lanes(f, D, i, (k) => {
      addr(f, src, i);
      load(f, k);
      f.get(sc).f32x4Mul();
      addr(f, w, i);
      load(f, k);
      f.get(off).f32x4Splat().f32x4Add().f32x4Mul().set(v);
      addr(f, dst, i);
      store(f, v, k);
    });
  }

  // gated(g, u, out, F, act) — one row.
  for (const act of ["silu", "gelu_tanh"] as const) {
    const f = m.func(`gated_${act}`, [I32, I32, I32, I32], [], true);
    const [g, u, out, F] = [0, 1, 2, 3];
    const i = f.local(I32), v = f.local(V128), t = { e: f.local(V128), fx: f.local(V128), r: f.local(V128), m: f.local(V128) };
    lanes(f, F, i, (k) => {
      addr(f, g, i);
      load(f, k);
      f.set(v);
      vact(f, v, act, t);
      addr(f, u, i);
      load(f, k);
      f.f32x4Mul().set(v);
      addr(f, out, i);
      store(f, v, k);
    });
  }

  // gelu_tanh in place over n.
  {
    const f = m.func("gelu_tanh", [I32, I32], [], true);
    const [p, n] = [0, 1];
    const i = f.local(I32), v = f.local(V128), t = { e: f.local(V128), fx: f.local(V128), r: f.local(V128), m: f.local(V128) };
    lanes(f, n, i, (k) => {
      addr(f, p, i);
      load(f, k);
      f.set(v);
      vact(f, v, "gelu_tanh", t);
      f.set(v);
      addr(f, p, i);
      store(f, v, k);
    });
  }

  // softmax(p, n, from, to, scale): entries from..to of the row.
  {
    const f = m.func("softmax", [I32, I32, I32, I32, F32], [], true);
    const [p, n, from, to, scale] = [0, 1, 2, 3, 4];
    const i = f.local(I32), cnt = f.local(I32), base = f.local(I32), v = f.local(V128), mx = f.local(V128), sum = f.local(V128), s = f.local(F32), tail = f.local(F32);
    const t = { fx: f.local(V128), r: f.local(V128), m: f.local(V128) };
    // The live range [from, to] as base..base+cnt.
    f.get(p).get(from).i32Const(2).i32Shl().i32Add().set(base);
    f.get(to).get(from).i32Sub().i32Const(1).i32Add().set(cnt);
    // Pass 1: scale in place, running max (a lone lane is splatted, so it cannot under-count).
    f.v128ConstF32(-Infinity).set(mx);
    lanes(f, cnt, i, (k) => {
      addr(f, base, i);
      load(f, k);
      f.get(scale).f32x4Splat().f32x4Mul().set(v);
      f.get(v).get(mx).f32x4Max().set(mx);
      addr(f, base, i);
      store(f, v, k);
    });
    f.get(mx).f32x4ExtractLane(0).get(mx).f32x4ExtractLane(1).f32Max().get(mx).f32x4ExtractLane(2).f32Max().get(mx).f32x4ExtractLane(3).f32Max().f32x4Splat().set(mx);
    // Pass 2: e = exp(x - max), summed (a lone lane into a scalar, so it counts once).
    f.v128ConstF32(0).set(sum);
    lanes(f, cnt, i, (k) => {
      addr(f, base, i);
      load(f, k);
      f.get(mx).f32x4Sub().set(v);
      vexp(f, v, t);
      f.set(v);
      if (k === 4) f.get(v).get(sum).f32x4Add().set(sum);
      else f.get(v).f32x4ExtractLane(0).get(tail).f32Add().set(tail);
      addr(f, base, i);
      store(f, v, k);
    });
    f.f32Const(1);
    f.get(sum).f32x4ExtractLane(0).get(sum).f32x4ExtractLane(1).f32Add().get(sum).f32x4ExtractLane(2).f32Add().get(sum).f32x4ExtractLane(3).f32Add().get(tail).f32Add();
    f.f32Div().set(s);
    // Pass 3: normalise.
    f.get(s).f32x4Splat().set(mx);
    lanes(f, cnt, i, (k) => {
      addr(f, base, i);
      load(f, k);
      f.get(mx).f32x4Mul().set(v);
      addr(f, base, i);
      store(f, v, k);
    });
    // Zero the masked entries: [0, from) and (to, n).
    f.v128ConstF32(0).set(v);
    lanes(f, from, i, (k) => {
      addr(f, p, i);
      store(f, v, k);
    });
    f.get(p).get(to).i32Const(1).i32Add().i32Const(2).i32Shl().i32Add().set(base);
    f.get(n).get(to).i32Sub().i32Const(1).i32Sub().set(cnt);
    lanes(f, cnt, i, (k) => {
      addr(f, base, i);
      store(f, v, k);
    });
  }
  // rope(x, cos, sin, N, half): one row (token) of N heads; cos/sin hold `half` values.
  {
    const f = m.func("rope", [I32, I32, I32, I32, I32], [], true);
    const [x, cos, sin, N, half] = [0, 1, 2, 3, 4];
    const n = f.local(I32), i = f.local(I32), a = f.local(I32), x1 = f.local(V128), x2 = f.local(V128), cs = f.local(V128), sn = f.local(V128), o = f.local(V128);
    f.i32Const(0).set(n);
    f.block(() =>
      f.loop(() => {
        f.get(n).get(N).i32GeU().brIf(1);
        // a = x + n · 2·half floats
        f.get(x).get(n).get(half).i32Mul().i32Const(3).i32Shl().i32Add().set(a);
        lanes(f, half, i, (k) => {
          const hb = () => f.get(half).i32Const(2).i32Shl().i32Add();
          addr(f, a, i);
          load(f, k);
          f.set(x1);
          addr(f, a, i);
          hb();
          load(f, k);
          f.set(x2);
          addr(f, cos, i);
          load(f, k);
          f.set(cs);
          addr(f, sin, i);
          load(f, k);
          f.set(sn);
          f.get(x1).get(cs).f32x4Mul().get(x2).get(sn).f32x4Mul().f32x4Sub().set(o);
          addr(f, a, i);
          store(f, o, k);
          f.get(x2).get(cs).f32x4Mul().get(x1).get(sn).f32x4Mul().f32x4Add().set(o);
          addr(f, a, i);
          hb();
          store(f, o, k);
        });
        f.get(n).i32Const(1).i32Add().set(n);
        f.br(0);
      }),
    );
  }

  // scatter(src, dst, n, stride): dst[i·stride] = src[i].
  {
    const f = m.func("scatter", [I32, I32, I32, I32], [], true);
    const [src, dst, n, stride] = [0, 1, 2, 3];
    const i = f.local(I32), d = f.local(I32);
    f.get(dst).set(d);
    f.i32Const(0).set(i);
    f.block(() =>
      f.loop(() => {
        f.get(i).get(n).i32GeU().brIf(1);
        f.get(d);
        addr(f, src, i);
        f.f32Load().f32Store();
        f.get(d).get(stride).i32Const(2).i32Shl().i32Add().set(d);
        f.get(i).i32Const(1).i32Add().set(i);
        f.br(0);
      }),
    );
  }
  // dot(a, b, n) -> f32
  {
    const f = m.func("dot", [I32, I32, I32], [F32], true);
    const [a, b, n] = [0, 1, 2];
    const i = f.local(I32), acc = f.local(V128);
    f.v128ConstF32(0).set(acc);
    lanes(f, n, i, (k) => {
      addr(f, a, i);
      if (k === 4) f.v128Load();
      else f.v128Load32Zero();
      addr(f, b, i);
      if (k === 4) f.v128Load();
      else f.v128Load32Zero();
      f.f32x4Mul().get(acc).f32x4Add().set(acc);
    });
    f.get(acc).f32x4ExtractLane(0).get(acc).f32x4ExtractLane(1).f32Add().get(acc).f32x4ExtractLane(2).f32Add().get(acc).f32x4ExtractLane(3).f32Add();
  }

  // axpy(y, x, n, alpha): y += alpha·x
  {
    const f = m.func("axpy", [I32, I32, I32, F32], [], true);
    const [y, x, n, alpha] = [0, 1, 2, 3];
    const i = f.local(I32), v = f.local(V128), al = f.local(V128);
    f.get(alpha).f32x4Splat().set(al);
    lanes(f, n, i, (k) => {
      addr(f, y, i);
      load(f, k);
      addr(f, x, i);
      load(f, k);
      f.get(al).f32x4Mul().f32x4Add().set(v);
      addr(f, y, i);
      store(f, v, k);
    });
  }
  return fns as ElementwiseFns;
}

function build(shared: boolean): Uint8Array<ArrayBuffer> {
  const m = new ModuleBuilder({ initialPages: 1, maximumPages: 65536, shared });
  emitElementwise(m);
  return m.emit();
}

interface Exports {
  add(x: number, y: number, n: number): void;
  rmsnorm(src: number, dst: number, w: number, D: number, eps: number, off: number): void;
  gated_silu(g: number, u: number, out: number, F: number): void;
  gated_gelu_tanh(g: number, u: number, out: number, F: number): void;
  gelu_tanh(p: number, n: number): void;
  softmax(p: number, n: number, from: number, to: number, scale: number): void;
  rope(x: number, cos: number, sin: number, N: number, half: number): void;
  scatter(src: number, dst: number, n: number, stride: number): void;
  dot(a: number, b: number, n: number): number;
  axpy(y: number, x: number, n: number, alpha: number): void;
}

/** Instantiates the kernels on `memory` (shared or not, as the runtime made it). */
export function elementwise(memory: WebAssembly.Memory, shared: boolean): Elementwise {
  const mod = new WebAssembly.Module(build(shared));
  const e = new WebAssembly.Instance(mod, { env: { memory } }).exports as unknown as Exports;
  return {
    rmsnorm(src, dst, w, R, D, eps, offset) {
      for (let r = 0; r < R; r++) e.rmsnorm((src + r * D) * 4, (dst + r * D) * 4, w * 4, D, eps, offset);
    },
    gated(g, ldg, u, ldu, out, ldo, R, F, act) {
      const k = act === "silu" ? e.gated_silu : e.gated_gelu_tanh;
      for (let r = 0; r < R; r++) k((g + r * ldg) * 4, (u + r * ldu) * 4, (out + r * ldo) * 4, F);
    },
    geluTanh: (p, n) => e.gelu_tanh(p * 4, n),
    add: (x, y, n) => e.add(x * 4, y * 4, n),
    softmax: (p, n, from, to, scale) => e.softmax(p * 4, n, from, to, scale),
    rope(x, cos, sin, R, N, hd) {
      const half = hd / 2;
      for (let r = 0; r < R; r++) e.rope((x + r * N * hd) * 4, (cos + r * half) * 4, (sin + r * half) * 4, N, half);
    },
    scatter: (src, dst, n, stride) => e.scatter(src * 4, dst * 4, n, stride),
    dot: (a, b, n) => e.dot(a * 4, b * 4, n),
    axpy: (y, x, n, alpha) => e.axpy(y * 4, x * 4, n, alpha),
  };
}
