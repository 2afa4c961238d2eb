// `selfscope patch`: component knock-out / knock-in (protocol §9.1; the paper's 06_activation_patching.py
// and 13_component_attribution.py Section A). One forward pass per configuration, no generation; the
// metric is read at the last prompt position.
//
// - Steered run: the concept vector added at blocks.L.hook_resid_post from the protocol's injection
//   position on. Unsteered run: the same prompt without it.
// - Knock-out (necessity) of a component: the steered run with that component's output replaced by
//   its output in the unsteered run of the same trial prompt. Knock-in (sufficiency): the unsteered
//   run with the component's output taken from the steered run.
// - Components: attention output (hook_attn_out) and MLP output (hook_mlp_out) of every layer after
//   L, and the residual stream (hook_resid_post) as a reference: knocking in the residual at L is the
//   whole injection (= the steered run), knocking it out at any layer ≥ L removes it (= unsteered).
// - Detection metric: the Yes/No logit gap, logsumexp over the single-token spellings of Yes minus No.
//   Different on purpose where a vocabulary has no single-token spelling (tok512 spells " Yes" as
//   ▁ Y es): the gap is then between log-probabilities of the spellings' token sequences
//   (teacher-forced, logsumexp over spellings), and results.json says so. Identification metric
//   (forced prompt): log-probability of the concept's first token, as the paper.
import type { BlockSite, HookName } from "../hooks/names.js";
import { hookName } from "../hooks/names.js";
import type { Intervention, PosSpec } from "../hooks/plan.js";
import fs from "node:fs";
import path from "node:path";
import type { TopLevelSpec } from "vega-lite";
import type { Model } from "../model/model.js";
import { UsageError } from "../core/errors.js";
import { parseLayers } from "../core/parse.js";
import { FORCED_PREFILL, getVariant, renderTrial } from "../eval/protocol.js";
import { escapeHtml, htmlPage, htmlTable, plotOrNote } from "../report/page.js";
import { VEGA_LITE } from "../report/plots.js";
import { loadAnalysisModel, siteConfig, siteVectors, type SiteArgs } from "./site.js";

export type Component = "attn" | "mlp" | "resid";
export const COMPONENT_SITE: Record<Component, BlockSite> = { attn: "hook_attn_out", mlp: "hook_mlp_out", resid: "hook_resid_post" };
export type PatchMode = "knock-out" | "knock-in";

export interface PatchCell {
  layer: number;
  component: Component;
  mode: PatchMode;
}

/** A scalar read off a prompt: token sequences scored after it, combined into one number. */
export interface Scorer {
  /** Token sequences whose teacher-forced log-probabilities after the prompt are needed. */
  seqs: number[][];
  combine: (logProbs: readonly number[]) => number;
  /** What the number is, for results.json. */
  describe: string;
}

const YES = ["Yes", " Yes", "yes", " yes", "YES", " YES"];
const NO = ["No", " No", "no", " no", "NO", " NO"];

function logSumExp(xs: readonly number[]): number {
  const m = Math.max(...xs);
  if (!Number.isFinite(m)) return m;
  let s = 0;
  for (const x of xs) s += Math.exp(x - m);
  return m + Math.log(s);
}

/** The tokens `text` adds after `promptText` (null when the tokenization of the prompt itself changes). */
function continuation(model: Model, promptText: string, promptIds: readonly number[], text: string): number[] | null {
  const full = model.tokenizer!.encode(promptText + text, { addSpecial: false });
  if (full.length <= promptIds.length || promptIds.some((t, i) => full[i] !== t)) return null;
  return full.slice(promptIds.length);
}

/**
 * The Yes/No logit gap after a prompt. The paper's: single-token spellings (tokens that decode to
 * exactly one spelling). Without any on either side, sequence log-probabilities of the spellings
 * that continue the prompt's tokens (`multiToken` true).
 */
export function gapScorer(model: Model, promptText: string, promptIds: readonly number[]): Scorer & { multiToken: boolean; nYes: number } {
  const tok = model.tokenizer!;
  const single = (words: string[]) => {
    const ids = new Set<number>();
    for (const w of words) {
      const e = tok.encode(w, { addSpecial: false });
      // A spelling is single-token when encoding it alone gives one token (ignoring a SentencePiece dummy-prefix piece).
      const pieces = e.filter((id) => tok.decode([id]).length > 0 && tok.decode([id]) !== " ");
      if (pieces.length === 1 && e.length <= 2) ids.add(pieces[0]!);
    }
    return [...ids];
  };
  const y = single(YES), n = single(NO);
  if (y.length > 0 && n.length > 0) {
    return { seqs: [...y.map((t) => [t]), ...n.map((t) => [t])], combine: (lp) => logSumExp(lp.slice(0, y.length)) - logSumExp(lp.slice(y.length)), describe: `logsumexp over ${y.length} single-token Yes spellings minus ${n.length} No spellings (protocol §9.1)`, multiToken: false, nYes: y.length };
  }
  const seqsOf = (words: string[]) => {
    const out: number[][] = [];
    for (const w of words) {
      const c = continuation(model, promptText, promptIds, w);
      if (c && !out.some((o) => o.length === c.length && o.every((t, i) => t === c[i]))) out.push(c);
    }
    return out;
  };
  const ys = seqsOf(YES), ns = seqsOf(NO);
  if (ys.length === 0 || ns.length === 0) throw new UsageError(`${model.files.path}: no spelling of Yes/No continues the prompt's tokens; the logit gap is undefined for this tokenizer`);
  return {
    seqs: [...ys, ...ns],
    combine: (lp) => logSumExp(lp.slice(0, ys.length)) - logSumExp(lp.slice(ys.length)),
    describe: `no single-token Yes/No in this vocabulary: logsumexp of the sequence log-probabilities of ${ys.length} Yes and ${ns.length} No spellings (teacher-forced); protocol §9.1 uses single tokens`,
    multiToken: true,
    nYes: ys.length,
  };
}

/** Log-probability of the concept's first token after the forced prompt (tries " c", "c", " c.lower()", as the paper). */
export function conceptScorer(model: Model, promptText: string, promptIds: readonly number[], concept: string): Scorer {
  for (const s of [` ${concept}`, concept, ` ${concept.toLowerCase()}`]) {
    const c = continuation(model, promptText, promptIds, s);
    if (c) return { seqs: [[c[0]!]], combine: (lp) => lp[0]!, describe: "log-probability of the concept's first token (protocol §9.1)" };
  }
  throw new UsageError(`concept "${concept}": no spelling continues the forced prompt's tokens`);
}

export interface PatchTrialInput {
  ids: number[];
  injectFrom: number;
  /** The injected vector (already a concept vector; scaled by strength). */
  vector: Float32Array;
  strength: number;
  /** Injection layer L (blocks.L.hook_resid_post). */
  layer: number;
  scorer: Scorer;
  cells: readonly PatchCell[];
  /** Patch every position ("all") or only the last prompt position ("last"). */
  positions: "all" | "last";
  batchSize: number;
}

export interface PatchTrialResult {
  steered: number;
  unsteered: number;
  /** One value per cell, in the input's order. */
  cells: number[];
}

/** Teacher-forced rows: the prompt alone scores single tokens; a k-token sequence needs the prompt plus its first k-1 tokens. */
function rowsFor(ids: readonly number[], seqs: readonly number[][]): { rows: number[][]; where: { row: number; first: number }[] } {
  // A row serves every sequence whose prefix it extends (causal: later tokens do not change earlier logits).
  const needs = seqs.map((s) => s.slice(0, -1));
  const rows: number[][] = [];
  for (const n of [...needs].sort((a, b) => b.length - a.length)) {
    if (!rows.some((r) => n.every((t, j) => r[ids.length + j] === t))) rows.push([...ids, ...n]);
  }
  const where = needs.map((n) => ({ row: rows.findIndex((r) => n.every((t, j) => r[ids.length + j] === t)), first: ids.length - 1 }));
  return { rows, where };
}

function logSoftmaxAt(logits: Float32Array, vocab: number, pos: number, token: number): number {
  const off = pos * vocab;
  let m = -Infinity;
  for (let i = 0; i < vocab; i++) m = Math.max(m, logits[off + i]!);
  let s = 0;
  for (let i = 0; i < vocab; i++) s += Math.exp(logits[off + i]! - m);
  return logits[off + token]! - m - Math.log(s);
}

/** Knock-out / knock-in of every cell on one trial prompt (all rows batched). */
export async function patchTrial(model: Model, o: PatchTrialInput): Promise<PatchTrialResult> {
  const nL = model.config.nLayers;
  for (const c of o.cells) {
    if (!Number.isInteger(c.layer) || c.layer < 0 || c.layer >= nL) throw new UsageError(`patch: layer ${c.layer} is outside 0..${nL - 1}`);
  }
  const { rows, where } = rowsFor(o.ids, o.scorer.seqs);
  const vocab = model.config.dVocab;
  const needAll = rows.length > 1;
  const inject = (b: number): Intervention => ({ op: "add", at: hookName(o.layer, "hook_resid_post"), vector: o.vector, scale: o.strength, pos: { from: o.injectFrom }, rows: [b] });
  const sites = [...new Set(o.cells.map((c) => hookName(c.layer, COMPONENT_SITE[c.component])))];
  const lastPos = o.ids.length - 1;
  const scope: PosSpec = o.positions === "last" ? { from: lastPos, to: lastPos + 1 } : { from: 0 };

  // Batched forward over (row, plan) jobs; returns each job's logits ("all" or "last").
  const run = async (jobs: { row: number; plan: (b: number) => Intervention[] }[], read: boolean) => {
    const out: { logits: Float32Array; reads: Map<HookName, Float32Array> }[] = [];
    for (let i = 0; i < jobs.length; i += o.batchSize) {
      const chunk = jobs.slice(i, i + o.batchSize);
      const plan: Intervention[] = [];
      chunk.forEach((j, b) => {
        plan.push(...j.plan(b));
        if (read) for (const s of sites) plan.push({ op: "read", at: s, pos: { from: 0 }, rows: [b] });
      });
      const res = await model.forward(chunk.map((j) => ({ ids: rows[j.row]! })), { plan, logits: needAll ? "all" : "last" });
      chunk.forEach((_, b) => {
        const reads = new Map<HookName, Float32Array>();
        if (read) for (const s of sites) reads.set(s, res.cache.get(s, b).data);
        out.push({ logits: res.logits[b]!, reads });
      });
    }
    return out;
  };
  const score = (perRow: readonly Float32Array[]) =>
    o.scorer.combine(
      o.scorer.seqs.map((s, k) => {
        const w = where[k]!;
        const lg = perRow[w.row]!;
        let lp = 0;
        s.forEach((t, j) => (lp += logSoftmaxAt(lg, vocab, needAll ? w.first + j : 0, t)));
        return lp;
      }),
    );

  const R = rows.length;
  const base = await run(
    [...rows.map((_, row) => ({ row, plan: () => [] as Intervention[] })), ...rows.map((_, row) => ({ row, plan: (b: number) => [inject(b)] }))],
    true,
  );
  const unsteered = base.slice(0, R), steered = base.slice(R);
  const jobs: { row: number; plan: (b: number) => Intervention[] }[] = [];
  for (const c of o.cells) {
    const at = hookName(c.layer, COMPONENT_SITE[c.component]);
    for (let row = 0; row < R; row++) {
      const source = (c.mode === "knock-out" ? unsteered : steered)[row]!.reads.get(at)!;
      jobs.push({ row, plan: (b) => [...(c.mode === "knock-out" ? [inject(b)] : []), { op: "patch", at, source, pos: scope, rows: [b] }] });
    }
  }
  const patched = await run(jobs, false);
  return {
    unsteered: score(unsteered.map((x) => x.logits)),
    steered: score(steered.map((x) => x.logits)),
    cells: o.cells.map((_, i) => score(patched.slice(i * R, (i + 1) * R).map((x) => x.logits))),
  };
}

/** Cells for every layer after L (or `layers`) and component, in both modes. */
export function cellsFor(nLayers: number, injectLayer: number, components: readonly Component[], layers?: readonly number[]): PatchCell[] {
  const ls = layers ?? Array.from({ length: nLayers - injectLayer - 1 }, (_, i) => injectLayer + 1 + i);
  const out: PatchCell[] = [];
  for (const mode of ["knock-out", "knock-in"] as const) for (const layer of ls) for (const component of components) out.push({ layer, component, mode });
  return out;
}

// ---------------------------------------------------------------- the command

export interface PatchArgs extends SiteArgs {
  /** Injection strength (one). */
  strengths?: string;
  /** Trials (trial numbers 1..n) per concept. */
  trials?: number;
  positions?: string;
  /** Comma-separated components: attn, mlp (default both); resid adds the residual-stream reference. */
  components?: string;
  /** Layers whose components are patched (default: every layer after the injection layer). */
  patchLayers?: string;
  /** Also the forced prompt and the concept-token metric (default on; --no-forced turns it off). */
  noForced?: boolean;
  batchSize?: number;
  seed?: number;
}

/** Mean over concepts (each the mean over its trials) with a 1.96·SEM interval, as 06/13 plot them. */
export interface MeanCI {
  mean: number;
  lo: number;
  hi: number;
  n: number;
}

export function meanCI(xs: readonly number[]): MeanCI {
  const n = xs.length;
  const mean = xs.reduce((a, b) => a + b, 0) / n;
  if (n < 2) return { mean, lo: mean, hi: mean, n };
  const sd = Math.sqrt(xs.reduce((a, x) => a + (x - mean) ** 2, 0) / (n - 1));
  const h = (1.96 * sd) / Math.sqrt(n);
  return { mean, lo: mean - h, hi: mean + h, n };
}

export interface CellResult extends PatchCell {
  value: MeanCI;
  /** Per concept, the cell minus the baseline it starts from (steered for knock-out, unsteered for knock-in). */
  delta: MeanCI;
  /**
   * Share of the steering effect the cell accounts for, on the means: knock-out (steered − cell)/(steered −
   * unsteered), knock-in (cell − unsteered)/(steered − unsteered). 1 = all of it; null when steering moves nothing.
   */
  recovered: number | null;
  /** The delta's interval excludes 0. */
  significant: boolean;
}

export interface MetricResult {
  metric: "logit_gap" | "concept_logprob";
  describe: string;
  steered: MeanCI;
  unsteered: MeanCI;
  cells: CellResult[];
  /** Components whose knock-out removes ≥ half the effect, significantly. */
  necessary: string[];
  /** Components whose knock-in restores ≥ half the effect, significantly. */
  sufficient: string[];
}

export interface PatchResults {
  recipe: "patch";
  model: { path: string; family: string; nLayers: number; dModel: number };
  layer: number;
  strength: number;
  positions: "all" | "last";
  concepts: string[];
  trials: number;
  prompt_format: string;
  metrics: MetricResult[];
  notes: string[];
  seconds: number;
}

const cellName = (c: PatchCell) => `L${c.layer} ${c.component}`;

export function summarise(metric: MetricResult["metric"], describe: string, perConcept: { steered: number[]; unsteered: number[]; cells: number[][] }, cells: readonly PatchCell[]): MetricResult {
  const steered = meanCI(perConcept.steered), unsteered = meanCI(perConcept.unsteered);
  const effect = steered.mean - unsteered.mean;
  const out: CellResult[] = cells.map((c, i) => {
    const vals = perConcept.cells.map((row) => row[i]!);
    const from = c.mode === "knock-out" ? perConcept.steered : perConcept.unsteered;
    const delta = meanCI(vals.map((v, k) => v - from[k]!));
    const value = meanCI(vals);
    const recovered = Math.abs(effect) < 1e-9 ? null : c.mode === "knock-out" ? (steered.mean - value.mean) / effect : (value.mean - unsteered.mean) / effect;
    return { ...c, value, delta, recovered, significant: delta.n > 1 && (delta.lo > 0 || delta.hi < 0) };
  });
  const pick = (mode: PatchMode) => out.filter((c) => c.mode === mode && c.component !== "resid" && c.significant && (c.recovered ?? 0) >= 0.5).map(cellName);
  return { metric, describe, steered, unsteered, cells: out, necessary: pick("knock-out"), sufficient: pick("knock-in") };
}

export async function patchCommand(a: PatchArgs): Promise<PatchResults> {
  const t0 = performance.now();
  const log = (m: string) => { if (!a.quiet) process.stderr.write(`[patch] ${m}\n`); };
  const positions = a.positions ?? "all";
  if (positions !== "all" && positions !== "last") throw new UsageError(`--positions ${positions}: use all or last`);
  const components = (a.components ?? "attn,mlp").split(",").map((s) => s.trim()) as Component[];
  for (const c of components) if (!(c in COMPONENT_SITE)) throw new UsageError(`--components: unknown component "${c}"; use attn, mlp, resid`);
  const model = await loadAnalysisModel(a);
  try {
    const nL = model.config.nLayers;
    const { cfg, layer: L } = siteConfig("patch", a, model);
    if (cfg.strengths.length !== 1) throw new UsageError(`patch: one strength, got ${cfg.strengths.length} (--strengths)`);
    const strength = cfg.strengths[0]!;
    if (L >= nL - 1) throw new UsageError(`patch: the injection layer ${L} is the last one; no component comes after it`);
    const patchLayers = a.patchLayers ? parseLayers(a.patchLayers, nL, "--patch-layers") : undefined;
    const cells = cellsFor(nL, L, components, patchLayers);
    const trials = a.trials ?? 3;
    if (!Number.isInteger(trials) || trials < 1) throw new UsageError("--trials must be a positive integer");
    const variant = getVariant("original");
    const notes: string[] = [];
    if (cfg.promptFormat === "raw") notes.push("raw base-model dialogue (no chat template): prompts and concept vectors as `selfscope inject --prompt-format raw`");
    log(`${cfg.concepts.length} concepts × ${trials} trials, injection at blocks.${L}.hook_resid_post × ${strength}, ${cells.length} cells, positions ${positions}`);
    const vs = await siteVectors(model, cfg, L, a.vectorCache);
    fs.mkdirSync(a.out, { recursive: true });
    const trialLog = fs.openSync(path.join(a.out, "trials.jsonl"), "w");
    const forced = !a.noForced;
    const acc = { gap: { steered: [] as number[], unsteered: [] as number[], cells: [] as number[][] }, id: { steered: [] as number[], unsteered: [] as number[], cells: [] as number[][] } };
    let gapDescribe = "", idDescribe = "";
    try {
      for (const concept of cfg.concepts) {
        const per = { gap: [] as PatchTrialResult[], id: [] as PatchTrialResult[] };
        for (let n = 1; n <= trials; n++) {
          const q = renderTrial(model, variant, n, { format: cfg.promptFormat, judgePrompt: "question" });
          const gs = gapScorer(model, q.text, q.ids);
          gapDescribe = gs.describe;
          const common = { vector: vs.get(concept)!, strength, layer: L, cells, positions: positions as "all" | "last", batchSize: a.batchSize ?? 16 };
          const g = await patchTrial(model, { ...common, ids: q.ids, injectFrom: q.injectFrom, scorer: gs });
          per.gap.push(g);
          fs.writeSync(trialLog, JSON.stringify({ concept, trial: n, metric: "logit_gap", ...g }) + "\n");
          if (forced) {
            const f = renderTrial(model, variant, n, { format: cfg.promptFormat, judgePrompt: "question", prefill: FORCED_PREFILL });
            const cs = conceptScorer(model, f.text, f.ids, concept);
            idDescribe = cs.describe;
            const r = await patchTrial(model, { ...common, ids: f.ids, injectFrom: f.injectFrom, scorer: cs });
            per.id.push(r);
            fs.writeSync(trialLog, JSON.stringify({ concept, trial: n, metric: "concept_logprob", ...r }) + "\n");
          }
        }
        for (const k of ["gap", "id"] as const) {
          const rs = per[k];
          if (rs.length === 0) continue;
          const mean = (f: (r: PatchTrialResult) => number) => rs.reduce((s, r) => s + f(r), 0) / rs.length;
          acc[k].steered.push(mean((r) => r.steered));
          acc[k].unsteered.push(mean((r) => r.unsteered));
          acc[k].cells.push(cells.map((_, i) => mean((r) => r.cells[i]!)));
        }
        log(`${concept}: gap steered ${acc.gap.steered.at(-1)!.toFixed(3)} unsteered ${acc.gap.unsteered.at(-1)!.toFixed(3)}`);
      }
    } finally {
      fs.closeSync(trialLog);
    }
    const metrics = [summarise("logit_gap", gapDescribe, acc.gap, cells)];
    if (forced) metrics.push(summarise("concept_logprob", idDescribe, acc.id, cells));
    if (cfg.concepts.length < 2) notes.push("one concept: no intervals (they are over concepts)");
    const results: PatchResults = {
      recipe: "patch",
      model: { path: a.model, family: model.family, nLayers: nL, dModel: model.config.dModel },
      layer: L,
      strength,
      positions: positions as "all" | "last",
      concepts: cfg.concepts,
      trials,
      prompt_format: cfg.promptFormat ?? "chat",
      metrics,
      notes,
      seconds: (performance.now() - t0) / 1000,
    };
    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    fs.writeFileSync(path.join(a.out, "report.html"), await patchReport(results));
    return results;
  } finally {
    model.dispose();
  }
}

/** One line per metric: what is necessary and sufficient. */
export function patchSummary(r: PatchResults): string {
  return r.metrics
    .map((m) => `${m.metric}: steered ${m.steered.mean.toFixed(3)}, unsteered ${m.unsteered.mean.toFixed(3)}; necessary: ${m.necessary.join(", ") || "none"}; sufficient: ${m.sufficient.join(", ") || "none"}`)
    .join("\n");
}


function curveSpec(m: MetricResult, mode: PatchMode): TopLevelSpec {
  const rows = m.cells.filter((c) => c.mode === mode).map((c) => ({ layer: c.layer, component: c.component, value: c.value.mean, lo: c.value.lo, hi: c.value.hi }));
  const rules = [
    { label: "steered", y: m.steered.mean },
    { label: "unsteered", y: m.unsteered.mean },
  ];
  return {
    $schema: VEGA_LITE,
    title: { text: `${mode} — ${m.metric} (mean over concepts, ±1.96·SEM)`, anchor: "start", fontSize: 14 },
    width: 380,
    height: 220,
    layer: [
      { data: { values: rows }, mark: { type: "errorband" }, encoding: { x: { field: "layer", type: "quantitative", axis: { tickMinStep: 1 } }, y: { field: "lo", type: "quantitative", title: m.metric }, y2: { field: "hi" }, color: { field: "component", type: "nominal" } } },
      { data: { values: rows }, mark: { type: "line", point: true }, encoding: { x: { field: "layer", type: "quantitative" }, y: { field: "value", type: "quantitative" }, color: { field: "component", type: "nominal" } } },
      { data: { values: rules }, mark: { type: "rule", strokeDash: [4, 3] }, encoding: { y: { field: "y", type: "quantitative" }, color: { value: "#555" } } },
      { data: { values: rules }, mark: { type: "text", align: "left", dx: 3, dy: -6 }, encoding: { y: { field: "y", type: "quantitative" }, x: { value: 0 }, text: { field: "label" } } },
    ],
  } as TopLevelSpec;
}

export async function patchReport(r: PatchResults): Promise<string> {
  const f = (x: MeanCI) => `${x.mean.toFixed(3)} [${x.lo.toFixed(3)}, ${x.hi.toFixed(3)}]`;
  const sections = [];
  for (const m of r.metrics) {
    const table = htmlTable(
      ["mode", "layer", "component", "value", "Δ vs its baseline", "share of the steering effect", "significant"],
      m.cells.map((c) => [c.mode, c.layer, c.component, f(c.value), f(c.delta), c.recovered === null ? null : `${(100 * c.recovered).toFixed(0)}%`, c.significant ? "yes" : "no"]),
    );
    sections.push({
      title: m.metric === "logit_gap" ? "Detection: Yes/No logit gap" : "Identification: concept first-token log-probability (forced prompt)",
      html: `<p>${escapeHtml(m.describe)}. Steered ${escapeHtml(f(m.steered))}, unsteered ${escapeHtml(f(m.unsteered))} (n = ${m.steered.n} concepts).</p>
<p><b>Necessary</b> (knock-out removes ≥ 50% of the effect, interval excludes 0): ${escapeHtml(m.necessary.join(", ") || "none")}. <b>Sufficient</b> (knock-in restores ≥ 50%): ${escapeHtml(m.sufficient.join(", ") || "none")}.</p>
${await plotOrNote(m.cells.filter((c) => c.mode === "knock-out"), () => curveSpec(m, "knock-out"), "no knock-out cells")}
${await plotOrNote(m.cells.filter((c) => c.mode === "knock-in"), () => curveSpec(m, "knock-in"), "no knock-in cells")}
${table}`,
    });
  }
  sections.push({
    title: "How to read this",
    html: `<p>Knock-out: the steered run with one component's output replaced by its unsteered value (${r.positions === "all" ? "all positions" : "the last prompt position"}); a drop toward the unsteered line means the component is necessary. Knock-in: the unsteered run with the component's steered output; a rise toward the steered line means it is sufficient. Intervals are over concepts (each the mean of its ${r.trials} trials), so they say nothing about other concepts or prompts. Components patched one at a time: effects that need two components together are not seen.</p>${r.notes.map((n) => `<p class="note">${escapeHtml(n)}</p>`).join("")}`,
  });
  return htmlPage(`selfscope patch — ${r.model.path.split(/[\\/]/).filter(Boolean).pop() ?? r.model.path}`, `injection at blocks.${r.layer}.hook_resid_post × ${r.strength} · ${r.concepts.length} concepts × ${r.trials} trials · ${r.model.family}, ${r.model.nLayers} layers`, sections);
}
