// The CPU engine's Wasm SIMD elementwise kernels (src/engine/cpu/elementwise.ts) against float64
// formulas: lengths that exercise the 4-lane body and the 1-lane tail, masked softmax ranges,
// and the exp range limits (SiLU/GELU of ±100, softmax of a single live entry).
import { test } from "node:test";
import assert from "node:assert/strict";
import { elementwise } from "../src/engine/cpu/elementwise.js";

let seed = 7;
const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 4294967296 - 0.5);
const f32 = Math.fround;

function setup(shared: boolean) {
  const memory = new WebAssembly.Memory({ initial: 4, maximum: 65536, shared });
  return { e: elementwise(memory, shared), f: new Float32Array(memory.buffer) };
}

const silu = (x: number) => x / (1 + Math.exp(-x));
const geluTanh = (x: number) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)));

/** Max error relative to max(|want|, floor) — f32 kernels on O(1) values should be ~1e-7. */
function maxRel(got: ArrayLike<number>, want: ArrayLike<number>, floor = 1e-6): number {
  let m = 0;
  for (let i = 0; i < want.length; i++) m = Math.max(m, Math.abs(got[i]! - want[i]!) / Math.max(floor, Math.abs(want[i]!)));
  return m;
}

for (const shared of [false, true]) {
  test(`softmax over masked ranges (${shared ? "shared" : "plain"} memory)`, () => {
    const { e, f } = setup(shared);
    for (const [n, from, to] of [[1, 0, 0], [7, 0, 6], [64, 3, 40], [131, 0, 130], [130, 129, 129], [17, 5, 9], [9, 0, 0]] as const) {
      const p = 1001; // unaligned on purpose
      const raw = Array.from({ length: n }, () => f32(rnd() * 60));
      f.set(raw, p);
      e.softmax(p, n, from, to, 0.125);
      let mx = -Infinity;
      for (let s = from; s <= to; s++) mx = Math.max(mx, raw[s]! * 0.125);
      const ex = raw.map((v, s) => (s >= from && s <= to ? Math.exp(v * 0.125 - mx) : 0));
      const sum = ex.reduce((a, b) => a + b, 0);
      const want = ex.map((v) => v / sum);
      const got = f.subarray(p, p + n);
      for (let s = 0; s < n; s++) if (s < from || s > to) assert.equal(got[s], 0, `masked entry ${s} of [${n}, ${from}..${to}] must be exactly 0`);
      assert.ok(maxRel(got, want, 1e-3) < 2e-6, `softmax [${n}, ${from}..${to}]: rel err ${maxRel(got, want, 1e-3)}`);
    }
  });

  test(`gated SiLU / GELU-tanh, GELU in place, RMSNorm, add (${shared ? "shared" : "plain"} memory)`, () => {
    const { e, f } = setup(shared);
    for (const F of [1, 3, 4, 5, 131, 2048]) {
      const R = 3;
      const g = 100, u = g + R * F + 3, o = u + 2 * R * F + 5;
      const G = Array.from({ length: R * F }, () => f32(rnd() * 24));
      const U = Array.from({ length: 2 * R * F }, () => f32(rnd() * 4));
      for (const act of ["silu", "gelu_tanh"] as const) {
        f.set(G, g);
        f.set(U, u);
        // up rows are 2F apart and start F in (the fused gate/up layout).
        e.gated(g, F, u + F, 2 * F, o, F, R, F, act);
        const want = Array.from({ length: R * F }, (_, i) => {
          const r = Math.floor(i / F), j = i % F;
          return (act === "silu" ? silu(G[i]!) : geluTanh(G[i]!)) * U[r * 2 * F + F + j]!;
        });
        // GELU's far negative tail is exp of a large argument: its own f32 rounding gives ~1e-6.
        const err = maxRel(f.subarray(o, o + R * F), want);
        assert.ok(err < (act === "silu" ? 1e-6 : 5e-6), `gated ${act} F=${F}: rel err ${err}`);
      }
      f.set(G, g);
      e.geluTanh(g, R * F);
      assert.ok(maxRel(f.subarray(g, g + R * F), G.map(geluTanh)) < 5e-6, `gelu_tanh F=${F}`);
      const W = Array.from({ length: F }, () => f32(rnd()));
      const w = o + R * F + 7;
      f.set(W, w);
      for (const offset of [0, 1] as const) {
        f.set(G, g);
        e.rmsnorm(g, o, w, R, F, 1e-5, offset);
        const want: number[] = [];
        for (let r = 0; r < R; r++) {
          let ss = 0;
          for (let j = 0; j < F; j++) ss += G[r * F + j]! ** 2;
          const inv = 1 / Math.sqrt(ss / F + 1e-5);
          for (let j = 0; j < F; j++) want.push(G[r * F + j]! * inv * (offset + W[j]!));
        }
        const err = maxRel(f.subarray(o, o + R * F), want);
        assert.ok(err < 2e-6, `rmsnorm F=${F} offset ${offset}: rel err ${err}`);
      }
      f.set(G, g);
      f.set(U.slice(0, R * F), u);
      e.add(g, u, R * F);
      for (let i = 0; i < R * F; i++) assert.equal(f[g + i], f32(G[i]! + U[i]!), `add ${i}`);
    }
  });
}

test("exp range limits: SiLU/GELU of large |x| and softmax with a huge spread stay finite and exact", () => {
  const { e, f } = setup(false);
  const xs = [-100, -88, -20, -1e-3, 0, 1e-3, 20, 88, 100];
  f.set(xs, 0);
  f.fill(1, 16, 16 + xs.length);
  e.gated(0, xs.length, 16, xs.length, 32, xs.length, 1, xs.length, "silu");
  e.gated(0, xs.length, 16, xs.length, 48, xs.length, 1, xs.length, "gelu_tanh");
  for (let i = 0; i < xs.length; i++) {
    const s = f[32 + i]!, gl = f[48 + i]!;
    assert.ok(Number.isFinite(s) && Number.isFinite(gl), `x=${xs[i]}: silu ${s}, gelu ${gl}`);
    assert.ok(Math.abs(s - silu(xs[i]!)) <= 1e-6 * Math.max(1, Math.abs(xs[i]!)), `silu(${xs[i]}) = ${s}`);
    assert.ok(Math.abs(gl - geluTanh(xs[i]!)) <= 1e-6 * Math.max(1, Math.abs(xs[i]!)), `gelu(${xs[i]}) = ${gl}`);
  }
  f.set([0, -1e4, 5, -1e4], 64);
  e.softmax(64, 4, 0, 3, 1);
  const got = Array.from(f.subarray(64, 68));
  assert.equal(got[1], 0, "exp underflow is exactly 0");
  assert.equal(got[3], 0, "exp underflow is exactly 0");
  assert.ok(Math.abs(got[0]! - Math.exp(-5) / (1 + Math.exp(-5))) < 1e-8 && Math.abs(got[2]! - 1 / (1 + Math.exp(-5))) < 1e-7, `softmax ${got}`);
  // NaN propagates (the engine's NaN diagnosis relies on it).
  f.set([NaN, 1, 2], 80);
  f.fill(1, 96, 99);
  e.gated(80, 3, 96, 3, 112, 3, 1, 3, "silu");
  assert.ok(Number.isNaN(f[112]!) && Number.isFinite(f[113]!), "silu(NaN) is NaN");
  e.softmax(80, 3, 0, 2, 1);
  assert.ok(Number.isNaN(f[80]!), "softmax over a NaN score is NaN");
});

test("RoPE (rotate-half) and the transposed cache write", () => {
  const { e, f } = setup(false);
  for (const hd of [2, 8, 10, 64, 128]) {
    const R = 3, N = 2, half = hd / 2;
    const x = 11, cos = x + R * N * hd + 1, sin = cos + R * half + 2;
    const X = Array.from({ length: R * N * hd }, () => f32(rnd() * 4));
    const C = Array.from({ length: R * half }, () => f32(Math.cos(rnd() * 9)));
    const S = Array.from({ length: R * half }, () => f32(Math.sin(rnd() * 9)));
    f.set(X, x);
    f.set(C, cos);
    f.set(S, sin);
    e.rope(x, cos, sin, R, N, hd);
    for (let r = 0; r < R; r++)
      for (let n = 0; n < N; n++)
        for (let j = 0; j < half; j++) {
          const a = (r * N + n) * hd, c = C[r * half + j]!, s = S[r * half + j]!;
          const x1 = X[a + j]!, x2 = X[a + j + half]!;
          assert.equal(f[x + a + j], f32(f32(x1 * c) - f32(x2 * s)), `rope hd=${hd} first half`);
          assert.equal(f[x + a + j + half], f32(f32(x2 * c) + f32(x1 * s)), `rope hd=${hd} second half`);
        }
  }
  const src = Array.from({ length: 64 }, () => f32(rnd()));
  f.set(src, 3);
  f.fill(-1, 100, 100 + 64 * 5);
  e.scatter(3, 101, 64, 5);
  for (let i = 0; i < 64; i++) {
    assert.equal(f[101 + i * 5], src[i], `scatter ${i}`);
    assert.equal(f[102 + i * 5], -1, "scatter touches only its stride");
  }
});

test("dot and axpy (the add / project interventions)", () => {
  const { e, f } = setup(true);
  for (const n of [1, 3, 4, 7, 768, 2051]) {
    const A = Array.from({ length: n }, () => f32(rnd() * 3));
    const Bv = Array.from({ length: n }, () => f32(rnd() * 3));
    f.set(A, 5);
    f.set(Bv, 5 + n + 3);
    const want = A.reduce((s, a, i) => s + a * Bv[i]!, 0);
    const scale = A.reduce((s, a, i) => s + Math.abs(a * Bv[i]!), 0);
    assert.ok(Math.abs(e.dot(5, 5 + n + 3, n) - want) <= 1e-6 * scale, `dot n=${n}`);
    e.axpy(5, 5 + n + 3, n, -0.75);
    for (let i = 0; i < n; i++) assert.equal(f[5 + i], f32(A[i]! + f32(-0.75 * Bv[i]!)), `axpy n=${n} i=${i}`);
  }
});
