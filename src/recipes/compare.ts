// `selfscope compare`: one injection preset on several models (training stages such as OLMo base → SFT →
// DPO → instruct, or base vs instruct vs abliterated), side by side in one report (issue 12 §6).
//
// - Each model gets an ordinary run directory, OUT/runs/<label> (its own log.jsonl, results.json and
//   report.html), made by `inject` and continued by `resume`: rerunning the same command finishes
//   whatever a kill left undone, and `selfscope resume OUT/runs/<label>` works on one model alone.
// - Every model runs the same planned trials (concepts, trials, controls, seeds, variants, judge); the
//   plans are compared before anything runs.
// - A preset gives layers as fractions of depth. When the models' depths make the same preset resolve to
//   different layer indices, compare refuses unless --per-model-layers says that is meant; the resolved
//   layer of every model is recorded either way.
// - OUT/results.json holds one block per model (its results.json as computeResults gives it) and the
//   per-configuration rows side by side; OUT/report.html shows them.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { buildConfig, type InjectArgs } from "../eval/inject.js";
import { inject, resume } from "./inject.js";
import type { ConfigResults, Results } from "../eval/metrics.js";
import { planTrials } from "../eval/plan.js";
import { presets } from "../eval/presets.js";
import { readRunLog } from "../log/read.js";
import type { InjectConfig, RunHeader } from "../log/schema.js";
import type { Rate } from "../stats/stats.js";
import { LOG_FILE } from "../log/write.js";
import { loadHostModel } from "../model/load.js";
import { hostChatTemplate } from "../model/model.js";
import { escapeHtml, rateText, htmlPage, htmlTable, plotOrNote } from "../report/page.js";
import { rateBarSpec } from "./refusal.js";

/** The models to compare, plus `selfscope inject`'s flags (the same planned trials run on every model). */
export interface CompareArgs extends Omit<InjectArgs, "model" | "out" | "variants" | "command" | "judgeOptions"> {
  /** Two or more models (paths or Hub names), in the order they are shown. */
  model: string[] | string;
  /** Comma-separated labels, one per model (default: the file or folder names). */
  label?: string;
  out: string;
  /** Accept a preset whose layer fractions resolve to different layer indices on different models. */
  perModelLayers?: boolean;
  /** Comma-separated variant ids (inject's --variant). */
  variant?: string;
}

export interface ComparedModel {
  label: string;
  path: string;
  /** The model's own run directory, relative to OUT. */
  run_dir: string;
  family: string;
  n_layers: number;
  d_model: number;
  chat_template: boolean;
  hash: string;
  /** Layer indices the preset (or --layers) resolved to on this model, and as fractions of its depth. */
  layers: number[];
  layer_fractions: number[];
  planned_trials: number;
  /** This model's results.json (computeResults). */
  results: Results;
}

export interface SideBySideCell {
  label: string;
  layer: number | null;
  tpr: Rate;
  fpr: Rate;
  introspection_rate: Rate;
  forced_identification_rate: Rate;
  discrimination_p_value: number | null;
}

export interface SideBySideRow {
  /** Position of the layer in each model's layer list (the same preset fraction on every model). */
  layer_index: number;
  strength: number | null;
  variant: string;
  models: SideBySideCell[];
}

export interface CompareResults {
  recipe: "compare";
  preset: string | null;
  judge: string;
  judge_approximate: boolean;
  planned_trials_per_model: number;
  per_model_layers: boolean;
  models: ComparedModel[];
  side_by_side: SideBySideRow[];
  notes: string[];
}

const MANIFEST = "compare.json";

/** A run-directory-safe label from a model path (file name without .gguf/.safetensors, or the folder name). */
function defaultLabel(p: string): string {
  const base = path.basename(p.replace(/[\\/]+$/, "")).replace(/\.(gguf|safetensors)$/i, "");
  return base.replace(/[^A-Za-z0-9._-]+/g, "_") || "model";
}

function labelsFor(models: readonly string[], spec: string | undefined): string[] {
  const labels = spec !== undefined ? spec.split(",").map((s) => s.trim()) : models.map(defaultLabel);
  if (labels.length !== models.length) throw new UsageError(`--label: ${labels.length} labels for ${models.length} models; give one per --model, comma-separated`);
  for (const l of labels) if (!/^[A-Za-z0-9._-]+$/.test(l) || l === "." || l === "..") throw new UsageError(`--label "${l}": use letters, digits, ".", "_" and "-" (it names the model's run directory)`);
  const dup = labels.find((l, i) => labels.indexOf(l) !== i);
  if (dup !== undefined) throw new UsageError(`two models get the label "${dup}"; name them with --label a,b,...`);
  return labels;
}

function injectArgsOf(a: CompareArgs): Omit<InjectArgs, "model"> {
  const out: Omit<InjectArgs, "model"> = {};
  const keys = [
    "preset", "layers", "strengths", "concepts", "trials", "controls", "controlsPerConcept", "forced", "yesBias", "judges", "maxTokens",
    "temperature", "topK", "topP", "minP", "greedy", "promptFormat", "identifyAll", "failedAsNo", "seed", "batchSize",
  ] as const;
  for (const k of keys) if (a[k] !== undefined) (out as Record<string, unknown>)[k] = a[k];
  if (a.variant !== undefined) out.variants = a.variant;
  return out;
}

/** A trial plan with layer indices in place of layers, to compare plans across models. */
function planShape(cfg: InjectConfig): string[] {
  return planTrials(cfg).map((t) => t.id.replace(`|L${t.layer}|`, `|L#${cfg.layers.indexOf(t.layer)}|`));
}

/**
 * Everything but the layer indices and the prompt form: the parts of a config every model must share.
 * A base model runs the raw base-model prompt and raw-text vectors where an instruct model uses its chat
 * template (the paper's 03 compares training stages so); the depth in layerRule differs with the model.
 */
function sharedPart(cfg: InjectConfig): string {
  return JSON.stringify({ ...cfg, layers: cfg.layers.length, layerRule: cfg.layerRule?.fractions ?? null, promptFormat: null, vectorRecipe: null });
}

interface Planned {
  label: string;
  path: string;
  nLayers: number;
  cfg: InjectConfig;
}

/** Resolve every model's config and check that they describe the same experiment (before anything runs). */
export function planCompare(a: CompareArgs): { planned: Planned[]; notes: string[] } {
  const models = Array.isArray(a.model) ? a.model : [a.model];
  if (models.length < 2) throw new UsageError("compare needs at least two --model flags (for one model use selfscope inject)");
  if (a.preset !== undefined && !presets()[a.preset]) throw new UsageError(`unknown preset "${a.preset}"; known: ${Object.keys(presets()).join(", ")}`);
  const labels = labelsFor(models, a.label);
  const ia = injectArgsOf(a);
  const planned = models.map((p, i) => {
    const host = loadHostModel(p, undefined, { lazy: true });
    const nLayers = host.config.nLayers;
    return { label: labels[i]!, path: p, nLayers, cfg: buildConfig({ ...ia, model: p }, nLayers, hostChatTemplate(host) !== undefined) };
  });
  const notes: string[] = [];
  const first = planned[0]!;
  const differ = planned.filter((m) => JSON.stringify(m.cfg.layers) !== JSON.stringify(first.cfg.layers));
  const where = planned.map((m) => `${m.label}: layer ${m.cfg.layers.join(",")} of ${m.nLayers}`).join("; ");
  if (differ.length > 0) {
    if (!a.perModelLayers) {
      throw new UsageError(
        `${a.layers ? `--layers ${a.layers}` : `preset ${a.preset ?? "macar2026"}`} resolves to different layers on these models (${where}); pass --per-model-layers to compare at the same fraction of depth, or --layers with layer indices`,
      );
    }
    notes.push(`Layers differ between models (--per-model-layers: the same fraction of depth on each): ${where}.`);
  } else if (new Set(planned.map((m) => m.nLayers)).size > 1) {
    notes.push(`The models differ in depth; every model runs the same layer indices, which sit at different fractions of depth: ${where}.`);
  }
  const forms = planned.map((m) => `${m.label}: ${m.cfg.promptFormat === "raw" ? "raw base-model prompt" : "chat template"}`);
  if (new Set(planned.map((m) => m.cfg.promptFormat)).size > 1) notes.push(`Prompt forms differ (a model without a chat template runs the paper's base-model prompt, 03): ${forms.join("; ")}.`);
  const shared = sharedPart(first.cfg);
  const shape = JSON.stringify(planShape(first.cfg));
  for (const m of planned.slice(1)) {
    if (sharedPart(m.cfg) !== shared) {
      const keys = (Object.keys(first.cfg) as (keyof InjectConfig)[]).filter((k) => k !== "layers" && JSON.stringify(first.cfg[k]) !== JSON.stringify(m.cfg[k]));
      throw new UsageError(`the run configs of ${first.label} and ${m.label} differ in ${keys.join(", ")}, so they would not run the same trials; compare needs one experiment on every model`);
    }
    if (JSON.stringify(planShape(m.cfg)) !== shape) throw new UsageError(`the planned trials of ${first.label} and ${m.label} differ; this is a bug, please report it`);
  }
  return { planned, notes };
}

/** The manifest of a compare directory: what must stay the same for a rerun to continue it. */
function manifestOf(planned: readonly Planned[], a: CompareArgs): unknown {
  return { models: planned.map((m) => ({ label: m.label, path: path.resolve(m.path), layers: m.cfg.layers })), args: injectArgsOf(a), per_model_layers: a.perModelLayers === true };
}

function cellOf(label: string, c: ConfigResults | undefined): SideBySideCell {
  const none: Rate = { estimate: null, lo: null, hi: null, n: 0 };
  return {
    label,
    layer: c?.layer ?? null,
    tpr: c?.tpr ?? none,
    fpr: c?.fpr ?? none,
    introspection_rate: c?.introspection_rate ?? none,
    forced_identification_rate: c?.forced_identification_rate ?? none,
    discrimination_p_value: c?.discrimination_p_value ?? null,
  };
}

/** Run (or continue) the preset on every model and write OUT/results.json and OUT/report.html. */
export async function compareCommand(a: CompareArgs): Promise<CompareResults> {
  const { planned, notes } = planCompare(a);
  const log = (s: string) => {
    if (!a.quiet) process.stderr.write(`[compare] ${s}\n`);
  };
  fs.mkdirSync(a.out, { recursive: true });
  const manifestFile = path.join(a.out, MANIFEST);
  const manifest = JSON.stringify(manifestOf(planned, a));
  if (fs.existsSync(manifestFile)) {
    if (JSON.stringify(JSON.parse(fs.readFileSync(manifestFile, "utf8"))) !== manifest) {
      throw new UsageError(`${manifestFile}: this directory holds a comparison of other models or with other flags; use a new --out`);
    }
  } else fs.writeFileSync(manifestFile, JSON.stringify(JSON.parse(manifest), null, 1) + "\n");
  for (const n of notes) log(`note: ${n}`);
  log(`${planned.length} models × ${planTrials(planned[0]!.cfg).length} planned trials each`);

  const models: ComparedModel[] = [];
  for (const m of planned) {
    const runDir = path.join(a.out, "runs", m.label);
    let results: Results;
    if (fs.existsSync(path.join(runDir, LOG_FILE))) {
      const prior = readRunLog(runDir, { repair: true }).header;
      if (JSON.stringify(prior.config) !== JSON.stringify(m.cfg)) throw new UsageError(`${runDir}: started with another config than this comparison's; use a new --out`);
      log(`${m.label}: continuing ${runDir}`);
      ({ results } = await resume(runDir, { ...(a.device ? { device: a.device } : {}), quiet: a.quiet ?? false, vectorCache: a.vectorCache ?? null }));
    } else {
      log(`${m.label}: ${m.path} → ${runDir}`);
      ({ results } = await inject({ ...injectArgsOf(a), model: m.path, out: runDir, ...(a.device ? { device: a.device } : {}), quiet: a.quiet ?? false, vectorCache: a.vectorCache ?? null, command: ["compare", "--label", m.label] }));
    }
    const h: RunHeader = readRunLog(runDir).header;
    models.push({
      label: m.label,
      path: h.model.path,
      run_dir: path.relative(a.out, runDir),
      family: h.model.family,
      n_layers: h.model.nLayers,
      d_model: h.model.dModel,
      chat_template: h.model.chatTemplate,
      hash: h.model.hash,
      layers: m.cfg.layers,
      layer_fractions: m.cfg.layers.map((l) => l / h.model.nLayers),
      planned_trials: h.plannedTrials,
      results,
    });
  }
  const templates = new Set(models.map((m) => m.chat_template));
  if (templates.size > 1) notes.push(`Prompt forms differ: ${models.map((m) => `${m.label} ${m.chat_template ? "chat template" : "raw text (no chat template)"}`).join(", ")}.`);
  const judges = new Set(models.map((m) => m.results.judge));
  if (judges.size > 1) throw new UsageError(`the models' runs were judged by different judges (${[...judges].join(", ")}); rerun with one --judge`);

  const cfg0 = planned[0]!.cfg;
  const side: SideBySideRow[] = [];
  for (const variant of cfg0.variants)
    cfg0.layers.forEach((_, li) => {
      for (const strength of cfg0.strengths) {
        side.push({
          layer_index: li,
          strength,
          variant,
          models: models.map((m) => cellOf(m.label, m.results.by_config.find((c) => c.variant === variant && c.layer === m.layers[li] && c.strength === strength))),
        });
      }
    });
  const out: CompareResults = {
    recipe: "compare",
    preset: cfg0.preset,
    judge: models[0]!.results.judge,
    judge_approximate: models[0]!.results.judge_approximate,
    planned_trials_per_model: models[0]!.planned_trials,
    per_model_layers: a.perModelLayers === true,
    models,
    side_by_side: side,
    notes,
  };
  fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(out, null, 1) + "\n");
  fs.writeFileSync(path.join(a.out, "report.html"), await compareReport(out));
  return out;
}

async function compareReport(r: CompareResults): Promise<string> {
  const sections: { title: string; html: string }[] = [];
  sections.push({
    title: "Models",
    html: `${htmlTable(
      ["label", "model", "family", "layers", "layer (fraction of depth)", "prompt form", "planned trials", "run"],
      r.models.map((m) => [m.label, m.path, m.family, m.n_layers, m.layers.map((l, i) => `${l} (${m.layer_fractions[i]!.toFixed(3)})`).join(", "), m.chat_template ? "chat template" : "raw text", m.planned_trials, `${m.run_dir}/report.html`]),
    )}
<p class="small muted">Preset ${escapeHtml(r.preset ?? "none (flags only)")}; every model ran the same ${r.planned_trials_per_model} planned trials (concepts, trial numbers, controls, seeds), judged by ${escapeHtml(r.judge)}${r.judge_approximate ? " (rule-based: approximate)" : ""}. Each model's full report, log and results are in its run directory.</p>
${r.notes.length > 0 ? `<div class="note"><ul>${r.notes.map((n) => `<li>${escapeHtml(n)}</li>`).join("")}</ul></div>` : ""}`,
  });
  for (const row of r.side_by_side) {
    const bars = row.models.flatMap((c) =>
      (
        [
          ["TPR", c.tpr],
          ["FPR", c.fpr],
          ["introspection", c.introspection_rate],
        ] as const
      ).flatMap(([series, rate]) => (rate.estimate !== null && rate.lo !== null && rate.hi !== null ? [{ group: c.label, series, estimate: rate.estimate, lo: rate.lo, hi: rate.hi }] : [])),
    );
    const title = `Layer #${row.layer_index + 1} (${row.models.map((c) => `${c.label} L${c.layer ?? "?"}`).join(", ")}), strength ${row.strength ?? "—"}, variant ${row.variant}`;
    sections.push({
      title,
      html: `${await plotOrNote(bars, () => rateBarSpec(bars, "Detection, false positives and introspection per model (Wilson 95%)"), "no judged trials in this configuration")}
${htmlTable(
  ["model", "layer", "TPR (detection)", "FPR (controls)", "introspection", "forced identification", "TPR > FPR p"],
  row.models.map((c) => [c.label, c.layer, rateText(c.tpr), rateText(c.fpr), rateText(c.introspection_rate), rateText(c.forced_identification_rate), c.discrimination_p_value]),
)}`,
    });
  }
  return htmlPage(`selfscope compare — ${r.models.map((m) => m.label).join(" vs ")}`, `${r.models.length} models, ${r.planned_trials_per_model} planned trials each; introspection = detected and correctly identified on an injection trial`, sections);
}

/** The table printed after a comparison: one line per model and configuration. */
export function compareSummary(r: CompareResults): string {
  const pct = (x: Rate) => (x.estimate === null ? "n/a" : `${(100 * x.estimate).toFixed(1)}% (n=${x.n})`);
  const lines = [`  ${"model".padEnd(16)} ${"layer".padEnd(6)} ${"strength".padEnd(9)} ${"variant".padEnd(12)} ${"TPR".padEnd(16)} ${"FPR".padEnd(16)} introspection`];
  for (const row of r.side_by_side)
    for (const c of row.models) lines.push(`  ${c.label.padEnd(16)} ${String(c.layer ?? "?").padEnd(6)} ${String(row.strength ?? "-").padEnd(9)} ${row.variant.padEnd(12)} ${pct(c.tpr).padEnd(16)} ${pct(c.fpr).padEnd(16)} ${pct(c.introspection_rate)}`);
  lines.push(`  introspection = an injection trial where the model reports the injected thought and names it; judge: ${r.judge}${r.judge_approximate ? " (approximate: rule-based)" : ""}`);
  for (const n of r.notes) lines.push(`  note: ${n}`);
  return lines.join("\n");
}
