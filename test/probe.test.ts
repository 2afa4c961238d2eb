// Probes (issue 17.1; src/math/probe-fit.ts, src/recipes/probe.ts, src/log/steps.ts) on data where
// the answer is known: Gram-space ridge equals the feature-space nested CV; planted linear signals
// come out with the planted R², accuracy and minimal permutation p-values, shuffled controls do not;
// the dual directions equal the primal solutions (ridge normal equations, logistic stationarity);
// AUC equals a brute-force pair count. End to end on stories260K: a target planted on one layer's
// activations is found at that layer, the decomposition's parts add up to the activation, patching a
// model into itself reproduces its generation at every layer, a killed run resumes to the same
// results, and changed inputs or different tokenizers are refused.
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Rng } from "../src/core/rng.js";
import { nestedRidgeCv, solveSpd } from "../src/math/linalg.js";
import { fitLogistic, gramMatrix, logisticFull, logisticProbe, primalDirection, ridgeFull, ridgeProbe, rocAuc } from "../src/math/probe-fit.js";
import { StepLog, STEPS_FILE } from "../src/log/steps.js";
import { Model } from "../src/model/model.js";
import { hookName } from "../src/hooks/names.js";
import { probeCommand, type ProbeResults } from "../src/recipes/probe.js";
import { repoDir } from "./support/paths.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const ORGANISM = path.join(repoDir(), "models", "organism", "organism.gguf");
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-probe-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

function gauss(rng: Rng): number {
  const u = Math.max(rng.next(), 1e-12);
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng.next());
}

/** n × d standard normal rows (flat float32) and a planted β with ‖β‖ = 1. */
function planted(n: number, d: number, seed: number) {
  const rng = new Rng(seed);
  const x = Float32Array.from({ length: n * d }, () => gauss(rng));
  const beta = Array.from({ length: d }, () => gauss(rng));
  const bn = Math.hypot(...beta);
  const signal = Array.from({ length: n }, (_, i) => beta.reduce((s, b, k) => s + (b / bn) * x[i * d + k]!, 0));
  return { x, signal, noise: () => gauss(rng), rng };
}

describe("probe math", () => {
  test("Gram-space ridge equals feature-space nested CV (same folds, same α choice)", () => {
    const n = 60, d = 25;
    const { x, signal, noise } = planted(n, d, 1);
    const y = signal.map((s) => s + 0.7 * noise());
    const rows = Array.from({ length: n }, (_, i) => Array.from(x.subarray(i * d, (i + 1) * d)));
    const alphas = [0.01, 0.1, 1, 10, 100];
    const ref = nestedRidgeCv(rows, y, alphas, { outer: 5, inner: 3, seed: 7 });
    const got = ridgeProbe(gramMatrix(x, n, d), n, [y], { alphas, outer: 5, inner: 3, seed: 7 });
    assert.deepEqual(got.foldAlpha, ref.foldAlpha);
    got.foldR2[0]!.forEach((v, i) => assert.ok(Math.abs(v - ref.foldR2[i]!) < 1e-9, `fold ${i}: ${v} vs ${ref.foldR2[i]}`));
    got.oof[0]!.forEach((v, i) => assert.ok(Math.abs(v - ref.oofPred[i]!) < 1e-8));
  });

  test("a planted linear signal: R² as planted, p minimal; an unrelated target and a shuffled one are not significant", () => {
    const n = 200, d = 20;
    const { x, signal, noise, rng } = planted(n, d, 2);
    const sigma = 0.5; // R² = 1 / (1 + σ²) = 0.8
    const y = signal.map((s) => s + sigma * noise());
    const unrelated = Array.from({ length: n }, () => noise());
    const G = gramMatrix(x, n, d);
    const r = ridgeProbe(G, n, [y, unrelated], { alphas: [0.1, 1, 10, 100], permutations: 40, seed: 3 });
    assert.ok(Math.abs(r.r2[0]! - 0.8) < 0.08, `R² ${r.r2[0]}`);
    assert.ok(r.r2[1]! < 0.05, `unrelated R² ${r.r2[1]}`);
    assert.equal(r.permutation!.p, 1 / 41);
    const shuffled = rng.shuffle([...y]);
    const c = ridgeProbe(G, n, [shuffled], { alphas: [0.1, 1, 10, 100], permutations: 40, seed: 3 });
    assert.ok(c.meanR2 < 0.05, `shuffled R² ${c.meanR2}`);
    assert.ok(c.permutation!.p > 0.05, `shuffled p ${c.permutation!.p}`);
  });

  test("ridgeFull's dual direction solves the primal normal equations", () => {
    const n = 40, d = 6;
    const { x, signal, noise } = planted(n, d, 4);
    const y = signal.map((s) => 2 * s + 0.3 * noise() + 5);
    const full = ridgeFull(gramMatrix(x, n, d), n, [y], [0.5], 3);
    const { w, mean: m } = primalDirection(x, n, d, full.dual[0]!);
    const A = new Float64Array(d * d), b = new Float64Array(d);
    const ym = y.reduce((s, v) => s + v, 0) / n;
    for (let i = 0; i < n; i++)
      for (let j = 0; j < d; j++) {
        const xj = x[i * d + j]! - m[j]!;
        b[j]! += xj * (y[i]! - ym);
        for (let k = 0; k < d; k++) A[j * d + k]! += xj * (x[i * d + k]! - m[k]!);
      }
    for (let j = 0; j < d; j++) A[j * d + j]! += 0.5;
    const ref = solveSpd(A, d, b);
    ref.forEach((v, j) => assert.ok(Math.abs(v - w[j]!) < 1e-9, `w[${j}] ${w[j]} vs ${v}`));
    assert.equal(full.yMean[0], ym);
  });

  test("logistic: the fit is stationary in activation space; planted labels are found, shuffled ones are not", () => {
    const n = 160, d = 12;
    const { x, signal, noise, rng } = planted(n, d, 5);
    const labels = signal.map((s) => (s + 0.4 * noise() > 0 ? 1 : 0));
    const G = gramMatrix(x, n, d);
    const C = 0.3;
    const full = logisticFull(G, n, labels, [C], 3, 0);
    const { w, mean: m } = primalDirection(x, n, d, full.dual[0]!);
    // Stationarity of C·Σ log-loss + ½‖w‖²: w = C Σ sᵢ σ(−sᵢ fᵢ) (xᵢ − x̄), and Σ sᵢ σ(−sᵢ fᵢ) = 0.
    const g = Float64Array.from(w);
    let gb = 0;
    for (let i = 0; i < n; i++) {
      let f = full.intercept[0]!;
      for (let k = 0; k < d; k++) f += w[k]! * (x[i * d + k]! - m[k]!);
      const s = labels[i] === 1 ? 1 : -1;
      const p = 1 / (1 + Math.exp(s * f));
      for (let k = 0; k < d; k++) g[k]! -= C * s * p * (x[i * d + k]! - m[k]!);
      gb -= C * s * p;
    }
    assert.ok(Math.max(...g.map(Math.abs)) < 1e-7 && Math.abs(gb) < 1e-7, `gradient ${Math.max(...g.map(Math.abs))}, ${gb}`);
    const r = logisticProbe(G, n, labels, { Cs: [0.01, 0.1, 1, 10], permutations: 30, seed: 1 });
    // The Bayes accuracy with this label noise is 1 − arctan(0.4)/π = 0.879.
    assert.ok(r.accuracy > 0.8 && r.auc > 0.9, `accuracy ${r.accuracy}, AUC ${r.auc}`);
    assert.equal(r.permutation!.p, 1 / 31);
    const c = logisticProbe(G, n, rng.shuffle([...labels]), { Cs: [0.01, 0.1, 1, 10], permutations: 30, seed: 1 });
    assert.ok(c.accuracy < 0.62 && c.permutation!.p > 0.05, `shuffled accuracy ${c.accuracy}, p ${c.permutation!.p}`);
  });

  test("logistic: three planted classes (one-vs-rest) and fitLogistic on separable data stays finite", () => {
    const n = 150, d = 8;
    const { x, rng } = planted(n, d, 6);
    const labels = Array.from({ length: n }, (_, i) => i % 3);
    for (let i = 0; i < n; i++) x[i * d + labels[i]!]! += 3;
    const r = logisticProbe(gramMatrix(x, n, d), n, labels, { Cs: [0.1, 1], seed: 0 });
    assert.equal(r.classes, 3);
    assert.ok(r.accuracy > 0.85 && r.auc > 0.95, `accuracy ${r.accuracy}, AUC ${r.auc}`);
    const z = Float64Array.from([-2, -1, 1, 2]);
    const wb = fitLogistic(z, 4, 1, [-1, -1, 1, 1], 1e6);
    assert.ok(wb.every(Number.isFinite) && wb[0]! > 1);
    void rng;
  });

  test("rocAuc equals the brute-force pair count, ties counted half", () => {
    const rng = new Rng(9);
    const scores = Array.from({ length: 41 }, () => Math.round(rng.next() * 8) / 8);
    const pos = scores.map(() => rng.next() > 0.5);
    let num = 0, den = 0;
    scores.forEach((a, i) => scores.forEach((b, j) => {
      if (pos[i] && !pos[j]) {
        den++;
        num += a > b ? 1 : a === b ? 0.5 : 0;
      }
    }));
    assert.ok(Math.abs(rocAuc(scores, pos) - num / den) < 1e-12);
    assert.ok(Number.isNaN(rocAuc([1, 2], [true, true])));
  });
});

describe("step log", () => {
  test("resumes after a torn line; refuses other inputs and other recipes", () => {
    const dir = path.join(tmpRoot, "steps");
    const a = StepLog.open(dir, "probe", { x: 1, y: [1, 2] });
    a.put("one", { v: 1 });
    a.put("two", 2);
    a.close();
    fs.appendFileSync(path.join(dir, STEPS_FILE), '{"key":"three","val'); // killed mid-write
    const b = StepLog.open(dir, "probe", { y: [1, 2], x: 1 }); // key order does not matter
    assert.equal(b.resumed, 2);
    assert.deepEqual(b.get("one"), { v: 1 });
    assert.equal(b.has("three"), false);
    b.put("three", 3);
    b.close();
    assert.equal(StepLog.open(dir, "probe", { x: 1, y: [1, 2] }).resumed, 3);
    assert.throws(() => StepLog.open(dir, "probe", { x: 2, y: [1, 2] }), /different inputs \(x: 1 then, 2 now\).*choose another --out/);
    assert.throws(() => StepLog.open(dir, "esr", { x: 1, y: [1, 2] }), /holds a `selfscope probe` run, not `esr`/);
  });
});

describe("selfscope probe on stories260K", () => {
  const ADJ = ["big", "small", "red", "happy", "sad", "old", "new", "little", "funny", "kind"];
  const NOUN = ["dog", "cat", "bird", "tree", "ball", "girl", "boy", "fish", "car", "cake"];
  const prompts = ADJ.flatMap((a) => NOUN.map((nn) => `Once upon a time there was a ${a} ${nn}`));
  const LAYER = 2;
  let truth: number[] = [];

  async function writeData(file: string, target: (i: number) => number | number[]) {
    fs.writeFileSync(file, prompts.map((p, i) => JSON.stringify({ prompt: p, target: target(i) })).join("\n") + "\n");
  }

  test("a target planted on layer 2's activations is found at layer 2; the parts add up; self-patching is exact", async () => {
    const model = await Model.load(STORIES, { threads: 2 });
    const at = hookName(LAYER, "hook_resid_post");
    const { cache } = await model.forward(prompts, { plan: [{ op: "read", at }], logits: "none" });
    const d = model.config.dModel;
    const rng = new Rng(11);
    const beta = Array.from({ length: d }, () => gauss(rng));
    truth = prompts.map((_, i) => {
      const { data, shape } = cache.get(at, i);
      const last = data.subarray((shape[0]! - 1) * d);
      return beta.reduce((s, b, k) => s + b * last[k]!, 0) + 0.05 * gauss(rng);
    });
    model.dispose();
    const data = path.join(tmpRoot, "planted.jsonl");
    await writeData(data, (i) => [truth[i]!, gauss(rng)]);
    const noiseData = path.join(tmpRoot, "noise.jsonl");
    await writeData(noiseData, () => gauss(rng));
    const out = path.join(tmpRoot, "run1");
    const r: ProbeResults = await probeCommand({
      model: [`s=${STORIES}`], data, out, layers: "0-4", permutations: 20, targetNames: "planted,noise", decomposeLayer: LAYER, patchLayers: "all", patchPrompts: 2,
      steerAlphas: "0,1", steerPrompts: 2, maxTokens: 6, threads: 2, quiet: true,
    });
    // Every layer of this small model carries the two words the prompts vary in, so the target is
    // linear in each layer's activations (R² ≥ 0.96 at all five); the planted layer fits to its noise.
    const l2 = r.models[0]!.fits.find((f) => f.layer === LAYER)!;
    assert.ok(l2.ridge!.r2[0]! > 0.97, `planted R² at layer 2: ${l2.ridge!.r2[0]}`);
    assert.ok(l2.ridge!.r2[1]! < 0.05, `noise target R² ${l2.ridge!.r2[1]}`);
    assert.equal(l2.p, 1 / 21);
    const control = await probeCommand({ model: [STORIES], data: noiseData, out: path.join(tmpRoot, "control"), layers: "2", permutations: 20, noDecompose: true, threads: 2, quiet: true });
    assert.ok(control.models[0]!.fits[0]!.score < 0.05 && control.models[0]!.fits[0]!.p! > 0.05, `control ${JSON.stringify(control.models[0]!.fits[0]!.p)}`);
    // Decomposition at layer 2: embed + heads + attn.rest + MLPs = the activation.
    const dec = r.decompositions[0]!;
    assert.equal(dec.layer, LAYER);
    assert.ok(dec.sumCheck < 1e-4, `sum check ${dec.sumCheck}`);
    assert.ok(dec.components.some((c) => c.name === "L2H0") && dec.components.some((c) => c.name === "L2 mlp") && !dec.components.some((c) => c.name === "L3 mlp"));
    // Patching the model into itself at every layer gives back its own generation exactly.
    assert.equal(r.patch!.prompts.length, 2);
    for (const p of r.patch!.prompts) {
      assert.equal(p.source, p.own);
      for (const l of ["0", "1", "2", "3", "4"]) {
        assert.equal(p.patched[l], p.own, `layer ${l}`);
        assert.equal(p.agreeOwn[l], 1);
      }
    }
    assert.equal(r.steer!.alphas.length, 2);
    assert.ok(r.steer!.residNorm > 0);
    assert.ok(fs.readFileSync(path.join(out, "report.html"), "utf8").includes("R² by layer"));
    const saved = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")) as ProbeResults;
    assert.equal(saved.models[0]!.fits.length, 5);
  });

  test("a killed run resumes to the same results; changed flags are refused", async () => {
    const data = path.join(tmpRoot, "planted.jsonl");
    const out = path.join(tmpRoot, "run2");
    const args = { model: [`s=${STORIES}`], data, out, layers: "1-3", permutations: 5, noDecompose: true, threads: 2, quiet: true };
    const first = await probeCommand(args);
    const file = path.join(out, STEPS_FILE);
    const lines = fs.readFileSync(file, "utf8").split("\n");
    // Keep the header, the activations of the first batches and a torn line: as if killed mid-run.
    fs.writeFileSync(file, lines.slice(0, 4).join("\n") + "\n" + lines[5]!.slice(0, 10));
    const again = await probeCommand(args);
    assert.equal(again.resumedSteps, 3);
    assert.deepEqual(again.models, first.models);
    await assert.rejects(probeCommand({ ...args, permutations: 6 }), /different inputs \(permutations: 5 then, 6 now\)/);
  });

  test("two models: curves and their difference; patching across different tokenizers is refused", async () => {
    const data = path.join(tmpRoot, "labels.jsonl");
    fs.writeFileSync(data, prompts.map((p, i) => JSON.stringify({ prompt: p, label: truth[i]! > 0 ? "pos" : "neg" })).join("\n") + "\n");
    const r = await probeCommand({ model: [`a=${STORIES}`, `b=${STORIES}`], data, out: path.join(tmpRoot, "run3"), layers: "2", permutations: 0, noDecompose: true, threads: 2, quiet: true });
    assert.equal(r.kind, "logistic");
    assert.deepEqual(r.names, ["neg", "pos"]);
    assert.ok(r.models[0]!.fits[0]!.score > 0.75, `accuracy ${r.models[0]!.fits[0]!.score}`);
    assert.deepEqual(r.difference, [{ layer: 2, delta: 0 }]);
    await assert.rejects(
      probeCommand({ model: [`a=${STORIES}`, `o=${ORGANISM}`], data, out: path.join(tmpRoot, "run4"), layers: "1", permutations: 0, noDecompose: true, patchLayers: "1", patchFrom: "o", patchInto: "a", threads: 2, quiet: true }),
      /tokenizers differ/,
    );
  });

  test("patching another model's last layer gives the source's next token", async () => {
    const base = path.join(repoDir(), "models", "organism", "base.gguf");
    const data = path.join(tmpRoot, "index.jsonl");
    await writeData(data, (i) => i);
    const r = await probeCommand({ model: [`base=${base}`, `organism=${ORGANISM}`], data, out: path.join(tmpRoot, "cross"), layers: "2", permutations: 0, noDecompose: true, patchLayers: "0,4", patchFrom: "organism", patchInto: "base", patchPrompts: 6, maxTokens: 4, threads: 2, quiet: true });
    const ps = r.patch!.prompts;
    assert.ok(ps.some((p) => p.ids.source[0] !== p.ids.own[0]), "the two models disagree somewhere");
    // The last layer's residual stream at the last prompt position decides the first generated token.
    for (const p of ps) assert.equal(p.ids.patched["4"]![0], p.ids.source[0]);
  });

  test("bad data is named with its line", async () => {
    const bad = path.join(tmpRoot, "bad.jsonl");
    fs.writeFileSync(bad, prompts.slice(0, 12).map((p, i) => JSON.stringify(i === 4 ? { prompt: p, target: 1, label: "x" } : { prompt: p, target: i })).join("\n"));
    await assert.rejects(probeCommand({ model: [STORIES], data: bad, out: path.join(tmpRoot, "bad") }), /line 5: give exactly one of "target"/);
  });
});
