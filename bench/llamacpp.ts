// Child process: llama.cpp (node-llama-cpp's prebuilt CPU binary) on the bench model, with F32
// weights, an F32 KV cache, flash attention off and an explicit thread count (node-llama-cpp's
// own default counts the host's cores and oversubscribes a CPU-limited container).
//
//   node dist/bench/llamacpp.js --threads N --out FILE [--quick]
import path from "node:path";
import { loadLlamaCpu } from "../src/reference/llamacpp.js";
import type { Llama, LlamaContext, LlamaContextSequence, LlamaModel, Token } from "node-llama-cpp";
import {
  DECODE_BYTES_PER_STEP,
  MODEL_PATH,
  RssSampler,
  forwardFlops,
  loadInfo,
  log,
  maxRssBytes,
  median,
  parseChildArgs,
  promptIds,
  round,
  cpuSeconds,
  shapes,
  writeJson,
  type EngineResult,
} from "./common.js";

const args = parseChildArgs(process.argv.slice(2));
/** --core-only: load, prefill and batch-1 decode only (the quantized-model runs of run.ts). */
const coreOnly = args.flags.has("--core-only");
const S = shapes(args.quick);
const N = args.threads;
const say = (m: string) => log(`llama.cpp t${N}`, m);
const toks = (ids: number[]) => ids as Token[];

const lib = await import("node-llama-cpp");
const loadBefore = loadInfo();
const rss = new RssSampler();
const t0 = performance.now();
const llama: Llama = await loadLlamaCpu(N);
const model: LlamaModel = await llama.loadModel({ modelPath: MODEL_PATH, gpuLayers: 0, useMmap: false });
const loadMs = performance.now() - t0;
const phases: Record<string, number> = { load: rss.takePeak() };
say(`loaded in ${loadMs.toFixed(0)} ms`);

async function context(contextSize: number, sequences: number, batchSize: number, threads = N): Promise<LlamaContext> {
  return model.createContext({
    contextSize,
    sequences,
    batchSize,
    threads: { ideal: threads, min: threads },
    flashAttention: false,
    experimentalKvCacheKeyType: "F32",
    experimentalKvCacheValueType: "F32",
  });
}

// ---------------------------------------------------------------- prefill (B=1, 128 tokens)
const prompt = promptIds(S.prefillTokens);
let info = "";
const prefill = await (async () => {
  const ctx = await context(512, 1, 512);
  const rel = llama.llamaCppRelease;
  info = `node-llama-cpp ${await lib.getModuleVersion()}, llama.cpp ${rel.release} (${llama.buildType}), cpu, ${ctx.currentThreads} threads, weights of ${path.basename(MODEL_PATH)}, KV cache F32, flash attention off, no mmap`;
  const ms: number[] = [];
  for (let r = 0; r < S.prefillReps + 1; r++) {
    const seq = ctx.getSequence();
    const t = performance.now();
    await seq.evaluateWithoutGeneratingNewTokens(toks(prompt));
    ms.push(performance.now() - t);
    seq.dispose();
  }
  await ctx.dispose();
  const first = ms.shift()!;
  const m = median(ms);
  return { tokens: S.prefillTokens, msMedian: round(m), msAll: ms.map((x) => round(x, 1)), tokPerS: round((S.prefillTokens / m) * 1000, 1), gflops: round(forwardFlops(0, S.prefillTokens, 0) / m / 1e6, 2), firstCallMs: round(first, 1) };
})();
phases.prefill = rss.takePeak();
say(`prefill ${prefill.tokPerS} tok/s (${prefill.msMedian} ms)`);
if (args.flags.has("--prefill-only")) {
  // One of the orchestrator's alternating prefill rounds (see run.ts).
  writeJson(args.out, { prefill, cpuS: cpuSeconds() });
  process.exit(0);
}

// ---------------------------------------------------------------- decode (B=1 and B=8)
/** Generates `n` greedy tokens per sequence concurrently; returns per-row tokens and the time each step completed for every row. */
async function decodeRun(seqs: LlamaContextSequence[], p: number[], n: number): Promise<{ tokens: number[][]; stepEnds: number[] }> {
  const stamps: number[][] = seqs.map(() => []);
  const tokens: number[][] = seqs.map(() => []);
  await Promise.all(
    seqs.map(async (seq, b) => {
      for await (const tok of seq.evaluate(toks(p), { temperature: 0, yieldEogToken: true })) {
        stamps[b]!.push(performance.now());
        tokens[b]!.push(tok);
        if (tokens[b]!.length >= n) break;
      }
    }),
  );
  for (const s of seqs) await s.clearHistory();
  const stepEnds = stamps[0]!.map((_, k) => Math.max(...stamps.map((s) => s[k] ?? Infinity)));
  return { tokens, stepEnds };
}

const decode = {} as EngineResult["decode"];
let greedy: number[] = [];
for (const B of coreOnly ? ([1] as const) : ([1, 8] as const)) {
  const ctx = await context(128 * B, B, 512);
  const seqs = Array.from({ length: B }, () => ctx.getSequence());
  const p = promptIds(S.decodePrompt);
  await decodeRun(seqs, p, 4); // warm-up
  const steps: number[] = [];
  for (let r = 0; r < S.decodeReps; r++) {
    const { tokens, stepEnds } = await decodeRun(seqs, p, S.decodeNew);
    for (let k = 1; k < stepEnds.length; k++) steps.push(stepEnds[k]! - stepEnds[k - 1]!);
    if (B === 1 && r === 0) greedy = tokens[0]!;
  }
  for (const s of seqs) s.dispose();
  await ctx.dispose();
  const m = median(steps);
  decode[`b${B}`] = { batch: B, prompt: S.decodePrompt, newTokens: S.decodeNew, msPerStepMedian: round(m, 3), tokPerS: round((B / m) * 1000, 1) };
  say(`decode B=${B}: ${decode[`b${B}`].tokPerS} tok/s (${decode[`b${B}`].msPerStepMedian} ms/step)`);
}
phases.decode = rss.takePeak();

// ---------------------------------------------------------------- sweep: sequential trials, no steering
// node-llama-cpp exposes llama.cpp's control vectors only through the C API, not from JS, so the
// trials run without the injection: an upper bound for what steered trials could reach here.
const skippedSweep = { trials: 0, newTokens: 0, prompt: 0, method: "skipped (--core-only)", totalS: 0, trialsPerS: 0, tokensPerS: 0 };
const sweep = coreOnly ? skippedSweep : await (async () => {
  const ctx = await context(S.sweepPrompt + S.sweepNew + 16, 1, 512);
  const p = promptIds(S.sweepPrompt, 1);
  const seq = ctx.getSequence();
  const gen = async () => {
    let n = 0;
    for await (const _tok of seq.evaluate(toks(p), { temperature: 0, yieldEogToken: true })) if (++n >= S.sweepNew) break;
    await seq.clearHistory();
  };
  await gen(); // warm-up
  const times: number[] = [];
  let timed = 0;
  for (let r = 0; r < S.sweepReps; r++) {
    const t = performance.now();
    let i = 0;
    // Quick runs stop after llamaSweepTrials or sweepCapS seconds (at least 2 trials): the trials
    // are identical and sequential, so the rate of those timed is the rate of all 64.
    while (i < S.llamaSweepTrials && (i < 2 || performance.now() - t < S.sweepCapS * 1000)) {
      await gen();
      i++;
    }
    timed = i;
    times.push(((performance.now() - t) / 1000) * (S.sweepTrials / i));
  }
  seq.dispose();
  await ctx.dispose();
  const s = median(times);
  return {
    trials: S.sweepTrials,
    newTokens: S.sweepNew,
    prompt: S.sweepPrompt,
    method:
      "sequential generations, one sequence, KV history cleared between trials, no steering (node-llama-cpp has no control-vector API in JS)" +
      (timed < S.sweepTrials ? `; ${timed} of the ${S.sweepTrials} trials timed and scaled (identical sequential trials)` : ""),
    totalS: round(s, 2),
    trialsPerS: round(S.sweepTrials / s, 3),
    tokensPerS: round((S.sweepTrials * S.sweepNew) / s, 1),
  };
})();
phases.sweep = rss.takePeak();
say(`sweep ${sweep.trialsPerS} trials/s (${sweep.totalS} s for ${sweep.trials})`);

// ---------------------------------------------------------------- GEMM proxy for the machine's compute limit
// Single batches of 128..512 tokens: ~90% of their FLOPs are F32 matmuls in ggml (AVX-512 on
// this CPU), so the best FLOP rate among them is a lower bound of what native code reaches here,
// at 1 thread and at N threads. (Larger batches are not always faster: ggml's non-flash attention
// over an F32 cache grows with T², so the best size is found by trying several.)
const gemm: Record<string, { tokens: number; ms: number; gflops: number; tried: Record<string, number> }> = {};
for (const th of coreOnly ? [] : [...new Set([1, N])]) {
  const tried: Record<string, number> = {};
  for (const T of S.gemmTokens) {
    const ctx = await context(T, 1, T, th);
    const ids = promptIds(T, 2);
    const ms: number[] = [];
    for (let r = 0; r < (args.quick ? 2 : 4) + 1; r++) {
      const seq = ctx.getSequence();
      const t = performance.now();
      await seq.evaluateWithoutGeneratingNewTokens(toks(ids));
      ms.push(performance.now() - t);
      seq.dispose();
    }
    await ctx.dispose();
    ms.shift();
    tried[String(T)] = round(forwardFlops(0, T, 0) / Math.min(...ms) / 1e6, 1);
  }
  const bestT = Object.entries(tried).sort((a, b) => b[1] - a[1])[0]!;
  const g = { tokens: Number(bestT[0]), ms: round(forwardFlops(0, Number(bestT[0]), 0) / bestT[1] / 1e6, 1), gflops: bestT[1], tried };
  gemm[`t${th}`] = g;
  say(`single batches at ${th} thread(s): ${Object.entries(tried).map(([t, v]) => `${t} tok ${v}`).join(", ")} GFLOP/s`);
}
phases.gemm = rss.takePeak();

rss.stop();
await model.dispose();
await llama.dispose();
const result: EngineResult & { gemm: typeof gemm; decodeGBps: number; cpuS: number } = {
  engine: "llama.cpp",
  threads: N,
  info,
  loadMs: round(loadMs, 0),
  prefill,
  decode,
  sweep,
  rss: { peakBytes: maxRssBytes(), phases },
  greedy,
  load: { before: loadBefore, after: loadInfo() },
  cpuS: cpuSeconds(),
  gemm,
  decodeGBps: round((DECODE_BYTES_PER_STEP / decode.b1.msPerStepMedian) / 1e6, 2),
};
writeJson(args.out, result);
process.exit(0);
