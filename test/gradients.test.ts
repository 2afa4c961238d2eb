// Gradient attribution of the logit gap: the per-token residual gradient against central
// differences; per-head attribution (Σ ∂gap/∂z · Δz) against the measured effect of restoring each
// head's unsteered output in the linear regime; the head-ablation curve's N = 0 point equal to the
// steered gap; and the command on the organism.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Model } from "../src/model/model.js";
import { hookName } from "../src/hooks/names.js";
import type { Intervention } from "../src/hooks/plan.js";
import { getVariant, renderTrial } from "../src/eval/protocol.js";
import { gapGrad, gapSpellings } from "../src/recipes/gap-grad.js";
import { ablatedGap, gradientsCommand, headMeans, promptGradients, trialGradients } from "../src/recipes/gradients.js";
import { mulberry32 } from "../src/core/rng.js";
import { pearson } from "../src/stats/stats.js";
import { fixture, repoDir } from "./support/paths.js";

const STORIES = fixture("stories260K-gguf", "stories260K.gguf");
let model: Model;
let dir: string;

before(async () => {
  model = await Model.load(STORIES, { threads: 1 });
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "gradients-test-"));
});
after(() => {
  model?.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
});

const rand = (n: number, seed: number, scale = 1) => { const r = mulberry32(seed); return Float32Array.from({ length: n }, () => (r() * 2 - 1) * scale); };

test("∂gap/∂resid_post at a token matches central differences along a random direction", async () => {
  const p = renderTrial(model, getVariant("original"), 1, { format: "raw", judgePrompt: "question" });
  const sp = gapSpellings(model, p.text, p.ids);
  const D = model.config.dModel;
  const at = hookName(2, "hook_resid_post");
  const { grads } = await promptGradients(model, sp, [at], []);
  const g = grads.get(at)!;
  for (const pos of [p.injectFrom, sp.promptLength - 1]) {
    const u = rand(D, 7 + pos);
    let dot = 0;
    for (let i = 0; i < D; i++) dot += g[pos * D + i]! * u[i]!;
    const gapAt = async (e: number) => (await gapGrad(model, sp, { sites: [], plan: [{ op: "add", at, vector: u, scale: e, pos: { from: pos, to: pos + 1 } }] })).gap;
    const h = 1e-2;
    const fd = ((await gapAt(h)) - (await gapAt(-h))) / (2 * h);
    assert.ok(Math.abs(dot - fd) <= 5e-3 * Math.max(1, Math.abs(fd)), `position ${pos}: g·u ${dot} vs central difference ${fd}`);
  }
});

test("head attribution predicts the effect of restoring each head's unsteered output (small strength)", async (t) => {
  const p = renderTrial(model, getVariant("original"), 1, { format: "raw", judgePrompt: "question" });
  const sp = gapSpellings(model, p.text, p.ids);
  const { nHeads: H, dHead, nLayers } = model.config;
  const steer: Intervention[] = [{ op: "add", at: hookName(0, "hook_resid_post"), vector: rand(model.config.dModel, 3), scale: 0.05, pos: { from: p.injectFrom } }];
  const tg = await trialGradients(model, sp, steer);
  const base = (await gapGrad(model, sp, { sites: [], plan: steer })).gap;
  assert.ok(Math.abs(base - tg.gap) < 1e-9);
  const ids = p.ids;
  const pred: number[] = [], actual: number[] = [];
  for (let l = 1; l < nLayers; l++) {
    const at = hookName(l, "attn.hook_z");
    const zs = (await model.forward([{ ids }], { plan: [...steer, { op: "read", at, pos: { from: 0 } }], logits: "none" })).cache.get(at, 0).data;
    const z0 = (await model.forward([{ ids }], { plan: [{ op: "read", at, pos: { from: 0 } }], logits: "none" })).cache.get(at, 0).data;
    for (let h = 0; h < H; h++) {
      const src = zs.slice();
      for (let q = 0; q < ids.length; q++) for (let d = 0; d < dHead; d++) src[(q * H + h) * dHead + d] = z0[(q * H + h) * dHead + d]!;
      // The spellings' passes are longer than the prompt: patch the prompt's positions only.
      const gap = (await gapGrad(model, sp, { sites: [], plan: [...steer, { op: "patch", at, source: src, pos: { from: 0, to: ids.length } }] })).gap;
      actual.push(gap - base);
      pred.push(-tg.heads[l]![h]!);
    }
  }
  const scale = Math.max(...actual.map(Math.abs));
  assert.ok(scale > 0, "the steering moves some head");
  const r = pearson(pred, actual)!;
  t.diagnostic(`${pred.length} heads: Pearson r ${r.toFixed(4)} between first-order estimate and measurement; largest effect ${scale.toFixed(4)}`);
  assert.ok(r > 0.98);
  for (let i = 0; i < pred.length; i++) assert.ok(Math.abs(pred[i]! - actual[i]!) <= 0.1 * scale, `head ${i}: predicted ${pred[i]} vs measured ${actual[i]}`);
});

test("head ablation: N = 0 is the steered gap; ablating heads changes it", async () => {
  const p = renderTrial(model, getVariant("original"), 2, { format: "raw", judgePrompt: "question" });
  const sp = gapSpellings(model, p.text, p.ids);
  const steer: Intervention[] = [{ op: "add", at: hookName(0, "hook_resid_post"), vector: rand(model.config.dModel, 5), scale: 2, pos: { from: p.injectFrom } }];
  const means = await headMeans(model, [p.ids]);
  const base = (await gapGrad(model, sp, { sites: [], plan: steer })).gap;
  assert.deepEqual(await ablatedGap(model, [{ sp, steer }], [], means), [base]);
  const [ab] = await ablatedGap(model, [{ sp, steer }], [{ layer: 2, head: 0 }, { layer: 3, head: 1 }], means);
  assert.notEqual(ab, base);
});

test("selfscope gradients on the organism: files, ordering, errors", async () => {
  const m = path.join(repoDir(), "models", "organism", "organism.gguf");
  const concepts = path.join(dir, "c.json");
  fs.writeFileSync(concepts, JSON.stringify(["frog", "shoe"]));
  const out = path.join(dir, "g");
  const r = await gradientsCommand({ model: m, out, layers: "1", concepts, strength: 4, trials: 1, topHeads: 3, quiet: true, threads: 1 });
  assert.equal(r.components.length, 5);
  assert.equal(r.ablation.length, 4);
  assert.ok(r.heads.every((h, i) => i === 0 || Math.abs(r.heads[i - 1]!.attribution.mean) >= Math.abs(h.attribution.mean)));
  assert.equal(r.token_layer.norms[0]!.length, r.token_layer.tokens.length);
  assert.equal(r.ce.examples.injection, 2);
  assert.ok(r.ce.injection.every((x) => x.resid > 0 && Number.isFinite(x.mlp)));
  assert.equal(r.ce.injection.length, 5);
  for (const f of ["results.json", "report.html"]) assert.ok(fs.existsSync(path.join(out, f)));
  await assert.rejects(gradientsCommand({ model: m, out, layers: "1", concepts, trials: 0, quiet: true }), /--trials must be a positive integer/);
});
