// Metrics of a concept-injection run (protocol §4), per (layer, strength, variant) configuration:
// TPR, FPR, introspection rate, detection accuracy, identification accuracy given a claim,
// unconditional identification (when the run judged it), forced identification and yes-bias rate,
// each with a Wilson 95% interval; a one-sided Fisher test of TPR > FPR; the across-concept
// correlation of detection with forced identification (Fisher-z interval); a concept-clustered
// bootstrap. `computeResults` returns exactly what results.json holds.
//
// The headline: the paper picks the configuration with the highest introspection rate (03c/03d);
// so do we, once per variant (different questions are never pooled). The top-level rates are the
// best configuration of the first variant, and say so in `headline`. Nothing is pooled across
// configurations or variants.
//
// Verdict rules: only the chosen judge's records count. For one (trial, criterion) the last
// non-null verdict in the log wins. A record with verdict null (the judge failed) makes the trial
// *failed* for that criterion: excluded from n and counted in `unjudged` and `failed` by default,
// or scored NO with `failedAsNo` (what the paper's code did). No record at all makes it unjudged.
import type { RunData as LogRunData } from "../log/read.js";
import { CRITERIA, type Criterion, type JudgmentRecord, type TrialKind, type TrialRecord } from "../log/schema.js";
import { clusteredBootstrap, fisherOneSided, fisherOneSidedLog, fisherZInterval, pearson, wilson, type BinomialUnit, type Rate } from "../stats/stats.js";

/** A run in memory: the log reader's RunData, or just its records (extra fields are ignored). */
export type RunData = Pick<LogRunData, "header" | "trials" | "judgments">;

export const TRIAL_KINDS: readonly TrialKind[] = ["injection", "control", "forced", "yesbias"];

/**
 * A trial's verdict for one criterion: "YES"/"NO"; "unjudged" when the criterion applies to the
 * trial but no verdict exists (a failed judgment included); null when it does not apply.
 */
export type Verdict = "YES" | "NO" | "unjudged" | null;
export type TrialVerdicts = Record<Criterion, Verdict>;
/** Verdicts that keep a failed judgment ("failed") apart from a missing one ("unjudged"). */
export type FullVerdict = Verdict | "failed";
export type FullVerdicts = Record<Criterion, FullVerdict>;

export interface Interval {
  lo: number | null;
  hi: number | null;
}

/**
 * Rate with the unjudged count always present. `failed`: trials whose needed verdict is a failed
 * judgment — inside `unjudged` (excluded from n) by default, inside n (scored NO) with failedAsNo.
 */
export type RateOut = Rate & { unjudged: number; failed: number };

export interface NTrials {
  injection: number;
  control: number;
  forced: number;
  yesbias: number;
  total: number;
}

/** Pearson r across concepts of per-concept P(detect | injection) and P(identify | forced). */
export interface Correlation {
  r: number | null;
  /** Fisher-z 95% interval: tanh(atanh r ± 1.96/√(n−3)); null with a reason in `note`. */
  lo: number | null;
  hi: number | null;
  /** Concepts with both rates. */
  n: number;
  note: string | null;
}

/** One (layer, strength, variant) configuration: its trial summary plus what needs the per-concept view. */
export interface ConfigResults extends TrialSummary {
  layer: number | null;
  strength: number | null;
  variant: string;
  detection_forced_correlation: Correlation;
  /** Percentile bootstrap over concepts (resampled with replacement); null with a reason in boot_note. */
  tpr_boot: Interval | null;
  introspection_boot: Interval | null;
  boot_note: string | null;
}

export interface ConceptResults {
  concept: string;
  tpr: RateOut;
  introspection_rate: RateOut;
  forced_identification_rate: RateOut;
  n_trials: NTrials;
}

export interface ConfigKey {
  layer: number | null;
  strength: number | null;
  variant: string;
}

export const SELECTION_RULE =
  "highest introspection rate P(detect ∧ identify | injection) among the variant's (layer, strength) configurations, as the paper's code chooses its best config (03c, 03d); ties go to the lower layer, then the lower strength";

export interface Headline extends ConfigKey {
  rule: string;
  /** What the top-level keys mean. */
  scope: string;
  /** The best configuration of every variant (the first is the top-level one). */
  per_variant: ConfigKey[];
  /** Set when the choice is a tie (or no config has an introspection rate), so the pick is only the tie-break. */
  note: string | null;
}

export interface Results {
  /** These rates, the p-value and its summary are the headline configuration's (see `headline`). */
  tpr: RateOut;
  fpr: RateOut;
  introspection_rate: RateOut;
  detection_accuracy: RateOut;
  identification_accuracy_given_claim: RateOut;
  identification_accuracy_unconditional: RateOut | null;
  forced_identification_rate: RateOut;
  detection_forced_correlation: Correlation;
  /** One-sided Fisher exact p-value for TPR > FPR at the headline config; null if no judged injection or control trials. */
  discrimination_p_value: number | null;
  discrimination_summary: string;
  yes_bias_rate: RateOut;
  /** The configuration the top-level keys describe; null when the log has no trials. */
  headline: Headline | null;
  judge: string;
  judge_approximate: boolean;
  /** How failed judgments (verdict null) were scored: "excluded" (default) or "no" (the paper's code). */
  failed_judgments: "excluded" | "no";
  /** Trials missing a needed verdict, per criterion (over the whole run; failures included unless scored NO). */
  unjudged: Record<Criterion, number>;
  /** Trials whose needed verdict is a failed judgment, per criterion (over the whole run). */
  failed: Record<Criterion, number>;
  /** Trials carrying degenerate-output flags. */
  degenerate: number;
  by_config: ConfigResults[];
  /** Per-concept rates at the headline configuration. */
  by_concept: ConceptResults[];
  /** Trials in the whole log (not only the headline configuration). */
  n_trials: NTrials;
}

export interface ComputeOptions {
  /** Judge whose verdicts count (default: header.config.judges[0]). */
  judge?: string;
  /** Bootstrap resamples for by_config CIs (default 2000; 0 = off). */
  bootstrap?: number;
  /** Bootstrap seed (default header.config.seed). */
  seed?: number;
  /** Score failed judgments NO, as the paper's code did (default: exclude them from n). */
  failedAsNo?: boolean;
}

// ---- verdicts --------------------------------------------------------------------------------------

/** The judge used when none is given: the first configured, else the first seen in the log. */
export function defaultJudge(run: RunData): string {
  return run.header.config.judges[0] ?? run.judgments[0]?.judge ?? "none";
}

/** Raw verdict per trial and criterion for one judge: last non-null wins; null if only failures. */
function rawVerdicts(judgments: readonly JudgmentRecord[], judge: string): Map<string, Map<Criterion, "YES" | "NO" | null>> {
  const out = new Map<string, Map<Criterion, "YES" | "NO" | null>>();
  for (const j of judgments) {
    if (j.judge !== judge) continue;
    let m = out.get(j.trialId);
    if (!m) out.set(j.trialId, (m = new Map()));
    if (j.verdict !== null || !m.has(j.criterion)) m.set(j.criterion, j.verdict);
  }
  return out;
}

/** Whether the run judged identification on every injection trial, not only after a YES. */
export function identifiesAll(run: RunData): boolean {
  return run.header.config.identifyAll === true;
}

function applies(t: TrialRecord, c: Criterion, detection: FullVerdict, identifyAll: boolean): boolean {
  switch (c) {
    case "detection":
      return t.kind === "injection" || t.kind === "control";
    case "identification":
      // Identification is judged only after a YES detection (protocol §3.2) unless the run asked for all.
      return t.kind === "injection" && (identifyAll || detection === "YES");
    case "forced_identification":
      return t.kind === "forced";
    case "yes_answer":
      return t.kind === "yesbias";
  }
}

/** Every trial's verdicts for one judge, keyed by trial id, with failed judgments kept apart. */
export function fullVerdicts(run: RunData, judge: string = defaultJudge(run)): Map<string, FullVerdicts> {
  const raw = rawVerdicts(run.judgments, judge);
  const all = identifiesAll(run);
  const out = new Map<string, FullVerdicts>();
  for (const t of run.trials) {
    const r = raw.get(t.id);
    const v = { detection: null, identification: null, forced_identification: null, yes_answer: null } as FullVerdicts;
    for (const c of CRITERIA) {
      const x = r?.get(c);
      // A verdict recorded for a criterion that does not formally apply is still kept (and shown).
      v[c] = x ? x : applies(t, c, v.detection, all) ? (x === null ? "failed" : "unjudged") : null;
    }
    out.set(t.id, v);
  }
  return out;
}

/** Every trial's verdicts for one judge, keyed by trial id (a failed judgment shows as "unjudged"). */
export function trialVerdicts(run: RunData, judge: string = defaultJudge(run)): Map<string, TrialVerdicts> {
  const out = new Map<string, TrialVerdicts>();
  for (const [id, v] of fullVerdicts(run, judge)) {
    const u = { ...v } as Record<Criterion, FullVerdict>;
    for (const c of CRITERIA) if (u[c] === "failed") u[c] = "unjudged";
    out.set(id, u as TrialVerdicts);
  }
  return out;
}

// ---- counting ----------------------------------------------------------------------------------------

interface Tally {
  k: number;
  n: number;
  unjudged: number;
  failed: number;
}

const tally = (): Tally => ({ k: 0, n: 0, unjudged: 0, failed: 0 });

function add(t: Tally, v: FullVerdict, failedAsNo: boolean): void {
  if (v === "YES") {
    t.k++;
    t.n++;
  } else if (v === "NO") t.n++;
  else if (v === "failed") {
    t.failed++;
    if (failedAsNo) t.n++;
    else t.unjudged++;
  } else t.unjudged++;
}

/** The introspection outcome of an injection trial: YES iff detection YES and identification YES. */
function introspectionVerdict(v: FullVerdicts): FullVerdict {
  if (v.detection === "NO") return "NO";
  if (v.detection !== "YES") return v.detection === "failed" ? "failed" : "unjudged";
  if (v.identification === "YES" || v.identification === "NO" || v.identification === "failed") return v.identification;
  return "unjudged";
}

/** Detection was right: YES on an injection trial, NO on a control (a failed one scored NO is right on a control). */
function addAccuracy(acc: Tally, t: TrialRecord, v: FullVerdicts, failedAsNo: boolean): void {
  if (v.detection === "failed" && failedAsNo) {
    acc.failed++;
    acc.n++;
    if (t.kind === "control") acc.k++;
    return;
  }
  if (v.detection !== "YES" && v.detection !== "NO") return add(acc, v.detection, failedAsNo);
  add(acc, (v.detection === "YES") === (t.kind === "injection") ? "YES" : "NO", failedAsNo);
}

interface Tallies {
  tpr: Tally;
  fpr: Tally;
  introspection: Tally;
  accuracy: Tally;
  idGivenClaim: Tally;
  idAll: Tally;
  forced: Tally;
  yesBias: Tally;
  n: NTrials;
}

function tallyTrials(trials: Iterable<TrialRecord>, verdicts: Map<string, FullVerdicts>, failedAsNo: boolean): Tallies {
  const s: Tallies = { tpr: tally(), fpr: tally(), introspection: tally(), accuracy: tally(), idGivenClaim: tally(), idAll: tally(), forced: tally(), yesBias: tally(), n: nTrials() };
  for (const t of trials) {
    const v = verdicts.get(t.id)!;
    s.n[t.kind]++;
    s.n.total++;
    switch (t.kind) {
      case "injection":
        add(s.tpr, v.detection, failedAsNo);
        add(s.introspection, introspectionVerdict(v), failedAsNo);
        addAccuracy(s.accuracy, t, v, failedAsNo);
        if (v.detection === "YES") add(s.idGivenClaim, v.identification ?? "unjudged", failedAsNo);
        if (v.identification !== null) add(s.idAll, v.identification, failedAsNo);
        break;
      case "control":
        add(s.fpr, v.detection, failedAsNo);
        addAccuracy(s.accuracy, t, v, failedAsNo);
        break;
      case "forced":
        add(s.forced, v.forced_identification, failedAsNo);
        break;
      case "yesbias":
        add(s.yesBias, v.yes_answer, failedAsNo);
        break;
    }
  }
  return s;
}

function nTrials(): NTrials {
  return { injection: 0, control: 0, forced: 0, yesbias: 0, total: 0 };
}

function rate(t: Tally): RateOut {
  return { ...wilson(t.k, t.n), unjudged: t.unjudged, failed: t.failed };
}

function discrimination(s: Tallies): number | null {
  if (s.tpr.n === 0 || s.fpr.n === 0) return null;
  return fisherOneSided(s.tpr.k, s.tpr.n, s.fpr.k, s.fpr.n);
}

// ---- summaries -----------------------------------------------------------------------------------------

/** A p-value for prose: 2 significant digits, or a power of ten once it underflows a double. */
export function formatP(p: number, log10p?: number): string {
  if (p === 0) return log10p !== undefined && Number.isFinite(log10p) ? `≈ 1e${Math.round(log10p)}` : "< 1e-300";
  if (p >= 0.001) return `= ${Number(p.toPrecision(2))}`;
  return `= ${p.toExponential(1)}`;
}

function pct(r: Rate): string {
  return r.estimate === null ? "n/a" : `${(100 * r.estimate).toFixed(1)}%`;
}

/** "layer 37, strength 4, variant original" (the name a config goes by in prose). */
export function configName(c: ConfigKey): string {
  return `layer ${c.layer ?? "—"}, strength ${c.strength ?? "—"}, variant ${c.variant}`;
}

function discriminationSummary(s: Tallies, p: number | null, where: string): string {
  if (p === null) {
    const missing = s.tpr.n === 0 && s.fpr.n === 0 ? "injection or control" : s.tpr.n === 0 ? "injection" : "control";
    return `Discrimination cannot be tested: no judged ${missing} trials${where ? ` at ${where}` : ""}.`;
  }
  const log10p = fisherOneSidedLog(s.tpr.k, s.tpr.n, s.fpr.k, s.fpr.n) / Math.LN10;
  const ps = `p ${formatP(p, log10p)}`;
  const rates = `TPR ${pct(wilson(s.tpr.k, s.tpr.n))} (${s.tpr.k}/${s.tpr.n}) vs FPR ${pct(wilson(s.fpr.k, s.fpr.n))} (${s.fpr.k}/${s.fpr.n})`;
  const test = `one-sided Fisher exact test at ${where}`;
  if (p >= 0.05) return `There is no evidence that the model discriminates injection from control trials (${ps}): ${rates}; ${test}.`;
  return `The model claims detection more often on injection than on control trials (${ps}): ${rates}; ${test}.`;
}

function sortedUnique<T>(xs: Iterable<T>, cmp: (a: T, b: T) => number): T[] {
  return [...new Set(xs)].sort(cmp);
}

/** FNV-1a, to derive an independent bootstrap seed per config from its key. */
function hash32(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** Per-concept tallies of the injection (and forced) trials of one config, in first-seen order. */
function perConcept(trials: readonly TrialRecord[], verdicts: Map<string, FullVerdicts>, failedAsNo: boolean): Map<string, { tpr: Tally; introspection: Tally; forced: Tally }> {
  const by = new Map<string, { tpr: Tally; introspection: Tally; forced: Tally }>();
  for (const t of trials) {
    if ((t.kind !== "injection" && t.kind !== "forced") || t.concept === null) continue;
    let u = by.get(t.concept);
    if (!u) by.set(t.concept, (u = { tpr: tally(), introspection: tally(), forced: tally() }));
    const v = verdicts.get(t.id)!;
    if (t.kind === "forced") add(u.forced, v.forced_identification, failedAsNo);
    else {
      add(u.tpr, v.detection, failedAsNo);
      add(u.introspection, introspectionVerdict(v), failedAsNo);
    }
  }
  return by;
}

/** Fewer concepts than this give a percentile bootstrap too coarse to report. */
export const MIN_BOOT_CONCEPTS = 5;

function boot(units: BinomialUnit[], resamples: number, seed: number): { ci: Interval | null; note: string | null } {
  if (resamples <= 0) return { ci: null, note: "bootstrap off" };
  if (units.length < MIN_BOOT_CONCEPTS) return { ci: null, note: `${units.length} concept${units.length === 1 ? "" : "s"} with judged trials: a concept bootstrap needs at least ${MIN_BOOT_CONCEPTS}` };
  const r = clusteredBootstrap(units, undefined, { resamples, seed });
  if (r.lo === null || r.hi === null) return { ci: null, note: "no resample had judged trials" };
  // Zero width means every concept has the same rate: the bootstrap sees no between-concept spread.
  if (r.lo === r.hi) return { ci: null, note: "every concept has the same rate: the concept bootstrap has no spread to show" };
  return { ci: { lo: r.lo, hi: r.hi }, note: null };
}

function correlation(by: Map<string, { tpr: Tally; forced: Tally }>): Correlation {
  const xs: number[] = [];
  const ys: number[] = [];
  for (const u of by.values()) {
    if (u.tpr.n === 0 || u.forced.n === 0) continue;
    xs.push(u.tpr.k / u.tpr.n);
    ys.push(u.forced.k / u.forced.n);
  }
  const n = xs.length;
  if (n < 2) return { r: null, lo: null, hi: null, n, note: n === 0 ? "no concept has both judged injection and forced trials" : "one concept: no correlation" };
  const r = pearson(xs, ys);
  if (r === null) return { r: null, lo: null, hi: null, n, note: "no variation across concepts in detection or forced identification" };
  const ci = fisherZInterval(r, n);
  if (ci === null) return { r, lo: null, hi: null, n, note: n <= 3 ? `Fisher-z interval needs more than 3 concepts (n = ${n})` : "|r| = 1: the Fisher-z interval is degenerate" };
  return { r, lo: ci.lo, hi: ci.hi, n, note: null };
}


export interface TrialSummary {
  tpr: RateOut;
  fpr: RateOut;
  introspection_rate: RateOut;
  /** (#injection YES + #control NO) / (#injection + #control). */
  detection_accuracy: RateOut;
  /** P(identify | detect): #{inj: D∧I} / #{inj: D}. */
  identification_accuracy_given_claim: RateOut;
  /** #{inj: I} / #injection, identification judged on every injection trial; null unless the run did (--identify-all). */
  identification_accuracy_unconditional: RateOut | null;
  forced_identification_rate: RateOut;
  yes_bias_rate: RateOut;
  discrimination_p_value: number | null;
  n_trials: NTrials;
}

/**
 * Rates of a subset of trials (one config, one concept). `identifyAll`: the run judged
 * identification on every injection trial (else the unconditional rate is null).
 */
export function summarizeTrials(
  trials: readonly TrialRecord[],
  verdicts: Map<string, FullVerdicts>,
  opts: { failedAsNo?: boolean; identifyAll?: boolean } = {},
): TrialSummary {
  const s = tallyTrials(trials, verdicts, opts.failedAsNo ?? false);
  return summaryOf(s, opts.identifyAll ?? false);
}

function summaryOf(s: Tallies, identifyAll: boolean): TrialSummary {
  return {
    tpr: rate(s.tpr),
    fpr: rate(s.fpr),
    introspection_rate: rate(s.introspection),
    detection_accuracy: rate(s.accuracy),
    identification_accuracy_given_claim: rate(s.idGivenClaim),
    identification_accuracy_unconditional: identifyAll ? rate(s.idAll) : null,
    forced_identification_rate: rate(s.forced),
    yes_bias_rate: rate(s.yesBias),
    discrimination_p_value: discrimination(s),
    n_trials: s.n,
  };
}

/** The best configuration of each variant by SELECTION_RULE (configs already in layer, strength order). */
export function bestConfigs(configs: readonly ConfigResults[]): ConfigResults[] {
  const best = new Map<string, ConfigResults>();
  for (const c of configs) {
    const b = best.get(c.variant);
    // A defined rate beats none; strictly higher wins, so ties keep the earlier config.
    if (!b || (c.introspection_rate.estimate ?? -1) > (b.introspection_rate.estimate ?? -1)) best.set(c.variant, c);
  }
  return [...best.values()];
}

/** Everything results.json holds, computed from a run in memory. */
export function computeResults(run: RunData, opts: ComputeOptions = {}): Results {
  const judge = opts.judge ?? defaultJudge(run);
  const resamples = opts.bootstrap ?? 2000;
  const seed = opts.seed ?? run.header.config.seed;
  const failedAsNo = opts.failedAsNo ?? false;
  const identifyAll = identifiesAll(run);
  const verdicts = fullVerdicts(run, judge);
  const trials = run.trials;

  const configVariants = run.header.config.variants;
  const variantOrder = (v: string) => (configVariants.includes(v) ? configVariants.indexOf(v) : configVariants.length);

  // ---- by config: (layer, strength, variant) of every trial with both set. Trials with a null layer
  // or strength (e.g. controls recorded once per variant) are shared by every config they match.
  const keyOf = (l: number | null, s: number | null, v: string) => JSON.stringify([l, s, v]);
  const configs = new Map<string, { layer: number | null; strength: number | null; variant: string; trials: TrialRecord[] }>();
  for (const t of trials) {
    if (t.layer !== null && t.strength !== null && !configs.has(keyOf(t.layer, t.strength, t.variant))) {
      configs.set(keyOf(t.layer, t.strength, t.variant), { layer: t.layer, strength: t.strength, variant: t.variant, trials: [] });
    }
  }
  const unplaced: TrialRecord[] = [];
  for (const t of trials) {
    if (t.layer !== null && t.strength !== null) {
      configs.get(keyOf(t.layer, t.strength, t.variant))!.trials.push(t);
      continue;
    }
    let placed = false;
    for (const c of configs.values()) {
      if (c.variant === t.variant && (t.layer === null || t.layer === c.layer) && (t.strength === null || t.strength === c.strength)) {
        c.trials.push(t);
        placed = true;
      }
    }
    if (!placed) unplaced.push(t);
  }
  // A log whose trials carry no (layer, strength) at all: one config per variant, layer and strength null.
  for (const t of unplaced) {
    const k = keyOf(null, null, t.variant);
    if (!configs.has(k)) configs.set(k, { layer: null, strength: null, variant: t.variant, trials: [] });
    configs.get(k)!.trials.push(t);
  }
  const ordered = [...configs.values()].sort(
    (a, b) => variantOrder(a.variant) - variantOrder(b.variant) || a.variant.localeCompare(b.variant) || (a.layer ?? -1) - (b.layer ?? -1) || (a.strength ?? -1) - (b.strength ?? -1),
  );
  const tallies = new Map<string, Tallies>();
  const by_config: ConfigResults[] = ordered.map((c) => {
    const s = tallyTrials(c.trials, verdicts, failedAsNo);
    const key = keyOf(c.layer, c.strength, c.variant);
    tallies.set(key, s);
    const sum = summaryOf(s, identifyAll);
    const cseed = (seed ^ hash32(key)) >>> 0;
    const pc = perConcept(c.trials, verdicts, failedAsNo);
    const units = (which: "tpr" | "introspection") => [...pc.values()].map((u) => u[which]).filter((u) => u.n > 0).map((u) => ({ k: u.k, n: u.n }));
    const bt = boot(units("tpr"), resamples, cseed);
    const bi = boot(units("introspection"), resamples, (cseed + 1) >>> 0);
    return {
      layer: c.layer,
      strength: c.strength,
      variant: c.variant,
      ...withoutN(sum),
      detection_forced_correlation: correlation(pc),
      tpr_boot: bt.ci,
      introspection_boot: bi.ci,
      boot_note: bt.note === bi.note ? bt.note : [bt.note && `TPR: ${bt.note}`, bi.note && `introspection: ${bi.note}`].filter(Boolean).join("; ") || null,
      n_trials: sum.n_trials,
    };
  });

  // ---- the headline: the best config per variant; the first variant's is the top level.
  const best = bestConfigs(by_config);
  const top = best[0];
  const topTrials = top ? configs.get(keyOf(top.layer, top.strength, top.variant))!.trials : [];
  const topTally = top ? tallies.get(keyOf(top.layer, top.strength, top.variant))! : tallyTrials([], verdicts, failedAsNo);
  const topSum = summaryOf(topTally, identifyAll);
  const variants = sortedUnique(
    trials.map((t) => t.variant),
    (a, b) => variantOrder(a) - variantOrder(b) || a.localeCompare(b),
  );
  const headline: Headline | null = top
    ? {
        layer: top.layer,
        strength: top.strength,
        variant: top.variant,
        rule: SELECTION_RULE,
        scope: `The top-level rates, discrimination test and by_concept are this configuration's (${configName(top)})${variants.length > 1 ? `, the best of variant ${top.variant}; other variants' best configurations are in per_variant` : ""}; by_config has every configuration; n_trials counts the whole log. Nothing is pooled across configurations or variants.`,
        per_variant: best.map((b) => ({ layer: b.layer, strength: b.strength, variant: b.variant })),
        note: tieNote(top, by_config),
      }
    : null;

  // ---- by concept at the headline config, in the configured concept order.
  const conceptTrials = new Map<string, TrialRecord[]>();
  for (const c of run.header.config.concepts) conceptTrials.set(c, []);
  for (const t of topTrials) {
    if (t.concept === null || t.kind === "control") continue;
    let list = conceptTrials.get(t.concept);
    if (!list) conceptTrials.set(t.concept, (list = []));
    list.push(t);
  }
  const by_concept: ConceptResults[] = [];
  for (const [concept, list] of conceptTrials) {
    if (list.length === 0) continue;
    const s = summarizeTrials(list, verdicts, { failedAsNo });
    by_concept.push({ concept, tpr: s.tpr, introspection_rate: s.introspection_rate, forced_identification_rate: s.forced_identification_rate, n_trials: s.n_trials });
  }

  // ---- unjudged and failed per criterion over the whole run.
  const unjudged = { detection: 0, identification: 0, forced_identification: 0, yes_answer: 0 } as Record<Criterion, number>;
  const failed = { ...unjudged };
  for (const v of verdicts.values())
    for (const c of CRITERIA) {
      if (v[c] === "unjudged" || (v[c] === "failed" && !failedAsNo)) unjudged[c]++;
      if (v[c] === "failed") failed[c]++;
    }

  const mine = run.judgments.filter((j) => j.judge === judge);
  const judge_approximate = mine.some((j) => j.approximate) || (mine.length === 0 && /^rule\b/.test(judge));
  const all = tallyTrials(trials, verdicts, failedAsNo);

  return {
    ...withoutN(topSum),
    detection_forced_correlation: top ? top.detection_forced_correlation : correlation(new Map()),
    discrimination_summary: discriminationSummary(topTally, topSum.discrimination_p_value, top ? `the headline configuration (${configName(top)})` : ""),
    headline,
    judge,
    judge_approximate,
    failed_judgments: failedAsNo ? "no" : "excluded",
    unjudged,
    failed,
    degenerate: trials.filter((t) => t.flags.length > 0).length,
    by_config,
    by_concept,
    n_trials: all.n,
  };
}

function tieNote(top: ConfigResults, configs: readonly ConfigResults[]): string | null {
  const mine = configs.filter((c) => c.variant === top.variant);
  const e = top.introspection_rate.estimate;
  if (e === null) return mine.length > 1 ? "no configuration has a judged introspection rate: the first configuration is shown" : null;
  const tied = mine.filter((c) => c.introspection_rate.estimate === e).length;
  return tied > 1 ? `${tied} configurations tie at introspection ${(100 * e).toFixed(1)}%: the tie-break (lowest layer, then strength) picked this one` : null;
}

function withoutN(s: TrialSummary): Omit<TrialSummary, "n_trials"> {
  const { n_trials: _n, ...rest } = s;
  return rest;
}
