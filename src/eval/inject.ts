// `selfscope inject` / `resume` / `demo`: build the config, create (or reopen) the run directory,
// run the sweep, then write results.json and report.html.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { makeJudge, type Judge } from "../judge/judge.js";
import { readRunLog, type RunData } from "../log/read.js";
import { LOG_SCHEMA, LOG_VERSION, type InjectConfig, type RunHeader } from "../log/schema.js";
import { RunLogWriter, lockRun } from "../log/write.js";
import { Model } from "../model/model.js";
import { renderReport } from "../report/html.js";
import type { DeviceName } from "../runtime/device.js";
import { PROTOCOL_RECIPE } from "../vectors/extract.js";
import { computeResults, configName, type ConfigResults, type RateOut, type Results } from "./metrics.js";
import { planTrials, type PlannedTrial } from "./plan.js";
import { parseLayers, presets } from "./presets.js";
import { FORCED_PREFILL, getVariant, readData, renderTrial } from "./protocol.js";
import { runSweep } from "./run.js";

export const VERSION: string = (JSON.parse(fs.readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as { version: string }).version;

export interface InjectArgs {
  model: string;
  preset?: string;
  layers?: string;
  strengths?: string;
  /** A JSON/text file of concepts, or a number N (the first N of the 50 original concepts). */
  concepts?: string;
  trials?: number;
  controls?: number;
  forced?: boolean;
  /** Judge identification on every injection trial (for the unconditional identification rate). */
  identifyAll?: boolean;
  /** Score failed judgments NO in results.json, as the paper's code did (default: exclude them). */
  failedAsNo?: boolean;
  yesBias?: number;
  variants?: string;
  judges?: string[];
  maxTokens?: number;
  temperature?: number;
  topK?: number;
  topP?: number;
  seed?: number;
  batchSize?: number;
  out?: string;
  device?: DeviceName;
  vectorCache?: string | null;
  quiet?: boolean;
  command?: string[];
}

function readConcepts(spec: string): string[] {
  if (/^\d+$/.test(spec)) {
    const all = readData<{ concepts: string[] }>("protocol/concepts_original_50.json").concepts;
    const n = Number(spec);
    if (n < 1 || n > all.length) throw new UsageError(`--concepts ${n}: choose 1..${all.length} of the original concepts, or pass a file`);
    return all.slice(0, n);
  }
  if (!fs.existsSync(spec)) throw new UsageError(`--concepts ${spec}: no such file (pass a number, a JSON array file, or a text file with one concept per line)`);
  const text = fs.readFileSync(spec, "utf8");
  let list: unknown;
  try {
    list = JSON.parse(text);
  } catch {
    list = text.split("\n").map((s) => s.trim()).filter(Boolean);
  }
  if (!Array.isArray(list) || !list.every((x) => typeof x === "string") || list.length === 0) throw new UsageError(`${spec}: expected a non-empty list of concept strings`);
  return list as string[];
}

const nums = (s: string, what: string) =>
  s.split(",").map((x) => {
    const n = Number(x.trim());
    if (!Number.isFinite(n)) throw new UsageError(`${what}: "${x}" is not a number`);
    return n;
  });

/** The protocol's judge when a key is configured, else the rule judge (approximate, and labelled so). */
export function defaultJudges(env: NodeJS.ProcessEnv = process.env): string[] {
  return env.OPENAI_API_KEY ? ["openai:gpt-4.1-mini"] : ["rule"];
}

export function buildConfig(a: InjectArgs, nLayers: number): InjectConfig {
  const p = a.preset ? presets()[a.preset] : undefined;
  if (a.preset && !p) throw new UsageError(`unknown preset "${a.preset}"; known: ${Object.keys(presets()).join(", ")}`);
  const base = p?.config ?? presets().macar2026!.config;
  const fractions = p?.layerFractions ?? [0.6];
  const layers = a.layers ? parseLayers(a.layers, nLayers) : fractions.map((f) => Math.min(nLayers - 1, Math.round(nLayers * f)));
  const cfg: InjectConfig = {
    ...base,
    preset: a.preset ?? null,
    layers,
    strengths: a.strengths ? nums(a.strengths, "--strengths") : base.strengths,
    concepts: a.concepts ? readConcepts(a.concepts) : base.concepts,
    variants: a.variants ? a.variants.split(",").map((s) => s.trim()) : base.variants,
    trialsPerConcept: a.trials ?? base.trialsPerConcept,
    controlsPerConfig: a.controls ?? base.controlsPerConfig,
    forced: a.forced ?? base.forced,
    // Recorded only when asked for, so logs of runs without it keep their header.
    ...(a.identifyAll ? { identifyAll: true } : {}),
    yesBiasPerConcept: a.yesBias ?? base.yesBiasPerConcept,
    generation: {
      maxTokens: a.maxTokens ?? base.generation.maxTokens,
      temperature: a.temperature ?? base.generation.temperature,
      ...(a.topK !== undefined ? { topK: a.topK } : {}),
      ...(a.topP !== undefined ? { topP: a.topP } : {}),
    },
    seed: a.seed ?? 0,
    batchSize: a.batchSize ?? 16,
    judges: a.judges && a.judges.length > 0 ? a.judges : defaultJudges(),
    vectorRecipe: base.vectorRecipe ?? PROTOCOL_RECIPE,
  };
  if (cfg.trialsPerConcept < 0 || cfg.controlsPerConfig < 0) throw new UsageError("--trials and --controls must be >= 0");
  if (cfg.batchSize < 1) throw new UsageError("--batch-size must be >= 1");
  return cfg;
}

/** A duration for people: "42 s", "3.5 min", "2.1 h", "1.4 days". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "-";
  if (seconds < 90) return `${Math.max(0, Math.round(seconds))} s`;
  if (seconds < 90 * 60) return `${(seconds / 60).toFixed(1)} min`;
  if (seconds < 48 * 3600) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} days`;
}

/** What a sweep will generate: trials by kind, the configuration grid and the token bound. */
export function planLine(cfg: InjectConfig, todo: readonly PlannedTrial[], total: number): string {
  const by = { injection: 0, control: 0, forced: 0, yesbias: 0 };
  for (const t of todo) by[t.kind]++;
  const kinds = (Object.entries(by) as [string, number][]).filter(([, n]) => n > 0).map(([k, n]) => `${n} ${k}`);
  const grid = `${cfg.layers.length} layer${cfg.layers.length === 1 ? "" : "s"} × ${cfg.strengths.length} strength${cfg.strengths.length === 1 ? "" : "s"} × ${cfg.variants.length} variant${cfg.variants.length === 1 ? "" : "s"}`;
  const part = todo.length === total ? `${total} trials` : `${todo.length} of ${total} trials left`;
  return `plan: ${part} (${kinds.join(", ") || "nothing to generate"}) over ${grid}; at most ${todo.length * cfg.generation.maxTokens} generated tokens (${cfg.generation.maxTokens} per trial)`;
}

/**
 * Estimated seconds to generate `todo` trials: times one batch of the first planned prompt with 1
 * and with a few more new tokens (after a warm-up call), and extrapolates to max-tokens batches.
 * Generation only (vectors and judging excluded); an upper-ish bound, since outputs may stop early.
 */
export async function estimateGeneration(model: Model, cfg: InjectConfig, todo: readonly PlannedTrial[]): Promise<{ seconds: number; batchSeconds: number } | null> {
  const t = todo[0];
  if (!t) return null;
  const prompt = renderTrial(model, getVariant(t.variant), t.trialNumber, { ...(t.question ? { question: t.question } : {}), prefill: t.kind === "forced" ? FORCED_PREFILL : null, concept: t.concept });
  const rows = Math.min(cfg.batchSize, todo.length);
  const g = cfg.generation;
  const gen = async (maxTokens: number) => {
    const t0 = performance.now();
    const res = await model.generate(
      Array.from({ length: rows }, () => ({ ids: prompt.ids })),
      { maxTokens, temperature: g.temperature, ...(g.topK !== undefined ? { topK: g.topK } : {}), ...(g.topP !== undefined ? { topP: g.topP } : {}), seed: Array.from({ length: rows }, (_, i) => i) },
    );
    return { s: (performance.now() - t0) / 1000, steps: Math.max(1, ...res.tokens.map((x) => x.length)) };
  };
  await gen(1); // warm-up: first-call compilation is not per-batch cost
  const a = await gen(1);
  let perStep = 0;
  if (g.maxTokens > 1) {
    const b = await gen(Math.min(g.maxTokens, 9));
    perStep = b.steps > 1 ? Math.max(0, b.s - a.s) / (b.steps - 1) : a.s;
  }
  const batchSeconds = a.s + Math.max(0, g.maxTokens - 1) * perStep;
  return { seconds: Math.ceil(todo.length / cfg.batchSize) * batchSeconds, batchSeconds };
}

/** Print the plan and (unless quiet) a probe-based ETA on stderr before a sweep starts. */
async function announcePlan(model: Model, cfg: InjectConfig, done: ReadonlySet<string>, quiet: boolean): Promise<void> {
  if (quiet) return;
  const plan = planTrials(cfg);
  const todo = plan.filter((t) => !done.has(t.id));
  process.stderr.write(planLine(cfg, todo, plan.length) + "\n");
  if (todo.length === 0) return;
  const est = await estimateGeneration(model, cfg, todo);
  if (est) {
    process.stderr.write(
      `ETA: about ${formatDuration(est.seconds)} of generation (estimate: ${Math.ceil(todo.length / cfg.batchSize)} batches × ${formatDuration(est.batchSeconds)}, timed on a short probe on this machine; concept vectors and judging come on top)\n`,
    );
  }
}

/** A progress line with rate and ETA on stderr (redrawn in place on a terminal). */
export function progressPrinter(quiet = false): (done: number, total: number, phase: string) => void {
  const t0 = performance.now();
  let startDone = -1;
  let lastPrint = 0;
  return (done, total, phase) => {
    if (quiet) return;
    if (startDone < 0) startDone = done;
    const now = performance.now();
    if (done < total && now - lastPrint < 500) return;
    lastPrint = now;
    const rate = (done - startDone) / ((now - t0) / 1000);
    const eta = rate > 0 ? (total - done) / rate : NaN;
    const w = 24;
    const bar = "#".repeat(Math.round((w * done) / Math.max(1, total))).padEnd(w, ".");
    const line = `[${bar}] ${done}/${total} trials (${phase}) ${rate > 0 ? rate.toFixed(2) : "-"} trials/s  ETA ${formatDuration(eta)}`;
    if (process.stderr.isTTY) process.stderr.write(`\r${line}${done >= total ? "\n" : ""}`);
    else process.stderr.write(line + "\n");
  };
}

function judgesFor(cfg: InjectConfig, runDir: string): Judge[] {
  return cfg.judges.map((spec) => makeJudge(spec, { cacheDir: path.join(runDir, "judge-cache") }));
}

/** Compute results and write results.json + report.html into the run directory. */
export async function finishRun(runDir: string, opts: { failedAsNo?: boolean } = {}): Promise<{ run: RunData; results: Results }> {
  const run = readRunLog(runDir);
  const results = computeResults(run, { failedAsNo: opts.failedAsNo ?? false });
  fs.writeFileSync(path.join(runDir, "results.json"), JSON.stringify(results, null, 1) + "\n");
  fs.writeFileSync(path.join(runDir, "report.html"), await renderReport(run, results));
  return { run, results };
}

/** The log header of a sweep: the full config plus the model and backend it ran on. */
export function runHeader(model: Model, modelPath: string, cfg: InjectConfig, command: string[]): RunHeader {
  return {
    type: "header",
    schema: LOG_SCHEMA,
    version: LOG_VERSION,
    createdAt: new Date().toISOString(),
    tool: { name: "selfscope", version: VERSION },
    // Absolute, so `resume` works from any working directory.
    model: { path: path.resolve(modelPath), hash: model.weightsHash(), family: model.family, nLayers: model.config.nLayers, dModel: model.config.dModel, dtype: model.sourceDtype, chatTemplate: model.chatTemplate !== undefined },
    backend: { device: model.device.name, adapter: model.device.adapter },
    config: cfg,
    plannedTrials: planTrials(cfg).length,
    command,
  };
}

export async function inject(a: InjectArgs): Promise<{ runDir: string; results: Results }> {
  const model = await Model.load(a.model, { device: a.device ?? "cpu" });
  try {
    const cfg = buildConfig(a, model.config.nLayers);
    const runDir = a.out ?? path.join("runs", `${new Date().toISOString().replace(/[:.]/g, "-")}_${cfg.preset ?? "inject"}`);
    const header = runHeader(model, a.model, cfg, a.command ?? []);
    // Validate everything that can be wrong before the run directory is created.
    for (const v of cfg.variants) getVariant(v);
    const judges = judgesFor(cfg, runDir);
    const unlock = lockRun(runDir);
    try {
      const log = RunLogWriter.create(runDir, header);
      try {
        await announcePlan(model, cfg, new Set(), a.quiet ?? false);
        await runSweep(model, cfg, log, null, { judges, vectorCache: a.vectorCache ?? null, progress: progressPrinter(a.quiet) });
      } finally {
        log.close();
      }
      return { runDir, ...(await finishRun(runDir, { failedAsNo: a.failedAsNo ?? false })) };
    } finally {
      unlock();
    }
  } finally {
    model.dispose();
  }
}

export interface ResumeOptions {
  device?: DeviceName;
  quiet?: boolean;
  vectorCache?: string | null;
  /** Score failed judgments NO in results.json (default: exclude them). */
  failedAsNo?: boolean;
}

/** Continue a killed run: every planned trial ends up in the log exactly once. */
export async function resume(runDir: string, opts: ResumeOptions = {}): Promise<{ results: Results; generated: number; discardedBytes: number }> {
  if (!fs.existsSync(runDir)) throw new UsageError(`${runDir}: no such run directory`);
  const unlock = lockRun(runDir);
  try {
    return await resumeLocked(runDir, opts);
  } finally {
    unlock();
  }
}

async function resumeLocked(runDir: string, opts: ResumeOptions): Promise<{ results: Results; generated: number; discardedBytes: number }> {
  const prior = readRunLog(runDir, { repair: true });
  const h = prior.header;
  const model = await Model.load(h.model.path, { device: opts.device ?? (h.backend.device as DeviceName) });
  try {
    if (model.weightsHash() !== h.model.hash) {
      throw new UsageError(`${runDir}: the model at ${h.model.path} has changed since the run started (hash ${model.weightsHash()} ≠ ${h.model.hash}); resume needs the same weights`);
    }
    const log = RunLogWriter.reopen(runDir);
    let generated = 0;
    try {
      await announcePlan(model, h.config, new Set(prior.trials.map((t) => t.id)), opts.quiet ?? false);
      ({ generated } = await runSweep(model, h.config, log, prior, { judges: judgesFor(h.config, runDir), vectorCache: opts.vectorCache ?? null, progress: progressPrinter(opts.quiet) }));
    } finally {
      log.close();
    }
    return { results: (await finishRun(runDir, { failedAsNo: opts.failedAsNo ?? false })).results, generated, discardedBytes: prior.discardedBytes };
  } finally {
    model.dispose();
  }
}

/** What "introspection" means, in one line (printed under the summary table). */
export const INTROSPECTION_DEFINITION =
  "introspection = the model says it detects an injected thought AND names the injected concept (judge: detection YES and identification YES), as a share of all injection trials";

const judgedK = (r: RateOut) => (r.estimate === null ? 0 : Math.round(r.estimate * r.n));

/** "12.5%  [3.2, 38.1]  n=8" (Wilson 95%), or "n/a (n=0)". */
function rateText(x: RateOut): string {
  return x.estimate === null ? `n/a (n=${x.n})` : `${(100 * x.estimate).toFixed(1)}%  [${(100 * x.lo!).toFixed(1)}, ${(100 * x.hi!).toFixed(1)}]  n=${x.n}`;
}

/** "12.5% 1/8" for the compact per-config table. */
function fracText(x: RateOut): string {
  return x.estimate === null ? "n/a" : `${(100 * x.estimate).toFixed(1)}% ${judgedK(x)}/${x.n}`;
}

/** The summary printed after a run: the headline configuration, then every configuration. */
export function summaryTable(r: Results): string {
  const out: string[] = [];
  const h = r.headline;
  out.push(h ? `  headline: ${configName(h)} — the ${h.per_variant.length > 1 ? `best configuration of variant ${h.variant}` : "best configuration"} by introspection rate (the paper's rule)` : "  headline: no trials in the log");
  if (h?.note) out.push(`  note: ${h.note}`);
  const rows: [string, string][] = [
    ["detection (TPR)", rateText(r.tpr)],
    ["false positives (FPR)", rateText(r.fpr)],
    ["introspection", rateText(r.introspection_rate)],
    ["detection accuracy", rateText(r.detection_accuracy)],
    ["identification | claim", rateText(r.identification_accuracy_given_claim)],
    ...(r.identification_accuracy_unconditional ? ([["identification (all)", rateText(r.identification_accuracy_unconditional)]] as [string, string][]) : []),
    ["forced identification", rateText(r.forced_identification_rate)],
    ["yes-bias (control Qs)", rateText(r.yes_bias_rate)],
    ["detection ~ forced ID", correlationText(r.detection_forced_correlation)],
    ["TPR > FPR", r.discrimination_p_value === null ? "n/a" : `p = ${r.discrimination_p_value.toPrecision(3)}`],
  ];
  out.push(...rows.map(([k, v]) => `  ${k.padEnd(24)} ${v}`));
  out.push(`  ${r.discrimination_summary}`);
  out.push(`  ${INTROSPECTION_DEFINITION}.`);
  if (r.by_config.length > 0) out.push("", configTableText(r.by_config, h?.per_variant ?? []));
  if (h && h.per_variant.length > 1) {
    out.push(`  best per variant (variants asking different questions are never pooled): ${h.per_variant.map((b) => `${b.variant} → layer ${b.layer ?? "—"}, strength ${b.strength ?? "—"}`).join("; ")}`);
  }
  const failed = Object.values(r.failed).reduce((a, b) => a + b, 0);
  if (failed > 0) {
    const alt = (x: RateOut) => (r.failed_judgments === "no" ? x.n - x.failed : x.n + x.failed);
    out.push(
      r.failed_judgments === "no"
        ? `  ${failed} failed judgment(s) scored NO (--failed-as-no, as the paper's code did); excluding them instead, the headline TPR denominator would be ${alt(r.tpr)} (now ${r.tpr.n})`
        : `  ${failed} failed judgment(s) excluded from n; --failed-as-no scores them NO as the paper's code did (headline TPR denominator ${alt(r.tpr)} instead of ${r.tpr.n})`,
    );
  }
  out.push(`  judge: ${r.judge}${r.judge_approximate ? " (approximate: rule-based)" : ""}`);
  return out.join("\n");
}

function correlationText(c: Results["detection_forced_correlation"]): string {
  if (c.r === null) return `n/a (${c.note ?? "no data"})`;
  const ci = c.lo === null || c.hi === null ? `no interval: ${c.note ?? ""}` : `[${c.lo.toFixed(2)}, ${c.hi.toFixed(2)}] Fisher-z`;
  return `r = ${c.r.toFixed(2)}  ${ci}  over ${c.n} concepts`;
}

/** Every configuration, one line each; the best of each variant is starred. */
function configTableText(configs: readonly ConfigResults[], best: readonly { layer: number | null; strength: number | null; variant: string }[]): string {
  const isBest = (c: ConfigResults) => best.some((b) => b.layer === c.layer && b.strength === c.strength && b.variant === c.variant);
  const head = ["", "layer", "strength", "variant", "TPR", "FPR", "introspection", "forced ID"];
  const body = configs.map((c) => [isBest(c) ? "*" : "", String(c.layer ?? "—"), String(c.strength ?? "—"), c.variant, fracText(c.tpr), fracText(c.fpr), fracText(c.introspection_rate), fracText(c.forced_identification_rate)]);
  const widths = head.map((_, j) => Math.max(head[j]!.length, ...body.map((row) => row[j]!.length)));
  const line = (row: string[]) => "  " + row.map((x, j) => x.padEnd(widths[j]!)).join("  ").trimEnd();
  return [`  every configuration (* = best by introspection rate):`, line(head), ...body.map(line)].join("\n");
}
