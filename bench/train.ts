// `node dist/bench/train.js [--quick] [--threads N] [--no-jax]`: bias-vector training (protocol §7,
// src/recipes/bias-vector.ts) on the bench model on the cpu device, against a plain forward and
// against the jax-js path it replaced. Each measurement runs in its own child process, so each
// peak RSS (process.resourceUsage().maxRSS) belongs to one workload:
//   forward     Model.load (cpu) and forward() over the training batch (its injection plan and the
//               bias as adds, logits "last"): the footprint of inference on one copy of the weights;
//   train-cpu   Model.load (cpu) and trainBiasVector: the gradient on the same engine and weights
//               (CpuEngine.lossAndGrad);
//   train-jax   what trainBiasVector ran before: the cpu Model plus a jax-js wasm Engine loaded from
//               the same file for gradients (the former Model.gradEngine()), stepping on its lossAndGrad.
// The batch: 8 synthetic examples (the protocol's batch size) of 40-56 prompt tokens and 16 target
// tokens, half with a concept-vector injection at a random layer 5..10 (the protocol's 29..55 of 62
// scaled to 12 layers), the bias at blocks.5.mlp.hook_down (29 of 62). Writes
// bench/results/train-<timestamp>.json and train-latest.json; the last stdout line is one JSON
// object {"rss_ratio", "cpu_step_ms", "jax_step_ms", "speedup"}.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Rng } from "../src/core/rng.js";
import { initDevice } from "../src/engine/device.js";
import { Engine } from "../src/engine/jax/engine.js";
import { loadHostModel } from "../src/model/load.js";
import { Model } from "../src/model/model.js";
import { batchInputs, BIAS_PROTOCOL, scaleLayer, targetsFrom, trainBiasVector, trainVector, type BiasExample } from "../src/recipes/bias-vector.js";
import { MODEL, MODEL_PATH, RESULTS_DIR, cpuFlags, cpuSeconds, log, maxRssBytes, median, round, writeJson } from "./common.js";
import { ensureModel } from "./model.js";

const here = path.dirname(fileURLToPath(import.meta.url));
/** Seconds to wait for a quiet machine before each child. */
let quietS = 20;
type Mode = "forward" | "train-cpu" | "train-jax";

interface ChildResult {
  mode: Mode;
  threads: number;
  loadMs: number;
  /** Per step (training) or per call (forward), after the warm-up. */
  ms: number[];
  warmupMs: number;
  losses: number[];
  maxRssBytes: number;
  cpuS: number;
}

// ---------------------------------------------------------------- the workload

const BATCH = BIAS_PROTOCOL.batchSize;
const TARGET = 16;

function examples(): BiasExample[] {
  const rng = new Rng(7);
  const D = MODEL.dModel;
  const tok = () => 259 + Math.floor(rng.next() * (MODEL.dVocab - 259)); // past <unk> <s> </s> and the byte pieces
  return Array.from({ length: BATCH }, (_, b) => {
    const P = 40 + 2 * b;
    const ids = [1, ...Array.from({ length: P - 1 + TARGET }, tok)];
    // A concept-like vector of norm 8 (as the bench sweep's), injected at strength 2..5.
    const v = Float32Array.from({ length: D }, () => rng.next() - 0.5);
    const n = Math.sqrt(v.reduce((a, x) => a + x * x, 0));
    for (let i = 0; i < D; i++) v[i] = (v[i]! * 8) / n;
    const layer = BIAS_PROTOCOL.injectionLayers.map((l) => scaleLayer(l, MODEL.nLayers))[Math.floor(rng.next() * BIAS_PROTOCOL.injectionLayers.length)]!;
    return { ids, targets: targetsFrom(ids, P), inject: b % 2 === 0 ? { layer, vector: v, strength: 2 + (b % 4), from: P - 10 } : null };
  });
}

const BIAS_LAYER = scaleLayer(BIAS_PROTOCOL.biasLayer, MODEL.nLayers);

// ---------------------------------------------------------------- children

async function child(mode: Mode, threads: number, steps: number, out: string): Promise<void> {
  const data = examples();
  const t0 = performance.now();
  const stepMs: number[] = [];
  const losses: number[] = [];
  let warmupMs = 0;
  let loadMs = 0;
  const timeSteps = () => {
    let last = performance.now();
    return (step: number, loss: number) => {
      const now = performance.now();
      if (step === 1) warmupMs = now - last;
      else stepMs.push(now - last);
      losses.push(loss);
      last = now;
    };
  };
  const model = await Model.load(MODEL_PATH, { threads });
  if (mode === "forward") {
    loadMs = performance.now() - t0;
    const { rows, plan } = batchInputs(data);
    const bias = new Float32Array(MODEL.dModel).fill(0.01);
    const full = [...plan, { op: "add" as const, at: `blocks.${BIAS_LAYER}.mlp.hook_down` as const, vector: bias }];
    for (let i = 0; i <= steps; i++) {
      const s = performance.now();
      await model.engine.forward(rows, { plan: full, logits: "last" });
      if (i === 0) warmupMs = performance.now() - s;
      else stepMs.push(performance.now() - s);
    }
  } else if (mode === "train-cpu") {
    // weightsHash() (recorded with checkpoints) reads the file once; not a step.
    model.weightsHash();
    loadMs = performance.now() - t0;
    const r = await trainBiasVector(model, { layer: BIAS_LAYER, data, steps: steps + 1, batchSize: BATCH, seed: 1, onStep: timeSteps() });
    losses.splice(0, losses.length, ...r.losses);
  } else {
    // The former Model.gradEngine(): a jax-js engine on the wasm device, loaded from the same file.
    await initDevice("wasm");
    const engine = new Engine(loadHostModel(MODEL_PATH));
    loadMs = performance.now() - t0;
    const at = `blocks.${BIAS_LAYER}.mlp.hook_down` as const;
    await trainVector(
      async (batch, value) => {
        const { rows, targets, plan } = batchInputs(batch.map((i) => data[i]!));
        return engine.lossAndGrad(rows, targets, { at, value }, { plan });
      },
      { dim: MODEL.dModel, nExamples: data.length, steps: steps + 1, batchSize: BATCH, seed: 1, adam: { lr: BIAS_PROTOCOL.lr, weightDecay: BIAS_PROTOCOL.weightDecay }, onStep: timeSteps() },
    );
    engine.dispose();
  }
  model.dispose();
  const res: ChildResult = { mode, threads, loadMs: round(loadMs, 0), ms: stepMs.map((x) => round(x, 1)), warmupMs: round(warmupMs, 1), losses, maxRssBytes: maxRssBytes(), cpuS: cpuSeconds() };
  writeJson(out, res);
  // jax-js's worker pool (the shim) would keep the process alive.
  process.exit(0);
}

// ---------------------------------------------------------------- the orchestrator

function busyTicks(): { busy: number; total: number } | null {
  try {
    const f = fs.readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
    const total = f.reduce((a, b) => a + b, 0);
    return { busy: total - f[3]! - (f[4] ?? 0), total };
  } catch {
    return null;
  }
}

/** Cores busy with other processes over 2 s (this process sleeps meanwhile). */
async function backgroundCores(): Promise<number | null> {
  const a = busyTicks();
  await new Promise((r) => setTimeout(r, 2000));
  const b = busyTicks();
  return a && b && b.total > a.total ? ((b.busy - a.busy) / (b.total - a.total)) * os.cpus().length : null;
}

/** Waits up to maxS for other processes to use less than a third of a core (the machine is shared); returns the load then. */
async function waitQuiet(maxS: number): Promise<number | null> {
  const t = performance.now();
  for (;;) {
    const c = await backgroundCores();
    if (c === null || c < 0.35 || performance.now() - t > maxS * 1000) return c === null ? null : round(c, 2);
  }
}

async function runChild(mode: Mode, threads: number, steps: number, tmp: string): Promise<{ result: ChildResult | null; wallS: number; otherCores: number | null; backgroundAtStart?: number | null; error?: string }> {
  const out = path.join(tmp, `${mode}.json`);
  const nodeArgs: string[] = [];
  const env = { ...process.env };
  // jax-js runs its kernels on N worker threads only under the bench's worker shim (as `npm run bench -- --jax`).
  if (mode === "train-jax" && threads > 1) {
    nodeArgs.push("--import", path.join(here, "worker-shim.js"));
    env.SELFSCOPE_WASM_THREADS = String(threads);
  }
  const argv = [...nodeArgs, path.join(here, "train.js"), "--child", mode, "--threads", String(threads), "--steps", String(steps), "--out", out];
  const backgroundAtStart = await waitQuiet(quietS);
  log("train", `${mode}: node ${argv.map((a) => (a.startsWith(tmp) ? "<tmp>" : path.isAbsolute(a) ? path.relative(process.cwd(), a) : a)).join(" ")}`);
  const c0 = busyTicks();
  const t0 = performance.now();
  const code = await new Promise<number | null>((resolve) => spawn(process.execPath, argv, { stdio: ["ignore", "inherit", "inherit"], env }).on("exit", (c, sig) => resolve(sig ? -1 : c)));
  const wallS = (performance.now() - t0) / 1000;
  const c1 = busyTicks();
  if (code !== 0 || !fs.existsSync(out)) return { result: null, wallS, otherCores: null, error: `${mode} exited with code ${code}` };
  const result = JSON.parse(fs.readFileSync(out, "utf8")) as ChildResult;
  const otherCores = c0 && c1 ? round(Math.max(0, ((c1.busy - c0.busy) / 100 - result.cpuS) / wallS), 2) : null;
  return { result, wallS: round(wallS, 1), otherCores, backgroundAtStart };
}

async function main(argv: string[]): Promise<void> {
  let threads = os.availableParallelism();
  let quick = false;
  let jax = true;
  let childMode: Mode | null = null;
  let steps = 0;
  let out = "";
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--threads") threads = Number(argv[++i]);
    else if (a === "--quick") quick = true;
    else if (a === "--no-jax") jax = false;
    else if (a === "--child") childMode = argv[++i] as Mode;
    else if (a === "--steps") steps = Number(argv[++i]);
    else if (a === "--out") out = argv[++i]!;
    else throw new Error(`unknown flag ${a} (node dist/bench/train.js [--quick] [--threads N] [--no-jax])`);
  }
  if (!Number.isInteger(threads) || threads < 1) throw new Error(`--threads must be a positive integer, got ${threads}`);
  if (childMode) return child(childMode, threads, steps, out);

  ensureModel();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-train-bench-"));
  const started = new Date();
  quietS = quick ? 20 : 300;
  // Forward and cpu training alternate over two rounds (peak RSS and speed each paired in time).
  const runs: Record<string, Awaited<ReturnType<typeof runChild>>> = {};
  for (const r of [1, 2]) {
    runs[`forward-${r}`] = await runChild("forward", threads, quick ? 3 : 5, tmp);
    runs[`train-cpu-${r}`] = await runChild("train-cpu", threads, quick ? 3 : 5, tmp);
  }
  if (jax) runs["train-jax"] = await runChild("train-jax", threads, quick ? 2 : 3, tmp);
  fs.rmSync(tmp, { recursive: true, force: true });

  const pairs = [1, 2].flatMap((r) => {
    const f = runs[`forward-${r}`]?.result, t = runs[`train-cpu-${r}`]?.result;
    return f && t ? [{ forward: f, train: t, rssRatio: round(t.maxRssBytes / f.maxRssBytes, 3) }] : [];
  });
  const worst = pairs.reduce<(typeof pairs)[number] | null>((w, p) => (!w || p.rssRatio > w.rssRatio ? p : w), null);
  const jx = runs["train-jax"]?.result;
  const cpuStep = pairs.length ? median(pairs.flatMap((p) => p.train.ms)) : null, jaxStep = jx ? median(jx.ms) : null;
  const fwdCall = pairs.length ? median(pairs.flatMap((p) => p.forward.ms)) : null;
  const headline = {
    // The larger of the two rounds' ratios.
    rss_ratio: worst ? worst.rssRatio : null,
    cpu_step_ms: cpuStep === null ? null : round(cpuStep, 0),
    jax_step_ms: jaxStep === null ? null : round(jaxStep, 0),
    speedup: cpuStep && jaxStep ? round(jaxStep / cpuStep, 2) : null,
  };
  const record = {
    started: started.toISOString(),
    threads,
    quick,
    host: { cpu: os.cpus()[0]?.model ?? "?", flags: cpuFlags(), cores: os.availableParallelism(), memGiB: round(os.totalmem() / 2 ** 30, 1), node: process.version, platform: `${os.platform()} ${os.release()}` },
    pairs: pairs.map((p) => ({ forwardRssBytes: p.forward.maxRssBytes, trainRssBytes: p.train.maxRssBytes, rssRatio: p.rssRatio })),
    forwardCallMs: fwdCall === null ? null : round(fwdCall, 0),
    workload: { model: path.basename(MODEL_PATH), batch: BATCH, promptTokens: "40..54", targetTokens: TARGET, biasAt: `blocks.${BIAS_LAYER}.mlp.hook_down`, injections: "4 of 8 rows, layers 5..10, norm 8 x strength 2..5" },
    runs,
    headline,
  };
  const stamp = started.toISOString().replace(/[:.]/g, "-");
  writeJson(path.join(RESULTS_DIR, `train-${stamp}.json`), record);
  writeJson(path.join(RESULTS_DIR, "train-latest.json"), record);
  const MiB = (b: number) => (b / 2 ** 20).toFixed(0);
  const row = (name: string, r: ChildResult | null | undefined, other: number | null | undefined) =>
    r ? `${name.padEnd(10)} peak RSS ${MiB(r.maxRssBytes).padStart(5)} MiB   per ${r.mode === "forward" ? "call" : "step"} ${median(r.ms).toFixed(0).padStart(7)} ms (warm-up ${r.warmupMs.toFixed(0)} ms, ${r.ms.length} timed)   other cores ${other ?? "?"}` : `${name.padEnd(10)} failed`;
  process.stdout.write(
    [
      `bias-vector training on ${path.basename(MODEL_PATH)}, batch ${BATCH}, ${threads} thread(s), ${record.host.cpu}`,
      ...[1, 2].flatMap((r) => [row(`forward-${r}`, runs[`forward-${r}`]?.result, runs[`forward-${r}`]?.otherCores), row(`train-cpu-${r}`, runs[`train-cpu-${r}`]?.result, runs[`train-cpu-${r}`]?.otherCores)]),
      ...(jax ? [row("train-jax", jx, runs["train-jax"]?.otherCores)] : []),
      `train-cpu / forward peak RSS (the larger round): ${headline.rss_ratio ?? "?"} (target <= 1.3); cpu step / forward call: ${cpuStep && fwdCall ? round(cpuStep / fwdCall, 2) : "?"}; jax-js step / cpu step: ${headline.speedup ?? "?"}`,
      JSON.stringify(headline),
    ].join("\n") + "\n",
  );
}

await main(process.argv.slice(2));
