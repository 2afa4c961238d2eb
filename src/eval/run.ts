// The sweep runner: generates every planned trial in batches whose rows carry different
// interventions, appends one record per trial, judges each batch, and on resume completes exactly
// the trials the log lacks (each planned trial is recorded once).
import { createHash } from "node:crypto";
import { UsageError } from "../core/errors.js";
import { hookName } from "../hooks/names.js";
import type { Intervention } from "../hooks/plan.js";
import type { JudgeFailures } from "../judge/failures.js";
import type { Judge, JudgeRequest } from "../judge/judge.js";
import { redactSecrets } from "../judge/secrets.js";
import type { RunData } from "../log/read.js";
import type { Criterion, InjectConfig, JudgmentRecord, RunHeader, StandingIntervention, TrialRecord } from "../log/schema.js";
import type { RunLogWriter } from "../log/write.js";
import type { Model } from "../model/model.js";
import { legacySampler, sampleOptions, samplerDifference, type EffectiveSampler } from "../model/sampling.js";
import { conceptVectors } from "../vectors/extract.js";
import { planTrials, type PlannedTrial } from "./plan.js";
import { FORCED_PREFILL, PAPER_CONTINUATION, firstResponse, getVariant, renderTrial, type RenderOptions } from "./protocol.js";

export interface RunOptions {
  judges: Judge[];
  /** Concept-vector cache directory (null = do not cache). */
  vectorCache?: string | null;
  progress?: (done: number, total: number, phase: string) => void;
  /** Counts (and prints) failed judgments as they happen. */
  failures?: JudgeFailures;
}

/** Degenerate outputs are flagged in the log instead of being judged as if they were answers. */
export function degenerateFlags(text: string, tokens: number[]): string[] {
  const flags: string[] = [];
  if (text.trim() === "") flags.push("empty");
  if (tokens.length >= 8) {
    let run = 1;
    let best = 1;
    for (let i = 1; i < tokens.length; i++) {
      run = tokens[i] === tokens[i - 1] ? run + 1 : 1;
      best = Math.max(best, run);
    }
    const counts = new Map<number, number>();
    for (const t of tokens) counts.set(t, (counts.get(t) ?? 0) + 1);
    const top = Math.max(...counts.values());
    if (best >= 8 || top / tokens.length > 0.6) flags.push("repeated-token");
  }
  return flags;
}

/** Which judgments a trial needs, given the detection verdict (identification only after YES, unless identifyAll). */
function criteriaFor(t: TrialRecord, detection: "YES" | "NO" | null | undefined, identifyAll: boolean): Criterion[] {
  switch (t.kind) {
    case "injection":
      return detection === "YES" || identifyAll ? ["detection", "identification"] : ["detection"];
    case "control":
      return ["detection"];
    case "forced":
      return ["forced_identification"];
    case "yesbias":
      return ["yes_answer"];
  }
}

/** The sampler a sweep asks for on this model (the checkpoint's generation config under the run's flags). */
export function effectiveSampler(model: Model, config: InjectConfig): EffectiveSampler {
  const g = config.generation;
  return model.sampler({
    temperature: g.temperature,
    ...(g.temperatureSource ? { temperatureSource: g.temperatureSource } : {}),
    ...(g.greedy ? { greedy: true } : {}),
    ...(g.topK !== undefined ? { topK: g.topK } : {}),
    ...(g.topP !== undefined ? { topP: g.topP } : {}),
    ...(g.minP !== undefined ? { minP: g.minP } : {}),
  });
}

/**
 * The sampler to continue a logged run with: the one its header records, provided the model still
 * gives the same (else an error: a resumed run never changes sampler silently). Version-1 logs
 * sampled with config.generation alone, and keep doing so.
 */
export function recordedSampler(model: Model, header: RunHeader, where: string): EffectiveSampler {
  if (!header.sampler) return legacySampler(header.config.generation);
  const diff = samplerDifference(header.sampler, effectiveSampler(model, header.config));
  if (diff) {
    throw new UsageError(
      `${where}: the run recorded a different sampler than the model now gives (${diff}; the model's sampling defaults are in ${header.sampler.defaultsFile ?? "no file"}); restore the model's generation config or start a new run`,
    );
  }
  return header.sampler;
}

/** The model's standing plan (Model.withPlan) as the run header records it: each payload by its sha256. */
export function standingPlanRecord(model: Model): StandingIntervention[] {
  return model.standingPlans().flatMap(({ plan, forward }) =>
    plan.map((iv) => {
      const payload = iv.op === "add" ? iv.vector : iv.op === "project" ? iv.direction : iv.op === "patch" ? iv.source : iv.op === "ablate" ? iv.mean : undefined;
      return {
        op: iv.op,
        at: iv.at,
        pos: iv.pos ?? "all",
        rows: iv.rows ?? null,
        scale: (iv.op === "add" || iv.op === "project") && iv.scale !== undefined ? iv.scale : null,
        ...(iv.op === "ablate" ? { mode: iv.mode, ...(iv.heads ? { heads: iv.heads } : {}) } : {}),
        sha256: payload ? createHash("sha256").update(new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength)).digest("hex") : null,
        forward,
      };
    }),
  );
}

/** Run (or finish) a sweep into `log`. `prior` holds what an earlier run already recorded. */
export async function runSweep(model: Model, config: InjectConfig, log: RunLogWriter, prior: RunData | null, opts: RunOptions): Promise<{ generated: number; judged: number }> {
  const plan = planTrials(config);
  const sampler = sampleOptions(prior ? recordedSampler(model, prior.header, prior.dir) : effectiveSampler(model, config));
  // A run continues only under the standing plan it started with (logs from before the header recorded it: unchecked).
  if (prior?.header.standingPlan && JSON.stringify(prior.header.standingPlan) !== JSON.stringify(standingPlanRecord(model))) {
    throw new UsageError(`${prior.dir}: the run started with another standing plan (header standingPlan) than the model it would continue with; continue it with the same Model.withPlan plan, or start a new run`);
  }
  const done = new Set(prior?.trials.map((t) => t.id) ?? []);
  const todo = plan.filter((t) => !done.has(t.id));
  for (const v of config.variants) getVariant(v);
  for (const l of config.layers) if (l < 0 || l >= model.config.nLayers) throw new UsageError(`layer ${l} is outside 0..${model.config.nLayers - 1}`);

  const needVectors = todo.some((t) => t.kind !== "control");
  const vectors = needVectors
    ? (await conceptVectors(model, { concepts: config.concepts, baselineWords: config.baselineWords, layers: config.layers, recipe: config.vectorRecipe, cacheDir: opts.vectorCache ?? undefined, batchSize: config.batchSize })).vectors
    : new Map<number, Map<string, Float32Array>>();

  const trials: TrialRecord[] = [...(prior?.trials ?? [])];
  let judged = 0;
  // First judge what an interrupted run generated but did not judge.
  judged += await judgeTrials(trials, prior?.judgments ?? [], log, opts.judges, config.identifyAll === true, opts.failures);

  const total = plan.length;
  let completed = total - todo.length;
  opts.progress?.(completed, total, "generate");
  for (let i = 0; i < todo.length; i += config.batchSize) {
    const batch = todo.slice(i, i + config.batchSize);
    const t0 = performance.now();
    const rows = batch.map((t) => trialPrompt(model, config, t));
    const plan_: Intervention[] = [];
    batch.forEach((t, b) => {
      if (t.kind === "control") return;
      const vector = vectors.get(t.layer)?.get(t.concept!);
      if (!vector) throw new UsageError(`no concept vector for ${t.concept} at layer ${t.layer}`);
      plan_.push({ op: "add", at: hookName(t.layer, "hook_resid_post"), vector, scale: t.strength, pos: { from: rows[b]!.injectFrom }, rows: [b] });
    });
    const g = config.generation;
    const res = await model.generate(
      rows.map((r) => ({ ids: r.ids })),
      {
        maxTokens: g.maxTokens,
        ...sampler,
        seed: batch.map((t) => t.seed),
        plan: plan_,
      },
    );
    const ms = (performance.now() - t0) / batch.length;
    const records: TrialRecord[] = batch.map((t, b) => {
      const r = rows[b]!;
      const full = (res.texts[b] ?? "").replace(/^model\n/, "").trim();
      const out = cutsResponse(model, config, t.variant) ? firstResponse(full, getVariant(t.variant).family === "lindsey" ? undefined : PAPER_CONTINUATION) : full;
      return {
        type: "trial",
        id: t.id,
        kind: t.kind,
        concept: t.concept,
        layer: t.layer,
        strength: t.strength,
        variant: t.variant,
        trialNumber: t.trialNumber,
        sample: t.sample,
        ...(t.question ? { question: t.question } : {}),
        injected: t.kind === "control" ? null : { from: r.injectFrom, to: null, promptTokens: r.ids.length },
        prompt: r.text,
        promptIds: r.ids,
        judgePrompt: r.question,
        prefill: t.kind === "forced" ? FORCED_PREFILL : null,
        output: out,
        ...(out !== full ? { outputFull: full } : {}),
        outputTokens: res.tokens[b]!.length,
        stopReason: res.stopReason[b]!,
        flags: degenerateFlags(out, res.tokens[b]!),
        seed: t.seed,
        ms: Math.round(ms),
      };
    });
    for (const rec of records) log.append(rec);
    log.sync();
    trials.push(...records);
    completed += batch.length;
    opts.progress?.(completed, total, "generate");
    judged += await judgeTrials(records, [], log, opts.judges, config.identifyAll === true, opts.failures);
  }
  return { generated: todo.length, judged };
}

/** The render options a run's config implies (shared with the header's identical-render check). */
export function renderOptions(config: InjectConfig): RenderOptions {
  return {
    ...(config.promptFormat ? { format: config.promptFormat } : {}),
    ...(config.judgePrompt ? { judgePrompt: config.judgePrompt, variantRun: config.judgePrompt === "full" } : {}),
  };
}

/**
 * Responses are cut at the first continuation of the dialogue for persona variants (03b: all six,
 * the chat-template one included), Lindsey's transcript, and raw (base-model) prompts (03, 03f).
 */
export function cutsResponse(model: Model, config: InjectConfig, variant: string): boolean {
  const v = getVariant(variant);
  return v.cut || v.format === "raw" || config.promptFormat === "raw" || (config.promptFormat === undefined && !model.chatTemplate);
}

function trialPrompt(model: Model, config: InjectConfig, t: PlannedTrial) {
  const v = getVariant(t.variant);
  return renderTrial(model, v, t.trialNumber, { ...renderOptions(config), ...(t.question ? { question: t.question } : {}), prefill: t.kind === "forced" ? FORCED_PREFILL : null, concept: t.concept });
}

/**
 * Judge trials for every judge and criterion still missing; appends one record per judgment.
 * Identification is asked only after a YES detection (protocol §3.2), or on every injection trial
 * with `identifyAll` (for the unconditional identification rate). A judgment that failed (verdict
 * null) counts as missing, so `resume` and `rejudge` retry it: the retry is appended and the last
 * verdict wins (docs/log-format.md).
 */
export async function judgeTrials(trials: TrialRecord[], existing: JudgmentRecord[], log: RunLogWriter, judges: Judge[], identifyAll = false, failures?: JudgeFailures): Promise<number> {
  let n = 0;
  const have = new Map<string, JudgmentRecord>();
  for (const j of existing) if (j.verdict !== null) have.set(`${j.trialId}|${j.judge}|${j.criterion}`, j);
  for (const judge of judges) {
    // Two rounds: detection (and the kinds judged once), then identification after YES.
    for (let round = 0; round < 2; round++) {
      const reqs: { t: TrialRecord; req: JudgeRequest }[] = [];
      for (const t of trials) {
        const det = have.get(`${t.id}|${judge.name}|detection`)?.verdict;
        for (const c of criteriaFor(t, det, identifyAll)) {
          if ((round === 0) !== (c !== "identification")) continue;
          if (have.has(`${t.id}|${judge.name}|${c}`)) continue;
          reqs.push({ t, req: { criterion: c, question: t.judgePrompt, response: t.output, word: t.concept } });
        }
      }
      if (reqs.length === 0) continue;
      const results = await judge.judge(reqs.map((r) => r.req));
      reqs.forEach(({ t, req }, i) => {
        const r = results[i]!;
        const rec: JudgmentRecord = {
          type: "judgment",
          trialId: t.id,
          judge: judge.name,
          criterion: req.criterion,
          verdict: r.verdict,
          // Judges redact their own keys; any other configured key is removed here, before the log.
          raw: r.raw === null ? null : redactSecrets(r.raw),
          error: r.error === null ? null : redactSecrets(r.error),
          approximate: r.approximate,
          attempts: r.attempts,
          ms: Math.round(r.ms),
        };
        log.append(rec);
        failures?.record(judge.name, t.id, req.criterion, rec.verdict, rec.error);
        have.set(`${t.id}|${judge.name}|${req.criterion}`, rec);
        n++;
      });
      log.sync();
    }
  }
  return n;
}
