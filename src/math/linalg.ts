// Small dense numerics (used by the refusal-direction and concept-vector geometry recipes),
// all in float64 on the host: vector helpers, a symmetric eigensolver (Householder
// tridiagonalisation + implicit QL, the classic tred2/tql2 algorithm), PCA, Cholesky solves,
// LDA with Ledoit-Wolf shrinkage, ridge regression with (nested) cross-validation, fold splitters
// and classification scores. Everything here is deterministic given its seed.
//
// Sizes: these are meant for n ≤ a few thousand samples. Wide data (d ≫ n, e.g. 500 concept
// vectors of width 5376) is handled by `rowBasis`, which rewrites the rows in an orthonormal basis
// of their span (n coordinates each): PCA, ridge and shrinkage LDA depend only on inner products,
// so they give exactly the same answers in those coordinates (LDA needs the ambient width for its
// shrinkage target, passed as `ambientDim`).
import { Rng } from "../core/rng.js";
import { UsageError } from "../core/errors.js";

export type Vec = ArrayLike<number>;

// ---- vectors ---------------------------------------------------------------------------------------

export function dot(a: Vec, b: Vec): number {
  if (a.length !== b.length) throw new UsageError(`dot: lengths differ (${a.length} vs ${b.length})`);
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
}

export function norm(a: Vec): number {
  return Math.sqrt(dot(a, a));
}

/** a / ‖a‖ in float64 (throws on a zero vector: a direction needs a length). */
export function unit(a: Vec): Float64Array {
  const n = norm(a);
  if (!(n > 0) || !Number.isFinite(n)) throw new UsageError("cannot normalise a zero or non-finite vector");
  return Float64Array.from(a as ArrayLike<number>, (x) => x / n);
}

export function cosine(a: Vec, b: Vec): number {
  const na = norm(a);
  const nb = norm(b);
  return na === 0 || nb === 0 ? 0 : dot(a, b) / (na * nb);
}

export function sub(a: Vec, b: Vec): Float64Array {
  return Float64Array.from(a as ArrayLike<number>, (x, i) => x - b[i]!);
}

export function axpy(y: Float64Array, a: number, x: Vec): Float64Array {
  for (let i = 0; i < y.length; i++) y[i]! += a * x[i]!;
  return y;
}

export function toF32(a: Vec): Float32Array {
  return Float32Array.from(a as ArrayLike<number>);
}

/** Column means of rows, accumulated in float64. */
export function meanRows(rows: readonly Vec[], dim?: number): Float64Array {
  const d = dim ?? rows[0]?.length;
  if (d === undefined) throw new UsageError("mean of no rows");
  const m = new Float64Array(d);
  for (const r of rows) for (let i = 0; i < d; i++) m[i]! += r[i]!;
  if (rows.length > 0) for (let i = 0; i < d; i++) m[i]! /= rows.length;
  return m;
}

/** Gram–Schmidt (twice, for stability); drops vectors already in the span. */
export function orthonormalize(vs: readonly Vec[], tol = 1e-10): Float64Array[] {
  const out: Float64Array[] = [];
  for (const v of vs) {
    const w = Float64Array.from(v as ArrayLike<number>);
    const n0 = norm(w);
    for (let pass = 0; pass < 2; pass++) for (const q of out) axpy(w, -dot(w, q), q);
    const n = norm(w);
    if (n > tol * Math.max(1, n0)) out.push(w.map((x) => x / n));
  }
  return out;
}

export function linspace(a: number, b: number, n: number): number[] {
  if (n === 1) return [a];
  return Array.from({ length: n }, (_, i) => a + ((b - a) * i) / (n - 1));
}

/** numpy-style median (mean of the two middle values for even n). */
export function median(xs: readonly number[]): number {
  if (xs.length === 0) throw new UsageError("median of an empty list");
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function mean(xs: readonly number[]): number {
  return xs.length === 0 ? NaN : xs.reduce((a, b) => a + b, 0) / xs.length;
}

export function pearson(x: readonly number[], y: readonly number[]): number {
  const mx = mean(x);
  const my = mean(y);
  let sxy = 0;
  let sxx = 0;
  let syy = 0;
  for (let i = 0; i < x.length; i++) {
    sxy += (x[i]! - mx) * (y[i]! - my);
    sxx += (x[i]! - mx) ** 2;
    syy += (y[i]! - my) ** 2;
  }
  return sxx === 0 || syy === 0 ? NaN : sxy / Math.sqrt(sxx * syy);
}

// ---- symmetric eigendecomposition -------------------------------------------------------------------

export interface Eigen {
  /** Eigenvalues, descending. */
  values: Float64Array;
  /** Eigenvectors as rows: vectors[j] belongs to values[j] (unit length). */
  vectors: Float64Array[];
}

/**
 * Eigen-decomposition of a symmetric n×n matrix (row-major). Householder reduction to
 * tridiagonal form followed by the implicit QL algorithm (the tred2/tql2 pair from EISPACK/JAMA).
 * O(n³); fine for n up to ~1000.
 */
export function symEig(A: Float64Array, n: number): Eigen {
  if (A.length !== n * n) throw new UsageError(`symEig: expected ${n}×${n} entries, got ${A.length}`);
  if (n === 0) return { values: new Float64Array(0), vectors: [] };
  const V = Float64Array.from(A);
  const d = new Float64Array(n);
  const e = new Float64Array(n);
  const at = (i: number, j: number) => i * n + j;
  // tred2
  for (let j = 0; j < n; j++) d[j] = V[at(n - 1, j)]!;
  for (let i = n - 1; i > 0; i--) {
    let scale = 0;
    let h = 0;
    for (let k = 0; k < i; k++) scale += Math.abs(d[k]!);
    if (scale === 0) {
      e[i] = d[i - 1]!;
      for (let j = 0; j < i; j++) {
        d[j] = V[at(i - 1, j)]!;
        V[at(i, j)] = 0;
        V[at(j, i)] = 0;
      }
    } else {
      for (let k = 0; k < i; k++) {
        d[k]! /= scale;
        h += d[k]! * d[k]!;
      }
      let f = d[i - 1]!;
      let g = Math.sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (let j = 0; j < i; j++) e[j] = 0;
      for (let j = 0; j < i; j++) {
        f = d[j]!;
        V[at(j, i)] = f;
        g = e[j]! + V[at(j, j)]! * f;
        for (let k = j + 1; k <= i - 1; k++) {
          g += V[at(k, j)]! * d[k]!;
          e[k]! += V[at(k, j)]! * f;
        }
        e[j] = g;
      }
      f = 0;
      for (let j = 0; j < i; j++) {
        e[j]! /= h;
        f += e[j]! * d[j]!;
      }
      const hh = f / (h + h);
      for (let j = 0; j < i; j++) e[j]! -= hh * d[j]!;
      for (let j = 0; j < i; j++) {
        f = d[j]!;
        g = e[j]!;
        for (let k = j; k <= i - 1; k++) V[at(k, j)]! -= f * e[k]! + g * d[k]!;
        d[j] = V[at(i - 1, j)]!;
        V[at(i, j)] = 0;
      }
    }
    d[i] = h;
  }
  for (let i = 0; i < n - 1; i++) {
    V[at(n - 1, i)] = V[at(i, i)]!;
    V[at(i, i)] = 1;
    const h = d[i + 1]!;
    if (h !== 0) {
      for (let k = 0; k <= i; k++) d[k] = V[at(k, i + 1)]! / h;
      for (let j = 0; j <= i; j++) {
        let g = 0;
        for (let k = 0; k <= i; k++) g += V[at(k, i + 1)]! * V[at(k, j)]!;
        for (let k = 0; k <= i; k++) V[at(k, j)]! -= g * d[k]!;
      }
    }
    for (let k = 0; k <= i; k++) V[at(k, i + 1)] = 0;
  }
  for (let j = 0; j < n; j++) {
    d[j] = V[at(n - 1, j)]!;
    V[at(n - 1, j)] = 0;
  }
  V[at(n - 1, n - 1)] = 1;
  e[0] = 0;
  // tql2
  for (let i = 1; i < n; i++) e[i - 1] = e[i]!;
  e[n - 1] = 0;
  let f = 0;
  let tst1 = 0;
  const eps = 2 ** -52;
  for (let l = 0; l < n; l++) {
    tst1 = Math.max(tst1, Math.abs(d[l]!) + Math.abs(e[l]!));
    let m = l;
    while (m < n) {
      if (Math.abs(e[m]!) <= eps * tst1) break;
      m++;
    }
    if (m > l) {
      let iter = 0;
      do {
        if (++iter > 200) throw new Error("symEig: QL iteration did not converge");
        let g = d[l]!;
        let p = (d[l + 1]! - g) / (2 * e[l]!);
        let r = Math.hypot(p, 1);
        if (p < 0) r = -r;
        d[l] = e[l]! / (p + r);
        d[l + 1] = e[l]! * (p + r);
        const dl1 = d[l + 1]!;
        let h = g - d[l]!;
        for (let i = l + 2; i < n; i++) d[i]! -= h;
        f += h;
        p = d[m]!;
        let c = 1;
        let c2 = c;
        let c3 = c;
        const el1 = e[l + 1]!;
        let s = 0;
        let s2 = 0;
        for (let i = m - 1; i >= l; i--) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i]!;
          h = c * p;
          r = Math.hypot(p, e[i]!);
          e[i + 1] = s * r;
          s = e[i]! / r;
          c = p / r;
          p = c * d[i]! - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]!);
          for (let k = 0; k < n; k++) {
            h = V[at(k, i + 1)]!;
            V[at(k, i + 1)] = s * V[at(k, i)]! + c * h;
            V[at(k, i)] = c * V[at(k, i)]! - s * h;
          }
        }
        p = (-s * s2 * c3 * el1 * e[l]!) / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (Math.abs(e[l]!) > eps * tst1);
    }
    d[l] = d[l]! + f;
    e[l] = 0;
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => d[b]! - d[a]!);
  const values = Float64Array.from(order, (j) => d[j]!);
  const vectors = order.map((j) => Float64Array.from({ length: n }, (_, k) => V[at(k, j)]!));
  return { values, vectors };
}

/** X Xᵀ of rows (n×n, row-major). */
export function gram(rows: readonly Vec[]): Float64Array {
  const n = rows.length;
  const G = new Float64Array(n * n);
  for (let i = 0; i < n; i++)
    for (let j = i; j < n; j++) {
      const v = dot(rows[i]!, rows[j]!);
      G[i * n + j] = v;
      G[j * n + i] = v;
    }
  return G;
}

export interface RowBasis {
  /** The rows in the new coordinates (n × r); inner products between rows are preserved. */
  coords: Float64Array[];
  /** Orthonormal basis of the row span in the original space (r vectors of width d). */
  basis: Float64Array[];
  /** Width of the original rows. */
  ambientDim: number;
}

/**
 * An orthonormal basis of span(rows) from the eigen-decomposition of the Gram matrix, and the
 * rows' coordinates in it. Directions with eigenvalue below `relTol`·λ_max are dropped.
 */
export function rowBasis(rows: readonly Vec[], relTol = 1e-12): RowBasis {
  const n = rows.length;
  const d = rows[0]?.length ?? 0;
  const { values, vectors } = symEig(gram(rows), n);
  const lmax = Math.max(0, values[0] ?? 0);
  const keep: number[] = [];
  for (let j = 0; j < n; j++) if (values[j]! > relTol * lmax && values[j]! > 0) keep.push(j);
  const basis = keep.map((j) => {
    const u = vectors[j]!;
    const b = new Float64Array(d);
    for (let i = 0; i < n; i++) axpy(b, u[i]!, rows[i]!);
    const s = 1 / Math.sqrt(values[j]!);
    return b.map((x) => x * s);
  });
  const coords = rows.map((_, i) => Float64Array.from(keep, (j) => vectors[j]![i]! * Math.sqrt(values[j]!)));
  return { coords, basis, ambientDim: d };
}

/** Map a vector given in `rowBasis` coordinates back to the original space. */
export function fromBasis(b: RowBasis, c: Vec): Float64Array {
  const out = new Float64Array(b.ambientDim);
  b.basis.forEach((v, j) => axpy(out, c[j]!, v));
  return out;
}

// ---- PCA ----------------------------------------------------------------------------------------------

export interface Pca {
  mean: Float64Array;
  /** Unit principal axes (in the rows' space), by decreasing variance; at most `k`. */
  components: Float64Array[];
  /** Variance along every axis with nonzero variance (sample variance, n−1), descending. */
  explainedVariance: number[];
  /** explainedVariance / total variance. */
  explainedVarianceRatio: number[];
  /** Scores of each row on the kept components (n × k). */
  scores: number[][];
}

/**
 * PCA via the Gram matrix (works for n < d and n > d alike; O(n²d + n³)). `center: false` gives
 * the uncentred version (SVD of the rows themselves: "variance" is then the mean square about 0).
 */
export function pca(rows: readonly Vec[], k = 10, opts: { center?: boolean } = {}): Pca {
  const n = rows.length;
  if (n < 2) throw new UsageError(`PCA needs at least 2 rows, got ${n}`);
  const mu = opts.center === false ? new Float64Array(rows[0]!.length) : meanRows(rows);
  const centred = rows.map((r) => sub(r, mu));
  const { values, vectors } = symEig(gram(centred), n);
  const total = values.reduce((a, v) => a + Math.max(0, v), 0);
  const lmax = Math.max(0, values[0] ?? 0);
  const idx: number[] = [];
  for (let j = 0; j < n; j++) if (values[j]! > 1e-12 * lmax && values[j]! > 0) idx.push(j);
  const explainedVariance = idx.map((j) => values[j]! / (n - 1));
  const explainedVarianceRatio = idx.map((j) => (total > 0 ? values[j]! / total : 0));
  const kk = Math.min(k, idx.length);
  const components: Float64Array[] = [];
  for (let c = 0; c < kk; c++) {
    const j = idx[c]!;
    const u = vectors[j]!;
    const v = new Float64Array(mu.length);
    for (let i = 0; i < n; i++) axpy(v, u[i]!, centred[i]!);
    const s = 1 / Math.sqrt(values[j]!);
    components.push(v.map((x) => x * s));
  }
  const scores = centred.map((r) => components.map((c) => dot(r, c)));
  return { mean: mu, components, explainedVariance, explainedVarianceRatio, scores };
}

/** Cosines of the principal angles between two subspaces given by orthonormal bases (descending). */
export function principalAngleCosines(A: readonly Vec[], B: readonly Vec[]): number[] {
  const qa = orthonormalize(A);
  const qb = orthonormalize(B);
  const k = qa.length;
  const m = qb.length;
  if (k === 0 || m === 0) return [];
  // Singular values of M = Qaᵀ Qb from the eigenvalues of M Mᵀ (k×k).
  const M = qa.map((a) => qb.map((b) => dot(a, b)));
  const MMt = new Float64Array(k * k);
  for (let i = 0; i < k; i++) for (let j = 0; j < k; j++) MMt[i * k + j] = dot(M[i]!, M[j]!);
  const { values } = symEig(MMt, k);
  return Array.from(values.slice(0, Math.min(k, m)), (v) => Math.min(1, Math.sqrt(Math.max(0, v))));
}

// ---- linear solves ------------------------------------------------------------------------------------

/** Solve A x = b for symmetric positive-definite A (n×n row-major) by Cholesky. */
export function solveSpd(A: Float64Array, n: number, b: Vec): Float64Array {
  const L = new Float64Array(n * n);
  for (let i = 0; i < n; i++)
    for (let j = 0; j <= i; j++) {
      let s = A[i * n + j]!;
      for (let k = 0; k < j; k++) s -= L[i * n + k]! * L[j * n + k]!;
      if (i === j) {
        if (!(s > 0)) throw new UsageError("solveSpd: matrix is not positive definite");
        L[i * n + i] = Math.sqrt(s);
      } else L[i * n + j] = s / L[j * n + j]!;
    }
  const y = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let s = b[i]!;
    for (let k = 0; k < i; k++) s -= L[i * n + k]! * y[k]!;
    y[i] = s / L[i * n + i]!;
  }
  const x = new Float64Array(n);
  for (let i = n - 1; i >= 0; i--) {
    let s = y[i]!;
    for (let k = i + 1; k < n; k++) s -= L[k * n + i]! * x[k]!;
    x[i] = s / L[i * n + i]!;
  }
  return x;
}

// ---- folds and scores ---------------------------------------------------------------------------------

/** 0..n-1 in a seeded random order. */
const shuffled = (n: number, rng: Rng): number[] => rng.shuffle(Array.from({ length: n }, (_, i) => i));

/**
 * K-fold test-index sets. `seed` null = contiguous folds in order (sklearn KFold without
 * shuffle); otherwise the indices are shuffled first with our seeded PRNG (so fold membership is
 * not sklearn's for the same seed). Fold sizes differ by at most one.
 */
export function kFold(n: number, k: number, seed: number | null): number[][] {
  if (k < 2 || k > n) throw new UsageError(`k-fold: need 2 <= k <= n, got k=${k}, n=${n}`);
  const idx = seed === null ? Array.from({ length: n }, (_, i) => i) : shuffled(n, new Rng(seed));
  const folds: number[][] = [];
  let start = 0;
  for (let f = 0; f < k; f++) {
    const size = Math.floor(n / k) + (f < n % k ? 1 : 0);
    folds.push(idx.slice(start, start + size).sort((a, b) => a - b));
    start += size;
  }
  return folds;
}

/** Stratified k-fold: each class shuffled (seeded) and dealt round-robin to the folds. */
export function stratifiedKFold(labels: readonly number[], k: number, seed: number): number[][] {
  const rng = new Rng(seed);
  const folds: number[][] = Array.from({ length: k }, () => []);
  const classes = [...new Set(labels)].sort((a, b) => a - b);
  let offset = 0;
  for (const c of classes) {
    const members = labels.flatMap((l, i) => (l === c ? [i] : []));
    const order = shuffled(members.length, rng);
    order.forEach((o, j) => folds[(j + offset) % k]!.push(members[o]!));
    offset += members.length; // continue the round-robin so fold sizes stay balanced
  }
  return folds.map((f) => f.sort((a, b) => a - b));
}

export interface ClassScores {
  accuracy: number;
  /** Mean of the per-class F1 scores (a class never predicted nor present scores 0, as sklearn). */
  macroF1: number;
  /** Mean of the per-class recalls. */
  balancedAccuracy: number;
}

export function classScores(yTrue: readonly number[], yPred: readonly number[]): ClassScores {
  let correct = 0;
  const f1s: number[] = [];
  const recalls: number[] = [];
  for (const c of [0, 1]) {
    let tp = 0;
    let fp = 0;
    let fn = 0;
    for (let i = 0; i < yTrue.length; i++) {
      if (yPred[i] === c && yTrue[i] === c) tp++;
      else if (yPred[i] === c) fp++;
      else if (yTrue[i] === c) fn++;
    }
    f1s.push(2 * tp + fp + fn === 0 ? 0 : (2 * tp) / (2 * tp + fp + fn));
    if (tp + fn > 0) recalls.push(tp / (tp + fn));
  }
  for (let i = 0; i < yTrue.length; i++) if (yTrue[i] === yPred[i]) correct++;
  return { accuracy: correct / yTrue.length, macroF1: mean(f1s), balancedAccuracy: mean(recalls) };
}

/** Coefficient of determination (sklearn r2_score): 1 − SS_res / SS_tot about the mean of `y`. */
export function r2(y: readonly number[], yhat: readonly number[]): number {
  const my = mean(y);
  let ssr = 0;
  let sst = 0;
  for (let i = 0; i < y.length; i++) {
    ssr += (y[i]! - yhat[i]!) ** 2;
    sst += (y[i]! - my) ** 2;
  }
  if (sst === 0) return ssr === 0 ? 1 : 0;
  return 1 - ssr / sst;
}

// ---- LDA (two classes, shrinkage) ---------------------------------------------------------------------

export interface LdaModel {
  /** Discriminant direction Σ⁻¹(μ₁ − μ₀) (unnormalised; class 1 projects higher). */
  w: Float64Array;
  /** Midpoint of the two class-mean projections (protocol §4.2's classification rule). */
  threshold: number;
  /** Ledoit-Wolf shrinkage intensity used (0 = empirical covariance). */
  shrinkage: number;
  mean0: Float64Array;
  mean1: Float64Array;
}

/**
 * Ledoit-Wolf shrinkage intensity for already-centred rows (the formula of sklearn's
 * `ledoit_wolf_shrinkage`), with the feature count `ambientDim` (≥ the rows' width; rows given in
 * `rowBasis` coordinates are zero in the remaining directions).
 */
export function ledoitWolf(centred: readonly Vec[], ambientDim: number): { shrinkage: number; mu: number } {
  const n = centred.length;
  const D = ambientDim;
  const sq = centred.map((r) => dot(r, r));
  const trS = sq.reduce((a, b) => a + b, 0) / n;
  const mu = trS / D;
  const beta_ = sq.reduce((a, b) => a + b * b, 0);
  const G = gram(centred);
  let delta_ = 0;
  for (const g of G) delta_ += g * g; // ‖XᵀX‖²_F = ‖XXᵀ‖²_F
  delta_ /= n * n;
  let beta = (1 / (D * n)) * (beta_ / n - delta_);
  let delta = delta_ - 2 * mu * trS + D * mu * mu;
  delta /= D;
  beta = Math.min(beta, delta);
  return { shrinkage: beta === 0 || delta === 0 ? 0 : Math.max(0, Math.min(1, beta / delta)), mu };
}

/**
 * Two-class LDA with a shrunk pooled within-class covariance: Σ = (1−γ)·S + γ·(tr S / D)·I, where S
 * is the (biased) pooled within-class covariance and γ the Ledoit-Wolf intensity. The shrinkage
 * keeps Σ invertible when d > n (sklearn's default "svd" solver instead restricts to the span of
 * the data; ours is its `solver="lsqr", shrinkage="auto"` variant, with one pooled shrinkage rather
 * than per-class). `shrinkage` overrides γ.
 */
export function ldaFit(rows: readonly Vec[], y: readonly number[], opts: { ambientDim?: number; shrinkage?: number } = {}): LdaModel {
  const p = rows[0]?.length ?? 0;
  const r0 = rows.filter((_, i) => y[i] === 0);
  const r1 = rows.filter((_, i) => y[i] === 1);
  if (r0.length === 0 || r1.length === 0) throw new UsageError("LDA needs both classes");
  const m0 = meanRows(r0, p);
  const m1 = meanRows(r1, p);
  const centred = rows.map((r, i) => sub(r, y[i] === 1 ? m1 : m0));
  const D = Math.max(p, opts.ambientDim ?? p);
  const lw = ledoitWolf(centred, D);
  const gamma = opts.shrinkage ?? lw.shrinkage;
  const n = rows.length;
  const S = new Float64Array(p * p);
  for (const r of centred)
    for (let i = 0; i < p; i++) {
      const ri = r[i]!;
      if (ri === 0) continue;
      for (let j = 0; j < p; j++) S[i * p + j]! += ri * r[j]!;
    }
  let ridge = gamma * lw.mu;
  if (!(ridge > 0)) ridge = 1e-10 * Math.max(1e-300, lw.mu || 1); // keep Σ invertible when γ = 0
  for (let i = 0; i < p * p; i++) S[i] = ((1 - gamma) * S[i]!) / n;
  for (let i = 0; i < p; i++) S[i * p + i]! += ridge;
  const w = solveSpd(S, p, sub(m1, m0));
  const threshold = (dot(m0, w) + dot(m1, w)) / 2;
  return { w, threshold, shrinkage: gamma, mean0: m0, mean1: m1 };
}

export function ldaPredict(m: LdaModel, rows: readonly Vec[]): number[] {
  return rows.map((r) => (dot(r, m.w) > m.threshold ? 1 : 0));
}

/** A shrinkage LDA fitted in kernel form: w = Σ_a coef[a] · x_{train[a]}. */
export interface LdaDual {
  train: number[];
  coef: Float64Array;
  threshold: number;
  shrinkage: number;
}

/**
 * The same model as `ldaFit`, computed from the Gram matrix G (n×n) of all rows for the rows in
 * `train` (Woodbury: O(m³) for m training rows instead of O(m·p²)); `y` holds labels for all n.
 * Used by the threshold search, which fits hundreds of folds.
 */
export function ldaFitGram(G: Float64Array, n: number, train: readonly number[], y: readonly number[], opts: { ambientDim: number; shrinkage?: number }): LdaDual {
  const m = train.length;
  const cls = train.map((i) => y[i]!);
  const cnt = [0, 0];
  for (const c of cls) cnt[c]!++;
  if (cnt[0] === 0 || cnt[1] === 0) throw new UsageError("LDA needs both classes");
  const GT = new Float64Array(m * m);
  for (let a = 0; a < m; a++) for (let b = 0; b < m; b++) GT[a * m + b] = G[train[a]! * n + train[b]!]!;
  // M[a][c] = mean over class c of GT[a][·]; Q[c][c'] = mean over both classes.
  const M = new Float64Array(m * 2);
  for (let a = 0; a < m; a++) for (let b = 0; b < m; b++) M[a * 2 + cls[b]!]! += GT[a * m + b]! / cnt[cls[b]!]!;
  const Q = new Float64Array(4);
  for (let a = 0; a < m; a++) for (let c = 0; c < 2; c++) Q[cls[a]! * 2 + c]! += M[a * 2 + c]! / cnt[cls[a]!]!;
  const K = new Float64Array(m * m);
  for (let a = 0; a < m; a++)
    for (let b = 0; b < m; b++) K[a * m + b] = GT[a * m + b]! - M[a * 2 + cls[b]!]! - M[b * 2 + cls[a]!]! + Q[cls[a]! * 2 + cls[b]!]!;
  // Ledoit-Wolf on the within-class-centred rows (as ledoitWolf, from K).
  const D = opts.ambientDim;
  let trS = 0;
  let beta_ = 0;
  let delta_ = 0;
  for (let a = 0; a < m; a++) {
    const q = K[a * m + a]!;
    trS += q;
    beta_ += q * q;
  }
  for (const k of K) delta_ += k * k;
  trS /= m;
  delta_ /= m * m;
  const mu = trS / D;
  let beta = (1 / (D * m)) * (beta_ / m - delta_);
  let delta = (delta_ - 2 * mu * trS + D * mu * mu) / D;
  beta = Math.min(beta, delta);
  const lw = beta === 0 || delta === 0 ? 0 : Math.max(0, Math.min(1, beta / delta));
  const gamma = opts.shrinkage ?? lw;
  delta = 0;
  const aCoef = (1 - gamma) / m;
  let rho = gamma * mu;
  if (!(rho > 0)) rho = 1e-10 * Math.max(1e-300, mu || 1);
  // δ = μ1 − μ0 = Σ e_a x_a; Xc δ = g − classmean(g) with g = GT e.
  const e = cls.map((c) => (c === 1 ? 1 / cnt[1]! : -1 / cnt[0]!));
  const g = new Float64Array(m);
  for (let a = 0; a < m; a++) for (let b = 0; b < m; b++) g[a]! += GT[a * m + b]! * e[b]!;
  const gm = [0, 0];
  for (let a = 0; a < m; a++) gm[cls[a]!]! += g[a]! / cnt[cls[a]!]!;
  const xcd = Float64Array.from(g, (v, a) => v - gm[cls[a]!]!);
  const A = Float64Array.from(K, (v) => aCoef * v);
  for (let a = 0; a < m; a++) A[a * m + a]! += rho;
  const alpha = solveSpd(A, m, xcd);
  // Xcᵀ α = Σ x_a (α_a − S_c/n_c), S_c = Σ_{a∈c} α_a;  w = (δ − a·Xcᵀα)/ρ.
  const S = [0, 0];
  for (let a = 0; a < m; a++) S[cls[a]!]! += alpha[a]!;
  const coef = Float64Array.from({ length: m }, (_, a) => (e[a]! - aCoef * (alpha[a]! - S[cls[a]!]! / cnt[cls[a]!]!)) / rho);
  const model: LdaDual = { train: [...train], coef, threshold: 0, shrinkage: gamma };
  const pm = [0, 0];
  for (let a = 0; a < m; a++) pm[cls[a]!]! += ldaDualProject(model, G, n, train[a]!) / cnt[cls[a]!]!;
  model.threshold = (pm[0]! + pm[1]!) / 2;
  return model;
}

/** x_j · w for row j of the Gram matrix. */
export function ldaDualProject(m: LdaDual, G: Float64Array, n: number, j: number): number {
  let s = 0;
  for (let a = 0; a < m.train.length; a++) s += m.coef[a]! * G[j * n + m.train[a]!]!;
  return s;
}

// ---- ridge ------------------------------------------------------------------------------------------

/** Ridge fits for several penalties at once (intercept fitted, as sklearn Ridge's default). */
export interface RidgePath {
  alphas: number[];
  /** Coefficients per alpha (rows' coordinates). */
  coefs: Float64Array[];
  intercepts: number[];
}

/**
 * Minimise ‖y − Xw − b‖² + α‖w‖² for every α, in dual form through one eigen-decomposition of the
 * centred Gram matrix: w = Xcᵀ U (Λ + α)⁻¹ Uᵀ yc.
 */
export function ridgePath(rows: readonly Vec[], y: readonly number[], alphas: readonly number[]): RidgePath {
  const n = rows.length;
  const p = rows[0]?.length ?? 0;
  const mx = meanRows(rows, p);
  const my = mean(y);
  const Xc = rows.map((r) => sub(r, mx));
  const yc = y.map((v) => v - my);
  const { values, vectors } = symEig(gram(Xc), n);
  const uty = vectors.map((u) => dot(u, yc));
  const coefs: Float64Array[] = [];
  const intercepts: number[] = [];
  for (const a of alphas) {
    const dual = new Float64Array(n);
    vectors.forEach((u, j) => {
      const lam = Math.max(0, values[j]!);
      if (lam + a <= 0) return;
      axpy(dual, uty[j]! / (lam + a), u);
    });
    const w = new Float64Array(p);
    for (let i = 0; i < n; i++) axpy(w, dual[i]!, Xc[i]!);
    coefs.push(w);
    intercepts.push(my - dot(mx, w));
  }
  return { alphas: [...alphas], coefs, intercepts };
}

export function ridgePredict(w: Vec, b: number, rows: readonly Vec[]): number[] {
  return rows.map((r) => dot(r, w) + b);
}

const pick = <T>(xs: readonly T[], idx: readonly number[]) => idx.map((i) => xs[i]!);
const complement = (n: number, idx: readonly number[]) => {
  const s = new Set(idx);
  return Array.from({ length: n }, (_, i) => i).filter((i) => !s.has(i));
};

/** Mean fold R² of each alpha under K-fold CV (contiguous folds, like sklearn RidgeCV(cv=k)). */
export function ridgeCvScores(rows: readonly Vec[], y: readonly number[], alphas: readonly number[], k: number, seed: number | null = null): number[] {
  const folds = kFold(rows.length, k, seed);
  const scores = alphas.map(() => 0);
  for (const test of folds) {
    const train = complement(rows.length, test);
    const path = ridgePath(pick(rows, train), pick(y, train), alphas);
    const yt = pick(y, test);
    alphas.forEach((_, a) => {
      scores[a]! += r2(yt, ridgePredict(path.coefs[a]!, path.intercepts[a]!, pick(rows, test))) / folds.length;
    });
  }
  return scores;
}

/** The alpha with the best mean CV R² (first on ties). */
export function ridgeCvAlpha(rows: readonly Vec[], y: readonly number[], alphas: readonly number[], k: number): { alpha: number; scores: number[] } {
  const scores = ridgeCvScores(rows, y, alphas, k);
  let best = 0;
  scores.forEach((s, i) => {
    if (s > scores[best]!) best = i;
  });
  return { alpha: alphas[best]!, scores };
}

export interface NestedRidge {
  /** Outer-fold test R² (RidgeCV(cv=inner) chosen alpha refit on the outer training part). */
  foldR2: number[];
  meanR2: number;
  foldAlpha: number[];
  /** Out-of-fold predictions (for plots). */
  oofPred: number[];
}

/** Nested CV of ridge: outer K-fold (shuffled, seeded), inner RidgeCV(cv=inner) over `alphas`. */
export function nestedRidgeCv(rows: readonly Vec[], y: readonly number[], alphas: readonly number[], opts: { outer?: number; inner?: number; seed?: number } = {}): NestedRidge {
  const n = rows.length;
  const outer = kFold(n, Math.min(opts.outer ?? 5, n), opts.seed ?? 42);
  const foldR2: number[] = [];
  const foldAlpha: number[] = [];
  const oofPred = new Array<number>(n).fill(NaN);
  for (const test of outer) {
    const train = complement(n, test);
    const tr = pick(rows, train);
    const ytr = pick(y, train);
    const { alpha } = ridgeCvAlpha(tr, ytr, alphas, Math.min(opts.inner ?? 3, train.length));
    const path = ridgePath(tr, ytr, [alpha]);
    const pred = ridgePredict(path.coefs[0]!, path.intercepts[0]!, pick(rows, test));
    test.forEach((i, j) => (oofPred[i] = pred[j]!));
    foldR2.push(r2(pick(y, test), pred));
    foldAlpha.push(alpha);
  }
  return { foldR2, meanR2: mean(foldR2), foldAlpha, oofPred };
}

// ---- clustering -------------------------------------------------------------------------------------------

/** Mean silhouette coefficient (Euclidean) of a labelling; NaN unless 2 ≤ clusters < n. */
export function silhouette(rows: readonly Vec[], labels: readonly number[]): number {
  const n = rows.length;
  const classes = [...new Set(labels)];
  if (classes.length < 2 || classes.length >= n) return NaN;
  const sq = rows.map((r) => dot(r, r));
  const dist = (i: number, j: number) => Math.sqrt(Math.max(0, sq[i]! + sq[j]! - 2 * dot(rows[i]!, rows[j]!)));
  const D = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) D[i * n + j] = D[j * n + i] = dist(i, j);
  let total = 0;
  for (let i = 0; i < n; i++) {
    const sums = new Map<number, { s: number; c: number }>();
    for (let j = 0; j < n; j++) {
      if (j === i) continue;
      const e = sums.get(labels[j]!) ?? { s: 0, c: 0 };
      e.s += D[i * n + j]!;
      e.c++;
      sums.set(labels[j]!, e);
    }
    const own = sums.get(labels[i]!);
    if (!own || own.c === 0) continue; // singleton cluster: s(i) = 0
    const a = own.s / own.c;
    let b = Infinity;
    for (const [c, e] of sums) if (c !== labels[i]) b = Math.min(b, e.s / e.c);
    total += b === a ? 0 : (b - a) / Math.max(a, b);
  }
  return total / n;
}
