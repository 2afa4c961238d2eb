// Geometry of concept vectors (protocol §4.2 and §8; issue 7.4).
//
// - `ldaPartition`: the success/failure split of concepts — adaptive τ search over
//   {0.01..0.99} ∪ {median} × {detection, combined} with 5-fold stratified CV of a shrinkage LDA,
//   midpoint classification, macro-F1 selection (§4.2).
// - mean-difference direction μ_S − μ_F, projections, centroids, silhouette, principal angles.
// - `swapVectors` + `steeringTrials`: the projection/residual swap experiment (§8, 04d).
// - `bidirectionalPairs`: steering with v_A − v_B and v_B − v_A on same-class pairs (§8, 04c).
// - PCA of L2-normalised vectors, ridge regression with nested CV (§8, 04b).
// - `logitLens` of any direction through the unembedding (protocol: no final norm, 04f) and
//   `verbalizability` (04h).
// - `geometryCommand`: all of it on one model, writing DIR/results.json and DIR/report.html.
import fs from "node:fs";
import path from "node:path";
import { seedOf } from "../core/seed.js";
import { UsageError } from "../core/errors.js";
import { parseNumbers } from "../core/parse.js";
import { Rng } from "../core/rng.js";
import { summarizeTrials, trialVerdicts, defaultJudge } from "../eval/metrics.js";
import { firstResponse, getVariant, readData, renderTrial, type Variant } from "../eval/protocol.js";
import { hookName } from "../hooks/names.js";
import type { Intervention } from "../hooks/plan.js";
import type { Tokenizer } from "../io/tokenizer.js";
import { makeJudge, type Judge, type JudgeRequest } from "../judge/judge.js";
import { chooseJudges } from "../judge/select.js";
import { readRun } from "../eval/runlog.js";
import type { Rate } from "../stats/stats.js";
import type { VectorRecipe } from "../vectors/extract.js";
import { readGguf, readGgufTensor } from "../io/gguf.js";
import { openSafetensors, readStTensor, writeSafetensors } from "../io/safetensors.js";
import { resolveModelPath } from "../io/hub-cache.js";
import type { ModelConfig } from "../engine/config.js";
import type { Family, WeightTable } from "../model/family.js";
import { FAMILIES } from "../model/families/index.js";
import { loadHostModel, readJson, resolveModelFiles, type HostTensor } from "../model/load.js";
import { Model } from "../model/model.js";
import type { DeviceName } from "../engine/device.js";
import { wilson } from "../stats/stats.js";
import { conceptVectors, PROTOCOL_RECIPE } from "../vectors/extract.js";
import { deltaPcs } from "../math/noise.js";
import { sampleOptions, type EffectiveSampler } from "../model/sampling.js";
import { classScores, cosine, dot, fromBasis, gram, ldaDualProject, ldaFit, ldaFitGram, ldaPredict, linspace, mean, meanRows, median, nestedRidgeCv, norm, pca, pearson, principalAngleCosines, r2, ridgeCvAlpha, ridgePath, rowBasis, silhouette, stratifiedKFold, sub, toF32, unit, kFold, type ClassScores, type Vec } from "../math/linalg.js";
import { escapeHtml, rateText, htmlPage, htmlTable, plotOrNote } from "../report/page.js";
import { CLASS_COLORS, linesSpec, rateBarsSpec, scatterSpec } from "../report/plots.js";
import { signTest } from "../stats/stats.js";

// ---- per-concept rates -------------------------------------------------------------------------------

export interface ConceptRate {
  concept: string;
  /** P(detect | injection) for the concept. */
  detection_rate: number;
  /** P(detect ∧ identify | injection) — the protocol's "combined" rate. */
  combined_rate: number;
  /** Injection trials behind the rates (when known). */
  n?: number;
}

/** 04b excludes these (none is in the 500-concept list; kept for fidelity). */
export const EXCLUDED_CONCEPTS: readonly string[] = ["Apples", "Bicycles", "Ocean"];

export interface RunRates {
  rates: ConceptRate[];
  layers: number[];
  strengths: number[];
  recipe: VectorRecipe;
  baselineWords: string[];
  judge: string;
}

/**
 * Per-concept detection and combined rates from an inject run. With several (layer, strength,
 * variant) configs, each concept gets its maximum over configs (as 04b).
 */
export function conceptRatesFromRun(runDir: string, judge?: string): RunRates {
  const run = readRun(runDir);
  const j = judge ?? defaultJudge(run);
  const verdicts = trialVerdicts(run, j);
  const groups = new Map<string, { concept: string; trials: typeof run.trials }>();
  for (const t of run.trials) {
    if (t.kind !== "injection" || t.concept === null) continue;
    const key = JSON.stringify([t.concept, t.layer, t.strength, t.variant]);
    const g = groups.get(key) ?? { concept: t.concept, trials: [] };
    g.trials.push(t);
    groups.set(key, g);
  }
  const best = new Map<string, ConceptRate>();
  for (const { concept, trials } of groups.values()) {
    const s = summarizeTrials(trials, verdicts);
    if (s.tpr.estimate === null) continue;
    const cur = best.get(concept);
    const det = s.tpr.estimate;
    const comb = s.introspection_rate.estimate ?? 0;
    if (!cur) best.set(concept, { concept, detection_rate: det, combined_rate: comb, n: s.tpr.n });
    else best.set(concept, { concept, detection_rate: Math.max(cur.detection_rate, det), combined_rate: Math.max(cur.combined_rate, comb), n: Math.max(cur.n ?? 0, s.tpr.n) });
  }
  const order = run.header.config.concepts;
  const rates = order.flatMap((c) => (best.has(c) ? [best.get(c)!] : []));
  return { rates, layers: run.header.config.layers, strengths: run.header.config.strengths, recipe: run.header.config.vectorRecipe, baselineWords: run.header.config.baselineWords, judge: j };
}

/** Read rates from JSON: an array of {concept, detection_rate, combined_rate?} or {rates: [...]}. */
export function readRates(file: string): ConceptRate[] {
  const j = JSON.parse(fs.readFileSync(file, "utf8")) as unknown;
  const arr = Array.isArray(j) ? j : (j as { rates?: unknown }).rates;
  if (!Array.isArray(arr)) throw new UsageError(`${file}: expected an array of {concept, detection_rate, combined_rate} (or {"rates": [...]})`);
  return arr.map((x, i) => {
    const r = x as Record<string, unknown>;
    if (typeof r.concept !== "string" || typeof r.detection_rate !== "number") throw new UsageError(`${file}: entry ${i} needs "concept" (string) and "detection_rate" (number)`);
    return { concept: r.concept, detection_rate: r.detection_rate, combined_rate: typeof r.combined_rate === "number" ? r.combined_rate : r.detection_rate };
  });
}

// ---- LDA partition (§4.2) ---------------------------------------------------------------------------------

export type SplitMetric = "detection_rate" | "combined_rate";

export interface PartitionCandidate {
  metric: SplitMetric;
  tau: number;
  isMedian: boolean;
  nSuccess: number;
  nFailure: number;
  /** Passed the class-size rules (both ≥ minClass, minority share > minMinorityShare). */
  eligible: boolean;
  accuracy: number | null;
  macroF1: number | null;
  balancedAccuracy: number | null;
}

export interface Partition {
  metric: SplitMetric;
  tau: number;
  /** 1 = success (rate > τ), 0 = failure, in the order of the input. */
  labels: number[];
  cv: ClassScores | null;
  candidates: PartitionCandidate[];
  /** True when no candidate was eligible and the protocol's fallback (τ = 0.2, or the median) was used. */
  fallback: boolean;
  note: string;
}

export interface PartitionOptions {
  seed?: number;
  folds?: number;
  minClass?: number;
  minMinorityShare?: number;
  /** Width of the original vectors when `coords` are rowBasis coordinates (for the LDA shrinkage target). */
  ambientDim?: number;
  grid?: readonly number[];
  metrics?: readonly SplitMetric[];
}

/**
 * Cross-validated scores of one labelling: stratified k-fold, shrinkage LDA (kernel form), midpoint
 * rule. `gram` (the rows' Gram matrix) can be passed to avoid recomputing it for every labelling.
 */
export function cvLda(coords: readonly Vec[], labels: readonly number[], opts: { seed?: number; folds?: number; ambientDim?: number; gram?: Float64Array } = {}): ClassScores {
  const n = coords.length;
  const G = opts.gram ?? gram(coords);
  const D = Math.max(coords[0]?.length ?? 0, opts.ambientDim ?? 0);
  const folds = stratifiedKFold(labels, opts.folds ?? 5, opts.seed ?? 42);
  const per: ClassScores[] = [];
  for (const test of folds) {
    if (test.length === 0) continue;
    const inTest = new Set(test);
    const train = labels.map((_, i) => i).filter((i) => !inTest.has(i));
    const m = ldaFitGram(G, n, train, labels, { ambientDim: D });
    const pred = test.map((j) => (ldaDualProject(m, G, n, j) > m.threshold ? 1 : 0));
    per.push(classScores(test.map((i) => labels[i]!), pred));
  }
  return { accuracy: mean(per.map((s) => s.accuracy)), macroF1: mean(per.map((s) => s.macroF1)), balancedAccuracy: mean(per.map((s) => s.balancedAccuracy)) };
}

/** Protocol §4.2's adaptive threshold search (success = rate > τ; pick the best mean macro-F1, first on ties). */
export function ldaPartition(coords: readonly Vec[], rates: readonly ConceptRate[], opts: PartitionOptions = {}): Partition {
  const n = rates.length;
  const grid = opts.grid ?? linspace(0.01, 0.99, 99).map((x) => Math.round(x * 100) / 100);
  const metrics = opts.metrics ?? (["detection_rate", "combined_rate"] as const);
  const minClass = opts.minClass ?? 5;
  const minShare = opts.minMinorityShare ?? 0.2;
  const folds = opts.folds ?? 5;
  const seed = opts.seed ?? 42;
  const memo = new Map<string, ClassScores>();
  const G = gram(coords);
  const candidates: PartitionCandidate[] = [];
  let best: { c: PartitionCandidate; labels: number[]; cv: ClassScores } | null = null;
  for (const metric of metrics) {
    const vals = rates.map((r) => r[metric]);
    const taus = [...grid.map((t) => ({ tau: t, isMedian: false })), { tau: median(vals), isMedian: true }];
    for (const { tau, isMedian } of taus) {
      const labels = vals.map((v) => (v > tau ? 1 : 0));
      const nS = labels.reduce((a: number, b) => a + b, 0);
      const nF = n - nS;
      const eligible = nS >= minClass && nF >= minClass && Math.min(nS, nF) / n > minShare && Math.min(nS, nF) >= folds;
      let cv: ClassScores | null = null;
      if (eligible) {
        const key = labels.join("");
        cv = memo.get(key) ?? cvLda(coords, labels, { seed, folds, gram: G, ...(opts.ambientDim !== undefined ? { ambientDim: opts.ambientDim } : {}) });
        memo.set(key, cv);
      }
      const c: PartitionCandidate = { metric, tau, isMedian, nSuccess: nS, nFailure: nF, eligible, accuracy: cv?.accuracy ?? null, macroF1: cv?.macroF1 ?? null, balancedAccuracy: cv?.balancedAccuracy ?? null };
      candidates.push(c);
      if (cv && (!best || cv.macroF1 > best.cv.macroF1)) best = { c, labels, cv };
    }
  }
  if (best) {
    return {
      metric: best.c.metric,
      tau: best.c.tau,
      labels: best.labels,
      cv: best.cv,
      candidates,
      fallback: false,
      note: `adaptive search: ${candidates.filter((c) => c.eligible).length} eligible splits of ${candidates.length}; best mean macro-F1 ${best.cv.macroF1.toFixed(3)} (${folds}-fold stratified CV, seed ${seed})`,
    };
  }
  const det = rates.map((r) => r.detection_rate);
  let tau = 0.2;
  let labels = det.map((v) => (v > tau ? 1 : 0));
  const nS = labels.reduce((a: number, b) => a + b, 0);
  if (nS === 0 || nS === n) {
    tau = median(det);
    labels = det.map((v) => (v > tau ? 1 : 0));
  }
  return { metric: "detection_rate", tau, labels, cv: null, candidates, fallback: true, note: "no split met the class-size rules; protocol fallback τ = 0.2 on detection (median if a class was empty); no CV scores" };
}

// ---- directions -------------------------------------------------------------------------------------------

export interface MeanDiff {
  /** μ_S − μ_F (raw). */
  diff: Float64Array;
  unit: Float64Array;
  norm: number;
  centroidSuccess: Float64Array;
  centroidFailure: Float64Array;
  /** v_c · d̂ per concept. */
  projections: number[];
}

export function meanDifference(vectors: readonly Vec[], labels: readonly number[]): MeanDiff {
  const S = vectors.filter((_, i) => labels[i] === 1);
  const F = vectors.filter((_, i) => labels[i] === 0);
  if (S.length === 0 || F.length === 0) throw new UsageError("mean difference needs both classes");
  const mS = meanRows(S);
  const mF = meanRows(F);
  const diff = sub(mS, mF);
  const u = unit(diff);
  return { diff, unit: u, norm: norm(diff), centroidSuccess: mS, centroidFailure: mF, projections: vectors.map((v) => dot(v, u)) };
}

// ---- swap experiment (§8, 04d) -------------------------------------------------------------------------------

export type SwapCondition = "original" | "proj_swap" | "delta_swap_random" | "delta_swap_nearest";
export const SWAP_CONDITIONS: readonly SwapCondition[] = ["original", "proj_swap", "delta_swap_random", "delta_swap_nearest"];

export interface SwapVector {
  concept: string;
  condition: SwapCondition;
  /** Trial index within the condition (random residual partners differ per trial). */
  trial: number;
  vector: Float32Array;
  partner: string | null;
}

/**
 * The swap conditions for every concept and trial, with unit direction w: v = s·w + δ. Success
 * concepts take the failure class's mean projection shift (proj_swap) or a failure concept's
 * residual δ (random per trial, or the most cosine-similar one); failure concepts symmetrically.
 * Every swapped vector is rescaled to the concept's original norm.
 */
export function swapVectors(concepts: readonly string[], vectors: readonly Vec[], labels: readonly number[], w: Vec, opts: { trials: number; seed?: number }): SwapVector[] {
  const u = unit(w);
  const s = vectors.map((v) => dot(v, u));
  const delta = vectors.map((v, i) => {
    const d = Float64Array.from(v as ArrayLike<number>);
    for (let k = 0; k < d.length; k++) d[k]! -= s[i]! * u[k]!;
    return d;
  });
  const idxS = labels.flatMap((l, i) => (l === 1 ? [i] : []));
  const idxF = labels.flatMap((l, i) => (l === 0 ? [i] : []));
  const meanS = mean(idxS.map((i) => s[i]!));
  const meanF = mean(idxF.map((i) => s[i]!));
  const rng = new Rng(opts.seed ?? 42);
  const out: SwapVector[] = [];
  const build = (c: number, proj: number, d: Vec) => {
    const v = new Float64Array(d.length);
    for (let k = 0; k < v.length; k++) v[k] = proj * u[k]! + d[k]!;
    const target = norm(vectors[c]!);
    const nv = norm(v);
    return toF32(nv > 0 ? v.map((x) => (x * target) / nv) : v);
  };
  concepts.forEach((concept, c) => {
    const success = labels[c] === 1;
    const others = success ? idxF : idxS;
    const shift = success ? meanF - meanS : meanS - meanF;
    let nearest = -1;
    let bestCos = -Infinity;
    for (const o of others) {
      const cs = cosine(vectors[c]!, vectors[o]!);
      if (cs > bestCos) {
        bestCos = cs;
        nearest = o;
      }
    }
    for (let t = 0; t < opts.trials; t++) {
      out.push({ concept, condition: "original", trial: t, vector: toF32(vectors[c]!), partner: null });
      out.push({ concept, condition: "proj_swap", trial: t, vector: build(c, s[c]! + shift, delta[c]!), partner: null });
      if (others.length > 0) {
        const r = others[rng.int(others.length)]!;
        out.push({ concept, condition: "delta_swap_random", trial: t, vector: build(c, s[c]!, delta[r]!), partner: concepts[r]! });
        out.push({ concept, condition: "delta_swap_nearest", trial: t, vector: build(c, s[c]!, delta[nearest]!), partner: concepts[nearest]! });
      }
    }
  });
  return out;
}

// ---- steering trials (custom vectors through the protocol's trial prompt) ---------------------------------------

export interface SteerTrial {
  key: string;
  /** The concept to identify (null: detection only). */
  concept: string | null;
  vector: Float32Array;
  trialNumber: number;
}

export interface SteerOutcome {
  key: string;
  concept: string | null;
  detected: boolean | null;
  identified: boolean | null;
  text: string;
}

export interface SteerOptions {
  layer: number;
  strength: number;
  judge: Judge;
  maxTokens?: number;
  temperature?: number;
  seed?: number;
  batchSize?: number;
  /** Ask the identification judge after a YES (needs `concept`). */
  identify?: boolean;
  /** The prompt (default protocol 02's "original"; 05's removed-thought prompt, for one). */
  variant?: Variant;
}

/**
 * Protocol-02 injection trials with arbitrary vectors: the "original" prompt for trial n, the vector
 * × strength added at blocks.L.hook_resid_post from the token before "Trial n" through generation,
 * detection judged on every trial, identification after a YES.
 */
export async function steeringTrials(model: Model, trials: readonly SteerTrial[], opts: SteerOptions): Promise<SteerOutcome[]> {
  const v = opts.variant ?? getVariant("original");
  const bs = opts.batchSize ?? 16;
  const out: SteerOutcome[] = [];
  for (let i = 0; i < trials.length; i += bs) {
    const batch = trials.slice(i, i + bs);
    const rows = batch.map((t) => renderTrial(model, v, t.trialNumber, { prefill: null, concept: t.concept }));
    const plan: Intervention[] = batch.map((t, b) => ({ op: "add", at: hookName(opts.layer, "hook_resid_post"), vector: t.vector, scale: opts.strength, pos: { from: rows[b]!.injectFrom }, rows: [b] }));
    const seeds = batch.map((t) => seedOf(opts.seed ?? 42, t.key));
    const res = await model.generate(rows.map((r) => ({ ids: r.ids })), { maxTokens: opts.maxTokens ?? 100, ...sampleOptions(model.sampler({ temperature: opts.temperature ?? 1 })), seed: seeds, plan });
    const texts = batch.map((_, b) => {
      let t = res.texts[b] ?? "";
      if (!model.chatTemplate) t = firstResponse(t);
      return t.replace(/^model\n/, "").trim();
    });
    const det = await opts.judge.judge(batch.map((t, b) => ({ criterion: "detection", question: rows[b]!.question, response: texts[b]!, word: t.concept }) satisfies JudgeRequest));
    const idReqs: { b: number; req: JudgeRequest }[] = [];
    if (opts.identify)
      batch.forEach((t, b) => {
        if (det[b]!.verdict === "YES" && t.concept) idReqs.push({ b, req: { criterion: "identification", question: rows[b]!.question, response: texts[b]!, word: t.concept } });
      });
    const ids = idReqs.length > 0 ? await opts.judge.judge(idReqs.map((r) => r.req)) : [];
    const idOf = new Map(idReqs.map((r, k) => [r.b, ids[k]!.verdict]));
    batch.forEach((t, b) => {
      const d = det[b]!.verdict;
      const idv = idOf.get(b);
      out.push({
        key: t.key,
        concept: t.concept,
        detected: d === null ? null : d === "YES",
        identified: !opts.identify || d === null ? null : d === "NO" ? false : idv === undefined || idv === null ? null : idv === "YES",
        text: texts[b]!,
      });
    });
  }
  return out;
}

// ---- bidirectional pairs (§8, 04c) -----------------------------------------------------------------------------

export interface ConceptPair {
  cls: "S" | "F";
  a: number;
  b: number;
  dProj: number;
  dDetection: number;
}

/**
 * Same-class pairs: candidates with |Δproj| < window on the given axis, sorted by
 * (⌊|Δproj|/bucket⌋, |Δdetection|), taken greedily so each concept is used once, A/B order
 * randomised (seeded), at most maxPairs per class.
 */
export function bidirectionalPairs(labels: readonly number[], proj: readonly number[], detection: readonly number[], opts: { window?: number; bucket?: number; maxPairs?: number; seed?: number } = {}): ConceptPair[] {
  const window = opts.window ?? 200;
  const bucket = opts.bucket ?? window;
  const maxPairs = opts.maxPairs ?? 1000;
  const rng = new Rng(opts.seed ?? 42);
  const out: ConceptPair[] = [];
  for (const cls of [1, 0]) {
    const idx = labels.flatMap((l, i) => (l === cls ? [i] : []));
    const cands: { i: number; j: number; dp: number; dd: number }[] = [];
    for (let x = 0; x < idx.length; x++)
      for (let y = x + 1; y < idx.length; y++) {
        const i = idx[x]!;
        const j = idx[y]!;
        const dp = Math.abs(proj[i]! - proj[j]!);
        if (dp < window) cands.push({ i, j, dp, dd: Math.abs(detection[i]! - detection[j]!) });
      }
    cands.sort((p, q) => Math.floor(p.dp / bucket) - Math.floor(q.dp / bucket) || p.dd - q.dd);
    const used = new Set<number>();
    let n = 0;
    for (const c of cands) {
      if (n >= maxPairs) break;
      if (used.has(c.i) || used.has(c.j)) continue;
      used.add(c.i);
      used.add(c.j);
      const swap = rng.next() < 0.5;
      out.push({ cls: cls === 1 ? "S" : "F", a: swap ? c.j : c.i, b: swap ? c.i : c.j, dProj: c.dp, dDetection: c.dd });
      n++;
    }
  }
  return out;
}

// ---- logit lens and verbalizability (§8, 04f / 04h) ----------------------------------------------------------------

export interface LensToken {
  id: number;
  token: string | null;
  logit: number;
}

export interface LensWeights {
  config: ModelConfig;
  weights: ReadonlyMap<string, HostTensor>;
}

export function unembedding(h: LensWeights): HostTensor {
  const w = h.config.tieEmbeddings ? h.weights.get("embed.weight") : h.weights.get("unembed.weight");
  if (!w) throw new UsageError("logit lens: the model's unembedding is missing");
  return w;
}

/**
 * Only the tensors the logit lens needs (final norm, unembedding — the embedding when tied), read
 * directly from the checkpoint, so a large model is not loaded whole into host memory. Falls back
 * to loadHostModel when a tensor needs a layout transform.
 */
export function loadLensWeights(p: string): LensWeights {
  const files = resolveModelFiles(resolveModelPath(p));
  let family: Family | undefined;
  let config: ModelConfig;
  let table: WeightTable | undefined;
  let read: (name: string) => HostTensor;
  let has: (name: string) => boolean;
  let aliases: ((n: string) => string)[] = [];
  if (files.format === "gguf") {
    const g = readGguf(files.weights);
    const arch = g.metadata.get("general.architecture");
    family = FAMILIES.find((f) => typeof arch === "string" && f.matches.gguf.includes(arch));
    if (!family?.fromGguf) return loadHostModel(p);
    config = family.fromGguf(g);
    table = family.gguf;
    read = (n) => readGgufTensor(g, n);
    has = (n) => g.tensors.has(n);
  } else {
    const hf = readJson(files.configJson!);
    const archs = hf.architectures;
    const arch = Array.isArray(archs) && typeof archs[0] === "string" ? archs[0] : String(hf.model_type ?? "");
    family = FAMILIES.find((f) => f.matches.hf.includes(arch));
    if (!family?.fromHf) return loadHostModel(p);
    config = family.fromHf(hf);
    table = family.safetensors;
    aliases = family.safetensorsAliases ?? [];
    const st = openSafetensors(files.weights);
    read = (n) => readStTensor(st, n);
    has = (n) => st.tensors.has(n);
  }
  const want = ["lnFinal.weight", ...(config.norm.kind === "layer" ? ["lnFinal.bias"] : []), config.tieEmbeddings ? "embed.weight" : "unembed.weight"];
  const weights = new Map<string, HostTensor>();
  for (const canon of want) {
    const src = table?.[canon];
    if (!src || src.transpose || src.split || src.unpermuteRope) return loadHostModel(p);
    const name = [src.name, ...aliases.map((f) => f(src.name))].find(has);
    if (!name) return loadHostModel(p); // let the full loader produce its precise error
    weights.set(canon, read(name));
  }
  return { config, weights };
}

/** The final norm applied to a lone vector (RMSNorm or LayerNorm with the model's gain and bias). */
export function finalNorm(h: LensWeights, x: Vec): Float64Array {
  const c = h.config;
  const g = h.weights.get("lnFinal.weight");
  if (!g) throw new UsageError("logit lens: lnFinal.weight is missing");
  const D = x.length;
  if (c.norm.kind === "rms") {
    let ms = 0;
    for (let i = 0; i < D; i++) ms += x[i]! * x[i]!;
    const r = 1 / Math.sqrt(ms / D + c.norm.eps);
    const off = c.norm.weightOffset;
    return Float64Array.from({ length: D }, (_, i) => x[i]! * r * (off + g.data[i]!));
  }
  const b = h.weights.get("lnFinal.bias");
  const m = mean(Array.from(x as ArrayLike<number>));
  let v = 0;
  for (let i = 0; i < D; i++) v += (x[i]! - m) ** 2;
  const r = 1 / Math.sqrt(v / D + c.norm.eps);
  return Float64Array.from({ length: D }, (_, i) => (x[i]! - m) * r * g.data[i]! + (b ? b.data[i]! : 0));
}

/**
 * Top and bottom k tokens of `direction` read through the unembedding: logits = d · W_U[t] for
 * every token (protocol 04f: the unit direction, no final norm). `norm: "final"` applies the final
 * norm to the direction first (the "normed direction" variant).
 */
export function logitLens(h: LensWeights, direction: Vec, opts: { k?: number; norm?: "none" | "final"; tokenizer?: Tokenizer; unitLength?: boolean } = {}): { top: LensToken[]; bottom: LensToken[]; logits: Float64Array } {
  const W = unembedding(h);
  const [V, D] = W.shape as [number, number];
  if (direction.length !== D) throw new UsageError(`logit lens: direction has length ${direction.length}, the model's width is ${D}`);
  let d: Vec = opts.unitLength === false ? direction : unit(direction);
  if (opts.norm === "final") d = finalNorm(h, d);
  const logits = new Float64Array(V);
  for (let t = 0; t < V; t++) {
    let s = 0;
    const o = t * D;
    for (let i = 0; i < D; i++) s += W.data[o + i]! * d[i]!;
    logits[t] = s;
  }
  const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => logits[b]! - logits[a]! || a - b);
  const k = Math.min(opts.k ?? 20, V);
  const tok = (id: number): LensToken => ({ id, token: opts.tokenizer?.idToToken(id) ?? null, logit: logits[id]! });
  return { top: order.slice(0, k).map(tok), bottom: order.slice(-k).reverse().map(tok), logits };
}

export interface Verbalizability {
  concept: string;
  /** max over single-token variants of v_c · W_U[t] (null: no single-token variant). */
  score: number | null;
  token: string | null;
}

/** Protocol 04h: the best unembedding match among the concept's single-token spellings (raw vector, no norm). */
export function verbalizability(h: LensWeights, tokenizer: Tokenizer, concepts: readonly string[], vectors: readonly Vec[]): Verbalizability[] {
  const W = unembedding(h);
  const D = W.shape[1]!;
  return concepts.map((c, i) => {
    const cap = c.length > 0 ? c[0]!.toUpperCase() + c.slice(1).toLowerCase() : c;
    const variants = [c, c.toLowerCase(), " " + c, " " + c.toLowerCase(), " " + cap];
    let best: number | null = null;
    let token: string | null = null;
    for (const s of new Set(variants)) {
      const ids = tokenizer.encode(s, { addSpecial: false });
      if (ids.length !== 1) continue;
      const t = ids[0]!;
      let score = 0;
      for (let k = 0; k < D; k++) score += vectors[i]![k]! * W.data[t * D + k]!;
      if (best === null || score > best) {
        best = score;
        token = tokenizer.idToToken(t) ?? String(t);
      }
    }
    return { concept: c, score: best, token };
  });
}

/** A 1-feature ridge baseline (StandardScaler + Ridge, best α by K-fold CV): out-of-fold R². */
export function oneFeatureR2(x: readonly number[], y: readonly number[], opts: { alphas?: readonly number[]; folds?: number; seed?: number } = {}): { r2: number; alpha: number } {
  const alphas = opts.alphas ?? [1, 10, 100, 500, 1000, 5000, 10000];
  const n = x.length;
  const k = Math.min(opts.folds ?? 30, n);
  if (n < 3 || k < 2) return { r2: NaN, alpha: NaN };
  const folds = kFold(n, k, opts.seed ?? 42);
  let bestR2 = -Infinity;
  let bestA = alphas[0]!;
  for (const a of alphas) {
    const pred = new Array<number>(n).fill(0);
    for (const test of folds) {
      const inTest = new Set(test);
      const tr = x.flatMap((v, i) => (inTest.has(i) ? [] : [i]));
      const mx = mean(tr.map((i) => x[i]!));
      const sd = Math.sqrt(mean(tr.map((i) => (x[i]! - mx) ** 2))) || 1;
      const rows = tr.map((i) => [(x[i]! - mx) / sd]);
      const p = ridgePath(rows, tr.map((i) => y[i]!), [a]);
      for (const i of test) pred[i] = p.coefs[0]![0]! * ((x[i]! - mx) / sd) + p.intercepts[0]!;
    }
    const score = r2(y, pred);
    if (score > bestR2) {
      bestR2 = score;
      bestA = a;
    }
  }
  return { r2: bestR2, alpha: bestA };
}

// ---- the command ---------------------------------------------------------------------------------------------------

export interface GeometryArgs {
  model: string;
  out: string;
  /** An inject run directory: concepts, layer, strength, vector recipe and per-concept rates. */
  run?: string;
  /** Per-concept rates JSON (overrides the run's rates; required without a run). */
  rates?: string;
  /** Layer of the concept vectors (default: the run's first layer, else round(0.6·depth)). */
  layer?: number;
  /** Steering strength for swap / bidirectional trials (default: the run's first, else 4). */
  strength?: number;
  seed?: number;
  folds?: number;
  /** "adaptive" (default, §4.2) or "fixed" (success = detection > 0.2, as 04f/04g). */
  split?: "adaptive" | "fixed";
  /** Trials per (concept, condition) for the swap experiment and per direction for pairs; 0 skips both (protocol 100). */
  trials?: number;
  /** Default true; `noSwap` / `noBidirectional` turn them off (for CLI flags). */
  swap?: boolean;
  bidirectional?: boolean;
  noSwap?: boolean;
  noBidirectional?: boolean;
  /** Unit direction for the swap decomposition: mean difference (paper §4.1, default) or the ridge axis (04d script). */
  swapDirection?: "meandiff" | "ridge";
  maxPairs?: number;
  pairWindow?: number;
  /** δ-PCs (04c §4.3): skip them; use every S–S pair instead of those that work both ways; pairs swept individually (30); PCs (10); α grid; trials per (vector, α). */
  noDpc?: boolean;
  dpcAllPairs?: boolean;
  dpcMaxPairs?: number;
  dpcK?: number;
  dpcAlphas?: string;
  dpcTrials?: number;
  maxTokens?: number;
  temperature?: number;
  judges?: string[];
  /** Tokens listed each side by the logit lens (default 200, as the protocol; the report shows the first 30). */
  lensK?: number;
  batchSize?: number;
  device?: DeviceName;
  vectorCache?: string | null;
  quiet?: boolean;
}

interface RateRow {
  condition: string;
  cls: "S" | "F";
  detection: Rate;
  introspection: Rate;
  /** Mean over concepts of (condition − original) detection, and a sign test across concepts. */
  mean_delta_detection: number | null;
  sign_test_p: number | null;
}

export interface GeometryResults {
  recipe: "geometry";
  protocol: string;
  model: { path: string; family: string; nLayers: number; dModel: number };
  source: { run: string | null; rates: string | null; judge: string | null };
  /** The judge of the swap and bidirectional trials; `note` says why it was chosen when no --judge was given. */
  steering_judge: { name: string; approximate: boolean; note: string | null };
  /** mean_diff, mean_diff_unit, centroids, lda_axis and ridge_axis (unit, sign-corrected; 04b's primary_axis) as F32 safetensors. */
  directions_file: string;
  layer: number;
  strength: number;
  approximations: string[];
  concepts: { concept: string; detection_rate: number; combined_rate: number; label: "S" | "F"; norm: number; meandiff_projection: number; ridge_projection: number | null; lda_projection: number; verbalizability: number | null }[];
  partition: Omit<Partition, "labels"> & { nSuccess: number; nFailure: number; lda_shrinkage: number; lda_train: ClassScores };
  mean_difference: { norm: number; silhouette: number; principal_angle_cosines: number[]; centroid_norms: { success: number; failure: number }; cosine_with_ridge: number | null; cosine_with_lda: number };
  pca: { explained_variance_ratio: number[]; cumulative: number[]; components: number; scores: { concept: string; pc1: number; pc2: number }[] };
  ridge: { target: SplitMetric; alphas: number[]; fold_r2: number[]; mean_r2: number; fold_alpha: number[]; final_alpha: number; sign_flipped: boolean; oof: { concept: string; y: number; pred: number }[] } | null;
  logit_lens: { direction: string; norm: "none" | "final"; top: LensToken[]; bottom: LensToken[] }[];
  verbalizability: { n_single_token: number; r2_verbalizability: number | null; r2_meandiff_projection: number | null; corr_with_projection: number | null };
  swap: { direction: "meandiff" | "ridge"; trials_per_condition: number; rows: RateRow[] } | null;
  bidirectional: { window: number; trials_per_direction: number; threshold: number; pairs: { cls: "S" | "F"; a: string; b: string; rate_ab: number; rate_ba: number; both: boolean }[]; success: { S: Rate; F: Rate } } | null;
  /** 04c §4.3: u = v_A − v_B of S–S pairs (that work both ways, unless all pairs were asked for) minus its d̂ part; PCA; α sweeps of pairs and PCs. */
  delta_pcs: {
    pairs: number;
    selection: "bidirectional" | "all";
    explained_variance_ratio: number[];
    mean_norm: number;
    alphas: number[];
    unsteered: Rate;
    curves: { vector: string; kind: "pc" | "pair"; detection: { alpha: number; rate: Rate }[] }[];
    note: string | null;
  } | null;
  timings_ms: Record<string, number>;
  /** The steering trials' effective sampler (the checkpoint's generation config under --temperature). */
  sampler?: EffectiveSampler;
}

const GEOMETRY_APPROXIMATIONS = [
  "LDA is our own two-class LDA with a Ledoit-Wolf-shrunk pooled within-class covariance (needed when d > n); sklearn's default (svd solver, no shrinkage) restricts to the span of the data instead. Stratified folds are dealt from selfscope's seeded PRNG, not sklearn's, so the chosen τ can differ from a sklearn run on the same data.",
  "Ridge folds (outer shuffled 5-fold, inner contiguous 3-fold, final contiguous 5-fold) follow sklearn's KFold/RidgeCV layout but shuffle with selfscope's PRNG.",
  "The verbalizability baseline reports out-of-fold R² of pooled predictions (K = min(30, n) folds), best α on the same folds (not nested).",
  "Swap and bidirectional trials use the protocol-02 'original' prompt and positions with the configured LLM judge by default (OPENAI_API_KEY), else the rule judge (approximate). Paired tests are exact sign tests over concepts of (condition − original) detection rates.",
  "Bidirectional pairs use the protocol's |Δproj| < 200 window on the ridge axis (mean difference when ridge is unavailable); that window is in Gemma-3-27B units, so on small models every same-class pair qualifies and the order is by |Δdetection|.",
];

/**
 * 04c §4.3: for S–S pairs (those that work both ways, or all), u = (v_A − v_B) minus its d̂ part;
 * the centred u's principal components; detection when steering with α·u (up to `maxPairs` pairs)
 * and α·PC·mean‖u‖ over the α grid (× the steering strength; α = 0 is one unsteered group).
 */
async function deltaPcSweeps(
  model: Model,
  rows: NonNullable<GeometryResults["bidirectional"]>["pairs"],
  concepts: readonly string[],
  vectors: readonly Float64Array[],
  dHat: Vec,
  steer: SteerOptions,
  o: { all: boolean; maxPairs: number; k: number; alphas: number[]; trials: number },
  log: (s: string) => void,
): Promise<GeometryResults["delta_pcs"]> {
  const pairs = rows.filter((r) => r.cls === "S" && (o.all || r.both));
  const base = { pairs: pairs.length, selection: o.all ? ("all" as const) : ("bidirectional" as const), alphas: o.alphas };
  if (pairs.length < 2) return { ...base, explained_variance_ratio: [], mean_norm: 0, unsteered: wilson(0, 0), curves: [], note: `${pairs.length} S–S pair(s) ${o.all ? "" : "worked both ways "}: δ-PCs need 2 or more${o.all ? "" : " (--dpc-all-pairs uses every S–S pair)"}` };
  const idx = (c: string) => concepts.indexOf(c);
  const diffs = pairs.map((p) => sub(vectors[idx(p.a)]!, vectors[idx(p.b)]!));
  const dp = deltaPcs(diffs, dHat, o.k);
  const named: { vector: string; kind: "pc" | "pair"; v: Float64Array }[] = [
    ...dp.pcs.map((pc, j) => ({ vector: `PC${j + 1}`, kind: "pc" as const, v: pc.map((x) => x * dp.meanNorm) })),
    ...pairs.slice(0, o.maxPairs).map((p, j) => ({ vector: `${p.a} − ${p.b}`, kind: "pair" as const, v: dp.u[j]! })),
  ];
  const st: SteerTrial[] = [];
  for (let tr = 0; tr < o.trials; tr++) st.push({ key: `dpc|unsteered|${tr}`, concept: null, vector: new Float32Array(dHat.length), trialNumber: (tr % 10) + 1 });
  for (const [ni, n] of named.entries())
    for (const al of o.alphas) {
      if (al === 0) continue;
      const v = toF32(n.v.map((x) => x * al));
      for (let tr = 0; tr < o.trials; tr++) st.push({ key: `dpc|${ni}|${al}|${tr}`, concept: null, vector: v, trialNumber: (tr % 10) + 1 });
    }
  log(`δ-PCs: ${pairs.length} pairs, ${dp.pcs.length} PCs, ${st.length} trials`);
  const res = await steeringTrials(model, st, steer);
  const rate = (prefix: string) => {
    const r = res.filter((x) => x.key.startsWith(prefix) && x.detected !== null);
    return wilson(r.filter((x) => x.detected).length, r.length);
  };
  const unsteered = rate("dpc|unsteered|");
  return {
    ...base,
    explained_variance_ratio: dp.explainedVarianceRatio,
    mean_norm: dp.meanNorm,
    unsteered,
    curves: named.map((n, ni) => ({ vector: n.vector, kind: n.kind, detection: o.alphas.map((al) => ({ alpha: al, rate: al === 0 ? unsteered : rate(`dpc|${ni}|${al}|`) })) })),
    note: null,
  };
}

/** Protocol §4.2 + §8 on one model's concept vectors. */
export async function geometryCommand(args: GeometryArgs): Promise<GeometryResults> {
  const t0 = performance.now();
  const timings: Record<string, number> = {};
  const lap = (k: string, since: number) => (timings[k] = Math.round(performance.now() - since));
  const log = (s: string) => {
    if (!args.quiet) process.stderr.write(`[geometry] ${s}\n`);
  };
  const seed = args.seed ?? 42;
  let rates: ConceptRate[];
  let recipe: VectorRecipe = PROTOCOL_RECIPE;
  let baselineWords = readData<{ words: string[] }>("protocol/baseline_words.json").words;
  let runLayer: number | undefined;
  let runStrength: number | undefined;
  let judgeName: string | null = null;
  if (args.run) {
    const rr = conceptRatesFromRun(args.run);
    rates = rr.rates;
    recipe = rr.recipe;
    baselineWords = rr.baselineWords;
    runLayer = rr.layers[0];
    runStrength = rr.strengths[0];
    judgeName = rr.judge;
  } else rates = [];
  if (args.rates) {
    const given = readRates(args.rates);
    if (args.run) {
      const known = new Set(rates.map((r) => r.concept));
      const unknown = given.filter((g) => !known.has(g.concept)).map((g) => g.concept);
      if (unknown.length > 0) throw new UsageError(`${args.rates}: concepts not in the run: ${unknown.slice(0, 5).join(", ")}`);
    }
    rates = given;
  }
  if (!args.run && !args.rates) throw new UsageError("geometry: pass --run RUN_DIR (an inject run) and/or --rates FILE (per-concept rates)");
  rates = rates.filter((r) => !EXCLUDED_CONCEPTS.includes(r.concept));
  if (rates.length < 4) throw new UsageError(`geometry: need at least 4 concepts with rates, got ${rates.length}`);
  const concepts = rates.map((r) => r.concept);
  fs.mkdirSync(args.out, { recursive: true });

  const model = await Model.load(args.model, { device: args.device ?? "cpu" });
  try {
    const nL = model.config.nLayers;
    const layer = args.layer ?? runLayer ?? Math.min(nL - 1, Math.round(0.6 * nL));
    const strength = args.strength ?? runStrength ?? 4;
    if (!Number.isInteger(layer) || layer < 0 || layer >= nL) throw new UsageError(`layer ${layer} is outside 0..${nL - 1}`);
    let t = performance.now();
    log(`concept vectors for ${concepts.length} concepts at layer ${layer}`);
    const vs = await conceptVectors(model, { concepts, baselineWords, layers: [layer], recipe, cacheDir: args.vectorCache ?? null, batchSize: args.batchSize ?? 16 });
    const vectors = concepts.map((c) => Float64Array.from(vs.vectors.get(layer)!.get(c)!));
    lap("vectors", t);

    // Partition
    t = performance.now();
    const basis = rowBasis(vectors);
    const coords = basis.coords;
    const D = model.config.dModel;
    let part: Partition;
    if (args.split === "fixed") {
      const labels = rates.map((r) => (r.detection_rate > 0.2 ? 1 : 0));
      const ok = labels.some((l) => l === 1) && labels.some((l) => l === 0) && Math.min(labels.filter((l) => l === 1).length, labels.filter((l) => l === 0).length) >= (args.folds ?? 5);
      part = { metric: "detection_rate", tau: 0.2, labels, cv: ok ? cvLda(coords, labels, { seed, folds: args.folds ?? 5, ambientDim: D }) : null, candidates: [], fallback: false, note: "fixed rule: success = detection_rate > 0.2 (04f/04g)" };
    } else part = ldaPartition(coords, rates, { seed, folds: args.folds ?? 5, ambientDim: D });
    const labels = part.labels;
    const nS = labels.filter((l) => l === 1).length;
    if (nS === 0 || nS === labels.length) throw new UsageError(`geometry: the split (τ = ${part.tau} on ${part.metric}) leaves one class empty; the per-concept rates do not vary enough`);
    const ldaAll = ldaFit(coords, labels, { ambientDim: D });
    const ldaDir = unit(fromBasis(basis, ldaAll.w));
    const ldaTrain = classScores(labels, ldaPredict(ldaAll, coords));
    lap("partition", t);

    // Mean difference, silhouette, principal angles
    const md = meanDifference(vectors, labels);
    const sil = silhouette(coords, labels);
    const pcS = vectors.filter((_, i) => labels[i] === 1);
    const pcF = vectors.filter((_, i) => labels[i] === 0);
    const angles = pcS.length >= 2 && pcF.length >= 2 ? principalAngleCosines(pca(pcS, 5).components, pca(pcF, 5).components) : [];

    // PCA of normalised vectors
    t = performance.now();
    const normed = vectors.map((v) => unit(v));
    const P = pca(normed, 10);
    const cum: number[] = [];
    P.explainedVarianceRatio.reduce((a, v) => (cum.push(a + v), a + v), 0);
    lap("pca", t);

    // Ridge (nested CV), target = the partition's metric
    t = performance.now();
    const alphas = linspace(-2, 8, 25).map((e) => 10 ** e);
    const y = rates.map((r) => r[part.metric]);
    let ridge: GeometryResults["ridge"] = null;
    let ridgeDir: Float64Array | null = null;
    if (concepts.length >= 10) {
      const nested = nestedRidgeCv(coords, y, alphas, { outer: 5, inner: 3, seed });
      const { alpha } = ridgeCvAlpha(coords, y, alphas, Math.min(5, concepts.length));
      const fit = ridgePath(coords, y, [alpha]);
      let dir = fromBasis(basis, fit.coefs[0]!);
      let flipped = false;
      if (norm(dir) > 0) {
        dir = unit(dir);
        const pr = vectors.map((v) => dot(v, dir));
        if (pearson(pr, y) < 0) {
          dir = dir.map((x) => -x);
          flipped = true;
        }
        ridgeDir = dir;
      }
      ridge = { target: part.metric, alphas, fold_r2: nested.foldR2, mean_r2: nested.meanR2, fold_alpha: nested.foldAlpha, final_alpha: alpha, sign_flipped: flipped, oof: concepts.map((c, i) => ({ concept: c, y: y[i]!, pred: nested.oofPred[i]! })) };
    }
    lap("ridge", t);

    // Logit lens + verbalizability (host weights)
    t = performance.now();
    const host = loadLensWeights(args.model);
    const k = args.lensK ?? 200;
    const tok = model.tokenizer;
    const lens: GeometryResults["logit_lens"] = [];
    const lensOpts = { k, ...(tok ? { tokenizer: tok } : {}) };
    lens.push({ direction: "mean difference d̂ (μ_S − μ_F)", norm: "none", ...pickLens(logitLens(host, md.unit, lensOpts)) });
    lens.push({ direction: "mean difference d̂, final norm applied", norm: "final", ...pickLens(logitLens(host, md.unit, { ...lensOpts, norm: "final" })) });
    if (ridgeDir) lens.push({ direction: "ridge axis", norm: "none", ...pickLens(logitLens(host, ridgeDir, lensOpts)) });
    const verb = tok ? verbalizability(host, tok, concepts, vectors) : concepts.map((c) => ({ concept: c, score: null, token: null }));
    const vIdx = verb.flatMap((v, i) => (v.score === null ? [] : [i]));
    const vb = vIdx.length >= 3 ? oneFeatureR2(vIdx.map((i) => verb[i]!.score!), vIdx.map((i) => y[i]!), { seed }) : null;
    const pb = vIdx.length >= 3 ? oneFeatureR2(vIdx.map((i) => md.projections[i]!), vIdx.map((i) => y[i]!), { seed }) : null;
    const verbal = {
      n_single_token: vIdx.length,
      r2_verbalizability: vb ? vb.r2 : null,
      r2_meandiff_projection: pb ? pb.r2 : null,
      corr_with_projection: vIdx.length >= 3 ? pearson(vIdx.map((i) => verb[i]!.score!), vIdx.map((i) => md.projections[i]!)) : null,
    };
    lap("lens", t);

    // Steering experiments
    const trials = args.trials ?? 10;
    const judgeChoice = chooseJudges(args.judges);
    if (judgeChoice.note !== null) process.stderr.write(judgeChoice.note + "\n");
    const judge = makeJudge(judgeChoice.specs[0]!, { cacheDir: path.join(args.out, "judge-cache") });
    const steer: SteerOptions = { layer, strength, judge, maxTokens: args.maxTokens ?? 100, temperature: args.temperature ?? 1, seed, batchSize: args.batchSize ?? 16 };
    let swap: GeometryResults["swap"] = null;
    let bidir: GeometryResults["bidirectional"] = null;
    let dpc: GeometryResults["delta_pcs"] = null;
    try {
      if (trials > 0 && (args.swap ?? true) && !args.noSwap) {
        t = performance.now();
        const dirName = args.swapDirection ?? "meandiff";
        const w = dirName === "ridge" && ridgeDir ? ridgeDir : md.unit;
        log(`swap experiment: ${concepts.length} concepts × ${SWAP_CONDITIONS.length} conditions × ${trials} trials`);
        const sv = swapVectors(concepts, vectors, labels, w, { trials, seed });
        const outcomes = await steeringTrials(
          model,
          sv.map((s, i) => ({ key: `swap|${s.concept}|${s.condition}|${s.trial}|${i}`, concept: s.concept, vector: s.vector, trialNumber: (s.trial % 10) + 1 })),
          { ...steer, identify: true },
        );
        swap = { direction: dirName === "ridge" && ridgeDir ? "ridge" : "meandiff", trials_per_condition: trials, rows: swapRows(sv, outcomes, concepts, labels) };
        lap("swap", t);
      }
      if (trials > 0 && (args.bidirectional ?? true) && !args.noBidirectional) {
        t = performance.now();
        const axis = ridgeDir ?? md.unit;
        const proj = vectors.map((v) => dot(v, axis));
        const pairs = bidirectionalPairs(labels, proj, rates.map((r) => r.detection_rate), { window: args.pairWindow ?? 200, maxPairs: args.maxPairs ?? 1000, seed });
        log(`bidirectional steering: ${pairs.length} pairs × 2 directions × ${trials} trials`);
        const st: SteerTrial[] = [];
        pairs.forEach((p, pi) => {
          const ab = toF32(sub(vectors[p.a]!, vectors[p.b]!));
          const ba = toF32(sub(vectors[p.b]!, vectors[p.a]!));
          for (let tr = 0; tr < trials; tr++) {
            st.push({ key: `pair|${pi}|ab|${tr}`, concept: null, vector: ab, trialNumber: (tr % 10) + 1 });
            st.push({ key: `pair|${pi}|ba|${tr}`, concept: null, vector: ba, trialNumber: (tr % 10) + 1 });
          }
        });
        const res = st.length > 0 ? await steeringTrials(model, st, steer) : [];
        const rate = (pi: number, dir: "ab" | "ba") => {
          const r = res.filter((o) => o.key.startsWith(`pair|${pi}|${dir}|`) && o.detected !== null);
          return r.length === 0 ? 0 : r.filter((o) => o.detected).length / r.length;
        };
        const rows = pairs.map((p, pi) => {
          const ab = rate(pi, "ab");
          const ba = rate(pi, "ba");
          return { cls: p.cls, a: concepts[p.a]!, b: concepts[p.b]!, rate_ab: ab, rate_ba: ba, both: ab > part.tau && ba > part.tau };
        });
        const succ = (cls: "S" | "F") => wilson(rows.filter((r) => r.cls === cls && r.both).length, rows.filter((r) => r.cls === cls).length);
        bidir = { window: args.pairWindow ?? 200, trials_per_direction: trials, threshold: part.tau, pairs: rows, success: { S: succ("S"), F: succ("F") } };
        lap("bidirectional", t);
        if (!args.noDpc) {
          t = performance.now();
          dpc = await deltaPcSweeps(model, rows, concepts, vectors, md.unit, steer, { all: !!args.dpcAllPairs, maxPairs: args.dpcMaxPairs ?? 30, k: args.dpcK ?? 10, alphas: args.dpcAlphas ? parseNumbers(args.dpcAlphas, "--dpc-alphas") : linspace(-1.5, 1.5, 13), trials: args.dpcTrials ?? trials }, log);
          lap("delta_pcs", t);
        }
      }
    } finally {
      judge.dispose?.();
    }

    const ldaProj = vectors.map((v) => dot(v, ldaDir));
    const dirFile = path.join(args.out, "geometry_directions.safetensors");
    const vec = (v: Vec) => ({ data: toF32(v), shape: [D] });
    writeSafetensors(
      dirFile,
      {
        mean_diff: vec(md.diff),
        mean_diff_unit: vec(md.unit),
        centroid_success: vec(md.centroidSuccess),
        centroid_failure: vec(md.centroidFailure),
        lda_axis: vec(ldaDir),
        ...(ridgeDir ? { ridge_axis: vec(ridgeDir) } : {}),
      },
      { layer: String(layer), model: args.model, split: `${part.metric} > ${part.tau}` },
    );
    const results: GeometryResults = {
      recipe: "geometry",
      protocol: "docs/protocol.md §4.2 (LDA partition) and §8 (geometry analyses); issue 7.4",
      model: { path: args.model, family: model.family, nLayers: nL, dModel: D },
      source: { run: args.run ?? null, rates: args.rates ?? null, judge: judgeName },
      steering_judge: { name: judge.name, approximate: judge.approximate, note: judgeChoice.note },
      directions_file: path.basename(dirFile),
      layer,
      strength,
      sampler: model.sampler({ temperature: steer.temperature ?? 1 }),
      approximations: GEOMETRY_APPROXIMATIONS,
      concepts: concepts.map((c, i) => ({
        concept: c,
        detection_rate: rates[i]!.detection_rate,
        combined_rate: rates[i]!.combined_rate,
        label: labels[i] === 1 ? "S" : "F",
        norm: norm(vectors[i]!),
        meandiff_projection: md.projections[i]!,
        ridge_projection: ridgeDir ? dot(vectors[i]!, ridgeDir) : null,
        lda_projection: ldaProj[i]!,
        verbalizability: verb[i]!.score,
      })),
      partition: { metric: part.metric, tau: part.tau, cv: part.cv, candidates: part.candidates, fallback: part.fallback, note: part.note, nSuccess: nS, nFailure: labels.length - nS, lda_shrinkage: ldaAll.shrinkage, lda_train: ldaTrain },
      mean_difference: {
        norm: md.norm,
        silhouette: sil,
        principal_angle_cosines: angles,
        centroid_norms: { success: norm(md.centroidSuccess), failure: norm(md.centroidFailure) },
        cosine_with_ridge: ridgeDir ? cosine(md.unit, ridgeDir) : null,
        cosine_with_lda: cosine(md.unit, ldaDir),
      },
      pca: { explained_variance_ratio: P.explainedVarianceRatio, cumulative: cum, components: P.components.length, scores: concepts.map((c, i) => ({ concept: c, pc1: P.scores[i]![0] ?? 0, pc2: P.scores[i]![1] ?? 0 })) },
      ridge,
      logit_lens: lens,
      verbalizability: verbal,
      swap,
      bidirectional: bidir,
      delta_pcs: dpc,
      timings_ms: timings,
    };
    timings.total = Math.round(performance.now() - t0);
    fs.writeFileSync(path.join(args.out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    fs.writeFileSync(path.join(args.out, "report.html"), await geometryReport(results));
    return results;
  } finally {
    model.dispose();
  }
}

function pickLens(l: { top: LensToken[]; bottom: LensToken[] }): { top: LensToken[]; bottom: LensToken[] } {
  return { top: l.top, bottom: l.bottom };
}

function swapRows(sv: readonly SwapVector[], outcomes: readonly SteerOutcome[], concepts: readonly string[], labels: readonly number[]): RateRow[] {
  const byKey = new Map<string, { det: number; n: number; intro: number; ni: number }>();
  sv.forEach((s, i) => {
    const o = outcomes[i]!;
    const key = `${s.concept}|${s.condition}`;
    const e = byKey.get(key) ?? { det: 0, n: 0, intro: 0, ni: 0 };
    if (o.detected !== null) {
      e.n++;
      if (o.detected) e.det++;
    }
    if (o.identified !== null || o.detected === false) {
      e.ni++;
      if (o.detected && o.identified) e.intro++;
    }
    byKey.set(key, e);
  });
  const rows: RateRow[] = [];
  for (const cls of ["S", "F"] as const) {
    const members = concepts.filter((_, i) => (labels[i] === 1) === (cls === "S"));
    for (const cond of SWAP_CONDITIONS) {
      let k = 0;
      let n = 0;
      let ki = 0;
      let ni = 0;
      const deltas: number[] = [];
      for (const c of members) {
        const e = byKey.get(`${c}|${cond}`);
        const base = byKey.get(`${c}|original`);
        if (!e) continue;
        k += e.det;
        n += e.n;
        ki += e.intro;
        ni += e.ni;
        if (cond !== "original" && base && base.n > 0 && e.n > 0) deltas.push(e.det / e.n - base.det / base.n);
      }
      const pos = deltas.filter((d) => d > 0).length;
      const neg = deltas.filter((d) => d < 0).length;
      rows.push({ condition: cond, cls, detection: wilson(k, n), introspection: wilson(ki, ni), mean_delta_detection: cond === "original" || deltas.length === 0 ? null : mean(deltas), sign_test_p: cond === "original" || deltas.length === 0 ? null : signTest(pos, neg) });
    }
  }
  return rows;
}

// ---- report --------------------------------------------------------------------------------------------------------





const ci = (r: Rate) => (r.estimate === null || r.lo === null || r.hi === null ? null : { estimate: r.estimate, lo: r.lo, hi: r.hi });

async function geometryReport(r: GeometryResults): Promise<string> {
  const sections: { title: string; html: string }[] = [];
  const p = r.partition;
  sections.push({
    title: "Read this first",
    html: `<div class="note"><ul>${r.approximations.map((a) => `<li>${escapeHtml(a)}</li>`).join("")}</ul></div>
<p class="small muted">Vectors: layer ${r.layer} (${r.concepts.length} concepts); steering strength ${r.strength}. Rates from ${escapeHtml(r.source.run ?? "")}${r.source.rates ? ` ${escapeHtml(r.source.rates)}` : ""}${r.source.judge ? ` (judge ${escapeHtml(r.source.judge)})` : ""}.</p>`,
  });
  const curve = p.candidates.filter((c) => c.macroF1 !== null && !c.isMedian).map((c) => ({ tau: c.tau, "macro-F1": c.macroF1!, metric: c.metric }));
  sections.push({
    title: "Success / failure partition (LDA, §4.2)",
    html: `<p>Chosen: success = <b>${escapeHtml(p.metric)} &gt; ${p.tau.toFixed(3)}</b> — ${p.nSuccess} success, ${p.nFailure} failure concepts. ${escapeHtml(p.note)}.</p>
${p.cv ? `<p>Cross-validated: macro-F1 ${p.cv.macroF1.toFixed(3)}, balanced accuracy ${(100 * p.cv.balancedAccuracy).toFixed(1)}%, accuracy ${(100 * p.cv.accuracy).toFixed(1)}% (paper: balanced accuracy 75.6%). Refit on all concepts: shrinkage γ = ${p.lda_shrinkage.toFixed(3)}, training balanced accuracy ${(100 * p.lda_train.balancedAccuracy).toFixed(1)}%.</p>` : ""}
${await plotOrNote(curve, () => linesSpec(curve, "tau", "macro-F1", "metric", "Mean CV macro-F1 of each eligible threshold"), "no eligible threshold")}`,
  });
  const pts = r.concepts.map((c) => ({ concept: c.concept, "projection on d̂": c.meandiff_projection, rate: p.metric === "detection_rate" ? c.detection_rate : c.combined_rate, class: c.label }));
  const md = r.mean_difference;
  sections.push({
    title: "Mean-difference direction μ_S − μ_F",
    html: `<p>‖μ_S − μ_F‖ = ${md.norm.toPrecision(4)}; silhouette ${Number.isFinite(md.silhouette) ? md.silhouette.toFixed(3) : "n/a"}; cos(d̂, ridge axis) = ${md.cosine_with_ridge === null ? "n/a" : md.cosine_with_ridge.toFixed(3)}; cos(d̂, LDA axis) = ${md.cosine_with_lda.toFixed(3)}. Principal-angle cosines between the classes' 5-PC subspaces: ${md.principal_angle_cosines.map((x) => x.toFixed(3)).join(", ") || "n/a"}.</p>
${await plotOrNote(pts, () => scatterSpec(pts, "projection on d̂", "rate", `Per-concept ${p.metric} vs projection on d̂`, "class"), "no concepts")}`,
  });
  const ev = r.pca.explained_variance_ratio.slice(0, 10).flatMap((x, i) => [
    { component: i + 1, fraction: x, series: "each" },
    { component: i + 1, fraction: r.pca.cumulative[i]!, series: "cumulative" },
  ]);
  const sc = r.pca.scores.map((s) => ({ concept: s.concept, PC1: s.pc1, PC2: s.pc2, class: r.concepts.find((c) => c.concept === s.concept)!.label }));
  sections.push({
    title: "PCA of L2-normalised concept vectors",
    html: `${await plotOrNote(ev, () => linesSpec(ev, "component", "fraction", "series", "Explained variance ratio", ".0%"), "no components")}
${await plotOrNote(sc, () => scatterSpec(sc, "PC1", "PC2", "Concepts on the first two components", "class"), "no scores")}`,
  });
  if (r.ridge) {
    const rr = r.ridge;
    const oof = rr.oof.map((o) => ({ concept: o.concept, actual: o.y, "out-of-fold prediction": o.pred }));
    sections.push({
      title: "Ridge regression of the per-concept rate (nested CV)",
      html: `<p>Target ${escapeHtml(rr.target)}; outer 5-fold R² = <b>${rr.mean_r2.toFixed(3)}</b> (folds ${rr.fold_r2.map((x) => x.toFixed(3)).join(", ")}; paper 0.406); inner α per fold ${rr.fold_alpha.map((a) => a.toExponential(1)).join(", ")}; final α ${rr.final_alpha.toExponential(2)}${rr.sign_flipped ? " (axis sign flipped to correlate positively)" : ""}.</p>
${await plotOrNote(oof, () => scatterSpec(oof, "actual", "out-of-fold prediction", "Out-of-fold predictions"), "no predictions")}`,
    });
  }
  const lensHtml = r.logit_lens
    .map((l) => `<h3>${escapeHtml(l.direction)}</h3>${htmlTable(["rank", "top token", "logit", "bottom token", "logit"], l.top.slice(0, 30).map((t, i) => [i + 1, t.token ?? String(t.id), t.logit, l.bottom[i]?.token ?? String(l.bottom[i]?.id ?? ""), l.bottom[i]?.logit ?? null]))}`)
    .join("");
  sections.push({ title: "Logit lens (unit direction · W_U, no final norm unless stated)", html: lensHtml });
  const vr = r.concepts.filter((c) => c.verbalizability !== null).map((c) => ({ concept: c.concept, verbalizability: c.verbalizability!, "projection on d̂": c.meandiff_projection, class: c.label }));
  const v = r.verbalizability;
  sections.push({
    title: "Verbalizability",
    html: `<p>${v.n_single_token} of ${r.concepts.length} concepts have a single-token spelling. One-feature ridge R²: verbalizability ${v.r2_verbalizability === null ? "n/a" : v.r2_verbalizability.toFixed(3)}, d̂ projection ${v.r2_meandiff_projection === null ? "n/a" : v.r2_meandiff_projection.toFixed(3)}; Pearson r between them ${v.corr_with_projection === null ? "n/a" : v.corr_with_projection.toFixed(3)}.</p>
${await plotOrNote(vr, () => scatterSpec(vr, "projection on d̂", "verbalizability", "Verbalizability vs projection on d̂", "class"), "no single-token concepts")}`,
  });
  if (r.swap) {
    const bars = r.swap.rows.flatMap((row) => {
      const c = ci(row.detection);
      return c ? [{ group: row.condition, series: row.cls, ...c }] : [];
    });
    sections.push({
      title: `Swap experiment (unit direction: ${r.swap.direction})`,
      html: `<p class="small">Judge: ${escapeHtml(r.steering_judge.note ?? r.steering_judge.name)}${r.steering_judge.approximate && r.steering_judge.note === null ? " (approximate: rule-based)" : ""}.</p>
${await plotOrNote(bars, () => rateBarsSpec(bars, "Detection by condition and class (Wilson 95%)", "detection rate", CLASS_COLORS), "no judged trials")}
${htmlTable(["class", "condition", "detection", "introspection", "mean Δ detection vs original", "sign test p"], r.swap.rows.map((x) => [x.cls, x.condition, rateText(x.detection), rateText(x.introspection), x.mean_delta_detection, x.sign_test_p]))}`,
    });
  }
  if (r.bidirectional) {
    const b = r.bidirectional;
    const bars = (["S", "F"] as const).flatMap((cls) => {
      const c = ci(b.success[cls]);
      return c ? [{ group: `${cls}–${cls} pairs`, series: cls, ...c }] : [];
    });
    sections.push({
      title: "Bidirectional steering",
      html: `<p>A direction "works" when its detection rate exceeds τ = ${b.threshold.toFixed(3)}; success = both directions work (paper: 23.3% of S–S vs 3.2% of F–F pairs). S–S ${escapeHtml(rateText(b.success.S))}; F–F ${escapeHtml(rateText(b.success.F))}.</p>
${await plotOrNote(bars, () => rateBarsSpec(bars, "Bidirectional success (Wilson 95%)", "detection rate", CLASS_COLORS), "no pairs")}
${htmlTable(["class", "A", "B", "detect(A−B)", "detect(B−A)", "both"], b.pairs.map((x) => [x.cls, x.a, x.b, x.rate_ab, x.rate_ba, x.both ? "yes" : "no"]))}`,
    });
  }
  if (r.delta_pcs) {
    const d = r.delta_pcs;
    const pts = d.curves.filter((c) => c.kind === "pc").flatMap((c) => c.detection.map((x) => ({ alpha: x.alpha, detection: x.rate.estimate ?? 0, vector: c.vector })));
    sections.push({
      title: "δ-PCs of success-pair differences (04c §4.3)",
      html: d.note
        ? `<p>${escapeHtml(d.note)}</p>`
        : `<p>${d.pairs} S–S pairs (${d.selection === "all" ? "every S–S pair" : "those that work both ways"}); u = v_A − v_B minus its d̂ component; PCs of the centred u (explained variance ${d.explained_variance_ratio.map((x) => (100 * x).toFixed(1) + "%").join(", ")}), each steered as α·PC·${d.mean_norm.toFixed(3)} (mean ‖u‖) × strength ${r.strength}. α = 0 is unsteered: ${escapeHtml(rateText(d.unsteered))}.</p>
${await plotOrNote(pts, () => linesSpec(pts, "alpha", "detection", "vector", "Detection along each δ-PC"), "no PCs")}
${htmlTable(["vector", ...d.alphas.map((x) => `α ${x}`)], d.curves.map((c) => [c.vector, ...c.detection.map((x) => rateText(x.rate))]))}`,
    });
  }
  sections.push({
    title: "Concepts",
    html: htmlTable(
      ["concept", "class", "detection", "combined", "‖v‖", "d̂ proj", "ridge proj", "verbalizability"],
      r.concepts.map((c) => [c.concept, c.label, c.detection_rate, c.combined_rate, c.norm, c.meandiff_projection, c.ridge_projection, c.verbalizability]),
    ),
  });
  sections.push({ title: "Configuration", html: `<pre>${escapeHtml(JSON.stringify({ model: r.model, source: r.source, layer: r.layer, strength: r.strength, timings_ms: r.timings_ms }, null, 1))}</pre>` });
  return htmlPage(`selfscope geometry recipe — ${r.model.path.split(/[\\/]/).filter(Boolean).pop() ?? r.model.path}`, `${r.protocol} · ${r.model.family}, ${r.model.nLayers} layers, d=${r.model.dModel}`, sections);
}
