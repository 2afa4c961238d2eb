// Steering attribution (protocol §9.4; the paper's 16 / 17): how much of the injection's effect on
// the Yes/No logit gap each transcoder feature carries.
//
// For a transcoder on block ℓ's MLP (ℓ after the injection layer), at strength α:
//   SG(f, p) = d a_f(p) / dα         forward mode (jvpScale) through the encoder; 0 where f is off
//   GA(f, p) = w_dec,f · d gap / d mlp_out(p)          the backward pass
//   SA(f)    = Σ_p GA(f, p) · SG(f, p)
// Block ℓ's output resid_post = resid_mid + mlp_out is a cut of the network after the injection, so
//   d gap / dα = Σ_p g(p) · d resid_mid(p)/dα  +  Σ_f SA(f)  +  skip  +  error
// exactly, where g = d gap / d resid_post(ℓ), "skip" is the transcoder's affine skip and "error" the
// part of d mlp_out/dα the transcoder does not reconstruct (its error node). The left side comes
// from the injection's own gradient (a `scale` parameter), the right from the forward tangents: the
// test checks they agree. The residual (unexplained) attribution is upstream + error.
// ISA(f) = ∫₀^α SA(f) dα by the trapezoid rule over the strengths given (they must include 0).
//
// The graph: nodes are the injection, the top features of each layer (size |ISA|) and the gap.
// A feature→feature edge (c in an earlier layer, g later) is the part of g's attribution that c
// feeds directly along the residual stream at the same position:
//   Σ_p GA(g, p) · 1[g on at p] · (w_dec,c · w_enc,g) · SG(c, p), integrated over α;
// paths through attention and other features are not edges (they stay in the nodes' totals).
import fs from "node:fs";
import path from "node:path";
import type { Model } from "../model/model.js";
import { UsageError } from "../core/errors.js";
import { parseNumbers } from "../core/parse.js";
import { getVariant, renderTrial } from "../eval/protocol.js";
import { escapeHtml, htmlDocument, htmlTable } from "../report/page.js";
import { loadAny } from "./features.js";
import { loadAnalysisModel, siteConfig, siteVectors, type SiteArgs } from "./site.js";
import { hookName, parseHook } from "../hooks/names.js";
import { encode, type Dictionary } from "../vectors/dictionary.js";
import { gapGrad, gapSpellings, type GapSpellings } from "./gap-grad.js";

export interface SpellingTerm {
  /** Signed weight of this spelling in d gap (gap-grad.ts). */
  weight: number;
  /** SG and GA per position and feature ([positions, dSae], zero where the feature is off) and the activations. */
  sg: Float64Array;
  ga: Float64Array;
  acts: Float32Array;
}

export interface LayerAttribution {
  layer: number;
  /** Σ_p SA(f, p) [dSae] (weighted over the gap's spellings). */
  sa: Float64Array;
  upstream: number;
  skip: number;
  error: number;
  terms: SpellingTerm[];
}

export interface StrengthAttribution {
  alpha: number;
  gap: number;
  /** d gap / dα from the backward pass. */
  total: number;
  layers: LayerAttribution[];
}

function checkDict(model: Model, d: Dictionary, injectLayer: number): number {
  const { dModel, nLayers } = model.config;
  if (d.dIn !== dModel || d.dOut !== dModel) throw new UsageError(`${d.source}: d_in ${d.dIn} / d_out ${d.dOut} do not match the model's d_model ${dModel}`);
  const out = parseHook(d.outputSite, nLayers);
  if (out.site !== "hook_mlp_out" || out.layer === null) throw new UsageError(`${d.source}: steering attribution needs a transcoder writing a block's MLP output (hook_mlp_out), not ${d.outputSite}`);
  if (out.layer <= injectLayer) throw new UsageError(`${d.source}: transcodes block ${out.layer}'s MLP, which is not after the injection (blocks.${injectLayer}.hook_resid_post)`);
  return out.layer;
}

/** One strength: the decomposition of d gap/dα at every dictionary's layer. */
export async function attributeAt(model: Model, sp: GapSpellings, injectFrom: number, inj: { layer: number; vector: Float32Array }, dicts: readonly Dictionary[], alpha: number): Promise<StrengthAttribution> {
  const at = hookName(inj.layer, "hook_resid_post");
  const pos = { from: injectFrom };
  const layers = dicts.map((d) => checkDict(model, d, inj.layer));
  const reads = [...new Set(dicts.flatMap((d, i) => [d.inputSite, hookName(layers[i]!, "hook_mlp_out"), hookName(layers[i]!, "hook_resid_mid")]))];
  const gg = await gapGrad(model, sp, { sites: layers.map((l) => hookName(l, "hook_mlp_out")), injection: { at, vector: inj.vector, scale: alpha, pos } });
  const out: LayerAttribution[] = dicts.map((d, i) => ({ layer: layers[i]!, sa: new Float64Array(d.dSae), upstream: 0, skip: 0, error: 0, terms: [] }));
  for (const term of gg.terms) {
    const ids = term.spelling.ids, n = ids.length, w = term.weight;
    const jvp = await model.jvpScale([{ ids }], { plan: [{ op: "add", at, vector: inj.vector, scale: alpha, pos }], wrt: 0, reads });
    dicts.forEach((d, i) => {
      const l = layers[i]!, la = out[i]!;
      const x = jvp.values.get(d.inputSite)![0]!, dx = jvp.tangents.get(d.inputSite)![0]!;
      const dy = jvp.tangents.get(hookName(l, "hook_mlp_out"))![0]!, dmid = jvp.tangents.get(hookName(l, "hook_resid_mid"))![0]!;
      const g = term.grads.get(hookName(l, "hook_mlp_out"))!;
      const D = d.dOut, S = d.dSae;
      const acts = encode(d, x, n);
      const sg = new Float64Array(n * S), ga = new Float64Array(n * S);
      const recon = new Float64Array(D);
      for (let p = 0; p < n; p++) {
        recon.fill(0);
        for (let f = 0; f < S; f++) {
          if (acts[p * S + f]! <= 0) continue;
          let t = 0;
          for (let j = 0; j < d.dIn; j++) t += d.wEnc[j * S + f]! * dx[p * d.dIn + j]!;
          let gaf = 0;
          for (let j = 0; j < D; j++) { gaf += g[p * D + j]! * d.wDec[f * D + j]!; recon[j] = recon[j]! + t * d.wDec[f * D + j]!; }
          sg[p * S + f] = t;
          ga[p * S + f] = gaf;
          la.sa[f] = la.sa[f]! + w * t * gaf;
        }
        if (d.wSkip) {
          for (let j = 0; j < D; j++) {
            let s = 0;
            for (let k = 0; k < d.dIn; k++) s += dx[p * d.dIn + k]! * d.wSkip[k * D + j]!;
            recon[j] = recon[j]! + s;
            la.skip += w * g[p * D + j]! * s;
          }
        }
        for (let j = 0; j < D; j++) {
          la.upstream += w * g[p * D + j]! * dmid[p * D + j]!;
          la.error += w * g[p * D + j]! * (dy[p * D + j]! - recon[j]!);
        }
      }
      la.terms.push({ weight: w, sg, ga, acts });
    });
  }
  return { alpha, gap: gg.gap, total: gg.dScale!, layers: out };
}

/** Trapezoid weights for sorted xs over [xs[0], xs[last]]. */
export function trapezoid(xs: readonly number[]): number[] {
  return xs.map((_, i) => ((i > 0 ? xs[i]! - xs[i - 1]! : 0) + (i < xs.length - 1 ? xs[i + 1]! - xs[i]! : 0)) / 2);
}

export interface FeatureAttribution {
  layer: number;
  feature: number;
  /** ∫ SA dα over the strength grid. */
  isa: number;
  /** SA at the largest strength. */
  saTop: number;
  /** Mean activation over the injected positions without injection, and at the largest strength. */
  act0: number;
  actTop: number;
}

export interface GraphEdge {
  from: string;
  to: string;
  weight: number;
}

export interface AttributionSummary {
  alphas: number[];
  gaps: number[];
  totals: number[];
  /** Per layer: ∫ over α of upstream, skip, error, and Σ ISA. */
  layers: { layer: number; upstream: number; skip: number; error: number; features: number; maxInvariantError: number }[];
  /** gap(α_max) − gap(0) against ∫ total dα (the trapezoid's own error). */
  gapChange: number;
  integratedTotal: number;
  features: FeatureAttribution[];
  edges: GraphEdge[];
}

export const nodeId = (layer: number, f: number): string => `L${layer}/f${f}`;

/**
 * Integrate per-strength attributions (sorted by α, including 0) into ISA per feature, the residual
 * terms, and graph edges among the `top` features per layer by |ISA|.
 */
export function summarise(runs: readonly StrengthAttribution[], dicts: readonly Dictionary[], injectFrom: number, promptLength: number, top = 8): AttributionSummary {
  const alphas = runs.map((r) => r.alpha);
  if (alphas.some((a, i) => i > 0 && a <= alphas[i - 1]!)) throw new Error("steering attribution: strengths must be sorted and distinct");
  if (!alphas.includes(0)) throw new UsageError("--strengths must include 0 (ISA integrates from the unsteered prompt)");
  // Integrate from 0 to the largest strength (negative strengths are reported, not integrated).
  const pos = runs.filter((r) => r.alpha >= 0);
  const w = trapezoid(pos.map((r) => r.alpha));
  const zero = runs.find((r) => r.alpha === 0)!, hi = runs[runs.length - 1]!;
  const features: FeatureAttribution[] = [];
  const layers = dicts.map((d, i) => {
    const S = d.dSae;
    const isa = new Float64Array(S);
    let up = 0, sk = 0, er = 0, maxInv = 0;
    pos.forEach((r, k) => {
      const la = r.layers[i]!;
      for (let f = 0; f < S; f++) isa[f] = isa[f]! + w[k]! * la.sa[f]!;
      up += w[k]! * la.upstream; sk += w[k]! * la.skip; er += w[k]! * la.error;
    });
    for (const r of runs) {
      const la = r.layers[i]!;
      const sum = la.sa.reduce((a, b) => a + b, 0) + la.upstream + la.skip + la.error;
      maxInv = Math.max(maxInv, Math.abs(sum - r.total) / Math.max(1e-12, Math.abs(r.total)));
    }
    // Activations on the prompt's injected positions (the same in every spelling's pass: causal).
    const meanAct = (r: StrengthAttribution, f: number) => {
      const a = r.layers[i]!.terms[0]!.acts;
      let s = 0;
      for (let p = injectFrom; p < promptLength; p++) s += a[p * S + f]!;
      return s / Math.max(1, promptLength - injectFrom);
    };
    for (let f = 0; f < S; f++) features.push({ layer: hi.layers[i]!.layer, feature: f, isa: isa[f]!, saTop: hi.layers[i]!.sa[f]!, act0: meanAct(zero, f), actTop: meanAct(hi, f) });
    return { layer: hi.layers[i]!.layer, upstream: up, skip: sk, error: er, features: isa.reduce((a, b) => a + b, 0), maxInvariantError: maxInv };
  });
  // Edges among each layer's top features.
  const topOf = (i: number) => features.filter((f) => f.layer === layers[i]!.layer).sort((a, b) => Math.abs(b.isa) - Math.abs(a.isa) || a.feature - b.feature).slice(0, top);
  const edges: GraphEdge[] = [];
  const gapNode = "gap";
  dicts.forEach((_, i) => {
    for (const f of topOf(i)) {
      edges.push({ from: "alpha", to: nodeId(f.layer, f.feature), weight: f.isa });
      edges.push({ from: nodeId(f.layer, f.feature), to: gapNode, weight: f.isa });
    }
  });
  for (let i = 0; i < dicts.length; i++)
    for (let j = 0; j < dicts.length; j++) {
      const up = dicts[i]!, down = dicts[j]!;
      if (layers[i]!.layer >= layers[j]!.layer) continue;
      for (const c of topOf(i))
        for (const g of topOf(j)) {
          let vw = 0;
          for (let k = 0; k < up.dOut; k++) vw += up.wDec[c.feature * up.dOut + k]! * down.wEnc[k * down.dSae + g.feature]!;
          let e = 0;
          pos.forEach((r, k) => {
            r.layers[i]!.terms.forEach((a, t) => {
              const b = r.layers[j]!.terms[t]!;
              const n = a.acts.length / up.dSae;
              for (let p = 0; p < n; p++) if (b.acts[p * down.dSae + g.feature]! > 0) e += w[k]! * a.weight * b.ga[p * down.dSae + g.feature]! * vw * a.sg[p * up.dSae + c.feature]!;
            });
          });
          if (e !== 0) edges.push({ from: nodeId(c.layer, c.feature), to: nodeId(g.layer, g.feature), weight: e });
        }
    }
  return {
    alphas,
    gaps: runs.map((r) => r.gap),
    totals: runs.map((r) => r.total),
    layers,
    gapChange: hi.gap - zero.gap,
    integratedTotal: pos.reduce((s, r, k) => s + w[k]! * r.total, 0),
    features: features.sort((a, b) => Math.abs(b.isa) - Math.abs(a.isa) || a.layer - b.layer || a.feature - b.feature),
    edges,
  };
}

// ---------------------------------------------------------------- the command

export interface SteeringArgs extends SiteArgs {
  /** Comma-separated transcoder files (train-transcoder's, or Gemma Scope 2 params.safetensors with --transcoder-layers). */
  transcoders: string;
  transcoderLayers?: string;
  /** Strengths, from 0 up (default 0,0.5,…,4). */
  strengths?: string;
  /** Features per layer in the graph. */
  top?: number;
}

export interface SteeringResults {
  recipe: "steering-attribution";
  model: string;
  injection_layer: number;
  strengths: number[];
  concepts: string[];
  gap: string;
  dictionaries: { source: string; layer: number; d_sae: number }[];
  /** Per concept: gap and d gap/dα per strength, the layer residuals and the invariant's worst relative error. */
  per_concept: { concept: string; gaps: number[]; totals: number[]; gap_change: number; integrated_total: number; layers: AttributionSummary["layers"] }[];
  /** Mean over concepts. */
  features: FeatureAttribution[];
  edges: GraphEdge[];
  gates: string[];
  carriers: string[];
  notes: string[];
}

function meanOver<T>(xs: readonly T[][], key: (t: T) => string, val: (t: T) => number): Map<string, { item: T; mean: number }> {
  const out = new Map<string, { item: T; mean: number }>();
  for (const list of xs) for (const t of list) {
    const k = key(t), e = out.get(k);
    if (e) e.mean += val(t) / xs.length;
    else out.set(k, { item: t, mean: val(t) / xs.length });
  }
  return out;
}

export async function steeringCommand(a: SteeringArgs): Promise<SteeringResults> {
  const model = await loadAnalysisModel(a);
  try {
    const { cfg, layer: L } = siteConfig("steering-attribution", { ...a, strengths: undefined }, model);
    const alphas = a.strengths ? parseNumbers(a.strengths, "--strengths") : [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4];
    if (!alphas.includes(0) || alphas.some((x) => x < 0) || alphas.some((x, i) => i > 0 && x <= alphas[i - 1]!)) throw new UsageError("--strengths: increasing, from 0 (ISA integrates from the unsteered prompt), no negatives");
    const files = a.transcoders.split(",").filter(Boolean);
    const tl = a.transcoderLayers ? parseNumbers(a.transcoderLayers, "--transcoder-layers") : [];
    if (tl.length && tl.length !== files.length) throw new UsageError(`--transcoder-layers: ${tl.length} layers for ${files.length} transcoders`);
    const dicts = files.map((f, i) => loadAny(f, tl[i], model, "--transcoder-layers")).sort((x, y) => x.outputSite.localeCompare(y.outputSite, "en", { numeric: true }));
    const vs = await siteVectors(model, cfg, L, a.vectorCache);
    const p = renderTrial(model, getVariant("original"), 1, { format: cfg.promptFormat, judgePrompt: "question" });
    const sp = gapSpellings(model, p.text, p.ids);
    const top = a.top ?? 8;
    const sums: AttributionSummary[] = [];
    for (const concept of cfg.concepts) {
      const runs: StrengthAttribution[] = [];
      for (const alpha of alphas) runs.push(await attributeAt(model, sp, p.injectFrom, { layer: L, vector: vs.get(concept)! }, dicts, alpha));
      sums.push(summarise(runs, dicts, p.injectFrom, sp.promptLength, top));
      if (!a.quiet) process.stderr.write(`steering-attribution: ${concept} done\n`);
    }
    const feats = [...meanOver(sums.map((s) => s.features), (f) => nodeId(f.layer, f.feature), (f) => f.isa).values()].map(({ item, mean }) => {
      const all = sums.map((s) => s.features.find((f) => f.layer === item.layer && f.feature === item.feature)!);
      const m = (k: "saTop" | "act0" | "actTop") => all.reduce((s, f) => s + f[k], 0) / all.length;
      return { layer: item.layer, feature: item.feature, isa: mean, saTop: m("saTop"), act0: m("act0"), actTop: m("actTop") };
    }).sort((x, y) => Math.abs(y.isa) - Math.abs(x.isa) || x.layer - y.layer || x.feature - y.feature);
    const shown = new Set<string>(["alpha", "gap"]);
    for (const d of dicts) {
      const l = parseHook(d.outputSite, model.config.nLayers).layer!;
      for (const f of feats.filter((x) => x.layer === l).slice(0, top)) shown.add(nodeId(f.layer, f.feature));
    }
    const edges = [...meanOver(sums.map((s) => s.edges), (e) => `${e.from}>${e.to}`, (e) => e.weight).values()].map(({ item, mean }) => ({ from: item.from, to: item.to, weight: mean })).filter((e) => shown.has(e.from) && shown.has(e.to));
    // Gates: shown features whose activation falls with the injection while their attribution raises the gap
    // (switching them off moves the answer toward Yes); carriers: shown features that rise and feed a gate.
    const gates = feats.filter((f) => shown.has(nodeId(f.layer, f.feature)) && f.actTop < f.act0 && f.isa > 0).map((f) => nodeId(f.layer, f.feature));
    const carriers = feats.filter((f) => shown.has(nodeId(f.layer, f.feature)) && f.actTop > f.act0 && edges.some((e) => e.from === nodeId(f.layer, f.feature) && gates.includes(e.to) && e.weight > 0)).map((f) => nodeId(f.layer, f.feature));
    const results: SteeringResults = {
      recipe: "steering-attribution",
      model: a.model,
      injection_layer: L,
      strengths: alphas,
      concepts: cfg.concepts,
      gap: sp.describe,
      dictionaries: dicts.map((d) => ({ source: d.source, layer: parseHook(d.outputSite, model.config.nLayers).layer!, d_sae: d.dSae })),
      per_concept: sums.map((s, i) => ({ concept: cfg.concepts[i]!, gaps: s.gaps, totals: s.totals, gap_change: s.gapChange, integrated_total: s.integratedTotal, layers: s.layers })),
      features: feats.slice(0, 50),
      edges,
      gates,
      carriers,
      notes: [
        "SA = GA × SG per feature and position, summed over positions; ISA integrates SA over the strengths by the trapezoid rule from 0 (docs/mechanisms.md).",
        "Residual (unexplained) = upstream (paths that bypass the layer's MLP) + error node; per layer, Σ SA + skip + residual equals d gap/dα from the backward pass (max relative error in per_concept[].layers[].maxInvariantError).",
        "Feature→feature edges count only the direct residual path at the same position; attention paths stay in the nodes. One prompt (Trial 1) per concept.",
        "Gates and carriers here are labels from this run's signs (activation falls and attribution raises the gap; rises and feeds a gate), candidates to test by intervention, not findings.",
      ],
    };
    fs.mkdirSync(a.out, { recursive: true });
    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    fs.writeFileSync(path.join(a.out, "report.html"), steeringReport(results));
    return results;
  } finally {
    model.dispose();
  }
}

/** The attribution graph as SVG: columns α → layers → gap; node area ∝ |ISA|; edge width ∝ |weight|; blue raises the gap, red lowers it. */
export function graphSvg(r: Pick<SteeringResults, "features" | "edges" | "gates" | "carriers" | "dictionaries">): string {
  const layers = [...new Set(r.dictionaries.map((d) => d.layer))].sort((x, y) => x - y);
  const cols = ["alpha", ...layers.map(String), "gap"];
  const nodes = new Map<string, { x: number; y: number; r: number; label: string; isa: number }>();
  const W = 160 * cols.length, H0 = 60;
  const inGraph = new Set(r.edges.flatMap((e) => [e.from, e.to]));
  const maxIsa = Math.max(1e-12, ...r.features.map((f) => Math.abs(f.isa)));
  let H = 200;
  layers.forEach((l, ci) => {
    const fs_ = r.features.filter((f) => f.layer === l && inGraph.has(nodeId(f.layer, f.feature)));
    fs_.forEach((f, k) => nodes.set(nodeId(l, f.feature), { x: 80 + 160 * (ci + 1), y: H0 + 50 * k, r: 4 + 16 * Math.sqrt(Math.abs(f.isa) / maxIsa), label: `L${l} f${f.feature}`, isa: f.isa }));
    H = Math.max(H, H0 + 50 * fs_.length);
  });
  nodes.set("alpha", { x: 80, y: H / 2, r: 10, label: "injection α", isa: 0 });
  nodes.set("gap", { x: 80 + 160 * (cols.length - 1), y: H / 2, r: 10, label: "Yes − No gap", isa: 0 });
  const maxW = Math.max(1e-12, ...r.edges.map((e) => Math.abs(e.weight)));
  const col = (x: number) => (x >= 0 ? "#2b6cb0" : "#c53030");
  const edges = r.edges.filter((e) => nodes.has(e.from) && nodes.has(e.to)).map((e) => {
    const a = nodes.get(e.from)!, b = nodes.get(e.to)!;
    return `<line class="edge" data-from="${escapeHtml(e.from)}" data-to="${escapeHtml(e.to)}" x1="${a.x}" y1="${a.y}" x2="${b.x}" y2="${b.y}" stroke="${col(e.weight)}" stroke-opacity="0.6" stroke-width="${(0.5 + 6 * Math.abs(e.weight) / maxW).toFixed(2)}"><title>${escapeHtml(`${e.from} → ${e.to}: ${e.weight.toExponential(3)}`)}</title></line>`;
  });
  const ns = [...nodes.entries()].map(([id, n]) => {
    const mark = r.gates.includes(id) ? ` stroke="#000" stroke-width="3" stroke-dasharray="3 2"` : r.carriers.includes(id) ? ` stroke="#000" stroke-width="3"` : "";
    const role = r.gates.includes(id) ? " (gate)" : r.carriers.includes(id) ? " (carrier)" : "";
    return `<g class="node" data-id="${escapeHtml(id)}"><circle cx="${n.x}" cy="${n.y}" r="${n.r.toFixed(1)}" fill="${id === "alpha" || id === "gap" ? "#718096" : col(n.isa)}"${mark}><title>${escapeHtml(`${n.label}${role}${id === "alpha" || id === "gap" ? "" : `: ISA ${n.isa.toExponential(3)}`}`)}</title></circle><text x="${n.x}" y="${n.y - n.r - 4}" text-anchor="middle" font-size="11">${escapeHtml(n.label + role)}</text></g>`;
  });
  const heads = cols.map((c, i) => `<text x="${80 + 160 * i}" y="20" text-anchor="middle" font-size="12" font-weight="bold">${escapeHtml(c === "alpha" ? "injection" : c === "gap" ? "output" : `block ${c} MLP`)}</text>`);
  return `<svg id="graph" xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H + 40}" viewBox="0 0 ${W} ${H + 40}">${heads.join("")}${edges.join("")}${ns.join("")}</svg>`;
}

// Click a node: keep its edges, fade the rest; click the background to reset.
const GRAPH_SCRIPT = `document.getElementById("graph").addEventListener("click",function(e){var g=e.target.closest(".node");var id=g?g.getAttribute("data-id"):null;document.querySelectorAll("#graph .edge").forEach(function(l){l.style.opacity=!id||l.getAttribute("data-from")===id||l.getAttribute("data-to")===id?"1":"0.08";});});`;

export function steeringReport(r: SteeringResults): string {
  const f3 = (x: number) => x.toExponential(3);
  const body = [
    `<h1>${escapeHtml(`selfscope steering attribution — ${path.basename(r.model)}`)}</h1>`,
    `<p class="muted">${escapeHtml(`injection at blocks.${r.injection_layer}.hook_resid_post · ${r.concepts.length} concepts · strengths ${r.strengths.join(", ")} · ${r.gap}`)}</p>`,
    `<section><h2>Attribution graph (mean over concepts)</h2><p class="muted">Node area ∝ |ISA|; blue raises the Yes − No gap, red lowers it; dashed ring: gate, solid ring: carrier. Click a node to isolate its edges.</p>${graphSvg(r)}</section>`,
    `<section><h2>Features by |ISA|</h2>${htmlTable(["node", "ISA", "SA at the top strength", "act unsteered", "act at the top strength"], r.features.slice(0, 20).map((f) => [nodeId(f.layer, f.feature), f3(f.isa), f3(f.saTop), f.act0.toFixed(3), f.actTop.toFixed(3)]))}</section>`,
    `<section><h2>Decomposition per concept and layer (integrated over α)</h2>${htmlTable(["concept", "layer", "Σ ISA", "skip", "error node", "upstream", "Δgap", "∫ d gap/dα", "max invariant error"], r.per_concept.flatMap((c) => c.layers.map((l) => [c.concept, l.layer, f3(l.features), f3(l.skip), f3(l.error), f3(l.upstream), f3(c.gap_change), f3(c.integrated_total), l.maxInvariantError.toExponential(1)])))}</section>`,
    `<section><h2>Caveats</h2>${r.notes.map((n) => `<p class="note">${escapeHtml(n)}</p>`).join("")}</section>`,
  ];
  return htmlDocument({ title: `selfscope steering attribution — ${path.basename(r.model)}`, body: `<main>\n${body.join("\n")}\n</main>`, script: GRAPH_SCRIPT });
}
