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
import { fixture, repoDir } from "./support/paths.js";
import { rewriteGguf } from "./support/gguf-edit.js";

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
      assert.equal(res.head_shifts.length, 16);
      assert.ok(res.head_shifts.every((h, i) => i === 0 || Math.abs(res.head_shifts[i - 1]!.shift.mean) >= Math.abs(h.shift.mean)));
      assert.ok(res.head_shifts.every((h) => h.layer > 1 || Math.abs(h.shift.mean) < 1e-6), "heads up to the injection layer do not move");
      await assert.rejects(attentionCommand({ model: ORGANISM, out: dir, layers: "1,2", concepts, quiet: true }), /one injection layer/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

// A planted routing head: stories260K's block 2 head 0 rewired on the lowest-frequency RoPE pair
// (dims 6–7 rotate by 1e-3 rad per token: nearly position-free) so that its query is the prompt's
// mean direction and its key reads BOS by default and the injected direction v when present. The
// head attends to BOS unsteered and to the injected positions under injection; its shift must be
// the largest of all heads.
test("planted routing head: the largest shift of attention to the injected positions is the planted head's", async () => {
  const STORIES = fixture("stories260K-gguf", "stories260K.gguf");
  const D = 64, L = 2, DH = 8, DIM = 6;
  const unit = (x: ArrayLike<number>) => { const n = Math.hypot(...Array.from(x)); return Float32Array.from(x, (y) => y / n); };
  const r = mulberry32(5);
  const base = await Model.load(STORIES, { threads: 1 });
  const p = renderTrial(base, getVariant("original"), 1, { format: "raw", judgePrompt: "question" });
  const v = Float32Array.from(unit(Array.from({ length: D }, () => r() * 2 - 1)), (x) => 3 * x);
  const at = hookName(L, "ln1.hook_normalized");
  const x = (await base.forward([{ ids: p.ids }], { plan: [{ op: "read", at, pos: { from: 0 } }], logits: "none" })).cache.get(at, 0).data;
  base.dispose();
  const m = new Float32Array(D);
  for (let q = 0; q < p.ids.length; q++) for (let i = 0; i < D; i++) m[i] = m[i]! + x[q * D + i]! / p.ids.length;
  const um = unit(m), vh = unit(v), ub = unit(x.subarray(0, D));
  const mn = Math.hypot(...m), bn = Math.hypot(...x.subarray(0, D));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "attention-planted-"));
  const file = path.join(dir, "planted.gguf");
  rewriteGguf(STORIES, file, (name, data) => {
    // Query head 0: only dim 6, ≈ 3 at a typical position. Key of kv head 0 (shared with query head 1), dim 6: v̂ plus BOS.
    if (name === `blk.${L}.attn_q.weight`) for (let d = 0; d < DH; d++) for (let i = 0; i < D; i++) data[d * D + i] = d === DIM ? (3 / mn) * um[i]! : 0;
    if (name === `blk.${L}.attn_k.weight`) for (let i = 0; i < D; i++) data[DIM * D + i] = 3 * vh[i]! + (10 / bn) * ub[i]!;
  });
  const model = await Model.load(file, { threads: 1 });
  try {
    const a0 = await attentionMass(model, p.ids, p.injectFrom, []);
    const a1 = await attentionMass(model, p.ids, p.injectFrom, [{ op: "add", at: hookName(0, "hook_resid_post"), vector: v, scale: 1, pos: { from: p.injectFrom } }]);
    const shifts = a1.headsInjected.flatMap((row, l) => row.map((y, h) => ({ l, h, shift: y - a0.headsInjected[l]![h]! })));
    shifts.sort((s1, s2) => Math.abs(s2.shift) - Math.abs(s1.shift));
    assert.deepEqual([shifts[0]!.l, shifts[0]!.h], [L, 0], JSON.stringify(shifts.slice(0, 3)));
    assert.ok(a0.headsInjected[L]![0]! < 0.2 && a1.headsInjected[L]![0]! > 0.9, `planted head: ${a0.headsInjected[L]![0]} → ${a1.headsInjected[L]![0]}`);
    assert.ok(Math.abs(shifts[0]!.shift) > 1.5 * Math.abs(shifts[1]!.shift), "well clear of the next head");
  } finally {
    model.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
