// The CPU runtime's row and attention tasks (runtime.ts gatedRows / rmsnormRows / attention,
// kernels.ts TASK): split across threads they must give exactly what the main-thread kernels
// give (elementwise.ts, checked against float64 in cpu-elementwise.test.ts), and attention must
// match a float64 reference with causal, padding and sliding-window masks — on 1 and 2 threads,
// bitwise identical between the two.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { elementwise } from "../src/engine/cpu/elementwise.js";
import { type AttentionTask, CpuRuntime } from "../src/engine/cpu/runtime.js";
import { prng } from "./support/prng.js";

const rand = prng(2024);
const randn = (n: number, scale = 1) => Float32Array.from({ length: n }, () => (rand() - 0.5) * 2 * scale);

/** The main-thread kernels on a private memory: the expected bits of a row task. */
function mainThread(n: number) {
  const memory = new WebAssembly.Memory({ initial: Math.ceil((n * 4) / 65536) + 1, maximum: 65536 });
  return { e: elementwise(memory, false), f: () => new Float32Array(memory.buffer) };
}

interface AttnCase {
  T: number;
  slot0: number;
  pad: number;
  window: number;
  hd: number;
  cap: number;
}

/** float64 attention of one pair: q [T, hd] (rows ldq apart), k [cap, hd], v transposed [hd, cap]. */
function attention64(q: Float32Array, ldq: number, k: Float32Array, vT: Float32Array, c: AttnCase, scale: number): Float64Array {
  const S = c.slot0 + c.T;
  const z = new Float64Array(c.T * c.hd);
  for (let t = 0; t < c.T; t++) {
    const slot = c.slot0 + t;
    let lo = Math.max(c.pad, slot - c.window + 1);
    if (lo > slot) lo = slot;
    const w: number[] = [];
    for (let s = lo; s <= slot && s < S; s++) {
      let d = 0;
      for (let i = 0; i < c.hd; i++) d += q[t * ldq + i]! * k[s * c.hd + i]!;
      w.push(d * scale);
    }
    const mx = Math.max(...w);
    const ex = w.map((x) => Math.exp(x - mx));
    const sum = ex.reduce((a, b) => a + b, 0);
    for (let i = 0; i < c.hd; i++) {
      let acc = 0;
      ex.forEach((e, j) => (acc += (e / sum) * vT[i * c.cap + lo + j]!));
      z[t * c.hd + i] = acc;
    }
  }
  return z;
}

for (const threads of [1, 2]) {
  describe(`CpuRuntime tasks, ${threads} thread(s)`, () => {
    let rt: CpuRuntime;
    before(async () => {
      rt = await CpuRuntime.create({ threads });
    });
    after(async () => {
      await rt.dispose();
    });

    test("gatedRows equals the main-thread kernel bit for bit (fused gate/up rows, in place too)", () => {
      for (const [R, F] of [[1, 5], [3, 131], [64, 2048], [37, 1000]] as const) {
        const up = randn(R * 2 * F, 6);
        for (const act of ["silu", "gelu_tanh"] as const) {
          const m = rt.mark();
          const u = rt.alloc(R * 2 * F);
          const out = rt.alloc(R * F);
          rt.f32.set(up, u);
          rt.gatedRows(u, 2 * F, u + F, 2 * F, out, F, R, F, act);
          const got = rt.f32.slice(out, out + R * F);
          // In place: the gate copied out first, then overwritten by the product.
          for (let r = 0; r < R; r++) rt.f32.copyWithin(out + r * F, u + r * 2 * F, u + r * 2 * F + F);
          rt.gatedRows(out, F, u + F, 2 * F, out, F, R, F, act);
          const inPlace = rt.f32.slice(out, out + R * F);
          rt.release(m);

          const h = mainThread(R * 3 * F + 64);
          h.f().set(up, 0);
          h.e.gated(0, 2 * F, F, 2 * F, R * 2 * F, F, R, F, act);
          const want = h.f().slice(R * 2 * F, R * 3 * F);
          assert.deepEqual(got, want, `gatedRows ${act} R=${R} F=${F}`);
          assert.deepEqual(inPlace, want, `gatedRows ${act} R=${R} F=${F} in place`);
        }
      }
    });

    test("rmsnormRows equals the main-thread kernel bit for bit (both weight offsets, in place)", () => {
      for (const [R, D] of [[1, 3], [5, 768], [128, 768], [33, 130]] as const) {
        const x = randn(R * D, 3);
        const w = randn(D);
        for (const offset of [0, 1] as const) {
          const m = rt.mark();
          const xs = rt.alloc(R * D);
          const ws = rt.alloc(D);
          const ys = rt.alloc(R * D);
          rt.f32.set(x, xs);
          rt.f32.set(w, ws);
          rt.rmsnormRows(xs, ys, ws, R, D, 1e-5, offset);
          const got = rt.f32.slice(ys, ys + R * D);
          rt.rmsnormRows(xs, xs, ws, R, D, 1e-5, offset);
          const inPlace = rt.f32.slice(xs, xs + R * D);
          rt.release(m);

          const h = mainThread(2 * R * D + D + 64);
          h.f().set(x, 0);
          h.f().set(w, R * D);
          h.e.rmsnorm(0, R * D + D, R * D, R, D, 1e-5, offset);
          const want = h.f().slice(R * D + D, 2 * R * D + D);
          assert.deepEqual(got, want, `rmsnormRows R=${R} D=${D} offset=${offset}`);
          assert.deepEqual(inPlace, want, `rmsnormRows R=${R} D=${D} offset=${offset} in place`);
        }
      }
    });

    test("attention matches float64 under causal, padding and sliding-window masks", () => {
      const cases: AttnCase[] = [
        { T: 1, slot0: 0, pad: 0, window: Infinity, hd: 8, cap: 4 }, // a single query sees itself
        { T: 1, slot0: 9, pad: 2, window: Infinity, hd: 64, cap: 16 }, // decode step
        { T: 40, slot0: 0, pad: 0, window: Infinity, hd: 64, cap: 40 }, // prefill
        { T: 17, slot0: 5, pad: 3, window: Infinity, hd: 12, cap: 30 }, // a later chunk, left padding
        { T: 24, slot0: 0, pad: 4, window: 6, hd: 16, cap: 24 }, // sliding window
        { T: 6, slot0: 0, pad: 5, window: Infinity, hd: 4, cap: 8 }, // padding queries see only themselves
      ];
      const scale = 0.3;
      const pairs = 3; // heads of one call, each with its own q, k, v
      for (const c of cases) {
        const S = c.slot0 + c.T;
        const ldq = pairs * c.hd;
        const q = randn(c.T * ldq, 2);
        const ks = Array.from({ length: pairs }, () => randn(c.cap * c.hd, 2));
        const vs = Array.from({ length: pairs }, () => randn(c.hd * c.cap, 2));
        const m = rt.mark();
        const qo = rt.alloc(q.length);
        const zo = rt.alloc(c.T * ldq);
        const ko = ks.map((k) => rt.alloc(k.length));
        const vo = vs.map((v) => rt.alloc(v.length));
        const so = rt.alloc(pairs * c.T * S);
        const f = rt.f32;
        f.set(q, qo);
        ks.forEach((k, p) => f.set(k, ko[p]!));
        vs.forEach((v, p) => f.set(v, vo[p]!));
        const tasks: AttentionTask[] = Array.from({ length: pairs }, (_, p) => ({
          q: qo + p * c.hd, ldq, k: ko[p]!, v: vo[p]!, ldv: c.cap, scores: so + p * c.T * S, z: zo + p * c.hd, T: c.T, S, hd: c.hd, slot0: c.slot0, pad: c.pad, window: c.window, scale,
        }));
        rt.attention(tasks);
        const z = rt.f32.slice(zo, zo + c.T * ldq);
        rt.release(m);
        for (let p = 0; p < pairs; p++) {
          const want = attention64(q.subarray(p * c.hd), ldq, ks[p]!, vs[p]!, c, scale);
          let err = 0;
          for (let t = 0; t < c.T; t++) for (let i = 0; i < c.hd; i++) err = Math.max(err, Math.abs(z[t * ldq + p * c.hd + i]! - want[t * c.hd + i]!));
          assert.ok(err < 2e-5, `attention ${JSON.stringify(c)} pair ${p}: max error ${err}`);
        }
      }
    });
  });
}

test("attention tasks give bitwise identical results on 1 and 2 threads", async () => {
  const rts = [await CpuRuntime.create({ threads: 1 }), await CpuRuntime.create({ threads: 2 })];
  try {
    const T = 64, hd = 64, heads = 12;
    const q = randn(T * heads * hd), k = randn(heads * T * hd), v = randn(heads * hd * T);
    const outs = rts.map((rt) => {
      const m = rt.mark();
      const qo = rt.alloc(q.length), ko = rt.alloc(k.length), vo = rt.alloc(v.length), zo = rt.alloc(q.length), so = rt.alloc(heads * T * T);
      rt.f32.set(q, qo);
      rt.f32.set(k, ko);
      rt.f32.set(v, vo);
      rt.attention(Array.from({ length: heads }, (_, h) => ({ q: qo + h * hd, ldq: heads * hd, k: ko + h * T * hd, v: vo + h * hd * T, ldv: T, scores: so + h * T * T, z: zo + h * hd, T, S: T, hd, slot0: 0, pad: 0, window: Infinity, scale: 0.125 })));
      const z = rt.f32.slice(zo, zo + q.length);
      rt.release(m);
      return z;
    });
    assert.deepEqual(outs[1], outs[0]);
  } finally {
    await Promise.all(rts.map((rt) => rt.dispose()));
  }
});
