// The engine on the WebGPU backend (Dawn; lavapipe in CI): golden logits against the float64
// references, greedy decoding, interventions and weight splitting, each matching the Wasm run.
// Without an adapter this file is skipped locally and fails under CI.
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { before, test } from "node:test";
import { SelfscopeError } from "../src/core/errors.js";
import { Model } from "../src/model/model.js";
import type { Plan } from "../src/hooks/plan.js";
import { initDevice } from "../src/engine/device.js";
import { assertClose, maxAbsDiff } from "./support/compare.js";
import { fixture, repoDir } from "./support/paths.js";

const STORIES = path.join(repoDir(), "models/stories260K/stories260K.gguf");
const GPT2 = fixture("tiny-random-gpt2");

function f32(file: string): Float32Array {
  const b = fs.readFileSync(file);
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}

let skip: string | undefined;
before(async () => {
  try {
    await initDevice("webgpu");
  } catch (e) {
    if (process.env.CI || !(e instanceof SelfscopeError)) throw e;
    skip = `no WebGPU adapter: ${e.message.split(";")[0]}`;
  }
});

const gpu = (name: string, fn: () => Promise<void>) =>
  test(name, async (t) => {
    if (skip) return t.skip(skip);
    await fn();
  });

gpu("stories260K: logits within 1e-4 of the float64 reference and greedy from BOS equals llama2.c's story", async () => {
  const ref = JSON.parse(fs.readFileSync(fixture("stories260K-gguf/reference/logits_16x512.json"), "utf8")) as { input_ids: number[] };
  const want = f32(fixture("stories260K-gguf/reference/logits_16x512.f32"));
  const m = await Model.load(STORIES, { device: "webgpu" });
  assert.equal(m.device.name, "webgpu");
  const { logits } = await m.forward([{ ids: ref.input_ids }]);
  assertClose(logits[0]!, want, { atol: 1e-4, rtol: 0, what: "stories260K logits (webgpu)" });
  const story = JSON.parse(fs.readFileSync(fixture("stories260K-gguf/reference/greedy_from_bos.json"), "utf8")) as { generated_ids: number[] };
  const g = await m.generate([{ ids: [1] }], { maxTokens: 64, stop: [] });
  assert.deepEqual(g.tokens[0], story.generated_ids.slice(0, 64));
  m.dispose();
});

gpu("tiny-random-gpt2: logits within 1e-4 of the float64 reference and onnxruntime-genai's greedy sequences", async () => {
  const ref = JSON.parse(fs.readFileSync(path.join(GPT2, "reference/greedy_and_logits.json"), "utf8")) as { cases: { input_ids: number[]; greedy_max_length_10: number[] }[] };
  const want = f32(path.join(GPT2, "reference/logits_2x4x1000.f32"));
  const m = await Model.load(GPT2, { device: "webgpu" });
  const { logits } = await m.forward(ref.cases.map((c) => ({ ids: c.input_ids })));
  assertClose(logits[0]!, want.subarray(0, 4000), { atol: 1e-4, rtol: 0, what: "gpt2 row 0 (webgpu)" });
  assertClose(logits[1]!, want.subarray(4000), { atol: 1e-4, rtol: 0, what: "gpt2 row 1 (webgpu)" });
  const g = await m.generate(ref.cases.map((c) => ({ ids: c.input_ids })), { maxTokens: 6, stop: [] });
  ref.cases.forEach((c, b) => assert.deepEqual(g.tokens[b], c.greedy_max_length_10.slice(4)));
  m.dispose();
});

gpu("interventions, ragged batches and split weights give the same results on webgpu as on wasm", async () => {
  const vec = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i));
  const dir = Float32Array.from({ length: 64 }, (_, i) => Math.cos(3 * i));
  const plan: Plan = [
    { op: "add", at: "blocks.2.hook_resid_post", vector: vec, scale: 3, pos: { from: 4 }, rows: [0] },
    { op: "project", at: "blocks.1.hook_attn_out", direction: dir, rows: [1] },
    { op: "ablate", at: "blocks.3.attn.hook_z", mode: "zero", heads: [0, 5], pos: "all" },
    { op: "read", at: "blocks.4.hook_resid_post" },
  ];
  const rows = [{ ids: [1, 403, 407, 261, 378, 432, 383, 286] }, { ids: [1, 338, 401, 396] }];
  const run = async (device: "wasm" | "webgpu", maxBindingBytes?: number) => {
    const m = await Model.load(STORIES, { device, ...(maxBindingBytes ? { maxBindingBytes } : {}) });
    const f = await m.forward(rows, { plan });
    const g = await m.generate(rows, { maxTokens: 12, stop: [], plan: plan.filter((p) => p.op !== "read") });
    const read = f.cache.get("blocks.4.hook_resid_post", 1).data;
    m.dispose();
    return { logits: f.logits, tokens: g.tokens, read };
  };
  const cpu = await run("wasm");
  const gpuRun = await run("webgpu");
  const split = await run("webgpu", 16 * 1024); // embedding/unembedding split in 8 row chunks
  for (const r of [gpuRun, split]) {
    for (let b = 0; b < 2; b++) assert.ok(maxAbsDiff(r.logits[b]!, cpu.logits[b]!) <= 1e-4, `row ${b} logits differ by ${maxAbsDiff(r.logits[b]!, cpu.logits[b]!)}`);
    assert.ok(maxAbsDiff(r.read, cpu.read) <= 1e-4);
    assert.deepEqual(r.tokens, cpu.tokens);
  }
});

gpu("f16 weights on WebGPU: half the memory, f32 residual stream; logits track the f32 reference to f16 rounding", async () => {
  const ref = JSON.parse(fs.readFileSync(fixture("stories260K-gguf/reference/logits_16x512.json"), "utf8")) as { input_ids: number[]; argmax: number[] };
  const want = f32(fixture("stories260K-gguf/reference/logits_16x512.f32"));
  const m = await Model.load(STORIES, { device: "webgpu", weights: "f16", maxBindingBytes: 20000 });
  const got = (await m.forward([{ ids: ref.input_ids }])).logits[0]!;
  const d = maxAbsDiff(got, want);
  // f16 keeps 11 significant bits: weights move by ~5e-4 relative, logits (|x| ~ 10) by ~1e-2.
  assert.ok(d > 1e-5 && d < 5e-2, `f16 logits differ from the f32 reference by ${d}`);
  for (let t = 0; t < 16; t++) {
    const row = got.subarray(t * 512, (t + 1) * 512);
    assert.equal(row.indexOf(Math.max(...row)), ref.argmax[t], `argmax at position ${t}`);
  }
  m.dispose();
  await assert.rejects(Model.load(STORIES, { device: "wasm", weights: "f16" }), /f16 weights need the WebGPU backend/);
});
