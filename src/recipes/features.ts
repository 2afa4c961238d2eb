// Gates and evidence carriers (protocol §9.3; the paper's 07 / 09): which dictionary features push
// the answer toward "No" by default and are switched off by the injection (gates), and which
// upstream features rise with the injection strength and suppress them (evidence carriers).
//
// - Activation profile: for each concept and signed strength, a feature's mean activation over the
//   injected positions (the token before "Trial n" through the last prompt token) of the trial prompt.
// - Monotonicity: Spearman ρ between strength and that mean activation, per concept; reported as the
//   mean signed ρ and the mean |ρ| (07's mean_abs_r).
// - DLA(f) = (ŵ_dec,f · Δu) × mean activation, Δu = mean unembedding row of the Yes spellings' first
//   distinguishing tokens minus the No spellings' (single-token spellings where they exist, as the
//   paper). Different on purpose: the mean activation is taken on the unsteered prompts (strength 0),
//   since a gate is a default-"No" feature that steering switches off; 07 averages over its analysis
//   prompts (and its code uses mean |ρ| in place of the activation, a bug not copied: fidelity.md).
// - Gate candidates: the most negative DLA. Evidence carriers (with an upstream dictionary): features
//   whose mean ρ > 0 whose decoder row suppresses a gate's encoder (virtual weight ŵ_dec,c · w_enc,g < 0);
//   score = mean ρ × (−virtual weight) × activation at the largest strength, summed over the top gates.
import fs from "node:fs";
import path from "node:path";
import type { Model } from "../model/model.js";
import { UsageError } from "../core/errors.js";
import { parseNumbers } from "../core/parse.js";
import { openSafetensors } from "../io/safetensors.js";
import { getVariant, renderTrial } from "../eval/protocol.js";
import { escapeHtml, htmlPage, htmlTable } from "../report/page.js";
import { loadLensWeights, unembedding } from "./geometry.js";
import { gapScorer } from "./patch.js";
import { loadAnalysisModel, siteConfig, siteVectors, type SiteArgs } from "./site.js";
import { hookName } from "../hooks/names.js";
import type { Intervention } from "../hooks/plan.js";
import { encode, loadDictionary, loadGemmaScope, splice, TRAINED_FORMAT, transcoderSites, type Dictionary } from "../vectors/dictionary.js";
import { gapGrad, gapSpellings } from "./gap-grad.js";
import { pearson } from "../stats/stats.js";

/** Mean feature activation [dSae] over positions from..end of one run. */
export async function meanActivations(model: Model, d: Dictionary, ids: number[], from: number, plan: Intervention[]): Promise<Float64Array> {
  const res = await model.forward([{ ids }], { plan: [...plan, { op: "read", at: d.inputSite, pos: { from: 0 } }], logits: "none" });
  const x = res.cache.get(d.inputSite, 0).data;
  const n = ids.length - from;
  const acts = encode(d, x.subarray(from * d.dIn), n);
  const out = new Float64Array(d.dSae);
  for (let p = 0; p < n; p++) for (let f = 0; f < d.dSae; f++) out[f] = out[f]! + acts[p * d.dSae + f]! / n;
  return out;
}

function rank(xs: readonly number[]): number[] {
  const idx = xs.map((x, i) => [x, i] as const).sort((a, b) => a[0] - b[0]);
  const r = new Array<number>(xs.length);
  for (let i = 0; i < idx.length; ) {
    let j = i;
    while (j + 1 < idx.length && idx[j + 1]![0] === idx[i]![0]) j++;
    for (let k = i; k <= j; k++) r[idx[k]![1]] = (i + j) / 2;
    i = j + 1;
  }
  return r;
}

/** Spearman ρ (Pearson of average ranks); null when either side is constant. */
export function spearman(xs: readonly number[], ys: readonly number[]): number | null {
  return pearson(rank(xs), rank(ys));
}

/** Cohen's d of a minus b with the pooled SD; null when either group has fewer than 2 or the SD is 0. */
export function cohenD(a: readonly number[], b: readonly number[]): number | null {
  if (a.length < 2 || b.length < 2) return null;
  const m = (xs: readonly number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;
  const v = (xs: readonly number[], mu: number) => xs.reduce((s, x) => s + (x - mu) ** 2, 0) / (xs.length - 1);
  const ma = m(a), mb = m(b);
  const sd = Math.sqrt(((a.length - 1) * v(a, ma) + (b.length - 1) * v(b, mb)) / (a.length + b.length - 2));
  return sd > 0 ? (ma - mb) / sd : null;
}

export interface FeatureProfile {
  strengths: number[];
  /** [concept][strength] -> mean activations [dSae]. */
  acts: Float64Array[][];
}

/** Activation profiles of `d`'s features for each concept vector over signed strengths (0 = unsteered). */
export async function profile(model: Model, d: Dictionary, prompt: { ids: number[]; injectFrom: number }, injectLayer: number, vectors: readonly Float32Array[], strengths: readonly number[]): Promise<FeatureProfile> {
  const acts: Float64Array[][] = [];
  for (const v of vectors) {
    const row: Float64Array[] = [];
    for (const s of strengths) {
      const plan: Intervention[] = s === 0 ? [] : [{ op: "add", at: hookName(injectLayer, "hook_resid_post"), vector: v, scale: s, pos: { from: prompt.injectFrom } }];
      row.push(await meanActivations(model, d, prompt.ids, prompt.injectFrom, plan));
    }
    acts.push(row);
  }
  return { strengths: [...strengths], acts };
}

export interface FeatureStat {
  feature: number;
  /** Mean over concepts of Spearman ρ(strength, activation); null entries (constant) skipped. */
  rho: number;
  absRho: number;
  /** Mean activation on the unsteered prompt(s). */
  baseAct: number;
  /** Mean activation at the largest strength. */
  topAct: number;
  /** (ŵ_dec · Δu) × baseAct. */
  dla: number;
}

export function featureStats(d: Dictionary, p: FeatureProfile, deltaU: Float32Array): FeatureStat[] {
  const zero = p.strengths.indexOf(0);
  const top = p.strengths.indexOf(Math.max(...p.strengths));
  const out: FeatureStat[] = [];
  for (let f = 0; f < d.dSae; f++) {
    let rs = 0, ra = 0, nr = 0, base = 0, hi = 0;
    for (const row of p.acts) {
      const r = spearman(p.strengths, row.map((a) => a[f]!));
      if (r !== null) { rs += r; ra += Math.abs(r); nr++; }
      if (zero >= 0) base += row[zero]![f]! / p.acts.length;
      hi += row[top]![f]! / p.acts.length;
    }
    let dot = 0, norm = 0;
    for (let j = 0; j < d.dOut; j++) { dot += d.wDec[f * d.dOut + j]! * deltaU[j]!; norm += d.wDec[f * d.dOut + j]! ** 2; }
    out.push({ feature: f, rho: nr ? rs / nr : 0, absRho: nr ? ra / nr : 0, baseAct: base, topAct: hi, dla: (norm > 0 ? dot / Math.sqrt(norm) : 0) * base });
  }
  return out;
}

/** Gate candidates: the `n` most negative DLA (ties by index). */
export function gates(stats: readonly FeatureStat[], n: number): FeatureStat[] {
  return [...stats].filter((s) => s.dla < 0).sort((a, b) => a.dla - b.dla || a.feature - b.feature).slice(0, n);
}

export interface Carrier {
  feature: number;
  rho: number;
  topAct: number;
  /** Σ over gates of ŵ_dec,c · w_enc[:, g] (negative: suppresses). */
  virtualWeight: number;
  score: number;
}

/** Upstream features that rise with strength and suppress the gates through the residual stream. */
export function carriers(up: Dictionary, upStats: readonly FeatureStat[], gate: Dictionary, gateFeatures: readonly number[], n: number): Carrier[] {
  const out: Carrier[] = [];
  for (const s of upStats) {
    if (s.rho <= 0) continue;
    let norm = 0;
    for (let j = 0; j < up.dOut; j++) norm += up.wDec[s.feature * up.dOut + j]! ** 2;
    if (norm === 0) continue;
    let vw = 0;
    for (const g of gateFeatures) for (let j = 0; j < up.dOut; j++) vw += (up.wDec[s.feature * up.dOut + j]! / Math.sqrt(norm)) * gate.wEnc[j * gate.dSae + g]!;
    if (vw >= 0) continue;
    out.push({ feature: s.feature, rho: s.rho, topAct: s.topAct, virtualWeight: vw, score: s.rho * -vw * s.topAct });
  }
  return out.sort((a, b) => b.score - a.score || a.feature - b.feature).slice(0, n);
}

/** Δu: mean unembedding row of the Yes spellings' first distinguishing tokens minus the No spellings'. */
export function deltaU(unembed: { data: Float32Array; shape: number[] }, yes: readonly number[][], no: readonly number[][]): Float32Array {
  const d = unembed.shape[1]!;
  const firstDiff = (a: readonly number[], b: readonly number[]) => { let i = 0; while (i < a.length - 1 && i < b.length - 1 && a[i] === b[i]) i++; return [a[i]!, b[i]!] as const; };
  const ys = new Set<number>(), ns = new Set<number>();
  for (const a of yes) for (const b of no) { const [x, y] = firstDiff(a, b); if (x !== y) { ys.add(x); ns.add(y); } }
  const out = new Float32Array(d);
  for (const t of ys) for (let j = 0; j < d; j++) out[j] = out[j]! + unembed.data[t * d + j]! / ys.size;
  for (const t of ns) for (let j = 0; j < d; j++) out[j] = out[j]! - unembed.data[t * d + j]! / ns.size;
  return out;
}

// ---------------------------------------------------------------- the command

export interface FeaturesArgs extends SiteArgs {
  /** The gate layer's dictionary: a file selfscope trained, or Gemma Scope 2 params.safetensors with --gate-layer. */
  transcoder: string;
  /** Upstream dictionary for evidence carriers (same kinds of file). */
  carrierTranscoder?: string;
  gateLayer?: number;
  carrierLayer?: number;
  /** Signed strengths, with 0 (default -8..8). */
  strengths?: string;
  gates?: number;
  /** Progressive intervention curves over the top this-many gates / carriers (0: none; default 5). */
  curves?: number;
}

export interface FeaturesResults {
  recipe: "features";
  model: string;
  injection_layer: number;
  strengths: number[];
  concepts: string[];
  gate_dictionary: { source: string; input_site: string; output_site: string; d_sae: number };
  carrier_dictionary: { source: string; input_site: string; output_site: string; d_sae: number } | null;
  delta_u: string;
  /** detection_r: Spearman ρ across concepts (activation at the top strength vs the steered gap); detector_score = mean |ρ| × detection_r (09's ranking);
   *  cohen_d: activation of concepts whose steered gap is > 0 ("detected") minus the rest, over the pooled SD (null when a group has < 2). */
  gates: (FeatureStat & { detection_r: number | null; detector_score: number | null; cohen_d: number | null })[];
  carriers: Carrier[];
  /** Per concept: the steered gap at the largest strength (the detection proxy the gates' detection_r correlates with). */
  concept_gaps: number[];
  curves: (InterventionCurves & { strength: number }) | null;
  notes: string[];
}

export function loadAny(file: string, layer: number | undefined, model: Model, layerFlag = "--gate-layer / --carrier-layer"): Dictionary {
  const { nLayers, dModel } = model.config;
  if (!fs.existsSync(file)) throw new UsageError(`${file} does not exist`);
  const set = openSafetensors(file);
  if (set.metadata.format === TRAINED_FORMAT) return loadDictionary(file, nLayers, dModel);
  if (layer === undefined) throw new UsageError(`${file} is not a dictionary selfscope trained: say which layer's MLP it transcodes (${layerFlag})`);
  return loadGemmaScope(file, { ...transcoderSites(layer), dModel });
}

export async function featuresCommand(a: FeaturesArgs): Promise<FeaturesResults> {
  const model = await loadAnalysisModel(a);
  try {
    // Strengths are this analysis's own list (signed, with 0), not inject's.
    const { cfg, layer: L } = siteConfig("features", { ...a, strengths: undefined }, model);
    const strengths = a.strengths ? parseNumbers(a.strengths, "--strengths") : [-8, -4, -2, -1, 0, 1, 2, 4, 8];
    if (!strengths.includes(0)) throw new UsageError("--strengths must include 0 (the unsteered prompt the DLA is measured on)");
    const gd = loadAny(a.transcoder, a.gateLayer, model);
    const cd = a.carrierTranscoder ? loadAny(a.carrierTranscoder, a.carrierLayer, model) : null;
    const vs = await siteVectors(model, cfg, L, a.vectorCache);
    const p = renderTrial(model, getVariant("original"), 1, { format: cfg.promptFormat, judgePrompt: "question" });
    const sc = gapScorer(model, p.text, p.ids);
    const nYes = sc.nYes;
    const du = deltaU(unembedding(loadLensWeights(a.model)), sc.seqs.slice(0, nYes), sc.seqs.slice(nYes));
    const vectors = cfg.concepts.map((c) => vs.get(c)!);
    const gs = featureStats(gd, await profile(model, gd, p, L, vectors, strengths), du);
    const top = gates(gs, a.gates ?? 20);
    const cs = cd ? carriers(cd, featureStats(cd, await profile(model, cd, p, L, vectors, strengths), du), gd, top.map((g) => g.feature), 20) : [];
    // Detection correlation: across concepts, a gate's activation at the largest strength against the
    // steered gap there (the continuous detection proxy; judged detection needs generations: selfscope inject).
    const sTop = Math.max(...strengths);
    const sp = gapSpellings(model, p.text, p.ids);
    const conceptGaps: number[] = [];
    for (const v of vectors) conceptGaps.push((await gapGrad(model, sp, { sites: [], plan: [{ op: "add", at: hookName(L, "hook_resid_post"), vector: v, scale: sTop, pos: { from: p.injectFrom } }] })).gap);
    const gp = await profile(model, gd, p, L, vectors, [sTop]);
    const withR = top.map((g) => {
      const acts = gp.acts.map((row) => row[0]![g.feature]!);
      const r = vectors.length >= 3 ? spearman(acts, conceptGaps) : null;
      return { ...g, detection_r: r, detector_score: r === null ? null : g.absRho * r, cohen_d: cohenD(acts.filter((_, i) => conceptGaps[i]! > 0), acts.filter((_, i) => conceptGaps[i]! <= 0)) };
    });
    const K = a.curves ?? 5;
    const curves = K > 0 && top.length > 0 ? { strength: sTop, ...(await interventionCurves(model, p, L, vectors, sTop, { d: gd, features: top.slice(0, K).map((g) => g.feature) }, cd && cs.length ? { d: cd, features: cs.slice(0, K).map((c) => c.feature) } : null)) } : null;
    const info = (d: Dictionary) => ({ source: d.source, input_site: d.inputSite, output_site: d.outputSite, d_sae: d.dSae });
    const results: FeaturesResults = {
      recipe: "features",
      model: a.model,
      injection_layer: L,
      strengths,
      concepts: cfg.concepts,
      gate_dictionary: info(gd),
      carrier_dictionary: cd ? info(cd) : null,
      delta_u: sc.describe,
      gates: withR,
      carriers: cs,
      concept_gaps: conceptGaps,
      curves,
      notes: [
        "DLA uses the mean activation on the unsteered prompt (docs/fidelity.md); one prompt (Trial 1) per concept; features are candidates, not labelled.",
        "detection_r: Spearman ρ across concepts between a gate's activation and the steered Yes − No gap at the largest strength (the paper correlates with judged detection rates; the gap is the continuous proxy; null under 3 concepts). detector_score = mean |ρ| × detection_r. cohen_d: concepts with a positive steered gap against the rest.",
        "Curves edit features through the dictionary with its error node kept (the change of the reconstruction is added at the MLP output); the gate activation is read at the gates' input, so editing the gates themselves leaves it unchanged.",
      ],
    };
    fs.mkdirSync(a.out, { recursive: true });
    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    const f3 = (x: number) => x.toFixed(3);
    fs.writeFileSync(
      path.join(a.out, "report.html"),
      htmlPage(`selfscope features — ${path.basename(a.model)}`, `injection at blocks.${L}.hook_resid_post · ${cfg.concepts.length} concepts · strengths ${strengths.join(", ")}`, [
        { title: `Gate candidates (most negative DLA) — ${gd.outputSite}`, html: htmlTable(["feature", "DLA", "mean ρ(strength, act)", "mean |ρ|", "act unsteered", `act at ${Math.max(...strengths)}`, "ρ with detection (gap)", "detector score", "Cohen's d (gap > 0 vs ≤ 0)"], withR.map((g) => [g.feature, f3(g.dla), f3(g.rho), f3(g.absRho), f3(g.baseAct), f3(g.topAct), ...[g.detection_r, g.detector_score, g.cohen_d].map((x) => (x === null ? "—" : f3(x)))])) },
        { title: "Evidence carriers", html: cd ? htmlTable(["feature", "score", "virtual weight onto the gates", "mean ρ", "act at the top strength"], cs.map((c) => [c.feature, f3(c.score), f3(c.virtualWeight), f3(c.rho), f3(c.topAct)])) : `<p class="muted">${escapeHtml("no --carrier-transcoder given")}</p>` },
        { title: "Progressive interventions (mean Yes − No gap; mean activation of the top gates)", html: curves ? curvesTable(curves) : `<p class="muted">none (--curves 0 or no gates)</p>` },
        { title: "Notes", html: results.notes.map((n) => `<p class="note">${escapeHtml(n)}</p>`).join("") },
      ]),
    );
    return results;
  } finally {
    model.dispose();
  }
}

// ---------------------------------------------------------------- feature interventions (09b)

function curvesTable(c: InterventionCurves & { strength: number }): string {
  const f = (x: number) => x.toFixed(3);
  const rows: (string | number)[][] = [];
  const add = (name: string, xs: CurvePoint[] | null) => xs?.forEach((x) => rows.push([name, x.k, f(x.gap), f(x.gateAct)]));
  add("gates zeroed (unsteered)", c.gateAblation);
  add(`gates set to unsteered values (strength ${c.strength})`, c.gatePatching);
  add(`carriers zeroed (strength ${c.strength})`, c.carrierAblation);
  return htmlTable(["intervention", "top k edited", "gap", "gate activation"], rows);
}

export type FeatureEdit = { mode: "zero" } | { mode: "scale"; factor: number } | { mode: "control"; values: Float32Array };

/**
 * The plan that edits `features` of dictionary `d` on one prompt run (with `plan` applied) and adds the
 * reconstruction's change at the output site (the error node kept: an empty edit changes nothing).
 * "control" sets each feature to the given per-position value ([positions, dSae], e.g. its unsteered activation).
 */
export async function editFeatures(model: Model, d: Dictionary, ids: number[], plan: Intervention[], features: readonly number[], edit: FeatureEdit): Promise<{ patch: Intervention; acts: Float32Array }> {
  const s = await splice(model, d, ids, plan, (acts, n) => {
    for (let p = 0; p < n; p++)
      for (const f of features) {
        const i = p * d.dSae + f;
        acts[i] = edit.mode === "zero" ? 0 : edit.mode === "scale" ? acts[i]! * edit.factor : edit.values[i]!;
      }
  });
  // Bounded to the prompt: the gap's spelling passes run a few positions longer.
  return { patch: { ...s.patch, pos: { from: 0, to: ids.length } } as Intervention, acts: s.acts };
}

export interface CurvePoint {
  k: number;
  /** Mean Yes − No gap over concepts. */
  gap: number;
  /** Mean activation of the top gates over the injected positions (after the edit). */
  gateAct: number;
}

export interface InterventionCurves {
  /** Unsteered prompts, the top-k gates zeroed: does removing the default "No" raise the gap? */
  gateAblation: CurvePoint[];
  /** Steered prompts, the top-k gates set to their unsteered values: does restoring them remove detection? */
  gatePatching: CurvePoint[];
  /** Steered prompts, the top-k carriers zeroed (with a carrier dictionary): do the gates come back? */
  carrierAblation: CurvePoint[] | null;
}

/** Progressive ablation / patching curves (k = 0..K) at one strength, averaged over the concept vectors. */
export async function interventionCurves(model: Model, prompt: { ids: number[]; injectFrom: number; text: string }, injectLayer: number, vectors: readonly Float32Array[], strength: number, gate: { d: Dictionary; features: number[] }, carrier: { d: Dictionary; features: number[] } | null): Promise<InterventionCurves> {
  const sp = gapSpellings(model, prompt.text, prompt.ids);
  const ids = prompt.ids;
  // The gates' mean activation as the gate dictionary reads it on the edited run.
  const gateMean = async (plan: Intervention[]) => {
    if (gate.features.length === 0) return 0;
    const a = await meanActivations(model, gate.d, ids, prompt.injectFrom, plan);
    return gate.features.reduce((s, f) => s + a[f]!, 0) / gate.features.length;
  };
  const point = async (k: number, plans: Intervention[][]) => {
    let gap = 0, act = 0;
    for (const plan of plans) {
      gap += (await gapGrad(model, sp, { sites: [], plan })).gap / plans.length;
      act += (await gateMean(plan)) / plans.length;
    }
    return { k, gap, gateAct: act };
  };
  const steerOf = (v: Float32Array): Intervention[] => [{ op: "add", at: hookName(injectLayer, "hook_resid_post"), vector: v, scale: strength, pos: { from: prompt.injectFrom } }];
  const unsteeredActs = (await splice(model, gate.d, ids, [])).acts;
  const gateAblation: CurvePoint[] = [], gatePatching: CurvePoint[] = [], carrierAblation: CurvePoint[] = [];
  for (let k = 0; k <= gate.features.length; k++) {
    const fs_ = gate.features.slice(0, k);
    const e = await editFeatures(model, gate.d, ids, [], fs_, { mode: "zero" });
    gateAblation.push(await point(k, [[e.patch]]));
    const plans: Intervention[][] = [];
    for (const v of vectors) {
      const steer = steerOf(v);
      plans.push([...steer, (await editFeatures(model, gate.d, ids, steer, fs_, { mode: "control", values: unsteeredActs })).patch]);
    }
    gatePatching.push(await point(k, plans));
  }
  if (carrier) {
    for (let k = 0; k <= carrier.features.length; k++) {
      const plans: Intervention[][] = [];
      for (const v of vectors) {
        const steer = steerOf(v);
        plans.push([...steer, (await editFeatures(model, carrier.d, ids, steer, carrier.features.slice(0, k), { mode: "zero" })).patch]);
      }
      carrierAblation.push(await point(k, plans));
    }
  }
  return { gateAblation, gatePatching, carrierAblation: carrier ? carrierAblation : null };
}
