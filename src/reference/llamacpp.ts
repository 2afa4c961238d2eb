// llama.cpp as a parity oracle (through node-llama-cpp's prebuilt CPU binaries): next-token
// logits after every position, and greedy continuations. Backs the tests and
// `selfscope check --model X.gguf`.
//
// node-llama-cpp is an optional dependency, imported only when a function here is called, so the
// package works without it. Settings that matter for parity (engine-study "llama.cpp parity"):
// F32 KV cache (the default F16 cache alone is off by ~2e-2), no flash attention, CPU only, and
// never build or download anything.
//
// Raw logits need node-llama-cpp >= 3.22 (`generateNext.logits`). Older 3.x only exposes
// probabilities, softmax'ed in float32; from those this returns log-probabilities, renormalised in
// float64 (which cancels the float32 sum's rounding), good to ~1e-6. They equal the raw logits up
// to one constant per position (its logsumexp), so compare log-softmax rows in that case.
import os from "node:os";
import { UsageError } from "../core/errors.js";

type NodeLlamaCpp = typeof import("node-llama-cpp");
type Llama = import("node-llama-cpp").Llama;
type LlamaModel = import("node-llama-cpp").LlamaModel;
type LlamaContext = import("node-llama-cpp").LlamaContext;
type Token = import("node-llama-cpp").Token;
type EvalItem = import("node-llama-cpp").ControlledEvaluateInputItem;

export interface LlamaCppOptions {
  /**
   * CPU threads for llama.cpp (default: os.availableParallelism()). node-llama-cpp's own default
   * counts the host's cores, which oversubscribes a CPU-limited container: ggml's spinning
   * workers then run 100-1000x slower.
   */
  threads?: number;
}

export interface LlamaCppLogits {
  /**
   * Row-major [T, vocab]: row t scores the token after ids[0..t]. Raw logits when kind is
   * "logits"; log-probabilities (logits minus the row's logsumexp) when kind is "logprobs", where
   * a probability that underflowed float32 (logit ~100 below the row max) is -Infinity.
   */
  logits: Float32Array;
  vocab: number;
  kind: "logits" | "logprobs";
  /** node-llama-cpp and llama.cpp versions and the settings used, for reports. */
  info: string;
}

/** The first node-llama-cpp version whose controlledEvaluate returns raw logits. */
const RAW_LOGITS_SINCE = [3, 22, 0] as const;

async function importNodeLlamaCpp(): Promise<NodeLlamaCpp> {
  try {
    return await import("node-llama-cpp");
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    const msg = e instanceof Error ? e.message : String(e);
    if ((code === "ERR_MODULE_NOT_FOUND" || code === "MODULE_NOT_FOUND") && msg.includes("node-llama-cpp")) {
      throw new UsageError("the llama.cpp reference needs the optional package node-llama-cpp; install it with `npm i -D node-llama-cpp`", { cause: e });
    }
    throw e;
  }
}

function versionAtLeast(version: string, min: readonly number[]): boolean {
  const v = version.split(/[.+-]/).slice(0, min.length).map(Number);
  for (let i = 0; i < min.length; i++) {
    const a = v[i] ?? 0;
    if (Number.isNaN(a)) return false;
    if (a !== min[i]) return a > min[i]!;
  }
  return true;
}

interface Session {
  lib: NodeLlamaCpp;
  version: string;
  model: LlamaModel;
  context: LlamaContext;
  info: string;
}

/**
 * llama.cpp's prebuilt CPU binary on `threads` threads: never built or downloaded, logging
 * errors only to stderr (warnings too with SELFSCOPE_DEBUG), so stdout stays machine-readable.
 * Shared by the reference functions here, the tests' llama.cpp runner and the benchmark.
 */
export async function loadLlamaCpu(threads: number): Promise<Llama> {
  const lib = await importNodeLlamaCpp();
  const version = await lib.getModuleVersion();
  const verbose = !!process.env.SELFSCOPE_DEBUG;
  const logLevel = verbose ? lib.LlamaLogLevel.warn : lib.LlamaLogLevel.error;
  const logger = (level: import("node-llama-cpp").LlamaLogLevel, message: string): void => {
    if (level === lib.LlamaLogLevel.error || level === lib.LlamaLogLevel.fatal || (verbose && level === lib.LlamaLogLevel.warn)) {
      process.stderr.write(`[llama.cpp ${level}] ${message.endsWith("\n") ? message : message + "\n"}`);
    }
  };
  try {
    return await lib.getLlama({
      gpu: false,
      build: "never",
      usePrebuiltBinaries: true,
      skipDownload: true,
      progressLogs: false,
      logLevel,
      logger,
      maxThreads: threads,
    });
  } catch (e) {
    throw new UsageError(
      `node-llama-cpp ${version} could not load its prebuilt CPU binary (${e instanceof Error ? e.message : String(e)}); ` +
        "selfscope never builds or downloads llama.cpp: reinstall node-llama-cpp so that its platform package (e.g. @node-llama-cpp/linux-x64) is present",
      { cause: e },
    );
  }
}

/** Loads llama.cpp (CPU prebuilt only) and the model, runs fn, and disposes everything. */
async function withModel<R>(modelPath: string, contextSize: number, opts: LlamaCppOptions, fn: (s: Session) => Promise<R>): Promise<R> {
  const threads = opts.threads ?? os.availableParallelism();
  if (!Number.isInteger(threads) || threads < 1) throw new UsageError(`llama.cpp threads = ${threads} is not a positive integer`);
  const lib = await importNodeLlamaCpp();
  const version = await lib.getModuleVersion();
  const llama = await loadLlamaCpu(threads);
  let model: LlamaModel | undefined;
  let context: LlamaContext | undefined;
  try {
    model = await llama.loadModel({ modelPath, gpuLayers: 0 });
    // One spare slot: with exactly as many cells as tokens, node-llama-cpp 3.21 returns a wrong
    // distribution for the last position (seen on a synthetic llama: |Δ| 16.6 on that row only).
    context = await model.createContext({
      contextSize: contextSize + 1,
      batchSize: contextSize + 1,
      sequences: 1,
      threads,
      flashAttention: false,
      experimentalKvCacheKeyType: "F32",
      experimentalKvCacheValueType: "F32",
    });
    const rel = llama.llamaCppRelease;
    const info =
      `node-llama-cpp ${version}, llama.cpp ${rel.release} (${llama.buildType} ${rel.repo}), cpu, ${context.currentThreads} threads, ` +
      `KV cache F32, flash attention off, context ${context.contextSize}, batch ${context.batchSize}`;
    return await fn({ lib, version, model, context, info });
  } finally {
    await context?.dispose();
    await model?.dispose();
    await llama.dispose();
  }
}

function checkIds(ids: readonly number[], what: string): void {
  if (ids.length === 0) throw new UsageError(`${what}: needs at least one token id (start from BOS)`);
  for (const t of ids) {
    if (!Number.isInteger(t) || t < 0) throw new UsageError(`${what}: token id ${t} is not a non-negative integer`);
  }
}

/** The vocabulary size in the GGUF metadata (undefined if the file has none). */
function metadataVocab(model: LlamaModel): number | undefined {
  const n = (model.fileInfo.metadata as { tokenizer?: { ggml?: { tokens?: readonly unknown[] } } }).tokenizer?.ggml?.tokens?.length;
  return typeof n === "number" ? n : undefined;
}

/** What controlledEvaluate returns per position, in either node-llama-cpp version. */
interface NextOut {
  next?: { logits?: Map<number, number>; probabilities?: Map<number, number>; token?: number | null };
}

/**
 * Next-token scores from llama.cpp after every position of `ids` (one sequence, one batch).
 * node-llama-cpp returns each position as a Map token -> value (sorted by value); this checks that
 * every map holds exactly the tokens 0..vocab-1 and packs them densely.
 */
export async function llamaCppLogits(modelPath: string, ids: number[], opts: LlamaCppOptions = {}): Promise<LlamaCppLogits> {
  checkIds(ids, "llamaCppLogits");
  const T = ids.length;
  return withModel(modelPath, T, opts, async ({ version, model, context, info }) => {
    const raw = versionAtLeast(version, RAW_LOGITS_SINCE);
    const kind = raw ? "logits" : "logprobs";
    const seq = context.getSequence();
    try {
      // temperature 0 (the default) puts only llama.cpp's greedy sampler in the chain; it picks a
      // token without altering the candidates, which are llama_get_logits_ith() for the full vocab.
      const generateNext = raw ? { logits: true, options: { temperature: 0 } } : { probabilities: true, options: { temperature: 0 } };
      const input = ids.map((t) => [t as Token, { generateNext }] as unknown as EvalItem);
      const res = (await seq.controlledEvaluate(input)) as (NextOut | undefined)[];
      const maps = res.map((r) => (raw ? r?.next?.logits : r?.next?.probabilities));
      const what = raw ? "logits" : "probabilities";
      const vocab = maps[0]?.size ?? 0;
      if (vocab === 0) throw new Error(`llama.cpp returned no ${what} for position 0 (node-llama-cpp ${version})`);
      const meta = metadataVocab(model);
      if (meta !== undefined && meta !== vocab) {
        throw new Error(`llama.cpp returned ${vocab} ${what} per position but the GGUF vocabulary has ${meta} tokens`);
      }
      const out = new Float32Array(T * vocab).fill(NaN);
      for (let t = 0; t < T; t++) {
        const m = maps[t];
        if (!m) throw new Error(`llama.cpp returned no ${what} for position ${t}`);
        if (m.size !== vocab) throw new Error(`llama.cpp returned ${m.size} ${what} at position ${t}, expected ${vocab}`);
        const row = new Float64Array(vocab).fill(NaN);
        for (const [tok, v] of m) {
          if (!Number.isInteger(tok) || tok < 0 || tok >= vocab) throw new Error(`llama.cpp returned a value for token ${tok} outside [0, ${vocab}) at position ${t}`);
          if (!Number.isNaN(row[tok]!)) throw new Error(`llama.cpp returned token ${tok} twice at position ${t}`);
          if (Number.isNaN(v)) throw new Error(`llama.cpp returned NaN for token ${tok} at position ${t}`);
          row[tok] = v;
        }
        // size === vocab and the keys are distinct and in range, so every slot is set; check anyway.
        const hole = row.findIndex((v) => Number.isNaN(v));
        if (hole >= 0) throw new Error(`llama.cpp ${what} incomplete: position ${t}, token ${hole} missing`);
        if (!raw) {
          // p = fl(fl(exp(l - max)) / fl(sum)): dividing by the float64 sum of the p's removes the
          // float32 sum's rounding, leaving ~1 ulp per entry.
          let s = 0;
          for (let i = 0; i < vocab; i++) s += row[i]!;
          const logS = Math.log(s);
          for (let i = 0; i < vocab; i++) row[i] = Math.log(row[i]!) - logS;
        }
        out.set(row, t * vocab);
      }
      return { logits: out, vocab, kind, info };
    } finally {
      seq.dispose();
    }
  });
}

/** n greedy (argmax) tokens after `ids`, chosen by llama.cpp's own greedy sampler, with its KV cache. */
export async function llamaCppGreedy(modelPath: string, ids: number[], n: number, opts: LlamaCppOptions = {}): Promise<number[]> {
  checkIds(ids, "llamaCppGreedy");
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`llamaCppGreedy: n = ${n} is not a non-negative integer`);
  if (n === 0) return [];
  return withModel(modelPath, ids.length + n, opts, async ({ context }) => {
    const seq = context.getSequence();
    try {
      const next = { generateNext: { token: true, options: { temperature: 0 } } } as const;
      const out: number[] = [];
      let input: EvalItem[] = ids.map((t, i) => (i === ids.length - 1 ? [t as Token, next] : (t as Token)));
      while (out.length < n) {
        const res = await seq.controlledEvaluate(input);
        const tok = res[input.length - 1]?.next.token;
        if (tok === undefined || tok === null) throw new Error(`llama.cpp produced no token at step ${out.length}`);
        out.push(tok);
        input = [[tok, next]];
      }
      return out;
    } finally {
      seq.dispose();
    }
  });
}

/**
 * Two [T, V] logit arrays compared row by row: max |Δ| (of log-softmax rows when `logSoftmax`), the
 * position where it occurs and how many rows agree on the argmax. Entries that are not finite in
 * `b` (probabilities that underflowed in the reference) are skipped.
 */
export function compareLogits(a: Float32Array, b: Float32Array, T: number, V: number, logSoftmax: boolean): { maxAbs: number; at: number; top1: number } {
  const lsm = (x: Float32Array, t: number) => {
    const row = x.subarray(t * V, (t + 1) * V);
    if (!logSoftmax) return Float64Array.from(row);
    let m = -Infinity;
    for (const v of row) m = Math.max(m, v);
    let z = 0;
    for (const v of row) z += Math.exp(v - m);
    const lz = m + Math.log(z);
    return Float64Array.from(row, (v) => v - lz);
  };
  let maxAbs = 0, at = 0, top1 = 0;
  for (let t = 0; t < T; t++) {
    const x = lsm(a, t), y = lsm(b, t);
    let ax = 0, ay = 0;
    for (let i = 0; i < V; i++) {
      if (x[i]! > x[ax]!) ax = i;
      if (y[i]! > y[ay]!) ay = i;
      // Probabilities that underflow in the reference (-Inf) carry no information.
      if (Number.isFinite(y[i]!) && Math.abs(x[i]! - y[i]!) > maxAbs) { maxAbs = Math.abs(x[i]! - y[i]!); at = t; }
    }
    if (ax === ay) top1++;
  }
  return { maxAbs, at, top1 };
}
