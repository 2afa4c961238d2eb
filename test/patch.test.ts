// `selfscope patch` (component knock-out / knock-in): invariants of the patching itself, a planted
// circuit it must find, the CLI end to end on the organism, and its errors.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Model } from "../src/model/model.js";
import { readGguf, readGgufTensor } from "../src/io/gguf.js";
import { rewriteGguf } from "./support/gguf-edit.js";
import { getVariant, renderTrial, FORCED_PREFILL } from "../src/eval/protocol.js";
import { cellsFor, conceptScorer, gapScorer, patchCommand, patchTrial, summarise, type PatchCell } from "../src/recipes/patch.js";
import { mulberry32 } from "../src/core/rng.js";
import { fixture, repoDir } from "./support/paths.js";

const STORIES = fixture("stories260K-gguf", "stories260K.gguf");

const INJECT = 0;
const PLANTED = 3;

describe("patch", () => {
  let dir: string;
  let base: Model;
  let planted: Model;
  let v: Float32Array;

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "patch-test-"));
    const r = mulberry32(5);
    const d = 64;
    // A random direction of norm 3 (the size of a layer-0 concept vector in stories260K).
    const u = Float32Array.from({ length: d }, () => r() * 2 - 1);
    const un = Math.hypot(...u);
    v = u.map((x) => (3 * x) / un);
    // The planted circuit: MLP unit 0 of block 3 reads the injected direction (gate = up = v̂, its
    // RMSNorm weights set to 1) and writes "Yes minus No" onto the unembedding; nothing else changes.
    base = await Model.load(STORIES, { threads: 1 });
    const tok = base.tokenizer!;
    const first = (w: string) => tok.encode(w, { addSpecial: false }).find((id) => tok.decode([id]).trim().length > 0)!;
    const out = readGgufTensor(readGguf(STORIES), "output.weight").data;
    const push = new Float32Array(d);
    for (const [w, sgn] of [["Yes", 1], ["yes", 1], ["No", -1], ["no", -1]] as const) for (let i = 0; i < d; i++) push[i] = push[i]! + sgn * out[first(w) * d + i]!;
    const file = path.join(dir, "planted.gguf");
    rewriteGguf(STORIES, file, (name, data) => {
      if (name === `blk.${PLANTED}.ffn_norm.weight`) data.fill(1);
      // unit = a·silu(a), a = v̂·x̂: ~0.05 unsteered (a ≈ 0.3), ~28 with the injection at strength 2 (a ≈ 5),
      // times 0.2·(Yes − No unembedding rows): the plant dominates the steered gap.
      if (name === `blk.${PLANTED}.ffn_gate.weight` || name === `blk.${PLANTED}.ffn_up.weight`) for (let i = 0; i < d; i++) data[i] = v[i]! / 3; // row 0
      if (name === `blk.${PLANTED}.ffn_down.weight`) for (let i = 0; i < d; i++) data[i * 172] = 0.2 * push[i]!; // column 0
    });
    planted = await Model.load(file, { threads: 1 });
  });
  after(() => {
    base?.dispose();
    planted?.dispose();
    if (!process.env.KEEP) fs.rmSync(dir, { recursive: true, force: true });
  });

  const prompt = (m: Model, n: number, prefill: string | null = null) => renderTrial(m, getVariant("original"), n, { format: "raw", judgePrompt: "question", prefill });

  test("invariants: patching nothing, the whole injection, or the whole residual", async () => {
    const p = prompt(base, 2);
    const scorer = gapScorer(base, p.text, p.ids);
    assert.ok(scorer.describe.includes("no single-token Yes/No"), scorer.describe);
    const cells: PatchCell[] = [
      // Components before the injection see the same input steered or not: patching them changes nothing.
      { layer: INJECT, component: "attn", mode: "knock-out" },
      { layer: INJECT, component: "mlp", mode: "knock-in" },
      // The residual at the injection site carries the whole injection.
      { layer: INJECT, component: "resid", mode: "knock-in" },
      { layer: INJECT, component: "resid", mode: "knock-out" },
      { layer: 4, component: "resid", mode: "knock-out" },
      { layer: 2, component: "mlp", mode: "knock-out" },
    ];
    for (const positions of ["all", "last"] as const) {
      const r = await patchTrial(base, { ids: p.ids, injectFrom: p.injectFrom, vector: v, strength: 2, layer: INJECT, scorer, cells, positions, batchSize: 4 });
      assert.ok(Math.abs(r.steered - r.unsteered) > 0.05, `steering moves the gap: ${r.steered} vs ${r.unsteered}`);
      assert.ok(Math.abs(r.cells[0]! - r.steered) <= 1e-5, `knock-out before the injection = steered (${positions})`);
      assert.ok(Math.abs(r.cells[1]! - r.unsteered) <= 1e-5, `knock-in before the injection = unsteered (${positions})`);
      if (positions === "all") {
        assert.ok(Math.abs(r.cells[2]! - r.steered) <= 1e-5, "knock-in of the injected residual = steered");
        assert.ok(Math.abs(r.cells[3]! - r.unsteered) <= 1e-5, "knock-out of the injected residual = unsteered");
        assert.ok(Math.abs(r.cells[4]! - r.unsteered) <= 1e-5, "knock-out of the last residual = unsteered");
      } else {
        // Only the last position patched: the injection at earlier positions still reaches it through attention.
        assert.ok(Math.abs(r.cells[3]! - r.unsteered) > 1e-4, "a last-position knock-out leaves the earlier injection");
      }
      // A real component after the injection moves the metric (not a no-op).
      assert.ok(Math.abs(r.cells[5]! - r.steered) > 1e-4, `L2 mlp knock-out moves the gap (${positions})`);
    }
  });

  test("planted circuit: the planted MLP is the only sufficient component and is necessary", async (t) => {
    const cells = cellsFor(5, INJECT, ["attn", "mlp"]);
    // Trial prompts 1-4 with the same injected direction: the "concepts" the intervals are over.
    const sweep = async (m: Model) => {
      const acc = { steered: [] as number[], unsteered: [] as number[], cells: [] as number[][] };
      for (const n of [1, 2, 3, 4]) {
        const p = prompt(m, n);
        const r = await patchTrial(m, { ids: p.ids, injectFrom: p.injectFrom, vector: v, strength: 2, layer: INJECT, scorer: gapScorer(m, p.text, p.ids), cells, positions: "all", batchSize: 16 });
        acc.steered.push(r.steered);
        acc.unsteered.push(r.unsteered);
        acc.cells.push(r.cells);
      }
      return summarise("logit_gap", "test", acc, cells);
    };
    const m = await sweep(planted);
    assert.ok(m.steered.mean - m.unsteered.mean > 2, `the plant raises the gap: ${m.steered.mean} vs ${m.unsteered.mean}`);
    assert.deepEqual(m.sufficient, [`L${PLANTED} mlp`]);
    assert.ok(m.necessary.includes(`L${PLANTED} mlp`), m.necessary.join(","));
    const ki = m.cells.find((c) => c.mode === "knock-in" && c.layer === PLANTED && c.component === "mlp")!;
    t.diagnostic(`planted: gap steered ${m.steered.mean.toFixed(2)}, unsteered ${m.unsteered.mean.toFixed(2)}; necessary ${m.necessary.join(", ")}; sufficient ${m.sufficient.join(", ")}; L${PLANTED} mlp knock-in share ${(100 * ki.recovered!).toFixed(0)}%`);
    assert.ok(ki.recovered! > 0.8 && ki.significant, JSON.stringify(ki));
    // The same analysis on the unplanted base does not name block 3's MLP as sufficient.
    assert.ok(!(await sweep(base)).sufficient.includes(`L${PLANTED} mlp`));
  });

  test("concept scorer: the first token of the concept after the forced prefill", () => {
    const p = prompt(base, 1, FORCED_PREFILL);
    const s = conceptScorer(base, p.text, p.ids, "frog");
    const want = base.tokenizer!.encode(p.text + " frog", { addSpecial: false }).slice(p.ids.length)[0];
    assert.deepEqual(s.seqs, [[want]]);
    assert.equal(s.combine([-1.5]), -1.5);
  });

  test("selfscope patch on the organism: writes results, names layer-2 MLP necessary and sufficient; bad flags are named", async () => {
    const out = path.join(dir, "run");
    const concepts = path.join(dir, "c.json");
    fs.writeFileSync(concepts, JSON.stringify(["frog", "shoe", "drum"]));
    const model = path.join(repoDir(), "models", "organism", "organism.gguf");
    const r = await patchCommand({ model, out, layers: "1", strengths: "2", concepts, trials: 1, quiet: true, threads: 1 });
    for (const f of ["results.json", "trials.jsonl", "report.html"]) assert.ok(fs.existsSync(path.join(out, f)), f);
    const gap = r.metrics.find((m) => m.metric === "logit_gap")!;
    assert.ok(gap.steered.mean - gap.unsteered.mean > 5, `the organism detects: ${gap.steered.mean} vs ${gap.unsteered.mean}`);
    assert.ok(gap.necessary.includes("L2 mlp") && gap.sufficient.includes("L2 mlp"), `${gap.necessary} / ${gap.sufficient}`);
    assert.equal(r.metrics.length, 2);
    assert.equal(fs.readFileSync(path.join(out, "trials.jsonl"), "utf8").trim().split("\n").length, 6);
    assert.match(fs.readFileSync(path.join(out, "report.html"), "utf8"), /<svg/);
    await assert.rejects(patchCommand({ model, out, layers: "1,2", concepts, quiet: true }), /one injection layer/);
    await assert.rejects(patchCommand({ model, out, layers: "4", concepts, quiet: true }), /no component comes after it/);
    await assert.rejects(patchCommand({ model, out, layers: "1", components: "attn,head", concepts, quiet: true }), /unknown component "head"/);
    await assert.rejects(patchCommand({ model, out, layers: "1", positions: "first", concepts, quiet: true }), /--positions first/);
  });
});
