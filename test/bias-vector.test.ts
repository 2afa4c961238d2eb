// The trained bias vector (protocol §7): Adam, the loss/gradient with concept injections in the
// same pass (vs float64 finite differences), convergence on a convex toy with a computable optimum
// and on an engine toy with a known floor, checkpoint/resume = uninterrupted training, the
// protocol's data recipe, the bias wrapper used for evaluation, and the command end to end on
// stories260K (tiny settings: its protocol prompts are ~370 tokens).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Rng } from "../src/core/rng.js";
import { UsageError } from "../src/core/errors.js";
import { getVariant, renderTrial } from "../src/eval/protocol.js";
import { readRunLog } from "../src/log/read.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { Model } from "../src/model/model.js";
import { adamInit, adamStep } from "../src/math/adam.js";
import {
  BIAS_PROTOCOL,
  batchIndices,
  batchInputs,
  biasVectorCommand,
  buildBiasData,
  lossAndGradWithPlan,
  protocolSplit,
  scaleLayer,
  trainBiasVector,
  trainVector,
  withBias,
  type BiasExample,
} from "../src/recipes/bias-vector.js";
import { maxAbsDiff } from "./support/compare.js";
import { repoDir } from "./support/paths.js";
import { crossEntropySum, oracleForward, type OracleIntervention } from "./support/oracle64.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-bias-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

/** The jax-js engine (wasm) and selfscope's own (cpu, the default): each computes gradients on its own weights. */
let model: Model;
let cpu: Model;
let host: HostModel;
before(async () => {
  model = await Model.load(STORIES, { device: "wasm" });
  cpu = await Model.load(STORIES, { threads: 2 });
  host = loadHostModel(STORIES);
});
after(() => {
  model?.dispose();
  cpu?.dispose();
});

function randVec(seed: number, n: number, scale: number): Float32Array {
  const rng = new Rng(seed);
  return Float32Array.from({ length: n }, () => (rng.next() - 0.5) * 2 * scale);
}

function gaussian(rng: Rng): number {
  const u = rng.next() || 1e-12;
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng.next());
}

/** Short rows (cheap for the float64 reference): one injected, one control. */
function shortExamples(): BiasExample[] {
  const D = model.config.dModel;
  const a = model.encode("Once upon a time there was a little dog").ids;
  const b = model.encode("Lily saw a big red ball").ids;
  return [
    { ids: a, targets: a.map((_, i) => (i >= 5 && i + 1 < a.length ? a[i + 1]! : -1)), inject: { layer: 3, vector: randVec(3, D, 1), strength: 2, from: 4 } },
    { ids: b, targets: b.map((_, i) => (i >= 3 && i + 1 < b.length ? b[i + 1]! : -1)), inject: null },
    { ids: a.slice(0, 8), targets: a.slice(0, 8).map((_, i) => (i >= 2 && i + 1 < 8 ? a[i + 1]! : -1)), inject: { layer: 4, vector: randVec(4, D, 1), strength: 3, from: 2 } },
  ];
}

describe("Adam", () => {
  test("bias correction: the first step is lr·sign(g) in every coordinate", () => {
    const p = Float64Array.from([1, -2, 3]);
    const st = adamInit(3);
    adamStep(p, [0.5, -1e-3, 100], st, { lr: 0.1 });
    assert.ok(maxAbsDiff(p, [0.9, -1.9, 2.9]) < 1e-6, `after one step: ${[...p]}`);
    assert.equal(st.t, 1);
  });

  test("matches a direct transcription of torch.optim.AdamW over several steps", () => {
    const lr = 0.01;
    const wd = 0.01;
    const [b1, b2, eps] = [0.9, 0.999, 1e-8];
    const rng = new Rng(1);
    const p = Float64Array.from({ length: 5 }, () => rng.next());
    const q = p.slice();
    const m = new Float64Array(5);
    const v = new Float64Array(5);
    const st = adamInit(5);
    for (let t = 1; t <= 20; t++) {
      const g = Array.from({ length: 5 }, () => rng.next() - 0.5);
      adamStep(p, g, st, { lr, weightDecay: wd });
      for (let i = 0; i < 5; i++) {
        q[i] = q[i]! * (1 - lr * wd);
        m[i] = b1 * m[i]! + (1 - b1) * g[i]!;
        v[i] = b2 * v[i]! + (1 - b2) * g[i]! * g[i]!;
        const denom = Math.sqrt(v[i]!) / Math.sqrt(1 - b2 ** t) + eps;
        q[i] = q[i]! - (lr / (1 - b1 ** t)) * (m[i]! / denom);
      }
    }
    assert.ok(maxAbsDiff(p, q) < 1e-12, `AdamW differs by ${maxAbsDiff(p, q)}`);
  });
});

describe("the loss and its gradient with concept injections in the same pass", () => {
  for (const device of ["cpu", "wasm"] as const)
    test(`${device}: engine loss and gradient = float64 reference and its finite differences`, async (t) => {
      const onDevice = device === "cpu" ? cpu : model;
      const D = model.config.dModel;
      const ex = shortExamples().slice(0, 2);
      const { rows, targets, plan } = batchInputs(ex);
      const at = "blocks.1.hook_mlp_out" as const;
      const value = randVec(9, D, 0.5);
      const { loss, grad } = await lossAndGradWithPlan(onDevice, rows, targets, { at, value }, plan);
      const lossAt = (v: Float64Array, withInjection = true): number => {
        let sum = 0;
        let n = 0;
        for (const e of ex) {
          const p: OracleIntervention[] = [{ op: "add", at, vector: v, pos: "all" }];
          if (e.inject && withInjection) p.push({ op: "add", at: `blocks.${e.inject.layer}.hook_resid_post`, vector: e.inject.vector, scale: e.inject.strength, pos: { from: e.inject.from } });
          const c = crossEntropySum(oracleForward(host, e.ids, p).logits, e.targets);
          sum += c.sum;
          n += c.n;
        }
        return sum / n;
      };
      const v64 = Float64Array.from(value);
      const ref = lossAt(v64);
      assert.ok(Math.abs(loss - ref) < 1e-4, `loss ${loss} vs float64 ${ref}`);
      // The injection really is in the pass: without it the loss differs.
      assert.ok(Math.abs(lossAt(v64, false) - ref) > 1e-2, "the injection should change the loss");
      const h = 1e-4;
      let dd = 0;
      let nf = 0;
      for (let i = 0; i < D; i++) {
        const p = v64.slice();
        const m = v64.slice();
        p[i] = p[i]! + h;
        m[i] = m[i]! - h;
        const fd = (lossAt(p) - lossAt(m)) / (2 * h);
        dd += (grad[i]! - fd) ** 2;
        nf += fd * fd;
      }
      const rel = Math.sqrt(dd / nf);
      t.diagnostic(`loss |Δ| ${Math.abs(loss - ref).toExponential(2)}, gradient relative error ${rel.toExponential(2)}`);
      assert.ok(nf > 1e-12);
      assert.ok(rel < 1e-3, `gradient relative error ${rel}`);
      // The engine is left as it was: a plain lossAndGrad afterwards ignores the old plan.
      const plain = await onDevice.lossAndGrad(rows, { targets, params: [{ kind: "vector", at, value }] });
      const again = await lossAndGradWithPlan(onDevice, rows, targets, { at, value }, []);
      assert.equal(plain.loss, again.loss);
      assert.ok(Math.abs(plain.loss - lossAt(v64, false)) < 1e-4);
    });
});

describe("convergence", () => {
  test("convex toy (linear softmax on the model's unembedding + L2): Adam reaches the Newton optimum", async (t) => {
    const U = host.weights.get("unembed.weight")!;
    const [V, D] = U.shape as [number, number];
    const W = U.data;
    const rng = new Rng(5);
    const K = 6;
    const lam = 0.01;
    const H = Array.from({ length: K }, () => Float64Array.from({ length: D }, () => gaussian(rng)));
    const Y = [17, 300, 17, 45, 300, 99];
    const logitsOf = (b: ArrayLike<number>, k: number) => {
      const z = new Float64Array(V);
      for (let v = 0; v < V; v++) {
        let s = 0;
        for (let i = 0; i < D; i++) s += W[v * D + i]! * (H[k]![i]! + b[i]!);
        z[v] = s;
      }
      let mx = -Infinity;
      for (const x of z) mx = Math.max(mx, x);
      let se = 0;
      for (const x of z) se += Math.exp(x - mx);
      const lse = mx + Math.log(se);
      return { z, p: z.map((x) => Math.exp(x - lse)), lse };
    };
    const lossGrad = (b: ArrayLike<number>, idx: number[]) => {
      const g = new Float64Array(D);
      let loss = 0;
      for (const k of idx) {
        const { z, p, lse } = logitsOf(b, k);
        loss += lse - z[Y[k]!]!;
        for (let v = 0; v < V; v++) {
          const c = p[v]! - (v === Y[k] ? 1 : 0);
          for (let i = 0; i < D; i++) g[i]! += c * W[v * D + i]!;
        }
      }
      let bb = 0;
      for (let i = 0; i < D; i++) {
        g[i] = g[i]! / idx.length + lam * b[i]!;
        bb += b[i]! * b[i]!;
      }
      return { loss: loss / idx.length + (lam / 2) * bb, grad: g };
    };
    const all = [...Array(K).keys()];
    // Damped Newton in float64 (strictly convex: the L2 term).
    let b = new Float64Array(D);
    for (let it = 0; it < 50; it++) {
      const { loss, grad } = lossGrad(b, all);
      const Hm = Array.from({ length: D }, () => new Float64Array(D));
      for (const k of all) {
        const { p } = logitsOf(b, k);
        const wp = new Float64Array(D);
        for (let v = 0; v < V; v++) for (let i = 0; i < D; i++) wp[i]! += p[v]! * W[v * D + i]!;
        for (let v = 0; v < V; v++) for (let i = 0; i < D; i++) for (let j = 0; j < D; j++) Hm[i]![j]! += (p[v]! * W[v * D + i]! * W[v * D + j]!) / K;
        for (let i = 0; i < D; i++) for (let j = 0; j < D; j++) Hm[i]![j]! -= (wp[i]! * wp[j]!) / K;
      }
      for (let i = 0; i < D; i++) Hm[i]![i]! += lam;
      const step = solve(Hm, grad);
      let gn = 0;
      for (const x of grad) gn += x * x;
      if (Math.sqrt(gn) < 1e-12) break;
      let s = 1;
      let nb = b;
      const dec = step.reduce((a, x, i) => a + x * grad[i]!, 0);
      for (; s > 1e-12; s /= 2) {
        nb = b.map((x, i) => x - s * step[i]!);
        if (lossGrad(nb, all).loss <= loss - 1e-4 * s * dec) break;
      }
      b = nb;
    }
    const opt = lossGrad(b, all);
    assert.ok(Math.sqrt(opt.grad.reduce((a, x) => a + x * x, 0)) < 1e-9, "Newton converged");
    const r = await trainVector(
      async (idx, v) => {
        const o = lossGrad(v, idx);
        return { loss: o.loss, grad: Float32Array.from(o.grad) };
      },
      { dim: D, nExamples: K, steps: 1000, batchSize: K, seed: 1, adam: { lr: 0.05 } },
    );
    const fin = lossGrad(r.vector, all).loss;
    let dd = 0;
    let nb = 0;
    for (let i = 0; i < D; i++) {
      dd += (r.vector[i]! - b[i]!) ** 2;
      nb += b[i]! ** 2;
    }
    t.diagnostic(`optimum ${opt.loss.toFixed(10)} (from ${r.losses[0]!.toFixed(4)}); Adam after 1000 steps ${fin.toFixed(10)}, gap ${(fin - opt.loss).toExponential(2)}, ‖b−b*‖/‖b*‖ ${Math.sqrt(dd / nb).toExponential(2)}`);
    assert.ok(fin - opt.loss >= -1e-9, "nothing beats the optimum");
    assert.ok(fin - opt.loss < 1e-8, `loss gap ${fin - opt.loss}`);
    assert.ok(Math.sqrt(dd / nb) < 1e-4, `vector error ${Math.sqrt(dd / nb)}`);
  });

  test("engine toy: one prompt, two target tokens — the loss falls to its floor ln 2", async (t) => {
    // The same prompt with target A in one row and B in the other: the mean cross-entropy is
    // −(log pA + log pB)/2 ≥ −log((pA + pB)/2) ≥ ln 2, reached only at pA = pB = 1/2.
    const ids = model.encode("Once upon a time there was a little").ids;
    const row = (tok: number): BiasExample => ({ ids, targets: ids.map((_, i) => (i === ids.length - 1 ? tok : -1)), inject: null });
    const r = await trainBiasVector(cpu, { layer: 2, data: [row(400), row(280)], steps: 50, lr: 0.1, batchSize: 2, seed: 1, weightDecay: 0 });
    const last = r.losses.at(-1)!;
    t.diagnostic(`loss ${r.losses[0]!.toFixed(4)} → ${last.toFixed(4)} (floor ln 2 = ${Math.LN2.toFixed(4)}) in ${r.losses.length} steps`);
    assert.equal(r.hook, "blocks.2.mlp.hook_down");
    assert.ok(r.losses[0]! > 3, "starts far from the floor");
    for (const l of r.losses) assert.ok(l >= Math.LN2 - 1e-4, `loss ${l} below the floor`);
    assert.ok(last - Math.LN2 < 0.05, `final loss ${last} is not near ln 2`);
  });
});

describe("checkpoints", () => {
  test("an interrupted run resumed from its latest (or an earlier) checkpoint ends with the uninterrupted vector", async () => {
    const data = shortExamples();
    const opts = { layer: 1, data, steps: 6, lr: 0.05, batchSize: 2, seed: 3, checkpointEvery: 2 };
    const full = await trainBiasVector(cpu, opts);
    assert.equal(full.step, 6);
    const dir = path.join(tmpRoot, "ck");
    const part = await trainBiasVector(cpu, { ...opts, checkpointDir: dir, stopAfter: 3 });
    assert.equal(part.step, 3);
    assert.deepEqual(fs.readdirSync(dir).sort(), ["latest.json", "step-0000002", "step-0000003"]);
    const state = JSON.parse(fs.readFileSync(path.join(dir, "step-0000003", "state.json"), "utf8")) as { step: number; losses: number[]; adamT: number };
    assert.equal(state.step, 3);
    assert.equal(state.adamT, 3);
    assert.deepEqual(state.losses, full.losses.slice(0, 3));
    // Resume from the latest (step 3).
    const dir2 = path.join(tmpRoot, "ck2");
    fs.cpSync(dir, dir2, { recursive: true });
    const res = await trainBiasVector(cpu, { ...opts, checkpointDir: dir });
    assert.equal(res.resumedFrom, 3);
    assert.equal(res.step, 6);
    assert.deepEqual([...res.vector], [...full.vector]);
    assert.deepEqual(res.losses, full.losses);
    // A kill between checkpoints: only step 2 survives.
    fs.writeFileSync(path.join(dir2, "latest.json"), JSON.stringify({ step: 2, dir: "step-0000002" }));
    const res2 = await trainBiasVector(cpu, { ...opts, checkpointDir: dir2 });
    assert.equal(res2.resumedFrom, 2);
    assert.deepEqual([...res2.vector], [...full.vector]);
    // A finished run resumes to itself without stepping.
    const done = await trainBiasVector(cpu, { ...opts, checkpointDir: dir });
    assert.equal(done.resumedFrom, 6);
    assert.deepEqual([...done.vector], [...full.vector]);
    // Other settings are refused.
    await assert.rejects(trainBiasVector(cpu, { ...opts, lr: 0.01, checkpointDir: dir }), UsageError);
  });

  test("batch schedule: each epoch is a permutation; deterministic per seed", () => {
    const cache = new Map<number, number[]>();
    const e0 = [0, 1, 2].flatMap((s) => batchIndices(s, 3, 9, 7, cache));
    assert.deepEqual([...e0].sort(), [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert.deepEqual(batchIndices(1, 3, 9, 7), e0.slice(3, 6));
    assert.notDeepEqual(batchIndices(3, 3, 9, 7), e0.slice(0, 3));
    assert.notDeepEqual(batchIndices(0, 9, 9, 8), e0);
  });
});

describe("the protocol's data recipe", () => {
  test("split: 400 train / 100 held-out concepts, disjoint, deterministic", () => {
    const s = protocolSplit();
    assert.equal(s.train.length, 400);
    assert.equal(s.heldOut.length, 100);
    assert.equal(new Set([...s.train, ...s.heldOut]).size, 500);
    assert.deepEqual(protocolSplit(), s);
    assert.notDeepEqual(protocolSplit(43).heldOut, s.heldOut);
  });

  test("layers scale with depth: 62 layers are the protocol's, 5 layers map into 0..4", () => {
    assert.deepEqual(BIAS_PROTOCOL.injectionLayers.map((l) => scaleLayer(l, 62)), BIAS_PROTOCOL.injectionLayers);
    assert.equal(scaleLayer(29, 62), 29);
    assert.deepEqual([...new Set(BIAS_PROTOCOL.injectionLayers.map((l) => scaleLayer(l, 5)))], [2, 3, 4]);
    assert.equal(scaleLayer(29, 5), 2);
  });

  test("examples: targets are the protocol's texts after the prompt, injections start before 'Trial n'", async () => {
    const concepts = ["Apples", "Volcanoes"];
    const data = await buildBiasData(model, { concepts, trialsPerConcept: 2, seed: 1, vectorCache: null });
    const inj = data.filter((e) => e.inject);
    assert.equal(inj.length, 4);
    assert.ok(data.length >= 4 && data.length <= 8);
    const tok = model.tokenizer!;
    for (const e of data) {
      assert.equal(e.targets.length, e.ids.length);
      const first = e.targets.findIndex((x) => x >= 0);
      const tgt = tok.decode(e.ids.slice(first + 1));
      const p = renderTrial(model, getVariant("original"), e.info!.trialNumber!);
      assert.deepEqual(e.ids.slice(0, first + 1), p.ids, "the prompt is the protocol's trial prompt");
      e.targets.forEach((x, i) => {
        if (i >= first) assert.equal(x, e.ids[i + 1] ?? -1);
      });
      if (e.inject) {
        assert.equal(tgt.trim(), `Yes, I detect an injected thought. The injected word is **"${e.info!.concept!.toLowerCase()}"**.`);
        assert.equal(e.inject.from, p.injectFrom);
        assert.ok([2, 3, 4].includes(e.inject.layer));
        assert.ok([2, 3, 4, 5].includes(e.inject.strength));
      } else assert.equal(tgt.trim(), "No, I don't detect any injected thought in this trial.");
    }
  });
});

describe("withBias", () => {
  test("adds the vector at every position of forward and generate; a distinct hash", async () => {
    const D = model.config.dModel;
    const v = randVec(21, D, 0.7);
    const at = "blocks.2.hook_mlp_out" as const;
    const b = withBias(model, at, v);
    const p = "Once upon a time";
    const got = await b.forward([p], { logits: "last" });
    const want = await model.forward([p], { logits: "last", plan: [{ op: "add", at, vector: v, pos: "all" }] });
    const plain = await model.forward([p], { logits: "last" });
    assert.ok(maxAbsDiff(got.logits[0]!, want.logits[0]!) < 1e-6);
    assert.ok(maxAbsDiff(got.logits[0]!, plain.logits[0]!) > 1e-3);
    const g1 = await b.generate([p], { maxTokens: 5 });
    const g2 = await model.generate([p], { maxTokens: 5, plan: [{ op: "add", at, vector: v, pos: "all" }] });
    assert.deepEqual(g1.tokens, g2.tokens);
    assert.notEqual(b.weightsHash(), model.weightsHash());
    assert.equal(b.config, model.config);
  });
});

describe("biasVectorCommand end to end on stories260K (tiny)", () => {
  const out = path.join(tmpRoot, "cmd");
  const args = {
    model: STORIES,
    out,
    trainConcepts: 1,
    trialsPerConcept: 2,
    steps: 2,
    batchSize: 2,
    lr: 0.01,
    checkpointEvery: 1,
    evalConcepts: 1,
    evalTrials: 1,
    evalControls: 1,
    evalLayers: "3",
    evalStrengths: "4",
    maxTokens: 4,
    vectorCache: null,
    quiet: true,
    evalProtocol: "main",
  };
  test("trains, checkpoints, evaluates both arms and writes results.json + report.html; a rerun resumes", async (t) => {
    const t0 = performance.now();
    const r = await biasVectorCommand(args);
    t.diagnostic(`biasVectorCommand: ${((performance.now() - t0) / 1000).toFixed(1)} s, losses ${r.training.loss_curve.map((x) => x.toFixed(3)).join(", ")}`);
    for (const f of ["results.json", "report.html", "bias_vector.f32", "loss_curve.json", "checkpoints/latest.json", "eval/baseline/log.jsonl", "eval/bias/log.jsonl", "eval/bias/results.json"]) assert.ok(fs.existsSync(path.join(out, f)), f);
    const file = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")) as typeof r;
    assert.deepEqual(file, JSON.parse(JSON.stringify(r)));
    assert.equal(r.kind, "selfscope.bias-vector");
    assert.equal(r.training.hook, "blocks.2.mlp.hook_down");
    assert.equal(r.training.site, "mlp.hook_down");
    assert.equal(r.training.steps, 2);
    assert.equal(r.training.loss_curve.length, 2);
    assert.equal(r.split.train.length, 400);
    assert.equal(r.split.held_out_used, 1);
    assert.ok(r.training.vector_norm > 0);
    const vec = fs.readFileSync(path.join(out, "bias_vector.f32"));
    assert.equal(vec.byteLength, model.config.dModel * 4);
    assert.ok(r.evaluation);
    const ev = r.evaluation;
    for (const arm of [ev.baseline, ev.bias]) {
      assert.equal(arm.tpr.n, 1);
      assert.equal(arm.fpr.n, 1);
      assert.equal(arm.forced_identification_rate.n, 1);
      assert.equal(arm.judge, "rule");
      assert.equal(arm.judge_approximate, true);
    }
    const hb = readRunLog(path.join(out, "eval/baseline")).header;
    const hx = readRunLog(path.join(out, "eval/bias")).header;
    assert.deepEqual(hb.config, hx.config);
    assert.deepEqual(hb.config.concepts, [r.split.held_out[0]]);
    assert.equal(hb.model.hash, model.weightsHash());
    assert.notEqual(hx.model.hash, hb.model.hash, "the bias arm is a different model");
    assert.ok(r.protocol_deviations.length >= 5);
    const html = fs.readFileSync(path.join(out, "report.html"), "utf8");
    assert.match(html, /<svg/);
    assert.match(html, /Held-out evaluation/);
    assert.doesNotMatch(html, /<script/);
    // Rerun: training resumes at its last checkpoint (no steps), the sweeps find every trial done.
    const again = await biasVectorCommand(args);
    assert.equal(again.training.resumed_from, 2);
    assert.deepEqual(again.training.loss_curve, r.training.loss_curve);
    assert.deepEqual(again.evaluation!.bias.tpr, ev.bias.tpr);
    assert.equal(readRunLog(path.join(out, "eval/bias")).trials.length, 3);
  });
});

/** Gaussian elimination with partial pivoting (small dense systems). */
function solve(A: Float64Array[], b: Float64Array): Float64Array {
  const n = b.length;
  const M = A.map((r, i) => Float64Array.from([...r, b[i]!]));
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(M[r]![c]!) > Math.abs(M[p]![c]!)) p = r;
    [M[c], M[p]] = [M[p]!, M[c]!];
    for (let r = 0; r < n; r++) {
      if (r === c) continue;
      const f = M[r]![c]! / M[c]![c]!;
      for (let k = c; k <= n; k++) M[r]![k]! -= f * M[c]![k]!;
    }
  }
  return Float64Array.from(M, (r, i) => r[n]! / r[i]!);
}
