#!/usr/bin/env node
// The selfscope command line. Errors print one line (no stack trace unless SELFSCOPE_DEBUG=1)
// and exit non-zero.
import fs from "node:fs";
import os from "node:os";
import { parseArgs } from "node:util";
import { SelfscopeError } from "../core/errors.js";
import path from "node:path";
import { DEMO_NOTE, ORGANISM_ABOUT, demoArgs } from "../eval/demo.js";
import { loadWithAdapter } from "../train/adapter.js";
import { buildConfig, formatDuration, summaryTable, type InjectArgs, type JudgeCallOptions } from "../eval/inject.js";
import { inject, rejudge, resume } from "../recipes/inject.js";
import { finishRun } from "../report/finish.js";
import { planTrials } from "../eval/plan.js";
import { computeResults, type RateOut, type Results } from "../eval/metrics.js";
import { judgeAgreement } from "../judge/agreement.js";
import { readRun } from "../eval/runlog.js";
import { inspectModel, Model } from "../model/model.js";
import { hasNativeMatrices, weightFiles } from "../model/load.js";
import { CPU_RAM_SHARE, estimateMemory, SEGMENT_BYTES } from "../model/memory.js";
import { describeSampler, sampleOptions, type SamplerRequest } from "../model/sampling.js";
import { exportCsv, exportParquet } from "../report/export.js";
import { serveRun } from "../report/server.js";
import { RECIPES, recipeArgs } from "./recipes.js";
import { defaultVectorCache } from "../vectors/extract.js";
import { cacheRoot } from "../core/cache.js";
import type { DeviceName } from "../engine/device.js";

const USAGE = `selfscope — measure what language models can report about their own internal states

Usage:
  selfscope generate --model PATH [--adapter FILE] [--prompt TEXT | --ids 1,2,3] [--chat] --max-tokens N
                     [--temperature T|model] [--top-k K] [--top-p P] [--min-p P] [--greedy] [--seed S]
                     [--device cpu|wasm|webgpu] [--weights f32|f16|native|native-int8] [--json]
  selfscope logits   --model PATH [--adapter FILE] --ids 1,2,3 --out FILE [--device cpu|wasm|webgpu] [--weights ...]
  selfscope info     --model PATH                         (reads headers only)
  selfscope check    --model PATH.gguf [--reference llama.cpp] [--prompt TEXT | --ids 1,2,3] [--weights ...] [--json]

  selfscope demo     [--out DIR]            the bundled model organism (trained to report injections) and its base
  selfscope inject   --model PATH [--adapter FILE] [--preset NAME] [--layers 37|0.6|20,30|all] [--strengths 1,2,4]
                     [--concepts original50|new450|all500|FILE|N] [--trials N] [--controls N] [--controls-per-concept N]
                     [--forced] [--yes-bias N] [--variant original,skeptical,...] [--prompt-format chat|raw]
                     [--judge rule|openai:MODEL|anthropic:MODEL|local:PATH]
                     [--max-tokens N] [--temperature T|model] [--top-k K] [--top-p P] [--min-p P] [--greedy]
                     [--seed S] [--batch-size B] [--out DIR] [--no-vector-cache] [--identify-all] [--failed-as-no]
                     [--judge-timeout S] [--judge-retries N] [--judge-concurrency N] [--weights native|native-int8|f32|f16]
  selfscope resume   RUN_DIR [--failed-as-no] finish a killed run (every planned trial exactly once; refuses
                                             another model; loads it with the run's --weights) and retry its failed judgments
  selfscope rejudge  RUN_DIR --judge SPEC [--failed-as-no]   judge a run again with another judge (appended to
                                             the log); recomputes results.json and report.html with its verdicts
  selfscope report   RUN_DIR [--failed-as-no] [--judge NAME]  recompute results.json and report.html
                                             (default: the run's first judge)

  Results: every (layer, strength, variant) configuration, and the best one per variant by
  introspection rate (the paper's rule); the top-level rates are that configuration's, never pooled.
  --identify-all   judge identification on every injection trial (unconditional identification rate)
  --failed-as-no   score failed judgments NO, as the paper's code did (default: exclude them from n)
  selfscope export   RUN_DIR [--format csv|parquet] [--out FILE]
  selfscope view     RUN_DIR [--port N]      serve the report on http://127.0.0.1
  selfscope judge-agreement RUN_DIR [--judge A --judge B | --human FILE]   Cohen's kappa
  selfscope cache    [clear]                 show (or empty) the concept-vector and weight-hash caches

Caches (docs/cache.md): concept vectors are cached under $SELFSCOPE_CACHE/vectors (default
$XDG_CACHE_HOME/selfscope/vectors, else ~/.cache/selfscope/vectors), keyed by the model's weights (sha256 of every byte), tokenizer, chat
template and config, the vector recipe and the selfscope version. inject, resume and the recipes
take --vector-cache DIR (another folder) or --no-vector-cache (compute every vector afresh; demo never caches).

--adapter FILE (generate, logits, inject): a trained adapter (selfscope train's OUT/adapter.safetensors) applied
  at load: LoRA factors and weight deltas merged into the weights, vectors and scales as a standing plan. The
  run header records its path and sha256 (the weights hash covers it); resume refuses a changed or missing file.
  selfscope merge --model M --adapter FILE --out OUT [--format safetensors|gguf] writes the merged model.

inject presets: macar2026 (main run), macar2026-500 (Fig. 1: 500 concepts, every layer × strengths 1-5),
  macar2026-prompt-variants (Table 1), macar2026-persona-variants (Table 2), macar2026-stages (03: training
  stages, base or instruct), macar2026-dpo-eval (03f's evaluation), lindsey2025.
  Fractional layers resolve as the paper's int(nLayers·f) (0.6 of 26 layers → 15), recorded in the log header.
  --prompt-format raw runs the paper's base-model prompt (03/03f: a raw User:/Assistant: dialogue, vectors from
  the raw text "Tell me about {word}"); it is the default for a model without a chat template.

Research recipes (each writes DIR/results.json and DIR/report.html; --help for flags):
  selfscope selfie-train --model PATH --out DIR --words ...   train a SelfIE adapter (docs/selfie.md)
  selfscope describe --model PATH --adapter FILE --concept W  let the model describe a vector through an adapter
  selfscope train --model PATH --data FILE.jsonl --out DIR [--objective sft|dpo|...]   fine-tune LoRA / a vector (docs/training.md)
  selfscope bias-vector --model PATH --out DIR    train a bias vector for introspection (protocol §7; at mlp.hook_down)
  selfscope train-bias-sweep --model PATH --out DIR  one bias vector per layer, §7.4 evaluation, metrics vs layer
  selfscope lindsey     --model PATH --out DIR    Lindsey (2025) experiments 2-4
  selfscope refusal     --model PATH --out DIR    refusal direction, subspace and ablation
  selfscope geometry    --model PATH --out DIR    concept-vector geometry
  selfscope compare     --model A --model B --out DIR [--preset P]   one preset on several models, side by side
  Neighbouring experiments:
  selfscope probe       --model A [--model B] --data F.jsonl --out DIR   linear probes by layer, permutation tests, decomposition,
                        cross-model patching and steering along the probe (docs/probes.md)
  selfscope identity    --model openai:M@NAME [--model PATH] --out DIR   the identity self-report sweep (docs/identity.md)
  selfscope self-recognition --model A --other B --out DIR   which of two summaries did you write? (docs/self-recognition.md)
  selfscope esr         --model PATH --out DIR   steering resistance: noticing and correcting a steered drift (docs/esr.md)
  selfscope controls    --model PATH --out DIR   noise controls and the synthetic threshold (protocol 04, 04e; docs/controls.md)
  selfscope negative-steering --model PATH --out DIR   behaviour directions removed: is the removal detected? (05; docs/controls.md)
  selfscope abliteration-search --model PATH --out DIR   region weights of the refusal ablation searched with NLopt (03e; docs/controls.md)
  Mechanisms (docs/mechanisms.md):
  selfscope patch       --model PATH --out DIR --layers L     component knock-out / knock-in of attention and MLP outputs
  selfscope attention   --model PATH --out DIR --layers L     attention mass to BOS / injected / other, per layer and head
  selfscope gradients   --model PATH --out DIR --layers L     gradient attribution per component, token and head; head ablation
  selfscope train-transcoder --model PATH --out DIR --layer L a TopK transcoder on the model's own activations
  selfscope features    --model PATH --out DIR --transcoder F gates, evidence carriers, feature interventions
  selfscope steering-attribution --model PATH --out DIR --transcoders F,F   SA / ISA per feature and an attribution graph
  selfscope mechanisms  --model PATH --out DIR --layers L     all of the above into one report

PATH is a .gguf file, a .safetensors file with config.json beside it, or a Hugging Face model folder.

Judges (--judge): rule (approximate, offline) | openai:MODEL (OPENAI_BASE_URL, OPENAI_API_KEY) | openrouter:MODEL |
  anthropic:MODEL (ANTHROPIC_API_KEY) | local:PATH. Without --judge: openai:gpt-4.1-mini when OPENAI_API_KEY is set
  (transcripts go to OPENAI_BASE_URL, default https://api.openai.com/v1; announced before the first request),
  else rule. Failed judgments print as they happen, are excluded from rates, and are retried by resume;
  a command whose judge judged nothing exits 1. Keys are never written, not even in part.
  --judge-timeout S      seconds per judge call, whole response included (default 30)
  --judge-retries N      retries after a failed call: timeouts, connection errors, 429, 5xx (default 2: 3 calls, as the protocol)
  --judge-concurrency N  judge calls in flight at once (default 16; local: judge: its batch size, default 4)

Sampling (generate, inject) follows Hugging Face generate given only a temperature, as the paper's code ran:
top-k, top-p, min-p and repetition_penalty come from the checkpoint's generation_config.json (a GGUF's
general.sampling.* keys), else transformers' defaults (top-k 50, top-p 1). --temperature 0 is greedy even when
the config says do_sample; --temperature model passes none, so the config's do_sample and temperature decide
(what the paper's code did at T = 0). --top-k 0 / --top-p 1 / --min-p 0 switch a filter off; --greedy forces
argmax. The effective sampler and each value's source go to stderr, the run log header and the report.`;

type Flags = Record<string, string | boolean | string[] | undefined>;

let positional: string[] = [];

function parse(argv: string[]): { cmd: string | undefined; flags: Flags; positionals: string[] } {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: true,
    options: {
      model: { type: "string" },
      adapter: { type: "string" },
      prompt: { type: "string" },
      ids: { type: "string" },
      chat: { type: "boolean" },
      "max-tokens": { type: "string" },
      temperature: { type: "string" },
      "top-k": { type: "string" },
      "top-p": { type: "string" },
      "min-p": { type: "string" },
      greedy: { type: "boolean" },
      seed: { type: "string" },
      device: { type: "string" },
      json: { type: "boolean" },
      out: { type: "string" },
      reference: { type: "string" },
      preset: { type: "string" },
      layers: { type: "string" },
      strengths: { type: "string" },
      concepts: { type: "string" },
      trials: { type: "string" },
      controls: { type: "string" },
      "controls-per-concept": { type: "string" },
      "prompt-format": { type: "string" },
      forced: { type: "boolean" },
      "identify-all": { type: "boolean" },
      "failed-as-no": { type: "boolean" },
      "yes-bias": { type: "string" },
      variant: { type: "string" },
      judge: { type: "string", multiple: true },
      "batch-size": { type: "string" },
      "vector-cache": { type: "string" },
      "no-vector-cache": { type: "boolean" },
      format: { type: "string" },
      human: { type: "string" },
      quiet: { type: "boolean" },
      host: { type: "string" },
      weights: { type: "string" },
      port: { type: "string" },
      "judge-timeout": { type: "string" },
      "judge-retries": { type: "string" },
      "judge-concurrency": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  return { cmd: positionals[0], flags: values, positionals: positionals.slice(1) };
}

class CliError extends SelfscopeError {}

function str(f: Flags, k: string, required = false): string | undefined {
  const v = f[k];
  if (v === undefined && required) throw new CliError(`--${k} is required (see selfscope --help)`);
  return typeof v === "string" ? v : undefined;
}

function numFlag(f: Flags, k: string, dflt?: number): number | undefined {
  const v = str(f, k);
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new CliError(`--${k} must be a number, got "${v}"`);
  return n;
}

function idsFlag(s: string): number[] {
  const ids = s.split(",").filter((x) => x.trim() !== "").map((x) => Number(x.trim()));
  if (ids.some((x) => !Number.isInteger(x) || x < 0)) throw new CliError(`--ids must be comma-separated non-negative integers, got "${s}"`);
  return ids;
}

function weights(f: Flags): { weights?: "f32" | "f16" | "native" | "native-int8" } {
  const w = str(f, "weights");
  if (w === undefined) return {};
  if (w !== "f32" && w !== "f16" && w !== "native" && w !== "native-int8") throw new CliError(`--weights must be f32, f16 (webgpu), native (cpu: Q8_0 / Q4_0 / Q4_K / Q5_K / Q6_K / BF16 / F16 matrices computed on in their format; the cpu default for such files) or native-int8 (native, with the activations of Q4_K / Q5_K / Q6_K products, and of Q8_0 ones at decode, quantized to int8 like llama.cpp: faster, not the f32 path's numbers), got "${w}"`);
  return { weights: w };
}

function device(f: Flags): DeviceName {
  const d = str(f, "device") ?? "cpu";
  if (d !== "cpu" && d !== "wasm" && d !== "webgpu") throw new CliError(`--device must be cpu, wasm or webgpu, got "${d}"`);
  return d;
}

async function cmdGenerate(f: Flags): Promise<void> {
  const { model } = await loadWithAdapter(str(f, "model", true)!, str(f, "adapter"), { device: device(f), ...weights(f) });
  const maxTokens = numFlag(f, "max-tokens");
  if (maxTokens === undefined || !Number.isInteger(maxTokens) || maxTokens < 0) throw new CliError("--max-tokens N is required (a non-negative integer)");
  const prompt = str(f, "prompt");
  const ids = str(f, "ids");
  if (prompt !== undefined && ids !== undefined) throw new CliError("pass either --prompt or --ids, not both");
  const p = ids !== undefined ? { ids: idsFlag(ids) } : f.chat ? { messages: [{ role: "user", content: prompt ?? "" }] } : prompt !== undefined ? prompt : { ids: [] };
  const sampler = model.sampler(samplerFlags(f));
  process.stderr.write(`sampler: ${describeSampler(sampler)}\n`);
  const res = await model.generate([p], { maxTokens, seed: numFlag(f, "seed", 0)!, ...sampleOptions(sampler) });
  const text = res.texts[0] ?? "";
  if (f.json) process.stdout.write(JSON.stringify({ ids: res.tokens[0], text, sampler }) + "\n");
  else process.stdout.write(text + "\n");
  model.dispose();
}

async function cmdLogits(f: Flags): Promise<void> {
  const { model } = await loadWithAdapter(str(f, "model", true)!, str(f, "adapter"), { device: device(f), ...weights(f) });
  const ids = idsFlag(str(f, "ids", true)!);
  if (ids.length === 0) throw new CliError("--ids must name at least one token");
  const out = str(f, "out", true)!;
  const { logits } = await model.forward([{ ids }]);
  const l = logits[0]!;
  fs.writeFileSync(out, new Uint8Array(l.buffer, l.byteOffset, l.byteLength));
  process.stderr.write(`wrote ${ids.length}x${model.config.dVocab} float32 logits to ${out}\n`);
  model.dispose();
}

/** How the cpu engine holds `bytes` of weights: in one wasm32 memory, or split across several (planSegments). */
function memories(bytes: number): string {
  const n = Math.ceil(bytes / SEGMENT_BYTES);
  const ram = bytes > CPU_RAM_SHARE * os.totalmem() ? `; exceeds ${Math.round(CPU_RAM_SHARE * 100)}% of this machine's RAM` : "";
  return (n <= 1 ? "fits one wasm32 memory" : `split across about ${n} wasm32 memories`) + ram;
}

async function cmdInfo(f: Flags): Promise<void> {
  // Headers only: no tensor is read and no engine is built, so this works for any size of model.
  const model = inspectModel(str(f, "model", true)!);
  const c = model.config;
  const mem = estimateMemory(c);
  const fileBytes = weightFiles(model.files).reduce((a, p) => a + fs.statSync(p).size, 0);
  const size = (b: number) => (b >= 1024 ** 3 ? `${(b / 1024 ** 3).toFixed(2)} GiB` : `${(b / 1024 ** 2).toFixed(1)} MiB`);
  const count = (n: number) => (n >= 1e9 ? `${(n / 1e9).toFixed(2)}B` : n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : `${(n / 1e3).toFixed(1)}K`);
  const lines = [
    ["family", c.family],
    ["format", model.files.format],
    ["weights", model.files.weights],
    ["dtype", model.sourceDtype],
    ["dims", `dModel ${c.dModel}, nLayers ${c.nLayers}, nHeads ${c.nHeads}, nKvHeads ${c.nKvHeads}, dHead ${c.dHead}, dMlp ${c.dMlp}, dVocab ${c.dVocab}, nCtx ${c.nCtx}`],
    ...(c.mlp.kind === "moe" ? [["experts", `${c.mlp.nExperts} per layer, ${c.mlp.topK} routed per token${c.mlp.normTopK ? " (weights renormalised)" : ""}; dMlp is one expert's; ${count(mem.activeParams)} parameters active per token`]] : []),
    ["norm", JSON.stringify(c.norm)],
    ["positions", JSON.stringify(c.pos)],
    ["tokenizer", model.tokenizer ? `${model.tokenizer.kind} (${model.tokenizer.vocabSize} tokens, bos ${model.tokenizer.bos ?? "none"}, eos ${model.tokenizer.eos ?? "none"})` : "none"],
    ["chat template", model.chatTemplate ? "present" : "absent"],
    ["stop tokens", model.stopTokens.join(", ") || "none"],
    ["sampling", `${describeSampler(model.sampler())} (generate without flags); --temperature T: ${describeSampler(model.sampler({ temperature: 1 })).replace("temperature 1 (flag)", "temperature T")}`],
  ];
  lines.push(
    ["parameters", `${count(mem.params)} (weight files ${size(fileBytes)})`],
    ["memory", `cpu ${size(mem.weightBytes + mem.hostBytes)} as f32 (${memories(mem.weightBytes + mem.hostBytes)})` +
      (model.nativeQuantBytes !== undefined && hasNativeMatrices(model.sourceDtype) ? `, ${size(model.nativeQuantBytes)} with its Q8_0/Q4_0/Q4_K/Q5_K/Q6_K/BF16/F16 matrices kept in their format (the cpu default; ${memories(model.nativeQuantBytes)})` : "") +
      `; KV cache ${size(mem.kvBytesPerRow(c.nCtx))} per row at nCtx ${c.nCtx}`],
  );
  for (const [k, v] of lines) process.stdout.write(`${k!.padEnd(14)} ${v}\n`);
}

/** Logits parity against llama.cpp on a fixed prompt (GGUF models). */
async function cmdCheck(f: Flags): Promise<void> {
  const ref = str(f, "reference") ?? "llama.cpp";
  if (ref !== "llama.cpp") throw new CliError(`--reference must be llama.cpp (the only reference implemented), got "${ref}"`);
  const model = await Model.load(str(f, "model", true)!, { device: device(f), ...weights(f) });
  if (model.files.format !== "gguf") throw new CliError("check compares against llama.cpp, which reads GGUF files: pass a .gguf model");
  const text = str(f, "prompt") ?? "The quick brown fox jumps over the lazy dog. Once upon a time, there was";
  const ids = str(f, "ids") !== undefined ? idsFlag(str(f, "ids")!) : model.encode(text).ids;
  const { compareLogits, llamaCppLogits } = await import("../reference/llamacpp.js");
  const theirs = await llamaCppLogits(model.files.weights, ids);
  const ours = (await model.forward([{ ids }])).logits[0]!;
  const r = compareLogits(ours, theirs.logits, ids.length, model.config.dVocab, theirs.kind === "logprobs");
  const lines = [
    `model          ${model.files.weights}`,
    `reference      ${theirs.info}`,
    `positions      ${ids.length} (compared as ${theirs.kind === "logprobs" ? "log-softmax: this node-llama-cpp returns probabilities" : "raw logits"})`,
    `max |Δ|        ${r.maxAbs.toExponential(2)} (at position ${r.at})`,
    `top-1 agree    ${r.top1}/${ids.length}`,
  ];
  process.stdout.write(lines.join("\n") + "\n");
  if (f.json) process.stdout.write(JSON.stringify({ maxAbsDiff: r.maxAbs, top1Agreement: r.top1 / ids.length, positions: ids.length, kind: theirs.kind }) + "\n");
  model.dispose();
}

/** --temperature T|model, --top-k, --top-p, --min-p, --greedy: what the user asked for (the model file fills the rest). */
function samplerFlags(f: Flags): SamplerRequest {
  const t = str(f, "temperature");
  const k = intFlag(f, "top-k"), p = numFlag(f, "top-p"), m = numFlag(f, "min-p");
  return {
    ...(t !== undefined ? { temperature: t === "model" ? "model" : numFlag(f, "temperature")! } : {}),
    ...(k !== undefined ? { topK: k } : {}),
    ...(p !== undefined ? { topP: p } : {}),
    ...(m !== undefined ? { minP: m } : {}),
    ...(f.greedy === true ? { greedy: true } : {}),
  };
}

function intFlag(f: Flags, k: string): number | undefined {
  const n = numFlag(f, k);
  if (n !== undefined && (!Number.isInteger(n) || n < 0)) throw new CliError(`--${k} must be a non-negative integer`);
  return n;
}

function promptFormat(f: Flags): "chat" | "raw" | undefined {
  const v = str(f, "prompt-format");
  if (v !== undefined && v !== "chat" && v !== "raw") throw new CliError(`--prompt-format must be chat or raw, got "${v}"`);
  return v;
}

/** --judge-timeout (seconds), --judge-retries, --judge-concurrency. */
function judgeCallOptions(f: Flags): JudgeCallOptions {
  const out: JudgeCallOptions = {};
  const t = numFlag(f, "judge-timeout");
  if (t !== undefined) {
    if (!(t > 0)) throw new CliError(`--judge-timeout must be a positive number of seconds, got ${t}`);
    out.timeoutMs = Math.max(1, Math.round(t * 1000));
  }
  const r = intFlag(f, "judge-retries");
  if (r !== undefined) out.maxAttempts = r + 1;
  const c = intFlag(f, "judge-concurrency");
  if (c !== undefined) {
    if (c < 1) throw new CliError("--judge-concurrency must be at least 1");
    out.concurrency = c;
  }
  return out;
}

function injectArgs(f: Flags): InjectArgs {
  const opt = <K extends keyof InjectArgs>(k: K, v: InjectArgs[K] | undefined): Partial<InjectArgs> => (v === undefined ? {} : { [k]: v });
  const judge = f.judge;
  return {
    model: str(f, "model", true)!,
    ...opt("adapter", str(f, "adapter")),
    ...opt("preset", str(f, "preset")),
    ...opt("layers", str(f, "layers")),
    ...opt("strengths", str(f, "strengths")),
    ...opt("concepts", str(f, "concepts")),
    ...opt("trials", intFlag(f, "trials")),
    ...opt("controls", intFlag(f, "controls")),
    ...opt("controlsPerConcept", intFlag(f, "controls-per-concept")),
    ...opt("promptFormat", promptFormat(f)),
    ...opt("forced", f.forced === true ? true : undefined),
    ...opt("identifyAll", f["identify-all"] === true ? true : undefined),
    ...opt("failedAsNo", f["failed-as-no"] === true ? true : undefined),
    ...opt("yesBias", intFlag(f, "yes-bias")),
    ...opt("variants", str(f, "variant")),
    ...opt("judges", Array.isArray(judge) ? judge.flatMap((j) => j.split(",")) : undefined),
    ...opt("maxTokens", intFlag(f, "max-tokens")),
    ...samplerFlags(f),
    ...opt("seed", intFlag(f, "seed")),
    ...opt("batchSize", intFlag(f, "batch-size")),
    ...opt("out", str(f, "out")),
    ...weights(f),
    device: device(f),
    vectorCache: vectorCacheFlag(f),
    quiet: f.quiet === true,
    command: process.argv.slice(2),
    judgeOptions: judgeCallOptions(f),
  };
}

/** --vector-cache DIR, --no-vector-cache (null: nothing read or written), else the default cache. */
function vectorCacheFlag(f: Flags): string | null {
  if (f["no-vector-cache"] === true && str(f, "vector-cache") !== undefined) throw new CliError("pass either --vector-cache DIR or --no-vector-cache, not both");
  return f["no-vector-cache"] === true ? null : (str(f, "vector-cache") ?? defaultVectorCache());
}

/** `selfscope cache [clear]`: where the caches are and how big; `clear` deletes them (they are recomputed on demand). */
async function cmdCache(_f: Flags): Promise<void> {
  const action = positional[0];
  if (action !== undefined && action !== "clear") throw new CliError(`usage: selfscope cache [clear] (got "${action}")`);
  const dirs: [string, string][] = [["vectors", defaultVectorCache()], ["hashes", path.join(cacheRoot(), "hashes")]];
  for (const [name, dir] of dirs) {
    if (action === "clear") {
      fs.rmSync(dir, { recursive: true, force: true });
      process.stdout.write(`removed ${name.padEnd(8)} ${dir}\n`);
    } else {
      const { files, bytes } = du(dir);
      process.stdout.write(`${name.padEnd(8)} ${dir}  (${files} files, ${(bytes / 1e6).toFixed(1)} MB)\n`);
    }
  }
  if (action !== "clear") process.stdout.write(`weight hashes of files over 64 MiB are also kept beside them (.NAME.selfscope-sha256), used only while the file is unchanged\n`);
}

function du(dir: string): { files: number; bytes: number } {
  let files = 0, bytes = 0;
  if (!fs.existsSync(dir)) return { files, bytes };
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (!e.isFile()) continue;
    files++;
    bytes += fs.statSync(path.join(e.parentPath, e.name)).size;
  }
  return { files, bytes };
}

function printRun(runDir: string, results: Results): void {
  process.stdout.write(`${summaryTable(results)}\n  run: ${runDir} (report.html, results.json, log.jsonl)\n`);
  process.stdout.write(`  open the report: selfscope view ${quoteArg(runDir)}   (or the file ${path.resolve(runDir, "report.html")})\n`);
}

/** A path as a shell argument (quoted only when it needs to be). */
function quoteArg(s: string): string {
  return /^[\w./@%+=:,-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

async function cmdInject(f: Flags): Promise<void> {
  const { runDir, results } = await inject(injectArgs(f));
  printRun(runDir, results);
}

async function cmdResume(f: Flags): Promise<void> {
  const dir = positional[0];
  if (!dir) throw new CliError("usage: selfscope resume RUN_DIR");
  const r = await resume(dir, { ...(str(f, "device") ? { device: device(f) } : {}), quiet: f.quiet === true, vectorCache: vectorCacheFlag(f), failedAsNo: f["failed-as-no"] === true, judgeOptions: judgeCallOptions(f) });
  if (r.discardedBytes > 0) process.stderr.write(`discarded a half-written last record (${r.discardedBytes} bytes)\n`);
  process.stderr.write(`resumed: ${r.generated} trials generated\n`);
  printRun(dir, r.results);
}

async function cmdReport(f: Flags): Promise<void> {
  const dir = positional[0];
  if (!dir) throw new CliError("usage: selfscope report RUN_DIR [--failed-as-no] [--judge NAME]");
  const judges = Array.isArray(f.judge) ? f.judge : [];
  if (judges.length > 1) throw new CliError("report: pass at most one --judge (whose verdicts the results use)");
  const { results } = await finishRun(dir, { failedAsNo: f["failed-as-no"] === true, ...(judges[0] !== undefined ? { judge: judges[0] } : {}) });
  printRun(dir, results);
}

async function cmdRejudge(f: Flags): Promise<void> {
  const dir = positional[0];
  const judges = Array.isArray(f.judge) ? f.judge : [];
  if (!dir || judges.length !== 1) throw new CliError("usage: selfscope rejudge RUN_DIR --judge SPEC [--judge-timeout S] [--judge-retries N] [--judge-concurrency N]");
  const r = await rejudge(dir, judges[0]!, { judgeOptions: judgeCallOptions(f), failedAsNo: f["failed-as-no"] === true });
  process.stderr.write(`rejudged with ${r.judge}: ${r.judged} judgments appended to the log; results are for ${r.judge} (selfscope report ${dir} --judge ${r.judge} recomputes them the same way)\n`);
  printRun(dir, r.results);
}

async function cmdExport(f: Flags): Promise<void> {
  const dir = positional[0];
  if (!dir) throw new CliError("usage: selfscope export RUN_DIR [--format csv|parquet] [--out FILE]");
  const fmt = str(f, "format") ?? "csv";
  if (fmt !== "csv" && fmt !== "parquet") throw new CliError(`--format must be csv or parquet`);
  const run = readRun(dir);
  const results = computeResults(run, { bootstrap: 0 });
  const out = str(f, "out") ?? path.join(dir, `trials.${fmt}`);
  if (fmt === "csv") exportCsv(run, results, out);
  else await exportParquet(run, results, out);
  process.stdout.write(`wrote ${out}\n`);
}

async function cmdJudgeAgreement(f: Flags): Promise<void> {
  const dir = positional[0];
  if (!dir) throw new CliError("usage: selfscope judge-agreement RUN_DIR [--judge A --judge B | --human FILE]");
  const run = readRun(dir);
  const judges = Array.isArray(f.judge) ? f.judge : [];
  const human = str(f, "human");
  const rep = judgeAgreement(run, { judges, ...(human ? { human } : {}) });
  process.stdout.write(rep + "\n");
}

async function cmdDemo(f: Flags): Promise<void> {
  const out = str(f, "out") ?? path.join("runs", `demo-${new Date().toISOString().replace(/[:.]/g, "-")}`);
  process.stderr.write(DEMO_NOTE + "\n");
  const common = { device: device(f), quiet: f.quiet === true, command: process.argv.slice(2) };
  // The contrast first (same trials, untrained base), so the organism's header can record its figures.
  const baseDir = path.join(out, "base");
  const base = await inject({ ...demoArgs("base"), out: baseDir, ...common });
  const figures = Object.fromEntries(["tpr", "fpr", "introspection_rate", "forced_identification_rate", "discrimination_p_value"].map((k) => [k, (base.results as unknown as Record<string, unknown>)[k]]));
  const about = { text: ORGANISM_ABOUT, contrast: { label: "untrained base (stories260K), same trials", model: demoArgs("base").model, runDir: "base", figures } };
  const { runDir, results } = await inject({ ...demoArgs("organism"), out, about, ...common });
  process.stdout.write(`  the model organism (TRAINED to report injections; held-out concepts):\n`);
  printRun(runDir, results);
  const r = (x: RateOut | null) => (x && x.estimate !== null ? `${x.estimate.toFixed(2)} [${x.lo!.toFixed(2)}, ${x.hi!.toFixed(2)}]` : "–");
  process.stdout.write(`  contrast, the untrained base on the same trials: TPR ${r(base.results.tpr)}  FPR ${r(base.results.fpr)}  forced identification ${r(base.results.forced_identification_rate)}  (run: ${baseDir})\n`);
  // Wall time of the whole command, process start included.
  process.stdout.write(`  wall time: ${formatDuration(process.uptime())}\n`);
  process.stdout.write(nextStep(readRun(runDir)) + "\n");
}

/**
 * The suggested next step with its size and an estimate of its generation time on this machine:
 * the demo's own seconds per generated-token slot, scaled to the preset's trials × max tokens.
 */
function nextStep(run: ReturnType<typeof readRun>): string {
  const cfg = buildConfig({ model: "", preset: "macar2026" }, run.header.model.nLayers);
  const trials = planTrials(cfg).length;
  const maxTokens = cfg.generation.maxTokens;
  const demoMax = run.header.config.generation.maxTokens;
  const genSeconds = run.trials.reduce((a, t) => a + t.ms, 0) / 1000;
  const slots = run.trials.length * demoMax;
  const est = slots > 0 ? (genSeconds / slots) * trials * maxTokens : NaN;
  return [
    `  next: selfscope inject --model <your model> --preset macar2026   (${trials.toLocaleString("en-US")} trials × up to ${maxTokens} tokens)`,
    `        estimate on this machine: about ${formatDuration(est)} of generation for the bundled 260K-parameter model`,
    `        (this demo generated ${run.trials.length} trials × up to ${demoMax} tokens in ${formatDuration(genSeconds)}; scaled by trials × tokens).`,
    `        A real model is slower per token, roughly in proportion to its size; inject prints its plan and its own ETA before it starts.`,
  ].join("\n");
}

async function cmdView(f: Flags): Promise<void> {
  const dir = positional[0];
  if (!dir || !fs.existsSync(dir)) throw new CliError("usage: selfscope view RUN_DIR [--host 127.0.0.1] [--port N]");
  const host = str(f, "host") ?? "127.0.0.1";
  if (host !== "127.0.0.1" && host !== "localhost" && host !== "::1") process.stderr.write(`warning: serving on ${host} makes this run visible to your network\n`);
  const { url } = await serveRun(dir, { host, port: numFlag(f, "port", 0)! });
  process.stdout.write(`serving ${dir} at ${url} (Ctrl-C to stop)\n`);
  await new Promise<never>(() => {}); // run until interrupted
}

const COMMANDS: Record<string, (f: Flags) => Promise<void>> = {
  view: cmdView,
  generate: cmdGenerate,
  logits: cmdLogits,
  info: cmdInfo,
  check: cmdCheck,
  inject: cmdInject,
  resume: cmdResume,
  report: cmdReport,
  rejudge: cmdRejudge,
  export: cmdExport,
  "judge-agreement": cmdJudgeAgreement,
  cache: cmdCache,
  demo: cmdDemo,
};

async function main(): Promise<number> {
  const first = process.argv[2];
  if (first && RECIPES[first]) return runRecipe(first);
  let parsed;
  try {
    parsed = parse(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`selfscope: ${(e as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const { cmd, flags } = parsed;
  positional = parsed.positionals;
  if (!cmd || flags.help || cmd === "help") {
    process.stdout.write(USAGE + "\n");
    return cmd || flags.help ? 0 : 2;
  }
  const run = COMMANDS[cmd];
  if (!run) {
    process.stderr.write(`selfscope: unknown command "${cmd}"\n${USAGE}\n`);
    return 2;
  }
  return report(cmd, () => run(flags));
}

/** Run a command; errors print one line (no stack unless SELFSCOPE_DEBUG) and give exit code 1. */
async function report(cmd: string, f: () => Promise<void>): Promise<number> {
  try {
    await f();
    return 0;
  } catch (e) {
    if (process.env.SELFSCOPE_DEBUG) console.error(e);
    const msg = e instanceof Error ? e.message : String(e);
    process.stderr.write(`selfscope ${cmd}: ${msg}${e instanceof SelfscopeError ? "" : " (set SELFSCOPE_DEBUG=1 for a stack trace)"}\n`);
    return 1;
  }
}

async function runRecipe(cmd: string): Promise<number> {
  const recipe = RECIPES[cmd]!;
  if (process.argv.includes("--help") || process.argv.includes("-h")) {
    process.stdout.write(`usage: ${recipe.usage}\n`);
    return 0;
  }
  return report(cmd, async () => {
    const args = recipeArgs(cmd, process.argv.slice(3));
    if (args.noVectorCache === true) {
      if (args.vectorCache !== undefined) throw new CliError("pass either --vector-cache DIR or --no-vector-cache, not both");
      args.vectorCache = null;
    } else if (args.vectorCache === undefined) args.vectorCache = defaultVectorCache();
    delete args.noVectorCache;
    await recipe.run(args);
    if (!recipe.noOut) process.stdout.write(`wrote ${(recipe.writes ?? ["results.json", "report.html"]).map((f) => `${String(args.out)}/${f}`).join(" and ")}\n`);
  });
}

// Exit explicitly: the WebGPU device and wasm worker handles would otherwise keep Node alive.
main().then((code) => process.exit(code));
