// Sampling as the paper ran it (issue 12 §2, §7): the effective sampler is resolved as Hugging Face
// `generate` resolves it from the checkpoint's generation_config.json (or a GGUF's general.sampling.*
// keys) under explicit flags, recorded in the run log and report, kept on resume; and the O(V)
// sampler draws exactly what a full-sort reference draws.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { Rng } from "../src/core/rng.js";
import { buildConfig } from "../src/eval/inject.js";
import { effectiveSampler, recordedSampler } from "../src/eval/run.js";
import { GgmlType, GgufValueType, readGguf, readGgufTensor, writeGguf, type GgufValue, type GgufWriteValue } from "../src/io/gguf.js";
import { readRunLog } from "../src/log/read.js";
import type { RunHeader } from "../src/log/schema.js";
import { Sampler } from "../src/engine/decode.js";
import { type SampleOptions } from "../src/engine/types.js";
import { Model } from "../src/model/model.js";
import { readSamplingDefaults, resolveSampler, sampleOptions, type SamplerRequest, type SamplingDefaults } from "../src/model/sampling.js";
import { fixture, repoDir } from "./support/paths.js";
import { prng } from "./support/prng.js";

const CLI = path.join(repoDir(), "dist/src/cli/main.js");
const STORIES = path.join(repoDir(), "models/stories260K/stories260K.gguf");
const GPT2 = fixture("tiny-random-gpt2");

function cli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  return spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8" });
}

interface GenJson {
  ids: number[];
  sampler: { doSample: boolean; temperature: number; topK: number; topP: number; minP: number; sources: Record<string, string> };
}
function gen(model: string, ...args: string[]): GenJson {
  const r = cli("generate", "--model", model, "--prompt", "Once upon a time", "--max-tokens", "16", "--json", ...args);
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout) as GenJson;
}

/** A copy of the tiny-random-gpt2 fixture (its files, not its reference folder) with this generation_config.json. */
function gpt2With(genConfig: Record<string, unknown>): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-sampling-"));
  for (const f of fs.readdirSync(GPT2)) if (fs.statSync(path.join(GPT2, f)).isFile()) fs.copyFileSync(path.join(GPT2, f), path.join(dir, f));
  fs.writeFileSync(path.join(dir, "generation_config.json"), JSON.stringify({ eos_token_id: 98, ...genConfig }));
  return dir;
}

// ---------------------------------------------------------------- the sampler against a full-sort reference

/**
 * The straightforward sampler: sort the whole vocabulary (logit descending, index ascending), keep
 * the top k, softmax at temperature T, keep the shortest prefix reaching top-p and the tokens with
 * p >= min-p x p(best), renormalise, invert the CDF with the same generator. HF's repetition penalty first.
 */
function referenceSample(logitsIn: Float32Array, o: SampleOptions, rng: Rng, context: number[] = []): number {
  const logits = Float32Array.from(logitsIn);
  const pen = o.repetitionPenalty ?? 1;
  for (const t of new Set(context)) logits[t] = logitsIn[t]! < 0 ? logitsIn[t]! * pen : logitsIn[t]! / pen;
  const T = o.temperature ?? 0;
  let idx = [...Array(logits.length).keys()].sort((a, b) => (logits[a]! > logits[b]! ? -1 : logits[a]! < logits[b]! ? 1 : a - b));
  if (T <= 0) return idx[0]!;
  if (o.topK && o.topK > 0) idx = idx.slice(0, o.topK);
  const mx = logits[idx[0]!]!;
  let p = idx.map((i) => Math.exp((logits[i]! - mx) / T));
  const z = p.reduce((a, b) => a + b, 0);
  p = p.map((x) => x / z);
  const topP = o.topP ?? 1, minP = o.minP ?? 0;
  if (topP < 1 || minP > 0) {
    let keep = 0, cum = 0;
    while (keep < p.length && cum < topP && p[keep]! >= minP * p[0]!) cum += p[keep++]!;
    keep = Math.max(1, keep);
    idx = idx.slice(0, keep);
    p = p.slice(0, keep);
    const z2 = p.reduce((a, b) => a + b, 0);
    p = p.map((x) => x / z2);
  }
  let u = rng.next();
  for (let i = 0; i < p.length; i++) {
    u -= p[i]!;
    if (u < 0) return idx[i]!;
  }
  return idx[p.length - 1]!;
}

test("sampler: same seed, same tokens as the full-sort reference (ties, top-k, top-p, min-p, repetition penalty, deep ranks)", () => {
  const rnd = prng(12);
  const normal = () => Math.sqrt(-2 * Math.log(1 - rnd())) * Math.cos(2 * Math.PI * rnd());
  let cases = 0, distinct = 0;
  for (const V of [5, 97, 3000]) {
    for (const shape of ["normal", "ties", "flat", "peaked"] as const) {
      const logits = Float32Array.from({ length: V }, () => {
        const g = normal();
        // "ties": a handful of values, so ranks are decided by index; "flat": deep ranks get sampled.
        return shape === "ties" ? Math.round(g * 2) / 2 : shape === "flat" ? g * 0.05 : shape === "peaked" ? g * 6 : g;
      });
      for (const o of [
        { temperature: 1 },
        { temperature: 0.4, topK: 1 },
        { temperature: 1, topK: 7 },
        { temperature: 2.5, topK: 50 },
        { temperature: 1, topK: V - 1 },
        { temperature: 1, topK: V + 5 },
        { temperature: 1, topP: 0.9 },
        { temperature: 0.7, topP: 0.5, topK: 64 },
        { temperature: 1, topP: 0.01 },
        { temperature: 1, topP: 0 },
        { temperature: 1, minP: 0.05 },
        { temperature: 1.3, topK: 64, topP: 0.95, minP: 0.3 },
        { temperature: 1, topK: 40, repetitionPenalty: 1.3 },
        { temperature: 0, repetitionPenalty: 2 },
      ] as SampleOptions[]) {
        const context = o.repetitionPenalty ? Array.from({ length: 12 }, () => Math.floor(rnd() * V)) : undefined;
        const seed = cases++;
        const ours = new Sampler(o, seed);
        const ref = new Rng(seed);
        const seen = new Set<number>();
        for (let i = 0; i < 60; i++) {
          const want = referenceSample(logits, o, ref, context);
          const got = ours.sample(logits, context);
          assert.equal(got, want, `V ${V}, ${shape}, ${JSON.stringify(o)}, draw ${i}`);
          seen.add(got);
        }
        distinct += seen.size;
      }
    }
  }
  // The draws did explore: many different tokens came out across the cases.
  assert.ok(distinct > 1500, `only ${distinct} distinct draws`);
});

test("sampler: never sorts the whole vocabulary (a 262k-token row sorts only the candidates it needs)", () => {
  const V = 262_144;
  const rnd = prng(5);
  const logits = Float32Array.from({ length: V }, () => 8 * Math.sqrt(-2 * Math.log(1 - rnd())) * Math.cos(2 * Math.PI * rnd()));
  const sizes: number[] = [];
  const i32 = Int32Array.prototype.sort;
  const arr = Array.prototype.sort;
  Int32Array.prototype.sort = function (this: Int32Array, cmp?: (a: number, b: number) => number) {
    sizes.push(this.length);
    return i32.call(this, cmp);
  };
  Array.prototype.sort = function <T>(this: T[], cmp?: (a: T, b: T) => number) {
    sizes.push(this.length);
    return arr.call(this, cmp) as T[];
  };
  try {
    const draws = (o: SampleOptions) => {
      sizes.length = 0;
      const s = new Sampler(o, 3);
      for (let i = 0; i < 5; i++) s.sample(logits);
      return Math.max(0, ...sizes);
    };
    assert.ok(draws({ temperature: 1, topK: 64, topP: 0.95 }) <= 64);
    assert.ok(draws({ temperature: 1, topP: 0.95 }) < V / 16);
    assert.ok(draws({ temperature: 1, topK: 0 }) < V / 16);
  } finally {
    Int32Array.prototype.sort = i32;
    Array.prototype.sort = arr;
  }
});

// ---------------------------------------------------------------- resolution (HF semantics)

test("resolution: HF generate given only a temperature, over a Gemma-3-style generation_config", () => {
  const gemma: SamplingDefaults = { kind: "generation_config.json", file: "g.json", doSample: true, topK: 64, topP: 0.95, unsupported: [] };
  const t1 = resolveSampler(gemma, { temperature: 1 });
  assert.deepEqual([t1.doSample, t1.temperature, t1.topK, t1.topP, t1.minP], [true, 1, 64, 0.95, 0]);
  assert.deepEqual(t1.sources, { doSample: "flag", temperature: "flag", topK: "generation_config.json", topP: "generation_config.json", minP: "default", repetitionPenalty: "default" });
  // selfscope's T = 0 is greedy although the file says do_sample (HF would raise; the paper's code passed nothing).
  const t0 = resolveSampler(gemma, { temperature: 0 });
  assert.equal(t0.doSample, false);
  assert.equal(t0.sources.doSample, "flag");
  // "model" (or nothing): the file decides, at transformers' default temperature 1: the paper's "temperature 0" runs.
  for (const req of [{ temperature: "model" as const }, {}]) {
    const m = resolveSampler(gemma, req);
    assert.deepEqual([m.doSample, m.temperature, m.topK, m.topP], [true, 1, 64, 0.95]);
    assert.deepEqual([m.sources.doSample, m.sources.temperature], ["generation_config.json", "default"]);
  }
  // Flags override the file; --greedy forces argmax.
  const f = resolveSampler(gemma, { temperature: 0.7, topK: 0, topP: 1, minP: 0.1 });
  assert.deepEqual([f.topK, f.topP, f.minP, f.sources.topK, f.sources.topP, f.sources.minP], [0, 1, 0.1, "flag", "flag", "flag"]);
  assert.equal(resolveSampler(gemma, { greedy: true }).doSample, false);
  assert.throws(() => resolveSampler(gemma, { greedy: true, temperature: 1 }), /--greedy and --temperature 1 contradict/);
  // No file: transformers' defaults, top-k 50 included.
  const none = resolveSampler({ kind: null, file: null, unsupported: [] }, { temperature: 1 });
  assert.deepEqual([none.topK, none.topP, none.sources.topK], [50, 1, "default"]);
  assert.equal(resolveSampler({ kind: null, file: null, unsupported: [] }, {}).doSample, false, "HF's do_sample default is false");
  assert.throws(() => resolveSampler({ kind: "generation_config.json", file: "g.json", doSample: true, temperature: 0, unsupported: [] }, {}), /g\.json: do_sample with temperature 0/);
});

test("resolution: generation_config.json keys, nulls, bad values and unimplemented keys", () => {
  const dir = gpt2With({ do_sample: true, temperature: 0.6, top_k: null, top_p: 0.9, min_p: 0.02, repetition_penalty: 1.05, typical_p: 0.8 });
  const files = { path: dir, format: "safetensors" as const, weights: path.join(dir, "model.safetensors"), generationConfig: path.join(dir, "generation_config.json") };
  const d = readSamplingDefaults(files);
  assert.deepEqual(
    { doSample: d.doSample, temperature: d.temperature, topK: d.topK, topP: d.topP, minP: d.minP, rep: d.repetitionPenalty, unsupported: d.unsupported },
    { doSample: true, temperature: 0.6, topK: 0, topP: 0.9, minP: 0.02, rep: 1.05, unsupported: ["typical_p=0.8"] },
  );
  fs.writeFileSync(files.generationConfig, JSON.stringify({ top_k: -3 }));
  assert.throws(() => readSamplingDefaults(files), (e: Error) => e.message.includes("generation_config.json") && /top_k = -3 is not an integer >= 0/.test(e.message));
});

interface HfRow {
  config: string;
  call: string;
  generation_config: Record<string, unknown>;
  generate_kwargs: Record<string, unknown>;
  do_sample?: boolean;
  config_temperature?: number;
  processors?: { name: string; temperature?: number; top_k?: number; top_p?: number; min_p?: number }[];
  behaviour?: { finite_scores: number; argmax_token: number };
  error?: string;
}

test("resolution and support match transformers' generate on the same generation_config (test/fixtures/hf-reference)", async () => {
  const table = JSON.parse(fs.readFileSync(path.join(repoDir(), "test/fixtures/hf-reference/hf-generate-config.json"), "utf8")) as { rows: HfRow[] };
  const m = await Model.load(GPT2);
  try {
    // HF's rows are for the prompt ids 1 2 3; its scores after the processors are what a draw can return.
    const logits = (await m.forward([{ ids: [1, 2, 3] }], { logits: "last" })).logits[0]!;
    let checked = 0;
    for (const row of table.rows) {
      const what = `${row.config} / ${row.call}`;
      const kw = row.generate_kwargs;
      // The calls selfscope makes: the paper's (do_sample=True, temperature=T), none ("model"), greedy.
      const request: SamplerRequest | null =
        kw.do_sample === true && typeof kw.temperature === "number" ? { temperature: kw.temperature }
        : Object.keys(kw).length === 0 ? { temperature: "model" }
        : kw.do_sample === false && kw.temperature === undefined ? { greedy: true }
        : kw.temperature === 0 ? { temperature: 0 }
        : null; // temperature without do_sample: not a call selfscope makes (a temperature > 0 always samples)
      if (!request) continue;
      const d: SamplingDefaults = { kind: "generation_config.json", file: "generation_config.json", unsupported: [] };
      const g = row.generation_config;
      if (typeof g.do_sample === "boolean") d.doSample = g.do_sample;
      if (typeof g.temperature === "number") d.temperature = g.temperature;
      if (typeof g.top_k === "number") d.topK = g.top_k;
      if (typeof g.top_p === "number") d.topP = g.top_p;
      const s = resolveSampler(d, request);
      if (row.error) {
        // HF refuses temperature 0 with the file's do_sample; selfscope's decision: greedy.
        assert.match(row.error, /temperature` \(=0\.0\) has to be a strictly positive float/, what);
        assert.equal(s.doSample, false, what);
        checked++;
        continue;
      }
      assert.equal(s.doSample, row.do_sample, what);
      const support = new Sampler(sampleOptions(s), 0).support(logits);
      assert.equal(support[0], row.behaviour!.argmax_token, `${what}: same model, same best token`);
      if (!s.doSample) {
        assert.equal(support.length, 1, what);
        checked++;
        continue;
      }
      const proc = (name: string) => row.processors!.find((p) => p.name === name);
      assert.equal(s.temperature, row.config_temperature, what);
      assert.equal(s.temperature !== 1, proc("TemperatureLogitsWarper") !== undefined, what);
      assert.equal(s.topK, proc("TopKLogitsWarper")?.top_k ?? 0, what);
      assert.equal(s.topP, proc("TopPLogitsWarper")?.top_p ?? 1, what);
      assert.equal(s.minP, proc("MinPLogitsWarper")?.min_p ?? 0, what);
      assert.equal(support.length, row.behaviour!.finite_scores, `${what}: the tokens left after HF's processors`);
      checked++;
    }
    assert.equal(checked, 24, "every row but the four temperature-only calls");
  } finally {
    m.dispose();
  }
});

// ---------------------------------------------------------------- the CLI on a checkpoint with a generation_config

test("generate: a generation_config.json with top_k 1 makes --temperature 1 equal greedy; flags override it", () => {
  const k1 = gpt2With({ top_k: 1 });
  const plain = gpt2With({});
  const greedy = gen(k1, "--temperature", "0").ids;
  assert.ok(greedy.length > 0);
  assert.deepEqual(gen(plain, "--temperature", "0").ids, greedy);
  let differed = 0;
  for (const seed of ["1", "2"]) {
    const s = gen(k1, "--temperature", "1", "--seed", seed);
    assert.deepEqual(s.ids, greedy, `seed ${seed}`);
    assert.deepEqual([s.sampler.doSample, s.sampler.topK, s.sampler.sources.topK, s.sampler.sources.temperature], [true, 1, "generation_config.json", "flag"]);
    // Without the file's top_k (transformers' default 50) and with --top-k 0 overriding it, T = 1 samples.
    if (gen(plain, "--temperature", "1", "--seed", seed).ids.join() !== greedy.join()) differed++;
    const o = gen(k1, "--temperature", "1", "--seed", seed, "--top-k", "0");
    assert.deepEqual([o.sampler.topK, o.sampler.sources.topK], [0, "flag"]);
    if (o.ids.join() !== greedy.join()) differed++;
  }
  assert.equal(differed, 4, "temperature 1 without top-k 1 is not greedy on this model");
  // --temperature model: the file's do_sample and transformers' default temperature, as the paper's code at T = 0.
  const m = gen(gpt2With({ do_sample: true, top_k: 1 }), "--temperature", "model", "--seed", "4");
  assert.deepEqual(m.ids, greedy);
  assert.deepEqual([m.sampler.doSample, m.sampler.sources.doSample, m.sampler.temperature, m.sampler.sources.temperature], [true, "generation_config.json", 1, "default"]);
  const g = gen(gpt2With({ do_sample: true, top_k: 64, top_p: 0.95 }), "--greedy", "--seed", "4");
  assert.deepEqual([g.ids, g.sampler.doSample, g.sampler.sources.doSample], [greedy, false, "flag"]);
});

/** stories260K rewritten with extra general.sampling.* keys (every tensor and key kept). */
function storiesWith(extra: Record<string, GgufWriteValue>): string {
  const g = readGguf(STORIES);
  const typed = (v: GgufValue): GgufWriteValue => {
    if (typeof v === "string") return { type: GgufValueType.STRING, value: v };
    if (typeof v === "boolean") return { type: GgufValueType.BOOL, value: v };
    if (typeof v === "number") return { type: Number.isInteger(v) ? GgufValueType.UINT32 : GgufValueType.FLOAT32, value: v };
    if (Array.isArray(v)) {
      const items = v as (string | number)[];
      const itemType = items.every((x) => typeof x === "string") ? GgufValueType.STRING : items.every((x) => Number.isInteger(x)) ? GgufValueType.INT32 : GgufValueType.FLOAT32;
      return { type: GgufValueType.ARRAY, itemType, value: items };
    }
    throw new Error(`unexpected metadata value ${String(v)}`);
  };
  const meta: Record<string, GgufWriteValue> = {};
  for (const [k, v] of g.metadata) if (k !== "general.alignment") meta[k] = typed(v);
  Object.assign(meta, extra);
  const tensors = [...g.tensors.keys()].map((name) => {
    const t = g.tensors.get(name)!;
    assert.equal(t.type, GgmlType.F32);
    const { data, shape } = readGgufTensor(g, name);
    return { name, shape, type: GgmlType.F32 as const, data };
  });
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-sampling-")), "stories-sampling.gguf");
  writeGguf(file, meta, tensors);
  return file;
}

test("GGUF general.sampling.* keys are read, applied under the flags and recorded with source gguf", async () => {
  const f32 = (value: number): GgufWriteValue => ({ type: GgufValueType.FLOAT32, value });
  const file = storiesWith({
    "general.sampling.top_k": { type: GgufValueType.INT32, value: 1 },
    "general.sampling.top_p": f32(0.95),
    "general.sampling.min_p": f32(0.05),
    "general.sampling.temp": f32(0.8),
    "general.sampling.mirostat": { type: GgufValueType.INT32, value: 2 },
  });
  const m = await Model.load(file);
  try {
    const d = m.sampler({});
    assert.deepEqual([d.doSample, d.temperature, d.topK, d.topP, d.minP], [true, 0.8, 1, 0.95, 0.05]);
    assert.deepEqual(Object.values(d.sources), ["gguf", "gguf", "gguf", "gguf", "gguf", "default"]);
    assert.deepEqual(d.unsupported, ["general.sampling.mirostat=2"]);
  } finally {
    m.dispose();
  }
  const greedy = gen(STORIES, "--temperature", "0").ids;
  const s = gen(file, "--temperature", "1", "--seed", "9");
  assert.deepEqual(s.ids, greedy, "the file's top_k 1 applies");
  assert.deepEqual([s.sampler.temperature, s.sampler.sources.temperature, s.sampler.sources.topK], [1, "flag", "gguf"]);
  assert.notDeepEqual(gen(file, "--temperature", "1", "--seed", "9", "--top-k", "0", "--min-p", "0").ids, greedy);
});

// ---------------------------------------------------------------- run logs, report, resume

test("inject: the header records the effective sampler and its sources, the report shows it, resume refuses a changed one", () => {
  const dir = gpt2With({ do_sample: true, top_k: 1, top_p: 0.9 });
  const run = path.join(dir, "run");
  const sweep = ["--model", dir, "--layers", "2", "--strengths", "4", "--concepts", "2", "--trials", "1", "--controls", "1", "--judge", "rule", "--max-tokens", "4", "--seed", "3", "--quiet", "--vector-cache", path.join(dir, "vectors")];
  const r = cli("inject", ...sweep, "--out", run);
  assert.equal(r.status, 0, r.stderr);
  const h = readRunLog(run).header;
  assert.equal(h.version, 2);
  assert.deepEqual(
    { ...h.sampler!, defaultsFile: path.basename(h.sampler!.defaultsFile!) },
    {
      doSample: true, temperature: 1, topK: 1, topP: 0.9, minP: 0, repetitionPenalty: 1,
      sources: { doSample: "preset", temperature: "preset", topK: "generation_config.json", topP: "generation_config.json", minP: "default", repetitionPenalty: "default" },
      defaultsFile: "generation_config.json",
      unsupported: [],
    },
  );
  const html = fs.readFileSync(path.join(run, "report.html"), "utf8");
  assert.ok(html.includes("sampled: temperature 1 (preset), top-k 1 (generation_config.json), top-p 0.9 (generation_config.json)"), "the report names the sampler");
  assert.equal(cli("resume", run, "--quiet", "--vector-cache", path.join(dir, "vectors")).status, 0, "same sampler: resume proceeds");
  fs.writeFileSync(path.join(dir, "generation_config.json"), JSON.stringify({ eos_token_id: 98, do_sample: true, top_k: 5, top_p: 0.9 }));
  const bad = cli("resume", run, "--quiet", "--vector-cache", path.join(dir, "vectors"));
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /recorded a different sampler than the model now gives \(topK 1 → 5;/);
});

test("inject flags override the checkpoint's config; a version-1 run keeps the sampler it ran with", async () => {
  const dir = gpt2With({ do_sample: true, top_k: 1, top_p: 0.9 });
  const m = await Model.load(dir);
  try {
    const cfg = buildConfig({ model: dir, topK: 3, topP: 1, temperature: 0.5, judges: ["rule"] }, m.config.nLayers);
    const s = effectiveSampler(m, cfg);
    assert.deepEqual([s.temperature, s.topK, s.topP, s.sources.temperature, s.sources.topK, s.sources.topP], [0.5, 3, 1, "flag", "flag", "flag"]);
    assert.equal(effectiveSampler(m, buildConfig({ model: dir, greedy: true, judges: ["rule"] }, m.config.nLayers)).doSample, false);
    // A version-1 header has no sampler: it ran with config.generation alone (no top-k from the file).
    const v1 = { version: 1, config: { ...cfg, generation: { maxTokens: 4, temperature: 1 } } } as unknown as RunHeader;
    const legacy = recordedSampler(m, v1, "old-run");
    assert.deepEqual([legacy.doSample, legacy.temperature, legacy.topK, legacy.topP, legacy.sources.topK], [true, 1, 0, 1, "run log v1"]);
  } finally {
    m.dispose();
  }
});
