// Models past one wasm32 memory (issue 16 §3): the cpu engine splits the layers across several
// Wasm memories, each its own runtime, and copies only the residual stream at a boundary. Here the
// per-memory budget is made tiny so small models split into 3+ memories; a split engine must
// compute exactly what the one-memory engine computes (same kernels, same order: bitwise), for
// forward passes with interventions and reads in every segment, batched and padded rows, KV-cached
// decode, tied embeddings (held once, in the head's memory), MoE blocks and Q8_0 matrices.
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { makeFixtures, type AnyFixtureFamily } from "../scripts/make-fixtures.js";
import { CpuEngine, planSegments } from "../src/engine/cpu/engine.js";
import type { HookName } from "../src/hooks/names.js";
import type { Plan } from "../src/hooks/plan.js";
import { GgmlType, ggufMetadataForWrite, readGguf, readGgufTensor, writeGguf } from "../src/io/gguf.js";
import { loadHostModel } from "../src/model/load.js";
import { fixture } from "./support/paths.js";

const PROMPT = [5, 77, 123, 9, 250, 31, 64, 200, 17, 99, 140, 8];
const SHORT = [12, 180, 45];

let dir = "";
const files = new Map<string, string>();

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-seg-"));
  const fams: AnyFixtureFamily[] = ["llama", "mistral", "gemma2", "qwen3moe"];
  for (const p of makeFixtures<AnyFixtureFamily>(dir, fams)) files.set(p.family, p.gguf);
  // stories260K with every 32-aligned matrix in Q8_0 (the rest f32): a mixed native file.
  const g = readGguf(fixture("stories260K-gguf", "stories260K.gguf"));
  const tensors = [...g.tensors.keys()].map((name) => {
    const t = readGgufTensor(g, name);
    const cols = t.shape[t.shape.length - 1]!;
    return { name, shape: t.shape, type: t.shape.length === 2 && cols % 32 === 0 ? GgmlType.Q8_0 : GgmlType.F32, data: t.data } as const;
  });
  const q8 = path.join(dir, "stories260K-q8_0.gguf");
  writeGguf(q8, ggufMetadataForWrite(g), tensors);
  files.set("stories260K-q8_0", q8);
});
after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const equal = (a: Float32Array, b: Float32Array, what: string) => {
  assert.equal(a.length, b.length, `${what}: length`);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i] && !(Number.isNaN(a[i]) && Number.isNaN(b[i]))) assert.fail(`${what}: element ${i} ${a[i]} vs ${b[i]}`);
};

for (const name of ["llama", "mistral", "gemma2", "qwen3moe", "stories260K-q8_0"]) {
  describe(`${name}: split across Wasm memories`, () => {
    let one: CpuEngine;
    let split: CpuEngine;
    before(async () => {
      const file = files.get(name)!;
      const weights = name.endsWith("q8_0") ? "native" : "f32";
      one = await CpuEngine.create(loadHostModel(file, undefined, { lazy: true }), { threads: 1, weights });
      const host = loadHostModel(file, undefined, { lazy: true });
      // A budget of a third of the weights: at least 3 memories.
      const { bytes } = planSegments(host, weights);
      split = await CpuEngine.create(host, { threads: 2, weights, segmentBytes: Math.ceil(bytes / 3.5) });
    });
    after(async () => {
      await one?.close();
      await split?.close();
    });

    test("the plan puts layers in order into at least 3 memories, each within its budget", () => {
      const host = loadHostModel(files.get(name)!, undefined, { lazy: true });
      const weights = name.endsWith("q8_0") ? "native" : "f32";
      const { bytes } = planSegments(host, weights);
      const p = planSegments(host, weights, Math.ceil(bytes / 3.5));
      assert.ok(p.n >= 3 && split.segments === p.n, `${p.n} memories`);
      assert.ok(p.layerSeg[0]! <= 1, "layer 0 in memory 0, or 1 when the embedding fills memory 0");
      for (let l = 1; l < p.layerSeg.length; l++) assert.ok(p.layerSeg[l]! - p.layerSeg[l - 1]! >= 0 && p.layerSeg[l]! - p.layerSeg[l - 1]! <= 1, `layer ${l} in memory ${p.layerSeg[l]}`);
      assert.equal(p.headSeg, p.n - 1);
      // Nothing is held twice: the split holds the one-memory bytes; a tied embedding sits with the head.
      assert.equal(p.bytes, bytes);
      assert.equal(p.embedSeg, host.config.tieEmbeddings ? p.headSeg : 0);
      assert.equal(planSegments(host, weights).n, 1);
      assert.equal(one.segments, 1);
      if (name.endsWith("q8_0")) assert.ok(split.quantizedMats > 0, "the Q8_0 matrices stay quantized in a split engine");
    });

    test("forward with interventions and reads in every memory equals the one-memory engine bitwise, batched and padded", async () => {
      const c = one.config;
      const L = c.nLayers;
      const vec = (seed: number) => Float32Array.from({ length: c.dModel }, (_, i) => Math.sin(seed * 7.1 + i * 0.37) * 0.5);
      const reads: HookName[] = [];
      for (let l = 0; l < L; l++) reads.push(`blocks.${l}.hook_resid_post`, `blocks.${l}.attn.hook_z`);
      reads.push("hook_embed", "ln_final.hook_normalized");
      const plan: Plan = [
        { op: "add", at: "blocks.0.hook_resid_pre", vector: vec(1), pos: { from: 2 } },
        { op: "add", at: `blocks.${L - 1}.hook_resid_mid`, vector: vec(2) },
        { op: "ablate", at: `blocks.${Math.floor(L / 2)}.attn.hook_z`, mode: "zero", heads: [0] },
        ...reads.map((at) => ({ op: "read" as const, at })),
      ];
      const rows = [PROMPT, SHORT];
      const a = await one.forward(rows, { plan });
      const b = await split.forward(rows, { plan });
      a.logits.forEach((x, i) => equal(b.logits[i]!, x, `row ${i} logits`));
      for (const at of reads) equal(b.cache.get(at)!.data, a.cache.get(at)!.data, at);
    });

    test("KV-cached greedy decode (two rows) equals the one-memory engine's", async () => {
      const opts = { maxTokens: 10, stop: [] };
      const plan: Plan = [{ op: "add", at: "blocks.1.hook_resid_post", vector: new Float32Array(one.config.dModel).fill(0.05) }];
      const a = await one.generate([PROMPT, SHORT], { ...opts, plan });
      const b = await split.generate([PROMPT, SHORT], { ...opts, plan });
      assert.deepEqual(b.tokens, a.tokens);
    });

    test("derivatives on a split model are a clear error, and the engine still works after it", async () => {
      await assert.rejects(split.lossAndGrad([PROMPT], { params: [{ kind: "vector", at: "blocks.0.hook_resid_post", value: new Float32Array(one.config.dModel) }], targets: [PROMPT.map((t, i) => (i === 0 ? -1 : t))] }), /split across \d+ Wasm memories/);
      equal((await split.forward([SHORT])).logits[0]!, (await one.forward([SHORT])).logits[0]!, "logits after the refusal");
    });
  });
}

test("a single block larger than one memory's budget is refused with the sizes", () => {
  const host = loadHostModel(fixture("stories260K-gguf", "stories260K.gguf"), undefined, { lazy: true });
  assert.throws(() => planSegments(host, "f32", 4096), /a single block of this model needs more than one Wasm memory/);
});
