// A trained adapter at inference (`--adapter`, loadWithAdapter) and merged (`selfscope merge`): on the
// bundled stories260K, an adapter with LoRA factors (on attn.q, so the GGUF merge must re-permute
// RoPE rows), a weight delta and a vector gives the logits of the weights merged by hand plus the
// vector added by a plan; the merged GGUF from the CLI gives the same logits as the adapter at load;
// inject records the adapter in its header, and resume refuses a changed adapter file.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { BUNDLED_MODEL } from "../src/core/package.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import type { TrainParam } from "../src/engine/grad.js";
import { mergeParams } from "../src/model/export.js";
import { loadHostModel } from "../src/model/load.js";
import { Model } from "../src/model/model.js";
import { loadWithAdapter, writeAdapter } from "../src/train/adapter.js";
import { readRunLog } from "../src/log/read.js";
import { prng } from "./support/prng.js";
import { runCli } from "./support/runlog-checks.js";

const IDS = [[1, 7, 42, 9, 100, 3], [1, 250, 17, 99]];
let dir = "";
before(() => void (dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-adapter-"))));
after(() => void (dir && fs.rmSync(dir, { recursive: true, force: true })));

function rand(n: number, seed: number, scale: number): Float32Array {
  const u = prng(seed);
  return Float32Array.from({ length: n }, () => (u() * 2 - 1) * scale);
}

function weightParams(): TrainParam[] {
  const host = loadHostModel(BUNDLED_MODEL);
  const [qOut, qIn] = host.weights.get("blocks.1.attn.q.weight")!.shape as [number, number];
  const D = host.config.dModel;
  return [
    { kind: "lora", layer: 1, linear: "attn.q", rank: 3, scale: 0.7, a: rand(3 * qIn, 11, 0.3), b: rand(qOut * 3, 12, 0.3) },
    { kind: "delta", name: "lnFinal.weight", value: rand(D, 13, 0.1) },
  ];
}

function maxDiff(a: Float32Array[], b: Float32Array[]): number {
  let e = 0;
  a.forEach((x, r) => { for (let i = 0; i < x.length; i++) e = Math.max(e, Math.abs(x[i]! - b[r]![i]!)); });
  return e;
}

test("--adapter at load = the weights merged by hand + the vector as a plan; its hash differs from the base's", async () => {
  const host = loadHostModel(BUNDLED_MODEL);
  const vec = rand(host.config.dModel, 14, 0.5);
  const file = path.join(dir, "adapter.safetensors");
  writeAdapter(file, [...weightParams(), { kind: "vector", at: "blocks.2.hook_resid_post", value: vec }], { test: true });
  const { model, adapter } = await loadWithAdapter(BUNDLED_MODEL, file, { threads: 1 });
  const merged = await CpuEngine.create({ config: host.config, weights: mergeParams(host, weightParams()) }, { threads: 1 });
  const base = await Model.load(BUNDLED_MODEL, { threads: 1 });
  try {
    const got = await model.forward(IDS.map((ids) => ({ ids })));
    const want = await merged.forward(IDS, { plan: [{ op: "add", at: "blocks.2.hook_resid_post", vector: vec, scale: 1 }] });
    const plain = await base.forward(IDS.map((ids) => ({ ids })));
    assert.ok(maxDiff(got.logits, want.logits) <= 1e-5, `adapter logits differ from the hand merge by ${maxDiff(got.logits, want.logits)}`);
    assert.ok(maxDiff(got.logits, plain.logits) > 1e-2, "the adapter changes the logits");
    assert.match(adapter!.sha256, /^[0-9a-f]{64}$/);
    assert.notEqual(model.weightsHash(), base.weightsHash());
  } finally {
    model.dispose();
    base.dispose();
    await merged.close();
  }
});

test("selfscope merge --format gguf: the merged file gives the adapter's logits; vector params are refused; bad files are named", async () => {
  const file = path.join(dir, "lora.safetensors");
  writeAdapter(file, weightParams(), { test: true });
  const out = path.join(dir, "merged.gguf");
  const r = await runCli(["merge", "--model", BUNDLED_MODEL, "--adapter", file, "--out", out]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /wrote .*merged\.gguf/);
  const a = await loadWithAdapter(BUNDLED_MODEL, file, { threads: 1 });
  const m = await Model.load(out, { threads: 1 });
  try {
    const x = await a.model.forward(IDS.map((ids) => ({ ids })));
    const y = await m.forward(IDS.map((ids) => ({ ids })));
    assert.ok(maxDiff(x.logits, y.logits) <= 1e-5, `merged gguf vs adapter at load: ${maxDiff(x.logits, y.logits)}`);
  } finally {
    a.model.dispose();
    m.dispose();
  }
  const again = await runCli(["merge", "--model", BUNDLED_MODEL, "--adapter", file, "--out", out]);
  assert.notEqual(again.code, 0);
  assert.match(again.stderr, /already exists; pass --force/);
  const vfile = path.join(dir, "vector.safetensors");
  writeAdapter(vfile, [{ kind: "vector", at: "blocks.2.hook_resid_post", value: new Float32Array(64) }], {});
  const v = await runCli(["merge", "--model", BUNDLED_MODEL, "--adapter", vfile, "--out", path.join(dir, "v.gguf")]);
  assert.notEqual(v.code, 0);
  assert.match(v.stderr, /vector params act on activations.*--adapter at inference/);
  await assert.rejects(loadWithAdapter(BUNDLED_MODEL, path.join(dir, "missing.safetensors")), /--adapter .*missing\.safetensors: no such file/);
  const wrong = path.join(dir, "wrong.safetensors");
  writeAdapter(wrong, [{ kind: "lora", layer: 0, linear: "attn.q", rank: 2, scale: 1, a: new Float32Array(2 * 5), b: new Float32Array(64 * 2) }], {});
  await assert.rejects(loadWithAdapter(BUNDLED_MODEL, wrong), /--adapter .*wrong\.safetensors: .*do not match rank 2.*another model/);
});

test("inject --adapter records the adapter in the header; resume refuses a changed adapter file", { timeout: 300_000 }, async () => {
  const file = path.join(dir, "run-adapter.safetensors");
  writeAdapter(file, weightParams(), { test: true });
  const out = path.join(dir, "run");
  const args = ["inject", "--model", BUNDLED_MODEL, "--adapter", file, "--layers", "1", "--strengths", "2", "--concepts", "1", "--trials", "1", "--controls", "1", "--max-tokens", "4", "--judge", "rule", "--no-vector-cache", "--out", out, "--quiet"];
  const r = await runCli(args);
  assert.equal(r.code, 0, r.stderr);
  const h = readRunLog(out).header;
  assert.equal(h.model.adapter?.path, path.resolve(file));
  const base = await Model.load(BUNDLED_MODEL, { threads: 1 });
  try {
    assert.notEqual(h.model.hash, base.weightsHash(), "the header's hash is the adapted model's");
  } finally {
    base.dispose();
  }
  const ok = await runCli(["resume", out, "--quiet"]);
  assert.equal(ok.code, 0, ok.stderr);
  writeAdapter(file, weightParams().map((p) => (p.kind === "delta" ? { ...p, value: p.value.map((x) => x * 2) } : p)), { test: true });
  const bad = await runCli(["resume", out, "--quiet"]);
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /used the adapter .*run-adapter\.safetensors.*a different file now; restore it/);
});
