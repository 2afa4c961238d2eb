// Noise controls and the synthetic threshold (issue 17.5; src/math/noise.ts, src/recipes/controls.ts).
// Each control family has the property that defines it, checked independently on synthetic concept
// vectors (norms, permutation, subspace membership by Gram-Schmidt, covariance by sampling, numpy's
// percentiles); the sigmoid fit recovers a planted slope and midpoint; end to end on the bundled
// organism, concept vectors are detected far above no injection, rates recount the trials, and a
// rerun resumes every trial; the cone rotation keeps its invariants and runs end to end.
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Rng } from "../src/core/rng.js";
import { coneRotate, controlVectors, deltaPcs, fitSigmoid, gaussian, nearestRow, percentile } from "../src/math/noise.js";
import { controlsCommand } from "../src/recipes/controls.js";
import { repoDir } from "./support/paths.js";

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-controls-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
const ORGANISM = path.join(repoDir(), "models", "organism", "organism.gguf");

const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
};
const nrm = (a: ArrayLike<number>) => Math.sqrt(dot(a, a));

describe("control vectors", () => {
  const d = 40, n = 12;
  const rng = new Rng(1);
  // Concepts in a 6-dimensional subspace plus an offset, with varied norms.
  const basis = Array.from({ length: 6 }, () => gaussian(rng, d));
  const concepts = new Map<string, Float32Array>();
  for (let i = 0; i < n; i++) {
    const z = gaussian(rng, 6);
    concepts.set(`c${i}`, Float32Array.from({ length: d }, (_, t) => 3 + (1 + i / 4) * basis.reduce((s, b, j) => s + z[j]! * b[t]!, 0)));
  }
  const success = [...concepts.keys()].slice(0, 8);
  const meanNorm = success.reduce((s, w) => s + nrm(concepts.get(w)!), 0) / success.length;
  const cv = controlVectors(concepts, success, { count: 20, k: 50, seed: 3 });
  const of = (c: string) => cv.filter((x) => x.condition === c);

  test("norms: isotropic and subspace noise at the mean success norm, norm-matched per concept", () => {
    for (const c of ["isotropic", "pca_all", "pca_success", "orthogonal"]) for (const x of of(c)) assert.ok(Math.abs(nrm(x.vector) / meanNorm - 1) < 1e-5, c);
    for (const x of of("norm_matched")) assert.ok(Math.abs(nrm(x.vector) / nrm(concepts.get(x.tag)!) - 1) < 1e-5);
    assert.equal(of("norm_matched").length, n);
  });

  test("shuffled vectors are permutations of their concept", () => {
    for (const x of of("shuffled")) assert.deepEqual([...x.vector].sort((a, b) => a - b), [...concepts.get(x.tag)!].sort((a, b) => a - b));
  });

  test("subspaces: PCA noise lies in the span of the centred concepts, orthogonal noise is perpendicular to it", () => {
    const rows = [...concepts.values()];
    const mu = Array.from({ length: d }, (_, t) => rows.reduce((s, r) => s + r[t]!, 0) / rows.length);
    // An orthonormal basis of the centred rows by Gram-Schmidt (independent of the PCA).
    const q: number[][] = [];
    for (const r of rows) {
      const v = Array.from(r, (x, t) => x - mu[t]!);
      for (const b of q) {
        const c = dot(v, b);
        v.forEach((_, t) => (v[t]! -= c * b[t]!));
      }
      const l = nrm(v);
      if (l > 1e-4 * meanNorm) q.push(v.map((x) => x / l)); // float32 rounding leaves ~1e-6 relative
    }
    assert.equal(q.length, 6);
    const residual = (x: Float32Array) => {
      const v = Array.from(x);
      for (const b of q) {
        const c = dot(v, b);
        v.forEach((_, t) => (v[t]! -= c * b[t]!));
      }
      return nrm(v) / nrm(x);
    };
    for (const x of of("pca_all")) assert.ok(residual(x.vector) < 1e-4, `pca_all residual ${residual(x.vector)}`);
    for (const x of of("orthogonal")) for (const b of q) assert.ok(Math.abs(dot(x.vector, b)) / meanNorm < 1e-4);
  });

  test("covariance-matched samples have the success vectors' mean and covariance", () => {
    const many = controlVectors(concepts, success, { count: 6000, seed: 4, conditions: ["cov_matched"] }).map((x) => x.vector);
    const S = success.map((w) => concepts.get(w)!);
    const mean = (rows: ArrayLike<number>[], t: number) => rows.reduce((s, r) => s + r[t]!, 0) / rows.length;
    const cov = (rows: ArrayLike<number>[], a: number, b: number, unbiased: boolean) => {
      const ma = mean(rows, a), mb = mean(rows, b);
      return rows.reduce((s, r) => s + (r[a]! - ma) * (r[b]! - mb), 0) / (rows.length - (unbiased ? 1 : 0));
    };
    for (const [a, b] of [[0, 0], [3, 7], [10, 10], [20, 33]] as const) {
      const want = cov(S, a, b, true), got = cov(many, a, b, false);
      assert.ok(Math.abs(got - want) < 0.08 * Math.sqrt(cov(S, a, a, true) * cov(S, b, b, true)) + 1e-9, `cov[${a},${b}] ${got} vs ${want}`);
      assert.ok(Math.abs(mean(many, a) - mean(S, a)) < 0.05 * Math.sqrt(cov(S, a, a, true)) + 1e-9);
    }
  });

  test("the norm sweep: one direction at numpy's percentiles of the concept norms", () => {
    const sweep = of("norm_sweep");
    const norms = [...concepts.values()].map(nrm);
    assert.deepEqual(sweep.map((x) => x.tag), ["p10", "p25", "p50", "p75", "p90", "p99"]);
    sweep.forEach((x, i) => assert.ok(Math.abs(nrm(x.vector) - percentile(norms, [10, 25, 50, 75, 90, 99][i]!)) < 1e-3));
    for (const x of sweep) assert.ok(Math.abs(dot(x.vector, sweep[0]!.vector) / (nrm(x.vector) * nrm(sweep[0]!.vector)) - 1) < 1e-6);
    // numpy.percentile([1, 2, 3, 4], 25) = 1.75 (linear interpolation).
    assert.equal(percentile([4, 1, 3, 2], 25), 1.75);
  });
});

describe("cone rotation", () => {
  test("keeps the d̂ projection and the norm, turns the rest by the angle toward (or away from) the target", () => {
    const rng = new Rng(12);
    const d = 30;
    const dh = gaussian(rng, d);
    const dn = nrm(dh);
    const dHat = dh.map((x) => x / dn);
    const v = Float32Array.from(gaussian(rng, d)), t = gaussian(rng, d);
    const perp = (x: ArrayLike<number>) => Array.from(x, (y, i) => y - dot(x, dHat) * dHat[i]!);
    const cosPerp = (x: ArrayLike<number>) => dot(perp(x), perp(t)) / (nrm(perp(x)) * nrm(perp(t)));
    let last = cosPerp(v);
    for (const th of [15, 30, 60, 90]) {
      const r = coneRotate(v, dHat, t, th);
      assert.ok(Math.abs(dot(r, dHat) - dot(v, dHat)) < 1e-4 && Math.abs(nrm(r) - nrm(v)) < 1e-4);
      const ang = (Math.acos(Math.min(1, dot(perp(r), perp(v)) / (nrm(perp(r)) * nrm(perp(v))))) * 180) / Math.PI;
      assert.ok(Math.abs(ang - th) < 1e-2, `angle ${ang} vs ${th}`);
      assert.ok(cosPerp(r) > last, "closer to the target");
      last = cosPerp(r);
    }
    assert.ok(cosPerp(coneRotate(v, dHat, t, -30)) < cosPerp(v), "negative angles turn away");
    // Rotating by the full angle between them lands on the target's direction (within the plane ⊥ d̂).
    const full = (Math.acos(cosPerp(v)) * 180) / Math.PI;
    assert.ok(Math.abs(cosPerp(coneRotate(v, dHat, t, full)) - 1) < 1e-6);
  });

  test("nearestRow is the argmax of the cosine", () => {
    const rows = Float32Array.from([1, 0, 0, 1, 10, 1]);
    assert.equal(nearestRow(rows, 3, 2, [0.1, 1]), 1);
    assert.equal(nearestRow(rows, 3, 2, [1, -0.2]), 0);
    assert.equal(nearestRow(rows, 3, 2, [1, 0.11]), 2); // the longest row is not favoured, its direction is
  });
});

describe("δ-PCs (04c §4.3)", () => {
  test("pair differences lose their d̂ part; PC1 recovers a planted shared direction", () => {
    const rng = new Rng(21);
    const d = 25;
    const dh = gaussian(rng, d), dHat = dh.map((x) => x / nrm(dh));
    const raw = gaussian(rng, d);
    const p = raw.map((x, i) => x - dot(raw, dHat) * dHat[i]!);
    const pHat = p.map((x) => x / nrm(p));
    const diffs = Array.from({ length: 40 }, () => {
      const a = gaussian(rng, 1)[0]! * 5, s = gaussian(rng, 1)[0]! * 3;
      const e = gaussian(rng, d);
      return Array.from({ length: d }, (_, i) => a * pHat[i]! + s * dHat[i]! + 0.1 * e[i]!);
    });
    const r = deltaPcs(diffs, dHat, 3);
    for (const u of r.u) assert.ok(Math.abs(dot(u, dHat)) < 1e-9);
    for (const pc of r.pcs) assert.ok(Math.abs(dot(pc, dHat)) < 1e-9 && Math.abs(nrm(pc) - 1) < 1e-9);
    assert.ok(Math.abs(dot(r.pcs[0]!, pHat)) > 0.99, `|cos| ${dot(r.pcs[0]!, pHat)}`);
    assert.ok(r.explainedVarianceRatio[0]! > 0.9);
    assert.throws(() => deltaPcs([diffs[0]!], dHat), /at least 2 pairs/);
  });
});

describe("synthetic threshold", () => {
  test("the sigmoid fit recovers a planted slope and midpoint", () => {
    const rng = new Rng(8);
    const k = 4, a50 = 1.15;
    const points = [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2].map((alpha) => {
      const p = 1 / (1 + Math.exp(-k * (alpha - a50)));
      let hits = 0;
      for (let i = 0; i < 400; i++) if (rng.next() < p) hits++;
      return { alpha, k: hits, n: 400 };
    });
    const fit = fitSigmoid(points)!;
    assert.ok(Math.abs(fit.alpha50 - a50) < 0.05 && Math.abs(fit.k / k - 1) < 0.15, JSON.stringify(fit));
    assert.equal(fitSigmoid([{ alpha: 0, k: 0, n: 5 }, { alpha: 1, k: 0, n: 5 }]), null);
  });
});

describe("selfscope controls on the bundled organism", () => {
  test("concepts are detected above no injection; rates recount the trials; a rerun resumes", async () => {
    const words = (JSON.parse(fs.readFileSync(path.join(repoDir(), "models", "organism", "heldout.json"), "utf8")) as string[]).slice(0, 4);
    const out = path.join(tmpRoot, "run");
    const args = {
      model: ORGANISM, out, concepts: words.join(","), failure: words.slice(2).join(","), success: words.slice(0, 2).join(","), layer: 1, strength: 4,
      conditions: "isotropic,shuffled,norm_sweep", coneAngles: "90", count: 2, trials: 1, samples: 2, maxTokens: 16, judges: ["rule"], threads: 2, quiet: true, vectorCache: null,
    };
    const r = await controlsCommand(args);
    assert.equal(r.concepts.detection.n, 2 * 2);
    assert.equal(r.baseline.detection.n, 2);
    assert.deepEqual(r.conditions.map((c) => [c.condition, c.detection.n]), [["isotropic", 4], ["shuffled", 8], ["norm_sweep", 12]]);
    assert.equal(r.threshold!.points.length, 9);
    assert.ok(r.concepts.detection.estimate! > r.baseline.detection.estimate!, `concepts ${r.concepts.detection.estimate} vs none ${r.baseline.detection.estimate}`);
    const steps = fs.readFileSync(path.join(out, "steps.jsonl"), "utf8").trim().split("\n").slice(1).map((l) => JSON.parse(l) as { key: string; value: { detected: boolean } });
    const recount = (g: string) => steps.filter((s) => s.key.startsWith(`${g}|`)).filter((s) => s.value.detected).length;
    assert.equal(Math.round(r.conditions[0]!.detection.estimate! * 4), recount("isotropic"));
    assert.equal(Math.round(r.concepts.detection.estimate! * 4), recount("concepts"));
    const again = await controlsCommand(args);
    assert.deepEqual(r.cone!.toward.map((x) => [x.angle, x.detection.n]), [[0, 4], [90, 4]]);
    assert.deepEqual(Object.keys(r.cone!.nearest).sort(), [...words].sort());
    assert.equal(again.resumedSteps, 4 + 2 + 4 + 8 + 12 + 18 + 16);
    assert.deepEqual(again.conditions, r.conditions);
  });
});
