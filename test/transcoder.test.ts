// Training transcoders: a TopK transcoder trained on the activations of an exactly sparse "MLP"
// (planted features) recovers them; `selfscope train-transcoder` on the organism writes a file that
// loads back and splices in without changing a logit.
import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { trainTopK } from "../src/train/dictionary.js";
import { transcoderCommand } from "../src/recipes/transcoder.js";
import { loadDictionary } from "../src/vectors/dictionary.js";
import { mulberry32 } from "../src/core/rng.js";
import { repoDir } from "./support/paths.js";

test("a TopK transcoder recovers the planted features of an exactly sparse map (cosine ≥ 0.95)", (t) => {
  const r = mulberry32(9);
  const g = () => Math.sqrt(-2 * Math.log(Math.max(r(), 1e-12))) * Math.cos(2 * Math.PI * r());
  const D = 64, F = 32, N = 8192, tau = 1.5;
  const unit = () => { const v = Array.from({ length: D }, g); const n = Math.hypot(...v); return v.map((x) => x / n); };
  const enc = Array.from({ length: F }, unit), dec = Array.from({ length: F }, unit);
  // y = Σ_f ReLU(e_f·x − τ) d_f: about 2 of 32 features active per input.
  const x = new Float32Array(N * D), y = new Float32Array(N * D);
  for (let i = 0; i < N; i++) {
    const xi = Array.from({ length: D }, g);
    x.set(xi, i * D);
    for (let f = 0; f < F; f++) {
      const a = Math.max(0, enc[f]!.reduce((s, e, j) => s + e * xi[j]!, 0) - tau);
      if (a > 0) for (let j = 0; j < D; j++) y[i * D + j] = y[i * D + j]! + a * dec[f]![j]!;
    }
  }
  const res = trainTopK(x, y, N, D, D, { dSae: 64, k: 4, steps: 1000, batch: 256, lr: 0.01, seed: 1, deadAfter: 200, inputSite: "blocks.1.ln2.hook_normalized", outputSite: "blocks.1.hook_mlp_out" });
  const cos = dec.map((d) => {
    let best = -1;
    for (let f = 0; f < 64; f++) best = Math.max(best, d.reduce((s, v, j) => s + v * res.dict.wDec[f * D + j]!, 0));
    return best;
  });
  t.diagnostic(`FVU ${res.fvu.toFixed(4)}, min cosine ${Math.min(...cos).toFixed(3)}`);
  assert.ok(cos.every((c) => c >= 0.95), `planted features matched: ${cos.filter((c) => c >= 0.95).length}/${F}`);
  assert.ok(res.fvu < 0.1, `FVU ${res.fvu}`);
  // Not vacuous: an untrained (0-step) dictionary matches no planted feature that well.
  const none = trainTopK(x, y, N, D, D, { dSae: 64, k: 4, steps: 1, batch: 256, lr: 0, seed: 1, inputSite: "blocks.1.ln2.hook_normalized", outputSite: "blocks.1.hook_mlp_out" });
  assert.ok(dec.filter((d) => { let b = -1; for (let f = 0; f < 64; f++) b = Math.max(b, d.reduce((s, v, j) => s + v * none.dict.wDec[f * D + j]!, 0)); return b >= 0.95; }).length === 0);
});

test("selfscope train-transcoder on the organism: file, FVU, splice with the error node exact", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "transcoder-test-"));
  try {
    const texts = path.join(dir, "t.txt");
    fs.writeFileSync(texts, ["Tell me about frogs", "Tell me about the sea", "Once upon a time there was a dog.", "Lily and Tom went to the park."].join("\n"));
    const model = path.join(repoDir(), "models", "organism", "organism.gguf");
    const r = await transcoderCommand({ model, out: dir, layer: 2, texts, steps: 1000, dSae: 128, k: 16, quiet: true, threads: 1 });
    assert.ok(r.fvu < 0.9, `FVU ${r.fvu}`);
    assert.ok(r.splice_max_abs_dlogit_with_error <= 1e-5, String(r.splice_max_abs_dlogit_with_error));
    assert.ok(r.splice_max_abs_dlogit_without_error > 1e-3, "the reconstruction alone is not exact");
    const d = loadDictionary(path.join(dir, "transcoder.safetensors"), 5, 64);
    assert.equal(d.activation, "topk");
    assert.equal(d.k, 16);
    assert.equal(d.outputSite, "blocks.2.hook_mlp_out");
    assert.throws(() => loadDictionary(path.join(dir, "nope.safetensors"), 5, 64), /nope\.safetensors does not exist/);
    await assert.rejects(transcoderCommand({ model, out: dir, layer: 9, quiet: true }), /--layer 9 is outside 0\.\.4/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
