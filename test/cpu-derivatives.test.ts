// The CPU backend's step derivatives (src/engine/cpu/derivatives.ts): every VJP and JVP against
// float64 central finite differences of an independent float64 forward written here, on small
// random inputs. Host-array functions run once in float64 (tolerance 1e-7: only the differences'
// own error is left) and once in float32 as the engine calls them; the matrix-product ones
// (linear, LoRA, attention, unembedding) run on a CpuRuntime in float32 (tolerance 1e-4, the
// issue's bound), on 1 and 2 threads, with shapes that cross the transposition chunks.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { CpuRuntime } from "../src/engine/cpu/runtime.js";
import {
  actValue,
  addInto,
  attentionJvp,
  attentionVjp,
  CHUNK_FLOATS,
  crossEntropyVjp,
  embedVjp,
  linear,
  linearJvp,
  linearVjp,
  loraApply,
  loraJvp,
  loraVjp,
  matmulTN,
  mlpActJvp,
  mlpActVjp,
  normJvp,
  normVjp,
  ropeJvp,
  ropeVjp,
  scaleGrad,
  scaleTangent,
  siteOpsJvp,
  siteOpsVjp,
  vectorGrad,
  type AttnGeom,
} from "../src/engine/cpu/derivatives.js";
import type { Activation, NormSpec } from "../src/engine/config.js";
import type { HostOp } from "../src/engine/plan.js";
import { prng } from "./support/prng.js";

// ---------------------------------------------------------------- helpers

function rand(n: number, seed: number, scale = 1): Float64Array {
  const u = prng(seed);
  return Float64Array.from({ length: n }, () => (u() * 2 - 1) * scale);
}
/** Rounded to float32 and back, so float32 and float64 computations see the same inputs. */
const r32 = (a: ArrayLike<number>): Float64Array => Float64Array.from(Float32Array.from(a));
const dot = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
};

const H_FD = 1e-5;

/** Central differences of a scalar function: the gradient at x. */
function fdGrad(L: (x: Float64Array) => number, x: Float64Array, h = H_FD): Float64Array {
  const g = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const xp = x.slice(), xm = x.slice();
    xp[i]! += h;
    xm[i]! -= h;
    g[i] = (L(xp) - L(xm)) / (2 * h);
  }
  return g;
}

/** Central differences along a direction: the JVP of F at x along t. */
function fdJvp(F: (x: Float64Array) => Float64Array, x: Float64Array, t: ArrayLike<number>, h = H_FD): Float64Array {
  const xp = x.map((v, i) => v + h * t[i]!), xm = x.map((v, i) => v - h * t[i]!);
  const a = F(xp), b = F(xm);
  return a.map((v, i) => (v - b[i]!) / (2 * h));
}

/** max |a - b| / max |b|: the relative error of a whole array. */
function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length, "lengths differ");
  let d = 0, m = 0;
  for (let i = 0; i < a.length; i++) {
    const e = Math.abs(a[i]! - b[i]!);
    if (Number.isNaN(e)) return NaN;
    d = Math.max(d, e);
    m = Math.max(m, Math.abs(b[i]!));
  }
  return m === 0 ? d : d / m;
}

function close(a: ArrayLike<number>, b: ArrayLike<number>, tol: number, what: string): void {
  const e = relErr(a, b);
  assert.ok(e <= tol, `${what}: relative error ${e.toExponential(2)} > ${tol}`);
  // A reference that is all zeros would make the comparison vacuous.
  assert.ok([...Array.from(b)].some((v) => v !== 0), `${what}: the reference is all zeros`);
}

const F64_TOL = 1e-7;
const F32_TOL = 1e-4;

// ---------------------------------------------------------------- float64 forwards

function normF(spec: NormSpec, w: ArrayLike<number>, bias: ArrayLike<number> | undefined, x: Float64Array, R: number, D: number): Float64Array {
  const y = new Float64Array(R * D);
  for (let r = 0; r < R; r++) {
    const row = x.subarray(r * D, (r + 1) * D);
    if (spec.kind === "rms") {
      const inv = 1 / Math.sqrt(dot(row, row) / D + spec.eps);
      for (let i = 0; i < D; i++) y[r * D + i] = row[i]! * inv * (spec.weightOffset + w[i]!);
    } else {
      const mu = row.reduce((a, b) => a + b, 0) / D;
      const vr = row.reduce((a, b) => a + (b - mu) ** 2, 0) / D;
      const inv = 1 / Math.sqrt(vr + spec.eps);
      for (let i = 0; i < D; i++) y[r * D + i] = (row[i]! - mu) * inv * w[i]! + (bias ? bias[i]! : 0);
    }
  }
  return y;
}

function ropeF(x: Float64Array, cos: ArrayLike<number>, sin: ArrayLike<number>, R: number, N: number, hd: number): Float64Array {
  const y = new Float64Array(x.length), half = hd / 2;
  for (let r = 0; r < R; r++)
    for (let n = 0; n < N; n++)
      for (let j = 0; j < half; j++) {
        const o = (r * N + n) * hd, c = cos[r * half + j]!, s = sin[r * half + j]!;
        y[o + j] = x[o + j]! * c - x[o + j + half]! * s;
        y[o + j + half] = x[o + j + half]! * c + x[o + j]! * s;
      }
  return y;
}

/** y[R, N] = x[R, K]·wᵀ. */
function mm(x: ArrayLike<number>, w: ArrayLike<number>, R: number, N: number, K: number): Float64Array {
  const y = new Float64Array(R * N);
  for (let r = 0; r < R; r++) for (let n = 0; n < N; n++) {
    let s = 0;
    for (let k = 0; k < K; k++) s += x[r * K + k]! * w[n * K + k]!;
    y[r * N + n] = s;
  }
  return y;
}

/** Attention for a full pass, float64, straight from the definition (mask built per query). */
function attentionF(g: AttnGeom, q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>): Float64Array {
  const { B, T, H, K, hd } = g;
  const z = new Float64Array(B * T * H * hd);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++) {
      const kh = Math.floor((h * K) / H);
      for (let t = 0; t < T; t++) {
        const vis: number[] = [];
        for (let s = 0; s <= t; s++) if (s >= g.pad[b]! && t - s < g.window) vis.push(s);
        if (vis.length === 0) vis.push(t); // a padding query sees itself
        const u = vis.map((s) => {
          let d = 0;
          for (let i = 0; i < hd; i++) d += q[((b * T + t) * H + h) * hd + i]! * k[((b * T + s) * K + kh) * hd + i]!;
          d *= g.scale;
          return g.softcap ? g.softcap * Math.tanh(d / g.softcap) : d;
        });
        const mx = Math.max(...u);
        const e = u.map((a) => Math.exp(a - mx));
        const sum = e.reduce((a, c) => a + c, 0);
        vis.forEach((s, j) => {
          for (let i = 0; i < hd; i++) z[((b * T + t) * H + h) * hd + i]! += (e[j]! / sum) * v[((b * T + s) * K + kh) * hd + i]!;
        });
      }
    }
  return z;
}

// ---------------------------------------------------------------- host-array steps

describe("norm VJP / JVP (RMS with weight offsets 0 and 1, LayerNorm with bias; per-head and full qk-norm shapes)", () => {
  const specs: [string, NormSpec][] = [
    ["rms, offset 0", { kind: "rms", eps: 1e-6, weightOffset: 0 }],
    ["rms, offset 1 (Gemma)", { kind: "rms", eps: 1e-6, weightOffset: 1 }],
    ["layer (GPT-2)", { kind: "layer", eps: 1e-5 }],
  ];
  // [R, D]: a plain norm (R rows of dModel), a per-head qk-norm (R·heads rows of dHead), a full qk-norm (R rows of heads·dHead).
  const shapes: [string, number, number][] = [
    ["R=3, D=8", 3, 8],
    ["per-head: 3 slots x 2 heads of 4", 6, 4],
    ["full: 3 slots of 2 heads x 4", 3, 8],
  ];
  for (const [name, spec] of specs)
    for (const [sname, R, D] of shapes)
      test(`${name}, ${sname}`, () => {
        const x = rand(R * D, 1 + R + D, 2), w = rand(D, 7, 0.5).map((v) => v + (spec.kind === "rms" && spec.weightOffset === 1 ? 0 : 1));
        const bias = spec.kind === "layer" ? rand(D, 9) : undefined;
        const dy = rand(R * D, 11), t = rand(R * D, 13);
        const ref = fdGrad((xx) => dot(dy, normF(spec, w, bias, xx, R, D)), x);
        const p = bias ? { weight: w, bias } : { weight: w };
        const dx = new Float64Array(R * D);
        normVjp(spec, p, x, dy, dx, R, D);
        close(dx, ref, F64_TOL, "VJP (float64)");
        // Accumulating adds to what is there.
        const acc = new Float64Array(R * D).fill(0.25);
        normVjp(spec, p, x, dy, acc, R, D, true);
        close(acc.map((v) => v - 0.25), ref, F64_TOL, "VJP accumulated");
        const ty = new Float64Array(R * D);
        normJvp(spec, p, x, t, ty, R, D);
        close(ty, fdJvp((xx) => normF(spec, w, bias, xx, R, D), x, t), F64_TOL, "JVP (float64)");
        // The engine's float32 views.
        const x32 = Float32Array.from(x), dx32 = new Float32Array(R * D), ty32 = new Float32Array(R * D);
        const p32 = { weight: Float32Array.from(w), ...(bias ? { bias: Float32Array.from(bias) } : {}) };
        normVjp(spec, p32, x32, Float32Array.from(dy), dx32, R, D);
        normJvp(spec, p32, x32, Float32Array.from(t), ty32, R, D);
        close(dx32, fdGrad((xx) => dot(dy.map((v) => Math.fround(v)), normF(spec, p32.weight, p32.bias, xx, R, D)), r32(x)), F32_TOL, "VJP (float32)");
        close(ty32, fdJvp((xx) => normF(spec, p32.weight, p32.bias, xx, R, D), r32(x), r32(t)), F32_TOL, "JVP (float32)");
      });
});

describe("RoPE VJP / JVP (rotate-half, one position per slot)", () => {
  test("4 slots at positions 0, 3, 7, 100; 2 heads of 8", () => {
    const R = 4, N = 2, hd = 8, half = hd / 2;
    const pos = [0, 3, 7, 100];
    const cos = new Float64Array(R * half), sin = new Float64Array(R * half);
    for (let r = 0; r < R; r++)
      for (let j = 0; j < half; j++) {
        const a = pos[r]! / Math.pow(10000, (2 * j) / hd);
        cos[r * half + j] = Math.cos(a);
        sin[r * half + j] = Math.sin(a);
      }
    const x = rand(R * N * hd, 21), dy = rand(R * N * hd, 22), t = rand(R * N * hd, 23);
    const dx = new Float64Array(x.length);
    ropeVjp(dy, dx, cos, sin, R, N, hd);
    close(dx, fdGrad((xx) => dot(dy, ropeF(xx, cos, sin, R, N, hd)), x), F64_TOL, "VJP");
    const ty = new Float64Array(x.length);
    ropeJvp(t, ty, cos, sin, R, N, hd);
    close(ty, fdJvp((xx) => ropeF(xx, cos, sin, R, N, hd), x, t), F64_TOL, "JVP");
    // In place (dx aliasing dy), as the engine may call it.
    const d2 = dy.slice();
    ropeVjp(d2, d2, cos, sin, R, N, hd);
    close(d2, dx, 0, "VJP in place");
  });
});

describe("MLP activation VJP / JVP (silu, gelu_tanh, erf gelu; gated act(g)·u and plain)", () => {
  const acts: Activation[] = ["silu", "gelu_tanh", "gelu"];
  for (const a of acts)
    for (const gated of [true, false])
      test(`${a}, ${gated ? "gated (gate and up stacked [R, 2F])" : "plain"}`, () => {
        const R = 3, F = 5;
        const ld = gated ? 2 * F : F;
        // Gate values over [-4, 4]: both tails and the bend.
        const buf = rand(R * ld, 31, 4);
        const split = (b: Float64Array) => ({ g: b, u: gated ? b.subarray(F) : null });
        const fwd = (b: Float64Array): Float64Array => {
          const y = new Float64Array(R * F);
          for (let r = 0; r < R; r++) for (let i = 0; i < F; i++) y[r * F + i] = actValue(b[r * ld + i]!, a) * (gated ? b[r * ld + F + i]! : 1);
          return y;
        };
        const dpost = rand(R * F, 32), t = rand(R * ld, 33);
        const { g, u } = split(buf);
        const dbuf = new Float64Array(R * ld);
        const L = { R, F, ldPre: ld, ldUp: ld };
        mlpActVjp(a, L, g, u, dpost, dbuf, gated ? dbuf.subarray(F) : null);
        // The erf GELU's forward uses a fitted erf (1e-7 relative), its derivative the exact density.
        const tol = a === "gelu" ? 2e-6 : F64_TOL;
        close(dbuf, fdGrad((b) => dot(dpost, fwd(b)), buf), tol, "VJP");
        const tpost = new Float64Array(R * F);
        const tt = split(t);
        mlpActJvp(a, L, g, u, tt.g, tt.u, tpost);
        close(tpost, fdJvp(fwd, buf, t), tol, "JVP");
      });
});

describe("site ops and trainable site parameters", () => {
  // [R = B·T slots, 2 heads x 3] feature; T = 2 slots per row, B = 2 rows.
  const B = 2, T = 2, R = B * T, N = 2, Fh = 3, Fall = N * Fh;
  const unit = (v: Float64Array) => v.map((x) => x / Math.sqrt(dot(v, v)));
  /** Applies ops as the engine does (engine.ts applyOp), in float64. */
  function apply(ops: HostOp[], x: Float64Array): Float64Array {
    const y = x.slice();
    for (const op of ops) {
      const Nn = op.mShape.length === 4 ? op.mShape[2]! : 1, F = Fall / Nn;
      for (let r = 0; r < R; r++) {
        const b = Math.floor(r / T);
        for (let hh = 0; hh < Nn; hh++) {
          const m = op.m[r * Nn + hh]!;
          if (m === 0) continue;
          const o = r * Fall + hh * F;
          if (op.kind === "add") for (let i = 0; i < F; i++) y[o + i]! += m * op.v[b * Fall + hh * F + i]!;
          else if (op.kind === "project") {
            let c = 0;
            for (let i = 0; i < F; i++) c += y[o + i]! * op.v[b * Fall + i]!;
            for (let i = 0; i < F; i++) y[o + i]! -= m * c * op.v[b * Fall + i]!;
          } else for (let i = 0; i < F; i++) y[o + i] = op.v[hh * F + i]!;
        }
      }
    }
    return y;
  }
  const rowsAll = new Set([0, 1]);
  const ops: HostOp[] = [
    { kind: "add", v: Float32Array.from(rand(B * Fall, 41)), vShape: [B, 1, Fall], m: Float32Array.from([1, 1, 0, 1]), mShape: [B, T, 1], rows: rowsAll },
    // A weighted projection (mask 0.5 on one slot) with a different unit direction per row.
    { kind: "project", v: Float32Array.from([...unit(rand(Fall, 42)), ...unit(rand(Fall, 43))]), vShape: [B, 1, Fall], m: Float32Array.from([1, 0.5, 1, 0]), mShape: [B, T, 1], rows: rowsAll },
    // Ablate head 1 on slots 0 and 3 (per-head mask [B, T, N, 1]).
    { kind: "replace", v: Float32Array.from(rand(Fall, 44)), vShape: [1, 1, N, Fh], m: Float32Array.from([0, 1, 0, 0, 0, 0, 0, 1]), mShape: [B, T, N, 1], rows: rowsAll },
  ];
  test("add, weighted project and per-head replace: VJP and JVP", () => {
    const x = rand(R * Fall, 45), dy = rand(R * Fall, 46), t = rand(R * Fall, 47);
    const d = dy.slice();
    siteOpsVjp(ops, d, R, T, Fall);
    close(d, fdGrad((xx) => dot(dy, apply(ops, xx)), x), F64_TOL, "VJP");
    // Alone, the replace leaves no gradient on the head it overwrites (slot 0, head 1), and the rest untouched.
    const d1 = dy.slice();
    siteOpsVjp([ops[2]!], d1, R, T, Fall);
    assert.deepEqual([...d1.subarray(Fh, Fall)], [0, 0, 0]);
    assert.deepEqual([...d1.subarray(0, Fh)], [...dy.subarray(0, Fh)]);
    const tt = t.slice();
    siteOpsJvp(ops, tt, R, T, Fall);
    close(tt, fdJvp((xx) => apply(ops, xx), x, t), F64_TOL, "JVP");
  });
  test("trainable vector and scale: gradients, and the scale's tangent", () => {
    const F = 4;
    const mask = [1, 0, 0.5, 1];
    const vec = rand(F, 51), dy = rand(R * F, 52), x = rand(R * F, 53);
    const fwd = (v: ArrayLike<number>, s: number) => {
      const y = x.slice();
      for (let r = 0; r < R; r++) for (let i = 0; i < F; i++) y[r * F + i]! += mask[r]! * s * v[i]!;
      return y;
    };
    const gv = new Float64Array(F);
    vectorGrad(dy, mask, R, F, gv);
    close(gv, fdGrad((v) => dot(dy, fwd(v, 1)), vec), F64_TOL, "vector gradient");
    const s0 = 0.7;
    const gs = scaleGrad(dy, mask, vec, R, F);
    const fd = (dot(dy, fwd(vec, s0 + H_FD)) - dot(dy, fwd(vec, s0 - H_FD))) / (2 * H_FD);
    close([gs], [fd], F64_TOL, "scale gradient");
    const t = new Float64Array(R * F);
    scaleTangent(t, mask, vec, R, F);
    close(t, fwd(vec, s0 + H_FD).map((v, i) => (v - fwd(vec, s0 - H_FD)[i]!) / (2 * H_FD)), F64_TOL, "scale tangent");
  });
  test("residual add and the embedding table's gradient", () => {
    const D = 3, V = 5;
    const ids = [4, 1, 0, 4], pos = [0, 1, -1, 2]; // slot 2 is padding
    const table = rand(V * D, 61), dx = rand(R * D, 62), a = rand(R * D, 63);
    const fwd = (tb: Float64Array) => {
      const y = new Float64Array(R * D);
      for (let r = 0; r < R; r++) if (pos[r]! >= 0) for (let i = 0; i < D; i++) y[r * D + i] = 2 * tb[ids[r]! * D + i]!;
      return y;
    };
    const g = new Float64Array(V * D);
    embedVjp(dx, ids, pos, R, D, 2, g);
    close(g, fdGrad((tb) => dot(dx, fwd(tb)), table), F64_TOL, "embedding gradient");
    // x + a: the cotangent of a is the cotangent of the sum.
    const da = new Float64Array(R * D);
    addInto(da, dx, R * D);
    close(da, fdGrad((aa) => dot(dx, aa.map((v, i) => v + a[i]!)), a), F64_TOL, "residual");
  });
});

// ---------------------------------------------------------------- runtime steps (float32)

for (const threads of [1, 2])
  describe(`matrix-product steps on a CpuRuntime (${threads} thread${threads > 1 ? "s" : ""})`, () => {
    let rt: CpuRuntime;
    before(async () => {
      rt = await CpuRuntime.create({ threads });
    });
    after(async () => {
      await rt.dispose();
    });
    /** Copies a host array into fresh runtime memory; returns its offset. */
    const put = (a: ArrayLike<number>): number => {
      const o = rt.alloc(a.length);
      rt.f32.set(Float32Array.from(a), o);
      return o;
    };
    const get = (o: number, n: number): Float32Array => rt.f32.slice(o, o + n);

    test("linear: VJP dX = dY·W (strided, and across transposition chunks) and JVP", () => {
      // The second shape makes matmulNN transpose W in 3 chunks (N·chunk ≤ CHUNK_FLOATS).
      for (const [R, N, K] of [[5, 37, 23], [3, Math.ceil(CHUNK_FLOATS / 300) + 1, 700]] as const) {
        const m = rt.mark();
        const ldx = K + 3, ldy = N + 2;
        const w = r32(rand(N * K, 71 + N, 0.2)), dy = r32(rand(R * N, 72)), x = r32(rand(R * K, 73));
        const bias = Float32Array.from(rand(N, 74));
        const wo = put(w);
        const xs = new Float64Array(R * ldx), dys = new Float64Array(R * ldy);
        for (let r = 0; r < R; r++) {
          xs.set(x.subarray(r * K, (r + 1) * K), r * ldx);
          dys.set(dy.subarray(r * N, (r + 1) * N), r * ldy);
        }
        const xo = put(xs), dyo = put(dys), dxo = rt.alloc(R * ldx), yo = rt.alloc(R * ldy);
        linearVjp(rt, dyo, ldy, { off: wo, rows: N, cols: K }, dxo, ldx, R);
        const dx = get(dxo, R * ldx).filter((_, i) => i % ldx < K);
        // Linear in x: the central difference is exact up to rounding, so the reference is dY·W itself.
        const ref = new Float64Array(R * K);
        for (let r = 0; r < R; r++) for (let n = 0; n < N; n++) for (let k = 0; k < K; k++) ref[r * K + k]! += dy[r * N + n]! * w[n * K + k]!;
        close(dx, ref, F32_TOL, `VJP ${R}x${N}x${K}`);
        if (N < 100) close(dx, fdGrad((xx) => dot(dy, mm(xx, w, R, N, K).map((v, i) => v + bias[i % N]!)), x), F32_TOL, "VJP vs finite differences");
        linear(rt, xo, ldx, { off: wo, rows: N, cols: K }, yo, ldy, R, bias);
        const y = get(yo, R * ldy).filter((_, i) => i % ldy < N);
        close(y, mm(x, w, R, N, K).map((v, i) => v + bias[i % N]!), F32_TOL, "forward");
        linearJvp(rt, xo, ldx, { off: wo, rows: N, cols: K }, yo, ldy, R);
        close(get(yo, R * ldy).filter((_, i) => i % ldy < N), mm(x, w, R, N, K), F32_TOL, "JVP");
        rt.release(m);
      }
    });

    test("matmulTN: Aᵀ·B summed over rows in chunks, accumulating", () => {
      const m = rt.mark();
      const M = 6, N = 5, K = Math.ceil(CHUNK_FLOATS / (M + N)) * 2 + 7; // 3 chunks of K
      const a = r32(rand(K * M, 81)), b = r32(rand(K * N, 82));
      const ao = put(a), bo = put(b), yo = put(new Float64Array(M * N).fill(1));
      matmulTN(rt, ao, M, bo, N, yo, N, M, N, K, true);
      const ref = new Float64Array(M * N).fill(1);
      for (let k = 0; k < K; k++) for (let i = 0; i < M; i++) for (let j = 0; j < N; j++) ref[i * N + j]! += a[k * M + i]! * b[k * N + j]!;
      close(get(yo, M * N), ref, F32_TOL, "accumulated");
      rt.release(m);
    });

    test("LoRA on a linear layer: forward term, dA, dB, dX and JVP", () => {
      const m = rt.mark();
      const R = 4, IN = 7, OUT = 6, rank = 2, s = 0.5;
      const A = r32(rand(rank * IN, 91)), Bm = r32(rand(OUT * rank, 92)), x = r32(rand(R * IN, 93)), dy = r32(rand(R * OUT, 94)), tx = r32(rand(R * IN, 95));
      const term = (xx: ArrayLike<number>, aa: ArrayLike<number>, bb: ArrayLike<number>) => mm(mm(xx, aa, R, rank, IN).map((v) => v * s), bb, R, OUT, rank);
      const l = { a: put(A), b: put(Bm), rank, in: IN, out: OUT, scale: s };
      const xo = put(x), dyo = put(dy), u = rt.alloc(R * rank), tmp = rt.alloc(R * rank), y = rt.alloc(R * OUT);
      loraApply(rt, l, xo, IN, R, u, tmp, y, OUT);
      close(get(y, R * OUT), term(x, A, Bm), F32_TOL, "forward term");
      // dA and dB accumulate onto what is there (0.25).
      const dA = put(new Float64Array(rank * IN).fill(0.25)), dB = put(new Float64Array(OUT * rank).fill(0.25)), dx = put(new Float64Array(R * IN).fill(0.5));
      loraVjp(rt, l, xo, IN, dyo, OUT, R, dA, dB, dx, IN);
      close(Float64Array.from(get(dA, rank * IN)).map((v) => v - 0.25), fdGrad((aa) => dot(dy, term(x, aa, Bm)), A), F32_TOL, "dA");
      close(Float64Array.from(get(dB, OUT * rank)).map((v) => v - 0.25), fdGrad((bb) => dot(dy, term(x, A, bb)), Bm), F32_TOL, "dB");
      close(Float64Array.from(get(dx, R * IN)).map((v) => v - 0.5), fdGrad((xx) => dot(dy, term(xx, A, Bm)), x), F32_TOL, "dX (accumulated)");
      const ty = rt.alloc(R * OUT);
      loraJvp(rt, l, put(tx), IN, R, ty, OUT);
      close(get(ty, R * OUT), fdJvp((xx) => term(xx, A, Bm), x, tx), F32_TOL, "JVP");
      rt.release(m);
    });

    const geoms: [string, AttnGeom][] = [
      ["GQA 4/2, padded row, causal", { B: 2, T: 6, H: 4, K: 2, hd: 8, pad: [0, 2], window: Infinity, scale: 1 / Math.sqrt(8) }],
      ["score softcap 2 and a window of 3", { B: 2, T: 7, H: 2, K: 1, hd: 4, pad: [3, 0], window: 3, scale: 0.9, softcap: 2 }],
      ["MHA, window 2, scale 1", { B: 1, T: 5, H: 2, K: 2, hd: 4, pad: [0], window: 2, scale: 1 }],
    ];
    for (const [name, g] of geoms)
      test(`attention VJP and JVP: ${name}`, () => {
        const m = rt.mark();
        const { B, T, H, K, hd } = g;
        const nq = B * T * H * hd, nk = B * T * K * hd;
        const q = r32(rand(nq, 101, 1.5)), k = r32(rand(nk, 102, 1.5)), v = r32(rand(nk, 103)), dz = r32(rand(nq, 104));
        const qo = put(q), ko = put(k), vo = put(v), dzo = put(dz);
        const dq = rt.alloc(nq), dk = rt.alloc(nk), dv = rt.alloc(nk);
        attentionVjp(rt, g, qo, ko, vo, dzo, dq, dk, dv);
        close(get(dq, nq), fdGrad((qq) => dot(dz, attentionF(g, qq, k, v)), q), F32_TOL, "dQ");
        close(get(dk, nk), fdGrad((kk) => dot(dz, attentionF(g, q, kk, v)), k), F32_TOL, "dK");
        close(get(dv, nk), fdGrad((vv) => dot(dz, attentionF(g, q, k, vv)), v), F32_TOL, "dV");
        const tq = r32(rand(nq, 105)), tk = r32(rand(nk, 106)), tv = r32(rand(nk, 107));
        const tz = rt.alloc(nq);
        attentionJvp(rt, g, qo, ko, vo, put(tq), put(tk), put(tv), tz);
        const all = Float64Array.from([...q, ...k, ...v]), dir = [...tq, ...tk, ...tv];
        const F = (xx: Float64Array) => attentionF(g, xx.subarray(0, nq), xx.subarray(nq, nq + nk), xx.subarray(nq + nk));
        close(get(tz, nq), fdJvp(F, all, dir), F32_TOL, "JVP");
        rt.release(m);
      });

    for (const softcap of [undefined, 3])
      test(`head: final norm, unembedding${softcap ? ", final softcap" : ""} and mean cross-entropy`, () => {
        const m = rt.mark();
        const n = 4, D = 6, V = 11;
        const spec: NormSpec = { kind: "rms", eps: 1e-6, weightOffset: 1 };
        const x = r32(rand(n * D, 111, 2)), w = r32(rand(D, 112, 0.3)), U = r32(rand(V * D, 113));
        const targets = [3, -1, 10, 0]; // row 1 has no target
        const rows = targets.flatMap((t, i) => (t >= 0 ? [i] : []));
        const lossOf = (xx: Float64Array): number => {
          const lg = mm(normF(spec, w, undefined, xx, n, D), U, n, V, D);
          let l = 0;
          for (const r of rows) {
            const row = Array.from(lg.subarray(r * V, (r + 1) * V), (v) => (softcap ? softcap * Math.tanh(v / softcap) : v));
            const mx = Math.max(...row);
            const lse = mx + Math.log(row.reduce((a, v) => a + Math.exp(v - mx), 0));
            l += (lse - row[targets[r]!]!) / rows.length;
          }
          return l;
        };
        // The engine's way: logits for the rows with targets only, then back through U and the norm.
        const hsel = Float32Array.from(rows.flatMap((r) => [...x.subarray(r * D, (r + 1) * D)]));
        const hn = new Float32Array(hsel.length);
        hn.set(normF(spec, w, undefined, Float64Array.from(hsel), rows.length, D));
        const ho = put(hn), Uo = put(U), lg = rt.alloc(rows.length * V);
        rt.gemm({ x: ho, ldx: D, w: Uo, ldw: D, y: lg, ldy: V, M: rows.length, N: V, K: D });
        const view = rt.f32.subarray(lg, lg + rows.length * V);
        if (softcap) for (let i = 0; i < view.length; i++) view[i] = Math.tanh(view[i]! / softcap) * softcap;
        const loss = crossEntropyVjp(view, rows.map((r) => targets[r]!), rows.length, V, 1 / rows.length, view, softcap);
        close([loss], [lossOf(x)], F32_TOL, "loss");
        const dh = rt.alloc(rows.length * D);
        linearVjp(rt, lg, V, { off: Uo, rows: V, cols: D }, dh, D, rows.length);
        const dsel = new Float32Array(rows.length * D);
        normVjp(spec, { weight: Float32Array.from(w) }, hsel, rt.f32.slice(dh, dh + rows.length * D), dsel, rows.length, D);
        const dx = new Float32Array(n * D);
        rows.forEach((r, i) => dx.set(dsel.subarray(i * D, (i + 1) * D), r * D));
        close(dx, fdGrad(lossOf, x), F32_TOL, "dX");
        rt.release(m);
      });
  });
