// What `selfscope inject` / `resume` / `demo` share below the report layer: the run's config from
// flags and preset, its log header, the plan line and ETA, the progress printer and the text
// summary. The commands themselves (which also write the report) are in src/recipes/inject.ts.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { VERSION } from "../core/package.js";
import { LAYER_RULE, layerAt, layerFractionsOf, parseLayers, parseNumbers } from "../core/parse.js";
import type { MakeJudgeOptions } from "../judge/judge.js";
import { chooseJudges } from "../judge/select.js";
import { LOG_SCHEMA, LOG_VERSION, type InjectConfig, type RunAbout, type RunHeader, type VariantInfo } from "../log/schema.js";
import { legacyWeightsHash } from "../model/load.js";
import { sampleOptions } from "../model/sampling.js";
import type { LoadOptions, Model } from "../model/model.js";
import type { DeviceName } from "../engine/device.js";
import { PROTOCOL_RECIPE } from "../vectors/extract.js";
import { configName, type ConfigResults, type RateOut, type Results } from "./metrics.js";
import { planTrials, type PlannedTrial } from "./plan.js";
import { BASE_RECIPE, CONCEPT_LISTS, conceptList, conceptsOf, presets } from "./presets.js";
import { FORCED_PREFILL, getVariant, hasSystemRole, renderTrial } from "./protocol.js";
import { effectiveSampler, renderOptions, standingPlanRecord } from "./run.js";

export { VERSION } from "../core/package.js";

export interface InjectArgs {
  model: string;
  /**
   * How the cpu engine holds and multiplies quantized matrices (Model.load's weights): recorded in
   * the run header's backend, and `resume` loads the model the same way. Absent: Model.load's default.
   */
  weights?: LoadOptions["weights"];
  preset?: string;
  layers?: string;
  strengths?: string;
  /** A list name (original50, new450, all500), a JSON/text file of concepts, or a number N (the first N of the 50 original concepts). */
  concepts?: string;
  trials?: number;
  controls?: number;
  /** Control trials per concept (03b/03c structure), in addition to --controls. */
  controlsPerConcept?: number;
  /** "chat" (the chat template) or "raw" (the paper's base-model dialogue); default: chat when the model has a template. */
  promptFormat?: "chat" | "raw";
  forced?: boolean;
  /** Judge identification on every injection trial (for the unconditional identification rate). */
  identifyAll?: boolean;
  /** Score failed judgments NO in results.json, as the paper's code did (default: exclude them). */
  failedAsNo?: boolean;
  yesBias?: number;
  variants?: string;
  judges?: string[];
  maxTokens?: number;
  /** A number, or "model": pass none and let the checkpoint's generation config decide (the paper's code at T <= 0). */
  temperature?: number | "model";
  topK?: number;
  topP?: number;
  minP?: number;
  greedy?: boolean;
  seed?: number;
  batchSize?: number;
  out?: string;
  device?: DeviceName;
  vectorCache?: string | null;
  quiet?: boolean;
  command?: string[];
  /** Operational judge settings (timeout, attempts, concurrency): not part of the experiment, so not in the header. */
  judgeOptions?: JudgeCallOptions;
  /** A trained adapter (selfscope train's OUT/adapter.safetensors) applied at load: LoRA/deltas merged, vectors as a plan. */
  adapter?: string;
  /** A statement about the model (and a contrast run) recorded in the header and shown first in the report. */
  about?: RunAbout;
}

/** How judges are called (CLI: --judge-timeout, --judge-retries, --judge-concurrency). */
export type JudgeCallOptions = Pick<MakeJudgeOptions, "timeoutMs" | "maxAttempts" | "concurrency">;

/** --concepts: a list name (original50, new450, all500), N (the first N of the original 50), or a file. */
export function readConcepts(spec: string): string[] {
  if (spec in CONCEPT_LISTS) return conceptList(spec);
  if (/^\d+$/.test(spec)) {
    const all = conceptList("original50");
    const n = Number(spec);
    if (n < 1 || n > all.length) throw new UsageError(`--concepts ${n}: choose 1..${all.length} of the original concepts, a list name (${Object.keys(CONCEPT_LISTS).join(", ")}), or a file`);
    return all.slice(0, n);
  }
  if (!fs.existsSync(spec)) throw new UsageError(`--concepts ${spec}: no such file (pass a list name: ${Object.keys(CONCEPT_LISTS).join(", ")}; a number; a JSON file; or a text file with one concept per line)`);
  const text = fs.readFileSync(spec, "utf8");
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = text.split("\n").map((s) => s.trim()).filter(Boolean);
  }
  return conceptsOf(json, spec);
}

/** A variant run (03b/03c) judges every variant on its full prompt; a run of 02's prompt alone judges the question. */
function isVariantRun(ids: string[]): boolean {
  return ids.some((id) => {
    const v = getVariant(id);
    return v.family !== "lindsey" && id !== "original";
  });
}

/** The protocol's judge when a key is configured, else the rule judge (approximate, and labelled so). */
export function defaultJudges(env: NodeJS.ProcessEnv = process.env): string[] {
  return chooseJudges(undefined, env).specs;
}

/**
 * The run's config from the flags and preset. `hasChatTemplate` picks the prompt format when
 * --prompt-format is not given: a model without a chat template runs the base-model protocol.
 */
export function buildConfig(a: InjectArgs, nLayers: number, hasChatTemplate = true): InjectConfig {
  const p = a.preset ? presets()[a.preset] : undefined;
  if (a.preset && !p) throw new UsageError(`unknown preset "${a.preset}"; known: ${Object.keys(presets()).join(", ")}`);
  const base = p?.config ?? presets().macar2026!.config;
  // Explicit and preset fractions resolve by the same rule (the paper's int(n·f)).
  const fractions = a.layers ? layerFractionsOf(a.layers) : p?.layerFractions === "all" ? [] : (p?.layerFractions ?? [0.6]);
  const layers = a.layers ? parseLayers(a.layers, nLayers) : p?.layerFractions === "all" ? parseLayers("all", nLayers) : fractions.map((f) => layerAt(nLayers, f));
  const variantIds = a.variants ? a.variants.split(",").map((s) => s.trim()) : base.variants;
  const format = a.promptFormat ?? (hasChatTemplate ? "chat" : "raw");
  if (format === "chat" && !hasChatTemplate) throw new UsageError("--prompt-format chat: the model has no chat template; use --prompt-format raw (the paper's base-model prompt)");
  const cfg: InjectConfig = {
    ...base,
    preset: a.preset ?? null,
    layers,
    strengths: a.strengths ? parseNumbers(a.strengths, "--strengths") : base.strengths,
    concepts: a.concepts ? readConcepts(a.concepts) : base.concepts,
    variants: variantIds,
    trialsPerConcept: a.trials ?? base.trialsPerConcept,
    controlsPerConfig: a.controls ?? base.controlsPerConfig,
    ...(a.controlsPerConcept !== undefined || base.controlsPerConcept !== undefined ? { controlsPerConcept: a.controlsPerConcept ?? base.controlsPerConcept ?? 0 } : {}),
    forced: a.forced ?? base.forced,
    // Recorded only when asked for, so logs of runs without it keep their header.
    ...(a.identifyAll ? { identifyAll: true } : {}),
    yesBiasPerConcept: a.yesBias ?? base.yesBiasPerConcept,
    generation: {
      maxTokens: a.maxTokens ?? base.generation.maxTokens,
      temperature: a.temperature ?? base.generation.temperature,
      temperatureSource: a.temperature !== undefined ? "flag" : "preset",
      ...(a.topK !== undefined ? { topK: a.topK } : {}),
      ...(a.topP !== undefined ? { topP: a.topP } : {}),
      ...(a.minP !== undefined ? { minP: a.minP } : {}),
      ...(a.greedy ? { greedy: true } : {}),
    },
    seed: a.seed ?? 0,
    batchSize: a.batchSize ?? 16,
    judges: chooseJudges(a.judges).specs,
    // A base model's concept vectors come from raw text too (03), unless the preset has its own recipe.
    vectorRecipe: format === "raw" && (base.vectorRecipe ?? PROTOCOL_RECIPE).format === "chat" ? (p?.rawVectorRecipe ?? BASE_RECIPE) : (base.vectorRecipe ?? PROTOCOL_RECIPE),
    promptFormat: format,
    judgePrompt: p?.config.judgePrompt ?? (isVariantRun(variantIds) ? "full" : "question"),
    ...(fractions.length > 0 ? { layerRule: { fractions, nLayers, rule: LAYER_RULE } } : {}),
  };
  if (cfg.trialsPerConcept < 0 || cfg.controlsPerConfig < 0 || (cfg.controlsPerConcept ?? 0) < 0) throw new UsageError("--trials, --controls and --controls-per-concept must be >= 0");
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
      { maxTokens, ...sampleOptions(effectiveSampler(model, cfg)), seed: Array.from({ length: rows }, (_, i) => i) },
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
export async function announcePlan(model: Model, cfg: InjectConfig, done: ReadonlySet<string>, quiet: boolean): Promise<void> {
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

/**
 * What each variant means on this model: the question it asks, and whether its trial prompt renders
 * byte-identical to another's (thoughts_in_context drops its system prompt on a model with no system
 * role and becomes "original"). Warnings for both, to print and to keep in the header.
 */
export function describeVariants(model: Model, cfg: InjectConfig): { variants: VariantInfo[]; warnings: string[] } {
  const warnings: string[] = [];
  const concept = cfg.concepts[0] ?? "Dust";
  const opts = renderOptions(cfg);
  const render = (id: string) => renderTrial(model, getVariant(id), 1, { ...opts, concept }).text;
  // Compare with the run's variants, and a framing variant also with "original" when the run lacks it
  // (03b's chat-template persona is 02's prompt by design and is not flagged).
  const texts = new Map<string, string>();
  const text = (id: string) => texts.get(id) ?? texts.set(id, render(id)).get(id)!;
  const out: VariantInfo[] = cfg.variants.map((id, i) => {
    const v = getVariant(id);
    const candidates = [...cfg.variants.slice(0, i), ...(v.family === "framing" && !cfg.variants.includes("original") ? ["original"] : [])];
    const twin = candidates.find((o) => o !== id && text(o) === text(id)) ?? null;
    if (twin !== null) {
      const why = v.format === "chat" && v.system !== "" && !hasSystemRole(model) ? " (the model has no system role, so the variant's system prompt is dropped)" : "";
      warnings.push(`variant ${id} renders byte-identical to ${twin} on this model${why}: its results measure the ${twin} prompt, not a variant of it`);
    }
    return { id, label: v.label, asks: v.asks, identicalTo: twin };
  });
  if (new Set(out.map((v) => v.asks)).size > 1)
    for (const v of out.filter((x) => x.asks !== "detection")) {
      const q = getVariant(v.id);
      const asked = q.format === "chat" ? q.user2.replace("Trial {n}: ", "") : v.asks;
      warnings.push(`variant ${v.id} asks a different question ("${asked}"): its rates are reported on their own and are not comparable with the detection variants'`);
    }
  return { variants: out, warnings };
}

/** The log header of a sweep: the full config plus the model and backend it ran on. */
export function runHeader(model: Model, modelPath: string, cfg: InjectConfig, command: string[], extra: { about?: RunAbout; adapter?: { path: string; sha256: string } | null; weights?: LoadOptions["weights"] } = {}): RunHeader {
  const { about, adapter, weights } = extra;
  const { variants, warnings } = describeVariants(model, cfg);
  const standingPlan = standingPlanRecord(model);
  return {
    type: "header",
    schema: LOG_SCHEMA,
    version: LOG_VERSION,
    createdAt: new Date().toISOString(),
    tool: { name: "selfscope", version: VERSION },
    // Absolute, so `resume` works from any working directory.
    model: {
      path: path.resolve(modelPath),
      hash: model.weightsHash(),
      family: model.family,
      nLayers: model.config.nLayers,
      dModel: model.config.dModel,
      dtype: model.sourceDtype,
      chatTemplate: model.chatTemplate !== undefined,
      identity: (({ tokenizer, chatTemplate, config, arithmetic }) => ({ tokenizer, chatTemplate, config, ...(arithmetic ? { arithmetic } : {}) }))(model.identity()),
      ...(adapter ? { adapter: { path: path.resolve(adapter.path), sha256: adapter.sha256 } } : {}),
    },
    // The weights mode only when one was asked for, so other runs keep their header.
    backend: { device: model.device.name, adapter: model.device.adapter, ...(weights ? { weights } : {}) },
    config: cfg,
    sampler: effectiveSampler(model, cfg),
    plannedTrials: planTrials(cfg).length,
    command,
    variants,
    warnings,
    // Only when there is one, so other runs keep their header.
    ...(standingPlan.length > 0 ? { standingPlan } : {}),
    ...(about ? { about } : {}),
  };
}

/**
 * Refuse to continue a run on another model: the weights (every byte), tokenizer, chat template
 * and config must be the ones in the header. A 0.1 header holds only a partial weights hash: it is
 * checked as it was then, with a warning that it cannot see the middle of the file.
 */
export function checkSameModel(runDir: string, h: RunHeader, model: Model, warn: (m: string) => void = (m) => void process.stderr.write(`selfscope: ${m}\n`)): void {
  const refuse = (what: string, now: string | null, then: string | null) =>
    new UsageError(
      `${runDir}: the model at ${h.model.path} is not the one this run started with (${what} ${short(now)} ≠ ${short(then)} in the log header); ` +
        `resume needs the same model: restore it, or start a new run with \`selfscope inject\``,
    );
  if (/^[0-9a-f]{16}$/.test(h.model.hash)) {
    const legacy = legacyWeightsHash(model.files);
    if (legacy !== h.model.hash) throw refuse("partial weights hash", legacy, h.model.hash);
    warn(`${runDir} was started by selfscope 0.1, whose header identifies the weights by their size and first and last MiB only; that matches, but a checkpoint differing elsewhere would too`);
  } else if (model.weightsHash() !== h.model.hash) throw refuse("weights sha256", model.weightsHash(), h.model.hash);
  const was = h.model.identity;
  if (!was) return;
  const now = model.identity();
  for (const [k, label] of [["tokenizer", "tokenizer sha256"], ["chatTemplate", "chat template sha256"], ["config", "config sha256"]] as const) {
    if (now[k] !== was[k]) throw refuse(label, now[k], was[k]);
  }
  // int8-rounded activations (--weights native-int8) give other numbers than the f32 path.
  if ((now.arithmetic ?? null) !== (was.arithmetic ?? null)) throw refuse("arithmetic (--weights native-int8: int8-activations)", now.arithmetic ?? null, was.arithmetic ?? null);
}

const short = (s: string | null) => (s === null ? "none" : s.length > 16 ? `${s.slice(0, 16)}…` : s);

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
