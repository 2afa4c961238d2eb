// Linear probes in Gram space: everything a probe needs from n activations of width d is their
// n×n Gram matrix G = X Xᵀ, so a layer costs one O(n²d) product and every fold, penalty and
// permutation after it is O(n³) at most, whatever d (a d of 4096 or 8192 costs nothing more).
//
// - Ridge (multi-output; sklearn Ridge with intercept): the penalty α is chosen by inner K-fold CV
//   (contiguous folds, like RidgeCV(cv=k), scored by R² averaged over the targets, one α for all),
//   R² is measured on shuffled outer folds. Each fold's centred kernel is eigendecomposed once; a
//   permuted target only changes Uᵀy, so a permutation test reruns the whole nested CV (α choice
//   included) for the price of a few matrix-vector products.
// - L2 logistic regression (sklearn LogisticRegression's objective: C·Σ log-loss + ½‖w‖², intercept
//   unpenalized), one-vs-rest for more than two classes, by Newton's method in the fold's kernel
//   coordinates (an isometric embedding of the centred training rows: the optimum lies in their
//   span, so this is the primal problem exactly). C by inner stratified CV (accuracy), accuracy and
//   ROC AUC (macro one-vs-rest) on stratified outer folds.
// - Permutation tests: the targets (rows of them, jointly) shuffled, the whole procedure rerun;
//   p = (1 + #{null ≥ observed}) / (1 + permutations).
// - A final fit on all rows returns dual coefficients a, so the caller forms the probe direction
//   w = Σᵢ aᵢ (xᵢ − x̄) from the activations it holds.
import { UsageError } from "../core/errors.js";
import { Rng } from "../core/rng.js";
import { kFold, mean, r2, solveSpd, stratifiedKFold, symEig } from "./linalg.js";

/** G = X Xᵀ in float64 for n rows of width d stored row-major in `x` (row stride `stride`, offset `offset`). */
export function gramMatrix(x: Float32Array, n: number, d: number, stride = d, offset = 0): Float64Array {
  const G = new Float64Array(n * n);
  const rows = Array.from({ length: n }, (_, i) => Float64Array.from(x.subarray(offset + i * stride, offset + i * stride + d)));
  for (let i = 0; i < n; i++) {
    const a = rows[i]!;
    for (let j = 0; j <= i; j++) {
      const b = rows[j]!;
      let s = 0;
      for (let k = 0; k < d; k++) s += a[k]! * b[k]!;
      G[i * n + j] = s;
      G[j * n + i] = s;
    }
  }
  return G;
}

/** One train/test split's kernel, centred on the training rows' mean, eigendecomposed. */
interface FoldKernel {
  train: number[];
  test: number[];
  /** Eigenvalues (clamped at 0) and eigenvectors (over the training rows) of the centred training kernel. */
  values: Float64Array;
  vectors: Float64Array[];
  /** Centred test×train kernel [test.length × train.length]. */
  kst: Float64Array;
}

function foldKernel(G: Float64Array, n: number, train: number[], test: number[]): FoldKernel {
  const t = train.length;
  // (x_i − m)·(x_j − m) = G_ij − r_i − r_j + g, with r_i = mean_k G_ik over the training rows.
  const r = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let s = 0;
    for (const k of train) s += G[i * n + k]!;
    r[i] = s / t;
  }
  let g = 0;
  for (const k of train) g += r[k]!;
  g /= t;
  const ktt = new Float64Array(t * t);
  train.forEach((i, a) => train.forEach((j, b) => (ktt[a * t + b] = G[i * n + j]! - r[i]! - r[j]! + g)));
  const kst = new Float64Array(test.length * t);
  test.forEach((i, a) => train.forEach((j, b) => (kst[a * t + b] = G[i * n + j]! - r[i]! - r[j]! + g)));
  const { values, vectors } = symEig(ktt, t);
  return { train, test, values: values.map((v) => Math.max(0, v)), vectors, kst };
}

// ---- ridge ---------------------------------------------------------------------------------------------

/** A fold prepared for ridge: P = Kst·U, so a prediction is P · diag(1/(λ+α)) · Uᵀ(y − ȳ) + ȳ. */
interface RidgeFold extends FoldKernel {
  P: Float64Array;
}

/** The test rows' coordinates on the first `k` eigenvectors, Kst·U_j / scale_j ([test.length × k]). */
function testCoordinates(f: FoldKernel, k: number, scale?: Float64Array): Float64Array {
  const t = f.train.length, s = f.test.length;
  const out = new Float64Array(s * k);
  for (let a = 0; a < s; a++)
    for (let j = 0; j < k; j++) {
      const u = f.vectors[j]!;
      let acc = 0;
      for (let b = 0; b < t; b++) acc += f.kst[a * t + b]! * u[b]!;
      out[a * k + j] = scale ? acc / scale[j]! : acc;
    }
  return out;
}

function ridgeFold(G: Float64Array, n: number, train: number[], test: number[]): RidgeFold {
  const f = foldKernel(G, n, train, test);
  return { ...f, P: testCoordinates(f, f.vectors.length) };
}

/** Predictions on the fold's test rows for target column `y` (all n rows; train part used) at each α. */
function ridgePredictFold(f: RidgeFold, y: ArrayLike<number>, alphas: readonly number[]): number[][] {
  const t = f.train.length, rk = f.vectors.length, s = f.test.length;
  let ym = 0;
  for (const i of f.train) ym += y[i]!;
  ym /= t;
  const uty = f.vectors.map((u) => {
    let acc = 0;
    f.train.forEach((i, b) => (acc += u[b]! * (y[i]! - ym)));
    return acc;
  });
  return alphas.map((al) => {
    const c = uty.map((v, j) => (f.values[j]! + al > 0 ? v / (f.values[j]! + al) : 0));
    const out = new Array<number>(s);
    for (let a = 0; a < s; a++) {
      let acc = ym;
      for (let j = 0; j < rk; j++) acc += f.P[a * rk + j]! * c[j]!;
      out[a] = acc;
    }
    return out;
  });
}

export interface RidgeOptions {
  alphas: readonly number[];
  /** Outer folds (shuffled with `seed`). */
  outer?: number;
  /** Inner folds for choosing α (contiguous, like RidgeCV(cv=k)). */
  inner?: number;
  seed?: number;
  permutations?: number;
  /** Seed of the permutations (default seed + 1). */
  permutationSeed?: number;
}

export interface RidgeResult {
  /** Per target: the mean over outer folds of the test R². */
  r2: number[];
  /** The mean of `r2` over targets: the statistic the permutation test uses. */
  meanR2: number;
  /** [target][fold] test R². */
  foldR2: number[][];
  /** The α chosen in each outer fold. */
  foldAlpha: number[];
  /** Out-of-fold predictions [target][row]. */
  oof: number[][];
  permutation?: PermutationTest;
}

export interface PermutationTest {
  permutations: number;
  /** The statistic under each permutation. */
  null: number[];
  p: number;
}

/** Nested-CV ridge of each target column `Y[k]` (length n) on the rows behind `G`; optionally a permutation test. */
export function ridgeProbe(G: Float64Array, n: number, Y: readonly (readonly number[])[], o: RidgeOptions): RidgeResult {
  if (!o.alphas.length || o.alphas.some((a) => !(a > 0))) throw new UsageError(`ridge: alphas must be positive numbers, got ${o.alphas.join(",")}`);
  for (const y of Y) if (y.length !== n) throw new UsageError(`ridge: a target has ${y.length} values for ${n} rows`);
  const outer = kFold(n, Math.min(o.outer ?? 5, n), o.seed ?? 0);
  const folds = outer.map((test) => {
    const train = complement(n, test);
    const innerK = Math.min(o.inner ?? 3, train.length);
    const inner = kFold(train.length, innerK, null).map((ti) => {
      const itest = ti.map((q) => train[q]!);
      return ridgeFold(G, n, complement(n, [...itest, ...test]), itest);
    });
    return { outerFold: ridgeFold(G, n, train, test), inner };
  });
  const evaluate = (Yp: readonly (ArrayLike<number>)[]) => {
    const foldR2: number[][] = Yp.map(() => []);
    const foldAlpha: number[] = [];
    const oof = Yp.map(() => new Array<number>(n).fill(NaN));
    for (const { outerFold, inner } of folds) {
      // Inner CV: mean over inner folds of the target-averaged R², per α.
      const score = o.alphas.map(() => 0);
      for (const f of inner) {
        const preds = Yp.map((y) => ridgePredictFold(f, y, o.alphas));
        o.alphas.forEach((_, a) => {
          score[a]! += mean(Yp.map((y, k) => r2(f.test.map((i) => y[i]!), preds[k]![a]!))) / inner.length;
        });
      }
      let best = 0;
      score.forEach((s, a) => {
        if (s > score[best]!) best = a;
      });
      const alpha = o.alphas[best]!;
      foldAlpha.push(alpha);
      Yp.forEach((y, k) => {
        const pred = ridgePredictFold(outerFold, y, [alpha])[0]!;
        outerFold.test.forEach((i, j) => (oof[k]![i] = pred[j]!));
        foldR2[k]!.push(r2(outerFold.test.map((i) => y[i]!), pred));
      });
    }
    const r2s = foldR2.map(mean);
    return { r2: r2s, meanR2: mean(r2s), foldR2, foldAlpha, oof };
  };
  const observed: RidgeResult = evaluate(Y);
  if (o.permutations) {
    const rng = new Rng(o.permutationSeed ?? (o.seed ?? 0) + 1);
    const nul: number[] = [];
    for (let p = 0; p < o.permutations; p++) {
      const perm = rng.shuffle(Array.from({ length: n }, (_, i) => i));
      nul.push(evaluate(Y.map((y) => perm.map((q) => y[q]!))).meanR2);
    }
    observed.permutation = permutationP(observed.meanR2, nul);
  }
  return observed;
}

/**
 * Ridge on all rows with α chosen by K-fold CV (contiguous folds) over all of them; returns the
 * dual coefficients per target (w = Σᵢ aᵢ (xᵢ − x̄)) and the intercept (prediction ȳ + w·(x − x̄)).
 */
export function ridgeFull(G: Float64Array, n: number, Y: readonly (readonly number[])[], alphas: readonly number[], inner = 3): { alpha: number; dual: Float64Array[]; yMean: number[] } {
  const all = Array.from({ length: n }, (_, i) => i);
  const folds = kFold(n, Math.min(inner, n), null).map((test) => ridgeFold(G, n, complement(n, test), test));
  const score = alphas.map((_, a) => mean(folds.map((f) => mean(Y.map((y) => r2(f.test.map((i) => y[i]!), ridgePredictFold(f, y, alphas)[a]!))))));
  let best = 0;
  score.forEach((s, a) => {
    if (s > score[best]!) best = a;
  });
  const alpha = alphas[best]!;
  const f = foldKernel(G, n, all, []);
  const yMean = Y.map((y) => mean(y));
  const dual = Y.map((y, k) => {
    const a = new Float64Array(n);
    f.vectors.forEach((u, j) => {
      let uty = 0;
      for (let i = 0; i < n; i++) uty += u[i]! * (y[i]! - yMean[k]!);
      const c = uty / (f.values[j]! + alpha);
      for (let i = 0; i < n; i++) a[i]! += c * u[i]!;
    });
    return a;
  });
  return { alpha, dual, yMean };
}

// ---- logistic ------------------------------------------------------------------------------------------

/** A fold in kernel coordinates: training rows z (t × r, z·z' = centred kernel) and test rows likewise. */
interface LogisticFold extends FoldKernel {
  r: number;
  sqrtL: Float64Array;
  zTrain: Float64Array;
  zTest: Float64Array;
}

function logisticFold(G: Float64Array, n: number, train: number[], test: number[]): LogisticFold {
  const f = foldKernel(G, n, train, test);
  const t = train.length;
  const top = f.values[0] ?? 0;
  // Directions with no variance carry nothing (and would divide by ~0 below).
  const keep = f.values.reduce((k, v) => (v > top * 1e-10 && v > 0 ? k + 1 : k), 0);
  const sqrtL = Float64Array.from(f.values.subarray(0, keep), Math.sqrt);
  const zTrain = new Float64Array(t * keep);
  for (let i = 0; i < t; i++) for (let j = 0; j < keep; j++) zTrain[i * keep + j] = f.vectors[j]![i]! * sqrtL[j]!;
  return { ...f, r: keep, sqrtL, zTrain, zTest: testCoordinates(f, keep, sqrtL) };
}

/** min C·Σ log(1 + exp(−sᵢ(w·zᵢ + b))) + ½‖w‖² by Newton's method (sᵢ = ±1). Returns [w…, b]. */
export function fitLogistic(z: Float64Array, rows: number, r: number, s: readonly number[], C: number): Float64Array {
  const m = r + 1;
  const wb = new Float64Array(m);
  const obj = (v: Float64Array) => {
    let o = 0;
    for (let j = 0; j < r; j++) o += 0.5 * v[j]! ** 2;
    for (let i = 0; i < rows; i++) {
      let f = v[r]!;
      for (let j = 0; j < r; j++) f += v[j]! * z[i * r + j]!;
      const u = -s[i]! * f;
      o += C * (u > 0 ? u + Math.log1p(Math.exp(-u)) : Math.log1p(Math.exp(u)));
    }
    return o;
  };
  let cur = obj(wb);
  for (let it = 0; it < 100; it++) {
    const g = new Float64Array(m);
    const H = new Float64Array(m * m);
    for (let j = 0; j < r; j++) {
      g[j] = wb[j]!;
      H[j * m + j] = 1;
    }
    for (let i = 0; i < rows; i++) {
      const zi = z.subarray(i * r, i * r + r);
      let f = wb[r]!;
      for (let j = 0; j < r; j++) f += wb[j]! * zi[j]!;
      const p = 1 / (1 + Math.exp(s[i]! * f)); // σ(−s f)
      const d = C * p * (1 - p);
      const gi = -C * s[i]! * p;
      for (let j = 0; j < r; j++) {
        g[j]! += gi * zi[j]!;
        const dz = d * zi[j]!;
        for (let k = 0; k <= j; k++) H[j * m + k]! += dz * zi[k]!;
        H[r * m + j]! += dz;
      }
      g[r]! += gi;
      H[r * m + r]! += d;
    }
    for (let j = 0; j < m; j++) for (let k = 0; k < j; k++) H[k * m + j] = H[j * m + k]!;
    // The intercept's diagonal can be ~0 when every probability saturates; a tiny ridge keeps H SPD.
    H[r * m + r]! += 1e-12;
    const step = solveSpd(H, m, g);
    // Backtracking keeps each step a descent step (Newton can overshoot far from the optimum).
    let t = 1;
    let next = wb.map((v, j) => v - t * step[j]!);
    let val = obj(next);
    while (val > cur && t > 1e-8) {
      t /= 2;
      next = wb.map((v, j) => v - t * step[j]!);
      val = obj(next);
    }
    const dec = cur - val;
    wb.set(next);
    cur = val;
    if (dec <= 1e-12 * Math.max(1, Math.abs(cur))) break;
  }
  return wb;
}

/** Decision values [rows × classes] (one column for two classes: class 1's score) of one-vs-rest fits. */
function logisticScores(f: LogisticFold, labels: ArrayLike<number>, classes: number, C: number): { test: number[][]; fits: Float64Array[] } {
  const cols = classes === 2 ? [1] : Array.from({ length: classes }, (_, k) => k);
  const ytr = f.train.map((i) => labels[i]!);
  const fits = cols.map((k) => fitLogistic(f.zTrain, f.train.length, f.r, ytr.map((y) => (y === k ? 1 : -1)), C));
  const test = f.test.map((_, a) =>
    fits.map((wb) => {
      let acc = wb[f.r]!;
      for (let j = 0; j < f.r; j++) acc += wb[j]! * f.zTest[a * f.r + j]!;
      return acc;
    }),
  );
  return { test, fits };
}

const predictClass = (scores: number[], classes: number) => (classes === 2 ? (scores[0]! > 0 ? 1 : 0) : scores.indexOf(Math.max(...scores)));

/** ROC AUC of scores for the positive class (Mann-Whitney, ties counted half); NaN without both classes. */
export function rocAuc(scores: readonly number[], positive: readonly boolean[]): number {
  const idx = scores.map((_, i) => i).sort((a, b) => scores[a]! - scores[b]!);
  const ranks = new Array<number>(scores.length);
  for (let i = 0; i < idx.length; ) {
    let j = i;
    while (j + 1 < idx.length && scores[idx[j + 1]!] === scores[idx[i]!]) j++;
    for (let k = i; k <= j; k++) ranks[idx[k]!] = (i + j) / 2 + 1;
    i = j + 1;
  }
  let np = 0, sum = 0;
  positive.forEach((p, i) => {
    if (p) {
      np++;
      sum += ranks[i]!;
    }
  });
  const nn = positive.length - np;
  if (np === 0 || nn === 0) return NaN;
  return (sum - (np * (np + 1)) / 2) / (np * nn);
}

function aucOf(scores: number[][], labels: number[], classes: number): number {
  if (classes === 2) return rocAuc(scores.map((s) => s[0]!), labels.map((l) => l === 1));
  const per = Array.from({ length: classes }, (_, k) => rocAuc(scores.map((s) => s[k]!), labels.map((l) => l === k))).filter((v) => !Number.isNaN(v));
  return per.length ? mean(per) : NaN;
}

export interface LogisticOptions {
  Cs: readonly number[];
  outer?: number;
  inner?: number;
  seed?: number;
  permutations?: number;
  permutationSeed?: number;
}

export interface LogisticResult {
  classes: number;
  /** Mean over outer folds of the test accuracy / ROC AUC (macro one-vs-rest for > 2 classes). */
  accuracy: number;
  auc: number;
  foldAccuracy: number[];
  foldAuc: number[];
  foldC: number[];
  /** The majority class's share: the accuracy of always guessing it. */
  chance: number;
  permutation?: PermutationTest & { pAuc: number; nullAuc: number[] };
}

/** Nested-CV L2 logistic probe of integer labels 0..classes−1; optionally a permutation test (accuracy and AUC). */
export function logisticProbe(G: Float64Array, n: number, labels: readonly number[], o: LogisticOptions): LogisticResult {
  if (labels.length !== n) throw new UsageError(`logistic: ${labels.length} labels for ${n} rows`);
  const classes = Math.max(...labels) + 1;
  if (classes < 2) throw new UsageError("logistic: the labels have one class only");
  if (!o.Cs.length || o.Cs.some((c) => !(c > 0))) throw new UsageError(`logistic: Cs must be positive numbers, got ${o.Cs.join(",")}`);
  const seed = o.seed ?? 0;
  const evaluate = (y: readonly number[]) => {
    const outer = stratifiedKFold(y, Math.min(o.outer ?? 5, n), seed);
    const foldAccuracy: number[] = [], foldAuc: number[] = [], foldC: number[] = [];
    for (const test of outer) {
      const train = complement(n, test);
      const innerK = Math.min(o.inner ?? 3, train.length);
      const inner = stratifiedKFold(train.map((i) => y[i]!), innerK, seed).map((ti) => {
        const itest = ti.map((q) => train[q]!);
        return logisticFold(G, n, complement(n, [...itest, ...test]), itest);
      });
      const acc = o.Cs.map((C) =>
        mean(inner.map((f) => {
          const { test: sc } = logisticScores(f, y, classes, C);
          return mean(sc.map((s, a) => (predictClass(s, classes) === y[f.test[a]!] ? 1 : 0)));
        })),
      );
      let best = 0;
      acc.forEach((s, a) => {
        if (s > acc[best]!) best = a;
      });
      const C = o.Cs[best]!;
      const f = logisticFold(G, n, train, test);
      const { test: sc } = logisticScores(f, y, classes, C);
      const yt = test.map((i) => y[i]!);
      foldAccuracy.push(mean(sc.map((s, a) => (predictClass(s, classes) === yt[a] ? 1 : 0))));
      foldAuc.push(aucOf(sc, yt, classes));
      foldC.push(C);
    }
    const aucs = foldAuc.filter((v) => !Number.isNaN(v));
    return { accuracy: mean(foldAccuracy), auc: aucs.length ? mean(aucs) : NaN, foldAccuracy, foldAuc, foldC };
  };
  const counts = Array.from({ length: classes }, (_, k) => labels.filter((l) => l === k).length);
  const observed: LogisticResult = { classes, chance: Math.max(...counts) / n, ...evaluate(labels) };
  if (o.permutations) {
    const rng = new Rng(o.permutationSeed ?? seed + 1);
    const nul: number[] = [], nulAuc: number[] = [];
    for (let p = 0; p < o.permutations; p++) {
      const perm = rng.shuffle(Array.from({ length: n }, (_, i) => i));
      const r = evaluate(perm.map((q) => labels[q]!));
      nul.push(r.accuracy);
      nulAuc.push(r.auc);
    }
    observed.permutation = { ...permutationP(observed.accuracy, nul), pAuc: permutationP(observed.auc, nulAuc).p, nullAuc: nulAuc };
  }
  return observed;
}

/**
 * Logistic probe on all rows with C by stratified CV over them; dual coefficients per one-vs-rest
 * column (w = Σᵢ aᵢ (xᵢ − x̄); decision w·(x − x̄) + b).
 */
export function logisticFull(G: Float64Array, n: number, labels: readonly number[], Cs: readonly number[], inner = 3, seed = 0): { C: number; dual: Float64Array[]; intercept: number[] } {
  const classes = Math.max(...labels) + 1;
  const all = Array.from({ length: n }, (_, i) => i);
  const folds = stratifiedKFold(labels, Math.min(inner, n), seed).map((test) => logisticFold(G, n, complement(n, test), test));
  const acc = Cs.map((C) => mean(folds.map((f) => mean(logisticScores(f, labels, classes, C).test.map((s, a) => (predictClass(s, classes) === labels[f.test[a]!] ? 1 : 0))))));
  let best = 0;
  acc.forEach((s, a) => {
    if (s > acc[best]!) best = a;
  });
  const C = Cs[best]!;
  const f = logisticFold(G, n, all, []);
  const { fits } = logisticScores(f, labels, classes, C);
  // w·(x − x̄) = Σ_j w_z[j] · (U_jᵀ Kc(·, x)) / √λ_j, so a = Σ_j (w_z[j] / √λ_j) U_j.
  const dual = fits.map((wb) => {
    const a = new Float64Array(n);
    for (let j = 0; j < f.r; j++) {
      const c = wb[j]! / f.sqrtL[j]!;
      const u = f.vectors[j]!;
      for (let i = 0; i < n; i++) a[i]! += c * u[i]!;
    }
    return a;
  });
  return { C, dual, intercept: fits.map((wb) => wb[f.r]!) };
}

// ---- shared --------------------------------------------------------------------------------------------

export function permutationP(observed: number, nul: readonly number[]): PermutationTest {
  const ge = nul.filter((v) => v >= observed - 1e-12).length;
  return { permutations: nul.length, null: [...nul], p: (1 + ge) / (1 + nul.length) };
}

function complement(n: number, idx: readonly number[]): number[] {
  const s = new Set(idx);
  return Array.from({ length: n }, (_, i) => i).filter((i) => !s.has(i));
}

/** The probe direction w = Σᵢ aᵢ (xᵢ − x̄) in activation space from dual coefficients, and x̄. */
export function primalDirection(x: Float32Array, n: number, d: number, dual: Float64Array, stride = d, offset = 0): { w: Float64Array; mean: Float64Array } {
  const m = new Float64Array(d);
  for (let i = 0; i < n; i++) for (let k = 0; k < d; k++) m[k]! += x[offset + i * stride + k]! / n;
  const w = new Float64Array(d);
  for (let i = 0; i < n; i++) {
    const a = dual[i]!;
    if (a === 0) continue;
    for (let k = 0; k < d; k++) w[k]! += a * (x[offset + i * stride + k]! - m[k]!);
  }
  return { w, mean: m };
}
