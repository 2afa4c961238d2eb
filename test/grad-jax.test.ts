// Gradients and forward-mode derivatives of the jax-js engine (Engine.lossAndGrad, Engine.jvpScale;
// src/engine/grad.ts) against central finite differences of the float64 oracle
// (test/support/oracle64.ts), on every family fixture (scripts/make-fixtures.ts), on the wasm
// backend, over a ragged batch of two rows with a constant plan (a head ablation and a per-row
// add) in the same pass.
//
// Every TrainParam kind: a vector at every site (block sites of one layer, hook_embed,
// hook_pos_embed for learned positions, ln_final), a scale (at a residual, a per-head and an MLP
// site), a LoRA adapter on every linear layer of one block, and the activation at every site.
// jvpScale: the derivative of reads downstream (and upstream: exactly zero) of an add's scale.
//
// How a gradient g (float32, from the engine) is compared: the loss is differentiated in float64
// along unit directions u of the parameter space, for u = g/|g| and one seeded random direction,
// by central differences d(h) = (L(θ+hu) - L(θ-hu)) / 2h with Richardson extrapolation,
// d_u = (4·d(h/2) - d(h)) / 3, which cancels the O(h²) term. The error is
// |(g·u - d_u)_u| / |(d_u)_u| (Euclidean over the directions): the relative error of the gradient
// restricted to a plane that contains it, so the ĝ direction measures its length and the random
// one its direction. (A full coordinate-wise check costs 2·dim float64 passes per param; this one
// costs 8.) h = 1e-3 in parameter units: activations are O(0.1..1) in these fixtures, so d(h)
// alone is off by up to ~5e-5 (the embedding sites, whose small norm makes the loss most curved)
// and the extrapolated d_u by O(h⁴) ~ 1e-9; float64 rounding (~1e-16·L/h ~ 1e-12 absolute) is
// negligible. As a check that h is in the asymptotic range, d(h) and d(h/2) must agree to 1e-3 of
// |g|. The bound is the 1e-4.
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test, type TestContext } from "node:test";
import { FIXTURE_FAMILIES, makeFixtures, type FixturePaths } from "../scripts/make-fixtures.js";
import { SelfscopeError, UsageError } from "../src/core/errors.js";
import { Rng } from "../src/core/rng.js";
import { initDevice } from "../src/engine/device.js";
import type { LinearName, TrainParam } from "../src/engine/grad.js";
import { Engine } from "../src/engine/jax/engine.js";
import { featShapeOf } from "../src/engine/plan.js";
import { siteOrder } from "../src/engine/schedule.js";
import { BLOCK_SITES, type HookName } from "../src/hooks/names.js";
import type { Plan } from "../src/hooks/plan.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { Model } from "../src/model/model.js";
import { BUNDLED_MODEL } from "../src/core/package.js";
import { crossEntropySum, oracleForward, type OracleIntervention, type OracleLora, type OraclePlan } from "./support/oracle64.js";

const REL_TOL = 1e-4; // the bound on the relative error against float64 finite differences
const H = 1e-3; // finite-difference step (see the header)
const H_AGREE = 1e-3; // d(h) and d(h/2) must agree to this (relative to |g|): h is in the O(h²) range
const VALUE_TOL = 1e-4; // float32 engine values vs float64 (loss, jvp primal reads), relative L2

const ROWS = [
  [5, 77, 123, 9, 250],
  [64, 200, 17],
];
/** Next-token targets, one ignored (-1), the last of row 0 a token the prompt never shows. */
const TARGETS = [
  [77, 123, -1, 250, 31],
  [200, 17, 140],
];
/** Constants in every pass: a head ablation (all rows) and an add on row 1 only. */
function constPlan(c: HostModel["config"], seed: number): Plan {
  return [
    { op: "ablate", at: "blocks.0.attn.hook_z", mode: "zero", heads: [1] },
    { op: "add", at: "blocks.0.hook_resid_post", vector: randVec(seed, c.dModel, 0.3), rows: [1], pos: { from: 1 } },
  ];
}

function randVec(seed: number, n: number, norm: number): Float32Array {
  const rng = new Rng(seed);
  const v = Float64Array.from({ length: n }, () => Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next()));
  const s = norm / Math.hypot(...v);
  return Float32Array.from(v, (x) => x * s);
}

const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
};
const norm2 = (a: ArrayLike<number>) => Math.sqrt(dot(a, a));

/** Mean cross-entropy of TARGETS over the batch in float64, each row through the oracle with its own plan filter. */
function loss64(host: HostModel, plan: OraclePlan, lora: readonly OracleLora[] = []): number {
  let sum = 0;
  let n = 0;
  ROWS.forEach((ids, b) => {
    const { logits } = oracleForward(host, ids, plan, { row: b, lora });
    const c = crossEntropySum(logits, TARGETS[b]!);
    sum += c.sum;
    n += c.n;
  });
  return sum / n;
}

interface GradCheck {
  rel: number;
  /** max over directions of |d(h) - d(h/2)| / |g|. */
  agree: number;
  gnorm: number;
}

/**
 * Compare a gradient with float64 central differences (Richardson-extrapolated) along ĝ and one random direction.
 * `at(u, h)` is the float64 loss at θ + h·u.
 */
function checkGrad(g: Float32Array, at: (u: Float64Array, h: number) => number, seed: number): GradCheck {
  const gnorm = norm2(g);
  const rng = new Rng(seed);
  const r = Float64Array.from(g, () => Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next()));
  const dirs = [Float64Array.from(g, (x) => x / gnorm), r.map((x) => x / norm2(r))];
  let num = 0;
  let den = 0;
  let agree = 0;
  for (const u of dirs) {
    const fd = (h: number) => (at(u, h) - at(u, -h)) / (2 * h);
    const d1 = fd(H);
    const d2 = fd(H / 2);
    const d = (4 * d2 - d1) / 3;
    num += (dot(g, u) - d) ** 2;
    den += d * d;
    agree = Math.max(agree, Math.abs(d1 - d2) / gnorm);
  }
  return { rel: Math.sqrt(num / den), agree, gnorm };
}

function assertGrad(t: TestContext, what: string, c: GradCheck): void {
  t.diagnostic(`${what}: |g| ${c.gnorm.toExponential(2)}, relative error ${c.rel.toExponential(2)}, h vs h/2 ${c.agree.toExponential(1)}`);
  assert.ok(c.gnorm > 0 && Number.isFinite(c.gnorm), `${what}: gradient is zero or not finite`);
  assert.ok(c.agree <= H_AGREE, `${what}: finite differences at h and h/2 differ by ${c.agree} of |g| (h too large for this function)`);
  assert.ok(c.rel <= REL_TOL, `${what}: relative error ${c.rel} vs float64 finite differences`);
}

/** An oracle add of `v` at one position of one row (a perturbation of an activation). */
const addAt = (at: string, b: number, t: number, v: ArrayLike<number>): OracleIntervention => ({ op: "add", at, vector: v, pos: { from: t, to: t + 1 }, rows: [b] });

function siteList(c: HostModel["config"], layer: number): HookName[] {
  const out: HookName[] = ["hook_embed"];
  if (c.pos.kind === "learned") out.push("hook_pos_embed");
  for (const s of BLOCK_SITES) if (s !== "attn.hook_pattern") out.push(`blocks.${layer}.${s}`);
  out.push("ln_final.hook_normalized");
  return out;
}

const siteOf = (at: HookName) => at.replace(/^blocks\.\d+\./, "");

let dir = "";
let fixtures: FixturePaths[] = [];
before(async () => {
  await initDevice("wasm");
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-grad-jax-"));
  fixtures = makeFixtures(dir, FIXTURE_FAMILIES);
});
after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

for (const family of FIXTURE_FAMILIES) {
  describe(`${family} fixture [wasm]`, () => {
    let host: HostModel;
    let engine: Engine;
    let plan: Plan;
    /** The block whose sites and linears are tested: the second (the first has the plan's ablation). */
    const L = 1;
    before(() => {
      host = loadHostModel(fixtures.find((f) => f.family === family)!.hf);
      engine = new Engine(host);
      plan = constPlan(host.config, 11);
    });
    after(() => engine?.dispose());

    test("vector at every site: gradient vs float64 finite differences (several params in one pass)", async (t) => {
      const c = host.config;
      const sites = siteList(c, L);
      const scopes = [{ pos: "all" as const }, { pos: { from: 1 } }, { pos: { from: 1, to: 3 }, rows: [0] }];
      const params = sites.map((at, i) => {
        const F = featShapeOf(c, siteOf(at)).reduce((a, b) => a * b, 1);
        return { kind: "vector" as const, at, ...scopes[i % scopes.length]!, value: randVec(100 + i, F, 0.05) };
      });
      const res = await engine.lossAndGrad(ROWS, { targets: TARGETS, params, plan });
      const asOracle = (vals: Float64Array[]): OracleIntervention[] => params.map((p, i) => ({ op: "add", at: p.at, vector: vals[i]!, ...(p.pos ? { pos: p.pos } : {}), ...(p.rows ? { rows: p.rows } : {}) }));
      const base = params.map((p) => Float64Array.from(p.value));
      const l64 = loss64(host, [...plan, ...asOracle(base)]);
      assert.ok(Math.abs(res.loss - l64) <= VALUE_TOL * Math.abs(l64), `loss ${res.loss} vs float64 ${l64}`);
      params.forEach((p, i) => {
        const g = res.grads[i]![0]!;
        assert.equal(g.length, p.value.length);
        const check = checkGrad(g, (u, h) => loss64(host, [...plan, ...asOracle(base.map((v, j) => (j === i ? v.map((x, k) => x + h * u[k]!) : v)))]), 7 + i);
        assertGrad(t, `vector at ${p.at}`, check);
      });
    });

    test("activation at every site: per-row gradient [positions, ...feature] vs float64 finite differences", async (t) => {
      const c = host.config;
      const sites = siteList(c, L);
      const params: TrainParam[] = sites.map((at) => ({ kind: "activation", at }));
      const res = await engine.lossAndGrad(ROWS, { targets: TARGETS, params, plan });
      sites.forEach((at, i) => {
        const feat = featShapeOf(c, siteOf(at));
        const F = feat.reduce((a, b) => a * b, 1);
        const rows = res.grads[i]!;
        assert.equal(rows.length, ROWS.length);
        rows.forEach((r, b) => assert.equal(r.length, ROWS[b]!.length * F, `${at} row ${b}: [positions, ${feat.join(", ")}] without padding`));
        // One flat gradient over both rows; a direction u perturbs each position of each row by an add there.
        const g = new Float32Array(rows.reduce((a, r) => a + r.length, 0));
        let o = 0;
        for (const r of rows) {
          g.set(r, o);
          o += r.length;
        }
        const check = checkGrad(g, (u, h) => {
          const ops: OracleIntervention[] = [];
          let k = 0;
          ROWS.forEach((ids, b) =>
            ids.forEach((_, t) => {
              ops.push(addAt(at, b, t, u.subarray(k, k + F).map((x) => h * x)));
              k += F;
            }),
          );
          return loss64(host, [...plan, ...ops]);
        }, 31 + i);
        assertGrad(t, `activation at ${at}`, check);
      });
    });

    test("scale at a residual, a per-head and an MLP site vs float64 finite differences", async (t) => {
      const c = host.config;
      const sites: HookName[] = [`blocks.${L}.hook_resid_mid`, `blocks.${L}.attn.hook_v`, `blocks.${L}.mlp.hook_post`];
      const params = sites.map((at, i) => {
        const F = featShapeOf(c, siteOf(at)).reduce((a, b) => a * b, 1);
        return { kind: "scale" as const, at, pos: { from: 1 }, ...(i === 1 ? { rows: [1] } : {}), vector: randVec(200 + i, F, 0.3), value: 0.7 + i };
      });
      const res = await engine.lossAndGrad(ROWS, { targets: TARGETS, params, plan });
      const asOracle = (s: number[]): OracleIntervention[] => params.map((p, i) => ({ op: "add", at: p.at, vector: p.vector, scale: s[i]!, pos: p.pos, ...(p.rows ? { rows: p.rows } : {}) }));
      params.forEach((p, i) => {
        const g = res.grads[i]![0]!;
        assert.equal(g.length, 1);
        const s = params.map((q) => q.value);
        const check = checkGrad(g, (u, h) => loss64(host, [...plan, ...asOracle(s.map((v, j) => (j === i ? v + h * u[0]! : v)))]), 51 + i);
        assertGrad(t, `scale at ${p.at}`, check);
      });
    });

    test("LoRA on every linear layer of a block: dA and dB vs float64 finite differences", async (t) => {
      const c = host.config;
      const linears: LinearName[] = ["attn.q", "attn.k", "attn.v", "attn.o", ...(c.mlp.kind === "gated" ? (["mlp.gate"] as const) : []), "mlp.up", "mlp.down"];
      const shape = (n: LinearName): [number, number] => {
        const w = host.weights.get(`blocks.${L}.${n}.weight`)!;
        return w.shape as [number, number];
      };
      const rank = 2;
      const params = linears.map((linear, i) => {
        const [out, inp] = shape(linear);
        return { kind: "lora" as const, layer: L, linear, rank, scale: 0.5, a: randVec(300 + i, rank * inp, 0.5), b: randVec(400 + i, out * rank, 0.5) };
      });
      const res = await engine.lossAndGrad(ROWS, { targets: TARGETS, params, plan });
      const base = params.map((p) => ({ a: Float64Array.from(p.a), b: Float64Array.from(p.b) }));
      const asOracle = (ab: { a: Float64Array; b: Float64Array }[]): OracleLora[] => params.map((p, i) => ({ layer: p.layer, linear: p.linear, rank, scale: p.scale, a: ab[i]!.a, b: ab[i]!.b }));
      const l64 = loss64(host, plan, asOracle(base));
      assert.ok(Math.abs(res.loss - l64) <= VALUE_TOL * Math.abs(l64), `loss ${res.loss} vs float64 ${l64}`);
      params.forEach((p, i) => {
        const [dA, dB] = res.grads[i]!;
        assert.equal(dA!.length, p.a.length);
        assert.equal(dB!.length, p.b.length);
        for (const [which, g] of [["a", dA!], ["b", dB!]] as const) {
          const check = checkGrad(g, (u, h) => loss64(host, plan, asOracle(base.map((ab, j) => (j !== i ? ab : { ...ab, [which]: ab[which].map((x, k) => x + h * u[k]!) })))), 71 + 2 * i + (which === "a" ? 0 : 1));
          assertGrad(t, `LoRA on blocks.${L}.${p.linear}: d${which.toUpperCase()}`, check);
        }
      });
    });

    test("jvpScale: reads and d(read)/d(scale) vs the float64 oracle and its central differences", async (t) => {
      const c = host.config;
      const last = c.nLayers - 1;
      const order = siteOrder(c);
      for (const [wrtAt, F] of [[`blocks.${L}.hook_resid_pre`, c.dModel], [`blocks.${L}.attn.hook_z`, c.nHeads * c.dHead]] as const) {
        const steer = { op: "add" as const, at: wrtAt as HookName, vector: randVec(500, F, 0.5), scale: 1.5, pos: { from: 1 } };
        const jplan: Plan = [...plan, steer];
        const wrt = jplan.length - 1;
        const reads: HookName[] = [`blocks.0.hook_resid_post`, `blocks.${L}.attn.hook_result`, `blocks.${L}.attn.hook_pattern`, `blocks.${last}.hook_resid_post`, `blocks.${last}.mlp.hook_post`, "ln_final.hook_normalized"];
        const res = await engine.jvpScale(ROWS, { plan: jplan, wrt, reads });
        const readsAt = (alpha: number) =>
          ROWS.map((ids, b) => oracleForward(host, ids, [...plan, { ...steer, scale: alpha }, ...reads.map((at) => ({ op: "read" as const, at }))], { row: b }).reads);
        const r0 = readsAt(steer.scale);
        // Central differences of each read at h and h/2, Richardson-extrapolated as for the loss.
        const central = (h: number) => {
          const rp = readsAt(steer.scale + h);
          const rm = readsAt(steer.scale - h);
          return (at: HookName, b: number) => rp[b]!.get(at)!.data.map((x, i) => (x - rm[b]!.get(at)!.data[i]!) / (2 * h));
        };
        const c1 = central(H);
        const c2 = central(H / 2);
        for (const at of reads) {
          const vals = res.values.get(at)!;
          const tans = res.tangents.get(at)!;
          assert.equal(vals.length, ROWS.length);
          let dv = 0, nv = 0, dt = 0, nt = 0;
          ROWS.forEach((_, b) => {
            const want = r0[b]!.get(at)!.data;
            const d1 = c1(at, b);
            const d2 = c2(at, b);
            const fd = d2.map((x, i) => (4 * x - d1[i]!) / 3);
            assert.equal(vals[b]!.length, want.length, `${at} row ${b}: layout`);
            assert.equal(tans[b]!.length, want.length);
            for (let i = 0; i < want.length; i++) {
              dv += (vals[b]![i]! - want[i]!) ** 2;
              nv += want[i]! ** 2;
              dt += (tans[b]![i]! - fd[i]!) ** 2;
              nt += fd[i]! ** 2;
            }
          });
          const relV = Math.sqrt(dv / nv);
          t.diagnostic(`d ${at} / d scale of the add at ${wrtAt}: value error ${relV.toExponential(2)}, |fd| ${Math.sqrt(nt).toExponential(2)}, tangent error ${nt > 0 ? Math.sqrt(dt / nt).toExponential(2) : Math.sqrt(dt)}`);
          assert.ok(relV <= VALUE_TOL, `${at}: values vs float64, relative ${relV}`);
          if (order.indexOf(at) < order.indexOf(wrtAt)) {
            // Upstream of the add (it fires earlier in the schedule): the derivative is exactly zero.
            assert.equal(Math.sqrt(dt), 0, `${at} is upstream of ${wrtAt}: its tangent must be zero`);
            continue;
          }
          assert.ok(nt > 0, `${at}: the add at ${wrtAt} must move it`);
          assert.ok(Math.sqrt(dt / nt) <= REL_TOL, `${at}: tangent relative error ${Math.sqrt(dt / nt)}`);
        }
      }
    });
  });
}

describe("the request API (stories fixture shapes via the llama family)", () => {
  let host: HostModel;
  let engine: Engine;
  before(() => {
    host = loadHostModel(fixtures.find((f) => f.family === "llama")!.hf);
    engine = new Engine(host);
  });
  after(() => engine?.dispose());

  test("the older lossAndGrad(rows, targets, { at, pos, value }, { plan }) equals a one-vector request", async () => {
    const at: HookName = "blocks.1.hook_mlp_out";
    const value = randVec(3, host.config.dModel, 0.1);
    const plan = constPlan(host.config, 5);
    const old = await engine.lossAndGrad(ROWS, TARGETS, { at, pos: { from: 1 }, value }, { plan });
    const req = await engine.lossAndGrad(ROWS, { targets: TARGETS, params: [{ kind: "vector", at, pos: { from: 1 }, value }], plan });
    assert.equal(old.loss, req.loss);
    assert.deepEqual(old.grad, req.grads[0]![0]);
  });

  test("bad requests are UsageErrors naming what to fix", async () => {
    const c = host.config;
    const bad = (params: TrainParam[], re: RegExp, extra: { plan?: Plan; targets?: number[][] } = {}) =>
      assert.rejects(engine.lossAndGrad(ROWS, { targets: extra.targets ?? TARGETS, params, ...(extra.plan ? { plan: extra.plan } : {}) }), (e: Error) => e instanceof UsageError && re.test(e.message));
    await bad([{ kind: "vector", at: "blocks.0.attn.hook_k", value: new Float32Array(c.dModel) }], /takes a vector of length 32 \(2x16\); value has length 64/);
    await bad([{ kind: "activation", at: "blocks.0.attn.hook_pattern" }], /read-only/);
    await bad([{ kind: "lora", layer: 9, linear: "attn.q", rank: 1, a: new Float32Array(64), b: new Float32Array(64) }], /layer 9 out of range/);
    await bad([{ kind: "lora", layer: 0, linear: "attn.k", rank: 2, a: new Float32Array(64), b: new Float32Array(64) }], /a has length 64, expected rank × in = 2 × 64/);
    const lora = { kind: "lora" as const, layer: 0, linear: "attn.q" as const, rank: 1, a: new Float32Array(64), b: new Float32Array(64) };
    await bad([lora, lora], /two adapters on blocks\.0\.attn\.q/);
    await bad([], /no params/);
    await bad([{ kind: "activation", at: "hook_embed" }], /no targets/, { targets: [[-1], [-1]] });
    await bad([{ kind: "activation", at: "hook_embed" }], /cannot contain reads/, { plan: [{ op: "read", at: "hook_embed" }] });
    await bad([{ kind: "activation", at: "hook_embed" }], /outside the vocabulary/, { targets: [[c.dVocab], []] });
    const jv = (wrt: number, plan: Plan, reads: HookName[], re: RegExp) => assert.rejects(engine.jvpScale(ROWS, { plan, wrt, reads }), (e: Error) => e instanceof UsageError && re.test(e.message));
    const add = { op: "add" as const, at: "blocks.0.hook_resid_pre" as const, vector: new Float32Array(c.dModel) };
    await jv(1, [add], ["blocks.1.hook_resid_pre"], /wrt 1 is not an index of the plan/);
    await jv(0, [{ op: "ablate", at: "blocks.0.attn.hook_z", mode: "zero" }], ["blocks.1.hook_resid_pre"], /is a ablate; the derivative is with respect to the scale of an add/);
    await jv(0, [add], [], /reads is empty/);
    await jv(0, [add, { op: "read", at: "hook_embed" }], ["hook_embed"], /list the sites to differentiate in reads/);
  });

  test("Model.lossAndGrad on the cpu device differentiates the model's own engine (no jax-js copy)", async () => {
    const m = await Model.load(BUNDLED_MODEL, { device: "cpu", threads: 1 });
    try {
      const ids = [1, 403, 407, 261, 378];
      const r = await m.lossAndGrad([{ ids }], { targets: [[403, 407, 261, 378, 432]], params: [{ kind: "activation", at: "blocks.2.hook_resid_post" }] });
      // The cpu engine's own forward gives the same loss (same weights, f32 both).
      const { logits } = await m.forward([{ ids }]);
      const V = m.config.dVocab;
      let sum = 0;
      [403, 407, 261, 378, 432].forEach((y, t) => {
        const z = logits[0]!.subarray(t * V, (t + 1) * V);
        const mx = Math.max(...z);
        sum += Math.log(z.reduce((a, x) => a + Math.exp(x - mx), 0)) + mx - z[y]!;
      });
      assert.ok(Math.abs(r.loss - sum / 5) <= 1e-4 * (sum / 5), `lossAndGrad loss ${r.loss} vs the cpu forward's ${sum / 5}`);
    } finally {
      m.dispose();
    }
  });
});

describe("gradients on WebGPU", () => {
  let skip: string | undefined;
  before(async () => {
    try {
      await initDevice("webgpu");
    } catch (e) {
      if (process.env.CI || !(e instanceof SelfscopeError)) throw e;
      skip = `no WebGPU adapter: ${e.message.split(";")[0]}`;
    }
  });
  after(() => initDevice("wasm"));

  test("gemma2 fixture (sandwich norms, soft-capping): lossAndGrad and jvpScale on webgpu equal the wasm engine's (checked above against float64)", async (t) => {
    if (skip) return t.skip(skip);
    const host = loadHostModel(fixtures.find((f) => f.family === "gemma2")!.hf);
    const c = host.config;
    const plan = constPlan(c, 11);
    const rank = 2;
    const req = {
      targets: TARGETS,
      plan,
      params: [
        { kind: "vector" as const, at: "blocks.1.attn.hook_z" as const, pos: { from: 1 }, value: randVec(1, c.nHeads * c.dHead, 0.05) },
        { kind: "lora" as const, layer: 1, linear: "attn.o" as const, rank, scale: 0.5, a: randVec(2, rank * c.nHeads * c.dHead, 0.5), b: randVec(3, c.dModel * rank, 0.5) },
        { kind: "activation" as const, at: "blocks.1.attn.hook_result" as const },
      ],
    };
    const jreq = { plan: [...plan, { op: "add" as const, at: "blocks.1.hook_resid_pre" as const, vector: randVec(4, c.dModel, 0.5), scale: 1.5 }], wrt: plan.length, reads: ["blocks.3.hook_resid_post" as const] };
    const run = async (device: "wasm" | "webgpu") => {
      await initDevice(device);
      const e = new Engine(host, { maxBindingBytes: 4096 });
      try {
        return { g: await e.lossAndGrad(ROWS, req), j: await e.jvpScale(ROWS, jreq) };
      } finally {
        e.dispose();
      }
    };
    const gpu = await run("webgpu");
    const cpu = await run("wasm");
    const rel = (a: ArrayLike<number>, b: ArrayLike<number>) => Math.sqrt(Array.from(a).reduce((s, x, i) => s + (x - b[i]!) ** 2, 0) / Array.from(b).reduce((s, x) => s + x * x, 0));
    assert.ok(Math.abs(gpu.g.loss - cpu.g.loss) <= 1e-5 * cpu.g.loss);
    let worst = 0;
    gpu.g.grads.forEach((gs, i) => gs.forEach((g, j) => (worst = Math.max(worst, rel(g, cpu.g.grads[i]![j]!)))));
    for (const b of [0, 1]) worst = Math.max(worst, rel(gpu.j.tangents.get("blocks.3.hook_resid_post")![b]!, cpu.j.tangents.get("blocks.3.hook_resid_post")![b]!));
    t.diagnostic(`webgpu vs wasm: worst relative error of the gradients and tangents ${worst.toExponential(2)}`);
    assert.ok(worst <= REL_TOL, `webgpu gradients differ from wasm by ${worst}`);
  });
});
