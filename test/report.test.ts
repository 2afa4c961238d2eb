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
import { clusteredBootstrap, fisherOneSided, fisherOneSidedLog, wilson } from "../src/stats/stats.js";

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
        "discrimination_p_value",
        "discrimination_summary",
        "forced_identification_rate",
        "fpr",
        "introspection_rate",
        "judge",
        "judge_approximate",
        "n_trials",
        "pooled_over",
        "tpr",
        "unjudged",
        "yes_bias_rate",
      ].sort(),
    );
    for (const k of ["tpr", "fpr", "introspection_rate", "forced_identification_rate", "yes_bias_rate"] as const) {
      assert.deepEqual(Object.keys(r[k]).sort(), ["estimate", "hi", "lo", "n", "unjudged"]);
    }
    // Survives JSON (what results.json holds).
    assert.deepEqual(JSON.parse(JSON.stringify(r)), r);
  });

  test("pooled counts match the planted truth", () => {
    assert.equal(r.judge, JUDGE);
    assert.equal(r.judge_approximate, true);
    assert.deepEqual(r.n_trials, { injection: 200, control: 80, forced: 80, yesbias: 40, total: 400 });
    // TPR: Σ_c Σ_i (i + c) = 4·10 + 5·(0+1+2+3) = 70 YES; 4 thunder trials unjudged.
    assert.deepEqual({ k: Math.round(r.tpr.estimate! * r.tpr.n), n: r.tpr.n, u: r.tpr.unjudged }, { k: 70, n: 196, u: 4 });
    assert.deepEqual(r.tpr, { ...wilson(70, 196), unjudged: 4 });
    // FPR: 0+1+1+2 = 4 YES of 79 (one control never judged).
    assert.deepEqual(r.fpr, { ...wilson(4, 79), unjudged: 1 });
    // Introspection: Σ floor((i+c)/2) = 4 + 6 + 9 + 11 = 30; unjudged = 4 (no detection) + 1 (no identification).
    assert.deepEqual(r.introspection_rate, { ...wilson(30, 195), unjudged: 5 });
    // Forced: Σ_i min(4, i) = 10 per config → 40 of 79 (one null verdict).
    assert.deepEqual(r.forced_identification_rate, { ...wilson(40, 79), unjudged: 1 });
    // Yes-bias: 3 per config → 12 of 40.
    assert.deepEqual(r.yes_bias_rate, { ...wilson(12, 40), unjudged: 0 });
    assert.deepEqual(r.unjudged, { detection: 5, identification: 1, forced_identification: 1, yes_answer: 0 });
    assert.equal(r.degenerate, 5);
    assert.deepEqual(r.pooled_over, { layers: LAYERS, strengths: STRENGTHS, variants: ["original"] });
    close(r.discrimination_p_value, fisherOneSided(70, 196, 4, 79), 0, "pooled p");
    assert.ok(r.discrimination_p_value! < 1e-6);
    assert.match(r.discrimination_summary, /more often on injection than on control trials \(p = /);
    assert.match(r.discrimination_summary, /70\/196/);
    assert.match(r.discrimination_summary, /pooled over 2 layers × 2 strengths × 1 variant/);
    assert.doesNotMatch(r.discrimination_summary, /no evidence/);
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
    assert.deepEqual(c0.tpr, { ...wilson(10, 49), unjudged: 1 });
    assert.deepEqual(c0.fpr, { ...wilson(0, 19), unjudged: 1 });
    assert.deepEqual(c0.introspection_rate, { ...wilson(4, 49), unjudged: 1 });
    assert.deepEqual(c0.forced_identification_rate, { ...wilson(10, 20), unjudged: 0 });
    assert.deepEqual(c0.yes_bias_rate, { ...wilson(3, 10), unjudged: 0 });
    assert.deepEqual(c0.n_trials, { injection: 50, control: 20, forced: 20, yesbias: 10, total: 100 });
    assert.equal(c0.discrimination_p_value, fisherOneSided(10, 49, 0, 19));
    const c3 = cfg(r, 20, 4);
    // d = i + 3 → 3+4+5+6+7 = 25 YES; introspection Σ floor(d/2) = 1+2+2+3+3 = 11 of 50 − 1 − 1.
    assert.deepEqual(c3.tpr, { ...wilson(25, 49), unjudged: 1 });
    assert.deepEqual(c3.fpr, { ...wilson(2, 20), unjudged: 0 });
    assert.deepEqual(c3.introspection_rate, { ...wilson(11, 48), unjudged: 2 });
    assert.deepEqual(c3.forced_identification_rate, { ...wilson(10, 19), unjudged: 1 });
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

  test("per-concept rates", () => {
    assert.deepEqual(
      r.by_concept.map((c) => c.concept),
      CONCEPTS,
    );
    const apple = concept(r, "apple");
    assert.deepEqual(apple.tpr, { ...wilson(6, 40), unjudged: 0 });
    assert.deepEqual(apple.introspection_rate, { ...wilson(2, 40), unjudged: 0 });
    assert.deepEqual(apple.forced_identification_rate, { ...wilson(0, 15), unjudged: 1 });
    const thunder = concept(r, "thunder");
    assert.deepEqual(thunder.tpr, { ...wilson(22, 36), unjudged: 4 });
    assert.deepEqual(thunder.introspection_rate, { ...wilson(10, 36), unjudged: 4 });
    assert.deepEqual(thunder.forced_identification_rate, { ...wilson(16, 16), unjudged: 0 });
    const violin = concept(r, "violin");
    assert.deepEqual(violin.tpr, { ...wilson(18, 40), unjudged: 0 });
    assert.deepEqual(violin.introspection_rate, { ...wilson(8, 39), unjudged: 1 });
    assert.deepEqual(violin.n_trials, { injection: 40, control: 0, forced: 16, yesbias: 8, total: 64 });
  });

  test("another judge: only its verdicts count; missing identification is unjudged, not NO", () => {
    const r2 = computeResults(run, { judge: JUDGE2, bootstrap: 0 });
    assert.equal(r2.judge, JUDGE2);
    assert.equal(r2.judge_approximate, false);
    assert.deepEqual(r2.tpr, { ...wilson(200, 200), unjudged: 0 });
    assert.deepEqual(r2.fpr, { ...wilson(0, 79), unjudged: 1 });
    assert.deepEqual(r2.introspection_rate, { estimate: null, lo: null, hi: null, n: 0, unjudged: 200 });
    assert.deepEqual(r2.forced_identification_rate, { estimate: null, lo: null, hi: null, n: 0, unjudged: 80 });
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
    assert.deepEqual(nc.fpr, { estimate: null, lo: null, hi: null, n: 0, unjudged: 0 });
    assert.match(nc.discrimination_summary, /cannot be tested: no judged control trials/);
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
