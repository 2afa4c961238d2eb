// Which features' activations predict a binary outcome across trials (issue 17.4: which features
// predict that a steered answer corrects itself): the Pearson (point-biserial) correlation of each
// feature with the outcome, its Fisher-z interval, and the mean activation with and without the
// outcome. Features that never vary are skipped (their r is undefined).
import { fisherZInterval } from "./stats.js";

export interface FeatureCorrelate {
  feature: number;
  r: number;
  lo: number | null;
  hi: number | null;
  /** Mean activation in trials with the outcome / without it. */
  meanWith: number;
  meanWithout: number;
}

/** acts: [trials × features] row-major; outcome: one 0/1 per trial. Sorted by |r|, largest first. */
export function featureCorrelates(acts: Float32Array, features: number, outcome: readonly number[]): FeatureCorrelate[] {
  const n = outcome.length;
  if (acts.length !== n * features) throw new Error(`featureCorrelates: ${acts.length} activations for ${n} trials × ${features} features`);
  const my = outcome.reduce((s, v) => s + v, 0) / n;
  let syy = 0;
  for (const y of outcome) syy += (y - my) ** 2;
  const out: FeatureCorrelate[] = [];
  if (syy === 0) return out;
  const k = outcome.filter((y) => y === 1).length;
  for (let f = 0; f < features; f++) {
    let mx = 0, w = 0, wo = 0;
    for (let t = 0; t < n; t++) {
      const x = acts[t * features + f]!;
      mx += x / n;
      if (outcome[t] === 1) w += x;
      else wo += x;
    }
    let sxx = 0, sxy = 0;
    for (let t = 0; t < n; t++) {
      const dx = acts[t * features + f]! - mx;
      sxx += dx * dx;
      sxy += dx * (outcome[t]! - my);
    }
    if (sxx === 0) continue;
    const r = Math.max(-1, Math.min(1, sxy / Math.sqrt(sxx * syy)));
    const ci = fisherZInterval(r, n);
    out.push({ feature: f, r, lo: ci?.lo ?? null, hi: ci?.hi ?? null, meanWith: w / Math.max(1, k), meanWithout: wo / Math.max(1, n - k) });
  }
  return out.sort((a, b) => Math.abs(b.r) - Math.abs(a.r) || a.feature - b.feature);
}
