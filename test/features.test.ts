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
import { readGguf, readGgufTensor } from "../src/io/gguf.js";
import { getVariant, renderTrial } from "../src/eval/protocol.js";
import { gapScorer } from "../src/recipes/patch.js";
import { carriers, deltaU, featureStats, featuresCommand, gates, profile, spearman } from "../src/recipes/features.js";
import { transcoderCommand } from "../src/recipes/transcoder.js";
import { writeSafetensors } from "../src/io/safetensors.js";
import { repoDir } from "./support/paths.js";
import { hookName } from "../src/hooks/names.js";
import { transcoderSites, type Dictionary } from "../src/vectors/dictionary.js";
import { mulberry32 } from "../src/core/rng.js";
import { rewriteGguf } from "./support/gguf-edit.js";
import { fixture } from "./support/paths.js";

const STORIES = fixture("stories260K-gguf", "stories260K.gguf");
const D = 64, F = 172, S = 9;
const GATE_L = 3, CARRIER_L = 1;

let dir: string;
let planted: Model;
let gateDict: Dictionary, carrierDict: Dictionary;
let v: Float32Array;
let du: Float32Array;
let prompt: { ids: number[]; injectFrom: number; text: string };

const unit = (x: ArrayLike<number>) => { const n = Math.hypot(...Array.from(x)); return Float32Array.from(x, (y) => y / n); };

function dict(layer: number, first: { enc: Float32Array; dec: Float32Array }, r: () => number): Dictionary {
  const wEnc = new Float32Array(D * S), wDec = new Float32Array(S * D);
  for (let f = 0; f < S; f++) {
    const e = f === 0 ? first.enc : unit(Array.from({ length: D }, () => r() * 2 - 1));
    const d = f === 0 ? first.dec : unit(Array.from({ length: D }, () => r() * 2 - 1));
    for (let i = 0; i < D; i++) { wEnc[i * S + f] = e[i]!; wDec[f * D + i] = d[i]!; }
  }
  const sites = transcoderSites(layer);
  return { kind: "transcoder", activation: "jumprelu", dIn: D, dSae: S, dOut: D, wEnc, bEnc: new Float32Array(S), wDec, bDec: new Float32Array(D), threshold: new Float32Array(S), k: null, wSkip: null, bDecToInput: false, inputSite: sites.input, outputSite: sites.output, source: `planted layer ${layer}` };
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "features-test-"));
  const r = mulberry32(21);
  const base = await Model.load(STORIES, { threads: 1 });
  prompt = renderTrial(base, getVariant("original"), 2, { format: "raw", judgePrompt: "question" });
  v = Float32Array.from(unit(Array.from({ length: D }, () => r() * 2 - 1)), (x) => 3 * x);
  // The gate's input direction: the mean normalized MLP input of block 3 over the injected positions.
  const res = await base.forward([{ ids: prompt.ids }], { plan: [{ op: "read", at: hookName(GATE_L, "ln2.hook_normalized"), pos: { from: 0 } }], logits: "none" });
  const x = res.cache.get(hookName(GATE_L, "ln2.hook_normalized"), 0).data;
  const m = new Float32Array(D);
  const n = prompt.ids.length - prompt.injectFrom;
  for (let p = prompt.injectFrom; p < prompt.ids.length; p++) for (let i = 0; i < D; i++) m[i] = m[i]! + x[p * D + i]! / n;
  const mNorm = Math.hypot(...m);
  const ug = unit(m);
  const sc = gapScorer(base, prompt.text, prompt.ids);
  du = deltaU(readGgufTensor(readGguf(STORIES), "output.weight"), sc.seqs.slice(0, sc.nYes), sc.seqs.slice(sc.nYes));
  const noDir = unit(du.map((y) => -y));
  base.dispose();
  const vh = unit(v);
  const file = path.join(dir, "planted.gguf");
  rewriteGguf(STORIES, file, (name, data) => {
    // Gate: a = (3/|m|)·u_g·x̂ ≈ 3 by default; writes along No − Yes.
    if (name === `blk.${GATE_L}.ffn_gate.weight` || name === `blk.${GATE_L}.ffn_up.weight`) for (let i = 0; i < D; i++) data[i] = (3 / mNorm) * ug[i]!;
    if (name === `blk.${GATE_L}.ffn_down.weight`) for (let i = 0; i < D; i++) data[i * F] = 0.5 * noDir[i]!;
    // Carrier: reads the injected direction, writes −u_g (switching the gate off).
    if (name === `blk.${CARRIER_L}.ffn_gate.weight` || name === `blk.${CARRIER_L}.ffn_up.weight`) for (let i = 0; i < D; i++) data[i] = vh[i]!;
    if (name === `blk.${CARRIER_L}.ffn_down.weight`) for (let i = 0; i < D; i++) data[i * F] = -0.5 * ug[i]!;
  });
  planted = await Model.load(file, { threads: 1 });
  gateDict = dict(GATE_L, { enc: ug, dec: noDir }, r);
  carrierDict = dict(CARRIER_L, { enc: vh, dec: unit(ug.map((y) => -y)) }, r);
});

after(() => {
  planted?.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
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
  for (const f of ["results.json", "report.html"]) assert.ok(fs.existsSync(path.join(out, f)));
  await assert.rejects(featuresCommand({ ...common, strengths: "1,2", transcoder: path.join(dir, "tc2", "transcoder.safetensors") }), /--strengths must include 0/);
  const gs = path.join(dir, "params.safetensors");
  writeSafetensors(gs, { w_enc: { data: new Float32Array(64 * 4), shape: [64, 4] } });
  await assert.rejects(featuresCommand({ ...common, transcoder: gs }), /say which layer's MLP it transcodes \(--gate-layer/);
  await assert.rejects(featuresCommand({ ...common, transcoder: gs, gateLayer: 2 }), /params\.safetensors: missing tensor w_dec/);
});
