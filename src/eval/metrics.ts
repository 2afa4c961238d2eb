// Metrics of a concept-injection run (protocol §4): TPR, FPR, introspection rate, forced
// identification rate and yes-bias rate, each with a Wilson 95% interval, a one-sided Fisher test
// of TPR > FPR, per-(layer, strength, variant) breakdowns with a concept-clustered bootstrap, and
// per-concept rates. `computeResults` returns exactly what results.json holds.
//
// Verdict rules: only the chosen judge's records count. For one (trial, criterion) the last
// non-null verdict in the log wins; a record with verdict null (the judge failed) or no record at
// all makes the trial *unjudged* for that criterion — excluded from n and counted in `unjudged`,
// never counted as NO.
import type { Criterion, JudgmentRecord, Rate, RunHeader, TrialKind, TrialRecord } from "../log/schema.js";
import { clusteredBootstrap, fisherOneSided, fisherOneSidedLog, wilson, type BinomialUnit } from "../stats/stats.js";

/** A run in memory (what the log reader returns; extra fields are ignored). */
export interface RunData {
  header: RunHeader;
  trials: TrialRecord[];
  judgments: JudgmentRecord[];
}

export const CRITERIA: readonly Criterion[] = ["detection", "identification", "forced_identification", "yes_answer"];
export const TRIAL_KINDS: readonly TrialKind[] = ["injection", "control", "forced", "yesbias"];

/**
 * A trial's verdict for one criterion: "YES"/"NO"; "unjudged" when the criterion applies to the
 * trial but no verdict exists; null when it does not apply (e.g. identification of a control).
 */
export type Verdict = "YES" | "NO" | "unjudged" | null;
export type TrialVerdicts = Record<Criterion, Verdict>;

export interface Interval {
  lo: number | null;
  hi: number | null;
}

/** Rate with the unjudged count always present. */
export type RateOut = Rate & { unjudged: number };

export interface NTrials {
  injection: number;
  control: number;
  forced: number;
  yesbias: number;
  total: number;
}

export interface ConfigResults {
  layer: number | null;
  strength: number | null;
  variant: string;
  tpr: RateOut;
  fpr: RateOut;
  introspection_rate: RateOut;
  forced_identification_rate: RateOut;
  yes_bias_rate: RateOut;
  discrimination_p_value: number | null;
  /** Percentile bootstrap over concepts (resampled with replacement); null if < 2 concepts or bootstrap off. */
  tpr_boot: Interval | null;
  introspection_boot: Interval | null;
  n_trials: NTrials;
}

export interface ConceptResults {
  concept: string;
  tpr: RateOut;
  introspection_rate: RateOut;
  forced_identification_rate: RateOut;
  n_trials: NTrials;
}

export interface Results {
  tpr: RateOut;
  fpr: RateOut;
  introspection_rate: RateOut;
  forced_identification_rate: RateOut;
  /** One-sided Fisher exact p-value for TPR > FPR (pooled); null if no judged injection or control trials. */
  discrimination_p_value: number | null;
  discrimination_summary: string;
  yes_bias_rate: RateOut;
  judge: string;
  judge_approximate: boolean;
  /** Trials missing a needed verdict, per criterion (over the whole run). */
  unjudged: Record<Criterion, number>;
  /** Trials carrying degenerate-output flags. */
  degenerate: number;
  /** The top-level rates pool every trial of these configs. */
  pooled_over: { layers: number[]; strengths: number[]; variants: string[] };
  by_config: ConfigResults[];
  by_concept: ConceptResults[];
  n_trials: NTrials;
}

export interface ComputeOptions {
  /** Judge whose verdicts count (default: header.config.judges[0]). */
  judge?: string;
  /** Bootstrap resamples for by_config CIs (default 2000; 0 = off). */
  bootstrap?: number;
  /** Bootstrap seed (default header.config.seed). */
  seed?: number;
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

function applies(t: TrialRecord, c: Criterion, detection: Verdict): boolean {
  switch (c) {
    case "detection":
      return t.kind === "injection" || t.kind === "control";
    case "identification":
      // Identification is only judged when detection said YES (protocol §3.2).
      return t.kind === "injection" && detection === "YES";
    case "forced_identification":
      return t.kind === "forced";
    case "yes_answer":
      return t.kind === "yesbias";
  }
}

/** Every trial's verdicts for one judge, keyed by trial id. */
export function trialVerdicts(run: RunData, judge: string = defaultJudge(run)): Map<string, TrialVerdicts> {
  const raw = rawVerdicts(run.judgments, judge);
  const out = new Map<string, TrialVerdicts>();
  for (const t of run.trials) {
    const r = raw.get(t.id);
    const v = { detection: null, identification: null, forced_identification: null, yes_answer: null } as TrialVerdicts;
    for (const c of CRITERIA) {
      const x = r?.get(c) ?? null;
      // A verdict recorded for a criterion that does not formally apply is still kept (and shown).
      v[c] = x !== null ? x : applies(t, c, v.detection) ? "unjudged" : null;
    }
    out.set(t.id, v);
  }
  return out;
}

// ---- counting ----------------------------------------------------------------------------------------

interface Tally {
  k: number;
  n: number;
  unjudged: number;
}

const tally = (): Tally => ({ k: 0, n: 0, unjudged: 0 });

function add(t: Tally, v: Verdict): void {
  if (v === "YES") {
    t.k++;
    t.n++;
  } else if (v === "NO") t.n++;
  else t.unjudged++;
}

/** The introspection outcome of an injection trial: YES iff detection YES and identification YES. */
function introspectionVerdict(v: TrialVerdicts): Verdict {
  if (v.detection === "NO") return "NO";
  if (v.detection !== "YES") return "unjudged";
  if (v.identification === "YES") return "YES";
  if (v.identification === "NO") return "NO";
  return "unjudged";
}

interface Tallies {
  tpr: Tally;
  fpr: Tally;
  introspection: Tally;
  forced: Tally;
  yesBias: Tally;
  n: NTrials;
}

function tallyTrials(trials: Iterable<TrialRecord>, verdicts: Map<string, TrialVerdicts>): Tallies {
  const s: Tallies = { tpr: tally(), fpr: tally(), introspection: tally(), forced: tally(), yesBias: tally(), n: nTrials() };
  for (const t of trials) {
    const v = verdicts.get(t.id)!;
    s.n[t.kind]++;
    s.n.total++;
    switch (t.kind) {
      case "injection":
        add(s.tpr, v.detection);
        add(s.introspection, introspectionVerdict(v));
        break;
      case "control":
        add(s.fpr, v.detection);
        break;
      case "forced":
        add(s.forced, v.forced_identification);
        break;
      case "yesbias":
        add(s.yesBias, v.yes_answer);
        break;
    }
  }
  return s;
}

function nTrials(): NTrials {
  return { injection: 0, control: 0, forced: 0, yesbias: 0, total: 0 };
}

function rate(t: Tally): RateOut {
  return { ...wilson(t.k, t.n), unjudged: t.unjudged };
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

function discriminationSummary(s: Tallies, p: number | null, pooled: string): string {
  if (p === null) {
    const missing = s.tpr.n === 0 && s.fpr.n === 0 ? "injection or control" : s.tpr.n === 0 ? "injection" : "control";
    return `Discrimination cannot be tested: no judged ${missing} trials.`;
  }
  const log10p = fisherOneSidedLog(s.tpr.k, s.tpr.n, s.fpr.k, s.fpr.n) / Math.LN10;
  const ps = `p ${formatP(p, log10p)}`;
  const rates = `TPR ${pct(wilson(s.tpr.k, s.tpr.n))} (${s.tpr.k}/${s.tpr.n}) vs FPR ${pct(wilson(s.fpr.k, s.fpr.n))} (${s.fpr.k}/${s.fpr.n})`;
  const test = `one-sided Fisher exact test, ${pooled}`;
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

/** Per-concept units (k, n) of injection trials for the clustered bootstrap. */
function conceptUnits(trials: readonly TrialRecord[], verdicts: Map<string, TrialVerdicts>, which: "tpr" | "introspection"): BinomialUnit[] {
  const by = new Map<string, Tally>();
  for (const t of trials) {
    if (t.kind !== "injection" || t.concept === null) continue;
    let u = by.get(t.concept);
    if (!u) by.set(t.concept, (u = tally()));
    const v = verdicts.get(t.id)!;
    add(u, which === "tpr" ? v.detection : introspectionVerdict(v));
  }
  return [...by.values()].filter((u) => u.n > 0).map((u) => ({ k: u.k, n: u.n }));
}

function boot(units: BinomialUnit[], resamples: number, seed: number): Interval | null {
  if (resamples <= 0) return null;
  const r = clusteredBootstrap(units, undefined, { resamples, seed });
  return r.lo === null || r.hi === null ? null : { lo: r.lo, hi: r.hi };
}

const numCmp = (a: number, b: number) => a - b;

/** Rates of a subset of trials (e.g. one variant pooled over layers and strengths). */
export function summarizeTrials(
  trials: readonly TrialRecord[],
  verdicts: Map<string, TrialVerdicts>,
): { tpr: RateOut; fpr: RateOut; introspection_rate: RateOut; forced_identification_rate: RateOut; yes_bias_rate: RateOut; discrimination_p_value: number | null; n_trials: NTrials } {
  const s = tallyTrials(trials, verdicts);
  return {
    tpr: rate(s.tpr),
    fpr: rate(s.fpr),
    introspection_rate: rate(s.introspection),
    forced_identification_rate: rate(s.forced),
    yes_bias_rate: rate(s.yesBias),
    discrimination_p_value: discrimination(s),
    n_trials: s.n,
  };
}

/** Everything results.json holds, computed from a run in memory. */
export function computeResults(run: RunData, opts: ComputeOptions = {}): Results {
  const judge = opts.judge ?? defaultJudge(run);
  const resamples = opts.bootstrap ?? 2000;
  const seed = opts.seed ?? run.header.config.seed;
  const verdicts = trialVerdicts(run, judge);
  const trials = run.trials;

  const all = tallyTrials(trials, verdicts);
  const p = discrimination(all);

  const layers = sortedUnique(trials.flatMap((t) => (t.layer === null ? [] : [t.layer])), numCmp);
  const strengths = sortedUnique(trials.flatMap((t) => (t.strength === null ? [] : [t.strength])), numCmp);
  const configVariants = run.header.config.variants;
  const variantOrder = (v: string) => (configVariants.includes(v) ? configVariants.indexOf(v) : configVariants.length);
  const variants = sortedUnique(
    trials.map((t) => t.variant),
    (a, b) => variantOrder(a) - variantOrder(b) || a.localeCompare(b),
  );
  const plural = (n: number, w: string) => `${n} ${w}${n === 1 ? "" : "s"}`;
  const pooledText = `pooled over ${plural(layers.length, "layer")} × ${plural(strengths.length, "strength")} × ${plural(variants.length, "variant")}`;

  // ---- by config: (layer, strength, variant) of every trial with both set. Trials with a null layer
  // or strength (e.g. controls recorded once per variant) are shared by every config they match.
  const keyOf = (l: number, s: number, v: string) => JSON.stringify([l, s, v]);
  const configs = new Map<string, { layer: number; strength: number; variant: string; trials: TrialRecord[] }>();
  for (const t of trials) {
    if (t.layer !== null && t.strength !== null && !configs.has(keyOf(t.layer, t.strength, t.variant))) {
      configs.set(keyOf(t.layer, t.strength, t.variant), { layer: t.layer, strength: t.strength, variant: t.variant, trials: [] });
    }
  }
  for (const t of trials) {
    if (t.layer !== null && t.strength !== null) {
      configs.get(keyOf(t.layer, t.strength, t.variant))!.trials.push(t);
      continue;
    }
    for (const c of configs.values()) {
      if (c.variant === t.variant && (t.layer === null || t.layer === c.layer) && (t.strength === null || t.strength === c.strength)) c.trials.push(t);
    }
  }
  const by_config: ConfigResults[] = [...configs.values()]
    .sort((a, b) => variantOrder(a.variant) - variantOrder(b.variant) || a.variant.localeCompare(b.variant) || a.layer - b.layer || a.strength - b.strength)
    .map((c) => {
      const s = summarizeTrials(c.trials, verdicts);
      const cseed = (seed ^ hash32(keyOf(c.layer, c.strength, c.variant))) >>> 0;
      return {
        layer: c.layer,
        strength: c.strength,
        variant: c.variant,
        tpr: s.tpr,
        fpr: s.fpr,
        introspection_rate: s.introspection_rate,
        forced_identification_rate: s.forced_identification_rate,
        yes_bias_rate: s.yes_bias_rate,
        discrimination_p_value: s.discrimination_p_value,
        tpr_boot: boot(conceptUnits(c.trials, verdicts, "tpr"), resamples, cseed),
        introspection_boot: boot(conceptUnits(c.trials, verdicts, "introspection"), resamples, (cseed + 1) >>> 0),
        n_trials: s.n_trials,
      };
    });

  // ---- by concept (pooled over configs), in the configured concept order.
  const conceptTrials = new Map<string, TrialRecord[]>();
  for (const c of run.header.config.concepts) conceptTrials.set(c, []);
  for (const t of trials) {
    if (t.concept === null || t.kind === "control") continue;
    let list = conceptTrials.get(t.concept);
    if (!list) conceptTrials.set(t.concept, (list = []));
    list.push(t);
  }
  const by_concept: ConceptResults[] = [];
  for (const [concept, list] of conceptTrials) {
    if (list.length === 0) continue;
    const s = summarizeTrials(list, verdicts);
    by_concept.push({ concept, tpr: s.tpr, introspection_rate: s.introspection_rate, forced_identification_rate: s.forced_identification_rate, n_trials: s.n_trials });
  }

  // ---- unjudged per criterion over the whole run.
  const unjudged = { detection: 0, identification: 0, forced_identification: 0, yes_answer: 0 } as Record<Criterion, number>;
  for (const v of verdicts.values()) for (const c of CRITERIA) if (v[c] === "unjudged") unjudged[c]++;

  const mine = run.judgments.filter((j) => j.judge === judge);
  const judge_approximate = mine.some((j) => j.approximate) || (mine.length === 0 && /^rule\b/.test(judge));

  return {
    tpr: rate(all.tpr),
    fpr: rate(all.fpr),
    introspection_rate: rate(all.introspection),
    forced_identification_rate: rate(all.forced),
    discrimination_p_value: p,
    discrimination_summary: discriminationSummary(all, p, pooledText),
    yes_bias_rate: rate(all.yesBias),
    judge,
    judge_approximate,
    unjudged,
    degenerate: trials.filter((t) => t.flags.length > 0).length,
    pooled_over: { layers, strengths, variants },
    by_config,
    by_concept,
    n_trials: all.n,
  };
}
