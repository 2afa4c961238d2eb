// llama.cpp as a parity oracle (through node-llama-cpp's prebuilt CPU binaries): raw logits after
// every position, and greedy continuations. Backs the tests and `selfscope check --model X.gguf`.
//
// node-llama-cpp is an optional dependency, imported only when a function here is called, so the
// package works without it. Settings that matter for parity (engine-study "llama.cpp parity"):
// F32 KV cache (the default F16 cache alone is off by ~2e-2), no flash attention, CPU only, and
// never build or download anything.
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
  /** Row-major [T, vocab]: row t holds the next-token logits after ids[0..t]. */
  logits: Float32Array;
  vocab: number;
  /** llama.cpp release, build and settings, for reports. */
  info: string;
}

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

/** Loads llama.cpp (CPU prebuilt only) and the model, runs fn, and disposes everything. */
async function withModel<R>(
  modelPath: string,
  contextSize: number,
  opts: LlamaCppOptions,
  fn: (m: { lib: NodeLlamaCpp; llama: Llama; model: LlamaModel; context: LlamaContext; info: string }) => Promise<R>,
): Promise<R> {
  const threads = opts.threads ?? os.availableParallelism();
  if (!Number.isInteger(threads) || threads < 1) throw new UsageError(`llama.cpp threads = ${threads} is not a positive integer`);
  const lib = await importNodeLlamaCpp();
  const quiet = (level: import("node-llama-cpp").LlamaLogLevel, message: string): void => {
    // Only problems, and on stderr: stdout may carry a command's machine-readable output.
    if (level === lib.LlamaLogLevel.error || level === lib.LlamaLogLevel.fatal || level === lib.LlamaLogLevel.warn) {
      process.stderr.write(`[llama.cpp ${level}] ${message.endsWith("\n") ? message : message + "\n"}`);
    }
  };
  let llama: Llama;
  try {
    llama = await lib.getLlama({
      gpu: false,
      build: "never",
      usePrebuiltBinaries: true,
      skipDownload: true,
      progressLogs: false,
      logLevel: lib.LlamaLogLevel.warn,
      logger: quiet,
      maxThreads: threads,
    });
  } catch (e) {
    throw new UsageError(
      `node-llama-cpp could not load its prebuilt CPU binary (${e instanceof Error ? e.message : String(e)}); ` +
        "selfscope never builds or downloads llama.cpp: reinstall node-llama-cpp so that its platform package (e.g. @node-llama-cpp/linux-x64) is present",
      { cause: e },
    );
  }
  let model: LlamaModel | undefined;
  let context: LlamaContext | undefined;
  try {
    model = await llama.loadModel({ modelPath, gpuLayers: 0 });
    context = await model.createContext({
      contextSize,
      batchSize: contextSize,
      sequences: 1,
      flashAttention: false,
      experimentalKvCacheKeyType: "F32",
      experimentalKvCacheValueType: "F32",
      threads,
    });
    const rel = llama.llamaCppRelease;
    const info =
      `llama.cpp ${rel.release} (${llama.buildType} ${rel.repo}), cpu, ${context.currentThreads} threads, ` +
      `KV cache F32, flash attention off, context ${context.contextSize}, batch ${context.batchSize}`;
    return await fn({ lib, llama, model, context, info });
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

/** The vocabulary size llama.cpp reports through the GGUF metadata (undefined if the file has no vocab). */
function metadataVocab(model: LlamaModel): number | undefined {
  const n = (model.fileInfo.metadata as { tokenizer?: { ggml?: { tokens?: readonly unknown[] } } }).tokenizer?.ggml?.tokens?.length;
  return typeof n === "number" ? n : undefined;
}

/**
 * Raw next-token logits from llama.cpp after every position of `ids` (one sequence, one batch).
 * node-llama-cpp returns each position as a Map token -> logit (sorted by logit); this checks that
 * every map holds exactly the tokens 0..vocab-1 and packs them densely.
 */
export async function llamaCppLogits(modelPath: string, ids: number[], opts: LlamaCppOptions = {}): Promise<LlamaCppLogits> {
  checkIds(ids, "llamaCppLogits");
  const T = ids.length;
  return withModel(modelPath, T, opts, async ({ model, context, info }) => {
    const seq = context.getSequence();
    try {
      // temperature 0 (the default) puts only llama.cpp's greedy sampler in the chain, which does
      // not alter the candidates, so the returned logits are llama_get_logits_ith() verbatim.
      const input: EvalItem[] = ids.map((t) => [t as Token, { generateNext: { logits: true, options: { temperature: 0 } } }]);
      const res = await seq.controlledEvaluate(input);
      const first = res[0]?.next.logits;
      if (!first) throw new Error("llama.cpp returned no logits for position 0");
      const vocab = first.size;
      const meta = metadataVocab(model);
      if (meta !== undefined && meta !== vocab) {
        throw new Error(`llama.cpp returned ${vocab} logits per position but the GGUF vocabulary has ${meta} tokens`);
      }
      const out = new Float32Array(T * vocab).fill(NaN);
      for (let t = 0; t < T; t++) {
        const m = res[t]?.next.logits;
        if (!m) throw new Error(`llama.cpp returned no logits for position ${t}`);
        if (m.size !== vocab) throw new Error(`llama.cpp returned ${m.size} logits at position ${t}, expected ${vocab}`);
        const row = out.subarray(t * vocab, (t + 1) * vocab);
        for (const [tok, v] of m) {
          if (!Number.isInteger(tok) || tok < 0 || tok >= vocab) throw new Error(`llama.cpp returned a logit for token ${tok} outside [0, ${vocab}) at position ${t}`);
          if (!Number.isNaN(row[tok]!)) throw new Error(`llama.cpp returned token ${tok} twice at position ${t}`);
          if (Number.isNaN(v)) throw new Error(`llama.cpp returned NaN for token ${tok} at position ${t}`);
          row[tok] = v;
        }
      }
      // size === vocab, all keys distinct and in range, so every slot was written; check anyway.
      const hole = out.findIndex((v) => Number.isNaN(v));
      if (hole >= 0) throw new Error(`llama.cpp logits incomplete: position ${Math.floor(hole / vocab)}, token ${hole % vocab} missing`);
      return { logits: out, vocab, info };
    } finally {
      seq.dispose();
    }
  });
}

/** n greedy (argmax) tokens after `ids`, chosen by llama.cpp's own greedy sampler with its KV cache. */
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
