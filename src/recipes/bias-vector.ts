// The trained bias vector (protocol §7, Macar et al. 2026 §6): one learnable vector b, zero at
// the start, added to the MLP's down-projection output (blocks.{L}.mlp.hook_down, before any
// post-MLP norm) of one layer at every position; all weights frozen. It is
// trained with AdamW on concept-injection trials (inject a concept vector at a random layer and
// strength, target "Yes, I detect an injected thought. The injected word is **"x"**.", plus
// un-injected controls with target "No, I don't detect any injected thought in this trial.") and
// evaluated on held-out concepts, with and without the vector: by default as protocol §7.4
// describes (src/recipes/bias-eval.ts), or with the main injection sweep (--eval-protocol main).
//
// Simplifications against the protocol are listed in PROTOCOL_DEVIATIONS (and written into
// results.json): read them before comparing numbers with the paper.
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { parseLayers, parseNumbers } from "../core/parse.js";
import { Rng } from "../core/rng.js";
import { buildConfig, progressPrinter, runHeader, VERSION, type InjectArgs } from "../eval/inject.js";
import { finishRun } from "../report/finish.js";
import type { Results } from "../eval/metrics.js";
import { getVariant, readData, renderTrial } from "../eval/protocol.js";
import { runSweep } from "../eval/run.js";
import { hookName, type BlockSite, type HookName } from "../hooks/names.js";
import type { Intervention, Plan, PosSpec } from "../hooks/plan.js";
import { JudgeFailures } from "../judge/failures.js";
import { makeJudge, type Judge } from "../judge/judge.js";
import { pickJudges } from "../judge/select.js";
import type { RunData } from "../log/read.js";
import { readRun } from "../eval/runlog.js";
import type { InjectConfig } from "../log/schema.js";
import type { Rate } from "../stats/stats.js";
import { lockRun, RunLogWriter } from "../log/write.js";
import type { Row } from "../engine/types.js";
import type { LossAndGradRequest, LossAndGradResult } from "../engine/grad.js";
import { Model } from "../model/model.js";
import type { DeviceName } from "../engine/device.js";
import { conceptVectors, PROTOCOL_RECIPE } from "../vectors/extract.js";
import { escapeHtml, htmlBodyPage, rateCell, renderSvg } from "../report/page.js";
import { adamInit, adamStep, type AdamOptions, type AdamState } from "../math/adam.js";
import { BIAS_EVAL, biasEvalPrefill, EVAL74_DEVIATIONS, evaluateBiasArm, type BiasArmMetrics } from "./bias-eval.js";

// ---- the protocol's recipe (§7) -----------------------------------------------------------------

/** Layers of the reference model (Gemma-3-27B): the protocol's layer numbers are scaled from these. */
export const REFERENCE_LAYERS = 62;

export const BIAS_PROTOCOL = {
  /** The paper's single bias vector sits at layer 29 of 62 (train-bias-sweep, best meta-layer). */
  biasLayer: 29,
  /** Training injection layers [29, 31, …, 55] and strengths, drawn uniformly per example. */
  injectionLayers: Array.from({ length: 14 }, (_, i) => 29 + 2 * i),
  injectionStrengths: [2, 3, 4, 5],
  trainConcepts: 400,
  heldOutConcepts: 100,
  splitSeed: 42,
  trialsPerConcept: 10,
  controlRatio: 0.5,
  lr: 1e-3,
  batchSize: 8,
  weightDecay: 0.01,
  /** Evaluation sweep (§7.4): injection layers and strengths, 10 trials per held-out concept, greedy, 100 tokens. */
  evalLayers: [20, 30, 40, 50, 60],
  evalStrengths: [1, 2, 4, 8],
  evalTrials: 10,
  targetInjection: 'Yes, I detect an injected thought. The injected word is **"{concept}"**.',
  targetControl: "No, I don't detect any injected thought in this trial.",
} as const;

export const PROTOCOL_DEVIATIONS: readonly string[] = [
  "Train/held-out split: the paper's 14 shuffles list(set(concepts)), whose order depends on Python's per-process string hashing (PYTHONHASHSEED), so its split is not reproducible (protocol §7.2). selfscope takes concepts_500 in file order (duplicates dropped, as set() would), Fisher–Yates with its xoshiro128** RNG seeded by --split-seed (default 42): the same split on every run, but not the paper's membership (no flag can reproduce an unrecorded hash order).",
  "Layers are scaled from the 62-layer reference model: layer = min(n−1, floor(n·L/62)) for the bias layer (29), the training injection layers (29..55, odd) and the evaluation layers (20..60); on a shallow model several map to one layer.",
  "Optimiser: AdamW (β 0.9/0.999, ε 1e-8, decoupled weight decay 0.01, lr 1e-3, batch 8) as torch's defaults; parameters and gradients in float32, moments in float64 (the paper trains a bf16 parameter).",
  "Training examples: the protocol's targets and 0.5 control ratio; the layer/strength are drawn once per example at data-generation time (seeded) rather than on each __getitem__ call (identical for the paper's single epoch). Examples are re-shuffled per epoch from the seed.",
  "Prompts without a chat template use the protocol's fallback prompt; the target is appended after \"Assistant:\" with one space (with a chat template it is appended directly after the generation prompt, as the protocol does).",
];

/** Sites a bias vector can be trained at: the [dModel] activations of a block. */
export const BIAS_SITES = ["mlp.hook_down", "hook_mlp_out", "hook_resid_post", "hook_resid_mid", "hook_attn_out", "hook_resid_pre"] as const satisfies readonly BlockSite[];
export type BiasSite = (typeof BIAS_SITES)[number];
/** The protocol's site (§7.1): the output of mlp.down_proj, before any post-MLP norm. */
export const PROTOCOL_BIAS_SITE: BiasSite = "mlp.hook_down";

/** Validate a --site value. */
export function parseBiasSite(s: string | undefined): BiasSite {
  if (s === undefined) return PROTOCOL_BIAS_SITE;
  if (!(BIAS_SITES as readonly string[]).includes(s)) throw new UsageError(`--site ${s}: expected one of ${BIAS_SITES.join(", ")} (the protocol's is ${PROTOCOL_BIAS_SITE})`);
  return s as BiasSite;
}

/** The deviation a non-protocol site adds to results.json (none at the protocol's site). */
export function siteDeviations(site: BiasSite, blockNorm: string): string[] {
  if (site === PROTOCOL_BIAS_SITE) return [];
  const same = site === "hook_mlp_out" && blockNorm === "pre" ? " (on this pre-norm model the same activation)" : "";
  return [`The bias is added at blocks.{L}.${site} (--site), not at the protocol's down_proj output blocks.{L}.${PROTOCOL_BIAS_SITE}${same}; --site ${PROTOCOL_BIAS_SITE} reproduces the paper.`];
}

/** Deviation of `--eval-protocol main` (the §7.4 evaluation is the default). */
export const MAIN_EVAL_DEVIATION =
  "--eval-protocol main: the evaluation reuses the main injection sweep (the 'original' prompt, injection from the token before 'Trial n' through generation, the main forced prefill) with the bias as an extra add at every position, not §7.4's two-turn prompt with the model's own replies, context-only steering and the prefill 'The injected word is **\"' (--eval-protocol 7.4, the default). Concept vectors are re-extracted with the bias in place (as §7.4 does).";

/** A layer of the 62-layer reference model mapped to a model with `nLayers` layers (the protocol's int(n·fraction)). */
export function scaleLayer(refLayer: number, nLayers: number): number {
  return Math.max(0, Math.min(nLayers - 1, Math.floor((nLayers * refLayer) / REFERENCE_LAYERS)));
}

/** The 400 training / 100 held-out concepts of concepts_500 (seeded shuffle; see PROTOCOL_DEVIATIONS). */
export function protocolSplit(seed: number = BIAS_PROTOCOL.splitSeed): { train: string[]; heldOut: string[] } {
  // The paper's list(set(...)) made the order hash-dependent; here: file order, duplicates dropped, then the seeded shuffle.
  const all = [...new Set(readData<{ concepts: string[] }>("protocol/concepts_500.json").concepts)];
  const order = new Rng(seed).shuffle([...all]);
  return { train: order.slice(0, BIAS_PROTOCOL.trainConcepts), heldOut: order.slice(BIAS_PROTOCOL.trainConcepts, BIAS_PROTOCOL.trainConcepts + BIAS_PROTOCOL.heldOutConcepts) };
}

// ---- loss and gradient with extra interventions -----------------------------------------------

export interface TrainSite {
  at: HookName;
  pos?: PosSpec;
  value: Float32Array;
}

/** What computes the loss and gradients: a Model (its own engine, on any device) or a CpuEngine. */
export interface GradSource {
  lossAndGrad(rows: Row[], req: LossAndGradRequest): Promise<LossAndGradResult>;
}

/**
 * The loss and the gradient of a vector trained at `train.at`, with a plan of fixed interventions
 * applied in the same forward pass (here: the per-row concept injections). Verified against
 * float64 finite differences in test/bias-vector.test.ts.
 */
export async function lossAndGradWithPlan(src: GradSource, rows: Row[], targets: number[][], train: TrainSite, plan: Plan): Promise<{ loss: number; grad: Float32Array }> {
  const r = await src.lossAndGrad(rows, { targets, params: [{ kind: "vector", at: train.at, value: train.value, ...(train.pos ? { pos: train.pos } : {}) }], plan });
  return { loss: r.loss, grad: r.grads[0]![0]! };
}

// ---- training data ------------------------------------------------------------------------------

export interface BiasExample {
  /** Prompt + target tokens. */
  ids: number[];
  /** Per position: the token to predict after it (-1 = no loss). Same length as ids. */
  targets: number[];
  /** The concept vector added at blocks.{layer}.hook_resid_post, scaled, from position `from` on (null = control). */
  inject: { layer: number; vector: Float32Array; strength: number; from: number } | null;
  /** Provenance (not used by training). */
  info?: { kind: "injection" | "control" | "custom"; concept?: string; trialNumber?: number };
}

/** Next-token targets for the tokens from `start` on: targets[i] = ids[i+1] for i ≥ start−1. */
export function targetsFrom(ids: number[], start: number): number[] {
  return ids.map((_, i) => (i >= start - 1 && i + 1 < ids.length ? ids[i + 1]! : -1));
}

export interface BiasDataOptions {
  concepts: string[];
  trialsPerConcept?: number;
  controlRatio?: number;
  /** Absolute injection layers (default: the protocol's 29..55 scaled to the model). */
  injectionLayers?: number[];
  strengths?: number[];
  seed?: number;
  baselineWords?: string[];
  vectorCache?: string | null;
  batchSize?: number;
}

/** The protocol's training examples (§7.2–7.3) for `concepts`, tokenised, with their concept vectors. */
export async function buildBiasData(model: Model, o: BiasDataOptions): Promise<BiasExample[]> {
  const tok = model.tokenizer;
  if (!tok) throw new UsageError(`${model.files.path} has no tokenizer; the bias-vector recipe needs text prompts`);
  const n = model.config.nLayers;
  const layers = o.injectionLayers ?? BIAS_PROTOCOL.injectionLayers.map((l) => scaleLayer(l, n));
  const strengths = o.strengths ?? [...BIAS_PROTOCOL.injectionStrengths];
  const trials = o.trialsPerConcept ?? BIAS_PROTOCOL.trialsPerConcept;
  const ratio = o.controlRatio ?? BIAS_PROTOCOL.controlRatio;
  const rng = new Rng(o.seed ?? BIAS_PROTOCOL.splitSeed);
  const items: { kind: "injection" | "control"; concept: string; n: number; layer: number; strength: number }[] = [];
  for (const concept of o.concepts)
    for (let t = 1; t <= trials; t++) {
      items.push({ kind: "injection", concept, n: t, layer: layers[rng.int(layers.length)]!, strength: strengths[rng.int(strengths.length)]! });
      if (rng.next() < ratio) items.push({ kind: "control", concept, n: t, layer: -1, strength: 0 });
    }
  rng.shuffle(items);
  const used = [...new Set(items.filter((i) => i.kind === "injection").map((i) => i.layer))].sort((a, b) => a - b);
  const vecs =
    used.length > 0
      ? (
          await conceptVectors(model, {
            concepts: o.concepts,
            baselineWords: o.baselineWords ?? readData<{ words: string[] }>("protocol/baseline_words.json").words,
            layers: used,
            recipe: PROTOCOL_RECIPE,
            ...(o.vectorCache !== undefined ? { cacheDir: o.vectorCache } : {}),
            batchSize: o.batchSize ?? 16,
          })
        ).vectors
      : new Map<number, Map<string, Float32Array>>();
  const variant = getVariant("original");
  const prompts = new Map<number, ReturnType<typeof renderTrial>>();
  const sep = model.chatTemplate ? "" : " ";
  return items.map((it) => {
    let p = prompts.get(it.n);
    if (!p) prompts.set(it.n, (p = renderTrial(model, variant, it.n)));
    const target = it.kind === "injection" ? BIAS_PROTOCOL.targetInjection.replace("{concept}", it.concept.toLowerCase()) : BIAS_PROTOCOL.targetControl;
    const ids = tok.encode(p.text + sep + target, { addSpecial: false });
    let cp = 0;
    while (cp < p.ids.length && cp < ids.length && ids[cp] === p.ids[cp]) cp++;
    const vector = it.kind === "injection" ? vecs.get(it.layer)?.get(it.concept) : undefined;
    if (it.kind === "injection" && !vector) throw new UsageError(`internal: no concept vector for ${it.concept} at layer ${it.layer}`);
    return {
      ids,
      targets: targetsFrom(ids, cp),
      inject: vector ? { layer: it.layer, vector, strength: it.strength, from: p.injectFrom } : null,
      info: { kind: it.kind, concept: it.concept, trialNumber: it.n },
    };
  });
}

// ---- the training loop (generic over the loss) ----------------------------------------------------

export interface TrainVectorOptions {
  dim: number;
  /** Examples the schedule draws from (batches walk seeded per-epoch permutations). */
  nExamples: number;
  /** Total optimizer steps (a resumed run continues up to this). */
  steps: number;
  batchSize: number;
  seed: number;
  adam: AdamOptions;
  /** Checkpoint directory (null/undefined = none). A run there is resumed from its latest checkpoint. */
  checkpointDir?: string | null;
  /** Write a checkpoint every N steps (and at the end). Default 50. */
  checkpointEvery?: number;
  /** Recorded with checkpoints; a resume with different values is refused. */
  meta?: Record<string, unknown>;
  onStep?: (step: number, loss: number) => void;
  /** Return after this many steps of this call (tests simulate an interruption with it). */
  stopAfter?: number;
}

export interface TrainVectorResult {
  vector: Float32Array;
  /** Loss of every step from step 1 (including steps of earlier, resumed runs). */
  losses: number[];
  /** Steps completed. */
  step: number;
  /** The checkpoint step this call started from (null = from zero). */
  resumedFrom: number | null;
  adam: AdamState;
}

/** The examples of optimizer step `step` (0-based): consecutive slices of per-epoch seeded permutations. */
export function batchIndices(step: number, batchSize: number, n: number, seed: number, cache = new Map<number, number[]>()): number[] {
  const out: number[] = [];
  for (let k = step * batchSize; k < (step + 1) * batchSize; k++) {
    const epoch = Math.floor(k / n);
    let perm = cache.get(epoch);
    if (!perm) {
      perm = new Rng((Math.imul(seed >>> 0, 1000003) + epoch * 7919 + 1) >>> 0).shuffle(Array.from({ length: n }, (_, i) => i));
      cache.set(epoch, perm);
    }
    out.push(perm[k % n]!);
  }
  return out;
}

interface CheckpointState {
  step: number;
  adamT: number;
  losses: number[];
  meta: Record<string, unknown>;
  savedAt: string;
}

const f32 = (a: Float32Array | Float64Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
function readF(file: string, kind: "f32" | "f64", n: number): Float32Array | Float64Array {
  const b = fs.readFileSync(file);
  const bytes = kind === "f32" ? 4 : 8;
  if (b.byteLength !== n * bytes) throw new UsageError(`${file}: expected ${n} ${kind} values, found ${b.byteLength} bytes; the checkpoint is damaged`);
  const buf = b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
  return kind === "f32" ? new Float32Array(buf) : new Float64Array(buf);
}

/** Write a checkpoint atomically: a fresh step directory, then latest.json renamed into place. */
export function writeCheckpoint(dir: string, vector: Float32Array, adam: AdamState, st: CheckpointState): void {
  const name = `step-${String(st.step).padStart(7, "0")}`;
  const tmp = path.join(dir, `.${name}.tmp-${process.pid}`);
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(tmp, { recursive: true });
  fs.writeFileSync(path.join(tmp, "vector.f32"), f32(vector));
  fs.writeFileSync(path.join(tmp, "adam_m.f64"), f32(adam.m));
  fs.writeFileSync(path.join(tmp, "adam_v.f64"), f32(adam.v));
  fs.writeFileSync(path.join(tmp, "state.json"), JSON.stringify(st) + "\n");
  const final = path.join(dir, name);
  fs.rmSync(final, { recursive: true, force: true });
  fs.renameSync(tmp, final);
  const lt = path.join(dir, `.latest.json.tmp-${process.pid}`);
  fs.writeFileSync(lt, JSON.stringify({ step: st.step, dir: name }) + "\n");
  fs.renameSync(lt, path.join(dir, "latest.json"));
}

/** The latest checkpoint in `dir`, or null. */
export function readCheckpoint(dir: string, dim: number): { vector: Float32Array; adam: AdamState; state: CheckpointState } | null {
  const lf = path.join(dir, "latest.json");
  if (!fs.existsSync(lf)) return null;
  const { dir: name } = JSON.parse(fs.readFileSync(lf, "utf8")) as { dir: string };
  const d = path.join(dir, name);
  const state = JSON.parse(fs.readFileSync(path.join(d, "state.json"), "utf8")) as CheckpointState;
  return {
    vector: readF(path.join(d, "vector.f32"), "f32", dim) as Float32Array,
    adam: { t: state.adamT, m: readF(path.join(d, "adam_m.f64"), "f64", dim) as Float64Array, v: readF(path.join(d, "adam_v.f64"), "f64", dim) as Float64Array },
    state,
  };
}

/**
 * Train one vector with Adam(W) on `lossAndGrad(batch, value)`, checkpointing vector, Adam state,
 * step and loss history every `checkpointEvery` steps; a directory holding a checkpoint is resumed
 * (the same seed gives the same batches, so the result equals an uninterrupted run).
 */
export async function trainVector(lossAndGrad: (batch: number[], value: Float32Array) => Promise<{ loss: number; grad: Float32Array }>, o: TrainVectorOptions): Promise<TrainVectorResult> {
  if (!(o.nExamples > 0)) throw new UsageError("trainVector: no training examples");
  if (!(o.batchSize >= 1) || !Number.isInteger(o.batchSize)) throw new UsageError(`trainVector: batch size must be a positive integer, got ${o.batchSize}`);
  if (!(o.steps >= 0) || !Number.isInteger(o.steps)) throw new UsageError(`trainVector: steps must be a non-negative integer, got ${o.steps}`);
  const meta = { dim: o.dim, nExamples: o.nExamples, batchSize: o.batchSize, seed: o.seed, adam: o.adam, ...(o.meta ?? {}) };
  let vector: Float32Array = new Float32Array(o.dim);
  let adam = adamInit(o.dim);
  let losses: number[] = [];
  let resumedFrom: number | null = null;
  const dir = o.checkpointDir ?? null;
  if (dir) {
    fs.mkdirSync(dir, { recursive: true });
    const ck = readCheckpoint(dir, o.dim);
    if (ck) {
      const want = JSON.stringify(meta);
      const have = JSON.stringify(ck.state.meta);
      if (want !== have) throw new UsageError(`${dir} holds a checkpoint of a different training run (${have}); use another checkpoint directory or the same settings (${want})`);
      vector = ck.vector;
      adam = ck.adam;
      losses = ck.state.losses.slice(0, ck.state.step);
      resumedFrom = ck.state.step;
    }
  }
  const every = o.checkpointEvery ?? 50;
  const perms = new Map<number, number[]>();
  let step = resumedFrom ?? 0;
  let ran = 0;
  const save = () => dir && writeCheckpoint(dir, vector, adam, { step, adamT: adam.t, losses, meta, savedAt: new Date().toISOString() });
  while (step < o.steps && (o.stopAfter === undefined || ran < o.stopAfter)) {
    const batch = batchIndices(step, o.batchSize, o.nExamples, o.seed, perms);
    const { loss, grad } = await lossAndGrad(batch, vector);
    if (!Number.isFinite(loss) || !grad.every(Number.isFinite)) throw new UsageError(`training diverged at step ${step + 1} (loss ${loss}); lower the learning rate`);
    adamStep(vector, grad, adam, o.adam);
    step++;
    ran++;
    losses.push(loss);
    o.onStep?.(step, loss);
    if (dir && (step % every === 0 || step === o.steps)) save();
  }
  if (dir && ran > 0 && step % every !== 0 && step !== o.steps) save();
  return { vector, losses, step, resumedFrom, adam };
}

// ---- the bias vector ------------------------------------------------------------------------------

export interface TrainBiasOptions {
  /** Absolute layer of the bias (default: the protocol's 29/62 scaled to the model). */
  layer?: number;
  /** Where in the block (default mlp.hook_down, the protocol's). */
  site?: BiasSite;
  data: BiasExample[];
  /** Default: one epoch, ceil(examples / batchSize) (the protocol). */
  steps?: number;
  lr?: number;
  batchSize?: number;
  seed?: number;
  weightDecay?: number;
  checkpointDir?: string | null;
  checkpointEvery?: number;
  onStep?: (step: number, loss: number) => void;
  stopAfter?: number;
}

export interface TrainBiasResult extends TrainVectorResult {
  layer: number;
  hook: HookName;
}

export function biasHook(layer: number, site: BiasSite = PROTOCOL_BIAS_SITE): HookName {
  return hookName(layer, site);
}

/** The plan and rows of one training batch (exported for tests: the same forward pass as training). */
export function batchInputs(examples: BiasExample[]): { rows: Row[]; targets: number[][]; plan: Intervention[] } {
  const plan: Intervention[] = [];
  examples.forEach((e, b) => {
    if (e.inject) plan.push({ op: "add", at: hookName(e.inject.layer, "hook_resid_post"), vector: e.inject.vector, scale: e.inject.strength, pos: { from: e.inject.from }, rows: [b] });
  });
  return { rows: examples.map((e) => ({ ids: e.ids })), targets: examples.map((e) => e.targets), plan };
}

function dataHash(data: BiasExample[]): string {
  const h = createHash("sha256");
  for (const e of data) {
    h.update(Int32Array.from(e.ids));
    h.update(Int32Array.from(e.targets));
    if (e.inject) {
      h.update(JSON.stringify([e.inject.layer, e.inject.strength, e.inject.from]));
      h.update(f32(e.inject.vector));
    } else h.update("-");
  }
  return h.digest("hex").slice(0, 16);
}

/** Train the bias vector b at blocks.{layer}.{site} (default mlp.hook_down; all positions) on `data`. */
export async function trainBiasVector(model: Model, o: TrainBiasOptions): Promise<TrainBiasResult> {
  const layer = o.layer ?? scaleLayer(BIAS_PROTOCOL.biasLayer, model.config.nLayers);
  if (!Number.isInteger(layer) || layer < 0 || layer >= model.config.nLayers) throw new UsageError(`bias layer ${layer} is outside 0..${model.config.nLayers - 1}`);
  const at = biasHook(layer, o.site);
  const batchSize = o.batchSize ?? BIAS_PROTOCOL.batchSize;
  const steps = o.steps ?? Math.ceil(o.data.length / batchSize);
  const adam: AdamOptions = { lr: o.lr ?? BIAS_PROTOCOL.lr, weightDecay: o.weightDecay ?? BIAS_PROTOCOL.weightDecay };
  const r = await trainVector(
    async (batch, value) => {
      const { rows, targets, plan } = batchInputs(batch.map((i) => o.data[i]!));
      return lossAndGradWithPlan(model, rows, targets, { at, value }, plan);
    },
    {
      dim: model.config.dModel,
      nExamples: o.data.length,
      steps,
      batchSize,
      seed: o.seed ?? 0,
      adam,
      checkpointDir: o.checkpointDir ?? null,
      ...(o.checkpointEvery !== undefined ? { checkpointEvery: o.checkpointEvery } : {}),
      meta: { hook: at, data: dataHash(o.data), model: model.weightsHash() },
      ...(o.onStep ? { onStep: o.onStep } : {}),
      ...(o.stopAfter !== undefined ? { stopAfter: o.stopAfter } : {}),
    },
  );
  return { ...r, layer, hook: at };
}

// ---- evaluation: the injection sweep with the bias in place --------------------------------------

/**
 * The same model with `vector` added at `at` on every position of every forward pass and
 * generation (what loading the trained adapter does). Everything else is the model itself; its
 * weightsHash covers the bias, so concept-vector caches and run logs keep the two apart.
 */
export function withBias(model: Model, at: HookName, vector: Float32Array): Model {
  return model.withPlan([{ op: "add", at, vector, pos: "all" }]);
}

export interface EvalArm {
  runDir: string;
  results: Results;
}

/** Run (or resume) one injection sweep into `runDir`. */
export async function sweepInto(model: Model, modelPath: string, cfg: InjectConfig, runDir: string, opts: { vectorCache?: string | null; quiet?: boolean; command?: string[] } = {}): Promise<EvalArm> {
  const judges = cfg.judges.map((spec) => makeJudge(spec, { cacheDir: path.join(runDir, "judge-cache") }));
  const unlock = lockRun(runDir);
  try {
    return await sweepLocked(model, modelPath, cfg, runDir, judges, opts);
  } finally {
    unlock();
    for (const j of judges) j.dispose?.();
  }
}

async function sweepLocked(model: Model, modelPath: string, cfg: InjectConfig, runDir: string, judges: Judge[], opts: { vectorCache?: string | null; quiet?: boolean; command?: string[] }): Promise<EvalArm> {
  let prior: RunData | null = null;
  let log: RunLogWriter;
  if (fs.existsSync(path.join(runDir, "log.jsonl"))) {
    prior = readRun(runDir, { repair: true });
    if (JSON.stringify(prior.header.config) !== JSON.stringify(cfg) || prior.header.model.hash !== model.weightsHash()) {
      throw new UsageError(`${runDir} holds a sweep with other settings or another vector; choose another --out`);
    }
    log = RunLogWriter.reopen(runDir);
  } else {
    const header = runHeader(model, modelPath, cfg, opts.command ?? []);
    log = RunLogWriter.create(runDir, header);
  }
  const failures = new JudgeFailures();
  try {
    await runSweep(model, cfg, log, prior, { judges, failures, vectorCache: opts.vectorCache ?? null, progress: progressPrinter(opts.quiet ?? true) });
  } finally {
    log.close();
  }
  const { results } = await finishRun(runDir);
  // The sweep resumes from its log, so rerunning the command retries the failed judgments.
  failures.finish(`rerun the same command (the sweep in ${runDir} resumes)`);
  return { runDir, results };
}

export interface EvaluateBiasOptions {
  /** The bias and where it goes. */
  vector: Float32Array;
  layer: number;
  site?: BiasSite;
  /** Held-out concepts. */
  concepts: string[];
  /** Injection sweep settings (InjectArgs fields; layers/strengths as strings like "3,4"). */
  sweep: Omit<InjectArgs, "model" | "concepts" | "out" | "preset">;
  out: string;
  modelPath: string;
  vectorCache?: string | null;
  quiet?: boolean;
}

export interface BiasEvaluation {
  baseline: EvalArm;
  bias: EvalArm;
  /** bias − baseline for the pooled rates (null where either is undefined). */
  delta: Record<"tpr" | "fpr" | "introspection_rate" | "forced_identification_rate", number | null>;
}

/** TPR / FPR / introspection / forced identification on held-out concepts, without and with the bias. */
export async function evaluateBiasVector(model: Model, o: EvaluateBiasOptions): Promise<BiasEvaluation> {
  const cfg: InjectConfig = { ...buildConfig({ ...o.sweep, model: o.modelPath }, model.config.nLayers, model.chatTemplate !== undefined), concepts: o.concepts };
  const common = { ...(o.vectorCache !== undefined ? { vectorCache: o.vectorCache } : {}), quiet: o.quiet ?? true };
  const baseline = await sweepInto(model, o.modelPath, cfg, path.join(o.out, "baseline"), common);
  const bias = await sweepInto(withBias(model, biasHook(o.layer, o.site), o.vector), o.modelPath, cfg, path.join(o.out, "bias"), common);
  const d = (k: keyof BiasEvaluation["delta"]) => {
    const a = baseline.results[k].estimate;
    const b = bias.results[k].estimate;
    return a === null || b === null ? null : b - a;
  };
  return { baseline, bias, delta: { tpr: d("tpr"), fpr: d("fpr"), introspection_rate: d("introspection_rate"), forced_identification_rate: d("forced_identification_rate") } };
}

// ---- the command ----------------------------------------------------------------------------------

/** Training and §7.4-evaluation settings shared by bias-vector and train-bias-sweep. */
export interface BiasTrainingArgs {
  model: string;
  out: string;
  /** Bias site in the block (default mlp.hook_down). */
  site?: string;
  /** Optimizer steps (default: one epoch over the training examples). */
  steps?: number;
  lr?: number;
  batchSize?: number;
  weightDecay?: number;
  /** Seed of the example draws and batch order (default 0); the split uses splitSeed (default 42). */
  seed?: number;
  splitSeed?: number;
  /** Use only the first N of the 400 training concepts (default all). */
  trainConcepts?: number;
  trialsPerConcept?: number;
  controlRatio?: number;
  checkpointEvery?: number;
  /** Tokens of each of the model's own replies in the §7.4 dialogue (default 200). */
  replyTokens?: number;
  /** Use only the first N of the 100 held-out concepts (default all). */
  evalConcepts?: number;
  /** Evaluation injection layers, e.g. "2,3" (default: the protocol's 20..60 scaled, deduplicated). */
  evalLayers?: string;
  evalStrengths?: string;
  evalTrials?: number;
  maxTokens?: number;
  judges?: string[];
  evalBatchSize?: number;
  device?: DeviceName;
  vectorCache?: string | null;
  quiet?: boolean;
}

export interface BiasVectorArgs extends BiasTrainingArgs {
  /** Bias layer (absolute; default the protocol's 29/62 scaled). */
  layer?: number;
  /** Skip the evaluation sweeps. */
  noEval?: boolean;
  /** "7.4" (default): protocol §7.4's evaluation; "main": the main injection sweep with the bias. */
  evalProtocol?: string;
  /** Control trials per (layer, strength) (default: as many as injection trials per config). */
  evalControls?: number;
  evalForced?: boolean;
  temperature?: number;
}

export interface BiasVectorResults {
  kind: "selfscope.bias-vector";
  version: 1;
  tool: { name: "selfscope"; version: string };
  model: { path: string; hash: string; family: string; nLayers: number; dModel: number; blockNorm: string };
  protocol_deviations: readonly string[];
  engine_notes: string[];
  split: { seed: number; rng: string; train: string[]; held_out: string[]; train_used: number; held_out_used: number };
  training: {
    layer: number;
    site: BiasSite;
    hook: HookName;
    examples: number;
    injection_examples: number;
    control_examples: number;
    injection_layers: number[];
    strengths: number[];
    steps: number;
    batch_size: number;
    lr: number;
    weight_decay: number;
    seed: number;
    resumed_from: number | null;
    loss_curve: number[];
    initial_loss: number | null;
    final_loss: number | null;
    vector_norm: number;
    vector_file: string;
    checkpoint_dir: string;
  };
  /** Which evaluation ran ("7.4" fills evaluation_74, "main" fills evaluation); null with --no-eval. */
  evaluation_protocol: "7.4" | "main" | null;
  evaluation_74: null | {
    settings: { injection_layers: number[]; strengths: number[]; trials_per_concept: number; concepts: string[]; max_tokens: number; reply_tokens: number; temperature: 0; prefill: string; judge: string; judge_approximate: boolean };
    baseline: BiasArmMetrics;
    bias: BiasArmMetrics;
  };
  evaluation: null | {
    settings: { layers: number[]; strengths: number[]; trials_per_concept: number; controls_per_config: number; forced: boolean; max_tokens: number; temperature: number | "model"; judges: string[] };
    baseline: ArmSummary;
    bias: ArmSummary;
    delta: BiasEvaluation["delta"];
  };
}

type ArmSummary = { run_dir: string; tpr: Rate; fpr: Rate; introspection_rate: Rate; forced_identification_rate: Rate; discrimination_p_value: number | null; judge: string; judge_approximate: boolean; by_config: { layer: number | null; strength: number | null; tpr: Rate; fpr: Rate; introspection_rate: Rate; forced_identification_rate: Rate }[] };

function armSummary(a: EvalArm, root: string): ArmSummary {
  const r = a.results;
  return {
    run_dir: path.relative(root, a.runDir),
    tpr: r.tpr,
    fpr: r.fpr,
    introspection_rate: r.introspection_rate,
    forced_identification_rate: r.forced_identification_rate,
    discrimination_p_value: r.discrimination_p_value,
    judge: r.judge,
    judge_approximate: r.judge_approximate,
    by_config: r.by_config.map((c) => ({ layer: c.layer, strength: c.strength, tpr: c.tpr, fpr: c.fpr, introspection_rate: c.introspection_rate, forced_identification_rate: c.forced_identification_rate })),
  };
}

const mean = (xs: number[]) => (xs.length === 0 ? null : xs.reduce((a, b) => a + b, 0) / xs.length);

/**
 * `selfscope bias-vector`: build the protocol's training data, train the bias vector (resumable
 * from DIR/checkpoints), save DIR/bias_vector.f32, evaluate on held-out concepts with and without
 * it (DIR/eval/baseline, DIR/eval/bias: ordinary run directories), write DIR/results.json and
 * DIR/report.html, and return the results.
 */
export async function biasVectorCommand(args: BiasVectorArgs): Promise<BiasVectorResults> {
  if (!args.out) throw new UsageError("bias-vector: --out DIR is required");
  const unlock = lockRun(args.out);
  try {
    return await biasVectorLocked(args);
  } finally {
    unlock();
  }
}

/** The §7.4 evaluation's injection layers: --eval-layers, or the paper's 20/30/40/50/60 of 62 scaled to the model. */
export function protocolEvalLayers(spec: string | undefined, nLayers: number): number[] {
  return spec !== undefined ? parseLayers(spec, nLayers, "--eval-layers", { sorted: true }) : [...new Set(BIAS_PROTOCOL.evalLayers.map((l) => scaleLayer(l, nLayers)))];
}

type TrainingSetArgs = Pick<BiasVectorArgs, "splitSeed" | "trainConcepts" | "evalConcepts" | "seed" | "trialsPerConcept" | "controlRatio" | "vectorCache">;

/** The protocol's concept split (§7.2) and training examples, shared by bias-vector and train-bias-sweep. */
export async function protocolTrainingSet(model: Model, args: TrainingSetArgs): Promise<{ splitSeed: number; split: { train: string[]; heldOut: string[] }; train: string[]; heldOut: string[]; seed: number; injLayers: number[]; data: BiasExample[] }> {
  const splitSeed = args.splitSeed ?? BIAS_PROTOCOL.splitSeed;
  const split = protocolSplit(splitSeed);
  const train = split.train.slice(0, args.trainConcepts ?? split.train.length);
  const heldOut = split.heldOut.slice(0, args.evalConcepts ?? split.heldOut.length);
  const seed = args.seed ?? 0;
  const injLayers = BIAS_PROTOCOL.injectionLayers.map((l) => scaleLayer(l, model.config.nLayers));
  const data = await buildBiasData(model, {
    concepts: train,
    trialsPerConcept: args.trialsPerConcept ?? BIAS_PROTOCOL.trialsPerConcept,
    controlRatio: args.controlRatio ?? BIAS_PROTOCOL.controlRatio,
    injectionLayers: injLayers,
    seed,
    ...(args.vectorCache !== undefined ? { vectorCache: args.vectorCache } : {}),
  });
  return { splitSeed, split, train, heldOut, seed, injLayers, data };
}

async function biasVectorLocked(args: BiasVectorArgs): Promise<BiasVectorResults> {
  // Flags first: a typo must not cost a model load and the training data.
  const site = parseBiasSite(args.site);
  const evalProtocol = args.noEval ? null : (args.evalProtocol ?? "7.4");
  if (evalProtocol !== null && evalProtocol !== "7.4" && evalProtocol !== "main") throw new UsageError(`--eval-protocol ${evalProtocol}: expected 7.4 (the paper's bias evaluation) or main (the injection sweep)`);
  const model = await Model.load(args.model, { device: args.device ?? "cpu" });
  try {
    const nL = model.config.nLayers;
    const out = args.out;
    fs.mkdirSync(out, { recursive: true });
    const { splitSeed, split, train, heldOut, seed, injLayers, data } = await protocolTrainingSet(model, args);
    const layer = args.layer ?? scaleLayer(BIAS_PROTOCOL.biasLayer, nL);
    const evalLayers74 = evalProtocol === "7.4" ? protocolEvalLayers(args.evalLayers, nL) : [];
    const evalStrengths74 = evalProtocol === "7.4" ? parseNumbers(args.evalStrengths ?? BIAS_PROTOCOL.evalStrengths.join(","), "--eval-strengths") : [];
    const batchSize = args.batchSize ?? BIAS_PROTOCOL.batchSize;
    const steps = args.steps ?? Math.ceil(data.length / batchSize);
    const lr = args.lr ?? BIAS_PROTOCOL.lr;
    const weightDecay = args.weightDecay ?? BIAS_PROTOCOL.weightDecay;
    const ckDir = path.join(out, "checkpoints");
    const t0 = performance.now();
    const tr = await trainBiasVector(model, {
      layer,
      site,
      data,
      steps,
      lr,
      batchSize,
      seed,
      weightDecay,
      checkpointDir: ckDir,
      checkpointEvery: args.checkpointEvery ?? 50,
      onStep: (s, loss) => {
        if (!args.quiet) process.stderr.write(`step ${s}/${steps} loss ${loss.toFixed(4)} (${((performance.now() - t0) / 1000).toFixed(0)}s)\n`);
      },
    });
    fs.writeFileSync(path.join(out, "bias_vector.f32"), f32(tr.vector));
    fs.writeFileSync(path.join(out, "loss_curve.json"), JSON.stringify({ step: tr.losses.map((_, i) => i + 1), loss: tr.losses }) + "\n");
    const engineNotes: string[] = [];
    let evaluation: BiasVectorResults["evaluation"] = null;
    let evaluation74: BiasVectorResults["evaluation_74"] = null;
    if (evalProtocol === "7.4") {
      const judge = makeJudge(pickJudges(args.judges)[0]!, { cacheDir: path.join(out, "eval", "judge-cache") });
      try {
        const o = { concepts: heldOut, layers: evalLayers74, strengths: evalStrengths74, trials: args.evalTrials ?? BIAS_PROTOCOL.evalTrials, maxTokens: args.maxTokens ?? BIAS_EVAL.maxTokens, replyTokens: args.replyTokens ?? BIAS_EVAL.replyTokens, judge, batchSize: args.evalBatchSize ?? 16 };
        fs.mkdirSync(path.join(out, "eval", "baseline"), { recursive: true });
        fs.mkdirSync(path.join(out, "eval", "bias"), { recursive: true });
        const baseline = await evaluateBiasArm(model, { ...o, ...(args.vectorCache !== undefined ? { vectorCache: args.vectorCache } : {}), transcript: path.join(out, "eval", "baseline", "trials.jsonl") });
        // The biased model's vectors are never cached (its identity is the bias, not the file).
        const bias = await evaluateBiasArm(withBias(model, tr.hook, tr.vector), { ...o, vectorCache: null, transcript: path.join(out, "eval", "bias", "trials.jsonl") });
        evaluation74 = {
          settings: { injection_layers: o.layers, strengths: o.strengths, trials_per_concept: o.trials, concepts: heldOut, max_tokens: o.maxTokens, reply_tokens: o.replyTokens, temperature: 0, prefill: biasEvalPrefill(), judge: judge.name, judge_approximate: judge.approximate },
          baseline,
          bias,
        };
      } finally {
        judge.dispose?.();
      }
    }
    if (evalProtocol === "main") {
      const evalLayers = args.evalLayers ?? protocolEvalLayers(undefined, nL).join(",");
      const trials = args.evalTrials ?? BIAS_PROTOCOL.evalTrials;
      const sweep: EvaluateBiasOptions["sweep"] = {
        layers: evalLayers,
        strengths: args.evalStrengths ?? BIAS_PROTOCOL.evalStrengths.join(","),
        trials,
        controls: args.evalControls ?? trials * heldOut.length,
        forced: args.evalForced ?? true,
        yesBias: 0,
        judges: pickJudges(args.judges),
        maxTokens: args.maxTokens ?? 100,
        temperature: args.temperature ?? 0,
        seed,
        batchSize: args.evalBatchSize ?? 16,
        variants: "original",
      };
      const ev = await evaluateBiasVector(model, {
        vector: tr.vector,
        layer,
        site,
        concepts: heldOut,
        sweep,
        out: path.join(out, "eval"),
        modelPath: args.model,
        ...(args.vectorCache !== undefined ? { vectorCache: args.vectorCache } : {}),
        quiet: args.quiet ?? false,
      });
      const h = readRun(ev.baseline.runDir).header.config;
      evaluation = {
        settings: { layers: h.layers, strengths: h.strengths, trials_per_concept: h.trialsPerConcept, controls_per_config: h.controlsPerConfig, forced: h.forced, max_tokens: h.generation.maxTokens, temperature: h.generation.temperature, judges: h.judges },
        baseline: armSummary(ev.baseline, out),
        bias: armSummary(ev.bias, out),
        delta: ev.delta,
      };
    }
    let norm = 0;
    for (const x of tr.vector) norm += x * x;
    const results: BiasVectorResults = {
      kind: "selfscope.bias-vector",
      version: 1,
      tool: { name: "selfscope", version: VERSION },
      model: { path: path.resolve(args.model), hash: model.weightsHash(), family: model.family, nLayers: nL, dModel: model.config.dModel, blockNorm: model.config.blockNorm },
      protocol_deviations: [...PROTOCOL_DEVIATIONS, ...siteDeviations(site, model.config.blockNorm), ...(evalProtocol === "main" ? [MAIN_EVAL_DEVIATION] : evalProtocol === "7.4" ? EVAL74_DEVIATIONS : [])],
      engine_notes: engineNotes,
      split: { seed: splitSeed, rng: "selfscope xoshiro128** Fisher–Yates (not Python's random.shuffle)", train: split.train, held_out: split.heldOut, train_used: train.length, held_out_used: heldOut.length },
      training: {
        layer,
        site,
        hook: tr.hook,
        examples: data.length,
        injection_examples: data.filter((e) => e.inject).length,
        control_examples: data.filter((e) => !e.inject).length,
        injection_layers: [...new Set(injLayers)],
        strengths: [...BIAS_PROTOCOL.injectionStrengths],
        steps: tr.step,
        batch_size: batchSize,
        lr,
        weight_decay: weightDecay,
        seed,
        resumed_from: tr.resumedFrom,
        loss_curve: tr.losses,
        initial_loss: tr.losses[0] ?? null,
        final_loss: mean(tr.losses.slice(-Math.max(1, Math.min(10, Math.ceil(tr.losses.length / 10))))),
        vector_norm: Math.sqrt(norm),
        vector_file: "bias_vector.f32",
        checkpoint_dir: "checkpoints",
      },
      evaluation_protocol: evalProtocol,
      evaluation_74: evaluation74,
      evaluation,
    };
    fs.writeFileSync(path.join(out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    fs.writeFileSync(path.join(out, "report.html"), await biasReport(results));
    return results;
  } finally {
    model.dispose();
  }
}

// ---- report ------------------------------------------------------------------------------------

async function biasReport(r: BiasVectorResults): Promise<string> {
  const t = r.training;
  const parts: string[] = [];
  parts.push(`<h1>Trained bias vector — ${escapeHtml(path.basename(r.model.path))}</h1>`);
  parts.push(
    `<p class="small">selfscope ${escapeHtml(r.tool.version)} · ${escapeHtml(r.model.family)}, ${r.model.nLayers} layers, d_model ${r.model.dModel} · bias at <code>${escapeHtml(t.hook)}</code> · ${t.examples} training examples (${t.injection_examples} injection, ${t.control_examples} control) · ${t.steps} steps of ${t.batch_size}, lr ${t.lr}, weight decay ${t.weight_decay}${t.resumed_from !== null ? ` · resumed from step ${t.resumed_from}` : ""}</p>`,
  );
  parts.push(`<h2>Training loss</h2>`);
  if (t.loss_curve.length > 0) {
    parts.push(
      await renderSvg({
        width: 640,
        height: 240,
        data: { values: t.loss_curve.map((loss, i) => ({ step: i + 1, loss })) },
        mark: { type: "line", point: t.loss_curve.length <= 50 },
        encoding: { x: { field: "step", type: "quantitative", axis: { format: "d", tickMinStep: 1 } }, y: { field: "loss", type: "quantitative", title: "cross-entropy (target tokens)" } },
      }),
    );
    parts.push(`<p>first step ${t.initial_loss?.toFixed(4)} → last steps ${t.final_loss?.toFixed(4)}; ‖b‖ = ${t.vector_norm.toPrecision(4)}</p>`);
  } else parts.push(`<p>no steps run</p>`);
  const ev = r.evaluation;
  const e74 = r.evaluation_74;
  parts.push(`<h2>Held-out evaluation${e74 ? " (protocol §7.4)" : ""}</h2>`);
  if (e74) {
    const st = e74.settings;
    parts.push(`<p>${st.concepts.length} held-out concepts × ${st.trials_per_concept} trials · injection layers ${st.injection_layers.join(", ")} · strengths ${st.strengths.join(", ")} · two-turn dialogue with the model's own replies, steering on the context only, forced prefill <code>${escapeHtml(st.prefill)}</code> · greedy, ${st.max_tokens} tokens · judge ${escapeHtml(st.judge)}${st.judge_approximate ? " <b>(rule judge: approximate)</b>" : ""}</p>`);
    const row = (name: string, a: BiasArmMetrics) => `<tr><th>${name}</th>${rateCell(a.tpr)}${rateCell(a.fpr)}${rateCell(a.introspection_rate)}${rateCell(a.forced_identification_rate)}<td class="num">${a.unjudged}</td></tr>`;
    parts.push(`<table><tr><th></th><th>TPR (detection)</th><th>FPR</th><th>introspection</th><th>forced ID</th><th>unjudged</th></tr>${row("without bias", e74.baseline)}${row("with bias", e74.bias)}</table>`);
    const rows = [...e74.baseline.by_config.map((c) => ({ arm: "without bias", ...c })), ...e74.bias.by_config.map((c) => ({ arm: "with bias", ...c }))];
    parts.push(`<table><tr><th>arm</th><th>layer</th><th>strength</th><th>TPR</th><th>introspection</th><th>forced ID</th></tr>${rows.map((c) => `<tr><td>${c.arm}</td><td class="num">${c.layer}</td><td class="num">${c.strength}</td>${rateCell(c.tpr)}${rateCell(c.introspection_rate)}${rateCell(c.forced_identification_rate)}</tr>`).join("")}</table>`);
  } else if (!ev) parts.push(`<p>not run</p>`);
  else {
    const approx = ev.baseline.judge_approximate ? ` <b>(rule judge: approximate; the default only when no LLM judge is configured: set OPENAI_API_KEY or pass --judge)</b>` : "";
    parts.push(`<p>${r.split.held_out_used} held-out concepts · layers ${ev.settings.layers.join(", ")} · strengths ${ev.settings.strengths.join(", ")} · ${ev.settings.trials_per_concept} trials per concept · ${ev.settings.controls_per_config} controls per config · temperature ${ev.settings.temperature}, ${ev.settings.max_tokens} tokens · judge ${escapeHtml(ev.baseline.judge)}${approx}</p>`);
    const row = (name: string, a: ArmSummary) => `<tr><th>${name}</th>${rateCell(a.tpr)}${rateCell(a.fpr)}${rateCell(a.introspection_rate)}${rateCell(a.forced_identification_rate)}<td class="small">${escapeHtml(a.run_dir)}</td></tr>`;
    parts.push(`<table><tr><th></th><th>TPR (detection)</th><th>FPR</th><th>introspection</th><th>forced ID</th><th>run</th></tr>${row("without bias", ev.baseline)}${row("with bias", ev.bias)}</table>`);
    const rows = [
      ...ev.baseline.by_config.map((c) => ({ arm: "without bias", ...c })),
      ...ev.bias.by_config.map((c) => ({ arm: "with bias", ...c })),
    ];
    parts.push(`<table><tr><th>arm</th><th>layer</th><th>strength</th><th>TPR</th><th>FPR</th><th>introspection</th><th>forced ID</th></tr>${rows.map((c) => `<tr><td>${c.arm}</td><td class="num">${c.layer}</td><td class="num">${c.strength}</td>${rateCell(c.tpr)}${rateCell(c.fpr)}${rateCell(c.introspection_rate)}${rateCell(c.forced_identification_rate)}</tr>`).join("")}</table>`);
    const pts = rows.flatMap((c) => (["tpr", "introspection_rate"] as const).flatMap((m) => (c[m].estimate === null ? [] : [{ arm: c.arm, metric: m, layer: c.layer, strength: c.strength, value: c[m].estimate }])));
    if (pts.length > 0) {
      parts.push(
        await renderSvg({
          data: { values: pts },
          facet: { column: { field: "metric", type: "nominal" } },
          spec: { width: 260, height: 200, mark: { type: "line", point: true }, encoding: { x: { field: "strength", type: "quantitative", axis: { format: "~g" } }, y: { field: "value", type: "quantitative", scale: { domain: [0, 1] } }, color: { field: "arm", type: "nominal" }, strokeDash: { field: "layer", type: "nominal" } } },
        }),
      );
    }
  }
  parts.push(`<h2>Differences from the protocol</h2><ul>${r.protocol_deviations.map((d) => `<li>${escapeHtml(d)}</li>`).join("")}</ul>`);
  if (r.engine_notes.length > 0) parts.push(`<h2>Engine notes</h2><ul>${r.engine_notes.map((d) => `<li>${escapeHtml(d)}</li>`).join("")}</ul>`);
  parts.push(`<p class="small">Split (seed ${r.split.seed}, ${escapeHtml(r.split.rng)}): first ${r.split.train_used} of 400 training concepts used; held out: ${escapeHtml(r.split.held_out.slice(0, r.split.held_out_used).join(", "))}</p>`);
  return htmlBodyPage("selfscope bias vector", parts);
}
