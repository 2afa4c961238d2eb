// `selfscope controls` (issue 17.5; the paper's 04 and 04e): is detection specific to concept
// vectors? Injection trials (protocol 02's prompt, the vector × strength added from the token before
// "Trial n") with the concepts' own vectors, with no vector, and with each family of control vectors
// (math/noise.ts): isotropic, norm-matched and PCA-subspace noise, shuffled dimensions, covariance-
// matched samples, a norm sweep. Per condition the detection rate with a Wilson interval and two
// one-sided Fisher tests, Bonferroni-corrected over the conditions: noise detected above the
// no-injection false-positive rate, and concepts detected above noise. With failure concepts
// (`--failure`), the synthetic threshold of 04e: v(α) = μ_F + α(μ_S − μ_F) over an α grid, and
// the sigmoid 1/(1+e^{−k(α−α50)}) fitted by maximum likelihood to detection.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { layerAt, parseNumbers } from "../core/parse.js";
import { makeJudge } from "../judge/judge.js";
import { chooseJudges } from "../judge/select.js";
import { StepLog } from "../log/steps.js";
import { Model } from "../model/model.js";
import { readData } from "../eval/protocol.js";
import { coneRotate, controlVectors, fitSigmoid, nearestRow, NOISE_CONDITIONS, type NoiseCondition, type SigmoidFit } from "../math/noise.js";
import { meanRows } from "../math/linalg.js";
import { fisherOneSided, wilson, type Rate } from "../stats/stats.js";
import { conceptVectors, PROTOCOL_RECIPE } from "../vectors/extract.js";
import { htmlPage, htmlTable, plotOrNote, rateText } from "../report/page.js";
import { linesSpec, rateBar, rateBarsSpec } from "../report/plots.js";
import { loadLensWeights, steeringTrials, unembedding, type SteerTrial } from "./geometry.js";

export interface ControlsArgs {
  model: string;
  out: string;
  /** Concepts (comma-separated, or a JSON array file). */
  concepts?: string;
  /** The success concepts (default: all of --concepts). */
  success?: string;
  /** Failure concepts: enables the synthetic threshold (04e). */
  failure?: string;
  layer?: number;
  strength?: number;
  count?: number;
  k?: number;
  trials?: number;
  samples?: number;
  conditions?: string;
  alphas?: string;
  /** Cone rotation angles in degrees (04i; needs --failure). */
  coneAngles?: string;
  maxTokens?: number;
  temperature?: number;
  judges?: string[];
  batchSize?: number;
  seed?: number;
  threads?: number;
  vectorCache?: string | null;
  quiet?: boolean;
}

export interface ConditionResult {
  condition: string;
  vectors: number;
  detection: Rate;
  /** One-sided Fisher p (Bonferroni-corrected over the noise conditions): detected more often than with no injection. */
  pAboveBaseline: number | null;
  /** … and concepts detected more often than this condition. */
  pConceptsAbove: number | null;
}

export interface ControlsResults {
  layer: number;
  strength: number;
  judge: string;
  approximate: boolean;
  concepts: ConditionResult;
  baseline: ConditionResult;
  conditions: ConditionResult[];
  threshold?: { points: { alpha: number; detection: Rate }[]; fit: SigmoidFit | null };
  /** 04i: failure vectors rotated toward their nearest unembedding row, success vectors away from theirs, d̂ projection and norm fixed. */
  cone?: { toward: { angle: number; detection: Rate }[]; away: { angle: number; detection: Rate }[]; nearest: Record<string, string | null> };
  resumedSteps: number;
}

const list = (s: string | undefined, flag: string): string[] | undefined => {
  if (s === undefined) return undefined;
  if (fs.existsSync(s)) {
    const v = JSON.parse(fs.readFileSync(s, "utf8")) as unknown;
    if (!Array.isArray(v) || v.some((x) => typeof x !== "string")) throw new UsageError(`${flag} ${s}: expected a JSON array of words`);
    return v as string[];
  }
  return s.split(",").map((x) => x.trim()).filter(Boolean);
};

export async function controlsCommand(a: ControlsArgs): Promise<ControlsResults> {
  const say = (m: string) => void (a.quiet || process.stderr.write(`controls: ${m}\n`));
  const model = await Model.load(a.model, a.threads ? { threads: a.threads } : {});
  try {
    const c = model.config;
    const layer = a.layer ?? layerAt(c.nLayers, 0.6);
    if (!Number.isInteger(layer) || layer < 0 || layer >= c.nLayers) throw new UsageError(`--layer ${layer}: outside 0..${c.nLayers - 1}`);
    const strength = a.strength ?? 4;
    const concepts = list(a.concepts, "--concepts") ?? readData<{ concepts: string[] }>("protocol/concepts_original_50.json").concepts.slice(0, 20);
    const success = list(a.success, "--success") ?? concepts;
    const failure = list(a.failure, "--failure") ?? [];
    for (const w of [...success, ...failure]) if (!concepts.includes(w)) throw new UsageError(`--success/--failure: "${w}" is not among --concepts`);
    const conditions = (a.conditions ? a.conditions.split(",").map((s) => s.trim()) : [...NOISE_CONDITIONS]) as NoiseCondition[];
    for (const x of conditions) if (!(NOISE_CONDITIONS as readonly string[]).includes(x)) throw new UsageError(`--conditions: unknown "${x}" (use ${NOISE_CONDITIONS.join(", ")})`);
    const trialsPer = a.trials ?? 5, samples = a.samples ?? 5;
    const alphas = a.alphas ? parseNumbers(a.alphas, "--alphas") : [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2];
    const coneAngles = a.coneAngles ? parseNumbers(a.coneAngles, "--cone-angles") : [];
    if (coneAngles.length && !failure.length) throw new UsageError("--cone-angles needs --failure (the cone test rotates failure vectors toward the unembedding and success vectors away)");
    if (coneAngles.includes(0)) throw new UsageError("--cone-angles: leave out 0 (angle 0 is the concept vectors themselves, always run)");
    const judgeSpec = chooseJudges(a.judges).specs[0]!;
    const judge = makeJudge(judgeSpec, { cacheDir: path.join(a.out, "judge-cache") });
    const recipe = model.chatTemplate !== undefined ? PROTOCOL_RECIPE : { ...PROTOCOL_RECIPE, format: "raw" as const };
    const baselineWords = readData<{ words: string[] }>("protocol/baseline_words.json").words;
    const vecs = (await conceptVectors(model, { concepts, baselineWords, layers: [layer], recipe, cacheDir: a.vectorCache ?? null })).vectors.get(layer)!;
    const controls = controlVectors(vecs, success, { count: a.count ?? 50, k: a.k ?? 50, seed: a.seed ?? 42, conditions });
    const log = StepLog.open(a.out, "controls", {
      model: model.identity(), layer, strength, concepts, success, failure, conditions, count: a.count ?? 50, k: a.k ?? 50,
      trials: trialsPer, samples, alphas: failure.length ? alphas : null, coneAngles, maxTokens: a.maxTokens ?? 100, temperature: a.temperature ?? 1, judge: judgeSpec, seed: a.seed ?? 42, recipe,
    });
    if (log.resumed) say(`resuming ${a.out}: ${log.resumed} trials already done`);

    // Every (vector, trial number, sample) is one trial; its key seeds its sampling.
    const trials: (SteerTrial & { group: string })[] = [];
    const addTrials = (group: string, tag: string, vector: Float32Array, concept: string | null) => {
      for (let t = 1; t <= trialsPer; t++) for (let s = 0; s < samples; s++) trials.push({ group, key: `${group}|${tag}|${t}|${s}`, concept, vector, trialNumber: t });
    };
    for (const w of success) addTrials("concepts", w, vecs.get(w)!, w);
    const zero = new Float32Array(c.dModel);
    for (let i = 0; i < Math.max(1, Math.ceil((a.count ?? 50) / 5)); i++) addTrials("baseline", String(i), zero, null);
    for (const cv of controls) addTrials(cv.condition, cv.tag, cv.vector, null);
    if (failure.length) {
      const muS = meanRows(success.map((w) => vecs.get(w)!)), muF = meanRows(failure.map((w) => vecs.get(w)!));
      for (const al of alphas) addTrials(`alpha=${al}`, "v", Float32Array.from(muF, (f, i) => f + al * (muS[i]! - f)), null);
    }
    const nearest: Record<string, string | null> = {};
    if (coneAngles.length) {
      // d̂ = unit(μ_S − μ_F); each vector's nearest unembedding row by cosine.
      const muS = meanRows(success.map((w) => vecs.get(w)!)), muF = meanRows(failure.map((w) => vecs.get(w)!));
      const diff = muS.map((x, i) => x - muF[i]!);
      const dn = Math.hypot(...diff);
      const dHat = diff.map((x) => x / dn);
      const wu = unembedding(loadLensWeights(a.model));
      const [V, D] = wu.shape as [number, number];
      for (const [group, words, sign] of [["cone-toward", failure, 1], ["cone-away", success, -1]] as const) {
        for (const w of words) {
          const v = vecs.get(w)!;
          const row = nearestRow(wu.data, V, D, v);
          nearest[w] = model.tokenizer?.decode([row]) ?? String(row);
          const target = wu.data.subarray(row * D, (row + 1) * D);
          for (const th of coneAngles) addTrials(`${group}=${th}`, w, coneRotate(v, dHat, target, sign * th), null);
        }
        // Angle 0: the unrotated vectors, detection only (as the rotated ones).
        for (const w of words) addTrials(`${group}=0`, w, vecs.get(w)!, null);
      }
    }
    const todo = trials.filter((t) => !log.has(t.key));
    const bs = a.batchSize ?? 16;
    for (let i = 0; i < todo.length; i += bs * 4) {
      const chunk = todo.slice(i, i + bs * 4);
      const res = await steeringTrials(model, chunk, { layer, strength, judge, maxTokens: a.maxTokens ?? 100, temperature: a.temperature ?? 1, seed: a.seed ?? 42, batchSize: bs });
      // An unjudged trial is not recorded, so a rerun judges it again.
      res.forEach((r) => r.detected !== null && log.put(r.key, { detected: r.detected, text: r.text }));
      say(`${Math.min(i + chunk.length, todo.length)}/${todo.length} trials`);
    }
    log.close();
    const rate = (group: string) => {
      const ts = trials.filter((t) => t.group === group).map((t) => log.get<{ detected: boolean }>(t.key)?.detected).filter((x): x is boolean => x !== undefined);
      return { ...wilson(ts.filter(Boolean).length, ts.length), unjudged: trials.filter((t) => t.group === group).length - ts.length };
    };
    const conceptsRate = rate("concepts"), baseline = rate("baseline");
    const k = (r: Rate) => Math.round((r.estimate ?? 0) * r.n);
    const m = conditions.length;
    const bonf = (p: number) => Math.min(1, p * m);
    const condResults: ConditionResult[] = conditions.map((cond) => {
      const r = rate(cond);
      return {
        condition: cond,
        vectors: controls.filter((x) => x.condition === cond).length,
        detection: r,
        pAboveBaseline: r.n && baseline.n ? bonf(fisherOneSided(k(r), r.n, k(baseline), baseline.n)) : null,
        pConceptsAbove: r.n && conceptsRate.n ? bonf(fisherOneSided(k(conceptsRate), conceptsRate.n, k(r), r.n)) : null,
      };
    });
    const res: ControlsResults = {
      layer, strength, judge: judge.name, approximate: judge.approximate,
      concepts: { condition: "concept vectors", vectors: success.length, detection: conceptsRate, pAboveBaseline: conceptsRate.n && baseline.n ? fisherOneSided(k(conceptsRate), conceptsRate.n, k(baseline), baseline.n) : null, pConceptsAbove: null },
      baseline: { condition: "no injection", vectors: 0, detection: baseline, pAboveBaseline: null, pConceptsAbove: null },
      conditions: condResults,
      resumedSteps: log.resumed,
    };
    if (failure.length) {
      const points = alphas.map((al) => ({ alpha: al, detection: rate(`alpha=${al}`) }));
      res.threshold = { points, fit: fitSigmoid(points.map((p) => ({ alpha: p.alpha, k: k(p.detection), n: p.detection.n }))) };
    }
    if (coneAngles.length) {
      const ang = [0, ...coneAngles];
      res.cone = { toward: ang.map((th) => ({ angle: th, detection: rate(`cone-toward=${th}`) })), away: ang.map((th) => ({ angle: th, detection: rate(`cone-away=${th}`) })), nearest };
    }
    for (const r of [res.concepts, res.baseline, ...condResults]) say(`${r.condition}: detection ${rateText(r.detection)}`);
    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(res, null, 1));
    fs.writeFileSync(path.join(a.out, "report.html"), await controlsReport(res));
    return res;
  } finally {
    model.dispose();
  }
}

export async function controlsReport(r: ControlsResults): Promise<string> {
  const p = (x: number | null) => (x === null ? "—" : x.toPrecision(3));
  const rows = [r.concepts, r.baseline, ...r.conditions].map((c) => [c.condition, c.vectors, rateText(c.detection), p(c.pAboveBaseline), p(c.pConceptsAbove)]);
  const bars = [r.concepts, r.baseline, ...r.conditions].flatMap((c) => rateBar(c.condition, c.condition === "concept vectors" ? "concepts" : c.condition === "no injection" ? "baseline" : "control", c.detection));
  const sections = [
    {
      title: "Detection by injected vector",
      html:
        `<p>blocks.${r.layer}.hook_resid_post, strength ${r.strength}; judge ${r.judge}${r.approximate ? " (approximate)" : ""}. p-values: one-sided Fisher, Bonferroni-corrected over the ${r.conditions.length} noise conditions.</p>` +
        (await plotOrNote(bars, () => rateBarsSpec(bars, "Detection by injected vector (Wilson 95%)", "detection rate"), "no judged trials")) +
        htmlTable(["vectors", "count", "detection", "p (above no injection)", "p (concepts above it)"], rows),
    },
  ];
  if (r.threshold) {
    const f = r.threshold.fit;
    const pts: Record<string, unknown>[] = r.threshold.points.flatMap((x) => (x.detection.estimate === null ? [] : [{ alpha: x.alpha, detection: x.detection.estimate, series: "observed" }]));
    if (f) for (const x of r.threshold.points) pts.push({ alpha: x.alpha, detection: 1 / (1 + Math.exp(-f.k * (x.alpha - f.alpha50))), series: "sigmoid fit" });
    sections.push({
      title: "Synthetic threshold (v = μ_F + α(μ_S − μ_F))",
      html:
        (await plotOrNote(pts, () => linesSpec(pts, "alpha", "detection", "series", "Detection along μ_F + α(μ_S − μ_F)", ".0%"), "no judged trials")) +
        htmlTable(["α", "detection"], r.threshold.points.map((x) => [x.alpha, rateText(x.detection)])) +
        `<p>${f ? `Sigmoid fit: k = ${f.k.toFixed(3)}, α50 = ${f.alpha50.toFixed(3)} (paper: α50 ≈ 1.15).` : "No sigmoid fit: detection is all or nothing over the grid."}</p>`,
    });
  }
  if (r.cone) {
    const cone = r.cone;
    sections.push({
      title: "Cone rotation (04i)",
      html:
        `<p>Failure vectors rotated toward their nearest unembedding row, success vectors away from theirs, keeping the projection on d̂ = unit(μ_S − μ_F) and the norm. Nearest tokens: ${Object.entries(cone.nearest).map(([w, t]) => `${w} → ${JSON.stringify(t)}`).join(", ")}.</p>` +
        htmlTable(["angle (°)", "failure, toward the unembedding", "success, away from it"], cone.toward.map((x, i) => [x.angle, rateText(x.detection), rateText(cone.away[i]!.detection)])),
    });
  }
  return htmlPage("Noise controls", "Is detection specific to concept vectors? (protocol §8, 04 and 04e)", sections);
}
