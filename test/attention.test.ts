// `selfscope attention` (13b): the last prompt token's attention mass by region, checked against the
// other engine (jax-js on wasm) and against invariants of the injection.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Model } from "../src/model/model.js";
import { getVariant, renderTrial } from "../src/eval/protocol.js";
import { attentionCommand, attentionMass } from "../src/recipes/attention.js";
import { hookName } from "../src/hooks/names.js";
import { mulberry32 } from "../src/core/rng.js";
import { repoDir } from "./support/paths.js";

const ORGANISM = path.join(repoDir(), "models", "organism", "organism.gguf");

describe("attention", () => {
  let cpu: Model;
  let wasm: Model;
  before(async () => {
    cpu = await Model.load(ORGANISM, { threads: 1 });
    wasm = await Model.load(ORGANISM, { device: "wasm" });
  });
  after(() => {
    cpu?.dispose();
    wasm?.dispose();
  });

  test("masses sum to 1, match the jax engine, and do not move before the injection layer", async () => {
    const p = renderTrial(cpu, getVariant("original"), 4, { format: "raw", judgePrompt: "question" });
    const r = mulberry32(3);
    const v = Float32Array.from({ length: 64 }, () => (r() * 2 - 1) * 0.8);
    const plan = (s: number) => (s === 0 ? [] : [{ op: "add" as const, at: hookName(1, "hook_resid_post"), vector: v, scale: s, pos: { from: p.injectFrom } }]);
    const a0 = await attentionMass(cpu, p.ids, p.injectFrom, plan(0));
    const a4 = await attentionMass(cpu, p.ids, p.injectFrom, plan(4));
    const w4 = await attentionMass(wasm, p.ids, p.injectFrom, plan(4));
    for (const m of [a0, a4]) for (const l of m.layers) assert.ok(Math.abs(l.bos + l.injected + l.other - 1) < 1e-5, JSON.stringify(l));
    a4.layers.forEach((l, i) => {
      for (const k of ["bos", "injected", "other"] as const) assert.ok(Math.abs(l[k] - w4.layers[i]![k]) < 1e-5, `layer ${i} ${k}: cpu ${l[k]} wasm ${w4.layers[i]![k]}`);
    });
    for (const i of [0, 1]) assert.deepEqual(a4.layers[i], a0.layers[i], `layer ${i} is before the injection's effect`);
    assert.ok(a4.layers.slice(2).some((l, i) => Math.abs(l.injected - a0.layers[i + 2]!.injected) > 1e-3), "the injection moves attention after layer 1");
  });

  test("selfscope attention writes a table per strength and layer; one layer only", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "attention-test-"));
    try {
      const concepts = path.join(dir, "c.json");
      fs.writeFileSync(concepts, JSON.stringify(["frog", "shoe"]));
      const res = await attentionCommand({ model: ORGANISM, out: dir, layers: "1", strengths: "0,2", concepts, trials: 1, quiet: true, threads: 1 });
      assert.equal(res.rows.length, 2 * 5 * 3);
      assert.match(fs.readFileSync(path.join(dir, "report.html"), "utf8"), /<svg/);
      const at = (s: number, l: number) => res.rows.filter((x) => x.strength === s && x.layer === l).reduce((a, x) => a + x.mass.mean, 0);
      assert.ok(Math.abs(at(2, 3) - 1) < 1e-5);
      await assert.rejects(attentionCommand({ model: ORGANISM, out: dir, layers: "1,2", concepts, quiet: true }), /one injection layer/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
