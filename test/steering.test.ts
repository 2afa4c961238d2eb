// Steering attribution on the planted circuit (test/support/planted-circuit.ts): the invariant
// d gap/dα = upstream + Σ SA + skip + error at every strength and layer, the gap gradient against
// central differences, and the planted carrier (block 1) and gate (block 3) as the top features of
// their layers with the carrier→gate edge the strongest feature edge.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Model } from "../src/model/model.js";
import { hookName } from "../src/hooks/names.js";
import { gapGrad, gapSpellings } from "../src/recipes/gap-grad.js";
import { attributeAt, nodeId, steeringCommand, steeringReport, summarise, trapezoid } from "../src/recipes/steering.js";
import { transcoderCommand } from "../src/recipes/transcoder.js";
import { repoDir } from "./support/paths.js";
import { plantedCircuit, CARRIER_L, GATE_L, INJECT_L, type PlantedCircuit } from "./support/planted-circuit.js";

let dir: string;
let c: PlantedCircuit;
let model: Model;

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "steering-test-"));
  c = await plantedCircuit(dir);
  model = await Model.load(c.file, { threads: 1 });
});

after(() => {
  model?.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
});

test("trapezoid weights", () => {
  assert.deepEqual(trapezoid([0, 1, 3]), [0.5, 1.5, 1]);
  assert.deepEqual(trapezoid([0]), [0]);
});

test("gap gradient in α matches central differences of the gap", async () => {
  const sp = gapSpellings(model, c.prompt.text, c.prompt.ids);
  const at = hookName(INJECT_L, "hook_resid_post");
  const pos = { from: c.prompt.injectFrom };
  const gapAt = async (a: number) => (await gapGrad(model, sp, { sites: [], injection: { at, vector: c.v, scale: a, pos } })).gap;
  // The gate switches off sharply near α 0.35: small steps.
  for (const a of [0.1, 0.3]) {
    const g = await gapGrad(model, sp, { sites: [], injection: { at, vector: c.v, scale: a, pos } });
    const h = 1e-3;
    const fd = (await gapAt(a + h) - (await gapAt(a - h))) / (2 * h);
    assert.ok(Math.abs(g.dScale! - fd) <= 5e-3 * Math.max(1, Math.abs(fd)), `α ${a}: backward ${g.dScale} vs central difference ${fd}`);
  }
});

test("steering attribution: the invariant holds and the planted carrier and gate lead", async (t) => {
  const sp = gapSpellings(model, c.prompt.text, c.prompt.ids);
  const dicts = [c.carrierDict, c.gateDict];
  const alphas = [0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5];
  const runs = [];
  for (const a of alphas) {
    const r = await attributeAt(model, sp, c.prompt.injectFrom, { layer: INJECT_L, vector: c.v }, dicts, a);
    for (const la of r.layers) {
      const sum = la.sa.reduce((x, y) => x + y, 0) + la.upstream + la.skip + la.error;
      assert.ok(Math.abs(sum - r.total) <= 1e-4 * Math.max(1e-6, Math.abs(r.total)), `α ${a} layer ${la.layer}: Σ SA + residual ${sum} vs d gap/dα ${r.total}`);
    }
    runs.push(r);
  }
  const s = summarise(runs, dicts, c.prompt.injectFrom, sp.promptLength, 4);
  t.diagnostic(`gap ${s.gaps.map((g) => g.toFixed(3)).join(" → ")}; Δgap ${s.gapChange.toFixed(4)} vs ∫ d gap/dα ${s.integratedTotal.toFixed(4)}`);
  t.diagnostic(s.features.slice(0, 4).map((f) => `${nodeId(f.layer, f.feature)} ISA ${f.isa.toFixed(4)}`).join("; "));
  assert.ok(Math.abs(s.gapChange - s.integratedTotal) <= 0.1 * Math.abs(s.gapChange), "the trapezoid of d gap/dα reproduces the gap's change");
  const best = (l: number) => s.features.filter((f) => f.layer === l)[0]!;
  assert.equal(best(GATE_L).feature, 0, "the planted gate has the largest |ISA| in block 3");
  assert.equal(best(CARRIER_L).feature, 0, "the planted carrier has the largest |ISA| in block 1");
  assert.ok(best(GATE_L).isa > 0 && best(GATE_L).actTop < best(GATE_L).act0, "switching the gate off raises the Yes−No gap");
  const ff = s.edges.filter((e) => e.from.startsWith("L") && e.to.startsWith("L")).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  assert.deepEqual([ff[0]?.from, ff[0]?.to], [nodeId(CARRIER_L, 0), nodeId(GATE_L, 0)]);
  for (const l of s.layers) assert.ok(l.maxInvariantError <= 1e-4);
});

test("steering attribution refuses a transcoder at or before the injection", async () => {
  const sp = gapSpellings(model, c.prompt.text, c.prompt.ids);
  await assert.rejects(attributeAt(model, sp, c.prompt.injectFrom, { layer: 1, vector: c.v }, [c.carrierDict], 1), /transcodes block 1's MLP, which is not after the injection/);
});

test("selfscope steering-attribution on the organism with trained transcoders: results, graph page, errors", async () => {
  const model = path.join(repoDir(), "models", "organism", "organism.gguf");
  const texts = path.join(dir, "t.txt");
  fs.writeFileSync(texts, "Tell me about frogs\nTell me about the sea\nOnce upon a time there was a dog.\n");
  for (const layer of [2, 3]) await transcoderCommand({ model, out: path.join(dir, `tc${layer}`), layer, texts, steps: 40, dSae: 32, quiet: true, threads: 1 });
  const concepts = path.join(dir, "c.json");
  fs.writeFileSync(concepts, JSON.stringify(["frog"]));
  const out = path.join(dir, "sa");
  const common = { model, out, layers: "1", strengths: "0,1,2", concepts, quiet: true, threads: 1, top: 4 };
  const r = await steeringCommand({ ...common, transcoders: [3, 2].map((l) => path.join(dir, `tc${l}`, "transcoder.safetensors")).join(",") });
  assert.deepEqual(r.dictionaries.map((d) => d.layer), [2, 3]);
  for (const l of r.per_concept[0]!.layers) assert.ok(l.maxInvariantError <= 1e-4, `layer ${l.layer}: invariant error ${l.maxInvariantError}`);
  assert.ok(r.features.every((f, i) => i === 0 || Math.abs(r.features[i - 1]!.isa) >= Math.abs(f.isa)));
  assert.ok(r.edges.some((e) => e.from === "alpha") && r.edges.some((e) => e.to === "gap"));
  const html = fs.readFileSync(path.join(out, "report.html"), "utf8");
  assert.match(html, /<svg id="graph"/);
  assert.match(html, /script-src &#39;sha256-/);
  await assert.rejects(steeringCommand({ ...common, strengths: "1,2", transcoders: path.join(dir, "tc2", "transcoder.safetensors") }), /--strengths: increasing, from 0/);
  await assert.rejects(steeringCommand({ ...common, transcoders: path.join(dir, "nope.safetensors") }), /nope\.safetensors does not exist/);
});

test("the attribution graph page in Chromium: the pinned script runs and a click isolates a node's edges", async (t) => {
  const CHROMIUM = "/usr/bin/chromium";
  if (!fs.existsSync(CHROMIUM)) {
    if (process.env.CI) assert.fail(`${CHROMIUM} is missing (CI is set): install Debian's chromium`);
    t.skip(`${CHROMIUM} not found: browser check skipped`);
    return;
  }
  const feat = (layer: number, feature: number, isa: number, act0: number, actTop: number) => ({ layer, feature, isa, saTop: isa, act0, actTop });
  const r = {
    recipe: "steering-attribution" as const, model: "m.gguf", injection_layer: 0, strengths: [0, 1], concepts: ["x"], gap: "gap",
    dictionaries: [{ source: "a", layer: 1, d_sae: 2 }, { source: "b", layer: 3, d_sae: 2 }],
    per_concept: [],
    features: [feat(3, 0, 2, 3, 0), feat(1, 0, 1, 0, 2), feat(3, 1, -0.5, 1, 1), feat(1, 1, 0.1, 1, 1)],
    edges: [
      { from: "alpha", to: "L1/f0", weight: 1 }, { from: "alpha", to: "L3/f0", weight: 2 }, { from: "alpha", to: "L3/f1", weight: -0.5 }, { from: "alpha", to: "L1/f1", weight: 0.1 },
      { from: "L1/f0", to: "gap", weight: 1 }, { from: "L3/f0", to: "gap", weight: 2 }, { from: "L3/f1", to: "gap", weight: -0.5 }, { from: "L1/f1", to: "gap", weight: 0.1 },
      { from: "L1/f0", to: "L3/f0", weight: 0.9 },
    ],
    gates: ["L3/f0"], carriers: ["L1/f0"], notes: ["n"],
  };
  const file = path.join(dir, "graph.html");
  fs.writeFileSync(file, steeringReport(r));
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"], headless: true });
  try {
    const page = await browser.newPage();
    const problems: string[] = [];
    page.on("pageerror", (e) => problems.push(e.message));
    page.on("console", (m) => { if (m.type() === "error") problems.push(m.text()); });
    await page.goto(`file://${file}`, { waitUntil: "load" });
    assert.equal(await page.locator("#graph .node").count(), 6);
    assert.equal(await page.locator("#graph .edge").count(), 9);
    await page.locator('#graph .node[data-id="L1/f0"] circle').click();
    const op = await page.locator("#graph .edge").evaluateAll((ls) => ls.map((l) => [l.getAttribute("data-from"), l.getAttribute("data-to"), (l as SVGElement).style.opacity]));
    for (const [from, to, o] of op) assert.equal(o, from === "L1/f0" || to === "L1/f0" ? "1" : "0.08", `${from}→${to}`);
    assert.match(await page.locator("#graph").innerHTML(), /L3 f0 \(gate\)/);
    assert.deepEqual(problems, []);
  } finally {
    await browser.close();
  }
});
