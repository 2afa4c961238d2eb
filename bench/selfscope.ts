// Child process: selfscope on the bench model.
//  - default: the cpu device, i.e. the engine the CLI and Model.load use (src/engine/cpu: our Wasm SIMD
//    kernels on N threads of its own);
//  - --jax: the jax-js engine on its Wasm backend (the previous engine, for reference). With
//    N > 1 the orchestrator starts it with `--import worker-shim.js` so jax-js runs kernels on a
//    pool of N worker threads.
//
//   node dist/bench/selfscope.js --threads N --out FILE [--quick] [--profile]
//   node [--import dist/bench/worker-shim.js] dist/bench/selfscope.js --jax --threads N --out FILE [--quick] [--profile]
//
// --profile records where the time goes for one prefill and a few decode steps instead of the
// throughput runs: with the cpu engine, matrix products vs the rest; with --jax, jax-js's
// per-kernel trace (1 thread only).
import fs from "node:fs";
import os from "node:os";
import { profiler } from "@jax-js/jax";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import { CpuRuntime } from "../src/engine/cpu/runtime.js";
import { Engine, type GenerateOptions } from "../src/engine/jax/engine.js";
import type { InferenceEngine } from "../src/model/model.js";
import { loadHostModel } from "../src/model/load.js";
import { initDevice } from "../src/engine/device.js";
import type { Intervention, Plan } from "../src/hooks/plan.js";
import type { HookName } from "../src/hooks/names.js";
import {
  DECODE_BYTES_PER_STEP,
  MODEL,
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
const S = shapes(args.quick);
const N = args.threads;
const say = (m: string) => log(`selfscope t${N}`, m);

const useJax = args.flags.has("--jax");
/** --core-only: load, prefill and batch-1 decode only (the quantized-model runs of run.ts). */
const coreOnly = args.flags.has("--core-only");
const pool = typeof (globalThis as { Worker?: unknown }).Worker !== "undefined";
const poolSize = (globalThis as { navigator?: { hardwareConcurrency?: number } }).navigator?.hardwareConcurrency;
if (useJax && N > 1 && !(pool && poolSize === N)) throw new Error(`the jax-js engine with ${N} threads needs the worker shim (node --import dist/bench/worker-shim.js, SELFSCOPE_WASM_THREADS=${N})`);
if (useJax && N === 1 && pool) throw new Error("the jax-js engine with 1 thread runs kernels on the main thread: start it without the worker shim");

const loadBefore = loadInfo();
const rss = new RssSampler();
const t0 = performance.now();
let engine: InferenceEngine;
let runtime: CpuRuntime | null = null;
if (useJax) {
  await initDevice("wasm");
  const host = loadHostModel(MODEL_PATH);
  engine = new Engine(host);
  host.weights.clear(); // the engine keeps what it needs (the embedding table stays on the host)
} else {
  // What Model.load does for the cpu device: lazy weights, copied one tensor at a time.
  runtime = await CpuRuntime.create({ threads: N });
  // SELFSCOPE_BENCH_WEIGHTS=native: Q8_0 / Q4_K matrices kept quantized (Model.load's default for such files); native-int8: and int8 activations in Q4_K decode products.
  const w = process.env.SELFSCOPE_BENCH_WEIGHTS;
  engine = new CpuEngine(loadHostModel(MODEL_PATH, undefined, { lazy: true }), runtime, w === "native" || w === "native-int8" ? w : "f32");
}
// One tiny call so that every weight upload has completed before anything is timed.
await engine.forward([[300]], { logits: "last" });
const loadMs = performance.now() - t0;
const phases: Record<string, number> = { load: rss.takePeak() };
say(`loaded in ${loadMs.toFixed(0)} ms (${engineInfo()})`);

function engineInfo(): string {
  if (runtime) return `selfscope cpu engine (src/engine/cpu), ${runtime.simd}, ${runtime.threads} thread(s), f32, node ${process.version}`;
  const jaxEntry = import.meta.resolve("@jax-js/jax");
  const jaxVersion = (JSON.parse(fs.readFileSync(new URL("../package.json", jaxEntry), "utf8")) as { version: string }).version;
  const jaxWhere = jaxEntry.includes("/node_modules/@jax-js/jax/") ? "" : ` from ${new URL("..", jaxEntry).pathname}`;
  return `selfscope jax-js Engine on @jax-js/jax ${jaxVersion}${jaxWhere}, wasm backend, ${pool ? `${poolSize} worker threads (worker shim)` : "main thread"}, f32, node ${process.version}`;
}

// Per-step timestamps: generate() calls onStep when each step's logits reach the host (once for
// the prompt, then once per token), the same per-token timing as llama.cpp's token stream.
let stamps: number[] = [];

/** Runs generate and returns the per-decode-step times (ms) and the tokens. */
async function timedGenerate(rows: number[][], opts: GenerateOptions): Promise<{ steps: number[]; tokens: number[][]; prefillMs: number; totalMs: number }> {
  stamps = [];
  const t = performance.now();
  const res = await engine.generate(rows, { stop: [], ...opts, onStep: () => void stamps.push(performance.now()) });
  const totalMs = performance.now() - t;
  const steps: number[] = [];
  for (let k = 1; k < stamps.length; k++) steps.push(stamps[k]! - stamps[k - 1]!);
  return { steps, tokens: res.tokens, prefillMs: (stamps[0] ?? t) - t, totalMs };
}

const D = MODEL.dModel;
function vector(seed: number, norm: number): Float32Array {
  const v = new Float32Array(D);
  let s = seed * 2654435761 + 1;
  let n2 = 0;
  for (let i = 0; i < D; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    v[i] = s / 4294967296 - 0.5;
    n2 += v[i]! * v[i]!;
  }
  const k = norm / Math.sqrt(n2);
  return v.map((x) => x * k);
}

const at = (l: number, site: string) => `blocks.${l}.${site}` as HookName;
const hookPlans = (fromPos: number): Record<string, Plan> => ({
  none: [],
  steer: [{ op: "add", at: at(6, "hook_resid_post"), vector: vector(1, 8), pos: { from: fromPos } }],
  project: Array.from({ length: MODEL.nLayers }, (_, l) =>
    (["hook_resid_pre", "hook_attn_out", "hook_mlp_out"] as const).map((s): Intervention => ({ op: "project", at: at(l, s), direction: vector(2, 1) })),
  ).flat(),
  read: Array.from({ length: MODEL.nLayers }, (_, l): Intervention => ({ op: "read", at: at(l, "hook_resid_post") })),
});

if (args.flags.has("--profile")) {
  await (runtime ? profileCpu(runtime) : profile());
  process.exit(0);
}

// ---------------------------------------------------------------- prefill
const prompt = promptIds(S.prefillTokens);
async function timeForward(plan: Plan): Promise<number> {
  const t = performance.now();
  await engine.forward([prompt], { logits: "last", plan });
  return performance.now() - t;
}
const prefill = await (async () => {
  const first = await timeForward([]);
  const ms: number[] = [];
  for (let r = 0; r < S.prefillReps; r++) ms.push(await timeForward([]));
  const m = median(ms);
  return { tokens: S.prefillTokens, msMedian: round(m), msAll: ms.map((x) => round(x, 1)), tokPerS: round((S.prefillTokens / m) * 1000, 1), gflops: round(forwardFlops(0, S.prefillTokens, 1) / m / 1e6, 2), firstCallMs: round(first, 1) };
})();
// The same prompt through generate()'s KV-cache path (chunked prefill into the cache), to first token.
const prefillCache = await (async () => {
  await timedGenerate([prompt], { maxTokens: 1 });
  const ms: number[] = [];
  for (let r = 0; r < Math.max(3, S.prefillReps >> 1); r++) ms.push((await timedGenerate([prompt], { maxTokens: 1 })).prefillMs);
  const m = median(ms);
  return { msMedian: round(m), tokPerS: round((S.prefillTokens / m) * 1000, 1) };
})();
phases.prefill = rss.takePeak();
if (args.flags.has("--prefill-only")) {
  // One of the orchestrator's alternating prefill rounds (see run.ts).
  writeJson(args.out, { prefill, cpuS: cpuSeconds() });
  process.exit(0);
}
say(`prefill ${prefill.tokPerS} tok/s (${prefill.msMedian} ms; first call ${prefill.firstCallMs} ms); through the KV cache ${prefillCache.tokPerS} tok/s`);

// ---------------------------------------------------------------- decode
const decode = {} as EngineResult["decode"];
let greedy: number[] = [];
for (const B of coreOnly ? ([1] as const) : ([1, 8] as const)) {
  const rows = Array.from({ length: B }, () => promptIds(S.decodePrompt));
  // Warm-up: the same KV capacity bucket as the timed runs, so the same compiled shapes.
  const warm = await timedGenerate(rows, { maxTokens: 4 });
  const steps: number[] = [];
  for (let r = 0; r < S.decodeReps; r++) {
    const g = await timedGenerate(rows, { maxTokens: S.decodeNew });
    steps.push(...g.steps);
    if (B === 1 && r === 0) greedy = g.tokens[0]!;
  }
  const m = median(steps);
  decode[`b${B}`] = { batch: B, prompt: S.decodePrompt, newTokens: S.decodeNew, msPerStepMedian: round(m, 3), tokPerS: round((B / m) * 1000, 1), firstStepMs: round(warm.steps[0] ?? NaN, 1) };
  say(`decode B=${B}: ${decode[`b${B}`].tokPerS} tok/s (${decode[`b${B}`].msPerStepMedian} ms/step)`);
}
phases.decode = rss.takePeak();

// ---------------------------------------------------------------- sweep: batched injection trials
const sweepBatch = Number(process.env.SELFSCOPE_BENCH_SWEEP_BATCH ?? S.sweepTrials);
const skippedSweep = { trials: 0, newTokens: 0, prompt: 0, batch: 0, method: "skipped (--core-only)", totalS: 0, warmupS: 0, trialsPerS: 0, tokensPerS: 0 };
const sweep = coreOnly ? skippedSweep : await (async () => {
  const p = promptIds(S.sweepPrompt, 1);
  const run = async (maxTokens = S.sweepNew) => {
    const t = performance.now();
    for (let start = 0; start < S.sweepTrials; start += sweepBatch) {
      const n = Math.min(sweepBatch, S.sweepTrials - start);
      const rows = Array.from({ length: n }, () => p);
      const plan: Intervention[] = rows.map((_, b) => ({ op: "add", at: at(S.sweepLayer, "hook_resid_post"), vector: vector(100 + start + b, 8), pos: { from: S.sweepFromPos }, rows: [b] }));
      const res = await engine.generate(rows, { maxTokens, plan, stop: [] });
      if (res.tokens.some((t) => t.length !== maxTokens)) throw new Error("sweep: a trial stopped early");
    }
    return (performance.now() - t) / 1000;
  };
  const warm = await run(2); // compiles the same shapes (same KV capacity bucket)
  const times: number[] = [];
  for (let r = 0; r < S.sweepReps; r++) times.push(await run());
  const s = median(times);
  return {
    trials: S.sweepTrials,
    newTokens: S.sweepNew,
    prompt: S.sweepPrompt,
    batch: sweepBatch,
    method: `${Math.ceil(S.sweepTrials / sweepBatch)} generate() call(s) of ${sweepBatch} rows; row b carries its own add at blocks.${S.sweepLayer}.hook_resid_post from position ${S.sweepFromPos}`,
    totalS: round(s, 2),
    warmupS: round(warm, 2),
    trialsPerS: round(S.sweepTrials / s, 3),
    tokensPerS: round((S.sweepTrials * S.sweepNew) / s, 1),
  };
})();
phases.sweep = rss.takePeak();
say(`sweep ${sweep.trialsPerS} trials/s (${sweep.totalS} s for ${sweep.trials}, batch ${sweepBatch})`);

// ---------------------------------------------------------------- hook overhead (interleaved, medians)
const hooks = coreOnly ? {} : await (async () => {
  const pre = hookPlans(S.prefillTokens / 2);
  const dec = hookPlans(S.decodePrompt / 2);
  const names = Object.keys(pre);
  const p16 = promptIds(S.decodePrompt);
  const prefillMs: Record<string, number[]> = Object.fromEntries(names.map((n) => [n, []]));
  const stepMs: Record<string, number[]> = Object.fromEntries(names.map((n) => [n, []]));
  for (const n of names) {
    await timeForward(pre[n]!);
    await timedGenerate([p16], { maxTokens: 4, plan: dec[n]! });
  }
  // Round-robin, rotating the order each round. This machine's speed drifts by tens of percent
  // over seconds, so each plan is compared with the no-hook run of the same round (a paired
  // ratio) and the overhead is the median of those ratios, not a ratio of medians.
  const rounds = Math.max(S.hookPrefillReps, S.hookDecodeReps);
  const preRound: Record<string, number[]> = Object.fromEntries(names.map((n) => [n, []]));
  const decRound: Record<string, number[]> = Object.fromEntries(names.map((n) => [n, []]));
  for (let r = 0; r < rounds; r++) {
    const order = names.map((_, i) => names[(i + r) % names.length]!);
    for (const n of order) {
      if (r < S.hookPrefillReps) {
        const t = await timeForward(pre[n]!);
        prefillMs[n]!.push(t);
        preRound[n]![r] = t;
      }
      if (r < S.hookDecodeReps) {
        const steps = (await timedGenerate([p16], { maxTokens: S.hookDecodeNew, plan: dec[n]! })).steps;
        stepMs[n]!.push(...steps);
        decRound[n]![r] = median(steps);
      }
    }
  }
  const pairedOverhead = (per: Record<string, number[]>, n: string) => median(per[n]!.map((t, r) => t / per.none![r]!)) - 1;
  const out: Record<string, { prefillMs: number; decodeStepMs: number; prefillOverhead: number; decodeOverhead: number }> = {};
  for (const n of names) {
    out[n] = {
      prefillMs: round(median(prefillMs[n]!), 1),
      decodeStepMs: round(median(stepMs[n]!), 2),
      prefillOverhead: round(pairedOverhead(preRound, n), 4),
      decodeOverhead: round(pairedOverhead(decRound, n), 4),
    };
  }
  return out;
})();
phases.hooks = rss.takePeak();
for (const [n, h] of Object.entries(hooks)) say(`hooks ${n}: prefill ${h.prefillMs} ms (${(h.prefillOverhead * 100).toFixed(1)}%), decode ${h.decodeStepMs} ms/step (${(h.decodeOverhead * 100).toFixed(1)}%)`);

rss.stop();
const result: EngineResult & { prefillCachePath: typeof prefillCache; hooks: typeof hooks; decodeGBps: number; cpuS: number } = {
  engine: "selfscope",
  threads: N,
  info: engineInfo(),
  loadMs: round(loadMs, 0),
  prefill,
  prefillCachePath: prefillCache,
  decode,
  sweep,
  hooks,
  rss: { peakBytes: maxRssBytes(), phases },
  greedy,
  load: { before: loadBefore, after: loadInfo() },
  cpuS: cpuSeconds(),
  decodeGBps: round(DECODE_BYTES_PER_STEP / decode.b1.msPerStepMedian / 1e6, 2),
};
writeJson(args.out, result);
process.exit(0);

// ---------------------------------------------------------------- profile, cpu engine
/** Time inside the kernel runtime's matrix products vs everything else (host-side TypeScript). */
async function profileCpu(rt: CpuRuntime): Promise<void> {
  // Time spent in the runtime's linear layers (gemm), attention (attention tasks, or the
  // gemmBatch + host softmax path), the threaded row tasks (RMSNorm, gated activation), and
  // the rest (host work on the main thread); plus the main thread's idle wait at the end of
  // parallel dispatches (load imbalance).
  const acc = { gemm: 0, gemmN: 0, attn: 0, attnN: 0, rows: 0, rowsN: 0 };
  const timed = <A extends unknown[]>(f: (...a: A) => void, ms: "gemm" | "attn" | "rows", n: "gemmN" | "attnN" | "rowsN") => (...a: A) => {
    const t = performance.now();
    f(...a);
    acc[ms] += performance.now() - t;
    acc[n]++;
  };
  rt.gemm = timed(rt.gemm.bind(rt), "gemm", "gemmN");
  rt.gemmBatch = timed(rt.gemmBatch.bind(rt), "attn", "attnN");
  rt.attention = timed(rt.attention.bind(rt), "attn", "attnN");
  rt.gatedRows = timed(rt.gatedRows.bind(rt), "rows", "rowsN");
  rt.rmsnormRows = timed(rt.rmsnormRows.bind(rt), "rows", "rowsN");
  const measure = async (f: () => Promise<number>) => {
    Object.assign(acc, { gemm: 0, gemmN: 0, attn: 0, attnN: 0, rows: 0, rowsN: 0 });
    const wait0 = rt.stats.waitMs;
    const t = performance.now();
    const steps = await f();
    const wall = performance.now() - t;
    return {
      wallMs: round(wall, 1),
      linearMs: round(acc.gemm, 1),
      attentionMs: round(acc.attn, 1),
      rowTasksMs: round(acc.rows, 1),
      otherMs: round(wall - acc.gemm - acc.attn - acc.rows, 1),
      imbalanceWaitMs: round(rt.stats.waitMs - wait0, 1),
      linearCalls: acc.gemmN,
      attentionCalls: acc.attnN,
      steps,
      perStepMs: round(wall / steps, 2),
    };
  };
  const prompt = promptIds(S.prefillTokens);
  await engine.forward([prompt], { logits: "last" });
  const prefill = await measure(async () => (await engine.forward([prompt], { logits: "last" }), 1));
  say(`profile prefill: ${JSON.stringify(prefill)}`);
  const decode: Record<string, unknown> = {};
  for (const B of [1, 8, 64]) {
    const rows = Array.from({ length: B }, () => promptIds(S.decodePrompt));
    await timedGenerate(rows, { maxTokens: 9 });
    // Decode steps only: from the first token's logits to the last.
    let first = 0;
    const r = await measure(async () => {
      const g = await timedGenerate(rows, { maxTokens: 9 });
      first = g.prefillMs;
      return g.steps.length;
    });
    decode[`b${B}`] = { ...r, note: `includes the ${round(first, 1)} ms prompt` };
    say(`profile decode B=${B}: ${JSON.stringify(decode[`b${B}`])}`);
  }
  writeJson(args.out, { engine: "selfscope", threads: rt.threads, prefill, decode, cpus: os.availableParallelism(), cpuS: cpuSeconds() });
}

// ---------------------------------------------------------------- profile, jax-js (1 thread)
async function profile(): Promise<void> {
  if (pool) throw new Error("--profile needs kernels on the main thread (no worker shim): with the pool a trace only times the enqueue");
  const prompt = promptIds(S.prefillTokens);
  const traced = async (f: () => Promise<void>) => {
    performance.clearMeasures();
    profiler.startTrace();
    const t = performance.now();
    await f();
    const wall = performance.now() - t;
    profiler.stopTrace();
    const ms = (performance.getEntriesByType("measure") as PerformanceMeasure[]).map((m) => ({ start: m.startTime, dur: m.duration, name: m.name, props: Object.fromEntries(((m.detail as { devtools?: { properties?: [string, string][] } })?.devtools?.properties ?? []) as [string, string][]) }));
    return { wall, ms };
  };
  const summarise = (ms: { dur: number; name: string; props: Record<string, string> }[], wall: number, steps: number) => {
    const cats = new Map<string, number>();
    const top = new Map<string, { n: number; ms: number }>();
    for (const m of ms) {
      const red = m.props.reduction;
      const redSize = red ? Number(red.split(":")[1]) : 0;
      const cat = !m.name.startsWith("Kernel")
        ? `routine ${m.name}`
        : redSize === MODEL.dModel || redSize === MODEL.dMlp || redSize === MODEL.nHeads * MODEL.dHead
          ? "matmul (linear layers, unembedding)"
          : redSize === MODEL.dHead
            ? "reductions of length 64 (q·k; in decode also softmax and p·v over the 64-slot cache)"
            : red
              ? "other reductions (softmax, norms, p·v over keys)"
              : "elementwise (rope, KV-cache where, residual, silu, masks)";
      cats.set(cat, (cats.get(cat) ?? 0) + m.dur);
      const key = `${m.name} ${red ?? ""} ${(m.props.exp ?? m.props.inputShapes ?? "").slice(0, 90)}`;
      const a = top.get(key) ?? { n: 0, ms: 0 };
      a.n++;
      a.ms += m.dur;
      top.set(key, a);
    }
    const kernelMs = ms.reduce((s, m) => s + m.dur, 0);
    return {
      wallMs: round(wall, 1),
      kernelMs: round(kernelMs, 1),
      outsideKernelsMs: round(wall - kernelMs, 1),
      kernels: ms.length,
      kernelsPerStep: round(ms.length / steps, 1),
      categories: Object.fromEntries([...cats.entries()].sort((a, b) => b[1] - a[1]).map(([k, v]) => [k, { ms: round(v, 1), share: round(v / wall, 3) }])),
      top: [...top.entries()].sort((a, b) => b[1].ms - a[1].ms).slice(0, 10).map(([k, v]) => ({ kernel: k, n: v.n, ms: round(v.ms, 1) })),
    };
  };
  await engine.forward([prompt], { logits: "last" });
  const pf = await traced(async () => void (await engine.forward([prompt], { logits: "last" })));
  const prefillProfile = summarise(pf.ms, pf.wall, 1);
  say(`profile prefill: wall ${prefillProfile.wallMs} ms, kernels ${prefillProfile.kernelMs} ms in ${prefillProfile.kernels}`);
  const decodeProfiles: Record<string, ReturnType<typeof summarise>> = {};
  for (const B of [1, 8]) {
    const rows = Array.from({ length: B }, () => promptIds(S.decodePrompt));
    const n = 9;
    await timedGenerate(rows, { maxTokens: n });
    let steps: number[] = [];
    const tr = await traced(async () => void (steps = (await timedGenerate(rows, { maxTokens: n })).steps));
    const startDecode = stamps[0]!;
    const dms = tr.ms.filter((m) => m.start >= startDecode);
    decodeProfiles[`b${B}`] = summarise(dms, steps.reduce((a, b) => a + b, 0), steps.length);
    say(`profile decode B=${B}: ${decodeProfiles[`b${B}`]!.wallMs / steps.length} ms/step wall, ${decodeProfiles[`b${B}`]!.kernelsPerStep} kernels/step`);
  }
  // Instantiating a kernel's WebAssembly module: jax-js's main-thread path does it on every dispatch.
  const instMs = (() => {
    const bytes = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 4, 1, 96, 0, 0, 2, 15, 1, 3, 101, 110, 118, 6, 109, 101, 109, 111, 114, 121, 2, 0, 1, 3, 2, 1, 0, 7, 10, 1, 6, 107, 101, 114, 110, 101, 108, 0, 0, 10, 4, 1, 2, 0, 11]);
    const mod = new WebAssembly.Module(bytes);
    const memory = new WebAssembly.Memory({ initial: 1 });
    const n = 2000;
    const t = performance.now();
    for (let i = 0; i < n; i++) (new WebAssembly.Instance(mod, { env: { memory } }).exports.kernel as () => void)();
    return ((performance.now() - t) / n) * 1000;
  })();
  writeJson(args.out, { engine: "selfscope", threads: 1, prefill: prefillProfile, decode: decodeProfiles, wasmInstantiateUs: round(instMs, 2), cpus: os.availableParallelism(), cpuS: cpuSeconds() });
}
