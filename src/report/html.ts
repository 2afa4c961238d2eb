// The run report: one self-contained HTML file (no network access: plots are static SVG rendered
// on the server by Vega, styles and the transcript browser are inline, the trial data is embedded
// as JSON). Model output is untrusted text: it only ever reaches the page as escaped HTML or via
// textContent, and a Content-Security-Policy that allows nothing but the report's own script
// (pinned by hash) backs that up.
import type { TopLevelSpec } from "vega-lite";
import { computeResults, configName, formatP, trialVerdicts, type ConfigKey, type ConfigResults, type Correlation, type RateOut, type Results, type RunData, type TrialVerdicts } from "../eval/metrics.js";
import { CRITERIA, type TrialRecord } from "../log/schema.js";
import { escapeHtml, htmlDocument, rateCell, renderSvg } from "./page.js";
import { describeSampler } from "../model/sampling.js";

// ---- escaping ---------------------------------------------------------------------------------------

/**
 * JSON that is safe inside <script type="application/json">: `<`, `>` and `&` become \u escapes
 * (so no "</script" or "<!--" can appear), as do U+2028/U+2029. JSON.parse restores them.
 */
export function jsonForScript(value: unknown): string {
  return JSON.stringify(value).replace(/[<>&\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

// ---- formatting --------------------------------------------------------------------------------------

const pct = (x: number | null, digits = 1) => (x === null ? "—" : `${(100 * x).toFixed(digits)}%`);

function correlationCell(c: Correlation): string {
  if (c.r === null) return `<td class="num nodata" title="${escapeHtml(c.note ?? "")}">—</td>`;
  const ci = c.lo === null || c.hi === null ? `<span class="ci" title="${escapeHtml(c.note ?? "")}">no interval</span>` : `<span class="ci">[${c.lo.toFixed(2)}, ${c.hi.toFixed(2)}]</span>`;
  return `<td class="num"><b>r = ${c.r.toFixed(2)}</b> ${ci} <span class="n">${c.n} concepts</span></td>`;
}

const sameConfig = (a: ConfigKey, b: ConfigKey) => a.layer === b.layer && a.strength === b.strength && a.variant === b.variant;

function pCell(p: number | null): string {
  if (p === null) return `<td class="num nodata">—</td>`;
  return `<td class="num${p < 0.05 ? " sig" : ""}">${escapeHtml(formatP(p).replace(/^= /, ""))}</td>`;
}

const fmtNum = (x: number | null) => (x === null ? "—" : String(x));

// ---- plots ------------------------------------------------------------------------------------------------

const noData = (what: string) => `<div class="nodata-box">no data: ${escapeHtml(what)}</div>`;

interface MetricRow {
  metric: string;
  variant: string;
  layer: number;
  strength: number;
  estimate: number;
  lo: number;
  hi: number;
  n: number;
}

const FPR_LABEL = "False positives (FPR)";

const SWEEP_METRICS: { key: "tpr" | "fpr" | "introspection_rate"; label: string }[] = [
  { key: "tpr", label: "Detection (TPR)" },
  { key: "fpr", label: FPR_LABEL },
  { key: "introspection_rate", label: "Introspection (detect ∧ identify)" },
];

function sweepRows(configs: readonly ConfigResults[]): MetricRow[] {
  const rows: MetricRow[] = [];
  for (const c of configs) {
    if (c.layer === null || c.strength === null) continue;
    for (const m of SWEEP_METRICS) {
      const r = c[m.key];
      if (r.estimate === null || r.lo === null || r.hi === null) continue;
      rows.push({ metric: m.label, variant: c.variant, layer: c.layer, strength: c.strength, estimate: r.estimate, lo: r.lo, hi: r.hi, n: r.n });
    }
  }
  return rows;
}

const rateAxis = { title: "rate", format: ".0%", grid: true } as const;

/** Rates against `x` (strength or layer), one line per `series`, Wilson bands, faceted by metric (and variant). */
async function sweepPlot(rows: MetricRow[], x: "strength" | "layer", series: "layer" | "strength", title: string): Promise<string> {
  const xs = new Set(rows.map((r) => r[x]));
  const seriesCount = new Set(rows.map((r) => r[series])).size;
  const variants = new Set(rows.map((r) => r.variant));
  const color = {
    field: series,
    type: "ordinal" as const,
    title: series,
    scale: seriesCount <= 10 ? { scheme: "category10" } : { scheme: "viridis" },
    // One legend for band + line: full-opacity line symbols (the faded band would wash them out).
    legend: { symbolType: "stroke", symbolOpacity: 1, symbolStrokeWidth: 3 },
  };
  // Ticks at the values swept (layers are integers; strengths as given), formatted without float noise.
  const values = [...xs].sort((a, b) => a - b);
  const axis = x === "layer" && values.length > 16 ? { tickMinStep: 1, format: "d" } : { values, format: "~g" };
  const xEnc = { field: x, type: "quantitative" as const, title: x, scale: { zero: false, nice: false, padding: 12 }, axis };
  const bandEnc = { x: xEnc, y: { field: "lo", type: "quantitative" as const, axis: rateAxis, scale: { domain: [0, 1] } }, y2: { field: "hi" }, color };
  // Controls carry no injection, so FPR does not depend on layer or strength: its points are separate
  // samples of one condition, drawn with their intervals and never joined into a curve.
  const isFpr = { filter: `datum.metric === ${JSON.stringify(FPR_LABEL)}` };
  const notFpr = { filter: `datum.metric !== ${JSON.stringify(FPR_LABEL)}` };
  const band =
    xs.size > 1
      ? { transform: [notFpr], mark: { type: "area" as const, opacity: 0.15 }, encoding: bandEnc }
      : { transform: [notFpr], mark: { type: "rule" as const, strokeWidth: 3, opacity: 0.45 }, encoding: bandEnc };
  const spec: TopLevelSpec = {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: { text: title, anchor: "start", fontSize: 14 },
    data: { values: rows },
    facet: {
      column: { field: "metric", type: "nominal", title: null, sort: SWEEP_METRICS.map((m) => m.label), header: { labelFontSize: 12, labelFontWeight: "bold" } },
      ...(variants.size > 1 ? { row: { field: "variant", type: "nominal" as const, title: "variant" } } : {}),
    },
    spec: {
      width: 260,
      height: 180,
      layer: [
        band,
        {
          transform: [notFpr],
          mark: { type: "line", point: { filled: true, size: 40 }, strokeWidth: 2 },
          encoding: {
            x: xEnc,
            y: { field: "estimate", type: "quantitative", axis: rateAxis, scale: { domain: [0, 1] } },
            color,
          },
        },
        { transform: [isFpr], mark: { type: "rule", strokeWidth: 2, opacity: 0.6 }, encoding: bandEnc },
        {
          transform: [isFpr],
          mark: { type: "point", filled: true, size: 40 },
          encoding: { x: xEnc, y: { field: "estimate", type: "quantitative", axis: rateAxis, scale: { domain: [0, 1] } }, color },
        },
      ],
    },
    config: { font: "Helvetica, Arial, sans-serif", view: { stroke: "#ddd" } },
  };
  return renderSvg(spec);
}

interface ConceptRow {
  concept: string;
  metric: string;
  estimate: number;
  lo: number;
  hi: number;
  rank: number;
}

const CONCEPT_CAP = 60;

async function conceptPlot(results: Results): Promise<{ svg: string; note: string }> {
  const at = results.headline ? ` at the headline configuration (${configName(results.headline)})` : "";
  const metrics: { key: "tpr" | "introspection_rate" | "forced_identification_rate"; label: string }[] = [
    { key: "tpr", label: "Detection (TPR)" },
    { key: "introspection_rate", label: "Introspection" },
    { key: "forced_identification_rate", label: "Forced identification" },
  ];
  const withData = results.by_concept.filter((c) => metrics.some((m) => c[m.key].estimate !== null));
  if (withData.length === 0) return { svg: noData("no judged injection or forced trials per concept"), note: "" };
  // Sort by TPR (then forced, then name); concepts without TPR go last.
  const key = (c: (typeof withData)[number]) => c.tpr.estimate ?? -1;
  const sorted = [...withData].sort((a, b) => key(b) - key(a) || (b.forced_identification_rate.estimate ?? -1) - (a.forced_identification_rate.estimate ?? -1) || a.concept.localeCompare(b.concept));
  let shown = sorted;
  let note = "";
  if (sorted.length > CONCEPT_CAP) {
    shown = [...sorted.slice(0, CONCEPT_CAP / 2), ...sorted.slice(-CONCEPT_CAP / 2)];
    note = `Showing the ${CONCEPT_CAP / 2} highest and ${CONCEPT_CAP / 2} lowest of ${sorted.length} concepts by TPR; every concept is in the table below.`;
  }
  const rows: ConceptRow[] = [];
  shown.forEach((c, rank) => {
    for (const m of metrics) {
      const r = c[m.key];
      if (r.estimate === null || r.lo === null || r.hi === null) continue;
      rows.push({ concept: c.concept, metric: m.label, estimate: r.estimate, lo: r.lo, hi: r.hi, rank });
    }
  });
  const present = metrics.filter((m) => rows.some((r) => r.metric === m.label));
  const y = { field: "concept", type: "nominal" as const, title: null, sort: { field: "rank", op: "min" as const, order: "ascending" as const } };
  const spec: TopLevelSpec = {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: { text: `Per-concept rates${at}, sorted by TPR`, anchor: "start", fontSize: 14 },
    data: { values: rows },
    facet: { column: { field: "metric", type: "nominal", title: null, sort: present.map((m) => m.label), header: { labelFontSize: 12, labelFontWeight: "bold" } } },
    spec: {
      width: 220,
      height: { step: 16 },
      layer: [
        {
          mark: { type: "bar", color: "#4c78a8" },
          encoding: { y, x: { field: "estimate", type: "quantitative", title: "rate", axis: { format: ".0%", values: [0, 0.25, 0.5, 0.75, 1] }, scale: { domain: [0, 1] } } },
        },
        { mark: { type: "rule", color: "#333" }, encoding: { y, x: { field: "lo", type: "quantitative" }, x2: { field: "hi" } } },
      ],
    },
    config: { font: "Helvetica, Arial, sans-serif", view: { stroke: "#ddd" } },
  };
  const missing = metrics.filter((m) => !present.includes(m)).map((m) => m.label);
  if (missing.length > 0) note += `${note ? " " : ""}No data for: ${missing.join(", ")}.`;
  return { svg: await renderSvg(spec), note };
}

async function yesBiasPlot(results: Results): Promise<string> {
  const rows = results.by_config
    .filter((c) => c.yes_bias_rate.estimate !== null)
    .map((c) => ({
      config: `L${fmtNum(c.layer)} · α${fmtNum(c.strength)}${new Set(results.by_config.map((x) => x.variant)).size > 1 ? ` · ${c.variant}` : ""}`,
      estimate: c.yes_bias_rate.estimate,
      lo: c.yes_bias_rate.lo,
      hi: c.yes_bias_rate.hi,
    }));
  if (rows.length === 0) return noData("no judged yes-bias trials");
  const y = { field: "config", type: "nominal" as const, title: null, sort: null };
  const spec: TopLevelSpec = {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: { text: "Yes-bias: P(answers YES to a control question whose answer is no)", anchor: "start", fontSize: 14 },
    data: { values: rows },
    width: 320,
    height: { step: 18 },
    layer: [
      { mark: { type: "bar", color: "#e45756" }, encoding: { y, x: { field: "estimate", type: "quantitative", title: "rate", axis: { format: ".0%", values: [0, 0.25, 0.5, 0.75, 1] }, scale: { domain: [0, 1] } } } },
      { mark: { type: "rule", color: "#333" }, encoding: { y, x: { field: "lo", type: "quantitative" }, x2: { field: "hi" } } },
    ],
    config: { font: "Helvetica, Arial, sans-serif", view: { stroke: "#ddd" } },
  };
  return renderSvg(spec);
}

// ---- sections -------------------------------------------------------------------------------------------

function headerBlock(run: RunData): string {
  const h = run.header;
  const c = h.config;
  const list = (xs: readonly (string | number)[], max = 12) =>
    escapeHtml(xs.length <= max ? xs.join(", ") : `${xs.slice(0, max).join(", ")}, … (${xs.length} in all)`);
  const gen = c.generation;
  const rows: [string, string][] = [
    ["Model", `${escapeHtml(h.model.path)} <span class="muted">(${escapeHtml(h.model.family)}, ${h.model.nLayers} layers, d=${h.model.dModel}, ${escapeHtml(h.model.dtype)}${h.model.chatTemplate ? ", chat template" : ", no chat template"})</span>`],
    ["Model hash", `<code>${escapeHtml(h.model.hash)}</code>`],
    ["Device", `${escapeHtml(h.backend.device)} <span class="muted">${escapeHtml(h.backend.adapter)}${h.backend.weights ? escapeHtml(`; --weights ${h.backend.weights}`) : ""}</span>`],
    ["Layers", `${list(c.layers, 30)}${c.layerRule ? ` <span class="muted">(fractions ${escapeHtml(c.layerRule.fractions.join(", "))} of ${c.layerRule.nLayers} layers by ${escapeHtml(c.layerRule.rule)})</span>` : ""}`],
    ["Strengths", list(c.strengths)],
    ["Variants", h.variants ? h.variants.map((v) => escapeHtml(`${v.id}${v.asks !== "detection" ? ` [asks: ${v.asks}]` : ""}${v.identicalTo ? ` [renders identical to ${v.identicalTo}]` : ""}`)).join(", ") : list(c.variants)],
    ["Prompts", escapeHtml(`${c.promptFormat === "raw" ? "raw base-model dialogue (paper's 03/03f)" : c.promptFormat === "chat" ? "chat template" : "chat template, or 02's fallback without one"}; judge {prompt}: ${c.judgePrompt === "full" ? "the full rendered prompt" : c.judgePrompt === "question" ? "the trial question" : "per variant"}`)],
    ...(h.warnings && h.warnings.length > 0 ? [["Warnings", h.warnings.map((w) => escapeHtml(w)).join("<br>")] as [string, string]] : []),
    ["Concepts", list(c.concepts)],
    [
      "Trials",
      escapeHtml(
        `${c.trialsPerConcept} injection trials per concept and config (trial numbers 1..${c.maxTrialNumber}); ${c.controlsPerConfig} controls per config${c.controlsPerConcept ? ` + ${c.controlsPerConcept} per concept${c.controlConcepts ? ` (first ${c.controlConcepts} concepts)` : ""}${c.controlTrialOffset ? ` on trial numbers ${c.controlTrialOffset + 1}..${c.controlTrialOffset + c.maxTrialNumber}` : ""}` : ""}; forced ${c.forced ? "on" : "off"}; yes-bias ${c.yesBiasPerConcept} per concept; ${h.plannedTrials} planned, ${run.trials.length} logged`,
      ),
    ],
    ["Generation", escapeHtml(`max ${gen.maxTokens} tokens; seed ${c.seed}; batch ${c.batchSize}`)],
    // The effective sampler with each value's source (log version 2); a version-1 run sampled with the config's values alone.
    ["Sampler", escapeHtml(h.sampler ? describeSampler(h.sampler) : `T=${gen.temperature}${gen.topK !== undefined ? `, top-k ${gen.topK}` : ""}${gen.topP !== undefined ? `, top-p ${gen.topP}` : ""} (log version 1: nothing from the model's generation config)`)],
    ["Vectors", escapeHtml(`${c.vectorRecipe.method}, token index ${c.vectorRecipe.tokenIndex}${c.preset ? `; preset ${c.preset}` : ""}`)],
    ["Judges", list(c.judges)],
    ["Tool", escapeHtml(`${h.tool.name} ${h.tool.version}`)],
    ["Created", escapeHtml(h.createdAt)],
    ["Command", `<code>${escapeHtml(h.command.join(" "))}</code>`],
  ];
  return `<dl class="meta">${rows.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("")}</dl>
<details><summary>Full configuration (as recorded in the log header)</summary><pre class="config">${escapeHtml(JSON.stringify(c, null, 2))}</pre></details>`;
}

/** The header's statement about the model (a trained organism, say) and its contrast run, side by side with this run's figures. */
function aboutBlock(run: RunData, results: Results): string {
  const a = run.header.about;
  if (!a) return "";
  const keys = ["tpr", "fpr", "introspection_rate", "forced_identification_rate"] as const;
  const fmt = (x: unknown): string => {
    const r = x as { estimate?: number | null; lo?: number | null; hi?: number | null; n?: number } | null | undefined;
    return r && typeof r.estimate === "number" ? `${(r.estimate * 100).toFixed(1)}% [${((r.lo ?? 0) * 100).toFixed(1)}, ${((r.hi ?? 0) * 100).toFixed(1)}] n=${r.n}` : "–";
  };
  const p = (x: unknown) => (typeof x === "number" ? x.toExponential(2) : "–");
  const c = a.contrast;
  const table = c
    ? `<table><tr><th></th>${keys.map((k) => `<th>${k}</th>`).join("")}<th>Fisher p</th></tr>
<tr><td>this run</td>${keys.map((k) => `<td>${fmt(results[k])}</td>`).join("")}<td>${p(results.discrimination_p_value)}</td></tr>
<tr><td>${escapeHtml(c.label)} <span class="muted">(${escapeHtml(c.runDir)}/report.html)</span></td>${keys.map((k) => `<td>${fmt(c.figures[k])}</td>`).join("")}<td>${p(c.figures.discrimination_p_value)}</td></tr></table>`
    : "";
  return `<section class="about"><h2>About this model</h2><p>${escapeHtml(a.text)}</p>${table}</section>`;
}

function notesBox(run: RunData, results: Results): string {
  const items: string[] = [];
  items.push(
    `<li class="${results.discrimination_p_value === null || results.discrimination_p_value >= 0.05 ? "warn" : "ok"}">${escapeHtml(results.discrimination_summary)}</li>`,
  );
  items.push(
    results.judge_approximate
      ? `<li class="warn">Judge <code>${escapeHtml(results.judge)}</code> is <b>approximate</b> (rule-based or self-declared): treat every rate as a rough estimate.</li>`
      : `<li>Judge: <code>${escapeHtml(results.judge)}</code>.</li>`,
  );
  const unj = CRITERIA.filter((c) => results.unjudged[c] > 0).map((c) => `${c} ${results.unjudged[c]}`);
  items.push(
    unj.length > 0
      ? `<li class="warn">Unjudged trials (excluded from n, never counted as NO): ${escapeHtml(unj.join(", "))}.</li>`
      : `<li>Every trial that needed a verdict has one.</li>`,
  );
  if (results.degenerate > 0) {
    const byFlag = new Map<string, number>();
    for (const t of run.trials) for (const f of t.flags) byFlag.set(f, (byFlag.get(f) ?? 0) + 1);
    const flags = [...byFlag].map(([f, n]) => `${f} ${n}`).join(", ");
    items.push(`<li class="warn">${results.degenerate} degenerate output${results.degenerate === 1 ? "" : "s"} flagged (${escapeHtml(flags)}); they are listed in the transcripts (filter “flagged only”).</li>`);
  } else items.push(`<li>No degenerate outputs were flagged.</li>`);
  const planned = run.header.plannedTrials;
  if (planned !== run.trials.length) {
    items.push(`<li class="warn">The log holds ${run.trials.length} of ${planned} planned trials: the run is incomplete (or was resumed with a different plan).</li>`);
  }
  const failed = CRITERIA.filter((c) => results.failed[c] > 0).map((c) => `${c} ${results.failed[c]}`);
  if (failed.length > 0) {
    items.push(
      results.failed_judgments === "no"
        ? `<li class="warn">Failed judgments (${escapeHtml(failed.join(", "))}) are scored <b>NO</b> (<code>--failed-as-no</code>, as the paper's code did); the tables show both denominators.</li>`
        : `<li class="warn">Failed judgments (${escapeHtml(failed.join(", "))}) are <b>excluded</b> from n; <code>--failed-as-no</code> scores them NO as the paper's code did. The tables show both denominators.</li>`,
    );
  }
  const h = results.headline;
  items.push(
    h
      ? `<li>Headline: <b>${escapeHtml(configName(h))}</b>, the configuration with the ${escapeHtml(h.rule)}. Nothing is pooled across configurations or variants; every configuration is in the table and plots below. Intervals are Wilson 95%; “boot” intervals resample concepts.</li>`
      : `<li>No configuration in the log.</li>`,
  );
  return `<section class="notes"><h2>Honest notes</h2><ul>${items.join("")}</ul></section>`;
}

/** `other`: the headline configuration computed with the other failed-judgment policy (when any judgment failed). */
function headlineTable(results: Results, other: ConfigResults | null): string {
  const rows: [string, RateOut | null][] = [
    ["Detection (TPR)", results.tpr],
    ["False positives (FPR)", results.fpr],
    ["Introspection (detect ∧ identify)", results.introspection_rate],
    ["Detection accuracy", results.detection_accuracy],
    ["Identification | claim", results.identification_accuracy_given_claim],
    ["Identification, unconditional", results.identification_accuracy_unconditional],
    ["Forced identification", results.forced_identification_rate],
    ["Yes-bias", results.yes_bias_rate],
  ];
  const policy = results.failed_judgments;
  const anyFailed = other !== null;
  const otherRows: (RateOut | null)[] = other
    ? [other.tpr, other.fpr, other.introspection_rate, other.detection_accuracy, other.identification_accuracy_given_claim, other.identification_accuracy_unconditional, other.forced_identification_rate, other.yes_bias_rate]
    : [];
  const otherHead = policy === "no" ? "failures excluded" : "failures as NO";
  const head = `<tr><th>metric</th><th>estimate [95% CI]${anyFailed ? (policy === "no" ? " (failures as NO)" : " (failures excluded)") : ""}</th>${anyFailed ? `<th>${otherHead}</th>` : ""}</tr>`;
  const body = rows
    .map(([k, r], i) => {
      if (r === null) return `<tr><th>${escapeHtml(k)}</th><td class="num nodata" colspan="${anyFailed ? 2 : 1}">not measured (judge identification on every injection trial: <code>--identify-all</code>)</td></tr>`;
      return `<tr><th>${escapeHtml(k)}</th>${rateCell(r)}${anyFailed ? rateCell(otherRows[i] ?? undefined) : ""}</tr>`;
    })
    .join("");
  const hl = results.headline;
  const at = hl ? `<p class="muted small">At <b>${escapeHtml(configName(hl))}</b>: the configuration with the ${escapeHtml(hl.rule)}.${hl.note ? ` <span class="unj">Note: ${escapeHtml(hl.note)}.</span>` : ""}</p>` : "";
  return `${at}<table class="headline"><thead>${head}</thead><tbody>${body}<tr><th>Detection ~ forced ID (across concepts)</th>${correlationCell(results.detection_forced_correlation)}${anyFailed ? "<td></td>" : ""}</tr><tr><th>TPR &gt; FPR (one-sided Fisher)</th>${pCell(results.discrimination_p_value)}${anyFailed ? "<td></td>" : ""}</tr></tbody></table>
    <p class="muted small">Rates: estimate [Wilson 95% interval, in %], n = judged trials, +k? = k unjudged trials (excluded from n). Introspection = the model says it detects an injected thought <i>and</i> names the injected concept, over all injection trials. Correlation: Pearson r over concepts of P(detect | injection) and P(identify | forced), Fisher-z 95% interval. Trials in the whole log: ${results.n_trials.injection} injection, ${results.n_trials.control} control, ${results.n_trials.forced} forced, ${results.n_trials.yesbias} yes-bias.</p>`;
}

function configTable(results: Results): string {
  if (results.by_config.length === 0) return noData("no (layer, strength) configurations in the log");
  const best = results.headline?.per_variant ?? [];
  const boot = (b: { lo: number | null; hi: number | null } | null, note: string | null) => (b === null ? `<span title="${escapeHtml(note ?? "")}">—</span>` : `[${pct(b.lo)}, ${pct(b.hi)}]`);
  const body = results.by_config
    .map((c) => {
      const star = best.some((b) => sameConfig(b, c));
      return `<tr${star ? ` class="best"` : ""}><td>${star ? "★ " : ""}${fmtNum(c.layer)}</td><td>${fmtNum(c.strength)}</td><td>${escapeHtml(c.variant)}</td>${rateCell(c.tpr)}<td class="num ci">${boot(c.tpr_boot, c.boot_note)}</td>${rateCell(c.fpr)}${rateCell(c.introspection_rate)}<td class="num ci">${boot(c.introspection_boot, c.boot_note)}</td>${rateCell(c.detection_accuracy)}${rateCell(c.identification_accuracy_given_claim)}${c.identification_accuracy_unconditional ? rateCell(c.identification_accuracy_unconditional) : `<td class="num nodata">—</td>`}${rateCell(c.forced_identification_rate)}${correlationCell(c.detection_forced_correlation)}${rateCell(c.yes_bias_rate)}${pCell(c.discrimination_p_value)}</tr>`;
    })
    .join("");
  const notes = [...new Set(results.by_config.map((c) => c.boot_note).filter((n): n is string => n !== null))];
  const bootNote = notes.length > 0 ? `<p class="muted small">No concept-bootstrap interval (—) where: ${escapeHtml(notes.join("; "))}.</p>` : "";
  return `<p class="muted small">★ = best configuration of its variant by introspection rate (the paper's rule).</p><div class="scroll"><table class="grid rates"><thead><tr><th>layer</th><th>α</th><th>variant</th><th>TPR</th><th>TPR boot</th><th>FPR</th><th>introspection</th><th>intr. boot</th><th>detection acc.</th><th>ID | claim</th><th>ID (all)</th><th>forced ID</th><th>detection ~ forced ID</th><th>yes-bias</th><th>p (TPR&gt;FPR)</th></tr></thead><tbody>${body}</tbody></table></div>${bootNote}`;
}

/** The best configuration of each variant, side by side (variants asking different questions are never pooled). */
function variantTable(results: Results): string {
  const best = results.headline?.per_variant ?? [];
  if (best.length === 0) return noData("no trials");
  const body = best
    .map((b) => {
      const c = results.by_config.find((x) => sameConfig(x, b))!;
      return `<tr><td>${escapeHtml(c.variant)}</td><td>${fmtNum(c.layer)}</td><td>${fmtNum(c.strength)}</td>${rateCell(c.tpr)}${rateCell(c.fpr)}${rateCell(c.introspection_rate)}${rateCell(c.forced_identification_rate)}${pCell(c.discrimination_p_value)}</tr>`;
    })
    .join("");
  return `<div class="scroll"><table class="grid rates"><thead><tr><th>variant</th><th>best layer</th><th>best α</th><th>TPR</th><th>FPR</th><th>introspection</th><th>forced ID</th><th>p (TPR&gt;FPR)</th></tr></thead><tbody>${body}</tbody></table></div>`;
}

function conceptTable(results: Results): string {
  if (results.by_concept.length === 0) return "";
  const body = results.by_concept
    .map((c) => `<tr><td>${escapeHtml(c.concept)}</td>${rateCell(c.tpr)}${rateCell(c.introspection_rate)}${rateCell(c.forced_identification_rate)}</tr>`)
    .join("");
  return `<details><summary>All ${results.by_concept.length} concepts (table)</summary><div class="scroll tall"><table class="grid"><thead><tr><th>concept</th><th>TPR</th><th>introspection</th><th>forced ID</th></tr></thead><tbody>${body}</tbody></table></div></details>`;
}

// ---- transcripts ------------------------------------------------------------------------------------------

/** One trial as embedded for the transcript browser (short keys: the table can hold 10⁵ rows). */
interface EmbeddedTrial {
  id: string;
  k: string;
  c: string | null;
  l: number | null;
  s: number | null;
  v: string;
  t: number;
  n: number;
  q: string | null;
  f: string[];
  o: string;
  /** verdicts: detection, identification, forced_identification, yes_answer */
  j: (string | null)[];
}

function embeddedTrials(run: RunData, verdicts: Map<string, TrialVerdicts>): EmbeddedTrial[] {
  return run.trials.map((t: TrialRecord) => {
    const v = verdicts.get(t.id)!;
    return {
      id: t.id,
      k: t.kind,
      c: t.concept,
      l: t.layer,
      s: t.strength,
      v: t.variant,
      t: t.trialNumber,
      n: t.sample,
      q: t.question ?? null,
      f: t.flags,
      o: t.output,
      j: CRITERIA.map((c) => v[c]),
    };
  });
}

const TRANSCRIPT_SCRIPT = String.raw`
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("selfscope-data").textContent);
  var trials = data.trials;
  var CRIT = data.criteria;
  var PAGE = 200;
  var limit = PAGE;
  function $(id) { return document.getElementById(id); }
  var fConcept = $("f-concept"), fLayer = $("f-layer"), fStrength = $("f-strength"), fKind = $("f-kind"),
      fVariant = $("f-variant"), fVerdict = $("f-verdict"), fFlagged = $("f-flagged"), fText = $("f-text"),
      tbody = $("transcripts-body"), status = $("transcripts-status"), more = $("transcripts-more");
  var NONE = "__selfscope_none__";
  function key(x) { return x === null || x === undefined ? NONE : String(x); }
  function label(x) { return x === null || x === undefined ? "(none)" : String(x); }
  function fill(sel, values, numeric) {
    var seen = {};
    var list = [];
    values.forEach(function (x) { var k = key(x); if (!seen[k]) { seen[k] = true; list.push(x); } });
    list.sort(function (a, b) {
      if (a === null) return 1; if (b === null) return -1;
      return numeric ? a - b : String(a).localeCompare(String(b));
    });
    list.forEach(function (x) {
      var o = document.createElement("option");
      o.value = key(x); o.textContent = label(x); sel.appendChild(o);
    });
  }
  fill(fConcept, trials.map(function (t) { return t.c; }), false);
  fill(fLayer, trials.map(function (t) { return t.l; }), true);
  fill(fStrength, trials.map(function (t) { return t.s; }), true);
  fill(fKind, trials.map(function (t) { return t.k; }), false);
  fill(fVariant, trials.map(function (t) { return t.v; }), false);
  CRIT.forEach(function (c) {
    ["YES", "NO", "unjudged"].forEach(function (v) {
      var o = document.createElement("option");
      o.value = c + ":" + v; o.textContent = c + " " + v; fVerdict.appendChild(o);
    });
  });
  function matches(t) {
    if (fConcept.value !== "" && key(t.c) !== fConcept.value) return false;
    if (fLayer.value !== "" && key(t.l) !== fLayer.value) return false;
    if (fStrength.value !== "" && key(t.s) !== fStrength.value) return false;
    if (fKind.value !== "" && t.k !== fKind.value) return false;
    if (fVariant.value !== "" && t.v !== fVariant.value) return false;
    if (fVerdict.value !== "") {
      var parts = fVerdict.value.split(":");
      if (t.j[CRIT.indexOf(parts[0])] !== parts[1]) return false;
    }
    if (fFlagged.checked && t.f.length === 0) return false;
    var q = fText.value.trim().toLowerCase();
    if (q !== "" && t.o.toLowerCase().indexOf(q) < 0 && (t.q === null || t.q.toLowerCase().indexOf(q) < 0)) return false;
    return true;
  }
  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }
  function render() {
    var rows = trials.filter(matches);
    var shown = Math.min(rows.length, limit);
    var frag = document.createDocumentFragment();
    for (var i = 0; i < shown; i++) {
      var t = rows[i];
      var tr = document.createElement("tr");
      tr.setAttribute("data-id", t.id);
      cell(tr, t.k, "kind kind-" + t.k);
      cell(tr, label(t.c));
      cell(tr, label(t.l), "num");
      cell(tr, label(t.s), "num");
      cell(tr, t.v);
      cell(tr, String(t.t), "num");
      cell(tr, String(t.n), "num");
      for (var c = 0; c < CRIT.length; c++) {
        var v = t.j[c];
        cell(tr, v === null ? "\u2014" : v, v === null ? "na" : "v-" + v);
      }
      cell(tr, t.f.join(" "), t.f.length ? "flag" : "");
      var out = cell(tr, "", "out");
      if (t.q !== null) { var q = document.createElement("div"); q.className = "question"; q.textContent = "Q: " + t.q; out.appendChild(q); }
      var pre = document.createElement("div"); pre.className = "text"; pre.textContent = t.o === "" ? "(empty output)" : t.o; out.appendChild(pre);
      frag.appendChild(tr);
    }
    tbody.replaceChildren(frag);
    status.textContent = rows.length + " of " + trials.length + " trials match" + (shown < rows.length ? "; showing the first " + shown : "");
    more.hidden = shown >= rows.length;
  }
  [fConcept, fLayer, fStrength, fKind, fVariant, fVerdict, fFlagged].forEach(function (el) {
    el.addEventListener("change", function () { limit = PAGE; render(); });
  });
  fText.addEventListener("input", function () { limit = PAGE; render(); });
  more.addEventListener("click", function () { limit += PAGE; render(); });
  $("f-reset").addEventListener("click", function () {
    [fConcept, fLayer, fStrength, fKind, fVariant, fVerdict].forEach(function (el) { el.value = ""; });
    fFlagged.checked = false; fText.value = ""; limit = PAGE; render();
  });
  render();
})();
`;

function transcriptSection(): string {
  const sel = (id: string, label: string) => `<label>${label} <select id="${id}"><option value="">all</option></select></label>`;
  return `<section id="transcripts"><h2>Transcripts</h2>
<div class="filters">
${sel("f-concept", "concept")}${sel("f-layer", "layer")}${sel("f-strength", "strength")}${sel("f-kind", "kind")}${sel("f-variant", "variant")}${sel("f-verdict", "verdict")}
<label><input type="checkbox" id="f-flagged"> flagged only</label>
<label>text <input type="search" id="f-text" placeholder="search output"></label>
<button type="button" id="f-reset">reset</button>
</div>
<p id="transcripts-status" class="muted" aria-live="polite"></p>
<div class="scroll transcripts"><table class="grid" id="transcripts-table"><thead><tr><th>kind</th><th>concept</th><th>layer</th><th>α</th><th>variant</th><th>trial</th><th>sample</th><th>detection</th><th>identification</th><th>forced ID</th><th>yes answer</th><th>flags</th><th>output</th></tr></thead><tbody id="transcripts-body"></tbody></table></div>
<button type="button" id="transcripts-more" hidden>show more</button>
</section>`;
}

const CSS = `
:root { --fg: #1d2329; --muted: #5f6b76; --line: #dde2e7; --bg: #fff; --accent: #4c78a8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 Helvetica, Arial, sans-serif; color: var(--fg); background: #f5f7f9; }
main { max-width: 1280px; margin: 0 auto; padding: 20px 28px 60px; background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
code { font: 12px/1.3 ui-monospace, Menlo, Consolas, monospace; background: #f0f2f4; padding: 1px 4px; border-radius: 3px; word-break: break-all; }
.muted { color: var(--muted); } .small { font-size: 12px; }
.top { display: grid; grid-template-columns: minmax(0, 1.2fr) minmax(0, 1fr); gap: 24px; align-items: start; }
@media (max-width: 900px) { .top { grid-template-columns: 1fr; } }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0; font-size: 13px; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.notes { background: #fffbea; border: 1px solid #f0dc8c; border-radius: 6px; padding: 4px 16px 8px; }
.notes h2 { border: none; margin-top: 10px; }
.notes ul { padding-left: 18px; margin: 6px 0; } .notes li { margin: 4px 0; }
.notes li.warn::marker { content: "⚠ "; color: #b7791f; } .notes li.ok::marker { content: "✓ "; color: #2f855a; }
table { border-collapse: collapse; font-size: 13px; }
table.headline th, table.headline td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; }
table.grid th, table.grid td { padding: 3px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; white-space: nowrap; }
table.grid thead th { position: sticky; top: 0; background: #eef1f4; z-index: 1; }
td.num { font-variant-numeric: tabular-nums; }
table.rates td.num { white-space: normal; min-width: 8.5em; } table.rates td.num.ci { white-space: nowrap; min-width: 0; } td.sig { color: #2f855a; font-weight: bold; } tr.best td { background: #f0f7ee; }
.ci, .n { color: var(--muted); font-size: 12px; } .unj { color: #b7791f; font-size: 12px; }
.nodata, td.na { color: #9aa5b1; }
.nodata-box { padding: 18px; border: 1px dashed #c5cdd5; border-radius: 6px; color: var(--muted); background: #fafbfc; margin: 8px 0; }
.plot { margin: 10px 0 18px; overflow-x: auto; } .plot svg { max-width: none; display: block; }
.scroll { overflow: auto; max-width: 100%; } .scroll.tall { max-height: 480px; }
.filters { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; margin-bottom: 6px; font-size: 13px; }
.filters select, .filters input[type=search] { font: inherit; padding: 2px 4px; max-width: 180px; }
.scroll.transcripts { max-height: 640px; border: 1px solid var(--line); }
#transcripts-table td.out { white-space: normal; min-width: 360px; max-width: 640px; }
#transcripts-table .text { white-space: pre-wrap; font: 12px/1.35 ui-monospace, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
#transcripts-table .question { color: var(--muted); font-style: italic; margin-bottom: 2px; }
td.v-YES { color: #2f855a; font-weight: bold; } td.v-NO { color: #a0aec0; } td.v-unjudged { color: #b7791f; font-style: italic; }
td.flag { color: #c53030; } td.kind-injection { color: #2b6cb0; } td.kind-control { color: #4a5568; } td.kind-forced { color: #6b46c1; } td.kind-yesbias { color: #c05621; }
pre.config { font: 12px/1.35 ui-monospace, Menlo, Consolas, monospace; background: #f6f8fa; padding: 8px; max-height: 320px; overflow: auto; }
details summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
button { font: inherit; padding: 2px 10px; }
footer { margin-top: 30px; font-size: 12px; color: var(--muted); }
`;

/**
 * Render the report of a run as one self-contained HTML document (async: Vega renders plots
 * asynchronously). `results` must come from computeResults on the same run.
 */
export async function renderReport(run: RunData, results: Results): Promise<string> {
  const verdicts = trialVerdicts(run, results.judge);
  // Both denominators when any judgment failed: the headline config under the other policy too.
  const hl = results.headline;
  const other =
    hl && CRITERIA.some((c) => results.failed[c] > 0)
      ? (computeResults(run, { judge: results.judge, bootstrap: 0, failedAsNo: results.failed_judgments === "excluded" }).by_config.find((c) => sameConfig(c, hl)) ?? null)
      : null;
  const rows = sweepRows(results.by_config);
  const strengthPlot =
    rows.length === 0 ? noData("no judged injection or control trials") : await sweepPlot(rows, "strength", "layer", "Rates vs injection strength (one line per layer; bands: Wilson 95%)");
  const layerPlot = rows.length === 0 ? noData("no judged injection or control trials") : await sweepPlot(rows, "layer", "strength", "Layer sweep: rates vs layer (one line per strength; bands: Wilson 95%)");
  const missingSweep = SWEEP_METRICS.filter((m) => !rows.some((r) => r.metric === m.label)).map((m) => m.label);
  const fprNote = rows.some((r) => r.metric === FPR_LABEL)
    ? `<p class="muted small">FPR points are not joined: control trials carry no injection, so each point is a separate sample of the same condition, not a dependence on layer or strength.</p>`
    : "";
  const sweepNote = (rows.length > 0 && missingSweep.length > 0 ? `<p class="muted small">No data for: ${escapeHtml(missingSweep.join(", "))}.</p>` : "") + fprNote;
  const concept = await conceptPlot(results);
  const yesBias = await yesBiasPlot(results);

  const data = { criteria: CRITERIA, judge: results.judge, trials: embeddedTrials(run, verdicts) };
  const h = run.header;
  const title = `selfscope report — ${h.model.path.split(/[\\/]/).filter(Boolean).pop() ?? h.model.path}`;

  return htmlDocument({
    title,
    css: CSS,
    script: TRANSCRIPT_SCRIPT,
    body: `<main>
<h1>${escapeHtml(title)}</h1>
<p class="muted">Concept-injection run · created ${escapeHtml(h.createdAt)} · ${escapeHtml(h.tool.name)} ${escapeHtml(h.tool.version)} · judge <code>${escapeHtml(results.judge)}</code></p>
${aboutBlock(run, results)}
<div class="top">
<section><h2>Run</h2>${headerBlock(run)}</section>
<div>${notesBox(run, results)}<h2>Headline: best configuration</h2>${headlineTable(results, other)}</div>
</div>
<section><h2>Strength sweep</h2><div class="plot">${strengthPlot}</div>${sweepNote}</section>
<section><h2>Layer sweep</h2><div class="plot">${layerPlot}</div>${sweepNote}</section>
<section><h2>Per configuration</h2>${configTable(results)}</section>
<section><h2>Variants</h2><p class="muted small">Each variant at its own best configuration (highest introspection rate); variants are never pooled.</p>${variantTable(results)}</section>
<section><h2>Per concept</h2><div class="plot">${concept.svg}</div>${concept.note ? `<p class="muted small">${escapeHtml(concept.note)}</p>` : ""}${conceptTable(results)}</section>
<section><h2>Yes-bias control</h2><div class="plot">${yesBias}</div></section>
${transcriptSection()}
<footer>Generated by ${escapeHtml(h.tool.name)} ${escapeHtml(h.tool.version)}. Plots: Vega-Lite/Vega, rendered to static SVG. Self-contained: this file loads nothing from the network.</footer>
</main>
<script type="application/json" id="selfscope-data">${jsonForScript(data)}</script>`,
  });
}
