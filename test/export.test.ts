// exportMerged (src/model/export.ts): a random LoRA adapter and full-weight deltas merged into
// the weights and written as an HF safetensors folder must load back with Model.load and give the
// logits of the merged weights run in memory (within 1e-5), and the same loss as the base model
// with the params applied by the engine (lossAndGrad). On the bundled stories260K (a GGUF source:
// config.json is written from the config) and the qwen3 fixture (HF source: qk-norms; its
// config.json and side files are carried over). Bad input: an existing output folder without
// force, an unknown weight name, a parameter kind with no weight, GGUF output from a safetensors source or
// into a folder. GGUF export (a copy of an F32 GGUF with the merged tensors) reloads with the same logits.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { makeFixtures } from "../scripts/make-fixtures.js";
import { BUNDLED_MODEL } from "../src/core/package.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import type { TrainParam } from "../src/engine/grad.js";
import { exportMerged, mergeParams } from "../src/model/export.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { Model } from "../src/model/model.js";
import { prng } from "./support/prng.js";

const IDS = [[1, 7, 42, 9, 100, 3], [1, 250, 17, 99]];
const TARGETS = [[7, 42, 9, 100, 3, 11], [250, 17, 99, 8]];

function rand(n: number, seed: number, scale: number): Float32Array {
  const u = prng(seed);
  return Float32Array.from({ length: n }, () => (u() * 2 - 1) * scale);
}

function params(host: HostModel): TrainParam[] {
  const c = host.config;
  const shape = (n: string) => host.weights.get(n)!.shape;
  const size = (n: string) => shape(n).reduce((a, b) => a * b, 1);
  const [qOut, qIn] = shape("blocks.0.attn.q.weight") as [number, number];
  const rank = 2;
  return [
    { kind: "lora", layer: 0, linear: "attn.q", rank, scale: 0.5, a: rand(rank * qIn, 1, 0.3), b: rand(qOut * rank, 2, 0.3) },
    { kind: "delta", name: "blocks.0.attn.q.weight", value: rand(size("blocks.0.attn.q.weight"), 3, 0.05) },
    { kind: "delta", name: `blocks.${c.nLayers - 1}.mlp.down.weight`, value: rand(size(`blocks.${c.nLayers - 1}.mlp.down.weight`), 4, 0.05) },
    { kind: "delta", name: "embed.weight", value: rand(size("embed.weight"), 5, 0.05) },
    { kind: "delta", name: "lnFinal.weight", value: rand(size("lnFinal.weight"), 6, 0.1) },
  ];
}

let dir = "";
let qwen3 = "";
before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-export-"));
  qwen3 = makeFixtures(dir).find((p) => p.family === "qwen3")!.hf;
});
after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

for (const which of ["stories260K", "qwen3"] as const)
  describe(which, () => {
    test("safetensors export reloads with the merged logits (1e-5) and the engine's loss with the params applied", async () => {
      const src = which === "qwen3" ? qwen3 : BUNDLED_MODEL;
      const host = loadHostModel(src);
      const ps = params(host);
      const out = path.join(dir, `${which}-merged`);
      const { files } = exportMerged(src, ps, out, { format: "safetensors" });
      assert.ok(files.includes("model.safetensors") && files.includes("config.json"));
      // An HF source's side files (here generation_config.json; tokenizer files when present) are carried over.
      if (which === "qwen3") for (const f of fs.readdirSync(src).filter((f) => f !== "model.safetensors")) assert.ok(files.includes(f), `${f} carried over`);

      const reloaded = await Model.load(out, { device: "cpu", threads: 1 });
      const merged = await CpuEngine.create({ config: host.config, weights: mergeParams(host, ps) }, { threads: 1 });
      const base = await CpuEngine.create(host, { threads: 1 });
      try {
        const got = await reloaded.forward(IDS.map((ids) => ({ ids })));
        const want = await merged.forward(IDS);
        const plain = await base.forward(IDS);
        let err = 0, moved = 0;
        want.logits.forEach((w, b) => {
          const g = got.logits[b]!;
          assert.equal(g.length, w.length);
          for (let i = 0; i < w.length; i++) {
            err = Math.max(err, Math.abs(g[i]! - w[i]!));
            moved = Math.max(moved, Math.abs(w[i]! - plain.logits[b]![i]!));
          }
        });
        assert.ok(err <= 1e-5, `reloaded logits differ by ${err}`);
        assert.ok(moved > 1e-3, `the params change the logits (by ${moved}), so the check is not vacuous`);
        // The merge is what the engine computes with the params applied.
        const withParams = await base.lossAndGrad(IDS, { targets: TARGETS, params: ps });
        const probe: TrainParam[] = [{ kind: "vector", at: "blocks.0.hook_resid_post", value: new Float32Array(host.config.dModel) }];
        const fromExport = await reloaded.lossAndGrad(IDS.map((ids) => ({ ids })), { targets: TARGETS, params: probe });
        assert.ok(Math.abs(withParams.loss - fromExport.loss) <= 1e-5 * Math.abs(withParams.loss), `loss ${fromExport.loss} vs ${withParams.loss}`);
      } finally {
        await merged.close();
        await base.close();
        reloaded.dispose();
      }
    });
  });

test("gguf export (stories260K, F32 GGUF): a copy with the merged tensors, RoPE-permuted back for q, reloads with the merged logits (1e-5)", async () => {
  const host = loadHostModel(BUNDLED_MODEL);
  const ps = params(host);
  const out = path.join(dir, "stories-merged.gguf");
  exportMerged(BUNDLED_MODEL, ps, out, { format: "gguf" });
  assert.equal(fs.statSync(out).size, fs.statSync(BUNDLED_MODEL).size, "same layout, same size");
  const reloaded = await Model.load(out, { device: "cpu", threads: 1 });
  const merged = await CpuEngine.create({ config: host.config, weights: mergeParams(host, ps) }, { threads: 1 });
  try {
    // Every canonical weight reads back as merged (the q rows went through permute -> unpermute).
    const back = loadHostModel(out);
    const want = mergeParams(host, ps);
    for (const [name, t] of want) assert.deepEqual(back.weights.get(name)!.data, t.data, name);
    const got = await reloaded.forward(IDS.map((ids) => ({ ids })));
    const ref = await merged.forward(IDS);
    let err = 0;
    ref.logits.forEach((w, b) => { for (let i = 0; i < w.length; i++) err = Math.max(err, Math.abs(got.logits[b]![i]! - w[i]!)); });
    assert.ok(err <= 1e-5, `reloaded gguf logits differ by ${err}`);
    assert.equal(reloaded.tokenizer!.decode(reloaded.tokenizer!.encode("Once upon a time", { addSpecial: false })), "Once upon a time", "the tokenizer is carried over");
  } finally {
    await merged.close();
    reloaded.dispose();
  }
  // A non-GGUF source, or a quantized tensor to merge into, is refused with what to do instead.
  assert.throws(() => exportMerged(qwen3, [], path.join(dir, "q.gguf"), { format: "gguf" }), /is safetensors: use --format safetensors/);
});

test("export errors: existing output without force, unknown weight, a param with no weight, a gguf output that is a folder", () => {
  const host = loadHostModel(BUNDLED_MODEL);
  const out = path.join(dir, "exists");
  fs.mkdirSync(out, { recursive: true });
  assert.throws(() => exportMerged(host, [], out, { format: "safetensors" }), /already exists; pass --force/);
  assert.doesNotThrow(() => exportMerged(host, [], out, { format: "safetensors", force: true }));
  assert.throws(() => exportMerged(host, [{ kind: "delta", name: "blocks.0.attn.x.weight", value: new Float32Array(1) }], path.join(dir, "x1"), { format: "safetensors" }), /unknown weight "blocks\.0\.attn\.x\.weight".*embed\.weight/);
  assert.throws(() => exportMerged(host, [{ kind: "vector", at: "blocks.0.hook_resid_post", value: new Float32Array(host.config.dModel) }], path.join(dir, "x2"), { format: "safetensors" }), /no weight to merge into/);
  assert.throws(() => exportMerged(host, [], out, { format: "gguf", force: true }), /is a folder; --format gguf writes one file/);
});
