// Derivatives of the block's step kinds (schedule.ts) for the CPU backend: for each kind a VJP
// (reverse mode: cotangent of the output -> cotangent of the inputs) and a JVP (forward mode:
// tangent of the inputs -> tangent of the output). The engine's tape-mode forward records each
// step's buffers; the backward walks the tape in reverse calling these, the forward-mode pass
// walks it forwards. Weights are read in place from the runtime's memory (no copy).
//
// Two kinds of functions:
//  - elementwise and per-row steps (norms, RoPE, activations, site ops, the loss) on Vec views:
//    a subarray of the runtime's memory, or a host array (Float64Array in the float64 tests).
//    A view of the runtime's memory goes stale when an alloc grows it (1 thread: the buffer is
//    detached), so callers take views after their allocations.
//  - matrix products (linear, LoRA, attention, unembedding) on element offsets into the runtime,
//    through its GEMM (Y = X·Wᵀ, W [N, K] row-major).
//
// The backward needs dX = dY·W, a product the kernels do not have (they read W's rows, K
// contiguous). matmulNN transposes W into scratch in chunks of output columns (each chunk at most
// CHUNK_FLOATS, so never a second copy of a whole matrix) and runs the ordinary GEMM on each.
// Why not a transposed kernel: the kernels are tuned per path (packed / direct), and a column-read
// variant would be a new microkernel to tune and test; the transpose reads each weight once per
// product, which next to the product's 2·R flops per weight costs a few percent at training
// batch sizes (R = rows of the batch), and a gradient step is rarely run at R = 1.
import type { Activation, NormSpec } from "../config.js";
import type { LinearName } from "../grad.js";
import type { HostOp } from "../plan.js";
import type { Gemm } from "./runtime.js";

export type Vec = Float32Array | Float64Array;

/** What the matrix-product derivatives need from the kernel runtime (runtime.ts). */
export interface MatRuntime {
  readonly f32: Float32Array;
  alloc(nFloats: number): number;
  mark(): number;
  release(mark: number): void;
  gemm(g: Gemm): void;
}

/** A matrix in the runtime's memory: `rows` × `cols`, rows `ld` floats apart (default cols). */
export interface MatRef {
  off: number;
  rows: number;
  cols: number;
  ld?: number;
}

/** Floats of one transposed chunk (4 MiB): bounds the scratch of matmulNN / matmulTN. */
export const CHUNK_FLOATS = 1 << 20;

// ---------------------------------------------------------------- matrix products

/** dst[j·rows + i] = f[src + i·ld + j] for i < rows, j < cols (blocked for locality). */
function transposeInto(f: Float32Array, src: number, ld: number, rows: number, cols: number, dst: number): void {
  const BS = 32;
  for (let i0 = 0; i0 < rows; i0 += BS) {
    const i1 = Math.min(rows, i0 + BS);
    for (let j0 = 0; j0 < cols; j0 += BS) {
      const j1 = Math.min(cols, j0 + BS);
      for (let i = i0; i < i1; i++) {
        const s = src + i * ld;
        for (let j = j0; j < j1; j++) f[dst + j * rows + i] = f[s + j]!;
      }
    }
  }
}

/**
 * Y[R, K] (+)= A[R, N] · W[N, K] (the backward of Y = X·Wᵀ): W is transposed into scratch in
 * chunks of output columns, each multiplied by the ordinary GEMM. A rows `lda`, Y rows `ldy` apart.
 */
export function matmulNN(rt: MatRuntime, a: number, lda: number, w: MatRef, y: number, ldy: number, R: number, accumulate: boolean): void {
  const N = w.rows, K = w.cols, ldw = w.ld ?? w.cols;
  if (R === 0 || K === 0) return;
  if (N === 0) {
    if (!accumulate) for (let r = 0; r < R; r++) rt.f32.fill(0, y + r * ldy, y + r * ldy + K);
    return;
  }
  const c = Math.max(1, Math.min(K, Math.floor(CHUNK_FLOATS / N)));
  const mark = rt.mark();
  try {
    const wt = rt.alloc(c * N);
    for (let c0 = 0; c0 < K; c0 += c) {
      const n = Math.min(c, K - c0);
      transposeInto(rt.f32, w.off + c0, ldw, N, n, wt);
      rt.gemm({ x: a, ldx: lda, w: wt, ldw: N, y: y + c0, ldy, M: R, N: n, K: N, accumulate });
    }
  } finally {
    rt.release(mark);
  }
}

/**
 * Y[M, N] (+)= Aᵀ · B with A [K, M] (rows lda apart) and B [K, N] (rows ldb apart): a sum over
 * rows (weight gradients, attention's dK and dV). Both are transposed into scratch in chunks of K.
 */
export function matmulTN(rt: MatRuntime, a: number, lda: number, b: number, ldb: number, y: number, ldy: number, M: number, N: number, K: number, accumulate: boolean): void {
  if (M === 0 || N === 0) return;
  if (K === 0) {
    if (!accumulate) for (let m = 0; m < M; m++) rt.f32.fill(0, y + m * ldy, y + m * ldy + N);
    return;
  }
  const kc = Math.max(1, Math.min(K, Math.floor(CHUNK_FLOATS / (M + N))));
  const mark = rt.mark();
  try {
    const at = rt.alloc(M * kc);
    const bt = rt.alloc(N * kc);
    for (let k0 = 0; k0 < K; k0 += kc) {
      const n = Math.min(kc, K - k0);
      const f = rt.f32;
      transposeInto(f, a + k0 * lda, lda, n, M, at);
      transposeInto(f, b + k0 * ldb, ldb, n, N, bt);
      rt.gemm({ x: at, ldx: n, w: bt, ldw: n, y, ldy, M, N, K: n, accumulate: accumulate || k0 > 0 });
    }
  } finally {
    rt.release(mark);
  }
}

/** Y = X·Wᵀ (+ bias), the linear step; also the JVP of a linear map (no bias). */
export function linear(rt: MatRuntime, x: number, ldx: number, w: MatRef, y: number, ldy: number, R: number, bias?: Vec, accumulate = false): void {
  rt.gemm({ x, ldx, w: w.off, ldw: w.ld ?? w.cols, y, ldy, M: R, N: w.rows, K: w.cols, accumulate });
  if (bias) {
    const f = rt.f32;
    for (let r = 0; r < R; r++) for (let n = 0; n < w.rows; n++) f[y + r * ldy + n] = f[y + r * ldy + n]! + bias[n]!;
  }
}

/** VJP of Y = X·Wᵀ + b with respect to X: dX (+)= dY·W. (The bias and W are constants.) */
export function linearVjp(rt: MatRuntime, dy: number, lddy: number, w: MatRef, dx: number, lddx: number, R: number, accumulate = false): void {
  matmulNN(rt, dy, lddy, w, dx, lddx, R, accumulate);
}

/** JVP of Y = X·Wᵀ + b: tY (+)= tX·Wᵀ. */
export function linearJvp(rt: MatRuntime, tx: number, ldtx: number, w: MatRef, ty: number, ldty: number, R: number, accumulate = false): void {
  linear(rt, tx, ldtx, w, ty, ldty, R, undefined, accumulate);
}

// ---------------------------------------------------------------- LoRA

/**
 * A low-rank adapter y += scale·(x·Aᵀ)·Bᵀ with A [rank, in] (rows `lda` apart, default `in`: a
 * column slice of a wider A, e.g. one head's columns of attn.o) and B [out, rank] in the runtime's memory.
 */
export interface LoraRef {
  a: number;
  b: number;
  rank: number;
  in: number;
  out: number;
  scale: number;
  lda?: number;
}

/**
 * The adapter's term: u = x·Aᵀ ([R, rank] at `u`), then y += scale·u·Bᵀ (rows ldy apart).
 * `tmp`: R·rank floats of scratch (u scaled).
 */
export function loraApply(rt: MatRuntime, l: LoraRef, x: number, ldx: number, R: number, u: number, tmp: number, y: number, ldy: number): void {
  rt.gemm({ x, ldx, w: l.a, ldw: l.lda ?? l.in, y: u, ldy: l.rank, M: R, N: l.rank, K: l.in });
  const f = rt.f32;
  for (let i = 0; i < R * l.rank; i++) f[tmp + i] = f[u + i]! * l.scale;
  rt.gemm({ x: tmp, ldx: l.rank, w: l.b, ldw: l.rank, y, ldy, M: R, N: l.out, K: l.rank, accumulate: true });
}

/**
 * VJP of the adapter's term at input x given dY (u = x·Aᵀ is recomputed: R·in·rank flops):
 * dB += scale·dYᵀ·u [out, rank], dA += scale·(dY·B)ᵀ·x [rank, in] (rows `lda` apart, as A), and
 * dX += scale·(dY·B)·A when dx is not null. dA and dB accumulate (one adapter may serve several
 * heads, or several calls); the caller zeroes them first.
 */
export function loraVjp(rt: MatRuntime, l: LoraRef, x: number, ldx: number, dy: number, lddy: number, R: number, dA: number, dB: number, dx: number | null, lddx: number): void {
  const lda = l.lda ?? l.in;
  const mark = rt.mark();
  try {
    const us = rt.alloc(R * l.rank), du = rt.alloc(R * l.rank);
    rt.gemm({ x, ldx, w: l.a, ldw: lda, y: us, ldy: l.rank, M: R, N: l.rank, K: l.in });
    matmulNN(rt, dy, lddy, { off: l.b, rows: l.out, cols: l.rank }, du, l.rank, R, false);
    const f = rt.f32;
    for (let i = 0; i < R * l.rank; i++) {
      f[us + i] = f[us + i]! * l.scale;
      f[du + i] = f[du + i]! * l.scale;
    }
    matmulTN(rt, du, l.rank, x, ldx, dA, lda, l.rank, l.in, R, true);
    matmulTN(rt, dy, lddy, us, l.rank, dB, l.rank, l.out, l.rank, R, true);
    if (dx !== null) matmulNN(rt, du, l.rank, { off: l.a, rows: l.rank, cols: l.in, ld: lda }, dx, lddx, R, true);
  } finally {
    rt.release(mark);
  }
}

/** The key of an adapter on `linear` of block `layer` (a call's adapters map). */
export const adapterKey = (layer: number, linear: LinearName): string => `${layer}:${linear}`;

/** JVP of the adapter's term (A, B constant): tY += scale·(tX·Aᵀ)·Bᵀ. */
export function loraJvp(rt: MatRuntime, l: LoraRef, tx: number, ldtx: number, R: number, ty: number, ldty: number): void {
  const mark = rt.mark();
  try {
    const u = rt.alloc(R * l.rank), tmp = rt.alloc(R * l.rank);
    loraApply(rt, l, tx, ldtx, R, u, tmp, ty, ldty);
  } finally {
    rt.release(mark);
  }
}

// ---------------------------------------------------------------- norms

/** A norm's constants: RMS scales by (weightOffset + weight); LayerNorm by weight, plus bias. */
export interface NormWeights {
  weight: Vec;
  bias?: Vec;
}

/**
 * VJP of y = norm(x) over R rows of D (RMSNorm or LayerNorm per `spec`; the weights constant):
 * dx (+)= J(x)ᵀ·dy. dx may alias dy when not accumulating. Also the per-head qk-norm (R·heads
 * rows of dHead) and the full one (R rows of heads·dHead).
 */
export function normVjp(spec: NormSpec, p: NormWeights, x: Vec, dy: Vec, dx: Vec, R: number, D: number, accumulate = false): void {
  const w = p.weight;
  for (let r = 0; r < R; r++) {
    const o = r * D;
    if (spec.kind === "rms") {
      const off = spec.weightOffset;
      let ss = 0, dot = 0;
      for (let i = 0; i < D; i++) {
        const xi = x[o + i]!;
        ss += xi * xi;
        dot += (off + w[i]!) * dy[o + i]! * xi;
      }
      const inv = 1 / Math.sqrt(ss / D + spec.eps);
      const c = (inv * inv * inv * dot) / D;
      for (let i = 0; i < D; i++) {
        const v = inv * (off + w[i]!) * dy[o + i]! - c * x[o + i]!;
        dx[o + i] = accumulate ? dx[o + i]! + v : v;
      }
    } else {
      let mu = 0;
      for (let i = 0; i < D; i++) mu += x[o + i]!;
      mu /= D;
      let vr = 0;
      for (let i = 0; i < D; i++) vr += (x[o + i]! - mu) ** 2;
      const inv = 1 / Math.sqrt(vr / D + spec.eps);
      let m1 = 0, m2 = 0;
      for (let i = 0; i < D; i++) {
        const g = dy[o + i]! * w[i]!;
        m1 += g;
        m2 += g * (x[o + i]! - mu) * inv;
      }
      m1 /= D;
      m2 /= D;
      for (let i = 0; i < D; i++) {
        const v = inv * (dy[o + i]! * w[i]! - m1 - (x[o + i]! - mu) * inv * m2);
        dx[o + i] = accumulate ? dx[o + i]! + v : v;
      }
    }
  }
}

/**
 * Gradient of a norm's own parameters (a `delta` on them): dw[i] += Σ_r dy[r, i]·x̂[r, i] with
 * x̂ the normalized input (RMS: x/rms; LayerNorm: (x - μ)/σ); a weight offset (Gemma's 1 + w)
 * does not change it. LayerNorm's bias: db[i] += Σ_r dy[r, i]. Either output may be null.
 */
export function normParamGrad(spec: NormSpec, x: Vec, dy: Vec, R: number, D: number, dw: Vec | null, db: Vec | null): void {
  for (let r = 0; r < R; r++) {
    const o = r * D;
    let mu = 0, inv: number;
    if (spec.kind === "rms") {
      let ss = 0;
      for (let i = 0; i < D; i++) ss += x[o + i]! * x[o + i]!;
      inv = 1 / Math.sqrt(ss / D + spec.eps);
    } else {
      for (let i = 0; i < D; i++) mu += x[o + i]!;
      mu /= D;
      let vr = 0;
      for (let i = 0; i < D; i++) vr += (x[o + i]! - mu) ** 2;
      inv = 1 / Math.sqrt(vr / D + spec.eps);
    }
    for (let i = 0; i < D; i++) {
      if (dw) dw[i] = dw[i]! + dy[o + i]! * (x[o + i]! - mu) * inv;
      if (db) db[i] = db[i]! + dy[o + i]!;
    }
  }
}

/** JVP of y = norm(x): ty = J(x)·tx (ty may alias tx). */
export function normJvp(spec: NormSpec, p: NormWeights, x: Vec, tx: Vec, ty: Vec, R: number, D: number): void {
  const w = p.weight;
  for (let r = 0; r < R; r++) {
    const o = r * D;
    if (spec.kind === "rms") {
      let ss = 0, dot = 0;
      for (let i = 0; i < D; i++) {
        ss += x[o + i]! * x[o + i]!;
        dot += x[o + i]! * tx[o + i]!;
      }
      const inv = 1 / Math.sqrt(ss / D + spec.eps);
      const c = (inv * inv * dot) / D;
      for (let i = 0; i < D; i++) ty[o + i] = (spec.weightOffset + w[i]!) * inv * (tx[o + i]! - x[o + i]! * c);
    } else {
      let mu = 0, mt = 0;
      for (let i = 0; i < D; i++) {
        mu += x[o + i]!;
        mt += tx[o + i]!;
      }
      mu /= D;
      mt /= D;
      let vr = 0;
      for (let i = 0; i < D; i++) vr += (x[o + i]! - mu) ** 2;
      const inv = 1 / Math.sqrt(vr / D + spec.eps);
      let m = 0;
      for (let i = 0; i < D; i++) m += (x[o + i]! - mu) * inv * (tx[o + i]! - mt);
      m /= D;
      for (let i = 0; i < D; i++) ty[o + i] = w[i]! * inv * (tx[o + i]! - mt - (x[o + i]! - mu) * inv * m);
    }
  }
}

// ---------------------------------------------------------------- RoPE

/**
 * VJP of rotate-half RoPE on [R, N, hd] with per-row cos/sin [R, hd/2] (each row's own
 * position): the transposed rotation, i.e. rotation by -angle. dx may alias dy.
 */
export function ropeVjp(dy: Vec, dx: Vec, cos: Vec, sin: Vec, R: number, N: number, hd: number): void {
  const half = hd / 2;
  for (let r = 0; r < R; r++)
    for (let n = 0; n < N; n++) {
      const o = (r * N + n) * hd;
      for (let j = 0; j < half; j++) {
        const c = cos[r * half + j]!, s = sin[r * half + j]!;
        const a = dy[o + j]!, b = dy[o + j + half]!;
        dx[o + j] = a * c + b * s;
        dx[o + j + half] = b * c - a * s;
      }
    }
}

/** JVP of RoPE: the same rotation applied to the tangent (ty may alias tx). */
export function ropeJvp(tx: Vec, ty: Vec, cos: Vec, sin: Vec, R: number, N: number, hd: number): void {
  const half = hd / 2;
  for (let r = 0; r < R; r++)
    for (let n = 0; n < N; n++) {
      const o = (r * N + n) * hd;
      for (let j = 0; j < half; j++) {
        const c = cos[r * half + j]!, s = sin[r * half + j]!;
        const a = tx[o + j]!, b = tx[o + j + half]!;
        ty[o + j] = a * c - b * s;
        ty[o + j + half] = b * c + a * s;
      }
    }
}

// ---------------------------------------------------------------- activations

const SQRT_2_OVER_PI = Math.sqrt(2 / Math.PI);
const INV_SQRT_2PI = 1 / Math.sqrt(2 * Math.PI);
const GELU_C = 0.044715;

/** erf to ~1e-7 relative (Numerical Recipes' erfc Chebyshev fit), as the forward's erf GELU. */
export function erf(x: number): number {
  const z = Math.abs(x);
  const t = 1 / (1 + 0.5 * z);
  const r =
    t *
    Math.exp(
      -z * z - 1.26551223 +
        t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))),
    );
  return x >= 0 ? 1 - r : r - 1;
}

/** act(v): the value a gated backward needs (du = dpost·act(g)). */
export function actValue(v: number, a: Activation): number {
  if (a === "silu") return v / (1 + Math.exp(-v));
  if (a === "gelu_tanh") return 0.5 * v * (1 + Math.tanh(SQRT_2_OVER_PI * (v + GELU_C * v * v * v)));
  return 0.5 * v * (1 + erf(v / Math.SQRT2));
}

/** act'(v). The erf GELU's derivative is Φ(v) + v·φ(v) with the exact Gaussian density. */
export function actGrad(v: number, a: Activation): number {
  if (a === "silu") {
    const s = 1 / (1 + Math.exp(-v));
    return s * (1 + v * (1 - s));
  }
  if (a === "gelu_tanh") {
    const th = Math.tanh(SQRT_2_OVER_PI * (v + GELU_C * v * v * v));
    return 0.5 * (1 + th) + 0.5 * v * (1 - th * th) * SQRT_2_OVER_PI * (1 + 3 * GELU_C * v * v);
  }
  return 0.5 * (1 + erf(v / Math.SQRT2)) + v * INV_SQRT_2PI * Math.exp(-0.5 * v * v);
}

/** Row layout of the MLP activation step's buffers: R rows of F, each array's rows `ld` apart. */
export interface ActLayout {
  R: number;
  F: number;
  /** pre (the gate, gated) rows. */
  ldPre: number;
  /** up rows (gated only). */
  ldUp?: number;
  /** post / its cotangent or tangent rows (default F). */
  ldPost?: number;
}

/**
 * VJP of mlpAct: post = act(pre) (plain) or act(pre)·up (gated; `up` non-null). Writes (or adds)
 * dpre, and for gated MLPs dup; the cotangent buffers share pre's and up's row strides.
 */
export function mlpActVjp(act: Activation, L: ActLayout, pre: Vec, up: Vec | null, dpost: Vec, dpre: Vec, dup: Vec | null, accumulate = false): void {
  const { R, F, ldPre } = L;
  const ldUp = L.ldUp ?? F, ldPost = L.ldPost ?? F;
  for (let r = 0; r < R; r++)
    for (let i = 0; i < F; i++) {
      const g = pre[r * ldPre + i]!, d = dpost[r * ldPost + i]!;
      let vg: number;
      if (up) {
        const u = up[r * ldUp + i]!;
        vg = d * u * actGrad(g, act);
        const vu = d * actValue(g, act);
        dup![r * ldUp + i] = accumulate ? dup![r * ldUp + i]! + vu : vu;
      } else vg = d * actGrad(g, act);
      dpre[r * ldPre + i] = accumulate ? dpre[r * ldPre + i]! + vg : vg;
    }
}

/** JVP of mlpAct: tpost = act'(pre)·tpre (·up) (+ act(pre)·tup). tup null: up's tangent is zero. */
export function mlpActJvp(act: Activation, L: ActLayout, pre: Vec, up: Vec | null, tpre: Vec, tup: Vec | null, tpost: Vec): void {
  const { R, F, ldPre } = L;
  const ldUp = L.ldUp ?? F, ldPost = L.ldPost ?? F;
  for (let r = 0; r < R; r++)
    for (let i = 0; i < F; i++) {
      const g = pre[r * ldPre + i]!;
      let t = actGrad(g, act) * tpre[r * ldPre + i]!;
      if (up) {
        t *= up[r * ldUp + i]!;
        if (tup) t += actValue(g, act) * tup[r * ldUp + i]!;
      }
      tpost[r * ldPost + i] = t;
    }
}

// ---------------------------------------------------------------- residual, copy

/** dst[i] += src[i] (the residual step's VJP into its source, and its JVP). */
export function addInto(dst: Vec, src: Vec, n: number): void {
  for (let i = 0; i < n; i++) dst[i] = dst[i]! + src[i]!;
}

// ---------------------------------------------------------------- site ops

/**
 * VJP of a site's compiled plan ops (constants: plan.ts compileHost) on [R, ...feature] with T
 * slots per row, applied in reverse. add: identity; project x - m·(x·u)·u: the same symmetric
 * map on the cotangent; replace (patch, ablate): zero where the mask is set (per head for 2-D
 * features). In place on `d`.
 */
export function siteOpsVjp(ops: readonly HostOp[], d: Vec, R: number, T: number, Fall: number): void {
  for (let i = ops.length - 1; i >= 0; i--) siteOpTangent(ops[i]!, d, R, T, Fall);
}

/** JVP of a site's constant ops (forward order): the same maps as siteOpsVjp. */
export function siteOpsJvp(ops: readonly HostOp[], t: Vec, R: number, T: number, Fall: number): void {
  for (const op of ops) siteOpTangent(op, t, R, T, Fall);
}

/** The linear part of one op (its Jacobian is symmetric, so it serves both directions). */
function siteOpTangent(op: HostOp, d: Vec, R: number, T: number, Fall: number): void {
  if (op.kind === "add") return;
  const N = op.mShape.length === 4 ? op.mShape[2]! : 1;
  const Fh = Fall / N;
  for (let r = 0; r < R; r++) {
    const b = Math.floor(r / T);
    for (let hh = 0; hh < N; hh++) {
      const mv = op.m[r * N + hh]!;
      if (mv === 0) continue;
      const base = r * Fall + hh * Fh;
      if (op.kind === "replace") d.fill(0, base, base + Fh);
      else {
        const u = b * Fall;
        let dot = 0;
        for (let i = 0; i < Fh; i++) dot += d[base + i]! * op.v[u + i]!;
        const c = mv * dot;
        for (let i = 0; i < Fh; i++) d[base + i] = d[base + i]! - c * op.v[u + i]!;
      }
    }
  }
}

/** Gradient of a trainable vector added at a site as x += mask[r]·value: out (+)= Σ_r mask[r]·dy[r]. */
export function vectorGrad(dy: Vec, mask: ArrayLike<number>, R: number, F: number, out: Vec, accumulate = false): void {
  if (!accumulate) out.fill(0, 0, F);
  for (let r = 0; r < R; r++) {
    const m = mask[r]!;
    if (m === 0) continue;
    for (let i = 0; i < F; i++) out[i] = out[i]! + m * dy[r * F + i]!;
  }
}

/** Gradient of a trainable scale s in x += mask[r]·s·vector: Σ_r mask[r]·(dy[r]·vector). */
export function scaleGrad(dy: Vec, mask: ArrayLike<number>, vector: ArrayLike<number>, R: number, F: number): number {
  let g = 0;
  for (let r = 0; r < R; r++) {
    const m = mask[r]!;
    if (m === 0) continue;
    let dot = 0;
    for (let i = 0; i < F; i++) dot += dy[r * F + i]! * vector[i]!;
    g += m * dot;
  }
  return g;
}

/** Tangent of x += mask[r]·s·vector with respect to s: t[r] += mask[r]·vector. */
export function scaleTangent(t: Vec, mask: ArrayLike<number>, vector: ArrayLike<number>, R: number, F: number): void {
  for (let r = 0; r < R; r++) {
    const m = mask[r]!;
    if (m === 0) continue;
    for (let i = 0; i < F; i++) t[r * F + i] = t[r * F + i]! + m * vector[i]!;
  }
}

// ---------------------------------------------------------------- embedding

/**
 * Gradient of the embedding table (only when asked: the table is frozen in every TrainParam):
 * dTable[id] += embedScale·dx[r] for every non-padding slot r.
 */
export function embedVjp(dx: Vec, ids: ArrayLike<number>, pos: ArrayLike<number>, R: number, D: number, embedScale: number, dTable: Vec): void {
  for (let r = 0; r < R; r++) {
    if (pos[r]! < 0) continue;
    const o = ids[r]! * D;
    for (let i = 0; i < D; i++) dTable[o + i] = dTable[o + i]! + embedScale * dx[r * D + i]!;
  }
}

// ---------------------------------------------------------------- attention

/** One call's attention geometry: B rows of T slots (slot t = key t; a full pass from slot 0). */
export interface AttnGeom {
  B: number;
  T: number;
  H: number;
  K: number;
  hd: number;
  /** Left padding per row: keys before it are never seen (a padding query sees itself). */
  pad: readonly number[];
  /** Sliding window (Infinity: none): query t sees keys t - window + 1..t. */
  window: number;
  scale: number;
  softcap?: number;
}

/** First key slot query slot t of row b sees (the forward's rule, engine.ts attention). */
function firstKey(g: AttnGeom, b: number, t: number): number {
  const lo = Math.max(g.pad[b]!, t - g.window + 1);
  return lo <= t ? lo : t;
}

/**
 * Scores q·kᵀ of pair (b, h) into sc [T, T], then probabilities into p [T, T] (masked entries 0).
 * With a softcap, the derivative factor scale·(1 - tanh²) of each visible score goes into `dcap`.
 */
function probs(rt: MatRuntime, g: AttnGeom, q: number, k: number, b: number, h: number, sc: number, p: number, dcap: number): void {
  const { T, H, K, hd } = g;
  const kh = Math.floor(h / (H / K));
  rt.gemm({ x: q + (b * T * H + h) * hd, ldx: H * hd, w: k + (b * T * K + kh) * hd, ldw: K * hd, y: sc, ldy: T, M: T, N: T, K: hd });
  const f = rt.f32;
  for (let t = 0; t < T; t++) {
    const from = firstKey(g, b, t);
    const row = t * T;
    let mx = -Infinity;
    for (let s = from; s <= t; s++) {
      let u = f[sc + row + s]! * g.scale;
      if (g.softcap) {
        const th = Math.tanh(u / g.softcap);
        f[dcap + row + s] = g.scale * (1 - th * th);
        u = th * g.softcap;
      }
      f[p + row + s] = u;
      if (u > mx) mx = u;
    }
    let sum = 0;
    for (let s = from; s <= t; s++) {
      const e = Math.exp(f[p + row + s]! - mx);
      f[p + row + s] = e;
      sum += e;
    }
    for (let s = 0; s < T; s++) f[p + row + s] = s >= from && s <= t ? f[p + row + s]! / sum : 0;
  }
}

/**
 * VJP of the attend step for a full pass: q [B·T, H, hd] and k, v [B·T, K, hd] (after RoPE),
 * dz [B·T, H, hd] -> dq, dk, dv (overwritten; same layouts). Grouped-query heads sum into their
 * shared k/v head. Probabilities are recomputed per (row, head) pair.
 */
export function attentionVjp(rt: MatRuntime, g: AttnGeom, q: number, k: number, v: number, dz: number, dq: number, dk: number, dv: number): void {
  const { B, T, H, K, hd } = g;
  const G = H / K;
  {
    const f = rt.f32;
    f.fill(0, dk, dk + B * T * K * hd);
    f.fill(0, dv, dv + B * T * K * hd);
  }
  const mark = rt.mark();
  try {
    const sc = rt.alloc(T * T), p = rt.alloc(T * T), dp = rt.alloc(T * T), dcap = g.softcap ? rt.alloc(T * T) : 0;
    for (let b = 0; b < B; b++)
      for (let h = 0; h < H; h++) {
        const kh = Math.floor(h / G);
        const qo = q + (b * T * H + h) * hd, zo = dz + (b * T * H + h) * hd;
        const ko = k + (b * T * K + kh) * hd, vo = v + (b * T * K + kh) * hd;
        probs(rt, g, q, k, b, h, sc, p, dcap);
        // dP = dZ·Vᵀ, then dU = P ⊙ (dP - rowsum(P ⊙ dP)) and the score scale (and softcap) factor.
        rt.gemm({ x: zo, ldx: H * hd, w: vo, ldw: K * hd, y: dp, ldy: T, M: T, N: T, K: hd });
        const f = rt.f32;
        for (let t = 0; t < T; t++) {
          const row = t * T;
          let dot = 0;
          for (let s = 0; s <= t; s++) dot += f[p + row + s]! * f[dp + row + s]!;
          for (let s = 0; s < T; s++) {
            const pv = f[p + row + s]!;
            f[dp + row + s] = pv === 0 ? 0 : pv * (f[dp + row + s]! - dot) * (g.softcap ? f[dcap + row + s]! : g.scale);
          }
        }
        matmulNN(rt, dp, T, { off: ko, rows: T, cols: hd, ld: K * hd }, dq + (b * T * H + h) * hd, H * hd, T, false);
        matmulTN(rt, dp, T, qo, H * hd, dk + (b * T * K + kh) * hd, K * hd, T, hd, T, true);
        matmulTN(rt, p, T, zo, H * hd, dv + (b * T * K + kh) * hd, K * hd, T, hd, T, true);
      }
  } finally {
    rt.release(mark);
  }
}

/** JVP of the attend step: tangents tq, tk, tv (same layouts as q, k, v) -> tz [B·T, H, hd] (overwritten). */
export function attentionJvp(rt: MatRuntime, g: AttnGeom, q: number, k: number, v: number, tq: number, tk: number, tv: number, tz: number): void {
  const { B, T, H, K, hd } = g;
  const G = H / K;
  const mark = rt.mark();
  try {
    const sc = rt.alloc(T * T), p = rt.alloc(T * T), tp = rt.alloc(T * T), dcap = g.softcap ? rt.alloc(T * T) : 0;
    for (let b = 0; b < B; b++)
      for (let h = 0; h < H; h++) {
        const kh = Math.floor(h / G);
        const qo = q + (b * T * H + h) * hd, ko = k + (b * T * K + kh) * hd;
        probs(rt, g, q, k, b, h, sc, p, dcap);
        // tS = tq·kᵀ + q·tkᵀ; tU = tS · scale (· softcap factor); tP = P ⊙ (tU - rowsum(P ⊙ tU)).
        rt.gemm({ x: tq + (b * T * H + h) * hd, ldx: H * hd, w: ko, ldw: K * hd, y: tp, ldy: T, M: T, N: T, K: hd });
        rt.gemm({ x: qo, ldx: H * hd, w: tk + (b * T * K + kh) * hd, ldw: K * hd, y: tp, ldy: T, M: T, N: T, K: hd, accumulate: true });
        const f = rt.f32;
        for (let t = 0; t < T; t++) {
          const row = t * T;
          let dot = 0;
          for (let s = 0; s <= t; s++) {
            const pv = f[p + row + s]!;
            if (pv === 0) continue;
            const u = f[tp + row + s]! * (g.softcap ? f[dcap + row + s]! : g.scale);
            f[tp + row + s] = u;
            dot += pv * u;
          }
          for (let s = 0; s < T; s++) {
            const pv = f[p + row + s]!;
            f[tp + row + s] = pv === 0 ? 0 : pv * (f[tp + row + s]! - dot);
          }
        }
        // tZ = tP·V + P·tV.
        const zo = tz + (b * T * H + h) * hd;
        matmulNN(rt, tp, T, { off: v + (b * T * K + kh) * hd, rows: T, cols: hd, ld: K * hd }, zo, H * hd, T, false);
        matmulNN(rt, p, T, { off: tv + (b * T * K + kh) * hd, rows: T, cols: hd, ld: K * hd }, zo, H * hd, T, true);
      }
  } finally {
    rt.release(mark);
  }
}

// ---------------------------------------------------------------- the head and the loss

/**
 * Mean cross-entropy of `n` rows of logits [n, V] (after the final softcap, if any) against
 * `targets` (one per row), weighted by `weight` each (1 / the number of targets of the call).
 * Returns Σ weight·(-log p(target)) and writes the cotangent of the uncapped logits into `d`
 * (may alias `logits`): weight·(softmax - onehot), times 1 - (capped/cap)² under a softcap.
 */
export function crossEntropyVjp(logits: Vec, targets: ArrayLike<number>, n: number, V: number, weight: number, d: Vec, softcap?: number): number {
  let loss = 0;
  for (let r = 0; r < n; r++) {
    const o = r * V;
    const t = targets[r]!;
    let mx = -Infinity;
    for (let i = 0; i < V; i++) if (logits[o + i]! > mx) mx = logits[o + i]!;
    let sum = 0;
    for (let i = 0; i < V; i++) sum += Math.exp(logits[o + i]! - mx);
    const lse = mx + Math.log(sum);
    loss += weight * (lse - logits[o + t]!);
    for (let i = 0; i < V; i++) {
      const c = logits[o + i]!;
      let g = weight * (Math.exp(c - lse) - (i === t ? 1 : 0));
      if (softcap) g *= 1 - (c / softcap) * (c / softcap);
      d[o + i] = g;
    }
  }
  return loss;
}
