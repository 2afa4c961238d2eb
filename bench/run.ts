// `npm run bench [-- --quick] [-- --threads N]`: selfscope and llama.cpp side by side on the same
// GGUF weights, at the same thread count, plus the machine's limits measured in the same run.
// Each engine runs in its own child process so its peak RSS is its own. Writes
// bench/results/<timestamp>.json and bench/results/latest.json, prints a table, and prints one
// JSON object with the headline ratios as the last line of stdout.
//
// Flags: --quick (the <10 min contract), --threads N (default os.availableParallelism()),
//        --no-profile, --no-llamacpp, --one-thread (also the 1-thread pair; default in full runs).
// Environment: SELFSCOPE_BENCH_JAX_DIR=<dir of a @jax-js/jax copy> runs selfscope on that copy
// (how the jax-js proposals in bench/proposals/ were measured; see bench/README.md).
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import {
  BENCH_DIR,
  DECODE_BYTES_PER_STEP,
  MODEL,
  MODEL_PATH,
  PARAMS,
  RESULTS_DIR,
  WEIGHT_BYTES,
  cpuFlags,
  log,
  matmulParamsPerLayer,
  median,
  round,
  shapes,
  writeJson,
  type EngineResult,
} from "./common.js";
import { ensureModel, ensureQuantModel } from "./model.js";

interface Args {
  quick: boolean;
  threads: number;
  profile: boolean;
  llamacpp: boolean;
  oneThread: boolean;
  /** Also run the jax-js engine (the previous engine), for reference. */
  jax: boolean;
  /** Run the large-model comparison instead (bench/large.ts); optionally only the named shapes. */
  large: boolean;
  only?: string[];
}

function parseArgs(argv: string[]): Args {
  const a: Args = { quick: false, threads: os.availableParallelism(), profile: true, llamacpp: true, oneThread: false, jax: false, large: false };
  let oneThread: boolean | undefined;
  for (let i = 0; i < argv.length; i++) {
    const x = argv[i]!;
    if (x === "--quick") a.quick = true;
    else if (x === "--threads") a.threads = Number(argv[++i]);
    else if (x.startsWith("--threads=")) a.threads = Number(x.slice(10));
    else if (x === "--no-profile") a.profile = false;
    else if (x === "--no-llamacpp") a.llamacpp = false;
    else if (x === "--one-thread") oneThread = true;
    else if (x === "--no-one-thread") oneThread = false;
    else if (x === "--jax") a.jax = true;
    else if (x === "--large") a.large = true;
    else if (x === "--only") a.only = (argv[++i] ?? "").split(",");
    else if (x === "--help" || x === "-h") {
      process.stdout.write("npm run bench -- [--quick] [--threads N] [--no-profile] [--no-llamacpp] [--one-thread|--no-one-thread] [--jax]\nnpm run bench -- --large [--threads N] [--only llama-3.2-1b,qwen2.5-3b,llama-3.1-8b,llama-3.2-1b-q8_0]\n");
      process.exit(0);
    } else throw new Error(`unknown flag ${x} (see --help)`);
  }
  if (!Number.isInteger(a.threads) || a.threads < 1) throw new Error(`--threads must be a positive integer, got ${a.threads}`);
  a.oneThread = (oneThread ?? !a.quick) && a.threads > 1;
  return a;
}

const here = path.dirname(fileURLToPath(import.meta.url));
const tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-bench-"));

/** Busy and total jiffies over all CPUs (Linux), to measure what other processes used meanwhile. */
function cpuTicks(): { busy: number; total: number } | null {
  try {
    const f = fs.readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
    const idle = f[3]! + (f[4] ?? 0);
    const total = f.reduce((x, y) => x + y, 0);
    return { busy: total - idle, total };
  } catch {
    return null;
  }
}

/** Cores busy with other processes over a 2 s window (this process sleeps meanwhile). */
async function backgroundCores(): Promise<number | null> {
  const a = cpuTicks();
  await new Promise((r) => setTimeout(r, 2000));
  const b = cpuTicks();
  if (!a || !b || b.total === a.total) return null;
  return ((b.busy - a.busy) / (b.total - a.total)) * os.cpus().length;
}

/**
 * Waits (up to maxS) until other processes use less than a third of a core: on a shared 2-core
 * machine a concurrent build or test run halves any engine's speed, and ggml's spinning thread
 * pool degrades far more than that when one of its threads loses its core.
 */
async function waitQuiet(name: string, maxS: number): Promise<{ waitedS: number; backgroundCores: number | null }> {
  const t = performance.now();
  let said = false;
  for (;;) {
    const c = await backgroundCores();
    const waited = (performance.now() - t) / 1000;
    if (c === null || c < 0.35 || waited >= maxS) {
      if (c !== null && c >= 0.35) log("run", `${name}: still ${c.toFixed(2)} cores busy with other processes after ${waited.toFixed(0)} s; measuring anyway (numbers will be low)`);
      return { waitedS: round(waited, 1), backgroundCores: c === null ? null : round(c, 2) };
    }
    if (!said) log("run", `${name}: ${c.toFixed(2)} cores busy with other processes; waiting up to ${maxS} s for a quieter machine`);
    said = true;
  }
}

interface ChildRun<T> {
  result: T | null;
  error?: string;
  wallS: number;
  /** Average cores used by everything else on the machine while the child ran (null off Linux). */
  otherCores: number | null;
  /** Seconds spent waiting for a quiet machine first, and the background load then. */
  waitedS: number;
  backgroundCoresAtStart: number | null;
}

async function child<T>(name: string, script: string, threads: number, extra: string[] = [], opts: { shim?: boolean; quick: boolean; env?: Record<string, string> }): Promise<ChildRun<T>> {
  const out = path.join(tmpDir, `${name}.json`);
  const nodeArgs: string[] = [];
  const env: NodeJS.ProcessEnv = { ...process.env, ...opts.env };
  const jaxDir = process.env.SELFSCOPE_BENCH_JAX_DIR;
  if (jaxDir && script === "selfscope.js") nodeArgs.push("--import", path.join(here, "jax-redirect.js"));
  if (opts.shim) {
    nodeArgs.push("--import", path.join(here, "worker-shim.js"));
    env.SELFSCOPE_WASM_THREADS = String(threads);
  }
  const argv = [...nodeArgs, path.join(here, script), "--threads", String(threads), "--out", out, ...(opts.quick ? ["--quick"] : []), ...extra];
  const quiet = await waitQuiet(name, opts.quick ? 20 : 300);
  log("run", `${name}: node ${argv.map((x) => (x.startsWith(tmpDir) ? "<tmp>" : path.isAbsolute(x) ? path.relative(process.cwd(), x) : x)).join(" ")}`);
  const c0 = cpuTicks();
  const t0 = performance.now();
  const code = await new Promise<number | null>((resolve) => {
    const p = spawn(process.execPath, argv, { stdio: ["ignore", "inherit", "inherit"], env });
    p.on("exit", (c, sig) => resolve(sig ? -1 : c));
  });
  const wallS = (performance.now() - t0) / 1000;
  const c1 = cpuTicks();
  let result: T | null = null;
  let error: string | undefined;
  if (code === 0 && fs.existsSync(out)) result = JSON.parse(fs.readFileSync(out, "utf8")) as T;
  else error = `${name} exited with code ${code}`;
  let otherCores: number | null = null;
  if (c0 && c1 && result) {
    const hz = 100; // USER_HZ on Linux
    const cpuS = ((result as { cpuS?: number }).cpuS ?? NaN);
    const busyS = (c1.busy - c0.busy) / hz;
    if (Number.isFinite(cpuS)) otherCores = round(Math.max(0, (busyS - cpuS) / wallS), 2);
  }
  if (error) log("run", `ERROR: ${error}`);
  if (otherCores !== null && otherCores > 0.3) log("run", `${name}: other processes used ${otherCores} cores on average meanwhile: its numbers are pessimistic`);
  return { result, wallS: round(wallS, 1), otherCores, waitedS: quiet.waitedS, backgroundCoresAtStart: quiet.backgroundCores, ...(error ? { error } : {}) };
}

type SelfscopeResult = EngineResult & { prefillCachePath: { msMedian: number; tokPerS: number }; hooks: Record<string, { prefillMs: number; decodeStepMs: number; prefillOverhead: number; decodeOverhead: number }>; decodeGBps: number; cpuS: number };
type LlamaResult = EngineResult & { gemm: Record<string, { tokens: number; ms: number; gflops: number; tried: Record<string, number> }>; decodeGBps: number; cpuS: number };
type MachineResult = {
  threads: number;
  kernels: Record<string, { ms: number; GBps: number }>;
  bandwidthGBps: { t1: number; tN: number };
  wasmPeakGflops: { t1: number; tN: number };
  wasmInt8PeakGmacs: { t1: number; tN: number; relaxedDot: boolean };
  cpuS: number;
};

const ratio = (a: number | undefined, b: number | undefined) => (a !== undefined && b !== undefined && b > 0 ? round(a / b, 3) : null);

function leadingAgreement(a: number[], b: number[]): number {
  let n = 0;
  while (n < a.length && n < b.length && a[n] === b[n]) n++;
  return n;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  if (args.large) {
    const { runLarge } = await import("./large.js");
    await runLarge(args.threads, args.only);
    fs.rmSync(tmpDir, { recursive: true, force: true });
    return;
  }
  const started = new Date();
  const t0 = performance.now();
  const N = args.threads;
  const S = shapes(args.quick);
  ensureModel();
  const q = { quick: args.quick };

  const machine = await child<MachineResult>("machine", "machine.js", N, [], q);
  const llama = args.llamacpp ? await child<LlamaResult>(`llamacpp-t${N}`, "llamacpp.js", N, [], q) : null;
  const self = await child<SelfscopeResult>(`selfscope-t${N}`, "selfscope.js", N, [], q);
  // The jax-js engine (device "wasm"), for reference: its kernels on N worker threads via the shim.
  const jax = args.jax ? await child<SelfscopeResult>(`selfscope-jax-t${N}`, "selfscope.js", N, ["--jax"], { ...q, shim: N > 1 }) : null;
  let one: { selfscope: ChildRun<SelfscopeResult>; llamacpp: ChildRun<LlamaResult> | null } | null = null;
  if (args.oneThread) {
    one = {
      llamacpp: args.llamacpp ? await child<LlamaResult>("llamacpp-t1", "llamacpp.js", 1, [], q) : null,
      selfscope: await child<SelfscopeResult>("selfscope-t1", "selfscope.js", 1, [], q),
    };
  }
  // Prefill again in short children, alternating the engines' order: this VM's speed drifts over
  // tens of seconds, so one prefill per engine minutes apart can land in different phases. The
  // ratio is the median of the paired (same-round) ratios, the main runs counting as round 0.
  const rounds: { selfscope: number; llamacpp: number; ratio: number; order: string }[] = [];
  if (self.result && llama?.result) rounds.push({ selfscope: self.result.prefill.tokPerS, llamacpp: llama.result.prefill.tokPerS, ratio: round(self.result.prefill.tokPerS / llama.result.prefill.tokPerS, 3), order: "main children" });
  if (llama?.result && self.result) {
    type P = { prefill: { tokPerS: number } };
    // 6 (quick) or 8 more pairs: with the main pair an odd count, so the median is one round.
    for (let r = 0; r < (args.quick ? 6 : 8); r++) {
      const selfFirst = r % 2 === 1;
      const runSelf = () => child<P>(`prefill-selfscope-${r + 1}`, "selfscope.js", N, ["--prefill-only"], q);
      const runLlama = () => child<P>(`prefill-llamacpp-${r + 1}`, "llamacpp.js", N, ["--prefill-only"], q);
      const a = selfFirst ? await runSelf() : await runLlama();
      const b = selfFirst ? await runLlama() : await runSelf();
      const sp = (selfFirst ? a : b).result?.prefill.tokPerS;
      const lp = (selfFirst ? b : a).result?.prefill.tokPerS;
      if (sp !== undefined && lp !== undefined) rounds.push({ selfscope: sp, llamacpp: lp, ratio: round(sp / lp, 3), order: selfFirst ? "selfscope first" : "llama.cpp first" });
    }
  }
  // The bench model's Q8_0 and Q4_K copies: llama.cpp and selfscope (quantized matrices computed
  // on in their format: the cpu default for such files), load + prefill + batch-1 decode.
  const quant: Record<string, { file: string; fileBytes: number; llamacpp: ChildRun<EngineResult>; selfscope: ChildRun<EngineResult>; selfscopeInt8?: ChildRun<EngineResult> }> = {};
  if (args.llamacpp) {
    for (const type of ["q8_0", "q4_k"] as const) {
      const file = await ensureQuantModel(type);
      const env = { SELFSCOPE_BENCH_MODEL: file };
      const lq = await child<EngineResult>(`llamacpp-${type}-t${N}`, "llamacpp.js", N, ["--core-only"], { ...q, env });
      const sq = await child<EngineResult>(`selfscope-${type}-t${N}`, "selfscope.js", N, ["--core-only"], { ...q, env: { ...env, SELFSCOPE_BENCH_WEIGHTS: "native" } });
      // Q4_K also with int8 activations in decode products (--weights native-int8).
      const si = type === "q4_k" ? await child<EngineResult>(`selfscope-${type}-int8-t${N}`, "selfscope.js", N, ["--core-only"], { ...q, env: { ...env, SELFSCOPE_BENCH_WEIGHTS: "native-int8" } }) : undefined;
      quant[type] = { file: path.relative(path.dirname(BENCH_DIR), file), fileBytes: fs.statSync(file).size, llamacpp: lq, selfscope: sq, ...(si ? { selfscopeInt8: si } : {}) };
    }
  }
  const qr = (type: string, f: (r: EngineResult) => number) => ratio(quant[type]?.selfscope.result ? f(quant[type].selfscope.result) : undefined, quant[type]?.llamacpp.result ? f(quant[type].llamacpp.result) : undefined);
  const profile = args.profile ? await child<Record<string, unknown> & { cpuS: number }>(`profile-t${N}`, "selfscope.js", N, ["--profile"], q) : null;

  const s = self.result;
  const l = llama?.result ?? null;
  const m = machine.result;
  // The compute limit: the best f32 FLOP rate native code (ggml) showed at that thread count,
  // over the GEMM-proxy batches and (at N threads) the 128-token prefill itself.
  const gemmPeak = (th: number) => {
    const g = l?.gemm[`t${th}`]?.gflops;
    if (g === undefined) return undefined;
    return th === N && l ? Math.max(g, l.prefill.gflops) : g;
  };
  const hookMax = s ? Math.max(...Object.entries(s.hooks).filter(([k]) => k !== "none").flatMap(([, h]) => [h.prefillOverhead, h.decodeOverhead])) : null;
  const summary = {
    prefill_ratio: rounds.length > 0 ? round(median(rounds.map((x) => x.ratio)), 3) : ratio(s?.prefill.tokPerS, l?.prefill.tokPerS),
    decode_b1_ratio: ratio(s?.decode.b1.tokPerS, l?.decode.b1.tokPerS),
    sweep_ratio: ratio(s?.sweep.trialsPerS, l?.sweep.trialsPerS),
    hook_overhead_max: hookMax === null ? null : round(hookMax, 4),
    peak_rss_over_weights: s ? round(s.rss.peakBytes / WEIGHT_BYTES, 3) : null,
    q8_0_decode_b1_ratio: qr("q8_0", (r) => r.decode.b1.tokPerS),
    q4_k_decode_b1_ratio: qr("q4_k", (r) => r.decode.b1.tokPerS),
    q4_k_prefill_ratio: qr("q4_k", (r) => r.prefill.tokPerS),
    q4_k_rss_over_file: quant.q4_k?.selfscope.result ? round(quant.q4_k.selfscope.result.rss.peakBytes / quant.q4_k.fileBytes, 3) : null,
    q4_k_int8_decode_b1_ratio: ratio(quant.q4_k?.selfscopeInt8?.result?.decode.b1.tokPerS, quant.q4_k?.llamacpp.result?.decode.b1.tokPerS),
    q4_k_int8_prefill_ratio: ratio(quant.q4_k?.selfscopeInt8?.result?.prefill.tokPerS, quant.q4_k?.llamacpp.result?.prefill.tokPerS),
  };
  const limits = {
    gemmGflops: { t1: gemmPeak(1) ?? null, tN: gemmPeak(N) ?? null, source: "best FLOP rate of llama.cpp (ggml, F32, AVX-512) over single 128-512-token batches of the bench model (and its 128-token prefill): a lower bound of the machine's f32 GEMM peak" },
    bandwidthGBps: { t1: m?.bandwidthGBps.t1 ?? null, tN: m?.bandwidthGBps.tN ?? null, source: "best of a WebAssembly-SIMD streaming read and a memmove copy (read+write), 256 MiB per thread" },
    wasmPeakGflops: { t1: m?.wasmPeakGflops.t1 ?? null, tN: m?.wasmPeakGflops.tN ?? null, source: "register-only f32x4 multiply-add loop (12 accumulators) of selfscope's kernel module, one per thread: the ceiling of any WebAssembly code here" },
    wasmInt8PeakGmacs: {
      t1: m?.wasmInt8PeakGmacs.t1 ?? null,
      tN: m?.wasmInt8PeakGmacs.tN ?? null,
      source: "register-only loop of the int8-activation rows' products (kernels.ts peakdot: per 32 products two i16x8.relaxed_dot_i8x16_i7x16_s, an i16 add, an i32x4.dot_i16x8_s by a scale and an i32 add; 5 chains), one per thread: the ceiling of the native-int8 products",
    },
  };
  const frac = (x: number | undefined, lim: number | null | undefined) => (x !== undefined && lim ? round(x / lim, 3) : null);
  const results = {
    schema: 1,
    timestamp: started.toISOString(),
    command: `npm run bench -- ${process.argv.slice(2).join(" ")}`.trim(),
    quick: args.quick,
    threads: N,
    wallS: 0,
    host: { cpu: os.cpus()[0]?.model ?? "?", cores: os.availableParallelism(), memGiB: round(os.totalmem() / 2 ** 30, 1), node: process.version, platform: `${os.platform()} ${os.release()}`, cpuFlags: cpuFlags() },
    model: {
      path: path.relative(path.dirname(BENCH_DIR), MODEL_PATH),
      shape: MODEL,
      params: PARAMS,
      weightBytes: WEIGHT_BYTES,
      decodeBytesPerStep: DECODE_BYTES_PER_STEP,
      flopsPerToken: 2 * MODEL.nLayers * matmulParamsPerLayer(),
      note: "random weights, F32 GGUF (arch llama); FLOPs = 2·(block matmul params)·tokens + 2·V·D per unembedded row + causal attention; decode bytes = all weights but the embedding table",
    },
    shapes: S,
    limits,
    summary,
    ratios: {
      ...summary,
      decode_b8_ratio: ratio(s?.decode.b8.tokPerS, l?.decode.b8.tokPerS),
      llamacpp_peak_rss_over_weights: l ? round(l.rss.peakBytes / WEIGHT_BYTES, 3) : null,
      selfscope_prefill_of_gemm_peak: frac(s?.prefill.gflops, gemmPeak(N)),
      selfscope_prefill_of_wasm_peak: frac(s?.prefill.gflops, m?.wasmPeakGflops.tN),
      // Q4_K prefill runs the f32 GEMM on dequantized weights (docs/cpu-engine.md), so its limit is the f32 peak.
      q4_k_prefill_of_wasm_peak: frac(quant.q4_k?.selfscope.result?.prefill.gflops, m?.wasmPeakGflops.tN),
      // native-int8 Q4_K prefill runs the int8 rows: its limit is their products' peak (a product is 2 flops).
      q4_k_int8_prefill_of_int8_peak: frac(quant.q4_k?.selfscopeInt8?.result ? quant.q4_k.selfscopeInt8.result.prefill.gflops / 2 : undefined, m?.wasmInt8PeakGmacs.tN),
      // Q8_0 prefill dequantizes into the f32 GEMM in both modes.
      q8_0_prefill_of_wasm_peak: frac(quant.q8_0?.selfscope.result?.prefill.gflops, m?.wasmPeakGflops.tN),
      llamacpp_prefill_of_gemm_peak: frac(l?.prefill.gflops, gemmPeak(N)),
      selfscope_decode_of_bandwidth: frac(s?.decodeGBps, m?.bandwidthGBps.tN),
      llamacpp_decode_of_bandwidth: frac(l?.decodeGBps, m?.bandwidthGBps.tN),
      greedy_agreement: s && l ? `${leadingAgreement(s.greedy, l.greedy)}/${Math.min(s.greedy.length, l.greedy.length)}` : null,
    },
    prefillRounds: rounds,
    selfscope: self,
    selfscopeJax: jax,
    llamacpp: llama,
    machine,
    oneThread: one
      ? {
          ...one,
          ratios: {
            prefill: ratio(one.selfscope.result?.prefill.tokPerS, one.llamacpp?.result?.prefill.tokPerS),
            decode_b1: ratio(one.selfscope.result?.decode.b1.tokPerS, one.llamacpp?.result?.decode.b1.tokPerS),
            decode_b8: ratio(one.selfscope.result?.decode.b8.tokPerS, one.llamacpp?.result?.decode.b8.tokPerS),
            sweep: ratio(one.selfscope.result?.sweep.trialsPerS, one.llamacpp?.result?.sweep.trialsPerS),
          },
        }
      : null,
    quantized: Object.fromEntries(
      Object.entries(quant).map(([type, r]) => [
        type,
        {
          ...r,
          ratios: {
            load: qr(type, (x) => x.loadMs),
            prefill: qr(type, (x) => x.prefill.tokPerS),
            decode_b1: qr(type, (x) => x.decode.b1.tokPerS),
            llamacpp_rss_over_file: r.llamacpp.result ? round(r.llamacpp.result.rss.peakBytes / r.fileBytes, 3) : null,
            selfscope_rss_over_file: r.selfscope.result ? round(r.selfscope.result.rss.peakBytes / r.fileBytes, 3) : null,
            greedy_agreement: r.selfscope.result && r.llamacpp.result ? `${leadingAgreement(r.selfscope.result.greedy, r.llamacpp.result.greedy)}/${Math.min(r.selfscope.result.greedy.length, r.llamacpp.result.greedy.length)}` : null,
          },
        },
      ]),
    ),
    profile,
  };
  results.wallS = round((performance.now() - t0) / 1000, 1);
  const stamp = started.toISOString().replace(/[:.]/g, "-");
  writeJson(path.join(RESULTS_DIR, `${stamp}.json`), results);
  writeJson(path.join(RESULTS_DIR, "latest.json"), results);
  fs.rmSync(tmpDir, { recursive: true, force: true });

  const runs: Record<string, ChildRun<unknown> | null> = { selfscope: self, llamacpp: llama, machine, ...(jax ? { "selfscope-jax": jax } : {}) };
  if (one) Object.assign(runs, { "selfscope-t1": one.selfscope, "llamacpp-t1": one.llamacpp });
  process.stdout.write(table(results, s, l, one, runs) + "\n");
  if (jax?.result) {
    const j = jax.result;
    process.stdout.write(`jax-js engine (--device wasm), same run: prefill ${j.prefill.tokPerS} tok/s, decode B=1 ${j.decode.b1.tokPerS} tok/s, B=8 ${j.decode.b8.tokPerS} tok/s, sweep ${j.sweep.trialsPerS} trials/s, peak RSS ${round(j.rss.peakBytes / WEIGHT_BYTES, 2)}× weights\n`);
  }
  for (const [type, r] of Object.entries(results.quantized)) {
    const a = r.selfscope.result, b = r.llamacpp.result;
    if (a && b) process.stdout.write(`${type.toUpperCase()} copy (${(r.fileBytes / 2 ** 20).toFixed(0)} MiB): decode B=1 ${a.decode.b1.tokPerS} vs ${b.decode.b1.tokPerS} tok/s (${r.ratios.decode_b1}×), prefill ${a.prefill.tokPerS} vs ${b.prefill.tokPerS} tok/s (${r.ratios.prefill}×), load ${round(a.loadMs)} vs ${round(b.loadMs)} ms, peak RSS ${r.ratios.selfscope_rss_over_file}× vs ${r.ratios.llamacpp_rss_over_file}× the file, greedy ${r.ratios.greedy_agreement}\n`);
  }
  process.stdout.write(`results: ${path.relative(process.cwd(), path.join(RESULTS_DIR, `${stamp}.json`))} (and latest.json), ${results.wallS} s\n`);
  process.stdout.write(JSON.stringify(summary) + "\n");
  process.exit(s ? 0 : 1);
}

function table(
  r: {
    threads: number;
    quick: boolean;
    limits: { gemmGflops: { t1: number | null; tN: number | null }; bandwidthGBps: { t1: number | null; tN: number | null }; wasmPeakGflops: { t1: number | null; tN: number | null }; wasmInt8PeakGmacs: { t1: number | null; tN: number | null } };
    ratios: Record<string, unknown>;
  },
  s: SelfscopeResult | null,
  l: LlamaResult | null,
  one: { selfscope: ChildRun<SelfscopeResult>; llamacpp: ChildRun<LlamaResult> | null } | null,
  runs: Record<string, ChildRun<unknown> | null>,
): string {
  const N = r.threads;
  const f = (x: number | null | undefined, d = 1) => (x === null || x === undefined || !Number.isFinite(x) ? "—" : x.toFixed(d));
  const rows: string[][] = [["metric", "selfscope", "llama.cpp", "ratio", "target"]];
  const add = (name: string, a: number | undefined, b: number | undefined, d: number, target: string, higherIsBetter = true) => {
    const rr = a !== undefined && b !== undefined && b > 0 ? (higherIsBetter ? a / b : b / a) : undefined;
    rows.push([name, f(a, d), f(b, d), rr === undefined ? "—" : `${rr.toFixed(2)}×`, target]);
  };
  add("prefill 128 tok, B=1 (tok/s)", s?.prefill.tokPerS, l?.prefill.tokPerS, 1, "≥ 1.0×");
  const pr = (r as { prefillRounds?: { ratio: number }[] }).prefillRounds ?? [];
  if (pr.length > 1) rows.push([`  paired prefill rounds (${pr.length})`, "", "", `${median(pr.map((x) => x.ratio)).toFixed(2)}×`, `median of ${pr.map((x) => x.ratio.toFixed(2)).join(", ")}`]);
  add("decode B=1 (tok/s)", s?.decode.b1.tokPerS, l?.decode.b1.tokPerS, 1, "≥ 0.8×");
  add("decode B=8 (tok/s, 8 rows)", s?.decode.b8.tokPerS, l?.decode.b8.tokPerS, 1, "");
  add(`sweep 64×48 tok (trials/s)`, s?.sweep.trialsPerS, l?.sweep.trialsPerS, 3, "≥ 2×");
  add("prefill GFLOP/s", s?.prefill.gflops, l?.prefill.gflops, 1, "");
  add("decode B=1 weight GB/s", s?.decodeGBps, l?.decodeGBps, 2, "");
  rows.push(["peak RSS (MB) / ÷ weights", s ? `${f(s.rss.peakBytes / 1e6, 0)} / ${f(s.rss.peakBytes / WEIGHT_BYTES, 2)}×` : "—", l ? `${f(l.rss.peakBytes / 1e6, 0)} / ${f(l.rss.peakBytes / WEIGHT_BYTES, 2)}×` : "—", "", "≤ 1.5× weights"]);
  const lines = [`selfscope vs llama.cpp, ${N} thread(s) each, F32 weights, F32 KV cache${r.quick ? " (--quick)" : ""}`, ...fmt(rows)];
  if (s) {
    lines.push("", "hook overhead vs no hooks (medians of interleaved runs; target ≤ 5%)");
    const h: string[][] = [["hooks", "prefill ms", "Δ", "decode ms/step", "Δ"]];
    for (const [k, v] of Object.entries(s.hooks)) h.push([k, f(v.prefillMs), k === "none" ? "" : `${(v.prefillOverhead * 100).toFixed(1)}%`, f(v.decodeStepMs, 2), k === "none" ? "" : `${(v.decodeOverhead * 100).toFixed(1)}%`]);
    lines.push(...fmt(h));
  }
  lines.push(
    "",
    `machine limits (same run): native f32 GEMM ≥ ${f(r.limits.gemmGflops.t1)} GFLOP/s on 1 thread, ≥ ${f(r.limits.gemmGflops.tN)} on ${N} (best llama.cpp batch); WebAssembly SIMD multiply-add peak ${f(r.limits.wasmPeakGflops.t1)} GFLOP/s on 1 thread, ${f(r.limits.wasmPeakGflops.tN)} on ${N}; int8 products peak ${f(r.limits.wasmInt8PeakGmacs.t1)} G/s on 1 thread, ${f(r.limits.wasmInt8PeakGmacs.tN)} on ${N}; memory ${f(r.limits.bandwidthGBps.t1)} GB/s on 1 thread, ${f(r.limits.bandwidthGBps.tN)} on ${N}`,
    `share of the limit: prefill selfscope ${pct(r.ratios.selfscope_prefill_of_wasm_peak)} of the Wasm SIMD peak (${pct(r.ratios.selfscope_prefill_of_gemm_peak)} of llama.cpp's best GEMM), llama.cpp ${pct(r.ratios.llamacpp_prefill_of_gemm_peak)} of its best GEMM; Q4_K native-int8 prefill ${pct(r.ratios.q4_k_int8_prefill_of_int8_peak)} of the int8 products peak, Q8_0 prefill ${pct(r.ratios.q8_0_prefill_of_wasm_peak)} of the Wasm SIMD peak; decode B=1 selfscope ${pct(r.ratios.selfscope_decode_of_bandwidth)}, llama.cpp ${pct(r.ratios.llamacpp_decode_of_bandwidth)} of bandwidth`,
    `greedy tokens agree (selfscope vs llama.cpp, leading): ${String(r.ratios.greedy_agreement ?? "—")}`,
  );
  if (one) {
    const a = one.selfscope.result;
    const b = one.llamacpp?.result;
    lines.push("", "1 thread each:");
    const rows1: string[][] = [["metric", "selfscope", "llama.cpp", "ratio"]];
    const add1 = (name: string, x: number | undefined, y: number | undefined, d: number) => rows1.push([name, f(x, d), f(y, d), x !== undefined && y ? `${(x / y).toFixed(2)}×` : "—"]);
    add1("prefill (tok/s)", a?.prefill.tokPerS, b?.prefill.tokPerS, 1);
    add1("decode B=1 (tok/s)", a?.decode.b1.tokPerS, b?.decode.b1.tokPerS, 1);
    add1("decode B=8 (tok/s)", a?.decode.b8.tokPerS, b?.decode.b8.tokPerS, 1);
    add1("sweep (trials/s)", a?.sweep.trialsPerS, b?.sweep.trialsPerS, 3);
    lines.push(...fmt(rows1));
    if (a) {
      const hk = Object.entries(a.hooks).filter(([k]) => k !== "none");
      lines.push(`hook overhead at 1 thread: ${hk.map(([k, v]) => `${k} ${(v.prefillOverhead * 100).toFixed(1)}% / ${(v.decodeOverhead * 100).toFixed(1)}%`).join(", ")} (prefill / decode step); peak RSS ${f(a.rss.peakBytes / WEIGHT_BYTES, 2)}× weights`);
    }
  }
  const bg = Object.entries(runs)
    .filter((e): e is [string, ChildRun<unknown>] => e[1] !== null)
    .map(([k, v]) => `${k} ${v.otherCores === null ? "?" : v.otherCores.toFixed(2)} (${v.wallS} s)`);
  lines.push("", `cores used by other processes while each ran (0 = quiet machine): ${bg.join(", ")}`);
  return lines.join("\n");
}

function pct(x: unknown): string {
  return typeof x === "number" ? `${(x * 100).toFixed(0)}%` : "—";
}

function fmt(rows: string[][]): string[] {
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => [...(r[i] ?? "")].length)));
  return rows.map((r, j) => {
    const line = r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join("  ");
    return j === 0 ? `${line}\n${"-".repeat([...line].length)}` : line;
  });
}

await main();
