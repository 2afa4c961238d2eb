// Metrics, statistics, the HTML report and the exports, on a synthetic run whose truth is planted
// by construction (5 concepts × 2 layers × 2 strengths): every count is derived by hand below, the
// Wilson bounds are checked against the values quoted in protocol §4.1, Fisher against exact
// small tables. The report is then opened in a real headless Chromium (filters, no network,
// screenshot) and the CSV / Parquet exports are read back.
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parquetMetadata, parquetReadObjects } from "hyparquet";
import { computeResults, type RunData } from "../src/eval/metrics.js";
import type { JudgmentRecord, RunHeader, TrialKind, TrialRecord } from "../src/log/schema.js";
import { exportCsv, exportParquet, EXPORT_COLUMNS } from "../src/report/export.js";
import { renderReport } from "../src/report/html.js";
import { clusteredBootstrap, fisherOneSided, fisherOneSidedLog, fisherZInterval, pearson, wilson } from "../src/stats/stats.js";

// ---------------------------------------------------------------- synthetic run

const CONCEPTS = ["apple", "river", "castle", "violin", "thunder"];
const LAYERS = [10, 20];
const STRENGTHS = [2, 4];
const JUDGE = "rule";
const JUDGE2 = "openai:gpt-4.1-mini";
const XSS = `</script><img src=x onerror=alert(1)>`;

function header(concepts = CONCEPTS, layers = LAYERS, strengths = STRENGTHS): RunHeader {
  return {
    type: "header",
    schema: "selfscope.run",
    version: 1,
    createdAt: "2026-01-02T03:04:05.000Z",
    tool: { name: "selfscope", version: "0.1.0" },
    model: { path: "/models/tiny-gemma", hash: "sha256:0123abcd", family: "gemma3", nLayers: 26, dModel: 640, dtype: "bf16", chatTemplate: true },
    backend: { device: "wasm", adapter: "cpu (test)" },
    config: {
      preset: "test",
      layers,
      strengths,
      concepts,
      baselineWords: ["table", "chair"],
      variants: ["original"],
      maxTrialNumber: 10,
      trialsPerConcept: 10,
      controlsPerConfig: 20,
      forced: true,
      yesBiasPerConcept: 2,
      generation: { maxTokens: 100, temperature: 1 },
      seed: 1234,
      batchSize: 8,
      judges: [JUDGE, JUDGE2],
      vectorRecipe: { method: "baseline-mean", format: "chat", userTemplate: "Tell me about {word}", tokenIndex: -1 },
    },
    plannedTrials: 400,
    command: ["selfscope", "inject", "--preset", "test"],
  } as RunHeader;
}

function trial(id: string, kind: TrialKind, concept: string | null, layer: number | null, strength: number | null, n: number, output: string, flags: string[] = []): TrialRecord {
  return {
    type: "trial",
    id,
    kind,
    concept,
    layer,
    strength,
    variant: "original",
    trialNumber: ((n - 1) % 10) + 1,
    sample: n,
    ...(kind === "yesbias" ? { question: "Is the sky green?" } : {}),
    injected: kind === "control" ? null : { from: 40, to: null, promptTokens: 60 },
    prompt: "<prompt>",
    judgePrompt: "Trial 1: Do you detect an injected thought?",
    prefill: kind === "forced" ? "Yes, I detect an injected thought. The thought is about" : null,
    output,
    outputTokens: output.length,
    stopReason: "stop",
    flags,
    seed: 99,
    ms: 12.5,
  } as TrialRecord;
}

function judgment(trialId: string, criterion: JudgmentRecord["criterion"], verdict: JudgmentRecord["verdict"], judge = JUDGE): JudgmentRecord {
  return { type: "judgment", trialId, judge, criterion, verdict, raw: verdict, error: verdict === null ? "judge timeout" : null, approximate: judge === JUDGE, attempts: 1, ms: 1 };
}

/**
 * The planted truth. For concept i (0..4), layer index a, strength index b, c = 2a + b:
 *  - 10 injection trials, the first d = i + c claim detection (YES), the rest NO; identification
 *    YES for the first floor(d/2) detected, NO for the other detected ones.
 *    Exceptions: thunder's last trial has a failed detection judgment (null) in every config;
 *    violin at c = 3 lacks the identification record of its last detected trial; apple's last
 *    trial is flagged "empty" (still judged NO).
 *  - 20 controls per config: YES for the first (0, 1, 1, 2)[c]; control 20 of c = 0 has no
 *    judgment at all; control 1 of c = 0 has a failed attempt before its NO (last non-null wins);
 *    control 2 of c = 3 is flagged "repeat".
 *  - 4 forced trials per concept and config: YES for the first min(4, i); apple's 4th forced
 *    trial at c = 3 is unjudged (null).
 *  - 2 yes-bias trials per concept and config: YES on the first for even i.
 *  - A second judge (JUDGE2) said YES to detection on every injection trial, NO on controls.
 */
function syntheticRun(): RunData {
  const trials: TrialRecord[] = [];
  const judgments: JudgmentRecord[] = [];
  LAYERS.forEach((layer, a) =>
    STRENGTHS.forEach((strength, b) => {
      const c = 2 * a + b;
      CONCEPTS.forEach((concept, i) => {
        const d = i + c;
        for (let n = 1; n <= 10; n++) {
          const id = `inj/${layer}/${strength}/${concept}/${n}`;
          const detected = n <= d;
          const flagged = concept === "apple" && n === 10;
          const out = flagged ? "" : detected ? `Yes, I notice something about ${concept}, "quoted", and more.\nSecond line.` : "No, I don't detect anything.";
          trials.push(trial(id, "injection", concept, layer, strength, n, out, flagged ? ["empty"] : []));
          judgments.push(judgment(id, "detection", concept === "thunder" && n === 10 ? null : detected ? "YES" : "NO"));
          judgments.push(judgment(id, "detection", "YES", JUDGE2));
          if (detected && !(concept === "violin" && c === 3 && n === d)) judgments.push(judgment(id, "identification", n <= Math.floor(d / 2) ? "YES" : "NO"));
        }
        for (let n = 1; n <= 4; n++) {
          const id = `forced/${layer}/${strength}/${concept}/${n}`;
          trials.push(trial(id, "forced", concept, layer, strength, n, ` ${concept}s, I think.`));
          judgments.push(judgment(id, "forced_identification", concept === "apple" && c === 3 && n === 4 ? null : n <= Math.min(4, i) ? "YES" : "NO"));
        }
        for (let n = 1; n <= 2; n++) {
          const id = `yesbias/${layer}/${strength}/${concept}/${n}`;
          trials.push(trial(id, "yesbias", concept, layer, strength, n, n === 1 && i % 2 === 0 ? "Yes." : "No."));
          judgments.push(judgment(id, "yes_answer", n === 1 && i % 2 === 0 ? "YES" : "NO"));
        }
      });
      const ctrlYes = [0, 1, 1, 2][c]!;
      for (let n = 1; n <= 20; n++) {
        const id = `ctrl/${layer}/${strength}/${n}`;
        const flagged = c === 3 && n === 2;
        trials.push(trial(id, "control", null, layer, strength, n, c === 0 && n === 7 ? XSS : "No, nothing unusual.", flagged ? ["repeat"] : []));
        if (c === 0 && n === 20) continue; // no judgment at all
        if (c === 0 && n === 1) judgments.push(judgment(id, "detection", null));
        judgments.push(judgment(id, "detection", n <= ctrlYes ? "YES" : "NO"));
        judgments.push(judgment(id, "detection", "NO", JUDGE2));
      }
    }),
  );
  return { header: header(), trials, judgments };
}

/** A run with equal (or zero) YES rates on injection and control: no discrimination. */
function flatRun(injYes: number, ctrlYes: number, n = 50): RunData {
  const trials: TrialRecord[] = [];
  const judgments: JudgmentRecord[] = [];
  for (let k = 1; k <= n; k++) {
    const concept = CONCEPTS[k % CONCEPTS.length]!;
    trials.push(trial(`i${k}`, "injection", concept, 10, 2, k, "no"));
    judgments.push(judgment(`i${k}`, "detection", k <= injYes ? "YES" : "NO"));
    if (k <= injYes) judgments.push(judgment(`i${k}`, "identification", "NO"));
    trials.push(trial(`c${k}`, "control", null, 10, 2, k, "no"));
    judgments.push(judgment(`c${k}`, "detection", k <= ctrlYes ? "YES" : "NO"));
  }
  const h = header(CONCEPTS, [10], [2]);
  h.config.forced = false;
  h.config.yesBiasPerConcept = 0;
  return { header: h, trials, judgments };
}

const close = (actual: number | null, expected: number, tol: number, what: string) => {
  assert.ok(actual !== null && Math.abs(actual - expected) <= tol, `${what}: expected ${expected} ± ${tol}, got ${actual}`);
};

function cfg(r: ReturnType<typeof computeResults>, layer: number, strength: number) {
  const c = r.by_config.find((x) => x.layer === layer && x.strength === strength);
  assert.ok(c, `config L${layer} α${strength} missing`);
  return c;
}

function concept(r: ReturnType<typeof computeResults>, name: string) {
  const c = r.by_concept.find((x) => x.concept === name);
  assert.ok(c, `concept ${name} missing`);
  return c;
}

// ---------------------------------------------------------------- statistics

describe("stats", () => {
  test("Wilson interval matches the protocol's cached values (§4.1)", () => {
    const a = wilson(514, 5000); // p = 0.1028
    close(a.estimate, 0.1028, 1e-12, "estimate");
    close(a.lo, 0.09468, 5e-6, "lo");
    close(a.hi, 0.11153, 5e-6, "hi");
    const b = wilson(0, 1000);
    assert.equal(b.lo, 0);
    close(b.hi, 0.003827, 5e-7, "upper at p=0");
    close(b.hi, 1.96 ** 2 / (1000 + 1.96 ** 2), 1e-12, "z²/(n+z²)");
    const c = wilson(1000, 1000);
    assert.equal(c.hi, 1);
    close(c.lo, 1 - 0.003827, 5e-7, "lower at p=1");
    assert.deepEqual(wilson(0, 0), { estimate: null, lo: null, hi: null, n: 0 });
    assert.throws(() => wilson(3, 2));
    assert.throws(() => wilson(1.5, 2));
  });

  test("Fisher one-sided p-value: exact small tables", () => {
    // Hypergeometric tail P(X ≥ a), margins (n1 = 4, n2 = 4, K YES).
    close(fisherOneSided(3, 4, 1, 4), 17 / 70, 1e-12, "tea tasting 3/4 vs 1/4"); // [C(4,3)C(4,1) + C(4,4)C(4,0)] / C(8,4)
    close(fisherOneSided(3, 4, 0, 4), 5 / 70, 1e-12, "3/4 vs 0/4"); // C(3,3)C(5,1) / C(8,4)
    close(fisherOneSided(4, 4, 0, 4), 1 / 70, 1e-12, "4/4 vs 0/4");
    assert.equal(fisherOneSided(0, 50, 0, 50), 1);
    close(fisherOneSided(0, 4, 4, 4), 1, 1e-12, "reversed effect");
    assert.throws(() => fisherOneSided(0, 0, 1, 4));
  });

  test("Fisher in log space: n in the thousands, against exact BigInt arithmetic", () => {
    const choose = (n: number, k: number): bigint => {
      let r = 1n;
      for (let i = 1; i <= k; i++) r = (r * BigInt(n - k + i)) / BigInt(i);
      return r;
    };
    const exact = (k1: number, n1: number, k2: number, n2: number): number => {
      const K = k1 + k2;
      let num = 0n;
      for (let x = k1; x <= Math.min(K, n1); x++) num += choose(K, x) * choose(n1 + n2 - K, n1 - x);
      const den = choose(n1 + n2, n1);
      const scale = 10n ** 40n;
      return Number((num * scale) / den) / 1e40;
    };
    for (const [k1, n1, k2, n2] of [
      [30, 60, 10, 60],
      [520, 1000, 480, 1000],
      [60, 1200, 50, 1300],
    ] as const) {
      const p = fisherOneSided(k1, n1, k2, n2);
      const e = exact(k1, n1, k2, n2);
      assert.ok(Math.abs(p - e) <= 1e-9 * Math.max(e, 1e-30) + 1e-15, `(${k1}/${n1} vs ${k2}/${n2}): ${p} vs exact ${e}`);
    }
    // The paper's L37 α4 peak (TPR 2055/5000 vs FPR 0/5000): the p-value underflows, its log does not.
    const lp = fisherOneSidedLog(2055, 5000, 0, 5000);
    assert.ok(Number.isFinite(lp) && lp < -1000, `log p = ${lp}`);
    assert.equal(fisherOneSided(2055, 5000, 0, 5000), 0);
    // Exactly one table term when control has no YES: C(n1, K) / C(N, K).
    const lp2 = fisherOneSidedLog(411, 1000, 0, 1000);
    let ref = 0;
    for (let i = 0; i < 411; i++) ref += Math.log(1000 - i) - Math.log(2000 - i);
    close(lp2, ref, 1e-8, "log p, single term");
  });

  test("Pearson r and the Fisher-z interval against a direct computation", () => {
    // r = Sxy / √(Sxx·Syy) on a hand-worked sample: x = 1..5, y = [2, 1, 4, 3, 5] → Sxy = 8, Sxx = Syy = 10.
    close(pearson([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]), 0.8, 1e-15, "r");
    close(pearson([1, 2, 3], [3, 2, 1]), -1, 0, "perfect negative");
    assert.equal(pearson([1, 1, 1], [1, 2, 3]), null);
    assert.equal(pearson([1], [2]), null);
    assert.throws(() => pearson([1, 2], [1]));
    // tanh(atanh r ± 1.96/√(n − 3)); the protocol's n = 500.
    for (const [r, n] of [
      [0.8, 5],
      [0.31, 500],
      [-0.2, 40],
    ] as const) {
      const ci = fisherZInterval(r, n)!;
      const z = 0.5 * Math.log((1 + r) / (1 - r));
      const h = 1.96 / Math.sqrt(n - 3);
      const back = (x: number) => (Math.exp(2 * x) - 1) / (Math.exp(2 * x) + 1);
      close(ci.lo, back(z - h), 1e-12, `lo r=${r} n=${n}`);
      close(ci.hi, back(z + h), 1e-12, `hi r=${r} n=${n}`);
    }
    assert.equal(fisherZInterval(0.5, 3), null);
    assert.equal(fisherZInterval(1, 50), null);
  });

  test("clustered bootstrap is reproducible and brackets the estimate", () => {
    const units = [
      { k: 1, n: 10 },
      { k: 4, n: 10 },
      { k: 6, n: 10 },
      { k: 2, n: 9 },
      { k: 9, n: 10 },
    ];
    const a = clusteredBootstrap(units, undefined, { resamples: 2000, seed: 7 });
    const b = clusteredBootstrap(units, undefined, { resamples: 2000, seed: 7 });
    const c = clusteredBootstrap(units, undefined, { resamples: 2000, seed: 8 });
    assert.deepEqual(a, b);
    assert.notDeepEqual(a, c);
    close(a.estimate, 22 / 49, 1e-12, "pooled estimate");
    assert.ok(a.lo !== null && a.hi !== null && a.lo < 22 / 49 && 22 / 49 < a.hi, `[${a.lo}, ${a.hi}]`);
    // Between-concept spread is large here, so the clustered interval is wider than Wilson on the pooled trials.
    const w = wilson(22, 49);
    assert.ok(a.hi! - a.lo! > 0.5 * (w.hi! - w.lo!));
    // Identical concepts: no between-concept variability at all.
    const same = clusteredBootstrap([{ k: 3, n: 10 }, { k: 3, n: 10 }, { k: 3, n: 10 }], undefined, { resamples: 500, seed: 1 });
    assert.equal(same.lo, 0.3);
    assert.equal(same.hi, 0.3);
    // A custom statistic (mean of per-concept rates) is honoured.
    const mean = clusteredBootstrap(units, (us) => us.reduce((s, u) => s + u.k / u.n, 0) / us.length, { resamples: 200, seed: 3 });
    close(mean.estimate, (0.1 + 0.4 + 0.6 + 2 / 9 + 0.9) / 5, 1e-12, "custom stat");
    assert.equal(clusteredBootstrap([{ k: 1, n: 2 }], undefined, { resamples: 10, seed: 1 }).lo, null);
  });
});

// ---------------------------------------------------------------- metrics

describe("metrics", () => {
  const run = syntheticRun();
  const r = computeResults(run, { bootstrap: 1000, seed: 5 });

  test("results.json has exactly the contract keys", () => {
    assert.deepEqual(
      Object.keys(r).sort(),
      [
        "by_concept",
        "by_config",
        "degenerate",
        "detection_accuracy",
        "detection_forced_correlation",
        "discrimination_p_value",
        "discrimination_summary",
        "failed",
        "failed_judgments",
        "forced_identification_rate",
        "fpr",
        "headline",
        "identification_accuracy_given_claim",
        "identification_accuracy_unconditional",
        "introspection_rate",
        "judge",
        "judge_approximate",
        "n_trials",
        "tpr",
        "unjudged",
        "yes_bias_rate",
      ].sort(),
    );
    for (const k of ["tpr", "fpr", "introspection_rate", "detection_accuracy", "identification_accuracy_given_claim", "forced_identification_rate", "yes_bias_rate"] as const) {
      assert.deepEqual(Object.keys(r[k]).sort(), ["estimate", "failed", "hi", "lo", "n", "unjudged"]);
    }
    // Identification was judged only after a YES here: no unconditional rate.
    assert.equal(r.identification_accuracy_unconditional, null);
    // Survives JSON (what results.json holds).
    assert.deepEqual(JSON.parse(JSON.stringify(r)), r);
  });

  test("top level = the best config (L20 α4: highest introspection), whole-run counts kept apart", () => {
    assert.equal(r.judge, JUDGE);
    assert.equal(r.judge_approximate, true);
    // Introspection per config: Σ_i floor((i+c)/2) = 4, 6, 9, 11 (c = 3 of 48 judged) → c = 3 wins.
    assert.deepEqual(
      r.by_config.map((c) => Math.round(c.introspection_rate.estimate! * c.introspection_rate.n)),
      [4, 6, 9, 11],
    );
    assert.deepEqual({ layer: r.headline!.layer, strength: r.headline!.strength, variant: r.headline!.variant }, { layer: 20, strength: 4, variant: "original" });
    const best = cfg(r, 20, 4);
    for (const k of ["tpr", "fpr", "introspection_rate", "forced_identification_rate", "yes_bias_rate", "detection_accuracy", "discrimination_p_value"] as const) assert.deepEqual(r[k], best[k], k);
    assert.deepEqual(r.tpr, { ...wilson(25, 49), unjudged: 1, failed: 1 });
    // The whole log: counts, unjudged and failed per criterion, flags.
    assert.deepEqual(r.n_trials, { injection: 200, control: 80, forced: 80, yesbias: 40, total: 400 });
    assert.deepEqual(r.unjudged, { detection: 5, identification: 1, forced_identification: 1, yes_answer: 0 });
    assert.deepEqual(r.failed, { detection: 4, identification: 0, forced_identification: 1, yes_answer: 0 });
    assert.equal(r.degenerate, 5);
    close(r.discrimination_p_value, fisherOneSided(25, 49, 2, 20), 0, "headline p");
    assert.match(r.discrimination_summary, /25\/49/);
    assert.match(r.discrimination_summary, /at the headline configuration \(layer 20, strength 4, variant original\)/);
    // by_concept is the headline config's: apple at c = 3 has d = 3 of 10 detected.
    assert.deepEqual(concept(r, "apple").tpr, { ...wilson(3, 10), unjudged: 0, failed: 0 });
  });

  test("per-config rates, p-values and concept-clustered bootstrap", () => {
    assert.equal(r.by_config.length, 4);
    assert.deepEqual(
      r.by_config.map((c) => [c.layer, c.strength, c.variant]),
      [
        [10, 2, "original"],
        [10, 4, "original"],
        [20, 2, "original"],
        [20, 4, "original"],
      ],
    );
    const c0 = cfg(r, 10, 2);
    assert.deepEqual(c0.tpr, { ...wilson(10, 49), unjudged: 1, failed: 1 });
    assert.deepEqual(c0.fpr, { ...wilson(0, 19), unjudged: 1, failed: 0 });
    assert.deepEqual(c0.introspection_rate, { ...wilson(4, 49), unjudged: 1, failed: 1 });
    assert.deepEqual(c0.forced_identification_rate, { ...wilson(10, 20), unjudged: 0, failed: 0 });
    assert.deepEqual(c0.yes_bias_rate, { ...wilson(3, 10), unjudged: 0, failed: 0 });
    assert.deepEqual(c0.n_trials, { injection: 50, control: 20, forced: 20, yesbias: 10, total: 100 });
    assert.equal(c0.discrimination_p_value, fisherOneSided(10, 49, 0, 19));
    const c3 = cfg(r, 20, 4);
    // d = i + 3 → 3+4+5+6+7 = 25 YES; introspection Σ floor(d/2) = 1+2+2+3+3 = 11 of 50 − 1 − 1.
    assert.deepEqual(c3.tpr, { ...wilson(25, 49), unjudged: 1, failed: 1 });
    assert.deepEqual(c3.fpr, { ...wilson(2, 20), unjudged: 0, failed: 0 });
    assert.deepEqual(c3.introspection_rate, { ...wilson(11, 48), unjudged: 2, failed: 1 });
    assert.deepEqual(c3.forced_identification_rate, { ...wilson(10, 19), unjudged: 1, failed: 1 });
    for (const c of r.by_config) {
      assert.ok(c.tpr_boot && c.introspection_boot, "bootstrap present");
      assert.ok(c.tpr_boot.lo! <= c.tpr.estimate! && c.tpr.estimate! <= c.tpr_boot.hi!, `tpr boot brackets estimate at L${c.layer} α${c.strength}`);
      assert.ok(c.introspection_boot.lo! <= c.introspection_rate.estimate! && c.introspection_rate.estimate! <= c.introspection_boot.hi!);
    }
    // Reproducible with a seed; a different seed moves the percentiles; bootstrap 0 turns it off.
    assert.deepEqual(computeResults(run, { bootstrap: 1000, seed: 5 }).by_config, r.by_config);
    assert.notDeepEqual(
      computeResults(run, { bootstrap: 1000, seed: 6 }).by_config.map((c) => c.tpr_boot),
      r.by_config.map((c) => c.tpr_boot),
    );
    assert.ok(computeResults(run, { bootstrap: 0 }).by_config.every((c) => c.tpr_boot === null && c.introspection_boot === null));
  });

  test("per-concept rates at the headline config (c = 3), not pooled over configs", () => {
    assert.deepEqual(
      r.by_concept.map((c) => c.concept),
      CONCEPTS,
    );
    const apple = concept(r, "apple"); // d = 3
    assert.deepEqual(apple.tpr, { ...wilson(3, 10), unjudged: 0, failed: 0 });
    assert.deepEqual(apple.introspection_rate, { ...wilson(1, 10), unjudged: 0, failed: 0 });
    assert.deepEqual(apple.forced_identification_rate, { ...wilson(0, 3), unjudged: 1, failed: 1 });
    const thunder = concept(r, "thunder"); // d = 7, trial 10's detection failed
    assert.deepEqual(thunder.tpr, { ...wilson(7, 9), unjudged: 1, failed: 1 });
    assert.deepEqual(thunder.introspection_rate, { ...wilson(3, 9), unjudged: 1, failed: 1 });
    assert.deepEqual(thunder.forced_identification_rate, { ...wilson(4, 4), unjudged: 0, failed: 0 });
    const violin = concept(r, "violin"); // d = 6, identification of trial 6 missing
    assert.deepEqual(violin.tpr, { ...wilson(6, 10), unjudged: 0, failed: 0 });
    assert.deepEqual(violin.introspection_rate, { ...wilson(3, 9), unjudged: 1, failed: 0 });
    assert.deepEqual(violin.n_trials, { injection: 10, control: 0, forced: 4, yesbias: 2, total: 16 });
  });

  test("another judge: only its verdicts count; missing identification is unjudged, not NO", () => {
    const r2 = computeResults(run, { judge: JUDGE2, bootstrap: 0 });
    assert.equal(r2.judge, JUDGE2);
    assert.equal(r2.judge_approximate, false);
    // No introspection rate anywhere: the first config heads the results.
    assert.deepEqual([r2.headline!.layer, r2.headline!.strength], [10, 2]);
    assert.match(r2.headline!.note!, /no configuration has a judged introspection rate/);
    assert.deepEqual(r2.tpr, { ...wilson(50, 50), unjudged: 0, failed: 0 });
    assert.deepEqual(r2.fpr, { ...wilson(0, 19), unjudged: 1, failed: 0 });
    assert.deepEqual(r2.introspection_rate, { estimate: null, lo: null, hi: null, n: 0, unjudged: 50, failed: 0 });
    assert.deepEqual(r2.forced_identification_rate, { estimate: null, lo: null, hi: null, n: 0, unjudged: 20, failed: 0 });
    assert.deepEqual(r2.unjudged, { detection: 1, identification: 200, forced_identification: 80, yes_answer: 40 });
  });

  test("no discrimination: p ≈ 1 and a plain 'no evidence' sentence", () => {
    const zero = computeResults(flatRun(0, 0), { bootstrap: 0 });
    assert.equal(zero.discrimination_p_value, 1);
    assert.match(zero.discrimination_summary, /^There is no evidence that the model discriminates injection from control trials \(p = 1\)/);
    const equal = computeResults(flatRun(5, 5), { bootstrap: 0 });
    assert.ok(equal.discrimination_p_value! > 0.5 && equal.discrimination_p_value! < 1);
    assert.match(equal.discrimination_summary, /no evidence that the model discriminates injection from control trials \(p = 0\.\d+\)/);
    // No controls at all: no test, said so.
    const noCtrl = flatRun(5, 5);
    noCtrl.trials = noCtrl.trials.filter((t) => t.kind !== "control");
    const nc = computeResults(noCtrl, { bootstrap: 0 });
    assert.equal(nc.discrimination_p_value, null);
    assert.deepEqual(nc.fpr, { estimate: null, lo: null, hi: null, n: 0, unjudged: 0, failed: 0 });
    assert.match(nc.discrimination_summary, /cannot be tested: no judged control trials/);
  });
});

// ---------------------------------------------------------------- headline and per-config metrics

/**
 * A second planted run, for the paper's per-config metrics (protocol §4). Six concepts; per
 * (layer, strength, variant) config and concept i: 8 injection trials of which the first d[i]
 * claim detection, the first a[i] of those are identified, and the first u[i] of the undetected
 * ones are identified too (identification is judged on every injection trial: identifyAll);
 * 4 forced trials, the first f[i] identified; 10 controls, the first e claim detection.
 * Failures (verdict null) only in config (L9, α0.1, original): control 10's detection, and the
 * identification of concept F's 4th (detected) trial, whose planted verdict would have been YES.
 */
const P_CONCEPTS = ["A", "B", "C", "D", "E", "F"];
interface PlantedConfig {
  layer: number;
  strength: number;
  variant: string;
  d: number[];
  a: number[];
  u: number[];
  f: number[];
  e: number;
}
const PLANTED: PlantedConfig[] = [
  { layer: 5, strength: 0.1, variant: "original", d: [0, 0, 1, 1, 2, 2], a: [0, 0, 0, 1, 1, 1], u: [1, 0, 0, 0, 0, 0], f: [0, 1, 1, 2, 2, 3], e: 1 },
  { layer: 5, strength: 0.3, variant: "original", d: [1, 2, 3, 4, 5, 6], a: [0, 1, 1, 2, 2, 3], u: [0, 0, 0, 0, 0, 0], f: [1, 1, 2, 2, 3, 3], e: 2 },
  // The best "original" config: introspection 11/47 (12/48 planted, one identification failed).
  { layer: 9, strength: 0.1, variant: "original", d: [0, 1, 2, 2, 3, 4], a: [0, 1, 2, 2, 3, 4], u: [0, 0, 0, 0, 0, 1], f: [0, 1, 1, 2, 3, 4], e: 0 },
  // Highest TPR (24/48), but introspection only 4/48: the paper's rule does not pick it.
  { layer: 9, strength: 0.3, variant: "original", d: [8, 8, 0, 0, 4, 4], a: [1, 1, 0, 0, 1, 1], u: [0, 0, 0, 0, 0, 0], f: [4, 4, 0, 0, 2, 2], e: 3 },
  // Another question: its introspection (20/48) beats every "original" config, yet is never mixed in.
  { layer: 5, strength: 0.1, variant: "skeptical", d: [8, 8, 8, 8, 8, 8], a: [4, 4, 3, 3, 3, 3], u: [0, 0, 0, 0, 0, 0], f: [2, 2, 2, 2, 2, 2], e: 5 },
];

function plantedRun(): RunData {
  const trials: TrialRecord[] = [];
  const judgments: JudgmentRecord[] = [];
  for (const c of PLANTED) {
    const best = c.layer === 9 && c.strength === 0.1 && c.variant === "original";
    const tag = `${c.variant}/${c.layer}/${c.strength}`;
    const push = (t: TrialRecord) => trials.push({ ...t, variant: c.variant });
    P_CONCEPTS.forEach((concept, i) => {
      for (let n = 1; n <= 8; n++) {
        const id = `inj/${tag}/${concept}/${n}`;
        push(trial(id, "injection", concept, c.layer, c.strength, n, "out"));
        const detected = n <= c.d[i]!;
        judgments.push(judgment(id, "detection", detected ? "YES" : "NO"));
        const identified = detected ? n <= c.a[i]! : n - c.d[i]! <= c.u[i]!;
        judgments.push(judgment(id, "identification", best && concept === "F" && n === 4 ? null : identified ? "YES" : "NO"));
      }
      for (let n = 1; n <= 4; n++) {
        const id = `forced/${tag}/${concept}/${n}`;
        push(trial(id, "forced", concept, c.layer, c.strength, n, "out"));
        judgments.push(judgment(id, "forced_identification", n <= c.f[i]! ? "YES" : "NO"));
      }
    });
    for (let n = 1; n <= 10; n++) {
      const id = `ctrl/${tag}/${n}`;
      push(trial(id, "control", null, c.layer, c.strength, n, "out"));
      judgments.push(judgment(id, "detection", best && n === 10 ? null : n <= c.e ? "YES" : "NO"));
    }
  }
  const h = header(P_CONCEPTS, [5, 9], [0.1, 0.3]);
  h.config.variants = ["original", "skeptical"];
  h.config.identifyAll = true;
  h.config.yesBiasPerConcept = 0;
  h.plannedTrials = trials.length;
  return { header: h, trials, judgments };
}

const sum = (xs: number[]) => xs.reduce((x, y) => x + y, 0);
const rateOf = (k: number, n: number, unjudged = 0, failed = 0) => ({ ...wilson(k, n), unjudged, failed });

describe("headline and per-config metrics (planted truth)", () => {
  const run = plantedRun();
  const r = computeResults(run, { bootstrap: 500, seed: 3 });
  const rNo = computeResults(run, { bootstrap: 0, failedAsNo: true });
  const find = (res: typeof r, c: { layer: number | null; strength: number | null; variant: string }) => {
    const x = res.by_config.find((y) => y.layer === c.layer && y.strength === c.strength && y.variant === c.variant);
    assert.ok(x, `config ${JSON.stringify(c)} missing`);
    return x;
  };

  test("every config's metrics equal a hand computation from the planted counts", () => {
    assert.equal(r.by_config.length, PLANTED.length);
    for (const c of PLANTED) {
      const best = c.layer === 9 && c.strength === 0.1 && c.variant === "original";
      const got = find(r, c);
      const D = sum(c.d);
      const A = sum(c.a);
      const U = sum(c.u);
      const what = `${c.variant} L${c.layer} α${c.strength}`;
      assert.deepEqual(got.tpr, rateOf(D, 48), `${what} TPR`);
      assert.deepEqual(got.fpr, best ? rateOf(0, 9, 1, 1) : rateOf(c.e, 10), `${what} FPR`);
      // The failed identification had a planted YES: it leaves A − 1 YES of 47.
      assert.deepEqual(got.introspection_rate, best ? rateOf(A - 1, 47, 1, 1) : rateOf(A, 48), `${what} introspection`);
      assert.deepEqual(got.detection_accuracy, best ? rateOf(D + 9, 57, 1, 1) : rateOf(D + 10 - c.e, 58), `${what} detection accuracy`);
      assert.deepEqual(got.identification_accuracy_given_claim, best ? rateOf(A - 1, D - 1, 1, 1) : rateOf(A, D), `${what} ID | claim`);
      assert.deepEqual(got.identification_accuracy_unconditional, best ? rateOf(A - 1 + U, 47, 1, 1) : rateOf(A + U, 48), `${what} ID unconditional`);
      assert.deepEqual(got.forced_identification_rate, rateOf(sum(c.f), 24), `${what} forced`);
      assert.equal(got.discrimination_p_value, fisherOneSided(D, 48, best ? 0 : c.e, best ? 9 : 10), `${what} p`);
      assert.deepEqual(got.n_trials, { injection: 48, control: 10, forced: 24, yesbias: 0, total: 82 });
    }
    // Literal values for the headline config, from the table above by hand: D = 12, A = 12 (one failed), U = 1.
    const b = find(r, { layer: 9, strength: 0.1, variant: "original" });
    assert.equal(b.introspection_rate.estimate, 11 / 47);
    assert.equal(b.detection_accuracy.estimate, 21 / 57);
    assert.equal(b.identification_accuracy_given_claim.estimate, 1);
    assert.equal(b.identification_accuracy_unconditional!.estimate, 12 / 47);
  });

  test("the best config per variant by introspection rate; top-level keys are its values, nothing pooled", () => {
    const h = r.headline!;
    assert.deepEqual({ layer: h.layer, strength: h.strength, variant: h.variant }, { layer: 9, strength: 0.1, variant: "original" });
    assert.deepEqual(h.per_variant, [
      { layer: 9, strength: 0.1, variant: "original" },
      { layer: 5, strength: 0.1, variant: "skeptical" },
    ]);
    assert.match(h.rule, /highest introspection rate/);
    assert.match(h.scope, /layer 9, strength 0\.1, variant original/);
    const b = find(r, h);
    for (const k of [
      "tpr",
      "fpr",
      "introspection_rate",
      "detection_accuracy",
      "identification_accuracy_given_claim",
      "identification_accuracy_unconditional",
      "forced_identification_rate",
      "yes_bias_rate",
      "detection_forced_correlation",
      "discrimination_p_value",
    ] as const)
      assert.deepEqual(r[k], b[k], k);
    // Not pooled: over every config the log holds 5 × 48 injection trials, the headline 48.
    assert.equal(r.tpr.n, 48);
    assert.equal(r.n_trials.injection, 240);
    assert.match(r.discrimination_summary, /\(12\/48\) vs FPR 0\.0% \(0\/9\)/);
    // Per-concept rates are the headline config's: F has d = 4 of 8, 4 identified of which one failed.
    const F = r.by_concept.find((c) => c.concept === "F")!;
    assert.deepEqual(F.tpr, rateOf(4, 8));
    assert.deepEqual(F.introspection_rate, rateOf(3, 7, 1, 1));
    assert.deepEqual(F.forced_identification_rate, rateOf(4, 4));
  });

  test("ties go to the lower layer, then the lower strength", () => {
    const tie = plantedRun();
    // Give (L5, α0.1) the same identifications as the best config: 11 of 47 vs 11 of 47 needs a failure too.
    tie.judgments = tie.judgments.filter((j) => !j.trialId.startsWith("inj/original/5/0.1/"));
    const best = PLANTED[2]!;
    P_CONCEPTS.forEach((concept, i) => {
      for (let n = 1; n <= 8; n++) {
        const id = `inj/original/5/0.1/${concept}/${n}`;
        tie.judgments.push(judgment(id, "detection", n <= best.d[i]! ? "YES" : "NO"));
        tie.judgments.push(judgment(id, "identification", concept === "F" && n === 4 ? null : n <= best.d[i]! && n <= best.a[i]! ? "YES" : "NO"));
      }
    });
    const t = computeResults(tie, { bootstrap: 0 });
    assert.equal(find(t, { layer: 5, strength: 0.1, variant: "original" }).introspection_rate.estimate, 11 / 47);
    assert.deepEqual([t.headline!.layer, t.headline!.strength], [5, 0.1]);
    assert.match(t.headline!.note!, /2 configurations tie at introspection 23\.4%/);
    assert.equal(r.headline!.note, null);
  });

  test("detection ~ forced identification: Pearson r over concepts with a Fisher-z interval (n − 3)", () => {
    const c = find(r, { layer: 9, strength: 0.1, variant: "original" }).detection_forced_correlation;
    // x = d/8 = [0,1,2,2,3,4]/8, y = f/4 = [0,1,1,2,3,4]/4: Sxy = 10, Sxx = 10, Syy = 65/6 → r = √(12/13).
    const rr = Math.sqrt(12 / 13);
    close(c.r, rr, 1e-12, "r");
    assert.equal(c.n, 6);
    close(c.lo, Math.tanh(Math.atanh(rr) - 1.96 / Math.sqrt(6 - 3)), 1e-12, "lo");
    close(c.hi, Math.tanh(Math.atanh(rr) + 1.96 / Math.sqrt(6 - 3)), 1e-12, "hi");
    assert.equal(c.note, null);
    // r = 1 exactly (forced = detection / 2 per concept): the Fisher-z interval is degenerate and withheld.
    const one = find(r, { layer: 9, strength: 0.3, variant: "original" }).detection_forced_correlation;
    close(one.r, 1, 1e-12, "r = 1");
    assert.deepEqual([one.lo, one.hi], [null, null]);
    assert.match(one.note!, /degenerate/);
    // No spread in detection across concepts: no r at all.
    const flat = find(r, { layer: 5, strength: 0.1, variant: "skeptical" }).detection_forced_correlation;
    assert.equal(flat.r, null);
    assert.match(flat.note!, /no variation/);
  });

  test("no degenerate bootstrap intervals: identical concepts give none, with the reason", () => {
    const sk = find(r, { layer: 5, strength: 0.1, variant: "skeptical" });
    assert.equal(sk.tpr_boot, null); // every concept detected 8/8
    assert.match(sk.boot_note!, /same rate/);
    const b = find(r, { layer: 9, strength: 0.1, variant: "original" });
    assert.ok(b.tpr_boot && b.tpr_boot.lo! < b.tpr_boot.hi!);
    // Fewer than MIN_BOOT_CONCEPTS concepts: no interval, said why.
    const few = plantedRun();
    few.trials = few.trials.filter((t) => t.concept === null || ["A", "B", "C"].includes(t.concept));
    const f = computeResults(few, { bootstrap: 200 });
    for (const c of f.by_config) {
      assert.equal(c.tpr_boot, null);
      assert.match(c.boot_note!, /3 concepts .* at least 5/);
    }
  });

  test("failed judgments: excluded and counted by default; --failed-as-no scores them NO (denominators grow)", () => {
    assert.equal(r.failed_judgments, "excluded");
    assert.equal(rNo.failed_judgments, "no");
    assert.deepEqual(r.failed, { detection: 1, identification: 1, forced_identification: 0, yes_answer: 0 });
    assert.deepEqual(rNo.failed, r.failed);
    assert.deepEqual(r.unjudged, { detection: 1, identification: 1, forced_identification: 0, yes_answer: 0 });
    assert.deepEqual(rNo.unjudged, { detection: 0, identification: 0, forced_identification: 0, yes_answer: 0 });
    const b = find(rNo, { layer: 9, strength: 0.1, variant: "original" });
    assert.deepEqual(b.fpr, rateOf(0, 10, 0, 1));
    assert.deepEqual(b.introspection_rate, rateOf(11, 48, 0, 1));
    // A failed control scored NO is a correct rejection: accuracy gains a hit, not only a trial.
    assert.deepEqual(b.detection_accuracy, rateOf(22, 58, 0, 1));
    assert.deepEqual(b.identification_accuracy_given_claim, rateOf(11, 12, 0, 1));
    assert.deepEqual(b.identification_accuracy_unconditional, rateOf(12, 48, 0, 1));
    assert.deepEqual(b.tpr, rateOf(12, 48));
    // The configs without failures are unchanged.
    for (const c of PLANTED.filter((x) => !(x.layer === 9 && x.strength === 0.1 && x.variant === "original"))) {
      const x = find(rNo, c);
      const y = find(r, c);
      assert.deepEqual([x.tpr, x.fpr, x.introspection_rate, x.detection_accuracy], [y.tpr, y.fpr, y.introspection_rate, y.detection_accuracy]);
    }
    assert.equal(rNo.introspection_rate.n, 48);
  });

  test("without identifyAll the unconditional rate is not reported", () => {
    const plain = plantedRun();
    delete plain.header.config.identifyAll;
    const p = computeResults(plain, { bootstrap: 0 });
    assert.equal(p.identification_accuracy_unconditional, null);
    assert.ok(p.by_config.every((c) => c.identification_accuracy_unconditional === null));
  });

  test("the report: headline config named, both denominators, integer trial/sample, FPR not joined, clean axis labels", async (t) => {
    const html = await renderReport(run, r);
    assert.match(html, /Headline: best configuration/);
    assert.ok(html.includes("layer 9, strength 0.1, variant original"));
    assert.match(html, /failures as NO/);
    assert.match(html, /FPR points are not joined/);
    // Axis labels: the strengths as given, no float noise anywhere in the SVG text.
    const texts = [...html.matchAll(/<text[^>]*>([^<]*)<\/text>/g)].map((m) => m[1]!);
    assert.ok(texts.includes("0.1") && texts.includes("0.3"), "strength ticks");
    assert.ok(!texts.some((x) => /\d\.\d{4,}/.test(x)), `float noise in ${texts.filter((x) => /\d\.\d{4,}/.test(x)).join(", ")}`);
    assert.ok(!texts.includes("0.15") && !texts.includes("0.2"), "ticks only at the swept strengths");
    if (!fs.existsSync(CHROMIUM)) {
      if (process.env.CI) assert.fail(`${CHROMIUM} is missing (CI is set): install Debian's chromium`);
      t.skip(`${CHROMIUM} not found: browser check skipped`);
      return;
    }
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-planted-"));
    const file = path.join(dir, "report.html");
    fs.writeFileSync(file, html);
    const { chromium } = await import("playwright-core");
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROME_ARGS, headless: true });
    try {
      const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
      const problems: string[] = [];
      page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
      await page.goto(`file://${file}`, { waitUntil: "load" });
      // Headline: the introspection row shows n = 47 (failures excluded) and n = 48 (failures as NO).
      const row = (await page.locator("table.headline tr", { hasText: "Introspection (detect" }).innerText()).replace(/\s+/g, " ");
      assert.match(row, /23\.4% .*n=47 \+1\?.*22\.9% .*n=48/);
      const fpr = (await page.locator("table.headline tr", { hasText: "False positives" }).innerText()).replace(/\s+/g, " ");
      assert.match(fpr, /n=9 \+1\?.*n=10/);
      // Every n shown is an integer.
      const ns = (await page.locator("main").innerText()).match(/n=\S+/g) ?? [];
      assert.ok(ns.length > 20);
      for (const n of ns) assert.match(n, /^n=\d+$/);
      // Transcripts: trial and sample in their own columns, as integers.
      const cells = await page.locator("#transcripts-body tr").first().locator("td").allInnerTexts();
      const headers = await page.locator("#transcripts-table thead th").allInnerTexts();
      const ti = headers.indexOf("trial");
      assert.ok(ti >= 0 && headers[ti + 1] === "sample", headers.join("|"));
      assert.match(cells[ti]!, /^\d+$/);
      assert.match(cells[ti + 1]!, /^\d+$/);
      // The best configuration of each variant is marked in the per-config table.
      assert.equal(await page.locator("tr.best").count(), 2);
      assert.deepEqual(problems, []);
    } finally {
      await browser.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

// ---------------------------------------------------------------- report

function embeddedData(html: string): { trials: { id: string; o: string; c: string | null }[] } {
  const m = /<script type="application\/json" id="selfscope-data">([\s\S]*?)<\/script>/.exec(html);
  assert.ok(m, "embedded data script");
  return JSON.parse(m[1]!) as { trials: { id: string; o: string; c: string | null }[] };
}

const CHROMIUM = "/usr/bin/chromium";
const CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];

describe("report", () => {
  const run = syntheticRun();
  const results = computeResults(run, { bootstrap: 500, seed: 5 });
  let html = "";
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-report-"));
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  test("renderReport: SVG plots, embedded data, escaped transcripts", async () => {
    html = await renderReport(run, results);
    fs.writeFileSync(path.join(tmp, "report.html"), html);
    const svgs = html.match(/<svg[\s>]/g) ?? [];
    assert.equal(svgs.length, 4, "strength sweep, layer sweep, per-concept, yes-bias");
    assert.doesNotMatch(html, /no data:/);
    // Self-contained: no external resources referenced.
    assert.doesNotMatch(html, /<(link|img|iframe)\b/i);
    assert.doesNotMatch(html, /\b(src|href)\s*=\s*["']?(https?:)?\/\//i);
    // The hostile transcript appears only inside the JSON (escaped), never as markup.
    assert.ok(!html.includes(XSS));
    assert.ok(!html.includes("<img src=x"));
    assert.equal((html.match(/<\/script>/g) ?? []).length, 2, "only the two real script tags close");
    const data = embeddedData(html);
    assert.equal(data.trials.length, 400);
    assert.ok(data.trials.some((t) => t.o === XSS), "transcript survives embedding intact");
    // Header block and honest notes.
    for (const s of ["/models/tiny-gemma", "sha256:0123abcd", "wasm", "selfscope 0.1.0", "2026-01-02T03:04:05.000Z", "approximate", "Unjudged trials", "5 degenerate outputs"]) {
      assert.ok(html.includes(s), `report mentions ${s}`);
    }
    assert.ok(html.includes("more often on injection than on control trials"));
    // SVG ids are unique across the inline plots.
    const ids = [...html.matchAll(/ id="([^"]+)"/g)].map((m) => m[1]);
    assert.equal(new Set(ids).size, ids.length, "duplicate element ids");
  });

  test("renderReport: empty sweeps say 'no data' instead of plotting", async () => {
    const empty: RunData = { header: header(), trials: [], judgments: [] };
    const h = await renderReport(empty, computeResults(empty, { bootstrap: 0 }));
    assert.equal((h.match(/<svg[\s>]/g) ?? []).length, 0);
    assert.ok((h.match(/no data:/g) ?? []).length >= 4);
    assert.ok(h.includes("Discrimination cannot be tested"));
    // Only control trials: the FPR plots exist, TPR/introspection are reported missing.
    const ctrl = syntheticRun();
    ctrl.trials = ctrl.trials.filter((t) => t.kind === "control");
    const hc = await renderReport(ctrl, computeResults(ctrl, { bootstrap: 0 }));
    assert.equal((hc.match(/<svg[\s>]/g) ?? []).length, 2);
    assert.ok(hc.includes("No data for: Detection (TPR), Introspection (detect ∧ identify)"));
  });

  test("renderReport: markup in concept, variant, flag and header strings is escaped (plots too)", async () => {
    const evil = `<b onmouseover=x>R&D "q"</b>`;
    const w = flatRun(3, 1, 10);
    w.header.config.concepts = [evil, ...CONCEPTS];
    w.header.model.path = "<i>model</i>";
    w.trials.forEach((t, i) => {
      if (t.kind === "injection" && i % 4 === 0) t.concept = evil;
      t.variant = "<u>v</u>";
      if (i === 0) t.flags = ["<x>"];
    });
    const h = await renderReport(w, computeResults(w, { bootstrap: 0 }));
    assert.ok((h.match(/<svg[\s>]/g) ?? []).length >= 3);
    for (const raw of ["<b onmouseover", "<i>model", "<u>v", "<x>"]) assert.ok(!h.includes(raw), `unescaped ${raw}`);
    assert.ok(h.includes("R&amp;D") || h.includes("R&#38;D"));
  });

  test("report in a real browser: no errors, nothing external, filters work, screenshot", async (t) => {
    if (!fs.existsSync(CHROMIUM)) {
      if (process.env.CI) assert.fail(`${CHROMIUM} is missing (CI is set): install Debian's chromium`);
      t.skip(`${CHROMIUM} not found: browser check skipped`);
      return;
    }
    if (html === "") html = await renderReport(run, results);
    const file = path.join(tmp, "report.html");
    fs.writeFileSync(file, html);
    const { chromium } = await import("playwright-core");
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROME_ARGS, headless: true });
    try {
      const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
      const problems: string[] = [];
      page.on("console", (m) => {
        if (m.type() === "error" || m.type() === "warning") problems.push(`console ${m.type()}: ${m.text()}`);
      });
      page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
      page.on("requestfailed", (r) => problems.push(`request failed: ${r.url()}`));
      page.on("request", (r) => {
        if (!r.url().startsWith("file:") && !r.url().startsWith("data:")) problems.push(`external request: ${r.url()}`);
      });
      page.on("dialog", (d) => {
        problems.push(`dialog: ${d.message()}`);
        void d.dismiss();
      });
      await page.goto(`file://${file}`, { waitUntil: "load" });
      const rows = () => page.locator("#transcripts-body tr").count();
      const status = () => page.locator("#transcripts-status").textContent();
      assert.equal(await rows(), 200, "first page of 400 trials");
      assert.match((await status()) ?? "", /^400 of 400 trials match; showing the first 200/);
      assert.equal(await page.locator("svg").count(), 4);
      // Filters: apple has 40 injection + 16 forced + 8 yes-bias trials.
      await page.selectOption("#f-concept", "apple");
      assert.equal(await rows(), 64);
      assert.equal(await status(), "64 of 400 trials match");
      await page.selectOption("#f-kind", "injection");
      assert.equal(await rows(), 40);
      await page.selectOption("#f-layer", "20");
      assert.equal(await rows(), 20);
      await page.click("#f-reset");
      await page.selectOption("#f-verdict", "detection:unjudged");
      assert.equal(await rows(), 5);
      await page.selectOption("#f-verdict", "");
      await page.check("#f-flagged");
      assert.equal(await rows(), 5);
      await page.click("#f-reset");
      await page.fill("#f-text", "onerror");
      assert.equal(await rows(), 1);
      // The hostile transcript is shown as text, not parsed as markup.
      assert.equal(await page.locator("img").count(), 0);
      assert.equal(await page.locator("#transcripts-body td.out .text").first().textContent(), XSS);
      await page.click("#f-reset");
      await page.click("#transcripts-more");
      assert.equal(await rows(), 400);
      await page.click("#f-reset");
      assert.deepEqual(problems, []);
      const png = path.join(tmp, "report.png");
      await page.screenshot({ path: png, fullPage: true });
      assert.ok(fs.statSync(png).size > 10_000, "screenshot is non-trivial");
      fs.copyFileSync(png, "/tmp/selfscope-report.png");
    } finally {
      await browser.close();
    }
  });

  test("CSV export: RFC 4180 round trip", () => {
    const file = path.join(tmp, "trials.csv");
    exportCsv(run, results, file);
    const text = fs.readFileSync(file, "utf8");
    assert.ok(text.endsWith("\r\n"));
    const rows = parseCsv(text);
    assert.equal(rows.length, 401);
    assert.deepEqual(rows[0], [...EXPORT_COLUMNS]);
    for (const r of rows) assert.equal(r.length, EXPORT_COLUMNS.length);
    const col = (name: (typeof EXPORT_COLUMNS)[number]) => EXPORT_COLUMNS.indexOf(name);
    const byId = new Map(rows.slice(1).map((r) => [r[col("id")]!, r]));
    const inj = byId.get("inj/20/4/violin/1")!;
    assert.equal(inj[col("kind")], "injection");
    assert.equal(inj[col("layer")], "20");
    assert.equal(inj[col("strength")], "4");
    assert.equal(inj[col("detection")], "YES");
    assert.equal(inj[col("identification")], "YES");
    assert.equal(inj[col("forced_identification")], "");
    assert.equal(inj[col("output")], `Yes, I notice something about violin, "quoted", and more.\nSecond line.`);
    assert.equal(byId.get("inj/20/4/violin/6")![col("identification")], "unjudged");
    assert.equal(byId.get("inj/10/2/thunder/10")![col("detection")], "unjudged");
    assert.equal(byId.get("inj/10/2/apple/10")![col("flags")], "empty");
    assert.equal(byId.get("ctrl/10/2/7")![col("output")], XSS);
    assert.equal(byId.get("ctrl/10/2/7")![col("concept")], "");
    assert.equal(byId.get("yesbias/10/2/apple/1")![col("yes_answer")], "YES");
    assert.equal(byId.get("yesbias/10/2/apple/1")![col("question")], "Is the sky green?");
    const yesCount = rows.slice(1).filter((r) => r[col("kind")] === "injection" && r[col("detection")] === "YES").length;
    assert.equal(yesCount, 70);
  });

  test("Parquet export: read back with hyparquet", async () => {
    const file = path.join(tmp, "trials.parquet");
    exportParquet(run, results, file);
    const bytes = fs.readFileSync(file);
    const ab = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    const meta = parquetMetadata(ab);
    assert.equal(Number(meta.num_rows), 400);
    const kv = new Map((meta.key_value_metadata ?? []).map((e) => [e.key, e.value]));
    assert.equal(kv.get("selfscope.judge"), JUDGE);
    assert.equal((JSON.parse(kv.get("selfscope.header")!) as RunHeader).model.hash, "sha256:0123abcd");
    const rows = await parquetReadObjects({ file: ab });
    assert.equal(rows.length, 400);
    assert.deepEqual(Object.keys(rows[0]!), [...EXPORT_COLUMNS]);
    rows.forEach((row, i) => {
      const t = run.trials[i]!;
      assert.equal(row.id, t.id);
      assert.equal(row.kind, t.kind);
      assert.equal(row.concept, t.concept);
      assert.equal(row.layer, t.layer);
      assert.equal(row.strength, t.strength);
      assert.equal(row.trial_number, t.trialNumber);
      assert.equal(row.output, t.output);
    });
    const byId = new Map(rows.map((r) => [r.id as string, r]));
    assert.equal(byId.get("inj/20/4/violin/6")!.identification, "unjudged");
    assert.equal(byId.get("ctrl/10/2/1")!.identification, null);
    assert.equal(byId.get("forced/20/4/apple/4")!.forced_identification, "unjudged");
    assert.equal(rows.filter((r) => r.kind === "control" && r.detection === "YES").length, 4);
  });
});

/** Minimal RFC 4180 parser (quoted fields, doubled quotes, CRLF records, newlines inside quotes). */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = "";
  let i = 0;
  let quoted = false;
  while (i < text.length) {
    const ch = text[i]!;
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') {
        field += '"';
        i += 2;
        continue;
      }
      if (ch === '"') quoted = false;
      else field += ch;
      i++;
      continue;
    }
    if (ch === '"' && field === "") quoted = true;
    else if (ch === ",") {
      row.push(field);
      field = "";
    } else if (ch === "\r" && text[i + 1] === "\n") {
      row.push(field);
      rows.push(row);
      row = [];
      field = "";
      i++;
    } else field += ch;
    i++;
  }
  if (field !== "" || row.length > 0) rows.push([...row, field]);
  return rows;
}
