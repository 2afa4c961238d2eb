// The jax-js engine's new hook sites against the float64 oracle (test/support/oracle64.ts) on
// every family fixture: ln1.hook_normalized and ln2.hook_normalized (the attention and MLP
// inputs) and attn.hook_result (per-head o-projection [nHeads, dModel], no bias, before ln1Post).
// Reads at every layer, and every op each site takes (add, project on the 1-D sites, patch, zero-
// and mean-ablate, per head on hook_result), compared by log-probabilities; each op must move the
// logits, so no comparison is vacuous. Weight row-chunking (maxBindingBytes) gives the same
// results through the per-head path, LoRA on attn.o included; on WebGPU (skipped without an
// adapter unless CI), f16 weights on the untied families match the oracle run on the same
// weights rounded to f16.
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { f16round } from "@petamoriken/float16";
import { after, before, describe, test } from "node:test";
import { FIXTURE_FAMILIES, makeFixtures, type FixtureFamily, type FixturePaths } from "../scripts/make-fixtures.js";
import { SelfscopeError } from "../src/core/errors.js";
import { Rng } from "../src/core/rng.js";
import { initDevice } from "../src/engine/device.js";
import { Engine } from "../src/engine/jax/engine.js";
import type { HookName } from "../src/hooks/names.js";
import type { Plan } from "../src/hooks/plan.js";
import { loadHostModel, type HostModel, type HostTensor } from "../src/model/load.js";
import { maxAbsDiff } from "./support/compare.js";
import { logSoftmax, oracleForward, type OraclePlan } from "./support/oracle64.js";

const PROMPT = [5, 77, 123, 9, 250, 31, 64, 200];
const OTHER = [17, 99, 140, 8, 260, 45, 12, 180];
const REF_TOL = 1e-4; // max |Δ log p| and relative L2 of reads, float32 engine vs float64 oracle
const SAME_TOL = 1e-5; // chunked vs unchunked weights (same float32 math, other shapes)
const CHANGED = 1e-3; // an op must move some log-probability by more than this

function randVec(seed: number, n: number, norm: number): Float32Array {
  const rng = new Rng(seed);
  const v = Float64Array.from({ length: n }, () => Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next()));
  const s = norm / Math.hypot(...v);
  return Float32Array.from(v, (x) => x * s);
}

const logProbs = (flat: ArrayLike<number>, V: number) => Array.from({ length: flat.length / V }, (_, t) => logSoftmax(Array.prototype.slice.call(flat, t * V, (t + 1) * V) as number[]));
const rowsDiff = (a: Float64Array[], b: Float64Array[]) => Math.max(...a.map((r, t) => maxAbsDiff(r, b[t]!)));
const relL2 = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let d = 0;
  let n = 0;
  for (let i = 0; i < b.length; i++) {
    d += (a[i]! - b[i]!) ** 2;
    n += b[i]! ** 2;
  }
  return Math.sqrt(d / n);
};

let dir = "";
let fixtures: FixturePaths[] = [];
before(async () => {
  await initDevice("wasm");
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-jax-sites-"));
  fixtures = makeFixtures(dir, FIXTURE_FAMILIES);
});
after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});
const hostOf = (family: FixtureFamily) => loadHostModel(fixtures.find((f) => f.family === family)!.hf);

/** The ops of the test, per family (vectors sized by the config). */
function opPlans(host: HostModel, L: number, source: Float32Array, mean: Float32Array): [string, Plan][] {
  const c = host.config;
  const D = c.dModel;
  const R = c.nHeads * D;
  const at = (s: string) => `blocks.${L}.${s}` as HookName;
  return [
    ["add at attn.hook_result (from position 2)", [{ op: "add", at: at("attn.hook_result"), vector: randVec(1, R, 1), pos: { from: 2 } }]],
    ["zero-ablate heads 0 and 2 at attn.hook_result", [{ op: "ablate", at: at("attn.hook_result"), mode: "zero", heads: [0, 2] }]],
    ["mean-ablate head 1 at attn.hook_result (positions 1..4)", [{ op: "ablate", at: at("attn.hook_result"), mode: "mean", mean, heads: [1], pos: { from: 1, to: 5 } }]],
    ["patch attn.hook_result from another prompt", [{ op: "patch", at: at("attn.hook_result"), source, pos: { from: 3 } }]],
    ["add at ln1.hook_normalized", [{ op: "add", at: at("ln1.hook_normalized"), vector: randVec(2, D, 1.5) }]],
    ["project at ln1.hook_normalized", [{ op: "project", at: at("ln1.hook_normalized"), direction: randVec(3, D, 1) }]],
    ["zero-ablate ln2.hook_normalized (from position 4)", [{ op: "ablate", at: at("ln2.hook_normalized"), mode: "zero", pos: { from: 4 } }]],
    ["add and project at ln2.hook_normalized", [{ op: "add", at: at("ln2.hook_normalized"), vector: randVec(4, D, 1.5) }, { op: "project", at: at("ln2.hook_normalized"), direction: randVec(5, D, 1), scale: 0.5 }]],
  ];
}

for (const family of FIXTURE_FAMILIES) {
  describe(`${family} fixture [wasm]`, () => {
    let host: HostModel;
    let engine: Engine;
    before(() => {
      host = hostOf(family);
      engine = new Engine(host);
    });
    after(() => engine?.dispose());

    test("reads of ln1/ln2.hook_normalized and attn.hook_result at every layer match the oracle; Σ_h result_h + b_o gives hook_attn_out without ln1Post", async (t) => {
      const c = host.config;
      const reads: HookName[] = [];
      for (let l = 0; l < c.nLayers; l++) reads.push(`blocks.${l}.ln1.hook_normalized`, `blocks.${l}.ln2.hook_normalized`, `blocks.${l}.attn.hook_result`, `blocks.${l}.hook_attn_out`);
      const steer: Plan = [{ op: "add", at: "blocks.0.hook_resid_mid", vector: randVec(9, c.dModel, 1), pos: { from: 2 } }];
      const plan: Plan = [...steer, ...reads.map((at) => ({ op: "read" as const, at }))];
      const { cache } = await engine.forward([PROMPT], { plan });
      const ref = oracleForward(host, PROMPT, plan as OraclePlan);
      let worst = 0;
      for (const at of reads) {
        const got = cache.get(at, 0);
        const want = ref.reads.get(at)!;
        assert.deepEqual(got.shape, want.shape, `${at}: shape`);
        const e = relL2(got.data, want.data);
        worst = Math.max(worst, e);
        assert.ok(e <= REF_TOL, `${at}: relative error ${e} vs the oracle`);
      }
      // The sum over heads (plus the o bias) is the attention output, where there is no post-norm.
      if (c.blockNorm === "pre") {
        const bias = host.weights.get("blocks.1.attn.o.bias")?.data;
        const r = cache.get("blocks.1.attn.hook_result", 0).data;
        const out = cache.get("blocks.1.hook_attn_out", 0).data;
        const sum = new Float32Array(out.length);
        for (let p = 0; p < PROMPT.length; p++)
          for (let d = 0; d < c.dModel; d++) {
            let s = bias ? bias[d]! : 0;
            for (let h = 0; h < c.nHeads; h++) s += r[(p * c.nHeads + h) * c.dModel + d]!;
            sum[p * c.dModel + d] = s;
          }
        assert.ok(maxAbsDiff(sum, out) <= 1e-5, `Σ_h result_h + b_o vs hook_attn_out: ${maxAbsDiff(sum, out)}`);
      }
      t.diagnostic(`worst relative error of ${reads.length} reads: ${worst.toExponential(2)}`);
    });

    test("every op at the new sites: log-probabilities match the oracle and move", async (t) => {
      const c = host.config;
      const L = 1;
      const src = oracleForward(host, OTHER, [{ op: "read", at: `blocks.${L}.attn.hook_result` }]).reads.get(`blocks.${L}.attn.hook_result`)!;
      const mean = new Float32Array(c.nHeads * c.dModel);
      for (let p = 0; p < OTHER.length; p++) for (let i = 0; i < mean.length; i++) mean[i]! += src.data[p * mean.length + i]! / OTHER.length;
      const base = logProbs((await engine.forward([PROMPT])).logits[0]!, c.dVocab);
      for (const [what, plan] of opPlans(host, L, Float32Array.from(src.data), mean)) {
        const got = logProbs((await engine.forward([PROMPT], { plan })).logits[0]!, c.dVocab);
        const want = oracleForward(host, PROMPT, plan as OraclePlan).logits.map(logSoftmax);
        const d = rowsDiff(got, want);
        const moved = rowsDiff(got, base);
        t.diagnostic(`${what}: max |Δ log p| vs oracle ${d.toExponential(2)}, moved ${moved.toExponential(2)}`);
        assert.ok(d <= REF_TOL, `${what}: max |Δ log p| ${d} vs the oracle`);
        assert.ok(moved > CHANGED, `${what}: the op did not move the logits (${moved})`);
      }
    });

    test("row-chunked weights (maxBindingBytes 2048) give the same per-head results, logits and LoRA gradients", async () => {
      const c = host.config;
      const chunked = new Engine(host, { maxBindingBytes: 2048 });
      try {
        const plan: Plan = [
          { op: "ablate", at: "blocks.1.attn.hook_result", mode: "zero", heads: [1] },
          { op: "read", at: "blocks.1.attn.hook_result" },
          { op: "read", at: "blocks.2.attn.hook_result" },
        ];
        const a = await engine.forward([PROMPT], { plan });
        const b = await chunked.forward([PROMPT], { plan });
        assert.ok(maxAbsDiff(a.logits[0]!, b.logits[0]!) <= SAME_TOL, `logits differ by ${maxAbsDiff(a.logits[0]!, b.logits[0]!)}`);
        for (const at of ["blocks.1.attn.hook_result", "blocks.2.attn.hook_result"] as const) assert.ok(maxAbsDiff(a.cache.get(at, 0).data, b.cache.get(at, 0).data) <= SAME_TOL, at);
        const rank = 2;
        const req = {
          targets: [PROMPT.slice(1).concat([3])],
          params: [
            { kind: "lora" as const, layer: 1, linear: "attn.o" as const, rank, a: randVec(7, rank * c.nHeads * c.dHead, 0.5), b: randVec(8, c.dModel * rank, 0.5) },
            { kind: "activation" as const, at: "blocks.1.attn.hook_result" as const },
          ],
        };
        const ga = await engine.lossAndGrad([PROMPT], req);
        const gb = await chunked.lossAndGrad([PROMPT], req);
        assert.ok(Math.abs(ga.loss - gb.loss) <= SAME_TOL);
        ga.grads.forEach((gs, i) => gs.forEach((g, j) => assert.ok(maxAbsDiff(g, gb.grads[i]![j]!) <= SAME_TOL * Math.max(1, Math.max(...g.map(Math.abs))), `grad ${i}.${j}`)));
      } finally {
        chunked.dispose();
      }
    });
  });
}

describe("f16 weights on WebGPU (untied families)", () => {
  let skip: string | undefined;
  before(async () => {
    try {
      const info = await initDevice("webgpu");
      if (!info.shaderF16) skip = `adapter ${info.adapter} has no shader-f16`;
    } catch (e) {
      if (process.env.CI || !(e instanceof SelfscopeError)) throw e;
      skip = `no WebGPU adapter: ${e.message.split(";")[0]}`;
    }
  });
  after(() => initDevice("wasm"));

  /** The host model with every matrix the engine uploads rounded to f16 (the embedding table is looked up on the host in f32). */
  const f16Host = (h: HostModel): HostModel => {
    const weights = new Map<string, HostTensor>();
    for (const [k, t] of h.weights) weights.set(k, t.shape.length === 2 && k !== "embed.weight" && k !== "posEmbed.weight" ? { data: t.data.map((x) => f16round(x)), shape: t.shape } : t);
    return { ...h, weights };
  };

  for (const family of ["mistral", "olmo2"] as const) {
    test(`${family}: per-head results and logits track the oracle on f16-rounded weights`, async (t) => {
      if (skip) return t.skip(skip);
      const host = hostOf(family);
      assert.equal(host.config.tieEmbeddings, false);
      const c = host.config;
      const e = new Engine(host, { weightDtype: "f16", maxBindingBytes: 4096 });
      try {
        const plan: Plan = [
          { op: "ablate", at: "blocks.1.attn.hook_result", mode: "zero", heads: [0, 3] },
          { op: "add", at: "blocks.2.attn.hook_result", vector: randVec(1, c.nHeads * c.dModel, 1), pos: { from: 2 } },
          { op: "read", at: "blocks.2.attn.hook_result" },
        ];
        const f = await e.forward([PROMPT], { plan });
        const got = logProbs(f.logits[0]!, c.dVocab);
        const r16 = oracleForward(f16Host(host), PROMPT, plan as OraclePlan);
        const r32 = oracleForward(host, PROMPT, plan as OraclePlan);
        const d16 = rowsDiff(got, r16.logits.map(logSoftmax));
        const d32 = rowsDiff(got, r32.logits.map(logSoftmax));
        const read = relL2(f.cache.get("blocks.2.attn.hook_result", 0).data, r16.reads.get("blocks.2.attn.hook_result")!.data);
        t.diagnostic(`max |Δ log p| vs oracle on f16 weights ${d16.toExponential(2)}, on the f32 weights ${d32.toExponential(2)}; hook_result read ${read.toExponential(2)}`);
        assert.ok(d16 <= REF_TOL, `vs the oracle on f16-rounded weights: ${d16}`);
        assert.ok(read <= REF_TOL, `hook_result read: ${read}`);
        assert.ok(d32 > 10 * d16, "the weights really were f16 (the f32 oracle is further away)");
      } finally {
        e.dispose();
      }
    });
  }
});
