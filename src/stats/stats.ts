// Interval estimates and tests for binomial rates (protocol §4.1): Wilson score intervals, a
// percentile bootstrap that resamples whole concepts (trials of one concept are not independent),
// and Fisher's exact one-sided test that the injection YES rate exceeds the control YES rate; the
// paired comparisons the recipes use (exact sign test, bootstrap + sign-flip permutation test).
import { Rng } from "../core/rng.js";
import { UsageError } from "../core/errors.js";

/** A proportion with its interval: what every metric in results.json looks like. */
export interface Rate {
  estimate: number | null;
  lo: number | null;
  hi: number | null;
  n: number;
  /** Trials whose needed judgment is missing (excluded from n). */
  unjudged?: number;
}

function checkCounts(k: number, n: number, what: string): void {
  if (!Number.isInteger(k) || !Number.isInteger(n) || n < 0 || k < 0 || k > n) {
    throw new UsageError(`${what}: need integers 0 <= k <= n, got k=${k}, n=${n}`);
  }
}

/**
 * Wilson score interval for k successes in n trials (protocol §4.1):
 * centre = (p + z²/2n)/(1 + z²/n), half-width = z·sqrt(p(1−p)/n + z²/4n²)/(1 + z²/n).
 * n = 0 gives estimate/lo/hi null (no data is not a rate of 0).
 */
export function wilson(k: number, n: number, z = 1.96): Rate {
  checkCounts(k, n, "wilson");
  if (n === 0) return { estimate: null, lo: null, hi: null, n: 0 };
  const p = k / n;
  const z2 = z * z;
  const denom = 1 + z2 / n;
  const centre = (p + z2 / (2 * n)) / denom;
  const half = (z * Math.sqrt((p * (1 - p)) / n + z2 / (4 * n * n))) / denom;
  // The bounds are exactly 0 / 1 at k = 0 / k = n; clamp away rounding residue.
  const lo = k === 0 ? 0 : Math.max(0, centre - half);
  const hi = k === n ? 1 : Math.min(1, centre + half);
  return { estimate: p, lo, hi, n };
}

export interface BinomialUnit {
  k: number;
  n: number;
}

/** Pooled rate Σk / Σn (null when Σn = 0): the default statistic of the clustered bootstrap. */
export function pooledRate(units: readonly BinomialUnit[]): number | null {
  let k = 0;
  let n = 0;
  for (const u of units) {
    k += u.k;
    n += u.n;
  }
  return n === 0 ? null : k / n;
}

export interface BootstrapOptions {
  /** Number of resamples (e.g. 2000). */
  resamples: number;
  seed: number;
  /** Two-sided coverage of the percentile interval (default 0.95). */
  level?: number;
}

export interface BootstrapResult {
  /** The statistic on the original units. */
  estimate: number | null;
  lo: number | null;
  hi: number | null;
  /** Resamples whose statistic was defined (a resample of all-empty units gives null and is dropped). */
  resamples: number;
}

/** Quantile of sorted values with linear interpolation between order statistics (type 7). */
export function quantileSorted(sorted: readonly number[], q: number): number {
  if (sorted.length === 0) throw new UsageError("quantile of an empty sample");
  const h = (sorted.length - 1) * q;
  const i = Math.floor(h);
  const a = sorted[i]!;
  const b = sorted[Math.min(i + 1, sorted.length - 1)]!;
  return a + (h - i) * (b - a);
}

/**
 * Percentile bootstrap clustered by unit (one unit per concept): each resample draws
 * `units.length` units with replacement and recomputes `stat` (default: pooled Σk/Σn).
 * Deterministic for a given seed. Fewer than two units cannot express between-concept
 * variability, so the interval is null then.
 */
export function clusteredBootstrap(
  units: readonly BinomialUnit[],
  stat: (units: readonly BinomialUnit[]) => number | null = pooledRate,
  opts: BootstrapOptions,
): BootstrapResult {
  const { resamples, seed } = opts;
  const level = opts.level ?? 0.95;
  if (!Number.isInteger(resamples) || resamples < 1) throw new UsageError(`clusteredBootstrap: resamples must be a positive integer, got ${resamples}`);
  if (!(level > 0 && level < 1)) throw new UsageError(`clusteredBootstrap: level must be in (0, 1), got ${level}`);
  for (const u of units) checkCounts(u.k, u.n, "clusteredBootstrap unit");
  const estimate = stat(units);
  const m = units.length;
  if (m < 2 || estimate === null) return { estimate, lo: null, hi: null, resamples: 0 };
  const rng = new Rng(seed);
  const sample: BinomialUnit[] = new Array<BinomialUnit>(m);
  const values: number[] = [];
  for (let b = 0; b < resamples; b++) {
    for (let i = 0; i < m; i++) sample[i] = units[rng.int(m)]!;
    const v = stat(sample);
    if (v !== null && Number.isFinite(v)) values.push(v);
  }
  if (values.length === 0) return { estimate, lo: null, hi: null, resamples: 0 };
  values.sort((x, y) => x - y);
  const alpha = (1 - level) / 2;
  return { estimate, lo: quantileSorted(values, alpha), hi: quantileSorted(values, 1 - alpha), resamples: values.length };
}

// ---- Fisher's exact test -------------------------------------------------------------------------

const logFactCache: number[] = [0];

/** ln(n!) from a cumulative table of ln(i) (exact to rounding for any n that fits in memory). */
function logFactorial(n: number): number {
  for (let i = logFactCache.length; i <= n; i++) logFactCache.push(logFactCache[i - 1]! + Math.log(i));
  return logFactCache[n]!;
}

function logChoose(n: number, k: number): number {
  return logFactorial(n) - logFactorial(k) - logFactorial(n - k);
}

/**
 * Natural log of the one-sided Fisher exact p-value for H1: rate1 > rate2, from the 2×2 table
 * (k1 YES of n1; k2 YES of n2). Under H0 with the margins fixed, the YES count of group 1 is
 * hypergeometric; the p-value is P(X ≥ k1). Summed in log space, so it stays finite (as a log)
 * when the p-value itself underflows a double (n in the thousands with a large effect).
 */
export function fisherOneSidedLog(k1: number, n1: number, k2: number, n2: number): number {
  checkCounts(k1, n1, "fisher group 1");
  checkCounts(k2, n2, "fisher group 2");
  const N = n1 + n2;
  const K = k1 + k2;
  const hi = Math.min(K, n1);
  const logTotal = logChoose(N, n1);
  // log P(X = x) = ln C(K,x) + ln C(N−K, n1−x) − ln C(N, n1); x ranges over [max(0, n1−(N−K)), min(K, n1)].
  const terms: number[] = [];
  for (let x = k1; x <= hi; x++) terms.push(logChoose(K, x) + logChoose(N - K, n1 - x) - logTotal);
  let max = -Infinity;
  for (const t of terms) if (t > max) max = t;
  if (max === -Infinity) return -Infinity;
  let s = 0;
  for (const t of terms) s += Math.exp(t - max);
  return Math.min(0, max + Math.log(s));
}

/**
 * One-sided Fisher exact test that the YES rate of group 1 (injection: k1 of n1) exceeds that of
 * group 2 (control: k2 of n2); returns the p-value P(X ≥ k1). Throws if either group is empty
 * (callers report null instead). Very small p-values underflow to 0: use fisherOneSidedLog.
 */
export function fisherOneSided(k1: number, n1: number, k2: number, n2: number): number {
  if (n1 === 0 || n2 === 0) throw new UsageError(`fisherOneSided: both groups need trials (n1=${n1}, n2=${n2})`);
  return Math.exp(fisherOneSidedLog(k1, n1, k2, n2));
}

// ---- correlation ------------------------------------------------------------------------------------

/** Pearson's r of paired samples; null when n < 2 or either side has no variance. */
export function pearson(xs: readonly number[], ys: readonly number[]): number | null {
  if (xs.length !== ys.length) throw new UsageError(`pearson: ${xs.length} x values but ${ys.length} y values`);
  const n = xs.length;
  if (n < 2) return null;
  let mx = 0;
  let my = 0;
  for (let i = 0; i < n; i++) {
    mx += xs[i]!;
    my += ys[i]!;
  }
  mx /= n;
  my /= n;
  let sxy = 0;
  let sxx = 0;
  let syy = 0;
  for (let i = 0; i < n; i++) {
    const dx = xs[i]! - mx;
    const dy = ys[i]! - my;
    sxy += dx * dy;
    sxx += dx * dx;
    syy += dy * dy;
  }
  if (sxx === 0 || syy === 0) return null;
  // Clamp rounding residue so atanh stays finite for |r| just above 1.
  return Math.max(-1, Math.min(1, sxy / Math.sqrt(sxx * syy)));
}

/**
 * Fisher-z interval for a correlation r over n pairs (protocol §4.1): tanh(atanh r ± z/√(n−3)).
 * Null when n ≤ 3 (no finite width) or |r| = 1 (atanh is infinite: the interval would be the point).
 */
export function fisherZInterval(r: number, n: number, z = 1.96): { lo: number; hi: number } | null {
  if (!(r >= -1 && r <= 1)) throw new UsageError(`fisherZInterval: r must be in [-1, 1], got ${r}`);
  if (!Number.isInteger(n) || n <= 3 || Math.abs(r) === 1) return null;
  const c = Math.atanh(r);
  const h = z / Math.sqrt(n - 3);
  return { lo: Math.tanh(c - h), hi: Math.tanh(c + h) };
}

// ---- paired comparisons ----------------------------------------------------------------------------

/** Two-sided exact sign test p-value for `pos` positive and `neg` negative paired differences (ties dropped). */
export function signTest(pos: number, neg: number): number {
  const n = pos + neg;
  if (n === 0) return 1;
  const k = Math.min(pos, neg);
  let logC = 0; // log C(n, 0)
  let tail = 0;
  for (let i = 0; i <= k; i++) {
    if (i > 0) logC += Math.log(n - i + 1) - Math.log(i);
    tail += Math.exp(logC - n * Math.LN2);
  }
  return Math.min(1, 2 * tail);
}

export interface PairedTest {
  n: number;
  mean: number;
  sd: number;
  /** Percentile bootstrap CI of the mean difference (resampling pairs). */
  ci: [number, number] | null;
  /** Two-sided sign-flip permutation p-value for mean difference = 0. */
  p: number | null;
  exact: boolean;
  resamples: number;
  permutations: number;
}

/**
 * Paired comparison of `a` vs `b` (same pairs): mean of d = a − b with a percentile bootstrap CI
 * and a two-sided sign-flip permutation test (exact enumeration when 2^n ≤ 65536, else Monte Carlo
 * with the observed statistic counted, p = (1 + #{|mean*| ≥ |mean|}) / (1 + permutations)).
 */
export function pairedDifference(a: readonly number[], b: readonly number[], o: { resamples?: number; permutations?: number; seed?: number; level?: number } = {}): PairedTest {
  if (a.length !== b.length) throw new UsageError(`pairedDifference: ${a.length} vs ${b.length} values`);
  const d = a.map((x, i) => x - b[i]!);
  const n = d.length;
  const resamples = o.resamples ?? 2000;
  const perms = o.permutations ?? 10000;
  const level = o.level ?? 0.95;
  const m = n === 0 ? NaN : d.reduce((s, x) => s + x, 0) / n;
  const sd = n < 2 ? NaN : Math.sqrt(d.reduce((s, x) => s + (x - m) ** 2, 0) / (n - 1));
  if (n < 2) return { n, mean: m, sd, ci: null, p: null, exact: false, resamples: 0, permutations: 0 };
  const rng = new Rng(o.seed ?? 0);
  const boots: number[] = [];
  for (let r = 0; r < resamples; r++) {
    let s = 0;
    for (let i = 0; i < n; i++) s += d[rng.int(n)]!;
    boots.push(s / n);
  }
  boots.sort((x, y) => x - y);
  const alpha = (1 - level) / 2;
  const obs = Math.abs(m) - 1e-12 * (1 + Math.abs(m));
  let p: number;
  let exact = false;
  let count = 0;
  if (n <= 16) {
    exact = true;
    const total = 1 << n;
    for (let mask = 0; mask < total; mask++) {
      let s = 0;
      for (let i = 0; i < n; i++) s += mask & (1 << i) ? -d[i]! : d[i]!;
      if (Math.abs(s / n) >= obs) count++;
    }
    p = count / total;
  } else {
    for (let r = 0; r < perms; r++) {
      let s = 0;
      for (let i = 0; i < n; i++) s += rng.next() < 0.5 ? -d[i]! : d[i]!;
      if (Math.abs(s / n) >= obs) count++;
    }
    p = (1 + count) / (1 + perms);
  }
  return { n, mean: m, sd, ci: [quantileSorted(boots, alpha), quantileSorted(boots, 1 - alpha)], p, exact, resamples, permutations: exact ? 1 << n : perms };
}
