// `selfscope attention`: where the last prompt token attends as the injection strength grows (the
// paper's 13b, protocol §9.1): per layer, the attention probability mass from the last prompt
// position to BOS (position 0), to the injected positions (from the token before "Trial n" on) and
// to everything else, averaged over heads, for each strength (0 = unsteered).
import fs from "node:fs";
import path from "node:path";
import type { TopLevelSpec } from "vega-lite";
import type { Model } from "../model/model.js";
import { UsageError } from "../core/errors.js";
import { parseNumbers } from "../core/parse.js";
import { hookName } from "../hooks/names.js";
import type { Intervention } from "../hooks/plan.js";
import { getVariant, renderTrial } from "../eval/protocol.js";
import { escapeHtml, htmlPage, htmlTable, plotOrNote } from "../report/page.js";
import { meanCI, type MeanCI } from "./patch.js";
import { loadAnalysisModel, siteConfig, siteVectors, type SiteArgs } from "./site.js";

export type Region = "bos" | "injected" | "other";

export interface AttentionMass {
  /** Per layer: mass to each region, averaged over heads. */
  layers: Record<Region, number>[];
  /** Per layer and head: mass to the injected positions. */
  headsInjected: number[][];
}

/**
 * The last prompt position's attention mass per layer and region on one prompt. `pattern` rows are
 * [nHeads, kPos] at the read query position; heads are averaged with equal weight.
 */
export async function attentionMass(model: Model, ids: number[], injectFrom: number, plan: Intervention[]): Promise<AttentionMass> {
  const nL = model.config.nLayers, H = model.config.nHeads;
  const last = ids.length - 1;
  const reads: Intervention[] = Array.from({ length: nL }, (_, l) => ({ op: "read", at: hookName(l, "attn.hook_pattern"), pos: { from: last, to: last + 1 } }));
  const res = await model.forward([{ ids }], { plan: [...plan, ...reads], logits: "none" });
  const layers = [], headsInjected: number[][] = [];
  for (let l = 0; l < nL; l++) {
    const { data, shape } = res.cache.get(hookName(l, "attn.hook_pattern"), 0);
    const k = shape.at(-1)!;
    // The read holds one query position: [1, nHeads, kPos].
    const m = { bos: 0, injected: 0, other: 0 };
    const perHead = new Array<number>(H).fill(0);
    for (let h = 0; h < H; h++) {
      const off = (data.length - H * k) + h * k;
      for (let j = injectFrom; j < k; j++) perHead[h] = perHead[h]! + data[off + j]!;
      for (let j = 0; j < k; j++) {
        const p = data[off + j]!;
        if (j === 0) m.bos += p;
        else if (j >= injectFrom) m.injected += p;
        else m.other += p;
      }
    }
    layers.push({ bos: m.bos / H, injected: m.injected / H, other: m.other / H });
    headsInjected.push(perHead);
  }
  return { layers, headsInjected };
}

export interface AttentionArgs extends SiteArgs {
  /** Signed strengths (default 0,1,2,4,8; 0 = unsteered). */
  strengths?: string;
  trials?: number;
}

export interface AttentionResults {
  recipe: "attention";
  model: { path: string; family: string; nLayers: number; nHeads: number };
  layer: number;
  strengths: number[];
  concepts: string[];
  trials: number;
  /** rows: one per (strength, layer, region), mean over concepts (each the mean of its trials) ± 1.96·SEM. */
  rows: { strength: number; layer: number; region: Region; mass: MeanCI }[];
  /** Heads by |shift| of their mass to the injected positions from the smallest to the largest strength (mean over concepts). */
  head_shifts: { layer: number; head: number; from: number; to: number; shift: MeanCI }[];
  notes: string[];
}

export async function attentionCommand(a: AttentionArgs): Promise<AttentionResults> {
  const log = (m: string) => { if (!a.quiet) process.stderr.write(`[attention] ${m}\n`); };
  const model = await loadAnalysisModel(a);
  try {
    const nL = model.config.nLayers;
    // Strengths are this analysis's own list (signed, with 0), not inject's.
    const { cfg, layer: L } = siteConfig("attention", { ...a, strengths: undefined }, model);
    const strengths = a.strengths ? parseNumbers(a.strengths, "--strengths") : [0, 1, 2, 4, 8];
    const trials = a.trials ?? 3;
    if (!Number.isInteger(trials) || trials < 1) throw new UsageError("--trials must be a positive integer");
    log(`${cfg.concepts.length} concepts × ${trials} trials × strengths ${strengths.join(",")}, injection at blocks.${L}.hook_resid_post`);
    const vs = await siteVectors(model, cfg, L, a.vectorCache);
    // acc[strength][layer][region] = per-concept means
    const acc = strengths.map(() => Array.from({ length: nL }, () => ({ bos: [] as number[], injected: [] as number[], other: [] as number[] })));
    const H = model.config.nHeads;
    const lo = strengths.indexOf(Math.min(...strengths)), hi = strengths.indexOf(Math.max(...strengths));
    // headAcc[layer][head] = per-concept [mass at the smallest strength, at the largest].
    const headAcc = Array.from({ length: nL }, () => Array.from({ length: H }, () => [] as [number, number][]));
    for (const concept of cfg.concepts) {
      const sums = strengths.map(() => Array.from({ length: nL }, () => ({ bos: 0, injected: 0, other: 0 })));
      const hs = Array.from({ length: nL }, () => Array.from({ length: H }, () => [0, 0] as [number, number]));
      for (let n = 1; n <= trials; n++) {
        const p = renderTrial(model, getVariant("original"), n, { format: cfg.promptFormat, judgePrompt: "question" });
        for (let si = 0; si < strengths.length; si++) {
          const s = strengths[si]!;
          const plan: Intervention[] = s === 0 ? [] : [{ op: "add", at: hookName(L, "hook_resid_post"), vector: vs.get(concept)!, scale: s, pos: { from: p.injectFrom } }];
          const m = await attentionMass(model, p.ids, p.injectFrom, plan);
          m.layers.forEach((r, l) => { for (const k of ["bos", "injected", "other"] as const) sums[si]![l]![k] += r[k] / trials; });
          for (const [which, idx] of [[0, lo], [1, hi]] as const) if (si === idx) m.headsInjected.forEach((row, l) => row.forEach((x, h) => { hs[l]![h]![which] += x / trials; }));
        }
      }
      sums.forEach((byL, si) => byL.forEach((r, l) => { for (const k of ["bos", "injected", "other"] as const) acc[si]![l]![k].push(r[k]); }));
      hs.forEach((row, l) => row.forEach((x, h) => headAcc[l]![h]!.push(x)));
    }
    const headShifts = headAcc.flatMap((row, layer) => row.map((xs, head) => ({ layer, head, from: xs.reduce((s, x) => s + x[0], 0) / xs.length, to: xs.reduce((s, x) => s + x[1], 0) / xs.length, shift: meanCI(xs.map((x) => x[1] - x[0])) })));
    headShifts.sort((x, y) => Math.abs(y.shift.mean) - Math.abs(x.shift.mean) || x.layer - y.layer || x.head - y.head);
    const rows: AttentionResults["rows"] = [];
    strengths.forEach((strength, si) => acc[si]!.forEach((r, layer) => { for (const region of ["bos", "injected", "other"] as const) rows.push({ strength, layer, region, mass: meanCI(r[region]) }); }));
    const results: AttentionResults = {
      recipe: "attention",
      model: { path: a.model, family: model.family, nLayers: nL, nHeads: model.config.nHeads },
      layer: L,
      strengths,
      concepts: cfg.concepts,
      trials,
      rows,
      head_shifts: headShifts.slice(0, 16),
      notes: ["Injected positions: from the token before \"Trial n\" to the last prompt token (itself included); BOS: position 0; heads weighted equally. Layers before the injection layer cannot change with strength."],
    };
    fs.mkdirSync(a.out, { recursive: true });
    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    fs.writeFileSync(path.join(a.out, "report.html"), await attentionReport(results));
    return results;
  } finally {
    model.dispose();
  }
}

function massSpec(r: AttentionResults, region: Region): TopLevelSpec {
  const rows = r.rows.filter((x) => x.region === region).map((x) => ({ layer: x.layer, strength: String(x.strength), mass: x.mass.mean, lo: x.mass.lo, hi: x.mass.hi }));
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: { text: `Attention mass from the last prompt token to ${region} positions`, anchor: "start", fontSize: 14 },
    data: { values: rows },
    width: 360,
    height: 200,
    layer: [
      { mark: { type: "errorband" }, encoding: { x: { field: "layer", type: "quantitative", axis: { tickMinStep: 1 } }, y: { field: "lo", type: "quantitative", title: "mass", scale: { domain: [0, 1] } }, y2: { field: "hi" }, color: { field: "strength", type: "ordinal" } } },
      { mark: { type: "line", point: true }, encoding: { x: { field: "layer", type: "quantitative" }, y: { field: "mass", type: "quantitative" }, color: { field: "strength", type: "ordinal", title: "strength" } } },
    ],
  } as TopLevelSpec;
}

export async function attentionReport(r: AttentionResults): Promise<string> {
  const f = (x: MeanCI) => `${x.mean.toFixed(3)} [${x.lo.toFixed(3)}, ${x.hi.toFixed(3)}]`;
  const plots = [];
  for (const region of ["bos", "injected", "other"] as const) plots.push(await plotOrNote(r.rows, () => massSpec(r, region), "no rows"));
  return htmlPage(`selfscope attention — ${r.model.path.split(/[\\/]/).filter(Boolean).pop() ?? r.model.path}`, `injection at blocks.${r.layer}.hook_resid_post · ${r.concepts.length} concepts × ${r.trials} trials`, [
    { title: "Attention routing versus strength", html: plots.join("\n") + r.notes.map((n) => `<p class="note">${escapeHtml(n)}</p>`).join("") },
    { title: `Heads whose mass to the injected positions moves most (strength ${Math.min(...r.strengths)} → ${Math.max(...r.strengths)})`, html: htmlTable(["layer", "head", "mass at the smallest strength", "at the largest", "shift (mean ± 1.96·SEM over concepts)"], r.head_shifts.map((h) => [h.layer, h.head, h.from.toFixed(3), h.to.toFixed(3), f(h.shift)])) },
    { title: "Table", html: htmlTable(["strength", "layer", "region", "mass (mean ± 1.96·SEM over concepts)"], r.rows.map((x) => [x.strength, x.layer, x.region, f(x.mass)])) },
  ]);
}
