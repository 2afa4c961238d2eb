// The CLI contract other tools rely on (issue 2 §8), and sampling: seeded, reproducible, and
// faithful to temperature / top-k / top-p.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { Sampler, argmax } from "../src/engine/jax/engine.js";
import { Model } from "../src/model/model.js";
import { fixture, repoDir } from "./support/paths.js";

const CLI = path.join(repoDir(), "dist/src/cli/main.js");
const STORIES = path.join(repoDir(), "models/stories260K/stories260K.gguf");
const story = JSON.parse(fs.readFileSync(fixture("stories260K-gguf/reference/greedy_from_bos.json"), "utf8")) as { generated_ids: number[]; generated_text: string };

function cli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  return spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8" });
}

test("generate with no prompt starts from BOS: the llama2.c story, as text and as --json", () => {
  const r = cli("generate", "--model", STORIES, "--max-tokens", "40", "--temperature", "0", "--json");
  assert.equal(r.status, 0, r.stderr);
  const lines = r.stdout.trim().split("\n");
  assert.equal(lines.length, 1, "--json prints one line");
  const j = JSON.parse(lines[0]!) as { ids: number[]; text: string };
  assert.deepEqual(Object.keys(j).sort(), ["ids", "sampler", "text"]);
  assert.deepEqual(j.ids, story.generated_ids.slice(0, 40));
  assert.ok(story.generated_text.startsWith(j.text), j.text);
  const plain = cli("generate", "--model", STORIES, "--max-tokens", "40");
  assert.equal(plain.stdout, j.text + "\n", "without --json: the continuation text only");
});

test("generate --ids continues given ids; --prompt adds BOS per the tokenizer; sampling is seeded", () => {
  const ids = [1, ...story.generated_ids.slice(0, 9)];
  const r = cli("generate", "--model", STORIES, "--ids", ids.join(","), "--max-tokens", "12", "--json");
  assert.deepEqual((JSON.parse(r.stdout) as { ids: number[] }).ids, story.generated_ids.slice(9, 21));
  const p = cli("generate", "--model", STORIES, "--prompt", "Once upon a time", "--max-tokens", "8", "--json");
  assert.deepEqual((JSON.parse(p.stdout) as { ids: number[] }).ids, story.generated_ids.slice(4, 12)); // "Once upon a time" = the story's first 4 tokens
  const s1 = cli("generate", "--model", STORIES, "--max-tokens", "24", "--temperature", "1", "--seed", "5", "--json");
  const s2 = cli("generate", "--model", STORIES, "--max-tokens", "24", "--temperature", "1", "--seed", "5", "--json");
  const s3 = cli("generate", "--model", STORIES, "--max-tokens", "24", "--temperature", "1", "--seed", "6", "--json");
  assert.equal(s1.stdout, s2.stdout);
  assert.notEqual(s1.stdout, s3.stdout);
});

test("logits --out writes float32 LE [positions][vocab] equal to the engine's", async () => {
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-cli-")), "l.f32");
  const ids = [1, 403, 407, 261, 378];
  const r = cli("logits", "--model", STORIES, "--ids", ids.join(","), "--out", out);
  assert.equal(r.status, 0, r.stderr);
  const b = fs.readFileSync(out);
  assert.equal(b.length, ids.length * 512 * 4);
  const got = new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
  const m = await Model.load(STORIES);
  const want = (await m.forward([{ ids }])).logits[0]!;
  assert.deepEqual([...got], [...want]);
  m.dispose();
});

test("info names family, dims, dtype, tokenizer and chat template", () => {
  const a = cli("info", "--model", STORIES).stdout;
  assert.match(a, /family\s+llama/);
  assert.match(a, /dModel 64, nLayers 5, nHeads 8, nKvHeads 4, dHead 8, dMlp 172, dVocab 512/);
  assert.match(a, /dtype\s+F32/);
  assert.match(a, /tokenizer\s+gguf-spm \(512 tokens/);
  assert.match(a, /chat template\s+absent/);
  const g = cli("info", "--model", fixture("tiny-random-gpt2")).stdout;
  assert.match(g, /family\s+gpt2/);
  assert.match(g, /tokenizer\s+tokenizer\.json/);
  assert.equal(cli("frobnicate").status, 2);
  assert.equal(cli("generate", "--model", STORIES, "--max-tokens", "2", "--device", "tpu").status, 1);
});

test("info reads headers only: a file whose tensor data is all NaN is described, though it cannot be loaded", async () => {
  const { readGguf } = await import("../src/io/gguf.js");
  const bytes = fs.readFileSync(STORIES);
  const start = Math.min(...[...readGguf(STORIES).tensors.values()].map((t) => t.offset));
  bytes.fill(0xff, start); // every f32 of every tensor becomes NaN
  const bad = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-info-")), "nan.gguf");
  fs.writeFileSync(bad, bytes);
  const r = cli("info", "--model", bad);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /dModel 64, nLayers 5/);
  assert.match(r.stdout, /parameters\s+292\.8K/);
  assert.match(r.stdout, /memory\s+cpu 1\.1 MiB as f32 \(fits one wasm32 memory\)/);
  const run = cli("generate", "--model", bad, "--max-tokens", "1");
  assert.equal(run.status, 1, "a load reads the tensors and refuses NaN");
  assert.match(run.stderr, /NaN|non-finite/i);
});

test("sampler: greedy, top-k 1 and tiny top-p are argmax; temperature sampling matches softmax frequencies", () => {
  const logits = Float32Array.from([1, 3, 2, 0.5, 2.9]);
  assert.equal(argmax(logits), 1);
  assert.equal(new Sampler({}, 1).sample(logits), 1);
  assert.equal(new Sampler({ temperature: 1, topK: 1 }, 1).sample(logits), 1);
  assert.equal(new Sampler({ temperature: 1, topP: 0.01 }, 1).sample(logits), 1);
  // top-k 2 only ever yields the two best; top-p 0.6 keeps the smallest prefix reaching 0.6.
  const sk = new Sampler({ temperature: 1, topK: 2 }, 3);
  for (let i = 0; i < 200; i++) assert.ok([1, 4].includes(sk.sample(logits)));
  const T = 0.7;
  const n = 20000;
  const s = new Sampler({ temperature: T }, 11);
  const counts = new Array<number>(5).fill(0);
  for (let i = 0; i < n; i++) counts[s.sample(logits)]!++;
  const z = [...logits].reduce((a, l) => a + Math.exp(l / T), 0);
  let chi2 = 0;
  [...logits].forEach((l, i) => {
    const e = (n * Math.exp(l / T)) / z;
    chi2 += (counts[i]! - e) ** 2 / e;
  });
  assert.ok(chi2 < 18.5, `chi-square ${chi2.toFixed(2)} with 4 d.o.f. (p < 0.001 cutoff 18.47)`);
  // Same seed, same draws; the draws do not depend on other rows (one generator per row).
  const a = new Sampler({ temperature: 1 }, 42);
  const b = new Sampler({ temperature: 1 }, 42);
  for (let i = 0; i < 50; i++) assert.equal(a.sample(logits), b.sample(logits));
});

test("stop tokens from the model's config end a row; other rows continue", async () => {
  const m = await Model.load(STORIES);
  assert.deepEqual(m.stopTokens(), [2]);
  const r = await m.generate([{ ids: [1] }, { ids: [1, 403] }], { maxTokens: 300, stop: [story.generated_ids[5]!] });
  assert.equal(r.stopReason[0], "stop");
  assert.deepEqual(r.tokens[0], story.generated_ids.slice(0, 6));
  m.dispose();
});
