// Shared by the bench orchestrator and its child processes: the model's shape and the FLOP/byte
// accounting, paths, statistics, RSS sampling and the result types. No jax-js and no
// node-llama-cpp here: importing this module must not initialise either engine.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

/** bench/ in the source tree (this file runs from dist/bench/). */
export const BENCH_DIR = path.resolve(fileURLToPath(new URL(".", import.meta.url)), "../../bench");
export const CACHE_DIR = path.join(BENCH_DIR, ".cache");
export const RESULTS_DIR = path.join(BENCH_DIR, "results");

/** GPT-2-small-sized Llama: the shape of the engine study's benchmark model. */
export const MODEL = {
  dModel: 768,
  nLayers: 12,
  nHeads: 12,
  nKvHeads: 4,
  dHead: 64,
  dMlp: 2048,
  dVocab: 32000,
  nCtx: 2048,
  eps: 1e-5,
  ropeTheta: 10000,
} as const;

/** Bump when the generated weights or vocabulary change (the cache file name carries it). */
export const MODEL_VERSION = 1;
export const MODEL_SEED = 20261123;
export const F32_MODEL_PATH = path.join(CACHE_DIR, `bench768-f32-v${MODEL_VERSION}.gguf`);
/** The file the children run: the F32 bench model, or another (e.g. its Q8_0 copy, bench/q8.ts) via SELFSCOPE_BENCH_MODEL. */
export const MODEL_PATH = process.env.SELFSCOPE_BENCH_MODEL ?? F32_MODEL_PATH;

/** Parameters of the weight matrices of one block (norm vectors excluded). */
export function matmulParamsPerLayer(): number {
  const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F } = MODEL;
  return D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F;
}

export const PARAMS = (() => {
  const { dModel: D, nLayers: L, dVocab: V } = MODEL;
  const blocks = L * (matmulParamsPerLayer() + 2 * D);
  const embed = V * D;
  const unembed = V * D;
  const finalNorm = D;
  return { blocks, embed, unembed, finalNorm, total: blocks + embed + unembed + finalNorm, nonEmbed: blocks + unembed + finalNorm };
})();

/** Every weight as F32, including the token embedding table (= the GGUF's tensor bytes). */
export const WEIGHT_BYTES = PARAMS.total * 4;
/** Weight bytes one decode step must read: all blocks, the final norm and the whole unembedding (one embedding row is negligible). */
export const DECODE_BYTES_PER_STEP = PARAMS.nonEmbed * 4;

/** Causal attention FLOPs (QKᵀ and PV) for query positions p0..p0+n-1 attending to 0..p. */
export function attnFlops(p0: number, n: number): number {
  const { nLayers: L, nHeads: H, dHead: hd } = MODEL;
  let keys = 0;
  for (let p = p0; p < p0 + n; p++) keys += p + 1;
  return 4 * L * H * hd * keys;
}

/**
 * FLOPs of a forward pass over n new tokens at positions p0.. with `logitRows` unembedded rows:
 * 2 per weight per token for the block matmuls, the same for the unembedding rows, plus attention.
 */
export function forwardFlops(p0: number, n: number, logitRows: number): number {
  const { nLayers: L, dModel: D, dVocab: V } = MODEL;
  return 2 * L * matmulParamsPerLayer() * n + 2 * V * D * logitRows + attnFlops(p0, n);
}

// ---------------------------------------------------------------- benchmark shapes

export interface Shapes {
  prefillTokens: number;
  decodePrompt: number;
  decodeNew: number;
  sweepTrials: number;
  sweepNew: number;
  sweepPrompt: number;
  sweepFromPos: number;
  /** Sequential llama.cpp trials actually timed (their rate is per trial; quick runs time fewer). */
  llamaSweepTrials: number;
  /** Wall-time cap (s) on those sequential trials. */
  sweepCapS: number;
  sweepLayer: number;
  /** Repetitions (medians are taken over them). */
  prefillReps: number;
  decodeReps: number;
  hookPrefillReps: number;
  hookDecodeReps: number;
  hookDecodeNew: number;
  sweepReps: number;
  /** Batch sizes tried for the native GEMM proxy (llama.cpp). */
  gemmTokens: number[];
}

export function shapes(quick: boolean): Shapes {
  return {
    prefillTokens: 128,
    decodePrompt: 16,
    decodeNew: 32,
    sweepTrials: 64,
    sweepNew: 48,
    sweepPrompt: 16,
    sweepFromPos: 8,
    llamaSweepTrials: quick ? 16 : 64,
    sweepCapS: quick ? 40 : Infinity,
    sweepLayer: 6,
    prefillReps: quick ? 11 : 21,
    decodeReps: quick ? 2 : 5,
    hookPrefillReps: quick ? 25 : 41,
    hookDecodeReps: quick ? 25 : 41,
    hookDecodeNew: 16,
    sweepReps: quick ? 1 : 3,
    gemmTokens: quick ? [128, 256, 512] : [64, 128, 256, 512],
  };
}

/** Deterministic pseudo-random token ids in the model's ordinary range (never a special token). */
export function promptIds(n: number, salt = 0): number[] {
  return Array.from({ length: n }, (_, i) => 300 + ((i + 1) * 7919 + salt * 104729) % (MODEL.dVocab - 400));
}

// ---------------------------------------------------------------- small helpers

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function round(x: number, digits = 2): number {
  if (!Number.isFinite(x)) return x;
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

export const MiB = 2 ** 20;

/**
 * This process's peak resident set. On Linux, VmHWM of /proc/self/status: getrusage's maxRSS (the
 * fallback elsewhere) carries over the parent's resident set at exec, so a child spawned by a large
 * bench runner would report the runner's peak instead of its own (seen: 614 MB for a 200 MB child).
 */
export function maxRssBytes(): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync("/proc/self/status", "utf8"));
    if (m) return Number(m[1]) * 1024;
  } catch {
    // not Linux
  }
  return process.resourceUsage().maxRSS * 1024;
}

/** The host's SIMD-related CPU flags (avx*, fma, sse4*, f16c, amx*; Linux), recorded with every result: speed ratios depend on them. */
export function cpuFlags(): string[] {
  try {
    const line = fs.readFileSync("/proc/cpuinfo", "utf8").split("\n").find((l) => l.startsWith("flags"));
    return line ? line.split(":")[1]!.trim().split(/\s+/).filter((f) => /^(avx|fma|sse4|f16c|amx)/.test(f)) : [];
  } catch {
    return [];
  }
}

/** CPU time of this process, all threads (user + system), in seconds. */
export function cpuSeconds(): number {
  const u = process.cpuUsage();
  return round((u.user + u.system) / 1e6, 2);
}

/** The 1-minute load average and the cores, to flag runs made on a busy machine. */
export function loadInfo(): { load1: number; cores: number } {
  return { load1: round(os.loadavg()[0]!, 2), cores: os.availableParallelism() };
}

/** Samples RSS every `ms` so each phase's peak can be attributed (maxRSS is process-lifetime). */
export class RssSampler {
  private peak = 0;
  private timer: NodeJS.Timeout;
  constructor(ms = 25) {
    this.timer = setInterval(() => this.sample(), ms);
    this.timer.unref();
  }
  sample(): void {
    this.peak = Math.max(this.peak, process.memoryUsage.rss());
  }
  private lastMax = maxRssBytes();
  /**
   * Peak since the last call, then reset to the current RSS. The timer cannot fire during long
   * synchronous work (loading, single-threaded kernels), so a rise of the process's maxRSS during
   * the phase also counts as this phase's peak.
   */
  takePeak(): number {
    this.sample();
    const m = maxRssBytes();
    const p = m > this.lastMax ? Math.max(this.peak, m) : this.peak;
    this.lastMax = m;
    this.peak = process.memoryUsage.rss();
    return p;
  }
  stop(): void {
    clearInterval(this.timer);
  }
}

export function log(who: string, msg: string): void {
  process.stderr.write(`[bench:${who}] ${msg}\n`);
}

/** Arguments shared by the children: --threads N --quick --out FILE. */
export interface ChildArgs {
  threads: number;
  quick: boolean;
  out: string;
  /** Extra flags, e.g. --profile-only. */
  flags: Set<string>;
}

export function parseChildArgs(argv: string[]): ChildArgs {
  let threads = os.availableParallelism();
  let out = "";
  const flags = new Set<string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--threads") threads = Number(argv[++i]);
    else if (a === "--out") out = argv[++i] ?? "";
    else if (a.startsWith("--")) flags.add(a);
  }
  if (!Number.isInteger(threads) || threads < 1) throw new Error(`--threads must be a positive integer, got ${threads}`);
  if (!out) throw new Error("--out FILE is required");
  return { threads, quick: flags.has("--quick"), out, flags };
}

export function writeJson(file: string, v: unknown): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(v, null, 1) + "\n");
  fs.renameSync(tmp, file);
}

// ---------------------------------------------------------------- result shapes

/** One engine's throughput numbers (same fields for selfscope and llama.cpp). */
export interface EngineResult {
  engine: string;
  threads: number;
  info: string;
  loadMs: number;
  prefill: { tokens: number; msMedian: number; msAll: number[]; tokPerS: number; gflops: number; firstCallMs: number };
  decode: Record<"b1" | "b8", { batch: number; prompt: number; newTokens: number; msPerStepMedian: number; tokPerS: number; firstStepMs?: number }>;
  sweep: { trials: number; newTokens: number; prompt: number; method: string; totalS: number; trialsPerS: number; tokensPerS: number; batch?: number };
  rss: { peakBytes: number; phases: Record<string, number> };
  /** The greedy continuation of the decode prompt (checks both engines run the same model). */
  greedy: number[];
  load: { before: { load1: number; cores: number }; after: { load1: number; cores: number } };
}
