// Control vectors for concept injection (protocol §8, the paper's 04): what detection does when the
// injected vector is not a concept. Every generator is seeded and returns float32 vectors of the
// concepts' width; the conditions are:
//   isotropic       N(0, I) scaled to the mean success-vector norm
//   norm_matched    one per concept, N(0, I) scaled to that concept's norm
//   shuffled        each concept vector with its dimensions permuted (same norm, same values)
//   pca_all         noise projected into the top-k principal subspace of all concept vectors, scaled to the mean success norm
//   pca_success     the same for the success vectors' subspace
//   orthogonal      noise projected onto the orthogonal complement of the all-concepts subspace, scaled likewise
//   cov_matched     samples of N(μ_S, Σ_S), the success vectors' empirical mean and covariance
//   norm_sweep      one fixed random direction at the 10/25/50/75/90/99th percentiles of the concept norms
import { Rng } from "../core/rng.js";
import { UsageError } from "../core/errors.js";
import { axpy, dot, meanRows, norm, pca, unit, type Vec } from "./linalg.js";

export const NOISE_CONDITIONS = ["isotropic", "norm_matched", "shuffled", "pca_all", "pca_success", "orthogonal", "cov_matched", "norm_sweep"] as const;
export type NoiseCondition = (typeof NOISE_CONDITIONS)[number];
export const NORM_PERCENTILES = [10, 25, 50, 75, 90, 99];

export interface ControlVector {
  condition: NoiseCondition;
  /** The concept it was matched to (norm_matched, shuffled), the percentile (norm_sweep), or the sample index. */
  tag: string;
  vector: Float32Array;
}

/** Standard normal deviates (Box-Muller on the seeded generator). */
export function gaussian(rng: Rng, n: number): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i += 2) {
    const u = Math.max(rng.next(), 1e-300), v = rng.next();
    const r = Math.sqrt(-2 * Math.log(u));
    out[i] = r * Math.cos(2 * Math.PI * v);
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * v);
  }
  return out;
}

const scaled = (v: Vec, to: number) => {
  const n = norm(v);
  return Float32Array.from(v, (x) => (n > 0 ? (x * to) / n : 0));
};

/** Linear-interpolated percentile (numpy's default) of values. */
export function percentile(values: readonly number[], p: number): number {
  const s = [...values].sort((a, b) => a - b);
  const h = ((s.length - 1) * p) / 100;
  const lo = Math.floor(h);
  return s[lo]! + (h - lo) * ((s[Math.min(lo + 1, s.length - 1)] ?? s[lo]!) - s[lo]!);
}

/** Project x onto span(basis) (orthonormal rows) or, with `complement`, onto its orthogonal complement. */
function project(x: Float64Array, basis: readonly Float64Array[], complement: boolean): Float64Array {
  const inSpan = new Float64Array(x.length);
  for (const b of basis) axpy(inSpan, dot(x, b), b);
  return complement ? x.map((v, i) => v - inSpan[i]!) : inSpan;
}

export interface NoiseOptions {
  /** Random vectors per condition (norm_matched and shuffled make one per concept instead; norm_sweep one per percentile). */
  count?: number;
  /** Principal components of the PCA subspaces (default 50, at most the concepts' rank). */
  k?: number;
  seed?: number;
  conditions?: readonly NoiseCondition[];
}

export function controlVectors(concepts: ReadonlyMap<string, Float32Array>, success: readonly string[], o: NoiseOptions = {}): ControlVector[] {
  const names = [...concepts.keys()];
  if (names.length < 2) throw new UsageError(`noise controls need at least 2 concept vectors, got ${names.length}`);
  for (const s of success) if (!concepts.has(s)) throw new UsageError(`success concept "${s}" has no vector`);
  if (success.length < 2) throw new UsageError(`noise controls need at least 2 success concepts (their norms and subspace), got ${success.length}`);
  const d = concepts.get(names[0]!)!.length;
  const all = names.map((n) => Float64Array.from(concepts.get(n)!));
  const succ = success.map((n) => Float64Array.from(concepts.get(n)!));
  const meanNorm = succ.reduce((s, v) => s + norm(v), 0) / succ.length;
  const count = o.count ?? 50;
  const k = o.k ?? 50;
  const rng = new Rng(o.seed ?? 42);
  const want = new Set(o.conditions ?? NOISE_CONDITIONS);
  const out: ControlVector[] = [];
  const add = (condition: NoiseCondition, tag: string, v: Float32Array) => out.push({ condition, tag, vector: v });
  if (want.has("isotropic")) for (let i = 0; i < count; i++) add("isotropic", String(i), scaled(gaussian(rng, d), meanNorm));
  if (want.has("norm_matched")) names.forEach((n, i) => add("norm_matched", n, scaled(gaussian(rng, d), norm(all[i]!))));
  if (want.has("shuffled"))
    names.forEach((n) => {
      const v = concepts.get(n)!;
      const perm = rng.shuffle(Array.from({ length: d }, (_, i) => i));
      add("shuffled", n, Float32Array.from(perm, (j) => v[j]!));
    });
  const basisOf = (rows: Float64Array[]) => pca(rows, Math.min(k, rows.length - 1)).components.map((c) => unit(c));
  const allBasis = want.has("pca_all") || want.has("orthogonal") ? basisOf(all) : [];
  const succBasis = want.has("pca_success") ? basisOf(succ) : [];
  if (want.has("pca_all")) for (let i = 0; i < count; i++) add("pca_all", String(i), scaled(project(gaussian(rng, d), allBasis, false), meanNorm));
  if (want.has("pca_success")) for (let i = 0; i < count; i++) add("pca_success", String(i), scaled(project(gaussian(rng, d), succBasis, false), meanNorm));
  if (want.has("orthogonal")) for (let i = 0; i < count; i++) add("orthogonal", String(i), scaled(project(gaussian(rng, d), allBasis, true), meanNorm));
  if (want.has("cov_matched")) {
    // μ + Σᵢ zᵢ (vᵢ − μ) / √(n − 1) with z ~ N(0, I_n) has mean μ and covariance exactly Σ_S.
    const mu = meanRows(succ);
    const c = Math.sqrt(succ.length - 1);
    for (let i = 0; i < count; i++) {
      const z = gaussian(rng, succ.length);
      const x = Float64Array.from(mu);
      succ.forEach((v, j) => {
        for (let t = 0; t < d; t++) x[t]! += (z[j]! * (v[t]! - mu[t]!)) / c;
      });
      add("cov_matched", String(i), Float32Array.from(x));
    }
  }
  if (want.has("norm_sweep")) {
    const dir = gaussian(rng, d);
    const norms = all.map(norm);
    for (const p of NORM_PERCENTILES) add("norm_sweep", `p${p}`, scaled(dir, percentile(norms, p)));
  }
  return out;
}

// ---- the synthetic threshold (04e) -----------------------------------------------------------------------------

export interface SigmoidFit {
  /** Slope k and midpoint α50 of 1/(1+e^{−k(α−α50)}). */
  k: number;
  alpha50: number;
  /** Bernoulli log-likelihood at the fit. */
  logLik: number;
}

/**
 * Maximum-likelihood fit of P(detect | α) = 1/(1+e^{−k(α−α50)}) to (α, successes, trials) points by
 * Newton's method on (k, b = −k·α50), i.e. logistic regression of the outcomes on α. Null when the
 * data cannot place a midpoint (all or no detections).
 */
export function fitSigmoid(points: readonly { alpha: number; k: number; n: number }[]): SigmoidFit | null {
  const tot = points.reduce((s, p) => s + p.n, 0), pos = points.reduce((s, p) => s + p.k, 0);
  if (tot === 0 || pos === 0 || pos === tot) return null;
  let a = 0, b = Math.log(pos / (tot - pos));
  const ll = (a0: number, b0: number) => points.reduce((s, p) => {
    const z = a0 * p.alpha + b0;
    // log σ(z) and log(1 − σ(z)), stably.
    const lp = -Math.log1p(Math.exp(-Math.abs(z))) + Math.min(0, z);
    const lq = -Math.log1p(Math.exp(-Math.abs(z))) + Math.min(0, -z);
    return s + p.k * lp + (p.n - p.k) * lq;
  }, 0);
  let cur = ll(a, b);
  for (let it = 0; it < 200; it++) {
    let ga = 0, gb = 0, haa = 0, hab = 0, hbb = 0;
    for (const p of points) {
      const q = 1 / (1 + Math.exp(-(a * p.alpha + b)));
      const r = p.k - p.n * q, w = p.n * q * (1 - q);
      ga += r * p.alpha;
      gb += r;
      haa += w * p.alpha * p.alpha;
      hab += w * p.alpha;
      hbb += w;
    }
    const det = haa * hbb - hab * hab;
    if (!(det > 0)) break;
    let da = (hbb * ga - hab * gb) / det, db = (haa * gb - hab * ga) / det;
    let t = 1, next = ll(a + da, b + db);
    while (next < cur && t > 1e-8) {
      t /= 2;
      next = ll(a + t * da, b + t * db);
    }
    da *= t;
    db *= t;
    a += da;
    b += db;
    const gain = next - cur;
    cur = next;
    if (Math.abs(gain) < 1e-12 && Math.abs(da) + Math.abs(db) < 1e-10) break;
  }
  if (!(Math.abs(a) > 1e-12) || !Number.isFinite(a)) return null;
  return { k: a, alpha50: -b / a, logLik: cur };
}

// ---- the cone rotation (04i) -------------------------------------------------------------------------------------

/**
 * Rotate v's component orthogonal to the unit direction `dHat` by `degrees` toward `target`'s
 * component orthogonal to both (away from it for negative angles), keeping v·d̂ and ‖v‖ fixed:
 *   v = s d̂ + δ,  δ' = ‖δ‖ (cos θ δ̂ + sin θ ŵ),  ŵ = unit(t⊥ − (t⊥·δ̂) δ̂),  t⊥ = t − (t·d̂) d̂.
 * Returns v unchanged when the target has no component to rotate toward.
 */
export function coneRotate(v: ArrayLike<number>, dHat: ArrayLike<number>, target: ArrayLike<number>, degrees: number): Float32Array {
  const d = v.length;
  const s = dot(v, dHat);
  const delta = Float64Array.from({ length: d }, (_, i) => v[i]! - s * dHat[i]!);
  const dn = norm(delta);
  if (dn === 0) return Float32Array.from(v);
  const dh = delta.map((x) => x / dn);
  const tt = dot(target, dHat);
  const tPerp = Float64Array.from({ length: d }, (_, i) => target[i]! - tt * dHat[i]!);
  const c = dot(tPerp, dh);
  const w = tPerp.map((x, i) => x - c * dh[i]!);
  const wn = norm(w);
  if (wn < 1e-12 * (norm(tPerp) || 1)) return Float32Array.from(v);
  const th = (degrees * Math.PI) / 180;
  return Float32Array.from({ length: d }, (_, i) => s * dHat[i]! + dn * (Math.cos(th) * dh[i]! + (Math.sin(th) * w[i]!) / wn));
}

/** The row of `rows` [n × d] (e.g. the unembedding) with the largest cosine to v. */
export function nearestRow(rows: Float32Array, n: number, d: number, v: ArrayLike<number>): number {
  let best = -1, bestCos = -Infinity;
  let vn = 0;
  for (let j = 0; j < d; j++) vn += v[j]! * v[j]!;
  vn = Math.sqrt(vn);
  for (let i = 0; i < n; i++) {
    let dotv = 0, rn = 0;
    for (let j = 0; j < d; j++) {
      const r = rows[i * d + j]!;
      dotv += r * v[j]!;
      rn += r * r;
    }
    const c = rn > 0 ? dotv / (Math.sqrt(rn) * vn) : -Infinity;
    if (c > bestCos) {
      bestCos = c;
      best = i;
    }
  }
  return best;
}

// ---- δ-PCs of pair differences (04c §4.3) ------------------------------------------------------------------------

export interface DeltaPcs {
  /** Each pair's u = (v_A − v_B) with its d̂ component removed. */
  u: Float64Array[];
  /** Unit principal components of the centred u (at most `k`, at most rank). */
  pcs: Float64Array[];
  explainedVarianceRatio: number[];
  /** Mean ‖u‖: the PCs' steering scale. */
  meanNorm: number;
}

/** The 04c decomposition: pair differences minus their d̂ part, and their principal components. */
export function deltaPcs(diffs: readonly ArrayLike<number>[], dHat: ArrayLike<number>, k = 10): DeltaPcs {
  if (diffs.length < 2) throw new UsageError(`δ-PCs need at least 2 pairs, got ${diffs.length}`);
  const d = dHat.length;
  const u = diffs.map((x) => {
    const s = dot(x, dHat);
    return Float64Array.from({ length: d }, (_, i) => x[i]! - s * dHat[i]!);
  });
  const p = pca(u, Math.min(k, u.length - 1));
  const pcs = p.components.map((c) => unit(c));
  return { u, pcs, explainedVarianceRatio: p.explainedVarianceRatio.slice(0, pcs.length), meanNorm: u.reduce((s, x) => s + norm(x), 0) / u.length };
}
