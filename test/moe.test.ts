// Mixture-of-experts families (issue 16 §5): Qwen3-MoE, OLMoE and Mixtral on the cpu engine. For
// each family a tiny synthetic checkpoint (8 experts, 2 per token; scripts/make-fixtures.ts) is
// written as a Hugging Face folder (one tensor per expert) and as the GGUF llama.cpp's converter
// makes (experts stacked per matrix), and:
//   (a) both load to the same config and canonical weights, and give the same logits;
//   (b) logits match an independent float64 implementation (test/support/oracle64.ts) and
//       llama.cpp, and the 32-token greedy continuation equals llama.cpp's;
//   (c) the routing is exercised (many experts used; dense mixing or flipped renormalisation
//       moves the logits);
//   (d) the router/expert hook sites read and intervene exactly as the float64 reference does;
//   (e) Q8_0 experts computed natively equal the f32 path up to summation order.
import { after, before, describe, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { MOE_FIXTURE_FAMILIES, makeFixtures, type FixturePaths, type MoeFixtureFamily } from "../scripts/make-fixtures.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import { initDevice } from "../src/engine/device.js";
import { Engine } from "../src/engine/jax/engine.js";
import { siteOrder } from "../src/engine/schedule.js";
import { hookNames, type HookName } from "../src/hooks/names.js";
import type { Plan } from "../src/hooks/plan.js";
import { GgmlType, GgufValueType, ggufMetadataForWrite, readGguf, readGgufTensor, writeGguf } from "../src/io/gguf.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { Model } from "../src/model/model.js";
import { assertClose, maxAbsDiff } from "./support/compare.js";
import { LlamaCppLite, type LiteRun } from "./support/llamacpp-lite.js";
import { crossEntropySum, logSoftmax, oracleForward, oracleGreedy, type OraclePlan } from "./support/oracle64.js";

const PROMPT = [5, 77, 123, 9, 250, 31, 64, 200, 17, 99, 140, 8, 260, 45, 12, 180];
const N_GEN = 32;
const SAME_TOL = 1e-5;
const REF_TOL = 1e-4;
const CHANGED = 1e-3;
const LAYER = 1;

const rows = (flat: ArrayLike<number>, V: number) => Array.from({ length: flat.length / V }, (_, t) => logSoftmax(Array.from({ length: V }, (_, i) => flat[t * V + i]!)));
const rowsDiff = (a: Float64Array[], b: Float64Array[]) => Math.max(...a.map((r, t) => maxAbsDiff(r, b[t]!)));
const argmax = (x: ArrayLike<number>) => {
  let b = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[b]!) b = i;
  return b;
};
const moeOf = (h: HostModel) => {
  if (h.config.mlp.kind !== "moe") throw new Error("not a MoE fixture");
  return h.config.mlp;
};

let dir = "";
let fixtures = new Map<MoeFixtureFamily, FixturePaths<MoeFixtureFamily>>();
let lc: LlamaCppLite | undefined;
let noLlamaCpp = "";

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-moe-"));
  fixtures = new Map(makeFixtures(dir, MOE_FIXTURE_FAMILIES).map((p) => [p.family, p]));
  try {
    lc = await LlamaCppLite.open();
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    if (process.env.CI) throw new Error(`the llama.cpp reference must run in CI, but: ${msg}`, { cause: e });
    noLlamaCpp = `no llama.cpp reference (node-llama-cpp): ${msg}`;
  }
});

after(async () => {
  await lc?.dispose();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function needRef(t: TestContext, ref: LiteRun | undefined): ref is LiteRun {
  if (ref) return true;
  if (process.env.CI) assert.fail("the llama.cpp reference failed to load (see the before hook)");
  t.skip(noLlamaCpp);
  return false;
}

for (const family of MOE_FIXTURE_FAMILIES) {
  describe(family, () => {
    let hf: HostModel;
    let gg: HostModel;
    let cpu: CpuEngine; // on the lazily loaded GGUF
    let ours: Float32Array;
    let ref: LiteRun | undefined;
    let ref64: Float64Array[];

    before(async () => {
      const p = fixtures.get(family)!;
      hf = loadHostModel(p.hf);
      gg = loadHostModel(p.gguf);
      cpu = await CpuEngine.create(loadHostModel(p.gguf, undefined, { lazy: true }), { threads: 2 });
      ours = (await cpu.forward([PROMPT])).logits[0]!;
      ref = await lc?.run(p.gguf, PROMPT, N_GEN);
      ref64 = oracleForward(hf, PROMPT).logits.map(logSoftmax);
    });
    after(async () => {
      await cpu?.close();
    });

    test("HF folder and GGUF load to the same config, weights and logits", async () => {
      assert.equal(gg.config.family, family);
      assert.deepEqual(gg.config.mlp, hf.config.mlp);
      assert.equal(hf.config.mlp.kind, "moe");
      for (const k of ["dModel", "nLayers", "nHeads", "nKvHeads", "dHead", "dMlp", "dVocab", "qkNorm", "tieEmbeddings", "layerTypes"] as const) assert.deepEqual(gg.config[k], hf.config[k], `config.${k}`);
      assert.deepEqual([...gg.weights.keys()].sort(), [...hf.weights.keys()].sort());
      assert.ok(hf.weights.has(`blocks.0.mlp.experts.7.down.weight`) && hf.weights.has("blocks.3.mlp.router.weight"));
      for (const [name, t] of hf.weights) {
        const u = gg.weights.get(name)!;
        assert.deepEqual(u.shape, t.shape, `${name} shape`);
        assert.equal(maxAbsDiff(u.data, t.data), 0, `${name} differs`);
      }
      const e = await CpuEngine.create(hf, { threads: 2 });
      try {
        const d = maxAbsDiff((await e.forward([PROMPT])).logits[0]!, ours);
        assert.ok(d <= SAME_TOL, `HF vs GGUF logits differ by ${d}`);
      } finally {
        await e.close();
      }
    });

    test("logits match the float64 reference and llama.cpp", (t) => {
      const V = gg.config.dVocab;
      const mine = rows(ours, V);
      const d64 = rowsDiff(mine, ref64);
      assert.ok(d64 <= REF_TOL, `vs float64: max |Δ log p| ${d64}`);
      if (!needRef(t, ref)) return;
      const dLc = rowsDiff(mine, ref.logprobs);
      mine.forEach((r, i) => assert.equal(argmax(r), argmax(ref!.logprobs[i]!), `argmax at position ${i}`));
      assert.ok(dLc <= REF_TOL, `vs llama.cpp: max |Δ log p| ${dLc}`);
      t.diagnostic(`${family}: max |Δ log p| vs float64 ${d64.toExponential(2)}, vs llama.cpp ${dLc.toExponential(2)} [${ref.info}]`);
    });

    test(`${N_GEN}-token greedy continuation equals llama.cpp's (KV-cached decode)`, async (t) => {
      if (!needRef(t, ref)) return;
      const mine = (await cpu.generate([PROMPT], { maxTokens: N_GEN, stop: [] })).tokens[0]!;
      assert.deepEqual(mine, ref.greedy);
      assert.ok(new Set(mine).size >= 4, `continuation too repetitive to be a test: ${mine.join(" ")}`);
    });

    test("the routing is exercised: many experts used; dense mixing or flipped renormalisation moves the logits", async (t) => {
      const m = moeOf(gg);
      const w: HookName[] = Array.from({ length: gg.config.nLayers }, (_, l) => `blocks.${l}.mlp.hook_expert_weights` as HookName);
      const r = await cpu.forward([PROMPT], { plan: w.map((at) => ({ op: "read" as const, at })) });
      const used = new Set<string>();
      for (const at of w) {
        const d = r.cache.get(at).data;
        for (let tk = 0; tk < PROMPT.length; tk++) {
          const row = d.subarray(tk * m.nExperts, (tk + 1) * m.nExperts);
          const nz = [...row].flatMap((x, e) => (x !== 0 ? [e] : []));
          assert.equal(nz.length, m.topK, `${at} position ${tk}: ${nz.length} experts weighted`);
          const sum = nz.reduce((a, e) => a + row[e]!, 0);
          if (m.normTopK) assert.ok(Math.abs(sum - 1) <= 1e-6, `${at}: weights sum to ${sum}`);
          else assert.ok(sum < 1, `${at}: unnormalised top-k weights sum to ${sum}`);
          for (const e of nz) used.add(`${at}/${e}`);
        }
      }
      assert.ok(used.size >= 3 * gg.config.nLayers, `only ${used.size} (layer, expert) pairs used`);
      const moved: string[] = [];
      for (const [name, mlp] of [
        ["every expert mixed (topK = nExperts)", { ...m, topK: m.nExperts }],
        ["top-k renormalisation flipped", { ...m, normTopK: !m.normTopK }],
      ] as const) {
        const e = await CpuEngine.create({ config: { ...gg.config, mlp }, weights: gg.weights }, { threads: 1 });
        try {
          const d = maxAbsDiff((await e.forward([PROMPT])).logits[0]!, ours);
          moved.push(`${name} ${d.toFixed(3)}`);
          assert.ok(d > CHANGED, `${name}: logits moved by only ${d}`);
        } finally {
          await e.close();
        }
      }
      t.diagnostic(`${family}: ${used.size} (layer, expert) pairs routed to; max |Δ logit|: ${moved.join("; ")}`);
    });

    test("router, expert-weight and per-expert output sites read as the float64 reference's; the experts' outputs sum to mlp.hook_down", async () => {
      const sites: HookName[] = (["mlp.hook_router_logits", "mlp.hook_expert_weights", "mlp.hook_expert_out", "mlp.hook_down"] as const).map((s) => `blocks.${LAYER}.${s}` as HookName);
      const r = await cpu.forward([PROMPT], { plan: sites.map((at) => ({ op: "read" as const, at })) });
      const o = oracleForward(hf, PROMPT, sites.map((at) => ({ op: "read", at })));
      for (const at of sites) assertClose(r.cache.get(at).data, o.reads.get(at)!.data, { atol: 1e-5, rtol: 1e-4, what: at });
      const E = moeOf(gg).nExperts, D = gg.config.dModel;
      const eo = r.cache.get(sites[2]!).data, down = r.cache.get(sites[3]!).data;
      for (let tk = 0; tk < PROMPT.length; tk++)
        for (let i = 0; i < D; i++) {
          let s = 0;
          for (let e = 0; e < E; e++) s += eo[(tk * E + e) * D + i]!;
          assert.ok(Math.abs(s - down[tk * D + i]!) <= 1e-6, `position ${tk}: Σ expert_out ≠ hook_down`);
        }
      // Reading the per-expert outputs changes nothing downstream.
      assert.equal(maxAbsDiff((await cpu.forward([PROMPT], { plan: [{ op: "read", at: sites[2]! }] })).logits[0]!, ours), 0);
    });

    test("interventions on the router and the experts match the float64 reference (forward and KV-cached greedy)", async (t) => {
      const E = moeOf(gg).nExperts, D = gg.config.dModel, V = gg.config.dVocab;
      // The expert most used at LAYER, to ablate; a router push towards the least used one.
      const w = oracleForward(hf, PROMPT, [{ op: "read", at: `blocks.${LAYER}.mlp.hook_expert_weights` }]).reads.get(`blocks.${LAYER}.mlp.hook_expert_weights`)!.data;
      const load = Array.from({ length: E }, (_, e) => PROMPT.reduce((a, _x, tk) => a + (w[tk * E + e]! !== 0 ? 1 : 0), 0));
      const top = load.indexOf(Math.max(...load)), rare = load.indexOf(Math.min(...load));
      const push = new Float32Array(E);
      push[rare] = 6;
      const extra = new Float32Array(E);
      extra[rare] = 0.5; // a weight on an expert the router did not pick: it must be computed
      const plans: [string, Plan][] = [
        [`ablate expert ${top}'s output`, [{ op: "ablate", at: `blocks.${LAYER}.mlp.hook_expert_out`, mode: "zero", heads: [top] }]],
        [`router logit of expert ${rare} +6 from position 4`, [{ op: "add", at: `blocks.${LAYER}.mlp.hook_router_logits`, vector: push, pos: { from: 4 } }]],
        [`weight 0.5 added to expert ${rare}`, [{ op: "add", at: `blocks.${LAYER}.mlp.hook_expert_weights`, vector: extra }]],
        ["steering vector on the residual (changes every later routing)", [{ op: "add", at: `blocks.0.hook_resid_post`, vector: Float32Array.from({ length: D }, (_, i) => Math.sin(i) * 2) }]],
      ];
      const lines: string[] = [];
      for (const [name, plan] of plans) {
        const mine = rows((await cpu.forward([PROMPT], { plan })).logits[0]!, V);
        const theirs = oracleForward(hf, PROMPT, plan as OraclePlan).logits.map(logSoftmax);
        const d = rowsDiff(mine, theirs);
        const moved = rowsDiff(theirs, ref64);
        assert.ok(d <= REF_TOL, `${name}: vs float64 ${d}`);
        assert.ok(moved > CHANGED, `${name}: the intervention moved nothing (${moved})`);
        const g = (await cpu.generate([PROMPT], { maxTokens: 8, stop: [], plan })).tokens[0]!;
        assert.deepEqual(g, oracleGreedy(hf, PROMPT, 8, plan as OraclePlan), `${name}: greedy`);
        lines.push(`${name}: moved ${moved.toFixed(3)}, vs float64 ${d.toExponential(1)}`);
      }
      t.diagnostic(`${family}: ${lines.join("; ")}`);
    });
  });
}

describe("gradients through mixture-of-experts blocks (cpu and jax-js engines) match float64 finite differences", () => {
  const TARGETS = [-1, 77, 123, 9, 250, 31, 64, 200, 17, 99, 140, 8, 260, 45, 12, 180].map((t, i) => (i === 0 ? -1 : PROMPT[i]!));
  const H_FD = 1e-4;
  const rand = (n: number, seed: number, scale: number) => {
    let x = seed;
    return Float32Array.from({ length: n }, () => ((x = (x * 1103515245 + 12345) % 2147483648) / 2147483648 - 0.5) * scale);
  };
  for (const engine of ["cpu", "jax"] as const)
  for (const family of MOE_FIXTURE_FAMILIES) {
    test(`${family} [${engine}]: ∂CE/∂ vectors at the residual stream, the router logits and the per-expert outputs${engine === "jax" ? " and the expert weights" : ""}`, async (t) => {
      const host = loadHostModel(fixtures.get(family)!.hf);
      const { dModel: D } = host.config;
      const E = moeOf(host).nExperts;
      const e = engine === "cpu" ? await CpuEngine.create(host, { threads: 2 }) : new Engine(host);
      try {
        const params = [
          { at: "blocks.0.hook_resid_post" as HookName, n: D },
          { at: "blocks.1.mlp.hook_router_logits" as HookName, n: E },
          { at: "blocks.2.mlp.hook_expert_out" as HookName, n: E * D },
          { at: "blocks.3.ln2.hook_normalized" as HookName, n: D },
          // The jax-js engine runs every expert densely, so its derivative at the expert weights exists.
          ...(engine === "jax" ? [{ at: "blocks.1.mlp.hook_expert_weights" as HookName, n: E }] : []),
        ].map((x, i) => ({ ...x, value: rand(x.n, 7 + i, 0.2) }));
        const r = await e.lossAndGrad([PROMPT], { params: params.map((x) => ({ kind: "vector" as const, at: x.at, value: x.value })), targets: [TARGETS] });
        const loss = (plan: OraclePlan) => {
          const { sum, n } = crossEntropySum(oracleForward(host, PROMPT, plan).logits, TARGETS);
          return sum / n;
        };
        const base: OraclePlan = params.map((x) => ({ op: "add", at: x.at, vector: x.value }));
        assert.ok(Math.abs(r.loss - loss(base)) <= 1e-4, `loss ${r.loss} vs float64 ${loss(base)}`);
        const lines: string[] = [];
        params.forEach((x, i) => {
          // The directional derivative along a random unit-scale direction, by central differences.
          const u = rand(x.n, 100 + i, 1);
          const at = (h: number) => loss(params.map((y, j) => ({ op: "add" as const, at: y.at, vector: j === i ? y.value.map((v, k) => v + h * u[k]!) : y.value })));
          const want = (at(H_FD) - at(-H_FD)) / (2 * H_FD);
          const g = r.grads[i]![0]!;
          let got = 0;
          for (let k = 0; k < x.n; k++) got += g[k]! * u[k]!;
          lines.push(`${x.at} ${got.toExponential(3)} vs ${want.toExponential(3)}`);
          assert.ok(Math.abs(want) > 1e-4, `${x.at}: the finite difference is ${want} (a vacuous check)`);
          assert.ok(Math.abs(got - want) <= 2e-3 * Math.abs(want) + 1e-5, `${x.at}: ∂ along u ${got} vs finite differences ${want}`);
        });
        t.diagnostic(`${family}: ${lines.join("; ")}`);
        // The cpu engine refuses gradients at the expert weights (unrouted experts are not run).
        if (engine === "cpu") await assert.rejects(e.lossAndGrad([PROMPT], { params: [{ kind: "vector", at: "blocks.1.mlp.hook_expert_weights", value: new Float32Array(E) }], targets: [TARGETS] }), /gradients at mlp\.hook_expert_weights are not supported/);
      } finally {
        if (e instanceof CpuEngine) await e.close();
        else e.dispose();
      }
    });
  }
});

describe("forward-mode derivatives through mixture-of-experts blocks (cpu engine) match float64 finite differences", () => {
  const H_FD = 1e-4;
  for (const family of MOE_FIXTURE_FAMILIES) {
    test(`${family}: d(reads)/d(scale) of a residual add, and of a weight on an expert the router did not pick (at scale 0)`, async (t) => {
      const host = loadHostModel(fixtures.get(family)!.hf);
      const { dModel: D } = host.config;
      const E = moeOf(host).nExperts;
      const e = await CpuEngine.create(host, { threads: 2 });
      try {
        const reads: HookName[] = ["blocks.3.hook_resid_post", "blocks.2.mlp.hook_router_logits", "blocks.2.mlp.hook_expert_weights", "blocks.2.mlp.hook_expert_out"];
        // The expert of layer 1 least used over the prompt: an add of weight on it switches it on.
        const w = oracleForward(host, PROMPT, [{ op: "read", at: "blocks.1.mlp.hook_expert_weights" }]).reads.get("blocks.1.mlp.hook_expert_weights")!.data;
        const rare = Array.from({ length: E }, (_, x) => PROMPT.reduce((a, _p, tk) => a + (w[tk * E + x]! !== 0 ? 1 : 0), 0)).reduce((b, v, x, all) => (v < all[b]! ? x : b), 0);
        const onRare = new Float32Array(E);
        onRare[rare] = 1;
        const cases: [string, Plan][] = [
          ["residual add (scale 1.5)", [{ op: "add", at: "blocks.0.hook_resid_post", vector: Float32Array.from({ length: D }, (_, i) => Math.cos(i) * 0.3), scale: 1.5 }]],
          [`weight on expert ${rare} of layer 1 (scale 0)`, [{ op: "add", at: "blocks.1.mlp.hook_expert_weights", vector: onRare, scale: 0 }]],
        ];
        const lines: string[] = [];
        for (const [name, plan] of cases) {
          const r = await e.jvpScale([PROMPT], { plan, wrt: 0, reads });
          const s0 = (plan[0] as { scale: number }).scale;
          const at = (h: number) => oracleForward(host, PROMPT, [{ ...(plan[0] as OraclePlan[number]), scale: s0 + h } as OraclePlan[number], ...reads.map((at) => ({ op: "read" as const, at }))]).reads;
          const up = at(H_FD), dn = at(-H_FD);
          for (const rd of reads) {
            const got = r.tangents.get(rd)![0]!;
            const a = up.get(rd)!.data, b = dn.get(rd)!.data;
            let worst = 0, scale = 0;
            for (let i = 0; i < got.length; i++) {
              const fd = (a[i]! - b[i]!) / (2 * H_FD);
              worst = Math.max(worst, Math.abs(got[i]! - fd));
              scale = Math.max(scale, Math.abs(fd));
            }
            assert.ok(worst <= 2e-3 * scale + 1e-5, `${name}: d ${rd}/d scale off by ${worst} (largest ${scale})`);
            if (rd === "blocks.3.hook_resid_post") {
              assert.ok(scale > 1e-3, `${name}: the derivative at ${rd} is ${scale} (a vacuous check)`);
              lines.push(`${name}: max |d resid/d scale| ${scale.toExponential(2)}, off by ${worst.toExponential(1)}`);
            }
          }
        }
        t.diagnostic(`${family}: ${lines.join("; ")}`);
      } finally {
        await e.close();
      }
    });
  }
});

describe("the jax-js engine (wasm) runs mixture-of-experts blocks densely and equals the cpu engine and float64", () => {
  for (const family of MOE_FIXTURE_FAMILIES) {
    test(`${family}: logits, MoE site reads, an expert switched on and greedy decode`, async () => {
      const host = loadHostModel(fixtures.get(family)!.hf);
      const c = host.config;
      const moe = moeOf(host);
      const V = c.dVocab;
      const jx = new Engine(host);
      const cpu = await CpuEngine.create(host, { threads: 1 });
      try {
        const at = (s: string) => `blocks.${LAYER}.mlp.${s}` as HookName;
        const reads: Plan = (["hook_router_logits", "hook_expert_weights", "hook_expert_out"] as const).map((s) => ({ op: "read" as const, at: at(s) }));
        const a = await jx.forward([PROMPT], { plan: reads });
        const b = await cpu.forward([PROMPT], { plan: reads });
        const d64 = rowsDiff(rows(a.logits[0]!, V), oracleForward(host, PROMPT).logits.map(logSoftmax));
        assert.ok(d64 <= REF_TOL, `vs float64: max |Δ log p| ${d64}`);
        for (const r of reads) {
          const x = a.cache.get(r.at)!;
          const y = b.cache.get(r.at)!;
          assert.deepEqual(x.shape, y.shape, `${r.at} shape`);
          const d = maxAbsDiff(x.data, y.data);
          assert.ok(d <= 1e-4, `${r.at}: jax vs cpu ${d}`);
        }
        // Exactly topK experts carry weight at every position (the dense einsum's mask is right).
        const ew = a.cache.get(at("hook_expert_weights"))!.data;
        for (let t = 0; t < PROMPT.length; t++) {
          let nz = 0;
          for (let e = 0; e < moe.nExperts; e++) if (ew[t * moe.nExperts + e] !== 0) nz++;
          assert.equal(nz, moe.topK, `position ${t}: ${nz} experts weighted`);
        }
        // Switching on an unrouted expert through hook_expert_weights: both engines, against float64.
        const pos = 3;
        const off = Array.from({ length: moe.nExperts }, (_, e) => e).find((e) => ew[pos * moe.nExperts + e] === 0)!;
        const vec = new Float32Array(moe.nExperts);
        vec[off] = 0.5;
        const plan: Plan = [{ op: "add", at: at("hook_expert_weights"), vector: vec, pos: { from: pos } }];
        const ja = rows((await jx.forward([PROMPT], { plan })).logits[0]!, V);
        const ref = oracleForward(host, PROMPT, plan as OraclePlan).logits.map(logSoftmax);
        const dPlan = rowsDiff(ja, ref);
        assert.ok(dPlan <= REF_TOL, `switched-on expert vs float64: ${dPlan}`);
        assert.ok(rowsDiff(ja, rows(a.logits[0]!, V)) > CHANGED, "the switched-on expert changed nothing");
        const g = (await jx.generate([PROMPT], { maxTokens: 8, stop: [] })).tokens[0]!;
        assert.deepEqual(g, oracleGreedy(host, PROMPT, 8));
      } finally {
        jx.dispose();
        await cpu.close();
      }
    });
  }
  test("on WebGPU (lavapipe here) the MoE fixtures compute the wasm logits, reads of the expert outputs included", async (t) => {
    const at = `blocks.${LAYER}.mlp.hook_expert_out` as HookName;
    const want = new Map<MoeFixtureFamily, { logits: Float32Array; out: Float32Array }>();
    for (const f of MOE_FIXTURE_FAMILIES) {
      const e = new Engine(loadHostModel(fixtures.get(f)!.hf));
      try {
        const r = await e.forward([PROMPT], { plan: [{ op: "read", at }] });
        want.set(f, { logits: r.logits[0]!, out: r.cache.get(at)!.data });
      } finally {
        e.dispose();
      }
    }
    let info;
    try {
      info = await initDevice("webgpu");
    } catch (e) {
      if (process.env.CI) throw new Error(`WebGPU must run in CI, but: ${(e as Error).message}`, { cause: e });
      t.skip(`no WebGPU adapter (${(e as Error).message.split(".")[0]})`);
      return;
    }
    try {
      for (const f of MOE_FIXTURE_FAMILIES) {
        const e = new Engine(loadHostModel(fixtures.get(f)!.hf), { maxBindingBytes: info.maxBindingBytes });
        try {
          const r = await e.forward([PROMPT], { plan: [{ op: "read", at }] });
          const w = want.get(f)!;
          assert.ok(maxAbsDiff(r.logits[0]!, w.logits) <= REF_TOL, `${f}: webgpu vs wasm logits differ by ${maxAbsDiff(r.logits[0]!, w.logits)}`);
          assertClose(r.cache.get(at)!.data, w.out, { atol: REF_TOL, rtol: REF_TOL, what: `${f}: webgpu vs wasm read of ${at}` });
        } finally {
          e.dispose();
        }
      }
    } finally {
      await initDevice("wasm");
    }
  });
});

describe("MoE models: sites, engines and configuration errors", () => {
  test("the cpu engine fires exactly the schedule's sites (the MoE sites instead of mlp.hook_pre/post), in forward and decode", async () => {
    const host = loadHostModel(fixtures.get("qwen3moe")!.gguf);
    const c = host.config;
    const order = siteOrder(c);
    assert.deepEqual(order, hookNames(c.nLayers, () => true, { moe: true }));
    assert.ok(order.includes("blocks.0.mlp.hook_expert_out") && !order.includes("blocks.0.mlp.hook_pre"));
    const e = await CpuEngine.create(host, { threads: 1 });
    try {
      e.siteTrace = [];
      await e.forward([PROMPT]);
      assert.deepEqual(e.siteTrace, order);
      e.siteTrace = [];
      await e.generate([PROMPT], { maxTokens: 3, stop: [] });
      assert.deepEqual(e.siteTrace, [...order, ...order, ...order]);
      // Dense-MLP sites on a MoE model, and gradients, are clear errors.
      await assert.rejects(e.forward([PROMPT], { plan: [{ op: "read", at: "blocks.0.mlp.hook_post" }] }), /mixtures of 8 experts.*mlp\.hook_router_logits/);

    } finally {
      await e.close();
    }
  });

  test("MoE sites on a dense model are a clear error", async () => {
    const p = makeFixtures(dir, ["qwen3"])[0]!;
    const e = await CpuEngine.create(loadHostModel(p.gguf), { threads: 1 });
    try {
      await assert.rejects(e.forward([PROMPT], { plan: [{ op: "read", at: "blocks.0.mlp.hook_expert_weights" }] }), /dense \(not a mixture of experts\)/);
    } finally {
      await e.close();
    }
  });

  test("configuration errors name the file and the key", () => {
    const src = fixtures.get("qwen3moe")!.hf;
    const edit = (name: string, patch: Record<string, unknown>) => {
      const d = path.join(dir, name);
      fs.mkdirSync(d, { recursive: true });
      for (const f of fs.readdirSync(src)) fs.copyFileSync(path.join(src, f), path.join(d, f));
      const cfg = JSON.parse(fs.readFileSync(path.join(src, "config.json"), "utf8")) as Record<string, unknown>;
      fs.writeFileSync(path.join(d, "config.json"), JSON.stringify({ ...cfg, ...patch }));
      return d;
    };
    assert.throws(() => loadHostModel(edit("topk", { num_experts_per_tok: 9 })), /config\.json.*routes each token to 9 experts of 8/);
    assert.throws(() => loadHostModel(edit("dense-layers", { mlp_only_layers: [1] })), /config\.json.*mlp_only_layers = \[1\]/);
    assert.throws(() => loadHostModel(edit("experts", { num_experts: 6 })), /model\.safetensors: tensor model\.layers\.0\.mlp\.gate\.weight has shape \[8,64\] but the config implies \[6,64\]/);
    assert.throws(() => loadHostModel(edit("experts0", { num_experts: 0 })), /num_experts = 0 must be a positive integer/);
  });

  test("a GGUF whose stacked experts disagree with expert_count is refused", () => {
    const src = fixtures.get("olmoe")!.gguf;
    const g = readGguf(src);
    const file = path.join(dir, "olmoe-6.gguf");
    const meta = ggufMetadataForWrite(g, { "olmoe.expert_count": { type: GgufValueType.UINT32, value: 6 } });
    // Routers cut to 6 experts, the stacked expert tensors left with 8.
    writeGguf(file, meta, [...g.tensors.keys()].map((name) => {
      const t = readGgufTensor(g, name);
      const cut = name.endsWith("ffn_gate_inp.weight") ? { data: t.data.slice(0, 6 * t.shape[1]!), shape: [6, t.shape[1]!] } : t;
      return { name, ...cut, type: GgmlType.F32 };
    }));
    assert.throws(() => loadHostModel(file), /stacks 8 experts but the config has 6/);
  });
});

describe("Q8_0 experts on the cpu engine (Mixtral fixture, every 32-aligned matrix in Q8_0)", () => {
  test("the experts stay quantized, one slab each, and compute the f32 path's logits up to summation order", async (t) => {
    const src = fixtures.get("mixtral")!.gguf;
    const g = readGguf(src);
    const file = path.join(dir, "mixtral-q8_0.gguf");
    writeGguf(file, ggufMetadataForWrite(g), [...g.tensors.keys()].map((name) => {
      const tt = readGgufTensor(g, name);
      return { name, ...tt, type: tt.shape.length >= 2 && tt.shape.at(-1)! % 32 === 0 ? GgmlType.Q8_0 : GgmlType.F32 };
    }));
    const f32 = await Model.load(file, { threads: 1, weights: "f32" });
    const q8 = await Model.load(file, { threads: 1 });
    try {
      const mats = (m: Model) => (m as unknown as { engine: { quantizedMats: number } }).engine.quantizedMats;
      // Per layer: qkv, o, router, and per expert gate|up and down; plus embedding and output.
      assert.equal(mats(q8), 4 * (3 + 2 * 8) + 2);
      const a = (await f32.forward([{ ids: PROMPT }])).logits[0]!;
      const b = (await q8.forward([{ ids: PROMPT }])).logits[0]!;
      const d = maxAbsDiff(a, b);
      assert.ok(d <= 2e-5, `max |Δ logit| ${d}`);
      assert.deepEqual((await q8.generate([{ ids: PROMPT }], { maxTokens: 16, stop: [] })).tokens, (await f32.generate([{ ids: PROMPT }], { maxTokens: 16, stop: [] })).tokens);
      if (lc) {
        const r = await lc.run(file, PROMPT, 16);
        const mine = rows(b, f32.config.dVocab);
        const dLc = rowsDiff(mine, r.logprobs);
        const top1 = mine.filter((row, i) => argmax(row) === argmax(r.logprobs[i]!)).length;
        t.diagnostic(`mixtral q8_0: native vs f32 path max |Δ logit| ${d.toExponential(2)}; vs llama.cpp on the same file max |Δ log p| ${dLc.toExponential(2)}, top-1 ${top1}/${PROMPT.length}`);
        // llama.cpp quantizes the activations to 8 bits per 32 for its Q8_0 dot products (we do not).
        assert.ok(dLc <= 0.15, `vs llama.cpp: ${dLc}`);
        assert.ok(top1 >= PROMPT.length - 1, `top-1 agreement with llama.cpp ${top1}/${PROMPT.length}`);
      }
    } finally {
      f32.dispose();
      q8.dispose();
    }
  });
});
