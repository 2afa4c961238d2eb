// Gates and evidence carriers on a planted circuit: stories260K with a default-"No" MLP unit in block
// 3 (the gate: fires on the prompt's mean direction, writes No − Yes) and an MLP unit in block 1 that
// reads the injected direction and writes against the gate's input (the carrier). With dictionaries
// that contain those units among random distractors, the analysis must rank the planted gate first
// by DLA and the planted carrier first among carriers.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Model } from "../src/model/model.js";
import { carriers, cohenD, featureStats, featuresCommand, gates, interventionCurves, profile, spearman } from "../src/recipes/features.js";
import { gapGrad, gapSpellings } from "../src/recipes/gap-grad.js";
import { hookName } from "../src/hooks/names.js";
import { transcoderCommand } from "../src/recipes/transcoder.js";
import { writeSafetensors } from "../src/io/safetensors.js";
import { repoDir } from "./support/paths.js";
import type { Dictionary } from "../src/vectors/dictionary.js";
import { plantedCircuit } from "./support/planted-circuit.js";

let dir: string;
let planted: Model;
let gateDict: Dictionary, carrierDict: Dictionary;
let v: Float32Array;
let du: Float32Array;
let prompt: { ids: number[]; injectFrom: number; text: string };

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "features-test-"));
  const c = await plantedCircuit(dir);
  ({ gateDict, carrierDict, v, du, prompt } = c);
  planted = await Model.load(c.file, { threads: 1 });
});

after(() => {
  planted?.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
});

test("Cohen's d: pooled SD, small groups", () => {
  assert.equal(cohenD([1], [2, 3]), null);
  assert.ok(Math.abs(cohenD([1, 2, 3], [3, 4, 5])! + 2) < 1e-12);
  assert.equal(cohenD([1, 1], [1, 1]), null);
});

test("spearman: ranks with ties, constant input", () => {
  assert.equal(spearman([1, 2, 3], [10, 20, 30]), 1);
  assert.equal(spearman([1, 2, 3], [3, 2, 1]), -1);
  assert.equal(spearman([1, 2, 3], [5, 5, 5]), null);
  assert.ok(Math.abs(spearman([1, 2, 3, 4], [0, 0, 1, 2])! - 0.9486832980505138) < 1e-12);
});

test("planted gate is the top DLA gate and falls with strength; planted carrier is the top carrier", async (t) => {
  const strengths = [-2, -1, 0, 1, 2, 3];
  const gp = await profile(planted, gateDict, prompt, 0, [v], strengths);
  const gs = featureStats(gateDict, gp, du);
  const top = gates(gs, 3);
  t.diagnostic(`gates: ${top.map((g) => `f${g.feature} DLA ${g.dla.toFixed(3)} ρ ${g.rho.toFixed(2)} base ${g.baseAct.toFixed(2)} top ${g.topAct.toFixed(2)}`).join("; ")}`);
  assert.equal(top[0]?.feature, 0);
  assert.ok(gs[0]!.rho < -0.7 && gs[0]!.topAct < gs[0]!.baseAct, `the gate is switched off by the injection: ρ ${gs[0]!.rho}`);
  const cp = await profile(planted, carrierDict, prompt, 0, [v], strengths);
  const cs = featureStats(carrierDict, cp, du);
  const c = carriers(carrierDict, cs, gateDict, top.slice(0, 1).map((g) => g.feature), 3);
  t.diagnostic(`carriers: ${c.map((x) => `f${x.feature} score ${x.score.toFixed(3)} vw ${x.virtualWeight.toFixed(3)} ρ ${x.rho.toFixed(2)}`).join("; ")}`);
  assert.equal(c[0]?.feature, 0);
  assert.ok(cs[0]!.rho > 0.7);
});

test("selfscope features on the organism with trained transcoders: gates sorted by DLA, files, errors", async () => {
  const model = path.join(repoDir(), "models", "organism", "organism.gguf");
  const texts = path.join(dir, "t.txt");
  fs.writeFileSync(texts, "Tell me about frogs\nTell me about the sea\nOnce upon a time there was a dog.\n");
  await transcoderCommand({ model, out: path.join(dir, "tc2"), layer: 2, texts, steps: 50, dSae: 64, quiet: true, threads: 1 });
  await transcoderCommand({ model, out: path.join(dir, "tc1"), layer: 1, texts, steps: 50, dSae: 64, quiet: true, threads: 1 });
  const concepts = path.join(dir, "c.json");
  fs.writeFileSync(concepts, JSON.stringify(["frog", "shoe"]));
  const out = path.join(dir, "feat");
  const common = { model, out, layers: "1", strengths: "-1,0,1,2", concepts, quiet: true, threads: 1 };
  const r = await featuresCommand({ ...common, transcoder: path.join(dir, "tc2", "transcoder.safetensors"), carrierTranscoder: path.join(dir, "tc1", "transcoder.safetensors") });
  assert.ok(r.gates.length > 0 && r.gates.every((g, i) => g.dla < 0 && (i === 0 || r.gates[i - 1]!.dla <= g.dla)));
  assert.equal(r.gate_dictionary.output_site, "blocks.2.hook_mlp_out");
  assert.equal(r.concept_gaps.length, 2);
  assert.ok(r.gates.every((g) => g.detection_r === null && g.detector_score === null), "no detection correlation under 3 concepts");
  assert.equal(r.curves?.gateAblation.length, Math.min(5, r.gates.length) + 1);
  for (const f of ["results.json", "report.html"]) assert.ok(fs.existsSync(path.join(out, f)));
  await assert.rejects(featuresCommand({ ...common, strengths: "1,2", transcoder: path.join(dir, "tc2", "transcoder.safetensors") }), /--strengths must include 0/);
  const gs = path.join(dir, "params.safetensors");
  writeSafetensors(gs, { w_enc: { data: new Float32Array(64 * 4), shape: [64, 4] } });
  await assert.rejects(featuresCommand({ ...common, transcoder: gs }), /say which layer's MLP it transcodes \(--gate-layer/);
  await assert.rejects(featuresCommand({ ...common, transcoder: gs, gateLayer: 2 }), /params\.safetensors: missing tensor w_dec/);
});

test("feature interventions on the planted circuit: ablating the gate raises the gap, restoring it removes detection, ablating the carrier brings the gate back", async (t) => {
  const strength = 0.5;
  const c = await interventionCurves(planted, prompt, 0, [v], strength, { d: gateDict, features: [0, 1] }, { d: carrierDict, features: [0, 1] });
  const show = (name: string, xs: { k: number; gap: number; gateAct: number }[]) => t.diagnostic(`${name}: ${xs.map((x) => `k${x.k} gap ${x.gap.toFixed(3)} gate ${x.gateAct.toFixed(3)}`).join("; ")}`);
  show("gate ablation (unsteered)", c.gateAblation);
  show("gate patching (steered)", c.gatePatching);
  show("carrier ablation (steered)", c.carrierAblation!);
  // k = 0 edits nothing: the unsteered and steered gaps.
  const sp = gapSpellings(planted, prompt.text, prompt.ids);
  const steer = [{ op: "add" as const, at: hookName(0, "hook_resid_post"), vector: v, scale: strength, pos: { from: prompt.injectFrom } }];
  assert.ok(Math.abs(c.gateAblation[0]!.gap - (await gapGrad(planted, sp, { sites: [] })).gap) < 1e-3);
  assert.ok(Math.abs(c.gatePatching[0]!.gap - (await gapGrad(planted, sp, { sites: [], plan: steer })).gap) < 1e-3);
  assert.ok(c.gateAblation[1]!.gap > c.gateAblation[0]!.gap + 0.5, "zeroing the planted gate raises the Yes − No gap");
  assert.ok(c.gatePatching[1]!.gap < c.gatePatching[0]!.gap - 1, "restoring the gate's unsteered value removes the steered gap's rise");
  assert.ok(c.carrierAblation![1]!.gateAct > c.carrierAblation![0]!.gateAct + 0.5, "zeroing the planted carrier lets the gate fire again");
});
